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
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::{self, Key};
use crate::limit::{QueryGate, Repeat};
use crate::shard;
use crate::table::{Beat, DeviceId, Entry, OfflineReason, PresenceTable, Refusal, Which};
use crate::wire::{
    self, Ack, Counter, DeviceInfo, DropReason, ErrorCode, ErrorReply, Leave, Message, Page, Query,
    QueryKind, RawHeartbeat, RecordWriter, Status, StatusBody, Summary, Tag,
};

/// The shortest TTL the engine accepts: TTLs are kept in whole milliseconds.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// The longest TTL the engine accepts: the protocol carries TTLs as 32-bit
/// milliseconds (about 49 days 17 hours).
pub const MAX_TTL: Duration = Duration::from_millis(u32::MAX as u64);

/// Whether heartbeats and leaves must carry a valid tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A tag is required and must verify.
    Required,
    /// Untagged frames are accepted; a tag, if present, must verify (for migrating a fleet).
    Optional,
    /// Tags are ignored. Anyone who can reach the port can forge heartbeats.
    Off,
}

/// The keys the server derives from its master secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    /// Device keys are derived from this and the device id, per datagram.
    device_subkey: Key,
    /// Signs operator queries.
    operator: Key,
}

impl Keys {
    /// Derives the server's keys from the master secret.
    pub fn from_master(master: &Key) -> Self {
        Keys { device_subkey: auth::device_subkey(master), operator: auth::operator_key(master) }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// The engine's rules: TTLs, authentication and abuse limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// TTL of a device that declares no interval.
    pub timeout: Duration,
    /// A device that declares an interval is offline after this many missed heartbeats.
    pub misses: u32,
    /// No device gets a TTL below this (protects against tiny declared intervals).
    pub min_ttl: Duration,
    /// No device gets a TTL above this (protects against huge declared intervals).
    pub max_ttl: Duration,
    /// Whether heartbeats and leaves must be signed.
    pub auth: AuthMode,
    /// The keys, if the server has a master secret. Needed unless `auth` is `Off`.
    pub keys: Option<Keys>,
    /// Most devices held, online or offline; see [`PresenceTable::new`].
    pub max_devices: usize,
    /// Sources whose queries need no operator tag.
    pub query_allow: Vec<ipnet::IpNet>,
    /// Queries per second allowed per source address.
    pub query_rate: u32,
    /// Queries a quiet source may send at once.
    pub query_burst: u32,
    /// Most query sources tracked by the rate limiter at once.
    pub max_query_sources: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(30),
            misses: 3,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            auth: AuthMode::Off,
            keys: None,
            max_devices: 1_000_000,
            query_allow: vec![
                "127.0.0.0/8".parse().unwrap_or_default(),
                "::1/128".parse().unwrap_or_default(),
            ],
            query_rate: 20,
            query_burst: 40,
            max_query_sources: 4096,
        }
    }
}

/// A configuration the engine cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `auth` is `Required` or `Optional` but there are no keys.
    #[error("authentication needs a master key (--key-file)")]
    AuthWithoutKey,
    /// `min_ttl` is larger than `max_ttl`.
    #[error("the minimum TTL is larger than the maximum TTL")]
    TtlRange,
    /// A TTL setting is below [`MIN_TTL`] or above [`MAX_TTL`].
    #[error("TTLs must be between 1ms and 49days 17h 2m 47s 295ms (32-bit milliseconds)")]
    TtlOutOfRange,
}

