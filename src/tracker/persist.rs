//! Snapshots and restores of the engine's devices (`--state`): the pure
//! half of persistence. The server takes a snapshot a chunk at a time
//! between batches ([`Tracker::snapshot_chunk`]) and writes the file; on
//! start it reads the file and rebuilds its engines from it
//! ([`Tracker::restore_sharded`]).
//!
//! Time across a restart: a record keeps wall-clock times. A device that
//! was online gets its old deadline if that is still ahead; if it passed
//! while the server was down, the device gets one TTL of grace from the
//! restore (the server could not hear it), then expires as usual.

use std::time::{Duration, SystemTime};

use crate::state::{Chunk, FlapRecord, Record, Snapshot, unix_micros};
use crate::table::{Held, ReplayWindow, Which};
use crate::time::Instant;

use super::{Config, ConfigError, Tracker};

/// What a restore put back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Devices restored, online or offline.
    pub devices: u64,
    /// Of those, devices restored online.
    pub online: u64,
    /// Online devices whose deadline passed while the server was down: they
    /// got one TTL of grace from the restore.
    pub graced: u64,
    /// Records of a device already restored (a snapshot taken while the
    /// table changed can list one twice); the first was kept.
    pub duplicates: u64,
    /// Devices refused because the engine was full of online devices
    /// (`--max-devices` is lower than when the snapshot was taken).
    pub refused: u64,
    /// Offline devices forgotten to make room for later records (the
    /// table is smaller than when the snapshot was taken).
    pub forgotten: u64,
}

impl Tracker {
    /// Encodes up to `max` held devices, in slot order from slot `start`,
    /// into `chunk`. Returns the slot to continue from, or `None` once every
    /// device from `start` on is in.
    ///
    /// The server calls this between batches, so a snapshot of a million
    /// devices never holds its loop for more than one chunk. A device keeps
    /// its slot while the table holds it, so a device held all along is
    /// taken exactly once; one that arrives or is forgotten meanwhile may be
    /// missed, and is in the next snapshot.
    pub fn snapshot_chunk(&self, start: usize, max: usize, chunk: &mut Chunk) -> Option<usize> {
        for (taken, (slot, id, entry)) in self.table.devices_from(Which::All, start).enumerate() {
            if taken == max {
                return Some(slot);
            }
            let held = entry.held(id);
            let flap = self.flaps.export(id).map(|(changes, flapping)| FlapRecord {
                changes: changes.iter().map(|at| unix_micros(self.wall_time(*at))).collect(),
                flapping,
            });
            let mut record = Record::new(
                held.id,
                (held.online, held.left, held.signed),
                (held.window.boot(), held.window.top(), held.window.seen()),
                unix_micros(self.wall_time(held.last_seen)),
                (held.ttl_ms, held.interval_ms),
                held.heartbeats,
                held.version,
                held.addr,
                held.payload,
            );
            record.flap = flap;
            record.set_late(held.late);
            chunk.push(&record);
        }
        None
    }

    /// `count` engines, as [`Tracker::new_sharded`] makes them, holding the
    /// devices of `snapshot`, each in the shard its id belongs to now (the
    /// snapshot may have been taken with another `--threads`). `now` and
    /// `wall` are the same instant on the monotonic and the wall clock.
    ///
    /// Devices come back as they were: state, replay window, version,
    /// address, payload, TTL and interval, with no event. A device that was
    /// online keeps its deadline if that is still ahead; otherwise it gets
    /// one TTL from `now` (see the module docs).
    pub fn restore_sharded(
        config: Config,
        count: usize,
        now: Instant,
        wall: SystemTime,
        snapshot: &Snapshot<'_>,
    ) -> Result<(Vec<Tracker>, Restored), ConfigError> {
        let mut shards = Tracker::new_sharded(config, count, now, wall)?;
        let count = shards.len();
        let wall_us = unix_micros(wall);
        let mut report = Restored::default();
        for record in snapshot.devices().filter_map(Result::ok) {
            let shard = crate::shard::owner(record.id.as_bytes(), count);
            let (last_seen, ttl_ms, graced) = restored_times(&record, now, wall_us);
            let held = Held {
                id: record.id,
                online: record.online(),
                left: record.left(),
                signed: record.signed(),
                late: record.late(),
                window: ReplayWindow::from_parts(record.boot, record.top, record.seen()),
                last_seen,
                ttl_ms,
                interval_ms: record.interval_ms,
                heartbeats: record.heartbeats,
                version: record.version,
                addr: record.addr,
                payload: record.payload,
            };
            let engine = &mut shards[shard];
            match engine.table.restore(&held) {
                Ok(true) => {
                    if let Some(flap) = &record.flap {
                        let at = |unix_us: u64| now - Duration::from_micros(wall_us.saturating_sub(unix_us));
                        engine.flaps.import(record.id, flap.changes.iter().map(|t| at(*t)), flap.flapping);
                    }
                    report.devices += 1;
                    report.online += u64::from(held.online);
                    report.graced += u64::from(graced);
                }
                Ok(false) => report.duplicates += 1,
                Err(_) => report.refused += 1,
            }
        }
        for engine in &mut shards {
            report.forgotten += engine.table.take_forgotten().count() as u64;
        }
        Ok((shards, report))
    }
}

/// A record's last-seen instant and the TTL that puts its deadline where
/// the restore wants it, and whether it is a grace deadline. `now` is the
/// restore's instant, `wall_us` the same instant in Unix microseconds.
fn restored_times(record: &Record<'_>, now: Instant, wall_us: u64) -> (Instant, u32, bool) {
    let ttl_us = u64::from(record.ttl_ms) * 1000;
    let age = Duration::from_micros(wall_us.saturating_sub(record.last_seen_unix_us));
    let last_seen = now - age;
    if !record.online() {
        return (last_seen, record.ttl_ms, false);
    }
    let old_deadline = record.last_seen_unix_us.saturating_add(ttl_us);
    let graced = old_deadline <= wall_us;
    let deadline = if graced {
        now + Duration::from_micros(ttl_us)
    } else {
        now + Duration::from_micros(old_deadline - wall_us)
    };
    let span = (deadline - last_seen).as_micros().div_ceil(1000);
    match u32::try_from(span) {
        Ok(ttl_ms) => (last_seen, ttl_ms, graced),
        // Seen too long ago for the TTL to reach: the last-seen time moves
        // up so that the deadline is still right.
        Err(_) => (deadline - Duration::from_micros(ttl_us), record.ttl_ms, graced),
    }
}
