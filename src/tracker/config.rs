//! The engine's rules: TTLs, authentication and abuse limits.

use std::fmt;
use std::time::Duration;

use crate::auth::{self, Key};

/// The shortest TTL the engine accepts: TTLs are kept in whole milliseconds.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// The longest TTL the engine accepts: the protocol carries TTLs as 32-bit
/// milliseconds (about 49 days 17 hours).
pub const MAX_TTL: Duration = Duration::from_millis(u32::MAX as u64);

/// Whether heartbeats and leaves must carry a valid tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A tag is required and must verify.
    Required,
    /// Untagged frames are accepted; a tag, if present, must verify (for migrating a fleet).
    Optional,
    /// Tags are ignored. Anyone who can reach the port can forge heartbeats.
    Off,
}

impl AuthMode {
    /// `required`, `optional` or `off`, as the `--auth` flag says it.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Required => "required",
            AuthMode::Optional => "optional",
            AuthMode::Off => "off",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [AuthMode::Required, AuthMode::Optional, AuthMode::Off]
            .into_iter()
            .find(|mode| mode.name() == s)
            .ok_or_else(|| format!("'{s}' is not an auth mode (required, optional or off)"))
    }
}

/// The keys the server derives from its master secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    /// Device keys are derived from this and the device id, per datagram.
    pub(super) device_subkey: Key,
    /// Signs operator queries.
    pub(super) operator: Key,
}

impl Keys {
    /// Derives the server's keys from the master secret.
    pub fn from_master(master: &Key) -> Self {
        Keys { device_subkey: auth::device_subkey(master), operator: auth::operator_key(master) }
    }

    /// The operator key, which signs status queries (derived from the master).
    pub fn operator(&self) -> Key {
        self.operator
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// The engine's rules: TTLs, authentication and abuse limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// TTL of a device that declares no interval.
    pub timeout: Duration,
    /// A device that declares an interval is offline after this many missed heartbeats.
    pub misses: u32,
    /// No device gets a TTL below this (protects against tiny declared intervals).
    pub min_ttl: Duration,
    /// No device gets a TTL above this (protects against huge declared intervals).
    pub max_ttl: Duration,
    /// Whether heartbeats and leaves must be signed.
    pub auth: AuthMode,
    /// The keys, if the server has a master secret. Needed unless `auth` is `Off`.
    pub keys: Option<Keys>,
    /// Most devices held, online or offline; see [`PresenceTable::new`](crate::table::PresenceTable::new).
    pub max_devices: usize,
    /// Sources whose queries need no operator tag.
    pub query_allow: Vec<ipnet::IpNet>,
    /// Queries per second allowed per source address.
    pub query_rate: u32,
    /// Queries a quiet source may send at once.
    pub query_burst: u32,
    /// Most query sources tracked by the rate limiter at once.
    pub max_query_sources: usize,
    /// A device is suspect (late) once this many intervals pass after the
    /// one its heartbeat was due at, while its deadline is still ahead; 0:
    /// never. Status always shows it.
    pub suspect_after: u32,
    /// Whether `suspect` transitions (and the `online` back from suspect)
    /// are reported as events.
    pub suspect_events: bool,
    /// Self-preservation: when many devices turn late at once, or the
    /// kernel drops datagrams, hold devices instead of taking them offline.
    /// `None`: off.
    pub preservation: Option<Preservation>,
    /// Flap damping. `None`: off.
    pub flap_damping: Option<FlapDamping>,
    /// Offline devices are forgotten (reported as `forgotten`; `status`
    /// then says unknown) once silent this long. `None`: only to make room
    /// for new devices when the table is full.
    pub forget_after: Option<Duration>,
}

/// When the server suspects its own network rather than its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preservation {
    /// It enters `degraded` when more than this share of the online devices
    /// (in percent) turn late or expire within one `min_ttl`.
    pub late_percent: u32,
    /// ...and only while at least this many devices are online, so that a
    /// death or two in a small fleet is never taken for a blackout.
    pub min_online: usize,
    /// The longest it holds devices, whatever happens.
    pub max_hold: Duration,
}

impl Default for Preservation {
    fn default() -> Self {
        Preservation { late_percent: 20, min_online: 50, max_hold: Duration::from_secs(300) }
    }
}

/// When a device counts as flapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapDamping {
    /// It flaps when its state (online, offline) changes more than this
    /// many times within `window`.
    pub changes: u32,
    /// The window; a flapping device is stable again after this long without a change.
    pub window: Duration,
}

impl Default for FlapDamping {
    fn default() -> Self {
        FlapDamping { changes: 6, window: Duration::from_secs(600) }
    }
}

/// The sources that may query without the operator key by default. Parsed
/// with `filter_map`, so a typo here would allow less, never everything.
const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(30),
            misses: 3,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            auth: AuthMode::Off,
            keys: None,
            max_devices: 1_000_000,
            query_allow: LOOPBACK.iter().filter_map(|net| net.parse().ok()).collect(),
            query_rate: 20,
            query_burst: 40,
            max_query_sources: 4096,
            suspect_after: 1,
            suspect_events: false,
            preservation: Some(Preservation::default()),
            flap_damping: Some(FlapDamping::default()),
            forget_after: None,
        }
    }
}

/// A configuration the engine cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `auth` is `Required` or `Optional` but there are no keys.
    #[error("authentication needs a master key (--key-file)")]
    AuthWithoutKey,
    /// `min_ttl` is larger than `max_ttl`.
    #[error("the minimum TTL is larger than the maximum TTL")]
    TtlRange,
    /// A TTL setting is below [`MIN_TTL`] or above [`MAX_TTL`].
    #[error("TTLs must be between 1ms and 49days 17h 2m 47s 295ms (32-bit milliseconds)")]
    TtlOutOfRange,
}

impl Config {
    /// The TTL for a device that declared `interval` (zero = none):
    /// `misses × interval` clamped to `[min_ttl, max_ttl]`, or `timeout`.
    pub fn ttl(&self, interval: Duration) -> Duration {
        if interval.is_zero() {
            return self.timeout;
        }
        // In whole nanoseconds: cheaper than Duration arithmetic on the hot path.
        let nanos = |d: Duration| {
            d.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(d.subsec_nanos()))
        };
        let ttl = nanos(interval).saturating_mul(u64::from(self.misses));
        let (min, max) = (nanos(self.min_ttl), nanos(self.max_ttl));
        Duration::from_nanos(ttl.clamp(min, max.max(min)))
    }

    /// The interval the server expects from a device that declared
    /// `interval`: the declared one, or `timeout / misses` if none.
    pub fn expected_interval(&self, interval: Duration) -> Duration {
        if interval.is_zero() { self.timeout / self.misses.max(1) } else { interval }
    }

    /// Checks that the engine can run with these rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth != AuthMode::Off && self.keys.is_none() {
            return Err(ConfigError::AuthWithoutKey);
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError::TtlRange);
        }
        let in_range = |ttl: Duration| (MIN_TTL..=MAX_TTL).contains(&ttl);
        if !(in_range(self.timeout) && in_range(self.min_ttl) && in_range(self.max_ttl)) {
            return Err(ConfigError::TtlOutOfRange);
        }
        Ok(())
    }
}
