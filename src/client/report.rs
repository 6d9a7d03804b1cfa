//! Owned answers, ready for display or JSON: one device, the summary.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use crate::wire::{self, DeviceInfo, DropReason};

/// One device as reported by the server, owned and ready for display or JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    /// The device id.
    pub device: String,
    /// Whether the server knows it (always true in a report from the server;
    /// the CLI prints unknown devices in the same shape with `false`).
    pub known: bool,
    /// Whether it is online now.
    pub online: bool,
    /// Why it is offline: `expired` or `left` (`None` while online; `unknown`
    /// for a reason this client does not know).
    pub offline_reason: Option<&'static str>,
    /// Since when it is offline, for an expired device: its deadline, Unix
    /// milliseconds. (A device that left went offline when its leave came,
    /// after its last heartbeat.)
    pub offline_since_unix_ms: Option<u64>,
    /// Source address of its last heartbeat.
    pub address: SocketAddr,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ago_ms: u64,
    /// Wall time of its last heartbeat, Unix milliseconds.
    pub last_seen_unix_ms: u64,
    /// Milliseconds until it expires (0 when offline).
    pub expires_in_ms: u64,
    /// Its TTL in milliseconds.
    pub ttl_ms: u32,
    /// The interval it declared (0 = none).
    pub interval_ms: u32,
    /// Boot epoch of its last heartbeat.
    pub boot: u32,
    /// Sequence number of its last heartbeat.
    pub seq: u32,
    /// Heartbeats the server accepted from it.
    pub heartbeats: u64,
    /// Times it went offline.
    pub flaps: u32,
    /// Payload of its last heartbeat (in JSON: `payload_hex`, lowercase hex).
    #[serde(rename = "payload_hex", serialize_with = "crate::hex::serialize")]
    pub payload: Vec<u8>,
}

impl From<&DeviceInfo<'_>> for DeviceReport {
    fn from(info: &DeviceInfo<'_>) -> Self {
        let offline_reason = match (info.online, info.offline_reason) {
            (true, _) => None,
            (false, wire::OFFLINE_EXPIRED) => Some("expired"),
            (false, wire::OFFLINE_LEFT) => Some("left"),
            (false, _) => Some("unknown"),
        };
        DeviceReport {
            device: info.device.to_owned(),
            known: true,
            online: info.online,
            offline_reason,
            offline_since_unix_ms: (offline_reason == Some("expired"))
                .then(|| info.last_seen_unix_ms.saturating_add(info.ttl_ms.into())),
            address: info.addr.into(),
            last_seen_ago_ms: info.last_seen_ago_ms,
            last_seen_unix_ms: info.last_seen_unix_ms,
            expires_in_ms: info.expires_in_ms,
            ttl_ms: info.ttl_ms,
            interval_ms: info.interval_ms,
            boot: info.boot,
            seq: info.seq,
            heartbeats: info.heartbeats,
            flaps: info.flaps,
            payload: info.payload.to_vec(),
        }
    }
}

/// The server's summary, owned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryReport {
    /// Devices online now.
    pub online: u64,
    /// Devices known, online or not.
    pub known: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Leaves accepted.
    pub leaves: u64,
    /// Queries answered (including this one).
    pub queries: u64,
    /// Devices that expired.
    pub expirations: u64,
    /// Dropped datagrams by reason name; only reasons with a count appear.
    pub drops: BTreeMap<String, u64>,
    /// Event lines the server could not write to its events destination.
    pub events_lost: u64,
}

impl SummaryReport {
    /// Drops for `reason` (0 if none).
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }

    /// Drops for any reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}
