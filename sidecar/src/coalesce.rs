//! Coalesced session reads: the `EXISTS` of every request that needs one at the same moment goes
//! to Redis in one pipeline per master, not as a command of its own.
//!
//! A command sent on its own through the cluster client costs two task hand-offs (the cluster
//! connection's task, then the node connection's), a channel message, a reply channel and a
//! timer each way, and often a write of its own; under load that was most of the sidecar's CPU
//! in single-session mode with the session cache off. Here a request puts its key in a queue; the
//! first one into an empty queue wakes the flusher, which first lets every other request that is
//! ready in the same pass of the runtime add its key (`yield_now`: woken again only after the
//! runtime has run out of ready tasks), then sends the queue as one pipeline per master
//! (`EXISTS k1`, `EXISTS k2`, … — keys of different slots cannot share one `EXISTS`) and hands
//! each request its own reply. A request waits for no timer: with nothing else ready the flusher
//! runs at once.
//!
//! Background reads (the session cache renewing an entry past half its life, see
//! [`crate::sessioncache`]) need no answer soon: they wait up to a given delay (a fraction of the
//! cache's bound) for a pipeline to ride along with, request reads or other background reads, so
//! renewing every cached session costs a few pipelines per bound, not a round trip each.
//!
//! Nothing about what is read changes: the same `EXISTS` of the same key on the master that
//! serves its slot. Masters are grouped by the slot map the sidecar polls ([`TopologyWatch`]).
//! In a cluster, a pipeline goes on a connection of this module's own to that master (made on
//! first use, with the realm's credentials and TLS settings; dropped when it fails and when the
//! master leaves the slot map), which saves the cluster client's task hop per pipeline; until
//! that connection is up, or for a slot the map does not assign, it goes through the cluster
//! client, routed by its first key's slot. A node that no longer serves a slot answers `MOVED`,
//! never a stale reply. Any reply that is not an integer (a `MOVED`
//! after a slot moved, `TRYAGAIN`, `LOADING`, …), and every key of a pipeline that failed or
//! timed out, is answered "not here": that request then sends its `EXISTS` on its own exactly as
//! before (the cluster client follows the redirect or retries), within the request's own
//! deadline ([`crate::session::SessionStore`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, oneshot};

use authrealm_contract::config::RedisConfig;

use crate::session::{RedisConn, SessionKey};
use crate::topology::{NO_NODE, SlotLayout, TopologyWatch};

/// A master whose own connection could not be made is tried again after this.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Most reads in one pipeline (more are split).
const MAX_PIPELINE: usize = 128;

/// A background read's continuation: the reply, or None (not answered).
pub type Later = Box<dyn FnOnce(Option<i64>) + Send>;

enum Reply {
    /// A request waiting (a dropped sender: read on your own).
    Now(oneshot::Sender<i64>),
    Later(Later),
}

impl Reply {
    fn answer(self, n: Option<i64>) {
        match (self, n) {
            (Reply::Now(tx), Some(n)) => {
                let _ = tx.send(n);
            }
            (Reply::Now(_), None) => {}
            (Reply::Later(f), n) => f(n),
        }
    }
}

struct Waiting {
    key: SessionKey,
    reply: Reply,
}

struct Shared {
    queue: Mutex<Vec<Waiting>>,
    wake: Notify,
    /// Background reads not yet sent, and the timer task's wake-up when the first arrives.
    later: Mutex<Vec<Waiting>>,
    later_wake: Notify,
    later_delay_us: AtomicU64,
    /// The store's per-request read connection (replaced when the slot map changes).
    conn: Arc<ArcSwap<RedisConn>>,
    topology: Option<TopologyWatch>,
    /// A pipeline not answered by then is given up (its requests read on their own).
    timeout: Duration,
    /// Own connections to the masters (cluster mode).
    direct: Option<Direct>,
}

/// This module's own connection to each master, by address.
struct Direct {
    cfg: RedisConfig,
    links: Mutex<HashMap<String, Link>>,
}

