//! Shared state of a running sidecar and the Redis connection lifecycle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use authrealm_contract::{FailurePolicy, SessionMode, SidecarConfig};

use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::session::{RedisConn, SessionStore, StoreClient};
use crate::token::Policy;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: http::StatusCode, v: &serde_json::Value) -> http::Response<Body> {
    let mut r = http::Response::new(full(serde_json::to_vec(v).expect("json")));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One identity header: the claim it carries and every spelling of its name a client could
/// use to spoof it.
pub struct IdentityHeader {
    pub claim: String,
    pub name: HeaderName,
    /// Lower case with `_` folded to `-`, for comparison.
    pub folded: String,
}

pub fn fold_header_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

pub struct App {
    pub cfg: SidecarConfig,
    pub policy: Policy,
    pub keys: KeyStore,
    pub metrics: Metrics,
    pub identity: Vec<IdentityHeader>,
    /// `Bearer realm="…"`, computed once.
    pub www_authenticate: HeaderValue,
    pub www_authenticate_invalid: HeaderValue,
    sessions: OnceLock<SessionStore>,
    redis_ready: AtomicBool,
    last_fail_open_log: AtomicU64,
    started: Instant,
    pub draining: AtomicBool,
    /// Upgraded connections (WebSocket) hold one of these: at most `limits.maxConnections`.
    pub tunnels: Arc<tokio::sync::Semaphore>,
    /// Tokens verified before (see `tokencache`).
    pub token_cache: crate::tokencache::TokenCache,
    /// `authorization.rules`, compiled (see `authz`).
    pub authz: crate::authz::Authz,
    /// External issuers' key sets (`externalIssuers`; see `jwks`).
    pub external: crate::jwks::External,
    /// The session records' key layout (`single`/`multi` realms): verified tokens keep their
    /// session key ([`crate::session::SessionKey`]).
    pub session_layout: Option<crate::session::KeyLayout>,
}

/// Two multiplexed connections (cluster, or to the standalone server): one for per-request
/// reads, one for writes and their WAITs (see SessionStore), so a WAIT never holds up request
/// checks.
async fn connect_pair(
    client: &StoreClient,
    write_client: &StoreClient,
    limit: Duration,
) -> Result<(RedisConn, RedisConn), String> {
    let reader = tokio::time::timeout(limit, client.connect()).await;
    let writer = tokio::time::timeout(limit, write_client.connect()).await;
    match (reader, writer) {
        (Ok(Ok(r)), Ok(Ok(w))) => Ok((r, w)),
        (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e.to_string()),
        _ => Err("connecting to redis timed out".to_string()),
    }
}

impl App {
    pub fn new(cfg: SidecarConfig, keys: KeyStore, metrics: Metrics) -> Arc<App> {
        let cfg_max_connections = cfg.limits.max_connections as usize;
        let token_cache = crate::tokencache::TokenCache::new(
            cfg.limits.verified_token_cache_entries as usize,
            cfg.limits.verified_token_cache_bytes as usize,
            metrics.token_cache.clone(),
        );
        let policy = Policy {
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            algorithms: cfg.algorithms.clone(),
            leeway: cfg.leeway_seconds as i64,
            max_token_bytes: cfg.limits.max_token_bytes,
            required_claims: cfg.required_claims.clone(),
            session_mode: cfg.session_mode,
            max_lifetime: cfg.max_token_ttl_seconds as i64,
        };
        let identity = cfg
            .identity_headers
            .iter()
            .map(|h| IdentityHeader {
                claim: h.claim.clone(),
                name: HeaderName::from_bytes(h.header.to_ascii_lowercase().as_bytes()).expect("validated header name"),
                folded: fold_header_name(&h.header),
            })
            .collect();
        // The realm is a DNS name: safe inside a quoted string.
        let www_authenticate =
            HeaderValue::from_str(&format!("Bearer realm=\"{}\"", cfg.realm)).expect("realm is a DNS name");
        let www_authenticate_invalid =
            HeaderValue::from_str(&format!("Bearer realm=\"{}\", error=\"invalid_token\"", cfg.realm))
                .expect("realm is a DNS name");
        let authz = crate::authz::Authz::new(&cfg.authorization, &cfg.realm);
        let external = crate::jwks::External::new(&cfg, &metrics);
        let session_layout = match (cfg.session_mode, &cfg.redis) {
            (SessionMode::Single | SessionMode::Multi, Some(r)) => {
                Some(crate::session::KeyLayout::new(&r.key_prefix, &cfg.realm))
            }
            _ => None,
        };
        Arc::new(App {
            session_layout,
            authz,
            external,
            cfg,
            policy,
            keys,
            metrics,
            identity,
            www_authenticate,
            www_authenticate_invalid,
            sessions: OnceLock::new(),
            redis_ready: AtomicBool::new(false),
            last_fail_open_log: AtomicU64::new(0),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            tunnels: Arc::new(tokio::sync::Semaphore::new(cfg_max_connections)),
            token_cache,
        })
    }

    /// The identity of every key set a verification may have used: the own ring's digest, and
    /// the external sets' generation when there are external issuers. The verified-token cache
    /// is keyed by it, so any key leaving any set drops every cached verification.
    pub fn trust_digest(&self, ring_digest: &[u8; 32]) -> [u8; 32] {
        if self.external.is_empty() {
            return *ring_digest;
        }
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(ring_digest);
        h.update(self.external.generation().to_be_bytes());
        h.finalize().into()
    }

    /// Every local check of `token`, with the keys and rules of the issuer its `iss` names: the
    /// realm's own (also when `iss` is missing or unreadable, which then fails as it always did)
    /// or one external issuer's; any other `iss` is refused at once (`wrong_issuer`). A `kid` unknown to that issuer's set triggers a refetch
    /// (single-flight, at most once per `minRefetchIntervalMs`) and one more attempt. Returns the
    /// external issuer's index with the verified token.
    pub async fn validate_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(crate::token::Verified, Option<usize>), crate::token::Reject> {
        use crate::token::{Reject, validate, validate_with};
        let ext = if self.external.is_empty() || token.len() > self.policy.max_token_bytes {
            None
        } else {
            match crate::jwks::peek_issuer(token) {
                Some(iss) if iss != self.cfg.issuer => match self.external.by_issuer(&iss) {
                    Some(x) => Some(x.clone()),
                    // Neither the realm nor any issuer it trusts.
                    None => return Err(Reject::WrongIssuer),
                },
                _ => None,
            }
        };
        let Some(ext) = ext else {
            let ring = self.keys.ring();
            return validate(token, &ring, &self.policy, now).map(|v| (v, None));
        };
        let attempt = || validate_with(token, &*ext.keys(), &ext.policy, &ext.cfg.subject_claim, now);
        match attempt() {
            Err(Reject::UnknownKid) => {
                ext.refetch(crate::jwks::Trigger::UnknownKid).await;
                attempt()
            }
            other => other,
        }
        .map(|v| (v, Some(ext.index)))
    }

    /// False once the key that verified a grant has left its key set.
    pub fn grant_key_present(&self, g: &crate::tokencache::VerifiedToken) -> bool {
        match g.external {
            None => self.keys.ring().get(&g.kid).is_some(),
            Some(i) => self.external.issuers.get(i).is_some_and(|x| x.keys().get(&g.kid).is_some()),
        }
    }

    pub fn sessions(&self) -> Option<&SessionStore> {
        self.sessions.get()
    }

    pub fn stateful(&self) -> bool {
        self.cfg.session_mode != SessionMode::Stateless
    }

    pub fn redis_ready(&self) -> bool {
        self.redis_ready.load(Ordering::Relaxed)
    }

    /// Ready to serve: keys loaded (always, once running) and — under the closed policy —
    /// Redis answering.
    pub fn ready(&self) -> bool {
        if self.draining.load(Ordering::Relaxed) {
            return false;
        }
        !self.stateful() || self.cfg.failure_policy == FailurePolicy::Open || self.redis_ready()
    }

    pub fn set_redis_ready(&self, ready: bool) {
        let was = self.redis_ready.swap(ready, Ordering::Relaxed);
        self.metrics.redis_ready.set(ready as i64);
        if was != ready {
            if ready {
                tracing::info!("redis reachable");
            } else {
                tracing::warn!("redis unreachable");
            }
        }
    }

    /// Log a fail-open admission at most once per 10 s.
    pub fn note_fail_open(&self, kind: &str) {
        self.metrics.fail_open.inc();
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_fail_open_log.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 10)
            && self.last_fail_open_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(
                error_kind = kind,
                "redis unavailable: admitting on signature and claims only (failurePolicy open)"
            );
        }
    }

    /// Connect to Redis (cluster or standalone) in the background, retrying forever; then keep a
    /// readiness probe running. Never blocks start-up.
    pub fn spawn_redis(self: &Arc<Self>) {
        let Some(redis_cfg) = self.cfg.redis.clone() else { return };
        if !self.stateful() {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let clients = crate::session::build_client(&redis_cfg, false)
                .and_then(|r| Ok((r, crate::session::build_client(&redis_cfg, true)?)));
            let (client, write_client) = match clients {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "redis client configuration is unusable");
                    return;
                }
            };
            let mut backoff = Duration::from_millis(200);
            let limit = Duration::from_millis(redis_cfg.connect_timeout_ms * 3);
            let (conn, writer) = loop {
                match connect_pair(&client, &write_client, limit).await {
                    Ok(pair) => break pair,
                    Err(e) => tracing::warn!(
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot connect to redis yet"
                    ),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            };
            let mut store = SessionStore::new(
                conn,
                writer,
                &redis_cfg,
                &app.cfg.realm,
                app.cfg.session_mode,
                app.cfg.leeway_seconds,
                app.cfg.max_sessions_per_subject,
            );
            let topology = match (redis_cfg.mode, redis_cfg.endpoints.as_slice()) {
                // One server: nothing to poll; the connection manager reconnects by itself.
                (authrealm_contract::RedisMode::Standalone, [server]) => crate::topology::TopologyWatch::fixed(server),
                _ => crate::topology::TopologyWatch::start(
                    {
                        let s = store.clone();
                        move || s.read_connection()
                    },
                    Duration::from_millis(redis_cfg.command_timeout_ms.max(500)),
                ),
            };
            store = store.with_topology(topology.clone());
            if app.cfg.session_cache.enabled {
                let cache = crate::sessioncache::SessionCache::new(
                    &app.cfg.session_cache,
                    &store.layout,
                    app.metrics.session_cache.clone(),
                );
                store = store.with_cache(cache);
                if let Some(cache) = store.cache() {
                    cache.start(redis_cfg.clone(), topology.clone());
                }
            }
            let _ = app.sessions.set(store);
            // A new slot map: reconnect. The cluster client learns about a failover only from errors
            // on its connections, and a master that stops answering without closing them (SIGSTOP,
            // a black-holed network) gives none: its slots would stay routed to it until it resumed.
            let mut slot_maps = topology.subscribe();
            let reconnecting = app.clone();
            tokio::spawn(async move {
                // The first map is the one the connections were just made with.
                let mut seen_first = slot_maps.borrow_and_update().is_some();
                while slot_maps.changed().await.is_ok() {
                    if !std::mem::replace(&mut seen_first, true) {
                        continue;
                    }
                    match connect_pair(&client, &write_client, limit).await {
                        Ok((r, w)) => {
                            if let Some(store) = reconnecting.sessions() {
                                store.replace_connections(r, w);
                            }
                            tracing::info!("redis cluster slot map changed: reconnected");
                        }
                        Err(e) => tracing::warn!(error = %e, "redis cluster slot map changed; reconnecting failed"),
                    }
                    // At most one reconnect per second.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            loop {
                let store = app.sessions().expect("set above");
                let ok = store.ping().await.is_ok();
                app.set_redis_ready(ok);
                store.touch_writer().await;
                tokio::time::sleep(Duration::from_millis(if ok { 1000 } else { 250 })).await;
            }
        });
    }
}
