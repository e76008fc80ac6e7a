//! One AdmissionReview: gather the facts (the Pod, its Namespace's labels, its AuthRealm), call
//! [`decide`], build the patch with [`mutate`], and record the outcome (metrics, events).
//!
//! The Namespace and the AuthRealm come from the webhook's watch caches; a refusal or a skip
//! decided from them is confirmed with live reads first, and the API server is read directly
//! until the caches have listed ([`super::lookup`] has the rule and why). Live reads that fail
//! refuse the Pod (the same outcome as `failurePolicy: Fail` when the webhook is down): an
//! opted-in Pod never starts unprotected because the API server hiccuped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Resource;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use super::REALM_LABEL;
use super::decide::{Decision, DecisionInput, Injected, UnreadyRealmPolicy, decide};
use super::lookup::{Facts, Lookups, Source};
use super::metrics::{Outcome, WebhookMetrics};
use super::mutate::{SidecarPlan, injection, mutate};
use super::realm::{SidecarDefaults, realm_state};
use crate::crd::AuthRealm;
use kube::runtime::events::EventType;

/// Event reasons of the webhook.
pub mod reason {
    pub const INJECTED: &str = "Injected";
    pub const INJECTION_SKIPPED: &str = "InjectionSkipped";
    pub const INJECTION_DENIED: &str = "InjectionDenied";
}

/// Tracing target of the per-admission timing line.
pub const TIMING_TARGET: &str = "authrealm_operator::webhook::timing";

/// Answers admission reviews.
#[derive(Clone)]
pub struct Reviewer {
    lookups: Lookups,
    defaults: SidecarDefaults,
    policy: UnreadyRealmPolicy,
    metrics: WebhookMetrics,
    /// Events as series (see [`crate::events::recorder`]): not one Event per admitted pod.
    recorder: kube::runtime::events::Recorder,
    /// Held while publishing: the recorder looks its series up before the API call and records
    /// it after, so two publishes of the same event at once (a burst of pods, answered in well
    /// under the time an Event write takes) would create two Events instead of one series.
    publishing: Arc<tokio::sync::Mutex<()>>,
}

/// What the review did, for metrics and events.
struct Verdict {
    response: AdmissionResponse,
    outcome: Outcome,
    reason: &'static str,
    event: Option<EventSpec>,
    /// Injected, or skipped silently (already injected): a lagging cache cannot have made this
    /// outcome wrong in a way that leaves the Pod less protected ([`super::lookup`]).
    final_from_cache: bool,
}

/// An event to record about an admission.
struct EventSpec {
    reason: &'static str,
    note: String,
    warning: bool,
}

fn refuse(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut r = response.deny(message);
    r.result.code = 403;
    r.result.reason = "Forbidden".into();
    r
}

impl Reviewer {
    pub fn new(
        client: kube::Client,
        lookups: Lookups,
        defaults: SidecarDefaults,
        policy: UnreadyRealmPolicy,
        metrics: WebhookMetrics,
        instance: String,
    ) -> Self {
        let recorder = crate::events::recorder(client, &instance);
        Reviewer { lookups, defaults, policy, metrics, recorder, publishing: Default::default() }
    }

