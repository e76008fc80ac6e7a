//! The connection pool to the app: HTTP/1.1 keep-alive connections, driven by the task that uses
//! them.
//!
//! hyper's pooled client (`hyper_util::client::legacy`) runs every upstream connection as its own
//! task and hands each request to it through a channel: two task wake-ups per request, plus the
//! pool's bookkeeping (keys, checkout futures, waiters). Here a request takes an idle connection
//! (last in, first out) and polls that connection itself — while it waits for the response head,
//! and then from the response body, which the downstream connection's task polls while it streams
//! the body to the client. So a proxied request stays on one task from the client's bytes to the
//! app and back.
//!
//! A connection goes back to the pool only when its response body has been read to the end and
//! hyper reports it ready for the next request (keep-alive, request body fully sent, no
//! `Connection: close`). A response that is aborted or dropped half-read, a protocol switch, or
//! any error drops the connection instead, so a later request can never read the rest of an
//! earlier response. Idle connections are not polled: one the app has closed meanwhile is noticed
//! (and dropped) at checkout; a request that fails because its pooled connection closed before
//! the request was written is retried once on a new connection (as hyper's pooled client does).
//! Idle connections are closed after [`IDLE_TIMEOUT`]; at most `max_idle` are kept.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The request body the proxy sends upstream.
pub type ReqBody = crate::longlived::BodyDeadline<Incoming>;

/// The connection's future (hyper's upgradeable connection type cannot be named). Only ever
/// polled through `&mut`, so the wrapper makes the response body `Sync` as `app::Body` needs.
type Conn = sync_wrapper::SyncWrapper<Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>>;

/// Idle connections older than this are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One HTTP/1.1 connection to the app and the handle to send requests on it.
pub struct Lease {
    sender: SendRequest<ReqBody>,
    conn: Conn,
    /// The connection future completed (closed, failed or handed over to an upgrade).
    done: bool,
    /// Taken from the pool (not freshly connected).
    reused: bool,
}

