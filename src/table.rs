//! The presence table: who is online, and until when.
//!
//! Pure: nothing here reads a clock; every time-dependent method takes `now`.
//!
//! Four indexes describe one set of devices:
//! - `by_device` holds every known device (online or not) and its state;
//! - `by_deadline` holds exactly the online devices, ordered by
//!   (filed deadline, id), so a sweep pops only what is due from the front.
//!   A device's entry is filed lazily: a heartbeat that moves its deadline
//!   later only updates the device's state, and when the stale entry reaches
//!   the front the sweep re-files it at the real deadline. The tree is thus
//!   touched about once per TTL per device rather than once per heartbeat,
//!   and the filed deadline is never later than the real one, so nothing
//!   expires late;
//! - `online` holds exactly the online ids in id order, so the online list
//!   can be paged with a stable cursor;
//! - `offline` holds exactly the offline devices ordered by (last seen, id),
//!   so that when the table is full the longest-silent one makes room.
//!
//! `online` and `offline` change only when a device comes online or goes
//! offline, never on an ordinary heartbeat.
//!
//! Each device also carries a [`ReplayWindow`]: a heartbeat or leave is
//! accepted only if its (boot, seq) is new.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A device id: shared between the indexes so each id is stored once.
pub type DeviceId = Arc<str>;

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

/// Why the table refused a heartbeat or leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its (boot, seq) is not new; see [`ReplayWindow`].
    Replay,
    /// A new device, and the table is full of online devices.
    OverCapacity,
}

/// How far back, in sequence numbers, a reordered heartbeat is still accepted.
pub const REPLAY_WINDOW: u32 = 64;

/// Which (boot, seq) pairs of one device have been seen: anti-replay with a
/// sliding bitmap, as in IPsec (RFC 4303, section 3.4.3) and WireGuard.
///
/// A pair is new if its boot is newer than the newest seen, or if it has
/// that boot and its seq is above the highest seen, or less than
/// [`REPLAY_WINDOW`] below it and not seen yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The newest boot epoch seen.
    boot: u32,
    /// The highest seq seen within `boot`.
    top: u32,
    /// Bit `i` is set if seq `top - i` has been seen.
    seen: u64,
}

impl ReplayWindow {
    /// A window that has seen exactly (boot, seq).
    pub fn new(boot: u32, seq: u32) -> Self {
        ReplayWindow { boot, top: seq, seen: 1 }
    }

    /// The newest boot epoch seen.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The highest sequence number seen in that boot.
    pub fn top(&self) -> u32 {
        self.top
    }

    /// Whether (boot, seq) is new.
    pub fn is_new(&self, boot: u32, seq: u32) -> bool {
        if boot != self.boot {
            return boot > self.boot;
        }
        if seq > self.top {
            return true;
        }
        let age = self.top - seq;
        age < REPLAY_WINDOW && self.seen & (1 << age) == 0
    }

    /// Records (boot, seq) as seen; call only if [`ReplayWindow::is_new`].
    pub fn accept(&mut self, boot: u32, seq: u32) {
        if boot > self.boot {
            *self = ReplayWindow::new(boot, seq);
        } else if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= REPLAY_WINDOW { 1 } else { (self.seen << shift) | 1 };
            self.top = seq;
        } else {
            self.seen |= 1 << (self.top - seq);
        }
    }
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
}

/// Everything the table keeps about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the device expires; `Some` exactly while it is online.
    pub deadline: Option<Instant>,
    /// While online: its key in `by_deadline`, never later than `deadline`.
    filed: Instant,
    /// The TTL applied at its last heartbeat.
    pub ttl: Duration,
    /// The interval it declared at its last heartbeat (zero if none).
    pub interval: Duration,
    /// When its last heartbeat arrived (monotonic; wall time is derived for display).
    pub last_seen: Instant,
    /// Source address of its last heartbeat; may change (NAT rebinding).
    pub addr: SocketAddr,
    /// The (boot, seq) pairs seen, for replay protection.
    pub window: ReplayWindow,
    /// Payload of its last heartbeat.
    pub payload: Box<[u8]>,
    /// Heartbeats accepted from it.
    pub heartbeats: u64,
    /// Times it went offline.
    pub flaps: u32,
}

impl Entry {
    /// Whether the device is online.
    pub fn is_online(&self) -> bool {
        self.deadline.is_some()
    }

