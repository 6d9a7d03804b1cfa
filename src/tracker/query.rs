//! Queries and their answers: one device, the summary, and list pages that
//! cost what they return.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::time::Instant;

use super::{Count, Handled, ShardPosition, Totals, Tracker, error_reply, millis_u32, millis_u64};
use crate::auth;
use crate::shard;
use crate::table::{Entry, OfflineReason, Which};
use crate::wire::{
    self, Counter, DeviceInfo, DeviceNumbers, DropReason, ErrorCode, Message, Page, Query, QueryKind,
    RecordWriter, Status, StatusBody, Summary, SummaryCounts,
};

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

impl Tracker {
    /// Answers `query`, which arrived as `datagram` from `from`: access
    /// checks first, then the answer, or `RequestTooSmall` if it would be
    /// larger than the datagram. A summary adds `peers`.
    pub(super) fn query(
        &mut self,
        now: Instant,
        from: SocketAddr,
        query: Query<'_>,
        datagram: &[u8],
        reply: &mut [u8],
        peers: &Totals,
    ) -> Result<Handled, DropReason> {
        let tag = auth::signed_part(datagram, &Message::Query(query));
        let request_len = datagram.len();
        self.admit_query(now, from, &query, tag)?;
        self.counters.bump(Count::Queries);
        let budget = request_len.min(wire::MAX_DATAGRAM);
        let needed = match self.answer(now, query, budget, reply, peers) {
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
    pub(super) fn answer(
        &mut self,
        now: Instant,
        query: Query<'_>,
        budget: usize,
        reply: &mut [u8],
        peers: &Totals,
    ) -> Result<usize, usize> {
        let cursor: Option<String>;
        let mut counter_buf = [0u8; (DropReason::ALL.len() + 1) * 16];
        let body = match query.kind {
            QueryKind::Device(device) => match self.table.get(device) {
                Some(entry) => StatusBody::Device(device_info(
                    self.started,
                    self.started_wall,
                    now,
                    device,
                    &entry,
                    self.flaps.score(device, now),
                )),
                None => StatusBody::UnknownDevice,
            },
            QueryKind::Summary => {
                let mut totals = self.totals();
                totals.add(peers);
                let mut counters = RecordWriter::new(&mut counter_buf);
                let drops =
                    DropReason::ALL.into_iter().map(|reason| (reason.code(), totals.counters.drops(reason)));
                let server_counts = [
                    (wire::COUNTER_EVENTS_LOST, totals.events_lost),
                    (wire::COUNTER_SNAPSHOTS_FAILED, totals.snapshots_failed),
                ];
                for (code, count) in drops.chain(server_counts) {
                    if count > 0 {
                        // Cannot fail: the buffer holds every counter at its largest.
                        let _ = counters.push(&Counter { code, count });
                    }
                }
                StatusBody::Summary(Summary {
                    counts: SummaryCounts {
                        online: totals.online,
                        known: totals.known,
                        uptime_ms: millis_u64(now.saturating_duration_since(self.started)),
                        heartbeats: totals.counters.heartbeats(),
                        leaves: totals.counters.leaves(),
                        queries: totals.counters.queries(),
                        expirations: totals.counters.expirations(),
                        late: totals.late,
                        held: totals.held,
                        degraded: totals.degraded,
                    },
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
    pub(super) fn fill_page(
        &mut self,
        now: Instant,
        request: u32,
        after: Option<&str>,
        limit: u16,
        filter: wire::ListFilter<'_>,
        budget: usize,
    ) -> Result<PageFill, usize> {
        let limit = if limit == 0 { usize::MAX } else { usize::from(limit) };
        let ShardPosition { index: shard, count: shards } = self.shard;
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
            let info =
                device_info(self.started, self.started_wall, now, id, &entry, self.flaps.score(id, now));
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

/// The reply record for one device, with times relative to `now`.
fn device_info<'e>(
    started: Instant,
    started_wall: SystemTime,
    now: Instant,
    device: &'e str,
    entry: &Entry<'e>,
    flaps: u32,
) -> DeviceInfo<'e> {
    // A restored device may have been seen before this engine started.
    let last_seen_wall = match entry.last_seen().checked_duration_since(started) {
        Some(after) => started_wall + after,
        None => started_wall - started.saturating_duration_since(entry.last_seen()),
    };
    DeviceInfo {
        device,
        online: entry.is_online(),
        addr: entry.addr().into(),
        numbers: DeviceNumbers {
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
            flaps,
            version: entry.version(),
        },
        payload: entry.payload(),
        offline_reason: match entry.offline_reason() {
            None if entry.is_held() => wire::ONLINE_HELD,
            None if entry.is_suspect() => wire::ONLINE_SUSPECT,
            None => wire::OFFLINE_NONE,
            Some(OfflineReason::Expired) => wire::OFFLINE_EXPIRED,
            Some(OfflineReason::Left) => wire::OFFLINE_LEFT,
        },
    }
}
