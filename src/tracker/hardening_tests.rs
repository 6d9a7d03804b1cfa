//! Regression tests for the hardening issue (#8), in simulated time: each
//! names the item it keeps fixed.

use super::security_tests::{
    DEVICE, LOOPBACK, MASTER, STRANGER, config, heartbeat, key_of, leave, query, signed, unsigned,
};
use super::test_prelude::*;
use super::tests::{Sim, WALL0_MS};
use super::*;
use crate::auth;
use crate::client::encode_query;
use crate::wire::{Heartbeat, MAX_DATAGRAM};
use std::net::Ipv4Addr;

/// A signed query as a client sends it, signed at `sent_unix_ms`.
fn signed_query(request: u32, kind: QueryKind<'_>, sent_unix_ms: u64) -> Vec<u8> {
    let operator = auth::operator_key(&MASTER);
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = encode_query(request, kind, Some((&operator, sent_unix_ms)), &mut buf).unwrap();
    buf[..len].to_vec()
}

fn source(n: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::from(n.to_be_bytes()), 1000)
}

/// Item 1: a page costs the entries it returns, not the devices held.
#[test]
fn item1_a_list_page_reads_a_few_words_whatever_the_table_holds_offline() {
    // 100 000 devices expiring at once is what self-preservation holds
    // back; this test wants them offline.
    let mut sim = Sim::new(Config { max_devices: 200_000, preservation: None, ..config(AuthMode::Off) });
    let mut buf = [0u8; 64];
    // 100 000 devices come and go; the last 10 stay online.
    for i in 0..100_000u32 {
        let len = wire::encode(&heartbeat(&format!("gone-{i}"), 1, 1), &mut buf).unwrap();
        sim.send_from(DEVICE, &buf[..len]);
    }
    sim.at(10_000);
    sim.tracker.handle_timeout(sim.now);
    for i in 0..10u32 {
        let len = wire::encode(&heartbeat(&format!("live-{i}"), 1, 1), &mut buf).unwrap();
        sim.send_from(DEVICE, &buf[..len]);
    }
    while sim.tracker.poll_event().is_some() {}
    assert_eq!((sim.tracker.table().known_count(), sim.tracker.table().online_count()), (100_010, 10));
    let before = sim.tracker.table().listing_reads();
    let handled = sim.send_from(
        LOOPBACK,
        &query(QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE }, None),
    );
    let reads = sim.tracker.table().listing_reads() - before;
    let Handled::Reply(n) = handled else { panic!("{handled:?}") };
    let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&sim.reply[..n])
    else {
        panic!("expected a page")
    };
    assert_eq!(page.entries.iter().count(), 10);
    assert_eq!(page.next_cursor, None);
    // A scan would touch 100 010 slots (1 563 bitmap words); the hierarchy
    // reads a handful of words per entry.
    assert!(reads <= 10 * 4 + 8, "{reads} bitmap words read for a 10-entry page");
}

/// Item 2: under `--auth optional`, an unsigned frame never changes a
/// device that has sent signed frames.
#[test]
fn item2_an_unsigned_frame_cannot_knock_out_or_lock_out_a_signed_device() {
    let mut sim = Sim::new(config(AuthMode::Optional));
    sim.accepted(&signed(&heartbeat("d", 7, 1), &key_of("d")));
    // The attack of the report: an unsigned leave (or heartbeat) with boot 2^32 - 1.
    sim.rejected(&unsigned(&leave("d", u32::MAX, 0)), DropReason::MissingTag);
    sim.rejected(&unsigned(&heartbeat("d", u32::MAX, 0)), DropReason::MissingTag);
    assert!(sim.tracker.table().get("d").unwrap().is_online());
    // The device's next genuine heartbeats are accepted.
    for seq in 2..5 {
        sim.accepted(&signed(&heartbeat("d", 7, seq), &key_of("d")));
    }
    assert_eq!(sim.tracker.table().get("d").unwrap().window().top(), 4);
    // Unsigned devices still work under optional...
    sim.accepted(&unsigned(&heartbeat("legacy", 1, 1)));
    // ...and an unsigned frame sent before a device's first signed one cannot lock it out.
    sim.accepted(&unsigned(&heartbeat("migrating", u32::MAX, u32::MAX)));
    sim.accepted(&signed(&heartbeat("migrating", 3, 1), &key_of("migrating")));
    sim.accepted(&signed(&heartbeat("migrating", 3, 2), &key_of("migrating")));
    sim.rejected(&unsigned(&heartbeat("migrating", u32::MAX, u32::MAX)), DropReason::MissingTag);
}

