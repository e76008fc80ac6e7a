//! The Helm chart (`charts/authrealm`): lint, golden rendering, server-side dry-run of every
//! rendered object against a real kube-apiserver, and `helm install` into it — with the chart's
//! own MutatingWebhookConfiguration pointed at the operator's webhook running in this process, so
//! the API server injects pods through exactly what the chart installs.
//!
//! Regenerate the golden files with `AUTHREALM_BLESS=1 cargo test -p authrealm-tests --test helm_chart`.

mod webhook_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use authrealm_operator::webhook::{WebhookConfig, WebhookMetrics, start_webhook};
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use authrealm_tests::support::TempDir;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{Api, PostParams};
use kube::discovery::Discovery;
use webhook_support::{app_pod, apply_document, create_pod_raw, create_realm, documents, eventually, sidecar_count};

const RELEASE: &str = "authrealm";
const NAMESPACE: &str = "authrealm-system";
/// Names the chart derives for release `authrealm` in `authrealm-system`.
const MWC: &str = "authrealm-authrealm-system-sidecar-injector";
const TLS_SECRET: &str = "authrealm-webhook-tls";
const SERVICE: &str = "authrealm-webhook";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn chart() -> PathBuf {
    repo().join("charts/authrealm")
}

fn bless() -> bool {
    std::env::var_os("AUTHREALM_BLESS").is_some()
}

