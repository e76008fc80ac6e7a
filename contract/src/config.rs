//! The sidecar configuration file (`sidecar.json`), format version [`CONFIG_VERSION`].
//!
//! The operator renders one per realm into the `<realm>-sidecar` ConfigMap; the sidecar reads
//! it at start. Every field except `version`, `realm`, `issuer` and `audiences` has a default,
//! so a hand-written file for local use stays short (see `examples/sidecar.json`).
//!
//! Secrets never appear here: the Redis password and ACL user are read from environment
//! variables (filled from a Kubernetes Secret) or files named by this config.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::alg::Alg;

/// The only config format version this build reads and writes.
pub const CONFIG_VERSION: &str = "authrealm.dev/sidecar-config/v1";

/// How the sidecar consults the Redis Cluster for each request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionMode {
    /// One active token per subject: minting a token replaces the subject's previous one.
    #[default]
    Single,
    /// Every minted token is registered by jti and valid until it expires or is revoked.
    Multi,
    /// Tokens are valid unless their jti (or their subject) has been revoked; tokens minted
    /// elsewhere with the realm's keys are accepted too.
    Denylist,
    /// Signature and claims only; Redis is not consulted and revocation is impossible.
    Stateless,
}

/// What the sidecar does when Redis cannot answer in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Answer 503 with Retry-After: never a 200 for a token whose session state is unknown.
    #[default]
    Closed,
    /// Fall back to signature-and-claims checks only (counted in a metric, logged).
    Open,
}

/// How a public route's path is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    /// The request path equals `path`, or starts with `path` followed by `/`
    /// (`/public` matches `/public` and `/public/x`, not `/publicity`). A `path` that ends
    /// in `/` matches everything below it.
    #[default]
    Prefix,
    /// The request path equals `path` exactly.
    Exact,
}

/// A route that skips authentication (health checks, login pages, static assets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublicRoute {
    /// Absolute path, starting with `/`, at most 1024 characters.
    #[schemars(length(max = 1024))]
    pub path: String,
    #[serde(default, rename = "match")]
    pub path_match: PathMatch,
    /// HTTP methods this route applies to (upper case); empty means every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32), pattern(r"^[A-Z]+$")))]
    pub methods: Vec<String>,
}

impl PublicRoute {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        match self.path_match {
            PathMatch::Exact => path == self.path,
            PathMatch::Prefix => {
                if self.path.ends_with('/') {
                    path.starts_with(&self.path)
                } else {
                    path == self.path
                        || (path.starts_with(&self.path) && path.as_bytes().get(self.path.len()) == Some(&b'/'))
                }
            }
        }
    }
}

/// One claim copied into one request header for the app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityHeader {
    /// Claim name (top-level), e.g. `sub`, `jti`, `email`.
    pub claim: String,
    /// Header name sent to the app, e.g. `X-Auth-Subject`.
    pub header: String,
}

/// TLS towards the Redis Cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisTls {
    /// PEM file with the CA certificate(s) that sign the Redis servers' certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name checked against the servers' certificates (defaults to each node's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// What kind of Redis deployment holds the session records. The key layout, Lua scripts, `WAIT`
/// semantics, failure policy and metrics are the same for both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// A Redis Cluster: `endpoints` are seed nodes, the client follows the slot map.
    #[default]
    Cluster,
    /// One Redis server (optionally with replicas, which only count for `WAIT`): `endpoints`
    /// names exactly that server. No failover: while it is down the failure policy applies.
    Standalone,
}

impl RedisMode {
    pub fn is_cluster(&self) -> bool {
        *self == RedisMode::Cluster
    }
}

