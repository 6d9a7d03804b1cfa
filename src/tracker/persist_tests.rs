//! Restore equivalence, in simulated time: a run that is snapshot and
//! restored at any point (into any number of shards) gives the same later
//! events, replies and device states as a run without the restart; after a
//! downtime, only devices whose deadline passed get the documented grace.

use super::security_tests::{MASTER, heartbeat, key_of, leave, signed, unsigned};
use super::test_prelude::*;
use super::*;
use crate::shard::{self, Route};
use crate::state::{Chunk, Encoder, Snapshot};
use crate::wire::MAX_DATAGRAM;
use proptest::prelude::*;
use std::net::Ipv4Addr;

const WALL0: Duration = Duration::from_millis(super::tests::WALL0_MS);

/// Shards of one server, driven in simulated time.
struct Fleet {
    shards: Vec<Tracker>,
    t0: Instant,
    now: Instant,
    reply: Vec<u8>,
    /// Every event so far, in the order the shards gave them.
    events: Vec<Event>,
}

fn config() -> Config {
    Config {
        auth: AuthMode::Optional,
        keys: Some(Keys::from_master(&MASTER)),
        suspect_events: true,
        forget_after: Some(Duration::from_secs(30)),
        ..Config::default()
    }
}

fn device_addr(device: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, device as u8 + 1)), 4000)
}

impl Fleet {
    fn new(shards: usize) -> Self {
        let t0 = Instant::from_micros(1 << 40);
        let shards = Tracker::new_sharded(config(), shards, t0, UNIX_EPOCH + WALL0).unwrap();
        Fleet { shards, t0, now: t0, reply: vec![0; MAX_DATAGRAM], events: Vec::new() }
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + WALL0 + (self.now - self.t0)
    }

    /// Sends one datagram to the shard that owns it; what became of it.
    fn send(&mut self, from: SocketAddr, datagram: &[u8]) -> String {
        let shard = match shard::route(datagram, self.shards.len()) {
            Route::Shard(k) => k,
            _ => 0,
        };
        let handled = self.shards[shard].handle(self.now, from, datagram, &mut self.reply);
        self.collect();
        match handled {
            Handled::Dropped { reason, .. } => format!("dropped {}", reason.name()),
            _ => "accepted".into(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        for shard in &mut self.shards {
            shard.handle_timeout(self.now);
        }
        self.collect();
    }

    fn collect(&mut self) {
        for shard in &mut self.shards {
            while let Some(event) = shard.poll_event() {
                self.events.push(event);
            }
        }
    }

    /// The state file the shards would write now, in chunks of 3 devices.
    fn snapshot(&self, event_seq: u64) -> Vec<u8> {
        let (mut encoder, header) = Encoder::start();
        let mut file = header.to_vec();
        for shard in &self.shards {
            let mut at = Some(0);
            while let Some(start) = at {
                let mut chunk = Chunk::default();
                at = shard.snapshot_chunk(start, 3, &mut chunk);
                encoder.add(&chunk);
                file.extend_from_slice(&chunk.bytes);
            }
        }
        file.extend_from_slice(&encoder.finish(event_seq, self.wall(), true));
        file
    }

    /// Stops, stays down for `down_ms`, and starts again from `file` with `shards` shards.
    fn restart(&mut self, file: &[u8], down_ms: u64, shards: usize) -> Restored {
        self.now += Duration::from_millis(down_ms);
        let snapshot = Snapshot::read(file).unwrap();
        let (restored, report) =
            Tracker::restore_sharded(config(), shards, self.now, self.wall(), &snapshot).unwrap();
        self.shards = restored;
        for shard in &self.shards {
            shard.table().assert_invariants();
        }
        report
    }

    /// Every device as the shards hold it (all but the per-process counters).
    fn devices(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard.table().devices_from(crate::table::Which::All, 0).map(|(_, id, entry)| {
                    format!(
                        "{id} {:?} {:?} {:?} {:?}",
                        entry.held(id),
                        entry.deadline(),
                        entry.due(),
                        entry.offline_reason()
                    )
                })
            })
            .collect();
        all.sort();
        all
    }

    fn events_since(&self, from: usize) -> Vec<String> {
        let mut events: Vec<String> = self.events[from..].iter().map(|e| format!("{e:?}")).collect();
        // Shards interleave differently; each device's events are in order.
        events.sort();
        events
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A heartbeat: device, seq step (0 repeats the last), interval, signed.
    Beat(usize, u32, u32, bool),
    /// A leave: device, signed.
    Leave(usize, bool),
    /// An earlier datagram sent again (a replay), by index.
    Replay(usize),
    /// Time passes.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6usize, 0..3u32, prop_oneof![Just(1000u32), Just(3000)], any::<bool>())
            .prop_map(|(d, step, interval, signed)| Op::Beat(d, step, interval, signed)),
        1 => (0..6usize, any::<bool>()).prop_map(|(d, s)| Op::Leave(d, s)),
        1 => any::<usize>().prop_map(Op::Replay),
        3 => (0..4000u64).prop_map(Op::Wait),
    ]
}