/// Item 3: a captured operator query is answered once, only near its time,
/// from whatever address it comes.
#[test]
fn item3_a_captured_operator_query_cannot_be_replayed() {
    let mut sim = Sim::new(config(AuthMode::Required));
    let captured = signed_query(
        1,
        QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE },
        WALL0_MS,
    );
    assert!(matches!(sim.send_from(STRANGER, &captured), Handled::Reply(_)));
    // The same bytes again, from the same or another address, now or later: refused.
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4)), 53);
    for (at, from) in [(0, STRANGER), (10, other), (29_000, other)] {
        sim.at(at);
        let handled = sim.send_from(from, &captured);
        assert!(
            matches!(handled, Handled::Dropped { reason: DropReason::Replay, reply: None }),
            "{handled:?}"
        );
    }
    // Once the window has passed it is stale, whatever the memory of tags holds.
    sim.at(31_000);
    let handled = sim.send_from(other, &captured);
    let Handled::Dropped { reason: DropReason::StaleQuery, reply: Some(n) } = handled else {
        panic!("{handled:?}")
    };
    let Ok(Message::Error(ErrorReply { code: ErrorCode::StaleQuery { server_unix_ms }, .. })) =
        wire::decode(&sim.reply[..n])
    else {
        panic!("expected StaleQuery")
    };
    assert_eq!(server_unix_ms, WALL0_MS + 31_000, "the server says its time, so a client can tell its skew");
    assert!(n <= captured.len());
    // A query signed now is answered; one from a clock 31 s ahead is not; 29 s ahead is.
    assert!(matches!(
        sim.send_from(other, &signed_query(2, QueryKind::Summary, WALL0_MS + 31_000)),
        Handled::Reply(_)
    ));
    let ahead = signed_query(3, QueryKind::Summary, WALL0_MS + 31_000 + 31_000);
    assert!(matches!(sim.send_from(other, &ahead), Handled::Dropped { reason: DropReason::StaleQuery, .. }));
    let skewed = signed_query(4, QueryKind::Summary, WALL0_MS + 31_000 + 29_000);
    assert!(matches!(sim.send_from(other, &skewed), Handled::Reply(_)));
    // Tampering with the time breaks the tag.
    let mut retimed = signed_query(5, QueryKind::Summary, WALL0_MS + 31_000);
    let time_byte = retimed.len() - auth::TAG_LEN - 2;
    retimed[time_byte] ^= 1;
    assert!(matches!(sim.send_from(other, &retimed), Handled::Dropped { reason: DropReason::BadTag, .. }));
}

/// Item 4: a flood from thousands of sources, unsigned or forged, neither
/// locks the operator out nor grows the limiter's memory.
#[test]
fn item4_a_flood_of_sources_does_not_lock_out_the_operator() {
    let max_sources = 4096;
    let mut sim = Sim::new(Config { max_query_sources: max_sources, ..config(AuthMode::Required) });
    let unsigned_summary = query(QueryKind::Summary, None);
    let forged = {
        let mut bytes = signed_query(0, QueryKind::Summary, WALL0_MS);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        bytes
    };
    // 4 300 sources, each over 20 queries/s for 5 s (25 per second), half unsigned, half forged.
    for tick in 0..125u64 {
        sim.at(tick * 40);
        for n in 0..4300u32 {
            let datagram = if n % 2 == 0 { &unsigned_summary } else { &forged };
            sim.send_from(source(0x0a00_0000 + n), datagram);
        }
        assert!(sim.tracker.query_sources() <= 2 * max_sources);
    }
    assert_eq!(
        sim.tracker.query_sources(),
        0,
        "a flood without the key or an allowed source holds no bucket"
    );
    // 21 operators from new sources, each with a fresh signed query: all answered.
    let answered = (0..21u32)
        .filter(|n| {
            let query = signed_query(100 + n, QueryKind::Summary, WALL0_MS + 5_000);
            matches!(sim.send_from(source(0xc000_0200 + n), &query), Handled::Reply(_))
        })
        .count();
    assert_eq!(answered, 21);
    // Allowed sources that flood fill their own map, bounded; a new allowed source still gets in.
    let mut sim = Sim::new(Config { max_query_sources: 100, ..config(AuthMode::Required) });
    for round in 0..50u64 {
        sim.at(round * 10);
        for n in 0..150u32 {
            sim.send_from(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x7f00_0100 + n)), 1), &unsigned_summary);
        }
        assert!(sim.tracker.query_sources() <= 100);
    }
    sim.at(3_000);
    let newcomer = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 9, 9, 9)), 1);
    assert!(matches!(sim.send_from(newcomer, &unsigned_summary), Handled::Reply(_)));
}

