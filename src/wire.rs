//! Wire protocol v1: every datagram is one frame, a version byte followed by
//! one postcard-encoded [`Message`].
//!
//! This module is `no_std` and never allocates: [`encode`] writes into a
//! caller's buffer and [`decode`] borrows strings and byte strings from the
//! datagram. PROTOCOL.md describes the same format byte by byte.
//!
//! Lists inside a reply (the entries of a [`Page`], the counters of a
//! [`Summary`]) are [`Records`]: one length-prefixed byte string holding
//! concatenated postcard records. That keeps every message borrowable and
//! decodable without an allocator, while staying plain postcard on the wire.

use core::fmt;
use core::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this crate speaks; the first byte of every frame.
pub const VERSION: u8 = 1;
/// No frame, request or reply, is larger than this. It fits the IPv6 minimum
/// MTU with room for headers, so replies are never fragmented.
pub const MAX_DATAGRAM: usize = 1200;
/// Longest device id, in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 64;
/// Longest application payload a heartbeat may carry, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64;
/// A truncated MAC; see [`crate::auth`].
pub type Tag = [u8; 8];
/// Heartbeat flag: the device wants an [`Ack`] back.
pub const FLAG_ACK: u8 = 0x01;
/// The flag bits defined by v1; the others are reserved, sent as zero and ignored.
pub const KNOWN_FLAGS: u8 = FLAG_ACK;
/// Number of top-level message kinds; a kind byte at or above this is unknown.
const KIND_COUNT: u8 = 6;

/// Why a frame could not be encoded or decoded. Small and `Copy`, so it costs
/// nothing on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The datagram ended before the frame did (this includes empty datagrams).
    Truncated,
    /// The datagram is longer than [`MAX_DATAGRAM`].
    Oversized,
    /// The version byte is not [`VERSION`]; carries the version that was sent.
    UnsupportedVersion(u8),
    /// The kind byte names no message of this version.
    UnknownKind,
    /// A field is not valid postcard (bad varint, bad UTF-8, bad enum tag, ...).
    Malformed,
    /// Bytes follow the end of the frame.
    TrailingBytes,
    /// A device id is empty or longer than [`MAX_ID_LEN`].
    BadDeviceId,
    /// A payload is longer than [`MAX_PAYLOAD_LEN`].
    PayloadTooLong,
    /// A device id holds a control character (C0, DEL or C1), which could
    /// forge lines in logs and terminals that show it.
    IdControlChar,
    /// Encoding only: the caller's buffer cannot hold the frame.
    BufferTooSmall,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("datagram ended before the frame did"),
            Error::Oversized => write!(f, "datagram longer than {MAX_DATAGRAM} bytes"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Error::UnknownKind => f.write_str("unknown message kind"),
            Error::Malformed => f.write_str("malformed field"),
            Error::TrailingBytes => f.write_str("trailing bytes after the frame"),
            Error::BadDeviceId => write!(f, "device id must be 1..={MAX_ID_LEN} bytes"),
            Error::PayloadTooLong => write!(f, "payload longer than {MAX_PAYLOAD_LEN} bytes"),
            Error::IdControlChar => f.write_str("device id holds a control character"),
            Error::BufferTooSmall => f.write_str("buffer too small for the frame"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => Error::Truncated,
            postcard::Error::SerializeBufferFull => Error::BufferTooSmall,
            _ => Error::Malformed,
        }
    }
}

