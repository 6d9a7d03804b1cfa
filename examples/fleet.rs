//! A fleet simulator: N devices from one process, each beating at the same
//! interval with its phase spread evenly, all from one UDP socket (devices
//! are identified by id, not by address).
//!
//! ```text
//! cargo run --release --example fleet -- --devices 10000 --interval 10s --duration 30s
//! ```
//! Sends only to the server address given (default 127.0.0.1:7787). At the
//! end it reports what the server itself counted (heartbeats accepted, and
//! drops by reason), since a datagram that is sent may still be refused.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use presence::auth::{self, Key};
use presence::client::{Client, SummaryReport};
use presence::keyfile::KeyFile;
use presence::wire::{self, Heartbeat, Leave, Message};

/// Encodes `message`, signed with `key` if there is one.
fn encode(message: &Message<'_>, key: Option<&Key>, buf: &mut [u8]) -> Result<usize, wire::Error> {
    match key {
        Some(key) => auth::encode_signed(message, key, buf),
        None => wire::encode(message, buf),
    }
}

/// Simulates many devices sending heartbeats.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:7787")]
    server: SocketAddr,
    /// How many devices.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Each device's interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long to run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Id prefix; device i is PREFIX-i.
    #[arg(long, default_value = "fleet")]
    prefix: String,
    /// Send a Leave for every device at the end.
    #[arg(long)]
    leave: bool,
    /// Sign as every device, deriving each device's key from this master key
    /// file (a simulator may; a real device holds only its own key).
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

/// The server's summary, asked with the operator key if there is one.
fn summary(
    server: SocketAddr,
    operator: Option<Key>,
) -> Result<SummaryReport, presence::client::ClientError> {
    let mut client = Client::new(server, Duration::from_secs(2))?;
    if let Some(key) = operator {
        client = client.with_operator_key(key);
    }
    client.summary()
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let socket = UdpSocket::bind(if args.server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(args.server)?;
    // A boot larger than any used before on this machine (as `presence beat` picks it),
    // so two runs within one second are not replays of each other.
    let boot = presence::client::BootCounter::default_location()
        .and_then(|counter| counter.next())
        .unwrap_or_else(|_| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32));
    let ids: Vec<String> = (0..args.devices).map(|i| format!("{}-{i}", args.prefix)).collect();
    let keys: Option<Vec<Key>> = match &args.key_file {
        None => None,
        Some(path) => match KeyFile::read(path).map_err(std::io::Error::other)? {
            KeyFile::Master(master) => Some(ids.iter().map(|id| auth::device_key(&master, id)).collect()),
            other => {
                return Err(std::io::Error::other(format!("--key-file needs the master key, not {other:?}")));
            }
        },
    };
    let key = |i: usize| keys.as_ref().map(|keys| &keys[i]);
    let operator = match &args.key_file {
        Some(path) => match KeyFile::read(path).map_err(std::io::Error::other)? {
            KeyFile::Master(master) => Some(auth::operator_key(&master)),
            _ => None,
        },
        None => None,
    };
    let before = summary(args.server, operator);
    let interval_ms = u32::try_from(args.interval.as_millis()).unwrap_or(u32::MAX);
    let n = u64::from(args.devices.max(1));
    let started = Instant::now();
    let mut frame = [0u8; wire::MAX_DATAGRAM];
    let mut sent = 0u64;
    let mut errors = 0u64;
    println!(
        "{} devices every {} to {} for {}",
        args.devices,
        humantime::format_duration(args.interval),
        args.server,
        humantime::format_duration(args.duration)
    );
    while started.elapsed() < args.duration {
        // Heartbeats are due at an even rate: n per interval.
        let elapsed = started.elapsed();
        let due = (elapsed.as_nanos() * u128::from(n) / args.interval.as_nanos().max(1)) as u64 + 1;
        while sent < due {
            let i = (sent % n) as usize;
            let seq = (sent / n) as u32 + 1;
            let hb = Heartbeat::new(&ids[i], boot, seq, interval_ms);
            let len = encode(&Message::Heartbeat(hb), key(i), &mut frame).expect("valid frame");
            if socket.send(&frame[..len]).is_err() {
                errors += 1;
            }
            sent += 1;
        }
        let next = Duration::from_nanos((args.interval.as_nanos() * u128::from(sent) / u128::from(n)) as u64);
        std::thread::sleep(next.saturating_sub(started.elapsed()).min(Duration::from_millis(50)));
    }
    if args.leave {
        for (i, device) in ids.iter().enumerate() {
            // One past the highest seq any device used: new to the replay window.
            let seq = (sent / n) as u32 + 2;
            let leave = Leave { device, boot, seq, tag: None };
            let len = encode(&Message::Leave(leave), key(i), &mut frame).expect("valid frame");
            let _ = socket.send(&frame[..len]);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("sent {sent} heartbeats ({errors} send errors) in {secs:.1} s: {:.0}/s", sent as f64 / secs);
    // What the server made of them: datagrams in flight are counted within a moment.
    let mut after = summary(args.server, operator);
    let wait_until = Instant::now() + Duration::from_secs(2);
    while let (Ok(b), Ok(a)) = (&before, &after) {
        if a.counts.heartbeats - b.counts.heartbeats >= sent || Instant::now() > wait_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = summary(args.server, operator);
    }
    match (before, after) {
        (Ok(before), Ok(after)) => {
            let accepted = after.counts.heartbeats - before.counts.heartbeats;
            let drops: Vec<String> = after
                .drops
                .iter()
                .filter_map(|(reason, n)| {
                    let new = n - before.drops.get(reason).copied().unwrap_or(0);
                    (new > 0).then(|| format!("{reason} {new}"))
                })
                .collect();
            println!(
                "the server accepted {accepted} of them; dropped meanwhile: {}",
                if drops.is_empty() { "none".to_string() } else { drops.join(", ") }
            );
            if accepted < sent {
                println!(
                    "{} were not accepted (a server with a key drops unsigned heartbeats: give --key-file)",
                    sent - accepted
                );
            }
        }
        (Err(e), _) | (_, Err(e)) => println!("the server's own counts are unknown: {e}"),
    }
    Ok(())
}
