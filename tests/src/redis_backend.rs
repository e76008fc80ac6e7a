//! One Redis for the suites that run against both kinds: a Redis Cluster
//! ([`crate::redis_cluster`]) or a standalone server ([`crate::redis_standalone`]), and the
//! sidecar config that points at it.

use anyhow::Result;
use authrealm_contract::{RedisMode, SidecarConfig};

use crate::redis_cluster::{RedisCluster, RedisClusterOptions, key_slot};
use crate::redis_standalone::RedisStandalone;

pub enum TestRedis {
    Cluster(RedisCluster),
    Standalone(RedisStandalone),
}

impl TestRedis {
    /// A six-node cluster (3 masters + 3 replicas).
    pub fn cluster() -> Result<Self> {
        RedisCluster::start(RedisClusterOptions::default()).map(TestRedis::Cluster)
    }

    /// A standalone server with `replicas` replicas (appendonly, see [`RedisStandalone`]).
    pub fn standalone(replicas: usize) -> Result<Self> {
        RedisStandalone::start(replicas).map(TestRedis::Standalone)
    }

    pub fn mode(&self) -> RedisMode {
        match self {
            TestRedis::Cluster(_) => RedisMode::Cluster,
            TestRedis::Standalone(_) => RedisMode::Standalone,
        }
    }

    /// What `redis.endpoints` names: the cluster's seeds, or the one server.
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            TestRedis::Cluster(c) => c.seeds(),
            TestRedis::Standalone(s) => s.endpoints(),
        }
    }

    /// [`crate::sidecar::test_config`] pointed at this Redis (`redis.mode` and endpoints).
    pub fn config(&self, realm: &str) -> SidecarConfig {
        let mut c = crate::sidecar::test_config(realm, Some(self.endpoints()));
        if let Some(r) = c.redis.as_mut() {
            r.mode = self.mode();
        }
        c
    }

    /// The address of the node that holds `key` (the master serving its slot; the server).
    pub fn node_for_key(&self, key: &str) -> Result<String> {
        match self {
            TestRedis::Cluster(c) => Ok(c.master_for_slot(key_slot(key.as_bytes()))?.addr),
            TestRedis::Standalone(s) => Ok(s.addr()),
        }
    }

    /// `redis-cli` on the node holding `key`.
    pub fn cli_for_key(&self, key: &str, args: &[&str]) -> Result<String> {
        let node = self.node_for_key(key)?;
        match self {
            TestRedis::Cluster(c) => c.cli(&node, args),
            TestRedis::Standalone(s) => s.cli_at(&node, args),
        }
    }

    /// Nodes that hold data (the cluster's masters; 1).
    pub fn data_nodes(&self) -> usize {
        match self {
            TestRedis::Cluster(_) => crate::redis_cluster::MASTERS,
            TestRedis::Standalone(_) => 1,
        }
    }
}
