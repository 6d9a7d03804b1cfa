//! The C ABI: the only `unsafe` of the crate. Each function checks its
//! pointers (NULL → `PRESENCE_ERR_NULL`, except where NULL means "none")
//! and bounds every length before it makes a slice: no slice is ever
//! longer than `PRESENCE_MAX_DATAGRAM` bytes, so a wrong length past the
//! limits is refused without reading past them. The work is done by
//! [`crate::frames`], in safe Rust.

use core::ptr;

use presence::auth::Key;
use presence::wire::{self, Addr, DeviceInfo, StatusBody};

use crate::frames;
use crate::{
    PRESENCE_ERR_BAD_ID, PRESENCE_ERR_NULL, PRESENCE_ERR_OVERSIZED, PRESENCE_ERR_PAYLOAD_TOO_LONG,
    PRESENCE_OK,
};

/// A heartbeat to encode. `id` (UTF-8, 1 to `PRESENCE_MAX_ID_LEN` bytes, no
/// control characters) and `payload` (0 to `PRESENCE_MAX_PAYLOAD_LEN`
/// bytes; NULL when empty) are read during the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct presence_heartbeat {
    /// The device id, `id_len` bytes (not NUL-terminated).
    pub id: *const u8,
    /// Its length in bytes.
    pub id_len: usize,
    /// The boot epoch: a number that grows at every boot (a counter in flash).
    pub boot: u32,
    /// The sequence number: +1 per heartbeat within a boot.
    pub seq: u32,
    /// The device's heartbeat interval in ms; 0: the server's `--timeout`.
    pub interval_ms: u32,
    /// `PRESENCE_FLAG_ACK` to ask for an ack; other bits are reserved (0).
    pub flags: u8,
    /// Application data, `payload_len` bytes, or NULL.
    pub payload: *const u8,
    /// Its length in bytes.
    pub payload_len: usize,
}

/// The server's ack of a heartbeat.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct presence_ack {
    /// The acknowledged heartbeat's boot epoch.
    pub boot: u32,
    /// The acknowledged heartbeat's sequence number.
    pub seq: u32,
    /// The interval the server expects from this device, in ms.
    pub interval_ms: u32,
    /// The device is offline this long (ms) after its last heartbeat.
    pub ttl_ms: u32,
}

/// One device, as a status reply tells it. `id` and `payload` point into
/// the datagram given to the decoder: they are valid while it is.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct presence_device {
    /// The device id, `id_len` bytes of UTF-8 (not NUL-terminated).
    pub id: *const u8,
    /// Its length in bytes.
    pub id_len: usize,
    /// Whether it is online.
    pub online: bool,
    /// 4 or 6: which part of `addr` holds its last address.
    pub addr_family: u8,
    /// Its last address: the first 4 bytes for IPv4, all 16 for IPv6.
    pub addr: [u8; 16],
    /// Its last source port.
    pub port: u16,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ago_ms: u64,
    /// Its last heartbeat, Unix time in ms.
    pub last_seen_unix_ms: u64,
    /// Milliseconds until it expires (0 when offline).
    pub expires_in_ms: u64,
    /// Its TTL in ms.
    pub ttl_ms: u32,
    /// Its declared interval in ms.
    pub interval_ms: u32,
    /// The boot epoch of its newest heartbeat.
    pub boot: u32,
    /// The sequence number of its newest heartbeat.
    pub seq: u32,
    /// Heartbeats accepted from it.
    pub heartbeats: u64,
    /// Its flap score (state changes within the flap window).
    pub flaps: u32,
    /// The version of its latest transition.
    pub version: u32,
    /// Its latest payload, `payload_len` bytes (into the datagram).
    pub payload: *const u8,
    /// Its length in bytes.
    pub payload_len: usize,
    /// 0 online, 1 expired, 2 left, 3 online but late, 4 online and held.
    pub offline_reason: u8,
}

/// The server's counts, from a summary reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct presence_summary {
    /// Devices online.
    pub online: u64,
    /// Devices held, online or offline.
    pub known: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Leaves accepted.
    pub leaves: u64,
    /// Queries answered.
    pub queries: u64,
    /// Devices that expired.
    pub expirations: u64,
    /// Online devices that are late (suspect).
    pub late: u64,
    /// Online devices held while the server is degraded.
    pub held: u64,
    /// 1 while the server is degraded (suspects its own network).
    pub degraded: u64,
}

