//! The local session cache: "this session record exists" remembered for a short, bounded time
//! and dropped the moment Redis reports that the record changed.
//!
//! # How it stays correct
//!
//! **Invalidation channel.** For every master of the cluster the sidecar keeps one dedicated
//! RESP3 connection with `CLIENT TRACKING ON BCAST PREFIX P{R: PREFIX P{R;hb:<instance>:`. Redis
//! then pushes the name of every key under the realm's prefix that is modified on that master
//! (written, deleted, expired, evicted; a `FLUSHALL` pushes a null), whoever modified it. The
//! per-request reads stay on the ordinary cluster connection; the tracking connection never has
//! to read the keys it is told about. Only "active" is cached (never "revoked").
//!
//! **The read/invalidate race.** A read's reply ("exists") and a concurrent revocation's
//! invalidation travel on different connections, so the invalidation can be processed before the
//! reply. Before a read is sent, a *pending* entry with a fresh ticket is put in the map; an
//! invalidation removes whatever entry the key has; the reply turns the pending entry into an
//! active one only if the same ticket is still there ([`SessionCache::complete`]). So a reply
//! overtaken by an invalidation is never cached, and a read sent after the invalidation was
//! processed executes after the write on the master.
//!
//! **Bounded staleness when invalidations stop.** Each sidecar writes, every `maxStaleness / 4`,
//! a short-lived key of its own (`P{R;hb:<instance>:<tag>}:<seq>`, the tag chosen so the key's
//! slot is on that master) through the tracking connection, and waits for that key's
//! invalidation on it. Redis sends BCAST invalidations in batches at the end of each event-loop
//! iteration, prefix by prefix in byte order (`P{R:` sorts before `P{R;`), and one connection's
//! messages arrive in order: receiving the invalidation of the heartbeat sent at `h` proves that
//! every write that master executed before the heartbeat has been delivered. An entry for a key
//! on master `M` is used only while
//!
//! * `now − h(M) ≤ maxStaleness`, `h(M)` the send time of `M`'s latest confirmed heartbeat on the
//!   current connection ([`usable`]), and
//! * the entry's age (counted from *before* its read was sent) is at most `maxStaleness`.
//!
//! A revocation written on `M` at `w` whose invalidation never arrives was executed after every
//! confirmed heartbeat, so `h(M) < w` and the entry stops being used before `w + maxStaleness`.
//! The age limit gives the same bound on its own (the read was sent before `w`), and also covers
//! what heartbeats cannot see: a key whose slot moved to another master that the local slot map
//! does not know yet. The heartbeat is what makes a broken channel visible quickly: entries of a
//! master whose heartbeats stop are not used, so requests go to Redis as with the cache off.
//!
//! **Renewal.** An entry past half its life that is used gets its key read again in the background
//! ([`Lookup::Refresh`], sent within an eighth of the bound in a pipeline with other reads, see
//! [`crate::coalesce`]), with the same protocol as a miss: a ticket and a marker time set before
//! the read is sent, an invalidation or flush meanwhile removes the entry, and only a reply that
//! finds the same ticket renews it — its age then counts from that marker. "Gone" drops the entry.
//! So a session in use stays cached without its requests ever waiting for Redis, and every entry's
//! age is still counted from before the latest read that confirmed it.
//!
//! **Flushes.** Everything is dropped when a tracking connection is (re)established (writes made
//! while no connection was tracking were never reported), when one is lost, when the slot map
//! changes (polled with `CLUSTER SLOTS` every second and at once after a data-path error or a
//! `MOVED` heartbeat), and on a `FLUSHALL`. Entries are bounded in number and key bytes.
//!
//! Revocations made through this sidecar also drop its own entries directly, so a revocation is
//! refused by the pod that made it on the very next request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::{PushInfo, PushKind, Value};

use authrealm_contract::config::{RedisConfig, SessionCacheConfig};

use crate::session::{KeyLayout, key_slot};

use crate::topology::{NO_NODE, SLOTS, SlotLayout, TopologyWatch};

/// The staleness rule, pure. Times in microseconds on one monotonic clock; 0 means "never".
/// `created_us`: when the entry's pending marker was put in the map (before its read was sent);
/// `heartbeat_us`: send time of the latest heartbeat confirmed on the master's current tracking
/// connection.
pub fn usable(now_us: u64, created_us: u64, heartbeat_us: u64, bound_us: u64) -> bool {
    heartbeat_us != 0
        && created_us != 0
        && now_us.saturating_sub(heartbeat_us) <= bound_us
        && now_us.saturating_sub(created_us) <= bound_us
}

/// Heartbeat period for a staleness bound: four heartbeats per bound, so one lost or slow
/// heartbeat does not make the cache unusable.
pub fn heartbeat_interval(bound: Duration) -> Duration {
    (bound / 4).max(Duration::from_millis(20))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `connect`, `disconnect`, `topology`, `flushall`.
    pub reason: &'static str,
}

/// Metrics of the session cache (registered by [`crate::metrics::Metrics`]).
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    /// Background re-reads of entries past half their life ([`Lookup::Refresh`]).
    pub refreshes: Counter,
    pub invalidations: Counter,
    pub flushes: Family<ReasonLabel, Counter>,
    pub entries: Gauge,
    /// Age of the oldest "latest confirmed heartbeat" over the masters (ms); -1 when a master has
    /// none.
    pub heartbeat_age_ms: Gauge,
    /// Masters whose tracking connection is up with a recent confirmed heartbeat.
    pub nodes_fresh: Gauge,
}

