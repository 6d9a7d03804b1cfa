//! Routing, cursors, and a model test: shards fed through [`route`] answer
//! exactly as one engine does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::client::encode_query;
use crate::tracker::{Config, Handled, Tracker};
use crate::wire::{Heartbeat, Leave, MAX_DATAGRAM, Message, QueryKind, Status, StatusBody};

fn encode(message: &Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = wire::encode(message, &mut buf).unwrap();
    buf[..len].to_vec()
}

fn heartbeat(device: &str, seq: u32) -> Vec<u8> {
    encode(&Message::Heartbeat(Heartbeat {
        device,
        boot: 1,
        seq,
        interval_ms: 1000,
        flags: wire::FLAG_ACK,
        payload: b"p",
        tag: None,
    }))
}

fn query(kind: QueryKind<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = encode_query(7, kind, None, &mut buf).unwrap();
    buf[..len].to_vec()
}

#[test]
fn owners_are_in_range_and_spread_evenly() {
    for shards in 1..=8 {
        let mut counts = vec![0usize; shards];
        for i in 0..80_000 {
            let owner = owner(format!("dev-{i:012}").as_bytes(), shards);
            counts[owner] += 1;
        }
        let expected = 80_000 / shards;
        for count in counts {
            // Within 3% of an even split (the hash is fixed, so this is deterministic).
            assert!(count.abs_diff(expected) * 100 <= expected * 3, "{shards} shards: {count} vs {expected}");
        }
    }
}

#[test]
fn one_shard_takes_everything() {
    assert_eq!(route(b"garbage", 1), Route::Shard(0));
    assert_eq!(route(&heartbeat("a", 1), 1), Route::Shard(0));
    assert_eq!(owner(b"anything", 1), 0);
}

#[test]
fn datagrams_naming_a_device_go_to_its_owner() {
    for i in 0..200 {
        let id = format!("sensor-{i}");
        let owner = owner(id.as_bytes(), 4);
        assert_eq!(route(&heartbeat(&id, 1), 4), Route::Shard(owner));
        let leave = encode(&Message::Leave(Leave { device: &id, boot: 1, seq: 2, tag: None }));
        assert_eq!(route(&leave, 4), Route::Shard(owner));
        assert_eq!(route(&query(QueryKind::Device(&id)), 4), Route::Shard(owner));
    }
}

#[test]
fn queries_and_garbage_are_routed_by_kind() {
    assert_eq!(route(&query(QueryKind::Summary), 3), Route::Summary);
    assert_eq!(route(&query(QueryKind::List { after: None, limit: 0 }), 3), Route::Shard(0));
    assert_eq!(route(&query(QueryKind::List { after: Some("2.17"), limit: 0 }), 3), Route::Shard(2));
    // A cursor of a shard that does not exist, or not a cursor at all.
    assert_eq!(route(&query(QueryKind::List { after: Some("3.0"), limit: 0 }), 3), Route::Local);
    assert_eq!(route(&query(QueryKind::List { after: Some("x"), limit: 0 }), 3), Route::Local);
    assert_eq!(route(b"", 3), Route::Local);
    assert_eq!(route(&[wire::VERSION, 0, 40, b'a'], 3), Route::Local);
    assert_eq!(route(&[9, 0, 1, b'a'], 3), Route::Local);
}

#[test]
fn a_heartbeat_with_a_long_length_prefix_still_reaches_its_owner() {
    // postcard reads a two-byte varint for 3 (0x83 0x00) as 3 too; the full decoder routes it.
    let canonical = heartbeat("abc", 1);
    let mut long = vec![canonical[0], canonical[1], 0x83, 0x00];
    long.extend_from_slice(&canonical[3..]);
    let Ok(Message::Heartbeat(hb)) = wire::decode(&long) else { panic!("postcard reads it") };
    assert_eq!(hb.device, "abc");
    assert_eq!(route(&long, 5), Route::Shard(owner(b"abc", 5)));
}

