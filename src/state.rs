//! The state file: what `--state PATH` writes so that a restarted server
//! takes up where it stopped. Pure: this module turns devices into bytes and
//! bytes back into devices; reading and writing files is the server's
//! (`server::state`), and putting devices back into engines is
//! [`Tracker::restore_sharded`](crate::tracker::Tracker::restore_sharded).
//!
//! Layout (all integers little-endian; PROTOCOL.md, "The state file"):
//!
//! ```text
//! header  16 bytes: "PRESENCE" | format version u32 (= 1) | 0u32
//! records          one postcard-encoded `Record` per held device, back to back
//! footer  64 bytes: records u64 | event_seq u64 | written (Unix µs) u64 |
//!                   clean u8 | 7 zero bytes | BLAKE3 of everything before it (32 bytes)
//! ```
//!
//! Records are self-delimiting, so a snapshot can be written in chunks taken
//! from several shards in any order. Times in records are wall-clock Unix
//! microseconds: the monotonic clock of one process means nothing to the next.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"PRESENCE";
/// The format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Bytes before the records.
pub const HEADER_LEN: usize = 16;
/// Bytes after the records.
pub const FOOTER_LEN: usize = 64;

/// Record flag: the device is online.
const ONLINE: u8 = 1;
/// Record flag: it went offline by leaving.
const LEFT: u8 = 2;
/// Record flag: it has sent signed frames.
const SIGNED: u8 = 4;
/// Record flag: it is late (suspect).
const LATE: u8 = 8;

/// One held device as the file stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<'a> {
    /// The device id.
    pub id: &'a str,
    /// [`ONLINE`], [`LEFT`] and [`SIGNED`].
    flags: u8,
    /// The newest boot epoch seen.
    pub boot: u32,
    /// The highest seq seen in that boot.
    pub top: u32,
    /// Which seqs below `top` were seen (bit i: `top - i`), as 8 raw bytes.
    seen: [u8; 8],
    /// When its last heartbeat arrived, wall clock, Unix microseconds.
    pub last_seen_unix_us: u64,
    /// The TTL applied at that heartbeat, in milliseconds.
    pub ttl_ms: u32,
    /// The interval it declared then, in milliseconds (0 = none).
    pub interval_ms: u32,
    /// Heartbeats accepted from it.
    pub heartbeats: u32,
    /// Its version: transitions so far.
    pub version: u32,
    /// Source address of its last heartbeat.
    pub addr: SocketAddr,
    /// Payload of its last heartbeat.
    pub payload: &'a [u8],
    /// Its flap history, if its state changed within the flap window.
    pub flap: Option<FlapRecord>,
}

/// A device's recent state changes, for flap damping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlapRecord {
    /// When its state changed (wall clock, Unix µs), oldest first.
    pub changes: Vec<u64>,
    /// Whether it is flapping (its events held back).
    pub flapping: bool,
}

impl<'a> Record<'a> {
    /// A record from the fields the table keeps.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &'a str,
        (online, left, signed): (bool, bool, bool),
        (boot, top, seen): (u32, u32, u64),
        last_seen_unix_us: u64,
        (ttl_ms, interval_ms): (u32, u32),
        heartbeats: u32,
        version: u32,
        addr: SocketAddr,
        payload: &'a [u8],
    ) -> Self {
        let flag = |on: bool, flag: u8| if on { flag } else { 0 };
        let flags = flag(online, ONLINE) | flag(left, LEFT) | flag(signed, SIGNED);
        Record {
            id,
            flags,
            boot,
            top,
            seen: seen.to_le_bytes(),
            last_seen_unix_us,
            ttl_ms,
            interval_ms,
            heartbeats,
            version,
            addr,
            payload,
            flap: None,
        }
    }

    /// Whether it was online.
    pub fn online(&self) -> bool {
        self.flags & ONLINE != 0
    }

    /// Whether it went offline by leaving.
    pub fn left(&self) -> bool {
        self.flags & LEFT != 0
    }

    /// Whether it had sent signed frames.
    pub fn signed(&self) -> bool {
        self.flags & SIGNED != 0
    }

    /// Whether it was late (suspect).
    pub fn late(&self) -> bool {
        self.flags & LATE != 0
    }

    /// Marks it late (suspect).
    pub fn set_late(&mut self, late: bool) {
        self.flags = if late { self.flags | LATE } else { self.flags & !LATE };
    }

    /// The replay window's bitmap (bit i: `top - i` seen).
    pub fn seen(&self) -> u64 {
        u64::from_le_bytes(self.seen)
    }
}

