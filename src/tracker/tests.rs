//! Engine tests in simulated time: `now` is a base instant plus offsets.

use super::test_prelude::*;
use super::*;
use crate::wire::{Addr, Heartbeat, MAX_DATAGRAM};

const OPERATOR_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)), 9000);
const DEVICE_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)), 4000);

/// The simulator's wall time at its start, in Unix milliseconds.
pub(super) const WALL0_MS: u64 = 1_800_000_000_000;

/// An engine driven in simulated time (also used by the security tests).
pub(super) struct Sim {
    pub(super) tracker: Tracker,
    pub(super) t0: Instant,
    pub(super) now: Instant,
    pub(super) reply: Vec<u8>,
}

impl Sim {
    pub(super) fn new(config: Config) -> Self {
        let t0 = Instant::from_micros(1 << 40);
        Sim {
            tracker: Tracker::new(config, t0, UNIX_EPOCH + Duration::from_millis(WALL0_MS)).unwrap(),
            t0,
            now: t0,
            reply: vec![0; MAX_DATAGRAM],
        }
    }

    pub(super) fn at(&mut self, ms: u64) {
        self.now = self.t0 + Duration::from_millis(ms);
    }

    pub(super) fn send_bytes(&mut self, bytes: &[u8]) -> Handled {
        self.tracker.handle(self.now, DEVICE_ADDR, bytes, &mut self.reply)
    }

    pub(super) fn send(&mut self, message: Message<'_>) -> Handled {
        let mut buf = [0u8; MAX_DATAGRAM];
        let len = wire::encode(&message, &mut buf).unwrap();
        self.send_bytes(&buf[..len])
    }

    fn beat(&mut self, device: &str, seq: u32, interval_ms: u32, flags: u8) -> Handled {
        self.send(Message::Heartbeat(Heartbeat {
            device,
            boot: 1,
            seq,
            interval_ms,
            flags,
            payload: b"bat=97",
            tag: None,
        }))
    }

