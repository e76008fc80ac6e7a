//! External identity providers a realm trusts (`externalIssuers` in `sidecar.json`).
//!
//! Every sidecar fetches each external issuer's JWKS itself (Envoy's model: a token signed with
//! a key the IdP just rotated in is accepted as soon as this pod has refetched, which it does
//! on the first unknown `kid`). The operator renders these entries from the AuthRealm and
//! probes the same URLs for the `IssuerKeysReady` condition.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::alg::Alg;

/// One external OIDC issuer whose tokens the realm accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalIssuer {
    /// Exact `iss` of the issuer's tokens (selects this entry; never the realm's own issuer).
    pub issuer: String,
    /// OpenID Connect discovery document (`…/.well-known/openid-configuration`); its `issuer`
    /// must equal `issuer` and its `jwks_uri` names the key set. Exactly one of `discoveryUrl`
    /// and `jwksUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_url: Option<String>,
    /// The issuer's JWKS, fetched directly (no discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Accepted `aud` values for this issuer's tokens (a token must name at least one).
    pub audiences: Vec<String>,
    /// Allow-list of algorithms for this issuer (never taken from the token; asymmetric only).
    pub algorithms: Vec<Alg>,
    /// The claim that is the token's subject (identity header for `sub`, revocation by
    /// subject), e.g. `sub` or `email`. Must be a string claim.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// PEM CA bundle trusted for this issuer's HTTPS endpoints; without it the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Allow `http://` URLs (local testing only; otherwise HTTPS is required).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_http: bool,
    /// Periodic refresh of discovery and JWKS (ms).
    #[serde(default = "default_refresh_ms")]
    pub refresh_interval_ms: u64,
    /// Least time between two fetches caused by tokens with an unknown `kid` (ms): a flood of
    /// random kids causes at most one fetch per interval.
    #[serde(default = "default_min_refetch_ms")]
    pub min_refetch_interval_ms: u64,
    /// Whole fetch of one document, connect to last byte, redirects included (ms).
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
    /// Largest discovery document or JWKS accepted (bytes); larger ones are refused.
    #[serde(default = "default_max_bytes")]
    pub max_document_bytes: u64,
}

pub fn default_subject_claim() -> String {
    "sub".into()
}
pub fn default_refresh_ms() -> u64 {
    300_000
}
pub fn default_min_refetch_ms() -> u64 {
    5_000
}
pub fn default_fetch_timeout_ms() -> u64 {
    5_000
}
pub fn default_max_bytes() -> u64 {
    256 * 1024
}

impl ExternalIssuer {
    /// An entry with every tunable at its default.
    pub fn new(issuer: &str, discovery_url: Option<String>, jwks_url: Option<String>) -> ExternalIssuer {
        ExternalIssuer {
            issuer: issuer.into(),
            discovery_url,
            jwks_url,
            audiences: vec![],
            algorithms: vec![Alg::RS256],
            subject_claim: default_subject_claim(),
            ca_file: None,
            allow_insecure_http: false,
            refresh_interval_ms: default_refresh_ms(),
            min_refetch_interval_ms: default_min_refetch_ms(),
            fetch_timeout_ms: default_fetch_timeout_ms(),
            max_document_bytes: default_max_bytes(),
        }
    }

    /// The URL fetched first: the discovery document, or the JWKS.
    pub fn first_url(&self) -> &str {
        self.discovery_url.as_deref().or(self.jwks_url.as_deref()).unwrap_or("")
    }

    /// Checks of one entry; `Err((field, message))` with the field relative to the entry.
    pub fn check(&self) -> Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.issuer.is_empty() || self.issuer.len() > 2048 {
            return e("issuer", "must be a non-empty string of at most 2048 bytes");
        }
        match (&self.discovery_url, &self.jwks_url) {
            (Some(_), Some(_)) | (None, None) => return e("discoveryUrl", "exactly one of discoveryUrl and jwksUrl"),
            (Some(u), None) => check_url(u, self.allow_insecure_http).map_err(|m| ("discoveryUrl".into(), m))?,
            (None, Some(u)) => check_url(u, self.allow_insecure_http).map_err(|m| ("jwksUrl".into(), m))?,
        }
        if self.audiences.is_empty() {
            return e("audiences", "at least one audience is required");
        }
        if self.audiences.iter().any(|a| a.is_empty() || a.len() > 2048) {
            return e("audiences", "must be non-empty strings of at most 2048 bytes");
        }
        if self.algorithms.is_empty() {
            return e("algorithms", "at least one algorithm is required");
        }
        if self.algorithms.iter().any(|a| a.is_symmetric()) {
            return e("algorithms", "HMAC algorithms cannot be used with a published key set");
        }
        if self.subject_claim.is_empty() || self.subject_claim.len() > 256 {
            return e("subjectClaim", "must be a claim name of 1 to 256 bytes");
        }
        if self.ca_file.as_deref().is_some_and(str::is_empty) {
            return e("caFile", "must not be empty");
        }
        if !(1_000..=86_400_000).contains(&self.refresh_interval_ms) {
            return e("refreshIntervalMs", "must be between 1000 and 86400000");
        }
        if !(100..=3_600_000).contains(&self.min_refetch_interval_ms) {
            return e("minRefetchIntervalMs", "must be between 100 and 3600000");
        }
        if !(100..=60_000).contains(&self.fetch_timeout_ms) {
            return e("fetchTimeoutMs", "must be between 100 and 60000");
        }
        if !(1024..=4 * 1024 * 1024).contains(&self.max_document_bytes) {
            return e("maxDocumentBytes", "must be between 1024 and 4194304");
        }
        Ok(())
    }
}

