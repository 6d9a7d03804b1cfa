//! The receive batch: many datagrams per system call with `recvmmsg`.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};

/// Receive buffer size: larger than [`wire::MAX_DATAGRAM`] so an oversized
/// datagram is seen as oversized rather than silently cut to fit.
pub(super) const RECV_BUF: usize = 2048;

/// Datagrams received per `recvmmsg` call.
pub(super) const BATCH: usize = 64;

/// Receive buffers for one `recvmmsg` call: up to [`BATCH`] datagrams per
/// system call instead of one.
pub(super) struct Batch {
    /// The kernel's per-message headers, reused across calls.
    headers: MultiHeaders<SockaddrStorage>,
    /// One buffer per message.
    buffers: Box<[[u8; RECV_BUF]; BATCH]>,
    /// Length and source of each message of the last call.
    received: Vec<(usize, Option<SocketAddr>)>,
    /// The kernel's count of datagrams it dropped for this socket (its
    /// receive queue was full), as the last datagram that carried it said
    /// (SO_RXQ_OVFL: only datagrams that follow a drop carry it).
    pub(super) kernel_drops: u64,
    /// Whether the control buffers must be made again before the next call:
    /// the kernel sets each header's control length to what it wrote (0 for
    /// no drop count), and `nix` does not reset it, so after a call that
    /// had room for none, a drop count is cut off (MSG_CTRUNC). Only
    /// datagrams that follow a drop carry one, so this happens only then.
    refresh: bool,
}

impl Batch {
    pub(super) fn new() -> Self {
        Batch {
            headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u32))),
            buffers: Box::new([[0; RECV_BUF]; BATCH]),
            received: Vec::with_capacity(BATCH),
            kernel_drops: 0,
            refresh: false,
        }
    }

    /// Receives what is waiting; returns how many datagrams. With
    /// `MSG_DONTWAIT` it never blocks; with `MSG_WAITFORONE` on a blocking
    /// socket it waits for the first datagram (or the socket's read timeout).
    pub(super) fn receive(&mut self, socket: &UdpSocket, flags: MsgFlags) -> io::Result<usize> {
        if std::mem::take(&mut self.refresh) {
            self.headers = MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u32)));
        }
        let mut slices = self.buffers.each_mut().map(|buffer| [IoSliceMut::new(buffer)]);
        self.received.clear();
        let results = match recvmmsg(socket.as_raw_fd(), &mut self.headers, slices.iter_mut(), flags, None) {
            Ok(results) => results,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for message in results {
            self.received.push((message.bytes, message.address.and_then(|a| socket_addr(&a))));
            if message.flags.contains(MsgFlags::MSG_CTRUNC) {
                self.refresh = true;
            }
            for cmsg in message.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::RxqOvfl(dropped) = cmsg {
                    self.kernel_drops = self.kernel_drops.max(u64::from(dropped));
                    // The headers that carried it have less room now.
                    self.refresh = true;
                }
            }
        }
        Ok(self.received.len())
    }

    /// The `i`th datagram of the last call and its source.
    pub(super) fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let (len, from) = self.received[i];
        (&self.buffers[i][..len.min(RECV_BUF)], from)
    }
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}
