//! The AuthRealm controller: watches AuthRealms and the objects they own, and reconciles each
//! realm into its keys Secret, JWKS ConfigMap, sidecar ConfigMap and status.
//!
//! This module wires the watches and holds the state the reconciles share ([`Context`]); the
//! reconcile itself is [`crate::reconcile`]. A reconcile is idempotent and derives everything from
//! what it reads: the keys Secret is the source of truth for key material, the rotation schedule
//! ([`crate::rotation`]) decides what is due, [`crate::keysync`] plans the writes, and every object
//! is written with server-side apply under one field manager ([`render::MANAGER`]). The Secret is
//! always written before anything that depends on it (JWKS, status), and conditionally on the
//! resourceVersion it was read at, so a crash at any point, or a stale second writer, can neither
//! lose nor fork the key set.
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt};

use crate::crd::AuthRealm;
use crate::events::{self, Publisher};
use crate::key_cache::KeyCache;
use crate::leader::Term;
use crate::metrics::Metrics;
use crate::owned::OwnedObjects;
use crate::recovery::Cached;
use crate::redis_monitor::{self, Monitor};
use crate::render;

pub use crate::error::Error;

/// A `keyRotation.propagationDelay` under this many seconds gets a Warning event: the kubelet
/// can take about a minute (its sync period plus its cache TTL) to update a mounted Secret or
/// ConfigMap in a running pod.
pub const PROPAGATION_WARNING_BELOW: i64 = 60;

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
    /// Events published as series (repeated failures of a realm update one Event).
    pub(crate) recorder: kube::runtime::events::Recorder,
    /// The leadership term the controller runs in.
    pub term: Term,
    /// The controller's view of the AuthRealms (its watch).
    pub(crate) realms: Store<AuthRealm>,
    /// Realm UID → the key set this replica last wrote.
    pub(crate) keys: KeyCache,
    /// Realm UID → consecutive failed reconciles (for the backoff).
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// Realm UID → the spec generation whose short propagation delay was warned about.
    pub(crate) delay_warned: Mutex<HashMap<String, i64>>,
    /// The realms' Secrets and ConfigMaps, read from the controller's watch.
    pub(crate) owned: OwnedObjects,
    /// Redis credentials and the shared Redis checks.
    pub(crate) redis: Arc<Monitor>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, metrics: Metrics, term: Term, stores: Stores) -> Self {
        let events = Publisher::new(client.clone(), &settings.identity);
        let recorder = events::recorder(client.clone(), &settings.identity);
        let keys = KeyCache::new(metrics.cached_key_sets.clone());
        let Stores { realms, secrets, config_maps, redis_secrets } = stores;
        Context {
            owned: OwnedObjects::new(client.clone(), secrets, config_maps),
            redis: Arc::new(Monitor::new(client.clone(), redis_secrets)),
            client,
            settings,
            metrics,
            events,
            recorder,
            term,
            realms,
            keys,
            failures: Mutex::new(HashMap::new()),
            delay_warned: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `cached` as the realm's key set, unless the controller's store no longer holds the
    /// live realm (deleted, or being deleted): then its keys are forgotten instead.
    pub(crate) fn remember_keys(&self, realm: &AuthRealm, cached: Cached) {
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

    pub(crate) fn forget_keys(&self, realm: &AuthRealm, why: &str) {
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

pub(crate) fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub use crate::cleanup::FINALIZER;
pub use crate::reconcile::{backoff, error_policy, reconcile};
pub use crate::redis_monitor::{REDIS_SECRET_LABEL, redis_secret_opted_in};

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
    let (redis_store, redis_secrets) = redis_monitor::watch_secrets(secrets);
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
