//! `hack/bench.sh`: authrealm against its peers in one run (speed figures live here, not in tests).
//!
//! Every row is its own process set, started for the row and stopped after it, behind the same
//! upstream (nginx answering 1 KB over keep-alive):
//! - `direct`: straight to the upstream;
//! - `nginx`: nginx as a plain reverse proxy, no authentication — the **anchor** every ratio uses;
//! - authrealm stateless HS256 / ES256 / EdDSA with a warm token pool and with cold tokens (every
//!   request a token never seen before; the benchmark signs them with the realm key);
//! - authrealm single-session ES256 (a real Redis Cluster) with the session cache off and on, and a
//!   flood of revoked tokens (every answer must be 401);
//! - oauth2-proxy (`--skip-jwt-bearer-tokens`, JWKS from a discovery endpoint this benchmark serves
//!   on 127.0.0.1) with the same ES256 tokens, and once with an `aud` the provider does not accept.
//!
//! Each row runs at maximum throughput (closed loop: `wrk -t1 -cN` with a Lua token pool) and, for
//! warm rows, at one fixed rate for all rows (open loop, latency measured from each request's
//! intended send time, so coordinated omission is corrected). Proxy CPU time comes from
//! `/proc/PID/stat` (utime + stime of the proxy's processes), peak RSS from `VmHWM`.
//! Writes `results.json` and `results.md` into `--out`; `hack/lib/bench_plot.py` draws the PNG.
//!
//! Only 127.0.0.1 is ever contacted. Every phase is bounded in time. Progress goes to stderr.
//!
//! ```text
//! bench [--quick] [--duration-secs 5] [--rounds 3] [--fixed-secs 10] [--warmup-secs 2] [--connections 64] [--tokens 1000]
//!       [--micro-secs 2] [--rate-fraction 0.6] [--out DIR] [--proxy-cpu N]
//!       [--oauth2-proxy BIN | --oauth2-proxy-unavailable REASON] [--only ID,ID,...]
//! bench --micro-only [--micro-secs 2]      # the crypto micro-benchmark alone, JSON on stdout
//! ```
//! The sidecar binary: `AUTHREALM_SIDECAR_BIN`, else `authrealm-sidecar` next to this binary.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
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
/// How long an overloaded fixed-rate run may drain after its end before the rest counts as unfinished.
const DRAIN: Duration = Duration::from_secs(2);
const PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];
const UPSTREAM_BODY_BYTES: usize = 1024;

// --- arguments -----------------------------------------------------------------------------

struct Args {
    duration: Duration,
    rounds: u32,
    fixed: Duration,
    warmup: Duration,
    connections: usize,
    tokens: usize,
    micro: Duration,
    rate_fraction: f64,
    out: PathBuf,
    proxy_cpu: Option<usize>,
    oauth2_proxy: std::result::Result<PathBuf, String>,
    only: Option<Vec<String>>,
    micro_only: bool,
    quick: bool,
    max_cold_tokens: usize,
}

const USAGE: &str = "bench [--quick] [--duration-secs 5] [--rounds 3] [--fixed-secs 10] [--warmup-secs 2] [--connections 64] [--tokens 1000] \
[--micro-secs 2] [--rate-fraction 0.6] [--out DIR] [--proxy-cpu N] [--oauth2-proxy BIN | --oauth2-proxy-unavailable REASON] \
[--only ID,ID] [--max-cold-tokens 600000] | bench --micro-only [--micro-secs 2]";

fn parse_args() -> Result<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let quick = raw.iter().any(|a| a == "--quick");
    let mut a = Args {
        duration: Duration::from_secs(if quick { 3 } else { 5 }),
        rounds: if quick { 1 } else { 3 },
        fixed: Duration::from_secs(if quick { 3 } else { 10 }),
        warmup: Duration::from_secs(if quick { 1 } else { 2 }),
        connections: 64,
        tokens: if quick { 300 } else { 1000 },
        micro: Duration::from_secs(if quick { 1 } else { 2 }),
        rate_fraction: 0.6,
        out: PathBuf::from("bench-results/manual"),
        proxy_cpu: None,
        oauth2_proxy: Err("not configured (run through hack/bench.sh, or pass --oauth2-proxy BIN)".into()),
        only: None,
        micro_only: false,
        quick,
        max_cold_tokens: 600_000,
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut text = || it.next().with_context(|| format!("{flag} needs a value"));
        let num = |v: String| -> Result<f64> { v.parse::<f64>().with_context(|| format!("{v}: not a number")) };
        match flag.as_str() {
            "--quick" => {}
            "--micro-only" => a.micro_only = true,
            "--duration-secs" => a.duration = Duration::from_secs(num(text()?)?.clamp(1.0, 300.0) as u64),
            "--rounds" => a.rounds = num(text()?)?.clamp(1.0, 15.0) as u32,
            "--fixed-secs" => a.fixed = Duration::from_secs(num(text()?)?.clamp(1.0, 300.0) as u64),
            "--warmup-secs" => a.warmup = Duration::from_secs(num(text()?)?.clamp(0.0, 60.0) as u64),
            "--connections" => a.connections = num(text()?)?.clamp(1.0, 1024.0) as usize,
            "--tokens" => a.tokens = num(text()?)?.clamp(1.0, 100_000.0) as usize,
            "--micro-secs" => a.micro = Duration::from_secs(num(text()?)?.clamp(1.0, 60.0) as u64),
            "--rate-fraction" => a.rate_fraction = num(text()?)?.clamp(0.05, 2.0),
            "--max-cold-tokens" => a.max_cold_tokens = num(text()?)?.clamp(1000.0, 5_000_000.0) as usize,
            "--out" => a.out = PathBuf::from(text()?),
            "--proxy-cpu" => a.proxy_cpu = Some(num(text()?)? as usize),
            "--oauth2-proxy" => a.oauth2_proxy = Ok(PathBuf::from(text()?)),
            "--oauth2-proxy-unavailable" => a.oauth2_proxy = Err(text()?),
            "--only" => a.only = Some(text()?.split(',').map(|s| s.trim().to_string()).collect()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\nusage: {USAGE}"),
        }
    }
    Ok(a)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.micro_only {
        let m = micro_benchmarks(args.micro)?;
        println!("{m}");
        return Ok(());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // On SIGINT/SIGTERM the run is dropped, and with it every process it started.
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(&args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

// --- machine and versions ------------------------------------------------------------------

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn machine(args: &Args) -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let online = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    let mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    let oauth2 = match &args.oauth2_proxy {
        // `go install` builds report "oauth2-proxy undefined": hack/bench.sh passes the module version.
        Ok(bin) => first_line(&bin.to_string_lossy(), &["--version"])
            .replace("undefined", &std::env::var("BENCH_OAUTH2_PROXY_VERSION").unwrap_or_else(|_| "?".into())),
        Err(_) => String::new(),
    };
    json!({
        "cpu_model": model,
        "cpus_online": online,
        "cpus_available_to_bench": cpus,
        "memory_mb": mem_mb,
        "kernel": kernel,
        "loadavg_at_start": loadavg,
        "nginx": first_line("nginx", &["-v"]),
        "redis": first_line("redis-server", &["--version"]),
        "wrk": first_line("wrk", &["-v"]),
        "oauth2_proxy": oauth2,
        "authrealm_rev": std::env::var("BENCH_GIT_REV").unwrap_or_default(),
    })
}

// --- micro-benchmark -----------------------------------------------------------------------

/// Calls per second of each of `fs`, measured together for `budget`: short batches (about
/// 0.5 ms each) of one function after another, and the median batch rate of each function
/// reported. On a quiet core that is simply the rate; on a busy machine a batch that lost the CPU
/// to another process is an outlier the median ignores, and the interleaving keeps other
/// processes' bursts from favouring whichever function happened to run during a quiet spell.
fn per_second(budget: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    // Batch sizes from a first estimate of each function's speed.
    let mut batch = Vec::with_capacity(fs.len());
    for f in fs.iter_mut() {
        for _ in 0..8 {
            f();
        }
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < Duration::from_millis(20) {
            f();
            n += 1;
        }
        batch.push((n / 40).max(1));
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    while start.elapsed() < budget || rates[0].len() < 5 {
        for (i, f) in fs.iter_mut().enumerate() {
            let t0 = Instant::now();
            for _ in 0..batch[i] {
                f();
            }
            let dt = t0.elapsed();
            if !dt.is_zero() {
                rates[i].push(batch[i] as f64 / dt.as_secs_f64());
            }
        }
    }
    rates
        .into_iter()
        .map(|mut r| {
            r.sort_by(f64::total_cmp);
            r.get(r.len() / 2).copied().unwrap_or(0.0)
        })
        .collect()
}

/// Verifies (message, raw signature).
type Verifier = Box<dyn Fn(&[u8], &[u8]) -> bool>;

/// The crypto library's own verification of `alg` at its best: aws-lc-rs with the key parsed
/// once (`signature::ParsedPublicKey`, or an `hmac::Key` for HMAC) and the raw signature bytes.
fn library_verifier(key: &KeySet, alg: Alg) -> Result<Verifier> {
    use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents};
    let dec = authrealm_contract::keygen::verifying_key(&key.keys[0])?;
    let parsed = |a: &'static dyn signature::VerificationAlgorithm, bytes: &[u8]| -> Result<ParsedPublicKey> {
        ParsedPublicKey::new(a, bytes).map_err(|e| anyhow::anyhow!("{alg}: {e}"))
    };
    let public = match (alg, dec.kind()) {
        (Alg::HS256, jsonwebtoken::DecodingKeyKind::SecretOrDer(secret)) => {
            let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
            return Ok(Box::new(move |m, s| aws_lc_rs::hmac::verify(&k, m, s).is_ok()));
        }
        (Alg::ES256, jsonwebtoken::DecodingKeyKind::SecretOrDer(point)) => {
            parsed(&signature::ECDSA_P256_SHA256_FIXED, point)?
        }
        (Alg::EdDSA, jsonwebtoken::DecodingKeyKind::SecretOrDer(x)) => parsed(&signature::ED25519, x)?,
        (Alg::RS256, jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e }) => RsaPublicKeyComponents { n, e }
            .to_parsed_public_key(&signature::RSA_PKCS1_2048_8192_SHA256)
            .map_err(|e| anyhow::anyhow!("{alg}: {e}"))?,
        _ => bail!("no library verifier for {alg} in the micro-benchmark"),
    };
    Ok(Box::new(move |m, s| public.verify_sig(m, s).is_ok()))
}

