//! The loaded key set and its hot reload.
//!
//! The key-set file is a mounted Secret or ConfigMap: Kubernetes replaces it by swapping a
//! symlink, so the reloader polls the file's bytes instead of relying on inotify. A new set
//! is parsed and every key checked before it replaces the old one in a single atomic swap;
//! a broken file never replaces a working set (the error is logged and counted) so no
//! request fails because of a reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use authrealm_contract::keygen::{check_key, signing_key, verifying_key};
use authrealm_contract::{Alg, KeySet, KeyState};
use jsonwebtoken::EncodingKey;
use sha2::{Digest, Sha256};

use crate::verifier::VerifyKey;

/// One usable key.
pub struct LoadedKey {
    pub kid: String,
    pub alg: Alg,
    pub state: KeyState,
    /// Verifies signatures of `alg` only; parsed once when the set is loaded.
    pub verify: VerifyKey,
    pub sign: Option<EncodingKey>,
}

/// An immutable snapshot of the realm's keys.
pub struct KeyRing {
    pub keys: Vec<LoadedKey>,
    /// Index into `keys` of the current key, when it carries signing material.
    signer: Option<usize>,
    /// `/.well-known/jwks.json`, rendered once per reload.
    pub jwks_json: bytes::Bytes,
    /// SHA-256 of the file the ring was built from.
    pub digest: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("cannot read key-set file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key-set file {path}: {source}")]
    Invalid { path: PathBuf, source: authrealm_contract::keyset::KeySetError },
    #[error("key-set file {path}: {source}")]
    Material { path: PathBuf, source: authrealm_contract::keygen::KeyError },
    #[error("key-set file {path} holds no keys")]
    Empty { path: PathBuf },
}

impl KeyRing {
    pub fn from_set(set: &KeySet, digest: [u8; 32]) -> Result<KeyRing, authrealm_contract::keygen::KeyError> {
        let mut keys = Vec::with_capacity(set.keys.len());
        let mut signer = None;
        for k in &set.keys {
            check_key(k)?;
            let sign = signing_key(k)?;
            if k.state == KeyState::Current && sign.is_some() {
                signer = Some(keys.len());
            }
            let verify = VerifyKey::new(&verifying_key(k)?, &[k.alg]);
            keys.push(LoadedKey { kid: k.kid.clone(), alg: k.alg, state: k.state, verify, sign });
        }
        let jwks_json = bytes::Bytes::from(serde_json::to_vec(&set.jwks()).expect("jwks serialises"));
        Ok(KeyRing { keys, signer, jwks_json, digest })
    }

    pub fn get(&self, kid: &str) -> Option<&LoadedKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key that signs minted tokens (None on verify-only sidecars).
    pub fn signer(&self) -> Option<&LoadedKey> {
        self.signer.map(|i| &self.keys[i])
    }

    pub fn current_kid(&self) -> Option<&str> {
        self.keys.iter().find(|k| k.state == KeyState::Current).map(|k| k.kid.as_str())
    }

    pub fn algorithms(&self) -> Vec<Alg> {
        let mut algs: Vec<Alg> = self.keys.iter().map(|k| k.alg).collect();
        algs.sort();
        algs.dedup();
        algs
    }
}

/// Read, parse and check a key-set file.
pub fn load_file(path: &Path) -> Result<KeyRing, KeyLoadError> {
    let bytes = std::fs::read(path).map_err(|source| KeyLoadError::Read { path: path.into(), source })?;
    ring_from_bytes(path, &bytes)
}

fn ring_from_bytes(path: &Path, bytes: &[u8]) -> Result<KeyRing, KeyLoadError> {
    let set = KeySet::from_json(bytes).map_err(|source| KeyLoadError::Invalid { path: path.into(), source })?;
    if set.keys.is_empty() {
        return Err(KeyLoadError::Empty { path: path.into() });
    }
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    KeyRing::from_set(&set, digest).map_err(|source| KeyLoadError::Material { path: path.into(), source })
}

/// The live key ring, swapped atomically on reload.
#[derive(Clone)]
pub struct KeyStore {
    ring: Arc<ArcSwap<KeyRing>>,
    path: PathBuf,
}

impl KeyStore {
    pub fn load(path: &Path) -> Result<KeyStore, KeyLoadError> {
        let ring = load_file(path)?;
        Ok(KeyStore { ring: Arc::new(ArcSwap::from_pointee(ring)), path: path.into() })
    }

    pub fn ring(&self) -> arc_swap::Guard<Arc<KeyRing>> {
        self.ring.load()
    }

    /// Check the file once; returns Ok(true) when a new ring was installed.
    pub fn reload_if_changed(&self) -> Result<bool, KeyLoadError> {
        let bytes =
            std::fs::read(&self.path).map_err(|source| KeyLoadError::Read { path: self.path.clone(), source })?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest == self.ring.load().digest {
            return Ok(false);
        }
        let ring = ring_from_bytes(&self.path, &bytes)?;
        self.ring.store(Arc::new(ring));
        Ok(true)
    }

    /// Poll the file every `interval` until the process ends.
    pub fn spawn_reloader(&self, interval: Duration, metrics: crate::metrics::Metrics) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            loop {
                tick.tick().await;
                let s = store.clone();
                let result = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
                match result {
                    Ok(Ok(true)) => {
                        last_error = None;
                        metrics.key_reloads.get_or_create(&crate::metrics::OutcomeLabel::new("ok")).inc();
                        let ring = store.ring();
                        tracing::info!(
                            keys = ring.keys.len(),
                            current_kid = ring.current_kid().unwrap_or("-"),
                            "key set reloaded"
                        );
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        metrics.key_reloads.get_or_create(&crate::metrics::OutcomeLabel::new("error")).inc();
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(&msg) {
                            tracing::error!(error = %msg, "key set reload failed; keeping the previous keys");
                            last_error = Some(msg);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "key reload task failed"),
                }
            }
        });
    }
}
