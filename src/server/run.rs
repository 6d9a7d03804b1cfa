//! The run loop of one shard: wait, receive a batch, route and handle each
//! datagram, expire what is due, publish the transitions.

use crate::time::Instant;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::PoisonError;

use nix::sys::socket::MsgFlags;

use super::batch::{BATCH, Batch};
use super::drops::DropWarnings;
use super::handover::Parcel;
use super::shared::Shared;
use super::state::Turn;
use super::wait::{ReadTimeout, Ready, Timer, Waiter, far_wait};
use crate::shard::{self, Route};
use crate::sink::Transition;
use crate::tracker::{Handled, Totals, Tracker};
use crate::wire::{self, DropReason};

/// One shard's loop: see [`run_sharded`].
pub(super) fn worker(
    shared: &Shared<'_>,
    me: usize,
    socket: &UdpSocket,
    mut tracker: Tracker,
    snapshots: Option<Turn>,
) -> Result<Tracker, super::ServerError> {
    let result = serve(shared, me, socket, &mut tracker, snapshots);
    if result.is_err() {
        // The other loops must not go on without this shard.
        shared.stop.stop();
    }
    result.map(|()| tracker).map_err(super::ServerError::Io)
}

fn serve(
    shared: &Shared<'_>,
    me: usize,
    socket: &UdpSocket,
    tracker: &mut Tracker,
    mut snapshots: Option<Turn>,
) -> io::Result<()> {
    let shards = shared.inboxes.len();
    // One shard may block in the receive call itself while its next deadline
    // is far (see `far_wait`); the socket is then in blocking mode and every
    // other receive passes MSG_DONTWAIT. Shards keep to epoll, which also
    // watches their inboxes.
    let may_block = shards == 1;
    socket.set_nonblocking(!may_block)?;
    // Datagrams that follow a kernel drop carry the drop count (SO_RXQ_OVFL),
    // which tells self-preservation the server itself is overwhelmed.
    if let Err(e) = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RxqOvfl, &1) {
        tracing::debug!(error = %e, "cannot ask for the kernel's drop count (SO_RXQ_OVFL)");
    }
    let mut kernel_drops = 0;
    if may_block {
        shared.stop.register_datagram_wake(socket.local_addr()?);
    }
    let mut read_timeout = ReadTimeout::default();
    let waker = &shared.inboxes[me].waker;
    let mut timer = Timer::new()?;
    let mut waiter = Waiter::new(socket, &timer, waker)?;
    let mut batch = Batch::new();
    let mut answer =
        Answer { socket, reply: vec![0u8; wire::MAX_DATAGRAM], warnings: DropWarnings::default() };
    let mut outboxes: Vec<Parcel> = (0..shards).map(|_| Parcel::default()).collect();
    let mut handed = Parcel::default();
    let stop = shared.stop;
    'run: while !stop.is_requested() {
        let now = shared.clock.now();
        tracker.handle_timeout(now);
        publish(tracker, shared);
        // Once per turn, for summaries (other shards) and metrics.
        shared.stats[me].store(&tracker.totals());
        let mut deadline = tracker.poll_timeout();
        if let Some(turn) = &snapshots {
            let due = turn.deadline(now);
            deadline = Some(deadline.map_or(due, |deadline| deadline.min(due)));
        }
        let block_for = far_wait(deadline, now).filter(|_| may_block);
        let ready = match block_for {
            Some(wait) => {
                // The first receive below blocks, until a datagram comes or
                // shortly before the deadline; the timer takes over from there.
                read_timeout.set(socket, wait)?;
                Ready::default()
            }
            None => {
                timer.arm(deadline, now)?;
                waiter.wait()?
            }
        };
        if ready.timer {
            timer.clear();
        }
        // The waker is written only when an inbox goes from empty to not
        // empty, so an inbox is empty unless its waker is readable.
        if ready.waker && shards > 1 {
            // Datagrams the other shards received for this one's devices.
            waker.clear();
            std::mem::swap(
                &mut *shared.inboxes[me].parcel.lock().unwrap_or_else(PoisonError::into_inner),
                &mut handed,
            );
            let now = shared.clock.now();
            for (from, datagram) in handed.iter() {
                answer.handle(tracker, now, from, datagram, &Totals::NONE);
            }
            handed.clear();
        }
        let mut gathered = false;
        for round in 0..BATCHES_PER_WAKE {
            let flags = if round == 0 && block_for.is_some() {
                MsgFlags::MSG_WAITFORONE
            } else {
                MsgFlags::MSG_DONTWAIT
            };
            let received = match batch.receive(socket, flags) {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!(error = %e, "receive failed");
                    break;
                }
            };
            let now = shared.clock.now();
            // This shard's datagrams of the batch, handled together so their
            // table lookups overlap (`Tracker::handle_batch`).
            let mut local = [(&[][..], UNSPECIFIED); BATCH];
            let mut count = 0;
            for i in 0..received {
                let (datagram, from) = batch.datagram(i);
                let Some(from) = from else { continue };
                if stop.is_requested() {
                    break 'run;
                }
                match shard::route(datagram, shards) {
                    Route::Shard(owner) if owner != me => outboxes[owner].push(from, datagram),
                    Route::Summary => {
                        answer.handle(tracker, now, from, datagram, &shared.peer_totals(me));
                    }
                    Route::Shard(_) | Route::Local => {
                        local[count] = (datagram, from);
                        count += 1;
                    }
                }
            }
            let local = &local[..count];
            let Answer { socket, reply, warnings } = &mut answer;
            tracker.handle_batch(now, local, reply, |i, handled, reply| {
                let (datagram, from) = local[i];
                finish(socket, warnings, handled, reply, from, datagram);
            });
            if batch.kernel_drops > kernel_drops {
                kernel_drops = batch.kernel_drops;
                tracker.note_kernel_drops(now, kernel_drops);
                shared.stats[me].kernel_drops.store(kernel_drops, std::sync::atomic::Ordering::Relaxed);
            }
            if received < BATCH {
                // A few datagrams under a steady load: more are on the way.
                // Let them gather for a moment (never past the next
                // deadline) and take them as one batch, instead of a
                // wake-up and a system call for every one or two (and no
                // batch for the prefetch stages to overlap).
                if !gathered && (1..GATHER_BELOW).contains(&received) {
                    let pause = deadline.map_or(GATHER, |deadline| {
                        deadline.checked_duration_since(shared.clock.now()).unwrap_or_default().min(GATHER)
                    });
                    if !pause.is_zero() {
                        gathered = true;
                        std::thread::sleep(pause);
                        continue;
                    }
                }
                break;
            }
        }
        for (owner, outbox) in outboxes.iter_mut().enumerate() {
            if !outbox.is_empty() {
                shared.deliver(owner, outbox);
            }
        }
        publish(tracker, shared);
        if let Some(turn) = &mut snapshots {
            // After the publish: every transition the records reflect has
            // its sequence number by now.
            turn.step(tracker, shared.clock.now());
        }
        answer.warnings.maybe_warn(std::time::Instant::now(), tracker.counters(), &shared.handover_drops);
    }
    // Devices whose deadline passed while the loop was busy or stalled
    // still get their offline events before it exits.
    tracker.handle_timeout(shared.clock.now());
    publish(tracker, shared);
    shared.stats[me].store(&tracker.totals());
    Ok(())
}

