//! The CI guard against a heavier hot path: instruction counts (Callgrind,
//! through gungraun) of the engine, compared against committed limits.
//!
//! Run: `cargo bench --bench instructions` (needs valgrind and the
//! `gungraun-runner` binary of the same version as the `gungraun` crate;
//! `.ci/instructions` installs it and runs this). Instruction counts do not
//! depend on the machine's load, so the limits below hold on any x86-64
//! Linux machine with the same compiler; wall-clock figures stay in
//! `examples/bench.rs`.
//!
//! Each benchmark runs [`BEATS`] heartbeats (or [`PAGES`] list pages)
//! through [`Tracker::handle_batch`], the server's path, in batches of 64
//! as `recvmmsg` hands them over; the setup (a table of 10 k or 1 M devices
//! online) is not counted. The limits are per heartbeat (per page), the
//! count measured when they were set plus a margin of about 10 %: a change
//! that makes the hot path heavier by more than that fails CI. When a
//! change makes it lighter, lower the limit in the same commit.

#[path = "../examples/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::MASTER;
use gungraun::{
    Callgrind, EventKind, LibraryBenchmarkConfig, library_benchmark, library_benchmark_group, main,
};
use presence::auth;
use presence::client::encode_query;
use presence::time::Instant;
use presence::tracker::{AuthMode, Config, Tracker};
use presence::wire::{self, ListFilter, QueryKind};

/// Heartbeats per heartbeat benchmark.
const BEATS: u64 = 2048;
/// Pages per list benchmark.
const PAGES: u64 = 64;

/// Limits: instructions per heartbeat or page, each the count measured
/// when it was set (in the comment; rustc 1.95, x86-64) plus about 10 %.
mod limit {
    /// Heartbeat, 10 k devices online, unsigned (882).
    pub const BEAT_10K: u64 = 950;
    /// Heartbeat, 1 M devices online, unsigned (897).
    pub const BEAT_1M: u64 = 960;
    /// Heartbeat, 10 k devices online, signed (`--auth required`): the
    /// tag's cost does not depend on the table's size (2 128).
    pub const BEAT_10K_SIGNED: u64 = 2_320;
    /// First `List` page of a 1200-byte query, 10 k devices online (a full
    /// page; 60 878).
    pub const PAGE_10K: u64 = 67_000;
    /// The same page with 100 k devices held of which 10 are online: it
    /// must cost what it returns, not what the table holds (27 110).
    pub const PAGE_100K_SPARSE: u64 = 30_000;
}

fn t0() -> Instant {
    Instant::from_micros(1 << 40)
}

/// 16-byte ids, as the end-to-end benchmark uses.
fn device_id(i: usize) -> String {
    format!("dev-{i:012}")
}

/// Each device sends from one of 64 source ports, as in the end-to-end benchmark.
fn source(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000 + (i % 64) as u16))
}

/// A heartbeat of `device`, signed with its key under [`MASTER`] or not.
fn frame(device: &str, seq: u32, signed: bool) -> Vec<u8> {
    common::frame(device, seq, &[], signed.then(|| auth::device_key(&MASTER, device)).as_ref())
}

/// The benchmarks' rules, without self-preservation (the sparse page's
/// setup expires all but 10 devices at once).
fn config(auth: AuthMode) -> Config {
    Config { preservation: None, ..common::config(auth) }
}

