//! The key-set file (`keyset.json`), format version [`KEYSET_VERSION`].
//!
//! The operator owns the key set of a realm and writes it into the `<realm>-signing-keys`
//! Secret (with private material) and, projected by [`KeySet::public_only`], into the
//! `<realm>-jwks` ConfigMap. The sidecar verifies with every key in the file and signs with
//! the one key in state [`KeyState::Current`]. Every key names its own algorithm: a token's
//! `alg` header is only ever compared with it, never used to pick a verifier.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use serde::{Deserialize, Serialize};

use crate::alg::{Alg, Family};

pub const KEYSET_VERSION: &str = "authrealm.dev/keyset/v1";

/// Lifecycle of a key (see the rotation timeline in the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Published so every verifier knows it before it signs anything.
    Next,
    /// Signs new tokens. At most one key is current.
    Current,
    /// No longer signs; kept until every token it can have signed has expired.
    Retired,
}

/// One key of a realm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyEntry {
    /// Key id: `[A-Za-z0-9._-]{1,64}`, unique in the set; the `kid` header of its tokens.
    pub kid: String,
    /// The one algorithm this key is used with.
    pub alg: Alg,
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds at which the key became (or is planned to become) current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<i64>,
    /// Unix seconds at which the key stopped signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
    /// RFC 7517 public key (asymmetric algorithms only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_jwk: Option<Jwk>,
    /// PKCS#8 PEM private key (asymmetric algorithms); absent in public-only key sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// HMAC secret, base64url without padding (HMAC algorithms only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A realm's keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySet {
    /// Must be [`KEYSET_VERSION`].
    pub version: String,
    pub keys: Vec<KeyEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("key set is not valid JSON for {KEYSET_VERSION}: {0}")]
    Parse(String),
    #[error("key set version: expected {KEYSET_VERSION:?}, got {0:?}")]
    Version(String),
    #[error("keys[{index}] ({kid}): {message}")]
    Key { index: usize, kid: String, message: String },
    #[error("key set has {0} keys in state current; at most one is allowed")]
    SeveralCurrent(usize),
}

/// A key id safe for headers, logs, metrics labels and Secret keys.
pub fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 64
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl KeySet {
    pub fn empty() -> Self {
        KeySet { version: KEYSET_VERSION.into(), keys: vec![] }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, KeySetError> {
        let set: KeySet = serde_json::from_slice(bytes).map_err(|e| KeySetError::Parse(e.to_string()))?;
        set.validate()?;
        Ok(set)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("key set serialises")
    }

    /// Structural checks (unique kids, material present for the algorithm, at most one
    /// current key). Whether the material parses is checked by [`crate::keygen::check_key`].
    pub fn validate(&self) -> Result<(), KeySetError> {
        if self.version != KEYSET_VERSION {
            return Err(KeySetError::Version(self.version.clone()));
        }
        let current = self.keys.iter().filter(|k| k.state == KeyState::Current).count();
        if current > 1 {
            return Err(KeySetError::SeveralCurrent(current));
        }
        for (index, k) in self.keys.iter().enumerate() {
            let bad = |message: &str| KeySetError::Key { index, kid: k.kid.clone(), message: message.into() };
            if !is_valid_kid(&k.kid) {
                return Err(bad("kid must match [A-Za-z0-9._-]{1,64}"));
            }
            if self.keys[..index].iter().any(|o| o.kid == k.kid) {
                return Err(bad("duplicate kid"));
            }
            match k.alg.family() {
                Family::Hmac => {
                    if k.public_jwk.is_some() || k.private_key_pem.is_some() {
                        return Err(bad("HMAC keys carry only `secret`"));
                    }
                    let Some(secret) = &k.secret else { return Err(bad("HMAC key without `secret`")) };
                    match URL_SAFE_NO_PAD.decode(secret) {
                        Ok(b) if b.len() >= 32 => {}
                        _ => return Err(bad("`secret` must be base64url of at least 32 bytes")),
                    }
                }
                _ => {
                    if k.secret.is_some() {
                        return Err(bad("asymmetric keys carry no `secret`"));
                    }
                    if k.public_jwk.is_none() {
                        return Err(bad("asymmetric key without `publicJwk`"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The key that signs new tokens, if any.
    pub fn current(&self) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.state == KeyState::Current)
    }

    pub fn get(&self, kid: &str) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The projection safe to give every pod: asymmetric keys without private material.
    /// HMAC keys cannot be split into a public part, so they are left out.
    pub fn public_only(&self) -> KeySet {
        KeySet {
            version: self.version.clone(),
            keys: self
                .keys
                .iter()
                .filter(|k| !k.alg.is_symmetric())
                .map(|k| KeyEntry { private_key_pem: None, secret: None, ..k.clone() })
                .collect(),
        }
    }

    /// True when any key carries private or secret material.
    pub fn has_private_material(&self) -> bool {
        self.keys.iter().any(|k| k.private_key_pem.is_some() || k.secret.is_some())
    }

    /// RFC 7517 JWK Set of the public keys (`/.well-known/jwks.json`); empty for HMAC realms.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .filter_map(|k| {
                let jwk = k.public_jwk.as_ref()?;
                let mut v = serde_json::to_value(jwk).ok()?;
                let obj = v.as_object_mut()?;
                obj.insert("kid".into(), k.kid.clone().into());
                obj.insert("alg".into(), k.alg.as_str().into());
                obj.insert("use".into(), "sig".into());
                obj.retain(|_, v| !v.is_null());
                Some(v)
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::generate;

    #[test]
    fn validate_rejects_structural_errors() {
        let a = generate(Alg::ES256, "a", 0, KeyState::Current).unwrap();
        let mut b = generate(Alg::ES256, "b", 0, KeyState::Current).unwrap();
        let set = KeySet { version: KEYSET_VERSION.into(), keys: vec![a.clone(), b.clone()] };
        assert!(matches!(set.validate(), Err(KeySetError::SeveralCurrent(2))));
        b.kid = "a".into();
        b.state = KeyState::Next;
        let set = KeySet { version: KEYSET_VERSION.into(), keys: vec![a.clone(), b] };
        assert!(set.validate().unwrap_err().to_string().contains("duplicate kid"));
        let mut bad = a.clone();
        bad.kid = "a/b".into();
        let set = KeySet { version: KEYSET_VERSION.into(), keys: vec![bad] };
        assert!(set.validate().is_err());
        let set = KeySet { version: "v0".into(), keys: vec![] };
        assert!(matches!(set.validate(), Err(KeySetError::Version(_))));
    }

    #[test]
    fn public_projection_has_no_secrets() {
        let set = KeySet {
            version: KEYSET_VERSION.into(),
            keys: vec![
                generate(Alg::ES256, "e", 0, KeyState::Current).unwrap(),
                generate(Alg::RS256, "r", 0, KeyState::Next).unwrap(),
                generate(Alg::HS256, "h", 0, KeyState::Retired).unwrap(),
            ],
        };
        set.validate().unwrap();
        let public = set.public_only();
        public.validate().unwrap();
        assert!(!public.has_private_material());
        assert_eq!(public.keys.len(), 2);
        let text = public.to_json_pretty();
        assert!(!text.contains("PRIVATE KEY"));
        let jwks = set.jwks();
        let kids: Vec<_> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(kids, ["e", "r"]);
        assert!(jwks["keys"][0].get("d").is_none());
        assert_eq!(jwks["keys"][0]["alg"], "ES256");
    }
}
