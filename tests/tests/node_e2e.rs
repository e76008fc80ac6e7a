//! The whole system on a real one-node Kubernetes (`hack/node.sh`, see `authrealm_tests::node_env`):
//! the chart's operator pods, the images packed from this build's binaries, Redis Cluster pods
//! from the kind manifests, an AuthRealm, and the example login app with its injected sidecar,
//! exercised through Services from the host — the way users run authrealm.
//!
//! One node per machine, so this binary runs its scenarios in sequence, in the order below (later
//! ones build on earlier ones), on one node started once and always torn down (also on a panic).
//! `harness = false`: arguments that are not flags filter by scenario name like libtest does (a
//! selected scenario brings the ones before it); the node is not started when none matches. Skipped (with a message) when not root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use authrealm_tests::node_env::{self, LOGIN_APP_IMAGE, NodeEnv, OPERATOR_IMAGE, SIDECAR_IMAGE, run};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SYSTEM_NS: &str = "authrealm-system";
const DEMO_NS: &str = "authrealm-demo";
const OPTED_OUT_NS: &str = "opted-out";
const RELEASE: &str = "authrealm";
const USER: &str = "alice";
const PASSWORD: &str = "demo-only-password"; // examples/login-app/README.md

type Scenario = for<'a> fn(&'a mut Ctx) -> futures_util::future::BoxFuture<'a, anyhow::Result<()>>;

/// In order; each may rely on what the ones before it set up.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("chart_two_operator_pods_one_leader_webhook_through_service", |c| Box::pin(chart_installs(c))),
    ("redis_cluster_pods_and_realm_ready", |c| Box::pin(redis_and_realm(c))),
    ("login_app_restricted_namespace_sidecar_before_endpoints", |c| Box::pin(login_app_pod(c))),
    ("login_flow_through_the_service", |c| Box::pin(login_flow(c))),
    ("unlabelled_pod_and_opted_out_namespace_untouched", |c| Box::pin(untouched(c))),
    ("operator_pod_deleted_other_serves_leadership_moves_no_flap", |c| Box::pin(operator_pod_deleted(c))),
    ("redis_master_deleted_revoked_stays_revoked", |c| Box::pin(redis_master_deleted(c))),
    ("key_rotation_reaches_the_running_sidecar", |c| Box::pin(key_rotation_hot_reload(c))),
    ("up_sh_on_an_existing_cluster_twice_removes_only_its_own", |c| Box::pin(up_sh_existing_cluster(c))),
];

fn main() {
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--skip" | "--test-threads" | "--format" | "--color" | "-Z" => drop(args.next()),
            a if a.starts_with('-') => {}
            _ => filters.push(arg),
        }
    }
    // A scenario needs the ones before it: a filter selects everything up to its last match.
    let matches = |name: &str| filters.iter().any(|f| name.contains(f.as_str()) || "node_e2e".contains(f.as_str()));
    let last = if filters.is_empty() {
        SCENARIOS.len()
    } else {
        SCENARIOS.iter().rposition(|(n, _)| matches(n)).map_or(0, |i| i + 1)
    };
    let selected: Vec<&(&str, Scenario)> = SCENARIOS[..last].iter().collect();
    if selected.is_empty() {
        println!("node_e2e: no scenario matches the filter; the node is not started");
        return;
    }
    if let Err(why) = NodeEnv::available() {
        println!("node_e2e: SKIPPED ({why})");
        return;
    }
    let started = Instant::now();
    let node = match NodeEnv::start() {
        Ok(node) => node,
        Err(e) => {
            eprintln!("node_e2e: the node did not start: {e:#}");
            std::process::exit(1);
        }
    };
    println!("node_e2e: node and images ready in {:.1?}", node.startup_duration());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut failed = Vec::new();
    let mut ctx = Ctx { node, client: None, vars: BTreeMap::new() };
    for (name, scenario) in selected {
        if !failed.is_empty() {
            println!("test {name} ... skipped (an earlier scenario failed)");
            continue;
        }
        let t = Instant::now();
        match rt.block_on(scenario(&mut ctx)) {
            Ok(()) => println!("test {name} ... ok ({:.1?})", t.elapsed()),
            Err(e) => {
                println!("test {name} ... FAILED ({:.1?})\n{e:#}", t.elapsed());
                dump(&ctx);
                failed.push(*name);
            }
        }
    }
    drop(rt);
    let mut node = ctx.node;
    let down = node.down();
    println!("node_e2e: {:.1?} in all (node up, scenarios, node down)", started.elapsed());
    if let Err(e) = down {
        println!("node_e2e: teardown: {e:#}");
        std::process::exit(1);
    }
    if !failed.is_empty() {
        println!("node_e2e: failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

struct Ctx {
    node: NodeEnv,
    client: Option<kube::Client>,
    /// Values scenarios hand to later ones (e.g. tokens).
    vars: BTreeMap<&'static str, String>,
}

impl Ctx {
    async fn client(&mut self) -> anyhow::Result<kube::Client> {
        if self.client.is_none() {
            self.client = Some(self.node.client().await?);
        }
        Ok(self.client.clone().expect("set above"))
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.node.kubectl();
        cmd.args(args);
        run(&mut cmd, &format!("kubectl {}", args.join(" ")))
    }

    /// kubectl apply -f - with the given manifest text.
    fn apply(&self, ns: &str, manifest: &str) -> anyhow::Result<String> {
        let mut cmd = self.node.kubectl();
        cmd.args(["-n", ns, "apply", "-f", "-"]);
        pipe(cmd, manifest, "kubectl apply")
    }

    fn jsonpath(&self, ns: &str, what: &str, path: &str) -> anyhow::Result<String> {
        let mut args = vec!["-n", ns, "get"];
        args.extend(what.split_whitespace());
        let path = format!("jsonpath={path}");
        args.extend(["-o", &path]);
        self.kubectl(&args)
    }

    fn get_json(&self, ns: &str, what: &str) -> anyhow::Result<serde_json::Value> {
        let mut args = vec!["-n", ns, "get"];
        args.extend(what.split_whitespace());
        args.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&args)?)?)
    }
}

