//! The server: one loop that owns the socket and the clock and drives the
//! [`Tracker`].
//!
//! The loop asks the engine for its next deadline, arms a one-shot timer
//! for it, and waits for either the socket or the timer. It then handles the
//! datagrams that arrived (received with `recvmmsg`, up to 4 × 64 per wake-up)
//! and expires what is due. Nothing
//! scans all devices on a tick, and with no device online the timer is
//! disarmed and the loop blocks until a datagram comes.
//!
//! [`run`] takes an already bound socket and a [`Stop`], so tests bind
//! `127.0.0.1:0` and stop the loop when they are done.
//!
//! The rooms: `bind` (sockets, the SO_REUSEPORT group and its steering),
//! `stop` (the stop signal and each loop's eventfd waker), `wait` (timerfd,
//! epoll, the read timeout), `batch` (recvmmsg), `handover` (inboxes between
//! shards), `shared` (what the loops share), `run` (one shard's loop),
//! `drops` (the drop warning) and `publish` (the bounded queue and the
//! publisher thread, where the sinks of [`crate::sink`] attach).

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::sink::Sink;
use crate::time::Clock;
use crate::tracker::{ShardPosition, Tracker};

mod batch;
mod bind;
mod drops;
mod feed;
mod handover;
#[cfg(feature = "metrics")]
mod http;
#[cfg(feature = "metrics")]
pub mod metrics;
mod publish;
mod run;
mod shared;
pub mod state;
mod stop;
pub mod view;
mod wait;

pub use bind::{Bound, bind, bind_group, steer_by_id};

/// The nice value of the threads that work for the loops but must never
/// slow them: the state writer and the sinks.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`], so that on
/// a busy machine the file or the broker waits, not the heartbeats. (On
/// Linux the priority of a thread id is that thread's alone.) `what` names
/// the thread in the debug line if that is not allowed.
pub(crate) fn run_in_background(what: &str) {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE) {
        tracing::debug!(error = %e, "cannot lower the priority of {what}");
    }
}
pub use feed::SinkFeeds;
pub use publish::QUEUE as EVENTS_QUEUE;
pub use state::StateOptions;
pub use stop::Stop;

use run::worker;
use shared::Shared;

/// Runs the loop on `socket` until `stop` is requested, with its
/// transitions going to `sinks`. `clock` maps the real clock to the engine's
/// time: the tracker must have been made with an instant of that clock
/// (`clock.now()`). Returns the engine once every transition has been
/// published, so callers can read its final counters.
///
/// The socket is switched to non-blocking mode. Receive errors are logged
/// and the loop goes on; only a failure of the timer or of epoll ends it with
/// an error. A sink's failure never does (see [`crate::sink`]).
pub fn run(
    socket: &UdpSocket,
    tracker: Tracker,
    clock: Clock,
    stop: &Stop,
    sinks: Vec<Box<dyn Sink>>,
) -> Result<Tracker, ServerError> {
    let finished = run_sharded(std::slice::from_ref(socket), vec![tracker], clock, stop, sinks)?;
    finished.trackers.into_iter().next().ok_or(ServerError::Engines { sockets: 1, engines: 0 })
}

/// Why the server's loops could not run or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A system call of the loop failed (timer, epoll, a thread).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The engines do not match the sockets: engine i must be shard i of as
    /// many as there are sockets.
    #[error(
        "{engines} engines for {sockets} sockets: engine i must be shard i of as many as there are sockets"
    )]
    Engines {
        /// Sockets given.
        sockets: usize,
        /// Engines given.
        engines: usize,
    },
    /// A thread of the server panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

impl From<ServerError> for io::Error {
    fn from(error: ServerError) -> Self {
        match error {
            ServerError::Io(io) => io,
            other => io::Error::other(other),
        }
    }
}

