//! The end-to-end benchmark: real UDP on 127.0.0.1, the real server loop,
//! and a bare receive loop measured the same way in the same run.
//!
//! ```text
//! cargo run --release --example bench            # the full run (a few minutes)
//! cargo run --release --example bench -- --quick # a smoke run of a few seconds
//! cargo run --release --example bench -- --drain-only # only the drain figures
//! cargo run --release --example bench -- --cpu-only   # only the fixed-rate CPU figures
//! cargo run --release --example bench -- --list-only  # only the list page figures
//! cargo run --release --example bench -- --state-only # only the --state figures
//! ```
//!
//! Figures:
//! - **drain**: the socket's receive buffer is filled with heartbeats while
//!   nothing reads it, then the reader starts and the time until it has
//!   handled them all is taken (a live sender cannot saturate the receiver on
//!   a 2-core machine). Bare loops (`recvmmsg` 64 at a time, the baseline,
//!   and `recv_from`; and two `recvmmsg` loops on an SO_REUSEPORT pair) vs
//!   the server with 1 and 2 threads, with 10 k and 1 M devices in random
//!   order, and with `--auth required`. The datagrams come from 64 source
//!   ports, each device always from the same one. Each is the median of 3 runs.
//! - **cpu**: CPU time of the receiving thread per heartbeat while a sender
//!   offers a fixed rate, bare loop vs server (the median of 3 alternating
//!   runs each), and the kernel's drop count for the socket (from
//!   /proc/net/udp) with the server's default buffer.
//! - **memory**: resident memory per device at 1 M online devices with
//!   16-byte ids, without and with a 16-byte payload.
//! - **expiry**: lateness of offline events (event time − deadline) while
//!   heartbeats arrive at a fixed rate.
//! - **query**: round trip of status queries while heartbeats arrive.
//! - **list page**: engine CPU per first `List` page (a 1200-byte query, as
//!   the CLI sends) with 1 M devices held of which 10 are online, against
//!   the same page with only those 10 held, measured in-process in the same
//!   run (a page must cost what it returns, not what the table holds).
//! - **state**: with 1 M devices (16-byte ids, no payload): the state
//!   file's size per device, the time to write it whole (as at stop) and to
//!   restore it, the longest time one snapshot chunk holds a loop (the
//!   pause), and the query round trip and kernel drops at the query
//!   figure's rate with a snapshot every second, against the same run
//!   without `--state`.
//!
//! Everything sends only to 127.0.0.1 and stops by itself.

#[path = "common/mod.rs"]
mod common;
use common::{MASTER, config, frame, kernel_drops};

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use presence::auth;
use presence::client::encode_query;
use presence::server::{self, Stop};
use presence::shard;
use presence::sink::{Observer, Sink};
use presence::tracker::{AuthMode, Config, EventKind, Tracker};
use presence::wire::{self, Heartbeat, Message, QueryKind, Status, StatusBody};

/// The one mapping from the real clock to engine time for every tracker and
/// server loop of this process.
fn clock() -> presence::time::Clock {
    static CLOCK: std::sync::OnceLock<presence::time::Clock> = std::sync::OnceLock::new();
    *CLOCK.get_or_init(presence::time::Clock::start)
}

/// Sizes for a full or a quick run.
struct Plan {
    /// Datagrams queued per drain measurement.
    drain: usize,
    /// Device counts for the drain figures.
    devices: [usize; 2],
    /// Devices for the memory figure.
    memory_devices: usize,
    /// Devices, of them how many expire during the run, and seconds, for
    /// the expiry and query figures.
    live_devices: usize,
    live_expiring: usize,
    live_seconds: u64,
    /// Heartbeats per second offered during the expiry and the query figures.
    expiry_rate: u64,
    query_rate: u64,
    /// Offered rate, devices and seconds for the CPU figure.
    cpu_rate: u64,
    cpu_devices: usize,
    cpu_seconds: u64,
}

