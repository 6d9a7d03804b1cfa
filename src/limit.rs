//! Who may ask what, how often: per-source rate limits for queries, and the
//! memory of signed queries already answered. Pure: time comes in as `now`.
//!
//! A source is an IPv4 address or an IPv6 /64 (one subscriber's network:
//! counting IPv6 addresses one by one would let a single host pose as
//! billions of sources). The map of buckets is bounded; once it is full of
//! busy sources, the sources it cannot track share one overflow bucket, so
//! memory stays bounded and a flood of new sources cannot lock everyone out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::time::Instant;

use crate::wire::{QUERY_SKEW_MS, Tag};

/// How often, at most, a full map is swept for idle sources.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// One source's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left; one query takes one.
    tokens: f64,
    /// When `tokens` was last brought up to date (`None`: never used, full).
    updated: Option<Instant>,
}

impl Bucket {
    /// Refills the bucket for the time since its last use and takes a token if it has one.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        if let Some(updated) = self.updated {
            let elapsed = now.saturating_duration_since(updated).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(burst);
        }
        self.updated = Some(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Whether the bucket would be full at `now` (its source is idle).
    fn is_full(&self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = self.updated.map_or(f64::INFINITY, |u| now.saturating_duration_since(u).as_secs_f64());
        self.tokens + elapsed * rate >= burst
    }
}

/// The source a rate limit applies to: the address itself for IPv4 (and
/// IPv4-mapped IPv6), its /64 for IPv6.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
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
    /// The buckets, by source (an IPv4 address or an IPv6 /64).
    buckets: HashMap<IpAddr, Bucket>,
    /// Shared by the sources the full map cannot track.
    overflow: Bucket,
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
            overflow: Bucket { tokens: f64::from(burst.max(1)), updated: None },
            last_prune: None,
        }
    }

    /// Takes a token for the source of `ip` (see [`source_of`]) at `now`;
    /// `false` if it has none left. When the map is full of busy sources, a
    /// source it does not track takes from the shared overflow bucket.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let source = source_of(ip);
        let (rate, burst) = (self.rate, self.burst);
        if let Some(bucket) = self.buckets.get_mut(&source) {
            return bucket.take(now, rate, burst);
        }
        if self.buckets.len() >= self.max_sources {
            self.prune(now);
            if self.buckets.len() >= self.max_sources {
                return self.overflow.take(now, rate, burst);
            }
        }
        self.buckets.insert(source, Bucket { tokens: burst - 1.0, updated: Some(now) });
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
        self.buckets.retain(|_, b| !b.is_full(now, rate, burst));
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

/// Most signed queries remembered at once; past it, new signed queries are
/// refused until old ones age out (only holders of the operator key can
/// fill it: about 2 180 signed queries per second, sustained).
pub const MAX_RECENT_QUERIES: usize = 1 << 18;

/// How long a signed query is remembered: until its time can no longer pass
/// the window check, whatever the skew between the clocks.
const REMEMBER: Duration = Duration::from_millis(2 * QUERY_SKEW_MS);

/// The tags of signed queries answered recently: each signed query is
/// answered once, so a captured one cannot be sent again while its time
/// still passes the window check.
#[derive(Debug, Default)]
pub struct RecentQueries {
    /// Tags seen, for lookups.
    tags: HashSet<Tag>,
    /// The same tags with when they may be forgotten, oldest first.
    order: VecDeque<(Instant, Tag)>,
}

/// Why [`RecentQueries::admit`] refused a signed query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// This query was answered already.
    Seen,
    /// Too many signed queries in the window to remember another one.
    Full,
}

impl RecentQueries {
    /// Records the query with `tag` as answered at `now`, unless it was already.
    pub fn admit(&mut self, now: Instant, tag: Tag) -> Result<(), Repeat> {
        while let Some(&(forget_at, old)) = self.order.front() {
            if forget_at > now {
                break;
            }
            self.order.pop_front();
            self.tags.remove(&old);
        }
        if self.tags.contains(&tag) {
            return Err(Repeat::Seen);
        }
        if self.tags.len() >= MAX_RECENT_QUERIES {
            return Err(Repeat::Full);
        }
        self.tags.insert(tag);
        self.order.push_back((now + REMEMBER, tag));
        Ok(())
    }

