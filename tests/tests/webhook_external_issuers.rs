//! Injection for a realm with external issuers, through a real kube-apiserver calling the
//! operator's webhook: the issuers' CA bundles reach the sidecar where its config names them, and
//! the pod still passes the `restricted` Pod Security Standard.
#![allow(clippy::unwrap_used)]

mod webhook_support;

use authrealm_operator::crd::AuthRealm;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use webhook_support::{Fixture, app_pod, mounted_secrets, sidecar_count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_ca_bundles_are_mounted_where_the_sidecar_config_names_them() -> anyhow::Result<()> {
    let fx = Fixture::start(|_| {}).await?;
    let ns = fx
        .namespace_with(
            "extiss",
            &[
                ("pod-security.kubernetes.io/enforce", "restricted"),
                ("pod-security.kubernetes.io/enforce-version", "latest"),
            ],
        )
        .await?;
    let realms: Api<AuthRealm> = Api::namespaced(fx.client.clone(), &ns);
    let realm: AuthRealm = serde_json::from_value(json!({
        "apiVersion": "authrealm.dev/v1alpha1",
        "kind": "AuthRealm",
        "metadata": {"name": "sso"},
        "spec": {
            "issuer": "https://sso.example",
            "audiences": ["app"],
            "sessionMode": "stateless",
            "externalIssuers": [
                {"issuer": "https://dex.example/dex", "discoveryUrl": "https://dex.example/dex/.well-known/openid-configuration",
                 "audiences": ["web"], "caBundle": {"name": "dex-ca"}},
                {"issuer": "https://accounts.example", "jwksUrl": "https://accounts.example/keys", "audiences": ["web"]},
                {"issuer": "https://kc.example/realms/a", "jwksUrl": "https://kc.example/realms/a/certs",
                 "audiences": ["web"], "caBundle": {"name": "kc-ca", "key": "bundle.pem"}},
            ],
        },
    }))?;
    realms.create(&PostParams::default(), &realm).await?;
    let ready = |t: &str, r: &str| json!({"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    realms
        .patch_status(
            "sso",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [ready("Ready", "Reconciled"), ready("KeysReady", "KeysCurrent")]}}),
            ),
        )
        .await?;

    let r = fx.create_pod_raw(&ns, &app_pod("web", "sso", &[])).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let pod: Pod = serde_json::from_value(r.body)?;
    assert_eq!(sidecar_count(&pod), 1);
    let spec = pod.spec.as_ref().unwrap();
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "authrealm-issuer-ca").expect("issuer CA volume");
    let sources: Vec<(String, String, String)> = volume
        .projected
        .as_ref()
        .unwrap()
        .sources
        .iter()
        .flatten()
        .map(|s| {
            let cm = s.config_map.as_ref().unwrap();
            let item = &cm.items.as_ref().unwrap()[0];
            (cm.name.clone(), item.key.clone(), item.path.clone())
        })
        .collect();
    // Issuer 1 uses the system roots: nothing mounted for it.
    assert_eq!(
        sources,
        [("dex-ca".into(), "ca.crt".into(), "0.crt".into()), ("kc-ca".into(), "bundle.pem".into(), "2.crt".into())]
    );
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.name == "authrealm-issuer-ca").unwrap();
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/authrealm/issuer-ca", Some(true)));
    // The paths the operator renders into sidecar.json.
    let rendered = authrealm_operator::render::resolve("sso", &ns, &realms.get("sso").await?.spec).unwrap().config;
    let files: Vec<Option<String>> = rendered.external_issuers.iter().map(|x| x.ca_file.clone()).collect();
    assert_eq!(
        files,
        [Some("/etc/authrealm/issuer-ca/0.crt".into()), None, Some("/etc/authrealm/issuer-ca/2.crt".into())]
    );
    assert!(mounted_secrets(&pod).is_empty(), "CA bundles are ConfigMaps, not Secrets");
    Ok(())
}
