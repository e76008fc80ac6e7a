//! Property tests (proptest) for the sidecar's parsers and guards: the bearer-token pipeline
//! (`token`), the HTTP/1 framing guard (`framing`), the public-route path checks (`paths` and
//! `PublicRoute::matches`) and the issuer API's percent decoder.
//!
//! Case counts are fixed so that a plain `cargo test` stays bounded (each property takes well
//! under 5 s in a debug build); `PROPTEST_CASES=N` runs N cases of every property instead, for a
//! deeper local run. Failing inputs are not written to files: a case a property found is kept
//! below as an ordinary `#[test]`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::BytesMut;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, ReadBuf};

use authrealm_contract::config::{PathMatch, PublicRoute};
use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState, SessionMode};
use authrealm_sidecar::framing::{Guarded, POISON_HEAD, Scanner};
use authrealm_sidecar::issuer::percent_decode;
use authrealm_sidecar::keys::KeyRing;
use authrealm_sidecar::paths::path_is_public_candidate;
use authrealm_sidecar::token::{
    MAX_ID_BYTES, MintError, Policy, RESERVED_CLAIMS, Reject, extract_bearer, mint, validate,
};

/// `cases` unless `PROPTEST_CASES` asks for another number; no failure files.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------------------------

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        "(?s).{0,12}".prop_map(Value::from),
    ]
}

/// Arbitrary JSON, nested a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("(?s).{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Positions `0..=len` picked by `cuts`, sorted and deduplicated.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    at.sort_unstable();
    at.dedup();
    at
}

/// `data` split at `cuts` (empty pieces are possible at the ends, never in the middle).
fn split<'a>(data: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut pieces = vec![];
    let mut from = 0;
    for at in cut_points(data.len(), cuts) {
        pieces.push(&data[from..at]);
        from = at;
    }
    pieces.push(&data[from..]);
    pieces
}

// ---------------------------------------------------------------------------------------------
// 1. The token parser
// ---------------------------------------------------------------------------------------------

const NOW: i64 = 1_800_000_000;
const ISS: &str = "https://iss";

/// Rings holding an ES256, an HS256, an EdDSA and an RS256 key (kids `es`, `hs`, `ed`, `rs`);
/// ring `i` has key `i` as its current (signing) key. Generated once for every property.
static RINGS: LazyLock<Vec<KeyRing>> = LazyLock::new(|| {
    let algs = [(Alg::ES256, "es"), (Alg::HS256, "hs"), (Alg::EdDSA, "ed"), (Alg::RS256, "rs")];
    let entries: Vec<_> = algs.iter().map(|(alg, kid)| generate(*alg, kid, 0, KeyState::Retired).unwrap()).collect();
    (0..algs.len())
        .map(|current| {
            let mut keys = entries.clone();
            keys[current].state = KeyState::Current;
            keys[current].activated_at = Some(0);
            let set = KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys };
            KeyRing::from_set(&set, [0; 32]).unwrap()
        })
        .collect()
});

const KIDS: [&str; 4] = ["es", "hs", "ed", "rs"];

fn policy(mode: SessionMode) -> Policy {
    Policy {
        issuer: ISS.into(),
        audiences: vec!["a".into(), "b".into()],
        algorithms: vec![],
        leeway: 30,
        max_token_bytes: 64 * 1024,
        required_claims: vec![],
        session_mode: mode,
        max_lifetime: 900,
    }
}

fn session_mode() -> impl Strategy<Value = SessionMode> {
    prop_oneof![
        Just(SessionMode::Single),
        Just(SessionMode::Multi),
        Just(SessionMode::Denylist),
        Just(SessionMode::Stateless)
    ]
}

/// `header.payload.signature` with a real signature by key `kid` of `ring`.
fn sign_raw(ring: &KeyRing, kid: &str, header: &[u8], payload: &[u8]) -> String {
    let key = ring.get(kid).unwrap();
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let sig =
        jsonwebtoken::crypto::sign(input.as_bytes(), key.sign.as_ref().unwrap(), key.alg.to_jsonwebtoken()).unwrap();
    format!("{input}.{sig}")
}

/// A JOSE header: usually an object with plausible or arbitrary `alg` / `kid` and maybe some
/// forbidden or unknown members; sometimes any JSON value at all.
fn jose_header() -> impl Strategy<Value = Value> {
    let alg = prop_oneof![
        Just(json!("ES256")),
        Just(json!("HS256")),
        Just(json!("EdDSA")),
        Just(json!("RS256")),
        Just(json!("PS256")),
        Just(json!("none")),
        json_value(),
    ];
    let kid = prop_oneof![Just(json!("es")), Just(json!("hs")), Just(json!("ed")), Just(json!("rs")), json_value()];
    let member = prop_oneof![
        1 => Just("crit".to_string()),
        1 => Just("b64".to_string()),
        1 => Just("jwk".to_string()),
        1 => Just("jku".to_string()),
        1 => Just("x5u".to_string()),
        1 => Just("x5c".to_string()),
        1 => Just("zip".to_string()),
        3 => Just("typ".to_string()),
        4 => "(?s).{0,6}",
    ];
    prop_oneof![
        4 => (
            proptest::option::of(alg),
            proptest::option::of(kid),
            prop::collection::btree_map(member, json_value(), 0..3),
        )
            .prop_map(|(alg, kid, extra)| {
                let mut m: Map<String, Value> = extra.into_iter().collect();
                if let Some(a) = alg {
                    m.insert("alg".into(), a);
                }
                if let Some(k) = kid {
                    m.insert("kid".into(), k);
                }
                Value::Object(m)
            }),
        1 => json_value(),
    ]
}

