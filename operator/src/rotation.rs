//! The key rotation schedule: a pure function of (key set, schedule, now) — no I/O, no clock,
//! no randomness (new keys come from a caller-supplied generator).
//!
//! # Timeline of one key (I = interval, P = propagation delay, L = token lifetime bound)
//!
//! ```text
//!   created as `next`          becomes `current`              `retired`                       removed
//!   (published everywhere)     (signs new tokens)             (verifies only)
//! ──────●──────── P ──────────────●───────────── I ──────────────●──── P ────┬──── L ──────────●──▶
//!   A − P                         A                              A + I       │ last token a lagging
//!                                                                            │ pod can sign with it
//! ```
//!
//! * A key is created `next` one propagation delay before it is due to sign, so every verifier's
//!   mounted key set knows it before the first token it signs exists.
//! * It is promoted to `current` at `max(previous activation + I, created + P)`; the previous
//!   current key is retired at the same moment.
//! * Pods that have not yet seen the promotion still sign with the retired key for up to P, and
//!   those tokens are accepted for L = longest token TTL + clock leeway (inclusive). So a retired
//!   key is removed at `retired + P + L + leeway + 1s` (the extra leeway: an issuer whose clock runs
//!   ahead writes an `exp` that a verifier whose clock runs behind accepts later still). L is the
//!   largest value in effect from the key's publication until it stopped signing (recorded per key,
//!   `next` keys included, see [`Lifetimes`]), so shortening the TTL never drops a key early.
//! * Changing the algorithm starts a new chain at once: a key of the new algorithm is created
//!   `next`, promoted after P, and the old key retires like any other.
//! * With no current key and no `next` key (first reconcile, or after the key set was lost), a
//!   `current` key is created and signs at once. A `next` key without a current one (an adopted
//!   hand-edited set, or [`publish_first`]) is promoted once it has been published for P.

use std::collections::BTreeMap;

use authrealm_contract::{Alg, KeyEntry, KeySet, KeyState};

/// The rotation parameters of a realm, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Algorithm of new keys.
    pub alg: Alg,
    /// How long a key signs before its successor takes over.
    pub interval: i64,
    /// Publication lead time of a new key, and the time pods may keep signing with a key after
    /// its retirement.
    pub propagation: i64,
    /// How long after signing a token can still be accepted: max token TTL + clock leeway.
    pub token_lifetime: i64,
    /// The clock leeway (also part of `token_lifetime`): key removal waits one more leeway for
    /// the skew between the clock that wrote a token's `exp` and the verifier's.
    pub leeway: i64,
}

/// Per key id: the largest [`Schedule::token_lifetime`] in effect while the key could sign.
pub type Lifetimes = BTreeMap<String, i64>;

/// Why a key leaves the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Retired, and every token it can have signed has expired.
    Expired,
    /// A `next` key that never signed and is no longer wanted (algorithm changed, duplicate).
    Superseded,
}

/// One change to the key set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Generate a key; `activate_at` is when it is planned to become current.
    Create {
        alg: Alg,
        state: KeyState,
        activate_at: i64,
    },
    /// `next` → `current` (activated now).
    Promote {
        kid: String,
    },
    /// `current` → `retired` (retired now).
    Retire {
        kid: String,
    },
    Remove {
        kid: String,
        reason: Removal,
    },
    /// Update the planned activation time of a `next` key.
    Reschedule {
        kid: String,
        activate_at: i64,
    },
    /// A retired key without a retirement time gets `now` (the conservative choice).
    StampRetired {
        kid: String,
    },
    /// Raise the recorded token lifetime bound of a key that can sign.
    RecordLifetime {
        kid: String,
        seconds: i64,
    },
}

/// What to do now, and when to look again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The earliest future time at which the plan changes.
    pub wake_at: Option<i64>,
    /// When the current key is planned to stop signing.
    pub rotation_at: Option<i64>,
}

