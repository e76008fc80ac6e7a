//! Session records in the Redis Cluster: the key layout and every command that touches it.
//!
//! # Key layout (the only place key names are built)
//!
//! `P` is the realm's key prefix (default `ar:`), `R` the realm name, `S` the subject and
//! `J` the jti, both base64url-encoded so no user-controlled byte can break a hash tag or
//! a key boundary. `{R:S}` is the hash tag: all of one subject's records share a slot
//! (so one Lua script can update them atomically), while different subjects spread over
//! all 16384 slots.
//!
//! | key                 | type   | value            | TTL                      | modes          |
//! |---------------------|--------|------------------|--------------------------|----------------|
//! | `P{R:S}:t:J`        | string | exp (unix s)     | token's remaining life   | single, multi  |
//! | `P{R:S}:idx`        | zset   | jti → exp        | latest exp of the subject| single, multi  |
//! | `P{R:S}:d:J`        | string | `1`              | remaining life + leeway  | denylist       |
//! | `P{R:S}:cut`        | string | unix s (only grows) | max TTL + 2·leeway + 1 | denylist     |
//! | `P{R:j:J}:loc`      | string | `exp sub`        | remaining life + leeway  | all but stateless |
//!
//! No token is stored: only ids and expiry times. The request path runs exactly one
//! command (`EXISTS` or `MGET` on keys of one slot).

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Script, Value};

use authrealm_contract::SessionMode;
use authrealm_contract::config::RedisConfig;

/// Builds key names. Pure; unit-tested.
#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    realm: String,
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s.as_bytes())
}

impl KeyLayout {
    pub fn new(prefix: &str, realm: &str) -> Self {
        KeyLayout { prefix: prefix.into(), realm: realm.into() }
    }
    /// `P{R:S}` — the common part of a subject's keys.
    pub fn subject_base(&self, sub: &str) -> String {
        format!("{}{{{}:{}}}", self.prefix, self.realm, b64(sub))
    }
    pub fn token(&self, sub: &str, jti: &str) -> String {
        format!("{}:t:{}", self.subject_base(sub), b64(jti))
    }
    pub fn token_prefix(&self, sub: &str) -> String {
        format!("{}:t:", self.subject_base(sub))
    }
    pub fn index(&self, sub: &str) -> String {
        format!("{}:idx", self.subject_base(sub))
    }
    pub fn deny(&self, sub: &str, jti: &str) -> String {
        format!("{}:d:{}", self.subject_base(sub), b64(jti))
    }
    pub fn cutoff(&self, sub: &str) -> String {
        format!("{}:cut", self.subject_base(sub))
    }
    pub fn locator(&self, jti: &str) -> String {
        format!("{}{{{}:j:{}}}:loc", self.prefix, self.realm, b64(jti))
    }
    /// The jti as stored in the index (base64url).
    pub fn jti_member(jti: &str) -> String {
        b64(jti)
    }
}

/// CRC16/XMODEM as Redis Cluster uses it.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The cluster slot of a key (honouring the first non-empty `{…}` hash tag).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    if let Some(open) = bytes.iter().position(|&b| b == b'{')
        && let Some(len) = bytes[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return crc16(&bytes[open + 1..open + 1 + len]) % 16384;
    }
    crc16(bytes) % 16384
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
-- KEYS[1] cut-off; ARGV: cut-off (unix seconds), ttl (seconds)
local v = redis.call('GET', KEYS[1])
local cur = v and tonumber(v)
if (not cur) or cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('GET', KEYS[1])
"#;

const REVOKE_ONE_SCRIPT: &str = r#"
-- KEYS[1] index, KEYS[2] token record; ARGV[1] jti-member
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('DEL', KEYS[2])
"#;

