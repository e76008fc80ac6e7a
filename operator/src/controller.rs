//! The AuthRealm controller: watches AuthRealms and the objects they own, and reconciles each
//! realm into its keys Secret, JWKS ConfigMap, sidecar ConfigMap and status.
//!
//! A reconcile is idempotent and derives everything from what it reads: the keys Secret is the
//! source of truth for key material, the rotation schedule ([`crate::rotation`]) decides what is
//! due, and every object is written with server-side apply under one field manager
//! ([`MANAGER`]). The Secret is always written before anything that depends on it (JWKS, status),
//! and conditionally on the resourceVersion it was read at, so a crash at any point, or a stale
//! second writer, can neither lose nor fork the key set.
//!
//! At rest a realm costs nothing: its Secret and ConfigMaps are read from the controller's
//! watch ([`crate::owned`]), an object or status is written only when it differs from what is
//! there, and the periodic Redis check ([`crate::redis_monitor`]) is not a reconcile: it checks
//! each distinct Redis target once over a kept connection and wakes only the realms whose
//! `RedisReachable` changes. Reconciles are requeued only for the next rotation event.
//!
//! Under leader election the controller runs for one [`Term`]: its client refuses every write
//! once the term is over, and each keys Secret write is preceded by a re-read of the Lease
//! ([`crate::leader`] explains the rule). The in-memory copy of the key sets lives in
//! [`KeyCache`] for that term only, and forgets a realm as soon as it is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use authrealm_contract::keygen::{KeyError, generate, random_kid};
use authrealm_contract::{Alg, KeyEntry, KeySet, KeyState};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::conditions::{self, Cond, Status, reason};
use crate::crd::{AuthRealm, AuthRealmStatus, KeyStatus};
use crate::events::{self, Publisher, Severity};
use crate::key_cache::KeyCache;
use crate::leader::{Term, TermError};
use crate::metrics::{EventLabel, KindLabel, Metrics};
use crate::owned::{OwnedObjects, controlled_by};
use crate::recovery::{self, Cached, Incident, Recovery, RecoveryKind};
use crate::redis_check::{self, CheckError};
use crate::redis_monitor::{self, Monitor};
use crate::render::{self, MANAGER, Resolved};
use crate::rotation::{self, Change, Lifetimes, Removal};

/// Finalizer present only on realms that ask for their sessions to be purged on deletion.
pub const FINALIZER: &str = "authrealm.dev/purge-sessions";

/// A `keyRotation.propagationDelay` under this many seconds gets a Warning event: the kubelet
/// can take about a minute (its sync period plus its cache TTL) to update a mounted Secret or
/// ConfigMap in a running pod.
pub const PROPAGATION_WARNING_BELOW: i64 = 60;

/// One error enum for the controller: one variant per failed operation, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read {kind} {namespace}/{name}: {source}")]
    Read { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("failed to write {kind} {namespace}/{name}: {source}")]
    Write { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("failed to write the status of AuthRealm {namespace}/{name}: {source}")]
    Status { namespace: String, name: String, source: kube::Error },
    #[error("failed to update the finalizers of AuthRealm {namespace}/{name}: {source}")]
    Finalizer { namespace: String, name: String, source: kube::Error },
    #[error("failed to generate a key for AuthRealm {namespace}/{name}: {source}")]
    KeyGen { namespace: String, name: String, source: KeyError },
    #[error("refusing to write an invalid key set for AuthRealm {namespace}/{name}: {message}")]
    InvalidKeySet { namespace: String, name: String, message: String },
    #[error("failed to purge the sessions of AuthRealm {namespace}/{name}: {source}")]
    Purge { namespace: String, name: String, source: CheckError },
    #[error(
        "the AuthRealm CRD (authrealms.authrealm.dev) is not installed; install it with \
         `kubectl apply -f crds/authrealm.yaml` (or the Helm chart)"
    )]
    CrdMissing,
    #[error("failed to list AuthRealms: {0}")]
    List(#[source] kube::Error),
    #[error("AuthRealm {0} has no namespace")]
    NoNamespace(String),
    #[error(transparent)]
    NotLeader(#[from] TermError),
    #[error("failed to build the controller's Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::Status { .. } => "status",
            Error::Finalizer { .. } => "finalizer",
            Error::KeyGen { .. } => "keygen",
            Error::InvalidKeySet { .. } => "invalid_keyset",
            Error::Purge { .. } => "purge",
            Error::CrdMissing => "crd_missing",
            Error::List(_) => "list",
            Error::NoNamespace(_) => "no_namespace",
            Error::NotLeader(_) => "not_leader",
            Error::Client(_) => "client",
        }
    }
}

/// Controller settings (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    /// Realms reconciled at the same time.
    pub concurrency: u16,
    /// Longest time between two Redis checks of a realm.
    pub redis_check_interval: Duration,
    /// Longest time a deletion waits for the session purge before giving up.
    pub purge_timeout: Duration,
    /// This replica's identity (events' reportingInstance).
    pub identity: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: None,
            concurrency: 4,
            redis_check_interval: Duration::from_secs(60),
            purge_timeout: Duration::from_secs(300),
            identity: "authrealm-operator".into(),
        }
    }
}

