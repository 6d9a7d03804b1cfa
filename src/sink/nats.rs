//! `--nats URL`: every transition to a JetStream stream, and each device's
//! latest transition to a KV bucket, with async-nats on a one-thread tokio
//! runtime of this sink's own (its thread is the sink's, see
//! `server::feed`).
//!
//! - Stream (default `PRESENCE`) on `<prefix>.>` (default prefix
//!   `presence.events`): a device's transitions on `<prefix>.<name>`, fleet
//!   events (`degraded`, `recovered`) on `<prefix>.=fleet`, each the same
//!   JSON as a line of the events file. The message id is
//!   `<name>.<version>.<seq>` (fleet events: `=fleet.<seq>`), so a
//!   transition published again after a reconnect is dropped by the
//!   server's duplicate window, while a device that was forgotten and comes
//!   back (its versions start again at 1) is not taken for a duplicate.
//! - KV bucket (default `presence`): key `<name>`, value that device's
//!   latest transition (same JSON); written on transitions only. A
//!   `forgotten` device's key is deleted. After transitions were lost (an
//!   outage longer than the buffer), every device's state is written again
//!   from the server's view (`"resync": true`, no `seq`) and the keys of
//!   devices it no longer holds are deleted, so the bucket converges.
//! - `<name>` is the device id made safe ([`super::names`]).
//!
//! The server may be down at start or go away: the tracker starts anyway,
//! this sink retries with backoff while its feed buffers (losing the oldest
//! if the outage outlasts `--sink-buffer`), and publishes in order once it
//! is back. At stop it tries for a few seconds more, then counts what is
//! left as lost.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};

use super::names;
use super::{Sink, Transition, event_json};
use crate::server::Stop;
use crate::tracker::EventKind;

/// How the server reaches NATS.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// The server URL(s), comma-separated (`nats://host:4222`, `tls://...`).
    pub url: String,
    /// The stream's name.
    pub stream: String,
    /// The subject prefix.
    pub subject_prefix: String,
    /// The KV bucket's name.
    pub bucket: String,
    /// Credentials.
    pub auth: NatsAuth,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            url: "nats://127.0.0.1:4222".into(),
            stream: "PRESENCE".into(),
            subject_prefix: "presence.events".into(),
            bucket: "presence".into(),
            auth: NatsAuth::None,
        }
    }
}

/// NATS credentials, as the client supports them. Never printed.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    /// None.
    #[default]
    None,
    /// A token.
    Token(String),
    /// A user and a password.
    UserPassword(String, String),
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.auth {
            NatsAuth::None => "none",
            NatsAuth::Token(_) => "token",
            NatsAuth::UserPassword(..) => "user and password",
            NatsAuth::CredentialsFile(_) => "credentials file",
        };
        f.debug_struct("NatsOptions")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("bucket", &self.bucket)
            .field("auth", &auth)
            .finish()
    }
}

/// How long the sink keeps trying at stop before it counts the rest as lost.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Transitions sent before their acks are awaited (a round trip per
/// window, not per message).
const WINDOW: usize = 256;

/// The KV header that marks a delete (the KV protocol, NATS ADR-8).
const KV_OPERATION: &str = "KV-Operation";

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
type PublishAck = async_nats::jetstream::context::PublishAckFuture;

/// The subject a KV put or delete of `key` is published on (the KV
/// protocol: the bucket's prefix, then the key).
fn kv_subject(bucket: &kv::Store, key: &str) -> String {
    format!("{}{key}", bucket.put_prefix.as_ref().unwrap_or(&bucket.prefix))
}

/// A KV put of `value`, or with `None` a delete (an empty message marked
/// as one).
fn kv_message(value: Option<bytes::Bytes>) -> jetstream::message::PublishMessage {
    match value {
        Some(value) => jetstream::message::PublishMessage::build().payload(value),
        None => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(KV_OPERATION, "DEL");
            jetstream::message::PublishMessage::build().headers(headers)
        }
    }
}

/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The NATS sink.
pub struct NatsSink {
    options: NatsOptions,
    runtime: tokio::runtime::Runtime,
    jetstream: jetstream::Context,
    /// The bucket, once it exists.
    bucket: Option<kv::Store>,
    /// Whether the stream exists.
    stream_ready: bool,
    /// The server's stop signal: at stop, give up after [`STOP_GRACE`].
    stop: Stop,
    /// Transitions given up on.
    lost: u64,
    /// Whether the current outage was logged.
    warned: bool,
}

