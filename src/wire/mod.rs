//! Wire protocol v1: every datagram is one frame, a version byte followed by
//! one postcard-encoded [`Message`].
//!
//! This module is `no_std` and never allocates: [`encode`] writes into a
//! caller's buffer and [`decode`] borrows strings and byte strings from the
//! datagram. PROTOCOL.md describes the same format byte by byte.
//!
//! Lists inside a reply (the entries of a [`Page`], the counters of a
//! [`Summary`]) are [`Records`]: one length-prefixed byte string holding
//! concatenated postcard records. That keeps every message borrowable and
//! decodable without an allocator, while staying plain postcard on the wire.

/// The protocol version this crate speaks; the first byte of every frame.
pub const VERSION: u8 = 1;
/// No frame, request or reply, is larger than this. It fits the IPv6 minimum
/// MTU with room for headers, so replies are never fragmented.
pub const MAX_DATAGRAM: usize = 1200;
/// Longest device id, in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 64;
/// Longest application payload a heartbeat may carry, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 64;
/// Length of a [`Tag`], in bytes: 64 bits.
pub const TAG_LEN: usize = 8;
/// A truncated MAC; see [`crate::auth`].
pub type Tag = [u8; TAG_LEN];
/// Heartbeat flag: the device wants an [`Ack`] back.
pub const FLAG_ACK: u8 = 0x01;
/// The flag bits defined by v1; the others are reserved, sent as zero and ignored.
pub const KNOWN_FLAGS: u8 = FLAG_ACK;
/// Number of top-level message kinds; a kind byte at or above this is unknown.
const KIND_COUNT: u8 = 6;

use serde::Deserialize;

mod errors;
mod fast;
mod messages;
mod records;

pub use errors::{DropReason, Error};
pub use fast::{RawHeartbeat, decode_heartbeat_ascii};
pub use messages::*;
pub use records::{RecordIter, RecordWriter, Records};

use fast::decode_heartbeat_fast;

/// Checks a device id as every frame's decoder does: 1 to [`MAX_ID_LEN`]
/// bytes, no control characters. Clients and tools call it too, so the
/// rule is written once.
pub fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::BadDeviceId);
    }
    if id.chars().any(char::is_control) {
        return Err(Error::IdControlChar);
    }
    Ok(())
}

/// Whether every byte of an id is printable ASCII (no control characters):
/// such an id is valid UTF-8 and needs no further character check.
pub(super) fn is_printable_ascii(id: &[u8]) -> bool {
    // Without an early exit, so the compiler checks many bytes at once.
    id.iter().fold(true, |printable, &b| printable & (b.wrapping_sub(0x20) < 0x5f))
}

/// Reads a varint `u32` (non-minimal forms allowed, at most 5 bytes) from
/// the start of `bytes`.
fn leading_varint(bytes: &[u8]) -> Result<u32, Error> {
    let mut value = 0u32;
    for (i, &b) in bytes.iter().take(5).enumerate() {
        if i == 4 && b > 0x0f {
            return Err(Error::Malformed);
        }
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    if bytes.len() < 5 { Err(Error::Truncated) } else { Err(Error::Malformed) }
}

/// A listing cursor is opaque, but bounded like an id.
fn check_cursor(cursor: &str) -> Result<(), Error> {
    if cursor.is_empty() || cursor.len() > MAX_ID_LEN { Err(Error::Malformed) } else { Ok(()) }
}

fn check_payload(payload: &[u8]) -> Result<(), Error> {
    if payload.len() > MAX_PAYLOAD_LEN { Err(Error::PayloadTooLong) } else { Ok(()) }
}

fn check_device_info(info: &DeviceInfo<'_>) -> Result<(), Error> {
    check_id(info.device)?;
    check_payload(info.payload)
}

fn check_records<'a, T: Deserialize<'a>>(
    records: &Records<'a, T>,
    mut check: impl FnMut(&T) -> Result<(), Error>,
) -> Result<(), Error> {
    for record in records.iter() {
        // A record cut short inside its byte string is malformed, not a
        // truncated datagram: the outer length said where it ends.
        let record = record.map_err(|e| match e {
            Error::Truncated => Error::Malformed,
            other => other,
        })?;
        check(&record)?;
    }
    Ok(())
}

impl Message<'_> {
    /// Checks the limits that postcard itself cannot express: id and payload
    /// lengths, and that nested records are well formed.
    // Inlined, so that a caller that encodes one kind of message (a
    // device: heartbeats) links only that kind's checks, not the record
    // decoders of status replies.
    #[inline(always)]
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Message::Heartbeat(hb) => {
                check_id(hb.device)?;
                check_payload(hb.payload)
            }
            Message::Leave(leave) => check_id(leave.device),
            Message::Query(q) => match q.kind {
                QueryKind::Device(id) => check_id(id),
                QueryKind::List { after, filter, .. } => {
                    if let Some(cursor) = after {
                        check_cursor(cursor)?;
                    }
                    match filter.prefix {
                        Some(prefix) => check_id(prefix),
                        None => Ok(()),
                    }
                }
                QueryKind::Summary => Ok(()),
            },
            Message::Status(status) => match &status.body {
                StatusBody::Device(info) => check_device_info(info),
                StatusBody::UnknownDevice => Ok(()),
                StatusBody::Summary(summary) => check_records(&summary.counters, |_| Ok(())),
                StatusBody::Page(page) => {
                    if let Some(cursor) = page.next_cursor {
                        check_cursor(cursor)?;
                    }
                    check_records(&page.entries, check_device_info)
                }
            },
            Message::Ack(_) | Message::Error(_) => Ok(()),
        }
    }
}

