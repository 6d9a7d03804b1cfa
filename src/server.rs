//! The server: one loop that owns the socket and the clock and drives the
//! [`Tracker`].
//!
//! The loop asks the engine for its next deadline, arms a one-shot timer
//! for it, and waits for either the socket or the timer. It then handles the
//! datagrams that arrived (received with `recvmmsg`, up to 4 × 64 per wake-up)
//! and expires what is due. Nothing
//! scans all devices on a tick, and with no device online the timer is
//! disarmed and the loop blocks until a datagram comes.
//!
//! [`run`] takes an already bound socket and a [`Stop`], so tests bind
//! `127.0.0.1:0` and stop the loop when they are done.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use socket2::{Domain, Protocol, Socket, Type};

use rustix::fd::OwnedFd;

use crate::shard::{self, Route};
use crate::tracker::{Counters, Handled, Totals, Tracker};
use crate::wire::{self, DropReason};

mod events;

pub use events::{EventLog, EventObserver};

/// Receive buffer size: larger than [`wire::MAX_DATAGRAM`] so an oversized
/// datagram is seen as oversized rather than silently cut to fit.
const RECV_BUF: usize = 2048;

/// A bound UDP socket and what the kernel granted.
#[derive(Debug)]
pub struct Bound {
    /// The socket, ready for [`run`].
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
/// thread of [`run_sharded`]; the kernel spreads datagrams over them by
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
        len: u16::try_from(filter.len()).map_err(|_| io::Error::other("BPF program too long"))?,
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

/// Asks a running [`run`] or [`run_sharded`] to finish. Cloneable and usable
/// from any thread (a signal handler thread, a test).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    inner: Arc<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    /// Set once; the loops check it after every wake-up.
    requested: AtomicBool,
    /// The eventfds that wake the loops running under this stop.
    wakers: Mutex<Vec<Arc<OwnedFd>>>,
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
            wake(waker);
        }
        for &addr in self.inner.datagram_wakes.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            wake_by_datagram(addr);
        }
    }

    /// Has [`Stop::stop`] also send an empty datagram to `addr`.
    fn register_datagram_wake(&self, addr: SocketAddr) {
        self.inner.datagram_wakes.lock().unwrap_or_else(PoisonError::into_inner).push(addr);
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// Has `waker` woken by [`Stop::stop`] (checked by the loop after this returns).
    fn register(&self, waker: Arc<OwnedFd>) {
        self.inner.wakers.lock().unwrap_or_else(PoisonError::into_inner).push(waker);
    }
}

/// Makes an eventfd readable.
fn wake(waker: &OwnedFd) {
    // Fails only if the counter would overflow, and then it is readable anyway.
    let _ = rustix::io::write(waker, &1u64.to_ne_bytes());
}

/// Sends an empty datagram to a socket bound to `addr` (to the loopback
/// address of its family if it is bound to all addresses). If that fails,
/// the loop still stops within [`MAX_BLOCK`].
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

/// Resets an eventfd to unreadable.
fn clear(waker: &OwnedFd) {
    let mut count = [0u8; 8];
    let _ = rustix::io::read(waker, &mut count);
}

/// Datagrams received per `recvmmsg` call.
const BATCH: usize = 64;

/// A one-shot monotonic timer (Linux timerfd) that the loop polls beside the
/// socket. Unlike a socket read timeout (SO_RCVTIMEO, jiffy-rounded) or a
/// poll timeout (the kernel adds slack of 0.1% of the wait), a relative
/// timerfd fires at its deadline, give or take the scheduler.
struct Timer {
    /// The timerfd.
    fd: rustix::fd::OwnedFd,
    /// The deadline it is armed for, if any.
    armed: Option<Instant>,
}

