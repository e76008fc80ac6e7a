//! Prometheus metrics of the operator. Label values are fixed strings (error kinds, key events),
//! never names of realms, keys or secrets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// `created`, `promoted`, `retired`, `removed`, `restored`, `adopted`, `lost`.
    pub event: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Reconciles run (successful or not).
    pub reconciles: Counter,
    /// Failed reconciles by error kind.
    pub errors: Family<KindLabel, Counter>,
    pub duration: Histogram,
    pub key_events: Family<EventLabel, Counter>,
    /// 1 while this replica holds the leader lease (or runs without leader election).
    pub leader: Gauge,
    /// Realms whose key set (private keys included) the controller holds in memory.
    pub cached_key_sets: Gauge,
    /// The sidecar-injection webhook (`authrealm_operator_webhook_*`).
    pub webhook: crate::webhook::WebhookMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("authrealm_operator");
        let reconciles = Counter::default();
        r.register("reconciles", "AuthRealm reconciles run", reconciles.clone());
        let errors = Family::<KindLabel, Counter>::default();
        r.register("reconcile_errors", "Failed AuthRealm reconciles by error kind", errors.clone());
        // 1 ms … ~33 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register("reconcile_duration_seconds", "Duration of AuthRealm reconciles", duration.clone());
        let key_events = Family::<EventLabel, Counter>::default();
        r.register("key_events", "Key lifecycle changes and key-set recoveries", key_events.clone());
        let leader = Gauge::default();
        r.register("leader", "1 while this replica is the leader", leader.clone());
        let cached_key_sets = Gauge::default();
        r.register(
            "cached_key_sets",
            "Realms whose key set (private keys included) the controller holds in memory",
            cached_key_sets.clone(),
        );
        let webhook = crate::webhook::WebhookMetrics::new();
        webhook.register(&mut r);
        Metrics { registry: Arc::new(r), reconciles, errors, duration, key_events, leader, cached_key_sets, webhook }
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