fn earliest(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// When a retired key may be removed: the first second at which no token it can have signed
/// is valid any more (`exp` is inclusive: a token is valid while `now <= exp + leeway`). Two
/// leeways: the verifier's acceptance window (in the recorded lifetime), and the skew between an
/// issuer whose clock runs ahead (its `exp` lies in the future of the others) and a verifier
/// whose clock runs behind.
pub fn removal_time(key: &KeyEntry, lifetimes: &Lifetimes, s: &Schedule) -> Option<i64> {
    let retired = key.retired_at?;
    let bound = lifetimes.get(&key.kid).copied().unwrap_or(0).max(s.token_lifetime);
    Some(retired.saturating_add(s.propagation).saturating_add(bound).saturating_add(s.leeway).saturating_add(1))
}

/// The publication clock of a `next` key written during second `now` (times are whole seconds,
/// `now` = the wall clock rounded down): it starts at `now + 1`, the first whole second by which
/// the key is surely written. Starting it at `now` would let a key written at 10.98 s sign at
/// `10 + P`, i.e. after only `P - 0.98` s — with a short propagation delay, a few milliseconds
/// after it was published (e.g. when a restarted operator catches up with a rotation it missed
/// late in a second).
pub fn published_from(now: i64) -> i64 {
    now.saturating_add(1)
}

/// When `next` will replace `current`.
fn promotion_time(current: &KeyEntry, next: &KeyEntry, s: &Schedule) -> i64 {
    let published = next.created_at.saturating_add(s.propagation);
    if current.alg != s.alg {
        published
    } else {
        let activated = current.activated_at.unwrap_or(current.created_at);
        activated.saturating_add(s.interval).max(published)
    }
}

/// The steps due at `now` for `set`, and when to look again.
pub fn plan(set: &KeySet, lifetimes: &Lifetimes, s: &Schedule, now: i64) -> Plan {
    let mut p = Plan::default();
    let current = set.current();

    // At most one `next` key: the newest of the realm's algorithm. Others never signed.
    let keep = set
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Next && k.alg == s.alg)
        .max_by(|a, b| (a.created_at, &a.kid).cmp(&(b.created_at, &b.kid)));
    for k in set.keys.iter().filter(|k| k.state == KeyState::Next) {
        if keep.is_none_or(|n| n.kid != k.kid) {
            p.steps.push(Step::Remove { kid: k.kid.clone(), reason: Removal::Superseded });
        }
    }

    match (current, keep) {
        (None, Some(n)) => {
            // Nothing signs: the next key still gets its full propagation delay, so every
            // token it signs verifies everywhere.
            let at = n.created_at.saturating_add(s.propagation);
            if now >= at {
                p.steps.push(Step::Promote { kid: n.kid.clone() });
            } else {
                p.wake_at = earliest(p.wake_at, at);
                p.rotation_at = Some(at);
                if n.activated_at != Some(at) {
                    p.steps.push(Step::Reschedule { kid: n.kid.clone(), activate_at: at });
                }
            }
        }
        (None, None) => p.steps.push(Step::Create { alg: s.alg, state: KeyState::Current, activate_at: now }),
        (Some(c), Some(n)) => {
            let at = promotion_time(c, n, s);
            if now >= at {
                p.steps.push(Step::Promote { kid: n.kid.clone() });
                p.steps.push(Step::Retire { kid: c.kid.clone() });
            } else {
                p.wake_at = earliest(p.wake_at, at);
                p.rotation_at = Some(at);
                if n.activated_at != Some(at) {
                    p.steps.push(Step::Reschedule { kid: n.kid.clone(), activate_at: at });
                }
            }
        }
        (Some(c), None) => {
            let activated = c.activated_at.unwrap_or(c.created_at);
            let (create_at, activate_at) = if c.alg != s.alg {
                (now, published_from(now).saturating_add(s.propagation))
            } else {
                let due = activated.saturating_add(s.interval);
                // One second early: the key's publication clock starts at the next whole second
                // (see [`published_from`]).
                (
                    due.saturating_sub(s.propagation).saturating_sub(1),
                    due.max(published_from(now).saturating_add(s.propagation)),
                )
            };
            if now >= create_at {
                p.steps.push(Step::Create { alg: s.alg, state: KeyState::Next, activate_at });
                p.wake_at = earliest(p.wake_at, activate_at);
                p.rotation_at = Some(activate_at);
            } else {
                p.wake_at = earliest(p.wake_at, create_at);
                p.rotation_at = Some(activated.saturating_add(s.interval));
            }
        }
    }

    for k in &set.keys {
        // Keys that can sign somewhere: the current one, retired ones that lagging pods may
        // still use, and the next one (so a TTL lowered before its promotion does not shorten
        // the life of tokens that pods still running the old config sign with it).
        let may_sign = match k.state {
            KeyState::Current => true,
            KeyState::Next => keep.is_some_and(|n| n.kid == k.kid),
            KeyState::Retired => k.retired_at.is_some_and(|t| now < t.saturating_add(s.propagation)),
        };
        if may_sign && lifetimes.get(&k.kid).is_none_or(|&l| l < s.token_lifetime) {
            p.steps.push(Step::RecordLifetime { kid: k.kid.clone(), seconds: s.token_lifetime });
        }
        if k.state != KeyState::Retired {
            continue;
        }
        match removal_time(k, lifetimes, s) {
            None => p.steps.push(Step::StampRetired { kid: k.kid.clone() }),
            Some(at) if now >= at => {
                p.steps.push(Step::Remove { kid: k.kid.clone(), reason: Removal::Expired });
            }
            Some(at) => p.wake_at = earliest(p.wake_at, at),
        }
    }
    p
}

