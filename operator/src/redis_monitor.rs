//! `RedisReachable` for every realm at a cost that does not grow with the number of realms.
//!
//! * The realm's Redis credentials and CA are read from a watch of the Secrets that opted in
//!   with [`REDIS_SECRET_LABEL`] (a live read only when the watch does not have the Secret, to
//!   say precisely why it cannot be used).
//! * Realms naming the same endpoints, credentials, TLS settings and timeout share one [`Pool`]
//!   entry: one check at a time over one kept connection, whose result every such realm uses.
//!   An entry (and its connection) is dropped once no realm names it.
//! * [`run_checks`] is the periodic check: every interval it checks each entry in use once and
//!   asks for a reconcile only of the realms whose condition would change
//!   ([`condition_changed`]). It reads and writes nothing on the API server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use sha2::{Digest as _, Sha256};

use authrealm_contract::RedisMode;

use crate::conditions::{self, Cond, Status, reason};
use crate::crd::AuthRealm;
use crate::redis_check::{self, CheckError, Connect, Kept};
use crate::render::{self, RedisTarget};

/// The label a Secret must carry before the operator reads it for a realm's Redis connection
/// (credentials or CA). Whoever may write an AuthRealm chooses `redis.endpoints`; without this
/// opt-in they could make the operator, which can read every Secret, send any Secret of the
/// namespace to an endpoint of their choosing.
pub const REDIS_SECRET_LABEL: &str = "authrealm.dev/redis-credentials";

/// The label selector of the operator's watch of Redis Secrets.
pub const REDIS_SECRET_SELECTOR: &str = "authrealm.dev/redis-credentials=true";

/// Longest a single check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks of different targets run at the same time during a periodic round.
const ROUND_CONCURRENCY: usize = 8;

/// True when the Secret opted in to be used for Redis connections.
pub fn redis_secret_opted_in(s: &Secret) -> bool {
    s.metadata.labels.as_ref().and_then(|l| l.get(REDIS_SECRET_LABEL)).is_some_and(|v| v == "true")
}

/// Watches the Secrets of `secrets` labelled [`REDIS_SECRET_SELECTOR`] (without their
/// managedFields) into a store, on a task the caller aborts when the controller stops.
pub fn watch_secrets(secrets: Api<Secret>) -> (Store<Secret>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(REDIS_SECRET_SELECTOR);
    let task = tokio::spawn(
        reflector::reflector(
            writer,
            watcher(secrets, config).default_backoff().modify(|s: &mut Secret| {
                s.managed_fields_mut().clear();
            }),
        )
        .for_each(|_| std::future::ready(())),
    );
    (store, task)
}

/// The Redis side of the controller: the opted-in Secrets and the shared checks.
pub struct Monitor {
    client: Client,
    /// Secrets labelled [`REDIS_SECRET_SELECTOR`] (the operator's watch of them).
    secrets: Store<Secret>,
    pub pool: Pool,
}

impl Monitor {
    pub fn new(client: Client, secrets: Store<Secret>) -> Self {
        Monitor { client, secrets, pool: Pool::default() }
    }

    /// The opted-in Secret `ns/name`, from the watch; read live only when the watch does not
    /// have it (not labelled, missing, or the watch not synced yet), to say why.
    async fn secret(&self, ns: &str, name: &str, what: &str) -> Result<Arc<Secret>, CheckError> {
        let ready = self.secrets.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok());
        if ready
            && let Some(s) = self.secrets.get(&ObjectRef::new(name).within(ns))
            && redis_secret_opted_in(&s)
        {
            return Ok(s);
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let s = secrets
            .get_opt(name)
            .await
            .map_err(|e| CheckError::Credentials(format!("cannot read Secret {ns}/{name}: {e}")))?
            .ok_or_else(|| CheckError::Credentials(format!("Secret {ns}/{name} not found")))?;
        if !redis_secret_opted_in(&s) {
            return Err(CheckError::NotLabelled(format!(
                "Secret {ns}/{name} ({what}) is not labelled {REDIS_SECRET_LABEL}=true, so the operator does not \
                 use it; if it is meant for this realm's Redis, label it: kubectl -n {ns} label secret {name} \
                 {REDIS_SECRET_LABEL}=true"
            )));
        }
        Ok(Arc::new(s))
    }

