//! The Redis key layout of a realm's session records — the only place key names are built. The
//! sidecar ([`KeyLayout`] in every command it sends), the operator's session purge
//! ([`KeyLayout::purge_pattern`]) and the tests all use it.
//!
//! `P` is the realm's key prefix (default `ar:`), `R` the realm name, `S` the subject and
//! `J` the jti, both base64url-encoded so no user-controlled byte can break a hash tag or
//! a key boundary. `{R:S}` is the hash tag: all of one subject's records share a slot
//! (so one Lua script can update them atomically), while different subjects spread over
//! all 16384 slots.
//!
//! | key                 | type   | value            | TTL                      | modes          |
//! |---------------------|--------|------------------|--------------------------|----------------|
//! | `P{R:S}:t:J`        | string | exp (unix s)     | token's remaining life   | single, multi  |
//! | `P{R:S}:idx`        | zset   | jti → exp        | latest exp of the subject| single, multi  |
//! | `P{R:S}:d:J`        | string | `1`              | `record_ttl_ms` of exp | denylist       |
//! | `P{R:S}:cut`        | string | unix s (only grows) | `record_ttl_ms` of the latest exp a token issued by then can have | denylist |
//! | `P{R:j:J}:loc`      | string | `exp sub`        | `record_ttl_ms` of exp | all but stateless |
//!
//! (`record_ttl_ms` is in the sidecar's `session` module.) The session cache's heartbeat keys,
//! `P{R;hb:I:N}:SEQ` (`I` a random id per sidecar process), live for a few seconds and are never
//! read; they are outside the realm's purge pattern and expire on their own.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Builds key names. Pure; unit-tested.
#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    realm: String,
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s.as_bytes())
}

impl KeyLayout {
    pub fn new(prefix: &str, realm: &str) -> Self {
        KeyLayout { prefix: prefix.into(), realm: realm.into() }
    }
    /// `P{R:S}` — the common part of a subject's keys.
    pub fn subject_base(&self, sub: &str) -> String {
        format!("{}{{{}:{}}}", self.prefix, self.realm, b64(sub))
    }
    pub fn token(&self, sub: &str, jti: &str) -> String {
        format!("{}:t:{}", self.subject_base(sub), b64(jti))
    }
    pub fn token_prefix(&self, sub: &str) -> String {
        format!("{}:t:", self.subject_base(sub))
    }
    pub fn index(&self, sub: &str) -> String {
        format!("{}:idx", self.subject_base(sub))
    }
    pub fn deny(&self, sub: &str, jti: &str) -> String {
        format!("{}:d:{}", self.subject_base(sub), b64(jti))
    }
    pub fn cutoff(&self, sub: &str) -> String {
        format!("{}:cut", self.subject_base(sub))
    }
    pub fn locator(&self, jti: &str) -> String {
        format!("{}{{{}:j:{}}}:loc", self.prefix, self.realm, b64(jti))
    }
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }
    /// `P{R:` — the start of every key of the realm's subjects and jti locators (what the session
    /// cache's tracking connections subscribe to).
    pub fn realm_prefix(&self) -> String {
        format!("{}{{{}:", self.prefix, self.realm)
    }
    /// `R;hb:I:` — hash tags of the session cache's heartbeat keys of instance `I`. `;` never
    /// occurs in a realm name or in base64url, so no subject's tag can be one of these.
    pub fn heartbeat_tag_prefix(&self, instance: &str) -> String {
        format!("{};hb:{instance}:", self.realm)
    }
    /// `P{R;hb:I:` — outside [`KeyLayout::realm_prefix`] and sorting after it (`;` > `:`).
    pub fn heartbeat_prefix(&self, instance: &str) -> String {
        format!("{}{{{}", self.prefix, self.heartbeat_tag_prefix(instance))
    }
    /// The jti as stored in the index (base64url).
    pub fn jti_member(jti: &str) -> String {
        b64(jti)
    }
}

/// CRC16/XMODEM as Redis Cluster uses it.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The cluster slot of a key (honouring the first non-empty `{…}` hash tag).
pub fn key_slot(key: &str) -> u16 {
    slot_of(key.as_bytes())
}

/// [`key_slot`] of a key given as bytes.
pub fn slot_of(bytes: &[u8]) -> u16 {
    if let Some(open) = bytes.iter().position(|&b| b == b'{')
        && let Some(len) = bytes[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return crc16(&bytes[open + 1..open + 1 + len]) % 16384;
    }
    crc16(bytes) % 16384
}

