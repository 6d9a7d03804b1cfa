//! The wire decoder on arbitrary bytes: it must never panic, and whatever it
//! accepts must be valid and re-encode to no more bytes than it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use presence::wire;

fuzz_target!(|data: &[u8]| {
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