impl Config {
    /// The TTL for a device that declared `interval` (zero = none):
    /// `misses × interval` clamped to `[min_ttl, max_ttl]`, or `timeout`.
    pub fn ttl(&self, interval: Duration) -> Duration {
        if interval.is_zero() {
            return self.timeout;
        }
        // In whole nanoseconds: cheaper than Duration arithmetic on the hot path.
        let nanos = |d: Duration| {
            d.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(d.subsec_nanos()))
        };
        let ttl = nanos(interval).saturating_mul(u64::from(self.misses));
        let (min, max) = (nanos(self.min_ttl), nanos(self.max_ttl));
        Duration::from_nanos(ttl.clamp(min, max.max(min)))
    }

    /// The interval the server expects from a device that declared
    /// `interval`: the declared one, or `timeout / misses` if none.
    pub fn expected_interval(&self, interval: Duration) -> Duration {
        if interval.is_zero() { self.timeout / self.misses.max(1) } else { interval }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.auth != AuthMode::Off && self.keys.is_none() {
            return Err(ConfigError::AuthWithoutKey);
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError::TtlRange);
        }
        let in_range = |ttl: Duration| (MIN_TTL..=MAX_TTL).contains(&ttl);
        if !(in_range(self.timeout) && in_range(self.min_ttl) && in_range(self.max_ttl)) {
            return Err(ConfigError::TtlOutOfRange);
        }
        Ok(())
    }
}

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

    fn count_drop(&mut self, reason: DropReason) {
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

/// Bytes added to an exact `RequestTooSmall.needed`: an answer can grow
/// between the refusal and the padded retry (times and counters take more
/// varint bytes), so the client is told a little more than it needs now.
pub const NEEDED_HEADROOM: usize = 16;

/// Bytes of a varint holding `n`.
fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// The exact length of a `Page` status frame: version, kind, request id,
/// body variant, the cursor option (and cursor), the matched count, and the
/// entries as a length-prefixed byte string.
fn page_len(request: u32, cursor: Option<usize>, matched: u64, entries: usize) -> usize {
    let cursor = cursor.map_or(1, |len| 1 + varint_len(len as u64) + len);
    1 + 1
        + varint_len(request.into())
        + 1
        + cursor
        + varint_len(matched)
        + varint_len(entries as u64)
        + entries
}

/// What [`Tracker::fill_page`] wrote: the entries' length in
/// `page_scratch`, how many devices matched, and the (shard, slot) the next
/// page starts at (`None` on the last page).
type PageFill = (usize, u64, Option<(usize, usize)>);

/// Most devices a list page examines: with a prefix filter, or counting
/// from a cursor, a page ends here (short or empty, with a cursor) so that
/// it costs a bounded amount whatever the table holds.
pub const LIST_SCAN_LIMIT: usize = 4096;

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
    /// This engine's shard number and the number of shards (`--threads`).
    shard: (usize, usize),
    /// The other shards' totals, added to a summary; see [`Tracker::set_peer_totals`].
    peers: Totals,
    /// The last declared interval (ms) seen and the TTL it gets.
    last_ttl: Option<(u32, Duration)>,
}

