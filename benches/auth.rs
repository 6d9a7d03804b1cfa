//! What authentication costs the server per heartbeat.
//!
//! Run: `cargo bench --bench auth`. Compare `derive_and_verify` with
//! `decode` (the baseline every datagram pays anyway), and
//! `engine_signed_required` with `engine_unsigned_off` (the whole engine,
//! steady state, one known device heartbeating).

use presence::time::Instant;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use presence::auth;
use presence::tracker::{AuthMode, Config, Keys, Tracker};
use presence::wire::{self, Heartbeat, Message};

const MASTER: auth::Key = [3; 32];
const DEVICE: &str = "sensor-0000042"; // a 14-byte id

fn main() {
    divan::main();
}

fn heartbeat(seq: u32) -> Message<'static> {
    Message::Heartbeat(Heartbeat { payload: b"bat=97", ..Heartbeat::new(DEVICE, 1_790_000_000, seq, 10_000) })
}

fn signed_frame(seq: u32) -> Vec<u8> {
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let len = auth::encode_signed(&heartbeat(seq), &auth::device_key(&MASTER, DEVICE), &mut buf).unwrap();
    buf[..len].to_vec()
}

fn unsigned_frame(seq: u32) -> Vec<u8> {
    let mut buf = [0u8; wire::MAX_DATAGRAM];
    let len = wire::encode(&heartbeat(seq), &mut buf).unwrap();
    buf[..len].to_vec()
}

/// Baseline: decoding and validating a signed heartbeat.
#[divan::bench]
fn decode(bencher: divan::Bencher) {
    let frame = signed_frame(1);
    bencher.bench(|| wire::decode(black_box(&frame)).is_ok());
}

/// Deriving the device key from the subkey and the id (one BLAKE3 compression).
#[divan::bench]
fn derive_device_key(bencher: divan::Bencher) {
    let subkey = auth::device_subkey(&MASTER);
    bencher.bench(|| auth::device_key_from_subkey(black_box(&subkey), black_box(DEVICE)));
}

/// Checking a tag with a known key (one BLAKE3 compression for a short frame).
#[divan::bench]
fn verify_tag(bencher: divan::Bencher) {
    let frame = signed_frame(1);
    let key = auth::device_key(&MASTER, DEVICE);
    let message = wire::decode(&frame).unwrap();
    let (signed, tag) = auth::signed_part(&frame, &message).unwrap();
    bencher.bench(|| auth::verify(black_box(&key), black_box(signed), black_box(&tag)));
}

/// What the server does per signed heartbeat: derive the key, check the tag.
#[divan::bench]
fn derive_and_verify(bencher: divan::Bencher) {
    let frame = signed_frame(1);
    let subkey = auth::device_subkey(&MASTER);
    let message = wire::decode(&frame).unwrap();
    let (signed, tag) = auth::signed_part(&frame, &message).unwrap();
    bencher.bench(|| {
        let key = auth::device_key_from_subkey(black_box(&subkey), black_box(DEVICE));
        auth::verify(&key, black_box(signed), &tag)
    });
}

/// The whole engine on a stream of heartbeats from one known device.
fn engine(bencher: divan::Bencher, auth: AuthMode, frame: fn(u32) -> Vec<u8>) {
    let config = Config { auth, keys: Some(Keys::from_master(&MASTER)), ..Config::default() };
    let t0 = Instant::from_micros(1 << 40);
    let mut tracker = Tracker::new(config, t0, UNIX_EPOCH).unwrap();
    let from: SocketAddr = "10.0.0.1:4000".parse().unwrap();
    // Frames with increasing seqs, so the replay window accepts each once.
    // More than the samples below take, so no frame is replayed.
    let frames: Vec<Vec<u8>> = (1..=1_000_000).map(frame).collect();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let mut i = 0usize;
    bencher.bench_local(|| {
        let now = t0 + Duration::from_micros(i as u64);
        let handled = tracker.handle(now, from, black_box(&frames[i % frames.len()]), &mut reply);
        i += 1;
        handled
    });
}

/// Engine, `--auth off`, unsigned heartbeats (the baseline).
#[divan::bench(sample_count = 100, sample_size = 1000)]
fn engine_unsigned_off(bencher: divan::Bencher) {
    engine(bencher, AuthMode::Off, unsigned_frame);
}

/// Engine, `--auth required`, signed heartbeats.
#[divan::bench(sample_count = 100, sample_size = 1000)]
fn engine_signed_required(bencher: divan::Bencher) {
    engine(bencher, AuthMode::Required, signed_frame);
}