impl Timer {
    fn new() -> io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)?;
        Ok(Timer { fd, armed: None })
    }

    /// Arms the timer for `deadline` (disarms it for `None`), unless it is
    /// armed for that already. `now` must be the current time.
    fn arm(&mut self, deadline: Option<Instant>, now: Instant) -> io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if deadline == self.armed {
            return Ok(());
        }
        // A zero it_value disarms; a due deadline is armed for 1 ns so it fires at once.
        let value = match deadline {
            None => Timespec { tv_sec: 0, tv_nsec: 0 },
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(now).max(std::time::Duration::from_nanos(1));
                Timespec {
                    tv_sec: wait.as_secs().try_into().unwrap_or(i64::MAX),
                    tv_nsec: wait.subsec_nanos().into(),
                }
            }
        };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec)?;
        self.armed = deadline;
        Ok(())
    }

    /// Consumes a expiry, if the timer fired; it then counts as disarmed.
    fn clear(&mut self) {
        let mut ticks = [0u8; 8];
        if rustix::io::read(&self.fd, &mut ticks).is_ok() {
            self.armed = None;
        }
    }
}

/// Which of the loop's descriptors [`Waiter::wait`] found readable.
#[derive(Default)]
struct Ready {
    timer: bool,
    waker: bool,
}

/// Waits for the loop's socket, timer and waker with epoll: registered once,
/// so each wait costs less than a `poll` of the same three descriptors.
struct Waiter {
    /// The epoll instance.
    epoll: OwnedFd,
    /// Events of the last wait.
    events: Vec<rustix::event::epoll::Event>,
}

impl Waiter {
    const SOCKET: u64 = 0;
    const TIMER: u64 = 1;
    const WAKER: u64 = 2;

    fn new(socket: &UdpSocket, timer: &Timer, waker: &OwnedFd) -> io::Result<Self> {
        use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        epoll::add(&epoll, socket, EventData::new_u64(Self::SOCKET), EventFlags::IN)?;
        epoll::add(&epoll, &timer.fd, EventData::new_u64(Self::TIMER), EventFlags::IN)?;
        epoll::add(&epoll, waker, EventData::new_u64(Self::WAKER), EventFlags::IN)?;
        Ok(Waiter { epoll, events: Vec::with_capacity(4) })
    }

    /// Blocks until the socket, the timer or the waker is readable (or a
    /// signal interrupts), and says which of the timer and the waker are.
    fn wait(&mut self) -> io::Result<Ready> {
        use rustix::event::epoll;
        self.events.clear();
        match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut self.events), None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Ready::default()),
            Err(e) => return Err(e.into()),
        }
        let mut ready = Ready::default();
        for event in &self.events {
            match event.data.u64() {
                Self::TIMER => ready.timer = true,
                Self::WAKER => ready.waker = true,
                _ => {}
            }
        }
        Ok(ready)
    }
}

/// Runs the loop on `socket` until `stop` is requested, then flushes the
/// event log. Returns the engine, so callers can read its final counters.
///
/// The socket is switched to non-blocking mode. Receive errors are logged
/// and the loop goes on; only a failure of the timer, of poll, or of writing
/// the event log ends it with an error.
pub fn run(socket: &UdpSocket, tracker: Tracker, stop: &Stop, events: &mut EventLog) -> io::Result<Tracker> {
    let finished = run_sharded(std::slice::from_ref(socket), vec![tracker], stop, events)?;
    finished.trackers.into_iter().next().ok_or_else(|| io::Error::other("no engine came back"))
}

/// What [`run_sharded`] returns once stopped.
#[derive(Debug)]
pub struct Finished {
    /// The engines, shard 0 first.
    pub trackers: Vec<Tracker>,
    /// Datagrams a thread received for another shard and handed over.
    pub handed_over: u64,
}

