//! The objects a realm owns (keys Secret, JWKS and sidecar ConfigMaps): reading them from the
//! operator's watch instead of the API server, and deciding which objects the realm controls.
//!
//! The controller watches the Secrets and ConfigMaps labelled [`crate::render::OWNED_SELECTOR`]
//! (the watch that also wakes a realm when one of its objects changes) and keeps them in
//! reflector stores. A read uses the store's copy when it can be trusted, and reads the API
//! server otherwise:
//!
//! | store has the object | freshest version the controller knows (its last write or live read) | read from |
//! |---|---|---|
//! | yes | none this term | the store |
//! | yes | the store's version | the store |
//! | yes | another version (the watch lags behind a write, or someone else wrote since) | the API server |
//! | no (never labelled, deleted, label removed, watch not synced) | any | the API server |
//!
//! So a reconcile right after the controller's own write never acts on the copy from before it
//! (which would look like a deleted or edited keys Secret), an object that exists without the
//! label is still seen (name conflicts, a label removed by hand), and a realm at rest is
//! reconciled without any request. Keys Secret writes stay conditional on the version read, so
//! a store copy older than a third party's write makes the write fail and the reconcile retry.
//!
//! An object the ownership check has just found absent on the API server (a new realm) is not
//! read again within [`ABSENT_FRESH`]: the reconcile that checked goes on to create it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

use crate::render;

/// True when `meta` has a controller owner reference to the realm with `uid`.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    !uid.is_empty() && meta.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Where a read should come from (the table in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Store,
    ApiServer,
}

/// The decision of the table in the module docs: `stored` is the store copy's resourceVersion
/// (`None`: the store has no such object), `known` the freshest version the controller saw.
pub fn read_from(stored: Option<&str>, known: Option<&str>) -> Source {
    match (stored, known) {
        (Some(_), None) => Source::Store,
        (Some(s), Some(k)) if s == k => Source::Store,
        _ => Source::ApiServer,
    }
}

/// How long an object found absent by [`OwnedObjects::secret_metadata`] or
/// [`OwnedObjects::config_map_metadata`] counts as absent for the next read of it.
pub const ABSENT_FRESH: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Secret,
    ConfigMap,
}

/// The stores of the realms' owned objects and the freshest version seen of each.
pub struct OwnedObjects {
    client: Client,
    secrets: Store<Secret>,
    config_maps: Store<ConfigMap>,
    /// (kind, namespace, name) → resourceVersion of the controller's last write or live read.
    known: Mutex<HashMap<(Kind, String, String), String>>,
    /// (kind, namespace, name) → when the API server last answered that it does not exist.
    absent: Mutex<HashMap<(Kind, String, String), Instant>>,
}

fn ready<K: Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

impl OwnedObjects {
    pub fn new(client: Client, secrets: Store<Secret>, config_maps: Store<ConfigMap>) -> Self {
        OwnedObjects {
            client,
            secrets,
            config_maps,
            known: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
        }
    }

