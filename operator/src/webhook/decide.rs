//! Whether a Pod gets the sidecar: one pure function, [`decide`], and its truth table.
//!
//! Rows are evaluated top to bottom; the first row whose condition holds gives the outcome.
//! Opt-outs come before everything that could inject, so they always win.
//!
//! | # | condition                                                         | outcome                                   |
//! |---|-------------------------------------------------------------------|-------------------------------------------|
//! | 1 | the request is not a Pod CREATE                                    | skip `NotPodCreate` (silent)              |
//! | 2 | the Pod has no `authrealm.dev/realm` label                        | skip `NotOptedIn` (silent)                |
//! | 3 | its namespace is labelled `authrealm.dev/injection: disabled`     | skip `NamespaceOptOut`                    |
//! | 4 | the Pod is annotated `authrealm.dev/inject: "false"`              | skip `PodOptOut`                          |
//! | 5 | the Pod already carries the sidecar: status annotation **and** sidecar init container | skip `AlreadyInjected` (silent; reinvocation) |
//! |5b | only one of them, or a regular container named like the sidecar (e.g. copied into a template) | policy: **deny**, or skip `PartialInjection` with a warning |
//! | 6 | the Pod uses `hostNetwork`                                        | skip `HostNetwork`, **with a warning**    |
//! | 7 | the realm label is not a valid AuthRealm name                     | **deny**                                  |
//! | 8 | `authrealm.dev/role` is set to anything but `issuer`              | **deny**                                  |
//! | 9 | no AuthRealm of that name in the Pod's namespace                  | policy: **deny**, or skip `RealmNotFound` with a warning |
//! |10 | the AuthRealm's keys and config are not in place (`KeysReady` is not `True`) | policy: **deny**, or skip `RealmNotReady` with a warning |
//! |11 | otherwise                                                         | **inject**; role `issuer` when annotated `authrealm.dev/role: issuer` or when the realm signs with HMAC, else `verifier` |
//!
//! Row 10 looks at `KeysReady`, not `Ready`: `KeysReady=True` means the operator wrote the keys
//! Secret, the JWKS and the sidecar ConfigMap of a valid spec and the current key can sign — all
//! a pod needs. `Ready` additionally requires `RedisReachable`, the operator's periodic Redis check;
//! a failover overlapping one check, or a network path only the pods have, must not refuse pods
//! (the sidecar checks Redis itself and reports it on `/readyz`). See [`super::realm::realm_state`].
//!
//! Rows 5b, 9 and 10 follow [`UnreadyRealmPolicy`] (operator flag `--webhook-unready-realm-policy`,
//! chart value `webhook.unreadyRealmPolicy`, default `deny`): an opted-in Pod is never admitted
//! unprotected without the client being told.
//!
//! HMAC realms (HS256/384/512) have no public key set: a verifier needs the same secret key an
//! issuer signs with, so every pod of an HMAC realm is injected with issuer semantics and mounts
//! the private key set (row 11).

use std::collections::BTreeMap;

use authrealm_contract::config::is_dns1123_subdomain;

use super::{INJECT_ANNOTATION, INJECTION_NAMESPACE_LABEL, REALM_LABEL, ROLE_ANNOTATION, ROLE_ISSUER};

/// What the webhook does when a Pod names a realm that does not exist or whose keys and config
/// are not in place (row 10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnreadyRealmPolicy {
    /// Refuse the Pod with a message naming the realm and what is wrong (default).
    #[default]
    Deny,
    /// Admit the Pod without the sidecar, with an admission warning and an event.
    Warn,
}

/// The sidecar's role in a Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Verifies tokens; mounts the public key set only.
    Verifier,
    /// Verifies and mints tokens; mounts the private key set.
    Issuer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Verifier => "verifier",
            Role::Issuer => "issuer",
        }
    }
}

