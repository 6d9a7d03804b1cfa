//! What `/metrics` reports, in the Prometheus text format (prometheus-client).
//!
//! Nothing here is on the hot path. The loops already publish their totals
//! once per turn (`ShardStats`); a [`Collector`] reads them, the sinks'
//! feeds and the snapshot counts at scrape time. The publisher thread counts
//! transitions by kind and observes expiry lateness. No metric has a
//! per-device label: a million series would hurt the servers users scrape
//! into.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::feed::SinkFeeds;
use super::shared::ShardStats;
use super::state::SnapshotStats;
use crate::sink::Transition;
use crate::tracker::{Count, EventKind, Totals};
use crate::wire::DropReason;

/// The metrics the publisher thread updates: transitions by kind, and
/// expiry lateness.
#[derive(Debug, Clone)]
pub(crate) struct TransitionMetrics {
    /// Transitions written, by event kind.
    transitions: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Expiry lateness: event time − deadline, seconds.
    lateness: Histogram,
}

impl Default for TransitionMetrics {
    fn default() -> Self {
        TransitionMetrics {
            transitions: Family::default(),
            // From 50 µs to about 3.3 s, doubling.
            lateness: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 17,
            )),
        }
    }
}

/// The metrics of one server: the registry `/metrics` encodes.
#[derive(Debug)]
pub struct Metrics {
    /// Everything `/metrics` shows.
    registry: Registry,
}

impl Metrics {
    /// The metrics of a server whose loops publish into `stats`, whose sinks
    /// are `feeds`, whose snapshots count into `snapshots`, and whose
    /// publisher counts into `published`.
    pub(crate) fn new(
        stats: Arc<[ShardStats]>,
        feeds: SinkFeeds,
        snapshots: Arc<SnapshotStats>,
        published: TransitionMetrics,
    ) -> Self {
        let mut registry = Registry::with_prefix("presence");
        registry.register("transitions", "Transitions written, by event kind", published.transitions);
        registry.register(
            "expiry_lateness_seconds",
            "How late an offline event came after the deadline that passed",
            published.lateness,
        );
        registry.register_collector(Box::new(ServerCollector { stats, feeds, snapshots }));
        Metrics { registry }
    }

    /// The text `/metrics` serves.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String fails only if an encoder reports an error,
        // which these never do.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

impl TransitionMetrics {
    /// Counts a batch of transitions (the publisher thread calls this).
    pub(crate) fn count(&self, batch: &[Transition]) {
        for transition in batch {
            let event = &transition.event;
            let kind = match event.kind {
                EventKind::Back => "online_from_suspect",
                other => other.name(),
            };
            self.transitions.get_or_create(&vec![("event", kind)]).inc();
            if let (EventKind::Offline(_), Some(deadline)) = (event.kind, event.deadline)
                && event.held_ms.is_none()
            {
                self.lateness.observe(event.at.saturating_duration_since(deadline).as_secs_f64());
            }
        }
    }
}

/// Reads the server's published figures at scrape time.
#[derive(Debug)]
struct ServerCollector {
    stats: Arc<[ShardStats]>,
    feeds: SinkFeeds,
    snapshots: Arc<SnapshotStats>,
}

impl std::fmt::Debug for SinkFeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.each()).finish()
    }
}

/// Encodes one metric without labels.
fn one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> std::fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Encodes one metric family: `metrics` with their label sets.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metrics: Vec<(Vec<(&'static str, String)>, M)>,
) -> std::fmt::Result {
    let Some((_, first)) = metrics.first() else { return Ok(()) };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in &metrics {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut totals = Totals::default();
        let mut kernel_drops = 0;
        for shard in self.stats.iter() {
            totals.add(&shard.load());
            kernel_drops += shard.kernel_drops.load(Ordering::Relaxed);
        }
        let offline = totals.known.saturating_sub(totals.online);
        let states = [
            ("online", totals.online.saturating_sub(totals.late)),
            ("suspect", totals.late.saturating_sub(totals.held)),
            ("held", totals.held),
            ("offline", offline),
        ];
        let devices =
            states.iter().map(|(state, n)| (vec![("state", state.to_string())], ConstGauge::new(*n as i64)));
        family(&mut encoder, "devices", "Devices the server holds, by state", devices.collect())?;
        let counted = [
            (Count::Heartbeats, "heartbeats", "Heartbeats accepted"),
            (Count::Leaves, "leaves", "Leaves accepted"),
            (Count::Queries, "queries", "Status queries answered"),
            (Count::Expirations, "expirations", "Devices that went offline by expiring"),
        ];
        for (count, name, help) in counted {
            one(&mut encoder, name, help, ConstCounter::new(totals.counters.get(count)))?;
        }
        let drops = DropReason::ALL.into_iter().map(|reason| {
            (vec![("reason", reason.name().to_string())], ConstCounter::new(totals.counters.drops(reason)))
        });
        family(
            &mut encoder,
            "dropped_datagrams",
            "Datagrams counted and dropped, by reason",
            drops.collect(),
        )?;
        one(
            &mut encoder,
            "kernel_receive_drops",
            "Datagrams the kernel dropped because a receive queue was full (SO_RXQ_OVFL)",
            ConstCounter::new(kernel_drops),
        )?;
        one(
            &mut encoder,
            "degraded",
            "Receive threads that suspect their own network and hold devices (0: all is well)",
            ConstGauge::new(totals.degraded as i64),
        )?;
        let sinks: Vec<_> = self.feeds.each().collect();
        let depth = sinks
            .iter()
            .map(|(name, depth, _)| (vec![("sink", name.to_string())], ConstGauge::new(*depth as i64)));
        family(
            &mut encoder,
            "sink_queue_depth",
            "Transitions waiting in each sink's buffer",
            depth.collect(),
        )?;
        let lost =
            sinks.iter().map(|(name, _, lost)| (vec![("sink", name.to_string())], ConstCounter::new(*lost)));
        family(&mut encoder, "sink_events_lost", "Transitions a sink could not deliver", lost.collect())?;
        let snapshots = [
            ("written", self.snapshots.written.load(Ordering::Relaxed)),
            ("failed", self.snapshots.failed.load(Ordering::Relaxed)),
        ];
        let snapshots =
            snapshots.iter().map(|(result, n)| (vec![("result", result.to_string())], ConstCounter::new(*n)));
        family(&mut encoder, "snapshots", "State snapshots (--state), by result", snapshots.collect())?;
        let last_ms = self.snapshots.last_unix_ms.load(Ordering::Relaxed);
        if last_ms > 0 {
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let age = now_ms.saturating_sub(last_ms) as f64 / 1000.0;
            one(
                &mut encoder,
                "snapshot_age_seconds",
                "Time since the last state snapshot was written",
                ConstGauge::new(age),
            )?;
            let took = self.snapshots.last_took_us.load(Ordering::Relaxed) as f64 / 1e6;
            one(
                &mut encoder,
                "snapshot_duration_seconds",
                "How long the last state snapshot took",
                ConstGauge::new(took),
            )?;
        }
        let build = vec![(vec![("version", env!("CARGO_PKG_VERSION").to_string())], ConstGauge::new(1i64))];
        family(&mut encoder, "build_info", "The running build", build)?;
        Ok(())
    }
}