impl Tracker {
    /// A new engine whose clocks read `now` and `wall` at creation.
    pub fn new(config: Config, now: Instant, wall: SystemTime) -> Result<Self, ConfigError> {
        config.validate()?;
        let gate = QueryGate::new(config.query_rate, config.query_burst, config.max_query_sources);
        Ok(Tracker {
            table: PresenceTable::new(config.max_devices, now),
            gate: Arc::new(Mutex::new(gate)),
            config,
            counters: Counters::default(),
            started: now,
            started_wall: wall,
            events: VecDeque::new(),
            page_scratch: vec![0; wire::MAX_DATAGRAM].into_boxed_slice(),
            page_ends: Vec::new(),
            shard: (0, 1),
            peers: Totals::default(),
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
            tracker.shard = (index, count);
            if let Some(first) = shards.first() {
                tracker.gate = Arc::clone(&first.gate);
            }
            shards.push(tracker);
        }
        Ok(shards)
    }

    /// This engine's shard number and the number of shards.
    pub fn shard(&self) -> (usize, usize) {
        self.shard
    }

    /// This engine's own counts and counters.
    pub fn totals(&self) -> Totals {
        Totals {
            online: self.table.online_count() as u64,
            known: self.table.known_count() as u64,
            counters: self.counters.clone(),
            events_lost: 0,
        }
    }

    /// What the other shards hold and counted, as last set.
    pub fn peer_totals(&self) -> &Totals {
        &self.peers
    }

    /// Sets what the other shards hold and counted, for summaries answered
    /// from now on. The server refreshes it before passing on a summary query.
    pub fn set_peer_totals(&mut self, peers: Totals) {
        self.peers = peers;
    }

    /// The rules in force.
    pub fn config(&self) -> &Config {
        &self.config
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
            None => self.started_wall - self.started.duration_since(at),
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
            counters.expirations += 1;
            events.push_back(Event {
                device: id.into(),
                kind: EventKind::Offline(OfflineReason::Expired),
                at: now,
                deadline: Some(entry.due()),
                addr: entry.addr(),
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
            Message::Query(query) => self.query(now, from, query, tag, datagram.len(), reply),
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
        self.counters.count_drop(reason);
        Handled::Dropped { reason, reply }
    }

    /// Checks the tag of a device's frame as `auth` demands; returns
    /// whether the frame is signed (a tag that verified). Under `Off` tags
    /// are ignored, so no frame counts as signed.
    fn authenticate_device(&self, device: &[u8], tag: Option<(&[u8], Tag)>) -> Result<bool, DropReason> {
        match (self.config.auth, tag, &self.config.keys) {
            (AuthMode::Off, _, _) | (AuthMode::Optional, None, _) => Ok(false),
            (AuthMode::Required, None, _) => Err(DropReason::MissingTag),
            (_, Some(_), None) => Err(DropReason::UnknownKey),
            (_, Some((signed, tag)), Some(keys)) => {
                let key = auth::device_key_from_subkey(&keys.device_subkey, device);
                if auth::verify(&key, signed, &tag) { Ok(true) } else { Err(DropReason::BadTag) }
            }
        }
    }

    fn heartbeat(
        &mut self,
        now: Instant,
        from: SocketAddr,
        hb: RawHeartbeat<'_>,
        tag: Option<(&[u8], Tag)>,
        request_len: usize,
        reply: &mut [u8],
    ) -> Result<Handled, DropReason> {
        let signed = self.authenticate_device(hb.device, tag)?;
        let interval = Duration::from_millis(hb.interval_ms.into());
        // A fleet mostly declares one interval: remember the last TTL worked out.
        let ttl = match self.last_ttl {
            Some((declared, ttl)) if declared == hb.interval_ms => ttl,
            _ => {
                let ttl = self.config.ttl(interval);
                self.last_ttl = Some((hb.interval_ms, ttl));
                ttl
            }
        };
        let beat =
            Beat { addr: from, boot: hb.boot, seq: hb.seq, interval, ttl, payload: hb.payload, signed };
        let came_online = self.table.beat(now, hb.device, beat).map_err(refusal)?;
        self.counters.heartbeats += 1;
        // A device that came online was just admitted (or held), so its id is UTF-8.
        if let Some(device) = came_online.then(|| std::str::from_utf8(hb.device).ok()).flatten() {
            self.events.push_back(Event {
                device: device.into(),
                kind: EventKind::Online,
                at: now,
                deadline: None,
                addr: from,
            });
        }
        if hb.flags & wire::FLAG_ACK == 0 {
            return Ok(Handled::Done);
        }
        let ack = Message::Ack(Ack {
            boot: hb.boot,
            seq: hb.seq,
            interval_ms: millis_u32(self.config.expected_interval(interval)),
            ttl_ms: millis_u32(ttl),
        });
        // An ack larger than the heartbeat is not sent (no amplification);
        // a signed heartbeat is always large enough.
        Ok(match wire::encode(&ack, reply) {
            Ok(len) if len <= request_len => Handled::Reply(len),
            _ => Handled::Done,
        })
    }

    fn leave(
        &mut self,
        now: Instant,
        leave: Leave<'_>,
        tag: Option<(&[u8], Tag)>,
    ) -> Result<Handled, DropReason> {
        let signed = self.authenticate_device(leave.device.as_bytes(), tag)?;
        let left = self.table.leave(leave.device, leave.boot, leave.seq, signed).map_err(refusal)?;
        if let Some(entry) = left {
            let addr = entry.addr();
            self.events.push_back(Event {
                device: leave.device.into(),
                kind: EventKind::Offline(OfflineReason::Left),
                at: now,
                deadline: None,
                addr,
            });
        }
        self.counters.leaves += 1;
        Ok(Handled::Done)
    }

    /// Whether `ip` may query without an operator tag.
    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.query_allow.iter().any(|net| net.contains(&ip))
    }

    /// Decides whether a query is answered. Unsigned queries must come from
    /// `--query-allow` and keep to their source's rate; the others never
    /// reach a bucket. A signed query must verify, carry a time within
    /// [`wire::QUERY_SKEW_MS`] of the server's clock, not have been answered
    /// before, and keep to its source's operator rate. A flood without the
    /// key thus touches no bucket and no memory an operator relies on.
    fn admit_query(
        &mut self,
        now: Instant,
        from: SocketAddr,
        query: &Query<'_>,
        tag: Option<(&[u8], Tag)>,
    ) -> Result<(), DropReason> {
        let ip = from.ip();
        let Some((signed, tag)) = tag else {
            if !self.allowed(ip) {
                return Err(DropReason::NotAllowed);
            }
            return if self.gate().unsigned.allow(now, ip) { Ok(()) } else { Err(DropReason::RateLimited) };
        };
        let keys = self.config.keys.as_ref().ok_or(DropReason::UnknownKey)?;
        if !auth::verify(&keys.operator, signed, &tag) {
            return Err(DropReason::BadTag);
        }
        let sent = query.tag.map_or(0, |t| t.sent_unix_ms);
        if sent.abs_diff(self.unix_ms(now)) > wire::QUERY_SKEW_MS {
            return Err(DropReason::StaleQuery);
        }
        let mut gate = self.gate();
        // Repeats are refused before the bucket, so replaying an operator's
        // captured queries cannot spend its tokens.
        match gate.recent.admit(now, tag) {
            Ok(()) => {}
            Err(Repeat::Seen) => return Err(DropReason::Replay),
            Err(Repeat::Full) => return Err(DropReason::RateLimited),
        }
        if gate.operator.allow(now, ip) { Ok(()) } else { Err(DropReason::RateLimited) }
    }

    fn query(
        &mut self,
        now: Instant,
        from: SocketAddr,
        query: Query<'_>,
        tag: Option<(&[u8], Tag)>,
        request_len: usize,
        reply: &mut [u8],
    ) -> Result<Handled, DropReason> {
        self.admit_query(now, from, &query, tag)?;
        self.counters.queries += 1;
        let budget = request_len.min(wire::MAX_DATAGRAM);
        let needed = match self.answer(now, query, budget, reply) {
            Ok(len) if len <= request_len => return Ok(Handled::Reply(len)),
            Ok(len) | Err(len) => len,
        };
        let needed = u16::try_from((needed + NEEDED_HEADROOM).min(wire::MAX_DATAGRAM)).unwrap_or(u16::MAX);
        Ok(match error_reply(ErrorCode::RequestTooSmall { needed }, request_len, reply) {
            Some(n) => Handled::Reply(n),
            None => Handled::Done,
        })
    }

    /// Encodes the status answering `query` into `reply`; a page holds as
    /// many entries as fit in `budget` bytes in all. Returns the length, or
    /// `Err` with the exact size a page needs when not even one entry fits.
    fn answer(
        &mut self,
        now: Instant,
        query: Query<'_>,
        budget: usize,
        reply: &mut [u8],
    ) -> Result<usize, usize> {
        let cursor: Option<String>;
        let mut counter_buf = [0u8; (DropReason::ALL.len() + 1) * 16];
        let body = match query.kind {
            QueryKind::Device(device) => match self.table.get(device) {
                Some(entry) => {
                    StatusBody::Device(device_info(self.started, self.started_wall, now, device, &entry))
                }
                None => StatusBody::UnknownDevice,
            },
            QueryKind::Summary => {
                let mut totals = self.totals();
                totals.add(&self.peers);
                let mut counters = RecordWriter::new(&mut counter_buf);
                let drops =
                    DropReason::ALL.into_iter().map(|reason| (reason.code(), totals.counters.drops(reason)));
                for (code, count) in drops.chain([(wire::COUNTER_EVENTS_LOST, totals.events_lost)]) {
                    if count > 0 {
                        // Cannot fail: the buffer holds every counter at its largest.
                        let _ = counters.push(&Counter { code, count });
                    }
                }
                StatusBody::Summary(Summary {
                    online: totals.online,
                    known: totals.known,
                    uptime_ms: millis_u64(now.saturating_duration_since(self.started)),
                    heartbeats: totals.counters.heartbeats,
                    leaves: totals.counters.leaves,
                    queries: totals.counters.queries,
                    expirations: totals.counters.expirations,
                    counters: counters.finish(),
                })
            }
            QueryKind::List { after, limit, filter } => {
                let (entries_len, matched, next) =
                    self.fill_page(now, query.request, after, limit, filter, budget)?;
                cursor = next.map(|(shard, slot)| shard::format_cursor(shard, slot));
                let entries = wire::Records::from_bytes(&self.page_scratch[..entries_len]);
                StatusBody::Page(Page { next_cursor: cursor.as_deref(), matched, entries })
            }
        };
        wire::encode(&Message::Status(Status { request: query.request, body }), reply)
            .map_err(|_| wire::MAX_DATAGRAM)
    }

    /// Writes the entries of a list page into `page_scratch`: as many of the
    /// devices `filter` selects, from the cursor on, as fit in a
    /// `budget`-byte reply together with the header and the cursor the page
    /// ends up needing. Returns the entries' length, how many devices
    /// matched, and where the next page starts (`None` on the last).
    ///
    /// Costs O(entries) for a plain listing whatever the table holds, and at
    /// most [`LIST_SCAN_LIMIT`] devices examined with a prefix; counting
    /// this shard's devices from its start costs O(1).
    fn fill_page(
        &mut self,
        now: Instant,
        request: u32,
        after: Option<&str>,
        limit: u16,
        filter: wire::ListFilter<'_>,
        budget: usize,
    ) -> Result<PageFill, usize> {
        let limit = if limit == 0 { usize::MAX } else { usize::from(limit) };
        let (shard, shards) = self.shard;
        let next_shard = (shard + 1 < shards).then_some((shard + 1, 0));
        // The longest cursor this page could end with: a slot of this shard,
        // or the start of the next shard.
        let cursor_max =
            shard::cursor_len(shard, self.table.slot_count()).max(shard::cursor_len(shard + 1, 0));
        // The cursor names this shard and the slot to start at. An
        // unreadable cursor, or one of another shard, gets an empty last page.
        let start = match after {
            None => Some(0),
            Some(cursor) => shard::parse_cursor(cursor).filter(|(s, _)| *s == shard).map(|(_, slot)| slot),
        };
        let which = match filter.state {
            wire::LIST_ONLINE => Which::Online,
            wire::LIST_OFFLINE => Which::Offline,
            wire::LIST_ALL => Which::All,
            _ => return Ok((0, 0, None)),
        };
        let Some(start) = start else {
            return Ok((0, 0, None));
        };
        if filter.count_only && filter.prefix.is_none() && start == 0 {
            let (online, known) = (self.table.online_count() as u64, self.table.known_count() as u64);
            let count = match which {
                Which::Online => online,
                Which::Offline => known - online,
                Which::All => known,
            };
            return Ok((0, count, next_shard));
        }
        let prefix = filter.prefix.unwrap_or_default().as_bytes();
        self.page_ends.clear();
        let (mut more, mut end, mut matched, mut scanned) = (None, 0, 0u64, 0);
        // The size of the first entry, for a `needed` if none fits.
        let mut too_big = None;
        for (slot, id, entry) in self.table.devices_from(which, start) {
            if scanned == LIST_SCAN_LIMIT || self.page_ends.len() == limit {
                more = Some(slot);
                break;
            }
            scanned += 1;
            if !id.as_bytes().starts_with(prefix) {
                continue;
            }
            if filter.count_only {
                matched += 1;
                continue;
            }
            let info = device_info(self.started, self.started_wall, now, id, &entry);
            let written = postcard::to_slice(&info, &mut self.page_scratch[end..]).map(|b| b.len());
            let count = self.page_ends.len() as u64 + 1;
            match written {
                Ok(n) if page_len(request, None, count, end + n) <= budget => {
                    end += n;
                    self.page_ends.push((slot, end));
                }
                _ => {
                    if self.page_ends.is_empty() {
                        too_big = Some(written.unwrap_or(wire::MAX_DATAGRAM));
                    }
                    more = Some(slot);
                    break;
                }
            }
        }
        let mut next = match more {
            Some(slot) => Some((shard, slot)),
            // This shard is done: the listing goes on with the next one.
            None => next_shard,
        };
        // A page that continues needs room for its cursor: give back entries
        // from the end until it fits; the next page starts with them.
        if next.is_some() {
            while page_len(request, Some(cursor_max), self.page_ends.len() as u64, end) > budget {
                let Some((slot, first_end)) = self.page_ends.pop() else { break };
                if self.page_ends.is_empty() {
                    too_big = Some(first_end);
                }
                next = Some((shard, slot));
                end = self.page_ends.last().map_or(0, |(_, e)| *e);
            }
        }
        if let (true, Some(first)) = (self.page_ends.is_empty(), too_big) {
            // Not even one entry fits this request: say what would.
            return Err(page_len(request, Some(cursor_max), 1, first));
        }
        if !filter.count_only {
            matched = self.page_ends.len() as u64;
        }
        Ok((end, matched, next))
    }
}

fn refusal(refusal: Refusal) -> DropReason {
    match refusal {
        Refusal::Replay => DropReason::Replay,
        Refusal::OverCapacity => DropReason::OverCapacity,
        Refusal::BadId => DropReason::BadDeviceId,
        Refusal::Unsigned => DropReason::MissingTag,
    }
}

/// The reply record for one device, with times relative to `now`.
fn device_info<'e>(
    started: Instant,
    started_wall: SystemTime,
    now: Instant,
    device: &'e str,
    entry: &Entry<'e>,
) -> DeviceInfo<'e> {
    let last_seen_wall = started_wall + entry.last_seen().saturating_duration_since(started);
    DeviceInfo {
        device,
        online: entry.is_online(),
        addr: entry.addr().into(),
        last_seen_ago_ms: millis_u64(now.saturating_duration_since(entry.last_seen())),
        last_seen_unix_ms: millis_u64(last_seen_wall.duration_since(UNIX_EPOCH).unwrap_or_default()),
        expires_in_ms: entry
            .deadline()
            .map_or(0, |deadline| millis_u64(deadline.saturating_duration_since(now))),
        ttl_ms: millis_u32(entry.ttl()),
        interval_ms: millis_u32(entry.interval()),
        boot: entry.window().boot(),
        seq: entry.window().top(),
        heartbeats: entry.heartbeats(),
        flaps: entry.flaps(),
        payload: entry.payload(),
        offline_reason: match entry.offline_reason() {
            None => wire::OFFLINE_NONE,
            Some(OfflineReason::Expired) => wire::OFFLINE_EXPIRED,
            Some(OfflineReason::Left) => wire::OFFLINE_LEFT,
        },
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

#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