#[test]
fn cursors_round_trip_and_junk_is_refused() {
    assert_eq!(parse_cursor(&format_cursor(3, 1_000_000)), Some((3, 1_000_000)));
    for junk in ["", ".", "1.", ".1", "1", "a.1", "1.b", "+1.2", "1.-2", "1.2.3", "99999999999999999999999.1"]
    {
        assert_eq!(parse_cursor(junk), None, "{junk:?}");
    }
}

proptest! {
    #[test]
    fn route_agrees_with_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64), shards in 2usize..6) {
        let routed = route(&bytes, shards);
        match wire::decode(&bytes) {
            Ok(Message::Heartbeat(hb)) => prop_assert_eq!(routed, Route::Shard(owner(hb.device.as_bytes(), shards))),
            Ok(Message::Leave(l)) => prop_assert_eq!(routed, Route::Shard(owner(l.device.as_bytes(), shards))),
            Ok(Message::Query(_)) => {}
            _ => {
                // Not a valid heartbeat or leave: wherever it goes, it is only counted there.
            }
        }
    }
}

/// One engine beside `n` shards, fed the same datagrams at the same times.
struct Pair {
    single: Tracker,
    shards: Vec<Tracker>,
    now: Instant,
}

const FROM: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)), 5000);

impl Pair {
    fn new(n: usize) -> Self {
        let config =
            Config { query_rate: 1_000_000, query_burst: 1_000_000, max_devices: 1000, ..Config::default() };
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Pair {
            single: Tracker::new(config.clone(), t0, wall).unwrap(),
            shards: Tracker::new_sharded(config, n, t0, wall).unwrap(),
            now: t0,
        }
    }

    /// Handles `bytes` as the server would if it arrived on shard
    /// `socket`'s socket; returns both outcomes and replies.
    fn send(&mut self, socket: usize, bytes: &[u8]) -> ((Handled, Vec<u8>), (Handled, Vec<u8>)) {
        let n = self.shards.len();
        let socket = socket % n;
        let mut reply = vec![0u8; MAX_DATAGRAM];
        let handled = self.single.handle(self.now, FROM, bytes, &mut reply);
        let single = (handled, handled.reply_len().map_or(Vec::new(), |len| reply[..len].to_vec()));
        let target = match route(bytes, n) {
            Route::Shard(k) => k,
            Route::Summary => {
                let mut peers = crate::tracker::Totals::default();
                for (k, shard) in self.shards.iter().enumerate() {
                    if k != socket {
                        peers.add(&shard.totals());
                    }
                }
                self.shards[socket].set_peer_totals(peers);
                socket
            }
            Route::Local => socket,
        };
        let handled = self.shards[target].handle(self.now, FROM, bytes, &mut reply);
        let sharded = (handled, handled.reply_len().map_or(Vec::new(), |len| reply[..len].to_vec()));
        (single, sharded)
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.single.handle_timeout(self.now);
        for shard in &mut self.shards {
            shard.handle_timeout(self.now);
        }
    }

    fn events(&mut self) -> (Vec<String>, Vec<String>) {
        let describe = |e: crate::tracker::Event| format!("{} {:?} {:?}", &*e.device, e.kind, e.deadline);
        let single: Vec<String> = std::iter::from_fn(|| self.single.poll_event()).map(describe).collect();
        let mut sharded: Vec<String> = Vec::new();
        for shard in &mut self.shards {
            sharded.extend(std::iter::from_fn(|| shard.poll_event()).map(describe));
        }
        let mut single = single;
        single.sort();
        sharded.sort();
        (single, sharded)
    }

