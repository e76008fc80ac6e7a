//! Per-route authorization by claims (`authorization.rules`, see `authrealm_contract::authz`).
//!
//! Compiled once at start:
//! * every distinct requirement (a scope, or a claim with its accepted values) becomes an
//!   *atom* with a bit number;
//! * each rule becomes its lower-cased path segments, a method bit set, the atoms it needs and
//!   its ready-made `WWW-Authenticate` challenge; rules are sorted most specific first, so the
//!   first that matches decides.
//!
//! Once per verified token (at verification, stored in the verified-token cache next to the
//! identity headers) [`Authz::grant`] evaluates every atom against the claims into a fixed-size
//! bit set, [`Granted`]. Per request, [`Authz::decide`] walks the raw request path without
//! copying it (segments split in place, escapes decoded and letters folded while comparing) —
//! and any override method or path the request carries, see [`Decision`] — and
//! [`Decision::check`] is a few word-wise ANDs: no allocation on the request path.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use authrealm_contract::authz::{Authorization, RuleMethod, method_bit, precedence, rule_segments};
use authrealm_contract::config::PathMatch;

use crate::paths::path_is_public_candidate;

/// Most distinct requirements across all rules (32 rules × (8 scopes + 4 claims) = 384 fit).
pub const MAX_ATOMS: usize = 512;
const WORDS: usize = MAX_ATOMS / 64;

/// The requirements one token satisfies, one bit per atom.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Granted([u64; WORDS]);

impl Granted {
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Whether every bit of `need` is in `self`.
    fn covers(&self, need: &Granted) -> bool {
        self.0.iter().zip(need.0.iter()).all(|(have, need)| need & !have == 0)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Atom {
    Scope(String),
    Claim { name: String, any_of: Vec<String> },
}

/// Why a valid token was refused on a route (metric reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// A required scope is missing (and maybe claim values too).
    InsufficientScope,
    /// Every required scope is there, a required claim value is not.
    InsufficientClaims,
}

impl Denied {
    pub fn label(self) -> &'static str {
        match self {
            Denied::InsufficientScope => "insufficient_scope",
            Denied::InsufficientClaims => "insufficient_claims",
        }
    }
}

/// The path cannot be matched safely: the app could resolve it to another route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmbiguousPath;

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    segments: Vec<Box<[u8]>>,
    exact: bool,
    /// 0: every method.
    methods: u16,
    need: Granted,
    /// The scope atoms of `need`.
    need_scopes: Granted,
    /// `Bearer realm="…", error="insufficient_scope", …` for this rule's 403.
    pub challenge: HeaderValue,
    /// Index in the configured list (for tests and logs).
    pub index: usize,
}

impl Rule {
    /// `Ok` when the token carries everything the rule requires.
    pub fn check(&self, granted: &Granted) -> Result<(), Denied> {
        if granted.covers(&self.need) {
            Ok(())
        } else if granted.covers(&self.need_scopes) {
            Err(Denied::InsufficientClaims)
        } else {
            Err(Denied::InsufficientScope)
        }
    }

    fn matches(&self, method: u16, path: &str) -> bool {
        if self.methods != 0 && self.methods & method == 0 {
            return false;
        }
        let mut segs = request_segments(path);
        for want in &self.segments {
            match segs.next() {
                Some(seg) if segment_eq(seg, want) => {}
                _ => return false,
            }
        }
        !self.exact || segs.next().is_none()
    }
}

/// The compiled rules of a realm.
#[derive(Debug, Default)]
pub struct Authz {
    rules: Vec<Rule>,
    atoms: Vec<Atom>,
}

