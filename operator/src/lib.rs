//! The authrealm operator: turns `AuthRealm` resources into rotating signing keys (a Secret),
//! a public JWKS (a ConfigMap) and the sidecar configuration (a ConfigMap), and reports their
//! state in the realm's status.
//!
//! * [`crd`] — the AuthRealm types (the single import surface) and the generated CRD;
//! * [`rotation`] — the key rotation schedule, a pure function of (key set, schedule, now);
//! * [`recovery`] — what happens when the keys Secret was deleted or edited;
//! * [`key_cache`] — the in-memory copy of each realm's key set, and when it is forgotten;
//! * [`keys_secret`] — the keys Secret's wire format (data key, digest, lifetimes, incident);
//! * [`render`] — names, labels and the objects and sidecar config derived from a realm;
//! * [`conditions`] — status conditions;
//! * [`controller`] — the watches, the shared context and the run loop; [`error`] — its errors;
//! * [`reconcile`] — the reconcile of one realm, and the error policy (backoff, event, metric);
//! * [`keysync`] — the key-sync plan (pure): what to write, in which order, on which condition;
//! * [`status`] — conditions and the status write; [`ownership`] — which objects may be written;
//! * [`cleanup`] — the finalizer and the session purge on deletion;
//! * [`owned`] — the realm's own Secret and ConfigMaps: reads from the watch, ownership;
//! * [`redis_check`] — the `RedisReachable` check and the session purge;
//! * [`redis_monitor`] — Redis credentials, checks shared over kept connections, the periodic check;
//! * [`leader`] — leader election with a Lease, and the term fence on the controller's writes;
//! * [`events`], [`metrics`], [`server`] — observability; [`cli`] — flags and the run loop;
//! * [`webhook`] — sidecar injection (mutating admission webhook) and its TLS.
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod cli;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod issuers;
pub mod key_cache;
pub mod keys_secret;
pub mod keysync;
pub mod leader;
pub mod metrics;
pub mod owned;
pub mod ownership;
pub mod reconcile;
pub mod recovery;
pub mod redis_check;
pub mod redis_monitor;
pub mod render;
pub mod rotation;
pub mod server;
pub mod status;
pub mod webhook;

pub use crd::{AuthRealm, AuthRealmSpec, AuthRealmStatus};
