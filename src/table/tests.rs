use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn beat(ttl_ms: u64, seq: u32) -> Beat<'static> {
    Beat {
        addr: addr(1000 + seq as u16),
        boot: 1,
        seq,
        interval: Duration::ZERO,
        ttl: Duration::from_millis(ttl_ms),
        payload: b"p",
        signed: false,
    }
}

/// Expires what is due and returns the ids, checking that they come in
/// deadline order and that none is early.
fn expired(table: &mut PresenceTable, now: Instant) -> Vec<String> {
    let mut out = Vec::new();
    let mut last_due = None;
    table.expire(now, |id, entry| {
        assert!(!entry.is_online());
        assert!(entry.due() <= now, "{id} expired before its deadline");
        assert!(last_due <= Some(entry.due()), "out of deadline order");
        last_due = Some(entry.due());
        out.push(id.to_string());
    });
    out
}

#[test]
fn expires_at_the_deadline_and_not_before() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(usize::MAX, t0);
    assert_eq!(table.beat(t0, "a", beat(100, 1)), Ok(true));
    assert_eq!(table.next_deadline(), Some(t0 + Duration::from_millis(100)));
    assert!(expired(&mut table, t0 + Duration::from_millis(99)).is_empty());
    assert_eq!(expired(&mut table, t0 + Duration::from_millis(100)), ["a"]);
    assert_eq!(table.next_deadline(), None);
    let entry = table.get("a").unwrap();
    assert_eq!((entry.flaps(), entry.heartbeats(), entry.is_online()), (1, 1, false));
    table.assert_invariants();
}

#[test]
fn a_heartbeat_moves_the_deadline_and_keeps_the_device_once() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(usize::MAX, t0);
    assert_eq!(table.beat(t0, "a", beat(100, 1)), Ok(true));
    assert_eq!(table.beat(t0 + Duration::from_millis(50), "a", beat(100, 2)), Ok(false));
    assert!(expired(&mut table, t0 + Duration::from_millis(120)).is_empty());
    assert_eq!(table.online_count(), 1);
    assert_eq!(table.get("a").unwrap().addr(), addr(1002), "address follows the device");
    assert_eq!(expired(&mut table, t0 + Duration::from_millis(150)), ["a"]);
    table.assert_invariants();
}

#[test]
fn a_late_heartbeat_counts_but_moves_nothing_the_newest_set() {
    let t0 = Instant::from_micros(1 << 40);
    let ms = |n| t0 + Duration::from_millis(n);
    let mut table = PresenceTable::new(usize::MAX, t0);
    table.beat(t0, "a", beat(100, 1)).unwrap();
    table.beat(ms(10), "a", Beat { payload: b"new", ..beat(100, 3) }).unwrap();
    // seq 2 arrives after seq 3: accepted once (it is in the window), but it is older news.
    assert_eq!(table.beat(ms(20), "a", Beat { payload: b"old", ..beat(100, 2) }), Ok(false));
    assert_eq!(table.beat(ms(30), "a", beat(100, 2)), Err(Refusal::Replay));
    let entry = table.get("a").unwrap();
    assert_eq!((entry.addr(), entry.payload(), entry.heartbeats()), (addr(1003), &b"new"[..], 3));
    assert_eq!((entry.window().top(), entry.last_seen()), (3, ms(10)), "the newest set last seen");
    assert_eq!(entry.deadline(), Some(ms(110)), "and the deadline: a late heartbeat does not extend it");
    table.assert_invariants();
}

#[test]
fn withheld_heartbeats_released_after_death_keep_nobody_alive() {
    // An on-path attacker holds back every odd heartbeat of a device that
    // then dies, and releases them one by one afterwards.
    let t0 = Instant::from_micros(1 << 40);
    let ms = |n| t0 + Duration::from_millis(n);
    let mut table = PresenceTable::new(usize::MAX, t0);
    for seq in (2..=40).step_by(2) {
        table.beat(ms(u64::from(seq) * 10), "a", beat(100, seq)).unwrap();
    }
    // The last heartbeat (seq 40) came at 400 ms: due at 500 ms.
    assert_eq!(table.get("a").unwrap().deadline(), Some(ms(500)));
    for (i, seq) in (1..40).step_by(2).enumerate() {
        let at = ms(420 + 20 * i as u64);
        expired(&mut table, at);
        assert_eq!(table.beat(at, "a", beat(100, seq)), Ok(false), "accepted once, but late");
        assert_eq!(
            table.get("a").unwrap().deadline().filter(|_| at < ms(500)),
            (at < ms(500)).then(|| ms(500))
        );
    }
    assert_eq!(expired(&mut table, ms(500)), Vec::<String>::new(), "went offline at 500 ms already");
    assert!(!table.get("a").unwrap().is_online(), "released heartbeats did not bring it back");
    table.assert_invariants();
}

