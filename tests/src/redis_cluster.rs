//! A real Redis Cluster on loopback for tests: six `redis-server` processes on 127.0.0.1
//! (3 masters + 3 replicas), created with `redis-cli --cluster create`.
//!
//! Synchronous (std::process), so it can be used from plain `#[test]`s as well as from async
//! tests (start it before the runtime, or inside `spawn_blocking`).
//!
//! Needs `redis-server` and `redis-cli` on `PATH` (`hack/install-deps.sh` installs them).
//!
//! Ports: a random base `P` is picked so that `P..P+6` and the cluster bus ports `P+10000..`
//! are free (and, when possible, below the kernel's ephemeral port range); startup is retried on
//! another base when a node cannot bind or `--cluster create` fails, so several test binaries can
//! start clusters in parallel.
//!
//! Everything (per-node data dirs, `nodes.conf`, logs) lives in one temp dir that is removed on
//! drop; set `AUTHREALM_KEEP_REDIS=1` to keep it. When a test panics while a cluster is alive, the
//! tail of every node's log is printed to stderr.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u32 = 16384;
/// Masters created by [`RedisCluster::start`]; each gets one replica.
pub const MASTERS: usize = 3;
const NODES: usize = MASTERS * 2;
const HOST: &str = "127.0.0.1";
const BUS_OFFSET: u16 = 10000;
const START_ATTEMPTS: usize = 4;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const NODE_UP_TIMEOUT: Duration = Duration::from_secs(10);
const CLI_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);
const LOG_TAIL_LINES: usize = 25;

/// Options for [`RedisCluster::start`].
#[derive(Debug, Clone)]
pub struct RedisClusterOptions {
    /// When set: `--requirepass` and `--masterauth` on every node, `-a` for every `redis-cli`.
    pub password: Option<String>,
    /// `--cluster-node-timeout` in milliseconds (default 2000; Redis' own default is 15000).
    /// Failover of a killed master takes roughly 2 × this plus a second or two.
    pub node_timeout_ms: u64,
}

impl Default for RedisClusterOptions {
    fn default() -> Self {
        Self { password: None, node_timeout_ms: 2000 }
    }
}

impl RedisClusterOptions {
    /// Default options with a password.
    pub fn with_password(password: impl Into<String>) -> Self {
        Self { password: Some(password.into()), ..Self::default() }
    }
}

/// One node as listed by `CLUSTER NODES` (from some node's point of view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// 40-hex-digit node id.
    pub id: String,
    /// `127.0.0.1:PORT` (client port).
    pub addr: String,
    /// Flags other than `myself`: `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, ….
    pub flags: Vec<String>,
    /// The master's node id when this node is a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (inclusive), sorted; empty for replicas.
    pub slots: Vec<RangeInclusive<u16>>,
}

impl NodeInfo {
    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0)
    }

    pub fn is_master(&self) -> bool {
        self.has_flag("master")
    }

    pub fn is_replica(&self) -> bool {
        self.has_flag("slave")
    }

    /// Flagged `fail` (agreed on by a majority of masters), not merely `fail?`.
    pub fn is_failed(&self) -> bool {
        self.has_flag("fail")
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.iter().map(|r| u32::from(*r.end()) - u32::from(*r.start()) + 1).sum()
    }

    pub fn owns_slot(&self, slot: u16) -> bool {
        self.slots.iter().any(|r| r.contains(&slot))
    }
}

/// Parses `CLUSTER NODES` output. Slots being migrated/imported (`[…]` entries) are ignored.
pub fn parse_cluster_nodes(text: &str) -> Result<Vec<NodeInfo>> {
    parse_view(text).map(|v| v.nodes)
}

/// One node's `CLUSTER NODES`, with the index of its own (`myself`) entry.
struct View {
    nodes: Vec<NodeInfo>,
    me: usize,
}

impl View {
    fn me(&self) -> &NodeInfo {
        &self.nodes[self.me]
    }

    fn by_addr(&self, addr: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.addr == addr)
    }
}

