//! Splitting the devices across threads (`--threads N`).
//!
//! Each thread owns one [`Tracker`](crate::tracker::Tracker) shard and one
//! socket of a `SO_REUSEPORT` group. The kernel spreads datagrams over the
//! sockets by source address, but a device belongs to the shard its id
//! hashes to ([`owner`]), so the thread that receives a datagram first asks
//! [`route`] where it goes and hands it over if it is not its own. A device
//! therefore has one entry, one deadline and one replay window whichever
//! socket its datagrams arrive on.
//!
//! Pure functions only; the threads and hand-over queues are in
//! [`crate::server`].

use core::hash::BuildHasher;

use crate::wire::{self, Message, QueryKind};

/// Where a datagram must be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By this shard: it names a device (heartbeat, leave, device query), or
    /// it continues a listing of this shard.
    Shard(usize),
    /// A summary: any shard answers, adding the others' totals.
    Summary,
    /// Anything else (garbage, replies, first list pages): the receiving
    /// shard handles it. Garbage is counted and dropped there.
    Local,
}

/// The seed of the id hash. Fixed, so every thread agrees; different from
/// the table's own (random) hash seed, so a shard's ids are not clustered in
/// its index.
const SEED: u64 = 0x7072_6573_656e_6365;

/// The shard that owns the device with id `id`, out of `shards`.
pub fn owner(id: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash = foldhash::fast::FixedState::with_seed(SEED).hash_one(id);
    // Multiply-shift: the high bits of hash × shards, uniform in 0..shards.
    ((u128::from(hash) * shards as u128) >> 64) as usize
}

/// Where `datagram` goes among `shards`.
///
/// Heartbeats and leaves in their usual form are routed from a glance at
/// their id bytes; everything else is decoded in full, so any datagram the
/// engine would accept as naming a device reaches that device's owner.
pub fn route(datagram: &[u8], shards: usize) -> Route {
    if shards <= 1 {
        return Route::Shard(0);
    }
    // Version, kind 0 (heartbeat) or 1 (leave), then the id with a one-byte length.
    if let [wire::VERSION, 0 | 1, len, rest @ ..] = datagram {
        let len = usize::from(*len);
        if len < 0x80 {
            if let Some(id) = rest.get(..len) {
                return Route::Shard(owner(id, shards));
            }
        }
    }
    match wire::decode(datagram) {
        Ok(Message::Heartbeat(hb)) => Route::Shard(owner(hb.device.as_bytes(), shards)),
        Ok(Message::Leave(leave)) => Route::Shard(owner(leave.device.as_bytes(), shards)),
        Ok(Message::Query(query)) => match query.kind {
            QueryKind::Device(id) => Route::Shard(owner(id.as_bytes(), shards)),
            QueryKind::Summary => Route::Summary,
            QueryKind::List { after: Some(cursor), .. } => match parse_cursor(cursor) {
                Some((shard, _)) if shard < shards => Route::Shard(shard),
                _ => Route::Local,
            },
            QueryKind::List { after: None, .. } => Route::Shard(0),
        },
        _ => Route::Local,
    }
}

/// A listing cursor: the shard and the slot to continue from, as
/// `"shard.slot"` in decimal. Clients treat it as opaque.
pub fn format_cursor(shard: usize, slot: usize) -> String {
    format!("{shard}.{slot}")
}

/// Reads a cursor written by [`format_cursor`].
pub fn parse_cursor(cursor: &str) -> Option<(usize, usize)> {
    let (shard, slot) = cursor.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(shard) || !digits(slot) {
        return None;
    }
    Some((shard.parse().ok()?, slot.parse().ok()?))
}

#[cfg(test)]
mod tests;
