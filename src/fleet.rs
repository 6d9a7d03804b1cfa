//! Several trackers, one fleet view: the merge rules of CLUSTER.md, pure.
//!
//! Each device has one shared [`Hearers`] value (a key of the cluster's KV
//! bucket): the live trackers that hear it, whether it is globally online,
//! and its global version. A tracker changes it only when the device comes
//! online or goes offline *on that tracker* ([`Hearers::heard`],
//! [`Hearers::lost`]), or when a tracker died ([`Hearers::without_dead`]);
//! the caller writes the new value back with a compare-and-set on the key's
//! revision and, on a conflict, reads it again and applies the same step,
//! so every step here is idempotent. Nothing here reads a clock, talks to
//! NATS, or knows about sockets; `sink::cluster` does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one tracker last said of a device it hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hearing {
    /// The boot epoch of the heartbeat it rests on.
    pub boot: u32,
    /// Its sequence number.
    pub seq: u32,
    /// When that tracker started hearing it, Unix ms.
    pub since_unix_ms: u64,
    /// The TTL that tracker gives it, ms.
    pub ttl_ms: u32,
}

impl Hearing {
    fn order(&self) -> (u32, u32) {
        (self.boot, self.seq)
    }
}

/// One device's shared state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hearers {
    /// The trackers that hear it, by node id (dead ones may linger until
    /// someone removes them; they never count).
    pub hearers: BTreeMap<String, Hearing>,
    /// Whether it is globally online.
    pub online: bool,
    /// +1 per global transition: the `version` of the fleet events.
    pub gversion: u32,
    /// The (boot, seq) of its last leave: a hearing at or before it is
    /// older than the goodbye (a replayed write), and counts for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at: Option<(u32, u32)>,
}

/// A fleet-level transition a step caused; the caller publishes it with
/// the new value's `gversion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// It was offline (or unknown) everywhere and is heard now.
    Online,
    /// No live tracker hears it any more; `left` if it said goodbye.
    Offline {
        /// It sent a leave (rather than expiring everywhere).
        left: bool,
    },
}

impl Hearers {
    /// Rule 1 (and 3): `node` hears the device, from the heartbeat `hearing`
    /// rests on. A hearing older than the one `node` already recorded, or
    /// than the device's last leave, is a replayed, stale write: nothing
    /// changes.
    pub fn heard(&mut self, node: &str, hearing: Hearing) -> Option<Global> {
        if self.left_at.is_some_and(|left| hearing.order() <= left) {
            return None;
        }
        if let Some(known) = self.hearers.get(node)
            && known.order() >= hearing.order()
        {
            // Rule 3; and the same write twice changes nothing either.
            return None;
        }
        self.hearers.insert(node.to_string(), hearing);
        self.come_online()
    }

    fn come_online(&mut self) -> Option<Global> {
        if self.online || self.hearers.is_empty() {
            return None;
        }
        self.online = true;
        self.gversion += 1;
        Some(Global::Online)
    }

    /// Rule 2: `node` no longer hears the device (it expired there, or with
    /// `left` it sent a leave at `upto`, which ends every hearing up to it,
    /// on any tracker). `live` says which
    /// trackers are alive. A `node` whose entry rests on a newer heartbeat
    /// than `upto` heard it again since: a stale write, nothing changes.
    pub fn lost(
        &mut self,
        node: &str,
        upto: (u32, u32),
        left: bool,
        live: impl Fn(&str) -> bool,
    ) -> Option<Global> {
        match self.hearers.get(node) {
            Some(known) if known.order() > upto => return None,
            Some(_) => {
                self.hearers.remove(node);
            }
            None if !left => return None,
            None => {}
        }
        if left {
            // Every hearing up to the goodbye ends with it; one that rests
            // on a later heartbeat (the device came back, elsewhere) stays.
            self.hearers.retain(|_, hearing| hearing.order() > upto);
            self.left_at = Some(self.left_at.map_or(upto, |at| at.max(upto)));
        }
        self.settle(left, live)
    }

    /// Rule 4: some trackers died. Removes the entries of trackers that
    /// `live` says are dead; if none that hears the device is left, it goes
    /// offline. (The caller decides when: at the latest deadline the dead
    /// tracker could have had, see [`Hearers::deadline_after_death`].)
    pub fn without_dead(&mut self, live: impl Fn(&str) -> bool) -> Option<Global> {
        self.hearers.retain(|node, _| live(node));
        self.settle(false, |_| true)
    }

    /// When a device heard only by a tracker that died must go offline:
    /// that tracker's last proof of life + its liveness interval + the
    /// device's TTL there. Never before its real deadline (it cannot have
    /// been heard after the tracker died), at most one liveness interval
    /// after it.
    pub fn deadline_after_death(
        &self,
        node: &str,
        last_alive_unix_ms: u64,
        liveness_interval_ms: u64,
    ) -> Option<u64> {
        let hearing = self.hearers.get(node)?;
        Some(last_alive_unix_ms + liveness_interval_ms + u64::from(hearing.ttl_ms))
    }

    fn settle(&mut self, left: bool, live: impl Fn(&str) -> bool) -> Option<Global> {
        if !self.online || self.hearers.keys().any(|node| live(node)) {
            return None;
        }
        self.online = false;
        self.gversion += 1;
        Some(Global::Offline { left })
    }

