//! Proxy behaviour: streaming, upgrades, HTTP/2 (h2c), upstream failures, graceful
//! shutdown and key rotation under load — the real binary against a real upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use authrealm_tests::sidecar::{Sidecar, Upstream, free_port, metric_value, test_config};
use authrealm_tests::support::wait_for_some;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key_set(kid: &str) -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, kid, 0, KeyState::Current).unwrap()],
    }
}

fn kid_of(token: &str) -> String {
    let h = token.split('.').next().unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_upgrades_h2c_and_upstream_failures() {
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set("k1");
    let s = Sidecar::start(test_config("proxy", None), &keys, upstream.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {token}");
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();

    // Warm up, then measure memory while 50 MB go up and 50 MB come down.
    assert_eq!(s.get("/warm", Some(&token)).await.unwrap().status, StatusCode::OK);
    let rss_before = s.rss_kb();
    const SIZE: u64 = 50 * 1024 * 1024;
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), s.pid());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                    })
                    .unwrap_or(0);
                peak.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (SIZE / chunk.len() as u64) as usize;
    let stream =
        futures_util::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))));
    let req = Request::post(format!("http://{}/upload", s.public))
        .header("authorization", &auth)
        .body(StreamBody::new(stream).boxed())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["bytes"], SIZE, "the app received the whole upload");
    let req = Request::get(format!("http://{}/download?n={SIZE}", s.public))
        .header("authorization", &auth)
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, SIZE);
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(rss_before);
    println!("sidecar RSS before {rss_before} kB, peak growth {growth} kB while streaming 2 × 50 MB");
    assert!(growth < 16 * 1024, "memory grew by {growth} kB: bodies must be streamed, not buffered");

    // WebSocket-style upgrade after authentication; without a token the upgrade is refused.
    let mut conn = tokio::net::TcpStream::connect(s.public).await.unwrap();
    conn.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: app\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = conn.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    conn.write_all(b"ping through the tunnel").await.unwrap();
    let mut echo = vec![0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"ping through the tunnel");
    let out = s
        .raw(b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");

    // HTTP/2 with prior knowledge (h2c).
    let h2 =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{}/h2", s.public))
        .header("authorization", &auth)
        // HTTP/2 lets a client split cookies over several fields (RFC 9113 §8.2.3).
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = upstream.seen();
    let last = seen.iter().rev().find(|r| r.path == "/h2").unwrap();
    assert_eq!(last.headers["x-auth-subject"], "alice");
    let cookies: Vec<_> = last.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"], "the HTTP/1.1 app gets one joined Cookie header");
    let req = Request::get(format!("http://{}/h2", s.public)).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(h2.request(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // Slow app → 504 within the configured response timeout (2 s in tests).
    let started = Instant::now();
    let r = s.get("/slow?ms=6000", Some(&token)).await.unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());

    // A client that gives up mid-request: the in-flight gauge still comes back down.
    // (The app would answer after 5 s and the sidecar would give up at 2 s: the gauge must drop
    // well before either, when the client's connection goes away.)
    let gave_up = tokio::time::timeout(Duration::from_millis(300), s.get("/slow?ms=5000", Some(&token))).await;
    assert!(gave_up.is_err(), "the request should still have been in flight");
    let mut in_flight = String::new();
    for _ in 0..10 {
        let m = s.metrics().await.unwrap();
        in_flight =
            m.lines().find(|l| l.starts_with("authrealm_sidecar_in_flight_requests ")).unwrap_or("").to_string();
        if in_flight.ends_with(" 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight, "authrealm_sidecar_in_flight_requests 0");

    // App down → 502.
    let dead = Sidecar::start(test_config("proxy", None), &keys, format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .await
        .unwrap();
    let t = dead.mint("bob").await.unwrap()["access_token"].as_str().unwrap().to_string();
    assert_eq!(dead.get("/x", Some(&t)).await.unwrap().status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let upstream = Upstream::start().await.unwrap();
    let mut s = Sidecar::start(test_config("drain", None), &key_set("k1"), upstream.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    let public = s.public;
    let slow = tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::get(format!("http://{public}/slow?ms=1500"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req).await.map(|r| r.status())
    });
    // The request is in flight once the app has it.
    wait_for_some("the slow request at the app", Duration::from_secs(10), || async {
        upstream.seen().iter().any(|r| r.path == "/slow").then_some(())
    })
    .await
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let st = s.terminate().unwrap();
        (st, s)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert_eq!(slow.await.unwrap().unwrap(), StatusCode::OK, "the in-flight request finished during the drain");
    assert!(tokio::net::TcpStream::connect(public).await.is_err(), "no new connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_while_requests_flow() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let mut set = key_set("k1");
    let s = Sidecar::start(test_config("rotate", Some(cluster.seeds())), &set, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let old = s.mint("old-user").await.unwrap()["access_token"].as_str().unwrap().to_string();
    assert_eq!(kid_of(&old), "k1");

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failures, sent, old) = (stop.clone(), failures.clone(), sent.clone(), old.clone());
        let (public, client) =
            (s.public, hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(format!("http://{public}/x"))
                    .header("authorization", format!("Bearer {old}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let ok = matches!(client.request(req).await, Ok(r) if r.status() == StatusCode::OK);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let flowing = |sent: Arc<AtomicU64>, more: u64| {
        let from = sent.load(Ordering::Relaxed);
        wait_for_some("requests flowing", Duration::from_secs(10), move || {
            let sent = sent.clone();
            async move { (sent.load(Ordering::Relaxed) >= from + more).then_some(()) }
        })
    };
    flowing(sent.clone(), 20).await.unwrap();
    // Publish k2 as next, then promote it: the operator's two steps. Each check waits for the
    // reload to have happened (its counter), not for a time after which it probably has.
    let reloads = |outcome: &str| format!("authrealm_sidecar_key_reloads_total{{outcome=\"{outcome}\"}}");
    let mut k2 = generate(Alg::ES256, "k2", 1, KeyState::Next).unwrap();
    set.keys.push(k2.clone());
    let before = metric_value(&s.metrics().await.unwrap(), &reloads("ok"));
    s.write_key_set(&set).unwrap();
    s.wait_metric(&reloads("ok"), |v| v > before).await;
    assert_eq!(
        kid_of(s.mint("during-next").await.unwrap()["access_token"].as_str().unwrap()),
        "k1",
        "a next key does not sign"
    );
    set.keys[0].state = KeyState::Retired;
    k2.state = KeyState::Current;
    set.keys[1] = k2;
    s.write_key_set(&set).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let new = loop {
        let t = s.mint("new-user").await.unwrap()["access_token"].as_str().unwrap().to_string();
        if kid_of(&t) == "k2" {
            break t;
        }
        assert!(Instant::now() < deadline, "new key never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A broken file never replaces a working key set (checked once the reload tried it).
    let errors = metric_value(&s.metrics().await.unwrap(), &reloads("error"));
    std::fs::write(&s.key_set_path, b"{ not json").unwrap();
    s.wait_metric(&reloads("error"), |v| v > errors).await;
    assert_eq!(s.get("/x", Some(&new)).await.unwrap().status, StatusCode::OK);
    s.write_key_set(&set).unwrap();
    flowing(sent.clone(), 20).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failures) = (sent.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    println!("rotation under load: {sent} requests, {failures} failures");
    assert!(sent > 50);
    assert_eq!(failures, 0, "no request may fail during rotation");
    assert_eq!(s.get("/x", Some(&old)).await.unwrap().status, StatusCode::OK, "tokens of the retired key still verify");
    assert_eq!(s.get("/x", Some(&new)).await.unwrap().status, StatusCode::OK);
    let jwks = s.get("/.well-known/jwks.json", None).await.unwrap().json();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, ["k1", "k2"]);
    // Removing the retired key ends its tokens.
    set.keys.remove(0);
    let before = metric_value(&s.metrics().await.unwrap(), &reloads("ok"));
    s.write_key_set(&set).unwrap();
    s.wait_metric(&reloads("ok"), |v| v > before).await;
    assert_eq!(s.get("/x", Some(&old)).await.unwrap().status, StatusCode::UNAUTHORIZED);
    assert!(s.metrics().await.unwrap().contains("authrealm_sidecar_key_reloads_total{outcome=\"error\"}"));
}

/// What [`RawApp`] does after sending an answer.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    KeepAlive,
    Close,
    /// Keep sending body bytes (1 KiB every 20 ms) until the connection breaks.
    Trickle,
    /// Then, unasked, a second response (as some servers send `408` before closing an idle
    /// connection), and keep the connection open.
    Unsolicited,
}

/// A raw HTTP/1.1 app for connection-level assertions: counts the connections it accepts and
/// closes, and answers each request head by `script(connection number, request number on it)`.
struct RawApp {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    /// Unasked answers sent ([`Then::Unsolicited`]).
    unsolicited: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawApp {
    async fn start(script: fn(u64, u64) -> (Vec<u8>, Then)) -> RawApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed, unsolicited) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (a, c, u) = (accepted.clone(), closed.clone(), unsolicited.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { continue };
                let conn = a.fetch_add(1, Ordering::SeqCst) + 1;
                let (c, u) = (c.clone(), u.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n_req = 0;
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Requests through the sidecar here have no body: a head is one request.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            n_req += 1;
                            let (bytes, then) = script(conn, n_req);
                            let mut ok = sock.write_all(&bytes).await.is_ok();
                            if ok && then == Then::Unsolicited {
                                ok = sock
                                    .write_all(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 5\r\n\r\nstale")
                                    .await
                                    .is_ok();
                                u.fetch_add(1, Ordering::SeqCst);
                            }
                            while ok && then == Then::Trickle {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                ok = sock.write_all(&[b'.'; 1024]).await.is_ok();
                            }
                            if !ok || then == Then::Close {
                                // Closed before it is counted: a test that waits for the count
                                // must find the connection closed, not about to close.
                                drop(sock);
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        RawApp { addr, accepted, closed, unsolicited, task }
    }
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ok_body(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

/// Requests from different clients share the app's keep-alive connections: sequential requests
/// use one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let app = RawApp::start(|conn, n| (ok_body(&format!("c{conn}r{n}")), Then::KeepAlive)).await;
    let keys = key_set("k1");
    let s = Sidecar::start(test_config("reuse", None), &keys, app.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    for i in 1..=5 {
        // `raw` opens a new client connection each time.
        let out = s
            .raw(
                format!("GET /{i} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with(&format!("c1r{i}")), "request {i} on the app's first connection: {out}");
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
}

/// A response the client abandoned half-way is never continued on another request: its app
/// connection is closed, and the next request gets a new connection and its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_response_closes_its_app_connection() {
    let app = RawApp::start(|conn, _| {
        if conn == 1 {
            // Announces 100 MB, sends 5 bytes, then trickles.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 104857600\r\n\r\nfirst".to_vec(), Then::Trickle)
        } else {
            (ok_body("second"), Then::KeepAlive)
        }
    })
    .await;
    let keys = key_set("k1");
    let s = Sidecar::start(test_config("abandon", None), &keys, app.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    let mut c = tokio::net::TcpStream::connect(s.public).await.unwrap();
    c.write_all(format!("GET /big HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(5).any(|w| w == b"first") {
        let n = match tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "no \"first\" after 5 s; received: {:?}; app connections accepted: {} (the sidecar's log follows)",
                String::from_utf8_lossy(&got),
                app.accepted.load(Ordering::SeqCst),
            ),
        };
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    drop(c);
    wait_for("the app connection of the abandoned response to close", || app.closed.load(Ordering::SeqCst) == 1).await;
    let r = s.get("/next", Some(&token)).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"second");
    assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
}

/// An app that closes a kept-alive connection between requests (idle timeout, restart) costs
/// the next request nothing: the sidecar notices and connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_idle_connections_is_handled() {
    // Every connection answers one request, without announcing `connection: close`, then closes.
    let app = RawApp::start(|conn, _| (ok_body(&format!("c{conn}")), Then::Close)).await;
    let keys = key_set("k1");
    let s = Sidecar::start(test_config("idleclose", None), &keys, app.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    for i in 1..=3u64 {
        let r = s.get("/x", Some(&token)).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "request {i}: {:?}", r.body);
        assert_eq!(r.body, format!("c{i}"));
        wait_for("the app to close", || app.closed.load(Ordering::SeqCst) == i).await;
    }
}

/// Bytes an idle app connection receives unasked are never taken for the next request's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_response_on_an_idle_connection_is_not_passed_on() {
    let app = RawApp::start(|conn, _| (ok_body(&format!("c{conn}")), Then::Unsolicited)).await;
    let keys = key_set("k1");
    let s = Sidecar::start(test_config("unsolicited", None), &keys, app.addr).await.unwrap();
    let token = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    for i in 1..=3u64 {
        let r = s.get("/x", Some(&token)).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "request {i}: {:?}", r.body);
        assert_eq!(r.body, format!("c{i}"), "request {i}");
        wait_for("the unsolicited answer", || app.unsolicited.load(Ordering::SeqCst) == i).await;
    }
}
