//! The presence table: who is online, and until when.
//!
//! Pure: nothing here reads a clock; every time-dependent method takes `now`.
//!
//! Laid out for a million devices in little memory (see ARCHITECTURE.md):
//! - `slots`: one compact record per device (about 88 bytes: the id inline
//!   up to 19 bytes, times as microseconds since the table's epoch, the
//!   address in 18 bytes); a device's slot number never changes while the
//!   table holds it;
//! - `index`: id → slot number, 8-byte buckets of (hash tag, slot) with
//!   linear probing (`table/index.rs`); the id itself is compared in the slot;
//! - `expiry`: a min-heap of (deadline, slot, generation) for online
//!   devices, so a sweep pops only what is due. Entries are filed lazily: a
//!   heartbeat that moves a deadline later touches no heap entry; when the
//!   old entry reaches the top the sweep re-files it at the real deadline.
//!   An entry whose generation is not its slot's is stale and skipped (the
//!   device left, or its deadline moved earlier and was filed again);
//! - `offline`: offline devices by (last seen, slot), so that when the table
//!   is full the longest-silent one makes room;
//! - `online_slots`, `offline_slots`, `held_slots`: the slot numbers of the
//!   online, offline and all held devices as bitmap hierarchies
//!   (`table/levels.rs`), so a listing page jumps from one listed device to
//!   the next whatever else the table holds.
//!
//! Each device also carries a [`ReplayWindow`]: a heartbeat or leave is
//! accepted only if its (boot, seq) is new.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::time::Instant;

use index::SlotIndex;
use levels::LevelSet;

/// A device id as events carry it.
pub type DeviceId = Arc<str>;

/// Which devices a listing walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The online ones.
    Online,
    /// The offline ones the table still holds.
    Offline,
    /// Every held device.
    All,
}

/// Why a device went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OfflineReason {
    /// Its deadline passed without a heartbeat.
    Expired,
    /// It said so with a `Leave`.
    Left,
}

impl OfflineReason {
    /// A stable lowercase name for logs and the events file.
    pub fn name(self) -> &'static str {
        match self {
            OfflineReason::Expired => "expired",
            OfflineReason::Left => "left",
        }
    }
}

/// Why the table forgot a device (it no longer holds it: `status` says
/// unknown, and its next heartbeat makes it new).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForgetReason {
    /// It was offline for longer than the caller's limit (`--forget-after`).
    Silent,
    /// The table was full, and a new device took the slot of the device
    /// silent the longest.
    Room,
}

impl ForgetReason {
    /// A stable lowercase name for logs and the events file.
    pub fn name(self) -> &'static str {
        match self {
            ForgetReason::Silent => "silent",
            ForgetReason::Room => "room",
        }
    }
}

/// A device the table forgot, as it was just before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// Its id.
    pub id: Box<str>,
    /// Why.
    pub reason: ForgetReason,
    /// Its version (transitions reported so far).
    pub version: u32,
    /// The address of its last datagram.
    pub addr: SocketAddr,
    /// The newest (boot, seq) it sent.
    pub boot: u32,
    /// See `boot`.
    pub seq: u32,
    /// When it was last heard from.
    pub last_seen: Instant,
}

/// Why the table refused a heartbeat or leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its (boot, seq) is not new; see [`ReplayWindow`].
    Replay,
    /// A new device, and the table is full of online devices.
    OverCapacity,
    /// A new device whose id is not UTF-8.
    BadId,
    /// An unsigned frame for a device that has sent signed frames (`--auth optional`).
    Unsigned,
}

/// What a heartbeat did to its device (see [`PresenceTable::arrive`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arrival {
    /// It came online: it was unknown or offline.
    Online,
    /// It was online but late (suspect), and is on time again.
    Back {
        /// Whether it was held (its deadline had passed while the server
        /// suspected its own network).
        held: bool,
    },
    /// It was online and on time, or the heartbeat was a late one that moves nothing.
    Continued,
}

/// Why a device is due in a sweep (see [`PresenceTable::sweep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lateness {
    /// It just became late: no heartbeat for `suspect_after` intervals past
    /// the expected one, and its deadline is still ahead. The table marks it
    /// suspect whatever the verdict.
    Suspect,
    /// Its deadline passed.
    Expired,
}

/// What to do with a device whose deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Take it offline (reason: expired).
    Offline,
    /// Hold it as suspect: it stays online, unfiled, until it beats again or
    /// [`PresenceTable::release_held`] takes it offline.
    Hold,
}

