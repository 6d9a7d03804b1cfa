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

    /// The whole protocol in simulated time (ms), for one device and three
    /// trackers, as `sink::cluster` runs it: each tracker's own table
    /// (online at a heartbeat, offline at its deadline), its writes reaching
    /// the shared value after a delay (in order per tracker, interleaved
    /// between trackers), liveness every 2 s with keys that live 6 s, the
    /// others reading them every second, and the sweeper of rule 4. The
    /// device moves between trackers at random, goes silent, and trackers
    /// die (their queued writes land or not) and come back as new instances.
    mod simulated {
        use super::*;

        const TTL: u64 = 3_000;
        const BEAT: u64 = 1_000;
        const LIVENESS_EVERY: u64 = 2_000;
        const LIVENESS_TTL: u64 = 6_000;
        const POLL: u64 = 1_000;
        const MAX_DELAY: u64 = 500;
        const STEP: u64 = 100;

        #[derive(Debug, Clone)]
        enum Write {
            Heard(Hearing),
            Lost((u32, u32)),
        }

        #[derive(Debug, Default, Clone)]
        struct Tracker {
            /// Process generation: the instance is `t<k>@<generation>`.
            generation: u32,
            alive: bool,
            started: u64,
            /// Local table: the deadline while the device is online here.
            deadline: Option<u64>,
            last_seq: u32,
            /// Writes on their way: (lands at, write).
            queue: Vec<(u64, Write)>,
            last_liveness: u64,
        }

        impl Tracker {
            fn instance(&self, k: usize) -> String {
                format!("t{k}@{}", self.generation)
            }
        }

        /// One segment of the device's life: beat to tracker `route` (or
        /// to nobody) for `steps` heartbeats.
        #[derive(Debug, Clone)]
        struct Segment {
            route: Option<usize>,
            beats: u64,
            /// Kill this tracker at the start of the segment (if it is not
            /// the last one alive), and whether its queued writes land.
            kill: Option<(usize, bool)>,
            /// Start this dead tracker again.
            revive: Option<usize>,
        }

        fn segment() -> impl Strategy<Value = Segment> {
            (
                prop_oneof![3 => (0..3usize).prop_map(Some), 1 => Just(None)],
                1..12u64,
                prop_oneof![4 => Just(None), 1 => (0..3usize, any::<bool>()).prop_map(Some)],
                prop_oneof![3 => Just(None), 1 => (0..3usize).prop_map(Some)],
            )
                .prop_map(|(route, beats, kill, revive)| Segment { route, beats, kill, revive })
        }

        proptest! {
            #[test]
            fn the_fleet_view_is_never_early_never_late_and_never_blinks(
                segments in proptest::collection::vec(segment(), 1..16),
                seed in any::<u64>(),
            ) {
                let mut rng = seed | 1;
                let mut delay = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % (MAX_DELAY + 1)
                };
                let mut trackers: Vec<Tracker> =
                    (0..3).map(|_| Tracker { alive: true, ..Tracker::default() }).collect();
                let mut shared = Hearers::default();
                // Global events: (time, event).
                let mut events: Vec<(u64, Global)> = Vec::new();
                // Instances known dead to the sweeper, with their last liveness.
                let mut dead: BTreeMap<String, u64> = BTreeMap::new();
                // Instances whose death the sweeper has seen (detection time).
                let mut detected: BTreeMap<String, u64> = BTreeMap::new();
                let mut due: Option<u64> = None;
                // Last heartbeat received by any tracker (alive at that moment).
                let mut last_heard: Option<u64> = None;
                let mut received: Vec<u64> = Vec::new();
                let mut seq = 0u32;
                let mut t = 0u64;
                // The schedule, then 30 s of silence.
                let mut plan: Vec<(u64, Option<usize>)> = Vec::new();
                let mut at = 0;
                let mut kills = Vec::new();
                let mut revives = Vec::new();
                for s in &segments {
                    if let Some(kill) = s.kill { kills.push((at, kill)); }
                    if let Some(k) = s.revive { revives.push((at, k)); }
                    for _ in 0..s.beats {
                        plan.push((at, s.route));
                        at += BEAT;
                    }
                }
                let end = at + 30_000;
                let mut next_beat = 0;
                while t <= end {
                    // Deaths and restarts.
                    for &(when, (k, lands)) in &kills {
                        if when == t && trackers[k].alive && trackers.iter().filter(|x| x.alive).count() > 1 {
                            let tr = &mut trackers[k];
                            tr.alive = false;
                            tr.deadline = None;
                            if !lands { tr.queue.clear(); }
                            dead.insert(tr.instance(k), tr.last_liveness);
                        }
                    }
                    for &(when, k) in &revives {
                        if when == t && !trackers[k].alive {
                            let tr = &mut trackers[k];
                            tr.generation += 1;
                            tr.alive = true;
                            tr.started = t;
                            tr.last_liveness = t;
                        }
                    }
                    // The device's heartbeat.
                    if next_beat < plan.len() && plan[next_beat].0 == t {
                        seq += 1;
                        if let Some(k) = plan[next_beat].1 && trackers[k].alive {
                            let tr = &mut trackers[k];
                            let lands = tr.queue.last().map_or(0, |w| w.0).max(t + delay());
                            if tr.deadline.is_none() {
                                let hearing = Hearing { boot: 1, seq, since_unix_ms: t, ttl_ms: TTL as u32 };
                                tr.queue.push((lands, Write::Heard(hearing)));
                            }
                            tr.deadline = Some(t + TTL);
                            tr.last_seq = seq;
                            last_heard = Some(t);
                            received.push(t);
                        }
                        next_beat += 1;
                    }
                    // Local expiries.
                    for tr in trackers.iter_mut().filter(|tr| tr.alive) {
                        if tr.deadline.is_some_and(|d| d <= t) {
                            tr.deadline = None;
                            let lands = tr.queue.last().map_or(0, |w| w.0).max(t + delay());
                            tr.queue.push((lands, Write::Lost((1, tr.last_seq))));
                        }
                    }
                    // Liveness.
                    for tr in trackers.iter_mut().filter(|tr| tr.alive) {
                        if t >= tr.last_liveness + LIVENESS_EVERY { tr.last_liveness = t; }
                    }
                    // Writes that land now (a dead tracker's in-flight ones too).
                    for (k, tracker) in trackers.iter_mut().enumerate() {
                        let instance = tracker.instance(k);
                        let landed: Vec<Write> = {
                            let q = &mut tracker.queue;
                            let n = q.iter().take_while(|w| w.0 <= t).count();
                            q.drain(..n).map(|w| w.1).collect()
                        };
                        for write in landed {
                            let maybe = |h: &str| !detected.contains_key(h);
                            let event = match write {
                                Write::Heard(hearing) => shared.heard(&instance, hearing),
                                Write::Lost(upto) => shared.lost(&instance, upto, false, maybe),
                            };
                            if let Some(e) = event { events.push((t, e)); }
                        }
                    }
                    // The sweeper: keys expire LIVENESS_TTL after the last
                    // write, seen at the next read.
                    if t.is_multiple_of(POLL) {
                        for (instance, last) in &dead {
                            if !detected.contains_key(instance) && t >= last + LIVENESS_TTL {
                                detected.insert(instance.clone(), t);
                                let surely = |h: &str| {
                                    (0..3).any(|k| trackers[k].alive && trackers[k].instance(k) == h)
                                };
                                let has_dead = shared.hearers.keys().any(|h| !surely(h));
                                if has_dead {
                                    let heard_alive = shared.hearers.keys().any(|h| surely(h));
                                    let at = if heard_alive || !shared.online {
                                        t
                                    } else {
                                        shared
                                            .hearers
                                            .keys()
                                            .filter(|h| !surely(h))
                                            .filter_map(|h| {
                                                let since = dead.get(h).copied().unwrap_or(t);
                                                shared.deadline_after_death(h, since, LIVENESS_EVERY)
                                            })
                                            .max()
                                            .unwrap_or(t)
                                    };
                                    due = Some(due.map_or(at, |d: u64| d.min(at)));
                                }
                            }
                        }
                    }
                    if due.is_some_and(|d| d <= t) {
                        due = None;
                        let surely = |h: &str| (0..3).any(|k| trackers[k].alive && trackers[k].instance(k) == h);
                        if let Some(e) = shared.without_dead(surely) { events.push((t, e)); }
                    }
                    // Never blinks: while an alive tracker has heard the
                    // device for longer than a write takes, it is online.
                    let hearing_now = trackers.iter().any(|tr| {
                        tr.alive && tr.deadline.is_some() && tr.queue.is_empty()
                    });
                    if hearing_now {
                        prop_assert!(shared.online, "t={t}: a live tracker hears it but the view says offline: {shared:?}");
                    }
                    t += STEP;
                }
                // Alternating, +1 each.
                for (i, (_, e)) in events.iter().enumerate() {
                    prop_assert_eq!(matches!(e, Global::Online), i % 2 == 0, "{:?}", events);
                }
                prop_assert_eq!(shared.gversion as usize, events.len());
                for (at, e) in &events {
                    if matches!(e, Global::Offline { .. }) {
                        // Never early: not before the TTL of the last
                        // heartbeat a tracker had received (a write takes
                        // up to MAX_DELAY to be seen).
                        let seen = received.iter().filter(|r| **r + MAX_DELAY + STEP < *at).max();
                        if let Some(last) = seen {
                            prop_assert!(*at >= last + TTL, "offline at {at}, before {} + TTL: {events:?}", last);
                        }
                    }
                }
                // Never late: after the silence, offline, by the bound.
                prop_assert!(!shared.online, "still online after 30 s of silence: {shared:?} {events:?}");
                if let (Some(last), Some((at, Global::Offline { .. }))) = (last_heard, events.last()) {
                    let bound = last + TTL + LIVENESS_EVERY + LIVENESS_TTL + POLL + MAX_DELAY + STEP;
                    prop_assert!(*at <= bound, "offline at {at}, later than {bound}");
                    prop_assert!(*at >= last + TTL, "offline at {at}, before the deadline {}", last + TTL);
                }
            }
        }
    }
}