#[test]
fn once_a_device_signs_unsigned_frames_for_it_are_refused() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(usize::MAX, t0);
    let signed = |seq| Beat { signed: true, ..beat(100, seq) };
    assert_eq!(table.beat(t0, "a", signed(1)), Ok(true));
    assert!(table.get("a").unwrap().is_signed());
    // An unsigned frame with the largest boot: refused, and it changes nothing.
    let forged = Beat { boot: u32::MAX, ..beat(100, 9) };
    assert_eq!(table.beat(t0, "a", forged), Err(Refusal::Unsigned));
    assert!(matches!(table.leave("a", u32::MAX, 9, false), Err(Refusal::Unsigned)));
    assert!(table.get("a").unwrap().is_online());
    assert_eq!(table.beat(t0, "a", signed(2)), Ok(false), "the device's own next heartbeat is fine");
    table.assert_invariants();
}

#[test]
fn the_first_signed_frame_resets_a_window_that_unsigned_frames_set() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(usize::MAX, t0);
    // Before the device ever signed, someone sent an unsigned heartbeat with boot 2^32 - 1.
    assert_eq!(table.beat(t0, "a", Beat { boot: u32::MAX, ..beat(100, 1) }), Ok(true));
    // The device's genuine signed heartbeats, with its real (smaller) boot, are accepted.
    assert_eq!(table.beat(t0, "a", Beat { signed: true, boot: 5, ..beat(100, 1) }), Ok(false));
    assert_eq!(table.get("a").unwrap().window().boot(), 5);
    assert_eq!(table.beat(t0, "a", Beat { signed: true, boot: 5, ..beat(100, 2) }), Ok(false));
    assert_eq!(table.beat(t0, "a", Beat { signed: true, boot: 5, ..beat(100, 2) }), Err(Refusal::Replay));
    table.assert_invariants();
}

#[test]
fn heartbeats_file_lazily_and_the_sweep_refiles() {
    let t0 = Instant::from_micros(1 << 40);
    let ms = |n| t0 + Duration::from_millis(n);
    let mut table = PresenceTable::new(usize::MAX, t0);
    table.beat(t0, "a", beat(100, 1)).unwrap();
    table.beat(ms(60), "a", beat(100, 2)).unwrap(); // real deadline 160, still filed at 100
    assert_eq!(table.next_deadline(), Some(ms(100)));
    assert!(expired(&mut table, ms(100)).is_empty(), "a stale entry is re-filed, not expired");
    assert_eq!(table.next_deadline(), Some(ms(160)));
    // A shorter TTL moves the deadline earlier: that is filed at once.
    table.beat(ms(70), "a", beat(20, 3)).unwrap();
    assert_eq!(table.next_deadline(), Some(ms(90)));
    assert_eq!(expired(&mut table, ms(90)), ["a"]);
    table.assert_invariants();
}

#[test]
fn leave_takes_a_device_offline_once() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(usize::MAX, t0);
    table.beat(t0, "a", beat(100, 1)).unwrap();
    assert!(table.leave("a", 1, 2, false).unwrap().is_some());
    assert!(matches!(table.leave("a", 1, 2, false), Err(Refusal::Replay)), "the same leave again");
    assert!(table.leave("a", 1, 3, false).unwrap().is_none(), "already offline");
    assert!(table.leave("unknown", 1, 1, false).unwrap().is_none());
    assert_eq!(table.next_deadline(), None);
    assert_eq!(table.get("a").unwrap().flaps(), 1);
    assert_eq!(table.beat(t0, "a", beat(100, 4)), Ok(true), "a return is an online transition");
    table.assert_invariants();
}