/// The realm's session store.
#[derive(Clone)]
pub struct SessionStore {
    /// Per-request reads (EXISTS/MGET, locator GET, PING).
    conn: ClusterConnection,
    /// Writes and their `WAIT`s. Redis blocks the connection a `WAIT` arrives on until replicas
    /// confirm or the wait times out, and `WAIT` only counts writes made on that same connection;
    /// keeping writes apart means a slow or frozen replica delays revocations, never the checks
    /// of every other request routed to that master.
    writer: ClusterConnection,
    pub layout: KeyLayout,
    mode: SessionMode,
    timeout: Duration,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    mint_script: Script,
    revoke_all_script: Script,
    revoke_one_script: Script,
    cutoff_script: Script,
    /// `multi` mode: most live sessions per subject.
    max_sessions: u32,
    /// Clock leeway: a token is accepted until `exp + leeway`, so its jti locator lives as long.
    leeway_secs: u64,
}

/// Build the cluster client (no connection is made yet).
/// The cluster client. `for_writes`: the client of the write connection, whose `WAIT`s block
/// server-side for up to `waitTimeoutMs` each and can queue behind one another on a node; its
/// response timeout is generous so that a blocked `WAIT` is never mistaken for a dead
/// connection (every operation is still bounded by its own deadline in [`SessionStore`]).
pub fn build_client(cfg: &RedisConfig, for_writes: bool) -> Result<redis::cluster::ClusterClient, String> {
    let tls = cfg.tls.is_some();
    let nodes: Vec<String> =
        cfg.endpoints.iter().map(|e| if tls { format!("rediss://{e}") } else { format!("redis://{e}") }).collect();
    let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .response_timeout(Duration::from_millis(if for_writes {
            cfg.command_timeout_ms + 4 * cfg.wait_timeout_ms + 1000
        } else {
            cfg.command_timeout_ms.max(cfg.wait_timeout_ms + 200)
        }))
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100);
    if let Ok(user) = std::env::var(&cfg.username_env)
        && !user.is_empty()
    {
        b = b.username(user);
    }
    if let Ok(pass) = std::env::var(&cfg.password_env)
        && !pass.is_empty()
    {
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
    b.build().map_err(|e| format!("redis: {e}"))
}

