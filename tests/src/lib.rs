pub mod bins;
pub mod kube_env;
pub mod node_env;
pub mod oidc_idp;
pub mod redis_cluster;
pub mod sidecar;
pub mod support;
