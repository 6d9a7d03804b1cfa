//! End to end: `--mqtt` against a real Mosquitto (Debian's `mosquitto`,
//! which `tests/run` installs), started per test on a free loopback port
//! and stopped by PID: retained states, Home Assistant discovery configs,
//! the tracker's Last Will, and a broker restart.

mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{PROMPTLY, Server, poll};
use mosquitto::Mosquitto;
use presence::sink::{names, object_id};
use presence::wire::{Heartbeat, Leave, Message};

fn send(to: SocketAddr, message: &Message<'_>) {
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(&common::frame(message), to).unwrap();
}

fn state(id: &str) -> String {
    format!("presence/{}/state", names::encode(id))
}

#[test]
fn retained_states_and_discovery_configs_match_the_tracker() {
    let broker = Mosquitto::start();
    let server = Server::start(&["--mqtt", &broker.url(), "--mqtt-discovery", "homeassistant"]);
    send(server.addr, &Message::Heartbeat(Heartbeat::new("room/1", 1, 1, 60_000)));
    send(server.addr, &Message::Heartbeat(Heartbeat::new("room-2", 1, 1, 60_000)));
    send(server.addr, &Message::Leave(Leave { device: "room-2", boot: 1, seq: 2, tag: None }));
    let config_topic = format!("homeassistant/binary_sensor/{}/config", object_id("room/1"));
    let retained = poll("the states and configs on the broker", PROMPTLY, || {
        let retained = broker.retained();
        (retained.get(&state("room/1")).map(String::as_str) == Some("online")
            && retained.get(&state("room-2")).map(String::as_str) == Some("offline")
            && retained.contains_key(&config_topic))
        .then_some(retained)
    });
    assert_eq!(state("room/1"), "presence/room=2F1/state", "topic-unsafe characters are escaped");
    assert_eq!(retained["presence/status"], "online");
    let event: serde_json::Value = serde_json::from_str(&retained["presence/room-2/event"]).unwrap();
    assert_eq!((&event["event"], &event["version"]), (&"offline".into(), &2.into()));
    let config: serde_json::Value = serde_json::from_str(&retained[&config_topic]).unwrap();
    assert_eq!(config["device_class"], "connectivity");
    assert_eq!(config["payload_on"], "online");
    assert_eq!(config["payload_off"], "offline");
    assert_eq!(config["state_topic"], state("room/1"));
    assert_eq!(config["availability_topic"], "presence/status");
    assert_eq!(config["unique_id"], object_id("room/1"));
    assert_eq!(config["device"]["name"], "room/1");
    let object = config["object_id"].as_str().unwrap();
    assert!(object.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{object}");
}

#[test]
fn the_broker_says_offline_for_a_killed_tracker() {
    let broker = Mosquitto::start();
    let mut server = Server::start(&["--mqtt", &broker.url()]);
    send(server.addr, &Message::Heartbeat(Heartbeat::new("w-1", 1, 1, 60_000)));
    poll("the tracker online", PROMPTLY, || {
        let retained = broker.retained();
        (retained.get("presence/status").map(String::as_str) == Some("online")
            && retained.contains_key(&state("w-1")))
        .then_some(())
    });
    server.crash();
    // The broker notices the dead connection within 1.5 keep-alives (10 s).
    poll("the will", Duration::from_secs(30), || {
        (broker.retained().get("presence/status").map(String::as_str) == Some("offline")).then_some(())
    });
}

#[test]
fn after_a_broker_restart_the_tracker_publishes_again() {
    let mut broker = Mosquitto::start();
    let server = Server::start(&["--mqtt", &broker.url()]);
    send(server.addr, &Message::Heartbeat(Heartbeat::new("r-1", 1, 1, 60_000)));
    poll("the state on the broker", PROMPTLY, || broker.retained().contains_key(&state("r-1")).then_some(()));
    // The broker restarts with nothing retained (no persistence).
    let port = broker.port;
    broker.kill();
    let broker = Mosquitto::start_on(port);
    let retained = poll("the states again", Duration::from_secs(30), || {
        let retained = broker.retained();
        retained.contains_key(&state("r-1")).then_some(retained)
    });
    assert_eq!(retained[&state("r-1")], "online");
    assert_eq!(retained["presence/status"], "online");
    drop(server);
}

#[test]
fn a_forgotten_device_is_removed_from_the_broker_with_its_discovery_config() {
    let broker = Mosquitto::start();
    let server = Server::start(&[
        "--mqtt",
        &broker.url(),
        "--mqtt-discovery",
        "homeassistant",
        "--forget-after",
        "2s",
    ]);
    send(server.addr, &Message::Heartbeat(Heartbeat::new("f-1", 1, 1, 60_000)));
    send(server.addr, &Message::Heartbeat(Heartbeat::new("f-2", 1, 1, 60_000)));
    let config_topic = format!("homeassistant/binary_sensor/{}/config", object_id("f-1"));
    let event_topic = "presence/f-1/event".to_string();
    poll("f-1 on the broker", PROMPTLY, || {
        let retained = broker.retained();
        [&state("f-1"), &event_topic, &config_topic].iter().all(|t| retained.contains_key(*t)).then_some(())
    });
    send(server.addr, &Message::Leave(Leave { device: "f-1", boot: 1, seq: 2, tag: None }));
    // Forgotten 2 s after it left: every retained topic of it cleared
    // (an empty retained message deletes one), the other device untouched.
    let retained = poll("f-1 gone from the broker", PROMPTLY, || {
        let retained = broker.retained();
        (!retained.keys().any(|t| t.contains("f-1") || *t == config_topic)).then_some(retained)
    });
    assert_eq!(retained[&state("f-2")], "online");
    let forgotten = poll("the forgotten line", PROMPTLY, || {
        server.events().into_iter().find(|e| e["event"] == "forgotten")
    });
    assert_eq!((&forgotten["device"], &forgotten["reason"]), (&"f-1".into(), &"silent".into()));
}

#[test]
fn after_an_outage_longer_than_the_buffer_the_retained_states_converge() {
    let mut broker = Mosquitto::start();
    let server = Server::start(&["--mqtt", &broker.url(), "--sink-buffer", "2"]);
    send(server.addr, &Message::Heartbeat(Heartbeat::new("m-0", 1, 1, 60_000)));
    poll("m-0 on the broker", PROMPTLY, || broker.retained().contains_key(&state("m-0")).then_some(()));
    // The broker goes away and comes back empty; meanwhile more
    // transitions than the buffer holds.
    let port = broker.port;
    broker.kill();
    send(server.addr, &Message::Leave(Leave { device: "m-0", boot: 1, seq: 2, tag: None }));
    for i in 1..=8 {
        send(server.addr, &Message::Heartbeat(Heartbeat::new(&format!("m-{i}"), 1, 1, 60_000)));
    }
    // (The events file has the same small buffer: ask the server instead.)
    let mut client = presence::client::Client::new(server.addr, Duration::from_secs(2)).unwrap();
    poll("9 devices known", PROMPTLY, || {
        client.summary().ok().filter(|s| s.counts.known == 9 && s.counts.online == 8)
    });
    let broker = Mosquitto::start_on(port);
    let retained = poll("every device's state", Duration::from_secs(30), || {
        let retained = broker.retained();
        (0..=8).all(|i| retained.contains_key(&state(&format!("m-{i}")))).then_some(retained)
    });
    assert_eq!(retained[&state("m-0")], "offline");
    for i in 1..=8 {
        assert_eq!(retained[&state(&format!("m-{i}"))], "online", "m-{i}");
    }
}