/// Shared state of the reconciles. Created per leadership term, so the key-set copy never
/// outlives the period in which this replica was the only writer.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Metrics,
    pub events: Publisher,
    /// The leadership term the controller runs in.
    pub term: Term,
    /// The controller's view of the AuthRealms (its watch).
    realms: Store<AuthRealm>,
    /// Realm UID → the key set this replica last wrote.
    keys: KeyCache,
    /// Realm UID → consecutive failed reconciles (for the backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// Realm UID → the spec generation whose short propagation delay was warned about.
    delay_warned: Mutex<HashMap<String, i64>>,
    /// The realms' Secrets and ConfigMaps, read from the controller's watch.
    owned: OwnedObjects,
    /// Redis credentials and the shared Redis checks.
    redis: Arc<Monitor>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Metrics, term: Term, stores: Stores) -> Self {
        let events = Publisher::new(client.clone(), &settings.identity);
        let keys = KeyCache::new(metrics.cached_key_sets.clone());
        let Stores { realms, secrets, config_maps, redis_secrets } = stores;
        Context {
            owned: OwnedObjects::new(client.clone(), secrets, config_maps),
            redis: Arc::new(Monitor::new(client.clone(), redis_secrets)),
            client,
            settings,
            metrics,
            events,
            term,
            realms,
            keys,
            failures: Mutex::new(HashMap::new()),
            delay_warned: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `cached` as the realm's key set, unless the controller's store no longer holds the
    /// live realm (deleted, or being deleted): then its keys are forgotten instead.
    fn remember_keys(&self, realm: &AuthRealm, cached: Cached) {
        let uid = realm.uid().unwrap_or_default();
        self.keys.insert_if(&uid, cached, || {
            self.realms
                .get(&ObjectRef::from(realm))
                .is_some_and(|r| r.uid().as_deref() == Some(uid.as_str()) && r.metadata.deletion_timestamp.is_none())
        });
    }

    /// Forgets the keys of realms that are deleted or being deleted, as the controller's
    /// AuthRealm watch reports them.
    fn on_realm_event(&self, event: &watcher::Event<AuthRealm>) {
        match event {
            watcher::Event::Delete(r) => self.forget_keys(r, "deleted"),
            watcher::Event::Apply(r) | watcher::Event::InitApply(r) if r.metadata.deletion_timestamp.is_some() => {
                self.forget_keys(r, "being deleted")
            }
            // After a (re-)list the store holds exactly the realms that exist: drop the rest
            // (deleted while the watch was down).
            watcher::Event::InitDone => {
                let live: HashSet<String> = self
                    .realms
                    .state()
                    .iter()
                    .filter(|r| r.metadata.deletion_timestamp.is_none())
                    .filter_map(|r| r.uid())
                    .collect();
                self.keys.retain(|uid| live.contains(uid));
            }
            _ => {}
        }
    }

    fn forget_keys(&self, realm: &AuthRealm, why: &str) {
        self.owned.forget_realm(&realm.namespace().unwrap_or_default(), &realm.name_any());
        if let Some(uid) = realm.uid()
            && self.keys.remove(&uid)
        {
            tracing::info!(
                realm = %realm.name_any(),
                namespace = %realm.namespace().unwrap_or_default(),
                "realm {why}: forgot its keys"
            );
        }
    }
}

/// The watch caches the controller reads from.
pub struct Stores {
    pub realms: Store<AuthRealm>,
    /// Secrets labelled [`render::OWNED_SELECTOR`].
    pub secrets: Store<Secret>,
    /// ConfigMaps labelled [`render::OWNED_SELECTOR`].
    pub config_maps: Store<ConfigMap>,
    /// Secrets labelled [`redis_monitor::REDIS_SECRET_SELECTOR`].
    pub redis_secrets: Store<Secret>,
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn time(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn rfc3339(secs: i64) -> String {
    time(secs).0.to_string()
}

/// Reconciles one realm (the entry point given to the kube runtime).
pub async fn reconcile(realm: Arc<AuthRealm>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_realm(&realm, &ctx).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    let uid = realm.uid().unwrap_or_default();
    match &result {
        Ok(_) => {
            ctx.failures.lock().expect("lock").remove(&uid);
        }
        Err(e) => {
            ctx.metrics.errors.get_or_create(&KindLabel { kind: e.kind() }).inc();
        }
    }
    tracing::debug!(realm = %realm.name_any(), elapsed = ?started.elapsed(), ok = result.is_ok(), "reconciled");
    result
}

/// Exponential backoff per realm: 0.5 s, 1 s, 2 s … capped at 5 minutes.
pub fn error_policy(realm: Arc<AuthRealm>, err: &Error, ctx: Arc<Context>) -> Action {
    let uid = realm.uid().unwrap_or_default();
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(uid).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(
        realm = %realm.name_any(),
        namespace = %realm.namespace().unwrap_or_default(),
        kind = err.kind(),
        attempt = n,
        retry_in = ?delay,
        "reconcile failed: {err}"
    );
    Action::requeue(delay)
}

/// The delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << n.saturating_sub(1).min(20));
    Duration::from_millis(ms.min(300_000))
}

async fn reconcile_realm(realm: &AuthRealm, ctx: &Context) -> Result<Action, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<AuthRealm> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.term.check()?;

    if realm.metadata.deletion_timestamp.is_some() {
        return cleanup(realm, &api, ctx).await;
    }

    let resolved = match render::resolve(&name, &ns, &realm.spec) {
        Ok(r) => r,
        Err(e) => {
            // Keys, JWKS and config stay as they are; nothing rotates until the spec is fixed.
            let message = e.to_string();
            let old = realm.status.clone().unwrap_or_default();
            let was_invalid = conditions::find(&old.conditions, conditions::READY)
                .is_some_and(|c| c.reason == reason::INVALID_SPEC && c.message.ends_with(&message));
            if !was_invalid {
                ctx.events
                    .publish(realm, Severity::Warning, events::reason::INVALID_SPEC, "Validate", message.clone())
                    .await;
            }
            let keys = Cond::new(conditions::KEYS_READY, Status::False, reason::INVALID_SPEC, message.clone());
            let redis = conditions::find(&old.conditions, conditions::REDIS_REACHABLE)
                .map(|c| Cond {
                    type_: conditions::REDIS_REACHABLE,
                    status: if c.status == "True" { Status::True } else { Status::Unknown },
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                })
                .unwrap_or_else(|| {
                    Cond::new(
                        conditions::REDIS_REACHABLE,
                        Status::Unknown,
                        reason::INVALID_SPEC,
                        "not checked: invalid spec",
                    )
                });
            let intact = keep_or(
                &old,
                conditions::KEYS_INTACT,
                Cond::new(conditions::KEYS_INTACT, Status::Unknown, reason::INVALID_SPEC, "not checked: invalid spec"),
            );
            let status = AuthRealmStatus {
                observed_generation: realm.metadata.generation,
                conditions: build_conditions(&old, vec![keys, redis, intact], realm.metadata.generation),
                ..old
            };
            write_status_if_changed(realm, &api, &status).await?;
            tracing::warn!(realm = %name, namespace = %ns, "invalid spec: {message}");
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };

    warn_short_propagation_delay(realm, &resolved, ctx).await;

    let want_finalizer = resolved.redis.as_ref().is_some_and(|r| r.purge_on_delete);
    set_finalizer(&api, realm, want_finalizer).await?;

    // Never take over (and, through the owner reference, later garbage-collect) an object that
    // merely has the name of one of the realm's objects.
    let foreign = foreign_objects(realm, ctx).await?;
    if !foreign.is_empty() {
        let message = format!(
            "{} already exist(s) and {} not controlled by this AuthRealm (uid {}); the operator does not write \
             any of the realm's objects until they are deleted or renamed (or carry a controller ownerReference to \
             this AuthRealm)",
            foreign.join(", "),
            if foreign.len() == 1 { "is" } else { "are" },
            realm.uid().unwrap_or_default()
        );
        let old = realm.status.clone().unwrap_or_default();
        let repeated = conditions::find(&old.conditions, conditions::KEYS_READY)
            .is_some_and(|c| c.reason == reason::NAME_CONFLICT && c.message == message);
        if !repeated {
            ctx.events
                .publish(realm, Severity::Warning, events::reason::NAME_CONFLICT, "Reconcile", message.clone())
                .await;
        }
        let keys = Cond::new(conditions::KEYS_READY, Status::False, reason::NAME_CONFLICT, message.clone());
        let redis = keep_or(
            &old,
            conditions::REDIS_REACHABLE,
            Cond::new(
                conditions::REDIS_REACHABLE,
                Status::Unknown,
                reason::NAME_CONFLICT,
                "not checked: name conflict",
            ),
        );
        let intact = keep_or(
            &old,
            conditions::KEYS_INTACT,
            Cond::new(conditions::KEYS_INTACT, Status::Unknown, reason::NAME_CONFLICT, "not checked: name conflict"),
        );
        let status = AuthRealmStatus {
            observed_generation: realm.metadata.generation,
            conditions: build_conditions(&old, vec![keys, redis, intact], realm.metadata.generation),
            ..old
        };
        write_status_if_changed(realm, &api, &status).await?;
        tracing::warn!(realm = %name, namespace = %ns, "{message}");
        // A foreign object's deletion raises no watch event for this realm: look again soon.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }

    let now_ms = now_millis();
    let now = now_ms.div_euclid(1000);
    let keys = sync_keys(realm, &resolved, ctx, now).await?;

    // The sidecar config, written only when it differs from what is there.
    let cm_name = render::sidecar_config_name(&name);
    let cm = render::sidecar_config_map(realm, &resolved.config);
    let existing = ctx.owned.config_map(&ns, &cm_name).await.map_err(|source| Error::Read {
        kind: "ConfigMap",
        namespace: ns.clone(),
        name: cm_name.clone(),
        source,
    })?;
    if !existing.is_some_and(|e| e.data == cm.data && metadata_matches(&e.metadata, &cm.metadata)) {
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        let written =
            cms.patch(&cm_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm)).await.map_err(|source| {
                Error::Write { kind: "ConfigMap", namespace: ns.clone(), name: cm_name.clone(), source }
            })?;
        ctx.owned.wrote_config_map(&written);
    }

    // From a check no older than the check interval, shared with the realms naming the same
    // Redis (the periodic check keeps it fresh and wakes the realm when it changes).
    let redis = ctx.redis.condition(resolved.redis.as_ref(), &ns, ctx.settings.redis_check_interval).await;
    // External issuers' keys, probed on the same interval (shared between realms; see issuers.rs).
    let (specs, interval) = (&realm.spec.external_issuers, ctx.settings.redis_check_interval);
    let issuer_keys =
        crate::issuers::condition(&ctx.client, &ns, specs, &resolved.config.external_issuers, interval).await;
    let old = realm.status.clone().unwrap_or_default();

    // Events: key changes, recovery, Redis flips.
    publish_key_events(realm, ctx, &keys, &resolved).await;
    crate::issuers::publish_flip(realm, &ctx.events, &old.conditions, issuer_keys.as_ref()).await;
    let old_redis = conditions::find(&old.conditions, conditions::REDIS_REACHABLE);
    match (redis.status, old_redis) {
        (Status::False, o) if o.is_none_or(|o| o.status != "False" || o.reason != redis.reason) => {
            ctx.events
                .publish(
                    realm,
                    Severity::Warning,
                    events::reason::REDIS_UNREACHABLE,
                    "CheckRedis",
                    redis.message.clone(),
                )
                .await;
        }
        (Status::True, Some(o)) if o.status == "False" => {
            ctx.events
                .publish(realm, Severity::Normal, events::reason::REDIS_RECOVERED, "CheckRedis", redis.message.clone())
                .await;
        }
        _ => {}
    }

    let current = keys.set.current();
    let keys_ready = keys_ready_condition(&keys.set);
    // From the Secret's incident annotation (read fresh), not from the possibly stale status.
    let intact = match &keys.incident {
        Some(i) => {
            let reason = [reason::SECRET_RESTORED, reason::SECRET_EDIT_ADOPTED, reason::KEYS_LOST]
                .into_iter()
                .find(|r| *r == i.reason)
                .unwrap_or(reason::SECRET_RESTORED);
            Cond::new(conditions::KEYS_INTACT, Status::False, reason, i.message.clone())
        }
        None => Cond::new(
            conditions::KEYS_INTACT,
            Status::True,
            reason::VERIFIED,
            "the keys Secret holds what the operator wrote",
        ),
    };

    let status = AuthRealmStatus {
        observed_generation: realm.metadata.generation,
        conditions: build_conditions(
            &old,
            [keys_ready, redis.clone(), intact].into_iter().chain(issuer_keys.clone()).collect(),
            realm.metadata.generation,
        ),
        current_kid: current.map(|k| k.kid.clone()),
        next_rotation_time: keys.rotation_at.map(time),
        key_count: Some(keys.set.keys.len() as i32),
        keys: key_statuses(&keys.set, &keys.lifetimes, &resolved),
    };
    // Written only when it differs from the realm as the watch last delivered it: if that copy
    // is stale, the write it causes is a no-op on the server, and a status someone else changed
    // since arrives as a watch event and another reconcile.
    write_status_if_changed(realm, &api, &status).await?;

    // Requeue at the next rotation event (the Redis check has its own timer, `run_checks`).
    let next = keys.wake_at.map(|t| Duration::from_millis((t * 1000 - now_ms).max(0) as u64 + 50));
    let next = if issuer_keys.is_some() { Some(next.map_or(interval, |n| n.min(interval))) } else { next };
    Ok(Action::requeue(next.unwrap_or(Duration::from_secs(3600)).max(Duration::from_millis(100))))
}

/// A Warning event when `keyRotation.propagationDelay` is under [`PROPAGATION_WARNING_BELOW`],
/// once per spec generation: on its first reconcile (the status does not carry it yet), and not
/// again when that reconcile is retried.
async fn warn_short_propagation_delay(realm: &AuthRealm, resolved: &Resolved, ctx: &Context) {
    let delay = resolved.schedule.propagation;
    let generation = realm.metadata.generation.unwrap_or_default();
    let observed = realm.status.as_ref().and_then(|s| s.observed_generation);
    if delay >= PROPAGATION_WARNING_BELOW || observed == Some(generation) {
        return;
    }
    let uid = realm.uid().unwrap_or_default();
    if ctx.delay_warned.lock().expect("lock").insert(uid, generation) == Some(generation) {
        return;
    }
    let note = format!(
        "keyRotation.propagationDelay is {}: mounted Secrets and ConfigMaps can take up to about a \
         minute to reach running pods, so with a delay under {PROPAGATION_WARNING_BELOW}s a new key may sign \
         before every pod has it, and tokens it signs may be rejected",
        realm.spec.key_rotation.propagation_delay.0
    );
    ctx.events.publish(realm, Severity::Warning, events::reason::SHORT_PROPAGATION_DELAY, "Validate", note).await;
}

/// The realm's object names (`Secret ns/name`, …) taken by objects the realm does not control.
async fn foreign_objects(realm: &AuthRealm, ctx: &Context) -> Result<Vec<String>, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let uid = realm.uid().unwrap_or_default();
    let read_err = |kind: &'static str, n: &str| {
        let (ns, n) = (ns.clone(), n.to_owned());
        move |source| Error::Read { kind, namespace: ns, name: n, source }
    };
    let mut foreign = Vec::new();
    let secret_name = render::signing_keys_name(&name);
    if let Some(meta) = ctx.owned.secret_metadata(&ns, &secret_name).await.map_err(read_err("Secret", &secret_name))?
        && !controlled_by(&meta, &uid)
    {
        foreign.push(format!("Secret {ns}/{secret_name}"));
    }
    for cm_name in [render::jwks_name(&name), render::sidecar_config_name(&name)] {
        if let Some(meta) =
            ctx.owned.config_map_metadata(&ns, &cm_name).await.map_err(read_err("ConfigMap", &cm_name))?
            && !controlled_by(&meta, &uid)
        {
            foreign.push(format!("ConfigMap {ns}/{cm_name}"));
        }
    }
    Ok(foreign)
}

