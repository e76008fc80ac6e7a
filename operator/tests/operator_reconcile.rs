//! Reconciling AuthRealms against a real kube-apiserver (and, for RedisReachable, a real
//! six-node Redis Cluster): owned objects, status, key stability, Redis checks, bad specs.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use authrealm_contract::{Alg, KeyState, SidecarConfig};
use authrealm_operator::crd::AuthRealm;
use authrealm_operator::render;
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use authrealm_tests::redis_standalone::{RedisStandalone, RedisStandaloneOptions};
use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_gets_keys_jwks_and_sidecar_config_with_owner_references() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("objects").await?;
    let op = InProcess::start(client.clone(), &ns);
    let t0 = Instant::now();
    let created = create_realm(&client, &ns, &realm("shop", stateless_spec())).await?;
    let t1 = Instant::now();
    let r = wait_condition(&client, &ns, "shop", "Ready", "True", None, Duration::from_secs(30)).await?;
    // The first custom-resource create on a fresh API server is slow (~2 s, server side); the
    // reconcile latency is measured from the moment the create returned.
    eprintln!("create took {:?}; realm Ready {:?} after the create returned", t1 - t0, t1.elapsed());
    let status = r.status.clone().unwrap();
    assert_eq!(status.observed_generation, r.metadata.generation);
    assert!(status.conditions.iter().all(|c| c.observed_generation == r.metadata.generation));
    let types: Vec<_> = status.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
    assert_eq!(types, [("Ready", "True"), ("KeysReady", "True"), ("RedisReachable", "True"), ("KeysIntact", "True")]);
    let kid = status.current_kid.clone().unwrap();
    assert_eq!(status.key_count, Some(1));
    assert!(status.next_rotation_time.is_some());

    let uid = created.uid().unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get("shop-signing-keys").await?;
    let jwks = cms.get("shop-jwks").await?;
    let config = cms.get("shop-sidecar").await?;
    for meta in [&secret.metadata, &jwks.metadata, &config.metadata] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("AuthRealm", "shop", uid.as_str()));
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.labels.as_ref().unwrap()["authrealm.dev/realm"], "shop");
    }
    // Every object is owned by the one field manager.
    for mf in [&secret.metadata.managed_fields, &jwks.metadata.managed_fields, &config.metadata.managed_fields] {
        assert!(mf.iter().flatten().all(|m| m.manager.as_deref() == Some(render::MANAGER)), "{mf:?}");
    }

    // The Secret holds the full key set, the JWKS the public half; the sidecar config is the contract type.
    let full = secret_keyset(&client, &ns, "shop").await.unwrap();
    assert_eq!(full.current().unwrap().kid, kid);
    assert_eq!(full.current().unwrap().alg, Alg::ES256);
    assert!(full.has_private_material());
    let public = jwks_keyset(&client, &ns, "shop").await.unwrap();
    assert_eq!(public, full.public_only());
    let jwks_json: serde_json::Value = serde_json::from_str(&jwks.data.as_ref().unwrap()["jwks.json"])?;
    assert_eq!(jwks_json["keys"][0]["kid"], kid.as_str());
    assert!(!jwks.data.as_ref().unwrap()["jwks.json"].contains("\"d\""));
    let cfg = SidecarConfig::from_json(config.data.as_ref().unwrap()["sidecar.json"].as_bytes())?;
    assert_eq!((cfg.realm.as_str(), cfg.key_set_file.as_str()), ("shop", render::KEY_SET_FILE));
    assert_eq!(cfg.issuer, "https://auth.example.test");

    // A Normal event for the first key.
    let evs = events(&client, &ns, "shop").await;
    assert!(evs.iter().any(|(r, n)| r == "KeyCreated" && n.contains(&kid)), "{evs:?}");

    // Spec change that does not need new keys: same key; the config follows.
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"audiences": ["app", "admin"], "tokenTtl": "5m"}})),
    )
    .await?;
    let cfg = wait_for("config with two audiences", Duration::from_secs(30), || {
        let cms = cms.clone();
        async move {
            let cm = cms.get("shop-sidecar").await.ok()?;
            let cfg = SidecarConfig::from_json(cm.data?["sidecar.json"].as_bytes()).ok()?;
            (cfg.audiences.len() == 2).then_some(cfg)
        }
    })
    .await?;
    assert_eq!(cfg.token_ttl_seconds, 300);
    let r = wait_condition(&client, &ns, "shop", "Ready", "True", None, Duration::from_secs(30)).await?;
    wait_for("observedGeneration 2", Duration::from_secs(30), || {
        let api = api.clone();
        async move { (api.get("shop").await.ok()?.status?.observed_generation == Some(2)).then_some(()) }
    })
    .await?;
    assert_eq!(r.status.unwrap().current_kid.as_deref(), Some(kid.as_str()));
    assert_eq!(secret_keyset(&client, &ns, "shop").await.unwrap(), full, "keys changed on an audience change");

    // An operator restart (fresh process state) does not regenerate anything.
    op.stop().await?;
    let op = InProcess::start(client.clone(), &ns);
    wait_for("the restarted operator's first reconcile", Duration::from_secs(30), || async {
        (finished_reconciles(&op.metrics) > 0).then_some(())
    })
    .await?;
    assert_eq!(secret_keyset(&client, &ns, "shop").await.unwrap(), full, "keys changed on restart");
    // Idle: no reconcile loop feeding on its own writes.
    let count = |m: &authrealm_operator::metrics::Metrics| m.reconciles.get();
    let before = count(&op.metrics);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&op.metrics), before, "reconciles keep happening on an idle realm");
    op.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithm_change_starts_a_new_chain_with_the_same_overlap() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("alg").await?;
    let op = InProcess::start(client.clone(), &ns);
    let mut spec = stateless_spec();
    spec["keyRotation"] = json!({"interval": "1h", "propagationDelay": "3s"});
    create_realm(&client, &ns, &realm("alg", spec)).await?;
    let r = wait_condition(&client, &ns, "alg", "Ready", "True", None, Duration::from_secs(30)).await?;
    let old = r.status.unwrap().current_kid.unwrap();

    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    let changed = Instant::now();
    api.patch("alg", &PatchParams::default(), &Patch::Merge(json!({"spec": {"algorithm": "EdDSA"}}))).await?;
    // Published first as next (old key still signing) …
    let set = wait_for("EdDSA key as next", Duration::from_secs(10), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let s = jwks_keyset(&client, &ns, "alg").await?;
            s.keys.iter().any(|k| k.alg == Alg::EdDSA && k.state == KeyState::Next).then_some(s)
        }
    })
    .await?;
    assert_eq!(set.current().unwrap().kid, old);
    // … then current after the propagation delay, the old key retired (still published).
    let set = wait_for("EdDSA key current", Duration::from_secs(15), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let s = jwks_keyset(&client, &ns, "alg").await?;
            (s.current()?.alg == Alg::EdDSA).then_some(s)
        }
    })
    .await?;
    let waited = changed.elapsed();
    assert!(waited >= Duration::from_secs(2), "new key signed after only {waited:?}");
    assert_eq!(set.get(&old).unwrap().state, KeyState::Retired);
    assert_eq!(set.keys.len(), 2);
    op.stop().await?;
    Ok(())
}

