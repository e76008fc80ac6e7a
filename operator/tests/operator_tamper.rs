//! A user deletes or edits the keys Secret (or the JWKS) by hand: the documented recovery
//! happens, with a Warning event and the KeysIntact condition, and live tokens keep verifying.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use authrealm_contract::KeyState;
use authrealm_operator::crd::AuthRealm;
use authrealm_sidecar::keys::KeyRing;
use authrealm_sidecar::token::{Policy, mint, validate};
use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

fn policy() -> Policy {
    stateless_policy()
}

/// A stateless realm (no leeway) that is Ready, its key set, and a token signed with its current
/// key living `ttl_secs`.
async fn ready_realm_with_token(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ttl_secs: i64,
    interval: &str,
    propagation: &str,
) -> anyhow::Result<(authrealm_contract::KeySet, authrealm_sidecar::token::Minted)> {
    let mut spec = stateless_spec();
    spec["tokenTtl"] = json!(format!("{ttl_secs}s"));
    spec["clockLeeway"] = json!("0s");
    spec["keyRotation"] = json!({"interval": interval, "propagationDelay": propagation});
    create_realm(client, ns, &realm(name, spec)).await?;
    wait_condition(client, ns, name, "Ready", "True", None, Duration::from_secs(30)).await?;
    let keys = secret_keyset(client, ns, name).await.ok_or_else(|| anyhow::anyhow!("no keys Secret"))?;
    let token = mint(
        &KeyRing::from_set(&keys, [0; 32])?,
        "https://auth.example.test",
        "bob",
        json!("app"),
        Default::default(),
        unix_now(),
        ttl_secs,
    )?;
    Ok((keys, token))
}