/// Records encoded back to back: one piece of a snapshot, as a shard's loop
/// hands it to the writer.
#[derive(Debug, Default, Clone)]
pub struct Chunk {
    /// The encoded records.
    pub bytes: Vec<u8>,
    /// How many records `bytes` holds.
    pub records: u64,
}

impl Chunk {
    /// Appends one record.
    pub fn push(&mut self, record: &Record<'_>) {
        // Encoding into a Vec fails only if serde reports an error, which
        // these field types never do.
        if let Ok(bytes) = postcard::to_extend(record, std::mem::take(&mut self.bytes)) {
            self.bytes = bytes;
            self.records += 1;
        }
    }

    /// Empties it for reuse.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records = 0;
    }
}

/// Builds a state file as it is written: the header, then chunks in any
/// order, then the footer that counts and checksums them.
#[derive(Debug, Default)]
pub struct Encoder {
    /// Hashes every byte written so far.
    hasher: blake3::Hasher,
    /// Records written so far.
    records: u64,
}

impl Encoder {
    /// A new file: returns the encoder and the header to write first.
    pub fn start() -> (Self, [u8; HEADER_LEN]) {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        let mut encoder = Encoder::default();
        encoder.hasher.update(&header);
        (encoder, header)
    }

    /// Accounts for `chunk`, which the caller writes after what came before.
    pub fn add(&mut self, chunk: &Chunk) {
        self.hasher.update(&chunk.bytes);
        self.records += chunk.records;
    }

    /// Records accounted for so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The footer to write last. `event_seq` is the last event sequence
    /// number given out; `clean` says the server was stopping (no event
    /// came after this snapshot).
    pub fn finish(mut self, event_seq: u64, written: SystemTime, clean: bool) -> [u8; FOOTER_LEN] {
        let mut footer = [0u8; FOOTER_LEN];
        footer[..8].copy_from_slice(&self.records.to_le_bytes());
        footer[8..16].copy_from_slice(&event_seq.to_le_bytes());
        footer[16..24].copy_from_slice(&unix_micros(written).to_le_bytes());
        footer[24] = u8::from(clean);
        self.hasher.update(&footer[..32]);
        footer[32..].copy_from_slice(self.hasher.finalize().as_bytes());
        footer
    }
}

/// Why a state file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Shorter than a header and a footer.
    #[error("truncated: {len} bytes, less than an empty state file")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// It does not start with [`MAGIC`].
    #[error("not a presence state file")]
    NotAStateFile,
    /// A format this build does not read.
    #[error("state file format {found}; this build reads format {FORMAT}")]
    WrongFormat {
        /// The format it declares.
        found: u32,
    },
    /// The checksum does not match: truncated, cut short or damaged.
    #[error("checksum mismatch: the file is damaged or was cut short")]
    Checksum,
    /// The checksum matched but the records do not parse as the footer says.
    #[error("record {index} of {records} does not decode")]
    BadRecord {
        /// Which record.
        index: u64,
        /// How many the footer announced.
        records: u64,
    },
}

/// A state file that passed its checks, borrowed from its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The encoded records.
    body: &'a [u8],
    /// How many records the body holds.
    pub records: u64,
    /// The last event sequence number given out before it was taken.
    pub event_seq: u64,
    /// When it was written (wall clock).
    pub written: SystemTime,
    /// Whether it was written by a server that was stopping.
    pub clean: bool,
}

impl<'a> Snapshot<'a> {
    /// Checks a whole file: magic, format, checksum, and that the records
    /// decode to exactly the count the footer gives.
    pub fn read(bytes: &'a [u8]) -> Result<Self, StateError> {
        if bytes.len() < HEADER_LEN + FOOTER_LEN {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                return Err(StateError::NotAStateFile);
            }
            return Err(StateError::Truncated { len: bytes.len() });
        }
        if bytes[..8] != MAGIC {
            return Err(StateError::NotAStateFile);
        }
        let found = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if found != FORMAT {
            return Err(StateError::WrongFormat { found });
        }
        let (signed, checksum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(signed).as_bytes() != checksum {
            return Err(StateError::Checksum);
        }
        let footer = &bytes[bytes.len() - FOOTER_LEN..];
        let word = |at: usize| u64::from_le_bytes(footer[at..at + 8].try_into().unwrap_or_default());
        let snapshot = Snapshot {
            body: &bytes[HEADER_LEN..bytes.len() - FOOTER_LEN],
            records: word(0),
            event_seq: word(8),
            written: UNIX_EPOCH + Duration::from_micros(word(16)),
            clean: footer[24] == 1,
        };
        let mut count = 0;
        for record in snapshot.devices() {
            record?;
            count += 1;
        }
        if count != snapshot.records {
            return Err(StateError::BadRecord { index: count, records: snapshot.records });
        }
        Ok(snapshot)
    }

