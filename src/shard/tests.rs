//! Routing, cursors, and a model test: shards fed through [`route`] answer
//! exactly as one engine does.

use crate::time::Instant;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

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
        flags: wire::FLAG_ACK,
        payload: b"p",
        ..Heartbeat::new(device, 1, seq, 1000)
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
    assert_eq!(
        route(&query(QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE }), 3),
        Route::Shard(0)
    );
    assert_eq!(
        route(
            &query(QueryKind::List {
                after: Some("2.17"),
                limit: 0,
                filter: crate::wire::ListFilter::ONLINE
            }),
            3
        ),
        Route::Shard(2)
    );
    // A cursor of a shard that does not exist, or not a cursor at all.
    assert_eq!(
        route(
            &query(QueryKind::List { after: Some("3.0"), limit: 0, filter: crate::wire::ListFilter::ONLINE }),
            3
        ),
        Route::Local
    );
    assert_eq!(
        route(
            &query(QueryKind::List { after: Some("x"), limit: 0, filter: crate::wire::ListFilter::ONLINE }),
            3
        ),
        Route::Local
    );
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
    for (shard, slot) in [(0, 0), (0, 9), (9, 10), (10, 99), (255, 4_294_967_295), (3, 1_000_000)] {
        assert_eq!(cursor_len(shard, slot), format_cursor(shard, slot).len(), "{shard}.{slot}");
    }
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
        let t0 = Instant::from_micros(1 << 40);
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
                let handled =
                    self.shards[socket].handle_with_peers(self.now, FROM, bytes, &mut reply, &peers);
                let sharded = (handled, handled.reply_len().map_or(Vec::new(), |len| reply[..len].to_vec()));
                return (single, sharded);
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
                let request = query(QueryKind::List {
                    after: after.as_deref(),
                    limit,
                    filter: crate::wire::ListFilter::ONLINE,
                });
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

/// Runs a classic BPF program on `packet` the way the kernel does, for the
/// opcodes [`steering_program`] uses; `None` where the kernel would abort
/// (it then returns 0).
fn run_bpf(program: &[BpfInsn], packet: &[u8]) -> Option<u32> {
    let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
    loop {
        let insn = program.get(pc)?;
        pc += 1;
        let k = insn.k;
        let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
        match insn.code {
            op::LD_LEN => a = packet.len() as u32,
            op::LD_B_ABS => a = u32::from(*packet.get(k as usize)?),
            op::LD_IMM => a = k,
            op::LD_MEM => a = mem[k as usize],
            op::ST => mem[k as usize] = a,
            op::TAX => x = a,
            op::SUB_K => a = a.wrapping_sub(k),
            op::MUL_K => a = a.wrapping_mul(k),
            op::MOD_K => a %= k,
            op::XOR_X => a ^= x,
            op::JA => pc += k as usize,
            op::JEQ_K => pc += jump(a == k),
            op::JGT_K => pc += jump(a > k),
            op::JGE_K => pc += jump(a >= k),
            op::JGE_X => pc += jump(a >= x),
            op::RET_A => return Some(a),
            op::RET_K => return Some(k),
            other => panic!("opcode {other:#x} not modelled"),
        }
    }
}

#[test]
fn the_steering_program_is_valid_classic_bpf() {
    for shards in [2, 3, 8] {
        let program = steering_program(shards);
        // The kernel's limits: at most 4096 instructions, jumps only forward
        // and inside the program, and it ends with a return.
        assert!(program.len() <= 4096);
        assert!(matches!(program.last().map(|i| i.code), Some(op::RET_A | op::RET_K)));
        for (pc, insn) in program.iter().enumerate() {
            let targets = match insn.code {
                op::JA => vec![insn.k as usize],
                op::JEQ_K | op::JGT_K | op::JGE_K | op::JGE_X => vec![insn.jt.into(), insn.jf.into()],
                op::RET_A | op::RET_K => vec![],
                _ => vec![0],
            };
            for skip in targets {
                assert!(pc + 1 + skip < program.len(), "jump out of the program at {pc}");
            }
        }
    }
}

#[test]
fn the_steering_program_picks_the_owner_of_heartbeats_and_leaves() {
    for shards in [2, 3, 5] {
        let program = steering_program(shards);
        for i in 0..300 {
            let id = format!("{}-{i}", "x".repeat(i % 70));
            if id.len() > wire::MAX_ID_LEN {
                continue;
            }
            let owner = owner(id.as_bytes(), shards) as u32;
            assert_eq!(run_bpf(&program, &heartbeat(&id, i as u32)), Some(owner), "{id}");
            let leave = encode(&Message::Leave(Leave { device: &id, boot: 1, seq: 2, tag: None }));
            assert_eq!(run_bpf(&program, &leave), Some(owner), "{id}");
        }
        // Queries, garbage and cut-off frames get no owner (the kernel then uses its own hash).
        for packet in [query(QueryKind::Summary), vec![], vec![1], vec![2, 0, 1, b'a'], vec![1, 0, 5, b'a']] {
            assert_eq!(run_bpf(&program, &packet), Some(NO_OWNER), "{packet:?}");
        }
    }
}

proptest! {
    /// Whatever the bytes, the program never reads outside the packet, and
    /// any shard it names is the one `route` picks.
    #[test]
    fn the_steering_program_agrees_with_route(bytes in proptest::collection::vec(any::<u8>(), 0..80), shards in 2usize..6) {
        let picked = run_bpf(&steering_program(shards), &bytes);
        prop_assert!(picked.is_some(), "the program read outside the packet");
        if let Some(shard) = picked.filter(|&s| s != NO_OWNER) {
            prop_assert_eq!(route(&bytes, shards), Route::Shard(shard as usize));
        }
    }
}
