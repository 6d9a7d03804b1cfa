//! The presence table against its baselines, at 1 k, 100 k and 1 M devices.
//!
//! Run: `cargo bench --bench table`. Heartbeats arrive in a random order
//! (a fixed shuffle). Baselines, measured in the same run:
//! - `hashmap_only`: a bare `HashMap` update (what a heartbeat costs with no
//!   expiry order at all);
//! - `eager_tree`: `HashMap` + `BTreeSet<(deadline, id)>` remove/insert on every
//!   heartbeat (the naive ordered table);
//! - `full_scan`: a `HashMap` swept by scanning every entry (the periodic
//!   scanner), for the expiry benchmarks.

use presence::time::Instant;
use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use presence::table::{Beat, PresenceTable};

const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
const TTL: Duration = Duration::from_secs(30);

fn main() {
    divan::main();
}

fn ids(n: usize) -> Vec<Arc<str>> {
    (0..n).map(|i| Arc::from(format!("device-{i:010}"))).collect()
}

/// A fixed pseudo-random permutation of 0..n (xorshift Fisher-Yates).
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

fn beat(seq: u32) -> Beat<'static> {
    Beat {
        addr: SocketAddr::from(([10, 0, 0, 1], 4000)),
        boot: 1,
        seq,
        interval: Duration::from_secs(10),
        ttl: TTL,
        payload: &[],
        signed: false,
    }
}

fn filled_table(ids: &[Arc<str>], t0: Instant) -> PresenceTable {
    let mut table = PresenceTable::new(usize::MAX, t0);
    for id in ids {
        table.beat(t0, id.as_bytes(), beat(1)).unwrap();
    }
    table
}

/// One heartbeat into the presence table, steady state (device online).
#[divan::bench(args = SIZES, sample_count = 50, sample_size = 2000)]
fn beat_presence_table(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let order = shuffled(n);
    let t0 = Instant::from_micros(1 << 40);
    let mut table = filled_table(&ids, t0);
    let mut i = 0usize;
    bencher.bench_local(|| {
        let id = &ids[order[i % n]];
        let now = t0 + Duration::from_micros(i as u64);
        let result = table.beat(now, black_box(id.as_bytes()), beat((i / n) as u32 + 2));
        i += 1;
        result
    });
}

/// Baseline: the same heartbeat as a bare `HashMap` update.
#[divan::bench(args = SIZES, sample_count = 50, sample_size = 2000)]
fn beat_hashmap_only(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let order = shuffled(n);
    let t0 = Instant::from_micros(1 << 40);
    let mut map: HashMap<Arc<str>, (Instant, u32)> = ids.iter().map(|id| (id.clone(), (t0, 1))).collect();
    let mut i = 0usize;
    bencher.bench_local(|| {
        let id: &str = &ids[order[i % n]];
        let now = t0 + Duration::from_micros(i as u64);
        if let Some(entry) = map.get_mut(black_box(id)) {
            *entry = (now + TTL, entry.1 + 1);
        }
        i += 1;
    });
}

/// Baseline: `HashMap` + `BTreeSet` remove/insert on every heartbeat.
#[divan::bench(args = SIZES, sample_count = 50, sample_size = 2000)]
fn beat_eager_tree(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let order = shuffled(n);
    let t0 = Instant::from_micros(1 << 40);
    let mut map: HashMap<Arc<str>, Instant> = ids.iter().map(|id| (id.clone(), t0 + TTL)).collect();
    let mut tree: BTreeSet<(Instant, Arc<str>)> = ids.iter().map(|id| (t0 + TTL, id.clone())).collect();
    let mut i = 0usize;
    bencher.bench_local(|| {
        let id = &ids[order[i % n]];
        let now = t0 + Duration::from_micros(i as u64);
        if let Some(deadline) = map.get_mut(&**black_box(id)) {
            tree.remove(&(*deadline, id.clone()));
            *deadline = now + TTL;
            tree.insert((*deadline, id.clone()));
        }
        i += 1;
    });
}

/// Looking up one device.
#[divan::bench(args = SIZES)]
fn lookup(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let table = filled_table(&ids, Instant::from_micros(1 << 40));
    let mut i = 0usize;
    bencher.bench_local(|| {
        i = (i + 7919) % n;
        table.get(black_box(&ids[i])).is_some()
    });
}

/// Reading one page of 20 online devices from the middle of the list.
#[divan::bench(args = SIZES)]
fn list_page(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let table = filled_table(&ids, Instant::from_micros(1 << 40));
    bencher.bench_local(|| table.online_from(black_box(n / 2)).take(20).count());
}

/// Expiry with 1 000 of n devices due: the presence table pops just those.
#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn expire_1000_presence_table(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let t0 = Instant::from_micros(1 << 40);
    bencher
        .with_inputs(|| {
            let mut table = PresenceTable::new(usize::MAX, t0);
            // 1 000 devices due at t0 + TTL, the rest a minute later.
            for (i, id) in ids.iter().enumerate() {
                let at = if i < 1000 { t0 } else { t0 + Duration::from_secs(60) };
                table.beat(at, id.as_bytes(), beat(1)).unwrap();
            }
            table
        })
        .bench_local_refs(|table| {
            let mut expired = 0usize;
            table.expire(t0 + TTL, |_, _| expired += 1);
            assert_eq!(expired, 1000.min(n));
        });
}

/// Baseline: the periodic scanner's sweep, which looks at every device.
#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn expire_1000_full_scan(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let t0 = Instant::from_micros(1 << 40);
    bencher
        .with_inputs(|| {
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), if i < 1000 { t0 + TTL } else { t0 + TTL * 3 }))
                .collect::<HashMap<Arc<str>, Instant>>()
        })
        .bench_local_refs(|map| {
            let now = t0 + TTL;
            let mut expired = Vec::new();
            map.retain(|id, deadline| {
                let due = *deadline <= now;
                if due {
                    expired.push(id.clone());
                }
                !due
            });
            assert_eq!(expired.len(), 1000.min(n));
        });
}

/// An idle sweep (nothing due) of the presence table.
#[divan::bench(args = SIZES)]
fn expire_none_presence_table(bencher: divan::Bencher, n: usize) {
    let ids = ids(n);
    let t0 = Instant::from_micros(1 << 40);
    let mut table = filled_table(&ids, t0);
    bencher.bench_local(|| table.expire(black_box(t0), |_, _| {}));
}
