//! Hostile tokens and requests: every one gets a clear rejection and none reaches the app.

use std::time::Duration;

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeyEntry, KeySet, KeyState};
use authrealm_tests::redis_cluster::{RedisCluster, RedisClusterOptions};
use authrealm_tests::sidecar::{Sidecar, Upstream, sign_raw, test_config, unix_now};
use aws_lc_rs::encoding::AsDer;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::StatusCode;
use serde_json::{Value, json};

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn pem(label: &str, der: &[u8]) -> String {
    let body: Vec<String> =
        STANDARD.encode(der).as_bytes().chunks(64).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", body.join("\n"))
}

fn private_der(k: &KeyEntry) -> Vec<u8> {
    let p = k.private_key_pem.as_ref().unwrap();
    let b: String = p.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(b).unwrap()
}

/// SubjectPublicKeyInfo DER of a key entry's public key.
fn public_der(k: &KeyEntry) -> Vec<u8> {
    let der = private_der(k);
    match k.alg {
        Alg::ES256 => {
            use aws_lc_rs::signature::KeyPair;
            let kp = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &der,
            )
            .unwrap();
            let spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = kp.public_key().as_der().unwrap();
            spki.as_ref().to_vec()
        }
        Alg::RS256 => {
            use aws_lc_rs::signature::KeyPair;
            let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der).unwrap();
            let spki: aws_lc_rs::encoding::PublicKeyX509Der<'_> = kp.public_key().as_der().unwrap();
            spki.as_ref().to_vec()
        }
        _ => unreachable!(),
    }
}

fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// P-256 group order n, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa,
    0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// Replace an ES256 signature (r, s) by (r, n − s): also valid, different bytes.
