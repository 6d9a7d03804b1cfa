//! Suspect devices, self-preservation and flap damping, in simulated time.

use super::test_prelude::*;
use super::*;
use crate::wire::{Heartbeat, MAX_DATAGRAM};
use proptest::prelude::*;
use std::collections::HashMap;

const FROM: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9)), 4000);

/// One engine in simulated time, with each device's next seq.
struct Run {
    tracker: Tracker,
    t0: Instant,
    now: Instant,
    seqs: HashMap<String, u32>,
    events: Vec<Event>,
}

impl Run {
    fn new(config: Config) -> Self {
        let t0 = Instant::from_micros(1 << 40);
        let tracker = Tracker::new(config, t0, UNIX_EPOCH + Duration::from_secs(1_800_000_000)).unwrap();
        Run { tracker, t0, now: t0, seqs: HashMap::new(), events: Vec::new() }
    }

    fn collect(&mut self) {
        while let Some(event) = self.tracker.poll_event() {
            self.events.push(event);
        }
    }

    /// A heartbeat declaring a 1 s interval (TTL 3 s, late at 2 s).
    fn beat(&mut self, device: &str) {
        let seq = self.seqs.entry(device.to_string()).or_default();
        *seq += 1;
        let mut buf = [0u8; MAX_DATAGRAM];
        let len = wire::encode(&Message::Heartbeat(Heartbeat::new(device, 1, *seq, 1000)), &mut buf).unwrap();
        let mut reply = [0u8; MAX_DATAGRAM];
        self.tracker.handle(self.now, FROM, &buf[..len], &mut reply);
        self.collect();
    }

    fn leave(&mut self, device: &str) {
        let seq = self.seqs.entry(device.to_string()).or_default();
        *seq += 1;
        let mut buf = [0u8; MAX_DATAGRAM];
        let len =
            wire::encode(&Message::Leave(Leave { device, boot: 1, seq: *seq, tag: None }), &mut buf).unwrap();
        let mut reply = [0u8; MAX_DATAGRAM];
        self.tracker.handle(self.now, FROM, &buf[..len], &mut reply);
        self.collect();
    }

    /// Moves time to `ms` after the start, in 100 ms steps, handling timeouts.
    fn until(&mut self, ms: u64) {
        let end = self.t0 + Duration::from_millis(ms);
        while self.now < end {
            self.now = (self.now + Duration::from_millis(100)).min(end);
            self.tracker.handle_timeout(self.now);
            self.collect();
        }
    }

    /// Devices `range` beat every second from now until `ms`.
    fn beating(&mut self, range: std::ops::Range<usize>, ms: u64) {
        let end = self.t0 + Duration::from_millis(ms);
        while self.now < end {
            for d in range.clone() {
                self.beat(&format!("d{d}"));
            }
            let next = self.now + Duration::from_secs(1);
            self.until((next.min(end) - self.t0).as_millis() as u64);
        }
    }

    /// The events since `from`, as (device, name, version).
    fn names(&self, from: usize) -> Vec<(String, &'static str, u32)> {
        self.events[from..].iter().map(|e| (e.device.to_string(), e.kind.name(), e.version)).collect()
    }

    fn count(&self, from: usize, kind: EventKind) -> usize {
        self.events[from..].iter().filter(|e| e.kind == kind).count()
    }

    fn info(&mut self, device: &str) -> (bool, u8, u32) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let len = crate::client::encode_query(1, QueryKind::Device(device), None, &mut buf).unwrap();
        let mut reply = vec![0u8; MAX_DATAGRAM];
        let from = SocketAddr::from(([127, 0, 0, 1], 9));
        let Handled::Reply(n) = self.tracker.handle(self.now, from, &buf[..len], &mut reply) else {
            panic!()
        };
        let Ok(Message::Status(Status { body: StatusBody::Device(info), .. })) = wire::decode(&reply[..n])
        else {
            panic!()
        };
        (info.online, info.offline_reason, info.numbers.flaps)
    }
}

