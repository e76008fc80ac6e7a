//! The reconcile of one AuthRealm, and what happens when it fails.
//!
//! In order: a realm being deleted is cleaned up ([`crate::cleanup`]); a spec that does not
//! resolve, or a name taken by an object the realm does not control ([`crate::ownership`]),
//! holds the realm as it is and only its status says why ([`status::held`]); otherwise the keys
//! are synced ([`crate::keysync`] plans, `sync_keys` writes), the sidecar config is written if
//! it changed, Events report key changes, recoveries and Redis flips, and the status is written
//! if it changed ([`status::settled`]). The realm is requeued for its next rotation event.
//!
//! A failed reconcile is retried with a per-realm exponential backoff ([`error_policy`]), counted
//! in `authrealm_operator_reconcile_errors_total{kind}` and reported as a `ReconcileFailed`
//! Warning Event (one series per realm).

use std::sync::Arc;
use std::time::{Duration, Instant};

use authrealm_contract::keygen::{generate, random_kid};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as RecorderEvent, EventType};
use kube::{Resource as _, ResourceExt as _};
use tracing::Instrument as _;

use crate::cleanup::{cleanup, set_finalizer};
use crate::controller::{Context, Error, PROPAGATION_WARNING_BELOW, now_millis};
use crate::crd::AuthRealm;
use crate::events::{self, Severity};
use crate::keysync::{self, KeySync, Observed, PlanError, Write};
use crate::metrics::KindLabel;
use crate::ownership::{self, metadata_matches};
use crate::render::{self, MANAGER, Resolved};
use crate::status::{self, Hold};

/// Reconciles one realm (the entry point given to the kube runtime), in a span naming the realm,
/// its generation and the outcome.
pub async fn reconcile(realm: Arc<AuthRealm>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        namespace = %realm.namespace().unwrap_or_default(),
        realm = %realm.name_any(),
        generation = realm.metadata.generation.unwrap_or_default(),
        outcome = tracing::field::Empty,
    );
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_realm(&realm, &ctx).instrument(span.clone()).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    span.record("outcome", result.as_ref().map_or_else(|e| e.kind(), |_| "ok"));
    if result.is_ok() {
        ctx.failures.lock().expect("lock").remove(&realm.uid().unwrap_or_default());
    }
    span.in_scope(|| tracing::debug!(elapsed = ?started.elapsed(), ok = result.is_ok(), "reconciled"));
    result
}

/// A failed reconcile: counted by kind, reported as a Warning Event on the realm (a series:
/// repeated failures of one realm update one Event), and retried with an exponential backoff per
/// realm: 0.5 s, 1 s, 2 s … capped at 5 minutes.
pub fn error_policy(realm: Arc<AuthRealm>, err: &Error, ctx: Arc<Context>) -> Action {
    let uid = realm.uid().unwrap_or_default();
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(uid).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    ctx.metrics.errors.get_or_create(&KindLabel { kind: err.kind() }).inc();
    tracing::warn!(
        realm = %realm.name_any(),
        namespace = %realm.namespace().unwrap_or_default(),
        kind = err.kind(),
        attempt = n,
        retry_in = ?delay,
        "reconcile failed: {err}"
    );
    // A realm without a namespace cannot carry an Event; a lost term must not write one.
    if realm.namespace().is_some() && !matches!(err, Error::NotLeader(_)) {
        let event = RecorderEvent {
            type_: EventType::Warning,
            reason: events::reason::RECONCILE_FAILED.into(),
            note: Some(events::bounded_note(format!("{err} (attempt {n}; retrying in {delay:?})"))),
            action: "Reconcile".into(),
            secondary: None,
        };
        let recorder = ctx.recorder.clone();
        let regarding = realm.object_ref(&());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &regarding).await {
                tracing::warn!(realm = ?regarding.name, error = %e, "failed to publish the ReconcileFailed event");
            }
        });
    }
    Action::requeue(delay)
}

/// The delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << n.saturating_sub(1).min(20));
    Duration::from_millis(ms.min(300_000))
}

