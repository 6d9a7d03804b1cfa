//! A set of slot numbers that finds the next member after any slot in
//! O(log₆₄ n) word reads, whatever the set holds: the listing walks online
//! devices through it, so a page costs the entries it returns plus a few
//! word reads, not a scan of every slot (1 M held and 10 online used to cost
//! a 1 M-slot scan per page).
//!
//! Level 0 has one bit per slot; each bit of level k+1 says whether the
//! 64-bit word under it in level k has any bit set. The top level is one
//! word. Memory: about 1.02 bits per slot.

/// Slot numbers as a hierarchy of bitmaps; see the module docs.
#[derive(Debug, Clone, Default)]
pub(super) struct LevelSet {
    /// `levels[0]` holds a bit per slot; `levels[k + 1]` a bit per word of
    /// `levels[k]`, set while that word is not zero. The last level has at
    /// most one word.
    levels: Vec<Vec<u64>>,
    /// Members.
    len: usize,
    /// Words read by searches, so tests can check what a search costs.
    #[cfg(test)]
    pub(super) reads: std::cell::Cell<u64>,
}

impl LevelSet {
    /// Makes room for slot numbers below `slots`.
    pub(super) fn grow(&mut self, slots: usize) {
        let mut needed = slots.div_ceil(64).max(1);
        let mut level = 0;
        loop {
            if level == self.levels.len() {
                // A new top level: one bit per non-zero word of the level below.
                let mut words = Vec::new();
                if let Some(below) = level.checked_sub(1).map(|k| &self.levels[k]) {
                    words = vec![0u64; below.len().div_ceil(64)];
                    for (i, word) in below.iter().enumerate() {
                        if *word != 0 {
                            words[i / 64] |= 1 << (i % 64);
                        }
                    }
                }
                self.levels.push(words);
            }
            let words = &mut self.levels[level];
            if words.len() < needed {
                words.resize(needed, 0);
            }
            let len = words.len();
            if len == 1 && level + 1 == self.levels.len() {
                return;
            }
            needed = len.div_ceil(64);
            level += 1;
        }
    }

    /// Adds `slot` (which must be below what [`LevelSet::grow`] made room for).
    pub(super) fn insert(&mut self, slot: usize) {
        let mut i = slot;
        for (level, words) in self.levels.iter_mut().enumerate() {
            let word = &mut words[i / 64];
            let was = *word;
            *word |= 1 << (i % 64);
            if level == 0 && was != *word {
                self.len += 1;
            }
            if was != 0 {
                return;
            }
            i /= 64;
        }
    }

    /// Removes `slot`, if it is a member.
    pub(super) fn remove(&mut self, slot: usize) {
        let mut i = slot;
        for (level, words) in self.levels.iter_mut().enumerate() {
            let Some(word) = words.get_mut(i / 64) else { return };
            let was = *word;
            *word &= !(1 << (i % 64));
            if level == 0 && was != *word {
                self.len -= 1;
            }
            if *word != 0 || was == 0 {
                return;
            }
            i /= 64;
        }
    }

    /// Whether `slot` is a member.
    pub(super) fn contains(&self, slot: usize) -> bool {
        self.levels
            .first()
            .and_then(|words| words.get(slot / 64))
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// Members.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The smallest member `>= start`.
    pub(super) fn next_from(&self, start: usize) -> Option<usize> {
        self.next_at(0, start)
    }

    /// The smallest set bit `>= i` in level `level`.
    fn next_at(&self, level: usize, i: usize) -> Option<usize> {
        let words = self.levels.get(level)?;
        #[cfg(test)]
        self.reads.set(self.reads.get() + 1);
        let w = i / 64;
        let here = words.get(w)? & (u64::MAX << (i % 64));
        if here != 0 {
            return Some(w * 64 + here.trailing_zeros() as usize);
        }
        // The next non-empty word of this level, by the level above.
        let next_word = self.next_at(level + 1, w + 1)?;
        let word = words.get(next_word)?;
        Some(next_word * 64 + word.trailing_zeros() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Agrees with a `BTreeSet` on membership and on every "next from".
        #[test]
        fn agrees_with_a_btreeset(ops in proptest::collection::vec((any::<bool>(), 0usize..300_000), 0..400)) {
            let mut set = LevelSet::default();
            let mut model = BTreeSet::new();
            let mut room = 0;
            for (add, slot) in ops {
                if slot >= room {
                    room = slot + 1;
                    set.grow(room);
                }
                if add {
                    set.insert(slot);
                    model.insert(slot);
                } else {
                    set.remove(slot);
                    model.remove(&slot);
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert!(set.contains(slot) == model.contains(&slot));
                for probe in [0, slot, slot + 1, slot.saturating_sub(64), slot + 4096] {
                    prop_assert_eq!(set.next_from(probe), model.range(probe..).next().copied());
                }
            }
            // Walking the whole set visits exactly the model's members.
            let mut walked = Vec::new();
            let mut at = 0;
            while let Some(slot) = set.next_from(at) {
                walked.push(slot);
                at = slot + 1;
            }
            prop_assert_eq!(walked, model.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn growing_keeps_members_findable() {
        let mut set = LevelSet::default();
        set.grow(10);
        set.insert(3);
        set.grow(1 << 20);
        set.insert((1 << 20) - 1);
        assert_eq!(set.next_from(0), Some(3));
        assert_eq!(set.next_from(4), Some((1 << 20) - 1));
        set.grow(1 << 22);
        assert_eq!(set.next_from(4), Some((1 << 20) - 1));
        assert_eq!(set.next_from(1 << 20), None);
    }
}
