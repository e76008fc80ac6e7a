//! Session records in Redis (a Redis Cluster, or one standalone server): the key layout and
//! every command that touches it. Both kinds of deployment use the same keys, Lua scripts,
//! `WAIT`s and error handling; only the connection differs ([`RedisConn`]).
//!
//! # Key layout
//!
//! Key names are built by [`KeyLayout`] in `authrealm_contract::redis_keys` (shared with the
//! operator's session purge and the tests), which documents every key, its hash tag and its TTL.
//!
//! No token is stored: only ids and expiry times. The request path runs at most one
//! command (`EXISTS` or `MGET` on keys of one slot); in single and multi modes the session cache
//! ([`crate::sessioncache`]) answers most requests without any.
//!
//! The session cache's heartbeat keys, `P{R;hb:I:N}:SEQ` (`I` a random id per sidecar process),
//! live for a few seconds and are never read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use authrealm_contract::config::RedisConfig;
use authrealm_contract::{RedisMode, SessionMode};

use crate::coalesce::Coalescer;
use crate::sessioncache::{Lookup, SessionCache};
use crate::topology::TopologyWatch;

pub use authrealm_contract::redis_keys::{KeyLayout, crc16, key_slot};

/// How long a record that revokes or locates a token must live, in milliseconds from `now_ms`
/// (the writing pod's clock) — the one rule every deny record, cut-off and jti locator follows.
///
/// A pod accepts a token while its clock, in whole seconds, reads at most `exp + leeway`: until
/// `exp + leeway + 1 s` of its own clock. The realm allows the pods' clocks to differ by up to
/// `leeway`, so a verifying pod whose clock runs `leeway` behind the writer's still accepts the
/// token until `exp + 2·leeway + 1 s` of the writer's clock. The record lives one more second
/// beyond that, so neither the whole-second rounding nor a skew at the limit can open a window in
/// which a revoked token is accepted (or `DELETE /v1/tokens/{jti}` cannot find a live token).
/// Only the token's claims and the skew bound enter; `now_ms` merely converts the deadline into
/// the relative TTL Redis measures on its own clock. Never less than one second.
pub fn record_ttl_ms(exp: i64, leeway_secs: u64, now_ms: i64) -> u64 {
    let leeway = i64::try_from(leeway_secs).unwrap_or(i64::MAX / 4_000);
    let until_ms = exp.saturating_add(2 * leeway + 2).saturating_mul(1000);
    until_ms.saturating_sub(now_ms).max(1000) as u64
}

/// The latest `exp` a token of a denylist realm can carry when its `iat` is at most `iat_max`
/// ([`crate::token::validate`] refuses `exp − iat > max lifetime + leeway`).
pub fn latest_exp_for_iat(iat_max: i64, max_lifetime_secs: u64, leeway_secs: u64) -> i64 {
    iat_max.saturating_add(max_lifetime_secs.saturating_add(leeway_secs).min(i64::MAX as u64 / 4) as i64)
}

/// A session record's key (`P{R:S}:t:J`) and its cluster slot. Built once per verified token and
/// kept with it in the verified-token cache ([`crate::tokencache::VerifiedToken::session_key`]),
/// so the per-request check formats no key and hashes no slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKey {
    key: Arc<str>,
    slot: u16,
}

impl SessionKey {
    pub fn new(layout: &KeyLayout, sub: &str, jti: &str) -> Self {
        let key: Arc<str> = layout.token(sub, jti).into();
        SessionKey { slot: key_slot(&key), key }
    }

    pub fn as_str(&self) -> &str {
        &self.key
    }

    pub fn slot(&self) -> u16 {
        self.slot
    }
}

/// Result of the per-request session check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    Active,
    Revoked,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis is not connected yet")]
    NotConnected,
    #[error("unexpected reply from redis")]
    Protocol,
}

impl StoreError {
    /// Worth one more try: the cluster may be mid-failover or the client's slot map stale.
    fn transient(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_cluster_error()
            }
            StoreError::NotConnected | StoreError::Protocol => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Redis(_) => "error",
            StoreError::NotConnected => "not_connected",
            StoreError::Protocol => "protocol",
        }
    }
}

/// How many replicas confirmed a write (`WAIT`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Durability {
    pub replicas_confirmed: i64,
    pub replicas_required: u32,
}

impl Durability {
    pub fn acknowledged(&self) -> bool {
        self.replicas_confirmed >= self.replicas_required as i64
    }

    /// The weaker of two confirmations (a write that touched two masters).
    pub fn min(self, other: Durability) -> Durability {
        Durability {
            replicas_confirmed: self.replicas_confirmed.min(other.replicas_confirmed),
            replicas_required: self.replicas_required.max(other.replicas_required),
        }
    }
}