/// Connection to the Redis Cluster (or single Redis) holding session records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `cluster` (default) or `standalone`. Written only when not `cluster`, so configs of cluster
    /// realms read the same by sidecars that predate the field.
    #[serde(default, skip_serializing_if = "RedisMode::is_cluster")]
    pub mode: RedisMode,
    /// `cluster`: seed nodes, `host:port`; the client discovers the rest of the cluster.
    /// `standalone`: exactly one `host:port`, the server itself.
    pub endpoints: Vec<String>,
    /// Environment variable holding the ACL user name (absent or empty: default user).
    #[serde(default = "default_username_env")]
    pub username_env: String,
    /// Environment variable holding the password (absent or empty: no AUTH).
    #[serde(default = "default_password_env")]
    pub password_env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTls>,
    /// Prefix of every key this realm writes (see the key layout in the README).
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Connecting to a node (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// One command, including redirects and retries, on the request path (ms). When it
    /// elapses the failure policy applies.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Replicas that must confirm a revocation or session replacement before it is
    /// acknowledged (`WAIT`); 0 disables the wait.
    #[serde(default = "default_wait_replicas")]
    pub wait_replicas: u32,
    /// How long to wait for those replicas (ms).
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_username_env() -> String {
    "AUTHREALM_REDIS_USERNAME".into()
}
fn default_password_env() -> String {
    "AUTHREALM_REDIS_PASSWORD".into()
}
fn default_key_prefix() -> String {
    "ar:".into()
}
fn default_connect_timeout_ms() -> u64 {
    1000
}
fn default_command_timeout_ms() -> u64 {
    250
}
fn default_wait_replicas() -> u32 {
    1
}
fn default_wait_timeout_ms() -> u64 {
    500
}

/// Listener addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listeners {
    /// Proxied traffic and `/.well-known/jwks.json`.
    #[serde(default = "default_public")]
    pub public: String,
    /// The issuer API (mint, revoke, introspect). Must be a loopback address.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_admin")]
    pub admin: String,
}

fn default_public() -> String {
    "0.0.0.0:8443".into()
}
fn default_issuer() -> String {
    "127.0.0.1:8444".into()
}
fn default_admin() -> String {
    "0.0.0.0:9901".into()
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners { public: default_public(), issuer: default_issuer(), admin: default_admin() }
    }
}

/// The app behind the sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upstream {
    /// `host:port` of the app, normally on loopback.
    #[serde(default = "default_upstream")]
    pub address: String,
    #[serde(default = "default_upstream_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Time until the app's response headers arrive; then 504.
    #[serde(default = "default_upstream_response_ms")]
    pub response_timeout_ms: u64,
}

fn default_upstream() -> String {
    "127.0.0.1:8080".into()
}
fn default_upstream_connect_ms() -> u64 {
    1000
}
fn default_upstream_response_ms() -> u64 {
    30_000
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            address: default_upstream(),
            connect_timeout_ms: default_upstream_connect_ms(),
            response_timeout_ms: default_upstream_response_ms(),
        }
    }
}

/// HTTP-level limits on the public listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Total size of the request line and headers; larger requests get 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Longest accepted bearer token; longer ones get 401 before any decoding.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Time allowed for a client to send its request headers (ms); on HTTP/1 also the longest a
    /// kept-alive connection may wait for its next request.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection (HTTP/1 or HTTP/2) with no request started or in progress for this long is
    /// closed gracefully (HTTP/2: GOAWAY; streams still open finish first) (ms).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Longest pause between two pieces of a request body; then the request is aborted (ms).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Most connections the public listener holds open at once; more are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most concurrent HTTP/2 streams per connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// How often an upgraded connection (WebSocket) or a long streaming response re-checks its
    /// token: it ends within this long of the token being revoked, and at its expiry (ms).
    #[serde(default = "default_revalidate_interval_ms")]
    pub revalidate_interval_ms: u64,
    /// Most tokens whose verification is remembered (signature and claims checked once per
    /// token, not per request; 0 turns the cache off).
    #[serde(default = "default_token_cache_entries")]
    pub verified_token_cache_entries: u32,
    /// Most bytes the verified-token cache may hold.
    #[serde(default = "default_token_cache_bytes")]
    pub verified_token_cache_bytes: u64,
}

fn default_token_cache_entries() -> u32 {
    10_000
}
fn default_token_cache_bytes() -> u64 {
    16 * 1024 * 1024
}

fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_max_connections() -> u32 {
    4096
}
fn default_max_concurrent_streams() -> u32 {
    256
}
fn default_revalidate_interval_ms() -> u64 {
    5_000
}

fn default_max_sessions_per_subject() -> u32 {
    100
}

fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_token_bytes() -> usize {
    8 * 1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: default_max_header_bytes(),
            max_token_bytes: default_max_token_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_concurrent_streams(),
            revalidate_interval_ms: default_revalidate_interval_ms(),
            verified_token_cache_entries: default_token_cache_entries(),
            verified_token_cache_bytes: default_token_cache_bytes(),
        }
    }
}

