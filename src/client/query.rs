//! [`Client`]: status queries with request ids, retries and signing.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::{ClientError, DeviceReport, SummaryReport, connect, encode_query, recv_until, unix_ms_now};
use crate::auth::Key;
use crate::wire::{self, DropReason, ListFilter, Message, QueryKind, Status, StatusBody};

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
                let (mut events_lost, mut snapshots_failed) = (0, 0);
                for counter in s.counters.iter() {
                    let counter = counter?;
                    match counter.code {
                        wire::COUNTER_EVENTS_LOST => {
                            events_lost = counter.count;
                            continue;
                        }
                        wire::COUNTER_SNAPSHOTS_FAILED => {
                            snapshots_failed = counter.count;
                            continue;
                        }
                        _ => {}
                    }
                    let name = match DropReason::from_code(counter.code) {
                        Some(reason) => reason.name().to_owned(),
                        None => format!("code_{}", counter.code),
                    };
                    drops.insert(name, counter.count);
                }
                Ok(SummaryReport { counts: s.counts, drops, events_lost, snapshots_failed })
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
