//! The seam between the receive loops and the sinks: a bounded queue and
//! one publisher thread.
//!
//! A loop hands its transitions to the [`Outbox`] without ever waiting: when
//! the queue is full (a sink stalled for long), the newest transitions are
//! dropped and counted, and the loop goes on. The publisher thread takes
//! what is queued in batches, oldest first, gives each batch to every sink,
//! and publishes the total lost (queue drops plus what the sinks lost) for
//! summaries. It also sums the transitions up in the log once a minute.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use super::feed::{Feed, SinkFeeds};
use crate::sink::{Sink, Transition};
use crate::tracker::EventKind;

/// Transitions waiting for the publisher, at most.
pub const QUEUE: usize = 1 << 16;

/// Transitions published in one batch, at most.
const BATCH: usize = 4096;

/// Transitions are summed up in the log at most this often.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The loops' end of the queue. Cloned into every loop.
#[derive(Clone)]
pub(super) struct Outbox {
    /// The queue.
    queue: SyncSender<Transition>,
    /// The last event sequence number given out; taken with the send, so
    /// the queue holds transitions in sequence order.
    seq: Arc<std::sync::Mutex<u64>>,
    /// Transitions lost in all: dropped here when the queue was full, plus
    /// what the sinks lost (the publisher adds those).
    lost: Arc<Lost>,
}

/// What was lost: here, and by each sink (read live from their feeds).
#[derive(Default)]
struct Lost {
    /// Dropped because the queue was full.
    queue_full: Arc<AtomicU64>,
    /// The sinks' feeds, each counting what its sink lost.
    feeds: SinkFeeds,
}

