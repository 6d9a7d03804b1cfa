//! `presence serve`: flags to a config, sockets, sinks, the loops.

use std::io::{self, BufWriter};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use presence::keyfile::KeyFile;
use presence::server::view::TableView;
use presence::server::{self, Options, StateOptions, Stop, state};
use presence::sink::cluster::{ClusterNames, ClusterOptions, ClusterSink};
use presence::sink::{JsonLines, MqttSettings, MqttSink, NatsOptions, NatsSink, Sink};
use presence::time::Clock;
use presence::tracker::{AuthMode, Config, ConfigError, FlapDamping, Keys, Preservation, Totals, Tracker};

use super::args::ServeArgs;
use crate::on_signal;

/// `--drain`: the first SIGTERM/SIGINT marks this node draining (its
/// liveness key says so) and stops the server once no device is online
/// here, or once the longest TTL it held at that moment has passed (by
/// then every device it held has expired here or moved); a second signal
/// stops it at once. The server is asked the way `status` asks it (signed
/// with the operator key when it has one, so `--query-allow none` does not
/// refuse it).
fn drain_on_signal(stop: Stop, draining: Arc<AtomicBool>, server: TableView) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if signals.next().is_none() {
                return;
            }
            draining.store(true, Ordering::SeqCst);
            let watcher_stop = stop.clone();
            let watcher = std::thread::Builder::new().name("drain".into()).spawn(move || {
                drain_until_empty(server, &watcher_stop);
                watcher_stop.stop();
            });
            if watcher.is_err() {
                stop.stop();
                return;
            }
            if let Some(signal) = signals.next() {
                tracing::info!(signal, "stopping now, without waiting for the drain");
                stop.stop();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Waits until the server on `server` holds no device online, or until
/// the longest TTL it held when the drain began has passed.
fn drain_until_empty(server: TableView, stop: &Stop) {
    let started = std::time::Instant::now();
    let Ok(mut client) = server.client(Duration::from_secs(1)) else { return };
    let filter =
        presence::wire::ListFilter { state: presence::wire::LIST_ONLINE, prefix: None, count_only: false };
    let longest = client
        .list(filter, |_| {})
        .map(|devices| devices.iter().map(|d| d.numbers.expires_in_ms).max().unwrap_or(0))
        .unwrap_or(0);
    let limit = Duration::from_millis(longest) + Duration::from_secs(1);
    tracing::info!(
        longest = %humantime::format_duration(Duration::from_millis(longest)),
        "draining: serving until the devices have moved to other trackers"
    );
    while !stop.is_requested() && started.elapsed() < limit {
        match client.summary() {
            Ok(summary) if summary.counts.online == 0 => {
                tracing::info!("drained: no device is online here any more");
                return;
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    tracing::info!("drain time is up");
}

impl TryFrom<&ServeArgs> for Config {
    type Error = anyhow::Error;

    /// The engine's rules from the flags: reads the key file, picks the
    /// auth mode, refuses an unsafe public bind, and lets the engine's own
    /// validation speak in terms of the flags.
    fn try_from(args: &ServeArgs) -> Result<Config> {
        let keys = match &args.key_file {
            None => None,
            Some(path) => match KeyFile::read(path)? {
                KeyFile::Master(master) => Some(Keys::from_master(&master)),
                other => {
                    bail!("{}: the server needs the master key, not {}", path.display(), other.kind_phrase())
                }
            },
        };
        // With a key, authentication is required unless the flag says otherwise.
        let auth = args.auth.unwrap_or(if keys.is_some() { AuthMode::Required } else { AuthMode::Off });
        let public = !args.bind.ip().is_loopback() && !args.insecure;
        if auth == AuthMode::Off && public {
            bail!(
                "refusing to listen on {} without authentication: anyone who can reach it could forge heartbeats and leaves; give --key-file (see `presence keygen`), or --insecure if you mean it",
                args.bind
            );
        }
        if auth == AuthMode::Optional && public {
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
            suspect_after: args.suspect_after,
            suspect_events: args.suspect_events,
            preservation: args.self_preservation.then_some(Preservation {
                late_percent: args.degraded_share,
                min_online: usize::try_from(args.degraded_min_online).unwrap_or(usize::MAX),
                max_hold: args.max_hold,
            }),
            flap_damping: (args.flap_changes > 0)
                .then_some(FlapDamping { changes: args.flap_changes, window: args.flap_window }),
            forget_after: args.forget_after,
            ..Config::default()
        };
        match config.validate() {
            Ok(()) => Ok(config),
            Err(ConfigError::AuthWithoutKey) => bail!(
                "--auth {} needs --key-file with the master key (create one with `presence keygen`)",
                auth.name()
            ),
            Err(ConfigError::TtlRange) => bail!(
                "--min-ttl ({}) is larger than --max-ttl ({})",
                humantime::format_duration(args.min_ttl),
                humantime::format_duration(args.max_ttl)
            ),
            Err(other) => Err(other.into()),
        }
    }
}

pub(crate) fn serve(args: ServeArgs) -> Result<ExitCode> {
    let config = Config::try_from(&args)?;
    let stop = Stop::new();
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
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    match args.events.as_deref() {
        None => {}
        Some("-") => sinks.push(Box::new(JsonLines::to_writer(Box::new(BufWriter::new(io::stdout()))))),
        Some(path) => sinks.push(Box::new(
            JsonLines::to_file(path).with_context(|| format!("cannot open events file '{path}'"))?,
        )),
    }
    let draining = Arc::new(AtomicBool::new(false));
    if let (Some(url), Some(cluster), Some(node)) = (&args.nats, &args.cluster, &args.node) {
        let options = ClusterOptions {
            nats: NatsOptions { url: url.clone(), auth: args.nats_auth.auth(), ..NatsOptions::default() },
            names: ClusterNames { cluster: cluster.clone() },
            node: node.clone(),
            replicas: usize::from(args.nats_replicas),
            addr: bound.local_addr.to_string(),
        };
        let sink = ClusterSink::connect(options, stop.clone(), Arc::clone(&draining))
            .context("cannot set up the NATS client (--nats)")?;
        tracing::info!(cluster, node, "joining the fleet view");
        sinks.push(Box::new(sink));
    } else if let Some(url) = &args.nats {
        let auth = args.nats_auth.auth();
        let options = NatsOptions {
            url: url.clone(),
            stream: args.nats_names.nats_stream.clone(),
            subject_prefix: args.nats_names.nats_subject_prefix.clone(),
            bucket: args.nats_bucket.clone(),
            auth,
        };
        let sink =
            NatsSink::connect(options, stop.clone()).context("cannot set up the NATS client (--nats)")?;
        sinks.push(Box::new(sink));
    }
    if let Some(url) = &args.mqtt {
        let settings = MqttSettings {
            url: url.clone(),
            root: args.mqtt_root.clone(),
            discovery: args.mqtt_discovery.clone(),
            credentials: args
                .mqtt_user
                .clone()
                .map(|user| (user, args.mqtt_password.clone().unwrap_or_default())),
        };
        sinks.push(Box::new(MqttSink::connect(settings).context("cannot set up the MQTT client (--mqtt)")?));
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
        auth = config.auth.name(),
        max_devices = config.max_devices,
        suspect_after = config.suspect_after,
        self_preservation = config.preservation.is_some(),
        flap_damping = config.flap_damping.is_some(),
        "listening"
    );
    if args.drain {
        let server = TableView::new(bound.local_addr, config.keys.as_ref().map(Keys::operator));
        drain_on_signal(stop.clone(), Arc::clone(&draining), server)?;
    } else {
        let signal_stop = stop.clone();
        on_signal(move || signal_stop.stop())?;
    }
    // Engine time starts a year in: restored devices may have been seen
    // before this process started.
    let clock = Clock::with_history(HISTORY);
    let (now, wall) = (clock.now(), SystemTime::now());
    let (trackers, options) = match &args.state {
        None => (Tracker::new_sharded(config, group.len(), now, wall)?, Options::default()),
        Some(path) => {
            state::check_writable(path).with_context(|| {
                format!(
                    "cannot write the state file {} (check that its directory exists and is writable)",
                    path.display()
                )
            })?;
            let recovered = state::restore(path, config, group.len(), now, wall)?;
            log_recovered(&recovered);
            let options = Options {
                state: Some(StateOptions { path: path.clone(), every: args.state_every }),
                event_seq: recovered.event_seq,
                ..Options::default()
            };
            (recovered.trackers, options)
        }
    };
    let metrics = match args.metrics {
        None => None,
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr} (--metrics)"))?;
            tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
            Some(listener)
        }
    };
    let options = Options { sink_buffer: args.sink_buffer, metrics, ..options };
    let sockets: Vec<_> = group.into_iter().map(|bound| bound.socket).collect();
    let finished =
        server::run_with(&sockets, trackers, clock, &stop, sinks, options).context("server loop failed")?;
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
        event_seq = finished.event_seq,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// How far back engine time reaches: a restored device seen longer ago
/// than this shows as seen this long ago.
const HISTORY: Duration = Duration::from_secs(366 * 86_400);

fn log_recovered(recovered: &state::Recovered) {
    let Some(from) = &recovered.from else {
        if recovered.moved_aside.is_empty() {
            tracing::info!("no state file yet: starting empty");
        } else {
            tracing::error!(bad = recovered.moved_aside.len(), "no good state file: starting empty");
        }
        return;
    };
    let r = recovered.restored;
    let age = recovered.written.and_then(|w| SystemTime::now().duration_since(w).ok()).unwrap_or_default();
    tracing::info!(
        file = %from.display(),
        devices = r.devices,
        online = r.online,
        graced = r.graced,
        event_seq = recovered.event_seq,
        clean = recovered.clean,
        age = %humantime::format_duration(Duration::from_secs(age.as_secs())),
        "state restored"
    );
    if r.refused > 0 {
        tracing::warn!(refused = r.refused, "devices of the state file did not fit in --max-devices");
    }
    if r.forgotten > 0 {
        tracing::warn!(
            forgotten = r.forgotten,
            "offline devices of the state file were forgotten to fit --max-devices"
        );
    }
}
