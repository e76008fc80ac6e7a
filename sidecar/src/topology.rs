//! The cluster's slot map as the cluster reports it (`CLUSTER SLOTS`), polled every second and at
//! once after a Redis error on the request path.
//!
//! Two consumers: the session cache (which master's invalidation channel covers which key, and a
//! flush whenever that changes) and the session store, which reconnects when the slot map changes.
//! The cluster client learns about a failover only from errors on its own connections; a master
//! that stops answering without closing them (SIGSTOP, a black-holed network) returns none, so
//! without this its slots would stay routed to it until it came back.
//!
//! A standalone Redis (`redis.mode: standalone`) has no slot map to poll: [`TopologyWatch::fixed`]
//! publishes one master serving every slot, once. (The session cache's tracking connection to it
//! still flushes the cache whenever it is lost or re-made, e.g. when the server restarts.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use tokio::sync::{Notify, watch};

use crate::session::RedisConn;

/// Slots of a cluster.
pub const SLOTS: usize = 16384;
/// No master serves this slot.
pub const NO_NODE: u16 = u16::MAX;

/// Masters (sorted addresses) and, per slot, the index of the master serving it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    pub masters: Vec<String>,
    pub slots: Vec<u16>,
}

/// `CLUSTER SLOTS` → [`SlotLayout`]. `asked_host` replaces an empty or `?` host (Redis reports
/// that when it does not know its own address).
pub fn parse_cluster_slots(v: &Value, asked_host: &str) -> Option<SlotLayout> {
    let Value::Array(ranges) = v else { return None };
    let mut masters: Vec<String> = Vec::new();
    let mut raw: Vec<(u16, u16, String)> = Vec::new();
    for r in ranges {
        let Value::Array(f) = r else { return None };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return None;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok()?,
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return None,
        };
        let host = if host.is_empty() || host == "?" { asked_host.to_string() } else { host };
        let Some(Value::Int(port)) = master.get(1) else { return None };
        if host.is_empty() || !(1..=65535).contains(port) {
            return None;
        }
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let addr = format!("{host}:{port}");
        if !(0..SLOTS as i64).contains(start) || !(0..SLOTS as i64).contains(end) || start > end {
            return None;
        }
        if !masters.contains(&addr) {
            masters.push(addr.clone());
        }
        raw.push((*start as u16, *end as u16, addr));
    }
    masters.sort();
    let mut slots = vec![NO_NODE; SLOTS];
    for (s, e, a) in raw {
        let i = masters.iter().position(|x| *x == a)? as u16;
        for slot in s..=e {
            slots[slot as usize] = i;
        }
    }
    Some(SlotLayout { masters, slots })
}

/// `host:port` (IPv6 in brackets) → (host, port).
pub fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    Some((h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse().ok()?))
}

struct Inner {
    tx: watch::Sender<Option<Arc<SlotLayout>>>,
    poke: Notify,
}

/// Publishes the latest slot map; cheap to clone.
#[derive(Clone)]
pub struct TopologyWatch {
    inner: Arc<Inner>,
}

impl TopologyWatch {
    /// Start polling. `conn` returns the current request-path connection (it may be replaced).
    pub fn start(conn: impl Fn() -> RedisConn + Send + 'static, limit: Duration) -> Self {
        let (tx, _) = watch::channel(None);
        let w = TopologyWatch { inner: Arc::new(Inner { tx, poke: Notify::new() }) };
        let inner = w.inner.clone();
        tokio::spawn(async move { poll(inner, conn, limit).await });
        w
    }

    /// A standalone server `addr`: one master serving every slot, published once; no polling.
    pub fn fixed(addr: &str) -> Self {
        let layout = SlotLayout { masters: vec![addr.to_string()], slots: vec![0; SLOTS] };
        let (tx, _) = watch::channel(Some(Arc::new(layout)));
        TopologyWatch { inner: Arc::new(Inner { tx, poke: Notify::new() }) }
    }

    /// The current slot map and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<SlotLayout>>> {
        self.inner.tx.subscribe()
    }

    /// Look now (a Redis error on the request path, a `MOVED` heartbeat).
    pub fn poke(&self) {
        self.inner.poke.notify_one();
    }
}

async fn poll(inner: Arc<Inner>, conn: impl Fn() -> RedisConn, limit: Duration) {
    // Whoever answered last is asked first: a frozen master would only time out.
    let last_good: Mutex<Option<String>> = Mutex::new(None);
    loop {
        let current = inner.tx.borrow().clone();
        let mut candidates: Vec<String> = Vec::new();
        if let Some(a) = last_good.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            candidates.push(a);
        }
        if let Some(l) = &current {
            for m in &l.masters {
                if !candidates.contains(m) {
                    candidates.push(m.clone());
                }
            }
        }
        let mut routes: Vec<(SingleNodeRoutingInfo, String, Option<String>)> = candidates
            .iter()
            .take(3)
            .filter_map(|a| {
                let (host, port) = split_addr(a)?;
                Some((SingleNodeRoutingInfo::ByAddress { host: host.clone(), port }, host, Some(a.clone())))
            })
            .collect();
        routes.push((SingleNodeRoutingInfo::RandomPrimary, String::new(), None));
        for (route, host, addr) in routes {
            let mut c = conn();
            let mut cmd = redis::Cmd::new();
            cmd.arg("CLUSTER").arg("SLOTS");
            if let Ok(Ok(v)) = tokio::time::timeout(limit, c.route_command(cmd, RoutingInfo::SingleNode(route))).await
                && let Some(layout) = parse_cluster_slots(&v, &host)
            {
                *last_good.lock().unwrap_or_else(|p| p.into_inner()) = addr;
                if current.as_deref() != Some(&layout) {
                    tracing::info!(masters = layout.masters.len(), "redis cluster slot map loaded");
                    inner.tx.send_replace(Some(Arc::new(layout)));
                }
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = inner.poke.notified() => {
                // A burst of errors (every request to a frozen master fails) makes one look per
                // 200 ms at most.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standalone_server_serves_every_slot() {
        let w = TopologyWatch::fixed("127.0.0.1:6379");
        let l = w.subscribe().borrow().clone().unwrap();
        assert_eq!(l.masters, ["127.0.0.1:6379"]);
        assert!(l.slots.len() == SLOTS && l.slots.iter().all(|s| *s == 0));
        w.poke();
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |h: &str, p: i64| Value::Array(vec![Value::BulkString(h.as_bytes().to_vec()), Value::Int(p)]);
        let v = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("127.0.0.1", 7000), node("127.0.0.1", 7003)]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("", 7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("::1", 7002)]),
        ]);
        let l = parse_cluster_slots(&v, "10.0.0.9").unwrap();
        assert_eq!(l.masters, ["10.0.0.9:7001", "127.0.0.1:7000", "[::1]:7002"]);
        assert_eq!(l.slots[0], 1);
        assert_eq!(l.slots[5461], 0);
        assert_eq!(l.slots[16383], 2);
        assert_eq!(split_addr(&l.masters[2]), Some(("::1".to_string(), 7002)));
        // Malformed or hostile replies are refused, never a panic.
        assert!(parse_cluster_slots(&Value::Array(vec![Value::Int(1)]), "").is_none());
        for bad in [
            Value::Array(vec![Value::Array(vec![Value::Int(5), Value::Int(99_999), node("h", 1)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(9), Value::Int(5), node("h", 1)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(5), node("h", 0)])]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(5), node("", 6379)])]),
            Value::Nil,
        ] {
            assert!(parse_cluster_slots(&bad, "").is_none(), "{bad:?}");
        }
    }
}