#[test]
fn a_late_device_is_suspect_before_its_deadline() {
    let mut run = Run::new(Config::default());
    run.beat("d");
    run.until(1999);
    assert_eq!(run.info("d"), (true, wire::OFFLINE_NONE, 0));
    run.until(2000);
    assert_eq!(run.info("d"), (true, wire::ONLINE_SUSPECT, 0), "late by one interval");
    assert_eq!(run.tracker.totals().late, 1);
    assert_eq!(run.names(0), [("d".into(), "online", 1)], "no suspect events unless asked");
    run.beat("d");
    assert_eq!(run.info("d"), (true, wire::OFFLINE_NONE, 0));
    run.until(5000);
    run.until(6000);
    assert_eq!(run.names(0), [("d".into(), "online", 1), ("d".into(), "offline", 2)]);
}

#[test]
fn suspect_events_are_versioned_and_the_return_says_from_suspect() {
    let mut run = Run::new(Config { suspect_events: true, ..Config::default() });
    run.beat("d");
    run.until(2500);
    run.beat("d");
    run.until(10_000);
    let kinds: Vec<_> = run.events.iter().map(|e| (e.kind, e.version)).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Online, 1),
            (EventKind::Suspect, 2),
            (EventKind::Back, 3),
            (EventKind::Suspect, 4),
            (EventKind::Offline(crate::table::OfflineReason::Expired), 5),
        ]
    );
}

#[test]
fn a_blackout_holds_the_fleet_and_recovers_by_itself() {
    let mut run = Run::new(Config::default());
    run.beating(0..100, 10_000);
    let before = run.events.len();
    assert_eq!(before, 100);
    // Nothing for 3 TTLs: the server's network is down.
    run.until(19_000);
    assert_eq!(run.count(before, EventKind::Degraded), 1);
    assert_eq!(run.count(before, EventKind::Offline(crate::table::OfflineReason::Expired)), 0);
    let totals = run.tracker.totals();
    assert_eq!((totals.online, totals.late, totals.held, totals.degraded), (100, 100, 100, 1));
    assert_eq!(run.info("d5"), (true, wire::ONLINE_HELD, 0));
    // 90 devices come back; 10 stay silent.
    run.beating(0..90, 40_000);
    let names = run.names(before);
    let recovered: Vec<_> = run.events[before..].iter().filter(|e| e.kind == EventKind::Recovered).collect();
    assert_eq!(recovered.len(), 1, "{names:?}");
    let fleet = recovered[0].fleet.unwrap();
    assert_eq!((fleet.cause, fleet.released), (FleetCause::HeartbeatsNormal, 10));
    let offline: Vec<_> = run.events[before..].iter().filter(|e| e.kind.name() == "offline").collect();
    assert_eq!(offline.len(), 10, "{names:?}");
    assert!(offline.iter().all(|e| e.device.strip_prefix('d').unwrap().parse::<usize>().unwrap() >= 90));
    assert!(offline.iter().all(|e| e.held_ms.unwrap() > 0 && e.version == 2));
    assert_eq!(run.count(before, EventKind::Online), 0, "devices that resumed never went offline");
    assert!(recovered[0].at - run.t0 <= Duration::from_secs(19 + 5), "recovers within a TTL or so");
    assert_eq!(run.tracker.totals().degraded, 0);
}

#[test]
fn a_blackout_that_lasts_ends_at_max_hold() {
    let preservation = Preservation { max_hold: Duration::from_secs(60), ..Preservation::default() };
    let mut run = Run::new(Config { preservation: Some(preservation), ..Config::default() });
    run.beating(0..100, 10_000);
    run.until(200_000);
    let recovered: Vec<_> = run.events.iter().filter(|e| e.kind == EventKind::Recovered).collect();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].fleet.map(|f| (f.cause, f.released)), Some((FleetCause::MaxHold, 100)));
    let degraded = run.events.iter().find(|e| e.kind == EventKind::Degraded).unwrap();
    assert_eq!(recovered[0].at - degraded.at, Duration::from_secs(60));
    assert_eq!(run.tracker.table().online_count(), 0);
}