fn parse_view(text: &str) -> Result<View> {
    let mut nodes = Vec::new();
    let mut me = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            bail!("malformed CLUSTER NODES line: {line:?}");
        }
        // ip:port@cport[,hostname]
        let addr = fields[1].split(['@', ',']).next().unwrap_or_default().to_string();
        if fields[2].split(',').any(|f| f == "myself") {
            me = Some(nodes.len());
        }
        let flags = fields[2].split(',').filter(|f| *f != "myself").map(str::to_string).collect();
        let master_id = (fields[3] != "-").then(|| fields[3].to_string());
        let mut slots = Vec::new();
        for s in fields[8..].iter().filter(|s| !s.starts_with('[')) {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let a: u16 = a.parse().with_context(|| format!("bad slot {s:?} in {line:?}"))?;
            let b: u16 = b.parse().with_context(|| format!("bad slot {s:?} in {line:?}"))?;
            slots.push(a..=b);
        }
        slots.sort_by_key(|r| *r.start());
        nodes.push(NodeInfo { id: fields[0].to_string(), addr, flags, master_id, slots });
    }
    let me = me.ok_or_else(|| anyhow!("no `myself` entry in CLUSTER NODES: {text:?}"))?;
    Ok(View { nodes, me })
}

/// The hash slot of a key: CRC16-XMODEM of the key, or of the part inside the first `{…}` when
/// that part is non-empty, modulo 16384 (as `CLUSTER KEYSLOT`); CRC16-CCITT (XMODEM): polynomial
/// 0x1021, initial value 0, no reflection. The contract's, checked here against known values.
pub use authrealm_contract::redis_keys::{crc16 as crc16_xmodem, slot_of as key_slot};

struct Node {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    /// Node id, known once the cluster is created (kept across restarts: nodes.conf persists).
    id: String,
    child: Option<Child>,
}

impl Node {
    fn addr(&self) -> String {
        format!("{HOST}:{}", self.port)
    }
}

/// What a node was when [`RedisCluster::kill`] killed it.
#[derive(Debug, Clone)]
struct Killed {
    id: String,
    was_master: bool,
    slots: Vec<RangeInclusive<u16>>,
    replica_addrs: Vec<String>,
}

/// A running Redis Cluster; see the module docs. All processes are SIGKILLed on drop.
pub struct RedisCluster {
    opts: RedisClusterOptions,
    root: PathBuf,
    nodes: Vec<Node>,
    killed: HashMap<String, Killed>,
}

