//! authrealm sidecar: validates every bearer JWT (signature, claims and its session record
//! in a Redis Cluster) before proxying to the app, and mints/revokes tokens for the app on
//! a loopback-only issuer API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod cli;
pub mod coalesce;
pub mod framing;
pub mod issuer;
pub mod jwks;
pub mod keys;
pub mod longlived;
pub mod metrics;
pub mod paths;
pub mod proxy;
pub mod server;
pub mod session;
pub mod sessioncache;
pub mod token;
pub mod tokencache;
pub mod topology;
pub mod upstream;
pub mod verifier;
