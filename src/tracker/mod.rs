//! The protocol engine: validates and authenticates datagrams, applies them
//! to the [`PresenceTable`], builds replies, and reports online/offline
//! transitions.
//!
//! Sans-IO, in the manner of quinn-proto: the caller passes in the time and
//! the bytes, and gets back a reply to send and [`Event`]s to publish. The
//! engine never reads a clock, touches a socket or logs, so tests drive it
//! with simulated time.
//!
//! The caller's loop is:
//! 1. wait for a datagram, but no longer than until [`Tracker::poll_timeout`];
//! 2. on a datagram, call [`Tracker::handle`] and send the reply it wrote, if any;
//! 3. on a timeout, call [`Tracker::handle_timeout`];
//! 4. drain [`Tracker::poll_event`].
//!
//! Every reply is at most as large as the datagram that caused it, so the
//! server cannot be used to amplify a flood toward a forged source address.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::time::Instant;

use crate::auth;
use crate::limit::QueryGate;
use crate::table::{OfflineReason, PresenceTable};
use crate::wire::{self, DropReason, ErrorCode, ErrorReply, Message};

mod access;
mod config;
mod device;
mod outcome;
mod persist;
mod query;

pub use config::{AuthMode, Config, ConfigError, Keys, MAX_TTL, MIN_TTL};
pub use outcome::{Count, Counters, Event, EventKind, Handled, Totals};
pub use persist::Restored;
pub use query::{LIST_SCAN_LIMIT, NEEDED_HEADROOM};

/// Which shard an engine is, of how many (`--threads N`: shard `index` of
/// `count`, owning the devices whose id hashes to it; see [`crate::shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPosition {
    /// This shard's number, from 0.
    pub index: usize,
    /// How many shards there are.
    pub count: usize,
}

/// The protocol engine. One per server; see the module docs for the loop.
#[derive(Debug)]
pub struct Tracker {
    /// The rules.
    config: Config,
    /// Who is online.
    table: PresenceTable,
    /// Query rate limits and the signed queries answered recently, shared
    /// by all shards so limits hold for the server as a whole.
    gate: Arc<Mutex<QueryGate>>,
    /// What has been counted.
    counters: Counters,
    /// The `now` the engine was created at; uptime counts from here.
    started: Instant,
    /// The wall time at `started`; wall times for display are derived from it,
    /// so the engine never reads the wall clock.
    started_wall: SystemTime,
    /// Transitions not yet taken by `poll_event`.
    events: VecDeque<Event>,
    /// Scratch space for the entries of a `Page` reply.
    page_scratch: Box<[u8]>,
    /// The slot and the end offset of each entry in `page_scratch`.
    page_ends: Vec<(usize, usize)>,
    /// Which shard this engine is, of how many (`--threads`).
    shard: ShardPosition,
    /// The last declared interval (ms) seen and the TTL it gets.
    last_ttl: Option<(u32, Duration)>,
}

impl Tracker {
    /// A new engine whose clocks read `now` and `wall` at creation.
    pub fn new(config: Config, now: Instant, wall: SystemTime) -> Result<Self, ConfigError> {
        config.validate()?;
        let gate = QueryGate::new(config.query_rate, config.query_burst, config.max_query_sources);
        Ok(Tracker {
            // Epoch zero, not `now`: a restored device may have been seen
            // before this engine started (see `persist`).
            table: PresenceTable::new(config.max_devices, Instant::ZERO),
            gate: Arc::new(Mutex::new(gate)),
            config,
            counters: Counters::default(),
            started: now,
            started_wall: wall,
            events: VecDeque::new(),
            page_scratch: vec![0; wire::MAX_DATAGRAM].into_boxed_slice(),
            page_ends: Vec::new(),
            shard: ShardPosition { index: 0, count: 1 },
            last_ttl: None,
        })
    }

