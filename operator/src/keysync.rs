//! The key-sync plan — pure: from what the reconcile observed (the keys Secret, the JWKS
//! ConfigMap, the operator's copy of the key set, the realm's status) and the realm's rotation
//! schedule, decide the key set after this reconcile and which writes carry it out, in order.
//! [`crate::reconcile`] only performs the writes.
//!
//! The rules (each has a case in the tests below):
//!
//! * **Secret first.** The keys Secret — the only copy of the private keys — is written before
//!   the JWKS ConfigMap that announces its keys, so a crash between the two leaves a key that is
//!   in the Secret but not yet published (its publication clock restarts,
//!   [`rotation::restart_unpublished`]), never a published key whose private half is lost.
//! * **Conditional writes.** A Secret that does not exist is created by server-side apply (so
//!   the field manager owns every field and can later drop one); an existing one is written only
//!   with the resourceVersion it was read at ([`Precondition::ResourceVersion`]): a concurrent
//!   writer makes the write fail with 409 and the reconcile starts again from a fresh read.
//! * **Fenced.** Every Secret write is preceded by a re-read of the Lease (the executor does it,
//!   [`crate::leader`]); the plan only says a Secret write is due.
//! * **Only when needed.** The Secret is rewritten when it is not trusted (deleted, edited), when
//!   the schedule changed the set or the lifetimes, when the incident record changes, or when
//!   our labels or annotations are missing; the JWKS when its data or metadata
//!   differ from the rendering of the set. A realm at rest writes nothing.
//! * **Remember what was written.** The set is kept as the operator's copy after the Secret write
//!   (or when none was needed), before the JWKS is written.
//! * **Keys live as the schedule says.** A `next` key is published (Secret, then JWKS) before it
//!   signs; a retired key stays in both until its removal time ([`rotation::removal_time`]).
//! * **Incident record.** A recovery writes a new incident (`KeysIntact` False); the next
//!   promotion clears it; otherwise the Secret's incident is kept.
//! * **Only the realm's own objects.** An existing Secret or JWKS ConfigMap without a controller
//!   owner reference to the realm is never written ([`PlanError::NotOwned`]); the reconcile checks
//!   this before planning too, and reports it as a name conflict ([`crate::ownership`]).

use authrealm_contract::keygen::KeyError;
use authrealm_contract::{Alg, KeyEntry, KeySet, KeyState};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt as _;

use crate::conditions::reason;
use crate::crd::{AuthRealm, AuthRealmStatus};
use crate::keys_secret::Incident;
use crate::owned::controlled_by;
use crate::ownership::metadata_matches;
use crate::recovery::{self, Cached, Recovery, RecoveryKind};
use crate::render::{self, KEYSET_KEY};
use crate::rotation::{self, Change, Lifetimes, Schedule};
use crate::status::rfc3339;

/// What the reconcile read before planning.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed<'a> {
    /// The keys Secret (`<realm>-signing-keys`).
    pub secret: Option<&'a Secret>,
    /// The JWKS ConfigMap (`<realm>-jwks`).
    pub jwks: Option<&'a ConfigMap>,
    /// The key set this replica last wrote for the realm (its [`crate::key_cache`]).
    pub cached: Option<&'a Cached>,
    /// The realm's status as delivered by the watch.
    pub status: Option<&'a AuthRealmStatus>,
}

/// Under which condition a Secret write may land.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The Secret does not exist: created by server-side apply.
    Create,
    /// Only if the Secret is still at this resourceVersion (else 409 and a fresh reconcile).
    ResourceVersion(Option<String>),
}

/// One write, in the order the plan lists them.
#[derive(Debug)]
pub enum Write {
    /// Apply the keys Secret (after re-reading the Lease). `secret` carries the precondition's
    /// resourceVersion.
    Secret { secret: Box<Secret>, precondition: Precondition },
    /// Keep the set as the operator's copy of the realm's keys.
    Remember(Cached),
    /// Apply the JWKS ConfigMap.
    Jwks(Box<ConfigMap>),
}

/// The key set after this reconcile.
#[derive(Clone, Debug)]
pub struct KeySync {
    pub set: KeySet,
    pub lifetimes: Lifetimes,
    /// The last recovery, until the next promotion (drives `KeysIntact`).
    pub incident: Option<Incident>,
    pub changes: Vec<Change>,
    pub recovery: Option<Recovery>,
    /// When the schedule next has something to do.
    pub wake_at: Option<i64>,
    /// When the current key next rotates.
    pub rotation_at: Option<i64>,
    /// `next` keys missing from the JWKS whose publication clock restarted.
    pub republished: Vec<String>,
}

