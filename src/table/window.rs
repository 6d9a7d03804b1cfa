//! Anti-replay per device: which (boot, seq) pairs have been seen.

/// How far back, in sequence numbers, a reordered heartbeat is still accepted.
pub const REPLAY_WINDOW: u32 = 64;

/// Which (boot, seq) pairs of one device have been seen: anti-replay with a
/// sliding bitmap, as in IPsec (RFC 4303, section 3.4.3) and WireGuard.
///
/// A pair is new if its boot is newer than the newest seen, or if it has
/// that boot and its seq is above the highest seen, or less than
/// [`REPLAY_WINDOW`] below it and not seen yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The newest boot epoch seen.
    boot: u32,
    /// The highest seq seen within `boot`.
    top: u32,
    /// Bit `i` is set if seq `top - i` has been seen.
    seen: u64,
}

impl ReplayWindow {
    /// A window that has seen exactly (boot, seq).
    pub fn new(boot: u32, seq: u32) -> Self {
        ReplayWindow { boot, top: seq, seen: 1 }
    }

    /// A window as [`ReplayWindow::boot`], [`ReplayWindow::top`] and
    /// [`ReplayWindow::seen`] describe it (as a snapshot keeps it). `top`
    /// itself always counts as seen.
    pub fn from_parts(boot: u32, top: u32, seen: u64) -> Self {
        ReplayWindow { boot, top, seen: seen | 1 }
    }

    /// Which of the [`REPLAY_WINDOW`] seqs up to `top` have been seen: bit
    /// `i` stands for `top - i`.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The newest boot epoch seen.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The highest sequence number seen in that boot.
    pub fn top(&self) -> u32 {
        self.top
    }

    /// Whether (boot, seq) is new.
    pub fn is_new(&self, boot: u32, seq: u32) -> bool {
        if boot != self.boot {
            return boot > self.boot;
        }
        if seq > self.top {
            return true;
        }
        let age = self.top - seq;
        age < REPLAY_WINDOW && self.seen & (1 << age) == 0
    }

    /// Records (boot, seq) as seen; call only if [`ReplayWindow::is_new`].
    pub fn accept(&mut self, boot: u32, seq: u32) {
        if boot > self.boot {
            *self = ReplayWindow::new(boot, seq);
        } else if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= REPLAY_WINDOW { 1 } else { (self.seen << shift) | 1 };
            self.top = seq;
        } else {
            self.seen |= 1 << (self.top - seq);
        }
    }
}
