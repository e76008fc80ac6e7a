//! The realm's status: its conditions and key list, and the one status write.
//!
//! Conditions are derived on every reconcile ([`settled`] when the keys were synced, [`held`] when
//! the reconcile stopped early on an invalid spec or a name conflict) and written with
//! server-side apply only when they differ from the status the watch last delivered.

use authrealm_contract::{KeySet, KeyState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::conditions::{self, Cond, Status, reason};
use crate::controller::Error;
use crate::crd::{AuthRealm, AuthRealmStatus, KeyStatus};
use crate::keysync::KeySync;
use crate::render::{MANAGER, Resolved};
use crate::rotation;

/// A Kubernetes time from Unix seconds.
pub fn time(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// RFC 3339 from Unix seconds (event and condition messages).
pub fn rfc3339(secs: i64) -> String {
    time(secs).0.to_string()
}

/// Why a reconcile stopped before syncing the keys: keys, JWKS and config stay as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The spec cannot be resolved; nothing rotates until it is fixed.
    InvalidSpec,
    /// An object with one of the realm's names is not controlled by the realm.
    NameConflict,
}

impl Hold {
    /// The condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Hold::InvalidSpec => reason::INVALID_SPEC,
            Hold::NameConflict => reason::NAME_CONFLICT,
        }
    }

    fn not_checked(self) -> &'static str {
        match self {
            Hold::InvalidSpec => "not checked: invalid spec",
            Hold::NameConflict => "not checked: name conflict",
        }
    }
}

/// True when the realm's status already reports this hold with this message (its event was
/// published by an earlier reconcile).
pub fn already_held(realm: &AuthRealm, hold: Hold, message: &str) -> bool {
    realm
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::KEYS_READY))
        .is_some_and(|c| c.reason == hold.reason() && c.message == message)
}

/// The status of a held realm: `KeysReady` False with `message`; `RedisReachable` and
/// `KeysIntact` as they were (not checked meanwhile) — except that with an invalid spec the
/// Redis target itself is in doubt, so a False there becomes Unknown.
pub fn held(realm: &AuthRealm, hold: Hold, message: &str) -> AuthRealmStatus {
    let old = realm.status.clone().unwrap_or_default();
    let keys = Cond::new(conditions::KEYS_READY, Status::False, hold.reason(), message);
    let not_checked = |type_| Cond::new(type_, Status::Unknown, hold.reason(), hold.not_checked());
    let mut redis = keep_or(&old, conditions::REDIS_REACHABLE, not_checked(conditions::REDIS_REACHABLE));
    if hold == Hold::InvalidSpec && redis.status == Status::False {
        redis.status = Status::Unknown;
    }
    let intact = keep_or(&old, conditions::KEYS_INTACT, not_checked(conditions::KEYS_INTACT));
    AuthRealmStatus {
        observed_generation: realm.metadata.generation,
        conditions: build_conditions(&old, vec![keys, redis, intact], realm.metadata.generation),
        ..old
    }
}

/// The status after a key sync, with `redis` from the Redis check.
/// `issuer_keys`: `IssuerKeysReady` for a realm with external issuers.
pub fn settled(
    realm: &AuthRealm,
    keys: &KeySync,
    redis: Cond,
    issuer_keys: Option<Cond>,
    resolved: &Resolved,
) -> AuthRealmStatus {
    let old = realm.status.clone().unwrap_or_default();
    let keys_ready = keys_ready_condition(&keys.set);
    // From the Secret's incident annotation (read fresh), not from the possibly stale status.
    let intact = match &keys.incident {
        Some(i) => {
            let reason = [reason::SECRET_RESTORED, reason::SECRET_EDIT_ADOPTED, reason::KEYS_LOST]
                .into_iter()
                .find(|r| *r == i.reason)
                .unwrap_or(reason::SECRET_RESTORED);
            Cond::new(conditions::KEYS_INTACT, Status::False, reason, i.message.clone())
        }
        None => Cond::new(
            conditions::KEYS_INTACT,
            Status::True,
            reason::VERIFIED,
            "the keys Secret holds what the operator wrote",
        ),
    };
    AuthRealmStatus {
        observed_generation: realm.metadata.generation,
        conditions: build_conditions(
            &old,
            [keys_ready, redis, intact].into_iter().chain(issuer_keys).collect(),
            realm.metadata.generation,
        ),
        current_kid: keys.set.current().map(|k| k.kid.clone()),
        next_rotation_time: keys.rotation_at.map(time),
        key_count: Some(keys.set.keys.len() as i32),
        keys: key_statuses(keys, resolved),
    }
}

/// `KeysReady`: true only when the current key can actually sign (an asymmetric key needs its
/// private half, which issuer pods mount).
pub fn keys_ready_condition(set: &KeySet) -> Cond {
    let no_signer = |message: String| Cond::new(conditions::KEYS_READY, Status::False, reason::NO_SIGNING_KEY, message);
    match set.current() {
        Some(k) if k.alg.is_symmetric() || k.private_key_pem.is_some() => Cond::new(
            conditions::KEYS_READY,
            Status::True,
            reason::KEYS_CURRENT,
            format!("key {} ({}) signs; {} key(s) published", k.kid, k.alg, set.keys.len()),
        ),
        Some(k) => no_signer(format!("the current key {} has no private key: it cannot sign", k.kid)),
        None => match set.keys.iter().find(|k| k.state == KeyState::Next) {
            Some(n) => no_signer(format!(
                "no key signs yet: key {} ({}) is published and signs from {}",
                n.kid,
                n.alg,
                n.activated_at.map(rfc3339).unwrap_or_else(|| "its promotion".into())
            )),
            None => no_signer("no current key".into()),
        },
    }
}

