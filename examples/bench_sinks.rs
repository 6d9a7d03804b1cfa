//! What the sinks cost: the real `presence` binary under a fixed heartbeat
//! rate, once with no sinks and once with all of them on real local servers
//! (the events file, NATS JetStream, MQTT with Home Assistant discovery,
//! and `/metrics` scraped every second) and `--state` snapshots every
//! second, alternating, the median of 3 each.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench_sinks
//! cargo build --release && cargo run --release --example bench_sinks -- --quick
//! ```
//!
//! It needs `nats-server` and `mosquitto` (`tests/run` installs both; it
//! looks on PATH, in `target/test-servers/venv/bin` and in `/usr/sbin`).
//!
//! Each run: `--devices` devices (16-byte ids) declare a 1 s interval (TTL
//! 3 s) and beat once per second in turn, at `--rate` heartbeats/s in all.
//! 1. Warm-up: every device comes online; with sinks, the run waits until
//!    NATS KV and the MQTT broker hold every device as online.
//! 2. Steady (5 s): the server's CPU time (every thread of the process,
//!    from /proc) per heartbeat, and the kernel's drops for its socket.
//! 3. Mass expiry: half of the devices stop; the rest keep the rate (with
//!    `--self-preservation off`, or the server would hold them). The
//!    same CPU figure over 8 s, which now includes taking the silent half
//!    offline and, with sinks, publishing their transitions; and the time
//!    from the last of their deadlines until NATS KV and MQTT show every
//!    one of them offline.
//!
//! `--nice-brokers` runs nats-server, Mosquitto and the watchers at nice
//! 10, below the tracker, as if they were on other machines (on 2 cores
//! they otherwise take CPU from the receive loop during a mass expiry).
//!
//! Everything listens and sends on 127.0.0.1 only, and stops by itself.

#[path = "common/mod.rs"]
mod common;
use common::{find, free_port, kernel_drops, process_cpu_ns, threads_cpu_ns, wait};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use presence::client::encode_query;
use presence::sink::names;
use presence::wire::{self, Heartbeat, Message, QueryKind};

const REPEATS: usize = 3;
const TTL: Duration = Duration::from_secs(3);

struct Plan {
    devices: usize,
    rate: u64,
    steady: Duration,
    expiry: Duration,
}

