//! The server's view of every device, read the way any client reads it:
//! status queries to the server's own socket (signed with the operator key
//! if the server has one), page by page. The sinks' resynchronisation after
//! lost transitions uses it ([`crate::sink::Sink::resync`]); the HTTP API
//! asks the same way, and so does `serve --drain`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Key;
use crate::client::{Client, ClientError, DeviceReport};
use crate::wire::{LIST_ALL, ListFilter};

/// How long one page may take to come back.
const PAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to ask the server.
#[derive(Debug, Clone)]
pub struct TableView {
    /// The server's own socket, as this host reaches it.
    pub server: SocketAddr,
    /// Signs the queries, when the server has a key.
    pub operator: Option<Key>,
}

impl TableView {
    /// The server on `local` (its first socket), reached from this host: an
    /// unspecified address becomes loopback.
    pub fn new(mut local: SocketAddr, operator: Option<Key>) -> Self {
        if local.ip().is_unspecified() {
            local.set_ip(match local.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        TableView { server: local, operator }
    }

    /// A client for the server.
    pub fn client(&self, timeout: Duration) -> Result<Client, ClientError> {
        let client = Client::new(self.server, timeout)?;
        Ok(match self.operator {
            Some(key) => client.with_operator_key(key),
            None => client,
        })
    }

    /// Every device the server holds, online or not.
    pub fn devices(&self) -> Result<Vec<DeviceReport>, ClientError> {
        let filter = ListFilter { state: LIST_ALL, prefix: None, count_only: false };
        self.client(PAGE_TIMEOUT)?.list(filter, |_| {})
    }
}
