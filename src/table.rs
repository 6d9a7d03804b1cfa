//! The presence table: who is online, and until when.
//!
//! Pure: nothing here reads a clock; every time-dependent method takes `now`.
//!
//! Three indexes describe one set of devices:
//! - `by_device` holds every known device (online or not) and its state;
//! - `by_deadline` holds exactly the online devices, ordered by
//!   (deadline, id), so a sweep pops only what is due from the front;
//! - `online` holds exactly the online ids in id order, so the online list
//!   can be paged with a stable cursor. It changes only when a device comes
//!   online or goes offline, never on an ordinary heartbeat.

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
    /// `Some` exactly while the device is online; its key in `by_deadline`.
    pub deadline: Option<Instant>,
    /// The TTL applied at its last heartbeat.
    pub ttl: Duration,
    /// The interval it declared at its last heartbeat (zero if none).
    pub interval: Duration,
    /// When its last heartbeat arrived (monotonic; wall time is derived for display).
    pub last_seen: Instant,
    /// Source address of its last heartbeat; may change (NAT rebinding).
    pub addr: SocketAddr,
    /// Boot epoch of its last heartbeat.
    pub boot: u32,
    /// Sequence number of its last heartbeat.
    pub seq: u32,
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
}

/// Who is online, and until when. See the module docs for the indexes.
#[derive(Debug, Default)]
pub struct PresenceTable {
    /// Every known device and its state.
    by_device: HashMap<DeviceId, Entry>,
    /// Online devices in expiry order; the id breaks ties between equal deadlines.
    by_deadline: BTreeSet<(Instant, DeviceId)>,
    /// Online devices in id order, for paging.
    online: BTreeSet<DeviceId>,
}

impl PresenceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a heartbeat from `device` at `now`: its deadline becomes
    /// `now + beat.ttl`. Returns `true` if the device came online (it was
    /// unknown or offline).
    ///
    /// The caller expires due devices first, so a heartbeat that arrives after
    /// the deadline is seen as a return, not as a continuation.
    pub fn beat(&mut self, now: Instant, device: &str, beat: Beat<'_>) -> bool {
        let deadline = now + beat.ttl;
        let (id, came_online) = match self.by_device.get_key_value(device) {
            Some((id, entry)) => {
                let id = id.clone();
                match entry.deadline {
                    Some(old) => {
                        self.by_deadline.remove(&(old, id.clone()));
                        (id, false)
                    }
                    None => (id, true),
                }
            }
            None => (DeviceId::from(device), true),
        };
        if came_online {
            self.online.insert(id.clone());
        }
        self.by_deadline.insert((deadline, id.clone()));
        let entry = self.by_device.entry(id).or_insert_with(|| Entry {
            deadline: None,
            ttl: beat.ttl,
            interval: beat.interval,
            last_seen: now,
            addr: beat.addr,
            boot: beat.boot,
            seq: beat.seq,
            payload: Box::default(),
            heartbeats: 0,
            flaps: 0,
        });
        entry.deadline = Some(deadline);
        entry.ttl = beat.ttl;
        entry.interval = beat.interval;
        entry.last_seen = now;
        entry.addr = beat.addr;
        entry.boot = beat.boot;
        entry.seq = beat.seq;
        if *entry.payload != *beat.payload {
            entry.payload = beat.payload.into();
        }
        entry.heartbeats += 1;
        came_online
    }

    /// Takes `device` offline because it left. Returns its entry if it was
    /// online; an unknown or already offline device is left as it is.
    pub fn leave(&mut self, device: &str) -> Option<&Entry> {
        let (id, entry) = self.by_device.get_key_value(device)?;
        let deadline = entry.deadline?;
        let id = id.clone();
        self.by_deadline.remove(&(deadline, id.clone()));
        self.online.remove(&id);
        let entry = self.by_device.get_mut(&id)?;
        entry.deadline = None;
        entry.flaps += 1;
        Some(entry)
    }

    /// Takes offline exactly the devices whose deadline is `<= now`, in
    /// deadline order, and reports each. Costs O(log n) per expired device and
    /// O(log n) when nothing is due; it never looks at the others.
    pub fn expire(&mut self, now: Instant, mut offline: impl FnMut(&DeviceId, &Entry)) {
        while let Some((deadline, _)) = self.by_deadline.first() {
            if *deadline > now {
                break;
            }
            let Some((_, id)) = self.by_deadline.pop_first() else {
                break;
            };
            self.online.remove(&id);
            if let Some(entry) = self.by_device.get_mut(&id) {
                entry.deadline = None;
                entry.flaps += 1;
                offline(&id, entry);
            }
        }
    }

    /// The earliest deadline of any online device: when the next sweep is due.
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

    /// Checks that the three indexes agree; panics with a message if not.
    /// For tests: it walks every device.
    pub fn assert_invariants(&self) {
        assert_eq!(
            self.by_deadline.len(),
            self.online.len(),
            "online indexes differ in size"
        );
        for (deadline, id) in &self.by_deadline {
            let entry = self
                .by_device
                .get(id)
                .expect("deadline entry without a device");
            assert_eq!(
                entry.deadline,
                Some(*deadline),
                "deadline of {id} disagrees"
            );
            assert!(
                self.online.contains(id),
                "{id} has a deadline but is not in the online set"
            );
        }
        for (id, entry) in &self.by_device {
            assert_eq!(
                entry.is_online(),
                self.online.contains(id),
                "online set disagrees on {id}"
            );
        }
    }
}

#[cfg(test)]
mod tests;
