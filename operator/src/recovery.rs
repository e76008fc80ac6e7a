//! What the operator does when the keys Secret is not what it wrote — pure decisions, no I/O.
//!
//! The Secret `<realm>-signing-keys` is the only copy of the private keys. The operator writes
//! it together with an annotation holding the SHA-256 of its `keyset.json`, keeps a copy of
//! what it last wrote in memory (per realm UID, for as long as it is the leader), and publishes
//! the public halves in the `<realm>-jwks` ConfigMap. On every reconcile:
//!
//! | Secret                                    | operator's copy | outcome                                                                |
//! |-------------------------------------------|-----------------|------------------------------------------------------------------------|
//! | present, digest matches                   | any             | trusted as is (an edit that also fixes the digest counts as deliberate) |
//! | deleted, or edited (digest mismatch)      | yes             | **restored** verbatim from the copy (`SecretRestored`)                  |
//! | edited, valid, consistent with the JWKS   | no              | **adopted**; keys missing from it but still in the JWKS are kept as retired, public-only (`SecretEditAdopted`) |
//! | deleted, or edited and unusable           | no, realm had keys | **keys lost**: every key still in the JWKS is kept as retired, public-only, so live tokens keep verifying until they expire; a new key signs at once (`KeysLost`) |
//! | missing                                   | no, realm never had keys | first key set is created                                       |
//!
//! Whatever set is continued from (except the operator's own copy), an asymmetric `current` or
//! `next` key without `privateKeyPem` cannot sign: e.g. someone "repaired" a deleted Secret by
//! copying the public `keyset.json` of the JWKS ConfigMap. Issuer pods would answer
//! `403 verify_only` until the next rotation. Such keys are kept as **retired, public-only** keys
//! (retired now, so tokens they signed keep verifying until they expire), and when no signing key
//! is left the decision asks for a new chain ([`Decision::publish_first`]): a new key is published
//! as `next` and signs after the propagation delay, like any other key (see
//! [`crate::rotation::publish_first`] for why it is not promoted at once).
//!
//! The operator never replaces a key under an existing kid and never drops a public key that
//! can still have live tokens. Every recovery raises a Warning event and sets `KeysIntact`
//! to False until the next key promotion.

use authrealm_contract::keygen::check_key;
use authrealm_contract::{KeyEntry, KeySet, KeyState};
use k8s_openapi::api::core::v1::Secret;

pub use crate::keys_secret::Incident;
use crate::keys_secret::{self, KEYSET_KEY};
use crate::rotation::Lifetimes;

/// The keys Secret as read from the API server.
#[derive(Clone, Debug, PartialEq)]
pub enum SecretState {
    Missing,
    /// Data matches the digest annotation.
    Trusted {
        set: KeySet,
        lifetimes: Lifetimes,
    },
    /// Anything else; `parsed` is the data if it is a structurally valid key set whose every key
    /// checks out.
    Edited {
        parsed: Option<KeySet>,
        lifetimes: Lifetimes,
        problem: String,
    },
}

/// What the operator last wrote for a realm (see [`crate::key_cache`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Cached {
    pub set: KeySet,
    pub lifetimes: Lifetimes,
}

/// Private key material of a dropped copy is overwritten with zeros.
impl Drop for Cached {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for k in &mut self.set.keys {
            if let Some(pem) = k.private_key_pem.as_mut() {
                pem.zeroize();
            }
            if let Some(secret) = k.secret.as_mut() {
                secret.zeroize();
            }
        }
    }
}

/// Kinds of recovery (the `KeysIntact` reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryKind {
    Restored,
    Adopted,
    Lost,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    pub kind: RecoveryKind,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub set: KeySet,
    pub lifetimes: Lifetimes,
    pub recovery: Option<Recovery>,
    /// Keys that were meant to sign could not (no private material) and were retired, and no
    /// key of the set signs now: start a new chain with a `next` key.
    pub publish_first: bool,
}