impl Lease {
    /// Poll the connection once (unless finished). Returns true when it has finished.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done
            && let Poll::Ready(r) = self.conn.get_mut().as_mut().poll(cx)
        {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            self.done = true;
            // Drop the finished connection now: its dispatcher still holds the request channel,
            // and a request queued on it but never written (the app closed the idle connection
            // just before) is handed back — and retried on a new connection — only when that
            // channel goes. Kept, the request would wait for the response timeout (504).
            self.conn = sync_wrapper::SyncWrapper::new(Box::pin(std::future::ready(Ok(()))));
        }
        self.done
    }

    /// Ready for another request right now (idle, keep-alive, not closed). Polls the connection
    /// with a no-op waker, so that while it is idle nothing wakes the task that used it last.
    fn idle_ready(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.drive(&mut cx) {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

struct Idle {
    lease: Lease,
    since: Instant,
}

/// Why a request could not get a response head from the app.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the app: {0}")]
    Connect(std::io::Error),
    #[error("connecting to the app timed out")]
    ConnectTimeout,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

pub struct Pool {
    address: String,
    connect_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

pub type Upstream = Arc<Pool>;

impl Pool {
    /// A pool for `address` (`host:port`). Spawns a sweeper that closes connections idle for
    /// longer than [`IDLE_TIMEOUT`] (it ends with the pool).
    pub fn new(address: &str, connect_timeout: Duration, max_idle: usize) -> Upstream {
        let pool = Arc::new(Pool { address: address.to_string(), connect_timeout, max_idle, idle: Mutex::new(vec![]) });
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(IDLE_TIMEOUT / 6);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    let stale: Vec<Idle> = {
                        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                        let (keep, stale) = std::mem::take(&mut *idle)
                            .into_iter()
                            .partition(|i: &Idle| i.since.elapsed() < IDLE_TIMEOUT);
                        *idle = keep;
                        stale
                    };
                    drop(stale);
                }
            });
        }
        pool
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn pop(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// An idle connection, else a new one. An idle connection is not polled here: if the app
    /// has closed it meanwhile, the request's first poll finds out before writing anything, and
    /// [`Pool::request`] retries on a new connection.
    async fn checkout(&self, allow_idle: bool) -> Result<Lease, UpstreamError> {
        if allow_idle {
            while let Some(mut i) = self.pop() {
                if i.since.elapsed() < IDLE_TIMEOUT && !i.lease.done && i.lease.sender.is_ready() {
                    i.lease.reused = true;
                    return Ok(i.lease);
                }
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Lease, UpstreamError> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address.as_str())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        Ok(Lease {
            sender,
            conn: sync_wrapper::SyncWrapper::new(Box::pin(conn.with_upgrades())),
            done: false,
            reused: false,
        })
    }

    /// Return a connection whose exchange is complete; dropped (closed) unless it is ready for
    /// another request.
    fn checkin(&self, mut lease: Lease) {
        if !lease.idle_ready() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle { lease, since: Instant::now() });
        }
    }

    /// Send `req` (origin-form URI, `Host` set) and wait for the response head. The response
    /// body keeps the connection; it returns to the pool when the body has been read to its end.
    pub async fn request(self: &Arc<Self>, req: Request<ReqBody>) -> Result<Response<PooledBody>, UpstreamError> {
        let mut req = req;
        let mut allow_idle = true;
        loop {
            let mut lease = self.checkout(allow_idle).await?;
            let fut = lease.sender.try_send_request(req);
            let mut fut = std::pin::pin!(fut);
            // Only our own polls of the connection can complete the response future, so it is
            // polled with a no-op waker: completing it must not wake this task a second time.
            let res = std::future::poll_fn(|cx| {
                lease.drive(cx);
                fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
            })
            .await;
            // The connection now waits for the body to be wanted; have that signal wake nobody
            // (the body polls the connection itself, see `PooledBody::poll_frame`).
            lease.drive(&mut Context::from_waker(Waker::noop()));
            match res {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let lease = if body.is_end_stream() {
                        // Nothing to read (HEAD, 204, 304, empty body): the connection is free now.
                        // A protocol switch (101) keeps the connection: see `take_upgrade`.
                        if parts.status != http::StatusCode::SWITCHING_PROTOCOLS {
                            self.checkin(lease);
                            None
                        } else {
                            Some(lease)
                        }
                    } else {
                        Some(lease)
                    };
                    return Ok(Response::from_parts(parts, PooledBody { body, lease, pool: self.clone() }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was closed under us. Once more, on a
                    // new connection.
                    Some(r) if lease.reused => {
                        tracing::debug!(error = %e.error(), "pooled upstream connection closed; retrying");
                        req = r;
                        allow_idle = false;
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }
}

/// A response body from the app; polls its connection while it is read, and returns the
/// connection to the pool when it has been read to its end.
pub struct PooledBody {
    body: Incoming,
    lease: Option<Lease>,
    pool: Arc<Pool>,
}

impl PooledBody {
    /// After a `101 Switching Protocols`: drive the connection to completion on its own task,
    /// which hands the socket to `hyper::upgrade::on` of the response.
    pub fn take_upgrade(&mut self) {
        if let Some(mut lease) = self.lease.take()
            && !lease.done
        {
            tokio::spawn(async move {
                if let Err(e) = lease.conn.get_mut().as_mut().await {
                    tracing::debug!(error = %e, "upstream connection failed during upgrade");
                }
            });
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut drove = false;
        loop {
            // The body first: polling it tells the connection it may read the body; then the
            // connection reads, and the body has it (no round trip through the scheduler). While
            // the connection is ours, only our polls of it feed the body: the body is polled with
            // a no-op waker (the connection's I/O wakes this task), so feeding it wakes nobody.
            let own = this.lease.as_ref().is_some_and(|l| !l.done);
            let mut noop = Context::from_waker(Waker::noop());
            match Pin::new(&mut this.body).poll_frame(if own { &mut noop } else { &mut *cx }) {
                Poll::Pending => {}
                Poll::Ready(None) => {
                    if let Some(lease) = this.lease.take() {
                        this.pool.checkin(lease);
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if this.body.is_end_stream()
                        && let Some(lease) = this.lease.take()
                    {
                        this.pool.checkin(lease);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.lease = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match this.lease.as_mut() {
                Some(lease) if !drove && !lease.done => {
                    lease.drive(cx);
                    drove = true;
                }
                _ => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
