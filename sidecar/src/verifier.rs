//! Signature verification with key material prepared once, when a key set is loaded.
//!
//! `jsonwebtoken::crypto::verify` builds its verifier from the raw key on every call: it copies
//! the key, parses the public key again (EC point decoding and validation, an `EVP_PKEY`; the
//! RSA modulus and exponent into a new RSA key) or runs the HMAC key schedule again, and
//! allocates the decoded signature. Here each key is turned into aws-lc-rs's parsed form
//! (`signature::ParsedPublicKey`, `hmac::Key`) once per algorithm it may verify, with the same
//! aws-lc-rs verification algorithm jsonwebtoken uses for that JOSE `alg`, so a token is accepted
//! exactly when `jsonwebtoken::crypto::verify` would accept it; only the repeated work is gone.

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents, VerificationAlgorithm};
use aws_lc_rs::{hmac, signature::RsaParameters};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, DecodingKeyKind};

use authrealm_contract::Alg;
use authrealm_contract::alg::Family;

/// Longest signature any supported algorithm produces: RSA with an 8192-bit modulus.
const MAX_SIGNATURE_BYTES: usize = 8192 / 8;

enum Prepared {
    /// Boxed: an HMAC key schedule is ~1.2 KB, the other variants a pointer or two.
    Hmac(Box<hmac::Key>),
    Public(ParsedPublicKey),
    /// Material that does not parse as a key of this algorithm: every signature is refused
    /// (as jsonwebtoken refuses each one when it fails to parse the key on every call).
    Unusable,
}

/// One key, ready to verify signatures of each algorithm it is allowed to verify.
pub struct VerifyKey {
    by_alg: Vec<(Alg, Prepared)>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<(Alg, bool)> = self.by_alg.iter().map(|(a, p)| (*a, !matches!(p, Prepared::Unusable))).collect();
        f.debug_struct("VerifyKey").field("algs_usable", &algs).finish()
    }
}

/// The aws-lc-rs algorithm jsonwebtoken (11, `aws_lc_rs` provider) verifies `alg` with.
fn public_algorithm(alg: Alg) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Alg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        Alg::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
        Alg::EdDSA => &signature::ED25519,
        Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => rsa_parameters(alg)?,
        Alg::HS256 | Alg::HS384 | Alg::HS512 => return None,
    })
}

fn rsa_parameters(alg: Alg) -> Option<&'static RsaParameters> {
    Some(match alg {
        Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        Alg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn prepare(key: &DecodingKey, alg: Alg) -> Prepared {
    let family_ok = matches!(
        (key.family(), alg.family()),
        (jsonwebtoken::AlgorithmFamily::Hmac, Family::Hmac)
            | (jsonwebtoken::AlgorithmFamily::Rsa, Family::Rsa)
            | (jsonwebtoken::AlgorithmFamily::Ec, Family::Ec)
            | (jsonwebtoken::AlgorithmFamily::Ed, Family::Ed)
    );
    if !family_ok {
        return Prepared::Unusable;
    }
    let prepared = match (key.kind(), alg) {
        (DecodingKeyKind::SecretOrDer(secret), Alg::HS256) => {
            Some(Prepared::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, secret))))
        }
        (DecodingKeyKind::SecretOrDer(secret), Alg::HS384) => {
            Some(Prepared::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA384, secret))))
        }
        (DecodingKeyKind::SecretOrDer(secret), Alg::HS512) => {
            Some(Prepared::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA512, secret))))
        }
        (DecodingKeyKind::SecretOrDer(bytes), _) => {
            public_algorithm(alg).and_then(|a| ParsedPublicKey::new(a, bytes).ok()).map(Prepared::Public)
        }
        (DecodingKeyKind::RsaModulusExponent { n, e }, _) => rsa_parameters(alg)
            .and_then(|p| RsaPublicKeyComponents { n, e }.to_parsed_public_key(p).ok())
            .map(Prepared::Public),
    };
    prepared.unwrap_or(Prepared::Unusable)
}

impl VerifyKey {
    /// Prepare `key` for each of `algs` (the algorithms the key may verify).
    pub fn new(key: &DecodingKey, algs: &[Alg]) -> VerifyKey {
        VerifyKey { by_alg: algs.iter().map(|&a| (a, prepare(key, a))).collect() }
    }

