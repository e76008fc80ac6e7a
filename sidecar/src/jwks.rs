//! External issuers' key sets: OIDC discovery → `jwks_uri` → JWKS, fetched by every sidecar.
//!
//! * **Fetch** ([`Fetcher`]): one GET over HTTPS (tokio-rustls, aws-lc-rs; the issuer's `caFile`
//!   or the system roots), plain HTTP only when the entry allows it. Connect to last byte within
//!   `fetchTimeoutMs`; the body is counted as it streams and the fetch is aborted beyond
//!   `maxDocumentBytes`; the content type must be JSON; at most [`MAX_REDIRECTS`] redirects, and
//!   only to the same origin (scheme, host and port).
//! * **Parse** ([`parse_jwks`]): keys of an unsupported `kty`/`crv`/`alg`, without `kid`, with
//!   `use` other than `sig`, with malformed or weak material (RSA below 2048 bits), or repeating
//!   an earlier `kid` are skipped and counted — never a panic. A document that is not a JWKS, or
//!   has no usable key, is a fetch error: the last good set stays in use.
//! * **Refresh** ([`IssuerKeys`]): at start, every `refreshIntervalMs`, with back-off after a
//!   failure, and on a token whose `kid` is unknown — single-flight (concurrent requests wait for
//!   the one fetch in flight, bounded by the fetch timeout) and at most once per
//!   `minRefetchIntervalMs` (a request arriving sooner gets its 401 at once).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::DecodingKey;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use authrealm_contract::{Alg, ExternalIssuer};

/// Redirects followed per fetch (same origin only).
pub const MAX_REDIRECTS: usize = 3;
/// Entries of a JWKS `keys` array looked at; the rest are skipped.
pub const MAX_KEYS: usize = 64;

/// Why a fetch produced no usable document. The message names the URL's host and the cause;
/// it goes to logs, the operator's condition and errors — never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

fn ferr(m: impl Into<String>) -> FetchError {
    FetchError(m.into())
}

/// Aborts a spawned task when dropped (the HTTP connection driver of one fetch).
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP(S) client configuration for one issuer.
#[derive(Clone)]
pub struct Fetcher {
    tls: Arc<rustls::ClientConfig>,
    allow_http: bool,
    timeout: Duration,
    max_bytes: usize,
}

/// The trust roots for an issuer: its CA bundle file, or the system's.
pub fn tls_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| ferr(format!("caFile {path}: {e}")))?;
            tls_config_pem(Some(&pem)).map_err(|e| ferr(format!("caFile {path}: {e}")))
        }
        None => tls_config_pem(None),
    }
}

/// The trust roots for an issuer: the PEM CA bundle given, or the system's.
pub fn tls_config_pem(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ferr(e.to_string()))?;
                roots.add(cert).map_err(|e| ferr(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ferr("no certificate in the CA bundle"));
            }
        }
        None => return Ok(system_roots()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ferr(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The system roots (the image's `/etc/ssl/certs`, or `SSL_CERT_FILE`), read once.
fn system_roots() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
                Ok(b) => Arc::new(b.with_root_certificates(roots).with_no_client_auth()),
                // aws-lc-rs supports the default versions; an empty root store fails every fetch.
                Err(_) => Arc::new(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ),
            }
        })
        .clone()
}

enum Answer {
    Body(Bytes),
    Redirect(String),
}

impl Fetcher {
    pub fn new(x: &ExternalIssuer) -> Result<Fetcher, FetchError> {
        Ok(Fetcher::with_tls(x, tls_config(x.ca_file.as_deref())?))
    }

    /// A fetcher with the limits of `x` and the given trust roots.
    pub fn with_tls(x: &ExternalIssuer, tls: Arc<rustls::ClientConfig>) -> Fetcher {
        Fetcher {
            tls,
            allow_http: x.allow_insecure_http,
            timeout: Duration::from_millis(x.fetch_timeout_ms),
            max_bytes: x.max_document_bytes as usize,
        }
    }

