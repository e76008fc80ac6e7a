//! Long-lived exchanges follow their token: an upgraded connection (WebSocket) and a streaming
//! response re-check the token that opened them every `limits.revalidateIntervalMs`, and end when
//! it has been revoked (session record gone, deny record or cut-off), when its key has left the
//! key set, or at `exp + leeway` (to the second, without waiting for a re-check).
//!
//! How they end:
//! * WebSocket: each direction is cut at a frame boundary and sent a Close frame, status 1008
//!   (policy violation) with the reason (`token revoked`, `token expired`, `key retired`) — to
//!   the client unmasked, to the app masked as a client's frame must be — then both TCP
//!   connections are closed. A frame still in flight gets one second to finish first.
//! * any other upgraded protocol: both TCP connections are closed.
//! * `text/event-stream` responses end cleanly (the last chunk is sent); `EventSource` clients
//!   reconnect and get `401`.
//! * other streaming responses are aborted (HTTP/1: the connection closes before the final
//!   chunk; HTTP/2: the stream is reset), so a client can never take a cut-short download for a
//!   complete one.
//!
//! A re-check that cannot reach Redis counts as "still valid" once under `failurePolicy: open`
//! and always there; under `closed` the exchange ends when two re-checks in a row could not
//! reach Redis (one Redis failover does not cut every WebSocket, an outage does).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use authrealm_contract::FailurePolicy;

use crate::app::{App, BoxError, now_unix_ms};
use crate::session::SessionState;

/// What a long-lived exchange needs to re-check the token that opened it.
pub type Grant = Arc<crate::tokencache::VerifiedToken>;

/// Why an exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Revoked,
    Expired,
    KeyRetired,
    /// Redis could not say, twice in a row, under `failurePolicy: closed`.
    Unknown,
}

impl End {
    pub fn label(self) -> &'static str {
        match self {
            End::Revoked => "revoked",
            End::Expired => "expired",
            End::KeyRetired => "key_retired",
            End::Unknown => "unknown",
        }
    }
    fn reason(self) -> &'static [u8] {
        match self {
            End::Revoked => b"token revoked",
            End::Expired => b"token expired",
            End::KeyRetired => b"key retired",
            End::Unknown => b"session state unknown",
        }
    }
}

/// Milliseconds until the token stops being accepted on this pod (`now > exp + leeway`).
fn until_expiry(app: &App, g: &Grant) -> Duration {
    let end_ms = g.exp.saturating_add(app.policy.leeway).saturating_add(1).saturating_mul(1000);
    Duration::from_millis(end_ms.saturating_sub(now_unix_ms()).max(0) as u64)
}

/// One re-check. `Ok(None)`: still valid. `Err(())`: Redis could not answer.
async fn recheck(app: &App, g: &Grant) -> Result<Option<End>, ()> {
    if until_expiry(app, g).is_zero() {
        return Ok(Some(End::Expired));
    }
    if !app.grant_key_present(g) {
        return Ok(Some(End::KeyRetired));
    }
    if !app.stateful() {
        return Ok(None);
    }
    let Some(store) = app.sessions() else { return Err(()) };
    let (sub, jti) = (g.sub.as_deref().unwrap_or(""), g.jti.as_deref().unwrap_or(""));
    match store.check_sourced(sub, jti, g.iat, g.session_key.as_ref()).await.0 {
        Ok(SessionState::Active) => Ok(None),
        // single/multi session records expire with the token: gone after exp means expired.
        Ok(SessionState::Revoked) if crate::app::now_unix() >= g.exp => Ok(Some(End::Expired)),
        Ok(SessionState::Revoked) => Ok(Some(End::Revoked)),
        Err(_) => Err(()),
    }
}

/// Re-check `g` every interval (and at its expiry) until it is no longer valid.
pub async fn watch_grant(app: &App, g: &Grant) -> End {
    let interval = Duration::from_millis(app.cfg.limits.revalidate_interval_ms);
    let mut unknown = 0u32;
    loop {
        let wait = interval.min(until_expiry(app, g));
        tokio::time::sleep(wait).await;
        match recheck(app, g).await {
            Ok(None) => unknown = 0,
            Ok(Some(end)) => return end,
            Err(()) => {
                unknown += 1;
                if app.cfg.failure_policy == FailurePolicy::Closed && unknown >= 2 {
                    return End::Unknown;
                }
            }
        }
    }
}

// ---- WebSocket frame boundaries -------------------------------------------------------------

/// Tracks RFC 6455 frame boundaries in one direction of a byte stream, so a Close frame can be
/// inserted between frames.
#[derive(Clone, Debug, Default)]
pub struct FrameTracker {
    head: [u8; 14],
    have: usize,
    /// Payload bytes left in the current frame (valid once the head is complete).
    payload_left: u64,
    in_payload: bool,
}