    /// Everything needed to connect to a realm's Redis: the target and the credentials and CA
    /// of the realm's namespace. Only Secrets labelled [`REDIS_SECRET_LABEL`]`=true` are used.
    pub async fn connect_params(&self, target: &RedisTarget, ns: &str) -> Result<Connect, CheckError> {
        let value = |s: &Secret, key: &str| -> Option<String> {
            s.data.as_ref()?.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        let (mut username, mut password) = (None, None);
        if let Some(c) = &target.credentials {
            let s = self.secret(ns, &c.secret_name, "redis.credentials").await?;
            password = Some(value(&s, &c.password_key).ok_or_else(|| {
                CheckError::Credentials(format!("Secret {ns}/{} has no key {:?}", c.secret_name, c.password_key))
            })?);
            if let Some(uk) = &c.username_key {
                username = Some(value(&s, uk).ok_or_else(|| {
                    CheckError::Credentials(format!("Secret {ns}/{} has no key {uk:?}", c.secret_name))
                })?);
            }
        }
        let tls =
            match &target.tls {
                None => None,
                Some(t) => match &t.ca_secret {
                    None => Some(None),
                    Some(r) => {
                        let s = self.secret(ns, &r.name, "redis.tls.caSecret").await.map_err(|e| match e {
                            e @ CheckError::NotLabelled(_) => e,
                            e => CheckError::Tls(e.to_string()),
                        })?;
                        let pem =
                            s.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone()).ok_or_else(|| {
                                CheckError::Tls(format!("Secret {ns}/{} has no key {:?}", r.name, r.key))
                            })?;
                        Some(Some(pem))
                    }
                },
            };
        Ok(Connect {
            mode: target.mode,
            endpoints: target.endpoints.clone(),
            username,
            password,
            tls,
            timeout: Duration::from_millis(target.connect_timeout_ms.clamp(200, 5000)),
        })
    }

    /// The realm's `RedisReachable` from a check no older than `max_age` (run now if there is
    /// none).
    pub async fn condition(&self, target: Option<&RedisTarget>, ns: &str, max_age: Duration) -> Cond {
        let Some(target) = target else {
            return Cond::new(
                conditions::REDIS_REACHABLE,
                Status::True,
                reason::NOT_REQUIRED,
                "sessionMode is stateless: Redis is not used",
            );
        };
        let result = match self.connect_params(target, ns).await {
            Ok(c) => self.pool.check(&c, max_age).await,
            Err(e) => Err(e),
        };
        cond_from(target.mode, result)
    }
}

/// The condition for a check result.
pub fn cond_from(mode: RedisMode, result: Result<String, CheckError>) -> Cond {
    let ok = match mode {
        RedisMode::Cluster => reason::CLUSTER_OK,
        RedisMode::Standalone => reason::STANDALONE_OK,
    };
    match result {
        Ok(message) => Cond::new(conditions::REDIS_REACHABLE, Status::True, ok, message),
        Err(e) => Cond::new(conditions::REDIS_REACHABLE, Status::False, e.reason(), e.to_string()),
    }
}

/// True when `new` differs from the realm's current `RedisReachable` condition in anything the
/// status shows (status, reason or message): only then does a check cause a status write.
pub fn condition_changed(old: Option<&Condition>, new: &Cond) -> bool {
    old.is_none_or(|o| o.status != new.status.as_str() || o.reason != new.reason || o.message != new.message)
}

/// The pool key: a digest of everything that makes two checks different (so the map holds no
/// password in clear as a key, and a changed password is a new entry with a new connection).
pub fn pool_key(c: &Connect) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(match c.mode {
        RedisMode::Cluster => &b"\0cluster"[..],
        RedisMode::Standalone => &b"\0standalone"[..],
    });
    field(&(c.endpoints.len() as u64).to_be_bytes());
    for e in &c.endpoints {
        field(e.as_bytes());
    }
    for o in [&c.username, &c.password] {
        match o {
            None => field(b"\0none"),
            Some(s) => field(s.as_bytes()),
        }
    }
    match &c.tls {
        None => field(b"\0plain"),
        Some(None) => field(b"\0tls-system-roots"),
        Some(Some(ca)) => field(ca),
    }
    field(&(c.timeout.as_millis() as u64).to_be_bytes());
    h.finalize().into()
}