    /// GET `url` within the fetch timeout; the body of a 200 with a JSON content type.
    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        match tokio::time::timeout(self.timeout, self.get_following(url)).await {
            Ok(r) => r,
            Err(_) => Err(ferr(format!("{}: timed out after {} ms", host_of(url), self.timeout.as_millis()))),
        }
    }

    async fn get_following(&self, url: &str) -> Result<Bytes, FetchError> {
        let mut uri = self.parse(url)?;
        for _ in 0..=MAX_REDIRECTS {
            match self.get_once(&uri).await? {
                Answer::Body(b) => return Ok(b),
                Answer::Redirect(location) => {
                    let next = if location.starts_with('/') && !location.starts_with("//") {
                        format!("{}://{}{}", uri.scheme_str().unwrap_or("https"), authority(&uri), location)
                    } else {
                        location
                    };
                    let next = self.parse(&next)?;
                    if next.scheme() != uri.scheme() || !authority(&next).eq_ignore_ascii_case(authority(&uri)) {
                        return Err(ferr(format!("{}: redirect to another origin refused", authority(&uri))));
                    }
                    uri = next;
                }
            }
        }
        Err(ferr(format!("{}: more than {MAX_REDIRECTS} redirects", authority(&uri))))
    }

    fn parse(&self, url: &str) -> Result<Uri, FetchError> {
        authrealm_contract::external::check_url(url, self.allow_http).map_err(|m| ferr(format!("{url}: {m}")))?;
        let uri: Uri = url.parse().map_err(|_| ferr(format!("{url}: not a URL")))?;
        if uri.host().is_none() {
            return Err(ferr(format!("{url}: no host")));
        }
        Ok(uri)
    }

    async fn get_once(&self, uri: &Uri) -> Result<Answer, FetchError> {
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| ferr(format!("{}: connect: {e}", authority(uri))))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| ferr(format!("{host}: not a valid TLS server name")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| ferr(format!("{}: TLS: {e}", authority(uri))))?;
            self.exchange(tls, uri).await
        } else {
            self.exchange(tcp, uri).await
        }
    }

    async fn exchange<IO>(&self, io: IO, uri: &Uri) -> Result<Answer, FetchError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let at = authority(uri).to_string();
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| ferr(format!("{at}: {e}")))?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let req = Request::get(path)
            .header(http::header::HOST, &at)
            .header(http::header::ACCEPT, "application/json, application/jwk-set+json")
            .header(http::header::USER_AGENT, "authrealm-sidecar")
            .body(Empty::new())
            .map_err(|e| ferr(format!("{at}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| ferr(format!("{at}: {e}")))?;
        let status = resp.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| ferr(format!("{at}: HTTP {} without Location", status.as_u16())))?;
            return Ok(Answer::Redirect(location.to_string()));
        }
        if status != StatusCode::OK {
            return Err(ferr(format!("{at}{path}: HTTP {}", status.as_u16())));
        }
        let json = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase().ends_with("json"));
        if !json {
            return Err(ferr(format!("{at}{path}: content type is not JSON")));
        }
        let declared =
            resp.headers().get(http::header::CONTENT_LENGTH).and_then(|c| c.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(ferr(format!("{at}{path}: larger than {} bytes", self.max_bytes)));
        }
        let mut body = resp.into_body();
        let mut out = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ferr(format!("{at}{path}: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > self.max_bytes {
                    return Err(ferr(format!("{at}{path}: larger than {} bytes", self.max_bytes)));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Answer::Body(out.freeze()))
    }
}

fn authority(uri: &Uri) -> &str {
    uri.authority().map(|a| a.as_str()).unwrap_or("")
}

fn host_of(url: &str) -> String {
    url.parse::<Uri>().ok().and_then(|u| u.authority().map(|a| a.to_string())).unwrap_or_else(|| "url".into())
}

/// One verification key of an external issuer.
pub struct ExtKey {
    pub kid: String,
    /// Algorithms this key verifies: the JWK's `alg` (when present) or every algorithm of its
    /// type, intersected with the issuer's allow-list.
    pub algs: Vec<Alg>,
    /// Verifies signatures of `algs` only; parsed once per fetch.
    pub verify: crate::verifier::VerifyKey,
}