    /// Records an accepted heartbeat's details (everything but the deadline).
    fn record(&mut self, now: Instant, beat: &Beat<'_>) {
        self.ttl = beat.ttl;
        self.interval = beat.interval;
        self.last_seen = now;
        self.addr = beat.addr;
        self.window.accept(beat.boot, beat.seq);
        if *self.payload != *beat.payload {
            self.payload = beat.payload.into();
        }
        self.heartbeats += 1;
    }
}

/// Who is online, and until when. See the module docs for the indexes.
#[derive(Debug)]
pub struct PresenceTable {
    /// Every known device and its state.
    by_device: HashMap<DeviceId, Entry, foldhash::fast::RandomState>,
    /// Online devices in expiry order; the id breaks ties between equal deadlines.
    by_deadline: BTreeSet<(Instant, DeviceId)>,
    /// Online devices in id order, for paging.
    online: BTreeSet<DeviceId>,
    /// Offline devices, longest silent first: the ones to forget when full.
    offline: BTreeSet<(Instant, DeviceId)>,
    /// The most devices `by_device` may hold.
    max_devices: usize,
}

impl Default for PresenceTable {
    fn default() -> Self {
        PresenceTable::new(usize::MAX)
    }
}

impl PresenceTable {
    /// An empty table that holds at most `max_devices` devices. When it is
    /// full, a new device replaces the longest-silent offline one, or is
    /// refused if every device is online.
    pub fn new(max_devices: usize) -> Self {
        PresenceTable {
            by_device: HashMap::default(),
            by_deadline: BTreeSet::new(),
            online: BTreeSet::new(),
            offline: BTreeSet::new(),
            max_devices: max_devices.max(1),
        }
    }

    /// Records a heartbeat from `device` at `now`: its deadline becomes
    /// `now + beat.ttl`. Returns `Ok(true)` if the device came online (it was
    /// unknown or offline). Refuses an old (boot, seq) and, when the table is
    /// full of online devices, a new device; a refusal changes nothing.
    ///
    /// The caller expires due devices first, so a heartbeat that arrives after
    /// the deadline is seen as a return, not as a continuation.
    pub fn beat(&mut self, now: Instant, device: &str, beat: Beat<'_>) -> Result<bool, Refusal> {
        let deadline = now + beat.ttl;
        // The common case, an online device moving its deadline later, costs
        // one hash lookup and no tree operation.
        if let Some(entry) = self.by_device.get_mut(device) {
            if entry.deadline.is_some() && deadline >= entry.filed {
                if !entry.window.is_new(beat.boot, beat.seq) {
                    return Err(Refusal::Replay);
                }
                entry.deadline = Some(deadline);
                entry.record(now, &beat);
                return Ok(false);
            }
        }
        let (id, came_online) = match self.by_device.get_key_value(device) {
            Some((id, entry)) => {
                if !entry.window.is_new(beat.boot, beat.seq) {
                    return Err(Refusal::Replay);
                }
                let id = id.clone();
                match entry.deadline {
                    Some(_) => {
                        // The deadline moved earlier (a shorter TTL): re-file now.
                        self.by_deadline.remove(&(entry.filed, id.clone()));
                        (id, false)
                    }
                    None => {
                        self.offline.remove(&(entry.last_seen, id.clone()));
                        (id, true)
                    }
                }
            }
            None => {
                if self.by_device.len() >= self.max_devices {
                    self.forget_oldest_offline().ok_or(Refusal::OverCapacity)?;
                }
                (DeviceId::from(device), true)
            }
        };
        if came_online {
            self.online.insert(id.clone());
        }
        self.by_deadline.insert((deadline, id.clone()));
        let entry = self.by_device.entry(id).or_insert_with(|| Entry {
            deadline: None,
            filed: deadline,
            ttl: beat.ttl,
            interval: beat.interval,
            last_seen: now,
            addr: beat.addr,
            window: ReplayWindow::new(beat.boot, beat.seq),
            payload: Box::default(),
            heartbeats: 0,
            flaps: 0,
        });
        entry.deadline = Some(deadline);
        entry.filed = deadline;
        entry.record(now, &beat);
        Ok(came_online)
    }

    /// Removes the offline device silent the longest, if there is one.
    fn forget_oldest_offline(&mut self) -> Option<()> {
        let (_, id) = self.offline.pop_first()?;
        self.by_device.remove(&id);
        Some(())
    }

