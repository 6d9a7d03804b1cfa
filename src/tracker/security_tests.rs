//! Security tests of the engine, in simulated time: forged, replayed and
//! unauthorised datagrams; amplification; floods; and a bounded fuzz.

use super::test_prelude::*;
use super::tests::Sim;
use super::*;
use crate::auth;
use crate::client::encode_query;
use crate::wire::{Heartbeat, MAX_DATAGRAM};
use proptest::prelude::*;
use std::net::Ipv4Addr;

pub(super) const MASTER: Key = [7; 32];
pub(super) const DEVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 5000);
pub(super) const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6000);
pub(super) const STRANGER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 7000);

pub(super) fn config(auth: AuthMode) -> Config {
    Config { auth, keys: Some(Keys::from_master(&MASTER)), ..Config::default() }
}

/// The simulator of the engine tests, with what these tests add.
impl Sim {
    pub(super) fn send_from(&mut self, from: SocketAddr, datagram: &[u8]) -> Handled {
        self.tracker.handle(self.now, from, datagram, &mut self.reply)
    }

    /// State that no rejected datagram may change.
    pub(super) fn state(&self) -> String {
        let t = self.tracker.table();
        let entries: Vec<String> = ["d", "other"].iter().map(|id| format!("{:?}", t.get(id))).collect();
        format!(
            "{} {} {:?} {} {} {entries:?}",
            t.known_count(),
            t.online_count(),
            t.next_deadline(),
            self.tracker.counters().heartbeats(),
            self.tracker.counters().leaves()
        )
    }

    /// Sends `datagram` and checks it is dropped for `reason` with no other effect.
    pub(super) fn rejected(&mut self, datagram: &[u8], reason: DropReason) {
        let before = self.state();
        let count = self.tracker.counters().drops(reason);
        let handled = self.send_from(DEVICE, datagram);
        assert!(matches!(handled, Handled::Dropped { reason: r, reply: None } if r == reason), "{handled:?}");
        assert_eq!(self.tracker.counters().drops(reason), count + 1);
        assert_eq!(self.state(), before, "a {reason:?} datagram changed the state");
        assert_eq!(self.tracker.poll_event(), None);
    }

    pub(super) fn accepted(&mut self, datagram: &[u8]) {
        let handled = self.send_from(DEVICE, datagram);
        assert!(matches!(handled, Handled::Done | Handled::Reply(_)), "{handled:?}");
        while self.tracker.poll_event().is_some() {}
    }
}

pub(super) fn heartbeat(device: &str, boot: u32, seq: u32) -> Message<'_> {
    Message::Heartbeat(Heartbeat::new(device, boot, seq, 1000))
}

pub(super) fn leave(device: &str, boot: u32, seq: u32) -> Message<'_> {
    Message::Leave(Leave { device, boot, seq, tag: None })
}

pub(super) fn signed(message: &Message<'_>, key: &Key) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = auth::encode_signed(message, key, &mut buf).unwrap();
    buf[..len].to_vec()
}

pub(super) fn unsigned(message: &Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = wire::encode(message, &mut buf).unwrap();
    buf[..len].to_vec()
}

pub(super) fn key_of(device: &str) -> Key {
    auth::device_key(&MASTER, device)
}

#[test]
fn forged_and_wrong_key_tags_are_rejected() {
    let mut sim = Sim::new(config(AuthMode::Required));
    sim.accepted(&signed(&heartbeat("d", 1, 1), &key_of("d")));
    let mut forged = signed(&heartbeat("d", 1, 2), &key_of("d"));
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    sim.rejected(&forged, DropReason::BadTag);
    sim.rejected(&signed(&heartbeat("d", 1, 3), &key_of("other")), DropReason::BadTag);
    sim.rejected(&signed(&heartbeat("d", 1, 3), &[0; 32]), DropReason::BadTag);
    sim.rejected(&unsigned(&heartbeat("d", 1, 3)), DropReason::MissingTag);
    // The genuine next heartbeat is still accepted.
    sim.accepted(&signed(&heartbeat("d", 1, 2), &key_of("d")));
}

