//! `--cluster NAME --node ID` (with `--nats URL`): several trackers, one
//! fleet view, kept in NATS JetStream by the rules of CLUSTER.md
//! ([`crate::fleet`] holds them as pure code; this module is their wiring).
//!
//! - Node liveness: KV bucket `presence-<NAME>-nodes`, key `<ID>`, written
//!   every [`LIVENESS_EVERY`]; the bucket's max age ([`LIVENESS_TTL`]) removes
//!   the key of a node that stopped writing. Every node reads the bucket each
//!   second: an instance (a node id and its start time) that is gone is dead.
//! - Hearers: KV bucket `presence-<NAME>-devices`, key the device name
//!   ([`super::names`]), value [`Stored`]: who hears the device, whether it
//!   is globally online, its global version, and the last fleet event.
//!   Written with a compare-and-set on the key's revision when the device
//!   comes online or goes offline *here*; never per heartbeat.
//! - Fleet events: stream `PRESENCE_<NAME>_FLEET`, subject
//!   `presence.<NAME>.fleet.<name>`, message id `<name>.<gversion>`, written
//!   by the node whose write changed `online`.
//! - The live node with the smallest id sweeps for dead nodes (rule 4): each
//!   device heard only by dead instances goes offline at the latest moment
//!   it could still have been heard there.
//!
//! The sink's feed asks for the server's whole view at start and when this
//! node comes back after its liveness key may have expired (a partition):
//! every device it holds online is added again (rule 1), every offline one
//! removed (rule 2).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::nats::{BoxError, NatsOptions, connect_options};
use super::{Sink, Transition, names};
use crate::fleet::{Global, Hearers, Hearing};
use crate::server::Stop;
use crate::table::OfflineReason;
use crate::tracker::EventKind;

/// How often a node writes its liveness key.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(2);
/// How long a liveness key lives without a write (the nodes bucket's max
/// age): a node that stopped writing is dead this long after its last write.
pub const LIVENESS_TTL: Duration = Duration::from_secs(6);
/// How often every node reads the nodes bucket.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Devices written at once (different devices; one device's steps stay in order).
const CONCURRENT: usize = 64;
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the sink keeps trying at stop before it counts the rest as lost.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A cluster's names, from `--cluster NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    /// The cluster's name.
    pub cluster: String,
}

impl ClusterNames {
    /// The hearers bucket.
    pub fn devices_bucket(&self) -> String {
        format!("presence-{}-devices", self.cluster)
    }
    /// The liveness bucket.
    pub fn nodes_bucket(&self) -> String {
        format!("presence-{}-nodes", self.cluster)
    }
    /// The fleet events stream.
    pub fn stream(&self) -> String {
        format!("PRESENCE_{}_FLEET", self.cluster)
    }
    /// The fleet events subject of one device name (`None`: all of them).
    pub fn subject(&self, name: Option<&str>) -> String {
        format!("presence.{}.fleet.{}", self.cluster, name.unwrap_or(">"))
    }
}

/// Whether `name` may be a cluster name or a node id: 1 to 64 ASCII
/// letters, digits, `-` and `_` (it goes into bucket, stream and key names).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How the tracker joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The NATS server(s) and credentials (its stream and bucket names are not used).
    pub nats: NatsOptions,
    /// The cluster's names.
    pub names: ClusterNames,
    /// This node's id (`--node`).
    pub node: String,
    /// Replicas of the buckets and the stream (3 on a 3-server NATS cluster).
    pub replicas: usize,
    /// The tracker's UDP address, shown to operators.
    pub addr: String,
}

/// What a node says of itself in the nodes bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeValue {
    /// The node id.
    pub node: String,
    /// When this process started, Unix ms: with the id, the instance.
    pub started_unix_ms: u64,
    /// When it wrote this, Unix ms.
    pub alive_unix_ms: u64,
    /// `serving` or `draining`.
    pub state: String,
    /// Its UDP address.
    pub addr: String,
}

impl NodeValue {
    /// The name of this instance in the hearers of a device.
    pub fn instance(&self) -> String {
        instance(&self.node, self.started_unix_ms)
    }
}

/// The hearer name of node `node` started at `started_unix_ms`.
pub fn instance(node: &str, started_unix_ms: u64) -> String {
    format!("{node}@{started_unix_ms}")
}

