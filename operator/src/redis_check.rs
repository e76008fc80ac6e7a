//! Talking to a realm's Redis with the realm's own credentials: the `RedisReachable` check
//! (`CLUSTER INFO` on a seed node; `PING` and `INFO` on a standalone server) and the optional
//! purge of the realm's session records when the realm is deleted.

use std::time::Duration;

use authrealm_contract::RedisMode;
use authrealm_contract::redis_keys::KeyLayout;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError, TlsCertificates};

use crate::conditions::reason;

/// Everything needed to connect, secrets included (read from the user's Secret just before use,
/// never stored or logged).
#[derive(Clone)]
pub struct Connect {
    /// A Redis Cluster (seed nodes) or one standalone server.
    pub mode: RedisMode,
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS on; with `Some(pem)` only that CA is trusted.
    pub tls: Option<Option<Vec<u8>>>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("mode", &self.mode)
            .field("endpoints", &self.endpoints)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why the cluster is not usable; `reason()` is the condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Authentication(String),
    #[error("{0}")]
    Degraded(String),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Tls(String),
    /// A referenced Secret lacks the opt-in label (see `redis_monitor::REDIS_SECRET_LABEL`).
    #[error("{0}")]
    NotLabelled(String),
    /// The endpoint is not the kind of Redis `redis.mode` names.
    #[error("{0}")]
    ModeMismatch(String),
}

impl CheckError {
    pub fn reason(&self) -> &'static str {
        match self {
            CheckError::Unreachable(_) => reason::UNREACHABLE,
            CheckError::Authentication(_) => reason::AUTHENTICATION_FAILED,
            CheckError::Degraded(_) => reason::CLUSTER_DEGRADED,
            CheckError::Credentials(_) => reason::CREDENTIALS_MISSING,
            CheckError::Tls(_) => reason::TLS_CONFIG_INVALID,
            CheckError::NotLabelled(_) => reason::CREDENTIALS_NOT_LABELLED,
            CheckError::ModeMismatch(_) => reason::REDIS_MODE_MISMATCH,
        }
    }
}

/// The fields of `CLUSTER INFO` the check looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    pub state: String,
    pub slots_assigned: u32,
    pub slots_ok: u32,
    pub known_nodes: u32,
    pub size: u32,
}

pub fn parse_cluster_info(text: &str) -> ClusterInfo {
    let mut info = ClusterInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else { continue };
        let n = || v.trim().parse().unwrap_or(0);
        match k {
            "cluster_state" => info.state = v.trim().to_owned(),
            "cluster_slots_assigned" => info.slots_assigned = n(),
            "cluster_slots_ok" => info.slots_ok = n(),
            "cluster_known_nodes" => info.known_nodes = n(),
            "cluster_size" => info.size = n(),
            _ => {}
        }
    }
    info
}

/// Verdict on a `CLUSTER INFO` answer.
pub fn judge(info: &ClusterInfo) -> Result<(), String> {
    if info.state != "ok" {
        return Err(format!("cluster_state is {:?}", info.state));
    }
    if info.slots_ok != 16384 {
        return Err(format!("only {} of 16384 slots are served ({} assigned)", info.slots_ok, info.slots_assigned));
    }
    Ok(())
}

fn classify(endpoint: &str, e: &RedisError) -> CheckError {
    let code = e.code().unwrap_or_default();
    let text = e.to_string();
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM")
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
    {
        CheckError::Authentication(format!("{endpoint}: authentication failed ({})", code_or_kind(e)))
    } else if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
        CheckError::Tls(format!("{endpoint}: TLS handshake failed: {text}"))
    } else {
        CheckError::Unreachable(format!("{endpoint}: {text}"))
    }
}

/// A short error description that never includes the command's arguments.
fn code_or_kind(e: &RedisError) -> String {
    e.code().map(str::to_owned).unwrap_or_else(|| format!("{:?}", e.kind()))
}

