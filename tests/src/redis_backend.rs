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

    /// `redis-cli` on the node at `addr`.
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> Result<String> {
        match self {
            TestRedis::Cluster(c) => c.cli(addr, args),
            TestRedis::Standalone(s) => s.cli_at(addr, args),
        }
    }

    /// A replica of the node holding `key` (the master's first replica; the server's first).
    pub fn replica_for_key(&self, key: &str) -> Result<String> {
        match self {
            TestRedis::Cluster(c) => {
                let master = self.node_for_key(key)?;
                let mut replicas = c.replicas_of(&master)?;
                anyhow::ensure!(!replicas.is_empty(), "{master} has no replica");
                Ok(replicas.remove(0).addr)
            }
            TestRedis::Standalone(s) => {
                s.replica_addrs().into_iter().next().ok_or_else(|| anyhow::anyhow!("the server has no replica"))
            }
        }
    }

    /// SIGSTOP / SIGCONT of the process at `addr`.
    pub fn pause(&self, addr: &str) -> Result<()> {
        match self {
            TestRedis::Cluster(c) => c.pause(addr),
            TestRedis::Standalone(s) => s.pause_at(addr),
        }
    }

    pub fn resume(&self, addr: &str) -> Result<()> {
        match self {
            TestRedis::Cluster(c) => c.resume(addr),
            TestRedis::Standalone(s) => s.resume_at(addr),
        }
    }

    /// Until every master's replicas are online again.
    pub fn wait_replication(&self, timeout: std::time::Duration) -> Result<()> {
        match self {
            TestRedis::Cluster(c) => c.wait_replication(timeout, Some(1)),
            TestRedis::Standalone(s) => s.wait_replication(timeout),
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
