//! Any bytes as a state file: `Snapshot::read` never panics, and a file it
//! accepts restores into engines whose tables hold their invariants. The
//! bytes are also wrapped as the records of a file with a right checksum
//! (a fuzzer cannot forge BLAKE3), so record decoding and restore get
//! arbitrary input too.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use presence::state::{Chunk, Encoder, Snapshot};
use presence::time::Instant;
use presence::tracker::{Config, Tracker};

fn restore(file: &[u8]) {
    let Ok(snapshot) = Snapshot::read(file) else { return };
    let now = Instant::from_micros(1 << 40);
    let wall: SystemTime = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let config = Config { max_devices: 64, ..Config::default() };
    let (trackers, restored) = Tracker::restore_sharded(config, 2, now, wall, &snapshot).expect("valid config");
    assert!(restored.devices + restored.duplicates + restored.refused <= snapshot.records);
    for tracker in &trackers {
        tracker.table().assert_invariants();
    }
}

fuzz_target!(|data: &[u8]| {
    restore(data);
    let Some((&count, records)) = data.split_first() else { return };
    let (mut encoder, header) = Encoder::start();
    let chunk = Chunk { bytes: records.to_vec(), records: u64::from(count) };
    encoder.add(&chunk);
    let mut file = header.to_vec();
    file.extend_from_slice(records);
    file.extend_from_slice(&encoder.finish(7, UNIX_EPOCH + Duration::from_secs(1_800_000_000), true));
    restore(&file);
});
