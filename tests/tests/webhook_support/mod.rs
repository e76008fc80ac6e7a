//! Shared fixture of the webhook tests: a real kube-apiserver, the AuthRealm CRD, the operator's
//! webhook running in-process on a loopback port, and a MutatingWebhookConfiguration that points
//! the API server at it (`clientConfig.url: https://127.0.0.1:PORT/mutate-pods`) with the caBundle
//! the webhook publishes itself. The configuration mirrors the Helm chart's (selectors, failure
//! policy, side effects, reinvocation).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use authrealm_operator::crd::AuthRealm;
use authrealm_operator::webhook::{self, WebhookConfig, WebhookHandle, WebhookMetrics};
use authrealm_tests::kube_env::{KubeEnv, KubeEnvOptions};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

pub const SYSTEM_NS: &str = "authrealm-system";
pub const MWC_NAME: &str = "authrealm-sidecar-injector";

pub struct Fixture {
    pub env: KubeEnv,
    pub client: Client,
    pub webhook: Option<WebhookHandle>,
    pub metrics: WebhookMetrics,
    pub config: WebhookConfig,
}

/// The chart's webhook entry, pointed at a URL instead of a Service.
pub fn webhook_configuration(url: &str) -> MutatingWebhookConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MWC_NAME},
        "webhooks": [{
            "name": "sidecar.authrealm.dev",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": url},
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "failurePolicy": "Fail",
            "sideEffects": "NoneOnDryRun",
            "timeoutSeconds": 10,
            "reinvocationPolicy": "IfNeeded",
            "matchPolicy": "Equivalent",
            "namespaceSelector": {"matchExpressions": [
                {"key": "authrealm.dev/injection", "operator": "NotIn", "values": ["disabled"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]},
            ]},
            "objectSelector": {"matchExpressions": [
                {"key": "authrealm.dev/realm", "operator": "Exists"},
            ]},
        }],
    }))
    .expect("valid MutatingWebhookConfiguration")
}

#[allow(unused_imports)] // each test binary uses some of them
pub use authrealm_tests::support::{install_crd, wait_for as eventually};

impl Fixture {
    /// Starts everything; `tune` adjusts the webhook settings (policy, certificate lifetimes).
    pub async fn start(tune: impl FnOnce(&mut WebhookConfig)) -> anyhow::Result<Fixture> {
        Self::start_with(KubeEnvOptions::default(), tune).await
    }

    pub async fn start_with(opts: KubeEnvOptions, tune: impl FnOnce(&mut WebhookConfig)) -> anyhow::Result<Fixture> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let env = KubeEnv::start(opts).await?;
        let client = env.client().await?;
        install_crd(&client).await?;
        env.create_namespace(SYSTEM_NS).await?;

        // The configuration exists before the webhook starts (as with the chart), first with a
        // URL nobody listens on; the webhook fills in the caBundle, then the test sets the port.
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        mwcs.create(&PostParams::default(), &webhook_configuration("https://127.0.0.1:9/mutate-pods"))
            .await
            .context("creating the MutatingWebhookConfiguration")?;

        let mut config = WebhookConfig::loopback(SYSTEM_NS, MWC_NAME);
        config.sidecar_image = "authrealm-sidecar:test".into();
        tune(&mut config);
        let metrics = WebhookMetrics::new();
        let handle = webhook::start_webhook(client.clone(), config.clone(), metrics.clone()).await?;
        let url = format!("https://{}/mutate-pods", handle.local_addr());
        mwcs.patch(
            MWC_NAME,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(json!([
                {"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url},
            ]))?),
        )
        .await?;

