//! Bounded connections on the public listener, through the real sidecar binary: a connection
//! cap, idle timeouts for HTTP/1 and HTTP/2, header and body deadlines (slowloris), and HTTP/2
//! floods (rapid reset, CONTINUATION, PING, SETTINGS) that neither grow the sidecar's memory
//! beyond a bound nor stop other clients from being served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState};
use authrealm_tests::sidecar::{Sidecar, Upstream, test_config};
use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn keys() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::HS256, "k1", 0, KeyState::Current).unwrap()],
    }
}

async fn sidecar(upstream: &Upstream, tune: impl FnOnce(&mut authrealm_contract::SidecarConfig)) -> (Sidecar, String) {
    let mut cfg = test_config("limits", None);
    tune(&mut cfg);
    let keys = keys();
    let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
    let t = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    (s, t)
}

/// Wait until the server closes `c` (EOF or reset); how long that took, or None after `limit`.
async fn closed_within(c: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), c.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_connections_are_cut_off() {
    let upstream = Upstream::start().await.unwrap();
    let (s, token) = sidecar(&upstream, |c| {
        c.limits.max_connections = 8;
        c.limits.header_read_timeout_ms = 1000;
        c.limits.idle_timeout_ms = 1500;
        c.limits.body_read_timeout_ms = 1000;
    })
    .await;
    let auth = format!("Bearer {token}");

    // ---- slowloris: a head trickled byte by byte is cut at the header deadline.
    let c = TcpStream::connect(s.public).await.unwrap();
    let (mut r, mut w) = c.into_split();
    w.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n").await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if w.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let eof = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    trickle.abort();
    assert!(eof.is_ok(), "slow head not cut off");
    assert!(started.elapsed() < Duration::from_millis(2500), "{:?}", started.elapsed());

    // ---- an idle HTTP/1 keep-alive connection is closed.
    let mut c = TcpStream::connect(s.public).await.unwrap();
    c.write_all(format!("GET /x HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let took = closed_within(&mut c, Duration::from_secs(5)).await.expect("idle keep-alive closed");
    assert!(took < Duration::from_millis(3000), "{took:?}");

    // ---- an idle HTTP/2 connection gets GOAWAY and is closed; a busy one is not.
    let tcp = TcpStream::connect(s.public).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/x", s.public)).header("authorization", &auth).body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await.expect("idle HTTP/2 connection closed");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(started.elapsed() < Duration::from_millis(3500), "{:?}", started.elapsed());
    s.wait_metric("authrealm_sidecar_connections_idle_closed_total", |v| v >= 1.0).await;

    // ---- a request body that stalls is aborted; the app does not wait forever.
    let mut c = TcpStream::connect(s.public).await.unwrap();
    c.write_all(
        format!("POST /upload HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-length: 1000\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out).to_string();
    assert!(started.elapsed() < Duration::from_millis(3500), "stalled body held for {:?}", started.elapsed());
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");

    // ---- the connection cap: surplus connections are closed at once, counted, and the
    // listener serves again once connections go away.
    s.wait_metric("authrealm_sidecar_connections", |v| v == 0.0).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut c = TcpStream::connect(s.public).await.unwrap();
        c.write_all(format!("GET /x HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        c.read_exact(&mut first).await.unwrap();
        held.push(c);
    }
    s.wait_metric("authrealm_sidecar_connections", |v| v == 8.0).await;
    let mut extra = TcpStream::connect(s.public).await.unwrap();
    let _ = extra.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await.is_some(), "surplus connection closed");
    assert!(s.wait_metric("authrealm_sidecar_connections_refused_total", |v| v >= 1.0).await >= 1.0);
    drop(held);
    s.wait_metric("authrealm_sidecar_connections", |v| v == 0.0).await;
    assert_eq!(s.get("/x", Some(&token)).await.unwrap().status, StatusCode::OK);
}

/// Send one request on `c` and read its response (`Content-Length` framed): status line and body.
async fn exchange(c: &mut TcpStream, auth: &str, path: &str) -> (String, Vec<u8>) {
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 1, "connection closed before the response head");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).await.unwrap();
    (head.lines().next().unwrap().to_string(), body)
}

/// The header deadline, enforced by the framing guard on the public listener (hyper's per-request
/// timer is off there): it bounds a request head from the end of the previous request, also for
/// kept-alive connections and drip-fed second heads, and never runs while a request is in
/// progress — a slow app or a response the client reads slowly is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_deadline_counts_from_the_end_of_the_previous_request() {
    let upstream = Upstream::start().await.unwrap();
    let (s, token) = sidecar(&upstream, |c| {
        c.limits.header_read_timeout_ms = 1000;
        // Far beyond the test: any close seen here is the header deadline's.
        c.limits.idle_timeout_ms = 60_000;
        c.limits.body_read_timeout_ms = 60_000;
        c.upstream.response_timeout_ms = 10_000;
    })
    .await;
    let auth = format!("Bearer {token}");

    // ---- a connection that sends nothing is closed at the deadline.
    let mut c = TcpStream::connect(s.public).await.unwrap();
    let took = closed_within(&mut c, Duration::from_secs(5)).await.expect("silent connection closed");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");

    // ---- a kept-alive connection waits for its next request at most the header timeout.
    let mut c = TcpStream::connect(s.public).await.unwrap();
    assert_eq!(exchange(&mut c, &auth, "/x").await.0, "HTTP/1.1 200 OK");
    let took = closed_within(&mut c, Duration::from_secs(5)).await.expect("idle keep-alive closed");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");

    // ---- requests in a row for longer than the timeout: the deadline moves with each request.
    let mut c = TcpStream::connect(s.public).await.unwrap();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(2600) {
        assert_eq!(exchange(&mut c, &auth, "/x").await.0, "HTTP/1.1 200 OK", "request {n}");
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ---- ... and a second head drip-fed on that connection is cut one timeout after the last
    // response, not later.
    let last = Instant::now();
    let (mut r, mut w) = c.into_split();
    let trickle = tokio::spawn(async move {
        let _ = w.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n").await;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if w.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 256];
    let eof = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    trickle.abort();
    assert!(eof.is_ok(), "drip-fed second head not cut off");
    assert!(last.elapsed() < Duration::from_millis(2000), "{:?} after {n} requests", last.elapsed());

    // ---- a request in progress is not subject to it: a slow app ...
    let mut c = TcpStream::connect(s.public).await.unwrap();
    let (status, body) = exchange(&mut c, &auth, "/slow?ms=2500").await;
    assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b"slow"[..]));
    // ... nor a long response the client reads slowly (its body is still being sent).
    let total = 16 * 1024 * 1024;
    c.write_all(format!("GET /download?n={total} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; 64 * 1024];
    c.read_exact(&mut got).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rest = read_to_last_chunk(&mut c, Duration::from_secs(20)).await;
    assert!(rest.ends_with(b"\r\n0\r\n\r\n"), "download cut short after {} bytes", got.len() + rest.len());
    assert!(got.len() + rest.len() > total, "{} bytes", got.len() + rest.len());
}

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), here counted after the command name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A response that streams for longer than the idle timeout keeps its connection in progress: it
/// is neither cut nor does the connection's idle watchdog spin while the client pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streaming_past_the_idle_timeout_is_served_without_spinning() {
    let upstream = Upstream::start().await.unwrap();
    let (s, token) = sidecar(&upstream, |c| {
        c.limits.header_read_timeout_ms = 500;
        c.limits.idle_timeout_ms = 500;
        c.upstream.response_timeout_ms = 10_000;
    })
    .await;
    let total = 32 * 1024 * 1024;
    let mut c = TcpStream::connect(s.public).await.unwrap();
    c.write_all(
        format!("GET /download?n={total} HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {token}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut got = vec![0u8; 64 * 1024];
    c.read_exact(&mut got).await.unwrap();
    // The client pauses for six idle periods while the sidecar waits to write the rest.
    let before = cpu_ticks(s.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_ticks(s.pid()) - before;
    let hz = 100; // USER_HZ on Linux
    assert!(spent * 1000 / hz < 500, "the sidecar used {spent} clock ticks while the client paused");
    let rest = read_to_last_chunk(&mut c, Duration::from_secs(30)).await;
    assert!(rest.ends_with(b"\r\n0\r\n\r\n"), "download cut short after {} bytes", got.len() + rest.len());
    assert!(got.len() + rest.len() > total);
}

// ---- HTTP/2 floods --------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A minimal HPACK block for `GET /x` (indexed :method GET, :scheme http, :path /, literal
/// :authority without indexing).
fn hpack_get() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84];
    b.extend_from_slice(&[0x01, 0x01, b'a']);
    b
}

/// Write `chunks` of flood as fast as the server reads them, for at most `limit`; the bytes
/// written and whether the server closed the connection.
async fn flood(addr: std::net::SocketAddr, start: Vec<u8>, chunk: Vec<u8>, limit: Duration) -> (usize, bool) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(PREFACE).await.unwrap();
    c.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    c.write_all(&start).await.unwrap();
    let (mut r, mut w) = c.into_split();
    // Never read what the server sends back (its PING answers, SETTINGS acknowledgements…) except
    // to notice that it closed the connection.
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let closed = closed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            closed.store(true, Ordering::SeqCst);
        })
    };
    let started = Instant::now();
    let mut written = 0;
    let batch: Vec<u8> = chunk.iter().copied().cycle().take(chunk.len() * (64 * 1024 / chunk.len()).max(1)).collect();
    while started.elapsed() < limit && !closed.load(Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(500), w.write_all(&batch)).await {
            Ok(Ok(())) => written += batch.len(),
            Ok(Err(_)) => {
                closed.store(true, Ordering::SeqCst);
                break;
            }
            Err(_) => {} // the server stopped reading: backpressure, fine
        }
    }
    reader.abort();
    (written, closed.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_are_bounded_and_other_clients_are_served() {
    let upstream = Upstream::start().await.unwrap();
    let (s, token) = sidecar(&upstream, |_| {}).await;
    let auth = format!("Bearer {token}");
    // Warm up, then take the memory baseline.
    for _ in 0..20 {
        assert_eq!(s.get("/x", Some(&token)).await.unwrap().status, StatusCode::OK);
    }
    let baseline_kb = s.rss_kb();

    // Another client keeps making requests through every flood.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU32::new(0));
    let bystander = {
        let (stop, served, public, auth) = (stop.clone(), served.clone(), s.public, auth.clone());
        tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(format!("http://{public}/x"))
                    .header("authorization", &auth)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let started = Instant::now();
                let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
                    .await
                    .expect("bystander answered")
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                slowest = slowest.max(started.elapsed());
                served.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            slowest
        })
    };

    let get = hpack_get();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        // Rapid reset: open a stream and reset it at once, over and over (CVE-2023-44487).
        ("rapid reset", Vec::new(), {
            let mut v = Vec::new();
            for i in 0..64u32 {
                let id = 1 + 2 * i;
                v.extend(frame(0x1, 0x5, id, &get));
                v.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
            }
            v
        }),
        // CONTINUATION flood: a header block that never ends (CVE-2024-27316 family).
        ("continuation", frame(0x1, 0x1, 1, &get), frame(0x9, 0, 1, &[0x40, 0x01, b'a', 0x7f, 0x7f].repeat(3000))),
        // PING flood, never reading the answers.
        ("ping", Vec::new(), frame(0x6, 0, 0, &[7u8; 8])),
        // SETTINGS flood, never reading the acknowledgements.
        ("settings", Vec::new(), frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])),
    ];
    for (name, start, chunk) in cases {
        let (written, closed) = flood(s.public, start, chunk, Duration::from_secs(4)).await;
        let rss = s.rss_kb();
        eprintln!(
            "{name} flood: {} KiB written, closed by the sidecar: {closed}, sidecar RSS {rss} KiB (baseline {baseline_kb} KiB)",
            written / 1024
        );
        assert!(rss < baseline_kb + 32 * 1024, "{name}: RSS grew from {baseline_kb} to {rss} KiB");
        if name == "continuation" || name == "rapid reset" {
            assert!(closed, "{name}: the sidecar must end the connection");
        }
        // The sidecar itself is fine.
        assert_eq!(s.get("/x", Some(&token)).await.unwrap().status, StatusCode::OK, "{name}");
    }
    stop.store(true, Ordering::SeqCst);
    let slowest = bystander.await.unwrap();
    assert!(served.load(Ordering::SeqCst) > 20, "bystander served {} requests", served.load(Ordering::SeqCst));
    eprintln!("bystander: {} requests served, slowest {slowest:?}", served.load(Ordering::SeqCst));
    assert!(slowest < Duration::from_secs(2), "bystander waited {slowest:?}");
}

/// Reads a chunked response's rest up to its last chunk (`0\r\n\r\n`) or the connection's end;
/// fails the test if that takes longer than `limit` (the download stalled).
async fn read_to_last_chunk(c: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rest.extend_from_slice(&buf[..n]);
                    if rest.ends_with(b"\r\n0\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "download stalled");
    rest
}
