use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    crate::hex::decode(s).unwrap()
}

fn encoded(message: &Message<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let len = encode(message, &mut buf).expect("encodes");
    buf[..len].to_vec()
}

/// The device record used by the status vectors (PROTOCOL.md, "Test vectors").
fn vector_info() -> DeviceInfo<'static> {
    DeviceInfo {
        device: "d1",
        online: true,
        addr: Addr::V4([127, 0, 0, 1], 5000),
        numbers: DeviceNumbers {
            last_seen_ago_ms: 10,
            last_seen_unix_ms: 1_700_000_000_000,
            expires_in_ms: 20_000,
            ttl_ms: 30_000,
            interval_ms: 10_000,
            boot: 7,
            seq: 8,
            heartbeats: 8,
            flaps: 0,
            version: 1,
        },
        payload: b"ok",
        offline_reason: 0,
    }
}

/// Checks one test vector both ways: the encoder produces exactly these
/// bytes and the decoder turns them back into the same message.
fn check_vector(message: Message<'_>, vector: &str) {
    assert!(PROTOCOL_MD.contains(vector), "PROTOCOL.md lacks the vector {vector}");
    let bytes = hex(vector);
    assert_eq!(hex_string(&encoded(&message)), vector, "encoding of {message:?}");
    assert_eq!(decode(&bytes), Ok(message));
}

/// The specification, whose test vectors must be the ones checked here.
const PROTOCOL_MD: &str = include_str!("../../PROTOCOL.md");

fn hex_string(bytes: &[u8]) -> String {
    crate::hex::encode(bytes)
}

// These hex strings are the ones in PROTOCOL.md. They were derived from the
// byte-level description there (by an independent varint encoder), not by
// running this crate's encoder.
#[test]
fn test_vectors() {
    check_vector(
        Message::Heartbeat(Heartbeat::new("sensor-00042", 1000, 1, 10_000)),
        "01000c73656e736f722d3030303432e80701904e000000",
    );
    check_vector(
        Message::Heartbeat(Heartbeat {
            flags: FLAG_ACK,
            payload: &[0x5a],
            ..Heartbeat::new("d1", 0x1234_5678, 300, 0)
        }),
        "0100026431f8acd19101ac020001015a00",
    );
    check_vector(Message::Leave(Leave { device: "d1", boot: 7, seq: 8, tag: None }), "0101026431070800");
    check_vector(
        Message::Query(Query { request: 1, kind: QueryKind::Device("d1"), padding: &[], tag: None }),
        "010201000264310000",
    );
    check_vector(
        Message::Query(Query { request: 42, kind: QueryKind::Summary, padding: &[], tag: None }),
        "01022a010000",
    );
    check_vector(
        Message::Query(Query {
            request: 2,
            kind: QueryKind::List {
                after: Some("d1"),
                limit: 10,
                filter: ListFilter { state: LIST_ALL, prefix: Some("d"), count_only: false },
            },
            padding: &[0; 3],
            tag: None,
        }),
        "01020202010264310a02010164000300000000",
    );
    check_vector(Message::Status(Status { request: 3, body: StatusBody::UnknownDevice }), "01030301");
    let mut counter_buf = [0u8; 16];
    let mut counters = RecordWriter::new(&mut counter_buf);
    counters.push(&Counter { code: 5, count: 2 }).unwrap();
    check_vector(
        Message::Status(Status {
            request: 42,
            body: StatusBody::Summary(Summary {
                counts: SummaryCounts {
                    online: 1,
                    known: 2,
                    uptime_ms: 1000,
                    heartbeats: 3,
                    leaves: 0,
                    queries: 1,
                    expirations: 0,
                    late: 1,
                    held: 0,
                    degraded: 0,
                },
                counters: counters.finish(),
            }),
        }),
        "01032a020102e80703000100010000020502",
    );
    check_vector(
        Message::Status(Status { request: 4, body: StatusBody::Device(vector_info()) }),
        "0103040002643101007f00000188270a80d095ffbc31a09c01b0ea01904e0708080001026f6b00",
    );
    let mut entry_buf = [0u8; 128];
    let mut entries = RecordWriter::new(&mut entry_buf);
    entries.push(&vector_info()).unwrap();
    check_vector(
        Message::Status(Status {
            request: 9,
            body: StatusBody::Page(Page { next_cursor: None, matched: 1, entries: entries.finish() }),
        }),
        "0103090300012302643101007f00000188270a80d095ffbc31a09c01b0ea01904e0708080001026f6b00",
    );
    check_vector(
        Message::Ack(Ack { boot: 7, seq: 8, interval_ms: 10_000, ttl_ms: 30_000 }),
        "01040708904eb0ea01",
    );
    check_vector(
        Message::Error(ErrorReply { code: ErrorCode::UnsupportedVersion, supported_version: 1 }),
        "01050001",
    );
    check_vector(
        Message::Error(ErrorReply {
            code: ErrorCode::RequestTooSmall { needed: 1200 },
            supported_version: 1,
        }),
        "010502b00901",
    );
}