/// The local session cache (single and multi session modes): "this session is active" is
/// remembered for at most `maxStalenessMs` and dropped as soon as Redis reports a change of the
/// record (server-assisted client-side caching, `CLIENT TRACKING … BCAST`). See the README,
/// "What a revocation guarantees".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionCacheConfig {
    /// Off: every request checks Redis (a revocation is refused from the next request on).
    #[serde(default = "default_session_cache_enabled")]
    pub enabled: bool,
    /// The longest a revoked session can still be admitted by a pod that did not receive the
    /// invalidation (dropped connection, frozen or failed master, partition), counted from the
    /// moment the revocation was written on the master (ms, 100 to 10000).
    #[serde(default = "default_max_staleness_ms")]
    pub max_staleness_ms: u64,
    /// Most sessions remembered at once (1 to 1000000).
    #[serde(default = "default_session_cache_entries")]
    pub max_entries: u32,
}

fn default_session_cache_enabled() -> bool {
    true
}
fn default_max_staleness_ms() -> u64 {
    1000
}
fn default_session_cache_entries() -> u32 {
    65_536
}

impl Default for SessionCacheConfig {
    fn default() -> Self {
        SessionCacheConfig {
            enabled: default_session_cache_enabled(),
            max_staleness_ms: default_max_staleness_ms(),
            max_entries: default_session_cache_entries(),
        }
    }
}

/// The sidecar's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Must be [`CONFIG_VERSION`].
    pub version: String,
    /// Realm name (a Kubernetes object name); part of every Redis key and of
    /// `WWW-Authenticate: Bearer realm="…"`.
    pub realm: String,
    /// Exact `iss` every token must carry, and the `iss` of minted tokens.
    pub issuer: String,
    /// Accepted `aud` values (a token must name at least one); the first is the default
    /// audience of minted tokens.
    pub audiences: Vec<String>,
    /// Algorithms accepted on incoming tokens. Empty means: the algorithms of the loaded keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<Alg>,
    /// Path of the key-set file (see [`crate::keyset`]); re-read when it changes.
    pub key_set_file: String,
    /// Default lifetime of minted tokens (seconds).
    #[serde(default = "default_token_ttl")]
    pub token_ttl_seconds: u64,
    /// Longest lifetime a caller may ask for when minting (seconds).
    #[serde(default = "default_max_token_ttl")]
    pub max_token_ttl_seconds: u64,
    /// Clock skew tolerated on exp / nbf / iat (seconds).
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Claims that must be present on every token (beyond exp, iss, aud, and — for
    /// stateful modes — sub and jti, which are always required).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<String>,
    #[serde(default)]
    pub session_mode: SessionMode,
    /// `multi` mode: most live sessions one subject may hold; minting one more ends the session
    /// that expires first. Bounds a subject's records and the cost of "log out everywhere".
    #[serde(default = "default_max_sessions_per_subject")]
    pub max_sessions_per_subject: u32,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// The local session cache (used in `single` and `multi` modes only).
    #[serde(default)]
    pub session_cache: SessionCacheConfig,
    /// Redis Cluster; required unless `sessionMode` is `stateless`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub listeners: Listeners,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_routes: Vec<PublicRoute>,
    /// Per-route authorization by claims (see [`crate::authz`]).
    #[serde(default, skip_serializing_if = "crate::authz::Authorization::is_empty")]
    pub authorization: crate::authz::Authorization,
    /// Claims forwarded to the app as headers. Any incoming header with one of these names
    /// (in any case, with `_` in place of `-`) is removed first.
    #[serde(default = "default_identity_headers")]
    pub identity_headers: Vec<IdentityHeader>,
    /// How often the key-set file is checked for changes (ms).
    #[serde(default = "default_key_reload_ms")]
    pub key_reload_interval_ms: u64,
    /// External OIDC issuers whose tokens are accepted besides the realm's own (see
    /// [`crate::external`]); only with `sessionMode` `denylist` or `stateless`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_issuers: Vec<crate::external::ExternalIssuer>,
}

fn default_token_ttl() -> u64 {
    900
}
fn default_max_token_ttl() -> u64 {
    3600
}
fn default_leeway() -> u64 {
    30
}
fn default_key_reload_ms() -> u64 {
    2000
}

pub fn default_identity_headers() -> Vec<IdentityHeader> {
    vec![
        IdentityHeader { claim: "sub".into(), header: "X-Auth-Subject".into() },
        IdentityHeader { claim: "jti".into(), header: "X-Auth-Jti".into() },
    ]
}