    fn reply(&self, handled: Handled) -> Message<'_> {
        match handled {
            Handled::Reply(len) => wire::decode(&self.reply[..len]).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// A query as the CLI sends it: padded, from loopback (allowed by default).
    fn query(&mut self, request: u32, kind: QueryKind<'_>) -> Handled {
        let mut buf = [0u8; MAX_DATAGRAM];
        let len = crate::client::encode_query(request, kind, None, &mut buf).unwrap();
        self.tracker.handle(self.now, OPERATOR_ADDR, &buf[..len], &mut self.reply)
    }

    fn events(&mut self) -> Vec<(String, EventKind)> {
        std::iter::from_fn(|| self.tracker.poll_event()).map(|e| (e.device.to_string(), e.kind)).collect()
    }

    fn timeout(&mut self) -> Vec<(String, EventKind)> {
        self.tracker.handle_timeout(self.now);
        self.events()
    }
}

/// The defaults, but with no practical query rate limit.
fn unlimited_queries() -> Config {
    Config { query_rate: 1_000_000, query_burst: 1_000_000, ..Config::default() }
}

fn online(d: &str) -> (String, EventKind) {
    (d.to_string(), EventKind::Online)
}

fn offline(d: &str, reason: OfflineReason) -> (String, EventKind) {
    (d.to_string(), EventKind::Offline(reason))
}

#[test]
fn ttl_is_misses_times_the_declared_interval_clamped() {
    let config = Config {
        timeout: Duration::from_secs(45),
        misses: 3,
        min_ttl: Duration::from_secs(2),
        max_ttl: Duration::from_secs(600),
        ..Config::default()
    };
    let mut sim = Sim::new(config);
    let cases = [
        (10_000, 10_000, 30_000),        // 3 × 10 s
        (100, 100, 2_000),               // 3 × 0.1 s, raised to min_ttl
        (3_600_000, 3_600_000, 600_000), // 3 h, cut to max_ttl
        (0, 15_000, 45_000),             // no interval: timeout, and timeout / misses expected
    ];
    for (seq, (declared, expected_interval, ttl)) in (1..).zip(cases) {
        let handled = sim.beat("d", seq, declared, wire::FLAG_ACK);
        assert_eq!(
            sim.reply(handled),
            Message::Ack(Ack { boot: 1, seq, interval_ms: expected_interval, ttl_ms: ttl }),
            "declared {declared} ms"
        );
        let deadline = sim.now + Duration::from_millis(ttl.into());
        assert_eq!(sim.tracker.table().get("d").unwrap().deadline(), Some(deadline));
        assert!(sim.tracker.poll_timeout() <= Some(deadline));
    }
}

#[test]
fn no_ack_unless_asked() {
    let mut sim = Sim::new(Config::default());
    assert_eq!(sim.beat("d", 1, 1000, 0), Handled::Done);
}

#[test]
fn offline_exactly_at_the_deadline_not_before() {
    // Interval 1 s × 3 misses = 3 s. No suspect stage: the sweep is filed at
    // deadlines only (see `a_late_device_is_suspect_before_its_deadline`).
    let mut sim = Sim::new(Config { suspect_after: 0, ..Config::default() });
    sim.beat("d", 1, 1000, 0);
    assert_eq!(sim.events(), [online("d")]);
    sim.at(2000);
    sim.beat("d", 2, 1000, 0); // deadline moves to 5000 ms
    assert_eq!(sim.events(), []);
    let deadline = sim.t0 + Duration::from_millis(5000);
    // The sweep is still filed at the first deadline (3000 ms); there it
    // finds the device alive and re-files it at 5000 ms.
    assert_eq!(sim.tracker.poll_timeout(), Some(sim.t0 + Duration::from_millis(3000)));
    sim.at(3000);
    assert_eq!(sim.timeout(), []);
    assert_eq!(sim.tracker.poll_timeout(), Some(deadline));
    sim.now = deadline - Duration::from_micros(1); // the engine counts whole microseconds
    assert_eq!(sim.timeout(), []);
    assert!(sim.tracker.table().get("d").unwrap().is_online());
    sim.now = deadline;
    sim.tracker.handle_timeout(sim.now);
    let event = sim.tracker.poll_event().unwrap();
    assert_eq!(event.kind, EventKind::Offline(OfflineReason::Expired));
    assert_eq!((event.at, event.deadline, event.addr), (deadline, Some(deadline), DEVICE_ADDR));
    assert_eq!(sim.tracker.table().next_deadline(), None);
    assert_eq!(sim.tracker.counters().expirations(), 1);
}

#[test]
fn leave_takes_the_device_offline_at_once() {
    let mut sim = Sim::new(Config::default());
    sim.beat("d", 1, 1000, 0);
    sim.at(10);
    sim.send(Message::Leave(Leave { device: "d", boot: 1, seq: 2, tag: None }));
    assert_eq!(sim.events(), [online("d"), offline("d", OfflineReason::Left)]);
    assert_eq!(sim.tracker.table().next_deadline(), None);
    sim.at(100_000);
    assert_eq!(sim.timeout(), [], "a device that left does not expire again");
    assert_eq!(sim.tracker.counters().leaves(), 1);
}

#[test]
fn back_online_after_expiry_counts_a_flap() {
    let mut sim = Sim::new(Config::default());
    sim.beat("d", 1, 1000, 0);
    sim.at(3000);
    assert_eq!(sim.timeout(), [online("d"), offline("d", OfflineReason::Expired)]);
    sim.at(4000);
    sim.beat("d", 2, 1000, 0);
    assert_eq!(sim.events(), [online("d")]);
    // A heartbeat that arrives after the deadline, before any sweep ran,
    // is still seen as offline-then-online.
    sim.at(9000);
    sim.beat("d", 3, 1000, 0);
    assert_eq!(sim.events(), [offline("d", OfflineReason::Expired), online("d")]);
    let handled = sim.query(7, QueryKind::Device("d"));
    let Message::Status(Status { request: 7, body: StatusBody::Device(info) }) = sim.reply(handled) else {
        panic!("expected a device status");
    };
    // The flap score: state changes within the flap window (the first online is not one).
    assert_eq!((info.numbers.flaps, info.numbers.heartbeats, info.numbers.seq, info.online), (4, 3, 3, true));
    assert_eq!(info.numbers.expires_in_ms, 3000);
    assert_eq!(info.addr, Addr::from(DEVICE_ADDR));
    assert_eq!(info.payload, b"bat=97");
    assert_eq!(info.numbers.last_seen_unix_ms, 1_800_000_009_000);
}

#[test]
fn unknown_and_offline_devices_are_told_apart() {
    let mut sim = Sim::new(Config::default());
    let handled = sim.query(1, QueryKind::Device("nobody"));
    assert!(matches!(
        sim.reply(handled),
        Message::Status(Status { request: 1, body: StatusBody::UnknownDevice })
    ));
    sim.beat("d", 1, 1000, 0);
    sim.at(5000);
    let handled = sim.query(2, QueryKind::Device("d"));
    let Message::Status(Status { body: StatusBody::Device(info), .. }) = sim.reply(handled) else {
        panic!("expected a device status")
    };
    assert!(!info.online);
    assert_eq!((info.numbers.expires_in_ms, info.numbers.last_seen_ago_ms), (0, 5000));
}

#[test]
fn summary_counts_everything() {
    let mut sim = Sim::new(Config::default());
    sim.beat("a", 1, 1000, 0);
    sim.beat("b", 1, 5000, 0);
    sim.send_bytes(b"garbage");
    sim.send_bytes(&[]);
    sim.at(3500);
    let handled = sim.query(9, QueryKind::Summary);
    let Message::Status(Status { body: StatusBody::Summary(summary), .. }) = sim.reply(handled) else {
        panic!("expected a summary")
    };
    assert_eq!(
        (
            summary.counts.online,
            summary.counts.known,
            summary.counts.uptime_ms,
            summary.counts.heartbeats,
            summary.counts.expirations,
            summary.counts.queries
        ),
        (1, 2, 3500, 2, 1, 1)
    );
    let counters: Vec<Counter> = summary.counters.iter().map(Result::unwrap).collect();
    assert_eq!(
        counters,
        [
            Counter { code: DropReason::Truncated.code(), count: 1 },
            Counter { code: DropReason::UnsupportedVersion.code(), count: 1 },
        ]
    );
}

#[test]
fn bad_datagrams_change_nothing_but_the_drop_counters() {
    let mut sim = Sim::new(Config::default());
    sim.beat("d", 1, 1000, 0);
    sim.events();
    let before = format!("{:?}", sim.tracker.table().get("d"));
    let mut good = [0u8; 64];
    let len = wire::encode(
        &Message::Heartbeat(Heartbeat {
            flags: wire::FLAG_ACK,
            payload: b"x",
            ..Heartbeat::new("d", 1, 2, 50_000)
        }),
        &mut good,
    )
    .unwrap();
    let good = &good[..len];
    let mut trailing = good.to_vec();
    trailing.push(0);
    let mut version = good.to_vec();
    version[0] = 9;
    let mut kind = good.to_vec();
    kind[1] = 0x7f;
    let ack = {
        let mut buf = [0u8; 32];
        let n = wire::encode(&Message::Ack(Ack { boot: 1, seq: 1, interval_ms: 1, ttl_ms: 1 }), &mut buf)
            .unwrap();
        buf[..n].to_vec()
    };
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (good[..len - 2].to_vec(), DropReason::Truncated),
        (trailing, DropReason::TrailingBytes),
        (vec![1; MAX_DATAGRAM + 1], DropReason::Oversized),
        (version, DropReason::UnsupportedVersion),
        (kind, DropReason::UnknownKind),
        (vec![1, 0, 0, 1, 1, 0, 0, 0, 0], DropReason::BadDeviceId),
        (vec![1, 0, 2, 0xc3, 0x28, 1, 1, 0, 0, 0], DropReason::Malformed),
        (ack, DropReason::UnexpectedKind),
    ];
    for (bytes, reason) in &cases {
        let handled = sim.send_bytes(bytes);
        match handled {
            Handled::Dropped { reason: got, reply } => {
                assert_eq!(got, *reason, "{bytes:02x?}");
                if let Some(n) = reply {
                    assert_eq!(*reason, DropReason::UnsupportedVersion);
                    assert!(n <= bytes.len(), "a reply never exceeds its request");
                    assert!(matches!(wire::decode(&sim.reply[..n]), Ok(Message::Error(_))));
                }
            }
            other => panic!("{bytes:02x?} was not dropped: {other:?}"),
        }
        assert_eq!(sim.tracker.counters().drops(*reason), 1);
    }
    // Only a plausible newer frame gets an Error reply; garbage gets nothing.
    assert!(matches!(
        sim.send_bytes(&[2, 0, 1, b'd', 0, 0, 0, 0, 0]),
        Handled::Dropped { reply: Some(4), .. }
    ));
    for garbage in
        [&b"garbage"[..], &[2, 0, 1], &[0, 0, 1, b'd', 0, 0, 0, 0, 0], &[2, 1, 1, b'd', 0, 0, 0, 0]]
    {
        assert!(matches!(sim.send_bytes(garbage), Handled::Dropped { reply: None, .. }), "{garbage:02x?}");
    }
    let cases_len = cases.len() + 5;
    assert_eq!(sim.tracker.counters().total_drops(), cases_len as u64);
    assert_eq!(sim.tracker.counters().heartbeats(), 1);
    assert_eq!(format!("{:?}", sim.tracker.table().get("d")), before);
    assert_eq!(sim.events(), []);
}

