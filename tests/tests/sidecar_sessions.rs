//! Session modes through the real sidecar binary, against a real Redis Cluster and against a
//! real standalone Redis (`redis.mode: standalone`, one replica for `WAIT`): the same test body
//! for both.

use authrealm_contract::redis_keys::KeyLayout;
use std::time::Duration;

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SessionMode};
use authrealm_tests::redis_backend::TestRedis;
use authrealm_tests::sidecar::{Sidecar, Upstream, test_config};
use http::StatusCode;
use serde_json::json;

fn key_set(alg: Alg) -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(alg, "k1", 0, KeyState::Current).unwrap()],
    }
}

fn token(v: &serde_json::Value) -> String {
    v["access_token"].as_str().unwrap().to_string()
}

async fn mint_spaced(s: &Sidecar, subject: &str, n: usize, ttl: u64) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(s.mint_with(json!({ "subject": subject, "ttl_seconds": ttl })).await.unwrap());
        // Distinct expiry seconds, so "expires first" is well defined.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    out
}

async fn statuses(s: &Sidecar, minted: &[serde_json::Value]) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for m in minted {
        out.push(status(s, &token(m)).await);
    }
    out
}

async fn status(s: &Sidecar, t: &str) -> StatusCode {
    s.get("/hello", Some(t)).await.unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_modes_against_a_real_cluster() {
    let redis = tokio::task::spawn_blocking(TestRedis::cluster).await.unwrap().unwrap();
    session_modes(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_modes_against_a_standalone_redis() {
    let redis = tokio::task::spawn_blocking(|| TestRedis::standalone(1)).await.unwrap().unwrap();
    session_modes(&redis).await;
}

async fn session_modes(redis: &TestRedis) {
    let upstream = Upstream::start().await.unwrap();
    let keys = key_set(Alg::ES256);

    // ---- single: one active token per subject; identity headers; spoofing ----
    let s = Sidecar::start(redis.config("single"), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let first = s.mint("alice").await.unwrap();
    assert_eq!(first["token_type"], "Bearer");
    assert!(first["replicas_confirmed"].as_i64().unwrap() >= 1, "{first}");
    let t1 = token(&first);
    let r = s
        .request(
            s.public,
            "GET",
            "/hello",
            &[
                ("authorization", &format!("Bearer {t1}")),
                ("x-auth-subject", "mallory"),
                ("X_Auth_Subject", "mallory"),
                ("x-AUTH-jti", "forged"),
                ("connection", "x-auth-subject, x-auth-jti"),
            ],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let seen = upstream.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers.get_all("x-auth-subject").iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(last.headers.get_all("x-auth-jti").iter().collect::<Vec<_>>(), [first["jti"].as_str().unwrap()]);
    assert!(
        last.headers.keys().all(|k| !k.as_str().contains('_')),
        "underscore variant reached the app: {:?}",
        last.headers
    );
    assert!(last.headers.get("x-forwarded-for").is_some());
    assert_eq!(last.headers.get("x-forwarded-proto").unwrap(), "http");
    assert!(last.headers.get("connection").is_none_or(|v| !v.to_str().unwrap().contains("x-auth")));

    let second = token(&s.mint("alice").await.unwrap());
    assert_eq!(status(&s, &t1).await, StatusCode::UNAUTHORIZED, "single mode: the first token must be replaced");
    assert_eq!(status(&s, &second).await, StatusCode::OK);
    // A token the realm's sidecars would reject as too large is never issued, and asking for one
    // does not end the current session.
    let huge = json!({ "subject": "alice", "claims": { "blob": "x".repeat(9000) } });
    let r = s.issuer_call("POST", "/v1/tokens", Some(huge)).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(status(&s, &second).await, StatusCode::OK, "a refused mint must not replace the session");
    let r = s.get("/hello", Some(&t1)).await.unwrap();
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"single\", error=\"invalid_token\"");
    let bob = token(&s.mint("bob").await.unwrap());
    let r = s.issuer_call("DELETE", "/v1/subjects/alice/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(status(&s, &second).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&s, &bob).await, StatusCode::OK, "revoking alice must not touch bob");

    // Introspection (RFC 7662 shape).
    let r = s.issuer_call("POST", "/v1/introspect", Some(json!({ "token": bob }))).await.unwrap();
    assert_eq!(r.json()["active"], true);
    assert_eq!(r.json()["sub"], "bob");
    let r = s.issuer_call("POST", "/v1/introspect", Some(json!({ "token": second }))).await.unwrap();
    assert_eq!(r.json(), json!({ "active": false }));

    // Reserved claims cannot be overridden; unknown fields rejected; TTL bounded.
    for body in [
        json!({ "subject": "x", "claims": { "exp": 1 } }),
        json!({ "subject": "x", "claims": { "iss": "evil" } }),
        json!({ "subject": "x", "claims": { "jti": "mine" } }),
        json!({ "subject": "x", "ttl_seconds": 999_999 }),
        json!({ "subject": "x", "audience": "not-ours" }),
        json!({ "subject": "" }),
        json!({ "subjects": "x" }),
    ] {
        let r = s.issuer_call("POST", "/v1/tokens", Some(body.clone())).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body} → {r:?}");
    }
    let custom =
        s.mint_with(json!({ "subject": "carol", "claims": { "role": "admin" }, "ttl_seconds": 60 })).await.unwrap();
    assert_eq!(custom["expires_in"], 60);

    // Subjects spread over all three masters of a cluster: the records really are in Redis, on
    // the master that owns each subject's slot (on the one server, standalone).
    let mut masters = std::collections::BTreeSet::new();
    let prefix = s.config.redis.as_ref().unwrap().key_prefix.clone();
    for i in 0..30 {
        let sub = format!("user-{i}");
        let minted = s.mint(&sub).await.unwrap();
        let key = KeyLayout::new(&prefix, "single").token(&sub, minted["jti"].as_str().unwrap());
        let owner = redis.node_for_key(&key).unwrap();
        let exists = redis.cli_for_key(&key, &["EXISTS", &key]).unwrap();
        assert_eq!(exists.trim(), "1", "session record of {sub} not on {owner}");
        let ttl: i64 = redis.cli_for_key(&key, &["TTL", &key]).unwrap().trim().parse().unwrap();
        assert!(ttl > 800 && ttl <= 900, "record TTL must equal the token's remaining life, got {ttl}");
        let value = redis.cli_for_key(&key, &["GET", &key]).unwrap();
        assert!(!value.contains('.'), "no token material in Redis: {value}");
        masters.insert(owner);
    }
    assert_eq!(masters.len(), redis.data_nodes(), "subjects should land on every master: {masters:?}");
    drop(s);

    // ---- multi: many tokens per subject, revoke one, then all ----
    let mut cfg = redis.config("multi");
    cfg.session_mode = SessionMode::Multi;
    cfg.max_sessions_per_subject = 3;
    let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let a = s.mint("alice").await.unwrap();
    let b = s.mint("alice").await.unwrap();
    let c = s.mint("alice").await.unwrap();
    for t in [&a, &b, &c] {
        assert_eq!(status(&s, &token(t)).await, StatusCode::OK);
    }
    let r = s.issuer_call("DELETE", &format!("/v1/tokens/{}", a["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json()["revoked"], true);
    assert!(r.json()["replicas_confirmed"].as_i64().unwrap() >= 1);
    assert_eq!(status(&s, &token(&a)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&s, &token(&b)).await, StatusCode::OK, "revoking one token leaves the others");
    let r = s.issuer_call("DELETE", "/v1/tokens/no-such-jti", None).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = s.issuer_call("DELETE", "/v1/subjects/alice/tokens", None).await.unwrap();
    assert_eq!(r.json()["revoked"], 2);
    assert_eq!(status(&s, &token(&b)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&s, &token(&c)).await, StatusCode::UNAUTHORIZED);

    // At most maxSessionsPerSubject (3 here) live sessions: a 4th ends the one expiring first,
    // never the one just minted (even when it is the shortest-lived).
    let long: Vec<_> = mint_spaced(&s, "ivan", 3, 600).await;
    let short = s.mint_with(json!({ "subject": "ivan", "ttl_seconds": 60 })).await.unwrap();
    assert_eq!(short["replaced_sessions"], 1, "{short}");
    assert_eq!(status(&s, &token(&short)).await, StatusCode::OK, "the new session is never the one evicted");
    let alive: Vec<StatusCode> = statuses(&s, &long).await;
    assert_eq!(alive.iter().filter(|c| **c == StatusCode::OK).count(), 2, "{alive:?}");
    assert_eq!(alive[0], StatusCode::UNAUTHORIZED, "the oldest long session made room: {alive:?}");
    drop(s);

    // ---- denylist: tokens minted elsewhere with the realm's key are accepted ----
    let mut cfg = redis.config("deny");
    cfg.session_mode = SessionMode::Denylist;
    let s = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let now = authrealm_tests::sidecar::unix_now();
    let foreign = authrealm_tests::sidecar::sign_raw(
        &keys.keys[0],
        &json!({"alg":"ES256","kid":"k1","typ":"JWT"}),
        &json!({"iss": cfg.issuer, "aud": "app", "sub": "dave", "jti": "elsewhere-1", "iat": now - 5, "exp": now + 300}),
    );
    assert_eq!(status(&s, &foreign).await, StatusCode::OK, "denylist accepts tokens minted elsewhere");
    let r = s.issuer_call("DELETE", "/v1/tokens/elsewhere-1?subject=dave", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(status(&s, &foreign).await, StatusCode::UNAUTHORIZED);
    let e1 = token(&s.mint("erin").await.unwrap());
    assert_eq!(status(&s, &e1).await, StatusCode::OK);
    let r = s.issuer_call("DELETE", "/v1/subjects/erin/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(status(&s, &e1).await, StatusCode::UNAUTHORIZED, "log out everywhere in denylist mode");

    // Deny records live as long as a realm token can: a foreign token that would outlive its
    // revocation record (exp - iat beyond maxTokenTtlSeconds + leeway) is refused outright.
    let max = cfg.max_token_ttl_seconds as i64 + cfg.leeway_seconds as i64;
    let foreign_with = |sub: &str, jti: &str, iat: i64, exp: i64| {
        authrealm_tests::sidecar::sign_raw(
            &keys.keys[0],
            &json!({"alg":"ES256","kid":"k1"}),
            &json!({"iss": cfg.issuer, "aud": "app", "sub": sub, "jti": jti, "iat": iat, "exp": exp}),
        )
    };
    assert_eq!(status(&s, &foreign_with("dave", "f-max", now, now + max)).await, StatusCode::OK);
    assert_eq!(status(&s, &foreign_with("dave", "f-long", now, now + max + 1)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&s, &foreign_with("dave", "f-day", now, now + 86_400)).await, StatusCode::UNAUTHORIZED);
    let r = s.issuer_call("DELETE", "/v1/tokens/f-max?subject=dave", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let prefix = &cfg.redis.as_ref().unwrap().key_prefix;
    let b64 = |v: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v);
    let deny_key = format!("{prefix}{{deny:{}}}:d:{}", b64("dave"), b64("f-max"));
    let ttl: i64 = redis.cli_for_key(&deny_key, &["TTL", &deny_key]).unwrap().trim().parse().unwrap();
    assert!(ttl > max + cfg.leeway_seconds as i64 - 5, "deny record outlives the token it denies: ttl {ttl}");

    // The log-out cut-off only moves forward: a later log-out from a pod whose clock is behind
    // (here: a cut-off 5 s in the future already stored) does not revive tokens.
    let cut_key = format!("{prefix}{{deny:{}}}:cut", b64("hana"));
    let ahead = (now + 5).to_string();
    redis.cli_for_key(&cut_key, &["SET", &cut_key, &ahead, "EX", "600"]).unwrap();
    let h = foreign_with("hana", "h-1", now + 3, now + 300);
    assert_eq!(status(&s, &h).await, StatusCode::UNAUTHORIZED, "issued before the stored cut-off");
    let r = s.issuer_call("DELETE", "/v1/subjects/hana/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(redis.cli_for_key(&cut_key, &["GET", &cut_key]).unwrap().trim(), ahead);
    assert_eq!(status(&s, &h).await, StatusCode::UNAUTHORIZED, "a later, earlier-clocked log-out revived a token");

    // Identities reach the app exactly or not at all: " dave" would be read back as "dave".
    let spaced = foreign_with(" dave", "sp-1", now, now + 300);
    assert_eq!(status(&s, &spaced).await, StatusCode::UNAUTHORIZED);
    let accented = foreign_with("jos\u{e9}", "sp-2", now, now + 300);
    assert_eq!(status(&s, &accented).await, StatusCode::UNAUTHORIZED);
    for subject in [" dave", "dave ", "jos\u{e9}"] {
        let r = s.issuer_call("POST", "/v1/tokens", Some(json!({ "subject": subject }))).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{subject:?}: {r:?}");
    }
    drop(s);

    // ---- stateless: signature and claims only; revocation refused ----
    let s = Sidecar::start(test_config("nostate", None), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(5)).await.unwrap();
    let t = s.mint("frank").await.unwrap();
    assert_eq!(status(&s, &token(&t)).await, StatusCode::OK);
    let r = s.issuer_call("DELETE", &format!("/v1/tokens/{}", t["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT);
    drop(s);

    // ---- verify-only sidecar: public keys only → cannot mint, still verifies ----
    let issuer = Sidecar::start(redis.config("single"), &keys, upstream.addr).await.unwrap();
    let verifier = Sidecar::start(redis.config("single"), &keys.public_only(), upstream.addr).await.unwrap();
    verifier.wait_ready(Duration::from_secs(20)).await.unwrap();
    issuer.wait_ready(Duration::from_secs(20)).await.unwrap();
    let r = verifier.issuer_call("POST", "/v1/tokens", Some(json!({ "subject": "x" }))).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let t = token(&issuer.mint("gina").await.unwrap());
    assert_eq!(status(&verifier, &t).await, StatusCode::OK, "a verify-only pod accepts the issuer pod's tokens");
    issuer.issuer_call("DELETE", "/v1/subjects/gina/tokens", None).await.unwrap();
    // The verifier's session cache (on by default) learns of the revocation from Redis's
    // invalidation push, which can trail the issuer's answer; the documented bound is the
    // cache's maxStalenessMs (1 s by default).
    let revoked_at = std::time::Instant::now();
    let mut last = status(&verifier, &t).await;
    while last != StatusCode::UNAUTHORIZED && revoked_at.elapsed() < Duration::from_millis(1000) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        last = status(&verifier, &t).await;
    }
    assert_eq!(last, StatusCode::UNAUTHORIZED, "revocation at one pod takes effect at every pod within the bound");
    let jwks = verifier.get("/.well-known/jwks.json", None).await.unwrap();
    assert_eq!(jwks.status, StatusCode::OK);
    assert_eq!(jwks.json()["keys"][0]["kid"], "k1");
    assert!(jwks.json()["keys"][0].get("d").is_none());
}