/// A claim set: each registered claim usually plausible (so that some sets pass every check),
/// sometimes absent, extreme or of the wrong type.
fn claim_set() -> impl Strategy<Value = Value> {
    let time = |plausible: std::ops::Range<i64>| {
        prop_oneof![
            24 => plausible.prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            1 => json_value(),
        ]
    };
    let iss = prop_oneof![8 => Just(json!(ISS)), 1 => json_value()];
    let aud = prop_oneof![
        4 => Just(json!("a")),
        4 => Just(json!(["x", "b"])),
        1 => Just(json!([])),
        1 => Just(json!("x")),
        1 => json_value()
    ];
    let id = prop_oneof![
        12 => "[!-~]{1,16}".prop_map(Value::from),
        1 => Just(json!("")),
        1 => Just(Value::from("x".repeat(MAX_ID_BYTES + 1))),
        1 => json_value(),
    ];
    let o = |s| proptest::option::weighted(0.93, s);
    (
        (
            o(time(NOW - 40..NOW + 2000).boxed()),
            o(time(NOW - 2000..NOW + 40).boxed()),
            o(time(NOW - 2000..NOW + 40).boxed()),
        ),
        (o(iss.boxed()), o(aud.boxed()), o(id.clone().boxed()), o(id.boxed())),
        prop::collection::btree_map("(?s).{0,8}", json_value(), 0..3),
    )
        .prop_map(|((exp, nbf, iat), (iss, aud, sub, jti), extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (name, v) in
                [("exp", exp), ("nbf", nbf), ("iat", iat), ("iss", iss), ("aud", aud), ("sub", sub), ("jti", jti)]
            {
                match v {
                    Some(v) => m.insert(name.into(), v),
                    None => m.remove(name),
                };
            }
            Value::Object(m)
        })
}

/// The header of a test token: the one its signer's key calls for (plus maybe other members),
/// an arbitrary JOSE-like header, or raw bytes that need not be JSON or UTF-8 at all.
#[derive(Debug, Clone)]
enum HeaderChoice {
    Matching(Map<String, Value>),
    Jose(Value),
    Raw(Vec<u8>),
}

fn header_choice() -> impl Strategy<Value = HeaderChoice> {
    let member = prop_oneof![
        Just("typ".to_string()),
        Just("cty".to_string()),
        Just("crit".to_string()),
        Just("jku".to_string()),
        "(?s).{0,6}",
    ];
    prop_oneof![
        3 => proptest::option::weighted(0.2, (member, json_value()))
            .prop_map(|m| HeaderChoice::Matching(m.into_iter().collect())),
        3 => jose_header().prop_map(HeaderChoice::Jose),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(HeaderChoice::Raw),
    ]
}

