//! End to end: `--state` across restarts with the real binary. A clean
//! restart and a crash of a server with 1000 devices beating every second,
//! replayed heartbeats after each, bad state files, and bad paths.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{PROMPTLY, Server, cli, keygen, poll, stderr};
use presence::auth;
use presence::client::{Client, SummaryReport};
use presence::state::Snapshot;
use presence::wire::{DropReason, Heartbeat, MAX_DATAGRAM, Message};

const DEVICES: usize = 1000;

/// A signed heartbeat declaring a 60 s interval (so the device stays online through the test).
fn signed_beat(master: &auth::Key, device: &str, seq: u32) -> Vec<u8> {
    let key = auth::device_key(master, device);
    let mut buf = [0u8; MAX_DATAGRAM];
    let hb = Heartbeat::new(device, 1, seq, 60_000);
    let len = auth::encode_signed(&Message::Heartbeat(hb), &key, &mut buf).unwrap();
    buf[..len].to_vec()
}

fn summary(addr: SocketAddr) -> SummaryReport {
    Client::new(addr, Duration::from_secs(5)).unwrap().summary().unwrap()
}

/// 1000 devices sending signed heartbeats every second (interval 1 s, so a
/// TTL of 3 s), to whatever listens on `addr`, until dropped.
struct Fleet {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Every frame device 0 sent, in order.
    sent_by_first: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Fleet {
    fn start(addr: SocketAddr, master: auth::Key) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let sent_by_first = Arc::new(Mutex::new(Vec::new()));
        let (flag, first) = (Arc::clone(&stop), Arc::clone(&sent_by_first));
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let keys: Vec<(String, auth::Key)> = (0..DEVICES)
                .map(|d| format!("fleet-{d:04}"))
                .map(|id| {
                    let key = auth::device_key(&master, &id);
                    (id, key)
                })
                .collect();
            let mut buf = [0u8; MAX_DATAGRAM];
            let started = Instant::now();
            for round in 1u32.. {
                for (d, (id, key)) in keys.iter().enumerate() {
                    let hb = Heartbeat::new(id, 1, round, 1000);
                    let len = auth::encode_signed(&Message::Heartbeat(hb), key, &mut buf).unwrap();
                    // A stopped server refuses nothing: the datagram is lost, as on a network.
                    let _ = socket.send_to(&buf[..len], addr);
                    if d == 0 {
                        first.lock().unwrap().push(buf[..len].to_vec());
                    }
                }
                // The load generator's pace, not a wait for the server.
                let next = started + Duration::from_secs(u64::from(round));
                while Instant::now() < next {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Fleet { stop, thread: Some(thread), sent_by_first }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `addr` holds all the fleet online.
fn all_online(addr: SocketAddr) {
    poll("the whole fleet online", PROMPTLY, || {
        (summary(addr).counts.online == DEVICES as u64).then_some(())
    });
}

/// Waits until the server has accepted `more` heartbeats after `from`
/// (three rounds of the fleet: longer than one TTL).
fn heartbeats_after(addr: SocketAddr, from: u64, more: u64) {
    poll("more heartbeats", PROMPTLY + Duration::from_secs(5), || {
        (summary(addr).counts.heartbeats >= from + more).then_some(())
    });
}

fn events_of_kind(server: &Server, kind: &str) -> usize {
    server.events().iter().filter(|e| e["event"] == kind).count()
}

/// Sends `frames` from a fresh socket and waits until each is counted as a
/// replay; returns how many heartbeats the server accepted meanwhile from them.
fn replay(addr: SocketAddr, frames: &[Vec<u8>]) {
    let before = summary(addr).drops(DropReason::Replay);
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for frame in frames {
        attacker.send_to(frame, addr).unwrap();
    }
    let want = before + frames.len() as u64;
    poll("every replayed frame counted as a replay", PROMPTLY, || {
        let now = summary(addr).drops(DropReason::Replay);
        assert!(now <= want, "more replays than sent");
        (now == want).then_some(())
    });
}

#[test]
fn a_clean_restart_with_other_threads_loses_nothing_and_emits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, master) = keygen(dir.path());
    let state = dir.path().join("state");
    let events = dir.path().join("events.jsonl");
    let flags = ["--key-file", &key_file, "--state", state.to_str().unwrap()];
    let mut server = Server::start_at("127.0.0.1:0", &events, &flags);
    let addr = server.addr;
    let fleet = Fleet::start(addr, master);
    all_online(addr);
    poll("an online event for each device", PROMPTLY, || {
        (events_of_kind(&server, "online") == DEVICES).then_some(())
    });
    poll("three rounds of heartbeats", PROMPTLY, || {
        (fleet.sent_by_first.lock().unwrap().len() >= 3).then_some(())
    });

    // The frames to replay later: those the server has seen (a frame still
    // in the socket's queue at the stop was never seen, so it would be new).
    let captured = fleet.sent_by_first.lock().unwrap().clone();
    poll("device 0's captured frames all seen", PROMPTLY, || {
        let mut client = Client::new(addr, Duration::from_secs(5)).unwrap();
        let seen = client.device("fleet-0000").ok()??.numbers.seq;
        (seen as usize >= captured.len()).then_some(())
    });
    assert!(server.terminate().success());
    // Back with two threads: each device goes to the shard its id belongs to now.
    let server = Server::start_at(&addr.to_string(), &events, &[&flags[..], &["--threads", "2"]].concat());
    let restored = server.wait_log("state restored", PROMPTLY);
    assert_eq!(restored["fields"]["devices"], DEVICES);
    assert_eq!(restored["fields"]["online"], DEVICES);
    assert_eq!(restored["fields"]["event_seq"], DEVICES);
    assert_eq!(restored["fields"]["clean"], true);
    // Right after the restart, before any new heartbeat could arrive, every
    // device is online again; then the fleet beats on for three rounds.
    let first = summary(addr);
    assert_eq!(first.counts.online, DEVICES as u64);
    heartbeats_after(addr, first.counts.heartbeats, 3 * DEVICES as u64);
    assert_eq!(summary(addr).counts.online, DEVICES as u64);
    let all = server.events();
    assert_eq!(all.len(), DEVICES, "the restart caused events: {:?}", &all[DEVICES.min(all.len())..]);
    // Every heartbeat device 0 sent before the restart is refused after it
    // (a server without --state accepts the ones within 64 of the newest).
    assert!(captured.len() >= 3);
    replay(addr, &captured);
    drop(fleet);
}

#[test]
fn a_crash_loses_at_most_one_snapshot_period_and_no_device() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, master) = keygen(dir.path());
    let state = dir.path().join("state");
    let events = dir.path().join("events.jsonl");
    let flags = ["--key-file", &key_file, "--state", state.to_str().unwrap(), "--state-every", "2s"];
    let mut server = Server::start_at("127.0.0.1:0", &events, &flags);
    let addr = server.addr;
    let fleet = Fleet::start(addr, master);
    all_online(addr);
    // A witness device: seqs 1 and 2 before a snapshot, 3 after it.
    let witness = UdpSocket::bind("127.0.0.1:0").unwrap();
    let frames: Vec<Vec<u8>> = (1..=3).map(|seq| signed_beat(&master, "witness", seq)).collect();
    witness.send_to(&frames[0], addr).unwrap();
    witness.send_to(&frames[1], addr).unwrap();
    poll("a snapshot with the fleet and witness seq 2", PROMPTLY, || {
        let bytes = std::fs::read(&state).ok()?;
        let snapshot = Snapshot::read(&bytes).ok()?;
        let records: Vec<_> = snapshot.devices().map(Result::unwrap).collect();
        let seen = records.iter().find(|r| r.id == "witness")?;
        (seen.top == 2 && records.iter().filter(|r| r.online()).count() == DEVICES + 1).then_some(())
    });
    witness.send_to(&frames[2], addr).unwrap();
    poll("witness seq 3 accepted", PROMPTLY, || {
        let mut client = Client::new(addr, Duration::from_secs(5)).unwrap();
        (client.device("witness").unwrap()?.numbers.seq == 3).then_some(())
    });
    server.crash();