const MINT_SCRIPT: &str = r#"
-- KEYS[1] index, KEYS[2] token record
-- ARGV: jti-member, exp, ttl-ms, now, single(1/0), token-key-prefix, max sessions (multi)
local idx, rec = KEYS[1], KEYS[2]
local removed = 0
if ARGV[5] == '1' then
  local old = redis.call('ZRANGE', idx, 0, -1)
  for _, j in ipairs(old) do removed = removed + redis.call('DEL', ARGV[6] .. j) end
  redis.call('DEL', idx)
else
  local stale = redis.call('ZRANGEBYSCORE', idx, '-inf', ARGV[4])
  for _, j in ipairs(stale) do redis.call('DEL', ARGV[6] .. j) end
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', ARGV[4])
end
redis.call('SET', rec, ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', idx, ARGV[2], ARGV[1])
local over = redis.call('ZCARD', idx) - tonumber(ARGV[7])
if over > 0 then
  -- The sessions that expire first make room; never the one just minted.
  for _, j in ipairs(redis.call('ZRANGE', idx, 0, over)) do
    if over > 0 and j ~= ARGV[1] then
      removed = removed + redis.call('DEL', ARGV[6] .. j)
      redis.call('ZREM', idx, j)
      over = over - 1
    end
  end
end
local top = redis.call('ZRANGE', idx, -1, -1, 'WITHSCORES')
redis.call('EXPIREAT', idx, tonumber(top[2]) + 1)
return removed
"#;

const REVOKE_ALL_SCRIPT: &str = r#"
-- KEYS[1] index; ARGV[1] token-key-prefix
local n = 0
for _, j in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  n = n + redis.call('DEL', ARGV[1] .. j)
end
redis.call('DEL', KEYS[1])
return n
"#;

/// "Log out everywhere" in denylist realms: the cut-off only ever moves forward and its TTL
/// only ever grows, so a later log-out from a pod whose clock is behind cannot lower an
/// earlier cut-off and bring revoked tokens back.
const CUTOFF_SCRIPT: &str = r#"
-- KEYS[1] cut-off; ARGV: cut-off (unix seconds), ttl (milliseconds)
local v = redis.call('GET', KEYS[1])
local cur = v and tonumber(v)
if (not cur) or cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('GET', KEYS[1])
"#;

/// A deny record: created if absent; its TTL only ever grows (a second revocation computed on a
/// clock that is behind never shortens it). Returns 1 when the record is new.
const DENY_SCRIPT: &str = r#"
-- KEYS[1] deny record; ARGV[1] ttl (milliseconds)
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then
  return 1
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
"#;

/// `EVAL src numkeys keys…`; the caller appends the arguments.
fn eval_cmd(src: &str, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(src).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

const REVOKE_ONE_SCRIPT: &str = r#"
-- KEYS[1] index, KEYS[2] token record; ARGV[1] jti-member
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[2])
"#;

/// A connection to the realm's Redis: a Redis Cluster connection, or a connection manager for
/// one standalone server (which reconnects by itself after the server restarts; a command issued
/// while it reconnects waits for the new connection, bounded like every command by
/// [`SessionStore`]'s deadlines). Both are multiplexed and cheap to clone, and both already
/// implement [`ConnectionLike`] with one boxed future per command, so dispatching through this
/// enum adds a `match`, no allocation.
#[derive(Clone)]
pub enum RedisConn {
    Cluster(ClusterConnection),
    Standalone(ConnectionManager),
}

/// True when a standalone connection manager answered with an error that made it start a new
/// connection: its connection was found dropped (the server restarted or died), or its last
/// reconnect had failed (the server was down; such a command was never sent). The command is then
/// sent once more, on the connection being made — as the cluster client retries on its own — so
/// that after the server comes back the first request on each connection is answered rather than
/// refused. Safe: request-path commands only read, and every issuer write is idempotent and sent
/// with its `WAIT` in one pipeline (see [`SessionStore::write_and_wait`]). Bounded, like every
/// command, by the caller's deadline.
fn reconnecting(e: &redis::RedisError) -> bool {
    e.is_connection_refusal() || e.is_unrecoverable_error()
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Standalone(c) => Box::pin(async move {
                match c.send_packed_command(cmd).await {
                    Err(e) if reconnecting(&e) => c.send_packed_command(cmd).await,
                    r => r,
                }
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Standalone(c) => Box::pin(async move {
                match c.send_packed_commands(pipeline, offset, count).await {
                    Err(e) if reconnecting(&e) => c.send_packed_commands(pipeline, offset, count).await,
                    r => r,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Standalone(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// `cmd` on the node `routing` names (a cluster); on the server (standalone).
    pub async fn route_command(&mut self, cmd: Cmd, routing: RoutingInfo) -> redis::RedisResult<Value> {
        match self {
            RedisConn::Cluster(c) => c.route_command(cmd, routing).await,
            RedisConn::Standalone(_) => self.req_packed_command(&cmd).await,
        }
    }

    /// A pipeline on the master serving `key`'s slot (a cluster); on the server (standalone).
    /// The raw replies, server errors included as values.
    async fn pipeline_for_key(&mut self, key: &str, pipe: Pipeline, count: usize) -> redis::RedisResult<Vec<Value>> {
        self.pipeline_for_slot(key_slot(key), pipe, count).await
    }

    /// A pipeline on the master serving `slot` (a cluster); on the server (standalone).
    pub(crate) async fn pipeline_for_slot(
        &mut self,
        slot: u16,
        pipe: Pipeline,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            RedisConn::Cluster(c) => {
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                c.route_pipeline(pipe, 0, count, route).await
            }
            RedisConn::Standalone(_) => self.req_packed_commands(&pipe, 0, count).await,
        }
    }
}

/// What connections are made from: a cluster client, or a standalone server's client and the
/// connection manager's settings.
#[derive(Clone)]
pub enum StoreClient {
    Cluster(redis::cluster::ClusterClient),
    Standalone(redis::Client, ConnectionManagerConfig),
}

impl StoreClient {
    /// A new connection (for a standalone server, a connection manager that keeps it up).
    pub async fn connect(&self) -> redis::RedisResult<RedisConn> {
        match self {
            StoreClient::Cluster(c) => c.get_async_connection().await.map(RedisConn::Cluster),
            StoreClient::Standalone(c, cfg) => {
                ConnectionManager::new_with_config(c.clone(), cfg.clone()).await.map(RedisConn::Standalone)
            }
        }
    }
}

/// The realm's session store.
#[derive(Clone)]
pub struct SessionStore {
    /// Per-request reads (EXISTS/MGET, locator GET, PING). Replaced by a new connection when the
    /// slot map changes ([`SessionStore::replace_connections`]).
    conn: Arc<ArcSwap<RedisConn>>,
    /// Writes and their `WAIT`s. Redis blocks the connection a `WAIT` arrives on until replicas
    /// confirm or the wait times out, and `WAIT` only counts writes made on that same connection;
    /// keeping writes apart means a slow or frozen replica delays revocations, never the checks
    /// of every other request routed to that master.
    writer: Arc<ArcSwap<RedisConn>>,
    pub layout: KeyLayout,
    mode: SessionMode,
    timeout: Duration,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    /// `multi` mode: most live sessions per subject.
    max_sessions: u32,
    /// Clock leeway: enters every revocation record's lifetime ([`record_ttl_ms`]).
    leeway_secs: u64,
    /// The local session cache (`single`/`multi` with `sessionCache.enabled`); see
    /// [`crate::sessioncache`].
    cache: Option<SessionCache>,
    /// The slot-map watcher, told about request-path errors.
    topology: Option<TopologyWatch>,
    /// Per-request reads, coalesced into one pipeline per master.
    reads: Arc<Coalescer>,
    /// The realm's Redis settings, when it is a cluster (the coalesced reads' own connections).
    cluster: Option<RedisConfig>,
}

/// The Redis username and password from the environment variables the config names (unset or
/// empty: none).
pub(crate) fn credentials(cfg: &RedisConfig) -> (Option<String>, Option<String>) {
    let read = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    (read(&cfg.username_env), read(&cfg.password_env))
}

/// The client (cluster or standalone, per `redis.mode`; no connection is made yet).
/// `for_writes`: the client of the write connection, whose `WAIT`s block server-side for up to
/// `waitTimeoutMs` each and can queue behind one another on a node; its response timeout is
/// generous so that a blocked `WAIT` is never mistaken for a dead connection (every operation is
/// still bounded by its own deadline in [`SessionStore`]).
pub fn build_client(cfg: &RedisConfig, for_writes: bool) -> Result<StoreClient, String> {
    let response_timeout = Duration::from_millis(if for_writes {
        cfg.command_timeout_ms + 4 * cfg.wait_timeout_ms + 1000
    } else {
        cfg.command_timeout_ms.max(cfg.wait_timeout_ms + 200)
    });
    if cfg.mode == RedisMode::Standalone {
        let addr = match cfg.endpoints.as_slice() {
            [one] => one,
            _ => return Err("redis.endpoints: mode standalone takes exactly one host:port".into()),
        };
        let client = server_client(cfg, addr, false)?;
        // Reconnects are tried at once and then once more shortly after; a request never waits
        // for them longer than its own deadline, and the readiness probe (every 250 ms while
        // Redis is down) starts a new attempt each time.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        return Ok(StoreClient::Standalone(client, manager));
    }
    let tls = cfg.tls.is_some();
    let nodes: Vec<String> =
        cfg.endpoints.iter().map(|e| if tls { format!("rediss://{e}") } else { format!("redis://{e}") }).collect();
    let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .response_timeout(response_timeout)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100);
    let (user, pass) = credentials(cfg);
    if let Some(user) = user {
        b = b.username(user);
    }
    if let Some(pass) = pass {
        b = b.password(pass);
    }
    if let Some(t) = &cfg.tls {
        b = b.tls(redis::TlsMode::Secure);
        if let Some(ca) = &t.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("redis.tls.caFile {ca}: {e}"))?;
            b = b.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) });
        }
        if t.server_name.is_some() {
            // redis-rs (rustls) checks each node's certificate against the host it dials
            // and offers no override; refuse rather than silently not checking the name.
            return Err("redis.tls.serverName: not supported by the Redis client; use endpoint host names that match the servers' certificates (Redis 7: cluster-preferred-endpoint-type hostname)".into());
        }
    }
    b.build().map(StoreClient::Cluster).map_err(|e| format!("redis: {e}"))
}

