//! What the loops of one server share: inboxes, per-shard totals for
//! summaries, the events queue, the stop signal and hand-over counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::handover::{INBOX_LIMIT, Inbox, Parcel};
use super::publish::Outbox;
use super::state::SnapshotStats;
use super::stop::{Stop, Waker};
use crate::time::Clock;
use crate::tracker::{Count, Counters, Totals};

/// What the loops of one [`run_sharded`](super::run_sharded) share.
pub(super) struct Shared<'a> {
    /// Datagrams handed to each shard by the others.
    pub(super) inboxes: Vec<Inbox>,
    /// Each shard's totals as of its last loop turn, for summaries.
    pub(super) stats: Arc<[ShardStats]>,
    /// Where the loops hand their transitions to the publisher.
    pub(super) outbox: Outbox,
    /// The stop signal.
    pub(super) stop: &'a Stop,
    /// Reads the real clock as engine time (the engines' origin).
    pub(super) clock: Clock,
    /// Datagrams dropped because a shard's inbox was full.
    pub(super) handover_drops: AtomicU64,
    /// Datagrams handed from one shard to another.
    pub(super) handed_over: AtomicU64,
    /// What the snapshot writer counted (`--state`).
    pub(super) snapshots: Arc<SnapshotStats>,
}

impl<'a> Shared<'a> {
    pub(super) fn new(
        shards: usize,
        outbox: Outbox,
        stop: &'a Stop,
        clock: Clock,
        snapshots: Arc<SnapshotStats>,
    ) -> std::io::Result<Self> {
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let waker = Arc::new(Waker::new()?);
            stop.register(Arc::clone(&waker));
            inboxes.push(Inbox { parcel: Mutex::new(Parcel::default()), waker });
        }
        Ok(Shared {
            inboxes,
            stats: (0..shards).map(|_| ShardStats::default()).collect::<Vec<_>>().into(),
            outbox,
            stop,
            clock,
            handover_drops: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            snapshots,
        })
    }

    /// The outbox, once the loops are done with the rest.
    pub(super) fn into_outbox(self) -> Outbox {
        self.outbox
    }

    /// The totals of every shard but `me`, and the server's own counts.
    pub(super) fn peer_totals(&self, me: usize) -> Totals {
        let mut totals = Totals {
            events_lost: self.outbox.lost(),
            snapshots_failed: self.snapshots.failed.load(Ordering::Relaxed),
            ..Totals::default()
        };
        for (k, stats) in self.stats.iter().enumerate() {
            if k != me {
                totals.add(&stats.load());
            }
        }
        totals
    }

    /// Hands `parcel` to shard `to` and empties it.
    pub(super) fn deliver(&self, to: usize, parcel: &mut Parcel) {
        self.handed_over.fetch_add(parcel.len() as u64, Ordering::Relaxed);
        let inbox = &self.inboxes[to];
        let was_empty = {
            let mut queued = inbox.parcel.lock().unwrap_or_else(PoisonError::into_inner);
            if queued.is_empty() {
                std::mem::swap(&mut *queued, parcel);
                true
            } else {
                let room = INBOX_LIMIT.saturating_sub(queued.len());
                let dropped = parcel.len().saturating_sub(room);
                queued.append(parcel, room);
                if dropped > 0 {
                    self.handover_drops.fetch_add(dropped as u64, Ordering::Relaxed);
                }
                false
            }
        };
        parcel.clear();
        // The owner drains its inbox after clearing its waker, so only the
        // hand-over that fills an empty inbox needs to wake it.
        if was_empty {
            inbox.waker.wake();
        }
    }
}

/// One shard's [`Totals`], published after every loop turn: one atomic
/// per [`Count`], and the table's counts.
#[derive(Debug)]
pub(crate) struct ShardStats {
    /// Devices online.
    online: AtomicU64,
    /// Devices held.
    known: AtomicU64,
    /// The kernel's drop count for this loop's socket (SO_RXQ_OVFL).
    pub(crate) kernel_drops: AtomicU64,
    /// Late, held and degraded (see [`Totals`]).
    late: AtomicU64,
    held: AtomicU64,
    degraded: AtomicU64,
    /// Indexed by [`Count::index`].
    counts: [AtomicU64; Count::LEN],
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            online: AtomicU64::new(0),
            known: AtomicU64::new(0),
            kernel_drops: AtomicU64::new(0),
            late: AtomicU64::new(0),
            held: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ShardStats {
    pub(super) fn store(&self, totals: &Totals) {
        self.online.store(totals.online, Ordering::Relaxed);
        self.known.store(totals.known, Ordering::Relaxed);
        self.late.store(totals.late, Ordering::Relaxed);
        self.held.store(totals.held, Ordering::Relaxed);
        self.degraded.store(totals.degraded, Ordering::Relaxed);
        for (count, value) in totals.counters.iter() {
            self.counts[count.index()].store(value, Ordering::Relaxed);
        }
    }

    pub(crate) fn load(&self) -> Totals {
        let mut counters = Counters::default();
        for count in Count::all() {
            counters.set(count, self.counts[count.index()].load(Ordering::Relaxed));
        }
        Totals {
            online: self.online.load(Ordering::Relaxed),
            known: self.known.load(Ordering::Relaxed),
            late: self.late.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            degraded: self.degraded.load(Ordering::Relaxed),
            counters,
            events_lost: 0,
            snapshots_failed: 0,
        }
    }
}
