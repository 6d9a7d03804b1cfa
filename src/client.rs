//! Talking to a server: [`Client`] asks status queries, [`Sender`] sends a
//! device's heartbeats. The CLI, the examples and the tests use these.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::auth::{self, Key};
use crate::wire::{
    self, Ack, DeviceInfo, DropReason, Heartbeat, Leave, ListFilter, Message, Query, QueryKind, Status,
    StatusBody,
};

/// Why a request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The server's host said nothing listens on that port (ICMP port unreachable).
    #[error("nothing is listening on {server} (connection refused)")]
    Refused {
        /// Who was asked.
        server: SocketAddr,
    },
    /// Nothing came back in time.
    #[error("no reply from {server} within {}", humantime::format_duration(*timeout))]
    NoReply {
        /// Who was asked.
        server: SocketAddr,
        /// How long we waited in all.
        timeout: Duration,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol version {server_version}, this client speaks {}", wire::VERSION)]
    UnsupportedVersion {
        /// The version the server said it speaks.
        server_version: u8,
    },
    /// The server sent a reply that does not answer the question.
    #[error("unexpected reply from the server")]
    UnexpectedReply,
    /// The server needs an operator key for queries from this address.
    #[error(
        "the server refused the query: use --key-file with the master or operator key, or query from an address in its --query-allow"
    )]
    NotAllowed,
    /// The server refused a signed query because this machine's clock is
    /// too far from its own.
    #[error(
        "the server refused the signed query as stale: this clock is {} {} the server's (at most {}s either way is accepted); fix the clock (NTP)",
        humantime::format_duration(Duration::from_millis(offset_ms.unsigned_abs())),
        if *offset_ms > 0 { "ahead of" } else { "behind" },
        wire::QUERY_SKEW_MS / 1000
    )]
    ClockSkew {
        /// This clock minus the server's, in milliseconds (as of the refusal).
        offset_ms: i64,
    },
    /// A frame could not be built (e.g. an id too long).
    #[error(transparent)]
    Wire(#[from] wire::Error),
}

/// A UDP socket connected to `server`, bound to the matching unspecified address.
fn connect(server: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    Ok(socket)
}

impl From<wire::ErrorReply> for ClientError {
    fn from(error: wire::ErrorReply) -> Self {
        match error.code {
            wire::ErrorCode::UnsupportedVersion => {
                ClientError::UnsupportedVersion { server_version: error.supported_version }
            }
            wire::ErrorCode::NotAllowed => ClientError::NotAllowed,
            // Queries are always padded to the largest reply, so this means a broken server.
            wire::ErrorCode::RequestTooSmall { .. } => ClientError::UnexpectedReply,
            wire::ErrorCode::StaleQuery { server_unix_ms } => {
                let offset = i128::from(unix_ms_now()) - i128::from(server_unix_ms);
                ClientError::ClockSkew { offset_ms: i64::try_from(offset).unwrap_or(i64::MAX) }
            }
        }
    }
}