async fn connect_one(c: &Connect, endpoint: &str) -> Result<MultiplexedConnection, CheckError> {
    let scheme = if c.tls.is_some() { "rediss" } else { "redis" };
    let info = format!("{scheme}://{endpoint}")
        .into_connection_info()
        .map_err(|e| CheckError::Unreachable(format!("{endpoint}: not a usable address: {e}")))?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = c.username.as_deref().filter(|u| !u.is_empty()) {
        settings = settings.set_username(u);
    }
    if let Some(p) = c.password.as_deref().filter(|p| !p.is_empty()) {
        settings = settings.set_password(p);
    }
    let info = info.set_redis_settings(settings);
    let client = match &c.tls {
        Some(Some(ca)) => {
            Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) })
        }
        _ => Client::open(info),
    }
    .map_err(|e| CheckError::Tls(format!("{endpoint}: {e}")))?;
    let cfg =
        AsyncConnectionConfig::new().set_connection_timeout(Some(c.timeout)).set_response_timeout(Some(c.timeout));
    match tokio::time::timeout(c.timeout * 2, client.get_multiplexed_async_connection_with_config(&cfg)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(endpoint, &e)),
        Err(_) => Err(CheckError::Unreachable(format!("{endpoint}: no answer within {:?}", c.timeout * 2))),
    }
}

async fn cluster_info(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
    timeout: Duration,
) -> Result<String, CheckError> {
    match tokio::time::timeout(timeout, redis::cmd("CLUSTER").arg("INFO").query_async::<String>(conn)).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(classify(endpoint, &e)),
        Err(_) => Err(CheckError::Unreachable(format!("{endpoint}: CLUSTER INFO timed out after {timeout:?}"))),
    }
}

/// The check on an open connection, judged: `CLUSTER INFO` for a cluster, `PING` + `INFO` for a
/// standalone server.
async fn check_on(
    mode: RedisMode,
    conn: &mut MultiplexedConnection,
    endpoint: &str,
    timeout: Duration,
) -> Result<String, CheckError> {
    if mode == RedisMode::Standalone {
        return check_standalone_on(conn, endpoint, timeout).await;
    }
    let text = match cluster_info(conn, endpoint, timeout).await {
        Err(CheckError::Unreachable(m)) if m.contains("cluster support disabled") => {
            return Err(CheckError::ModeMismatch(format!(
                "{endpoint}: not a Redis Cluster node (cluster support disabled); for a single Redis server set \
                 redis.mode: standalone"
            )));
        }
        r => r?,
    };
    let info = parse_cluster_info(&text);
    judge(&info).map_err(|m| CheckError::Degraded(format!("{endpoint}: {m}")))?;
    Ok(format!("{endpoint}: cluster_state ok, 16384 slots served, {} known nodes", info.known_nodes))
}

/// The fields of `INFO` a standalone check looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub role: String,
    pub cluster_enabled: bool,
    pub connected_replicas: u32,
}

