//! End to end: several trackers, one fleet view (`--cluster`, CLUSTER.md),
//! against a real 3-server nats-server cluster with JetStream (replicas 3),
//! started by the tests on free loopback ports and stopped by PID. The
//! devices are a thread of the test that sends heartbeats to whichever
//! tracker the test routes each one to, as a load balancer would.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{PROMPTLY, Server, poll};
use presence::wire::{Heartbeat, Message};

const CLUSTER: &str = "t";
/// Heartbeats declare 1 s, so each tracker gives a device 3 s (3 misses).
const INTERVAL_MS: u32 = 1000;
const TTL: Duration = Duration::from_secs(3);
/// How late a node's death can make an offline (CLUSTER.md rule 4): its
/// liveness interval, the liveness key's life, one read of the bucket,
/// and room for a loaded machine.
const DEATH_BOUND: Duration = Duration::from_secs(2 + 6 + 1 + 4);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nats_binary() -> String {
    let found = Command::new("sh").args(["-c", "command -v nats-server"]).output().unwrap();
    assert!(
        found.status.success(),
        "nats-server is not installed: run the tests with tests/run, which installs it"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_string()
}

/// One server of the NATS cluster.
struct NatsNode {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
}

impl NatsNode {
    fn spawn(&mut self) {
        let child = Command::new(nats_binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let port = self.port;
        poll("nats-server to listen", PROMPTLY, || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A 3-server NATS cluster with JetStream, killed on drop. Its servers do
/// not tell clients about each other (`no_advertise`), so a tracker given
/// one server's URL is cut off when that server dies.
struct NatsCluster {
    nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    fn start() -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| format!("\"nats://127.0.0.1:{r}\""))
                .collect();
            let store = dir.path().join(format!("js{i}"));
            let config = dir.path().join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ncluster {{ name: presence-test, no_advertise: true, listen: \"127.0.0.1:{route}\", routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            nodes.push(NatsNode { child: None, port: *port, config });
        }
        for node in &mut nodes {
            node.spawn();
        }
        NatsCluster { nodes, _dir: dir }
    }

    /// Every server's URL, comma-separated (a client fails over between them).
    fn urls(&self) -> String {
        self.nodes.iter().map(NatsNode::url).collect::<Vec<_>>().join(",")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// A tracker of the cluster.
fn tracker(nats: &str, node: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--nats", nats, "--cluster", CLUSTER, "--node", node, "--nats-replicas", "3"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Devices that beat, each to the tracker the test routes it to (or to
/// none: silent), a heartbeat every 300 ms with its sequence growing.
struct Devices {
    routes: Arc<Mutex<BTreeMap<String, Option<SocketAddr>>>>,
    /// When each device's last heartbeat left.
    last_sent: Arc<Mutex<HashMap<String, SystemTime>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Devices {
    fn start() -> Devices {
        let routes: Arc<Mutex<BTreeMap<String, Option<SocketAddr>>>> = Arc::default();
        let last_sent: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (Arc::clone(&routes), Arc::clone(&last_sent), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut seq: HashMap<String, u32> = HashMap::new();
            // Bounded: a test that forgets to stop its devices still ends.
            let end = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                let routes = r.lock().unwrap().clone();
                for (device, to) in routes {
                    let Some(to) = to else { continue };
                    let n = seq.entry(device.clone()).or_insert(0);
                    *n += 1;
                    let frame =
                        common::frame(&Message::Heartbeat(Heartbeat::new(&device, 1, *n, INTERVAL_MS)));
                    socket.send_to(&frame, to).unwrap();
                    l.lock().unwrap().insert(device, SystemTime::now());
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Devices { routes, last_sent, stop, thread: Some(thread) }
    }

    fn route(&self, device: &str, to: Option<SocketAddr>) {
        self.routes.lock().unwrap().insert(device.to_string(), to);
    }

    /// When `device`'s last heartbeat left (after it was routed nowhere).
    fn last_sent(&self, device: &str) -> SystemTime {
        self.last_sent.lock().unwrap()[device]
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The fleet view through `presence status --nats ... --all --json`:
/// device → (online, the live nodes that hear it).
fn view(nats: &str) -> Option<BTreeMap<String, (bool, Vec<String>)>> {
    let out = common::cli(&["status", "--nats", nats, "--cluster", CLUSTER, "--all", "--json"]);
    if !out.status.success() {
        return None;
    }
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        all.iter()
            .map(|d| {
                let mut nodes: Vec<String> = d["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["live"] == true)
                    .map(|n| n["node"].as_str().unwrap().to_string())
                    .collect();
                nodes.sort();
                (d["device"].as_str().unwrap().to_string(), (d["online"] == true, nodes))
            })
            .collect(),
    )
}

/// How many trackers the fleet view shows live (`status --nats --json`).
fn live_nodes(nats: &str) -> Option<usize> {
    let out = common::cli(&["status", "--nats", nats, "--cluster", CLUSTER, "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    summary["nodes"].as_array().map(Vec::len)
}

/// Waits until `n` trackers are live in the fleet view.
fn wait_live(nats: &str, n: usize) {
    poll("the trackers to be live in the fleet view", Duration::from_secs(60), || {
        live_nodes(nats).filter(|live| *live == n)
    });
}

/// Every fleet event in the stream, in order, by device.
fn fleet_events(nats: &str) -> Option<BTreeMap<String, Vec<serde_json::Value>>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(nats.split(',').collect::<Vec<_>>())
            .await
            .ok()?;
        let jetstream = async_nats::jetstream::new(client);
        let mut stream = jetstream.get_stream(format!("PRESENCE_{CLUSTER}_FLEET")).await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let mut events: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for seq in 1..=last {
            if let Ok(message) = stream.get_raw_message(seq).await {
                let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                events.entry(event["device"].as_str().unwrap().to_string()).or_default().push(event);
            }
        }
        Some(events)
    })
}

/// Each device's fleet events alternate online/offline with versions 1, 2, ...
fn assert_well_ordered(events: &BTreeMap<String, Vec<serde_json::Value>>) {
    for (device, list) in events {
        for (i, event) in list.iter().enumerate() {
            assert_eq!(event["version"], i + 1, "{device}: versions go up by one: {list:#?}");
            let expected = if i % 2 == 0 { "online" } else { "offline" };
            assert_eq!(event["event"], expected, "{device}: online and offline alternate: {list:#?}");
        }
    }
}

fn kinds(events: &BTreeMap<String, Vec<serde_json::Value>>, device: &str) -> Vec<String> {
    events
        .get(device)
        .map_or_else(Vec::new, |list| list.iter().map(|e| e["event"].as_str().unwrap().to_string()).collect())
}

fn event_time(event: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(event["time"].as_str().unwrap()).unwrap()
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

#[test]
fn three_trackers_act_as_one_fleet_through_moves_a_death_and_a_drain() {
    let nats = NatsCluster::start();
    let urls = nats.urls();
    let a = tracker(&urls, "a", &[]);
    let mut b = tracker(&urls, "b", &["--drain"]);
    let mut c = tracker(&urls, "c", &[]);
    let trackers = [a.addr, b.addr, c.addr];
    let names = ["a", "b", "c"];
    wait_live(&urls, 3);
    let devices = Devices::start();
    let ids: Vec<String> = (0..18).map(|i| format!("dev-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        devices.route(id, Some(trackers[i % 3]));
    }

    // Steady state: the fleet view is the union of the three trackers.
    let expected: BTreeMap<String, (bool, Vec<String>)> =
        ids.iter().enumerate().map(|(i, id)| (id.clone(), (true, vec![names[i % 3].to_string()]))).collect();
    poll("the fleet view to hold every device on its tracker", Duration::from_secs(60), || {
        view(&urls).filter(|v| *v == expected)
    });
    let summary = common::stdout(&common::cli(&["status", "--nats", &urls, "--cluster", CLUSTER]));
    assert!(summary.contains("nodes       3 live"), "{summary}");
    assert!(summary.contains("online      18 of 18 known devices"), "{summary}");

    // Move: devices 0..6 switch tracker (a routing change). Once their old
    // tracker has let them go, each is heard by its new one only.
    for (i, id) in ids.iter().enumerate().take(6) {
        devices.route(id, Some(trackers[(i + 1) % 3]));
    }
    let mut expected = expected;
    for (i, id) in ids.iter().enumerate().take(6) {
        expected.insert(id.clone(), (true, vec![names[(i + 1) % 3].to_string()]));
    }
    poll("the moved devices to be held by their new tracker only", Duration::from_secs(30), || {
        view(&urls).filter(|v| *v == expected)
    });

    // Node death: c is SIGKILLed. Of its devices (those with i % 3 == 2 and
    // not moved, and the moved i = 1, 4), half move to a, half stop.
    let on_c: Vec<&String> =
        ids.iter().filter(|id| view(&urls).unwrap()[*id].1 == vec!["c".to_string()]).collect();
    assert_eq!(on_c.len(), 6, "{on_c:?}");
    let (moving, stopping) = on_c.split_at(3);
    for id in stopping {
        devices.route(id, None);
    }
    for id in moving {
        devices.route(id, Some(trackers[0]));
    }
    c.crash();
    let killed_at = SystemTime::now();
    for id in stopping {
        expected.insert(id.to_string(), (false, vec![]));
    }
    for id in moving {
        expected.insert(id.to_string(), (true, vec!["a".to_string()]));
    }
    poll("the view after c's death", TTL + DEATH_BOUND + Duration::from_secs(10), || {
        view(&urls).filter(|v| *v == expected)
    });
    let seen_at = SystemTime::now();
    let events = fleet_events(&urls).unwrap();
    for id in stopping {
        let last = devices.last_sent(id);
        let offline = events[*id].last().unwrap();
        assert_eq!(offline["event"], "offline", "{id}: {:?}", events[*id]);
        let at = event_time(offline);
        assert!(at >= last + TTL, "{id} went offline at {} before its deadline {}", ms(at), ms(last + TTL));
        assert!(
            at <= last + TTL + DEATH_BOUND,
            "{id} went offline at {}, later than its deadline {} + the bound",
            ms(at),
            ms(last + TTL)
        );
    }
    assert!(seen_at.duration_since(killed_at).unwrap() <= TTL + DEATH_BOUND + Duration::from_secs(10));
    for id in moving {
        assert_eq!(kinds(&events, id), ["online"], "{id} moved off a dead tracker without a global offline");
    }

    // Drain: b is stopped with --drain while its devices move to a. It
    // exits once it holds none; none of them goes offline globally.
    let on_b: Vec<String> = view(&urls)
        .unwrap()
        .into_iter()
        .filter(|(_, (_, nodes))| *nodes == ["b"])
        .map(|(id, _)| id)
        .collect();
    assert!(!on_b.is_empty());
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(b.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    b.wait_log("draining: serving until the devices have moved to other trackers", PROMPTLY);
    for id in &on_b {
        devices.route(id, Some(trackers[0]));
        expected.insert(id.clone(), (true, vec!["a".to_string()]));
    }
    let exit =
        poll("b to exit after the drain", TTL + Duration::from_secs(15), || b.child.try_wait().unwrap());
    assert!(exit.success());
    poll("b's devices to be held by a only", Duration::from_secs(20), || {
        view(&urls).filter(|v| *v == expected)
    });

    // Every device's events: alternating, versions +1; moved and drained
    // devices came online once and never went offline.
    let events = fleet_events(&urls).unwrap();
    assert_well_ordered(&events);
    for id in &ids {
        let want: &[&str] = if stopping.contains(&id) { &["online", "offline"] } else { &["online"] };
        assert_eq!(kinds(&events, id), want, "{id}");
    }
    drop(a);
}

/// `--drain` asks its own server the way `status` does, signed with the
/// operator key: under `--query-allow none` it still sees its devices. (It
/// used to ask unsigned, be refused, take the longest TTL as zero and stop
/// after a second with its devices still there.)
#[test]
fn a_drain_under_query_allow_none_waits_for_its_devices() {
    let nats = NatsCluster::start();
    let urls = nats.urls();
    let dir = tempfile::tempdir().unwrap();
    let (key_file, _) = common::keygen(dir.path());
    let mut a =
        tracker(&urls, "a", &["--drain", "--key-file", &key_file, "--auth", "off", "--query-allow", "none"]);
    wait_live(&urls, 1);
    let devices = Devices::start();
    devices.route("drain-0", Some(a.addr));
    poll("the device online in the fleet view", Duration::from_secs(60), || {
        view(&urls).filter(|v| v.get("drain-0").is_some_and(|(online, _)| *online))
    });
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let draining = a.wait_log("draining: serving until the devices have moved to other trackers", PROMPTLY);
    assert_ne!(draining["fields"]["longest"], "0s", "the drain could not see its devices: {draining}");
    // While the device still beats here, the tracker keeps serving (the
    // drain lasts at most the longest TTL held when it began, 3 s, plus 1 s).
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert!(a.child.try_wait().unwrap().is_none(), "stopped while a device was online here");
        std::thread::sleep(Duration::from_millis(100));
    }
    devices.route("drain-0", None);
    let exit = poll("the tracker to exit after the drain", TTL + Duration::from_secs(15), || {
        a.child.try_wait().unwrap()
    });
    assert!(exit.success());
}

#[test]
fn a_nats_server_death_loses_and_invents_no_fleet_event() {
    let mut nats = NatsCluster::start();
    let urls = nats.urls();
    let a = tracker(&urls, "a", &[]);
    let b = tracker(&urls, "b", &[]);
    wait_live(&urls, 2);
    let devices = Devices::start();
    let ids: Vec<String> = (0..8).map(|i| format!("n-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        devices.route(id, Some(if i % 2 == 0 { a.addr } else { b.addr }));
    }
    poll("every device online in the fleet view", Duration::from_secs(60), || {
        view(&urls).filter(|v| v.len() == 8 && v.values().all(|(online, _)| *online))
    });
    // One NATS server dies (SIGKILL); meanwhile devices come and go.
    nats.nodes[0].kill();
    let rest = format!("{},{}", nats.nodes[1].url(), nats.nodes[2].url());
    for id in &ids[..3] {
        devices.route(id, None);
    }
    let late: Vec<String> = (0..3).map(|i| format!("late-{i}")).collect();
    for id in &late {
        devices.route(id, Some(a.addr));
    }
    poll("the view to follow through the NATS server's death", Duration::from_secs(60), || {
        view(&rest).filter(|v| {
            v.len() == 11
                && ids[..3].iter().all(|id| !v[id].0)
                && ids[3..].iter().chain(&late).all(|id| v[id].0)
        })
    });
    let events = fleet_events(&rest).unwrap();
    assert_well_ordered(&events);
    for id in &ids[..3] {
        assert_eq!(kinds(&events, id), ["online", "offline"], "{id}");
    }
    for id in ids[3..].iter().chain(&late) {
        assert_eq!(kinds(&events, id), ["online"], "{id}");
    }
}

#[test]
fn a_tracker_cut_off_from_nats_rejoins_and_the_view_is_right_afterwards() {
    let mut nats = NatsCluster::start();
    let urls = nats.urls();
    // c reaches NATS only through server n2: killing n2 cuts c off.
    let c_url = nats.nodes[2].url();
    let rest = format!("{},{}", nats.nodes[0].url(), nats.nodes[1].url());
    let a = tracker(&rest, "a", &[]);
    let c = tracker(&c_url, "c", &[]);
    wait_live(&urls, 2);
    let devices = Devices::start();
    for id in ["p-a", "p-stays", "p-stops"] {
        devices.route(id, Some(if id == "p-a" { a.addr } else { c.addr }));
    }
    poll("three devices online", Duration::from_secs(60), || {
        view(&urls).filter(|v| v.len() == 3 && v.values().all(|(online, _)| *online))
    });
    nats.nodes[2].kill();
    // During the cut: one of c's devices stops, a new one starts on c.
    devices.route("p-stops", None);
    devices.route("p-new", Some(c.addr));
    // The others take c for dead: what only c hears shows offline meanwhile
    // (CLUSTER.md: availability over a view that stops answering).
    poll(
        "c's devices offline in the view while c is cut off",
        TTL + DEATH_BOUND + Duration::from_secs(10),
        || view(&rest).filter(|v| !v["p-stays"].0 && v["p-a"].0),
    );
    nats.nodes[2].spawn();
    // Back: c adds what it still hears; what stopped stays offline.
    let want: BTreeMap<String, (bool, Vec<String>)> = [
        ("p-a", (true, vec!["a".to_string()])),
        ("p-new", (true, vec!["c".to_string()])),
        ("p-stays", (true, vec!["c".to_string()])),
        ("p-stops", (false, vec![])),
    ]
    .into_iter()
    .map(|(id, state)| (id.to_string(), state))
    .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = view(&urls);
        if now.as_ref() == Some(&want) {
            break;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = c.log.try_iter().collect();
            let a_logs: Vec<String> = a.log.try_iter().collect();
            let mut c = c;
            panic!(
                "the view after c is back: {now:?}, want {want:?}; c: {:?}; c's log: {logs:#?}; a's log: {a_logs:#?}",
                c.child.try_wait()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = fleet_events(&urls).unwrap();
    assert_well_ordered(&events);
    assert_eq!(kinds(&events, "p-a"), ["online"]);
    assert_eq!(
        kinds(&events, "p-stays"),
        ["online", "offline", "online"],
        "offline while cut off, then back"
    );
    assert_eq!(kinds(&events, "p-stops"), ["online", "offline"]);
    assert_eq!(kinds(&events, "p-new"), ["online"]);
    drop((a, c));
}