/// `KeysReady`: true only when the current key can actually sign (an asymmetric key needs its
/// private half, which issuer pods mount).
fn keys_ready_condition(set: &KeySet) -> Cond {
    let no_signer = |message: String| Cond::new(conditions::KEYS_READY, Status::False, reason::NO_SIGNING_KEY, message);
    match set.current() {
        Some(k) if k.alg.is_symmetric() || k.private_key_pem.is_some() => Cond::new(
            conditions::KEYS_READY,
            Status::True,
            reason::KEYS_CURRENT,
            format!("key {} ({}) signs; {} key(s) published", k.kid, k.alg, set.keys.len()),
        ),
        Some(k) => no_signer(format!("the current key {} has no private key: it cannot sign", k.kid)),
        None => match set.keys.iter().find(|k| k.state == KeyState::Next) {
            Some(n) => no_signer(format!(
                "no key signs yet: key {} ({}) is published and signs from {}",
                n.kid,
                n.alg,
                n.activated_at.map(rfc3339).unwrap_or_else(|| "its promotion".into())
            )),
            None => no_signer("no current key".into()),
        },
    }
}

/// The existing condition of `type_` as a [`Cond`], or `default`.
fn keep_or(old: &AuthRealmStatus, type_: &'static str, default: Cond) -> Cond {
    conditions::find(&old.conditions, type_)
        .map(|c| Cond {
            type_,
            status: match c.status.as_str() {
                "True" => Status::True,
                "False" => Status::False,
                _ => Status::Unknown,
            },
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .unwrap_or(default)
}

fn build_conditions(
    old: &AuthRealmStatus,
    mut conds: Vec<Cond>,
    generation: Option<i64>,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.insert(0, conditions::ready(&conds));
    conditions::merge(&old.conditions, &conds, generation, &Time(Timestamp::now()))
}

/// Writes the status unless the realm already has exactly this one.
async fn write_status_if_changed(
    realm: &AuthRealm,
    api: &Api<AuthRealm>,
    status: &AuthRealmStatus,
) -> Result<(), Error> {
    if realm.status.as_ref() == Some(status) {
        return Ok(());
    }
    write_status(api, &realm.name_any(), &realm.namespace().unwrap_or_default(), status).await
}

async fn write_status(api: &Api<AuthRealm>, name: &str, ns: &str, status: &AuthRealmStatus) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "authrealm.dev/v1alpha1",
        "kind": "AuthRealm",
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Status { namespace: ns.to_owned(), name: name.to_owned(), source })?;
    Ok(())
}

