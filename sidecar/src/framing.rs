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
//! A head ends where httparse (hyper's parser) says it does: a line end (`\n` or `\r\n`)
//! followed by an empty line (`\n` or `\r\n`). The guard's head limit is set above hyper's
//! buffer limit, so hyper has answered `431` before the guard would stop inspecting a head.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return HeadVerdict::Unknown,
    }
    let mut cl: Vec<&[u8]> = vec![];
    let mut te: Vec<&[u8]> = vec![];
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(h.value);
        }
    }
    if cl.len() > 1 || te.len() > 1 || (!cl.is_empty() && !te.is_empty()) {
        return HeadVerdict::Ambiguous;
    }
    if let Some(v) = te.first() {
        let last = v.rsplit(|&b| b == b',').next().unwrap_or(b"");
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return HeadVerdict::Ok { body: BodyFraming::Chunked };
        }
        return HeadVerdict::Unknown;
    }
    if let Some(v) = cl.first() {
        return match std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if v.iter().all(|b| b.is_ascii_digit() || *b == b' ' || *b == b'\t') => {
                HeadVerdict::Ok { body: BodyFraming::Length(n) }
            }
            _ => HeadVerdict::Unknown,
        };
    }
    HeadVerdict::Ok { body: BodyFraming::None }
}

/// Incremental scanner: feed it bytes read from the client; it returns the bytes hyper
/// should see.
pub struct Scanner {
    state: State,
    buf: BytesMut,
    max_head: usize,
    first: bool,
    poisoned: bool,
}

impl Scanner {
    pub fn new(max_head: usize) -> Self {
        Scanner { state: State::Head, buf: BytesMut::new(), max_head, first: true, poisoned: false }
    }

    /// True once an ambiguous request was replaced by [`POISON_HEAD`].
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Consume `input`, appending what hyper may read to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) {
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

    /// The server answered `101 Switching Protocols`: everything from here on (including bytes
    /// already held back) belongs to the new protocol.
    pub fn switch_protocols(&mut self, out: &mut BytesMut) {
        if self.state != State::PassThrough {
            self.pass_through(out);
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

/// A client connection seen through a [`Scanner`].
pub struct Guarded<T> {
    inner: T,
    scanner: Scanner,
    ready: BytesMut,
    scratch: Box<[u8]>,
    switched: Arc<AtomicBool>,
}

impl<T> Guarded<T> {
    /// `max_head` must exceed hyper's read-buffer limit, so that hyper rejects an oversized head
    /// (431) before the guard gives up inspecting it. `switched` is set by the server when it
    /// answers `101 Switching Protocols` on this connection.
    pub fn new(inner: T, max_head: usize, switched: Arc<AtomicBool>) -> Self {
        Guarded {
            inner,
            scanner: Scanner::new(max_head),
            ready: BytesMut::new(),
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
            switched,
        }
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
            let mut rb = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    if filled.is_empty() {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    let len = filled.len();
                    this.scanner.feed(&this.scratch[..len], &mut this.ready);
                }
                other => return other,
            }
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
}
