//! Helpers shared by the operator's integration tests: a real etcd + kube-apiserver
//! (`authrealm_tests::kube_env`) with the AuthRealm CRD installed, the operator run in-process
//! or as its real binary, and polling helpers.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use authrealm_contract::KeySet;
use authrealm_operator::controller::{self, Settings};
use authrealm_operator::crd::AuthRealm;
use authrealm_operator::metrics::Metrics;
use authrealm_operator::render;
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio::sync::{Mutex, oneshot};

/// Installs the aws-lc-rs provider once (the operator binary does this in `main`).
pub fn crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// One environment per test binary, shared by its tests while any of them runs (each test
/// works in its own namespace). Dropped — processes killed — when the last test lets go.
pub async fn shared_env(controller_manager: bool) -> anyhow::Result<Arc<KubeEnv>> {
    static SHARED: Mutex<Option<Weak<KubeEnv>>> = Mutex::const_new(None);
    crypto();
    let mut guard = SHARED.lock().await;
    if let Some(env) = guard.as_ref().and_then(Weak::upgrade) {
        return Ok(env);
    }
    let env = Arc::new(KubeEnv::start(KubeEnvOptions { controller_manager, ..KubeEnvOptions::default() }).await?);
    eprintln!("kube env up in {:.1?}", env.startup_duration());
    install_crd(&env.client().await?).await?;
    *guard = Some(Arc::downgrade(&env));
    Ok(env)
}

#[allow(unused_imports)] // each test binary uses some of them
pub use authrealm_tests::support::{free_port, install_crd, unix_now, wait_for_some as wait_for};

pub fn unix_now_f() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The controller running on a task of the test's runtime, watching one namespace.
pub struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), controller::Error>>>,
    pub metrics: Metrics,
}

impl InProcess {
    pub fn start(client: Client, namespace: &str) -> InProcess {
        Self::start_with(client, Settings { namespace: Some(namespace.to_owned()), ..Settings::default() })
    }

    pub fn start_with(client: Client, settings: Settings) -> InProcess {
        let (tx, rx) = oneshot::channel::<()>();
        let metrics = Metrics::new();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            controller::run(client, settings, m, async move {
                let _ = rx.await;
            })
            .await
        });
        InProcess { stop: Some(tx), task: Some(task), metrics }
    }

    /// Stops the controller (in-flight reconciles finish) and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await.context("controller did not stop")???;
        }
        Ok(())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The operator binary, started with `args` against `env`, its stderr in `log`.
pub struct OperatorProcess {
    pub child: Child,
    pub http_port: u16,
    pub log: std::path::PathBuf,
}

impl OperatorProcess {
    pub fn spawn(env: &KubeEnv, log_name: &str, args: &[&str]) -> anyhow::Result<OperatorProcess> {
        let http_port = free_port();
        let log = env.dir().join(format!("{log_name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        // AUTHREALM_OPERATOR_BIN: another build of the operator (e.g. to show a test fails on it).
        let bin = std::env::var_os("AUTHREALM_OPERATOR_BIN")
            .filter(|v| !v.is_empty())
            .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_authrealm-operator")), Into::into);
        let child = Command::new(bin)
            .args(args)
            .arg(format!("--http-addr=127.0.0.1:{http_port}"))
            .env("KUBECONFIG", env.kubeconfig_path())
            .env("RUST_LOG", "info,kube_runtime=warn,authrealm_operator=debug")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning the operator binary")?;
        Ok(OperatorProcess { child, http_port, log })
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET a path of the operator's HTTP endpoint.
    pub async fn get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.ok()?.ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_owned())
    }

    /// A metric's value from `/metrics` (first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").await?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reconciles that have finished (the duration histogram's count: observed when a reconcile
/// ends, after its writes) — evidence that a reconcile ran, unlike `reconciles_total`, which
/// counts them as they start.
pub fn finished_reconciles(m: &Metrics) -> u64 {
    m.encode()
        .lines()
        .find_map(|l| l.strip_prefix("authrealm_operator_reconcile_duration_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An AuthRealm object from a spec given as JSON.
pub fn realm(name: &str, spec: serde_json::Value) -> AuthRealm {
    serde_json::from_value(json!({
        "apiVersion": "authrealm.dev/v1alpha1",
        "kind": "AuthRealm",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("AuthRealm from JSON")
}

/// A stateless realm spec (no Redis needed).
pub fn stateless_spec() -> serde_json::Value {
    json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "sessionMode": "stateless",
    })
}

/// A Redis password Secret `name` (key `password`) carrying the label the operator requires
/// before it uses a Secret for a Redis connection.
pub async fn create_redis_secret(client: &Client, ns: &str, name: &str, password: &str) -> anyhow::Result<Secret> {
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            labels: Some([("authrealm.dev/redis-credentials".to_owned(), "true".to_owned())].into()),
            ..Default::default()
        },
        string_data: Some([("password".to_owned(), password.to_owned())].into()),
        ..Secret::default()
    };
    Ok(Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await?)
}

pub async fn create_realm(client: &Client, ns: &str, realm: &AuthRealm) -> anyhow::Result<AuthRealm> {
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), ns);
    Ok(api.create(&PostParams::default(), realm).await?)
}

/// The realm once its `type` condition has `status` (and optionally `reason`).
pub async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<AuthRealm> {
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), ns);
    let what = format!("{ns}/{name} {type_}={status} {reason:?}");
    let r = wait_for(&what, timeout, || {
        let api = api.clone();
        async move {
            let r = api.get(name).await.ok()?;
            let c = r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
            (c.status == status && reason.is_none_or(|want| c.reason == want)).then_some(r)
        }
    })
    .await;
    if r.is_err()
        && let Ok(r) = api.get(name).await
    {
        eprintln!("last status of {ns}/{name}: {:#?}", r.status);
    }
    r
}

/// The full key set in the realm's Secret.
pub async fn secret_keyset(client: &Client, ns: &str, realm: &str) -> Option<KeySet> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(&render::signing_keys_name(realm)).await.ok()??;
    KeySet::from_json(&s.data?.get(render::KEYSET_KEY)?.0).ok()
}

/// The public key set in the realm's JWKS ConfigMap.
pub async fn jwks_keyset(client: &Client, ns: &str, realm: &str) -> Option<KeySet> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api.get_opt(&render::jwks_name(realm)).await.ok()??;
    KeySet::from_json(cm.data?.get(render::KEYSET_KEY)?.as_bytes()).ok()
}

/// Events about a realm: (reason, note).
pub async fn events(client: &Client, ns: &str, realm: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<Event> = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(realm))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// A tiny xorshift PRNG for reproducible "random" test schedules.
pub struct Rng(u64);

impl Rng {
    pub fn from_time() -> (Rng, u64) {
        let seed = std::env::var("AUTHREALM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        (Rng(seed), seed)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What a stateless sidecar of the test realms (issuer `https://auth.example.test`, audience
/// `app`, no leeway) requires of a token: the rotation and tamper tests verify tokens with the
/// sidecar's own validation code.
pub fn stateless_policy() -> authrealm_sidecar::token::Policy {
    authrealm_sidecar::token::Policy {
        issuer: "https://auth.example.test".into(),
        audiences: vec!["app".into()],
        algorithms: vec![],
        leeway: 0,
        max_token_bytes: 8192,
        required_claims: vec![],
        session_mode: authrealm_contract::SessionMode::Stateless,
        max_lifetime: 3600,
    }
}
