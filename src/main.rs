//! The `presence` binary: parses flags, sets up logging, and calls the library.

use std::io::{self, BufWriter, IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use ipnet::IpNet;
use presence::auth::{self, Key};
use presence::client::{Client, DeviceReport, Sender, SummaryReport, printable};
use presence::keyfile::{KeyFile, parse_hex_key, to_hex};
use presence::server::{self, EventLog, Stop};
use presence::tracker::{AuthMode, Config, Keys, MAX_TTL, MIN_TTL, Totals, Tracker};

/// Exit code for errors (bad flags, no reply, ...). 1 is kept for "offline".
const EXIT_ERROR: u8 = 2;

/// A lightweight presence tracker over UDP.
#[derive(Debug, Parser)]
#[command(name = "presence", version, about)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value = "text", env = "PRESENCE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tracker.
    Serve(ServeArgs),
    /// Send heartbeats as a device would (Ctrl-C sends a Leave).
    Beat(BeatArgs),
    /// Ask a server for a summary, one device, or the online list.
    Status(StatusArgs),
    /// Write a new random master secret to a file (mode 0600).
    Keygen(KeygenArgs),
    /// Print (or write) the key of one device, or the operator key, derived from the master.
    DeriveKey(DeriveKeyArgs),
}

#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// Where to write the master secret; an existing file is never overwritten.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct DeriveKeyArgs {
    /// The master key file (from `presence keygen`).
    #[arg(long, env = "PRESENCE_KEY_FILE")]
    key_file: PathBuf,
    /// The device whose key to derive.
    #[arg(long, required_unless_present = "operator", conflicts_with = "operator")]
    id: Option<String>,
    /// Derive the operator key (signs status queries) instead.
    #[arg(long)]
    operator: bool,
    /// Write a key file (mode 0600) instead of printing the key in hex.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on; [::]:PORT listens on IPv6 and IPv4.
    #[arg(long, default_value = "127.0.0.1:7787", env = "PRESENCE_BIND")]
    bind: SocketAddr,
    /// TTL of devices that declare no interval.
    #[arg(long, default_value = "30s", value_parser = parse_ttl, env = "PRESENCE_TIMEOUT")]
    timeout: Duration,
    /// A device is offline after this many missed intervals.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_MISSES")]
    misses: u32,
    /// Smallest TTL given to a device that declares an interval.
    #[arg(long, default_value = "1s", value_parser = parse_ttl, env = "PRESENCE_MIN_TTL")]
    min_ttl: Duration,
    /// Largest TTL given to a device that declares an interval.
    #[arg(long, default_value = "1h", value_parser = parse_ttl, env = "PRESENCE_MAX_TTL")]
    max_ttl: Duration,
    /// Socket receive buffer to ask for (SO_RCVBUF), e.g. 8MiB, 512KiB, 262144.
    #[arg(long, default_value = "8MiB", value_parser = parse_size, env = "PRESENCE_RECV_BUFFER")]
    recv_buffer: usize,
    /// Write one JSON line per online/offline transition to this file (appended), or - for stdout.
    #[arg(long, env = "PRESENCE_EVENTS")]
    events: Option<String>,
    /// The master secret (from `presence keygen`): device and operator keys derive from it.
    #[arg(long, env = "PRESENCE_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Whether heartbeats and leaves must be signed [default: required with a key, off without].
    #[arg(long, value_enum, env = "PRESENCE_AUTH")]
    auth: Option<AuthArg>,
    /// Allow listening on a non-loopback address without authentication.
    #[arg(long, env = "PRESENCE_INSECURE")]
    insecure: bool,
    /// Sources that may query without the operator key (CIDRs or addresses, comma-separated; "none" for none).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.0/8,::1/128", value_parser = parse_net, env = "PRESENCE_QUERY_ALLOW")]
    query_allow: Vec<Option<IpNet>>,
    /// Most devices held, online or offline; when full, the longest-silent offline device makes room.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..), env = "PRESENCE_MAX_DEVICES")]
    max_devices: u64,
    /// Status queries per second allowed from one source address.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_RATE")]
    query_rate: u32,
    /// Status queries a quiet source may send at once.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_BURST")]
    query_burst: u32,
    /// Threads, each with its own socket (SO_REUSEPORT) and a share of the devices by id (--max-devices is split evenly).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), env = "PRESENCE_THREADS")]
    threads: u16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AuthArg {
    Required,
    Optional,
    Off,
}

fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
    let s = s.trim();
    if s == "none" || s.is_empty() {
        return Ok(None);
    }
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(Some)
        .map_err(|_| format!("'{s}' is not a CIDR (like 10.0.0.0/8) or an address"))
}

#[derive(Debug, clap::Args)]
struct BeatArgs {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    server: String,
    /// The device id (1 to 64 bytes of UTF-8).
    #[arg(long)]
    id: String,
    /// Time between heartbeats; it is also declared to the server.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    interval: Duration,
    /// Payload text sent with each heartbeat (at most 64 bytes).
    #[arg(long, conflicts_with = "payload_hex")]
    payload: Option<String>,
    /// Payload as hex, e.g. 01ff (at most 64 bytes).
    #[arg(long)]
    payload_hex: Option<String>,
    /// Stop after this many heartbeats (without a Leave, so the device then expires).
    #[arg(long)]
    count: Option<u64>,
    /// Ask the server to acknowledge each heartbeat, and print the acks.
    #[arg(long)]
    ack: bool,
    /// Boot epoch to send (default: the current Unix time in seconds, new each run).
    #[arg(long)]
    boot: Option<u32>,
    /// Sign heartbeats with this device key (64 hex digits, from `presence derive-key`).
    #[arg(long, conflicts_with = "key_file", value_parser = parse_hex_key, env = "PRESENCE_DEVICE_KEY")]
    key_hex: Option<Key>,
    /// Sign heartbeats with the device key in this file (from `presence derive-key --out`).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    server: String,
    /// One device: exit 0 if it is online, 1 if offline or unknown.
    #[arg(conflicts_with = "list")]
    device: Option<String>,
    /// List every online device (following pages).
    #[arg(long)]
    list: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Give up when no reply comes within this time.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Sign queries as the operator: a master or operator key file.
    #[arg(long, env = "PRESENCE_KEY_FILE")]
    key_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 10s, 500ms, 1m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Parses a TTL: a duration from 1 ms to 49 days 17 h (TTLs travel as
/// 32-bit milliseconds, and are kept in whole milliseconds).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_TTL {
        return Err(format!("{s} is shorter than 1ms, the smallest TTL (TTLs are whole milliseconds)"));
    }
    if d > MAX_TTL {
        return Err(format!(
            "{s} is longer than {}, the longest TTL (TTLs travel as 32-bit milliseconds)",
            humantime::format_duration(MAX_TTL)
        ));
    }
    Ok(d)
}

