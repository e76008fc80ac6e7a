//! A standalone Redis (`redis.mode: standalone`) behind the real sidecar binary: kill -9 and
//! restart of the one server with the closed and the open failure policy (requests during the
//! outage answered by policy within the command timeout, the sidecar recovering by itself on the
//! same port, sessions and revocations made before honoured again thanks to appendonly), the
//! session cache across a restart that lost the data and across two pods, and `WAIT` without a
//! replica. The session-mode behaviour itself runs against a standalone server in
//! `sidecar_sessions.rs`.

use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, FailurePolicy, KeySet, KeyState, RedisMode, SessionMode, SidecarConfig};
use authrealm_tests::redis_standalone::{RedisStandalone, RedisStandaloneOptions};
use authrealm_tests::sidecar::{Sidecar, Upstream, metric_value, test_config};
use authrealm_tests::support::wait_for;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

const COMMAND_TIMEOUT_MS: u64 = 300;
const FAIL_OPEN: &str = "authrealm_sidecar_fail_open_total";
const HITS: &str = "authrealm_sidecar_session_cache_hits_total";
const FRESH: &str = "authrealm_sidecar_session_cache_masters_fresh";

fn key_set() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    }
}

fn config(redis: &RedisStandalone, realm: &str, policy: FailurePolicy, cache: bool) -> SidecarConfig {
    let mut cfg = test_config(realm, Some(redis.endpoints()));
    let r = cfg.redis.as_mut().unwrap();
    r.mode = RedisMode::Standalone;
    r.wait_replicas = 0;
    r.command_timeout_ms = COMMAND_TIMEOUT_MS;
    cfg.failure_policy = policy;
    cfg.session_cache.enabled = cache;
    cfg
}

fn token(v: &Value) -> String {
    v["access_token"].as_str().unwrap().to_string()
}

async fn status(s: &Sidecar, t: &str) -> StatusCode {
    s.get("/hello", Some(t)).await.unwrap().status
}

async fn ready(s: &Sidecar) -> StatusCode {
    s.request(s.admin, "GET", "/readyz", &[], Bytes::new()).await.unwrap().status
}

/// Requests with each token for `span`: every status seen, and the slowest answer.
async fn probe_outage(s: &Sidecar, tokens: &[&str], span: Duration) -> (Vec<StatusCode>, Duration) {
    let (mut seen, mut slowest) = (Vec::new(), Duration::ZERO);
    let end = Instant::now() + span;
    while Instant::now() < end {
        for t in tokens {
            let t0 = Instant::now();
            seen.push(status(s, t).await);
            slowest = slowest.max(t0.elapsed());
        }
    }
    (seen, slowest)
}

