//! `tests/vectors.json` is the one machine-readable copy of PROTOCOL.md's
//! test vectors, which the C and Python tests read too. Here: every vector
//! decodes to exactly the message the file describes and encodes back to
//! the same bytes; signed ones carry the tag the named key makes; the keys
//! derive from the master as the file says; and the file and PROTOCOL.md
//! hold the same vectors and keys.

use presence::auth;
use presence::hex;
use presence::wire::{self, Addr, DeviceInfo, ErrorCode, Message, QueryKind, StatusBody};
use serde_json::{Value, json};

const VECTORS: &str = include_str!("vectors.json");
const PROTOCOL_MD: &str = include_str!("../PROTOCOL.md");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("tests/vectors.json is JSON")
}

fn key(hex_key: &Value) -> auth::Key {
    hex::decode(hex_key.as_str().unwrap()).unwrap().try_into().unwrap()
}

fn addr(addr: &Addr) -> String {
    match *addr {
        Addr::V4(ip, port) => std::net::SocketAddr::from((ip, port)).to_string(),
        Addr::V6(ip, port) => std::net::SocketAddr::from((ip, port)).to_string(),
    }
}

fn device_json(info: &DeviceInfo<'_>) -> Value {
    let n = &info.numbers;
    json!({
        "device": info.device, "online": info.online, "addr": addr(&info.addr),
        "last_seen_ago_ms": n.last_seen_ago_ms, "last_seen_unix_ms": n.last_seen_unix_ms,
        "expires_in_ms": n.expires_in_ms, "ttl_ms": n.ttl_ms, "interval_ms": n.interval_ms,
        "boot": n.boot, "seq": n.seq, "heartbeats": n.heartbeats, "flaps": n.flaps, "version": n.version,
        "payload": hex::encode(info.payload), "offline_reason": info.offline_reason,
    })
}

/// A decoded message in the file's form (its tag, if any, apart).
fn message_json(message: &Message<'_>) -> (Value, Option<[u8; 8]>) {
    match message {
        Message::Heartbeat(hb) => (
            json!({
                "kind": "heartbeat", "device": hb.device, "boot": hb.boot, "seq": hb.seq,
                "interval_ms": hb.interval_ms, "flags": hb.flags, "payload": hex::encode(hb.payload),
            }),
            hb.tag,
        ),
        Message::Leave(leave) => (
            json!({ "kind": "leave", "device": leave.device, "boot": leave.boot, "seq": leave.seq }),
            leave.tag,
        ),
        Message::Query(query) => {
            let kind = match query.kind {
                QueryKind::Device(id) => json!({ "device": id }),
                QueryKind::Summary => json!({ "summary": {} }),
                QueryKind::List { after, limit, filter } => json!({ "list": {
                    "after": after, "limit": limit, "state": filter.state, "prefix": filter.prefix,
                    "count_only": filter.count_only,
                } }),
            };
            let mut value = json!({
                "kind": "query", "request": query.request, "query": kind, "padding": hex::encode(query.padding),
            });
            if let Some(tag) = &query.tag {
                value["sent_unix_ms"] = json!(tag.sent_unix_ms);
            }
            (value, query.tag.map(|t| t.tag))
        }
        Message::Status(status) => {
            let body = match &status.body {
                StatusBody::UnknownDevice => json!({ "unknown_device": {} }),
                StatusBody::Device(info) => json!({ "device": device_json(info) }),
                StatusBody::Summary(summary) => {
                    let c = &summary.counts;
                    let counters: Vec<Value> = summary
                        .counters
                        .iter()
                        .map(|counter| {
                            let counter = counter.unwrap();
                            json!({ "code": counter.code, "count": counter.count })
                        })
                        .collect();
                    json!({ "summary": {
                        "online": c.online, "known": c.known, "uptime_ms": c.uptime_ms, "heartbeats": c.heartbeats,
                        "leaves": c.leaves, "queries": c.queries, "expirations": c.expirations, "late": c.late,
                        "held": c.held, "degraded": c.degraded, "counters": counters,
                    } })
                }
                StatusBody::Page(page) => {
                    let entries: Vec<Value> = page.entries.iter().map(|e| device_json(&e.unwrap())).collect();
                    json!({ "page": { "next_cursor": page.next_cursor, "matched": page.matched, "entries": entries } })
                }
            };
            (json!({ "kind": "status", "request": status.request, "body": body }), None)
        }
        Message::Ack(ack) => (
            json!({
                "kind": "ack", "boot": ack.boot, "seq": ack.seq, "interval_ms": ack.interval_ms, "ttl_ms": ack.ttl_ms,
            }),
            None,
        ),
        Message::Error(error) => {
            let code = match error.code {
                ErrorCode::UnsupportedVersion => json!({ "unsupported_version": {} }),
                ErrorCode::NotAllowed => json!({ "not_allowed": {} }),
                ErrorCode::RequestTooSmall { needed } => json!({ "request_too_small": { "needed": needed } }),
                ErrorCode::StaleQuery { server_unix_ms } => {
                    json!({ "stale_query": { "server_unix_ms": server_unix_ms } })
                }
            };
            (json!({ "kind": "error", "code": code, "supported_version": error.supported_version }), None)
        }
    }
}