/// A base64url-ish part: the encoding of arbitrary bytes, or arbitrary characters of (and
/// around) the alphabet, including non-canonical lengths and padding.
fn b64_part() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        "[A-Za-z0-9_=+/-]{0,40}",
        "(?s).{0,8}",
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any header values and query string: no panic, and a token is returned only from exactly
    /// one `Bearer` Authorization header, trimmed, non-empty, without a query-string token.
    #[test]
    fn extract_bearer_never_panics_and_only_returns_the_single_bearer_credential(
        values in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                "(?i)(bearer|basic|bear) {0,3}[ -~]{0,30}".prop_map(String::into_bytes),
            ],
            0..3,
        ),
        query in proptest::option::of(prop_oneof![
            "(?s).{0,30}",
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("access_token".to_string()),
                        Just("ACCESS_token".to_string()),
                        Just("access%5Ftoken".to_string()),
                        Just("access%5ftoken".to_string()),
                        // `access_token` with some characters percent-encoded (any hex case).
                        prop::collection::vec((any::<bool>(), any::<bool>()), 12).prop_map(|flags| {
                            "access_token"
                                .bytes()
                                .zip(flags)
                                .map(|(c, (enc, upper))| match (enc, upper) {
                                    (false, _) => (c as char).to_string(),
                                    (true, true) => format!("%{c:02X}"),
                                    (true, false) => format!("%{c:02x}"),
                                })
                                .collect::<String>()
                        }),
                        "[a-z_%]{0,12}",
                    ],
                    proptest::option::of("[a-zA-Z0-9=]{0,6}"),
                ),
                0..4,
            )
            .prop_map(|kvs| {
                kvs.into_iter().map(|(k, v)| v.map_or(k.clone(), |v| format!("{k}={v}"))).collect::<Vec<_>>().join("&")
            }),
        ]),
    ) {
        let mut headers = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                headers.append(http::header::AUTHORIZATION, v);
            }
        }
        let got = extract_bearer(&headers, query.as_deref());
        // A key that reads `access_token` once percent-decoded, in any letter case.
        let query_token = query.as_deref().unwrap_or("").split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            strict_decode(k).is_some_and(|k| k.eq_ignore_ascii_case("access_token"))
        });
        if query_token {
            prop_assert_eq!(got, Err(Reject::AmbiguousCredentials));
        } else if let Ok(token) = got {
            let all: Vec<_> = headers.get_all(http::header::AUTHORIZATION).iter().collect();
            prop_assert_eq!(all.len(), 1);
            let value = all[0].to_str().unwrap();
            prop_assert!(value[..7].eq_ignore_ascii_case("bearer "));
            prop_assert_eq!(value[7..].trim_matches(' '), token);
            prop_assert!(!token.is_empty());
        }
    }

    /// Arbitrary strings are never accepted and never panic.
    #[test]
    fn validate_rejects_arbitrary_strings(token in "(?s).{0,300}", mode in session_mode()) {
        prop_assert!(validate(&token, &RINGS[0], &policy(mode), NOW).is_err());
    }

    /// Arbitrary dot-separated base64 parts (1 to 5 of them) are never accepted and never panic.
    #[test]
    fn validate_rejects_arbitrary_dot_separated_base64(parts in prop::collection::vec(b64_part(), 1..6)) {
        let token = parts.join(".");
        let got = validate(&token, &RINGS[0], &policy(SessionMode::Stateless), NOW);
        prop_assert!(got.is_err());
        if parts.len() != 3 {
            prop_assert_eq!(got.unwrap_err(), Reject::Malformed);
        }
    }

    /// Arbitrary JSON headers and claim sets, with a real signature, a signature by another key
    /// or garbage: never a panic; the header checks come first; and a token is accepted only
    /// when the key its header names really signed it, with exactly the claims it carries.
    #[test]
    fn validate_handles_arbitrary_json_headers_and_claims(
        header in header_choice(),
        claims in claim_set(),
        signer in prop_oneof![4 => 0..KIDS.len(), 1 => Just(KIDS.len())],
        garbage in prop::collection::vec(any::<u8>(), 1..300),
        mode in session_mode(),
        pinned in proptest::bool::weighted(0.2),
    ) {
        let ring = &RINGS[0];
        let hbytes = match header {
            HeaderChoice::Matching(mut extra) => {
                let kid = KIDS[signer % KIDS.len()];
                extra.insert("alg".into(), json!(ring.get(kid).unwrap().alg.as_str()));
                extra.insert("kid".into(), json!(kid));
                serde_json::to_vec(&extra).unwrap()
            }
            HeaderChoice::Jose(h) => serde_json::to_vec(&h).unwrap(),
            HeaderChoice::Raw(b) => b,
        };
        let payload = serde_json::to_vec(&claims).unwrap();
        let token = if signer < KIDS.len() {
            sign_raw(ring, KIDS[signer], &hbytes, &payload)
        } else {
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(&hbytes),
                URL_SAFE_NO_PAD.encode(&payload),
                URL_SAFE_NO_PAD.encode(&garbage)
            )
        };
        let mut p = policy(mode);
        if pinned {
            p.algorithms = vec![Alg::ES256, Alg::EdDSA];
        }
        let got = validate(&token, ring, &p, NOW);
        let parsed: Option<Value> = serde_json::from_slice(&hbytes).ok();
        match parsed {
            Some(Value::Object(h)) => {
                let forbidden = ["crit", "b64", "jwk", "jku", "x5u", "x5c", "zip"];
                if forbidden.iter().any(|m| h.contains_key(*m)) {
                    prop_assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), Err(Reject::ForbiddenHeader));
                }
                if let Ok(v) = &got {
                    // Accepted: the header named the key that signed it, with that key's alg.
                    prop_assert!(signer < KIDS.len(), "accepted a token with a garbage signature");
                    prop_assert_eq!(h.get("kid"), Some(&json!(KIDS[signer])));
                    prop_assert_eq!(h.get("alg"), Some(&json!(ring.get(KIDS[signer]).unwrap().alg.as_str())));
                    prop_assert_eq!(&v.kid, KIDS[signer]);
                    prop_assert_eq!(&Value::Object(v.claims()), &claims);
                    prop_assert!(NOW <= v.exp.saturating_add(30));
                    if mode != SessionMode::Stateless {
                        prop_assert!(v.sub.is_some() && v.jti.is_some());
                    }
                }
            }
            // Not an object (or not JSON): refused as a bad header, or as malformed when empty.
            _ => {
                let want = if hbytes.is_empty() { Reject::Malformed } else { Reject::BadHeader };
                prop_assert_eq!(got.map(|_| ()), Err(want));
            }
        }
    }
}