/// A server with appendonly and two sidecars on it: a `single` realm (alice active, bob logged
/// out) and a `denylist` realm (dan's token revoked by jti — its deny record is what a lost write
/// would bring back to life). Then the server is SIGKILLed and restarted on the same port.
async fn kill_and_restart(policy: FailurePolicy) {
    let mut redis = tokio::task::spawn_blocking(|| RedisStandalone::start(0)).await.unwrap().unwrap();
    let upstream = Upstream::start().await.unwrap();
    let realm = match policy {
        FailurePolicy::Closed => "closed",
        FailurePolicy::Open => "open",
    };
    let keys = key_set();
    let s = Sidecar::start(config(&redis, realm, policy, false), &keys, upstream.addr).await.unwrap();
    let mut deny_cfg = config(&redis, &format!("{realm}-deny"), policy, false);
    deny_cfg.session_mode = SessionMode::Denylist;
    let d = Sidecar::start(deny_cfg, &keys, upstream.addr).await.unwrap();
    for x in [&s, &d] {
        x.wait_ready(Duration::from_secs(20)).await.unwrap();
    }
    let alice = token(&s.mint("alice").await.unwrap());
    let bob = token(&s.mint("bob").await.unwrap());
    let r = s.issuer_call("DELETE", "/v1/subjects/bob/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let dan = d.mint("dan").await.unwrap();
    let r = d.issuer_call("DELETE", &format!("/v1/tokens/{}", dan["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let dan = token(&dan);
    assert_eq!(status(&s, &alice).await, StatusCode::OK);
    assert_eq!(status(&s, &bob).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&d, &dan).await, StatusCode::UNAUTHORIZED);
    let pid = s.pid();

    redis.kill().unwrap();
    let killed_at = Instant::now();
    let (mut seen, mut slowest) = probe_outage(&s, &[&alice, &bob], Duration::from_secs(2)).await;
    let (seen_d, slowest_d) = probe_outage(&d, &[&dan], Duration::from_secs(1)).await;
    seen.extend(seen_d);
    slowest = slowest.max(slowest_d);
    // A request during the outage is answered within the command timeout (plus the sidecar's own
    // work on a loaded machine), never left hanging.
    assert!(slowest < Duration::from_millis(COMMAND_TIMEOUT_MS + 1200), "slowest answer {slowest:?}");
    match policy {
        FailurePolicy::Closed => {
            // Never a 200 for a session whose state is unknown, not even for the first requests
            // after the kill; readiness drops.
            assert!(seen.iter().all(|c| *c == StatusCode::SERVICE_UNAVAILABLE), "{seen:?}");
            wait_for("/readyz 503", Duration::from_secs(5), || async {
                Ok((ready(&s).await == StatusCode::SERVICE_UNAVAILABLE).then_some(()))
            })
            .await
            .unwrap();
        }
        FailurePolicy::Open => {
            // Documented: signature and claims only, so a revoked session passes too while Redis
            // is down; counted.
            assert!(seen.iter().all(|c| *c == StatusCode::OK), "{seen:?}");
            let counted = metric_value(&s.metrics().await.unwrap(), FAIL_OPEN)
                + metric_value(&d.metrics().await.unwrap(), FAIL_OPEN);
            assert!(counted >= seen.len() as f64, "{counted} fail-open admissions counted of {}", seen.len());
            assert_eq!(ready(&s).await, StatusCode::OK, "open policy: ready while Redis is down");
        }
    }
    // Issuer writes need Redis under either policy.
    let r = s.issuer_call("POST", "/v1/tokens", Some(json!({ "subject": "carol" }))).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    let r = s.issuer_call("DELETE", "/v1/subjects/alice/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");

    tokio::task::block_in_place(|| redis.restart()).unwrap();
    let restarted_at = Instant::now();
    // The same sidecar processes recover on their own: sessions and revocations made before the
    // kill are honoured again (appendonly kept them).
    wait_for("alice's session accepted again", Duration::from_secs(15), || async {
        Ok((status(&s, &alice).await == StatusCode::OK).then_some(()))
    })
    .await
    .unwrap();
    let recovered = restarted_at.elapsed();
    assert_eq!(status(&s, &bob).await, StatusCode::UNAUTHORIZED, "a log-out made before the kill was undone");
    wait_for("dan's revocation honoured again", Duration::from_secs(15), || async {
        let code = status(&d, &dan).await;
        assert_ne!(code, StatusCode::OK, "a deny record written before the kill was lost");
        Ok((code == StatusCode::UNAUTHORIZED).then_some(()))
    })
    .await
    .unwrap();
    wait_for("/readyz 200", Duration::from_secs(5), || async { Ok((ready(&s).await == StatusCode::OK).then_some(())) })
        .await
        .unwrap();
    // Writes work again on the reconnected write connection.
    let carol = token(&s.mint("carol").await.unwrap());
    assert_eq!(status(&s, &carol).await, StatusCode::OK);
    let r = s.issuer_call("DELETE", "/v1/subjects/carol/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(status(&s, &carol).await, StatusCode::UNAUTHORIZED);
    assert_eq!(s.pid(), pid);
    eprintln!(
        "{realm}: outage of {:?} probed with {} requests (slowest {slowest:?}); accepted again {recovered:?} after the restart",
        restarted_at - killed_at,
        seen.len()
    );
}

/// A server that stops answering without closing its connections (SIGSTOP): requests are
/// answered by the closed policy within the command timeout, and served again once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_fails_closed_within_the_command_timeout() {
    let redis = tokio::task::spawn_blocking(|| RedisStandalone::start(0)).await.unwrap().unwrap();
    let upstream = Upstream::start().await.unwrap();
    let s = Sidecar::start(config(&redis, "frozen", FailurePolicy::Closed, false), &key_set(), upstream.addr)
        .await
        .unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let alice = token(&s.mint("alice").await.unwrap());
    assert_eq!(status(&s, &alice).await, StatusCode::OK);
    redis.pause().unwrap();
    let (seen, slowest) = probe_outage(&s, &[&alice], Duration::from_secs(2)).await;
    redis.resume().unwrap();
    assert!(seen.iter().all(|c| *c == StatusCode::SERVICE_UNAVAILABLE), "{seen:?}");
    assert!(slowest >= Duration::from_millis(COMMAND_TIMEOUT_MS), "{slowest:?}: answered before the timeout?");
    assert!(slowest < Duration::from_millis(COMMAND_TIMEOUT_MS + 1200), "slowest answer {slowest:?}");
    wait_for("served again after SIGCONT", Duration::from_secs(10), || async {
        Ok((status(&s, &alice).await == StatusCode::OK).then_some(()))
    })
    .await
    .unwrap();
    eprintln!("frozen server: {} requests answered 503, slowest {slowest:?}", seen.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_with_the_closed_policy() {
    kill_and_restart(FailurePolicy::Closed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_with_the_open_policy() {
    kill_and_restart(FailurePolicy::Open).await;
}

/// A sidecar started while its server is down (and password-protected) starts, reports not
/// ready, answers by policy, and becomes ready by itself once the server is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_its_server_becomes_ready_when_it_comes_up() {
    let opts = RedisStandaloneOptions { password: Some("s3cret-pw".into()), ..RedisStandaloneOptions::default() };
    let mut redis = tokio::task::spawn_blocking(move || RedisStandalone::start_with(opts)).await.unwrap().unwrap();
    redis.kill().unwrap();
    let upstream = Upstream::start().await.unwrap();
    let env = [("AUTHREALM_REDIS_PASSWORD", "s3cret-pw")];
    let s =
        Sidecar::start_with_env(config(&redis, "early", FailurePolicy::Closed, true), &key_set(), upstream.addr, &env)
            .await
            .unwrap();
    assert_eq!(ready(&s).await, StatusCode::SERVICE_UNAVAILABLE);
    let r = s.issuer_call("POST", "/v1/tokens", Some(json!({ "subject": "hal" }))).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    tokio::task::block_in_place(|| redis.restart()).unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let hal = token(&s.mint("hal").await.unwrap());
    assert_eq!(status(&s, &hal).await, StatusCode::OK);
    let r = s.issuer_call("DELETE", "/v1/subjects/hal/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(status(&s, &hal).await, StatusCode::UNAUTHORIZED);
    // The records are on the server, under the realm's prefix, written with the password.
    let prefix = s.config.redis.as_ref().unwrap().key_prefix.clone();
    let keys = redis.cli(&["KEYS", &format!("{prefix}*")]).unwrap();
    assert!(keys.contains("{early:"), "{keys}");
}

/// The session cache on one server: a revocation through one pod reaches the other pod's cache
/// through CLIENT TRACKING on that server; and a restart that lost every record (no persistence)
/// never leaves a cached "active" in use past `maxStalenessMs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cache_across_pods_and_a_restart_that_lost_the_data() {
    const BOUND_MS: u64 = 1000;
    let opts = RedisStandaloneOptions { appendonly: false, ..RedisStandaloneOptions::default() };
    let mut redis = tokio::task::spawn_blocking(move || RedisStandalone::start_with(opts)).await.unwrap().unwrap();
    let upstream = Upstream::start().await.unwrap();
    let mut cfg = config(&redis, "cached", FailurePolicy::Closed, true);
    cfg.session_cache.max_staleness_ms = BOUND_MS;
    let keys = key_set();
    let a = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    let b = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
    for s in [&a, &b] {
        s.wait_ready(Duration::from_secs(20)).await.unwrap();
        s.wait_metric(FRESH, |v| v >= 1.0).await;
    }

    // Across pods: B caches dave's session, A revokes it, B refuses it once the invalidation
    // arrives — well within the bound.
    let dave = token(&a.mint("dave").await.unwrap());
    let hits = metric_value(&b.metrics().await.unwrap(), HITS);
    for _ in 0..5 {
        assert_eq!(status(&b, &dave).await, StatusCode::OK);
    }
    assert!(metric_value(&b.metrics().await.unwrap(), HITS) > hits, "B's cache answered");
    let r = a.issuer_call("DELETE", "/v1/subjects/dave/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let revoked_at = Instant::now();
    loop {
        let code = status(&b, &dave).await;
        if code == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(code, StatusCode::OK);
        assert!(revoked_at.elapsed() < Duration::from_millis(BOUND_MS), "revoked session admitted past the bound");
    }
    let invalidation = revoked_at.elapsed();

    // A restart without persistence: every session is gone. B had erin's session cached.
    let erin = token(&a.mint("erin").await.unwrap());
    for _ in 0..5 {
        assert_eq!(status(&b, &erin).await, StatusCode::OK);
    }
    let flushes = |text: &str| {
        metric_value(text, "authrealm_sidecar_session_cache_flushes_total{reason=\"disconnect\"}")
            + metric_value(text, "authrealm_sidecar_session_cache_flushes_total{reason=\"connect\"}")
    };
    let flushes_before = flushes(&b.metrics().await.unwrap());
    tokio::task::block_in_place(|| {
        redis.kill()?;
        redis.restart()
    })
    .unwrap();
    let restarted_at = Instant::now();
    let mut seen = Vec::new();
    let accepted_again = loop {
        let code = status(&b, &erin).await;
        let at = restarted_at.elapsed();
        seen.push((at, code));
        if code == StatusCode::UNAUTHORIZED {
            break at;
        }
        assert!(
            code == StatusCode::SERVICE_UNAVAILABLE
                || (code == StatusCode::OK && at <= Duration::from_millis(BOUND_MS)),
            "a lost session was still admitted {at:?} after the restart (bound {BOUND_MS} ms): {seen:?}"
        );
        assert!(at < Duration::from_secs(15), "the sidecar did not recover: {seen:?}");
    };
    // Refused from then on, by both pods; the cache was flushed when its tracking connection was
    // lost and re-made.
    for s in [&a, &b] {
        assert_eq!(status(s, &erin).await, StatusCode::UNAUTHORIZED);
    }
    assert!(flushes(&b.metrics().await.unwrap()) > flushes_before, "no flush on reconnect");
    // And the cache is used again once its tracking connection to the restarted server is up
    // and confirmed by a heartbeat.
    let fay = token(&a.mint("fay").await.unwrap());
    let hits = metric_value(&b.metrics().await.unwrap(), HITS);
    wait_for("session cache hits on the restarted server", Duration::from_secs(10), || async {
        assert_eq!(status(&b, &fay).await, StatusCode::OK);
        Ok((metric_value(&b.metrics().await?, HITS) > hits).then_some(()))
    })
    .await
    .unwrap();
    eprintln!(
        "session cache on a standalone Redis: cross-pod revocation refused after {invalidation:?}; \
         a lost session refused {accepted_again:?} after the restart ({} probes)",
        seen.len()
    );
}

/// `WAIT` semantics are the cluster's: `waitReplicas: 1` with no replica → 503 not_replicated;
/// with a replica → confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_replicas_without_a_replica_is_not_replicated() {
    let (lonely, replicated) =
        tokio::task::spawn_blocking(|| (RedisStandalone::start(0), RedisStandalone::start(1))).await.unwrap();
    let (lonely, replicated) = (lonely.unwrap(), replicated.unwrap());
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    for (redis, replicas) in [(&lonely, 0), (&replicated, 1)] {
        let mut cfg = config(redis, "waited", FailurePolicy::Closed, false);
        cfg.redis.as_mut().unwrap().wait_replicas = 1;
        cfg.redis.as_mut().unwrap().wait_timeout_ms = 200;
        let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
        s.wait_ready(Duration::from_secs(20)).await.unwrap();
        let r = s.issuer_call("POST", "/v1/tokens", Some(json!({ "subject": "gus" }))).await.unwrap();
        if replicas == 0 {
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
            assert_eq!(r.json()["error"], "not_replicated");
            assert_eq!(r.json()["replicas_confirmed"], 0);
            assert_eq!(r.json()["replicas_required"], 1);
            let r = s.issuer_call("DELETE", "/v1/subjects/gus/tokens", None).await.unwrap();
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
            assert_eq!(r.json()["error"], "not_replicated");
        } else {
            assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
            assert_eq!(r.json()["replicas_confirmed"], 1);
            let t = token(&r.json());
            assert_eq!(status(&s, &t).await, StatusCode::OK);
            // The record reached the replica.
            let key_count = redis.cli_at(&redis.replica_addrs()[0], &["DBSIZE"]).unwrap();
            assert!(key_count.trim().parse::<u64>().unwrap() >= 2, "replica holds {key_count} keys");
        }
    }
}

/// A config that names two endpoints in standalone mode is refused at start, naming the field.
#[test]
fn standalone_takes_exactly_one_endpoint() {
    let mut cfg = test_config("two", Some(vec!["127.0.0.1:6379".into(), "127.0.0.1:6380".into()]));
    cfg.redis.as_mut().unwrap().mode = RedisMode::Standalone;
    let e = cfg.validate().unwrap_err();
    assert_eq!(e.field, "redis.endpoints");
    let dir = std::env::temp_dir().join(format!("authrealm-standalone-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sidecar.json");
    std::fs::write(&path, cfg.to_json_pretty()).unwrap();
    let out = std::process::Command::new(authrealm_tests::sidecar::sidecar_bin().unwrap())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("redis.endpoints"), "{stderr}");
}