#[test]
fn replays_and_old_boots_are_rejected() {
    let mut sim = Sim::new(config(AuthMode::Required));
    let first = signed(&heartbeat("d", 5, 10), &key_of("d"));
    sim.accepted(&first);
    sim.rejected(&first, DropReason::Replay);
    sim.accepted(&signed(&heartbeat("d", 5, 11), &key_of("d")));
    sim.rejected(&first, DropReason::Replay);
    sim.rejected(&signed(&heartbeat("d", 4, 1000), &key_of("d")), DropReason::Replay);
    // A reboot (newer boot epoch) starts a new window; the old boot is dead.
    sim.accepted(&signed(&heartbeat("d", 6, 1), &key_of("d")));
    sim.rejected(&signed(&heartbeat("d", 5, 12), &key_of("d")), DropReason::Replay);
}

#[test]
fn reordering_within_the_window_is_accepted_once() {
    let mut sim = Sim::new(config(AuthMode::Required));
    sim.accepted(&signed(&heartbeat("d", 1, 100), &key_of("d")));
    let late = signed(&heartbeat("d", 1, 90), &key_of("d"));
    sim.accepted(&late);
    assert_eq!(sim.tracker.counters().heartbeats(), 2);
    sim.rejected(&late, DropReason::Replay);
    // 64 or more behind the highest seq seen: outside the window.
    sim.rejected(&signed(&heartbeat("d", 1, 100 - 64), &key_of("d")), DropReason::Replay);
    sim.accepted(&signed(&heartbeat("d", 1, 100 - 63), &key_of("d")));
    assert_eq!(sim.tracker.table().get("d").unwrap().window().top(), 100);
}

#[test]
fn forged_and_replayed_leaves_do_not_take_a_device_offline() {
    let mut sim = Sim::new(config(AuthMode::Required));
    sim.accepted(&signed(&heartbeat("d", 1, 1), &key_of("d")));
    sim.tracker.poll_event();
    sim.rejected(&unsigned(&leave("d", 1, 2)), DropReason::MissingTag);
    sim.rejected(&signed(&leave("d", 1, 2), &key_of("other")), DropReason::BadTag);
    sim.rejected(&signed(&leave("d", 1, 1), &key_of("d")), DropReason::Replay);
    assert!(sim.tracker.table().get("d").unwrap().is_online());
    let genuine = signed(&leave("d", 1, 2), &key_of("d"));
    sim.accepted(&genuine);
    assert!(!sim.tracker.table().get("d").unwrap().is_online());
    // Bring it back, then replay the captured leave: refused.
    sim.accepted(&signed(&heartbeat("d", 1, 3), &key_of("d")));
    sim.rejected(&genuine, DropReason::Replay);
    assert!(sim.tracker.table().get("d").unwrap().is_online());
}

#[test]
fn optional_mode_takes_unsigned_but_not_badly_signed() {
    let mut sim = Sim::new(config(AuthMode::Optional));
    sim.accepted(&unsigned(&heartbeat("d", 1, 1)));
    sim.rejected(&signed(&heartbeat("d", 1, 2), &key_of("other")), DropReason::BadTag);
    sim.accepted(&signed(&heartbeat("d", 1, 2), &key_of("d")));
}

#[test]
fn auth_modes_need_a_key() {
    let t0 = Instant::from_micros(1 << 40);
    for auth in [AuthMode::Required, AuthMode::Optional] {
        let config = Config { auth, keys: None, ..Config::default() };
        assert_eq!(Tracker::new(config, t0, UNIX_EPOCH).err(), Some(ConfigError::AuthWithoutKey));
    }
}

/// A query padded as the CLI pads it, signed with `key` (if given) at the
/// simulator's start time.
pub(super) fn query(kind: QueryKind<'_>, key: Option<&Key>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = encode_query(1, kind, key.map(|key| (key, super::tests::WALL0_MS)), &mut buf).unwrap();
    buf[..len].to_vec()
}

