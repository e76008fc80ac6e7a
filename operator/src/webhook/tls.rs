//! The webhook's TLS: a self-managed CA and serving certificate, rotated, with the
//! MutatingWebhookConfiguration's `caBundle` kept current.
//!
//! ## Rotation without a failed admission
//! The API server trusts whatever `caBundle` says, and it learns of a changed bundle a moment
//! after the change (its webhook configuration is watched). So a CA is **published before it
//! signs**, just like the realm signing keys:
//!
//! * the state holds a `current` CA (signs the serving certificate), a `next` CA (already in the
//!   bundle, signs nothing yet) and `previous` CAs (still in the bundle until they expire, so a
//!   replica that has not reloaded yet keeps working);
//! * once `next` has been published for one CA lifetime it becomes `current`, a new `next` is
//!   generated, and the serving certificate is re-issued by the new `current`;
//! * a CA is valid for `2 × CA lifetime + certificate lifetime` (one lifetime as next, one as
//!   current, then long enough to outlive every certificate it signed);
//! * the serving certificate is re-issued when a third of its lifetime is left, when its issuer
//!   is not the current CA, or when the wanted names change;
//! * every replica checks the Secret again no later than the moment its loaded certificate is
//!   due to be re-issued ([`Lifetimes::renew_at`]), whatever its check interval: it then loads
//!   the certificate another replica issued, or issues it itself. A replica that only waited for
//!   its next interval could still be serving the old certificate when it expires — and the API
//!   server verifies a certificate whenever it opens a connection (after every caBundle change,
//!   for one).
//!
//! [`plan`] is that schedule as a pure function of (state, now); [`apply`] generates what it
//! asks for. [`TlsManager::sync`] is the I/O: every replica reads the TLS Secret, writes a
//! rotated state with a resourceVersion precondition (so concurrent replicas cannot both
//! rotate — the loser re-reads and adopts the winner's certificates), then makes every webhook
//! of the MutatingWebhookConfiguration carry the bundle.
//!
//! The Secret (`kubernetes.io/tls`) holds `tls.crt`, `tls.key`, `ca.crt` (the bundle) and, in
//! [`STATE_KEY`], the CA private keys; only the operator's ServiceAccount may read it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::{CertMode, WebhookConfig};
use super::metrics::{CertLabels, WebhookMetrics};

/// Secret data key of the serving certificate (PEM).
pub const TLS_CRT: &str = "tls.crt";
/// Secret data key of the serving key (PEM).
pub const TLS_KEY: &str = "tls.key";
/// Secret data key of the CA bundle (PEM; what the caBundle carries).
pub const CA_CRT: &str = "ca.crt";
/// Secret data key of the self-managed state (JSON, includes the CA private keys).
pub const STATE_KEY: &str = "authrealm-webhook-tls.json";
/// Certificates are valid from this long before they are made (clock skew between nodes).
const BACKDATE_SECONDS: i64 = 300;

/// A failed TLS operation, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("failed to read Secret {namespace}/{name}: {source}")]
    ReadSecret { namespace: String, name: String, source: kube::Error },
    #[error("failed to write Secret {namespace}/{name}: {source}")]
    WriteSecret { namespace: String, name: String, source: kube::Error },
    #[error("Secret {namespace}/{name} lacks {key} (expected tls.crt and tls.key, e.g. from cert-manager)")]
    MissingKey { namespace: String, name: String, key: &'static str },
    #[error("Secret {namespace}/{name} kept changing under us; will retry")]
    Contended { namespace: String, name: String },
    #[error("failed to update the caBundle of MutatingWebhookConfiguration {name}: {source}")]
    CaBundle { name: String, source: kube::Error },
    #[error("MutatingWebhookConfiguration {name} does not exist (install the chart, or create it)")]
    NoWebhookConfiguration { name: String },
    #[error("invalid serving certificate or key: {0}")]
    InvalidPem(String),
}