/// A `next` key is only published once verify-only pods can get it, i.e. once it is in the
/// JWKS ConfigMap (`published`), not merely in the keys Secret. If the operator died between
/// writing the two, the key's publication clock restarts now, so it still gets a full
/// propagation delay before it signs. (HMAC keys are never in the JWKS: every pod of an HMAC
/// realm mounts the Secret, so for them the Secret is the publication.) Returns the kids reset.
pub fn restart_unpublished(set: &mut KeySet, published: Option<&KeySet>, now: i64) -> Vec<String> {
    let mut reset = Vec::new();
    for k in set.keys.iter_mut().filter(|k| k.state == KeyState::Next && !k.alg.is_symmetric()) {
        if published.is_none_or(|p| p.get(&k.kid).is_none()) && k.created_at < published_from(now) {
            k.created_at = published_from(now);
            reset.push(k.kid.clone());
        }
    }
    reset
}

/// The first step of a new chain for a set whose signing key turned out unusable (an asymmetric
/// key without private material, see [`crate::recovery::retire_unsignable`]): a `next` key
/// published now that signs at `now + P`. `None` when a `next` key of the realm's algorithm is
/// already waiting.
///
/// Why not sign at once: issuer pods mount a key set in which nothing can sign, so they answer
/// `403 verify_only` either way until they receive a new key. A key promoted at once would be
/// used by issuers that receive it early while verifiers lagging by up to P still reject its
/// tokens — a successful login followed by `401`s, depending on the pod. Publishing it first
/// keeps the outage to a clear "cannot mint" for about P, after which every token verifies on
/// every pod. (A deleted Secret without the operator's copy is different: issuer pods keep
/// their last mounted keys meanwhile, so there a new key signs at once.)
pub fn publish_first(set: &KeySet, s: &Schedule, now: i64) -> Option<Step> {
    if set.current().is_some() || set.keys.iter().any(|k| k.state == KeyState::Next && k.alg == s.alg) {
        return None;
    }
    Some(Step::Create {
        alg: s.alg,
        state: KeyState::Next,
        activate_at: published_from(now).saturating_add(s.propagation),
    })
}

/// A visible change, for events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Created { kid: String, alg: Alg, state: KeyState, activate_at: i64 },
    Promoted { kid: String },
    Retired { kid: String },
    Removed { kid: String, reason: Removal },
}