/// The node id of a hearer name.
pub fn node_of(instance: &str) -> &str {
    instance.split_once('@').map_or(instance, |(node, _)| node)
}

/// A device's value in the hearers bucket: the shared state of
/// [`crate::fleet`], and the fleet event of its last global transition
/// (published again, under the same id, by a writer that cannot tell
/// whether its own publish went through).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Who hears it, whether it is online, its global version.
    #[serde(flatten)]
    pub hearers: Hearers,
    /// Its last fleet event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
}

/// Every node as the nodes bucket showed it last.
#[derive(Debug, Default)]
struct Liveness {
    /// Node id → its value, as last read.
    nodes: HashMap<String, NodeValue>,
    /// Instances seen alive, and the last time each said so (Unix ms).
    last_alive: HashMap<String, u64>,
    /// Instances seen to die (their key went away or a newer instance
    /// replaced them).
    dead: HashSet<String>,
    /// Whether the bucket was read at least once.
    read: bool,
}

impl Liveness {
    /// Whether an instance counts, for a node's own writes: yes unless it
    /// was seen to die (an instance that started after the last read counts).
    fn maybe_live(&self, instance: &str) -> bool {
        !self.dead.contains(instance)
    }

    /// Whether an instance counts, for the sweeper: only if the last read
    /// showed it.
    fn surely_live(&self, hearer: &str) -> bool {
        self.nodes.get(node_of(hearer)).is_some_and(|value| value.instance() == hearer)
    }

    /// Takes a new read of the bucket; returns whether an instance died.
    /// Unless `healthy` (this node's own liveness writes have succeeded for
    /// a key's lifetime), a missing key proves nothing: NATS itself may be
    /// failing over, and every node's writes with it. Then only the
    /// instances present are noted; the comparison waits for a healthy read.
    fn update(&mut self, now: HashMap<String, NodeValue>, healthy: bool) -> bool {
        if !healthy {
            for value in now.values() {
                self.last_alive.insert(value.instance(), value.alive_unix_ms);
                self.dead.remove(&value.instance());
            }
            return false;
        }
        let mut died = false;
        for (node, old) in &self.nodes {
            let gone = now.get(node).is_none_or(|new| new.started_unix_ms != old.started_unix_ms);
            if gone && self.dead.insert(old.instance()) {
                died = true;
            }
        }
        for value in now.values() {
            self.last_alive.insert(value.instance(), value.alive_unix_ms);
            self.dead.remove(&value.instance());
        }
        self.nodes = now;
        self.read = true;
        died
    }
}

/// What the sink's thread and its background tasks share.
struct Shared {
    options: ClusterOptions,
    /// This process's hearer name.
    me: String,
    /// When this process started, Unix ms.
    started_unix_ms: u64,
    liveness: Mutex<Liveness>,
    /// The server's view is wanted (at start; after this node may have been
    /// taken for dead).
    resync: AtomicBool,
    /// Since when this node's liveness writes have succeeded without a
    /// failure (`None`: the last one failed, or none was made yet).
    writing_since: Mutex<Option<Instant>>,
    /// `--drain`: the liveness key says `draining`.
    draining: Arc<AtomicBool>,
    /// Transitions given up on.
    lost: AtomicU64,
    /// Fleet events this node published.
    published: AtomicU64,
    stop: Stop,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writing_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.writing_since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this node may judge others dead: its own liveness writes
    /// have succeeded for at least a key's lifetime, so every live node has
    /// had the time to write its key again after any NATS trouble.
    fn healthy(&self) -> bool {
        self.writing_since().is_some_and(|since| since.elapsed() >= LIVENESS_TTL)
    }
}

/// The cluster sink: this node's share of the fleet view.
pub struct ClusterSink {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    store: Store,
}

