//! Webhook metrics. Label values are fixed strings (outcomes, reasons, certificate kinds), never
//! names of pods, realms or namespaces.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the admission-duration buckets: 0.1 ms steps up to 1 ms, 0.5 ms up to
/// 5 ms, 1 ms up to 15 ms (around the 10 ms target of the webhook's p99, so a quantile read from
/// the buckets is within a millisecond of the truth there), then coarser up to the API server's
/// 10 s webhook timeout.
pub const ADMISSION_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0003, 0.0004, 0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.0015, 0.002, 0.0025, 0.003,
    0.0035, 0.004, 0.0045, 0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.011, 0.012, 0.013, 0.014, 0.015, 0.020, 0.025,
    0.030, 0.040, 0.050, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Outcome of one admission review.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Admitted unchanged (opt-out, not opted in, already injected, or a warned skip).
    Skipped,
    /// Refused by policy (unknown or unready realm, invalid label or annotation, conflicts).
    Denied,
    /// The webhook could not decide (API lookup failed, malformed review); the Pod was refused.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped`, `denied`, `error`.
    pub outcome: &'static str,
    /// Skip/deny reason (`PodOptOut`, `RealmNotFound`, …), the role for injections
    /// (`verifier`, `issuer`), or the error kind.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `cache`, `unsynced` or `confirm` ([`super::lookup::Source`]).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `ca` (a CA promotion or a new CA chain) or `serving` (a new serving certificate).
    pub kind: &'static str,
}

/// The webhook's metrics. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    pub admissions: Family<AdmissionLabels, Counter>,
    pub duration: Histogram,
    /// Admissions that needed the Pod's Namespace and AuthRealm, by where the facts came from.
    pub lookups: Family<LookupLabels, Counter>,
    /// 1 once the webhook's AuthRealm and Namespace watch caches have listed.
    pub cache_synced: Gauge,
    /// Certificates this replica generated (self-managed mode).
    pub cert_rotations: Family<CertLabels, Counter>,
    /// Serving certificates this replica loaded into its TLS listener.
    pub cert_reloads: Counter,
    /// `notAfter` (Unix seconds) of the serving certificate in use.
    pub cert_expiry: Gauge,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookMetrics {
    pub fn new() -> Self {
        WebhookMetrics {
            admissions: Family::default(),
            duration: Histogram::new(ADMISSION_BUCKETS.iter().copied()),
            lookups: Family::default(),
            cache_synced: Gauge::default(),
            cert_rotations: Family::default(),
            cert_reloads: Counter::default(),
            cert_expiry: Gauge::default(),
        }
    }

    /// Registers every metric under `<prefix of registry>_webhook_…`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("webhook");
        r.register("admissions", "Pod admission reviews by outcome and reason", self.admissions.clone());
        r.register(
            "admission_duration_seconds",
            "Time to answer an admission review, lookups included",
            self.duration.clone(),
        );
        r.register(
            "lookups",
            "Admissions that looked up their Namespace and AuthRealm, by source: cache (the webhook's watch \
             caches), unsynced (the API server, caches not listed yet), confirm (the API server, after the \
             cached facts gave a refusal or a skip)",
            self.lookups.clone(),
        );
        r.register(
            "cache_synced",
            "Whether the webhook's AuthRealm and Namespace watch caches have listed (1) or not yet (0)",
            self.cache_synced.clone(),
        );
        r.register("cert_rotations", "Webhook certificates generated, by kind", self.cert_rotations.clone());
        r.register("cert_reloads", "Serving certificates loaded into the TLS listener", self.cert_reloads.clone());
        r.register(
            "cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use",
            self.cert_expiry.clone(),
        );
    }

    /// Text exposition of these metrics alone, prefixed `authrealm_operator_webhook_`.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("authrealm_operator");
        self.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
        out
    }

    /// The count of one (outcome, reason) pair.
    pub fn admission(&self, outcome: Outcome, reason: &'static str) -> u64 {
        self.admissions.get_or_create(&AdmissionLabels { outcome: outcome.as_str(), reason }).get()
    }

    /// The count of admissions whose facts came from `source`.
    pub fn lookups(&self, source: super::lookup::Source) -> u64 {
        self.lookups.get_or_create(&LookupLabels { source: source.as_str() }).get()
    }

    pub fn lookups_inc(&self, source: super::lookup::Source) {
        self.lookups.get_or_create(&LookupLabels { source: source.as_str() }).inc();
    }

    /// Counts one admission.
    pub fn admissions_inc(&self, outcome: Outcome, reason: &'static str) {
        self.admissions.get_or_create(&AdmissionLabels { outcome: outcome.as_str(), reason }).inc();
    }
}