impl Authz {
    /// Compile validated rules (`SidecarConfig::validate` has run). `realm` is a DNS name and
    /// scopes are scope tokens, so the challenge is a valid header value.
    pub fn new(cfg: &Authorization, realm: &str) -> Authz {
        let mut atoms: Vec<Atom> = Vec::new();
        let mut atom = |a: Atom| match atoms.iter().position(|x| *x == a) {
            Some(i) => i,
            None => {
                atoms.push(a);
                atoms.len() - 1
            }
        };
        let mut order: Vec<usize> = (0..cfg.rules.len()).collect();
        order.sort_by_key(|&i| precedence(&cfg.rules[i]));
        let mut rules = Vec::with_capacity(order.len());
        for i in order {
            let r = &cfg.rules[i];
            let (mut need, mut need_scopes) = (Granted::default(), Granted::default());
            for s in &r.require.scopes {
                let bit = atom(Atom::Scope(s.clone()));
                need.set(bit);
                need_scopes.set(bit);
            }
            for c in &r.require.claims {
                let mut any_of = c.any_of.clone();
                any_of.sort();
                need.set(atom(Atom::Claim { name: c.name.clone(), any_of }));
            }
            let mut challenge = format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\"");
            if r.require.claims.is_empty() {
                challenge.push_str(", error_description=\"the token lacks a scope this route requires\"");
            } else {
                challenge
                    .push_str(", error_description=\"the token lacks a scope or claim value this route requires\"");
            }
            if !r.require.scopes.is_empty() {
                challenge.push_str(&format!(", scope=\"{}\"", r.require.scopes.join(" ")));
            }
            rules.push(Rule {
                segments: rule_segments(&r.path).into_iter().map(|s| s.into_bytes().into_boxed_slice()).collect(),
                exact: r.path_match == PathMatch::Exact,
                methods: r.methods.iter().fold(0, |m, x| m | x.bit()),
                need,
                need_scopes,
                challenge: HeaderValue::from_str(&challenge).expect("realm and scopes are header-safe"),
                index: i,
            });
        }
        assert!(atoms.len() <= MAX_ATOMS, "validated limits keep requirements under {MAX_ATOMS}");
        Authz { rules, atoms }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when some rule needs a scope or a claim value, so [`Authz::grant`] reads the claims
    /// (without rules, every token is granted nothing and needs nothing).
    pub fn reads_claims(&self) -> bool {
        !self.atoms.is_empty()
    }

    /// The requirements `claims` satisfy (computed once per verified token).
    pub fn grant(&self, claims: &Map<String, Value>) -> Granted {
        let mut g = Granted::default();
        for (i, a) in self.atoms.iter().enumerate() {
            let ok = match a {
                Atom::Scope(s) => has_scope(claims.get("scope"), s) || has_scope(claims.get("scp"), s),
                Atom::Claim { name, any_of } => match claims.get(name) {
                    Some(Value::String(v)) => any_of.binary_search(v).is_ok(),
                    Some(Value::Array(vs)) => vs
                        .iter()
                        .any(|v| v.as_str().is_some_and(|v| any_of.binary_search_by(|x| x.as_str().cmp(v)).is_ok())),
                    _ => false,
                },
            };
            if ok {
                g.set(i);
            }
        }
        g
    }

    /// The rule that decides `method path`, if any. With rules configured, a path the app could
    /// resolve to another route is refused instead (`400`).
    pub fn route(&self, method: &str, path: &str) -> Result<Option<&Rule>, AmbiguousPath> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        if path_is_ambiguous(path) {
            return Err(AmbiguousPath);
        }
        let bit = method_bit(method);
        Ok(self.rules.iter().find(|r| r.matches(bit, path)))
    }
}

/// Headers some frameworks take the method from instead of the request line.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];
/// Headers some frameworks (IIS URL rewrite, Symfony, Zend) route by instead of the request path.
const PATH_OVERRIDES: [HeaderName; 2] =
    [HeaderName::from_static("x-original-url"), HeaderName::from_static("x-rewrite-url")];

/// The rules one request must satisfy: the one deciding its method and path and, since the app
/// may route by them instead, those deciding an override method (`X-HTTP-Method-Override`,
/// `X-HTTP-Method`, `X-Method-Override`, a `_method` query parameter) or override path
/// (`X-Original-URL`, `X-Rewrite-URL`) it carries, in every combination.
#[derive(Debug, Default)]
pub struct Decision<'a> {
    rules: [Option<&'a Rule>; 4],
}

impl<'a> Decision<'a> {
    /// `Ok` when the token satisfies every rule; else the first rule it fails and why.
    pub fn check(&self, granted: &Granted) -> Result<(), (&'a Rule, Denied)> {
        for rule in self.rules.iter().flatten() {
            rule.check(granted).map_err(|d| (*rule, d))?;
        }
        Ok(())
    }

    /// Whether no rule applies (any valid token passes).
    pub fn is_empty(&self) -> bool {
        self.rules.iter().all(Option::is_none)
    }
}