/// Per algorithm, one thread, rates as [`per_second`] measures them:
/// - `crypto_verify_per_s`: the crypto library's best signature check for the key type
///   ([`library_verifier`]) — the denominator of the cold-token target;
/// - `jsonwebtoken_verify_per_s`: `jsonwebtoken::crypto::verify` (aws-lc-rs underneath, but the
///   key parsed — or the HMAC key schedule run — and the signature decoded on every call);
/// - `sidecar_verify_per_s`: the sidecar's own check (`verifier::VerifyKey::verify_b64`: the key
///   prepared once, the signature segment decoded), what `token::validate` calls;
/// - `validate_per_s`: the whole `token::validate`; `mint_per_s`: `token::mint`.
fn micro_benchmarks(budget: Duration) -> Result<Value> {
    let now = authrealm_tests::sidecar::unix_now();
    let mut out = Map::new();
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
        let token = minted.token.clone();
        validate(&token, &ring, &policy, now).map_err(|r| anyhow::anyhow!("validate {alg:?}: {r:?}"))?;
        let key = ring.get("bench").context("key")?;
        let (input, sig) = token.rsplit_once('.').context("token")?;
        let raw_sig = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig)?;
        let library = library_verifier(&set, alg)?;
        if !library(input.as_bytes(), &raw_sig) {
            bail!("{alg}: the library verifier refuses the benchmark token");
        }
        let dec = authrealm_contract::keygen::verifying_key(&set.keys[0])?;
        let jwt_alg = alg.to_jsonwebtoken();
        let rates = per_second(
            budget * 4,
            &mut [
                &mut || assert!(library(black_box(input.as_bytes()), black_box(&raw_sig))),
                &mut || {
                    let ok = jsonwebtoken::crypto::verify(black_box(sig), black_box(input.as_bytes()), &dec, jwt_alg);
                    assert!(matches!(ok, Ok(true)));
                },
                &mut || assert!(key.verify.verify_b64(alg, black_box(input.as_bytes()), black_box(sig))),
                &mut || {
                    let r = validate(black_box(&token), &ring, &policy, now);
                    assert!(r.is_ok());
                    black_box(r.ok());
                },
            ],
        );
        let [verify, jwt, own, v] = rates[..] else { bail!("micro-benchmark: {} rates", rates.len()) };
        let m = per_second(
            budget / 2,
            &mut [&mut || {
                black_box(mint(&ring, &policy.issuer, "user-1", json!("app"), Map::new(), now, 900).ok());
            }],
        )[0];
        out.insert(
            alg.as_str().to_string(),
            json!({
                "crypto_verify_per_s": verify,
                "jsonwebtoken_verify_per_s": jwt,
                "sidecar_verify_per_s": own,
                "validate_per_s": v,
                "mint_per_s": m,
            }),
        );
    }
    Ok(Value::Object(out))
}

// --- processes -----------------------------------------------------------------------------

fn sidecar_bin() -> Result<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("AUTHREALM_SIDECAR_BIN") {
        c.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        c.push(dir.join("authrealm-sidecar"));
    }
    c.iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("no sidecar binary at {c:?}: run hack/bench.sh (or set AUTHREALM_SIDECAR_BIN)"))
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `program` run on `cpu` (through taskset(1)) when pinning.
fn pinned(cpu: Option<usize>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A process this benchmark started; SIGTERM (then SIGKILL) on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let f = std::fs::File::create(&log)?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (nginx: master and worker).
    fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid()];
        v.extend(children(self.pid()));
        v
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exited().is_none() {
                progress(format!("{} did not stop on SIGTERM; killing it", self.name));
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn clk_tck() -> f64 {
    first_line("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

/// utime + stime of `pids`, in seconds.
fn cpu_secs(pids: &[u32], tck: f64) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may contain spaces) start at field 3 (state).
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / tck)
        })
        .sum()
}

/// Sum of VmHWM (peak resident set) of `pids`, in MiB.
fn peak_rss_mb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum::<f64>()
        / 1024.0
}

/// One request on a fresh connection (setup and readiness; not the measured path).
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

/// Wait until `GET path` on `addr` answers `want`, or the process exits, or 30 s pass.
async fn wait_ready(p: &mut Proc, addr: SocketAddr, path: &str, want: StatusCode) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((status, _)) = call(addr, "GET", path, None).await
            && status == want
        {
            return Ok(());
        }
        if let Some(status) = p.exited() {
            bail!("{} exited ({status}) before it was ready; log:\n{}", p.name, p.log_tail());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after 30 s; log:\n{}", p.name, p.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nginx_conf(dir: &Path, server: &str, extra_http: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
         keepalive_requests 1000000;\n  keepalive_timeout 75s;\n{extra_http}\n  server {{\n{server}\n  }}\n}}\n"
    )
}

/// Debian's nginx with its own prefix and config under `dir` (never the system service).
async fn start_nginx(dir: &Path, name: &str, conf: String, addr: SocketAddr, cpu: Option<usize>) -> Result<Proc> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = pinned(cpu, "nginx");
    cmd.arg("-p").arg(format!("{}/", dir.display())).arg("-c").arg(&conf_path).arg("-e").arg(dir.join("error.log"));
    let mut p = Proc::spawn(name, cmd, dir.join("stdout.log"))?;
    wait_ready(&mut p, addr, "/", StatusCode::OK).await?;
    Ok(p)
}

async fn start_upstream(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let body = "x".repeat(UPSTREAM_BODY_BYTES);
    let server = format!("    listen {addr};\n    location / {{ default_type text/plain; return 200 \"{body}\"; }}");
    let dir = dir.join("upstream-nginx");
    let p = start_nginx(&dir, "upstream nginx", nginx_conf(&dir, &server, ""), addr, None).await?;
    Ok((p, addr))
}

async fn start_anchor(dir: &Path, upstream: SocketAddr, cpu: Option<usize>) -> Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let extra = format!("  upstream app {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}");
    let server = format!(
        "    listen {addr};\n    location / {{ proxy_pass http://app; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }}"
    );
    let dir = dir.join("anchor-nginx");
    let p = start_nginx(&dir, "nginx proxy", nginx_conf(&dir, &server, &extra), addr, cpu).await?;
    Ok((p, addr))
}

struct SidecarProc {
    proc_: Proc,
    public: SocketAddr,
    issuer: SocketAddr,
    admin: SocketAddr,
}

