//! HTTP/1 message-framing guard in front of hyper.
//!
//! hyper follows RFC 9112 §6.3 for a request that carries both `Content-Length` and
//! `Transfer-Encoding`: it drops the length, uses the chunked framing and closes the
//! connection afterwards. It also silently merges repeated identical `Content-Length`
//! headers. Those are exactly the requests that desynchronise proxy chains (request
//! smuggling), so the sidecar refuses them outright: this guard sits between the socket
//! and hyper, tracks request boundaries (heads, `Content-Length` bodies, chunked bodies),
//! and when a head carries both framing headers or either one twice, it hands hyper a
//! head with an invalid `Content-Length` instead, so hyper answers `400 Bad Request` and
//! closes the connection. The app never sees the request.
//!
//! HTTP/2 (prior knowledge preface) and upgraded connections are passed through untouched. A
//! connection counts as upgraded only once the sidecar has answered `101 Switching Protocols`
//! (the server flips the flag given to [`Guarded::new`]); an `Upgrade` header alone changes
//! nothing, so a refused upgrade cannot switch the guard off for the rest of the connection.
//!
//! The guard also enforces the header deadline (`limits.headerReadTimeoutMs`) in place of hyper's
//! per-request timer: while the connection reads a request head and no request is in progress,
//! the head must be complete within the timeout of the moment the previous request ended (or the
//! connection was accepted), else the read fails with `TimedOut` and hyper closes the connection.
//! One timer per connection: it is armed once and, when it fires early (requests were served
//! meanwhile), re-armed for the current deadline, so a request costs no timer registration.
//!
//! A head ends where httparse (hyper's parser) says it does: a line end (`\n` or `\r\n`)
//! followed by an empty line (`\n` or `\r\n`). The guard's head limit is set above hyper's
//! buffer limit, so hyper has answered `431` before the guard would stop inspecting a head.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::server::Activity;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A head hyper will reject with 400 (invalid Content-Length), replacing a smuggling attempt.
pub const POISON_HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: rejected\r\ncontent-length: ambiguous\r\n\r\n";

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Collecting a request head (or the connection preface).
    Head,
    /// Passing `n` more body bytes.
    Body(u64),
    /// Chunked body: reading a chunk-size line.
    ChunkSize,
    /// Chunked body: passing chunk data, then its CRLF (the +2).
    ChunkData(u64),
    /// Chunked body: trailer section, until an empty line.
    Trailers,
    /// HTTP/2, an upgraded protocol, or something we do not understand: hyper decides.
    PassThrough,
}

/// The framing decision for one request head.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    Ok {
        body: BodyFraming,
    },
    /// Both framing headers, or one of them repeated.
    Ambiguous,
    /// Not parseable here: let hyper produce its own error.
    Unknown,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// Classify a complete request head (up to and including the blank line).
pub fn inspect_head(head: &[u8]) -> HeadVerdict {
    // Uninitialised slots: no 8 KiB of empty headers to write for every head.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; 256];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return HeadVerdict::Unknown,
    }
    // How many of each framing header, and the first one's value (no allocation).
    type Seen<'a> = (usize, Option<&'a [u8]>);
    let (mut cl, mut te): (Seen<'_>, Seen<'_>) = ((0, None), (0, None));
    for h in req.headers.iter() {
        let seen = if h.name.eq_ignore_ascii_case("content-length") {
            &mut cl
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            &mut te
        } else {
            continue;
        };
        seen.0 += 1;
        seen.1.get_or_insert(h.value);
    }
    if cl.0 > 1 || te.0 > 1 || (cl.0 > 0 && te.0 > 0) {
        return HeadVerdict::Ambiguous;
    }
    let (cl, te) = (cl.1, te.1);
    if let Some(v) = te {
        let last = v.rsplit(|&b| b == b',').next().unwrap_or(b"");
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return HeadVerdict::Ok { body: BodyFraming::Chunked };
        }
        return HeadVerdict::Unknown;
    }
    if let Some(v) = cl {
        return match std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if v.iter().all(|b| b.is_ascii_digit() || *b == b' ' || *b == b'\t') => {
                HeadVerdict::Ok { body: BodyFraming::Length(n) }
            }
            _ => HeadVerdict::Unknown,
        };
    }
    HeadVerdict::Ok { body: BodyFraming::None }
}