/// What [`SessionCache::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The session is active; no Redis read needed.
    Hit,
    /// The session is active, and its entry is past half its life: read the key again in the
    /// background and report the reply with [`SessionCache::refreshed`] and this ticket, so the
    /// entry stays usable without a request waiting for Redis.
    Refresh(u64),
    /// Read Redis, then report the reply with [`SessionCache::complete`] and this ticket (None:
    /// the cache is full, the reply will not be cached).
    Miss(Option<u64>),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    ticket: u64,
    created_us: u64,
    active: bool,
    /// Ticket of the background re-read in flight (0: none), and when its marker was set.
    refresh: u64,
    refresh_us: u64,
}

/// One master and its invalidation channel.
pub struct NodeState {
    pub addr: String,
    /// Hash tag (`R;hb:<instance>:<n>`) whose slot this master serves.
    hb_tag: String,
    heartbeat_us: AtomicU64,
    /// Heartbeats sent on the current connection and not confirmed yet: (seq, sent_us).
    outstanding: Mutex<VecDeque<(u64, u64)>>,
    /// Connection generation; pushes of older connections never confirm heartbeats.
    generation: AtomicU64,
    /// Set by the push callback when generation `generation` lost its connection.
    dead_gen: AtomicU64,
    retired: AtomicBool,
}

/// The slot map the cache attributes keys with.
pub struct Topology {
    nodes: Vec<Arc<NodeState>>,
    slots: Box<[u16]>,
}

impl Topology {
    fn empty() -> Self {
        Topology { nodes: vec![], slots: vec![NO_NODE; SLOTS].into_boxed_slice() }
    }

    fn node_for(&self, slot: u16) -> Option<&Arc<NodeState>> {
        self.nodes.get(*self.slots.get(slot as usize)? as usize)
    }

    fn same_layout(&self, layout: &SlotLayout) -> bool {
        self.nodes.len() == layout.masters.len()
            && self.nodes.iter().zip(&layout.masters).all(|(a, b)| a.addr == *b)
            && *self.slots == *layout.slots
    }
}

/// Entries are split over this many independently locked shards by key slot (all keys of a
/// subject share a slot, so a subject's entries share a shard): requests on different threads
/// rarely meet on a lock.
const SHARDS: usize = 64;

#[derive(Default)]
struct Shard {
    entries: BTreeMap<Box<str>, Entry>,
    bytes: usize,
}

struct Shared {
    base: Instant,
    bound_us: u64,
    max_entries: usize,
    max_bytes: usize,
    shards: Box<[Mutex<Shard>]>,
    /// Entries and key bytes over all shards (a shard's share changes under its lock).
    len: AtomicUsize,
    bytes: AtomicUsize,
    next_ticket: AtomicU64,
    last_sweep_us: AtomicU64,
    topo: ArcSwap<Topology>,
    metrics: CacheMetrics,
    /// Told about a heartbeat answered `MOVED` (set by [`SessionCache::start`]).
    topology: std::sync::OnceLock<TopologyWatch>,
    seq: AtomicU64,
    /// `P{R:` — every session key of the realm.
    realm_prefix: String,
    /// `P{R;hb:<instance>:` — this process's heartbeat keys (sorts after `realm_prefix`).
    hb_prefix: String,
    /// `R;hb:<instance>:` — heartbeat hash tags are this plus a number.
    hb_tag_prefix: String,
    key_prefix: String,
}

/// The cache; cheap to clone.
#[derive(Clone)]
pub struct SessionCache {
    shared: Arc<Shared>,
}

impl SessionCache {
    /// A cache with no masters known yet (nothing is usable until heartbeats confirm).
    pub fn new(cfg: &SessionCacheConfig, layout: &KeyLayout, metrics: CacheMetrics) -> Self {
        Self::with_instance(cfg, layout, metrics, &format!("{:016x}", random_u64()), Instant::now())
    }

    /// `instance` names this process's heartbeat keys (random in [`SessionCache::new`]).
    /// `base`: the start of the cache's clock.
    fn with_instance(
        cfg: &SessionCacheConfig,
        layout: &KeyLayout,
        metrics: CacheMetrics,
        instance: &str,
        base: Instant,
    ) -> Self {
        let max_entries = cfg.max_entries.max(1) as usize;
        SessionCache {
            shared: Arc::new(Shared {
                base,
                bound_us: cfg.max_staleness_ms.saturating_mul(1000),
                max_entries,
                // Keys are ~60-120 bytes; a realm with unusually long subjects caches fewer.
                max_bytes: max_entries.saturating_mul(128),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                len: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                next_ticket: AtomicU64::new(1),
                last_sweep_us: AtomicU64::new(0),
                topo: ArcSwap::from_pointee(Topology::empty()),
                metrics,
                topology: std::sync::OnceLock::new(),
                seq: AtomicU64::new(1),
                realm_prefix: layout.realm_prefix(),
                hb_prefix: layout.heartbeat_prefix(instance),
                hb_tag_prefix: layout.heartbeat_tag_prefix(instance),
                key_prefix: layout.key_prefix().to_string(),
            }),
        }
    }

