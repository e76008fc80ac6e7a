//! External identity providers: the real sidecar binary trusting the tests' own OIDC provider
//! (`authrealm_tests::oidc_idp`: HTTPS with its own CA, discovery, JWKS, rotation, outages).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::{generate, random_kid};
use authrealm_contract::{Alg, ExternalIssuer, KeySet, KeyState, SessionMode, SidecarConfig};
use authrealm_tests::oidc_idp::{Mode, TestIdp};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use authrealm_tests::sidecar::{Sidecar, Upstream, metric_value, sign_raw, test_config};
use authrealm_tests::support::{unix_now, wait_for, wait_for_some};
use http::StatusCode;
use serde_json::{Value, json};

fn own_keys() -> KeySet {
    KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "own", 0, KeyState::Current).unwrap()],
    }
}

/// An external issuer entry for `idp` through its discovery document, trusting its CA.
fn via_discovery(idp: &TestIdp, algs: Vec<Alg>) -> ExternalIssuer {
    let mut x = ExternalIssuer::new(&idp.issuer, Some(idp.discovery_url()), None);
    x.audiences = vec!["api".into()];
    x.algorithms = algs;
    x.ca_file = Some(idp.ca_file.to_string_lossy().into_owned());
    x
}

fn stateless(externals: Vec<ExternalIssuer>) -> SidecarConfig {
    let mut cfg = test_config("ext", None);
    cfg.session_mode = SessionMode::Stateless;
    cfg.external_issuers = externals;
    cfg
}

async fn status(s: &Sidecar, t: &str) -> StatusCode {
    s.get("/hello", Some(t)).await.unwrap().status
}

fn metric(text: &str, name: &str) -> f64 {
    metric_value(text, name)
}

fn fetches(text: &str, issuer: &str, trigger: &str, result: &str) -> f64 {
    metric(
        text,
        &format!(
            "authrealm_sidecar_jwks_fetches_total{{issuer=\"{issuer}\",trigger=\"{trigger}\",result=\"{result}\"}}"
        ),
    )
}

