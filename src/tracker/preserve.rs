//! Self-preservation: telling a blackout of the server's own network from
//! devices dying. Pure; the engine feeds it what it sees.
//!
//! **Entering `degraded`.** Devices turn late (suspect) a missed interval
//! before they expire, so a blackout shows first as many devices turning
//! late at once. When more than `late_percent` of the online devices turn
//! late or expire within one window (`min_ttl`), with at least `min_online`
//! online, or when the kernel reports dropped datagrams, the server
//! suspects its own network: devices whose deadline passes are held as
//! suspect instead of going offline.
//!
//! **Leaving it, always.** The rate of accepted heartbeats per window is
//! tracked while all is well (its baseline). Once heartbeats arrive at half
//! that rate or more again, and devices no longer turn late in a storm, for
//! one full TTL (the longest of the devices held), every device still held
//! is silent for a reason of its own: it goes offline and the server
//! recovers. After `max_hold` it recovers whatever happens, so it can never
//! be stuck holding a fleet that is really gone.

use std::time::Duration;

use crate::time::Instant;

use super::Preservation;
use super::outcome::FleetCause;

/// Sub-windows a window is split into for the sliding counts.
const BUCKETS: usize = 8;

/// Heartbeats per window count as normal again from this share of the
/// baseline, in percent.
const NORMAL_RATE_PERCENT: u64 = 50;

/// A degraded episode.
#[derive(Debug, Clone, Copy)]
pub(super) struct Episode {
    /// When it started.
    pub(super) since: Instant,
    /// Why.
    pub(super) cause: FleetCause,
    /// Since when heartbeats have been coming again, if they are, with the
    /// engine's heartbeat counter then.
    normal_since: Option<(Instant, u64)>,
    /// The longest TTL of the devices that turned late or were held in it.
    longest_ttl: Duration,
}

/// What the engine should do after a [`Preserver::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing.
    Stay,
    /// Leave `degraded`: release the held devices.
    Recover(FleetCause),
}

/// The self-preservation state of one engine.
#[derive(Debug)]
pub(super) struct Preserver {
    /// The thresholds; `None`: off.
    config: Option<Preservation>,
    /// The sub-window length (window / BUCKETS).
    bucket: Duration,
    /// Start of the current sub-window.
    bucket_start: Instant,
    /// Devices that turned late or expired, per sub-window (ring; `at` is current).
    late: [u64; BUCKETS],
    /// Heartbeats accepted per sub-window (ring).
    heartbeats: [u64; BUCKETS],
    /// The current sub-window's index in the rings.
    at: usize,
    /// The heartbeat counter at the start of the current sub-window.
    heartbeats_mark: u64,
    /// Heartbeats per window while all was well (smoothed); 0 until known.
    baseline: u64,
    /// The kernel's drop count last reported.
    kernel_drops: u64,
    /// The current episode, if degraded.
    pub(super) episode: Option<Episode>,
}

impl Preserver {
    pub(super) fn new(config: Option<Preservation>, window: Duration, now: Instant) -> Self {
        Preserver {
            config,
            bucket: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            bucket_start: now,
            late: [0; BUCKETS],
            heartbeats: [0; BUCKETS],
            at: 0,
            heartbeats_mark: 0,
            baseline: 0,
            kernel_drops: 0,
            episode: None,
        }
    }

    /// Moves the rings on to `now`, filing the heartbeats accepted since
    /// the last move (the engine's counter, so the hot path does nothing).
    fn roll(&mut self, now: Instant, heartbeats: u64) {
        let elapsed = now.saturating_duration_since(self.bucket_start);
        if elapsed < self.bucket {
            return;
        }
        self.heartbeats[self.at] += heartbeats.saturating_sub(self.heartbeats_mark);
        self.heartbeats_mark = heartbeats;
        if self.episode.is_none() && self.at == BUCKETS - 1 {
            // Once per window: its rate, smoothed, while all is well.
            let rate: u64 = self.heartbeats.iter().sum();
            self.baseline = if self.baseline == 0 { rate } else { (self.baseline * 7 + rate) / 8 };
        }
        let steps = (elapsed.as_micros() / self.bucket.as_micros().max(1)).min(BUCKETS as u128) as usize;
        for _ in 0..steps {
            self.at = (self.at + 1) % BUCKETS;
            self.late[self.at] = 0;
            self.heartbeats[self.at] = 0;
        }
        self.bucket_start =
            if steps == BUCKETS { now } else { self.bucket_start + self.bucket * steps as u32 };
    }