/// Why the server dropped a datagram. The numeric codes travel in
/// [`Summary::counters`], so they are part of the protocol and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum DropReason {
    /// See [`Error::Truncated`].
    Truncated = 1,
    /// See [`Error::Oversized`].
    Oversized = 2,
    /// See [`Error::UnsupportedVersion`].
    UnsupportedVersion = 3,
    /// See [`Error::UnknownKind`].
    UnknownKind = 4,
    /// See [`Error::Malformed`].
    Malformed = 5,
    /// See [`Error::TrailingBytes`].
    TrailingBytes = 6,
    /// See [`Error::BadDeviceId`].
    BadDeviceId = 7,
    /// See [`Error::PayloadTooLong`].
    PayloadTooLong = 8,
    /// A well-formed frame of a kind the server never accepts (a reply).
    UnexpectedKind = 9,
    /// The tag does not match (forged, or made with another key).
    BadTag = 10,
    /// The (boot, seq) pair is not newer than what the server has seen, or
    /// was already seen inside the reordering window.
    Replay = 11,
    /// A tag the server has no key to check (it runs without `--key-file`).
    UnknownKey = 12,
    /// A new device while the table is full of online devices (`--max-devices`).
    OverCapacity = 13,
    /// A query over its source's rate limit.
    RateLimited = 14,
    /// A query without an operator tag from a source outside `--query-allow`.
    NotAllowed = 15,
    /// A heartbeat or leave without a tag under `--auth required`, or an
    /// unsigned one under `--auth optional` for a device that has signed before.
    MissingTag = 16,
    /// See [`Error::IdControlChar`].
    IdControlChar = 17,
    /// A signed query whose time is outside the server's window
    /// ([`QUERY_SKEW_MS`] either side of its clock).
    StaleQuery = 18,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [DropReason; 18] = [
        DropReason::Truncated,
        DropReason::Oversized,
        DropReason::UnsupportedVersion,
        DropReason::UnknownKind,
        DropReason::Malformed,
        DropReason::TrailingBytes,
        DropReason::BadDeviceId,
        DropReason::PayloadTooLong,
        DropReason::UnexpectedKind,
        DropReason::BadTag,
        DropReason::Replay,
        DropReason::UnknownKey,
        DropReason::OverCapacity,
        DropReason::RateLimited,
        DropReason::NotAllowed,
        DropReason::MissingTag,
        DropReason::IdControlChar,
        DropReason::StaleQuery,
    ];

    /// The code carried in [`Counter::code`].
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The reason for a code, if this version knows it.
    pub fn from_code(code: u16) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// A stable snake_case name for logs, JSON and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Oversized => "oversized",
            DropReason::UnsupportedVersion => "unsupported_version",
            DropReason::UnknownKind => "unknown_kind",
            DropReason::Malformed => "malformed",
            DropReason::TrailingBytes => "trailing_bytes",
            DropReason::BadDeviceId => "bad_device_id",
            DropReason::PayloadTooLong => "payload_too_long",
            DropReason::UnexpectedKind => "unexpected_kind",
            DropReason::BadTag => "bad_tag",
            DropReason::Replay => "replay",
            DropReason::UnknownKey => "unknown_key",
            DropReason::OverCapacity => "over_capacity",
            DropReason::RateLimited => "rate_limited",
            DropReason::NotAllowed => "not_allowed",
            DropReason::MissingTag => "missing_tag",
            DropReason::IdControlChar => "id_control_char",
            DropReason::StaleQuery => "stale_query",
        }
    }
}

impl From<Error> for DropReason {
    fn from(e: Error) -> Self {
        match e {
            Error::Truncated | Error::BufferTooSmall => DropReason::Truncated,
            Error::Oversized => DropReason::Oversized,
            Error::UnsupportedVersion(_) => DropReason::UnsupportedVersion,
            Error::UnknownKind => DropReason::UnknownKind,
            Error::Malformed => DropReason::Malformed,
            Error::TrailingBytes => DropReason::TrailingBytes,
            Error::BadDeviceId => DropReason::BadDeviceId,
            Error::PayloadTooLong => DropReason::PayloadTooLong,
            Error::IdControlChar => DropReason::IdControlChar,
        }
    }
}

/// "I am alive": sent by a device every `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat<'a> {
    /// Who is speaking; devices are identified by id, never by address.
    pub device: &'a str,
    /// Changes each time the device boots, so the server can tell a reboot
    /// from a late or repeated heartbeat.
    pub boot: u32,
    /// Increases by one per heartbeat within a boot.
    pub seq: u32,
    /// The device's own send interval in milliseconds; 0 means "use the
    /// server's default timeout".
    pub interval_ms: u32,
    /// Bit field; see [`FLAG_ACK`].
    pub flags: u8,
    /// Opaque application data (battery level, firmware version, ...).
    pub payload: &'a [u8],
    /// MAC over every frame byte before it, with the device's key; see [`crate::auth`].
    pub tag: Option<Tag>,
}

/// "I am going offline now": a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave<'a> {
    /// The device that leaves.
    pub device: &'a str,
    /// The boot epoch of the heartbeats it sent.
    pub boot: u32,
    /// The next sequence number after its last heartbeat.
    pub seq: u32,
    /// MAC with the device's key, as for [`Heartbeat::tag`].
    pub tag: Option<Tag>,
}

