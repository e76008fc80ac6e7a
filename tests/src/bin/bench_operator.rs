//! The operator and webhook at scale (`hack/bench-operator.sh`): the real release operator
//! binary against a real kube-apiserver (with an audit log) and a real Redis Cluster, all on
//! loopback.
//!
//! 1. `--realms` AuthRealms (ES256, sessions in the Redis Cluster, all naming the same seeds
//!    and credentials) are created; the time until all are Ready and the operator's peak RSS
//!    (`VmHWM`) are recorded.
//! 2. Idle steady state for `--idle-secs`: API requests per second sent by the operator (audit
//!    log entries whose User-Agent is the operator's) and new Redis connections per minute
//!    (`INFO stats` `total_connections_received` summed over every node, minus the bench's own).
//! 3. `--admissions` labelled pods are created with `dryRun` one after another through the
//!    chart's MutatingWebhookConfiguration, which calls the operator's webhook: latency p50/p99
//!    of the API calls as the client sees them (webhook + API server); of the webhook alone,
//!    exactly, from the per-admission timing line the operator logs (target
//!    `authrealm_operator::webhook::timing`, enabled for this run), and from its
//!    `authrealm_operator_webhook_admission_duration_seconds` histogram (bucket upper bounds);
//!    and the API requests the operator made meanwhile (audit log), per admission.
//!
//! The load average (`/proc/loadavg`) at the start, before the admissions and at the end is in
//! the report: the machine is shared, so compare runs by ratios and request counts.
//!
//! Prints a Markdown table with the targets of issue 11 and writes
//! `<out-dir>/operator.json` and `<out-dir>/operator.md`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use authrealm_tests::chart_operator::{ChartOperator, ChartOperatorOptions, NAMESPACE};
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};

const REDIS_PASSWORD: &str = "bench-redis-pw";
const OPERATOR_UA: &str = "authrealm-operator/";
/// Tracing target of the operator's per-admission timing line (`elapsed_us`).
const TIMING_TARGET: &str = "authrealm_operator::webhook::timing";

/// Every request at Metadata level (no bodies: no key material in the log).
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"#;

struct Args {
    realms: usize,
    idle: Duration,
    admissions: usize,
    settle: Duration,
    operator_bin: PathBuf,
    out_dir: PathBuf,
    label: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_operator [--realms N (1000)] [--idle-secs S (120)] [--admissions N (1000)] \
         [--settle-secs S (10)] [--operator-bin PATH] [--out-dir DIR] [--label TEXT]"
    );
    std::process::exit(64)
}

fn parse_args() -> Args {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let stamp = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut a = Args {
        realms: 1000,
        idle: Duration::from_secs(120),
        admissions: 1000,
        settle: Duration::from_secs(10),
        operator_bin: std::env::var_os("AUTHREALM_OPERATOR_BIN").map(PathBuf::from).unwrap_or_default(),
        out_dir: repo.join("bench-results").join(stamp),
        label: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let num = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--realms" => a.realms = num(value()) as usize,
            "--idle-secs" => a.idle = Duration::from_secs(num(value())),
            "--admissions" => a.admissions = num(value()) as usize,
            "--settle-secs" => a.settle = Duration::from_secs(num(value())),
            "--operator-bin" => a.operator_bin = PathBuf::from(value()),
            "--out-dir" => a.out_dir = PathBuf::from(value()),
            "--label" => a.label = value(),
            _ => usage(),
        }
    }
    if a.operator_bin.as_os_str().is_empty() {
        eprintln!("bench_operator: pass --operator-bin or AUTHREALM_OPERATOR_BIN (the release operator binary)");
        usage()
    }
    a
}

/// `VmHWM` and `VmRSS` of a process, in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is index 0; utime is field 14 of the line, index 11 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// One audit event.
struct Audit {
    id: String,
    at: Timestamp,
    /// When the API server finished answering (`stageTimestamp` of the last stage logged).
    done: Option<Timestamp>,
    user_agent: String,
    verb: String,
    resource: String,
}

fn read_audit(path: &Path) -> Vec<Audit> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
            Some(Audit {
                id: s("/auditID"),
                at: s("/requestReceivedTimestamp").parse().ok()?,
                done: s("/stageTimestamp").parse().ok(),
                user_agent: s("/userAgent"),
                verb: s("/verb"),
                resource: {
                    let sub = s("/objectRef/subresource");
                    let r = s("/objectRef/resource");
                    if sub.is_empty() { r } else { format!("{r}/{sub}") }
                },
            })
        })
        .collect()
}