/// What the webhook knows about the realm a Pod names. `R`: what the injection needs of a ready
/// realm (the HTTP layer passes the realm and its rendered sidecar; the table tests `()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RealmState<R = ()> {
    /// No AuthRealm of that name in the Pod's namespace.
    NotFound,
    /// The AuthRealm exists but its keys and config are not in place (`KeysReady` is not
    /// `True`); the text says why.
    NotReady(String),
    /// Ready for pods (`KeysReady=True`). `hmac`: its keys are symmetric (no public key set).
    Ready { hmac: bool, realm: R },
}

/// Traces of an earlier injection on a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injected {
    /// None: the Pod can be injected.
    No,
    /// The status annotation and the sidecar init container: a reinvocation.
    Yes,
    /// Some traces but not a complete sidecar; the text says which.
    Partly(String),
}

/// The facts [`decide`] looks at, gathered by the HTTP layer from the AdmissionRequest, the Pod's
/// Namespace and the AuthRealm.
#[derive(Clone, Debug)]
pub struct DecisionInput<'a, P = (), R = ()> {
    /// The Pod of a CREATE of a core/v1 Pod; `None` for anything else.
    pub pod: Option<P>,
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub pod_labels: &'a BTreeMap<String, String>,
    pub pod_annotations: &'a BTreeMap<String, String>,
    pub host_network: bool,
    /// What the Pod already carries of an injection.
    pub injected: &'a Injected,
    /// The realm named by the label; only consulted by rows 9–11.
    pub realm: &'a RealmState<R>,
    pub policy: UnreadyRealmPolicy,
}

/// Why a Pod was not injected. `as_str` is the metrics label and the event reason detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    NotPodCreate,
    NotOptedIn,
    NamespaceOptOut,
    PodOptOut,
    AlreadyInjected,
    PartialInjection,
    HostNetwork,
    RealmNotFound,
    RealmNotReady,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotPodCreate => "NotPodCreate",
            SkipReason::NotOptedIn => "NotOptedIn",
            SkipReason::NamespaceOptOut => "NamespaceOptOut",
            SkipReason::PodOptOut => "PodOptOut",
            SkipReason::AlreadyInjected => "AlreadyInjected",
            SkipReason::PartialInjection => "PartialInjection",
            SkipReason::HostNetwork => "HostNetwork",
            SkipReason::RealmNotFound => "RealmNotFound",
            SkipReason::RealmNotReady => "RealmNotReady",
        }
    }

    /// Skips that are part of normal operation and deserve neither an event nor a warning.
    pub fn is_silent(self) -> bool {
        matches!(self, SkipReason::NotPodCreate | SkipReason::NotOptedIn | SkipReason::AlreadyInjected)
    }
}

/// Why a Pod was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    PartialInjection,
    InvalidRealmName,
    InvalidRole,
    RealmNotFound,
    RealmNotReady,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::PartialInjection => "PartialInjection",
            DenyReason::InvalidRealmName => "InvalidRealmName",
            DenyReason::InvalidRole => "InvalidRole",
            DenyReason::RealmNotFound => "RealmNotFound",
            DenyReason::RealmNotReady => "RealmNotReady",
        }
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<P = (), R = ()> {
    /// Add the sidecar of the ready `realm` with `role` to `pod` (which carries no trace of an
    /// injection: a reinvocation is skipped by row 5).
    Inject { pod: P, realm: R, role: Role },
    /// Admit unchanged. `warning` is returned to the client (and recorded as an event) when the
    /// Pod asked for protection it does not get.
    Skip { reason: SkipReason, warning: Option<String> },
    /// Refuse the Pod; `message` is shown to the client.
    Deny { reason: DenyReason, message: String },
}