fn pipe(mut cmd: Command, input: &str, what: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What went wrong, from the cluster's point of view.
fn dump(ctx: &Ctx) {
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "authrealms", "-A"][..],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
    ] {
        let mut cmd = ctx.node.kubectl();
        cmd.args(args);
        if let Ok(out) = cmd.output() {
            println!(
                "--- kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("--- node logs in {}", ctx.node.log_dir().display());
}

/// Polls `check` until it returns `Ok(Some(v))`, for at most `timeout`; the last error or the
/// description is in the failure.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP from the host to a ClusterIP (the host routes 10.97.0.0/16 into the node's namespace).

struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<Response> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: login-app\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), io).await.context("HTTP timeout")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").with_context(|| format!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {head:?}"))?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_owned() };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn login(addr: SocketAddr) -> anyhow::Result<String> {
    let body = format!(r#"{{"username":"{USER}","password":"{PASSWORD}"}}"#);
    let resp = http(addr, "POST", "/login", None, Some(&body)).await?;
    ensure!(resp.status == 200, "POST /login: {} {}", resp.status, resp.body);
    Ok(resp.json()?["access_token"].as_str().context("no access_token in the login answer")?.to_owned())
}

fn jwt_header(token: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let head = token.split('.').next().context("not a JWT")?;
    Ok(serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head)?)?)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// `helm install` of charts/authrealm with the local images: two operator pods Running and
