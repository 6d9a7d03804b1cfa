//! What the fleet view costs, with 1, 2 and 3 trackers (`--cluster`) on one
//! nats-server with JetStream, all real processes on this machine.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_cluster
//! cargo build --release && cargo run --release --example bench_cluster -- --quick
//! ```
//!
//! It needs `nats-server` (`tests/run` installs it; it looks on PATH, in
//! `target/test-servers/venv/bin` and in `/usr/sbin`).
//!
//! For each number of trackers: `--devices` devices (split evenly, device
//! `i` beats at tracker `i % n`) declare a 1 s interval (TTL 3 s) and beat
//! once per second.
//! 1. Bring-up: from the first heartbeat until the fleet stream has every
//!    device's `online`: the time, and the CPU of the trackers (every thread)
//!    and of nats-server, per device.
//! 2. Steady state (`--steady`, 20 s): messages stored in JetStream (the
//!    hearers bucket, the fleet stream, the nodes bucket), per device per
//!    hour, and the liveness writes per tracker per hour.
//! 3. Silence: 1 000 devices (spread over the trackers) stop; the time from
//!    each one's deadline (its last heartbeat + TTL) until its global
//!    `offline` reaches a consumer of the fleet stream: median, p99, max.
//! 4. With 3 trackers, tracker 0 is SIGKILLed and its devices stop: the same
//!    latency, now through rule 4 (its liveness must expire first).
//!
//! Everything listens and sends on 127.0.0.1 only, and stops by itself.

#[path = "common/mod.rs"]
mod common;
use common::{find, free_port, process_cpu_ns, wait};

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use presence::wire::{Heartbeat, Message};

const TTL: Duration = Duration::from_secs(3);
const CLUSTER: &str = "bench";
const SILENCED: usize = 1_000;

