//! Shared harness for the end-to-end tests: starts the real `presence`
//! binary on 127.0.0.1:0 and waits for things by polling against a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_presence");

/// Generous bound for anything the server should do "at once".
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Calls `probe` until it returns `Some`, or panics after `limit`.
pub fn poll<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `presence serve`, killed on drop.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The events file (JSON lines).
    pub events: PathBuf,
    /// Keeps the events file's directory alive.
    _dir: tempfile::TempDir,
    /// Log lines from stderr, as they arrive (after the listening line).
    pub log: mpsc::Receiver<String>,
    /// The JSON log record that said where it listens, and with what settings.
    pub listening: serde_json::Value,
    /// The log lines before that one.
    pub startup: Vec<String>,
}

impl Server {
    /// Starts the server on 127.0.0.1:0 with `extra` flags after the
    /// harness's own (`--log-format json --events FILE`).
    pub fn start(extra: &[&str]) -> Server {
        Server::start_on("127.0.0.1:0", extra)
    }

    /// Starts the server bound to `bind`, with `extra` flags. Unless they
    /// set `--query-rate`, queries are not rate-limited in practice: tests
    /// poll the server, and rate limits have tests of their own.
    pub fn start_on(bind: &str, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        Server::launch(bind, events.to_str().unwrap(), dir, extra)
    }

    /// Starts the server on 127.0.0.1:0 with `--events EVENTS` (a path or
    /// `-`) instead of the harness's own file, which then stays empty.
    pub fn start_with_events(events: &str, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::launch("127.0.0.1:0", events, dir, extra);
        server.events = server._dir.path().join("unused.jsonl");
        server
    }

    /// Starts the server bound to `bind` with `--events FILE` for a file the
    /// caller owns, so that it outlives this server (a restart appends to it).
    pub fn start_at(bind: &str, events: &std::path::Path, extra: &[&str]) -> Server {
        Server::launch(bind, events.to_str().unwrap(), tempfile::tempdir().unwrap(), extra)
    }

    fn launch(bind: &str, events: &str, dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let events = PathBuf::from(events);
        let unlimited: &[&str] = if extra.contains(&"--query-rate") {
            &[]
        } else {
            &["--query-rate", "100000", "--query-burst", "100000"]
        };
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "serve", "--bind", bind, "--events"])
            .arg(&events)
            .args(unlimited)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            // `--events -` writes to a pipe whose reader is gone at once (see below).
            .stdout(if events.as_os_str() == "-" { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .spawn()
            .expect("start presence serve");
        drop(child.stdout.take());
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + PROMPTLY;
        let mut startup = Vec::new();
        let listening = loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = log.recv_timeout(wait).expect("server did not log 'listening' in time");
            let record: serde_json::Value = serde_json::from_str(&line).expect("json log line");
            if record["fields"]["message"] == "listening" {
                break record;
            }
            startup.push(line);
        };
        let addr = listening["fields"]["addr"].as_str().unwrap().parse().unwrap();
        Server { child, addr, events, _dir: dir, log, listening, startup }
    }

    /// The events written so far, parsed: the lines that end in a newline,
    /// as EVENTS.md tells readers (a line being written may be read half).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(|l| serde_json::from_str(l).expect("each events line is JSON")).collect()
    }

    /// Polls the events file until one matches `device`, `event` (and `reason`).
    pub fn wait_event(
        &self,
        device: &str,
        event: &str,
        reason: Option<&str>,
        limit: Duration,
    ) -> serde_json::Value {
        poll(&format!("{event} event of {device}"), limit, || {
            self.events().into_iter().find(|e| {
                e["device"] == device && e["event"] == event && reason.is_none_or(|r| e["reason"] == r)
            })
        })
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
        poll("server exit", PROMPTLY, || self.child.try_wait().unwrap())
    }
}

impl Server {
    /// Sends SIGKILL and waits for the process to exit: a crash.
    pub fn crash(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// Waits for a log line (after the listening line) whose message is `message`.
    pub fn wait_log(&self, message: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line =
                self.log.recv_timeout(wait).unwrap_or_else(|_| panic!("no '{message}' in the log in time"));
            let record: serde_json::Value = serde_json::from_str(&line).expect("json log line");
            if record["fields"]["message"] == message {
                return record;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI with `args` and returns its output, giving up after a while.
pub fn cli(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run presence");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    rx.recv_timeout(Duration::from_secs(60)).expect("the CLI did not finish within 60 s").unwrap()
}

/// stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `presence keygen` into `dir` and returns the file and the master key.
pub fn keygen(dir: &std::path::Path) -> (String, presence::auth::Key) {
    let path = dir.join("master.key");
    let out = cli(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let presence::keyfile::KeyFile::Master(master) = presence::keyfile::KeyFile::read(&path).unwrap() else {
        panic!("not a master key file")
    };
    (path.to_str().unwrap().to_string(), master)
}

/// A message encoded as one datagram.
pub fn frame(message: &presence::wire::Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; presence::wire::MAX_DATAGRAM];
    let len = presence::wire::encode(message, &mut buf).unwrap();
    buf[..len].to_vec()
}
