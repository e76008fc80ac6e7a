//! Prometheus metrics of the sidecar (text exposition on the admin listener).
//!
//! Label values are fixed, low-cardinality strings — never tokens, subjects or keys.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `allowed`, `public`, `rejected`, `unavailable`, `fail_open`.
    pub outcome: &'static str,
    /// Why (a [`crate::token::Reject`] label, `ok`, or the Redis error kind).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl OutcomeLabel {
    pub fn new(outcome: &'static str) -> Self {
        OutcomeLabel { outcome }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// Status class of the app's answer (`2xx` … `5xx`), or `error` / `timeout`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// One external issuer (from the config: bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabel {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub issuer: String,
    /// `start`, `refresh`, `unknown_kid`.
    pub trigger: &'static str,
    /// `ok`, `error`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50µs … ~3.3s
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub validation_seconds: Histogram,
    pub redis_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub upstream_responses: Family<StatusLabel, Counter>,
    pub upstream_seconds: Histogram,
    pub fail_open: Counter,
    pub key_reloads: Family<OutcomeLabel, Counter>,
    pub issuer_requests: Family<OpLabel, Counter>,
    pub redis_ready: Gauge,
    pub in_flight: Gauge,
    /// Open connections on the public listener.
    pub connections: Gauge,
    /// Connections closed at accept because the listener held `limits.maxConnections`.
    pub connections_refused: Counter,
    /// Connections closed because they stayed idle for `limits.idleTimeoutMs`.
    pub connections_idle_closed: Counter,
    /// Upgraded connections and streaming responses ended by a re-check, by reason.
    pub long_lived_ended: Family<OutcomeLabel, Counter>,
    pub token_cache: crate::tokencache::CacheStats,
    pub session_cache: crate::sessioncache::CacheMetrics,
    /// External issuers' key fetches (discovery + JWKS) by issuer, trigger and result.
    pub jwks_fetches: Family<FetchLabels, Counter>,
    pub jwks_keys: Family<IssuerLabel, Gauge>,
    pub jwks_keys_skipped: Family<IssuerLabel, Gauge>,
    pub jwks_fresh: Family<IssuerLabel, Gauge>,
    pub jwks_last_success: Family<IssuerLabel, Gauge>,
    /// Series of the request path, looked up once (a `Family` lookup takes a lock and hashes
    /// the labels).
    hot: Arc<Hot>,
}

/// Status labels of `upstream_responses`, in the order of [`Hot::upstream`].
const UPSTREAM_STATUSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "timeout"];