#[test]
fn every_vector_decodes_to_its_message_and_encodes_back() {
    let file = vectors();
    let keys = &file["keys"];
    assert_eq!(file["protocol_version"], wire::VERSION);
    for vector in file["vectors"].as_array().unwrap() {
        let number = &vector["number"];
        let bytes = hex::decode(vector["hex"].as_str().unwrap()).unwrap();
        let message = wire::decode(&bytes).unwrap_or_else(|e| panic!("vector {number}: {e:?}"));
        let (value, tag) = message_json(&message);
        assert_eq!(value, vector["message"], "vector {number}");
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = match vector["signed_with"].as_str() {
            None => {
                assert_eq!(tag, None, "vector {number} is unsigned");
                wire::encode(&message, &mut buf).unwrap()
            }
            Some(signer) => {
                assert_eq!(
                    tag.map(|t| hex::encode(&t)),
                    vector["tag"].as_str().map(String::from),
                    "vector {number}"
                );
                let key = match signer {
                    "device" => key(&keys["device"]["key"]),
                    "operator" => key(&keys["operator"]),
                    other => panic!("vector {number}: unknown signer {other}"),
                };
                auth::encode_signed(&message, &key, &mut buf).unwrap()
            }
        };
        assert_eq!(hex::encode(&buf[..len]), vector["hex"].as_str().unwrap(), "vector {number}");
    }
}

#[test]
fn the_keys_derive_from_the_master_as_the_file_says() {
    let keys = &vectors()["keys"];
    let master = key(&keys["master"]);
    assert_eq!(auth::device_subkey(&master), key(&keys["device_subkey"]));
    let id = keys["device"]["id"].as_str().unwrap();
    assert_eq!(auth::device_key(&master, id), key(&keys["device"]["key"]));
    assert_eq!(auth::operator_key(&master), key(&keys["operator"]));
}

/// The hex strings of PROTOCOL.md's "Test vectors" section (its datagrams
/// and keys): backticked runs of 8 or more hex digits.
fn protocol_md_hex() -> Vec<String> {
    let start = PROTOCOL_MD.find("## Test vectors").expect("PROTOCOL.md has a Test vectors section");
    let section = &PROTOCOL_MD[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() >= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(String::from)
        .collect()
}

#[test]
fn the_file_and_protocol_md_hold_the_same_vectors_and_keys() {
    let file = vectors();
    let mut in_file: Vec<String> =
        file["vectors"].as_array().unwrap().iter().map(|v| v["hex"].as_str().unwrap().to_string()).collect();
    // The tags of the signed ones are spelled out too.
    in_file.extend(
        file["vectors"].as_array().unwrap().iter().filter_map(|v| v["tag"].as_str().map(String::from)),
    );
    let keys = &file["keys"];
    for key in [&keys["master"], &keys["device_subkey"], &keys["device"]["key"], &keys["operator"]] {
        in_file.push(key.as_str().unwrap().to_string());
    }
    let in_md = protocol_md_hex();
    for hex in &in_md {
        assert!(in_file.contains(hex), "PROTOCOL.md's {hex} is missing from tests/vectors.json");
    }
    for hex in &in_file {
        assert!(in_md.contains(hex), "tests/vectors.json's {hex} is missing from PROTOCOL.md's Test vectors");
    }
    // The numbers run as PROTOCOL.md numbers them.
    let mut numbers: Vec<u64> =
        file["vectors"].as_array().unwrap().iter().map(|v| v["number"].as_u64().unwrap()).collect();
    numbers.dedup();
    assert_eq!(numbers, (1..=14).collect::<Vec<_>>());
}
