//! Who may ask: the allow list, operator signatures with their time window
//! and replay memory, and the rate limits shared by all shards.

use crate::time::Instant;
use std::net::{IpAddr, SocketAddr};

use super::Tracker;
use crate::auth;
use crate::limit::Repeat;
use crate::wire::{self, DropReason, Query, Tag};

impl Tracker {
    /// Whether `ip` may query without an operator tag.
    pub(super) fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.query_allow.iter().any(|net| net.contains(&ip))
    }

    /// Decides whether a query is answered. Unsigned queries must come from
    /// `--query-allow` and keep to their source's rate; the others never
    /// reach a bucket. A signed query must verify, carry a time within
    /// [`wire::QUERY_SKEW_MS`] of the server's clock, not have been answered
    /// before, and keep to its source's operator rate. A flood without the
    /// key thus touches no bucket and no memory an operator relies on.
    pub(super) fn admit_query(
        &mut self,
        now: Instant,
        from: SocketAddr,
        query: &Query<'_>,
        tag: Option<(&[u8], Tag)>,
    ) -> Result<(), DropReason> {
        let ip = from.ip();
        let Some((signed, tag)) = tag else {
            if !self.allowed(ip) {
                return Err(DropReason::NotAllowed);
            }
            return if self.gate().unsigned.allow(now, ip) { Ok(()) } else { Err(DropReason::RateLimited) };
        };
        let keys = self.config.keys.as_ref().ok_or(DropReason::UnknownKey)?;
        if !auth::verify(&keys.operator, signed, &tag) {
            return Err(DropReason::BadTag);
        }
        let sent = query.tag.map_or(0, |t| t.sent_unix_ms);
        if sent.abs_diff(self.unix_ms(now)) > wire::QUERY_SKEW_MS {
            return Err(DropReason::StaleQuery);
        }
        let mut gate = self.gate();
        // Repeats are refused before the bucket, so replaying an operator's
        // captured queries cannot spend its tokens.
        match gate.recent.admit(now, tag) {
            Ok(()) => {}
            Err(Repeat::Seen) => return Err(DropReason::Replay),
            Err(Repeat::Full) => return Err(DropReason::RateLimited),
        }
        if gate.operator.allow(now, ip) { Ok(()) } else { Err(DropReason::RateLimited) }
    }
}