/// Claim names for minting: mostly free-form, sometimes a reserved one.
fn claim_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "(?s).{1,12}",
        1 => prop::sample::select(RESERVED_CLAIMS.to_vec()).prop_map(String::from),
    ]
}

fn audience() -> impl Strategy<Value = Value> {
    prop_oneof![Just(json!("a")), Just(json!("b")), Just(json!(["b"])), Just(json!(["x", "a", "y"]))]
}

/// A token minted by ring `current`'s signing key, with small arbitrary custom claims.
fn minted_token() -> impl Strategy<Value = (usize, String)> {
    (0..KIDS.len(), "(?s).{1,24}", prop::collection::btree_map("[a-z]{1,6}", json_leaf(), 0..3), audience()).prop_map(
        |(current, subject, extra, aud)| {
            let extra: Map<String, Value> =
                extra.into_iter().filter(|(k, _)| !RESERVED_CLAIMS.contains(&k.as_str())).collect();
            let m = mint(&RINGS[current], ISS, &subject, aud, extra, NOW, 300).unwrap();
            (current, m.token)
        },
    )
}

#[derive(Debug, Clone, Copy)]
enum Edit {
    Replace(u8),
    Insert(u8),
    Delete,
}

fn edit() -> impl Strategy<Value = Edit> {
    // ASCII only: a token is a `&str`, and non-ASCII never passes `HeaderValue::to_str`.
    prop_oneof![
        4 => (0u8..0x80).prop_map(Edit::Replace),
        1 => (0u8..0x80).prop_map(Edit::Insert),
        1 => Just(Edit::Delete),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// `mint` → `validate` round-trips sub, jti, kid, times and every custom claim, for arbitrary
    /// subjects and claim values, with each key type as the signer; reserved names are refused.
    #[test]
    fn minted_tokens_validate_and_round_trip_their_claims(
        current in 0..KIDS.len(),
        subject in "(?s).{1,64}",
        extra in prop::collection::btree_map(claim_name(), json_value(), 0..6),
        aud in audience(),
        now in 0i64..4_000_000_000,
        ttl in 1i64..=900,
        mode in session_mode(),
    ) {
        let ring = &RINGS[current];
        let extra: Map<String, Value> = extra.into_iter().collect();
        let reserved = extra.keys().any(|k| RESERVED_CLAIMS.contains(&k.as_str()));
        let minted = mint(ring, ISS, &subject, aud.clone(), extra.clone(), now, ttl);
        if reserved {
            prop_assert!(matches!(minted, Err(MintError::ReservedClaim(_))));
            return Ok(());
        }
        let m = minted.unwrap();
        let v = validate(&m.token, ring, &policy(mode), now).unwrap();
        prop_assert_eq!(v.sub.as_deref(), Some(subject.as_str()));
        prop_assert_eq!(v.jti.as_deref(), Some(m.jti.as_str()));
        prop_assert_eq!(v.kid.as_str(), KIDS[current]);
        prop_assert_eq!(&m.kid, &v.kid);
        prop_assert_eq!((v.iat, v.exp), (Some(now), now + ttl));
        let claims = v.claims();
        prop_assert_eq!(claims.get("iss"), Some(&json!(ISS)));
        prop_assert_eq!(claims.get("aud"), Some(&aud));
        prop_assert_eq!(claims.len(), extra.len() + RESERVED_CLAIMS.len());
        for (k, want) in &extra {
            prop_assert_eq!(claims.get(k), Some(want), "custom claim {:?}", k);
        }
        // Still valid at the last second of its life plus leeway, not one second later.
        let end = now + ttl + 30;
        prop_assert!(validate(&m.token, ring, &policy(mode), end).is_ok());
        prop_assert_eq!(validate(&m.token, ring, &policy(mode), end + 1).unwrap_err(), Reject::Expired);
    }

    /// Changing, inserting or deleting one byte anywhere in a valid token (header, payload,
    /// signature or a dot) makes it invalid: it is never accepted, under any claim set.
    #[test]
    fn single_byte_edits_of_a_valid_token_are_rejected(
        (current, token) in minted_token(),
        part in 0usize..3,
        at in any::<Index>(),
        edit in edit(),
    ) {
        let ring = &RINGS[current];
        let p = policy(SessionMode::Multi);
        prop_assert!(validate(&token, ring, &p, NOW).is_ok());
        // Pick a position inside the chosen part (its trailing dot included).
        let bounds: Vec<usize> = token.match_indices('.').map(|(i, _)| i).collect();
        let (start, end) = match part {
            0 => (0, bounds[0] + 1),
            1 => (bounds[0] + 1, bounds[1] + 1),
            _ => (bounds[1] + 1, token.len()),
        };
        let i = start + at.index(end - start);
        let mut bytes = token.clone().into_bytes();
        match edit {
            Edit::Replace(b) => bytes[i] = if b == bytes[i] { (b + 1) % 0x80 } else { b },
            Edit::Insert(b) => bytes.insert(i, b),
            Edit::Delete => {
                bytes.remove(i);
            }
        }
        let edited = String::from_utf8(bytes).unwrap();
        prop_assume!(edited != token);
        let got = validate(&edited, ring, &p, NOW);
        prop_assert!(got.is_err(), "edited token accepted: {:?} -> {:?}: {:?}", token, edited, got.map(|v| v.claims()));
    }
}

/// Found by `minted_tokens_validate_and_round_trip_their_claims`: serde_json's default float
/// parser read this claim back one ULP off (`…905e-281`), so the app would have been handed a
/// different number than the token carried. The sidecar enables `float_roundtrip`.
#[test]
fn float_claims_round_trip_exactly() {
    let ring = &RINGS[0];
    for f in [-9.772766513618903e-281, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1 + 0.2] {
        let mut extra = Map::new();
        extra.insert("f".into(), json!(f));
        let m = mint(ring, ISS, "alice", json!("a"), extra, NOW, 60).unwrap();
        let v = validate(&m.token, ring, &policy(SessionMode::Multi), NOW).unwrap();
        assert_eq!(v.claims()["f"].as_f64(), Some(f));
        let header = authrealm_sidecar::token::identity_value(v.claims().get("f")).unwrap().unwrap();
        assert_eq!(header.to_str().unwrap(), json!(f).to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The framing guard
// ---------------------------------------------------------------------------------------------

/// What hyper would be handed, and whether the guard poisoned the connection, when `input` is
/// read in the given pieces; `switch_after` pieces are read before the server answers 101.
fn scan(max_head: usize, pieces: &[&[u8]], switch_after: Option<usize>) -> (Vec<u8>, bool) {
    let mut s = Scanner::new(max_head);
    let mut out = BytesMut::new();
    for (i, p) in pieces.iter().enumerate() {
        if switch_after == Some(i) {
            s.switch_protocols(&mut out);
        }
        s.feed(p, &mut out);
    }
    if switch_after == Some(pieces.len()) {
        s.switch_protocols(&mut out);
    }
    (out.to_vec(), s.poisoned())
}

/// Fragments of HTTP/1 (and HTTP/2) traffic, to be glued together in any order.
fn http_fragment() -> impl Strategy<Value = Vec<u8>> {
    let text = |s: &'static str| Just(s.as_bytes().to_vec());
    prop_oneof![
        text("GET / HTTP/1.1"),
        text("POST /a HTTP/1.1"),
        text("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        text("PRI * HTTP/2.0"),
        text("\r\n"),
        text("\n"),
        text("\r"),
        text("\r\n\r\n"),
        text("Host: x"),
        text("Content-Length: "),
        text("content-length: 3"),
        text("Transfer-Encoding: chunked"),
        text("transfer-encoding: gzip, chunked"),
        text("Transfer-Encoding: gzip"),
        text("Upgrade: websocket"),
        text("0\r\n\r\n"),
        text("5;ext=1\r\n"),
        text("+5\r\n"),
        text("fffffffffffffffff\r\n"),
        (0u64..40).prop_map(|n| n.to_string().into_bytes()),
        (0u64..40).prop_map(|n| format!("{n:x}\r\n").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..16),
    ]
}

/// Whole requests (well framed or smuggling) mixed with fragments and noise.
fn http_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![4 => http_fragment(), 2 => good_request(), 1 => smuggling_head()];
    prop::collection::vec(piece, 0..16).prop_map(|f| f.concat())
}

fn any_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..600), 3 => http_stream()]
}

fn line_end() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\r\n"), Just("\n")]
}

