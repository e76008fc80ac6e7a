//! Where an admission's facts come from — the labels of the Pod's Namespace and the AuthRealm
//! the Pod names — and when the webhook's watch caches are trusted with them.
//!
//! Every replica serves the webhook, leader or not, so the webhook keeps two watches of its
//! own (the controller's exist only while a replica leads): every AuthRealm (without
//! managedFields, the last-applied annotation and the per-key status, which the injector does
//! not read) and the metadata of every Namespace (labels only). The rule, in
//! [`super::review`]:
//!
//! | the caches | the decision from the cached facts | the answer |
//! |---|---|---|
//! | not listed yet (start-up) | — | read through: both facts from the API server (`unsynced`) |
//! | listed | inject, or a silent skip (already injected) | final (`cache`) |
//! | listed | anything else: a refusal, or admitting the Pod without the sidecar | confirmed: both facts read again from the API server and decided again (`confirm`) |
//!
//! (`…`: the `source` label of `authrealm_operator_webhook_lookups_total`.)
//!
//! So a cache that lags behind the API server — a realm created or turned `KeysReady` a moment
//! ago, a namespace whose opt-out label was just removed — never refuses a Pod and never admits
//! one unprotected; the price is two reads on the rare admission that is refused or skipped. What
//! a lagging cache can do is inject where a fresh read would not have: into a Pod whose realm was
//! deleted, or whose namespace was labelled `authrealm.dev/injection=disabled`, within the
//! watch's lag (milliseconds; the API server applies the webhook's `namespaceSelector` from its
//! own watch, with the same lag). Such a Pod gets a sidecar — more protection, never less; with
//! its realm gone it does not start, as it would not had the realm been deleted just after its
//! admission. A broken watch keeps its last state and resumes from its resourceVersion (or lists
//! again) once the API server answers; until the first list the webhook reads through rather
//! than refuse Pods, because the API server it would otherwise depend on is the same.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::metrics::WebhookMetrics;
use crate::crd::AuthRealm;

/// How long one live read (Namespace, AuthRealm) may take before the Pod is refused.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);

/// Annotation `kubectl apply` (client-side) leaves on objects: a copy of the whole object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The facts of one admission.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Labels of the Pod's Namespace (empty when it has none, or does not exist).
    pub namespace_labels: BTreeMap<String, String>,
    /// The AuthRealm the Pod names; `None`: no such realm (or its name is not valid, so it was
    /// not looked up).
    pub realm: Option<Arc<AuthRealm>>,
}

/// A live read that failed: what could not be read, and why.
#[derive(Clone, Debug)]
pub struct LookupError {
    pub what: String,
    pub error: String,
}

/// Where the facts of an admission came from (the metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The watch caches, and the decision was final.
    Cache,
    /// The API server: the caches had not listed yet.
    Unsynced,
    /// The API server, after the cached facts gave a refusal or a skip.
    Confirm,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Unsynced => "unsynced",
            Source::Confirm => "confirm",
        }
    }
}

/// The webhook's watch caches of AuthRealms and Namespaces, and live reads.
#[derive(Clone)]
pub struct Lookups {
    client: Client,
    realms: Store<AuthRealm>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    /// True once both caches have listed. Kept here rather than asked of the stores: a store's
    /// readiness future wakes only the last task that polled it, so two waiters (the start-up
    /// wait and anyone else) could miss it.
    synced: watch::Receiver<bool>,
}

fn listed<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

/// Which of the two caches have listed; `synced` turns true (and the gauge 1) once both have.
struct Listed {
    realms: AtomicBool,
    namespaces: AtomicBool,
    synced: watch::Sender<bool>,
    metrics: WebhookMetrics,
}

impl Listed {
    fn mark(&self, which: &AtomicBool) {
        which.store(true, Ordering::SeqCst);
        if self.realms.load(Ordering::SeqCst) && self.namespaces.load(Ordering::SeqCst) && !*self.synced.borrow() {
            self.metrics.cache_synced.set(1);
            self.synced.send_replace(true);
        }
    }
}

/// Drives one reflector until `stop` fires: `on_listed` after each complete list (the store
/// then holds it), watch failures logged (the watcher retries with backoff and resumes where it
/// stopped).
fn spawn_watch<S, K>(
    what: &'static str,
    stream: S,
    on_listed: impl Fn() + Send + 'static,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Some(Ok(watcher::Event::InitDone)) => on_listed(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "the webhook's {what} watch failed; retrying"),
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    })
}