/// Walks the whole online list page by page, calling `between` before each
/// page after the first. Returns the ids in the order they were listed.
fn walk_list(sim: &mut Sim, limit: u16, mut between: impl FnMut(&mut Sim, usize, &[String])) -> Vec<String> {
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for page_no in 0.. {
        if cursor.is_some() {
            between(sim, page_no, &listed);
        }
        let handled = sim.query(
            page_no as u32,
            QueryKind::List { after: cursor.as_deref(), limit, filter: crate::wire::ListFilter::ONLINE },
        );
        let Handled::Reply(len) = handled else { panic!("no reply") };
        assert!(len <= MAX_DATAGRAM);
        let Message::Status(Status { body: StatusBody::Page(page), .. }) = sim.reply(handled) else {
            panic!("expected a page")
        };
        let ids: Vec<String> = page.entries.iter().map(|e| e.unwrap().device.to_string()).collect();
        if limit > 0 {
            assert!(ids.len() <= usize::from(limit));
        }
        listed.extend(ids);
        match page.next_cursor {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(page_no < 1000, "paging does not end");
    }
    listed
}

#[test]
fn paging_lists_every_device_once() {
    let mut sim = Sim::new(unlimited_queries());
    let ids: Vec<String> = (0..200).map(|i| format!("device-with-a-long-name-{i:04}")).collect();
    for id in &ids {
        sim.send(Message::Heartbeat(Heartbeat {
            payload: &[7; wire::MAX_PAYLOAD_LEN],
            ..Heartbeat::new(id, 1, 1, 1000)
        }));
    }
    assert_eq!(walk_list(&mut sim, 0, |_, _, _| {}), ids, "as many as fit per page");
    assert_eq!(walk_list(&mut sim, 7, |_, _, _| {}), ids, "seven per page");
}

#[test]
fn paging_through_a_list_that_changes_between_pages() {
    let mut sim = Sim::new(unlimited_queries());
    let id = |i: u32| format!("dev-{i:03}");
    let originals: Vec<String> = (0..60).map(id).collect();
    for device in &originals {
        sim.beat(device, 1, 1000, 0);
    }
    let mut left: Vec<String> = Vec::new();
    let mut joined: Vec<String> = Vec::new();
    let listed = walk_list(&mut sim, 10, |sim, page_no, listed_so_far| {
        // Between pages: one device already listed and one not yet listed
        // leave, and a new device joins.
        let seq = 10 * page_no as u32 + 5;
        let listed_victim = listed_so_far.iter().find(|d| !left.contains(d)).cloned();
        let unlisted_victim =
            originals.iter().rev().find(|d| !left.contains(d) && !listed_so_far.contains(d)).cloned();
        for victim in [listed_victim, unlisted_victim].into_iter().flatten() {
            sim.send(Message::Leave(Leave { device: &victim, boot: 1, seq, tag: None }));
            left.push(victim);
        }
        let newcomer = format!("new-{page_no:03}");
        sim.beat(&newcomer, 1, 1000, 0);
        joined.push(newcomer);
        sim.at(page_no as u64); // time moves, nothing expires
    });
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), listed.len(), "no device listed twice: {listed:?}");
    for device in originals.iter().chain(&joined) {
        if !left.contains(device) {
            assert!(listed.contains(device), "{device} stayed online but was skipped");
        }
    }
    assert!(left.len() >= 8, "the list really changed");
}