/// Parses a byte size: a number with an optional K/M/G (powers of 1024) suffix,
/// written KiB, K or k (and likewise for M and G).
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: usize = number.parse().map_err(|_| format!("'{s}' is not a size (try 8MiB or 262144)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit '{other}' (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|n| *n > 0 && *n <= i32::MAX as usize)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

fn resolve(server: &str) -> Result<SocketAddr> {
    server
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve server address '{server}'"))?
        .next()
        .ok_or_else(|| anyhow!("'{server}' resolves to no address"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's own message without the usage block.
            let rendered = e.render().to_string();
            let line = rendered.lines().find(|l| !l.trim().is_empty()).unwrap_or("error: invalid arguments");
            eprintln!("{line}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Beat(args) => beat(args),
        Command::Status(args) => status(args),
        Command::Keygen(args) => keygen(args),
        Command::DeriveKey(args) => derive_key(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Starts a thread that turns SIGINT/SIGTERM into `on_signal` calls (once).
fn on_signal(on_signal: impl FnOnce() + Send + 'static) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "stopping");
                on_signal();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    if args.min_ttl > args.max_ttl {
        bail!(
            "--min-ttl ({}) is larger than --max-ttl ({})",
            humantime::format_duration(args.min_ttl),
            humantime::format_duration(args.max_ttl)
        );
    }
    let keys = match &args.key_file {
        None => None,
        Some(path) => match KeyFile::read(path)? {
            KeyFile::Master(master) => Some(Keys::from_master(&master)),
            other => {
                bail!("{}: the server needs the master key, not {}", path.display(), other.kind_phrase())
            }
        },
    };
    let auth = match (args.auth, &keys) {
        (Some(AuthArg::Required), _) => AuthMode::Required,
        (Some(AuthArg::Optional), _) => AuthMode::Optional,
        (Some(AuthArg::Off), _) | (None, None) => AuthMode::Off,
        (None, Some(_)) => AuthMode::Required,
    };
    if auth != AuthMode::Off && keys.is_none() {
        bail!(
            "--auth {} needs --key-file with the master key (create one with `presence keygen`)",
            auth_name(auth)
        );
    }
    if auth == AuthMode::Off && !args.bind.ip().is_loopback() && !args.insecure {
        bail!(
            "refusing to listen on {} without authentication: anyone who can reach it could forge heartbeats and leaves; give --key-file (see `presence keygen`), or --insecure if you mean it",
            args.bind
        );
    }
    if auth == AuthMode::Optional && !args.bind.ip().is_loopback() && !args.insecure {
        bail!(
            "refusing to listen on {} with --auth optional: anyone who can reach it could invent unsigned devices and forge unsigned heartbeats for devices that never signed; use --auth required once the fleet signs, or --insecure while it migrates",
            args.bind
        );
    }
    let config = Config {
        timeout: args.timeout,
        misses: args.misses,
        min_ttl: args.min_ttl,
        max_ttl: args.max_ttl,
        auth,
        keys,
        max_devices: usize::try_from(args.max_devices).unwrap_or(usize::MAX),
        query_allow: args.query_allow.iter().flatten().copied().collect(),
        query_rate: args.query_rate,
        query_burst: args.query_burst,
        ..Config::default()
    };
    let mut events = match args.events.as_deref() {
        None => EventLog::none(),
        Some("-") => EventLog::to_writer(Box::new(BufWriter::new(io::stdout()))),
        Some(path) => EventLog::to_file(path).with_context(|| format!("cannot open events file '{path}'"))?,
    };
    let group = server::bind_group(args.bind, Some(args.recv_buffer), usize::from(args.threads))
        .with_context(|| format!("cannot listen on {}", args.bind))?;
    let steering = match server::steer_by_id(&group) {
        Ok(()) => group.len() > 1,
        Err(e) => {
            tracing::warn!(error = %e, "cannot steer datagrams to their owner's thread; handing them over instead");
            false
        }
    };
    let bound = &group[0];
    if bound.recv_buffer < args.recv_buffer {
        tracing::warn!(
            requested = args.recv_buffer,
            granted = bound.recv_buffer,
            "the kernel granted a smaller receive buffer than asked; raise net.core.rmem_max to get it"
        );
    }
    tracing::info!(
        addr = %bound.local_addr,
        recv_buffer = bound.recv_buffer,
        threads = args.threads,
        steering,
        timeout = %humantime::format_duration(config.timeout),
        misses = config.misses,
        min_ttl = %humantime::format_duration(config.min_ttl),
        max_ttl = %humantime::format_duration(config.max_ttl),
        auth = auth_name(config.auth),
        max_devices = config.max_devices,
        "listening"
    );
    let stop = Stop::new();
    let signal_stop = stop.clone();
    on_signal(move || signal_stop.stop())?;
    let trackers = Tracker::new_sharded(config, group.len(), Instant::now(), SystemTime::now())?;
    let sockets: Vec<_> = group.into_iter().map(|bound| bound.socket).collect();
    let finished =
        server::run_sharded(&sockets, trackers, &stop, &mut events).context("server loop failed")?;
    let mut totals = Totals::default();
    for tracker in &finished.trackers {
        totals.add(&tracker.totals());
    }
    tracing::info!(
        online = totals.online,
        known = totals.known,
        heartbeats = totals.counters.heartbeats,
        dropped = totals.counters.total_drops(),
        handed_over = finished.handed_over,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_hex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--payload-hex must be an even number of hex digits");
    }
    Ok((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0)).collect())
}

fn beat(args: BeatArgs) -> Result<ExitCode> {
    let server = resolve(&args.server)?;
    let boot = match args.boot {
        Some(boot) => boot,
        None => SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32),
    };
    let mut sender = Sender::new(server, &args.id, args.interval, boot).context("invalid --id")?;
    let key = match (&args.key_hex, &args.key_file) {
        (Some(key), _) => Some(*key),
        (None, Some(path)) => match KeyFile::read(path)? {
            KeyFile::Device(key, id) if id == args.id => Some(key),
            KeyFile::Device(_, id) => {
                bail!(
                    "{} holds the key of '{}', not of '{}'",
                    path.display(),
                    printable(&id),
                    printable(&args.id)
                )
            }
            other => {
                bail!("{}: a device needs its own device key, not {}", path.display(), other.kind_phrase())
            }
        },
        (None, None) => None,
    };
    if let Some(key) = key {
        sender = sender.with_key(key);
    }
    let payload = match (&args.payload, &args.payload_hex) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(hex)) => parse_hex(hex)?,
        (None, None) => Vec::new(),
    };
    sender.set_payload(&payload).context("invalid payload")?;
    let (interrupt_tx, interrupt) = mpsc::channel();
    on_signal(move || {
        let _ = interrupt_tx.send(());
    })?;
    println!(
        "beating as '{}' to {server} every {} (boot {boot})",
        printable(&args.id),
        humantime::format_duration(args.interval)
    );
    let started = Instant::now();
    let mut acked = 0u64;
    let mut sent = 0u64;
    let mut next = started;
    loop {
        if args.count.is_some_and(|count| sent >= count) {
            break;
        }
        match interrupt.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                sender.leave().context("cannot send leave")?;
                println!("sent leave");
                return Ok(ExitCode::SUCCESS);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        next += args.interval;
        let (seq, len) = match sender.beat(args.ack) {
            Ok(sent) => sent,
            Err(e) => {
                eprintln!("warning: heartbeat not sent: {e}");
                continue;
            }
        };
        sent += 1;
        println!("heartbeat seq={seq} ({len} bytes)");
        if args.ack {
            let wait = args.interval.min(Duration::from_secs(1));
            match sender.wait_ack(seq, wait) {
                Ok(Some(ack)) => {
                    acked += 1;
                    println!(
                        "ack seq={}: server expects a heartbeat every {}, offline after {} of silence",
                        ack.seq,
                        fmt_ms(ack.interval_ms.into()),
                        fmt_ms(ack.ttl_ms.into())
                    );
                }
                Ok(None) => {
                    eprintln!("warning: no ack for seq={seq} within {}", humantime::format_duration(wait))
                }
                Err(e) => eprintln!("warning: no ack for seq={seq}: {e}"),
            }
        }
    }
    if args.ack && acked == 0 {
        bail!("the server acknowledged none of {sent} heartbeats");
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn status(args: StatusArgs) -> Result<ExitCode> {
    let server = resolve(&args.server)?;
    let mut client = Client::new(server, args.timeout).context("cannot open a socket")?;
    if let Some(path) = &args.key_file {
        let file = KeyFile::read(path)?;
        let key = file.operator_key().ok_or_else(|| {
            anyhow!("{}: queries need the master or operator key, not a device key", path.display())
        })?;
        client = client.with_operator_key(key);
    }
    let mut out = io::stdout().lock();
    if let Some(device) = &args.device {
        let report = client.device(device).with_context(|| format!("status of '{device}' from {server}"))?;
        let online = report.as_ref().is_some_and(|r| r.online);
        if args.json {
            match &report {
                Some(report) => serde_json::to_writer_pretty(&mut out, report)?,
                None => serde_json::to_writer_pretty(
                    &mut out,
                    &serde_json::json!({ "device": device, "known": false }),
                )?,
            }
            writeln!(out)?;
        } else {
            match &report {
                Some(report) => write_device(&mut out, report)?,
                None => writeln!(out, "{}  unknown (the server has not heard from it)", printable(device))?,
            }
        }
        return Ok(if online { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if args.list {
        let devices = client.list_all().with_context(|| format!("online list from {server}"))?;
        if args.json {
            serde_json::to_writer_pretty(&mut out, &devices)?;
            writeln!(out)?;
        } else {
            write_list(&mut out, &devices)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let summary = client.summary().with_context(|| format!("summary from {server}"))?;
    if args.json {
        serde_json::to_writer_pretty(&mut out, &summary)?;
        writeln!(out)?;
    } else {
        write_summary(&mut out, server, &summary)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_summary(out: &mut impl Write, server: SocketAddr, s: &SummaryReport) -> io::Result<()> {
    writeln!(out, "server      {server}, up {}", fmt_ms(s.uptime_ms / 1000 * 1000))?;
    writeln!(out, "online      {} of {} known devices", s.online, s.known)?;
    writeln!(out, "received    {} heartbeats, {} leaves, {} queries", s.heartbeats, s.leaves, s.queries)?;
    writeln!(out, "expired     {}", s.expirations)?;
    if s.events_lost > 0 {
        writeln!(out, "events      {} lost (the server could not write them; see its log)", s.events_lost)?;
    }
    if s.drops.is_empty() {
        writeln!(out, "dropped     0")?;
    } else {
        let reasons: Vec<String> = s.drops.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        writeln!(out, "dropped     {} ({})", s.total_drops(), reasons.join(", "))?;
    }
    Ok(())
}

fn payload_text(report: &DeviceReport) -> String {
    let payload = report.payload();
    match std::str::from_utf8(&payload) {
        Ok(text) if !text.chars().any(char::is_control) => {
            format!("{text:?} (hex {})", report.payload_hex)
        }
        _ => format!("hex {}", report.payload_hex),
    }
}

fn write_device(out: &mut impl Write, r: &DeviceReport) -> io::Result<()> {
    let last_seen = UNIX_EPOCH + Duration::from_millis(r.last_seen_unix_ms);
    let device = printable(&r.device);
    if r.online {
        writeln!(out, "{device}  online, expires in {}", fmt_ms(r.expires_in_ms))?;
    } else {
        writeln!(out, "{device}  offline")?;
    }
    writeln!(out, "  address     {}", r.address)?;
    writeln!(
        out,
        "  last seen   {} ({} ago)",
        humantime::format_rfc3339_seconds(last_seen),
        fmt_ms(r.last_seen_ago_ms)
    )?;
    let interval =
        if r.interval_ms == 0 { "none declared".to_string() } else { fmt_ms(r.interval_ms.into()) };
    writeln!(out, "  interval    {interval}, ttl {}", fmt_ms(r.ttl_ms.into()))?;
    writeln!(out, "  boot {}  seq {}  heartbeats {}  flaps {}", r.boot, r.seq, r.heartbeats, r.flaps)?;
    if !r.payload_hex.is_empty() {
        writeln!(out, "  payload     {}", payload_text(r))?;
    }
    Ok(())
}

fn write_list(out: &mut impl Write, devices: &[DeviceReport]) -> io::Result<()> {
    let width = devices.iter().map(|d| printable(&d.device).chars().count()).max().unwrap_or(6).max(6);
    writeln!(
        out,
        "{:<width$}  {:<22}  {:>10}  {:>10}  {:>10}",
        "DEVICE", "ADDRESS", "LAST SEEN", "EXPIRES", "HEARTBEATS"
    )?;
    for d in devices {
        writeln!(
            out,
            "{:<width$}  {:<22}  {:>10}  {:>10}  {:>10}",
            printable(&d.device),
            d.address.to_string(),
            format!("{}s ago", d.last_seen_ago_ms / 1000),
            format!("in {}s", d.expires_in_ms.div_ceil(1000)),
            d.heartbeats
        )?;
    }
    writeln!(out, "{} online", devices.len())
}

fn auth_name(auth: AuthMode) -> &'static str {
    match auth {
        AuthMode::Required => "required",
        AuthMode::Optional => "optional",
        AuthMode::Off => "off",
    }
}

fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    let master = presence::keyfile::generate_master().context("cannot read the OS random source")?;
    KeyFile::Master(master).write_new(&args.out)?;
    println!("wrote a new master key to {} (mode 0600)", args.out.display());
    println!("derive device keys with: presence derive-key --key-file {} --id DEVICE", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn derive_key(args: DeriveKeyArgs) -> Result<ExitCode> {
    let master = match KeyFile::read(&args.key_file)? {
        KeyFile::Master(master) => master,
        other => {
            bail!("{}: derive-key needs the master key, not {}", args.key_file.display(), other.kind_phrase())
        }
    };
    let file = match &args.id {
        Some(id) => {
            if id.is_empty() || id.len() > presence::wire::MAX_ID_LEN {
                bail!("--id must be 1 to {} bytes", presence::wire::MAX_ID_LEN);
            }
            KeyFile::Device(auth::device_key(&master, id), id.clone())
        }
        None => KeyFile::Operator(auth::operator_key(&master)),
    };
    match &args.out {
        Some(path) => {
            file.write_new(path)?;
            println!("wrote the {} key to {} (mode 0600)", file.kind(), path.display());
        }
        None => match &file {
            KeyFile::Device(key, _) | KeyFile::Operator(key) => println!("{}", to_hex(key)),
            KeyFile::Master(_) => {}
        },
    }
    Ok(ExitCode::SUCCESS)
}
