//! Per-route authorization by claims: `authorization.rules` in `sidecar.json`, and the same
//! type under `spec.authorization` of the AuthRealm.
//!
//! A rule names a route (`path`, `match`, `methods`, as public routes do) and what a valid
//! token must carry there (`require`: scopes and claim values, all of them). For each request
//! the single most specific matching rule decides (see [`precedence`]); a request that matches
//! no rule needs only a valid token. A valid token that lacks a requirement gets `403` with
//! `WWW-Authenticate: Bearer error="insufficient_scope"` and never reaches the app.
//!
//! Request paths are compared segment by segment after the sidecar's normalisation: empty
//! segments are skipped (`//admin/` is `/admin`), `;parameters` are dropped from each segment,
//! percent-escapes are decoded and ASCII letters compared case-insensitively. Paths that an app
//! could resolve to another route (dot segments, encoded `.`, `/`, `\`, `;` or `%`, backslashes,
//! broken escapes) are refused with `400` whenever the realm has rules. A request that carries a
//! method or path override some frameworks route by (`X-HTTP-Method-Override`, `_method`,
//! `X-Original-URL`, …) must satisfy the rules for those too. Rule paths are therefore
//! plain: no `%`, `;`, `\`, empty or dot segments, and no trailing `/` (except the root `/`).
//!
//! [`Authorization::validate`] refuses what the CRD's CEL rules refuse (so a hand-written
//! `sidecar.json` cannot bypass them): ambiguous rules (same path and match, overlapping
//! methods), empty requirements, rules on a path a public route already makes public, and
//! anything beyond the size bounds below.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::{PathMatch, PublicRoute};

/// Most rules per realm.
pub const MAX_RULES: usize = 32;
/// Most scopes one rule may require.
pub const MAX_SCOPES: usize = 8;
/// Most claim requirements in one rule.
pub const MAX_CLAIMS: usize = 4;
/// Most accepted values in one claim requirement.
pub const MAX_VALUES: usize = 16;
/// Longest rule path.
pub const MAX_PATH: usize = 256;
/// Longest scope, claim name or claim value.
pub const MAX_VALUE_BYTES: usize = 256;

/// Allowed rule-path characters (RFC 3986 `pchar` without `%` and `;`), `/`-separated
/// non-empty segments, no trailing `/` except for the root.
pub const RULE_PATH_PATTERN: &str = r"^/([A-Za-z0-9._~!$&'()*+,=:@-]+(/[A-Za-z0-9._~!$&'()*+,=:@-]+)*)?$";
/// A scope token (RFC 6749 §3.3): visible ASCII except `"` and `\` (it is sent back inside a
/// quoted `scope="…"` attribute).
pub const SCOPE_PATTERN: &str = r"^[\x21\x23-\x5B\x5D-\x7E]+$";

/// HTTP methods a rule can name. `GET` also covers `HEAD` (apps answer `HEAD` with their `GET`
/// handler), so `HEAD` is not listed on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum RuleMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
}

impl RuleMethod {
    /// Bit of this method in a method set (see [`method_bit`]).
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuleMethod::Get => "GET",
            RuleMethod::Post => "POST",
            RuleMethod::Put => "PUT",
            RuleMethod::Patch => "PATCH",
            RuleMethod::Delete => "DELETE",
            RuleMethod::Options => "OPTIONS",
            RuleMethod::Connect => "CONNECT",
            RuleMethod::Trace => "TRACE",
        }
    }
}

/// The bit of a request method in a rule's method set; `HEAD` counts as `GET`. Other methods
/// have no bit: only rules without `methods` apply to them.
pub fn method_bit(method: &str) -> u16 {
    let m = match method {
        "GET" | "HEAD" => RuleMethod::Get,
        "POST" => RuleMethod::Post,
        "PUT" => RuleMethod::Put,
        "PATCH" => RuleMethod::Patch,
        "DELETE" => RuleMethod::Delete,
        "OPTIONS" => RuleMethod::Options,
        "CONNECT" => RuleMethod::Connect,
        "TRACE" => RuleMethod::Trace,
        _ => return 0,
    };
    m.bit()
}