/// `presence_status.body`: the server does not know the device.
pub const PRESENCE_STATUS_UNKNOWN_DEVICE: u8 = 0;
/// `presence_status.body`: `device` holds the device.
pub const PRESENCE_STATUS_DEVICE: u8 = 1;
/// `presence_status.body`: `summary` holds the counts.
pub const PRESENCE_STATUS_SUMMARY: u8 = 2;
/// `presence_status.body`: a page of a listing (`page_matched`,
/// `page_entries`; `presence_decode_page_entry` reads each).
pub const PRESENCE_STATUS_PAGE: u8 = 3;

/// A decoded status reply; which part is set depends on `body`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct presence_status {
    /// The request number the query carried.
    pub request: u32,
    /// `PRESENCE_STATUS_*`.
    pub body: u8,
    /// The device, for `PRESENCE_STATUS_DEVICE`.
    pub device: presence_device,
    /// The counts, for `PRESENCE_STATUS_SUMMARY`.
    pub summary: presence_summary,
    /// For `PRESENCE_STATUS_PAGE`: devices the listing's filter matched in this page.
    pub page_matched: u64,
    /// For `PRESENCE_STATUS_PAGE`: entries in this page.
    pub page_entries: u32,
}

const EMPTY_DEVICE: presence_device = presence_device {
    id: ptr::null(),
    id_len: 0,
    online: false,
    addr_family: 0,
    addr: [0; 16],
    port: 0,
    last_seen_ago_ms: 0,
    last_seen_unix_ms: 0,
    expires_in_ms: 0,
    ttl_ms: 0,
    interval_ms: 0,
    boot: 0,
    seq: 0,
    heartbeats: 0,
    flaps: 0,
    version: 0,
    payload: ptr::null(),
    payload_len: 0,
    offline_reason: 0,
};

/// `len` bytes at `ptr` (NULL allowed when `len` is 0), refusing lengths
/// above `max` with `too_long` before anything is read.
///
/// # Safety
/// If `len` is at most `max` and not 0, `ptr` must be NULL or valid for
/// reads of `len` bytes for `'a`.
unsafe fn input<'a>(ptr: *const u8, len: usize, max: usize, too_long: i32) -> Result<&'a [u8], i32> {
    if len > max {
        return Err(too_long);
    }
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(PRESENCE_ERR_NULL);
    }
    // SAFETY: non-NULL, and the caller guarantees `len` readable bytes;
    // `len` ≤ `max` ≤ PRESENCE_MAX_DATAGRAM, far below isize::MAX.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// The caller's output buffer: at most `PRESENCE_MAX_DATAGRAM` of its bytes
/// (no frame is longer).
///
/// # Safety
/// `ptr` must be NULL or valid for writes of `len` bytes for `'a`, and not
/// overlap any input of the same call.
unsafe fn output<'a>(ptr: *mut u8, len: usize) -> Result<&'a mut [u8], i32> {
    if ptr.is_null() {
        return Err(PRESENCE_ERR_NULL);
    }
    // SAFETY: non-NULL, writable for `len` ≥ this many bytes (the caller's
    // guarantee), and not aliased during the call.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, len.min(wire::MAX_DATAGRAM)) })
}

/// The 32-byte key at `ptr`, or `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or valid for reads of `PRESENCE_KEY_LEN` bytes.
unsafe fn read_key(ptr: *const u8) -> Option<Key> {
    if ptr.is_null() {
        return None;
    }
    let mut key = [0u8; presence::auth::KEY_LEN];
    // SAFETY: non-NULL and readable for KEY_LEN bytes (the caller's
    // guarantee); `key` is a fresh local, so they cannot overlap.
    unsafe { ptr::copy_nonoverlapping(ptr, key.as_mut_ptr(), key.len()) };
    Some(key)
}