    /// A device turned late or expired at `now` (its TTL given), with
    /// `online` devices online. Returns whether the server enters
    /// `degraded` because of it.
    pub(super) fn note_late(&mut self, now: Instant, ttl: Duration, online: usize, heartbeats: u64) -> bool {
        self.roll(now, heartbeats);
        self.late[self.at] += 1;
        if let Some(episode) = &mut self.episode {
            episode.longest_ttl = episode.longest_ttl.max(ttl);
            return false;
        }
        let Some(config) = self.config else { return false };
        let late: u64 = self.late.iter().sum();
        let storm =
            online >= config.min_online && late * 100 > u64::from(config.late_percent) * online as u64;
        if storm {
            self.enter(now, FleetCause::LateDevices, ttl);
        }
        storm
    }

    /// The kernel's drop count for the socket is `total`. Returns whether
    /// the server enters `degraded` because it went up.
    pub(super) fn note_kernel_drops(&mut self, now: Instant, total: u64, online: usize) -> bool {
        let grew = total > self.kernel_drops;
        self.kernel_drops = total;
        let Some(config) = self.config else { return false };
        if !grew || self.episode.is_some() || online < config.min_online {
            return false;
        }
        self.enter(now, FleetCause::KernelDrops, Duration::ZERO);
        true
    }

    fn enter(&mut self, now: Instant, cause: FleetCause, ttl: Duration) {
        self.episode = Some(Episode { since: now, cause, normal_since: None, longest_ttl: ttl });
    }

    /// Whether devices due now are held rather than taken offline.
    pub(super) fn degraded(&self) -> bool {
        self.episode.is_some()
    }

    /// Looks at the rates at `now` (`heartbeats`: the engine's heartbeat
    /// counter; `online`: devices online) and says whether to recover.
    pub(super) fn tick(&mut self, now: Instant, heartbeats: u64, online: usize) -> Step {
        self.roll(now, heartbeats);
        let Some(config) = self.config else { return Step::Stay };
        let Some(episode) = &mut self.episode else { return Step::Stay };
        if now.saturating_duration_since(episode.since) >= config.max_hold {
            self.episode = None;
            return Step::Recover(FleetCause::MaxHold);
        }
        let window = self.bucket * BUCKETS as u32;
        let late: u64 = self.late.iter().sum();
        let storm = late * 100 > u64::from(config.late_percent) * online.max(1) as u64;
        let coming = self.heartbeats.iter().sum::<u64>() > 0 || heartbeats > self.heartbeats_mark;
        let wait = episode.longest_ttl.max(window);
        match episode.normal_since {
            _ if storm => episode.normal_since = None,
            None if coming => episode.normal_since = Some((now, heartbeats)),
            None => {}
            Some((since, mark)) if now.saturating_duration_since(since) >= wait => {
                // Over one full TTL, heartbeats came at half the usual rate or more?
                let got = heartbeats.saturating_sub(mark);
                let usual = self.baseline as u128 * now.saturating_duration_since(since).as_micros()
                    / window.as_micros().max(1);
                if got as u128 * 100 >= usual * u128::from(NORMAL_RATE_PERCENT) {
                    self.episode = None;
                    return Step::Recover(FleetCause::HeartbeatsNormal);
                }
                episode.normal_since = coming.then_some((now, heartbeats));
            }
            Some(_) => {}
        }
        Step::Stay
    }

    /// When [`Preserver::tick`] must run next at the latest: while degraded,
    /// at the next sub-window (rates change only then) or at `max_hold`.
    pub(super) fn next_tick(&self) -> Option<Instant> {
        let episode = self.episode.as_ref()?;
        let max_hold = self.config.map_or(Duration::ZERO, |c| c.max_hold);
        Some((self.bucket_start + self.bucket).min(episode.since + max_hold))
    }
}
