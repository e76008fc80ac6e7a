//! Smoke test of the Redis Cluster harness: creation, routing, failover, restart.
//!
//! Uses `--cluster-node-timeout 2000` (Redis' default is 15000 ms, which makes failover take
//! ≈ 16–17 s instead of ≈ 4 s).

use std::time::{Duration, Instant};

use authrealm_tests::redis_cluster::{MASTERS, RedisCluster, RedisClusterOptions, SLOTS, key_slot};

fn check_topology(cluster: &RedisCluster) {
    let masters = cluster.masters().expect("masters");
    assert_eq!(masters.len(), MASTERS, "masters: {masters:#?}");
    let covered: u32 = masters.iter().map(|m| m.slot_count()).sum();
    assert_eq!(covered, SLOTS, "masters: {masters:#?}");
    for slot in [0u16, 5460, 5461, 10922, 10923, 16383] {
        let m = cluster.master_for_slot(slot).expect("master_for_slot");
        assert!(m.owns_slot(slot));
    }
    for m in &masters {
        let replicas = cluster.replicas_of(&m.addr).expect("replicas_of");
        assert_eq!(replicas.len(), 1, "replicas of {}: {replicas:#?}", m.addr);
        assert_eq!(replicas[0].master_id.as_deref(), Some(m.id.as_str()));
    }
    assert_eq!(cluster.seeds().len(), 6);
}

fn check_key_slots(cluster: &RedisCluster) {
    let any = &cluster.seeds()[0];
    for key in [
        "foo",
        "bar",
        "hello",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "authrealm:session:4f1c2a",
        "",
    ] {
        let server: u16 = cluster
            .cli(any, &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT")
            .trim()
            .parse()
            .expect("slot number");
        assert_eq!(key_slot(key.as_bytes()), server, "key {key:?}");
    }
}

fn run(opts: RedisClusterOptions) {
    let label = if opts.password.is_some() { "with password" } else { "without password" };
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start(opts).expect("start cluster");
    println!("[{label}] cluster ready in {:?}: {:?}", t0.elapsed(), cluster.seeds());

    check_topology(&cluster);
    check_key_slots(&cluster);

    // Routing through redis-cli -c from any node.
    let seeds = cluster.seeds();
    for (i, key) in ["alpha", "beta", "gamma", "delta", "{t}1", "{t}2"].iter().enumerate() {
        let value = format!("v{i}");
        let entry = &seeds[i % seeds.len()];
        assert_eq!(cluster.cli_cluster(entry, &["SET", key, &value]).unwrap(), "OK");
        let other = &seeds[(i + 3) % seeds.len()];
        assert_eq!(cluster.cli_cluster(other, &["GET", key]).unwrap(), value);
    }
    // Plain cli against the wrong node gets MOVED, which -e turns into an error.
    let owner = cluster.master_for_key(b"alpha").unwrap();
    let wrong = cluster.masters().unwrap().into_iter().find(|m| m.id != owner.id).unwrap();
    assert_eq!(cluster.cli(&owner.addr, &["GET", "alpha"]).unwrap(), "v0");
    let err = cluster.cli(&wrong.addr, &["GET", "alpha"]).unwrap_err();
    assert!(format!("{err:#}").contains("MOVED"), "{err:#}");

    // Write to the victim's slots and make sure its replica has it.
    let victim = cluster.master_for_slot(0).unwrap();
    let replica = cluster.replicas_of(&victim.addr).unwrap().remove(0);
    let key = (0..).map(|i| format!("before-kill-{i}")).find(|k| victim.owns_slot(key_slot(k.as_bytes()))).unwrap();
    assert_eq!(cluster.cli(&victim.addr, &["SET", &key, "survives"]).unwrap(), "OK");
    assert_eq!(cluster.cli(&victim.addr, &["WAIT", "1", "1000"]).unwrap(), "1");

    let t_kill = Instant::now();
    cluster.kill(&victim.addr).expect("kill");
    let promoted = cluster.wait_failover(&victim.addr, Duration::from_secs(30)).expect("failover");
    let failover = t_kill.elapsed();
    println!(
        "[{label}] failover of {} -> {} took {failover:?} (node timeout {} ms)",
        victim.addr,
        promoted.addr,
        cluster.node_timeout_ms()
    );
    assert_eq!(promoted.id, replica.id, "the victim's replica was promoted");
    assert_eq!(promoted.slots, victim.slots);
    assert!(!cluster.live_addrs().contains(&victim.addr));
    cluster.wait_healthy(Duration::from_secs(10)).unwrap();
    assert_eq!(cluster.masters().unwrap().len(), MASTERS);
    assert_eq!(cluster.master_for_slot(0).unwrap().id, promoted.id);
    assert_eq!(cluster.cli(&promoted.addr, &["GET", &key]).unwrap(), "survives");
    assert_eq!(cluster.cli_cluster(&seeds[1], &["GET", &key]).unwrap(), "survives");
    for (i, k) in ["alpha", "beta", "gamma", "delta", "{t}1", "{t}2"].iter().enumerate() {
        let entry = cluster.live_addrs()[0].clone();
        assert_eq!(cluster.cli_cluster(&entry, &["GET", k]).unwrap(), format!("v{i}"));
    }

    // Bring the old master back: it rejoins as a replica of the promoted node.
    let t_restart = Instant::now();
    cluster.restart(&victim.addr).expect("restart");
    cluster.wait_healthy(Duration::from_secs(30)).expect("healthy after restart");
    cluster.wait_replication(Duration::from_secs(30), Some(1)).expect("replication after restart");
    let back = cluster.replicas_of(&promoted.addr).unwrap();
    println!("[{label}] old master {} back as replica in {:?}", victim.addr, t_restart.elapsed());
    assert_eq!(back.len(), 1, "{back:#?}");
    assert_eq!(back[0].addr, victim.addr);
    assert_eq!(back[0].id, victim.id);
    assert_eq!(cluster.cli(&victim.addr, &["ROLE"]).unwrap().lines().next(), Some("slave"));
    check_topology(&cluster);
}

#[test]
fn cluster_without_password() {
    run(RedisClusterOptions::default());
}

#[test]
fn cluster_with_password() {
    let opts = RedisClusterOptions::with_password("s3cret-pw");
    let password = opts.password.clone();
    run(opts.clone());

    // Without the password, nodes refuse commands.
    let cluster = RedisCluster::start(opts).expect("start");
    assert_eq!(cluster.password(), password.as_deref());
    let addr = &cluster.seeds()[0];
    let out = std::process::Command::new("redis-cli")
        .args(["-e", "-h", "127.0.0.1", "-p"])
        .arg(addr.rsplit_once(':').unwrap().1)
        .arg("PING")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("NOAUTH"), "{text}");
    assert_eq!(cluster.cli(addr, &["PING"]).unwrap(), "PONG");
}