/// `ShortPropagationDelay` events about `realm`: (type, note).
async fn short_delay_warnings(client: &kube::Client, ns: &str, realm: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let list = api.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    list.into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(realm))
        .filter(|e| e.reason.as_deref() == Some("ShortPropagationDelay"))
        .map(|e| (e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_propagation_delay_under_a_minute_gets_one_warning_per_spec_generation() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("delay").await?;
    let op = InProcess::start(client.clone(), &ns);
    let mut short = stateless_spec();
    short["keyRotation"] = json!({"interval": "1h", "propagationDelay": "10s"});
    create_realm(&client, &ns, &realm("short", short)).await?;
    create_realm(&client, &ns, &realm("default", stateless_spec())).await?;
    wait_condition(&client, &ns, "short", "Ready", "True", None, Duration::from_secs(30)).await?;
    wait_condition(&client, &ns, "default", "Ready", "True", None, Duration::from_secs(30)).await?;

    // The event is published before the status that makes the realm Ready.
    let warnings = short_delay_warnings(&client, &ns, "short").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let (type_, note) = &warnings[0];
    assert_eq!(type_, "Warning");
    assert!(note.contains("keyRotation.propagationDelay is 10s"), "{note}");
    assert!(note.contains("up to about a minute to reach running pods"), "{note}");
    assert!(note.contains("tokens it signs may be rejected"), "{note}");
    // The default (2m) is long enough.
    assert_eq!(short_delay_warnings(&client, &ns, "default").await, []);

    // The same generation reconciled again by a restarted operator (no memory of the warning):
    // not repeated.
    op.stop().await?;
    let op = InProcess::start(client.clone(), &ns);
    wait_for("the restarted operator to reconcile both realms", Duration::from_secs(30), || {
        let n = op.metrics.reconciles.get();
        async move { (n >= 2).then_some(()) }
    })
    .await?;
    assert_eq!(short_delay_warnings(&client, &ns, "short").await.len(), 1);

    // A new spec generation, still under a minute: one more warning.
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    let observed = |generation: i64| {
        let api = api.clone();
        async move {
            let r = api.get("short").await.ok()?;
            (r.status?.observed_generation == Some(generation)).then_some(())
        }
    };
    let r = api.patch("short", &PatchParams::default(), &Patch::Merge(json!({"spec": {"tokenTtl": "10m"}}))).await?;
    let generation = r.metadata.generation.unwrap();
    wait_for("the tokenTtl change to be reconciled", Duration::from_secs(30), || observed(generation)).await?;
    assert_eq!(short_delay_warnings(&client, &ns, "short").await.len(), 2);

    // Raised to a minute: no warning.
    let p = Patch::Merge(json!({"spec": {"keyRotation": {"propagationDelay": "1m"}}}));
    let generation = api.patch("short", &PatchParams::default(), &p).await?.metadata.generation.unwrap();
    wait_for("the propagationDelay change to be reconciled", Duration::from_secs(30), || observed(generation)).await?;
    assert_eq!(short_delay_warnings(&client, &ns, "short").await.len(), 2);
    op.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_the_api_server_accepts_is_reported_not_crash_looped() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("badspec").await?;
    let op = InProcess::start(client.clone(), &ns);
    // An empty claim name passes the schema and the CEL rules but not the sidecar's config checks.
    let mut bad = stateless_spec();
    bad["sidecar"] = json!({"claimHeaders": {"": "X-Empty"}});
    create_realm(&client, &ns, &realm("bad", bad)).await?;
    create_realm(&client, &ns, &realm("good", stateless_spec())).await?;
    let r = wait_condition(&client, &ns, "bad", "Ready", "False", Some("InvalidSpec"), Duration::from_secs(30)).await?;
    let msg = &r.status.unwrap().conditions[0].message;
    assert!(msg.contains("identityHeaders[0].claim"), "{msg}");
    wait_condition(&client, &ns, "good", "Ready", "True", None, Duration::from_secs(30)).await?;
    assert!(secret_keyset(&client, &ns, "bad").await.is_none(), "keys created for an invalid spec");
    let evs = events(&client, &ns, "bad").await;
    assert_eq!(evs.iter().filter(|(r, _)| r == "InvalidSpec").count(), 1, "{evs:?}");
    // No error backoff storm: reconciles of the bad realm are not failures.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!op.metrics.encode().contains("authrealm_operator_reconcile_errors_total{"), "{}", op.metrics.encode());

    // Fixing the spec makes it Ready.
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"sidecar": {"claimHeaders": {"": null, "sub": "X-Auth-Subject"}}}})),
    )
    .await?;
    wait_condition(&client, &ns, "bad", "Ready", "True", None, Duration::from_secs(30)).await?;
    op.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reachable_comes_from_a_real_cluster_check_with_the_realms_credentials() -> anyhow::Result<()> {
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start(RedisClusterOptions::with_password("s3cret-pw"))).await??;
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("redis").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, pw) in [("redis-auth", "s3cret-pw"), ("redis-wrong", "not-the-password")] {
        secrets
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        labels: Some(BTreeMap::from([(
                            "authrealm.dev/redis-credentials".to_owned(),
                            "true".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([("password".to_owned(), ByteString(pw.as_bytes().to_vec()))])),
                    ..Secret::default()
                },
            )
            .await?;
    }
    let op = InProcess::start(client.clone(), &ns);
    let spec = json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "redis": {"endpoints": &cluster.seeds()[..2], "credentials": {"secretName": "redis-auth"}},
    });
    create_realm(&client, &ns, &realm("sessions", spec)).await?;
    let r =
        wait_condition(&client, &ns, "sessions", "RedisReachable", "True", Some("ClusterOk"), Duration::from_secs(30))
            .await?;
    assert!(r.status.as_ref().unwrap().conditions[0].status == "True", "Ready should be True");
    // The password never reaches the sidecar config.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cfg = cms.get("sessions-sidecar").await?.data.unwrap()["sidecar.json"].clone();
    assert!(!cfg.contains("s3cret-pw"));
    assert!(cfg.contains(&cluster.seeds()[0]));

    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    // A wrong password.
    api.patch(
        "sessions",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"credentials": {"secretName": "redis-wrong"}}}})),
    )
    .await?;
    let r = wait_condition(
        &client,
        &ns,
        "sessions",
        "RedisReachable",
        "False",
        Some("AuthenticationFailed"),
        Duration::from_secs(30),
    )
    .await?;
    let st = r.status.unwrap();
    assert_eq!((st.conditions[0].type_.as_str(), st.conditions[0].status.as_str()), ("Ready", "False"));
    assert_eq!(st.conditions[0].reason, "AuthenticationFailed");
    assert!(!st.conditions.iter().any(|c| c.message.contains("not-the-password")));
    // A missing Secret.
    api.patch(
        "sessions",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"credentials": {"secretName": "nope"}}}})),
    )
    .await?;
    wait_condition(
        &client,
        &ns,
        "sessions",
        "RedisReachable",
        "False",
        Some("CredentialsMissing"),
        Duration::from_secs(30),
    )
    .await?;
    // A dead port.
    let dead = format!("127.0.0.1:{}", free_port());
    api.patch(
        "sessions",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"endpoints": [dead], "credentials": {"secretName": "redis-auth"}}}})),
    )
    .await?;
    let r = wait_condition(&client, &ns, "sessions", "Ready", "False", Some("Unreachable"), Duration::from_secs(30))
        .await?;
    assert!(r.status.unwrap().conditions[2].message.contains(&dead));
    // Back to the cluster: Ready again, keys unchanged throughout.
    let kid = secret_keyset(&client, &ns, "sessions").await.unwrap().current().map(|k| k.kid.clone());
    api.patch(
        "sessions",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"redis": {"endpoints": &cluster.seeds()[..1]}}})),
    )
    .await?;
    let r = wait_condition(&client, &ns, "sessions", "Ready", "True", None, Duration::from_secs(30)).await?;
    assert_eq!(r.status.unwrap().current_kid, kid);
    let evs = events(&client, &ns, "sessions").await;
    assert!(evs.iter().any(|(r, _)| r == "RedisUnreachable"), "{evs:?}");
    assert!(evs.iter().any(|(r, _)| r == "RedisReachable"), "{evs:?}");
    op.stop().await?;
    drop(cluster);
    Ok(())
}

