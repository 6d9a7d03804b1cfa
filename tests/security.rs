//! End-to-end security: keys, signed heartbeats, replays and refusals, with
//! the real binary on 127.0.0.1.

mod common;

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{PROMPTLY, Server, cli, keygen, poll, stderr, stdout};
use presence::auth;
use presence::client::{Client, ClientError, Sender};
use presence::keyfile::{KeyFile, parse_hex_key};

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn keygen_writes_a_private_key_once_and_derive_key_matches_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let (path, master) = keygen(dir.path());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let again = cli(&["keygen", "--out", &path]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("refusing to overwrite"), "{}", stderr(&again));
    assert_eq!(KeyFile::read(Path::new(&path)).unwrap(), KeyFile::Master(master), "unchanged");

    let out = cli(&["derive-key", "--key-file", &path, "--id", "boiler-7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(parse_hex_key(stdout(&out).trim()).unwrap(), auth::device_key(&master, "boiler-7"));
    let out = cli(&["derive-key", "--key-file", &path, "--operator"]);
    assert_eq!(parse_hex_key(stdout(&out).trim()).unwrap(), auth::operator_key(&master));
    let out = cli(&["derive-key", "--key-file", &path, "--http-token"]);
    assert_eq!(parse_hex_key(stdout(&out).trim()).unwrap(), auth::http_token(&auth::operator_key(&master)));
}

#[test]
fn signed_beats_work_and_unsigned_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, master) = keygen(dir.path());
    let server = Server::start(&["--key-file", &key_file, "--min-ttl", "100ms"]);
    let addr = server.addr.to_string();
    let device_key = cli(&["derive-key", "--key-file", &key_file, "--id", "signed-1"]);
    let key_hex = stdout(&device_key).trim().to_string();

    let out = cli(&[
        "beat",
        "--server",
        &addr,
        "--id",
        "signed-1",
        "--key-hex",
        &key_hex,
        "--interval",
        "50ms",
        "--count",
        "2",
        "--ack",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ack seq=2"), "{}", stdout(&out));

    // The same device without a signature: no ack, and the beat command says so.
    let out = cli(&[
        "beat",
        "--server",
        &addr,
        "--id",
        "unsigned-1",
        "--interval",
        "50ms",
        "--count",
        "1",
        "--ack",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));

    // A device key file written by derive-key works too.
    let device_file = dir.path().join("signed-2.key");
    let out = cli(&[
        "derive-key",
        "--key-file",
        &key_file,
        "--id",
        "signed-2",
        "--out",
        device_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&[
        "beat",
        "--server",
        &addr,
        "--id",
        "signed-2",
        "--key-file",
        device_file.to_str().unwrap(),
        "--interval",
        "50ms",
        "--count",
        "1",
        "--ack",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = cli(&["status", "--server", &addr, "--json", "--key-file", &key_file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["heartbeats"], 3);
    assert_eq!(summary["drops"]["missing_tag"], 1);
    let mut client =
        Client::new(server.addr, QUERY_TIMEOUT).unwrap().with_operator_key(auth::operator_key(&master));
    assert!(client.device("unsigned-1").unwrap().is_none(), "the unsigned device was never admitted");
    // The rejection was logged at warn, as a count by reason.
    let warning = poll("a warning about the rejection", PROMPTLY, || {
        server.log.try_iter().find(|line| line.contains("\"WARN\"") && line.contains("missing_tag=1"))
    });
    assert!(warning.contains("datagrams dropped or rejected"), "{warning}");
}

#[test]
fn a_replayed_heartbeat_does_not_delay_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, master) = keygen(dir.path());
    let server = Server::start(&["--key-file", &key_file, "--min-ttl", "100ms"]);
    let ttl = Duration::from_millis(600); // 200 ms × 3
    let mut sender = Sender::new(server.addr, "victim", Duration::from_millis(200), 1)
        .unwrap()
        .with_key(auth::device_key(&master, "victim"));
    sender.beat(false).unwrap();
    server.wait_event("victim", "online", None, PROMPTLY);
    // An attacker captures the last heartbeat on the wire...
    let captured = sender.next_frame(false).unwrap();
    let last_beat = Instant::now();
    sender.beat(false).unwrap();
    // ...and replays it every 50 ms, trying to keep the silent device alive.
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut replays = 0u64;
    let offline = poll("the victim to expire despite replays", ttl + Duration::from_secs(5), || {
        attacker.send_to(&captured, server.addr).unwrap();
        replays += 1;
        std::thread::sleep(Duration::from_millis(45));
        server.events().into_iter().find(|e| e["device"] == "victim" && e["event"] == "offline")
    });
    let seen = last_beat.elapsed();
    assert_eq!(offline["reason"], "expired");
    assert!(seen >= ttl, "expired after {seen:?}, before its deadline");
    assert!(seen <= ttl + Duration::from_secs(1), "expiry delayed to {seen:?} by {replays} replays");
    let mut client =
        Client::new(server.addr, QUERY_TIMEOUT).unwrap().with_operator_key(auth::operator_key(&master));
    let summary = client.summary().unwrap();
    assert!(summary.drops(presence::wire::DropReason::Replay) >= 1, "{summary:?}");
    assert_eq!(summary.counts.heartbeats, 2);
}

#[test]
fn queries_from_outside_the_allow_list_need_the_operator_key() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, master) = keygen(dir.path());
    // Nobody may query unauthenticated, not even loopback.
    let server = Server::start(&["--key-file", &key_file, "--query-allow", "none"]);
    let addr = server.addr.to_string();
    let out = cli(&["status", "--server", &addr, "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("refused the query"), "{}", stderr(&out));
    let mut client = Client::new(server.addr, QUERY_TIMEOUT).unwrap();
    assert!(matches!(client.summary(), Err(ClientError::NotAllowed)));
    let out = cli(&["status", "--server", &addr, "--list", "--key-file", &key_file]);
    assert!(out.status.success(), "{}", stderr(&out));
    // An operator key file works as well as the master.
    let operator_file = dir.path().join("operator.key");
    KeyFile::Operator(auth::operator_key(&master)).write_new(&operator_file).unwrap();
    let out = cli(&["status", "--server", &addr, "--key-file", operator_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("not_allowed 2"), "{}", stdout(&out));
}

#[test]
fn a_public_bind_without_a_key_is_refused_unless_insecure() {
    let out = cli(&["serve", "--bind", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("refusing to listen on 0.0.0.0:0 without authentication"), "{err}");
    let out = cli(&["serve", "--auth", "required"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("needs --key-file"), "{}", stderr(&out));
    // With --insecure it starts (and is stopped by the harness).
    let server = Server::start_on("0.0.0.0:0", &["--insecure"]);
    assert_ne!(server.addr.port(), 0);
}
