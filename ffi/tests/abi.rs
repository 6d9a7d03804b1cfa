//! The C ABI, called as C calls it: against the shared test vectors
//! (`tests/vectors.json` of the repository), and with arbitrary inputs,
//! NULL pointers and lengths past the limits, where every call must return
//! a length or a `PRESENCE_ERR_*` code and never panic or read past what it
//! was given.

use std::ptr;

use presence_ffi::*;
use proptest::prelude::*;
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("../../tests/vectors.json")).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn vector(number: u64, signed: bool) -> Value {
    vectors()["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["number"] == number && v["signed_with"].is_null() != signed)
        .cloned()
        .unwrap()
}

fn heartbeat(id: &[u8], payload: &[u8], message: &Value) -> presence_heartbeat {
    presence_heartbeat {
        id: id.as_ptr(),
        id_len: id.len(),
        boot: message["boot"].as_u64().unwrap() as u32,
        seq: message["seq"].as_u64().unwrap() as u32,
        interval_ms: message["interval_ms"].as_u64().unwrap() as u32,
        flags: message["flags"].as_u64().unwrap() as u8,
        payload: if payload.is_empty() { ptr::null() } else { payload.as_ptr() },
        payload_len: payload.len(),
    }
}

fn encode_heartbeat(hb: &presence_heartbeat, key: Option<&[u8]>) -> Result<Vec<u8>, i32> {
    let mut out = [0u8; PRESENCE_MAX_HEARTBEAT_LEN];
    let key = key.map_or(ptr::null(), <[u8]>::as_ptr);
    let len = unsafe { presence_encode_heartbeat(hb, key, out.as_mut_ptr(), out.len()) };
    if len < 0 { Err(len) } else { Ok(out[..len as usize].to_vec()) }
}

#[test]
fn heartbeats_and_leaves_encode_to_the_vectors_signed_or_not() {
    let device_key = unhex(vectors()["keys"]["device"]["key"].as_str().unwrap());
    for (number, signed) in [(1, false), (2, false), (13, true)] {
        let v = vector(number, signed);
        let message = &v["message"];
        let id = message["device"].as_str().unwrap().as_bytes();
        let payload = unhex(message["payload"].as_str().unwrap());
        let hb = heartbeat(id, &payload, message);
        let key = signed.then_some(device_key.as_slice());
        assert_eq!(encode_heartbeat(&hb, key), Ok(unhex(v["hex"].as_str().unwrap())), "vector {number}");
    }
    let v = vector(3, false);
    let mut out = [0u8; 64];
    let len =
        unsafe { presence_encode_leave(b"d1".as_ptr(), 2, 7, 8, ptr::null(), out.as_mut_ptr(), out.len()) };
    assert_eq!(out[..len as usize], unhex(v["hex"].as_str().unwrap()));
}

#[test]
fn acks_and_status_replies_decode_as_the_vectors_say() {
    let v = vector(11, false);
    let bytes = unhex(v["hex"].as_str().unwrap());
    let mut ack = presence_ack::default();
    assert_eq!(unsafe { presence_decode_ack(bytes.as_ptr(), bytes.len(), &mut ack) }, PRESENCE_OK);
    let m = &v["message"];
    assert_eq!(
        (ack.boot, ack.seq, ack.interval_ms, ack.ttl_ms),
        (7, 8, m["interval_ms"].as_u64().unwrap() as u32, m["ttl_ms"].as_u64().unwrap() as u32)
    );
    // A status reply is not an ack.
    let status_bytes = unhex(vector(9, false)["hex"].as_str().unwrap());
    let code = unsafe { presence_decode_ack(status_bytes.as_ptr(), status_bytes.len(), &mut ack) };
    assert_eq!(code, PRESENCE_ERR_UNEXPECTED_KIND);

    let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
    let decode = |bytes: &[u8], status: &mut std::mem::MaybeUninit<presence_status>| unsafe {
        presence_decode_status(bytes.as_ptr(), bytes.len(), status.as_mut_ptr())
    };
    // 9: one device.
    let v = vector(9, false);
    assert_eq!(decode(&status_bytes, &mut status), PRESENCE_OK);
    let status = unsafe { status.assume_init() };
    let d = &v["message"]["body"]["device"];
    assert_eq!((status.request, status.body), (4, PRESENCE_STATUS_DEVICE));
    let device = status.device;
    let id = unsafe { std::slice::from_raw_parts(device.id, device.id_len) };
    let payload = unsafe { std::slice::from_raw_parts(device.payload, device.payload_len) };
    assert_eq!(id, d["device"].as_str().unwrap().as_bytes());
    assert_eq!(payload, unhex(d["payload"].as_str().unwrap()));
    assert_eq!((device.addr_family, &device.addr[..4], device.port), (4, &[127, 0, 0, 1][..], 5000));
    assert_eq!(device.last_seen_unix_ms, d["last_seen_unix_ms"].as_u64().unwrap());
    assert_eq!((device.ttl_ms, device.boot, device.seq, device.version), (30_000, 7, 8, 1));
    assert!(device.online);
    // 8: the summary.
    let bytes = unhex(vector(8, false)["hex"].as_str().unwrap());
    let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
    assert_eq!(decode(&bytes, &mut status), PRESENCE_OK);
    let status = unsafe { status.assume_init() };
    assert_eq!(status.body, PRESENCE_STATUS_SUMMARY);
    let s = status.summary;
    assert_eq!((s.online, s.known, s.uptime_ms, s.heartbeats, s.late), (1, 2, 1000, 3, 1));
    // 10: a page of one, and its entry.
    let bytes = unhex(vector(10, false)["hex"].as_str().unwrap());
    let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
    assert_eq!(decode(&bytes, &mut status), PRESENCE_OK);
    let status = unsafe { status.assume_init() };
    assert_eq!((status.body, status.page_matched, status.page_entries), (PRESENCE_STATUS_PAGE, 1, 1));
    let mut entry = std::mem::MaybeUninit::<presence_device>::uninit();
    assert_eq!(
        unsafe { presence_decode_page_entry(bytes.as_ptr(), bytes.len(), 0, entry.as_mut_ptr()) },
        PRESENCE_OK
    );
    assert_eq!(unsafe { entry.assume_init() }.version, 1);
    let past = unsafe { presence_decode_page_entry(bytes.as_ptr(), bytes.len(), 1, entry.as_mut_ptr()) };
    assert_eq!(past, PRESENCE_ERR_BAD_ARGUMENT);
    // 7: unknown device.
    let bytes = unhex(vector(7, false)["hex"].as_str().unwrap());
    let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
    assert_eq!(decode(&bytes, &mut status), PRESENCE_OK);
    assert_eq!(unsafe { status.assume_init() }.body, PRESENCE_STATUS_UNKNOWN_DEVICE);
}

#[test]
fn queries_are_padded_to_the_largest_reply_and_signed_as_the_server_checks() {
    let operator = unhex(vectors()["keys"]["operator"].as_str().unwrap());
    let mut out = vec![0u8; PRESENCE_MAX_DATAGRAM];
    for (kind, id, key) in [
        (PRESENCE_QUERY_SUMMARY, &b""[..], None),
        (PRESENCE_QUERY_DEVICE, &b"boiler-7"[..], None),
        (PRESENCE_QUERY_DEVICE, &b"boiler-7"[..], Some(operator.as_slice())),
    ] {
        let key_ptr = key.map_or(ptr::null(), <[u8]>::as_ptr);
        let len = unsafe {
            presence_encode_query(
                9,
                kind,
                id.as_ptr(),
                id.len(),
                key_ptr,
                1_795_000_000_000,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        assert_eq!(len, PRESENCE_MAX_DATAGRAM as i32);
        let frame = &out[..len as usize];
        let message = presence::wire::decode(frame).unwrap();
        let presence::wire::Message::Query(query) = message else { panic!("{message:?}") };
        assert_eq!(query.request, 9);
        let key: Option<[u8; 32]> = key.map(|k| k.try_into().unwrap());
        match key {
            Some(key) => {
                let (signed, tag) = presence::auth::signed_part(frame, &message).unwrap();
                assert!(presence::auth::verify(&key, signed, &tag));
                assert_eq!(query.tag.unwrap().sent_unix_ms, 1_795_000_000_000);
            }
            None => assert!(query.tag.is_none()),
        }
    }
    // A buffer shorter than a padded query is refused.
    let len = unsafe {
        presence_encode_query(
            1,
            PRESENCE_QUERY_SUMMARY,
            ptr::null(),
            0,
            ptr::null(),
            0,
            out.as_mut_ptr(),
            100,
        )
    };
    assert_eq!(len, PRESENCE_ERR_BUFFER_TOO_SMALL);
    let len =
        unsafe { presence_encode_query(1, 7, ptr::null(), 0, ptr::null(), 0, out.as_mut_ptr(), out.len()) };
    assert_eq!(len, PRESENCE_ERR_BAD_ARGUMENT);
}

#[test]
fn null_pointers_get_an_error_code() {
    let mut out = [0u8; 200];
    let hb = heartbeat(b"d1", b"", &vector(1, false)["message"]);
    unsafe {
        assert_eq!(
            presence_encode_heartbeat(ptr::null(), ptr::null(), out.as_mut_ptr(), 200),
            PRESENCE_ERR_NULL
        );
        assert_eq!(presence_encode_heartbeat(&hb, ptr::null(), ptr::null_mut(), 200), PRESENCE_ERR_NULL);
        let no_id = presence_heartbeat { id: ptr::null(), ..hb };
        assert_eq!(presence_encode_heartbeat(&no_id, ptr::null(), out.as_mut_ptr(), 200), PRESENCE_ERR_NULL);
        let empty_id = presence_heartbeat { id_len: 0, ..hb };
        assert_eq!(
            presence_encode_heartbeat(&empty_id, ptr::null(), out.as_mut_ptr(), 200),
            PRESENCE_ERR_BAD_ID
        );
        let no_payload = presence_heartbeat { payload: ptr::null(), payload_len: 3, ..hb };
        assert_eq!(
            presence_encode_heartbeat(&no_payload, ptr::null(), out.as_mut_ptr(), 200),
            PRESENCE_ERR_NULL
        );
        assert_eq!(
            presence_encode_leave(ptr::null(), 2, 1, 1, ptr::null(), out.as_mut_ptr(), 200),
            PRESENCE_ERR_NULL
        );
        assert_eq!(presence_decode_ack(ptr::null(), 0, ptr::null_mut()), PRESENCE_ERR_NULL);
        let mut ack = presence_ack::default();
        assert_eq!(presence_decode_ack(ptr::null(), 0, &mut ack), PRESENCE_ERR_TRUNCATED);
        assert_eq!(presence_decode_ack(ptr::null(), 9, &mut ack), PRESENCE_ERR_NULL);
        assert_eq!(presence_decode_status(ptr::null(), 4, ptr::null_mut()), PRESENCE_ERR_NULL);
        assert_eq!(presence_decode_page_entry(ptr::null(), 4, 0, ptr::null_mut()), PRESENCE_ERR_NULL);
        for code in -13..=0 {
            let text = std::ffi::CStr::from_ptr(presence_strerror(code));
            assert!(!text.to_bytes().is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any id, payload, numbers, key or none, and output length: a frame
    /// that decodes to exactly that heartbeat, or an error code, and never
    /// a byte written past `out_len`.
    #[test]
    fn any_heartbeat_encodes_or_is_refused(
        id in proptest::collection::vec(any::<u8>(), 0..80),
        payload in proptest::collection::vec(any::<u8>(), 0..80),
        numbers in any::<(u32, u32, u32, u8)>(),
        signed in any::<bool>(),
        out_len in 0usize..200,
    ) {
        let hb = presence_heartbeat {
            id: id.as_ptr(), id_len: id.len(), boot: numbers.0, seq: numbers.1, interval_ms: numbers.2,
            flags: numbers.3, payload: payload.as_ptr(), payload_len: payload.len(),
        };
        let key = [7u8; 32];
        let mut out = vec![0xAAu8; out_len + 16];
        let len = unsafe {
            presence_encode_heartbeat(&hb, if signed { key.as_ptr() } else { ptr::null() }, out.as_mut_ptr(), out_len)
        };
        prop_assert!(out[out_len..].iter().all(|b| *b == 0xAA), "wrote past out_len");
        if len >= 0 {
            let frame = &out[..len as usize];
            let message = presence::wire::decode(frame).unwrap();
            let presence::wire::Message::Heartbeat(decoded) = message else { panic!() };
            prop_assert_eq!(decoded.device.as_bytes(), &id[..]);
            prop_assert_eq!(decoded.payload, &payload[..]);
            prop_assert_eq!((decoded.boot, decoded.seq, decoded.interval_ms, decoded.flags), numbers);
            prop_assert_eq!(decoded.tag.is_some(), signed);
        } else {
            prop_assert!((-12..=-1).contains(&len), "{}", len);
            let fits = std::str::from_utf8(&id).is_ok_and(|id| presence::wire::check_id(id).is_ok())
                && payload.len() <= PRESENCE_MAX_PAYLOAD_LEN;
            if fits {
                prop_assert_eq!(len, PRESENCE_ERR_BUFFER_TOO_SMALL);
            }
        }
    }

    /// Any bytes as a reply, of any length up to past the limit: decoded or
    /// refused with a code, never a panic.
    #[test]
    fn any_reply_decodes_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..1300), index in 0u32..4) {
        let mut ack = presence_ack::default();
        let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
        let mut entry = std::mem::MaybeUninit::<presence_device>::uninit();
        let codes = unsafe {
            [
                presence_decode_ack(bytes.as_ptr(), bytes.len(), &mut ack),
                presence_decode_status(bytes.as_ptr(), bytes.len(), status.as_mut_ptr()),
                presence_decode_page_entry(bytes.as_ptr(), bytes.len(), index, entry.as_mut_ptr()),
            ]
        };
        for code in codes {
            prop_assert!((-12..=0).contains(&code), "{}", code);
        }
        if bytes.len() > PRESENCE_MAX_DATAGRAM {
            prop_assert_eq!(codes, [PRESENCE_ERR_OVERSIZED; 3]);
        }
    }

    /// A real reply with one byte flipped or cut: still a code, never a panic.
    #[test]
    fn damaged_replies_are_refused_or_decoded(which in 0usize..4, at in any::<prop::sample::Index>(), cut in any::<bool>(), bit in 0u8..8) {
        let mut bytes = unhex(vector([7, 8, 9, 10][which], false)["hex"].as_str().unwrap());
        let at = at.index(bytes.len());
        if cut { bytes.truncate(at) } else { bytes[at] ^= 1 << bit }
        let mut status = std::mem::MaybeUninit::<presence_status>::uninit();
        let code = unsafe { presence_decode_status(bytes.as_ptr(), bytes.len(), status.as_mut_ptr()) };
        prop_assert!((-12..=0).contains(&code));
    }
}