/// One accepted heartbeat, as the table needs it.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    /// The datagram's source address.
    pub addr: SocketAddr,
    /// The device's boot epoch.
    pub boot: u32,
    /// The heartbeat's sequence number.
    pub seq: u32,
    /// The interval the device declared (zero if none).
    pub interval: Duration,
    /// How long the device stays online after this heartbeat.
    pub ttl: Duration,
    /// The application payload.
    pub payload: &'a [u8],
    /// Whether the frame carried a tag that verified. Once a device has sent
    /// one, unsigned frames for it are refused ([`Refusal::Unsigned`]); see
    /// [`PresenceTable::beat`].
    pub signed: bool,
}

/// Who is online, and until when. See the module docs for the layout.
#[derive(Debug)]
pub struct PresenceTable {
    /// Times are stored as microseconds since this instant.
    epoch: Instant,
    /// Device records; free ones are listed in `free_slots`.
    slots: Vec<Slot>,
    /// Free slot numbers, reused first.
    free_slots: Vec<u32>,
    /// Ids longer than [`INLINE_ID`] bytes; free entries are listed in `free_long_ids`.
    long_ids: Vec<Box<str>>,
    /// Free `long_ids` entries.
    free_long_ids: Vec<u32>,
    /// Payloads; entry 0 is the empty payload and is never freed.
    payloads: Vec<Box<[u8]>>,
    /// Free `payloads` entries.
    free_payloads: Vec<u32>,
    /// id → slot number.
    index: SlotIndex,
    /// Hashes ids for `index`; seeded per process.
    hasher: foldhash::fast::RandomState,
    /// Online devices by (filed deadline, slot, generation); may hold stale entries.
    expiry: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// Offline devices by (last seen, slot).
    offline: BTreeSet<(u64, u32)>,
    /// The first key's last seen, kept beside the set: the engine asks for
    /// it with every datagram (`--forget-after`), and a set's first key is a
    /// walk down the tree.
    oldest_offline: Option<u64>,
    /// Slots of the online devices, for listing in O(entries listed).
    online_slots: LevelSet,
    /// Slots of the offline devices, likewise.
    offline_slots: LevelSet,
    /// Slots of every held device, likewise.
    held_slots: LevelSet,
    /// Devices online now (late and held ones included).
    online: usize,
    /// Online devices that are late (suspect), held ones included.
    late: usize,
    /// Online devices held (see [`Verdict::Hold`]).
    held: usize,
    /// The slots held, with the generation they were held under (a device
    /// that beat again since, or left, no longer counts).
    held_list: Vec<(u32, u32)>,
    /// A device is late once `suspect_after` intervals pass after the one
    /// at which its next heartbeat was expected; 0: never.
    suspect_after: u32,
    /// Devices held now.
    known: usize,
    /// The most devices held at once.
    max_devices: usize,
    /// Devices forgotten to make room, not yet taken by [`PresenceTable::take_forgotten`].
    forgotten: Vec<Forgotten>,
}

impl PresenceTable {
    /// An empty table that holds at most `max_devices` devices, keeping time
    /// from `epoch` (times before it count as the epoch itself). When it is
    /// full, a new device replaces the longest-silent offline one, or is
    /// refused if every device is online.
    pub fn new(max_devices: usize, epoch: Instant) -> Self {
        PresenceTable {
            epoch,
            slots: Vec::new(),
            free_slots: Vec::new(),
            long_ids: Vec::new(),
            free_long_ids: Vec::new(),
            payloads: vec![Box::default()],
            free_payloads: Vec::new(),
            index: SlotIndex::default(),
            hasher: foldhash::fast::RandomState::default(),
            expiry: BinaryHeap::new(),
            offline: BTreeSet::new(),
            oldest_offline: None,
            online_slots: LevelSet::default(),
            offline_slots: LevelSet::default(),
            held_slots: LevelSet::default(),
            online: 0,
            late: 0,
            held: 0,
            held_list: Vec::new(),
            suspect_after: 0,
            known: 0,
            max_devices: max_devices.clamp(1, u32::MAX as usize),
            forgotten: Vec::new(),
        }
    }

    /// Devices become late (suspect) once `missed` intervals pass after the
    /// one at which their next heartbeat was due, if their deadline is still
    /// ahead then; 0 turns suspicion off. A device that declares no interval
    /// is never late. Applies to devices as they are next filed.
    pub fn set_suspect_after(&mut self, missed: u32) {
        self.suspect_after = missed;
    }

    /// When the device in `slot` becomes late, if it does before its deadline.
    fn suspect_at(&self, slot: &Slot) -> Option<u64> {
        if self.suspect_after == 0 || slot.interval_ms == 0 {
            return None;
        }
        let interval = u64::from(slot.interval_ms) * 1000;
        let at = slot.last_seen.saturating_add(interval.saturating_mul(u64::from(self.suspect_after) + 1));
        (at < slot.deadline()).then_some(at)
    }