impl SessionStore {
    pub fn new(
        conn: ClusterConnection,
        writer: ClusterConnection,
        cfg: &RedisConfig,
        realm: &str,
        mode: SessionMode,
        cfg_leeway_secs: u64,
        max_sessions: u32,
    ) -> Self {
        SessionStore {
            conn,
            writer,
            layout: KeyLayout::new(&cfg.key_prefix, realm),
            mode,
            timeout: Duration::from_millis(cfg.command_timeout_ms),
            wait_replicas: cfg.wait_replicas,
            wait_timeout_ms: cfg.wait_timeout_ms,
            mint_script: Script::new(MINT_SCRIPT),
            revoke_all_script: Script::new(REVOKE_ALL_SCRIPT),
            revoke_one_script: Script::new(REVOKE_ONE_SCRIPT),
            cutoff_script: Script::new(CUTOFF_SCRIPT),
            leeway_secs: cfg_leeway_secs,
            max_sessions: max_sessions.max(1),
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
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    /// The per-request check: one command, keys of one slot.
    pub async fn check(&self, sub: &str, jti: &str, iat: Option<i64>) -> Result<SessionState, StoreError> {
        let mut conn = self.conn.clone();
        match self.mode {
            SessionMode::Stateless => Ok(SessionState::Active),
            SessionMode::Single | SessionMode::Multi => {
                let key = self.layout.token(sub, jti);
                let n: i64 = self.bounded(self.timeout, redis::cmd("EXISTS").arg(&key).query_async(&mut conn)).await?;
                Ok(if n == 1 { SessionState::Active } else { SessionState::Revoked })
            }
            SessionMode::Denylist => {
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

    fn write_limit(&self) -> Duration {
        self.timeout.max(Duration::from_millis(1000))
    }

    /// `WAIT` on the master that owns `key`'s slot, so the preceding write is confirmed by
    /// replicas before it is acknowledged.
    async fn wait_for_replicas(&self, key: &str) -> Result<Durability, StoreError> {
        if self.wait_replicas == 0 {
            return Ok(Durability { replicas_confirmed: 0, replicas_required: 0 });
        }
        let mut conn = self.writer.clone();
        let mut cmd = Cmd::new();
        cmd.arg("WAIT").arg(self.wait_replicas).arg(self.wait_timeout_ms);
        let route =
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(key_slot(key), SlotAddr::Master)));
        let limit = Duration::from_millis(self.wait_timeout_ms) + self.write_limit();
        let v = self.bounded(limit, conn.route_command(cmd, route)).await?;
        match v {
            Value::Int(n) => Ok(Durability { replicas_confirmed: n, replicas_required: self.wait_replicas }),
            _ => Err(StoreError::Protocol),
        }
    }

    /// Register a freshly minted token. In `single` mode this replaces (revokes) every
    /// earlier token of the subject. Returns how many earlier sessions were replaced.
    pub async fn register(&self, sub: &str, jti: &str, exp: i64, now: i64) -> Result<(i64, Durability), StoreError> {
        self.write_retrying(|| self.register_once(sub, jti, exp, now)).await
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

    async fn register_once(&self, sub: &str, jti: &str, exp: i64, now: i64) -> Result<(i64, Durability), StoreError> {
        let ttl_ms = ((exp - now).max(1) * 1000) as u64;
        // The locator lets DELETE /v1/tokens/{jti} find the subject. It lives in the jti's slot,
        // usually on another master than the subject's records, so both writes are WAITed for:
        // a token whose locator were lost in a failover could no longer be revoked by jti.
        let loc = self.layout.locator(jti);
        let mut locator_conn = self.writer.clone();
        let mut set_locator = redis::cmd("SET");
        set_locator.arg(&loc).arg(format!("{exp} {sub}")).arg("PX").arg(ttl_ms + self.leeway_secs * 1000);
        let locator = self.bounded(self.write_limit(), set_locator.query_async::<()>(&mut locator_conn));
        match self.mode {
            SessionMode::Single | SessionMode::Multi => {
                let mut conn = self.writer.clone();
                let idx = self.layout.index(sub);
                let rec = self.layout.token(sub, jti);
                let single = if self.mode == SessionMode::Single { "1" } else { "0" };
                let mut inv = self.mint_script.prepare_invoke();
                inv.key(&idx)
                    .key(&rec)
                    .arg(KeyLayout::jti_member(jti))
                    .arg(exp)
                    .arg(ttl_ms)
                    .arg(now)
                    .arg(single)
                    .arg(self.layout.token_prefix(sub))
                    .arg(self.max_sessions);
                let session = self.bounded(self.write_limit(), inv.invoke_async::<i64>(&mut conn));
                let ((), replaced) = tokio::try_join!(locator, session)?;
                // One after the other: when both keys live on one master, concurrent WAITs would
                // queue behind each other on its connection and the second could run out of time.
                let a = self.wait_for_replicas(&rec).await?;
                let b = self.wait_for_replicas(&loc).await?;
                Ok((replaced, a.min(b)))
            }
            _ => {
                locator.await?;
                let d = self.wait_for_replicas(&loc).await?;
                Ok((0, d))
            }
        }
    }

    /// Find the subject and expiry of a jti minted by this realm.
    pub async fn locate(&self, jti: &str) -> Result<Option<(i64, String)>, StoreError> {
        let mut conn = self.conn.clone();
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

    /// Revoke one token. `exp` bounds how long a denylist entry must live.
    pub async fn revoke(&self, sub: &str, jti: &str, exp: i64, now: i64) -> Result<(bool, Durability), StoreError> {
        self.write_retrying(|| self.revoke_once(sub, jti, exp, now)).await
    }

    async fn revoke_once(&self, sub: &str, jti: &str, exp: i64, now: i64) -> Result<(bool, Durability), StoreError> {
        let mut conn = self.writer.clone();
        match self.mode {
            SessionMode::Stateless => Ok((false, Durability { replicas_confirmed: 0, replicas_required: 0 })),
            SessionMode::Single | SessionMode::Multi => {
                let idx = self.layout.index(sub);
                let rec = self.layout.token(sub, jti);
                let mut inv = self.revoke_one_script.prepare_invoke();
                inv.key(&idx).key(&rec).arg(KeyLayout::jti_member(jti));
                let n: i64 = self.bounded(self.write_limit(), inv.invoke_async(&mut conn)).await?;
                let d = self.wait_for_replicas(&rec).await?;
                Ok((n > 0, d))
            }
            SessionMode::Denylist => {
                let key = self.layout.deny(sub, jti);
                let ttl = (exp - now).max(1);
                let created: Option<String> = self
                    .bounded(
                        self.write_limit(),
                        redis::cmd("SET").arg(&key).arg(1).arg("EX").arg(ttl).arg("NX").query_async(&mut conn),
                    )
                    .await?;
                let d = self.wait_for_replicas(&key).await?;
                Ok((created.is_some(), d))
            }
        }
    }

    /// Revoke every token of a subject ("log out everywhere").
    pub async fn revoke_subject(&self, sub: &str, now: i64, cutoff_ttl: i64) -> Result<(i64, Durability), StoreError> {
        self.write_retrying(|| self.revoke_subject_once(sub, now, cutoff_ttl)).await
    }

    async fn revoke_subject_once(&self, sub: &str, now: i64, cutoff_ttl: i64) -> Result<(i64, Durability), StoreError> {
        let mut conn = self.writer.clone();
        match self.mode {
            SessionMode::Stateless => Ok((0, Durability { replicas_confirmed: 0, replicas_required: 0 })),
            SessionMode::Single | SessionMode::Multi => {
                let idx = self.layout.index(sub);
                let mut inv = self.revoke_all_script.prepare_invoke();
                inv.key(&idx).arg(self.layout.token_prefix(sub));
                let n: i64 = self.bounded(self.write_limit(), inv.invoke_async(&mut conn)).await?;
                let d = self.wait_for_replicas(&idx).await?;
                Ok((n, d))
            }
            SessionMode::Denylist => {
                let key = self.layout.cutoff(sub);
                let mut inv = self.cutoff_script.prepare_invoke();
                inv.key(&key).arg(now).arg(cutoff_ttl.max(1));
                self.bounded(self.write_limit(), inv.invoke_async::<String>(&mut conn)).await?;
                let d = self.wait_for_replicas(&key).await?;
                Ok((-1, d))
            }
        }
    }

    /// PING every master over the write connection. Its result is not used: the point is that a
    /// dead master makes the write connection refresh its slot map now, in the background, rather
    /// than on the next revocation.
    pub async fn touch_writer(&self) {
        let mut conn = self.writer.clone();
        let mut cmd = Cmd::new();
        cmd.arg("PING");
        let route = RoutingInfo::MultiNode((redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters, None));
        let _ = self.bounded(self.timeout.max(Duration::from_millis(500)), conn.route_command(cmd, route)).await;
    }

    /// Readiness probe: one PING to a random master, bounded by the command timeout.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let mut conn = self.conn.clone();
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

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
        assert_eq!(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot("{}x"), crc16(b"{}x") % 16384);
    }

    #[test]
    fn a_subjects_records_share_a_slot() {
        let l = KeyLayout::new("ar:", "demo");
        let sub = "alice";
        let slot = key_slot(&l.token(sub, "j1"));
        for k in [l.token(sub, "j2"), l.index(sub), l.deny(sub, "j1"), l.cutoff(sub)] {
            assert_eq!(key_slot(&k), slot, "{k}");
        }
    }

    #[test]
    fn hostile_subjects_cannot_escape_their_hash_tag() {
        let l = KeyLayout::new("ar:", "demo");
        // A subject that looks like another subject's key must not share its keys.
        let a = l.token("a", "j");
        let b = l.token("a}:t:j", "x");
        assert_ne!(a, b);
        for sub in ["}", "{", "a}b{c", "\u{1F600}", "a:b", ""] {
            let k = l.token(sub, "j");
            assert_eq!(k.matches('{').count(), 1, "{k}");
            assert_eq!(k.matches('}').count(), 1, "{k}");
        }
    }

    #[test]
    fn subjects_spread_over_all_slot_ranges() {
        let l = KeyLayout::new("ar:", "demo");
        let mut thirds = [0u32; 3];
        for i in 0..3000 {
            let slot = key_slot(&l.index(&format!("user-{i}")));
            thirds[(slot as usize * 3) / 16384] += 1;
        }
        for t in thirds {
            assert!(t > 800, "{thirds:?}");
        }
    }
}
