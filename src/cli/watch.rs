//! `presence watch`: transitions live from NATS JetStream, for an operator.
//! It reads the stream a tracker with `--nats` writes, through an ordered
//! consumer of its own (nothing is left behind on the server), optionally
//! replaying `--since` first.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use presence::sink::{connect_options, names};

use super::args::WatchArgs;

pub(crate) fn watch(args: WatchArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(follow(args))
}

async fn follow(args: WatchArgs) -> Result<ExitCode> {
    let client = connect_options("presence watch", &args.nats_auth.auth())
        .await?
        .connect(presence::sink::servers(&args.nats))
        .await
        .with_context(|| format!("cannot connect to NATS at {}", args.nats))?;
    let jetstream = jetstream::new(client);
    let (stream_name, prefix) = match &args.cluster {
        Some(cluster) => {
            let names = presence::sink::cluster::ClusterNames { cluster: cluster.clone() };
            (names.stream(), names.subject(None).trim_end_matches(".>").to_string())
        }
        None => (args.nats_names.nats_stream.clone(), args.nats_names.nats_subject_prefix.clone()),
    };
    let stream = jetstream.get_stream(&stream_name).await.with_context(|| {
        let flag = if args.cluster.is_some() { "--nats and --cluster" } else { "--nats" };
        format!("no stream '{stream_name}' on {}: is a tracker running with {flag} there?", args.nats)
    })?;
    let prefix = &prefix;
    let filter_subjects: Vec<String> = if args.devices.is_empty() {
        vec![format!("{prefix}.>")]
    } else {
        args.devices.iter().map(|device| format!("{prefix}.{}", names::encode(device))).collect()
    };
    let deliver_policy = match args.since {
        None => consumer::DeliverPolicy::New,
        Some(since) => {
            consumer::DeliverPolicy::ByStartTime { start_time: time::OffsetDateTime::now_utc() - since }
        }
    };
    let config = consumer::pull::OrderedConfig { filter_subjects, deliver_policy, ..Default::default() };
    let consumer = stream.create_consumer(config).await.context("cannot follow the stream")?;
    let mut messages = consumer.messages().await.context("cannot follow the stream")?;
    let mut out = io::stdout();
    while let Some(message) = messages.next().await {
        let message = message.context("the stream broke off")?;
        let line = String::from_utf8_lossy(&message.payload);
        if args.json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", render(&line))?;
        }
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One transition as a line of text: time, device, what, and the numbers.
fn render(line: &str) -> String {
    let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { return line.to_string() };
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_string();
    let mut what = text("event");
    for key in ["reason", "from", "state"] {
        if let Some(value) = event[key].as_str() {
            what.push_str(&format!(" {key}={value}"));
        }
    }
    let who = match event["device"].as_str() {
        Some(device) => presence::text::printable(device).to_string(),
        None => "(fleet)".to_string(),
    };
    let version = event["version"].as_u64().map(|v| format!("  v{v}")).unwrap_or_default();
    // A tracker's own transitions carry its event seq; fleet events, the node that caused them.
    let origin = match (event["seq"].as_u64(), event["node"].as_str()) {
        (Some(seq), _) => format!("  seq {seq}"),
        (None, Some(node)) => format!("  node {node}"),
        (None, None) => String::new(),
    };
    format!("{}  {who}  {what}{version}{origin}", text("time"))
}
