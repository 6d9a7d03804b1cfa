//! End to end: `--metrics` with the real binary, checked by `promtool`,
//! scraped by a real Prometheus, and poked with bad and slow HTTP clients.
//! Prometheus and promtool come from Debian's `prometheus` package, which
//! `tests/run` installs.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{PROMPTLY, Server, poll};
use presence::wire::{Heartbeat, Message};

/// A server with `--metrics` on a free port, and that port.
fn server(extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let line = server.wait_log("serving metrics at /metrics", PROMPTLY);
    let addr = line["fields"]["addr"].as_str().unwrap().parse().unwrap();
    (server, addr)
}

/// Sends `request` as is and returns the whole response (the server closes
/// the connection after one request).
fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn scrape(addr: SocketAddr) -> String {
    let response = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `name` (with its labels, as written) in `body`.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn tool(name: &str) -> String {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: run the tests with tests/run, which installs it"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_string()
}

fn beat(to: SocketAddr, device: &str) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&common::frame(&Message::Heartbeat(Heartbeat::new(device, 1, 1, 60_000))), to).unwrap();
}

#[test]
fn metrics_report_the_server_and_pass_promtool() {
    let (server, metrics) = server(&[]);
    for device in ["m-1", "m-2", "m-3"] {
        beat(server.addr, device);
    }
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"\x01", server.addr).unwrap();
    let body = poll("the heartbeats in the metrics", PROMPTLY, || {
        let body = scrape(metrics);
        (sample(&body, "presence_heartbeats_total") == Some(3.0)
            && sample(&body, "presence_transitions_total{event=\"online\"}") == Some(3.0))
        .then_some(body)
    });
    assert_eq!(sample(&body, "presence_devices{state=\"online\"}"), Some(3.0), "{body}");
    assert_eq!(sample(&body, "presence_devices{state=\"offline\"}"), Some(0.0));
    assert_eq!(sample(&body, "presence_dropped_datagrams_total{reason=\"truncated\"}"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "presence_degraded"), Some(0.0));
    assert_eq!(sample(&body, "presence_sink_events_lost_total{sink=\"events_file\"}"), Some(0.0));
    assert!(body.contains("presence_build_info{version=\""), "{body}");
    assert!(!body.contains("m-1"), "no per-device labels");
    // promtool reads it as valid Prometheus text.
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_requests_get_4xx_and_slow_clients_hold_back_no_scrape() {
    let (_server, metrics) = server(&[]);
    assert!(http(metrics, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(metrics, b"GET /metricsx HTTP/1.1\r\nHost: t\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(
        http(metrics, b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
            .starts_with("HTTP/1.1 405")
    );
    assert!(http(metrics, b"THIS IS NOT HTTP\r\n\r\n").starts_with("HTTP/1.1 400"), "garbage");
    // A slow client: half a request, then silence. A scrape meanwhile is answered.
    let mut slow = TcpStream::connect(metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n").unwrap();
    assert!(!scrape(metrics).is_empty());
    // The slow client is cut off once its time to send headers is up.
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(15), "the slow client was never cut off");
}

#[test]
fn connections_are_capped_and_idle_ones_make_room() {
    let (_server, metrics) = server(&[]);
    // 32 idle connections take every slot (MAX_CONNECTIONS in server/http.rs).
    let mut idle: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(metrics).unwrap()).collect();
    // One more waits in the backlog, and is answered only once an idle one
    // was closed by its header timeout.
    let body = scrape(metrics);
    assert!(body.contains("presence_heartbeats_total"));
    let mut closed = 0;
    for stream in &mut idle {
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut byte = [0u8; 1];
        // A closed connection reads EOF (or is reset); an open one times out.
        match stream.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert!(closed > 0, "the scrape was answered while every slot was still held");
}

/// A Prometheus server scraping `target` every second, stopped on drop.
struct Prometheus {
    child: Child,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: presence\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let api = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, api, _dir: dir }
    }

    /// The value Prometheus has for `query`, if any.
    fn query(&self, query: &str) -> Option<f64> {
        let mut stream = TcpStream::connect(self.api).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET /api/v1/query?query={query} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let json: serde_json::Value = serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_server() {
    let (server, metrics) = server(&[]);
    for device in ["p-1", "p-2"] {
        beat(server.addr, device);
    }
    let prometheus = Prometheus::start(metrics);
    let online = poll("Prometheus to have scraped two online devices", Duration::from_secs(60), || {
        prometheus.query("presence_devices%7Bstate%3D%22online%22%7D").filter(|v| *v == 2.0)
    });
    assert_eq!(online, 2.0);
    assert_eq!(prometheus.query("presence_heartbeats_total"), Some(2.0));
    assert_eq!(prometheus.query("up%7Bjob%3D%22presence%22%7D"), Some(1.0));
}

/// GETs `path` and returns the status code and the JSON body.
fn api(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let response = http(addr, format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    let code = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    (code, serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {response}")))
}

#[test]
fn the_json_api_answers_as_status_does() {
    let (server, metrics) = server(&[]);
    let ids = ["api-1", "api-2", "api-3", "api-4", "odd id/with+signs"];
    for id in ids {
        beat(server.addr, id);
    }
    let summary = poll("five devices online", PROMPTLY, || {
        let (code, summary) = api(metrics, "/api/v1/summary");
        (code == 200 && summary["online"] == 5).then_some(summary)
    });
    assert_eq!((&summary["known"], &summary["degraded"]), (&5.into(), &0.into()));
    // Paging with cursors: every device exactly once.
    let mut seen = Vec::new();
    let mut path = "/api/v1/devices?limit=2".to_string();
    loop {
        let (code, page) = api(metrics, &path);
        assert_eq!(code, 200, "{page}");
        for device in page["devices"].as_array().unwrap() {
            seen.push(device["device"].as_str().unwrap().to_string());
            assert_eq!(device["state"], "online");
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/api/v1/devices?limit=2&after={next}"),
            None => break,
        }
    }
    seen.sort();
    let mut expected: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    let (code, page) = api(metrics, "/api/v1/devices?prefix=api-&state=all");
    assert_eq!((code, page["devices"].as_array().unwrap().len()), (200, 4));
    let (code, device) = api(metrics, "/api/v1/devices/odd%20id%2Fwith%2Bsigns");
    assert_eq!((code, &device["device"], &device["version"]), (200, &"odd id/with+signs".into(), &1.into()));
    assert_eq!(api(metrics, "/api/v1/devices/nobody").0, 404);
    assert_eq!(api(metrics, "/api/v1/devices?state=sideways").0, 400);
    assert_eq!(api(metrics, "/api/v1/devices?limit=0").0, 400);
    assert_eq!(api(metrics, "/api/v1/devices/%FF").0, 400);
    assert_eq!(api(metrics, "/api/v1/nothing").0, 404);
}