/// `redis.mode: standalone` against a real single Redis: the check is PING/INFO (not CLUSTER
/// INFO), a mode that does not match the server is named, the API server refuses two endpoints,
/// and the purge on delete scans the one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_realm_is_checked_and_purged_on_its_one_server() -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(|| {
        RedisStandalone::start_with(RedisStandaloneOptions {
            password: Some("solo-pw".into()),
            ..RedisStandaloneOptions::default()
        })
    })
    .await??;
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("solo").await?;
    create_redis_secret(&client, &ns, "redis-auth", "solo-pw").await?;
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    // The API server refuses two endpoints in standalone mode, with the CRD's message.
    let two = json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "redis": {"mode": "standalone", "endpoints": [server.addr(), "127.0.0.1:1"]},
    });
    let e = api.create(&PostParams::default(), &realm("two", two)).await.unwrap_err();
    assert!(e.to_string().contains("redis.mode standalone takes exactly one endpoint"), "{e}");

    let op = InProcess::start_with(
        client.clone(),
        authrealm_operator::controller::Settings {
            namespace: Some(ns.clone()),
            redis_check_interval: Duration::from_secs(2),
            ..Default::default()
        },
    );
    // The shipped example, pointed at this server.
    let mut example = authrealm_tests::support::yaml_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/authrealm-standalone.yaml"
    ))?;
    assert_eq!(example["spec"]["redis"]["mode"], "standalone");
    let mut spec = example["spec"].take();
    spec["redis"]["endpoints"] = json!([server.addr()]);
    spec["redis"]["purgeOnDelete"] = json!(true);
    create_realm(&client, &ns, &realm("solo", spec)).await?;
    let r =
        wait_condition(&client, &ns, "solo", "RedisReachable", "True", Some("StandaloneOk"), Duration::from_secs(30))
            .await?;
    let st = r.status.unwrap();
    assert_eq!((st.conditions[0].type_.as_str(), st.conditions[0].status.as_str()), ("Ready", "True"));
    let msg = &st.conditions.iter().find(|c| c.type_ == "RedisReachable").unwrap().message;
    assert!(msg.contains("standalone Redis, role master"), "{msg}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cfg = cms.get("solo-sidecar").await?.data.unwrap()["sidecar.json"].clone();
    let cfg = SidecarConfig::from_json(cfg.as_bytes())?;
    assert_eq!(cfg.redis.as_ref().unwrap().mode, authrealm_contract::RedisMode::Standalone);
    assert_eq!(cfg.redis.as_ref().unwrap().endpoints, [server.addr()]);

    // The server killed: the periodic check reports it; back on its port: Ready again.
    let mut server = server;
    tokio::task::block_in_place(|| server.kill())?;
    let r =
        wait_condition(&client, &ns, "solo", "RedisReachable", "False", Some("Unreachable"), Duration::from_secs(30))
            .await?;
    assert_eq!(r.status.unwrap().conditions[0].status, "False", "Ready follows RedisReachable");
    tokio::task::block_in_place(|| server.restart())?;
    wait_condition(&client, &ns, "solo", "RedisReachable", "True", Some("StandaloneOk"), Duration::from_secs(30))
        .await?;

    // A cluster realm named at this server is told what is wrong, not just "unreachable".
    api.patch("solo", &PatchParams::default(), &Patch::Merge(json!({"spec": {"redis": {"mode": "cluster"}}}))).await?;
    let r = wait_condition(
        &client,
        &ns,
        "solo",
        "RedisReachable",
        "False",
        Some("RedisModeMismatch"),
        Duration::from_secs(30),
    )
    .await?;
    let msg = &r.status.unwrap().conditions.iter().find(|c| c.type_ == "RedisReachable").unwrap().message.clone();
    assert!(msg.contains("redis.mode: standalone"), "{msg}");
    api.patch("solo", &PatchParams::default(), &Patch::Merge(json!({"spec": {"redis": {"mode": "standalone"}}})))
        .await?;
    wait_condition(&client, &ns, "solo", "Ready", "True", None, Duration::from_secs(30)).await?;

    // Purge on delete: the realm's keys on the server go, another realm's stay.
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..40 {
        mine.push(format!("ar:{ns}:{{solo:user{i}}}:t:jti{i}"));
        mine.push(format!("ar:{ns}:{{solo:j:jti{i}}}:loc"));
        theirs.push(format!("ar:{ns}:{{solo-other:user{i}}}:t:jti{i}"));
    }
    for k in mine.iter().chain(&theirs) {
        server.cli(&["SET", k, "1"])?;
    }
    let exists = |keys: &[String]| -> anyhow::Result<usize> {
        let mut n = 0;
        for k in keys {
            n += server.cli(&["EXISTS", k])?.trim().parse::<usize>()?;
        }
        Ok(n)
    };
    assert_eq!(exists(&mine)?, mine.len());
    api.delete("solo", &DeleteParams::default()).await?;
    wait_for("realm gone", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get_opt("solo").await.ok()?.is_none().then_some(()) }
    })
    .await?;
    assert_eq!(exists(&mine)?, 0, "the realm's session records were not purged");
    assert_eq!(exists(&theirs)?, theirs.len(), "another realm's records were touched");
    let evs = events(&client, &ns, "solo").await;
    assert!(evs.iter().any(|(r, n)| r == "SessionsPurged" && n.contains("80")), "{evs:?}");
    op.stop().await?;
    Ok(())
}