fn key_statuses(set: &KeySet, lifetimes: &Lifetimes, resolved: &Resolved) -> Vec<KeyStatus> {
    set.keys
        .iter()
        .map(|k| KeyStatus {
            kid: k.kid.clone(),
            algorithm: k.alg,
            state: match k.state {
                KeyState::Next => "next",
                KeyState::Current => "current",
                KeyState::Retired => "retired",
            }
            .to_owned(),
            created_at: time(k.created_at),
            activated_at: k.activated_at.map(time),
            retired_at: k.retired_at.map(time),
            remove_after: rotation::removal_time(k, lifetimes, &resolved.schedule).map(time),
        })
        .collect()
}

/// The key set after this reconcile.
struct KeySync {
    set: KeySet,
    lifetimes: Lifetimes,
    /// The last recovery, until the next promotion (drives `KeysIntact`).
    incident: Option<Incident>,
    changes: Vec<Change>,
    recovery: Option<Recovery>,
    wake_at: Option<i64>,
    rotation_at: Option<i64>,
}

fn new_key(alg: Alg, state: KeyState, now: i64) -> Result<KeyEntry, KeyError> {
    generate(alg, &random_kid(), now, state)
}

/// Reads the keys Secret (recovering from deletion or edits), runs the rotation schedule, and
/// writes the Secret (if anything changed) and then the JWKS ConfigMap.
async fn sync_keys(realm: &AuthRealm, resolved: &Resolved, ctx: &Context, now: i64) -> Result<KeySync, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let uid = realm.uid().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = render::signing_keys_name(&name);
    let jwks_name = render::jwks_name(&name);
    let read_err = |kind: &'static str, n: &str| {
        let (ns, n) = (ns.clone(), n.to_owned());
        move |source| Error::Read { kind, namespace: ns, name: n, source }
    };
    let secret = ctx.owned.secret(&ns, &secret_name).await.map_err(read_err("Secret", &secret_name))?;
    let jwks_cm = ctx.owned.config_map(&ns, &jwks_name).await.map_err(read_err("ConfigMap", &jwks_name))?;
    let published = jwks_cm
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(render::KEYSET_KEY).cloned())
        .and_then(|s| KeySet::from_json(s.as_bytes()).ok());
    let old = realm.status.clone().unwrap_or_default();
    let had_keys = old.current_kid.is_some()
        || old.key_count.unwrap_or(0) > 0
        || published.as_ref().is_some_and(|p| !p.keys.is_empty());

    let cached = ctx.keys.get(&uid);
    let state = recovery::classify(secret.as_ref());
    let trusted = matches!(state, recovery::SecretState::Trusted { .. });
    let decision = recovery::decide(state, cached.as_ref(), published.as_ref(), had_keys, now);
    if let Some(r) = &decision.recovery {
        tracing::warn!(realm = %name, namespace = %ns, kind = ?r.kind, "{}", r.message);
    }
    let mut set = decision.set;
    let mut lifetimes = decision.lifetimes;
    let mut started = Vec::new();
    if decision.publish_first
        && let Some(step) = rotation::publish_first(&set, &resolved.schedule, now)
    {
        started = rotation::apply(&mut set, &mut lifetimes, &[step], now, &mut new_key)
            .map_err(|source| Error::KeyGen { namespace: ns.clone(), name: name.clone(), source })?;
    }
    let republished = rotation::restart_unpublished(&mut set, published.as_ref(), now);
    if !republished.is_empty() {
        tracing::warn!(realm = %name, namespace = %ns, kids = ?republished, "next key(s) missing from the JWKS: publication clock restarted");
    }
    let mut outcome = rotation::converge(&mut set, &mut lifetimes, &resolved.schedule, now, &mut new_key)
        .map_err(|source| Error::KeyGen { namespace: ns.clone(), name: name.clone(), source })?;
    outcome.modified |= !republished.is_empty() || !started.is_empty();
    started.append(&mut outcome.changes);
    outcome.changes = started;
    set.validate().map_err(|e| Error::InvalidKeySet {
        namespace: ns.clone(),
        name: name.clone(),
        message: e.to_string(),
    })?;

    // The incident record: a new recovery replaces it, a promotion clears it.
    let promoted = outcome.changes.iter().any(|c| matches!(c, Change::Promoted { .. }));
    let previous_incident = if trusted { Incident::from_secret(secret.as_ref()) } else { None };
    let incident = match &decision.recovery {
        Some(r) => Some(Incident {
            reason: match r.kind {
                RecoveryKind::Restored => reason::SECRET_RESTORED,
                RecoveryKind::Adopted => reason::SECRET_EDIT_ADOPTED,
                RecoveryKind::Lost => reason::KEYS_LOST,
            }
            .to_owned(),
            message: format!("{} (at {}; cleared by the next key promotion)", r.message, rfc3339(now)),
        }),
        None if promoted => None,
        None => previous_incident.clone(),
    };
    let desired = render::signing_keys_secret(realm, &set, &lifetimes, incident.as_ref(), None);
    let write_err = |source| Error::Write { kind: "Secret", namespace: ns.clone(), name: secret_name.clone(), source };
    let write = match &secret {
        // Created by apply too (not POST), so that the field manager owns every field as Apply
        // and can later drop one (the incident annotation). Two creators at once would need two
        // leaders; updates below are conditional on the version read.
        None => Some(desired),
        Some(existing)
            if !trusted
                || outcome.modified
                || incident != previous_incident
                || !metadata_matches(&existing.metadata, &desired.metadata) =>
        {
            // Conditional on the version read: a concurrent writer makes this fail (409) and the
            // reconcile is retried from a fresh read.
            let mut desired = desired;
            desired.metadata.resource_version = existing.metadata.resource_version.clone();
            Some(desired)
        }
        Some(_) => None,
    };
    if let Some(desired) = write {
        // Key material is written only while the Lease still names this term's holder.
        ctx.term.verify_lease(&ctx.client).await?;
        let written = secrets
            .patch(&secret_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired))
            .await
            .map_err(write_err)?;
        ctx.owned.wrote_secret(&written);
    }
    ctx.remember_keys(realm, Cached { set: set.clone(), lifetimes: lifetimes.clone() });
    for c in &outcome.changes {
        tracing::info!(realm = %name, namespace = %ns, change = ?c, "key set changed");
    }

    let jwks = render::jwks_config_map(realm, &set);
    let jwks_current =
        jwks_cm.as_ref().is_some_and(|cm| cm.data == jwks.data && metadata_matches(&cm.metadata, &jwks.metadata));
    if !jwks_current {
        let written = cms.patch(&jwks_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&jwks)).await.map_err(
            |source| Error::Write { kind: "ConfigMap", namespace: ns.clone(), name: jwks_name.clone(), source },
        )?;
        ctx.owned.wrote_config_map(&written);
    }
    Ok(KeySync {
        set,
        lifetimes,
        incident,
        changes: outcome.changes,
        recovery: decision.recovery,
        wake_at: outcome.wake_at,
        rotation_at: outcome.rotation_at,
    })
}

