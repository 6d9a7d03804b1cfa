//! A real Mosquitto broker (Debian's `mosquitto`, which `tests/run`
//! installs) on a free loopback port, killed on drop; and a reader of what
//! it retains.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use super::common::{PROMPTLY, poll};

/// A Mosquitto broker, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
}

impl Mosquitto {
    pub fn start_on(port: u16) -> Mosquitto {
        let found = Command::new("sh")
            .args(["-c", "command -v mosquitto || ls /usr/sbin/mosquitto"])
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "mosquitto is not installed: run the tests with tests/run, which installs it"
        );
        let binary = String::from_utf8(found.stdout).unwrap().lines().next().unwrap().trim().to_string();
        let child = Command::new(binary)
            .args(["-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        poll("mosquitto to listen", PROMPTLY, || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
        Mosquitto { child, port }
    }

    pub fn start() -> Mosquitto {
        Mosquitto::start_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The retained messages on the broker now: subscribes to everything
    /// and takes what arrives until the broker has been quiet a moment.
    pub fn retained(&self) -> BTreeMap<String, String> {
        let mut options = MqttOptions::new(format!("reader-{}", std::process::id()), "127.0.0.1", self.port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(options, 100);
        client.subscribe("#", QoS::AtLeastOnce).unwrap();
        let mut retained = BTreeMap::new();
        let mut subscribed = false;
        loop {
            let wait = if subscribed { Duration::from_millis(300) } else { Duration::from_secs(5) };
            match connection.recv_timeout(wait) {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed = true,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain => {
                    retained.insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let _ = client.disconnect();
        retained
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
