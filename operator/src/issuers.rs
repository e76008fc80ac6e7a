//! External identity providers of a realm, operator side: the `spec.externalIssuers` type, its
//! rendering into `sidecar.json`, and the `IssuerKeysReady` condition.
//!
//! Every sidecar fetches its issuers' keys itself (`authrealm_sidecar::jwks`). The operator
//! probes the same URLs with the same code and limits, from its own network position, on the
//! periodic check interval: discovery + JWKS, counted keys or the fetch error. Realms naming the
//! same issuer configuration (URLs, CA bundle, limits) share one probe result; between probes a
//! reconcile costs no request (the CA bundle ConfigMap is read only when a probe is due).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use authrealm_contract::{Alg, ExternalIssuer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::conditions::{Cond, ISSUER_KEYS_READY, Status};
use crate::crd::GoDuration;

/// Where the webhook mounts the issuers' CA bundles in the sidecar (one projected volume).
pub const ISSUER_CA_MOUNT_DIR: &str = "/etc/authrealm/issuer-ca";
/// Name of that volume.
pub const ISSUER_CA_VOLUME: &str = "authrealm-issuer-ca";

/// The CA bundle file of external issuer `index` inside the sidecar.
pub fn ca_file(index: usize) -> String {
    format!("{ISSUER_CA_MOUNT_DIR}/{index}.crt")
}

/// An OpenID Connect provider whose tokens the realm accepts besides its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = rules()))]
pub struct ExternalIssuerSpec {
    /// Exact `iss` of the provider's tokens, e.g. `https://dex.example.com/dex`. Must differ
    /// from the realm's own `issuer`.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,
    /// The provider's discovery document, usually `<issuer>/.well-known/openid-configuration`;
    /// its `issuer` must equal `issuer` and its `jwks_uri` names the key set. Exactly one of
    /// `discoveryUrl` and `jwksUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub discovery_url: Option<String>,
    /// The provider's JWKS URL, used directly (no discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub jwks_url: Option<String>,
    /// Accepted `aud` values for this provider's tokens (a token must name at least one).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 512)), extend("x-kubernetes-list-type" = "set"))]
    pub audiences: Vec<String>,
    /// Algorithms accepted from this provider (default `[RS256]`, what most providers sign
    /// with); never taken from the token. Asymmetric algorithms only.
    #[serde(default = "default_algorithms")]
    #[schemars(length(min = 1, max = 9), extend("x-kubernetes-list-type" = "set"))]
    pub algorithms: Vec<Alg>,
    /// The claim that is the subject: the `X-Auth-Subject` header (or whichever header
    /// `sidecar.claimHeaders` maps `sub` to) and the subject revocations are keyed by. Default
    /// `sub`; `email` or `preferred_username` are common. Must be a string claim.
    #[serde(default = "default_subject_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub subject_claim: String,
    /// ConfigMap (in the realm's namespace) holding the PEM CA bundle that signs the provider's
    /// HTTPS certificate; mounted into the sidecars. Absent: the system roots of the sidecar
    /// image (and of the operator's, for its probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<ConfigMapKeyRef>,
    /// Allow `http://` URLs. For local testing only: keys fetched over plain HTTP can be
    /// replaced by anyone on the path. Default false.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// How often every sidecar re-reads discovery and the JWKS (default 5m; 1s–24h).
    #[serde(default = "default_refresh")]
    pub refresh_interval: GoDuration,
    /// Least time between two refetches caused by tokens with an unknown `kid` (default 5s;
    /// 100ms–1h): a key the provider just rotated in is accepted within this long, and a flood
    /// of random kids causes at most one fetch per interval per pod.
    #[serde(default = "default_min_refetch")]
    pub min_refetch_interval: GoDuration,
    /// One fetch, connect to last byte, redirects included (default 5s; 100ms–60s).
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: GoDuration,
    /// Largest discovery document or JWKS accepted, in bytes (default 262144; 1024–4194304).
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1024, max = 4194304))]
    pub max_document_bytes: i64,
}

/// One key of a ConfigMap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the ConfigMap (default `ca.crt`).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_algorithms() -> Vec<Alg> {
    vec![Alg::RS256]
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn default_refresh() -> GoDuration {
    GoDuration::new("5m")
}
fn default_min_refetch() -> GoDuration {
    GoDuration::new("5s")
}
fn default_fetch_timeout() -> GoDuration {
    GoDuration::new("5s")
}
fn default_max_bytes() -> i64 {
    256 * 1024
}
fn default_ca_key() -> String {
    "ca.crt".into()
}