impl TlsError {
    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::Generate(_) => "generate",
            TlsError::ReadSecret { .. } => "read_secret",
            TlsError::WriteSecret { .. } => "write_secret",
            TlsError::MissingKey { .. } => "missing_key",
            TlsError::Contended { .. } => "contended",
            TlsError::CaBundle { .. } => "ca_bundle",
            TlsError::NoWebhookConfiguration { .. } => "no_webhook_configuration",
            TlsError::InvalidPem(_) => "invalid_pem",
        }
    }
}

/// One CA. `key_pem` is dropped once the CA is only `previous`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCert {
    pub common_name: String,
    pub cert_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    /// When it entered the bundle (Unix seconds).
    pub published_at: i64,
    pub not_after: i64,
}

/// The serving certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Common name of the CA that signed it.
    pub issuer: String,
    pub not_after: i64,
    pub sans: Vec<String>,
}

/// Everything the self-managed mode keeps (in the TLS Secret, [`STATE_KEY`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsState {
    pub current: CaCert,
    pub next: CaCert,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<CaCert>,
    pub serving: ServingCert,
}

impl TlsState {
    /// The PEM bundle the API server must trust: current, next, then previous CAs.
    pub fn ca_bundle(&self) -> String {
        let mut out = String::new();
        for ca in std::iter::once(&self.current).chain(std::iter::once(&self.next)).chain(&self.previous) {
            out.push_str(ca.cert_pem.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Lifetimes in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// How long a CA is current (and, before that, published as next).
    pub ca: i64,
    /// How long a serving certificate is valid.
    pub cert: i64,
}

impl Lifetimes {
    pub fn from_config(cfg: &WebhookConfig) -> Self {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4).max(1);
        Lifetimes { ca: secs(cfg.ca_lifetime), cert: secs(cfg.cert_lifetime) }
    }

    /// When (Unix seconds) a serving certificate valid until `not_after` is due to be replaced:
    /// when a third of its lifetime is left.
    pub fn renew_at(&self, not_after: i64) -> i64 {
        not_after - self.cert / 3
    }
}

/// What [`apply`] must do. All false: nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// No usable state: generate current and next CAs and a serving certificate.
    pub new_chain: bool,
    /// `next` has been published for a CA lifetime: it becomes `current`.
    pub promote: bool,
    /// Some previous CA has expired: remove it from the bundle.
    pub drop_expired: bool,
    /// Issue a new serving certificate.
    pub reissue: bool,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        *self == Plan::default()
    }
}

/// The rotation schedule (see the module docs). Pure.
pub fn plan(state: Option<&TlsState>, now: i64, lt: Lifetimes, sans: &[String]) -> Plan {
    let Some(s) = state else {
        return Plan { new_chain: true, reissue: true, ..Plan::default() };
    };
    if s.current.not_after <= now || s.next.not_after <= now || s.current.key_pem.is_none() || s.next.key_pem.is_none()
    {
        return Plan { new_chain: true, reissue: true, ..Plan::default() };
    }
    let promote = now >= s.next.published_at.saturating_add(lt.ca);
    let drop_expired = s.previous.iter().any(|p| p.not_after <= now);
    let reissue = promote
        || s.serving.issuer != s.current.common_name
        || now >= lt.renew_at(s.serving.not_after)
        || s.serving.sans != sans;
    Plan { new_chain: false, promote, drop_expired, reissue }
}

fn offset(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn serial(key: &KeyPair, now: i64) -> SerialNumber {
    let mut h = Sha256::new();
    h.update(key.public_key_raw());
    h.update(now.to_be_bytes());
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "authrealm");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn generate_ca(now: i64, lt: Lifetimes) -> Result<CaCert, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let fingerprint: String = Sha256::digest(key.public_key_raw())[..4].iter().map(|b| format!("{b:02x}")).collect();
    let common_name = format!("authrealm-webhook-ca-{now}-{fingerprint}");
    let not_after = now.saturating_add(lt.ca.saturating_mul(2)).saturating_add(lt.cert);
    let mut params = ca_params(&common_name);
    params.not_before = offset(now - BACKDATE_SECONDS);
    params.not_after = offset(not_after);
    params.serial_number = Some(serial(&key, now));
    let cert = params.self_signed(&key)?;
    Ok(CaCert { common_name, cert_pem: cert.pem(), key_pem: Some(key.serialize_pem()), published_at: now, not_after })
}

