pub mod kube_env;
pub mod redis_cluster;