/// The plan: the writes, in order, and the resulting key set.
#[derive(Debug)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub keys: KeySync,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    KeyGen(#[from] KeyError),
    #[error("{0}")]
    InvalidKeySet(String),
    /// `kind`: `Secret` or `ConfigMap`; the object exists but the realm does not control it.
    #[error("{kind} {name} is not controlled by the realm")]
    NotOwned { kind: &'static str, name: String },
}

/// The public key set published in a JWKS ConfigMap, if it has a readable one.
pub fn published(jwks: Option<&ConfigMap>) -> Option<KeySet> {
    jwks.and_then(|cm| cm.data.as_ref()?.get(KEYSET_KEY).cloned()).and_then(|s| KeySet::from_json(s.as_bytes()).ok())
}

/// Plans the key sync of `realm` at `now` (seconds). `new_key(alg, state, now)` generates a key
/// with a fresh kid (the only source of randomness; tests pass a deterministic one).
pub fn plan(
    realm: &AuthRealm,
    schedule: &Schedule,
    observed: Observed<'_>,
    now: i64,
    new_key: &mut impl FnMut(Alg, KeyState, i64) -> Result<KeyEntry, KeyError>,
) -> Result<Plan, PlanError> {
    let uid = realm.uid().unwrap_or_default();
    for (kind, meta) in
        [("Secret", observed.secret.map(|s| &s.metadata)), ("ConfigMap", observed.jwks.map(|c| &c.metadata))]
    {
        if let Some(meta) = meta
            && !controlled_by(meta, &uid)
        {
            return Err(PlanError::NotOwned { kind, name: meta.name.clone().unwrap_or_default() });
        }
    }
    let published = published(observed.jwks);
    let status = observed.status.cloned().unwrap_or_default();
    let had_keys = status.current_kid.is_some()
        || status.key_count.unwrap_or(0) > 0
        || published.as_ref().is_some_and(|p| !p.keys.is_empty());

    let state = recovery::classify(observed.secret);
    let trusted = matches!(state, recovery::SecretState::Trusted { .. });
    let decision = recovery::decide(state, observed.cached, published.as_ref(), had_keys, now);
    let mut set = decision.set;
    let mut lifetimes = decision.lifetimes;
    let mut changes = Vec::new();
    if decision.publish_first
        && let Some(step) = rotation::publish_first(&set, schedule, now)
    {
        changes = rotation::apply(&mut set, &mut lifetimes, &[step], now, new_key)?;
    }
    let republished = rotation::restart_unpublished(&mut set, published.as_ref(), now);
    let mut outcome = rotation::converge(&mut set, &mut lifetimes, schedule, now, new_key)?;
    let modified = outcome.modified || !republished.is_empty() || !changes.is_empty();
    changes.append(&mut outcome.changes);
    set.validate().map_err(|e| PlanError::InvalidKeySet(e.to_string()))?;

    // The incident record: a new recovery replaces it, a promotion clears it.
    let promoted = changes.iter().any(|c| matches!(c, Change::Promoted { .. }));
    let previous_incident = if trusted { Incident::from_secret(observed.secret) } else { None };
    let incident = match &decision.recovery {
        Some(r) => Some(Incident {
            reason: match r.kind {
                RecoveryKind::Restored => reason::SECRET_RESTORED,
                RecoveryKind::Adopted => reason::SECRET_EDIT_ADOPTED,
                RecoveryKind::Lost => reason::KEYS_LOST,
            }
            .to_owned(),
            message: format!("{} (at {}; cleared by the next key promotion)", r.message, rfc3339(now)),
        }),
        None if promoted => None,
        None => previous_incident.clone(),
    };

    let mut writes = Vec::new();
    let desired = render::signing_keys_secret(realm, &set, &lifetimes, incident.as_ref(), None);
    match observed.secret {
        None => writes.push(Write::Secret { secret: Box::new(desired), precondition: Precondition::Create }),
        Some(existing)
            if !trusted
                || modified
                || incident != previous_incident
                || !metadata_matches(&existing.metadata, &desired.metadata) =>
        {
            let rv = existing.metadata.resource_version.clone();
            let mut desired = desired;
            desired.metadata.resource_version = rv.clone();
            writes.push(Write::Secret { secret: Box::new(desired), precondition: Precondition::ResourceVersion(rv) });
        }
        Some(_) => {}
    }
    writes.push(Write::Remember(Cached { set: set.clone(), lifetimes: lifetimes.clone() }));
    let jwks = render::jwks_config_map(realm, &set);
    let jwks_current =
        observed.jwks.is_some_and(|cm| cm.data == jwks.data && metadata_matches(&cm.metadata, &jwks.metadata));
    if !jwks_current {
        writes.push(Write::Jwks(Box::new(jwks)));
    }
    Ok(Plan {
        writes,
        keys: KeySync {
            set,
            lifetimes,
            incident,
            changes,
            recovery: decision.recovery,
            wake_at: outcome.wake_at,
            rotation_at: outcome.rotation_at,
            republished,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys_secret::{ANN_KEYS_INCIDENT, KEYSET_KEY};
    use authrealm_contract::keygen::generate;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const INTERVAL: i64 = 100;
    const PROPAGATION: i64 = 10;
    const LIFETIME: i64 = 20;

    fn schedule() -> Schedule {
        Schedule { alg: Alg::ES256, interval: INTERVAL, propagation: PROPAGATION, token_lifetime: LIFETIME, leeway: 0 }
    }

    fn realm() -> AuthRealm {
        let spec = serde_json::from_value(serde_json::json!({
            "issuer": "https://auth.example.com",
            "audiences": ["app"],
        }))
        .unwrap();
        let mut r = AuthRealm::new("shop", spec);
        r.metadata = ObjectMeta {
            name: Some("shop".into()),
            namespace: Some("prod".into()),
            uid: Some("uid-1".into()),
            ..ObjectMeta::default()
        };
        r
    }

    /// The API server's copy of the realm's objects, and the operator's key copy. Writes get a
    /// new resourceVersion each.
    #[derive(Default)]
    struct World {
        secret: Option<Secret>,
        jwks: Option<ConfigMap>,
        cached: Option<Cached>,
        status: Option<AuthRealmStatus>,
        version: u64,
        kids: u32,
    }

    /// What a plan asked for, in order: "secret:create", "secret:rv=N", "remember", "jwks".
    fn kinds(plan: &Plan) -> Vec<String> {
        plan.writes
            .iter()
            .map(|w| match w {
                Write::Secret { precondition: Precondition::Create, .. } => "secret:create".to_owned(),
                Write::Secret { precondition: Precondition::ResourceVersion(rv), secret } => {
                    assert_eq!(&secret.metadata.resource_version, rv, "the write carries the version read");
                    format!("secret:rv={}", rv.clone().unwrap_or_default())
                }
                Write::Remember(_) => "remember".to_owned(),
                Write::Jwks(_) => "jwks".to_owned(),
            })
            .collect()
    }

    impl World {
        fn plan(&mut self, now: i64) -> Plan {
            let kids = &mut self.kids;
            let mut new_key = |alg, state, at| {
                *kids += 1;
                generate(alg, &format!("k{kids}"), at, state)
            };
            let observed = Observed {
                secret: self.secret.as_ref(),
                jwks: self.jwks.as_ref(),
                cached: self.cached.as_ref(),
                status: self.status.as_ref(),
            };
            plan(&realm(), &schedule(), observed, now, &mut new_key).unwrap()
        }

        /// Carries out the first `n` writes of `plan` (a crash after them).
        fn apply(&mut self, plan: &Plan, n: usize) {
            for w in plan.writes.iter().take(n) {
                self.version += 1;
                match w {
                    Write::Secret { secret, precondition } => {
                        let current = self.secret.as_ref().map(|s| s.metadata.resource_version.clone());
                        match precondition {
                            Precondition::Create => assert!(current.is_none(), "create over an existing Secret"),
                            Precondition::ResourceVersion(rv) => assert_eq!(current.as_ref(), Some(rv), "409"),
                        }
                        let mut s = (**secret).clone();
                        s.metadata.resource_version = Some(self.version.to_string());
                        self.secret = Some(s);
                    }
                    Write::Remember(c) => self.cached = Some(c.clone()),
                    Write::Jwks(cm) => self.jwks = Some((**cm).clone()),
                }
            }
            self.status = Some(AuthRealmStatus {
                current_kid: plan.keys.set.current().map(|k| k.kid.clone()),
                key_count: Some(plan.keys.set.keys.len() as i32),
                ..AuthRealmStatus::default()
            });
        }

        fn step(&mut self, now: i64) -> (Vec<String>, Plan) {
            let p = self.plan(now);
            self.apply(&p, p.writes.len());
            (kinds(&p), p)
        }

        fn secret_kids(&self) -> Vec<(String, KeyState)> {
            let s = self.secret.as_ref().unwrap();
            let set = KeySet::from_json(&s.data.as_ref().unwrap()[KEYSET_KEY].0).unwrap();
            set.keys.iter().map(|k| (k.kid.clone(), k.state)).collect()
        }

        fn jwks_kids(&self) -> Vec<String> {
            published(self.jwks.as_ref()).unwrap().keys.iter().map(|k| k.kid.clone()).collect()
        }

        fn rv(&self) -> String {
            self.secret.as_ref().unwrap().metadata.resource_version.clone().unwrap()
        }
    }

    #[test]
    fn a_new_realm_creates_its_secret_then_publishes_and_then_rests() {
        let mut w = World::default();
        let (writes, p) = w.step(1000);
        assert_eq!(writes, ["secret:create", "remember", "jwks"]);
        assert_eq!(p.keys.set.current().unwrap().kid, "k1");
        assert!(p.keys.recovery.is_none() && p.keys.incident.is_none());
        assert_eq!(w.jwks_kids(), ["k1"]);
        // Nothing is due: only the copy is refreshed, nothing is written.
        let (writes, _) = w.step(1001);
        assert_eq!(writes, ["remember"]);
    }

    #[test]
    fn a_next_key_is_written_to_the_secret_before_the_jwks_announces_it_and_signs_after_the_delay() {
        let mut w = World::default();
        w.step(1000);
        let rv = w.rv();
        // The successor is created P before the rotation.
        let (writes, p) = w.step(1000 + INTERVAL - PROPAGATION);
        assert_eq!(writes, [format!("secret:rv={rv}"), "remember".into(), "jwks".into()]);
        assert!(matches!(&p.keys.changes[..], [Change::Created { kid, state: KeyState::Next, .. }] if kid == "k2"));
        assert_eq!(w.secret_kids(), [("k1".into(), KeyState::Current), ("k2".into(), KeyState::Next)]);
        assert_eq!(w.jwks_kids(), ["k1", "k2"]);
        // It signs at the rotation time, not before.
        let (writes, _) = w.step(1000 + INTERVAL - 1);
        assert_eq!(writes, ["remember"]);
        let (writes, p) = w.step(1000 + INTERVAL + 1);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(p.keys.set.current().unwrap().kid, "k2");
    }

    #[test]
    fn a_crash_between_the_secret_and_the_jwks_restarts_the_publication_clock() {
        let mut w = World::default();
        w.step(1000);
        let p = w.plan(1000 + INTERVAL - PROPAGATION);
        // Only the Secret write landed.
        w.apply(&p, 1);
        assert_eq!(w.jwks_kids(), ["k1"]);
        // Restarted later without its copy: the unpublished next key gets a full delay from now.
        w.cached = None;
        let later = 1000 + INTERVAL - 2;
        let (writes, p) = w.step(later);
        assert_eq!(p.keys.republished, ["k2"]);
        assert!(writes[0].starts_with("secret:rv="), "{writes:?}");
        assert_eq!(writes.last().unwrap(), "jwks");
        assert_eq!(w.jwks_kids(), ["k1", "k2"]);
        assert_eq!(p.keys.set.get("k2").unwrap().created_at, later + 1);
        // It does not sign before it had P seconds in the JWKS.
        let (_, p) = w.step(later + PROPAGATION);
        assert_eq!(p.keys.set.current().unwrap().kid, "k1");
        let (_, p) = w.step(later + 1 + PROPAGATION);
        assert_eq!(p.keys.set.current().unwrap().kid, "k2");
    }

    #[test]
    fn a_retired_key_stays_published_until_its_removal_time() {
        let mut w = World::default();
        w.step(1000);
        w.step(1000 + INTERVAL - PROPAGATION);
        let (_, p) = w.step(1000 + INTERVAL + 1);
        assert!(
            p.keys.changes.iter().any(|c| matches!(c, Change::Retired { kid } if kid == "k1")),
            "{:?}",
            p.keys.changes
        );
        let k1 = p.keys.set.get("k1").unwrap().clone();
        let remove_at = rotation::removal_time(&k1, &p.keys.lifetimes, &schedule()).unwrap();
        let (writes, _) = w.step(remove_at - 1);
        assert_eq!(writes, ["remember"]);
        assert_eq!(w.jwks_kids(), ["k1", "k2"]);
        let (writes, p) = w.step(remove_at);
        assert!(p.keys.changes.iter().any(|c| matches!(c, Change::Removed { kid, .. } if kid == "k1")));
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(w.jwks_kids(), ["k2"]);
        assert!(w.secret_kids().iter().all(|(kid, _)| kid != "k1"));
    }

    #[test]
    fn a_deleted_secret_is_restored_from_the_copy_and_the_incident_lasts_until_the_next_promotion() {
        let mut w = World::default();
        w.step(1000);
        let before = w.secret_kids();
        w.secret = None;
        let (writes, p) = w.step(1010);
        assert_eq!(writes, ["secret:create", "remember"], "the JWKS is unchanged");
        assert_eq!(p.keys.recovery.as_ref().unwrap().kind, RecoveryKind::Restored);
        assert_eq!(w.secret_kids(), before);
        let incident = p.keys.incident.clone().unwrap();
        assert_eq!(incident.reason, reason::SECRET_RESTORED);
        assert!(w.secret.as_ref().unwrap().metadata.annotations.as_ref().unwrap().contains_key(ANN_KEYS_INCIDENT));
        // At rest the incident is kept without a write.
        let (writes, p) = w.step(1011);
        assert_eq!((writes, p.keys.incident), (vec!["remember".to_owned()], Some(incident)));
        // The next promotion clears it.
        w.step(1000 + INTERVAL - PROPAGATION);
        let (writes, p) = w.step(1000 + INTERVAL + 1);
        assert!(writes[0].starts_with("secret:rv="), "{writes:?}");
        assert!(p.keys.incident.is_none());
        assert!(!w.secret.as_ref().unwrap().metadata.annotations.as_ref().unwrap().contains_key(ANN_KEYS_INCIDENT));
    }

    #[test]
    fn an_edited_secret_is_overwritten_only_at_the_version_that_was_read() {
        let mut w = World::default();
        w.step(1000);
        let before = w.secret_kids();
        let s = w.secret.as_mut().unwrap();
        s.data.as_mut().unwrap().get_mut(KEYSET_KEY).unwrap().0 = b"{}".to_vec();
        s.metadata.resource_version = Some("77".into());
        let (writes, p) = w.step(1001);
        assert_eq!(writes, ["secret:rv=77", "remember"]);
        assert_eq!(p.keys.recovery.unwrap().kind, RecoveryKind::Restored);
        assert_eq!(w.secret_kids(), before);
    }

    #[test]
    fn missing_labels_are_put_back_without_changing_the_keys() {
        let mut w = World::default();
        w.step(1000);
        let before = w.secret_kids();
        w.secret.as_mut().unwrap().metadata.labels = None;
        let rv = w.rv();
        let (writes, p) = w.step(1001);
        assert_eq!(writes, [format!("secret:rv={rv}"), "remember".into()]);
        assert!(p.keys.recovery.is_none() && p.keys.changes.is_empty());
        assert_eq!(w.secret_kids(), before);
        w.jwks.as_mut().unwrap().metadata.labels.as_mut().unwrap().clear();
        let (writes, _) = w.step(1002);
        assert_eq!(writes, ["remember", "jwks"]);
    }

    #[test]
    fn an_object_the_realm_does_not_control_is_never_written() {
        let mut w = World::default();
        w.step(1000);
        let mut foreign = w.secret.clone().unwrap();
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "someone-else".into();
        let observed = Observed { secret: Some(&foreign), jwks: w.jwks.as_ref(), ..Observed::default() };
        let mut new_key = |alg, state, at| generate(alg, "x", at, state);
        let err = plan(&realm(), &schedule(), observed, 1001, &mut new_key).unwrap_err();
        assert!(matches!(err, PlanError::NotOwned { kind: "Secret", .. }), "{err:?}");
        // A JWKS ConfigMap without any owner.
        let mut orphan = w.jwks.clone().unwrap();
        orphan.metadata.owner_references = None;
        let observed = Observed { secret: w.secret.as_ref(), jwks: Some(&orphan), ..Observed::default() };
        let err = plan(&realm(), &schedule(), observed, 1001, &mut new_key).unwrap_err();
        assert!(matches!(err, PlanError::NotOwned { kind: "ConfigMap", .. }), "{err:?}");
    }

    #[test]
    fn a_deleted_or_edited_jwks_is_rewritten_from_the_secret_alone() {
        let mut w = World::default();
        w.step(1000);
        w.jwks = None;
        let (writes, _) = w.step(1001);
        assert_eq!(writes, ["remember", "jwks"]);
        w.jwks.as_mut().unwrap().data.as_mut().unwrap().insert(KEYSET_KEY.into(), "{}".into());
        let (writes, p) = w.step(1002);
        assert_eq!(writes, ["remember", "jwks"]);
        assert!(p.keys.recovery.is_none());
        assert_eq!(w.jwks_kids(), ["k1"]);
    }
}
