//! Leadership that cannot overlap, and private keys that are forgotten: real operator
//! processes against a real kube-apiserver whose audit log records every write request with the
//! User-Agent of the replica that sent it (`authrealm-operator/<version> (<identity>)`).
//!
//! The audit log sees what a watch cannot: writes that change nothing (an unchanged server-side
//! apply is a no-op without a watch event) and writes the server rejected.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use authrealm_operator::crd::AuthRealm;
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use tokio::sync::Mutex;

/// Only writes are recorded (metadata level: no bodies, so no key material in the log).
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  - level: None
"#;

/// An API server with an audit log, shared by this binary's tests (each in its own namespace).
struct AuditedEnv {
    env: KubeEnv,
    dir: PathBuf,
}

impl AuditedEnv {
    fn log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Every write request recorded so far.
    fn writes(&self) -> Vec<Write> {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        text.lines().filter_map(Write::parse).collect()
    }
}

impl Drop for AuditedEnv {
    fn drop(&mut self) {
        if std::env::var_os("AUTHREALM_KEEP_KUBE_ENV").is_none_or(|v| v.is_empty()) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn audited_env() -> anyhow::Result<Arc<AuditedEnv>> {
    static SHARED: Mutex<Option<Weak<AuditedEnv>>> = Mutex::const_new(None);
    crypto();
    let mut guard = SHARED.lock().await;
    if let Some(env) = guard.as_ref().and_then(Weak::upgrade) {
        return Ok(env);
    }
    let dir = std::env::temp_dir().join(format!("authrealm-audit-{}-{}", std::process::id(), unix_now_f()));
    let (opts, _log) = KubeEnvOptions::audited(&dir, AUDIT_POLICY)?;
    let env = KubeEnv::start(opts).await?;
    eprintln!("kube env up in {:.1?}; audit log {}", env.startup_duration(), dir.join("audit.log").display());
    install_crd(&env.client().await?).await?;
    let env = Arc::new(AuditedEnv { env, dir });
    *guard = Some(Arc::downgrade(&env));
    Ok(env)
}

/// One write request as the API server's audit log recorded it.
#[derive(Debug, Clone)]
struct Write {
    received: Timestamp,
    user_agent: String,
    verb: String,
    resource: String,
    namespace: String,
    name: String,
    code: i64,
}

impl Write {
    fn parse(line: &str) -> Option<Write> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
        if s("/stage") != "ResponseComplete" {
            return None;
        }
        Some(Write {
            received: s("/requestReceivedTimestamp").parse().ok()?,
            user_agent: s("/userAgent"),
            verb: s("/verb"),
            resource: s("/objectRef/resource"),
            namespace: s("/objectRef/namespace"),
            name: s("/objectRef/name"),
            code: v.pointer("/responseStatus/code").and_then(|c| c.as_i64()).unwrap_or(0),
        })
    }

    fn by(&self, identity: &str) -> bool {
        self.user_agent.ends_with(&format!("({identity})"))
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Write { received, user_agent, verb, resource, namespace, name, code } = self;
        write!(f, "{received} {verb} {resource} {namespace}/{name} -> {code} by {user_agent:?}")
    }
}

fn replica_args<'a>(ns: &'a str, identity: &'a str) -> Vec<&'a str> {
    vec![
        "--namespace",
        ns,
        "--lease-namespace",
        ns,
        "--identity",
        identity,
        "--lease-duration=4s",
        "--renew-deadline=3s",
        "--retry-period=1s",
        "--webhook-enabled=false",
    ]
}

async fn lease_holder(client: &kube::Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt("authrealm-operator").await.ok()??.spec?.holder_identity
}

fn signal(child: &std::process::Child, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill {sig} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_never_writes_after_the_takeover() -> anyhow::Result<()> {
    let audited = audited_env().await?;
    let env = &audited.env;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("fence").await?;
    let (id_a, id_b) = (format!("{ns}-a"), format!("{ns}-b"));
    let mut a = OperatorProcess::spawn(env, "fence-a", &replica_args(&ns, &id_a))?;
    wait_for("replica a leads", Duration::from_secs(30), || {
        let (client, ns, id) = (client.clone(), ns.clone(), id_a.clone());
        async move { (lease_holder(&client, &ns).await? == id).then_some(()) }
    })
    .await?;
    let b = OperatorProcess::spawn(env, "fence-b", &replica_args(&ns, &id_b))?;
    wait_for("replica b serving", Duration::from_secs(30), || b.get("/readyz")).await?;

    // A realm with something due every second or so, so that the leader always has reconciles
    // (and their writes) scheduled.
    let mut spec = stateless_spec();
    spec["keyRotation"] = json!({"interval": "4s", "propagationDelay": "1s"});
    spec["tokenTtl"] = json!("2s");
    create_realm(&client, &ns, &realm("fenced", spec)).await?;
    wait_condition(&client, &ns, "fenced", "Ready", "True", None, Duration::from_secs(30)).await?;
    let secret = "fenced-signing-keys";
    let secret_writes_by = |id: &str| {
        let id = id.to_owned();
        let ns = ns.clone();
        move |w: &Write| w.ok() && w.by(&id) && w.resource == "secrets" && w.namespace == ns && w.name == secret
    };
    wait_for("replica a rotating keys", Duration::from_secs(20), || {
        let n = audited.writes().iter().filter(|w| secret_writes_by(&id_a)(w)).count();
        std::future::ready((n >= 2).then_some(()))
    })
    .await?;
    assert!(a.child.try_wait()?.is_none(), "replica a exited while leading:\n{}", a.log_text());
    assert_eq!(lease_holder(&client, &ns).await.as_deref(), Some(id_a.as_str()));

    // Freeze the leader past its lease: the follower takes over.
    signal(&a.child, "-STOP")?;
    let stopped = Instant::now();
    wait_for("replica b takes over", Duration::from_secs(30), || {
        let (client, ns, id) = (client.clone(), ns.clone(), id_b.clone());
        async move { (lease_holder(&client, &ns).await? == id).then_some(()) }
    })
    .await?;
    eprintln!("replica b took over {:?} after replica a was stopped", stopped.elapsed());
    // The new leader writes the realm's keys Secret (a rotation) while the old one is frozen,
    // with its own reconciles and renewals long overdue.
    wait_for("replica b rotating keys", Duration::from_secs(20), || {
        let n = audited.writes().iter().filter(|w| secret_writes_by(&id_b)(w)).count();
        std::future::ready((n >= 1).then_some(()))
    })
    .await?;

    // Wake the old leader: it must notice its term is over before writing anything, and exit
    // (to restart as a follower).
    signal(&a.child, "-CONT")?;
    let resumed = Instant::now();
    let status =
        wait_for("replica a exits", Duration::from_secs(20), || std::future::ready(a.child.try_wait().ok().flatten()))
            .await
            .with_context(|| format!("replica a is still running after SIGCONT:\n{}", a.log_text()))?;
    eprintln!("replica a exited {:?} after SIGCONT: {status}", resumed.elapsed());
    let log_a = a.log_text();
    assert_eq!(status.code(), Some(1), "{log_a}");
    assert!(log_a.contains("lost the leader lease"), "{log_a}");

    // The takeover is B's first successful write of the Lease; from then on, no write request
    // from A may reach the API server, whether it changes anything or not, accepted or not.
    let writes = audited.writes();
    let takeover = writes
        .iter()
        .filter(|w| w.ok() && w.by(&id_b) && w.resource == "leases" && w.namespace == ns)
        .map(|w| w.received)
        .min()
        .context("no Lease write by replica b in the audit log")?;
    let late: Vec<String> =
        writes.iter().filter(|w| w.by(&id_a) && w.received >= takeover).map(|w| w.to_string()).collect();
    assert!(
        late.is_empty(),
        "replica a wrote after replica b took over at {takeover}:\n{}\nreplica a's log:\n{log_a}",
        late.join("\n")
    );
    // And the realm carries on under the new leader.
    assert!(writes.iter().any(|w| secret_writes_by(&id_b)(w) && w.received > takeover));
    wait_condition(&client, &ns, "fenced", "Ready", "True", None, Duration::from_secs(10)).await?;
    assert!(b.metric("authrealm_operator_leader").await == Some(1.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_realms_keys_are_forgotten() -> anyhow::Result<()> {
    let audited = audited_env().await?;
    let env = &audited.env;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("forget").await?;
    let id = format!("{ns}-op");
    let op = OperatorProcess::spawn(env, "forget", &replica_args(&ns, &id))?;
    create_realm(&client, &ns, &realm("kept", stateless_spec())).await?;
    create_realm(&client, &ns, &realm("gone", stateless_spec())).await?;
    for name in ["kept", "gone"] {
        wait_condition(&client, &ns, name, "Ready", "True", None, Duration::from_secs(30)).await?;
    }
    let gauge = "authrealm_operator_cached_key_sets";
    wait_for("both realms' keys held", Duration::from_secs(20), || async {
        (op.metric(gauge).await? == 2.0).then_some(())
    })
    .await?;

    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    api.delete("gone", &DeleteParams::default()).await?;
    wait_for("the deleted realm's keys forgotten", Duration::from_secs(20), || async {
        (op.metric(gauge).await? == 1.0).then_some(())
    })
    .await?;
    assert!(op.log_text().contains("realm deleted: forgot its keys"), "{}", op.log_text());
    // Only that realm's: the other one's go with it.
    api.delete("kept", &DeleteParams::default()).await?;
    wait_for("no keys held", Duration::from_secs(20), || async { (op.metric(gauge).await? == 0.0).then_some(()) })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_controller_holds_no_keys() -> anyhow::Result<()> {
    let audited = audited_env().await?;
    let client = audited.env.client().await?;
    let ns = audited.env.create_temp_namespace("stop").await?;
    let op = InProcess::start(client.clone(), &ns);
    create_realm(&client, &ns, &realm("held", stateless_spec())).await?;
    wait_condition(&client, &ns, "held", "Ready", "True", None, Duration::from_secs(30)).await?;
    let metrics = op.metrics.clone();
    wait_for("the realm's keys held", Duration::from_secs(10), || {
        std::future::ready((metrics.cached_key_sets.get() == 1).then_some(()))
    })
    .await?;
    op.stop().await?;
    assert_eq!(metrics.cached_key_sets.get(), 0, "the key sets outlived the controller");
    Ok(())
}
