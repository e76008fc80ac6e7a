//! What `hack/kind-up.sh` relies on, against a real kube-apiserver + kube-controller-manager
//! (no kubelet: pods are created and admitted but never run):
//!
//! * the chart installs, and its webhook configuration sends the login app's pods to the
//!   operator's webhook (running in this process);
//! * `hack/kind/redis-cluster.yaml`, `demo-realm.yaml` and `login-app.yaml` are accepted as
//!   written; the controllers create the Redis StatefulSet's 6 pods and the cluster-create Job's
//!   pod untouched, and the login app's Deployment pod with the sidecar as an issuer;
//! * the login app's Service targets a port name the injected sidecar declares;
//! * every shell script (`hack/*.sh`, `hack/lib/*.sh`, `.ci/run`) is shellcheck-clean.

mod webhook_support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use authrealm_operator::webhook::{WebhookConfig, WebhookMetrics, start_webhook};
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use webhook_support::{apply_document, documents, eventually, keys_volume, sidecar_count};

const NAMESPACE: &str = "authrealm-system";
const DEMO_NS: &str = "authrealm-demo";
const MWC: &str = "authrealm-authrealm-system-sidecar-injector";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// Every shell script of the repository (`hack/`, `hack/lib/`, `.ci/run`): the users' commands
/// (`hack/up.sh`, `hack/kind-up.sh`, `hack/demo.sh`) and the harnesses' (`hack/node.sh`, …) are
/// shellcheck-clean. `hack/install-deps.sh` installs shellcheck, so its absence is a failure.
#[test]
fn every_shell_script_is_shellcheck_clean() -> anyhow::Result<()> {
    let mut scripts = vec![repo().join(".ci/run")];
    for dir in ["hack", "hack/lib"] {
        for entry in std::fs::read_dir(repo().join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    scripts.sort();
    ensure!(scripts.iter().any(|p| p.ends_with("hack/up.sh")) && scripts.len() > 10, "scripts found: {scripts:?}");
    let out = std::process::Command::new("shellcheck")
        .current_dir(repo())
        .arg("--external-sources")
        .args(&scripts)
        .output()
        .context("run shellcheck (hack/install-deps.sh installs it)")?;
    ensure!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_demo_manifests_and_chart_work_together_through_the_api_server() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = KubeEnv::start(KubeEnvOptions { controller_manager: true, ..KubeEnvOptions::default() }).await?;
    let client = env.client().await?;
    env.create_namespace(NAMESPACE).await?;
    env.create_namespace(DEMO_NS).await?;

    let mut config = WebhookConfig::loopback(NAMESPACE, MWC);
    config.tls_secret = "authrealm-webhook-tls".into();
    config.cert_check_interval = Duration::from_millis(500);
    config.sidecar_image = "authrealm-sidecar:dev".into();
    config.sidecar_image_pull_policy = Some("Never".into());
    let webhook = start_webhook(client.clone(), config, WebhookMetrics::new()).await?;
    let url = format!("https://{}/mutate-pods", webhook.local_addr());

    // As kind-up.sh installs the chart (images built locally, never pulled).
    let out = env
        .helm()
        .args(["upgrade", "--install", "authrealm"])
        .arg(repo().join("charts/authrealm"))
        .args(["--namespace", NAMESPACE, "--create-namespace"])
        .args(["--set", "operator.image.repository=authrealm-operator", "--set", "operator.image.tag=dev"])
        .args(["--set", "operator.image.pullPolicy=Never", "--set", "sidecar.image.repository=authrealm-sidecar"])
        .args(["--set", "sidecar.image.tag=dev", "--set", "sidecar.image.pullPolicy=Never"])
        .args(["--set", &format!("webhook.url={url}")])
        .output()?;
    ensure!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));

    // Secret and ConfigMap the script creates imperatively.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), DEMO_NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "redis-auth", "labels": {"authrealm.dev/redis-credentials": "true"}},
                "stringData": {"password": "test-password"},
            }))?,
        )
        .await?;
    let app_dir = repo().join("examples/login-app");
    let cm = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some("login-app".into()), ..Default::default() },
        data: Some(
            [
                ("app.py".to_owned(), std::fs::read_to_string(app_dir.join("app.py"))?),
                ("users.json".to_owned(), std::fs::read_to_string(app_dir.join("users.json"))?),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), DEMO_NS).create(&PostParams::default(), &cm).await?;

    let discovery = eventually("discovery of authrealm.dev", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let d = Discovery::new(client).run().await?;
            Ok(d.has_group("authrealm.dev").then_some(d))
        }
    })
    .await?;
    for file in ["redis-cluster.yaml", "demo-realm.yaml", "login-app.yaml"] {
        let text = std::fs::read_to_string(repo().join("hack/kind").join(file))?;
        for doc in documents(&text)? {
            apply_document(&client, &discovery, &doc, DEMO_NS, false).await.with_context(|| file.to_owned())?;
        }
    }
    // The operator (not running here) would report the realm Ready; kind-up.sh waits for that,
    // and the webhook injects once KeysReady is True.
    let realms: Api<authrealm_operator::crd::AuthRealm> = Api::namespaced(client.clone(), DEMO_NS);
    let condition = |type_: &str| {
        serde_json::json!({"type": type_, "status": "True", "reason": "Reconciled", "message": "",
                           "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let conditions = ["Ready", "KeysReady", "RedisReachable"].map(condition);
    realms
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"conditions": conditions}})),
        )
        .await?;

    // The controllers create the pods, through the API server and its webhooks.
    let pods: Api<Pod> = Api::namespaced(client.clone(), DEMO_NS);
    let (redis, job, app) = eventually("the demo pods", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await?.items;
            let with = |label: &str| -> Vec<Pod> {
                list.iter()
                    .filter(|p| {
                        p.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/name")).map(String::as_str)
                            == Some(label)
                    })
                    .cloned()
                    .collect()
            };
            let (redis, job, app) = (with("redis-cluster"), with("redis-cluster-create"), with("login-app"));
            Ok((redis.len() == 6 && job.len() == 1 && app.len() == 1).then_some((redis, job, app)))
        }
    })
    .await?;
    for p in redis.iter().chain(&job) {
        assert_eq!(sidecar_count(p), 0, "{:?} was not opted in", p.metadata.name);
    }
    let app = &app[0];
    assert_eq!(sidecar_count(app), 1, "the login app's pod carries the sidecar");
    assert_eq!(keys_volume(app), Some(("secret", "demo-signing-keys".to_owned())), "it is an issuer");
    let sidecar = &app.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.image.as_deref(), Some("authrealm-sidecar:dev"));
    assert_eq!(sidecar.image_pull_policy.as_deref(), Some("Never"));

    // The Service's named targetPort resolves to the sidecar's public port.
    let svc = Api::<Service>::namespaced(client.clone(), DEMO_NS).get("login-app").await?;
    let target = svc.spec.unwrap().ports.unwrap()[0].target_port.clone().unwrap();
    let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) = target else {
        panic!("targetPort should be the port name")
    };
    let declared: Vec<String> = sidecar.ports.iter().flatten().filter_map(|p| p.name.clone()).collect();
    assert!(declared.contains(&name), "Service targets {name:?}, the sidecar declares {declared:?}");

    webhook.shutdown().await;
    Ok(())
}