fn main() -> std::io::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if let Some(payload) = std::env::args().skip_while(|a| a != "--memory-child").nth(1) {
        // Child process for one memory figure: a clean heap.
        let devices: usize =
            std::env::args().skip_while(|a| a != "--devices").nth(1).unwrap().parse().unwrap();
        let auth = if std::env::args().any(|a| a == "--auth") { AuthMode::Required } else { AuthMode::Off };
        println!("{}", memory_per_device(devices, payload.parse().unwrap(), auth));
        return Ok(());
    }
    let plan = if quick {
        Plan {
            drain: 20_000,
            devices: [1_000, 10_000],
            memory_devices: 10_000,
            live_devices: 2_000,
            live_expiring: 500,
            live_seconds: 2,
            expiry_rate: 5_000,
            query_rate: 5_000,
            cpu_rate: 5_000,
            cpu_devices: 2_000,
            cpu_seconds: 1,
        }
    } else {
        Plan {
            drain: 300_000,
            devices: [10_000, 1_000_000],
            memory_devices: 1_000_000,
            live_devices: 1_000_000,
            live_expiring: 50_000,
            live_seconds: 10,
            expiry_rate: 100_000,
            query_rate: 200_000,
            cpu_rate: 200_000,
            cpu_devices: 1_000_000,
            cpu_seconds: 5,
        }
    };
    println!("presence end-to-end benchmark{} on {} cores", if quick { " (quick)" } else { "" }, cores());
    let mut rows: Vec<(String, String, String)> = Vec::new();

    if std::env::args().any(|a| a == "--state-only") {
        state_figures(&plan, &mut rows)?;
        print_rows(rows);
        return Ok(());
    }
    list_page_figures(&plan, &mut rows);
    if std::env::args().any(|a| a == "--list-only") {
        print_rows(rows);
        return Ok(());
    }
    let cpu_only = std::env::args().any(|a| a == "--cpu-only");
    if !cpu_only {
        drain_figures(&plan, &mut rows)?;
    }
    if std::env::args().any(|a| a == "--drain-only") {
        print_rows(rows);
        return Ok(());
    }
    // Alternating runs, the median of each: this figure is the noisiest.
    let (mut bare_runs, mut server_runs) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        bare_runs.push(fixed_rate(None, &plan)?);
        server_runs.push(fixed_rate(Some(plan.cpu_devices), &plan)?);
    }
    let (bare_cpu, server_cpu) = (median_run(bare_runs), median_run(server_runs));
    rows.push((
        format!("cpu per heartbeat, bare loop, {} /s offered", human(plan.cpu_rate as usize)),
        format!("{:.0} ns", bare_cpu.cpu_per_heartbeat_ns),
        format!(
            "1.00 (baseline); {} received, {} kernel drops (most in a run)",
            bare_cpu.received, bare_cpu.drops
        ),
    ));
    rows.push((
        format!(
            "cpu per heartbeat, server, {} devices, {} /s offered",
            human(plan.cpu_devices),
            human(plan.cpu_rate as usize)
        ),
        format!("{:.0} ns", server_cpu.cpu_per_heartbeat_ns),
        format!(
            "{:.2} x bare; {} received, {} kernel drops (most in a run)",
            server_cpu.cpu_per_heartbeat_ns / bare_cpu.cpu_per_heartbeat_ns,
            server_cpu.received,
            server_cpu.drops
        ),
    ));
    if cpu_only {
        print_rows(rows);
        return Ok(());
    }
    for (payload, auth) in [(0usize, false), (16, false), (0, true)] {
        let exe = std::env::current_exe()?;
        let mut child = std::process::Command::new(exe);
        child.args(["--memory-child", &payload.to_string(), "--devices", &plan.memory_devices.to_string()]);
        if auth {
            child.arg("--auth");
        }
        let out = child.output()?;
        let bytes: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
        rows.push((
            format!(
                "memory, {} online devices, 16-byte ids, {payload}-byte payload{}",
                human(plan.memory_devices),
                if auth { ", auth required" } else { "" }
            ),
            format!("{bytes:.0} B/device"),
            String::new(),
        ));
    }
    for (rate, figure) in [(plan.expiry_rate, "expiry"), (plan.query_rate, "query")] {
        let live = live(&plan, rate, None)?;
        let load = format!("{} devices, {} heartbeats/s", human(plan.live_devices), human(rate as usize));
        if figure == "expiry" {
            rows.push((
                format!("expiry lateness, {load} ({} expiries)", live.expiries),
                format!("p50 {} p99 {}", micros(live.late_p50), micros(live.late_p99)),
                format!("max {}", micros(live.late_max)),
            ));
        } else {
            rows.push((
                format!("query round trip, {load} ({} queries)", live.queries),
                format!("p50 {} p99 {}", micros(live.rtt_p50), micros(live.rtt_p99)),
                format!("max {}", micros(live.rtt_max)),
            ));
        }
    }
    state_figures(&plan, &mut rows)?;
    print_rows(rows);
    Ok(())
}

