//! `presence status --nats URL --cluster NAME`: the fleet view of several
//! trackers, read from NATS (CLUSTER.md), in the forms and with the exit
//! codes of `status --server`: 0 online, 1 offline or unknown, 2 error.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use presence::client::printable;
use presence::sink::cluster::{ClusterNames, FleetView, Stored, node_of, read_view};
use presence::sink::connect_options;

use super::args::StatusArgs;
use super::render::fmt_ms;

pub(crate) fn status(args: &StatusArgs, url: &str, cluster: &str) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let names = ClusterNames { cluster: cluster.to_string() };
    let view = runtime.block_on(async {
        let client = connect_options("presence status", &args.nats_auth.auth())
            .await?
            .connect(presence::sink::servers(url))
            .await
            .with_context(|| format!("cannot connect to NATS at {url}"))?;
        let jetstream = async_nats::jetstream::new(client);
        let view = tokio::time::timeout(args.timeout.max(Duration::from_secs(5)), read_view(&jetstream, &names, args.device.as_deref()))
            .await
            .map_err(|_| anyhow::anyhow!("NATS at {url} did not answer in time"))?
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot read the fleet view of cluster '{cluster}' from {url} (is a tracker running with --cluster {cluster} there?)"))?;
        Ok::<_, anyhow::Error>(view)
    })?;
    let mut out = io::stdout().lock();
    if let Some(device) = &args.device {
        let found = view.devices.iter().find(|(id, _)| id == device);
        let online = found.is_some_and(|(_, stored)| stored.hearers.online);
        match (found, args.json) {
            (Some((id, stored)), true) => {
                writeln!(out, "{}", serde_json::to_string_pretty(&device_json(&view, id, stored))?)?
            }
            (Some((id, stored)), false) => write_device(&mut out, &view, id, stored)?,
            (None, true) => writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "device": device, "known": false, "online": false, "version": null, "nodes": [], "last_event": null
                }))?
            )?,
            (None, false) => {
                writeln!(out, "{}  unknown (no tracker of the cluster has heard from it)", printable(device))?
            }
        }
        return Ok(if online { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if args.list || args.offline || args.all || args.prefix.is_some() || args.count {
        let what = match (args.offline, args.all) {
            (true, _) => "offline",
            (_, true) => "known",
            _ => "online",
        };
        let selected: Vec<&(String, Stored)> = view
            .devices
            .iter()
            .filter(|(id, stored)| {
                let state = match what {
                    "offline" => !stored.hearers.online,
                    "online" => stored.hearers.online,
                    _ => true,
                };
                state && args.prefix.as_deref().is_none_or(|prefix| id.starts_with(prefix))
            })
            .collect();
        if args.count {
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "count": selected.len(), "state": what, "prefix": args.prefix })
                )?;
            } else {
                writeln!(out, "{}", selected.len())?;
            }
        } else if args.json {
            let all: Vec<_> = selected.iter().map(|(id, stored)| device_json(&view, id, stored)).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        } else {
            write_list(&mut out, &view, &selected, what)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let online = view.devices.iter().filter(|(_, stored)| stored.hearers.online).count();
    let mut nodes: Vec<_> = view.nodes.values().collect();
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    if args.json {
        let nodes: Vec<_> = nodes
            .iter()
            .map(|n| serde_json::json!({ "node": n.node, "state": n.state, "addr": n.addr, "started_unix_ms": n.started_unix_ms }))
            .collect();
        let summary = serde_json::json!({
            "cluster": cluster,
            "nodes": nodes,
            "online": online,
            "known": view.devices.len(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(out, "cluster     {cluster} on {url}")?;
        let described: Vec<String> =
            nodes.iter().map(|n| format!("{} ({}, {})", n.node, n.addr, n.state)).collect();
        writeln!(out, "nodes       {} live: {}", nodes.len(), described.join(", "))?;
        writeln!(out, "online      {online} of {} known devices", view.devices.len())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The hearers of a device, newest (boot, seq) first, with whether each is live.
fn hearers<'a>(view: &FleetView, stored: &'a Stored) -> Vec<(&'a str, &'a presence::fleet::Hearing, bool)> {
    let mut all: Vec<_> = stored
        .hearers
        .hearers
        .iter()
        .map(|(hearer, hearing)| (hearer.as_str(), hearing, view.live(hearer)))
        .collect();
    all.sort_by_key(|h| std::cmp::Reverse((h.1.boot, h.1.seq)));
    all
}

fn device_json(view: &FleetView, id: &str, stored: &Stored) -> serde_json::Value {
    let nodes: Vec<_> = hearers(view, stored)
        .into_iter()
        .map(|(hearer, hearing, live)| {
            serde_json::json!({
                "node": node_of(hearer),
                "instance": hearer,
                "live": live,
                "since_unix_ms": hearing.since_unix_ms,
                "boot": hearing.boot,
                "seq": hearing.seq,
                "ttl_ms": hearing.ttl_ms,
            })
        })
        .collect();
    serde_json::json!({
        "device": id,
        "known": true,
        "online": stored.hearers.online,
        "version": stored.hearers.gversion,
        "nodes": nodes,
        "last_event": stored.event,
    })
}

fn write_device(out: &mut impl Write, view: &FleetView, id: &str, stored: &Stored) -> io::Result<()> {
    let device = printable(id);
    let since = stored.event.as_ref().and_then(|event| event["time"].as_str()).unwrap_or("?");
    if stored.hearers.online {
        writeln!(out, "{device}  online since {since} (fleet version {})", stored.hearers.gversion)?;
    } else {
        let reason = stored.event.as_ref().and_then(|event| event["reason"].as_str()).unwrap_or("expired");
        writeln!(
            out,
            "{device}  offline since {since} ({reason}; fleet version {})",
            stored.hearers.gversion
        )?;
    }
    let all = hearers(view, stored);
    if all.is_empty() {
        writeln!(out, "  heard by    no tracker")?;
    }
    for (hearer, hearing, live) in all {
        let started =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(hearing.since_unix_ms));
        writeln!(
            out,
            "  heard by    {}{} since {started}, boot {} seq {}, ttl {}",
            node_of(hearer),
            if live { "" } else { " (dead: its claim no longer counts)" },
            hearing.boot,
            hearing.seq,
            fmt_ms(hearing.ttl_ms.into())
        )?;
    }
    Ok(())
}

fn write_list(
    out: &mut impl Write,
    view: &FleetView,
    devices: &[&(String, Stored)],
    what: &str,
) -> io::Result<()> {
    let width = devices.iter().map(|(id, _)| printable(id).chars().count()).max().unwrap_or(6).max(6);
    writeln!(out, "{:<width$}  {:<7}  {:>7}  NODES", "DEVICE", "STATE", "VERSION")?;
    for (id, stored) in devices {
        let nodes: Vec<String> = hearers(view, stored)
            .into_iter()
            .map(
                |(hearer, _, live)| {
                    if live { node_of(hearer).to_string() } else { format!("{}(dead)", node_of(hearer)) }
                },
            )
            .collect();
        writeln!(
            out,
            "{:<width$}  {:<7}  {:>7}  {}",
            printable(id),
            if stored.hearers.online { "online" } else { "offline" },
            stored.hearers.gversion,
            if nodes.is_empty() { "-".to_string() } else { nodes.join(",") }
        )?;
    }
    writeln!(out, "{} {what}", devices.len())
}
