//! Smoke tests of the [`KubeEnv`] harness against a real etcd + kube-apiserver
//! (+ kube-controller-manager). The binaries are built by `hack/control-plane.sh` on first use.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use authrealm_tests::kube_env::{KUBERNETES_VERSION, KubeEnv, KubeEnvOptions};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>()),
        ..ConfigMap::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_serves_configmaps_and_reports_its_version() -> anyhow::Result<()> {
    let env = KubeEnv::start(KubeEnvOptions::default()).await?;
    eprintln!("API server {} started in {:.1?}", env.server_url(), env.startup_duration());
    let client = env.client().await?;

    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, KUBERNETES_VERSION);
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "36"));

    let ns = env.create_temp_namespace("smoke").await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    cms.create(&PostParams::default(), &config_map("greeting", &[("hello", "world")])).await?;
    let read = cms.get("greeting").await?;
    assert_eq!(read.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(read.data.unwrap_or_default().get("hello").map(String::as_str), Some("world"));

    // The admin kubeconfig also works for kubectl.
    let out = env
        .kubectl()
        .args(["get", "configmap", "greeting", "-n", &ns])
        .args(["-o", "jsonpath={.data.hello}"])
        .output()?;
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "world");

    // And for helm (the cached build): listing releases needs a working connection.
    let out = env.helm().args(["list", "-n", &ns]).output()?;
    assert!(out.status.success(), "helm list failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_manager_garbage_collects_owned_objects() -> anyhow::Result<()> {
    let env = KubeEnv::start(KubeEnvOptions { controller_manager: true, ..KubeEnvOptions::default() }).await?;
    eprintln!("API server + controller-manager started in {:.1?}", env.startup_duration());
    let ns = env.create_temp_namespace("gc").await?;
    let cms: Api<ConfigMap> = Api::namespaced(env.client().await?, &ns);

    let owner = cms.create(&PostParams::default(), &config_map("owner", &[])).await?;
    let mut dependent = config_map("dependent", &[("owned", "yes")]);
    dependent.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().expect("server-assigned uid"),
        ..OwnerReference::default()
    }]);
    cms.create(&PostParams::default(), &dependent).await?;

    cms.delete("owner", &DeleteParams::background()).await?;
    let started = Instant::now();
    let timeout = Duration::from_secs(90);
    while cms.get_opt("dependent").await?.is_some() {
        assert!(
            started.elapsed() < timeout,
            "dependent ConfigMap still present {timeout:?} after its owner was deleted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("dependent garbage-collected {:.1?} after the owner's deletion", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_reports_the_apiserver_log() {
    let err = KubeEnv::start(KubeEnvOptions {
        extra_apiserver_args: vec!["--no-such-flag=1".into()],
        ..KubeEnvOptions::default()
    })
    .await
    .expect_err("kube-apiserver must reject an unknown flag");
    let msg = format!("{err:#}");
    eprintln!("expected start-up error:\n{msg}");
    assert!(msg.contains("kube-apiserver exited"), "{msg}");
    assert!(msg.contains("unknown flag: --no-such-flag"), "{msg}");
}
