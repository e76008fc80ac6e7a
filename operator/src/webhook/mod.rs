//! Sidecar injection: the mutating admission webhook the operator serves.
//!
//! App teams opt a Pod in with one label, `authrealm.dev/realm: <realm name>`; the webhook adds
//! the realm's sidecar to it. The parts, from pure to I/O:
//!
//! * [`decide`] — whether a Pod gets the sidecar (one function, documented truth table);
//! * [`mutate`] — the JSON patch that adds it (pure; golden-tested);
//! * [`realm`] — what the injector reads from an `AuthRealm`;
//! * [`lookup`] — the realm and the namespace of a Pod: from the webhook's watch caches, and
//!   when the API server is read instead;
//! * [`review`] — one AdmissionReview in, one AdmissionResponse out (gathers the facts, records
//!   metrics and events);
//! * [`tls`] — the webhook's own CA and serving certificate, rotated, with the
//!   MutatingWebhookConfiguration's `caBundle` kept current;
//! * [`server`] — the HTTPS server (hyper + rustls) with a hot-swapped certificate.
//!
//! [`start_webhook`] ties them together (the operator's `main` calls it).

pub mod decide;
pub mod lookup;
pub mod metrics;
pub mod mutate;
pub mod realm;
pub mod review;
pub mod server;
pub mod tls;

mod config;

pub use config::{CertMode, WebhookConfig};
pub use decide::{Decision, Role, UnreadyRealmPolicy, decide};
pub use metrics::WebhookMetrics;
pub use mutate::mutate;
pub use server::{WebhookError, WebhookHandle, start_webhook};

/// Pod label that opts a Pod in: its value names an AuthRealm in the Pod's namespace.
pub const REALM_LABEL: &str = "authrealm.dev/realm";
/// Namespace label; the value `disabled` opts every Pod of the namespace out.
pub const INJECTION_NAMESPACE_LABEL: &str = "authrealm.dev/injection";
/// Pod annotation; the value `"false"` opts the Pod out.
pub const INJECT_ANNOTATION: &str = "authrealm.dev/inject";
/// Pod annotation; the value `issuer` gives the sidecar the private key set (it can mint tokens).
pub const ROLE_ANNOTATION: &str = "authrealm.dev/role";
/// The only valid value of [`ROLE_ANNOTATION`].
pub const ROLE_ISSUER: &str = "issuer";
/// Pod annotation recording what was injected (JSON); its presence makes reinvocation a no-op.
pub const STATUS_ANNOTATION: &str = "authrealm.dev/sidecar-status";
/// Name of the injected container.
pub const SIDECAR_CONTAINER: &str = "authrealm-sidecar";
/// URL path of the Pod mutation endpoint.
pub const MUTATE_PATH: &str = "/mutate-pods";