impl Authz {
    /// The rules `method path` (and its overrides, see [`Decision`]) must satisfy. With rules
    /// configured, an ambiguous path — or an override the sidecar cannot read as one method or
    /// one path — is refused instead (`400`).
    pub fn decide(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Decision<'_>, AmbiguousPath> {
        let mut d = Decision::default();
        if self.rules.is_empty() {
            return Ok(d);
        }
        if path_is_ambiguous(path) {
            return Err(AmbiguousPath);
        }
        let other_method = override_method(query, headers)?;
        let other_path = override_path(headers)?;
        let method = method_bit(method);
        let find = |m: u16, p: &str| self.rules.iter().find(|r| r.matches(m, p));
        d.rules[0] = find(method, path);
        if let Some(m) = other_method {
            d.rules[1] = find(m, path);
        }
        if let Some(p) = other_path {
            d.rules[2] = find(method, p);
            if let Some(m) = other_method {
                d.rules[3] = find(m, p);
            }
        }
        Ok(d)
    }
}

/// Whether a request carries a method or path override some frameworks route by (such a
/// request never counts as public: the app may serve it from another route).
pub fn has_override(query: Option<&str>, headers: &HeaderMap) -> bool {
    METHOD_OVERRIDES.iter().chain(PATH_OVERRIDES.iter()).any(|h| headers.contains_key(h))
        || query.is_some_and(|q| {
            q.split('&').any(|pair| {
                let k = pair.split_once('=').map_or(pair, |(k, _)| k);
                let mut kb = [0u8; 16];
                form_decode(k.as_bytes(), &mut kb) == Some(b"_method")
            })
        })
}

/// The method bit of a method name in any case (overrides are read case-insensitively by the
/// frameworks that honour them); 0 for other names.
fn method_bit_ignore_case(name: &[u8]) -> u16 {
    const ALL: [RuleMethod; 8] = [
        RuleMethod::Get,
        RuleMethod::Post,
        RuleMethod::Put,
        RuleMethod::Patch,
        RuleMethod::Delete,
        RuleMethod::Options,
        RuleMethod::Connect,
        RuleMethod::Trace,
    ];
    if name.eq_ignore_ascii_case(b"HEAD") {
        return RuleMethod::Get.bit();
    }
    ALL.iter().find(|m| name.eq_ignore_ascii_case(m.as_str().as_bytes())).map_or(0, |m| m.bit())
}

/// Decode a form-encoded query component (`%XX`, `+` as space) into `buf`; `None` when it does
/// not fit or an escape is broken.
fn form_decode<'b>(raw: &[u8], buf: &'b mut [u8; 16]) -> Option<&'b [u8]> {
    let (mut i, mut n) = (0, 0);
    while i < raw.len() {
        let c = match raw[i] {
            b'%' => {
                let c = hex(*raw.get(i + 1)?)? * 16 + hex(*raw.get(i + 2)?)?;
                i += 3;
                c
            }
            b'+' => {
                i += 1;
                b' '
            }
            c => {
                i += 1;
                c
            }
        };
        *buf.get_mut(n)? = c;
        n += 1;
    }
    Some(&buf[..n])
}

/// The one override method a request carries, if any; several that disagree are ambiguous.
fn override_method(query: Option<&str>, headers: &HeaderMap) -> Result<Option<u16>, AmbiguousPath> {
    let mut found: Option<u16> = None;
    let mut note = |bit: u16| match found {
        Some(b) if b != bit => Err(AmbiguousPath),
        _ => {
            found = Some(bit);
            Ok(())
        }
    };
    for name in &METHOD_OVERRIDES {
        for v in headers.get_all(name) {
            note(method_bit_ignore_case(v.as_bytes().trim_ascii()))?;
        }
    }
    if let Some(q) = query {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let mut kb = [0u8; 16];
            if form_decode(k.as_bytes(), &mut kb) != Some(b"_method") {
                continue;
            }
            let mut vb = [0u8; 16];
            let bit = form_decode(v.as_bytes(), &mut vb).map_or(0, |v| method_bit_ignore_case(v.trim_ascii()));
            note(bit)?;
        }
    }
    Ok(found)
}