impl Outbox {
    /// Numbers a transition and queues it; drops and counts it if the queue
    /// is full (its number is used up, so consumers see the gap).
    pub(super) fn send(&self, mut transition: Transition) {
        let mut seq = self.seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *seq += 1;
        transition.seq = *seq;
        match self.queue.try_send(transition) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.lost.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            // The publisher is gone (it never leaves before the loops).
            Err(TrySendError::Disconnected(_)) => {
                self.lost.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The last sequence number given out.
    pub(super) fn last_seq(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the last sequence number given out, from any thread, without
    /// keeping the queue open.
    pub(super) fn seq_reader(&self) -> impl Fn() -> u64 + Send + 'static {
        let seq = Arc::clone(&self.seq);
        move || *seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Transitions lost so far, whichever way.
    pub(super) fn lost(&self) -> u64 {
        self.lost.total()
    }

    /// Closes this end of the queue (the publisher ends once every clone
    /// is closed or dropped); returns a way to read the final loss.
    pub(super) fn close(self) -> LostCount {
        LostCount(self.lost)
    }
}

/// The loss counters, readable after the queue is closed.
pub(super) struct LostCount(Arc<Lost>);

impl LostCount {
    /// Transitions lost in all.
    pub(super) fn total(&self) -> u64 {
        self.0.total()
    }
}

impl Lost {
    fn total(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed) + self.feeds.each().map(|(_, _, lost)| lost).sum::<u64>()
    }
}

/// The publisher thread and the sinks' threads; joined, they give the sinks back.
pub(super) struct Publisher {
    /// The publisher.
    publisher: std::thread::JoinHandle<()>,
    /// One thread per sink, in the order the sinks were given.
    sinks: Vec<std::thread::JoinHandle<Box<dyn Sink>>>,
}

impl Publisher {
    /// Waits until everything queued was handed to the sinks and they are
    /// done with it; returns the sinks.
    pub(super) fn join(self) -> std::thread::Result<Vec<Box<dyn Sink>>> {
        self.publisher.join()?;
        self.sinks.into_iter().map(std::thread::JoinHandle::join).collect()
    }
}

/// Starts the publisher thread and one thread per sink, each sink with a
/// buffer of `sink_buffer` transitions (see [`super::feed`]). It runs until
/// every [`Outbox`] clone is dropped, then publishes what is left. The
/// first transition gets sequence number `last_seq + 1`.
pub(super) fn start(
    sinks: Vec<Box<dyn Sink>>,
    last_seq: u64,
    sink_buffer: usize,
    observe: Option<Observe>,
    view: Option<&super::view::TableView>,
) -> std::io::Result<(Outbox, Publisher, SinkFeeds)> {
    let (queue, received) = sync_channel(QUEUE);
    let queue_full = Arc::new(AtomicU64::new(0));
    let mut feeds = Vec::with_capacity(sinks.len());
    let mut threads = Vec::with_capacity(sinks.len());
    for sink in sinks {
        let feed = Arc::new(Feed::new(sink.name(), sink_buffer, Arc::clone(&queue_full)));
        let driven = Arc::clone(&feed);
        let view = view.cloned();
        threads.push(std::thread::Builder::new().name(format!("presence-{}", feed.name)).spawn(
            move || {
                // Below the loops and the publisher: a busy sink waits
                // for CPU, and its buffer absorbs the wait.
                super::run_in_background("a sink");
                driven.drive(sink, view)
            },
        )?);
        feeds.push(feed);
    }
    let feeds = SinkFeeds(Arc::new(feeds));
    let lost = Arc::new(Lost { queue_full, feeds: feeds.clone() });
    let published = feeds.clone();
    let publisher = std::thread::Builder::new()
        .name("presence-publish".into())
        .spawn(move || publish(received, &published, observe))?;
    let outbox = Outbox { queue, seq: Arc::new(std::sync::Mutex::new(last_seq)), lost };
    Ok((outbox, Publisher { publisher, sinks: threads }, feeds))
}

/// The publisher: batches from the queue into every sink's feed.
/// Something that sees every batch the publisher hands on (the metrics).
pub(super) type Observe = Box<dyn Fn(&[Transition]) + Send>;

fn publish(received: Receiver<Transition>, feeds: &SinkFeeds, observe: Option<Observe>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut summary = Summary::default();
    // Blocks for the first transition of a batch, then takes what else is queued.
    while let Ok(first) = received.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match received.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        for feed in feeds.0.iter() {
            feed.push(&batch);
        }
        summary.count(&batch);
        if let Some(observe) = &observe {
            observe(&batch);
        }
        batch.clear();
    }
    for feed in feeds.0.iter() {
        feed.close();
    }
}

/// The log's once-a-minute sum of transitions (they are not logged one by one).
#[derive(Default)]
struct Summary {
    /// Online and offline transitions since the last line.
    counts: (u64, u64),
    /// When the last line was logged (or counting began).
    since: Option<Instant>,
}

impl Summary {
    fn count(&mut self, batch: &[Transition]) {
        for transition in batch {
            let event = &transition.event;
            match event.kind {
                EventKind::Online => self.counts.0 += 1,
                EventKind::Offline(_) => self.counts.1 += 1,
                EventKind::Degraded => tracing::warn!(
                    cause = event.fleet.map(|f| f.cause.name()),
                    online = event.fleet.map(|f| f.online),
                    late = event.fleet.map(|f| f.late),
                    "degraded: many devices went silent at once (or the kernel dropped datagrams); the server suspects its own network and holds devices as suspect instead of taking them offline"
                ),
                EventKind::Recovered => tracing::info!(
                    cause = event.fleet.map(|f| f.cause.name()),
                    released = event.fleet.map(|f| f.released),
                    "recovered: devices still silent went offline"
                ),
                _ => {}
            }
        }
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) >= SUMMARY_EVERY {
            let (online, offline) = std::mem::take(&mut self.counts);
            self.since = Some(now);
            tracing::info!(online, offline, period = "1m", "transitions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    fn transition(i: usize) -> Transition {
        Transition::for_test(&format!("d{i}"), EventKind::Online)
    }

    /// A sink that holds its first batch until released, and counts what it got.
    struct Stalled {
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        got: Arc<AtomicU64>,
    }

    impl Sink for Stalled {
        fn publish(&mut self, batch: &[Transition]) {
            if let Some(release) = self.release.lock().unwrap().take() {
                let _ = release.recv();
            }
            self.got.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }

    /// A sink that counts what it got.
    struct Counting(Arc<AtomicU64>);

    impl Sink for Counting {
        fn publish(&mut self, batch: &[Transition]) {
            self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_stalled_sink_loses_its_oldest_and_holds_back_neither_the_loop_nor_other_sinks() {
        let (release, held) = channel();
        let (stalled_got, other_got) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stalled = Stalled { release: Mutex::new(Some(held)), got: Arc::clone(&stalled_got) };
        let other = Counting(Arc::clone(&other_got));
        let buffer = 8192;
        let (outbox, publisher, feeds) =
            start(vec![Box::new(stalled), Box::new(other)], 0, buffer, None, None).unwrap();
        // Rounds of 4000; the other sink gets each round while the first is stalled.
        let (rounds, round) = (5, 4000);
        let sent = rounds * round;
        for r in 0..rounds {
            for i in 0..round {
                outbox.send(transition(r * round + i)); // never blocks
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while other_got.load(Ordering::Relaxed) < ((r + 1) * round) as u64 {
                assert!(std::time::Instant::now() < deadline, "the other sink was held back");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let stalled_feed = feeds.each().next().unwrap();
        assert!(stalled_feed.1 <= buffer, "the stalled sink's buffer stays bounded");
        release.send(()).unwrap();
        let lost = outbox.close();
        publisher.join().unwrap();
        let each: Vec<_> = feeds.each().collect();
        assert_eq!(each[1].2, 0, "the other sink lost nothing");
        assert!(each[0].2 >= (sent - buffer - TAKE_BOUND) as u64, "{each:?}");
        assert_eq!(stalled_got.load(Ordering::Relaxed) + each[0].2, sent as u64, "delivered or counted");
        assert_eq!(lost.total(), each[0].2);
    }

    /// At most what a stalled sink holds in its hands besides its buffer.
    const TAKE_BOUND: usize = 4096;
}

#[cfg(test)]
mod sequence_tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that keeps the sequence numbers it sees.
    struct Seqs(Arc<Mutex<Vec<u64>>>);

    impl Sink for Seqs {
        fn publish(&mut self, batch: &[Transition]) {
            self.0.lock().unwrap().extend(batch.iter().map(|t| t.seq));
        }
    }

    #[test]
    fn transitions_are_numbered_one_by_one_in_queue_order_across_threads() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (outbox, publisher, _) =
            start(vec![Box::new(Seqs(Arc::clone(&seen)))], 0, QUEUE, None, None).unwrap();
        let senders: Vec<_> = (0..4)
            .map(|k| {
                let outbox = outbox.clone();
                std::thread::spawn(move || {
                    for i in 0..250u32 {
                        let mut transition = Transition::for_test(&format!("t{k}-{i}"), EventKind::Online);
                        transition.event.heartbeat_seq = i;
                        outbox.send(transition);
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        drop(outbox.close());
        publisher.join().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, (1..=1000).collect::<Vec<u64>>(), "gap-free, and in the order the sinks see them");
    }
}
