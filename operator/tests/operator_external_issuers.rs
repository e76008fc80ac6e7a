//! External issuers against a real kube-apiserver and the tests' own OIDC provider
//! (`authrealm_tests::oidc_idp`): `IssuerKeysReady` follows the provider's availability, the
//! sidecar config names the issuer, `kubectl get` shows the column, and bad specs are refused.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use authrealm_contract::{Alg, SidecarConfig};
use authrealm_operator::crd::AuthRealm;
use authrealm_tests::oidc_idp::{Mode, TestIdp};
use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use serde_json::json;

fn condition(r: &AuthRealm, type_: &str) -> (String, String, String) {
    let c = r.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == type_).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// A namespace with the test provider's CA in ConfigMap `idp-ca` (key `ca.crt`) and an operator
/// watching it whose Redis check and issuer probe run every `interval`.
async fn setup(
    prefix: &str,
    alg: Alg,
    interval: Duration,
) -> anyhow::Result<(std::sync::Arc<authrealm_tests::kube_env::KubeEnv>, kube::Client, String, TestIdp, InProcess)> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace(prefix).await?;
    let idp = TestIdp::start(alg).await?;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta { name: Some("idp-ca".into()), ..Default::default() },
                data: Some(BTreeMap::from([("ca.crt".to_string(), idp.ca_pem.clone())])),
                ..Default::default()
            },
        )
        .await?;
    let settings = authrealm_operator::controller::Settings {
        namespace: Some(ns.clone()),
        redis_check_interval: interval,
        ..Default::default()
    };
    let op = InProcess::start_with(client.clone(), settings);
    Ok((env, client, ns, idp, op))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_ready_follows_the_provider() -> anyhow::Result<()> {
    let (_env, client, ns, idp, op) = setup("extiss", Alg::RS256, Duration::from_secs(2)).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let spec = json!({
        "issuer": "https://auth.example.test",
        "audiences": ["app"],
        "sessionMode": "stateless",
        "externalIssuers": [{
            "issuer": idp.issuer,
            "discoveryUrl": idp.discovery_url(),
            "audiences": ["api"],
            "subjectClaim": "email",
            "caBundle": {"name": "idp-ca"},
        }],
    });
    create_realm(&client, &ns, &realm("sso", spec)).await?;
    let r = wait_condition(&client, &ns, "sso", "IssuerKeysReady", "True", None, Duration::from_secs(30)).await?;
    let (_, reason, message) = condition(&r, "IssuerKeysReady");
    assert_eq!((reason.as_str(), message.clone()), ("KeysLoaded", format!("1 key from {}", idp.issuer)));
    assert_eq!(condition(&r, "Ready").0, "True");

    // The sidecar config names the issuer, with the CA bundle where the webhook mounts it.
    let cfg = cms.get("sso-sidecar").await?;
    let cfg = SidecarConfig::from_json(cfg.data.unwrap()["sidecar.json"].as_bytes())?;
    let x = &cfg.external_issuers[0];
    assert_eq!((x.issuer.as_str(), x.subject_claim.as_str()), (idp.issuer.as_str(), "email"));
    assert_eq!(x.ca_file.as_deref(), Some("/etc/authrealm/issuer-ca/0.crt"));
    assert_eq!(x.algorithms, [Alg::RS256]);

    // `kubectl get authrealms` (the server-side table) shows the column.
    let req = http::Request::get(format!("/apis/authrealm.dev/v1alpha1/namespaces/{ns}/authrealms"))
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
    let table: serde_json::Value = serde_json::from_str(&client.request_text(req).await?)?;
    let columns: Vec<&str> =
        table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    let at = columns.iter().position(|c| *c == "Issuer Keys").expect("an Issuer Keys column");
    assert_eq!(table["rows"][0]["cells"][at], "True", "{table}");

    // The provider goes down: False with the fetch error; Ready is not affected (sidecars keep
    // the keys they have).
    idp.set_mode(Mode::Unavailable);
    let r =
        wait_condition(&client, &ns, "sso", "IssuerKeysReady", "False", Some("FetchFailed"), Duration::from_secs(30))
            .await?;
    let (_, _, message) = condition(&r, "IssuerKeysReady");
    assert!(message.contains(&idp.issuer) && message.contains("HTTP 503"), "{message}");
    assert_eq!(condition(&r, "Ready").0, "True");
    idp.set_mode(Mode::Malformed);
    wait_for("the malformed JWKS reported", Duration::from_secs(30), || {
        let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
        async move {
            let r = api.get("sso").await.ok()?;
            condition(&r, "IssuerKeysReady").2.contains("not valid JSON").then_some(())
        }
    })
    .await?;
    // Back: True again, counting the keys of a rotation.
    idp.rotate();
    idp.set_mode(Mode::Up);
    let r = wait_condition(&client, &ns, "sso", "IssuerKeysReady", "True", None, Duration::from_secs(30)).await?;
    assert_eq!(condition(&r, "IssuerKeysReady").2, format!("2 keys from {}", idp.issuer));
    // Each flip was announced: the outage, the malformed document, the recovery.
    let evs = wait_for("the recovery event", Duration::from_secs(10), || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let evs = events(&client, &ns, "sso").await;
            evs.iter().any(|(r, _)| r == "IssuerKeysLoaded").then_some(evs)
        }
    })
    .await?;
    let unavailable: Vec<&String> = evs.iter().filter(|(r, _)| r == "IssuerKeysUnavailable").map(|(_, n)| n).collect();
    assert!(unavailable.iter().any(|n| n.contains("HTTP 503")), "{evs:?}");
    assert!(unavailable.iter().any(|n| n.contains("not valid JSON")), "{evs:?}");

    // A CA bundle that does not sign the provider's certificate.
    let other = TestIdp::start(Alg::ES256).await?;
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta { name: Some("wrong-ca".into()), ..Default::default() },
            data: Some(BTreeMap::from([("ca.crt".to_string(), other.ca_pem.clone())])),
            ..Default::default()
        },
    )
    .await?;
    let spec = json!({
        "issuer": "https://auth2.example.test",
        "audiences": ["app"],
        "sessionMode": "stateless",
        "externalIssuers": [{
            "issuer": idp.issuer, "jwksUrl": idp.jwks_url(), "audiences": ["api"], "caBundle": {"name": "wrong-ca"},
        }],
    });
    create_realm(&client, &ns, &realm("wrongca", spec)).await?;
    let r = wait_condition(&client, &ns, "wrongca", "IssuerKeysReady", "False", None, Duration::from_secs(30)).await?;
    assert!(condition(&r, "IssuerKeysReady").2.contains("TLS"), "{:?}", condition(&r, "IssuerKeysReady"));

    // Refused at apply time.
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    let bad = |mode: &str, x: serde_json::Value| {
        realm(
            "bad",
            json!({
                "issuer": "https://auth3.example.test", "audiences": ["app"], "sessionMode": mode,
                "redis": {"endpoints": ["127.0.0.1:7000"]},
                "externalIssuers": [x],
            }),
        )
    };
    let good_x = json!({"issuer": idp.issuer, "discoveryUrl": idp.discovery_url(), "audiences": ["api"]});
    for (what, r, needle) in [
        ("single session mode", bad("single", good_x.clone()), "need sessionMode denylist or stateless"),
        (
            "plain http",
            bad(
                "denylist",
                json!({"issuer": "http://x", "discoveryUrl": "http://x/.well-known/openid-configuration", "audiences": ["api"]}),
            ),
            "https://",
        ),
        (
            "both URLs",
            bad(
                "denylist",
                json!({"issuer": "https://x", "discoveryUrl": "https://x/d", "jwksUrl": "https://x/j", "audiences": ["api"]}),
            ),
            "exactly one of discoveryUrl and jwksUrl",
        ),
        (
            "HMAC",
            bad(
                "denylist",
                json!({"issuer": "https://x", "jwksUrl": "https://x/j", "audiences": ["api"], "algorithms": ["HS256"]}),
            ),
            "asymmetric",
        ),
        (
            "a refetch interval of zero",
            bad(
                "denylist",
                json!({"issuer": "https://x", "jwksUrl": "https://x/j", "audiences": ["api"], "minRefetchInterval": "0s"}),
            ),
            "minRefetchInterval must be between 100ms and 1h",
        ),
        (
            "own issuer",
            bad(
                "denylist",
                json!({"issuer": "https://auth3.example.test", "jwksUrl": "https://x/j", "audiences": ["api"]}),
            ),
            "must differ from the realm's own issuer",
        ),
    ] {
        let e = api.create(&PostParams::default(), &r).await.expect_err(what);
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    let ok = bad("denylist", good_x);
    api.create(&PostParams::default(), &ok).await?;

    // The shipped example is accepted by the API server as it stands.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/external-oidc-realm.yaml"))?;
    let mut example: AuthRealm = serde_yaml_ng::from_str(&example)?;
    example.metadata.namespace = Some(ns.clone());
    let created = api.create(&PostParams { dry_run: true, ..Default::default() }, &example).await?;
    assert_eq!(created.spec.external_issuers.len(), 2);
    assert!(authrealm_operator::render::resolve("shop-sso", &ns, &created.spec).is_ok());
    op.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realms_naming_the_same_issuer_share_one_probe() -> anyhow::Result<()> {
    // A long check interval: every reconcile within it uses the one probe result.
    let (_env, client, ns, idp, op) = setup("extshare", Alg::ES256, Duration::from_secs(120)).await?;
    for name in ["one", "two", "three"] {
        let spec = json!({
            "issuer": format!("https://{name}.example.test"),
            "audiences": ["app"],
            "sessionMode": "stateless",
            "externalIssuers": [{
                "issuer": idp.issuer, "discoveryUrl": idp.discovery_url(), "audiences": ["api"],
                "algorithms": ["ES256"], "caBundle": {"name": "idp-ca"},
            }],
        });
        create_realm(&client, &ns, &realm(name, spec)).await?;
    }
    for name in ["one", "two", "three"] {
        wait_condition(&client, &ns, name, "IssuerKeysReady", "True", None, Duration::from_secs(30)).await?;
    }
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1), "three realms, one probe");
    op.stop().await
}
