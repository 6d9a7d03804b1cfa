//! What the engine reports: transitions ([`Event`]), what it counted
//! ([`Counters`], [`Totals`]) and what it did with a datagram ([`Handled`]).

use std::net::SocketAddr;
use std::time::Instant;

use crate::table::{DeviceId, OfflineReason};
use crate::wire::DropReason;

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// First heartbeat, or the first after being offline.
    Online,
    /// Expired or left.
    Offline(OfflineReason),
}

impl EventKind {
    /// `"online"` or `"offline"`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Online => "online",
            EventKind::Offline(_) => "offline",
        }
    }
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
}

/// What the engine has counted since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Leaves accepted.
    pub leaves: u64,
    /// Queries answered.
    pub queries: u64,
    /// Devices that expired.
    pub expirations: u64,
    /// Dropped datagrams, indexed by `DropReason::code() - 1`.
    drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    /// Datagrams dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[usize::from(reason.code()) - 1]
    }

    /// Datagrams dropped for any reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub(super) fn count_drop(&mut self, reason: DropReason) {
        self.drops[usize::from(reason.code()) - 1] += 1;
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Counters) {
        self.heartbeats += other.heartbeats;
        self.leaves += other.leaves;
        self.queries += other.queries;
        self.expirations += other.expirations;
        for (mine, theirs) in self.drops.iter_mut().zip(other.drops) {
            *mine += theirs;
        }
    }

    /// Sets the count of datagrams dropped for `reason`.
    pub fn set_drops(&mut self, reason: DropReason, count: u64) {
        self.drops[usize::from(reason.code()) - 1] = count;
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
    /// Everything counted.
    pub counters: Counters,
    /// Events the server could not write to its events destination. The
    /// engine does not write events; the server passes this count in.
    pub events_lost: u64,
}

impl Totals {
    /// Adds `other` to these.
    pub fn add(&mut self, other: &Totals) {
        self.online += other.online;
        self.known += other.known;
        self.counters.add(&other.counters);
        self.events_lost += other.events_lost;
    }
}

/// What [`Tracker::handle`] did with a datagram.
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