/// Wait until `t` is answered `want`.
async fn wait_status(s: &Sidecar, t: &str, want: StatusCode, within: Duration) {
    wait_for_some(&format!("{want} for the token"), within, || async { (status(s, t).await == want).then_some(()) })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_tokens_accepted_and_every_mismatch_refused() {
    let upstream = Upstream::start().await.unwrap();
    let rsa = TestIdp::start(Alg::RS256).await.unwrap();
    let ec = TestIdp::start(Alg::ES256).await.unwrap();
    // RSA: discovery, subject `sub`. EC: a direct JWKS URL, subject `email`, with hostile entries
    // next to its real key.
    let mut by_jwks = ExternalIssuer::new(&ec.issuer, None, Some(ec.jwks_url()));
    by_jwks.audiences = vec!["api".into(), "other-api".into()];
    by_jwks.algorithms = vec![Alg::ES256];
    by_jwks.subject_claim = "email".into();
    by_jwks.ca_file = Some(ec.ca_file.to_string_lossy().into_owned());
    let dup = {
        let mut d = ec.published()["keys"][0].clone();
        d["x"] = rsa.published()["keys"][0]["n"].clone();
        d
    };
    ec.set_extra_jwks_entries(vec![
        json!({"kty": "oct", "kid": "shared", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}),
        json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        json!({"kty": "RSA", "kid": "tiny", "n": "AQAB", "e": "AQAB"}),
        json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
        json!("not a key"),
        dup,
    ]);
    let keys = own_keys();
    let s = Sidecar::start(stateless(vec![via_discovery(&rsa, vec![Alg::RS256]), by_jwks]), &keys, upstream.addr)
        .await
        .unwrap();

    // Accepted: the identity comes from each issuer's subject claim.
    let t_rsa = rsa.token("alice", "api", 300);
    wait_status(&s, &t_rsa, StatusCode::OK, Duration::from_secs(10)).await;
    assert_eq!(upstream.seen().last().unwrap().headers["x-auth-subject"], "alice");
    let t_ec = ec.token("bob", "other-api", 300);
    assert_eq!(status(&s, &t_ec).await, StatusCode::OK);
    assert_eq!(upstream.seen().last().unwrap().headers["x-auth-subject"], "bob@idp.example");
    // The realm's own tokens still work beside them.
    let own = sign_raw(
        &keys.keys[0],
        &json!({"alg": "ES256", "kid": "own"}),
        &json!({"iss": s.config.issuer, "aud": "app", "sub": "carol", "iat": unix_now(), "exp": unix_now() + 60}),
    );
    assert_eq!(status(&s, &own).await, StatusCode::OK);
    let m = s.metrics().await.unwrap();
    let ec_label = format!("{{issuer=\"{}\"}}", ec.issuer);
    assert_eq!(metric(&m, &format!("authrealm_sidecar_jwks_keys{ec_label}")), 1.0, "{m}");
    assert_eq!(metric(&m, &format!("authrealm_sidecar_jwks_keys_skipped{ec_label}")), 6.0, "{m}");

    // Refused, each for its own reason.
    let now = unix_now();
    let mut claims = rsa.claims("alice", "api", 300);
    let with = |over: Value| {
        let mut c = claims.clone();
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let rsa_key = rsa.current_key();
    let ec_key = ec.current_key();
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown issuer", rsa.sign(&with(json!({"iss": "https://idp.evil.example"}))), "wrong_issuer"),
        ("issuer spelled with a slash", rsa.sign(&with(json!({"iss": format!("{}/", rsa.issuer)}))), "wrong_issuer"),
        ("audience of another service", rsa.sign(&with(json!({"aud": "billing"}))), "wrong_audience"),
        ("audience of the other issuer", rsa.sign(&with(json!({"aud": "other-api"}))), "wrong_audience"),
        ("expired", rsa.sign(&with(json!({"exp": now - 120, "iat": now - 400}))), "expired"),
        // The EC provider's key, naming the RSA provider as issuer: its kid is looked up only in
        // the RSA provider's set.
        (
            "a key of another issuer",
            sign_raw(&ec_key, &json!({"alg": "ES256", "kid": ec_key.kid}), &with(json!({}))),
            "alg_not_allowed",
        ),
        (
            "another issuer's kid with an allowed alg",
            sign_raw(&rsa_key, &json!({"alg": "RS256", "kid": ec_key.kid}), &with(json!({}))),
            "unknown_kid",
        ),
        (
            "the realm's own key claiming the IdP",
            sign_raw(&keys.keys[0], &json!({"alg": "ES256", "kid": "own"}), &with(json!({}))),
            "alg_not_allowed",
        ),
        (
            "RS512 (not in the allow-list) with the right key",
            sign_raw(
                &authrealm_contract::KeyEntry { alg: Alg::RS512, ..rsa_key.clone() },
                &json!({"alg": "RS512", "kid": rsa_key.kid}),
                &with(json!({})),
            ),
            "alg_not_allowed",
        ),
        (
            "alg none",
            format!("{}.c2ln", unsigned(&json!({"alg": "none", "kid": rsa_key.kid}), &with(json!({})))),
            "alg_not_allowed",
        ),
        (
            "HS256 keyed with the public modulus",
            hs256_with(rsa.published()["keys"][0]["n"].as_str().unwrap(), &rsa_key.kid, &with(json!({}))),
            "alg_not_allowed",
        ),
        (
            "jku pointing elsewhere",
            sign_raw(
                &rsa_key,
                &json!({"alg": "RS256", "kid": rsa_key.kid, "jku": "https://evil/jwks"}),
                &with(json!({})),
            ),
            "forbidden_header",
        ),
        (
            "the EC issuer's symmetric entry",
            hs256_with("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "shared", &{
                let mut c = claims.clone();
                c["iss"] = ec.issuer.clone().into();
                c
            }),
            "alg_not_allowed",
        ),
        (
            "tampered payload",
            {
                let t = rsa.sign(&with(json!({})));
                let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
                parts[1] = b64(&with(json!({"sub": "admin"})).to_string());
                parts.join(".")
            },
            "bad_signature",
        ),
    ];
    for (name, token, reason) in &cases {
        let before = metric(
            &s.metrics().await.unwrap(),
            &format!("authrealm_sidecar_requests_total{{outcome=\"rejected\",reason=\"{reason}\"}}"),
        );
        let r = s.get("/hello", Some(token)).await.unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}");
        let after = metric(
            &s.metrics().await.unwrap(),
            &format!("authrealm_sidecar_requests_total{{outcome=\"rejected\",reason=\"{reason}\"}}"),
        );
        assert_eq!(after, before + 1.0, "{name}: rejected for another reason than {reason}");
    }
    // Claims the subject mapping needs: an EC token without `email` has no subject.
    claims = ec.claims("dave", "api", 300);
    claims.as_object_mut().unwrap().remove("email");
    assert_eq!(status(&s, &ec.sign(&claims)).await, StatusCode::OK, "stateless realms need no subject");
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.{}", b64(&header.to_string()), b64(&claims.to_string()))
}

