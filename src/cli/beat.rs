//! `presence beat`: heartbeats as a device would send them.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use presence::client::{BeatEvent, Sender, printable};
use presence::keyfile::KeyFile;

use super::args::BeatArgs;
use super::render::fmt_ms;
use crate::{on_signal, resolve};

pub(crate) fn beat(args: BeatArgs) -> Result<ExitCode> {
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
        (None, Some(hex)) => {
            presence::hex::decode(hex.trim()).context("--payload-hex must be hex digits, two per byte")?
        }
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
    let mut warned_ttl = false;
    let outcome = sender.run(args.count, args.ack, &interrupt, |event| {
        match event {
            BeatEvent::Sent { seq, len } => say!("heartbeat seq={seq} ({len} bytes)")?,
            BeatEvent::NotSent(e) => eprintln!("warning: heartbeat not sent: {e}"),
            BeatEvent::Acked(ack) => {
                say!(
                    "ack seq={}: server expects a heartbeat every {}, offline after {} of silence",
                    ack.seq,
                    fmt_ms(ack.interval_ms.into()),
                    fmt_ms(ack.ttl_ms.into())
                )?;
                if Duration::from_millis(ack.ttl_ms.into()) < args.interval && !warned_ttl {
                    warned_ttl = true;
                    eprintln!(
                        "WARNING: the server takes this device offline after {} of silence, but it beats every {}: it will go offline between heartbeats. Beat more often (--interval {} or less), or raise the server's --max-ttl.",
                        fmt_ms(ack.ttl_ms.into()),
                        humantime::format_duration(args.interval),
                        fmt_ms(u64::from(ack.ttl_ms) / 2)
                    );
                }
            }
            BeatEvent::NoAck { seq, waited } => {
                eprintln!("warning: no ack for seq={seq} within {}", humantime::format_duration(waited))
            }
            BeatEvent::AckFailed { seq, error } => eprintln!("warning: no ack for seq={seq}: {error}"),
            BeatEvent::Left => say!("sent leave")?,
            _ => {}
        }
        Ok(())
    });
    let outcome = outcome.context("cannot send heartbeats")?;
    let (sent, acked) = (outcome.sent, outcome.acked);
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
