//! The verified-token cache: a client reuses its token for many requests, so its signature is
//! verified and its claims parsed once, not on every request.
//!
//! What is cached is the outcome of every check that does not depend on the time: signature,
//! algorithm, `kid`, `iss`, `aud`, `sub`/`jti`, required claims, the denylist lifetime bound, the
//! identity-header values and the route requirements the claims satisfy (`authz::Granted`).
//! `exp`, `nbf` and `iat` are evaluated again on every request, and
//! the session/revocation check in Redis still runs on every request.
//!
//! * Keyed by the whole token: an entry is found through a hash of the token's signature, and
//!   used only when the presented token is byte for byte the one that was verified — a hash
//!   collision can never admit a different token. Only tokens that passed verification are
//!   stored, so a client cannot fill the cache with forged ones.
//! * Bounded in entries and in bytes. A token enters on its second sighting (a "doorkeeper":
//!   a 128 KiB Bloom filter of recent sightings, two bits per token), so a flood of one-off
//!   tokens never displaces tokens in use and seldom costs an entry (a false "seen before" lets
//!   about 2% of one-off tokens in); eviction is CLOCK (an entry used since the last sweep gets
//!   a second chance).
//! * Tied to the key set it was verified with: after any key-set reload (rotation, retirement,
//!   a key removed) every entry is dropped — tokens are verified again against the new keys.
//!   Entries are also dropped once their token has expired.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::token::Reject;

/// What verification established about one token, shared by every request that presents it.
#[derive(Debug)]
pub struct VerifiedToken {
    pub kid: String,
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub exp: i64,
    /// The identity headers for the app (already checked to be representable).
    pub identity: Vec<(HeaderName, HeaderValue)>,
    /// The route requirements (`authorization.rules`) this token's claims satisfy.
    pub authz: crate::authz::Granted,
    /// Index of the external issuer whose key verified it (None: the realm's own keys).
    pub external: Option<usize>,
    /// Its session record's key (`single`/`multi` realms), built once with the realm's layout.
    pub session_key: Option<crate::session::SessionKey>,
}

impl VerifiedToken {
    /// The checks that depend on the time, as `token::validate` makes them.
    pub fn check_time(&self, now: i64, leeway: i64) -> Result<(), Reject> {
        if now > self.exp.saturating_add(leeway) {
            return Err(Reject::Expired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Reject::NotYetValid);
        }
        if self.iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
            return Err(Reject::IssuedInFuture);
        }
        Ok(())
    }
}

struct Entry {
    token: Box<str>,
    verified: std::sync::Arc<VerifiedToken>,
    referenced: AtomicBool,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.token.len()
            + std::mem::size_of::<Entry>()
            + std::mem::size_of::<VerifiedToken>()
            + self.verified.kid.len()
            + self.verified.sub.as_ref().map_or(0, String::len)
            + self.verified.jti.as_ref().map_or(0, String::len)
            + self.verified.session_key.as_ref().map_or(0, |k| k.as_str().len() + 16)
            + self.verified.identity.iter().map(|(n, v)| n.as_str().len() + v.len() + 64).sum::<usize>()
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, Entry>,
    /// CLOCK hand order (hashes; stale ones are skipped).
    clock: VecDeque<u64>,
    bytes: usize,
    /// Key-set digest the entries were verified with.
    digest: [u8; 32],
}

const SHARDS: usize = 8;
/// Doorkeeper size: 2^20 bits (128 KiB), two bits per token, cleared after [`DOORKEEPER_ADMISSIONS`]
/// admissions or [`DOORKEEPER_SIGHTINGS`] sightings, whichever comes first. Under a flood of
/// one-off tokens the filter is then never more than about a fifth full, so about 2% of them are
/// taken for a second sighting (with 2^16 bits, one bit each and a reset every 8,192 admissions
/// it was about 23%), while a token in use still gets in if it is presented again within
/// 131,072 misses.
const DOORKEEPER_BITS: usize = 1 << 20;
const DOORKEEPER_ADMISSIONS: u64 = 8192;
const DOORKEEPER_SIGHTINGS: u64 = DOORKEEPER_BITS as u64 / 8;