#[test]
fn a_small_fleet_going_silent_is_just_offline() {
    let mut run = Run::new(Config::default());
    run.beating(0..10, 10_000);
    run.until(20_000);
    assert_eq!(run.count(0, EventKind::Degraded), 0);
    assert_eq!(run.count(0, EventKind::Offline(crate::table::OfflineReason::Expired)), 10);
}

#[test]
fn kernel_drops_make_the_server_suspect_its_network() {
    let mut run = Run::new(Config::default());
    run.beating(0..100, 5_000);
    run.tracker.note_kernel_drops(run.now, 0);
    assert!(!run.tracker.is_degraded());
    run.tracker.note_kernel_drops(run.now, 17);
    run.collect();
    assert!(run.tracker.is_degraded());
    let degraded = run.events.last().unwrap();
    assert_eq!(
        (degraded.kind, degraded.fleet.map(|f| f.cause)),
        (EventKind::Degraded, Some(FleetCause::KernelDrops))
    );
    // Heartbeats keep coming at the usual rate: it recovers after one TTL.
    run.beating(0..100, 15_000);
    assert!(!run.tracker.is_degraded());
    assert_eq!(run.count(0, EventKind::Recovered), 1);
}

#[test]
fn a_flapping_device_is_damped_until_it_is_stable() {
    let damping = FlapDamping { changes: 4, window: Duration::from_secs(60) };
    let mut run = Run::new(Config { flap_damping: Some(damping), ..Config::default() });
    run.beat("d");
    for _ in 0..6 {
        run.until((run.now - run.t0).as_millis() as u64 + 100);
        run.leave("d");
        run.beat("d");
    }
    // Changes 1-4 are reported, the 5th makes it flapping, the rest are held back.
    let kinds: Vec<_> = run.events.iter().map(|e| (e.kind.name(), e.version)).collect();
    assert_eq!(
        kinds,
        [("online", 1), ("offline", 2), ("online", 3), ("offline", 4), ("online", 5), ("flapping", 6)]
    );
    assert_eq!(run.events[5].online, Some(false), "it flapped as it went offline");
    assert_eq!(run.info("d").2, 5, "flap score: its changes within the window (capped at limit + 1)");
    // It beats on, online without a change for the window: stable, with
    // its state now, at the next version.
    let quiet_from = (run.now - run.t0).as_millis() as u64;
    let from = run.events.len();
    for second in 1..=59 {
        run.until(quiet_from + second * 1000);
        run.beat("d");
    }
    assert_eq!(run.names(from), []);
    run.until(quiet_from + 60_000);
    assert_eq!(run.names(from), [("d".into(), "stable", 7)]);
    assert_eq!(run.events.last().unwrap().online, Some(true));
    assert_eq!(run.info("d").2, 0);
}

#[test]
fn a_silent_offline_device_is_forgotten_at_its_time_and_comes_back_new() {
    let config = Config { forget_after: Some(Duration::from_secs(10)), ..Config::default() };
    let mut run = Run::new(config);
    run.beat("d");
    run.until(3000);
    assert_eq!(run.names(0), [("d".into(), "online", 1), ("d".into(), "offline", 2)]);
    // The engine sleeps exactly until the device is silent for 10 s.
    assert_eq!(run.tracker.poll_timeout(), Some(run.t0 + Duration::from_secs(10)));
    run.tracker.handle_timeout(run.t0 + Duration::from_millis(9999));
    run.collect();
    assert_eq!(run.events.len(), 2, "not a moment early");
    run.until(10_000);
    assert_eq!(run.names(2), [("d".into(), "forgotten", 3)]);
    let forgotten = &run.events[2];
    assert_eq!(forgotten.kind, EventKind::Forgotten(crate::table::ForgetReason::Silent));
    assert_eq!((forgotten.heartbeat_seq, forgotten.addr), (1, FROM));
    assert!(run.tracker.table().get("d").is_none(), "status says unknown");
    assert_eq!(run.tracker.table().known_count(), 0);
    // Only the flap window of its last change is left to wait for.
    assert!(run.tracker.poll_timeout().is_none_or(|due| due >= run.now + Duration::from_secs(500)));
    run.tracker.table().assert_invariants();
    // Back: a new device, versions from 1.
    run.beat("d");
    assert_eq!(run.names(3), [("d".into(), "online", 1)]);
}

