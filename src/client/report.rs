//! Owned answers, ready for display or JSON: one device, the summary.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use crate::wire::{self, DeviceInfo, DeviceNumbers, DropReason, SummaryCounts};

/// One device as reported by the server, owned and ready for display or JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    /// The device id.
    pub device: String,
    /// Whether the server knows it (always true in a report from the server;
    /// the CLI prints unknown devices in the same shape with `false`).
    pub known: bool,
    /// Whether it is online now (suspect devices are online).
    pub online: bool,
    /// `online`, `suspect` (online but late, or held while the server is
    /// degraded) or `offline`.
    pub state: &'static str,
    /// Whether it is held: its deadline passed while the server was
    /// degraded, so it is suspect instead of offline.
    pub held: bool,
    /// Why it is offline: `expired` or `left` (`None` while online; `unknown`
    /// for a reason this client does not know).
    pub offline_reason: Option<&'static str>,
    /// Since when it is offline, for an expired device: its deadline, Unix
    /// milliseconds. (A device that left went offline when its leave came,
    /// after its last heartbeat.)
    pub offline_since_unix_ms: Option<u64>,
    /// Source address of its last heartbeat.
    pub address: SocketAddr,
    /// Times and counts, as the server reported them (flattened in JSON).
    #[serde(flatten)]
    pub numbers: DeviceNumbers,
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
        let state = match (info.online, info.offline_reason) {
            (false, _) => "offline",
            (true, wire::ONLINE_SUSPECT | wire::ONLINE_HELD) => "suspect",
            (true, _) => "online",
        };
        DeviceReport {
            device: info.device.to_owned(),
            known: true,
            online: info.online,
            state,
            held: info.online && info.offline_reason == wire::ONLINE_HELD,
            offline_reason,
            offline_since_unix_ms: (offline_reason == Some("expired"))
                .then(|| info.numbers.last_seen_unix_ms.saturating_add(info.numbers.ttl_ms.into())),
            address: info.addr.into(),
            numbers: info.numbers,
            payload: info.payload.to_vec(),
        }
    }
}

/// The server's summary, owned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryReport {
    /// Devices, uptime and what was accepted (flattened in JSON).
    #[serde(flatten)]
    pub counts: SummaryCounts,
    /// Dropped datagrams by reason name; only reasons with a count appear.
    pub drops: BTreeMap<String, u64>,
    /// Event lines the server could not write to its events destination.
    pub events_lost: u64,
    /// State snapshots (`--state`) the server could not write.
    pub snapshots_failed: u64,
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