/// Issue 11, part 1: every transition carries the device's version, +1 per
/// transition, and the (boot, seq) it rests on; an expiry its deadline.
#[test]
fn events_carry_versions_that_rise_by_one_per_device() {
    let mut sim = Sim::new(Config::default()); // interval 1 s: TTL 3 s
    let mut versions = Vec::new();
    let mut seen = |sim: &mut Sim| {
        while let Some(event) = sim.tracker.poll_event() {
            versions.push((
                event.device.to_string(),
                event.version,
                event.kind,
                event.boot,
                event.heartbeat_seq,
            ));
            if let EventKind::Offline(OfflineReason::Expired) = event.kind {
                assert!(event.deadline.is_some_and(|deadline| deadline <= event.at));
            }
        }
    };
    sim.beat("a", 1, 1000, 0); // online, v1
    sim.beat("b", 1, 1000, 0); // online, v1
    seen(&mut sim);
    sim.at(3000);
    sim.tracker.handle_timeout(sim.now); // both expire, v2
    seen(&mut sim);
    sim.at(4000);
    sim.beat("a", 2, 1000, 0); // back online, v3
    sim.send(Message::Leave(Leave { device: "a", boot: 1, seq: 3, tag: None })); // left, v4
    seen(&mut sim);
    let of =
        |id: &str| versions.iter().filter(|v| v.0 == id).map(|v| (v.1, v.2, v.3, v.4)).collect::<Vec<_>>();
    assert_eq!(
        of("a"),
        [
            (1, EventKind::Online, 1, 1),
            (2, EventKind::Offline(OfflineReason::Expired), 1, 1),
            (3, EventKind::Online, 1, 2),
            (4, EventKind::Offline(OfflineReason::Left), 1, 3),
        ]
    );
    assert_eq!(of("b").iter().map(|v| v.0).collect::<Vec<_>>(), [1, 2]);
    let entry = sim.tracker.table().get("a").unwrap();
    assert_eq!((entry.version(), entry.flaps()), (4, 2));
}

