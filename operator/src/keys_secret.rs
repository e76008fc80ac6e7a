//! The keys Secret's wire format (`<realm>-signing-keys`): what the operator writes into it and
//! how it reads it back. [`crate::render`] builds the Secret with [`encode`]; [`crate::recovery`]
//! judges a Secret read from the API server with [`decode`].
//!
//! * data `keyset.json` ([`KEYSET_KEY`]): the key set, private halves included;
//! * annotation [`ANN_KEYSET_SHA256`]: SHA-256 (hex) of those bytes — a Secret whose data does not
//!   match it was edited by someone else;
//! * annotation [`ANN_TOKEN_LIFETIMES`]: JSON map kid → seconds, the longest token lifetime in
//!   effect while the key could sign;
//! * annotation [`ANN_KEYS_INCIDENT`]: JSON [`Incident`], the last recovery, until the next promotion.

use std::collections::BTreeMap;

use authrealm_contract::KeySet;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};

use crate::rotation::Lifetimes;

/// Data key of the key set in the keys Secret and in the JWKS ConfigMap.
pub const KEYSET_KEY: &str = "keyset.json";

/// SHA-256 (hex) of the Secret's `keyset.json`, written with it. A Secret whose data does not
/// match is treated as edited by hand.
pub const ANN_KEYSET_SHA256: &str = "authrealm.dev/keyset-sha256";
/// JSON map kid → seconds: the longest token lifetime (max TTL + leeway) in effect while the key
/// could sign. Decides when a retired key may be removed.
pub const ANN_TOKEN_LIFETIMES: &str = "authrealm.dev/token-lifetimes";
/// JSON `{"reason": …, "message": …}` of the last recovery of the key set (deleted or edited
/// Secret); removed by the next key promotion. The `KeysIntact` condition is derived from it.
pub const ANN_KEYS_INCIDENT: &str = "authrealm.dev/keys-incident";

/// The last recovery of a realm's key set, kept as an annotation on the keys Secret (read fresh
/// on every reconcile) until the next key promotion.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Incident {
    /// The `KeysIntact` reason.
    pub reason: String,
    pub message: String,
}

impl Incident {
    /// The incident recorded on a Secret, if any.
    pub fn from_secret(secret: Option<&Secret>) -> Option<Incident> {
        let raw = secret?.metadata.annotations.as_ref()?.get(ANN_KEYS_INCIDENT)?;
        serde_json::from_str(raw).ok()
    }
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes stored under `keyset.json` in the keys Secret.
pub fn keyset_bytes(set: &KeySet) -> Vec<u8> {
    set.to_json_pretty().into_bytes()
}

/// The Secret's annotations and data for a key set.
pub fn encode(
    set: &KeySet,
    lifetimes: &Lifetimes,
    incident: Option<&Incident>,
) -> (BTreeMap<String, String>, BTreeMap<String, ByteString>) {
    let bytes = keyset_bytes(set);
    let mut annotations = BTreeMap::from([
        (ANN_KEYSET_SHA256.to_owned(), sha256_hex(&bytes)),
        (ANN_TOKEN_LIFETIMES.to_owned(), serde_json::to_string(lifetimes).expect("map serialises")),
    ]);
    if let Some(i) = incident {
        annotations.insert(ANN_KEYS_INCIDENT.to_owned(), serde_json::to_string(i).expect("incident serialises"));
    }
    (annotations, BTreeMap::from([(KEYSET_KEY.to_owned(), ByteString(bytes))]))
}

/// A keys Secret as read back, before its key set is parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// The `keyset.json` bytes, if present.
    pub keyset: Option<Vec<u8>>,
    /// True when the digest annotation matches those bytes.
    pub digest_ok: bool,
    /// The token-lifetimes annotation (empty when absent or unreadable).
    pub lifetimes: Lifetimes,
}

/// Reads the wire format of a Secret (whoever wrote it).
pub fn decode(secret: &Secret) -> Decoded {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let lifetimes: Lifetimes =
        annotations.get(ANN_TOKEN_LIFETIMES).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let keyset = secret.data.as_ref().and_then(|d| d.get(KEYSET_KEY)).map(|b| b.0.clone());
    let digest_ok = keyset
        .as_ref()
        .is_some_and(|bytes| annotations.get(ANN_KEYSET_SHA256).is_some_and(|d| *d == sha256_hex(bytes)));
    Decoded { keyset, digest_ok, lifetimes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keygen::generate;
    use authrealm_contract::{Alg, KeyState};

    #[test]
    fn what_is_encoded_decodes_with_a_matching_digest() {
        let set = KeySet { keys: vec![generate(Alg::ES256, "a", 1, KeyState::Current).unwrap()], ..KeySet::empty() };
        let lifetimes = Lifetimes::from([("a".to_owned(), 60)]);
        let incident = Incident { reason: "SecretRestored".into(), message: "m".into() };
        let (annotations, data) = encode(&set, &lifetimes, Some(&incident));
        let mut secret = Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            },
            data: Some(data),
            ..Secret::default()
        };
        let d = decode(&secret);
        assert!(d.digest_ok);
        assert_eq!(d.lifetimes, lifetimes);
        assert_eq!(KeySet::from_json(d.keyset.as_deref().unwrap()).unwrap(), set);
        assert_eq!(Incident::from_secret(Some(&secret)), Some(incident));
        // One byte changed: the digest no longer matches.
        secret.data.as_mut().unwrap().get_mut(KEYSET_KEY).unwrap().0.push(b' ');
        assert!(!decode(&secret).digest_ok);
    }
}
