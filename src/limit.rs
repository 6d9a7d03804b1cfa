//! Per-source rate limiting for queries: a token bucket per IP address, in a
//! map of bounded size. Pure: time comes in as `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How often, at most, a full map is swept for idle sources.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// One source's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left; one query takes one.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

/// Token buckets by source address.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens a bucket holds: the burst allowed after a quiet spell.
    burst: f64,
    /// Most sources tracked at once; bounds memory under a spoofed flood.
    max_sources: usize,
    /// The buckets.
    buckets: HashMap<IpAddr, Bucket>,
    /// When the map was last swept for full (idle) buckets.
    last_prune: Option<Instant>,
}

impl RateLimiter {
    /// Allows `rate` queries per second per source after a burst of `burst`,
    /// tracking at most `max_sources` sources.
    pub fn new(rate: u32, burst: u32, max_sources: usize) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            last_prune: None,
        }
    }

    /// Takes a token for `source` at `now`; `false` if it has none left, or
    /// if the map is full of sources that are all busy.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        if let Some(bucket) = self.buckets.get_mut(&source) {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.updated = now;
            if bucket.tokens < 1.0 {
                return false;
            }
            bucket.tokens -= 1.0;
            return true;
        }
        if self.buckets.len() >= self.max_sources {
            self.prune(now);
            if self.buckets.len() >= self.max_sources {
                return false;
            }
        }
        self.buckets.insert(source, Bucket { tokens: self.burst - 1.0, updated: now });
        true
    }

    /// Forgets the sources whose bucket has refilled: they are as good as new.
    /// Runs at most once per [`PRUNE_EVERY`], so a flood of new sources cannot
    /// make every query pay for a sweep.
    fn prune(&mut self, now: Instant) {
        if self.last_prune.is_some_and(|last| now.saturating_duration_since(last) < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst);
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10, 5, 100);
        let allowed = (0..20).filter(|_| limiter.allow(t0, ip(1))).count();
        assert_eq!(allowed, 5);
        assert!(limiter.allow(t0, ip(2)), "other sources are not affected");
        assert!(!limiter.allow(t0 + Duration::from_millis(50), ip(1)));
        assert!(limiter.allow(t0 + Duration::from_millis(100), ip(1)), "one token per 100 ms");
    }

    #[test]
    fn the_map_stays_bounded_under_a_flood_of_sources() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(10, 5, 1000);
        for n in 0..100_000 {
            limiter.allow(t0 + Duration::from_micros(n.into()), ip(n));
            assert!(limiter.sources() <= 1000);
        }
        // Once the flood's buckets have refilled they are forgotten, and a new source gets in.
        assert!(limiter.allow(t0 + Duration::from_secs(5), ip(u32::MAX)));
    }
}
