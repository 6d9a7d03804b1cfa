//! End to end over real UDP on 127.0.0.1 with the real binary.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{PROMPTLY, Server, cli, frame, poll, stderr, stdout};
use presence::client::{Client, Sender};
use presence::wire::{self, DropReason, Heartbeat, Message, QueryKind, Status, StatusBody};

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn beat_online_status_then_offline_at_the_deadline() {
    let server = Server::start(&["--min-ttl", "100ms"]);
    let addr = server.addr.to_string();
    // 200 ms interval × 3 misses: the device is offline 600 ms after its last heartbeat.
    let ttl = Duration::from_millis(600);
    let mut sender = Sender::new(server.addr, "sensor-1", Duration::from_millis(200), 7).unwrap();
    sender.set_payload(b"bat=97").unwrap();
    sender.beat(false).unwrap();
    server.wait_event("sensor-1", "online", None, PROMPTLY);

    // Keep it alive while the CLI asks about it.
    let (seq, _) = sender.beat(true).unwrap();
    let ack = sender.wait_ack(seq, QUERY_TIMEOUT).unwrap().expect("ack");
    assert_eq!((ack.interval_ms, ack.ttl_ms), (200, 600));
    let out = cli(&["status", "--server", &addr, "sensor-1", "--json", "--timeout", "5s"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // If this machine stalled past the TTL the device is rightly offline; otherwise it must be online.
    if report["online"] == true {
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(report["payload_hex"], "6261743d3937");
        assert_eq!(report["boot"], 7);
    }

    // The last heartbeat; then silence.
    let before_last = Instant::now();
    sender.beat(false).unwrap();
    let offline = server.wait_event("sensor-1", "offline", Some("expired"), PROMPTLY);
    let seen = before_last.elapsed();
    assert!(seen >= ttl, "offline after {seen:?}, before the {ttl:?} deadline");
    assert!(seen <= ttl + Duration::from_secs(1), "offline noticed only after {seen:?}");
    assert_eq!(offline["address"], sender.local_addr().unwrap().to_string());

    let out = cli(&["status", "--server", &addr, "sensor-1"]);
    assert_eq!(out.status.code(), Some(1), "offline device exits 1");
    assert!(stdout(&out).contains("offline"), "{}", stdout(&out));
    let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
    let summary = client.summary().unwrap();
    assert_eq!(
        (summary.counts.online, summary.counts.known, summary.counts.heartbeats, summary.counts.expirations),
        (0, 1, 3, 1)
    );
    let report = client.device("sensor-1").unwrap().unwrap();
    assert_eq!((report.numbers.flaps, report.numbers.seq, report.numbers.heartbeats), (1, 3, 3));
}

#[test]
fn leave_takes_the_device_offline_at_once() {
    let server = Server::start(&[]);
    // 10 s interval: it would take 30 s to expire.
    let mut sender = Sender::new(server.addr, "leaver", Duration::from_secs(10), 1).unwrap();
    sender.beat(false).unwrap();
    server.wait_event("leaver", "online", None, PROMPTLY);
    let left_at = Instant::now();
    sender.leave().unwrap();
    server.wait_event("leaver", "offline", Some("left"), PROMPTLY);
    assert!(left_at.elapsed() < Duration::from_secs(30), "it was not the expiry");
    let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
    assert!(!client.device("leaver").unwrap().unwrap().online);
    assert_eq!(client.summary().unwrap().counts.leaves, 1);
}

fn heartbeat(seq: u32) -> Vec<u8> {
    frame(&Message::Heartbeat(Heartbeat { payload: b"ok", ..Heartbeat::new("steady", 3, seq, 60_000) }))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

#[test]
fn garbage_interleaved_with_heartbeats_changes_only_the_drop_counters() {
    let server = Server::start(&[]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server.addr).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut expected = std::collections::BTreeMap::new();
    let mut garbage_sent = 0u64;
    for seq in 1..=20u32 {
        let good = heartbeat(seq);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut kind = good.clone();
        kind[1] = 9;
        // Random bytes whose first byte is never a version we speak or might.
        let mut random = noise(&mut seed, 1 + seq as usize * 13);
        random[0] |= 0x10;
        let ack = frame(&Message::Ack(wire::Ack { boot: 1, seq, interval_ms: 1, ttl_ms: 1 }));
        let batch: Vec<(Vec<u8>, DropReason)> = vec![
            (Vec::new(), DropReason::Truncated),
            (good[..good.len() - 3].to_vec(), DropReason::Truncated),
            (trailing, DropReason::TrailingBytes),
            (vec![0xa5; 1500], DropReason::Oversized),
            (random, DropReason::UnsupportedVersion),
            (kind, DropReason::UnknownKind),
            (vec![1, 0, 0, 3, seq as u8, 0, 0, 0, 0], DropReason::BadDeviceId),
            (vec![1, 1, 2, 0xff, 0xfe, 1, 1], DropReason::Malformed),
            (ack, DropReason::UnexpectedKind),
        ];
        for (bytes, reason) in batch {
            socket.send(&bytes).unwrap();
            *expected.entry(reason.name().to_string()).or_insert(0u64) += 1;
            garbage_sent += 1;
        }
        socket.send(&good).unwrap();
    }
    // The first datagram back must be the reply to this query: garbage got none.
    let mut query = [0u8; wire::MAX_DATAGRAM];
    let len = presence::client::encode_query(77, QueryKind::Device("steady"), None, &mut query).unwrap();
    let query = &query[..len];
    socket.send(query).unwrap();
    socket.set_read_timeout(Some(QUERY_TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).expect("a reply to the query");
    let Ok(Message::Status(Status { request: 77, body: StatusBody::Device(info) })) = wire::decode(&buf[..n])
    else {
        panic!("the first reply was not the status: {:02x?}", &buf[..n]);
    };
    assert_eq!(
        (info.online, info.numbers.seq, info.numbers.heartbeats, info.numbers.boot, info.payload),
        (true, 20, 20, 3, &b"ok"[..])
    );

    let summary = Client::new(server.addr, QUERY_TIMEOUT).unwrap().summary().unwrap();
    assert_eq!(summary.drops, expected);
    assert_eq!(summary.total_drops(), garbage_sent);
    assert_eq!((summary.counts.heartbeats, summary.counts.known, summary.counts.online), (20, 1, 1));
    // Events reach the file through the publisher thread: wait for the one.
    server.wait_event("steady", "online", None, PROMPTLY);
    assert_eq!(server.events().len(), 1, "one online event and nothing else");
}

#[test]
fn sigterm_stops_cleanly_with_the_events_file_complete() {
    let mut server = Server::start(&[]);
    let mut senders: Vec<Sender> = (0..5)
        .map(|i| Sender::new(server.addr, &format!("dev-{i}"), Duration::from_secs(10), 1).unwrap())
        .collect();
    for sender in &mut senders {
        sender.beat(false).unwrap();
    }
    for sender in &mut senders[..2] {
        sender.leave().unwrap();
    }
    // Datagrams on loopback are queued in order, so once the summary shows
    // the leaves every transition has been handled.
    let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
    poll("the leaves", PROMPTLY, || (client.summary().unwrap().counts.leaves == 2).then_some(()));
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let events = server.events();
    assert_eq!(events.len(), 7, "{events:#?}");
    let online = events.iter().filter(|e| e["event"] == "online").count();
    let left = events.iter().filter(|e| e["event"] == "offline" && e["reason"] == "left").count();
    assert_eq!((online, left), (5, 2));
    for e in &events {
        assert!(humantime::parse_rfc3339(e["time"].as_str().unwrap()).is_ok(), "{e}");
    }
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("\"stopped\"")), "{log:#?}");
}

#[test]
fn cli_beat_and_status_work_together() {
    let server = Server::start(&["--min-ttl", "100ms"]);
    let addr = server.addr.to_string();
    let out = cli(&[
        "beat",
        "--server",
        &addr,
        "--id",
        "cli-device",
        "--interval",
        "50ms",
        "--count",
        "3",
        "--ack",
        "--payload-hex",
        "00ff",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("heartbeat seq=").count(), 3, "{text}");
    assert!(text.contains("ack seq=3"), "{text}");
    let out = cli(&["status", "--server", &addr, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["heartbeats"], 3);
    assert_eq!(summary["known"], 1);
    let out = cli(&["status", "--server", &addr, "cli-device", "--json"]);
    let device: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(device["payload_hex"], "00ff");
    let out = cli(&["status", "--server", &addr, "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("unknown"));
}

#[test]
fn list_follows_pages_across_many_devices() {
    let server = Server::start(&[]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ids: Vec<String> = (0..60).map(|i| format!("fleet-device-{i:03}")).collect();
    for id in &ids {
        let hb = frame(&Message::Heartbeat(Heartbeat {
            payload: &[0x42; wire::MAX_PAYLOAD_LEN],
            ..Heartbeat::new(id, 1, 1, 60_000)
        }));
        socket.send_to(&hb, server.addr).unwrap();
    }
    let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
    poll("all devices online", PROMPTLY, || (client.summary().unwrap().counts.online == 60).then_some(()));
    let first_page = client.list_page(None, 0, presence::wire::ListFilter::ONLINE).unwrap();
    assert!(
        first_page.next_cursor.is_some() && first_page.devices.len() < 60,
        "60 full devices need several pages"
    );
    assert_eq!(first_page.matched, first_page.devices.len() as u64);
    let listed: Vec<String> = client.list_all().unwrap().into_iter().map(|d| d.device).collect();
    assert_eq!(listed, ids);
    let out = cli(&["status", "--server", &server.addr.to_string(), "--list"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("60 online"), "{}", stdout(&out));
    let out = cli(&["status", "--server", &server.addr.to_string(), "--list", "--json"]);
    let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.len(), 60);
}

#[test]
fn dual_stack_bind_hears_ipv4_and_ipv6() {
    let server = Server::start_on("[::]:0", &["--insecure"]);
    let port = server.addr.port();
    for (server_addr, id) in [(format!("127.0.0.1:{port}"), "over-v4"), (format!("[::1]:{port}"), "over-v6")]
    {
        let mut sender = Sender::new(server_addr.parse().unwrap(), id, Duration::from_secs(10), 1).unwrap();
        let (seq, _) = sender.beat(true).unwrap();
        assert!(sender.wait_ack(seq, QUERY_TIMEOUT).unwrap().is_some(), "{id} got no ack");
        let event = server.wait_event(id, "online", None, PROMPTLY);
        // IPv4 peers are reported as IPv4, not as ::ffff:127.0.0.1.
        assert_eq!(event["address"], sender.local_addr().unwrap().to_string());
    }
}

#[test]
fn cli_mistakes_get_a_clear_message_and_a_nonzero_exit() {
    // Usage mistakes: clap's whole message, ending with the pointer to --help.
    for args in [
        &["serve", "--timeout", "soon"][..],
        &["serve", "--misses", "0"],
        &["serve", "--recv-buffer", "lots"],
        &["serve", "--bind", "nowhere"],
        &["status", "--list", "some-device"],
        &["frobnicate"],
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(err.trim_end().ends_with("For more information, try '--help'."), "{args:?}: {err}");
    }
    // Mistakes the program finds: one line.
    for args in [
        &["serve", "--min-ttl", "10s", "--max-ttl", "1s", "--bind", "127.0.0.1:0"][..],
        &["beat", "--id", ""],
        &["beat", "--id", "d", "--payload-hex", "xyz"],
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error:"), "{args:?}: {err}");
    }
}

#[test]
fn status_without_a_server_fails_clearly() {
    // A port that nobody listens on: bind one, learn it, and close it.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = cli(&["status", "--server", &format!("127.0.0.1:{port}"), "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("refused") || err.contains("no reply"), "{err}");
}