/// A status request from an operator or a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query<'a> {
    /// Echoed in the [`Status`] reply so the client can match it.
    pub request: u32,
    /// What is asked.
    #[serde(borrow)]
    pub kind: QueryKind<'a>,
    /// Ignored bytes that make the request as large as the reply it asks
    /// for: the server never replies with more bytes than it received.
    pub padding: &'a [u8],
    /// The operator's signature: the time it was sent and a MAC with the
    /// operator key; optional. See [`QueryTag`].
    pub tag: Option<QueryTag>,
}

/// How far, in milliseconds, a signed query's time may be from the
/// server's clock, either way (30 s). Outside it the query is dropped as
/// [`DropReason::StaleQuery`]; inside it, each signed query is answered once.
pub const QUERY_SKEW_MS: u64 = 30_000;

/// An operator's signature on a [`Query`]: the sender's wall time, then the
/// tag over every frame byte before the tag (the time included), so a
/// captured query cannot be answered again later or twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryTag {
    /// When the query was signed: Unix time in milliseconds, by the sender's clock.
    pub sent_unix_ms: u64,
    /// MAC with the operator key, as for [`Heartbeat::tag`].
    pub tag: Tag,
}

/// The three questions the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryKind<'a> {
    /// One device, online or not.
    Device(&'a str),
    /// Counts and counters.
    Summary,
    /// One page of the devices that `filter` selects (the online ones, by
    /// default), in the server's storage order.
    List {
        /// The previous page's `next_cursor`, unchanged (opaque); `None` for the first page.
        after: Option<&'a str>,
        /// At most this many entries; 0 means "as many as fit".
        limit: u16,
        /// Which devices, and whether to send them or only count them.
        #[serde(borrow)]
        filter: ListFilter<'a>,
    },
}

/// Which devices a [`QueryKind::List`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter<'a> {
    /// [`LIST_ONLINE`], [`LIST_OFFLINE`] or [`LIST_ALL`]; other values select nothing.
    pub state: u8,
    /// Only devices whose id starts with these bytes (1 to 64 bytes), if set.
    pub prefix: Option<&'a str>,
    /// Send no entries, only [`Page::matched`]: counting a fleet costs one
    /// small datagram per page instead of its whole listing.
    pub count_only: bool,
}

/// [`ListFilter::state`]: devices online now.
pub const LIST_ONLINE: u8 = 0;
/// [`ListFilter::state`]: devices the server holds that are offline.
pub const LIST_OFFLINE: u8 = 1;
/// [`ListFilter::state`]: every device the server holds.
pub const LIST_ALL: u8 = 2;

impl ListFilter<'_> {
    /// The online devices, listed (v1's original listing).
    pub const ONLINE: ListFilter<'static> =
        ListFilter { state: LIST_ONLINE, prefix: None, count_only: false };
}

/// The reply to a [`Query`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status<'a> {
    /// The [`Query::request`] this answers.
    pub request: u32,
    /// The answer.
    #[serde(borrow)]
    pub body: StatusBody<'a>,
}

/// The answer inside a [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusBody<'a> {
    /// The device asked for (it may be offline).
    Device(#[serde(borrow)] DeviceInfo<'a>),
    /// The server has never seen (or has forgotten) this device.
    UnknownDevice,
    /// The server's counts and counters.
    Summary(#[serde(borrow)] Summary<'a>),
    /// One page of the online list.
    Page(#[serde(borrow)] Page<'a>),
}

/// What the server knows about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo<'a> {
    /// The device id.
    pub device: &'a str,
    /// Whether the device is online now.
    pub online: bool,
    /// Source address of its last accepted datagram.
    pub addr: Addr,
    /// Milliseconds since its last heartbeat, by the server's monotonic clock.
    pub last_seen_ago_ms: u64,
    /// The wall time of its last heartbeat, in Unix milliseconds, for display.
    pub last_seen_unix_ms: u64,
    /// Milliseconds until it expires; 0 when offline.
    pub expires_in_ms: u64,
    /// The TTL the server applies to it, in milliseconds.
    pub ttl_ms: u32,
    /// The interval it declared (0 = none).
    pub interval_ms: u32,
    /// Boot epoch of its last heartbeat.
    pub boot: u32,
    /// Sequence number of its last heartbeat.
    pub seq: u32,
    /// Heartbeats accepted from it since the server started.
    pub heartbeats: u64,
    /// Times it went offline since the server started.
    pub flaps: u32,
    /// Payload of its last heartbeat.
    pub payload: &'a [u8],
    /// Why it is offline: [`OFFLINE_NONE`] while online, [`OFFLINE_EXPIRED`]
    /// or [`OFFLINE_LEFT`]; other values are reserved (show them as unknown).
    pub offline_reason: u8,
}

/// [`DeviceInfo::offline_reason`] of a device that is online.
pub const OFFLINE_NONE: u8 = 0;
/// [`DeviceInfo::offline_reason`]: its deadline passed without a heartbeat,
/// at `last_seen + ttl`.
pub const OFFLINE_EXPIRED: u8 = 1;
/// [`DeviceInfo::offline_reason`]: it sent a `Leave`.
pub const OFFLINE_LEFT: u8 = 2;

/// The server's counts, answering [`QueryKind::Summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary<'a> {
    /// Devices online now.
    pub online: u64,
    /// Devices the server holds, online or offline.
    pub known: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Leaves accepted.
    pub leaves: u64,
    /// Queries answered.
    pub queries: u64,
    /// Devices that went offline because they expired.
    pub expirations: u64,
    /// Dropped datagrams by reason: records of [`Counter`], code = [`DropReason::code`].
    #[serde(borrow)]
    pub counters: Records<'a, Counter>,
}