/// A client for one server (`addr`) with the realm's TLS settings and credentials; RESP3 when
/// asked (the session cache's tracking connections).
pub(crate) fn server_client(cfg: &RedisConfig, addr: &str, resp3: bool) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo as _;
    if cfg.tls.as_ref().is_some_and(|t| t.server_name.is_some()) {
        return Err("redis.tls.serverName: not supported by the Redis client; use an endpoint host name that matches the server's certificate".into());
    }
    let scheme = if cfg.tls.is_some() { "rediss" } else { "redis" };
    let info = format!("{scheme}://{addr}").into_connection_info().map_err(|e| format!("redis: {e}"))?;
    let mut settings = info.redis_settings().clone();
    if resp3 {
        settings = settings.set_protocol(redis::ProtocolVersion::RESP3);
    }
    let (user, pass) = credentials(cfg);
    if let Some(user) = user {
        settings = settings.set_username(user);
    }
    if let Some(pass) = pass {
        settings = settings.set_password(pass);
    }
    let info = info.set_redis_settings(settings);
    match cfg.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| format!("redis.tls.caFile {ca}: {e}"))?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
                .map_err(|e| format!("redis: {e}"))
        }
        None => redis::Client::open(info).map_err(|e| format!("redis: {e}")),
    }
}

impl SessionStore {
    pub fn new(
        conn: RedisConn,
        writer: RedisConn,
        cfg: &RedisConfig,
        realm: &str,
        mode: SessionMode,
        cfg_leeway_secs: u64,
        max_sessions: u32,
    ) -> Self {
        let conn = Arc::new(ArcSwap::from_pointee(conn));
        let timeout = Duration::from_millis(cfg.command_timeout_ms);
        SessionStore {
            reads: Arc::new(Coalescer::new(conn.clone(), None, timeout, None)),
            cluster: (cfg.mode == RedisMode::Cluster).then(|| cfg.clone()),
            conn,
            writer: Arc::new(ArcSwap::from_pointee(writer)),
            layout: KeyLayout::new(&cfg.key_prefix, realm),
            mode,
            timeout,
            wait_replicas: cfg.wait_replicas,
            wait_timeout_ms: cfg.wait_timeout_ms,
            leeway_secs: cfg_leeway_secs,
            max_sessions: max_sessions.max(1),
            cache: None,
            topology: None,
        }
    }