#[test]
fn heartbeat_with_12_byte_id_is_at_most_33_bytes_unsigned_and_41_signed() {
    let hb = Heartbeat { flags: KNOWN_FLAGS, ..Heartbeat::new("abcdefghijkl", u32::MAX, u32::MAX, u32::MAX) };
    assert_eq!(encoded(&Message::Heartbeat(hb)).len(), 33);
    // Signed: one more byte for the tag's presence and 8 for the tag.
    let signed = Heartbeat { tag: Some([0; 8]), ..hb };
    assert_eq!(encoded(&Message::Heartbeat(signed)).len(), 41);
}

#[test]
fn each_decode_error_has_its_reason() {
    let good = hex("0101026431070800"); // a Leave
    assert_eq!(decode(&[]), Err(Error::Truncated));
    assert_eq!(decode(&good[..good.len() - 1]), Err(Error::Truncated));
    assert_eq!(decode(&good[..1]), Err(Error::Truncated));
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(decode(&trailing), Err(Error::TrailingBytes));
    let mut v2 = good.clone();
    v2[0] = 2;
    assert_eq!(decode(&v2), Err(Error::UnsupportedVersion(2)));
    let mut kind = good.clone();
    kind[1] = 6;
    assert_eq!(decode(&kind), Err(Error::UnknownKind));
    kind[1] = 0x80; // 80 02: the varint 256
    assert_eq!(decode(&kind), Err(Error::UnknownKind));
    assert_eq!(decode(&[0u8; MAX_DATAGRAM + 1]), Err(Error::Oversized));
    // Empty id, and an id of 65 bytes.
    assert_eq!(decode(&hex("010100070800")), Err(Error::BadDeviceId));
    let mut long = vec![1, 1, 65];
    long.extend([b'a'; 65]);
    long.extend([7, 8, 0]);
    assert_eq!(decode(&long), Err(Error::BadDeviceId));
    // Invalid UTF-8 in the id.
    assert_eq!(decode(&hex("010102ffff0708")), Err(Error::Malformed));
    // A payload of 65 bytes.
    let mut hb = vec![1, 0, 1, b'd', 1, 1, 0, 0, 65];
    hb.extend([0u8; 65 + 1]);
    assert_eq!(decode(&hb), Err(Error::PayloadTooLong));
    // A bad nested enum tag (QueryKind 3).
    assert_eq!(decode(&hex("01020103")), Err(Error::Malformed));
    // A page whose record is cut short inside its byte string.
    assert_eq!(decode(&hex("010309030000020264")), Err(Error::Malformed));
}

