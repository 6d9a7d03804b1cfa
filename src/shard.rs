//! Splitting the devices across threads (`--threads N`).
//!
//! Each thread owns one [`Tracker`](crate::tracker::Tracker) shard and one
//! socket of a `SO_REUSEPORT` group. The kernel spreads datagrams over the
//! sockets by source address, but a device belongs to the shard its id
//! hashes to ([`owner`]), so the thread that receives a datagram first asks
//! [`route`] where it goes and hands it over if it is not its own. A device
//! therefore has one entry, one deadline and one replay window whichever
//! socket its datagrams arrive on.
//!
//! The kernel can do most of the routing: [`steering_program`] is a classic
//! BPF program that picks the owner's socket for a heartbeat or leave, so
//! hand-overs become rare. Pure functions only; the threads, sockets and
//! hand-over queues are in [`crate::server`].

use crate::wire::{self, Message, QueryKind};

/// Where a datagram must be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By this shard: it names a device (heartbeat, leave, device query), or
    /// it continues a listing of this shard.
    Shard(usize),
    /// A summary: any shard answers, adding the others' totals.
    Summary,
    /// Anything else (garbage, replies, a cursor of no shard): the receiving
    /// shard handles it. Garbage is counted and dropped there. (A first list
    /// page goes to shard 0, as `Shard(0)`.)
    Local,
}

/// FNV-1a (32-bit) parameters: simple enough to compute in a classic BPF
/// program in the kernel (see [`steering_program`]) as well as here.
const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// The shard that owns the device with id `id`, out of `shards`: FNV-1a of
/// the id bytes, modulo `shards`.
pub fn owner(id: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash = id.iter().fold(FNV_OFFSET, |hash, &b| (hash ^ u32::from(b)).wrapping_mul(FNV_PRIME));
    (hash % u32::try_from(shards).unwrap_or(u32::MAX)) as usize
}

/// One classic BPF instruction: opcode, jump-if-true and jump-if-false
/// offsets, and the constant (as in `struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    /// Opcode (class, size, mode or operation, source).
    pub code: u16,
    /// Instructions to skip if a conditional jump is taken.
    pub jt: u8,
    /// Instructions to skip if it is not.
    pub jf: u8,
    /// The constant operand.
    pub k: u32,
}

/// Classic BPF opcodes used below (values from `linux/filter.h`).
mod op {
    pub const LD_LEN: u16 = 0x80; // A = packet length
    pub const LD_B_ABS: u16 = 0x30; // A = packet[k]
    pub const LD_IMM: u16 = 0x00; // A = k
    pub const LD_MEM: u16 = 0x60; // A = M[k]
    pub const ST: u16 = 0x02; // M[k] = A
    pub const TAX: u16 = 0x07; // X = A
    pub const SUB_K: u16 = 0x14; // A -= k
    pub const MUL_K: u16 = 0x24; // A *= k
    pub const MOD_K: u16 = 0x94; // A %= k
    pub const XOR_X: u16 = 0xac; // A ^= X
    pub const JA: u16 = 0x05; // pc += k
    pub const JEQ_K: u16 = 0x15; // pc += (A == k) ? jt : jf
    pub const JGT_K: u16 = 0x25; // pc += (A > k) ? jt : jf
    pub const JGE_K: u16 = 0x35; // pc += (A >= k) ? jt : jf
    pub const JGE_X: u16 = 0x3d; // pc += (A >= X) ? jt : jf
    pub const RET_A: u16 = 0x16; // return A
    pub const RET_K: u16 = 0x06; // return k
}

/// What the steering program returns when it cannot tell the owner: an
/// index past every socket, so the kernel picks one by its own hash.
const NO_OWNER: u32 = u32::MAX;