    let server = Server::start_at(&addr.to_string(), &events, &flags);
    let restored = server.wait_log("state restored", PROMPTLY);
    assert_eq!(restored["fields"]["devices"], DEVICES + 1);
    assert_eq!(restored["fields"]["clean"], false);
    assert_eq!(restored["fields"]["event_seq"], DEVICES as u64 + 1 + presence::server::state::CRASH_SEQ_GAP);
    let first = summary(addr);
    heartbeats_after(addr, first.counts.heartbeats, 3 * DEVICES as u64);
    // No offline event and no second online for devices that kept beating.
    assert_eq!(events_of_kind(&server, "offline"), 0);
    assert_eq!(events_of_kind(&server, "online"), DEVICES + 1);
    // Seqs 1 and 2 were in the snapshot: refused. Seq 3 came after the last
    // snapshot, so the restored window does not know it: accepted once.
    replay(addr, &frames[..2]);
    let before = summary(addr).counts.heartbeats;
    witness.send_to(&frames[2], addr).unwrap();
    poll("seq 3 accepted once after the crash", PROMPTLY, || {
        (summary(addr).counts.heartbeats > before).then_some(())
    });
    replay(addr, &frames[2..]);
    // The sequence jumps past whatever was numbered between the snapshot
    // and the crash: 1001 events before it, then the gap.
    let leave = presence::wire::Leave { device: "witness", boot: 1, seq: 4, tag: None };
    let mut buf = [0u8; MAX_DATAGRAM];
    let len =
        auth::encode_signed(&Message::Leave(leave), &auth::device_key(&master, "witness"), &mut buf).unwrap();
    witness.send_to(&buf[..len], addr).unwrap();
    let offline = server.wait_event("witness", "offline", Some("left"), PROMPTLY);
    assert_eq!(offline["seq"], DEVICES as u64 + 1 + presence::server::state::CRASH_SEQ_GAP + 1);
    assert_eq!(offline["version"], 2);
    drop(fleet);
}

