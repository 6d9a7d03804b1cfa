//! The events file: one JSON line per transition, appended to a file or
//! written to stdout. Serving never depends on it: a write that fails
//! (disk full, a reader that went away) is counted and logged at most once
//! per [`WARN_EVERY`], the lines are lost, and a file is reopened and tried
//! again on a later batch.
//!
//! **Line-atomic for readers.** The lines of a batch go out in one `write`,
//! so a line is never split between two writes. A write cut short (disk
//! full, SIGKILL while writing) can still leave a torn last line; before it
//! appends again (after a failed write, and when it opens an existing file)
//! the log checks the file's last byte and ends a torn line with a newline,
//! so the torn part stands alone. A torn line is a proper prefix of a JSON
//! object and never parses; readers skip lines that do not parse, and read
//! only lines that end in a newline.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Sink, Transition};
use crate::tracker::EventKind;
use crate::wire;

/// At most one warning about lost events per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// A file that failed is reopened at most this often.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Where the lines go.
enum Destination {
    /// Appended to a file, reopened after a failure.
    File {
        /// The file's path, for reopening.
        path: PathBuf,
        /// The open file; `None` after a failure until it is reopened.
        file: Option<File>,
        /// When the last reopen was tried.
        last_open: Option<Instant>,
        /// Whether the file may end in a torn line, to be checked before the next write.
        check_tail: bool,
    },
    /// Any writer (stdout); no tail to repair.
    Writer(Box<dyn Write + Send>),
}

/// The `--events` sink: JSON lines, one per transition, written once per
/// batch (see the module docs for what happens when that fails).
pub struct JsonLines {
    /// Where the lines go.
    destination: Destination,
    /// Lines of the current batch, not yet written.
    pending: Vec<u8>,
    /// How many lines `pending` holds.
    pending_lines: u64,
    /// Lines that could not be written, since the start.
    lost: u64,
    /// Lost lines not yet reported in a warning, and the last error.
    unreported: (u64, Option<String>),
    /// When the last warning was logged.
    last_warning: Option<Instant>,
}

/// One line of the events file.
#[derive(Serialize)]
struct EventLine<'a> {
    /// RFC 3339 wall time, milliseconds.
    time: String,
    /// The server-wide event sequence (a gap means lost events).
    seq: u64,
    /// The device id (not for fleet events).
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    /// The event's name (EVENTS.md).
    event: &'static str,
    /// The device's version after this transition (+1 per transition).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    /// Why, for every kind but `online`.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// `suspect`, for an `online` back from suspect.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'static str>,
    /// `online` or `offline`: the device's state, for `flapping` and `stable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    /// For an expiry, the deadline that passed (RFC 3339, milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
    /// For an offline after being held: how long past its deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    held_ms: Option<u64>,
    /// The device's last known address.
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<SocketAddr>,
    /// Boot epoch of the frame the transition rests on.
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<u32>,
    /// Sequence number of that frame (the device's, not the event `seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_seq: Option<u32>,
    /// For `degraded` and `recovered`: devices online, late, held, released.
    #[serde(skip_serializing_if = "Option::is_none")]
    online: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    late: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    released: Option<u64>,
}

impl EventLine<'_> {
    /// The line of `transition`.
    fn of(transition: &Transition) -> EventLine<'_> {
        let (event, wall) = (&transition.event, transition.wall);
        let reason = match event.kind {
            EventKind::Online | EventKind::Back => None,
            EventKind::Offline(reason) => Some(reason.name()),
            EventKind::Suspect => Some("late"),
            EventKind::Flapping => Some("state_changes"),
            EventKind::Stable => Some("quiet"),
            EventKind::Forgotten(reason) => Some(reason.name()),
            EventKind::Degraded | EventKind::Recovered => event.fleet.map(|fleet| fleet.cause.name()),
        };
        let device_level = !event.kind.is_server();
        let fleet = event.fleet;
        let deadline = event.deadline.map(|deadline| {
            let passed = wall - event.at.saturating_duration_since(deadline);
            humantime::format_rfc3339_millis(passed).to_string()
        });
        EventLine {
            time: humantime::format_rfc3339_millis(wall).to_string(),
            seq: transition.seq,
            device: device_level.then_some(&*event.device),
            event: event.kind.name(),
            version: device_level.then_some(event.version),
            reason,
            from: (event.kind == EventKind::Back).then_some("suspect"),
            state: event.online.map(|online| if online { "online" } else { "offline" }),
            deadline,
            held_ms: event.held_ms,
            address: device_level.then(|| SocketAddr::from(wire::Addr::from(event.addr))),
            boot: device_level.then_some(event.boot),
            heartbeat_seq: device_level.then_some(event.heartbeat_seq),
            online: fleet.map(|f| f.online),
            late: fleet.map(|f| f.late),
            held: fleet.map(|f| f.held),
            released: fleet.filter(|_| event.kind == EventKind::Recovered).map(|f| f.released),
        }
    }
}

/// The JSON of one transition, as the events file writes it (without the
/// newline): every sink writes the same object (EVENTS.md).
pub fn event_json(transition: &Transition) -> Vec<u8> {
    serde_json::to_vec(&EventLine::of(transition)).unwrap_or_default()
}

impl JsonLines {
    fn with(destination: Destination) -> Self {
        JsonLines {
            destination,
            pending: Vec::new(),
            pending_lines: 0,
            lost: 0,
            unreported: (0, None),
            last_warning: None,
        }
    }

