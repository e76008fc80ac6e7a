//! Kubernetes Events (`events.k8s.io/v1`) about an AuthRealm.
//!
//! Every event is emitted on a change (a key created, promoted, retired or removed; a recovery;
//! a condition flipping to False; a new spec generation with a risky setting), so there is
//! nothing to deduplicate and each event's note names its key or setting. Publishing never fails
//! a reconcile: errors are logged.

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};

use authrealm_contract::KeyState;

use crate::conditions::{self, Cond, Status};
use crate::crd::AuthRealm;
use crate::keysync::KeySync;
use crate::metrics::{EventLabel, Metrics};
use crate::recovery::RecoveryKind;
use crate::rotation::{self, Change, Removal, Schedule};
use crate::status::rfc3339;

/// `reportingController` of every event.
pub const REPORTING_CONTROLLER: &str = "authrealm.dev/operator";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// Event reasons.
pub mod reason {
    pub const KEY_CREATED: &str = "KeyCreated";
    pub const KEY_PROMOTED: &str = "KeyPromoted";
    pub const KEY_RETIRED: &str = "KeyRetired";
    pub const KEY_REMOVED: &str = "KeyRemoved";
    pub const KEYS_SECRET_RESTORED: &str = "KeysSecretRestored";
    pub const KEYS_SECRET_ADOPTED: &str = "KeysSecretEditAdopted";
    pub const SIGNING_KEYS_LOST: &str = "SigningKeysLost";
    pub const REDIS_UNREACHABLE: &str = "RedisUnreachable";
    pub const REDIS_RECOVERED: &str = "RedisReachable";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `keyRotation.propagationDelay` is shorter than mounted keys take to reach pods.
    pub const SHORT_PROPAGATION_DELAY: &str = "ShortPropagationDelay";
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const SESSIONS_PURGED: &str = "SessionsPurged";
    pub const PURGE_FAILED: &str = "SessionPurgeFailed";
    /// A reconcile failed (one series per realm: repeated failures update one Event).
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
}

/// An event's note within the API server's limit (1 kB): cut at a character boundary, with `…`.
pub fn bounded_note(note: String) -> String {
    const LIMIT: usize = 1024;
    if note.len() <= LIMIT {
        return note;
    }
    let mut end = LIMIT - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// A [`Recorder`](kube::runtime::events::Recorder) reporting as this operator replica: repeated
/// events (same type, reason and object) within minutes become one Event with a growing
/// `series.count` instead of one Event each — what the webhook uses, since it may admit
/// hundreds of pods of a realm a minute. The note stays the first occurrence's.
pub fn recorder(client: Client, instance: &str) -> kube::runtime::events::Recorder {
    kube::runtime::events::Recorder::new(
        client,
        kube::runtime::events::Reporter {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: Some(instance.chars().take(128).collect()),
        },
    )
}

#[derive(Clone)]
pub struct Publisher {
    client: Client,
    instance: String,
}

impl Publisher {
    pub fn new(client: Client, instance: &str) -> Self {
        // reportingInstance is at most 128 characters.
        Publisher { client, instance: instance.chars().take(128).collect() }
    }

    pub async fn publish(&self, realm: &AuthRealm, severity: Severity, reason: &str, action: &str, note: String) {
        let now = Timestamp::now();
        let ns = realm.namespace().unwrap_or_default();
        let note = bounded_note(note);
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", realm.name_any(), now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            action: Some(action.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note),
            event_time: Some(MicroTime(now)),
            regarding: Some(realm.object_ref(&())),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(match severity {
                Severity::Normal => "Normal".to_owned(),
                Severity::Warning => "Warning".to_owned(),
            }),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::warn!(realm = %realm.name_any(), namespace = %ns, reason, error = %e, "failed to publish event");
        }
    }
}

/// `RedisReachable` turning False (or changing its reason) is a Warning, turning True again a
/// Normal event.
pub async fn redis_flip(realm: &AuthRealm, events: &Publisher, redis: &Cond) {
    let old = realm.status.as_ref().and_then(|s| conditions::find(&s.conditions, conditions::REDIS_REACHABLE));
    let (severity, reason) = match (redis.status, old) {
        (Status::False, o) if o.is_none_or(|o| o.status != "False" || o.reason != redis.reason) => {
            (Severity::Warning, reason::REDIS_UNREACHABLE)
        }
        (Status::True, Some(o)) if o.status == "False" => (Severity::Normal, reason::REDIS_RECOVERED),
        _ => return,
    };
    events.publish(realm, severity, reason, "CheckRedis", redis.message.clone()).await;
}

/// One event (and one `key_events` count) per recovery and per key change.
pub async fn key_changes(
    realm: &AuthRealm,
    events: &Publisher,
    metrics: &Metrics,
    keys: &KeySync,
    schedule: &Schedule,
) {
    if let Some(r) = &keys.recovery {
        let (reason, label) = match r.kind {
            RecoveryKind::Restored => (reason::KEYS_SECRET_RESTORED, "restored"),
            RecoveryKind::Adopted => (reason::KEYS_SECRET_ADOPTED, "adopted"),
            RecoveryKind::Lost => (reason::SIGNING_KEYS_LOST, "lost"),
        };
        metrics.key_events.get_or_create(&EventLabel { event: label }).inc();
        events.publish(realm, Severity::Warning, reason, "RecoverKeys", r.message.clone()).await;
    }
    for c in &keys.changes {
        let (reason, label, action, note) = match c {
            Change::Created { kid, alg, state, activate_at } => (
                reason::KEY_CREATED,
                "created",
                "CreateKey",
                match state {
                    KeyState::Current => format!("created key {kid} ({alg}); it signs from now"),
                    _ => format!(
                        "created key {kid} ({alg}) as next; published now, it signs from {}",
                        rfc3339(*activate_at)
                    ),
                },
            ),
            Change::Promoted { kid } => {
                (reason::KEY_PROMOTED, "promoted", "PromoteKey", format!("key {kid} now signs new tokens"))
            }
            Change::Retired { kid } => {
                let until = keys
                    .set
                    .get(kid)
                    .and_then(|k| rotation::removal_time(k, &keys.lifetimes, schedule))
                    .map(rfc3339)
                    .unwrap_or_default();
                (
                    reason::KEY_RETIRED,
                    "retired",
                    "RetireKey",
                    format!("key {kid} no longer signs; it stays published until {until}"),
                )
            }
            Change::Removed { kid, reason } => (
                reason::KEY_REMOVED,
                "removed",
                "RemoveKey",
                match reason {
                    Removal::Expired => format!("key {kid} removed: every token it can have signed has expired"),
                    Removal::Superseded => format!("key {kid} removed before it signed anything (superseded)"),
                },
            ),
        };
        metrics.key_events.get_or_create(&EventLabel { event: label }).inc();
        events.publish(realm, Severity::Normal, reason, action, note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::bounded_note;

    #[test]
    fn notes_stay_within_the_api_servers_limit_at_a_character_boundary() {
        assert_eq!(bounded_note("short".into()), "short");
        let exact = "x".repeat(1024);
        assert_eq!(bounded_note(exact.clone()), exact);
        for filler in ["x", "é", "€", "𝄞"] {
            for extra in 0..5 {
                let note = format!("{}{}", "a".repeat(extra), filler.repeat(1100));
                let cut = bounded_note(note.clone());
                assert!(cut.len() <= 1024, "{} bytes", cut.len());
                assert!(cut.len() >= 1020, "{} bytes", cut.len());
                assert!(cut.ends_with('…'));
                assert!(note.starts_with(cut.trim_end_matches('…')));
            }
        }
    }
}