    /// When the sweep must next look at an online device that is not held:
    /// when it becomes late, or its deadline.
    fn next_due(&self, slot: &Slot) -> u64 {
        if slot.flags & SUSPECT == 0
            && let Some(at) = self.suspect_at(slot)
        {
            return at;
        }
        slot.deadline()
    }

    /// Microseconds since the table's epoch (an earlier `at` counts as the epoch).
    fn micros(&self, at: Instant) -> u64 {
        at.as_micros().saturating_sub(self.epoch.as_micros())
    }

    fn instant(&self, micros: u64) -> Instant {
        Instant::from_micros(self.epoch.as_micros().saturating_add(micros))
    }

    /// The id's bytes, without checking UTF-8 (for comparing and hashing).
    fn id_bytes<'s>(slot: &'s Slot, long_ids: &'s [Box<str>]) -> &'s [u8] {
        let bytes = &slot.id.0;
        if bytes[0] == LONG_ID {
            let index = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
            return long_ids[index as usize].as_bytes();
        }
        &bytes[1..=usize::from(bytes[0])]
    }

    fn id_of<'s>(slot: &'s Slot, long_ids: &'s [Box<str>]) -> &'s str {
        // Only whole `&str`s are ever stored, so this never fails.
        std::str::from_utf8(Self::id_bytes(slot, long_ids)).unwrap_or_default()
    }

    /// The hash `device` is filed under, for [`PresenceTable::prefetch_index`]
    /// and [`PresenceTable::prefetch_slot`].
    #[inline]
    pub fn hash(&self, device: &[u8]) -> u64 {
        self.hasher.hash_one(device)
    }

    /// A hint, changing nothing: starts loading the index line a lookup of
    /// the id hashed to `hash` ([`PresenceTable::hash`]) reads first. With
    /// [`PresenceTable::prefetch_slot`] it lets a batch of lookups overlap
    /// their cache misses: prefetch the index lines of the whole batch, then
    /// their slots, then handle each (`Tracker::handle_batch`).
    #[inline]
    pub fn prefetch_index(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// A hint, changing nothing: reads the index line of `hash` (best after
    /// [`PresenceTable::prefetch_index`]) and starts loading the slot it
    /// most likely points at.
    #[inline]
    pub fn prefetch_slot(&self, hash: u64) {
        if let Some(slot) = self.index.likely(hash).and_then(|i| self.slots.get(i as usize)) {
            crate::hint::prefetch(slot);
        }
    }

    /// The slot of `device`. Ids are hashed and compared as bytes everywhere.
    fn find(&self, device: &[u8]) -> Option<usize> {
        self.find_hashed(device, self.hasher.hash_one(device))
    }

    /// [`PresenceTable::find`] with the id's hash worked out.
    fn find_hashed(&self, device: &[u8], hash: u64) -> Option<usize> {
        let (slots, long_ids) = (&self.slots, &self.long_ids);
        self.index.find(hash, |i| Self::id_bytes(&slots[i as usize], long_ids) == device).map(|i| i as usize)
    }

    fn entry(&self, slot: usize) -> Entry<'_> {
        Entry { table: self, slot: &self.slots[slot] }
    }

    /// Files `slot` in the expiry heap at `deadline` under a new generation.
    fn file(&mut self, slot: usize, deadline: u64) {
        let record = &mut self.slots[slot];
        record.generation = record.generation.wrapping_add(1);
        self.expiry.push(Reverse((deadline, slot as u32, record.generation)));
        // Stale entries are dropped when they surface; rebuild if they pile up.
        if self.expiry.len() > 2 * self.online + 1024 {
            let slots = &self.slots;
            self.expiry.retain(|Reverse((_, i, generation))| {
                let s = &slots[*i as usize];
                s.online && !s.is_free() && s.generation == *generation
            });
        }
    }

    /// Stores `payload`, reusing `current` if it holds the same bytes.
    fn store_payload(&mut self, current: u32, payload: &[u8]) -> u32 {
        if *self.payloads[current as usize] == *payload {
            return current;
        }
        self.release_payload(current);
        if payload.is_empty() {
            return 0;
        }
        match self.free_payloads.pop() {
            Some(i) => {
                self.payloads[i as usize] = payload.into();
                i
            }
            None => {
                self.payloads.push(payload.into());
                (self.payloads.len() - 1) as u32
            }
        }
    }

