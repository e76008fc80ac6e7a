//! Process and lifecycle behaviour against a real kube-apiserver with kube-controller-manager
//! (garbage collection): realm deletion with the session-purge finalizer, leader election
//! between two real operator processes, graceful shutdown, and the missing-CRD message.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use authrealm_contract::redis_keys::KeyLayout;
use std::time::{Duration, Instant};

use authrealm_operator::controller::FINALIZER;
use authrealm_operator::crd::AuthRealm;
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_realm_runs_the_purge_finalizer_and_owned_objects_go() -> anyhow::Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start(RedisClusterOptions::with_password("purge-pw"))).await??;
    let env = shared_env(true).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("purge").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    create_redis_secret(&client, &ns, "redis-auth", "purge-pw").await?;
    let op = InProcess::start(client.clone(), &ns);
    let spec = |purge: bool| {
        json!({
            "issuer": "https://auth.example.test",
            "audiences": ["app"],
            "redis": {"endpoints": [cluster.seeds()[0]], "credentials": {"secretName": "redis-auth"}, "purgeOnDelete": purge},
        })
    };
    create_realm(&client, &ns, &realm("purge", spec(true))).await?;
    create_realm(&client, &ns, &realm("purge-other", spec(false))).await?;
    let r = wait_condition(&client, &ns, "purge", "Ready", "True", None, Duration::from_secs(30)).await?;
    assert!(r.finalizers().iter().any(|f| f == FINALIZER), "{:?}", r.finalizers());
    let other = wait_condition(&client, &ns, "purge-other", "Ready", "True", None, Duration::from_secs(30)).await?;
    assert!(other.finalizers().is_empty(), "no finalizer without purgeOnDelete");

    // Session records of both realms, spread over many slots (key layout of the sidecar).
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    // Keys are `<keyPrefix><namespace>:{<realm>:…}`; a realm of the same name in another
    // namespace sharing the cluster must be left alone.
    for i in 0..40 {
        let (user, jti) = (format!("user{i}"), format!("jti{i}"));
        let mine_layout = KeyLayout::new(&format!("ar:{ns}:"), "purge");
        mine.push(mine_layout.token(&user, &jti));
        mine.push(mine_layout.locator(&jti));
        theirs.push(KeyLayout::new(&format!("ar:{ns}:"), "purge-other").token(&user, &jti));
        theirs.push(KeyLayout::new("ar:elsewhere:", "purge").token(&user, &jti));
    }
    let seed = cluster.seeds()[0].clone();
    for k in mine.iter().chain(&theirs) {
        cluster.cli_cluster(&seed, &["SET", k, "1"])?;
    }
    let exists = |keys: &[String]| -> anyhow::Result<usize> {
        let mut n = 0;
        for k in keys {
            n += cluster.cli_cluster(&seed, &["EXISTS", k])?.trim().parse::<usize>()?;
        }
        Ok(n)
    };
    assert_eq!(exists(&mine)?, mine.len());

    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    let t0 = Instant::now();
    api.delete("purge", &DeleteParams::default()).await?;
    wait_for("realm gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get_opt("purge").await.ok()?.is_none().then_some(()) }
    })
    .await?;
    eprintln!("realm deleted (finalizer done) in {:?}", t0.elapsed());
    assert_eq!(exists(&mine)?, 0, "the realm's session records were not purged");
    assert_eq!(exists(&theirs)?, theirs.len(), "another realm's records were touched");
    let evs = events(&client, &ns, "purge").await;
    assert!(evs.iter().any(|(r, n)| r == "SessionsPurged" && n.contains("80")), "{evs:?}");

    // Owned objects are garbage-collected through their owner references.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let t1 = Instant::now();
    wait_for("owned objects collected", Duration::from_secs(90), || {
        let (secrets, cms) = (secrets.clone(), cms.clone());
        async move {
            let gone = secrets.get_opt("purge-signing-keys").await.ok()?.is_none()
                && cms.get_opt("purge-jwks").await.ok()?.is_none()
                && cms.get_opt("purge-sidecar").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await?;
    eprintln!("owned objects collected {:?} after the realm went", t1.elapsed());
    assert!(secrets.get_opt("purge-other-signing-keys").await?.is_some());

    // Turning purgeOnDelete off removes the finalizer; deletion is then immediate.
    api.patch(
        "purge-other",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"purgeOnDelete": true}}})),
    )
    .await?;
    wait_for("finalizer added", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get("purge-other").await.ok()?.finalizers().iter().any(|f| f == FINALIZER).then_some(()) }
    })
    .await?;
    api.patch(
        "purge-other",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"purgeOnDelete": false}}})),
    )
    .await?;
    wait_for("finalizer removed", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get("purge-other").await.ok()?.finalizers().is_empty().then_some(()) }
    })
    .await?;
    op.stop().await?;
    drop(cluster);
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_leader_writes_and_the_other_takes_over() -> anyhow::Result<()> {
    let env = shared_env(true).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("leader").await?;
    let mut a = OperatorProcess::spawn(&env, "replica-a", &replica_args(&ns, "replica-a"))?;
    wait_for("replica-a leads", Duration::from_secs(30), || {
        let (client, ns) = (client.clone(), ns.clone());
        async move { (lease_holder(&client, &ns).await? == "replica-a").then_some(()) }
    })
    .await?;
    let mut b = OperatorProcess::spawn(&env, "replica-b", &replica_args(&ns, "replica-b"))?;
    wait_for("replica-b serving", Duration::from_secs(30), || b.get("/readyz")).await?;

    let mut spec = stateless_spec();
    spec["keyRotation"] = json!({"interval": "4s", "propagationDelay": "1s"});
    spec["tokenTtl"] = json!("2s");
    create_realm(&client, &ns, &realm("ha", spec)).await?;
    let first_kid = wait_condition(&client, &ns, "ha", "Ready", "True", None, Duration::from_secs(30))
        .await?
        .status
        .and_then(|s| s.current_kid)
        .unwrap();
    // A rotation happens with both running (the leader promotes a new key).
    wait_for("a promotion by the leader", Duration::from_secs(15), || {
        let (client, ns, first_kid) = (client.clone(), ns.clone(), first_kid.clone());
        async move { (secret_keyset(&client, &ns, "ha").await?.current()?.kid != first_kid).then_some(()) }
    })
    .await?;
    assert_eq!(a.metric("authrealm_operator_leader").await, Some(1.0));
    assert_eq!(b.metric("authrealm_operator_leader").await, Some(0.0));
    assert!(a.metric("authrealm_operator_reconciles_total").await.unwrap_or(0.0) >= 2.0);
    assert_eq!(b.metric("authrealm_operator_reconciles_total").await, Some(0.0), "the follower reconciled");
    // Each reconcile runs in a span naming the realm, its generation and the outcome.
    let log = a.log_text();
    let span = format!("reconcile{{namespace={ns} realm=ha generation=1 outcome=\"ok\"}}");
    assert!(
        log.lines().any(|l| l.contains(&span) && l.contains("reconciled")),
        "no {span} in the leader's log:\n{}",
        log.lines().filter(|l| l.contains("reconcil")).take(5).collect::<Vec<_>>().join("\n")
    );
    let kids_before: Vec<String> =
        secret_keyset(&client, &ns, "ha").await.unwrap().keys.iter().map(|k| k.kid.clone()).collect();

    // The leader dies without releasing the lease: the follower takes over after the lease
    // duration, and rotation carries on from the same keys.
    a.kill();
    let t0 = Instant::now();
    wait_for("replica-b leads", Duration::from_secs(20), || {
        let (client, ns) = (client.clone(), ns.clone());
        async move { (lease_holder(&client, &ns).await? == "replica-b").then_some(()) }
    })
    .await?;
    let takeover = t0.elapsed();
    eprintln!("follower took over {takeover:?} after the leader was SIGKILLed (lease duration 4s)");
    assert!(takeover >= Duration::from_secs(2), "took over before the lease could have expired");
    wait_for("replica-b reconciles", Duration::from_secs(10), || async {
        (b.metric("authrealm_operator_reconciles_total").await? > 0.0).then_some(())
    })
    .await?;
    let set = secret_keyset(&client, &ns, "ha").await.unwrap();
    let newest_before = kids_before.last().unwrap();
    assert!(set.get(newest_before).is_some(), "the newest key before the takeover was lost");
    let start_kid = set.current().unwrap().kid.clone();
    wait_for("a promotion by the new leader", Duration::from_secs(15), || {
        let (client, ns, start_kid) = (client.clone(), ns.clone(), start_kid.clone());
        async move { (secret_keyset(&client, &ns, "ha").await?.current()?.kid != start_kid).then_some(()) }
    })
    .await?;

    // Graceful shutdown: SIGTERM → exit 0 and the lease is released at once.
    let pid = b.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status()?;
    let status = tokio::task::spawn_blocking(move || {
        let s = b.child.wait();
        (s, b)
    })
    .await?;
    assert!(status.0?.success(), "operator did not exit 0 on SIGTERM");
    assert_eq!(lease_holder(&client, &ns).await, None, "lease not released on shutdown");
    let log = status.1.log_text();
    assert!(log.contains("released the leader lease"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_is_reported_with_how_to_install_it() -> anyhow::Result<()> {
    crypto();
    // A separate API server without the CRD.
    let env = KubeEnv::start(KubeEnvOptions::default()).await?;
    // JSON logs (what the chart sets): every line one object with level and message.
    let op = OperatorProcess::spawn(
        &env,
        "no-crd",
        &["--leader-elect=false", "--webhook-enabled=false", "--log-format=json"],
    )?;
    wait_for("the not-installed message", Duration::from_secs(20), || async {
        op.log_text().contains("is not installed; install it with `kubectl apply -f crds/authrealm.yaml`").then_some(())
    })
    .await?;
    assert!(op.get("/healthz").await.is_some());
    assert!(op.get("/readyz").await.is_none(), "ready without the CRD");
    // Installing the CRD is picked up without a restart.
    install_crd(&env.client().await?).await?;
    wait_for("ready after the CRD is installed", Duration::from_secs(30), || op.get("/readyz")).await?;

    for line in op.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(v["level"].is_string() && v["message"].is_string() && v["timestamp"].is_string(), "{line}");
    }

    // And a bad flag exits 64 naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authrealm-operator"))
        .args(["--renew-deadline=20s", "--webhook-enabled=false"])
        .env("KUBECONFIG", env.kubeconfig_path())
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--renew-deadline"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