/// True when `have` carries every label, annotation and owner reference of `want`.
fn metadata_matches(
    have: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    want: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> bool {
    let subset = |h: &Option<std::collections::BTreeMap<String, String>>,
                  w: &Option<std::collections::BTreeMap<String, String>>| {
        w.iter().flatten().all(|(k, v)| h.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_ok = want
        .owner_references
        .iter()
        .flatten()
        .all(|w| have.owner_references.iter().flatten().any(|h| h.uid == w.uid && h.controller == w.controller));
    subset(&have.labels, &want.labels) && subset(&have.annotations, &want.annotations) && owners_ok
}

async fn publish_key_events(realm: &AuthRealm, ctx: &Context, keys: &KeySync, resolved: &Resolved) {
    if let Some(r) = &keys.recovery {
        let (reason, label) = match r.kind {
            RecoveryKind::Restored => (events::reason::KEYS_SECRET_RESTORED, "restored"),
            RecoveryKind::Adopted => (events::reason::KEYS_SECRET_ADOPTED, "adopted"),
            RecoveryKind::Lost => (events::reason::SIGNING_KEYS_LOST, "lost"),
        };
        ctx.metrics.key_events.get_or_create(&EventLabel { event: label }).inc();
        ctx.events.publish(realm, Severity::Warning, reason, "RecoverKeys", r.message.clone()).await;
    }
    for c in &keys.changes {
        let (reason, label, action, note) = match c {
            Change::Created { kid, alg, state, activate_at } => (
                events::reason::KEY_CREATED,
                "created",
                "CreateKey",
                match state {
                    KeyState::Current => format!("created key {kid} ({alg}); it signs from now"),
                    _ => format!(
                        "created key {kid} ({alg}) as next; published now, it signs from {}",
                        rfc3339(*activate_at)
                    ),
                },
            ),
            Change::Promoted { kid } => {
                (events::reason::KEY_PROMOTED, "promoted", "PromoteKey", format!("key {kid} now signs new tokens"))
            }
            Change::Retired { kid } => {
                let until = keys
                    .set
                    .get(kid)
                    .and_then(|k| rotation::removal_time(k, &keys.lifetimes, &resolved.schedule))
                    .map(rfc3339)
                    .unwrap_or_default();
                (
                    events::reason::KEY_RETIRED,
                    "retired",
                    "RetireKey",
                    format!("key {kid} no longer signs; it stays published until {until}"),
                )
            }
            Change::Removed { kid, reason } => (
                events::reason::KEY_REMOVED,
                "removed",
                "RemoveKey",
                match reason {
                    Removal::Expired => format!("key {kid} removed: every token it can have signed has expired"),
                    Removal::Superseded => format!("key {kid} removed before it signed anything (superseded)"),
                },
            ),
        };
        ctx.metrics.key_events.get_or_create(&EventLabel { event: label }).inc();
        ctx.events.publish(realm, Severity::Normal, reason, action, note).await;
    }
}

pub use crate::redis_monitor::{REDIS_SECRET_LABEL, redis_secret_opted_in};

async fn set_finalizer(api: &Api<AuthRealm>, realm: &AuthRealm, want: bool) -> Result<(), Error> {
    let has = realm.finalizers().iter().any(|f| f == FINALIZER);
    if has == want {
        return Ok(());
    }
    let mut finalizers: Vec<String> = realm.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if want {
        finalizers.push(FINALIZER.to_owned());
    }
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": realm.resource_version()}});
    api.patch(&realm.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|source| {
        Error::Finalizer { namespace: realm.namespace().unwrap_or_default(), name: realm.name_any(), source }
    })?;
    Ok(())
}

/// Deletion: purge the realm's session records if asked, then let it go. Owned objects are
/// removed by the garbage collector through their owner references.
async fn cleanup(realm: &AuthRealm, api: &Api<AuthRealm>, ctx: &Context) -> Result<Action, Error> {
    ctx.forget_keys(realm, "being deleted");
    if !realm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let target = render::resolve(&name, &ns, &realm.spec).ok().and_then(|r| r.redis).filter(|r| r.purge_on_delete);
    if let Some(target) = target {
        ctx.term.check()?;
        let result = async {
            let c = ctx.redis.connect_params(&target, &ns).await?;
            redis_check::purge_realm(&c, &target.key_prefix, &name).await
        }
        .await;
        match result {
            Ok(n) => {
                ctx.events
                    .publish(
                        realm,
                        Severity::Normal,
                        events::reason::SESSIONS_PURGED,
                        "PurgeSessions",
                        format!("deleted {n} Redis key(s) of the realm"),
                    )
                    .await;
            }
            Err(e) => {
                let deleting_since = realm.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
                let waited = Duration::from_secs((now_millis() / 1000 - deleting_since).max(0) as u64);
                if waited < ctx.settings.purge_timeout {
                    return Err(Error::Purge { namespace: ns, name, source: e });
                }
                ctx.events
                    .publish(
                        realm,
                        Severity::Warning,
                        events::reason::PURGE_FAILED,
                        "PurgeSessions",
                        format!("gave up purging the realm's sessions after {waited:?}: {e}"),
                    )
                    .await;
            }
        }
    }
    set_finalizer(api, realm, false).await?;
    Ok(Action::await_change())
}

/// Fails with [`Error::CrdMissing`] when the AuthRealm CRD is not installed.
pub async fn check_crd(realms: &Api<AuthRealm>) -> Result<(), Error> {
    match realms.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::CrdMissing),
        Err(e) => Err(Error::List(e)),
    }
}

/// Runs the controller without leader election until `shutdown` resolves (then finishes
/// in-flight reconciles).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    run_in_term(client, settings, metrics, Term::unbounded(), shutdown).await
}