/// A length or an error as the C functions return it.
fn length(result: Result<usize, i32>) -> i32 {
    match result {
        // Frames are at most PRESENCE_MAX_DATAGRAM bytes.
        Ok(len) => i32::try_from(len).unwrap_or(crate::PRESENCE_ERR_OVERSIZED),
        Err(code) => code,
    }
}

/// Encodes a heartbeat into `out` (`out_len` bytes; `PRESENCE_MAX_HEARTBEAT_LEN`
/// always suffices) and returns the frame's length, or a negative
/// `PRESENCE_ERR_*`. With `key` (`PRESENCE_KEY_LEN` bytes: the device key,
/// from `presence derive-key`) the frame is signed; with NULL it is not.
/// Nothing is kept after the call; `out` may hold anything on error.
///
/// # Safety
/// `hb` must be NULL or point to a valid `presence_heartbeat` whose `id` and
/// `payload` are readable for their lengths; `key` NULL or readable for 32
/// bytes; `out` NULL or writable for `out_len` bytes, overlapping none of them.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_encode_heartbeat(
    hb: *const presence_heartbeat,
    key: *const u8,
    out: *mut u8,
    out_len: usize,
) -> i32 {
    // SAFETY: `hb` is NULL or valid (the caller's guarantee).
    let Some(hb) = (unsafe { hb.as_ref() }) else { return PRESENCE_ERR_NULL };
    let run = || {
        // SAFETY: the caller guarantees each pointer for its length.
        let (id, payload, key, out) = unsafe {
            (
                input(hb.id, hb.id_len, wire::MAX_ID_LEN, PRESENCE_ERR_BAD_ID)?,
                input(hb.payload, hb.payload_len, wire::MAX_PAYLOAD_LEN, PRESENCE_ERR_PAYLOAD_TOO_LONG)?,
                read_key(key),
                output(out, out_len)?,
            )
        };
        if id.is_empty() {
            return Err(PRESENCE_ERR_BAD_ID);
        }
        frames::heartbeat(id, hb.boot, hb.seq, hb.interval_ms, hb.flags, payload, key.as_ref(), out)
    };
    length(run())
}

/// Encodes a leave (the device goes offline now, as its last act) into
/// `out` and returns its length, or a negative `PRESENCE_ERR_*`. `seq` is
/// the next sequence number after its last heartbeat; `key` as for
/// `presence_encode_heartbeat`.
///
/// # Safety
/// `id` must be readable for `id_len` bytes, `key` NULL or readable for 32
/// bytes, `out` NULL or writable for `out_len` bytes, not overlapping them.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_encode_leave(
    id: *const u8,
    id_len: usize,
    boot: u32,
    seq: u32,
    key: *const u8,
    out: *mut u8,
    out_len: usize,
) -> i32 {
    let run = || {
        // SAFETY: the caller guarantees each pointer for its length.
        let (id, key, out) = unsafe {
            (input(id, id_len, wire::MAX_ID_LEN, PRESENCE_ERR_BAD_ID)?, read_key(key), output(out, out_len)?)
        };
        if id.is_empty() {
            return Err(PRESENCE_ERR_BAD_ID);
        }
        frames::leave(id, boot, seq, key.as_ref(), out)
    };
    length(run())
}

/// Decodes an ack (`len` bytes at `datagram`, as received) into `*ack`.
/// Returns `PRESENCE_OK`, or a negative `PRESENCE_ERR_*` and leaves `*ack`
/// alone (`PRESENCE_ERR_UNEXPECTED_KIND` for a valid frame of another
/// kind). Check that `ack->boot` and `ack->seq` are those of a heartbeat
/// you sent.
///
/// # Safety
/// `datagram` must be readable for `len` bytes (NULL if 0); `ack` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_decode_ack(datagram: *const u8, len: usize, ack: *mut presence_ack) -> i32 {
    if ack.is_null() {
        return PRESENCE_ERR_NULL;
    }
    // SAFETY: the caller guarantees `datagram` for `len` bytes.
    let decoded =
        unsafe { input(datagram, len, wire::MAX_DATAGRAM, PRESENCE_ERR_OVERSIZED) }.and_then(frames::ack);
    match decoded {
        Ok(decoded) => {
            let value = presence_ack {
                boot: decoded.boot,
                seq: decoded.seq,
                interval_ms: decoded.interval_ms,
                ttl_ms: decoded.ttl_ms,
            };
            // SAFETY: non-NULL and writable (the caller's guarantee).
            unsafe { ack.write(value) };
            PRESENCE_OK
        }
        Err(code) => code,
    }
}

