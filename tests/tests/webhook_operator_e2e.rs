//! End to end with the real `authrealm-operator` binary (run outside the cluster, as a developer
//! would): the chart is installed with its webhook configuration pointing at the operator's
//! webhook on 127.0.0.1, the operator reconciles a (stateless) AuthRealm to Ready, and a pod
//! labelled into the realm is injected with a sidecar whose mounts, ports and config objects
//! match what the reconciler wrote.

mod webhook_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use authrealm_contract::SidecarConfig;
use authrealm_operator::crd::AuthRealm;
use authrealm_tests::chart_operator::{ChartOperator, ChartOperatorOptions, NAMESPACE};
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use webhook_support::{app_pod, eventually, keys_volume, sidecar_count};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// The operator binary of this build (see `authrealm_tests::bins`).
fn operator_bin() -> anyhow::Result<PathBuf> {
    authrealm_tests::bins::operator()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_binary_reconciles_a_realm_and_injects_its_pods() -> anyhow::Result<()> {
    reconcile_and_inject(false).await
}

/// `operator.watchNamespace`: the chart grants Secret/ConfigMap access in that namespace only,
/// and the operator (as the chart's ServiceAccount) still does everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_confined_to_one_namespace_works_with_the_charts_namespaced_rbac() -> anyhow::Result<()> {
    reconcile_and_inject(true).await
}

async fn reconcile_and_inject(one_namespace: bool) -> anyhow::Result<()> {
    let bin = tokio::task::spawn_blocking(operator_bin).await??;
    let env = KubeEnv::start(KubeEnvOptions::default()).await?;
    let client = env.client().await?;
    env.create_namespace(NAMESPACE).await?;
    let ns = env.create_temp_namespace("e2e").await?;
    let mut op = ChartOperator::start(
        &env,
        repo(),
        &bin,
        &ChartOperatorOptions {
            watch_namespace: one_namespace.then_some(ns.as_str()),
            rust_log: "info",
            sidecar_image: "authrealm-sidecar:e2e",
            env: &[("AUTHREALM_WEBHOOK_CERT_CHECK_INTERVAL", "1s")],
        },
    )?;
    let http_port = op.http_port;

    let realms: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    realms
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "authrealm.dev/v1alpha1", "kind": "AuthRealm",
                "metadata": {"name": "demo"},
                "spec": {"issuer": "https://demo.example", "audiences": ["app"], "sessionMode": "stateless"},
            }))?,
        )
        .await?;
    let started = Instant::now();
    let ready = eventually("the operator to report the realm Ready", Duration::from_secs(60), || {
        let realms = realms.clone();
        async move {
            let r = realms.get("demo").await?;
            let ready = r
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok(ready.then_some(()))
        }
    })
    .await;
    if let Err(e) = ready {
        anyhow::bail!("{e}\noperator log:\n{}", op.log_tail());
    }
    eprintln!("realm Ready {:.1?} after creation", started.elapsed());

    // Pods are injected by the operator's own webhook, through the chart's configuration.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let web = eventually("a labelled pod injected by the operator", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let p =
                pods.create(&PostParams { dry_run: true, field_manager: None }, &app_pod("web", "demo", &[])).await?;
            Ok((sidecar_count(&p) == 1).then_some(p))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\noperator log:\n{}", op.log_tail()))?;
    let login =
        pods.create(&PostParams::default(), &app_pod("login", "demo", &[("authrealm.dev/role", "issuer")])).await?;
    assert_eq!(keys_volume(&web), Some(("configMap", "demo-jwks".to_owned())));
    assert_eq!(keys_volume(&login), Some(("secret", "demo-signing-keys".to_owned())));

    // The objects the sidecar mounts are the ones the reconciler wrote, and they agree.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config_cm = cms.get("demo-sidecar").await?;
    let config = SidecarConfig::from_json(config_cm.data.unwrap()["sidecar.json"].as_bytes())?;
    let jwks = cms.get("demo-jwks").await?;
    assert!(jwks.data.unwrap().contains_key("keyset.json"));
    let keys = Api::<Secret>::namespaced(client.clone(), &ns).get("demo-signing-keys").await?;
    assert!(keys.data.unwrap().contains_key("keyset.json"));
    let sidecar = &web.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    let mounts: Vec<String> = sidecar.volume_mounts.iter().flatten().map(|m| format!("{}/", m.mount_path)).collect();
    assert!(
        mounts.iter().any(|m| config.key_set_file.starts_with(m.as_str())),
        "keySetFile {} lies under a mount {mounts:?}",
        config.key_set_file
    );
    let ports: Vec<u16> = sidecar.ports.iter().flatten().map(|p| u16::try_from(p.container_port).unwrap()).collect();
    for listener in [&config.listeners.public, &config.listeners.admin] {
        let port: u16 = listener.rsplit(':').next().unwrap().parse()?;
        assert!(ports.contains(&port), "listener {listener} is declared: {ports:?}");
    }
    let probe_port = sidecar.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port.clone();
    assert_eq!(
        probe_port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
            config.listeners.admin.rsplit(':').next().unwrap().parse()?
        )
    );

    // Webhook metrics on the operator's /metrics.
    let metrics = reqwest_like_get(http_port, "/metrics").await?;
    assert!(
        metrics.contains(r#"authrealm_operator_webhook_admissions_total{outcome="injected",reason="issuer"} 1"#),
        "{metrics}"
    );
    // The webhook's watch caches of AuthRealms and Namespaces have listed with the chart's RBAC
    // (list/watch), and the pods of a ready realm are answered from them (once the watch has
    // delivered the realm's Ready status, which the first pods may have beaten).
    let cache_lines: Vec<&str> =
        metrics.lines().filter(|l| l.starts_with("authrealm_operator_webhook_cache_synced")).collect();
    assert_eq!(cache_lines, ["authrealm_operator_webhook_cache_synced 1"], "{}", op.log_tail());
    eventually("an admission answered from the webhook's caches", Duration::from_secs(10), || {
        let pods = pods.clone();
        async move {
            let p = pods
                .create(&PostParams { dry_run: true, field_manager: None }, &app_pod("cached", "demo", &[]))
                .await?;
            ensure!(sidecar_count(&p) == 1, "not injected");
            let metrics = reqwest_like_get(http_port, "/metrics").await?;
            let from_cache = metrics
                .lines()
                .find_map(|l| l.strip_prefix(r#"authrealm_operator_webhook_lookups_total{source="cache"} "#))
                .and_then(|n| n.trim().parse::<u64>().ok());
            Ok(from_cache.is_some_and(|n| n >= 1).then_some(()))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\noperator log:\n{}", op.log_tail()))?;

    // SIGTERM: a clean exit.
    let pid = op.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = op.child.try_wait()? {
            ensure!(status.success(), "operator exited with {status}\n{}", op.log_tail());
            break;
        }
        ensure!(Instant::now() < deadline, "operator still running 20s after SIGTERM\n{}", op.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// GET http://127.0.0.1:port/path (plain HTTP/1.0, so the body is not chunked).
async fn reqwest_like_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