enum Link {
    /// Being made, or failed at that time: pipelines go through the cluster client meanwhile.
    Pending(Instant),
    Up(MultiplexedConnection),
}

impl Direct {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// Everything queued, request reads and background reads, as pipelines on their way.
    fn dispatch(self: &Arc<Self>, layouts: Option<&LayoutRx>) {
        let mut batch = std::mem::take(&mut *locked(&self.queue));
        batch.append(&mut locked(&self.later));
        if batch.is_empty() {
            return;
        }
        let layout = layouts.and_then(|rx| rx.borrow().clone());
        for p in pipelines(batch, layout.as_deref().map(|l| &l.slots[..])) {
            let master = layout.as_deref().and_then(|l| master_of(l, p[0].key.slot()));
            tokio::spawn(send(self.clone(), p, master));
        }
    }

    /// The own connection to the master at `addr`, if it is up; otherwise None (and one is made
    /// in the background, at most once per [`RECONNECT_AFTER`]).
    fn direct(self: &Arc<Self>, addr: &str) -> Option<MultiplexedConnection> {
        let d = self.direct.as_ref()?;
        let mut links = d.lock();
        match links.get(addr) {
            Some(Link::Up(c)) => return Some(c.clone()),
            Some(Link::Pending(since)) if since.elapsed() < RECONNECT_AFTER => return None,
            _ => {}
        }
        links.insert(addr.to_string(), Link::Pending(Instant::now()));
        tokio::spawn(connect(self.clone(), addr.to_string()));
        None
    }

    /// The own connection to `addr` failed: pipelines go through the cluster client until a new
    /// one is made.
    fn direct_failed(&self, addr: &str) {
        if let Some(d) = &self.direct {
            d.lock().insert(addr.to_string(), Link::Pending(Instant::now()));
        }
    }

    /// Drop the own connections to nodes that are not masters of `layout`.
    fn retain_masters(&self, layout: &SlotLayout) {
        if let Some(d) = &self.direct {
            d.lock().retain(|addr, _| layout.masters.iter().any(|m| m == addr));
        }
    }
}

fn locked(q: &Mutex<Vec<Waiting>>) -> MutexGuard<'_, Vec<Waiting>> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds `w` to `q`; the first into an empty queue wakes its sender (`wake` keeps the permit if
/// the sender is busy, so a read added meanwhile is never left behind).
fn enqueue(q: &Mutex<Vec<Waiting>>, wake: &Notify, w: Waiting) {
    let first = {
        let mut q = locked(q);
        q.push(w);
        q.len() == 1
    };
    if first {
        wake.notify_one();
    }
}

/// The coalescing reader of one [`crate::session::SessionStore`].
pub struct Coalescer {
    shared: Arc<Shared>,
    started: OnceLock<()>,
}

impl Coalescer {
    /// `topology`: the slot map that groups keys by master (None: one pipeline per slot);
    /// `cluster`: the realm's Redis settings when it is a cluster (own connections to its
    /// masters are made with them).
    pub fn new(
        conn: Arc<ArcSwap<RedisConn>>,
        topology: Option<TopologyWatch>,
        timeout: Duration,
        cluster: Option<RedisConfig>,
    ) -> Self {
        Coalescer {
            shared: Arc::new(Shared {
                queue: Mutex::new(Vec::new()),
                wake: Notify::new(),
                later: Mutex::new(Vec::new()),
                later_wake: Notify::new(),
                later_delay_us: AtomicU64::new(0),
                conn,
                topology,
                timeout,
                direct: cluster.map(|cfg| Direct { cfg, links: Mutex::new(HashMap::new()) }),
            }),
            started: OnceLock::new(),
        }
    }

    /// `EXISTS key`'s reply, or None when its pipeline did not answer it (an error reply, a
    /// failed or slow pipeline): then the caller sends the command on its own.
    pub async fn exists(&self, key: &SessionKey) -> Option<i64> {
        self.start();
        let (reply, rx) = oneshot::channel();
        enqueue(&self.shared.queue, &self.shared.wake, Waiting { key: key.clone(), reply: Reply::Now(reply) });
        rx.await.ok()
    }