/// An issuer's usable keys, as of one fetch.
pub struct ExtKeySet {
    pub keys: Vec<ExtKey>,
    /// Entries skipped (unsupported, malformed, duplicate kid, over [`MAX_KEYS`]).
    pub skipped: usize,
    /// SHA-256 over the usable keys (kid, algorithms, material): unchanged when a refetch
    /// returns the same keys in another order or with other members.
    pub digest: [u8; 32],
}

impl ExtKeySet {
    /// No keys yet (before the first successful fetch).
    pub fn empty() -> ExtKeySet {
        ExtKeySet { keys: vec![], skipped: 0, digest: [0; 32] }
    }

    pub fn get(&self, kid: &str) -> Option<&ExtKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

impl crate::token::TokenKeys for ExtKeySet {
    fn has_alg(&self, alg: Alg) -> bool {
        self.keys.iter().any(|k| k.algs.contains(&alg))
    }
    fn key_for(&self, kid: &str, alg: Alg) -> Result<&crate::verifier::VerifyKey, crate::token::Reject> {
        let key = self.get(kid).ok_or(crate::token::Reject::UnknownKid)?;
        if !key.algs.contains(&alg) {
            return Err(crate::token::Reject::KidAlgMismatch);
        }
        Ok(&key.verify)
    }
}

fn b64(v: Option<&Value>) -> Option<Vec<u8>> {
    let s = v?.as_str()?;
    if s.is_empty() || s.len() > 2048 {
        return None;
    }
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Parse one JWK into a key, or `None` (skipped).
fn parse_key(k: &Map<String, Value>, allowed: &[Alg]) -> Option<ExtKey> {
    let kid = match k.get("kid") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
        _ => return None,
    };
    if k.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
        return None;
    }
    let kty = k.get("kty")?.as_str()?;
    let crv = k.get("crv").and_then(Value::as_str);
    let (family, verify): (Vec<Alg>, DecodingKey) = match kty {
        "RSA" => {
            let n = b64(k.get("n"))?;
            let e = b64(k.get("e"))?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if !(2048..=8192).contains(&bits) || e.is_empty() || e.len() > 8 {
                return None;
            }
            let key = DecodingKey::from_rsa_raw_components(&n, &e);
            (vec![Alg::RS256, Alg::RS384, Alg::RS512, Alg::PS256, Alg::PS384, Alg::PS512], key)
        }
        "EC" => {
            let (alg, len) = match crv? {
                "P-256" => (Alg::ES256, 32),
                "P-384" => (Alg::ES384, 48),
                _ => return None,
            };
            let x = k.get("x")?.as_str()?;
            let y = k.get("y")?.as_str()?;
            if b64(k.get("x"))?.len() != len || b64(k.get("y"))?.len() != len {
                return None;
            }
            (vec![alg], DecodingKey::from_ec_components(x, y).ok()?)
        }
        "OKP" => {
            if crv? != "Ed25519" {
                return None;
            }
            let x = k.get("x")?.as_str()?;
            if b64(k.get("x"))?.len() != 32 {
                return None;
            }
            (vec![Alg::EdDSA], DecodingKey::from_ed_components(x).ok()?)
        }
        // "oct" (a shared secret has no place in a published set) and anything else.
        _ => return None,
    };
    let algs: Vec<Alg> = match k.get("alg") {
        None => family.into_iter().filter(|a| allowed.contains(a)).collect(),
        Some(Value::String(a)) => {
            let a = Alg::from_jose(a)?;
            if !family.contains(&a) || !allowed.contains(&a) {
                return None;
            }
            vec![a]
        }
        Some(_) => return None,
    };
    if algs.is_empty() {
        return None;
    }
    let verify = crate::verifier::VerifyKey::new(&verify, &algs);
    Some(ExtKey { kid, algs, verify })
}

