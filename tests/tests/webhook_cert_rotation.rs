//! The webhook's self-managed certificates rotate (serving certificate every ~2 s, CA every 6 s)
//! while the real API server keeps creating opted-in Pods through it: not one admission fails.
//!
//! Two replicas share the TLS Secret, as the chart's two operator Pods do. The second checks the
//! Secret four times less often (besides checking, like every replica, when its certificate falls
//! due), so the replicas race for the rotations and each serves, for a while, a certificate the
//! other has already replaced — which must stay trusted. The configuration carries one webhook per
//! replica, so every Pod creation goes through both. Either replica may perform a rotation, so
//! the rotations counted are both replicas'.
//!
//! The API server keeps its connections to a webhook open and only verifies a certificate when it
//! connects (after a caBundle change, an idle timeout, a restart), so admissions alone would miss
//! a replica serving an expired or untrusted certificate between two connections. Between Pod
//! creations the test therefore also connects to each replica itself, trusting exactly that
//! webhook's published caBundle, as a new API server connection would.

mod webhook_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use authrealm_operator::webhook::metrics::{CertLabels, Outcome};
use authrealm_operator::webhook::{WebhookMetrics, start_webhook};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};
use webhook_support::{Fixture, MWC_NAME, app_pod, connect_trusting, eventually, sidecar_count};

const RUN_FOR: Duration = Duration::from_secs(20);
/// Name of replica B's entry in the MutatingWebhookConfiguration (replica A's is the chart's).
const ENTRY_B: &str = "replica-b.sidecar.authrealm.dev";

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
    let entry_a = entry_b["name"].as_str().unwrap_or_default().to_owned();
    entry_b["name"] = ENTRY_B.into();
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
    let replicas = [
        ("A", entry_a.as_str(), fx.webhook.as_ref().expect("the fixture runs replica A").local_addr()),
        ("B", ENTRY_B, replica_b.local_addr()),
    ];

    let ns = fx.namespace("rotate").await?;
    fx.create_realm(&ns, "demo", None, true).await?;
    // Whichever replica checks first after a rotation falls due performs it (the other adopts
    // it), so the rotations are the sum over both replicas.
    let rotations = |kind: &'static str| {
        let labels = CertLabels { kind };
        fx.metrics.cert_rotations.get_or_create(&labels).get() + metrics_b.cert_rotations.get_or_create(&labels).get()
    };
    let (ca0, serving0, reloads0, b_seen0) = (
        rotations("ca"),
        rotations("serving"),
        fx.metrics.cert_reloads.get(),
        metrics_b.admission(Outcome::Skipped, "AlreadyInjected"),
    );

    let started = Instant::now();
    let mut bundles = BTreeSet::new();
    let (mut created, mut handshakes, mut failures) = (0u32, 0u32, Vec::new());
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

        // A new connection to each replica, trusting what its webhook entry publishes.
        let webhooks = mwcs.get(MWC_NAME).await?.webhooks.unwrap_or_default();
        for (replica, entry, addr) in replicas {
            let Some(bundle) =
                webhooks.iter().find(|w| w.name == entry).and_then(|w| w.client_config.ca_bundle.clone())
            else {
                failures
                    .push(format!("replica {replica} at {:.1?}: webhook {entry} has no caBundle", started.elapsed()));
                continue;
            };
            if replica == "A" {
                bundles.insert(bundle.0.clone());
            }
            let at = started.elapsed();
            handshakes += 1;
            if let Err(e) = tokio::task::spawn_blocking(move || connect_trusting(addr, &bundle.0)).await? {
                failures
                    .push(format!("replica {replica} at {at:.1?}: a new connection trusting its caBundle failed: {e}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let (ca, serving) = (rotations("ca") - ca0, rotations("serving") - serving0);
    // Replica A loads every serving certificate within one of its check intervals; one issued
    // just before the loop ended may still be on its way.
    let reloads = eventually("replica A to load every new serving certificate", Duration::from_secs(5), || {
        let reloads = fx.metrics.cert_reloads.get() - reloads0;
        async move { Ok((reloads >= serving).then_some(reloads)) }
    })
    .await
    .unwrap_or_else(|_| fx.metrics.cert_reloads.get() - reloads0);
    eprintln!(
        "{created} pods and {handshakes} direct handshakes in {RUN_FOR:?} (slowest creation {slowest:.1?}); {ca} CA \
         promotions, {serving} serving certificates, {reloads} reloads by replica A, {} by replica B, {} distinct \
         caBundles",
        metrics_b.cert_reloads.get(),
        bundles.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures in {created} admissions and {handshakes} handshakes: {failures:#?}",
        failures.len()
    );
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