    /// Use `cache` for the per-request check (single and multi modes only; ignored otherwise).
    pub fn with_cache(mut self, cache: SessionCache) -> Self {
        if matches!(self.mode, SessionMode::Single | SessionMode::Multi) {
            self.cache = Some(cache);
        }
        self
    }

    pub fn cache(&self) -> Option<&SessionCache> {
        self.cache.as_ref()
    }

    /// The current per-request read connection.
    pub fn read_connection(&self) -> RedisConn {
        RedisConn::clone(&self.conn.load())
    }

    fn write_connection(&self) -> RedisConn {
        RedisConn::clone(&self.writer.load())
    }

    /// Swap in freshly made connections (after a slot-map change the cluster client could not
    /// learn from its own errors, e.g. a master frozen rather than dead). Commands in flight finish
    /// on the old ones.
    pub fn replace_connections(&self, conn: RedisConn, writer: RedisConn) {
        self.conn.store(Arc::new(conn));
        self.writer.store(Arc::new(writer));
    }

    /// Poke `topology` whenever a request-path command fails.
    pub fn with_topology(mut self, topology: TopologyWatch) -> Self {
        self.reads =
            Arc::new(Coalescer::new(self.conn.clone(), Some(topology.clone()), self.timeout, self.cluster.clone()));
        self.topology = Some(topology);
        self
    }

