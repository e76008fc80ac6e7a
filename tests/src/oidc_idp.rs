//! A small OpenID Connect provider of the tests' own: HTTPS (a CA generated per instance, rcgen +
//! tokio-rustls; or plain HTTP for realms that allow it), `/.well-known/openid-configuration` and `/jwks`, tokens signed with its
//! current key, and controls for what the suites need to see — key rotation, an outage (503 or
//! connections closed at once), a hanging answer, an oversize or malformed JWKS, a redirect,
//! extra JWKS entries — plus a count of each document fetched.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use authrealm_contract::keygen::{generate, random_kid};
use authrealm_contract::{Alg, KeyEntry, KeySet, KeyState};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// How the provider answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Every request: 503.
    Unavailable,
    /// Connections are closed right after accept (no TLS handshake).
    Refuse,
    /// Requests are read and never answered.
    Hang,
    /// `/jwks` answers a valid JWKS padded beyond `n` bytes (streamed, no Content-Length).
    Oversize(usize),
    /// `/jwks` answers bytes that are not JSON.
    Malformed,
    /// `/jwks` answers a JSON document that is not a JWKS.
    NotAJwks,
    /// `/jwks` redirects to the same path on another origin (`localhost` instead of `127.0.0.1`).
    RedirectElsewhere,
    /// `/jwks` redirects to `/jwks-moved` on the same origin (which serves the JWKS).
    RedirectSameOrigin,
}

struct State {
    /// Published keys, oldest first; the last one signs.
    keys: Vec<KeyEntry>,
    mode: Mode,
    /// Extra raw entries appended to the JWKS `keys` array.
    extra: Vec<Value>,
}

pub struct TestIdp {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT`
    pub issuer: String,
    /// PEM of the CA that signed the provider's certificate (also written to `ca_file`).
    pub ca_pem: String,
    pub ca_file: PathBuf,
    dir: PathBuf,
    alg: Alg,
    state: Arc<Mutex<State>>,
    discovery_fetches: Arc<AtomicU64>,
    jwks_fetches: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_material(dir: &std::path::Path) -> Result<(String, PathBuf, rustls::ServerConfig)> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "authrealm test IdP CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse()?));
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer)?;
    let ca_pem = ca_cert.pem();
    let ca_file = dir.join("idp-ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes())?],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
        )?;
    Ok((ca_pem, ca_file, cfg))
}

type IdpBody = BoxBody<Bytes, std::convert::Infallible>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<IdpBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, content_type.parse().expect("content type"));
    r
}

impl TestIdp {
    /// A provider on a free loopback port signing with a fresh `alg` key.
    pub async fn start(alg: Alg) -> Result<TestIdp> {
        Self::start_inner(alg, false).await
    }

    /// The same over plain HTTP (`http://127.0.0.1:PORT`), for realms that allow it.
    pub async fn start_plain_http(alg: Alg) -> Result<TestIdp> {
        Self::start_inner(alg, true).await
    }

