//! Revocation outlives acceptance, on every pod: two real sidecar processes whose wall clocks
//! differ by the realm's leeway (libfaketime), a real Redis Cluster (and the same against a
//! standalone Redis), and a `WAIT` that cannot count replicas that never saw the write.

use authrealm_contract::redis_keys::KeyLayout;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SessionMode, SidecarConfig};
use authrealm_tests::redis_backend::TestRedis;
use authrealm_tests::sidecar::{Sidecar, Upstream};
use authrealm_tests::support::wait_for_some;
use base64::Engine as _;
use http::StatusCode;
use serde_json::{Value, json};

const LEEWAY: u64 = 2;
/// The revoking/minting pod's clock runs this far ahead of the verifying pod's (= the leeway,
/// the most the realm allows).
const SKEW: i64 = LEEWAY as i64;

fn key_set() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Sleep until `ms` past the start of a (real) second.
async fn align_to_second(ms: i64) {
    let now = now_ms();
    let mut wait = (1000 + ms - now.rem_euclid(1000)).rem_euclid(1000);
    if wait < 50 {
        wait += 1000;
    }
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
}

fn denylist_config(redis: &TestRedis) -> SidecarConfig {
    let mut cfg = redis.config("clocks");
    cfg.session_mode = SessionMode::Denylist;
    cfg.leeway_seconds = LEEWAY;
    cfg.max_token_ttl_seconds = 120;
    cfg.token_ttl_seconds = 60;
    cfg
}

fn token(v: &Value) -> String {
    v["access_token"].as_str().unwrap().to_string()
}