/// Runs one loop per socket, each on its own thread (the first on the
/// calling thread), with `trackers[i]` as shard `i` (see
/// [`Tracker::new_sharded`] and [`crate::shard`]). A datagram that arrives
/// on one thread's socket but belongs to another shard is handed to that
/// thread, which applies it and replies from its own socket of the same
/// group. Each loop keeps its own timer, so expiry stays exact.
///
/// Returns the engines once `stop` is requested, or the first error (which
/// stops the other loops). With [`steer_by_id`] on the group, the kernel
/// already delivers most datagrams to their owner's socket.
pub fn run_sharded(
    sockets: &[UdpSocket],
    trackers: Vec<Tracker>,
    stop: &Stop,
    events: &mut EventLog,
) -> io::Result<Finished> {
    let shards = sockets.len();
    let numbered = trackers.iter().enumerate().all(|(k, tracker)| tracker.shard() == (k, shards));
    if shards == 0 || trackers.len() != shards || !numbered {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "one engine per socket is needed, engine i being shard i of as many as there are sockets",
        ));
    }
    let shared = Shared::new(sockets.len(), events, stop)?;
    for (k, tracker) in trackers.iter().enumerate() {
        shared.stats[k].store(&tracker.totals());
    }
    let mut trackers = trackers.into_iter();
    let first = trackers.next().ok_or_else(|| io::Error::other("no engine"))?;
    std::thread::scope(|scope| {
        let mut others = Vec::new();
        for (k, (socket, tracker)) in (1..).zip(sockets[1..].iter().zip(trackers)) {
            let shared = &shared;
            let thread = std::thread::Builder::new()
                .name(format!("presence-{k}"))
                .spawn_scoped(scope, move || worker(shared, k, socket, tracker));
            match thread {
                Ok(thread) => others.push(thread),
                Err(e) => {
                    stop.stop();
                    return Err(e);
                }
            }
        }
        let mut results = vec![worker(&shared, 0, &sockets[0], first)];
        for thread in others {
            results.push(thread.join().unwrap_or_else(|_| Err(io::Error::other("a server thread panicked"))));
        }
        let trackers = results.into_iter().collect::<io::Result<Vec<Tracker>>>()?;
        Ok(Finished { trackers, handed_over: shared.handed_over.load(Ordering::Relaxed) })
    })
}

/// What the loops of one [`run_sharded`] share.
struct Shared<'a> {
    /// Datagrams handed to each shard by the others.
    inboxes: Vec<Inbox>,
    /// Each shard's totals as of its last loop turn, for summaries.
    stats: Vec<ShardStats>,
    /// Where events are published; one batch is written under the lock at a time.
    events: Mutex<&'a mut EventLog>,
    /// Event lines the log could not write, as of its last batch.
    events_lost: AtomicU64,
    /// The stop signal.
    stop: &'a Stop,
    /// Datagrams dropped because a shard's inbox was full.
    handover_drops: AtomicU64,
    /// Datagrams handed from one shard to another.
    handed_over: AtomicU64,
}

impl<'a> Shared<'a> {
    fn new(shards: usize, events: &'a mut EventLog, stop: &'a Stop) -> io::Result<Self> {
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            use rustix::event::{EventfdFlags, eventfd};
            let waker = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
            stop.register(Arc::clone(&waker));
            inboxes.push(Inbox { parcel: Mutex::new(Parcel::default()), waker });
        }
        Ok(Shared {
            inboxes,
            stats: (0..shards).map(|_| ShardStats::default()).collect(),
            events: Mutex::new(events),
            events_lost: AtomicU64::new(0),
            stop,
            handover_drops: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
        })
    }

    /// The totals of every shard but `me`, and the server's own counts.
    fn peer_totals(&self, me: usize) -> Totals {
        let mut totals =
            Totals { events_lost: self.events_lost.load(Ordering::Relaxed), ..Totals::default() };
        for (k, stats) in self.stats.iter().enumerate() {
            if k != me {
                totals.add(&stats.load());
            }
        }
        totals
    }

    /// Hands `parcel` to shard `to` and empties it.
    fn deliver(&self, to: usize, parcel: &mut Parcel) {
        self.handed_over.fetch_add(parcel.len() as u64, Ordering::Relaxed);
        let inbox = &self.inboxes[to];
        let was_empty = {
            let mut queued = inbox.parcel.lock().unwrap_or_else(PoisonError::into_inner);
            if queued.is_empty() {
                std::mem::swap(&mut *queued, parcel);
                true
            } else {
                let room = INBOX_LIMIT.saturating_sub(queued.len());
                let dropped = parcel.len().saturating_sub(room);
                queued.append(parcel, room);
                if dropped > 0 {
                    self.handover_drops.fetch_add(dropped as u64, Ordering::Relaxed);
                }
                false
            }
        };
        parcel.clear();
        // The owner drains its inbox after clearing its waker, so only the
        // hand-over that fills an empty inbox needs to wake it.
        if was_empty {
            wake(&inbox.waker);
        }
    }
}

