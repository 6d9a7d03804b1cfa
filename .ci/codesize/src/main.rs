//! A bare-metal program that encodes a heartbeat and decodes a reply with
//! the `no_std` API, linked for thumbv7em-none-eabihf with no allocator and
//! no std. That it links at all proves the device side needs neither; its
//! section sizes (`.ci/codesize/measure`) are the code size a device pays,
//! with and without signing (`--features signed`).
#![no_std]
#![no_main]
use core::hint::black_box;
use core::panic::PanicInfo;
use presence::wire;

#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let hb = wire::Heartbeat {
        device: black_box("sensor-00042"),
        boot: black_box(1),
        seq: black_box(2),
        interval_ms: black_box(10_000),
        flags: 0,
        payload: black_box(&[]),
        tag: None,
    };
    let mut buf = [0u8; 160];
    #[cfg(feature = "signed")]
    let len = presence::auth::encode_signed(&wire::Message::Heartbeat(hb), &black_box([1u8; 32]), &mut buf);
    #[cfg(not(feature = "signed"))]
    let len = wire::encode(&wire::Message::Heartbeat(hb), &mut buf);
    let _ = black_box(len);
    let reply = wire::decode(black_box(&buf[..]));
    black_box(&reply);
    loop {}
}