/// Someone allowed to write AuthRealms but not to read Secrets names a Secret of the namespace
/// as the Redis credentials and points `redis.endpoints` at a server they control: the operator
/// (which can read every Secret) sends nothing unless the Secret opted in with a label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sends_only_secrets_labelled_for_redis() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("deputy").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta { name: Some("payments-db".into()), ..ObjectMeta::default() },
                data: Some(BTreeMap::from([("password".to_owned(), ByteString(b"db-root-pw-4711".to_vec()))])),
                ..Secret::default()
            },
        )
        .await?;
    // The "Redis" endpoint records every byte it receives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = listener.local_addr()?.to_string();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        while let Ok((mut conn, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    // Checks every 2 s, so the label added below is picked up without touching the realm.
    let op = InProcess::start_with(
        client.clone(),
        authrealm_operator::controller::Settings {
            namespace: Some(ns.clone()),
            redis_check_interval: Duration::from_secs(2),
            ..Default::default()
        },
    );
    let spec = json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "redis": {"endpoints": [endpoint], "credentials": {"secretName": "payments-db"}, "connectTimeout": "500ms"},
    });
    create_realm(&client, &ns, &realm("deputy", spec)).await?;
    let r = wait_condition(
        &client,
        &ns,
        "deputy",
        "RedisReachable",
        "False",
        Some("CredentialsNotLabelled"),
        Duration::from_secs(30),
    )
    .await?;
    let st = r.status.unwrap();
    let msg = &st.conditions.iter().find(|c| c.type_ == "RedisReachable").unwrap().message;
    assert!(
        msg.contains(&format!("kubectl -n {ns} label secret payments-db authrealm.dev/redis-credentials=true")),
        "{msg}"
    );
    assert!(!st.conditions.iter().any(|c| c.message.contains("db-root-pw")));
    let evs = events(&client, &ns, "deputy").await;
    assert!(evs.iter().any(|(r, n)| r == "RedisUnreachable" && n.contains("not labelled")), "{evs:?}");
    assert!(received.lock().unwrap().is_empty(), "nothing was sent to the realm's endpoint");

    // Once the Secret's owner opts in, the operator uses it (so the check above could fail).
    secrets
        .patch(
            "payments-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"authrealm.dev/redis-credentials": "true"}}})),
        )
        .await?;
    wait_for("the labelled credentials used", Duration::from_secs(30), || {
        let received = received.clone();
        async move {
            let bytes = received.lock().unwrap().clone();
            bytes.windows(15).any(|w| w == b"db-root-pw-4711").then_some(())
        }
    })
    .await?;
    server.abort();
    op.stop().await?;
    Ok(())
}

