//! `--mqtt URL`: each device's state as retained MQTT topics, the tracker's
//! own availability as a Last Will, and (with `--mqtt-discovery PREFIX`)
//! Home Assistant discovery configs, with rumqttc's blocking client (its
//! connection runs on a thread of this sink's own and reconnects by itself).
//!
//! Topics (`<name>`: the id made safe, [`super::names`]):
//! - `<root>/<name>/state`, retained: `online` or `offline` (a suspect or
//!   held device is still `online`);
//! - `<root>/<name>/event`, retained: the device's latest transition, the
//!   events file's JSON;
//! - `<root>/status`, retained: `online` while the tracker runs; the broker
//!   publishes `offline` (the Last Will) when the tracker's connection dies,
//!   and the tracker publishes it itself when it stops cleanly.
//! - With discovery, `<prefix>/binary_sensor/<object id>/config`, retained:
//!   a `connectivity` binary sensor per device, `<object id>` being
//!   `presence_` and the first 16 hex digits of the id's BLAKE3 hash
//!   (Home Assistant accepts only `[A-Za-z0-9_-]` there). Sent when a device
//!   is first seen, and again when Home Assistant announces `online` on
//!   `<prefix>/status`.
//!
//! After a reconnect (the broker restarted) the sink publishes the tracker's
//! status, every device's state it has published, and the discovery
//! configs again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::{Client, Event, LastWill, MqttOptions, Packet, QoS};

use super::names;
use super::{Sink, Transition, event_json};
use crate::tracker::EventKind;

/// How the server reaches the broker.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// `mqtt://host:port` (or `host:port`).
    pub url: String,
    /// The topic root.
    pub root: String,
    /// Home Assistant's discovery prefix (e.g. `homeassistant`), if wanted.
    pub discovery: Option<String>,
    /// A user and a password, if the broker needs them.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttOptions")
            .field("url", &self.url)
            .field("root", &self.root)
            .field("discovery", &self.discovery)
            .field("credentials", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// What the sink and its connection thread share: every device's last
/// published state, to publish again after a reconnect.
#[derive(Default)]
struct Known {
    /// Device id → online.
    states: HashMap<String, bool>,
}

/// The MQTT sink.
pub struct MqttSink {
    options: MqttSettings,
    client: Client,
    known: Arc<Mutex<Known>>,
    lost: u64,
    /// Set when the sink is dropped: the connection thread ends at its next error.
    closing: Arc<AtomicBool>,
    /// The connection thread.
    connection: Option<std::thread::JoinHandle<()>>,
}

/// Splits `mqtt://host:port` into host and port (1883 by default).
fn host_port(url: &str) -> std::io::Result<(String, u16)> {
    let rest = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://")).unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => {
            (host, port.parse().map_err(|_| std::io::Error::other(format!("bad port in {url}")))?)
        }
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(std::io::Error::other(format!("no host in {url}")));
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// Home Assistant's object id for `device`.
pub fn object_id(device: &str) -> String {
    let hash = blake3::hash(device.as_bytes());
    format!("presence_{}", &crate::hex::encode(&hash.as_bytes()[..8]))
}

impl MqttSink {
    /// A sink whose connection starts on a thread of its own (a broker that
    /// is down is retried; the tracker starts anyway).
    pub fn connect(options: MqttSettings) -> std::io::Result<Self> {
        let (host, port) = host_port(&options.url)?;
        let mut mqtt = MqttOptions::new(format!("presence-{}", std::process::id()), host, port);
        mqtt.set_keep_alive(Duration::from_secs(10));
        mqtt.set_last_will(LastWill::new(status_topic(&options.root), "offline", QoS::AtLeastOnce, true));
        if let Some((user, password)) = &options.credentials {
            mqtt.set_credentials(user.clone(), password.clone());
        }
        let (client, mut connection) = Client::new(mqtt, 1024);
        let known = Arc::new(Mutex::new(Known::default()));
        let (thread_client, thread_known, thread_options) =
            (client.clone(), Arc::clone(&known), options.clone());
        let closing = Arc::new(AtomicBool::new(false));
        let thread_closing = Arc::clone(&closing);
        let connection = std::thread::Builder::new().name("presence-mqtt".into()).spawn(move || {
            crate::server::run_in_background("the MQTT client");
            let mut warned = false;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if warned {
                            tracing::info!("MQTT: connected again");
                            warned = false;
                        }
                        announce(&thread_client, &thread_options, &thread_known);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        // Home Assistant came (back) online: it needs the configs again.
                        if publish.payload.as_ref() == b"online" {
                            discover_all(&thread_client, &thread_options, &thread_known);
                        }
                    }
                    Ok(_) => {}
                    Err(_) if thread_closing.load(Ordering::Relaxed) => return,
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "MQTT: not connected; retrying");
                            warned = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })?;
        Ok(MqttSink { options, client, known, lost: 0, closing, connection: Some(connection) })
    }
}