/// The one override path a request carries (up to any `?`), if any. Several that disagree, one
/// that is not an absolute path, or one that is ambiguous itself, are refused.
fn override_path(headers: &HeaderMap) -> Result<Option<&str>, AmbiguousPath> {
    let mut found: Option<&str> = None;
    for name in &PATH_OVERRIDES {
        for v in headers.get_all(name) {
            let v = v.to_str().map_err(|_| AmbiguousPath)?.trim();
            let p = v.split(['?', '#']).next().unwrap_or("");
            if !p.starts_with('/') || path_is_ambiguous(p) || found.is_some_and(|f| f != p) {
                return Err(AmbiguousPath);
            }
            found = Some(p);
        }
    }
    Ok(found)
}

/// `scope` / `scp`: a space-separated string or an array of strings.
fn has_scope(v: Option<&Value>, scope: &str) -> bool {
    match v {
        Some(Value::String(s)) => s.split(' ').any(|x| x == scope),
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(scope)),
        _ => false,
    }
}

/// Paths refused when rules exist: those never treated as public (dot segments, encoded `.`,
/// `/`, `\`, `;`, backslashes, `..;`), plus an encoded `%` (an app that decodes twice would see
/// a new escape), NUL, the overlong-UTF-8 lead bytes 0xC0/0xC1, and broken escapes.
pub fn path_is_ambiguous(path: &str) -> bool {
    if !path_is_public_candidate(path) {
        return true;
    }
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            match (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
                // `%25` decodes to a new escape for an app that decodes twice; NUL truncates the
                // path in C-based servers; 0xC0/0xC1 start overlong UTF-8 (`%c0%ae` as `.`).
                (Some(h), Some(l)) if !matches!(h * 16 + l, b'%' | 0 | 0xc0 | 0xc1) => i += 3,
                _ => return true,
            }
        } else {
            i += 1;
        }
    }
    false
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Segments of a request path as an app resolves them: empty segments skipped, `;parameters`
/// dropped (servlet containers do).
fn request_segments(path: &str) -> impl Iterator<Item = &[u8]> {
    path.as_bytes()
        .split(|&b| b == b'/')
        .map(|s| match s.iter().position(|&b| b == b';') {
            Some(i) => &s[..i],
            None => s,
        })
        .filter(|s| !s.is_empty())
}

