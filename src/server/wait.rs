//! Waiting: the loop sleeps until a datagram, its timer (the next deadline,
//! a Linux timerfd) or its waker, with epoll; or, while the next deadline is
//! far, in the receive call itself under a socket read timeout.

use crate::time::Instant;
use std::io;
use std::net::UdpSocket;

use rustix::fd::OwnedFd;

use super::stop::Waker;

/// A one-shot monotonic timer (Linux timerfd) that the loop polls beside the
/// socket. Unlike a socket read timeout (SO_RCVTIMEO, jiffy-rounded) or a
/// poll timeout (the kernel adds slack of 0.1% of the wait), a relative
/// timerfd fires at its deadline, give or take the scheduler.
pub(super) struct Timer {
    /// The timerfd.
    fd: rustix::fd::OwnedFd,
    /// The deadline it is armed for, if any.
    armed: Option<Instant>,
}

impl Timer {
    pub(super) fn new() -> io::Result<Self> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)?;
        Ok(Timer { fd, armed: None })
    }

    /// Arms the timer for `deadline` (disarms it for `None`), unless it is
    /// armed for that already. `now` must be the current time.
    pub(super) fn arm(&mut self, deadline: Option<Instant>, now: Instant) -> io::Result<()> {
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
    pub(super) fn clear(&mut self) {
        let mut ticks = [0u8; 8];
        if rustix::io::read(&self.fd, &mut ticks).is_ok() {
            self.armed = None;
        }
    }
}

/// Which of the loop's descriptors [`Waiter::wait`] found readable.
#[derive(Default)]
pub(super) struct Ready {
    /// The timer fired.
    pub(super) timer: bool,
    /// The waker was written.
    pub(super) waker: bool,
}

/// Waits for the loop's socket, timer and waker with epoll: registered once,
/// so each wait costs less than a `poll` of the same three descriptors.
pub(super) struct Waiter {
    /// The epoll instance.
    epoll: OwnedFd,
    /// Events of the last wait.
    events: Vec<rustix::event::epoll::Event>,
}

impl Waiter {
    const SOCKET: u64 = 0;
    const TIMER: u64 = 1;
    const WAKER: u64 = 2;

    pub(super) fn new(socket: &UdpSocket, timer: &Timer, waker: &Waker) -> io::Result<Self> {
        use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
        let epoll = epoll::create(CreateFlags::CLOEXEC)?;
        epoll::add(&epoll, socket, EventData::new_u64(Self::SOCKET), EventFlags::IN)?;
        epoll::add(&epoll, &timer.fd, EventData::new_u64(Self::TIMER), EventFlags::IN)?;
        epoll::add(&epoll, &waker.fd, EventData::new_u64(Self::WAKER), EventFlags::IN)?;
        Ok(Waiter { epoll, events: Vec::with_capacity(4) })
    }

    /// Blocks until the socket, the timer or the waker is readable (or a
    /// signal interrupts), and says which of the timer and the waker are.
    pub(super) fn wait(&mut self) -> io::Result<Ready> {
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

/// How long before a deadline a blocking receive must return, leaving the
/// rest to the precise timerfd. A socket read timeout is rounded up to the
/// kernel's tick (measured up to 16 ms late here), so this is generous.
pub(super) const GUARD: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest a receive blocks with nobody due, so that a lost stop
/// datagram delays a stop by at most this.
pub(super) const MAX_BLOCK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the loop may block in the receive call itself, if the next
/// deadline is far enough off that the socket's coarse read timeout can wake
/// it early enough; `None` if it must wait on the timerfd instead.
pub(super) fn far_wait(deadline: Option<Instant>, now: Instant) -> Option<std::time::Duration> {
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
pub(super) struct ReadTimeout {
    current: Option<std::time::Duration>,
}

impl ReadTimeout {
    const SLACK: std::time::Duration = std::time::Duration::from_millis(20);

    pub(super) fn set(&mut self, socket: &UdpSocket, wanted: std::time::Duration) -> io::Result<()> {
        let fits = self.current.is_some_and(|t| t <= wanted + Self::SLACK && t >= wanted / 2);
        if !fits {
            let wanted = wanted.max(std::time::Duration::from_millis(1));
            socket.set_read_timeout(Some(wanted))?;
            self.current = Some(wanted);
        }
        Ok(())
    }
}
