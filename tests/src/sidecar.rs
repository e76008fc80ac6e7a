//! Running the real `authrealm-sidecar` binary against a real upstream HTTP server.
//!
//! [`Upstream`] is a small hyper server that records what reached the app (so tests can
//! assert that spoofed headers or ambiguous requests never arrive) and offers streaming,
//! slow and WebSocket-style endpoints. [`Sidecar`] writes a config and key-set file into a
//! temp dir, starts the binary on free loopback ports and talks to its three listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use authrealm_contract::{KeySet, SidecarConfig};

pub type TestBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// What the app saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// The app behind the sidecar.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_handler(
    seen: Arc<Mutex<Vec<Seen>>>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, hyper::Error> {
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/upload" => {
            let mut n: u64 = 0;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame?.into_data() {
                    n += d.len() as u64;
                }
            }
            Ok(Response::new(full(json!({ "bytes": n }).to_string())))
        }
        "/download" => {
            let n: u64 = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|v| v.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64);
                    Some((Ok::<_, hyper::Error>(Frame::data(chunk.slice(..take as usize))), left - take))
                }
            });
            Ok(Response::new(StreamBody::new(stream).boxed()))
        }
        "/slow" => {
            let ms: u64 =
                req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(5000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(full("slow")))
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            Ok(r)
        }
        _ => {
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), Value::String(v.to_str().unwrap_or("<binary>").to_string())))
                .collect();
            Ok(Response::new(full(json!({ "path": path, "headers": headers }).to_string())))
        }
    }
}

