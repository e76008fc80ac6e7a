//! The webhook's HTTPS server: hyper (HTTP/1.1 and HTTP/2) over rustls with the aws-lc-rs
//! provider. The serving certificate is swapped in place when [`TlsManager::sync`] returns a new
//! one; new TLS handshakes use it at once, established connections keep theirs.
//!
//! Routes: `POST /mutate-pods` (AdmissionReview), `GET /healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::MUTATE_PATH;
use super::config::WebhookConfig;
use super::lookup::Lookups;
use super::metrics::WebhookMetrics;
use super::realm::{SidecarDefaults, default_resources};
use super::review::Reviewer;
use super::tls::{Lifetimes, ServingPair, TlsError, TlsManager};

/// Largest AdmissionReview accepted (a Pod is at most ~1.5 MiB in etcd; a review carries it once
/// for CREATE).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the webhook waits at start for its AuthRealm and Namespace caches to list before it
/// serves anyway (reading the API server until they have).
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(10);
/// How long in-flight reviews may take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its renewal time a loaded certificate is checked (so the check falls in the
/// second the renewal is due, not just before it).
const RENEWAL_SLACK: Duration = Duration::from_millis(20);

/// A failure that stops the webhook.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("no serving certificate: {0}")]
    Tls(#[from] TlsError),
}

impl WebhookError {
    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WebhookError::Config(_) => "config",
            WebhookError::Bind { .. } => "bind",
            WebhookError::Tls(e) => e.kind(),
        }
    }
}

/// Parses a PEM certificate chain and key into what rustls serves.
pub fn load_certified_key(cert_pem: &str, key_pem: &str, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    use rustls::pki_types::pem::{self, PemObject as _};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem(format!("tls.crt: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::InvalidPem("tls.crt holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::InvalidPem("tls.key holds no private key".into()),
        e => TlsError::InvalidPem(format!("tls.key: {e}")),
    })?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::InvalidPem(e.to_string()))
}

/// The certificate the listener serves, replaceable while it runs.
#[derive(Debug, Default)]
struct HotCert(ArcSwapOption<CertifiedKey>);

impl ResolvesServerCert for HotCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

/// A running webhook server.
pub struct WebhookHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl WebhookHandle {
    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight reviews finish (bounded), stops the certificate loop.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Shared {
    reviewer: Reviewer,
}

/// Tasks aborted when dropped, unless handed on.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Validates `cfg`, starts the AuthRealm and Namespace watch caches, obtains the first serving
/// certificate (creating the CA in self-managed mode; retried for up to 30 s), binds the listener,
/// waits (bounded) for the caches to list and starts serving and the certificate loop.
pub async fn start_webhook(
    client: kube::Client,
    cfg: WebhookConfig,
    metrics: WebhookMetrics,
) -> Result<WebhookHandle, WebhookError> {
    cfg.validate().map_err(WebhookError::Config)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (lookups, cache_tasks) = Lookups::start(client.clone(), metrics.clone(), shutdown_rx.clone());
    let mut cache_tasks = AbortOnDrop(cache_tasks);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = TlsManager::new(client.clone(), &cfg, metrics.clone());
    let hot = Arc::new(HotCert::default());

    let mut attempt = 0;
    let first = loop {
        attempt += 1;
        match tls.sync().await {
            Ok(s) => break s,
            Err(e) if attempt < 30 => {
                tracing::warn!(error = %e, kind = e.kind(), attempt, "webhook certificate not available yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = &first.ca_bundle {
        tracing::warn!(error = %e, "webhook caBundle not published yet; the API server cannot call the webhook until it is");
    }
    let mut loaded = first.serving.clone();
    install(&hot, &loaded, &provider, &metrics)?;

    let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| WebhookError::Config(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(hot.clone());
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|source| WebhookError::Bind { addr: cfg.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| WebhookError::Bind { addr: cfg.listen, source })?;
    tracing::info!(%local_addr, path = MUTATE_PATH, "sidecar-injection webhook listening");

    let defaults = SidecarDefaults {
        image: cfg.sidecar_image.clone(),
        image_pull_policy: cfg.sidecar_image_pull_policy.clone(),
        resources: default_resources(),
    };
    if !lookups.wait_synced(CACHE_SYNC_WAIT).await {
        tracing::warn!(
            "the webhook's AuthRealm and Namespace caches have not listed after {CACHE_SYNC_WAIT:?}; \
             reading the API server for each admission until they have"
        );
    }
    let shared = Arc::new(Shared {
        reviewer: Reviewer::new(
            client,
            lookups,
            defaults,
            cfg.unready_realm_policy,
            metrics.clone(),
            cfg.instance.clone(),
        ),
    });

    // Certificate loop.
    let cert_task = {
        let mut stop = shutdown_rx.clone();
        let interval = cfg.cert_check_interval;
        let lifetimes = Lifetimes::from_config(&cfg);
        let provider = provider.clone();
        let hot = hot.clone();
        tokio::spawn(async move {
            loop {
                let renew_at = loaded.not_after.map(|not_after| lifetimes.renew_at(not_after));
                tokio::select! {
                    _ = tokio::time::sleep(next_check(interval, renew_at, SystemTime::now())) => {}
                    _ = stop.changed() => return,
                }
                match tls.sync().await {
                    Ok(synced) => {
                        if let Err(e) = &synced.ca_bundle {
                            tracing::warn!(error = %e, kind = e.kind(), "webhook caBundle not published");
                        }
                        if synced.serving != loaded {
                            match install(&hot, &synced.serving, &provider, &metrics) {
                                Ok(()) => {
                                    tracing::info!("webhook serving certificate reloaded");
                                    loaded = synced.serving;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "new webhook certificate unusable; keeping the old one")
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, kind = e.kind(), "webhook certificate check failed"),
                }
            }
        })
    };

    // Accept loop.
    let accept_task = {
        let mut stop = shutdown_rx;
        tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let (stream, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "webhook accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = stop.changed() => break,
                };
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "webhook TLS handshake timed out");
                            return;
                        }
                    };
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
                    }
                });
            }
            if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
                tracing::warn!("webhook connections still open after {DRAIN_TIMEOUT:?}; closing");
            }
        })
    };

    let mut tasks = vec![accept_task, cert_task];
    tasks.append(&mut cache_tasks.0);
    Ok(WebhookHandle { local_addr, shutdown: shutdown_tx, tasks })
}