fn main() -> std::io::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let arg =
        |name: &str| std::env::args().skip_while(|a| a != name).nth(1).and_then(|v| v.parse::<u64>().ok());
    let plan = Plan {
        devices: arg("--devices").unwrap_or(if quick { 20_000 } else { 200_000 }) as usize,
        rate: arg("--rate").unwrap_or(if quick { 20_000 } else { 200_000 }),
        steady: Duration::from_secs(if quick { 2 } else { 5 }),
        expiry: Duration::from_secs(8),
    };
    let binary = std::env::current_exe()?.parent().and_then(Path::parent).map(|dir| dir.join("presence"));
    let binary = binary.filter(|b| b.exists()).ok_or_else(|| {
        std::io::Error::other("target/<profile>/presence not found: run `cargo build --release` first")
    })?;
    let nats_server = find("nats-server")?;
    let mosquitto = find("mosquitto")?;
    println!(
        "presence sink benchmark: {} devices, {} heartbeats/s, {} cores",
        plan.devices,
        plan.rate,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let (mut bare, mut sinks) = (Vec::new(), Vec::new());
    for round in 0..REPEATS {
        bare.push(run(&binary, None, &plan)?);
        let servers = Servers::start(&nats_server, &mosquitto)?;
        sinks.push(run(&binary, Some(&servers), &plan)?);
        println!("round {} of {REPEATS} done", round + 1);
    }
    let median = |runs: &[Figures], pick: fn(&Figures) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let range = |runs: &[Figures], pick: fn(&Figures) -> f64| {
        let values: Vec<f64> = runs.iter().map(pick).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.0}–{max:.0}")
    };
    let steady = |f: &Figures| f.steady_ns;
    let expiry = |f: &Figures| f.expiry_ns;
    let drops = |runs: &[Figures]| runs.iter().map(|f| f.drops).max().unwrap_or(0);
    println!();
    println!("| figure | no sinks | all sinks | ratio |");
    println!("|--------|----------|-----------|-------|");
    for (name, pick) in [("steady", steady as fn(&Figures) -> f64), ("mass expiry", expiry)] {
        let (a, b) = (median(&bare, pick), median(&sinks, pick));
        println!(
            "| server CPU per heartbeat, {name} | {a:.0} ns ({}) | {b:.0} ns ({}) | {:.2} × |",
            range(&bare, pick),
            range(&sinks, pick),
            b / a
        );
    }
    println!("| kernel drops (most in a run) | {} | {} | |", drops(&bare), drops(&sinks));
    let visible = |pick: fn(&Figures) -> Option<Duration>| {
        let mut values: Vec<f64> = sinks.iter().filter_map(pick).map(|d| d.as_secs_f64()).collect();
        values.sort_by(f64::total_cmp);
        match (values.first(), values.get(values.len() / 2), values.last()) {
            (Some(min), Some(median), Some(max)) if values.len() == sinks.len() => {
                format!("{median:.2} s ({min:.2}–{max:.2})")
            }
            _ => format!("not all visible in {} of {} runs", sinks.len() - values.len(), sinks.len()),
        }
    };
    let half = plan.devices / 2;
    println!(
        "| {half} offline fully visible in NATS KV, after the last deadline | | {} | |",
        visible(|f| f.nats)
    );
    println!(
        "| {half} offline fully visible in MQTT, after the last deadline | | {} | |",
        visible(|f| f.mqtt)
    );
    println!(
        "| events lost by the sinks (most in a run) | | {} | |",
        sinks.iter().map(|f| f.lost).max().unwrap_or(0)
    );
    Ok(())
}

/// A nats-server (JetStream) and a Mosquitto broker, killed on drop.
struct Servers {
    nats: Child,
    mosquitto: Child,
    nats_port: u16,
    mqtt_port: u16,
    _store: tempfile::TempDir,
}