/// `id` as it may be shown in a terminal or a log line: control characters
/// (which a server refuses in ids, but a client may meet elsewhere) are
/// escaped as `\n`, `\u{1b}` and so on, and so is a backslash.
pub fn printable(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.chars().any(|c| c.is_control() || c == '\\') {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut shown = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if c.is_control() || c == '\\' {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

/// The wall clock in Unix milliseconds (0 if it reads before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Encodes a query padded to [`wire::MAX_DATAGRAM`] bytes, so that no reply
/// is ever too large for it (the server never replies with more bytes than
/// it received). With `signer` = (operator key, the wall time now in Unix
/// milliseconds), the query is signed as sent at that time; the server
/// answers it once, and only within [`wire::QUERY_SKEW_MS`] of its clock.
pub fn encode_query(
    request: u32,
    kind: QueryKind<'_>,
    signer: Option<(&Key, u64)>,
    out: &mut [u8],
) -> Result<usize, wire::Error> {
    let zeros = [0u8; wire::MAX_DATAGRAM];
    let encode = |padding: usize, out: &mut [u8]| {
        let padding = &zeros[..padding];
        match signer {
            Some((key, sent_unix_ms)) => {
                let tag = Some(wire::QueryTag { sent_unix_ms, tag: [0; auth::TAG_LEN] });
                auth::encode_signed(&Message::Query(Query { request, kind, padding, tag }), key, out)
            }
            None => wire::encode(&Message::Query(Query { request, kind, padding, tag: None }), out),
        }
    };
    let bare = encode(0, out)?;
    // The padding's length prefix grows from 1 to 2 bytes past 127 bytes.
    let mut padding = wire::MAX_DATAGRAM.saturating_sub(bare + 1);
    loop {
        match encode(padding, out) {
            Ok(len) if len <= wire::MAX_DATAGRAM => return Ok(len),
            Ok(len) => padding = padding.saturating_sub(len - wire::MAX_DATAGRAM),
            Err(wire::Error::Oversized) => padding = padding.saturating_sub(1),
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram on a connected socket, waiting until `deadline` at
/// most; `None` once the deadline has passed.
fn recv_until(socket: &UdpSocket, deadline: Instant, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        let Some(wait) = deadline.checked_duration_since(Instant::now()).filter(|w| !w.is_zero()) else {
            return Ok(None);
        };
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

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
    /// Payload of its last heartbeat, as lowercase hex.
    pub payload_hex: String,
}

impl DeviceReport {
    /// The payload bytes.
    pub fn payload(&self) -> Vec<u8> {
        (0..self.payload_hex.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(&self.payload_hex[i..i + 2], 16).ok())
            .collect()
    }
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
            payload_hex: info.payload.iter().map(|b| format!("{b:02x}")).collect(),
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

/// Asks a server status queries over UDP.
#[derive(Debug)]
pub struct Client {
    /// Connected to the server, so only its datagrams arrive.
    socket: UdpSocket,
    /// The server's address.
    server: SocketAddr,
    /// How long one request may take in all, retries included.
    timeout: Duration,
    /// The next request id; replies with another id are ignored.
    next_request: u32,
    /// Signs queries, if set.
    operator_key: Option<Key>,
}

/// A request is sent this many times at most, evenly over the timeout.
const ATTEMPTS: u32 = 3;

impl Client {
    /// A client for `server` that gives up on a request after `timeout`.
    pub fn new(server: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let socket = connect(server)?;
        // Start request ids from the clock so two runs are unlikely to reuse one.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        Ok(Client { socket, server, timeout, next_request: seed, operator_key: None })
    }

    /// Signs queries with the operator key, so the server answers them from
    /// any source address.
    pub fn with_operator_key(mut self, key: Key) -> Self {
        self.operator_key = Some(key);
        self
    }

    /// Sends a query and returns the status body of the matching reply,
    /// passed to `answer` while it still borrows the receive buffer.
    fn ask<R>(
        &mut self,
        kind: QueryKind<'_>,
        answer: impl FnOnce(StatusBody<'_>) -> Result<R, ClientError>,
    ) -> Result<R, ClientError> {
        self.exchange(kind, answer).map_err(|e| match e {
            ClientError::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
                ClientError::Refused { server: self.server }
            }
            other => other,
        })
    }

    fn exchange<R>(
        &mut self,
        kind: QueryKind<'_>,
        answer: impl FnOnce(StatusBody<'_>) -> Result<R, ClientError>,
    ) -> Result<R, ClientError> {
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        let mut out = [0u8; wire::MAX_DATAGRAM];
        let mut buf = [0u8; wire::MAX_DATAGRAM + 1];
        let started = Instant::now();
        let give_up = started + self.timeout;
        for attempt in 1..=ATTEMPTS {
            // Signed afresh each time: the server answers a signed query once,
            // so a resent copy of one whose reply was lost would be refused.
            let signer = self.operator_key.as_ref().map(|key| (key, unix_ms_now()));
            let len = encode_query(request, kind, signer, &mut out)?;
            self.socket.send(&out[..len])?;
            let resend_at = (started + self.timeout * attempt / ATTEMPTS).min(give_up);
            while let Some(n) = recv_until(&self.socket, resend_at, &mut buf)? {
                match wire::decode(&buf[..n]) {
                    Ok(Message::Status(Status { request: r, body })) if r == request => {
                        return answer(body);
                    }
                    Ok(Message::Error(error)) => return Err(error.into()),
                    // A late reply to an earlier request, or noise: keep waiting.
                    _ => {}
                }
            }
        }
        Err(ClientError::NoReply { server: self.server, timeout: self.timeout })
    }

    /// The server's summary.
    pub fn summary(&mut self) -> Result<SummaryReport, ClientError> {
        self.ask(QueryKind::Summary, |body| match body {
            StatusBody::Summary(s) => {
                let mut drops = BTreeMap::new();
                let mut events_lost = 0;
                for counter in s.counters.iter() {
                    let counter = counter?;
                    if counter.code == wire::COUNTER_EVENTS_LOST {
                        events_lost = counter.count;
                        continue;
                    }
                    let name = match DropReason::from_code(counter.code) {
                        Some(reason) => reason.name().to_owned(),
                        None => format!("code_{}", counter.code),
                    };
                    drops.insert(name, counter.count);
                }
                Ok(SummaryReport {
                    online: s.online,
                    known: s.known,
                    uptime_ms: s.uptime_ms,
                    heartbeats: s.heartbeats,
                    leaves: s.leaves,
                    queries: s.queries,
                    expirations: s.expirations,
                    drops,
                    events_lost,
                })
            }
            _ => Err(ClientError::UnexpectedReply),
        })
    }

    /// One device; `None` if the server does not know it.
    pub fn device(&mut self, device: &str) -> Result<Option<DeviceReport>, ClientError> {
        self.ask(QueryKind::Device(device), |body| match body {
            StatusBody::Device(info) if info.device == device => Ok(Some(DeviceReport::from(&info))),
            StatusBody::UnknownDevice => Ok(None),
            _ => Err(ClientError::UnexpectedReply),
        })
    }

    /// One page of the devices `filter` selects, after `cursor` (`None` for
    /// the first page); `limit` 0 means as many as fit in one datagram.
    pub fn list_page(
        &mut self,
        cursor: Option<&str>,
        limit: u16,
        filter: ListFilter<'_>,
    ) -> Result<ListPage, ClientError> {
        self.ask(QueryKind::List { after: cursor, limit, filter }, |body| match body {
            StatusBody::Page(page) => {
                let devices = page
                    .entries
                    .iter()
                    .map(|info| info.map(|info| DeviceReport::from(&info)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ListPage {
                    devices,
                    matched: page.matched,
                    next_cursor: page.next_cursor.map(str::to_owned),
                })
            }
            _ => Err(ClientError::UnexpectedReply),
        })
    }

    /// Every device `filter` selects, following pages until the last;
    /// `progress` is called after each page with the devices so far.
    pub fn list(
        &mut self,
        filter: ListFilter<'_>,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<DeviceReport>, ClientError> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_page(cursor.as_deref(), 0, filter)?;
            all.extend(page.devices);
            progress(all.len());
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Every online device, following pages until the last.
    pub fn list_all(&mut self) -> Result<Vec<DeviceReport>, ClientError> {
        self.list(ListFilter::ONLINE, |_| {})
    }

    /// How many devices `filter` selects, counted by the server page by
    /// page without sending them.
    pub fn count(&mut self, filter: ListFilter<'_>) -> Result<u64, ClientError> {
        let filter = ListFilter { count_only: true, ..filter };
        let mut total = 0;
        let mut cursor = None;
        loop {
            let page = self.list_page(cursor.as_deref(), 0, filter)?;
            total += page.matched;
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(total),
            }
        }
    }
}

/// One page of a listing, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The devices on this page (none when counting).
    pub devices: Vec<DeviceReport>,
    /// How many devices of this page's range matched the filter.
    pub matched: u64,
    /// The cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// A boot epoch counter kept in a file, for devices (and `presence beat`)
/// that have no better source: each [`BootCounter::next`] returns a boot
/// larger than every one it returned before on this machine, and at least
/// the Unix time in seconds, so two runs within one second still differ.
/// The file holds the last boot in decimal; it is locked while it is
/// updated, so concurrent runs get different boots.
#[derive(Debug, Clone)]
pub struct BootCounter {
    /// The counter file.
    path: std::path::PathBuf,
}

impl BootCounter {
    /// A counter in `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        BootCounter { path: path.into() }
    }

    /// The counter of this user: `$PRESENCE_STATE_DIR/boot`, or
    /// `$XDG_STATE_HOME/presence/boot`, or `~/.local/state/presence/boot`.
    pub fn default_location() -> io::Result<Self> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        let dir = var("PRESENCE_STATE_DIR")
            .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("presence")))
            .or_else(|| var("HOME").map(|h| h.join(".local/state/presence")))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no HOME, XDG_STATE_HOME or PRESENCE_STATE_DIR")
            })?;
        Ok(BootCounter::new(dir.join("boot")))
    }

    /// The next boot: `max(last + 1, Unix seconds now)`, recorded before it is returned.
    pub fn next(&self) -> io::Result<u32> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let last: Option<u32> = text.trim().parse().ok();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let next = match last {
            Some(last) => {
                last.checked_add(1).ok_or_else(|| io::Error::other("the boot counter is at its maximum"))?
            }
            None => 0,
        }
        .max(now);
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("{next}\n").as_bytes())?;
        file.sync_all()?;
        Ok(next)
    }
}

/// Sends one device's heartbeats: a fixed boot epoch and an increasing
/// sequence number, as a device would.
#[derive(Debug)]
pub struct Sender {
    /// Connected to the server.
    socket: UdpSocket,
    /// The device id.
    device: String,
    /// This run's boot epoch.
    boot: u32,
    /// The sequence number of the next heartbeat.
    seq: u32,
    /// The declared interval in milliseconds (0 = server default).
    interval_ms: u32,
    /// The payload sent with each heartbeat.
    payload: Vec<u8>,
    /// The device key that signs heartbeats and leaves, if any.
    key: Option<Key>,
}

impl Sender {
    /// A sender for `device`, declaring `interval` (zero = none), with boot
    /// epoch `boot`. Fails if the id is not 1..=64 bytes.
    pub fn new(server: SocketAddr, device: &str, interval: Duration, boot: u32) -> Result<Self, ClientError> {
        if device.is_empty() || device.len() > wire::MAX_ID_LEN {
            return Err(wire::Error::BadDeviceId.into());
        }
        Ok(Sender {
            socket: connect(server)?,
            device: device.to_owned(),
            boot,
            seq: 1,
            interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
            payload: Vec::new(),
            key: None,
        })
    }

    /// Signs heartbeats and leaves with the device's key.
    pub fn with_key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// Encodes `message`, signed if the sender has a key.
    fn encode(&self, message: &Message<'_>, buf: &mut [u8]) -> Result<usize, wire::Error> {
        match &self.key {
            Some(key) => auth::encode_signed(message, key, buf),
            None => wire::encode(message, buf),
        }
    }

    /// The frame of the next heartbeat, without sending it or advancing
    /// the sequence number (for tests that capture and replay datagrams).
    pub fn next_frame(&self, ask_ack: bool) -> Result<Vec<u8>, ClientError> {
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = self.encode(&self.heartbeat(self.seq, ask_ack), &mut buf)?;
        Ok(buf[..len].to_vec())
    }

    fn heartbeat(&self, seq: u32, ask_ack: bool) -> Message<'_> {
        Message::Heartbeat(Heartbeat {
            device: &self.device,
            boot: self.boot,
            seq,
            interval_ms: self.interval_ms,
            flags: if ask_ack { wire::FLAG_ACK } else { 0 },
            payload: &self.payload,
            tag: None,
        })
    }

    /// Sets the payload of the following heartbeats.
    pub fn set_payload(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > wire::MAX_PAYLOAD_LEN {
            return Err(wire::Error::PayloadTooLong.into());
        }
        self.payload = payload.to_vec();
        Ok(())
    }

    /// This sender's boot epoch.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The local address heartbeats are sent from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends the next heartbeat; returns its sequence number and frame size.
    pub fn beat(&mut self, ask_ack: bool) -> Result<(u32, usize), ClientError> {
        let seq = self.seq;
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = self.encode(&self.heartbeat(seq, ask_ack), &mut buf)?;
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&buf[..len])?;
        Ok((seq, len))
    }

    /// Waits up to `timeout` for the ack of heartbeat `seq`.
    pub fn wait_ack(&mut self, seq: u32, timeout: Duration) -> Result<Option<Ack>, ClientError> {
        let give_up = Instant::now() + timeout;
        let mut buf = [0u8; wire::MAX_DATAGRAM + 1];
        while let Some(n) = recv_until(&self.socket, give_up, &mut buf)? {
            match wire::decode(&buf[..n]) {
                Ok(Message::Ack(ack)) if ack.seq == seq && ack.boot == self.boot => {
                    return Ok(Some(ack));
                }
                Ok(Message::Error(error)) => return Err(error.into()),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Tells the server this device is going offline now.
    pub fn leave(&mut self) -> Result<(), ClientError> {
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let leave = Message::Leave(Leave { device: &self.device, boot: self.boot, seq: self.seq, tag: None });
        let len = self.encode(&leave, &mut buf)?;
        self.socket.send(&buf[..len])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_counter_grows_even_within_one_second() {
        let dir = tempfile::tempdir().unwrap();
        let counter = BootCounter::new(dir.path().join("state/boot"));
        let boots: Vec<u32> = (0..5).map(|_| counter.next().unwrap()).collect();
        assert!(boots.windows(2).all(|w| w[1] > w[0]), "{boots:?}");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32;
        assert!(boots[0] >= now - 1, "at least the Unix time");
        // A counter ahead of the clock keeps counting from where it is.
        std::fs::write(dir.path().join("state/boot"), format!("{}\n", now + 1000)).unwrap();
        assert_eq!(counter.next().unwrap(), now + 1001);
    }

    #[test]
    fn printable_escapes_control_characters_for_display() {
        assert_eq!(printable("boiler-7"), "boiler-7");
        assert_eq!(printable("café ☃"), "café ☃");
        assert_eq!(printable("a\nINFO forged"), "a\\nINFO forged");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("c1\u{9b}"), "c1\\u{9b}");
        assert_eq!(
            printable("back\\slash"),
            "back\\\\slash",
            "a backslash is escaped, so escapes cannot be forged"
        );
    }
}