    /// Takes `device` offline because it left, if (boot, seq) is new.
    /// Returns its entry if it was online. An unknown or already offline
    /// device stays as it is (a new pair is still recorded as seen).
    pub fn leave(&mut self, device: &str, boot: u32, seq: u32) -> Result<Option<&Entry>, Refusal> {
        let Some((id, entry)) = self.by_device.get_key_value(device) else {
            return Ok(None);
        };
        if !entry.window.is_new(boot, seq) {
            return Err(Refusal::Replay);
        }
        let id = id.clone();
        let deadline = entry.deadline;
        if deadline.is_some() {
            self.by_deadline.remove(&(entry.filed, id.clone()));
            self.online.remove(&id);
        }
        let Some(entry) = self.by_device.get_mut(&id) else {
            return Ok(None);
        };
        entry.window.accept(boot, seq);
        if deadline.is_none() {
            return Ok(None);
        }
        entry.deadline = None;
        entry.flaps += 1;
        self.offline.insert((entry.last_seen, id));
        Ok(Some(entry))
    }

    /// Takes offline exactly the devices whose deadline is `<= now`, in
    /// deadline order, and reports each. Costs O(log n) per expired device and
    /// O(log n) when nothing is due; it never looks at the others.
    pub fn expire(&mut self, now: Instant, mut offline: impl FnMut(&DeviceId, &Entry)) {
        while let Some((filed, _)) = self.by_deadline.first() {
            if *filed > now {
                break;
            }
            let Some((_, id)) = self.by_deadline.pop_first() else {
                break;
            };
            let Some(entry) = self.by_device.get_mut(&id) else {
                continue;
            };
            match entry.deadline {
                // Filed early and heartbeats moved it on: re-file at the real
                // deadline. If that is due too it is popped again in its turn,
                // so devices still expire in (deadline, id) order.
                Some(deadline) if deadline != entry.filed => {
                    entry.filed = deadline;
                    self.by_deadline.insert((deadline, id));
                }
                _ => {
                    entry.deadline = None;
                    entry.flaps += 1;
                    offline(&id, entry);
                    self.online.remove(&id);
                    self.offline.insert((entry.last_seen, id));
                }
            }
        }
    }

    /// When the next sweep is due: the earliest filed deadline. It is never
    /// later than any online device's deadline, and may be earlier (a sweep
    /// then only re-files entries), so a caller that sleeps until it never
    /// notices an expiry late.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(deadline, _)| *deadline)
    }

    /// The state of one device, online or not.
    pub fn get(&self, device: &str) -> Option<&Entry> {
        self.by_device.get(device)
    }

    /// Online devices in id order, starting after `cursor` (or at the first
    /// one). Devices that come or go between two calls do not disturb the
    /// order of the rest, so a cursor never skips or repeats a device that
    /// stayed online.
    pub fn online_after<'t>(
        &'t self,
        cursor: Option<&str>,
    ) -> impl Iterator<Item = (&'t DeviceId, &'t Entry)> + 't {
        let start = match cursor {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        self.online
            .range::<str, _>((start, Bound::Unbounded))
            .filter_map(move |id| self.by_device.get_key_value(&**id))
    }

    /// How many devices are online.
    pub fn online_count(&self) -> usize {
        self.online.len()
    }

    /// How many devices are known, online or offline.
    pub fn known_count(&self) -> usize {
        self.by_device.len()
    }

    /// The most devices the table holds.
    pub fn max_devices(&self) -> usize {
        self.max_devices
    }

    /// Checks that the indexes agree; panics with a message if not.
    /// For tests: it walks every device.
    pub fn assert_invariants(&self) {
        assert_eq!(self.by_deadline.len(), self.online.len(), "online indexes differ in size");
        for (filed, id) in &self.by_deadline {
            let entry = self.by_device.get(id).expect("deadline entry without a device");
            assert_eq!(entry.filed, *filed, "filed deadline of {id} disagrees");
            assert!(entry.deadline.is_some_and(|d| d >= *filed), "{id} is filed after its deadline");
            assert!(self.online.contains(id), "{id} has a deadline but is not in the online set");
        }
        for (id, entry) in &self.by_device {
            assert_eq!(entry.is_online(), self.online.contains(id), "online set disagrees on {id}");
            let in_offline = self.offline.contains(&(entry.last_seen, id.clone()));
            assert_eq!(!entry.is_online(), in_offline, "offline index disagrees on {id}");
        }
        assert_eq!(self.online.len() + self.offline.len(), self.by_device.len(), "indexes differ in size");
        assert!(self.by_device.len() <= self.max_devices, "over capacity");
    }
}

#[cfg(test)]
mod tests;