    /// The tracker that heard it last (the newest (boot, seq)) among the live ones.
    pub fn newest(&self, live: impl Fn(&str) -> bool) -> Option<&str> {
        self.hearers
            .iter()
            .filter(|(node, _)| live(node))
            .max_by_key(|(_, h)| h.order())
            .map(|(node, _)| node.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn hearing(seq: u32) -> Hearing {
        Hearing { boot: 1, seq, since_unix_ms: 0, ttl_ms: 3000 }
    }

    #[test]
    fn a_move_from_one_tracker_to_another_is_no_transition() {
        let mut h = Hearers::default();
        let all = |_: &str| true;
        assert_eq!(h.heard("a", hearing(1)), Some(Global::Online));
        assert_eq!(h.heard("b", hearing(5)), None, "a hand-over");
        assert_eq!(h.lost("a", (1, 4), false, all), None, "b still hears it");
        assert_eq!((h.online, h.gversion), (true, 1));
        assert_eq!(h.lost("b", (1, 9), false, all), Some(Global::Offline { left: false }));
        assert_eq!(h.gversion, 2);
    }

    #[test]
    fn a_dead_tracker_no_longer_holds_a_device_up() {
        let mut h = Hearers::default();
        h.heard("a", hearing(1));
        h.heard("b", hearing(2));
        let b_alive = |node: &str| node == "b";
        // a died; b lets go: nobody live hears it.
        assert_eq!(h.lost("b", (1, 3), false, b_alive), Some(Global::Offline { left: false }));
        let mut h = Hearers::default();
        h.heard("a", hearing(1));
        assert_eq!(h.deadline_after_death("a", 10_000, 2_000), Some(15_000));
        assert_eq!(h.without_dead(|node| node != "a"), Some(Global::Offline { left: false }));
    }

    #[test]
    fn stale_and_repeated_writes_change_nothing() {
        let mut h = Hearers::default();
        h.heard("a", hearing(5));
        let before = h.clone();
        assert_eq!(h.heard("a", hearing(3)), None);
        assert_eq!(h.heard("a", hearing(5)), None);
        // A removal for an older heartbeat than a has since recorded.
        assert_eq!(h.lost("a", (1, 4), false, |_| true), None);
        assert_eq!(h, before);
    }

    /// One step of a random run over three trackers.
    #[derive(Debug, Clone)]
    enum Op {
        Hear(usize),
        Lose(usize),
        Leave(usize),
        /// The tracker crashes; its liveness key expires.
        Die(usize),
        /// A new process of that tracker starts, with an empty table.
        Revive(usize),
        /// Replay an earlier write of tracker k (a retried or buffered one).
        Replay(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize).prop_map(Op::Hear),
            3 => (0..3usize).prop_map(Op::Lose),
            1 => (0..3usize).prop_map(Op::Leave),
            1 => (0..3usize).prop_map(Op::Die),
            1 => (0..3usize).prop_map(Op::Revive),
            2 => (0..3usize).prop_map(Op::Replay),
        ]
    }

    proptest! {
        /// Against a model of the truth: the device is globally online
        /// exactly while some live tracker hears it (or until it leaves);
        /// global events alternate, each with the next gversion; replays of
        /// earlier writes change nothing.
        #[test]
        fn the_shared_value_follows_the_truth(ops in proptest::collection::vec(op(), 1..120)) {
            let names = ["a", "b", "c"];
            let mut h = Hearers::default();
            let mut hears: BTreeSet<usize> = BTreeSet::new();
            let mut dead: BTreeSet<usize> = BTreeSet::new();
            let mut seq = 0u32;
            let mut last_write: [Option<(bool, u32)>; 3] = [None; 3];
            let mut events = Vec::new();
            for op in ops {
                let alive = |node: &str| !dead.iter().any(|k| names[*k] == node);
                let event = match op {
                    Op::Hear(k) if !dead.contains(&k) => {
                        seq += 1;
                        hears.insert(k);
                        last_write[k] = Some((true, seq));
                        h.heard(names[k], hearing(seq))
                    }
                    Op::Lose(k) if !dead.contains(&k) && hears.contains(&k) => {
                        hears.remove(&k);
                        last_write[k] = Some((false, seq));
                        h.lost(names[k], (1, seq), false, alive)
                    }
                    Op::Leave(k) if !dead.contains(&k) && hears.contains(&k) => {
                        seq += 1;
                        hears.clear();
                        last_write[k] = Some((false, seq));
                        h.lost(names[k], (1, seq), true, alive)
                    }
                    Op::Die(k) if !dead.contains(&k) => {
                        // A crash: its table and its queued writes are gone
                        // (a partition that heals is an end-to-end case).
                        dead.insert(k);
                        hears.remove(&k);
                        last_write[k] = None;
                        let alive = |node: &str| !dead.iter().any(|k| names[*k] == node);
                        h.without_dead(alive)
                    }
                    Op::Revive(k) => {
                        dead.remove(&k);
                        None
                    }
                    Op::Replay(k) => {
                        let before = h.clone();
                        let event = match last_write[k] {
                            Some((true, s)) if !dead.contains(&k) => h.heard(names[k], hearing(s)),
                            Some((false, s)) if !dead.contains(&k) && !hears.contains(&k) => {
                                h.lost(names[k], (1, s), false, alive)
                            }
                            _ => None,
                        };
                        prop_assert_eq!(&h, &before, "a replay changed the value");
                        event
                    }
                    _ => None,
                };
                let truth = !hears.is_empty();
                prop_assert_eq!(h.online, truth, "after {:?}: {:?}", op, h);
                if let Some(event) = event {
                    events.push((event, h.gversion));
                }
            }
            for (i, (event, gversion)) in events.iter().enumerate() {
                prop_assert_eq!(*gversion as usize, i + 1);
                prop_assert_eq!(matches!(event, Global::Online), i % 2 == 0);
            }
        }
    }
}
