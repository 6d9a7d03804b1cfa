//! The messages of protocol v1, field by field (PROTOCOL.md, "Messages").

use serde::{Deserialize, Serialize};

use super::{Records, Tag};

/// "I am alive": sent by a device every `interval_ms`.
///
/// The id is a `str` on the wire; the server's hot path reads it as bytes
/// first ([`RawHeartbeat`](crate::wire::RawHeartbeat), the same message with
/// `Id = [u8]`), so the fields are declared once for both. Build one with
/// [`Heartbeat::new`] (which takes any `&str`, a `&String` too), or with a
/// struct literal whose `device` is a `&str`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "Id: Serialize", deserialize = "&'a Id: Deserialize<'de>"))]
pub struct Heartbeat<'a, Id: ?Sized = str> {
    /// Who is speaking; devices are identified by id, never by address.
    #[serde(borrow)]
    pub device: &'a Id,
    /// Changes each time the device boots, so the server can tell a reboot
    /// from a late or repeated heartbeat.
    pub boot: u32,
    /// Increases by one per heartbeat within a boot.
    pub seq: u32,
    /// The device's own send interval in milliseconds; 0 means "use the
    /// server's default timeout".
    pub interval_ms: u32,
    /// Bit field; see [`FLAG_ACK`](crate::wire::FLAG_ACK).
    pub flags: u8,
    /// Opaque application data (battery level, firmware version, ...).
    pub payload: &'a [u8],
    /// MAC over every frame byte before it, with the device's key; see [`crate::auth`].
    pub tag: Option<Tag>,
}

impl<Id: ?Sized> Clone for Heartbeat<'_, Id> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Id: ?Sized> Copy for Heartbeat<'_, Id> {}

impl<'a> Heartbeat<'a> {
    /// A heartbeat of `device` with (boot, seq), declaring `interval_ms`: no
    /// flags, no payload, no tag (set those fields as needed).
    pub const fn new(device: &'a str, boot: u32, seq: u32, interval_ms: u32) -> Self {
        Heartbeat { device, boot, seq, interval_ms, flags: 0, payload: &[], tag: None }
    }
}

impl<'a, Id: ?Sized> Heartbeat<'a, Id> {
    /// The same heartbeat with its id as `device` (the one place the fields
    /// are copied from one form to the other).
    pub fn with_device<Other: ?Sized>(self, device: &'a Other) -> Heartbeat<'a, Other> {
        let Heartbeat { device: _, boot, seq, interval_ms, flags, payload, tag } = self;
        Heartbeat { device, boot, seq, interval_ms, flags, payload, tag }
    }
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
/// [`DropReason::StaleQuery`](crate::wire::DropReason::StaleQuery); inside it, each signed query is answered once.
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
    /// Times and counts: when it was last seen and expires, its TTL,
    /// interval, boot, seq, heartbeats and flaps.
    pub numbers: DeviceNumbers,
    /// Payload of its last heartbeat.
    pub payload: &'a [u8],
    /// Why it is offline ([`OFFLINE_EXPIRED`], [`OFFLINE_LEFT`]), or, while
    /// online, whether it is on time ([`OFFLINE_NONE`]) or late
    /// ([`ONLINE_SUSPECT`], [`ONLINE_HELD`]); other values are reserved
    /// (show them as unknown).
    pub offline_reason: u8,
}

/// The numbers the server reports about one device, inside [`DeviceInfo`]
/// (on the wire its fields simply follow `addr`, in this order) and in the
/// client's owned report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceNumbers {
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
    /// Its flap score: times its state (online, offline) changed within the
    /// server's flap window, whether the events were written or held back.
    pub flaps: u32,
    /// The version of its latest transition (1 for its first online, +1
    /// with each transition after), as in the events.
    pub version: u32,
}

/// [`DeviceInfo::offline_reason`] of a device that is online.
pub const OFFLINE_NONE: u8 = 0;
/// [`DeviceInfo::offline_reason`]: its deadline passed without a heartbeat,
/// at `last_seen + ttl`.
pub const OFFLINE_EXPIRED: u8 = 1;
/// [`DeviceInfo::offline_reason`]: it sent a `Leave`.
pub const OFFLINE_LEFT: u8 = 2;
/// [`DeviceInfo::offline_reason`] of an online device that is late
/// (suspect): no heartbeat for `--suspect-after` intervals past the one due.
pub const ONLINE_SUSPECT: u8 = 3;
/// [`DeviceInfo::offline_reason`] of an online device whose deadline passed
/// while the server was degraded: held as suspect instead of offline.
pub const ONLINE_HELD: u8 = 4;

/// The numbers of a [`Summary`] (on the wire its fields simply come first,
/// in this order), shared with the client's owned report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SummaryCounts {
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
    /// Queries answered (this one included).
    pub queries: u64,
    /// Devices that went offline because they expired.
    pub expirations: u64,
    /// Of the online devices, those late (suspect), held ones included.
    pub late: u64,
    /// Of those, devices held because the server is degraded.
    pub held: u64,
    /// Receive threads that are degraded (suspect their own network): 0
    /// when all is well.
    pub degraded: u64,
}

/// The server's counts, answering [`QueryKind::Summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary<'a> {
    /// Devices, uptime and what was accepted.
    pub counts: SummaryCounts,
    /// Dropped datagrams by reason: records of [`Counter`], code = [`DropReason::code`](crate::wire::DropReason::code).
    #[serde(borrow)]
    pub counters: Records<'a, Counter>,
}

/// [`Counter::code`] of the events the server could not write to its events
/// destination. Codes below 256 are [`DropReason`](crate::wire::DropReason) codes; codes from 256 on
/// count other things.
pub const COUNTER_EVENTS_LOST: u16 = 256;

/// [`Counter::code`] of the state snapshots (`--state`) the server could not write.
pub const COUNTER_SNAPSHOTS_FAILED: u16 = 257;

/// One named counter inside a [`Summary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// What is counted: a [`DropReason::code`](crate::wire::DropReason::code) (below 256),
    /// [`COUNTER_EVENTS_LOST`] or [`COUNTER_SNAPSHOTS_FAILED`].
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

/// The reply to a heartbeat with [`FLAG_ACK`](crate::wire::FLAG_ACK).
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
    /// `needed` bytes (or to [`MAX_DATAGRAM`](crate::wire::MAX_DATAGRAM)) and ask again.
    RequestTooSmall {
        /// At least this many bytes are needed (with some headroom, as
        /// answers grow); pad to it or more and ask again.
        needed: u16,
    },
    /// A signed query's time is too far from the server's clock (see
    /// [`QUERY_SKEW_MS`](crate::wire::QUERY_SKEW_MS)); fix the clock or resign with the current time.
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

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a
/// dual-stack socket sees IPv4 peers) as the IPv4 address it is. The one
/// place this normalisation is written; the rest of the crate calls it (or
/// `IpAddr::to_canonical`, which it uses).
#[cfg(feature = "std")]
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(feature = "std")]
impl From<std::net::SocketAddr> for Addr {
    fn from(a: std::net::SocketAddr) -> Self {
        match canonical(a) {
            std::net::SocketAddr::V4(a) => Addr::V4(a.ip().octets(), a.port()),
            std::net::SocketAddr::V6(a) => Addr::V6(a.ip().octets(), a.port()),
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
