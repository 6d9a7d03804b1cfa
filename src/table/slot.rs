//! One device's compact record ([`Slot`]) and the read-only view of it
//! that callers get ([`Entry`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::time::Instant;

use super::{OfflineReason, PresenceTable, Refusal, ReplayWindow};

/// A duration in whole milliseconds, saturating at `u32::MAX` (49 days),
/// without a u128 division.
pub(super) fn whole_millis(d: Duration) -> u32 {
    u32::try_from(d.as_secs().saturating_mul(1000).saturating_add(u64::from(d.subsec_millis())))
        .unwrap_or(u32::MAX)
}

/// Ids up to this many bytes are stored inside the slot.
pub(super) const INLINE_ID: usize = 19;
/// First byte of a slot id that lives in `long_ids`.
pub(super) const LONG_ID: u8 = 0xff;

/// A device id inside a slot: `[len, bytes...]` for short ids, or
/// `[LONG_ID, index (4 bytes LE), ...]` for ids kept in `long_ids`. A length
/// of 0 marks a free slot (ids are never empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotId(pub(super) [u8; INLINE_ID + 1]);

/// A socket address in 18 bytes: IPv4 is stored as IPv4-mapped IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PackedAddr {
    /// The IPv6 (or IPv4-mapped) address.
    pub(super) ip: [u8; 16],
    /// The port.
    pub(super) port: u16,
}

impl From<SocketAddr> for PackedAddr {
    fn from(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        PackedAddr { ip: ip.octets(), port: addr.port() }
    }
}

impl From<PackedAddr> for SocketAddr {
    fn from(addr: PackedAddr) -> Self {
        crate::wire::canonical(SocketAddr::from((Ipv6Addr::from(addr.ip), addr.port)))
    }
}

/// One device's record. Times are microseconds since the table's epoch.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    /// The id, or a free-slot marker.
    pub(super) id: SlotId,
    /// When its last heartbeat arrived.
    pub(super) last_seen: u64,
    /// The (boot, seq) pairs seen.
    pub(super) window: ReplayWindow,
    /// Source address of its last heartbeat.
    pub(super) addr: PackedAddr,
    /// TTL applied at its last heartbeat, in milliseconds; the deadline is
    /// `last_seen + ttl`.
    pub(super) ttl_ms: u32,
    /// Interval it declared at its last heartbeat, in milliseconds (0 = none).
    pub(super) interval_ms: u32,
    /// Heartbeats accepted (saturating).
    pub(super) heartbeats: u32,
    /// Its version: 1 when it first came online, +1 with every online or
    /// offline transition after; the engine adjusts it for the events it
    /// writes or holds back ([`PresenceTable::set_version`]).
    pub(super) version: u32,
    /// Which `expiry` entry is this slot's: others are stale.
    pub(super) generation: u32,
    /// Index into `payloads` of its last payload; 0 for none.
    pub(super) payload: u32,
    /// Whether it is online.
    pub(super) online: bool,
    /// [`SIGNED`] and [`LEFT`]: one byte, so the slot stays 88 bytes.
    pub(super) flags: u8,
}

/// Slot flag: the device has sent a frame with a valid tag; from then on
/// unsigned frames for it are refused.
pub(super) const SIGNED: u8 = 1;
/// Slot flag: the device went offline by leaving (not by expiring).
pub(super) const LEFT: u8 = 2;
/// Slot flag: an online device is late: no heartbeat for `suspect_after`
/// intervals past the one expected (see [`PresenceTable::set_suspect_after`]).
pub(super) const SUSPECT: u8 = 4;
/// Slot flag: an online device whose deadline passed while the server
/// suspected its own network: held (as suspect) instead of taken offline.
pub(super) const HELD: u8 = 8;

impl Slot {
    pub(super) fn deadline(&self) -> u64 {
        self.last_seen + u64::from(self.ttl_ms) * 1000
    }

    pub(super) fn is_free(&self) -> bool {
        self.id.0[0] == 0
    }
}

/// A read-only view of one device.
#[derive(Clone, Copy)]
pub struct Entry<'t> {
    /// The table, for its epoch and side storage.
    pub(super) table: &'t PresenceTable,
    /// The device's record.
    pub(super) slot: &'t Slot,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("online", &self.is_online())
            .field("last_seen_us", &self.slot.last_seen)
            .field("ttl_ms", &self.slot.ttl_ms)
            .field("addr", &self.addr())
            .field("window", &self.slot.window)
            .field("heartbeats", &self.slot.heartbeats)
            .field("version", &self.slot.version)
            .field("payload", &self.payload())
            .finish()
    }
}

impl<'t> Entry<'t> {
    /// Whether the device is online.
    pub fn is_online(&self) -> bool {
        self.slot.online
    }

    /// When the device expires, while it is online.
    pub fn deadline(&self) -> Option<Instant> {
        self.slot.online.then(|| self.due())
    }

    /// When it expires or expired: its last heartbeat plus its TTL.
    pub fn due(&self) -> Instant {
        self.table.instant(self.slot.deadline())
    }