impl Upstream {
    pub async fn start() -> Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| upstream_handler(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Upstream { addr, seen, task })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

pub use crate::support::free_port;

/// Path of the sidecar binary, building it once if needed.
pub fn sidecar_bin() -> Result<PathBuf> {
    crate::bins::sidecar()
}

/// libfaketime's multi-threaded library (Debian package `faketime`; hack/install-deps.sh).
pub fn libfaketime() -> Result<PathBuf> {
    for dir in ["/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime"] {
        let p = Path::new(dir).join("libfaketimeMT.so.1");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("libfaketimeMT.so.1 not found: install Debian's faketime package (hack/install-deps.sh)")
}

pub struct Sidecar {
    child: Option<Child>,
    /// The sidecar's files (config, key set, log); removed when the Sidecar is dropped.
    pub dir: crate::support::TempDir,
    pub public: SocketAddr,
    pub issuer: SocketAddr,
    pub admin: SocketAddr,
    pub config: SidecarConfig,
    pub key_set_path: PathBuf,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failing test shows the log's tail (the directory goes with the Sidecar).
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.join("sidecar.log"))
        {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- sidecar log tail ({}) ---", self.dir.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A minimal HTTP response for assertions.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Sidecar {
    /// Start a sidecar for `config` (listener addresses and `keySetFile` are filled in).
    pub async fn start(config: SidecarConfig, keys: &KeySet, upstream: SocketAddr) -> Result<Sidecar> {
        Self::start_inner(config, keys, upstream, None, &[]).await
    }

    /// Like [`Sidecar::start`], with extra environment variables for the process (e.g. the Redis
    /// password named by `redis.passwordEnv`).
    pub async fn start_with_env(
        config: SidecarConfig,
        keys: &KeySet,
        upstream: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Sidecar> {
        Self::start_inner(config, keys, upstream, None, env).await
    }

    /// Like [`Sidecar::start`], with the process's wall clock `offset_secs` ahead (negative:
    /// behind) of the machine's, through libfaketime (Debian package `faketime`). Monotonic time
    /// is left alone, so timers and timeouts behave.
    pub async fn start_with_clock(
        config: SidecarConfig,
        keys: &KeySet,
        upstream: SocketAddr,
        offset_secs: i64,
    ) -> Result<Sidecar> {
        Self::start_inner(config, keys, upstream, Some(offset_secs), &[]).await
    }

    async fn start_inner(
        mut config: SidecarConfig,
        keys: &KeySet,
        upstream: SocketAddr,
        clock_offset: Option<i64>,
        env: &[(&str, &str)],
    ) -> Result<Sidecar> {
        let dir = crate::support::TempDir::new("authrealm-sidecar")?;
        let key_set_path = dir.join("keyset.json");
        std::fs::write(&key_set_path, keys.to_json_pretty())?;
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let issuer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        config.listeners.public = public.to_string();
        config.listeners.issuer = issuer.to_string();
        config.listeners.admin = admin.to_string();
        config.upstream.address = upstream.to_string();
        config.key_set_file = key_set_path.to_string_lossy().into_owned();
        config.key_reload_interval_ms = 200;
        let cfg_path = dir.join("sidecar.json");
        std::fs::write(&cfg_path, config.to_json_pretty())?;
        let log = std::fs::File::create(dir.join("sidecar.log"))?;
        let mut cmd = Command::new(sidecar_bin()?);
        cmd.args(["run", "--config"])
            .arg(&cfg_path)
            .args(["--drain-seconds", "5"])
            .env("AUTHREALM_LOG", std::env::var("AUTHREALM_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(offset) = clock_offset {
            cmd.env("LD_PRELOAD", libfaketime()?)
                .env("FAKETIME", format!("{offset:+}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().context("spawn sidecar")?;
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        let s = Sidecar { child: Some(child), dir, public, issuer, admin, config, key_set_path, client };
        if let Err(e) = s.wait_healthy(Duration::from_secs(20)).await {
            let log = std::fs::read_to_string(s.dir.join("sidecar.log")).unwrap_or_default();
            bail!("{e}\n--- sidecar log ---\n{log}");
        }
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.request(self.admin, "GET", "/healthz", &[], Bytes::new()).await
                && r.status == StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sidecar not healthy after {timeout:?}; log in {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.request(self.admin, "GET", "/readyz", &[], Bytes::new()).await
                && r.status == StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sidecar not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn request(
        &self,
        to: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply> {
        let mut b = Request::builder().method(method).uri(format!("http://{to}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(full(body))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req)).await??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// GET through the public listener with a bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Result<Reply> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        self.request(self.public, "GET", path, &headers, Bytes::new()).await
    }

    /// Mint a token; panics unless 201.
    pub async fn mint(&self, subject: &str) -> Result<Value> {
        self.mint_with(json!({ "subject": subject })).await
    }

    pub async fn mint_with(&self, body: Value) -> Result<Value> {
        let r = self.issuer_call("POST", "/v1/tokens", Some(body)).await?;
        if r.status != StatusCode::CREATED {
            bail!("mint: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        Ok(r.json())
    }

    pub async fn issuer_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Reply> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        self.request(self.issuer, method, path, &[("content-type", "application/json")], bytes).await
    }

    /// Send raw bytes to the public listener and read until the server closes or `timeout`.
    pub async fn raw(&self, bytes: &[u8], timeout: Duration) -> Result<String> {
        let mut s = tokio::net::TcpStream::connect(self.public).await?;
        s.write_all(bytes).await?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Wait (up to 10 s) until the metric line `name` (with its labels, if any) satisfies `want`;
    /// returns its value.
    pub async fn wait_metric(&self, name: &str, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = metric_value(&self.metrics().await.unwrap(), name);
            if want(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} = {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> Result<String> {
        let r = self.request(self.admin, "GET", "/metrics", &[], Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Replace the key-set file the way a Secret update does (atomic rename).
    pub fn write_key_set(&self, keys: &KeySet) -> Result<()> {
        let tmp = self.dir.join("keyset.json.tmp");
        std::fs::write(&tmp, keys.to_json_pretty())?;
        std::fs::rename(tmp, &self.key_set_path)?;
        Ok(())
    }

    /// Send SIGTERM and wait for exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("already stopped")?;
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        let status = child.wait()?;
        self.child = None;
        Ok(status)
    }

    /// Resident memory of the sidecar process (kB), from /proc.
    pub fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

/// The value of the metric line `name` (exactly, labels included) in a Prometheus text page; 0
/// when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A config for tests: realm `realm`, Redis seeds (or stateless), short timeouts.
pub fn test_config(realm: &str, redis_seeds: Option<Vec<String>>) -> SidecarConfig {
    let mut c = SidecarConfig::example(realm, "/unused", redis_seeds);
    if let Some(r) = c.redis.as_mut() {
        r.key_prefix = format!("t{}:", std::process::id());
        r.command_timeout_ms = 300;
    }
    c.upstream.response_timeout_ms = 2000;
    c
}

pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Sign arbitrary header/claims JSON with a key entry's private material (test helper for
/// tokens "minted elsewhere" and for hostile headers).
pub fn sign_raw(key: &authrealm_contract::KeyEntry, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let enc = authrealm_contract::keygen::signing_key(key).unwrap().expect("private key");
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &enc, key.alg.to_jsonwebtoken()).unwrap();
    format!("{input}.{sig}")
}
