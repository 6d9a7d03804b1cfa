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

use std::io::{self, IoSliceMut, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::tracker::{Counters, Event, EventKind, Handled, Tracker};
use crate::wire::{self, DropReason};

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
    /// The receive buffer the kernel actually granted, in bytes (Linux
    /// reports twice the usable size, and caps requests at `net.core.rmem_max`).
    pub recv_buffer: usize,
}

/// Binds a UDP socket for the server. `[::]:port` gives a dual-stack socket
/// that also receives IPv4. `recv_buffer`, if given, is requested as
/// SO_RCVBUF; see [`Bound::recv_buffer`] for what was granted.
pub fn bind(addr: SocketAddr, recv_buffer: Option<usize>) -> io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    let socket: UdpSocket = socket.into();
    let local_addr = socket.local_addr()?;
    Ok(Bound { socket, local_addr, recv_buffer: granted })
}

/// Asks a running [`run`] loop to finish. Cloneable and usable from any
/// thread (a signal handler thread, a test).
#[derive(Debug, Clone)]
pub struct Stop {
    /// Set once; the loop checks it after every wake-up.
    requested: Arc<AtomicBool>,
    /// Where to send the empty datagram that wakes a loop blocked in receive.
    wake: SocketAddr,
}

impl Stop {
    /// A stop signal for a loop receiving on `local_addr`.
    pub fn new(local_addr: SocketAddr) -> Self {
        let ip = match local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Stop { requested: Arc::new(AtomicBool::new(false)), wake: SocketAddr::new(ip, local_addr.port()) }
    }

    /// Asks the loop to stop and wakes it with an empty datagram.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let unspecified: SocketAddr = match self.wake {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // If this fails the loop still stops at its next wake-up.
        if let Ok(socket) = UdpSocket::bind(unspecified) {
            let _ = socket.send_to(&[], self.wake);
        }
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// Where transitions are published: JSON lines, one per event, and a
/// tracing record. Flushed after each batch, so a reader sees an event as
/// soon as the loop has handled it.
pub struct EventLog {
    /// The JSON lines destination, if `--events` was given.
    out: Option<Box<dyn Write + Send>>,
    /// Called with every event and its wall time; for measurements.
    observer: Option<EventObserver>,
}

/// A callback that sees every event, for measurements.
pub type EventObserver = Box<dyn FnMut(&Event) + Send>;

/// One line of the events file.
#[derive(Serialize)]
struct EventLine<'a> {
    /// RFC 3339 wall time, milliseconds.
    time: String,
    /// The device id.
    device: &'a str,
    /// `online` or `offline`.
    event: &'static str,
    /// `expired` or `left`, for offline events.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// The device's last known address.
    address: SocketAddr,
}

impl EventLog {
    /// Events go to the log only.
    pub fn none() -> Self {
        EventLog { out: None, observer: None }
    }

    /// Events also go to `out` as JSON lines.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        EventLog { out: Some(out), observer: None }
    }

    /// Events are also passed to `observer` (the benchmark measures expiry
    /// precision this way).
    pub fn with_observer(mut self, observer: EventObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Publishes one event that happened at wall time `wall`.
    pub fn record(&mut self, event: &Event, wall: SystemTime) -> io::Result<()> {
        if let Some(observer) = &mut self.observer {
            observer(event);
        }
        let reason = match event.kind {
            EventKind::Online => None,
            EventKind::Offline(reason) => Some(reason.name()),
        };
        let address = SocketAddr::from(wire::Addr::from(event.addr));
        tracing::info!(device = %event.device, event = event.kind.name(), reason, %address, "transition");
        let Some(out) = &mut self.out else {
            return Ok(());
        };
        let line = EventLine {
            time: humantime::format_rfc3339_millis(wall).to_string(),
            device: &event.device,
            event: event.kind.name(),
            reason,
            address,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")
    }

    /// Flushes the JSON lines destination.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
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

/// Blocks until the socket or the timer is readable (or a signal interrupts).
fn wait(socket: &UdpSocket, timer: &Timer) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(socket, PollFlags::IN), PollFd::new(&timer.fd, PollFlags::IN)];
    match poll(&mut fds, None) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs the loop on `socket` until `stop` is requested, then flushes the
/// event log. Returns the engine, so callers can read its final counters.
///
/// The socket is switched to non-blocking mode. Receive errors are logged
/// and the loop goes on; only a failure of the timer, of poll, or of writing
/// the event log ends it with an error.
pub fn run(
    socket: &UdpSocket,
    mut tracker: Tracker,
    stop: &Stop,
    events: &mut EventLog,
) -> io::Result<Tracker> {
    socket.set_nonblocking(true)?;
    let mut timer = Timer::new()?;
    let mut batch = Batch::new();
    let mut reply = vec![0u8; wire::MAX_DATAGRAM];
    let mut warnings = DropWarnings::default();
    'run: while !stop.is_requested() {
        let now = Instant::now();
        tracker.handle_timeout(now);
        publish(&mut tracker, events)?;
        timer.arm(tracker.poll_timeout(), now)?;
        wait(socket, &timer)?;
        timer.clear();
        for _ in 0..BATCHES_PER_WAKE {
            let received = match batch.receive(socket) {
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
                match tracker.handle(now, from, datagram, &mut reply) {
                    Handled::Done => {}
                    Handled::Reply(n) => send_reply(socket, &reply[..n], from),
                    Handled::Dropped { reason, reply: answer } => {
                        log_drop(reason, from, datagram.len());
                        if let Some(n) = answer {
                            send_reply(socket, &reply[..n], from);
                        }
                    }
                }
            }
            if received < BATCH {
                break;
            }
        }
        publish(&mut tracker, events)?;
        warnings.maybe_warn(Instant::now(), tracker.counters());
    }
    publish(&mut tracker, events)?;
    Ok(tracker)
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

    /// Receives what is waiting, without blocking; returns how many datagrams.
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut slices = self.buffers.each_mut().map(|buffer| [IoSliceMut::new(buffer)]);
        self.received.clear();
        let results = match recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
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
/// [`DropWarnings::EVERY`], as a count by reason: a flood cannot flood the log.
#[derive(Default)]
struct DropWarnings {
    /// When the last warning was logged.
    last: Option<Instant>,
    /// The drop counts already reported.
    reported: [u64; DropReason::ALL.len()],
}

impl DropWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    fn maybe_warn(&mut self, now: Instant, counters: &Counters) {
        if self.last.is_some_and(|last| now.saturating_duration_since(last) < Self::EVERY) {
            return;
        }
        let mut total = 0;
        let mut reasons = Vec::new();
        for (reported, reason) in self.reported.iter_mut().zip(DropReason::ALL) {
            let count = counters.drops(reason);
            if count > *reported {
                reasons.push(format!("{}={}", reason.name(), count - *reported));
                total += count - *reported;
                *reported = count;
            }
        }
        if total > 0 {
            self.last = Some(now);
            tracing::warn!(dropped = total, reasons = reasons.join(" "), "datagrams dropped or rejected");
        }
    }
}

fn publish(tracker: &mut Tracker, events: &mut EventLog) -> io::Result<()> {
    let mut any = false;
    while let Some(event) = tracker.poll_event() {
        events.record(&event, tracker.wall_time(event.at))?;
        any = true;
    }
    if any {
        events.flush()?;
    }
    Ok(())
}

fn send_reply(socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(reply, to) {
        tracing::debug!(error = %e, %to, "reply not sent");
    }
}

fn log_drop(reason: DropReason, from: SocketAddr, len: usize) {
    tracing::debug!(reason = reason.name(), %from, len, "datagram dropped");
}