/// The cache's metrics (shared handles into the sidecar's registry).
#[derive(Clone, Default)]
pub struct CacheStats {
    pub hits: Counter,
    pub misses: Counter,
    pub evictions: Counter,
    pub entries: Gauge,
}

pub struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    max_entries: usize,
    max_bytes: usize,
    hasher: RandomState,
    doorkeeper: Vec<AtomicU64>,
    admitted: AtomicU64,
    sightings: AtomicU64,
    pub stats: CacheStats,
}

impl TokenCache {
    /// `max_entries` and `max_bytes` bound the whole cache; 0 entries disables it.
    pub fn new(max_entries: usize, max_bytes: usize, stats: CacheStats) -> TokenCache {
        TokenCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_entries: max_entries.div_ceil(SHARDS),
            max_bytes: max_bytes.div_ceil(SHARDS),
            hasher: RandomState::new(),
            doorkeeper: (0..DOORKEEPER_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
            admitted: AtomicU64::new(0),
            sightings: AtomicU64::new(0),
            stats,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// Hash of the token's signature (its last segment, at most 64 bytes): random for real
    /// tokens, and keyed per process, so nobody can aim at a bucket.
    fn hash(&self, token: &str) -> u64 {
        let tail = token.rsplit('.').next().unwrap_or(token).as_bytes();
        let tail = &tail[tail.len().saturating_sub(64)..];
        let mut h = self.hasher.build_hasher();
        h.write(tail);
        h.write_usize(token.len());
        h.finish()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 59) as usize % SHARDS]
    }

    /// The cached verification of exactly `token` under the key set `digest`.
    pub fn get(&self, token: &str, digest: &[u8; 32]) -> Option<std::sync::Arc<VerifiedToken>> {
        if !self.enabled() {
            return None;
        }
        let hash = self.hash(token);
        let shard = self.shard(hash).lock().unwrap_or_else(|p| p.into_inner());
        let hit = match shard.map.get(&hash) {
            Some(e) if shard.digest == *digest && *e.token == *token => {
                e.referenced.store(true, Ordering::Relaxed);
                Some(e.verified.clone())
            }
            _ => None,
        };
        drop(shard);
        if hit.is_some() { &self.stats.hits } else { &self.stats.misses }.inc();
        hit
    }

