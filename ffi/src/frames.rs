//! What the C functions do, in safe Rust over slices: [`crate::abi`] only
//! turns pointers into slices and results into C structs. Errors are the
//! `PRESENCE_ERR_*` codes.

use presence::auth::{self, Key};
use presence::wire::{self, Ack, Heartbeat, Leave, Message, QueryKind, Status};

use crate::{
    PRESENCE_ERR_BAD_ARGUMENT, PRESENCE_ERR_BAD_ID, PRESENCE_ERR_BUFFER_TOO_SMALL,
    PRESENCE_ERR_UNEXPECTED_KIND, code,
};

use crate::abi::{PRESENCE_QUERY_DEVICE, PRESENCE_QUERY_SUMMARY};

/// The id as text, or `PRESENCE_ERR_BAD_ID` (the wire checks the rest).
fn id(bytes: &[u8]) -> Result<&str, i32> {
    core::str::from_utf8(bytes).map_err(|_| PRESENCE_ERR_BAD_ID)
}

/// Encodes `message` into `out` and, with `key`, signs it: the message
/// was built with its tag field set (to zeros) exactly when `key` is given.
/// (Inlined into each caller, which then links only its own message's
/// checks.)
#[inline(always)]
fn encode(message: &Message<'_>, key: Option<&Key>, out: &mut [u8]) -> Result<usize, i32> {
    let len = wire::encode(message, out).map_err(code)?;
    if let Some(key) = key {
        auth::sign_encoded(out, len, key).map_err(code)?;
    }
    Ok(len)
}

/// The tag field of a message to be signed with `key`, or none.
fn placeholder(key: Option<&Key>) -> Option<[u8; auth::TAG_LEN]> {
    key.map(|_| [0; auth::TAG_LEN])
}

/// A heartbeat frame in `out`; its length.
#[allow(clippy::too_many_arguments)]
pub fn heartbeat(
    device: &[u8],
    boot: u32,
    seq: u32,
    interval_ms: u32,
    flags: u8,
    payload: &[u8],
    key: Option<&Key>,
    out: &mut [u8],
) -> Result<usize, i32> {
    let hb = Heartbeat { device: id(device)?, boot, seq, interval_ms, flags, payload, tag: placeholder(key) };
    encode(&Message::Heartbeat(hb), key, out)
}

/// A leave frame in `out`; its length.
pub fn leave(device: &[u8], boot: u32, seq: u32, key: Option<&Key>, out: &mut [u8]) -> Result<usize, i32> {
    encode(&Message::Leave(Leave { device: id(device)?, boot, seq, tag: placeholder(key) }), key, out)
}

/// The ack in `datagram`.
/// (Only the ack's own decoder: firmware that decodes acks links nothing
/// of the other messages' decoders.)
pub fn ack(datagram: &[u8]) -> Result<Ack, i32> {
    wire::decode_ack(datagram).map_err(code)?.ok_or(PRESENCE_ERR_UNEXPECTED_KIND)
}

/// A query padded to [`wire::MAX_DATAGRAM`] bytes (the server never
/// replies with more bytes than it received), signed as sent at
/// `sent_unix_ms` if `operator` is given; `device` only for a device query.
pub fn query(
    request: u32,
    kind: u8,
    device: &[u8],
    operator: Option<(&Key, u64)>,
    out: &mut [u8],
) -> Result<usize, i32> {
    let kind = match kind {
        PRESENCE_QUERY_DEVICE => QueryKind::Device(id(device)?),
        PRESENCE_QUERY_SUMMARY => QueryKind::Summary,
        _ => return Err(PRESENCE_ERR_BAD_ARGUMENT),
    };
    if out.len() < wire::MAX_DATAGRAM {
        return Err(PRESENCE_ERR_BUFFER_TOO_SMALL);
    }
    auth::encode_query(request, kind, operator, out).map_err(code)
}

/// The status reply in `datagram`.
pub fn status(datagram: &[u8]) -> Result<Status<'_>, i32> {
    match wire::decode(datagram).map_err(code)? {
        Message::Status(status) => Ok(status),
        _ => Err(PRESENCE_ERR_UNEXPECTED_KIND),
    }
}