async fn edit_secret_data(client: &kube::Client, ns: &str, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut s = secrets.get(name).await?;
    s.data = Some(BTreeMap::from([("keyset.json".to_owned(), ByteString(bytes.to_vec()))]));
    // A plain update, as `kubectl edit` does (another field manager).
    secrets.replace(name, &Default::default(), &s).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_edited_keys_secret_is_restored_from_the_operators_copy() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("restore").await?;
    let op = InProcess::start(client.clone(), &ns);
    create_realm(&client, &ns, &realm("keys", stateless_spec())).await?;
    wait_condition(&client, &ns, "keys", "Ready", "True", None, Duration::from_secs(30)).await?;
    let original = secret_keyset(&client, &ns, "keys").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // Deleted: recreated with the very same keys.
    secrets.delete("keys-signing-keys", &DeleteParams::default()).await?;
    let r =
        wait_condition(&client, &ns, "keys", "KeysIntact", "False", Some("SecretRestored"), Duration::from_secs(30))
            .await?;
    assert_eq!(secret_keyset(&client, &ns, "keys").await.unwrap(), original);
    let st = r.status.unwrap();
    assert_eq!(st.conditions[0].status, "True", "a restored Secret does not make the realm unready");
    assert!(st.conditions[3].message.contains("was deleted"), "{}", st.conditions[3].message);

    // Edited (a key replaced by another valid key under the same kid): restored.
    let mut swapped = original.clone();
    let kid = swapped.keys[0].kid.clone();
    swapped.keys[0] = authrealm_contract::keygen::generate(swapped.keys[0].alg, &kid, 0, KeyState::Current)?;
    edit_secret_data(&client, &ns, "keys-signing-keys", swapped.to_json_pretty().as_bytes()).await?;
    wait_for("edited Secret restored", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        let original = original.clone();
        async move { (secret_keyset(&client, &ns, "keys").await? == original).then_some(()) }
    })
    .await?;
    // Garbage: restored.
    edit_secret_data(&client, &ns, "keys-signing-keys", b"{\"not\": \"a key set\"}").await?;
    wait_for("garbage Secret restored", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        let original = original.clone();
        async move { (secret_keyset(&client, &ns, "keys").await? == original).then_some(()) }
    })
    .await?;
    let evs = events(&client, &ns, "keys").await;
    let restored: Vec<_> = evs.iter().filter(|(r, _)| r == "KeysSecretRestored").collect();
    assert!(restored.len() >= 3, "{evs:?}");
    assert!(restored.iter().any(|(_, n)| n.contains("was edited")), "{restored:?}");

    // The JWKS edited by hand is rewritten from the key set.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch("keys-jwks", &PatchParams::default(), &Patch::Merge(json!({"data": {"jwks.json": "{\"keys\":[]}"}})))
        .await?;
    wait_for("JWKS restored", Duration::from_secs(30), || {
        let cms = cms.clone();
        async move {
            let cm = cms.get("keys-jwks").await.ok()?;
            cm.data?.get("jwks.json")?.contains("\"kid\"").then_some(())
        }
    })
    .await?;
    op.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lost_while_the_operator_was_down_keep_live_tokens_verifying() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("lost").await?;
    let op = InProcess::start(client.clone(), &ns);
    let (original, token) = ready_realm_with_token(&client, &ns, "lost", 6, "10s", "2s").await?;
    let old_kid = original.current().unwrap().kid.clone();

    // The operator is down (its copy gone with it) while the Secret is deleted.
    op.stop().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets.delete("lost-signing-keys", &DeleteParams::default()).await?;
    let op = InProcess::start(client.clone(), &ns);
    let r =
        wait_condition(&client, &ns, "lost", "KeysIntact", "False", Some("KeysLost"), Duration::from_secs(30)).await?;
    let st = r.status.unwrap();
    assert_eq!(st.conditions[0].status, "True", "a new key signs at once");
    let recovered = secret_keyset(&client, &ns, "lost").await.unwrap();
    let new_kid = recovered.current().unwrap().kid.clone();
    assert_ne!(new_kid, old_kid, "a lost private key cannot come back");
    let old = recovered.get(&old_kid).expect("old public key kept");
    assert_eq!(old.state, KeyState::Retired);
    assert!(old.private_key_pem.is_none());
    assert_eq!(old.public_jwk, original.get(&old_kid).unwrap().public_jwk, "the old kid keeps its public key");

    // The token signed by the lost key still verifies with the published JWKS until it expires.
    let public = jwks_keyset(&client, &ns, "lost").await.unwrap();
    assert!(public.get(&old_kid).is_some());
    validate(&token.token, &KeyRing::from_set(&public, [0; 32])?, &policy(), unix_now())
        .map_err(|e| anyhow::anyhow!("token of the lost key rejected: {e:?}"))?;
    let evs = events(&client, &ns, "lost").await;
    assert!(evs.iter().any(|(r, n)| r == "SigningKeysLost" && n.contains("kept as retired")), "{evs:?}");

    // KeysIntact clears at the next key promotion.
    let r =
        wait_condition(&client, &ns, "lost", "KeysIntact", "True", Some("Verified"), Duration::from_secs(30)).await?;
    let cur = r.status.unwrap().current_kid.unwrap();
    assert_ne!(cur, new_kid, "KeysIntact should clear only with a promotion");
    // The lost key leaves once its tokens have expired.
    wait_for("old key removed", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = ns.clone();
        let old_kid = old_kid.clone();
        async move { secret_keyset(&client, &ns, "lost").await?.get(&old_kid).is_none().then_some(()) }
    })
    .await?;
    op.stop().await?;
    let api: Api<AuthRealm> = Api::namespaced(client.clone(), &ns);
    assert!(api.get("lost").await?.status.unwrap().conditions.iter().all(|c| c.status == "True"));
    Ok(())
}