/// A tracker with `n` devices online, fed through `handle` (not counted,
/// but it runs under Valgrind too, so it does as little else as it can:
/// unsigned frames are made by writing each id's digits into one frame).
fn populated(config: Config, n: usize) -> Tracker {
    let signed = config.auth != AuthMode::Off;
    let mut tracker = Tracker::new(config, t0(), SystemTime::UNIX_EPOCH).expect("valid config");
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let mut unsigned = frame(&device_id(0), 1, false);
    // The id's 12 digits: after the version, kind, length and "dev-".
    let digits = 3 + 4..3 + 16;
    assert_eq!(&unsigned[digits.clone()], b"000000000000");
    for i in 0..n {
        let datagram = if signed {
            frame(&device_id(i), 1, true)
        } else {
            let mut rest = i;
            for digit in unsigned[digits.clone()].iter_mut().rev() {
                *digit = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            unsigned.clone()
        };
        tracker.handle(t0(), source(i), &datagram, &mut reply);
        while tracker.poll_event().is_some() {}
    }
    tracker
}

/// What a heartbeat benchmark runs: the tracker, and its datagrams with their sources.
struct Beats {
    tracker: Tracker,
    datagrams: Vec<(Vec<u8>, SocketAddr)>,
}

/// `n` devices online, and [`BEATS`] heartbeats (seq 2) from devices in a
/// fixed pseudo-random order.
fn beats(n: usize, auth: AuthMode) -> Beats {
    let tracker = populated(config(auth), n);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let datagrams = (0..BEATS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % n as u64) as usize;
            (frame(&device_id(i), 2, auth != AuthMode::Off), source(i))
        })
        .collect();
    Beats { tracker, datagrams }
}

fn beats_10k() -> Beats {
    beats(10_000, AuthMode::Off)
}

fn beats_1m() -> Beats {
    beats(1_000_000, AuthMode::Off)
}

fn beats_10k_signed() -> Beats {
    beats(10_000, AuthMode::Required)
}

fn limit(per: u64, count: u64) -> LibraryBenchmarkConfig {
    let mut config = LibraryBenchmarkConfig::default();
    config.tool(Callgrind::default().hard_limits([(EventKind::Ir, per * count)]));
    config
}

#[library_benchmark]
#[bench::devices_10k(setup = beats_10k, config = limit(limit::BEAT_10K, BEATS))]
#[bench::devices_1m(setup = beats_1m, config = limit(limit::BEAT_1M, BEATS))]
#[bench::devices_10k_signed(setup = beats_10k_signed, config = limit(limit::BEAT_10K_SIGNED, BEATS))]
fn heartbeat(mut beats: Beats) -> Beats {
    let now = t0() + Duration::from_secs(1);
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let mut handled = 0;
    let datagrams: Vec<(&[u8], SocketAddr)> =
        beats.datagrams.iter().map(|(d, from)| (&d[..], *from)).collect();
    beats.tracker.handle_batch(now, &datagrams, &mut reply, |_, _, _| handled += 1);
    assert_eq!(black_box(handled), BEATS);
    beats
}

/// What a list benchmark runs: the tracker and the query.
struct Pages {
    tracker: Tracker,
    query: Vec<u8>,
}

/// `held` devices held, of which the last `online` are online.
fn pages(held: usize, online: usize) -> Pages {
    let mut tracker = populated(config(AuthMode::Off), held - online);
    let later = t0() + Duration::from_secs(7200);
    tracker.handle_timeout(later);
    while tracker.poll_event().is_some() {}
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    for i in held - online..held {
        tracker.handle(later, source(i), &frame(&device_id(i), 1, false), &mut reply);
    }
    while tracker.poll_event().is_some() {}
    assert_eq!(tracker.table().online_count(), online);
    let mut query = [0u8; wire::MAX_DATAGRAM];
    let kind = QueryKind::List { after: None, limit: 0, filter: ListFilter::ONLINE };
    let len = encode_query(1, kind, None, &mut query).expect("valid query");
    Pages { tracker, query: query[..len].to_vec() }
}

fn pages_10k() -> Pages {
    pages(10_000, 10_000)
}

fn pages_100k_sparse() -> Pages {
    pages(100_000, 10)
}

#[library_benchmark]
#[bench::online_10k(setup = pages_10k, config = limit(limit::PAGE_10K, PAGES))]
#[bench::sparse_100k(setup = pages_100k_sparse, config = limit(limit::PAGE_100K_SPARSE, PAGES))]
fn list_page(mut pages: Pages) -> Pages {
    let now = t0() + Duration::from_secs(7200);
    let from = source(0);
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    for _ in 0..PAGES {
        black_box(pages.tracker.handle(now, from, black_box(&pages.query), &mut reply));
    }
    pages
}

library_benchmark_group!(name = engine, benchmarks = [heartbeat, list_page]);
main!(library_benchmark_groups = engine);