/// The existing condition of `type_` as a [`Cond`], or `default`.
fn keep_or(old: &AuthRealmStatus, type_: &'static str, default: Cond) -> Cond {
    conditions::find(&old.conditions, type_)
        .map(|c| Cond {
            type_,
            status: match c.status.as_str() {
                "True" => Status::True,
                "False" => Status::False,
                _ => Status::Unknown,
            },
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .unwrap_or(default)
}

fn build_conditions(old: &AuthRealmStatus, mut conds: Vec<Cond>, generation: Option<i64>) -> Vec<Condition> {
    conds.insert(0, conditions::ready(&conds));
    conditions::merge(&old.conditions, &conds, generation, &Time(Timestamp::now()))
}

fn key_statuses(keys: &KeySync, resolved: &Resolved) -> Vec<KeyStatus> {
    keys.set
        .keys
        .iter()
        .map(|k| KeyStatus {
            kid: k.kid.clone(),
            algorithm: k.alg,
            state: match k.state {
                KeyState::Next => "next",
                KeyState::Current => "current",
                KeyState::Retired => "retired",
            }
            .to_owned(),
            created_at: time(k.created_at),
            activated_at: k.activated_at.map(time),
            retired_at: k.retired_at.map(time),
            remove_after: rotation::removal_time(k, &keys.lifetimes, &resolved.schedule).map(time),
        })
        .collect()
}

/// Writes the status unless the realm, as the watch last delivered it, already has exactly this
/// one. If that copy is stale, the write it causes is a no-op on the server, and a status someone
/// else changed since arrives as a watch event and another reconcile.
pub async fn write_if_changed(realm: &AuthRealm, api: &Api<AuthRealm>, status: &AuthRealmStatus) -> Result<(), Error> {
    if realm.status.as_ref() == Some(status) {
        return Ok(());
    }
    let name = realm.name_any();
    let patch = json!({
        "apiVersion": "authrealm.dev/v1alpha1",
        "kind": "AuthRealm",
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(|source| {
        Error::Status { namespace: realm.namespace().unwrap_or_default(), name: name.clone(), source }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keygen::generate;
    use authrealm_contract::{Alg, KeyEntry};

    #[test]
    fn keys_ready_only_when_the_current_key_can_sign() {
        let signing = generate(Alg::ES256, "a", 100, KeyState::Current).unwrap();
        let set = |keys: Vec<KeyEntry>| KeySet { keys, ..KeySet::empty() };
        let c = keys_ready_condition(&set(vec![signing.clone()]));
        assert_eq!((c.status, c.reason.as_str()), (Status::True, reason::KEYS_CURRENT));
        // The public half only (copied from the JWKS): it cannot sign.
        let public = set(vec![signing.clone()]).public_only();
        let c = keys_ready_condition(&public);
        assert_eq!((c.status, c.reason.as_str()), (Status::False, reason::NO_SIGNING_KEY));
        assert!(c.message.contains("no private key"), "{}", c.message);
        // Waiting for a published next key to sign.
        let next = KeyEntry { activated_at: Some(220), ..generate(Alg::ES256, "b", 100, KeyState::Next).unwrap() };
        let c = keys_ready_condition(&set(vec![next]));
        assert_eq!(c.status, Status::False);
        assert!(c.message.contains("key b (ES256) is published and signs from 1970-01-01T00:03:40Z"), "{}", c.message);
        // HMAC keys carry their secret.
        let hmac = generate(Alg::HS256, "h", 100, KeyState::Current).unwrap();
        assert_eq!(keys_ready_condition(&set(vec![hmac])).status, Status::True);
    }

    #[test]
    fn a_held_realm_keeps_its_other_conditions_but_an_invalid_spec_puts_a_redis_failure_in_doubt() {
        let spec = serde_json::from_value(json!({"issuer": "https://a.example", "audiences": ["a"]})).unwrap();
        let mut realm = AuthRealm::new("r", spec);
        realm.metadata.generation = Some(3);
        let redis_down = Cond::new(conditions::REDIS_REACHABLE, Status::False, "ConnectFailed", "down");
        let intact = Cond::new(conditions::KEYS_INTACT, Status::True, reason::VERIFIED, "ok");
        realm.status = Some(AuthRealmStatus {
            conditions: build_conditions(&AuthRealmStatus::default(), vec![redis_down, intact], Some(2)),
            ..AuthRealmStatus::default()
        });
        let get = |s: &AuthRealmStatus, t| conditions::find(&s.conditions, t).unwrap().clone();
        let conflict = held(&realm, Hold::NameConflict, "taken");
        assert_eq!(get(&conflict, conditions::REDIS_REACHABLE).status, "False");
        assert_eq!(get(&conflict, conditions::KEYS_READY).reason, reason::NAME_CONFLICT);
        assert_eq!(get(&conflict, conditions::READY).status, "False");
        assert_eq!(conflict.observed_generation, Some(3));
        let invalid = held(&realm, Hold::InvalidSpec, "bad");
        let redis = get(&invalid, conditions::REDIS_REACHABLE);
        assert_eq!((redis.status.as_str(), redis.reason.as_str()), ("Unknown", "ConnectFailed"));
        assert_eq!(get(&invalid, conditions::KEYS_INTACT).status, "True");
        // A fresh realm: nothing was checked.
        realm.status = None;
        let fresh = held(&realm, Hold::InvalidSpec, "bad");
        assert_eq!(get(&fresh, conditions::KEYS_INTACT).message, "not checked: invalid spec");
        realm.status = Some(fresh);
        assert!(already_held(&realm, Hold::InvalidSpec, "bad"));
        assert!(!already_held(&realm, Hold::InvalidSpec, "worse"));
        assert!(!already_held(&realm, Hold::NameConflict, "bad"));
    }
}
