//! Stopping and waking the loops: [`Stop`], which any thread may trigger,
//! and [`Waker`], the eventfd that wakes one loop from its wait.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::fd::OwnedFd;

/// An eventfd that wakes one loop: written by another thread (a stop, a
/// hand-over), watched by the loop's epoll, cleared by the loop.
#[derive(Debug)]
pub(super) struct Waker {
    /// The eventfd.
    pub(super) fd: OwnedFd,
}

impl Waker {
    /// A new eventfd, not readable yet.
    pub(super) fn new() -> std::io::Result<Self> {
        use rustix::event::{EventfdFlags, eventfd};
        Ok(Waker { fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)? })
    }

    /// Makes it readable, which wakes its loop.
    pub(super) fn wake(&self) {
        // Fails only if the counter would overflow, and then it is readable anyway.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Makes it unreadable again.
    pub(super) fn clear(&self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut count);
    }
}

/// Asks a running [`run`](super::run) or [`run_sharded`](super::run_sharded)
/// to finish. Cloneable and usable from any thread (a signal handler thread,
/// a test).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// Shared by the clones.
    inner: Arc<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    /// Set once; the loops check it after every wake-up.
    requested: AtomicBool,
    /// The wakers of the loops running under this stop.
    wakers: Mutex<Vec<Arc<Waker>>>,
    /// Addresses of sockets whose loop may block in a receive: an empty
    /// datagram wakes it.
    datagram_wakes: Mutex<Vec<SocketAddr>>,
}

impl Stop {
    /// A stop signal, not yet requested.
    pub fn new() -> Self {
        Stop::default()
    }

    /// Asks the loops to stop and wakes them.
    pub fn stop(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        for waker in self.inner.wakers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            waker.wake();
        }
        for &addr in self.inner.datagram_wakes.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            wake_by_datagram(addr);
        }
    }

    /// Has [`Stop::stop`] also send an empty datagram to `addr`.
    pub(super) fn register_datagram_wake(&self, addr: SocketAddr) {
        self.inner.datagram_wakes.lock().unwrap_or_else(PoisonError::into_inner).push(addr);
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Has `waker` woken by [`Stop::stop`] (checked by the loop after this returns).
    pub(super) fn register(&self, waker: Arc<Waker>) {
        self.inner.wakers.lock().unwrap_or_else(PoisonError::into_inner).push(waker);
    }
}

/// Sends an empty datagram to a socket bound to `addr` (to the loopback
/// address of its family if it is bound to all addresses). If that fails,
/// the loop still stops within [`MAX_BLOCK`](super::wait::MAX_BLOCK).
fn wake_by_datagram(addr: SocketAddr) {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let local: SocketAddr = match ip {
        std::net::IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    if let Ok(socket) = UdpSocket::bind(local) {
        let _ = socket.send_to(&[], SocketAddr::new(ip, addr.port()));
    }
}