/// What [`run_sharded`] returns once stopped.
#[derive(Debug)]
pub struct Finished {
    /// The engines, shard 0 first.
    pub trackers: Vec<Tracker>,
    /// Datagrams a thread received for another shard and handed over.
    pub handed_over: u64,
    /// Transitions that did not reach every sink (queue full, or a sink failed).
    pub events_lost: u64,
    /// The last event sequence number given out.
    pub event_seq: u64,
    /// Snapshots written (`--state`), the last one at stop included.
    pub snapshots_written: u64,
    /// Snapshots that could not be written.
    pub snapshots_failed: u64,
}

/// How [`run_with`] runs, beyond sockets, engines and sinks.
#[derive(Debug, Default)]
pub struct Options {
    /// Keep the state in a file: periodic snapshots, and one at stop.
    pub state: Option<StateOptions>,
    /// The last event sequence number given out before (from the restored
    /// state; 0 for a fresh start). The first transition gets the next.
    pub event_seq: u64,
    /// Transitions each sink may have waiting (`--sink-buffer`); 0: the default.
    pub sink_buffer: usize,
    /// Serve `/metrics` on this listener (`--metrics ADDR`).
    #[cfg(feature = "metrics")]
    pub metrics: Option<std::net::TcpListener>,
}

/// A sink's buffer when none is given: about 10 MB of transitions.
pub const SINK_BUFFER: usize = 65_536;

/// Runs one loop per socket, each on its own thread (the first on the
/// calling thread), with `trackers[i]` as shard `i` (see
/// [`Tracker::new_sharded`] and [`crate::shard`]). A datagram that arrives
/// on one thread's socket but belongs to another shard is handed to that
/// thread, which applies it and replies from its own socket of the same
/// group. Each loop keeps its own timer, so expiry stays exact.
///
/// Returns the engines once `stop` is requested, or the first error (which
/// stops the other loops). With [`steer_by_id`] on the group, the kernel
/// already delivers most datagrams to their owner's socket.
pub fn run_sharded(
    sockets: &[UdpSocket],
    trackers: Vec<Tracker>,
    clock: Clock,
    stop: &Stop,
    sinks: Vec<Box<dyn Sink>>,
) -> Result<Finished, ServerError> {
    run_with(sockets, trackers, clock, stop, sinks, Options::default())
}

