//! Redis Cluster failure: a master killed while requests flow, and a cluster that is down
//! when the sidecar starts. Uses `--cluster-node-timeout 2000` so failover takes ~4 s
//! (the default 15 s would take ~17 s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, FailurePolicy, KeySet, KeyState};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions, key_slot};
use authrealm_tests::sidecar::{Sidecar, Upstream, sign_raw, test_config, unix_now};
use base64::Engine as _;
use http::StatusCode;
use serde_json::json;

fn key_set() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    }
}

fn subject_slot(prefix: &str, realm: &str, sub: &str) -> u16 {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sub);
    key_slot(format!("{prefix}{{{realm}:{b64}}}:idx").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_policy_holds_through_a_master_failover() {
    let mut cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    cluster.wait_replication(Duration::from_secs(20), Some(1)).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    let cfg = test_config("failover", Some(cluster.seeds()));
    let prefix = cfg.redis.as_ref().unwrap().key_prefix.clone();
    let s = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let pid = s.pid();

    // 60 subjects: half live, half revoked (each revocation acknowledged by a replica).
    let mut live = HashMap::new();
    let mut revoked = HashMap::new();
    for i in 0..60 {
        let sub = format!("user-{i}");
        let t = s.mint(&sub).await.unwrap();
        let token = t["access_token"].as_str().unwrap().to_string();
        if i % 2 == 0 {
            live.insert(sub, token);
        } else {
            let r = s.issuer_call("DELETE", &format!("/v1/tokens/{}", t["jti"].as_str().unwrap()), None).await.unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.json()["replicas_confirmed"].as_i64().unwrap() >= 1);
            revoked.insert(sub, token);
        }
    }
    // Tokens with a valid signature but no session: must never pass.
    let now = unix_now();
    let unknown: Vec<String> = (0..10)
        .map(|i| {
            sign_raw(
                &keys.keys[0],
                &json!({"alg":"ES256","kid":"k1"}),
                &json!({"iss": cfg.issuer, "aud": "app", "sub": format!("user-{i}"), "jti": format!("forged-{i}"), "iat": now, "exp": now + 600}),
            )
        })
        .collect();

    // The master to kill, and a live subject on it revoked right before the kill.
    let victim = cluster.master_for_slot(subject_slot(&prefix, "failover", "user-0")).unwrap();
    let on_victim: Vec<String> =
        live.keys().filter(|s| victim.owns_slot(subject_slot(&prefix, "failover", s))).cloned().collect();
    assert!(on_victim.len() >= 2, "need live subjects on the victim master");
    let last_minute = on_victim[0].clone();
    let r = s.issuer_call("DELETE", &format!("/v1/subjects/{last_minute}/tokens"), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["replicas_confirmed"].as_i64().unwrap() >= 1, "acknowledged only after a replica has it");
    let last_token = live.remove(&last_minute).unwrap();
    revoked.insert(last_minute.clone(), last_token.clone());

    // Kill the master while a load loop runs.
    let killed_at = Instant::now();
    cluster.kill(&victim.addr).unwrap();
    let failover = tokio::task::spawn_blocking({
        let addr = victim.addr.clone();
        move || {
            let r = cluster.wait_failover(&addr, Duration::from_secs(30));
            (cluster, r)
        }
    });
    let mut bad_200 = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut saw_503 = 0;
    let mut counts: HashMap<StatusCode, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut recovered_at = None;
    while Instant::now() < deadline {
        for t in revoked.values().chain(unknown.iter()) {
            let started = Instant::now();
            let r = s.get("/x", Some(t)).await.unwrap();
            slowest = slowest.max(started.elapsed());
            *counts.entry(r.status).or_default() += 1;
            if r.status == StatusCode::OK {
                bad_200.push(t.clone());
            }
            if r.status == StatusCode::SERVICE_UNAVAILABLE {
                saw_503 += 1;
                assert_eq!(r.headers["retry-after"], "1");
            }
        }
        // Live tokens on the victim's slots: 503 while the slots have no master, then 200.
        let mut all_ok = true;
        for sub in &on_victim[1..] {
            let started = Instant::now();
            let r = s.get("/x", Some(&live[sub])).await.unwrap();
            slowest = slowest.max(started.elapsed());
            assert!(r.status == StatusCode::OK || r.status == StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
            all_ok &= r.status == StatusCode::OK;
        }
        if all_ok && saw_503 > 0 && recovered_at.is_none() {
            recovered_at = Some(killed_at.elapsed());
        }
        if recovered_at.is_some() && failover.is_finished() {
            break;
        }
    }
    let (cluster, new_master) = failover.await.unwrap();
    let new_master = new_master.unwrap();
    println!(
        "failover: new master {} after kill; sidecar recovered after {:?}; slowest answer {:?}; statuses {:?}",
        new_master.addr, recovered_at, slowest, counts
    );
    assert!(bad_200.is_empty(), "closed policy returned 200 for {} revoked/unknown tokens", bad_200.len());
    assert!(saw_503 > 0, "the failover should have been visible as 503s");
    assert!(slowest < Duration::from_millis(1500), "an answer took {slowest:?}: the Redis timeout must bound it");
    assert!(recovered_at.is_some(), "validation did not recover after failover");

    // After failover, without restarting the sidecar: everything answers as before.
    assert_eq!(s.pid(), pid);
    for t in live.values() {
        assert_eq!(s.get("/x", Some(t)).await.unwrap().status, StatusCode::OK);
    }
    for t in revoked.values().chain(unknown.iter()) {
        assert_eq!(s.get("/x", Some(t)).await.unwrap().status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        s.get("/x", Some(&last_token)).await.unwrap().status,
        StatusCode::UNAUTHORIZED,
        "the revocation acknowledged just before the kill survived the failover"
    );
    // The promoted master has no replica left: a session replacement cannot be made
    // durable, so it is not acknowledged (and says why).
    let r = s.issuer_call("POST", "/v1/tokens", Some(json!({"subject": on_victim[1]}))).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.json()["error"], "not_replicated");
    assert_eq!(r.json()["replicas_confirmed"], 0);
    // The old master rejoins as a replica: new sessions are acknowledged again.
    let mut cluster = cluster;
    cluster.restart(&victim.addr).unwrap();
    cluster.wait_replication(Duration::from_secs(30), Some(1)).unwrap();
    let mut attempts = 0;
    let t = loop {
        attempts += 1;
        match s.mint(&on_victim[1]).await {
            Ok(t) => break t,
            Err(e) if attempts < 40 => {
                eprintln!(
                    "attempt {attempts}: {e}; {}",
                    cluster.cli(&new_master.addr, &["INFO", "replication"]).unwrap().replace("\r\n", " ")
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    println!("mint acknowledged after the old master rejoined: {attempts} attempt(s)");
    assert_eq!(s.get("/x", Some(t["access_token"].as_str().unwrap())).await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_closed_and_open_policies() {
    let mut cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let seeds = cluster.seeds();
    for addr in &seeds {
        cluster.kill(addr).unwrap();
    }
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    let now = unix_now();
    let cfg = test_config("down", Some(seeds.clone()));
    let token = sign_raw(
        &keys.keys[0],
        &json!({"alg":"ES256","kid":"k1"}),
        &json!({"iss": cfg.issuer, "aud": "app", "sub": "u", "jti": "j", "iat": now, "exp": now + 600}),
    );

    // Closed (default): starts, not ready, 503 with Retry-After, never 200.
    let closed = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    let ready = closed.request(closed.admin, "GET", "/readyz", &[], Default::default()).await.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let started = Instant::now();
    let r = closed.get("/x", Some(&token)).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_secs(2));
    let r = closed.issuer_call("POST", "/v1/tokens", Some(json!({"subject": "u"}))).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "minting needs the session store");

    // Open: signature and claims only, counted.
    let mut open_cfg = cfg.clone();
    open_cfg.failure_policy = FailurePolicy::Open;
    let open = Sidecar::start(open_cfg, &keys, upstream.addr).await.unwrap();
    open.wait_ready(Duration::from_secs(5)).await.unwrap();
    assert_eq!(open.get("/x", Some(&token)).await.unwrap().status, StatusCode::OK);
    assert_eq!(open.get("/x", Some("bad.token.here")).await.unwrap().status, StatusCode::UNAUTHORIZED);
    let m = open.metrics().await.unwrap();
    let fail_open: f64 = m
        .lines()
        .find(|l| l.starts_with("authrealm_sidecar_fail_open_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(fail_open >= 1.0, "{m}");

    // The cluster comes back: the closed sidecar becomes ready without a restart.
    for addr in &seeds {
        cluster.restart(addr).unwrap();
    }
    cluster.wait_healthy(Duration::from_secs(30)).unwrap();
    closed.wait_ready(Duration::from_secs(30)).await.unwrap();
    let minted = closed.mint("u").await.unwrap();
    assert_eq!(closed.get("/x", Some(minted["access_token"].as_str().unwrap())).await.unwrap().status, StatusCode::OK);
    assert_eq!(closed.get("/x", Some(&token)).await.unwrap().status, StatusCode::UNAUTHORIZED, "unknown session");
}
