//! Keys and tags: keyed BLAKE3, `no_std`, no allocation.
//!
//! The server holds one 32-byte **master** secret. From it:
//! - the **device subkey** = `BLAKE3-derive_key("presence v1 device subkey", master)`,
//!   computed once at server start;
//! - each **device key** = `BLAKE3-keyed(device subkey, device id bytes)`;
//! - the **operator key** = `BLAKE3-derive_key("presence v1 operator key", master)`.
//!
//! A device stores only its own key, so a leaked device key exposes only
//! that device. A **tag** is the first 8 bytes of
//! `BLAKE3-keyed(key, every frame byte before the tag)`.
//!
//! Why keyed BLAKE3: a frame of up to 64 bytes and an id of up to 64 bytes
//! each cost one compression, so the server derives the key and checks the
//! tag of every heartbeat (two compressions) instead of caching a key per
//! device. The cost is measured by `cargo bench --bench auth`.

use crate::wire::{self, Message};

/// Length of a key, in bytes.
pub const KEY_LEN: usize = 32;

/// A 32-byte secret key.
pub type Key = [u8; KEY_LEN];
/// A truncated MAC (defined with the wire format, which carries it).
pub use crate::wire::{TAG_LEN, Tag};

/// BLAKE3 `derive_key` context for the device subkey.
pub const DEVICE_SUBKEY_CONTEXT: &str = "presence v1 device subkey";
/// BLAKE3 `derive_key` context for the operator key.
pub const OPERATOR_KEY_CONTEXT: &str = "presence v1 operator key";

/// The subkey from which every device key is derived.
pub fn device_subkey(master: &Key) -> Key {
    blake3::derive_key(DEVICE_SUBKEY_CONTEXT, master)
}

/// The key of `device`, given the device subkey.
pub fn device_key_from_subkey(subkey: &Key, device: impl AsRef<[u8]>) -> Key {
    *blake3::keyed_hash(subkey, device.as_ref()).as_bytes()
}

/// The key of `device`, given the master secret (provisioning).
pub fn device_key(master: &Key, device: &str) -> Key {
    device_key_from_subkey(&device_subkey(master), device)
}

/// The operator key, which signs status queries.
pub fn operator_key(master: &Key) -> Key {
    blake3::derive_key(OPERATOR_KEY_CONTEXT, master)
}

/// The bearer token of the HTTP API (`Authorization: Bearer <hex>`), for
/// clients that are not on loopback: derived from the operator key, so
/// whoever may sign status queries may read the API, and the token alone
/// signs nothing.
pub fn http_token(operator: &Key) -> Key {
    *blake3::keyed_hash(operator, b"presence http api bearer token v1").as_bytes()
}

/// The tag of `signed` (the frame bytes before the tag) under `key`.
pub fn tag(key: &Key, signed: &[u8]) -> Tag {
    let hash = blake3::keyed_hash(key, signed);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
    tag
}

/// Whether `tag` is the tag of `signed` under `key`, compared in constant time.
pub fn verify(key: &Key, signed: &[u8], tag: &Tag) -> bool {
    constant_time_eq::constant_time_eq_n(&self::tag(key, signed), tag)
}

/// Encodes `message` with its tag field set and signed with `key`; returns
/// the frame's length. Only heartbeats, leaves and queries carry tags. A
/// query keeps the `sent_unix_ms` of its tag field if it has one (set it to
/// the current time: the server refuses signed queries that are not recent),
/// and is signed as sent at 0 otherwise.
#[inline(always)]
pub fn encode_signed(message: &Message<'_>, key: &Key, buf: &mut [u8]) -> Result<usize, wire::Error> {
    let mut message = *message;
    match &mut message {
        Message::Heartbeat(m) => m.tag = Some([0; TAG_LEN]),
        Message::Leave(m) => m.tag = Some([0; TAG_LEN]),
        Message::Query(m) => {
            let sent_unix_ms = m.tag.map_or(0, |t| t.sent_unix_ms);
            m.tag = Some(wire::QueryTag { sent_unix_ms, tag: [0; TAG_LEN] });
        }
        Message::Status(_) | Message::Ack(_) | Message::Error(_) => return Err(wire::Error::NotSignable),
    }
    let len = wire::encode(&message, buf)?;
    sign_encoded(buf, len, key)?;
    Ok(len)
}