/// Item 4: with `--threads N` a source's limit holds for the server as a
/// whole, not once per thread.
#[test]
fn item4_the_rate_limit_holds_across_shards() {
    let config = Config { query_rate: 20, query_burst: 20, ..Config::default() };
    let t0 = Instant::from_micros(1 << 40);
    let mut shards = Tracker::new_sharded(config, 2, t0, UNIX_EPOCH).unwrap();
    let summary = query(QueryKind::Summary, None);
    let mut reply = vec![0; MAX_DATAGRAM];
    let mut answered = 0;
    // One second of queries at 100/s, alternating between the two threads.
    for i in 0..100u64 {
        let now = t0 + Duration::from_millis(i * 10);
        let shard = &mut shards[(i % 2) as usize];
        if matches!(shard.handle(now, LOOPBACK, &summary, &mut reply), Handled::Reply(_)) {
            answered += 1;
        }
    }
    // The burst (20) and one second at 20/s, give or take the last token.
    assert!((39..=40).contains(&answered), "{answered} answered: the limit must not double with 2 threads");
}

/// Item 5: heartbeats withheld by someone on the path and released after the
/// device died keep it online no longer than its newest heartbeat did.
#[test]
fn item5_withheld_heartbeats_do_not_extend_the_deadline() {
    let mut sim = Sim::new(config(AuthMode::Required)); // interval 1 s: TTL 3 s
    let mut withheld = Vec::new();
    for seq in 1..=20u32 {
        sim.at(u64::from(seq) * 1000);
        let frame = signed(&heartbeat("d", 1, seq), &key_of("d"));
        if seq % 2 == 1 {
            withheld.push(frame);
        } else {
            sim.accepted(&frame);
        }
    }
    // The device dies after seq 20 (at 20 s): offline at 23 s.
    let deadline = sim.t0 + Duration::from_secs(23);
    assert_eq!(sim.tracker.table().get("d").unwrap().deadline(), Some(deadline));
    for (i, frame) in withheld.iter().enumerate() {
        sim.at(21_000 + 500 * i as u64);
        sim.accepted(frame);
        if sim.now < deadline {
            assert_eq!(sim.tracker.table().get("d").unwrap().deadline(), Some(deadline));
        }
    }
    assert!(!sim.tracker.table().get("d").unwrap().is_online(), "offline at 23 s, not kept alive");
    assert_eq!(sim.tracker.counters().expirations(), 1);
}

/// Item 8: control characters in ids are refused at the protocol level.
#[test]
fn item8_ids_with_control_characters_are_refused() {
    let mut sim = Sim::new(Config::default());
    for id in ["evil\n2026-01-01 INFO forged line", "\u{1b}[31mred", "bell\u{7}", "del\u{7f}", "c1\u{85}next"]
    {
        // Encoders refuse them too, so build the frame by hand.
        let mut frame = vec![1, 0, id.len() as u8];
        frame.extend_from_slice(id.as_bytes());
        frame.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        let handled = sim.send_bytes(&frame);
        assert!(
            matches!(handled, Handled::Dropped { reason: DropReason::IdControlChar, reply: None }),
            "{id:?}: {handled:?}"
        );
    }
    assert_eq!(sim.tracker.table().known_count(), 0);
    assert_eq!(sim.tracker.counters().drops(DropReason::IdControlChar), 5);
    // Printable non-ASCII ids are fine.
    sim.send(heartbeat("café-☃", 1, 1));
    assert_eq!(sim.tracker.table().known_count(), 1);
}