/// A classic BPF program for `SO_ATTACH_REUSEPORT_CBPF` that sends a
/// heartbeat or leave to the socket of its device's [`owner`]. The kernel
/// runs it on the UDP payload and delivers to the socket of that index in
/// the group (the order the sockets were bound). Anything else, or a frame
/// it cannot read quickly (a long length prefix, a short packet), returns
/// an out-of-range index and the kernel falls back to its hash by source.
/// Either way [`route`] still decides in user space, so the program only
/// saves hand-overs; it cannot misplace a device.
pub fn steering_program(shards: usize) -> Vec<BpfInsn> {
    let insn = |code, jt, jf, k| BpfInsn { code, jt, jf, k };
    let mut p = vec![
        insn(op::LD_LEN, 0, 0, 0),
        insn(op::JGE_K, 1, 0, 3),
        insn(op::RET_K, 0, 0, NO_OWNER),
        insn(op::LD_B_ABS, 0, 0, 0),
        insn(op::JEQ_K, 1, 0, u32::from(wire::VERSION)),
        insn(op::RET_K, 0, 0, NO_OWNER),
        insn(op::LD_B_ABS, 0, 0, 1),
        insn(op::JGT_K, 0, 1, 1), // kind 0 (heartbeat) or 1 (leave) only
        insn(op::RET_K, 0, 0, NO_OWNER),
        insn(op::LD_B_ABS, 0, 0, 2), // id length, one byte if below 0x80
        insn(op::JGT_K, 0, 1, wire::MAX_ID_LEN as u32),
        insn(op::RET_K, 0, 0, NO_OWNER),
        insn(op::ST, 0, 0, 0), // M[0] = id length
        insn(op::TAX, 0, 0, 0),
        insn(op::LD_LEN, 0, 0, 0),
        insn(op::SUB_K, 0, 0, 3),
        insn(op::JGE_X, 1, 0, 0), // the whole id is in the packet
        insn(op::RET_K, 0, 0, NO_OWNER),
        insn(op::LD_IMM, 0, 0, FNV_OFFSET),
        insn(op::ST, 0, 0, 1), // M[1] = hash
    ];
    // One unrolled step per id byte; a step past the id's length jumps to the end.
    const STEP: usize = 9;
    let first = p.len();
    let done = first + STEP * wire::MAX_ID_LEN;
    for k in 0..wire::MAX_ID_LEN {
        let at = first + STEP * k;
        p.extend([
            insn(op::LD_MEM, 0, 0, 0),
            insn(op::JGT_K, 1, 0, k as u32),
            insn(op::JA, 0, 0, (done - (at + 3)) as u32),
            insn(op::LD_B_ABS, 0, 0, 3 + k as u32),
            insn(op::TAX, 0, 0, 0),
            insn(op::LD_MEM, 0, 0, 1),
            insn(op::XOR_X, 0, 0, 0),
            insn(op::MUL_K, 0, 0, FNV_PRIME),
            insn(op::ST, 0, 0, 1),
        ]);
    }
    p.extend([
        insn(op::LD_MEM, 0, 0, 1),
        insn(op::MOD_K, 0, 0, u32::try_from(shards.max(1)).unwrap_or(u32::MAX)),
        insn(op::RET_A, 0, 0, 0),
    ]);
    p
}

/// Where `datagram` goes among `shards`.
///
/// Heartbeats and leaves in their usual form are routed from a glance at
/// their id bytes; everything else is decoded in full, so any datagram the
/// engine would accept as naming a device reaches that device's owner.
///
/// With one shard everything is shard 0's, but a summary is still routed as
/// [`Route::Summary`], so the server passes its own counts (lost events) in.
pub fn route(datagram: &[u8], shards: usize) -> Route {
    if shards <= 1 {
        // Heartbeats and leaves, the bulk, skip the decoding.
        let summary = !matches!(datagram, [wire::VERSION, 0 | 1, ..])
            && matches!(wire::decode(datagram), Ok(Message::Query(query)) if query.kind == QueryKind::Summary);
        return if summary { Route::Summary } else { Route::Shard(0) };
    }
    // Version, kind 0 (heartbeat) or 1 (leave), then the id with a one-byte length.
    if let [wire::VERSION, 0 | 1, len, rest @ ..] = datagram {
        let len = usize::from(*len);
        if len < 0x80
            && let Some(id) = rest.get(..len)
        {
            return Route::Shard(owner(id, shards));
        }
    }
    match wire::decode(datagram) {
        Ok(Message::Heartbeat(hb)) => Route::Shard(owner(hb.device.as_bytes(), shards)),
        Ok(Message::Leave(leave)) => Route::Shard(owner(leave.device.as_bytes(), shards)),
        Ok(Message::Query(query)) => match query.kind {
            QueryKind::Device(id) => Route::Shard(owner(id.as_bytes(), shards)),
            QueryKind::Summary => Route::Summary,
            QueryKind::List { after: Some(cursor), .. } => match parse_cursor(cursor) {
                Some((shard, _)) if shard < shards => Route::Shard(shard),
                _ => Route::Local,
            },
            QueryKind::List { after: None, .. } => Route::Shard(0),
        },
        _ => Route::Local,
    }
}

/// A listing cursor: the shard and the slot to continue from, as
/// `"shard.slot"` in decimal. Clients treat it as opaque.
pub fn format_cursor(shard: usize, slot: usize) -> String {
    format!("{shard}.{slot}")
}

/// The length of [`format_cursor`]`(shard, slot)`, without formatting it.
pub fn cursor_len(shard: usize, slot: usize) -> usize {
    let digits = |n: usize| n.checked_ilog10().map_or(1, |d| d as usize + 1);
    digits(shard) + 1 + digits(slot)
}

/// Reads a cursor written by [`format_cursor`].
pub fn parse_cursor(cursor: &str) -> Option<(usize, usize)> {
    let (shard, slot) = cursor.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(shard) || !digits(slot) {
        return None;
    }
    Some((shard.parse().ok()?, slot.parse().ok()?))
}

#[cfg(test)]
mod tests;