/// Applies `steps` to the set at `now`. `generate(alg, state, now)` makes a new key with a fresh,
/// unique kid.
pub fn apply<E>(
    set: &mut KeySet,
    lifetimes: &mut Lifetimes,
    steps: &[Step],
    now: i64,
    generate: &mut impl FnMut(Alg, KeyState, i64) -> Result<KeyEntry, E>,
) -> Result<Vec<Change>, E> {
    let mut changes = Vec::new();
    for step in steps {
        match step {
            Step::Create { alg, state, activate_at } => {
                let mut k = generate(*alg, *state, now)?;
                k.state = *state;
                // A `next` key's publication clock starts at the next whole second; a `current`
                // key (bootstrap, keys lost) signs at once anyway.
                k.created_at = if *state == KeyState::Next { published_from(now) } else { now };
                k.activated_at = Some(*activate_at);
                k.retired_at = None;
                changes.push(Change::Created {
                    kid: k.kid.clone(),
                    alg: *alg,
                    state: *state,
                    activate_at: *activate_at,
                });
                set.keys.push(k);
            }
            Step::Promote { kid } => {
                if let Some(k) = set.keys.iter_mut().find(|k| &k.kid == kid) {
                    k.state = KeyState::Current;
                    k.activated_at = Some(now);
                    changes.push(Change::Promoted { kid: kid.clone() });
                }
            }
            Step::Retire { kid } => {
                if let Some(k) = set.keys.iter_mut().find(|k| &k.kid == kid) {
                    k.state = KeyState::Retired;
                    k.retired_at = Some(now);
                    changes.push(Change::Retired { kid: kid.clone() });
                }
            }
            Step::Remove { kid, reason } => {
                set.keys.retain(|k| &k.kid != kid);
                lifetimes.remove(kid);
                changes.push(Change::Removed { kid: kid.clone(), reason: *reason });
            }
            Step::Reschedule { kid, activate_at } => {
                if let Some(k) = set.keys.iter_mut().find(|k| &k.kid == kid) {
                    k.activated_at = Some(*activate_at);
                }
            }
            Step::StampRetired { kid } => {
                if let Some(k) = set.keys.iter_mut().find(|k| &k.kid == kid) {
                    k.retired_at = Some(now);
                }
            }
            Step::RecordLifetime { kid, seconds } => {
                let l = lifetimes.entry(kid.clone()).or_insert(0);
                *l = (*l).max(*seconds);
            }
        }
    }
    Ok(changes)
}

/// The result of [`converge`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub changes: Vec<Change>,
    /// True when the set or the lifetimes changed (they must be written).
    pub modified: bool,
    pub wake_at: Option<i64>,
    pub rotation_at: Option<i64>,
}

