//! The rate-limited warning about dropped datagrams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::tracker::Counters;
use crate::wire::{self, DropReason};

/// Logs dropped and rejected datagrams at warn level, at most once per
/// [`DropWarnings::EVERY`], as a count by reason with one example of each
/// (its source, and its device if it names one): a flood cannot flood the
/// log, and an operator can still tell whose datagrams are refused.
#[derive(Default)]
pub(super) struct DropWarnings {
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
    pub(super) fn sample(&mut self, reason: DropReason, from: SocketAddr, datagram: &[u8]) {
        let slot = &mut self.samples[usize::from(reason.code()) - 1];
        if slot.is_none() {
            let device = match wire::decode(datagram) {
                Ok(wire::Message::Heartbeat(hb)) => Some(hb.device),
                Ok(wire::Message::Leave(leave)) => Some(leave.device),
                Ok(wire::Message::Query(wire::Query { kind: wire::QueryKind::Device(id), .. })) => Some(id),
                _ => None,
            };
            *slot = Some((from, device.map(|id| crate::text::printable(id).into_owned())));
        }
    }

    pub(super) fn maybe_warn(&mut self, now: Instant, counters: &Counters, handover_drops: &AtomicU64) {
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