/// Operator requests received in `[from, to)`, one per audit ID, by "verb resource".
fn operator_requests(path: &Path, from: Timestamp, to: Timestamp) -> (usize, BTreeMap<String, usize>) {
    let mut seen = HashSet::new();
    let mut by_kind = BTreeMap::new();
    for a in read_audit(path) {
        if a.user_agent.starts_with(OPERATOR_UA) && a.at >= from && a.at < to && seen.insert(a.id.clone()) {
            *by_kind.entry(format!("{} {}", a.verb, a.resource)).or_insert(0) += 1;
        }
    }
    (seen.len(), by_kind)
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Per-admission webhook times (ms) from the operator's JSON log, in lines after byte `from`.
fn logged_admission_times(log: &Path, from: usize) -> Vec<f64> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
    text.lines()
        .filter_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            if v["target"] != TIMING_TARGET {
                return None;
            }
            Some(v["elapsed_us"].as_u64()? as f64 / 1000.0)
        })
        .collect()
}

/// How long the API server took (received → answered, ms) for each operator request received in
/// `[from, to)` (the last logged stage of each).
fn operator_request_times(path: &Path, from: Timestamp, to: Timestamp) -> Vec<f64> {
    let mut last = BTreeMap::new();
    for a in read_audit(path) {
        if a.user_agent.starts_with(OPERATOR_UA)
            && a.at >= from
            && a.at < to
            && let Some(done) = a.done
        {
            last.insert(a.id, done.duration_since(a.at).as_secs_f64() * 1000.0);
        }
    }
    let mut out: Vec<f64> = last.into_values().collect();
    out.sort_by(f64::total_cmp);
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Cumulative histogram buckets (`le` → count) of a metric from a text exposition.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket holding quantile `q` of the observations between two scrapes.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> =
        after.iter().map(|(le, n)| (*le, n - before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m))).collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta.iter().find(|(_, n)| *n >= q * total).map_or(f64::INFINITY, |(le, _)| *le)
}

async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn realm_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("authrealm.dev", "v1alpha1", "AuthRealm");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk_with_plural(&gvk, "authrealms"))
}

fn is_ready(o: &DynamicObject) -> bool {
    o.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

struct Row {
    what: &'static str,
    value: String,
    target: &'static str,
    met: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let load_start = loadavg();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let started = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    ensure!(args.operator_bin.is_file(), "no operator binary at {}", args.operator_bin.display());

    eprintln!("bench-operator: starting a Redis Cluster and kube-apiserver (audit log on)");
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start(RedisClusterOptions::with_password(REDIS_PASSWORD)))
            .await??;
    let audit_dir = std::env::temp_dir().join(format!("authrealm-bench-audit-{}", std::process::id()));
    let (mut opts, audit_log) = KubeEnvOptions::audited(&audit_dir, AUDIT_POLICY)?;
    // The benchmark's own client creates realms and pods quickly.
    opts.extra_apiserver_args.push("--max-requests-inflight=1000".into());
    let env = KubeEnv::start(opts).await?;
    let result = run(&args, &repo, &env, &cluster, &audit_log, started, &load_start).await;
    let _ = std::fs::remove_dir_all(&audit_dir);
    drop(env);
    drop(cluster);
    result
}