/// Plans and applies until nothing is due at `now`.
pub fn converge<E>(
    set: &mut KeySet,
    lifetimes: &mut Lifetimes,
    s: &Schedule,
    now: i64,
    generate: &mut impl FnMut(Alg, KeyState, i64) -> Result<KeyEntry, E>,
) -> Result<Outcome, E> {
    let mut out = Outcome::default();
    let before = lifetimes.len();
    lifetimes.retain(|kid, _| set.get(kid).is_some());
    out.modified = lifetimes.len() != before;
    // Each round strictly advances the state (create → promote → retire → remove); a handful
    // of rounds always settles.
    for _ in 0..8 {
        let p = plan(set, lifetimes, s, now);
        if p.steps.is_empty() {
            out.wake_at = p.wake_at;
            out.rotation_at = p.rotation_at;
            return Ok(out);
        }
        out.changes.extend(apply(set, lifetimes, &p.steps, now, generate)?);
        out.modified = true;
    }
    out.wake_at = Some(now);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keyset::KEYSET_VERSION;

    const S: Schedule = Schedule { alg: Alg::ES256, interval: 100, propagation: 10, token_lifetime: 30, leeway: 0 };

    fn key(kid: &str, state: KeyState, created: i64, activated: Option<i64>, retired: Option<i64>) -> KeyEntry {
        KeyEntry {
            kid: kid.into(),
            alg: Alg::ES256,
            state,
            created_at: created,
            activated_at: activated,
            retired_at: retired,
            public_jwk: None,
            private_key_pem: None,
            secret: None,
        }
    }
    fn set(keys: Vec<KeyEntry>) -> KeySet {
        KeySet { version: KEYSET_VERSION.into(), keys }
    }
    fn lt(pairs: &[(&str, i64)]) -> Lifetimes {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }
    use KeyState::{Current, Next, Retired};

    #[test]
    fn schedule_table() {
        let rec = |kid: &str| Step::RecordLifetime { kid: kid.into(), seconds: 30 };
        struct Case {
            name: &'static str,
            keys: Vec<KeyEntry>,
            lifetimes: Lifetimes,
            schedule: Schedule,
            now: i64,
            steps: Vec<Step>,
            wake_at: Option<i64>,
            rotation_at: Option<i64>,
        }
        let cases = vec![
            Case {
                name: "empty set: create a current key now",
                keys: vec![],
                lifetimes: lt(&[]),
                schedule: S,
                now: 1000,
                steps: vec![Step::Create { alg: Alg::ES256, state: Current, activate_at: 1000 }],
                wake_at: None,
                rotation_at: None,
            },
            Case {
                name: "fresh current key: nothing to do until A + I - P - 1",
                keys: vec![key("a", Current, 1000, Some(1000), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: S,
                now: 1001,
                steps: vec![],
                wake_at: Some(1089),
                rotation_at: Some(1100),
            },
            Case {
                name: "current key without a recorded lifetime gets one",
                keys: vec![key("a", Current, 1000, Some(1000), None)],
                lifetimes: lt(&[("a", 20)]),
                schedule: S,
                now: 1001,
                steps: vec![rec("a")],
                wake_at: Some(1089),
                rotation_at: Some(1100),
            },
            Case {
                name: "A + I - P - 1: publish the successor as next (publication clock from A + I - P), due at A + I",
                keys: vec![key("a", Current, 1000, Some(1000), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: S,
                now: 1089,
                steps: vec![Step::Create { alg: Alg::ES256, state: Next, activate_at: 1100 }],
                wake_at: Some(1100),
                rotation_at: Some(1100),
            },
            Case {
                name: "operator was down: the successor still gets a full propagation delay",
                keys: vec![key("a", Current, 1000, Some(1000), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: S,
                now: 1500,
                steps: vec![Step::Create { alg: Alg::ES256, state: Next, activate_at: 1511 }],
                wake_at: Some(1511),
                rotation_at: Some(1511),
            },
            Case {
                name: "next published, not yet due",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1095,
                steps: vec![],
                wake_at: Some(1100),
                rotation_at: Some(1100),
            },
            Case {
                name: "due: promote next, retire current",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1100,
                steps: vec![Step::Promote { kid: "b".into() }, Step::Retire { kid: "a".into() }],
                wake_at: None,
                rotation_at: None,
            },
            Case {
                name: "next created late is not promoted before it propagated",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1098, Some(1100), None)],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1100,
                steps: vec![Step::Reschedule { kid: "b".into(), activate_at: 1108 }],
                wake_at: Some(1108),
                rotation_at: Some(1108),
            },
            Case {
                name: "retired key kept until retired + P + lifetime (inclusive)",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1140,
                steps: vec![],
                wake_at: Some(1141),
                rotation_at: Some(1200),
            },
            Case {
                name: "retired key removed one second after retired + P + lifetime",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1141,
                steps: vec![Step::Remove { kid: "a".into(), reason: Removal::Expired }],
                wake_at: Some(1189),
                rotation_at: Some(1200),
            },
            Case {
                name: "a longer recorded lifetime keeps a retired key longer after the TTL was lowered",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 80), ("b", 30)]),
                schedule: S,
                now: 1140,
                steps: vec![],
                wake_at: Some(1189),
                rotation_at: Some(1200),
            },
            Case {
                name: "a raised TTL is recorded for the retired key while lagging pods may still sign with it",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 10), ("b", 10)]),
                schedule: S,
                now: 1105,
                steps: vec![rec("a"), rec("b")],
                wake_at: Some(1141),
                rotation_at: Some(1200),
            },
            Case {
                name: "a next key records the token lifetime in effect before it signs",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: S,
                now: 1091,
                steps: vec![rec("b")],
                wake_at: Some(1100),
                rotation_at: Some(1100),
            },
            Case {
                name: "TTL lowered while a next key waits: its recorded longer lifetime stays",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 80), ("b", 80)]),
                schedule: S,
                now: 1095,
                steps: vec![],
                wake_at: Some(1100),
                rotation_at: Some(1100),
            },
            Case {
                name: "with a clock leeway a retired key stays one more leeway",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                // token_lifetime 35 = TTL 30 + leeway 5; removal at 1100 + 10 + 35 + 5 + 1.
                lifetimes: lt(&[("a", 35), ("b", 35)]),
                schedule: Schedule { token_lifetime: 35, leeway: 5, ..S },
                now: 1150,
                steps: vec![],
                wake_at: Some(1151),
                rotation_at: Some(1200),
            },
            Case {
                name: "with a clock leeway: removed after both leeways",
                keys: vec![key("a", Retired, 1000, Some(1000), Some(1100)), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 35), ("b", 35)]),
                schedule: Schedule { token_lifetime: 35, leeway: 5, ..S },
                now: 1151,
                steps: vec![Step::Remove { kid: "a".into(), reason: Removal::Expired }],
                wake_at: Some(1189),
                rotation_at: Some(1200),
            },
            Case {
                name: "retired key without retirement time is stamped, not removed",
                keys: vec![key("a", Retired, 0, Some(0), None), key("b", Current, 1090, Some(1100), None)],
                lifetimes: lt(&[("b", 30)]),
                schedule: S,
                now: 5000,
                steps: vec![
                    Step::Create { alg: Alg::ES256, state: Next, activate_at: 5011 },
                    Step::StampRetired { kid: "a".into() },
                ],
                wake_at: Some(5011),
                rotation_at: Some(5011),
            },
            Case {
                name: "algorithm change: new chain starts now, signs after P",
                keys: vec![key("a", Current, 1000, Some(1000), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: Schedule { alg: Alg::EdDSA, ..S },
                now: 1020,
                steps: vec![Step::Create { alg: Alg::EdDSA, state: Next, activate_at: 1031 }],
                wake_at: Some(1031),
                rotation_at: Some(1031),
            },
            Case {
                name: "algorithm change: a next key of the old algorithm is superseded",
                keys: vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("a", 30)]),
                schedule: Schedule { alg: Alg::EdDSA, ..S },
                now: 1095,
                steps: vec![
                    Step::Remove { kid: "b".into(), reason: Removal::Superseded },
                    Step::Create { alg: Alg::EdDSA, state: Next, activate_at: 1106 },
                ],
                wake_at: Some(1106),
                rotation_at: Some(1106),
            },
            Case {
                name: "two next keys: the newest stays",
                keys: vec![
                    key("a", Current, 1000, Some(1000), None),
                    key("b", Next, 1090, Some(1100), None),
                    key("c", Next, 1091, Some(1100), None),
                ],
                lifetimes: lt(&[("a", 30), ("c", 30)]),
                schedule: S,
                now: 1095,
                steps: vec![
                    Step::Remove { kid: "b".into(), reason: Removal::Superseded },
                    Step::Reschedule { kid: "c".into(), activate_at: 1101 },
                ],
                wake_at: Some(1101),
                rotation_at: Some(1101),
            },
            Case {
                name: "no current key but a next one: it still waits until it has been published for P",
                keys: vec![key("b", Next, 1090, Some(1090), None), key("a", Retired, 900, Some(900), Some(1000))],
                lifetimes: lt(&[("a", 30), ("b", 30)]),
                schedule: S,
                now: 1091,
                steps: vec![
                    Step::Reschedule { kid: "b".into(), activate_at: 1100 },
                    Step::Remove { kid: "a".into(), reason: Removal::Expired },
                ],
                wake_at: Some(1100),
                rotation_at: Some(1100),
            },
            Case {
                name: "no current key, next key published for P: promote it",
                keys: vec![key("b", Next, 1090, Some(1100), None)],
                lifetimes: lt(&[("b", 30)]),
                schedule: S,
                now: 1100,
                steps: vec![Step::Promote { kid: "b".into() }],
                wake_at: None,
                rotation_at: None,
            },
        ];
        for c in cases {
            let p = plan(&set(c.keys), &c.lifetimes, &c.schedule, c.now);
            assert_eq!(p.steps, c.steps, "{}", c.name);
            assert_eq!(p.wake_at, c.wake_at, "{} (wake_at)", c.name);
            assert_eq!(p.rotation_at, c.rotation_at, "{} (rotation_at)", c.name);
        }
    }

    #[test]
    fn a_next_key_missing_from_the_jwks_restarts_its_publication_clock() {
        let mut s = set(vec![key("a", Current, 1000, Some(1000), None), key("b", Next, 1090, Some(1100), None)]);
        let published_without_b = set(vec![key("a", Current, 1000, Some(1000), None)]);
        // Published: nothing changes.
        let mut same = s.clone();
        assert!(restart_unpublished(&mut same, Some(&s.clone()), 1099).is_empty());
        // Not published: the clock restarts (from the next whole second) and the promotion
        // moves to now + 1 + P.
        assert_eq!(restart_unpublished(&mut s, Some(&published_without_b), 1099), ["b"]);
        assert_eq!(s.get("b").unwrap().created_at, 1100);
        assert!(restart_unpublished(&mut s, Some(&published_without_b), 1099).is_empty(), "already restarted");
        let p = plan(&s, &lt(&[("a", 30)]), &S, 1100);
        assert_eq!(p.rotation_at, Some(1110));
        // HMAC keys are published by the Secret itself.
        let mut h = set(vec![KeyEntry { alg: Alg::HS256, ..key("h", Next, 1090, None, None) }]);
        assert!(restart_unpublished(&mut h, None, 1099).is_empty());
    }

    #[test]
    fn a_set_that_cannot_sign_publishes_its_new_key_before_it_signs() {
        // The signing key had no private half and was retired now (recovery).
        let mut s = set(vec![key("a", Retired, 1000, Some(1000), Some(1500))]);
        let mut l = Lifetimes::new();
        let step = publish_first(&s, &S, 1500).expect("a new chain");
        assert_eq!(step, Step::Create { alg: Alg::ES256, state: Next, activate_at: 1511 });
        let mut g = fake_generator();
        apply(&mut s, &mut l, &[step], 1500, &mut g).unwrap();
        assert!(publish_first(&s, &S, 1500).is_none(), "one next key is enough");
        // Nothing signs until the new key has been published for P.
        let out = converge(&mut s, &mut l, &S, 1505, &mut g).unwrap();
        assert!(out.changes.is_empty(), "{:?}", out.changes);
        assert!(s.current().is_none());
        assert_eq!(out.wake_at, Some(1511));
        let out = converge(&mut s, &mut l, &S, 1510, &mut g).unwrap();
        assert!(out.changes.is_empty(), "written during 1500, so not surely published for P before 1511");
        let out = converge(&mut s, &mut l, &S, 1511, &mut g).unwrap();
        assert_eq!(out.changes, vec![Change::Promoted { kid: "k1".into() }]);
        assert_eq!(s.current().unwrap().activated_at, Some(1511));
        // A set with a current key needs no new chain.
        assert!(publish_first(&set(vec![key("c", Current, 0, Some(0), None)]), &S, 1500).is_none());
    }

    /// Times are whole seconds rounded down: a reconcile at 1500.98 s runs with `now` = 1500.
    /// A `next` key written then must not sign before 1500.98 + P, i.e. not at 1500 + P, for
    /// every way a key becomes `next` (a catch-up after the operator was down, a new chain, an
    /// algorithm change). (With P = 1 s, a restarted operator used to publish a key and promote
    /// it about 50 ms later.)
    #[test]
    fn a_next_key_written_late_in_a_second_still_waits_a_full_propagation_delay() {
        let p = S.propagation;
        for (name, keys, schedule) in [
            ("catch-up after downtime", vec![key("a", Current, 1000, Some(1000), None)], S),
            ("algorithm change", vec![key("a", Current, 1000, Some(1000), None)], Schedule { alg: Alg::EdDSA, ..S }),
            ("keys lost (publish first)", vec![key("a", Retired, 1000, Some(1000), Some(1500))], S),
        ] {
            let mut s = set(keys);
            let mut l = Lifetimes::new();
            let mut g = fake_generator();
            if let Some(step) = publish_first(&s, &schedule, 1500) {
                apply(&mut s, &mut l, &[step], 1500, &mut g).unwrap();
            }
            converge(&mut s, &mut l, &schedule, 1500, &mut g).unwrap();
            let kid = s.keys.iter().find(|k| k.state == Next).expect(name).kid.clone();
            // A restarted operator reads the set back at 1500 + P (real time 1500 + P + 0.05).
            let out = converge(&mut s, &mut l, &schedule, 1500 + p, &mut g).unwrap();
            assert_eq!(s.get(&kid).unwrap().state, Next, "{name}: promoted after < P: {:?}", out.changes);
            converge(&mut s, &mut l, &schedule, 1501 + p, &mut g).unwrap();
            assert_eq!(s.get(&kid).unwrap().state, Current, "{name}");
        }
    }

    fn fake_generator() -> impl FnMut(Alg, KeyState, i64) -> Result<KeyEntry, ()> {
        let mut n = 0;
        move |alg, state, now| {
            n += 1;
            Ok(KeyEntry { alg, ..key(&format!("k{n}"), state, now, None, None) })
        }
    }

    #[test]
    fn converge_bootstraps_and_is_idempotent() {
        let mut s = KeySet::empty();
        let mut l = Lifetimes::new();
        let mut g = fake_generator();
        let out = converge(&mut s, &mut l, &S, 1000, &mut g).unwrap();
        assert_eq!(
            out.changes,
            vec![Change::Created { kid: "k1".into(), alg: Alg::ES256, state: Current, activate_at: 1000 }]
        );
        assert!(out.modified);
        assert_eq!((out.wake_at, out.rotation_at), (Some(1089), Some(1100)));
        assert_eq!(l.get("k1"), Some(&30));
        let again = converge(&mut s, &mut l, &S, 1000, &mut g).unwrap();
        assert!(!again.modified && again.changes.is_empty());
        // A restarted operator computes the same plan from the same set: no new key.
        let later = converge(&mut s, &mut l, &S, 1050, &mut g).unwrap();
        assert!(!later.modified);
    }

    #[test]
    fn converge_drops_lifetimes_of_unknown_keys() {
        let mut s = set(vec![key("a", Current, 1000, Some(1000), None)]);
        let mut l = lt(&[("a", 30), ("gone", 30)]);
        let out = converge(&mut s, &mut l, &S, 1001, &mut fake_generator()).unwrap();
        assert!(out.modified && out.changes.is_empty());
        assert_eq!(l, lt(&[("a", 30)]));
    }

    /// Runs the operator's schedule over simulated time, reconciling at every wake-up (and at
    /// random extra moments, with random outages), and checks the two promises the schedule
    /// makes to pods whose copy of the key set lags by up to P:
    ///  1. a key signs only after every verifier has it;
    ///  2. every token a pod can have signed verifies everywhere until it expires.
    #[test]
    fn simulated_rotation_never_strands_a_token() {
        for (seed, schedule) in [
            (1u64, S),
            (2, Schedule { alg: Alg::ES256, interval: 7, propagation: 2, token_lifetime: 5, leeway: 0 }),
            (3, Schedule { alg: Alg::ES256, interval: 5, propagation: 4, token_lifetime: 5, leeway: 1 }),
            (4, Schedule { alg: Alg::HS256, interval: 3, propagation: 1, token_lifetime: 1, leeway: 0 }),
        ] {
            let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut next_rand = move |m: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % m
            };
            let horizon = 40 * schedule.interval;
            let p = schedule.propagation;
            let mut s = KeySet::empty();
            let mut l = Lifetimes::new();
            let mut g = fake_generator();
            // history[t] = the published set after the operator's work at second t.
            let mut history: Vec<Vec<(String, KeyState)>> = Vec::new();
            let mut wake = 0i64;
            let mut created = 0;
            for t in 0..horizon {
                let outage = next_rand(50) == 0;
                if !outage && (t >= wake || next_rand(4) == 0) {
                    let out = converge(&mut s, &mut l, &schedule, t, &mut g).unwrap();
                    created += out.changes.iter().filter(|c| matches!(c, Change::Created { .. })).count();
                    wake = out.wake_at.unwrap_or(t + 1);
                }
                history.push(s.keys.iter().map(|k| (k.kid.clone(), k.state)).collect());
            }
            assert!(created >= 30, "seed {seed}: only {created} keys created in {horizon}s");
            let has = |t: i64, kid: &str| t < 0 || history[t as usize].iter().any(|(k, _)| k == kid);
            for t in 0..horizon {
                for d in 0..=p {
                    // A pod lagging by d signs at t with the current key of the set at t - d.
                    let seen = t - d;
                    if seen < 0 {
                        continue;
                    }
                    let Some((kid, _)) = history[seen as usize].iter().find(|(_, st)| *st == Current) else { continue };
                    for u in t..=(t + schedule.token_lifetime).min(horizon - 1) {
                        for d2 in 0..=p {
                            // Any verifier, lagging by d2, checks the token at u (before
                            // the first reconcile there were no pods with tokens).
                            assert!(
                                has(u - d2, kid),
                                "seed {seed}: token signed at {t} by {kid} (pod lag {d}) unknown at {u} to a verifier lagging {d2}"
                            );
                        }
                    }
                }
            }
            // At most one current key and at most one next key at every moment.
            for ks in &history {
                assert!(ks.iter().filter(|(_, st)| *st == Current).count() <= 1);
                assert!(ks.iter().filter(|(_, st)| *st == Next).count() <= 1);
            }
        }
    }
}