    /// The records, in file order. After [`Snapshot::read`] accepted the
    /// file, every item is `Ok`.
    pub fn devices(&self) -> impl Iterator<Item = Result<Record<'a>, StateError>> + 'a {
        let mut rest = self.body;
        let (mut index, records) = (0u64, self.records);
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            match postcard::take_from_bytes::<Record<'a>>(rest) {
                Ok((record, after)) if index < records && !record.id.is_empty() => {
                    rest = after;
                    index += 1;
                    Some(Ok(record))
                }
                _ => {
                    rest = &[];
                    Some(Err(StateError::BadRecord { index, records }))
                }
            }
        })
    }
}

/// Microseconds since the Unix epoch (0 before it, saturating).
pub fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_micros())))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record<'_> {
        Record::new(
            id,
            (true, false, true),
            (7, 1000, u64::MAX),
            1_800_000_000_000_000,
            (3000, 1000),
            42,
            3,
            "10.0.0.7:4000".parse().unwrap(),
            b"bat=97",
        )
    }

    fn file(ids: &[&str]) -> Vec<u8> {
        let (mut encoder, header) = Encoder::start();
        let mut bytes = header.to_vec();
        let mut chunk = Chunk::default();
        for id in ids {
            chunk.push(&record(id));
        }
        encoder.add(&chunk);
        bytes.extend_from_slice(&chunk.bytes);
        bytes.extend_from_slice(&encoder.finish(99, UNIX_EPOCH + Duration::from_secs(1_800_000_000), true));
        bytes
    }

    #[test]
    fn a_file_reads_back_as_written() {
        let bytes = file(&["sensor-1", "sensor-2"]);
        let snapshot = Snapshot::read(&bytes).unwrap();
        assert_eq!((snapshot.records, snapshot.event_seq, snapshot.clean), (2, 99, true));
        assert_eq!(snapshot.written, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let devices: Vec<_> = snapshot.devices().map(Result::unwrap).collect();
        assert_eq!(devices, [record("sensor-1"), record("sensor-2")]);
        assert!(devices[0].online() && devices[0].signed() && !devices[0].left());
        assert_eq!(devices[0].seen(), u64::MAX);
    }

    #[test]
    fn damage_of_any_kind_is_refused() {
        let bytes = file(&["sensor-1", "sensor-2"]);
        for cut in 0..bytes.len() {
            assert!(Snapshot::read(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(Snapshot::read(&flipped).is_err(), "flip at {at} accepted");
        }
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert_eq!(Snapshot::read(&newer).unwrap_err(), StateError::WrongFormat { found: 2 });
        assert_eq!(
            Snapshot::read(b"garbage that is long enough to look at").unwrap_err(),
            StateError::NotAStateFile
        );
        assert_eq!(Snapshot::read(&[]).unwrap_err(), StateError::Truncated { len: 0 });
    }

    #[test]
    fn an_empty_table_is_a_valid_file() {
        let snapshot = Snapshot::read(&file(&[])).map(|s| (s.records, s.devices().count())).unwrap();
        assert_eq!(snapshot, (0, 0));
    }

    /// The example records of PROTOCOL.md ("The state file"), byte for byte.
    #[test]
    fn a_record_is_encoded_as_protocol_md_says() {
        let v4 = Record::new(
            "sensor-1",
            (true, false, true),
            (7, 300, 0b1011),
            1_800_000_000_000_000,
            (3000, 1000),
            42,
            3,
            "10.0.0.7:4000".parse().unwrap(),
            b"hi",
        );
        let v6 = Record { addr: "[2001:db8::1]:4000".parse().unwrap(), ..v4.clone() };
        let flapping = Record {
            flap: Some(FlapRecord { changes: vec![1_800_000_000_000_000], flapping: true }),
            ..v4.clone()
        };
        let hex = |record: &Record<'_>| {
            let mut chunk = Chunk::default();
            chunk.push(record);
            chunk.bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
        };
        let common = concat!(
            "08 73 65 6e 73 6f 72 2d 31 05 07 ac 02 0b 00 00 00 00 00 00 00 ",
            "80 80 e2 c4 f2 a2 99 03 b8 17 e8 07 2a 03"
        );
        assert_eq!(hex(&v4), format!("{common} 00 0a 00 00 07 a0 1f 02 68 69 00"));
        assert_eq!(
            hex(&v6),
            format!("{common} 01 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 a0 1f 02 68 69 00")
        );
        assert_eq!(
            hex(&flapping),
            format!("{common} 00 0a 00 00 07 a0 1f 02 68 69 01 01 80 80 e2 c4 f2 a2 99 03 01")
        );
    }
}