/// One claim requirement: the claim is a string equal to one of `anyOf`, or an array holding
/// at least one string equal to one of them. Other JSON types never match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRequirement {
    /// Top-level claim name, e.g. `roles`, `groups`, `tenant`, `https://example.com/roles`.
    /// `scope` and `scp` are read through `scopes` instead.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Accepted values (exact, case-sensitive): 1 to 16 distinct strings.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 256)), extend("x-kubernetes-list-type" = "set"))]
    pub any_of: Vec<String>,
}

/// What a token must carry on a route. Every listed requirement must hold (AND); at least
/// one must be given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirements {
    /// Scopes that must all be granted: each must appear in the space-separated `scope` claim,
    /// or in `scp` (a space-separated string or an array of strings). At most 8, each a scope
    /// token (visible ASCII except `"` and `\`).
    #[serde(default)]
    #[schemars(length(max = 8), inner(length(min = 1, max = 128), pattern(r"^[\x21\x23-\x5B\x5D-\x7E]+$")), extend("x-kubernetes-list-type" = "set", "default" = []))]
    pub scopes: Vec<String>,
    /// Claim values that must all be present (at most 4).
    #[serde(default)]
    #[schemars(length(max = 4), extend("default" = []))]
    pub claims: Vec<ClaimRequirement>,
}

impl Requirements {
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.claims.is_empty()
    }
}

/// A route that requires claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!self.path.matches('(^|/)[.][.]?(/|$)')",
     "message": "authorization rule paths must not contain '.' or '..' segments"},
    {"rule": "size(self.require.scopes) + size(self.require.claims) > 0",
     "message": "an authorization rule must require at least one scope or claim value"},
    {"rule": "self.require.claims.all(c, !(c.name in ['scope', 'scp']))",
     "message": "authorization rules check scope and scp through require.scopes, not require.claims"}
]))]
pub struct AuthorizationRule {
    /// Absolute path: `/`, or `/`-separated non-empty segments of letters, digits and
    /// `-._~!$&'()*+,=:@`, without a trailing `/`, dot segments, `%` or `;`. Compared
    /// case-insensitively with the request path (see the README).
    #[schemars(
        length(min = 1, max = 256),
        pattern(r"^/([A-Za-z0-9._~!$&'()*+,=:@-]+(/[A-Za-z0-9._~!$&'()*+,=:@-]+)*)?$")
    )]
    pub path: String,
    /// `prefix` (default): the path and everything below it, segment-wise (`/admin` covers
    /// `/admin` and `/admin/x`, not `/administrator`). `exact`: only the path itself.
    #[serde(default, rename = "match")]
    pub path_match: PathMatch,
    /// Methods the rule applies to; empty (default) means every method. `GET` covers `HEAD`.
    /// For the same path and match, a rule naming the request's method wins over one without
    /// methods.
    #[serde(default)]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "set", "default" = []))]
    pub methods: Vec<RuleMethod>,
    /// What the token must carry (all of it).
    pub require: Requirements,
}

/// Per-route authorization (`authorization` in `sidecar.json`, `spec.authorization` in the CRD).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Rules; for each request the most specific matching rule alone decides (exact before
    /// prefix, then the longest path, then a rule naming the method before one without). A
    /// request matching no rule needs only a valid token. At most 32.
    #[serde(default)]
    #[schemars(length(max = 32), extend("default" = []))]
    pub rules: Vec<AuthorizationRule>,
}

