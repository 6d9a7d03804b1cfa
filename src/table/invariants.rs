//! The table's invariants as an executable check (ARCHITECTURE.md,
//! invariant 1), for the property tests and the engine fuzz target.

use std::cmp::Reverse;

use super::{HELD, PresenceTable, SUSPECT};

impl PresenceTable {
    /// Checks that the indexes agree; panics with a message if not.
    /// For tests: it walks every device.
    pub fn assert_invariants(&self) {
        let mut valid = std::collections::HashMap::new();
        for Reverse((filed, i, generation)) in self.expiry.iter() {
            let slot = &self.slots[*i as usize];
            if !slot.is_free() && slot.online && slot.generation == *generation {
                assert!(valid.insert(*i, *filed).is_none(), "slot {i} filed twice under one generation");
            }
        }
        let (mut online, mut known, mut late, mut held) = (0, 0, 0, 0);
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.is_free() {
                assert!(self.free_slots.contains(&(i as u32)), "free slot {i} not listed");
                continue;
            }
            known += 1;
            let id = Self::id_of(slot, &self.long_ids);
            assert_eq!(self.find(id.as_bytes()), Some(i), "index disagrees on {id}");
            let in_offline = self.offline.contains(&(slot.last_seen, i as u32));
            assert_eq!(!slot.online, in_offline, "offline index disagrees on {id}");
            assert_eq!(slot.online, self.online_slots.contains(i), "online bitmap disagrees on {id}");
            assert_eq!(!slot.online, self.offline_slots.contains(i), "offline bitmap disagrees on {id}");
            assert!(self.held_slots.contains(i), "held bitmap misses {id}");
            if slot.online {
                online += 1;
                late += usize::from(slot.flags & (SUSPECT | HELD) != 0);
                if slot.flags & HELD != 0 {
                    held += 1;
                    assert!(!valid.contains_key(&(i as u32)), "{id} is held but filed");
                    continue;
                }
                let filed = valid.get(&(i as u32)).unwrap_or_else(|| panic!("{id} is online but not filed"));
                assert!(*filed <= self.next_due(slot), "{id} is filed after it is due");
                if slot.flags & SUSPECT != 0 {
                    assert!(self.suspect_at(slot).is_some(), "{id} is suspect but never becomes late");
                }
            } else {
                assert_eq!(slot.flags & (SUSPECT | HELD), 0, "{id} is offline and late");
            }
        }
        assert_eq!((online, known), (self.online, self.known), "counts disagree");
        assert_eq!((late, held), (self.late, self.held), "late and held counts disagree");
        assert_eq!(self.offline.len(), known - online, "offline index size");
        assert_eq!(
            self.oldest_offline,
            self.offline.first().map(|&(last_seen, _)| last_seen),
            "the cached oldest offline device"
        );
        assert_eq!(self.online_slots.len(), online, "online bitmap size");
        assert_eq!(self.offline_slots.len(), known - online, "offline bitmap size");
        assert_eq!(self.held_slots.len(), known, "held bitmap size");
        assert_eq!(self.index.len(), known, "index size");
        assert!(known <= self.max_devices, "over capacity");
    }
}