/// Issue 8, item 13: the kind is a varint, and decoders accept
/// non-minimal varints, so `01 80 00 ...` is a heartbeat.
#[test]
fn a_non_minimal_kind_varint_is_accepted_like_any_varint() {
    let minimal = hex("01000c73656e736f722d3030303432e80701904e000000"); // vector 1
    let mut non_minimal = vec![0x01, 0x80, 0x00];
    non_minimal.extend_from_slice(&minimal[2..]);
    assert_eq!(decode(&non_minimal), decode(&minimal));
    assert!(matches!(decode(&non_minimal), Ok(Message::Heartbeat(_))));
    // Leave, vector 3, with its kind 1 as the five-byte varint 81 80 80 80 00.
    assert_eq!(
        decode(&hex("0181808080000264310708 00".replace(' ', "").as_str())),
        decode(&hex("0101026431070800"))
    );
    assert_eq!(decode(&hex("0186000264310708")), Err(Error::UnknownKind), "86 00 is 6");
    assert_eq!(decode(&hex("01ffffffff0f")), Err(Error::UnknownKind));
    assert_eq!(decode(&hex("01ffffffffff")), Err(Error::Malformed), "a varint too long for a u32");
    assert_eq!(decode(&hex("0180")), Err(Error::Truncated));
}

/// Issue 8, item 8: ids with control characters (C0, DEL, C1) are refused
/// by the decoder (the fast path included) and by the encoder.
#[test]
fn ids_with_control_characters_are_refused() {
    for id in ["a\nb", "\u{1b}[2J", "tab\t", "\u{0}", "del\u{7f}", "c1\u{9b}31m"] {
        let mut frame = vec![1, 0, id.len() as u8];
        frame.extend_from_slice(id.as_bytes());
        frame.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        assert_eq!(decode(&frame), Err(Error::IdControlChar), "{id:?}");
        assert_eq!(decode_heartbeat_ascii(&frame), None, "{id:?}");
        let hb = Heartbeat::new(id, 1, 1, 0);
        assert_eq!(encode(&Message::Heartbeat(hb), &mut [0u8; 64]), Err(Error::IdControlChar), "{id:?}");
        let query = Query { request: 1, kind: QueryKind::Device(id), padding: &[], tag: None };
        assert_eq!(encode(&Message::Query(query), &mut [0u8; 64]), Err(Error::IdControlChar), "{id:?}");
    }
    assert_eq!(DropReason::from(Error::IdControlChar).name(), "id_control_char");
}

#[test]
fn encode_refuses_what_decode_would_drop() {
    let mut buf = [0u8; 64];
    let hb = |device, payload| {
        Message::Heartbeat(Heartbeat {
            device,
            boot: 1,
            seq: 1,
            interval_ms: 0,
            flags: 0,
            payload,
            tag: None,
        })
    };
    assert_eq!(encode(&hb("", &[]), &mut buf), Err(Error::BadDeviceId));
    assert_eq!(encode(&hb("d", &[0; MAX_PAYLOAD_LEN + 1]), &mut buf), Err(Error::PayloadTooLong));
    assert_eq!(encode(&hb("d", &[]), &mut buf[..4]), Err(Error::BufferTooSmall));
    assert_eq!(encode(&hb("d", &[]), &mut []), Err(Error::BufferTooSmall));
}

#[test]
fn drop_reason_codes_round_trip() {
    for reason in DropReason::ALL {
        assert_eq!(DropReason::from_code(reason.code()), Some(reason));
    }
    assert_eq!(DropReason::from_code(0), None);
}

// ---- property tests ----

fn id() -> impl Strategy<Value = String> {
    // Ids of 1..=64 bytes, including multi-byte UTF-8.
    "[a-z0-9é☃-]{1,16}".prop_filter("id length", |s| !s.is_empty() && s.len() <= MAX_ID_LEN)
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD_LEN)
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| Addr::V4(ip, p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| Addr::V6(ip, p)),
    ]
}