/// Escapes a string for use as a literal in a Redis glob pattern (`SCAN … MATCH`).
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

impl KeyLayout {
    /// The `SCAN` pattern matching every subject key and jti locator of the realm (`P{R:*`):
    /// what the operator deletes when a realm with `purgeOnDelete` goes.
    pub fn purge_pattern(&self) -> String {
        format!("{}{{{}:*", glob_escape(&self.prefix), glob_escape(&self.realm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("{user1000}.followers"));
        assert_eq!(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot("{}x"), crc16(b"{}x") % 16384);
    }

    #[test]
    fn a_subjects_records_share_a_slot() {
        let l = KeyLayout::new("ar:", "demo");
        let sub = "alice";
        let slot = key_slot(&l.token(sub, "j1"));
        for k in [l.token(sub, "j2"), l.index(sub), l.deny(sub, "j1"), l.cutoff(sub)] {
            assert_eq!(key_slot(&k), slot, "{k}");
        }
    }

    #[test]
    fn hostile_subjects_cannot_escape_their_hash_tag() {
        let l = KeyLayout::new("ar:", "demo");
        // A subject that looks like another subject's key must not share its keys.
        let a = l.token("a", "j");
        let b = l.token("a}:t:j", "x");
        assert_ne!(a, b);
        for sub in ["}", "{", "a}b{c", "\u{1F600}", "a:b", ""] {
            let k = l.token(sub, "j");
            assert_eq!(k.matches('{').count(), 1, "{k}");
            assert_eq!(k.matches('}').count(), 1, "{k}");
        }
    }

    #[test]
    fn subjects_spread_over_all_slot_ranges() {
        let l = KeyLayout::new("ar:", "demo");
        let mut thirds = [0u32; 3];
        for i in 0..3000 {
            let slot = key_slot(&l.index(&format!("user-{i}")));
            thirds[(slot as usize * 3) / 16384] += 1;
        }
        for t in thirds {
            assert!(t > 800, "{thirds:?}");
        }
    }

    /// A minimal Redis glob matcher (`*`, `?`, `\\x`; enough for the purge pattern).
    fn glob_match(pattern: &str, key: &str) -> bool {
        fn go(p: &[char], k: &[char]) -> bool {
            match p.first() {
                None => k.is_empty(),
                Some('*') => (0..=k.len()).any(|i| go(&p[1..], &k[i..])),
                Some('?') => !k.is_empty() && go(&p[1..], &k[1..]),
                Some('\\') => p.len() > 1 && k.first() == Some(&p[1]) && go(&p[2..], &k[1..]),
                Some(c) => k.first() == Some(c) && go(&p[1..], &k[1..]),
            }
        }
        go(&pattern.chars().collect::<Vec<_>>(), &key.chars().collect::<Vec<_>>())
    }

    #[test]
    fn the_purge_pattern_matches_every_key_of_the_realm_and_no_other_realms() {
        let l = KeyLayout::new("ar:prod:", "shop");
        let pattern = l.purge_pattern();
        assert_eq!(pattern, "ar:prod:{shop:*");
        for sub in ["alice", "}", "a*b"] {
            for k in [l.token(sub, "j"), l.index(sub), l.deny(sub, "j"), l.cutoff(sub), l.locator("j")] {
                assert!(glob_match(&pattern, &k), "{k}");
            }
        }
        for other in [
            KeyLayout::new("ar:prod:", "shop-2").token("alice", "j"),
            KeyLayout::new("ar:prod:", "sho").index("alice"),
            KeyLayout::new("ar:test:", "shop").token("alice", "j"),
        ] {
            assert!(!glob_match(&pattern, &other), "{other}");
        }
        // Heartbeat keys are outside it.
        assert!(!glob_match(&pattern, &format!("{}1}}:7", l.heartbeat_prefix("i"))));
    }

    #[test]
    fn the_purge_pattern_escapes_glob_characters() {
        assert_eq!(KeyLayout::new("a*[x]?", "r").purge_pattern(), r"a\*\[x\]\?{r:*");
        let l = KeyLayout::new("a*", "r");
        assert!(!glob_match(&l.purge_pattern(), &KeyLayout::new("ab", "r").token("s", "j")));
    }
}