/// Turns every asymmetric `current` or `next` key without private material into a retired,
/// public-only key, retired `now` (a key that was current may have signed until now). Returns
/// their kids.
pub fn retire_unsignable(set: &mut KeySet, now: i64) -> Vec<String> {
    let mut retired = Vec::new();
    for k in set.keys.iter_mut() {
        if k.state != KeyState::Retired && !k.alg.is_symmetric() && k.private_key_pem.is_none() {
            k.state = KeyState::Retired;
            k.retired_at = Some(now);
            retired.push(k.kid.clone());
        }
    }
    retired
}

fn unsignable_note(kids: &[String]) -> String {
    format!(
        "; key(s) {} had no private key and could not sign, so they were kept as retired, public-only keys \
         (their tokens verify until they expire); a new key is published now and signs after the propagation \
         delay (issuer pods cannot mint until then)",
        kids.join(", ")
    )
}

/// Classifies the Secret's content.
pub fn classify(secret: Option<&Secret>) -> SecretState {
    let Some(secret) = secret else { return SecretState::Missing };
    let keys_secret::Decoded { keyset, digest_ok, lifetimes } = keys_secret::decode(secret);
    let Some(bytes) = keyset else {
        return SecretState::Edited { parsed: None, lifetimes, problem: format!("it has no {KEYSET_KEY}") };
    };
    let parsed = KeySet::from_json(&bytes);
    match (digest_ok, parsed) {
        (true, Ok(set)) => SecretState::Trusted { set, lifetimes },
        (_, Err(e)) => {
            SecretState::Edited { parsed: None, lifetimes, problem: format!("its {KEYSET_KEY} is unusable: {e}") }
        }
        (false, Ok(set)) => {
            let problem = "its content does not match the digest the operator wrote".to_owned();
            match set.keys.iter().find_map(|k| check_key(k).err()) {
                Some(e) => SecretState::Edited { parsed: None, lifetimes, problem: format!("{problem}, and {e}") },
                None => SecretState::Edited { parsed: Some(set), lifetimes, problem },
            }
        }
    }
}

/// Chooses the key set to continue from. `published` is the public key set from the JWKS
/// ConfigMap (read before it is rewritten); `had_keys` is true when the realm is known to have
/// had keys before (status or JWKS say so).
pub fn decide(
    state: SecretState,
    cache: Option<&Cached>,
    published: Option<&KeySet>,
    had_keys: bool,
    now: i64,
) -> Decision {
    let (problem, parsed, lifetimes) = match state {
        SecretState::Trusted { mut set, lifetimes } => {
            // The operator never writes a signing key without its private half: a deliberate
            // edit (digest fixed by hand).
            let unsignable = retire_unsignable(&mut set, now);
            if unsignable.is_empty() {
                return Decision { set, lifetimes, recovery: None, publish_first: false };
            }
            let publish_first = set.current().is_none();
            return Decision {
                set,
                lifetimes,
                recovery: Some(Recovery {
                    kind: RecoveryKind::Adopted,
                    message: format!("the keys Secret was edited{}", unsignable_note(&unsignable)),
                }),
                publish_first,
            };
        }
        SecretState::Missing => ("was deleted".to_owned(), None, Lifetimes::new()),
        SecretState::Edited { parsed, lifetimes, problem } => (format!("was edited: {problem}"), parsed, lifetimes),
    };
    if let Some(c) = cache {
        return Decision {
            set: c.set.clone(),
            lifetimes: c.lifetimes.clone(),
            recovery: Some(Recovery {
                kind: RecoveryKind::Restored,
                message: format!(
                    "the keys Secret {problem}; restored the operator's copy ({} keys, current {})",
                    c.set.keys.len(),
                    c.set.current().map_or("none", |k| k.kid.as_str())
                ),
            }),
            publish_first: false,
        };
    }
    if let Some(mut set) = parsed {
        if let Some(conflict) = conflicting_kid(&set, published) {
            return lost(
                &format!(
                    "{problem}; key {conflict} in it differs from the published key of that kid, so it was not adopted"
                ),
                published,
                now,
            );
        }
        let restored = keep_published(&mut set, published, now);
        let unsignable = retire_unsignable(&mut set, now);
        let publish_first = !unsignable.is_empty() && set.current().is_none();
        return Decision {
            set,
            lifetimes,
            recovery: Some(Recovery {
                kind: RecoveryKind::Adopted,
                message: format!(
                    "the keys Secret {problem}; the operator had no copy, so the edited key set was adopted{}{}",
                    if restored > 0 {
                        format!(" and {restored} published key(s) missing from it were kept as retired")
                    } else {
                        String::new()
                    },
                    if unsignable.is_empty() { String::new() } else { unsignable_note(&unsignable) }
                ),
            }),
            publish_first,
        };
    }
    let published_keys = published.map_or(0, |p| p.keys.len());
    if !had_keys && published_keys == 0 {
        return Decision { set: KeySet::empty(), lifetimes: Lifetimes::new(), recovery: None, publish_first: false };
    }
    lost(&problem, published, now)
}

