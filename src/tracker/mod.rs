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
use crate::table::{Entry, Forgotten, Lateness, OfflineReason, PresenceTable, Verdict};
use crate::wire::{self, DropReason, ErrorCode, ErrorReply, Message};

mod access;
mod config;
mod device;
mod flap;
mod outcome;
mod persist;
mod preserve;
mod query;

pub use config::{AuthMode, Config, ConfigError, FlapDamping, Keys, MAX_TTL, MIN_TTL, Preservation};
pub use outcome::{Count, Counters, Event, EventKind, Fleet, FleetCause, Handled, Totals};
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
    /// Self-preservation: whether devices are held instead of taken offline.
    preserver: preserve::Preserver,
    /// Flap histories of the devices that changed state lately.
    flaps: flap::Flaps,
    /// Transitions a sweep found, before flap damping and versions (reused).
    swept: Vec<Event>,
}

impl Tracker {
    /// A new engine whose clocks read `now` and `wall` at creation.
    pub fn new(config: Config, now: Instant, wall: SystemTime) -> Result<Self, ConfigError> {
        config.validate()?;
        let gate = QueryGate::new(config.query_rate, config.query_burst, config.max_query_sources);
        let mut table = PresenceTable::new(config.max_devices, Instant::ZERO);
        table.set_suspect_after(config.suspect_after);
        Ok(Tracker {
            preserver: preserve::Preserver::new(config.preservation, config.min_ttl, now),
            flaps: flap::Flaps::new(config.flap_damping),
            swept: Vec::new(),
            // Epoch zero, not `now`: a restored device may have been seen
            // before this engine started (see `persist`).
            table,
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

    /// The operator key, if the server has a master secret (the HTTP API
    /// signs its queries with it, and derives its bearer token from it).
    pub fn operator_key(&self) -> Option<auth::Key> {
        self.config.keys.as_ref().map(|keys| keys.operator)
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
            late: self.table.late_count() as u64,
            held: self.table.held_count() as u64,
            degraded: u64::from(self.preserver.degraded()),
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
    /// device deadline (or time a device turns late), the next look at the
    /// rates while degraded, a flapping device's window, or when the
    /// longest-silent offline device is to be forgotten; `None` if nothing
    /// is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().into_iter().flatten().min()
    }

    /// Every time the engine must wake at, if any: what
    /// [`Tracker::poll_timeout`] takes the earliest of.
    #[inline]
    fn timers(&self) -> [Option<Instant>; 4] {
        let forget =
            self.config.forget_after.and_then(|after| Some(self.table.oldest_offline_seen()? + after));
        [self.table.next_deadline(), self.preserver.next_tick(), self.flaps.next_due(), forget]
    }

    /// Handles everything due at `now`: devices that turn late or expire
    /// (held instead while degraded), leaving `degraded`, and flapping
    /// devices that are stable again.
    pub fn handle_timeout(&mut self, now: Instant) {
        let heartbeats = self.counters.heartbeats();
        if let preserve::Step::Recover(cause) =
            self.preserver.tick(now, heartbeats, self.table.online_count())
        {
            self.recover(now, cause);
        }
        let online = self.table.online_count();
        let (suspect_events, started) = (self.config.suspect_events, self.started);
        let (preserver, counters) = (&mut self.preserver, &mut self.counters);
        // Both callbacks add to it; they never run at once.
        let swept = std::cell::RefCell::new(std::mem::take(&mut self.swept));
        let mut entered = false;
        self.table.sweep(
            now,
            |id, entry, lateness| {
                let newly_late = lateness == Lateness::Suspect || !entry.is_suspect();
                // Silence from before this engine started (a restore) says
                // nothing about the network now.
                let evidence = newly_late && entry.last_seen() >= started;
                if evidence && preserver.note_late(now, entry.ttl(), online, heartbeats) {
                    entered = true;
                }
                let verdict = if preserver.degraded() { Verdict::Hold } else { Verdict::Offline };
                if suspect_events && newly_late && (lateness == Lateness::Suspect || verdict == Verdict::Hold)
                {
                    swept.borrow_mut().push(device_event(id, &entry, EventKind::Suspect, now, None));
                }
                verdict
            },
            |id, entry| {
                counters.bump(Count::Expirations);
                let kind = EventKind::Offline(OfflineReason::Expired);
                swept.borrow_mut().push(device_event(id, &entry, kind, now, Some(entry.due())));
            },
        );
        let mut swept = swept.into_inner();
        for event in swept.drain(..) {
            match event.kind {
                EventKind::Suspect => self.report_other(event),
                _ => self.report_change(event),
            }
        }
        self.swept = swept;
        if entered {
            let cause = self.preserver.episode.map_or(FleetCause::LateDevices, |e| e.cause);
            self.events.push_back(Event::fleet(EventKind::Degraded, now, self.fleet(cause, 0)));
        }
        self.settle_flaps(now);
        if let Some(after) = self.config.forget_after {
            let mut forgotten = std::mem::take(&mut self.swept);
            self.table.forget_silent(now, after, |device| forgotten.push(forgotten_event(device, now)));
            for event in forgotten.drain(..) {
                self.flaps.forget(&event.device);
                self.events.push_back(event);
            }
            self.swept = forgotten;
        }
    }

    /// Reports the devices the table forgot to make room for new ones.
    fn report_forgotten(&mut self, now: Instant) {
        let forgotten: Vec<Event> =
            self.table.take_forgotten().map(|device| forgotten_event(device, now)).collect();
        for event in forgotten {
            self.flaps.forget(&event.device);
            self.events.push_back(event);
        }
    }

    /// The kernel has dropped `total` datagrams on this engine's socket so
    /// far (SO_RXQ_OVFL): if that went up, the server suspects its own
    /// network and holds devices instead of taking them offline.
    pub fn note_kernel_drops(&mut self, now: Instant, total: u64) {
        if self.preserver.note_kernel_drops(now, total, self.table.online_count()) {
            self.events.push_back(Event::fleet(
                EventKind::Degraded,
                now,
                self.fleet(FleetCause::KernelDrops, 0),
            ));
        }
    }

    /// Whether this engine is degraded (holding devices).
    pub fn is_degraded(&self) -> bool {
        self.preserver.degraded()
    }

    /// The fleet as a degraded or recovered event reports it.
    fn fleet(&self, cause: FleetCause, released: u64) -> Fleet {
        Fleet {
            cause,
            online: self.table.online_count() as u64,
            late: self.table.late_count() as u64,
            held: self.table.held_count() as u64,
            released,
        }
    }

    /// Leaves `degraded`: every device still held goes offline (expired,
    /// with how long it was held), then the `recovered` event.
    fn recover(&mut self, now: Instant, cause: FleetCause) {
        let mut released = std::mem::take(&mut self.swept);
        let counters = &mut self.counters;
        self.table.release_held(|id, entry| {
            counters.bump(Count::Expirations);
            let mut event =
                device_event(id, &entry, EventKind::Offline(OfflineReason::Expired), now, Some(entry.due()));
            event.held_ms = Some(millis_u64(now.saturating_duration_since(entry.due())));
            released.push(event);
        });
        let count = released.len() as u64;
        for event in released.drain(..) {
            self.report_change(event);
        }
        self.swept = released;
        self.events.push_back(Event::fleet(EventKind::Recovered, now, self.fleet(cause, count)));
    }

    /// Reports an online or offline transition whose version the table has
    /// counted, unless flap damping holds it back (then the version is
    /// taken back, so versions stay gap-free for consumers).
    fn report_change(&mut self, event: Event) {
        if event.kind == EventKind::Online && event.version == 1 {
            // A device's first online is not a change of state.
            self.events.push_back(event);
            return;
        }
        match self.flaps.change(&event.device, event.at) {
            flap::Change::Report => self.events.push_back(event),
            flap::Change::StartsFlapping => {
                let online = matches!(event.kind, EventKind::Online);
                self.events.push_back(Event { kind: EventKind::Flapping, online: Some(online), ..event });
            }
            flap::Change::HoldBack => {
                self.table.set_version(event.device.as_bytes(), event.version.saturating_sub(1));
            }
        }
    }

    /// Reports a transition the table does not count (suspect, back from
    /// suspect): it gets the next version, unless the device is flapping.
    fn report_other(&mut self, mut event: Event) {
        if self.flaps.is_flapping(&event.device) {
            return;
        }
        event.version = event.version.saturating_add(1);
        self.table.set_version(event.device.as_bytes(), event.version);
        self.events.push_back(event);
    }

    /// Emits `stable` for flapping devices quiet for the flap window.
    fn settle_flaps(&mut self, now: Instant) {
        let mut quiet = Vec::new();
        self.flaps.settle(now, |device| quiet.push(Box::<str>::from(device)));
        for device in quiet {
            let Some(entry) = self.table.get(&device) else { continue };
            let mut event = device_event(&device, &entry, EventKind::Stable, now, None);
            event.online = Some(entry.is_online());
            event.version = event.version.saturating_add(1);
            self.table.set_version(device.as_bytes(), event.version);
            self.events.push_back(event);
        }
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

    /// Handles datagrams received together, exactly as [`Tracker::handle`]
    /// would one after another, calling `each(i, handled, reply)` after the
    /// `i`th (`reply` is the buffer the result refers to). Faster for a
    /// large table: the heartbeats' ids are hashed and their index lines and
    /// then their slots prefetched for up to [`PREFETCH_BATCH`] datagrams at
    /// once, so their cache misses overlap instead of queueing one behind
    /// the other (ARCHITECTURE.md, "The hot path").
    pub fn handle_batch(
        &mut self,
        now: Instant,
        datagrams: &[(&[u8], SocketAddr)],
        reply: &mut [u8],
        mut each: impl FnMut(usize, Handled, &[u8]),
    ) {
        for (chunk, datagrams) in datagrams.chunks(PREFETCH_BATCH).enumerate() {
            // Stage 1: decode the heartbeats, hash their ids, prefetch the
            // index lines; stage 2: read those lines, prefetch the slots.
            let mut heartbeats: [Option<(wire::RawHeartbeat<'_>, u64)>; PREFETCH_BATCH] =
                [None; PREFETCH_BATCH];
            for ((datagram, _), decoded) in datagrams.iter().zip(&mut heartbeats) {
                if let Some(hb) = wire::decode_heartbeat_ascii(datagram) {
                    let hash = self.table.hash(hb.device);
                    self.table.prefetch_index(hash);
                    *decoded = Some((hb, hash));
                }
            }
            for (_, hash) in heartbeats[..datagrams.len()].iter().flatten() {
                self.table.prefetch_slot(*hash);
            }
            // Stage 3: apply each, in order, as `handle` does.
            for (i, ((datagram, from), decoded)) in datagrams.iter().zip(&heartbeats).enumerate() {
                let handled = match *decoded {
                    Some((hb, hash)) => {
                        self.expire_due(now);
                        self.usual_heartbeat(now, *from, datagram, hb, hash, reply)
                    }
                    None => self.handle(now, *from, datagram, reply),
                };
                each(chunk * PREFETCH_BATCH + i, handled, reply);
            }
        }
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
        self.expire_due(now);
        if let Some(hb) = wire::decode_heartbeat_ascii(datagram) {
            let hash = self.table.hash(hb.device);
            return self.usual_heartbeat(now, from, datagram, hb, hash, reply);
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

    /// Expires what is due at `now`, if anything is (a few compares, not a
    /// sweep): done before every datagram.
    #[inline]
    fn expire_due(&mut self, now: Instant) {
        // `poll_timeout() <= now`, without working out the minimum.
        if self.timers().into_iter().any(|at| at.is_some_and(|at| at <= now)) {
            self.handle_timeout(now);
        }
    }

    /// The usual heartbeat (the wire format's fast path decoded it); its
    /// tag, if any, is the datagram's last 8 bytes.
    #[inline]
    fn usual_heartbeat(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        hb: wire::RawHeartbeat<'_>,
        hash: u64,
        reply: &mut [u8],
    ) -> Handled {
        let tag = hb.tag.map(|tag| (&datagram[..datagram.len() - auth::TAG_LEN], tag));
        self.heartbeat_hashed(now, from, hb, hash, tag, datagram.len(), reply)
            .unwrap_or_else(|reason| self.drop(reason, None))
    }

    fn drop(&mut self, reason: DropReason, reply: Option<usize>) -> Handled {
        self.counters.bump(Count::Dropped(reason));
        Handled::Dropped { reason, reply }
    }
}

/// Datagrams whose table lookups [`Tracker::handle_batch`] overlaps: as
/// many as one `recvmmsg` call returns, and about as many misses as a core
/// keeps in flight.
pub const PREFETCH_BATCH: usize = 64;

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

/// An event about one device, from its entry; `version` is the entry's.
fn device_event(
    id: &str,
    entry: &Entry<'_>,
    kind: EventKind,
    at: Instant,
    deadline: Option<Instant>,
) -> Event {
    Event {
        device: id.into(),
        kind,
        at,
        deadline,
        addr: entry.addr(),
        version: entry.version(),
        boot: entry.window().boot(),
        heartbeat_seq: entry.window().top(),
        held_ms: None,
        ttl_ms: None,
        online: None,
        fleet: None,
    }
}

/// A `forgotten` event: the next version, as the device was last seen.
fn forgotten_event(device: Forgotten, at: Instant) -> Event {
    Event {
        kind: EventKind::Forgotten(device.reason),
        at,
        deadline: None,
        addr: device.addr,
        version: device.version.saturating_add(1),
        boot: device.boot,
        heartbeat_seq: device.seq,
        held_ms: None,
        ttl_ms: None,
        online: None,
        fleet: None,
        device: device.id.into(),
    }
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
mod resilience_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