impl Lookups {
    /// Starts the two watches (cluster-wide: pods of any namespace may name a realm), on tasks
    /// that end when `stop` turns true; `metrics.cache_synced` turns 1 once both have listed.
    pub fn start(
        client: Client,
        metrics: WebhookMetrics,
        stop: watch::Receiver<bool>,
    ) -> (Lookups, Vec<JoinHandle<()>>) {
        let (realms, realm_writer) = reflector::store();
        let realm_watch = reflector::reflector(
            realm_writer,
            watcher(Api::<AuthRealm>::all(client.clone()), watcher::Config::default()).default_backoff().modify(
                |r: &mut AuthRealm| {
                    r.managed_fields_mut().clear();
                    r.annotations_mut().remove(LAST_APPLIED);
                    if let Some(status) = r.status.as_mut() {
                        status.keys = Vec::new();
                    }
                },
            ),
        );
        let (namespaces, ns_writer) = reflector::store();
        let ns_watch = reflector::reflector(
            ns_writer,
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(|n: &mut PartialObjectMeta<Namespace>| {
                    n.managed_fields_mut().clear();
                    n.annotations_mut().clear();
                }),
        );
        let (synced_tx, synced) = watch::channel(false);
        let listed = Arc::new(Listed {
            realms: AtomicBool::new(false),
            namespaces: AtomicBool::new(false),
            synced: synced_tx,
            metrics,
        });
        let (l1, l2) = (listed.clone(), listed);
        let tasks = vec![
            spawn_watch("AuthRealm", realm_watch, move || l1.mark(&l1.realms), stop.clone()),
            spawn_watch("Namespace", ns_watch, move || l2.mark(&l2.namespaces), stop),
        ];
        (Lookups { client, realms, namespaces, synced }, tasks)
    }

    /// Lookups on caches fed by the caller (tests: a cache that lags behind the API server);
    /// listed if both stores had listed when given.
    pub fn with_stores(
        client: Client,
        realms: Store<AuthRealm>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
    ) -> Lookups {
        let (synced_tx, synced) = watch::channel(listed(&realms) && listed(&namespaces));
        // The receiver alone keeps the value; nothing changes it.
        drop(synced_tx);
        Lookups { client, realms, namespaces, synced }
    }

    /// Both caches have listed.
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until both caches have listed, at most `limit`; true if they have.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut synced = self.synced.clone();
        matches!(tokio::time::timeout(limit, synced.wait_for(|s| *s)).await, Ok(Ok(_)))
    }

    /// The facts from the caches; `None` while they have not listed. `realm`: the name to look
    /// up (a valid AuthRealm name), or `None`.
    pub fn cached(&self, ns: &str, realm: Option<&str>) -> Option<Facts> {
        if !self.synced() {
            return None;
        }
        let namespace_labels = self.namespaces.get(&ObjectRef::new(ns)).map(|n| n.labels().clone()).unwrap_or_default();
        let realm = realm.and_then(|name| self.realms.get(&ObjectRef::new(name).within(ns)));
        Some(Facts { namespace_labels, realm })
    }

    /// The facts from the API server (both reads in parallel, each bounded by
    /// [`LOOKUP_TIMEOUT`]).
    pub async fn live(&self, ns: &str, realm: Option<&str>) -> Result<Facts, LookupError> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let realms: Api<AuthRealm> = Api::namespaced(self.client.clone(), ns);
        let (ns_res, realm_res) = tokio::join!(tokio::time::timeout(LOOKUP_TIMEOUT, namespaces.get_opt(ns)), async {
            match realm {
                Some(name) => tokio::time::timeout(LOOKUP_TIMEOUT, realms.get_opt(name)).await,
                None => Ok(Ok(None)),
            }
        });
        let failed = |what: String, error: String| LookupError { what, error };
        let namespace_labels = match ns_res {
            Ok(Ok(n)) => n.and_then(|n| n.metadata.labels).unwrap_or_default(),
            Ok(Err(e)) => return Err(failed(format!("Namespace {ns}"), e.to_string())),
            Err(_) => return Err(failed(format!("Namespace {ns}"), "timed out".into())),
        };
        let name = realm.unwrap_or_default();
        let realm = match realm_res {
            Ok(Ok(r)) => r.map(Arc::new),
            Ok(Err(e)) => return Err(failed(format!("AuthRealm {ns}/{name}"), e.to_string())),
            Err(_) => return Err(failed(format!("AuthRealm {ns}/{name}"), "timed out".into())),
        };
        Ok(Facts { namespace_labels, realm })
    }
}