/// Present `t` to every sidecar every 10 ms until real time `until_ms`; return every (pod, ms
/// since start, status) that was not 401.
async fn accepted_until(pods: &[&Sidecar], t: &str, until_ms: i64) -> Vec<(usize, i64, StatusCode)> {
    let mut bad = Vec::new();
    let start = now_ms();
    while now_ms() < until_ms {
        for (i, p) in pods.iter().enumerate() {
            let r = p.get("/x", Some(t)).await.unwrap();
            if r.status != StatusCode::UNAUTHORIZED {
                bad.push((i, now_ms() - start, r.status));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stays_refused_on_every_pod_until_it_expires_everywhere() {
    let cluster = tokio::task::spawn_blocking(TestRedis::cluster).await.unwrap().unwrap();
    revoked_until_expired_everywhere(&cluster).await;
}

/// The same on one standalone server (with a replica for `WAIT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stays_refused_on_every_pod_until_it_expires_everywhere_on_a_standalone_redis() {
    let server = tokio::task::spawn_blocking(|| TestRedis::standalone(1)).await.unwrap().unwrap();
    revoked_until_expired_everywhere(&server).await;
}

async fn revoked_until_expired_everywhere(redis: &TestRedis) {
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    let cfg = denylist_config(redis);
    // Pod A (issuer) runs SKEW seconds ahead of pod B and of this test.
    let a = Sidecar::start_with_clock(cfg.clone(), &keys, upstream.addr, SKEW).await.unwrap();
    let b = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    b.wait_ready(Duration::from_secs(20)).await.unwrap();

    // ---- revoke by jti right after minting, just past a second boundary (the whole-second
    // rounding window of the old TTL), then present the token on both pods until every pod
    // would refuse it as expired anyway.
    align_to_second(10).await;
    let m = a.mint_with(json!({"subject": "alice", "ttl_seconds": 2})).await.unwrap();
    let t = token(&m);
    assert_eq!(b.get("/x", Some(&t)).await.unwrap().status, StatusCode::OK, "valid on the skewed-behind pod");
    let r = a.issuer_call("DELETE", &format!("/v1/tokens/{}", m["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.json()["revoked"], true);
    // exp was written by A's clock; B (whose clock is the test's) accepts the token while its
    // clock reads at most exp + leeway: until real time exp + leeway + 1 s.
    let exp = m["expires_in"].as_i64().unwrap();
    let claims = decode_claims(&t);
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), exp);
    let b_accepts_until_ms = (claims["exp"].as_i64().unwrap() + LEEWAY as i64 + 1) * 1000;
    let bad = accepted_until(&[&a, &b], &t, b_accepts_until_ms + 500).await;
    assert!(
        bad.is_empty(),
        "a revoked token was accepted {} times (pod, ms after revocation, status): first {:?}, last {:?}",
        bad.len(),
        bad.first(),
        bad.last()
    );
    // Afterwards it is simply expired everywhere.
    assert_eq!(b.get("/x", Some(&t)).await.unwrap().status, StatusCode::UNAUTHORIZED);

    // ---- revoke-by-jti finds the token for as long as any pod accepts it: mint, wait until the
    // last second in which B still accepts it, then revoke through A.
    align_to_second(10).await;
    let m = a.mint_with(json!({"subject": "bob", "ttl_seconds": 1})).await.unwrap();
    let t = token(&m);
    let exp = decode_claims(&t)["exp"].as_i64().unwrap();
    // B's last accepting second starts at real exp + leeway.
    let last_second_ms = (exp + LEEWAY as i64) * 1000 + 200;
    tokio::time::sleep(Duration::from_millis((last_second_ms - now_ms()).max(0) as u64)).await;
    assert_eq!(b.get("/x", Some(&t)).await.unwrap().status, StatusCode::OK, "B still accepts the token");
    let r = a.issuer_call("DELETE", &format!("/v1/tokens/{}", m["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "revoke-by-jti must find a token some pod still accepts: {:?}", r.json());
    assert_eq!(b.get("/x", Some(&t)).await.unwrap().status, StatusCode::UNAUTHORIZED);

    // ---- log out everywhere, then mint in the same second: the new token works everywhere,
    // the old one is refused everywhere.
    let old = token(&a.mint("carol").await.unwrap());
    align_to_second(50).await;
    let r = a.issuer_call("DELETE", "/v1/subjects/carol/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    let fresh = a.mint("carol").await.unwrap();
    let fresh = token(&fresh);
    for (name, pod) in [("A", &a), ("B", &b)] {
        assert_eq!(pod.get("/x", Some(&fresh)).await.unwrap().status, StatusCode::OK, "fresh token on {name}");
        assert_eq!(pod.get("/x", Some(&old)).await.unwrap().status, StatusCode::UNAUTHORIZED, "old token on {name}");
    }
    // And it keeps working (it is not refused once the second turns).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.get("/x", Some(&fresh)).await.unwrap().status, StatusCode::OK);
}

fn decode_claims(t: &str) -> Value {
    let p = t.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// `WAIT` counts only writes made on its own connection. Kill the sidecar's connections to the
/// master while a `WAIT` blocks (its replica frozen): the client library reconnects and re-sends;
/// a `WAIT` re-sent alone would count the frozen replica at once (it never saw the write) and
/// the revocation would be reported "replicated".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_never_counts_replicas_that_missed_the_write() {
    let cluster = tokio::task::spawn_blocking(TestRedis::cluster).await.unwrap().unwrap();
    wait_never_counts_a_replica_that_missed_the_write(&cluster).await;
}

/// The same on a standalone server with one replica (its connection manager re-sends the write
/// with its `WAIT` after the kill, never the `WAIT` alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_never_counts_replicas_that_missed_the_write_on_a_standalone_redis() {
    let server = tokio::task::spawn_blocking(|| TestRedis::standalone(1)).await.unwrap().unwrap();
    wait_never_counts_a_replica_that_missed_the_write(&server).await;
}

async fn wait_never_counts_a_replica_that_missed_the_write(redis: &TestRedis) {
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set();
    for mode in [SessionMode::Single, SessionMode::Denylist] {
        let mut cfg = redis.config("waits");
        cfg.session_mode = mode;
        let r = cfg.redis.as_mut().unwrap();
        r.wait_replicas = 1;
        r.wait_timeout_ms = 1500;
        let prefix = r.key_prefix.clone();
        let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
        s.wait_ready(Duration::from_secs(20)).await.unwrap();
        let sub = format!("wait-{mode:?}");
        let m = s.mint(&sub).await.unwrap();
        let t = token(&m);

        let idx = KeyLayout::new(&prefix, "waits").index(&sub);
        let master = redis.node_for_key(&idx).unwrap();
        let replica = redis.replica_for_key(&idx).unwrap();
        redis.pause(&replica).unwrap();

        let jti = m["jti"].as_str().unwrap().to_string();
        let started = Instant::now();
        let revoke = {
            let (issuer, jti) = (s.issuer, jti.clone());
            tokio::spawn(async move {
                let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
                let req = http::Request::delete(format!("http://{issuer}/v1/tokens/{jti}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                let status = resp.status();
                let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
                (status, serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
            })
        };
        // While the WAIT blocks on the frozen replica (the master lists a client in WAIT), drop
        // every client connection of the master.
        wait_for_some("the revocation blocked in WAIT on the master", Duration::from_secs(10), || {
            let clients = redis.cli_at(&master, &["CLIENT", "LIST"]).unwrap_or_default();
            // A client blocked (flag b) in WAIT, not one whose last WAIT has returned.
            let blocked = clients.lines().any(|c| c.contains(" flags=b ") && c.contains(" cmd=wait "));
            async move { blocked.then_some(()) }
        })
        .await
        .unwrap();
        let killed = redis.cli_at(&master, &["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
        let (status, body) = revoke.await.unwrap();
        redis.resume(&replica).unwrap();
        eprintln!(
            "{mode:?}: killed {} connections; revoke answered {status} {body} after {:?}",
            killed.trim(),
            started.elapsed()
        );
        assert!(
            !(status == StatusCode::OK && body["replicas_confirmed"].as_i64().unwrap_or(0) >= 1),
            "{mode:?}: reported replicated while the only replica was frozen: {body}"
        );
        // Not done, retry: either the write was confirmed by no replica, or the cluster client
        // was still repairing its connections when the operation's deadline passed.
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{mode:?}: {body}");
        assert!(body["error"] == "not_replicated" || body["error"] == "temporarily_unavailable", "{mode:?}: {body}");
        // The revocation itself was applied on the master, and a retry once the replica is back
        // is acknowledged.
        assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::UNAUTHORIZED, "{mode:?}");
        redis.wait_replication(Duration::from_secs(20)).unwrap();
        let again = s.issuer_call("DELETE", &format!("/v1/tokens/{jti}"), None).await.unwrap();
        let again_json = again.json();
        if mode == SessionMode::Denylist {
            assert_eq!(again.status, StatusCode::OK, "{again_json}");
            assert!(again_json["replicas_confirmed"].as_i64().unwrap() >= 1, "{again_json}");
        } else {
            // Single mode deleted the record: the jti is still located, its record is gone.
            assert_eq!(again.status, StatusCode::OK, "{again_json}");
            assert_eq!(again_json["revoked"], false);
            assert!(again_json["replicas_confirmed"].as_i64().unwrap() >= 1, "{again_json}");
        }
    }
}