/// Where the scanner's output goes: a prefix of the input passed as it is (no copy), then
/// anything else copied to `ready`.
struct Emit<'a> {
    ready: &'a mut BytesMut,
    /// Bytes `input[..prefix]` are passed in place.
    prefix: usize,
    in_place: bool,
}

impl Emit<'_> {
    fn pass(&mut self, input: &[u8], from: usize, to: usize) {
        if self.in_place && from == self.prefix {
            self.prefix = to;
        } else {
            self.in_place = false;
            self.ready.extend_from_slice(&input[from..to]);
        }
    }
    fn other(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.in_place = false;
            self.ready.extend_from_slice(bytes);
        }
    }
}

/// One step of head collection (see [`Scanner::head_step`]).
enum HeadStep {
    /// An empty line before a request line, this long: passed.
    EmptyLine(usize),
    /// An incomplete head: hold it back.
    Hold,
    /// Hand everything from here on to hyper unchanged.
    Through,
    /// The HTTP/2 connection preface: hand everything from here on to hyper unchanged.
    Preface,
    /// A complete head of this length, and its verdict.
    Head(usize, HeadVerdict),
}

/// Index after the first head terminator (`\n\n` or `\n\r\n`) whose final `\n` is at or after `from`.
fn head_end(data: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', data.get(from..)?)
        .map(|p| p + from)
        .find(|&p| (p >= 1 && data[p - 1] == b'\n') || (p >= 2 && data[p - 2] == b'\n' && data[p - 1] == b'\r'))
        .map(|p| p + 1)
}

/// Incremental scanner: feed it bytes read from the client; it returns the bytes hyper
/// should see.
///
/// It works a slice at a time (memchr for line ends, body bytes skipped by length); the
/// decisions are those of a byte-at-a-time reading: a head ends at the first `\n\n` or
/// `\n\r\n`, empty lines before a request line pass, a head longer than `max_head` and anything
/// not understood pass through to hyper, chunk-size lines are bounded at 1 KiB and trailer lines
/// at `max_head`.
pub struct Scanner {
    state: State,
    /// Bytes held back: an incomplete head, chunk-size line or trailer line.
    buf: BytesMut,
    max_head: usize,
    first: bool,
    poisoned: bool,
    /// Still HTTP/1: no HTTP/2 preface seen, no protocol switch.
    http1: bool,
}

impl Scanner {
    pub fn new(max_head: usize) -> Self {
        Scanner { state: State::Head, buf: BytesMut::new(), max_head, first: true, poisoned: false, http1: true }
    }

    /// True once an ambiguous request was replaced by [`POISON_HEAD`].
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Everything from here on passes unchanged (HTTP/2, upgraded, poisoned, or not understood).
    pub fn passing_through(&self) -> bool {
        self.state == State::PassThrough
    }

    /// HTTP/1 and, as far as the scanner knows, between requests or inside a request head: in
    /// the head state, or passing through a connection it stopped understanding (not HTTP/2,
    /// not a switched protocol).
    pub fn may_await_head(&self) -> bool {
        self.http1 && matches!(self.state, State::Head | State::PassThrough)
    }