    /// Every online device's record, listed page by page with `limit` per page.
    fn list(&mut self, socket: usize, limit: u16) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
        let mut out = (BTreeMap::new(), BTreeMap::new());
        for side in 0..2 {
            let mut after: Option<String> = None;
            for _ in 0..1000 {
                let request = query(QueryKind::List { after: after.as_deref(), limit });
                let (single, sharded) = self.send(socket, &request);
                let (handled, bytes) = if side == 0 { single } else { sharded };
                assert!(matches!(handled, Handled::Reply(_)), "{handled:?}");
                let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&bytes)
                else {
                    panic!("not a page");
                };
                let map = if side == 0 { &mut out.0 } else { &mut out.1 };
                for info in page.entries.iter() {
                    let info = info.unwrap();
                    let fresh = map.insert(info.device.to_string(), encode_info(&info)).is_none();
                    assert!(fresh, "{} listed twice", info.device);
                }
                match page.next_cursor {
                    Some(cursor) => after = Some(cursor.to_string()),
                    None => break,
                }
            }
        }
        out
    }
}

fn encode_info(info: &wire::DeviceInfo<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = postcard::to_slice(info, &mut buf).unwrap().len();
    buf[..len].to_vec()
}

#[derive(Debug, Clone)]
enum Op {
    Beat { device: u8, seq: u32, socket: usize },
    Leave { device: u8, seq: u32, socket: usize },
    Advance(u64),
    DeviceQuery { device: u8, socket: usize },
    Summary { socket: usize },
    List { limit: u16, socket: usize },
    Garbage { bytes: Vec<u8>, socket: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..24, 0u32..40, 0usize..8).prop_map(|(device, seq, socket)| Op::Beat { device, seq, socket }),
        1 => (0u8..24, 0u32..40, 0usize..8).prop_map(|(device, seq, socket)| Op::Leave { device, seq, socket }),
        3 => (0u64..2500).prop_map(Op::Advance),
        1 => (0u8..30, 0usize..8).prop_map(|(device, socket)| Op::DeviceQuery { device, socket }),
        1 => (0usize..8).prop_map(|socket| Op::Summary { socket }),
        1 => (0u16..5, 0usize..8).prop_map(|(limit, socket)| Op::List { limit, socket }),
        1 => (proptest::collection::vec(any::<u8>(), 0..40), 0usize..8)
            .prop_map(|(bytes, socket)| Op::Garbage { bytes, socket }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever socket a datagram arrives on, shards answer as one engine:
    /// the same replies byte for byte (acks, device records, summaries), the
    /// same online/offline events, the same listing.
    #[test]
    fn shards_behave_as_one_engine(n in 2usize..5, ops in proptest::collection::vec(op(), 1..120)) {
        let mut pair = Pair::new(n);
        for op in ops {
            match op {
                Op::Beat { device, seq, socket } => {
                    let (a, b) = pair.send(socket, &heartbeat(&format!("dev{device}"), seq));
                    prop_assert_eq!(a, b);
                }
                Op::Leave { device, seq, socket } => {
                    let id = format!("dev{device}");
                    let bytes = encode(&Message::Leave(Leave { device: &id, boot: 1, seq, tag: None }));
                    let (a, b) = pair.send(socket, &bytes);
                    prop_assert_eq!(a, b);
                }
                Op::Advance(ms) => pair.advance(ms),
                Op::DeviceQuery { device, socket } => {
                    let (a, b) = pair.send(socket, &query(QueryKind::Device(&format!("dev{device}"))));
                    prop_assert_eq!(a, b);
                }
                Op::Summary { socket } => {
                    let (a, b) = pair.send(socket, &query(QueryKind::Summary));
                    prop_assert_eq!(a, b);
                }
                Op::List { limit, socket } => {
                    let (a, b) = pair.list(socket, limit);
                    prop_assert_eq!(a, b);
                }
                Op::Garbage { bytes, socket } => {
                    let (a, b) = pair.send(socket, &bytes);
                    prop_assert_eq!(a, b);
                }
            }
            let (a, b) = pair.events();
            prop_assert_eq!(a, b);
        }
    }
}