/// The `--state` figures (see the module docs).
fn state_figures(plan: &Plan, rows: &mut Vec<(String, String, String)>) -> std::io::Result<()> {
    let n = plan.memory_devices;
    let tracker = populated(n, AuthMode::Off, &[]);
    // The pause: the longest a loop spends on one chunk, over a whole snapshot.
    let mut chunk = presence::state::Chunk::default();
    let mut pauses = Vec::new();
    let mut at = Some(0);
    while let Some(start) = at {
        chunk.clear();
        let began = Instant::now();
        at = tracker.snapshot_chunk(start, server::state::CHUNK, &mut chunk);
        pauses.push(began.elapsed());
    }
    pauses.sort();
    rows.push((
        format!("state snapshot pause, {} devices, {} per chunk", human(n), server::state::CHUNK),
        format!("p50 {} p99 {}", micros(percentile(&pauses, 0.5)), micros(percentile(&pauses, 0.99))),
        format!("max {} ({} chunks)", micros(*pauses.last().unwrap_or(&Duration::ZERO)), pauses.len()),
    ));
    let dir = std::env::temp_dir().join(format!("presence-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("state");
    let began = Instant::now();
    let (bytes, records) = server::state::write_now(&path, std::slice::from_ref(&tracker), 0)?;
    let written = began.elapsed();
    drop(tracker);
    rows.push((
        format!("state file, {} devices, 16-byte ids, no payload", human(records as usize)),
        format!("{:.1} B/device", bytes as f64 / records as f64),
        format!("written whole (as at stop) in {}", micros(written)),
    ));
    let began = Instant::now();
    let recovered = server::state::restore(&path, config(AuthMode::Off), 1, clock().now(), SystemTime::now())
        .map_err(std::io::Error::other)?;
    let restored = began.elapsed();
    rows.push((
        format!("state restore, {} devices", human(recovered.restored.devices as usize)),
        micros(restored),
        "read, checked, decoded and filed".into(),
    ));
    drop(recovered);
    let _ = std::fs::remove_dir_all(&dir);
    // Queries and kernel drops under load, without and with snapshots every second.
    let load =
        format!("{} devices, {} heartbeats/s", human(plan.live_devices), human(plan.query_rate as usize));
    let without = live(plan, plan.query_rate, None)?;
    let every = Duration::from_secs(1);
    let with = live(plan, plan.query_rate, Some(every))?;
    for (label, run) in [("without --state", &without), ("--state-every 1s", &with)] {
        rows.push((
            format!("query round trip, {load}, {label}"),
            format!("p50 {} p99 {}", micros(run.rtt_p50), micros(run.rtt_p99)),
            format!("max {}; {} kernel drops; {} snapshots", micros(run.rtt_max), run.drops, run.snapshots),
        ));
    }
    Ok(())
}

/// The drain figures: bare loops and the server, 1 and 2 threads.
fn drain_figures(plan: &Plan, rows: &mut Vec<(String, String, String)>) -> std::io::Result<()> {
    let drain_bare = |mmsg: bool, threads: usize| -> std::io::Result<f64> {
        Ok(median(
            (0..REPEATS).map(|_| drain_bare_once(plan.drain, mmsg, threads)).collect::<Result<_, _>>()?,
        ))
    };
    let bare = drain_bare(true, 1)?;
    let bare_single = drain_bare(false, 1)?;
    let bare_two = drain_bare(true, 2)?;
    rows.push(("drain, bare recvmmsg(64) loop".into(), rate(bare), "1.00 (baseline)".into()));
    rows.push((
        "drain, bare recv_from loop".into(),
        rate(bare_single),
        format!("{:.2} x bare", bare_single / bare),
    ));
    rows.push((
        "drain, bare recvmmsg(64), 2 threads (SO_REUSEPORT)".into(),
        rate(bare_two),
        format!("{:.2} x bare", bare_two / bare),
    ));
    for (n, auth) in [
        (plan.devices[0], AuthMode::Off),
        (plan.devices[1], AuthMode::Off),
        (plan.devices[1], AuthMode::Required),
    ] {
        let (one, _) = drain_server(plan.drain, n, auth, 1)?;
        let (two, handed) = drain_server(plan.drain, n, auth, 2)?;
        let label =
            format!("{} devices, auth {}", human(n), if auth == AuthMode::Off { "off" } else { "required" });
        rows.push((format!("drain, server, {label}"), rate(one), format!("{:.2} x bare", one / bare)));
        rows.push((
            format!("drain, server --threads 2, {label}"),
            rate(two),
            format!(
                "{:.2} x bare; {:.2} x 1 thread; {:.1}% handed over",
                two / bare,
                two / one,
                handed * 100.0
            ),
        ));
    }
    Ok(())
}

/// Engine CPU per first list page with `held` devices held and 10 online,
/// against the same with only the 10 held.
fn list_page_figures(plan: &Plan, rows: &mut Vec<(String, String, String)>) {
    let held = plan.devices[1];
    let small = list_page_ns(10);
    let large = list_page_ns(held);
    rows.push((
        "list page (1200 B query), 10 devices held, 10 online".into(),
        format!("{small:.0} ns"),
        "1.00 (baseline)".into(),
    ));
    rows.push((
        format!("list page (1200 B query), {} devices held, 10 online", human(held)),
        format!("{large:.0} ns"),
        format!("{:.2} x the page with 10 held", large / small),
    ));
    // Listing over loopback, page after page as `presence status --list` does,
    // against a bare loop that echoes 1200-byte datagrams one at a time.
    let listed = plan.devices[0] * 10;
    let (pages, rate) = listing_rate(listed).expect("listing");
    let echo = echo_rate(pages).expect("echo");
    rows.push((
        format!("round trips/s, bare 1200-byte UDP echo, one at a time ({pages} round trips)"),
        format!("{echo:.0} /s"),
        "1.00 (baseline)".into(),
    ));
    rows.push((
        format!("listing {} online devices over loopback (Client::list_all)", human(listed)),
        format!("{} devices/s", rate.round()),
        format!(
            "{pages} pages; {:.2} x the echo's round trips (target: >= 50 000 devices/s)",
            pages as f64 * rate / listed as f64 / echo
        ),
    ));
}

/// Lists `n` online devices from a real server loop on 127.0.0.1 with the
/// client, as the CLI does; returns the pages and the devices per second.
fn listing_rate(n: usize) -> std::io::Result<(usize, f64)> {
    let tracker = populated(n, AuthMode::Off, &[]);
    let bound = server::bind("127.0.0.1:0".parse().unwrap(), None)?;
    let addr = bound.local_addr;
    let stop = Stop::new();
    let loop_stop = stop.clone();
    let socket = bound.socket;
    let server = std::thread::spawn(move || {
        server::run(&socket, tracker, clock(), &loop_stop, Vec::new()).map(|_| ())
    });
    let mut client = presence::client::Client::new(addr, Duration::from_secs(5))?;
    let started = Instant::now();
    let mut pages = 0;
    let devices =
        client.list(presence::wire::ListFilter::ONLINE, |_| pages += 1).map_err(std::io::Error::other)?;
    let seconds = started.elapsed().as_secs_f64();
    stop.stop();
    server.join().expect("server thread")?;
    assert_eq!(devices.len(), n);
    Ok((pages, n as f64 / seconds))
}

/// Round trips per second of 1200-byte datagrams echoed by a bare loop.
fn echo_rate(round_trips: usize) -> std::io::Result<f64> {
    let echo = UdpSocket::bind("127.0.0.1:0")?;
    let addr = echo.local_addr()?;
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        for _ in 0..round_trips {
            let (n, from) = echo.recv_from(&mut buf)?;
            echo.send_to(&buf[..n], from)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.connect(addr)?;
    let (request, mut reply) = ([7u8; 1200], [0u8; 1500]);
    let started = Instant::now();
    for _ in 0..round_trips {
        client.send(&request)?;
        client.recv(&mut reply)?;
    }
    let rate = round_trips as f64 / started.elapsed().as_secs_f64();
    server.join().expect("echo thread")?;
    Ok(rate)
}

/// Median engine time per first `List` page (10 entries), over 20 rounds of
/// 100 pages, with `held` devices held of which the last 10 are online.
fn list_page_ns(held: usize) -> f64 {
    // Everyone populated so far expires (all at once, which self-preservation
    // would hold back: off here); then 10 devices come online.
    let no_hold = Config { preservation: None, ..config(AuthMode::Off) };
    let mut tracker = populated_with(no_hold, held.saturating_sub(10), &[], 1).remove(0);
    let later = clock().now() + Duration::from_secs(7200);
    tracker.handle_timeout(later);
    while tracker.poll_event().is_some() {}
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    for i in 0..10 {
        tracker.handle(later, from, &frame(&format!("online-{i}"), 1, &[], None), &mut reply);
    }
    while tracker.poll_event().is_some() {}
    assert_eq!(tracker.table().online_count(), 10);
    let mut query = [0u8; wire::MAX_DATAGRAM];
    let len = encode_query(
        1,
        QueryKind::List { after: None, limit: 0, filter: presence::wire::ListFilter::ONLINE },
        None,
        &mut query,
    )
    .expect("valid query");
    // Warm up (caches, the CPU's clock), then time.
    for _ in 0..1000 {
        std::hint::black_box(tracker.handle(later, from, &query[..len], &mut reply));
    }
    let rounds: Vec<f64> = (0..20)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..100 {
                let handled = tracker.handle(later, from, &query[..len], &mut reply);
                std::hint::black_box(handled);
            }
            started.elapsed().as_nanos() as f64 / 100.0
        })
        .collect();
    median(rounds)
}

fn print_rows(rows: Vec<(String, String, String)>) {
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!();
    println!("{:<width$}  {:>24}  ratio / note", "figure", "value");
    for (name, value, note) in rows {
        println!("{name:<width$}  {value:>24}  {note}");
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{} M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{} k", n / 1_000),
        n => n.to_string(),
    }
}

fn rate(per_second: f64) -> String {
    format!("{:.0} k/s ({:.0} ns each)", per_second / 1e3, 1e9 / per_second)
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// `count` sockets on one port of 127.0.0.1 (an SO_REUSEPORT group if more
/// than one), each with a receive buffer that holds a whole drain run.
fn receivers(count: usize, steer: bool) -> std::io::Result<Vec<UdpSocket>> {
    let group = server::bind_group("127.0.0.1:0".parse().unwrap(), None, count)?;
    if steer {
        server::steer_by_id(&group)?;
    }
    let mut sockets = Vec::new();
    for bound in group {
        // Needs CAP_NET_ADMIN to pass net.core.rmem_max; falls back to the plain request.
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&bound.socket, 1 << 30).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(&bound.socket, 1 << 30)?;
        }
        sockets.push(bound.socket);
    }
    Ok(sockets)
}

