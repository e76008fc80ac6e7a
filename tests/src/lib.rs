pub mod redis_cluster;