    pub fn bound(&self) -> Duration {
        Duration::from_micros(self.shared.bound_us)
    }

    fn now_us(&self) -> u64 {
        self.shared.now_us()
    }

    /// The per-request lookup for a session key (`P{R:S}:t:J`).
    pub fn lookup(&self, key: &str) -> Lookup {
        self.lookup_slot(key, key_slot(key))
    }

    /// [`Self::lookup`] of a key whose slot is known (`slot` must be `key_slot(key)`).
    pub fn lookup_slot(&self, key: &str, slot: u16) -> Lookup {
        let sh = &*self.shared;
        let now = self.now_us();
        let mut shard = sh.shard(slot);
        if let Some(e) = shard.entries.get_mut(key) {
            if e.active {
                let hb = sh.topo.load().node_for(slot).map_or(0, |n| n.heartbeat_us.load(Ordering::Acquire));
                if usable(now, e.created_us, hb, sh.bound_us) {
                    // Past half its life: re-read now, in the background, while the entry is
                    // still used — at most once per quarter of the bound (one in flight; a lost
                    // or failed one is tried again after that).
                    let found = if now.saturating_sub(e.created_us) > sh.bound_us / 2
                        && now.saturating_sub(e.refresh_us) > sh.bound_us / 4
                    {
                        e.refresh = sh.ticket();
                        e.refresh_us = now;
                        Lookup::Refresh(e.refresh)
                    } else {
                        Lookup::Hit
                    };
                    drop(shard);
                    sh.metrics.hits.inc();
                    if found != Lookup::Hit {
                        sh.metrics.refreshes.inc();
                    }
                    return found;
                }
            } else if now.saturating_sub(e.created_us) <= sh.bound_us {
                // A read is in flight: any reply to a read sent from now on may complete it.
                let ticket = e.ticket;
                drop(shard);
                sh.metrics.misses.inc();
                return Lookup::Miss(Some(ticket));
            }
        }
        sh.metrics.misses.inc();
        let ticket = sh.ticket();
        let entry = Entry { ticket, created_us: now, active: false, refresh: 0, refresh_us: 0 };
        if let Some(e) = shard.entries.get_mut(key) {
            *e = entry;
            return Lookup::Miss(Some(ticket));
        }
        if !sh.reserve(key.len()) {
            // Full: drop what is too old to be used (at most a few times per bound; every shard
            // is locked in turn, never two at once).
            drop(shard);
            let last = sh.last_sweep_us.load(Ordering::Relaxed);
            if now.saturating_sub(last) > sh.bound_us / 4
                && sh.last_sweep_us.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                sh.sweep(now);
            }
            if !sh.reserve(key.len()) {
                return Lookup::Miss(None);
            }
            shard = sh.shard(slot);
            if shard.entries.contains_key(key) {
                // Another request put a marker meanwhile: leave it, read without one.
                sh.unreserve(key.len());
                return Lookup::Miss(None);
            }
        }
        shard.bytes += key.len();
        shard.entries.insert(key.into(), entry);
        drop(shard);
        sh.metrics.entries.set(sh.len.load(Ordering::Relaxed) as i64);
        Lookup::Miss(Some(ticket))
    }

    /// The reply to the read of a [`Lookup::Miss`]: `Some(exists)`, or None when it failed.
    /// Only a pending entry still holding `ticket` (no invalidation, flush or newer read since the
    /// marker was set) becomes active.
    pub fn complete(&self, key: &str, ticket: Option<u64>, exists: Option<bool>) {
        let Some(ticket) = ticket else { return };
        let sh = &*self.shared;
        let mut shard = sh.shard(key_slot(key));
        let Some(e) = shard.entries.get_mut(key) else { return };
        if e.ticket != ticket || e.active {
            return;
        }
        if exists == Some(true) {
            e.active = true;
        } else {
            sh.remove(&mut shard, key);
        }
    }

    /// The reply to the background re-read of a [`Lookup::Refresh`]: `Some(exists)`, or None when
    /// it failed. Only an active entry still holding `ticket` (no invalidation, flush or newer
    /// read since the marker was set) is renewed: its age counts again from the marker, set
    /// before the read was sent, exactly as for the read that created it. "Gone" drops the entry.
    pub fn refreshed(&self, key: &str, ticket: u64, exists: Option<bool>) {
        let sh = &*self.shared;
        let mut shard = sh.shard(key_slot(key));
        let Some(e) = shard.entries.get_mut(key) else { return };
        if !e.active || e.refresh != ticket {
            return;
        }
        // A failed one is tried again a quarter of the bound after `refresh_us`.
        e.refresh = 0;
        match exists {
            Some(true) => e.created_us = e.created_us.max(e.refresh_us),
            Some(false) => {
                sh.remove(&mut shard, key);
            }
            None => {}
        }
    }

    /// Drop one key (a revocation made through this sidecar).
    pub fn forget(&self, key: &str) {
        let mut shard = self.shared.shard(key_slot(key));
        self.shared.remove(&mut shard, key);
    }

    /// Drop every key starting with `prefix` (all of a subject's tokens: `P{R:S}:t:`, whose hash
    /// tag is complete, so they all share its slot).
    pub fn forget_prefix(&self, prefix: &str) {
        let mut shard = self.shared.shard(key_slot(prefix));
        let keys: Vec<Box<str>> = shard
            .entries
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.shared.remove(&mut shard, &k);
        }
    }

    /// Entries in the map (pending and active).
    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start the background work: one tracking connection per master of the slot map `topology`
    /// publishes (re-made, and the cache flushed, whenever it changes), sweeping, gauges.
    pub fn start(&self, redis_cfg: RedisConfig, topology: TopologyWatch) {
        let shared = self.shared.clone();
        let rx = topology.subscribe();
        let _ = shared.topology.set(topology);
        tokio::spawn(async move { maintain(shared, redis_cfg, rx).await });
    }
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64 + 1
    }

    /// The shard of keys of `slot`, locked.
    fn shard(&self, slot: u16) -> MutexGuard<'_, Shard> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.shards[slot as usize % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Room for one more entry of `key_len` bytes of key, or false (full).
    fn reserve(&self, key_len: usize) -> bool {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.max_entries {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self.bytes.fetch_add(key_len, Ordering::Relaxed) + key_len > self.max_bytes {
            self.unreserve(key_len);
            return false;
        }
        true
    }

    fn unreserve(&self, key_len: usize) {
        self.bytes.fetch_sub(key_len, Ordering::Relaxed);
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    fn remove(&self, shard: &mut Shard, key: &str) -> bool {
        if shard.entries.remove(key).is_some() {
            shard.bytes -= key.len();
            self.unreserve(key.len());
            self.metrics.entries.set(self.len.load(Ordering::Relaxed) as i64);
            true
        } else {
            false
        }
    }

    /// Drop, in every shard, what is too old to be used.
    fn sweep(&self, now: u64) {
        let bound = self.bound_us;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let (mut freed, mut n) = (0, 0);
            shard.entries.retain(|k, e| {
                let keep = now.saturating_sub(e.created_us) <= bound;
                if !keep {
                    freed += k.len();
                    n += 1;
                }
                keep
            });
            shard.bytes -= freed;
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.len.fetch_sub(n, Ordering::Relaxed);
        }
        self.last_sweep_us.store(now, Ordering::Relaxed);
        self.metrics.entries.set(self.len.load(Ordering::Relaxed) as i64);
    }

    /// Drop everything. Whatever made older reads untrustworthy (a connection made or lost, a new
    /// slot map) is in place before this is called, so an entry put in a shard already emptied
    /// comes from a read sent after it.
    fn flush(&self, reason: &'static str) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let n = shard.entries.len();
            shard.entries.clear();
            self.bytes.fetch_sub(std::mem::take(&mut shard.bytes), Ordering::Relaxed);
            self.len.fetch_sub(n, Ordering::Relaxed);
        }
        self.metrics.entries.set(self.len.load(Ordering::Relaxed) as i64);
        self.metrics.flushes.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An invalidation push from `node`'s connection of generation `generation`.
    fn on_push(&self, node: &NodeState, generation: u64, push: PushInfo) {
        match push.kind {
            PushKind::Invalidate => {
                let mut keys = Vec::new();
                let mut all = false;
                for v in &push.data {
                    match v {
                        Value::Nil => all = true,
                        Value::Array(items) => {
                            for k in items {
                                match k {
                                    Value::BulkString(b) => keys.push(b.as_slice()),
                                    Value::Nil => all = true,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if all {
                    self.flush("flushall");
                }
                let mut hb_seqs = Vec::new();
                for k in keys {
                    let Ok(k) = std::str::from_utf8(k) else { continue };
                    if let Some(rest) = k.strip_prefix(&self.hb_prefix) {
                        if let Some(seq) = rest.rsplit_once("}:").and_then(|(_, s)| s.parse::<u64>().ok()) {
                            hb_seqs.push(seq);
                        }
                    } else if self.remove(&mut self.shard(key_slot(k)), k) {
                        self.metrics.invalidations.inc();
                    }
                }
                // Heartbeats after the keys of the same push: a batch is applied as a whole.
                if node.generation.load(Ordering::Acquire) == generation
                    && node.dead_gen.load(Ordering::Acquire) != generation
                {
                    for seq in hb_seqs {
                        node.confirm(seq);
                    }
                }
            }
            PushKind::Disconnection
                if node.generation.load(Ordering::Acquire) == generation && !node.retired.load(Ordering::Acquire) =>
            {
                node.heartbeat_us.store(0, Ordering::Release);
                node.dead_gen.store(generation, Ordering::Release);
                self.flush("disconnect");
            }
            _ => {}
        }
    }
}

impl NodeState {
    fn new(addr: String, hb_tag: String) -> Self {
        NodeState {
            addr,
            hb_tag,
            heartbeat_us: AtomicU64::new(0),
            outstanding: Mutex::new(VecDeque::new()),
            generation: AtomicU64::new(0),
            dead_gen: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }
    }

    fn confirm(&self, seq: u64) {
        let mut q = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pos) = q.iter().position(|(s, _)| *s == seq) else { return };
        let sent = q[pos].1;
        q.drain(..=pos);
        self.heartbeat_us.fetch_max(sent, Ordering::AcqRel);
    }
}

/// A hash tag `<tag_prefix><n>` whose slot `owned` says this node serves.
fn heartbeat_tag(tag_prefix: &str, owned: impl Fn(u16) -> bool) -> Option<String> {
    (0..200_000u32).map(|n| format!("{tag_prefix}{n}")).find(|t| owned(key_slot(&format!("{{{t}}}"))))
}

/// Follows the slot map: (re)starts one tracking task per master; sweeps; gauges.
async fn maintain(
    shared: Arc<Shared>,
    cfg: RedisConfig,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<SlotLayout>>>,
) {
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let layout = rx.borrow_and_update().clone();
        if let Some(layout) = layout {
            let (addrs, slots) = (&layout.masters, &layout.slots);
            let current = shared.topo.load_full();
            if !current.same_layout(&layout) {
                let mut nodes = Vec::new();
                for (i, addr) in addrs.iter().enumerate() {
                    let owned = |s: u16| slots[s as usize] == i as u16;
                    let Some(tag) = heartbeat_tag(&shared.hb_tag_prefix, owned) else { continue };
                    nodes.push(Arc::new(NodeState::new(addr.clone(), tag)));
                }
                for n in &current.nodes {
                    n.retired.store(true, Ordering::Release);
                    n.heartbeat_us.store(0, Ordering::Release);
                }
                for (_, t) in tasks.drain() {
                    t.abort();
                }
                let mut slot_idx = slots.clone();
                // Indices follow `nodes`, which may have skipped an address without a usable tag.
                for s in slot_idx.iter_mut() {
                    if *s != NO_NODE {
                        let addr = &addrs[*s as usize];
                        *s = nodes.iter().position(|n| &n.addr == addr).map_or(NO_NODE, |p| p as u16);
                    }
                }
                let topo = Arc::new(Topology { nodes: nodes.clone(), slots: slot_idx.into_boxed_slice() });
                // Every master of the new map starts without a confirmed heartbeat (and the old
                // ones were retired above), so no entry is usable from here until the flush.
                shared.topo.store(topo);
                shared.flush("topology");
                tracing::info!(masters = nodes.len(), "session cache: slot map loaded");
                for n in nodes {
                    let (sh, c) = (shared.clone(), cfg.clone());
                    tasks.insert(n.addr.clone(), tokio::spawn(async move { track_node(sh, n, c).await }));
                }
            }
        }
        let now = shared.now_us();
        {
            if now.saturating_sub(shared.last_sweep_us.load(Ordering::Relaxed)) > shared.bound_us {
                shared.sweep(now);
            }
            let (mut oldest, mut fresh) = (0i64, 0i64);
            for n in &shared.topo.load().nodes {
                let hb = n.heartbeat_us.load(Ordering::Acquire);
                if hb == 0 {
                    oldest = -1;
                    continue;
                }
                let age = now.saturating_sub(hb);
                if age <= shared.bound_us {
                    fresh += 1;
                }
                if oldest >= 0 {
                    oldest = oldest.max((age / 1000) as i64);
                }
            }
            shared.metrics.heartbeat_age_ms.set(oldest);
            shared.metrics.nodes_fresh.set(fresh);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// Keep `node`'s tracking connection up and its heartbeat going, until the node is retired.
async fn track_node(shared: Arc<Shared>, node: Arc<NodeState>, cfg: RedisConfig) {
    let bound = Duration::from_micros(shared.bound_us);
    let timeout = Duration::from_millis(cfg.command_timeout_ms).max(bound);
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    let client = match crate::session::server_client(&cfg, &node.addr, true) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, node = %node.addr, "session cache: cannot build a client; cache not used");
            return;
        }
    };
    while !node.retired.load(Ordering::Acquire) {
        let generation = node.generation.fetch_add(1, Ordering::AcqRel) + 1;
        node.heartbeat_us.store(0, Ordering::Release);
        node.outstanding.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let (sh, nd) = (shared.clone(), node.clone());
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .set_response_timeout(Some(timeout))
            .set_push_sender(move |p: PushInfo| {
                sh.on_push(&nd, generation, p);
                Ok::<(), std::convert::Infallible>(())
            });
        let connected = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("CLIENT").arg("SETNAME").arg("authrealm-session-cache").exec_async(&mut conn).await?;
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(&shared.realm_prefix)
                .arg("PREFIX")
                .arg(&shared.hb_prefix)
                .exec_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms) + timeout, connected).await {
            Ok(Ok(conn)) => {
                // Writes before TRACKING ON were never reported: nothing read before now is kept.
                shared.flush("connect");
                backoff = Duration::from_millis(100);
                tracing::debug!(node = %node.addr, "session cache: tracking connection up");
                heartbeat(&shared, &node, generation, conn, timeout).await;
                node.heartbeat_us.store(0, Ordering::Release);
                if !node.retired.load(Ordering::Acquire) && node.dead_gen.load(Ordering::Acquire) != generation {
                    // Gave up on a connection the library still considers open.
                    shared.flush("disconnect");
                }
            }
            Ok(Err(e)) if !(e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || warned) => {
                // Refused by the server (e.g. an ACL without CLIENT TRACKING): the cache stays
                // unused for this master's keys, every request reads Redis. Said once.
                warned = true;
                tracing::warn!(node = %node.addr, error = %e, "session cache: tracking connection refused; cache not used for this master");
            }
            Ok(Err(e)) => tracing::debug!(node = %node.addr, error = %e, "session cache: tracking connection failed"),
            Err(_) => tracing::debug!(node = %node.addr, "session cache: tracking connection timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Heartbeats until the connection is lost, the node stops answering for long, or is retired.
async fn heartbeat(
    shared: &Shared,
    node: &NodeState,
    generation: u64,
    mut conn: redis::aio::MultiplexedConnection,
    timeout: Duration,
) {
    let bound = Duration::from_micros(shared.bound_us);
    let give_up_us = (bound * 10).max(Duration::from_secs(5)).as_micros() as u64;
    let up_since = shared.now_us();
    let ttl_ms = (bound * 4).max(Duration::from_secs(2)).as_millis() as u64;
    let mut tick = tokio::time::interval(heartbeat_interval(bound));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if node.retired.load(Ordering::Acquire) || node.dead_gen.load(Ordering::Acquire) == generation {
            return;
        }
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{}{{{}}}:{seq}", shared.key_prefix, node.hb_tag);
        let sent = shared.now_us();
        {
            let mut q = node.outstanding.lock().unwrap_or_else(|p| p.into_inner());
            q.push_back((seq, sent));
            while q.len() > 256 {
                q.pop_front();
            }
        }
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(1).arg("PX").arg(ttl_ms);
        match tokio::time::timeout(timeout, set.exec_async(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) || e.is_cluster_error() {
                    // This master no longer serves the heartbeat's slot.
                    if let Some(t) = shared.topology.get() {
                        t.poke();
                    }
                }
                if e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error() {
                    return;
                }
            }
            Err(_) => {}
        }
        let hb = node.heartbeat_us.load(Ordering::Acquire);
        let now = shared.now_us();
        if now.saturating_sub(if hb == 0 { up_since } else { hb }) > give_up_us {
            tracing::warn!(node = %node.addr, "session cache: no heartbeat confirmed for long; reconnecting");
            return;
        }
    }
}

/// A random instance id (aws-lc's system RNG, as for token ids).
fn random_u64() -> u64 {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    // A failing system RNG only makes the heartbeat prefix less unique, never unsafe.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(bound_ms: u64, max_entries: u32) -> SessionCache {
        let cfg = SessionCacheConfig { enabled: true, max_staleness_ms: bound_ms, max_entries };
        // A clock started a minute ago, so that tests can date entries back.
        let base = Instant::now().checked_sub(Duration::from_secs(60)).unwrap_or_else(Instant::now);
        SessionCache::with_instance(&cfg, &KeyLayout::new("ar:", "demo"), CacheMetrics::default(), "zz", base)
    }

    /// Pretend every slot is on one master whose heartbeat was confirmed at `hb_us`.
    fn one_master(c: &SessionCache, hb_us: u64) -> Arc<NodeState> {
        let node = Arc::new(NodeState::new("127.0.0.1:7000".into(), "demo;hb:x:0".into()));
        node.heartbeat_us.store(hb_us, Ordering::Release);
        node.generation.store(1, Ordering::Release);
        let topo = Topology { nodes: vec![node.clone()], slots: vec![0u16; SLOTS].into_boxed_slice() };
        c.shared.topo.store(Arc::new(topo));
        node
    }

    fn invalidate(c: &SessionCache, node: &NodeState, keys: &[&str]) {
        let data = vec![Value::Array(keys.iter().map(|k| Value::BulkString(k.as_bytes().to_vec())).collect())];
        c.shared.on_push(node, node.generation.load(Ordering::Acquire), PushInfo { kind: PushKind::Invalidate, data });
    }

    #[test]
    fn staleness_rule() {
        let b = 1_000_000;
        assert!(usable(5_000_000, 4_500_000, 4_200_000, b));
        // No confirmed heartbeat on the current connection: never.
        assert!(!usable(5_000_000, 4_900_000, 0, b));
        // Heartbeat too old (master frozen, channel silent): not used even for a fresh entry.
        assert!(!usable(5_000_000, 4_999_000, 3_999_999, b));
        assert!(usable(5_000_000, 4_999_000, 4_000_000, b));
        // Entry too old: not used even with a fresh heartbeat.
        assert!(!usable(5_000_000, 3_999_999, 4_999_000, b));
        assert!(!usable(5_000_000, 0, 4_999_000, b));
    }

    #[test]
    fn the_bound_holds_for_any_lost_invalidation() {
        // A revocation executed on the master at `w` whose invalidation is lost was executed after
        // every heartbeat whose invalidation did arrive (one connection delivers in order), so the
        // confirmed heartbeat was sent before `w`, and the entry's read before `w` as well. Then no
        // instant later than `w + bound` can use the entry.
        let b = 1_000u64;
        for w in [10_000u64, 10_500, 13_333] {
            for hb in (w.saturating_sub(3 * b)..w).step_by(97) {
                for created in (w.saturating_sub(3 * b)..w).step_by(89) {
                    for now in w..w + 3 * b {
                        if usable(now, created, hb, b) {
                            assert!(now <= w + b, "used at {now} after a write at {w} (hb {hb}, created {created})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn heartbeat_period_fits_four_times_in_the_bound() {
        assert_eq!(heartbeat_interval(Duration::from_millis(1000)), Duration::from_millis(250));
        assert_eq!(heartbeat_interval(Duration::from_millis(100)), Duration::from_millis(25));
        assert_eq!(heartbeat_interval(Duration::from_millis(40)), Duration::from_millis(20));
    }

    #[test]
    fn a_reply_overtaken_by_its_invalidation_is_not_cached() {
        let c = cache(1000, 100);
        let node = one_master(&c, c.now_us());
        let key = "ar:{demo:YQ}:t:ag";
        let Lookup::Miss(t) = c.lookup(key) else { panic!("empty cache hit") };
        // The revocation's invalidation is processed before the read's ("exists") reply.
        invalidate(&c, &node, &[key]);
        c.complete(key, t, Some(true));
        assert!(matches!(c.lookup(key), Lookup::Miss(_)), "a stale 'active' was cached");
        // A read sent after the invalidation completes normally.
        let Lookup::Miss(t2) = c.lookup(key) else { panic!() };
        c.complete(key, t2, Some(true));
        assert_eq!(c.lookup(key), Lookup::Hit);
        // And an invalidation after caching removes it.
        invalidate(&c, &node, &[key]);
        assert!(matches!(c.lookup(key), Lookup::Miss(_)));
        assert_eq!(c.shared.metrics.invalidations.get(), 2);
    }

    /// Date `key`'s entry (and its latest re-read) back by `us`: as if that time had passed.
    fn age(c: &SessionCache, key: &str, us: u64) {
        let mut shard = c.shared.shard(key_slot(key));
        let e = shard.entries.get_mut(key).unwrap();
        e.created_us -= us;
        e.refresh_us = e.refresh_us.saturating_sub(us);
    }

    #[test]
    fn entries_past_half_their_life_are_renewed_in_the_background() {
        let c = cache(1000, 100);
        let node = one_master(&c, c.now_us());
        let key = "ar:{demo:YQ}:t:ag";
        let Lookup::Miss(t) = c.lookup(key) else { panic!() };
        c.complete(key, t, Some(true));
        assert_eq!(c.lookup(key), Lookup::Hit);
        // Past half its life: one background re-read, the entry still answers meanwhile.
        age(&c, key, 600_000);
        let Lookup::Refresh(r) = c.lookup(key) else { panic!("no re-read past half the bound") };
        assert_eq!(c.lookup(key), Lookup::Hit, "one re-read at a time");
        // Its reply renews the entry: usable for a whole bound from the re-read's marker.
        c.refreshed(key, r, Some(true));
        age(&c, key, 510_000);
        assert!(matches!(c.lookup(key), Lookup::Refresh(_)), "renewed, and past half its life again");
        assert_eq!(c.shared.metrics.refreshes.get(), 2);
        // An invalidation while a re-read is in flight: its reply is not used.
        let key2 = "ar:{demo:Yg}:t:ag";
        let Lookup::Miss(t) = c.lookup(key2) else { panic!() };
        c.complete(key2, t, Some(true));
        age(&c, key2, 700_000);
        let Lookup::Refresh(r) = c.lookup(key2) else { panic!() };
        invalidate(&c, &node, &[key2]);
        c.refreshed(key2, r, Some(true));
        assert!(matches!(c.lookup(key2), Lookup::Miss(_)), "a renewal overtaken by its invalidation was used");
        let Lookup::Miss(t) = c.lookup(key2) else { panic!() };
        c.complete(key2, t, Some(true));
        // A failed re-read renews nothing and is tried again a quarter of the bound later.
        age(&c, key2, 700_000);
        let Lookup::Refresh(r) = c.lookup(key2) else { panic!() };
        c.refreshed(key2, r, None);
        assert_eq!(c.lookup(key2), Lookup::Hit);
        c.shared.shard(key_slot(key2)).entries.get_mut(key2).unwrap().refresh_us -= 260_000;
        let Lookup::Refresh(r2) = c.lookup(key2) else { panic!("a failed re-read is tried again") };
        // "Gone" drops the entry (a stale ticket changes nothing).
        let before = c.len();
        c.refreshed(key2, r, Some(true));
        c.refreshed(key2, r2, Some(false));
        assert_eq!(c.len(), before - 1);
        assert!(matches!(c.lookup(key2), Lookup::Miss(_)));
        // Too old: not used at all, with a re-read in flight or not.
        age(&c, key, 600_000);
        assert!(matches!(c.lookup(key), Lookup::Miss(_)));
    }

    #[test]
    fn a_flush_while_a_read_is_in_flight_discards_its_reply() {
        let c = cache(1000, 100);
        one_master(&c, c.now_us());
        let key = "ar:{demo:YQ}:t:ag";
        let Lookup::Miss(t) = c.lookup(key) else { panic!() };
        c.shared.flush("disconnect");
        c.complete(key, t, Some(true));
        assert!(c.is_empty());
        // Concurrent readers share the marker; either reply may complete it, once.
        let Lookup::Miss(a) = c.lookup(key) else { panic!() };
        let Lookup::Miss(b) = c.lookup(key) else { panic!() };
        assert_eq!(a, b);
        c.complete(key, b, Some(true));
        c.complete(key, a, Some(true));
        assert_eq!(c.lookup(key), Lookup::Hit);
        // "Revoked" and errors are never cached.
        let other = "ar:{demo:Yg}:t:ag";
        let Lookup::Miss(t) = c.lookup(other) else { panic!() };
        c.complete(other, t, Some(false));
        let Lookup::Miss(t) = c.lookup(other) else { panic!() };
        c.complete(other, t, None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn entries_are_not_used_without_a_fresh_heartbeat() {
        let c = cache(1000, 100);
        let node = one_master(&c, 0);
        let key = "ar:{demo:YQ}:t:ag";
        let Lookup::Miss(t) = c.lookup(key) else { panic!() };
        c.complete(key, t, Some(true));
        assert!(matches!(c.lookup(key), Lookup::Miss(_)), "no heartbeat confirmed yet");
        // A heartbeat confirmed: the key's next read is cached and used.
        node.outstanding.lock().unwrap().push_back((7, c.now_us()));
        invalidate(&c, &node, &["ar:{demo;hb:zz:0}:7"]);
        assert!(node.heartbeat_us.load(Ordering::Acquire) > 0);
        let Lookup::Miss(t) = c.lookup(key) else { panic!() };
        c.complete(key, t, Some(true));
        assert_eq!(c.lookup(key), Lookup::Hit);
        // A heartbeat from an older connection never confirms.
        node.heartbeat_us.store(0, Ordering::Release);
        node.outstanding.lock().unwrap().push_back((8, c.now_us()));
        let data = vec![Value::Array(vec![Value::BulkString(b"ar:{demo;hb:zz:0}:8".to_vec())])];
        node.generation.store(2, Ordering::Release);
        c.shared.on_push(&node, 1, PushInfo { kind: PushKind::Invalidate, data });
        assert_eq!(node.heartbeat_us.load(Ordering::Acquire), 0);
    }

    #[test]
    fn flushall_and_disconnect_flush_everything() {
        let c = cache(1000, 100);
        let node = one_master(&c, c.now_us());
        for k in ["ar:{demo:YQ}:t:a", "ar:{demo:Yg}:t:b"] {
            let Lookup::Miss(t) = c.lookup(k) else { panic!() };
            c.complete(k, t, Some(true));
        }
        assert_eq!(c.len(), 2);
        c.shared.on_push(&node, 1, PushInfo { kind: PushKind::Invalidate, data: vec![Value::Nil] });
        assert!(c.is_empty());
        let Lookup::Miss(t) = c.lookup("ar:{demo:YQ}:t:a") else { panic!() };
        c.complete("ar:{demo:YQ}:t:a", t, Some(true));
        c.shared.on_push(&node, 1, PushInfo { kind: PushKind::Disconnection, data: vec![] });
        assert!(c.is_empty());
        assert_eq!(node.heartbeat_us.load(Ordering::Acquire), 0, "a lost connection makes the master unusable");
        assert_eq!(c.shared.metrics.flushes.get_or_create(&ReasonLabel { reason: "disconnect" }).get(), 1);
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let c = cache(1000, 50);
        one_master(&c, c.now_us());
        for i in 0..200 {
            let k = format!("ar:{{demo:u{i}}}:t:j");
            if let Lookup::Miss(t) = c.lookup(&k) {
                c.complete(&k, t, Some(true));
            }
        }
        assert_eq!(c.len(), 50);
        // A long key cannot push the bytes over the cap either.
        let huge = format!("ar:{{demo:{}}}:t:j", "x".repeat(50 * 128));
        assert_eq!(c.lookup(&huge), Lookup::Miss(None));
        assert!(c.shared.bytes.load(Ordering::Relaxed) <= 50 * 128);
        assert_eq!(
            c.shared.shards.iter().map(|s| s.lock().unwrap().bytes).sum::<usize>(),
            c.shared.bytes.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn local_revocations_drop_a_subjects_entries() {
        let l = KeyLayout::new("ar:", "demo");
        let c = cache(1000, 100);
        one_master(&c, c.now_us());
        for (s, j) in [("alice", "1"), ("alice", "2"), ("alicex", "1"), ("bob", "1")] {
            let k = l.token(s, j);
            let Lookup::Miss(t) = c.lookup(&k) else { panic!() };
            c.complete(&k, t, Some(true));
        }
        c.forget_prefix(&l.token_prefix("alice"));
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup(&l.token("bob", "1")), Lookup::Hit);
        c.forget(&l.token("bob", "1"));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn heartbeat_tags_land_on_their_master() {
        for (lo, hi) in [(0u16, 5460u16), (5461, 10922), (10923, 16383), (100, 100)] {
            let tag = heartbeat_tag("demo;hb:abc:", |s| (lo..=hi).contains(&s)).unwrap();
            let slot = key_slot(&format!("ar:{{{tag}}}:1"));
            assert!((lo..=hi).contains(&slot), "{tag} → {slot}");
        }
        // Heartbeat keys are under the heartbeat prefix, outside the realm's prefix, and sort after it.
        let l = KeyLayout::new("ar:", "demo");
        let (realm, hb) = (l.realm_prefix(), l.heartbeat_prefix("abc"));
        assert!(!hb.starts_with(&realm) && !realm.starts_with(&hb));
        assert!(hb > realm);
        assert!(l.token("x", "y").starts_with(&realm));
    }
}
