//! End-to-end tests of the CLI as a newcomer meets it (issue 9): whole error
//! messages, help, secrets, broken pipes, and what `beat` and `status` say.

mod common;

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, PROMPTLY, Server, cli, poll, stderr, stdout};
use presence::client::Client;
use presence::wire::{Heartbeat, Leave, Message};

#[test]
fn errors_keep_clap_s_tips_and_the_missing_arguments() {
    let out = cli(&["beat", "--count", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("the following required arguments were not provided"), "{err}");
    assert!(err.contains("--id <ID>"), "the useful half is kept: {err}");
    let out = cli(&["beat", "--id", "d", "--intervall", "5s"]);
    let err = stderr(&out);
    assert!(err.contains("tip: a similar argument exists: '--interval'"), "{err}");
    assert!(err.trim_end().ends_with("For more information, try '--help'."), "{err}");
}

#[test]
fn bare_presence_shows_help() {
    let out = cli(&[]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out) + &stdout(&out);
    for part in ["Usage: presence", "serve", "beat", "status", "keygen", "Examples:"] {
        assert!(text.contains(part), "{part}: {text}");
    }
}

#[test]
fn help_hides_secret_values_and_uses_the_readme_s_placeholders() {
    let secret = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let out = Command::new(BIN).args(["beat", "--help"]).env("PRESENCE_DEVICE_KEY", secret).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!help.contains(secret) && !help.contains("0011223344"), "{help}");
    assert!(help.contains("PRESENCE_DEVICE_KEY"), "the variable is named, its value is not: {help}");
    assert!(help.contains("--server <ADDR>") && help.contains("--interval <DUR>"), "{help}");
    assert!(help.contains("PRESENCE_ID") && help.contains("PRESENCE_INTERVAL"), "{help}");
    let status =
        String::from_utf8_lossy(&Command::new(BIN).args(["status", "--help"]).output().unwrap().stdout)
            .into_owned();
    assert!(status.contains("PRESENCE_REPLY_TIMEOUT") && status.contains("not the device TTL"), "{status}");
    let serve =
        String::from_utf8_lossy(&Command::new(BIN).args(["serve", "--help"]).output().unwrap().stdout)
            .into_owned();
    assert!(serve.contains("Device TTL"), "{serve}");
    assert_eq!(serve.matches("--log-format").count(), 1, "{serve}");
}

#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    // `presence beat ... | head -1`
    let mut beat = Command::new(BIN)
        .args(["beat", "--server", &addr, "--id", "piped", "--interval", "50ms", "--count", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(beat.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("beating as 'piped'"), "{first}");
    let out = beat.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked") && !stderr(&out).contains("Broken pipe"), "{}", stderr(&out));
    // `presence status --list | head -1`, with enough devices for several pages.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..300 {
        socket.send_to(&common::frame(&heartbeat(&format!("many-{i:03}"), 1)), server.addr).unwrap();
    }
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    poll("300 online", PROMPTLY, || client.summary().ok().filter(|s| s.counts.online >= 300));
    let mut status = Command::new(BIN)
        .args(["status", "--server", &addr, "--list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(status.stdout.take());
    let out = status.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "nothing on stderr");
}

fn heartbeat(id: &str, seq: u32) -> Message<'_> {
    Message::Heartbeat(Heartbeat::new(id, 1, seq, 60_000))
}

#[test]
fn two_beat_runs_in_the_same_second_are_both_accepted() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let state = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["beat", "--server", &addr, "--id", "twice", "--count", "1", "--ack"])
            .env("PRESENCE_STATE_DIR", state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("ack seq=1"), "{}", stdout(&out));
    }
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    let summary = client.summary().unwrap();
    assert_eq!((summary.counts.heartbeats, summary.total_drops()), (2, 0));
}

#[test]
fn unacknowledged_heartbeats_say_why_and_where_to_look() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    presence::keyfile::KeyFile::Master([3; 32]).write_new(&key).unwrap();
    let server = Server::start(&["--key-file", key.to_str().unwrap()]);
    let addr = server.addr.to_string();
    let out =
        cli(&["beat", "--server", &addr, "--id", "unsigned", "--count", "1", "--ack", "--interval", "200ms"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("unsigned heartbeats") && err.contains("--key-file"), "{err}");
    assert!(err.contains(&format!("presence status --server {addr}")), "{err}");
    // Without --ack, it says how to find out.
    let out = cli(&["beat", "--server", &addr, "--id", "unsigned", "--count", "1", "--interval", "200ms"]);
    assert!(stdout(&out).contains("add --ack"), "{}", stdout(&out));
}