fn rules() -> serde_json::Value {
    json!([
        {"rule": "has(self.discoveryUrl) != has(self.jwksUrl)",
         "message": "set exactly one of discoveryUrl and jwksUrl"},
        {"rule": "(has(self.allowInsecureHttp) && self.allowInsecureHttp) || (has(self.discoveryUrl) ? self.discoveryUrl.startsWith('https://') : (has(self.jwksUrl) && self.jwksUrl.startsWith('https://')))",
         "message": "discoveryUrl/jwksUrl must be https:// URLs (allowInsecureHttp permits http:// for local testing)"},
        {"rule": "!has(self.algorithms) || self.algorithms.all(a, !a.startsWith('HS'))",
         "message": "external issuers need asymmetric algorithms: an HMAC key cannot be published in a JWKS"},
        {"rule": "!has(self.refreshInterval) || (duration(self.refreshInterval) >= duration('1s') && duration(self.refreshInterval) <= duration('24h'))",
         "message": "refreshInterval must be between 1s and 24h"},
        {"rule": "!has(self.minRefetchInterval) || (duration(self.minRefetchInterval) >= duration('100ms') && duration(self.minRefetchInterval) <= duration('1h'))",
         "message": "minRefetchInterval must be between 100ms and 1h"},
        {"rule": "!has(self.fetchTimeout) || (duration(self.fetchTimeout) >= duration('100ms') && duration(self.fetchTimeout) <= duration('60s'))",
         "message": "fetchTimeout must be between 100ms and 60s"},
    ])
}

/// The rules on the realm: which session modes may name external issuers.
pub fn spec_rules() -> serde_json::Value {
    json!([
        {"rule": "!has(self.externalIssuers) || size(self.externalIssuers) == 0 || (has(self.sessionMode) && self.sessionMode in ['denylist', 'stateless'])",
         "message": "externalIssuers need sessionMode denylist or stateless: single and multi accept only tokens the realm mints"},
        {"rule": "!has(self.externalIssuers) || self.externalIssuers.all(x, x.issuer != self.issuer)",
         "message": "an external issuer must differ from the realm's own issuer"},
    ])
}

/// `spec.externalIssuers` → the sidecar's `externalIssuers`; `Err((field, message))`.
pub fn render(specs: &[ExternalIssuerSpec]) -> Result<Vec<ExternalIssuer>, (String, String)> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let field = |f: &str| format!("externalIssuers[{i}].{f}");
            let ms = |f: &str, d: &GoDuration| d.millis_ceil().map_err(|m| (field(f), m));
            Ok(ExternalIssuer {
                issuer: s.issuer.clone(),
                discovery_url: s.discovery_url.clone(),
                jwks_url: s.jwks_url.clone(),
                audiences: s.audiences.clone(),
                algorithms: s.algorithms.clone(),
                subject_claim: s.subject_claim.clone(),
                ca_file: s.ca_bundle.as_ref().map(|_| ca_file(i)),
                allow_insecure_http: s.allow_insecure_http,
                refresh_interval_ms: ms("refreshInterval", &s.refresh_interval)?,
                min_refetch_interval_ms: ms("minRefetchInterval", &s.min_refetch_interval)?,
                fetch_timeout_ms: ms("fetchTimeout", &s.fetch_timeout)?,
                max_document_bytes: u64::try_from(s.max_document_bytes)
                    .map_err(|_| (field("maxDocumentBytes"), "must be positive".to_string()))?,
            })
        })
        .collect()
}

/// The ConfigMaps (name, key) holding the issuers' CA bundles, by issuer index, for the
/// webhook's projected volume.
pub fn ca_bundles(specs: &[ExternalIssuerSpec]) -> Vec<(usize, String, String)> {
    specs
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.ca_bundle.as_ref().map(|c| (i, c.name.clone(), c.key.clone())))
        .collect()
}

/// One probe's outcome: usable keys, or the error.
type Outcome = Result<usize, String>;

struct Entry {
    at: Option<Instant>,
    outcome: Outcome,
    used: Instant,
}

/// Probe results by issuer configuration (URLs, CA bundle digest, limits), shared by realms.
static PROBES: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Discovery + JWKS once, with the issuer's limits and the given CA bundle.
pub async fn probe(x: &ExternalIssuer, ca_pem: Option<&[u8]>) -> Outcome {
    let tls = authrealm_sidecar::jwks::tls_config_pem(ca_pem).map_err(|e| format!("CA bundle: {e}"))?;
    let fetcher = authrealm_sidecar::jwks::Fetcher::with_tls(x, tls);
    authrealm_sidecar::jwks::fetch_keys(&fetcher, x, None).await.map(|(set, _)| set.keys.len()).map_err(|e| e.0)
}

async fn ca_pem(client: &Client, ns: &str, r: &ConfigMapKeyRef) -> Result<Vec<u8>, String> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("cannot read ConfigMap {ns}/{}: {e}", r.name))?
        .ok_or_else(|| format!("ConfigMap {ns}/{} (caBundle) not found", r.name))?;
    cm.data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|v| v.as_bytes().to_vec())
        .ok_or_else(|| format!("ConfigMap {ns}/{} has no key {:?}", r.name, r.key))
}