#[test]
fn queries_need_an_allowed_source_or_the_operator_key() {
    let mut sim = Sim::new(config(AuthMode::Required));
    let operator = auth::operator_key(&MASTER);
    assert!(matches!(sim.send_from(LOOPBACK, &query(QueryKind::Summary, None)), Handled::Reply(_)));
    let refused =
        query(QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE }, None);
    match sim.send_from(STRANGER, &refused) {
        Handled::Dropped { reason: DropReason::NotAllowed, reply: Some(n) } => {
            assert!(n <= refused.len());
            let error = wire::decode(&sim.reply[..n]).unwrap();
            assert!(matches!(error, Message::Error(ErrorReply { code: ErrorCode::NotAllowed, .. })));
        }
        other => panic!("{other:?}"),
    }
    let listing = query(
        QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE },
        Some(&operator),
    );
    assert!(matches!(sim.send_from(STRANGER, &listing), Handled::Reply(_)));
    let forged = query(
        QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE },
        Some(&[1; 32]),
    );
    assert!(matches!(
        sim.send_from(STRANGER, &forged),
        Handled::Dropped { reason: DropReason::BadTag, reply: None }
    ));
    // A device key is not an operator key.
    let device_signed = query(QueryKind::Summary, Some(&key_of("d")));
    assert!(matches!(
        sim.send_from(STRANGER, &device_signed),
        Handled::Dropped { reason: DropReason::BadTag, .. }
    ));
    // A server without keys cannot check a tag.
    let mut keyless = Sim::new(Config::default());
    assert!(matches!(
        keyless.send_from(LOOPBACK, &listing),
        Handled::Dropped { reason: DropReason::UnknownKey, reply: None }
    ));
}

#[test]
fn queries_are_rate_limited_per_source() {
    let mut sim = Sim::new(Config { query_rate: 10, query_burst: 3, ..config(AuthMode::Required) });
    let summary = query(QueryKind::Summary, None);
    let answered = (0..10).filter(|_| matches!(sim.send_from(LOOPBACK, &summary), Handled::Reply(_))).count();
    assert_eq!(answered, 3);
    assert_eq!(sim.tracker.counters().drops(DropReason::RateLimited), 7);
    let other_source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 1);
    assert!(matches!(sim.send_from(other_source, &summary), Handled::Reply(_)));
    sim.at(100);
    assert!(matches!(sim.send_from(LOOPBACK, &summary), Handled::Reply(_)), "refilled at 10/s");
}

#[test]
fn a_small_query_gets_a_small_error_not_a_big_answer() {
    let mut sim = Sim::new(config(AuthMode::Required));
    sim.accepted(&signed(&heartbeat("d", 1, 1), &key_of("d")));
    let small = unsigned(&Message::Query(Query {
        request: 1,
        kind: QueryKind::Device("d"),
        padding: &[],
        tag: None,
    }));
    let handled = sim.send_from(LOOPBACK, &small);
    let n = handled.reply_len().expect("an error reply");
    assert!(n <= small.len());
    let Ok(Message::Error(ErrorReply { code: ErrorCode::RequestTooSmall { needed }, .. })) =
        wire::decode(&sim.reply[..n])
    else {
        panic!("expected RequestTooSmall")
    };
    // Padded to what the server asked for, the same query is answered.
    let padding = vec![0; usize::from(needed)];
    let padded = unsigned(&Message::Query(Query {
        request: 1,
        kind: QueryKind::Device("d"),
        padding: &padding,
        tag: None,
    }));
    assert!(matches!(sim.send_from(LOOPBACK, &padded), Handled::Reply(n) if n <= padded.len()));
}

#[test]
fn a_million_new_ids_keep_the_table_at_max_devices_in_every_mode() {
    const MAX: usize = 1000;
    for auth in [AuthMode::Off, AuthMode::Optional, AuthMode::Required] {
        let mut sim = Sim::new(Config { max_devices: MAX, ..config(auth) });
        let mut buf = [0u8; 64];
        for i in 0..1_000_000u32 {
            let id = format!("flood-{i}");
            let len = wire::encode(&heartbeat(&id, 1, 1), &mut buf).unwrap();
            sim.send_from(DEVICE, &buf[..len]);
            while sim.tracker.poll_event().is_some() {}
        }
        let table = sim.tracker.table();
        table.assert_invariants();
        assert!(table.known_count() <= MAX, "{auth:?}: {} devices", table.known_count());
        let counters = sim.tracker.counters();
        match auth {
            AuthMode::Required => {
                assert_eq!(table.known_count(), 0);
                assert_eq!(counters.drops(DropReason::MissingTag), 1_000_000);
            }
            AuthMode::Off | AuthMode::Optional => {
                assert_eq!(table.known_count(), MAX);
                assert_eq!(counters.drops(DropReason::OverCapacity), 1_000_000 - MAX as u64);
            }
        }
    }
}

