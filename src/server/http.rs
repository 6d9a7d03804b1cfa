//! The HTTP listener for `/metrics`, on a single-threaded tokio runtime of
//! its own thread (hyper's HTTP/1 server). It is built to be scraped, not
//! to be a web server: one request per connection, a header read timeout,
//! a time limit per connection, and a cap on connections, so a slow or idle
//! client cannot hold the next scrape back. Any other path is 404, any
//! other method 405, and a request hyper cannot parse gets 400.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::metrics::Metrics;

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

/// Serves `metrics` on `listener` from a thread of its own.
pub(super) fn start(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<Listener> {
    listener.set_nonblocking(true)?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    let thread = std::thread::Builder::new().name("presence-http".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, metrics, stopped).await,
                Err(e) => tracing::error!(error = %e, "cannot serve /metrics"),
            }
        });
    })?;
    Ok(Listener { thread, stop })
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
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
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, Arc::clone(&metrics)));
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

async fn answer(
    request: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        Ok(response)
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found: the metrics are at /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n".into());
    }
    reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.encode())
}