#[test]
fn a_ttl_shorter_than_the_interval_is_a_loud_warning() {
    let server = Server::start(&["--max-ttl", "1s"]);
    let out = cli(&[
        "beat",
        "--server",
        &server.addr.to_string(),
        "--id",
        "slow",
        "--interval",
        "2h",
        "--count",
        "1",
        "--ack",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("WARNING") && err.contains("go offline between heartbeats") && err.contains("--max-ttl"),
        "{err}"
    );
}

#[test]
fn status_speaks_plainly() {
    let server = Server::start(&["--min-ttl", "100ms"]);
    let addr = server.addr.to_string();
    // "1 query", not "1 queries".
    let out = cli(&["status", "--server", &addr]);
    assert!(stdout(&out).contains("0 heartbeats, 0 leaves, 1 query"), "{}", stdout(&out));
    // Unknown devices have the known shape in JSON.
    let known = |id: &str| {
        let out = cli(&["status", "--server", &addr, id, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&common::frame(&heartbeat("shape", 1)), server.addr).unwrap();
    let seen = poll("the device", PROMPTLY, || Some(known("shape")).filter(|v| v["known"] == true));
    let unknown = known("nobody");
    assert_eq!(unknown["known"], false);
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&unknown), keys(&seen));
    // The list shows human durations.
    let list = stdout(&cli(&["status", "--server", &addr, "--list"]));
    assert!(list.contains("in 2m") || list.contains("in 3m"), "expires in about 3 minutes: {list}");
    // An offline device says since when and why.
    let leave = Message::Leave(Leave { device: "shape", boot: 1, seq: 2, tag: None });
    socket.send_to(&common::frame(&leave), server.addr).unwrap();
    let fast = Message::Heartbeat(Heartbeat::new("fast", 1, 1, 50));
    socket.send_to(&common::frame(&fast), server.addr).unwrap();
    server.wait_event("fast", "offline", Some("expired"), PROMPTLY);
    server.wait_event("shape", "offline", Some("left"), PROMPTLY);
    let left = stdout(&cli(&["status", "--server", &addr, "shape"]));
    assert!(left.starts_with("shape  offline (left"), "{left}");
    let expired = stdout(&cli(&["status", "--server", &addr, "fast"]));
    assert!(
        expired.starts_with("fast  offline since ") && expired.contains("(expired: no heartbeat for 150ms)"),
        "{expired}"
    );
    assert_eq!(known("fast")["offline_reason"], "expired");
}

#[test]
fn a_capped_receive_buffer_is_logged_as_granted_with_the_fix() {
    let rmem_max: usize =
        std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    let asked = (2 * rmem_max).min(i32::MAX as usize / 2);
    assert!(asked > rmem_max, "rmem_max {rmem_max} is too large to test the cap");
    let server = Server::start(&["--recv-buffer", &asked.to_string()]);
    assert_eq!(server.listening["fields"]["recv_buffer"], rmem_max, "the real size, not the doubled one");
    let warning = server.startup.iter().find(|l| l.contains("capped the receive buffer")).expect("a warning");
    assert!(warning.contains("sysctl -w net.core.rmem_max="), "{warning}");
}

#[test]
fn the_drop_warning_names_an_example_source_and_device() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    presence::keyfile::KeyFile::Master([3; 32]).write_new(&key).unwrap();
    let server = Server::start(&["--key-file", key.to_str().unwrap()]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&common::frame(&heartbeat("who-is-it", 1)), server.addr).unwrap();
    let warning = poll("the drop warning", PROMPTLY, || {
        server.log.try_iter().find(|line| line.contains("datagrams dropped or rejected"))
    });
    let expected = format!("missing_tag: from {} device 'who-is-it'", socket.local_addr().unwrap());
    assert!(warning.contains(&expected), "{warning}");
}

/// The examples are built by `cargo test`; they sit next to the test binaries.
fn example(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    deps.parent().unwrap().join("examples").join(name)
}