    /// Answers one HTTP body holding an AdmissionReview; returns the response body.
    pub async fn review_json(&self, body: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.admissions_inc(Outcome::Error, "BadRequest");
                return serde_json::to_vec(
                    &AdmissionResponse::invalid(format!("authrealm: not an AdmissionReview: {e}")).into_review(),
                )
                .expect("review serialises");
            }
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => {
                self.metrics.admissions_inc(Outcome::Error, "BadRequest");
                return serde_json::to_vec(&AdmissionResponse::invalid(format!("authrealm: {e}")).into_review())
                    .expect("review serialises");
            }
        };
        let response = self.review(&request).await;
        let elapsed = started.elapsed();
        self.metrics.duration.observe(elapsed.as_secs_f64());
        // One line per admission with its exact time, off unless asked for
        // (`AUTHREALM_LOG=…,authrealm_operator::webhook::timing=debug`; the benchmark reads it).
        tracing::debug!(target: TIMING_TARGET, uid = %request.uid, elapsed_us = elapsed.as_micros() as u64, "admission answered");
        serde_json::to_vec(&response.into_review()).expect("review serialises")
    }

    /// Answers one admission request (a span per admission: uid, namespace, pod, and the outcome).
    #[tracing::instrument(
        name = "admission",
        skip_all,
        fields(uid = %req.uid, namespace = req.namespace.as_deref().unwrap_or(""), pod = %pod_display_name(req),
               dry_run = req.dry_run, outcome = tracing::field::Empty, reason = tracing::field::Empty)
    )]
    pub async fn review(&self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let (verdict, realm) = self.verdict(req).await;
        let span = tracing::Span::current();
        span.record("outcome", verdict.outcome.as_str());
        span.record("reason", verdict.reason);
        tracing::debug!("admission reviewed");
        self.metrics.admissions_inc(verdict.outcome, verdict.reason);
        if let Some(event) = verdict.event
            && !req.dry_run
        {
            let this = self.clone();
            let ns = req.namespace.clone().unwrap_or_default();
            let pod_name = pod_display_name(req);
            let regarding = realm.map(|r| r.object_ref(&()));
            tokio::spawn(async move { this.publish(&ns, &pod_name, regarding, event).await });
        }
        verdict.response
    }

    /// The verdict, and the AuthRealm when it was found.
    async fn verdict(&self, req: &AdmissionRequest<DynamicObject>) -> (Verdict, Option<Arc<AuthRealm>>) {
        let base = AdmissionResponse::from(req);
        let is_pod_create = req.kind.group.is_empty()
            && req.kind.kind == "Pod"
            && req.operation == Operation::Create
            && req.sub_resource.is_none();
        let pod: Option<Pod> = if is_pod_create {
            match req.object.as_ref().map(|o| serde_json::to_value(o).and_then(serde_json::from_value::<Pod>)) {
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => {
                    let verdict = Verdict {
                        response: refuse(base, format!("authrealm: cannot read the pod: {e}")),
                        outcome: Outcome::Error,
                        reason: "BadRequest",
                        event: None,
                        final_from_cache: true,
                    };
                    return (verdict, None);
                }
                None => None,
            }
        } else {
            None
        };
        let empty = Default::default();
        let ns = req.namespace.clone().unwrap_or_default();
        let labels = pod.as_ref().and_then(|p| p.metadata.labels.as_ref()).unwrap_or(&empty);
        let annotations = pod.as_ref().and_then(|p| p.metadata.annotations.as_ref()).unwrap_or(&empty);
        let judge = |facts: &Facts| self.judge(req, &base, pod.as_ref(), &ns, labels, annotations, facts);

        // Lookups only for pods that opted in (the objectSelector sends only those anyway), and
        // of the realm only under a valid name.
        let Some(name) = labels.get(REALM_LABEL).filter(|_| pod.is_some()) else {
            return judge(&Facts::default());
        };
        let name = Some(name.as_str()).filter(|n| authrealm_contract::config::is_dns1123_subdomain(n));
        let source = match self.lookups.cached(&ns, name) {
            Some(facts) => {
                let judged = judge(&facts);
                if judged.0.final_from_cache {
                    self.metrics.lookups_inc(Source::Cache);
                    return judged;
                }
                Source::Confirm
            }
            None => Source::Unsynced,
        };
        self.metrics.lookups_inc(source);
        match self.lookups.live(&ns, name).await {
            Ok(facts) => judge(&facts),
            Err(e) => {
                let verdict = Verdict {
                    response: refuse(
                        base.clone(),
                        format!(
                            "authrealm: cannot look up {} to decide on sidecar injection: {}; retry",
                            e.what, e.error
                        ),
                    ),
                    outcome: Outcome::Error,
                    reason: "LookupFailed",
                    event: None,
                    final_from_cache: true,
                };
                (verdict, None)
            }
        }
    }

    /// The verdict on `pod` given the facts about its namespace and realm.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        base: &AdmissionResponse,
        pod: Option<&Pod>,
        ns: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
        facts: &Facts,
    ) -> (Verdict, Option<Arc<AuthRealm>>) {
        let base = base.clone();
        let realm = facts.realm.clone();
        let state = realm_state(realm.as_deref(), &self.defaults);
        let injected = pod.map_or(Injected::No, injection);
        let decision = decide(&DecisionInput {
            pod,
            namespace: ns,
            namespace_labels: &facts.namespace_labels,
            pod_labels: labels,
            pod_annotations: annotations,
            host_network: pod.and_then(|p| p.spec.as_ref()).and_then(|s| s.host_network).unwrap_or(false),
            injected: &injected,
            realm: &state,
            policy: self.policy,
        });
        let pod_name = format!("{ns}/{}", pod_display_name(req));
        let verdict = match decision {
            Decision::Inject { pod, realm: plan, role } => {
                let plan = SidecarPlan { role, ..plan };
                match mutate(pod, &plan) {
                    Ok(patch) => {
                        let mut response = base.with_patch(patch).expect("patch serialises");
                        response
                            .audit_annotations
                            .insert("injected".into(), format!("{}/{}", plan.realm, role.as_str()));
                        Verdict {
                            response,
                            outcome: Outcome::Injected,
                            reason: role.as_str(),
                            event: Some(EventSpec {
                                reason: reason::INJECTED,
                                note: format!("Injected the authrealm sidecar ({}) into Pod {pod_name}", role.as_str()),
                                warning: false,
                            }),
                            final_from_cache: true,
                        }
                    }
                    Err(e) => {
                        let message = format!("authrealm: cannot inject the sidecar of realm {}: {e}", plan.realm);
                        Verdict {
                            response: refuse(base, message.clone()),
                            outcome: Outcome::Denied,
                            reason: "Conflict",
                            event: Some(EventSpec {
                                reason: reason::INJECTION_DENIED,
                                note: format!("Pod {pod_name}: {message}"),
                                warning: true,
                            }),
                            // The realm's ports (from a copy that may lag) decided it.
                            final_from_cache: false,
                        }
                    }
                }
            }
            Decision::Skip { reason: why, warning } => {
                let event = (!why.is_silent()).then(|| {
                    let note = match &warning {
                        Some(w) => format!("Pod {pod_name}: {w}"),
                        None => format!("Pod {pod_name} not injected: {}", why.as_str()),
                    };
                    EventSpec { reason: reason::INJECTION_SKIPPED, note, warning: warning.is_some() }
                });
                let mut response = base;
                response.warnings = warning.map(|w| vec![w]);
                Verdict {
                    response,
                    outcome: Outcome::Skipped,
                    reason: why.as_str(),
                    event,
                    final_from_cache: why.is_silent(),
                }
            }
            Decision::Deny { reason: why, message } => Verdict {
                response: refuse(base, message.clone()),
                outcome: Outcome::Denied,
                reason: why.as_str(),
                event: Some(EventSpec {
                    reason: reason::INJECTION_DENIED,
                    note: format!("Pod {pod_name}: {message}"),
                    warning: true,
                }),
                final_from_cache: false,
            },
        };
        (verdict, realm)
    }

    /// Records an event about a Pod on its AuthRealm when that exists (so `kubectl describe
    /// authrealm` lists what the injector did), else on the Pod (which does not exist yet at
    /// admission: the event shows in `kubectl get events`). Failures are logged only.
    async fn publish(&self, ns: &str, pod_name: &str, regarding: Option<ObjectReference>, event: EventSpec) {
        let regarding = regarding.unwrap_or_else(|| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(ns.to_owned()),
            name: Some(pod_name.to_owned()),
            ..ObjectReference::default()
        });
        let ev = kube::runtime::events::Event {
            type_: if event.warning { EventType::Warning } else { EventType::Normal },
            reason: event.reason.into(),
            note: Some(crate::events::bounded_note(event.note)),
            action: "Admit".into(),
            secondary: None,
        };
        let _turn = self.publishing.lock().await;
        if let Err(e) = self.recorder.publish(&ev, &regarding).await {
            tracing::warn!(namespace = %ns, reason = event.reason, error = %e, "failed to publish webhook event");
        }
    }
}

/// The pod's name, or its generateName followed by `*` when the name is not assigned yet.
fn pod_display_name(req: &AdmissionRequest<DynamicObject>) -> String {
    if !req.name.is_empty() {
        return req.name.clone();
    }
    let meta = req.object.as_ref().map(|o| o.meta());
    match meta {
        Some(m) if m.name.as_deref().is_some_and(|n| !n.is_empty()) => m.name.clone().unwrap_or_default(),
        Some(m) => format!("{}*", m.generate_name.clone().unwrap_or_default()),
        None => "(unknown)".into(),
    }
}
