//! The HTTP/1.1 server loop: accept, serve each connection with hyper, shut
//! down gracefully.
//!
//! `axum::serve` gives a connection no deadline: a client that sends half a
//! request line, or a body one byte a minute, holds a connection and a task
//! forever, and a few thousand such clients use up the process's file
//! descriptors. Here every connection has a read timeout:
//! - a request's head (its line and headers) must arrive within it of the
//!   connection falling idle (hyper's `header_read_timeout`; an idle
//!   keep-alive connection is closed when it runs out, as an nginx
//!   `keepalive_timeout` does);
//! - a body must not pause longer than it between two pieces (tower-http's
//!   request body timeout): the request is answered 408 `request_timeout`
//!   and the connection closed.
//!
//! A request being processed, or a live stream being written, is not timed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// The default of `--read-timeout`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `error`, or what it was caused by, is a request body that paused
/// longer than the read timeout.
pub fn body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Serve `app` on `listener` until `shutdown` completes, then stop accepting,
/// let each connection finish the request it is on, and return once all are
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = app.layer(RequestBodyTimeoutLayer::new(read_timeout));
    // Each connection's task holds a receiver: `closed` resolves once all
    // have ended. The signal's sender going away asks them to finish.
    let (signal, signalled) = tokio::sync::watch::channel(());
    let (closing, _) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or memory: wait rather than
                    // spin; a connection reset before it was accepted:
                    // nothing to do.
                    if !matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) {
                        tracing::error!(%error, "accepting a connection");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out as soon as they are written: without TCP_NODELAY a
        // write behind one not yet acknowledged (an answer larger than one
        // segment, a forwarded write's) waits for the peer's delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY on an accepted connection");
        }
        let service = TowerToHyperService::new(app.clone());
        let mut signalled = signalled.clone();
        let closed = closing.subscribe();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let mut finishing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    _ = signalled.changed(), if !finishing => {
                        finishing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed);
        });
    }
    drop(listener);
    drop(signal);
    closing.closed().await;
}