/// The servers of a `--nats` value: one URL, or several separated by
/// commas (the servers of one NATS cluster; the client fails over).
pub fn servers(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|server| !server.is_empty()).collect()
}

/// Connect options with `auth` (a credentials file is read now).
pub async fn connect_options(name: &str, auth: &NatsAuth) -> std::io::Result<async_nats::ConnectOptions> {
    let connect = async_nats::ConnectOptions::new().name(name).connection_timeout(Duration::from_secs(5));
    Ok(match auth {
        NatsAuth::None => connect,
        NatsAuth::Token(token) => connect.token(token.clone()),
        NatsAuth::UserPassword(user, password) => connect.user_and_password(user.clone(), password.clone()),
        NatsAuth::CredentialsFile(path) => connect.credentials_file(path).await?,
    })
}

impl NatsSink {
    /// A sink that connects in the background (a server that is down at
    /// start is retried, and the tracker starts anyway). Fails only for a
    /// bad URL or an unreadable credentials file.
    pub fn connect(options: NatsOptions, stop: Stop) -> std::io::Result<Self> {
        // One worker thread: the client's connection task (pings,
        // reconnects) runs between batches too.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("presence-nats")
            .on_thread_start(|| crate::server::run_in_background("the NATS client"))
            .enable_io()
            .enable_time()
            .build()?;
        let jetstream = runtime.block_on(async {
            let connect = connect_options("presence", &options.auth).await?.retry_on_initial_connect();
            let client = connect.connect(servers(&options.url)).await.map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(jetstream::new(client))
        })?;
        Ok(NatsSink {
            options,
            runtime,
            jetstream,
            bucket: None,
            stream_ready: false,
            stop,
            lost: 0,
            warned: false,
        })
    }
}

impl Sink for NatsSink {
    fn keeps_states(&self) -> bool {
        true
    }

    fn resync(&mut self, devices: &[crate::client::DeviceReport]) {
        self.resync_devices(devices);
    }