/// Item 11: a 1200-byte list query gets a page filled to what fits, and a
/// small list query gets a page if one entry fits.
#[test]
fn item11_pages_are_filled() {
    let mut sim = Sim::new(Config { query_rate: 1000, query_burst: 1000, ..Config::default() });
    for i in 0..100 {
        sim.send(heartbeat(&format!("device-{i:03}"), 1, 1));
    }
    let mut listed = 0;
    let mut cursor: Option<String> = None;
    loop {
        let request = query(
            QueryKind::List { after: cursor.as_deref(), limit: 0, filter: crate::wire::ListFilter::ONLINE },
            None,
        );
        assert_eq!(request.len(), MAX_DATAGRAM);
        let Handled::Reply(n) = sim.send_from(LOOPBACK, &request) else { panic!() };
        let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&sim.reply[..n])
        else {
            panic!()
        };
        let entries: Vec<_> = page.entries.iter().map(Result::unwrap).collect();
        listed += entries.len();
        let Some(next) = page.next_cursor else { break };
        // Full: the next entry (of the same size here) would not have fitted.
        let entry_len = page.entries.as_bytes().len() / entries.len();
        assert!(
            n + entry_len > MAX_DATAGRAM,
            "a page of {n} bytes had room for one more {entry_len}-byte entry"
        );
        cursor = Some(next.to_owned());
    }
    assert_eq!(listed, 100);
    // The smallest list query that one entry fits gets it, not RequestTooSmall { needed: 1200 }.
    let small = unsigned(&Message::Query(Query {
        request: 1,
        kind: QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE },
        padding: &[],
        tag: None,
    }));
    let Handled::Reply(n) = sim.send_from(LOOPBACK, &small) else { panic!() };
    let Ok(Message::Error(ErrorReply { code: ErrorCode::RequestTooSmall { needed }, .. })) =
        wire::decode(&sim.reply[..n])
    else {
        panic!()
    };
    assert!(needed < 120, "needed {needed}: one entry and a cursor fit in far less than 1200");
    let padding = vec![0; usize::from(needed)];
    let padded = unsigned(&Message::Query(Query {
        request: 1,
        kind: QueryKind::List { after: None, limit: 0, filter: crate::wire::ListFilter::ONLINE },
        padding: &padding,
        tag: None,
    }));
    let Handled::Reply(n) = sim.send_from(LOOPBACK, &padded) else { panic!() };
    let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&sim.reply[..n])
    else {
        panic!("padded to `needed`, the query gets a page")
    };
    assert!(page.entries.iter().count() >= 1 && page.next_cursor.is_some());
}

/// Item 12: a query padded to `needed` is still answered after the answer grew.
#[test]
fn item12_needed_leaves_headroom_for_answers_that_grow() {
    let mut sim = Sim::new(Config { query_rate: 1000, query_burst: 1000, ..Config::default() });
    let beat = |sim: &mut Sim, seq: u32| sim.send(Message::Heartbeat(Heartbeat::new("d", 1, seq, 100_000)));
    beat(&mut sim, 1);
    let ask = |padding: &[u8]| {
        unsigned(&Message::Query(Query { request: 1, kind: QueryKind::Device("d"), padding, tag: None }))
    };
    let Handled::Reply(n) = sim.send_from(LOOPBACK, &ask(&[])) else { panic!() };
    let Ok(Message::Error(ErrorReply { code: ErrorCode::RequestTooSmall { needed }, .. })) =
        wire::decode(&sim.reply[..n])
    else {
        panic!()
    };
    // The answer grows: last seen 80 ms ago, 200 heartbeats, seq past 127 (each a varint byte more).
    for seq in 2..=200 {
        beat(&mut sim, seq);
    }
    sim.at(80);
    let mut padding = vec![0; usize::from(needed)];
    let query = loop {
        let query = ask(&padding);
        if query.len() >= usize::from(needed) {
            break query;
        }
        padding.push(0);
    };
    assert!(
        matches!(sim.send_from(LOOPBACK, &query), Handled::Reply(n) if matches!(wire::decode(&sim.reply[..n]), Ok(Message::Status(_))))
    );
}

/// Lists every page of `filter` from the simulator, as the client does;
/// returns the ids listed and the sum of `matched`.
fn list_filtered(sim: &mut Sim, filter: wire::ListFilter<'_>) -> (Vec<String>, u64) {
    let (mut ids, mut matched, mut cursor) = (Vec::new(), 0, None::<String>);
    for _ in 0..10_000 {
        let kind = QueryKind::List { after: cursor.as_deref(), limit: 0, filter };
        let Handled::Reply(n) = sim.send_from(LOOPBACK, &query(kind, None)) else { panic!("no page") };
        let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&sim.reply[..n])
        else {
            panic!("expected a page")
        };
        ids.extend(page.entries.iter().map(|e| e.unwrap().device.to_owned()));
        matched += page.matched;
        match page.next_cursor {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, matched),
        }
    }
    panic!("the listing does not end")
}

