//! What the benchmarks share.

#![allow(dead_code)] // each benchmark uses some of it

use std::path::PathBuf;
use std::time::{Duration, Instant};

use presence::tracker::{AuthMode, Config, Keys};
use presence::wire::{self, Heartbeat, Message};

/// The master key of the benchmarks' signed devices.
pub const MASTER: presence::auth::Key = [0x5a; 32];

/// A heartbeat of `device` (boot 1, interval 10 s), signed with `key` if given.
pub fn frame(device: &str, seq: u32, payload: &[u8], key: Option<&presence::auth::Key>) -> Vec<u8> {
    let hb = Message::Heartbeat(Heartbeat {
        device,
        boot: 1,
        seq,
        interval_ms: 10_000,
        flags: 0,
        payload,
        tag: None,
    });
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let len = match key {
        Some(key) => presence::auth::encode_signed(&hb, key, &mut buf),
        None => wire::encode(&hb, &mut buf),
    }
    .expect("valid frame");
    buf[..len].to_vec()
}

/// The engine's rules for the benchmarks: `auth`, the benchmarks' keys, room
/// for 2 M devices and no practical query limit.
pub fn config(auth: AuthMode) -> Config {
    Config {
        auth,
        keys: Some(Keys::from_master(&MASTER)),
        max_devices: 2_000_000,
        query_rate: 1_000_000,
        query_burst: 1_000_000,
        ..Config::default()
    }
}

/// The kernel's drop count for the UDP socket bound to `port` on 127.0.0.1
/// (the last column of /proc/net/udp).
pub fn kernel_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some(local.as_str()))
        .filter_map(|line| line.split_whitespace().last().and_then(|d| d.parse::<u64>().ok()))
        .sum()
}

/// A program on PATH, in the tests' venv, or in /usr/sbin.
pub fn find(name: &str) -> std::io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("target/test-servers/venv/bin"));
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| std::io::Error::other(format!("{name} not found: tests/run installs it")))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time of every thread of process `pid` so far, in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    threads_cpu_ns(pid).values().sum()
}

/// CPU time so far of the threads of process `pid`, by thread name.
pub fn threads_cpu_ns(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by_name };
    for task in tasks.filter_map(Result::ok) {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let ns = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .unwrap_or(0);
        *by_name.entry(name).or_insert(0) += ns;
    }
    by_name
}