    fn release_payload(&mut self, index: u32) {
        if index != 0 {
            self.payloads[index as usize] = Box::default();
            self.free_payloads.push(index);
        }
    }

    fn make_id(&mut self, device: &str) -> SlotId {
        let mut id = [0u8; INLINE_ID + 1];
        if device.len() <= INLINE_ID {
            id[0] = device.len() as u8;
            id[1..=device.len()].copy_from_slice(device.as_bytes());
        } else {
            let index = match self.free_long_ids.pop() {
                Some(i) => {
                    self.long_ids[i as usize] = device.into();
                    i
                }
                None => {
                    self.long_ids.push(device.into());
                    (self.long_ids.len() - 1) as u32
                }
            };
            id[0] = LONG_ID;
            id[1..5].copy_from_slice(&index.to_le_bytes());
        }
        SlotId(id)
    }

    /// Records a heartbeat from `device` at `now`: its deadline becomes
    /// `now + beat.ttl`. Returns `Ok(true)` if the device came online (it was
    /// unknown or offline). Refuses an old (boot, seq) and, when the table is
    /// full of online devices, a new device; a refusal changes nothing.
    ///
    /// A heartbeat older than the newest seen (reordered or withheld on the
    /// way, inside the replay window) is recorded as seen and counted, but
    /// moves nothing: not the deadline the newest set, not the address or
    /// payload, and it does not bring an offline device back.
    ///
    /// Signatures: once a device has sent a signed frame, unsigned ones for
    /// it are refused ([`Refusal::Unsigned`]). The first signed frame of a
    /// device known only from unsigned frames is accepted whatever its
    /// (boot, seq) and starts a fresh replay window, since unsigned frames
    /// prove nothing (one with boot 2³²−1 must not lock the device out).
    ///
    /// The caller expires due devices first, so a heartbeat that arrives after
    /// the deadline is seen as a return, not as a continuation.
    ///
    /// The id may be given as bytes (the server's hot path skips the UTF-8
    /// check for ids it already holds); a new id that is not UTF-8 is refused.
    pub fn beat(&mut self, now: Instant, device: impl AsRef<[u8]>, beat: Beat<'_>) -> Result<bool, Refusal> {
        self.arrive(now, device, beat).map(|arrival| arrival == Arrival::Online)
    }

    /// [`PresenceTable::beat`], saying what the heartbeat did: brought the
    /// device online, brought it back from being late (or held), or neither.
    pub fn arrive(
        &mut self,
        now: Instant,
        device: impl AsRef<[u8]>,
        beat: Beat<'_>,
    ) -> Result<Arrival, Refusal> {
        let device: &[u8] = device.as_ref();
        self.arrive_hashed(now, device, self.hash(device), beat)
    }

    /// [`PresenceTable::arrive`] for a device whose [`PresenceTable::hash`]
    /// the caller has already worked out (for its prefetch); `hash` must be
    /// this table's hash of `device`.
    pub(crate) fn arrive_hashed(
        &mut self,
        now: Instant,
        device: &[u8],
        hash: u64,
        beat: Beat<'_>,
    ) -> Result<Arrival, Refusal> {
        debug_assert_eq!(hash, self.hash(device));
        let now_us = self.micros(now);
        let ttl_ms = whole_millis(beat.ttl);
        let interval_ms = whole_millis(beat.interval);
        let Some(i) = self.find_hashed(device, hash) else {
            let device = std::str::from_utf8(device).map_err(|_| Refusal::BadId)?;
            return self.admit(now_us, device, beat, ttl_ms, interval_ms).map(|()| Arrival::Online);
        };
        let slot = &self.slots[i];
        let fresh_window = check_frame(slot, beat.signed, beat.boot, beat.seq)?;
        let newest = fresh_window || beat.boot > slot.window.boot() || beat.seq > slot.window.top();
        if !newest {
            // Late: it proves nothing the newest did not, so it only fills its window bit.
            let slot = &mut self.slots[i];
            slot.window.accept(beat.boot, beat.seq);
            slot.heartbeats = slot.heartbeats.saturating_add(1);
            return Ok(Arrival::Continued);
        }
        let (was_online, old_due, old_last_seen, old_payload) =
            (slot.online, self.next_due(slot), slot.last_seen, slot.payload);
        let was_late = if slot.online { slot.flags & (SUSPECT | HELD) } else { 0 };
        let payload = self.store_payload(old_payload, beat.payload);
        let slot = &mut self.slots[i];
        if fresh_window {
            slot.window = ReplayWindow::new(beat.boot, beat.seq);
        } else {
            slot.window.accept(beat.boot, beat.seq);
        }
        if beat.signed {
            slot.flags |= SIGNED;
        }
        slot.flags &= !(LEFT | SUSPECT | HELD);
        slot.last_seen = now_us;
        slot.ttl_ms = ttl_ms;
        slot.interval_ms = interval_ms;
        slot.addr = beat.addr.into();
        slot.heartbeats = slot.heartbeats.saturating_add(1);
        slot.payload = payload;
        slot.online = true;
        let due = self.next_due(&self.slots[i]);
        if !was_online {
            let slot = &mut self.slots[i];
            slot.version = slot.version.saturating_add(1);
            self.offline_remove((old_last_seen, i as u32));
            self.offline_slots.remove(i);
            self.online_slots.insert(i);
            self.online += 1;
            self.file(i, due);
            return Ok(Arrival::Online);
        }
        if was_late != 0 {
            self.late -= 1;
        }
        if was_late & HELD != 0 {
            // A held device has no expiry entry.
            self.held -= 1;
            self.file(i, due);
        } else if due < old_due {
            // Moved earlier (a shorter TTL or interval): the filed entry would be late.
            self.file(i, due);
        }
        Ok(if was_late != 0 { Arrival::Back { held: was_late & HELD != 0 } } else { Arrival::Continued })
    }