fn hs256_with(secret_b64: &str, kid: &str, claims: &Value) -> String {
    let input = unsigned(&json!({"alg": "HS256", "kid": kid}), claims);
    let key = jsonwebtoken::EncodingKey::from_secret(secret_b64.as_bytes());
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).unwrap();
    format!("{input}.{sig}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_accepted_within_the_bound_and_a_kid_flood_is_rate_limited() {
    const MIN_REFETCH_MS: u64 = 2000;
    let upstream = Upstream::start().await.unwrap();
    let idp = TestIdp::start(Alg::RS256).await.unwrap();
    let mut x = via_discovery(&idp, vec![Alg::RS256]);
    x.min_refetch_interval_ms = MIN_REFETCH_MS;
    let s = Arc::new(Sidecar::start(stateless(vec![x]), &own_keys(), upstream.addr).await.unwrap());
    let first = idp.token("alice", "api", 300);
    wait_status(&s, &first, StatusCode::OK, Duration::from_secs(10)).await;
    assert_eq!(idp.discovery_fetches(), 1, "discovery is read once and cached");

    // The IdP rotates: a token of the new key, used well after the last fetch, is accepted on its
    // very first request (the request waits for the refetch it caused).
    tokio::time::sleep(Duration::from_millis(MIN_REFETCH_MS + 200)).await;
    let new_kid = idp.rotate();
    let rotated = idp.token("alice", "api", 300);
    let t0 = Instant::now();
    assert_eq!(status(&s, &rotated).await, StatusCode::OK);
    let first_use_ms = t0.elapsed().as_millis();
    assert_ne!(new_kid, idp.published()["keys"][0]["kid"]);
    assert_eq!(status(&s, &first).await, StatusCode::OK, "the old key is still published");
    // Rotated right after a fetch: refused at once until the minimum interval has passed, then
    // accepted — never later than minRefetchIntervalMs after the previous fetch.
    let _ = idp.rotate();
    let again = idp.token("alice", "api", 300);
    let t1 = Instant::now();
    let r = s.get("/hello", Some(&again)).await.unwrap();
    let refused_in = t1.elapsed();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "within the interval the unknown kid is refused");
    assert!(refused_in < Duration::from_millis(500), "refused at once, not after a wait: {refused_in:?}");
    wait_status(&s, &again, StatusCode::OK, Duration::from_millis(MIN_REFETCH_MS + 3000)).await;
    let accepted_after = t1.elapsed();
    assert!(
        accepted_after <= Duration::from_millis(MIN_REFETCH_MS + 1500),
        "accepted {accepted_after:?} after rotation (bound {MIN_REFETCH_MS} ms + one fetch and polling)"
    );
    eprintln!(
        "rotated key: first use accepted in {first_use_ms} ms; right after a fetch accepted after {accepted_after:?}"
    );

    // 1,000 requests with random kids (validly signed otherwise), 50 at a time, starting when a
    // refetch is allowed again: the first causes one fetch, the rest join it or are refused.
    tokio::time::sleep(Duration::from_millis(MIN_REFETCH_MS + 100)).await;
    let before = idp.jwks_fetches();
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let t = idp.sign_with_kid(&random_kid(), &idp.claims("mallory", "api", 300));
                let s = s.clone();
                tokio::spawn(async move { s.get("/hello", Some(&t)).await.unwrap().status })
            })
            .collect();
        for h in batch {
            statuses.push(h.await.unwrap());
        }
    }
    let took = started.elapsed();
    let flood_fetches = idp.jwks_fetches() - before;
    let bound = took.as_millis() as u64 / MIN_REFETCH_MS + 1;
    eprintln!("1000 random kids in {took:?}: {flood_fetches} JWKS fetches (bound {bound})");
    assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
    assert!((1..=bound).contains(&flood_fetches), "{flood_fetches} fetches in {took:?}");
    assert_eq!(status(&s, &rotated).await, StatusCode::OK, "valid tokens unaffected");
    let m = s.metrics().await.unwrap();
    assert_eq!(fetches(&m, &idp.issuer, "unknown_kid", "ok") as u64, 2 + flood_fetches, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_and_bad_documents_keep_the_last_good_keys() {
    let upstream = Upstream::start().await.unwrap();
    let idp = TestIdp::start(Alg::ES256).await.unwrap();
    let mut x = via_discovery(&idp, vec![Alg::ES256]);
    x.refresh_interval_ms = 1000;
    x.min_refetch_interval_ms = 200;
    x.fetch_timeout_ms = 800;
    x.max_document_bytes = 64 * 1024;
    let issuer = idp.issuer.clone();
    let s = Sidecar::start(stateless(vec![x]), &own_keys(), upstream.addr).await.unwrap();
    let good = idp.token("alice", "api", 600);
    wait_status(&s, &good, StatusCode::OK, Duration::from_secs(10)).await;
    let fresh = format!("authrealm_sidecar_jwks_fresh{{issuer=\"{issuer}\"}}");
    assert_eq!(metric(&s.metrics().await.unwrap(), &fresh), 1.0);

    for mode in [
        Mode::Unavailable,
        Mode::Refuse,
        Mode::Hang,
        Mode::Oversize(100 * 1024),
        Mode::Malformed,
        Mode::NotAJwks,
        Mode::RedirectElsewhere,
    ] {
        let errors_before = fetches(&s.metrics().await.unwrap(), &issuer, "refresh", "error");
        // Two failed refreshes under this mode (one may have been in flight under the previous).
        idp.set_mode(mode.clone());
        // The IdP also rotated: the new key must not arrive through a bad document.
        let new_kid = idp.rotate();
        wait_for(&format!("a failed refresh under {mode:?}"), Duration::from_secs(10), || async {
            let m = s.metrics().await?;
            Ok((fetches(&m, &issuer, "refresh", "error") >= errors_before + 2.0 && metric(&m, &fresh) == 0.0)
                .then_some(()))
        })
        .await
        .unwrap();
        assert_eq!(status(&s, &good).await, StatusCode::OK, "{mode:?}: the last good keys stay in use");
        let t0 = Instant::now();
        assert_eq!(status(&s, &idp.token("bob", "api", 600)).await, StatusCode::UNAUTHORIZED, "{mode:?}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{mode:?}: an unknown kid waits at most for one fetch");
        let readyz = s.request(s.admin, "GET", "/readyz", &[], Default::default()).await.unwrap();
        assert_eq!(readyz.status, StatusCode::OK, "an IdP outage does not make the pod unready");
        let err = readyz.json()["externalIssuers"][0]["lastError"].as_str().unwrap_or_default().to_string();
        assert!(!err.is_empty(), "{mode:?}: {}", readyz.json());
        eprintln!("{mode:?}: {err}");
        idp.remove_key(&new_kid);
    }
    // A redirect to the same origin is followed.
    idp.set_mode(Mode::RedirectSameOrigin);
    wait_for("keys through a same-origin redirect", Duration::from_secs(10), || async {
        Ok((metric(&s.metrics().await?, &fresh) == 1.0).then_some(()))
    })
    .await
    .unwrap();
    // Recovery: back up, a rotated key is accepted, and a key the IdP retired is refused even
    // for a token the sidecar had cached as verified.
    idp.set_mode(Mode::Up);
    let old_kid = idp.current_kid();
    let _ = idp.rotate();
    let rotated = idp.token("carol", "api", 600);
    wait_status(&s, &rotated, StatusCode::OK, Duration::from_secs(5)).await;
    for _ in 0..3 {
        assert_eq!(status(&s, &good).await, StatusCode::OK);
    }
    let hits_before = metric(&s.metrics().await.unwrap(), "authrealm_sidecar_token_cache_hits_total");
    assert_eq!(status(&s, &good).await, StatusCode::OK);
    assert!(metric(&s.metrics().await.unwrap(), "authrealm_sidecar_token_cache_hits_total") > hits_before, "cached");
    idp.remove_key(&old_kid);
    wait_status(&s, &good, StatusCode::UNAUTHORIZED, Duration::from_secs(5)).await;
    assert_eq!(status(&s, &rotated).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_foreign_cas_are_refused() {
    let upstream = Upstream::start().await.unwrap();
    let idp = TestIdp::start(Alg::ES256).await.unwrap();
    let other = TestIdp::start(Alg::ES256).await.unwrap();
    // The provider's certificate is not signed by the CA this entry trusts.
    let ca_file = std::env::temp_dir().join(format!("authrealm-ext-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, &other.ca_pem).unwrap();
    let mut wrong_ca = via_discovery(&idp, vec![Alg::ES256]);
    wrong_ca.ca_file = Some(ca_file.to_string_lossy().into_owned());
    wrong_ca.min_refetch_interval_ms = 500;
    let s = Sidecar::start(stateless(vec![wrong_ca]), &own_keys(), upstream.addr).await.unwrap();
    let t = idp.token("alice", "api", 300);
    wait_for("a failed first fetch", Duration::from_secs(10), || async {
        let m = s.metrics().await?;
        Ok((fetches(&m, &idp.issuer, "start", "error") == 1.0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(status(&s, &t).await, StatusCode::UNAUTHORIZED);
    let err = s.request(s.admin, "GET", "/readyz", &[], Default::default()).await.unwrap().json();
    assert!(err["externalIssuers"][0]["lastError"].as_str().unwrap().contains("TLS"), "{err}");
    // The bundle is corrected where it is mounted (a ConfigMap update): used without a restart.
    std::fs::write(&ca_file, &idp.ca_pem).unwrap();
    wait_status(&s, &t, StatusCode::OK, Duration::from_secs(15)).await;
    let _ = std::fs::remove_file(&ca_file);
    // http:// is a config error unless the entry allows it; allowed, it works (local testing).
    let plain = TestIdp::start_plain_http(Alg::ES256).await.unwrap();
    let mut http = ExternalIssuer::new(&plain.issuer, Some(plain.discovery_url()), None);
    http.audiences = vec!["api".into()];
    http.algorithms = vec![Alg::ES256];
    assert!(stateless(vec![http.clone()]).validate().unwrap_err().to_string().contains("https"));
    http.allow_insecure_http = true;
    let p = Sidecar::start(stateless(vec![http]), &own_keys(), upstream.addr).await.unwrap();
    wait_status(&p, &plain.token("bob", "api", 300), StatusCode::OK, Duration::from_secs(10)).await;
    // Realms whose tokens need records only the realm mints refuse external issuers.
    let mut single = stateless(vec![via_discovery(&idp, vec![Alg::ES256])]);
    single.session_mode = SessionMode::Single;
    single.redis = test_config("x", Some(vec!["127.0.0.1:7000".into()])).redis;
    assert_eq!(single.validate().unwrap_err().field, "externalIssuers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denylist_revocation_of_external_tokens_across_two_sidecars() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let idp = TestIdp::start(Alg::RS256).await.unwrap();
    let mut x = via_discovery(&idp, vec![Alg::RS256]);
    x.subject_claim = "email".into();
    let mut cfg = test_config("extdeny", Some(cluster.seeds()));
    cfg.session_mode = SessionMode::Denylist;
    cfg.max_token_ttl_seconds = 600;
    cfg.token_ttl_seconds = 300;
    cfg.external_issuers = vec![x];
    let keys = own_keys();
    let a = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    let b = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    b.wait_ready(Duration::from_secs(20)).await.unwrap();

    let c1 = idp.claims("alice", "api", 300);
    let c2 = idp.claims("alice", "api", 300);
    let (t1, t2) = (idp.sign(&c1), idp.sign(&c2));
    for s in [&a, &b] {
        wait_status(s, &t1, StatusCode::OK, Duration::from_secs(10)).await;
        assert_eq!(status(s, &t2).await, StatusCode::OK);
    }
    assert_eq!(upstream.seen().last().unwrap().headers["x-auth-subject"], "alice@idp.example");
    // A token whose lifetime exceeds what the realm remembers revocations for is refused.
    let mut long = idp.claims("alice", "api", 3600);
    long["iat"] = unix_now().into();
    assert_eq!(status(&a, &idp.sign(&long)).await, StatusCode::UNAUTHORIZED);

    // Revoke t1 by jti (the subject is the mapped one) on A: refused on both, t2 unaffected.
    let jti = c1["jti"].as_str().unwrap();
    let r = a.issuer_call("DELETE", &format!("/v1/tokens/{jti}?subject=alice@idp.example"), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert!(r.json()["replicas_confirmed"].as_i64().unwrap() >= 1);
    for s in [&a, &b] {
        assert_eq!(status(s, &t1).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(s, &t2).await, StatusCode::OK);
    }
    // Log the subject out everywhere on B: t2 refused on both; a token issued after the cut-off
    // second works.
    let r = b.issuer_call("DELETE", "/v1/subjects/alice@idp.example/tokens", None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    for s in [&a, &b] {
        assert_eq!(status(s, &t2).await, StatusCode::UNAUTHORIZED);
    }
    let cut = unix_now();
    wait_for_some("the next second", Duration::from_secs(3), || async { (unix_now() > cut).then_some(()) })
        .await
        .unwrap();
    let t3 = idp.token("alice", "api", 300);
    for s in [&a, &b] {
        assert_eq!(status(s, &t3).await, StatusCode::OK);
    }
    // Introspection sees the same.
    let i = a.issuer_call("POST", "/v1/introspect", Some(json!({ "token": t1 }))).await.unwrap();
    assert_eq!(i.json(), json!({"active": false}));
    let i = a.issuer_call("POST", "/v1/introspect", Some(json!({ "token": t3 }))).await.unwrap();
    assert_eq!(i.json()["active"], true);
    assert_eq!(i.json()["iss"], idp.issuer.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_ends_when_its_external_key_leaves_the_set() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await.unwrap();
    let idp = TestIdp::start(Alg::ES256).await.unwrap();
    let mut x = via_discovery(&idp, vec![Alg::ES256]);
    x.refresh_interval_ms = 1000;
    let mut cfg = stateless(vec![x]);
    cfg.limits.revalidate_interval_ms = 200;
    let s = Sidecar::start(cfg, &own_keys(), upstream.addr).await.unwrap();
    let old_kid = idp.current_kid();
    let t = idp.token("alice", "api", 600);
    wait_status(&s, &t, StatusCode::OK, Duration::from_secs(10)).await;
    let _ = idp.rotate();

    // An upgraded (echo) connection opened with the token.
    let mut conn = tokio::net::TcpStream::connect(s.public).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: app\r\nAuthorization: Bearer {t}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf[..n]));
    conn.write_all(b"ping").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"ping");

    // The provider retires the key: the next refresh drops it, the next re-check ends the tunnel.
    idp.remove_key(&old_kid);
    let removed = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel is still open 5 s after the key was removed");
    eprintln!("tunnel closed {:?} after the provider removed the key", removed.elapsed());
    let m = s.metrics().await.unwrap();
    assert_eq!(metric(&m, "authrealm_sidecar_long_lived_ended_total{outcome=\"key_retired\"}"), 1.0, "{m}");
    assert_eq!(status(&s, &t).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(&s, &idp.token("alice", "api", 600)).await, StatusCode::OK);
}