/// A well-framed request: no body, a Content-Length body, or a chunked body (with optional
/// extensions and trailers); the body bytes are arbitrary, head-like text included.
fn good_request() -> impl Strategy<Value = Vec<u8>> {
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        Just(b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
    ];
    let framing = prop_oneof![
        Just(None),
        body.clone().prop_map(|b| Some((false, vec![b]))),
        prop::collection::vec(body, 0..4).prop_map(|c| Some((true, c))),
    ];
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "OPTIONS"]),
        "/[a-z0-9/]{0,10}",
        line_end(),
        framing,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(method, path, nl, framing, upper, trailer)| {
            let mut r = format!("{method} {path} HTTP/1.1{nl}Host: x{nl}").into_bytes();
            match framing {
                None => r.extend_from_slice(nl.as_bytes()),
                Some((false, body)) => {
                    let body = &body[0];
                    r.extend_from_slice(format!("Content-Length: {}{nl}{nl}", body.len()).as_bytes());
                    r.extend_from_slice(body);
                }
                Some((true, chunks)) => {
                    r.extend_from_slice(format!("Transfer-Encoding: chunked{nl}{nl}").as_bytes());
                    for c in chunks.iter().filter(|c| !c.is_empty()) {
                        let size = if upper { format!("{:X}", c.len()) } else { format!("{:x};e=1", c.len()) };
                        r.extend_from_slice(format!("{size}\r\n").as_bytes());
                        r.extend_from_slice(c);
                        r.extend_from_slice(b"\r\n");
                    }
                    r.extend_from_slice(b"0\r\n");
                    if trailer {
                        r.extend_from_slice(b"X-Trailer: 1\r\n");
                    }
                    r.extend_from_slice(b"\r\n");
                }
            }
            r
        })
}