fn status_topic(root: &str) -> String {
    format!("{root}/status")
}

/// On every connection: the tracker's status, every state, the configs.
fn announce(client: &Client, options: &MqttSettings, known: &Mutex<Known>) {
    let _ = client.publish(status_topic(&options.root), QoS::AtLeastOnce, true, "online");
    if let Some(prefix) = &options.discovery {
        let _ = client.subscribe(format!("{prefix}/status"), QoS::AtLeastOnce);
    }
    let states: Vec<(String, bool)> = {
        let known = known.lock().unwrap_or_else(PoisonError::into_inner);
        known.states.iter().map(|(id, online)| (id.clone(), *online)).collect()
    };
    for (id, online) in &states {
        let _ =
            client.publish(state_topic(&options.root, id), QoS::AtLeastOnce, true, state_payload(*online));
    }
    discover_all(client, options, known);
}

fn discover_all(client: &Client, options: &MqttSettings, known: &Mutex<Known>) {
    let Some(prefix) = &options.discovery else { return };
    let ids: Vec<String> =
        known.lock().unwrap_or_else(PoisonError::into_inner).states.keys().cloned().collect();
    for id in ids {
        let _ = client.publish(
            config_topic(prefix, &id),
            QoS::AtLeastOnce,
            true,
            discovery_config(&options.root, &id),
        );
    }
}

fn state_topic(root: &str, id: &str) -> String {
    format!("{root}/{}/state", names::encode(id))
}

fn event_topic(root: &str, id: &str) -> String {
    format!("{root}/{}/event", names::encode(id))
}

fn config_topic(prefix: &str, id: &str) -> String {
    format!("{prefix}/binary_sensor/{}/config", object_id(id))
}

fn state_payload(online: bool) -> &'static str {
    if online { "online" } else { "offline" }
}

/// Home Assistant's discovery config for `id`: a connectivity binary sensor.
pub fn discovery_config(root: &str, id: &str) -> Vec<u8> {
    let object = object_id(id);
    let config = serde_json::json!({
        "name": null,
        "unique_id": object,
        "object_id": object,
        "device_class": "connectivity",
        "state_topic": state_topic(root, id),
        "payload_on": "online",
        "payload_off": "offline",
        "availability_topic": status_topic(root),
        "json_attributes_topic": event_topic(root, id),
        "device": { "identifiers": [object], "name": id, "manufacturer": "presence" },
    });
    serde_json::to_vec(&config).unwrap_or_default()
}

impl Sink for MqttSink {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn lost(&self) -> u64 {
        self.lost
    }

    fn keeps_states(&self) -> bool {
        true
    }

    fn resync(&mut self, devices: &[crate::client::DeviceReport]) {
        match self.resync_devices(devices) {
            Ok(()) => tracing::info!(devices = devices.len(), "MQTT: every device's state published again"),
            Err(e) => tracing::warn!(error = %e, "MQTT: cannot publish the devices again"),
        }
    }