/// Writes the tag of a frame that was encoded with a placeholder tag (a
/// heartbeat, leave or query whose tag field is `Some`): the frame is the
/// first `len` bytes of `buf`, and its tag is its last [`TAG_LEN`] bytes.
/// [`encode_signed`] is this after `wire::encode`; a caller that builds
/// the message with its tag field set can call it directly and save a copy
/// of the message (firmware counts its stack in bytes).
#[inline(always)]
pub fn sign_encoded(buf: &mut [u8], len: usize, key: &Key) -> Result<(), wire::Error> {
    // Checked steps, not indexing: firmware links no panic messages.
    let frame = buf.get_mut(..len).ok_or(wire::Error::BufferTooSmall)?;
    let (signed, tag_bytes) =
        frame.split_at_mut_checked(len.saturating_sub(TAG_LEN)).ok_or(wire::Error::Malformed)?;
    let tag_bytes: &mut Tag = tag_bytes.try_into().map_err(|_| wire::Error::Malformed)?;
    *tag_bytes = tag(key, signed);
    Ok(())
}

/// Encodes a query padded to [`wire::MAX_DATAGRAM`] bytes, so that no reply
/// is ever too large for it (the server never replies with more bytes than
/// it received). With `signer` = (operator key, the wall time now in Unix
/// milliseconds), the query is signed as sent at that time; the server
/// answers it once, and only within [`wire::QUERY_SKEW_MS`] of its clock.
pub fn encode_query(
    request: u32,
    kind: wire::QueryKind<'_>,
    signer: Option<(&Key, u64)>,
    out: &mut [u8],
) -> Result<usize, wire::Error> {
    let zeros = [0u8; wire::MAX_DATAGRAM];
    let encode = |padding: usize, out: &mut [u8]| {
        let padding = &zeros[..padding];
        match signer {
            Some((key, sent_unix_ms)) => {
                let tag = Some(wire::QueryTag { sent_unix_ms, tag: [0; TAG_LEN] });
                encode_signed(&Message::Query(wire::Query { request, kind, padding, tag }), key, out)
            }
            None => wire::encode(&Message::Query(wire::Query { request, kind, padding, tag: None }), out),
        }
    };
    let bare = encode(0, out)?;
    // The padding's length prefix grows from 1 to 2 bytes past 127 bytes.
    let mut padding = wire::MAX_DATAGRAM.saturating_sub(bare + 1);
    loop {
        match encode(padding, out) {
            Ok(len) if len <= wire::MAX_DATAGRAM => return Ok(len),
            Ok(len) => padding = padding.saturating_sub(len - wire::MAX_DATAGRAM),
            Err(wire::Error::Oversized) => padding = padding.saturating_sub(1),
            Err(e) => return Err(e),
        }
    }
}