fn issue_serving(ca: &CaCert, now: i64, lt: Lifetimes, sans: &[String]) -> Result<ServingCert, rcgen::Error> {
    let ca_key = KeyPair::from_pem(ca.key_pem.as_deref().unwrap_or_default())?;
    let issuer = Issuer::new(ca_params(&ca.common_name), ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "authrealm");
    dn.push(DnType::CommonName, sans.first().map(String::as_str).unwrap_or("authrealm-webhook"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = now.saturating_add(lt.cert).min(ca.not_after);
    params.not_before = offset(now - BACKDATE_SECONDS);
    params.not_after = offset(not_after);
    params.serial_number = Some(serial(&key, now));
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: ca.common_name.clone(),
        not_after,
        sans: sans.to_vec(),
    })
}

/// Carries out `plan` on `state` (generating keys and certificates).
pub fn apply(
    state: Option<TlsState>,
    plan: Plan,
    now: i64,
    lt: Lifetimes,
    sans: &[String],
) -> Result<TlsState, rcgen::Error> {
    let retire = |ca: CaCert| CaCert { key_pem: None, ..ca };
    let mut state = match state {
        Some(old) if !plan.new_chain => old,
        old => {
            let current = generate_ca(now, lt)?;
            let next = generate_ca(now, lt)?;
            let serving = issue_serving(&current, now, lt, sans)?;
            // Keep trusting the old CAs while they are valid: a replica may still serve a
            // certificate they signed.
            let previous = old
                .map(|o| [o.current, o.next].into_iter().chain(o.previous).map(retire).collect())
                .unwrap_or_default();
            TlsState { current, next, previous, serving }
        }
    };
    if plan.promote {
        let new_next = generate_ca(now, lt)?;
        let old_current = std::mem::replace(&mut state.current, std::mem::replace(&mut state.next, new_next));
        state.previous.insert(0, retire(old_current));
    }
    state.previous.retain(|p| p.not_after > now);
    if plan.reissue && !plan.new_chain {
        state.serving = issue_serving(&state.current, now, lt, sans)?;
    }
    Ok(state)
}

/// Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The serving certificate and key (PEM) to load into the listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingPair {
    pub cert_pem: String,
    pub key_pem: String,
    /// `notAfter` (Unix seconds) when known (self-managed mode).
    pub not_after: Option<i64>,
}

/// Result of one [`TlsManager::sync`].
#[derive(Debug)]
pub struct Synced {
    pub serving: ServingPair,
    /// Whether every webhook of the configuration now carries the bundle (self-managed mode), or
    /// why not. The listener can serve either way; the API server trusts it once this is `Ok`.
    pub ca_bundle: Result<(), TlsError>,
    /// What this pass changed (self-managed mode; `None` when another replica did it or nothing
    /// was due).
    pub rotated: Option<Plan>,
}

/// Reads, rotates and publishes the webhook's certificates.
#[derive(Clone)]
pub struct TlsManager {
    client: Client,
    namespace: String,
    secret: String,
    configuration: String,
    mode: CertMode,
    lifetimes: Lifetimes,
    sans: Vec<String>,
    metrics: WebhookMetrics,
}

