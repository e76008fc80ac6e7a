//! Redis Cluster failure: a master killed while requests flow, and a cluster that is down
//! when the sidecar starts. Uses `--cluster-node-timeout 2000` so failover takes ~4 s
//! (the default 15 s would take ~17 s).

use authrealm_contract::redis_keys::KeyLayout;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, FailurePolicy, KeySet, KeyState};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions, key_slot};
use authrealm_tests::sidecar::{Sidecar, Upstream, sign_raw, test_config, unix_now};
use http::StatusCode;
use serde_json::json;

fn key_set() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    }
}

fn subject_slot(prefix: &str, realm: &str, sub: &str) -> u16 {
    key_slot(KeyLayout::new(prefix, realm).index(sub).as_bytes())
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

/// `WAIT` blocks the Redis connection it is sent on until replicas confirm or the timeout passes.
/// With a replica frozen, a revocation waits the full `waitTimeoutMs` — that must slow down only the
/// revocation, never the per-request session checks of other users on the same master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_slows_revocations_but_not_requests() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    cluster.wait_replication(Duration::from_secs(20), Some(1)).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    let mut cfg = test_config("frozen", Some(cluster.seeds()));
    {
        let r = cfg.redis.as_mut().unwrap();
        r.command_timeout_ms = 300;
        r.wait_timeout_ms = 1500; // WAIT outlasts the per-request timeout several times over
    }
    let prefix = cfg.redis.as_ref().unwrap().key_prefix.clone();
    let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();

    // Subjects whose records live on the same master as "reader-0".
    let master = cluster.master_for_slot(subject_slot(&prefix, "frozen", "reader-0")).unwrap();
    let same_master = |sub: &str| master.owns_slot(subject_slot(&prefix, "frozen", sub));
    let readers: Vec<String> = (0..200).map(|i| format!("reader-{i}")).filter(|s| same_master(s)).take(5).collect();
    let victim = (0..200).map(|i| format!("victim-{i}")).find(|s| same_master(s)).unwrap();
    let mut reader_tokens = Vec::new();
    for r in &readers {
        reader_tokens.push(s.mint(r).await.unwrap()["access_token"].as_str().unwrap().to_string());
    }
    let victim_token = s.mint(&victim).await.unwrap()["access_token"].as_str().unwrap().to_string();
    assert_eq!(s.get("/x", Some(&victim_token)).await.unwrap().status, StatusCode::OK);

    let replicas = cluster.replicas_of(&master.addr).unwrap();
    assert!(!replicas.is_empty());
    for r in &replicas {
        cluster.pause(&r.addr).unwrap();
    }
    let revoke = async {
        let started = Instant::now();
        let r = s.issuer_call("DELETE", &format!("/v1/subjects/{victim}/tokens"), None).await.unwrap();
        (r, started.elapsed())
    };
    let load = async {
        // Give the revocation a head start so its WAIT is in flight, then keep checking tokens of
        // other users on that master for as long as the WAIT can last.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let until = Instant::now() + Duration::from_millis(1600);
        let mut statuses: HashMap<StatusCode, u32> = HashMap::new();
        while Instant::now() < until {
            for t in &reader_tokens {
                *statuses.entry(s.get("/x", Some(t)).await.unwrap().status).or_default() += 1;
            }
        }
        statuses
    };
    let ((revoked, took), statuses) = tokio::join!(revoke, load);
    for r in &replicas {
        cluster.resume(&r.addr).unwrap();
    }
    println!(
        "revocation with frozen replica: {} after {took:?}; reader statuses meanwhile {statuses:?}",
        revoked.status
    );

    // The revocation could not be confirmed by a replica, and says so...
    assert_eq!(revoked.status, StatusCode::SERVICE_UNAVAILABLE, "{revoked:?}");
    assert_eq!(revoked.json()["error"], "not_replicated");
    assert_eq!(revoked.json()["replicas_confirmed"], 0);
    assert!(took >= Duration::from_millis(1400), "WAIT should have run to its timeout, took {took:?}");
    // ...while everyone else on that master was served normally the whole time.
    assert!(statuses.get(&StatusCode::OK).copied().unwrap_or(0) >= 5, "{statuses:?}");
    assert_eq!(statuses.len(), 1, "requests failed while a revocation waited for replicas: {statuses:?}");
    // The revocation itself took effect on the master at once.
    assert_eq!(s.get("/x", Some(&victim_token)).await.unwrap().status, StatusCode::UNAUTHORIZED);
}

/// A minted token's jti locator (what `DELETE /v1/tokens/{jti}` looks up) lives in the jti's own
/// slot, usually on another master than the subject's session. A mint is acknowledged only when
/// a replica holds both: a locator lost in a failover would make that token un-revocable by jti.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mint_is_acknowledged_only_when_its_jti_locator_is_replicated_too() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    cluster.wait_replication(Duration::from_secs(20), Some(1)).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let mut cfg = test_config("locator", Some(cluster.seeds()));
    cfg.redis.as_mut().unwrap().wait_timeout_ms = 300;
    let prefix = cfg.redis.as_ref().unwrap().key_prefix.clone();
    let s = Sidecar::start(cfg, &key_set(), upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();

    // The subject's records on one master; freeze the replica of a different master.
    let home = cluster.master_for_slot(subject_slot(&prefix, "locator", "alice")).unwrap();
    let other = cluster.masters().unwrap().into_iter().find(|m| m.addr != home.addr).unwrap();
    let frozen = cluster.replicas_of(&other.addr).unwrap();
    for r in &frozen {
        cluster.pause(&r.addr).unwrap();
    }
    let locator_slot = |jti: &str| key_slot(KeyLayout::new(&prefix, "locator").locator(jti).as_bytes());
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    for _ in 0..40 {
        let r = s.issuer_call("POST", "/v1/tokens", Some(json!({"subject": "alice"}))).await.unwrap();
        match r.status {
            StatusCode::CREATED => acknowledged.push(r.json()["jti"].as_str().unwrap().to_string()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.json()["error"], "not_replicated", "{r:?}");
                refused += 1;
            }
            other => panic!("unexpected mint answer {other}: {r:?}"),
        }
        if refused >= 2 && acknowledged.len() >= 2 {
            break;
        }
    }
    for r in &frozen {
        cluster.resume(&r.addr).unwrap();
    }
    println!(
        "mints with {}'s replica frozen: {} acknowledged, {refused} not_replicated",
        other.addr,
        acknowledged.len()
    );
    for jti in &acknowledged {
        assert!(
            !other.owns_slot(locator_slot(jti)),
            "mint of {jti} was acknowledged although its locator is on the master whose replica is frozen"
        );
    }
    assert!(refused >= 1, "no mint had its locator on the frozen replica's master in 40 tries");
    assert!(!acknowledged.is_empty(), "mints whose keys all had live replicas must be acknowledged");
}