/// [`Counter::code`] of the events the server could not write to its events
/// destination. Codes below 256 are [`DropReason`] codes; codes from 256 on
/// count other things.
pub const COUNTER_EVENTS_LOST: u16 = 256;

/// One named counter inside a [`Summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// What is counted: a [`DropReason::code`] (below 256), or
    /// [`COUNTER_EVENTS_LOST`].
    pub code: u16,
    /// How many.
    pub count: u64,
}

/// One page of a listing, answering [`QueryKind::List`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<'a> {
    /// Pass this as `after` to get the next page; `None` on the last page.
    pub next_cursor: Option<&'a str>,
    /// Devices of this page's range that the filter selected: the entries'
    /// count, or with [`ListFilter::count_only`] the count alone. Summed over
    /// the pages, it counts the listing.
    pub matched: u64,
    /// The devices of this page, as records of [`DeviceInfo`].
    #[serde(borrow)]
    pub entries: Records<'a, DeviceInfo<'a>>,
}

/// The reply to a heartbeat with [`FLAG_ACK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Echo of the heartbeat's boot epoch.
    pub boot: u32,
    /// Echo of the heartbeat's sequence number.
    pub seq: u32,
    /// The interval the server expects from this device, in milliseconds.
    pub interval_ms: u32,
    /// The device's TTL: it is offline this long after its last heartbeat.
    pub ttl_ms: u32,
}

/// A reply saying the request could not be served. It is never larger than
/// the request, and the server sends none where that cannot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// The protocol version the server speaks.
    pub supported_version: u8,
}

/// The reasons an [`ErrorReply`] can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request's version byte is not one the server speaks.
    UnsupportedVersion,
    /// The query needs an operator tag or a source the server allows.
    NotAllowed,
    /// The reply would be larger than the query: pad the query to at least
    /// `needed` bytes (or to [`MAX_DATAGRAM`]) and ask again.
    RequestTooSmall {
        /// At least this many bytes are needed (with some headroom, as
        /// answers grow); pad to it or more and ask again.
        needed: u16,
    },
    /// A signed query's time is too far from the server's clock (see
    /// [`QUERY_SKEW_MS`]); fix the clock or resign with the current time.
    StaleQuery {
        /// The server's wall time when it refused the query, Unix milliseconds.
        server_unix_ms: u64,
    },
}

/// A socket address without flow info or scope, as it travels in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Addr {
    /// IPv4 octets and port.
    V4([u8; 4], u16),
    /// IPv6 octets and port.
    V6([u8; 16], u16),
}

#[cfg(feature = "std")]
impl From<std::net::SocketAddr> for Addr {
    fn from(a: std::net::SocketAddr) -> Self {
        match a {
            std::net::SocketAddr::V4(a) => Addr::V4(a.ip().octets(), a.port()),
            // A dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d; report them as IPv4.
            std::net::SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => Addr::V4(v4.octets(), a.port()),
                None => Addr::V6(a.ip().octets(), a.port()),
            },
        }
    }
}

