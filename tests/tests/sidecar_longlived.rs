//! Long-lived exchanges follow revocation: a real WebSocket client and server (tokio-tungstenite)
//! through the real sidecar binary and a real Redis Cluster; server-sent events and a plain
//! streaming download. Each ends within the re-check bound once its token is revoked or expires,
//! and not before.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SessionMode};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use authrealm_tests::sidecar::{Sidecar, test_config};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const RECHECK_MS: u64 = 500;

type B = BoxBody<Bytes, Infallible>;

/// The app: a WebSocket echo server that reports the Close frames it receives, an SSE endpoint
/// and an endless chunked download.
async fn app_handler(
    closes: mpsc::UnboundedSender<(u16, String)>,
    mut req: Request<Incoming>,
) -> Result<Response<B>, Infallible> {
    let tick = |line: &'static str| {
        let s = futures_util::stream::unfold(0u64, move |n| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{line}{n}\n\n")))), n + 1))
        });
        BodyExt::boxed(StreamBody::new(s))
    };
    match req.uri().path() {
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned().unwrap();
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let io = TokioIo::new(on.await.unwrap());
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                while let Some(Ok(m)) = ws.next().await {
                    let echo = match m {
                        Message::Close(f) => {
                            let _ = closes.send(
                                f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((0, String::new())),
                            );
                            break;
                        }
                        m @ (Message::Text(_) | Message::Binary(_)) => m,
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert("connection", "Upgrade".parse().unwrap());
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert("sec-websocket-accept", derive_accept_key(key.as_bytes()).parse().unwrap());
            Ok(r)
        }
        "/events" => {
            let mut r = Response::new(tick("data: "));
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            Ok(r)
        }
        _ => {
            let mut r = Response::new(tick("chunk "));
            r.headers_mut().insert("content-type", "application/octet-stream".parse().unwrap());
            Ok(r)
        }
    }
}