/// A head with both framing headers, or one of them twice.
fn smuggling_head() -> impl Strategy<Value = Vec<u8>> {
    let cl = prop_oneof![Just("Content-Length: 4"), Just("content-length: 0"), Just("CONTENT-LENGTH:4")];
    let te = prop_oneof![Just("Transfer-Encoding: chunked"), Just("transfer-encoding: gzip, chunked")];
    let pair = prop_oneof![
        (cl.clone(), te.clone()),
        (te.clone(), cl.clone()).prop_map(|(a, b)| (a, b)),
        (cl.clone(), cl),
        (te.clone(), te),
    ];
    (pair, line_end(), any::<bool>()).prop_map(|((a, b), nl, between)| {
        let middle = if between { format!("X-Y: z{nl}") } else { String::new() };
        format!("POST /smuggle HTTP/1.1{nl}Host: x{nl}{a}{nl}{middle}{b}{nl}{nl}").into_bytes()
    })
}

/// An async reader that returns `pieces` one per read (like a socket), then EOF.
struct Pieces(std::collections::VecDeque<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut p) = self.0.pop_front() {
            let n = p.len().min(buf.remaining());
            buf.put_slice(&p[..n]);
            if n < p.len() {
                self.0.push_front(p.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Arbitrary bytes read in arbitrary pieces (and an optional 101 between two reads): no panic,
    /// and what hyper sees does not depend on how the bytes were split. Without poisoning the
    /// guard only ever holds bytes back (its output is a prefix of the input); with poisoning,
    /// the ambiguous head is replaced by `POISON_HEAD` and what preceded it is unchanged.
    #[test]
    fn framing_verdict_does_not_depend_on_chunking(
        input in any_stream(),
        cuts_a in prop::collection::vec(any::<Index>(), 0..12),
        cuts_b in prop::collection::vec(any::<Index>(), 0..12),
        switch_at in proptest::option::of(any::<Index>()),
        max_head in prop_oneof![Just(48usize), Just(8192usize)],
    ) {
        // The 101 is answered after some prefix was read; both splits must keep that boundary.
        let (before, after) = match switch_at {
            Some(i) => input.split_at(i.index(input.len() + 1)),
            None => (&input[..], &[][..]),
        };
        let run = |cuts: &[Index]| {
            let mut pieces = split(before, cuts);
            let switch = switch_at.map(|_| pieces.len());
            pieces.extend(split(after, cuts));
            scan(max_head, &pieces, switch)
        };
        let whole = scan(max_head, &[before, after], switch_at.map(|_| 1));
        let bytewise: Vec<&[u8]> = before.chunks(1).collect();
        let mut bytewise_all = bytewise.clone();
        bytewise_all.extend(after.chunks(1));
        let a = run(&cuts_a);
        prop_assert_eq!(&a, &whole);
        prop_assert_eq!(&run(&cuts_b), &whole);
        prop_assert_eq!(&scan(max_head, &bytewise_all, switch_at.map(|_| bytewise.len())), &whole);

        let (out, poisoned) = whole;
        if !poisoned {
            prop_assert!(input.starts_with(&out), "the guard altered bytes without poisoning");
        } else {
            let at = out.windows(POISON_HEAD.len()).position(|w| w == POISON_HEAD).unwrap();
            prop_assert!(input.starts_with(&out[..at]));
        }
    }

    /// Any number of well-framed pipelined requests (arbitrary bodies, arbitrary reads) pass
    /// unchanged and complete; an ambiguous head after them is always caught, whatever bytes
    /// follow it.
    #[test]
    fn well_framed_requests_pass_and_a_smuggling_head_after_them_is_caught(
        goods in prop::collection::vec(good_request(), 0..5),
        smuggle in proptest::option::of(smuggling_head()),
        tail in prop::collection::vec(any::<u8>(), 0..40),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let clean = goods.concat();
        let mut input = clean.clone();
        if let Some(s) = &smuggle {
            input.extend_from_slice(s);
            input.extend_from_slice(&tail);
        }
        let (out, poisoned) = scan(8192, &split(&input, &cuts), None);
        match smuggle {
            None => {
                prop_assert!(!poisoned);
                prop_assert_eq!(out, input);
            }
            Some(_) => {
                prop_assert!(poisoned, "smuggling head not caught after {} requests", goods.len());
                let mut want = clean;
                want.extend_from_slice(POISON_HEAD);
                prop_assert!(out.starts_with(&want));
                prop_assert!(!out.windows(8).any(|w| w == b"/smuggle"));
            }
        }
    }

    /// The `AsyncRead` wrapper gives hyper exactly what the scanner produces, whatever the
    /// socket's read sizes and hyper's buffer sizes.
    #[test]
    fn guarded_reader_matches_the_scanner(
        input in any_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
        read_sizes in prop::collection::vec(1usize..64, 1..8),
    ) {
        let (want, _) = scan(8192, &[&input], None);
        // An empty read means EOF: the socket never returns one before the end.
        let pieces = split(&input, &cuts).into_iter().filter(|p| !p.is_empty()).map(<[u8]>::to_vec).collect();
        let mut g = Guarded::new(Pieces(pieces), 8192, Arc::new(AtomicBool::new(false)));
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = vec![];
        for n in read_sizes.iter().cycle() {
            let mut storage = vec![0u8; *n];
            let mut rb = ReadBuf::new(&mut storage);
            match Pin::new(&mut g).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                other => prop_assert!(false, "unexpected poll result {:?}", other),
            }
        }
        prop_assert_eq!(got, want);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Public-route paths
// ---------------------------------------------------------------------------------------------

/// Percent-decode every valid `%XX` escape once (invalid ones stay as they are).
fn decode_all(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c)))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4 on a path split into segments (the path starts with `/`).
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut out: Vec<&[u8]> = vec![];
    let segs: Vec<&[u8]> = path.split(|b| *b == b'/').skip(1).collect();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match *seg {
            b"." => {
                if last {
                    out.push(b"");
                }
            }
            b".." => {
                out.pop();
                if last {
                    out.push(b"");
                }
            }
            s => out.push(s),
        }
    }
    let mut r = vec![];
    for s in out {
        r.push(b'/');
        r.extend_from_slice(s);
    }
    if r.is_empty() {
        r.push(b'/');
    }
    r
}