#[cfg(feature = "std")]
impl From<Addr> for std::net::SocketAddr {
    fn from(a: Addr) -> Self {
        match a {
            Addr::V4(ip, port) => (std::net::Ipv4Addr::from(ip), port).into(),
            Addr::V6(ip, port) => (std::net::Ipv6Addr::from(ip), port).into(),
        }
    }
}

/// Every message of protocol v1. The variant order is the kind byte
/// (0 = Heartbeat ... 5 = Error) and never changes within a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<'a> {
    /// Device to server.
    Heartbeat(#[serde(borrow)] Heartbeat<'a>),
    /// Device to server.
    Leave(#[serde(borrow)] Leave<'a>),
    /// Client to server.
    Query(#[serde(borrow)] Query<'a>),
    /// Server to client.
    Status(#[serde(borrow)] Status<'a>),
    /// Server to device.
    Ack(Ack),
    /// Server to any sender.
    Error(ErrorReply),
}

/// A list of postcard records of `T`, stored as one byte string so it can be
/// borrowed from a datagram and walked without an allocator.
///
/// Build one with [`RecordWriter`]; read it with [`Records::iter`].
pub struct Records<'a, T> {
    /// The concatenated records.
    bytes: &'a [u8],
    /// The record type; no `T` is stored.
    _record: PhantomData<fn() -> T>,
}

impl<'a, T> Records<'a, T> {
    /// Wraps bytes that hold concatenated records. [`decode`] checks that
    /// every record of a received frame is well formed.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        Records { bytes, _record: PhantomData }
    }

    /// The encoded records.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Decodes the records one by one.
    pub fn iter(&self) -> RecordIter<'a, T> {
        RecordIter { rest: self.bytes, _record: PhantomData }
    }
}

impl<T> Clone for Records<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Records<'_, T> {}
impl<T> PartialEq for Records<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<T> Eq for Records<'_, T> {}
impl<T> fmt::Debug for Records<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Records({} bytes)", self.bytes.len())
    }
}

impl<T> Serialize for Records<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.bytes)
    }
}

impl<'de: 'a, 'a, T> Deserialize<'de> for Records<'a, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(d).map(Records::from_bytes)
    }
}

/// Iterator over [`Records`]; yields an error and stops at the first bad record.
pub struct RecordIter<'a, T> {
    /// Bytes not yet decoded.
    rest: &'a [u8],
    /// The record type.
    _record: PhantomData<fn() -> T>,
}

impl<'a, T: Deserialize<'a>> Iterator for RecordIter<'a, T> {
    type Item = Result<T, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<T>(self.rest) {
            Ok((record, rest)) => {
                self.rest = rest;
                Some(Ok(record))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e.into()))
            }
        }
    }
}

/// Appends records of `T` to a caller's buffer, for building [`Records`].
pub struct RecordWriter<'b, T> {
    /// Where records are written.
    buf: &'b mut [u8],
    /// Bytes of `buf` used so far.
    len: usize,
    /// Records written so far.
    count: usize,
    /// The record type.
    _record: PhantomData<fn(T)>,
}

impl<'b, T: Serialize> RecordWriter<'b, T> {
    /// Starts an empty list in `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        RecordWriter { buf, len: 0, count: 0, _record: PhantomData }
    }

    /// Appends one record. On [`Error::BufferTooSmall`] nothing is appended.
    pub fn push(&mut self, record: &T) -> Result<(), Error> {
        let used = postcard::to_slice(record, &mut self.buf[self.len..])?.len();
        self.len += used;
        self.count += 1;
        Ok(())
    }

    /// Records written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The finished list, borrowing the buffer.
    pub fn finish<'r>(self) -> Records<'r, T>
    where
        'b: 'r,
    {
        Records::from_bytes(&self.buf[..self.len])
    }
}

fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::BadDeviceId);
    }
    if id.chars().any(char::is_control) {
        return Err(Error::IdControlChar);
    }
    Ok(())
}

/// Whether every byte of an id is printable ASCII (no control characters):
/// such an id is valid UTF-8 and needs no further character check.
fn is_printable_ascii(id: &[u8]) -> bool {
    id.iter().all(|b| (0x20..0x7f).contains(b))
}