    fn failed(&self) {
        if let Some(t) = &self.topology {
            t.poke();
        }
    }

    pub fn mode(&self) -> SessionMode {
        self.mode
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        if r.is_err() {
            self.failed();
        }
        r
    }

    /// The per-request check: at most one command, keys of one slot. With the session cache, an
    /// active session found there (see [`crate::sessioncache`] for when it may be used) needs none.
    pub async fn check(&self, sub: &str, jti: &str, iat: Option<i64>) -> Result<SessionState, StoreError> {
        self.check_sourced(sub, jti, iat, None).await.0
    }

    /// [`Self::check`], and whether it was answered without Redis (stateless mode or a session
    /// cache hit) — the request path's Redis metrics count only real round trips. `key`: the
    /// session key of (`sub`, `jti`) when the caller keeps one ([`SessionKey::new`] with this
    /// store's [`KeyLayout`]); built here otherwise.
    pub async fn check_sourced(
        &self,
        sub: &str,
        jti: &str,
        iat: Option<i64>,
        key: Option<&SessionKey>,
    ) -> (Result<SessionState, StoreError>, bool) {
        let mut local = false;
        let r = self.check_inner(sub, jti, iat, key, &mut local).await;
        (r, local)
    }

    async fn check_inner(
        &self,
        sub: &str,
        jti: &str,
        iat: Option<i64>,
        key: Option<&SessionKey>,
        local: &mut bool,
    ) -> Result<SessionState, StoreError> {
        match self.mode {
            SessionMode::Stateless => {
                *local = true;
                Ok(SessionState::Active)
            }
            SessionMode::Single | SessionMode::Multi => {
                let built;
                let key = match key {
                    Some(k) => k,
                    None => {
                        built = SessionKey::new(&self.layout, sub, jti);
                        &built
                    }
                };
                let ticket = match &self.cache {
                    Some(c) => match c.lookup_slot(key.as_str(), key.slot()) {
                        Lookup::Hit => {
                            *local = true;
                            return Ok(SessionState::Active);
                        }
                        Lookup::Refresh(t) => {
                            // Sent within an eighth of the bound (the entry has at least half
                            // of it left), usually in a pipeline with others.
                            let delay = c.bound() / 8;
                            let (c, k) = (c.clone(), key.clone());
                            let then = Box::new(move |n: Option<i64>| c.refreshed(k.as_str(), t, n.map(|n| n == 1)));
                            self.reads.later(key, delay, then);
                            *local = true;
                            return Ok(SessionState::Active);
                        }
                        Lookup::Miss(t) => t,
                    },
                    None => None,
                };
                let n = self.bounded(self.timeout, self.exists(key)).await;
                if let Some(c) = &self.cache {
                    c.complete(key.as_str(), ticket, n.as_ref().ok().map(|n| *n == 1));
                }
                Ok(if n? == 1 { SessionState::Active } else { SessionState::Revoked })
            }
            SessionMode::Denylist => {
                let mut conn = self.read_connection();
                let keys = [self.layout.deny(sub, jti), self.layout.cutoff(sub)];
                let vals: Vec<Option<i64>> =
                    self.bounded(self.timeout, redis::cmd("MGET").arg(&keys[..]).query_async(&mut conn)).await?;
                let (denied, cut) = match vals.as_slice() {
                    [d, c] => (d.is_some(), *c),
                    _ => return Err(StoreError::Protocol),
                };
                let cut_off = matches!((cut, iat), (Some(c), Some(i)) if i <= c);
                Ok(if denied || cut_off { SessionState::Revoked } else { SessionState::Active })
            }
        }
    }

