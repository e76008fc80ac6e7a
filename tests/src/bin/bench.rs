//! `hack/bench.sh`: speed figures for the sidecar (targets live here, not in tests).
//!
//! 1. Micro-benchmark of `authrealm_sidecar::token::validate` (and `mint`) per algorithm,
//!    single thread, no I/O.
//! 2. End to end on loopback: a real Redis Cluster (3 masters + 3 replicas), a trivial
//!    in-process upstream, and the release sidecar binary; a closed-loop load of N concurrent
//!    HTTP/1.1 keep-alive connections for a fixed time per mode:
//!    - `direct`: straight to the upstream (baseline: the load generator and the app);
//!    - `stateless ES256`: signature and claims only;
//!    - `single ES256`: plus one Redis `EXISTS` per request;
//!    - `revoked flood`: revoked tokens, every answer must be 401.
//!
//! Only 127.0.0.1 is ever contacted. Every phase is bounded in time.
//!
//! ```text
//! bench [--duration-secs 10] [--warmup-secs 1] [--connections 64] [--tokens 1000] [--micro-secs 2]
//! ```
//! The sidecar binary: `AUTHREALM_SIDECAR_BIN`, else `authrealm-sidecar` next to this binary,
//! else `target/release/authrealm-sidecar`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SessionMode, SidecarConfig};
use authrealm_sidecar::keys::KeyRing;
use authrealm_sidecar::token::{Policy, mint, validate};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    duration: Duration,
    warmup: Duration,
    connections: usize,
    tokens: usize,
    micro: Duration,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        connections: 64,
        tokens: 1000,
        micro: Duration::from_secs(2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<u64> {
            let v = it.next().with_context(|| format!("{flag} needs a value"))?;
            v.parse().with_context(|| format!("{flag} {v}: not a number"))
        };
        match flag.as_str() {
            "--duration-secs" => a.duration = Duration::from_secs(value()?.clamp(1, 300)),
            "--warmup-secs" => a.warmup = Duration::from_secs(value()?.min(60)),
            "--connections" => a.connections = value()?.clamp(1, 1024) as usize,
            "--tokens" => a.tokens = value()?.clamp(1, 100_000) as usize,
            "--micro-secs" => a.micro = Duration::from_secs(value()?.clamp(1, 60)),
            "-h" | "--help" => {
                println!(
                    "bench [--duration-secs 10] [--warmup-secs 1] [--connections 64] [--tokens 1000] [--micro-secs 2]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    print_machine();

    println!("\n## token::validate micro-benchmark (single thread, no I/O, {}s per algorithm)\n", args.micro.as_secs());
    micro_benchmarks(args.micro)?;

    let sidecar_bin = sidecar_bin()?;
    println!("\n## end to end: sidecar {}", sidecar_bin.display());
    println!("starting a Redis Cluster on loopback (3 masters + 3 replicas)...");
    let cluster = RedisCluster::start(RedisClusterOptions::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(end_to_end(&args, &cluster, &sidecar_bin));
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(cluster);
    result
}

fn print_machine() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|w| w.starts_with("v="))
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    println!("# authrealm sidecar benchmark");
    println!("machine: {cpus} CPU(s), {model}; redis-server {redis}");
    println!("(the load generator, the upstream, the sidecar and all six Redis nodes share these CPUs)");
}

// --- micro-benchmark ---------------------------------------------------------------------

/// Run `f` repeatedly for `budget`; returns calls per second.
fn per_second(budget: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up caches and lazy initialisation.
    for _ in 0..16 {
        f();
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        for _ in 0..16 {
            f();
        }
        n += 16;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return n as f64 / elapsed.as_secs_f64();
        }
    }
}

fn micro_benchmarks(budget: Duration) -> Result<()> {
    let now = authrealm_tests::sidecar::unix_now();
    println!("| alg   | validate/s | µs/validate | mint/s   |");
    println!("|-------|-----------:|------------:|---------:|");
    for alg in [Alg::ES256, Alg::RS256, Alg::EdDSA, Alg::HS256] {
        let mut set = KeySet::empty();
        set.keys.push(generate(alg, "bench", now, KeyState::Current)?);
        let ring = KeyRing::from_set(&set, [0; 32])?;
        let policy = Policy {
            issuer: "https://bench.authrealm.local".into(),
            audiences: vec!["app".into()],
            algorithms: vec![],
            leeway: 30,
            max_token_bytes: 8192,
            required_claims: vec![],
            session_mode: SessionMode::Single,
            max_lifetime: 900,
        };
        let minted = mint(&ring, &policy.issuer, "user-1", json!("app"), Map::new(), now, 900)
            .map_err(|e| anyhow::anyhow!("mint {alg:?}: {e}"))?;
        validate(&minted.token, &ring, &policy, now).map_err(|r| anyhow::anyhow!("validate {alg:?}: {r:?}"))?;
        let v = per_second(budget, || {
            let r = validate(black_box(&minted.token), &ring, &policy, now);
            assert!(r.is_ok());
            black_box(r.ok());
        });
        let m = per_second(budget / 2, || {
            black_box(mint(&ring, &policy.issuer, "user-1", json!("app"), Map::new(), now, 900).ok());
        });
        println!("| {:<5} | {:>10.0} | {:>11.1} | {:>8.0} |", alg.as_str(), v, 1e6 / v, m);
    }
    Ok(())
}

// --- processes -----------------------------------------------------------------------------

fn sidecar_bin() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("AUTHREALM_SIDECAR_BIN") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            let mut c = Vec::new();
            if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
                c.push(dir.join("authrealm-sidecar"));
            }
            c.push(PathBuf::from("target/release/authrealm-sidecar"));
            c
        }
    };
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!("no sidecar binary at {candidates:?}: run hack/bench.sh (or set AUTHREALM_SIDECAR_BIN)")
    })
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A running sidecar process, killed on drop.
struct Sidecar {
    child: Child,
    dir: PathBuf,
    public: SocketAddr,
    issuer: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sidecar {
    async fn start(
        bin: &Path,
        name: &str,
        mut cfg: SidecarConfig,
        keys: &KeySet,
        upstream: SocketAddr,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("authrealm-bench-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let key_set = dir.join("keyset.json");
        std::fs::write(&key_set, keys.to_json_pretty())?;
        let (public, issuer, admin) = (free_addr()?, free_addr()?, free_addr()?);
        cfg.key_set_file = key_set.to_string_lossy().into_owned();
        cfg.listeners.public = public.to_string();
        cfg.listeners.issuer = issuer.to_string();
        cfg.listeners.admin = admin.to_string();
        cfg.upstream.address = upstream.to_string();
        let cfg_path = dir.join("sidecar.json");
        std::fs::write(&cfg_path, cfg.to_json_pretty())?;
        let log = std::fs::File::create(dir.join("sidecar.log"))?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .args(["--drain-seconds", "1"])
            .env("AUTHREALM_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let s = Sidecar { child, dir, public, issuer, admin };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((StatusCode::OK, _)) = call(s.admin, "GET", "/readyz", None).await {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(s.dir.join("sidecar.log")).unwrap_or_default();
                bail!("sidecar {name} not ready after 30 s; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric_sum(&self, name: &str, label: &str) -> Result<f64> {
        let (_, body) = call(self.admin, "GET", "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// One request on a fresh connection (setup and metrics; not the measured path).
async fn call(to: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Result<(StatusCode, Bytes)> {
    let fut = async {
        let stream = TcpStream::connect(to).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut b = Request::builder().method(method).uri(path).header("host", to.to_string());
        let body = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = sender.send_request(b.body(body)?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut).await.context("request timed out")?
}

/// The app: answers every request with a small 200.
async fn start_upstream() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

// --- load ----------------------------------------------------------------------------------

struct ConnResult {
    latencies_us: Vec<u32>,
    errors: u64,
}

struct Stats {
    requests: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    errors: u64,
}

/// Closed loop: `connections` keep-alive connections, each sending the next request as soon as
/// the previous answer is read. Requests finishing during the first `warmup` are not counted.
/// A response whose status is not `expect` (or a transport error) counts as an error.
async fn drive(
    to: SocketAddr,
    tokens: Arc<Vec<String>>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    expect: StatusCode,
) -> Stats {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = ConnResult { latencies_us: Vec::with_capacity(64 * 1024), errors: 0 };
            let mut i = c;
            'conn: while Instant::now() < end {
                let stream = match tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(to)).await {
                    Ok(Ok(s)) => s,
                    _ => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
                    out.errors += 1;
                    continue;
                };
                tokio::spawn(conn);
                while Instant::now() < end {
                    let token = &tokens[i % tokens.len()];
                    i += connections;
                    let req = Request::builder()
                        .uri("/bench")
                        .header("host", "bench.local")
                        .header("authorization", format!("Bearer {token}"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let t0 = Instant::now();
                    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        sender.ready().await?;
                        let resp = sender.send_request(req).await?;
                        let status = resp.status();
                        resp.into_body().collect().await?;
                        Ok::<_, hyper::Error>(status)
                    })
                    .await;
                    let done = Instant::now();
                    let counted = done >= measure_from && done < end;
                    match result {
                        Ok(Ok(status)) => {
                            if counted {
                                out.latencies_us.push((done - t0).as_micros().min(u32::MAX as u128) as u32);
                                if status != expect {
                                    out.errors += 1;
                                }
                            }
                        }
                        _ => {
                            out.errors += 1;
                            continue 'conn; // reconnect
                        }
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok(r) = t.await {
            all.extend_from_slice(&r.latencies_us);
            errors += r.errors;
        } else {
            errors += 1;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| -> Duration {
        if all.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        Duration::from_micros(all[idx] as u64)
    };
    Stats {
        requests: all.len() as u64,
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        errors,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Mint one token per subject through the issuer API, 8 at a time. Returns (token, jti).
async fn mint_many(issuer: SocketAddr, prefix: &str, n: usize) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(n);
    let subjects: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in subjects.chunks(8) {
        let calls = chunk.iter().map(|s| call(issuer, "POST", "/v1/tokens", Some(json!({ "subject": s }))));
        for r in futures_util::future::join_all(calls).await {
            let (status, body) = r?;
            if status != StatusCode::CREATED {
                bail!("mint: {status} {}", String::from_utf8_lossy(&body));
            }
            let v: Value = serde_json::from_slice(&body)?;
            let token = v["access_token"].as_str().context("access_token")?.to_string();
            let jti = v["jti"].as_str().context("jti")?.to_string();
            out.push((token, jti));
        }
    }
    Ok(out)
}

/// One row of the end-to-end table.
struct Mode<'a> {
    name: &'static str,
    addr: SocketAddr,
    tokens: &'a Arc<Vec<String>>,
    /// The status every response must have.
    expect: StatusCode,
    /// The sidecar behind `addr`, for its metrics (None: straight to the upstream).
    sidecar: Option<&'a Sidecar>,
}

async fn end_to_end(args: &Args, cluster: &RedisCluster, bin: &Path) -> Result<()> {
    let upstream = start_upstream().await?;
    let now = authrealm_tests::sidecar::unix_now();
    let mut keys = KeySet::empty();
    keys.keys.push(generate(Alg::ES256, "bench-es256", now, KeyState::Current)?);

    let mut single_cfg = SidecarConfig::example("bench", "/unused", Some(cluster.seeds()));
    if let Some(r) = single_cfg.redis.as_mut() {
        r.key_prefix = format!("bench{}:", std::process::id());
    }
    let mut stateless_cfg = single_cfg.clone();
    stateless_cfg.session_mode = SessionMode::Stateless;
    stateless_cfg.redis = None;

    let single = Sidecar::start(bin, "single", single_cfg, &keys, upstream).await?;
    let stateless = Sidecar::start(bin, "stateless", stateless_cfg, &keys, upstream).await?;

    let t = Instant::now();
    let valid = mint_many(single.issuer, "bench-user", args.tokens).await?;
    let mint_secs = t.elapsed().as_secs_f64();
    let revoked = mint_many(single.issuer, "bench-revoked", args.tokens).await?;
    for chunk in revoked.chunks(8) {
        let paths: Vec<String> = chunk.iter().map(|(_, jti)| format!("/v1/tokens/{jti}")).collect();
        let calls = paths.iter().map(|p| call(single.issuer, "DELETE", p, None));
        for r in futures_util::future::join_all(calls).await {
            let (status, body) = r?;
            if status != StatusCode::OK {
                bail!("revoke: {status} {}", String::from_utf8_lossy(&body));
            }
        }
    }
    println!(
        "minted {} tokens for {} subjects in {:.2}s ({:.0} mints/s, 8 concurrent, each confirmed by a replica); \
         revoked {} more",
        valid.len(),
        valid.len(),
        mint_secs,
        valid.len() as f64 / mint_secs,
        revoked.len()
    );
    let valid = Arc::new(valid.into_iter().map(|(t, _)| t).collect::<Vec<_>>());
    let revoked = Arc::new(revoked.into_iter().map(|(t, _)| t).collect::<Vec<_>>());

    println!(
        "\nload: {} concurrent HTTP/1.1 keep-alive connections, closed loop, {}s per mode after {}s warm-up; \
         latency = request sent → response body read\n",
        args.connections,
        args.duration.as_secs(),
        args.warmup.as_secs()
    );
    println!("| mode            | requests/s | p50 ms | p99 ms | p99.9 ms | requests | errors | Redis checks/req |");
    println!("|-----------------|-----------:|-------:|-------:|---------:|---------:|-------:|-----------------:|");
    let modes = [
        Mode { name: "direct", addr: upstream, tokens: &valid, expect: StatusCode::OK, sidecar: None },
        Mode {
            name: "stateless ES256",
            addr: stateless.public,
            tokens: &valid,
            expect: StatusCode::OK,
            sidecar: Some(&stateless),
        },
        Mode {
            name: "single ES256",
            addr: single.public,
            tokens: &valid,
            expect: StatusCode::OK,
            sidecar: Some(&single),
        },
        Mode {
            name: "revoked flood",
            addr: single.public,
            tokens: &revoked,
            expect: StatusCode::UNAUTHORIZED,
            sidecar: Some(&single),
        },
    ];
    const CHECKS: &str = "authrealm_sidecar_redis_seconds_count";
    const REQUESTS: &str = "authrealm_sidecar_requests_total";
    for Mode { name, addr, tokens, expect, sidecar } in modes {
        let before = match sidecar {
            Some(sc) => Some((sc.metric_sum(CHECKS, "op=\"check\"").await?, sc.metric_sum(REQUESTS, "").await?)),
            None => None,
        };
        let s = drive(addr, tokens.clone(), args.connections, args.warmup, args.duration, expect).await;
        let checks = match (sidecar, before) {
            (Some(sc), Some((checks0, requests0))) => {
                let checks = sc.metric_sum(CHECKS, "op=\"check\"").await? - checks0;
                let requests = sc.metric_sum(REQUESTS, "").await? - requests0;
                format!("{:.2}", checks / requests.max(1.0))
            }
            _ => "-".into(),
        };
        println!(
            "| {:<15} | {:>10.0} | {:>6} | {:>6} | {:>8} | {:>8} | {:>6} | {:>16} |",
            name,
            s.rps,
            ms(s.p50),
            ms(s.p99),
            ms(s.p999),
            s.requests,
            s.errors,
            checks
        );
    }
    println!(
        "\n(errors: responses other than 200 — 401 for the revoked flood — plus transport errors; \
         Redis checks/req from the sidecar's own metrics.)"
    );
    Ok(())
}