#[test]
fn replay_window_accepts_each_pair_once() {
    let mut w = ReplayWindow::new(5, 100);
    assert!(!w.is_new(5, 100), "the same pair");
    assert!(!w.is_new(4, 1000), "an older boot");
    assert!(w.is_new(5, 99), "reordered within the window");
    w.accept(5, 99);
    assert!(!w.is_new(5, 99), "accepted once only");
    assert!(w.is_new(5, 100 - 63) && !w.is_new(5, 100 - 64), "the window is 64 wide");
    w.accept(5, 200);
    assert!(!w.is_new(5, 136) && w.is_new(5, 137) && w.is_new(5, 199) && !w.is_new(5, 200));
    assert!(w.is_new(6, 0), "a new boot starts over");
    w.accept(6, 0);
    assert!(!w.is_new(5, 201) && w.is_new(6, 1));
}

#[test]
fn a_full_table_forgets_the_longest_silent_offline_device() {
    let t0 = Instant::from_micros(1 << 40);
    let mut table = PresenceTable::new(2, t0);
    table.beat(t0, "a", beat(100, 1)).unwrap();
    table.beat(t0 + Duration::from_millis(10), "b", beat(100, 1)).unwrap();
    assert_eq!(table.beat(t0, "c", beat(100, 1)), Err(Refusal::OverCapacity), "both online");
    assert!(table.beat(t0, "a", beat(100, 2)).is_ok(), "known devices keep working");
    expired(&mut table, t0 + Duration::from_millis(200));
    assert_eq!(table.beat(t0 + Duration::from_millis(200), "c", beat(100, 1)), Ok(true));
    assert!(table.get("a").is_none(), "a was silent longest");
    assert!(table.get("b").is_some());
    table.assert_invariants();
}

/// The naive model: a map scanned in full on every step.
#[derive(Debug)]
struct ModelDevice {
    deadline: Option<Instant>,
    last_seen: Instant,
    heartbeats: u64,
    flaps: u32,
    boot: u32,
    top: u32,
    /// Every seq seen in `boot`.
    seen: std::collections::BTreeSet<u32>,
    /// Whether it has sent a signed frame.
    signed: bool,
}

impl ModelDevice {
    fn is_new(&self, boot: u32, seq: u32) -> bool {
        boot > self.boot
            || (boot == self.boot
                && (seq > self.top || (self.top - seq < REPLAY_WINDOW && !self.seen.contains(&seq))))
    }

    /// Checks a frame as the table must; `Ok(true)` if it starts a fresh window.
    fn check(&self, signed: bool, boot: u32, seq: u32) -> Result<bool, Refusal> {
        match (self.signed, signed) {
            (true, false) => Err(Refusal::Unsigned),
            (false, true) => Ok(true),
            _ if self.is_new(boot, seq) => Ok(false),
            _ => Err(Refusal::Replay),
        }
    }

    fn accept_checked(&mut self, fresh: bool, signed: bool, boot: u32, seq: u32) {
        if fresh {
            self.boot = boot;
            self.top = seq;
            self.seen.clear();
        }
        self.signed |= signed;
        self.accept(boot, seq);
    }

    fn accept(&mut self, boot: u32, seq: u32) {
        if boot > self.boot {
            self.boot = boot;
            self.top = seq;
            self.seen.clear();
        }
        self.top = self.top.max(seq);
        self.seen.insert(seq);
    }
}

#[derive(Debug, Default)]
struct Model {
    devices: BTreeMap<String, ModelDevice>,
    max: usize,
}