/// The buckets and the stream, once they exist.
#[derive(Clone)]
struct Store {
    jetstream: jetstream::Context,
    devices: Arc<tokio::sync::OnceCell<kv::Store>>,
    nodes: Arc<tokio::sync::OnceCell<kv::Store>>,
    stream_ready: Arc<tokio::sync::OnceCell<()>>,
    shared: Arc<Shared>,
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ClusterSink {
    /// Joins the cluster in the background (a NATS that is down at start is
    /// retried, and the tracker starts anyway). `draining` is set by the
    /// server at `SIGTERM` with `--drain`. Fails only for a bad URL or an
    /// unreadable credentials file.
    pub fn connect(options: ClusterOptions, stop: Stop, draining: Arc<AtomicBool>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("presence-cluster")
            .on_thread_start(|| crate::server::run_in_background("the cluster client"))
            .enable_io()
            .enable_time()
            .build()?;
        let started_unix_ms = unix_ms(SystemTime::now());
        let jetstream = runtime.block_on(async {
            let name = format!("presence {}", options.node);
            let connect = connect_options(&name, &options.nats.auth).await?.retry_on_initial_connect();
            let client = connect
                .connect(super::nats::servers(&options.nats.url))
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(jetstream::new(client))
        })?;
        let shared = Arc::new(Shared {
            me: instance(&options.node, started_unix_ms),
            options,
            started_unix_ms,
            liveness: Mutex::new(Liveness::default()),
            resync: AtomicBool::new(true),
            writing_since: Mutex::new(None),
            draining,
            lost: AtomicU64::new(0),
            published: AtomicU64::new(0),
            stop,
        });
        let store = Store {
            jetstream,
            devices: Arc::default(),
            nodes: Arc::default(),
            stream_ready: Arc::default(),
            shared: Arc::clone(&shared),
        };
        runtime.spawn(store.clone().keep_alive());
        runtime.spawn(store.clone().watch_nodes());
        Ok(ClusterSink { shared, runtime, store })
    }
}

impl Sink for ClusterSink {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    fn keeps_states(&self) -> bool {
        true
    }

    fn wants_resync(&self) -> bool {
        // Only while NATS answers this node's liveness writes: the server's
        // view is read for it, and is useless while it cannot be written.
        self.shared.resync.load(Ordering::SeqCst) && self.shared.writing_since().is_some()
    }