/// Plays `ops` on `fleet`, returning what became of each datagram.
/// `sent` and `seqs` carry over between calls (the devices' own memory).
fn play(fleet: &mut Fleet, ops: &[Op], sent: &mut Vec<(usize, Vec<u8>)>, seqs: &mut [u32; 6]) -> Vec<String> {
    let mut results = Vec::new();
    for op in ops {
        let result = match *op {
            Op::Beat(d, step, interval, sign) => {
                seqs[d] += step;
                let id = format!("dev-{d}");
                let mut message = heartbeat(&id, 1, seqs[d]);
                if let Message::Heartbeat(hb) = &mut message {
                    hb.interval_ms = interval;
                }
                let bytes = if sign { signed(&message, &key_of(&id)) } else { unsigned(&message) };
                sent.push((d, bytes.clone()));
                fleet.send(device_addr(d), &bytes)
            }
            Op::Leave(d, sign) => {
                seqs[d] += 1;
                let id = format!("dev-{d}");
                let message = leave(&id, 1, seqs[d]);
                let bytes = if sign { signed(&message, &key_of(&id)) } else { unsigned(&message) };
                sent.push((d, bytes.clone()));
                fleet.send(device_addr(d), &bytes)
            }
            Op::Replay(i) if !sent.is_empty() => {
                let (d, bytes) = sent[i % sent.len()].clone();
                fleet.send(device_addr(d), &bytes)
            }
            Op::Replay(_) => continue,
            Op::Wait(ms) => {
                fleet.advance(ms);
                continue;
            }
        };
        results.push(result);
    }
    results
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// ARCHITECTURE.md invariant 13 (restore equivalence).
    #[test]
    fn a_restart_at_any_point_changes_nothing_that_follows(
        ops in proptest::collection::vec(op(), 1..80),
        cut in any::<prop::sample::Index>(),
        shards_before in 1..4usize,
        shards_after in 1..4usize,
    ) {
        let cut = cut.index(ops.len() + 1);
        let (mut plain, mut restarted) = (Fleet::new(shards_before), Fleet::new(shards_before));
        let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
        let (mut seqs_a, mut seqs_b) = ([0u32; 6], [0u32; 6]);
        play(&mut plain, &ops[..cut], &mut sent_a, &mut seqs_a);
        play(&mut restarted, &ops[..cut], &mut sent_b, &mut seqs_b);
        let from = restarted.events.len();
        let file = restarted.snapshot(from as u64);
        let report = restarted.restart(&file, 0, shards_after);
        prop_assert_eq!(report.graced, 0);
        prop_assert_eq!(restarted.devices(), plain.devices());
        let after_a = play(&mut plain, &ops[cut..], &mut sent_a, &mut seqs_a);
        let after_b = play(&mut restarted, &ops[cut..], &mut sent_b, &mut seqs_b);
        prop_assert_eq!(after_b, after_a);
        prop_assert_eq!(restarted.events_since(from), plain.events_since(from));
        prop_assert_eq!(restarted.devices(), plain.devices());
    }
}

#[test]
fn a_restore_brings_devices_back_without_events_and_refuses_every_old_frame() {
    let mut fleet = Fleet::new(1);
    let mut frames = Vec::new();
    for seq in 1..=30 {
        let frame = signed(&heartbeat("d", 1, seq), &key_of("d"));
        assert_eq!(fleet.send(device_addr(0), &frame), "accepted");
        frames.push(frame);
        fleet.advance(1000);
    }
    fleet.send(device_addr(1), &unsigned(&heartbeat("quiet", 1, 1)));
    fleet.advance(10_000);
    let before = fleet.devices();
    let events = fleet.events.len();
    let file = fleet.snapshot(7);
    fleet.restart(&file, 0, 2);
    assert_eq!(fleet.devices(), before);
    assert_eq!(fleet.events.len(), events, "a restore emits nothing");
    for frame in &frames {
        assert_eq!(fleet.send(device_addr(0), frame), "dropped replay");
    }
    assert_eq!(fleet.send(device_addr(0), &unsigned(&heartbeat("d", 1, 31))), "dropped missing_tag");
    assert_eq!(fleet.send(device_addr(0), &signed(&heartbeat("d", 1, 31), &key_of("d"))), "accepted");
}

#[test]
fn after_a_downtime_only_passed_deadlines_get_one_ttl_of_grace() {
    let mut fleet = Fleet::new(1);
    let long = |id| {
        let mut message = heartbeat(id, 1, 1);
        if let Message::Heartbeat(hb) = &mut message {
            hb.interval_ms = 20_000;
        }
        unsigned(&message)
    };
    fleet.send(device_addr(0), &long("long")); // TTL 60 s
    fleet.send(device_addr(1), &unsigned(&heartbeat("short", 1, 1))); // TTL 3 s
    fleet.advance(1_000);
    let long_due = fleet.shards[0].table().get("long").unwrap().due();
    let file = fleet.snapshot(0);
    fleet.events.clear();
    // Down for 10 s: "short" (due at 3 s) passed its deadline meanwhile.
    let report = fleet.restart(&file, 10_000, 1);
    assert_eq!((report.devices, report.online, report.graced), (2, 2, 1));
    let restart = fleet.now;
    let table = fleet.shards[0].table();
    assert_eq!(table.get("long").unwrap().due(), long_due, "a deadline still ahead is kept");
    let short = table.get("short").unwrap();
    assert_eq!(short.due(), restart + Duration::from_secs(3), "one TTL from the restart");
    assert_eq!(restart - short.last_seen(), Duration::from_secs(11), "last seen stays true");
    // Last heard 11 s ago with a 1 s interval, it is late: with suspect
    // events on, that is said at once; its deadline is the grace's.
    fleet.advance(2_999);
    let events: Vec<_> = fleet.events.iter().map(|e| (&*e.device, e.kind, e.version, e.at)).collect();
    assert_eq!(events, [("short", EventKind::Suspect, 2, restart + Duration::from_millis(2_999))]);
    fleet.advance(1);
    let offline: Vec<_> =
        fleet.events[1..].iter().map(|e| (&*e.device, e.kind, e.version, e.deadline)).collect();
    assert_eq!(
        offline,
        [(
            "short",
            EventKind::Offline(crate::table::OfflineReason::Expired),
            3,
            Some(restart + Duration::from_secs(3))
        )]
    );
}