    /// True when `signature` (raw bytes) is a valid `alg` signature of `message` under this key.
    /// False for an algorithm the key was not prepared for.
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        match self.by_alg.iter().find(|(a, _)| *a == alg).map(|(_, p)| p) {
            Some(Prepared::Hmac(k)) => hmac::verify(k, message, signature).is_ok(),
            Some(Prepared::Public(k)) => k.verify_sig(message, signature).is_ok(),
            Some(Prepared::Unusable) | None => false,
        }
    }

    /// [`VerifyKey::verify`] of a JWS signature segment (base64url without padding, as
    /// jsonwebtoken decodes it); false when it does not decode.
    pub fn verify_b64(&self, alg: Alg, message: &[u8], signature_b64: &str) -> bool {
        let mut buf = [0u8; MAX_SIGNATURE_BYTES];
        // A segment longer than the longest signature cannot verify (decode_slice refuses it
        // rather than write past the buffer).
        if signature_b64.len() > MAX_SIGNATURE_BYTES.div_ceil(3) * 4 {
            return false;
        }
        match URL_SAFE_NO_PAD.decode_slice(signature_b64, &mut buf) {
            Ok(n) => self.verify(alg, message, &buf[..n]),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keygen::{generate, signing_key, verifying_key};
    use authrealm_contract::{KeySet, KeyState};

    /// For every algorithm: the prepared key accepts exactly what jsonwebtoken accepts — the
    /// real signature, and not a tampered message, a tampered or truncated signature, a
    /// signature of another key, or a signature presented under another algorithm.
    #[test]
    fn agrees_with_jsonwebtoken_on_every_algorithm() {
        for alg in Alg::ALL {
            let mut set = KeySet::empty();
            set.keys.push(generate(alg, "k", 1, KeyState::Current).unwrap());
            set.keys.push(generate(alg, "other", 1, KeyState::Current).unwrap());
            let dec = verifying_key(&set.keys[0]).unwrap();
            let enc = signing_key(&set.keys[0]).unwrap().unwrap();
            let other = signing_key(&set.keys[1]).unwrap().unwrap();
            let ja = alg.to_jsonwebtoken();
            let msg = b"eyJhbGciOiJ4In0.eyJzdWIiOiJhIn0";
            let sig = jsonwebtoken::crypto::sign(msg, &enc, ja).unwrap();
            let sig_other = jsonwebtoken::crypto::sign(msg, &other, ja).unwrap();
            let key = VerifyKey::new(&dec, &[alg]);
            let mut tampered = URL_SAFE_NO_PAD.decode(&sig).unwrap();
            tampered[0] ^= 1;
            let tampered = URL_SAFE_NO_PAD.encode(tampered);
            let cases: [(&str, &[u8], &str); 6] = [
                ("genuine", msg, &sig),
                ("other message", b"eyJhbGciOiJ4In0.eyJzdWIiOiJiIn0", &sig),
                ("tampered signature", msg, &tampered),
                ("truncated signature", msg, &sig[..sig.len() - 4]),
                ("other key's signature", msg, &sig_other),
                ("not base64url", msg, "a+b/"),
            ];
            for (name, m, s) in cases {
                let want = jsonwebtoken::crypto::verify(s, m, &dec, ja).unwrap_or(false);
                assert_eq!(key.verify_b64(alg, m, s), want, "{alg} {name}");
                assert_eq!(want, name == "genuine", "{alg} {name}");
            }
            // Pinned to the algorithms it was prepared for.
            let wrong = if alg == Alg::HS256 { Alg::HS384 } else { Alg::HS256 };
            assert!(!key.verify_b64(wrong, msg, &sig), "{alg} under {wrong}");
        }
    }

    #[test]
    fn material_that_does_not_parse_verifies_nothing() {
        // An EC "point" that is not on the curve, and an RSA modulus of a key size the
        // algorithm refuses: loaded, but no signature ever verifies.
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        let bad_ec = DecodingKey::from_ec_der(&point);
        let key = VerifyKey::new(&bad_ec, &[Alg::ES256]);
        assert!(!key.verify(Alg::ES256, b"m", &[0u8; 64]));
        let small_rsa = DecodingKey::from_rsa_raw_components(&[0xc5; 128], &[1, 0, 1]);
        let key = VerifyKey::new(&small_rsa, &[Alg::RS256]);
        assert!(!key.verify(Alg::RS256, b"m", &[0u8; 128]));
        // A key of another family than the algorithm.
        let key = VerifyKey::new(&DecodingKey::from_secret(b"secret"), &[Alg::ES256]);
        assert!(!key.verify(Alg::ES256, b"m", &[0u8; 64]));
        assert!(format!("{key:?}").contains("false"));
    }

    #[test]
    fn an_oversized_signature_segment_is_refused_not_decoded() {
        let key = VerifyKey::new(&DecodingKey::from_secret(b"secret"), &[Alg::HS256]);
        assert!(!key.verify_b64(Alg::HS256, b"m", &"A".repeat(MAX_SIGNATURE_BYTES * 2)));
    }
}
