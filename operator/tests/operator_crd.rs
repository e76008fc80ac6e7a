//! The AuthRealm CRD against a real kube-apiserver: it installs, defaults apply, CEL rules reject
//! bad specs with their messages, and hostile specs are rejected or handled.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use authrealm_operator::crd::AuthRealm;
use common::*;
use kube::api::{Api, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::json;

/// Creates a realm from raw JSON (bypassing the Rust types, as kubectl would) and returns the
/// API server's error message, or None when it was accepted.
async fn try_create(client: &kube::Client, ns: &str, name: &str, spec: serde_json::Value) -> Option<String> {
    let obj =
        json!({"apiVersion": "authrealm.dev/v1alpha1", "kind": "AuthRealm", "metadata": {"name": name}, "spec": spec});
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<AuthRealm>(&()));
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    match raw.create(&PostParams::default(), &obj).await {
        Ok(_) => None,
        Err(kube::Error::Api(s)) => Some(s.message.clone()),
        Err(e) => Some(format!("unexpected error: {e}")),
    }
}

fn base() -> serde_json::Value {
    json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "redis": {"endpoints": ["redis-0.redis:6379"]},
    })
}

fn with(mut v: serde_json::Value, path: &[&str], value: serde_json::Value) -> serde_json::Value {
    let mut cur = &mut v;
    for p in &path[..path.len() - 1] {
        cur = cur.as_object_mut().unwrap().entry(p.to_string()).or_insert_with(|| json!({}));
    }
    cur[path[path.len() - 1]] = value;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_applies_and_cel_rules_reject_bad_specs_with_their_messages() -> anyhow::Result<()> {
    let started = Instant::now();
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("crd").await?;
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);

    // A minimal spec is accepted and defaulted by the API server.
    assert_eq!(try_create(&client, &ns, "minimal", base()).await, None);
    let r = api.get("minimal").await?;
    assert_eq!(r.spec.algorithm.as_str(), "ES256");
    assert_eq!(r.spec.key_rotation.interval.0, "720h");
    assert_eq!(r.spec.token_ttl.0, "15m");
    assert_eq!(r.spec.redis.as_ref().unwrap().key_prefix, "ar:");
    assert_eq!(r.spec.sidecar.ports.public, 8443);
    assert!(r.spec.session_cache.enabled);
    assert_eq!(r.spec.session_cache.max_staleness.0, "1s");

    // Algorithm changes within a family start a new key chain; across HMAC/asymmetric they are
    // refused (verifier pods mount the JWKS, which has no HMAC key, and vice versa).
    let patch = |alg: &'static str| {
        let api = api.clone();
        async move {
            let p = kube::api::Patch::Merge(json!({"spec": {"algorithm": alg}}));
            api.patch("minimal", &kube::api::PatchParams::default(), &p).await
        }
    };
    match patch("HS256").await {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("cannot change between HMAC (HS*) and asymmetric"), "{}", s.message)
        }
        other => panic!("ES256 -> HS256 must be refused, got {other:?}"),
    }
    assert_eq!(patch("EdDSA").await?.spec.algorithm.as_str(), "EdDSA");
    let hmac = with(base(), &["algorithm"], json!("HS384"));
    assert_eq!(try_create(&client, &ns, "hmac", hmac).await, None);
    let hmac_api = api.clone();
    let to_rsa = kube::api::Patch::Merge(json!({"spec": {"algorithm": "RS256"}}));
    assert!(hmac_api.patch("hmac", &kube::api::PatchParams::default(), &to_rsa).await.is_err(), "HS384 -> RS256");
    let to_hs512 = kube::api::Patch::Merge(json!({"spec": {"algorithm": "HS512"}}));
    assert_eq!(
        hmac_api.patch("hmac", &kube::api::PatchParams::default(), &to_hs512).await?.spec.algorithm.as_str(),
        "HS512"
    );

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("empty-audiences", with(base(), &["audiences"], json!([])), "at least one audience is required"),
        (
            "ttl-over-interval",
            with(with(base(), &["tokenTtl"], json!("2h")), &["keyRotation"], json!({"interval": "1h"})),
            "must not be longer than keyRotation.interval",
        ),
        ("max-ttl-below-ttl", with(base(), &["maxTokenTtl"], json!("1m")), "maxTokenTtl must be at least tokenTtl"),
        (
            "bad-endpoint",
            with(base(), &["redis", "endpoints"], json!(["redis-0.redis"])),
            "every redis endpoint must be host:port",
        ),
        (
            "port-too-big",
            with(base(), &["redis", "endpoints"], json!(["10.0.0.1:70000"])),
            "every redis endpoint must be host:port",
        ),
        (
            "endpoints-and-service",
            with(base(), &["redis", "service"], json!({"name": "redis", "port": 6379})),
            "set exactly one of redis.endpoints and redis.service",
        ),
        ("no-redis", json!({"issuer": "i", "audiences": ["a"]}), "redis is required unless sessionMode is stateless"),
        (
            "propagation-over-interval",
            with(base(), &["keyRotation"], json!({"interval": "1h", "propagationDelay": "2h"})),
            "propagationDelay must be shorter than keyRotation.interval",
        ),
        (
            "zero-propagation",
            with(base(), &["keyRotation"], json!({"interval": "1h", "propagationDelay": "0s"})),
            "keyRotation.propagationDelay must be longer than 0s",
        ),
        ("leeway", with(base(), &["clockLeeway"], json!("1h")), "clockLeeway must be at most 10m"),
        (
            "staleness-short",
            with(base(), &["sessionCache"], json!({"maxStaleness": "10ms"})),
            "sessionCache.maxStaleness must be between 100ms and 10s",
        ),
        (
            "staleness-long",
            with(base(), &["sessionCache"], json!({"enabled": true, "maxStaleness": "1m"})),
            "sessionCache.maxStaleness must be between 100ms and 10s",
        ),
        ("prefix", with(base(), &["redis", "keyPrefix"], json!("a{b")), "must not contain '{' or '}'"),
        (
            "same-ports",
            with(base(), &["sidecar"], json!({"ports": {"public": 9000, "issuer": 9000, "admin": 9001}})),
            "must be distinct",
        ),
        ("upstream-port", with(base(), &["sidecar"], json!({"upstreamPort": 8443})), "upstreamPort must differ"),
        (
            "auth-header",
            with(base(), &["sidecar"], json!({"claimHeaders": {"sub": "Authorization"}})),
            "must not target Authorization",
        ),
        (
            "bad-header",
            with(base(), &["sidecar"], json!({"claimHeaders": {"sub": "X Auth"}})),
            "claimHeaders values must be HTTP header names",
        ),
        ("bad-alg", with(base(), &["algorithm"], json!("none")), "Unsupported value"),
        ("route", with(base(), &["sidecar"], json!({"publicRoutes": [{"path": "health"}]})), "must start with '/'"),
        (
            "route-method",
            with(base(), &["sidecar"], json!({"publicRoutes": [{"path": "/login", "methods": ["post"]}]})),
            "should match '^[A-Z]+$'",
        ),
        (
            "tls-server-name",
            with(
                base(),
                &["redis"],
                json!({"endpoints": ["redis-0.redis:6379"], "tls": {"serverName": "redis.internal"}}),
            ),
            "redis.tls.serverName is not supported yet",
        ),
    ];
    for (name, spec, message) in cases {
        let err = try_create(&client, &ns, name, spec).await.unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(err.contains(message), "{name}: {err}");
    }
    eprintln!("CRD validation checks took {:.1?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_specs_are_rejected_or_handled() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("hostile").await?;

    // Names: 63 characters work (they end up in label values and object names), 64 do not.
    let longest = "r".repeat(63);
    assert_eq!(try_create(&client, &ns, &longest, base()).await, None);
    let err = try_create(&client, &ns, &"r".repeat(64), base()).await.expect("64-character name accepted");
    assert!(err.contains("at most 63 characters"), "{err}");
    let err =
        try_create(&client, &ns, &format!("{}.x", "a".repeat(250)), base()).await.expect("253-character name accepted");
    assert!(err.contains("63"), "{err}");

    // A 10,000-entry audience list.
    let many: Vec<String> = (0..10_000).map(|i| format!("aud-{i}")).collect();
    let err =
        try_create(&client, &ns, "many-audiences", with(base(), &["audiences"], json!(many))).await.expect("accepted");
    assert!(err.contains("must have at most 64 items"), "{err}");
    // Duplicate audiences (a set).
    let err = try_create(&client, &ns, "dup-audiences", with(base(), &["audiences"], json!(["a", "a"])))
        .await
        .expect("accepted");
    assert!(err.contains("Duplicate value"), "{err}");

    // Nonsense durations.
    for (i, d) in ["-5m", "5 minutes", "1d", "forever", "", "99999999h", "0s", "1e3s", "15"].iter().enumerate() {
        let err = try_create(&client, &ns, &format!("duration-{i}"), with(base(), &["tokenTtl"], json!(d)))
            .await
            .unwrap_or_else(|| panic!("tokenTtl {d:?} accepted"));
        assert!(err.contains("tokenTtl"), "{d:?}: {err}");
    }
    let err = try_create(
        &client,
        &ns,
        "interval-zero",
        with(base(), &["keyRotation"], json!({"interval": "0s", "propagationDelay": "0s"})),
    )
    .await
    .expect("accepted");
    assert!(err.contains("keyRotation.interval must be between 1s and 87600h"), "{err}");

    // Unicode claim names are fine (claims are JSON keys); header names are not.
    let unicode = with(
        with(
            base(),
            &["sidecar"],
            json!({"claimHeaders": {"ユーザー名": "X-Auth-User", "e\u{301}mail": "X-Auth-Email"}}),
        ),
        &["requiredClaims"],
        json!(["ロール", "🔑"]),
    );
    assert_eq!(try_create(&client, &ns, "unicode", unicode).await, None);
    let err = try_create(
        &client,
        &ns,
        "unicode-header",
        with(base(), &["sidecar"], json!({"claimHeaders": {"sub": "X-Üser"}})),
    )
    .await
    .expect("accepted");
    assert!(err.contains("HTTP header names"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_printer_columns_and_explain_text() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("columns").await?;
    let op = InProcess::start(client.clone(), &ns);
    create_realm(&client, &ns, &realm("cols", stateless_spec())).await?;
    let r = wait_condition(&client, &ns, "cols", "Ready", "True", None, Duration::from_secs(30)).await?;
    let kid = r.status.unwrap().current_kid.unwrap();
    let out = env.kubectl().args(["get", "ar", "-n", &ns]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header = text.lines().next().unwrap_or_default();
    for col in ["NAME", "READY", "ALGORITHM", "CURRENT KEY", "NEXT ROTATION", "AGE"] {
        assert!(header.contains(col), "{text}");
    }
    assert!(text.contains(&kid) && text.contains("ES256") && text.contains("True"), "{text}");
    let out = env.kubectl().args(["explain", "authrealm.spec.keyRotation.propagationDelay"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Mounted Secrets and ConfigMaps take up to about a minute"), "{text}");
    op.stop().await?;
    Ok(())
}