    /// Consume `input`, appending what hyper may read to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) {
        let mut emit = Emit { ready: out, prefix: 0, in_place: false };
        self.run(input, &mut emit);
    }

    /// Consume `input`: hyper may read `input[..n]` as it is (the returned `n`), followed by
    /// what was appended to `ready`.
    pub fn feed_in_place(&mut self, input: &[u8], ready: &mut BytesMut) -> usize {
        let mut emit = Emit { ready, prefix: 0, in_place: true };
        self.run(input, &mut emit);
        emit.prefix
    }

    /// The server answered `101 Switching Protocols`: everything from here on (including bytes
    /// already held back) belongs to the new protocol.
    pub fn switch_protocols(&mut self, out: &mut BytesMut) {
        self.http1 = false;
        if self.state != State::PassThrough {
            out.extend_from_slice(&self.buf);
            self.buf.clear();
            self.state = State::PassThrough;
        }
    }

    fn pass_through(&mut self, emit: &mut Emit<'_>) {
        emit.other(&self.buf);
        self.buf.clear();
        self.state = State::PassThrough;
    }

    fn run(&mut self, input: &[u8], emit: &mut Emit<'_>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::PassThrough => {
                    emit.pass(input, i, input.len());
                    return;
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = n.min((input.len() - i) as u64);
                    emit.pass(input, i, i + take as usize);
                    i += take as usize;
                    let left = n - take;
                    self.state = match self.state {
                        State::Body(_) if left == 0 => State::Head,
                        State::Body(_) => State::Body(left),
                        _ if left == 0 => State::ChunkSize,
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkSize | State::Trailers => i = self.line(input, i, emit),
                State::Head if self.buf.is_empty() => {
                    match self.head_step(&input[i..], 0) {
                        HeadStep::EmptyLine(n) => {
                            emit.pass(input, i, i + n);
                            i += n;
                        }
                        HeadStep::Hold => {
                            self.buf.extend_from_slice(&input[i..]);
                            i = input.len();
                        }
                        HeadStep::Through => self.state = State::PassThrough,
                        HeadStep::Preface => {
                            self.http1 = false;
                            self.state = State::PassThrough;
                        }
                        HeadStep::Head(len, verdict) => {
                            match self.after_head(verdict) {
                                Some(true) => emit.pass(input, i, i + len),
                                Some(false) => emit.other(POISON_HEAD),
                                None => continue, // pass through, head included
                            }
                            i += len;
                        }
                    }
                }
                State::Head => {
                    // The head began in an earlier read: continue it in `buf` (its first `old`
                    // bytes were searched already).
                    let old = self.buf.len();
                    self.buf.extend_from_slice(&input[i..]);
                    i = input.len();
                    let data = std::mem::take(&mut self.buf);
                    let step = self.head_step(&data, old);
                    let used = match &step {
                        HeadStep::Hold => {
                            self.buf = data;
                            continue;
                        }
                        HeadStep::EmptyLine(n) | HeadStep::Head(n, _) => *n,
                        HeadStep::Through => 0,
                        HeadStep::Preface => {
                            self.http1 = false;
                            0
                        }
                    };
                    let passed = used >= old
                        && used > 0
                        && match step {
                            HeadStep::EmptyLine(n) => {
                                emit.other(&data[..n]);
                                true
                            }
                            HeadStep::Head(len, verdict) => match self.after_head(verdict) {
                                Some(true) => {
                                    emit.other(&data[..len]);
                                    true
                                }
                                Some(false) => {
                                    emit.other(POISON_HEAD);
                                    true
                                }
                                None => false,
                            },
                            _ => false,
                        };
                    if !passed {
                        // Not understood here (or bytes held earlier would be split): hyper decides.
                        self.buf = data;
                        self.pass_through(emit);
                        continue;
                    }
                    // The rest came from this input: read it again from there.
                    i = input.len() - (data.len() - used);
                }
            }
        }
    }

    /// Classify the start of `data` (a head being collected; `searched`: bytes known to hold no
    /// head end).
    fn head_step(&self, data: &[u8], searched: usize) -> HeadStep {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        match data {
            [b'\n', ..] => return HeadStep::EmptyLine(1),
            [b'\r', b'\n', ..] => return HeadStep::EmptyLine(2),
            [b'\r'] => return HeadStep::Hold,
            _ => {}
        }
        let mut from = searched;
        if self.first {
            let same = data.iter().zip(H2_PREFACE).take_while(|(a, b)| a == b).count();
            if same == H2_PREFACE.len() {
                return HeadStep::Preface;
            }
            if same == data.len() {
                return HeadStep::Hold;
            }
            // A head cannot end inside what still read as the preface.
            from = from.max(same);
        }
        match head_end(data, from) {
            // Larger than hyper's buffer (see `Guarded::new`): hyper answers 431.
            Some(len) if len > self.max_head => HeadStep::Through,
            Some(len) => HeadStep::Head(len, inspect_head(&data[..len])),
            None if data.len() > self.max_head => HeadStep::Through,
            None => HeadStep::Hold,
        }
    }

    /// Act on a complete head: `Some(true)` pass it, `Some(false)` replace it with
    /// [`POISON_HEAD`], `None` pass through from the head on.
    fn after_head(&mut self, verdict: HeadVerdict) -> Option<bool> {
        self.first = false;
        match verdict {
            HeadVerdict::Ok { body } => {
                self.state = match body {
                    BodyFraming::None | BodyFraming::Length(0) => State::Head,
                    BodyFraming::Length(n) => State::Body(n),
                    BodyFraming::Chunked => State::ChunkSize,
                };
                Some(true)
            }
            HeadVerdict::Ambiguous => {
                // hyper closes after the 400; nothing more is forwarded.
                self.state = State::PassThrough;
                self.poisoned = true;
                Some(false)
            }
            HeadVerdict::Unknown => {
                self.state = State::PassThrough;
                None
            }
        }
    }

    /// A chunk-size or trailer line from `input[i..]`; returns where the next input starts.
    fn line(&mut self, input: &[u8], i: usize, emit: &mut Emit<'_>) -> usize {
        let limit = if self.state == State::ChunkSize { 1024 } else { self.max_head };
        let Some(nl) = memchr::memchr(b'\n', &input[i..]) else {
            self.buf.extend_from_slice(&input[i..]);
            if self.buf.len() > limit {
                self.pass_through(emit);
            }
            return input.len();
        };
        let end = i + nl + 1;
        // The line without its `\n` may be at most `limit` long.
        if self.buf.len() + nl > limit {
            if self.buf.is_empty() {
                self.state = State::PassThrough;
                return i;
            }
            self.buf.extend_from_slice(&input[i..end]);
            self.pass_through(emit);
            return end;
        }
        let held = !self.buf.is_empty();
        if held {
            self.buf.extend_from_slice(&input[i..end]);
        }
        let line: &[u8] = if held { &self.buf } else { &input[i..end] };
        let next = if self.state == State::ChunkSize {
            let text = std::str::from_utf8(line).unwrap_or("");
            let size = text.split(';').next().unwrap_or("").trim();
            match u64::from_str_radix(size, 16) {
                Ok(0) => Some(State::Trailers),
                Ok(n) => Some(State::ChunkData(n.saturating_add(2))),
                Err(_) => None,
            }
        } else if line == b"\r\n" || line == b"\n" {
            Some(State::Head)
        } else {
            Some(State::Trailers)
        };
        match next {
            Some(state) => {
                if held {
                    emit.other(&self.buf);
                    self.buf.clear();
                } else {
                    emit.pass(input, i, end);
                }
                self.state = state;
                end
            }
            None if held => {
                self.pass_through(emit);
                end
            }
            None => {
                self.state = State::PassThrough;
                i
            }
        }
    }
}

