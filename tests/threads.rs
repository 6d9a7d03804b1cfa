//! `--threads N` end to end: one device, one entry, whatever socket of the
//! SO_REUSEPORT group its datagrams land on.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::time::Duration;

use common::{PROMPTLY, Server, frame, poll};
use presence::client::Client;
use presence::wire::{DropReason, Heartbeat, Leave, Message};

const DEVICES: usize = 40;
const ROUNDS: u32 = 3;

fn heartbeat(device: &str, seq: u32) -> Vec<u8> {
    frame(&Message::Heartbeat(Heartbeat::new(device, 1, seq, 300)))
}

#[test]
fn threads_keep_one_entry_per_device_across_sockets() {
    let mut server = Server::start(&["--threads", "3", "--min-ttl", "100ms"]);
    // Many source ports, so the kernel spreads the datagrams over the group's sockets;
    // each device moves to another source port every round.
    let sources: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("thread-device-{i:02}")).collect();
    let mut last_source = BTreeMap::new();
    for round in 0..ROUNDS {
        for (i, id) in ids.iter().enumerate() {
            let source = &sources[(i + round as usize) % sources.len()];
            source.send_to(&heartbeat(id, round + 1), server.addr).unwrap();
            last_source.insert(id.clone(), source.local_addr().unwrap());
        }
    }
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    let expected = DEVICES as u64 * u64::from(ROUNDS);
    let summary = poll("every heartbeat counted", PROMPTLY, || {
        client.summary().ok().filter(|s| s.counts.heartbeats == expected)
    });
    assert_eq!(
        (summary.counts.online, summary.counts.known, summary.total_drops()),
        (DEVICES as u64, DEVICES as u64, 0)
    );

    // An old heartbeat replayed from a source port the device never used is
    // refused by the same replay window.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&heartbeat(&ids[0], 2), server.addr).unwrap();
    poll("the replay counted", PROMPTLY, || {
        client.summary().ok().filter(|s| s.drops(DropReason::Replay) == 1).map(|_| ())
    });

    // Each device has one record with every heartbeat and its latest address.
    for id in &ids {
        let report = client.device(id).unwrap().expect("known device");
        assert!(report.online, "{id}: {report:?}");
        assert_eq!(
            (report.numbers.heartbeats, report.numbers.seq, report.numbers.flaps),
            (u64::from(ROUNDS), ROUNDS, 0),
            "{id}"
        );
        assert_eq!(report.address, last_source[id], "{id}");
    }
    // The listing walks every shard and names each device once.
    let listed: Vec<String> = client.list_all().unwrap().into_iter().map(|d| d.device).collect();
    assert_eq!(listed.len(), DEVICES);
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), ids.iter().cloned().collect());

    // A quarter leave (from yet other ports); the rest fall silent and expire.
    let leavers = DEVICES / 4;
    for (i, id) in ids.iter().take(leavers).enumerate() {
        let leave = frame(&Message::Leave(Leave { device: id, boot: 1, seq: ROUNDS + 1, tag: None }));
        sources[(i + 5) % sources.len()].send_to(&leave, server.addr).unwrap();
    }
    let offline = poll("every device offline", PROMPTLY, || {
        let offline: Vec<serde_json::Value> =
            server.events().into_iter().filter(|e| e["event"] == "offline").collect();
        (offline.len() >= DEVICES).then_some(offline)
    });
    let mut seen = BTreeMap::new();
    for event in &offline {
        let device = event["device"].as_str().unwrap().to_string();
        let index = ids.iter().position(|id| *id == device).expect("a device we sent");
        let reason = if index < leavers { "left" } else { "expired" };
        assert_eq!(event["reason"], reason, "{device}");
        assert!(seen.insert(device, ()).is_none(), "one offline event per device");
    }
    let online = server.events().into_iter().filter(|e| e["event"] == "online").count();
    assert_eq!(online, DEVICES, "one online event per device");
    // Three threads, one numbering: the event seq is gap-free in file order,
    // and each device's versions go 1 (online), 2 (offline).
    let events = server.events();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    for id in &ids {
        let versions: Vec<u64> = events
            .iter()
            .filter(|e| e["device"] == id.as_str())
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2], "{id}");
    }
    let summary = client.summary().unwrap();
    assert_eq!(
        (summary.counts.online, summary.counts.leaves, summary.counts.expirations),
        (0, leavers as u64, (DEVICES - leavers) as u64)
    );

    // SIGTERM wakes and stops every thread.
    assert!(server.terminate().success());
}

#[test]
fn the_kernel_delivers_heartbeats_to_their_owners_thread() {
    let mut server = Server::start(&["--threads", "2"]);
    // The listening line says whether the kernel took the steering program.
    let steering = server.listening["fields"]["steering"] == true;
    let sources: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for i in 0..200u32 {
        let id = format!("steered-{i}");
        sources[i as usize % sources.len()].send_to(&heartbeat(&id, 1), server.addr).unwrap();
    }
    // Summaries are answered by whichever thread receives them, never handed over.
    let mut client = Client::new(server.addr, Duration::from_secs(5)).unwrap();
    poll("every heartbeat counted", PROMPTLY, || {
        client.summary().ok().filter(|s| s.counts.heartbeats == 200)
    });
    assert!(server.terminate().success());
    let mut log = Vec::new();
    let stopped = poll("the stopped line", PROMPTLY, || {
        log.extend(server.log.try_iter());
        log.iter().find(|l| l.contains("\"stopped\"")).cloned()
    });
    let stopped: serde_json::Value = serde_json::from_str(&stopped).unwrap();
    if steering {
        assert_eq!(stopped["fields"]["handed_over"], 0, "{stopped}");
    } else {
        eprintln!(
            "the kernel refused the steering program; hand-overs: {}",
            stopped["fields"]["handed_over"]
        );
    }
}

#[test]
fn zero_threads_is_refused() {
    let out = common::cli(&["serve", "--threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = common::stderr(&out);
    assert!(err.starts_with("error: invalid value '0' for '--threads <N>'"), "{err}");
    assert!(err.trim_end().ends_with("For more information, try '--help'."), "{err}");
}
