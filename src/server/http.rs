//! The HTTP listener of `--metrics`, on a single-threaded tokio runtime of
//! its own thread (hyper's HTTP/1 server): `/metrics`, and a small
//! read-only JSON API under `/api/v1` for operators and dashboards (the
//! summary, one device, and listings with the filters and cursors of
//! `status --list`). The API asks the server itself over its own UDP
//! protocol, as `presence status` does, so it answers exactly what status
//! answers and costs the loops what a query costs. It is open to loopback
//! clients; any other client needs `Authorization: Bearer <token>`, the
//! token derived from the operator key (`presence derive-key --http-token`).
//!
//! It is built to be scraped, not to be a web server: one request per
//! connection, a header read timeout, a time limit per connection, and a
//! cap on connections, so a slow or idle client cannot hold the next scrape
//! back. Any other path is 404, any other method 405, and a request hyper
//! cannot parse gets 400.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::metrics::Metrics;
use crate::wire::{self, ListFilter};

/// Connections served at once, at most; more wait in the kernel's backlog.
pub(super) const MAX_CONNECTIONS: usize = 32;

/// Time a client has to send its request headers.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time one connection may take in all.
pub(super) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's thread; dropping `stop`'s sender ends it.
pub(super) struct Listener {
    thread: std::thread::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Listener {
    /// Stops accepting and waits for the thread (connections in flight are dropped).
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// What the JSON API needs: where the server listens, and its keys.
#[derive(Debug, Clone)]
pub(super) struct Api {
    /// The server's own socket and operator key: the API asks it as a client.
    pub(super) view: super::view::TableView,
}

/// Everything a request may need.
struct Context {
    metrics: Arc<Metrics>,
    api: Api,
    /// The bearer token non-loopback clients must send (none: loopback only).
    token: Option<String>,
}

/// Serves `metrics` and the API on `listener` from a thread of its own.
pub(super) fn start(listener: TcpListener, metrics: Arc<Metrics>, api: Api) -> std::io::Result<Listener> {
    let token = api.view.operator.as_ref().map(|key| crate::hex::encode(&crate::auth::http_token(key)));
    let context = Arc::new(Context { metrics, api, token });
    listener.set_nonblocking(true)?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let thread = std::thread::Builder::new().name("presence-http".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, context, stopped).await,
                Err(e) => tracing::error!(error = %e, "cannot serve /metrics"),
            }
        });
    })?;
    Ok(Listener { thread, stop })
}

async fn serve(
    listener: tokio::net::TcpListener,
    context: Arc<Context>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot first: beyond the cap, clients wait in the backlog.
        let slot = tokio::select! {
            _ = &mut stopped => return,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let context = Arc::clone(&context);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request| answer(request, peer, Arc::clone(&context)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
            drop(slot);
        });
    }
}

type Reply = Result<Response<Full<Bytes>>, Infallible>;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    Ok(response)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", format!("{value}\n"))
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

async fn answer(request: Request<Incoming>, peer: SocketAddr, context: Arc<Context>) -> Reply {
    let path = request.uri().path().to_string();
    let is_api = path == "/api/v1" || path.starts_with("/api/v1/");
    if path != "/metrics" && !is_api {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: see /metrics and /api/v1/summary\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n".into());
    }
    if !is_api {
        return reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", context.metrics.encode());
    }
    let sent = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err((status, message)) = authorized(peer, sent, context.token.as_deref()) {
        return error(status, message);
    }
    let query: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    let api = context.api.clone();
    let asked = tokio::task::spawn_blocking(move || ask(&api, &path, &query)).await;
    match asked {
        Ok(Ok((status, value))) => json(status, &value),
        Ok(Err((status, message))) => error(status, &message),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the query failed"),
    }
}

/// Whether a client at `peer` that sent `authorization` may use the API:
/// loopback clients may; others need the bearer token, if there is one.
fn authorized(
    peer: SocketAddr,
    authorization: Option<&str>,
    token: Option<&str>,
) -> Result<(), (StatusCode, &'static str)> {
    if peer.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    let Some(token) = token else {
        return Err((StatusCode::FORBIDDEN, "the API answers loopback clients only (the server has no key)"));
    };
    let sent = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if constant_time_eq::constant_time_eq(sent.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <token> (presence derive-key --http-token)",
        ))
    }
}

/// Answers an API path by asking the server (blocking: a UDP round trip).
fn ask(
    api: &Api,
    path: &str,
    query: &[(String, String)],
) -> Result<(StatusCode, serde_json::Value), (StatusCode, String)> {
    let unavailable = |e: crate::client::ClientError| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    let mut client = api.view.client(QUERY_TIMEOUT).map_err(unavailable)?;
    let param = |name: &str| query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    match path.trim_end_matches('/') {
        "/api/v1/summary" => {
            let summary = client.summary().map_err(unavailable)?;
            Ok((StatusCode::OK, to_json(&summary)))
        }
        "/api/v1/devices" => {
            let state = match param("state").unwrap_or("online") {
                "online" => wire::LIST_ONLINE,
                "offline" => wire::LIST_OFFLINE,
                "all" => wire::LIST_ALL,
                other => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!("state={other}: use online, offline or all"),
                    ));
                }
            };
            let limit = match param("limit").map(str::parse::<u16>) {
                None => 100,
                Some(Ok(limit)) if (1..=1000).contains(&limit) => limit,
                Some(_) => return Err((StatusCode::BAD_REQUEST, "limit: a number from 1 to 1000".into())),
            };
            let prefix = param("prefix").filter(|p| !p.is_empty());
            let filter = ListFilter { state, prefix, count_only: false };
            let page = client.list_page(param("after"), limit, filter).map_err(|e| match e {
                crate::client::ClientError::Wire(_) => (StatusCode::BAD_REQUEST, e.to_string()),
                other => unavailable(other),
            })?;
            let devices: Vec<serde_json::Value> = page.devices.iter().map(to_json).collect();
            Ok((
                StatusCode::OK,
                serde_json::json!({ "devices": devices, "matched": page.matched, "next": page.next_cursor }),
            ))
        }
        other => {
            let Some(encoded) = other.strip_prefix("/api/v1/devices/") else {
                return Err((
                    StatusCode::NOT_FOUND,
                    "see /api/v1/summary, /api/v1/devices, /api/v1/devices/ID".into(),
                ));
            };
            let id = percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_err(|_| (StatusCode::BAD_REQUEST, "the device id is not UTF-8".to_string()))?;
            if wire::check_id(&id).is_err() {
                return Err((StatusCode::BAD_REQUEST, "not a valid device id".into()));
            }
            match client.device(&id).map_err(unavailable)? {
                Some(device) => Ok((StatusCode::OK, to_json(&device))),
                None => Err((StatusCode::NOT_FOUND, "the server has not heard from this device".into())),
            }
        }
    }
}

/// How long the API waits for the server's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A report (they all serialize) as a JSON value.
fn to_json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_may_others_need_the_token() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let token = crate::hex::encode(&crate::auth::http_token(&[7; 32]));
        assert!(authorized(local, None, None).is_ok());
        assert!(authorized(mapped, None, Some(&token)).is_ok());
        assert_eq!(authorized(remote, None, None).unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(authorized(remote, None, Some(&token)).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            authorized(remote, Some("Bearer nope"), Some(&token)).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(authorized(remote, Some(&token), Some(&token)).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert!(authorized(remote, Some(&format!("Bearer {token}")), Some(&token)).is_ok());
    }
}
