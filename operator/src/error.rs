//! The controller's one error enum: one variant per failed operation, naming the object.

use authrealm_contract::keygen::KeyError;

use crate::leader::TermError;
use crate::redis_check::CheckError;

/// One error enum for the controller: one variant per failed operation, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read {kind} {namespace}/{name}: {source}")]
    Read { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("failed to write {kind} {namespace}/{name}: {source}")]
    Write { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("failed to write the status of AuthRealm {namespace}/{name}: {source}")]
    Status { namespace: String, name: String, source: kube::Error },
    #[error("failed to update the finalizers of AuthRealm {namespace}/{name}: {source}")]
    Finalizer { namespace: String, name: String, source: kube::Error },
    #[error("failed to generate a key for AuthRealm {namespace}/{name}: {source}")]
    KeyGen { namespace: String, name: String, source: KeyError },
    #[error("refusing to write an invalid key set for AuthRealm {namespace}/{name}: {message}")]
    InvalidKeySet { namespace: String, name: String, message: String },
    #[error("refusing to write {kind} {namespace}/{name}: it is not controlled by the AuthRealm")]
    NotOwned { kind: &'static str, namespace: String, name: String },
    #[error("failed to purge the sessions of AuthRealm {namespace}/{name}: {source}")]
    Purge { namespace: String, name: String, source: CheckError },
    #[error(
        "the AuthRealm CRD (authrealms.authrealm.dev) is not installed; install it with \
         `kubectl apply -f crds/authrealm.yaml` (or the Helm chart)"
    )]
    CrdMissing,
    #[error("failed to list AuthRealms: {0}")]
    List(#[source] kube::Error),
    #[error("AuthRealm {0} has no namespace")]
    NoNamespace(String),
    #[error(transparent)]
    NotLeader(#[from] TermError),
    #[error("failed to build the controller's Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

impl Error {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::Status { .. } => "status",
            Error::Finalizer { .. } => "finalizer",
            Error::KeyGen { .. } => "keygen",
            Error::InvalidKeySet { .. } => "invalid_keyset",
            Error::NotOwned { .. } => "not_owned",
            Error::Purge { .. } => "purge",
            Error::CrdMissing => "crd_missing",
            Error::List(_) => "list",
            Error::NoNamespace(_) => "no_namespace",
            Error::NotLeader(_) => "not_leader",
            Error::Client(_) => "client",
        }
    }
}
