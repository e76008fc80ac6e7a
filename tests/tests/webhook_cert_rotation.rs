//! The webhook's self-managed certificates rotate (serving certificate every ~2 s, CA every 6 s)
//! while the real API server keeps creating opted-in Pods through it: not one admission fails.
//!
//! Two replicas share the TLS Secret, as the chart's two operator Pods do. The second checks the
//! Secret four times less often, so it regularly serves a certificate the first replica has
//! already replaced — which must stay trusted. The configuration carries one webhook per replica,
//! so every Pod creation goes through both.

mod webhook_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use authrealm_operator::webhook::metrics::{CertLabels, Outcome};
use authrealm_operator::webhook::{WebhookMetrics, start_webhook};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};
use webhook_support::{Fixture, MWC_NAME, app_pod, sidecar_count};

const RUN_FOR: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_failed_admission() -> anyhow::Result<()> {
    let fx = Fixture::start(|c| {
        c.ca_lifetime = Duration::from_secs(6);
        c.cert_lifetime = Duration::from_secs(3);
        c.cert_check_interval = Duration::from_millis(250);
    })
    .await?;
    // Replica B: same Secret and configuration, slower certificate checks, its own webhook entry.
    let mut config_b = fx.config.clone();
    config_b.cert_check_interval = Duration::from_secs(1);
    let metrics_b = WebhookMetrics::new();
    let replica_b = start_webhook(fx.client.clone(), config_b, metrics_b.clone()).await?;
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(fx.client.clone());
    let mut entry_b = serde_json::to_value(&mwcs.get(MWC_NAME).await?.webhooks.unwrap()[0])?;
    entry_b["name"] = "replica-b.sidecar.authrealm.dev".into();
    entry_b["clientConfig"]["url"] = format!("https://{}/mutate-pods", replica_b.local_addr()).into();
    mwcs.patch(
        MWC_NAME,
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(serde_json::json!([
            {"op": "add", "path": "/webhooks/-", "value": entry_b},
        ]))?),
    )
    .await?;
    fx.wait_until_serving().await?;

    let ns = fx.namespace("rotate").await?;
    fx.create_realm(&ns, "demo", None, true).await?;
    let ca_rotations = || fx.metrics.cert_rotations.get_or_create(&CertLabels { kind: "ca" }).get();
    let serving_rotations = || fx.metrics.cert_rotations.get_or_create(&CertLabels { kind: "serving" }).get();
    let (ca0, serving0, reloads0, b_seen0) = (
        ca_rotations(),
        serving_rotations(),
        fx.metrics.cert_reloads.get(),
        metrics_b.admission(Outcome::Skipped, "AlreadyInjected"),
    );

    let started = Instant::now();
    let mut bundles = BTreeSet::new();
    let (mut created, mut failures) = (0u32, Vec::new());
    let mut slowest = Duration::ZERO;
    while started.elapsed() < RUN_FOR {
        let name = format!("web-{created}");
        let t = Instant::now();
        let r = fx.create_pod_raw(&ns, &app_pod(&name, "demo", &[])).await?;
        slowest = slowest.max(t.elapsed());
        if r.status == 201 {
            let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(r.body)?;
            if sidecar_count(&pod) != 1 {
                failures.push(format!("{name}: admitted without the sidecar"));
            }
        } else {
            failures.push(format!("{name} at {:.1?}: HTTP {} {}", started.elapsed(), r.status, r.body["message"]));
        }
        created += 1;
        if let Some(b) = mwcs.get(MWC_NAME).await?.webhooks.and_then(|w| w[0].client_config.ca_bundle.clone()) {
            bundles.insert(b.0);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let (ca, serving, reloads) =
        (ca_rotations() - ca0, serving_rotations() - serving0, fx.metrics.cert_reloads.get() - reloads0);
    eprintln!(
        "{created} pods in {RUN_FOR:?} (slowest {slowest:.1?}); {ca} CA promotions, {serving} serving \
         certificates, {reloads} listener reloads, {} distinct caBundles",
        bundles.len()
    );
    assert!(failures.is_empty(), "{} of {created} admissions failed: {failures:#?}", failures.len());
    assert!(created >= 50, "only {created} pods created");
    assert!(ca >= 2, "expected at least 2 CA promotions in {RUN_FOR:?}, saw {ca}");
    assert!(serving >= 6, "expected at least 6 serving certificates in {RUN_FOR:?}, saw {serving}");
    assert!(reloads >= serving, "every new serving certificate was loaded ({reloads} < {serving})");
    assert!(bundles.len() >= 3, "the caBundle followed the CA rotations");
    let b_seen = metrics_b.admission(Outcome::Skipped, "AlreadyInjected") - b_seen0;
    assert_eq!(b_seen, u64::from(created), "replica B answered every admission after replica A injected");
    replica_b.shutdown().await;
    assert_eq!(fx.metrics.admission(Outcome::Error, "LookupFailed"), 0);
    Ok(())
}