    /// `EXISTS key` in the background, sent within `delay` (with the next request reads, or
    /// with the background reads of that moment); `then` gets the reply, or None.
    pub fn later(&self, key: &SessionKey, delay: Duration, then: Later) {
        self.start();
        self.shared.later_delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
        enqueue(&self.shared.later, &self.shared.later_wake, Waiting { key: key.clone(), reply: Reply::Later(then) });
    }

    fn start(&self) {
        self.started.get_or_init(|| {
            tokio::spawn(flusher(self.shared.clone()));
            tokio::spawn(later_timer(self.shared.clone()));
        });
    }
}

type LayoutRx = tokio::sync::watch::Receiver<Option<Arc<crate::topology::SlotLayout>>>;

/// The address of the master serving `slot`, if the map assigns it.
fn master_of(layout: &SlotLayout, slot: u16) -> Option<String> {
    match layout.slots.get(slot as usize) {
        Some(&m) if m != NO_NODE => layout.masters.get(m as usize).cloned(),
        _ => None,
    }
}

/// Pipeline group of a slot: its master's index in the slot map, or (slot unknown to the map)
/// the slot itself.
fn group(slots: Option<&[u16]>, slot: u16) -> u32 {
    match slots.and_then(|s| s.get(slot as usize)) {
        Some(&m) if m != NO_NODE => m as u32,
        _ => 0x1_0000 + slot as u32,
    }
}

/// Splits `batch` into pipelines: one group each, at most [`MAX_PIPELINE`] keys.
fn pipelines(mut batch: Vec<Waiting>, slots: Option<&[u16]>) -> Vec<Vec<Waiting>> {
    batch.sort_unstable_by_key(|w| group(slots, w.key.slot()));
    let mut out = Vec::new();
    while let Some(last) = batch.last() {
        let g = group(slots, last.key.slot());
        let start = batch.iter().rposition(|w| group(slots, w.key.slot()) != g).map_or(0, |i| i + 1);
        out.push(batch.split_off(start.max(batch.len().saturating_sub(MAX_PIPELINE))));
    }
    out
}

async fn flusher(shared: Arc<Shared>) {
    let mut layouts = shared.topology.as_ref().map(TopologyWatch::subscribe);
    loop {
        shared.wake.notified().await;
        if let Some(rx) = layouts.as_mut()
            && rx.has_changed().unwrap_or(false)
            && let Some(layout) = rx.borrow_and_update().clone()
        {
            shared.retain_masters(&layout);
        }
        // Every request ready in this pass of the runtime adds its key first.
        tokio::task::yield_now().await;
        shared.dispatch(layouts.as_ref());
    }
}

/// Sends the background reads no request read took along within their delay.
async fn later_timer(shared: Arc<Shared>) {
    let layouts = shared.topology.as_ref().map(TopologyWatch::subscribe);
    loop {
        shared.later_wake.notified().await;
        let delay = Duration::from_micros(shared.later_delay_us.load(Ordering::Relaxed));
        tokio::time::sleep(delay).await;
        shared.dispatch(layouts.as_ref());
    }
}

/// Makes the own connection to the master at `addr`.
async fn connect(shared: Arc<Shared>, addr: String) {
    let Some(d) = &shared.direct else { return };
    let connect_timeout = Duration::from_millis(d.cfg.connect_timeout_ms);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(shared.timeout));
    let made = async {
        let client = crate::session::server_client(&d.cfg, &addr, false).ok()?;
        client.get_multiplexed_async_connection_with_config(&config).await.ok()
    };
    let Ok(Some(conn)) = tokio::time::timeout(connect_timeout + shared.timeout, made).await else { return };
    let mut links = d.lock();
    // Only if still wanted (the master may have left the slot map meanwhile).
    if let Some(link @ Link::Pending(_)) = links.get_mut(&addr) {
        *link = Link::Up(conn);
    }
}