impl Model {
    fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut due: Vec<(Instant, String)> = self
            .devices
            .iter()
            .filter_map(|(id, d)| d.deadline.filter(|t| *t <= now).map(|t| (t, id.clone())))
            .collect();
        due.sort();
        for (_, id) in &due {
            let device = self.devices.get_mut(id).unwrap();
            device.deadline = None;
            device.flaps += 1;
        }
        due.into_iter().map(|(_, id)| id).collect()
    }

    fn beat(
        &mut self,
        now: Instant,
        id: &str,
        (boot, seq, signed): (u32, u32, bool),
        ttl: Duration,
    ) -> Result<bool, Refusal> {
        let mut fresh = false;
        if let Some(d) = self.devices.get_mut(id) {
            fresh = d.check(signed, boot, seq)?;
            if !fresh && boot == d.boot && seq < d.top {
                // Late: only its window bit and the count.
                d.accept(boot, seq);
                d.heartbeats += 1;
                return Ok(false);
            }
        } else if self.devices.len() >= self.max {
            let oldest = self
                .devices
                .iter()
                .filter(|(_, d)| d.deadline.is_none())
                .map(|(id, d)| (d.last_seen, id.clone()))
                .min()
                .ok_or(Refusal::OverCapacity)?;
            self.devices.remove(&oldest.1);
        }
        let d = self.devices.entry(id.to_string()).or_insert_with(|| ModelDevice {
            deadline: None,
            last_seen: now,
            heartbeats: 0,
            flaps: 0,
            boot,
            top: seq,
            seen: Default::default(),
            signed,
        });
        let came_online = d.deadline.is_none();
        d.accept_checked(fresh, signed, boot, seq);
        d.deadline = Some(now + ttl);
        d.last_seen = now;
        d.heartbeats += 1;
        Ok(came_online)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Beat { device: u8, ttl_ms: u64, boot: u32, seq: u32, signed: bool },
    Leave { device: u8, boot: u32, seq: u32, signed: bool },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 1u64..200, 0u32..3, 0u32..150, prop::bool::weighted(0.1))
            .prop_map(|(device, ttl_ms, boot, seq, signed)| Op::Beat { device, ttl_ms, boot, seq, signed }),
        1 => (0u8..12, 0u32..3, 0u32..150, prop::bool::weighted(0.1))
            .prop_map(|(device, boot, seq, signed)| Op::Leave { device, boot, seq, signed }),
        3 => (0u64..120).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_a_naive_model(max in 1usize..14, ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::from_micros(1 << 40);
        let mut now = t0;
        let mut table = PresenceTable::new(max, t0);
        let mut model = Model { max, ..Model::default() };
        for op in ops {
            // Every step moves time on by at least 1 µs, so no two heartbeats
            // share a time and ties never decide which device is forgotten.
            now += Duration::from_micros(1);
            if let Op::Advance { ms } = op {
                now += Duration::from_millis(ms);
            }
            // Every step sweeps first, as the engine does. Devices due at the
            // same instant may come in any order.
            let mut got = expired(&mut table, now);
            got.sort();
            let mut expected = model.expire(now);
            expected.sort();
            prop_assert_eq!(got, expected);
            let id = |d: u8| format!("dev-{d:02}");
            match op {
                Op::Beat { device, ttl_ms, boot, seq, signed } => {
                    let ttl = Duration::from_millis(ttl_ms);
                    let got = table.beat(now, id(device), Beat { ttl, boot, seq, signed, ..beat(ttl_ms, seq) });
                    prop_assert_eq!(got, model.beat(now, &id(device), (boot, seq, signed), ttl));
                }
                Op::Leave { device, boot, seq, signed } => {
                    let got = table.leave(&id(device), boot, seq, signed).map(|e| e.is_some());
                    let expected = match model.devices.get_mut(&id(device)) {
                        None => Ok(false),
                        Some(d) => match d.check(signed, boot, seq) {
                            Err(refusal) => Err(refusal),
                            Ok(fresh) => {
                            d.accept_checked(fresh, signed, boot, seq);
                            let was_online = d.deadline.take().is_some();
                            if was_online {
                                d.flaps += 1;
                            }
                            Ok(was_online)
                            }
                        },
                    };
                    prop_assert_eq!(got, expected);
                }
                Op::Advance { .. } => {}
            }
            table.assert_invariants();
            // The sweep is due no later than the earliest real deadline (entries are filed lazily).
            let earliest = model.devices.values().filter_map(|d| d.deadline).min();
            if let Some(earliest) = earliest {
                prop_assert!(table.next_deadline().is_some_and(|next| next <= earliest));
            }
            prop_assert_eq!(table.known_count(), model.devices.len());
            for (id, d) in &model.devices {
                let entry = table.get(id).unwrap();
                prop_assert_eq!(
                    (entry.deadline(), entry.heartbeats(), entry.flaps(), entry.window().boot(), entry.window().top()),
                    (d.deadline, d.heartbeats, d.flaps, d.boot, d.top)
                );
            }
            let online: Vec<String> = model.devices.iter().filter(|(_, d)| d.deadline.is_some()).map(|(id, _)| id.clone()).collect();
            let listed: Vec<(usize, String)> = table.online_from(0).map(|(slot, id, _)| (slot, id.to_string())).collect();
            let mut ids: Vec<String> = listed.iter().map(|(_, id)| id.clone()).collect();
            ids.sort();
            prop_assert_eq!(&ids, &online);
            // Paging: the rest after any listed slot is exactly the tail of the list.
            if let Some((slot, _)) = listed.get(listed.len() / 2) {
                let rest: Vec<(usize, String)> = table.online_from(slot + 1).map(|(s, id, _)| (s, id.to_string())).collect();
                prop_assert_eq!(&rest[..], &listed[listed.len() / 2 + 1..]);
            }
        }
    }
}