/// The cached helm binary with throwaway home directories (no KubeEnv needed).
fn helm(home: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(KubeEnv::bin_dir()?.join("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"));
    Ok(cmd)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A throwaway helm home, removed when dropped (unique per call: tests render concurrently).
fn temp_home(name: &str) -> TempDir {
    TempDir::new(&format!("authrealm-helm-{name}")).unwrap()
}

/// `helm template` of the chart with `sets`.
fn render(sets: &[&str]) -> anyhow::Result<String> {
    let home = temp_home("render");
    let mut cmd = helm(&home)?;
    cmd.args(["template", RELEASE]).arg(chart()).args(["--namespace", NAMESPACE, "--kube-version", "1.36.0"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

const VARIANTS: &[(&str, &[&str])] = &[
    ("default", &[]),
    (
        "everything-on",
        &[
            "webhook.certManager.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "sampleRealm.enabled=true",
            "sampleRealm.redis.credentialsSecret=redis-auth",
            "operator.podAntiAffinity=hard",
            "webhook.unreadyRealmPolicy=warn",
        ],
    ),
    (
        "single-replica-ignore",
        &["operator.replicas=1", "webhook.failurePolicy=Ignore", "operator.podAntiAffinity=none"],
    ),
    ("one-namespace", &["operator.watchNamespace=apps"]),
];

#[test]
fn helm_lint_is_clean_for_every_variant() -> anyhow::Result<()> {
    let home = temp_home("lint");
    for (name, sets) in VARIANTS {
        let mut cmd = helm(&home)?;
        cmd.args(["lint", "--strict"]).arg(chart());
        for s in *sets {
            cmd.args(["--set", s]);
        }
        let out = run(&mut cmd).with_context(|| format!("variant {name}"))?;
        for line in out.lines() {
            ensure!(!line.contains("[WARNING]") && !line.contains("[ERROR]"), "helm lint ({name}): {line}\n{out}");
        }
    }
    // The schema refuses nonsense.
    let mut cmd = helm(&home)?;
    cmd.arg("lint").arg(chart()).args(["--set", "webhook.failurePolicy=Sometimes"]);
    let out = cmd.output()?;
    ensure!(!out.status.success(), "a failurePolicy outside Fail/Ignore must not lint");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(text.contains("failurePolicy"), "{text}");
    Ok(())
}

/// The chart ships the CRD generated from the Rust types.
#[test]
fn chart_crd_is_the_generated_crd() -> anyhow::Result<()> {
    let generated = std::fs::read_to_string(repo().join("crds/authrealm.yaml"))?;
    let shipped_path = chart().join("crds/authrealm.yaml");
    if bless() {
        std::fs::write(&shipped_path, &generated)?;
    }
    let shipped = std::fs::read_to_string(&shipped_path)?;
    ensure!(
        shipped == generated,
        "charts/authrealm/crds/authrealm.yaml differs from crds/authrealm.yaml: \
         cp crds/authrealm.yaml charts/authrealm/crds/ (or AUTHREALM_BLESS=1)"
    );
    Ok(())
}

#[test]
fn rendered_chart_matches_the_golden_files() -> anyhow::Result<()> {
    let dir = repo().join("tests/golden/chart");
    let mut stale = Vec::new();
    for (name, sets) in VARIANTS {
        let text = render(sets)?;
        let path = dir.join(format!("{name}.yaml"));
        if bless() {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, &text)?;
        }
        if std::fs::read_to_string(&path).unwrap_or_default() != text {
            stale.push(path.display().to_string());
        }
    }
    ensure!(
        stale.is_empty(),
        "rendered chart differs from {stale:?}; review and regenerate with \
         AUTHREALM_BLESS=1 cargo test -p authrealm-tests --test helm_chart"
    );
    Ok(())
}

/// What a user would notice: the webhook entry's safety settings and the operator's shape.
#[test]
fn rendered_chart_has_the_documented_safety_settings() -> anyhow::Result<()> {
    let docs = documents(&render(&[])?)?;
    let find =
        |kind: &str| docs.iter().find(|d| d["kind"] == kind).cloned().with_context(|| format!("no {kind} rendered"));
    let mwc = find("MutatingWebhookConfiguration")?;
    let wh = &mwc["webhooks"][0];
    assert_eq!(wh["failurePolicy"], "Fail");
    assert_eq!(wh["sideEffects"], "NoneOnDryRun");
    assert_eq!(wh["timeoutSeconds"], 10);
    assert_eq!(
        wh["objectSelector"]["matchExpressions"][0],
        serde_json::json!({"key": "authrealm.dev/realm", "operator": "Exists"})
    );
    let ns_sel = wh["namespaceSelector"]["matchExpressions"].to_string();
    assert!(ns_sel.contains("authrealm.dev/injection") && ns_sel.contains("kube-system"), "{ns_sel}");
    assert!(wh["clientConfig"].get("caBundle").is_none(), "the operator owns the caBundle");
    let dep = find("Deployment")?;
    assert_eq!(dep["spec"]["replicas"], 2);
    assert!(dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_object());
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(env.contains("AUTHREALM_LEADER_ELECT") && env.contains(MWC), "{env}");
    assert_eq!(find("PodDisruptionBudget")?["spec"]["minAvailable"], 1);
    Ok(())
}

async fn dry_run_apply(client: &kube::Client, discovery: &Discovery, doc: &serde_json::Value) -> anyhow::Result<()> {
    apply_document(client, discovery, doc, NAMESPACE, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_object_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    let env = KubeEnv::start(KubeEnvOptions::default()).await?;
    let client = env.client().await?;
    // The CRD first (Helm installs crds/ before templates), for real.
    for crd in documents(&std::fs::read_to_string(chart().join("crds/authrealm.yaml"))?)? {
        dry_run_apply(&client, &Discovery::new(client.clone()).run().await?, &crd).await?;
        let api: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        api.create(&PostParams::default(), &serde_json::from_value(crd)?).await?;
    }
    env.create_namespace(NAMESPACE).await?;
    let discovery = eventually("discovery of authrealm.dev", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let d = Discovery::new(client).run().await?;
            Ok(d.has_group("authrealm.dev").then_some(d))
        }
    })
    .await?;
    // Variants whose objects the test API server can serve (no cert-manager or Prometheus
    // Operator CRDs here); the sample realm is included.
    for sets in [
        &["sampleRealm.enabled=true", "sampleRealm.redis.credentialsSecret=redis-auth"][..],
        &["operator.replicas=1", "webhook.failurePolicy=Ignore", "webhook.url=https://127.0.0.1:9443/mutate-pods"][..],
    ] {
        let docs = documents(&render(sets)?)?;
        ensure!(docs.len() >= 8, "only {} objects rendered", docs.len());
        for doc in &docs {
            dry_run_apply(&client, &discovery, doc).await.with_context(|| format!("values {sets:?}"))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_succeeds_and_the_charts_webhook_configuration_injects_pods() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = KubeEnv::start(KubeEnvOptions::default()).await?;
    let client = env.client().await?;
    env.create_namespace(NAMESPACE).await?;

    // The operator's webhook, configured with the names the chart gives it, runs here; the chart
    // points its MutatingWebhookConfiguration at it by URL instead of the in-cluster Service.
    let mut config = WebhookConfig::loopback(NAMESPACE, MWC);
    config.tls_secret = TLS_SECRET.into();
    config.service_name = SERVICE.into();
    config.cert_check_interval = Duration::from_millis(500);
    config.sidecar_image = "ghcr.io/authrealm/authrealm-sidecar:0.1.0".into();
    let metrics = WebhookMetrics::new();
    let webhook = start_webhook(client.clone(), config, metrics.clone()).await?;
    let url = format!("https://{}/mutate-pods", webhook.local_addr());

    let started = std::time::Instant::now();
    let out = env
        .helm()
        .args(["install", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--set", &format!("webhook.url={url}"), "--wait=false", "--timeout", "60s"])
        .output()?;
    ensure!(
        out.status.success(),
        "helm install failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = String::from_utf8_lossy(&out.stdout);
    ensure!(notes.contains("authrealm.dev/realm"), "NOTES.txt explains how to opt in:\n{notes}");
    eprintln!("helm install took {:.1?}", started.elapsed());

    // What the chart created.
    let dep = Api::<Deployment>::namespaced(client.clone(), NAMESPACE).get("authrealm-operator").await?;
    assert_eq!(dep.spec.replicas, Some(2));
    Api::<PodDisruptionBudget>::namespaced(client.clone(), NAMESPACE).get("authrealm-operator").await?;
    let role = Api::<ClusterRole>::all(client.clone()).get("authrealm-authrealm-system-operator").await?;
    let verbs = serde_json::to_string(&role.rules)?;
    assert!(!verbs.contains("\"*\""), "no wildcard verbs: {verbs}");
    Api::<Role>::namespaced(client.clone(), NAMESPACE).get("authrealm-operator").await?;

    // The webhook publishes its CA into the chart's configuration…
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually("the caBundle in the chart's webhook configuration", Duration::from_secs(15), || {
        let mwcs = mwcs.clone();
        async move {
            let m = mwcs.get(MWC).await?;
            Ok(m.webhooks.and_then(|w| w[0].client_config.ca_bundle.clone()).map(|_| ()))
        }
    })
    .await?;

    // …and the API server injects opted-in pods through it.
    let app_ns = env.create_temp_namespace("app").await?;
    create_realm(&client, &app_ns, "demo", None, true).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &app_ns);
    let injected =
        eventually("a labelled pod injected through the chart's configuration", Duration::from_secs(30), || {
            let pods = pods.clone();
            async move {
                let p = pods
                    .create(&PostParams { dry_run: true, field_manager: None }, &app_pod("web", "demo", &[]))
                    .await?;
                Ok((sidecar_count(&p) == 1).then_some(p))
            }
        })
        .await?;
    let image = injected.spec.unwrap().init_containers.unwrap()[0].image.clone();
    assert_eq!(image.as_deref(), Some("ghcr.io/authrealm/authrealm-sidecar:0.1.0"));

    // kube-system is never sent to the webhook.
    let sys: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "kube-system");
    let p = sys.create(&PostParams::default(), &app_pod("sys", "demo", &[])).await?;
    assert_eq!(sidecar_count(&p), 0);

    // Operator down (failurePolicy Fail): opted-in pods are held back, every other pod is admitted.
    webhook.shutdown().await;
    let r = create_pod_raw(&client, &app_ns, &app_pod("held", "demo", &[]), false).await?;
    assert_eq!(r.status, 500, "an opted-in pod must not start unprotected: {}", r.body);
    assert!(r.body["message"].as_str().unwrap_or_default().contains("failed calling webhook"), "{}", r.body);
    let plain = pods.create(&PostParams::default(), &app_pod("plain", "", &[])).await?;
    assert_eq!(sidecar_count(&plain), 0);

    // Upgrade keeps the caBundle the operator wrote (Helm's three-way merge leaves it alone).
    let before = mwcs.get(MWC).await?.webhooks.unwrap()[0].client_config.ca_bundle.clone();
    let out = env
        .helm()
        .args(["upgrade", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--set", &format!("webhook.url={url}"), "--set", "webhook.timeoutSeconds=5"])
        .output()?;
    ensure!(out.status.success(), "helm upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    let after = mwcs.get(MWC).await?.webhooks.unwrap()[0].clone();
    assert_eq!(after.timeout_seconds, Some(5));
    assert_eq!(after.client_config.ca_bundle, before, "helm upgrade must not drop the caBundle");

    let out = env.helm().args(["uninstall", RELEASE, "--namespace", NAMESPACE]).output()?;
    ensure!(out.status.success(), "helm uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(mwcs.get_opt(MWC).await?.is_none(), "uninstall removes the webhook configuration");
    Ok(())
}