/// While the operator is down, someone "repairs" a deleted keys Secret by copying the public
/// `keyset.json` of the JWKS ConfigMap: its current key has no private half, so issuer pods could
/// not mint. The operator keeps those keys as retired verifiers, reports that nothing signs, and
/// publishes a new key that signs after the propagation delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_only_copy_of_the_keys_gets_a_new_signing_key() -> anyhow::Result<()> {
    let env = shared_env(false).await?;
    let client = env.client().await?;
    let ns = env.create_temp_namespace("public-copy").await?;
    let op = InProcess::start(client.clone(), &ns);
    let (original, token) = ready_realm_with_token(&client, &ns, "copy", 60, "10m", "10s").await?;
    let old_kid = original.current().unwrap().kid.clone();

    op.stop().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets.delete("copy-signing-keys", &DeleteParams::default()).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    // Copied from the ConfigMap's YAML, so it keeps the realm's controller owner reference (without
    // it the operator would not touch the Secret at all: NameConflict).
    let jwks = cms.get("copy-jwks").await?;
    let public_json = jwks.data.unwrap()["keyset.json"].clone();
    let copy: Secret = serde_json::from_value(json!({
        "metadata": {"name": "copy-signing-keys", "ownerReferences": jwks.metadata.owner_references},
        "data": {"keyset.json": k8s_openapi::ByteString(public_json.into_bytes())},
    }))?;
    secrets.create(&Default::default(), &copy).await?;
    let op = InProcess::start(client.clone(), &ns);

    // Nothing can sign: said so, instead of KeysReady=True with a key issuers cannot use.
    let r = wait_condition(&client, &ns, "copy", "KeysReady", "False", Some("NoSigningKey"), Duration::from_secs(30))
        .await?;
    let st = r.status.unwrap();
    let intact = st.conditions.iter().find(|c| c.type_ == "KeysIntact").unwrap();
    assert_eq!((intact.status.as_str(), intact.reason.as_str()), ("False", "SecretEditAdopted"));
    assert!(intact.message.contains("had no private key"), "{}", intact.message);
    assert_eq!(st.conditions[0].status, "False", "Ready follows KeysReady");

    // A new key is published first, then signs; the old key stays a verifier.
    let r = wait_condition(&client, &ns, "copy", "KeysReady", "True", None, Duration::from_secs(40)).await?;
    let recovered = secret_keyset(&client, &ns, "copy").await.unwrap();
    let current = recovered.current().unwrap();
    assert_eq!(r.status.unwrap().current_kid.as_deref(), Some(current.kid.as_str()));
    assert_ne!(current.kid, old_kid);
    assert!(current.private_key_pem.is_some(), "the new current key can sign");
    assert!(
        current.activated_at.unwrap() >= current.created_at + 10,
        "the new key was published for the propagation delay before it signed: {current:?}"
    );
    let old = recovered.get(&old_kid).expect("old public key kept");
    assert_eq!((old.state, old.private_key_pem.is_none()), (KeyState::Retired, true));
    let evs = events(&client, &ns, "copy").await;
    assert!(evs.iter().any(|(r, n)| r == "KeyCreated" && n.contains(&current.kid) && n.contains("as next")), "{evs:?}");
    assert!(evs.iter().any(|(r, n)| r == "KeysSecretEditAdopted" && n.contains("had no private key")), "{evs:?}");

    // Tokens of the old key and of the new one verify with the published keys.
    let public = jwks_keyset(&client, &ns, "copy").await.unwrap();
    let ring = KeyRing::from_set(&public, [0; 32])?;
    validate(&token.token, &ring, &policy(), unix_now()).map_err(|e| anyhow::anyhow!("old token rejected: {e:?}"))?;
    let fresh = mint(
        &KeyRing::from_set(&recovered, [0; 32])?,
        "https://auth.example.test",
        "carol",
        json!("app"),
        Default::default(),
        unix_now(),
        60,
    )?;
    validate(&fresh.token, &ring, &policy(), unix_now()).map_err(|e| anyhow::anyhow!("new token rejected: {e:?}"))?;
    op.stop().await?;
    Ok(())
}