/// A raw request segment (escapes valid, see [`path_is_ambiguous`]) equals a lower-case rule
/// segment once decoded and ASCII-lower-cased.
fn segment_eq(raw: &[u8], want: &[u8]) -> bool {
    let mut i = 0;
    for &w in want {
        let Some(&c) = raw.get(i) else { return false };
        let c = if c == b'%' {
            let (Some(h), Some(l)) = (raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex))
            else {
                return false;
            };
            i += 3;
            h * 16 + l
        } else {
            i += 1;
            c
        };
        if c.to_ascii_lowercase() != w {
            return false;
        }
    }
    i == raw.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::authz::{AuthorizationRule, ClaimRequirement, Requirements, RuleMethod};
    use serde_json::json;

    fn rule(path: &str, m: PathMatch, methods: &[RuleMethod], scopes: &[&str]) -> AuthorizationRule {
        AuthorizationRule {
            path: path.into(),
            path_match: m,
            methods: methods.to_vec(),
            require: Requirements { scopes: scopes.iter().map(|s| s.to_string()).collect(), claims: vec![] },
        }
    }

    fn claims_rule(path: &str, claims: &[(&str, &[&str])]) -> AuthorizationRule {
        AuthorizationRule {
            path: path.into(),
            path_match: PathMatch::Prefix,
            methods: vec![],
            require: Requirements {
                scopes: vec![],
                claims: claims
                    .iter()
                    .map(|(n, v)| ClaimRequirement {
                        name: n.to_string(),
                        any_of: v.iter().map(|s| s.to_string()).collect(),
                    })
                    .collect(),
            },
        }
    }

    fn compile(rules: Vec<AuthorizationRule>) -> Authz {
        let cfg = Authorization { rules };
        cfg.validate(&[]).unwrap();
        Authz::new(&cfg, "demo")
    }

    /// Index (in the configured list) of the rule deciding `method path`.
    fn decides(a: &Authz, method: &str, path: &str) -> Result<Option<usize>, AmbiguousPath> {
        a.route(method, path).map(|r| r.map(|r| r.index))
    }

    #[test]
    fn matching_and_precedence_table() {
        use PathMatch::*;
        use RuleMethod::*;
        let a = compile(vec![
            rule("/", Prefix, &[], &["any"]),                 // 0
            rule("/admin", Prefix, &[], &["admin"]),          // 1
            rule("/admin", Prefix, &[Delete], &["admin:rm"]), // 2
            rule("/admin/users", Prefix, &[], &["users"]),    // 3
            rule("/admin", Exact, &[], &["admin:home"]),      // 4
            rule("/items", Exact, &[Get], &["read"]),         // 5
            rule("/items", Exact, &[Post, Put], &["write"]),  // 6
        ]);
        let table: &[(&str, &str, Option<usize>)] = &[
            ("GET", "/", Some(0)),
            ("GET", "/x", Some(0)),
            ("GET", "/administrator", Some(0)),
            ("GET", "/admin", Some(4)),
            ("DELETE", "/admin", Some(4)),
            ("GET", "/admin/", Some(4)),
            ("GET", "//admin//", Some(4)),
            ("GET", "/ADMIN", Some(4)),
            ("GET", "/%61dmin", Some(4)),
            ("GET", "/%41DMIN", Some(4)),
            ("GET", "/admin;jsessionid=1", Some(4)),
            ("GET", "/admin/x", Some(1)),
            ("POST", "/admin/x", Some(1)),
            ("DELETE", "/admin/x", Some(2)),
            ("GET", "/Admin/Users", Some(3)),
            ("DELETE", "/admin/users/7", Some(3)),
            ("GET", "/admin/usersx", Some(1)),
            ("GET", "/items", Some(5)),
            ("HEAD", "/items", Some(5)),
            ("POST", "/items", Some(6)),
            ("PUT", "/items/", Some(6)),
            ("DELETE", "/items", Some(0)),
            ("PROPFIND", "/items", Some(0)),
            ("get", "/items", Some(0)),
            ("GET", "/items/1", Some(0)),
        ];
        for (m, p, want) in table {
            assert_eq!(decides(&a, m, p), Ok(*want), "{m} {p}");
        }
    }

    #[test]
    fn tricks_never_reach_a_less_protected_rule() {
        use PathMatch::*;
        let a = compile(vec![
            rule("/", Prefix, &[], &["user"]),
            rule("/public", Prefix, &[], &["user"]),
            rule("/admin", Exact, &[], &["admin"]),
        ]);
        // Either the admin rule decides, or the request is refused outright.
        for p in
            ["/admin", "/admin/", "//admin", "/ADMIN", "/%61%64%6d%69%6e", "/admin;x=1", "/;x/admin", "///admin///"]
        {
            assert_eq!(decides(&a, "GET", p), Ok(Some(2)), "{p}");
        }
        for p in [
            "/public/../admin",
            "/public/./../admin",
            "/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/public/.%2e/admin",
            "/admin%2F..",
            "/admin%2f",
            "/public%2F..%2Fadmin",
            "/public\\..\\admin",
            "/public%5c..%5cadmin",
            "/public/..;/admin",
            "/public/.;x/../admin",
            "/admin%3b",
            "/public/%252e%252e/admin",
            "/%25",
            "/admin%",
            "/admin%4",
            "/admin%zz",
            "/admin%00",
            "/admin%00.png",
            "/%c0%ae%c0%ae/admin",
            "/%C1%9C",
            "/admin/..",
            "/admin/.",
        ] {
            assert_eq!(decides(&a, "GET", p), Err(AmbiguousPath), "{p}");
        }
        // Without rules nothing changes: every path is passed on as before.
        assert_eq!(compile(vec![]).route("GET", "/public/../admin").map(|r| r.is_none()), Ok(true));
    }

    #[test]
    fn method_and_path_overrides_must_be_satisfied_too() {
        use PathMatch::*;
        use RuleMethod::*;
        let a = compile(vec![
            rule("/", Prefix, &[], &["user"]),         // 0
            rule("/items", Prefix, &[Get], &["read"]), // 1
            rule("/items", Prefix, &[], &["write"]),   // 2
            rule("/admin", Prefix, &[], &["admin"]),   // 3
        ]);
        let decide = |method: &str, target: &str, headers: &[(&str, &str)]| {
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (target, None),
            };
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            a.decide(method, path, query, &h).map(|d| {
                let mut v: Vec<usize> = d.rules.iter().flatten().map(|r| r.index).collect();
                v.sort_unstable();
                v.dedup();
                v
            })
        };
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Result<&'a [usize], AmbiguousPath>);
        let table: &[Case<'_>] = &[
            ("GET", "/items", &[], Ok(&[1])),
            ("GET", "/items?x=1&method=DELETE", &[], Ok(&[1])),
            ("POST", "/items", &[("x-http-method-override", "GET")], Ok(&[1, 2])),
            ("GET", "/items", &[("X-HTTP-Method-Override", " delete ")], Ok(&[1, 2])),
            ("GET", "/items", &[("x-http-method", "PUT")], Ok(&[1, 2])),
            ("GET", "/items", &[("x-method-override", "PATCH")], Ok(&[1, 2])),
            ("GET", "/items?_method=delete", &[], Ok(&[1, 2])),
            ("GET", "/items?a=1&%5Fmethod=DEL%45TE", &[], Ok(&[1, 2])),
            ("GET", "/items?_method=DELETE", &[("x-http-method-override", "delete")], Ok(&[1, 2])),
            ("GET", "/items?_method=DELETE", &[("x-http-method-override", "PUT")], Err(AmbiguousPath)),
            ("GET", "/items", &[("x-http-method-override", "PUT"), ("x-http-method", "GET")], Err(AmbiguousPath)),
            ("GET", "/", &[("x-original-url", "/admin")], Ok(&[0, 3])),
            ("GET", "/", &[("x-rewrite-url", "/ADMIN/x?y=1")], Ok(&[0, 3])),
            ("GET", "/", &[("x-original-url", "/items"), ("x-http-method-override", "DELETE")], Ok(&[0, 1, 2])),
            ("GET", "/", &[("x-original-url", "/admin"), ("x-rewrite-url", "/admin")], Ok(&[0, 3])),
            ("GET", "/", &[("x-original-url", "/admin"), ("x-rewrite-url", "/x")], Err(AmbiguousPath)),
            ("GET", "/", &[("x-original-url", "admin")], Err(AmbiguousPath)),
            ("GET", "/", &[("x-original-url", "/x/../admin")], Err(AmbiguousPath)),
            ("GET", "/", &[("x-original-url", "/%2e%2e/admin")], Err(AmbiguousPath)),
        ];
        for (method, target, headers, want) in table {
            assert_eq!(
                decide(method, target, headers).as_deref().map_err(|e| *e),
                *want,
                "{method} {target} {headers:?}"
            );
        }
        // Such requests never count as public either.
        let mut h = HeaderMap::new();
        assert!(!has_override(Some("a=1&method=x&_methods=y"), &h));
        assert!(has_override(Some("a=1&_method=DELETE"), &h));
        assert!(has_override(Some("%5fmethod"), &h));
        h.insert("x-rewrite-url", HeaderValue::from_static("/x"));
        assert!(has_override(None, &h));
        // Without rules nothing is read.
        let none = compile(vec![]);
        let mut h = HeaderMap::new();
        h.insert("x-original-url", HeaderValue::from_static("/x/../admin"));
        assert!(none.decide("GET", "/", None, &h).unwrap().is_empty());
    }

    #[test]
    fn scope_scp_array_and_exact_claim_semantics() {
        let a = compile(vec![
            rule("/s", PathMatch::Prefix, &[], &["read", "write"]),
            claims_rule("/r", &[("roles", &["admin", "ops"])]),
            claims_rule("/t", &[("tenant", &["acme"]), ("groups", &["eng"])]),
            AuthorizationRule {
                path: "/both".into(),
                path_match: PathMatch::Prefix,
                methods: vec![],
                require: Requirements {
                    scopes: vec!["read".into()],
                    claims: vec![ClaimRequirement { name: "roles".into(), any_of: vec!["admin".into()] }],
                },
            },
        ]);
        let check = |path: &str, claims: Value| {
            let g = a.grant(claims.as_object().unwrap());
            a.route("GET", path).unwrap().unwrap().check(&g)
        };
        use Denied::*;
        let cases: Vec<(&str, Value, Result<(), Denied>)> = vec![
            ("/s", json!({"scope": "read write"}), Ok(())),
            ("/s", json!({"scope": "write  extra read"}), Ok(())),
            ("/s", json!({"scope": "read"}), Err(InsufficientScope)),
            ("/s", json!({"scope": "readwrite"}), Err(InsufficientScope)),
            ("/s", json!({"scope": "Read Write"}), Err(InsufficientScope)),
            ("/s", json!({"scp": ["read", "write"]}), Ok(())),
            ("/s", json!({"scp": "read write"}), Ok(())),
            ("/s", json!({"scope": "read", "scp": ["write"]}), Ok(())),
            ("/s", json!({"scp": [["read"], "write"]}), Err(InsufficientScope)),
            ("/s", json!({"scope": 1}), Err(InsufficientScope)),
            ("/s", json!({}), Err(InsufficientScope)),
            ("/r", json!({"roles": ["viewer", "ops"]}), Ok(())),
            ("/r", json!({"roles": "admin"}), Ok(())),
            ("/r", json!({"roles": ["Admin"]}), Err(InsufficientClaims)),
            ("/r", json!({"roles": "admin ops"}), Err(InsufficientClaims)),
            ("/r", json!({"roles": [{"admin": true}]}), Err(InsufficientClaims)),
            ("/r", json!({"roles": {"admin": true}}), Err(InsufficientClaims)),
            ("/r", json!({"roles": true}), Err(InsufficientClaims)),
            ("/r", json!({"scope": "admin"}), Err(InsufficientClaims)),
            ("/t", json!({"tenant": "acme", "groups": ["eng", "x"]}), Ok(())),
            ("/t", json!({"tenant": "acme", "groups": ["x"]}), Err(InsufficientClaims)),
            ("/t", json!({"tenant": ["other"], "groups": ["eng"]}), Err(InsufficientClaims)),
            ("/both", json!({"scope": "read", "roles": ["admin"]}), Ok(())),
            ("/both", json!({"scope": "read"}), Err(InsufficientClaims)),
            ("/both", json!({"roles": ["admin"]}), Err(InsufficientScope)),
        ];
        for (path, claims, want) in cases {
            assert_eq!(check(path, claims.clone()), want, "{path} {claims}");
        }
    }

    #[test]
    fn challenges_name_the_scopes_and_nothing_from_the_token() {
        let a = compile(vec![
            rule("/s", PathMatch::Prefix, &[], &["read", "items:write"]),
            claims_rule("/r", &[("roles", &["admin"])]),
        ]);
        let s = a.route("GET", "/s").unwrap().unwrap();
        assert_eq!(
            s.challenge,
            "Bearer realm=\"demo\", error=\"insufficient_scope\", error_description=\"the token lacks a scope this route requires\", scope=\"read items:write\""
        );
        let r = a.route("GET", "/r").unwrap().unwrap();
        assert!(!r.challenge.to_str().unwrap().contains("scope=\""), "{:?}", r.challenge);
        assert!(!r.challenge.to_str().unwrap().contains("admin"), "the accepted values are not disclosed");
    }

    #[test]
    fn shared_requirements_share_an_atom() {
        let a = compile(vec![
            rule("/a", PathMatch::Prefix, &[], &["x", "y"]),
            rule("/b", PathMatch::Prefix, &[], &["y"]),
            claims_rule("/c", &[("roles", &["b", "a"])]),
            claims_rule("/d", &[("roles", &["a", "b"])]),
        ]);
        assert_eq!(a.atoms.len(), 3);
    }

    #[test]
    fn the_limits_fit_the_bit_set() {
        // 32 rules with 8 distinct scopes and 4 distinct claims each: 384 atoms.
        let rules: Vec<AuthorizationRule> = (0..32)
            .map(|i| AuthorizationRule {
                path: format!("/r{i}"),
                path_match: PathMatch::Prefix,
                methods: vec![],
                require: Requirements {
                    scopes: (0..8).map(|j| format!("s{i}-{j}")).collect(),
                    claims: (0..4)
                        .map(|j| ClaimRequirement { name: format!("c{i}-{j}"), any_of: vec!["v".into()] })
                        .collect(),
                },
            })
            .collect();
        let a = compile(rules);
        assert_eq!(a.atoms.len(), 384);
        let mut claims = Map::new();
        claims.insert("scope".into(), json!((0..8).map(|j| format!("s31-{j}")).collect::<Vec<_>>().join(" ")));
        for j in 0..4 {
            claims.insert(format!("c31-{j}"), json!("v"));
        }
        let g = a.grant(&claims);
        assert_eq!(a.route("GET", "/r31/x").unwrap().unwrap().check(&g), Ok(()));
        assert_eq!(a.route("GET", "/r30").unwrap().unwrap().check(&g), Err(Denied::InsufficientScope));
    }
}