    async fn start_inner(alg: Alg, plain: bool) -> Result<TestIdp> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "authrealm-idp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let (ca_pem, ca_file, tls) = tls_material(&dir)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let issuer = if plain { format!("http://{addr}") } else { format!("https://{addr}") };
        let state = Arc::new(Mutex::new(State {
            keys: vec![generate(alg, &random_kid(), 0, KeyState::Current)?],
            mode: Mode::Up,
            extra: vec![],
        }));
        let discovery_fetches = Arc::new(AtomicU64::new(0));
        let jwks_fetches = Arc::new(AtomicU64::new(0));
        let (st, df, jf, iss) = (state.clone(), discovery_fetches.clone(), jwks_fetches.clone(), issuer.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                if st.lock().unwrap().mode == Mode::Refuse {
                    drop(tcp);
                    continue;
                }
                let (acceptor, st, df, jf, iss) = (acceptor.clone(), st.clone(), df.clone(), jf.clone(), iss.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (st, df, jf, iss) = (st.clone(), df.clone(), jf.clone(), iss.clone());
                        async move { Ok::<_, std::convert::Infallible>(serve(req, &st, &df, &jf, &iss).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    if plain {
                        let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                    } else if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                    }
                });
            }
        });
        Ok(TestIdp { addr, issuer, ca_pem, ca_file, dir, alg, state, discovery_fetches, jwks_fetches, task })
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.issuer)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Publish a new key and sign with it from now on (the old keys stay published); its kid.
    pub fn rotate(&self) -> String {
        let key = generate(self.alg, &random_kid(), 0, KeyState::Current).unwrap();
        let kid = key.kid.clone();
        self.state.lock().unwrap().keys.push(key);
        kid
    }

    /// Stop publishing `kid` (the IdP retired it).
    pub fn remove_key(&self, kid: &str) {
        self.state.lock().unwrap().keys.retain(|k| k.kid != kid);
    }

    /// Raw entries appended to the published JWKS (hostile or unsupported keys).
    pub fn set_extra_jwks_entries(&self, extra: Vec<Value>) {
        self.state.lock().unwrap().extra = extra;
    }

    pub fn current_kid(&self) -> String {
        self.state.lock().unwrap().keys.last().unwrap().kid.clone()
    }

    pub fn current_key(&self) -> KeyEntry {
        self.state.lock().unwrap().keys.last().unwrap().clone()
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn discovery_fetches(&self) -> u64 {
        self.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Standard claims for `sub`, audience `aud`, living `ttl` seconds from now, with a random jti.
    pub fn claims(&self, sub: &str, aud: &str, ttl: i64) -> Value {
        let now = crate::support::unix_now();
        json!({
            "iss": self.issuer, "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": now + ttl,
            "jti": random_kid(), "email": format!("{sub}@idp.example"),
        })
    }

    /// Sign `claims` with the current key (header `alg` = the key's, `kid` = its kid).
    pub fn sign(&self, claims: &Value) -> String {
        let key = self.current_key();
        crate::sidecar::sign_raw(&key, &json!({"alg": key.alg.as_str(), "typ": "JWT", "kid": key.kid}), claims)
    }

    /// Sign with the current key but present `kid` in the header.
    pub fn sign_with_kid(&self, kid: &str, claims: &Value) -> String {
        let key = self.current_key();
        crate::sidecar::sign_raw(&key, &json!({"alg": key.alg.as_str(), "typ": "JWT", "kid": kid}), claims)
    }

    /// A token for `sub` and `aud` living `ttl` seconds.
    pub fn token(&self, sub: &str, aud: &str, ttl: i64) -> String {
        self.sign(&self.claims(sub, aud, ttl))
    }

    fn jwks(&self) -> Value {
        jwks_of(&self.state.lock().unwrap())
    }

    /// The JWKS as published now.
    pub fn published(&self) -> Value {
        self.jwks()
    }
}

fn jwks_of(st: &State) -> Value {
    let set = KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys: st.keys.clone() };
    let mut doc = set.jwks();
    if let Some(list) = doc.get_mut("keys").and_then(Value::as_array_mut) {
        list.extend(st.extra.iter().cloned());
    }
    doc
}

async fn serve(
    req: Request<Incoming>,
    st: &Mutex<State>,
    discovery: &AtomicU64,
    jwks: &AtomicU64,
    issuer: &str,
) -> Response<IdpBody> {
    let mode = st.lock().unwrap().mode.clone();
    let path = req.uri().path();
    match mode {
        Mode::Unavailable => return answer(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "down for maintenance\n"),
        Mode::Hang => {
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    match path {
        "/.well-known/openid-configuration" => {
            discovery.fetch_add(1, Ordering::SeqCst);
            let doc = json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/jwks"),
                "authorization_endpoint": format!("{issuer}/auth"),
                "token_endpoint": format!("{issuer}/token"),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            });
            answer(StatusCode::OK, "application/json", doc.to_string())
        }
        "/jwks" | "/jwks-moved" => {
            jwks.fetch_add(1, Ordering::SeqCst);
            let doc = jwks_of(&st.lock().unwrap());
            match mode {
                Mode::Oversize(n) => {
                    // Streamed in 16 KiB chunks without a Content-Length: the client must count.
                    let mut text = doc.to_string();
                    text.pop();
                    text.push_str(", \"padding\": \"");
                    text.push_str(&"x".repeat(n));
                    text.push_str("\"}");
                    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Bytes::from(text)
                        .chunks(16 * 1024)
                        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                        .collect();
                    let mut r = Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
                    r.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
                    r
                }
                Mode::Malformed => answer(StatusCode::OK, "application/json", "{\"keys\": [{\"kty\": \"RSA\","),
                Mode::NotAJwks => answer(StatusCode::OK, "application/json", "{\"hello\": \"world\"}"),
                Mode::RedirectElsewhere if path == "/jwks" => {
                    let port = issuer.rsplit(':').next().unwrap_or("443");
                    let mut r = answer(StatusCode::FOUND, "text/plain", "");
                    r.headers_mut()
                        .insert(http::header::LOCATION, format!("https://localhost:{port}/jwks").parse().unwrap());
                    r
                }
                Mode::RedirectSameOrigin if path == "/jwks" => {
                    let mut r = answer(StatusCode::FOUND, "text/plain", "");
                    r.headers_mut().insert(http::header::LOCATION, "/jwks-moved".parse().unwrap());
                    r
                }
                _ => answer(StatusCode::OK, "application/jwk-set+json", doc.to_string()),
            }
        }
        _ => answer(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