/// The release sidecar, one worker thread, logging at warn. `extra` is merged into the config
/// JSON (fields this build may not know, such as `sessionCache`).
async fn start_sidecar(
    ctx: &Ctx,
    name: &str,
    mut cfg: SidecarConfig,
    keys: &KeySet,
    extra: Option<(&str, Value)>,
    cpu: Option<usize>,
) -> Result<SidecarProc> {
    let dir = ctx.work.join(format!("sidecar-{name}"));
    std::fs::create_dir_all(&dir)?;
    let key_set = dir.join("keyset.json");
    std::fs::write(&key_set, keys.to_json_pretty())?;
    let (public, issuer, admin) = (free_addr()?, free_addr()?, free_addr()?);
    cfg.key_set_file = key_set.to_string_lossy().into_owned();
    cfg.listeners.public = public.to_string();
    cfg.listeners.issuer = issuer.to_string();
    cfg.listeners.admin = admin.to_string();
    cfg.upstream.address = ctx.upstream.to_string();
    let mut v = serde_json::to_value(&cfg)?;
    if let Some((field, value)) = extra {
        v[field] = value;
    }
    let cfg_path = dir.join("sidecar.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&v)?)?;
    let mut cmd = pinned(cpu, &ctx.sidecar_bin);
    cmd.args(["run", "--config"])
        .arg(&cfg_path)
        .args(["--drain-seconds", "1"])
        .env("AUTHREALM_LOG", "warn")
        .env("TOKIO_WORKER_THREADS", "1")
        .env("NO_COLOR", "1");
    let mut p = Proc::spawn(&format!("sidecar {name}"), cmd, dir.join("sidecar.log"))?;
    wait_ready(&mut p, admin, "/readyz", StatusCode::OK).await?;
    Ok(SidecarProc { proc_: p, public, issuer, admin })
}

async fn metric_sum(admin: SocketAddr, name: &str, label: &str) -> Result<f64> {
    let (_, body) = call(admin, "GET", "/metrics", None).await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Serves OIDC discovery and the realm's JWKS for oauth2-proxy, on 127.0.0.1.
async fn start_discovery(listener: TcpListener, issuer: String, jwks: Value) {
    let discovery = json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks"),
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
    .to_string();
    let jwks = Bytes::from(jwks.to_string());
    let discovery = Bytes::from(discovery);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (jwks, discovery) = (jwks.clone(), discovery.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = if req.uri().path().ends_with("/.well-known/openid-configuration") {
                        Some(discovery.clone())
                    } else if req.uri().path().ends_with("/jwks") {
                        Some(jwks.clone())
                    } else {
                        None
                    };
                    async move {
                        let mut r = Response::new(Full::new(body.clone().unwrap_or_default()));
                        if body.is_none() {
                            *r.status_mut() = StatusCode::NOT_FOUND;
                        }
                        r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

// --- load: closed loop (wrk) ---------------------------------------------------------------

const WRK_LUA: &str = r#"-- authrealm bench: every request carries the next token of a file (one per line).
-- `n` and `used` are globals: done() reads them from each thread with thread:get.
local tokens, i = {}, 0
n, used = 0, 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  for line in io.lines(args[1]) do n = n + 1; tokens[n] = line end
end
function request()
  i = i + 1
  if i > n then i = 1 end
  used = used + 1
  return "GET /bench HTTP/1.1\r\nHost: bench.local\r\nAuthorization: Bearer " .. tokens[i] .. "\r\n\r\n"
end
function done(summary, latency, requests)
  local issued, pool = 0, 0
  for _, t in ipairs(threads) do issued = issued + t:get("used"); pool = t:get("n") end
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"issued":%d,"pool":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max, issued, pool))
end
"#;

#[derive(Clone, Debug, Default)]
struct Closed {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    socket_errors: u64,
    non_2xx: u64,
    /// Requests that reused a token of the file (cold runs: should be 0).
    reused_tokens: u64,
    /// Requests/s of every round (the row reports the median round).
    rounds_rps: Vec<f64>,
}

async fn wrk(ctx: &Ctx, addr: SocketAddr, tokens_file: &Path, duration: Duration) -> Result<Closed> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{}", ctx.connections), &format!("-d{}s", duration.as_secs()), "--timeout", "5s"])
        .arg("-s")
        .arg(&ctx.lua)
        .arg(format!("http://{addr}/bench"))
        .arg("--")
        .arg(tokens_file);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await?.context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCHJSON "))
        .with_context(|| format!("wrk printed no result: {stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    let v: Value = serde_json::from_str(line).with_context(|| format!("wrk result {line}"))?;
    let g = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let requests = g("requests") as u64;
    let secs = (g("duration_us") / 1e6).max(1e-3);
    Ok(Closed {
        requests,
        rps: requests as f64 / secs,
        p50_ms: g("p50_us") / 1000.0,
        p99_ms: g("p99_us") / 1000.0,
        p999_ms: g("p999_us") / 1000.0,
        socket_errors: (g("connect") + g("read") + g("write") + g("timeout")) as u64,
        non_2xx: g("status") as u64,
        reused_tokens: (g("issued") - g("pool")).max(0.0) as u64,
        rounds_rps: Vec::new(),
    })
}

fn write_tokens(path: &Path, tokens: &[String]) -> Result<()> {
    let mut s = String::with_capacity(tokens.iter().map(|t| t.len() + 1).sum());
    for t in tokens {
        s.push_str(t);
        s.push('\n');
    }
    std::fs::write(path, s)?;
    Ok(())
}

// --- load: open loop (fixed rate, coordinated omission corrected) ---------------------------

#[derive(Clone, Debug, Default)]
struct Open {
    rate: f64,
    achieved_rps: f64,
    requests: u64,
    errors: u64,
    /// Requests scheduled inside the run but not answered DRAIN after its end (overload); counted
    /// in the percentiles with their latency so far (a lower bound).
    unfinished: u64,
    percentiles_ms: Vec<(f64, f64)>,
    cpu_ms_per_1k: Option<f64>,
}

impl Open {
    fn pct(&self, p: f64) -> f64 {
        self.percentiles_ms.iter().find(|(q, _)| (*q - p).abs() < 1e-9).map(|(_, v)| *v).unwrap_or(f64::NAN)
    }
    fn saturated(&self) -> bool {
        self.unfinished as f64 > 0.001 * (self.requests + self.unfinished) as f64
            || self.achieved_rps < 0.97 * self.rate
    }
}

/// `connections` keep-alive connections share one schedule of `rate` requests/s (connection c
/// sends requests c, c+N, c+2N, …). Latency runs from the request's intended send time when the
/// connection was still busy with an earlier answer at that time (the wait is the server's), and
/// from the actual send otherwise (timer granularity is the generator's, not the server's).
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    addr: SocketAddr,
    tokens: Arc<Vec<HeaderValue>>,
    rate: f64,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    expect: StatusCode,
    pids: Vec<u32>,
    tck: f64,
) -> Open {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let hard_end = end + DRAIN;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let cpu_pids = pids.clone();
    let cpu0 = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        cpu_secs(&cpu_pids, tck)
    });
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::new();
            let (mut ok, mut errors, mut unfinished, mut in_window) = (0u64, 0u64, 0u64, 0u64);
            let first = start + Duration::from_secs_f64(c as f64 / rate);
            let mut k: u32 = 0;
            let mut tok = c;
            'conn: while Instant::now() < hard_end {
                let Ok(Ok(stream)) = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
                    errors += 1;
                    continue;
                };
                tokio::spawn(conn);
                loop {
                    let intended = first + interval * k;
                    if intended >= end || Instant::now() >= hard_end {
                        break 'conn;
                    }
                    let send_ref = if Instant::now() < intended {
                        tokio::time::sleep_until(intended.into()).await;
                        Instant::now()
                    } else {
                        intended
                    };
                    let req = Request::builder()
                        .uri("/bench")
                        .header("host", "bench.local")
                        .header("authorization", tokens[tok % tokens.len()].clone())
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    tok += connections;
                    let left = hard_end.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
                    let result = tokio::time::timeout(left, async {
                        sender.ready().await?;
                        let resp = sender.send_request(req).await?;
                        let status = resp.status();
                        resp.into_body().collect().await?;
                        Ok::<_, hyper::Error>(status)
                    })
                    .await;
                    let done = Instant::now();
                    k += 1;
                    let counted = intended >= measure_from;
                    match result {
                        Ok(Ok(status)) => {
                            if counted {
                                lat.push((done - send_ref).as_micros().min(u32::MAX as u128) as u32);
                                ok += 1;
                                if done < end {
                                    in_window += 1;
                                }
                                if status != expect {
                                    errors += 1;
                                }
                            }
                        }
                        Ok(Err(_)) => {
                            if counted {
                                errors += 1;
                            }
                            continue 'conn;
                        }
                        Err(_) => {
                            // Out of time: counted below as unfinished.
                            k -= 1;
                            break 'conn;
                        }
                    }
                }
            }
            // Requests of the schedule never answered: latency so far (a lower bound).
            let stop = Instant::now();
            loop {
                let intended = first + interval * k;
                if intended >= end {
                    break;
                }
                if intended >= measure_from {
                    lat.push(stop.saturating_duration_since(intended).as_micros().min(u32::MAX as u128) as u32);
                    unfinished += 1;
                }
                k += 1;
            }
            (lat, ok, errors, unfinished, in_window)
        }));
    }
    let mut all = Vec::new();
    let (mut ok, mut errors, mut unfinished, mut in_window) = (0, 0, 0, 0);
    for t in tasks {
        match t.await {
            Ok((l, o, e, u, w)) => {
                in_window += w;
                all.extend_from_slice(&l);
                ok += o;
                errors += e;
                unfinished += u;
            }
            Err(_) => errors += 1,
        }
    }
    let cpu1 = cpu_secs(&pids, tck);
    let cpu_ms_per_1k = match cpu0.await {
        Ok(c0) if !pids.is_empty() && ok > 0 => Some((cpu1 - c0) * 1e6 / ok as f64),
        _ => None,
    };
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let idx = ((all.len() as f64 * p / 100.0).ceil() as usize).clamp(1, all.len()) - 1;
        all[idx] as f64 / 1000.0
    };
    Open {
        rate,
        // Answered before the end of the run: a backlog drained afterwards does not count.
        achieved_rps: in_window as f64 / duration.as_secs_f64(),
        requests: ok,
        errors,
        unfinished,
        percentiles_ms: PERCENTILES.iter().map(|&p| (p, pct(p))).collect(),
        cpu_ms_per_1k,
    }
}