async fn reconcile_realm(realm: &AuthRealm, ctx: &Context) -> Result<Action, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<AuthRealm> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.term.check()?;

    if realm.metadata.deletion_timestamp.is_some() {
        return cleanup(realm, &api, ctx).await;
    }
    let resolved = match render::resolve(&name, &ns, &realm.spec) {
        Ok(r) => r,
        Err(e) => {
            hold(realm, &api, ctx, Hold::InvalidSpec, e.to_string()).await?;
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    warn_short_propagation_delay(realm, &resolved, ctx).await;
    set_finalizer(&api, realm, resolved.redis.as_ref().is_some_and(|r| r.purge_on_delete)).await?;
    let foreign = ownership::foreign_objects(realm, ctx).await?;
    if !foreign.is_empty() {
        hold(realm, &api, ctx, Hold::NameConflict, ownership::conflict_message(realm, &foreign)).await?;
        // A foreign object's deletion raises no watch event for this realm: look again soon.
        return Ok(Action::requeue(Duration::from_secs(10)));
    }

    let now_ms = now_millis();
    let keys = sync_keys(realm, &resolved, ctx, now_ms.div_euclid(1000)).await?;
    write_sidecar_config(realm, &resolved, ctx).await?;
    // From a check no older than the check interval, shared with the realms naming the same
    // Redis (the periodic check keeps it fresh and wakes the realm when it changes).
    let redis = ctx.redis.condition(resolved.redis.as_ref(), &ns, ctx.settings.redis_check_interval).await;
    // External issuers' keys, probed on the same interval (shared between realms; see issuers.rs).
    let (specs, interval) = (&realm.spec.external_issuers, ctx.settings.redis_check_interval);
    let issuer_keys =
        crate::issuers::condition(&ctx.client, &ns, specs, &resolved.config.external_issuers, interval).await;
    events::key_changes(realm, &ctx.events, &ctx.metrics, &keys, &resolved.schedule).await;
    events::redis_flip(realm, &ctx.events, &redis).await;
    let old_conditions = realm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    crate::issuers::publish_flip(realm, &ctx.events, old_conditions, issuer_keys.as_ref()).await;
    let settled = status::settled(realm, &keys, redis, issuer_keys.clone(), &resolved);
    status::write_if_changed(realm, &api, &settled).await?;

    // Requeue at the next rotation event (the Redis check has its own timer), and at the next
    // issuer probe when the realm has external issuers.
    let next = keys.wake_at.map(|t| Duration::from_millis((t * 1000 - now_ms).max(0) as u64 + 50));
    let next = if issuer_keys.is_some() { Some(next.map_or(interval, |n| n.min(interval))) } else { next };
    Ok(Action::requeue(next.unwrap_or(Duration::from_secs(3600)).max(Duration::from_millis(100))))
}

/// Stops the reconcile with the realm held as it is: a Warning event the first time (not when
/// the status already says so), and the status.
async fn hold(realm: &AuthRealm, api: &Api<AuthRealm>, ctx: &Context, why: Hold, message: String) -> Result<(), Error> {
    if !status::already_held(realm, why, &message) {
        let (reason, action) = match why {
            Hold::InvalidSpec => (events::reason::INVALID_SPEC, "Validate"),
            Hold::NameConflict => (events::reason::NAME_CONFLICT, "Reconcile"),
        };
        ctx.events.publish(realm, Severity::Warning, reason, action, message.clone()).await;
    }
    status::write_if_changed(realm, api, &status::held(realm, why, &message)).await?;
    tracing::warn!(realm = %realm.name_any(), namespace = %realm.namespace().unwrap_or_default(), ?why, "{message}");
    Ok(())
}

/// A Warning event when `keyRotation.propagationDelay` is under [`PROPAGATION_WARNING_BELOW`],
/// once per spec generation: on its first reconcile (the status does not carry it yet), and not
/// again when that reconcile is retried.
async fn warn_short_propagation_delay(realm: &AuthRealm, resolved: &Resolved, ctx: &Context) {
    let delay = resolved.schedule.propagation;
    let generation = realm.metadata.generation.unwrap_or_default();
    let observed = realm.status.as_ref().and_then(|s| s.observed_generation);
    if delay >= PROPAGATION_WARNING_BELOW || observed == Some(generation) {
        return;
    }
    let uid = realm.uid().unwrap_or_default();
    if ctx.delay_warned.lock().expect("lock").insert(uid, generation) == Some(generation) {
        return;
    }
    let note = format!(
        "keyRotation.propagationDelay is {}: mounted Secrets and ConfigMaps can take up to about a \
         minute to reach running pods, so with a delay under {PROPAGATION_WARNING_BELOW}s a new key may sign \
         before every pod has it, and tokens it signs may be rejected",
        realm.spec.key_rotation.propagation_delay.0
    );
    ctx.events.publish(realm, Severity::Warning, events::reason::SHORT_PROPAGATION_DELAY, "Validate", note).await;
}

/// Reads the keys Secret and the JWKS, plans the key sync ([`keysync::plan`]) and carries the
/// plan out in its order: each Secret write only after re-reading the Lease.
async fn sync_keys(realm: &AuthRealm, resolved: &Resolved, ctx: &Context, now: i64) -> Result<KeySync, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let secret_name = render::signing_keys_name(&name);
    let jwks_name = render::jwks_name(&name);
    let read_err = |kind: &'static str, n: &str| {
        let (ns, n) = (ns.clone(), n.to_owned());
        move |source| Error::Read { kind, namespace: ns, name: n, source }
    };
    let secret = ctx.owned.secret(&ns, &secret_name).await.map_err(read_err("Secret", &secret_name))?;
    let jwks = ctx.owned.config_map(&ns, &jwks_name).await.map_err(read_err("ConfigMap", &jwks_name))?;
    let cached = ctx.keys.get(&realm.uid().unwrap_or_default());
    let observed = Observed {
        secret: secret.as_ref(),
        jwks: jwks.as_ref(),
        cached: cached.as_ref(),
        status: realm.status.as_ref(),
    };
    let mut new_key = |alg, state, now| generate(alg, &random_kid(), now, state);
    let plan = keysync::plan(realm, &resolved.schedule, observed, now, &mut new_key).map_err(|e| match e {
        PlanError::NotOwned { kind, name } => Error::NotOwned { kind, namespace: ns.clone(), name },
        PlanError::KeyGen(source) => Error::KeyGen { namespace: ns.clone(), name: name.clone(), source },
        PlanError::InvalidKeySet(message) => {
            Error::InvalidKeySet { namespace: ns.clone(), name: name.clone(), message }
        }
    })?;
    if let Some(r) = &plan.keys.recovery {
        tracing::warn!(realm = %name, namespace = %ns, kind = ?r.kind, "{}", r.message);
    }
    if !plan.keys.republished.is_empty() {
        tracing::warn!(realm = %name, namespace = %ns, kids = ?plan.keys.republished, "next key(s) missing from the JWKS: publication clock restarted");
    }
    for write in plan.writes {
        match write {
            Write::Secret { secret, .. } => {
                // Key material is written only while the Lease still names this term's holder.
                ctx.term.verify_lease(&ctx.client).await?;
                ctx.owned.wrote_secret(&apply(ctx, &ns, "Secret", &secret_name, &*secret).await?);
            }
            Write::Remember(cached) => ctx.remember_keys(realm, cached),
            Write::Jwks(cm) => ctx.owned.wrote_config_map(&apply(ctx, &ns, "ConfigMap", &jwks_name, &*cm).await?),
        }
    }
    for c in &plan.keys.changes {
        tracing::info!(realm = %name, namespace = %ns, change = ?c, "key set changed");
    }
    Ok(plan.keys)
}

/// The sidecar config, written only when it differs from what is there.
async fn write_sidecar_config(realm: &AuthRealm, resolved: &Resolved, ctx: &Context) -> Result<(), Error> {
    let ns = realm.namespace().unwrap_or_default();
    let cm_name = render::sidecar_config_name(&realm.name_any());
    let cm = render::sidecar_config_map(realm, &resolved.config);
    let existing = ctx.owned.config_map(&ns, &cm_name).await.map_err(|source| Error::Read {
        kind: "ConfigMap",
        namespace: ns.clone(),
        name: cm_name.clone(),
        source,
    })?;
    if existing.is_some_and(|e| e.data == cm.data && metadata_matches(&e.metadata, &cm.metadata)) {
        return Ok(());
    }
    ctx.owned.wrote_config_map(&apply(ctx, &ns, "ConfigMap", &cm_name, &cm).await?);
    Ok(())
}

/// Server-side apply of one of the realm's objects under [`MANAGER`] (conditional when `obj`
/// carries a resourceVersion); returns what the API server stored.
async fn apply<K>(ctx: &Context, ns: &str, kind: &'static str, name: &str, obj: &K) -> Result<K, Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj)).await.map_err(|source| Error::Write {
        kind,
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
