//! End to end in C: `examples/c/device.c`, built with the system's `cc`
//! against the host build of the C library (`libpresence_ffi.a`, which
//! `cargo test` builds as a workspace member), beats to the real server,
//! unsigned and signed. Checked from the server's side: online with its
//! payload; from the device's output: it read the acks; and SIGINT sends
//! the leave that takes it offline. And `ffi/tests/c/vectors.c` checks the
//! library against the shared test vectors from C.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BIN, PROMPTLY, Server, poll};
use presence::client::Client;

/// Compiles `source` (with `-I dir` too) against the host C library into `dir/name`.
fn build_c(dir: &Path, source: &Path, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The library sits beside the binary under test (target/<profile>/).
    let lib = Path::new(BIN).parent().unwrap().join("libpresence_ffi.a");
    assert!(
        lib.exists(),
        "{} is missing: build the C library with `cargo build -p presence-ffi` (tests/run does)",
        lib.display()
    );
    let device = dir.join(name);
    let out = Command::new("cc")
        .args(["-O1", "-Wall", "-Wextra", "-Werror", "-std=c11"])
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg("-I")
        .arg(dir)
        .arg(source)
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&device)
        .output()
        .expect("run cc (a C compiler is needed for the C tests)");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    device
}

/// The device's exit status and output, once it has exited.
fn output(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().unwrap();
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    (status, text)
}