/// Most datagrams waiting in one shard's inbox; more are dropped (and
/// counted) rather than queued without bound behind a stalled thread.
const INBOX_LIMIT: usize = 1 << 16;

/// Datagrams handed to one shard, and the eventfd that tells it so.
struct Inbox {
    parcel: Mutex<Parcel>,
    waker: Arc<OwnedFd>,
}

/// Datagrams with their sources, packed into one byte buffer.
#[derive(Default)]
struct Parcel {
    /// The datagrams, back to back.
    bytes: Vec<u8>,
    /// Each datagram's source and the end of its bytes.
    items: Vec<(SocketAddr, usize)>,
}

impl Parcel {
    fn push(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.items.push((from, self.bytes.len()));
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Moves the first `limit` datagrams of `other` to the end of this one.
    fn append(&mut self, other: &Parcel, limit: usize) {
        let base = self.bytes.len();
        let taken = other.items.len().min(limit);
        let end = if taken == 0 { 0 } else { other.items[taken - 1].1 };
        self.bytes.extend_from_slice(&other.bytes[..end]);
        self.items.extend(other.items[..taken].iter().map(|&(from, e)| (from, base + e)));
    }

    fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        let mut start = 0;
        self.items.iter().map(move |&(from, end)| {
            let datagram = &self.bytes[start..end];
            start = end;
            (from, datagram)
        })
    }
}