/// How a loop answers: its socket, a reply buffer, and the drop warning.
struct Answer<'s> {
    /// Replies leave from the socket the loop owns.
    socket: &'s UdpSocket,
    /// Where the engine writes a reply.
    reply: Vec<u8>,
    /// Counts and samples drops for the rate-limited warning.
    warnings: DropWarnings,
}

impl Answer<'_> {
    /// Applies one datagram (a summary adds `peers`) and sends the reply, if any.
    fn handle(
        &mut self,
        tracker: &mut Tracker,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        peers: &Totals,
    ) {
        let handled = tracker.handle_with_peers(now, from, datagram, &mut self.reply, peers);
        finish(self.socket, &mut self.warnings, handled, &self.reply, from, datagram);
    }
}

/// Sends the reply the engine wrote, if any, and notes a drop.
fn finish(
    socket: &UdpSocket,
    warnings: &mut DropWarnings,
    handled: Handled,
    reply: &[u8],
    from: SocketAddr,
    datagram: &[u8],
) {
    match handled {
        Handled::Done => {}
        Handled::Reply(n) => send_reply(socket, &reply[..n], from),
        Handled::Dropped { reason, reply: answer } => {
            log_drop(reason, from, datagram.len());
            warnings.sample(reason, from, datagram);
            if let Some(n) = answer {
                send_reply(socket, &reply[..n], from);
            }
        }
    }
}

/// A placeholder for the unused entries of a batch.
const UNSPECIFIED: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));

/// Batches received per wake-up before the loop checks its timer again.
const BATCHES_PER_WAKE: usize = 4;

/// A receive that returns fewer datagrams than this (but some) lets more
/// gather for [`GATHER`] before the next, once per wake-up.
const GATHER_BELOW: usize = 16;

/// How long a loop lets datagrams gather after a small batch: at most this
/// much more latency for a datagram that arrives meanwhile (the one that
/// woke the loop is answered before), against a wake-up and a system call
/// for every datagram or two under a moderate load (README, Performance).
const GATHER: std::time::Duration = std::time::Duration::from_micros(50);

/// Hands the engine's pending transitions to the publisher (never waits).
fn publish(tracker: &mut Tracker, shared: &Shared<'_>) {
    while let Some(event) = tracker.poll_event() {
        let wall = tracker.wall_time(event.at);
        shared.outbox.send(Transition { seq: 0, event, wall });
    }
}

/// Sends without ever blocking the loop (the socket itself may be in
/// blocking mode): a reply that finds the send buffer full is dropped.
fn send_reply(socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = rustix::net::sendto(socket, reply, rustix::net::SendFlags::DONTWAIT, &to) {
        tracing::debug!(error = %e, %to, "reply not sent");
    }
}

fn log_drop(reason: DropReason, from: SocketAddr, len: usize) {
    tracing::debug!(reason = reason.name(), %from, len, "datagram dropped");
}