fn malleate_es256(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let s = &raw[32..64];
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = P256_N[i] as i16 - s[i] as i16 - borrow;
        borrow = if d < 0 { 1 } else { 0 };
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    raw[32..].copy_from_slice(&out);
    format!("{input}.{}", b64(&raw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_and_requests_are_rejected() {
    let cluster = RedisCluster::start(RedisClusterOptions::default()).unwrap();
    let upstream = Upstream::start().await.unwrap();
    let es = generate(Alg::ES256, "k1", 0, KeyState::Current).unwrap();
    let rs = generate(Alg::RS256, "k2", 0, KeyState::Retired).unwrap();
    let keys =
        KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys: vec![es.clone(), rs.clone()] };
    let mut cfg = test_config("hostile", Some(cluster.seeds()));
    cfg.algorithms = vec![Alg::ES256, Alg::RS256, Alg::HS256];
    cfg.public_routes = vec![authrealm_contract::config::PublicRoute {
        path: "/public".into(),
        path_match: Default::default(),
        methods: vec![],
    }];
    let s = Sidecar::start(cfg.clone(), &keys, upstream.addr).await.unwrap();
    s.wait_ready(Duration::from_secs(20)).await.unwrap();

    // A good token and the material to forge others from.
    let good = s.mint("alice").await.unwrap();
    let good_token = good["access_token"].as_str().unwrap().to_string();
    assert_eq!(s.get("/x", Some(&good_token)).await.unwrap().status, StatusCode::OK);
    let lower = s
        .request(s.public, "GET", "/x", &[("authorization", &format!("bearer {good_token}"))], Default::default())
        .await
        .unwrap();
    assert_eq!(lower.status, StatusCode::OK, "the auth scheme is case-insensitive");
    let now = unix_now();
    let claims = |extra: Value| {
        let mut c =
            json!({"iss": cfg.issuer, "aud": "app", "sub": "alice", "jti": good["jti"], "iat": now, "exp": now + 300});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let es_header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
    let forged = |header: Value, extra: Value| sign_raw(&es, &header, &claims(extra));

    // Revoke the good token, then try to bring it back by re-encoding it.
    let r = s.issuer_call("DELETE", &format!("/v1/tokens/{}", good["jti"].as_str().unwrap()), None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let malleated = malleate_es256(&good_token);
    assert_ne!(malleated, good_token);
    let mut reencoded = good_token.clone();
    let last = reencoded.pop().unwrap();
    // Flip the unused low bits of the last base64url character.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let idx = alphabet.iter().position(|&c| c == last as u8).unwrap();
    reencoded.push(alphabet[idx ^ 0b11] as char);

    // An ES256 token whose jti/sub are live, to build signature-level forgeries from.
    let live = s.mint("bob").await.unwrap();
    let live_token = live["access_token"].as_str().unwrap().to_string();
    let parts: Vec<&str> = live_token.split('.').collect();
    let live_claims =
        json!({"iss": cfg.issuer, "aud": "app", "sub": "bob", "jti": live["jti"], "iat": now, "exp": now + 300});
    let es_pub_der = public_der(&es);
    let rs_pub_der = public_der(&rs);
    let hs_header = json!({"alg": "HS256", "kid": "k1", "typ": "JWT"});
    let hs_header_rs = json!({"alg": "HS256", "kid": "k2", "typ": "JWT"});
    let tampered_payload =
        format!("{}.{}.{}", parts[0], b64(claims(json!({"sub": "admin"})).to_string().as_bytes()), parts[2]);
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let tampered_sig = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
    let zero_sig = format!("{}.{}.{}", parts[0], parts[1], b64(&[0u8; 64]));
    let unsigned =
        |alg: &str| format!("{}.{}.", b64(json!({"alg": alg, "kid": "k1"}).to_string().as_bytes()), parts[1]);
    let resigned = |alg: &str| {
        format!("{}.{}.{}", b64(json!({"alg": alg, "kid": "k1"}).to_string().as_bytes()), parts[1], parts[2])
    };
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(9000), parts[2]);

    let cases: Vec<(&str, String)> = vec![
        ("revoked", good_token.clone()),
        ("revoked, ECDSA-malleated (r, n-s)", malleated),
        ("revoked, re-encoded trailing bits", reencoded),
        ("expired", forged(es_header.clone(), json!({"exp": now - 120, "iat": now - 600}))),
        ("nbf in the future", forged(es_header.clone(), json!({"nbf": now + 600}))),
        ("iat in the future", forged(es_header.clone(), json!({"iat": now + 600}))),
        ("wrong iss", forged(es_header.clone(), json!({"iss": "https://evil.example"}))),
        ("iss as array", forged(es_header.clone(), json!({"iss": [cfg.issuer]}))),
        ("wrong aud", forged(es_header.clone(), json!({"aud": "other"}))),
        ("aud as number", forged(es_header.clone(), json!({"aud": 7}))),
        ("nbf as string", forged(es_header.clone(), json!({"nbf": "0"}))),
        ("exp missing", forged(es_header.clone(), json!({"exp": null}))),
        ("unknown kid", forged(json!({"alg": "ES256", "kid": "nope"}), json!({}))),
        ("no kid", forged(json!({"alg": "ES256"}), json!({}))),
        ("kid of another alg", forged(json!({"alg": "RS256", "kid": "k1"}), json!({}))),
        ("tampered payload", tampered_payload),
        ("tampered signature", tampered_sig),
        ("alg none", unsigned("none")),
        ("alg None", unsigned("None")),
        ("alg empty", unsigned("")),
        ("alg none, signature kept", resigned("none")),
        ("alg lower-case es256", resigned("es256")),
        ("alg HS512 (not allowed)", resigned("HS512")),
        ("HS256 with EC public key PEM", hs256(pem("PUBLIC KEY", &es_pub_der).as_bytes(), &hs_header, &live_claims)),
        ("HS256 with EC public key DER", hs256(&es_pub_der, &hs_header, &live_claims)),
        (
            "HS256 with RSA public key PEM",
            hs256(pem("PUBLIC KEY", &rs_pub_der).as_bytes(), &hs_header_rs, &live_claims),
        ),
        ("HS256 with RSA public key DER", hs256(&rs_pub_der, &hs_header_rs, &live_claims)),
        ("ES256 signature of zeros", zero_sig),
        ("crit header", forged(json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}), json!({}))),
        ("embedded jwk", forged(json!({"alg": "ES256", "kid": "k1", "jwk": es.public_jwk}), json!({}))),
        ("jku", forged(json!({"alg": "ES256", "kid": "k1", "jku": "http://127.0.0.1:1/jwks"}), json!({}))),
        ("x5u", forged(json!({"alg": "ES256", "kid": "k1", "x5u": "http://127.0.0.1:1/x5u"}), json!({}))),
        ("b64 false", forged(json!({"alg": "ES256", "kid": "k1", "b64": false}), json!({}))),
        ("2 segments", format!("{}.{}", parts[0], parts[1])),
        ("4 segments", format!("{live_token}.{}", parts[2])),
        ("5 segments (JWE shape)", format!("{live_token}.x.y")),
        ("oversized", huge),
        ("garbage", "not-a-jwt".into()),
        ("empty segments", "..".into()),
    ];
    upstream.clear();
    for (name, t) in &cases {
        let r = s.get("/secret", Some(t)).await.unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}: {r:?}");
        let www = r.headers.get("www-authenticate").unwrap().to_str().unwrap();
        assert_eq!(www, "Bearer realm=\"hostile\", error=\"invalid_token\"", "{name}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("kid") && !body.contains("signature") && body.len() < 64,
            "{name}: error body leaks detail: {body}"
        );
    }
    assert!(upstream.seen().is_empty(), "a rejected request reached the app");
    assert_eq!(s.get("/x", Some(&live_token)).await.unwrap().status, StatusCode::OK, "the live token still works");

    // HTTP-level rejections.
    let r = s.get("/secret", None).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"hostile\"");
    let r =
        s.request(s.public, "GET", "/secret", &[("authorization", "Basic YTpi")], Default::default()).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let auth = format!("Bearer {live_token}");
    let r = s
        .request(s.public, "GET", "/secret", &[("authorization", &auth), ("authorization", &auth)], Default::default())
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "two Authorization headers");
    let r = s.get(&format!("/secret?access_token={live_token}"), None).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "token only in the query string");
    let r = s.get(&format!("/secret?a=1&access_token={live_token}"), Some(&live_token)).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "token in query and header");
    let big = "a".repeat(20_000);
    let r =
        s.request(s.public, "GET", "/secret", &[("authorization", &auth), ("x-big", &big)], Default::default()).await;
    match r {
        Ok(r) => assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => panic!("oversized headers must get 431, got {e}"),
    }
    let medium = "a".repeat(16_200);
    let r = s
        .request(s.public, "GET", "/secret", &[("authorization", &auth), ("x-big", &medium)], Default::default())
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "the configured limit, not hyper's buffer, decides"
    );

    // Request smuggling shapes: rejected with 400, the app receives nothing.
    upstream.clear();
    for raw in [
        format!(
            "POST /smuggle HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "POST /smuggle HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "POST /smuggle HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
        ),
        format!(
            "POST /smuggle HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "GET /ok HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        // An Upgrade header the app does not accept (no 101) must not switch the guard off.
        format!(
            "GET /ok HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nUpgrade: foo\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        // Bare-LF header lines (accepted by hyper's parser) ending in a CRLF blank line.
        format!(
            "POST /smuggle HTTP/1.1\nHost: x\nAuthorization: {auth}\nContent-Length: 5\nTransfer-Encoding: chunked\n\r\n0\r\n\r\n"
        ),
    ] {
        let out = s.raw(raw.as_bytes(), Duration::from_secs(3)).await.unwrap();
        assert!(out.contains("HTTP/1.1 400"), "ambiguous framing must be answered 400: {out:?}");
    }
    let seen = upstream.seen();
    assert!(seen.iter().all(|r| r.path != "/smuggle"), "an ambiguous request reached the app: {seen:?}");
    assert_eq!(seen.iter().filter(|r| r.path == "/ok").count(), 2, "the well-formed requests before them were served");

    // Public routes skip authentication but still cannot smuggle identity.
    upstream.clear();
    let r = s
        .request(
            s.public,
            "GET",
            "/public/page",
            &[("x-auth-subject", "root"), ("X_AUTH_SUBJECT", "root")],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let seen = upstream.seen();
    assert!(seen[0].headers.keys().all(|k| !k.as_str().replace('_', "-").eq_ignore_ascii_case("x-auth-subject")));

    // A public prefix cannot be used to reach a private path through dot segments.
    for path in [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/..%2fsecret",
        "/public/./x",
        "/public/..;/secret",
        "/public/..;jsessionid=1/secret",
        "/public/..%3B/secret",
    ] {
        let r = s.request(s.public, "GET", path, &[], Default::default()).await.unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
    }

    // Reasons are visible to operators in metrics (never to clients).
    let m = s.metrics().await.unwrap();
    for reason in
        ["kid_alg_mismatch", "forbidden_header", "session_revoked", "bad_signature", "expired", "alg_not_allowed"]
    {
        assert!(m.contains(&format!("reason=\"{reason}\"")), "metric reason {reason} missing");
    }
    assert!(!m.contains(&live_token[..20]), "token material in metrics");
}