impl FrameTracker {
    /// Head length implied by the bytes seen so far (2 until the second byte is known).
    fn head_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
            127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or([0; 8])),
            n => n as u64,
        }
    }

    /// Account for `data` passing through.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.in_payload {
                let n = (data.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                data = &data[n as usize..];
                if self.payload_left == 0 {
                    self.in_payload = false;
                    self.have = 0;
                }
                continue;
            }
            let want = self.head_len();
            let take = (want - self.have).min(data.len());
            self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have >= 2 && self.have == self.head_len() {
                self.payload_left = self.payload_len();
                self.in_payload = true;
                if self.payload_left == 0 {
                    self.in_payload = false;
                    self.have = 0;
                }
            }
        }
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        !self.in_payload && self.have == 0
    }

    /// Most bytes that can pass without crossing the next frame boundary (at least 1).
    pub fn to_boundary(&self) -> usize {
        if self.in_payload {
            self.payload_left.min(usize::MAX as u64) as usize
        } else {
            (self.head_len() - self.have).max(1)
        }
    }
}

/// A Close frame with status 1008 and `reason`; masked (as a client sends it) when `mask` is set.
pub fn close_frame(reason: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&1008u16.to_be_bytes());
    payload.extend_from_slice(&reason[..reason.len().min(123)]);
    let mut f = vec![0x88, payload.len() as u8];
    if let Some(m) = mask {
        f[1] |= 0x80;
        f.extend_from_slice(&m);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    f.extend_from_slice(&payload);
    f
}

fn random_mask() -> [u8; 4] {
    use aws_lc_rs::rand::SecureRandom;
    let mut m = [0u8; 4];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut m);
    m
}

