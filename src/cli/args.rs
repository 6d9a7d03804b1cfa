//! The command line: every subcommand's flags (clap), with their help,
//! environment variables and parsers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use presence::auth::Key;
use presence::keyfile::parse_hex_key;
use presence::tracker::{AuthMode, MAX_TTL, MIN_TTL};

/// Default `--query-rate`: listing a million devices takes about 35 000
/// pages, so allowed sources and operators may ask quickly (a page costs the
/// server a few microseconds); sources outside `--query-allow` without the
/// operator key get no bucket at all.
pub(crate) const DEFAULT_QUERY_RATE: u32 = 5_000;
/// Default `--query-burst`.
pub(crate) const DEFAULT_QUERY_BURST: u32 = 10_000;

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
pub(crate) struct Cli {
    /// Log format on stderr (text or json). The level is set with RUST_LOG (info unless set).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text",
        env = "PRESENCE_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the tracker.
    #[command(
        after_help = "Examples:\n  presence serve\n  presence keygen --out /etc/presence/master.key\n  presence serve --bind [::]:7787 --key-file /etc/presence/master.key --events /var/lib/presence/events.jsonl\n  presence serve --timeout 2m --misses 5 --threads 2"
    )]
    Serve(Box<ServeArgs>),
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
    /// Follow transitions live from NATS JetStream (a tracker run with --nats publishes them).
    #[command(
        after_help = "Examples:\n  presence watch --nats nats://127.0.0.1:4222\n  presence watch --nats nats://127.0.0.1:4222 boiler-7 --since 1h\n  presence watch --nats nats://127.0.0.1:4222 --json | jq ."
    )]
    Watch(WatchArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the master secret (its directory is created, mode 0700); an existing file is never overwritten.
    #[arg(long, value_name = "PATH")]
    pub(crate) out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeriveKeyArgs {
    /// The master key file (from `presence keygen`).
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
    pub(crate) key_file: PathBuf,
    /// The device whose key to derive.
    #[arg(long, value_name = "ID", required_unless_present_any = ["operator", "http_token"], conflicts_with = "operator")]
    pub(crate) id: Option<String>,
    /// Derive the operator key (signs status queries) instead.
    #[arg(long)]
    pub(crate) operator: bool,
    /// Print the HTTP API's bearer token (for clients of --metrics's /api that are not on loopback) instead.
    #[arg(long, conflicts_with_all = ["id", "operator", "out"])]
    pub(crate) http_token: bool,
    /// Write a key file (mode 0600) instead of printing the key in hex.
    #[arg(long, value_name = "PATH")]
    pub(crate) out: Option<PathBuf>,
}

/// NATS credentials, for `serve` and `watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct NatsAuthArgs {
    /// NATS user (with --nats-password, or PRESENCE_NATS_PASSWORD).
    #[arg(long, value_name = "USER", env = "PRESENCE_NATS_USER")]
    pub(crate) nats_user: Option<String>,
    /// NATS password; prefer the environment variable PRESENCE_NATS_PASSWORD.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "PRESENCE_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub(crate) nats_password: Option<String>,
    /// NATS token; prefer the environment variable PRESENCE_NATS_TOKEN.
    #[arg(long, value_name = "TOKEN", env = "PRESENCE_NATS_TOKEN", hide_env_values = true, conflicts_with_all = ["nats_user", "nats_creds"])]
    pub(crate) nats_token: Option<String>,
    /// NATS credentials file (JWT and NKey seed, from nsc).
    #[arg(long, value_name = "PATH", env = "PRESENCE_NATS_CREDS", conflicts_with = "nats_user")]
    pub(crate) nats_creds: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// The credentials the flags give.
    pub(crate) fn auth(&self) -> presence::sink::NatsAuth {
        use presence::sink::NatsAuth;
        match (&self.nats_user, &self.nats_password, &self.nats_token, &self.nats_creds) {
            (Some(user), password, _, _) => {
                NatsAuth::UserPassword(user.clone(), password.clone().unwrap_or_default())
            }
            (None, _, Some(token), _) => NatsAuth::Token(token.clone()),
            (None, _, None, Some(path)) => NatsAuth::CredentialsFile(path.clone()),
            (None, _, None, None) => NatsAuth::None,
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct WatchArgs {
    /// The NATS server the tracker publishes to (its --nats).
    #[arg(long, value_name = "URL", env = "PRESENCE_NATS")]
    pub(crate) nats: String,
    /// Only these devices (default: all).
    #[arg(value_name = "DEVICE")]
    pub(crate) devices: Vec<String>,
    /// Follow the fleet events of this cluster (trackers run with --cluster) instead.
    #[arg(long, value_name = "NAME", value_parser = parse_cluster_name)]
    pub(crate) cluster: Option<String>,
    /// Replay the transitions of this last stretch first (e.g. 10m), then follow.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub(crate) since: Option<Duration>,
    /// One JSON object per line (the events file's lines) instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) nats_names: NatsNamesArgs,
    #[command(flatten)]
    pub(crate) nats_auth: NatsAuthArgs,
}

/// Where the tracker's transitions are in NATS, for `serve` and `watch`.
#[derive(Debug, clap::Args)]
pub(crate) struct NatsNamesArgs {
    /// The JetStream stream's name.
    #[arg(long, value_name = "NAME", default_value = "PRESENCE", env = "PRESENCE_NATS_STREAM")]
    pub(crate) nats_stream: String,
    /// The subject prefix: a device's transitions go to PREFIX.<id made safe>.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "presence.events",
        env = "PRESENCE_NATS_SUBJECT_PREFIX"
    )]
    pub(crate) nats_subject_prefix: String,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; [::]:PORT listens on IPv6 and IPv4.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_BIND")]
    pub(crate) bind: SocketAddr,
    /// Device TTL: how long a device that declares no interval stays online after its last heartbeat (1ms to 49days).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_ttl, env = "PRESENCE_TIMEOUT")]
    pub(crate) timeout: Duration,
    /// A device is offline after this many missed intervals.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_MISSES")]
    pub(crate) misses: u32,
    /// Smallest TTL given to a device that declares an interval.
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_ttl, env = "PRESENCE_MIN_TTL")]
    pub(crate) min_ttl: Duration,
    /// Largest TTL given to a device that declares an interval.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_ttl, env = "PRESENCE_MAX_TTL")]
    pub(crate) max_ttl: Duration,
    /// Socket receive buffer to ask for (SO_RCVBUF), e.g. 8MiB, 512KiB, 262144; Linux caps it at net.core.rmem_max.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size, env = "PRESENCE_RECV_BUFFER")]
    pub(crate) recv_buffer: usize,
    /// Write one JSON line per online/offline transition to this file (appended), or - for stdout.
    #[arg(long, value_name = "PATH", env = "PRESENCE_EVENTS")]
    pub(crate) events: Option<String>,
    /// The master secret (from `presence keygen`): device and operator keys derive from it.
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
    pub(crate) key_file: Option<PathBuf>,
    /// Whether heartbeats and leaves must be signed [default: required with a key, off without].
    #[arg(long, value_name = "MODE", env = "PRESENCE_AUTH",
          value_parser = clap::builder::TypedValueParser::try_map(
              clap::builder::PossibleValuesParser::new(["required", "optional", "off"]),
              |mode| mode.parse::<AuthMode>()))]
    pub(crate) auth: Option<AuthMode>,
    /// Allow listening on a non-loopback address with --auth off or optional.
    #[arg(long, env = "PRESENCE_INSECURE")]
    pub(crate) insecure: bool,
    /// Sources that may query without the operator key (CIDRs or addresses, comma-separated; "none" for none).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', default_value = "127.0.0.0/8,::1/128", value_parser = parse_net, env = "PRESENCE_QUERY_ALLOW")]
    pub(crate) query_allow: Vec<Option<IpNet>>,
    /// Most devices held, online or offline; when full, the longest-silent offline device makes room.
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..), env = "PRESENCE_MAX_DEVICES")]
    pub(crate) max_devices: u64,
    /// Status queries per second allowed from one source (an IPv4 address or IPv6 /64), for the whole server.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUERY_RATE, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_RATE")]
    pub(crate) query_rate: u32,
    /// Status queries a quiet source may send at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUERY_BURST, value_parser = clap::value_parser!(u32).range(1..), env = "PRESENCE_QUERY_BURST")]
    pub(crate) query_burst: u32,
    /// Threads, each with its own socket (SO_REUSEPORT) and a share of the devices by id (--max-devices is split evenly).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), env = "PRESENCE_THREADS")]
    pub(crate) threads: u16,
    /// Publish transitions to NATS JetStream at this URL (nats://host:4222, tls://...; comma-separated for a cluster): a stream and a KV bucket of each device's state.
    #[arg(long, value_name = "URL", env = "PRESENCE_NATS")]
    pub(crate) nats: Option<String>,
    #[command(flatten)]
    pub(crate) nats_names: NatsNamesArgs,
    /// The KV bucket of each device's latest transition.
    #[arg(long, value_name = "NAME", default_value = "presence", env = "PRESENCE_NATS_BUCKET")]
    pub(crate) nats_bucket: String,
    #[command(flatten)]
    pub(crate) nats_auth: NatsAuthArgs,
    /// Join the fleet view NAME that several trackers share through --nats (see CLUSTER.md): a device is online while any of them hears it; fleet events go to the stream PRESENCE_<NAME>_FLEET instead of this tracker's own stream and bucket.
    #[arg(long, value_name = "NAME", requires_all = ["nats", "node"], value_parser = parse_cluster_name, env = "PRESENCE_CLUSTER")]
    pub(crate) cluster: Option<String>,
    /// This tracker's id in --cluster: unique among the trackers, the same across its restarts (e.g. the host name).
    #[arg(long, value_name = "ID", requires = "cluster", value_parser = parse_cluster_name, env = "PRESENCE_NODE")]
    pub(crate) node: Option<String>,
    /// Replicas of the cluster's buckets and stream (3 on a NATS cluster of 3 or more servers).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), env = "PRESENCE_NATS_REPLICAS")]
    pub(crate) nats_replicas: u8,
    /// With --cluster: at SIGTERM/SIGINT, keep serving while devices move to the other trackers, and stop once none is online here (or the longest TTL held has passed); a second signal stops at once.
    #[arg(long, requires = "cluster", env = "PRESENCE_DRAIN")]
    pub(crate) drain: bool,
    /// Publish each device's state to this MQTT broker (mqtt://host:1883): retained topics ROOT/<id>/state and ROOT/<id>/event, and the tracker's own ROOT/status (its Last Will says offline).
    #[arg(long, value_name = "URL", env = "PRESENCE_MQTT")]
    pub(crate) mqtt: Option<String>,
    /// The MQTT topic root.
    #[arg(long, value_name = "ROOT", default_value = "presence", env = "PRESENCE_MQTT_ROOT")]
    pub(crate) mqtt_root: String,
    /// Also publish Home Assistant discovery configs under this prefix (e.g. homeassistant): each device a connectivity binary_sensor.
    #[arg(long, value_name = "PREFIX", env = "PRESENCE_MQTT_DISCOVERY")]
    pub(crate) mqtt_discovery: Option<String>,
    /// MQTT user (with PRESENCE_MQTT_PASSWORD).
    #[arg(long, value_name = "USER", env = "PRESENCE_MQTT_USER")]
    pub(crate) mqtt_user: Option<String>,
    /// MQTT password; prefer the environment variable PRESENCE_MQTT_PASSWORD.
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "PRESENCE_MQTT_PASSWORD",
        hide_env_values = true,
        requires = "mqtt_user"
    )]
    pub(crate) mqtt_password: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9787; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", env = "PRESENCE_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Transitions each destination (events file, brokers) may have waiting; a destination that is down or slow loses its oldest beyond this, and counts them.
    #[arg(long, value_name = "N", default_value_t = presence::server::SINK_BUFFER, env = "PRESENCE_SINK_BUFFER")]
    pub(crate) sink_buffer: usize,
    /// Keep the devices, their replay windows and versions, and the event sequence in this file across restarts: written every --state-every and at SIGTERM/SIGINT, restored at start.
    #[arg(long, value_name = "PATH", env = "PRESENCE_STATE")]
    pub(crate) state: Option<PathBuf>,
    /// A device is suspect once this many intervals pass after the one its heartbeat was due at (before its deadline); 0: never.
    #[arg(long, value_name = "N", default_value_t = 1, env = "PRESENCE_SUSPECT_AFTER")]
    pub(crate) suspect_after: u32,
    /// Also write `suspect` events, and `online` events (with "from": "suspect") when suspect devices are on time again.
    #[arg(long, env = "PRESENCE_SUSPECT_EVENTS")]
    pub(crate) suspect_events: bool,
    /// When many devices go silent at once, suspect the server's own network and hold them as suspect instead of taking them offline.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set, env = "PRESENCE_SELF_PRESERVATION")]
    pub(crate) self_preservation: bool,
    /// Self-preservation starts when more than this share of the online devices turn late or expire within one --min-ttl.
    #[arg(long, value_name = "PERCENT", default_value = "20%", value_parser = parse_percent, env = "PRESENCE_DEGRADED_SHARE")]
    pub(crate) degraded_share: u32,
    /// ...and only with at least this many devices online (per --threads thread), so a death in a small fleet is never taken for a blackout.
    #[arg(long, value_name = "N", default_value_t = 50, env = "PRESENCE_DEGRADED_MIN_ONLINE")]
    pub(crate) degraded_min_online: u64,
    /// The longest devices are held while degraded, whatever happens; then the silent ones go offline.
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = parse_duration, env = "PRESENCE_MAX_HOLD")]
    pub(crate) max_hold: Duration,
    /// A device whose state changes more than this many times within --flap-window is flapping: its online/offline events are held back until it is stable; 0: no flap damping.
    #[arg(long, value_name = "N", default_value_t = 6, env = "PRESENCE_FLAP_CHANGES")]
    pub(crate) flap_changes: u32,
    /// The flap window; a flapping device is stable again after this long without a change.
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = parse_duration, env = "PRESENCE_FLAP_WINDOW")]
    pub(crate) flap_window: Duration,
    /// Forget offline devices silent this long (e.g. 7d): they are reported as `forgotten`, removed from NATS KV and Home Assistant, and unknown to status. Without it they are kept until --max-devices needs their room.
    #[arg(long, value_name = "DUR", value_parser = parse_forget_after, env = "PRESENCE_FORGET_AFTER")]
    pub(crate) forget_after: Option<Duration>,
    /// Time between state snapshots (with --state); a crash loses at most this much history.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_state_every, requires = "state", env = "PRESENCE_STATE_EVERY")]
    pub(crate) state_every: Duration,
}

