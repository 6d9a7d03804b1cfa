//! End-to-end regression tests for the hardening issue (#8): the defects
//! that lived in the server, the CLI or the files, with the real binary on
//! 127.0.0.1. Engine-side items are tested in `src/tracker/hardening_tests.rs`.

mod common;

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{PROMPTLY, Server, cli, frame, poll, stderr, stdout};
use presence::auth;
use presence::client::Client;
use presence::keyfile::KeyFile;
use presence::server::{self, Stop};
use presence::sink::JsonLines;
use presence::time::Clock;
use presence::tracker::{Config, Tracker};
use presence::wire::{Heartbeat, Message};

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

fn heartbeat(id: &str, seq: u32) -> Vec<u8> {
    frame(&Message::Heartbeat(Heartbeat::new(id, 1, seq, 60_000)))
}

/// A master key file written by the library, mode 0600.
fn master_key(dir: &Path) -> String {
    let path = dir.join("master.key");
    KeyFile::Master([9; 32]).write_new(&path).unwrap();
    path.to_str().unwrap().to_string()
}

/// Item 6: a failing events destination is counted; serving goes on.
#[test]
fn item6_a_full_disk_or_a_gone_reader_does_not_stop_the_server() {
    for events in ["/dev/full", "-"] {
        let mut server = Server::start_with_events(events, &[]);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..5 {
            socket.send_to(&heartbeat(&format!("lost-{i}"), 1), server.addr).unwrap();
        }
        let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
        let summary = poll("the lost events counted", PROMPTLY, || {
            client.summary().ok().filter(|s| s.counts.online == 5 && s.events_lost == 5)
        });
        assert_eq!(summary.counts.heartbeats, 5, "{events}");
        // Still serving: more heartbeats, more lost lines, and status shows them.
        socket.send_to(&heartbeat("later", 1), server.addr).unwrap();
        poll("still serving", PROMPTLY, || client.summary().ok().filter(|s| s.events_lost == 6));
        let out = cli(&["status", "--server", &server.addr.to_string()]);
        assert!(stdout(&out).contains("events      6 lost"), "{}", stdout(&out));
        let status = server.terminate();
        assert!(status.success(), "{events}: exit {status:?}");
        let log: Vec<String> = server.log.try_iter().collect();
        assert!(log.iter().any(|l| l.contains("events not written")), "{events}: {log:#?}");
    }
}

/// Item 7: a second server on a taken port fails to start, for any `--threads`.
#[test]
fn item7_a_second_server_on_a_taken_port_fails_to_start() {
    for (first, second) in [("2", "2"), ("2", "1"), ("1", "2"), ("3", "2")] {
        let server = Server::start(&["--threads", first]);
        let out = cli(&["serve", "--bind", &server.addr.to_string(), "--threads", second]);
        assert_eq!(out.status.code(), Some(2), "--threads {first} then {second}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("cannot listen on") && err.contains("in use"), "{err}");
    }
}

/// Item 9: transitions go to the events file; the log gets a summary, not a line each.
#[test]
fn item9_transitions_are_not_logged_one_line_each() {
    let mut server = Server::start(&[]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200 {
        socket.send_to(&heartbeat(&format!("quiet-{i:03}"), 1), server.addr).unwrap();
    }
    poll("200 online events", PROMPTLY, || (server.events().len() == 200).then_some(()));
    assert!(server.terminate().success());
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(log.iter().all(|l| !l.contains("quiet-")), "a device id reached the log: {log:#?}");
    assert!(log.len() < 10, "{} log lines for 200 transitions: {log:#?}", log.len());
}

/// Item 10: devices already past their deadline when the server stops get
/// their offline events before it exits (after a stall, say).
#[test]
fn item10_devices_past_their_deadline_go_offline_before_the_server_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    // Engine time zero was 10 s ago.
    let ten_seconds_ago =
        Instant::now().checked_sub(Duration::from_secs(10)).expect("a clock 10 s past its origin");
    let clock = Clock::from_origin(ten_seconds_ago);
    let start = presence::time::Instant::ZERO;
    let mut tracker = Tracker::new(Config::default(), start, SystemTime::now()).unwrap();
    let mut reply = [0u8; 1200];
    // A heartbeat 10 s ago with a 3 s TTL: due 7 s ago, and the loop has not run since.
    let beat = frame(&Message::Heartbeat(Heartbeat::new("stalled", 1, 1, 1000)));
    tracker.handle(start, "127.0.0.1:9".parse().unwrap(), &beat, &mut reply);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stop = Stop::new();
    stop.stop();
    let events = JsonLines::to_file(&path).unwrap();
    let tracker = server::run(&socket, tracker, clock, &stop, vec![Box::new(events)]).unwrap();
    let lines = std::fs::read_to_string(&path).unwrap();
    let events: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 2, "{lines}");
    assert_eq!(
        (events[1]["event"].as_str(), events[1]["reason"].as_str()),
        (Some("offline"), Some("expired"))
    );
    assert_eq!(tracker.counters().expirations(), 1);
}

/// Item 10: TTLs under 1 ms or over 32-bit milliseconds are refused.
#[test]
fn item10_ttl_flags_are_refused_outside_1ms_to_49_days() {
    for (flag, value, hint) in [
        ("--timeout", "500us", "shorter than 1ms"),
        ("--min-ttl", "0.5ms", "shorter than 1ms"),
        ("--max-ttl", "50days", "32-bit milliseconds"),
        ("--timeout", "60days", "32-bit milliseconds"),
    ] {
        let out = cli(&["serve", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(stderr(&out).contains(hint), "{flag} {value}: {}", stderr(&out));
    }
}

/// Item 10: key files open to others, bare keys, missing files and wrong kinds.
#[test]
fn item10_key_file_mistakes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let master = master_key(dir.path());
    // Readable by others: refused, with the fix.
    std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cli(&["serve", "--key-file", &master]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(&format!("chmod 600 {master}")), "{}", stderr(&out));
    std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A bare key says nothing of its kind: refused everywhere.
    let bare = dir.path().join("bare.key");
    std::fs::write(&bare, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&bare, std::fs::Permissions::from_mode(0o600)).unwrap();
    for args in
        [&["serve", "--key-file"][..], &["status", "--key-file"], &["derive-key", "--operator", "--key-file"]]
    {
        let mut args = args.to_vec();
        args.push(bare.to_str().unwrap());
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("kind is missing"), "{args:?}: {}", stderr(&out));
    }
    // A missing file: the OS error once.
    let out = cli(&["serve", "--key-file", "/nonexistent/master.key"]);
    let err = stderr(&out);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // Kinds with their article.
    let operator = dir.path().join("operator.key");
    KeyFile::Operator(auth::operator_key(&[9; 32])).write_new(&operator).unwrap();
    let out = cli(&["beat", "--id", "d", "--count", "1", "--key-file", operator.to_str().unwrap()]);
    assert!(stderr(&out).contains("not an operator key"), "{}", stderr(&out));
    // keygen into a directory that does not exist yet.
    let nested = dir.path().join("etc/presence/master.key");
    let out = cli(&["keygen", "--out", nested.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Item 2: `--auth optional` on a non-loopback address needs `--insecure`.
#[test]
fn item2_optional_auth_on_a_public_address_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let master = master_key(dir.path());
    let out = cli(&["serve", "--bind", "0.0.0.0:0", "--key-file", &master, "--auth", "optional"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--auth optional"), "{}", stderr(&out));
    let server = Server::start_on("0.0.0.0:0", &["--key-file", &master, "--auth", "optional", "--insecure"]);
    assert_eq!(server.listening["fields"]["auth"], "optional");
}
