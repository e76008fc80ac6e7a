//! What Ready realms cost at rest: a real operator process against a real kube-apiserver whose
//! audit log records every request (reads included) with the operator's User-Agent, and a real
//! Redis Cluster whose `INFO stats` counts the connections it accepted.
//!
//! Ready realms must cost (almost) nothing while nothing changes: no API request per realm per
//! Redis check, no write that changes nothing, one kept Redis connection for all realms naming
//! the same Redis, closed when no realm names it any more.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use authrealm_operator::crd::AuthRealm;
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use common::*;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

/// Every request, at Metadata level (no bodies: no key material in the log).
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"#;

/// How often the operator under test checks Redis: the idle windows below span several checks.
const CHECK_INTERVAL: &str = "1s";

/// Realms in the test: enough that a per-realm cost is unmistakable.
const REALMS: usize = 12;

/// One request as the audit log recorded it.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    received: Timestamp,
    user_agent: String,
    verb: String,
    resource: String,
    name: String,
}

impl Request {
    fn parse(line: &str) -> Option<Request> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
        let sub = s("/objectRef/subresource");
        Some(Request {
            id: s("/auditID"),
            received: s("/requestReceivedTimestamp").parse().ok()?,
            user_agent: s("/userAgent"),
            verb: s("/verb"),
            resource: if sub.is_empty() {
                s("/objectRef/resource")
            } else {
                format!("{}/{sub}", s("/objectRef/resource"))
            },
            name: s("/objectRef/name"),
        })
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} {}", self.received, self.verb, self.resource, self.name)
    }
}

/// Requests by `identity` received at or after `since`, one per audit ID. Watches are left
/// out: they are long-lived and re-established on the server's schedule, not per realm.
fn requests_since(log: &PathBuf, identity: &str, since: Timestamp) -> Vec<Request> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    text.lines()
        .filter_map(Request::parse)
        .filter(|r| r.user_agent.ends_with(&format!("({identity})")) && r.received >= since && r.verb != "watch")
        .filter(|r| seen.insert(r.id.clone()))
        .collect()
}

