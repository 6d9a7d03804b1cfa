//! The engine's datagram handler, fed a sequence of datagrams and time steps.
//!
//! Input: byte 0 picks the auth mode; then records of
//! `[len: u8][advance_ms: u8][resign: u8][len bytes]`. With `resign` odd, a
//! datagram that decodes as a heartbeat, leave or query is re-signed with the
//! right key, so the fuzzer also reaches the code behind authentication.
//! Checked: no panic, replies never larger than requests, drops change
//! nothing but one counter, and the table's indexes always agree.
#![no_main]

use std::net::SocketAddr;
use presence::time::Instant;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use presence::auth;
use presence::tracker::{AuthMode, Config, Handled, Keys, Tracker};
use presence::wire::{self, Message};

const MASTER: auth::Key = [9; 32];

fn resign(datagram: &[u8]) -> Option<Vec<u8>> {
    let message = wire::decode(datagram).ok()?;
    let key = match &message {
        Message::Heartbeat(m) => auth::device_key(&MASTER, m.device),
        Message::Leave(m) => auth::device_key(&MASTER, m.device),
        Message::Query(_) => auth::operator_key(&MASTER),
        _ => return None,
    };
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let len = auth::encode_signed(&message, &key, &mut buf).ok()?;
    Some(buf[..len].to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let auth = match mode % 3 {
        0 => AuthMode::Off,
        1 => AuthMode::Optional,
        _ => AuthMode::Required,
    };
    let config = Config {
        auth,
        keys: Some(Keys::from_master(&MASTER)),
        max_devices: 16,
        query_allow: if mode & 0x80 == 0 { Config::default().query_allow } else { Vec::new() },
        ..Config::default()
    };
    let t0 = Instant::from_micros(1 << 40);
    let mut now = t0;
    let mut tracker = Tracker::new(config, t0, UNIX_EPOCH).unwrap();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    while let [len, advance, sign, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_millis(u64::from(*advance) * 50);
        let datagram = match sign % 2 {
            1 => resign(datagram).unwrap_or_else(|| datagram.to_vec()),
            _ => datagram.to_vec(),
        };
        tracker.handle_timeout(now);
        let before = (tracker.table().known_count(), tracker.table().online_count(), tracker.counters().heartbeats());
        let drops = tracker.counters().total_drops();
        let handled = tracker.handle(now, from, &datagram, &mut reply);
        if let Some(n) = handled.reply_len() {
            assert!(n <= datagram.len(), "a {n}-byte reply to a {}-byte datagram", datagram.len());
        }
        if let Handled::Dropped { .. } = handled {
            let after = (tracker.table().known_count(), tracker.table().online_count(), tracker.counters().heartbeats());
            assert_eq!(before, after);
            assert_eq!(tracker.counters().total_drops(), drops + 1);
        }
        while tracker.poll_event().is_some() {}
        tracker.table().assert_invariants();
    }
});