/// The injection decision; see the module documentation for the truth table.
pub fn decide<P: Clone, R: Clone>(input: &DecisionInput<'_, P, R>) -> Decision<P, R> {
    let skip = |reason, warning: Option<String>| Decision::Skip { reason, warning };
    let deny = |reason, message: String| Decision::Deny { reason, message };

    // 1
    let Some(pod) = input.pod.clone() else {
        return skip(SkipReason::NotPodCreate, None);
    };
    // 2
    let Some(realm) = input.pod_labels.get(REALM_LABEL) else {
        return skip(SkipReason::NotOptedIn, None);
    };
    // 3
    if input.namespace_labels.get(INJECTION_NAMESPACE_LABEL).map(String::as_str) == Some("disabled") {
        return skip(SkipReason::NamespaceOptOut, None);
    }
    // 4
    if input.pod_annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return skip(SkipReason::PodOptOut, None);
    }
    // 5, 5b
    match input.injected {
        Injected::No => {}
        Injected::Yes => return skip(SkipReason::AlreadyInjected, None),
        Injected::Partly(what) => {
            let problem = format!(
                "pod opts into realm {realm:?} but already carries {what}, without a complete authrealm sidecar \
                 (copied from another pod?)"
            );
            return match input.policy {
                UnreadyRealmPolicy::Deny => deny(
                    DenyReason::PartialInjection,
                    format!(
                        "authrealm: {problem}; refusing the pod so it does not run unprotected (remove it and retry)"
                    ),
                ),
                UnreadyRealmPolicy::Warn => skip(
                    SkipReason::PartialInjection,
                    Some(format!("authrealm: {problem}; the pod was admitted WITHOUT the sidecar")),
                ),
            };
        }
    }
    // 6
    if input.host_network {
        return skip(
            SkipReason::HostNetwork,
            Some(format!(
                "authrealm: pod opts into realm {realm:?} but uses hostNetwork; the sidecar was NOT injected \
                 and the pod is NOT protected"
            )),
        );
    }
    // 7
    if !is_dns1123_subdomain(realm) || realm.len() > 63 {
        return deny(
            DenyReason::InvalidRealmName,
            format!(
                "authrealm: label {REALM_LABEL}={realm:?} does not name an AuthRealm (expected a lower-case \
                 DNS name of at most 63 characters)"
            ),
        );
    }
    // 8
    let role = match input.pod_annotations.get(ROLE_ANNOTATION).map(String::as_str) {
        None => Role::Verifier,
        Some(ROLE_ISSUER) => Role::Issuer,
        Some(other) => {
            return deny(
                DenyReason::InvalidRole,
                format!(
                    "authrealm: annotation {ROLE_ANNOTATION}={other:?} is not valid: use \"{ROLE_ISSUER}\" for pods \
                     that mint tokens, or remove it for verify-only pods"
                ),
            );
        }
    };
    let ns = input.namespace;
    // 9, 10
    let (reason, skip_reason, problem) = match input.realm {
        RealmState::Ready { hmac, realm: ready } => {
            // 11
            let role = if *hmac { Role::Issuer } else { role };
            return Decision::Inject { pod, realm: ready.clone(), role };
        }
        RealmState::NotFound => {
            (DenyReason::RealmNotFound, SkipReason::RealmNotFound, format!("AuthRealm {ns}/{realm} does not exist"))
        }
        RealmState::NotReady(why) => (
            DenyReason::RealmNotReady,
            SkipReason::RealmNotReady,
            format!("AuthRealm {ns}/{realm} is not ready for pods ({why})"),
        ),
    };
    match input.policy {
        UnreadyRealmPolicy::Deny => deny(
            reason,
            format!(
                "authrealm: {problem}; refusing the pod so it does not run unprotected (remove the {REALM_LABEL} \
                 label, or fix the realm and retry)"
            ),
        ),
        UnreadyRealmPolicy::Warn => {
            skip(skip_reason, Some(format!("authrealm: {problem}; the pod was admitted WITHOUT the sidecar")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// One row of the table test: a description, inputs, and the expected outcome.
    struct Case {
        name: &'static str,
        pod_create: bool,
        ns_labels: &'static [(&'static str, &'static str)],
        labels: &'static [(&'static str, &'static str)],
        annotations: &'static [(&'static str, &'static str)],
        host_network: bool,
        injected: Injected,
        realm: RealmState,
        policy: UnreadyRealmPolicy,
        expect: Expect,
    }

    #[derive(Debug, PartialEq)]
    enum Expect {
        Inject(Role),
        Skip(SkipReason, bool),
        Deny(DenyReason),
    }

    const OPTED_IN: &[(&str, &str)] = &[("authrealm.dev/realm", "demo"), ("app", "web")];
    const READY: RealmState = RealmState::Ready { hmac: false, realm: () };

    fn base(name: &'static str) -> Case {
        Case {
            name,
            pod_create: true,
            ns_labels: &[],
            labels: OPTED_IN,
            annotations: &[],
            host_network: false,
            injected: Injected::No,
            realm: READY,
            policy: UnreadyRealmPolicy::Deny,
            expect: Expect::Inject(Role::Verifier),
        }
    }

    fn cases() -> Vec<Case> {
        use Expect::*;
        vec![
            Case { expect: Inject(Role::Verifier), ..base("opted in, realm ready: verifier") },
            Case {
                annotations: &[("authrealm.dev/role", "issuer")],
                expect: Inject(Role::Issuer),
                ..base("issuer annotation: issuer")
            },
            Case {
                realm: RealmState::Ready { hmac: true, realm: () },
                expect: Inject(Role::Issuer),
                ..base("HMAC realm: every pod is an issuer")
            },
            Case { pod_create: false, expect: Skip(SkipReason::NotPodCreate, false), ..base("row 1: not a create") },
            Case {
                labels: &[("app", "web")],
                realm: RealmState::NotFound,
                expect: Skip(SkipReason::NotOptedIn, false),
                ..base("row 2: no realm label")
            },
            Case {
                ns_labels: &[("authrealm.dev/injection", "disabled")],
                expect: Skip(SkipReason::NamespaceOptOut, false),
                ..base("row 3: namespace opt-out")
            },
            Case {
                ns_labels: &[("authrealm.dev/injection", "enabled")],
                expect: Inject(Role::Verifier),
                ..base("namespace label with another value is no opt-out")
            },
            Case {
                annotations: &[("authrealm.dev/inject", "false")],
                expect: Skip(SkipReason::PodOptOut, false),
                ..base("row 4: pod opt-out")
            },
            Case {
                annotations: &[("authrealm.dev/inject", "true")],
                expect: Inject(Role::Verifier),
                ..base("inject=true is not an opt-out")
            },
            Case {
                ns_labels: &[("authrealm.dev/injection", "disabled")],
                annotations: &[("authrealm.dev/inject", "false"), ("authrealm.dev/role", "bogus")],
                realm: RealmState::NotFound,
                expect: Skip(SkipReason::NamespaceOptOut, false),
                ..base("opt-outs win over every deny")
            },
            Case {
                annotations: &[("authrealm.dev/inject", "false")],
                realm: RealmState::NotReady("KeysReady=False".into()),
                host_network: true,
                expect: Skip(SkipReason::PodOptOut, false),
                ..base("pod opt-out wins over an unready realm and hostNetwork")
            },
            Case {
                injected: Injected::Yes,
                expect: Skip(SkipReason::AlreadyInjected, false),
                ..base("row 5: reinvocation is a no-op")
            },
            Case {
                injected: Injected::Yes,
                realm: RealmState::NotFound,
                expect: Skip(SkipReason::AlreadyInjected, false),
                ..base("row 5 before the realm lookup: a reinvocation never denies")
            },
            Case {
                injected: Injected::Partly("the annotation authrealm.dev/sidecar-status".into()),
                expect: Deny(DenyReason::PartialInjection),
                ..base("row 5b: a copied status annotation alone is not an injection")
            },
            Case {
                injected: Injected::Partly("a container named \"authrealm-sidecar\"".into()),
                policy: UnreadyRealmPolicy::Warn,
                expect: Skip(SkipReason::PartialInjection, true),
                ..base("row 5b: warn policy admits it unprotected, with a warning")
            },
            Case {
                injected: Injected::Partly("the annotation authrealm.dev/sidecar-status".into()),
                annotations: &[("authrealm.dev/inject", "false")],
                expect: Skip(SkipReason::PodOptOut, false),
                ..base("row 5b comes after the opt-outs")
            },
            Case {
                host_network: true,
                expect: Skip(SkipReason::HostNetwork, true),
                ..base("row 6: hostNetwork skipped with a warning")
            },
            Case {
                labels: &[("authrealm.dev/realm", "Demo_Realm")],
                expect: Deny(DenyReason::InvalidRealmName),
                ..base("row 7: invalid realm name")
            },
            Case {
                labels: &[("authrealm.dev/realm", "")],
                expect: Deny(DenyReason::InvalidRealmName),
                ..base("row 7: empty realm label")
            },
            Case {
                annotations: &[("authrealm.dev/role", "Issuer")],
                expect: Deny(DenyReason::InvalidRole),
                ..base("row 8: role must be exactly issuer")
            },
            Case {
                realm: RealmState::NotFound,
                expect: Deny(DenyReason::RealmNotFound),
                ..base("row 9: unknown realm, deny policy")
            },
            Case {
                realm: RealmState::NotFound,
                policy: UnreadyRealmPolicy::Warn,
                expect: Skip(SkipReason::RealmNotFound, true),
                ..base("row 9: unknown realm, warn policy")
            },
            Case {
                realm: RealmState::NotReady("KeysReady=False".into()),
                expect: Deny(DenyReason::RealmNotReady),
                ..base("row 10: realm not ready, deny policy")
            },
            Case {
                realm: RealmState::NotReady("KeysReady=False".into()),
                policy: UnreadyRealmPolicy::Warn,
                expect: Skip(SkipReason::RealmNotReady, true),
                ..base("row 10: realm not ready, warn policy")
            },
        ]
    }

    #[test]
    fn truth_table() {
        for case in cases() {
            let (ns_labels, labels, annotations) = (map(case.ns_labels), map(case.labels), map(case.annotations));
            let input = DecisionInput {
                pod: case.pod_create.then_some(()),
                namespace: "team-a",
                namespace_labels: &ns_labels,
                pod_labels: &labels,
                pod_annotations: &annotations,
                host_network: case.host_network,
                injected: &case.injected,
                realm: &case.realm,
                policy: case.policy,
            };
            let got = match decide(&input) {
                Decision::Inject { role, .. } => Expect::Inject(role),
                Decision::Skip { reason, warning } => {
                    if let Some(w) = &warning {
                        assert!(w.contains("authrealm:") && w.contains("demo"), "{}: {w}", case.name);
                    }
                    Expect::Skip(reason, warning.is_some())
                }
                Decision::Deny { reason, message } => {
                    assert!(message.starts_with("authrealm: "), "{}: {message}", case.name);
                    Expect::Deny(reason)
                }
            };
            assert_eq!(got, case.expect, "{}", case.name);
        }
    }

    #[test]
    fn deny_messages_name_the_realm_and_the_fix() {
        let labels = map(OPTED_IN);
        let empty = BTreeMap::new();
        let realm: RealmState = RealmState::NotReady("KeysReady=False: waiting for keys".into());
        let input = DecisionInput {
            pod: Some(()),
            namespace: "team-a",
            namespace_labels: &empty,
            pod_labels: &labels,
            pod_annotations: &empty,
            host_network: false,
            injected: &Injected::No,
            realm: &realm,
            policy: UnreadyRealmPolicy::Deny,
        };
        let Decision::Deny { message, .. } = decide(&input) else { panic!("expected a deny") };
        assert!(
            message.contains("AuthRealm team-a/demo is not ready for pods (KeysReady=False: waiting for keys)"),
            "{message}"
        );
        assert!(message.contains("remove the authrealm.dev/realm label"), "{message}");
    }
}