/// `kind` for `presence_encode_query`: one device (`id`).
pub const PRESENCE_QUERY_DEVICE: u8 = 0;
/// `kind` for `presence_encode_query`: the summary (`id` unused).
pub const PRESENCE_QUERY_SUMMARY: u8 = 1;

/// Encodes a query, padded to `PRESENCE_MAX_DATAGRAM` bytes as the protocol
/// asks (`out_len` must be at least that), and returns its length or a
/// negative `PRESENCE_ERR_*`. `kind` is `PRESENCE_QUERY_DEVICE` (with the
/// device's `id`) or `PRESENCE_QUERY_SUMMARY` (`id` may be NULL). With
/// `operator_key` (32 bytes) the query is signed as sent at
/// `sent_unix_ms` (Unix time in ms, by a clock within 30 s of the
/// server's); with NULL it is not signed (the server answers only allowed
/// sources then).
///
/// # Safety
/// `id` readable for `id_len` bytes (NULL if 0), `operator_key` NULL or
/// readable for 32 bytes, `out` NULL or writable for `out_len` bytes, not
/// overlapping them.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_encode_query(
    request: u32,
    kind: u8,
    id: *const u8,
    id_len: usize,
    operator_key: *const u8,
    sent_unix_ms: u64,
    out: *mut u8,
    out_len: usize,
) -> i32 {
    let run = || {
        // SAFETY: the caller guarantees each pointer for its length.
        let (id, key, out) = unsafe {
            (
                input(id, id_len, wire::MAX_ID_LEN, PRESENCE_ERR_BAD_ID)?,
                read_key(operator_key),
                output(out, out_len)?,
            )
        };
        frames::query(request, kind, id, key.as_ref().map(|key| (key, sent_unix_ms)), out)
    };
    length(run())
}

fn device(info: &DeviceInfo<'_>) -> presence_device {
    let (addr_family, addr, port) = match info.addr {
        Addr::V4(ip, port) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&ip);
            (4, addr, port)
        }
        Addr::V6(ip, port) => (6, ip, port),
    };
    let n = &info.numbers;
    presence_device {
        id: info.device.as_ptr(),
        id_len: info.device.len(),
        online: info.online,
        addr_family,
        addr,
        port,
        last_seen_ago_ms: n.last_seen_ago_ms,
        last_seen_unix_ms: n.last_seen_unix_ms,
        expires_in_ms: n.expires_in_ms,
        ttl_ms: n.ttl_ms,
        interval_ms: n.interval_ms,
        boot: n.boot,
        seq: n.seq,
        heartbeats: n.heartbeats,
        flaps: n.flaps,
        version: n.version,
        payload: info.payload.as_ptr(),
        payload_len: info.payload.len(),
        offline_reason: info.offline_reason,
    }
}

/// The status reply in `len` bytes at `datagram`.
///
/// # Safety
/// `datagram` must be readable for `len` bytes (NULL if 0).
unsafe fn status_input<'a>(datagram: *const u8, len: usize) -> Result<wire::Status<'a>, i32> {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { input(datagram, len, wire::MAX_DATAGRAM, PRESENCE_ERR_OVERSIZED) }.and_then(frames::status)
}

