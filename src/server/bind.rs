//! Binding the server's sockets: one, or an `SO_REUSEPORT` group with the
//! kernel steering each heartbeat to its owner's socket.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::shard;

/// A bound UDP socket and what the kernel granted.
#[derive(Debug)]
pub struct Bound {
    /// The socket, ready for [`run`](super::run).
    pub socket: UdpSocket,
    /// The address it is bound to (with the real port if 0 was asked).
    pub local_addr: SocketAddr,
    /// The receive buffer the kernel granted for data, in bytes: what
    /// `SO_RCVBUF` reports, halved (Linux doubles the size it is given, to
    /// leave room for its bookkeeping, and caps requests at `net.core.rmem_max`).
    pub recv_buffer: usize,
}

/// Binds a UDP socket for the server. `[::]:port` gives a dual-stack socket
/// that also receives IPv4. `recv_buffer`, if given, is requested as
/// SO_RCVBUF; see [`Bound::recv_buffer`] for what was granted.
pub fn bind(addr: SocketAddr, recv_buffer: Option<usize>) -> io::Result<Bound> {
    bind_one(addr, recv_buffer, false)
}

/// Binds `count` sockets to `addr` in one `SO_REUSEPORT` group, one per
/// thread of [`run_sharded`](super::run_sharded); the kernel spreads datagrams over them by
/// source address. With port 0 they share the port the first one got. A
/// count of 1 binds one ordinary socket, as [`bind`] does.
///
/// `SO_REUSEPORT` would let a second server (of the same user) join the
/// group on a fixed port and silently take a share of the datagrams; so
/// before binding the group, a plain socket is bound to the port and closed
/// again, which fails if anything, such a group included, holds it.
pub fn bind_group(addr: SocketAddr, recv_buffer: Option<usize>, count: usize) -> io::Result<Vec<Bound>> {
    if count <= 1 {
        return Ok(vec![bind(addr, recv_buffer)?]);
    }
    if addr.port() != 0 {
        drop(bind_one(addr, None, false)?);
    }
    let first = bind_one(addr, recv_buffer, true)?;
    let addr = SocketAddr::new(addr.ip(), first.local_addr.port());
    let mut group = vec![first];
    for _ in 1..count {
        group.push(bind_one(addr, recv_buffer, true)?);
    }
    Ok(group)
}

/// Attaches [`shard::steering_program`] to a group from [`bind_group`], so
/// the kernel delivers each heartbeat and leave to the socket of the shard
/// that owns its device and the threads rarely hand datagrams over. Without
/// it (an error here) everything still works, with more hand-overs.
pub fn steer_by_id(group: &[Bound]) -> io::Result<()> {
    use nix::libc::{sock_filter, sock_fprog};
    let Some(first) = group.first().filter(|_| group.len() > 1) else {
        return Ok(());
    };
    let mut filter: Vec<sock_filter> = shard::steering_program(group.len())
        .into_iter()
        .map(|i| sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
        .collect();
    let program = sock_fprog {
        // The program has 20 + 9 × 64 + 3 instructions: far below u16::MAX.
        len: u16::try_from(filter.len()).unwrap_or(u16::MAX),
        filter: filter.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(&first.socket, nix::sys::socket::sockopt::AttachReusePortCbpf, &program)?;
    Ok(())
}

fn bind_one(addr: SocketAddr, recv_buffer: Option<usize>, reuse_port: bool) -> io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    if reuse_port {
        rustix::net::sockopt::set_socket_reuseport(&socket, true)?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()? / 2;
    let socket: UdpSocket = socket.into();
    let local_addr = socket.local_addr()?;
    Ok(Bound { socket, local_addr, recv_buffer: granted })
}