/// Shared checks over kept connections, one entry per [`pool_key`].
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<Entry>>>>,
}

#[derive(Default)]
struct Entry {
    kept: Option<Kept>,
    last: Option<(Instant, Result<String, CheckError>)>,
}

impl Pool {
    /// The result of a check of `c` no older than `max_age`: the last one, or a new one over the
    /// entry's kept connection. Concurrent callers for the same target wait for one check.
    pub async fn check(&self, c: &Connect, max_age: Duration) -> Result<String, CheckError> {
        let entry = self.entries.lock().expect("lock").entry(pool_key(c)).or_default().clone();
        let mut entry = entry.lock().await;
        if let Some((at, r)) = &entry.last
            && at.elapsed() <= max_age
        {
            return r.clone();
        }
        let Entry { kept, last } = &mut *entry;
        let r = match tokio::time::timeout(CHECK_TIMEOUT, redis_check::check_kept(c, kept)).await {
            Ok(r) => r,
            Err(_) => {
                *kept = None;
                Err(CheckError::Unreachable(format!("the Redis check took longer than {CHECK_TIMEOUT:?}")))
            }
        };
        *last = Some((Instant::now(), r.clone()));
        r
    }

    /// Drops the entries (closing their connections) whose key is not in `used`.
    pub fn retain(&self, used: &HashSet<[u8; 32]>) {
        self.entries.lock().expect("lock").retain(|k, _| used.contains(k));
    }

    /// Entries (targets) currently held.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The periodic Redis check: every `interval`, one check per distinct target in use (a result
/// younger than half the interval, e.g. from a reconcile, is reused), and a reconcile request on
/// `wake` for each realm whose `RedisReachable` would change. Entries no realm names any more
/// are dropped. Runs until `wake` is closed.
pub async fn run_checks(
    realms: Store<AuthRealm>,
    monitor: Arc<Monitor>,
    interval: Duration,
    wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<AuthRealm>>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !wake.is_closed() {
        tick.tick().await;
        if realms.wait_until_ready().now_or_never().is_none() {
            continue;
        }
        // Realm → its target's key, or the reason it has none.
        let mut groups: HashMap<[u8; 32], (Connect, Vec<Arc<AuthRealm>>)> = HashMap::new();
        let mut verdicts: Vec<(Arc<AuthRealm>, Cond)> = Vec::new();
        for realm in realms.state() {
            if realm.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (name, ns) = (realm.name_any(), realm.namespace().unwrap_or_default());
            let Ok(resolved) = render::resolve(&name, &ns, &realm.spec) else { continue };
            let Some(target) = &resolved.redis else { continue };
            match monitor.connect_params(target, &ns).await {
                Ok(c) => groups.entry(pool_key(&c)).or_insert_with(|| (c, Vec::new())).1.push(realm),
                Err(e) => verdicts.push((realm, cond_from(target.mode, Err(e)))),
            }
        }
        monitor.pool.retain(&groups.keys().copied().collect());
        let monitor = &monitor;
        let checked: Vec<_> = futures_util::stream::iter(groups.into_values())
            .map(|(c, realms)| async move {
                let cond = cond_from(c.mode, monitor.pool.check(&c, interval / 2).await);
                realms.into_iter().map(move |r| (r, cond.clone()))
            })
            .buffer_unordered(ROUND_CONCURRENCY)
            .collect()
            .await;
        verdicts.extend(checked.into_iter().flatten());
        let mut woken = 0usize;
        for (realm, cond) in verdicts {
            let old = realm.status.as_ref().and_then(|s| conditions::find(&s.conditions, conditions::REDIS_REACHABLE));
            if condition_changed(old, &cond) {
                woken += 1;
                if wake.send(ObjectRef::from_obj(&*realm)).is_err() {
                    return;
                }
            }
        }
        tracing::debug!(targets = monitor.pool.len(), woken, "periodic Redis check");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn connect(endpoints: &[&str], password: Option<&str>, tls: Option<Option<&[u8]>>) -> Connect {
        Connect {
            mode: RedisMode::Cluster,
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            username: None,
            password: password.map(str::to_owned),
            tls: tls.map(|t| t.map(<[u8]>::to_vec)),
            timeout: Duration::from_millis(500),
        }
    }

    #[test]
    fn only_secrets_labelled_for_redis_are_used() {
        let secret = |labels: &[(&str, &str)]| Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                ..Default::default()
            },
            ..Secret::default()
        };
        assert!(redis_secret_opted_in(&secret(&[(REDIS_SECRET_LABEL, "true")])));
        assert!(!redis_secret_opted_in(&secret(&[])));
        assert!(!redis_secret_opted_in(&secret(&[(REDIS_SECRET_LABEL, "false")])));
        assert!(!redis_secret_opted_in(&secret(&[(REDIS_SECRET_LABEL, "True")])));
        assert!(!redis_secret_opted_in(&Secret::default()));
    }

