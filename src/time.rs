//! The engine's own monotonic time: microseconds since an origin the
//! caller chose, as smoltcp keeps its `Instant`.
//!
//! The pure core (`table`, `tracker`, `limit`) takes and returns
//! [`Instant`]s and never reads a clock. Unlike `std::time::Instant`, one
//! can be built from a number (a C caller, a snapshot on disk, a simulated
//! test), and converting it is an addition, not a `timespec` division. The
//! server reads the real clock once per batch through a [`Clock`], the only
//! place the two kinds of instant meet.

use core::ops::{Add, AddAssign, Sub};
use core::time::Duration;

/// A point in monotonic time: microseconds since the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant {
    /// Microseconds since the origin.
    micros: u64,
}

/// Whole microseconds of `d`, saturating, without a u128 division.
fn micros_of(d: Duration) -> u64 {
    d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_micros()))
}

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant { micros: 0 };

    /// The instant `micros` microseconds after the origin.
    pub const fn from_micros(micros: u64) -> Instant {
        Instant { micros }
    }

    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.micros
    }

    /// The time from `earlier` to this, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.micros.saturating_sub(earlier.micros))
    }

    /// The time from `earlier` to this, if `earlier` is not later.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        self.micros.checked_sub(earlier.micros).map(Duration::from_micros)
    }

    /// This instant moved back by `d`, if that is not before the origin.
    pub fn checked_sub(self, d: Duration) -> Option<Instant> {
        self.micros.checked_sub(micros_of(d)).map(Instant::from_micros)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Later by `d` (whole microseconds), saturating.
    fn add(self, d: Duration) -> Instant {
        Instant { micros: self.micros.saturating_add(micros_of(d)) }
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;

    /// Earlier by `d`, saturating at the origin.
    fn sub(self, d: Duration) -> Instant {
        Instant { micros: self.micros.saturating_sub(micros_of(d)) }
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;

    /// The time between two instants, zero if `earlier` is later.
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// The edge between the real clock and the engine's time: engine instants
/// are microseconds since the `std` instant this clock was made at.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The real instant at which engine time reads `offset`.
    origin: std::time::Instant,
    /// Engine time at `origin`, in microseconds: zero, or the history a
    /// restored table needs (see [`Clock::with_history`]).
    offset: u64,
}

#[cfg(feature = "std")]
impl Clock {
    /// A clock whose origin is now (reads the real clock).
    pub fn start() -> Clock {
        Clock::from_origin(std::time::Instant::now())
    }

    /// A clock whose origin (engine time zero) is the real instant `origin`.
    pub fn from_origin(origin: std::time::Instant) -> Clock {
        Clock { origin, offset: 0 }
    }

    /// A clock that reads `history` now (reads the real clock), so that
    /// engine instants up to `history` in the past exist. A server that
    /// restores devices seen before it started needs them: engine time
    /// cannot go below zero, and the real monotonic clock may not reach
    /// back that far (it starts at boot).
    pub fn with_history(history: Duration) -> Clock {
        Clock { origin: std::time::Instant::now(), offset: micros_of(history) }
    }

    /// The engine instant of a real one (the origin for earlier ones).
    pub fn instant(&self, at: std::time::Instant) -> Instant {
        Instant::from_micros(self.offset.saturating_add(micros_of(at.saturating_duration_since(self.origin))))
    }

    /// The engine instant now (reads the real clock).
    pub fn now(&self) -> Instant {
        self.instant(std::time::Instant::now())
    }

    /// The real instant of an engine one (the origin for instants before it).
    pub fn to_std(&self, at: Instant) -> std::time::Instant {
        self.origin + Duration::from_micros(at.as_micros().saturating_sub(self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_rounds_to_microseconds() {
        let t = Instant::from_micros(1_000);
        assert_eq!(t + Duration::from_nanos(1_999), Instant::from_micros(1_001));
        assert_eq!(t - Duration::from_secs(1), Instant::ZERO);
        assert_eq!(t.checked_sub(Duration::from_secs(1)), None);
        assert_eq!((t + Duration::from_millis(5)) - t, Duration::from_millis(5));
        assert_eq!(t - (t + Duration::from_millis(5)), Duration::ZERO);
        assert_eq!(t.checked_duration_since(t + Duration::from_micros(1)), None);
        assert_eq!(Instant::from_micros(u64::MAX) + Duration::from_secs(1), Instant::from_micros(u64::MAX));
    }

    #[test]
    fn a_clock_converts_both_ways() {
        let clock = Clock::start();
        let real = std::time::Instant::now() + Duration::from_millis(250);
        let engine = clock.instant(real);
        assert!(engine >= Instant::from_micros(250_000));
        let back = clock.to_std(engine);
        assert!(real.saturating_duration_since(back) < Duration::from_micros(1));
        assert_eq!(clock.instant(clock.to_std(Instant::from_micros(42))), Instant::from_micros(42));
    }

    #[test]
    fn a_clock_with_history_starts_late_and_converts_both_ways() {
        let day = Duration::from_secs(86_400);
        let clock = Clock::with_history(day);
        let now = clock.now();
        assert!(now >= Instant::ZERO + day && now < Instant::ZERO + day + Duration::from_secs(60));
        let later = now + Duration::from_millis(5);
        assert_eq!(clock.instant(clock.to_std(later)), later);
        assert_eq!(clock.to_std(Instant::ZERO), clock.to_std(Instant::ZERO + day));
    }
}
