//! What can go wrong with a frame ([`Error`]) and why the server drops a
//! datagram ([`DropReason`], whose codes travel in summaries).

use core::fmt;

use super::{MAX_DATAGRAM, MAX_ID_LEN, MAX_PAYLOAD_LEN};

/// Why a frame could not be encoded or decoded. Small and `Copy`, so it costs
/// nothing on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The datagram ended before the frame did (this includes empty datagrams).
    Truncated,
    /// The datagram is longer than [`MAX_DATAGRAM`].
    Oversized,
    /// The version byte is not [`VERSION`](crate::wire::VERSION); carries the version that was sent.
    UnsupportedVersion(u8),
    /// The kind byte names no message of this version.
    UnknownKind,
    /// A field is not valid postcard (bad varint, bad UTF-8, bad enum tag, ...).
    Malformed,
    /// Bytes follow the end of the frame.
    TrailingBytes,
    /// A device id is empty or longer than [`MAX_ID_LEN`].
    BadDeviceId,
    /// A payload is longer than [`MAX_PAYLOAD_LEN`].
    PayloadTooLong,
    /// A device id holds a control character (C0, DEL or C1), which could
    /// forge lines in logs and terminals that show it.
    IdControlChar,
    /// Encoding only: the caller's buffer cannot hold the frame.
    BufferTooSmall,
    /// Signing only: this kind of message carries no tag (replies are not signed).
    NotSignable,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("datagram ended before the frame did"),
            Error::Oversized => write!(f, "datagram longer than {MAX_DATAGRAM} bytes"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Error::UnknownKind => f.write_str("unknown message kind"),
            Error::Malformed => f.write_str("malformed field"),
            Error::TrailingBytes => f.write_str("trailing bytes after the frame"),
            Error::BadDeviceId => write!(f, "device id must be 1..={MAX_ID_LEN} bytes"),
            Error::PayloadTooLong => write!(f, "payload longer than {MAX_PAYLOAD_LEN} bytes"),
            Error::IdControlChar => f.write_str("device id holds a control character"),
            Error::BufferTooSmall => f.write_str("buffer too small for the frame"),
            Error::NotSignable => f.write_str("this kind of message carries no tag"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => Error::Truncated,
            postcard::Error::SerializeBufferFull => Error::BufferTooSmall,
            _ => Error::Malformed,
        }
    }
}

/// Why the server dropped a datagram. The numeric codes travel in
/// [`Summary::counters`](crate::wire::Summary::counters), so they are part of the protocol and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
#[non_exhaustive]
pub enum DropReason {
    /// See [`Error::Truncated`].
    Truncated = 1,
    /// See [`Error::Oversized`].
    Oversized = 2,
    /// See [`Error::UnsupportedVersion`].
    UnsupportedVersion = 3,
    /// See [`Error::UnknownKind`].
    UnknownKind = 4,
    /// See [`Error::Malformed`].
    Malformed = 5,
    /// See [`Error::TrailingBytes`].
    TrailingBytes = 6,
    /// See [`Error::BadDeviceId`].
    BadDeviceId = 7,
    /// See [`Error::PayloadTooLong`].
    PayloadTooLong = 8,
    /// A well-formed frame of a kind the server never accepts (a reply).
    UnexpectedKind = 9,
    /// The tag does not match (forged, or made with another key).
    BadTag = 10,
    /// The (boot, seq) pair is not newer than what the server has seen, or
    /// was already seen inside the reordering window.
    Replay = 11,
    /// A tag the server has no key to check (it runs without `--key-file`).
    UnknownKey = 12,
    /// A new device while the table is full of online devices (`--max-devices`).
    OverCapacity = 13,
    /// A query over its source's rate limit.
    RateLimited = 14,
    /// A query without an operator tag from a source outside `--query-allow`.
    NotAllowed = 15,
    /// A heartbeat or leave without a tag under `--auth required`, or an
    /// unsigned one under `--auth optional` for a device that has signed before.
    MissingTag = 16,
    /// See [`Error::IdControlChar`].
    IdControlChar = 17,
    /// A signed query whose time is outside the server's window
    /// ([`QUERY_SKEW_MS`](crate::wire::QUERY_SKEW_MS) either side of its clock).
    StaleQuery = 18,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [DropReason; 18] = [
        DropReason::Truncated,
        DropReason::Oversized,
        DropReason::UnsupportedVersion,
        DropReason::UnknownKind,
        DropReason::Malformed,
        DropReason::TrailingBytes,
        DropReason::BadDeviceId,
        DropReason::PayloadTooLong,
        DropReason::UnexpectedKind,
        DropReason::BadTag,
        DropReason::Replay,
        DropReason::UnknownKey,
        DropReason::OverCapacity,
        DropReason::RateLimited,
        DropReason::NotAllowed,
        DropReason::MissingTag,
        DropReason::IdControlChar,
        DropReason::StaleQuery,
    ];

    /// The code carried in [`Counter::code`](crate::wire::Counter::code).
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The reason for a code, if this version knows it.
    pub fn from_code(code: u16) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// A stable snake_case name for logs, JSON and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Oversized => "oversized",
            DropReason::UnsupportedVersion => "unsupported_version",
            DropReason::UnknownKind => "unknown_kind",
            DropReason::Malformed => "malformed",
            DropReason::TrailingBytes => "trailing_bytes",
            DropReason::BadDeviceId => "bad_device_id",
            DropReason::PayloadTooLong => "payload_too_long",
            DropReason::UnexpectedKind => "unexpected_kind",
            DropReason::BadTag => "bad_tag",
            DropReason::Replay => "replay",
            DropReason::UnknownKey => "unknown_key",
            DropReason::OverCapacity => "over_capacity",
            DropReason::RateLimited => "rate_limited",
            DropReason::NotAllowed => "not_allowed",
            DropReason::MissingTag => "missing_tag",
            DropReason::IdControlChar => "id_control_char",
            DropReason::StaleQuery => "stale_query",
        }
    }
}

impl From<Error> for DropReason {
    fn from(e: Error) -> Self {
        match e {
            Error::Truncated | Error::BufferTooSmall => DropReason::Truncated,
            // Never met while decoding; a frame that would need it is malformed.
            Error::NotSignable => DropReason::Malformed,
            Error::Oversized => DropReason::Oversized,
            Error::UnsupportedVersion(_) => DropReason::UnsupportedVersion,
            Error::UnknownKind => DropReason::UnknownKind,
            Error::Malformed => DropReason::Malformed,
            Error::TrailingBytes => DropReason::TrailingBytes,
            Error::BadDeviceId => DropReason::BadDeviceId,
            Error::PayloadTooLong => DropReason::PayloadTooLong,
            Error::IdControlChar => DropReason::IdControlChar,
        }
    }
}