/// Reads a varint `u32` (non-minimal forms allowed, at most 5 bytes) from
/// the start of `bytes`.
fn leading_varint(bytes: &[u8]) -> Result<u32, Error> {
    let mut value = 0u32;
    for (i, &b) in bytes.iter().take(5).enumerate() {
        if i == 4 && b > 0x0f {
            return Err(Error::Malformed);
        }
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    if bytes.len() < 5 { Err(Error::Truncated) } else { Err(Error::Malformed) }
}

/// A listing cursor is opaque, but bounded like an id.
fn check_cursor(cursor: &str) -> Result<(), Error> {
    if cursor.is_empty() || cursor.len() > MAX_ID_LEN { Err(Error::Malformed) } else { Ok(()) }
}

fn check_payload(payload: &[u8]) -> Result<(), Error> {
    if payload.len() > MAX_PAYLOAD_LEN { Err(Error::PayloadTooLong) } else { Ok(()) }
}

fn check_device_info(info: &DeviceInfo<'_>) -> Result<(), Error> {
    check_id(info.device)?;
    check_payload(info.payload)
}

fn check_records<'a, T: Deserialize<'a>>(
    records: &Records<'a, T>,
    mut check: impl FnMut(&T) -> Result<(), Error>,
) -> Result<(), Error> {
    for record in records.iter() {
        // A record cut short inside its byte string is malformed, not a
        // truncated datagram: the outer length said where it ends.
        let record = record.map_err(|e| match e {
            Error::Truncated => Error::Malformed,
            other => other,
        })?;
        check(&record)?;
    }
    Ok(())
}

impl Message<'_> {
    /// Checks the limits that postcard itself cannot express: id and payload
    /// lengths, and that nested records are well formed.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Message::Heartbeat(hb) => {
                check_id(hb.device)?;
                check_payload(hb.payload)
            }
            Message::Leave(leave) => check_id(leave.device),
            Message::Query(q) => match q.kind {
                QueryKind::Device(id) => check_id(id),
                QueryKind::List { after, filter, .. } => {
                    if let Some(cursor) = after {
                        check_cursor(cursor)?;
                    }
                    match filter.prefix {
                        Some(prefix) => check_id(prefix),
                        None => Ok(()),
                    }
                }
                QueryKind::Summary => Ok(()),
            },
            Message::Status(status) => match &status.body {
                StatusBody::Device(info) => check_device_info(info),
                StatusBody::UnknownDevice => Ok(()),
                StatusBody::Summary(summary) => check_records(&summary.counters, |_| Ok(())),
                StatusBody::Page(page) => {
                    if let Some(cursor) = page.next_cursor {
                        check_cursor(cursor)?;
                    }
                    check_records(&page.entries, check_device_info)
                }
            },
            Message::Ack(_) | Message::Error(_) => Ok(()),
        }
    }
}

/// Encodes `message` as a v1 frame into `buf` and returns the frame's length.
///
/// The message is validated first, so a device cannot send a frame the
/// server would drop. Fails with [`Error::BufferTooSmall`] if `buf` is too
/// short and [`Error::Oversized`] if the frame exceeds [`MAX_DATAGRAM`].
pub fn encode(message: &Message<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    message.validate()?;
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferTooSmall)?;
    *first = VERSION;
    let len = 1 + postcard::to_slice(message, rest)?.len();
    if len > MAX_DATAGRAM {
        return Err(Error::Oversized);
    }
    Ok(len)
}

/// Decodes and validates one v1 frame. Strings and byte strings borrow from
/// `datagram`. Never panics, whatever the input.
pub fn decode(datagram: &[u8]) -> Result<Message<'_>, Error> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Error::Oversized);
    }
    let (&version, body) = datagram.split_first().ok_or(Error::Truncated)?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    // The kind is a varint (decoders accept non-minimal forms, as for every
    // varint); every v1 kind is below KIND_COUNT.
    if body.is_empty() {
        return Err(Error::Truncated);
    }
    if leading_varint(body)? >= u32::from(KIND_COUNT) {
        return Err(Error::UnknownKind);
    }
    if let Some(heartbeat) = decode_heartbeat_fast(body) {
        return Ok(Message::Heartbeat(heartbeat));
    }
    decode_body(body)
}

/// The general decoder: postcard, then no trailing bytes, then validation.
fn decode_body(body: &[u8]) -> Result<Message<'_>, Error> {
    let (message, rest) = postcard::take_from_bytes::<Message<'_>>(body)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    message.validate()?;
    Ok(message)
}

/// A cursor over a frame for [`decode_heartbeat_fast`]; every method returns
/// `None` on anything it does not handle, and the caller then falls back.
struct Fast<'a> {
    /// Bytes not read yet.
    rest: &'a [u8],
}

