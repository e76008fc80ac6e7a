pub mod bins;
pub mod kube_env;
pub mod node_env;
pub mod redis_backend;
pub mod redis_cluster;
pub mod redis_standalone;
pub mod sidecar;
pub mod support;