        let fixture = Fixture { env, client, webhook: Some(handle), metrics, config };
        fixture.wait_until_serving().await?;
        Ok(fixture)
    }

    /// Until the API server calls the webhook: a dry-run of a labelled Pod comes back injected.
    pub async fn wait_until_serving(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let ns = self.namespace("probe").await?;
        self.create_realm(&ns, "probe", None, true).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let pod = app_pod("probe", "probe", &[]);
        eventually("the API server to call the webhook", Duration::from_secs(30), || {
            let pods = pods.clone();
            let pod = pod.clone();
            async move {
                let dry = PostParams { dry_run: true, field_manager: None };
                let created = pods.create(&dry, &pod).await?;
                Ok((sidecar_count(&created) == 1).then_some(()))
            }
        })
        .await?;
        eprintln!("webhook: API server calls it {:.1?} after the fixture started it", started.elapsed());
        Ok(started.elapsed())
    }

    /// A new namespace with optional labels.
    pub async fn namespace_with(&self, prefix: &str, labels: &[(&str, &str)]) -> anyhow::Result<String> {
        let ns = self.env.create_temp_namespace(prefix).await?;
        if !labels.is_empty() {
            let labels: BTreeMap<_, _> = labels.iter().copied().collect();
            let api: Api<Namespace> = Api::all(self.client.clone());
            api.patch(&ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}}))).await?;
        }
        Ok(ns)
    }

    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        self.namespace_with(prefix, &[]).await
    }

    /// See [`create_realm`].
    pub async fn create_realm(
        &self,
        ns: &str,
        name: &str,
        algorithm: Option<&str>,
        ready: bool,
    ) -> anyhow::Result<AuthRealm> {
        create_realm(&self.client, ns, name, algorithm, ready).await
    }

    pub fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// See [`create_pod_raw`].
    pub async fn create_pod_raw(&self, ns: &str, pod: &Pod) -> anyhow::Result<RawResponse> {
        create_pod_raw(&self.client, ns, pod, false).await
    }

    /// `POST …/pods?dryRun=All`: admission runs (webhooks see `dryRun: true`), nothing is stored.
    pub async fn create_pod_dry_run(&self, ns: &str, pod: &Pod) -> anyhow::Result<RawResponse> {
        create_pod_raw(&self.client, ns, pod, true).await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The webhook tasks stop with the test's runtime; nothing else to do. (The KubeEnv's drop
        // kills the control plane.)
        drop(self.webhook.take());
    }
}

pub struct RawResponse {
    pub status: u16,
    pub warnings: Vec<String>,
    pub body: Value,
}

/// A Pod with one app container that meets the `restricted` Pod Security Standard, labelled
/// into `realm` (unless `realm` is empty), with extra annotations.
pub fn app_pod(name: &str, realm: &str, annotations: &[(&str, &str)]) -> Pod {
    let mut labels = BTreeMap::from([("app", name)]);
    if !realm.is_empty() {
        labels.insert("authrealm.dev/realm", realm);
    }
    let annotations: BTreeMap<_, _> = annotations.iter().copied().collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": "example/app:1",
                "ports": [{"containerPort": 8080}],
                "securityContext": {
                    "runAsUser": 1000,
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))
    .expect("valid pod")
}

/// How many sidecar containers the Pod carries (init containers and containers).
pub fn sidecar_count(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref();
    spec.map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .filter(|c| c.name == webhook::SIDECAR_CONTAINER)
            .count()
    })
    .unwrap_or(0)
}

/// The keys volume of an injected Pod: ("secret", name) or ("configMap", name).
pub fn keys_volume(pod: &Pod) -> Option<(&'static str, String)> {
    let v = pod.spec.as_ref()?.volumes.iter().flatten().find(|v| v.name == "authrealm-keys")?;
    if let Some(s) = &v.secret {
        return Some(("secret", s.secret_name.clone().unwrap_or_default()));
    }
    v.config_map.as_ref().map(|c| ("configMap", c.name.clone()))
}

/// Every Secret any volume of the Pod mounts.
pub fn mounted_secrets(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .map(|s| s.volumes.iter().flatten().filter_map(|v| v.secret.as_ref()?.secret_name.clone()).collect())
        .unwrap_or_default()
}

