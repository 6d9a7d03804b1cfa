//! Flap damping, in the spirit of Nagios' flap detection: a device whose
//! state (online, offline) changes more than `changes` times within
//! `window` is flapping; its online and offline events are held back (and
//! counted) until it has gone `window` without a change. Pure.
//!
//! Only devices that changed state within the last window have an entry,
//! so a steady fleet costs nothing here; entries of devices that stay quiet
//! are dropped a window after their last change.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use crate::time::Instant;

use super::FlapDamping;

/// One device's recent changes.
#[derive(Debug, Default)]
struct History {
    /// When its state changed, oldest first, within the window (at most `changes + 1`).
    changes: VecDeque<Instant>,
    /// Its last change.
    last: Instant,
    /// Whether it is flapping (its events held back).
    flapping: bool,
}

/// What a state change of a device means for its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// Report it as usual.
    Report,
    /// It makes the device flapping: report `flapping` instead.
    StartsFlapping,
    /// The device is flapping: hold it back.
    HoldBack,
}

/// The flap histories of one engine.
#[derive(Debug, Default)]
pub(super) struct Flaps {
    /// The limits; `None`: off.
    config: Option<FlapDamping>,
    /// Devices that changed state within the window.
    recent: HashMap<Box<str>, History>,
    /// When to look at a device again (its last change + window, as filed;
    /// a later change makes the entry early, and it is filed again).
    due: BinaryHeap<Reverse<(Instant, Box<str>)>>,
}

impl Flaps {
    pub(super) fn new(config: Option<FlapDamping>) -> Self {
        Flaps { config, ..Flaps::default() }
    }

    /// `device` changed state at `now`.
    pub(super) fn change(&mut self, device: &str, now: Instant) -> Change {
        let Some(config) = self.config else { return Change::Report };
        let history = match self.recent.get_mut(device) {
            Some(history) => history,
            None => {
                self.due.push(Reverse((now + config.window, device.into())));
                self.recent.entry(device.into()).or_default()
            }
        };
        history.last = now;
        while history.changes.front().is_some_and(|at| now.saturating_duration_since(*at) >= config.window) {
            history.changes.pop_front();
        }
        history.changes.push_back(now);
        if history.changes.len() > config.changes as usize + 1 {
            history.changes.pop_front();
        }
        if history.flapping {
            return Change::HoldBack;
        }
        if history.changes.len() > config.changes as usize {
            history.flapping = true;
            return Change::StartsFlapping;
        }
        Change::Report
    }

    /// Drops `device`'s history (the server forgot it).
    pub(super) fn forget(&mut self, device: &str) {
        self.recent.remove(device);
    }

    /// Whether `device` is flapping.
    pub(super) fn is_flapping(&self, device: &str) -> bool {
        self.recent.get(device).is_some_and(|h| h.flapping)
    }

    /// Its flap score: state changes within the window before `now`.
    pub(super) fn score(&self, device: &str, now: Instant) -> u32 {
        let (Some(config), Some(history)) = (self.config, self.recent.get(device)) else { return 0 };
        history.changes.iter().filter(|at| now.saturating_duration_since(**at) < config.window).count() as u32
    }

    /// `device`'s history, for a snapshot: its changes and whether it flaps.
    pub(super) fn export(&self, device: &str) -> Option<(&VecDeque<Instant>, bool)> {
        self.recent.get(device).map(|history| (&history.changes, history.flapping))
    }

    /// Puts back a history a snapshot kept (times already on this engine's clock).
    pub(super) fn import(
        &mut self,
        device: &str,
        changes: impl IntoIterator<Item = Instant>,
        flapping: bool,
    ) {
        let Some(config) = self.config else { return };
        let changes: VecDeque<Instant> = changes.into_iter().collect();
        let Some(&last) = changes.back() else { return };
        self.due.push(Reverse((last + config.window, device.into())));
        self.recent.insert(device.into(), History { changes, last, flapping });
    }

    /// When [`Flaps::settle`] must run next.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops the histories of devices quiet for a window; calls `stable`
    /// for each of those that were flapping.
    pub(super) fn settle(&mut self, now: Instant, mut stable: impl FnMut(&str)) {
        let Some(config) = self.config else { return };
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, device))) = self.due.pop() else { break };
            let Some(history) = self.recent.get(&device) else { continue };
            let quiet_until = history.last + config.window;
            if quiet_until > now {
                self.due.push(Reverse((quiet_until, device)));
                continue;
            }
            if let Some(history) = self.recent.remove(&device)
                && history.flapping
            {
                stable(&device);
            }
        }
    }
}