/// Encodes `message` as a v1 frame into `buf` and returns the frame's length.
///
/// The message is validated first, so a device cannot send a frame the
/// server would drop. Fails with [`Error::BufferTooSmall`] if `buf` is too
/// short and [`Error::Oversized`] if the frame exceeds [`MAX_DATAGRAM`].
#[inline(always)]
pub fn encode(message: &Message<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    message.validate()?;
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferTooSmall)?;
    *first = VERSION;
    let len = 1 + postcard::to_slice(message, rest)?.len();
    if len > MAX_DATAGRAM {
        return Err(Error::Oversized);
    }
    Ok(len)
}

/// Decodes and validates one v1 frame. Strings and byte strings borrow from
/// `datagram`. Never panics, whatever the input.
pub fn decode(datagram: &[u8]) -> Result<Message<'_>, Error> {
    let (_, body) = frame_kind(datagram)?;
    if let Some(heartbeat) = decode_heartbeat_fast(body) {
        return Ok(Message::Heartbeat(heartbeat));
    }
    decode_body(body)
}

/// A v1 frame's kind and its body (from the kind on), after the checks
/// every decoder makes first: the size, the version, a kind this version
/// knows.
fn frame_kind(datagram: &[u8]) -> Result<(u32, &[u8]), Error> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Error::Oversized);
    }
    let (&version, body) = datagram.split_first().ok_or(Error::Truncated)?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    // The kind is a varint (decoders accept non-minimal forms, as for every
    // varint); every v1 kind is below KIND_COUNT.
    if body.is_empty() {
        return Err(Error::Truncated);
    }
    let kind = leading_varint(body)?;
    if kind >= u32::from(KIND_COUNT) {
        return Err(Error::UnknownKind);
    }
    Ok((kind, body))
}

/// What a device needs of [`decode`]: the ack in `datagram`, `Ok(None)` for
/// a frame of another kind (not looked at further), or the error `decode`
/// gives. Firmware that calls only this links no decoder for the other
/// messages (several KiB on a Cortex-M).
pub fn decode_ack(datagram: &[u8]) -> Result<Option<Ack>, Error> {
    let (kind, body) = frame_kind(datagram)?;
    if kind != ACK_KIND {
        return Ok(None);
    }
    // The kind's varint is 1 to 5 bytes, each but the last with the top bit set.
    let kind_len = body.iter().position(|b| b & 0x80 == 0).map_or(body.len(), |i| i + 1);
    let (ack, rest) = postcard::take_from_bytes::<Ack>(&body[kind_len..])?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    Ok(Some(ack))
}

/// The kind number of [`Message::Ack`].
const ACK_KIND: u32 = 4;

/// The general decoder: postcard, then no trailing bytes, then validation.
fn decode_body(body: &[u8]) -> Result<Message<'_>, Error> {
    let (message, rest) = postcard::take_from_bytes::<Message<'_>>(body)?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    message.validate()?;
    Ok(message)
}

/// The general decoder alone, for tests that compare it with the fast path.
#[cfg(test)]
fn decode_general(datagram: &[u8]) -> Result<Message<'_>, Error> {
    decode_body(datagram.get(1..).ok_or(Error::Truncated)?)
}

#[cfg(test)]
mod tests;