/// A client connection seen through a [`Scanner`]. Reads go straight into hyper's buffer; only
/// a head split across reads (or a replaced one) is copied.
pub struct Guarded<T> {
    inner: T,
    scanner: Scanner,
    ready: BytesMut,
    switched: Arc<AtomicBool>,
    head: Option<HeadDeadline>,
}

/// The header deadline of one connection (see the module documentation).
struct HeadDeadline {
    timeout: Duration,
    activity: Arc<Activity>,
    /// Armed at a deadline no later than the current one; allocated at the first wait.
    timer: Option<Pin<Box<Sleep>>>,
}

impl HeadDeadline {
    /// Called when a read of a request head found nothing to read: `Ready(Err)` once the head is
    /// late, else `Pending` with the timer armed to wake the task no later than the deadline.
    fn poll_late(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A request in progress (its body may still be read, its response still sent): no deadline.
        let Some(since) = self.activity.waiting_since() else { return Poll::Pending };
        let deadline = tokio::time::Instant::from_std(since + self.timeout);
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Deadlines only move later, so a timer that fired at or after this one means
                // the head is late; one set for an earlier request is moved to this deadline.
                Poll::Ready(()) if timer.deadline() >= deadline => {
                    tracing::debug!("request head not received within limits.headerReadTimeoutMs; closing");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head timed out")));
                }
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
        }
    }
}

