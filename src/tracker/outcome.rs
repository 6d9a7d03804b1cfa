//! What the engine reports: transitions ([`Event`]), what it counted
//! ([`Counters`], [`Totals`]) and what it did with a datagram ([`Handled`]).

use crate::time::Instant;
use std::net::SocketAddr;

use crate::table::{DeviceId, ForgetReason, OfflineReason};
use crate::wire::DropReason;

/// What happened to a device, or to the server's view of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// First heartbeat, or the first after being offline.
    Online,
    /// Expired or left.
    Offline(OfflineReason),
    /// Late: no heartbeat for `suspect_after` intervals past the expected
    /// one (only with `suspect_events`).
    Suspect,
    /// On time again after being suspect: written as `online` with `"from":
    /// "suspect"` (only with `suspect_events`).
    Back,
    /// Its state changed more than the flap limit allows: its online and
    /// offline events are held back until it is stable.
    Flapping,
    /// A flapping device has not changed state for the flap window.
    Stable,
    /// The server no longer holds the device: offline and silent for
    /// `forget_after`, or its slot was needed for a new device. Its next
    /// heartbeat makes it new (versions start again at 1).
    Forgotten(ForgetReason),
    /// The server suspects its own network and holds devices instead of
    /// taking them offline. Not about one device.
    Degraded,
    /// The server left `degraded`. Not about one device.
    Recovered,
}

impl EventKind {
    /// The event's name in the events file.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Online | EventKind::Back => "online",
            EventKind::Offline(_) => "offline",
            EventKind::Suspect => "suspect",
            EventKind::Flapping => "flapping",
            EventKind::Stable => "stable",
            EventKind::Forgotten(_) => "forgotten",
            EventKind::Degraded => "degraded",
            EventKind::Recovered => "recovered",
        }
    }

    /// Whether it is about the server (the fleet view), not one device.
    pub fn is_server(self) -> bool {
        matches!(self, EventKind::Degraded | EventKind::Recovered)
    }
}

/// Why the server entered `degraded`, or how it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetCause {
    /// Many devices turned late or expired within one `min_ttl`.
    LateDevices,
    /// The kernel dropped datagrams (the socket's receive queue overflowed).
    KernelDrops,
    /// Heartbeats arrived at a normal rate again for one full TTL.
    HeartbeatsNormal,
    /// It held devices for `max_hold`.
    MaxHold,
}

impl FleetCause {
    /// A stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            FleetCause::LateDevices => "late_devices",
            FleetCause::KernelDrops => "kernel_drops",
            FleetCause::HeartbeatsNormal => "heartbeats_normal",
            FleetCause::MaxHold => "max_hold",
        }
    }
}

/// The fleet as a `degraded` or `recovered` event sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fleet {
    /// Why the server entered or left `degraded`.
    pub cause: FleetCause,
    /// Devices online (late and held ones included).
    pub online: u64,
    /// Of those, devices late (suspect), held ones included.
    pub late: u64,
    /// Of those, devices held.
    pub held: u64,
    /// For `recovered`: devices that were held and went offline now.
    pub released: u64,
}

/// A transition, reported as a value for the caller to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The device.
    pub device: DeviceId,
    /// What happened.
    pub kind: EventKind,
    /// When the engine noticed it (the `now` it was given).
    pub at: Instant,
    /// For an expiry, the deadline that passed; `at - deadline` is the detection delay.
    pub deadline: Option<Instant>,
    /// The device's last known address.
    pub addr: SocketAddr,
    /// The device's version after this transition: 1 for its first online,
    /// +1 with each transition after, never back while the server holds it.
    pub version: u32,
    /// The boot epoch of the frame the transition rests on (the newest
    /// heartbeat or leave seen).
    pub boot: u32,
    /// The sequence number of that frame (not the server's event sequence).
    pub heartbeat_seq: u32,
    /// For an offline after being held: how long past its deadline it was held.
    pub held_ms: Option<u64>,
    /// For an `online` (or back from suspect): the TTL this heartbeat gave
    /// the device here, ms (how long until it expires without another).
    pub ttl_ms: Option<u32>,
    /// For `flapping` and `stable`: whether the device is online now.
    pub online: Option<bool>,
    /// For `degraded` and `recovered`: the fleet; then `device` is empty,
    /// and `addr`, `version`, `boot` and `heartbeat_seq` mean nothing.
    pub fleet: Option<Fleet>,
}

impl Event {
    /// An event about the fleet, not one device.
    pub fn fleet(kind: EventKind, at: Instant, fleet: Fleet) -> Event {
        Event {
            device: "".into(),
            kind,
            at,
            deadline: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            version: 0,
            boot: 0,
            heartbeat_seq: 0,
            held_ms: None,
            ttl_ms: None,
            online: None,
            fleet: Some(fleet),
        }
    }
}

/// One thing the engine counts. The one list of counters: the engine, the
/// shards' published totals, the summary and the client all iterate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Count {
    /// Heartbeats accepted.
    Heartbeats,
    /// Leaves accepted.
    Leaves,
    /// Queries answered.
    Queries,
    /// Devices that expired.
    Expirations,
    /// Datagrams dropped for a reason.
    Dropped(DropReason),
}