    pub async fn secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.read(&self.secrets, Kind::Secret, ns, name).await
    }

    pub async fn config_map(&self, ns: &str, name: &str) -> Result<Option<ConfigMap>, kube::Error> {
        self.read(&self.config_maps, Kind::ConfigMap, ns, name).await
    }

    /// The metadata of a Secret of that name (labelled or not), for the ownership check: from
    /// the store when it has one, else from the API server (metadata only: a foreign Secret's
    /// data is none of the operator's business).
    pub async fn secret_metadata(&self, ns: &str, name: &str) -> Result<Option<ObjectMeta>, kube::Error> {
        self.metadata(&self.secrets, Kind::Secret, ns, name).await
    }

    pub async fn config_map_metadata(&self, ns: &str, name: &str) -> Result<Option<ObjectMeta>, kube::Error> {
        self.metadata(&self.config_maps, Kind::ConfigMap, ns, name).await
    }

    /// Records the version the API server answered a write of a Secret with.
    pub fn wrote_secret(&self, s: &Secret) {
        self.record(Kind::Secret, s);
    }

    /// Records the version the API server answered a write of a ConfigMap with.
    pub fn wrote_config_map(&self, cm: &ConfigMap) {
        self.record(Kind::ConfigMap, cm);
    }

    /// Forgets what was known about a realm's objects (the realm is gone).
    pub fn forget_realm(&self, ns: &str, realm: &str) {
        let keys = [
            (Kind::Secret, ns.to_owned(), render::signing_keys_name(realm)),
            (Kind::ConfigMap, ns.to_owned(), render::jwks_name(realm)),
            (Kind::ConfigMap, ns.to_owned(), render::sidecar_config_name(realm)),
        ];
        let (mut known, mut absent) = (self.known.lock().expect("lock"), self.absent.lock().expect("lock"));
        for k in &keys {
            known.remove(k);
            absent.remove(k);
        }
    }

    fn record<K: Resource>(&self, kind: Kind, obj: &K) {
        let key = (kind, obj.namespace().unwrap_or_default(), obj.name_any());
        self.absent.lock().expect("lock").remove(&key);
        let mut known = self.known.lock().expect("lock");
        match obj.resource_version() {
            Some(rv) => {
                known.insert(key, rv);
            }
            None => {
                known.remove(&key);
            }
        }
    }

    async fn read<K>(&self, store: &Store<K>, kind: Kind, ns: &str, name: &str) -> Result<Option<K>, kube::Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug + 'static,
    {
        let key = (kind, ns.to_owned(), name.to_owned());
        let stored = if ready(store) { store.get(&ObjectRef::new(name).within(ns)) } else { None };
        let known = self.known.lock().expect("lock").get(&key).cloned();
        if let Some(obj) = &stored
            && read_from(obj.resource_version().as_deref(), known.as_deref()) == Source::Store
        {
            return Ok(Some(K::clone(obj)));
        }
        let checked_absent = self.absent.lock().expect("lock").remove(&key);
        if stored.is_none() && checked_absent.is_some_and(|at| at.elapsed() <= ABSENT_FRESH) {
            return Ok(None);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let obj = api.get_opt(name).await?;
        match &obj {
            Some(o) => self.record(kind, o),
            None => {
                self.known.lock().expect("lock").remove(&key);
            }
        }
        Ok(obj)
    }

    async fn metadata<K>(
        &self,
        store: &Store<K>,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<ObjectMeta>, kube::Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug + 'static,
    {
        if ready(store)
            && let Some(obj) = store.get(&ObjectRef::new(name).within(ns))
        {
            return Ok(Some(obj.meta().clone()));
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let meta = api.get_metadata_opt(name).await?.map(|m| m.metadata);
        if meta.is_none() {
            self.absent.lock().expect("lock").insert((kind, ns.to_owned(), name.to_owned()), Instant::now());
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_come_from_the_store_only_when_it_has_the_freshest_version_known() {
        let cases = [
            ("at rest", Some("7"), Some("7"), Source::Store),
            ("not written or read this term", Some("7"), None, Source::Store),
            ("the watch lags behind our write", Some("7"), Some("9"), Source::ApiServer),
            ("someone else wrote since", Some("11"), Some("9"), Source::ApiServer),
            ("not in the store (unlabelled, deleted, not synced)", None, Some("9"), Source::ApiServer),
            ("not in the store, never seen", None, None, Source::ApiServer),
        ];
        for (what, stored, known, want) in cases {
            assert_eq!(read_from(stored, known), want, "{what}");
        }
    }

    #[test]
    fn only_objects_controlled_by_the_realm_are_written() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let owner = |uid: &str, controller: Option<bool>| OwnerReference {
            api_version: "authrealm.dev/v1alpha1".into(),
            kind: "AuthRealm".into(),
            name: "demo".into(),
            uid: uid.into(),
            controller,
            ..Default::default()
        };
        let meta = |refs: Vec<OwnerReference>| ObjectMeta { owner_references: Some(refs), ..Default::default() };
        assert!(controlled_by(&meta(vec![owner("u1", Some(true))]), "u1"));
        assert!(!controlled_by(&ObjectMeta::default(), "u1"), "no owner: someone else's object");
        assert!(!controlled_by(&meta(vec![owner("u0", Some(true))]), "u1"), "a previous realm of that name");
        assert!(!controlled_by(&meta(vec![owner("u1", None)]), "u1"), "an owner but not the controller");
        assert!(!controlled_by(&meta(vec![owner("", Some(true))]), ""), "a realm without uid owns nothing");
    }
}
