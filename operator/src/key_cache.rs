//! The controller's in-memory copy of each realm's key set (private keys included), used to
//! restore a deleted or edited keys Secret (see [`crate::recovery`]).
//!
//! Private keys should live in memory no longer than needed, so the copy is held:
//!
//! * per realm UID, only while the realm exists: an entry goes when the realm gets a deletion
//!   timestamp or is deleted (the controller's AuthRealm watch reports it, and a re-list prunes
//!   entries of realms deleted while the watch was down), and an entry is only added while the
//!   controller's store still holds the live realm (checked under the same lock, so a reconcile
//!   that finishes after the deletion was seen cannot bring a copy back);
//! * only for one leadership term: the controller's context owns the cache, and it is emptied
//!   when the controller stops (leadership lost, shutdown).
//!
//! The gauge `authrealm_operator_cached_key_sets` counts the realms whose keys are held. Private
//! key material (PEM, HMAC secrets) of every dropped copy is overwritten with zeros (`Drop for
//! Cached`).

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;

use crate::recovery::Cached;

/// Realm UID → the key set the operator last wrote for it.
pub struct KeyCache {
    entries: Mutex<HashMap<String, Cached>>,
    gauge: Gauge,
}

impl KeyCache {
    /// An empty cache counted by `gauge` (which other caches may share: it is moved by deltas).
    pub fn new(gauge: Gauge) -> Self {
        KeyCache { entries: Mutex::new(HashMap::new()), gauge }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, uid: &str) -> Option<Cached> {
        self.lock().get(uid).cloned()
    }

    /// Stores `cached` for `uid` if `live()` — evaluated under the cache's lock — says the realm
    /// still exists. Returns whether it was stored.
    pub fn insert_if(&self, uid: &str, cached: Cached, live: impl FnOnce() -> bool) -> bool {
        let mut entries = self.lock();
        if uid.is_empty() || !live() {
            if entries.remove(uid).is_some() {
                self.gauge.dec();
            }
            return false;
        }
        if entries.insert(uid.to_owned(), cached).is_none() {
            self.gauge.inc();
        }
        true
    }

    /// Forgets one realm's keys.
    pub fn remove(&self, uid: &str) -> bool {
        let removed = self.lock().remove(uid).is_some();
        if removed {
            self.gauge.dec();
        }
        removed
    }

    /// Keeps only the realms for which `keep(uid)` is true.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|uid, _| keep(uid));
        self.gauge.dec_by((before - entries.len()) as i64);
    }

    /// Forgets everything.
    pub fn clear(&self) {
        let mut entries = self.lock();
        self.gauge.dec_by(entries.len() as i64);
        entries.clear();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyCache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keygen::generate;
    use authrealm_contract::{Alg, KeySet, KeyState};

    fn cached() -> Cached {
        let key = generate(Alg::ES256, "k", 100, KeyState::Current).unwrap();
        Cached { set: KeySet { keys: vec![key], ..KeySet::empty() }, lifetimes: Default::default() }
    }

    #[test]
    fn the_gauge_counts_the_realms_held() {
        let gauge = Gauge::default();
        let cache = KeyCache::new(gauge.clone());
        assert!(cache.insert_if("a", cached(), || true));
        assert!(cache.insert_if("a", cached(), || true), "replacing does not count twice");
        assert!(cache.insert_if("b", cached(), || true));
        assert!(cache.insert_if("c", cached(), || true));
        assert_eq!((cache.len(), gauge.get()), (3, 3));
        assert!(!cache.insert_if("d", cached(), || false), "a realm that is gone is not cached");
        assert!(!cache.insert_if("c", cached(), || false), "nor kept");
        assert_eq!((cache.len(), gauge.get()), (2, 2));
        assert!(cache.get("a").is_some_and(|c| c.set.keys[0].private_key_pem.is_some()));
        assert!(cache.remove("a"));
        assert!(!cache.remove("a"));
        assert_eq!(gauge.get(), 1);
        cache.insert_if("e", cached(), || true);
        cache.retain(|uid| uid == "e");
        assert_eq!((cache.len(), gauge.get()), (1, 1));
        // Two caches (two terms) on one gauge, the first one dropped.
        let second = KeyCache::new(gauge.clone());
        second.insert_if("x", cached(), || true);
        assert_eq!(gauge.get(), 2);
        drop(cache);
        assert_eq!(gauge.get(), 1);
        second.clear();
        assert_eq!((second.len(), gauge.get()), (0, 0));
    }
}