#[test]
fn a_full_table_forgets_the_longest_silent_device_and_says_so() {
    let mut run = Run::new(Config { max_devices: 2, ..Config::default() });
    run.beat("a");
    run.until(1000);
    run.beat("b");
    run.until(5000);
    let from = run.events.len();
    run.beat("c");
    assert_eq!(run.names(from), [("a".into(), "forgotten", 3), ("c".into(), "online", 1)]);
    assert_eq!(run.events[from].kind, EventKind::Forgotten(crate::table::ForgetReason::Room));
    assert!(run.tracker.table().get("a").is_none());
    assert!(run.tracker.table().get("b").is_some(), "b was silent for less long");
}

#[test]
fn a_forgotten_flapping_device_starts_with_a_clean_history() {
    let damping = FlapDamping { changes: 2, window: Duration::from_secs(600) };
    let config = Config {
        flap_damping: Some(damping),
        forget_after: Some(Duration::from_secs(5)),
        ..Config::default()
    };
    let mut run = Run::new(config);
    for round in 0..3u64 {
        run.beat("d");
        run.until(round * 4000 + 3500);
    }
    assert!(run.tracker.flaps.is_flapping("d"));
    run.until(20_000);
    assert_eq!(run.events.last().map(|e| e.kind.name()), Some("forgotten"));
    assert!(!run.tracker.flaps.is_flapping("d"));
    let from = run.events.len();
    run.beat("d");
    assert_eq!(run.names(from), [("d".into(), "online", 1)]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// ARCHITECTURE.md invariant 11: whatever happens (suspect, flapping,
    /// degraded, releases), each device's events carry versions 1, 2, 3...
    #[test]
    fn versions_go_up_by_exactly_one_per_emitted_event(
        ops in proptest::collection::vec((0..60usize, 0..4u8, 0..1500u64), 1..400),
        suspect_events in any::<bool>(),
        forget_after in proptest::option::of(1000..8000u64),
        max_devices in 20..80usize,
    ) {
        let damping = FlapDamping { changes: 3, window: Duration::from_secs(5) };
        let preservation = Preservation { min_online: 10, max_hold: Duration::from_secs(20), ..Preservation::default() };
        let config = Config {
            suspect_events,
            flap_damping: Some(damping),
            preservation: Some(preservation),
            forget_after: forget_after.map(Duration::from_millis),
            max_devices,
            ..Config::default()
        };
        let mut run = Run::new(config);
        for (device, op, wait) in ops {
            let id = format!("d{device}");
            match op {
                0 | 1 => run.beat(&id),
                2 => run.leave(&id),
                _ => {}
            }
            let next = (run.now - run.t0).as_millis() as u64 + wait;
            run.until(next);
            run.tracker.table().assert_invariants();
        }
        run.until((run.now - run.t0).as_millis() as u64 + 60_000);
        let mut last: HashMap<String, u32> = HashMap::new();
        for event in run.events.iter().filter(|e| !e.kind.is_server()) {
            let previous = last.insert(event.device.to_string(), event.version).unwrap_or(0);
            prop_assert_eq!(event.version, previous + 1, "{:?}", event);
            if matches!(event.kind, EventKind::Forgotten(_)) {
                // Forgotten: it starts again at 1 if it comes back.
                last.insert(event.device.to_string(), 0);
            }
        }
        for (device, version) in &last {
            let held = run.tracker.table().get(device).map(|e| e.version());
            prop_assert_eq!(held, (*version > 0).then_some(*version), "{}", device);
        }
    }
}