/// What the most eager app might make of a path: every escape decoded once (`%2e` → `.`,
/// `%2f` → `/`, `%41` → `A`), `\` taken as `/`, path parameters (`;…`) dropped from each
/// segment, then dot segments resolved. Returns `None` for paths not starting with `/`.
fn app_normalise(path: &str) -> Option<Vec<u8>> {
    if !path.starts_with('/') {
        return None;
    }
    let decoded: Vec<u8> = decode_all(path.as_bytes()).into_iter().map(|b| if b == b'\\' { b'/' } else { b }).collect();
    let mut no_params = vec![];
    for (i, seg) in decoded.split(|b| *b == b'/').enumerate() {
        if i > 0 {
            no_params.push(b'/');
        }
        no_params.extend_from_slice(seg.split(|b| *b == b';').next().unwrap_or(b""));
    }
    Some(remove_dot_segments(&no_params))
}

/// Request paths built from the characters that matter: dots, escapes of `.`, `/`, `\`, `;`
/// and of unreserved characters, path parameters, backslashes and plain text.
fn tricky_path() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        3 => "[a-zA-Z0-9_~-]{1,4}",
        2 => Just(".".to_string()),
        1 => Just("..".to_string()),
        1 => Just(";".to_string()),
        1 => Just(";x".to_string()),
        1 => Just("\\".to_string()),
        1 => "%2[eEfF]",
        1 => "%5[cC]",
        1 => "%3[bB]",
        1 => "%(4[1-9a-fA-F]|7[eE]|2[dD]|5[fF]|3[0-9]|25)",
        1 => "%[0-9a-fA-F]{0,2}",
    ];
    let segment = prop::collection::vec(atom, 0..4).prop_map(|a| a.concat());
    let route_prefix = prop::sample::select(vec!["", "/public", "/static", "/public/a", "/login"]);
    (route_prefix, prop::collection::vec(segment, 0..6))
        .prop_map(|(p, segs)| format!("{p}{}", segs.iter().map(|s| format!("/{s}")).collect::<String>()))
}

/// Routes a config could hold: plain prefixes and exact paths, with or without a trailing `/`.
fn public_route() -> impl Strategy<Value = PublicRoute> {
    (
        prop::sample::select(vec!["/", "/public", "/public/", "/static/", "/public/a", "/login", "/a-b_c~"]),
        prop_oneof![Just(PathMatch::Prefix), Just(PathMatch::Exact)],
    )
        .prop_map(|(path, path_match)| PublicRoute { path: path.into(), path_match, methods: vec![] })
}

/// A clean path: segments of unreserved characters, never `.` or `..`.
fn clean_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_~.-]{0,6}".prop_filter("dot segment", |s| s != "." && s != ".."), 0..6)
        .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect::<String>())
        .prop_map(|p| if p.is_empty() { "/".to_string() } else { p })
}

const DISGUISES: [&str; 14] =
    ["/../", "/./", "%2e%2e", "%2E%2E", "%2e", "%2F", "%2f", "/..;/", "/.;x/", "/..;x/", "%5c", "%5C", "\\", "%3B"];

