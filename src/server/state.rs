//! `--state PATH`: the file side of persistence. The format and the
//! restore logic are the engine's ([`crate::state`],
//! [`Tracker::restore_sharded`]); this module reads and writes files.
//!
//! Writing: a snapshot goes to `PATH.tmp`, is fsynced, the current `PATH`
//! becomes `PATH.prev` (the previous good file), the new file is renamed
//! to `PATH` and the directory is fsynced. A crash at any point leaves a
//! good `PATH` or a good `PATH.prev`.
//!
//! Periodic snapshots are taken by the loops a chunk at a time
//! (`Turn`) and written by a thread of their own (`start_writer`), so
//! neither encoding nor the disk ever holds a loop for long. The last
//! snapshot, at stop, is written by the stopping thread once the loops are
//! done ([`write_now`]).
//!
//! Reading ([`restore`]): `PATH`, or `PATH.prev` if `PATH` is missing or
//! bad. A bad file (damaged, cut short, another format) is moved aside to
//! `PATH.bad-<unix seconds>`, never deleted, and logged as an error; if no
//! good file is left, the server starts empty.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state::{Chunk, Encoder, Snapshot};
use crate::time::Instant;
use crate::tracker::{Config, Restored, Tracker};

/// Where and how often the server keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateOptions {
    /// The state file.
    pub path: PathBuf,
    /// Time between periodic snapshots (`--state-every`).
    pub every: Duration,
}

/// Devices a loop encodes per turn while a snapshot is under way: 20–60 µs
/// of work (the benchmark's "state snapshot pause"), so a snapshot never
/// holds a loop for long.
pub const CHUNK: usize = 256;

/// How far the event sequence jumps after a crash. The events numbered
/// between the last snapshot and the crash are unknown, so their numbers
/// are skipped (more than any server numbers between two snapshots): a
/// sequence number is never given to two events, and the jump shows
/// consumers a gap, as a loss would.
pub const CRASH_SEQ_GAP: u64 = 1 << 32;

/// Pieces of a periodic snapshot waiting for the writer thread, at most.
const PARTS_QUEUE: usize = 64;

/// What the server counts about its snapshots (for the log and the summary).
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots written.
    pub written: AtomicU64,
    /// Snapshots that could not be written (disk full, directory gone...).
    pub failed: AtomicU64,
    /// When the last one was written, Unix milliseconds (0: none yet).
    pub last_unix_ms: AtomicU64,
    /// How long the last one took, from its start to its rename, in microseconds.
    pub last_took_us: AtomicU64,
}