/// Parse a JWKS document; `allowed` is the issuer's algorithm allow-list.
pub fn parse_jwks(bytes: &[u8], allowed: &[Alg]) -> Result<ExtKeySet, FetchError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| ferr("JWKS is not valid JSON"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err(ferr("JWKS has no \"keys\" array"));
    };
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    let mut skipped = list.len().saturating_sub(MAX_KEYS);
    let mut hasher = Sha256::new();
    let mut parts: Vec<(String, String)> = Vec::new();
    for entry in list.iter().take(MAX_KEYS) {
        let parsed = entry.as_object().and_then(|k| parse_key(k, allowed).map(|key| (key, k)));
        match parsed {
            Some((key, obj)) if seen.insert(key.kid.clone()) => {
                let material: Vec<String> = ["kty", "crv", "n", "e", "x", "y"]
                    .iter()
                    .map(|m| obj.get(*m).and_then(Value::as_str).unwrap_or("").to_string())
                    .collect();
                parts.push((key.kid.clone(), format!("{:?}|{}", key.algs, material.join("|"))));
                keys.push(key);
            }
            _ => skipped += 1,
        }
    }
    if keys.is_empty() {
        return Err(ferr(format!("JWKS holds no usable key ({skipped} skipped)")));
    }
    parts.sort();
    for (kid, m) in parts {
        hasher.update(kid.as_bytes());
        hasher.update([0]);
        hasher.update(m.as_bytes());
        hasher.update([0]);
    }
    Ok(ExtKeySet { keys, skipped, digest: hasher.finalize().into() })
}

/// The `jwks_uri` of a discovery document, whose `issuer` must be `issuer` (OIDC Discovery §4.3).
pub fn parse_discovery(bytes: &[u8], issuer: &str) -> Result<String, FetchError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| ferr("discovery document is not valid JSON"))?;
    match doc.get("issuer").and_then(Value::as_str) {
        Some(i) if i == issuer => {}
        Some(_) => return Err(ferr("discovery document names another issuer")),
        None => return Err(ferr("discovery document has no issuer")),
    }
    doc.get("jwks_uri")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ferr("discovery document has no jwks_uri"))
}

/// Discovery (when configured) then JWKS, once: what the operator's probe and the sidecar's
/// refresh both do. Returns the key set and the JWKS URL used.
pub async fn fetch_keys(
    fetcher: &Fetcher,
    x: &ExternalIssuer,
    cached_jwks_uri: Option<&str>,
) -> Result<(ExtKeySet, String), FetchError> {
    let jwks_uri = match (&x.jwks_url, cached_jwks_uri) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.to_string(),
        (None, None) => {
            let url = x.discovery_url.as_deref().unwrap_or("");
            let doc = fetcher.get(url).await.map_err(|e| ferr(format!("discovery: {e}")))?;
            let uri = parse_discovery(&doc, &x.issuer).map_err(|e| ferr(format!("discovery: {e}")))?;
            authrealm_contract::external::check_url(&uri, x.allow_insecure_http)
                .map_err(|m| ferr(format!("discovery: jwks_uri {m}")))?;
            uri
        }
    };
    let doc = fetcher.get(&jwks_uri).await.map_err(|e| ferr(format!("jwks: {e}")))?;
    let set = parse_jwks(&doc, &x.algorithms).map_err(|e| ferr(format!("jwks: {e}")))?;
    Ok((set, jwks_uri))
}

/// Why a fetch was made (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Start,
    Refresh,
    UnknownKid,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Refresh => "refresh",
            Trigger::UnknownKid => "unknown_kid",
        }
    }
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    last_started: Option<Instant>,
    /// The JWKS URL learnt from discovery (re-learnt on every periodic refresh).
    jwks_uri: Option<String>,
    last_error: Option<String>,
}

/// The live key set of one external issuer, its refresh and its refetch-on-unknown-kid.
pub struct IssuerKeys {
    pub cfg: ExternalIssuer,
    /// Index in `externalIssuers` (part of the token cache's identity of a key).
    pub index: usize,
    pub policy: crate::token::Policy,
    keys: ArcSwap<ExtKeySet>,
    state: Mutex<FetchState>,
    /// Bumped (under `state`'s lock) when a fetch ends.
    done: watch::Sender<u64>,
    /// Bumped whenever the usable key set changes.
    generation: Arc<AtomicU64>,
    metrics: crate::metrics::Metrics,
}

