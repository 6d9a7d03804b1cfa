//! A device written against the `no_std` API alone.
//!
//! Everything in `firmware` uses `core` and `presence::wire` only: frames are
//! encoded into a fixed buffer on the device struct, nothing is allocated, and
//! the network is a two-method trait. `main` is the std "edge" that plugs a
//! UDP socket into that trait so the example runs on a PC:
//!
//! ```text
//! cargo run --example device -- 127.0.0.1:7787 boiler-7 5 [DEVICE-KEY-HEX]
//! ```
//! (server address, device id, number of heartbeats, one per second, and
//! the device key if the server requires signed heartbeats).

mod firmware {
    use presence::auth::{self, Key};
    use presence::wire::{self, Ack, Heartbeat, Leave, Message};

    /// The radio or network stack of the board: send a frame, maybe receive one.
    pub trait Link {
        /// Sends one datagram to the server.
        fn send(&mut self, frame: &[u8]);
        /// Returns a received datagram in `buf`, if one is waiting.
        fn try_recv(&mut self, buf: &mut [u8]) -> Option<usize>;
    }

    /// A heartbeat frame with a 64-byte id and payload needs at most
    /// 1 + 1 + 65 + 5 + 5 + 5 + 1 + 65 + 9 bytes; 160 leaves room.
    const FRAME_BUF: usize = 160;

    /// The device's presence state: a few words and one frame buffer.
    pub struct Device<L: Link> {
        /// Where frames go.
        link: L,
        /// Our id; set at provisioning.
        id: &'static str,
        /// Must change on every boot; real firmware keeps a counter in flash.
        boot: u32,
        /// The next heartbeat's sequence number.
        seq: u32,
        /// How often `tick` is called, declared to the server.
        interval_ms: u32,
        /// Frames are encoded here; no allocator needed.
        frame: [u8; FRAME_BUF],
        /// This device's key (from `presence derive-key`), if the server requires signatures.
        key: Option<Key>,
    }

    impl<L: Link> Device<L> {
        /// A device that will beat every `interval_ms`.
        pub fn new(link: L, id: &'static str, boot: u32, interval_ms: u32, key: Option<Key>) -> Self {
            Device { link, id, boot, seq: 1, interval_ms, frame: [0; FRAME_BUF], key }
        }

        /// Encodes into the frame buffer, signing if the device has a key.
        fn encode(&mut self, message: &Message<'_>) -> Result<usize, wire::Error> {
            match &self.key {
                Some(key) => auth::encode_signed(message, key, &mut self.frame),
                None => wire::encode(message, &mut self.frame),
            }
        }

        /// Sends one heartbeat carrying the battery level; asks for an ack
        /// on the first one so the device learns the server's TTL.
        pub fn tick(&mut self, battery_percent: u8) -> Result<usize, wire::Error> {
            let payload = [b'b', battery_percent];
            let flags = if self.seq == 1 { wire::FLAG_ACK } else { 0 };
            let hb = Heartbeat {
                device: self.id,
                boot: self.boot,
                seq: self.seq,
                interval_ms: self.interval_ms,
                flags,
                payload: &payload,
                tag: None,
            };
            let len = self.encode(&Message::Heartbeat(hb))?;
            self.link.send(&self.frame[..len]);
            self.seq = self.seq.wrapping_add(1);
            Ok(len)
        }

        /// Takes an ack off the link, if the server sent one.
        pub fn poll_ack(&mut self) -> Option<Ack> {
            let len = self.link.try_recv(&mut self.frame)?;
            match wire::decode(&self.frame[..len]) {
                Ok(Message::Ack(ack)) if ack.boot == self.boot => Some(ack),
                _ => None,
            }
        }

        /// Says goodbye before powering down.
        pub fn leave(&mut self) -> Result<(), wire::Error> {
            let leave = Leave { device: self.id, boot: self.boot, seq: self.seq, tag: None };
            let len = self.encode(&Message::Leave(leave))?;
            self.link.send(&self.frame[..len]);
            Ok(())
        }
    }
}

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The std edge: a UDP socket connected to the server.
struct UdpLink(UdpSocket);

impl firmware::Link for UdpLink {
    fn send(&mut self, frame: &[u8]) {
        if let Err(e) = self.0.send(frame) {
            eprintln!("send failed: {e}");
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.0.recv(buf).ok()
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "127.0.0.1:7787".into());
    // The firmware keeps its id for its whole life.
    let id: &'static str = args.next().unwrap_or_else(|| "example-device".into()).leak();
    let count: u32 = args.next().and_then(|n| n.parse().ok()).unwrap_or(5);
    // Optional: the device key in hex, as printed by `presence derive-key`.
    let key = args.next().map(|hex| presence::keyfile::parse_hex_key(&hex).expect("a 64-digit hex key"));

    let server: SocketAddr = match server.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => {
            eprintln!("'{server}' is not a server address (try 127.0.0.1:7787 or [::1]:7787)");
            std::process::exit(2);
        }
    };
    // A socket of the server's family: an IPv4 socket cannot reach an IPv6 server.
    let socket = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    // A boot larger than any used before on this machine (as `presence beat` picks it),
    // so two runs within one second are not replays of each other.
    let boot = presence::client::BootCounter::default_location()
        .and_then(|counter| counter.next())
        .unwrap_or_else(|_| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32));
    let mut device = firmware::Device::new(UdpLink(socket), id, boot, 1000, key);
    for i in 0..count {
        let len = device.tick(100 - (i % 100) as u8).expect("valid frame");
        println!("heartbeat {} ({len} bytes)", i + 1);
        if i == 0 {
            match device.poll_ack() {
                Some(ack) => {
                    println!("server: beat every {} ms, offline after {} ms", ack.interval_ms, ack.ttl_ms)
                }
                None => println!(
                    "no ack: the server drops what it refuses without a word. Is it running at {server}? \
                     Does it require signed heartbeats (give this device's key, from `presence derive-key`)? \
                     Is the key this device's? Its drop counters say which: presence status --server {server}"
                ),
            }
        }
        if i + 1 < count {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    device.leave().expect("valid frame");
    println!("left");
    Ok(())
}