/// A cluster name or node id: it becomes part of NATS names.
fn parse_cluster_name(s: &str) -> Result<String, String> {
    if presence::sink::cluster::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not a valid name: use 1 to 64 letters, digits, '-' or '_'"))
    }
}

fn parse_switch(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is neither on nor off")),
    }
}

fn parse_percent(s: &str) -> Result<u32, String> {
    let number = s.trim().trim_end_matches('%');
    match number.parse::<u32>() {
        Ok(percent) if (1..=100).contains(&percent) => Ok(percent),
        _ => Err(format!("'{s}' is not a percentage from 1% to 100% (try 20%)")),
    }
}

fn parse_state_every(s: &str) -> Result<Duration, String> {
    let every = parse_duration(s)?;
    if every < Duration::from_millis(100) {
        return Err(format!("'{s}' is too short: snapshots at most every 100ms"));
    }
    Ok(every)
}

fn parse_forget_after(s: &str) -> Result<Duration, String> {
    let after = parse_duration(s)?;
    if after.is_zero() {
        return Err(format!("'{s}' is zero: leave --forget-after out to keep offline devices"));
    }
    Ok(after)
}

pub(crate) fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
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
pub(crate) struct BeatArgs {
    /// The server's address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    pub(crate) server: String,
    /// The device id (1 to 64 bytes of UTF-8, no control characters).
    #[arg(long, value_name = "ID", env = "PRESENCE_ID")]
    pub(crate) id: String,
    /// Time between heartbeats; it is also declared to the server.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration, env = "PRESENCE_INTERVAL")]
    pub(crate) interval: Duration,
    /// Payload text sent with each heartbeat (at most 64 bytes).
    #[arg(long, value_name = "TEXT", conflicts_with = "payload_hex")]
    pub(crate) payload: Option<String>,
    /// Payload as hex, e.g. 01ff (at most 64 bytes).
    #[arg(long, value_name = "HEX")]
    pub(crate) payload_hex: Option<String>,
    /// Stop after this many heartbeats (without a Leave, so the device then expires).
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Ask the server to acknowledge each heartbeat, and print the acks.
    #[arg(long)]
    pub(crate) ack: bool,
    /// Boot epoch to send [default: larger than any this machine used before (a counter kept in the state directory), at least the Unix time in seconds].
    #[arg(long, value_name = "N")]
    pub(crate) boot: Option<u32>,
    /// Sign heartbeats with this device key (64 hex digits, from `presence derive-key`).
    #[arg(long, value_name = "HEX", conflicts_with = "key_file", value_parser = parse_hex_key, env = "PRESENCE_DEVICE_KEY", hide_env_values = true)]
    pub(crate) key_hex: Option<Key>,
    /// Sign heartbeats with the device key in this file (from `presence derive-key --out`).
    #[arg(long, value_name = "PATH")]
    pub(crate) key_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The server's address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7787", env = "PRESENCE_SERVER")]
    pub(crate) server: String,
    /// Ask the fleet view of several trackers in NATS instead of one server (with --cluster).
    #[arg(long, value_name = "URL", requires = "cluster", conflicts_with_all = ["server", "key_file"])]
    pub(crate) nats: Option<String>,
    /// The cluster whose fleet view to read (the trackers' --cluster).
    #[arg(long, value_name = "NAME", requires = "nats", value_parser = parse_cluster_name)]
    pub(crate) cluster: Option<String>,
    #[command(flatten)]
    pub(crate) nats_auth: NatsAuthArgs,
    /// The summary (what status shows without DEVICE or a listing flag).
    #[arg(long, conflicts_with_all = ["device", "list", "offline", "all", "prefix", "count"])]
    pub(crate) summary: bool,
    /// One device: exit 0 if it is online, 1 if offline or unknown.
    #[arg(value_name = "DEVICE", conflicts_with_all = ["list", "offline", "all", "prefix", "count"])]
    pub(crate) device: Option<String>,
    /// List every online device (following pages; progress on stderr for long listings).
    #[arg(long)]
    pub(crate) list: bool,
    /// List the offline devices the server holds instead (implies --list).
    #[arg(long, conflicts_with = "all")]
    pub(crate) offline: bool,
    /// List every device the server holds, online or offline (implies --list).
    #[arg(long)]
    pub(crate) all: bool,
    /// Only devices whose id starts with PREFIX (implies --list; the server filters).
    #[arg(long, value_name = "PREFIX")]
    pub(crate) prefix: Option<String>,
    /// Print only how many devices the listing has (the server counts them; implies --list).
    #[arg(long)]
    pub(crate) count: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Reply wait: give up on a query when no reply comes within this time (not the device TTL of `serve --timeout`).
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration, env = "PRESENCE_REPLY_TIMEOUT")]
    pub(crate) timeout: Duration,
    /// Sign queries as the operator: a master or operator key file.
    #[arg(long, value_name = "PATH", env = "PRESENCE_KEY_FILE")]
    pub(crate) key_file: Option<PathBuf>,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 10s, 500ms, 1m)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Parses a TTL: a duration from 1 ms to 49 days 17 h (TTLs travel as
/// 32-bit milliseconds, and are kept in whole milliseconds).
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
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
pub(crate) fn parse_size(s: &str) -> Result<usize, String> {
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