#[derive(Default)]
struct Hot {
    allowed_ok: OnceLock<Counter>,
    public_route: OnceLock<Counter>,
    upstream: [OnceLock<Counter>; UPSTREAM_STATUSES.len()],
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("authrealm_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        r.register("requests", "Requests on the public listener by outcome and reason", requests.clone());
        let validation_seconds = latency_histogram();
        r.register(
            "validation_seconds",
            "Time to parse and verify a bearer token (no Redis)",
            validation_seconds.clone(),
        );
        let redis_seconds = Family::<OpLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        r.register("redis_seconds", "Redis Cluster round trips by operation and outcome", redis_seconds.clone());
        let upstream_responses = Family::<StatusLabel, Counter>::default();
        r.register("upstream_responses", "Responses from the app by status class", upstream_responses.clone());
        let upstream_seconds = latency_histogram();
        r.register("upstream_seconds", "Time until the app's response headers", upstream_seconds.clone());
        let fail_open = Counter::default();
        r.register(
            "fail_open",
            "Requests admitted on signature and claims only because Redis could not answer (failurePolicy open)",
            fail_open.clone(),
        );
        let key_reloads = Family::<OutcomeLabel, Counter>::default();
        r.register("key_reloads", "Key-set file reloads by outcome", key_reloads.clone());
        let issuer_requests = Family::<OpLabel, Counter>::default();
        r.register("issuer_requests", "Issuer API calls by operation and outcome", issuer_requests.clone());
        let redis_ready = Gauge::default();
        r.register("redis_ready", "1 when the Redis Cluster answered the last readiness check", redis_ready.clone());
        let in_flight = Gauge::default();
        r.register("in_flight_requests", "Requests being proxied now", in_flight.clone());
        let connections = Gauge::default();
        r.register("connections", "Open connections on the public listener", connections.clone());
        let connections_refused = Counter::default();
        r.register(
            "connections_refused",
            "Connections closed at accept because the listener was at limits.maxConnections",
            connections_refused.clone(),
        );
        let connections_idle_closed = Counter::default();
        r.register(
            "connections_idle_closed",
            "Connections closed after limits.idleTimeoutMs without a request",
            connections_idle_closed.clone(),
        );
        let long_lived_ended = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "long_lived_ended",
            "Upgraded connections (WebSocket) and streaming responses ended because their token was revoked, expired or its key retired",
            long_lived_ended.clone(),
        );
        let token_cache = crate::tokencache::CacheStats::default();
        r.register(
            "token_cache_hits",
            "Requests whose token was found verified in the cache (only exp/nbf/iat checked again)",
            token_cache.hits.clone(),
        );
        r.register("token_cache_misses", "Requests whose token was verified in full", token_cache.misses.clone());
        r.register(
            "token_cache_evictions",
            "Verified tokens evicted to stay within the cache's bounds",
            token_cache.evictions.clone(),
        );
        r.register("token_cache_entries", "Verified tokens held in the cache", token_cache.entries.clone());
        let session_cache = crate::sessioncache::CacheMetrics::default();
        r.register(
            "session_cache_hits",
            "Session checks answered by the local session cache (no Redis command)",
            session_cache.hits.clone(),
        );
        r.register(
            "session_cache_misses",
            "Session checks that read Redis while the session cache is on",
            session_cache.misses.clone(),
        );
        r.register(
            "session_cache_refreshes",
            "Cached sessions past half their maxStaleness read again in the background",
            session_cache.refreshes.clone(),
        );
        r.register(
            "session_cache_invalidations",
            "Cached sessions dropped because Redis reported a change of their record",
            session_cache.invalidations.clone(),
        );
        r.register(
            "session_cache_flushes",
            "Times the whole session cache was dropped, by reason (connect, disconnect, topology, flushall)",
            session_cache.flushes.clone(),
        );
        r.register("session_cache_entries", "Sessions held in the session cache", session_cache.entries.clone());
        r.register(
            "session_cache_heartbeat_age_ms",
            "Age of the oldest latest-confirmed invalidation heartbeat over the masters (-1: a master has none)",
            session_cache.heartbeat_age_ms.clone(),
        );
        r.register(
            "session_cache_masters_fresh",
            "Masters whose invalidation channel has a heartbeat confirmed within maxStalenessMs",
            session_cache.nodes_fresh.clone(),
        );
        let jwks_fetches = Family::<FetchLabels, Counter>::default();
        r.register(
            "jwks_fetches",
            "External issuers' key fetches (discovery and JWKS) by issuer, trigger (start, refresh, unknown_kid) and result",
            jwks_fetches.clone(),
        );
        let jwks_keys = Family::<IssuerLabel, Gauge>::default();
        r.register("jwks_keys", "Usable keys of each external issuer (last good key set)", jwks_keys.clone());
        let jwks_keys_skipped = Family::<IssuerLabel, Gauge>::default();
        r.register(
            "jwks_keys_skipped",
            "JWKS entries of the last successful fetch that were skipped (unsupported, malformed, duplicate kid)",
            jwks_keys_skipped.clone(),
        );
        let jwks_fresh = Family::<IssuerLabel, Gauge>::default();
        r.register(
            "jwks_fresh",
            "1 when the last key fetch of the external issuer succeeded, 0 while it fails (the last good keys stay in use)",
            jwks_fresh.clone(),
        );
        let jwks_last_success = Family::<IssuerLabel, Gauge>::default();
        r.register(
            "jwks_last_success_timestamp_seconds",
            "Unix time of the external issuer's last successful key fetch (time() - this = seconds since)",
            jwks_last_success.clone(),
        );
        Metrics {
            jwks_fetches,
            jwks_keys,
            jwks_keys_skipped,
            jwks_fresh,
            jwks_last_success,
            session_cache,
            hot: Arc::new(Hot::default()),
            token_cache,
            connections,
            connections_refused,
            connections_idle_closed,
            long_lived_ended,
            registry: Arc::new(r),
            requests,
            validation_seconds,
            redis_seconds,
            upstream_responses,
            upstream_seconds,
            fail_open,
            key_reloads,
            issuer_requests,
            redis_ready,
            in_flight,
        }
    }

    pub fn request(&self, outcome: &'static str, reason: &'static str) {
        let slot = match (outcome, reason) {
            ("allowed", "ok") => &self.hot.allowed_ok,
            ("public", "public_route") => &self.hot.public_route,
            _ => {
                self.requests.get_or_create(&RequestLabels { outcome, reason }).inc();
                return;
            }
        };
        slot.get_or_init(|| self.requests.get_or_create(&RequestLabels { outcome, reason }).clone()).inc();
    }

    /// Count an answer of the app by status class (`2xx` …), or `error` / `timeout`.
    pub fn upstream_response(&self, status: &'static str) {
        match UPSTREAM_STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.hot.upstream[i]
                .get_or_init(|| self.upstream_responses.get_or_create(&StatusLabel { status }).clone())
                .inc(),
            None => self.upstream_responses.get_or_create(&StatusLabel { status }).inc(),
        };
    }

    pub fn redis(&self, op: &'static str, outcome: &'static str, seconds: f64) {
        self.redis_seconds.get_or_create(&OpLabel { op, outcome }).observe(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
