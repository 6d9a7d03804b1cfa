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
use presence::server::{self, Stop};
use presence::sink::{JsonLines, Sink};
use presence::tracker::{AuthMode, Config, Keys, MAX_TTL, MIN_TTL, Totals, Tracker};
use presence::wire::ListFilter;

/// Prints a line on stdout; unlike `println!`, a closed stdout is an error
/// to return (and end quietly on), not a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(io::stdout(), $($arg)*)
    };
}

/// Exit code for errors (bad flags, no reply, ...). 1 is kept for "offline".
const EXIT_ERROR: u8 = 2;

/// Default `--query-rate`: listing a million devices takes about 35 000
/// pages, so allowed sources and operators may ask quickly (a page costs the
/// server a few microseconds); sources outside `--query-allow` without the
/// operator key get no bucket at all.
const DEFAULT_QUERY_RATE: u32 = 5_000;
/// Default `--query-burst`.
const DEFAULT_QUERY_BURST: u32 = 10_000;

/// A lightweight presence tracker over UDP: devices send heartbeats, the
/// server knows who is alive.
#[derive(Debug, Parser)]
#[command(
    name = "presence",
    version,
    about,
    arg_required_else_help = true,
    after_help = "Examples:\n  presence serve                          run the tracker on 127.0.0.1:7787\n  presence beat --id boiler-7 --ack       send heartbeats as device boiler-7\n  presence status --list                  list who is online\n\nSee `presence COMMAND --help` for each command's flags."
)]
struct Cli {
    /// Log format on stderr (text or json). The level is set with RUST_LOG (info unless set).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text",
        env = "PRESENCE_LOG_FORMAT"
    )]
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
    #[command(
        after_help = "Examples:\n  presence serve\n  presence keygen --out /etc/presence/master.key\n  presence serve --bind [::]:7787 --key-file /etc/presence/master.key --events /var/lib/presence/events.jsonl\n  presence serve --timeout 2m --misses 5 --threads 2"
    )]
    Serve(ServeArgs),
    /// Send heartbeats as a device would (Ctrl-C sends a Leave).
    #[command(
        after_help = "Examples:\n  presence beat --id boiler-7 --interval 5s --ack\n  presence beat --id boiler-7 --count 1 --payload \"fw=1.4.2\"\n  presence beat --id boiler-7 --key-file boiler-7.key --server tracker.example:7787"
    )]
    Beat(BeatArgs),
    /// Ask a server for a summary, one device, or the online list.
    #[command(
        after_help = "Examples:\n  presence status                          the server's summary\n  presence status boiler-7                 one device (exit 0 if online, 1 if not)\n  presence status --list --json            every online device, as JSON\n  presence status --server tracker.example:7787 --key-file operator.key --list"
    )]
    Status(StatusArgs),
    /// Write a new random master secret to a file (mode 0600).
    #[command(after_help = "Example:\n  presence keygen --out /etc/presence/master.key")]
    Keygen(KeygenArgs),
    /// Print (or write) the key of one device, or the operator key, derived from the master.
    #[command(
        after_help = "Examples:\n  presence derive-key --key-file /etc/presence/master.key --id boiler-7\n  presence derive-key --key-file /etc/presence/master.key --id boiler-7 --out boiler-7.key\n  presence derive-key --key-file /etc/presence/master.key --operator --out operator.key"
    )]
    DeriveKey(DeriveKeyArgs),
}