fn run(server: &Server, device: &Path, id: &str, key: Option<&str>) {
    let mut command = Command::new(device);
    command
        .arg(server.addr.to_string())
        .arg(id)
        .args(["--interval-ms", "300", "--payload", "fw=c1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(key) = key {
        command.args(["--key", key]);
    }
    let child = command.spawn().unwrap();
    let mut client = Client::new(server.addr, Duration::from_secs(2)).unwrap();
    let report = poll("the C device online", PROMPTLY, || {
        client.device(id).ok().flatten().filter(|r| r.online && r.numbers.heartbeats >= 3)
    });
    assert_eq!(report.payload, b"fw=c1");
    assert_eq!(report.numbers.interval_ms, 300);
    // SIGINT: the device sends its leave and exits.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (status, out) = output(child);
    assert!(status.success(), "{status}: {out}");
    let report =
        poll("the C device offline", PROMPTLY, || client.device(id).ok().flatten().filter(|r| !r.online));
    assert_eq!(report.offline_reason, Some("left"), "{report:?}");
    let acks: Vec<&str> = out.lines().filter(|l| l.starts_with("ack seq=")).collect();
    assert!(acks.len() >= 3, "the device read the server's acks: {out}");
    assert!(acks[0].starts_with("ack seq=1 interval_ms=300 ttl_ms=1000"), "{out}");
    assert!(out.lines().last().is_some_and(|l| l.starts_with("left (seq ")), "{out}");
}

#[test]
fn a_c_device_beats_reads_acks_and_leaves_unsigned_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let device =
        build_c(dir.path(), &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c/device.c"), "device");

    let server = Server::start(&[]);
    run(&server, &device, "c-device-1", None);

    let (key_file, _) = common::keygen(dir.path());
    let server = Server::start(&["--key-file", &key_file]);
    let out = common::cli(&["derive-key", "--key-file", &key_file, "--id", "c-device-2"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let key = common::stdout(&out);
    let key = key.split_whitespace().find(|w| w.len() == 64).expect("a 64-digit key").to_string();
    run(&server, &device, "c-device-2", Some(&key));
    // Under --auth required only its signed heartbeats count: the same
    // device without the key gets no ack and is not let in.
    let unsigned = Command::new(&device)
        .arg(server.addr.to_string())
        .args(["c-device-3", "--interval-ms", "100", "--count", "2"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&unsigned.stdout);
    assert!(unsigned.status.success() && !out.contains("ack seq="), "{out}");
    let summary = Client::new(server.addr, Duration::from_secs(2)).unwrap().summary().unwrap();
    assert_eq!(summary.counts.known, 1, "only the signed device is known");
}

/// A C compound literal of `hex`'s bytes.
fn c_array(hex: &str) -> String {
    let bytes: Vec<String> = (0..hex.len()).step_by(2).map(|i| format!("0x{}", &hex[i..i + 2])).collect();
    format!("(const uint8_t[]){{{}}}", bytes.join(", "))
}

/// `hex`'s bytes as a pointer and a length (NULL, 0 when empty).
fn c_bytes(hex: &str) -> String {
    if hex.is_empty() { "NULL, 0".into() } else { format!("{}, {}", c_array(hex), hex.len() / 2) }
}

/// `tests/vectors.json` as the C declarations `ffi/tests/c/vectors.c` reads.
fn vectors_h() -> String {
    let file: serde_json::Value = serde_json::from_str(include_str!("vectors.json")).unwrap();
    let device_key = file["keys"]["device"]["key"].as_str().unwrap();
    let (mut heartbeats, mut leaves, mut acks, mut statuses) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for v in file["vectors"].as_array().unwrap() {
        let (n, m, frame) = (&v["number"], &v["message"], c_bytes(v["hex"].as_str().unwrap()));
        let u = |k: &str| m[k].as_u64().unwrap_or(0);
        match m["kind"].as_str().unwrap() {
            "heartbeat" => {
                let key = if v["signed_with"] == "device" { c_array(device_key) } else { "NULL".into() };
                heartbeats.push(format!(
                    "    {{{n}, {:?}, {}, {}, {}, {}, {}, {key}, {frame}}},",
                    m["device"].as_str().unwrap(),
                    u("boot"),
                    u("seq"),
                    u("interval_ms"),
                    u("flags"),
                    c_bytes(m["payload"].as_str().unwrap())
                ));
            }
            "leave" => leaves.push(format!(
                "    {{{n}, {:?}, {}, {}, {frame}}},",
                m["device"].as_str().unwrap(),
                u("boot"),
                u("seq")
            )),
            "ack" => acks.push(format!(
                "    {{{n}, {}, {}, {}, {}, {frame}}},",
                u("boot"),
                u("seq"),
                u("interval_ms"),
                u("ttl_ms")
            )),
            "status" => {
                let body = &m["body"];
                let (kind, info) = if let Some(d) = body.get("device") {
                    ("PRESENCE_STATUS_DEVICE", d.clone())
                } else if let Some(p) = body.get("page") {
                    ("PRESENCE_STATUS_PAGE", p["entries"][0].clone())
                } else if body.get("summary").is_some() {
                    ("PRESENCE_STATUS_SUMMARY", serde_json::Value::Null)
                } else {
                    ("PRESENCE_STATUS_UNKNOWN_DEVICE", serde_json::Value::Null)
                };
                let summary = &body["summary"];
                let page = &body["page"];
                statuses.push(format!(
                    "    {{{n}, {}, {kind}, {:?}, {}, {}, {}, {}, {}, {}, {}, {frame}}},",
                    u("request"),
                    info["device"].as_str().unwrap_or(""),
                    info["version"].as_u64().unwrap_or(0),
                    info["ttl_ms"].as_u64().unwrap_or(0),
                    info["online"].as_bool().unwrap_or(false),
                    summary["online"].as_u64().unwrap_or(0),
                    summary["known"].as_u64().unwrap_or(0),
                    page["matched"].as_u64().unwrap_or(0),
                    page["entries"].as_array().map_or(0, Vec::len),
                ));
            }
            _ => {}
        }
    }
    format!(
        "/* Generated from tests/vectors.json by tests/c_device.rs. */\n\
         #include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\n\
         struct heartbeat_vector {{ int number; const char *id; uint32_t boot, seq, interval_ms; uint8_t flags; \
         const uint8_t *payload; size_t payload_len; const uint8_t *key; const uint8_t *frame; size_t frame_len; }};\n\
         struct leave_vector {{ int number; const char *id; uint32_t boot, seq; const uint8_t *frame; size_t frame_len; }};\n\
         struct ack_vector {{ int number; uint32_t boot, seq, interval_ms, ttl_ms; const uint8_t *frame; size_t frame_len; }};\n\
         struct status_vector {{ int number; uint32_t request; uint8_t body; const char *device; uint32_t version, ttl_ms; \
         bool online; uint64_t online_count, known, matched; uint32_t entries; const uint8_t *frame; size_t frame_len; }};\n\
         static const struct heartbeat_vector HEARTBEATS[] = {{\n{}\n}};\n\
         static const struct leave_vector LEAVES[] = {{\n{}\n}};\n\
         static const struct ack_vector ACKS[] = {{\n{}\n}};\n\
         static const struct status_vector STATUSES[] = {{\n{}\n}};\n",
        heartbeats.join("\n"),
        leaves.join("\n"),
        acks.join("\n"),
        statuses.join("\n")
    )
}

#[test]
fn the_c_library_agrees_with_the_shared_vectors_from_c() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vectors.h"), vectors_h()).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("ffi/tests/c/vectors.c");
    let program = build_c(dir.path(), &source, "vectors");
    let out = Command::new(&program).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with("all vectors ok\n"), "{text}");
    // Vectors 1, 2, 13 (heartbeats), 3 (leave), 11 (ack), 7-10 (statuses) and their cuts.
    assert_eq!(text.lines().filter(|l| l.ends_with(" ok")).count(), 3 + 1 + 1 + 4 + 4 + 1, "{text}");
}
