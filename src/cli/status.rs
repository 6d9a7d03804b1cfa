//! `presence status`: a summary, one device, or a listing.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use presence::client::{Client, DeviceReport, printable};
use presence::keyfile::KeyFile;
use presence::wire::ListFilter;

use super::args::StatusArgs;
use super::render::{fmt_ms, write_device, write_list, write_summary};
use crate::resolve;

pub(crate) fn status(args: StatusArgs) -> Result<ExitCode> {
    if let (Some(url), Some(cluster)) = (&args.nats, &args.cluster) {
        return super::fleet::status(&args, url, cluster);
    }
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
pub(crate) fn unknown_device_json(device: &str) -> serde_json::Value {
    let keys = serde_json::to_value(DeviceReport {
        device: String::new(),
        known: false,
        online: false,
        state: "unknown",
        held: false,
        offline_reason: None,
        offline_since_unix_ms: None,
        address: SocketAddr::from(([0, 0, 0, 0], 0)),
        numbers: presence::wire::DeviceNumbers::default(),
        payload: Vec::new(),
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
pub(crate) fn list_with_progress(
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