    /// Adds a new device, making room by forgetting the longest-silent
    /// offline device if the table is full.
    fn admit(
        &mut self,
        now_us: u64,
        device: &str,
        beat: Beat<'_>,
        ttl_ms: u32,
        interval_ms: u32,
    ) -> Result<(), Refusal> {
        let slot = Slot {
            id: SlotId([0; INLINE_ID + 1]),
            last_seen: now_us,
            window: ReplayWindow::new(beat.boot, beat.seq),
            addr: beat.addr.into(),
            ttl_ms,
            interval_ms,
            heartbeats: 1,
            version: 1,
            generation: 0,
            payload: 0,
            online: true,
            flags: if beat.signed { SIGNED } else { 0 },
        };
        self.insert(device, slot, beat.payload).map(|_| ())
    }

    /// Puts a device the table does not hold into a slot, with `slot`'s
    /// record (its id and payload fields are set here), and files it as
    /// online or offline. Makes room as [`PresenceTable::admit`] does.
    fn insert(&mut self, device: &str, slot: Slot, payload: &[u8]) -> Result<usize, Refusal> {
        if self.known >= self.max_devices {
            self.forget_oldest_offline().ok_or(Refusal::OverCapacity)?;
        }
        let id = self.make_id(device);
        let payload = self.store_payload(0, payload);
        let mut slot = Slot { id, payload, ..slot };
        // Only an online device that turns late before its deadline can be late.
        let keep = if slot.online && self.suspect_at(&slot).is_some() { SUSPECT } else { 0 };
        slot.flags &= SIGNED | LEFT | keep;
        if slot.flags & SUSPECT != 0 {
            self.late += 1;
        }
        let (online, due, last_seen) = (slot.online, self.next_due(&slot), slot.last_seen);
        let i = match self.free_slots.pop() {
            Some(i) => {
                let generation = self.slots[i as usize].generation;
                self.slots[i as usize] = Slot { generation, ..slot };
                i as usize
            }
            None => {
                let capacity = self.slots.capacity();
                self.slots.push(slot);
                if self.slots.capacity() != capacity {
                    // Moved: the new allocation gets the advice too.
                    crate::hint::huge_pages(&self.slots);
                }
                for set in [&mut self.online_slots, &mut self.offline_slots, &mut self.held_slots] {
                    set.grow(self.slots.len());
                }
                self.slots.len() - 1
            }
        };
        self.held_slots.insert(i);
        self.index.insert(self.hasher.hash_one(device.as_bytes()), i as u32);
        self.known += 1;
        if online {
            self.online_slots.insert(i);
            self.online += 1;
            self.file(i, due);
        } else {
            self.offline_slots.insert(i);
            self.offline_insert((last_seen, i as u32));
        }
        Ok(i)
    }