    /// Signed queries remembered now.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

/// The query state the shards of one server share, so that limits hold for
/// the server as a whole whichever thread receives a query.
#[derive(Debug)]
pub struct QueryGate {
    /// Unsigned queries, by source (only sources in `--query-allow` get here).
    pub unsigned: RateLimiter,
    /// Signed queries whose tag verified, by source: a flood without the
    /// key cannot touch these buckets.
    pub operator: RateLimiter,
    /// Signed queries answered recently.
    pub recent: RecentQueries,
}

impl QueryGate {
    /// Limits of `rate` per second after a burst of `burst`, each map
    /// tracking at most `max_sources` sources.
    pub fn new(rate: u32, burst: u32, max_sources: usize) -> Self {
        QueryGate {
            unsigned: RateLimiter::new(rate, burst, max_sources),
            operator: RateLimiter::new(rate, burst, max_sources),
            recent: RecentQueries::default(),
        }
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
        let t0 = Instant::from_micros(1 << 40);
        let mut limiter = RateLimiter::new(10, 5, 100);
        let allowed = (0..20).filter(|_| limiter.allow(t0, ip(1))).count();
        assert_eq!(allowed, 5);
        assert!(limiter.allow(t0, ip(2)), "other sources are not affected");
        assert!(!limiter.allow(t0 + Duration::from_millis(50), ip(1)));
        assert!(limiter.allow(t0 + Duration::from_millis(100), ip(1)), "one token per 100 ms");
    }

    #[test]
    fn the_map_stays_bounded_under_a_flood_of_sources() {
        let t0 = Instant::from_micros(1 << 40);
        let mut limiter = RateLimiter::new(10, 5, 1000);
        for n in 0..100_000 {
            limiter.allow(t0 + Duration::from_micros(n.into()), ip(n));
            assert!(limiter.sources() <= 1000);
        }
        // Once the flood's buckets have refilled they are forgotten, and a new source gets in.
        assert!(limiter.allow(t0 + Duration::from_secs(5), ip(u32::MAX)));
    }

    #[test]
    fn a_full_map_of_busy_sources_still_lets_new_ones_share_the_overflow() {
        let t0 = Instant::from_micros(1 << 40);
        let mut limiter = RateLimiter::new(20, 40, 100);
        // 100 sources keep their buckets busy: the map stays full.
        for round in 0..50u64 {
            let now = t0 + Duration::from_millis(round * 10);
            for n in 0..100 {
                limiter.allow(now, ip(n));
            }
        }
        assert_eq!(limiter.sources(), 100);
        let later = t0 + Duration::from_secs(2);
        let new_ones = (1000..1021).filter(|n| limiter.allow(later, ip(*n))).count();
        assert_eq!(new_ones, 21, "21 new sources, under the overflow's burst, all get in");
        assert_eq!(limiter.sources(), 100, "and the map stays bounded");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let t0 = Instant::from_micros(1 << 40);
        let mut limiter = RateLimiter::new(1, 3, 100);
        let host = |n: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, n]);
        let allowed = (0..100).filter(|n| limiter.allow(t0, host(*n))).count();
        assert_eq!(allowed, 3, "100 addresses of one /64 share one bucket");
        assert!(
            limiter.allow(t0, IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1])),
            "another /64 has its own"
        );
        assert_eq!(source_of("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_signed_query_is_answered_once_and_forgotten_after_the_window() {
        let t0 = Instant::from_micros(1 << 40);
        let mut recent = RecentQueries::default();
        assert_eq!(recent.admit(t0, [1; 8]), Ok(()));
        assert_eq!(recent.admit(t0 + Duration::from_secs(59), [1; 8]), Err(Repeat::Seen));
        assert_eq!(recent.admit(t0 + Duration::from_secs(59), [2; 8]), Ok(()));
        assert_eq!(
            recent.admit(t0 + REMEMBER, [1; 8]),
            Ok(()),
            "forgotten once it cannot pass the time check"
        );
        assert_eq!(recent.len(), 2);
    }
}