impl<'a> Fast<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// A varint `u32` as postcard writes it (at most 5 bytes, no excess bits).
    fn u32(&mut self) -> Option<u32> {
        let mut value = 0u32;
        for i in 0..5 {
            let b = self.byte()?;
            if i == 4 && b > 0x0f {
                return None;
            }
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// A length-prefixed byte string of fewer than 128 bytes.
    fn short_bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        if len >= 0x80 || len > self.rest.len() {
            return None;
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(bytes)
    }
}

/// A heartbeat as [`decode_heartbeat_ascii`] reads it: the id as bytes
/// (known to be ASCII, so valid UTF-8), the rest as in [`Heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeartbeat<'a> {
    /// The device id's bytes.
    pub device: &'a [u8],
    /// As [`Heartbeat::boot`].
    pub boot: u32,
    /// As [`Heartbeat::seq`].
    pub seq: u32,
    /// As [`Heartbeat::interval_ms`].
    pub interval_ms: u32,
    /// As [`Heartbeat::flags`].
    pub flags: u8,
    /// As [`Heartbeat::payload`].
    pub payload: &'a [u8],
    /// As [`Heartbeat::tag`].
    pub tag: Option<Tag>,
}

impl<'a> From<Heartbeat<'a>> for RawHeartbeat<'a> {
    fn from(hb: Heartbeat<'a>) -> Self {
        RawHeartbeat {
            device: hb.device.as_bytes(),
            boot: hb.boot,
            seq: hb.seq,
            interval_ms: hb.interval_ms,
            flags: hb.flags,
            payload: hb.payload,
            tag: hb.tag,
        }
    }
}

/// The server's hot path: a whole frame that is a heartbeat in the usual
/// encoding, with a printable ASCII id. Where this returns `Some`, [`decode`] returns
/// the same heartbeat; where it returns `None`, use [`decode`]. It skips the
/// general UTF-8 check, which costs more than the rest of the decoding for a
/// typical id.
pub fn decode_heartbeat_ascii(datagram: &[u8]) -> Option<RawHeartbeat<'_>> {
    match datagram {
        [VERSION, body @ ..] if datagram.len() <= MAX_DATAGRAM => {
            decode_heartbeat_raw(body).filter(|hb| is_printable_ascii(hb.device))
        }
        _ => None,
    }
}

/// The hot path: decodes a well-formed heartbeat (the body after the
/// version byte) without going through serde. It accepts exactly what the
/// general decoder accepts or returns `None`, in which case the general
/// decoder runs and reports the precise error; a property test checks that
/// the two agree on arbitrary input.
fn decode_heartbeat_fast(body: &[u8]) -> Option<Heartbeat<'_>> {
    let hb = decode_heartbeat_raw(body)?;
    let device = core::str::from_utf8(hb.device).ok()?;
    if !is_printable_ascii(hb.device) && device.chars().any(char::is_control) {
        return None;
    }
    Some(Heartbeat {
        device,
        boot: hb.boot,
        seq: hb.seq,
        interval_ms: hb.interval_ms,
        flags: hb.flags,
        payload: hb.payload,
        tag: hb.tag,
    })
}

/// [`decode_heartbeat_fast`] but for the UTF-8 check of the id.
fn decode_heartbeat_raw(body: &[u8]) -> Option<RawHeartbeat<'_>> {
    let mut r = Fast { rest: body };
    if r.byte()? != 0 {
        return None;
    }
    let device = r.short_bytes()?;
    let boot = r.u32()?;
    let seq = r.u32()?;
    let interval_ms = r.u32()?;
    let flags = r.byte()?;
    let payload = r.short_bytes()?;
    let tag = match r.byte()? {
        0 => None,
        1 => Some(r.rest.get(..8)?.try_into().ok()?),
        _ => return None,
    };
    let expected_rest = if tag.is_some() { 8 } else { 0 };
    if r.rest.len() != expected_rest
        || device.is_empty()
        || device.len() > MAX_ID_LEN
        || payload.len() > MAX_PAYLOAD_LEN
    {
        return None;
    }
    Some(RawHeartbeat { device, boot, seq, interval_ms, flags, payload, tag })
}

/// The general decoder alone, for tests that compare it with the fast path.
#[cfg(test)]
fn decode_general(datagram: &[u8]) -> Result<Message<'_>, Error> {
    decode_body(datagram.get(1..).ok_or(Error::Truncated)?)
}

#[cfg(test)]
mod tests;