// --- rows ----------------------------------------------------------------------------------

struct Ctx {
    work: PathBuf,
    lua: PathBuf,
    upstream: SocketAddr,
    sidecar_bin: PathBuf,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    rounds: u32,
    fixed: Duration,
    proxy_cpu: Option<usize>,
    tck: f64,
    /// Fixed rate for the open-loop runs, set from the anchor's maximum.
    rate: Option<f64>,
    rate_fraction: f64,
}

#[derive(Default)]
struct Row {
    id: String,
    label: String,
    /// "baseline", "anchor", "authrealm", "peer".
    group: &'static str,
    tokens: &'static str,
    expect: u16,
    closed: Option<Closed>,
    cpu_ms_per_1k: Option<f64>,
    open: Option<Open>,
    /// At `rate_fraction` of the row's own maximum, when the common rate saturates it.
    open_own: Option<Open>,
    rss_mb: Option<f64>,
    redis_checks_per_request: Option<f64>,
    /// Session-cache entries read again in the background, per request (not on any request's path).
    background_reads_per_request: Option<f64>,
    /// Why the row has no figures.
    unavailable: Option<String>,
    note: Option<String>,
}

impl Row {
    fn new(id: &str, label: &str, group: &'static str, tokens: &'static str, expect: u16) -> Row {
        Row { id: id.into(), label: label.into(), group, tokens, expect, ..Row::default() }
    }

    fn to_json(&self, anchor: Option<&Row>) -> Value {
        let ratio = match (anchor.and_then(|a| a.closed.as_ref()), self.closed.as_ref()) {
            (Some(a), Some(c)) if a.rps > 0.0 => Some(c.rps / a.rps),
            _ => None,
        };
        json!({
            "id": self.id, "label": self.label, "group": self.group, "tokens": self.tokens,
            "expected_status": self.expect,
            "unavailable": self.unavailable, "note": self.note,
            "max": self.closed.as_ref().map(|c| json!({
                "requests_per_s": c.rps, "requests": c.requests, "p50_ms": c.p50_ms, "p99_ms": c.p99_ms,
                "p999_ms": c.p999_ms, "socket_errors": c.socket_errors, "non_2xx_3xx": c.non_2xx,
                "reused_tokens": c.reused_tokens, "rounds_requests_per_s": c.rounds_rps,
                "cpu_ms_per_1k_requests": self.cpu_ms_per_1k, "ratio_to_anchor": ratio,
            })),
            "fixed_rate": self.open.as_ref().map(|o| json!({
                "rate": o.rate, "achieved_requests_per_s": o.achieved_rps, "requests": o.requests,
                "errors": o.errors, "unfinished": o.unfinished, "saturated": o.saturated(),
                "p50_ms": o.pct(50.0), "p99_ms": o.pct(99.0), "p999_ms": o.pct(99.9),
                "percentiles_ms": o.percentiles_ms.iter().map(|(p, v)| json!([p, v])).collect::<Vec<_>>(),
                "cpu_ms_per_1k_requests": o.cpu_ms_per_1k,
            })),
            "own_rate": self.open_own.as_ref().map(|o| json!({
                "rate": o.rate, "achieved_requests_per_s": o.achieved_rps, "requests": o.requests,
                "errors": o.errors, "unfinished": o.unfinished, "saturated": o.saturated(),
                "p50_ms": o.pct(50.0), "p99_ms": o.pct(99.0), "p999_ms": o.pct(99.9),
                "percentiles_ms": o.percentiles_ms.iter().map(|(p, v)| json!([p, v])).collect::<Vec<_>>(),
            })),
            "peak_rss_mb": self.rss_mb,
            "redis_checks_per_request": self.redis_checks_per_request,
            "background_reads_per_request": self.background_reads_per_request,
        })
    }
}

struct Target<'a> {
    addr: SocketAddr,
    /// The proxy's processes (empty for `direct`).
    procs: Vec<&'a Proc>,
    sidecar_admin: Option<SocketAddr>,
    warm: &'a Path,
    /// The measured token file (warm pool, or cold tokens).
    measured: &'a Path,
    cold: bool,
    open_tokens: Option<Arc<Vec<HeaderValue>>>,
}

async fn measure(ctx: &Ctx, row: &mut Row, t: Target<'_>) -> Result<()> {
    let pids: Vec<u32> = t.procs.iter().flat_map(|p| p.pids()).collect();
    const CHECKS: &str = "authrealm_sidecar_redis_seconds_count";
    const REQUESTS: &str = "authrealm_sidecar_requests_total";
    // Session-cache entries read again in the background (a build without it reports none).
    const REFRESHES: &str = "authrealm_sidecar_session_cache_refreshes_total";
    progress(format!("{}: warm-up {}s", row.label, ctx.warmup.as_secs()));
    if !ctx.warmup.is_zero() {
        wrk(ctx, t.addr, t.warm, ctx.warmup).await?;
    }
    let before = match t.sidecar_admin {
        Some(a) => Some((
            metric_sum(a, CHECKS, "op=\"check\"").await?,
            metric_sum(a, REQUESTS, "").await?,
            metric_sum(a, REFRESHES, "").await?,
        )),
        None => None,
    };
    // Cold tokens: one long run (a new wrk would start the token file again).
    let (rounds, duration) = if t.cold { (1, ctx.duration * ctx.rounds) } else { (ctx.rounds, ctx.duration) };
    progress(format!("{}: maximum throughput, closed loop, {rounds} × {}s", row.label, duration.as_secs()));
    let c0 = cpu_secs(&pids, ctx.tck);
    let mut runs = Vec::new();
    for _ in 0..rounds {
        runs.push(wrk(ctx, t.addr, t.measured, duration).await?);
    }
    let c1 = cpu_secs(&pids, ctx.tck);
    // The median round by requests/s; errors and requests summed over the rounds.
    let mut all_rps: Vec<f64> = runs.iter().map(|c| c.rps.round()).collect();
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mut closed = runs[runs.len() / 2].clone();
    closed.requests = runs.iter().map(|c| c.requests).sum();
    closed.socket_errors = runs.iter().map(|c| c.socket_errors).sum();
    closed.non_2xx = runs.iter().map(|c| c.non_2xx).sum();
    closed.reused_tokens = runs.iter().map(|c| c.reused_tokens).sum();
    all_rps.shrink_to_fit();
    closed.rounds_rps = all_rps;
    if let (Some(a), Some((k0, r0, f0))) = (t.sidecar_admin, before) {
        let checks = metric_sum(a, CHECKS, "op=\"check\"").await? - k0;
        let requests = metric_sum(a, REQUESTS, "").await? - r0;
        let refreshes = metric_sum(a, REFRESHES, "").await? - f0;
        row.redis_checks_per_request = Some(checks / requests.max(1.0));
        row.background_reads_per_request = (refreshes > 0.0).then(|| refreshes / requests.max(1.0));
    }
    if !pids.is_empty() && closed.requests > 0 {
        row.cpu_ms_per_1k = Some((c1 - c0) * 1e6 / closed.requests as f64);
    }
    progress(format!(
        "{}: {:.0} req/s (rounds {:?}), p99 {:.2} ms, {} socket errors, {} non-2xx",
        row.label, closed.rps, closed.rounds_rps, closed.p99_ms, closed.socket_errors, closed.non_2xx
    ));
    row.closed = Some(closed);
    if let (Some(tokens), Some(rate)) = (t.open_tokens, ctx.rate) {
        progress(format!(
            "{}: fixed rate {rate:.0} req/s, {}s (+{}s warm-up)",
            row.label,
            ctx.fixed.as_secs(),
            ctx.warmup.as_secs()
        ));
        let expect = StatusCode::from_u16(row.expect)?;
        let o = open_loop(
            t.addr,
            tokens.clone(),
            rate,
            ctx.connections,
            ctx.warmup,
            ctx.fixed,
            expect,
            pids.clone(),
            ctx.tck,
        )
        .await;
        progress(format!(
            "{}: fixed rate: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms{}",
            row.label,
            o.pct(50.0),
            o.pct(99.0),
            o.pct(99.9),
            if o.saturated() { " (saturated: the rate is above this row's capacity)" } else { "" }
        ));
        let saturated = o.saturated();
        row.open = Some(o);
        // Above this row's capacity the common rate only shows a growing queue: also measure it
        // at the same fraction of its own maximum.
        let own = (row.closed.as_ref().map_or(0.0, |c| c.rps) * ctx.rate_fraction / 100.0).round().max(1.0) * 100.0;
        if saturated && own < rate {
            progress(format!("{}: fixed rate {own:.0} req/s (its own maximum × the same fraction)", row.label));
            let o =
                open_loop(t.addr, tokens, own, ctx.connections, ctx.warmup, ctx.fixed, expect, pids.clone(), ctx.tck)
                    .await;
            progress(format!(
                "{}: at {own:.0} req/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms{}",
                row.label,
                o.pct(50.0),
                o.pct(99.0),
                o.pct(99.9),
                if o.saturated() { " (saturated)" } else { "" }
            ));
            row.open_own = Some(o);
        }
    }
    if !pids.is_empty() {
        row.rss_mb = Some(peak_rss_mb(&pids));
    }
    Ok(())
}

