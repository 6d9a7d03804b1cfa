//! How `status` shows things to a person: the summary, one device, a list.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use presence::client::{DeviceReport, SummaryReport, printable};

pub(crate) fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// `n` and the noun, in the singular for one.
pub(crate) fn count(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A duration in whole seconds, as humans write it (`59m 51s`).
pub(crate) fn fmt_secs(ms: u64) -> String {
    fmt_ms(ms.div_ceil(1000) * 1000)
}

pub(crate) fn write_summary(out: &mut impl Write, server: SocketAddr, s: &SummaryReport) -> io::Result<()> {
    writeln!(out, "server      {server}, up {}", fmt_ms(s.counts.uptime_ms / 1000 * 1000))?;
    writeln!(
        out,
        "online      {} of {}",
        s.counts.online,
        count(s.counts.known, "known device", "known devices")
    )?;
    writeln!(
        out,
        "received    {}, {}, {}",
        count(s.counts.heartbeats, "heartbeat", "heartbeats"),
        count(s.counts.leaves, "leave", "leaves"),
        count(s.counts.queries, "query", "queries")
    )?;
    if s.counts.late > 0 {
        writeln!(out, "suspect     {} late, {} of them held", s.counts.late, s.counts.held)?;
    }
    if s.counts.degraded > 0 {
        writeln!(
            out,
            "degraded    the server suspects its own network: it holds silent devices as suspect instead of taking them offline, until heartbeats come back or --max-hold passes"
        )?;
    }
    writeln!(out, "expired     {}", s.counts.expirations)?;
    if s.events_lost > 0 {
        writeln!(out, "events      {} lost (the server could not write them; see its log)", s.events_lost)?;
    }
    if s.snapshots_failed > 0 {
        writeln!(out, "state       {} snapshots not written (see the server's log)", s.snapshots_failed)?;
    }
    if s.drops.is_empty() {
        writeln!(out, "dropped     0")?;
    } else {
        let reasons: Vec<String> = s.drops.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        writeln!(out, "dropped     {} ({})", s.total_drops(), reasons.join(", "))?;
    }
    Ok(())
}

pub(crate) fn payload_text(report: &DeviceReport) -> String {
    let hex = presence::hex::encode(&report.payload);
    match std::str::from_utf8(&report.payload) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?} (hex {hex})"),
        _ => format!("hex {hex}"),
    }
}

pub(crate) fn write_device(out: &mut impl Write, r: &DeviceReport) -> io::Result<()> {
    let last_seen = UNIX_EPOCH + Duration::from_millis(r.numbers.last_seen_unix_ms);
    let device = printable(&r.device);
    match (r.online, r.offline_reason, r.offline_since_unix_ms) {
        (true, _, _) if r.held => writeln!(
            out,
            "{device}  suspect (held: its deadline passed while the server suspects its own network)"
        )?,
        (true, _, _) if r.state == "suspect" => writeln!(
            out,
            "{device}  suspect (late: no heartbeat for {}), expires in {}",
            fmt_ms(r.numbers.last_seen_ago_ms),
            fmt_ms(r.numbers.expires_in_ms)
        )?,
        (true, _, _) => writeln!(out, "{device}  online, expires in {}", fmt_ms(r.numbers.expires_in_ms))?,
        (false, Some("expired"), Some(since)) => writeln!(
            out,
            "{device}  offline since {} (expired: no heartbeat for {})",
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(since)),
            fmt_ms(r.numbers.ttl_ms.into())
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
        fmt_ms(r.numbers.last_seen_ago_ms)
    )?;
    let interval = if r.numbers.interval_ms == 0 {
        "none declared".to_string()
    } else {
        fmt_ms(r.numbers.interval_ms.into())
    };
    writeln!(out, "  interval    {interval}, ttl {}", fmt_ms(r.numbers.ttl_ms.into()))?;
    writeln!(
        out,
        "  boot {}  seq {}  heartbeats {}  flap score {}  version {}",
        r.numbers.boot, r.numbers.seq, r.numbers.heartbeats, r.numbers.flaps, r.numbers.version
    )?;
    if !r.payload.is_empty() {
        writeln!(out, "  payload     {}", payload_text(r))?;
    }
    Ok(())
}

pub(crate) fn write_list(out: &mut impl Write, devices: &[DeviceReport], what: &str) -> io::Result<()> {
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
            format!("{} ago", fmt_ms(d.numbers.last_seen_ago_ms / 1000 * 1000)),
            format!("in {}", fmt_secs(d.numbers.expires_in_ms)),
            d.numbers.heartbeats
        )?;
    }
    writeln!(out, "{} {what}", devices.len())
}