/// One shard's [`Totals`], published after every loop turn.
#[derive(Default)]
struct ShardStats {
    online: AtomicU64,
    known: AtomicU64,
    heartbeats: AtomicU64,
    leaves: AtomicU64,
    queries: AtomicU64,
    expirations: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl ShardStats {
    fn store(&self, totals: &Totals) {
        let counters = &totals.counters;
        self.online.store(totals.online, Ordering::Relaxed);
        self.known.store(totals.known, Ordering::Relaxed);
        self.heartbeats.store(counters.heartbeats, Ordering::Relaxed);
        self.leaves.store(counters.leaves, Ordering::Relaxed);
        self.queries.store(counters.queries, Ordering::Relaxed);
        self.expirations.store(counters.expirations, Ordering::Relaxed);
        for (slot, reason) in self.drops.iter().zip(DropReason::ALL) {
            slot.store(counters.drops(reason), Ordering::Relaxed);
        }
    }

    fn load(&self) -> Totals {
        let mut counters = Counters::default();
        counters.heartbeats = self.heartbeats.load(Ordering::Relaxed);
        counters.leaves = self.leaves.load(Ordering::Relaxed);
        counters.queries = self.queries.load(Ordering::Relaxed);
        counters.expirations = self.expirations.load(Ordering::Relaxed);
        for (slot, reason) in self.drops.iter().zip(DropReason::ALL) {
            counters.set_drops(reason, slot.load(Ordering::Relaxed));
        }
        Totals {
            online: self.online.load(Ordering::Relaxed),
            known: self.known.load(Ordering::Relaxed),
            counters,
            events_lost: 0,
        }
    }
}

/// One shard's loop: see [`run_sharded`].
fn worker(shared: &Shared<'_>, me: usize, socket: &UdpSocket, mut tracker: Tracker) -> io::Result<Tracker> {
    let result = serve(shared, me, socket, &mut tracker);
    if result.is_err() {
        // The other loops must not go on without this shard.
        shared.stop.stop();
    }
    result.map(|()| tracker)
}

fn serve(shared: &Shared<'_>, me: usize, socket: &UdpSocket, tracker: &mut Tracker) -> io::Result<()> {
    let shards = shared.inboxes.len();
    // One shard may block in the receive call itself while its next deadline
    // is far (see `far_wait`); the socket is then in blocking mode and every
    // other receive passes MSG_DONTWAIT. Shards keep to epoll, which also
    // watches their inboxes.
    let may_block = shards == 1;
    socket.set_nonblocking(!may_block)?;
    if may_block {
        shared.stop.register_datagram_wake(socket.local_addr()?);
    }
    let mut read_timeout = ReadTimeout::default();
    let waker = &shared.inboxes[me].waker;
    let mut timer = Timer::new()?;
    let mut waiter = Waiter::new(socket, &timer, waker)?;
    let mut batch = Batch::new();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let mut warnings = DropWarnings::default();
    let mut outboxes: Vec<Parcel> = (0..shards).map(|_| Parcel::default()).collect();
    let mut handed = Parcel::default();
    let stop = shared.stop;
    'run: while !stop.is_requested() {
        let now = Instant::now();
        tracker.handle_timeout(now);
        publish(tracker, shared, me);
        if shards > 1 {
            shared.stats[me].store(&tracker.totals());
        }
        let deadline = tracker.poll_timeout();
        let block_for = far_wait(deadline, now).filter(|_| may_block);
        let ready = match block_for {
            Some(wait) => {
                // The first receive below blocks, until a datagram comes or
                // shortly before the deadline; the timer takes over from there.
                read_timeout.set(socket, wait)?;
                Ready::default()
            }
            None => {
                timer.arm(deadline, now)?;
                waiter.wait()?
            }
        };
        if ready.timer {
            timer.clear();
        }
        // The waker is written only when an inbox goes from empty to not
        // empty, so an inbox is empty unless its waker is readable.
        if ready.waker && shards > 1 {
            // Datagrams the other shards received for this one's devices.
            clear(waker);
            std::mem::swap(
                &mut *shared.inboxes[me].parcel.lock().unwrap_or_else(PoisonError::into_inner),
                &mut handed,
            );
            let now = Instant::now();
            for (from, datagram) in handed.iter() {
                handle(tracker, socket, now, from, datagram, &mut reply, &mut warnings);
            }
            handed.clear();
        }
        for round in 0..BATCHES_PER_WAKE {
            let flags = if round == 0 && block_for.is_some() {
                MsgFlags::MSG_WAITFORONE
            } else {
                MsgFlags::MSG_DONTWAIT
            };
            let received = match batch.receive(socket, flags) {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!(error = %e, "receive failed");
                    break;
                }
            };
            let now = Instant::now();
            for i in 0..received {
                let (datagram, from) = batch.datagram(i);
                let Some(from) = from else { continue };
                if stop.is_requested() {
                    break 'run;
                }
                match shard::route(datagram, shards) {
                    Route::Shard(owner) if owner != me => outboxes[owner].push(from, datagram),
                    Route::Summary => {
                        tracker.set_peer_totals(shared.peer_totals(me));
                        handle(tracker, socket, now, from, datagram, &mut reply, &mut warnings);
                    }
                    Route::Shard(_) | Route::Local => {
                        handle(tracker, socket, now, from, datagram, &mut reply, &mut warnings);
                    }
                }
            }
            if received < BATCH {
                break;
            }
        }
        for (owner, outbox) in outboxes.iter_mut().enumerate() {
            if !outbox.is_empty() {
                shared.deliver(owner, outbox);
            }
        }
        publish(tracker, shared, me);
        warnings.maybe_warn(Instant::now(), tracker.counters(), &shared.handover_drops);
    }
    // Devices whose deadline passed while the loop was busy or stalled
    // still get their offline events before it exits.
    tracker.handle_timeout(Instant::now());
    publish(tracker, shared, me);
    shared.stats[me].store(&tracker.totals());
    Ok(())
}

