//! Key rotation against a real kube-apiserver, checked with the sidecar's own token code:
//! tokens minted by each key verify against the published JWKS for exactly their lifetime; and
//! the operator binary SIGKILLed at random points during rotation never loses, regenerates or
//! duplicates a key.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use authrealm_contract::{KeySet, KeyState};
use authrealm_operator::crd::AuthRealm;
use authrealm_sidecar::keys::KeyRing;
use authrealm_sidecar::token::{Reject, mint, validate};
use common::*;
use kube::api::Api;
use serde_json::json;

fn rank(s: KeyState) -> u8 {
    match s {
        KeyState::Next => 0,
        KeyState::Current => 1,
        KeyState::Retired => 2,
    }
}

struct Minted {
    token: String,
    kid: String,
    minted: i64,
    exp: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_before_signing_and_keeps_every_key_until_its_tokens_expire() -> anyhow::Result<()> {
    const INTERVAL: i64 = 6;
    const PROPAGATION: i64 = 2;
    const TTL: i64 = 3;
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("rotation").await?;
    let op = InProcess::start(client.clone(), &ns);
    let mut spec = stateless_spec();
    spec["tokenTtl"] = json!(format!("{TTL}s"));
    spec["clockLeeway"] = json!("0s");
    spec["keyRotation"] = json!({"interval": format!("{INTERVAL}s"), "propagationDelay": format!("{PROPAGATION}s")});
    create_realm(&client, &ns, &realm("rot", spec)).await?;
    wait_condition(&client, &ns, "rot", "Ready", "True", None, Duration::from_secs(30)).await?;

    let policy = stateless_policy();
    // Per kid: (state or None = gone, first time seen in that state) from the JWKS.
    let mut timeline: BTreeMap<String, Vec<(Option<KeyState>, f64)>> = BTreeMap::new();
    let mut tokens: Vec<Minted> = Vec::new();
    let mut checks = 0u64;
    let started = Instant::now();
    let first_kid = jwks_keyset(&client, &ns, "rot").await.unwrap().current().unwrap().kid.clone();
    while started.elapsed() < Duration::from_secs(26) {
        let (Some(full), Some(public)) =
            (secret_keyset(&client, &ns, "rot").await, jwks_keyset(&client, &ns, "rot").await)
        else {
            panic!("keys Secret or JWKS missing");
        };
        let t = unix_now_f();
        let now = t.floor() as i64;
        // Record state transitions as seen by verify-only pods.
        for k in &public.keys {
            let seen = timeline.entry(k.kid.clone()).or_default();
            if seen.last().map(|(s, _)| *s) != Some(Some(k.state)) {
                seen.push((Some(k.state), t));
            }
        }
        for (kid, seen) in timeline.iter_mut() {
            if public.get(kid).is_none() && seen.last().is_some_and(|(s, _)| s.is_some()) {
                seen.push((None, t));
            }
        }
        // An issuer pod (full key set, zero lag) mints with whatever key is current now.
        let signer = KeyRing::from_set(&full, [0; 32])?;
        let m = mint(&signer, &policy.issuer, "alice", json!("app"), serde_json::Map::new(), now, TTL)?;
        tokens.push(Minted { token: m.token, kid: m.kid, minted: now, exp: m.exp });
        // Every token verifies against the published JWKS exactly while it is unexpired.
        let verifier = KeyRing::from_set(&public, [0; 32])?;
        for tk in &tokens {
            let r = validate(&tk.token, &verifier, &policy, now);
            if now <= tk.exp {
                assert!(
                    r.is_ok(),
                    "token of {} minted at {} (exp {}) rejected at {now}: {:?}; published: {:?}",
                    tk.kid,
                    tk.minted,
                    tk.exp,
                    r.err(),
                    public.keys.iter().map(|k| (&k.kid, k.state)).collect::<Vec<_>>()
                );
            } else {
                assert!(matches!(r, Err(Reject::Expired) | Err(Reject::UnknownKid)), "{r:?}");
            }
            checks += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Lifecycle order and timing per key.
    let mut promoted = 0;
    let mut removed = 0;
    for (kid, seen) in &timeline {
        let states: Vec<_> = seen.iter().map(|(s, _)| s.map_or(3, rank)).collect();
        assert!(states.windows(2).all(|w| w[0] < w[1]), "{kid}: states out of order: {seen:?}");
        let at = |s: Option<KeyState>| seen.iter().find(|(x, _)| *x == s).map(|(_, t)| *t);
        if kid != &first_kid {
            assert_eq!(seen[0].0, Some(KeyState::Next), "{kid} appeared as {:?}", seen[0]);
        }
        if let (Some(next), Some(cur)) = (at(Some(KeyState::Next)), at(Some(KeyState::Current))) {
            assert!(cur - next >= PROPAGATION as f64 - 1.0, "{kid} signed {:.1}s after publication", cur - next);
            promoted += 1;
        }
        if let (Some(ret), Some(gone)) = (at(Some(KeyState::Retired)), at(None)) {
            assert!(
                gone - ret >= (PROPAGATION + TTL) as f64 - 1.0,
                "{kid} removed {:.1}s after retirement",
                gone - ret
            );
            removed += 1;
        }
    }
    eprintln!(
        "{} keys, {promoted} promotions, {removed} removals, {} tokens, {checks} verifications",
        timeline.len(),
        tokens.len()
    );
    assert!(promoted >= 3 && removed >= 2, "too little rotation in 26 s: {timeline:#?}");
    let kids_that_signed: BTreeSet<_> = tokens.iter().map(|t| t.kid.clone()).collect();
    assert!(kids_that_signed.len() >= 4);

    // Events in order for one full lifecycle, and the status timeline.
    let evs = events(&client, &ns, "rot").await;
    let done = timeline
        .iter()
        .find(|(_, s)| s.last().is_some_and(|(x, _)| x.is_none()) && s.len() == 4)
        .map(|(k, _)| k.clone());
    if let Some(kid) = done {
        let mine: Vec<_> = evs.iter().filter(|(_, n)| n.contains(&kid)).map(|(r, _)| r.as_str()).collect();
        assert_eq!(mine, ["KeyCreated", "KeyPromoted", "KeyRetired", "KeyRemoved"], "{evs:?}");
    }
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    let st = api.get("rot").await?.status.unwrap();
    assert!(st.next_rotation_time.is_some());
    assert!(st.keys.iter().filter(|k| k.state == "retired").all(|k| k.remove_after.is_some()));
    op.stop().await?;
    Ok(())
}

/// One observation of the keys Secret.
struct Seen {
    t: f64,
    set: KeySet,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_never_loses_regenerates_or_duplicates_a_key() -> anyhow::Result<()> {
    const INTERVAL: i64 = 4;
    const PROPAGATION: i64 = 1;
    const LIFETIME: i64 = 2; // tokenTtl 2s + leeway 0s
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("sigkill").await?;
    let mut spec = stateless_spec();
    spec["tokenTtl"] = json!("2s");
    spec["clockLeeway"] = json!("0s");
    spec["keyRotation"] = json!({"interval": format!("{INTERVAL}s"), "propagationDelay": format!("{PROPAGATION}s")});
    let args = [
        "--namespace",
        &ns,
        "--lease-namespace",
        &ns,
        "--identity",
        "operator-0",
        "--lease-duration=4s",
        "--renew-deadline=3s",
        "--retry-period=1s",
        "--webhook-enabled=false",
    ];
    let mut proc = OperatorProcess::spawn(&env, "operator-sigkill", &args)?;
    create_realm(&client, &ns, &realm("crash", spec)).await?;
    wait_condition(&client, &ns, "crash", "Ready", "True", None, Duration::from_secs(30)).await?;

    // Observe the Secret continuously while the operator is killed at random moments.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let observer = {
        let client = client.clone();
        let ns = ns.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                if let Some(set) = secret_keyset(&client, &ns, "crash").await {
                    seen.push(Seen { t: unix_now_f(), set });
                }
                tokio::select! {
                    _ = &mut stop_rx => return seen,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };
    let (mut rng, seed) = Rng::from_time();
    eprintln!("kill schedule seed {seed} (AUTHREALM_TEST_SEED={seed} replays it)");
    let t0 = Instant::now();
    let kills = 12;
    for i in 0..kills {
        let wait = 200 + rng.below(2300);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        proc.kill();
        // Sometimes restart at once, sometimes after a pause longer than the propagation delay.
        if i % 3 == 2 {
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(1500))).await;
        }
        proc = OperatorProcess::spawn(&env, "operator-sigkill", &args)?;
    }
    let chaos = t0.elapsed();
    // Converge: the last process carries the rotation on — a promotion after the chaos (at most
    // an interval away, plus its start and a lease takeover).
    let after_chaos = secret_keyset(&client, &ns, "crash").await.and_then(|s| Some(s.current()?.kid.clone()));
    wait_for("a promotion after the chaos", Duration::from_secs(4 * INTERVAL as u64), || {
        let (client, ns, after_chaos) = (client.clone(), ns.clone(), after_chaos.clone());
        async move {
            let kid = secret_keyset(&client, &ns, "crash").await?.current()?.kid.clone();
            (Some(kid) != after_chaos).then_some(())
        }
    })
    .await?;
    let _ = stop_tx.send(());
    let seen = observer.await?;
    eprintln!("{kills} SIGKILLs over {chaos:.1?}; {} observations of the Secret", seen.len());

    // 1. Every observation is a valid set: unique kids, at most one current key.
    for s in &seen {
        s.set.validate().unwrap_or_else(|e| panic!("invalid set at {}: {e}", s.t));
        assert!(s.set.current().is_some(), "no current key at {}", s.t);
    }
    // 2. A kid's material never changes (no regeneration under an existing kid), its state only
    //    moves forward, and once gone it never comes back.
    let mut first: BTreeMap<String, authrealm_contract::KeyEntry> = BTreeMap::new();
    let mut gone: BTreeMap<String, f64> = BTreeMap::new();
    let mut last_state: BTreeMap<String, KeyState> = BTreeMap::new();
    let mut prev: Option<&Seen> = None;
    for s in &seen {
        for k in &s.set.keys {
            assert!(!gone.contains_key(&k.kid), "{} reappeared at {}", k.kid, s.t);
            let f = first.entry(k.kid.clone()).or_insert_with(|| k.clone());
            assert_eq!(
                (&f.public_jwk, &f.private_key_pem, f.alg, f.created_at <= k.created_at),
                (&k.public_jwk, &k.private_key_pem, k.alg, true),
                "key {} changed material",
                k.kid
            );
            if let Some(old) = last_state.insert(k.kid.clone(), k.state) {
                assert!(rank(old) <= rank(k.state), "{} went from {old:?} to {:?}", k.kid, k.state);
            }
        }
        // 3. A key leaves the set only after every token it can have signed has expired.
        if let Some(p) = prev {
            for k in &p.set.keys {
                if s.set.get(&k.kid).is_none() {
                    assert_eq!(k.state, KeyState::Retired, "{} vanished while {:?} at {}", k.kid, k.state, s.t);
                    let retired = k.retired_at.expect("retired_at") as f64;
                    assert!(
                        s.t + 1.0 >= retired + (PROPAGATION + LIFETIME) as f64,
                        "{} removed at {:.1}, retired at {retired}",
                        k.kid,
                        s.t
                    );
                    gone.insert(k.kid.clone(), s.t);
                }
            }
        }
        prev = Some(s);
    }
    // 4. Every key after the first was published as `next` before it signed, and no more keys
    //    were made than the schedule calls for.
    let bootstrap = seen[0].set.current().unwrap().kid.clone();
    let mut first_state: BTreeMap<String, KeyState> = BTreeMap::new();
    for s in &seen {
        for k in &s.set.keys {
            first_state.entry(k.kid.clone()).or_insert(k.state);
        }
    }
    for (kid, st) in &first_state {
        if kid != &bootstrap && *st != KeyState::Next {
            // Its observed (time, state) transitions, and the Secret just before and at its
            // first appearance.
            let mut trail: Vec<(f64, KeyState)> = Vec::new();
            for s in &seen {
                if let Some(k) = s.set.get(kid)
                    && trail.last().is_none_or(|(_, x)| *x != k.state)
                {
                    trail.push((s.t, k.state));
                }
            }
            let i = seen.iter().position(|s| s.set.get(kid).is_some()).unwrap();
            let describe = |s: &Seen| {
                let keys: Vec<_> = s
                    .set
                    .keys
                    .iter()
                    .map(|k| {
                        format!(
                            "{} {:?} created {} activated {:?} retired {:?}",
                            k.kid, k.state, k.created_at, k.activated_at, k.retired_at
                        )
                    })
                    .collect();
                format!("at {:.3}: [{}]", s.t, keys.join("; "))
            };
            let before = if i > 0 { describe(&seen[i - 1]) } else { "none".to_owned() };
            let after = seen.get(i + 1).map_or("none".to_owned(), describe);
            panic!(
                "{kid} first seen as {st:?} (expected Next); its states: {trail:?}\nprevious observation {before}\nfirst observation {}\nnext observation {after}\noperator log: {}",
                describe(&seen[i]),
                proc.log.display()
            );
        }
    }
    let span = seen.last().unwrap().t - seen[0].t;
    let max_keys = (span / INTERVAL as f64).ceil() as usize + 2;
    assert!(first.len() <= max_keys, "{} keys in {span:.0}s (at most {max_keys} expected)", first.len());
    let promotions =
        first.values().filter(|k| k.kid != bootstrap).filter(|k| last_state[&k.kid] != KeyState::Next).count();
    assert!(promotions >= 3, "only {promotions} promotions in {span:.0}s");

    // 5. It converges: Ready, status agrees with the Secret, the JWKS is the Secret's public half.
    let r = wait_condition(&client, &ns, "crash", "Ready", "True", None, Duration::from_secs(30)).await?;
    let full = secret_keyset(&client, &ns, "crash").await.unwrap();
    let public = wait_for("JWKS = public(Secret)", Duration::from_secs(10), || {
        let client = client.clone();
        let ns = ns.clone();
        let want = full.public_only();
        async move { jwks_keyset(&client, &ns, "crash").await.filter(|p| *p == want) }
    })
    .await;
    assert!(public.is_ok(), "JWKS never matched the Secret");
    let st = r.status.unwrap();
    let cur = secret_keyset(&client, &ns, "crash").await.unwrap().current().unwrap().kid.clone();
    // The status may trail a promotion by a reconcile.
    assert!(st.current_kid.is_some());
    eprintln!(
        "{} distinct keys, {promotions} promotions, current {cur}; operator log: {}",
        first.len(),
        proc.log.display()
    );
    proc.kill();
    Ok(())
}