/// Copy `from` → `to` until EOF or `stop`; on `stop`, finish the current WebSocket frame (for
/// at most a second), send a Close frame when `websocket`, and shut `to` down.
async fn pump<R, W>(mut from: R, mut to: W, websocket: bool, to_app: bool, mut stop: watch::Receiver<Option<End>>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut frames = FrameTracker::default();
    let end = loop {
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if websocket {
                        frames.advance(&buf[..n]);
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            r = stop.changed() => match (r, *stop.borrow()) {
                (Ok(()), Some(end)) => break end,
                (Err(_), _) => return,
                _ => continue,
            },
        }
    };
    if websocket {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !frames.at_boundary() {
            let n = frames.to_boundary().min(buf.len());
            match tokio::time::timeout_at(deadline, from.read(&mut buf[..n])).await {
                Ok(Ok(n)) if n > 0 => {
                    frames.advance(&buf[..n]);
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ => break,
            }
        }
        if frames.at_boundary() {
            let frame = close_frame(end.reason(), to_app.then(random_mask));
            let _ = to.write_all(&frame).await;
        }
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
}

/// Relay an upgraded connection between the client and the app while `grant` stays valid.
pub async fn tunnel<C, U>(app: Arc<App>, grant: Option<Grant>, client: C, upstream: U, websocket: bool)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let (stop_tx, stop_rx) = watch::channel(None);
    let pumps = async {
        tokio::join!(pump(cr, uw, websocket, true, stop_rx.clone()), pump(ur, cw, websocket, false, stop_rx.clone()));
    };
    tokio::pin!(pumps);
    let watcher = async {
        match &grant {
            Some(g) => watch_grant(&app, g).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = &mut pumps => {}
        end = watcher => {
            app.metrics.long_lived_ended.get_or_create(&crate::metrics::OutcomeLabel::new(end.label())).inc();
            tracing::info!(reason = end.label(), "closing an upgraded connection: its token is no longer valid");
            let _ = stop_tx.send(Some(end));
            let _ = tokio::time::timeout(Duration::from_secs(3), pumps).await;
        }
    }
}

// ---- streaming responses --------------------------------------------------------------------

/// The stream ended because its token is no longer valid.
#[derive(Debug, thiserror::Error)]
#[error("response stream ended: token {0}")]
pub struct StreamEnded(&'static str);

/// A re-check runs as its own task: the body only holds its handle (a body must be `Sync`).
type CheckFuture = tokio::task::JoinHandle<Result<Option<End>, ()>>;

/// A response body that re-checks its token while it streams. No timer or task exists until the
/// body first has to wait for the app: a short response costs nothing extra.
pub struct Revalidated<B> {
    inner: B,
    app: Arc<App>,
    grant: Grant,
    /// End cleanly (`text/event-stream`) instead of aborting.
    clean_end: bool,
    next_check: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    check: Option<CheckFuture>,
    unknown: u32,
    done: bool,
}

impl<B> Drop for Revalidated<B> {
    fn drop(&mut self) {
        if let Some(check) = self.check.take() {
            check.abort();
        }
    }
}

impl<B> Revalidated<B> {
    pub fn new(inner: B, app: Arc<App>, grant: Grant, clean_end: bool) -> Self {
        let first = Duration::from_millis(app.cfg.limits.revalidate_interval_ms).min(until_expiry(&app, &grant));
        Revalidated {
            inner,
            app,
            grant,
            clean_end,
            next_check: Instant::now() + first,
            timer: None,
            check: None,
            unknown: 0,
            done: false,
        }
    }

    fn schedule_next(&mut self) {
        let interval = Duration::from_millis(self.app.cfg.limits.revalidate_interval_ms);
        self.next_check = Instant::now() + interval.min(until_expiry(&self.app, &self.grant));
        if let Some(t) = self.timer.as_mut() {
            t.as_mut().reset(self.next_check);
        }
    }

    fn start_check(&mut self) {
        let (app, grant) = (self.app.clone(), self.grant.clone());
        self.check = Some(tokio::spawn(async move { recheck(&app, &grant).await }));
    }
}

impl<B> HttpBody for Revalidated<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if this.check.is_none() && Instant::now() >= this.next_check {
                this.start_check();
            }
            if let Some(check) = this.check.as_mut() {
                match Pin::new(check).poll(cx) {
                    Poll::Ready(joined) => {
                        this.check = None;
                        let verdict = joined.unwrap_or(Err(()));
                        let end = match verdict {
                            Ok(None) => {
                                this.unknown = 0;
                                None
                            }
                            Ok(Some(end)) => Some(end),
                            Err(()) => {
                                this.unknown += 1;
                                (this.app.cfg.failure_policy == FailurePolicy::Closed && this.unknown >= 2)
                                    .then_some(End::Unknown)
                            }
                        };
                        if let Some(end) = end {
                            this.done = true;
                            this.app
                                .metrics
                                .long_lived_ended
                                .get_or_create(&crate::metrics::OutcomeLabel::new(end.label()))
                                .inc();
                            tracing::info!(
                                reason = end.label(),
                                "ending a streaming response: its token is no longer valid"
                            );
                            return Poll::Ready(if this.clean_end {
                                None
                            } else {
                                Some(Err(Box::new(StreamEnded(end.label()))))
                            });
                        }
                        this.schedule_next();
                    }
                    Poll::Pending => {}
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(f) => return Poll::Ready(f),
                Poll::Pending => {}
            }
            if this.check.is_some() {
                return Poll::Pending;
            }
            let next = this.next_check;
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that must keep arriving: a pause longer than `limit` between two of its pieces
/// aborts the request (slow-body clients cannot hold a connection and the app's request open).
pub struct BodyDeadline<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> BodyDeadline<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        BodyDeadline { inner, limit, timer: None }
    }
}

/// The client paused its request body for longer than `limits.bodyReadTimeoutMs`.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled")]
pub struct BodyStalled;

impl<B> HttpBody for BodyDeadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.timer = None;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin_op: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut f = vec![fin_op];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn boundaries_are_found_whatever_the_chunking() {
        let mut stream = Vec::new();
        let mut boundaries = vec![0usize];
        for (len, mask) in [(0, false), (5, true), (125, false), (126, true), (300, false), (70_000, true)] {
            stream.extend(frame(0x82, &vec![7u8; len], mask));
            boundaries.push(stream.len());
        }
        for chunk in [1usize, 2, 3, 7, 13, 1000, stream.len()] {
            let mut t = FrameTracker::default();
            let mut pos = 0;
            let mut seen = vec![0usize];
            while pos < stream.len() {
                let n = chunk.min(stream.len() - pos).min(t.to_boundary());
                t.advance(&stream[pos..pos + n]);
                pos += n;
                if t.at_boundary() {
                    seen.push(pos);
                }
            }
            assert_eq!(seen, boundaries, "chunk {chunk}");
        }
        // Mid-frame is not a boundary, and to_boundary never crosses one.
        let mut t = FrameTracker::default();
        t.advance(&stream[..boundaries[2] + 3]);
        assert!(!t.at_boundary());
        assert!(boundaries[2] + 3 + t.to_boundary() <= boundaries[3]);
    }

    #[test]
    fn close_frames_are_well_formed() {
        let f = close_frame(b"token revoked", None);
        assert_eq!(f[0], 0x88);
        assert_eq!(f[1] as usize, 2 + 13);
        assert_eq!(&f[2..4], &1008u16.to_be_bytes());
        assert_eq!(&f[4..], b"token revoked");
        let m = [9, 8, 7, 6];
        let f = close_frame(b"token expired", Some(m));
        assert_eq!(f[1], 0x80 | 15);
        let unmasked: Vec<u8> = f[6..].iter().enumerate().map(|(i, b)| b ^ m[i % 4]).collect();
        assert_eq!(&unmasked[..2], &1008u16.to_be_bytes());
        assert_eq!(&unmasked[2..], b"token expired");
        // A control frame's payload is at most 125 bytes.
        assert!(close_frame(&[b'x'; 500], None).len() <= 127);
    }
}