    /// Lines go to `out` (stdout, a pipe).
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        JsonLines::with(Destination::Writer(out))
    }

    /// Events are appended to the file at `path`, created if needed. Fails
    /// only if the file cannot be opened now; later failures are counted.
    pub fn to_file(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let file = open_append(&path)?;
        Ok(JsonLines::with(Destination::File { path, file: Some(file), last_open: None, check_tail: true }))
    }

    /// Adds one transition to the batch.
    fn record(&mut self, transition: &Transition) {
        let line = EventLine::of(transition);
        // Serializing plain strings and numbers into a Vec cannot fail.
        if serde_json::to_writer(&mut self.pending, &line).is_ok() {
            self.pending.push(b'\n');
            self.pending_lines += 1;
        }
    }

    /// Writes the batch in one write, and logs a warning about lost lines
    /// when one is due. Never fails: what cannot be written is counted.
    fn flush(&mut self) {
        let now = Instant::now();
        if !self.pending.is_empty() {
            if let Err(e) = self.write_pending(now) {
                self.lost += self.pending_lines;
                self.unreported.0 += self.pending_lines;
                self.unreported.1 = Some(e.to_string());
            }
            self.pending.clear();
            self.pending_lines = 0;
        }
        self.log_due(now);
    }

    fn write_pending(&mut self, now: Instant) -> io::Result<()> {
        match &mut self.destination {
            Destination::Writer(out) => out.write_all(&self.pending).and_then(|()| out.flush()),
            Destination::File { path, file, last_open, check_tail } => {
                if file.is_none() {
                    if last_open.is_some_and(|at| now.saturating_duration_since(at) < REOPEN_EVERY) {
                        return Err(io::Error::other("waiting to reopen the file after a failure"));
                    }
                    *last_open = Some(now);
                    *file = Some(open_append(path)?);
                    *check_tail = true;
                }
                let Some(open) = file.as_mut() else { return Ok(()) };
                let result = (|| {
                    if *check_tail && ends_torn(open)? {
                        open.write_all(b"\n")?;
                    }
                    *check_tail = false;
                    open.write_all(&self.pending)
                })();
                if result.is_err() {
                    // Reopen and check the tail before the next write.
                    *file = None;
                    *check_tail = true;
                }
                result
            }
        }
    }

    /// Logs a warning about lost lines, at most once per [`WARN_EVERY`].
    fn log_due(&mut self, now: Instant) {
        let due = self.last_warning.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if self.unreported.0 > 0 && due {
            let (lines, error) = std::mem::take(&mut self.unreported);
            self.last_warning = Some(now);
            tracing::warn!(
                lost = lines,
                lost_total = self.lost,
                error = error.unwrap_or_default(),
                "events not written (the server goes on; `presence status` counts them)"
            );
        }
    }
}

impl Sink for JsonLines {
    fn name(&self) -> &'static str {
        "events_file"
    }

    fn publish(&mut self, batch: &[Transition]) {
        for transition in batch {
            self.record(transition);
        }
        self.flush();
    }

    fn lost(&self) -> u64 {
        self.lost
    }
}

/// Opens `path` for appending (and reading, to check its last byte).
fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().read(true).append(true).create(true).open(path)
}

/// Whether a file is non-empty and does not end with a newline. A file
/// that cannot be read or sought (a device such as /dev/full) has no tail to repair.
fn ends_torn(file: &File) -> io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    match file.read_at(&mut last, len - 1) {
        Ok(1) => Ok(last[0] != b'\n'),
        Ok(_) | Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::OfflineReason;

    fn event(device: &str, kind: EventKind) -> Transition {
        Transition::for_test(device, kind)
    }

    fn lines(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_torn_tail_is_ended_before_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // As SIGKILL in the middle of a write would leave it.
        std::fs::write(
            &path,
            "{\"time\":\"2026-01-01T00:00:00.000Z\",\"device\":\"a\",\"event\":\"online\"}\n{\"time\":\"20",
        )
        .unwrap();
        let mut log = JsonLines::to_file(&path).unwrap();
        log.publish(&[event("b", EventKind::Online)]);
        let lines = lines(&path);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&lines[1]).is_err(), "the torn line stands alone");
        let next: serde_json::Value = serde_json::from_str(&lines[2]).expect("the new line is whole");
        assert_eq!(next["device"], "b");
        assert_eq!(log.lost(), 0);
    }

    #[test]
    fn a_full_disk_loses_lines_and_counts_them_without_failing() {
        let mut log = JsonLines::to_file("/dev/full").unwrap();
        for round in 1..=3 {
            log.publish(&[event("a", EventKind::Online)]);
            log.publish(&[event("a", EventKind::Offline(OfflineReason::Expired))]);
            assert_eq!(log.lost(), 2 * round);
        }
    }

    #[test]
    fn a_reader_that_went_away_loses_lines_and_counts_them() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut log = JsonLines::to_writer(Box::new(Gone));
        log.publish(&[event("a", EventKind::Online)]);
        log.publish(&[event("b", EventKind::Online)]);
        assert_eq!(log.lost(), 2);
    }

    #[test]
    fn a_file_that_failed_is_reopened_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut log = JsonLines::to_file(&path).unwrap();
        // The file is deleted (rotated away) and its directory made unwritable
        // would need root to test; instead: a failure drops the handle, and
        // the next batch after REOPEN_EVERY reopens the path.
        if let Destination::File { file, last_open, .. } = &mut log.destination {
            *file = None;
            *last_open = Some(Instant::now() - REOPEN_EVERY);
        }
        std::fs::remove_file(&path).unwrap();
        log.publish(&[event("a", EventKind::Online)]);
        assert_eq!(lines(&path).len(), 1, "reopened (and created again) at its path");
        assert_eq!(log.lost(), 0);
    }
}