/// Ordinary client connections open on the cluster's nodes (not replication links, not the
/// query's own).
fn client_connections(cluster: &RedisCluster) -> anyhow::Result<usize> {
    let mut n = 0;
    for addr in cluster.live_addrs() {
        let text = cluster.cli(&addr, &["CLIENT", "LIST"])?;
        n += text.lines().filter(|l| l.contains(" flags=N ") && !l.contains("cmd=client|list")).count();
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_realms_at_rest_cost_no_requests_no_writes_and_one_shared_redis_connection() -> anyhow::Result<()> {
    crypto();
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start(RedisClusterOptions::with_password("idle-pw"))).await??;
    let dir = std::env::temp_dir().join(format!("authrealm-idle-audit-{}-{}", std::process::id(), unix_now_f()));
    let (opts, log) = KubeEnvOptions::audited(&dir, AUDIT_POLICY)?;
    let env = KubeEnv::start(opts).await?;
    let client = env.client().await?;
    install_crd(&client).await?;
    let ns = env.create_temp_namespace("idle").await?;
    create_redis_secret(&client, &ns, "redis-auth", "idle-pw").await?;
    let identity = "idle-0";
    let check_interval = format!("--redis-check-interval={CHECK_INTERVAL}");
    let op = OperatorProcess::spawn(
        &env,
        "operator-idle",
        &[
            "--namespace",
            &ns,
            "--leader-elect=false",
            "--webhook-enabled=false",
            "--identity",
            identity,
            &check_interval,
        ],
    )?;
    let seeds = cluster.seeds();
    for i in 0..REALMS {
        let spec = json!({
            "issuer": format!("https://idle-{i}.example.test"),
            "audiences": ["app"],
            "algorithm": "ES256",
            "redis": {"endpoints": &seeds[..2], "credentials": {"secretName": "redis-auth"}},
        });
        create_realm(&client, &ns, &realm(&format!("idle-{i}"), spec)).await?;
    }
    let realms: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    wait_for("every realm Ready", Duration::from_secs(90), || {
        let realms = realms.clone();
        async move {
            let list = realms.list(&ListParams::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|r| {
                    r.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .count();
            (ready == REALMS).then_some(())
        }
    })
    .await?;

    // At rest: several Redis check intervals without a single API request (watches aside) and
    // without a new Redis connection. (The previous operator re-ran the whole reconcile per
    // realm per check: 6 reads, 2 writes and a new Redis connection each.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = Timestamp::now();
    let (conns_before, _) = cluster.connections_received()?;
    let checks_before = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let requests = requests_since(&log, identity, since);
    let (conns_after, nodes) = cluster.connections_received()?;
    let new_connections = conns_after - conns_before - nodes;
    let listed: Vec<String> = requests.iter().map(ToString::to_string).collect();
    assert!(
        requests.is_empty(),
        "{} API requests by the operator in {:.1?} at rest (Redis checked every {CHECK_INTERVAL}):\n{}",
        requests.len(),
        checks_before.elapsed(),
        listed.join("\n")
    );
    assert_eq!(
        new_connections,
        0,
        "{REALMS} realms naming the same Redis opened {new_connections} new connections in {:.1?} at rest",
        checks_before.elapsed()
    );
    // ... while the checks do run, over one kept connection for all realms.
    assert_eq!(client_connections(&cluster)?, 1, "one kept connection for {REALMS} realms");

    // A reconcile that changes nothing writes nothing: an annotation on a realm wakes it (its
    // reconcile runs, as the counter shows), and the operator sends no write.
    // Finished reconciles (the duration histogram counts a reconcile when it ends, after its writes).
    const FINISHED: &str = "authrealm_operator_reconcile_duration_seconds_count";
    let reconciles = op.metric(FINISHED).await.context("reconciles metric")?;
    let since = Timestamp::now();
    realms
        .patch(
            "idle-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.test/touched": "yes"}}})),
        )
        .await?;
    wait_for("the touched realm reconciled", Duration::from_secs(20), || async {
        (op.metric(FINISHED).await? > reconciles).then_some(())
    })
    .await?;
    let writes: Vec<String> = requests_since(&log, identity, since)
        .into_iter()
        .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .map(|r| r.to_string())
        .collect();
    assert!(writes.is_empty(), "a reconcile with nothing to change wrote:\n{}", writes.join("\n"));

    // The Redis check still notices a change, and only the change is written: a wrong password
    // for one realm turns only that realm's condition.
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "idle-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"credentials": {"secretName": "redis-auth", "passwordKey": "nope"}}}})),
    )
    .await?;
    wait_condition(
        &client,
        &ns,
        "idle-1",
        "RedisReachable",
        "False",
        Some("CredentialsMissing"),
        Duration::from_secs(30),
    )
    .await?;

    // Realms gone: the shared connection is closed.
    realms.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    wait_for("the kept Redis connection closed", Duration::from_secs(30), || {
        let n = client_connections(&cluster).ok();
        async move { (n? == 0).then_some(()) }
    })
    .await?;
    drop(op);
    drop(env);
    if std::env::var_os("AUTHREALM_KEEP_KUBE_ENV").is_none_or(|v| v.is_empty()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// A leader at rest renews its Lease with one request per renewal: it replaces the Lease it last
/// wrote (the resourceVersion makes the write conditional) instead of reading it first. Another
/// writer in between turns the renewal into a conflict, after which the leader reads the Lease
/// and carries on — it does not lose leadership over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_at_rest_renews_its_lease_with_one_request_per_renewal() -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    crypto();
    let dir = std::env::temp_dir().join(format!("authrealm-lease-audit-{}-{}", std::process::id(), unix_now_f()));
    let (opts, log) = KubeEnvOptions::audited(&dir, AUDIT_POLICY)?;
    let env = KubeEnv::start(opts).await?;
    let client = env.client().await?;
    install_crd(&client).await?;
    let ns = env.create_temp_namespace("lease").await?;
    let identity = "lease-0";
    let _op = OperatorProcess::spawn(
        &env,
        "operator-lease",
        &[
            "--namespace",
            &ns,
            "--lease-namespace",
            &ns,
            "--leader-elect=true",
            "--lease-duration=8s",
            "--renew-deadline=6s",
            "--retry-period=1s",
            "--webhook-enabled=false",
            "--identity",
            identity,
        ],
    )?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |leases: Api<Lease>| async move {
        let l = leases.get_opt("authrealm-operator").await.ok()??;
        let spec = l.spec?;
        Some((spec.holder_identity?, spec.renew_time?.0, spec.lease_transitions.unwrap_or(0)))
    };
    wait_for("the operator holds the Lease", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move { holder(leases).await.filter(|(h, _, _)| h == identity) }
    })
    .await?;

    let lease_requests = |since: Timestamp| -> Vec<Request> {
        requests_since(&log, identity, since).into_iter().filter(|r| r.resource == "leases").collect()
    };
    let since = Timestamp::now();
    let window = Instant::now();
    wait_for("five renewals", Duration::from_secs(30), || {
        let n = lease_requests(since).len();
        async move { (n >= 5).then_some(()) }
    })
    .await?;
    let requests = lease_requests(since);
    let listed: Vec<String> = requests.iter().map(ToString::to_string).collect();
    assert!(
        requests.iter().all(|r| r.verb == "update"),
        "lease requests at rest in {:.1?} (one update per renewal expected, no reads):\n{}",
        window.elapsed(),
        listed.join("\n")
    );

    // Someone else writes the Lease (an annotation; holder unchanged): the next renewal
    // conflicts, the leader reads the Lease once and keeps renewing as the holder.
    let (_, renewed, transitions) = holder(leases.clone()).await.context("lease")?;
    leases
        .patch(
            "authrealm-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.test/touched": "yes"}}})),
        )
        .await?;
    wait_for("a renewal after the foreign write", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move { holder(leases).await.filter(|(h, t, _)| h == identity && *t > renewed) }
    })
    .await?;
    let (_, _, after) = holder(leases.clone()).await.context("lease")?;
    assert_eq!(after, transitions, "the leader kept its term through a conflicting write");
    drop(env);
    if std::env::var_os("AUTHREALM_KEEP_KUBE_ENV").is_none_or(|v| v.is_empty()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