/// Owned parts of a [`DeviceInfo`], so strategies can produce them.
#[derive(Debug, Clone)]
struct OwnedInfo {
    device: String,
    payload: Vec<u8>,
    online: bool,
    addr: Addr,
    numbers: (u64, u64, u64, u32, u32, u32, u32, u64, u32),
}

impl OwnedInfo {
    fn borrow(&self) -> DeviceInfo<'_> {
        let (ago, unix, expires, ttl, interval, boot, seq, heartbeats, flaps) = self.numbers;
        DeviceInfo {
            device: &self.device,
            online: self.online,
            addr: self.addr,
            numbers: DeviceNumbers {
                last_seen_ago_ms: ago,
                last_seen_unix_ms: unix,
                expires_in_ms: expires,
                ttl_ms: ttl,
                interval_ms: interval,
                boot,
                seq,
                heartbeats,
                flaps,
                version: flaps.wrapping_mul(2).wrapping_add(u32::from(self.online)),
            },
            payload: &self.payload,
            offline_reason: if self.online { 0 } else { (flaps % 3) as u8 },
        }
    }
}

fn info() -> impl Strategy<Value = OwnedInfo> {
    (id(), payload(), any::<bool>(), addr(), any::<(u64, u64, u64, u32, u32, u32, u32, u64, u32)>()).prop_map(
        |(device, payload, online, addr, numbers)| OwnedInfo { device, payload, online, addr, numbers },
    )
}

/// An owned message of any kind.
#[derive(Debug, Clone)]
enum Owned {
    Heartbeat(String, u32, u32, u32, u8, Vec<u8>),
    Leave(String, u32, u32),
    QueryDevice(u32, String),
    QuerySummary(u32),
    QueryList(u32, Option<String>, u16),
    StatusDevice(u32, OwnedInfo),
    StatusUnknown(u32),
    StatusSummary(u32, [u64; 10], Vec<(u16, u64)>),
    StatusPage(u32, Option<String>, Vec<OwnedInfo>),
    Ack(u32, u32, u32, u32),
    Error(u8),
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (id(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u8>(), payload())
            .prop_map(|(d, b, s, i, f, p)| Owned::Heartbeat(d, b, s, i, f, p)),
        (id(), any::<u32>(), any::<u32>()).prop_map(|(d, b, s)| Owned::Leave(d, b, s)),
        (any::<u32>(), id()).prop_map(|(r, d)| Owned::QueryDevice(r, d)),
        any::<u32>().prop_map(Owned::QuerySummary),
        (any::<u32>(), proptest::option::of(id()), any::<u16>())
            .prop_map(|(r, a, l)| Owned::QueryList(r, a, l)),
        (any::<u32>(), info()).prop_map(|(r, i)| Owned::StatusDevice(r, i)),
        any::<u32>().prop_map(Owned::StatusUnknown),
        (any::<u32>(), any::<[u64; 10]>(), proptest::collection::vec(any::<(u16, u64)>(), 0..10))
            .prop_map(|(r, n, c)| Owned::StatusSummary(r, n, c)),
        (any::<u32>(), proptest::option::of(id()), proptest::collection::vec(info(), 0..5))
            .prop_map(|(r, c, e)| Owned::StatusPage(r, c, e)),
        any::<(u32, u32, u32, u32)>().prop_map(|(b, s, i, t)| Owned::Ack(b, s, i, t)),
        any::<u8>().prop_map(Owned::Error),
    ]
}

