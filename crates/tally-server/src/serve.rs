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
//! - a body must not pause longer than it between two pieces
//!   ([`WatchedBody`]): the request is answered 408 `request_timeout` and
//!   the connection closed. Its timer is set only when the body is waiting
//!   for bytes: most bodies arrive with their head and never set one (not
//!   a timer for every request, as tower-http's body timeout sets).
//!
//! A request being processed, or a live stream being written, is not timed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// The default of `--read-timeout`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a request whose body [`WatchedBody`] cut off (it paused
/// longer than the read timeout: 408; the server is shutting down: 503),
/// when `error`, or what it was caused by, says so.
pub fn body_cut(error: &(dyn std::error::Error + 'static)) -> Option<crate::error::ApiError> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<BodyTimedOut>() {
            return Some(crate::error::ApiError::new(
                "request_timeout",
                "the request body stopped arriving before its end; send it again",
            ));
        }
        if error.is::<ShuttingDown>() {
            return Some(crate::error::ApiError {
                retry_after_seconds: Some(1),
                ..crate::error::ApiError::new(
                    "unavailable",
                    "the server is shutting down and the body had not all arrived: nothing was \
                     applied; send it again",
                )
            });
        }
        cause = error.source();
    }
    None
}

/// A request body with a deadline between its pieces (the read timeout),
/// read until the server shuts down: a client still sending one then gets
/// 503 `unavailable` (nothing applied; send it again) instead of holding the
/// stop until its body times out. Both are watched only while the body
/// waits for bytes.
struct WatchedBody {
    inner: axum::body::Body,
    read_timeout: Duration,
    signalled: tokio::sync::watch::Receiver<()>,
    /// Set at the first wait; moved on at a wait after a piece arrived.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// A piece arrived since the deadline was last set.
    moved: bool,
    stop: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What reading a body gives when it paused longer than the read timeout.
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body paused longer than the read timeout")
    }
}

impl std::error::Error for BodyTimedOut {}

/// What reading a body gives once the server shuts down.
#[derive(Debug)]
pub struct ShuttingDown;

impl std::fmt::Display for ShuttingDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server is shutting down")
    }
}

impl std::error::Error for ShuttingDown {}

impl http_body::Body for WatchedBody {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let read_timeout = this.read_timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(read_timeout)));
        if std::mem::take(&mut this.moved) {
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + read_timeout);
        }
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        let signalled = &this.signalled;
        let stop = this.stop.get_or_insert_with(|| {
            let mut signalled = signalled.clone();
            Box::pin(async move {
                let _ = signalled.changed().await;
            })
        });
        match stop.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ShuttingDown)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Requests whose head has arrived and whose answer has not yet begun.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

impl InFlight {
    async fn drained(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let done = self.done.notified();
            if self.count.load(SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// One request in [`InFlight`], until dropped.
struct Counted(std::sync::Arc<InFlight>);

impl Counted {
    fn new(in_flight: std::sync::Arc<InFlight>) -> Counted {
        in_flight
            .count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(in_flight)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.done.notify_waiters();
        }
    }
}

/// After the shutdown signal, once every request whose head had arrived has
/// been answered, how long connections get to write their answers out
/// before those still open are closed.
const FLUSH_AFTER_DRAIN: Duration = Duration::from_secs(1);

/// Serve `app` on `listener` until `shutdown` completes, then stop accepting,
/// let each request whose head has arrived finish, and return once every
/// connection is closed. A connection with no such request (idle, or a
/// client still sending a head) is closed at once, and one still open once
/// those requests are answered is closed [`FLUSH_AFTER_DRAIN`] later: a
/// client that sent half a request held a graceful stop for the whole
/// exit timer before.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // Each connection's task holds a receiver: `closed` resolves once all
    // have ended. The signal's sender going away asks them to finish; the
    // abort's, to close now.
    let (signal, signalled) = tokio::sync::watch::channel(());
    let (abort, aborted) = tokio::sync::watch::channel(());
    let (closing, _) = tokio::sync::watch::channel(());
    let in_flight = std::sync::Arc::new(InFlight::default());
    let counted = in_flight.clone();
    let bodies_signalled = signalled.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let counted = counted.clone();
            let signalled = bodies_signalled.clone();
            let request = request.map(|inner| {
                axum::body::Body::new(WatchedBody {
                    inner,
                    read_timeout,
                    signalled,
                    deadline: None,
                    moved: false,
                    stop: None,
                })
            });
            async move {
                // Counted down when the answer begins, or when the
                // request is dropped unanswered (its client went away).
                let _counted = Counted::new(counted);
                next.run(request).await
            }
        },
    ));
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
        let mut aborted = aborted.clone();
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
                    _ = aborted.changed() => break,
                }
            }
            drop(closed);
        });
    }
    drop(listener);
    drop(signal);
    tokio::select! {
        () = closing.closed() => {}
        () = async {
            in_flight.drained().await;
            tokio::time::sleep(FLUSH_AFTER_DRAIN).await;
        } => {
            drop(abort);
            closing.closed().await;
        }
    }
}