/// One pipeline to the master serving its keys (`master`, on the own connection when it is up;
/// otherwise through the cluster client, routed by the first key's slot); each request gets its
/// reply, or (dropped sender) reads on its own.
async fn send(shared: Arc<Shared>, keys: Vec<Waiting>, master: Option<String>) {
    let Some(first) = keys.first() else { return };
    let slot = first.key.slot();
    let mut pipe = redis::pipe();
    for w in &keys {
        pipe.cmd("EXISTS").arg(w.key.as_str());
    }
    let direct = master.as_deref().and_then(|a| Some((a, shared.direct(a)?)));
    let sent = match direct {
        Some((addr, mut conn)) => {
            let r = tokio::time::timeout(shared.timeout, conn.send_packed_commands(&pipe, 0, keys.len())).await;
            if !matches!(r, Ok(Ok(_))) {
                shared.direct_failed(addr);
            }
            r
        }
        None => {
            let mut conn = RedisConn::clone(&shared.conn.load());
            tokio::time::timeout(shared.timeout, conn.pipeline_for_slot(slot, pipe, keys.len())).await
        }
    };
    let replies = match sent {
        Ok(Ok(v)) if v.len() == keys.len() => v,
        _ => {
            for w in keys {
                w.reply.answer(None);
            }
            return;
        }
    };
    let mut redirected = false;
    for (w, v) in keys.into_iter().zip(replies) {
        match v {
            Value::Int(n) => w.reply.answer(Some(n)),
            // Most likely the slot moved: the slot map is looked at now.
            _ => {
                redirected = true;
                w.reply.answer(None);
            }
        }
    }
    if redirected && let Some(t) = &shared.topology {
        t.poke();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::redis_keys::KeyLayout;

    fn waiting(l: &KeyLayout, sub: &str) -> (Waiting, oneshot::Receiver<i64>) {
        let (reply, rx) = oneshot::channel();
        (Waiting { key: SessionKey::new(l, sub, "j"), reply: Reply::Now(reply) }, rx)
    }

    #[test]
    fn pipelines_group_keys_by_master_and_are_bounded() {
        let l = KeyLayout::new("ar:", "demo");
        // Two masters: slots below 8192 on master 0, the rest on master 1.
        let slots: Vec<u16> = (0..crate::topology::SLOTS).map(|s| (s >= 8192) as u16).collect();
        let batch: Vec<Waiting> = (0..300).map(|i| waiting(&l, &format!("u{i}")).0).collect();
        let lows = batch.iter().filter(|w| w.key.slot() < 8192).count();
        let ps = pipelines(batch, Some(&slots));
        assert_eq!(ps.iter().map(Vec::len).sum::<usize>(), 300);
        for p in &ps {
            assert!(!p.is_empty() && p.len() <= MAX_PIPELINE);
            let m = p[0].key.slot() >= 8192;
            assert!(p.iter().all(|w| (w.key.slot() >= 8192) == m), "one master per pipeline");
        }
        let low_pipes: usize = ps.iter().filter(|p| p[0].key.slot() < 8192).map(Vec::len).sum();
        assert_eq!(low_pipes, lows);
        // No slot map: one pipeline per slot.
        let batch: Vec<Waiting> = ["a", "b", "a", "c"].iter().map(|s| waiting(&l, s).0).collect();
        let ps = pipelines(batch, None);
        assert_eq!(ps.len(), 3);
        assert!(ps.iter().all(|p| p.iter().all(|w| w.key.slot() == p[0].key.slot())));
        // A slot the map does not assign is never sent along with a master's keys.
        let mut holes = slots.clone();
        let a = SessionKey::new(&l, "a", "j").slot();
        holes[a as usize] = NO_NODE;
        let batch: Vec<Waiting> = ["a", "b", "c", "d"].iter().map(|s| waiting(&l, s).0).collect();
        let ps = pipelines(batch, Some(&holes));
        assert!(ps.iter().any(|p| p.len() == 1 && p[0].key.slot() == a));
    }
}