/// Ready, exactly one Lease holder among them, and the webhook served through the chart's Service
/// (the webhook configuration names a Service, and a pod labelled for a missing realm is refused
/// by the operator — only the webhook can say that).
async fn chart_installs(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (op_repo, op_tag) = OPERATOR_IMAGE.rsplit_once(':').expect("tagged");
    let (sc_repo, sc_tag) = SIDECAR_IMAGE.rsplit_once(':').expect("tagged");
    let mut helm = ctx.node.helm();
    helm.current_dir(node_env::repo_root()).args([
        "install",
        RELEASE,
        "charts/authrealm",
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
    ]);
    for set in [
        format!("operator.image.repository={op_repo}"),
        format!("operator.image.tag={op_tag}"),
        "operator.image.pullPolicy=Never".into(),
        format!("sidecar.image.repository={sc_repo}"),
        format!("sidecar.image.tag={sc_tag}"),
        "sidecar.image.pullPolicy=Never".into(),
    ] {
        helm.args(["--set", &set]);
    }
    helm.args(["--wait", "--timeout", "180s"]);
    run(&mut helm, "helm install charts/authrealm")?;

    let selector = "app.kubernetes.io/component=operator";
    let pods = ctx.get_json(SYSTEM_NS, &format!("pods -l {selector}"))?;
    let pods = pods["items"].as_array().context("items")?.clone();
    ensure!(pods.len() == 2, "expected 2 operator pods, got {}", pods.len());
    let mut names = Vec::new();
    for p in &pods {
        let name = p["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        ensure!(p["status"]["phase"] == "Running", "{name} is {}", p["status"]["phase"]);
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ensure!(ready, "{name} is not Ready");
        let image = p["spec"]["containers"][0]["image"].as_str().unwrap_or_default();
        ensure!(image == OPERATOR_IMAGE, "{name} runs {image}");
        names.push(name);
    }

    let client = ctx.client().await?;
    let leases: Api<Lease> = Api::namespaced(client, SYSTEM_NS);
    let holder = wait_for("an operator pod holding the leader Lease", Duration::from_secs(60), || {
        let leases = leases.clone();
        let names = names.clone();
        async move {
            let holders: Vec<String> = leases
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter_map(|l| l.spec.and_then(|s| s.holder_identity))
                .filter(|h| names.contains(h))
                .collect();
            ensure!(holders.len() <= 1, "more than one leader: {holders:?}");
            Ok(holders.into_iter().next())
        }
    })
    .await?;
    ctx.vars.insert("leader", holder);

    let webhooks = ctx.kubectl(&["get", "mutatingwebhookconfigurations", "-o", "json"])?;
    let webhooks: serde_json::Value = serde_json::from_str(&webhooks)?;
    let hooks: Vec<&serde_json::Value> = webhooks["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["webhooks"].as_array().into_iter().flatten())
        .collect();
    ensure!(!hooks.is_empty(), "no mutating webhook registered");
    for h in &hooks {
        ensure!(h["clientConfig"]["url"].is_null(), "webhook {} uses a URL, not the Service", h["name"]);
        ensure!(
            h["clientConfig"]["service"]["namespace"] == SYSTEM_NS,
            "webhook {} service: {}",
            h["name"],
            h["clientConfig"]["service"]
        );
    }

    // A pod labelled for a realm that does not exist: only the operator's webhook can refuse it.
    ctx.kubectl(&["create", "namespace", "no-realm"])?;
    let mut cmd = ctx.node.kubectl();
    cmd.args([
        "-n",
        "no-realm",
        "run",
        "probe",
        "--image",
        LOGIN_APP_IMAGE,
        "--labels",
        "authrealm.dev/realm=missing",
        "--dry-run=server",
        "-o",
        "name",
    ]);
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a pod for a missing realm was admitted");
    ensure!(
        stderr.contains("denied the request") && stderr.contains("missing"),
        "not refused by the webhook: {stderr}"
    );
    Ok(())
}

fn redis_image() -> anyhow::Result<String> {
    let out = Command::new("redis-server").arg("--version").output().context("redis-server --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix("v=")).context("redis version")?;
    Ok(format!("localhost/authrealm/redis:{v}"))
}

fn manifest(path: &str, replace: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut text = std::fs::read_to_string(node_env::repo_root().join(path)).with_context(|| format!("read {path}"))?;
    for (from, to) in replace {
        ensure!(text.contains(from), "{path} no longer contains {from}");
        text = text.replace(from, to);
    }
    Ok(text)
}

/// Redis Cluster as pods from hack/kind/redis-cluster.yaml (only the image replaced), in a
/// namespace that enforces the restricted Pod Security Standard; the cluster has 3 masters each
/// with a replica; hack/kind/demo-realm.yaml → Ready.
async fn redis_and_realm(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.kubectl(&["create", "namespace", DEMO_NS])?;
    ctx.kubectl(&[
        "label",
        "namespace",
        DEMO_NS,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ])?;
    ctx.kubectl(&[
        "-n",
        DEMO_NS,
        "create",
        "secret",
        "generic",
        "redis-auth",
        "--from-literal=password=node-e2e-redis-password",
    ])?;
    ctx.kubectl(&["-n", DEMO_NS, "label", "secret", "redis-auth", "authrealm.dev/redis-credentials=true"])?;
    let image = redis_image()?;
    ctx.apply(DEMO_NS, &manifest("hack/kind/redis-cluster.yaml", &[("docker.io/library/redis:7.2", &image)])?)?;
    ctx.kubectl(&["-n", DEMO_NS, "rollout", "status", "statefulset/redis-cluster", "--timeout=180s"])?;
    ctx.kubectl(&["-n", DEMO_NS, "wait", "--for=condition=complete", "job/redis-cluster-create", "--timeout=180s"])?;

    // Once the Job completed, every master has a replica (the Job used to check cluster_state:ok only).
    let nodes =
        ctx.kubectl(&["-n", DEMO_NS, "exec", "redis-cluster-0", "-c", "redis", "--", "redis-cli", "cluster", "nodes"])?;
    let masters = nodes.lines().filter(|l| l.contains("master") && !l.contains("fail")).count();
    let replicas = nodes.lines().filter(|l| l.contains("slave")).count();
    ensure!(masters == 3 && replicas == 3, "expected 3 masters + 3 replicas:\n{nodes}");

    ctx.apply(DEMO_NS, &manifest("hack/kind/demo-realm.yaml", &[])?)?;
    ctx.kubectl(&["-n", DEMO_NS, "wait", "--for=condition=Ready", "authrealm/demo", "--timeout=120s"])?;
    let table = ctx.kubectl(&["-n", DEMO_NS, "get", "authrealm", "demo"])?;
    ensure!(!table.contains("<invalid>"), "kubectl get authrealm shows <invalid>:\n{table}");
    Ok(())
}

/// hack/kind/login-app.yaml (image replaced by the local login-app image) in the restricted
/// namespace: the pod gets the sidecar as a native sidecar (init container, restartPolicy Always)
/// and comes up 2/2; the Service's endpoint is never ready while the sidecar is not.
async fn login_app_pod(ctx: &mut Ctx) -> anyhow::Result<()> {
    let root = node_env::repo_root();
    let mut cm = ctx.node.kubectl();
    cm.args(["-n", DEMO_NS, "create", "configmap", "login-app"])
        .arg(format!("--from-file=app.py={}", root.join("examples/login-app/app.py").display()))
        .arg(format!("--from-file=users.json={}", root.join("examples/login-app/users.json").display()));
    run(&mut cm, "kubectl create configmap login-app")?;
    ctx.apply(
        DEMO_NS,
        &manifest("hack/kind/login-app.yaml", &[("docker.io/library/python:3.12-slim", LOGIN_APP_IMAGE)])?,
    )?;

    // Watch the endpoint and the sidecar's readiness together until the endpoint is ready.
    let slices = "endpointslices -l kubernetes.io/service-name=login-app";
    let started = Instant::now();
    let mut saw_unready_sidecar = false;
    loop {
        ensure!(started.elapsed() < Duration::from_secs(120), "the login-app endpoint never became ready");
        let slice = ctx.get_json(DEMO_NS, slices)?;
        let ready_endpoint = slice["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .any(|e| e["conditions"]["ready"] == true);
        let pods = ctx.get_json(DEMO_NS, "pods -l app.kubernetes.io/name=login-app")?;
        let sidecar_ready = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["status"]["initContainerStatuses"].as_array().into_iter().flatten())
            .any(|s| s["name"] == "authrealm-sidecar" && s["ready"] == true);
        if !sidecar_ready && !pods["items"].as_array().is_none_or(|i| i.is_empty()) {
            saw_unready_sidecar = true;
        }
        if ready_endpoint {
            // The slice was read first: the sidecar was ready before it, and stays so.
            ensure!(sidecar_ready, "the Service had a ready endpoint while the sidecar was not ready");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "login-app endpoint ready after {:.1?} (sidecar seen unready first: {saw_unready_sidecar})",
        started.elapsed()
    );
    ctx.kubectl(&["-n", DEMO_NS, "rollout", "status", "deployment/login-app", "--timeout=60s"])?;

    let pods = ctx.get_json(DEMO_NS, "pods -l app.kubernetes.io/name=login-app")?;
    let items = pods["items"].as_array().context("items")?;
    ensure!(items.len() == 1, "expected one login-app pod, got {}", items.len());
    let pod = &items[0];
    let init = pod["spec"]["initContainers"].as_array().context("no init containers: the sidecar was not injected")?;
    let sidecar =
        init.iter().find(|c| c["name"] == "authrealm-sidecar").context("no authrealm-sidecar init container")?;
    ensure!(sidecar["restartPolicy"] == "Always", "the sidecar is not a native sidecar: {}", sidecar["restartPolicy"]);
    ensure!(sidecar["image"] == SIDECAR_IMAGE, "sidecar image {}", sidecar["image"]);
    ensure!(!sidecar["readinessProbe"].is_null(), "the sidecar has no readiness probe");
    let statuses: Vec<&serde_json::Value> = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            pod["status"]["initContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["name"] == "authrealm-sidecar"),
        )
        .collect();
    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
    ensure!(statuses.len() == 2 && ready == 2, "pod is {ready}/{}: {statuses:?}", statuses.len());
    ctx.vars.insert("login_pod", pod["metadata"]["name"].as_str().unwrap_or_default().to_owned());
    let ip = ctx.jsonpath(DEMO_NS, "service/login-app", "{.spec.clusterIP}")?;
    ctx.vars.insert("service", format!("{ip}:80"));
    Ok(())
}

fn service(ctx: &Ctx) -> anyhow::Result<SocketAddr> {
    ctx.vars.get("service").context("login app Service not set up")?.parse().context("service address")
}

/// Through the login app's Service from the host: no token → 401; log in → token; /me → 200
/// with the identity; a second login (single mode) → the first token 401; log out → 401.
async fn login_flow(ctx: &mut Ctx) -> anyhow::Result<()> {
    let addr = service(ctx)?;
    let anon = http(addr, "GET", "/me", None, None).await?;
    ensure!(anon.status == 401, "GET /me without a token: {} {}", anon.status, anon.body);

    let first = login(addr).await?;
    let me = http(addr, "GET", "/me", Some(&first), None).await?;
    ensure!(me.status == 200, "GET /me with the token: {} {}", me.status, me.body);
    let identity = me.json()?;
    ensure!(me.body.contains(USER), "the app did not get the identity: {identity}");

    let second = login(addr).await?;
    let old = http(addr, "GET", "/me", Some(&first), None).await?;
    ensure!(old.status == 401, "single session mode: the first token after a second login: {}", old.status);
    let new = http(addr, "GET", "/me", Some(&second), None).await?;
    ensure!(new.status == 200, "the second token: {} {}", new.status, new.body);

    let out = http(addr, "POST", "/logout", Some(&second), Some("")).await?;
    ensure!(out.status == 200, "POST /logout: {} {}", out.status, out.body);
    let after = http(addr, "GET", "/me", Some(&second), None).await?;
    ensure!(after.status == 401, "the token after logout: {}", after.status);
    ctx.vars.insert("revoked_token", second);
    ctx.vars.insert("superseded_token", first);
    Ok(())
}

/// A pod without the realm label is admitted unchanged in the realm's namespace; a labelled pod
/// in a namespace labelled authrealm.dev/injection=disabled is admitted unchanged too.
async fn untouched(ctx: &mut Ctx) -> anyhow::Result<()> {
    let pod = |name: &str, labels: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","labels":{{{labels}}}}},
"spec":{{"securityContext":{{"runAsNonRoot":true,"runAsUser":65532,"seccompProfile":{{"type":"RuntimeDefault"}}}},
"containers":[{{"name":"app","image":"{LOGIN_APP_IMAGE}","command":["python3","-c","import time; time.sleep(3600)"],
"securityContext":{{"allowPrivilegeEscalation":false,"capabilities":{{"drop":["ALL"]}}}}}}]}}}}"#
        )
    };
    ctx.apply(DEMO_NS, &pod("plain", r#""app":"plain""#))?;
    ctx.kubectl(&["create", "namespace", OPTED_OUT_NS])?;
    ctx.kubectl(&["label", "namespace", OPTED_OUT_NS, "authrealm.dev/injection=disabled"])?;
    ctx.apply(OPTED_OUT_NS, &pod("labelled", r#""authrealm.dev/realm":"demo""#))?;
    for (ns, name) in [(DEMO_NS, "plain"), (OPTED_OUT_NS, "labelled")] {
        ctx.kubectl(&["-n", ns, "wait", "--for=condition=Ready", &format!("pod/{name}"), "--timeout=60s"])?;
        let p = ctx.get_json(ns, &format!("pod/{name}"))?;
        ensure!(
            p["spec"]["initContainers"].is_null(),
            "{ns}/{name} got init containers: {}",
            p["spec"]["initContainers"]
        );
        ensure!(p["spec"]["containers"].as_array().map(Vec::len) == Some(1), "{ns}/{name} containers changed");
        ensure!(
            p["spec"]["volumes"]
                .as_array()
                .is_none_or(|v| v.iter().all(|v| v["name"].as_str().is_some_and(|n| n.starts_with("kube-api-access")))),
            "{ns}/{name} got volumes"
        );
        let annotations =
            p["metadata"]["annotations"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        ensure!(!annotations.iter().any(|k| k.starts_with("authrealm.dev/")), "{ns}/{name} annotated: {annotations:?}");
    }
    Ok(())
}

/// A pod spec of the realm that passes the restricted Pod Security Standard (the sidecar the
/// webhook adds is restricted-compliant itself).
fn realm_pod(name: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","labels":{{"authrealm.dev/realm":"demo"}}}},
"spec":{{"securityContext":{{"runAsNonRoot":true,"runAsUser":65532,"seccompProfile":{{"type":"RuntimeDefault"}}}},
"containers":[{{"name":"app","image":"{LOGIN_APP_IMAGE}","ports":[{{"containerPort":8080}}],
"securityContext":{{"allowPrivilegeEscalation":false,"capabilities":{{"drop":["ALL"]}}}}}}]}}}}"#
    )
}

fn realm_ready(ctx: &Ctx) -> anyhow::Result<(String, String)> {
    let realm = ctx.get_json(DEMO_NS, "authrealm/demo")?;
    let c = realm["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .context("no Ready condition")?;
    Ok((
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["lastTransitionTime"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// The leader operator pod deleted: every admission meanwhile is served (by the other replica)
/// and injects the sidecar, the Lease moves to another pod, the Deployment is back to 2 Ready,
/// and the realm's Ready condition never changes.
async fn operator_pod_deleted(ctx: &mut Ctx) -> anyhow::Result<()> {
    let leader = ctx.vars.get("leader").context("no leader recorded")?.clone();
    let ready_before = realm_ready(ctx)?;
    ensure!(ready_before.0 == "True", "realm not Ready before: {ready_before:?}");
    ctx.kubectl(&["-n", SYSTEM_NS, "delete", "pod", &leader, "--wait=false"])?;
    let leases: Api<Lease> = Api::namespaced(ctx.client().await?, SYSTEM_NS);
    let started = Instant::now();
    let mut admissions = 0;
    let mut new_leader = None;
    loop {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "no takeover within 120 s (leader {leader}, now {new_leader:?})"
        );
        let mut create = ctx.node.kubectl();
        create.args(["-n", DEMO_NS, "create", "--dry-run=server", "-o", "json", "-f", "-"]);
        let admitted: serde_json::Value = serde_json::from_str(&pipe(
            create,
            &realm_pod(&format!("probe-{admissions}")),
            "admission during the takeover",
        )?)?;
        let injected = admitted["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "authrealm-sidecar");
        ensure!(injected, "admission {admissions} during the takeover did not inject the sidecar");
        admissions += 1;
        let (status, since) = realm_ready(ctx)?;
        ensure!(
            status == "True" && since == ready_before.1,
            "the realm flapped: Ready {status} since {since}, was {ready_before:?}"
        );
        if new_leader.is_none() {
            let holder = leases
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter_map(|l| l.spec.and_then(|s| s.holder_identity))
                .find(|h| h.starts_with(RELEASE));
            new_leader = holder.filter(|h| *h != leader);
        }
        let ready = ctx.jsonpath(SYSTEM_NS, "deployment/authrealm-operator", "{.status.readyReplicas}")?;
        if new_leader.is_some() && ready == "2" && admissions >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new_leader = new_leader.expect("checked");
    let pods = ctx.jsonpath(SYSTEM_NS, "pods -l app.kubernetes.io/component=operator", "{.items[*].metadata.name}")?;
    ensure!(
        pods.split_whitespace().any(|p| p == new_leader),
        "the new leader {new_leader} is not a running operator pod ({pods})"
    );
    eprintln!(
        "leadership {leader} → {new_leader} in {:.1?}, {admissions} admissions served meanwhile",
        started.elapsed()
    );
    ctx.vars.insert("leader", new_leader);
    Ok(())
}

fn jwt_claims(token: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    Ok(serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?)
}

/// A Redis master pod deleted (the one holding the revoked token's record when it can be found):
/// the revoked token is never accepted, before, during or after the failover, and the app answers
/// again (a valid token → 200, a new login works) once a replica took over.
async fn redis_master_deleted(ctx: &mut Ctx) -> anyhow::Result<()> {
    let addr = service(ctx)?;
    let revoked = login(addr).await?;
    let out = http(addr, "POST", "/logout", Some(&revoked), Some("")).await?;
    ensure!(out.status == 200, "logout: {}", out.status);
    let valid = login(addr).await?;
    // Session records live in the subject's hash slot: {realm:base64url(subject)}.
    let subject = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jwt_claims(&revoked)?["sub"].as_str().context("sub")?)
    };

    let mut victim = None;
    let mut first_master = None;
    for i in 0..6 {
        let pod = format!("redis-cluster-{i}");
        let role = ctx.kubectl(&["-n", DEMO_NS, "exec", &pod, "-c", "redis", "--", "redis-cli", "role"])?;
        if role.lines().next() != Some("master") {
            continue;
        }
        first_master.get_or_insert(pod.clone());
        let keys = ctx.kubectl(&["-n", DEMO_NS, "exec", &pod, "-c", "redis", "--", "redis-cli", "--scan"])?;
        if keys.contains(&subject) {
            victim = Some(pod);
        }
    }
    let found = victim.is_some();
    let victim = victim.or(first_master).context("no master found")?;
    eprintln!("deleting Redis master {victim} (holds the user's session records: {found})");
    ctx.kubectl(&["-n", DEMO_NS, "delete", "pod", &victim, "--wait=false"])?;
    let witness = if victim == "redis-cluster-0" { "redis-cluster-1" } else { "redis-cluster-0" }.to_owned();

    let started = Instant::now();
    let mut outage = Duration::ZERO;
    let mut last = String::new();
    loop {
        ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the app did not answer again within 90 s of the failover: {last}"
        );
        let r = http(addr, "GET", "/me", Some(&revoked), None).await?;
        ensure!(r.status != 200, "the revoked token was accepted during the failover");
        // Past the outage once every master has a replica again (the deleted pod rejoined as
        // one; a mint waits for a replica of each master it writes to, and its jti locator lands
        // on any slot) and a fresh token works. (A login whose mint reached a master but no
        // replica still supersedes the earlier tokens, single session mode.)
        let nodes =
            ctx.kubectl(&["-n", DEMO_NS, "exec", &witness, "-c", "redis", "--", "redis-cli", "cluster", "nodes"])?;
        if !every_master_has_a_replica(&nodes) {
            last = format!("not every master has a replica yet:\n{nodes}");
        } else {
            match login(addr).await {
                Ok(t) => {
                    let me = http(addr, "GET", "/me", Some(&t), None).await?;
                    if me.status == 200 {
                        break;
                    }
                    last = format!("a fresh token: {} {}", me.status, me.body);
                }
                Err(e) => last = format!("login: {e:#}"),
            }
        }
        outage = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = http(addr, "GET", "/me", Some(&revoked), None).await?;
    ensure!(r.status == 401, "the revoked token after the failover: {}", r.status);
    let old = http(addr, "GET", "/me", Some(&valid), None).await?;
    ensure!(old.status == 401, "the token superseded by the logins since: {}", old.status);
    // Every login works again (each lands its jti locator on a random slot).
    for i in 0..6 {
        let fresh = login(addr).await.with_context(|| format!("login {i} after the failover"))?;
        let me = http(addr, "GET", "/me", Some(&fresh), None).await?;
        ensure!(me.status == 200, "a new token after the failover: {}", me.status);
    }
    eprintln!("failover: logins worked again after {outage:.1?}");
    Ok(())
}

/// `CLUSTER NODES` output: every master that serves slots has a connected replica.
fn every_master_has_a_replica(nodes: &str) -> bool {
    let rows: Vec<Vec<&str>> =
        nodes.lines().map(|l| l.split_whitespace().collect()).filter(|f: &Vec<&str>| f.len() >= 8).collect();
    let masters: Vec<&str> = rows
        .iter()
        .filter(|f| f[2].contains("master") && !f[2].contains("fail") && f.len() >= 9)
        .map(|f| f[0])
        .collect();
    masters.len() == 3
        && masters.iter().all(|m| {
            rows.iter().any(|f| f[2].contains("slave") && !f[2].contains("fail") && f[3] == *m && f[7] == "connected")
        })
}

/// Key rotation while the pods run: the realm's interval shortened, a new kid appears in newly
/// minted tokens — the running sidecar read the updated mounted Secret — and those tokens are
/// accepted, with no container restart in the pod.
async fn key_rotation_hot_reload(ctx: &mut Ctx) -> anyhow::Result<()> {
    let addr = service(ctx)?;
    let pod = ctx.vars.get("login_pod").context("no login pod")?.clone();
    let restarts = |ctx: &Ctx| {
        ctx.jsonpath(
            DEMO_NS,
            &format!("pod/{pod}"),
            "{.status.initContainerStatuses[*].restartCount} {.status.containerStatuses[*].restartCount}",
        )
    };
    let before_restarts = restarts(ctx)?;
    let before = login(addr).await?;
    let kid_before = jwt_header(&before)?["kid"].as_str().context("no kid")?.to_owned();
    // A second subject's token, minted before the rotation through the sidecar's loopback issuer
    // API from inside the pod (the login app has one user, and in single mode every login of
    // alice ends her previous token): it must keep working after the rotation, until its key
    // retires.
    const MINT_BOB: &str = "import json,os,urllib.request\n\
        u=os.environ.get('LOGIN_APP_ISSUER_URL','http://127.0.0.1:8444').rstrip('/')+'/v1/tokens'\n\
        r=urllib.request.Request(u,data=json.dumps({'subject':'bob'}).encode(),\
        headers={'content-type':'application/json'},method='POST')\n\
        print(json.load(urllib.request.urlopen(r,timeout=10))['access_token'])\n";
    let bob = ctx.kubectl(&["-n", DEMO_NS, "exec", &pod, "-c", "app", "--", "python3", "-c", MINT_BOB])?;
    let bob = bob.trim().to_owned();
    ensure!(jwt_header(&bob)?["kid"] == kid_before.as_str(), "bob's token is signed with the current key");
    let me = http(addr, "GET", "/me", Some(&bob), None).await?;
    ensure!(me.status == 200, "bob's token before the rotation: {} {}", me.status, me.body);
    ctx.kubectl(&[
        "-n",
        DEMO_NS,
        "patch",
        "authrealm",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"tokenTtl":"20s","keyRotation":{"interval":"30s","propagationDelay":"10s"}}}"#,
    ])?;
    let started = Instant::now();
    let new = wait_for("a token signed with a new key", Duration::from_secs(180), || async {
        let t = login(addr).await?;
        let kid = jwt_header(&t)?["kid"].as_str().unwrap_or_default().to_owned();
        Ok((kid != kid_before).then_some((t, kid)))
    })
    .await?;
    eprintln!("new kid {} after {:.1?}", new.1, started.elapsed());
    let me = http(addr, "GET", "/me", Some(&new.0), None).await?;
    ensure!(me.status == 200, "the token with the new kid: {} {}", me.status, me.body);
    let me = http(addr, "GET", "/me", Some(&bob), None).await?;
    ensure!(me.status == 200, "a token minted before the rotation, its key now retired: {} {}", me.status, me.body);
    let pods = ctx.jsonpath(DEMO_NS, "pods -l app.kubernetes.io/name=login-app", "{.items[*].metadata.name}")?;
    ensure!(pods == pod, "the login pod was replaced: {pods} (was {pod})");
    ensure!(restarts(ctx)? == before_restarts, "containers restarted: {} (was {before_restarts})", restarts(ctx)?);
    ctx.kubectl(&[
        "-n",
        DEMO_NS,
        "patch",
        "authrealm",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"tokenTtl":"15m","keyRotation":{"interval":"24h","propagationDelay":"2m"}}}"#,
    ])?;
    Ok(())
}

/// `hack/up.sh --kubeconfig … --images local --exit`, the README's first command aimed at an
/// existing cluster (this node, as a user's kind or other cluster would be): run once while the
/// chart, Redis and the login app from the scenarios above are there (it reuses them, tells the
/// story through a port-forward, and leaves them alone), then once more on a cluster without them
/// (it installs everything, tells the story, and removes exactly what it created).
async fn up_sh_existing_cluster(ctx: &mut Ctx) -> anyhow::Result<()> {
    let up = |ctx: &Ctx, what: &str| -> anyhow::Result<String> {
        let started = Instant::now();
        let out = ctx.node.up_sh_existing(&["--exit"]).output().context("run hack/up.sh")?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "hack/up.sh ({what}) failed: {}\n{stdout}\n{stderr}", out.status);
        let story: Vec<&str> = stdout.lines().filter(|l| l.ends_with("(ok)") || l.contains("UNEXPECTED")).collect();
        ensure!(
            story.len() == 7 && story.iter().all(|l| l.ends_with("(ok)")),
            "hack/up.sh ({what}) story:\n{stdout}\n{stderr}"
        );
        ensure!(stderr.contains("through a port-forward"), "hack/up.sh ({what}) did not use a port-forward:\n{stderr}");
        eprintln!("hack/up.sh ({what}): {:.1?}", started.elapsed());
        Ok(stderr.into_owned())
    };
    let present = |ctx: &Ctx| -> anyhow::Result<(bool, bool, bool)> {
        let namespaces = ctx.kubectl(&["get", "namespaces", "-o", "name"])?;
        let mut helm = ctx.node.helm();
        helm.args(["list", "-A", "-q"]);
        let releases = run(&mut helm, "helm list")?;
        Ok((
            namespaces.lines().any(|l| l == format!("namespace/{DEMO_NS}")),
            namespaces.lines().any(|l| l == format!("namespace/{SYSTEM_NS}")),
            releases.lines().any(|l| l == RELEASE),
        ))
    };
    let forwarders = || -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
        dir.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains("port-forward\0service/login-app"))
            .count()
    };

    // 1. Everything already there: reused, and left in place.
    let stderr = up(ctx, "on the running system")?;
    ensure!(stderr.contains("it stays when this run ends"), "the existing release was not recognised:\n{stderr}");
    ensure!(present(ctx)? == (true, true, true), "a run that created nothing removed something: {:?}", present(ctx)?);
    ensure!(forwarders() == 0, "a kubectl port-forward outlived hack/up.sh");

    // 2. A cluster without authrealm: installed, story, then exactly that removed again.
    ctx.kubectl(&["delete", "namespace", DEMO_NS, OPTED_OUT_NS, "--wait", "--timeout=180s"])?;
    let mut helm = ctx.node.helm();
    helm.args(["uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout", "180s"]);
    run(&mut helm, "helm uninstall")?;
    ctx.kubectl(&["delete", "namespace", SYSTEM_NS, "--wait", "--timeout=180s"])?;
    let stderr = up(ctx, "on a cluster without authrealm")?;
    ensure!(stderr.contains("removing what this run created"), "no cleanup announced:\n{stderr}");
    ensure!(present(ctx)? == (false, false, false), "left behind (demo ns, system ns, release): {:?}", present(ctx)?);
    let hooks = ctx.kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"])?;
    ensure!(hooks.trim().is_empty(), "webhook configurations left behind: {hooks}");
    ensure!(forwarders() == 0, "a kubectl port-forward outlived hack/up.sh");
    Ok(())
}
