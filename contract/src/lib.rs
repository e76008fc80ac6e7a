//! The contracts between the authrealm operator (writer) and sidecar (reader).
//!
//! Two files cross the boundary, both JSON and both versioned:
//!
//! * [`config::SidecarConfig`] — the realm's sidecar configuration (`sidecar.json`, mounted
//!   from the `<realm>-sidecar` ConfigMap);
//! * [`keyset::KeySet`] — the realm's signing keys (`keyset.json`, mounted from the
//!   `<realm>-signing-keys` Secret for issuer pods, or its public-only projection from the
//!   `<realm>-jwks` ConfigMap for verify-only pods).
//!
//! The Redis key layout of session records ([`redis_keys`]) is shared the same way: the sidecar
//! writes and reads those keys, the operator purges them.
//!
//! Both files are defined here once; the operator serialises these exact types and the sidecar
//! deserialises them, rejecting unknown fields and unknown versions.
#![forbid(unsafe_code)]

pub mod alg;
pub mod authz;
pub mod config;
pub mod external;
pub mod keygen;
pub mod keyset;
pub mod redis_keys;

pub use alg::Alg;
pub use config::{FailurePolicy, RedisMode, SessionMode, SidecarConfig};
pub use external::ExternalIssuer;
pub use keyset::{KeyEntry, KeySet, KeyState};
