//! Talking to a server: [`Client`] asks status queries (`query.rs`),
//! [`Sender`] sends a device's heartbeats (`sender.rs`), and the answers
//! come as owned reports (`report.rs`). The CLI, the examples and the tests
//! use these.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::wire;

/// Why a request to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The server's host said nothing listens on that port (ICMP port unreachable).
    #[error("nothing is listening on {server} (connection refused)")]
    Refused {
        /// Who was asked.
        server: SocketAddr,
    },
    /// Nothing came back in time.
    #[error("no reply from {server} within {}", humantime::format_duration(*timeout))]
    NoReply {
        /// Who was asked.
        server: SocketAddr,
        /// How long we waited in all.
        timeout: Duration,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol version {server_version}, this client speaks {}", wire::VERSION)]
    UnsupportedVersion {
        /// The version the server said it speaks.
        server_version: u8,
    },
    /// The server sent a reply that does not answer the question.
    #[error("unexpected reply from the server")]
    UnexpectedReply,
    /// The server needs an operator key for queries from this address.
    #[error(
        "the server refused the query: use --key-file with the master or operator key, or query from an address in its --query-allow"
    )]
    NotAllowed,
    /// The server refused a signed query because this machine's clock is
    /// too far from its own.
    #[error(
        "the server refused the signed query as stale: this clock is {} {} the server's (at most {}s either way is accepted); fix the clock (NTP)",
        humantime::format_duration(Duration::from_millis(offset_ms.unsigned_abs())),
        if *offset_ms > 0 { "ahead of" } else { "behind" },
        wire::QUERY_SKEW_MS / 1000
    )]
    ClockSkew {
        /// This clock minus the server's, in milliseconds (as of the refusal).
        offset_ms: i64,
    },
    /// A frame could not be built (e.g. an id too long).
    #[error(transparent)]
    Wire(#[from] wire::Error),
}

/// A UDP socket connected to `server`, bound to the matching unspecified address.
fn connect(server: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    Ok(socket)
}

impl From<wire::ErrorReply> for ClientError {
    fn from(error: wire::ErrorReply) -> Self {
        match error.code {
            wire::ErrorCode::UnsupportedVersion => {
                ClientError::UnsupportedVersion { server_version: error.supported_version }
            }
            wire::ErrorCode::NotAllowed => ClientError::NotAllowed,
            // Queries are always padded to the largest reply, so this means a broken server.
            wire::ErrorCode::RequestTooSmall { .. } => ClientError::UnexpectedReply,
            wire::ErrorCode::StaleQuery { server_unix_ms } => {
                let offset = i128::from(unix_ms_now()) - i128::from(server_unix_ms);
                ClientError::ClockSkew { offset_ms: i64::try_from(offset).unwrap_or(i64::MAX) }
            }
        }
    }
}

pub use crate::text::printable;

/// The wall clock in Unix milliseconds (0 if it reads before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub use crate::auth::encode_query;

/// Receives one datagram on a connected socket, waiting until `deadline` at
/// most; `None` once the deadline has passed.
fn recv_until(socket: &UdpSocket, deadline: Instant, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        let Some(wait) = deadline.checked_duration_since(Instant::now()).filter(|w| !w.is_zero()) else {
            return Ok(None);
        };
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

mod query;
mod report;
mod sender;

pub use query::{Client, ListPage};
pub use report::{DeviceReport, SummaryReport};
pub use sender::{BeatEvent, BeatOutcome, BootCounter, Sender};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_counter_grows_even_within_one_second() {
        let dir = tempfile::tempdir().unwrap();
        let counter = BootCounter::new(dir.path().join("state/boot"));
        let boots: Vec<u32> = (0..5).map(|_| counter.next().unwrap()).collect();
        assert!(boots.windows(2).all(|w| w[1] > w[0]), "{boots:?}");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32;
        assert!(boots[0] >= now - 1, "at least the Unix time");
        // A counter ahead of the clock keeps counting from where it is.
        std::fs::write(dir.path().join("state/boot"), format!("{}\n", now + 1000)).unwrap();
        assert_eq!(counter.next().unwrap(), now + 1001);
    }

    #[test]
    fn printable_escapes_control_characters_for_display() {
        assert_eq!(printable("boiler-7"), "boiler-7");
        assert_eq!(printable("café ☃"), "café ☃");
        assert_eq!(printable("a\nINFO forged"), "a\\nINFO forged");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("c1\u{9b}"), "c1\\u{9b}");
        assert_eq!(
            printable("back\\slash"),
            "back\\\\slash",
            "a backslash is escaped, so escapes cannot be forged"
        );
    }
}