/// Builds the borrowed message for `owned`, using `scratch` for records.
fn with_message<R>(owned: &Owned, tag: Option<Tag>, padding: &[u8], f: impl FnOnce(Message<'_>) -> R) -> R {
    let mut scratch = [0u8; 4096];
    let query_tag = tag.map(|tag| QueryTag { sent_unix_ms: u64::from_le_bytes(tag), tag });
    let message = match owned {
        Owned::Heartbeat(d, b, s, i, fl, p) => Message::Heartbeat(Heartbeat {
            device: d,
            boot: *b,
            seq: *s,
            interval_ms: *i,
            flags: *fl,
            payload: p,
            tag,
        }),
        Owned::Leave(d, b, s) => Message::Leave(Leave { device: d, boot: *b, seq: *s, tag }),
        Owned::QueryDevice(r, d) => {
            Message::Query(Query { request: *r, kind: QueryKind::Device(d), padding, tag: query_tag })
        }
        Owned::QuerySummary(r) => {
            Message::Query(Query { request: *r, kind: QueryKind::Summary, padding, tag: query_tag })
        }
        Owned::QueryList(r, a, l) => Message::Query(Query {
            request: *r,
            kind: QueryKind::List { after: a.as_deref(), limit: *l, filter: ListFilter::ONLINE },
            padding,
            tag: query_tag,
        }),
        Owned::StatusDevice(r, i) => {
            Message::Status(Status { request: *r, body: StatusBody::Device(i.borrow()) })
        }
        Owned::StatusUnknown(r) => Message::Status(Status { request: *r, body: StatusBody::UnknownDevice }),
        Owned::StatusSummary(r, n, c) => {
            let mut w = RecordWriter::new(&mut scratch);
            for &(code, count) in c {
                w.push(&Counter { code, count }).unwrap();
            }
            Message::Status(Status {
                request: *r,
                body: StatusBody::Summary(Summary {
                    counts: SummaryCounts {
                        online: n[0],
                        known: n[1],
                        uptime_ms: n[2],
                        heartbeats: n[3],
                        leaves: n[4],
                        queries: n[5],
                        expirations: n[6],
                        late: n[7],
                        held: n[8],
                        degraded: n[9],
                    },
                    counters: w.finish(),
                }),
            })
        }
        Owned::StatusPage(r, c, e) => {
            let mut w = RecordWriter::new(&mut scratch);
            for i in e {
                w.push(&i.borrow()).unwrap();
            }
            Message::Status(Status {
                request: *r,
                body: StatusBody::Page(Page {
                    next_cursor: c.as_deref(),
                    matched: e.len() as u64,
                    entries: w.finish(),
                }),
            })
        }
        Owned::Ack(b, s, i, t) => Message::Ack(Ack { boot: *b, seq: *s, interval_ms: *i, ttl_ms: *t }),
        Owned::Error(v) => {
            Message::Error(ErrorReply { code: ErrorCode::UnsupportedVersion, supported_version: *v })
        }
    };
    f(message)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_message_kind_round_trips(
        owned in owned(),
        tag in proptest::option::of(any::<Tag>()),
        padding in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        with_message(&owned, tag, &padding, |message| {
            let bytes = encoded(&message);
            prop_assert!(bytes.len() <= MAX_DATAGRAM);
            prop_assert_eq!(bytes[0], VERSION);
            prop_assert_eq!(decode(&bytes), Ok(message));
            if let Message::Status(Status { body: StatusBody::Page(page), .. }) = decode(&bytes).unwrap() {
                let infos: Vec<_> = page.entries.iter().collect::<Result<_, _>>().unwrap();
                let Owned::StatusPage(_, _, expected) = &owned else { unreachable!() };
                prop_assert_eq!(infos, expected.iter().map(OwnedInfo::borrow).collect::<Vec<_>>());
            }
            // Every strict prefix is refused; it never decodes to something else.
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
            Ok(())
        })?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        let _ = decode(&bytes);
    }

    /// The device's ack decoder agrees with the general one on every ack,
    /// and on every error it reports; frames of other kinds it leaves alone.
    #[test]
    fn decode_ack_agrees_with_decode(
        kind in prop_oneof![Just(4u8), 0u8..8, Just(0x84)],
        body in proptest::collection::vec(any::<u8>(), 0..24),
        extra in proptest::option::of(any::<u8>()),
    ) {
        let mut bytes = vec![VERSION, kind];
        if kind == 0x84 {
            bytes.push(0); // the kind 4 as a non-minimal varint
        }
        bytes.extend(body);
        bytes.extend(extra);
        match (decode_ack(&bytes), decode(&bytes)) {
            (Ok(Some(ack)), general) => prop_assert_eq!(general, Ok(Message::Ack(ack))),
            (Ok(None), general) => prop_assert!(!matches!(general, Ok(Message::Ack(_)))),
            (Err(e), general) => prop_assert_eq!(general, Err(e)),
        }
        if let Ok(Message::Ack(ack)) = decode(&bytes) {
            prop_assert_eq!(decode_ack(&bytes), Ok(Some(ack)));
        }
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        kind in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![VERSION, kind];
        bytes.extend(body);
        if let Ok(message) = decode(&bytes) {
            // Whatever decodes must be valid and re-encode to at most as many bytes
            // (postcard tolerates non-canonical varints on input).
            prop_assert!(message.validate().is_ok());
            prop_assert!(encoded(&message).len() <= bytes.len());
        }
    }
}

/// Mutates a valid heartbeat at a few positions.
fn mutated_heartbeat() -> impl Strategy<Value = Vec<u8>> {
    (
        id(),
        any::<(u32, u32, u32, u8)>(),
        payload(),
        proptest::option::of(any::<Tag>()),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        proptest::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(device, (boot, seq, interval_ms, flags), payload, tag, edits, cut)| {
            let hb =
                Heartbeat { device: device.as_str(), boot, seq, interval_ms, flags, payload: &payload, tag };
            let mut bytes = encoded(&Message::Heartbeat(hb));
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    /// The heartbeat fast path accepts only what the general decoder
    /// accepts, and decodes it to the same message.
    #[test]
    fn fast_heartbeat_path_agrees_with_the_general_decoder(
        bytes in prop_oneof![mutated_heartbeat(), proptest::collection::vec(any::<u8>(), 0..160)],
    ) {
        if bytes.len() >= 2 && bytes[0] == VERSION {
            if let Some(fast) = decode_heartbeat_fast(&bytes[1..]) {
                prop_assert_eq!(decode_general(&bytes), Ok(Message::Heartbeat(fast)));
            }
            // The server's ASCII path agrees with decode() wherever it answers.
            if let Some(raw) = decode_heartbeat_ascii(&bytes) {
                let Ok(Message::Heartbeat(hb)) = decode(&bytes) else {
                    return Err(TestCaseError::fail("the ASCII path took what decode refuses"));
                };
                prop_assert_eq!(raw, RawHeartbeat::from(hb));
            }
            // And decode() as a whole still matches the general decoder, errors included.
            if bytes[1] < 6 && bytes.len() <= MAX_DATAGRAM {
                prop_assert_eq!(decode(&bytes), decode_general(&bytes));
            }
        }
    }
}

#[test]
fn fast_path_takes_ordinary_heartbeats() {
    // A non-ASCII (but valid UTF-8) id is left to decode().
    let mut buf = [0u8; 64];
    let hb = Heartbeat::new("capteur-é", 1, 1, 0);
    let len = encode(&Message::Heartbeat(hb), &mut buf).unwrap();
    assert_eq!(decode_heartbeat_ascii(&buf[..len]), None);
    assert_eq!(decode(&buf[..len]), Ok(Message::Heartbeat(hb)));
    for vector in [
        "01000c73656e736f722d3030303432e80701904e000000",
        "0100026431f8acd19101ac020001015a00",
        "01000c73656e736f722d3030303432e80701904e000001b76cdf5164e19cdf",
    ] {
        assert!(decode_heartbeat_fast(&hex(vector)[1..]).is_some(), "{vector}");
        assert!(decode_heartbeat_ascii(&hex(vector)).is_some(), "{vector}");
    }
}