/// 16-byte ids: "dev-" and 12 digits.
fn device_id(i: usize) -> String {
    format!("dev-{i:012}")
}

/// A fixed pseudo-random sequence of device indexes in 0..n.
fn random_devices(n: usize, count: usize) -> Vec<usize> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        })
        .collect()
}

/// Source ports the drain datagrams come from. Each device sends from one
/// of them (as a real device keeps its address), so an SO_REUSEPORT group
/// gets a share of the devices on each socket, as it would in the field.
const SOURCES: usize = 64;

/// Queues `frames` (frame `i` from device `devices[i]`) on `to`; nobody reads it yet.
fn fill(to: SocketAddr, frames: &[Vec<u8>], devices: &[usize]) -> std::io::Result<Vec<UdpSocket>> {
    let senders: Vec<UdpSocket> =
        (0..SOURCES).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    for (frame, device) in frames.iter().zip(devices) {
        senders[device % SOURCES].send_to(frame, to)?;
    }
    Ok(senders)
}

/// A bare loop that only counts datagrams, with `recvmmsg` (64 per call) or
/// one `recv_from` per datagram; with `threads` > 1, one recvmmsg loop per
/// socket of an SO_REUSEPORT group, on its own thread.
fn drain_bare_once(count: usize, mmsg: bool, threads: usize) -> std::io::Result<f64> {
    let sockets = receivers(threads, false)?;
    let devices = random_devices(10_000, count);
    let frames: Vec<Vec<u8>> = devices.iter().map(|&i| frame(&device_id(i), 2, &[], None)).collect();
    let _senders = fill(sockets[0].local_addr()?, &frames, &devices)?;
    let started = Instant::now();
    let received: usize = std::thread::scope(|scope| {
        let loops: Vec<_> =
            sockets.iter().map(|socket| scope.spawn(move || drain_bare(socket, mmsg))).collect();
        loops.into_iter().map(|l| l.join().expect("drain thread")).sum::<std::io::Result<usize>>()
    })?;
    let elapsed = started.elapsed();
    if received < count {
        eprintln!("note: the kernel queued only {received} of {count} datagrams");
    }
    Ok(received as f64 / elapsed.as_secs_f64())
}