/// The outcome for one issuer, from a probe no older than `max_age` (one probe at a time per
/// configuration; realms naming the same one wait for it and share it).
async fn outcome(
    client: &Client,
    ns: &str,
    spec: &ExternalIssuerSpec,
    x: &ExternalIssuer,
    max_age: Duration,
) -> Outcome {
    // The CA bundle is named by (namespace, ConfigMap, key) and read only when a probe is due.
    let bundle = spec.ca_bundle.as_ref().map(|r| format!("{ns}/{}/{}", r.name, r.key));
    let key = format!("{:?}|{bundle:?}", ExternalIssuer { ca_file: None, ..x.clone() });
    let entry = {
        let mut probes = PROBES.lock().unwrap_or_else(|p| p.into_inner());
        // Configurations no realm asked about for a while are forgotten.
        let horizon = max_age.saturating_mul(10).max(Duration::from_secs(600));
        let mut stale = Vec::new();
        for (k, e) in probes.iter() {
            if let Ok(e) = e.try_lock()
                && e.used.elapsed() > horizon
            {
                stale.push(k.clone());
            }
        }
        for k in stale {
            probes.remove(&k);
        }
        probes
            .entry(key)
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Entry {
                    at: None,
                    outcome: Err("not probed".into()),
                    used: Instant::now(),
                }))
            })
            .clone()
    };
    let mut e = entry.lock().await;
    e.used = Instant::now();
    if e.at.is_none_or(|at| at.elapsed() >= max_age) {
        e.outcome = match &spec.ca_bundle {
            Some(r) => match ca_pem(client, ns, r).await {
                Ok(pem) => probe(x, Some(&pem)).await,
                Err(err) => Err(err),
            },
            None => probe(x, None).await,
        };
        e.at = Some(Instant::now());
    }
    e.outcome.clone()
}

/// `IssuerKeysReady` for a realm with external issuers (None without): True when every issuer's
/// keys could be fetched ("N keys from <issuer>"), False with the failing issuers' errors.
pub async fn condition(
    client: &Client,
    ns: &str,
    specs: &[ExternalIssuerSpec],
    rendered: &[ExternalIssuer],
    max_age: Duration,
) -> Option<Cond> {
    if specs.is_empty() {
        return None;
    }
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    // Concurrently: one slow provider delays the reconcile by one fetch, not by one per issuer.
    let outcomes =
        futures_util::future::join_all(specs.iter().zip(rendered).map(|(s, x)| outcome(client, ns, s, x, max_age)))
            .await;
    for (x, o) in rendered.iter().zip(outcomes) {
        match o {
            Ok(1) => ok.push(format!("1 key from {}", x.issuer)),
            Ok(n) => ok.push(format!("{n} keys from {}", x.issuer)),
            Err(e) => failed.push(format!("{}: {e}", x.issuer)),
        }
    }
    Some(if failed.is_empty() {
        Cond::new(ISSUER_KEYS_READY, Status::True, "KeysLoaded", ok.join("; "))
    } else {
        Cond::new(ISSUER_KEYS_READY, Status::False, "FetchFailed", failed.join("; "))
    })
}

/// A Warning event when `IssuerKeysReady` turns False (or its error changes), a Normal one when it
/// turns True again.
pub async fn publish_flip(
    realm: &crate::crd::AuthRealm,
    events: &crate::events::Publisher,
    old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    new: Option<&Cond>,
) {
    use crate::events::Severity;
    let Some(new) = new else { return };
    let old = old.iter().find(|c| c.type_ == ISSUER_KEYS_READY);
    match new.status {
        Status::False if old.is_none_or(|o| o.status != "False" || o.message != new.message) => {
            events
                .publish(realm, Severity::Warning, "IssuerKeysUnavailable", "FetchIssuerKeys", new.message.clone())
                .await
        }
        Status::True if old.is_some_and(|o| o.status == "False") => {
            events.publish(realm, Severity::Normal, "IssuerKeysLoaded", "FetchIssuerKeys", new.message.clone()).await
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_defaults_and_mount_paths() {
        let spec: ExternalIssuerSpec = serde_json::from_value(json!({
            "issuer": "https://dex.example.com/dex",
            "discoveryUrl": "https://dex.example.com/dex/.well-known/openid-configuration",
            "audiences": ["shop-api"],
            "caBundle": {"name": "dex-ca"},
        }))
        .unwrap();
        let out = render(std::slice::from_ref(&spec)).unwrap();
        assert_eq!(out[0].algorithms, [Alg::RS256]);
        assert_eq!(out[0].subject_claim, "sub");
        assert_eq!(out[0].ca_file.as_deref(), Some("/etc/authrealm/issuer-ca/0.crt"));
        assert_eq!((out[0].refresh_interval_ms, out[0].min_refetch_interval_ms), (300_000, 5_000));
        assert_eq!(out[0].check(), Ok(()));
        assert_eq!(ca_bundles(&[spec]), [(0, "dex-ca".to_string(), "ca.crt".to_string())]);
    }
}