    /// When its last heartbeat arrived (monotonic; wall time is derived for display).
    pub fn last_seen(&self) -> Instant {
        self.table.instant(self.slot.last_seen)
    }

    /// The TTL applied at its last heartbeat.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.slot.ttl_ms.into())
    }

    /// The interval it declared at its last heartbeat (zero if none).
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.slot.interval_ms.into())
    }

    /// Source address of its last heartbeat; may change (NAT rebinding).
    pub fn addr(&self) -> SocketAddr {
        self.slot.addr.into()
    }

    /// The (boot, seq) pairs seen, for replay protection.
    pub fn window(&self) -> ReplayWindow {
        self.slot.window
    }

    /// Whether it has sent a signed frame (unsigned ones are refused since).
    pub fn is_signed(&self) -> bool {
        self.slot.flags & SIGNED != 0
    }

    /// Whether it is online but late (suspect), held or not.
    pub fn is_suspect(&self) -> bool {
        self.slot.online && self.slot.flags & (SUSPECT | HELD) != 0
    }

    /// Whether its deadline passed while the server suspected its own
    /// network, so it is held as suspect instead of offline.
    pub fn is_held(&self) -> bool {
        self.slot.online && self.slot.flags & HELD != 0
    }

    /// Why it is offline; `None` while it is online.
    pub fn offline_reason(&self) -> Option<OfflineReason> {
        match (self.slot.online, self.slot.flags & LEFT != 0) {
            (true, _) => None,
            (false, true) => Some(OfflineReason::Left),
            (false, false) => Some(OfflineReason::Expired),
        }
    }

    /// Payload of its last heartbeat.
    pub fn payload(&self) -> &'t [u8] {
        &self.table.payloads[self.slot.payload as usize]
    }

    /// Heartbeats accepted from it.
    pub fn heartbeats(&self) -> u64 {
        self.slot.heartbeats.into()
    }

    /// Times it went offline, if every transition was counted in its
    /// version (the table's own count; the engine's flap score is another).
    pub fn flaps(&self) -> u32 {
        self.slot.version / 2
    }

    /// Its transitions so far, the version of its latest one: 1 for its
    /// first `online`, +1 with each transition after. Consumers order and
    /// dedupe a device's events by it.
    pub fn version(&self) -> u32 {
        self.slot.version
    }
}

/// Everything the table holds about one device, as a snapshot keeps it and
/// [`PresenceTable::restore`] puts it back. The deadline of an online
/// device is `last_seen + ttl_ms`; a caller that restores a device whose
/// deadline must move (the server was down) sets `last_seen` and `ttl_ms`
/// so that their sum is the new deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    /// The device id (never empty).
    pub id: &'a str,
    /// Whether it is online.
    pub online: bool,
    /// Whether it went offline by leaving (not by expiring).
    pub left: bool,
    /// Whether it has sent a signed frame (unsigned ones are refused since).
    pub signed: bool,
    /// Whether it is late (suspect), held or not. A restored device stays
    /// late only if it can be (it declared an interval, and its deadline is
    /// after the time it turns late).
    pub late: bool,
    /// The (boot, seq) pairs seen.
    pub window: ReplayWindow,
    /// When its last heartbeat arrived.
    pub last_seen: Instant,
    /// The TTL applied at its last heartbeat, in milliseconds.
    pub ttl_ms: u32,
    /// The interval it declared at its last heartbeat, in milliseconds.
    pub interval_ms: u32,
    /// Heartbeats accepted from it.
    pub heartbeats: u32,
    /// Its version (transitions so far).
    pub version: u32,
    /// Source address of its last heartbeat.
    pub addr: SocketAddr,
    /// Payload of its last heartbeat.
    pub payload: &'a [u8],
}

impl<'t> Entry<'t> {
    /// This device as a snapshot keeps it, under `id` (the id the listing gave).
    pub fn held(&self, id: &'t str) -> Held<'t> {
        let slot = self.slot;
        Held {
            id,
            online: slot.online,
            left: slot.flags & LEFT != 0,
            signed: slot.flags & SIGNED != 0,
            late: slot.online && slot.flags & (SUSPECT | HELD) != 0,
            window: slot.window,
            last_seen: self.last_seen(),
            ttl_ms: slot.ttl_ms,
            interval_ms: slot.interval_ms,
            heartbeats: slot.heartbeats,
            version: slot.version,
            addr: self.addr(),
            payload: self.payload(),
        }
    }
}

/// Checks a heartbeat's or leave's signature state and (boot, seq) against
/// `slot`. Returns whether the frame starts a fresh replay window: the first
/// signed frame of a device known only from unsigned ones.
pub(super) fn check_frame(slot: &Slot, signed: bool, boot: u32, seq: u32) -> Result<bool, Refusal> {
    match (slot.flags & SIGNED != 0, signed) {
        (true, false) => Err(Refusal::Unsigned),
        (false, true) => Ok(true),
        _ if slot.window.is_new(boot, seq) => Ok(false),
        _ => Err(Refusal::Replay),
    }
}
