//! The table's id index: slot numbers by id hash, in one array of 8-byte
//! buckets with linear probing.
//!
//! A bucket holds the low 32 bits of the id's hash (its tag) and the slot
//! number. A lookup reads the bucket line at the tag's home position, and
//! touches a slot only when the whole 32-bit tag matches. Unlike a table
//! with separate control bytes and entries, a hit costs one cache line of
//! index, not two; at a million devices those lines are cache misses, so
//! this is most of a heartbeat's cost. The id itself stays in its slot; the
//! caller compares it.

/// An empty bucket. A full one always has a non-zero low half (slot + 1).
const EMPTY: u64 = 0;

/// Slot numbers by id hash. The caller hashes the ids and confirms matches.
#[derive(Debug, Default)]
pub(super) struct SlotIndex {
    /// `(tag << 32) | (slot + 1)` per bucket, or [`EMPTY`]; the length is a
    /// power of two (or zero).
    buckets: Vec<u64>,
    /// Full buckets.
    len: usize,
}

fn tag_of(hash: u64) -> u32 {
    hash as u32
}

fn bucket(tag: u32, slot: u32) -> u64 {
    (u64::from(tag) << 32) | (u64::from(slot) + 1)
}

fn slot_of(bucket: u64) -> u32 {
    (bucket as u32).wrapping_sub(1)
}

fn bucket_tag(bucket: u64) -> u32 {
    (bucket >> 32) as u32
}

impl SlotIndex {
    /// How many slots are indexed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// The slot whose hash is `hash` and for which `is_it` holds.
    pub(super) fn find(&self, hash: u64, mut is_it: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.buckets.is_empty() {
            return None;
        }
        let (tag, mask) = (tag_of(hash), self.mask());
        let mut i = tag as usize & mask;
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if bucket_tag(b) == tag && is_it(slot_of(b)) {
                return Some(slot_of(b));
            }
            i = (i + 1) & mask;
        }
    }

    /// Prefetches the bucket `hash`'s probe starts at (see [`crate::hint`]).
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
        if let Some(b) = self.buckets.get(tag_of(hash) as usize & self.mask()) {
            crate::hint::prefetch(b);
        }
    }

    /// The slot of the first bucket, from `hash`'s home, whose tag is
    /// `hash`'s: the slot a lookup will most likely confirm, read without
    /// touching any slot (for prefetching it). Probes at most one line.
    #[inline]
    pub(super) fn likely(&self, hash: u64) -> Option<u32> {
        let (tag, mask) = (tag_of(hash), self.mask());
        let home = tag as usize & mask;
        for step in 0..8 {
            let b = *self.buckets.get((home + step) & mask)?;
            if b == EMPTY {
                return None;
            }
            if bucket_tag(b) == tag {
                return Some(slot_of(b));
            }
        }
        None
    }

    /// Adds `slot` under `hash`; the caller knows it is not there yet.
    /// `slot` must be below `u32::MAX`.
    pub(super) fn insert(&mut self, hash: u64, slot: u32) {
        // At most 3/4 full, so probes stay short (most end in the first line).
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            self.grow();
        }
        self.place(bucket(tag_of(hash), slot));
        self.len += 1;
    }

    fn place(&mut self, b: u64) {
        let mask = self.mask();
        let mut i = bucket_tag(b) as usize & mask;
        while self.buckets[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.buckets[i] = b;
    }

    /// Doubles the buckets. Tags are the hashes' low bits, so entries move
    /// without hashing any id again.
    fn grow(&mut self) {
        let size = (self.buckets.len() * 2).max(16);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; size]);
        // Before the first write, so its pages are huge from the start.
        crate::hint::huge_pages(&self.buckets);
        for b in old.into_iter().filter(|&b| b != EMPTY) {
            self.place(b);
        }
    }

    /// Removes `slot`, filed under `hash`. Returns whether it was there.
    pub(super) fn remove(&mut self, hash: u64, slot: u32) -> bool {
        if self.buckets.is_empty() {
            return false;
        }
        let (target, mask) = (bucket(tag_of(hash), slot), self.mask());
        let mut hole = tag_of(hash) as usize & mask;
        loop {
            match self.buckets[hole] {
                EMPTY => return false,
                b if b == target => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        // Backward-shift deletion: pull later entries of the run into the
        // hole if that is no earlier than their home, so no lookup ever
        // stops at a gap before its entry.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let b = self.buckets[j];
            if b == EMPTY {
                break;
            }
            let home = bucket_tag(b) as usize & mask;
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Against a `HashMap`: hashes drawn from a small set, so runs,
        /// wrap-around and equal tags all happen.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u8..3, 0u64..40, 0u32..60), 1..400)) {
            let mut index = SlotIndex::default();
            let mut model: HashMap<u32, u64> = HashMap::new();
            for (op, h, slot) in ops {
                // Few distinct hashes, some equal in their low bits.
                let hash = (h % 7) << 32 | (h * 0x9e37_79b9) & 0xff;
                match op {
                    0 if !model.contains_key(&slot) => {
                        index.insert(hash, slot);
                        model.insert(slot, hash);
                    }
                    1 => {
                        let removed = match model.get(&slot) {
                            Some(&filed) => index.remove(filed, slot),
                            None => index.remove(hash, slot),
                        };
                        prop_assert_eq!(removed, model.remove(&slot).is_some());
                    }
                    _ => {}
                }
                prop_assert_eq!(index.len(), model.len());
                for (&slot, &hash) in &model {
                    prop_assert_eq!(index.find(hash, |s| s == slot), Some(slot));
                }
                prop_assert_eq!(index.find(hash, |s| !model.contains_key(&s)), None);
            }
        }
    }

    #[test]
    fn grows_and_keeps_everything() {
        let mut index = SlotIndex::default();
        let hash = |i: u32| u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for i in 0..10_000 {
            index.insert(hash(i), i);
        }
        assert_eq!(index.len(), 10_000);
        assert!(index.buckets.len() * 3 >= index.len() * 4);
        for i in (0..10_000).step_by(2) {
            assert!(index.remove(hash(i), i));
        }
        for i in 0..10_000 {
            assert_eq!(index.find(hash(i), |s| s == i), (i % 2 == 1).then_some(i));
        }
    }
}