/// A config file that cannot be used; `field` names the offending field (JSON path).
#[derive(Debug, thiserror::Error)]
#[error("invalid sidecar config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

/// A Kubernetes object name (DNS-1123 subdomain, at most 253 bytes); realm names end up
/// in Redis keys and HTTP headers, so nothing else is allowed.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `host:port` with a non-empty host and a port in 1..=65535.
pub fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// RFC 9110 token characters (header names).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl SidecarConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let cfg: SidecarConfig = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json's message names the unknown/missing field and the line.
            err("(file)", e.to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Every check the sidecar needs before it can start; the first failure is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(err("version", format!("expected {CONFIG_VERSION:?}, got {:?}", self.version)));
        }
        if !is_dns1123_subdomain(&self.realm) {
            return Err(err("realm", "must be a lower-case DNS-1123 name of at most 253 characters"));
        }
        if self.issuer.is_empty() || self.issuer.len() > 2048 {
            return Err(err("issuer", "must be a non-empty string of at most 2048 bytes"));
        }
        if self.audiences.is_empty() {
            return Err(err("audiences", "at least one audience is required"));
        }
        if let Some(i) = self.audiences.iter().position(|a| a.is_empty() || a.len() > 2048) {
            return Err(err(format!("audiences[{i}]"), "must be a non-empty string of at most 2048 bytes"));
        }
        if self.key_set_file.is_empty() {
            return Err(err("keySetFile", "must name the key-set file"));
        }
        if self.token_ttl_seconds == 0 || self.token_ttl_seconds > self.max_token_ttl_seconds {
            return Err(err("tokenTtlSeconds", "must be > 0 and <= maxTokenTtlSeconds"));
        }
        if self.max_token_ttl_seconds > 366 * 24 * 3600 {
            return Err(err("maxTokenTtlSeconds", "must be at most one year"));
        }
        if self.leeway_seconds > 600 {
            return Err(err("leewaySeconds", "must be at most 600"));
        }
        if !(1..=10_000).contains(&self.max_sessions_per_subject) {
            return Err(err("maxSessionsPerSubject", "must be between 1 and 10000"));
        }
        match (&self.redis, self.session_mode) {
            (None, SessionMode::Stateless) => {}
            (None, _) => return Err(err("redis", "required unless sessionMode is stateless")),
            (Some(r), _) => {
                if r.endpoints.is_empty() {
                    return Err(err("redis.endpoints", "at least one host:port is required"));
                }
                if let Some(i) = r.endpoints.iter().position(|e| !is_host_port(e)) {
                    return Err(err(format!("redis.endpoints[{i}]"), "must be host:port"));
                }
                if r.mode == RedisMode::Standalone && r.endpoints.len() != 1 {
                    return Err(err("redis.endpoints", "mode standalone takes exactly one host:port (the server)"));
                }
                if r.key_prefix.len() > 256 || r.key_prefix.contains(['{', '}']) {
                    return Err(err("redis.keyPrefix", "at most 256 bytes and no '{' or '}'"));
                }
                if r.command_timeout_ms == 0 || r.connect_timeout_ms == 0 {
                    return Err(err("redis.commandTimeoutMs", "timeouts must be > 0"));
                }
            }
        }
        if !(100..=10_000).contains(&self.session_cache.max_staleness_ms) {
            return Err(err("sessionCache.maxStalenessMs", "must be between 100 and 10000"));
        }
        if !(1..=1_000_000).contains(&self.session_cache.max_entries) {
            return Err(err("sessionCache.maxEntries", "must be between 1 and 1000000"));
        }
        for (name, addr) in [
            ("listeners.public", &self.listeners.public),
            ("listeners.issuer", &self.listeners.issuer),
            ("listeners.admin", &self.listeners.admin),
            ("upstream.address", &self.upstream.address),
        ] {
            if !is_host_port(addr) {
                return Err(err(name, format!("{addr:?} is not host:port")));
            }
        }
        match self.listeners.issuer.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => {}
            _ => return Err(err("listeners.issuer", "must be a loopback ip:port (the issuer API is never exposed)")),
        }
        if self.limits.max_header_bytes < 1024 || self.limits.max_header_bytes > 1024 * 1024 {
            return Err(err("limits.maxHeaderBytes", "must be between 1024 and 1048576"));
        }
        if self.limits.max_token_bytes < 64 || self.limits.max_token_bytes > self.limits.max_header_bytes {
            return Err(err("limits.maxTokenBytes", "must be between 64 and maxHeaderBytes"));
        }
        let l = &self.limits;
        if [l.header_read_timeout_ms, l.idle_timeout_ms, l.body_read_timeout_ms].contains(&0) {
            return Err(err("limits", "headerReadTimeoutMs, idleTimeoutMs and bodyReadTimeoutMs must be > 0"));
        }
        if l.max_connections == 0 || l.max_concurrent_streams == 0 {
            return Err(err("limits", "maxConnections and maxConcurrentStreams must be > 0"));
        }
        if !(100..=300_000).contains(&l.revalidate_interval_ms) {
            return Err(err("limits.revalidateIntervalMs", "must be between 100 and 300000"));
        }
        for (i, r) in self.public_routes.iter().enumerate() {
            if !r.path.starts_with('/') {
                return Err(err(format!("publicRoutes[{i}].path"), "must start with '/'"));
            }
            if let Some(m) = r.methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(err(
                    format!("publicRoutes[{i}].methods"),
                    format!("{m:?} is not an upper-case HTTP method"),
                ));
            }
        }
        self.authorization
            .validate(&self.public_routes)
            .map_err(|(field, message)| err(format!("authorization.{field}"), message))?;
        crate::external::check_all(self)?;
        for (i, h) in self.identity_headers.iter().enumerate() {
            if h.claim.is_empty() {
                return Err(err(format!("identityHeaders[{i}].claim"), "must not be empty"));
            }
            if !is_header_name(&h.header) {
                return Err(err(format!("identityHeaders[{i}].header"), "not a valid header name"));
            }
        }
        Ok(())
    }

    /// A minimal config, used by `keygen`-style local setups and tests.
    pub fn example(realm: &str, key_set_file: &str, redis: Option<Vec<String>>) -> Self {
        SidecarConfig {
            version: CONFIG_VERSION.into(),
            realm: realm.into(),
            issuer: format!("https://{realm}.authrealm.local"),
            audiences: vec!["app".into()],
            algorithms: vec![],
            key_set_file: key_set_file.into(),
            token_ttl_seconds: default_token_ttl(),
            max_token_ttl_seconds: default_max_token_ttl(),
            leeway_seconds: default_leeway(),
            required_claims: vec![],
            session_mode: if redis.is_some() { SessionMode::Single } else { SessionMode::Stateless },
            max_sessions_per_subject: default_max_sessions_per_subject(),
            failure_policy: FailurePolicy::Closed,
            session_cache: SessionCacheConfig::default(),
            redis: redis.map(|endpoints| RedisConfig {
                mode: RedisMode::Cluster,
                endpoints,
                username_env: default_username_env(),
                password_env: default_password_env(),
                tls: None,
                key_prefix: default_key_prefix(),
                connect_timeout_ms: default_connect_timeout_ms(),
                command_timeout_ms: default_command_timeout_ms(),
                wait_replicas: default_wait_replicas(),
                wait_timeout_ms: default_wait_timeout_ms(),
            }),
            listeners: Listeners::default(),
            upstream: Upstream::default(),
            limits: Limits::default(),
            public_routes: vec![],
            authorization: Default::default(),
            identity_headers: default_identity_headers(),
            key_reload_interval_ms: default_key_reload_ms(),
            external_issuers: vec![],
        }
    }
}