fn header_values(tokens: &[String]) -> Arc<Vec<HeaderValue>> {
    Arc::new(tokens.iter().filter_map(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()).collect())
}

/// Realm key material and tokens for one algorithm.
struct Realm {
    keys: KeySet,
    ring: KeyRing,
}

impl Realm {
    fn new(alg: Alg, now: i64) -> Result<Realm> {
        let mut keys = KeySet::empty();
        keys.keys.push(generate(alg, &format!("bench-{}", alg.as_str().to_ascii_lowercase()), now, KeyState::Current)?);
        let ring = KeyRing::from_set(&keys, [0; 32])?;
        Ok(Realm { keys, ring })
    }

    /// `n` stateless tokens signed here (subjects `prefix-i`, with an e-mail claim for oauth2-proxy).
    fn sign(&self, issuer: &str, aud: &str, prefix: &str, n: usize) -> Result<Vec<String>> {
        let now = authrealm_tests::sidecar::unix_now();
        (0..n)
            .map(|i| {
                let sub = format!("{prefix}-{i}");
                let mut extra = Map::new();
                extra.insert("email".into(), json!(format!("{sub}@bench.local")));
                extra.insert("email_verified".into(), json!(true));
                mint(&self.ring, issuer, &sub, json!(aud), extra, now, 900)
                    .map(|m| m.token)
                    .map_err(|e| anyhow::anyhow!("signing a bench token: {e}"))
            })
            .collect()
    }
}

/// Mint one token per subject through the issuer API (session records in Redis), 8 at a time.
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

fn wanted(args: &Args, id: &str) -> bool {
    // "stateless" selects every stateless row; "single-es256-cache-off" also selects its group "single".
    args.only.as_ref().is_none_or(|o| o.iter().any(|x| id.starts_with(x.as_str()) || x.starts_with(id)))
}

fn is_unknown_field_refusal(e: &anyhow::Error, field: &str) -> bool {
    let s = format!("{e:#}");
    s.contains(field) && (s.contains("unknown field") || s.contains("unknown"))
}

async fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let date = first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let mach = machine(args);
    progress(format!("machine: {mach}"));
    let work = std::env::temp_dir().join(format!("authrealm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let _cleanup = Cleanup(work.clone());
    let lua = work.join("tokens.lua");
    std::fs::write(&lua, WRK_LUA)?;

    // Crypto micro-benchmark on the proxies' CPU, in a child process.
    progress(format!("crypto micro-benchmark ({}s per measurement, on the proxy CPU)", args.micro.as_secs()));
    let exe = std::env::current_exe()?;
    let out = pinned(args.proxy_cpu, &exe)
        .args(["--micro-only", "--micro-secs", &args.micro.as_secs().to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("micro-benchmark failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let micro: Value = serde_json::from_slice(&out.stdout).context("micro-benchmark output")?;

    let (upstream_proc, upstream) = start_upstream(&work).await?;
    let mut ctx = Ctx {
        work: work.clone(),
        lua,
        upstream,
        sidecar_bin: sidecar_bin()?,
        connections: args.connections,
        warmup: args.warmup,
        duration: args.duration,
        rounds: args.rounds,
        fixed: args.fixed,
        proxy_cpu: args.proxy_cpu,
        tck: clk_tck(),
        rate: None,
        rate_fraction: args.rate_fraction,
    };

    // The realm: one issuer URL for every row, served (discovery + JWKS) here for oauth2-proxy.
    let disco = TcpListener::bind("127.0.0.1:0").await?;
    let issuer = format!("http://{}/realm", disco.local_addr()?);
    let now = authrealm_tests::sidecar::unix_now();
    let es = Realm::new(Alg::ES256, now)?;
    let hs = Realm::new(Alg::HS256, now)?;
    let ed = Realm::new(Alg::EdDSA, now)?;
    start_discovery(disco, issuer.clone(), es.keys.jwks()).await;
    let mut base = SidecarConfig::example("bench", "/unused", None);
    base.issuer = issuer.clone();
    base.session_mode = SessionMode::Stateless;
    base.redis = None;

    let es_warm = es.sign(&issuer, "app", "warm", args.tokens)?;
    let warm_file = work.join("warm-es256.txt");
    write_tokens(&warm_file, &es_warm)?;
    let es_warm_hv = header_values(&es_warm);

    let mut rows: Vec<Row> = Vec::new();

    // Anchor first: its maximum sets the fixed rate for every row.
    {
        let mut row = Row::new("nginx", "nginx, plain reverse proxy (anchor)", "anchor", "warm", 200);
        let (p, addr) = start_anchor(&work, upstream, ctx.proxy_cpu).await?;
        ctx.rate = None;
        measure(
            &ctx,
            &mut row,
            Target {
                addr,
                procs: vec![&p],
                sidecar_admin: None,
                warm: &warm_file,
                measured: &warm_file,
                cold: false,
                open_tokens: None,
            },
        )
        .await?;
        let max = row.closed.as_ref().map(|c| c.rps).unwrap_or(0.0);
        ctx.rate = Some((max * args.rate_fraction / 100.0).round().max(1.0) * 100.0);
        let rate = ctx.rate.unwrap_or(1.0);
        progress(format!(
            "fixed rate for every row: {rate:.0} req/s ({:.0}% of the anchor's maximum)",
            args.rate_fraction * 100.0
        ));
        let o = open_loop(
            addr,
            es_warm_hv.clone(),
            rate,
            ctx.connections,
            ctx.warmup,
            ctx.fixed,
            StatusCode::OK,
            p.pids(),
            ctx.tck,
        )
        .await;
        row.open = Some(o);
        row.rss_mb = Some(peak_rss_mb(&p.pids()));
        rows.push(row);
    }
    if wanted(args, "direct") {
        let mut row = Row::new("direct", "direct to the upstream (no proxy)", "baseline", "warm", 200);
        measure(
            &ctx,
            &mut row,
            Target {
                addr: upstream,
                procs: vec![],
                sidecar_admin: None,
                warm: &warm_file,
                measured: &warm_file,
                cold: false,
                open_tokens: Some(es_warm_hv.clone()),
            },
        )
        .await?;
        rows.push(row);
    }

    // Stateless, warm then cold, per algorithm.
    for (realm, alg) in [(&hs, "HS256"), (&es, "ES256"), (&ed, "EdDSA")] {
        let id = format!("stateless-{}", alg.to_ascii_lowercase());
        if !wanted(args, &id) {
            continue;
        }
        let warm_tokens =
            if alg == "ES256" { es_warm.clone() } else { realm.sign(&issuer, "app", "warm", args.tokens)? };
        let wf = work.join(format!("warm-{alg}.txt"));
        write_tokens(&wf, &warm_tokens)?;
        let sc = start_sidecar(&ctx, &format!("{id}-warm"), base.clone(), &realm.keys, None, ctx.proxy_cpu).await?;
        let mut row = Row::new(
            &format!("{id}-warm"),
            &format!("authrealm stateless {alg}, warm tokens"),
            "authrealm",
            "warm",
            200,
        );
        measure(
            &ctx,
            &mut row,
            Target {
                addr: sc.public,
                procs: vec![&sc.proc_],
                sidecar_admin: None,
                warm: &wf,
                measured: &wf,
                cold: false,
                open_tokens: Some(header_values(&warm_tokens)),
            },
        )
        .await?;
        drop(sc);
        let warm_rps = row.closed.as_ref().map(|c| c.rps).unwrap_or(1000.0);
        rows.push(row);

        // Cold: every request a token never seen, enough for this row's warm rate + 30 %.
        let n =
            ((warm_rps * 1.3 * (args.duration * args.rounds).as_secs_f64()) as usize).clamp(1000, args.max_cold_tokens);
        progress(format!("signing {n} cold {alg} tokens"));
        let cold = realm.sign(&issuer, "app", "cold", n)?;
        let cf = work.join(format!("cold-{alg}.txt"));
        write_tokens(&cf, &cold)?;
        drop(cold);
        let sc = start_sidecar(&ctx, &format!("{id}-cold"), base.clone(), &realm.keys, None, ctx.proxy_cpu).await?;
        let mut row = Row::new(
            &format!("{id}-cold"),
            &format!("authrealm stateless {alg}, cold tokens"),
            "authrealm",
            "cold",
            200,
        );
        measure(
            &ctx,
            &mut row,
            Target {
                addr: sc.public,
                procs: vec![&sc.proc_],
                sidecar_admin: None,
                warm: &wf,
                measured: &cf,
                cold: true,
                open_tokens: None,
            },
        )
        .await?;
        if let Some(c) = &row.closed
            && c.reused_tokens > 0
        {
            row.note = Some(format!("{} requests reused a token (pool of {n} exhausted)", c.reused_tokens));
        }
        let _ = std::fs::remove_file(&cf);
        rows.push(row);
    }

    // Single session (Redis Cluster): cache off, cache on, revoked flood.
    if wanted(args, "single") || wanted(args, "revoked") {
        progress("starting a Redis Cluster on loopback (3 masters + 3 replicas)");
        let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(RedisClusterOptions::default())).await??;
        let mut single = SidecarConfig::example("bench", "/unused", Some(cluster.seeds()));
        single.issuer = issuer.clone();
        if let Some(r) = single.redis.as_mut() {
            r.key_prefix = format!("bench{}:", std::process::id());
        }
        let minter = start_sidecar(&ctx, "minter", single.clone(), &es.keys, None, None).await?;
        progress(format!(
            "minting {} session tokens and {} revoked ones through the issuer API",
            args.tokens, args.tokens
        ));
        let valid: Vec<String> =
            mint_many(minter.issuer, "session", args.tokens).await?.into_iter().map(|(t, _)| t).collect();
        let revoked = mint_many(minter.issuer, "revoked", args.tokens).await?;
        for chunk in revoked.chunks(8) {
            let paths: Vec<String> = chunk.iter().map(|(_, jti)| format!("/v1/tokens/{jti}")).collect();
            for r in futures_util::future::join_all(paths.iter().map(|p| call(minter.issuer, "DELETE", p, None))).await
            {
                let (status, body) = r?;
                if status != StatusCode::OK {
                    bail!("revoke: {status} {}", String::from_utf8_lossy(&body));
                }
            }
        }
        drop(minter);
        let revoked: Vec<String> = revoked.into_iter().map(|(t, _)| t).collect();
        let vf = work.join("session.txt");
        write_tokens(&vf, &valid)?;
        let rf = work.join("revoked.txt");
        write_tokens(&rf, &revoked)?;

        for (id, label, cache) in [
            ("single-es256-cache-off", "authrealm single-session ES256, session cache off", false),
            ("single-es256-cache-on", "authrealm single-session ES256, session cache on", true),
        ] {
            if !wanted(args, id) {
                continue;
            }
            let mut row = Row::new(id, label, "authrealm", "warm", 200);
            // Written both ways: the session cache is on by default, so "off" must say so.
            let extra = Some(("sessionCache", json!({ "enabled": cache, "maxStalenessMs": 1000 })));
            match start_sidecar(&ctx, id, single.clone(), &es.keys, extra, ctx.proxy_cpu).await {
                Ok(sc) => {
                    measure(
                        &ctx,
                        &mut row,
                        Target {
                            addr: sc.public,
                            procs: vec![&sc.proc_],
                            sidecar_admin: Some(sc.admin),
                            warm: &vf,
                            measured: &vf,
                            cold: false,
                            open_tokens: Some(header_values(&valid)),
                        },
                    )
                    .await?;
                    if cache && row.redis_checks_per_request.is_some_and(|c| c > 0.5) {
                        row.note = Some(format!(
                            "sessionCache accepted but {:.2} Redis checks per request: no cache effect in this build",
                            row.redis_checks_per_request.unwrap_or(0.0)
                        ));
                    }
                }
                Err(e) if cache && is_unknown_field_refusal(&e, "sessionCache") => {
                    progress(format!("{label}: the sidecar refused `sessionCache`; row n/a"));
                    row.unavailable = Some(
                        "n/a (no session cache in this build: the sidecar refuses the `sessionCache` field)".into(),
                    );
                }
                Err(e) => return Err(e),
            }
            rows.push(row);
        }
        if wanted(args, "revoked") {
            let mut row = Row::new(
                "revoked-flood",
                "authrealm single-session ES256, revoked-token flood (all 401)",
                "authrealm",
                "warm",
                401,
            );
            let sc = start_sidecar(&ctx, "revoked", single.clone(), &es.keys, None, ctx.proxy_cpu).await?;
            measure(
                &ctx,
                &mut row,
                Target {
                    addr: sc.public,
                    procs: vec![&sc.proc_],
                    sidecar_admin: Some(sc.admin),
                    warm: &rf,
                    measured: &rf,
                    cold: false,
                    open_tokens: Some(header_values(&revoked)),
                },
            )
            .await?;
            if let Some(c) = &row.closed {
                let wrong = c.requests.saturating_sub(c.non_2xx);
                if wrong > 0 {
                    row.note = Some(format!("{wrong} revoked-token requests were NOT refused"));
                }
            }
            rows.push(row);
        }
        drop(cluster);
    }

    // oauth2-proxy.
    let mut oauth2_check = Value::Null;
    if wanted(args, "oauth2-proxy") {
        match &args.oauth2_proxy {
            Err(reason) => {
                let mut row =
                    Row::new("oauth2-proxy-es256-warm", "oauth2-proxy, ES256, warm tokens", "peer", "warm", 200);
                row.unavailable = Some(format!("n/a ({reason})"));
                rows.push(row);
            }
            Ok(bin) => {
                // Verifies once: the provider is the realm's issuer and its client id is the
                // tokens' audience, so the first session loader accepts each token.
                let mut row =
                    Row::new("oauth2-proxy-es256-warm", "oauth2-proxy, ES256, warm tokens", "peer", "warm", 200);
                match start_oauth2_proxy(&ctx, bin, &issuer, "app", "once").await {
                    Ok((p, addr)) => {
                        measure(
                            &ctx,
                            &mut row,
                            Target {
                                addr,
                                procs: vec![&p],
                                sidecar_admin: None,
                                warm: &warm_file,
                                measured: &warm_file,
                                cold: false,
                                open_tokens: Some(es_warm_hv.clone()),
                            },
                        )
                        .await?;
                    }
                    Err(e) => row.unavailable = Some(format!("n/a (oauth2-proxy did not start: {e:#})")),
                }
                let once_cpu = row.cpu_ms_per_1k;
                rows.push(row);
                // The provider's client id is not the tokens' audience: the provider's verifier
                // checks the signature, then refuses the audience, then the extra issuer's
                // verifier checks the signature again and accepts.
                let mut row = Row::new(
                    "oauth2-proxy-aud-mismatch",
                    "oauth2-proxy, ES256, provider aud ≠ token aud (extra issuer accepts)",
                    "peer",
                    "warm",
                    200,
                );
                match start_oauth2_proxy(&ctx, bin, &issuer, "oauth2-proxy", "mismatch").await {
                    Ok((p, addr)) => {
                        measure(
                            &ctx,
                            &mut row,
                            Target {
                                addr,
                                procs: vec![&p],
                                sidecar_admin: None,
                                warm: &warm_file,
                                measured: &warm_file,
                                cold: false,
                                open_tokens: None,
                            },
                        )
                        .await?;
                    }
                    Err(e) => row.unavailable = Some(format!("n/a (oauth2-proxy did not start: {e:#})")),
                }
                if let (Some(a), Some(b)) = (once_cpu, row.cpu_ms_per_1k) {
                    oauth2_check = json!({
                        "cpu_ms_per_1k_aud_match": a, "cpu_ms_per_1k_aud_mismatch": b, "ratio": b / a,
                        "verifies_twice": b / a > 1.3,
                    });
                    row.note = Some(format!("CPU per request {:.2}× the matching-aud row", b / a));
                }
                rows.push(row);
            }
        }
    }
    drop(upstream_proc);

    let results = report(args, &ctx, &date, mach, micro, &rows, oauth2_check, started.elapsed())?;
    let md = markdown(&results);
    std::fs::write(args.out.join("results.json"), serde_json::to_vec_pretty(&results)?)?;
    std::fs::write(args.out.join("results.md"), &md)?;
    println!("{md}");
    progress(format!(
        "wrote {}/results.json and results.md in {:.0}s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Removes the work directory on drop.
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_oauth2_proxy(
    ctx: &Ctx,
    bin: &Path,
    issuer: &str,
    client_id: &str,
    name: &str,
) -> Result<(Proc, SocketAddr)> {
    let dir = ctx.work.join(format!("oauth2-proxy-{name}"));
    std::fs::create_dir_all(&dir)?;
    let addr = free_addr()?;
    let mut cmd = pinned(ctx.proxy_cpu, bin);
    cmd.env("GOMAXPROCS", "1")
        .arg(format!("--http-address=127.0.0.1:{}", addr.port()))
        .arg(format!("--upstream=http://{}/", ctx.upstream))
        .arg("--provider=oidc")
        .arg(format!("--oidc-issuer-url={issuer}"))
        .arg(format!("--client-id={client_id}"))
        .arg("--client-secret=bench-not-a-secret")
        .arg("--cookie-secret=0123456789abcdef0123456789abcdef")
        .arg("--cookie-secure=false")
        .arg("--email-domain=*")
        .arg("--skip-jwt-bearer-tokens")
        .arg(format!("--extra-jwt-issuers={issuer}=app"))
        .arg("--request-logging=false")
        .arg("--auth-logging=false")
        .arg("--silence-ping-logging");
    let mut p = Proc::spawn(&format!("oauth2-proxy ({name})"), cmd, dir.join("oauth2-proxy.log"))?;
    wait_ready(&mut p, addr, "/ping", StatusCode::OK).await?;
    Ok((p, addr))
}

// --- report --------------------------------------------------------------------------------

/// The cold target's detail: the denominator, and the ratio no proxy could pass that spends the warm
/// row's CPU per request besides the verify — a new token costs at least verify + warm path, so
/// its ratio to the verify rate is at most verify ÷ (verify + warm), whatever the proxy.
fn cold_detail(verify_per_s: Option<f64>, warm_cpu_ms_per_1k: Option<f64>) -> String {
    use std::fmt::Write;
    let Some(v) = verify_per_s.filter(|v| *v > 0.0) else { return String::new() };
    let mut d = format!("aws-lc-rs verify, key parsed once: {v:.0}/s");
    if let Some(w) = warm_cpu_ms_per_1k.filter(|w| *w > 0.0) {
        // CPU ms per 1k requests = µs per request.
        let verify_us = 1e6 / v;
        let _ = write!(
            d,
            "; ceiling with this run's warm path ({w:.1} µs CPU/request): {:.2}",
            verify_us / (verify_us + w)
        );
    }
    d
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    ctx: &Ctx,
    date: &str,
    machine: Value,
    micro: Value,
    rows: &[Row],
    oauth2_check: Value,
    elapsed: Duration,
) -> Result<Value> {
    let anchor = rows.iter().find(|r| r.id == "nginx");
    let find = |id: &str| rows.iter().find(|r| r.id == id && r.unavailable.is_none());
    let rps = |id: &str| find(id).and_then(|r| r.closed.as_ref()).map(|c| c.rps);
    let anchor_rps = rps("nginx");
    let anchor_p99 = anchor.and_then(|a| a.open.as_ref()).map(|o| o.pct(99.0));
    let mut targets = Vec::new();
    let mut target = |name: String, measured: Option<f64>, goal: f64, unit: &str, at_most: bool, detail: String| {
        let met = measured.map(|m| if at_most { m <= goal } else { m >= goal });
        targets.push(json!({ "target": name, "measured": measured, "goal": goal, "unit": unit,
            "at_most": at_most, "met": met, "detail": detail }));
    };
    for alg in ["hs256", "es256", "eddsa"] {
        let r = rps(&format!("stateless-{alg}-warm"));
        target(
            format!("stateless {} warm ≥ 90% of the anchor's req/s", alg.to_ascii_uppercase()),
            r.zip(anchor_rps).map(|(r, a)| r / a),
            0.9,
            "× anchor",
            false,
            String::new(),
        );
    }
    let cache_on = find("single-es256-cache-on").filter(|r| r.note.is_none());
    target(
        "single-session warm, session cache on ≥ 85% of the anchor".into(),
        cache_on.and_then(|r| r.closed.as_ref()).map(|c| c.rps).zip(anchor_rps).map(|(r, a)| r / a),
        0.85,
        "× anchor",
        false,
        if cache_on.is_none() { "no session cache in this build".into() } else { String::new() },
    );
    target(
        "single-session warm, session cache off ≥ 60% of the anchor".into(),
        rps("single-es256-cache-off").zip(anchor_rps).map(|(r, a)| r / a),
        0.6,
        "× anchor",
        false,
        String::new(),
    );
    for (alg, key) in [("hs256", "HS256"), ("es256", "ES256"), ("eddsa", "EdDSA")] {
        let verify = micro[key]["crypto_verify_per_s"].as_f64();
        target(
            format!("cold {key} ≥ 90% of the crypto library's verify rate on one core"),
            rps(&format!("stateless-{alg}-cold")).zip(verify).map(|(r, v)| r / v),
            0.9,
            "× verify rate",
            false,
            cold_detail(verify, find(&format!("stateless-{alg}-warm")).and_then(|r| r.cpu_ms_per_1k)),
        );
    }
    for r in rows.iter().filter(|r| r.group == "authrealm" && r.open.is_some()) {
        let p99 = r.open.as_ref().map(|o| o.pct(99.0));
        target(
            format!("{}: p99 at the fixed rate ≤ 1.5× the anchor's", r.label),
            p99.zip(anchor_p99).map(|(p, a)| p / a),
            1.5,
            "× anchor p99",
            true,
            if r.open.as_ref().is_some_and(|o| o.saturated()) {
                "saturated at this rate".into()
            } else {
                String::new()
            },
        );
    }
    let o2 = rps("oauth2-proxy-es256-warm");
    target(
        "stateless ES256 warm ≥ 10× oauth2-proxy's req/s (same tokens)".into(),
        rps("stateless-es256-warm").zip(o2).map(|(a, b)| a / b),
        10.0,
        "× oauth2-proxy",
        false,
        if o2.is_none() { "oauth2-proxy row unavailable".into() } else { String::new() },
    );
    let max_rss = rows
        .iter()
        .filter(|r| r.group == "authrealm")
        .filter_map(|r| r.rss_mb)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    target("sidecar peak RSS ≤ 30 MB".into(), max_rss, 30.0, "MiB", true, "largest VmHWM over the sidecar rows".into());

    Ok(json!({
        "date": date,
        "elapsed_s": elapsed.as_secs_f64(),
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "connections": ctx.connections,
            "duration_s": ctx.duration.as_secs(),
            "rounds": ctx.rounds,
            "fixed_s": ctx.fixed.as_secs(),
            "warmup_s": ctx.warmup.as_secs(),
            "fixed_rate": ctx.rate,
            "rate_fraction_of_anchor": args.rate_fraction,
            "warm_pool_tokens": args.tokens,
            "proxy_cpu": ctx.proxy_cpu,
            "upstream_body_bytes": UPSTREAM_BODY_BYTES,
        },
        "crypto_micro": micro,
        "rows": rows.iter().map(|r| r.to_json(anchor)).collect::<Vec<_>>(),
        "targets": targets,
        "oauth2_proxy_aud_mismatch": oauth2_check,
    }))
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => {
            if digits == 0 {
                let s = format!("{:.0}", x);
                // thousands separator (thin space) for readability
                let (sign, d) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
                let mut out = String::new();
                for (i, ch) in d.chars().enumerate() {
                    if i > 0 && (d.len() - i) % 3 == 0 {
                        out.push('\u{202f}');
                    }
                    out.push(ch);
                }
                format!("{sign}{out}")
            } else {
                format!("{x:.digits$}")
            }
        }
        _ => "–".into(),
    }
}

fn markdown(r: &Value) -> String {
    use std::fmt::Write;
    let m = &r["machine"];
    let s = &r["settings"];
    let mut o = String::new();
    let _ = writeln!(o, "# authrealm benchmark, {}\n", r["date"].as_str().unwrap_or(""));
    let _ = writeln!(
        o,
        "Machine: {} × {} ({} CPUs online), {} MiB RAM, Linux {}; load average at start {}. \
         {}; {}; {}; {}; authrealm {}.\n",
        m["cpus_online"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["cpus_online"],
        m["memory_mb"],
        m["kernel"].as_str().unwrap_or(""),
        m["loadavg_at_start"].as_str().unwrap_or(""),
        m["nginx"].as_str().unwrap_or(""),
        m["redis"].as_str().unwrap_or("").split(" sha").next().unwrap_or(""),
        if m["oauth2_proxy"].as_str().unwrap_or("").is_empty() {
            "oauth2-proxy: not available"
        } else {
            m["oauth2_proxy"].as_str().unwrap_or("")
        },
        m["wrk"].as_str().unwrap_or("").split(" [").next().unwrap_or(""),
        m["authrealm_rev"].as_str().unwrap_or("?"),
    );
    let pin = match s["proxy_cpu"].as_u64() {
        Some(c) => format!(
            "every proxy pinned to CPU {c} (`taskset -c {c}`); load generator, upstream nginx, Redis Cluster and this benchmark on the other CPU(s)"
        ),
        None => "no CPU pinning (fewer than 2 CPUs)".into(),
    };
    let _ = writeln!(
        o,
        "Settings (the same for every row): one worker per proxy — nginx `worker_processes 1`, the sidecar \
         `TOKIO_WORKER_THREADS=1`, oauth2-proxy `GOMAXPROCS=1`; logging at warn (nginx `error_log warn`, `access_log off`; \
         sidecar `AUTHREALM_LOG=warn`; oauth2-proxy request and auth logging off); {pin}; the same upstream for every row \
         (nginx, `return 200` with {} bytes, keep-alive). Maximum throughput: `wrk -t1 -c{}` closed loop, the median of {} runs of {} s after a {} s \
         warm-up (cold rows: one run as long as those together), a Lua script giving each request the next token of a pool ({} warm tokens reused; cold: a new token per request, \
         signed beforehand with the realm key). Fixed rate: {} req/s for every row ({:.0}% of the anchor's maximum), {} connections, {} s after a warm-up, \
         open loop, latency from each request's intended send time (coordinated omission corrected). CPU per 1,000 requests: utime+stime \
         of the proxy's processes (`/proc/PID/stat`) during the maximum-throughput run; peak RSS: VmHWM. Each row starts its own processes.\n",
        s["upstream_body_bytes"],
        s["connections"],
        s["rounds"],
        s["duration_s"],
        s["warmup_s"],
        s["warm_pool_tokens"],
        f(&s["fixed_rate"], 0),
        s["rate_fraction_of_anchor"].as_f64().unwrap_or(0.0) * 100.0,
        s["connections"],
        s["fixed_s"],
    );
    let _ = writeln!(
        o,
        "| row | max req/s | × nginx | CPU ms / 1k req | p99 ms (max) | fixed rate p50 / p99 / p99.9 ms | p99 × nginx | peak RSS MiB | notes |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---|---:|---:|---|");
    let anchor_p99 = r["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|x| x["id"] == "nginx"))
        .map(|a| a["fixed_rate"]["p99_ms"].clone())
        .unwrap_or(Value::Null);
    for row in r["rows"].as_array().into_iter().flatten() {
        let label = row["label"].as_str().unwrap_or("");
        if let Some(na) = row["unavailable"].as_str() {
            let _ = writeln!(o, "| {label} | {na} | | | | | | | |");
            continue;
        }
        let max = &row["max"];
        let fr = &row["fixed_rate"];
        let fixed = if fr.is_null() {
            "–".to_string()
        } else {
            format!(
                "{} / {} / {}{}",
                f(&fr["p50_ms"], 2),
                f(&fr["p99_ms"], 2),
                f(&fr["p999_ms"], 2),
                if fr["saturated"] == true { " (saturated)" } else { "" }
            )
        };
        let p99x = match (fr["p99_ms"].as_f64(), anchor_p99.as_f64()) {
            (Some(p), Some(a)) if a > 0.0 => format!("{:.2}", p / a),
            _ => "–".into(),
        };
        let mut notes = Vec::new();
        let errs = max["socket_errors"].as_u64().unwrap_or(0);
        if errs > 0 {
            notes.push(format!("{errs} socket errors"));
        }
        if row["expected_status"] == 401 {
            notes.push(format!("{} of {} answered 401", max["non_2xx_3xx"], max["requests"]));
        } else if max["non_2xx_3xx"].as_u64().unwrap_or(0) > 0 {
            notes.push(format!("{} non-2xx", max["non_2xx_3xx"]));
        }
        if let Some(c) = row["redis_checks_per_request"].as_f64() {
            notes.push(match row["background_reads_per_request"].as_f64() {
                Some(b) => format!("{c:.2} Redis checks/req (+ {b:.2} background re-reads/req)"),
                None => format!("{c:.2} Redis checks/req"),
            });
        }
        let own = &row["own_rate"];
        if !own.is_null() {
            notes.push(format!(
                "at {} req/s (its own max × the same fraction): p50 / p99 / p99.9 {} / {} / {} ms{}",
                f(&own["rate"], 0),
                f(&own["p50_ms"], 2),
                f(&own["p99_ms"], 2),
                f(&own["p999_ms"], 2),
                if own["saturated"] == true { " (saturated)" } else { "" }
            ));
        }
        if let Some(n) = row["note"].as_str() {
            notes.push(n.to_string());
        }
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} | {} | {fixed} | {p99x} | {} | {} |",
            f(&max["requests_per_s"], 0),
            f(&max["ratio_to_anchor"], 2),
            f(&max["cpu_ms_per_1k_requests"], 1),
            f(&max["p99_ms"], 2),
            f(&row["peak_rss_mb"], 1),
            notes.join("; "),
        );
    }
    let _ = writeln!(o, "\n## Targets (issue 11; ratios from this one run)\n");
    let _ = writeln!(o, "| target | measured | goal | |\n|---|---:|---:|---|");
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "n/a",
        };
        let detail = t["detail"].as_str().unwrap_or("");
        let _ = writeln!(
            o,
            "| {} | {} | {} {} {} | {met}{} |",
            t["target"].as_str().unwrap_or(""),
            f(&t["measured"], 2),
            if t["at_most"] == true { "≤" } else { "≥" },
            t["goal"],
            t["unit"].as_str().unwrap_or(""),
            if detail.is_empty() { String::new() } else { format!(" ({detail})") },
        );
    }
    let _ = writeln!(
        o,
        "\nOperator targets (1,000 realms, idle API rate, webhook p99) are measured by `hack/bench.sh --operator`.\n"
    );
    let _ = writeln!(
        o,
        "## Crypto micro-benchmark (one thread on the proxy CPU, no I/O; rates are medians of interleaved timed batches, wall clock)\n"
    );
    let _ = writeln!(
        o,
        "Crypto verify: aws-lc-rs with the public key parsed once (`ParsedPublicKey`; HMAC: a prepared `hmac::Key`) and \
         the raw signature, the library's best on one core and the cold-token target's denominator. jsonwebtoken verify: \
         `jsonwebtoken::crypto::verify`, which parses the key and decodes the signature on every call. Sidecar verify: \
         the check `token::validate` makes (key prepared once, signature segment decoded).\n"
    );
    let _ = writeln!(
        o,
        "| alg | crypto verify/s (µs) | jsonwebtoken verify/s (µs) | sidecar verify/s (µs) | token::validate/s (µs) | mint/s |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    let with_us = |v: &Value| v.as_f64().map(|x| format!("{x:.0} ({:.1})", 1e6 / x)).unwrap_or_default();
    if let Some(mm) = r["crypto_micro"].as_object() {
        for (alg, v) in mm {
            let _ = writeln!(
                o,
                "| {alg} | {} | {} | {} | {} | {} |",
                with_us(&v["crypto_verify_per_s"]),
                with_us(&v["jsonwebtoken_verify_per_s"]),
                with_us(&v["sidecar_verify_per_s"]),
                with_us(&v["validate_per_s"]),
                f(&v["mint_per_s"], 0),
            );
        }
    }
    let chk = &r["oauth2_proxy_aud_mismatch"];
    if !chk.is_null() {
        let _ = writeln!(
            o,
            "\noauth2-proxy and `aud`: with `--skip-jwt-bearer-tokens` its first session loader is the provider's verifier, \
             which checks the signature before the audience; when the token's `aud` is not the provider's client id the \
             extra issuer's verifier then checks the signature again. Measured: {} CPU ms per 1k requests with a matching \
             `aud`, {} with a mismatch ({:.2}×){}.",
            f(&chk["cpu_ms_per_1k_aud_match"], 1),
            f(&chk["cpu_ms_per_1k_aud_mismatch"], 1),
            chk["ratio"].as_f64().unwrap_or(0.0),
            if chk["verifies_twice"] == true {
                ", consistent with a second signature check"
            } else {
                "; a difference this small is within this run's noise, the source still checks twice"
            },
        );
    }
    let _ = writeln!(o, "\nRun took {:.0} s.", r["elapsed_s"].as_f64().unwrap_or(0.0));
    o
}
