//! Hand-over between shards: a datagram that reaches one thread's socket
//! but names another shard's device goes into that shard's inbox.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::stop::Waker;

/// Most datagrams waiting in one shard's inbox; more are dropped (and
/// counted) rather than queued without bound behind a stalled thread.
pub(super) const INBOX_LIMIT: usize = 1 << 16;

/// Datagrams handed to one shard, and the eventfd that tells it so.
pub(super) struct Inbox {
    /// The datagrams waiting.
    pub(super) parcel: Mutex<Parcel>,
    /// Written when the inbox goes from empty to not empty.
    pub(super) waker: Arc<Waker>,
}

/// Datagrams with their sources, packed into one byte buffer.
#[derive(Default)]
pub(super) struct Parcel {
    /// The datagrams, back to back.
    bytes: Vec<u8>,
    /// Each datagram's source and the end of its bytes.
    items: Vec<(SocketAddr, usize)>,
}

impl Parcel {
    pub(super) fn push(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.items.push((from, self.bytes.len()));
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Moves the first `limit` datagrams of `other` to the end of this one.
    pub(super) fn append(&mut self, other: &Parcel, limit: usize) {
        let base = self.bytes.len();
        let taken = other.items.len().min(limit);
        let end = if taken == 0 { 0 } else { other.items[taken - 1].1 };
        self.bytes.extend_from_slice(&other.bytes[..end]);
        self.items.extend(other.items[..taken].iter().map(|&(from, e)| (from, base + e)));
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        let mut start = 0;
        self.items.iter().map(move |&(from, end)| {
            let datagram = &self.bytes[start..end];
            start = end;
            (from, datagram)
        })
    }
}
