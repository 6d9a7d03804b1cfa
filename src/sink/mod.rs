//! Where transitions go: sinks behind one small trait.
//!
//! The receive loops never write events themselves. Each loop pushes owned
//! [`Transition`]s into a bounded queue (see `server::publish`); one
//! publisher thread takes them in batches, oldest first, and hands every
//! batch to each [`Sink`] in turn. A sink's failure stays inside the sink:
//! it counts what it lost ([`Sink::lost`]) and logs it, rate-limited; the
//! server adds those counts to `events_lost` in its summary and goes on.
//!
//! Sinks now: [`JsonLines`] (the `--events` file or stdout) and
//! [`Observer`] (a callback, for measurements). Later ones (NATS, MQTT,
//! metrics) plug in the same way.

use std::time::SystemTime;

use crate::tracker::Event;

#[cfg(feature = "nats")]
pub mod cluster;
mod file;
#[cfg(feature = "mqtt")]
mod mqtt;
pub mod names;
#[cfg(feature = "nats")]
mod nats;

pub use file::{JsonLines, event_json};
#[cfg(feature = "mqtt")]
pub use mqtt::{MqttSettings, MqttSink, discovery_config, object_id};
#[cfg(feature = "nats")]
pub use nats::{NatsAuth, NatsOptions, NatsSink, connect_options, servers};

/// One transition as it leaves the engine: the event, with the wall time at
/// which it happened (the engine's monotonic time converted by the loop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The server-wide event sequence: +1 per transition, assigned as it
    /// enters the queue, so one lost on the way leaves a gap a consumer sees.
    pub seq: u64,
    /// What happened, with its monotonic time.
    pub event: Event,
    /// The wall time of `event.at`, for display and for the events file.
    pub wall: SystemTime,
}

impl Transition {
    /// A transition of `device` to `kind`, version 1, not numbered yet
    /// (the sinks' and the queue's tests build them this way).
    #[cfg(test)]
    pub(crate) fn for_test(device: &str, kind: crate::tracker::EventKind) -> Transition {
        let event = Event {
            device: device.into(),
            kind,
            at: crate::time::Instant::ZERO,
            deadline: None,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
            version: 1,
            boot: 1,
            heartbeat_seq: 1,
            held_ms: None,
            ttl_ms: None,
            online: None,
            fleet: None,
        };
        Transition { seq: 0, event, wall: SystemTime::now() }
    }
}

/// A destination for transitions. Called from the publisher thread only, so
/// a sink may block or fail without touching the receive loops.
pub trait Sink: Send {
    /// Publishes a batch of transitions, oldest first. Never fails: a sink
    /// that cannot deliver counts the loss in [`Sink::lost`] and logs it.
    fn publish(&mut self, batch: &[Transition]);

    /// Transitions this sink could not deliver, since it started.
    fn lost(&self) -> u64 {
        0
    }

    /// A short name for logs and metrics (`events_file`, `nats`, `mqtt`).
    fn name(&self) -> &'static str {
        "sink"
    }

    /// Transitions were lost on the way to this sink (its buffer or the
    /// server's queue overflowed, during an outage longer than the buffer):
    /// `devices` is every device the server holds now, read after every
    /// transition this sink was given. A sink that keeps each device's
    /// state (a KV bucket, retained topics) writes it again from here, and
    /// removes the devices that are gone, so that it converges to the
    /// server's view; transitions that follow come after this view. A
    /// history (the events file, a stream) keeps its gap. The default does
    /// nothing.
    fn resync(&mut self, devices: &[crate::client::DeviceReport]) {
        let _ = devices;
    }

    /// Whether the sink asks for a [`Sink::resync`] itself now, though no
    /// transition was lost: the cluster sink does at start and when it is
    /// back after its node was taken for dead. Asked after every batch and,
    /// when idle, twice a second. The default: never.
    fn wants_resync(&self) -> bool {
        false
    }

    /// Whether [`Sink::resync`] does anything: the server reads every
    /// device for it, which a history (the events file) does not need.
    fn keeps_states(&self) -> bool {
        false
    }
}

/// A device's state as [`Sink::resync`] writes it where a sink keeps each
/// device's latest transition (NATS KV, MQTT's retained event topic): the
/// fields of the events file's JSON that the server's view has (no `seq`:
/// it is no transition), with `"resync": true` and the time of the resync.
pub fn resync_json(device: &crate::client::DeviceReport, now: std::time::SystemTime) -> Vec<u8> {
    let mut value = serde_json::json!({
        "time": humantime::format_rfc3339_millis(now).to_string(),
        "device": device.device,
        "event": if device.online { "online" } else { "offline" },
        "version": device.numbers.version,
        "address": device.address.to_string(),
        "boot": device.numbers.boot,
        "heartbeat_seq": device.numbers.seq,
        "resync": true,
    });
    if let Some(reason) = device.offline_reason {
        value["reason"] = reason.into();
    }
    if device.state != "online" && device.online {
        value["state"] = device.state.into();
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A sink that calls a function with every transition (the benchmark
/// measures expiry precision this way).
pub struct Observer(pub Box<dyn FnMut(&Transition) + Send>);

impl Sink for Observer {
    fn name(&self) -> &'static str {
        "observer"
    }

    fn publish(&mut self, batch: &[Transition]) {
        for transition in batch {
            (self.0)(transition);
        }
    }
}