/// Reads `socket` until it is empty; returns how many datagrams.
fn drain_bare(socket: &UdpSocket, mmsg: bool) -> std::io::Result<usize> {
    socket.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    let mut buffers = Box::new([[0u8; 2048]; 64]);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(64, None);
    let mut received = 0usize;
    let mut bytes = 0usize;
    if mmsg {
        loop {
            let mut slices = buffers.each_mut().map(|b| [IoSliceMut::new(b)]);
            match recvmmsg(socket.as_raw_fd(), &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
            {
                Ok(results) => {
                    let before = received;
                    for message in results {
                        received += 1;
                        bytes += message.bytes;
                    }
                    if received == before {
                        break;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
    } else {
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    received += 1;
                    bytes += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    std::hint::black_box(bytes);
    Ok(received)
}

/// A tracker with `n` devices online (seq 1), fed in-process.
fn populated(n: usize, auth: AuthMode, payload: &[u8]) -> Tracker {
    populated_shards(n, auth, payload, 1).remove(0)
}

/// `threads` tracker shards with `n` devices online (seq 1) between them.
fn populated_shards(n: usize, auth: AuthMode, payload: &[u8], threads: usize) -> Vec<Tracker> {
    populated_with(config(auth), n, payload, threads)
}

/// `threads` tracker shards made with `config`, with `n` devices online (seq 1) between them.
fn populated_with(config: Config, n: usize, payload: &[u8], threads: usize) -> Vec<Tracker> {
    let auth = config.auth;
    let mut shards =
        Tracker::new_sharded(config, threads, clock().now(), SystemTime::now()).expect("valid config");
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    for i in 0..n {
        let id = device_id(i);
        let key = (auth != AuthMode::Off).then(|| auth::device_key(&MASTER, &id));
        let tracker = &mut shards[shard::owner(id.as_bytes(), threads)];
        tracker.handle(clock().now(), from, &frame(&id, 1, payload, key.as_ref()), &mut reply);
        while tracker.poll_event().is_some() {}
    }
    shards
}

fn heartbeats(trackers: &[Tracker]) -> u64 {
    trackers.iter().map(|t| t.counters().heartbeats()).sum()
}

/// The server (`threads` loops) draining `count` queued heartbeats for `n` known devices.
/// Returns the rate and the share of datagrams handed between threads.
fn drain_server(count: usize, n: usize, auth: AuthMode, threads: usize) -> std::io::Result<(f64, f64)> {
    let mut trackers = populated_shards(n, auth, &[], threads);
    let mut handed_over = 0u64;
    let mut seqs = vec![1u32; n];
    let mut rates = Vec::new();
    for _ in 0..REPEATS {
        // As `serve` does: the kernel steers heartbeats to their owner's socket.
        let sockets = receivers(threads, true)?;
        let addr = sockets[0].local_addr()?;
        let devices = random_devices(n, count);
        let frames: Vec<Vec<u8>> = devices
            .iter()
            .map(|&i| {
                seqs[i] += 1;
                let id = device_id(i);
                let key = (auth != AuthMode::Off).then(|| auth::device_key(&MASTER, &id));
                frame(&id, seqs[i], &[], key.as_ref())
            })
            .collect();
        let _senders = fill(addr, &frames, &devices)?;
        // Summary queries, asked until they count every queued heartbeat,
        // mark the end (each waits behind the heartbeats queued before it).
        let client = UdpSocket::bind("127.0.0.1:0")?;
        client.connect(addr)?;
        client.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut query = [0u8; wire::MAX_DATAGRAM];
        let len = encode_query(1, QueryKind::Summary, None, &mut query).expect("valid query");
        let stop = Stop::new();
        let before = heartbeats(&trackers);
        let started = Instant::now();
        let loop_stop = stop.clone();
        let handle = std::thread::spawn(move || {
            server::run_sharded(&sockets, trackers, clock(), &loop_stop, Vec::new())
        });
        let mut reply = [0u8; wire::MAX_DATAGRAM];
        let elapsed = loop {
            client.send(&query[..len])?;
            let n = client.recv(&mut reply)?;
            let Ok(Message::Status(Status { body: StatusBody::Summary(summary), .. })) =
                wire::decode(&reply[..n])
            else {
                return Err(std::io::Error::other("not a summary"));
            };
            if summary.counts.heartbeats >= before + count as u64
                || started.elapsed() > Duration::from_secs(60)
            {
                break started.elapsed();
            }
        };
        stop.stop();
        let finished = handle.join().expect("server thread")?;
        trackers = finished.trackers;
        handed_over += finished.handed_over;
        let handled = (heartbeats(&trackers) - before) as usize;
        if handled < count {
            eprintln!("note: the server handled {handled} of {count} queued heartbeats");
        }
        rates.push(handled as f64 / elapsed.as_secs_f64());
    }
    Ok((median(rates), handed_over as f64 / (REPEATS * count) as f64))
}

/// Each drain figure is the median of this many runs.
const REPEATS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Resident bytes of this process.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Resident memory per device for `n` online devices (run in a child process).
fn memory_per_device(n: usize, payload_len: usize, auth: AuthMode) -> f64 {
    let payload = vec![0x42u8; payload_len];
    let before = rss();
    let tracker = populated(n, auth, &payload);
    let after = rss();
    assert_eq!(tracker.table().online_count(), n);
    (after - before) as f64 / n as f64
}

/// Results of the live run.
struct Live {
    expiries: usize,
    late_p50: Duration,
    late_p99: Duration,
    late_max: Duration,
    queries: usize,
    rtt_p50: Duration,
    rtt_p99: Duration,
    rtt_max: Duration,
    /// The kernel's drop count for the server's socket.
    drops: u64,
    /// Snapshots written during the run (the last one at stop included).
    snapshots: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The server under a fixed heartbeat rate: `live_expiring` devices were
/// given staggered TTLs and expire during the run; the others keep beating.
fn live(plan: &Plan, rate: u64, state_every: Option<Duration>) -> std::io::Result<Live> {
    let n = plan.live_devices;
    let steady = n - plan.live_expiring;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    rustix::net::sockopt::set_socket_recv_buffer_size(&socket, 8 << 20)?;
    let addr = socket.local_addr()?;
    let mut tracker = Tracker::new(
        Config { min_ttl: Duration::from_millis(100), ..config(AuthMode::Off) },
        clock().now(),
        SystemTime::now(),
    )
    .expect("valid config");
    // Devices steady..n declare intervals that make them expire spread over the run.
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let run_ms = plan.live_seconds * 1000;
    for i in 0..n {
        let expiring = (n - steady) as u64;
        let interval_ms = if i < steady {
            10_000
        } else {
            (200 + (i - steady) as u64 * (run_ms - 400) / expiring) as u32 / 3
        };
        let id = device_id(i);
        let hb = Message::Heartbeat(Heartbeat::new(&id, 1, 1, interval_ms));
        let mut buf = [0u8; 64];
        let len = wire::encode(&hb, &mut buf).expect("valid");
        tracker.handle(clock().now(), from, &buf[..len], &mut reply);
        while tracker.poll_event().is_some() {}
    }
    let lateness = Arc::new(Mutex::new(Vec::new()));
    let observed = lateness.clone();
    let observer = Observer(Box::new(move |transition| {
        let event = &transition.event;
        if let (EventKind::Offline(_), Some(deadline)) = (event.kind, event.deadline) {
            observed.lock().unwrap().push(event.at.saturating_duration_since(deadline));
        }
    }));
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(observer)];
    let stop = Stop::new();
    let loop_stop = stop.clone();
    let dir = std::env::temp_dir().join(format!("presence-bench-live-{}", std::process::id()));
    let options = server::Options {
        state: state_every.map(|every| server::StateOptions { path: dir.join("state"), every }),
        ..server::Options::default()
    };
    std::fs::create_dir_all(&dir)?;
    let port = addr.port();
    let server = std::thread::spawn(move || {
        let sockets = [socket];
        server::run_with(&sockets, vec![tracker], clock(), &loop_stop, sinks, options)
            .map(|finished| (finished.snapshots_written, kernel_drops(port)))
    });

    // The steady devices beat at the offered rate.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        let mut seqs = vec![1u32; steady];
        offer(&socket, rate, Duration::from_millis(run_ms), &mut seqs, |n| (n % steady as u64) as usize);
        Ok(())
    });

    // Meanwhile: a query every 10 ms, alternating summary and one device.
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.connect(addr)?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::new();
    let started = Instant::now();
    let mut request = 0u32;
    let mut query = [0u8; wire::MAX_DATAGRAM];
    let mut answer = [0u8; wire::MAX_DATAGRAM];
    let probe = device_id(0);
    while started.elapsed() < Duration::from_millis(run_ms) {
        request += 1;
        let kind = if request.is_multiple_of(2) { QueryKind::Summary } else { QueryKind::Device(&probe) };
        let len = encode_query(request, kind, None, &mut query).expect("valid query");
        let sent_at = Instant::now();
        client.send(&query[..len])?;
        // Wait for the reply to this request (older ones may still be in flight).
        while let Ok(n) = client.recv(&mut answer) {
            if let Ok(Message::Status(status)) = wire::decode(&answer[..n])
                && status.request == request
            {
                rtts.push(sent_at.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sender.join().expect("sender thread")?;
    stop.stop();
    let (snapshots, drops) = server.join().expect("server thread")?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut late = lateness.lock().unwrap().clone();
    late.sort();
    rtts.sort();
    Ok(Live {
        expiries: late.len(),
        late_p50: percentile(&late, 0.5),
        late_p99: percentile(&late, 0.99),
        late_max: late.last().copied().unwrap_or_default(),
        queries: rtts.len(),
        rtt_p50: percentile(&rtts, 0.5),
        rtt_p99: percentile(&rtts, 0.99),
        rtt_max: rtts.last().copied().unwrap_or_default(),
        drops,
        snapshots,
    })
}

/// Results of a fixed-rate run.
/// The run with the median CPU per heartbeat, with the most drops of any run.
fn median_run(mut runs: Vec<FixedRate>) -> FixedRate {
    let drops = runs.iter().map(|r| r.drops).max().unwrap_or(0);
    runs.sort_by(|a, b| a.cpu_per_heartbeat_ns.total_cmp(&b.cpu_per_heartbeat_ns));
    let mut median = runs.swap_remove(runs.len() / 2);
    median.drops = drops;
    median
}

struct FixedRate {
    /// CPU time of the receiving thread divided by datagrams received.
    cpu_per_heartbeat_ns: f64,
    /// Datagrams the receiver handled.
    received: u64,
    /// The kernel's drop counter for the socket.
    drops: u64,
}

/// Nanoseconds thread `tid` of this process has spent on a CPU.
fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Offers `plan.cpu_rate` heartbeats/s for `plan.cpu_seconds` to a bare loop
/// (`devices` = None) or to the server with that many known devices, and
/// measures the receiving thread's CPU time. The socket gets the server's
/// default receive buffer (`--recv-buffer 8MiB`).
fn fixed_rate(devices: Option<usize>, plan: &Plan) -> std::io::Result<FixedRate> {
    let n = devices.unwrap_or(10_000);
    let bound = server::bind("127.0.0.1:0".parse().unwrap(), Some(8 << 20))?;
    let addr = bound.local_addr;
    let socket = bound.socket;
    let stop = Stop::new();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let loop_stop = stop.clone();
    let receiver = match devices {
        Some(n) => {
            let tracker = populated(n, AuthMode::Off, &[]);
            std::thread::spawn(move || -> std::io::Result<u64> {
                let _ = tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get());
                let tracker = server::run(&socket, tracker, clock(), &loop_stop, Vec::new())?;
                Ok(tracker.counters().heartbeats() - n as u64)
            })
        }
        None => std::thread::spawn(move || -> std::io::Result<u64> {
            let _ = tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get());
            let mut buf = [0u8; 2048];
            let mut received = 0u64;
            while !loop_stop.is_requested() {
                if let Ok((len, _)) = socket.recv_from(&mut buf) {
                    received += u64::from(len > 0);
                }
            }
            Ok(received)
        }),
    };
    let tid = tid_rx.recv().expect("receiver started");
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(addr)?;
    let mut seqs = vec![1u32; n];
    let order = random_devices(n, 1 << 20);
    let cpu_before = thread_cpu_ns(tid);
    offer(&sender, plan.cpu_rate, Duration::from_secs(plan.cpu_seconds), &mut seqs, |k| {
        order[(k % order.len() as u64) as usize]
    });
    // Let the receiver catch up, then read its CPU time before stopping it.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = thread_cpu_ns(tid) - cpu_before;
    let drops = kernel_drops(addr.port());
    stop.stop();
    // The bare loop blocks in recv_from: an empty datagram wakes it.
    sender.send(&[])?;
    let received = receiver.join().expect("receiver thread")?;
    Ok(FixedRate { cpu_per_heartbeat_ns: cpu as f64 / received.max(1) as f64, received, drops })
}

/// Sends unsigned heartbeats on a connected socket at `rate` per second for
/// `duration`. The `k`th heartbeat is from device `device(k)`, whose seq in
/// `seqs` goes up by one each time.
fn offer(socket: &UdpSocket, rate: u64, duration: Duration, seqs: &mut [u32], device: impl Fn(u64) -> usize) {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut buf = [0u8; 64];
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let i = device(sent);
            seqs[i] += 1;
            let id = device_id(i);
            let hb = Message::Heartbeat(Heartbeat::new(&id, 1, seqs[i], 10_000));
            let len = wire::encode(&hb, &mut buf).expect("valid");
            let _ = socket.send(&buf[..len]);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