    /// Puts back a device as a snapshot kept it (see [`Held`]). Returns
    /// `Ok(false)`, changing nothing, if the table already holds the id (a
    /// snapshot taken while the table changed may list a device twice; the
    /// first record wins). Refuses a device when the table is full of online
    /// devices, as a heartbeat would be refused.
    pub fn restore(&mut self, held: &Held<'_>) -> Result<bool, Refusal> {
        if held.id.is_empty() {
            return Err(Refusal::BadId);
        }
        if self.find(held.id.as_bytes()).is_some() {
            return Ok(false);
        }
        let mut flags = if held.signed { SIGNED } else { 0 };
        if held.left {
            flags |= LEFT;
        }
        if held.late {
            flags |= SUSPECT;
        }
        let slot = Slot {
            id: SlotId([0; INLINE_ID + 1]),
            last_seen: self.micros(held.last_seen),
            window: held.window,
            addr: held.addr.into(),
            ttl_ms: held.ttl_ms,
            interval_ms: held.interval_ms,
            heartbeats: held.heartbeats,
            version: held.version,
            generation: 0,
            payload: 0,
            online: held.online,
            flags,
        };
        self.insert(held.id, slot, held.payload).map(|_| true)
    }

    /// Removes the offline device silent the longest, if there is one, and
    /// keeps it for [`PresenceTable::take_forgotten`].
    fn forget_oldest_offline(&mut self) -> Option<()> {
        let &(_, i) = self.offline.first()?;
        let forgotten = self.forget(i as usize, ForgetReason::Room);
        self.forgotten.push(forgotten);
        Some(())
    }

    /// Forgets every offline device silent for at least `after` at `now`,
    /// longest silent first, reporting each. Costs O(log n) per device
    /// forgotten and O(1) otherwise: offline devices are kept in the order
    /// they were last seen.
    pub fn forget_silent(&mut self, now: Instant, after: Duration, mut forgotten: impl FnMut(Forgotten)) {
        let after = u64::try_from(after.as_micros()).unwrap_or(u64::MAX);
        let Some(cutoff) = self.micros(now).checked_sub(after) else { return };
        while let Some(&(last_seen, i)) = self.offline.first() {
            if last_seen > cutoff {
                break;
            }
            forgotten(self.forget(i as usize, ForgetReason::Silent));
        }
    }

    /// When the offline device silent the longest was last seen (the next
    /// device [`PresenceTable::forget_silent`] forgets). O(1).
    pub fn oldest_offline_seen(&self) -> Option<Instant> {
        self.oldest_offline.map(|last_seen| self.instant(last_seen))
    }

    fn offline_insert(&mut self, key: (u64, u32)) {
        self.offline.insert(key);
        self.oldest_offline = Some(self.oldest_offline.map_or(key.0, |oldest| oldest.min(key.0)));
    }

    fn offline_remove(&mut self, key: (u64, u32)) {
        if self.offline.remove(&key) && self.oldest_offline == Some(key.0) {
            self.oldest_offline = self.offline.first().map(|&(last_seen, _)| last_seen);
        }
    }

