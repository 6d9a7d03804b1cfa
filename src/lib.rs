//! `presence`: a lightweight presence tracker over UDP.
//!
//! Devices send small heartbeat datagrams at a fixed interval; the server
//! keeps who is online in a table ordered by expiry time and notices a silent
//! device at its deadline. Operators ask it for one device, a summary or a
//! paged list of who is online.
//!
//! # Code map
//!
//! - [`wire`] (`no_std`, no allocator): the v1 frame format, encoding into and
//!   decoding from caller buffers. With [`auth`], all a device needs.
//! - [`auth`] (`no_std`): key derivation and tags (keyed BLAKE3).
//! - [`time`] (`no_std`): the engine's own `Instant`, and the `Clock` that
//!   maps the real clock onto it at the edge.
//! - `table` (pure): `table::PresenceTable`, devices indexed by id and
//!   ordered by deadline; a sweep pops only the due entries.
//! - `tracker` (pure): `tracker::Tracker`, the protocol engine. It takes
//!   datagrams and the current time as arguments and returns replies and
//!   online/offline transitions as values; it never reads a clock or touches
//!   a socket.
//! - `state` (pure): the `--state` file format, a snapshot of every held
//!   device; the engine writes and restores it, the server does the file IO.
//! - `limit` (pure): query rate limits and the memory of answered signed queries.
//! - `fleet` (pure): the merge rules of several trackers' shared view
//!   (CLUSTER.md); not wired to NATS yet.
//! - `shard` (pure): which thread owns a device under `--threads N`, and
//!   where a datagram that arrived on another thread's socket must go.
//! - `server`: the loops that own the sockets and the clock. Each sleeps
//!   exactly until its engine's next deadline, and hands transitions to a
//!   bounded queue that a publisher thread drains into the sinks.
//! - `sink`: where transitions go (`sink::Sink`): the JSON-lines events
//!   file now; brokers and metrics later.
//! - `client`: `client::Client` (status queries) and `client::Sender`
//!   (heartbeats), used by the CLI, the examples and the tests.
//! - `hint`: prefetch and huge-page wrappers for the table, the only
//!   module with `unsafe` (two audited blocks).
//! - `keyfile`, `hex`, `text`: key files, hex, ids made safe to print.
//!
//! Features: none gives the `no_std` device side ([`wire`], [`auth`],
//! [`time`]); `engine` adds the pure core; `client` the client and key
//! files; `server` the loops and sinks; `cli` (the default) the binary.
//!
//! # Encoding a heartbeat on a device
//!
//! ```
//! use presence::wire::{self, Heartbeat, Message};
//!
//! let mut buf = [0u8; 64];
//! let hb = Heartbeat { device: "sensor-00042", boot: 7, seq: 1, interval_ms: 10_000, flags: 0, payload: &[], tag: None };
//! let len = wire::encode(&Message::Heartbeat(hb), &mut buf).unwrap();
//! assert!(len <= 32);
//! assert_eq!(wire::decode(&buf[..len]), Ok(Message::Heartbeat(hb)));
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
// `unsafe` is denied everywhere; `hint` alone allows it, for its two
// audited wrappers (prefetch, madvise). `.ci/run` checks that no other
// module lifts the denial.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "engine")]
pub mod fleet;
#[cfg(feature = "std")]
pub mod hex;
#[cfg(feature = "engine")]
pub mod hint;
#[cfg(feature = "client")]
pub mod keyfile;
#[cfg(feature = "engine")]
pub mod limit;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "engine")]
pub mod shard;
#[cfg(feature = "server")]
pub mod sink;
#[cfg(feature = "engine")]
pub mod state;
#[cfg(feature = "engine")]
pub mod table;
#[cfg(feature = "std")]
pub mod text;
pub mod time;
#[cfg(feature = "engine")]
pub mod tracker;
pub mod wire;
