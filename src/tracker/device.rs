//! Heartbeats and leaves: authentication, the table, acks and transitions.

use std::net::SocketAddr;
use std::time::Duration;

use crate::time::Instant;

use super::{AuthMode, Count, Event, EventKind, Handled, Tracker, millis_u32};
use crate::auth;
use crate::table::{Arrival, Beat, OfflineReason, Refusal};
use crate::wire::{self, Ack, DropReason, Leave, Message, RawHeartbeat, Tag};

impl Tracker {
    /// Checks the tag of a device's frame as `auth` demands; returns
    /// whether the frame is signed (a tag that verified). Under `Off` tags
    /// are ignored, so no frame counts as signed.
    pub(super) fn authenticate_device(
        &self,
        device: &[u8],
        tag: Option<(&[u8], Tag)>,
    ) -> Result<bool, DropReason> {
        match (self.config.auth, tag, &self.config.keys) {
            (AuthMode::Off, _, _) | (AuthMode::Optional, None, _) => Ok(false),
            (AuthMode::Required, None, _) => Err(DropReason::MissingTag),
            (_, Some(_), None) => Err(DropReason::UnknownKey),
            (_, Some((signed, tag)), Some(keys)) => {
                let key = auth::device_key_from_subkey(&keys.device_subkey, device);
                if auth::verify(&key, signed, &tag) { Ok(true) } else { Err(DropReason::BadTag) }
            }
        }
    }

    pub(super) fn heartbeat(
        &mut self,
        now: Instant,
        from: SocketAddr,
        hb: RawHeartbeat<'_>,
        tag: Option<(&[u8], Tag)>,
        request_len: usize,
        reply: &mut [u8],
    ) -> Result<Handled, DropReason> {
        let hash = self.table.hash(hb.device);
        self.heartbeat_hashed(now, from, hb, hash, tag, request_len, reply)
    }

    /// [`Tracker::heartbeat`] with the table's hash of the id worked out.
    #[allow(clippy::too_many_arguments, reason = "the hot path's parts, each used once")]
    pub(super) fn heartbeat_hashed(
        &mut self,
        now: Instant,
        from: SocketAddr,
        hb: RawHeartbeat<'_>,
        hash: u64,
        tag: Option<(&[u8], Tag)>,
        request_len: usize,
        reply: &mut [u8],
    ) -> Result<Handled, DropReason> {
        let signed = self.authenticate_device(hb.device, tag)?;
        let interval = Duration::from_millis(hb.interval_ms.into());
        // A fleet mostly declares one interval: remember the last TTL worked out.
        let ttl = match self.last_ttl {
            Some((declared, ttl)) if declared == hb.interval_ms => ttl,
            _ => {
                let ttl = self.config.ttl(interval);
                self.last_ttl = Some((hb.interval_ms, ttl));
                ttl
            }
        };
        let beat =
            Beat { addr: from, boot: hb.boot, seq: hb.seq, interval, ttl, payload: hb.payload, signed };
        let arrival = self.table.arrive_hashed(now, hb.device, hash, beat).map_err(refusal)?;
        self.counters.bump(Count::Heartbeats);
        if self.table.has_forgotten() {
            // Rare: the table was full and made room.
            self.report_forgotten(now);
        }
        let kind = match arrival {
            Arrival::Continued => None,
            Arrival::Online => Some(EventKind::Online),
            Arrival::Back { .. } => self.config.suspect_events.then_some(EventKind::Back),
        };
        // A device that came online or back is held, so its id is UTF-8
        // (checked only then: most heartbeats change nothing).
        if let Some((kind, device)) = kind.and_then(|kind| Some((kind, std::str::from_utf8(hb.device).ok()?)))
        {
            // Rare (a transition): one more lookup for the version.
            let version = self.table.get(device).map_or(1, |entry| entry.version());
            let event = Event {
                device: device.into(),
                kind,
                at: now,
                deadline: None,
                addr: from,
                version,
                boot: hb.boot,
                heartbeat_seq: hb.seq,
                held_ms: None,
                ttl_ms: Some(millis_u32(ttl)),
                online: None,
                fleet: None,
            };
            if kind == EventKind::Online {
                self.report_change(event);
            } else {
                self.report_other(event);
            }
        }
        if hb.flags & wire::FLAG_ACK == 0 {
            return Ok(Handled::Done);
        }
        let ack = Message::Ack(Ack {
            boot: hb.boot,
            seq: hb.seq,
            interval_ms: millis_u32(self.config.expected_interval(interval)),
            ttl_ms: millis_u32(ttl),
        });
        // An ack larger than the heartbeat is not sent (no amplification);
        // a signed heartbeat is always large enough.
        Ok(match wire::encode(&ack, reply) {
            Ok(len) if len <= request_len => Handled::Reply(len),
            _ => Handled::Done,
        })
    }

    pub(super) fn leave(
        &mut self,
        now: Instant,
        leave: Leave<'_>,
        tag: Option<(&[u8], Tag)>,
    ) -> Result<Handled, DropReason> {
        let signed = self.authenticate_device(leave.device.as_bytes(), tag)?;
        let left = self.table.leave(leave.device, leave.boot, leave.seq, signed).map_err(refusal)?;
        if let Some(entry) = left {
            let (addr, version) = (entry.addr(), entry.version());
            self.report_change(Event {
                device: leave.device.into(),
                kind: EventKind::Offline(OfflineReason::Left),
                at: now,
                deadline: None,
                addr,
                version,
                boot: leave.boot,
                heartbeat_seq: leave.seq,
                held_ms: None,
                ttl_ms: None,
                online: None,
                fleet: None,
            });
        }
        self.counters.bump(Count::Leaves);
        Ok(Handled::Done)
    }
}

fn refusal(refusal: Refusal) -> DropReason {
    match refusal {
        Refusal::Replay => DropReason::Replay,
        Refusal::OverCapacity => DropReason::OverCapacity,
        Refusal::BadId => DropReason::BadDeviceId,
        Refusal::Unsigned => DropReason::MissingTag,
    }
}