impl Servers {
    fn start(nats_server: &Path, mosquitto: &Path) -> std::io::Result<Servers> {
        let store = tempfile::tempdir()?;
        let (nats_port, mqtt_port) = (free_port(), free_port());
        let quiet = || (Stdio::null(), Stdio::null());
        // `--nice-brokers`: the brokers and this process's watchers below the
        // tracker, as if they ran on other machines.
        let nice = std::env::args().any(|a| a == "--nice-brokers");
        let command = |program: &Path| {
            if nice {
                let mut command = Command::new("nice");
                command.args(["-n", "10"]).arg(program);
                command
            } else {
                Command::new(program)
            }
        };
        let (out, err) = quiet();
        let nats = command(nats_server)
            .args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        let (out, err) = quiet();
        let mosquitto =
            command(mosquitto).args(["-p", &mqtt_port.to_string()]).stdout(out).stderr(err).spawn()?;
        for port in [nats_port, mqtt_port] {
            wait("a broker to listen", Duration::from_secs(10), || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        Ok(Servers { nats, mosquitto, nats_port, mqtt_port, _store: store })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in [&mut self.nats, &mut self.mosquitto] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// With `--nice-brokers`, lowers the calling watcher thread's priority.
fn below_tracker() {
    if std::env::args().any(|a| a == "--nice-brokers") {
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
    }
}

/// One run's figures.
struct Figures {
    steady_ns: f64,
    expiry_ns: f64,
    drops: u64,
    nats: Option<Duration>,
    mqtt: Option<Duration>,
    lost: u64,
}

fn device_id(i: usize) -> String {
    format!("bench-dev-{i:06}")
}

fn run(binary: &Path, servers: Option<&Servers>, plan: &Plan) -> std::io::Result<Figures> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::tempdir()?;
    let metrics_port = free_port();
    let mut command = Command::new(binary);
    command
        .args(["serve", "--bind", &addr.to_string(), "--max-devices", &plan.devices.to_string()])
        // A real mass expiry: with self-preservation on (the default) the
        // silent half would be held as suspect for a TTL more.
        .args(["--self-preservation", "off"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let watchers = match servers {
        Some(servers) => {
            command
                .args(["--sink-buffer", &(4 * plan.devices).to_string(), "--events"])
                .arg(dir.path().join("events.jsonl"))
                .args(["--nats", &format!("nats://127.0.0.1:{}", servers.nats_port)])
                .args(["--mqtt", &format!("mqtt://127.0.0.1:{}", servers.mqtt_port)])
                .args(["--mqtt-discovery", "homeassistant"])
                .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
                // And snapshots of the table every second (10 × the default).
                .args(["--state-every", "1s", "--state"])
                .arg(dir.path().join("presence.state"));
            Some(Watchers::start(servers, plan.devices)?)
        }
        None => None,
    };
    let mut server = command.spawn()?;
    let pid = server.id();
    let probe = UdpSocket::bind("127.0.0.1:0")?;
    probe.set_read_timeout(Some(Duration::from_millis(100)))?;
    wait("the server to answer", Duration::from_secs(10), || answers(&probe, addr));
    let scraping = Arc::new(AtomicBool::new(servers.is_some()));
    let scraper = {
        let scraping = Arc::clone(&scraping);
        std::thread::spawn(move || {
            let mut lost = 0;
            while scraping.load(Ordering::Relaxed) {
                if let Some(text) = scrape(metrics_port) {
                    lost = lost_events(&text);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            lost
        })
    };

    let sender = UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(addr)?;
    let mut fleet = Fleet { seqs: vec![0; plan.devices], next: 0, active: plan.devices };
    // 1. Warm-up: two rounds, then until the brokers hold everyone.
    fleet.offer(&sender, plan.rate, 2 * plan.devices as u64 * 1_000_000 / plan.rate / 1000);
    if let Some(watchers) = &watchers {
        let until = Instant::now() + Duration::from_secs(300);
        while !watchers.all_online() {
            assert!(
                Instant::now() < until,
                "the brokers never held every device online: NATS {}, MQTT {} of {}",
                watchers.nats.online.load(Ordering::Relaxed),
                watchers.mqtt.online.load(Ordering::Relaxed),
                plan.devices
            );
            fleet.offer(&sender, plan.rate, 200);
        }
    }
    // 2. Steady.
    let drops_before = kernel_drops(port);
    let threads = threads_cpu_ns(pid);
    let cpu = process_cpu_ns(pid);
    let sent = fleet.offer(&sender, plan.rate, plan.steady.as_millis() as u64);
    let steady_ns = (process_cpu_ns(pid) - cpu) as f64 / sent as f64;
    let steady_drops = kernel_drops(port) - drops_before;
    let label = if servers.is_some() { "all sinks" } else { "no sinks" };
    println!(
        "  {label}, steady: ns per heartbeat by thread: {}; {steady_drops} kernel drops",
        split(&threads, pid, sent)
    );
    // 3. Mass expiry: the second half stops. Its last heartbeats went out
    // within the last second, so its last deadline is about TTL from now.
    fleet.active = plan.devices / 2;
    fleet.next %= fleet.active;
    let last_deadline = Instant::now() + TTL;
    if let Some(watchers) = &watchers {
        watchers.expect_offline(fleet.active..plan.devices);
    }
    let threads = threads_cpu_ns(pid);
    let cpu = process_cpu_ns(pid);
    let sent = fleet.offer(&sender, plan.rate, plan.expiry.as_millis() as u64);
    let expiry_ns = (process_cpu_ns(pid) - cpu) as f64 / sent as f64;
    let drops = kernel_drops(port) - drops_before;
    println!(
        "  {label}, mass expiry: ns per heartbeat by thread: {}; {} kernel drops",
        split(&threads, pid, sent),
        drops - steady_drops
    );
    let (nats, mqtt) = match &watchers {
        Some(watchers) => {
            // Keep the rest alive while the brokers catch up.
            let until = Instant::now() + Duration::from_secs(120);
            while !watchers.all_offline() && Instant::now() < until {
                fleet.offer(&sender, plan.rate, 200);
            }
            let since = |at: Option<Instant>| at.map(|at| at.saturating_duration_since(last_deadline));
            (since(watchers.nats_done()), since(watchers.mqtt_done()))
        }
        None => (None, None),
    };
    scraping.store(false, Ordering::Relaxed);
    let lost = scraper.join().expect("scraper");
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = server.wait();
    Ok(Figures { steady_ns, expiry_ns, drops, nats, mqtt, lost })
}

/// Whether the server answers a summary query.
fn answers(socket: &UdpSocket, addr: SocketAddr) -> bool {
    let mut query = [0u8; wire::MAX_DATAGRAM];
    let Ok(len) = encode_query(1, QueryKind::Summary, None, &mut query) else { return false };
    let _ = socket.send_to(&query[..len], addr);
    let mut reply = [0u8; wire::MAX_DATAGRAM];
    socket.recv_from(&mut reply).is_ok()
}

/// The devices and their seqs; the first `active` beat in turn.
struct Fleet {
    seqs: Vec<u32>,
    next: usize,
    active: usize,
}

impl Fleet {
    /// Sends heartbeats at `rate` per second for `ms`, returning how many.
    fn offer(&mut self, socket: &UdpSocket, rate: u64, ms: u64) -> u64 {
        let started = Instant::now();
        let duration = Duration::from_millis(ms);
        let (mut sent, mut buf) = (0u64, [0u8; 64]);
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let i = self.next;
                self.next = (self.next + 1) % self.active;
                self.seqs[i] += 1;
                let id = device_id(i);
                let len =
                    wire::encode(&Message::Heartbeat(Heartbeat::new(&id, 1, self.seqs[i], 1000)), &mut buf)
                        .expect("valid");
                let _ = socket.send(&buf[..len]);
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        sent
    }
}

/// The CPU each thread (by name) spent between two readings, per heartbeat.
fn split(before: &std::collections::BTreeMap<String, u64>, pid: u32, heartbeats: u64) -> String {
    let after = threads_cpu_ns(pid);
    after
        .iter()
        .map(|(name, ns)| (name, ns - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, ns)| *ns > 0)
        .map(|(name, ns)| format!("{name} {:.0}", ns as f64 / heartbeats as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `GET /metrics`, as Prometheus would.
fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Events lost by all sinks, from a scrape.
fn lost_events(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("presence_sink_events_lost"))
        .filter_map(|line| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// What NATS KV and the MQTT broker say of each device, from a KV watcher
/// and an MQTT subscriber (threads of this process).
struct Watchers {
    nats: Arc<Watch>,
    mqtt: Arc<Watch>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One broker's view: each device's latest state, and when the devices
/// expected offline all were.
struct Watch {
    devices: usize,
    states: Mutex<HashMap<String, bool>>,
    online: AtomicU64,
    expecting: Mutex<Option<(std::collections::HashSet<String>, Option<Instant>)>>,
}

impl Watch {
    fn new(devices: usize) -> Watch {
        Watch { devices, states: Mutex::default(), online: AtomicU64::new(0), expecting: Mutex::default() }
    }

    fn record(&self, name: &str, online: bool) {
        let mut states = self.states.lock().unwrap();
        let before = states.insert(name.to_string(), online);
        match (before, online) {
            (Some(true), false) => {
                self.online.fetch_sub(1, Ordering::Relaxed);
            }
            (None | Some(false), true) => {
                self.online.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if !online && let Some((waiting, done)) = &mut *self.expecting.lock().unwrap() {
            waiting.remove(name);
            if waiting.is_empty() && done.is_none() {
                *done = Some(Instant::now());
            }
        }
    }

    fn expect_offline(&self, names: impl Iterator<Item = String>) {
        let states = self.states.lock().unwrap();
        let waiting = names.filter(|name| states.get(name) != Some(&false)).collect();
        *self.expecting.lock().unwrap() = Some((waiting, None));
    }

    fn done(&self) -> Option<Instant> {
        self.expecting.lock().unwrap().as_ref().and_then(|(_, done)| *done)
    }
}

impl Watchers {
    fn start(servers: &Servers, devices: usize) -> std::io::Result<Watchers> {
        let (nats, mqtt) = (Arc::new(Watch::new(devices)), Arc::new(Watch::new(devices)));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // NATS: create the bucket as the sink would, and watch every key.
        let url = format!("nats://127.0.0.1:{}", servers.nats_port);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let (nats, stop) = (Arc::clone(&nats), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                below_tracker();
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    use futures_util::StreamExt;
                    let client = async_nats::connect(url).await.expect("NATS");
                    let jetstream = async_nats::jetstream::new(client);
                    let config = async_nats::jetstream::kv::Config {
                        bucket: "presence".into(),
                        history: 1,
                        ..Default::default()
                    };
                    let bucket = jetstream.create_key_value(config).await.expect("bucket");
                    let mut watch = bucket.watch_all().await.expect("watch");
                    let _ = ready_tx.send(());
                    while !stop.load(Ordering::Relaxed) {
                        let next = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
                        if let Ok(Some(Ok(entry))) = next {
                            let online = std::str::from_utf8(&entry.value)
                                .is_ok_and(|json| json.contains(r#""event":"online""#));
                            nats.record(&entry.key, online);
                        }
                    }
                });
            }));
        }
        ready_rx.recv_timeout(Duration::from_secs(10)).map_err(std::io::Error::other)?;
        // MQTT: every device's retained state topic.
        {
            let (mqtt, stop) = (Arc::clone(&mqtt), Arc::clone(&stop));
            let port = servers.mqtt_port;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
                below_tracker();
                let mut options = MqttOptions::new("bench-watch", "127.0.0.1", port);
                options.set_keep_alive(Duration::from_secs(30));
                options.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut connection) = Client::new(options, 1024);
                client.subscribe("presence/+/state", QoS::AtMostOnce).expect("subscribe");
                while !stop.load(Ordering::Relaxed) {
                    match connection.recv_timeout(Duration::from_millis(200)) {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let name = p.topic.split('/').nth(1).unwrap_or_default();
                            mqtt.record(name, &p.payload[..] == b"online");
                        }
                        _ => {}
                    }
                }
                let _ = client.disconnect();
            }));
            ready_rx.recv_timeout(Duration::from_secs(10)).map_err(std::io::Error::other)?;
        }
        Ok(Watchers { nats, mqtt, stop, threads })
    }

    fn all_online(&self) -> bool {
        [&self.nats, &self.mqtt].iter().all(|w| w.online.load(Ordering::Relaxed) as usize == w.devices)
    }

    fn expect_offline(&self, range: std::ops::Range<usize>) {
        for watch in [&self.nats, &self.mqtt] {
            watch.expect_offline(range.clone().map(|i| names::encode(&device_id(i))));
        }
    }

    fn all_offline(&self) -> bool {
        self.nats.done().is_some() && self.mqtt.done().is_some()
    }

    fn nats_done(&self) -> Option<Instant> {
        self.nats.done()
    }

    fn mqtt_done(&self) -> Option<Instant> {
        self.mqtt.done()
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