    #[test]
    fn realms_share_a_pool_entry_only_when_everything_that_reaches_redis_is_equal() {
        let base = connect(&["127.0.0.1:7000", "127.0.0.1:7001"], Some("pw"), None);
        let cases: Vec<(&str, Connect, bool)> = vec![
            ("identical", base.clone(), true),
            ("another password", connect(&["127.0.0.1:7000", "127.0.0.1:7001"], Some("pw2"), None), false),
            ("no password", connect(&["127.0.0.1:7000", "127.0.0.1:7001"], None, None), false),
            ("other seeds", connect(&["127.0.0.1:7000"], Some("pw"), None), false),
            ("seeds reordered", connect(&["127.0.0.1:7001", "127.0.0.1:7000"], Some("pw"), None), false),
            ("tls", connect(&["127.0.0.1:7000", "127.0.0.1:7001"], Some("pw"), Some(None)), false),
            ("tls with a CA", connect(&["127.0.0.1:7000", "127.0.0.1:7001"], Some("pw"), Some(Some(b"ca"))), false),
            ("username", Connect { username: Some("u".into()), ..base.clone() }, false),
            ("timeout", Connect { timeout: Duration::from_secs(1), ..base.clone() }, false),
            ("standalone", Connect { mode: RedisMode::Standalone, ..base.clone() }, false),
            // Fields are length-prefixed: moving bytes between fields is another key.
            ("shifted bytes", connect(&["127.0.0.1:7000", "127.0.0.1:7001p"], Some("w"), None), false),
        ];
        for (what, c, same) in cases {
            assert_eq!(pool_key(&c) == pool_key(&base), same, "{what}");
        }
    }

    #[test]
    fn a_check_changes_the_status_only_when_its_result_does() {
        let cond = |status: &str, reason: &str, message: &str| Condition {
            type_: conditions::REDIS_REACHABLE.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        };
        let ok = cond_from(RedisMode::Cluster, Ok("a:1: cluster_state ok".into()));
        let down = cond_from(RedisMode::Cluster, Err(CheckError::Unreachable("a:1: refused".into())));
        assert_eq!(cond_from(RedisMode::Standalone, Ok("a:1: standalone".into())).reason, "StandaloneOk");
        let cases = [
            ("same result", Some(cond("True", "ClusterOk", "a:1: cluster_state ok")), &ok, false),
            ("no condition yet", None, &ok, true),
            ("recovered", Some(cond("False", "Unreachable", "a:1: refused")), &ok, true),
            ("went down", Some(cond("True", "ClusterOk", "a:1: cluster_state ok")), &down, true),
            ("still down, same reason", Some(cond("False", "Unreachable", "a:1: refused")), &down, false),
            ("other seed answered", Some(cond("True", "ClusterOk", "b:1: cluster_state ok")), &ok, true),
            ("unknown before", Some(cond("Unknown", "InvalidSpec", "not checked")), &ok, true),
        ];
        for (what, old, new, changed) in cases {
            assert_eq!(condition_changed(old.as_ref(), new), changed, "{what}");
        }
    }
}
