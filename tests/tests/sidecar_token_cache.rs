//! The verified-token cache through the real sidecar binary: a cached token is still refused
//! the moment its key leaves the key set and at exp + leeway, and the session check still runs
//! on every request.

use std::time::Duration;

use authrealm_contract::keygen::generate;
use authrealm_contract::{Alg, KeySet, KeyState};
use authrealm_tests::sidecar::{Sidecar, Upstream, metric_value, test_config};
use http::StatusCode;
use serde_json::json;

const RELOADS_OK: &str = "authrealm_sidecar_key_reloads_total{outcome=\"ok\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_refused_when_their_key_goes_and_when_they_expire() {
    let upstream = Upstream::start().await.unwrap();
    let old = generate(Alg::ES256, "old", 0, KeyState::Current).unwrap();
    let keys = KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys: vec![old.clone()] };
    let mut cfg = test_config("cache", None);
    cfg.leeway_seconds = 1;
    let s = Sidecar::start(cfg, &keys, upstream.addr).await.unwrap();

    // Used three times: verified once, then served from the cache.
    let t = s.mint("alice").await.unwrap()["access_token"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::OK);
    }
    let m = s.metrics().await.unwrap();
    assert!(metric_value(&m, "authrealm_sidecar_token_cache_hits_total") >= 1.0, "{m}");
    assert!(metric_value(&m, "authrealm_sidecar_token_cache_entries") >= 1.0, "{m}");
    // Identity headers come from the cached verification.
    let seen = upstream.seen();
    assert_eq!(seen.last().unwrap().headers["x-auth-subject"], "alice");

    // An expired cached token is refused at exp + leeway, to the second.
    let short = s.mint_with(json!({"subject": "bob", "ttl_seconds": 1})).await.unwrap();
    let short = short["access_token"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(s.get("/x", Some(&short)).await.unwrap().status, StatusCode::OK);
    }
    let exp = {
        use base64::Engine as _;
        let p = short.split('.').nth(1).unwrap();
        let c: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        c["exp"].as_i64().unwrap()
    };
    let refused_from_ms = (exp + 1 + 1) * 1000; // accepted while now <= exp + leeway (1 s)
    loop {
        let before = authrealm_tests::sidecar::unix_now_ms();
        let status = s.get("/x", Some(&short)).await.unwrap().status;
        let after = authrealm_tests::sidecar::unix_now_ms();
        if after < refused_from_ms {
            assert_eq!(status, StatusCode::OK, "refused before exp + leeway");
        } else if before >= refused_from_ms {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "an expired cached token was accepted");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Rotation: a new key signs, the old one is retired (still verifies: cached or not, the
    // token keeps working) ...
    let new = generate(Alg::ES256, "new", 0, KeyState::Current).unwrap();
    let mut retired = old.clone();
    retired.state = KeyState::Retired;
    let reloads = metric_value(&s.metrics().await.unwrap(), RELOADS_OK);
    let rotated =
        KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys: vec![new.clone(), retired] };
    s.write_key_set(&rotated).unwrap();
    s.wait_metric(RELOADS_OK, |v| v > reloads).await;
    assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::OK);
    assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::OK);
    // ... then the old key is removed: its token, cached a moment ago, is refused on the very
    // next request.
    let reloads = metric_value(&s.metrics().await.unwrap(), RELOADS_OK);
    let only_new = KeySet { version: authrealm_contract::keyset::KEYSET_VERSION.into(), keys: vec![new] };
    s.write_key_set(&only_new).unwrap();
    s.wait_metric(RELOADS_OK, |v| v > reloads).await;
    assert_eq!(s.get("/x", Some(&t)).await.unwrap().status, StatusCode::UNAUTHORIZED);
}