/// The realm-level rules for `externalIssuers`: each entry valid, issuers distinct and not the
/// realm's own, and a session mode that needs no records only the realm mints.
pub fn check_all(cfg: &crate::config::SidecarConfig) -> Result<(), crate::config::ConfigError> {
    use crate::config::{ConfigError, SessionMode};
    let err = |field: String, message: String| ConfigError { field, message };
    if cfg.external_issuers.is_empty() {
        return Ok(());
    }
    if !matches!(cfg.session_mode, SessionMode::Denylist | SessionMode::Stateless) {
        return Err(err(
            "externalIssuers".into(),
            "external issuers need sessionMode denylist or stateless (single and multi accept only tokens the realm mints)"
                .into(),
        ));
    }
    if cfg.external_issuers.len() > 16 {
        return Err(err("externalIssuers".into(), "at most 16 external issuers".into()));
    }
    for (i, x) in cfg.external_issuers.iter().enumerate() {
        x.check().map_err(|(f, m)| err(format!("externalIssuers[{i}].{f}"), m))?;
        if x.issuer == cfg.issuer {
            return Err(err(format!("externalIssuers[{i}].issuer"), "must differ from the realm's own issuer".into()));
        }
        if cfg.external_issuers[..i].iter().any(|y| y.issuer == x.issuer) {
            return Err(err(format!("externalIssuers[{i}].issuer"), "listed twice".into()));
        }
    }
    Ok(())
}

/// `https://host[:port]/…` (or `http://` when allowed), no user info, no fragment.
pub fn check_url(url: &str, allow_http: bool) -> Result<(), String> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        if !allow_http {
            return Err("must be an https:// URL (allowInsecureHttp permits http:// for local testing)".into());
        }
        r
    } else {
        return Err("must be an https:// URL".into());
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err("must name a host (and no user info)".into());
    }
    if url.len() > 2048 || url.contains(['#', ' ']) || !url.is_ascii() {
        return Err("must be an ASCII URL of at most 2048 bytes without spaces or fragment".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        let mut ok =
            ExternalIssuer::new("https://idp", Some("https://idp/.well-known/openid-configuration".into()), None);
        ok.audiences = vec!["api".into()];
        assert_eq!(ok.check(), Ok(()));
        type Mutation = Box<dyn Fn(&mut ExternalIssuer)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("discoveryUrl", Box::new(|i| i.jwks_url = Some("https://idp/jwks".into()))),
            ("discoveryUrl", Box::new(|i| i.discovery_url = None)),
            ("discoveryUrl", Box::new(|i| i.discovery_url = Some("http://idp/x".into()))),
            ("discoveryUrl", Box::new(|i| i.discovery_url = Some("https://user@idp/x".into()))),
            ("discoveryUrl", Box::new(|i| i.discovery_url = Some("ftp://idp/x".into()))),
            ("audiences", Box::new(|i| i.audiences.clear())),
            ("algorithms", Box::new(|i| i.algorithms = vec![Alg::HS256])),
            ("algorithms", Box::new(|i| i.algorithms.clear())),
            ("subjectClaim", Box::new(|i| i.subject_claim.clear())),
            ("minRefetchIntervalMs", Box::new(|i| i.min_refetch_interval_ms = 0)),
            ("maxDocumentBytes", Box::new(|i| i.max_document_bytes = 1 << 30)),
        ];
        for (field, mutate) in cases {
            let mut i = ok.clone();
            mutate(&mut i);
            assert_eq!(i.check().unwrap_err().0, field);
        }
        // Realm-level rules.
        let mut cfg = crate::SidecarConfig::example("demo", "/k", None);
        cfg.external_issuers = vec![ok.clone()];
        assert!(cfg.validate().is_ok(), "stateless");
        cfg.session_mode = crate::SessionMode::Denylist;
        cfg.redis = crate::SidecarConfig::example("demo", "/k", Some(vec!["127.0.0.1:7000".into()])).redis;
        assert!(cfg.validate().is_ok(), "denylist");
        let field = |c: &crate::SidecarConfig| c.validate().unwrap_err().field;
        let mut twice = cfg.clone();
        twice.external_issuers.push(ok.clone());
        assert_eq!(field(&twice), "externalIssuers[1].issuer");
        let mut own = cfg.clone();
        own.external_issuers[0].issuer = own.issuer.clone();
        assert_eq!(field(&own), "externalIssuers[0].issuer");
        let mut multi = cfg.clone();
        multi.session_mode = crate::SessionMode::Multi;
        assert_eq!(field(&multi), "externalIssuers");
        let mut bad_entry = cfg.clone();
        bad_entry.external_issuers[0].audiences.clear();
        assert_eq!(field(&bad_entry), "externalIssuers[0].audiences");

        let mut http = ok.clone();
        http.discovery_url = Some("http://127.0.0.1:5556/dex/.well-known/openid-configuration".into());
        http.allow_insecure_http = true;
        assert_eq!(http.check(), Ok(()));
    }
}