async fn run(
    args: &Args,
    repo: &Path,
    env: &KubeEnv,
    cluster: &RedisCluster,
    audit_log: &Path,
    started: Instant,
    load_start: &str,
) -> anyhow::Result<()> {
    let client = env.client().await?;
    env.create_namespace(NAMESPACE).await?;
    let ns = "bench";
    env.create_namespace(ns).await?;
    // The Redis credentials every realm names.
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "redis-auth", "labels": {"authrealm.dev/redis-credentials": "true"}},
                "stringData": {"password": REDIS_PASSWORD},
            }))?,
        )
        .await?;

    // The operator as the chart's ServiceAccount, with the chart's settings.
    let op = ChartOperator::start(
        env,
        repo,
        &args.operator_bin,
        &ChartOperatorOptions {
            watch_namespace: None,
            // Plus one JSON line per admission with its exact time.
            rust_log: "warn,authrealm_operator::webhook::timing=debug",
            sidecar_image: "authrealm-sidecar:bench",
            env: &[("AUTHREALM_LOG_FORMAT", "json")],
        },
    )?;
    let http_port = op.http_port;
    // Ready to serve: the webhook's TLS is in place and the controller is the leader.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http_get(http_port, "/metrics").await.unwrap_or_default();
        if metrics.contains("authrealm_operator_leader 1") {
            break;
        }
        ensure!(Instant::now() < deadline, "operator not leader after 60s\n{}", op.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 1. Realms.
    eprintln!("bench-operator: creating {} AuthRealms (ES256, Redis sessions)", args.realms);
    let realms = realm_api(&client, ns);
    let seeds = cluster.seeds();
    let seeds: Vec<String> = seeds.into_iter().take(2).collect();
    // Readiness from a watch (started before the first create), not from lists of every realm.
    let mut ready_events = watcher(realms.clone(), watcher::Config::default()).default_backoff().boxed();
    let create_started = Instant::now();
    let creates = futures_util::stream::iter(0..args.realms).map(|i| {
        let realms = realms.clone();
        let seeds = seeds.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "authrealm.dev/v1alpha1", "kind": "AuthRealm",
                "metadata": {"name": format!("r{i:04}")},
                "spec": {
                    "issuer": format!("https://r{i}.bench.example"), "audiences": ["app"], "algorithm": "ES256",
                    "redis": {"endpoints": seeds, "credentials": {"secretName": "redis-auth"}},
                },
            }))?;
            realms.create(&PostParams::default(), &obj).await?;
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = creates.buffer_unordered(16).collect().await;
    for r in results {
        r?;
    }
    let created_in = create_started.elapsed();
    let mut ready_names = HashSet::new();
    let mut peak_kib = 0;
    let mut sample = tokio::time::interval(Duration::from_millis(250));
    let deadline = tokio::time::sleep(Duration::from_secs(180));
    tokio::pin!(deadline);
    while ready_names.len() < args.realms {
        tokio::select! {
            ev = ready_events.next() => match ev {
                Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => {
                    if is_ready(&o) {
                        ready_names.insert(o.metadata.name.clone().unwrap_or_default());
                    } else {
                        ready_names.remove(o.metadata.name.as_deref().unwrap_or_default());
                    }
                }
                Some(Ok(watcher::Event::Delete(o))) => {
                    ready_names.remove(o.metadata.name.as_deref().unwrap_or_default());
                }
                Some(_) => {}
                None => bail!("the realm watch ended"),
            },
            _ = sample.tick() => peak_kib = peak_kib.max(memory_kib(op.pid())?.0),
            _ = &mut deadline => bail!(
                "only {} of {} realms Ready after 180s\n{}",
                ready_names.len(),
                args.realms,
                op.log_tail()
            ),
        }
    }
    let all_ready = create_started.elapsed();
    let (hwm_after_ready, _) = memory_kib(op.pid())?;
    eprintln!(
        "bench-operator: {} realms created in {created_in:.1?}, all Ready {all_ready:.1?} after the first create; \
         VmHWM {} MiB",
        args.realms,
        hwm_after_ready / 1024
    );

    // 2. Idle.
    tokio::time::sleep(args.settle).await;
    eprintln!("bench-operator: idle for {:?}", args.idle);
    let (conns_before, nodes) = cluster.connections_received()?;
    let cpu_before = cpu_secs(op.pid());
    let idle_from = Timestamp::now();
    let idle_started = Instant::now();
    tokio::time::sleep(args.idle).await;
    let idle_to = Timestamp::now();
    let idle_secs = idle_started.elapsed().as_secs_f64();
    let cpu_idle = cpu_secs(op.pid()) - cpu_before;
    let (conns_after, _) = cluster.connections_received()?;
    // Each INFO of the second round is itself one new connection per node.
    let new_conns = conns_after.saturating_sub(conns_before).saturating_sub(nodes);
    let (idle_requests, idle_by_kind) = operator_requests(audit_log, idle_from, idle_to);
    let idle_rps = idle_requests as f64 / idle_secs;
    let conns_per_min = new_conns as f64 * 60.0 / idle_secs;
    let (_, rss_idle) = memory_kib(op.pid())?;
    eprintln!(
        "bench-operator: idle: {idle_requests} operator requests ({idle_rps:.2}/s) {idle_by_kind:?}, {new_conns} new \
         Redis connections ({conns_per_min:.2}/min), {cpu_idle:.2} s CPU"
    );

    // 3. Admissions.
    eprintln!("bench-operator: {} labelled pod admissions (dry-run, sequential)", args.admissions);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = |i: usize| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{i}"), "labels": {"app": "bench", "authrealm.dev/realm": format!("r{:04}", i % args.realms)}},
            "spec": {
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}],
                    "securityContext": {"runAsUser": 1000, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            },
        }))?)
    };
    let dry = PostParams { dry_run: true, field_manager: None };
    // Warm-up (and a check that the webhook injects).
    let injected = pods.create(&dry, &pod(0)?).await?;
    let containers = |p: &Pod| {
        let s = p.spec.as_ref();
        s.map_or(0, |s| s.containers.len() + s.init_containers.as_ref().map_or(0, Vec::len))
    };
    ensure!(containers(&injected) > 1, "the webhook did not inject a sidecar\n{}", op.log_tail());
    let hist_name = "authrealm_operator_webhook_admission_duration_seconds";
    let hist_before = histogram(&http_get(http_port, "/metrics").await?, hist_name);
    let load_admissions = loadavg();
    let log_from = std::fs::metadata(&op.log).map_or(0, |m| m.len() as usize);
    let admissions_from = Timestamp::now();
    let mut latencies = Vec::with_capacity(args.admissions);
    for i in 0..args.admissions {
        let t = Instant::now();
        let p = pods.create(&dry, &pod(i)?).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if containers(&p) < 2 {
            bail!("pod {i} was not injected");
        }
    }
    let admissions_to = Timestamp::now();
    let hist_after = histogram(&http_get(http_port, "/metrics").await?, hist_name);
    let (admission_requests, admission_by_kind) = operator_requests(audit_log, admissions_from, admissions_to);
    let requests_per_admission = admission_requests as f64 / args.admissions.max(1) as f64;
    // The API server's side of the operator's requests meanwhile (the webhook's lookups, if any).
    let request_times = operator_request_times(audit_log, admissions_from, admissions_to);
    let (request_p50, request_p99) = (percentile(&request_times, 0.5), percentile(&request_times, 0.99));
    let mut exact = logged_admission_times(&op.log, log_from);
    ensure!(
        exact.len() == args.admissions,
        "the operator logged {} admission times for {} admissions (is the timing line enabled?)",
        exact.len(),
        args.admissions
    );
    exact.sort_by(f64::total_cmp);
    let (exact_p50, exact_p90, exact_p99, exact_max) =
        (percentile(&exact, 0.5), percentile(&exact, 0.9), percentile(&exact, 0.99), percentile(&exact, 1.0));
    let exact_mean = exact.iter().sum::<f64>() / exact.len().max(1) as f64;
    let load_end = loadavg();
    eprintln!(
        "bench-operator: admissions: webhook exact p50 {exact_p50:.2} ms p99 {exact_p99:.2} ms; \
         {admission_requests} operator API requests {admission_by_kind:?}"
    );
    latencies.sort_by(f64::total_cmp);
    let (api_p50, api_p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let (wh_p50, wh_p99) = (
        histogram_quantile(&hist_before, &hist_after, 0.5) * 1000.0,
        histogram_quantile(&hist_before, &hist_after, 0.99) * 1000.0,
    );
    let (hwm_end, _) = memory_kib(op.pid())?;
    let peak_mib = hwm_end.max(peak_kib) as f64 / 1024.0;

    let rows = vec![
        Row {
            what: "realms Ready after the first create",
            value: format!("{:.1} s ({} realms)", all_ready.as_secs_f64(), args.realms),
            target: "≤ 30 s for 1,000",
            met: all_ready <= Duration::from_secs(30),
        },
        Row {
            what: "operator peak RSS (VmHWM, whole run)",
            value: format!("{peak_mib:.1} MiB"),
            target: "≤ 64 MB",
            met: peak_mib * 1.048_576 <= 64.0,
        },
        Row {
            what: "idle API requests by the operator",
            value: format!("{idle_rps:.2} /s ({idle_requests} in {idle_secs:.0} s)"),
            target: "≤ 2 /s",
            met: idle_rps <= 2.0,
        },
        Row {
            what: "idle new Redis connections (all nodes)",
            value: format!("{conns_per_min:.2} /min ({new_conns} in {idle_secs:.0} s)"),
            target: "≤ 1 /min",
            met: conns_per_min <= 1.0,
        },
        Row {
            what: "webhook p99 (each admission's time, as the operator logs it)",
            value: format!(
                "{exact_p99:.2} ms (p50 {exact_p50:.2}, p90 {exact_p90:.2}, max {exact_max:.2}, mean {exact_mean:.2} ms)"
            ),
            target: "≤ 10 ms",
            met: exact_p99 <= 10.0,
        },
        Row {
            what: "webhook p99 (its histogram, bucket upper bound)",
            value: format!("≤ {wh_p99:.1} ms (p50 ≤ {wh_p50:.1} ms)"),
            target: "(context: what Prometheus sees)",
            met: true,
        },
        Row {
            what: "API requests by the operator per admission",
            value: if request_times.is_empty() {
                format!("{requests_per_admission:.2} ({admission_requests} during {} admissions)", args.admissions)
            } else {
                format!(
                    "{requests_per_admission:.2} ({admission_requests} during {} admissions; API server time each \
                     p50 {request_p50:.2} ms, p99 {request_p99:.2} ms)",
                    args.admissions
                )
            },
            target: "(context: lookups on the API server)",
            met: true,
        },
        Row {
            what: "pod admission p99 (dry-run create, client side)",
            value: format!("{api_p99:.1} ms (p50 {api_p50:.1} ms)"),
            target: "(context: API server + webhook)",
            met: true,
        },
    ];
    let mut md = String::new();
    md.push_str(&format!(
        "### Operator and webhook at scale{}\n\n",
        if args.label.is_empty() { String::new() } else { format!(" — {}", args.label) }
    ));
    md.push_str("| measure | value | target | met |\n|---|---|---|---|\n");
    for r in &rows {
        let met = if r.target.starts_with('(') {
            "—"
        } else if r.met {
            "met"
        } else {
            "missed"
        };
        md.push_str(&format!("| {} | {} | {} | {} |\n", r.what, r.value, r.target, met));
    }
    md.push_str(&format!(
        "\nConditions: operator binary `{}` (chart settings: concurrency 4, Redis check every 60 s, leader \
         election on, RBAC of the chart's ServiceAccount), real kube-apiserver with an audit log (blocking) and a \
         6-node Redis Cluster on loopback, {} CPUs shared with the API server, etcd and the bench. Realms: ES256, \
         sessions in Redis, all naming the same 2 seeds and credentials; created 16 at a time. Idle: {:.0} s \
         starting {} s after all were Ready; requests are audit-log entries with the operator's User-Agent (by \
         kind: {}); operator CPU while idle {:.2} s. Admissions: {} sequential dry-run creates of labelled pods \
         through the chart's MutatingWebhookConfiguration (operator requests meanwhile by kind: {}). Load \
         average (1 min) at the start {}, before the admissions {}, at the end {}. Whole run {:.0} s.\n",
        args.operator_bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        idle_secs,
        args.settle.as_secs(),
        if idle_by_kind.is_empty() {
            "none".to_owned()
        } else {
            idle_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
        },
        cpu_idle,
        args.admissions,
        if admission_by_kind.is_empty() {
            "none".to_owned()
        } else {
            admission_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
        },
        load_start,
        load_admissions,
        load_end,
        started.elapsed().as_secs_f64()
    ));
    println!("{md}");
    let report = json!({
        "label": args.label,
        "operator_bin": args.operator_bin.display().to_string(),
        "realms": args.realms,
        "create_secs": created_in.as_secs_f64(),
        "all_ready_secs": all_ready.as_secs_f64(),
        "peak_rss_mib": peak_mib,
        "rss_after_idle_mib": rss_idle as f64 / 1024.0,
        "idle": {
            "secs": idle_secs,
            "operator_requests": idle_requests,
            "operator_requests_per_sec": idle_rps,
            "by_kind": idle_by_kind,
            "redis_new_connections": new_conns,
            "redis_new_connections_per_min": conns_per_min,
            "operator_cpu_secs": cpu_idle,
        },
        "admissions": {
            "count": args.admissions,
            "client_p50_ms": api_p50,
            "client_p99_ms": api_p99,
            "webhook_p50_ms_bucket_bound": wh_p50,
            "webhook_p99_ms_bucket_bound": wh_p99,
            "webhook_exact_ms": {"p50": exact_p50, "p90": exact_p90, "p99": exact_p99, "max": exact_max, "mean": exact_mean},
            "operator_requests": admission_requests,
            "operator_requests_per_admission": requests_per_admission,
            "operator_requests_by_kind": admission_by_kind,
            "operator_request_apiserver_ms": {"p50": request_p50, "p99": request_p99, "count": request_times.len()},
        },
        "loadavg_1m": {"start": load_start, "before_admissions": load_admissions, "end": load_end},
        "targets": rows.iter().filter(|r| !r.target.starts_with('(')).map(|r| json!({"what": r.what, "value": r.value, "target": r.target, "met": r.met})).collect::<Vec<_>>(),
        "run_secs": started.elapsed().as_secs_f64(),
    });
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("operator.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(args.out_dir.join("operator.md"), &md)?;
    eprintln!("bench-operator: wrote {}/operator.{{json,md}}", args.out_dir.display());
    drop(op);
    Ok(())
}