    /// `count` engines that share the devices by id hash (see
    /// [`crate::shard`]), each holding up to `max_devices / count` (rounded up).
    pub fn new_sharded(
        config: Config,
        count: usize,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Vec<Self>, ConfigError> {
        let count = count.max(1);
        let per_shard = Config { max_devices: config.max_devices.div_ceil(count), ..config };
        let mut shards: Vec<Tracker> = Vec::with_capacity(count);
        for index in 0..count {
            let mut tracker = Tracker::new(per_shard.clone(), now, wall)?;
            tracker.shard = ShardPosition { index, count };
            if let Some(first) = shards.first() {
                tracker.gate = Arc::clone(&first.gate);
            }
            shards.push(tracker);
        }
        Ok(shards)
    }

    /// Which shard this engine is, of how many.
    pub fn shard(&self) -> ShardPosition {
        self.shard
    }

    /// This engine's own counts and counters.
    pub fn totals(&self) -> Totals {
        Totals {
            online: self.table.online_count() as u64,
            known: self.table.known_count() as u64,
            counters: self.counters.clone(),
            events_lost: 0,
            snapshots_failed: 0,
        }
    }

    /// The table, for inspection.
    pub fn table(&self) -> &PresenceTable {
        &self.table
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Query sources the rate limiters track now (unsigned and operator).
    pub fn query_sources(&self) -> usize {
        let gate = self.gate();
        gate.unsigned.sources() + gate.operator.sources()
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, QueryGate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The wall time at `now` in Unix milliseconds.
    fn unix_ms(&self, now: Instant) -> u64 {
        millis_u64(self.wall_time(now).duration_since(UNIX_EPOCH).unwrap_or_default())
    }

    /// The wall time corresponding to the monotonic instant `at`.
    pub fn wall_time(&self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.started) {
            Some(after) => self.started_wall + after,
            None => self.started_wall - self.started.saturating_duration_since(at),
        }
    }

    /// When [`Tracker::handle_timeout`] must next be called: the earliest
    /// device deadline, or `None` if no device is online.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// Expires every device whose deadline is `<= now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let events = &mut self.events;
        let counters = &mut self.counters;
        self.table.expire(now, |id, entry| {
            counters.bump(Count::Expirations);
            events.push_back(Event {
                device: id.into(),
                kind: EventKind::Offline(OfflineReason::Expired),
                at: now,
                deadline: Some(entry.due()),
                addr: entry.addr(),
                version: entry.version(),
                boot: entry.window().boot(),
                heartbeat_seq: entry.window().top(),
            });
        });
    }

    /// The next transition to publish, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Handles one datagram from `from` received at `now`. A reply, if any,
    /// is written to the start of `reply`, which must hold at least
    /// [`wire::MAX_DATAGRAM`] bytes, and is never longer than `datagram`.
    ///
    /// Devices due at `now` are expired first, so the result does not
    /// depend on how promptly the caller calls `handle_timeout`.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], reply: &mut [u8]) -> Handled {
        self.handle_with_peers(now, from, datagram, reply, &Totals::NONE)
    }

    /// [`Tracker::handle`], with what the other shards hold and counted (and
    /// the server's own counts, such as lost events) for a summary to add to
    /// this engine's. The server passes them for summary queries only.
    pub fn handle_with_peers(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        reply: &mut [u8],
        peers: &Totals,
    ) -> Handled {
        self.handle_timeout(now);
        if let Some(hb) = wire::decode_heartbeat_ascii(datagram) {
            // The usual heartbeat: its tag, if any, is the last 8 bytes.
            let tag = hb.tag.map(|tag| (&datagram[..datagram.len() - auth::TAG_LEN], tag));
            return self
                .heartbeat(now, from, hb, tag, datagram.len(), reply)
                .unwrap_or_else(|reason| self.drop(reason, None));
        }
        let message = match wire::decode(datagram) {
            Ok(message) => message,
            Err(error) => {
                let answer = match error {
                    wire::Error::UnsupportedVersion(_) => unsupported_version(datagram, reply),
                    _ => None,
                };
                return self.drop(DropReason::from(error), answer);
            }
        };
        let tag = auth::signed_part(datagram, &message);
        let result = match message {
            Message::Heartbeat(hb) => self.heartbeat(now, from, hb.into(), tag, datagram.len(), reply),
            Message::Leave(leave) => self.leave(now, leave, tag),
            Message::Query(query) => self.query(now, from, query, datagram, reply, peers),
            Message::Status(_) | Message::Ack(_) | Message::Error(_) => Err(DropReason::UnexpectedKind),
        };
        result.unwrap_or_else(|reason| {
            let code = match reason {
                DropReason::NotAllowed => Some(ErrorCode::NotAllowed),
                DropReason::StaleQuery => Some(ErrorCode::StaleQuery { server_unix_ms: self.unix_ms(now) }),
                _ => None,
            };
            let answer = code.and_then(|code| error_reply(code, datagram.len(), reply));
            self.drop(reason, answer)
        })
    }

    fn drop(&mut self, reason: DropReason, reply: Option<usize>) -> Handled {
        self.counters.bump(Count::Dropped(reason));
        Handled::Dropped { reason, reply }
    }
}

/// Versions above ours that a future `presence` might speak. A datagram
/// claiming one of them gets an `Error` reply; anything else is garbage.
const FUTURE_VERSIONS: std::ops::RangeInclusive<u8> = (wire::VERSION + 1)..=15;

/// An `Error` reply for a datagram that looks like a heartbeat or query of a
/// newer version: its version byte is in [`FUTURE_VERSIONS`] and its kind
/// byte is 0 (heartbeat) or 2 (query), the kinds whose senders wait for
/// replies. Garbage that fails these checks gets nothing.
fn unsupported_version(datagram: &[u8], reply: &mut [u8]) -> Option<usize> {
    let looks_like_a_frame = matches!(datagram, [version, 0 | 2, ..] if FUTURE_VERSIONS.contains(version));
    if !looks_like_a_frame {
        return None;
    }
    error_reply(ErrorCode::UnsupportedVersion, datagram.len(), reply)
}

/// Encodes an `Error` reply, unless it would be larger than the request.
fn error_reply(code: ErrorCode, request_len: usize, reply: &mut [u8]) -> Option<usize> {
    let error = Message::Error(ErrorReply { code, supported_version: wire::VERSION });
    wire::encode(&error, reply).ok().filter(|len| *len <= request_len)
}

fn millis_u64(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// What the engine's tests use, in one place (they were written against a
/// single-file engine that imported all of it).
#[cfg(test)]
mod test_prelude {
    pub(super) use crate::auth::Key;
    pub(super) use crate::wire::{Ack, Counter, Leave, Query, QueryKind, Status, StatusBody};
    pub(super) use std::net::IpAddr;
}
#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