impl<T> Guarded<T> {
    /// `max_head` must exceed hyper's read-buffer limit, so that hyper rejects an oversized head
    /// (431) before the guard gives up inspecting it. `switched` is set by the server when it
    /// answers `101 Switching Protocols` on this connection.
    pub fn new(inner: T, max_head: usize, switched: Arc<AtomicBool>) -> Self {
        Guarded { inner, scanner: Scanner::new(max_head), ready: BytesMut::new(), switched, head: None }
    }

    /// Enforce the header deadline: a request head must be complete within `timeout` of the
    /// moment `activity` last had no request in progress (see the module documentation).
    pub fn with_head_deadline(mut self, timeout: Duration, activity: Arc<Activity>) -> Self {
        self.head = Some(HeadDeadline { timeout, activity, timer: None });
        self
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.switched.load(Ordering::Acquire) {
                this.scanner.switch_protocols(&mut this.ready);
            }
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            if Pin::new(&mut this.inner).poll_read(cx, buf)?.is_pending() {
                return match this.head.as_mut() {
                    Some(head) if this.scanner.may_await_head() => head.poll_late(cx),
                    _ => Poll::Pending,
                };
            }
            let end = buf.filled().len();
            if end == start || this.scanner.passing_through() {
                return Poll::Ready(Ok(())); // EOF, or nothing to inspect
            }
            let pass = this.scanner.feed_in_place(&buf.filled()[start..end], &mut this.ready);
            buf.set_filled(start + pass);
            if pass > 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing passed in place: held back, or moved to `ready`.
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut s = Scanner::new(8192);
        let mut out = BytesMut::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        (out.to_vec(), s.poisoned())
    }

    #[test]
    fn ordinary_requests_pass_unchanged_even_split_byte_by_byte() {
        let raw: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nCL: 1\r\n0\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        let (out, poisoned) = run(&[raw]);
        assert_eq!(out, raw);
        assert!(!poisoned);
        let bytes: Vec<&[u8]> = raw.chunks(1).collect();
        assert_eq!(run(&bytes).0, raw);
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_inspected() {
        // The body contains a smuggling-looking head; it is data, not a request.
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut raw = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(body);
        let (out, poisoned) = run(&[&raw]);
        assert_eq!(out, raw);
        assert!(!poisoned);
    }

    #[test]
    fn ambiguous_framing_is_poisoned() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut raw = head.to_vec();
            raw.extend_from_slice(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
            let (out, poisoned) = run(&[&raw]);
            assert!(poisoned, "{}", String::from_utf8_lossy(head));
            assert!(out.starts_with(POISON_HEAD));
            assert!(!out.windows(9).any(|w| w == b"/smuggled".as_slice()) || out.len() > POISON_HEAD.len());
        }
    }