/// A kid present in both sets whose public key differs.
fn conflicting_kid(set: &KeySet, published: Option<&KeySet>) -> Option<String> {
    let published = published?;
    set.keys.iter().find_map(|k| {
        let p = published.get(&k.kid)?;
        (p.alg != k.alg || p.public_jwk != k.public_jwk).then(|| k.kid.clone())
    })
}

/// Adds, as retired and public-only, every published key missing from `set`. Returns how many.
fn keep_published(set: &mut KeySet, published: Option<&KeySet>, now: i64) -> usize {
    let Some(published) = published else { return 0 };
    let mut n = 0;
    for p in &published.keys {
        if set.get(&p.kid).is_none() {
            set.keys.push(retired_public(p, now));
            n += 1;
        }
    }
    n
}

fn retired_public(p: &KeyEntry, now: i64) -> KeyEntry {
    KeyEntry {
        state: KeyState::Retired,
        // A key that was current or next may have signed until now.
        retired_at: if p.state == KeyState::Retired { p.retired_at.or(Some(now)) } else { Some(now) },
        private_key_pem: None,
        secret: None,
        ..p.clone()
    }
}

fn lost(problem: &str, published: Option<&KeySet>, now: i64) -> Decision {
    let mut set = KeySet::empty();
    let kept = keep_published(&mut set, published, now);
    Decision {
        set,
        lifetimes: Lifetimes::new(),
        publish_first: false,
        recovery: Some(Recovery {
            kind: RecoveryKind::Lost,
            message: format!(
                "the keys Secret {problem}, and the operator had no copy of the private keys: {kept} published public key(s) \
                 are kept as retired so tokens they signed verify until they expire{}; a new key signs from now, and pods \
                 that have not received it yet reject its tokens for up to the propagation delay",
                if kept == 0 {
                    " (HMAC keys have no public half: tokens signed with them no longer verify)"
                } else {
                    ""
                }
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys_secret::{ANN_KEYSET_SHA256, ANN_TOKEN_LIFETIMES, keyset_bytes, sha256_hex};
    use authrealm_contract::Alg;
    use authrealm_contract::keygen::generate;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn keys() -> KeySet {
        KeySet {
            keys: vec![
                KeyEntry { retired_at: Some(50), ..generate(Alg::ES256, "old", 0, KeyState::Retired).unwrap() },
                generate(Alg::ES256, "cur", 40, KeyState::Current).unwrap(),
            ],
            ..KeySet::empty()
        }
    }

    fn secret(bytes: Vec<u8>, digest: Option<String>) -> Secret {
        let mut ann = BTreeMap::from([(ANN_TOKEN_LIFETIMES.to_owned(), r#"{"cur":60}"#.to_owned())]);
        if let Some(d) = digest {
            ann.insert(ANN_KEYSET_SHA256.to_owned(), d);
        }
        Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(ann),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(KEYSET_KEY.to_owned(), ByteString(bytes))])),
            ..Secret::default()
        }
    }

    #[test]
    fn classify_table() {
        let set = keys();
        let bytes = keyset_bytes(&set);
        let good = secret(bytes.clone(), Some(sha256_hex(&bytes)));
        assert!(matches!(classify(Some(&good)), SecretState::Trusted { ref lifetimes, .. } if lifetimes["cur"] == 60));
        assert_eq!(classify(None), SecretState::Missing);
        // Same content, digest missing: edited but adoptable.
        assert!(matches!(classify(Some(&secret(bytes.clone(), None))), SecretState::Edited { parsed: Some(_), .. }));
        // Garbage.
        let garbage = secret(b"{not json".to_vec(), Some(sha256_hex(b"{not json")));
        assert!(matches!(classify(Some(&garbage)), SecretState::Edited { parsed: None, .. }));
        // A private key swapped under the public key: material check fails.
        let mut swapped = set.clone();
        swapped.keys[1].private_key_pem = generate(Alg::ES256, "x", 0, KeyState::Next).unwrap().private_key_pem;
        let b = keyset_bytes(&swapped);
        match classify(Some(&secret(b, None))) {
            SecretState::Edited { parsed: None, problem, .. } => {
                assert!(problem.contains("does not match"), "{problem}")
            }
            other => panic!("{other:?}"),
        }
        // No data at all.
        let empty = Secret { data: None, ..good };
        assert!(matches!(classify(Some(&empty)), SecretState::Edited { parsed: None, .. }));
    }

    #[test]
    fn decide_table() {
        let set = keys();
        let published = set.public_only();
        let cache = Cached { set: set.clone(), lifetimes: Lifetimes::from([("cur".into(), 60)]) };
        let edited = SecretState::Edited { parsed: None, lifetimes: Lifetimes::new(), problem: "x".into() };

        // Trusted: as is.
        let d = decide(
            SecretState::Trusted { set: set.clone(), lifetimes: Lifetimes::new() },
            Some(&cache),
            Some(&published),
            true,
            100,
        );
        assert_eq!((d.set, d.recovery), (set.clone(), None));

        // Deleted or edited with a copy: restored verbatim.
        for state in [SecretState::Missing, edited.clone()] {
            let d = decide(state, Some(&cache), Some(&published), true, 100);
            assert_eq!(d.set, set);
            assert_eq!(d.lifetimes, cache.lifetimes);
            assert_eq!(d.recovery.unwrap().kind, RecoveryKind::Restored);
        }

        // Fresh realm.
        let d = decide(SecretState::Missing, None, None, false, 100);
        assert!(d.set.keys.is_empty() && d.recovery.is_none());

        // Deleted without a copy: public keys kept as retired, no private material.
        let d = decide(SecretState::Missing, None, Some(&published), true, 100);
        let r = d.recovery.unwrap();
        assert_eq!(r.kind, RecoveryKind::Lost);
        assert_eq!(d.set.keys.len(), 2);
        assert!(d.set.keys.iter().all(|k| k.state == KeyState::Retired && k.private_key_pem.is_none()));
        assert_eq!(d.set.get("old").unwrap().retired_at, Some(50), "an old retirement time is kept");
        assert_eq!(d.set.get("cur").unwrap().retired_at, Some(100), "the current key retires now");
        // ...even when the status says keys existed but the JWKS is gone too (HMAC realms).
        let d = decide(SecretState::Missing, None, None, true, 100);
        assert!(d.recovery.unwrap().message.contains("HMAC"));
        assert!(d.set.keys.is_empty());

        // Edited, valid, without a copy: adopted, published keys it dropped are kept.
        let mut trimmed = set.clone();
        trimmed.keys.retain(|k| k.kid == "cur");
        let d = decide(
            SecretState::Edited { parsed: Some(trimmed), lifetimes: Lifetimes::new(), problem: "p".into() },
            None,
            Some(&published),
            true,
            100,
        );
        assert_eq!(d.recovery.unwrap().kind, RecoveryKind::Adopted);
        assert_eq!(d.set.get("old").unwrap().state, KeyState::Retired);
        assert!(d.set.get("cur").unwrap().private_key_pem.is_some());

        // Edited with a different key under a published kid: not adopted.
        let mut swapped = set.clone();
        swapped.keys[1] = generate(Alg::ES256, "cur", 40, KeyState::Current).unwrap();
        let d = decide(
            SecretState::Edited { parsed: Some(swapped), lifetimes: Lifetimes::new(), problem: "p".into() },
            None,
            Some(&published),
            true,
            100,
        );
        let r = d.recovery.unwrap();
        assert_eq!(r.kind, RecoveryKind::Lost);
        assert!(r.message.contains("differs"), "{}", r.message);
        assert_eq!(d.set.get("cur").unwrap().public_jwk, published.get("cur").unwrap().public_jwk);
    }

    /// Someone "repairs" a deleted keys Secret with the public `keyset.json` of the JWKS while
    /// the operator is down: nothing in it can sign.
    #[test]
    fn a_public_only_copy_is_adopted_as_retired_keys_and_asks_for_a_new_chain() {
        let mut set = keys();
        set.keys.push(generate(Alg::ES256, "nxt", 90, KeyState::Next).unwrap());
        let published = set.public_only();
        let bytes = keyset_bytes(&published);
        // It classifies as an adoptable edit (every key checks out: there is no private half to probe)...
        let state = classify(Some(&secret(bytes.clone(), None)));
        assert!(matches!(state, SecretState::Edited { parsed: Some(_), .. }), "{state:?}");
        let d = decide(state, None, Some(&published), true, 100);
        // ...but its current and next keys are kept only as retired verifiers.
        assert!(d.publish_first);
        assert!(d.set.current().is_none());
        for kid in ["cur", "nxt"] {
            let k = d.set.get(kid).unwrap();
            assert_eq!((k.state, k.retired_at), (KeyState::Retired, Some(100)), "{kid}");
            assert_eq!(k.public_jwk, published.get(kid).unwrap().public_jwk, "{kid} keeps verifying");
        }
        assert_eq!(d.set.get("old").unwrap().retired_at, Some(50));
        let r = d.recovery.unwrap();
        assert_eq!(r.kind, RecoveryKind::Adopted);
        assert!(r.message.contains("cur, nxt had no private key"), "{}", r.message);

        // The same content with a digest fixed by hand is not trusted to sign either.
        let d = decide(classify(Some(&secret(bytes.clone(), Some(sha256_hex(&bytes))))), None, None, true, 100);
        assert!(d.publish_first && d.set.current().is_none());
        assert_eq!(d.recovery.unwrap().kind, RecoveryKind::Adopted);

        // Only the next key lacks its private half: it is retired, the current key keeps signing.
        let mut partial = set.clone();
        partial.keys[2].private_key_pem = None;
        let d = decide(
            SecretState::Edited { parsed: Some(partial), lifetimes: Lifetimes::new(), problem: "p".into() },
            None,
            Some(&published),
            true,
            100,
        );
        assert!(!d.publish_first);
        assert_eq!(d.set.current().unwrap().kid, "cur");
        assert_eq!(d.set.get("nxt").unwrap().state, KeyState::Retired);

        // A trusted, complete set is left alone.
        let d = decide(
            SecretState::Trusted { set: set.clone(), lifetimes: Lifetimes::new() },
            None,
            Some(&published),
            true,
            100,
        );
        assert_eq!((d.set, d.recovery, d.publish_first), (set, None, false));
    }
}