/// Runs the controller for one leadership term until `shutdown` resolves (then finishes
/// in-flight reconciles). `client` should refuse writes once the term is over
/// ([`crate::leader::fenced_client`]). The key-set copies are dropped when it returns.
pub async fn run_in_term(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    term: Term,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let (realms, secrets, cms): (Api<AuthRealm>, Api<Secret>, Api<ConfigMap>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
    };
    check_crd(&realms).await?;
    let concurrency = settings.concurrency;
    let check_interval = settings.redis_check_interval;
    let (store, writer) = reflector::store();
    // The realms' own Secrets and ConfigMaps (label-selected, without managedFields): read by
    // the reconciles instead of the API server, and a change to one wakes its realm.
    let (secret_store, secret_writer) = reflector::store();
    let (cm_store, cm_writer) = reflector::store();
    let owned = watcher::Config::default().labels(render::OWNED_SELECTOR);
    let owned_secrets = reflector::reflector(
        secret_writer,
        watcher(secrets.clone(), owned.clone()).default_backoff().modify(|s: &mut Secret| {
            s.managed_fields_mut().clear();
        }),
    )
    .touched_objects();
    let owned_cms = reflector::reflector(
        cm_writer,
        watcher(cms, owned).default_backoff().modify(|cm: &mut ConfigMap| {
            cm.managed_fields_mut().clear();
        }),
    )
    .touched_objects();
    // The Secrets opted in for Redis connections: read by the Redis checks.
    let (redis_store, redis_writer) = reflector::store();
    let redis_secrets = tokio::spawn(
        reflector::reflector(
            redis_writer,
            watcher(secrets, watcher::Config::default().labels(redis_monitor::REDIS_SECRET_SELECTOR))
                .default_backoff()
                .modify(|s: &mut Secret| {
                    s.managed_fields_mut().clear();
                }),
        )
        .for_each(|_| std::future::ready(())),
    );
    let stores =
        Stores { realms: store.clone(), secrets: secret_store, config_maps: cm_store, redis_secrets: redis_store };
    let ctx = Arc::new(Context::new(client, settings, metrics, term, stores));
    // What `Controller::new` does, plus a look at each event (the store already updated) so
    // that deleted realms' keys are forgotten.
    let events_ctx = Arc::downgrade(&ctx);
    let realm_events = reflector::reflector(writer, watcher(realms, watcher::Config::default()))
        .inspect(move |ev| {
            if let (Ok(ev), Some(ctx)) = (ev, events_ctx.upgrade()) {
                ctx.on_realm_event(ev);
            }
        })
        .applied_objects();
    // The periodic Redis check, which wakes only the realms whose condition changes.
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel();
    let checks = tokio::spawn(redis_monitor::run_checks(store.clone(), ctx.redis.clone(), check_interval, wake_tx));
    let woken = futures_util::stream::poll_fn(move |cx| wake_rx.poll_recv(cx));
    tracing::info!("controller started");
    Controller::for_stream(realm_events, store)
        .owns_stream(owned_secrets)
        .owns_stream(owned_cms)
        .reconcile_on(woken)
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("controller: {e}");
            }
        })
        .await;
    checks.abort();
    redis_secrets.abort();
    ctx.keys.clear();
    tracing::info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ready_only_when_the_current_key_can_sign() {
        let signing = generate(Alg::ES256, "a", 100, KeyState::Current).unwrap();
        let set = |keys: Vec<KeyEntry>| KeySet { keys, ..KeySet::empty() };
        let c = keys_ready_condition(&set(vec![signing.clone()]));
        assert_eq!((c.status, c.reason.as_str()), (Status::True, reason::KEYS_CURRENT));
        // The public half only (copied from the JWKS): it cannot sign.
        let public = set(vec![signing.clone()]).public_only();
        let c = keys_ready_condition(&public);
        assert_eq!((c.status, c.reason.as_str()), (Status::False, reason::NO_SIGNING_KEY));
        assert!(c.message.contains("no private key"), "{}", c.message);
        // Waiting for a published next key to sign.
        let next = KeyEntry { activated_at: Some(220), ..generate(Alg::ES256, "b", 100, KeyState::Next).unwrap() };
        let c = keys_ready_condition(&set(vec![next]));
        assert_eq!(c.status, Status::False);
        assert!(c.message.contains("key b (ES256) is published and signs from 1970-01-01T00:03:40Z"), "{}", c.message);
        // HMAC keys carry their secret.
        let hmac = generate(Alg::HS256, "h", 100, KeyState::Current).unwrap();
        assert_eq!(keys_ready_condition(&set(vec![hmac])).status, Status::True);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
