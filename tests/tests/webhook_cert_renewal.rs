//! A replica never serves an expired certificate, even with the longest check interval the flags
//! allow (a third of the certificate lifetime).
//!
//! Renewal falls due when a third of the lifetime is left — in whole seconds, so with a 5 s
//! certificate one second before it expires, while the check interval may be 5/3 s. A replica
//! that only checked at its interval could find the renewal due up to ⅔ s after the certificate
//! expired, and every new API server connection in that gap would fail the admission (the API
//! server opens one after each caBundle change, an idle timeout, a restart). The replica must
//! check at the renewal time instead. Connections are opened directly, trusting the published
//! caBundle and checking expiry as the API server does, many times a second.

mod webhook_support;

use std::time::{Duration, Instant};

use authrealm_operator::webhook::metrics::CertLabels;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;
use webhook_support::{Fixture, MWC_NAME, connect_trusting};

const RUN_FOR: Duration = Duration::from_secs(16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_checking_as_rarely_as_allowed_renews_before_expiry() -> anyhow::Result<()> {
    let fx = Fixture::start(|c| {
        c.ca_lifetime = Duration::from_secs(60);
        c.cert_lifetime = Duration::from_secs(5);
        c.cert_check_interval = Duration::from_millis(1666);
    })
    .await?;
    fx.config.validate().map_err(anyhow::Error::msg)?;
    let addr = fx.webhook.as_ref().expect("the fixture runs the webhook").local_addr();
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(fx.client.clone());
    let renewals = || fx.metrics.cert_rotations.get_or_create(&CertLabels { kind: "serving" }).get();
    let renewals0 = renewals();

    let started = Instant::now();
    let (mut connections, mut failures) = (0u32, Vec::new());
    while started.elapsed() < RUN_FOR {
        let bundle = mwcs
            .get(MWC_NAME)
            .await?
            .webhooks
            .and_then(|w| w[0].client_config.ca_bundle.clone())
            .ok_or_else(|| anyhow::anyhow!("the webhook has no caBundle"))?;
        let at = started.elapsed();
        connections += 1;
        if let Err(e) = tokio::task::spawn_blocking(move || connect_trusting(addr, &bundle.0)).await? {
            failures.push(format!("at {at:.2?}: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let renewed = renewals() - renewals0;
    eprintln!("{connections} connections in {RUN_FOR:?}, {renewed} serving certificates issued");
    assert!(failures.is_empty(), "{} of {connections} connections failed: {failures:#?}", failures.len());
    // A certificate is renewed 4 s after it is issued; the run spans at least three renewals.
    assert!(renewed >= 3, "expected at least 3 serving certificates in {RUN_FOR:?}, saw {renewed}");
    assert!(connections >= 100, "only {connections} connections");
    Ok(())
}