fn main() -> std::io::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let arg = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<u64>().ok())
    };
    let devices = arg("--devices").unwrap_or(if quick { 3_000 } else { 30_000 }) as usize;
    let steady = Duration::from_secs(arg("--steady").unwrap_or(if quick { 5 } else { 20 }));
    // The binary of the same profile, beside this example's directory.
    let binary = std::env::current_exe()?.parent().and_then(Path::parent).map(|dir| dir.join("presence"));
    let binary = binary.filter(|b| b.exists()).ok_or_else(|| {
        std::io::Error::other("target/<profile>/presence not found: run `cargo build --release` first")
    })?;
    let binary = binary.as_path();
    let nats_server = find("nats-server")?;
    println!("{devices} devices, 1 heartbeat/s each, TTL 3 s; steady state measured over {steady:?}");
    println!(
        "{:>8}  {:>10}  {:>14}  {:>14}  {:>16}  {:>14}  {:>22}  {:>22}",
        "trackers",
        "bring-up",
        "trackers CPU",
        "NATS CPU",
        "steady msgs",
        "liveness",
        "offline latency",
        "after a tracker death"
    );
    println!(
        "{:>8}  {:>10}  {:>14}  {:>14}  {:>16}  {:>14}  {:>22}  {:>22}",
        "",
        "",
        "per device",
        "per device",
        "per device-hour",
        "per node-hour",
        "median/p99/max",
        "median/p99/max"
    );
    for trackers in 1..=3 {
        let figures = run(binary, &nats_server, trackers, devices, steady)?;
        println!(
            "{:>8}  {:>10}  {:>14}  {:>14}  {:>16.3}  {:>14.0}  {:>22}  {:>22}",
            trackers,
            format!("{:.2} s", figures.bring_up.as_secs_f64()),
            format!("{:.1} µs", figures.trackers_cpu_ns / 1000.0),
            format!("{:.1} µs", figures.nats_cpu_ns / 1000.0),
            figures.steady_per_device_hour,
            figures.liveness_per_node_hour,
            figures.silence,
            figures.death.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

struct Figures {
    bring_up: Duration,
    trackers_cpu_ns: f64,
    nats_cpu_ns: f64,
    steady_per_device_hour: f64,
    liveness_per_node_hour: f64,
    silence: String,
    death: Option<String>,
}

/// Processes killed on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn device_id(i: usize) -> String {
    format!("bench-dev-{i:06}")
}

/// The devices: each beats once per second at the tracker it is routed to
/// (or nowhere: silent). Records when each one's last heartbeat left.
struct Load {
    routes: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    last_sent: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(routes: Vec<Option<SocketAddr>>) -> Load {
        let n = routes.len();
        let routes = Arc::new(Mutex::new(routes));
        let last_sent = Arc::new(Mutex::new(vec![Instant::now(); n]));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (Arc::clone(&routes), Arc::clone(&last_sent), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let ids: Vec<String> = (0..n).map(device_id).collect();
            let started = Instant::now();
            let mut seq = 0u32;
            // Bounded: stops by itself after ten minutes.
            while !s.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(600) {
                seq += 1;
                let round = Instant::now();
                // Spread each round over the second, in 10 slices.
                for slice in 0..10 {
                    let routes = r.lock().unwrap().clone();
                    for i in (slice * n / 10)..((slice + 1) * n / 10) {
                        let Some(to) = routes[i] else { continue };
                        let frame = frame(&ids[i], seq);
                        let _ = socket.send_to(&frame, to);
                        l.lock().unwrap()[i] = Instant::now();
                    }
                    let next = round + Duration::from_millis(100 * (slice as u64 + 1));
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            }
        });
        Load { routes, last_sent, stop, thread: Some(thread) }
    }

    fn silence(&self, devices: impl Iterator<Item = usize>) {
        let mut routes = self.routes.lock().unwrap();
        for i in devices {
            routes[i] = None;
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn frame(id: &str, seq: u32) -> Vec<u8> {
    let mut buf = [0u8; presence::wire::MAX_DATAGRAM];
    let len =
        presence::wire::encode(&Message::Heartbeat(Heartbeat::new(id, 1, seq, 1000)), &mut buf).unwrap();
    buf[..len].to_vec()
}

/// Fleet events as a consumer of the stream sees them: device → (event, when seen).
type Seen = Arc<Mutex<HashMap<String, Vec<(String, Instant)>>>>;

fn run(
    binary: &Path,
    nats_server: &Path,
    trackers: usize,
    devices: usize,
    steady: Duration,
) -> std::io::Result<Figures> {
    let store = tempfile::tempdir()?;
    let nats_port = free_port();
    let nats = Command::new(nats_server)
        .args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let nats_pid = nats.id();
    let mut children = Children(vec![nats]);
    wait("nats-server to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok()
    });
    let url = format!("nats://127.0.0.1:{nats_port}");
    let mut addrs = Vec::new();
    let mut pids = Vec::new();
    for t in 0..trackers {
        let port = free_port();
        let child = Command::new(binary)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--nats", &url, "--cluster", CLUSTER])
            .args(["--node", &format!("t{t}"), "--query-rate", "100000", "--query-burst", "100000"])
            // A thousand devices stop at once on purpose: no self-preservation.
            .args(["--self-preservation", "off"])
            .env(
                "RUST_LOG",
                if std::env::var_os("BENCH_LOGS").is_some() { "info,async_nats=warn" } else { "warn" },
            )
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("BENCH_LOGS") {
                // BENCH_LOGS=DIR keeps each tracker's log there.
                Some(dir) => Stdio::from(std::fs::File::create(
                    Path::new(&dir).join(format!("tracker-{trackers}-{t}.log")),
                )?),
                None => Stdio::null(),
            })
            .spawn()?;
        pids.push(child.id());
        children.0.push(child);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    // The trackers are up once their liveness keys are there.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let jetstream = runtime.block_on(async {
        let client = async_nats::connect(url.as_str()).await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(async_nats::jetstream::new(client))
    })?;
    let names = presence::sink::cluster::ClusterNames { cluster: CLUSTER.into() };
    wait("the trackers to join", Duration::from_secs(20), || {
        runtime.block_on(async {
            let Ok(nodes) = jetstream.get_key_value(names.nodes_bucket()).await else { return false };
            presence::sink::cluster::read_nodes(&nodes).await.is_ok_and(|n| n.len() == trackers)
        })
    });
    let stream = loop {
        if let Ok(stream) = runtime.block_on(jetstream.get_stream(names.stream())) {
            break stream;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // A consumer of the fleet stream, recording when each event arrives.
    let seen: Seen = Arc::default();
    {
        let seen = Arc::clone(&seen);
        let consumer = runtime
            .block_on(stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()))
            .map_err(std::io::Error::other)?;
        runtime.spawn(async move {
            let Ok(mut messages) = consumer.messages().await else { return };
            while let Some(Ok(message)) = messages.next().await {
                let Ok(event) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
                    continue;
                };
                let device = event["device"].as_str().unwrap_or_default().to_string();
                let kind = event["event"].as_str().unwrap_or_default().to_string();
                seen.lock().unwrap().entry(device).or_default().push((kind, Instant::now()));
            }
        });
    }
    let count = |kind: &str| -> usize {
        seen.lock().unwrap().values().filter(|events| events.iter().any(|(k, _)| k == kind)).count()
    };
    let cpu = |pids: &[u32]| -> u64 { pids.iter().map(|pid| process_cpu_ns(*pid)).sum() };

    // 1. Bring-up.
    let (trackers_before, nats_before) = (cpu(&pids), process_cpu_ns(nats_pid));
    let started = Instant::now();
    let load = Load::start((0..devices).map(|i| Some(addrs[i % trackers])).collect());
    wait("every device online in the fleet stream", Duration::from_secs(300), || count("online") == devices);
    let bring_up = started.elapsed();
    let trackers_cpu_ns = (cpu(&pids) - trackers_before) as f64 / devices as f64;
    let nats_cpu_ns = (process_cpu_ns(nats_pid) - nats_before) as f64 / devices as f64;

    // 2. Steady state: what JetStream stores meanwhile.
    let stored = |name: String| -> u64 {
        runtime.block_on(async {
            match jetstream.get_stream(name).await {
                Ok(mut stream) => stream.info().await.map_or(0, |info| info.state.last_sequence),
                Err(_) => 0,
            }
        })
    };
    let devices_stream = format!("KV_{}", names.devices_bucket());
    let nodes_stream = format!("KV_{}", names.nodes_bucket());
    std::thread::sleep(Duration::from_secs(2));
    let before = (stored(devices_stream.clone()) + stored(names.stream()), stored(nodes_stream.clone()));
    std::thread::sleep(steady);
    let after = (stored(devices_stream) + stored(names.stream()), stored(nodes_stream));
    let hours = steady.as_secs_f64() / 3600.0;
    let steady_per_device_hour = (after.0 - before.0) as f64 / devices as f64 / hours;
    let liveness_per_node_hour = (after.1 - before.1) as f64 / trackers as f64 / hours;

    // 3. Silence: 1 000 devices stop.
    // Spread over the trackers, and none of tracker 0's with 3 (step 4 kills those).
    let silenced: Vec<usize> = (0..devices).filter(|i| matches!(i % 6, 1 | 2)).take(SILENCED).collect();
    load.silence(silenced.iter().copied());
    wait("the silenced devices offline", Duration::from_secs(120), || count("offline") == silenced.len());
    let silence = latencies(&seen, &load, &silenced);

    // 4. A tracker's death (3 trackers): its devices stop with it.
    let death = if trackers == 3 {
        let dead: Vec<usize> = (0..devices).filter(|i| i % trackers == 0 && !silenced.contains(i)).collect();
        load.silence(dead.iter().copied());
        let _ = children.0[1].kill();
        let expected = silenced.len() + dead.len();
        wait("the dead tracker's devices offline", Duration::from_secs(120), || count("offline") == expected);
        Some(latencies(&seen, &load, &dead))
    } else {
        None
    };
    drop(load);
    drop(children);
    Ok(Figures {
        bring_up,
        trackers_cpu_ns,
        nats_cpu_ns,
        steady_per_device_hour,
        liveness_per_node_hour,
        silence,
        death,
    })
}

/// For `devices`: from each one's deadline (its last heartbeat + TTL) to
/// its offline reaching the consumer; median, p99 and max.
fn latencies(seen: &Seen, load: &Load, devices: &[usize]) -> String {
    let last_sent = load.last_sent.lock().unwrap().clone();
    let seen = seen.lock().unwrap();
    let mut ms: Vec<i64> = devices
        .iter()
        .filter_map(|i| {
            let deadline = last_sent[*i] + TTL;
            let (_, at) = seen.get(&device_id(*i))?.iter().rev().find(|(kind, _)| kind == "offline")?;
            Some(if *at >= deadline {
                at.duration_since(deadline).as_millis() as i64
            } else {
                -(deadline.duration_since(*at).as_millis() as i64)
            })
        })
        .collect();
    ms.sort_unstable();
    if ms.is_empty() {
        return "-".into();
    }
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!("{} / {} / {} ms", at(0.5), at(0.99), ms[ms.len() - 1])
}
