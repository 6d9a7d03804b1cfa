//! Hex, written once: keys, payloads and test vectors all go through here.

use std::fmt;

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Why a string is not hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HexError {
    /// An odd number of digits.
    OddLength,
    /// A character that is not a hex digit, at this byte offset.
    NotHex(usize),
}

impl fmt::Display for HexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HexError::OddLength => f.write_str("an odd number of hex digits"),
            HexError::NotHex(at) => write!(f, "not a hex digit at position {at}"),
        }
    }
}

impl std::error::Error for HexError {}

/// The bytes written in hex in `text` (either case). Every pair must be
/// hex: nothing is skipped.
pub fn decode(text: &str) -> Result<Vec<u8>, HexError> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return Err(HexError::OddLength);
    }
    let digit = |at: usize| -> Result<u8, HexError> {
        let value = match text[at] {
            c @ b'0'..=b'9' => c - b'0',
            c @ b'a'..=b'f' => c - b'a' + 10,
            c @ b'A'..=b'F' => c - b'A' + 10,
            _ => return Err(HexError::NotHex(at)),
        };
        Ok(value)
    };
    (0..text.len()).step_by(2).map(|at| Ok((digit(at)? << 4) | digit(at + 1)?)).collect()
}

/// Serializes bytes as a hex string (for JSON).
pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&bytes)), Ok(bytes));
        assert_eq!(encode(&[0x00, 0xff, 0x5a]), "00ff5a");
        assert_eq!(decode("00FF5a"), Ok(vec![0x00, 0xff, 0x5a]));
        assert_eq!(decode("abc"), Err(HexError::OddLength));
        assert_eq!(decode("0g"), Err(HexError::NotHex(1)));
        assert_eq!(decode("zz00"), Err(HexError::NotHex(0)), "a bad pair is an error, not skipped");
        assert_eq!(decode(""), Ok(vec![]));
    }
}
