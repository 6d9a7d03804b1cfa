//! Load generator: N simulated devices sending heartbeats at a total rate R
//! to one server for a while, with a live progress line and a final report.
//! It doubles as a capacity test for your own deployment.
//!
//! ```text
//! cargo run --release --example loadgen -- --devices 100000 --rate 100000 --duration 30s
//! cargo run --release --example loadgen -- --server tracker:7787 --key-file master.key ...
//! ```
//!
//! Each second it prints what it sent, how many acks came back, and the
//! rate the server itself counted (from its status summary). It sends only
//! to `--server` and stops after `--duration`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use presence::auth::{self, Key};
use presence::client::Client;
use presence::keyfile::KeyFile;
use presence::wire::{self, Heartbeat, Message};

/// Simulates many devices at a fixed total heartbeat rate.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:7787")]
    server: SocketAddr,
    /// How many distinct devices.
    #[arg(long, default_value_t = 10_000)]
    devices: u32,
    /// Heartbeats per second, all devices together.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Ask for an ack on every Nth heartbeat (0: never).
    #[arg(long, default_value_t = 100)]
    ack_every: u64,
    /// Device ids are PREFIX-0 .. PREFIX-(N-1).
    #[arg(long, default_value = "load")]
    prefix: String,
    /// The master key file: heartbeats are signed with each device's derived
    /// key, and status queries with the operator key.
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

/// Counters shared between the threads.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    send_errors: AtomicU64,
    acks: AtomicU64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let master = match &args.key_file {
        None => None,
        Some(path) => match KeyFile::read(path)? {
            KeyFile::Master(key) => Some(key),
            other => return Err(format!("--key-file needs the master key, not {other:?}").into()),
        },
    };
    let ids: Vec<String> = (0..args.devices).map(|i| format!("{}-{i}", args.prefix)).collect();
    let keys: Option<Vec<Key>> = master.map(|m| ids.iter().map(|id| auth::device_key(&m, id)).collect());
    let socket = UdpSocket::bind(if args.server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(args.server)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let progress = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));

    // Acks come back on the same socket.
    let ack_socket = socket.try_clone()?;
    let (ack_progress, ack_done) = (progress.clone(), done.clone());
    let acks = std::thread::spawn(move || {
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        while !ack_done.load(Ordering::Relaxed) {
            if let Ok(n) = ack_socket.recv(&mut buf)
                && let Ok(Message::Ack(_)) = wire::decode(&buf[..n])
            {
                ack_progress.acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // The sender paces itself against the clock.
    // A boot larger than any used before on this machine (as `presence beat` picks it),
    // so two runs within one second are not replays of each other.
    let boot = presence::client::BootCounter::default_location()
        .and_then(|counter| counter.next())
        .unwrap_or_else(|_| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32));
    let (send_progress, send_done) = (progress.clone(), done.clone());
    let (rate, duration, ack_every, n) =
        (args.rate, args.duration, args.ack_every, u64::from(args.devices.max(1)));
    let sender = std::thread::spawn(move || {
        let started = Instant::now();
        let mut frame = [0u8; wire::MAX_DATAGRAM];
        let mut sent = 0u64;
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let i = (sent % n) as usize;
                let ack = ack_every > 0 && sent.is_multiple_of(ack_every);
                let hb = Message::Heartbeat(Heartbeat {
                    device: &ids[i],
                    boot,
                    seq: (sent / n) as u32 + 1,
                    interval_ms: u32::try_from((n * 1000).div_ceil(rate.max(1))).unwrap_or(u32::MAX),
                    flags: if ack { wire::FLAG_ACK } else { 0 },
                    payload: &[],
                    tag: None,
                });
                let len = match &keys {
                    Some(keys) => auth::encode_signed(&hb, &keys[i], &mut frame),
                    None => wire::encode(&hb, &mut frame),
                }
                .expect("valid frame");
                if socket.send(&frame[..len]).is_err() {
                    send_progress.send_errors.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
                send_progress.sent.store(sent, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        send_done.store(true, Ordering::Relaxed);
    });

    // Once a second: what we sent, what was acked, what the server counted.
    let mut client = Client::new(args.server, Duration::from_millis(500))?;
    if let Some(master) = &master {
        client = client.with_operator_key(auth::operator_key(master));
    }
    let server_start = client.summary().ok().map(|s| s.counts.heartbeats);
    let started = Instant::now();
    let (mut last_sent, mut last_acks, mut last_server) = (0, 0, server_start);
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let sent = progress.sent.load(Ordering::Relaxed);
        let acked = progress.acks.load(Ordering::Relaxed);
        let summary = client.summary().ok();
        let server_rate = match (summary.as_ref(), last_server) {
            (Some(s), Some(last)) => format!("{}/s", s.counts.heartbeats.saturating_sub(last)),
            _ => "no reply".to_string(),
        };
        let online = summary.as_ref().map_or("?".to_string(), |s| s.counts.online.to_string());
        println!(
            "{:>5.1}s  sent {}/s  acked {}/s  server counted {server_rate}  online {online}",
            started.elapsed().as_secs_f64(),
            sent - last_sent,
            acked - last_acks,
        );
        (last_sent, last_acks) = (sent, acked);
        last_server = summary.map(|s| s.counts.heartbeats).or(last_server);
    }
    sender.join().map_err(|_| "sender thread panicked")?;
    // Give late acks and the server's counters a moment to settle.
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    acks.join().map_err(|_| "ack thread panicked")?;
    let elapsed = started.elapsed().as_secs_f64();
    let sent = progress.sent.load(Ordering::Relaxed);
    let acked = progress.acks.load(Ordering::Relaxed);
    let asked = if args.ack_every > 0 { sent.div_ceil(args.ack_every) } else { 0 };
    println!();
    println!(
        "sent       {sent} heartbeats from {} devices in {elapsed:.1} s ({:.0}/s)",
        args.devices,
        sent as f64 / elapsed
    );
    println!("send errors {}", progress.send_errors.load(Ordering::Relaxed));
    println!("acks       {acked} of {asked} asked");
    match (server_start, client.summary()) {
        (Some(start), Ok(end)) => {
            let counted = end.counts.heartbeats - start;
            println!(
                "server     counted {counted} ({:.2}% of sent; other senders count too), {} dropped in all",
                counted as f64 * 100.0 / sent.max(1) as f64,
                end.total_drops()
            );
        }
        _ => println!("server     no summary (is this source allowed to query? see --key-file)"),
    }
    Ok(())
}