/// Objects that merely carry the name of a realm's object are never taken over: taking them over
/// would also hand them to the garbage collector when the realm is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_the_same_name_not_controlled_by_the_realm_are_left_alone() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("conflict").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let victim = ConfigMap {
        metadata: ObjectMeta { name: Some("billing-sidecar".into()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([("invoice-template".to_owned(), "the billing team's data".to_owned())])),
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &victim).await?;
    let op = InProcess::start(client.clone(), &ns);
    create_realm(&client, &ns, &realm("billing", stateless_spec())).await?;
    let r =
        wait_condition(&client, &ns, "billing", "KeysReady", "False", Some("NameConflict"), Duration::from_secs(30))
            .await?;
    let st = r.status.unwrap();
    assert_eq!((st.conditions[0].status.as_str(), st.conditions[0].reason.as_str()), ("False", "NameConflict"));
    assert!(
        st.conditions[1].message.contains(&format!("ConfigMap {ns}/billing-sidecar")),
        "{}",
        st.conditions[1].message
    );
    let evs = events(&client, &ns, "billing").await;
    assert!(evs.iter().any(|(r, n)| r == "NameConflict" && n.contains("billing-sidecar")), "{evs:?}");
    // Untouched: same data, no owner reference, no field of the operator's.
    let after = cms.get("billing-sidecar").await?;
    assert_eq!(after.data, victim.data);
    assert!(after.metadata.owner_references.is_none(), "{:?}", after.metadata.owner_references);
    assert!(
        after.metadata.managed_fields.iter().flatten().all(|f| f.manager.as_deref() != Some("authrealm-operator")),
        "{:?}",
        after.metadata.managed_fields
    );
    // Nothing else of the realm was written either: no half-configured realm.
    assert!(secret_keyset(&client, &ns, "billing").await.is_none());
    assert!(jwks_keyset(&client, &ns, "billing").await.is_none());

    // Once the name is free, the realm gets its objects.
    cms.delete("billing-sidecar", &Default::default()).await?;
    wait_condition(&client, &ns, "billing", "Ready", "True", None, Duration::from_secs(40)).await?;
    let cm = cms.get("billing-sidecar").await?;
    assert!(cm.data.unwrap().contains_key("sidecar.json"));
    op.stop().await?;
    Ok(())
}