/// Creates an AuthRealm (ES256 unless `algorithm` says otherwise, Redis credentials from the
/// Secret `redis-auth`) and sets its conditions as the operator would: when `ready`, all True;
/// otherwise KeysReady=False (reason NoSigningKey) and so Ready=False — the webhook's gate is
/// KeysReady.
pub async fn create_realm(
    client: &Client,
    ns: &str,
    name: &str,
    algorithm: Option<&str>,
    ready: bool,
) -> anyhow::Result<AuthRealm> {
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), ns);
    let realm: AuthRealm = serde_json::from_value(json!({
        "apiVersion": "authrealm.dev/v1alpha1",
        "kind": "AuthRealm",
        "metadata": {"name": name},
        "spec": {
            "issuer": format!("https://{name}.example"),
            "audiences": ["app"],
            "algorithm": algorithm.unwrap_or("ES256"),
            "redis": {
                "endpoints": ["redis-0.redis:6379"],
                "credentials": {"secretName": "redis-auth"},
            },
        },
    }))?;
    api.create(&PostParams::default(), &realm).await.with_context(|| format!("creating AuthRealm {ns}/{name}"))?;
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        })
    };
    let conditions = if ready {
        vec![
            condition("Ready", "True", "Reconciled", "keys, JWKS and sidecar config are up to date"),
            condition("KeysReady", "True", "KeysCurrent", "key k1 (ES256) signs; 1 key(s) published"),
            condition("RedisReachable", "True", "ClusterOk", "redis-0.redis:6379: cluster_state ok"),
        ]
    } else {
        vec![
            condition("Ready", "False", "NoSigningKey", "KeysReady: no current key"),
            condition("KeysReady", "False", "NoSigningKey", "no current key"),
            condition("RedisReachable", "True", "ClusterOk", "redis-0.redis:6379: cluster_state ok"),
        ]
    };
    let patched = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"conditions": conditions}})))
        .await?;
    Ok(patched)
}

/// Creates a Pod through the API server and returns the HTTP status, the `Warning` headers and
/// the body (the created Pod or a Status).
pub async fn create_pod_raw(client: &Client, ns: &str, pod: &Pod, dry_run: bool) -> anyhow::Result<RawResponse> {
    let query = if dry_run { "?dryRun=All" } else { "" };
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods{query}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(pod)?)?;
    let resp = client.send(req.map(Into::into)).await?;
    let status = resp.status().as_u16();
    let warnings =
        resp.headers().get_all("warning").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
    Ok(RawResponse { status, warnings, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) })
}

/// The documents of a multi-document YAML file (empty documents skipped).
pub fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Server-side apply of one object (as `kubectl apply --server-side [--dry-run=server]`);
/// namespaced objects without a namespace go to `default_ns`.
pub async fn apply_document(
    client: &Client,
    discovery: &kube::discovery::Discovery,
    doc: &Value,
    default_ns: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    use kube::discovery::Scope;
    let obj: DynamicObject = serde_json::from_value(doc.clone())?;
    let types = obj.types.clone().context("object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let (ar, caps) = discovery.resolve_gvk(&gvk).with_context(|| format!("the API server does not serve {gvk:?}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            Api::namespaced_with(client.clone(), obj.metadata.namespace.as_deref().unwrap_or(default_ns), &ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let name = obj.metadata.name.clone().context("object without a name")?;
    let mut pp = PatchParams::apply("authrealm-tests");
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(&name, &pp, &Patch::Apply(&obj))
        .await
        .with_context(|| format!("server-side apply (dry run: {dry_run}) of {} {name}", gvk.kind))?;
    Ok(())
}

/// Opens a TLS connection to the webhook at `addr` (named by its IP address, as the webhook URL
/// names it) the way a new API server connection would: trusting only the CAs of `ca_bundle`
/// (PEM, what the webhook's `caBundle` holds) and checking validity at the current time.
pub fn connect_trusting(addr: SocketAddr, ca_bundle: &[u8]) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_bundle) {
        roots.add(der.map_err(|e| format!("caBundle: {e}"))?).map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(roots.into(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(GoClock(webpki)))
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), ServerName::IpAddress(addr.ip().into()))
        .map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The standard verifier, checking expiry as the API server (Go's crypto/x509) does. webpki
/// compares whole seconds, so it accepts a certificate for up to a second after its `notAfter`;
/// Go rejects it from the first instant past it. Verifying at the current time rounded up to the
/// next second gives Go's answer.
#[derive(Debug)]
struct GoClock(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for GoClock {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let rounded_up = Duration::from_secs(now.as_secs() + u64::from(now.subsec_nanos() > 0));
        self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            UnixTime::since_unix_epoch(rounded_up),
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
