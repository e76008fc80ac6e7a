//! `spec.authorization` (per-route authorization by claims) against a real kube-apiserver: the
//! CRD with its CEL rules installs (cost estimation included), good rules are accepted and
//! defaulted, ambiguous or meaningless rules are refused with their messages, and an accepted
//! realm renders the rules into the sidecar config the sidecar itself validates.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use authrealm_operator::crd::AuthRealm;
use authrealm_operator::render;
use common::*;
use kube::api::{Api, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};

/// Creates a realm from raw JSON (as kubectl would); the API server's message, or None.
async fn try_create(client: &kube::Client, ns: &str, name: &str, spec: Value) -> Option<String> {
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

fn spec(rules: Value, public_routes: Value) -> Value {
    let mut s = stateless_spec();
    s["authorization"] = json!({ "rules": rules });
    s["sidecar"] = json!({ "publicRoutes": public_routes });
    s
}

fn scopes(path: &str, extra: Value) -> Value {
    let mut r = json!({"path": path, "require": {"scopes": ["s"]}});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_rules_are_validated_by_the_api_server() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("authz").await?;
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);

    // Accepted: a method-specific rule next to a catch-all on the same path, the same path as
    // exact and as prefix, claims, and a public route nested below a prefix rule.
    let good = spec(
        json!([
            {"path": "/", "require": {"scopes": ["user"]}},
            {"path": "/items", "methods": ["GET"], "require": {"scopes": ["items:read"]}},
            {"path": "/items", "methods": ["POST", "DELETE"], "require": {"scopes": ["items:write"]}},
            {"path": "/items", "require": {"scopes": ["items:admin"]}},
            {"path": "/items", "match": "exact", "require": {"scopes": ["items:list"]}},
            {"path": "/admin", "require": {"claims": [{"name": "roles", "anyOf": ["admin", "root"]}],
                                           "scopes": ["user"]}},
        ]),
        json!([{"path": "/items/health", "match": "exact"}, {"path": "/login", "match": "exact", "methods": ["POST"]}]),
    );
    assert_eq!(try_create(&client, &ns, "good", good).await, None);
    let r = api.get("good").await?;
    let rules = &r.spec.authorization.rules;
    assert_eq!(rules.len(), 6);
    assert_eq!(rules[0].path_match, authrealm_contract::config::PathMatch::Prefix, "match defaults to prefix");
    assert!(rules[0].methods.is_empty());
    // The operator renders them into the sidecar config, which the sidecar validates the same way.
    let resolved = render::resolve("good", &ns, &r.spec).unwrap();
    assert_eq!(resolved.config.authorization, r.spec.authorization);
    let text = resolved.config.to_json_pretty();
    assert_eq!(authrealm_contract::SidecarConfig::from_json(text.as_bytes()).unwrap().authorization.rules.len(), 6);

    // The largest spec the bounds allow is accepted (CEL cost stays within the budget at run time).
    let max_rules: Vec<Value> = (0..32)
        .map(|i| {
            json!({"path": format!("/r{i}/{}", "a".repeat(200)), "methods": ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"],
                   "require": {"scopes": (0..8).map(|j| format!("s{j}")).collect::<Vec<_>>(),
                               "claims": (0..4).map(|j| json!({"name": format!("c{j}"), "anyOf": (0..16).map(|k| format!("v{k}")).collect::<Vec<_>>()})).collect::<Vec<_>>()}})
        })
        .collect();
    // Public routes just short of covering the rules: every pair is compared in full.
    let max_public: Vec<Value> = (0..64)
        .map(|i| json!({"path": format!("/r{}/{}b", i % 32, "a".repeat(199)), "methods": ["GET", "HEAD"]}))
        .collect();
    assert_eq!(try_create(&client, &ns, "largest", spec(json!(max_rules), json!(max_public))).await, None);

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "same-path",
            spec(json!([scopes("/a", json!({})), scopes("/a", json!({}))]), json!([])),
            "authorization.rules are ambiguous",
        ),
        (
            "same-path-case",
            spec(json!([scopes("/Admin", json!({})), scopes("/admin", json!({}))]), json!([])),
            "authorization.rules are ambiguous",
        ),
        (
            "shared-method",
            spec(
                json!([scopes("/a", json!({"methods": ["GET", "PUT"]})), scopes("/a", json!({"methods": ["PUT"]}))]),
                json!([]),
            ),
            "authorization.rules are ambiguous",
        ),
        (
            "same-exact",
            spec(json!([scopes("/a", json!({"match": "exact"})), scopes("/a", json!({"match": "exact"}))]), json!([])),
            "authorization.rules are ambiguous",
        ),
        ("relative", spec(json!([scopes("admin", json!({}))]), json!([])), "should match"),
        ("trailing-slash", spec(json!([scopes("/admin/", json!({}))]), json!([])), "should match"),
        ("empty-segment", spec(json!([scopes("//admin", json!({}))]), json!([])), "should match"),
        ("encoded", spec(json!([scopes("/a%2fb", json!({}))]), json!([])), "should match"),
        ("params", spec(json!([scopes("/a;b", json!({}))]), json!([])), "should match"),
        ("dot-dot", spec(json!([scopes("/a/../b", json!({}))]), json!([])), "must not contain '.' or '..' segments"),
        ("dot", spec(json!([scopes("/./b", json!({}))]), json!([])), "must not contain '.' or '..' segments"),
        (
            "empty-require",
            spec(json!([{"path": "/a", "require": {}}]), json!([])),
            "must require at least one scope or claim value",
        ),
        ("head", spec(json!([scopes("/a", json!({"methods": ["HEAD"]}))]), json!([])), "Unsupported value"),
        ("scope-space", spec(json!([{"path": "/a", "require": {"scopes": ["a b"]}}]), json!([])), "should match"),
        (
            "scope-claim",
            spec(json!([{"path": "/a", "require": {"claims": [{"name": "scp", "anyOf": ["x"]}]}}]), json!([])),
            "through require.scopes",
        ),
        (
            "no-values",
            spec(json!([{"path": "/a", "require": {"claims": [{"name": "roles", "anyOf": []}]}}]), json!([])),
            "should have at least 1 items",
        ),
        (
            "too-many",
            spec(json!((0..33).map(|i| scopes(&format!("/r{i}"), json!({}))).collect::<Vec<_>>()), json!([])),
            "must have at most 32 items",
        ),
        (
            "public-same",
            spec(json!([scopes("/login", json!({"match": "exact"}))]), json!([{"path": "/login", "match": "exact"}])),
            "is made public by sidecar.publicRoutes",
        ),
        (
            "public-prefix",
            spec(json!([scopes("/static/admin", json!({}))]), json!([{"path": "/static/"}])),
            "is made public by sidecar.publicRoutes",
        ),
        (
            "public-trailing-slash",
            spec(json!([scopes("/Admin", json!({}))]), json!([{"path": "/admin/", "match": "exact"}])),
            "is made public by sidecar.publicRoutes",
        ),
        (
            "public-head",
            spec(json!([scopes("/a", json!({"methods": ["GET"]}))]), json!([{"path": "/a", "methods": ["HEAD"]}])),
            "is made public by sidecar.publicRoutes",
        ),
    ];
    for (name, spec, message) in cases {
        let err = try_create(&client, &ns, name, spec).await.unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(err.contains(message), "{name}: {err}");
    }
    // A public route that only allows a method the rule does not name is fine.
    let disjoint = spec(
        json!([scopes("/login", json!({"methods": ["GET"]}))]),
        json!([{"path": "/login", "match": "exact", "methods": ["POST"]}]),
    );
    assert_eq!(try_create(&client, &ns, "disjoint", disjoint).await, None);

    // What CEL cannot see exactly (a public route spelled with an empty segment) the operator
    // refuses when it renders the config: the realm reports InvalidSpec naming the field.
    let sneaky =
        spec(json!([scopes("/admin", json!({"match": "exact"}))]), json!([{"path": "//admin", "match": "exact"}]));
    assert_eq!(try_create(&client, &ns, "sneaky", sneaky).await, None);
    let r = api.get("sneaky").await?;
    let e = render::resolve("sneaky", &ns, &r.spec).err().unwrap();
    assert_eq!(e.field, "(sidecar config) authorization.rules[0].path");
    assert!(e.message.contains("publicRoutes[0] makes this path public"), "{}", e.message);
    Ok(())
}
