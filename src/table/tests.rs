use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn beat(ttl_ms: u64, seq: u32) -> Beat<'static> {
    Beat {
        addr: addr(1000 + seq as u16),
        boot: 1,
        seq,
        interval: Duration::ZERO,
        ttl: Duration::from_millis(ttl_ms),
        payload: b"p",
    }
}

fn expired(table: &mut PresenceTable, now: Instant) -> Vec<String> {
    let mut out = Vec::new();
    table.expire(now, |id, entry| {
        assert!(!entry.is_online());
        out.push(id.to_string());
    });
    out
}

#[test]
fn expires_at_the_deadline_and_not_before() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new();
    assert!(table.beat(t0, "a", beat(100, 1)));
    assert_eq!(table.next_deadline(), Some(t0 + Duration::from_millis(100)));
    assert!(expired(&mut table, t0 + Duration::from_millis(99)).is_empty());
    assert_eq!(expired(&mut table, t0 + Duration::from_millis(100)), ["a"]);
    assert_eq!(table.next_deadline(), None);
    let entry = table.get("a").unwrap();
    assert_eq!(
        (entry.flaps, entry.heartbeats, entry.is_online()),
        (1, 1, false)
    );
    table.assert_invariants();
}

#[test]
fn a_heartbeat_moves_the_deadline_and_keeps_the_device_once() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new();
    assert!(table.beat(t0, "a", beat(100, 1)));
    assert!(!table.beat(t0 + Duration::from_millis(50), "a", beat(100, 2)));
    assert!(expired(&mut table, t0 + Duration::from_millis(120)).is_empty());
    assert_eq!(table.online_count(), 1);
    assert_eq!(
        table.get("a").unwrap().addr,
        addr(1002),
        "address follows the device"
    );
    assert_eq!(expired(&mut table, t0 + Duration::from_millis(150)), ["a"]);
    table.assert_invariants();
}

#[test]
fn leave_takes_a_device_offline_once() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new();
    table.beat(t0, "a", beat(100, 1));
    assert!(table.leave("a").is_some());
    assert!(table.leave("a").is_none());
    assert!(table.leave("unknown").is_none());
    assert_eq!(table.next_deadline(), None);
    assert_eq!(table.get("a").unwrap().flaps, 1);
    assert!(
        table.beat(t0, "a", beat(100, 2)),
        "a return is an online transition"
    );
    table.assert_invariants();
}

/// The naive model: a map scanned in full on every sweep.
#[derive(Debug, Default)]
struct Model {
    devices: BTreeMap<String, (Option<Instant>, u64, u32, u32)>, // deadline, heartbeats, flaps, seq
}

impl Model {
    fn expire(&mut self, now: Instant) -> Vec<String> {
        let mut due: Vec<(Instant, String)> = self
            .devices
            .iter()
            .filter_map(|(id, (deadline, ..))| {
                deadline.filter(|d| *d <= now).map(|d| (d, id.clone()))
            })
            .collect();
        due.sort();
        for (_, id) in &due {
            let device = self.devices.get_mut(id).unwrap();
            device.0 = None;
            device.2 += 1;
        }
        due.into_iter().map(|(_, id)| id).collect()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Beat { device: u8, ttl_ms: u64 },
    Leave { device: u8 },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 1u64..200).prop_map(|(device, ttl_ms)| Op::Beat { device, ttl_ms }),
        1 => (0u8..12).prop_map(|device| Op::Leave { device }),
        3 => (0u64..120).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_a_naive_model(ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut table = PresenceTable::new();
        let mut model = Model::default();
        let mut seq = 0u32;
        for op in ops {
            if let Op::Advance { ms } = op {
                now += Duration::from_millis(ms);
            }
            // Every step sweeps first, as the engine does.
            prop_assert_eq!(expired(&mut table, now), model.expire(now));
            let id = |d: u8| format!("dev-{d:02}");
            match op {
                Op::Beat { device, ttl_ms } => {
                    seq += 1;
                    let came_online = table.beat(now, &id(device), beat(ttl_ms, seq));
                    let m = model.devices.entry(id(device)).or_insert((None, 0, 0, 0));
                    prop_assert_eq!(came_online, m.0.is_none());
                    *m = (Some(now + Duration::from_millis(ttl_ms)), m.1 + 1, m.2, seq);
                }
                Op::Leave { device } => {
                    let left = table.leave(&id(device)).is_some();
                    let m = model.devices.get_mut(&id(device));
                    let was_online = m.as_ref().is_some_and(|m| m.0.is_some());
                    prop_assert_eq!(left, was_online);
                    if let Some(m) = m.filter(|_| was_online) {
                        m.0 = None;
                        m.2 += 1;
                    }
                }
                Op::Advance { .. } => {}
            }
            table.assert_invariants();
            prop_assert_eq!(table.next_deadline(), model.devices.values().filter_map(|m| m.0).min());
            prop_assert_eq!(table.known_count(), model.devices.len());
            for (id, (deadline, heartbeats, flaps, seq)) in &model.devices {
                let entry = table.get(id).unwrap();
                prop_assert_eq!((entry.deadline, entry.heartbeats, entry.flaps, entry.seq), (*deadline, *heartbeats, *flaps, *seq));
            }
            let online: Vec<String> = model.devices.iter().filter(|(_, m)| m.0.is_some()).map(|(id, _)| id.clone()).collect();
            let listed: Vec<String> = table.online_after(None).map(|(id, _)| id.to_string()).collect();
            prop_assert_eq!(&listed, &online);
            if let Some(cursor) = online.get(online.len() / 2) {
                let after: Vec<String> = table.online_after(Some(cursor)).map(|(id, _)| id.to_string()).collect();
                prop_assert_eq!(after, online.iter().filter(|id| *id > cursor).cloned().collect::<Vec<_>>());
            }
        }
    }
}