    fn publish(&mut self, batch: &[Transition]) {
        // One device's steps in order; different devices at once.
        let mut chains: Vec<(String, Vec<Step>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for transition in batch {
            let Some(step) = Step::of(transition) else { continue };
            let device = &*transition.event.device;
            let at = *index.entry(device).or_insert_with(|| {
                chains.push((device.to_string(), Vec::new()));
                chains.len() - 1
            });
            chains[at].1.push(step);
        }
        let store = self.store.clone();
        self.runtime.block_on(async move {
            futures_util::stream::iter(chains)
                .for_each_concurrent(CONCURRENT, |(device, steps)| {
                    let store = store.clone();
                    async move {
                        for step in steps {
                            store.apply(&device, &step).await;
                        }
                    }
                })
                .await;
        });
    }

    fn resync(&mut self, devices: &[crate::client::DeviceReport]) {
        self.shared.resync.store(false, Ordering::SeqCst);
        let now = unix_ms(SystemTime::now());
        let steps: Vec<(String, Step)> = devices
            .iter()
            .map(|device| {
                let numbers = &device.numbers;
                let step = if device.online {
                    Step::Heard {
                        hearing: Hearing {
                            boot: numbers.boot,
                            seq: numbers.seq,
                            since_unix_ms: now,
                            ttl_ms: numbers.ttl_ms,
                        },
                        address: device.address.to_string(),
                        wall: now,
                    }
                } else {
                    Step::Lost {
                        upto: (numbers.boot, numbers.seq),
                        left: false,
                        address: device.address.to_string(),
                        wall: now,
                    }
                };
                (device.device.clone(), step)
            })
            .collect();
        let store = self.store.clone();
        let count = steps.len();
        // A resync rests on the view read just now: if NATS goes away
        // meanwhile, the rest is not applied later from a stale view (a
        // device that went offline here meanwhile would come back online
        // for a moment); the resync starts again from a fresh view.
        let aborted = AtomicBool::new(false);
        let aborted = &aborted;
        self.runtime.block_on(async move {
            futures_util::stream::iter(steps)
                .for_each_concurrent(CONCURRENT, |(device, step)| {
                    let store = store.clone();
                    async move {
                        if aborted.load(Ordering::SeqCst) {
                            return;
                        }
                        let mut uncertain = false;
                        if store.attempt(&device, &step, &mut uncertain).await.is_err() {
                            aborted.store(true, Ordering::SeqCst);
                            if uncertain {
                                // It may have been written: finish it.
                                store.apply_from(&device, &step, true).await;
                            }
                        }
                    }
                })
                .await;
        });
        if aborted.load(Ordering::SeqCst) {
            tracing::warn!("cluster: NATS went away during the resync; it starts again once NATS is back");
            self.shared.resync.store(true, Ordering::SeqCst);
            return;
        }
        tracing::info!(devices = count, "cluster: this node's devices are in the fleet view again");
    }
}

impl Drop for ClusterSink {
    /// A node that stops says so: its liveness key goes at once, so the
    /// others need not wait for it to expire.
    fn drop(&mut self) {
        let store = self.store.clone();
        let node = self.shared.options.node.clone();
        let started = self.shared.started_unix_ms;
        self.runtime.block_on(async move {
            let remove = async {
                let nodes = store.nodes().await?;
                // Only if the key is still this process's own.
                if let Some(entry) = nodes.entry(node.as_str()).await?
                    && serde_json::from_slice::<NodeValue>(&entry.value)
                        .is_ok_and(|value| value.started_unix_ms == started)
                {
                    nodes.delete_expect_revision(node.as_str(), Some(entry.revision)).await?;
                }
                Ok::<_, BoxError>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), remove).await {
                Ok(Ok(())) => tracing::info!("cluster: left"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: cannot remove this node's liveness key; it expires")
                }
                Err(_) => tracing::warn!("cluster: NATS did not answer; this node's liveness key expires"),
            }
        });
    }
}

/// A change this node makes to one device's value.
#[derive(Debug, Clone)]
enum Step {
    /// It came online here (rule 1).
    Heard { hearing: Hearing, address: String, wall: u64 },
    /// It went offline here (rule 2).
    Lost { upto: (u32, u32), left: bool, address: String, wall: u64 },
}

impl Step {
    /// The step of a transition, if it is one the fleet view cares about.
    fn of(transition: &Transition) -> Option<Step> {
        let event = &transition.event;
        let wall = unix_ms(transition.wall);
        let address = event.addr.to_string();
        match event.kind {
            EventKind::Online => Some(Step::Heard {
                hearing: Hearing {
                    boot: event.boot,
                    seq: event.heartbeat_seq,
                    since_unix_ms: wall,
                    ttl_ms: event.ttl_ms.unwrap_or(0),
                },
                address,
                wall,
            }),
            EventKind::Offline(reason) => Some(Step::Lost {
                upto: (event.boot, event.heartbeat_seq),
                left: reason == OfflineReason::Left,
                address,
                wall,
            }),
            // Suspect, flapping, forgotten and the server's own events stay
            // this node's: the fleet view is who is online.
            _ => None,
        }
    }
}

/// A fleet event's JSON: the events file's fields that make sense for the
/// fleet, `version` being the global version, and the node that caused it.
pub fn fleet_event(
    device: &str,
    global: Global,
    gversion: u32,
    node: &str,
    wall_unix_ms: u64,
    address: Option<&str>,
    order: Option<(u32, u32)>,
) -> serde_json::Value {
    let time = UNIX_EPOCH + Duration::from_millis(wall_unix_ms);
    let mut value = serde_json::json!({
        "time": humantime::format_rfc3339_millis(time).to_string(),
        "device": device,
        "event": match global { Global::Online => "online", Global::Offline { .. } => "offline" },
        "version": gversion,
        "node": node,
    });
    if let Global::Offline { left } = global {
        value["reason"] = if left { "left" } else { "expired" }.into();
    }
    if let Some(address) = address {
        value["address"] = address.into();
    }
    if let Some((boot, seq)) = order {
        value["boot"] = boot.into();
        value["heartbeat_seq"] = seq.into();
    }
    value
}

impl Store {
    async fn devices(&self) -> Result<kv::Store, BoxError> {
        let config = kv::Config {
            bucket: self.shared.options.names.devices_bucket(),
            history: 1,
            num_replicas: self.shared.options.replicas,
            ..Default::default()
        };
        open_bucket(&self.jetstream, &self.devices, config).await
    }

