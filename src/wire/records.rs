//! Lists inside replies as one byte string of concatenated postcard
//! records, walkable without an allocator.

use core::fmt;
use core::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Error;

/// A list of postcard records of `T`, stored as one byte string so it can be
/// borrowed from a datagram and walked without an allocator.
///
/// Build one with [`RecordWriter`]; read it with [`Records::iter`].
pub struct Records<'a, T> {
    /// The concatenated records.
    bytes: &'a [u8],
    /// The record type; no `T` is stored.
    _record: PhantomData<fn() -> T>,
}

impl<'a, T> Records<'a, T> {
    /// Wraps bytes that hold concatenated records. [`decode`](crate::wire::decode) checks that
    /// every record of a received frame is well formed.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        Records { bytes, _record: PhantomData }
    }

    /// The encoded records.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Decodes the records one by one.
    pub fn iter(&self) -> RecordIter<'a, T> {
        RecordIter { rest: self.bytes, _record: PhantomData }
    }
}

impl<T> Clone for Records<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Records<'_, T> {}
impl<T> PartialEq for Records<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}
impl<T> Eq for Records<'_, T> {}
impl<T> fmt::Debug for Records<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Records({} bytes)", self.bytes.len())
    }
}

impl<T> Serialize for Records<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.bytes)
    }
}

impl<'de: 'a, 'a, T> Deserialize<'de> for Records<'a, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(d).map(Records::from_bytes)
    }
}

/// Iterator over [`Records`]; yields an error and stops at the first bad record.
pub struct RecordIter<'a, T> {
    /// Bytes not yet decoded.
    rest: &'a [u8],
    /// The record type.
    _record: PhantomData<fn() -> T>,
}

impl<'a, T: Deserialize<'a>> Iterator for RecordIter<'a, T> {
    type Item = Result<T, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<T>(self.rest) {
            Ok((record, rest)) => {
                self.rest = rest;
                Some(Ok(record))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e.into()))
            }
        }
    }
}

/// Appends records of `T` to a caller's buffer, for building [`Records`].
pub struct RecordWriter<'b, T> {
    /// Where records are written.
    buf: &'b mut [u8],
    /// Bytes of `buf` used so far.
    len: usize,
    /// Records written so far.
    count: usize,
    /// The record type.
    _record: PhantomData<fn(T)>,
}

impl<'b, T: Serialize> RecordWriter<'b, T> {
    /// Starts an empty list in `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        RecordWriter { buf, len: 0, count: 0, _record: PhantomData }
    }

    /// Appends one record. On [`Error::BufferTooSmall`] nothing is appended.
    pub fn push(&mut self, record: &T) -> Result<(), Error> {
        let used = postcard::to_slice(record, &mut self.buf[self.len..])?.len();
        self.len += used;
        self.count += 1;
        Ok(())
    }

    /// Records written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The finished list, borrowing the buffer.
    pub fn finish<'r>(self) -> Records<'r, T>
    where
        'b: 'r,
    {
        Records::from_bytes(&self.buf[..self.len])
    }
}
