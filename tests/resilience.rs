//! End to end with the real binary: a blackout held and recovered, kernel
//! drops, suspect devices, flapping devices.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{PROMPTLY, Server, cli, poll, stdout};
use presence::client::Client;
use presence::wire::{Heartbeat, Leave, MAX_DATAGRAM, Message};

fn heartbeat(device: &str, seq: u32, interval_ms: u32) -> Vec<u8> {
    common::frame(&Message::Heartbeat(Heartbeat::new(device, 1, seq, interval_ms)))
}

fn events_named<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

/// `count` devices beating every second (TTL 3 s) until dropped. While
/// `paused` is set nobody sends (a blackout); the devices from `doomed` on
/// never send again once a pause has begun.
struct Fleet {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Fleet {
    fn start(addr: SocketAddr, count: usize, doomed: usize) -> Fleet {
        let (stop, paused, rounds) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (flag, pause, done) = (Arc::clone(&stop), Arc::clone(&paused), Arc::clone(&rounds));
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut was_paused = false;
            let started = Instant::now();
            for round in 1u32.. {
                let now_paused = pause.load(Ordering::Relaxed);
                was_paused |= now_paused;
                if !now_paused {
                    let alive = if was_paused { doomed } else { count };
                    for d in 0..alive {
                        let _ = socket.send_to(&heartbeat(&format!("dev-{d:04}"), round, 1000), addr);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
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
        Fleet { stop, paused, rounds, thread: Some(thread) }
    }

    fn wait_rounds(&self, more: usize) {
        let target = self.rounds.load(Ordering::Relaxed) + more;
        poll("rounds of heartbeats", PROMPTLY, || {
            (self.rounds.load(Ordering::Relaxed) >= target).then_some(())
        });
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

#[test]
fn a_blackout_is_held_and_recovers_by_itself() {
    let server = Server::start(&[]);
    // 1000 devices; after the blackout only 900 come back.
    let fleet = Fleet::start(server.addr, 1000, 900);
    poll("the fleet online", PROMPTLY, || (server.events().len() == 1000).then_some(()));
    fleet.wait_rounds(4);
    // The blackout: nothing for 3 TTLs (9 s).
    fleet.paused.store(true, Ordering::Relaxed);
    let paused_at = Instant::now();
    let degraded = poll("the degraded event", PROMPTLY, || {
        server.events().into_iter().find(|e| e["event"] == "degraded")
    });
    assert_eq!(degraded["reason"], "late_devices");
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    poll("devices held", PROMPTLY, || {
        let summary = client.summary().unwrap();
        (summary.counts.held == 1000 && summary.counts.degraded == 1).then_some(())
    });
    let status = cli(&["status", "--server", &server.addr.to_string()]);
    assert!(stdout(&status).contains("degraded"), "{}", stdout(&status));
    let held = cli(&["status", "--server", &server.addr.to_string(), "dev-0042"]);
    assert!(stdout(&held).starts_with("dev-0042  suspect (held"), "{}", stdout(&held));
    // The scenario: the blackout lasts 9 s in all (the load generator's
    // pause, not a wait for the server).
    std::thread::sleep(Duration::from_secs(9).saturating_sub(paused_at.elapsed()));
    fleet.paused.store(false, Ordering::Relaxed);
    let recovered = poll("the recovered event", Duration::from_secs(30), || {
        server.events().into_iter().find(|e| e["event"] == "recovered")
    });
    assert_eq!(recovered["reason"], "heartbeats_normal");
    assert_eq!(recovered["released"], 100);
    let events = server.events();
    assert_eq!(events_named(&events, "degraded").len(), 1);
    assert_eq!(events_named(&events, "recovered").len(), 1);
    assert_eq!(degraded["online"], 1000);
    // The 100 that never came back went offline after recovery, with how
    // long they were held; nobody else went offline or came online again.
    let offline = events_named(&events, "offline");
    assert_eq!(offline.len(), 100);
    for event in &offline {
        let n: usize = event["device"].as_str().unwrap()[4..].parse().unwrap();
        assert!(n >= 900, "{event}");
        assert_eq!(event["reason"], "expired");
        assert!(event["held_ms"].as_u64().unwrap() > 0, "{event}");
        assert!(event["seq"].as_u64() > recovered["seq"].as_u64().map(|s| s - 101), "{event}");
    }
    assert_eq!(events_named(&events, "online").len(), 1000);
    drop(fleet);
}

#[test]
fn without_self_preservation_a_blackout_takes_the_fleet_offline() {
    let server = Server::start(&["--self-preservation", "off"]);
    let fleet = Fleet::start(server.addr, 100, 100);
    poll("the fleet online", PROMPTLY, || (server.events().len() == 100).then_some(()));
    fleet.wait_rounds(2);
    fleet.paused.store(true, Ordering::Relaxed);
    poll("the fleet offline", PROMPTLY, || {
        (events_named(&server.events(), "offline").len() == 100).then_some(())
    });
    assert!(events_named(&server.events(), "degraded").is_empty());
}

#[test]
fn kernel_drops_make_the_server_suspect_its_own_network() {
    // A tiny receive buffer, a stopped server and a burst: the kernel drops.
    let mut server = Server::start(&["--recv-buffer", "4KiB", "--degraded-min-online", "1"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&heartbeat("first", 1, 60_000), server.addr).unwrap();
    server.wait_event("first", "online", None, PROMPTLY);
    let pid = server.child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child with valid signal numbers.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    for n in 0..2000u32 {
        let _ = socket.send_to(&heartbeat(&format!("burst-{n}"), 1, 60_000), server.addr);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // Datagrams after the drops carry the kernel's count.
    let mut seq = 1;
    let degraded = poll("a degraded event for kernel drops", PROMPTLY, || {
        seq += 1;
        socket.send_to(&heartbeat("first", seq, 60_000), server.addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        server.events().into_iter().find(|e| e["event"] == "degraded")
    });
    assert_eq!(degraded["reason"], "kernel_drops");
    assert!(server.terminate().success());
}

#[test]
fn a_late_device_is_suspect_and_suspect_events_say_so() {
    let server = Server::start(&["--suspect-events"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Interval 1 s: late (suspect) after 2 s of silence, offline after 3 s.
    socket.send_to(&heartbeat("slow", 1, 1000), server.addr).unwrap();
    let suspect = server.wait_event("slow", "suspect", Some("late"), PROMPTLY);
    assert_eq!(suspect["version"], 2);
    let status = cli(&["status", "--server", &server.addr.to_string(), "slow"]);
    assert!(stdout(&status).starts_with("slow  suspect (late"), "{}", stdout(&status));
    let json = cli(&["status", "--server", &server.addr.to_string(), "slow", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(
        (&report["state"], &report["online"], &report["version"]),
        (&"suspect".into(), &true.into(), &2.into())
    );
    socket.send_to(&heartbeat("slow", 2, 1000), server.addr).unwrap();
    let back = poll("the online back from suspect", PROMPTLY, || {
        server.events().into_iter().find(|e| e["event"] == "online" && e["from"] == "suspect")
    });
    assert_eq!(back["version"], 3);
    let offline = server.wait_event("slow", "offline", Some("expired"), PROMPTLY);
    assert_eq!(offline["version"], 5, "suspect (4) first, then offline (5)");
}

#[test]
fn a_flapping_device_is_damped_then_stable() {
    let server = Server::start(&["--flap-changes", "3", "--flap-window", "2s"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut seq = 0;
    let mut send = |message: &dyn Fn(u32) -> Message<'static>| {
        seq += 1;
        let len = presence::wire::encode(&message(seq), &mut buf).unwrap();
        socket.send_to(&buf[..len], server.addr).unwrap();
    };
    // Online, then six changes in quick succession.
    for _ in 0..4 {
        send(&|seq| Message::Heartbeat(Heartbeat::new("flappy", 1, seq, 60_000)));
        send(&|seq| Message::Leave(Leave { device: "flappy", boot: 1, seq, tag: None }));
    }
    send(&|seq| Message::Heartbeat(Heartbeat::new("flappy", 1, seq, 60_000)));
    let flapping = server.wait_event("flappy", "flapping", None, PROMPTLY);
    assert_eq!(flapping["version"], 5);
    let status = cli(&["status", "--server", &server.addr.to_string(), "flappy"]);
    assert!(stdout(&status).contains("flap score 4"), "{}", stdout(&status));
    // Two seconds without a change: stable, online, at the next version.
    let stable = server.wait_event("flappy", "stable", None, PROMPTLY);
    assert_eq!((&stable["state"], &stable["version"]), (&"online".into(), &6.into()));
    let kinds: Vec<String> =
        server.events().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["online", "offline", "online", "offline", "flapping", "stable"]);
}