#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// Where to write the master secret (its directory is created, mode 0700); an existing file is never overwritten.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct DeriveKeyArgs {
    /// The master key file (from `presence keygen`).
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
    key_file: PathBuf,
    /// The device whose key to derive.
    #[arg(long, value_name = "ID", required_unless_present = "operator", conflicts_with = "operator")]
    id: Option<String>,
    /// Derive the operator key (signs status queries) instead.
    #[arg(long)]
    operator: bool,
    /// Write a key file (mode 0600) instead of printing the key in hex.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on; [::]:PORT listens on IPv6 and IPv4.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_BIND")]
    bind: SocketAddr,
    /// Device TTL: how long a device that declares no interval stays online after its last heartbeat (1ms to 49days).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_ttl, env = "PRESENCE_TIMEOUT")]
    timeout: Duration,
    /// A device is offline after this many missed intervals.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_MISSES")]
    misses: u32,
    /// Smallest TTL given to a device that declares an interval.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_ttl, env = "PRESENCE_MIN_TTL")]
    min_ttl: Duration,
    /// Largest TTL given to a device that declares an interval.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_ttl, env = "PRESENCE_MAX_TTL")]
    max_ttl: Duration,
    /// Socket receive buffer to ask for (SO_RCVBUF), e.g. 8MiB, 512KiB, 262144; Linux caps it at net.core.rmem_max.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size, env = "PRESENCE_RECV_BUFFER")]
    recv_buffer: usize,
    /// Write one JSON line per online/offline transition to this file (appended), or - for stdout.
    #[arg(long, value_name = "PATH", env = "PRESENCE_EVENTS")]
    events: Option<String>,
    /// The master secret (from `presence keygen`): device and operator keys derive from it.
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Whether heartbeats and leaves must be signed [default: required with a key, off without].
    #[arg(long, value_enum, env = "PRESENCE_AUTH")]
    auth: Option<AuthArg>,
    /// Allow listening on a non-loopback address with --auth off or optional.
    #[arg(long, env = "PRESENCE_INSECURE")]
    insecure: bool,
    /// Sources that may query without the operator key (CIDRs or addresses, comma-separated; "none" for none).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128", value_parser = parse_net, env = "PRESENCE_QUERY_ALLOW")]
    query_allow: Vec<Option<IpNet>>,
    /// Most devices held, online or offline; when full, the longest-silent offline device makes room.
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..), env = "PRESENCE_MAX_DEVICES")]
    max_devices: u64,
    /// Status queries per second allowed from one source (an IPv4 address or IPv6 /64), for the whole server.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUERY_RATE, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_RATE")]
    query_rate: u32,
    /// Status queries a quiet source may send at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUERY_BURST, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_BURST")]
    query_burst: u32,
    /// Threads, each with its own socket (SO_REUSEPORT) and a share of the devices by id (--max-devices is split evenly).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), env = "PRESENCE_THREADS")]
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
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    server: String,
    /// The device id (1 to 64 bytes of UTF-8, no control characters).
    #[arg(long, value_name = "ID", env = "PRESENCE_ID")]
    id: String,
    /// Time between heartbeats; it is also declared to the server.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration, env = "PRESENCE_INTERVAL")]
    interval: Duration,
    /// Payload text sent with each heartbeat (at most 64 bytes).
    #[arg(long, value_name = "TEXT", conflicts_with = "payload_hex")]
    payload: Option<String>,
    /// Payload as hex, e.g. 01ff (at most 64 bytes).
    #[arg(long, value_name = "HEX")]
    payload_hex: Option<String>,
    /// Stop after this many heartbeats (without a Leave, so the device then expires).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Ask the server to acknowledge each heartbeat, and print the acks.
    #[arg(long)]
    ack: bool,
    /// Boot epoch to send [default: larger than any this machine used before (a counter kept in the state directory), at least the Unix time in seconds].
    #[arg(long, value_name = "N")]
    boot: Option<u32>,
    /// Sign heartbeats with this device key (64 hex digits, from `presence derive-key`).
    #[arg(long, value_name = "HEX", conflicts_with = "key_file", value_parser = parse_hex_key, env = "PRESENCE_DEVICE_KEY", hide_env_values = true)]
    key_hex: Option<Key>,
    /// Sign heartbeats with the device key in this file (from `presence derive-key --out`).
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The server's address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    server: String,
    /// One device: exit 0 if it is online, 1 if offline or unknown.
    #[arg(value_name = "DEVICE", conflicts_with_all = ["list", "offline", "all", "prefix", "count"])]
    device: Option<String>,
    /// List every online device (following pages; progress on stderr for long listings).
    #[arg(long)]
    list: bool,
    /// List the offline devices the server holds instead (implies --list).
    #[arg(long, conflicts_with = "all")]
    offline: bool,
    /// List every device the server holds, online or offline (implies --list).
    #[arg(long)]
    all: bool,
    /// Only devices whose id starts with PREFIX (implies --list; the server filters).
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Print only how many devices the listing has (the server counts them; implies --list).
    #[arg(long)]
    count: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Reply wait: give up on a query when no reply comes within this time (not the device TTL of `serve --timeout`).
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration, env = "PRESENCE_REPLY_TIMEOUT")]
    timeout: Duration,
    /// Sign queries as the operator: a master or operator key file.
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
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
        Err(e) => {
            // clap's whole message: what is wrong, its tips, the usage and
            // the pointer to --help (or the help itself, for a bare `presence`).
            let _ = e.print();
            let code = if e.use_stderr() { EXIT_ERROR } else { 0 };
            return ExitCode::from(code);
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
        // Whoever read our output went away (`presence status --list | head`): end quietly.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Whether `e` is (caused by) a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
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
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    match args.events.as_deref() {
        None => {}
        Some("-") => sinks.push(Box::new(JsonLines::to_writer(Box::new(BufWriter::new(io::stdout()))))),
        Some(path) => sinks.push(Box::new(
            JsonLines::to_file(path).with_context(|| format!("cannot open events file '{path}'"))?,
        )),
    }
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
            "the kernel capped the receive buffer below --recv-buffer (at net.core.rmem_max); datagrams may be dropped in bursts. Raise the cap with: sysctl -w net.core.rmem_max={}",
            args.recv_buffer
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
    let finished = server::run_sharded(&sockets, trackers, &stop, sinks).context("server loop failed")?;
    let mut totals = Totals::default();
    for tracker in &finished.trackers {
        totals.add(&tracker.totals());
    }
    tracing::info!(
        online = totals.online,
        known = totals.known,
        heartbeats = totals.counters.heartbeats(),
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
        None => match presence::client::BootCounter::default_location().and_then(|c| c.next()) {
            Ok(boot) => boot,
            Err(e) => {
                let boot = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32);
                eprintln!(
                    "warning: cannot keep a boot counter ({e:#}); using the Unix time {boot}, so a second run within this second would be refused as a replay (give --boot)"
                );
                boot
            }
        },
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
    let signed = key.is_some();
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
    say!(
        "beating as '{}' to {server} every {} (boot {boot}{})",
        printable(&args.id),
        humantime::format_duration(args.interval),
        if signed { ", signed" } else { ", unsigned" }
    )?;
    if !args.ack {
        say!("(no acks asked: add --ack to see whether the server accepts the heartbeats)")?;
    }
    let started = Instant::now();
    let mut acked = 0u64;
    let mut sent = 0u64;
    let mut next = started;
    let mut warned_ttl = false;
    loop {
        if args.count.is_some_and(|count| sent >= count) {
            break;
        }
        match interrupt.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                sender.leave().context("cannot send leave")?;
                say!("sent leave")?;
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
        say!("heartbeat seq={seq} ({len} bytes)")?;
        if args.ack {
            let wait = args.interval.min(Duration::from_secs(1));
            match sender.wait_ack(seq, wait) {
                Ok(Some(ack)) => {
                    acked += 1;
                    say!(
                        "ack seq={}: server expects a heartbeat every {}, offline after {} of silence",
                        ack.seq,
                        fmt_ms(ack.interval_ms.into()),
                        fmt_ms(ack.ttl_ms.into())
                    )?;
                    let ttl = Duration::from_millis(ack.ttl_ms.into());
                    if ttl < args.interval && !warned_ttl {
                        warned_ttl = true;
                        eprintln!(
                            "WARNING: the server takes this device offline after {} of silence, but it beats every {}: it will go offline between heartbeats. Beat more often (--interval {} or less), or raise the server's --max-ttl.",
                            fmt_ms(ack.ttl_ms.into()),
                            humantime::format_duration(args.interval),
                            fmt_ms(u64::from(ack.ttl_ms) / 2)
                        );
                    }
                }
                Ok(None) => {
                    eprintln!("warning: no ack for seq={seq} within {}", humantime::format_duration(wait))
                }
                Err(e) => eprintln!("warning: no ack for seq={seq}: {e}"),
            }
        }
    }
    if args.ack && acked == 0 {
        bail!(
            "the server acknowledged none of {sent} heartbeats. It drops without a reply what it refuses: {}a boot/seq it has seen (another run with the same --boot), a full table (--max-devices), or nothing listening at {server}. Its drop counters say which: presence status --server {server}",
            if signed {
                "a wrong key (not this device's, or from another master), "
            } else {
                "unsigned heartbeats (a server with --key-file requires signed ones: give --key-file or --key-hex), "
            }
        );
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
                None => serde_json::to_writer_pretty(&mut out, &unknown_device_json(device))?,
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
    if args.list || args.offline || args.all || args.prefix.is_some() || args.count {
        let (state, what) = match (args.offline, args.all) {
            (true, _) => (presence::wire::LIST_OFFLINE, "offline"),
            (_, true) => (presence::wire::LIST_ALL, "known"),
            _ => (presence::wire::LIST_ONLINE, "online"),
        };
        let filter = ListFilter { state, prefix: args.prefix.as_deref(), count_only: false };
        if args.count {
            let count = client.count(filter).with_context(|| format!("count from {server}"))?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "count": count, "state": what, "prefix": args.prefix })
                )?;
            } else {
                writeln!(out, "{count}")?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        let devices =
            list_with_progress(&mut client, filter).with_context(|| format!("{what} list from {server}"))?;
        if args.json {
            serde_json::to_writer_pretty(&mut out, &devices)?;
            writeln!(out)?;
        } else {
            write_list(&mut out, &devices, what)?;
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

/// The JSON of a device the server does not know: the same keys as a
/// known device's, with `known: false` and nulls for what is not known.
fn unknown_device_json(device: &str) -> serde_json::Value {
    let keys = serde_json::to_value(DeviceReport {
        device: String::new(),
        known: false,
        online: false,
        offline_reason: None,
        offline_since_unix_ms: None,
        address: SocketAddr::from(([0, 0, 0, 0], 0)),
        last_seen_ago_ms: 0,
        last_seen_unix_ms: 0,
        expires_in_ms: 0,
        ttl_ms: 0,
        interval_ms: 0,
        boot: 0,
        seq: 0,
        heartbeats: 0,
        flaps: 0,
        payload_hex: String::new(),
    });
    let mut object = match keys {
        Ok(serde_json::Value::Object(object)) => object,
        _ => serde_json::Map::new(),
    };
    for (key, value) in object.iter_mut() {
        *value = match key.as_str() {
            "device" => device.into(),
            "known" | "online" => false.into(),
            _ => serde_json::Value::Null,
        };
    }
    serde_json::Value::Object(object)
}

/// The devices `filter` selects, page by page. A listing that takes more
/// than half a second shows its progress on stderr, on one line that it
/// rewrites when stderr is a terminal, and one line per second otherwise.
fn list_with_progress(
    client: &mut Client,
    filter: ListFilter<'_>,
) -> Result<Vec<DeviceReport>, presence::client::ClientError> {
    let terminal = io::stderr().is_terminal();
    let every = if terminal { Duration::from_millis(500) } else { Duration::from_secs(1) };
    let started = Instant::now();
    let mut shown = started;
    let devices = client.list(filter, |so_far| {
        if shown.elapsed() >= every {
            shown = Instant::now();
            let rate = so_far as f64 / started.elapsed().as_secs_f64();
            let line = format!("listing: {so_far} devices so far ({rate:.0}/s)");
            if terminal { eprint!("\r{line}") } else { eprintln!("{line}") }
        }
    })?;
    if shown != started {
        // On a terminal, overwrite the progress line (spaces clear its longer tail).
        let (start, pad) = if terminal { ("\r", "          ") } else { ("", "") };
        let took = fmt_ms(started.elapsed().as_millis() as u64);
        eprintln!("{start}listing: {} devices in {took}{pad}", devices.len());
    }
    Ok(devices)
}

/// `n` and the noun, in the singular for one.
fn count(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A duration in whole seconds, as humans write it (`59m 51s`).
fn fmt_secs(ms: u64) -> String {
    fmt_ms(ms.div_ceil(1000) * 1000)
}

fn write_summary(out: &mut impl Write, server: SocketAddr, s: &SummaryReport) -> io::Result<()> {
    writeln!(out, "server      {server}, up {}", fmt_ms(s.uptime_ms / 1000 * 1000))?;
    writeln!(out, "online      {} of {}", s.online, count(s.known, "known device", "known devices"))?;
    writeln!(
        out,
        "received    {}, {}, {}",
        count(s.heartbeats, "heartbeat", "heartbeats"),
        count(s.leaves, "leave", "leaves"),
        count(s.queries, "query", "queries")
    )?;
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
    match (r.online, r.offline_reason, r.offline_since_unix_ms) {
        (true, _, _) => writeln!(out, "{device}  online, expires in {}", fmt_ms(r.expires_in_ms))?,
        (false, Some("expired"), Some(since)) => writeln!(
            out,
            "{device}  offline since {} (expired: no heartbeat for {})",
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(since)),
            fmt_ms(r.ttl_ms.into())
        )?,
        (false, Some("left"), _) => {
            writeln!(out, "{device}  offline (left: it said goodbye after its last heartbeat)")?
        }
        (false, _, _) => writeln!(out, "{device}  offline")?,
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

fn write_list(out: &mut impl Write, devices: &[DeviceReport], what: &str) -> io::Result<()> {
    let width = devices.iter().map(|d| printable(&d.device).chars().count()).max().unwrap_or(6).max(6);
    writeln!(
        out,
        "{:<width$}  {:<22}  {:>13}  {:>13}  {:>10}",
        "DEVICE", "ADDRESS", "LAST SEEN", "EXPIRES", "HEARTBEATS"
    )?;
    for d in devices {
        writeln!(
            out,
            "{:<width$}  {:<22}  {:>13}  {:>13}  {:>10}",
            printable(&d.device),
            d.address.to_string(),
            format!("{} ago", fmt_ms(d.last_seen_ago_ms / 1000 * 1000)),
            format!("in {}", fmt_secs(d.expires_in_ms)),
            d.heartbeats
        )?;
    }
    writeln!(out, "{} {what}", devices.len())
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
    say!("wrote a new master key to {} (mode 0600)", args.out.display())?;
    say!("derive device keys with: presence derive-key --key-file {} --id DEVICE", args.out.display())?;
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
            say!("wrote the {} key to {} (mode 0600)", file.kind(), path.display())?;
        }
        None => match &file {
            KeyFile::Device(key, _) | KeyFile::Operator(key) => say!("{}", to_hex(key))?,
            KeyFile::Master(_) => {}
        },
    }
    Ok(ExitCode::SUCCESS)
}
