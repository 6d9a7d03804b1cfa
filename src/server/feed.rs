//! Each sink's own buffer and thread: the publisher copies every batch into
//! every sink's [`Feed`], and each sink takes from its own, so a sink that
//! is slow or down holds back nobody else. A full feed loses its oldest
//! transitions (and counts them): when the sink catches up, it delivers the
//! newest ones, and the gap in `seq` shows what it missed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::sink::{Sink, Transition};

use super::view::TableView;

/// Transitions a sink takes from its feed at once, at most.
const TAKE: usize = 4096;

/// How often an idle sink is asked whether it wants a resync
/// ([`Sink::wants_resync`]).
const RESYNC_LOOK: std::time::Duration = std::time::Duration::from_millis(500);

/// What a feed holds.
#[derive(Default)]
struct Queue {
    /// Waiting transitions, oldest first.
    transitions: VecDeque<Transition>,
    /// No more will come.
    closed: bool,
}

/// One sink's buffer, shared by the publisher (which fills it) and the
/// sink's thread (which empties it).
pub(crate) struct Feed {
    /// The sink's name, for the log and the metrics.
    pub(crate) name: &'static str,
    /// The buffer.
    queue: Mutex<Queue>,
    /// Signalled when the buffer gets something, or is closed.
    ready: Condvar,
    /// The most transitions it holds (`--sink-buffer`).
    capacity: usize,
    /// Transitions dropped because the buffer was full.
    overflowed: AtomicU64,
    /// What the sink itself reported lost, as of its last batch.
    sink_lost: AtomicU64,
    /// Transitions the server's own queue dropped before any feed saw them
    /// (shared by every feed).
    upstream_lost: Arc<AtomicU64>,
}

impl Feed {
    pub(crate) fn new(name: &'static str, capacity: usize, upstream_lost: Arc<AtomicU64>) -> Self {
        Feed {
            upstream_lost,
            name,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            overflowed: AtomicU64::new(0),
            sink_lost: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `batch`; if the buffer overflows, its oldest transitions go.
    pub(crate) fn push(&self, batch: &[Transition]) {
        let mut queue = self.lock();
        queue.transitions.extend(batch.iter().cloned());
        let excess = queue.transitions.len().saturating_sub(self.capacity);
        if excess > 0 {
            queue.transitions.drain(..excess);
            self.overflowed.fetch_add(excess as u64, Ordering::Relaxed);
        }
        drop(queue);
        self.ready.notify_one();
    }

    /// No more transitions will come; the sink delivers what is left and ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Transitions waiting in the buffer.
    pub(crate) fn depth(&self) -> usize {
        self.lock().transitions.len()
    }

    /// Transitions this sink lost: dropped from its full buffer, or lost by the sink itself.
    pub(crate) fn lost(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed) + self.sink_lost.load(Ordering::Relaxed)
    }

    /// Transitions that never reached this sink's buffer or were dropped from it.
    fn missed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed) + self.upstream_lost.load(Ordering::Relaxed)
    }

    /// The sink's thread: takes batches from the feed until it is closed and
    /// empty, and returns the sink. After a batch, if transitions were
    /// missed since the last look, it reads the server's view of every
    /// device through `view` and gives it to [`Sink::resync`] (transitions
    /// still queued are newer than what they would overwrite, or the same).
    pub(crate) fn drive(self: Arc<Self>, mut sink: Box<dyn Sink>, view: Option<TableView>) -> Box<dyn Sink> {
        let mut batch = Vec::with_capacity(TAKE);
        let mut missed = 0;
        loop {
            let now_missed = self.missed();
            if (now_missed > missed || sink.wants_resync())
                && sink.keeps_states()
                && let Some(view) = &view
            {
                match view.devices() {
                    Ok(devices) => {
                        if now_missed > missed {
                            tracing::info!(
                                sink = self.name,
                                missed = now_missed - missed,
                                devices = devices.len(),
                                "transitions were lost on the way to this destination: writing every device's state again"
                            );
                        }
                        sink.resync(&devices);
                        missed = now_missed;
                    }
                    // Tried again after the next batch.
                    Err(e) => {
                        tracing::warn!(sink = self.name, error = %e, "cannot read the devices to resynchronise")
                    }
                }
            }
            {
                let mut queue = self.lock();
                while queue.transitions.is_empty() && !queue.closed {
                    let (woken, wait) =
                        self.ready.wait_timeout(queue, RESYNC_LOOK).unwrap_or_else(PoisonError::into_inner);
                    queue = woken;
                    if wait.timed_out() && queue.transitions.is_empty() && sink.wants_resync() {
                        // Asked for by the sink itself (the cluster sink,
                        // back after an outage): done on its own, with no
                        // transition to wait for.
                        break;
                    }
                }
                if queue.transitions.is_empty() {
                    if queue.closed {
                        return sink;
                    }
                    continue;
                }
                let take = queue.transitions.len().min(TAKE);
                batch.extend(queue.transitions.drain(..take));
            }
            sink.publish(&batch);
            self.sink_lost.store(sink.lost(), Ordering::Relaxed);
            batch.clear();
        }
    }
}

/// The sinks' feeds, as the metrics see them.
#[derive(Clone, Default)]
pub struct SinkFeeds(pub(crate) Arc<Vec<Arc<Feed>>>);

impl SinkFeeds {
    /// Each sink's name, transitions waiting in its buffer, and transitions it lost.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, usize, u64)> + '_ {
        self.0.iter().map(|feed| (feed.name, feed.depth(), feed.lost()))
    }
}