/// [`run_sharded`] with [`Options`]: with `options.state`, the loops take
/// a snapshot every `every` (a chunk per turn; a thread of its own writes
/// the file), and the stopping thread writes the last one once the loops
/// and the publisher are done (see [`state`]).
pub fn run_with(
    sockets: &[UdpSocket],
    trackers: Vec<Tracker>,
    clock: Clock,
    stop: &Stop,
    sinks: Vec<Box<dyn Sink>>,
    options: Options,
) -> Result<Finished, ServerError> {
    let shards = sockets.len();
    let numbered = trackers
        .iter()
        .enumerate()
        .all(|(k, tracker)| tracker.shard() == ShardPosition { index: k, count: shards });
    if shards == 0 || trackers.len() != shards || !numbered {
        return Err(ServerError::Engines { sockets: shards, engines: trackers.len() });
    }
    let sink_buffer = if options.sink_buffer == 0 { SINK_BUFFER } else { options.sink_buffer };
    #[cfg(feature = "metrics")]
    let published = metrics::TransitionMetrics::default();
    #[cfg(feature = "metrics")]
    let observe: Option<publish::Observe> = options.metrics.as_ref().map(|_| {
        let published = published.clone();
        Box::new(move |batch: &[crate::sink::Transition]| published.count(batch)) as publish::Observe
    });
    #[cfg(not(feature = "metrics"))]
    let observe = None;
    let view =
        view::TableView::new(sockets[0].local_addr()?, trackers.first().and_then(Tracker::operator_key));
    let (outbox, publisher, feeds) =
        publish::start(sinks, options.event_seq, sink_buffer, observe, Some(&view))?;
    let stats = Arc::new(state::SnapshotStats::default());
    // Each loop's share of the periodic snapshots, and the thread that writes them.
    let (mut turns, writer): (Vec<Option<state::Turn>>, _) = match &options.state {
        Some(state) => {
            let (parts, thread) =
                state::start_writer(state.path.clone(), shards, outbox.seq_reader(), Arc::clone(&stats))?;
            let start = clock.now();
            let turns = (0..shards).map(|k| Some(state::Turn::new(parts.clone(), k, start, state.every)));
            (turns.collect(), Some(thread))
        }
        None => ((0..shards).map(|_| None).collect(), None),
    };
    let shared = Shared::new(sockets.len(), outbox, stop, clock, Arc::clone(&stats))?;
    #[cfg(feature = "metrics")]
    let listener = match options.metrics {
        Some(listener) => {
            let metrics = metrics::Metrics::new(
                Arc::clone(&shared.stats),
                feeds.clone(),
                Arc::clone(&stats),
                published,
            );
            // The API asks the server on its own socket, from this host.
            let api = http::Api { view: view.clone() };
            Some(http::start(listener, Arc::new(metrics), api)?)
        }
        None => None,
    };
    #[cfg(not(feature = "metrics"))]
    drop(feeds);
    for (k, tracker) in trackers.iter().enumerate() {
        shared.stats[k].store(&tracker.totals());
    }
    let mut trackers = trackers.into_iter();
    let first = trackers.next().ok_or(ServerError::Engines { sockets: shards, engines: 0 })?;
    let result = std::thread::scope(|scope| {
        let mut others = Vec::new();
        for (k, (socket, tracker)) in (1..).zip(sockets[1..].iter().zip(trackers)) {
            let shared = &shared;
            let turn = turns[k].take();
            let thread = std::thread::Builder::new()
                .name(format!("presence-{k}"))
                .spawn_scoped(scope, move || worker(shared, k, socket, tracker, turn));
            match thread {
                Ok(thread) => others.push(thread),
                Err(e) => {
                    stop.stop();
                    return Err(ServerError::Io(e));
                }
            }
        }
        let mut results = vec![worker(&shared, 0, &sockets[0], first, turns[0].take())];
        for thread in others {
            results.push(thread.join().unwrap_or(Err(ServerError::Panicked("receive"))));
        }
        results.into_iter().collect::<Result<Vec<Tracker>, ServerError>>()
    });
    // Every loop is done (and has dropped its share of the snapshots, so
    // the writer ends). Closing the queue lets the publisher finish what
    // is queued and return.
    if let Some(writer) = writer {
        writer.join().map_err(|_| ServerError::Panicked("state"))?;
    }
    #[cfg(feature = "metrics")]
    if let Some(listener) = listener {
        listener.stop();
    }
    let handed_over = shared.handed_over.load(Ordering::Relaxed);
    let outbox = shared.into_outbox();
    let event_seq = outbox.last_seq();
    let lost = outbox.close();
    drop(publisher.join().map_err(|_| ServerError::Panicked("publisher"))?);
    let trackers = result?;
    if let Some(state) = &options.state {
        save_at_stop(state, &trackers, event_seq, &stats);
    }
    Ok(Finished {
        trackers,
        handed_over,
        events_lost: lost.total(),
        event_seq,
        snapshots_written: stats.written.load(Ordering::Relaxed),
        snapshots_failed: stats.failed.load(Ordering::Relaxed),
    })
}

/// The last snapshot, written once nothing changes any more. A failure is
/// logged and counted: the server is stopping either way.
fn save_at_stop(state: &StateOptions, trackers: &[Tracker], event_seq: u64, stats: &state::SnapshotStats) {
    let started = std::time::Instant::now();
    match state::write_now(&state.path, trackers, event_seq) {
        Ok((bytes, records)) => {
            stats.written(started.elapsed());
            tracing::info!(
                file = %state.path.display(),
                devices = records,
                bytes,
                event_seq,
                took = ?started.elapsed(),
                "state saved"
            );
        }
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(file = %state.path.display(), error = %e, "cannot save the state at stop");
        }
    }
}