    fn name(&self) -> &'static str {
        "nats"
    }

    fn lost(&self) -> u64 {
        self.lost
    }

    fn publish(&mut self, batch: &[Transition]) {
        let runtime = tokio::runtime::Handle::clone(self.runtime.handle());
        runtime.block_on(async {
            let mut backoff = Duration::from_millis(100);
            let mut stopping_since: Option<Instant> = None;
            let mut next = 0;
            while next < batch.len() {
                let end = (next + WINDOW).min(batch.len());
                let (done, result) = self.send_window(&batch[next..end]).await;
                next += done;
                match result {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        if self.warned {
                            tracing::info!("NATS: publishing again");
                            self.warned = false;
                        }
                    }
                    Err(e) => {
                        if !self.warned {
                            // Never the options: they may hold credentials.
                            tracing::warn!(error = %e, "NATS: cannot publish; the sink buffers and retries");
                            self.warned = true;
                        }
                        if self.stop.is_requested() {
                            let since = *stopping_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= STOP_GRACE {
                                self.lost += (batch.len() - next) as u64;
                                tracing::warn!(
                                    lost = batch.len() - next,
                                    "NATS: stopping with transitions not published"
                                );
                                return;
                            }
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }
}

impl NatsSink {
    /// [`Sink::resync`]: retried with backoff while NATS is unreachable, as
    /// publishing is (at stop, for [`STOP_GRACE`] at most).
    fn resync_devices(&mut self, devices: &[crate::client::DeviceReport]) {
        let now = std::time::SystemTime::now();
        let values: Vec<(String, bytes::Bytes)> = devices
            .iter()
            .map(|device| {
                (names::encode(&device.device), bytes::Bytes::from(super::resync_json(device, now)))
            })
            .collect();
        let runtime = tokio::runtime::Handle::clone(self.runtime.handle());
        runtime.block_on(async {
            let mut backoff = Duration::from_millis(100);
            let mut stopping_since: Option<Instant> = None;
            loop {
                match self.resync_once(&values).await {
                    Ok(removed) => {
                        tracing::info!(
                            devices = values.len(),
                            removed,
                            "NATS: the bucket holds the server's view again"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NATS: cannot write the devices again yet; retrying");
                        if self.stop.is_requested() {
                            let since = *stopping_since.get_or_insert_with(Instant::now);
                            if since.elapsed() >= STOP_GRACE {
                                return;
                            }
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    /// Makes sure the stream and the bucket exist.
    async fn ready(&mut self) -> Result<(), BoxError> {
        if !self.stream_ready {
            let config = stream::Config {
                name: self.options.stream.clone(),
                subjects: vec![format!("{}.>", self.options.subject_prefix)],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            };
            self.jetstream.get_or_create_stream(config).await?;
            self.stream_ready = true;
        }
        if self.bucket.is_none() {
            let bucket = match self.jetstream.get_key_value(self.options.bucket.as_str()).await {
                Ok(bucket) => bucket,
                Err(_) => {
                    let config =
                        kv::Config { bucket: self.options.bucket.clone(), history: 1, ..Default::default() };
                    self.jetstream.create_key_value(config).await?
                }
            };
            self.bucket = Some(bucket);
        }
        Ok(())
    }

    /// Publishes `window` in order without waiting between messages: each
    /// transition to the stream and, for a device's, its state to the KV
    /// bucket (a publish to the bucket's subject, as a KV put or delete is);
    /// then waits for the acks, in order. Returns how many transitions were
    /// acknowledged in full before the first failure. JetStream stores one
    /// connection's publishes in the order sent, so a retry from the first
    /// unacknowledged transition keeps every key's order: a message that
    /// was stored though its ack was lost is stored again harmlessly (the
    /// stream drops it by its id; the bucket gets the same value, and the
    /// later ones after it, again).
    async fn send_window(&mut self, window: &[Transition]) -> (usize, Result<(), BoxError>) {
        if let Err(e) = self.ready().await {
            return (0, Err(e));
        }
        let mut pending = Vec::with_capacity(window.len());
        let mut failed = None;
        for transition in window {
            match self.send(transition).await {
                Ok(acks) => pending.push(acks),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut done = 0;
        for (stream_ack, kv_ack) in pending {
            if let Err(e) = stream_ack.await {
                return (done, Err(e.into()));
            }
            if let Some(kv_ack) = kv_ack
                && let Err(e) = kv_ack.await
            {
                return (done, Err(e.into()));
            }
            done += 1;
        }
        (done, failed.map_or(Ok(()), Err))
    }

    /// Sends one transition to the stream and, for a device's, its state
    /// to the bucket; the acks are still to come.
    async fn send(&mut self, transition: &Transition) -> Result<(PublishAck, Option<PublishAck>), BoxError> {
        let event = &transition.event;
        let json = bytes::Bytes::from(event_json(transition));
        let (subject, id, key) = if event.kind.is_server() {
            (format!("{}.=fleet", self.options.subject_prefix), format!("=fleet.{}", transition.seq), None)
        } else {
            let name = names::encode(&event.device);
            (
                format!("{}.{name}", self.options.subject_prefix),
                format!("{name}.{}.{}", event.version, transition.seq),
                Some(name),
            )
        };
        let publish = jetstream::message::PublishMessage::build().payload(json.clone()).message_id(id);
        let stream_ack = self.jetstream.send_publish(subject, publish).await?;
        let (Some(key), Some(bucket)) = (key, &self.bucket) else { return Ok((stream_ack, None)) };
        let value = (!matches!(event.kind, EventKind::Forgotten(_))).then_some(json);
        let kv_ack = self.jetstream.send_publish(kv_subject(bucket, &key), kv_message(value)).await?;
        Ok((stream_ack, Some(kv_ack)))
    }

    /// Makes the bucket hold exactly `values` (each device's key and state
    /// JSON): puts every one, deletes the keys of devices not among them.
    /// Returns how many it deleted.
    async fn resync_once(&mut self, values: &[(String, bytes::Bytes)]) -> Result<usize, BoxError> {
        use futures_util::StreamExt;
        self.ready().await?;
        let bucket = self.bucket.as_ref().ok_or("the bucket is not there")?;
        let listed: std::collections::HashSet<&str> = values.iter().map(|(key, _)| key.as_str()).collect();
        let mut stale = Vec::new();
        let mut keys = bucket.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if !listed.contains(key.as_str()) {
                stale.push(key);
            }
        }
        let mut writes = values
            .iter()
            .map(|(key, value)| (key.as_str(), Some(value.clone())))
            .chain(stale.iter().map(|key| (key.as_str(), None)));
        loop {
            // A window at a time, as for transitions.
            let mut acks = Vec::with_capacity(WINDOW);
            for (key, value) in writes.by_ref().take(WINDOW) {
                acks.push(self.jetstream.send_publish(kv_subject(bucket, key), kv_message(value)).await?);
            }
            if acks.is_empty() {
                return Ok(stale.len());
            }
            for ack in acks {
                ack.await?;
            }
        }
    }
}