async fn start_app() -> (SocketAddr, mpsc::UnboundedReceiver<(u16, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| app_handler(tx.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, rx)
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_connect(s: &Sidecar, token: &str) -> Ws {
    let mut req = format!("ws://{}/ws", s.public).into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(s.public).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Echo `n` messages; panics if the tunnel is not working.
async fn echo(ws: &mut Ws, n: usize) {
    for i in 0..n {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("echo in time").unwrap().unwrap();
        assert_eq!(m, Message::text(text));
    }
}

/// Read until the server's Close frame: (code, reason, time waited).
async fn wait_close(ws: &mut Ws, limit: Duration) -> (u16, String, Duration) {
    let started = Instant::now();
    loop {
        let m = tokio::time::timeout(limit.saturating_sub(started.elapsed()), ws.next())
            .await
            .expect("the sidecar closes the WebSocket in time");
        match m {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string(), started.elapsed()),
            Some(Ok(Message::Close(None))) => return (0, String::new(), started.elapsed()),
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

async fn stream(s: &Sidecar, path: &str, token: &str) -> Incoming {
    let tcp = TcpStream::connect(s.public).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "app")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body()
}

/// Read `n` data frames.
async fn read_frames(body: &mut Incoming, n: usize) {
    for _ in 0..n {
        let f = tokio::time::timeout(Duration::from_secs(2), body.frame()).await.expect("data in time");
        assert!(f.is_some_and(|f| f.is_ok()), "stream still flowing");
    }
}

/// Drain until the stream ends: Ok(()) for a clean end, Err for an abort; and how long it took.
async fn wait_end(body: &mut Incoming, limit: Duration) -> (Result<(), String>, Duration) {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), body.frame()).await {
            Err(_) => panic!("the stream did not end within {limit:?}"),
            Ok(None) => return (Ok(()), started.elapsed()),
            Ok(Some(Err(e))) => return (Err(e.to_string()), started.elapsed()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

fn token(v: &Value) -> String {
    v["access_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_streams_end_when_their_token_is_revoked_or_expires() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let (app, mut closes) = start_app().await;
    let keys = KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    };
    let mut cfg = test_config("streams", Some(cluster.seeds()));
    cfg.session_mode = SessionMode::Multi;
    cfg.leeway_seconds = 1;
    cfg.limits.revalidate_interval_ms = RECHECK_MS;
    cfg.upstream.response_timeout_ms = 5000;
    let s = Sidecar::start(cfg, &keys, app).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let bound = Duration::from_millis(RECHECK_MS) + Duration::from_millis(1500);
    let revoke = |m: &Value| format!("/v1/tokens/{}", m["jti"].as_str().unwrap());

    // ---- a WebSocket whose token stays valid stays open across several re-checks.
    let keep = s.mint("alice").await.unwrap();
    let mut ws_keep = ws_connect(&s, &token(&keep)).await;
    echo(&mut ws_keep, 1).await;

    // ---- revoked mid-stream: the client gets Close 1008 "token revoked", the app too.
    let m = s.mint("bob").await.unwrap();
    let mut ws = ws_connect(&s, &token(&m)).await;
    echo(&mut ws, 3).await;
    let r = s.issuer_call("DELETE", &revoke(&m), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let (code, reason, took) = wait_close(&mut ws, bound).await;
    assert_eq!((code, reason.as_str()), (u16::from(CloseCode::Policy), "token revoked"));
    eprintln!("websocket closed {took:?} after the revocation (re-check every {RECHECK_MS} ms)");
    let (app_code, app_reason) =
        tokio::time::timeout(Duration::from_secs(2), closes.recv()).await.expect("the app sees a Close frame").unwrap();
    assert_eq!((app_code, app_reason.as_str()), (u16::from(CloseCode::Policy), "token revoked"));

    // The unrevoked one is still open and working after those re-checks.
    tokio::time::sleep(Duration::from_millis(3 * RECHECK_MS)).await;
    echo(&mut ws_keep, 2).await;

    // ---- expiry: a token of 2 s ends its WebSocket when the token stops being accepted (in
    // multi mode its session record expires with it, at exp; at the latest exp + leeway).
    let m = s.mint_with(json!({"subject": "carol", "ttl_seconds": 2})).await.unwrap();
    let t = token(&m);
    let exp = {
        use base64::Engine as _;
        let p = t.split('.').nth(1).unwrap().to_string();
        let c: Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        c["exp"].as_i64().unwrap()
    };
    let mut ws = ws_connect(&s, &t).await;
    echo(&mut ws, 1).await;
    let (code, reason, _) = wait_close(&mut ws, Duration::from_secs(8)).await;
    let closed_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!((code, reason.as_str()), (u16::from(CloseCode::Policy), "token expired"));
    assert!(closed_at_ms >= exp * 1000 - 50, "closed before exp: {closed_at_ms} < {}", exp * 1000);
    // Accepted at most while the clock reads exp + leeway (1 s): until (exp + 2) s.
    assert!(closed_at_ms <= (exp + 2) * 1000 + 1500, "closed late: {closed_at_ms} vs exp {exp}");
    assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::UNAUTHORIZED, "closed once refused");
    let _ = tokio::time::timeout(Duration::from_secs(2), closes.recv()).await.expect("the app sees the Close");

    // ---- server-sent events end cleanly once the token is revoked.
    let m = s.mint("dave").await.unwrap();
    let mut events = stream(&s, "/events", &token(&m)).await;
    read_frames(&mut events, 3).await;
    assert_eq!(s.issuer_call("DELETE", &revoke(&m), None).await.unwrap().status, StatusCode::OK);
    let (end, took) = wait_end(&mut events, bound).await;
    assert_eq!(end, Ok(()), "an event stream ends cleanly");
    eprintln!("event stream ended {took:?} after the revocation");

    // ---- another streaming response is aborted (never looks complete).
    let m = s.mint("erin").await.unwrap();
    let mut download = stream(&s, "/download", &token(&m)).await;
    read_frames(&mut download, 3).await;
    assert_eq!(s.issuer_call("DELETE", &revoke(&m), None).await.unwrap().status, StatusCode::OK);
    let (end, took) = wait_end(&mut download, bound).await;
    assert!(end.is_err(), "a cut download must not look complete");
    eprintln!("download aborted {took:?} after the revocation: {end:?}");

    let metrics = s.metrics().await.unwrap();
    for reason in ["revoked", "expired"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("authrealm_sidecar_long_lived_ended_total")
                && l.contains(&format!("outcome=\"{reason}\""))),
            "{metrics}"
        );
    }
    echo(&mut ws_keep, 1).await;
}