pub fn parse_server_info(text: &str) -> ServerInfo {
    let mut info = ServerInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once(':') else { continue };
        match k {
            "role" => info.role = v.trim().to_owned(),
            "cluster_enabled" => info.cluster_enabled = v.trim() == "1",
            "connected_slaves" => info.connected_replicas = v.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    info
}

/// Verdict on a standalone server's `INFO`: a master that is not a cluster node (a replica
/// refuses the sidecars' writes; a cluster node answers `MOVED` for most keys).
pub fn judge_standalone(endpoint: &str, info: &ServerInfo) -> Result<String, CheckError> {
    if info.cluster_enabled {
        return Err(CheckError::ModeMismatch(format!(
            "{endpoint}: is a Redis Cluster node; set redis.mode: cluster (or name a standalone server)"
        )));
    }
    if info.role != "master" {
        return Err(CheckError::ModeMismatch(format!(
            "{endpoint}: is a {} (role:{}), not a master: a standalone realm needs the server that accepts writes",
            if info.role == "slave" { "replica" } else { "server of another role" },
            if info.role.is_empty() { "?" } else { &info.role }
        )));
    }
    Ok(format!("{endpoint}: standalone Redis, role master, {} connected replica(s)", info.connected_replicas))
}

/// `PING`, then `INFO replication` and `INFO cluster` in one round trip.
async fn check_standalone_on(
    conn: &mut MultiplexedConnection,
    endpoint: &str,
    timeout: Duration,
) -> Result<String, CheckError> {
    let mut pipe = redis::pipe();
    pipe.cmd("PING").ignore().cmd("INFO").arg("replication").cmd("INFO").arg("cluster");
    match tokio::time::timeout(timeout, pipe.query_async::<(String, String)>(conn)).await {
        Ok(Ok((replication, cluster))) => {
            judge_standalone(endpoint, &parse_server_info(&format!("{replication}\n{cluster}")))
        }
        Ok(Err(e)) => Err(classify(endpoint, &e)),
        Err(_) => Err(CheckError::Unreachable(format!("{endpoint}: PING/INFO timed out after {timeout:?}"))),
    }
}

/// `AUTH` again on a kept connection, so that a password changed on the server since the
/// connection was opened is noticed as it would be by a new connection.
async fn reauthenticate(c: &Connect, conn: &mut MultiplexedConnection, endpoint: &str) -> Result<(), CheckError> {
    let Some(password) = c.password.as_deref().filter(|p| !p.is_empty()) else { return Ok(()) };
    let mut cmd = redis::cmd("AUTH");
    if let Some(u) = c.username.as_deref().filter(|u| !u.is_empty()) {
        cmd.arg(u);
    }
    cmd.arg(password);
    match tokio::time::timeout(c.timeout, cmd.query_async::<()>(conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(classify(endpoint, &e)),
        Err(_) => Err(CheckError::Unreachable(format!("{endpoint}: AUTH timed out after {:?}", c.timeout))),
    }
}

/// `CLUSTER INFO` on the first seed that answers, over a new connection each time. An
/// authentication failure is final (the same credentials would fail on every node); otherwise
/// the next seed is tried.
pub async fn check_cluster(c: &Connect) -> Result<String, CheckError> {
    check_kept(c, &mut None).await
}

/// A connection kept open between checks of the same target (see [`check_kept`]).
pub struct Kept {
    endpoint: String,
    conn: MultiplexedConnection,
}

/// The check of [`check_cluster`] over a kept connection: `kept` is used (credentials verified
/// again with `AUTH`) while it works, and replaced by a new connection to the first seed that
/// answers when it does not. A connection is kept whenever the seed answered `CLUSTER INFO`,
/// healthy or degraded; never after an authentication failure.
pub async fn check_kept(c: &Connect, kept: &mut Option<Kept>) -> Result<String, CheckError> {
    if let Some(k) = kept.as_mut() {
        let r = async {
            reauthenticate(c, &mut k.conn, &k.endpoint).await?;
            check_on(c.mode, &mut k.conn, &k.endpoint, c.timeout).await
        }
        .await;
        match r {
            Ok(m) => return Ok(m),
            Err(e @ (CheckError::Degraded(_) | CheckError::ModeMismatch(_))) => return Err(e),
            Err(e @ CheckError::Authentication(_)) => {
                *kept = None;
                return Err(e);
            }
            // Broken or gone: start again from the seeds.
            Err(_) => *kept = None,
        }
    }
    let mut last = CheckError::Unreachable("no endpoints".into());
    for endpoint in &c.endpoints {
        let mut conn = match connect_one(c, endpoint).await {
            Ok(conn) => conn,
            Err(e @ CheckError::Authentication(_)) => return Err(e),
            Err(e) => {
                last = e;
                continue;
            }
        };
        let r = check_on(c.mode, &mut conn, endpoint, c.timeout).await;
        match r {
            Ok(_) | Err(CheckError::Degraded(_) | CheckError::ModeMismatch(_)) => {
                *kept = Some(Kept { endpoint: endpoint.clone(), conn });
                return r;
            }
            Err(e @ CheckError::Authentication(_)) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Master addresses from `CLUSTER NODES` (`<id> <ip:port@bus[,host]> <flags> ...`).
pub fn masters_from_cluster_nodes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _id = f.next()?;
            let addr = f.next()?;
            let flags = f.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| *f == "fail" || *f == "noaddr" || *f == "handshake") {
                return None;
            }
            let hostport = addr.split('@').next()?;
            (!hostport.starts_with(':')).then(|| hostport.to_owned())
        })
        .collect()
}

/// Deletes every key of the realm on every master (SCAN + UNLINK, one key per command since the
/// keys span slots); on a standalone server, on that server. Returns how many keys were deleted.
pub async fn purge_realm(c: &Connect, prefix: &str, realm: &str) -> Result<u64, CheckError> {
    let mut seed_err = CheckError::Unreachable("no endpoints".into());
    let mut masters = (c.mode == RedisMode::Standalone).then(|| c.endpoints.clone());
    for endpoint in c.endpoints.iter().filter(|_| masters.is_none()) {
        match connect_one(c, endpoint).await {
            Ok(mut conn) => {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| classify(endpoint, &e))?;
                masters = Some(masters_from_cluster_nodes(&text));
                break;
            }
            Err(e @ CheckError::Authentication(_)) => return Err(e),
            Err(e) => seed_err = e,
        }
    }
    let masters = masters.ok_or(seed_err)?;
    let pattern = KeyLayout::new(prefix, realm).purge_pattern();
    let mut deleted = 0u64;
    for m in masters {
        let mut conn = connect_one(c, &m).await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| classify(&m, &e))?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("UNLINK").arg(k);
                }
                let n: Vec<u64> = pipe.query_async(&mut conn).await.map_err(|e| classify(&m, &e))?;
                deleted += n.iter().sum::<u64>();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_info_verdicts() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_known_nodes:6\r\ncluster_size:3\r\n";
        let info = parse_cluster_info(ok);
        assert_eq!(info.known_nodes, 6);
        assert!(judge(&info).is_ok());
        let fail = ok.replace("cluster_state:ok", "cluster_state:fail");
        assert!(judge(&parse_cluster_info(&fail)).unwrap_err().contains("fail"));
        let partial = ok.replace("cluster_slots_ok:16384", "cluster_slots_ok:10923");
        assert!(judge(&parse_cluster_info(&partial)).unwrap_err().contains("10923"));
        assert!(judge(&parse_cluster_info("")).is_err());
    }

    #[test]
    fn standalone_verdicts() {
        let master = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=127.0.0.1,port=7001,state=online\r\n\n# Cluster\r\ncluster_enabled:0\r\n";
        let info = parse_server_info(master);
        assert_eq!(info, ServerInfo { role: "master".into(), cluster_enabled: false, connected_replicas: 1 });
        assert!(judge_standalone("r:1", &info).unwrap().contains("role master, 1 connected replica"));
        let replica = "role:slave\r\nmaster_host:10.0.0.1\r\ncluster_enabled:0\r\n";
        let e = judge_standalone("r:1", &parse_server_info(replica)).unwrap_err();
        assert_eq!(e.reason(), "RedisModeMismatch");
        assert!(e.to_string().contains("replica"), "{e}");
        let cluster_node = master.replace("cluster_enabled:0", "cluster_enabled:1");
        let e = judge_standalone("r:1", &parse_server_info(&cluster_node)).unwrap_err();
        assert!(e.to_string().contains("redis.mode: cluster"), "{e}");
        assert!(judge_standalone("r:1", &parse_server_info("")).is_err());
    }

    #[test]
    fn masters_are_parsed_from_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,node-1 myself,master - 0 0 1 connected 0-5460
aaaa 127.0.0.1:30009@31009 master,fail - 0 0 1 disconnected
";
        assert_eq!(masters_from_cluster_nodes(text), ["127.0.0.1:30002", "127.0.0.1:30003", "127.0.0.1:30001"]);
    }
}