/// Applies one datagram and sends the reply, if there is one.
fn handle(
    tracker: &mut Tracker,
    socket: &UdpSocket,
    now: Instant,
    from: SocketAddr,
    datagram: &[u8],
    reply: &mut [u8],
    warnings: &mut DropWarnings,
) {
    match tracker.handle(now, from, datagram, reply) {
        Handled::Done => {}
        Handled::Reply(n) => send_reply(socket, &reply[..n], from),
        Handled::Dropped { reason, reply: answer } => {
            log_drop(reason, from, datagram.len());
            warnings.sample(reason, from, datagram);
            if let Some(n) = answer {
                send_reply(socket, &reply[..n], from);
            }
        }
    }
}

/// How long before a deadline a blocking receive must return, leaving the
/// rest to the precise timerfd. A socket read timeout is rounded up to the
/// kernel's tick (measured up to 16 ms late here), so this is generous.
const GUARD: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest a receive blocks with nobody due, so that a lost stop
/// datagram delays a stop by at most this.
const MAX_BLOCK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the loop may block in the receive call itself, if the next
/// deadline is far enough off that the socket's coarse read timeout can wake
/// it early enough; `None` if it must wait on the timerfd instead.
fn far_wait(deadline: Option<Instant>, now: Instant) -> Option<std::time::Duration> {
    match deadline {
        None => Some(MAX_BLOCK),
        Some(deadline) => deadline
            .checked_duration_since(now)
            .filter(|wait| *wait > 2 * GUARD)
            .map(|wait| (wait - GUARD).min(MAX_BLOCK)),
    }
}

/// The socket's read timeout (SO_RCVTIMEO), changed only when it would let a
/// receive overrun what is wanted by more than [`ReadTimeout::SLACK`], or
/// would wake it needlessly soon: a system call per change, not per wait.
#[derive(Default)]
struct ReadTimeout {
    current: Option<std::time::Duration>,
}

impl ReadTimeout {
    const SLACK: std::time::Duration = std::time::Duration::from_millis(20);

    fn set(&mut self, socket: &UdpSocket, wanted: std::time::Duration) -> io::Result<()> {
        let fits = self.current.is_some_and(|t| t <= wanted + Self::SLACK && t >= wanted / 2);
        if !fits {
            let wanted = wanted.max(std::time::Duration::from_millis(1));
            socket.set_read_timeout(Some(wanted))?;
            self.current = Some(wanted);
        }
        Ok(())
    }
}

/// Batches received per wake-up before the loop checks its timer again.
const BATCHES_PER_WAKE: usize = 4;