impl IssuerKeys {
    pub fn new(
        index: usize,
        cfg: ExternalIssuer,
        realm: &authrealm_contract::SidecarConfig,
        generation: Arc<AtomicU64>,
        metrics: crate::metrics::Metrics,
    ) -> IssuerKeys {
        let policy = crate::token::Policy {
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            algorithms: cfg.algorithms.clone(),
            leeway: realm.leeway_seconds as i64,
            max_token_bytes: realm.limits.max_token_bytes,
            required_claims: realm.required_claims.clone(),
            session_mode: realm.session_mode,
            max_lifetime: realm.max_token_ttl_seconds as i64,
        };
        let (done, _) = watch::channel(0);
        IssuerKeys {
            cfg,
            index,
            policy,
            keys: ArcSwap::from_pointee(ExtKeySet::empty()),
            state: Mutex::new(FetchState::default()),
            done,
            generation,
            metrics,
        }
    }

    /// The keys of the last successful fetch (empty before the first).
    pub fn keys(&self) -> Arc<ExtKeySet> {
        self.keys.load_full()
    }

    fn label(&self) -> crate::metrics::IssuerLabel {
        crate::metrics::IssuerLabel { issuer: self.cfg.issuer.clone() }
    }

    /// Claim the right to fetch now. `None`: a fetch is in flight (wait on the receiver), or the
    /// minimum interval has not elapsed (`rx` is None then too, with `false`).
    fn claim(&self, trigger: Trigger) -> (bool, Option<watch::Receiver<u64>>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.in_flight {
            return (false, Some(self.done.subscribe()));
        }
        let min = Duration::from_millis(self.cfg.min_refetch_interval_ms);
        if trigger == Trigger::UnknownKid && st.last_started.is_some_and(|t| t.elapsed() < min) {
            return (false, None);
        }
        st.in_flight = true;
        st.last_started = Some(Instant::now());
        (true, Some(self.done.subscribe()))
    }

    /// Fetch now (single-flight) and wait for the outcome; an unknown-kid trigger respects the
    /// minimum interval. Returns when the fetch this call joined or started has ended, or at
    /// once when it may not fetch.
    pub async fn refetch(self: &Arc<Self>, trigger: Trigger) {
        let (mine, rx) = self.claim(trigger);
        let Some(mut rx) = rx else { return };
        if mine {
            // On its own task: a request that gives up (client gone) never cancels the fetch.
            let me = self.clone();
            tokio::spawn(async move { me.fetch(trigger).await });
        }
        let bound = Duration::from_millis(self.cfg.fetch_timeout_ms.saturating_mul(2) + 100);
        let _ = tokio::time::timeout(bound, rx.changed()).await;
    }