mod batch {
    use super::*;
    use proptest::prelude::*;

    /// One datagram of a batch: a heartbeat (maybe acked, maybe with an
    /// old seq), a leave, a malformed frame or a status query.
    fn datagram() -> impl Strategy<Value = (Vec<u8>, u8)> {
        (0..6u8, 0..12usize, 0..6u32, any::<u8>(), 0..4u8).prop_map(|(kind, device, seq, noise, port)| {
            let id = format!("dev-{device}");
            let mut buf = [0u8; MAX_DATAGRAM];
            let message = match kind {
                0..=2 => Message::Heartbeat(Heartbeat {
                    device: &id,
                    boot: 1,
                    seq,
                    interval_ms: 1000 * (1 + u32::from(noise % 3)),
                    flags: if kind == 1 { wire::FLAG_ACK } else { 0 },
                    payload: if kind == 2 { b"p" } else { b"" },
                    tag: None,
                }),
                3 => Message::Leave(wire::Leave { device: &id, boot: 1, seq, tag: None }),
                4 => {
                    let kind = wire::QueryKind::Device(&id);
                    let len = crate::client::encode_query(u32::from(noise), kind, None, &mut buf).unwrap();
                    return (buf[..len].to_vec(), port);
                }
                _ => return (vec![1, noise, 3], port),
            };
            let len = wire::encode(&message, &mut buf).unwrap();
            (buf[..len].to_vec(), port)
        })
    }

    proptest! {
        /// `handle_batch` does exactly what `handle` does datagram by
        /// datagram: the same results and replies, events and counts.
        #[test]
        fn a_batch_is_handled_as_its_datagrams_one_by_one(
            rounds in proptest::collection::vec((proptest::collection::vec(datagram(), 0..150), 0..3000u64), 1..6),
        ) {
            let mut one = Sim::new(Config::default());
            let mut many = Sim::new(Config::default());
            let mut at = 0;
            for (datagrams, later) in rounds {
                at += later;
                one.at(at);
                many.at(at);
                let with_sources: Vec<(&[u8], SocketAddr)> = datagrams
                    .iter()
                    .map(|(d, port)| (&d[..], SocketAddr::from(([10, 0, 0, 7], 4000 + u16::from(*port)))))
                    .collect();
                let mut expected = Vec::new();
                for (datagram, from) in &with_sources {
                    let handled = one.tracker.handle(one.now, *from, datagram, &mut one.reply);
                    let reply = handled.reply_len().map(|n| one.reply[..n].to_vec());
                    expected.push((handled, reply));
                }
                let mut got = Vec::new();
                let now = many.now;
                many.tracker.handle_batch(now, &with_sources, &mut many.reply, |i, handled, reply| {
                    got.push((i, handled, handled.reply_len().map(|n| reply[..n].to_vec())));
                });
                prop_assert_eq!(got.len(), expected.len());
                for ((i, handled, reply), (i_expected, (handled_expected, reply_expected))) in
                    got.into_iter().zip(expected.into_iter().enumerate())
                {
                    prop_assert_eq!(i, i_expected);
                    prop_assert_eq!(handled, handled_expected);
                    prop_assert_eq!(reply, reply_expected);
                }
                let events = |sim: &mut Sim| std::iter::from_fn(|| sim.tracker.poll_event()).collect::<Vec<_>>();
                prop_assert_eq!(events(&mut many), events(&mut one));
                prop_assert_eq!(many.tracker.counters(), one.tracker.counters());
                prop_assert_eq!(many.tracker.poll_timeout(), one.tracker.poll_timeout());
            }
        }
    }
}
