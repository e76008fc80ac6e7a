//! Per-route authorization by claims (`authorization.rules`) through the real sidecar binary:
//! 200 vs 403 with the RFC 6750 challenge, the metric with its reason, and path tricks (dot
//! segments, encoded separators, case, empty segments, path parameters) that must never bring a
//! request to the app under a less protected rule. Stateless realm: no Redis needed.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;
use std::time::Duration;

use authrealm_contract::authz::{Authorization, AuthorizationRule, ClaimRequirement, Requirements, RuleMethod};
use authrealm_contract::config::{PathMatch, PublicRoute};
use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SidecarConfig};
use authrealm_tests::sidecar::{Sidecar, Upstream, metric_value, sidecar_bin, test_config};
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

fn rule(
    path: &str,
    m: PathMatch,
    methods: &[RuleMethod],
    scopes: &[&str],
    claims: &[(&str, &[&str])],
) -> AuthorizationRule {
    AuthorizationRule {
        path: path.into(),
        path_match: m,
        methods: methods.to_vec(),
        require: Requirements {
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims: claims
                .iter()
                .map(|(n, v)| ClaimRequirement {
                    name: n.to_string(),
                    any_of: v.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        },
    }
}

/// The realm of this suite: everything needs scope `user`; `/items` needs `items:read` to read
/// and `items:write` for anything else; `/admin` needs role `admin`; `/health` is public.
fn config() -> SidecarConfig {
    use PathMatch::*;
    let mut cfg = test_config("authz", None);
    cfg.public_routes = vec![PublicRoute { path: "/health".into(), path_match: Exact, methods: vec![] }];
    cfg.authorization = Authorization {
        rules: vec![
            rule("/", Prefix, &[], &["user"], &[]),
            rule("/items", Prefix, &[RuleMethod::Get], &["items:read"], &[]),
            rule("/items", Prefix, &[], &["items:write"], &[]),
            rule("/admin", Prefix, &[], &[], &[("roles", &["admin", "root"])]),
        ],
    };
    cfg
}

const FORBIDDEN_SCOPE: &str = "authrealm_sidecar_requests_total{outcome=\"forbidden\",reason=\"insufficient_scope\"}";
const FORBIDDEN_CLAIMS: &str = "authrealm_sidecar_requests_total{outcome=\"forbidden\",reason=\"insufficient_claims\"}";
const AMBIGUOUS: &str = "authrealm_sidecar_requests_total{outcome=\"rejected\",reason=\"ambiguous_path\"}";
const ALLOWED: &str = "authrealm_sidecar_requests_total{outcome=\"allowed\",reason=\"ok\"}";

async fn token(s: &Sidecar, claims: Value) -> String {
    s.mint_with(json!({"subject": "alice", "claims": claims})).await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn call(s: &Sidecar, method: &str, path: &str, token: &str) -> authrealm_tests::sidecar::Reply {
    let auth = format!("Bearer {token}");
    s.request(s.public, method, path, &[("authorization", &auth)], Bytes::new()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_require_their_claims_and_answer_403_insufficient_scope() {
    let upstream = Upstream::start().await.unwrap();
    let keys = KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    };
    let s = Sidecar::start(config(), &keys, upstream.addr).await.unwrap();
    let user = token(&s, json!({"scope": "user"})).await;
    let reader = token(&s, json!({"scope": "items:read user"})).await;
    let writer = token(&s, json!({"scp": ["user", "items:write"]})).await;
    let admin = token(&s, json!({"scope": "user", "roles": ["ops", "admin"]})).await;
    let no_scope = token(&s, json!({"roles": ["admin"]})).await;

    // Allowed: each token where its claims suffice, and the app sees the request.
    for (method, path, t) in [
        ("GET", "/anything", &user),
        ("GET", "/items", &reader),
        ("HEAD", "/items/7", &reader),
        ("POST", "/items", &writer),
        ("DELETE", "/items/7", &writer),
        ("GET", "/admin/panel", &admin),
        ("POST", "/admin", &admin),
    ] {
        upstream.clear();
        let r = call(&s, method, path, t).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}");
        assert_eq!(upstream.seen().len(), 1, "{method} {path} reached the app once");
    }
    // The public route still needs no token — unless the request carries an override the app
    // may route by; no token on a rule's route is still 401.
    assert_eq!(s.get("/health", None).await.unwrap().status, StatusCode::OK);
    let r = s.request(s.public, "GET", "/health", &[("x-original-url", "/admin")], Bytes::new()).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = s.request(s.public, "GET", "/health", &[("x-http-method-override", "DELETE")], Bytes::new()).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.get("/health?_method=DELETE", None).await.unwrap().status, StatusCode::UNAUTHORIZED);
    let r = s.get("/admin", None).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Refused: a valid token that lacks a scope gets 403 with the scopes the route requires.
    upstream.clear();
    let (scope_before, claims_before) = {
        let m = s.metrics().await.unwrap();
        (metric_value(&m, FORBIDDEN_SCOPE), metric_value(&m, FORBIDDEN_CLAIMS))
    };
    let scope_cases = [
        ("GET", "/anything", &no_scope, "user"),
        ("GET", "/items", &user, "items:read"),
        ("HEAD", "/items", &user, "items:read"),
        ("POST", "/items", &reader, "items:write"),
        ("PATCH", "/items/7", &reader, "items:write"),
        ("PROPFIND", "/items", &reader, "items:write"),
    ];
    for (method, path, t, scope) in scope_cases {
        // Twice: the second request is served from the verified-token cache.
        for _ in 0..2 {
            let r = call(&s, method, path, t).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
            assert_eq!(
                r.headers["www-authenticate"],
                format!(
                    "Bearer realm=\"authz\", error=\"insufficient_scope\", error_description=\"the token lacks a scope this route requires\", scope=\"{scope}\""
                ),
                "{method} {path}"
            );
            assert_eq!(r.headers["cache-control"], "no-store");
            if method != "HEAD" {
                assert_eq!(r.json(), json!({"error": "insufficient_scope"}));
            }
        }
    }
    // A missing claim value: the same error code, a description, and nothing about the values.
    for t in [&user, &reader, &writer] {
        let r = call(&s, "GET", "/admin/panel", t).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let h = r.headers["www-authenticate"].to_str().unwrap();
        assert_eq!(
            h,
            "Bearer realm=\"authz\", error=\"insufficient_scope\", error_description=\"the token lacks a scope or claim value this route requires\""
        );
        assert!(!String::from_utf8_lossy(&r.body).contains("admin"));
    }
    assert!(upstream.seen().is_empty(), "a refused request reached the app: {:?}", upstream.seen());
    s.wait_metric(FORBIDDEN_SCOPE, |v| v == scope_before + 2.0 * scope_cases.len() as f64).await;
    s.wait_metric(FORBIDDEN_CLAIMS, |v| v == claims_before + 3.0).await;
    let m = s.metrics().await.unwrap();
    assert!(metric_value(&m, "authrealm_sidecar_token_cache_hits_total") > 0.0, "the cached path was exercised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_cannot_reach_a_protected_route_through_a_less_protected_one() {
    let upstream = Upstream::start().await.unwrap();
    let keys = KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    };
    let s = Sidecar::start(config(), &keys, upstream.addr).await.unwrap();
    // Satisfies `/` (scope user) but neither `/admin` (role) nor writing `/items`.
    let user = token(&s, json!({"scope": "user items:read"})).await;
    assert_eq!(call(&s, "GET", "/public/x", &user).await.status, StatusCode::OK);
    upstream.clear();
    let ambiguous_before = metric_value(&s.metrics().await.unwrap(), AMBIGUOUS);

    // Spellings an app may resolve to /admin: the admin rule decides them (403).
    for p in [
        "/admin",
        "/admin/",
        "//admin",
        "/admin//x",
        "/ADMIN",
        "/Admin/Panel",
        "/%61dmin",
        "/%41DMIN/x",
        "/admin;jsessionid=1",
        "/;x/admin",
    ] {
        let r = call(&s, "GET", p, &user).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{p}");
    }
    // Paths that only resolve to /admin after dot segments, encoded separators or a second
    // decoding: refused as ambiguous (400) before any rule is consulted.
    let ambiguous = [
        "/public/../admin",
        "/public/./../admin",
        "/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/admin%2F..",
        "/public%2F..%2Fadmin",
        "/public%5C..%5Cadmin",
        "/public/..;/admin",
        "/public/%252e%252e/admin",
        "/admin%3Bx",
        "/admin%zz",
        "/admin%00.png",
        "/%c0%ae%c0%ae/admin",
    ];
    for p in ambiguous {
        let r = call(&s, "GET", p, &user).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{p}");
    }
    // Writing /items through a GET-only spelling: the method decides, HEAD is GET, an unknown
    // method falls to the rule without methods.
    for (m, p) in [("POST", "/items"), ("DELETE", "/ITEMS/1"), ("PUT", "//items/"), ("PROPFIND", "/items")] {
        assert_eq!(call(&s, m, p, &user).await.status, StatusCode::FORBIDDEN, "{m} {p}");
    }
    // Frameworks that route by an override method or path: the rules for those apply too.
    let auth = format!("Bearer {user}");
    for (m, p, h) in [
        ("GET", "/", ("x-original-url", "/admin")),
        ("GET", "/x", ("x-rewrite-url", "/Admin/panel?y=1")),
        ("GET", "/items", ("x-http-method-override", "DELETE")),
        ("POST", "/x", ("x-original-url", "/items")),
    ] {
        let r = s.request(s.public, m, p, &[("authorization", &auth), h], Bytes::new()).await.unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {p} {h:?}");
    }
    assert_eq!(call(&s, "GET", "/items?_method=delete", &user).await.status, StatusCode::FORBIDDEN);
    for h in [("x-original-url", "/x/../admin"), ("x-original-url", "admin"), ("x-http-method", "BOGUS")] {
        let r = s
            .request(
                s.public,
                "GET",
                "/items",
                &[("authorization", &auth), h, ("x-http-method-override", "GET")],
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{h:?}");
    }
    // Backslashes never make it to a rule either (hyper's client refuses them, so raw bytes).
    let raw = format!(
        "GET /public\\..\\admin HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {user}\r\nconnection: close\r\n\r\n"
    );
    let resp = s.raw(raw.as_bytes(), Duration::from_secs(5)).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    assert!(upstream.seen().is_empty(), "a trick reached the app: {:?}", upstream.seen());
    s.wait_metric(AMBIGUOUS, |v| v >= ambiguous_before + ambiguous.len() as f64 + 3.0).await;
    // And the same token still works where it should.
    let allowed = metric_value(&s.metrics().await.unwrap(), ALLOWED);
    assert_eq!(call(&s, "GET", "/items/%31", &user).await.status, StatusCode::OK);
    s.wait_metric(ALLOWED, |v| v == allowed + 1.0).await;
}

#[test]
fn check_config_refuses_rules_the_crd_refuses() {
    let bin = sidecar_bin().unwrap();
    let d = std::env::temp_dir().join(format!("authrealm-authz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let keys = d.join("keyset.json");
    let set = KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    };
    std::fs::write(&keys, set.to_json_pretty()).unwrap();
    let check = |mutate: &dyn Fn(&mut Value)| {
        let mut cfg = config();
        cfg.key_set_file = keys.to_string_lossy().into_owned();
        let mut v = serde_json::to_value(&cfg).unwrap();
        mutate(&mut v);
        let path = d.join("sidecar.json");
        std::fs::write(&path, v.to_string()).unwrap();
        Command::new(&bin).args(["check-config", "--config"]).arg(&path).output().unwrap()
    };
    let ok = check(&|_| {});
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "authorization.rules[4].path: ambiguous: rules[3]",
            Box::new(|v| {
                v["authorization"]["rules"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"path": "/ADMIN", "require": {"scopes": ["x"]}}))
            }),
        ),
        (
            "authorization.rules[0].require: a rule must require",
            Box::new(|v| v["authorization"]["rules"][0]["require"] = json!({"scopes": [], "claims": []})),
        ),
        (
            "authorization.rules[0].path: must not contain '.' or '..'",
            Box::new(|v| v["authorization"]["rules"][0]["path"] = json!("/a/../b")),
        ),
        ("authorization.rules[3].path: publicRoutes[0]", Box::new(|v| v["publicRoutes"][0]["path"] = json!("/Admin/"))),
        ("unknown field `scope`", Box::new(|v| v["authorization"]["rules"][0]["require"]["scope"] = json!(["x"]))),
    ];
    for (needle, mutate) in cases {
        let out = check(&*mutate);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{needle}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// With sessions in Redis: a revoked token gets 401 (the session is checked before the route's
/// requirements), and when Redis cannot answer under `failurePolicy: open` the requirements
/// still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_get_401_and_fail_open_still_enforces_the_rules() {
    use authrealm_contract::FailurePolicy;
    use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let keys = KeySet {
        version: authrealm_contract::keyset::KEYSET_VERSION.into(),
        keys: vec![generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap()],
    };
    let mut cfg = config();
    cfg.session_mode = authrealm_contract::SessionMode::Multi;
    cfg.redis = test_config("authz", Some(cluster.seeds())).redis;
    let s = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();
    let minted = s.mint_with(json!({"subject": "alice", "claims": {"scope": "user"}})).await.unwrap();
    let user = minted["access_token"].as_str().unwrap().to_string();
    assert_eq!(call(&s, "GET", "/x", &user).await.status, StatusCode::OK);
    assert_eq!(call(&s, "GET", "/admin", &user).await.status, StatusCode::FORBIDDEN);
    let r = s.issuer_call("DELETE", &format!("/v1/tokens/{}", minted["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = call(&s, "GET", "/admin", &user).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a revoked token is not a valid token lacking a scope");
    assert!(r.headers["www-authenticate"].to_str().unwrap().contains("invalid_token"));

    // Redis unreachable, failure policy open: admitted on signature and claims, still by the rules.
    let mut open = cfg.clone();
    open.failure_policy = FailurePolicy::Open;
    open.redis.as_mut().unwrap().endpoints = vec![format!("127.0.0.1:{}", authrealm_tests::support::free_port())];
    let o = Sidecar::start(open, &keys, upstream.addr).await.unwrap();
    let t = authrealm_tests::sidecar::sign_raw(
        &keys.keys[0],
        &json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}),
        &json!({"iss": cfg.issuer, "aud": "app", "sub": "bob", "jti": "j-bob", "scope": "user",
                "iat": authrealm_tests::sidecar::unix_now(), "exp": authrealm_tests::sidecar::unix_now() + 300}),
    );
    upstream.clear();
    assert_eq!(call(&o, "GET", "/x", &t).await.status, StatusCode::OK);
    let r = call(&o, "GET", "/admin", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(upstream.seen().len(), 1, "only the allowed request reached the app");
    let m = o.metrics().await.unwrap();
    assert_eq!(metric_value(&m, FORBIDDEN_CLAIMS), 1.0);
    assert!(metric_value(&m, "authrealm_sidecar_fail_open_total") >= 1.0);
}