    async fn fetch(&self, trigger: Trigger) {
        let cached = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            // A periodic refresh re-reads discovery too; other fetches reuse its jwks_uri.
            if trigger == Trigger::Refresh { None } else { st.jwks_uri.clone() }
        };
        // The CA bundle is read for every fetch: a bundle updated in its ConfigMap (or mounted
        // late) is used without a restart.
        let result = match Fetcher::new(&self.cfg) {
            Ok(f) => fetch_keys(&f, &self.cfg, cached.as_deref()).await,
            Err(e) => Err(e),
        };
        let label = self.label();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .jwks_fetches
            .get_or_create(&crate::metrics::FetchLabels {
                issuer: self.cfg.issuer.clone(),
                trigger: trigger.label(),
                result: outcome,
            })
            .inc();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((set, uri)) => {
                st.jwks_uri = (self.cfg.discovery_url.is_some()).then_some(uri);
                if st.last_error.take().is_some() {
                    tracing::info!(issuer = %self.cfg.issuer, keys = set.keys.len(), "external issuer keys fetched again");
                }
                self.metrics.jwks_keys.get_or_create(&label).set(set.keys.len() as i64);
                self.metrics.jwks_keys_skipped.get_or_create(&label).set(set.skipped as i64);
                self.metrics.jwks_fresh.get_or_create(&label).set(1);
                self.metrics.jwks_last_success.get_or_create(&label).set(crate::app::now_unix());
                let changed = self.keys.load().digest != set.digest;
                if changed {
                    if set.skipped > 0 {
                        tracing::warn!(issuer = %self.cfg.issuer, keys = set.keys.len(), skipped = set.skipped,
                            "external issuer JWKS: entries skipped (unsupported type or algorithm, no kid, duplicate kid)");
                    }
                    tracing::info!(issuer = %self.cfg.issuer, keys = set.keys.len(), "external issuer key set loaded");
                    self.keys.store(Arc::new(set));
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                self.metrics.jwks_fresh.get_or_create(&label).set(0);
                let msg = e.to_string();
                if st.last_error.as_deref() != Some(&msg) {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %msg, trigger = trigger.label(),
                        "external issuer key fetch failed; keeping the last good keys");
                }
                st.last_error = Some(msg);
            }
        }
        st.in_flight = false;
        self.done.send_modify(|n| *n += 1);
    }

    /// Last fetch error, if the last fetch failed.
    pub fn last_error(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).last_error.clone()
    }

    /// First fetch, then the periodic refresh (shorter, growing retries after a failure).
    pub fn spawn_refresher(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_millis(me.cfg.refresh_interval_ms);
            let first_retry = Duration::from_millis(me.cfg.min_refetch_interval_ms).max(Duration::from_secs(1));
            let mut retry = first_retry;
            me.refetch(Trigger::Start).await;
            loop {
                let wait = if me.last_error().is_none() {
                    retry = first_retry;
                    interval
                } else {
                    let w = retry.min(interval);
                    retry = (retry * 2).min(Duration::from_secs(60));
                    w
                };
                tokio::time::sleep(wait).await;
                me.refetch(Trigger::Refresh).await;
            }
        });
    }
}

/// Every external issuer of the realm.
pub struct External {
    pub issuers: Vec<Arc<IssuerKeys>>,
    generation: Arc<AtomicU64>,
}