    async fn nodes(&self) -> Result<kv::Store, BoxError> {
        let config = kv::Config {
            bucket: self.shared.options.names.nodes_bucket(),
            history: 1,
            max_age: LIVENESS_TTL,
            num_replicas: self.shared.options.replicas,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        open_bucket(&self.jetstream, &self.nodes, config).await
    }

    async fn stream(&self) -> Result<(), BoxError> {
        let names = &self.shared.options.names;
        self.stream_ready
            .get_or_try_init(|| async {
                let config = stream::Config {
                    name: names.stream(),
                    subjects: vec![names.subject(None)],
                    duplicate_window: Duration::from_secs(120),
                    num_replicas: self.shared.options.replicas,
                    ..Default::default()
                };
                self.jetstream.get_or_create_stream(config).await?;
                Ok::<_, BoxError>(())
            })
            .await
            .copied()
    }

    /// Writes this node's liveness key every [`LIVENESS_EVERY`]. When a write
    /// succeeds after none did for longer than the key lives, the others may
    /// have taken this node for dead and removed it from its devices: it
    /// asks for the server's view, to add itself again.
    async fn keep_alive(self) {
        let shared = Arc::clone(&self.shared);
        // As if written at start: a node whose first write comes long
        // after it started was not in the view meanwhile either.
        let mut last_ok: Option<Instant> = Some(Instant::now());
        let mut ever = false;
        let mut warned = false;
        loop {
            let value = NodeValue {
                node: shared.options.node.clone(),
                started_unix_ms: shared.started_unix_ms,
                alive_unix_ms: unix_ms(SystemTime::now()),
                state: if shared.draining.load(Ordering::SeqCst) { "draining" } else { "serving" }.into(),
                addr: shared.options.addr.clone(),
            };
            let write = async {
                // The buckets and the stream exist from the start (a
                // reader may come before the first device). Creating them
                // on a new NATS cluster takes seconds: not under the
                // write's own timeout, which would cancel it again and again.
                self.devices().await?;
                self.stream().await?;
                let nodes = self.nodes().await?;
                let value = serde_json::to_vec(&value)?.into();
                tokio::time::timeout(LIVENESS_EVERY, nodes.put(shared.options.node.as_str(), value))
                    .await
                    .map_err(|_| "NATS did not answer within the liveness interval")??;
                Ok::<_, BoxError>(())
            };
            let written = tokio::time::timeout(LIVENESS_TTL * 5, write).await;
            if !matches!(written, Ok(Ok(()))) {
                *self.shared.writing_since() = None;
            }
            match written {
                Ok(Ok(())) => {
                    if !ever {
                        tracing::info!("cluster: this node is live in the fleet view");
                        ever = true;
                    }
                    if last_ok.is_some_and(|at| at.elapsed() >= LIVENESS_TTL - LIVENESS_EVERY) {
                        tracing::warn!(
                            "cluster: back after an outage longer than this node's liveness; adding its devices again"
                        );
                        shared.resync.store(true, Ordering::SeqCst);
                    }
                    if warned {
                        tracing::info!("cluster: liveness written again");
                        warned = false;
                    }
                    last_ok = Some(Instant::now());
                    self.shared.writing_since().get_or_insert_with(Instant::now);
                }
                Ok(Err(e)) if !warned => {
                    tracing::warn!(error = %e, "cluster: cannot write this node's liveness; retrying");
                    warned = true;
                }
                Err(_) if !warned => {
                    tracing::warn!("cluster: NATS does not answer this node's liveness write; retrying");
                    warned = true;
                }
                _ => {}
            }
            if ever {
                tokio::time::sleep(LIVENESS_EVERY).await;
            } else {
                // Not written yet: try again soon.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    /// Reads the nodes bucket every [`POLL_EVERY`]; on the node with the
    /// smallest live id, sweeps for devices held only by dead instances and
    /// takes them offline at their time (rule 4).
    async fn watch_nodes(self) {
        let mut sweeper = false;
        // Device keys to look at again, by when (Unix ms).
        let mut due: BTreeSet<(u64, String)> = BTreeSet::new();
        // Keys whose last write may have landed despite its error.
        let mut uncertain: HashSet<String> = HashSet::new();
        loop {
            match self.read_nodes().await {
                Ok(nodes) => {
                    let me = self.shared.options.node.as_str();
                    let (died, now_sweeper) = {
                        let mut live = self.shared.live();
                        let died = live.update(nodes, self.shared.healthy());
                        let smallest = live.nodes.keys().min().map(String::as_str);
                        (died, smallest == Some(me))
                    };
                    // Not healthy: no verdict yet, scan once it is.
                    let now_sweeper = now_sweeper && self.shared.healthy();
                    // Every second: logged only when something changed.
                    if died || now_sweeper != sweeper {
                        tracing::debug!(died, now_sweeper, sweeper, "cluster: nodes read");
                    }
                    if now_sweeper
                        && (died || !sweeper)
                        && let Err(e) = self.scan(&mut due).await
                    {
                        tracing::warn!(error = %e, "cluster: cannot look for devices of dead nodes yet");
                        // Scan again at the next read.
                        sweeper = false;
                        tokio::time::sleep(POLL_EVERY).await;
                        continue;
                    }
                    sweeper = now_sweeper;
                    if !sweeper {
                        due.clear();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cluster: cannot read the nodes"),
            }
            let now = unix_ms(SystemTime::now());
            let mut ripe = Vec::new();
            while let Some(first) = due.first()
                && first.0 <= now
                && sweeper
            {
                let Some((at, key)) = due.pop_first() else { break };
                let was_uncertain = uncertain.remove(&key);
                ripe.push((at, key, was_uncertain));
            }
            // Different devices at once, as the node's own writes are.
            let this = &self;
            let failed: Vec<(u64, String, bool)> = futures_util::stream::iter(ripe)
                .map(|(at, key, mut was_uncertain)| async move {
                    match this.settle_dead(&key, at, &mut was_uncertain).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster: cannot settle a device of a dead node yet");
                            Some((at, key, was_uncertain))
                        }
                    }
                })
                .buffer_unordered(CONCURRENT)
                .filter_map(|failed| async move { failed })
                .collect()
                .await;
            if !failed.is_empty() {
                tracing::warn!(
                    devices = failed.len(),
                    "cluster: cannot settle devices of a dead node yet; retrying"
                );
            }
            for (_, key, was_uncertain) in failed {
                if was_uncertain {
                    uncertain.insert(key.clone());
                }
                due.insert((now + 1000, key));
            }
            let wait = due
                .first()
                .map_or(POLL_EVERY, |(at, _)| Duration::from_millis(at.saturating_sub(now)).min(POLL_EVERY));
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }

    async fn read_nodes(&self) -> Result<HashMap<String, NodeValue>, BoxError> {
        read_nodes(&self.nodes().await?).await
    }

    /// Finds every device with a hearer the last read did not show alive,
    /// and when to look at it again: at once if a live node still hears it
    /// (only the entry goes), else at the latest deadline it could have
    /// had on its dead hearers.
    async fn scan(&self, due: &mut BTreeSet<(u64, String)>) -> Result<(), BoxError> {
        let devices = self.devices().await?;
        let now = unix_ms(SystemTime::now());
        let entries = snapshot(&self.jetstream, &devices).await?;
        let mut found = 0;
        for (key, stored) in entries {
            let live = self.shared.live();
            let dead: Vec<(&String, &Hearing)> =
                stored.hearers.hearers.iter().filter(|(hearer, _)| !live.surely_live(hearer)).collect();
            if dead.is_empty() {
                continue;
            }
            let heard_alive = stored.hearers.hearers.keys().any(|hearer| live.surely_live(hearer));
            let at = if heard_alive || !stored.hearers.online {
                now
            } else {
                dead.iter()
                    .map(|(hearer, hearing)| {
                        let since = live.last_alive.get(*hearer).copied().unwrap_or(now);
                        stored
                            .hearers
                            .deadline_after_death(hearer, since, millis(LIVENESS_EVERY))
                            .unwrap_or(now + u64::from(hearing.ttl_ms))
                    })
                    .max()
                    .unwrap_or(now)
            };
            due.insert((at, key));
            found += 1;
        }
        if found > 0 {
            tracing::info!(devices = found, "cluster: devices heard by nodes that died");
        }
        Ok(())
    }

    /// Rule 4 for one device, at `at`: its dead hearers go; if no live one
    /// is left, it goes offline (the fleet event says when: `at`).
    async fn settle_dead(&self, key: &str, at: u64, uncertain: &mut bool) -> Result<(), BoxError> {
        let Some(device) = names::decode(key) else { return Ok(()) };
        let shared = Arc::clone(&self.shared);
        self.cas(&device, uncertain, |hearers| {
            let live = shared.live();
            if !live.read {
                return None;
            }
            let dead_node = hearers
                .hearers
                .keys()
                .find(|hearer| !live.surely_live(hearer))
                .map(|hearer| node_of(hearer).to_string());
            let global = hearers.without_dead(|hearer| live.surely_live(hearer));
            global.map(|global| (global, dead_node.unwrap_or_default(), at, None, None))
        })
        .await
    }

    /// Applies one step of this node, retrying until it is written (at
    /// stop, for [`STOP_GRACE`] at most; then it counts as lost).
    async fn apply(&self, device: &str, step: &Step) {
        self.apply_from(device, step, false).await;
    }

    /// [`Store::apply`], after a first try that left the write `uncertain`.
    async fn apply_from(&self, device: &str, step: &Step, mut uncertain: bool) {
        let mut backoff = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        let mut warned = false;
        loop {
            let result = self.attempt(device, step, &mut uncertain).await;
            match result {
                Ok(()) => {
                    if warned {
                        tracing::info!("cluster: writing again");
                    }
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cluster: cannot write to the fleet view; retrying");
                        warned = true;
                    }
                    if self.shared.stop.is_requested() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= STOP_GRACE {
                            self.shared.lost.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One try of a step of this node (see [`Store::cas`]).
    async fn attempt(&self, device: &str, step: &Step, uncertain: &mut bool) -> Result<(), BoxError> {
        let shared = Arc::clone(&self.shared);
        let me = shared.me.clone();
        let node = shared.options.node.clone();
        self.cas(device, uncertain, |hearers| {
            let live = shared.live();
            let maybe = |hearer: &str| live.maybe_live(hearer);
            match step {
                Step::Heard { hearing, address, wall } => hearers.heard(&me, *hearing).map(|g| {
                    (g, node.clone(), *wall, Some(address.clone()), Some((hearing.boot, hearing.seq)))
                }),
                Step::Lost { upto, left, address, wall } => hearers
                    .lost(&me, *upto, *left, maybe)
                    .map(|g| (g, node.clone(), *wall, Some(address.clone()), Some(*upto))),
            }
        })
        .await
    }

    /// One compare-and-set round on `device`'s value: read it, let `change`
    /// change it (returning the fleet event it causes: the transition, the
    /// node, its time, address and (boot, seq)), write it back expecting
    /// the revision read, and publish the event. A conflict reads again.
    /// An error after the write was sent leaves it uncertain: the next
    /// round finds the value changed already (every step is idempotent) and
    /// publishes the stored event again, under its id, so a write that
    /// landed despite its error still has its event.
    async fn cas<F>(&self, device: &str, uncertain: &mut bool, mut change: F) -> Result<(), BoxError>
    where
        F: FnMut(&mut Hearers) -> Option<(Global, String, u64, Option<String>, Option<(u32, u32)>)>,
    {
        let bucket = self.devices().await?;
        self.stream().await?;
        let key = names::encode(device);
        loop {
            let entry = bucket.entry(key.as_str()).await?;
            let (mut stored, revision) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    (serde_json::from_slice::<Stored>(&entry.value).unwrap_or_default(), entry.revision)
                }
                Some(entry) => (Stored::default(), entry.revision),
                None => (Stored::default(), 0),
            };
            let before = stored.hearers.clone();
            let event = change(&mut stored.hearers);
            if stored.hearers == before {
                if *uncertain && let Some(event) = &stored.event {
                    self.publish_event(&key, stored.hearers.gversion, event).await?;
                }
                return Ok(());
            }
            let changed_online = event.is_some();
            if let Some((global, node, wall, address, order)) = event {
                stored.event = Some(fleet_event(
                    device,
                    global,
                    stored.hearers.gversion,
                    &node,
                    wall,
                    address.as_deref(),
                    order,
                ));
            }
            let value = bytes::Bytes::from(serde_json::to_vec(&stored)?);
            match bucket.update(key.as_str(), value, revision).await {
                Ok(_) => {
                    if changed_online && let Some(json) = &stored.event {
                        // Retried here until it is stored: a write that is
                        // not retried from the start is not uncertain.
                        let mut backoff = Duration::from_millis(100);
                        loop {
                            match self.publish_event(&key, stored.hearers.gversion, json).await {
                                Ok(()) => break,
                                Err(e) if self.shared.stop.is_requested() => return Err(e),
                                Err(e) => {
                                    tracing::debug!(error = %e, "cluster: fleet event not stored yet; retrying");
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(MAX_BACKOFF);
                                }
                            }
                        }
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    *uncertain = true;
                    return Err(e.into());
                }
            }
        }
    }

    /// Stores one fleet event, under the id `<name>.<gversion>` (so the
    /// same event twice is stored once).
    async fn publish_event(
        &self,
        key: &str,
        gversion: u32,
        event: &serde_json::Value,
    ) -> Result<(), BoxError> {
        let subject = self.shared.options.names.subject(Some(key));
        let message = jetstream::message::PublishMessage::build()
            .payload(bytes::Bytes::from(serde_json::to_vec(event)?))
            .message_id(format!("{key}.{gversion}"));
        self.jetstream.send_publish(subject, message).await?.await?;
        self.shared.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The bucket of `config`: opened, or created if it is not there yet; once
/// per process (`cell`).
async fn open_bucket(
    jetstream: &jetstream::Context,
    cell: &tokio::sync::OnceCell<kv::Store>,
    config: kv::Config,
) -> Result<kv::Store, BoxError> {
    cell.get_or_try_init(|| async {
        Ok::<_, BoxError>(match jetstream.get_key_value(config.bucket.as_str()).await {
            Ok(bucket) => bucket,
            Err(_) => jetstream.create_key_value(config).await?,
        })
    })
    .await
    .cloned()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Every device's key and value in the hearers bucket, read with one
/// ordered consumer (the last value of each key, then it stops), not a
/// request per key.
pub async fn snapshot(
    jetstream: &jetstream::Context,
    bucket: &kv::Store,
) -> Result<Vec<(String, Stored)>, BoxError> {
    // An empty bucket sends nothing at all: ask first (fresh, as
    // `Store::status` answers from what it read when it was opened).
    let mut stream = jetstream.get_stream(format!("KV_{}", bucket.name)).await?;
    if stream.info().await?.state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut watch = bucket.watch_with_history(">").await?;
    let mut found = Vec::new();
    loop {
        let entry = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .map_err(|_| "the hearers bucket stopped answering")?
            .ok_or("the hearers bucket's watch ended")??;
        if entry.operation == kv::Operation::Put
            && let Ok(stored) = serde_json::from_slice::<Stored>(&entry.value)
        {
            found.push((entry.key, stored));
        }
        if entry.delta == 0 {
            return Ok(found);
        }
    }
}

/// Every node in the nodes bucket.
pub async fn read_nodes(nodes: &kv::Store) -> Result<HashMap<String, NodeValue>, BoxError> {
    let mut keys = nodes.keys().await?;
    let mut found = HashMap::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let Some(entry) = nodes.entry(key.as_str()).await?
            && entry.operation == kv::Operation::Put
            && let Ok(value) = serde_json::from_slice::<NodeValue>(&entry.value)
        {
            found.insert(key, value);
        }
    }
    Ok(found)
}

/// The fleet view as `presence status --nats` reads it.
pub struct FleetView {
    /// Live nodes, by id.
    pub nodes: HashMap<String, NodeValue>,
    /// Devices, by id, with their values (sorted by id).
    pub devices: Vec<(String, Stored)>,
}

impl FleetView {
    /// Whether a hearer is a live instance.
    pub fn live(&self, hearer: &str) -> bool {
        self.nodes.get(node_of(hearer)).is_some_and(|value| value.instance() == hearer)
    }
}

/// Reads the nodes and, for `device` (or every device with `None`), the
/// hearers bucket of cluster `names`.
pub async fn read_view(
    jetstream: &jetstream::Context,
    names: &ClusterNames,
    device: Option<&str>,
) -> Result<FleetView, BoxError> {
    let nodes_bucket = jetstream.get_key_value(names.nodes_bucket()).await?;
    let devices_bucket = jetstream.get_key_value(names.devices_bucket()).await?;
    let nodes = read_nodes(&nodes_bucket).await?;
    let mut devices: Vec<(String, Stored)> = match device {
        Some(device) => match devices_bucket.entry(names::encode(device)).await? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                serde_json::from_slice::<Stored>(&entry.value).ok().map(|stored| (device.to_string(), stored))
            }
            _ => None,
        }
        .into_iter()
        .collect(),
        None => snapshot(jetstream, &devices_bucket)
            .await?
            .into_iter()
            .filter_map(|(key, stored)| Some((names::decode(&key)?, stored)))
            .collect(),
    };
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(FleetView { nodes, devices })
}