    fn publish(&mut self, batch: &[Transition]) {
        for transition in batch {
            let event = &transition.event;
            if event.kind.is_server() {
                continue;
            }
            if let EventKind::Forgotten(_) = event.kind {
                if self.forget(&event.device).is_err() {
                    self.lost += 1;
                }
                continue;
            }
            let online = match event.kind {
                EventKind::Offline(_) => false,
                EventKind::Flapping | EventKind::Stable => event.online.unwrap_or(true),
                _ => true,
            };
            let id = event.device.to_string();
            let first = {
                let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
                known.states.insert(id.clone(), online).is_none()
            };
            let root = &self.options.root;
            let sent = self
                .client
                .publish(event_topic(root, &id), QoS::AtLeastOnce, true, event_json(transition))
                .and_then(|()| {
                    self.client.publish(state_topic(root, &id), QoS::AtLeastOnce, true, state_payload(online))
                });
            let sent = match (&self.options.discovery, first) {
                (Some(prefix), true) => sent.and_then(|()| {
                    self.client.publish(
                        config_topic(prefix, &id),
                        QoS::AtLeastOnce,
                        true,
                        discovery_config(root, &id),
                    )
                }),
                _ => sent,
            };
            if sent.is_err() {
                self.lost += 1;
            }
        }
    }
}

impl MqttSink {
    /// [`Sink::resync`]: every device's retained state, event (its state as
    /// [`super::resync_json`] gives it) and discovery config again, and the
    /// topics of devices the server no longer holds cleared. The client
    /// queues them and delivers them when the broker is there.
    fn resync_devices(
        &mut self,
        devices: &[crate::client::DeviceReport],
    ) -> Result<(), rumqttc::ClientError> {
        let now = std::time::SystemTime::now();
        let listed: std::collections::HashSet<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        let gone: Vec<String> = {
            let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            known.states.keys().filter(|id| !listed.contains(id.as_str())).cloned().collect()
        };
        let root = &self.options.root;
        for device in devices {
            let id = &device.device;
            self.known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .states
                .insert(id.clone(), device.online);
            self.client.publish(
                event_topic(root, id),
                QoS::AtLeastOnce,
                true,
                super::resync_json(device, now),
            )?;
            self.client.publish(
                state_topic(root, id),
                QoS::AtLeastOnce,
                true,
                state_payload(device.online),
            )?;
            if let Some(prefix) = &self.options.discovery {
                self.client.publish(
                    config_topic(prefix, id),
                    QoS::AtLeastOnce,
                    true,
                    discovery_config(root, id),
                )?;
            }
        }
        for id in gone {
            self.forget(&id)?;
        }
        Ok(())
    }

    /// Clears a forgotten device's retained topics (an empty retained
    /// message deletes one), and its discovery config, which removes the
    /// entity from Home Assistant.
    fn forget(&mut self, device: &str) -> Result<(), rumqttc::ClientError> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner).states.remove(device);
        let root = &self.options.root;
        let mut topics = vec![event_topic(root, device), state_topic(root, device)];
        if let Some(prefix) = &self.options.discovery {
            topics.push(config_topic(prefix, device));
        }
        for topic in topics {
            self.client.publish(topic, QoS::AtLeastOnce, true, Vec::new())?;
        }
        Ok(())
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        // A clean stop: say so, as the will would have.
        let _ = self.client.publish(status_topic(&self.options.root), QoS::AtLeastOnce, true, "offline");
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        // Give the connection a moment to deliver them (not forever: the
        // broker may be gone, and then the will says the same).
        if let Some(connection) = self.connection.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !connection.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_object_ids() {
        assert_eq!(host_port("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".into(), 1884));
        assert_eq!(host_port("broker.local").unwrap(), ("broker.local".into(), 1883));
        assert_eq!(host_port("mqtt://[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert!(host_port("mqtt://:1883").is_err());
        let id = object_id("a/b+c#d");
        assert!(id.starts_with("presence_") && id.len() == 25);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        assert_ne!(object_id("a"), object_id("b"));
    }
}
