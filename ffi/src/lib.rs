//! The device side of `presence` for C programs and firmware: encode a
//! heartbeat (signed with the device key, or not) or a leave into the
//! caller's buffer, decode the server's ack, and, for C tools that query,
//! encode a query and decode the status reply. No allocator, no panics:
//! every function checks its pointers and lengths and returns a negative
//! `PRESENCE_ERR_*` code instead.
//!
//! The C header, `include/presence.h`, is generated from this file with
//! cbindgen (`tests/header.rs` fails when the committed one differs).
//!
//! The logic is safe Rust over slices (this file and [`frames`]); the only
//! `unsafe` is in [`abi`], which turns the C pointers into slices and
//! writes the C structs, each block with its SAFETY argument.
#![cfg_attr(target_os = "none", no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![allow(non_camel_case_types)]

pub mod abi;
pub mod frames;

pub use abi::*;

/// The largest datagram of the protocol, in bytes: a query is padded to it,
/// and a buffer of this size holds any frame.
pub const PRESENCE_MAX_DATAGRAM: usize = 1200;
/// The longest device id, in bytes (UTF-8, no control characters).
pub const PRESENCE_MAX_ID_LEN: usize = 64;
/// The longest heartbeat payload, in bytes.
pub const PRESENCE_MAX_PAYLOAD_LEN: usize = 64;
/// The length of a device or operator key, in bytes.
pub const PRESENCE_KEY_LEN: usize = 32;
/// A buffer of this many bytes holds any heartbeat or leave, signed or not:
/// version, kind, id length, 64-byte id, three 5-byte varints, flags,
/// payload length, 64-byte payload, tag marker, 8-byte tag.
pub const PRESENCE_MAX_HEARTBEAT_LEN: usize = 157;
/// Heartbeat flag: ask the server for an ack.
pub const PRESENCE_FLAG_ACK: u8 = 1;

/// Success (a function that returns a length returns it instead).
pub const PRESENCE_OK: i32 = 0;
/// A pointer the function needs is NULL.
pub const PRESENCE_ERR_NULL: i32 = -1;
/// The output buffer is too small for the frame.
pub const PRESENCE_ERR_BUFFER_TOO_SMALL: i32 = -2;
/// The device id is empty, longer than `PRESENCE_MAX_ID_LEN`, or not UTF-8.
pub const PRESENCE_ERR_BAD_ID: i32 = -3;
/// The device id holds a control character.
pub const PRESENCE_ERR_ID_CONTROL_CHAR: i32 = -4;
/// The payload is longer than `PRESENCE_MAX_PAYLOAD_LEN`.
pub const PRESENCE_ERR_PAYLOAD_TOO_LONG: i32 = -5;
/// The datagram ended before the frame did (an empty one included).
pub const PRESENCE_ERR_TRUNCATED: i32 = -6;
/// The datagram is longer than `PRESENCE_MAX_DATAGRAM`.
pub const PRESENCE_ERR_OVERSIZED: i32 = -7;
/// The datagram speaks another protocol version.
pub const PRESENCE_ERR_UNSUPPORTED_VERSION: i32 = -8;
/// The datagram's kind is unknown to this version.
pub const PRESENCE_ERR_UNKNOWN_KIND: i32 = -9;
/// A field of the datagram is malformed (or bytes follow the frame).
pub const PRESENCE_ERR_MALFORMED: i32 = -10;
/// A valid frame, but not of the kind asked for (for instance an `Error`
/// reply where an ack was expected).
pub const PRESENCE_ERR_UNEXPECTED_KIND: i32 = -11;
/// An argument is out of its range (an unknown query kind, a page entry
/// past the page's end).
pub const PRESENCE_ERR_BAD_ARGUMENT: i32 = -12;

// The C constants are literals (cbindgen copies them into the header);
// these keep them equal to the crate's.
const _: () = {
    assert!(PRESENCE_MAX_DATAGRAM == presence::wire::MAX_DATAGRAM);
    assert!(PRESENCE_MAX_ID_LEN == presence::wire::MAX_ID_LEN);
    assert!(PRESENCE_MAX_PAYLOAD_LEN == presence::wire::MAX_PAYLOAD_LEN);
    assert!(PRESENCE_KEY_LEN == presence::auth::KEY_LEN);
    assert!(PRESENCE_FLAG_ACK == presence::wire::FLAG_ACK);
    assert!(PRESENCE_MAX_HEARTBEAT_LEN == 3 + 64 + 3 * 5 + 2 + 64 + 1 + presence::wire::TAG_LEN);
};

/// The error code for a wire error.
pub(crate) fn code(error: presence::wire::Error) -> i32 {
    use presence::wire::Error;
    match error {
        Error::Truncated => PRESENCE_ERR_TRUNCATED,
        Error::Oversized => PRESENCE_ERR_OVERSIZED,
        Error::UnsupportedVersion(_) => PRESENCE_ERR_UNSUPPORTED_VERSION,
        Error::UnknownKind => PRESENCE_ERR_UNKNOWN_KIND,
        Error::Malformed | Error::TrailingBytes => PRESENCE_ERR_MALFORMED,
        Error::BadDeviceId => PRESENCE_ERR_BAD_ID,
        Error::PayloadTooLong => PRESENCE_ERR_PAYLOAD_TOO_LONG,
        Error::IdControlChar => PRESENCE_ERR_ID_CONTROL_CHAR,
        Error::BufferTooSmall => PRESENCE_ERR_BUFFER_TOO_SMALL,
        // Only replies are unsignable, and nothing here signs one.
        Error::NotSignable => PRESENCE_ERR_BAD_ARGUMENT,
        // The wire error type may grow.
        #[allow(unreachable_patterns)]
        _ => PRESENCE_ERR_MALFORMED,
    }
}

/// On bare metal the library must say what a panic does. None is reachable
/// from any input (each function checks its arguments, and the wire code
/// never panics); if one were, the device stops here rather than run on in
/// an unknown state, and its watchdog resets it.
#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