/// Counts that are not drops, in index order.
const NOT_DROPS: [Count; 4] = [Count::Heartbeats, Count::Leaves, Count::Queries, Count::Expirations];

impl Count {
    /// How many counters there are.
    pub const LEN: usize = NOT_DROPS.len() + DropReason::ALL.len();

    /// Every counter, in index order.
    pub fn all() -> impl Iterator<Item = Count> {
        NOT_DROPS.into_iter().chain(DropReason::ALL.into_iter().map(Count::Dropped))
    }

    /// Its position in a table of [`Count::LEN`] counters.
    pub fn index(self) -> usize {
        match self {
            Count::Heartbeats => 0,
            Count::Leaves => 1,
            Count::Queries => 2,
            Count::Expirations => 3,
            Count::Dropped(reason) => NOT_DROPS.len() + usize::from(reason.code()) - 1,
        }
    }

    /// A stable snake_case name (a drop's is its reason's).
    pub fn name(self) -> &'static str {
        match self {
            Count::Heartbeats => "heartbeats",
            Count::Leaves => "leaves",
            Count::Queries => "queries",
            Count::Expirations => "expirations",
            Count::Dropped(reason) => reason.name(),
        }
    }
}

/// What the engine has counted since it started: one number per [`Count`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by [`Count::index`].
    counts: [u64; Count::LEN],
}

impl Default for Counters {
    fn default() -> Self {
        Counters::ZERO
    }
}

impl Counters {
    /// Nothing counted.
    pub const ZERO: Counters = Counters { counts: [0; Count::LEN] };

    /// The count of `count`.
    pub fn get(&self, count: Count) -> u64 {
        self.counts[count.index()]
    }

    /// Sets the count of `count` (for totals published by another thread).
    pub fn set(&mut self, count: Count, value: u64) {
        self.counts[count.index()] = value;
    }

    /// Adds one to `count`.
    pub(crate) fn bump(&mut self, count: Count) {
        self.counts[count.index()] += 1;
    }

    /// Every counter with its count, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Count, u64)> + '_ {
        Count::all().map(|count| (count, self.get(count)))
    }

    /// Heartbeats accepted.
    pub fn heartbeats(&self) -> u64 {
        self.get(Count::Heartbeats)
    }

    /// Leaves accepted.
    pub fn leaves(&self) -> u64 {
        self.get(Count::Leaves)
    }

    /// Queries answered.
    pub fn queries(&self) -> u64 {
        self.get(Count::Queries)
    }

    /// Devices that expired.
    pub fn expirations(&self) -> u64 {
        self.get(Count::Expirations)
    }

    /// Datagrams dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.get(Count::Dropped(reason))
    }

    /// Datagrams dropped for any reason.
    pub fn total_drops(&self) -> u64 {
        DropReason::ALL.into_iter().map(|reason| self.drops(reason)).sum()
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Counters) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }
}

/// What a summary reports: table counts and counters. With `--threads`, the
/// shard answering a summary adds the other shards' totals to its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Devices online.
    pub online: u64,
    /// Devices held, online or offline.
    pub known: u64,
    /// Online devices late (suspect), held ones included.
    pub late: u64,
    /// Online devices held as suspect (degraded).
    pub held: u64,
    /// Engines (threads) degraded.
    pub degraded: u64,
    /// Everything counted.
    pub counters: Counters,
    /// Events the server could not deliver to its sinks. The engine does
    /// not publish events; the server passes this count in.
    pub events_lost: u64,
    /// State snapshots the server could not write; the server passes it in.
    pub snapshots_failed: u64,
}

impl Totals {
    /// Nothing held, nothing counted: the peers of a server with one shard
    /// and no lost events.
    pub const NONE: Totals = Totals {
        online: 0,
        known: 0,
        late: 0,
        held: 0,
        degraded: 0,
        counters: Counters::ZERO,
        events_lost: 0,
        snapshots_failed: 0,
    };

    /// Adds `other` to these.
    pub fn add(&mut self, other: &Totals) {
        self.online += other.online;
        self.known += other.known;
        self.late += other.late;
        self.held += other.held;
        self.degraded += other.degraded;
        self.counters.add(&other.counters);
        self.events_lost += other.events_lost;
        self.snapshots_failed += other.snapshots_failed;
    }
}

/// What [`Tracker::handle`](super::Tracker::handle) did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Applied; no reply.
    Done,
    /// Applied; the first `n` bytes of the reply buffer are to be sent back to the source.
    Reply(usize),
    /// Counted and dropped; nothing changed but the counter. Some drops still
    /// get a short reply (an `Error` frame), as `reply` says.
    Dropped {
        /// Why.
        reason: DropReason,
        /// Bytes of the reply buffer to send back, if any.
        reply: Option<usize>,
    },
}

impl Handled {
    /// The reply length, if there is a reply to send.
    pub fn reply_len(self) -> Option<usize> {
        match self {
            Handled::Done => None,
            Handled::Reply(n) => Some(n),
            Handled::Dropped { reply, .. } => reply,
        }
    }
}