/// Runs a server with `--state PATH` until two snapshots exist (PATH and
/// PATH.prev) holding device `kept`, then stops it cleanly.
fn write_two_snapshots(state: &Path, kept: &str) {
    let mut server = Server::start(&["--state", state.to_str().unwrap(), "--state-every", "200ms"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let frame = common::frame(&Message::Heartbeat(Heartbeat::new(kept, 1, 1, 60_000)));
    socket.send_to(&frame, server.addr).unwrap();
    poll("two snapshots holding the device", PROMPTLY, || {
        [state.to_path_buf(), presence::server::state::previous(state)]
            .iter()
            .all(|file| {
                let bytes = std::fs::read(file).unwrap_or_default();
                Snapshot::read(&bytes).is_ok_and(|s| s.devices().any(|r| r.is_ok_and(|r| r.id == kept)))
            })
            .then_some(())
    });
    assert!(server.terminate().success());
}

fn moved_aside(dir: &Path) -> Vec<PathBuf> {
    let mut bad: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().contains(".bad-"))
        .collect();
    bad.sort();
    bad
}

#[test]
fn a_truncated_state_file_falls_back_to_the_previous_one_and_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write_two_snapshots(&state, "kept-1");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();

    let server = Server::start(&["--state", state.to_str().unwrap()]);
    let bad = server.wait_log("the state file is bad; moved it aside and kept it", PROMPTLY);
    assert_eq!(bad["fields"]["file"], state.to_str().unwrap());
    assert!(bad["fields"]["error"].as_str().unwrap().starts_with("truncated"), "{bad}");
    let restored = server.wait_log("state restored", PROMPTLY);
    assert_eq!(restored["fields"]["file"], presence::server::state::previous(&state).to_str().unwrap());
    assert_eq!(restored["fields"]["devices"], 1);
    let aside = moved_aside(dir.path());
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes[..bytes.len() / 2], "kept as it was");
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    assert!(client.device("kept-1").unwrap().is_some_and(|d| d.online));
}

#[test]
fn garbage_state_files_are_moved_aside_and_the_server_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::write(&state, b"this is not a state file, it is a shopping list").unwrap();
    std::fs::write(presence::server::state::previous(&state), b"PRESENCE\x09\0\0\0 from the future").unwrap();

    let server = Server::start(&["--state", state.to_str().unwrap()]);
    let first = server.wait_log("the state file is bad; moved it aside and kept it", PROMPTLY);
    assert_eq!(first["fields"]["error"], "not a presence state file");
    let second = server.wait_log("the state file is bad; moved it aside and kept it", PROMPTLY);
    assert!(second["fields"]["error"].as_str().unwrap().contains("truncated"), "{second}");
    server.wait_log("no good state file: starting empty", PROMPTLY);
    assert_eq!(moved_aside(dir.path()).len(), 2);
    assert_eq!(summary(server.addr).counts.known, 0);
}

#[test]
fn a_state_path_that_cannot_be_written_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("state");
    let out = cli(&["serve", "--bind", "127.0.0.1:0", "--state", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let message = stderr(&out);
    assert!(message.contains("cannot write the state file"), "{message}");
    assert!(message.contains("no-such-dir"), "{message}");

    // A directory where the file should be: readable as nothing, so refused.
    let out = cli(&["serve", "--bind", "127.0.0.1:0", "--state", dir.path().to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("state file"), "{}", stderr(&out));

    let out = cli(&["serve", "--state-every", "5s"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--state <PATH>"), "{}", stderr(&out));
}

#[test]
fn a_snapshot_that_cannot_be_written_is_logged_and_retried_while_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state-dir");
    std::fs::create_dir(&state_dir).unwrap();
    let state = state_dir.join("state");
    let server = Server::start(&["--state", state.to_str().unwrap(), "--state-every", "200ms"]);
    poll("a first snapshot", PROMPTLY, || state.exists().then_some(()));
    // The directory disappears (an unmounted volume, an operator's mistake).
    std::fs::remove_dir_all(&state_dir).unwrap();
    let warning = server.wait_log("cannot write the state snapshot; will retry", PROMPTLY);
    assert_eq!(warning["level"], "WARN");
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .send_to(
            &common::frame(&Message::Heartbeat(Heartbeat::new("still-served", 1, 1, 60_000))),
            server.addr,
        )
        .unwrap();
    poll("the heartbeat served", PROMPTLY, || (summary(server.addr).counts.online == 1).then_some(()));
    assert!(summary(server.addr).snapshots_failed >= 1);
    std::fs::create_dir(&state_dir).unwrap();
    server.wait_log("state snapshots are written again", PROMPTLY);
    let bytes = std::fs::read(&state).unwrap();
    assert!(Snapshot::read(&bytes).unwrap().devices().any(|r| r.unwrap().id == "still-served"));
}