proptest! {
    #![proptest_config(config(2048))]

    /// Arbitrary strings never panic either check.
    #[test]
    fn path_checks_never_panic(path in "(?s).{0,64}", route in public_route(), other in "(?s).{0,12}") {
        let _ = path_is_public_candidate(&path);
        let _ = route.matches("GET", &path);
        let odd = PublicRoute { path: other, path_match: PathMatch::Prefix, methods: vec![] };
        let _ = odd.matches("GET", &path);
    }

    /// A path that counts as public for a route still lies under that route once the app has
    /// decoded escapes, taken `\` as `/`, dropped path parameters and resolved dot segments.
    #[test]
    fn public_paths_stay_public_after_app_normalisation(path in tricky_path(), route in public_route()) {
        if path_is_public_candidate(&path) && route.matches("GET", &path) {
            let normal = app_normalise(&path).unwrap();
            let normal = String::from_utf8_lossy(&normal);
            prop_assert!(
                route.matches("GET", &normal),
                "{:?} is public under {:?} but the app reads it as {:?}", path, route.path, normal
            );
        }
    }

    /// Inserting a dot segment, an escaped dot, slash, backslash or semicolon anywhere in a path
    /// makes it non-public.
    #[test]
    fn inserted_dot_segments_and_escapes_make_a_path_non_public(
        path in prop_oneof![clean_path(), tricky_path()],
        at in any::<Index>(),
        disguise in prop::sample::select(DISGUISES.to_vec()),
    ) {
        let i = at.index(path.len() + 1);
        let edited = format!("{}{disguise}{}", &path[..i], &path[i..]);
        prop_assert!(!path_is_public_candidate(&edited), "{:?}", edited);
    }

    /// Paths without dot segments, escapes, backslashes or semicolons are public candidates: the
    /// check does not turn ordinary public paths away.
    #[test]
    fn clean_paths_are_public_candidates(path in clean_path()) {
        prop_assert!(path_is_public_candidate(&path));
        prop_assert_eq!(app_normalise(&path).unwrap(), path.as_bytes().to_vec());
    }

    /// `PublicRoute::matches` follows its documented rule: exact equality, or for a prefix the
    /// path itself, anything below it, never a sibling like `/publicity`.
    #[test]
    fn route_matching_follows_the_documented_rule(route in public_route(), path in prop_oneof![tricky_path(), "(?s).{0,20}"]) {
        let p = route.path.as_str();
        let want = match route.path_match {
            PathMatch::Exact => path == p,
            PathMatch::Prefix if p.ends_with('/') => path.starts_with(p),
            PathMatch::Prefix => path == p || path.starts_with(&format!("{p}/")),
        };
        prop_assert_eq!(route.matches("GET", &path), want);
        let methods = PublicRoute { methods: vec!["POST".into()], ..route.clone() };
        prop_assert!(!methods.matches("GET", &path));
        prop_assert_eq!(methods.matches("POST", &path), want);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The issuer API's percent decoder

/// Found by `percent_decode_is_strict_and_never_panics`: `u8::from_str_radix` accepts a leading
/// `+`, so `%+a` decoded to a newline although an escape is `%` and two hex digits.
#[test]
fn percent_decode_refuses_signed_escapes() {
    for bad in ["%+a", "%+0", "x%+Fy", "%-1", "% a", "%a"] {
        assert_eq!(percent_decode(bad), None, "{bad:?}");
    }
    assert_eq!(percent_decode("%2B%2b%41"), Some("++A".into()));
}
// ---------------------------------------------------------------------------------------------

/// Percent-encode `s`: bytes outside the RFC 3986 unreserved set always, unreserved ones when
/// `flags` say so; hex digits in upper or lower case as `flags` say.
fn percent_encode(s: &str, flags: &[(bool, bool)]) -> String {
    let mut out = String::new();
    for (i, b) in s.bytes().enumerate() {
        let (force, upper) = flags.get(i % flags.len().max(1)).copied().unwrap_or((false, true));
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if unreserved && !force {
            out.push(b as char);
        } else if upper {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// Strict RFC 3986 decoding: `%` must be followed by two hex digits; the result must be UTF-8.
fn strict_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

proptest! {
    #![proptest_config(config(2048))]

    /// Arbitrary input, biased towards `%`, signs, hex digits and multi-byte characters: never
    /// a panic, and exactly the strict RFC 3986 result (malformed escapes → `None`).
    #[test]
    fn percent_decode_is_strict_and_never_panics(s in prop_oneof!["(?s).{0,24}", "([%+0-9a-fA-F-]|é|\u{1F600}|%[+-][0-9a-f]){0,12}"]) {
        prop_assert_eq!(percent_decode(&s), strict_decode(&s), "{:?}", s);
    }

    /// Whatever is encoded (any string, unreserved characters escaped or not, hex in either
    /// case) decodes back to itself.
    #[test]
    fn percent_decode_round_trips_an_encoder(
        s in "(?s).{0,32}",
        flags in prop::collection::vec(any::<(bool, bool)>(), 0..8),
    ) {
        prop_assert_eq!(percent_decode(&percent_encode(&s, &flags)), Some(s));
    }
}