/// Error from one startup attempt; `retry` when a different base port may help.
struct AttemptError {
    retry: bool,
    err: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for AttemptError {
    fn from(e: E) -> Self {
        AttemptError { retry: false, err: e.into() }
    }
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster (3 masters + 3 replicas) and waits until every node
    /// reports `cluster_state:ok` / `cluster_slots_ok:16384`, all nodes agree on slot ownership,
    /// and every master's replica is `state=online`.
    pub fn start(opts: RedisClusterOptions) -> Result<Self> {
        check_binaries()?;
        let root = make_temp_dir()?;
        let mut cluster = RedisCluster { opts, root, nodes: Vec::new(), killed: HashMap::new() };
        let mut errors = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let base = pick_base_port()?;
            match cluster.try_start(base) {
                Ok(()) => return Ok(cluster),
                Err(AttemptError { retry, err }) => {
                    cluster.stop_all();
                    for node in cluster.nodes.drain(..) {
                        let _ = fs::remove_dir_all(&node.dir);
                    }
                    errors.push(format!("attempt {attempt} (ports {base}..{}): {err:#}", base + NODES as u16 - 1));
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(anyhow!("could not start a Redis Cluster:\n{}", errors.join("\n")))
    }

    fn try_start(&mut self, base: u16) -> Result<(), AttemptError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for i in 0..NODES as u16 {
            let port = base + i;
            let dir = self.root.join(port.to_string());
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let log = dir.join("redis.log");
            let mut node = Node { port, dir, log, id: String::new(), child: None };
            node.child = Some(self.spawn(&node)?);
            self.nodes.push(node);
        }
        for i in 0..NODES {
            self.wait_node_up(i).map_err(|err| {
                // A node that exited because its port was taken: try another base.
                let retry = format!("{err:#}").contains("Address already in use");
                AttemptError { retry, err }
            })?;
        }

        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(self.seeds());
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        let out = self.run_cli(&create, Duration::from_secs(60)).map_err(|err| AttemptError { retry: true, err })?;
        let _ = fs::write(self.root.join("cluster-create.log"), &out.stdout);
        if !out.status.success() || out.stdout.contains("[ERR]") {
            return Err(AttemptError {
                retry: true,
                err: anyhow!(
                    "redis-cli --cluster create failed ({}):\n{}\n{}",
                    out.status,
                    tail_lines(&out.stdout, LOG_TAIL_LINES),
                    out.stderr.trim()
                ),
            });
        }

        for i in 0..NODES {
            let addr = self.nodes[i].addr();
            let id = self.cli(&addr, &["CLUSTER", "MYID"])?;
            self.nodes[i].id = id.trim().to_string();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.wait_healthy(left)?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.wait_replication(left, Some(1))?;
        Ok(())
    }

    fn spawn(&self, node: &Node) -> Result<Child> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let log2 = log.try_clone()?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(node.port.to_string())
            .args(["--bind", HOST, "--daemonize", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .arg("--cluster-node-timeout")
            .arg(self.opts.node_timeout_ms.to_string())
            .arg("--dir")
            .arg(&node.dir)
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"]);
        if let Some(pw) = &self.opts.password {
            cmd.arg("--requirepass").arg(pw).arg("--masterauth").arg(pw);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .context("spawning redis-server (run hack/install-deps.sh?)")
    }

    /// Waits until node `i` answers PING; fails early (with its log tail) if it exits.
    fn wait_node_up(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + NODE_UP_TIMEOUT;
        let addr = self.nodes[i].addr();
        loop {
            let node = &mut self.nodes[i];
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                node.child = None;
                bail!(
                    "redis-server {addr} exited during startup ({status}); log {}:\n{}",
                    node.log.display(),
                    log_tail(&node.log)
                );
            }
            let last = match self.cli(&addr, &["PING"]) {
                Ok(reply) if reply.trim() == "PONG" => return Ok(()),
                Ok(reply) => reply,
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "redis-server {addr} not answering PING after {NODE_UP_TIMEOUT:?} \
                     (last: {last}); log:\n{}",
                    log_tail(&self.nodes[i].log)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `127.0.0.1:PORT` of all six nodes (including killed ones).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(Node::addr).collect()
    }

    /// Addresses of the nodes whose process is running.
    pub fn live_addrs(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(Node::addr).collect()
    }

    pub fn password(&self) -> Option<&str> {
        self.opts.password.as_deref()
    }

    pub fn node_timeout_ms(&self) -> u64 {
        self.opts.node_timeout_ms
    }

    /// The temp dir holding every node's dir and `redis.log`.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// Path of a node's log file.
    pub fn log_path(&self, addr: &str) -> Result<PathBuf> {
        Ok(self.nodes[self.index(addr)?].log.clone())
    }

    /// Node id of the node at `addr` (as recorded at creation; stable across restarts).
    pub fn node_id(&self, addr: &str) -> Result<String> {
        Ok(self.nodes[self.index(addr)?].id.clone())
    }

    /// `total_connections_received` summed over the live nodes, and how many nodes were asked
    /// (each query is itself one new connection per node).
    pub fn connections_received(&self) -> Result<(u64, u64)> {
        let (mut total, mut nodes) = (0, 0);
        for addr in self.live_addrs() {
            let text = self.cli(&addr, &["INFO", "stats"])?;
            let n: u64 = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("total_connections_received:"))
                .context("INFO stats without total_connections_received")?
                .trim()
                .parse()?;
            total += n;
            nodes += 1;
        }
        Ok((total, nodes))
    }

    /// Runs `redis-cli -e -h 127.0.0.1 -p PORT [-a PASSWORD --no-auth-warning] ARGS…` and returns
    /// its stdout (trailing newline removed). Error replies and connection failures are errors.
    pub fn cli(&self, addr: &str, args: &[&str]) -> Result<String> {
        self.cli_inner(addr, false, args)
    }

    /// Like [`cli`](Self::cli) with `-c`: follows `MOVED`/`ASK` redirections.
    pub fn cli_cluster(&self, addr: &str, args: &[&str]) -> Result<String> {
        self.cli_inner(addr, true, args)
    }

    fn cli_inner(&self, addr: &str, cluster: bool, args: &[&str]) -> Result<String> {
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow!("address {addr:?} is not HOST:PORT"))?;
        let mut full = vec!["-e", "-h", host, "-p", port];
        if cluster {
            full.push("-c");
        }
        full.extend_from_slice(args);
        self.run_cli(&full, CLI_TIMEOUT)?.stdout_of_success(port, args)
    }

    /// Runs redis-cli with the password options (if any) prepended, killing it after `timeout`.
    fn run_cli(&self, args: &[&str], timeout: Duration) -> Result<CliOutput> {
        let mut cmd = Command::new("redis-cli");
        if let Some(pw) = &self.opts.password {
            cmd.arg("-a").arg(pw).arg("--no-auth-warning");
        }
        cmd.args(args);
        run_with_timeout(cmd, timeout).with_context(|| format!("redis-cli {}", args.join(" ")))
    }

    fn index(&self, addr: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.addr() == addr)
            .ok_or_else(|| anyhow!("{addr} is not a node of this cluster ({:?})", self.seeds()))
    }

    fn is_live(&self, addr: &str) -> bool {
        self.nodes.iter().any(|n| n.addr() == addr && n.child.is_some())
    }

    fn view(&self, addr: &str) -> Result<View> {
        parse_view(&self.cli(addr, &["CLUSTER", "NODES"])?)
    }

    /// `CLUSTER NODES` as seen from the first live node that answers.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let mut errors = Vec::new();
        for addr in self.live_addrs() {
            match self.view(&addr) {
                Ok(view) => return Ok(view.nodes),
                Err(e) => errors.push(format!("{addr}: {e:#}")),
            }
        }
        bail!("no live node answered CLUSTER NODES: {errors:?}")
    }

    /// Current masters: nodes flagged `master`, not `fail`, serving at least one slot; sorted by
    /// their first slot. (Replicas can briefly show up as slot-less masters right after creation.)
    pub fn masters(&self) -> Result<Vec<NodeInfo>> {
        let mut masters: Vec<NodeInfo> =
            self.nodes()?.into_iter().filter(|n| n.is_master() && !n.is_failed() && !n.slots.is_empty()).collect();
        masters.sort_by_key(|n| n.slots.first().map(|r| *r.start()));
        Ok(masters)
    }

    /// The master currently serving `slot`.
    pub fn master_for_slot(&self, slot: u16) -> Result<NodeInfo> {
        if u32::from(slot) >= SLOTS {
            bail!("slot {slot} out of range");
        }
        self.masters()?
            .into_iter()
            .find(|m| m.owns_slot(slot))
            .ok_or_else(|| anyhow!("no live master serves slot {slot}"))
    }

    /// The master currently serving `key`.
    pub fn master_for_key(&self, key: &[u8]) -> Result<NodeInfo> {
        self.master_for_slot(key_slot(key))
    }

    /// Replicas of the master at `master_addr`: the replicas listed in that master's own
    /// `INFO replication`, each described by its own `CLUSTER NODES` entry (authoritative; other
    /// nodes' views can lag right after creation or a failover).
    pub fn replicas_of(&self, master_addr: &str) -> Result<Vec<NodeInfo>> {
        let info = parse_info(&self.cli(master_addr, &["INFO", "replication"])?);
        if info.get("role").map(String::as_str) != Some("master") {
            bail!("{master_addr} is not a master: {info:?}");
        }
        replica_lines(&info).iter().map(|r| Ok(self.view(&format!("{HOST}:{}", r.port))?.me().clone())).collect()
    }

    /// SIGKILLs the node at `addr` (and reaps it). Its role, slots and replicas are recorded first
    /// so that [`wait_failover`](Self::wait_failover) knows what to wait for.
    pub fn kill(&mut self, addr: &str) -> Result<()> {
        let i = self.index(addr)?;
        if self.nodes[i].child.is_none() {
            bail!("{addr} is not running");
        }
        let me = self.view(addr).ok().map(|v| v.me().clone());
        let replica_addrs = self.replicas_of(addr).map(|v| v.into_iter().map(|n| n.addr).collect()).unwrap_or_default();
        let killed = match me {
            Some(me) => Killed { id: me.id.clone(), was_master: me.is_master(), slots: me.slots, replica_addrs },
            None => Killed { id: self.nodes[i].id.clone(), was_master: false, slots: Vec::new(), replica_addrs },
        };
        let mut child = self.nodes[i].child.take().expect("checked above");
        let killed_result = child.kill();
        child.wait().with_context(|| format!("reaping {addr}"))?;
        killed_result.with_context(|| format!("killing {addr}"))?;
        self.killed.insert(addr.to_string(), killed);
        Ok(())
    }

    /// Freezes the node at `addr` with SIGSTOP: its sockets stay open but it answers nothing (a
    /// hung or partitioned node, unlike [`kill`](Self::kill)). Undo with [`resume`](Self::resume);
    /// a node still stopped when the cluster is dropped is killed as usual.
    pub fn pause(&self, addr: &str) -> Result<()> {
        self.signal(addr, "-STOP")
    }

    /// Continues a node frozen by [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self, addr: &str) -> Result<()> {
        self.signal(addr, "-CONT")
    }

    fn signal(&self, addr: &str, sig: &str) -> Result<()> {
        let i = self.index(addr)?;
        let pid = self.nodes[i].child.as_ref().with_context(|| format!("{addr} is not running"))?.id();
        let status = Command::new("kill").arg(sig).arg(pid.to_string()).status().context("running kill")?;
        ensure!(status.success(), "kill {sig} {pid} ({addr}) failed: {status}");
        Ok(())
    }

    /// Starts a node again (same port, dir and `nodes.conf`, so same node id). A restarted old
    /// master rejoins as a replica of the node that took over its slots; follow with
    /// [`wait_healthy`](Self::wait_healthy) / [`wait_replication`](Self::wait_replication).
    pub fn restart(&mut self, addr: &str) -> Result<()> {
        let i = self.index(addr)?;
        if self.nodes[i].child.is_some() {
            bail!("{addr} is still running");
        }
        let child = self.spawn(&self.nodes[i])?;
        self.nodes[i].child = Some(child);
        self.wait_node_up(i)?;
        self.killed.remove(addr);
        Ok(())
    }

    /// Waits until every live node reports `cluster_state:ok` and `cluster_slots_ok:16384`, all
    /// live nodes agree on which node serves each slot (and those nodes are running), and every
    /// live node sees every other live node as it sees itself (role, master; not `fail`/`fail?`).
    /// Right after [`kill`](Self::kill)ing a master this therefore also waits for the failover.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problems = self.health_problems();
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "cluster not healthy after {timeout:?}:\n  {}\n{}",
                    problems.join("\n  "),
                    self.log_tails(&self.live_addrs())
                );
            }
            thread::sleep(POLL);
        }
    }

    fn health_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut views: Vec<(String, View)> = Vec::new();
        for addr in self.live_addrs() {
            match self.cli(&addr, &["CLUSTER", "INFO"]) {
                Ok(text) => {
                    let info = parse_info(&text);
                    let state = info.get("cluster_state").map(String::as_str);
                    let slots_ok = info.get("cluster_slots_ok").map(String::as_str);
                    if state != Some("ok") || slots_ok != Some("16384") {
                        problems.push(format!(
                            "{addr}: cluster_state:{} cluster_slots_ok:{}",
                            state.unwrap_or("?"),
                            slots_ok.unwrap_or("?")
                        ));
                    }
                }
                Err(e) => problems.push(format!("{addr}: {e:#}")),
            }
            match self.view(&addr) {
                Ok(view) => views.push((addr, view)),
                Err(e) => problems.push(format!("{addr}: {e:#}")),
            }
        }
        // Every view agrees on who serves which slot, and those nodes are running...
        if let Some((first_addr, first)) = views.first() {
            let first_map = slot_map(&first.nodes);
            for (range, id) in &first_map {
                let addr = first.nodes.iter().find(|n| &n.id == id).map(|n| n.addr.as_str());
                if !addr.is_some_and(|a| self.is_live(a)) {
                    problems.push(format!("{first_addr}: slots {range:?} served by {id} ({addr:?}), not running"));
                }
            }
            for (addr, view) in &views[1..] {
                let map = slot_map(&view.nodes);
                if map != first_map {
                    problems.push(format!("{addr} and {first_addr} disagree on slot owners: {map:?} vs {first_map:?}"));
                }
            }
        }
        // ...and sees every live node as that node sees itself (role, master), not failed.
        for (addr, view) in &views {
            for (other_addr, other) in &views {
                let me = other.me();
                match view.by_addr(other_addr) {
                    None => problems.push(format!("{addr} does not know {other_addr}")),
                    Some(n) if n.is_failed() || n.has_flag("fail?") => {
                        problems.push(format!("{addr} flags {other_addr} {:?}", n.flags));
                    }
                    Some(n) if n.is_master() != me.is_master() || n.master_id != me.master_id => {
                        problems.push(format!(
                            "{addr} sees {other_addr} as {:?} (master {:?}), it says {:?} (master {:?})",
                            n.flags, n.master_id, me.flags, me.master_id
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        problems
    }

    /// Waits until replication is settled on every live node: each replica has
    /// `master_link_status:up` and no sync in progress, and its master lists it `state=online`.
    /// With `Some(n)`: also exactly [`MASTERS`] masters with exactly `n` connected replicas each.
    pub fn wait_replication(&self, timeout: Duration, replicas_per_master: Option<usize>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problems = self.replication_problems(replicas_per_master);
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "replication not settled after {timeout:?}:\n  {}\n{}",
                    problems.join("\n  "),
                    self.log_tails(&self.live_addrs())
                );
            }
            thread::sleep(POLL);
        }
    }

    fn replication_problems(&self, replicas_per_master: Option<usize>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut infos = HashMap::new();
        for addr in self.live_addrs() {
            match self.cli(&addr, &["INFO", "replication"]) {
                Ok(text) => {
                    infos.insert(addr, parse_info(&text));
                }
                Err(e) => problems.push(format!("{addr}: {e:#}")),
            }
        }
        let mut masters = 0;
        for (addr, info) in &infos {
            match info.get("role").map(String::as_str) {
                Some("master") => {
                    masters += 1;
                    let connected: usize = info.get("connected_slaves").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let replicas = replica_lines(info);
                    if let Some(want) = replicas_per_master
                        && connected != want
                    {
                        problems.push(format!("{addr}: connected_slaves:{connected}, want {want}"));
                    }
                    for r in replicas.iter().filter(|r| r.state != "online") {
                        problems.push(format!("{addr}: replica port {} state={}", r.port, r.state));
                    }
                }
                Some("slave") => {
                    let link = info.get("master_link_status").map(String::as_str);
                    let syncing = info.get("master_sync_in_progress").map(String::as_str);
                    if link != Some("up") || syncing != Some("0") {
                        problems.push(format!(
                            "{addr}: master_link_status:{} master_sync_in_progress:{}",
                            link.unwrap_or("?"),
                            syncing.unwrap_or("?")
                        ));
                        continue;
                    }
                    let master = format!(
                        "{}:{}",
                        info.get("master_host").map(String::as_str).unwrap_or("?"),
                        info.get("master_port").map(String::as_str).unwrap_or("?")
                    );
                    let my_port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
                    let online = infos.get(&master).is_some_and(|m| {
                        replica_lines(m).iter().any(|r| r.port.to_string() == my_port && r.state == "online")
                    });
                    if !online {
                        problems.push(format!("{addr}: not yet online at its master {master}"));
                    }
                }
                other => problems.push(format!("{addr}: role {other:?}")),
            }
        }
        if replicas_per_master.is_some() && masters != MASTERS && problems.is_empty() {
            problems.push(format!("{masters} masters, want {MASTERS}"));
        }
        problems
    }

    /// Waits until the slots of the master killed at `killed_addr` (via [`kill`](Self::kill)) are
    /// served by another node: every live node agrees on the new owner, the owner's own
    /// `INFO replication` says `role:master`, and the cluster is healthy. Returns the new master.
    pub fn wait_failover(&self, killed_addr: &str, timeout: Duration) -> Result<NodeInfo> {
        let killed = self
            .killed
            .get(killed_addr)
            .ok_or_else(|| anyhow!("{killed_addr} was not killed with RedisCluster::kill"))?;
        if !killed.was_master || killed.slots.is_empty() {
            bail!("{killed_addr} was not a master serving slots when killed: {killed:?}");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (result, status) = self.failover_status(killed);
            if let Some(new_master) = result {
                return Ok(new_master);
            }
            if Instant::now() >= deadline {
                let mut logs = killed.replica_addrs.clone();
                logs.push(killed_addr.to_string());
                bail!(
                    "slots {:?} of {killed_addr} ({}) not failed over after {timeout:?} \
                     (node timeout {} ms): {status}\n{}",
                    killed.slots,
                    killed.id,
                    self.opts.node_timeout_ms,
                    self.log_tails(&logs)
                );
            }
            thread::sleep(POLL);
        }
    }

    fn failover_status(&self, killed: &Killed) -> (Option<NodeInfo>, String) {
        let mut owner: Option<NodeInfo> = None;
        for addr in self.live_addrs() {
            let view = match self.view(&addr) {
                Ok(v) => v.nodes,
                Err(e) => return (None, format!("{addr}: {e:#}")),
            };
            for range in &killed.slots {
                for slot in [*range.start(), *range.end()] {
                    let Some(o) = view.iter().find(|n| n.is_master() && !n.is_failed() && n.owns_slot(slot)) else {
                        return (None, format!("{addr} sees no live master for slot {slot}"));
                    };
                    if o.id == killed.id {
                        return (None, format!("{addr} still sees the killed node own slot {slot}"));
                    }
                    match &owner {
                        None => owner = Some(o.clone()),
                        Some(prev) if prev.id != o.id => {
                            return (None, format!("owners disagree: {} vs {}", prev.addr, o.addr));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        let Some(owner) = owner else {
            return (None, "no live nodes".to_string());
        };
        match self.cli(&owner.addr, &["INFO", "replication"]) {
            Ok(t) if parse_info(&t).get("role").map(String::as_str) == Some("master") => {}
            Ok(_) => return (None, format!("{} does not say role:master yet", owner.addr)),
            Err(e) => return (None, format!("{}: {e:#}", owner.addr)),
        }
        let problems = self.health_problems();
        if !problems.is_empty() {
            return (None, problems.join("; "));
        }
        (Some(owner), String::new())
    }

    fn log_tails(&self, addrs: &[String]) -> String {
        let mut out = String::new();
        for addr in addrs {
            if let Ok(i) = self.index(addr) {
                let node = &self.nodes[i];
                let state = if self.is_live(addr) { "" } else { ", not running" };
                out.push_str(&format!(
                    "--- {addr} ({}{state}) log {}:\n{}\n",
                    node.id,
                    node.log.display(),
                    log_tail(&node.log)
                ));
            }
        }
        out
    }

    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if thread::panicking() && !self.nodes.is_empty() {
            eprintln!("RedisCluster dropped during a panic; node logs:\n{}", self.log_tails(&self.seeds()));
        }
        self.stop_all();
        if std::env::var_os("AUTHREALM_KEEP_REDIS").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("RedisCluster: keeping {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

pub(crate) struct CliOutput {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl CliOutput {
    /// Stdout without its trailing newline, or an error naming the command (`redis-cli -e`
    /// exits non-zero on an error reply or a connection failure).
    pub(crate) fn stdout_of_success(self, port: &str, args: &[&str]) -> Result<String> {
        if !self.status.success() {
            bail!(
                "redis-cli -p {port} {} failed ({}): {} {}",
                args.join(" "),
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        let mut s = self.stdout;
        if s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }
}

pub(crate) fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<CliOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning (run hack/install-deps.sh?)")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?}");
        }
        thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(CliOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// `key:value` lines of INFO / CLUSTER INFO output (`\r\n` separated, `#` comments).
pub(crate) fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) struct ReplicaLine {
    pub(crate) port: u16,
    pub(crate) state: String,
}

/// `slaveN:ip=…,port=…,state=…,offset=…,lag=…` entries of a master's INFO replication.
pub(crate) fn replica_lines(info: &HashMap<String, String>) -> Vec<ReplicaLine> {
    let mut lines: Vec<(&String, &String)> = info
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("slave").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    lines.sort();
    lines
        .into_iter()
        .map(|(_, v)| {
            let fields: HashMap<&str, &str> = v.split(',').filter_map(|f| f.split_once('=')).collect();
            ReplicaLine {
                port: fields.get("port").and_then(|p| p.parse().ok()).unwrap_or(0),
                state: fields.get("state").unwrap_or(&"?").to_string(),
            }
        })
        .collect()
}

/// Slot ranges → owner id, sorted, for comparing views.
type SlotMap = Vec<(RangeInclusive<u16>, String)>;

fn slot_map(view: &[NodeInfo]) -> SlotMap {
    let mut map: SlotMap = view
        .iter()
        .filter(|n| n.is_master() && !n.is_failed())
        .flat_map(|n| n.slots.iter().map(|r| (r.clone(), n.id.clone())))
        .collect();
    map.sort_by_key(|(r, _)| *r.start());
    map
}

pub(crate) fn check_binaries() -> Result<()> {
    for bin in ["redis-server", "redis-cli"] {
        let ok = Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("`{bin}` not found on PATH; run hack/install-deps.sh (installs redis-server, redis-tools)");
        }
    }
    Ok(())
}

pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

pub(crate) fn make_temp_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    for _ in 0..100 {
        let dir = tmp.join(format!(
            "authrealm-redis-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_u64() as u32
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a temp dir under {}", tmp.display())
}

/// A base port `P` such that `P..P+6` and `P+10000..P+10006` are currently free. Prefers bases
/// whose bus ports stay below the kernel's ephemeral range (where outgoing connections could
/// take them); falls back to 20000..30000.
fn pick_base_port() -> Result<u16> {
    let ephemeral_low: u32 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_low >= 22000 {
        (10000u32, ephemeral_low - u32::from(BUS_OFFSET) - NODES as u32)
    } else {
        (20000, 30000)
    };
    for _ in 0..200 {
        let base = (lo + (random_u64() % u64::from(hi - lo)) as u32) as u16;
        let free = (0..NODES as u16)
            .flat_map(|i| [base + i, base + i + BUS_OFFSET])
            .all(|p| TcpListener::bind((HOST, p)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free port range found in {lo}..{hi}")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of a log file (reads at most the last 16 KiB).
pub(crate) fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => tail_lines(&text, LOG_TAIL_LINES),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_check_value() {
        // The CRC-16/XMODEM check value.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn key_slot_known_values() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b""), 0);
        assert_eq!(key_slot(b"123456789"), 12739); // 0x31C3 < 16384
    }

    #[test]
    fn key_slot_hash_tags() {
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Only the first {...} counts.
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        // Empty tag: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
        // Tag runs from the first '{' to the first '}' after it.
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        // No closing brace: the whole key.
        assert_eq!(key_slot(b"foo{bar"), crc16_xmodem(b"foo{bar") % 16384);
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 0 5 disconnected 7000 7002-7003
";
        let nodes = parse_cluster_nodes(text).unwrap();
        assert_eq!(nodes.len(), 5);
        assert_eq!(nodes[0].addr, "127.0.0.1:30004");
        assert_eq!(nodes[0].port(), 30004);
        assert!(nodes[0].is_replica());
        assert_eq!(nodes[0].master_id.as_deref(), Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca"));
        assert_eq!(nodes[3].flags, vec!["master"]);
        assert_eq!(nodes[3].slots, vec![0..=5460]);
        assert_eq!(nodes[3].slot_count(), 5461);
        assert!(nodes[4].is_failed());
        assert_eq!(nodes[4].slots, vec![7000..=7000, 7002..=7003]);
        assert!(nodes[4].owns_slot(7003) && !nodes[4].owns_slot(7001));
        let total: u32 = nodes.iter().take(4).map(NodeInfo::slot_count).sum();
        assert_eq!(total, SLOTS);
    }

    #[test]
    fn parses_info() {
        let info = parse_info(
            "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n\
             slave0:ip=127.0.0.1,port=20004,state=online,offset=1,lag=0\r\n",
        );
        assert_eq!(info["role"], "master");
        let r = replica_lines(&info);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].port, 20004);
        assert_eq!(r[0].state, "online");
    }
}