#[test]
fn the_fleet_example_reports_what_the_server_counted() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    presence::keyfile::KeyFile::Master([3; 32]).write_new(&key).unwrap();
    let server = Server::start(&["--key-file", key.to_str().unwrap()]);
    let addr = server.addr.to_string();
    let fleet = |extra: &[&str]| {
        let out = Command::new(example("fleet"))
            .args(["--server", &addr, "--devices", "20", "--interval", "200ms", "--duration", "200ms"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let unsigned = fleet(&[]);
    assert!(
        unsigned.contains("the server accepted 0 of them") && unsigned.contains("missing_tag 20"),
        "{unsigned}"
    );
    let signed = fleet(&["--key-file", key.to_str().unwrap()]);
    assert!(signed.contains("the server accepted 20 of them; dropped meanwhile: none"), "{signed}");
}

#[test]
fn the_device_example_explains_a_missing_ack_and_speaks_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    presence::keyfile::KeyFile::Master([3; 32]).write_new(&key).unwrap();
    let server = Server::start_on("[::1]:0", &["--key-file", key.to_str().unwrap()]);
    let out =
        Command::new(example("device")).args([&server.addr.to_string(), "dev-6", "1"]).output().unwrap();
    assert!(out.status.success(), "an IPv6 server address works: {}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("no ack") && text.contains("signed heartbeats") && text.contains("presence status"),
        "{text}"
    );
    let device_key = presence::keyfile::to_hex(&presence::auth::device_key(&[3; 32], "dev-6"));
    let out = Command::new(example("device"))
        .args([&server.addr.to_string(), "dev-6", "1", &device_key])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("server: beat every 1000 ms"), "{}", stdout(&out));
}

#[test]
fn status_lists_offline_all_by_prefix_and_counts() {
    let server = Server::start(&[]);
    let addr = server.addr.to_string();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..5 {
        socket.send_to(&common::frame(&heartbeat(&format!("boiler-{i}"), 1)), server.addr).unwrap();
        socket.send_to(&common::frame(&heartbeat(&format!("sensor-{i}"), 1)), server.addr).unwrap();
    }
    for i in 0..2 {
        let id = format!("boiler-{i}");
        let leave = Message::Leave(Leave { device: &id, boot: 1, seq: 2, tag: None });
        socket.send_to(&common::frame(&leave), server.addr).unwrap();
    }
    server.wait_event("boiler-1", "offline", Some("left"), PROMPTLY);
    let run = |args: &[&str]| {
        let mut all = vec!["status", "--server", &addr];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert!(run(&["--list"]).ends_with("8 online\n"));
    let offline = run(&["--offline"]);
    assert!(
        offline.contains("boiler-0") && offline.contains("boiler-1") && offline.ends_with("2 offline\n"),
        "{offline}"
    );
    assert!(run(&["--all"]).ends_with("10 known\n"));
    let sensors = run(&["--list", "--prefix", "sensor-"]);
    assert!(sensors.ends_with("5 online\n") && !sensors.contains("boiler"), "{sensors}");
    assert_eq!(run(&["--count"]), "8\n");
    assert_eq!(run(&["--count", "--offline"]), "2\n");
    assert_eq!(run(&["--count", "--all", "--prefix", "boiler"]), "5\n");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--count", "--prefix", "boiler", "--json"])).unwrap();
    assert_eq!(json["count"], 3);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&run(&["--offline", "--json"])).unwrap();
    assert!(listed.iter().all(|d| d["online"] == false && d["offline_reason"] == "left"));
    // A device and a listing do not mix.
    let out = cli(&["status", "--server", &addr, "boiler-3", "--offline"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_long_listing_shows_its_progress_on_stderr() {
    // A rate limit of 2 pages a second makes a 3-page listing take about 3 s
    // (each refused page is resent after a third of --timeout).
    let server = Server::start(&["--query-rate", "2", "--query-burst", "1"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..60 {
        socket.send_to(&common::frame(&heartbeat(&format!("progress-{i:02}"), 1)), server.addr).unwrap();
    }
    server.wait_event("progress-59", "online", None, PROMPTLY);
    let out = cli(&["status", "--server", &server.addr.to_string(), "--list", "--timeout", "4500ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("60 online\n"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("devices so far"), "{err}");
    assert!(err.lines().last().unwrap_or_default().starts_with("listing: 60 devices in "), "{err}");
}