/// A reconcile that fails — here the session purge on deletion, whose Redis credentials Secret
/// does not exist — shows without reading the operator's log: a Warning `ReconcileFailed` event
/// on the realm (one Event whose series counts the retries, not one Event per retry) and the
/// `authrealm_operator_reconcile_errors_total{kind="purge"}` counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reconcile_raises_one_warning_event_series_and_counts_the_error() -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event;
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("failing").await?;
    let op = InProcess::start(client.clone(), &ns);
    let spec = json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "redis": {"endpoints": ["127.0.0.1:1"], "credentials": {"secretName": "no-such-secret"}, "purgeOnDelete": true},
    });
    create_realm(&client, &ns, &realm("doomed", spec)).await?;
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    wait_for("the purge finalizer", Duration::from_secs(30), || {
        let api = api.clone();
        async move { (!api.get("doomed").await.ok()?.finalizers().is_empty()).then_some(()) }
    })
    .await?;
    let errors = |m: &authrealm_operator::metrics::Metrics| {
        m.encode()
            .lines()
            .find_map(|l| l.strip_prefix("authrealm_operator_reconcile_errors_total{kind=\"purge\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(errors(&op.metrics), 0.0, "nothing failed before the deletion");
    api.delete("doomed", &Default::default()).await?;

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let failed = |list: Vec<Event>| -> Vec<Event> {
        list.into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed"))
            .filter(|e| e.reason.as_deref() == Some("ReconcileFailed"))
            .collect()
    };
    // Retried after 0.5 s, 1 s, 2 s …: the second failure updates the first failure's Event.
    let ev = wait_for("a ReconcileFailed series of at least 2", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = failed(events.list(&ListParams::default()).await.ok()?.items);
            list.iter().any(|e| e.series.as_ref().is_some_and(|s| s.count >= 2)).then_some(list)
        }
    })
    .await?;
    assert_eq!(ev.len(), 1, "one Event per realm and reason, not one per retry: {ev:#?}");
    let ev = &ev[0];
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    let note = ev.note.clone().unwrap_or_default();
    assert!(note.contains("failed to purge the sessions of AuthRealm") && note.contains("no-such-secret"), "{note}");
    assert!(errors(&op.metrics) >= 2.0, "{}", op.metrics.encode());

    // Let the realm go (the purge would be given up after --purge-timeout).
    api.patch("doomed", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await?;
    op.stop().await?;
    Ok(())
}
