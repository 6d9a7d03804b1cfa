//! Device ids as broker names: one NATS subject token or KV key, one MQTT
//! topic level. Ids may hold anything printable (`.`, `*`, `>`, `/`, `+`,
//! `#`, spaces, non-ASCII); brokers give some of those a meaning. The rule,
//! reversible: ASCII letters, digits, `-` and `_` stay as they are; every
//! other byte of the id's UTF-8 becomes `=` and two uppercase hex digits.
//! So `boiler.7` is `boiler=2E7`, and `=` itself is `=3D`.

/// `id` as a broker-safe name (see the module docs).
pub fn encode(id: &str) -> String {
    let mut name = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("={byte:02X}"));
        }
    }
    name
}

/// The id a name stands for, if it is one [`encode`] could have made.
pub fn decode(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'=' {
            let hex = tail.get(..2)?;
            if !hex.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)) {
                return None;
            }
            bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            rest = &tail[2..];
        } else if first.is_ascii_alphanumeric() || first == b'-' || first == b'_' {
            bytes.push(first);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unsafe_characters_are_escaped() {
        assert_eq!(encode("boiler-7"), "boiler-7");
        assert_eq!(encode("boiler.7"), "boiler=2E7");
        assert_eq!(encode("a/b+c#d*e>f g=h"), "a=2Fb=2Bc=23d=2Ae=3Ef=20g=3Dh");
        assert_eq!(encode("café"), "caf=C3=A9");
        assert_eq!(decode("boiler=2E7").as_deref(), Some("boiler.7"));
        assert_eq!(decode("bad=2"), None);
        assert_eq!(decode("bad.dot"), None);
        assert_eq!(decode("=e9"), None, "lowercase hex is never made");
    }

    proptest! {
        #[test]
        fn names_round_trip_and_are_safe(id in "\\PC{1,40}") {
            let name = encode(&id);
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'='));
            prop_assert_eq!(decode(&name), Some(id));
        }
    }
}