/// For a decoded `frame` whose message carries a tag: the bytes the tag
/// covers and the tag. `None` if the message has no tag.
pub fn signed_part<'f>(frame: &'f [u8], message: &Message<'_>) -> Option<(&'f [u8], Tag)> {
    let tag = match message {
        Message::Heartbeat(m) => m.tag?,
        Message::Leave(m) => m.tag?,
        Message::Query(m) => m.tag?.tag,
        Message::Status(_) | Message::Ack(_) | Message::Error(_) => return None,
    };
    let signed = frame.get(..frame.len().checked_sub(TAG_LEN)?)?;
    Some((signed, tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Heartbeat, Leave};

    const MASTER: Key = [0x42; KEY_LEN];

    fn hex(bytes: &[u8]) -> String {
        crate::hex::encode(bytes)
    }

    #[test]
    fn keys_differ_by_device_and_role() {
        let a = device_key(&MASTER, "a");
        assert_ne!(a, device_key(&MASTER, "b"));
        assert_ne!(a, device_key(&[0x43; KEY_LEN], "a"));
        assert_ne!(operator_key(&MASTER), device_subkey(&MASTER));
        assert_eq!(a, device_key_from_subkey(&device_subkey(&MASTER), "a"));
    }

    #[test]
    fn signed_frames_verify_and_any_flipped_bit_fails() {
        let key = device_key(&MASTER, "d1");
        let hb = Heartbeat { payload: b"x", ..Heartbeat::new("d1", 7, 8, 1000) };
        let mut buf = [0u8; 64];
        let len = encode_signed(&Message::Heartbeat(hb), &key, &mut buf).unwrap();
        let frame = &buf[..len];
        let message = wire::decode(frame).unwrap();
        let (signed, tag) = signed_part(frame, &message).unwrap();
        assert_eq!(signed.len(), len - TAG_LEN);
        assert!(verify(&key, signed, &tag));
        assert!(!verify(&device_key(&MASTER, "d2"), signed, &tag));
        for bit in 0..signed.len() * 8 {
            let mut forged = signed.to_vec();
            forged[bit / 8] ^= 1 << (bit % 8);
            assert!(!verify(&key, &forged, &tag), "bit {bit}");
        }
        let unsigned = Message::Leave(Leave { device: "d1", boot: 1, seq: 1, tag: None });
        let len = wire::encode(&unsigned, &mut buf).unwrap();
        assert_eq!(signed_part(&buf[..len], &unsigned), None);
    }

    /// The KDF and tag vectors in PROTOCOL.md ("Authentication"). The
    /// expected values come from an independent BLAKE3 implementation
    /// (the Python `blake3` package), not from this crate.
    #[test]
    fn auth_test_vectors() {
        let protocol = include_str!("../PROTOCOL.md");
        let master: Key = core::array::from_fn(|i| i as u8); // 00 01 02 .. 1f
        let device_key = device_key(&master, "sensor-00042");
        let vectors = [
            (
                hex(&device_subkey(&master)),
                "7c34a531d53692774916bdcd9f890048ad3d2a410070bec483163820c90850b9",
            ),
            (hex(&device_key), "22354fb35f627d1706ba71ae0699f37f4e1268195e44e2ca6d4b91aca1d48136"),
            (hex(&operator_key(&master)), "acf6a5f866a58e7d32f78d261beae1dc3a1b683faaf1113dd0926d76b3403448"),
        ];
        let hb = Heartbeat::new("sensor-00042", 1000, 1, 10_000);
        let mut buf = [0u8; 64];
        let len = encode_signed(&Message::Heartbeat(hb), &device_key, &mut buf).unwrap();
        let signed_hb = hex(&buf[..len]);
        let query = Message::Query(crate::wire::Query {
            request: 42,
            kind: crate::wire::QueryKind::Summary,
            padding: &[],
            tag: Some(crate::wire::QueryTag { sent_unix_ms: 1_795_000_000_000, tag: [0; TAG_LEN] }),
        });
        let len = encode_signed(&query, &operator_key(&master), &mut buf).unwrap();
        let signed_query = hex(&buf[..len]);
        for (got, expected) in vectors.iter().map(|(g, e)| (g.as_str(), *e)).chain([
            (signed_hb.as_str(), "01000c73656e736f722d3030303432e80701904e000001b76cdf5164e19cdf"),
            (signed_query.as_str(), "01022a01000180bcd9f29e34828d9a9d3f97fffc"),
        ]) {
            assert_eq!(got, expected);
            assert!(protocol.contains(expected), "PROTOCOL.md lacks {expected}");
        }
    }
}