/// How long the certificate loop waits before its next check: the check interval, or less when
/// the loaded certificate falls due for renewal (`renew_at`, Unix seconds) sooner — then just
/// past that moment, so that this replica picks up (or issues) the new certificate while the
/// old one still has a third of its lifetime left, instead of up to a whole interval later.
fn next_check(interval: Duration, renew_at: Option<i64>, now: SystemTime) -> Duration {
    let Some(renew_at) = renew_at.and_then(|t| u64::try_from(t).ok()) else {
        return interval;
    };
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    match Duration::from_secs(renew_at).checked_sub(now) {
        // Still ahead. Once it has passed (the check found nothing new, or failed) the
        // interval applies again: no tight loop.
        Some(until) if !until.is_zero() => interval.min(until + RENEWAL_SLACK),
        _ => interval,
    }
}

fn install(
    hot: &HotCert,
    pair: &ServingPair,
    provider: &CryptoProvider,
    metrics: &WebhookMetrics,
) -> Result<(), TlsError> {
    let key = load_certified_key(&pair.cert_pem, &pair.key_pem, provider)?;
    hot.0.store(Some(Arc::new(key)));
    metrics.cert_reloads.inc();
    if let Some(not_after) = pair.not_after {
        metrics.cert_expiry.set(not_after);
    }
    Ok(())
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, MUTATE_PATH) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large or unreadable\n"),
            };
            let out = shared.reviewer.review_json(&body).await;
            let mut r = Response::new(Full::new(Bytes::from(out)));
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
        (_, MUTATE_PATH) => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_again_when_the_loaded_certificate_falls_due() {
        let second = Duration::from_secs(1);
        let at = |unix_ms: u64| UNIX_EPOCH + Duration::from_millis(unix_ms);
        // Due in 300 ms, interval 1 s: wake just after the renewal time, not a whole interval later
        // (by when a certificate with a third of 3 s left would have expired).
        let wait = next_check(second, Some(1_000), at(999_700));
        assert!(wait >= Duration::from_millis(300) && wait < Duration::from_millis(400), "{wait:?}");
        // Due after the interval: the interval.
        assert_eq!(next_check(Duration::from_secs(60), Some(1_000), at(100_000)), Duration::from_secs(60));
        // Due time passed (the last check brought nothing new) or unknown (external mode): the
        // interval, never a tight loop.
        assert_eq!(next_check(second, Some(1_000), at(1_000_000)), second);
        assert_eq!(next_check(second, Some(1_000), at(1_000_500)), second);
        assert_eq!(next_check(second, None, at(999_700)), second);
    }
}