#[test]
fn a_device_record_stays_small() {
    // The memory target (≤ 128 bytes per device at 1 M devices) rests on this.
    assert!(std::mem::size_of::<Slot>() <= 88, "Slot is {} bytes", std::mem::size_of::<Slot>());
}

/// The memory budget (about 121 bytes a device at 1 M, target 128) rests on
/// the slot staying 88 bytes; the flags byte took the second bool's place.
#[test]
fn a_slot_is_88_bytes() {
    assert_eq!(std::mem::size_of::<Slot>(), 88);
}

#[test]
fn a_late_device_is_suspect_then_held_or_offline_and_a_heartbeat_brings_it_back() {
    let t0 = Instant::from_micros(1 << 40);
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut table = PresenceTable::new(usize::MAX, t0);
    table.set_suspect_after(1);
    // Interval 100 ms, TTL 300 ms: late at 200 ms, due at 300 ms.
    let every = |seq| Beat { interval: Duration::from_millis(100), ..beat(300, seq) };
    for (id, seq) in [("a", 1), ("b", 1), ("c", 1)] {
        assert_eq!(table.arrive(t0, id, every(seq)), Ok(Arrival::Online));
    }
    let sweep = |table: &mut PresenceTable, at, verdict: Verdict| {
        let got = std::cell::RefCell::new(Vec::new());
        table.sweep(
            at,
            |id, entry, lateness| {
                assert!(entry.is_online());
                got.borrow_mut().push(format!("{id} {lateness:?}"));
                verdict
            },
            |id, entry| {
                assert!(!entry.is_online());
                got.borrow_mut().push(format!("{id} offline"));
            },
        );
        table.assert_invariants();
        got.into_inner()
    };
    assert!(sweep(&mut table, ms(199), Verdict::Offline).is_empty());
    assert_eq!(sweep(&mut table, ms(200), Verdict::Offline), ["a Suspect", "b Suspect", "c Suspect"]);
    assert_eq!((table.online_count(), table.late_count()), (3, 3));
    assert!(table.get("a").unwrap().is_suspect());
    // "a" beats again: on time, no longer late.
    assert_eq!(table.arrive(ms(250), "a", every(2)), Ok(Arrival::Back { held: false }));
    assert_eq!(table.late_count(), 2);
    // "b" is held at its deadline, "c" too; nothing goes offline.
    assert_eq!(sweep(&mut table, ms(300), Verdict::Hold), ["b Expired", "c Expired"]);
    assert_eq!((table.online_count(), table.late_count(), table.held_count()), (3, 2, 2));
    assert_eq!(table.next_deadline(), Some(ms(450)), "held devices are not filed: a is next");
    assert!(table.get("b").unwrap().is_held());
    // "b" comes back; "c" is released and goes offline.
    assert_eq!(table.arrive(ms(400), "b", every(2)), Ok(Arrival::Back { held: true }));
    let mut released = Vec::new();
    table.release_held(|id, entry| released.push((id.to_string(), entry.is_online(), entry.version())));
    table.assert_invariants();
    assert_eq!(released, [("c".to_string(), false, 2)]);
    assert_eq!((table.online_count(), table.late_count(), table.held_count()), (2, 0, 0));
    // Without suspicion, nothing is ever late.
    table.set_suspect_after(0);
    table.arrive(ms(500), "a", every(3)).unwrap();
    assert_eq!(sweep(&mut table, ms(799), Verdict::Offline), ["b Expired", "b offline"]);
    assert_eq!(sweep(&mut table, ms(800), Verdict::Offline), ["a Expired", "a offline"]);
}
