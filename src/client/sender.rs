//! [`Sender`]: a device's heartbeats, and the boot counter they start from.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::{ClientError, connect, recv_until};
use crate::auth::{self, Key};
use crate::wire::{self, Ack, Heartbeat, Leave, Message};

/// A boot epoch counter kept in a file, for devices (and `presence beat`)
/// that have no better source: each [`BootCounter::next`] returns a boot
/// larger than every one it returned before on this machine, and at least
/// the Unix time in seconds, so two runs within one second still differ.
/// The file holds the last boot in decimal; it is locked while it is
/// updated, so concurrent runs get different boots.
#[derive(Debug, Clone)]
pub struct BootCounter {
    /// The counter file.
    path: std::path::PathBuf,
}

impl BootCounter {
    /// A counter in `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        BootCounter { path: path.into() }
    }

    /// The counter of this user: `$PRESENCE_STATE_DIR/boot`, or
    /// `$XDG_STATE_HOME/presence/boot`, or `~/.local/state/presence/boot`.
    pub fn default_location() -> io::Result<Self> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        let dir = var("PRESENCE_STATE_DIR")
            .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("presence")))
            .or_else(|| var("HOME").map(|h| h.join(".local/state/presence")))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no HOME, XDG_STATE_HOME or PRESENCE_STATE_DIR")
            })?;
        Ok(BootCounter::new(dir.join("boot")))
    }

    /// The next boot: `max(last + 1, Unix seconds now)`, recorded before it is returned.
    pub fn next(&self) -> io::Result<u32> {
        use std::io::{Read, Seek, Write};
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::keyfile::private_dir(std::fs::DirBuilder::new().recursive(true)).create(dir)?;
        }
        let mut file = crate::keyfile::private_file(
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false),
        )
        .open(&self.path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        // Concurrent runs take turns (unix; elsewhere the file is not locked).
        #[cfg(unix)]
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let last: Option<u32> = text.trim().parse().ok();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let next = match last {
            Some(last) => {
                last.checked_add(1).ok_or_else(|| io::Error::other("the boot counter is at its maximum"))?
            }
            None => 0,
        }
        .max(now);
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("{next}\n").as_bytes())?;
        file.sync_all()?;
        Ok(next)
    }
}

/// Sends one device's heartbeats: a fixed boot epoch and an increasing
/// sequence number, as a device would.
#[derive(Debug)]
pub struct Sender {
    /// Connected to the server.
    socket: UdpSocket,
    /// The device id.
    device: String,
    /// This run's boot epoch.
    boot: u32,
    /// The sequence number of the next heartbeat.
    seq: u32,
    /// The declared interval in milliseconds (0 = server default).
    interval_ms: u32,
    /// Time between heartbeats in [`Sender::run`].
    interval: Duration,
    /// The payload sent with each heartbeat.
    payload: Vec<u8>,
    /// The device key that signs heartbeats and leaves, if any.
    key: Option<Key>,
}

impl Sender {
    /// A sender for `device`, declaring `interval` (zero = none), with boot
    /// epoch `boot`. Fails if the id is not 1..=64 bytes.
    pub fn new(server: SocketAddr, device: &str, interval: Duration, boot: u32) -> Result<Self, ClientError> {
        wire::check_id(device)?;
        Ok(Sender {
            socket: connect(server)?,
            device: device.to_owned(),
            boot,
            seq: 1,
            interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
            interval,
            payload: Vec::new(),
            key: None,
        })
    }

    /// Signs heartbeats and leaves with the device's key.
    pub fn with_key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// Encodes `message`, signed if the sender has a key.
    fn encode(&self, message: &Message<'_>, buf: &mut [u8]) -> Result<usize, wire::Error> {
        match &self.key {
            Some(key) => auth::encode_signed(message, key, buf),
            None => wire::encode(message, buf),
        }
    }

    /// The frame of the next heartbeat, without sending it or advancing
    /// the sequence number (for tests that capture and replay datagrams).
    pub fn next_frame(&self, ask_ack: bool) -> Result<Vec<u8>, ClientError> {
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = self.encode(&self.heartbeat(self.seq, ask_ack), &mut buf)?;
        Ok(buf[..len].to_vec())
    }