/// Receive buffers for one `recvmmsg` call: up to [`BATCH`] datagrams per
/// system call instead of one.
struct Batch {
    /// The kernel's per-message headers, reused across calls.
    headers: MultiHeaders<SockaddrStorage>,
    /// One buffer per message.
    buffers: Box<[[u8; RECV_BUF]; BATCH]>,
    /// Length and source of each message of the last call.
    received: Vec<(usize, Option<SocketAddr>)>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            headers: MultiHeaders::preallocate(BATCH, None),
            buffers: Box::new([[0; RECV_BUF]; BATCH]),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Receives what is waiting; returns how many datagrams. With
    /// `MSG_DONTWAIT` it never blocks; with `MSG_WAITFORONE` on a blocking
    /// socket it waits for the first datagram (or the socket's read timeout).
    fn receive(&mut self, socket: &UdpSocket, flags: MsgFlags) -> io::Result<usize> {
        let mut slices = self.buffers.each_mut().map(|buffer| [IoSliceMut::new(buffer)]);
        self.received.clear();
        let results = match recvmmsg(socket.as_raw_fd(), &mut self.headers, slices.iter_mut(), flags, None) {
            Ok(results) => results,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for message in results {
            self.received.push((message.bytes, message.address.and_then(|a| socket_addr(&a))));
        }
        Ok(self.received.len())
    }

    /// The `i`th datagram of the last call and its source.
    fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
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

/// Logs dropped and rejected datagrams at warn level, at most once per
/// [`DropWarnings::EVERY`], as a count by reason with one example of each
/// (its source, and its device if it names one): a flood cannot flood the
/// log, and an operator can still tell whose datagrams are refused.
#[derive(Default)]
struct DropWarnings {
    /// When the last warning was logged.
    last: Option<Instant>,
    /// The drop counts already reported.
    reported: [u64; DropReason::ALL.len()],
    /// The first datagram of each reason since the last warning: its source
    /// and the device it names, if any.
    samples: [Option<(SocketAddr, Option<String>)>; DropReason::ALL.len()],
}

impl DropWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Keeps `datagram` as the example of `reason`, unless there is one already.
    fn sample(&mut self, reason: DropReason, from: SocketAddr, datagram: &[u8]) {
        let slot = &mut self.samples[usize::from(reason.code()) - 1];
        if slot.is_none() {
            let device = match wire::decode(datagram) {
                Ok(wire::Message::Heartbeat(hb)) => Some(hb.device),
                Ok(wire::Message::Leave(leave)) => Some(leave.device),
                Ok(wire::Message::Query(wire::Query { kind: wire::QueryKind::Device(id), .. })) => Some(id),
                _ => None,
            };
            *slot = Some((from, device.map(|id| crate::client::printable(id).into_owned())));
        }
    }

    fn maybe_warn(&mut self, now: Instant, counters: &Counters, handover_drops: &AtomicU64) {
        if self.last.is_some_and(|last| now.saturating_duration_since(last) < Self::EVERY) {
            return;
        }
        let mut total = 0;
        let mut reasons = Vec::new();
        let mut examples = Vec::new();
        for ((reported, reason), sample) in
            self.reported.iter_mut().zip(DropReason::ALL).zip(&mut self.samples)
        {
            let count = counters.drops(reason);
            if count > *reported {
                reasons.push(format!("{}={}", reason.name(), count - *reported));
                total += count - *reported;
                *reported = count;
                if let Some((from, device)) = sample.take() {
                    let device = device.map(|d| format!(" device '{d}'")).unwrap_or_default();
                    examples.push(format!("{}: from {from}{device}", reason.name()));
                }
            }
        }
        let handover = handover_drops.swap(0, Ordering::Relaxed);
        if handover > 0 {
            reasons.push(format!("handover_queue_full={handover}"));
            total += handover;
        }
        if total > 0 {
            self.last = Some(now);
            tracing::warn!(
                dropped = total,
                reasons = reasons.join(" "),
                examples = examples.join("; "),
                "datagrams dropped or rejected"
            );
        }
    }
}

/// Publishes the engine's pending events, holding the log's lock while it
/// writes them. A destination that fails is counted, never fatal.
fn publish(tracker: &mut Tracker, shared: &Shared<'_>, me: usize) {
    let Some(first) = tracker.poll_event() else {
        return;
    };
    let mut events = shared.events.lock().unwrap_or_else(PoisonError::into_inner);
    events.record(&first, tracker.wall_time(first.at));
    while let Some(event) = tracker.poll_event() {
        events.record(&event, tracker.wall_time(event.at));
    }
    events.flush();
    let lost = events.lost();
    drop(events);
    if shared.events_lost.swap(lost, Ordering::Relaxed) != lost {
        // Summaries report it; a single shard has no other moment to learn it.
        tracker.set_peer_totals(shared.peer_totals(me));
    }
}

/// Sends without ever blocking the loop (the socket itself may be in
/// blocking mode): a reply that finds the send buffer full is dropped.
fn send_reply(socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = rustix::net::sendto(socket, reply, rustix::net::SendFlags::DONTWAIT, &to) {
        tracing::debug!(error = %e, %to, "reply not sent");
    }
}

fn log_drop(reason: DropReason, from: SocketAddr, len: usize) {
    tracing::debug!(reason = reason.name(), %from, len, "datagram dropped");
}