/// Map of realm-level identity headers, lower-cased, for stripping.
pub fn identity_header_names(cfg: &SidecarConfig) -> BTreeMap<String, String> {
    cfg.identity_headers.iter().map(|h| (h.header.to_ascii_lowercase().replace('_', "-"), h.claim.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_round_trips_and_validates() {
        let cfg = SidecarConfig::example("demo", "/keys/keyset.json", Some(vec!["127.0.0.1:7000".into()]));
        let json = cfg.to_json_pretty();
        assert_eq!(SidecarConfig::from_json(json.as_bytes()).unwrap(), cfg);
    }

    #[test]
    fn redis_mode_defaults_to_cluster_and_is_written_only_for_standalone() {
        let mut cfg = SidecarConfig::example("demo", "/k", Some(vec!["127.0.0.1:6379".into()]));
        let json = cfg.to_json_pretty();
        assert!(!json.contains("\"mode\""), "a cluster config reads as before: {json}");
        assert_eq!(SidecarConfig::from_json(json.as_bytes()).unwrap().redis.unwrap().mode, RedisMode::Cluster);
        cfg.redis.as_mut().unwrap().mode = RedisMode::Standalone;
        let json = cfg.to_json_pretty();
        assert!(json.contains("\"mode\": \"standalone\""), "{json}");
        assert_eq!(SidecarConfig::from_json(json.as_bytes()).unwrap(), cfg);
        let bad = json.replace("\"standalone\"", "\"sentinel\"");
        assert!(SidecarConfig::from_json(bad.as_bytes()).is_err());
    }

    #[test]
    fn unknown_fields_and_versions_are_rejected_naming_the_field() {
        let mut v: serde_json::Value = serde_json::to_value(SidecarConfig::example("demo", "/k", None)).unwrap();
        v["sessionMod"] = "multi".into();
        let e = SidecarConfig::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("sessionMod"), "{e}");

        let mut cfg = SidecarConfig::example("demo", "/k", None);
        cfg.version = "authrealm.dev/sidecar-config/v0".into();
        assert_eq!(cfg.validate().unwrap_err().field, "version");
    }

    #[test]
    fn validation_names_the_field() {
        let base = SidecarConfig::example("demo", "/k", Some(vec!["127.0.0.1:7000".into()]));
        type Mutation = Box<dyn Fn(&mut SidecarConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("realm", Box::new(|c| c.realm = "Bad_Name".into())),
            ("audiences", Box::new(|c| c.audiences.clear())),
            ("redis", Box::new(|c| c.redis = None)),
            ("redis.endpoints[0]", Box::new(|c| c.redis.as_mut().unwrap().endpoints = vec!["nope".into()])),
            (
                "redis.endpoints",
                Box::new(|c| {
                    let r = c.redis.as_mut().unwrap();
                    r.mode = RedisMode::Standalone;
                    r.endpoints = vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()];
                }),
            ),
            ("listeners.issuer", Box::new(|c| c.listeners.issuer = "0.0.0.0:1".into())),
            ("tokenTtlSeconds", Box::new(|c| c.token_ttl_seconds = 99_999)),
            ("sessionCache.maxStalenessMs", Box::new(|c| c.session_cache.max_staleness_ms = 0)),
            ("sessionCache.maxStalenessMs", Box::new(|c| c.session_cache.max_staleness_ms = 60_000)),
            ("sessionCache.maxEntries", Box::new(|c| c.session_cache.max_entries = 0)),
            ("identityHeaders[0].header", Box::new(|c| c.identity_headers[0].header = "X Bad".into())),
            (
                "publicRoutes[0].path",
                Box::new(|c| {
                    c.public_routes =
                        vec![PublicRoute { path: "x".into(), path_match: PathMatch::Exact, methods: vec![] }]
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn public_route_matching() {
        let prefix = PublicRoute { path: "/public".into(), path_match: PathMatch::Prefix, methods: vec![] };
        assert!(prefix.matches("GET", "/public"));
        assert!(prefix.matches("POST", "/public/a/b"));
        assert!(!prefix.matches("GET", "/publicity"));
        assert!(!prefix.matches("GET", "/"));
        let exact = PublicRoute { path: "/login".into(), path_match: PathMatch::Exact, methods: vec!["POST".into()] };
        assert!(exact.matches("POST", "/login"));
        assert!(!exact.matches("GET", "/login"));
        assert!(!exact.matches("POST", "/login/x"));
        let dir = PublicRoute { path: "/static/".into(), path_match: PathMatch::Prefix, methods: vec![] };
        assert!(dir.matches("GET", "/static/app.js"));
        assert!(!dir.matches("GET", "/static"));
    }

    #[test]
    fn host_port_and_names() {
        assert!(is_host_port("redis-0.redis:6379"));
        assert!(is_host_port("[::1]:7000"));
        assert!(!is_host_port("redis"));
        assert!(!is_host_port("redis:0"));
        assert!(!is_host_port("redis:70000"));
        assert!(!is_host_port(":6379"));
        assert!(is_dns1123_subdomain("my-realm.prod"));
        assert!(!is_dns1123_subdomain("-x"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }
}

#[cfg(test)]
mod sample {
    /// The documented sample (examples/sidecar.json) is a valid, complete config.
    #[test]
    fn shipped_sample_is_valid() {
        let cfg = super::SidecarConfig::from_json(include_bytes!("../../examples/sidecar.json")).unwrap();
        assert_eq!(cfg.public_routes.len(), 2);
        assert!(cfg.redis.is_some());
    }
}
