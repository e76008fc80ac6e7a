//! Status conditions of an AuthRealm, as typed constants and small constructors
//! (Kubernetes API conventions: `type`, `status`, CamelCase `reason`, human `message`, and a
//! `lastTransitionTime` that changes only when `status` flips).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Everything below is true: the realm's objects are written and usable.
pub const READY: &str = "Ready";
/// The key set has a current key that can sign (private material present) and is written to
/// the Secret and the JWKS.
pub const KEYS_READY: &str = "KeysReady";
/// `CLUSTER INFO` with the realm's credentials reports `cluster_state:ok` and every slot covered.
pub const REDIS_REACHABLE: &str = "RedisReachable";
/// False after the keys Secret was deleted or edited by hand, until the next key promotion.
/// Does not affect `Ready`.
pub const KEYS_INTACT: &str = "KeysIntact";

/// Realms with `externalIssuers`: every external issuer's keys could be fetched by the
/// operator's probe (message: keys per issuer, or the last fetch error). Does not affect `Ready`:
/// sidecars keep the last keys they fetched through an outage.
pub const ISSUER_KEYS_READY: &str = "IssuerKeysReady";

/// Condition types in the order they are reported.
pub const ALL: [&str; 5] = [READY, KEYS_READY, REDIS_REACHABLE, KEYS_INTACT, ISSUER_KEYS_READY];

/// Reasons.
pub mod reason {
    pub const RECONCILED: &str = "Reconciled";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const KEYS_CURRENT: &str = "KeysCurrent";
    /// No key of the set can sign (e.g. waiting for a new key to be published after the signing
    /// key was found without its private half).
    pub const NO_SIGNING_KEY: &str = "NoSigningKey";
    /// An object with the name of one of the realm's objects exists and is not controlled by
    /// the realm; the operator does not touch it.
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const CLUSTER_OK: &str = "ClusterOk";
    /// `redis.mode: standalone`: the server answers as a master.
    pub const STANDALONE_OK: &str = "StandaloneOk";
    /// The endpoint is not the kind of Redis `redis.mode` says (a cluster node named as a
    /// standalone server or the reverse, or a standalone endpoint that is a replica).
    pub const REDIS_MODE_MISMATCH: &str = "RedisModeMismatch";
    pub const NOT_REQUIRED: &str = "NotRequired";
    pub const UNREACHABLE: &str = "Unreachable";
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    pub const CLUSTER_DEGRADED: &str = "ClusterDegraded";
    pub const CREDENTIALS_MISSING: &str = "CredentialsMissing";
    /// A Secret named for the Redis connection lacks `authrealm.dev/redis-credentials: "true"`.
    pub const CREDENTIALS_NOT_LABELLED: &str = "CredentialsNotLabelled";
    pub const TLS_CONFIG_INVALID: &str = "TlsConfigInvalid";
    pub const VERIFIED: &str = "Verified";
    pub const SECRET_RESTORED: &str = "SecretRestored";
    pub const SECRET_EDIT_ADOPTED: &str = "SecretEditAdopted";
    pub const KEYS_LOST: &str = "KeysLost";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A desired condition, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, status: Status, reason: &str, message: impl Into<String>) -> Cond {
        Cond { type_, status, reason: reason.into(), message: message.into() }
    }
    pub fn is_true(&self) -> bool {
        self.status == Status::True
    }
}

/// `Ready` from the other conditions: true when `KeysReady` and `RedisReachable` are; otherwise
/// false with the first failing condition's reason. `KeysIntact` is informational.
pub fn ready(others: &[Cond]) -> Cond {
    let failing = others.iter().filter(|c| c.type_ == KEYS_READY || c.type_ == REDIS_REACHABLE).find(|c| !c.is_true());
    match failing {
        None => Cond::new(READY, Status::True, reason::RECONCILED, "keys, JWKS and sidecar config are up to date"),
        Some(c) => Cond::new(
            READY,
            if c.status == Status::Unknown { Status::Unknown } else { Status::False },
            &c.reason,
            format!("{}: {}", c.type_, c.message),
        ),
    }
}

/// The new condition list: `desired` in [`ALL`] order, keeping each existing condition's
/// `lastTransitionTime` when its status did not change.
pub fn merge(existing: &[Condition], desired: &[Cond], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let mut out: Vec<Condition> = desired
        .iter()
        .map(|d| {
            let last = existing
                .iter()
                .find(|e| e.type_ == d.type_ && e.status == d.status.as_str())
                .map(|e| e.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_owned(),
                status: d.status.as_str().to_owned(),
                reason: d.reason.clone(),
                message: truncate(&d.message, 32 * 1024),
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect();
    out.sort_by_key(|c| ALL.iter().position(|t| *t == c.type_).unwrap_or(ALL.len()));
    out
}

/// The existing condition of a type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn transition_time_changes_only_on_a_flip() {
        let first = merge(
            &[],
            &[
                Cond::new(KEYS_READY, Status::True, reason::KEYS_CURRENT, "a"),
                Cond::new(REDIS_REACHABLE, Status::False, reason::UNREACHABLE, "down"),
            ],
            Some(1),
            &t(100),
        );
        assert!(first.iter().all(|c| c.last_transition_time == t(100)));
        // Same statuses, new reason/message/generation: times kept.
        let second = merge(
            &first,
            &[
                Cond::new(KEYS_READY, Status::True, reason::KEYS_CURRENT, "b"),
                Cond::new(REDIS_REACHABLE, Status::False, reason::AUTHENTICATION_FAILED, "wrong password"),
            ],
            Some(2),
            &t(200),
        );
        assert!(second.iter().all(|c| c.last_transition_time == t(100)));
        assert_eq!(second[1].reason, "AuthenticationFailed");
        assert_eq!(second[0].observed_generation, Some(2));
        // A flip takes the new time.
        let third = merge(
            &second,
            &[
                Cond::new(KEYS_READY, Status::True, reason::KEYS_CURRENT, "b"),
                Cond::new(REDIS_REACHABLE, Status::True, reason::CLUSTER_OK, "ok"),
            ],
            Some(2),
            &t(300),
        );
        assert_eq!(third[0].last_transition_time, t(100));
        assert_eq!(third[1].last_transition_time, t(300));
    }

    #[test]
    fn ready_follows_keys_and_redis_table() {
        let keys = |s| Cond::new(KEYS_READY, s, "K", "k");
        let redis = |s| Cond::new(REDIS_REACHABLE, s, "R", "r");
        let intact = |s| Cond::new(KEYS_INTACT, s, "I", "i");
        use Status::*;
        for (conds, want, reason) in [
            (vec![keys(True), redis(True), intact(True)], True, "Reconciled"),
            (vec![keys(True), redis(True), intact(False)], True, "Reconciled"),
            (vec![keys(True), redis(False), intact(True)], False, "R"),
            (vec![keys(False), redis(True), intact(True)], False, "K"),
            (vec![keys(False), redis(False), intact(True)], False, "K"),
            (vec![keys(True), redis(Unknown), intact(True)], Unknown, "R"),
        ] {
            let r = ready(&conds);
            assert_eq!((r.status, r.reason.as_str()), (want, reason), "{conds:?}");
        }
    }

    #[test]
    fn merge_orders_conditions_and_truncates_messages() {
        let out = merge(
            &[],
            &[
                Cond::new(KEYS_INTACT, Status::True, reason::VERIFIED, "x".repeat(40_000)),
                Cond::new(READY, Status::True, reason::RECONCILED, ""),
            ],
            None,
            &t(1),
        );
        assert_eq!(out[0].type_, READY);
        assert!(out[1].message.len() < 33 * 1024);
    }
}