fn b64(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn data_str(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl TlsManager {
    pub fn new(client: Client, cfg: &WebhookConfig, metrics: WebhookMetrics) -> Self {
        TlsManager {
            client,
            namespace: cfg.namespace.clone(),
            secret: cfg.tls_secret.clone(),
            configuration: cfg.configuration_name.clone(),
            mode: cfg.cert_mode,
            lifetimes: Lifetimes::from_config(cfg),
            sans: cfg.sans(),
            metrics,
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn read_err(&self, source: kube::Error) -> TlsError {
        TlsError::ReadSecret { namespace: self.namespace.clone(), name: self.secret.clone(), source }
    }

    /// One pass: rotate if due (self-managed), publish the bundle, return the serving pair.
    pub async fn sync(&self) -> Result<Synced, TlsError> {
        match self.mode {
            CertMode::External => self.sync_external().await,
            CertMode::SelfManaged => self.sync_self_managed().await,
        }
    }

    async fn sync_external(&self) -> Result<Synced, TlsError> {
        let secret = self.secrets().get(&self.secret).await.map_err(|e| self.read_err(e))?;
        let get = |key| {
            data_str(&secret, key).ok_or_else(|| TlsError::MissingKey {
                namespace: self.namespace.clone(),
                name: self.secret.clone(),
                key,
            })
        };
        Ok(Synced {
            serving: ServingPair { cert_pem: get(TLS_CRT)?, key_pem: get(TLS_KEY)?, not_after: None },
            ca_bundle: Ok(()),
            rotated: None,
        })
    }

    async fn sync_self_managed(&self) -> Result<Synced, TlsError> {
        let api = self.secrets();
        let mut rotated = None;
        let mut settled = None;
        for _ in 0..5 {
            let existing = api.get_opt(&self.secret).await.map_err(|e| self.read_err(e))?;
            let state = existing.as_ref().and_then(|s| data_str(s, STATE_KEY)).and_then(|json| {
                serde_json::from_str::<TlsState>(&json)
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "unreadable webhook TLS state; generating a new CA chain"),
                    )
                    .ok()
            });
            let now = unix_now();
            let p = plan(state.as_ref(), now, self.lifetimes, &self.sans);
            if p.is_noop() {
                settled = state;
                break;
            }
            let new_state = apply(state, p, now, self.lifetimes, &self.sans)?;
            let mut secret = Secret {
                metadata: ObjectMeta {
                    name: Some(self.secret.clone()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some([("app.kubernetes.io/managed-by".to_owned(), "authrealm-operator".to_owned())].into()),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(
                    [
                        (TLS_CRT.to_owned(), b64(&new_state.serving.cert_pem)),
                        (TLS_KEY.to_owned(), b64(&new_state.serving.key_pem)),
                        (CA_CRT.to_owned(), b64(&new_state.ca_bundle())),
                        (STATE_KEY.to_owned(), b64(&serde_json::to_string(&new_state).expect("state serialises"))),
                    ]
                    .into(),
                ),
                ..Secret::default()
            };
            let written = match &existing {
                Some(old) => {
                    secret.metadata.resource_version = old.resource_version();
                    secret.metadata.labels = old.metadata.labels.clone().or(secret.metadata.labels);
                    secret.metadata.annotations = old.metadata.annotations.clone();
                    secret.type_ = old.type_.clone().or(secret.type_);
                    api.replace(&self.secret, &PostParams::default(), &secret).await
                }
                None => api.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => {
                    if p.new_chain || p.promote {
                        self.metrics.cert_rotations.get_or_create(&CertLabels { kind: "ca" }).inc();
                    }
                    if p.reissue {
                        self.metrics.cert_rotations.get_or_create(&CertLabels { kind: "serving" }).inc();
                    }
                    tracing::info!(
                        secret = %format!("{}/{}", self.namespace, self.secret),
                        new_chain = p.new_chain, promoted = p.promote, reissued = p.reissue,
                        "webhook certificates rotated"
                    );
                    rotated = Some(p);
                    settled = Some(new_state);
                    break;
                }
                // Another replica wrote first: read again and adopt its state.
                Err(e) if is_conflict(&e) => continue,
                Err(source) => {
                    return Err(TlsError::WriteSecret {
                        namespace: self.namespace.clone(),
                        name: self.secret.clone(),
                        source,
                    });
                }
            }
        }
        let Some(state) = settled else {
            return Err(TlsError::Contended { namespace: self.namespace.clone(), name: self.secret.clone() });
        };
        let ca_bundle = self.publish_ca_bundle(&state.ca_bundle()).await;
        Ok(Synced {
            serving: ServingPair {
                cert_pem: state.serving.cert_pem,
                key_pem: state.serving.key_pem,
                not_after: Some(state.serving.not_after),
            },
            ca_bundle,
            rotated,
        })
    }

    /// Makes every webhook of the configuration carry `bundle` (no write when they already do).
    pub async fn publish_ca_bundle(&self, bundle: &str) -> Result<(), TlsError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let err = |source| TlsError::CaBundle { name: self.configuration.clone(), source };
        for _ in 0..3 {
            let Some(mut mwc) = api.get_opt(&self.configuration).await.map_err(err)? else {
                return Err(TlsError::NoWebhookConfiguration { name: self.configuration.clone() });
            };
            let want = ByteString(bundle.as_bytes().to_vec());
            let mut changed = false;
            for wh in mwc.webhooks.iter_mut().flatten() {
                if wh.client_config.ca_bundle.as_ref() != Some(&want) {
                    wh.client_config.ca_bundle = Some(want.clone());
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
            match api.replace(&self.configuration, &PostParams::default(), &mwc).await {
                Ok(_) => {
                    tracing::info!(configuration = %self.configuration, "webhook caBundle updated");
                    return Ok(());
                }
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Err(TlsError::Contended { namespace: String::new(), name: self.configuration.clone() })
    }
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    use super::*;

    const LT: Lifetimes = Lifetimes { ca: 1000, cert: 300 };

    fn sans() -> Vec<String> {
        vec!["127.0.0.1".into(), "authrealm-webhook.ns.svc".into()]
    }

    /// A state without real certificates, for the pure schedule.
    fn state(current_published: i64, next_published: i64, serving_issuer: &str, serving_not_after: i64) -> TlsState {
        let ca = |name: &str, published_at: i64| CaCert {
            common_name: name.into(),
            cert_pem: format!("PEM {name}"),
            key_pem: Some("KEY".into()),
            published_at,
            not_after: published_at + 2 * LT.ca + LT.cert,
        };
        TlsState {
            current: ca("ca-1", current_published),
            next: ca("ca-2", next_published),
            previous: vec![],
            serving: ServingCert {
                cert_pem: String::new(),
                key_pem: String::new(),
                issuer: serving_issuer.into(),
                not_after: serving_not_after,
                sans: sans(),
            },
        }
    }

    #[test]
    fn schedule_table() {
        let fresh = state(0, 0, "ca-1", 300);
        let cases: Vec<(&str, Option<TlsState>, i64, Plan)> = vec![
            ("no state", None, 0, Plan { new_chain: true, reissue: true, ..Plan::default() }),
            ("fresh", Some(fresh.clone()), 10, Plan::default()),
            ("serving cert with more than a third left", Some(fresh.clone()), 199, Plan::default()),
            ("serving cert at a third left", Some(fresh.clone()), 200, Plan { reissue: true, ..Plan::default() }),
            (
                "next published for a CA lifetime: promote and reissue",
                Some(state(0, 0, "ca-1", 1300)),
                1000,
                Plan { promote: true, reissue: true, ..Plan::default() },
            ),
            (
                "serving cert from another CA: reissue",
                Some(state(0, 0, "ca-0", 300)),
                10,
                Plan { reissue: true, ..Plan::default() },
            ),
            (
                "current CA expired (operator was down): new chain",
                Some(state(0, 0, "ca-1", 300)),
                2 * LT.ca + LT.cert,
                Plan { new_chain: true, reissue: true, ..Plan::default() },
            ),
            (
                "names changed: reissue",
                Some(TlsState {
                    serving: ServingCert { sans: vec!["other".into()], ..fresh.serving.clone() },
                    ..fresh.clone()
                }),
                10,
                Plan { reissue: true, ..Plan::default() },
            ),
        ];
        for (name, s, now, want) in cases {
            assert_eq!(plan(s.as_ref(), now, LT, &sans()), want, "{name}");
        }
        let mut with_old = fresh.clone();
        with_old.previous.push(CaCert { not_after: 50, key_pem: None, ..fresh.current.clone() });
        assert!(plan(Some(&with_old), 49, LT, &sans()).is_noop());
        assert_eq!(plan(Some(&with_old), 50, LT, &sans()), Plan { drop_expired: true, ..Plan::default() });
    }

    /// Walks the real schedule through many CA lifetimes: at every moment the serving certificate
    /// is signed by a CA that has been in the bundle for a CA lifetime (or since the chain began),
    /// and every CA that signed a still-valid serving certificate is still in the bundle.
    #[test]
    fn rotation_keeps_the_serving_issuer_published_in_advance() {
        let lt = Lifetimes { ca: 90, cert: 30 };
        let sans = sans();
        let mut now = 1_000_000;
        let mut state = apply(None, plan(None, now, lt, &sans), now, lt, &sans).unwrap();
        let start = now;
        let mut promotions = 0;
        let mut served: Vec<(String, i64)> = vec![(state.serving.issuer.clone(), state.serving.not_after)];
        for _ in 0..600 {
            now += 1;
            let p = plan(Some(&state), now, lt, &sans);
            assert!(!p.new_chain, "a healthy chain is never replaced wholesale");
            if p.promote {
                promotions += 1;
            }
            let prev_bundle = state.ca_bundle();
            state = apply(Some(state), p, now, lt, &sans).unwrap();
            if p.reissue {
                served.push((state.serving.issuer.clone(), state.serving.not_after));
                let issuer_pem = state.current.cert_pem.trim_end().to_owned();
                assert!(
                    prev_bundle.contains(&issuer_pem) || now - start < lt.ca,
                    "the new serving certificate's CA was already in the previous bundle"
                );
            }
            let bundle_names: Vec<&str> = std::iter::once(&state.current)
                .chain(std::iter::once(&state.next))
                .chain(&state.previous)
                .map(|c| c.common_name.as_str())
                .collect();
            for (issuer, not_after) in &served {
                if *not_after > now {
                    assert!(
                        bundle_names.contains(&issuer.as_str()),
                        "CA {issuer} of a valid certificate left the bundle"
                    );
                }
            }
            assert!(state.serving.not_after > now, "the serving certificate is always valid");
            assert!(state.previous.len() <= 2, "expired CAs are dropped");
        }
        assert!(promotions >= 5, "{promotions} promotions in 600s with a 90s CA lifetime");
    }

    #[test]
    fn generated_certificates_chain_and_load_into_rustls() {
        let sans = sans();
        let now = unix_now();
        let state = apply(None, plan(None, now, LT, &sans), now, LT, &sans).unwrap();
        assert!(state.ca_bundle().matches("BEGIN CERTIFICATE").count() == 2);
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = super::super::server::load_certified_key(&state.serving.cert_pem, &state.serving.key_pem, &provider);
        assert!(key.is_ok(), "{:?}", key.err());

        // A rustls client trusting only the bundle accepts the serving certificate for 127.0.0.1.
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(state.ca_bundle().as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider.into()).build().unwrap();
        let leaf = CertificateDer::from_pem_slice(state.serving.cert_pem.as_bytes()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("serving certificate verifies against the bundle");
        let wrong = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(verifier.verify_server_cert(&leaf, &[], &wrong, &[], rustls::pki_types::UnixTime::now()).is_err());

        // After a promotion the new serving certificate verifies against the OLD bundle too.
        let later = now + LT.ca;
        let old_bundle = state.ca_bundle();
        let promote = Plan { promote: true, reissue: true, ..Plan::default() };
        assert_eq!(plan(Some(&state), later, LT, &sans), promote);
        let rotated = apply(Some(state), promote, later, LT, &sans).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(old_bundle.as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::aws_lc_rs::default_provider().into(),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(rotated.serving.cert_pem.as_bytes()).unwrap();
        let at_later = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(later as u64));
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at_later)
            .expect("a rotated serving certificate is trusted by the bundle published before the rotation");
    }
}