    /// The devices forgotten to make room for new ones since the last call,
    /// oldest first.
    pub fn take_forgotten(&mut self) -> std::vec::Drain<'_, Forgotten> {
        self.forgotten.drain(..)
    }

    /// Whether devices were forgotten to make room since the last
    /// [`PresenceTable::take_forgotten`].
    pub fn has_forgotten(&self) -> bool {
        !self.forgotten.is_empty()
    }

    /// Removes the offline device in slot `i`.
    fn forget(&mut self, i: usize, reason: ForgetReason) -> Forgotten {
        let entry = self.entry(i);
        let forgotten = Forgotten {
            id: Self::id_of(entry.slot, &self.long_ids).into(),
            reason,
            version: entry.version(),
            addr: entry.addr(),
            boot: entry.window().boot(),
            seq: entry.window().top(),
            last_seen: entry.last_seen(),
        };
        self.offline_remove((self.slots[i].last_seen, i as u32));
        let hash = self.hasher.hash_one(Self::id_bytes(&self.slots[i], &self.long_ids));
        self.index.remove(hash, i as u32);
        self.offline_slots.remove(i);
        self.held_slots.remove(i);
        let slot = &mut self.slots[i];
        let (id, payload) = (slot.id, slot.payload);
        slot.id = SlotId([0; INLINE_ID + 1]);
        slot.generation = slot.generation.wrapping_add(1);
        if id.0[0] == LONG_ID {
            let index = u32::from_le_bytes([id.0[1], id.0[2], id.0[3], id.0[4]]);
            self.long_ids[index as usize] = Box::default();
            self.free_long_ids.push(index);
        }
        self.release_payload(payload);
        self.free_slots.push(i as u32);
        self.known -= 1;
        forgotten
    }

    /// Takes `device` offline because it left, if (boot, seq) is new (and
    /// the leave is signed if the device has signed before; see
    /// [`PresenceTable::beat`] for both rules). Returns its entry if it was
    /// online. An unknown or already offline device stays as it is (a new
    /// pair is still recorded as seen).
    pub fn leave(
        &mut self,
        device: &str,
        boot: u32,
        seq: u32,
        signed: bool,
    ) -> Result<Option<Entry<'_>>, Refusal> {
        let Some(i) = self.find(device.as_bytes()) else {
            return Ok(None);
        };
        let slot = &mut self.slots[i];
        if check_frame(slot, signed, boot, seq)? {
            slot.window = ReplayWindow::new(boot, seq);
        } else {
            slot.window.accept(boot, seq);
        }
        if signed {
            slot.flags |= SIGNED;
        }
        if !slot.online {
            return Ok(None);
        }
        let was_late = slot.flags & (SUSPECT | HELD);
        slot.online = false;
        slot.flags = (slot.flags & !(SUSPECT | HELD)) | LEFT;
        if was_late != 0 {
            self.late -= 1;
        }
        if was_late & HELD != 0 {
            self.held -= 1;
        }
        slot.version = slot.version.saturating_add(1);
        // Its expiry entry is now stale.
        slot.generation = slot.generation.wrapping_add(1);
        let last_seen = slot.last_seen;
        self.online -= 1;
        self.online_slots.remove(i);
        self.offline_slots.insert(i);
        self.offline_insert((last_seen, i as u32));
        self.drop_stale_top();
        Ok(Some(self.entry(i)))
    }

    /// Pops stale entries off the top of the heap, so that `next_deadline`
    /// belongs to a device that is online.
    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, i, generation))) = self.expiry.peek() {
            let slot = &self.slots[*i as usize];
            if !slot.is_free() && slot.online && slot.generation == *generation {
                break;
            }
            self.expiry.pop();
        }
    }

    /// Takes offline exactly the devices whose deadline is `<= now`, in
    /// deadline order, and reports each. Costs O(log n) per expired device,
    /// per re-filed or stale entry, and O(1) when nothing is due; it never
    /// looks at the others. (Devices that become late meanwhile are marked
    /// suspect; [`PresenceTable::sweep`] reports those too.)
    pub fn expire(&mut self, now: Instant, mut offline: impl FnMut(&str, Entry<'_>)) {
        self.sweep(now, |_, _, _| Verdict::Offline, |id, entry| offline(id, entry));
    }

    /// Handles everything due at `now`, in order: a device that becomes late
    /// is marked suspect and reported to `due` with [`Lateness::Suspect`]
    /// (its verdict is ignored); a device whose deadline passed is reported
    /// to `due` with [`Lateness::Expired`], as it is before anything changes,
    /// and taken offline or held as the verdict says. Each device taken
    /// offline is then reported to `offline`, as it is after. Costs what
    /// [`PresenceTable::expire`] costs.
    pub fn sweep(
        &mut self,
        now: Instant,
        mut due: impl FnMut(&str, Entry<'_>, Lateness) -> Verdict,
        mut offline: impl FnMut(&str, Entry<'_>),
    ) {
        let now_us = self.micros(now);
        while let Some(&Reverse((filed, i, generation))) = self.expiry.peek() {
            if filed > now_us {
                break;
            }
            self.expiry.pop();
            let slot = &self.slots[i as usize];
            if slot.is_free() || !slot.online || slot.generation != generation {
                continue;
            }
            let next = self.next_due(slot);
            if next != filed {
                // Filed early and heartbeats moved it on: re-file at the real
                // time. If that is due too it surfaces again in its turn,
                // so devices still come due in order.
                self.expiry.push(Reverse((next, i, generation)));
                continue;
            }
            let deadline = slot.deadline();
            if next < deadline {
                // It became late: suspect until it beats or its deadline.
                self.slots[i as usize].flags |= SUSPECT;
                self.late += 1;
                self.file(i as usize, deadline);
                let entry = self.entry(i as usize);
                due(Self::id_of(entry.slot, &self.long_ids), entry, Lateness::Suspect);
                continue;
            }
            let entry = self.entry(i as usize);
            match due(Self::id_of(entry.slot, &self.long_ids), entry, Lateness::Expired) {
                Verdict::Hold => {
                    let slot = &mut self.slots[i as usize];
                    if slot.flags & SUSPECT == 0 {
                        self.late += 1;
                    }
                    slot.flags |= HELD;
                    // No entry stays filed for it.
                    slot.generation = slot.generation.wrapping_add(1);
                    self.held_list.push((i, slot.generation));
                    self.held += 1;
                }
                Verdict::Offline => {
                    self.take_offline(i as usize);
                    let entry = self.entry(i as usize);
                    offline(Self::id_of(entry.slot, &self.long_ids), entry);
                }
            }
        }
        self.drop_stale_top();
    }

    /// Takes an online device offline because its deadline passed (now, or
    /// while it was held).
    fn take_offline(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let was_late = slot.flags & (SUSPECT | HELD);
        slot.online = false;
        slot.flags &= !(SUSPECT | HELD | LEFT);
        slot.version = slot.version.saturating_add(1);
        // Any entry filed for it is stale now.
        slot.generation = slot.generation.wrapping_add(1);
        let last_seen = slot.last_seen;
        if was_late != 0 {
            self.late -= 1;
        }
        if was_late & HELD != 0 {
            self.held -= 1;
        }
        self.online -= 1;
        self.online_slots.remove(i);
        self.offline_slots.insert(i);
        self.offline_insert((last_seen, i as u32));
    }

    /// Takes offline (reason: expired) every device still held, reporting
    /// each as it is after. Costs O(devices held since the last release).
    pub fn release_held(&mut self, mut offline: impl FnMut(&str, Entry<'_>)) {
        for (i, generation) in std::mem::take(&mut self.held_list) {
            let slot = &self.slots[i as usize];
            if slot.is_free() || !slot.online || slot.flags & HELD == 0 || slot.generation != generation {
                continue;
            }
            self.take_offline(i as usize);
            let entry = self.entry(i as usize);
            offline(Self::id_of(entry.slot, &self.long_ids), entry);
        }
        self.drop_stale_top();
    }

    /// Sets the version of `device`, if the table holds it (a caller that
    /// does not report a transition takes it back; one that reports a
    /// transition the table does not count adds it).
    pub fn set_version(&mut self, device: &[u8], version: u32) {
        if let Some(i) = self.find(device) {
            self.slots[i].version = version;
        }
    }

    /// When the next sweep is due: the earliest filed deadline of an online
    /// device (`None` when nobody is online). It is never later than any
    /// online device's deadline, and may be earlier (a sweep then only
    /// re-files or drops entries), so a caller that sleeps until it never
    /// notices an expiry late.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiry.peek().map(|Reverse((deadline, _, _))| self.instant(*deadline))
    }

    /// The state of one device, online or not.
    pub fn get(&self, device: &str) -> Option<Entry<'_>> {
        self.find(device.as_bytes()).map(|i| self.entry(i))
    }

    /// Online devices in slot order, starting at slot `start`: each with its
    /// slot number (the next page starts after it), id and entry. A device
    /// keeps its slot while the table holds it, so paging with slot numbers
    /// never skips or repeats a device that stays online.
    ///
    /// Each step jumps to the next online slot through a bitmap hierarchy, so
    /// taking k devices costs O(k log₆₄ n) whatever the table holds offline.
    pub fn online_from(&self, start: usize) -> impl Iterator<Item = (usize, &str, Entry<'_>)> + '_ {
        self.devices_from(Which::Online, start)
    }

    /// The devices `which` selects, in slot order from slot `start`, as
    /// [`PresenceTable::online_from`] gives the online ones.
    pub fn devices_from(
        &self,
        which: Which,
        start: usize,
    ) -> impl Iterator<Item = (usize, &str, Entry<'_>)> + '_ {
        let set = match which {
            Which::Online => &self.online_slots,
            Which::Offline => &self.offline_slots,
            Which::All => &self.held_slots,
        };
        let mut at = start;
        std::iter::from_fn(move || {
            let i = set.next_from(at)?;
            at = i + 1;
            let slot = &self.slots[i];
            Some((i, Self::id_of(slot, &self.long_ids), Entry { table: self, slot }))
        })
    }

    /// How many devices are online (late and held ones included).
    pub fn online_count(&self) -> usize {
        self.online
    }

    /// How many online devices are late (suspect), held ones included.
    pub fn late_count(&self) -> usize {
        self.late
    }

    /// How many online devices are held (see [`Verdict::Hold`]).
    pub fn held_count(&self) -> usize {
        self.held
    }

    /// How many devices are known, online or offline.
    pub fn known_count(&self) -> usize {
        self.known
    }

    /// Slots allocated (held devices plus free slots): every slot number is below this.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Words of the online bitmap read by listings so far.
    #[cfg(test)]
    pub(crate) fn listing_reads(&self) -> u64 {
        self.online_slots.reads.get()
    }
}

mod index;
mod invariants;
mod levels;
mod slot;
mod window;

pub use slot::{Entry, Held};

use slot::{HELD, INLINE_ID, LEFT, LONG_ID, SIGNED, SUSPECT, Slot, SlotId, check_frame, whole_millis};
pub use window::{REPLAY_WINDOW, ReplayWindow};
#[cfg(test)]
mod tests;
