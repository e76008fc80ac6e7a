//! Key generation (aws-lc-rs) and key-material checks, shared by the operator (which owns
//! rotation) and the sidecar's `keygen` subcommand.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, EncodingKey};

use crate::alg::{Alg, Family};
use crate::keyset::{KeyEntry, KeyState};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating a {0} key failed")]
    Generate(Alg),
    #[error("key {kid}: {message}")]
    Material { kid: String, message: String },
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn hmac_len(alg: Alg) -> usize {
    match alg {
        Alg::HS384 => 48,
        Alg::HS512 => 64,
        _ => 32,
    }
}

/// A random key id: 16 bytes of entropy, base64url (22 characters).
pub fn random_kid() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).expect("system random");
    URL_SAFE_NO_PAD.encode(b)
}

/// A fresh key for `alg`, with its public JWK (asymmetric) or secret (HMAC).
pub fn generate(alg: Alg, kid: &str, now: i64, state: KeyState) -> Result<KeyEntry, KeyError> {
    let rng = SystemRandom::new();
    let gen_err = |_| KeyError::Generate(alg);
    let mut entry = KeyEntry {
        kid: kid.to_string(),
        alg,
        state,
        created_at: now,
        activated_at: (state == KeyState::Current).then_some(now),
        retired_at: None,
        public_jwk: None,
        private_key_pem: None,
        secret: None,
    };
    let pkcs8: Vec<u8> = match alg.family() {
        Family::Hmac => {
            let mut secret = vec![0u8; hmac_len(alg)];
            rng.fill(&mut secret).map_err(gen_err)?;
            entry.secret = Some(URL_SAFE_NO_PAD.encode(&secret));
            return Ok(entry);
        }
        Family::Ec => {
            let signing =
                if alg == Alg::ES256 { &ECDSA_P256_SHA256_FIXED_SIGNING } else { &ECDSA_P384_SHA384_FIXED_SIGNING };
            EcdsaKeyPair::generate_pkcs8(signing, &rng).map_err(gen_err)?.as_ref().to_vec()
        }
        Family::Ed => Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(gen_err)?.as_ref().to_vec(),
        Family::Rsa => {
            let size = match alg {
                Alg::RS512 | Alg::PS512 | Alg::RS384 | Alg::PS384 => aws_lc_rs::rsa::KeySize::Rsa3072,
                _ => aws_lc_rs::rsa::KeySize::Rsa2048,
            };
            let kp = aws_lc_rs::rsa::KeyPair::generate(size).map_err(gen_err)?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = kp.as_der().map_err(gen_err)?;
            der.as_ref().to_vec()
        }
    };
    let private_pem = pem("PRIVATE KEY", &pkcs8);
    let enc = encoding_key(alg, &private_pem).map_err(|message| KeyError::Material { kid: kid.into(), message })?;
    let jwk = Jwk::from_encoding_key(&enc, alg.to_jsonwebtoken())
        .map_err(|e| KeyError::Material { kid: kid.into(), message: e.to_string() })?;
    entry.public_jwk = Some(public_part(jwk));
    entry.private_key_pem = Some(private_pem);
    Ok(entry)
}

/// Keep only the key parameters (the set adds kid/alg/use when it publishes the JWKS).
fn public_part(mut jwk: Jwk) -> Jwk {
    jwk.common = Default::default();
    jwk
}

fn encoding_key(alg: Alg, pem: &str) -> Result<EncodingKey, String> {
    let r = match alg.family() {
        Family::Rsa => EncodingKey::from_rsa_pem(pem.as_bytes()),
        Family::Ec => EncodingKey::from_ec_pem(pem.as_bytes()),
        Family::Ed => EncodingKey::from_ed_pem(pem.as_bytes()),
        Family::Hmac => return Err("HMAC keys have no PEM".into()),
    };
    r.map_err(|e| format!("private key does not parse for {alg}: {e}"))
}

/// The signing key of an entry, if it carries private material.
pub fn signing_key(k: &KeyEntry) -> Result<Option<EncodingKey>, KeyError> {
    let bad = |message: String| KeyError::Material { kid: k.kid.clone(), message };
    if k.alg.is_symmetric() {
        return match &k.secret {
            Some(s) => {
                let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|e| bad(e.to_string()))?;
                Ok(Some(EncodingKey::from_secret(&bytes)))
            }
            None => Ok(None),
        };
    }
    match &k.private_key_pem {
        Some(p) => encoding_key(k.alg, p).map(Some).map_err(bad),
        None => Ok(None),
    }
}

/// The verification key of an entry.
pub fn verifying_key(k: &KeyEntry) -> Result<DecodingKey, KeyError> {
    let bad = |message: String| KeyError::Material { kid: k.kid.clone(), message };
    if k.alg.is_symmetric() {
        let s = k.secret.as_ref().ok_or_else(|| bad("no secret".into()))?;
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|e| bad(e.to_string()))?;
        return Ok(DecodingKey::from_secret(&bytes));
    }
    let jwk = k.public_jwk.as_ref().ok_or_else(|| bad("no public JWK".into()))?;
    let family_ok = matches!(
        (&jwk.algorithm, k.alg.family()),
        (jsonwebtoken::jwk::AlgorithmParameters::RSA(_), Family::Rsa)
            | (jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_), Family::Ec)
            | (jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_), Family::Ed)
    );
    if !family_ok {
        return Err(bad(format!("public JWK type does not match {}", k.alg)));
    }
    DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))
}

/// Parse every piece of material of a key and, when it has a private part, prove the
/// private and public parts belong together by signing and verifying a probe.
pub fn check_key(k: &KeyEntry) -> Result<(), KeyError> {
    let dec = verifying_key(k)?;
    if let Some(enc) = signing_key(k)? {
        let alg = k.alg.to_jsonwebtoken();
        let probe = b"authrealm key check";
        let bad = |message: String| KeyError::Material { kid: k.kid.clone(), message };
        let sig = jsonwebtoken::crypto::sign(probe, &enc, alg).map_err(|e| bad(e.to_string()))?;
        let ok = jsonwebtoken::crypto::verify(&sig, probe, &dec, alg).map_err(|e| bad(e.to_string()))?;
        if !ok {
            return Err(bad("private key does not match public JWK".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_generates_a_consistent_key() {
        for alg in Alg::ALL {
            let k = generate(alg, "k1", 1_700_000_000, KeyState::Current).unwrap();
            check_key(&k).unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(k.alg, alg);
            assert_eq!(k.activated_at, Some(1_700_000_000));
            // A round trip through JSON keeps the key usable.
            let json = serde_json::to_string(&k).unwrap();
            let back: KeyEntry = serde_json::from_str(&json).unwrap();
            check_key(&back).unwrap();
        }
    }

    #[test]
    fn mismatched_public_key_is_detected() {
        let a = generate(Alg::ES256, "a", 0, KeyState::Current).unwrap();
        let b = generate(Alg::ES256, "b", 0, KeyState::Current).unwrap();
        let mixed = KeyEntry { public_jwk: b.public_jwk.clone(), ..a };
        assert!(check_key(&mixed).unwrap_err().to_string().contains("does not match"));
        let rsa = generate(Alg::RS256, "r", 0, KeyState::Current).unwrap();
        let wrong_family = KeyEntry { public_jwk: rsa.public_jwk, ..b };
        assert!(check_key(&wrong_family).is_err());
    }

    #[test]
    fn kids_are_random_and_valid() {
        let a = random_kid();
        assert!(crate::keyset::is_valid_kid(&a));
        assert_ne!(a, random_kid());
    }
}