    #[test]
    fn second_request_on_a_connection_is_checked_too() {
        let raw: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, poisoned) = run(&[raw]);
        assert!(poisoned);
        assert!(out.starts_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    #[test]
    fn h2_preface_passes_through() {
        let mut raw = H2_PREFACE.to_vec();
        raw.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(run(&[&raw]), (raw.clone(), false));
    }

    #[test]
    fn upgrades_pass_through_only_after_101() {
        let head: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let mut s = Scanner::new(8192);
        let mut out = BytesMut::new();
        s.feed(head, &mut out);
        // Frames sent early are held back, not inspected as HTTP, until the server decides.
        s.feed(b"\x81\x05hello", &mut out);
        assert_eq!(&out[..], head);
        s.switch_protocols(&mut out);
        s.feed(b"\x81\x02hi", &mut out);
        let mut want = head.to_vec();
        want.extend_from_slice(b"\x81\x05hello\x81\x02hi");
        assert_eq!(&out[..], &want[..]);
        assert!(!s.poisoned());
    }

    #[test]
    fn an_upgrade_header_alone_does_not_switch_the_guard_off() {
        let raw: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (out, poisoned) = run(&[raw]);
        assert!(poisoned);
        assert!(!out.windows(8).any(|w| w == b"/smuggle"));
    }

    #[test]
    fn bare_lf_heads_are_inspected_too() {
        for raw in [
            &b"POST /smuggle HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n\r\n0\r\n\r\n"[..],
            b"POST /smuggle HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n\n0\r\n\r\n",
        ] {
            let (out, poisoned) = run(&[raw]);
            assert!(poisoned, "{}", String::from_utf8_lossy(raw));
            assert!(out.starts_with(POISON_HEAD));
        }
    }

    /// The byte-at-a-time scanner this one replaced: the reference for its decisions.
    mod reference {
        use super::super::*;

        pub(super) struct Reference {
            state: State,
            buf: BytesMut,
            max_head: usize,
            first: bool,
            poisoned: bool,
        }

        impl Reference {
            pub(super) fn new(max_head: usize) -> Self {
                Reference { state: State::Head, buf: BytesMut::new(), max_head, first: true, poisoned: false }
            }

            /// True once an ambiguous request was replaced by [`POISON_HEAD`].
            pub(super) fn poisoned(&self) -> bool {
                self.poisoned
            }

            /// Consume `input`, appending what hyper may read to `out`.
            pub(super) fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) {
                while !input.is_empty() {
                    match self.state {
                        State::PassThrough => {
                            out.extend_from_slice(input);
                            return;
                        }
                        State::Body(n) => {
                            let take = (n.min(input.len() as u64)) as usize;
                            out.extend_from_slice(&input[..take]);
                            input = &input[take..];
                            self.state = if n - take as u64 == 0 { State::Head } else { State::Body(n - take as u64) };
                        }
                        State::ChunkData(n) => {
                            let take = (n.min(input.len() as u64)) as usize;
                            out.extend_from_slice(&input[..take]);
                            input = &input[take..];
                            self.state =
                                if n - take as u64 == 0 { State::ChunkSize } else { State::ChunkData(n - take as u64) };
                        }
                        State::Head | State::ChunkSize | State::Trailers => {
                            // Line-oriented states: buffer until the terminator.
                            let byte = input[0];
                            input = &input[1..];
                            self.buf.extend_from_slice(&[byte]);
                            self.after_byte(out);
                        }
                    }
                }
            }

            fn pass_through(&mut self, out: &mut BytesMut) {
                out.extend_from_slice(&self.buf);
                self.buf.clear();
                self.state = State::PassThrough;
            }

            fn after_byte(&mut self, out: &mut BytesMut) {
                match self.state {
                    State::Head => {
                        if self.first && H2_PREFACE.starts_with(&self.buf) {
                            if self.buf.len() == H2_PREFACE.len() {
                                self.pass_through(out);
                            }
                            return;
                        }
                        // Empty lines before a request line are allowed (RFC 9112 §2.2).
                        if self.buf.as_ref() == b"\r\n" || self.buf.as_ref() == b"\n" {
                            out.extend_from_slice(&self.buf);
                            self.buf.clear();
                            return;
                        }
                        if self.buf.len() > self.max_head {
                            // Larger than hyper's buffer (see `Guarded::new`): hyper answers 431.
                            return self.pass_through(out);
                        }
                        // "\n\r\n" also covers "\r\n\r\n"; httparse accepts bare LF line ends.
                        if self.buf.ends_with(b"\n\r\n") || self.buf.ends_with(b"\n\n") {
                            self.first = false;
                            match inspect_head(&self.buf) {
                                HeadVerdict::Ok { body } => {
                                    out.extend_from_slice(&self.buf);
                                    self.buf.clear();
                                    self.state = match body {
                                        BodyFraming::None | BodyFraming::Length(0) => State::Head,
                                        BodyFraming::Length(n) => State::Body(n),
                                        BodyFraming::Chunked => State::ChunkSize,
                                    };
                                }
                                HeadVerdict::Ambiguous => {
                                    out.extend_from_slice(POISON_HEAD);
                                    self.buf.clear();
                                    // hyper closes after the 400; nothing more is forwarded.
                                    self.state = State::PassThrough;
                                    self.poisoned = true;
                                }
                                HeadVerdict::Unknown => self.pass_through(out),
                            }
                        }
                    }
                    State::ChunkSize => {
                        if self.buf.ends_with(b"\n") {
                            let line = std::str::from_utf8(&self.buf).unwrap_or("");
                            let size = line.split(';').next().unwrap_or("").trim();
                            match u64::from_str_radix(size, 16) {
                                Ok(0) => {
                                    out.extend_from_slice(&self.buf);
                                    self.buf.clear();
                                    self.state = State::Trailers;
                                }
                                Ok(n) => {
                                    out.extend_from_slice(&self.buf);
                                    self.buf.clear();
                                    self.state = State::ChunkData(n.saturating_add(2));
                                }
                                Err(_) => self.pass_through(out),
                            }
                        } else if self.buf.len() > 1024 {
                            self.pass_through(out);
                        }
                    }
                    State::Trailers => {
                        if self.buf.ends_with(b"\n") {
                            let empty = self.buf.as_ref() == b"\r\n" || self.buf.as_ref() == b"\n";
                            out.extend_from_slice(&self.buf);
                            self.buf.clear();
                            if empty {
                                self.state = State::Head;
                            }
                        } else if self.buf.len() > self.max_head {
                            self.pass_through(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Old (byte at a time) and new (slice at a time, in place) give hyper the same bytes and
    /// the same verdict, for any input split into any reads.
    fn same_as_reference(input: &[u8], cuts: &[usize], max_head: usize) {
        let mut want = BytesMut::new();
        let mut r = reference::Reference::new(max_head);
        let mut got = BytesMut::new();
        let mut s = Scanner::new(max_head);
        let mut at = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        bounds.push(input.len());
        bounds.sort_unstable();
        for b in bounds {
            let piece = &input[at..b];
            at = b;
            r.feed(piece, &mut want);
            let mut ready = BytesMut::new();
            let n = s.feed_in_place(piece, &mut ready);
            got.extend_from_slice(&piece[..n]);
            got.extend_from_slice(&ready);
        }
        assert_eq!(got, want, "input {:?} cuts {cuts:?}", String::from_utf8_lossy(input));
        assert_eq!(s.poisoned(), r.poisoned());
    }

    fn message() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
            Just(&b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"[..]),
            Just(&b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nabcde\r\n0\r\nT: 1\r\n\r\n"[..]),
            Just(&b"POST /s HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..]),
            Just(&b"POST /d HTTP/1.1\nContent-Length: 1\nContent-Length: 1\n\nx"[..]),
            Just(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
            Just(&b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"[..]),
            Just(&b"\r\n"[..]),
            Just(&b"\n"[..]),
            Just(&b"\r"[..]),
            Just(&b"\r\r\n\r\n"[..]),
            Just(&b"zz\r\n"[..]),
            Just(&b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n"[..]),
            Just(&b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"[..]),
            proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b':'), Just(b'0')], 0..40)
                .prop_map(|v| &*Box::leak(v.into_boxed_slice())),
        ];
        proptest::collection::vec(piece, 1..8).prop_map(|ps| ps.concat())
    }

    proptest::proptest! {
        #[test]
        fn slice_scanner_matches_the_byte_scanner(
            input in message(),
            cuts in proptest::collection::vec(0usize..400, 0..6),
            max_head in proptest::prop_oneof![proptest::strategy::Just(8192usize), 16usize..80],
        ) {
            same_as_reference(&input, &cuts, max_head);
        }
    }

    #[test]
    fn long_chunk_size_lines_and_heads_match_the_reference() {
        let mut raw = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'0', 2000));
        raw.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        for cut in [0, 10, 60, 1000, 1070, 1100, 3000] {
            same_as_reference(&raw, &[cut], 8192);
        }
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 300));
        head.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        for cut in [0, 5, 200, 320, 330] {
            same_as_reference(&head, &[cut], 256);
            same_as_reference(&head, &[cut], 8192);
        }
    }
}