impl External {
    pub fn new(cfg: &authrealm_contract::SidecarConfig, metrics: &crate::metrics::Metrics) -> External {
        let generation = Arc::new(AtomicU64::new(0));
        let issuers = cfg
            .external_issuers
            .iter()
            .enumerate()
            .map(|(i, x)| Arc::new(IssuerKeys::new(i, x.clone(), cfg, generation.clone(), metrics.clone())))
            .collect();
        External { issuers, generation }
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Changes whenever any external key set changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn by_issuer(&self, iss: &str) -> Option<&Arc<IssuerKeys>> {
        self.issuers.iter().find(|i| i.cfg.issuer == iss)
    }

    pub fn spawn(&self) {
        for i in &self.issuers {
            i.spawn_refresher();
        }
    }
}

/// The `iss` claim of a token, read without verifying anything (it only chooses which issuer's
/// keys and rules the token is then checked with). `None` when absent or unreadable.
pub fn peek_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        iss: Option<Value>,
    }
    let p64 = token.split('.').nth(1)?;
    let payload = URL_SAFE_NO_PAD.decode(p64).ok()?;
    match serde_json::from_slice::<Peek>(&payload).ok()?.iss? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::KeyState;
    use authrealm_contract::keygen::generate;
    use serde_json::json;

    fn jwk(alg: Alg, kid: &str) -> Value {
        let k = generate(alg, kid, 0, KeyState::Current).unwrap();
        let mut v = serde_json::to_value(k.public_jwk.unwrap()).unwrap();
        v["kid"] = kid.into();
        v["alg"] = alg.as_str().into();
        v
    }

    #[test]
    fn usable_keys_are_kept_and_the_rest_skipped_without_panicking() {
        let rs = jwk(Alg::RS256, "rs");
        let es = jwk(Alg::ES256, "es");
        let ed = jwk(Alg::EdDSA, "ed");
        let mut no_kid = jwk(Alg::ES256, "x");
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut enc = jwk(Alg::ES256, "enc");
        enc["use"] = "enc".into();
        let mut weak = rs.clone();
        weak["kid"] = "weak".into();
        weak["n"] = URL_SAFE_NO_PAD.encode([0xffu8; 128]).into();
        let mut mismatched = es.clone();
        mismatched["kid"] = "mm".into();
        mismatched["alg"] = "RS256".into();
        let mut dup = es.clone();
        dup["x"] = rs["n"].clone();
        let doc = json!({"keys": [
            rs, es, ed, no_kid, enc, weak, mismatched, dup,
            {"kty": "oct", "kid": "hs", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "bad-b64", "n": "!!", "e": "AQAB"},
            "not an object", 17, null,
            {"kty": "OKP", "kid": "x25519", "crv": "X25519", "x": URL_SAFE_NO_PAD.encode([1u8; 32])},
        ]});
        let all = [Alg::RS256, Alg::PS256, Alg::ES256, Alg::EdDSA];
        let set = parse_jwks(doc.to_string().as_bytes(), &all).unwrap();
        let kids: Vec<&str> = set.keys.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, ["rs", "es", "ed"]);
        assert_eq!(set.skipped, 12);
        assert_eq!(set.get("rs").unwrap().algs, [Alg::RS256]);
        // The allow-list narrows what a key verifies; a key outside it is skipped.
        let only_es = parse_jwks(doc.to_string().as_bytes(), &[Alg::ES256]).unwrap();
        assert_eq!(only_es.keys.len(), 1);
        // An RSA JWK without alg verifies every allowed RSA algorithm.
        let mut no_alg = jwk(Alg::RS256, "r");
        no_alg.as_object_mut().unwrap().remove("alg");
        let s = parse_jwks(json!({"keys": [no_alg]}).to_string().as_bytes(), &[Alg::PS256, Alg::RS256, Alg::ES256])
            .unwrap();
        assert_eq!(s.keys[0].algs, [Alg::RS256, Alg::PS256]);
    }

    #[test]
    fn whole_document_errors() {
        let all = [Alg::ES256];
        for bad in [&b"not json"[..], b"{}", b"{\"keys\": {}}", b"[]", b"{\"keys\": []}", b"{\"keys\": [1, 2]}"] {
            assert!(parse_jwks(bad, &all).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let many: Vec<Value> = (0..200).map(|i| jwk(Alg::ES256, &format!("k{i}"))).collect();
        let set = parse_jwks(json!({ "keys": many }).to_string().as_bytes(), &all).unwrap();
        assert_eq!((set.keys.len(), set.skipped), (MAX_KEYS, 200 - MAX_KEYS));
    }

    #[test]
    fn digest_ignores_order_and_extra_members() {
        let a = jwk(Alg::ES256, "a");
        let b = jwk(Alg::ES256, "b");
        let mut b2 = b.clone();
        b2["x5t"] = "ignored".into();
        let d1 = parse_jwks(json!({"keys": [a, b]}).to_string().as_bytes(), &[Alg::ES256]).unwrap().digest;
        let d2 = parse_jwks(json!({"keys": [b2, a]}).to_string().as_bytes(), &[Alg::ES256]).unwrap().digest;
        assert_eq!(d1, d2);
        let d3 = parse_jwks(json!({"keys": [a]}).to_string().as_bytes(), &[Alg::ES256]).unwrap().digest;
        assert_ne!(d1, d3);
    }

    #[test]
    fn discovery_must_name_the_issuer() {
        let d = json!({"issuer": "https://idp", "jwks_uri": "https://idp/keys"}).to_string();
        assert_eq!(parse_discovery(d.as_bytes(), "https://idp").unwrap(), "https://idp/keys");
        assert!(parse_discovery(d.as_bytes(), "https://other").is_err());
        assert!(parse_discovery(b"{\"issuer\": \"https://idp\"}", "https://idp").is_err());
        assert!(parse_discovery(b"<html>", "https://idp").is_err());
    }

    #[test]
    fn issuer_peek() {
        let t = |claims: Value| format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims.to_string()));
        assert_eq!(peek_issuer(&t(json!({"iss": "https://idp", "sub": "a"}))).as_deref(), Some("https://idp"));
        assert_eq!(peek_issuer(&t(json!({"iss": 5}))), None);
        assert_eq!(peek_issuer(&t(json!([1]))), None);
        assert_eq!(peek_issuer("a.!!.c"), None);
        assert_eq!(peek_issuer("abc"), None);
    }
}