    fn heartbeat(&self, seq: u32, ask_ack: bool) -> Message<'_> {
        Message::Heartbeat(Heartbeat {
            device: &self.device,
            boot: self.boot,
            seq,
            interval_ms: self.interval_ms,
            flags: if ask_ack { wire::FLAG_ACK } else { 0 },
            payload: &self.payload,
            tag: None,
        })
    }

    /// Sets the payload of the following heartbeats.
    pub fn set_payload(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > wire::MAX_PAYLOAD_LEN {
            return Err(wire::Error::PayloadTooLong.into());
        }
        self.payload = payload.to_vec();
        Ok(())
    }

    /// This sender's boot epoch.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The local address heartbeats are sent from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends the next heartbeat; returns its sequence number and frame size.
    pub fn beat(&mut self, ask_ack: bool) -> Result<(u32, usize), ClientError> {
        let seq = self.seq;
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let len = self.encode(&self.heartbeat(seq, ask_ack), &mut buf)?;
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&buf[..len])?;
        Ok((seq, len))
    }

    /// Waits up to `timeout` for the ack of heartbeat `seq`.
    pub fn wait_ack(&mut self, seq: u32, timeout: Duration) -> Result<Option<Ack>, ClientError> {
        let give_up = Instant::now() + timeout;
        let mut buf = [0u8; wire::MAX_DATAGRAM + 1];
        while let Some(n) = recv_until(&self.socket, give_up, &mut buf)? {
            match wire::decode(&buf[..n]) {
                Ok(Message::Ack(ack)) if ack.seq == seq && ack.boot == self.boot => {
                    return Ok(Some(ack));
                }
                Ok(Message::Error(error)) => return Err(error.into()),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Tells the server this device is going offline now.
    pub fn leave(&mut self) -> Result<(), ClientError> {
        let mut buf = [0u8; wire::MAX_DATAGRAM];
        let leave = Message::Leave(Leave { device: &self.device, boot: self.boot, seq: self.seq, tag: None });
        let len = self.encode(&leave, &mut buf)?;
        self.socket.send(&buf[..len])?;
        Ok(())
    }
}

/// What [`Sender::run`] reports as it goes.
#[derive(Debug)]
#[non_exhaustive]
pub enum BeatEvent {
    /// A heartbeat went out.
    Sent {
        /// Its sequence number.
        seq: u32,
        /// Its size in bytes.
        len: usize,
    },
    /// A heartbeat could not be sent (the run goes on).
    NotSent(ClientError),
    /// The server acknowledged a heartbeat.
    Acked(Ack),
    /// No ack came for a heartbeat within `waited`.
    NoAck {
        /// The heartbeat's sequence number.
        seq: u32,
        /// How long the sender waited.
        waited: Duration,
    },
    /// Waiting for an ack failed (an error reply, a socket error).
    AckFailed {
        /// The heartbeat's sequence number.
        seq: u32,
        /// What went wrong.
        error: ClientError,
    },
    /// The run was interrupted and a Leave went out.
    Left,
}

/// How a [`Sender::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatOutcome {
    /// Heartbeats sent.
    pub sent: u64,
    /// Heartbeats the server acknowledged.
    pub acked: u64,
    /// Whether it ended with a Leave (interrupted) rather than after its count.
    pub left: bool,
}

impl Sender {
    /// Beats every interval, as a device would: `count` heartbeats (forever
    /// if `None`), each asking for an ack if `ask_ack`, waiting for it up to
    /// the interval or 1 s. A message on `interrupt` (or its sender going
    /// away) ends the run with a Leave. `report` sees every step; an error
    /// it returns (a closed stdout, say) ends the run.
    pub fn run(
        &mut self,
        count: Option<u64>,
        ask_ack: bool,
        interrupt: &Receiver<()>,
        mut report: impl FnMut(BeatEvent) -> io::Result<()>,
    ) -> Result<BeatOutcome, ClientError> {
        let mut outcome = BeatOutcome { sent: 0, acked: 0, left: false };
        let mut next = Instant::now();
        while count.is_none_or(|count| outcome.sent < count) {
            match interrupt.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    self.leave()?;
                    report(BeatEvent::Left)?;
                    outcome.left = true;
                    return Ok(outcome);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            next += self.interval;
            let (seq, len) = match self.beat(ask_ack) {
                Ok(sent) => sent,
                Err(error) => {
                    report(BeatEvent::NotSent(error))?;
                    continue;
                }
            };
            outcome.sent += 1;
            report(BeatEvent::Sent { seq, len })?;
            if ask_ack {
                let waited = self.interval.min(Duration::from_secs(1));
                match self.wait_ack(seq, waited) {
                    Ok(Some(ack)) => {
                        outcome.acked += 1;
                        report(BeatEvent::Acked(ack))?;
                    }
                    Ok(None) => report(BeatEvent::NoAck { seq, waited })?,
                    Err(error) => report(BeatEvent::AckFailed { seq, error })?,
                }
            }
        }
        Ok(outcome)
    }
}