    /// Seen before (recently)? Marks it seen: two bits, from two independent parts of the hash
    /// (the shard is chosen by its top bits). Old sightings fade: the filter is cleared after
    /// [`DOORKEEPER_ADMISSIONS`] admissions or [`DOORKEEPER_SIGHTINGS`] sightings.
    fn seen_before(&self, hash: u64) -> bool {
        if (self.sightings.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(DOORKEEPER_SIGHTINGS) {
            self.clear_doorkeeper();
        }
        let mut seen = true;
        for bit in [hash as usize % DOORKEEPER_BITS, (hash >> 20) as usize % DOORKEEPER_BITS] {
            let mask = 1u64 << (bit % 64);
            seen &= self.doorkeeper[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask != 0;
        }
        seen
    }

    fn clear_doorkeeper(&self) {
        for w in &self.doorkeeper {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Remember a token that passed every time-independent check, verified with key set `digest`.
    /// `now`/`leeway` drop it at once if it is already past its acceptance.
    pub fn insert(&self, token: &str, digest: &[u8; 32], verified: std::sync::Arc<VerifiedToken>) {
        if !self.enabled() {
            return;
        }
        let hash = self.hash(token);
        if !self.seen_before(hash) {
            return;
        }
        if (self.admitted.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(DOORKEEPER_ADMISSIONS) {
            self.clear_doorkeeper();
        }
        let entry = Entry { token: token.into(), verified, referenced: AtomicBool::new(false) };
        let size = entry.bytes();
        if size > self.max_bytes {
            return;
        }
        let mut shard = self.shard(hash).lock().unwrap_or_else(|p| p.into_inner());
        if shard.digest != *digest {
            // The key set changed: everything verified with an earlier one goes, in every shard
            // (lookups already ignore it; this frees the memory at once).
            drop(shard);
            for other in &self.shards {
                let mut o = other.lock().unwrap_or_else(|p| p.into_inner());
                if o.digest != *digest {
                    self.stats.entries.dec_by(o.map.len() as i64);
                    o.map.clear();
                    o.clock.clear();
                    o.bytes = 0;
                    o.digest = *digest;
                }
            }
            shard = self.shard(hash).lock().unwrap_or_else(|p| p.into_inner());
        }
        if let Some(old) = shard.map.get_mut(&hash) {
            // Same hash (the same token verified again, or a collision): replace in place; the
            // entry keeps its place on the clock.
            let old_size = old.bytes();
            *old = entry;
            shard.bytes = shard.bytes - old_size + size;
            return;
        }
        let now = crate::app::now_unix();
        while shard.map.len() >= self.max_entries || shard.bytes + size > self.max_bytes {
            let Some(victim) = shard.clock.pop_front() else { break };
            let keep = match shard.map.get(&victim) {
                // Used since the hand last passed, and not expired: second chance.
                Some(e) if e.referenced.swap(false, Ordering::Relaxed) && e.verified.exp >= now => true,
                Some(_) => false,
                None => continue, // stale hand position
            };
            if keep {
                shard.clock.push_back(victim);
            } else if let Some(e) = shard.map.remove(&victim) {
                shard.bytes -= e.bytes();
                self.stats.evictions.inc();
                self.stats.entries.dec();
            }
        }
        shard.bytes += size;
        shard.map.insert(hash, entry);
        self.stats.entries.inc();
        shard.clock.push_back(hash);
    }

    /// Entries held now (all shards).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accounted to entries now (all shards).
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn verified(sub: &str, exp: i64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            external: None,
            kid: "k".into(),
            sub: Some(sub.into()),
            jti: Some(format!("j-{sub}")),
            iat: Some(exp - 60),
            nbf: Some(exp - 60),
            exp,
            identity: vec![(HeaderName::from_static("x-auth-subject"), HeaderValue::from_str(sub).unwrap())],
            authz: Default::default(),
            session_key: None,
        })
    }

    fn token(payload: &str, sig: &str) -> String {
        format!("eyJhbGciOiJFUzI1NiJ9.{payload}.{sig}")
    }

    /// Insert twice (the doorkeeper admits on the second sighting).
    fn admit(c: &TokenCache, t: &str, d: &[u8; 32], v: Arc<VerifiedToken>) {
        c.insert(t, d, v.clone());
        c.insert(t, d, v);
    }

    const D: [u8; 32] = [1; 32];
    const EXP: i64 = 4_000_000_000;

    #[test]
    fn only_the_identical_token_hits() {
        let c = TokenCache::new(100, 1 << 20, CacheStats::default());
        let a = token("cGF5bG9hZEE", "c2lnbmF0dXJl");
        admit(&c, &a, &D, verified("alice", EXP));
        assert_eq!(c.get(&a, &D).unwrap().sub.as_deref(), Some("alice"));
        // Same signature segment and length (same hash bucket), different payload: never the
        // cached verification.
        let b = token("cGF5bG9hZEB", "c2lnbmF0dXJl");
        assert_eq!(a.len(), b.len());
        assert!(c.get(&b, &D).is_none());
        // A different token that collides replaces the entry; the first one is then a miss,
        // never a hit on the other's claims.
        admit(&c, &b, &D, verified("mallory", EXP));
        assert_eq!(c.get(&b, &D).unwrap().sub.as_deref(), Some("mallory"));
        assert!(c.get(&a, &D).is_none());
    }

    #[test]
    fn one_sighting_does_not_enter_and_a_key_set_change_empties_it() {
        let c = TokenCache::new(100, 1 << 20, CacheStats::default());
        let t = token("cA", "once");
        c.insert(&t, &D, verified("a", EXP));
        assert!(c.get(&t, &D).is_none(), "admitted on the second sighting only");
        c.insert(&t, &D, verified("a", EXP));
        assert!(c.get(&t, &D).is_some());
        // After a reload (another key-set digest) nothing verified before is used.
        let other = [2; 32];
        assert!(c.get(&t, &other).is_none());
        let u = token("cB", "after-reload");
        admit(&c, &u, &other, verified("b", EXP));
        assert!(c.get(&u, &other).is_some());
        assert!(c.get(&t, &D).is_none());
    }

    #[test]
    fn time_checks_run_on_every_hit() {
        let v = verified("a", 1000);
        assert_eq!(v.check_time(1000, 0), Ok(()));
        assert_eq!(v.check_time(1001, 0), Err(Reject::Expired));
        assert_eq!(v.check_time(1030, 30), Ok(()));
        assert_eq!(v.check_time(1031, 30), Err(Reject::Expired));
        assert_eq!(v.check_time(900, 0), Err(Reject::NotYetValid));
        assert_eq!(v.check_time(935, 5), Ok(()));
    }

    #[test]
    fn one_off_tokens_seldom_get_an_entry_and_reused_ones_always_do() {
        let stats = CacheStats::default();
        let c = TokenCache::new(100_000, 1 << 30, stats.clone());
        // 200,000 distinct tokens, each presented once (cold tokens, or a flood): every one is
        // a miss, and a false "seen before" would cost an entry (and an eviction once full).
        let n = 200_000;
        for i in 0..n {
            c.insert(&token("cA", &format!("one-off-{i}")), &D, verified("x", EXP));
        }
        let admitted = stats.entries.get() as u64 + stats.evictions.get();
        assert!(admitted * 100 < n * 4, "{admitted} of {n} one-off tokens admitted");
        // Meanwhile a token presented a second time gets in, after any number of one-off ones.
        for i in 0..50 {
            let t = token("cB", &format!("reused-{i}"));
            c.insert(&t, &D, verified("r", EXP));
            for j in 0..1000 {
                c.insert(&token("cC", &format!("between-{i}-{j}")), &D, verified("x", EXP));
            }
            c.insert(&t, &D, verified("r", EXP));
            assert!(c.get(&t, &D).is_some(), "reused token {i} not admitted");
        }
    }

    #[test]
    fn a_flood_of_distinct_tokens_stays_bounded_and_keeps_the_hot_ones() {
        let max_entries = 512;
        let max_bytes = 256 * 1024;
        let stats = CacheStats::default();
        let c = TokenCache::new(max_entries, max_bytes, stats.clone());
        let hot: Vec<String> = (0..16).map(|i| token("aG90", &format!("hot-{i}-{}", "s".repeat(40)))).collect();
        for t in &hot {
            admit(&c, t, &D, verified("hot", EXP));
        }
        for i in 0..50_000 {
            let t = token(&"p".repeat(200), &format!("flood-{i}-{}", "x".repeat(40)));
            // Each flood token presented twice: it passes the doorkeeper.
            admit(&c, &t, &D, verified("flood", EXP));
            if i % 64 == 0 {
                for h in &hot {
                    assert!(c.get(h, &D).is_some(), "hot token evicted at {i}");
                }
            }
            assert!(c.len() <= max_entries + SHARDS, "{} entries", c.len());
            assert!(c.bytes() <= max_bytes + SHARDS * 4096, "{} bytes", c.bytes());
        }
        let hot_hits = hot.iter().filter(|h| c.get(h, &D).is_some()).count();
        assert!(hot_hits >= 14, "hot tokens kept: {hot_hits}/16");
        assert!(stats.evictions.get() > 0);
        assert_eq!(stats.entries.get() as usize, c.len());
    }
}