    /// `EXISTS key` on the master serving its slot: in a pipeline with the other requests' reads
    /// of the same moment ([`crate::coalesce`]); on its own, through the cluster client's
    /// redirects and retries, when that pipeline did not answer it.
    async fn exists(&self, key: &SessionKey) -> redis::RedisResult<i64> {
        if let Some(n) = self.reads.exists(key).await {
            return Ok(n);
        }
        let mut conn = self.read_connection();
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key.as_str());
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(key.slot(), SlotAddr::Master));
        let v = conn.route_command(cmd, RoutingInfo::SingleNode(route)).await?;
        Ok(redis::from_redis_value(v.extract_error()?)?)
    }

    fn write_limit(&self) -> Duration {
        self.timeout.max(Duration::from_millis(1000))
    }

    /// Run `write` on the master that owns `key`'s slot (the server, standalone) and, in the same
    /// pipeline on the same
    /// connection, `WAIT` for replicas. `WAIT` counts only the writes made on the connection it
    /// arrives on: sent separately, a reconnect in between (or the client library re-sending a
    /// `WAIT` whose connection dropped) would count replicas that never saw the write — a false
    /// "replicated". In one pipeline the write and its `WAIT` travel together; if the connection
    /// drops, the library re-sends both (every issuer write is idempotent) or the call fails.
    async fn write_and_wait(&self, key: &str, write: Cmd) -> Result<(Value, Durability), StoreError> {
        let mut conn = self.write_connection();
        let mut pipe = redis::pipe();
        pipe.add_command(write);
        if self.wait_replicas > 0 {
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(self.wait_timeout_ms);
        }
        let count = if self.wait_replicas > 0 { 2 } else { 1 };
        let limit = Duration::from_millis(self.wait_timeout_ms) + self.write_limit();
        let mut replies = self.bounded(limit, conn.pipeline_for_key(key, pipe, count)).await?.into_iter();
        let written = replies.next().ok_or(StoreError::Protocol)?;
        if let Value::ServerError(e) = &written {
            return Err(StoreError::Redis(redis::RedisError::from(e.clone())));
        }
        if self.wait_replicas == 0 {
            return Ok((written, Durability { replicas_confirmed: 0, replicas_required: 0 }));
        }
        match replies.next() {
            Some(Value::Int(n)) => {
                Ok((written, Durability { replicas_confirmed: n, replicas_required: self.wait_replicas }))
            }
            _ => Err(StoreError::Protocol),
        }
    }

    /// Register a freshly minted token. In `single` mode this replaces (revokes) every
    /// earlier token of the subject. Returns how many earlier sessions were replaced.
    pub async fn register(&self, sub: &str, jti: &str, exp: i64, now_ms: i64) -> Result<(i64, Durability), StoreError> {
        self.write_retrying(|| self.register_once(sub, jti, exp, now_ms)).await
    }

    /// Issuer writes are idempotent (same jti, same records, deny records set if absent,
    /// cut-offs only grow), so a write that failed on a transient error is tried once more after
    /// a short pause: the write connection learns about a failover from its own errors, and its
    /// first write after one can hit the old master.
    async fn write_retrying<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match op().await {
            Err(e) if e.transient() => {
                tracing::debug!(error = %e, "redis write failed; retrying once");
                tokio::time::sleep(Duration::from_millis(250)).await;
                op().await
            }
            r => r,
        }
    }

    async fn register_once(
        &self,
        sub: &str,
        jti: &str,
        exp: i64,
        now_ms: i64,
    ) -> Result<(i64, Durability), StoreError> {
        // The locator lets DELETE /v1/tokens/{jti} find the subject for as long as any pod could
        // accept the token. It lives in the jti's slot, usually on another master than the
        // subject's records, so both writes are WAITed for: a token whose locator were lost in a
        // failover could no longer be revoked by jti. One after the other: when both keys live
        // on one master, a second WAIT would queue behind the first on its connection.
        let loc = self.layout.locator(jti);
        let mut set_locator = redis::cmd("SET");
        set_locator.arg(&loc).arg(format!("{exp} {sub}")).arg("PX").arg(record_ttl_ms(exp, self.leeway_secs, now_ms));
        let replaced = match self.mode {
            SessionMode::Single | SessionMode::Multi => {
                let idx = self.layout.index(sub);
                let rec = self.layout.token(sub, jti);
                // The session record lives until exp: its absence means "revoked", so it may
                // disappear early, never late.
                let ttl_ms = (exp.saturating_mul(1000) - now_ms).max(1000);
                let single = if self.mode == SessionMode::Single { "1" } else { "0" };
                let mut eval = eval_cmd(MINT_SCRIPT, &[&idx, &rec]);
                eval.arg(KeyLayout::jti_member(jti))
                    .arg(exp)
                    .arg(ttl_ms)
                    .arg(now_ms.div_euclid(1000))
                    .arg(single)
                    .arg(self.layout.token_prefix(sub))
                    .arg(self.max_sessions);
                let written = self.write_and_wait(&rec, eval).await;
                // Single mode replaced the subject's earlier tokens; multi mode may have ended some.
                if let Some(c) = &self.cache {
                    c.forget_prefix(&self.layout.token_prefix(sub));
                }
                let (v, d) = written?;
                let replaced = match v {
                    Value::Int(n) => n,
                    _ => return Err(StoreError::Protocol),
                };
                Some((replaced, d))
            }
            _ => None,
        };
        let (_, d_loc) = self.write_and_wait(&loc, set_locator).await?;
        Ok(match replaced {
            Some((n, d)) => (n, d.min(d_loc)),
            None => (0, d_loc),
        })
    }

    /// Find the subject and expiry of a jti minted by this realm.
    pub async fn locate(&self, jti: &str) -> Result<Option<(i64, String)>, StoreError> {
        let mut conn = self.read_connection();
        let v: Option<String> = self
            .bounded(
                self.timeout.max(Duration::from_millis(500)),
                redis::cmd("GET").arg(self.layout.locator(jti)).query_async(&mut conn),
            )
            .await?;
        Ok(v.and_then(|s| {
            let (exp, sub) = s.split_once(' ')?;
            Some((exp.parse().ok()?, sub.to_string()))
        }))
    }

    /// The subject's "log out everywhere" cut-off (denylist realms): tokens with `iat` at or
    /// before it are revoked.
    pub async fn cutoff(&self, sub: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.read_connection();
        self.bounded(
            self.timeout.max(Duration::from_millis(500)),
            redis::cmd("GET").arg(self.layout.cutoff(sub)).query_async(&mut conn),
        )
        .await
    }

    /// Revoke one token whose `exp` is known (from its locator, or the latest a token of the
    /// realm could carry).
    pub async fn revoke(&self, sub: &str, jti: &str, exp: i64, now_ms: i64) -> Result<(bool, Durability), StoreError> {
        self.write_retrying(|| self.revoke_once(sub, jti, exp, now_ms)).await
    }

    async fn revoke_once(&self, sub: &str, jti: &str, exp: i64, now_ms: i64) -> Result<(bool, Durability), StoreError> {
        match self.mode {
            SessionMode::Stateless => Ok((false, Durability { replicas_confirmed: 0, replicas_required: 0 })),
            SessionMode::Single | SessionMode::Multi => {
                let idx = self.layout.index(sub);
                let rec = self.layout.token(sub, jti);
                let mut eval = eval_cmd(REVOKE_ONE_SCRIPT, &[&idx, &rec]);
                eval.arg(KeyLayout::jti_member(jti));
                let written = self.write_and_wait(&rec, eval).await;
                // Also on error: the write may have been executed. This pod refuses the token on
                // its next request; other pods once the invalidation arrives.
                if let Some(c) = &self.cache {
                    c.forget(&rec);
                }
                let (v, d) = written?;
                Ok((matches!(v, Value::Int(n) if n > 0), d))
            }
            SessionMode::Denylist => {
                let key = self.layout.deny(sub, jti);
                let mut eval = eval_cmd(DENY_SCRIPT, &[&key]);
                eval.arg(record_ttl_ms(exp, self.leeway_secs, now_ms));
                let (v, d) = self.write_and_wait(&key, eval).await?;
                Ok((matches!(v, Value::Int(1)), d))
            }
        }
    }

    /// Revoke every token of a subject ("log out everywhere"). `max_lifetime_secs` bounds the
    /// tokens a denylist cut-off must outlive.
    pub async fn revoke_subject(
        &self,
        sub: &str,
        now_ms: i64,
        max_lifetime_secs: u64,
    ) -> Result<(i64, Durability), StoreError> {
        self.write_retrying(|| self.revoke_subject_once(sub, now_ms, max_lifetime_secs)).await
    }

    async fn revoke_subject_once(
        &self,
        sub: &str,
        now_ms: i64,
        max_lifetime_secs: u64,
    ) -> Result<(i64, Durability), StoreError> {
        match self.mode {
            SessionMode::Stateless => Ok((0, Durability { replicas_confirmed: 0, replicas_required: 0 })),
            SessionMode::Single | SessionMode::Multi => {
                let idx = self.layout.index(sub);
                let mut eval = eval_cmd(REVOKE_ALL_SCRIPT, &[&idx]);
                eval.arg(self.layout.token_prefix(sub));
                let written = self.write_and_wait(&idx, eval).await;
                if let Some(c) = &self.cache {
                    c.forget_prefix(&self.layout.token_prefix(sub));
                }
                let (v, d) = written?;
                Ok((if let Value::Int(n) = v { n } else { 0 }, d))
            }
            SessionMode::Denylist => {
                let key = self.layout.cutoff(sub);
                let cut = now_ms.div_euclid(1000);
                // Every token issued by then (iat <= cut) expires by this exp.
                let latest_exp = latest_exp_for_iat(cut, max_lifetime_secs, self.leeway_secs);
                let mut eval = eval_cmd(CUTOFF_SCRIPT, &[&key]);
                eval.arg(cut).arg(record_ttl_ms(latest_exp, self.leeway_secs, now_ms));
                let (_, d) = self.write_and_wait(&key, eval).await?;
                Ok((-1, d))
            }
        }
    }

    /// PING every master over the write connection (the server, standalone). Its result is not
    /// used: the point is that a dead master makes the write connection refresh its slot map (a
    /// standalone connection: reconnect) now, in the background, rather than on the next
    /// revocation.
    pub async fn touch_writer(&self) {
        let mut conn = self.write_connection();
        let mut cmd = Cmd::new();
        cmd.arg("PING");
        let route = RoutingInfo::MultiNode((redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters, None));
        let _ = self.bounded(self.timeout.max(Duration::from_millis(500)), conn.route_command(cmd, route)).await;
    }

    /// Readiness probe: one PING to a random master (the server, standalone), bounded by the
    /// command timeout.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let mut conn = self.read_connection();
        let start = Instant::now();
        let mut cmd = Cmd::new();
        cmd.arg("PING");
        self.bounded(
            self.timeout.max(Duration::from_millis(500)),
            conn.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary)),
        )
        .await?;
        Ok(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acceptance as `token::validate` decides it: on a pod whose clock reads `clock_ms`, a token
    /// is accepted while `floor(clock / 1 s) <= exp + leeway`.
    fn accepted(exp: i64, leeway: i64, clock_ms: i64) -> bool {
        clock_ms.div_euclid(1000) <= exp + leeway
    }

    #[test]
    fn revocation_records_outlive_acceptance_on_every_pod() {
        // Real time in ms; the writer's and the verifier's clocks are offset from it by up to the
        // leeway between them. A record written at real time `w` (≤ the token's end everywhere)
        // with the rule's TTL must still exist at every real instant some pod accepts the token.
        for leeway in [0i64, 1, 2, 5, 30] {
            for exp_real_offset_ms in [0i64, 10, 500, 999] {
                let exp = 1_800_000_000i64;
                for writer_skew_ms in (-leeway * 1000..=leeway * 1000).step_by(250) {
                    for verifier_skew_ms in (-leeway * 1000..=leeway * 1000).step_by(250) {
                        if (writer_skew_ms - verifier_skew_ms).abs() > leeway * 1000 {
                            continue;
                        }
                        // Writes from long before exp up to the writer's own last accepting moment.
                        for written_real_ms in [
                            exp * 1000 - 3_600_000,
                            exp * 1000 - 1000 + exp_real_offset_ms,
                            exp * 1000 + exp_real_offset_ms,
                            (exp + leeway) * 1000 + 999 - writer_skew_ms,
                        ] {
                            let ttl = record_ttl_ms(exp, leeway as u64, written_real_ms + writer_skew_ms) as i64;
                            let gone_at = written_real_ms + ttl;
                            // The last real instant the verifier accepts.
                            let last_accepting = (exp + leeway + 1) * 1000 - 1 - verifier_skew_ms;
                            assert!(accepted(exp, leeway, last_accepting + verifier_skew_ms));
                            assert!(!accepted(exp, leeway, last_accepting + 1 + verifier_skew_ms));
                            assert!(
                                gone_at > last_accepting,
                                "leeway {leeway}, writer {writer_skew_ms} ms, verifier {verifier_skew_ms} ms, \
                                 written {written_real_ms}: record gone at {gone_at}, accepted until {last_accepting}"
                            );
                        }
                    }
                }
            }
        }
        // The old rule (exp + leeway - now, whole seconds) failed exactly there: written at
        // S + 10 ms with exp = S + 2, leeway 0, the record vanished at S + 2.01 s while the
        // token was accepted until S + 2.999 s.
        let s = 1_800_000_000i64;
        let old_gone_at = s * 1000 + 10 + (s + 2 - s) * 1000;
        assert!(old_gone_at < (s + 3) * 1000 - 1);
        assert!(record_ttl_ms(s + 2, 0, s * 1000 + 10) as i64 + s * 1000 + 10 > (s + 3) * 1000);
        // Never below a second, never negative.
        assert_eq!(record_ttl_ms(s, 0, (s + 100) * 1000), 1000);
    }

    #[test]
    fn a_cutoff_outlives_every_token_it_revokes() {
        // Every token with iat <= cut and exp - iat <= max + leeway.
        let (cut, max, leeway) = (1_800_000_000i64, 900u64, 30u64);
        let latest = latest_exp_for_iat(cut, max, leeway);
        assert_eq!(latest, cut + 930);
        let ttl = record_ttl_ms(latest, leeway, cut * 1000 + 999) as i64;
        let verifier_behind_ms = leeway as i64 * 1000;
        assert!(cut * 1000 + 999 + ttl > (latest + leeway as i64 + 1) * 1000 + verifier_behind_ms - 1000);
    }
}