impl Authorization {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The lower-cased segments of a rule path (`/` has none).
pub fn rule_segments(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(str::to_ascii_lowercase).collect()
}

/// Why a rule path is refused, if it is.
pub fn check_rule_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if path.len() > MAX_PATH {
        return Err("must be at most 256 characters");
    }
    if path != "/" && path.ends_with('/') {
        return Err("must not end with '/' (a rule on /a covers /a/ and, with match prefix, everything below)");
    }
    if path.contains("//") {
        return Err("must not contain empty segments ('//')");
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err("must not contain '.' or '..' segments");
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,=:@".contains(&b);
    if !path.bytes().all(ok) {
        return Err("may only contain letters, digits, '/' and -._~!$&'()*+,=:@ (no '%', ';', '\\', spaces)");
    }
    Ok(())
}

/// Whether a scope can be sent back in `scope="…"`.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// Precedence key: sorting rules by it puts the most specific first (exact before prefix, more
/// segments before fewer, a rule with methods before one without).
pub fn precedence(rule: &AuthorizationRule) -> (bool, std::cmp::Reverse<usize>, bool) {
    (rule.path_match != PathMatch::Exact, std::cmp::Reverse(rule_segments(&rule.path).len()), rule.methods.is_empty())
}

fn methods_overlap(a: &[RuleMethod], b: &[RuleMethod]) -> bool {
    (a.is_empty() && b.is_empty()) || a.iter().any(|m| b.contains(m))
}

/// Whether a public route with `methods` (strings) shares a method with a rule's methods.
fn public_methods_overlap(public: &[String], rule: &[RuleMethod]) -> bool {
    public.is_empty()
        || rule.is_empty()
        || public.iter().any(|m| {
            let bit = method_bit(m);
            bit != 0 && rule.iter().any(|r| r.bit() == bit)
        })
}

/// Whether `public` skips authentication for the rule's own path (in any spelling the rule
/// matches: case, trailing `/`, repeated `/`).
fn public_covers(public: &PublicRoute, rule_segs: &[String]) -> bool {
    let p = rule_segments(&public.path);
    match public.path_match {
        PathMatch::Exact => p == rule_segs,
        PathMatch::Prefix => rule_segs.starts_with(&p),
    }
}

impl Authorization {
    /// The checks the CRD makes, plus the ones CEL cannot express exactly. `Err((field, message))`
    /// names the offending field relative to `authorization`.
    pub fn validate(&self, public_routes: &[PublicRoute]) -> Result<(), (String, String)> {
        let e = |f: String, m: &str| Err((f, m.to_owned()));
        if self.rules.len() > MAX_RULES {
            return e("rules".into(), "at most 32 rules");
        }
        for (i, r) in self.rules.iter().enumerate() {
            let f = |s: &str| format!("rules[{i}].{s}");
            if let Err(m) = check_rule_path(&r.path) {
                return e(f("path"), m);
            }
            if r.methods.len() > 8 || r.methods.iter().enumerate().any(|(j, m)| r.methods[..j].contains(m)) {
                return e(f("methods"), "at most 8 distinct methods");
            }
            let q = &r.require;
            if q.is_empty() {
                return e(f("require"), "a rule must require at least one scope or claim value");
            }
            if q.scopes.len() > MAX_SCOPES {
                return e(f("require.scopes"), "at most 8 scopes");
            }
            if let Some(s) = q.scopes.iter().find(|s| !is_scope_token(s) || s.len() > 128) {
                let _ = s;
                return e(
                    f("require.scopes"),
                    "every scope must be 1 to 128 visible ASCII characters without '\"' or '\\'",
                );
            }
            if q.scopes.iter().enumerate().any(|(j, s)| q.scopes[..j].contains(s)) {
                return e(f("require.scopes"), "scopes must be distinct");
            }
            if q.claims.len() > MAX_CLAIMS {
                return e(f("require.claims"), "at most 4 claim requirements");
            }
            for (j, c) in q.claims.iter().enumerate() {
                let f = |s: &str| format!("rules[{i}].require.claims[{j}].{s}");
                if c.name.is_empty() || c.name.len() > MAX_VALUE_BYTES {
                    return e(f("name"), "must be 1 to 256 bytes");
                }
                if c.name == "scope" || c.name == "scp" {
                    return e(f("name"), "scope and scp are checked through require.scopes");
                }
                if c.any_of.is_empty() || c.any_of.len() > MAX_VALUES {
                    return e(f("anyOf"), "1 to 16 values");
                }
                if c.any_of.iter().any(|v| v.is_empty() || v.len() > MAX_VALUE_BYTES) {
                    return e(f("anyOf"), "every value must be 1 to 256 bytes");
                }
                if c.any_of.iter().enumerate().any(|(k, v)| c.any_of[..k].contains(v)) {
                    return e(f("anyOf"), "values must be distinct");
                }
            }
            let segs = rule_segments(&r.path);
            for (j, other) in self.rules[..i].iter().enumerate() {
                if other.path_match == r.path_match
                    && rule_segments(&other.path) == segs
                    && methods_overlap(&other.methods, &r.methods)
                {
                    return e(
                        f("path"),
                        &format!(
                            "ambiguous: rules[{j}] has the same path and match (compared case-insensitively) and shares a method (or neither lists methods)"
                        ),
                    );
                }
            }
            if let Some(k) = public_routes
                .iter()
                .position(|p| public_methods_overlap(&p.methods, &r.methods) && public_covers(p, &segs))
            {
                return e(
                    f("path"),
                    &format!(
                        "publicRoutes[{k}] makes this path public (no token at all), so the rule could never apply"
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str, m: PathMatch, methods: &[RuleMethod], scopes: &[&str]) -> AuthorizationRule {
        AuthorizationRule {
            path: path.into(),
            path_match: m,
            methods: methods.to_vec(),
            require: Requirements { scopes: scopes.iter().map(|s| s.to_string()).collect(), claims: vec![] },
        }
    }

    #[test]
    fn rule_paths() {
        for ok in ["/", "/admin", "/a/b.c/d-e_f~", "/v1/items:batch", "/@me"] {
            assert_eq!(check_rule_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "admin", "/admin/", "//admin", "/a//b", "/a/./b", "/a/..", "/..", "/a%2fb", "/a;b", "/a\\b", "/a b",
            "/a?b", "/a#b", "/é",
        ] {
            assert!(check_rule_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_rule_path(&format!("/{}", "a".repeat(256))).is_err());
        // The schema pattern agrees on these.
        assert!(RULE_PATH_PATTERN.starts_with("^/"));
    }

    #[test]
    fn scope_tokens() {
        assert!(is_scope_token("read:items"));
        assert!(is_scope_token("https://x/y!"));
        for bad in ["", "a b", "a\"b", "a\\b", "é"] {
            assert!(!is_scope_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn methods_map_to_bits_and_head_is_get() {
        assert_eq!(method_bit("HEAD"), RuleMethod::Get.bit());
        assert_eq!(method_bit("GET"), RuleMethod::Get.bit());
        assert_eq!(method_bit("DELETE"), RuleMethod::Delete.bit());
        assert_eq!(method_bit("PROPFIND"), 0);
        assert_eq!(method_bit("get"), 0, "methods are case-sensitive (RFC 9110 §9.1)");
        let all: u16 = [
            RuleMethod::Get,
            RuleMethod::Post,
            RuleMethod::Put,
            RuleMethod::Patch,
            RuleMethod::Delete,
            RuleMethod::Options,
            RuleMethod::Connect,
            RuleMethod::Trace,
        ]
        .iter()
        .map(|m| {
            assert_eq!(method_bit(m.as_str()), m.bit());
            m.bit()
        })
        .fold(0, |a, b| {
            assert_eq!(a & b, 0);
            a | b
        });
        assert_eq!(all.count_ones(), 8);
    }

    #[test]
    fn precedence_orders_most_specific_first() {
        use PathMatch::*;
        use RuleMethod::*;
        let mut rules = [
            rule("/", Prefix, &[], &["a"]),
            rule("/admin", Prefix, &[], &["b"]),
            rule("/admin", Prefix, &[Get], &["c"]),
            rule("/admin/x", Prefix, &[], &["d"]),
            rule("/admin", Exact, &[], &["e"]),
            rule("/admin", Exact, &[Post], &["f"]),
        ];
        rules.sort_by_key(precedence);
        let order: Vec<&str> = rules.iter().map(|r| r.require.scopes[0].as_str()).collect();
        assert_eq!(order, ["f", "e", "d", "c", "b", "a"]);
    }

    #[test]
    fn validation_refuses_ambiguity_empty_requirements_and_public_overlap() {
        use PathMatch::*;
        use RuleMethod::*;
        let ok = |rules: Vec<AuthorizationRule>, public: &[PublicRoute]| Authorization { rules }.validate(public);
        let public = |p: &str, m: PathMatch, methods: &[&str]| PublicRoute {
            path: p.into(),
            path_match: m,
            methods: methods.iter().map(|s| s.to_string()).collect(),
        };
        // Accepted: same path with disjoint methods, a method-specific rule next to a catch-all,
        // the same path as exact and as prefix, and public routes nested below a prefix rule.
        assert_eq!(
            ok(
                vec![
                    rule("/items", Prefix, &[Get], &["read"]),
                    rule("/items", Prefix, &[Post, Delete], &["write"]),
                    rule("/items", Prefix, &[], &["admin"]),
                    rule("/items", Exact, &[], &["list"]),
                ],
                &[public("/items/health", Exact, &[]), public("/login", Exact, &["POST"])]
            ),
            Ok(())
        );
        // A public route that only allows a method the rule does not name is fine.
        assert_eq!(ok(vec![rule("/login", Exact, &[Get], &["x"])], &[public("/login", Exact, &["POST"])]), Ok(()));

        let refused: Vec<(Vec<AuthorizationRule>, Vec<PublicRoute>, &str, &str)> = vec![
            (
                vec![rule("/a", Prefix, &[], &["x"]), rule("/a", Prefix, &[], &["y"])],
                vec![],
                "rules[1].path",
                "ambiguous",
            ),
            (
                vec![rule("/a", Prefix, &[Get], &["x"]), rule("/A", Prefix, &[Get, Put], &["y"])],
                vec![],
                "rules[1].path",
                "ambiguous",
            ),
            (vec![rule("/a", Exact, &[], &[])], vec![], "rules[0].require", "at least one"),
            (vec![rule("/a/", Exact, &[], &["x"])], vec![], "rules[0].path", "end with"),
            (vec![rule("/a/../b", Exact, &[], &["x"])], vec![], "rules[0].path", "'..'"),
            (vec![rule("/a%2fb", Exact, &[], &["x"])], vec![], "rules[0].path", "'%'"),
            (vec![rule("/a", Exact, &[], &["a b"])], vec![], "rules[0].require.scopes", "visible ASCII"),
            (vec![rule("/a", Exact, &[], &["x", "x"])], vec![], "rules[0].require.scopes", "distinct"),
            (
                vec![rule("/admin", Exact, &[], &["x"])],
                vec![public("/admin", Exact, &[])],
                "rules[0].path",
                "publicRoutes[0]",
            ),
            (
                vec![rule("/Admin", Exact, &[], &["x"])],
                vec![public("/admin/", Exact, &[])],
                "rules[0].path",
                "publicRoutes[0]",
            ),
            (
                vec![rule("/pub/x", Prefix, &[], &["x"])],
                vec![public("/pub", Prefix, &[])],
                "rules[0].path",
                "publicRoutes[0]",
            ),
            (
                vec![rule("/x", Prefix, &[], &["x"])],
                vec![public("/", Prefix, &["HEAD"])],
                "rules[0].path",
                "publicRoutes[0]",
            ),
            (
                vec![rule("/x", Prefix, &[Get], &["x"])],
                vec![public("/x", Exact, &["HEAD"])],
                "rules[0].path",
                "publicRoutes[0]",
            ),
        ];
        for (rules, public, field, needle) in refused {
            let (f, m) = ok(rules.clone(), &public).unwrap_err();
            assert_eq!(f, field, "{rules:?}");
            assert!(m.contains(needle), "{m}");
        }
        let claim = |name: &str, any: &[&str]| AuthorizationRule {
            path: "/c".into(),
            path_match: Prefix,
            methods: vec![],
            require: Requirements {
                scopes: vec![],
                claims: vec![ClaimRequirement {
                    name: name.into(),
                    any_of: any.iter().map(|s| s.to_string()).collect(),
                }],
            },
        };
        assert_eq!(ok(vec![claim("roles", &["admin"])], &[]), Ok(()));
        assert_eq!(ok(vec![claim("scp", &["admin"])], &[]).unwrap_err().0, "rules[0].require.claims[0].name");
        assert_eq!(ok(vec![claim("roles", &[])], &[]).unwrap_err().0, "rules[0].require.claims[0].anyOf");
        assert_eq!(ok(vec![claim("roles", &["a", "a"])], &[]).unwrap_err().0, "rules[0].require.claims[0].anyOf");
        let many: Vec<AuthorizationRule> = (0..33).map(|i| rule(&format!("/r{i}"), Exact, &[], &["x"])).collect();
        assert_eq!(ok(many, &[]).unwrap_err().0, "rules");
    }
}
