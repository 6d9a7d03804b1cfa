//! The wire decoder on arbitrary bytes: it must never panic, and whatever it
//! accepts must be valid and re-encode to no more bytes than it came from.
//! The server's shortcuts must agree with it: the ASCII heartbeat path, and
//! the shard routing of anything that names a device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence::{shard, wire};

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = wire::decode_heartbeat_ascii(data) {
        match wire::decode(data) {
            Ok(wire::Message::Heartbeat(hb)) => assert_eq!(raw, wire::RawHeartbeat::from(hb)),
            other => panic!("the ASCII path took what decode gives {other:?}"),
        }
    }
    for shards in 2..5 {
        let device = match wire::decode(data) {
            Ok(wire::Message::Heartbeat(hb)) => Some(hb.device),
            Ok(wire::Message::Leave(leave)) => Some(leave.device),
            _ => None,
        };
        if let Some(device) = device {
            let owner = shard::owner(device.as_bytes(), shards);
            assert_eq!(shard::route(data, shards), shard::Route::Shard(owner));
        }
    }
    if let Ok(message) = wire::decode(data) {
        assert!(message.validate().is_ok());
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = wire::encode(&message, &mut buf).expect("a decoded message re-encodes");
        assert!(len <= data.len());
        assert_eq!(wire::decode(&buf[..len]), Ok(message));
        if let wire::Message::Status(wire::Status { body: wire::StatusBody::Page(page), .. }) = message {
            for entry in page.entries.iter() {
                entry.expect("decode checked every record");
            }
        }
    }
});
