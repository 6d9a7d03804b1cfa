//! End to end in C: `examples/c/device.c`, built with the system's `cc`
//! against the host build of the C library (`libpresence_ffi.a`, which
//! `cargo test` builds as a workspace member), beats to the real server,
//! unsigned and signed. Checked from the server's side: online with its
//! payload; from the device's output: it read the acks; and SIGINT sends
//! the leave that takes it offline.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BIN, PROMPTLY, Server, poll};
use presence::client::Client;

/// Builds the C device into `dir`.
fn build_device(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The library sits beside the binary under test (target/<profile>/).
    let lib = Path::new(BIN).parent().unwrap().join("libpresence_ffi.a");
    assert!(
        lib.exists(),
        "{} is missing: build the C library with `cargo build -p presence-ffi` (tests/run does)",
        lib.display()
    );
    let device = dir.join("device");
    let out = Command::new("cc")
        .args(["-O1", "-Wall", "-Wextra", "-Werror", "-std=c11"])
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg(root.join("examples/c/device.c"))
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
    let device = build_device(dir.path());

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
