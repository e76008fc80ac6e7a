pub mod bins;
pub mod chart_operator;
pub mod kube_env;
pub mod node_env;
pub mod redis_cluster;
pub mod sidecar;
pub mod support;