#[test]
fn a_flood_of_query_sources_keeps_the_rate_limiter_bounded() {
    let mut sim = Sim::new(Config { max_query_sources: 100, ..config(AuthMode::Required) });
    let summary = query(QueryKind::Summary, None);
    for i in 0..100_000u32 {
        let from = SocketAddr::new(IpAddr::from(i.to_be_bytes()), 1);
        sim.send_from(from, &summary);
        assert!(sim.tracker.query_sources() <= 100);
    }
}

fn any_query_kind() -> impl Strategy<Value = (u8, String, Option<String>, u16)> {
    (0u8..3, "[a-z]{1,8}", proptest::option::of("[a-z]{1,8}"), any::<u16>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// For every query kind from an unauthenticated source, whatever the
    /// table holds and however the query is padded: reply bytes ≤ request bytes.
    #[test]
    fn replies_to_unauthenticated_queries_never_exceed_the_request(
        devices in proptest::collection::vec(("[a-z]{1,64}", proptest::collection::vec(any::<u8>(), 0..=64)), 0..40),
        (kind, device, after, limit) in any_query_kind(),
        padding in 0usize..1200,
        from_stranger in any::<bool>(),
    ) {
        let mut sim = Sim::new(Config { query_rate: 1000, query_burst: 1000, ..config(AuthMode::Optional) });
        for (i, (id, payload)) in devices.iter().enumerate() {
            let hb = Message::Heartbeat(Heartbeat {
                device: id, boot: 1, seq: i as u32, interval_ms: 0, flags: 0, payload, tag: None,
            });
            sim.send_from(DEVICE, &unsigned(&hb));
        }
        let kind = match kind {
            0 => QueryKind::Device(&device),
            1 => QueryKind::Summary,
            _ => QueryKind::List { after: after.as_deref(), limit, filter: crate::wire::ListFilter::ONLINE },
        };
        let padding = vec![0u8; padding];
        let mut buf = [0u8; MAX_DATAGRAM];
        let Ok(len) = wire::encode(&Message::Query(Query { request: 9, kind, padding: &padding, tag: None }), &mut buf)
        else { return Ok(()); };
        let from = if from_stranger { STRANGER } else { LOOPBACK };
        let handled = sim.send_from(from, &buf[..len]);
        if let Some(n) = handled.reply_len() {
            prop_assert!(n <= len, "{} reply bytes for a {}-byte query", n, len);
        }
    }

    /// The engine's datagram handler on arbitrary bytes, in every auth mode:
    /// never panics, never replies with more bytes than it got, and a
    /// dropped datagram changes nothing but a counter.
    #[test]
    fn engine_handles_arbitrary_datagrams(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        auth in prop_oneof![Just(AuthMode::Off), Just(AuthMode::Optional), Just(AuthMode::Required)],
        valid_prefix in any::<bool>(),
    ) {
        let mut sim = Sim::new(config(auth));
        sim.send_from(DEVICE, &signed(&heartbeat("d", 1, 1), &key_of("d")));
        for mut datagram in datagrams {
            if valid_prefix && datagram.len() >= 2 {
                datagram[0] = wire::VERSION;
                datagram[1] %= 6;
            }
            let before = sim.state();
            let drops = sim.tracker.counters().total_drops();
            let handled = sim.send_from(DEVICE, &datagram);
            if let Some(n) = handled.reply_len() {
                prop_assert!(n <= datagram.len());
            }
            if let Handled::Dropped { .. } = handled {
                prop_assert_eq!(sim.state(), before);
                prop_assert_eq!(sim.tracker.counters().total_drops(), drops + 1);
            }
            sim.tracker.table().assert_invariants();
        }
    }
}