/// Issue 9: listings filtered by state and prefix, and counted, on the server side.
#[test]
fn listings_filter_by_state_and_prefix_and_count_on_the_server() {
    let mut sim = Sim::new(Config { query_rate: 100_000, query_burst: 100_000, ..Config::default() });
    for i in 0..30 {
        sim.send(heartbeat(&format!("boiler-{i:02}"), 1, 1));
        sim.send(heartbeat(&format!("sensor-{i:02}"), 1, 1));
    }
    // The boilers 0..10 leave; the rest stay online.
    for i in 0..10 {
        sim.send(leave(&format!("boiler-{i:02}"), 1, 2));
    }
    let filter = |state, prefix, count_only| wire::ListFilter { state, prefix, count_only };
    let (online, n) = list_filtered(&mut sim, filter(wire::LIST_ONLINE, None, false));
    assert_eq!((online.len(), n), (50, 50));
    let (offline, n) = list_filtered(&mut sim, filter(wire::LIST_OFFLINE, None, false));
    assert_eq!(offline, (0..10).map(|i| format!("boiler-{i:02}")).collect::<Vec<_>>());
    assert_eq!(n, 10);
    let (all, _) = list_filtered(&mut sim, filter(wire::LIST_ALL, None, false));
    assert_eq!(all.len(), 60);
    let (boilers, _) = list_filtered(&mut sim, filter(wire::LIST_ONLINE, Some("boiler-"), false));
    assert_eq!(boilers, (10..30).map(|i| format!("boiler-{i:02}")).collect::<Vec<_>>());
    // Counting sends no entries, and agrees.
    for (state, prefix, expected) in [
        (wire::LIST_ONLINE, None, 50),
        (wire::LIST_OFFLINE, None, 10),
        (wire::LIST_ALL, None, 60),
        (wire::LIST_ALL, Some("sensor-1"), 10),
        (wire::LIST_OFFLINE, Some("sensor"), 0),
    ] {
        let (ids, counted) = list_filtered(&mut sim, filter(state, prefix, true));
        assert!(ids.is_empty());
        assert_eq!(counted, expected, "{state} {prefix:?}");
    }
    // An unknown state selects nothing.
    assert_eq!(list_filtered(&mut sim, filter(9, None, false)), (vec![], 0));
}

/// Issue 9: a prefix that matches nothing among many devices costs bounded
/// pages (short or empty, with a cursor), not one unbounded scan.
#[test]
fn a_prefix_page_examines_a_bounded_number_of_devices() {
    let mut sim = Sim::new(Config { query_rate: 100_000, query_burst: 100_000, ..Config::default() });
    let mut buf = [0u8; 64];
    for i in 0..10_000u32 {
        let len = wire::encode(&heartbeat(&format!("d-{i}"), 1, 1), &mut buf).unwrap();
        sim.send_from(DEVICE, &buf[..len]);
    }
    let first = QueryKind::List {
        after: None,
        limit: 0,
        filter: wire::ListFilter { state: wire::LIST_ONLINE, prefix: Some("zzz"), count_only: false },
    };
    let Handled::Reply(n) = sim.send_from(LOOPBACK, &query(first, None)) else { panic!() };
    let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&sim.reply[..n])
    else {
        panic!()
    };
    assert_eq!((page.matched, page.entries.iter().count()), (0, 0));
    assert_eq!(page.next_cursor, Some("0.4096"), "stopped after LIST_SCAN_LIMIT devices, with a cursor");
    let (ids, matched) = list_filtered(
        &mut sim,
        wire::ListFilter { state: wire::LIST_ONLINE, prefix: Some("zzz"), count_only: false },
    );
    assert_eq!((ids.len(), matched), (0, 0));
}

/// Issue 9: with several shards, counting walks every shard.
#[test]
fn counting_covers_every_shard() {
    let config = Config { query_rate: 100_000, query_burst: 100_000, ..Config::default() };
    let t0 = Instant::from_micros(1 << 40);
    let mut shards = Tracker::new_sharded(config, 3, t0, UNIX_EPOCH).unwrap();
    let mut reply = vec![0; MAX_DATAGRAM];
    let mut buf = [0u8; 64];
    for i in 0..300u32 {
        let id = format!("dev-{i}");
        let len = wire::encode(&heartbeat(&id, 1, 1), &mut buf).unwrap();
        shards[crate::shard::owner(id.as_bytes(), 3)].handle(t0, DEVICE, &buf[..len], &mut reply);
    }
    let filter = wire::ListFilter { state: wire::LIST_ONLINE, prefix: None, count_only: true };
    let (mut total, mut cursor, mut pages) = (0, None::<String>, 0);
    loop {
        let kind = QueryKind::List { after: cursor.as_deref(), limit: 0, filter };
        let bytes = query(kind, None);
        let shard = match crate::shard::route(&bytes, 3) {
            crate::shard::Route::Shard(k) => k,
            other => panic!("{other:?}"),
        };
        let Handled::Reply(n) = shards[shard].handle(t0, LOOPBACK, &bytes, &mut reply) else { panic!() };
        let Ok(Message::Status(Status { body: StatusBody::Page(page), .. })) = wire::decode(&reply[..n])
        else {
            panic!()
        };
        total += page.matched;
        pages += 1;
        match page.next_cursor {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!((total, pages), (300, 3), "one page per shard");
}
