//! The server's hot path: a usual heartbeat decoded without serde.

use super::{Heartbeat, MAX_DATAGRAM, MAX_ID_LEN, MAX_PAYLOAD_LEN, TAG_LEN, VERSION, is_printable_ascii};

/// A cursor over a frame for [`decode_heartbeat_fast`]; every method returns
/// `None` on anything it does not handle, and the caller then falls back.
struct Fast<'a> {
    /// Bytes not read yet.
    rest: &'a [u8],
}

impl<'a> Fast<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// A varint `u32` as postcard writes it (at most 5 bytes, no excess bits).
    fn u32(&mut self) -> Option<u32> {
        let mut value = 0u32;
        for i in 0..5 {
            let b = self.byte()?;
            if i == 4 && b > 0x0f {
                return None;
            }
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// A length-prefixed byte string of fewer than 128 bytes.
    fn short_bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        if len >= 0x80 || len > self.rest.len() {
            return None;
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(bytes)
    }
}

/// A heartbeat as [`decode_heartbeat_ascii`] reads it: the id as bytes
/// (known to be printable ASCII, so valid UTF-8), the rest as in [`Heartbeat`].
pub type RawHeartbeat<'a> = Heartbeat<'a, [u8]>;

impl<'a> From<Heartbeat<'a>> for RawHeartbeat<'a> {
    fn from(hb: Heartbeat<'a>) -> Self {
        hb.with_device(hb.device.as_bytes())
    }
}

/// The server's hot path: a whole frame that is a heartbeat in the usual
/// encoding, with a printable ASCII id. Where this returns `Some`, [`decode`](crate::wire::decode) returns
/// the same heartbeat; where it returns `None`, use [`decode`](crate::wire::decode). It skips the
/// general UTF-8 check, which costs more than the rest of the decoding for a
/// typical id.
pub fn decode_heartbeat_ascii(datagram: &[u8]) -> Option<RawHeartbeat<'_>> {
    match datagram {
        [VERSION, body @ ..] if datagram.len() <= MAX_DATAGRAM => {
            decode_heartbeat_raw(body).filter(|hb| is_printable_ascii(hb.device))
        }
        _ => None,
    }
}

/// The hot path: decodes a well-formed heartbeat (the body after the
/// version byte) without going through serde. It accepts exactly what the
/// general decoder accepts or returns `None`, in which case the general
/// decoder runs and reports the precise error; a property test checks that
/// the two agree on arbitrary input.
pub(super) fn decode_heartbeat_fast(body: &[u8]) -> Option<Heartbeat<'_>> {
    let hb = decode_heartbeat_raw(body)?;
    let device = core::str::from_utf8(hb.device).ok()?;
    if !is_printable_ascii(hb.device) && device.chars().any(char::is_control) {
        return None;
    }
    Some(Heartbeat {
        flags: hb.flags,
        payload: hb.payload,
        tag: hb.tag,
        ..Heartbeat::new(device, hb.boot, hb.seq, hb.interval_ms)
    })
}

/// [`decode_heartbeat_fast`] but for the UTF-8 check of the id.
pub(super) fn decode_heartbeat_raw(body: &[u8]) -> Option<RawHeartbeat<'_>> {
    let mut r = Fast { rest: body };
    if r.byte()? != 0 {
        return None;
    }
    let device = r.short_bytes()?;
    let boot = r.u32()?;
    let seq = r.u32()?;
    let interval_ms = r.u32()?;
    let flags = r.byte()?;
    let payload = r.short_bytes()?;
    let tag = match r.byte()? {
        0 => None,
        1 => Some(r.rest.get(..TAG_LEN)?.try_into().ok()?),
        _ => return None,
    };
    let expected_rest = if tag.is_some() { TAG_LEN } else { 0 };
    if r.rest.len() != expected_rest
        || device.is_empty()
        || device.len() > MAX_ID_LEN
        || payload.len() > MAX_PAYLOAD_LEN
    {
        return None;
    }
    Some(Heartbeat { device, boot, seq, interval_ms, flags, payload, tag })
}
