//! Listeners, connection serving and graceful shutdown.
//!
//! Every listener bounds what one client can hold: at most `limits.maxConnections` connections
//! (more are closed at accept and counted), a connection with no request started or in progress
//! for `limits.idleTimeoutMs` is shut down gracefully (HTTP/1 closes, HTTP/2 sends GOAWAY and lets
//! open streams finish), request heads must arrive within `limits.headerReadTimeoutMs` (on
//! HTTP/1 this also bounds the wait for the next request of a kept-alive connection), and HTTP/2
//! connections carry at most `limits.maxConcurrentStreams` streams.
//!
//! The header deadline: on the public listener the framing guard enforces it (one timer per
//! connection, re-armed lazily, see `framing::Guarded`) and hyper's own header-read timer is off;
//! hyper's timer allocates and registers a new timer for every request. The issuer API and the
//! admin listener keep hyper's timer. A request counts as in progress from its head until its
//! response body has been sent (or dropped), so neither the idle timeout nor the header deadline
//! runs while a response streams. HTTP/2 flood protections are
//! the h2 crate's (checked by the hostile-client tests): a client that resets streams faster than
//! it opens them (rapid reset, CVE-2023-44487) or provokes too many stream errors gets GOAWAY,
//! header blocks (CONTINUATION frames included) are bounded by `limits.maxHeaderBytes`, and only
//! one PING answer and one SETTINGS acknowledgement are ever queued.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::app::App;

/// hyper's HTTP/1 read-buffer limit: a head that does not fit is answered 431 by hyper.
fn hyper_buf_size(app: &App) -> usize {
    app.cfg.limits.max_header_bytes.max(8192) + 1024
}

/// `guarded`: the framing guard enforces the header deadline (see [`crate::framing::Guarded`]),
/// hyper's per-request timer is off.
fn builder(app: &App, guarded: bool) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let limits = &app.cfg.limits;
    let mut h1 = b.http1();
    if guarded {
        // No timer (with one, hyper would default to a 30 s header timeout).
        h1.header_read_timeout(None);
    } else {
        h1.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    }
    h1.max_buf_size(hyper_buf_size(app)).keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Rapid reset: streams the client opened and reset before the service saw them.
        .max_pending_accept_reset_streams(Some(20))
        // Streams the server had to reset because the client broke the protocol.
        .max_local_error_reset_streams(Some(256))
        .max_send_buf_size(256 * 1024);
    b
}

/// When a connection last finished a request, and how many are in progress.
pub struct Activity {
    epoch: Instant,
    in_progress: AtomicUsize,
    last_ms: AtomicU64,
    /// Set when the connection answers 101: the framing guard then steps aside for the new protocol.
    switched: Arc<AtomicBool>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_progress: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            switched: Arc::new(AtomicBool::new(false)),
        })
    }
    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// The instant the connection becomes idle if nothing happens before (read while no request
    /// is in progress).
    fn idle_at(&self, idle: Duration) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
    fn idle(&self, idle: Duration) -> bool {
        self.in_progress.load(Ordering::Relaxed) == 0 && Instant::now() >= self.idle_at(idle)
    }
    /// Since when the connection has had no request in progress (`None`: one is in progress).
    /// On HTTP/1 that is when it began waiting for its next request head.
    pub fn waiting_since(&self) -> Option<Instant> {
        if self.in_progress.load(Ordering::Relaxed) != 0 {
            return None;
        }
        Some(self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Counts a request in progress until dropped (also when hyper drops the request's future). It
/// travels with the response body (see [`Tracked`]), so a request ends when its response has
/// been sent.
struct InProgress(Arc<Activity>);

impl InProgress {
    /// No clock read here: the last activity only counts while no request is in progress.
    fn new(a: &Arc<Activity>) -> InProgress {
        a.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(a.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in progress until hyper has sent it to the
/// end (or dropped it). No extra allocation: hyper takes any body type.
pub struct Tracked<B> {
    body: B,
    _busy: InProgress,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn tracked<B>(resp: http::Response<B>, busy: InProgress) -> http::Response<Tracked<B>> {
    resp.map(|body| Tracked { body, _busy: busy })
}

/// Serve one connection until it ends: shut it down gracefully when it has been idle for
/// `idle`, or when the listener drains.
macro_rules! drive {
    ($conn:expr, $activity:expr, $idle:expr, $shutdown:expr, $app:expr) => {{
        let mut conn = std::pin::pin!($conn);
        let mut shutdown = $shutdown;
        let mut closing = false;
        loop {
            // While a request is in progress (a response may stream for long) look again one
            // idle period later: its last activity may be long past, and a deadline in the past
            // would wake this loop at once, again and again.
            let idle_at = match $activity.waiting_since() {
                Some(_) => tokio::time::Instant::from_std($activity.idle_at($idle)),
                None => tokio::time::Instant::now() + $idle,
            };
            tokio::select! {
                _ = conn.as_mut() => break,
                _ = shutdown.changed(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = tokio::time::sleep_until(idle_at), if !closing => {
                    if $activity.idle($idle) {
                        $app.metrics.connections_idle_closed.inc();
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }};
}

/// Accept connections on `listener` until `shutdown` flips, then drain in-flight requests
/// for at most `drain`. `public`: the proxied listener (framing guard on, connections counted).
pub async fn serve<F, Fut, B>(
    app: Arc<App>,
    listener: TcpListener,
    public: bool,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handler: F,
) where
    F: Fn(SocketAddr, http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes, Error = crate::app::BoxError> + Unpin + Send + 'static,
{
    let builder = Arc::new(builder(&app, public));
    let header_timeout = Duration::from_millis(app.cfg.limits.header_read_timeout_ms);
    let max_conns = app.cfg.limits.max_connections as usize;
    let slots = Arc::new(Semaphore::new(max_conns));
    let idle = Duration::from_millis(app.cfg.limits.idle_timeout_ms);
    // Above hyper's limit: hyper has answered 431 before the guard would stop inspecting a head.
    let max_head = hyper_buf_size(&app) + 1;
    let (close_tx, close_rx) = watch::channel(false);
    loop {
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            app.metrics.connections_refused.inc();
            tracing::debug!(%peer, max = max_conns, "connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let activity = Activity::new();
        let (app, builder, close_rx) = (app.clone(), builder.clone(), close_rx.clone());
        if public {
            app.metrics.connections.inc();
        }
        tokio::spawn(async move {
            if public {
                let act = activity.clone();
                let svc = service_fn(move |req| {
                    let busy = InProgress::new(&act);
                    let fut = h(peer, req);
                    async move {
                        let resp = fut.await?;
                        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                            busy.0.switched.store(true, Ordering::Release);
                        }
                        Ok::<_, std::convert::Infallible>(tracked(resp, busy))
                    }
                });
                let io = TokioIo::new(
                    crate::framing::Guarded::new(stream, max_head, activity.switched.clone())
                        .with_head_deadline(header_timeout, activity.clone()),
                );
                drive!(builder.serve_connection_with_upgrades(io, svc), activity, idle, close_rx, app);
                app.metrics.connections.dec();
            } else {
                let act = activity.clone();
                let svc = service_fn(move |req| {
                    let busy = InProgress::new(&act);
                    let fut = h(peer, req);
                    async move { Ok::<_, std::convert::Infallible>(tracked(fut.await?, busy)) }
                });
                let io = TokioIo::new(stream);
                drive!(builder.serve_connection_with_upgrades(io, svc), activity, idle, close_rx, app);
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    let all = u32::try_from(max_conns).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("drain deadline passed with connections still open");
    }
}
