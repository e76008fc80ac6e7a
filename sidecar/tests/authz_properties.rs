//! Property tests (proptest) for route matching of `authorization.rules` (`sidecar/src/authz.rs`):
//! the allocation-free matcher that walks the raw path agrees with a plain reference that first
//! decodes and normalises the path into a list of segments, on paths built from the tricky parts
//! (escapes, case, empty and dot segments, `;parameters`, backslashes); and no input panics.
//!
//! Case counts are fixed (`PROPTEST_CASES=N` overrides them), no failure files.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use proptest::prelude::*;

use authrealm_contract::authz::{
    Authorization, AuthorizationRule, Requirements, RuleMethod, method_bit, precedence, rule_segments,
};
use authrealm_contract::config::PathMatch;
use authrealm_sidecar::authz::{AmbiguousPath, Authz};

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

const RULE_PATHS: [&str; 7] = ["/", "/admin", "/a", "/admin/a", "/items", "/a/b", "/admin/a/b"];
const METHODS: [RuleMethod; 3] = [RuleMethod::Get, RuleMethod::Post, RuleMethod::Delete];
const REQUEST_METHODS: [&str; 5] = ["GET", "HEAD", "POST", "DELETE", "PROPFIND"];

fn rule() -> impl Strategy<Value = AuthorizationRule> {
    (0..RULE_PATHS.len(), any::<bool>(), prop::collection::vec(0..METHODS.len(), 0..3), any::<bool>()).prop_map(
        |(p, exact, methods, upper)| {
            let mut methods: Vec<RuleMethod> = methods.into_iter().map(|i| METHODS[i]).collect();
            methods.sort();
            methods.dedup();
            let path = if upper { RULE_PATHS[p].to_ascii_uppercase() } else { RULE_PATHS[p].to_string() };
            AuthorizationRule {
                path,
                path_match: if exact { PathMatch::Exact } else { PathMatch::Prefix },
                methods,
                require: Requirements { scopes: vec!["s".into()], claims: vec![] },
            }
        },
    )
}

/// Valid rule sets: a rule that would make the set ambiguous is left out.
fn rules() -> impl Strategy<Value = Vec<AuthorizationRule>> {
    prop::collection::vec(rule(), 0..10).prop_map(|candidates| {
        let mut rules: Vec<AuthorizationRule> = Vec::new();
        for r in candidates {
            rules.push(r);
            if (Authorization { rules: rules.clone() }).validate(&[]).is_err() {
                rules.pop();
            }
        }
        rules
    })
}

const PARTS: [&str; 27] = [
    "admin",
    "ADMIN",
    "Admin",
    "a",
    "A",
    "b",
    "items",
    "%61dmin",
    "%41",
    "%61",
    "",
    "",
    ".",
    "..",
    "%2e",
    "%2F",
    "admin;x=1",
    ";",
    "..;",
    "%25",
    "%",
    "%4",
    "a\\b",
    "x%20y",
    "admin%00",
    "%c0%ae",
    "%C3%A9",
];

fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(0..PARTS.len(), 0..6), any::<bool>()).prop_map(|(parts, trailing)| {
        let mut p: String = parts.iter().map(|&i| format!("/{}", PARTS[i])).collect();
        if p.is_empty() || trailing {
            p.push('/');
        }
        p
    })
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Reference: decode each escape of the whole path (allocating), refuse what an app could read
/// differently, then split, drop `;parameters` and empty segments, lower-case.
fn reference_segments(path: &str) -> Result<Vec<Vec<u8>>, AmbiguousPath> {
    if path.contains('\\') {
        return Err(AmbiguousPath);
    }
    let mut segments = Vec::new();
    for raw in path.split('/') {
        let name = raw.split(';').next().unwrap();
        if name == "." || name == ".." {
            return Err(AmbiguousPath);
        }
        let b = name.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let (Some(h), Some(l)) = (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c)))
                else {
                    return Err(AmbiguousPath);
                };
                let c = h * 16 + l;
                if b"./\\;%\0\xc0\xc1".contains(&c) {
                    return Err(AmbiguousPath);
                }
                out.push(c.to_ascii_lowercase());
                i += 3;
            } else {
                out.push(b[i].to_ascii_lowercase());
                i += 1;
            }
        }
        if !out.is_empty() {
            segments.push(out);
        }
    }
    // A `;` parameter whose name is a dot segment (`..;x`) is a dot segment too.
    if path.split('/').any(|s| matches!(s.split(';').next(), Some(".") | Some(".."))) {
        return Err(AmbiguousPath);
    }
    Ok(segments)
}

fn reference(rules: &[AuthorizationRule], method: &str, path: &str) -> Result<Option<usize>, AmbiguousPath> {
    if rules.is_empty() {
        return Ok(None);
    }
    let segs = reference_segments(path)?;
    let mut order: Vec<usize> = (0..rules.len()).collect();
    order.sort_by_key(|&i| precedence(&rules[i]));
    let bit = method_bit(method);
    Ok(order.into_iter().find(|&i| {
        let r = &rules[i];
        let want: Vec<Vec<u8>> = rule_segments(&r.path).into_iter().map(String::into_bytes).collect();
        let methods_ok = r.methods.is_empty() || r.methods.iter().any(|m| m.bit() & bit != 0);
        let path_ok = match r.path_match {
            PathMatch::Exact => segs == want,
            PathMatch::Prefix => segs.starts_with(&want),
        };
        methods_ok && path_ok
    }))
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn the_in_place_matcher_agrees_with_the_decoding_reference(
        rules in rules(),
        method in 0..REQUEST_METHODS.len(),
        path in path(),
    ) {
        let method = REQUEST_METHODS[method];
        let authz = Authz::new(&Authorization { rules: rules.clone() }, "demo");
        let got = authz.route(method, &path).map(|r| r.map(|r| r.index));
        prop_assert_eq!(got, reference(&rules, method, &path), "{} {}", method, path);
    }

    #[test]
    fn no_path_or_method_panics(method in "[A-Za-z]{0,8}", path in "(?s).{0,64}") {
        let authz = Authz::new(
            &Authorization {
                rules: vec![AuthorizationRule {
                    path: "/admin".into(),
                    path_match: PathMatch::Prefix,
                    methods: vec![],
                    require: Requirements { scopes: vec!["s".into()], claims: vec![] },
                }],
            },
            "demo",
        );
        let _ = authz.route(&method, &path);
    }
}
