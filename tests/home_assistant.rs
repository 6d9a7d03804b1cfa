//! End to end against a real Home Assistant: `--mqtt-discovery
//! homeassistant` with Mosquitto between them, as a user runs it. Home
//! Assistant (PyPI `homeassistant` on Python 3.13, which `tests/run`
//! installs into `target/test-servers/ha-venv`) starts per test in a fresh
//! config directory, with the MQTT integration pointed at the test's broker
//! and `mqtt_statestream` publishing every binary_sensor's state and
//! attributes back to the broker (under `hastate/`), so the test reads what
//! Home Assistant itself believes, not what the tracker published; entity
//! removal is read from the entity registry it saves.

mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use mosquitto::Mosquitto;
use presence::sink::object_id;
use presence::wire::{Heartbeat, Leave, Message};

/// Home Assistant's first start imports a few hundred modules.
const HA_START: Duration = Duration::from_secs(120);

/// A Home Assistant process with its own config directory, killed on drop.
struct HomeAssistant {
    child: Child,
    dir: tempfile::TempDir,
}

impl HomeAssistant {
    fn binary() -> PathBuf {
        let hass = std::env::var_os("PRESENCE_TEST_HASS").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-servers/ha-venv/bin/hass")
        });
        assert!(
            hass.exists(),
            "Home Assistant is not installed at {}: run the tests with tests/run, which installs it \
             (PyPI homeassistant on Python 3.13)",
            hass.display()
        );
        hass
    }

    /// Starts Home Assistant with the MQTT integration on `broker`.
    fn start(broker: &Mosquitto) -> HomeAssistant {
        let hass = HomeAssistant::binary();
        let dir = tempfile::tempdir().unwrap();
        let http_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "homeassistant:\n  name: presence-test\n  latitude: 0\n  longitude: 0\n  elevation: 0\n  \
             unit_system: metric\n  time_zone: UTC\n\
             http:\n  server_host: 127.0.0.1\n  server_port: {http_port}\n\
             logger:\n  default: warning\n\
             mqtt_statestream:\n  base_topic: hastate\n  publish_attributes: true\n  \
             include:\n    domains: [binary_sensor]\n"
        );
        std::fs::write(dir.path().join("configuration.yaml"), config).unwrap();
        // The MQTT integration is set up through the UI, which stores a
        // config entry; this is that entry, as Home Assistant 2025 writes it.
        let entry = serde_json::json!({
            "created_at": "2026-01-01T00:00:00+00:00",
            "modified_at": "2026-01-01T00:00:00+00:00",
            "data": { "broker": "127.0.0.1", "port": broker.port },
            "disabled_by": null,
            "discovery_keys": {},
            "domain": "mqtt",
            "entry_id": "presencetestmqtt",
            "minor_version": 2,
            "options": { "discovery": true, "discovery_prefix": "homeassistant" },
            "pref_disable_new_entities": false,
            "pref_disable_polling": false,
            "source": "user",
            "subentries": [],
            "title": "127.0.0.1",
            "unique_id": null,
            "version": 1
        });
        let storage = serde_json::json!({
            "version": 1,
            "minor_version": 5,
            "key": "core.config_entries",
            "data": { "entries": [entry] }
        });
        std::fs::create_dir(dir.path().join(".storage")).unwrap();
        std::fs::write(dir.path().join(".storage/core.config_entries"), storage.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("hass.log")).unwrap();
        let child = Command::new(hass)
            .arg("-c")
            .arg(dir.path())
            .arg("--skip-pip")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start Home Assistant");
        HomeAssistant { child, dir }
    }

    /// Polls Home Assistant's entity registry (as it saves it) until the
    /// entity with `unique_id` is among the deleted ones and not among the
    /// live ones; false after `limit`.
    fn registry_poll(&self, unique_id: &str, limit: Duration) -> bool {
        let path = self.dir.path().join(".storage/core.entity_registry");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let registry: Option<serde_json::Value> =
                std::fs::read_to_string(&path).ok().and_then(|text| serde_json::from_str(&text).ok());
            if let Some(registry) = registry {
                let has = |list: &str| {
                    registry["data"][list]
                        .as_array()
                        .is_some_and(|entities| entities.iter().any(|e| e["unique_id"] == unique_id))
                };
                if has("deleted_entities") && !has("entities") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// The end of its log, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("hass.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for HomeAssistant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What Home Assistant says of the entity discovered for `device`: its
/// state and attributes, from `mqtt_statestream`'s retained topics.
fn entity(retained: &BTreeMap<String, String>, device: &str) -> BTreeMap<String, String> {
    let prefix = format!("hastate/binary_sensor/{}/", object_id(device));
    retained
        .iter()
        .filter_map(|(topic, value)| Some((topic.strip_prefix(&prefix)?.to_string(), value.clone())))
        .collect()
}

/// Polls the broker until Home Assistant's state of every device in
/// `want` is the one given; panics with Home Assistant's log otherwise.
fn wait_for(
    broker: &Mosquitto,
    ha: &HomeAssistant,
    want: &[(&str, &str)],
    limit: Duration,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let retained = broker.retained();
        if want
            .iter()
            .all(|(device, state)| entity(&retained, device).get("state").map(String::as_str) == Some(state))
        {
            return retained;
        }
        if Instant::now() >= deadline {
            let seen: Vec<_> = want.iter().map(|(device, _)| (device, entity(&retained, device))).collect();
            panic!(
                "timed out after {limit:?} waiting for Home Assistant to show {want:?}; it shows {seen:?}\n\
                 Home Assistant's log:\n{}",
                ha.log_tail()
            );
        }
    }
}

fn send(to: SocketAddr, message: &Message<'_>) {
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(&common::frame(message), to).unwrap();
}

#[test]
fn home_assistant_shows_each_device_as_a_connectivity_entity_as_the_tracker_says() {
    let broker = Mosquitto::start();
    let mut server = Server::start(&[
        "--mqtt",
        &broker.url(),
        "--mqtt-discovery",
        "homeassistant",
        "--forget-after",
        "4s",
    ]);
    // One device announced before Home Assistant runs (it finds the
    // retained config at start), with a topic-unsafe id.
    send(server.addr, &Message::Heartbeat(Heartbeat::new("boiler/7", 1, 1, 60_000)));
    common::poll("the tracker's discovery config", common::PROMPTLY, || {
        let retained = broker.retained();
        retained.keys().any(|t| t.contains(&object_id("boiler/7"))).then_some(())
    });
    let ha = HomeAssistant::start(&broker);
    let retained = wait_for(&broker, &ha, &[("boiler/7", "on")], HA_START);
    let boiler = entity(&retained, "boiler/7");
    assert_eq!(boiler["device_class"], "\"connectivity\"", "{boiler:?}");
    assert_eq!(boiler["friendly_name"], "\"boiler/7\"", "the device's own name: {boiler:?}");
    assert_eq!(boiler["device"], "\"boiler/7\"", "the last transition's details are attributes: {boiler:?}");

    // One that appears while Home Assistant runs, and then leaves.
    send(server.addr, &Message::Heartbeat(Heartbeat::new("lamp 4", 1, 1, 60_000)));
    wait_for(&broker, &ha, &[("boiler/7", "on"), ("lamp 4", "on")], common::PROMPTLY);
    send(server.addr, &Message::Leave(Leave { device: "lamp 4", boot: 1, seq: 2, tag: None }));
    let retained = wait_for(&broker, &ha, &[("boiler/7", "on"), ("lamp 4", "off")], common::PROMPTLY);
    assert_eq!(entity(&retained, "lamp 4")["reason"], "\"left\"");

    // Silent for --forget-after, it is forgotten: Home Assistant removes
    // the entity from its registry (saved to disk within about 10 s).
    let removed = ha.registry_poll(&object_id("lamp 4"), Duration::from_secs(60));
    assert!(removed, "Home Assistant removed the forgotten device's entity");

    // The tracker dies: the broker publishes its will, and Home Assistant
    // marks every entity unavailable (the broker notices within 1.5
    // keep-alives).
    server.crash();
    wait_for(&broker, &ha, &[("boiler/7", "unavailable")], Duration::from_secs(60));
}