/// Decodes a status reply into `*status`. Returns `PRESENCE_OK`, or a
/// negative `PRESENCE_ERR_*` and leaves `*status` alone. Pointers in it
/// point into `datagram`.
///
/// # Safety
/// `datagram` must be readable for `len` bytes (NULL if 0) and outlive the
/// use of the pointers in `*status`; `status` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_decode_status(
    datagram: *const u8,
    len: usize,
    status: *mut presence_status,
) -> i32 {
    if status.is_null() {
        return PRESENCE_ERR_NULL;
    }
    // SAFETY: the caller guarantees `datagram` for `len` bytes.
    let decoded = match unsafe { status_input(datagram, len) } {
        Ok(decoded) => decoded,
        Err(code) => return code,
    };
    let mut value = presence_status {
        request: decoded.request,
        body: PRESENCE_STATUS_UNKNOWN_DEVICE,
        device: EMPTY_DEVICE,
        summary: presence_summary::default(),
        page_matched: 0,
        page_entries: 0,
    };
    match &decoded.body {
        StatusBody::UnknownDevice => {}
        StatusBody::Device(info) => {
            value.body = PRESENCE_STATUS_DEVICE;
            value.device = device(info);
        }
        StatusBody::Summary(summary) => {
            let c = &summary.counts;
            value.body = PRESENCE_STATUS_SUMMARY;
            value.summary = presence_summary {
                online: c.online,
                known: c.known,
                uptime_ms: c.uptime_ms,
                heartbeats: c.heartbeats,
                leaves: c.leaves,
                queries: c.queries,
                expirations: c.expirations,
                late: c.late,
                held: c.held,
                degraded: c.degraded,
            };
        }
        StatusBody::Page(page) => {
            value.body = PRESENCE_STATUS_PAGE;
            value.page_matched = page.matched;
            value.page_entries = u32::try_from(page.entries.iter().count()).unwrap_or(u32::MAX);
        }
    }
    // SAFETY: non-NULL and writable (the caller's guarantee).
    unsafe { status.write(value) };
    PRESENCE_OK
}

/// Decodes entry `index` (from 0) of the page in a status reply into
/// `*device`. Returns `PRESENCE_OK`, `PRESENCE_ERR_BAD_ARGUMENT` if the
/// page has no such entry (or the reply is not a page), or another negative
/// `PRESENCE_ERR_*`. Pointers in `*device` point into `datagram`.
///
/// # Safety
/// As for `presence_decode_status`; `device` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn presence_decode_page_entry(
    datagram: *const u8,
    len: usize,
    index: u32,
    device_out: *mut presence_device,
) -> i32 {
    if device_out.is_null() {
        return PRESENCE_ERR_NULL;
    }
    // SAFETY: the caller guarantees `datagram` for `len` bytes.
    let entry = match unsafe { status_input(datagram, len) } {
        Ok(status) => match status.body {
            StatusBody::Page(page) => page.entries.iter().nth(index as usize),
            _ => None,
        },
        Err(code) => return code,
    };
    match entry {
        Some(Ok(info)) => {
            // SAFETY: non-NULL and writable (the caller's guarantee).
            unsafe { device_out.write(device(&info)) };
            PRESENCE_OK
        }
        Some(Err(e)) => crate::code(e),
        None => crate::PRESENCE_ERR_BAD_ARGUMENT,
    }
}

/// A short English description of a `PRESENCE_ERR_*` code (or
/// `PRESENCE_OK`), as a static NUL-terminated string; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn presence_strerror(code: i32) -> *const core::ffi::c_char {
    let text: &'static core::ffi::CStr = match code {
        PRESENCE_OK => c"ok",
        PRESENCE_ERR_NULL => c"a required pointer is NULL",
        crate::PRESENCE_ERR_BUFFER_TOO_SMALL => c"the output buffer is too small",
        PRESENCE_ERR_BAD_ID => c"the device id is empty, too long or not UTF-8",
        crate::PRESENCE_ERR_ID_CONTROL_CHAR => c"the device id holds a control character",
        PRESENCE_ERR_PAYLOAD_TOO_LONG => c"the payload is too long",
        crate::PRESENCE_ERR_TRUNCATED => c"the datagram ended before the frame did",
        PRESENCE_ERR_OVERSIZED => c"the datagram is too long",
        crate::PRESENCE_ERR_UNSUPPORTED_VERSION => c"another protocol version",
        crate::PRESENCE_ERR_UNKNOWN_KIND => c"unknown message kind",
        crate::PRESENCE_ERR_MALFORMED => c"malformed frame",
        crate::PRESENCE_ERR_UNEXPECTED_KIND => c"a valid frame of another kind",
        crate::PRESENCE_ERR_BAD_ARGUMENT => c"an argument is out of range",
        _ => c"unknown error code",
    };
    text.as_ptr()
}