impl SnapshotStats {
    /// Records a snapshot written after `took`.
    pub(super) fn written(&self, took: Duration) {
        self.written.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_unix_ms.store(u64::try_from(now.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.last_took_us.store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// The previous good file kept beside `path`.
pub fn previous(path: &Path) -> PathBuf {
    with_suffix(path, ".prev")
}

fn temporary(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// The directory `path` lives in.
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Checks at start that snapshots can be written: creates and removes the
/// temporary file beside `path`.
pub fn check_writable(path: &Path) -> io::Result<()> {
    let tmp = temporary(path);
    File::create(&tmp)?;
    fs::remove_file(&tmp)
}

/// A snapshot being written to the temporary file.
struct Pending {
    /// The temporary file.
    file: BufWriter<File>,
    /// Counts and checksums what was written.
    encoder: Encoder,
    /// Bytes written so far.
    bytes: u64,
}

impl Pending {
    fn begin(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(temporary(path))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        let (encoder, header) = Encoder::start();
        file.write_all(&header)?;
        Ok(Pending { file, encoder, bytes: header.len() as u64 })
    }

    fn append(&mut self, chunk: &Chunk) -> io::Result<()> {
        self.file.write_all(&chunk.bytes)?;
        self.encoder.add(chunk);
        self.bytes += chunk.bytes.len() as u64;
        Ok(())
    }

    /// Writes the footer, makes the file durable and puts it in place.
    /// Returns the file's size and its record count.
    fn commit(self, path: &Path, event_seq: u64, clean: bool) -> io::Result<(u64, u64)> {
        let Pending { mut file, encoder, bytes } = self;
        let records = encoder.records();
        let footer = encoder.finish(event_seq, SystemTime::now(), clean);
        file.write_all(&footer)?;
        let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        if path.exists() {
            fs::rename(path, previous(path))?;
        }
        fs::rename(temporary(path), path)?;
        // The renames are durable once the directory is.
        File::open(directory(path))?.sync_all()?;
        Ok((bytes + footer.len() as u64, records))
    }
}

/// Writes a snapshot of `trackers` to `path` now, on this thread: the last
/// one, when the loops are done. `event_seq` is the last sequence number
/// given out.
pub fn write_now(path: &Path, trackers: &[Tracker], event_seq: u64) -> io::Result<(u64, u64)> {
    let mut pending = Pending::begin(path)?;
    let mut chunk = Chunk::default();
    for tracker in trackers {
        let mut at = Some(0);
        while let Some(start) = at {
            chunk.clear();
            at = tracker.snapshot_chunk(start, CHUNK * 16, &mut chunk);
            pending.append(&chunk)?;
        }
    }
    pending.commit(path, event_seq, true)
}

/// What [`restore`] found.
#[derive(Debug)]
pub struct Recovered {
    /// The engines, holding the restored devices (new ones if no good file was found).
    pub trackers: Vec<Tracker>,
    /// The file the devices came from, if any.
    pub from: Option<PathBuf>,
    /// The event sequence number to continue from: the last one given out
    /// before that file was written, plus [`CRASH_SEQ_GAP`] if it was not
    /// written at a clean stop (0 without a file).
    pub event_seq: u64,
    /// Whether that file was written by a server that was stopping.
    pub clean: bool,
    /// When it was written.
    pub written: Option<SystemTime>,
    /// What the restore put back.
    pub restored: Restored,
    /// Bad files moved aside: (where it was, where it is now, why).
    pub moved_aside: Vec<(PathBuf, PathBuf, String)>,
}

/// Why the state file cannot be used at all (as opposed to being bad,
/// which [`restore`] handles by falling back).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    /// It exists but cannot be read (permissions, an IO error).
    #[error("cannot read the state file {}: {source}", path.display())]
    Unreadable {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A bad file could not be moved aside.
    #[error("cannot move the bad state file {} aside: {source}", path.display())]
    MoveAside {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The engine refused the configuration.
    #[error(transparent)]
    Config(#[from] crate::tracker::ConfigError),
}

/// Builds `shards` engines from the state file at `path` (or its previous
/// good copy), as the module docs describe; new empty engines if there is
/// no good file. `now` and `wall` are the same instant on both clocks.
pub fn restore(
    path: &Path,
    config: Config,
    shards: usize,
    now: Instant,
    wall: SystemTime,
) -> Result<Recovered, StateFileError> {
    let mut moved_aside = Vec::new();
    for candidate in [path.to_path_buf(), previous(path)] {
        let bytes = match fs::read(&candidate) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StateFileError::Unreadable { path: candidate, source }),
        };
        match Snapshot::read(&bytes) {
            Ok(snapshot) => {
                let (trackers, restored) = Tracker::restore_sharded(config, shards, now, wall, &snapshot)?;
                // After a crash, events after the snapshot were numbered
                // already; their numbers must not be given out again.
                let gap = if snapshot.clean { 0 } else { CRASH_SEQ_GAP };
                return Ok(Recovered {
                    trackers,
                    from: Some(candidate),
                    event_seq: snapshot.event_seq.saturating_add(gap),
                    clean: snapshot.clean,
                    written: Some(snapshot.written),
                    restored,
                    moved_aside,
                });
            }
            Err(why) => {
                let stamp = wall.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let aside = with_suffix(&candidate, &format!(".bad-{stamp}"));
                fs::rename(&candidate, &aside)
                    .map_err(|source| StateFileError::MoveAside { path: candidate.clone(), source })?;
                tracing::error!(
                    file = %candidate.display(),
                    moved_to = %aside.display(),
                    error = %why,
                    "the state file is bad; moved it aside and kept it"
                );
                moved_aside.push((candidate, aside, why.to_string()));
            }
        }
    }
    Ok(Recovered {
        trackers: Tracker::new_sharded(config, shards, now, wall)?,
        from: None,
        event_seq: 0,
        clean: false,
        written: None,
        restored: Restored::default(),
        moved_aside,
    })
}

/// A piece of a periodic snapshot, from a loop to the writer.
pub(super) struct Part {
    /// Which snapshot.
    generation: u64,
    /// From which loop.
    shard: usize,
    /// Records.
    chunk: Chunk,
    /// Whether it is the loop's last piece of this snapshot.
    last: bool,
}

/// The loops' end of the writer's queue.
pub(super) type Parts = SyncSender<Part>;

/// Starts the thread that writes periodic snapshots for `shards` loops.
/// `event_seq` reads the last event sequence number given out. It ends
/// when every loop has dropped its [`Parts`].
pub(super) fn start_writer(
    path: PathBuf,
    shards: usize,
    event_seq: impl Fn() -> u64 + Send + 'static,
    stats: Arc<SnapshotStats>,
) -> io::Result<(Parts, std::thread::JoinHandle<()>)> {
    let (parts, received) = sync_channel(PARTS_QUEUE);
    let thread = std::thread::Builder::new().name("presence-state".into()).spawn(move || {
        // Below the loops: on a busy machine the file waits, not the heartbeats.
        // (On Linux the priority of a thread id is that thread's alone.)
        super::run_in_background("the state writer");
        write_periodic(&path, shards, received, &event_seq, &stats)
    })?;
    Ok((parts, thread))
}

/// A periodic snapshot in progress.
struct InProgress {
    generation: u64,
    /// The file, or the error that stopped it (the rest is discarded).
    pending: Result<Pending, io::Error>,
    /// Which shards have sent everything.
    done: Vec<bool>,
    started: std::time::Instant,
}

fn write_periodic(
    path: &Path,
    shards: usize,
    received: Receiver<Part>,
    event_seq: &dyn Fn() -> u64,
    stats: &SnapshotStats,
) {
    let mut current: Option<InProgress> = None;
    // Snapshots up to this one are written or given up on.
    let mut settled = 0u64;
    let mut warned = false;
    for part in received {
        let generation = part.generation;
        if generation <= settled {
            // A straggler of a snapshot given up on.
            continue;
        }
        if current.as_ref().is_none_or(|snapshot| snapshot.generation != generation) {
            // A newer snapshot starts; one not finished by now is given up.
            settled = generation - 1;
            current = Some(InProgress {
                generation,
                pending: Pending::begin(path),
                done: vec![false; shards],
                started: std::time::Instant::now(),
            });
        }
        let Some(snapshot) = current.as_mut() else { continue };
        if let Ok(pending) = &mut snapshot.pending
            && let Err(e) = pending.append(&part.chunk)
        {
            snapshot.pending = Err(e);
        }
        if let Some(done) = snapshot.done.get_mut(part.shard) {
            *done |= part.last;
        }
        if !snapshot.done.iter().all(|done| *done) {
            continue;
        }
        let Some(snapshot) = current.take() else { continue };
        settled = generation;
        // Every loop had published the transitions its records reflect
        // before sending them, so this sequence number covers them all.
        let result = snapshot.pending.and_then(|pending| pending.commit(path, event_seq(), false));
        match result {
            Ok((bytes, records)) => {
                stats.written(snapshot.started.elapsed());
                if warned {
                    tracing::info!(file = %path.display(), "state snapshots are written again");
                    warned = false;
                }
                tracing::debug!(
                    file = %path.display(),
                    records,
                    bytes,
                    took = ?snapshot.started.elapsed(),
                    "state snapshot written"
                );
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = fs::remove_file(temporary(path));
                // Warn at the first failure of a run of them; the server
                // keeps serving and tries again at the next snapshot.
                if !warned {
                    tracing::warn!(file = %path.display(), error = %e, "cannot write the state snapshot; will retry");
                    warned = true;
                }
            }
        }
    }
}

/// One loop's share of the periodic snapshots: every `every` since `start`
/// (the same schedule for all loops, so they take the same generation), it
/// encodes its devices a chunk per turn and hands them to the writer.
pub(super) struct Turn {
    /// The writer's queue.
    parts: Parts,
    /// This loop's shard.
    shard: usize,
    /// The schedule's start and period.
    start: Instant,
    every: Duration,
    /// The last snapshot this loop took part in (0: none yet).
    generation: u64,
    /// Where this loop's part of the current snapshot goes on, if one is under way.
    cursor: Option<usize>,
    /// A piece the queue had no room for, sent again next turn.
    unsent: Option<Part>,
    /// Records encoded and not yet sent.
    chunk: Chunk,
}

impl Turn {
    pub(super) fn new(parts: Parts, shard: usize, start: Instant, every: Duration) -> Self {
        Turn {
            parts,
            shard,
            start,
            every: every.max(Duration::from_millis(1)),
            generation: 0,
            cursor: None,
            unsent: None,
            chunk: Chunk::default(),
        }
    }

    /// The snapshot number due at `now`: 1 at `start + every`, and so on.
    fn due_generation(&self, now: Instant) -> u64 {
        let since = (now - self.start).as_micros();
        u64::try_from(since / self.every.as_micros().max(1)).unwrap_or(u64::MAX)
    }

    /// When this loop must take its next turn, at the latest: now while a
    /// snapshot is under way, shortly if the writer's queue was full, else
    /// at the next scheduled snapshot.
    pub(super) fn deadline(&self, now: Instant) -> Instant {
        if self.unsent.is_some() {
            return now + Duration::from_millis(1);
        }
        if self.cursor.is_some() {
            return now;
        }
        let next = u32::try_from(self.generation + 1).unwrap_or(u32::MAX);
        self.start + self.every * next
    }

    /// Does this turn's share: starts this loop's part of a due snapshot, or
    /// encodes and sends one more chunk. Call after the turn's transitions
    /// are published. Never blocks: a full queue keeps the piece for the
    /// next turn, and no new piece is made until it is sent.
    pub(super) fn step(&mut self, tracker: &Tracker, now: Instant) {
        if let Some(part) = self.unsent.take()
            && !self.send(part)
        {
            return;
        }
        if self.cursor.is_none() {
            let due = self.due_generation(now);
            if due <= self.generation {
                return;
            }
            self.generation = due;
            self.cursor = Some(0);
        }
        let Some(start) = self.cursor else { return };
        self.chunk.clear();
        self.cursor = tracker.snapshot_chunk(start, CHUNK, &mut self.chunk);
        let chunk = std::mem::take(&mut self.chunk);
        let part =
            Part { generation: self.generation, shard: self.shard, chunk, last: self.cursor.is_none() };
        self.send(part);
    }

    /// Queues `part`; keeps it for the next turn if the queue is full.
    fn send(&mut self, part: Part) -> bool {
        match self.parts.try_send(part) {
            Ok(()) => true,
            Err(TrySendError::Full(part)) => {
                self.unsent = Some(part);
                false
            }
            // The writer is gone; nothing to do.
            Err(TrySendError::Disconnected(_)) => true,
        }
    }
}
