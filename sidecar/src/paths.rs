//! Which request paths may be matched against the realm's public routes.

/// False for paths the app could normalise to somewhere else than they appear: dot segments
/// and encoded `.` or `/` could make a public prefix reach a private path once the app
/// resolves them, so such paths never count as public (they still reach the app, but only
/// with a valid token).
pub fn path_is_public_candidate(path: &str) -> bool {
    // No allocation: this runs on every request.
    let has = |needle: &[u8]| path.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle));
    let ambiguous = has(b"%2e")
        || has(b"%2f")
        || has(b"%5c")
        || path.contains('\\')
        || has(b"%3b")
        // `..;` and `.;x`: servlet containers drop path parameters before normalising.
        || path.split('/').any(|seg| matches!(seg.split(';').next(), Some(".") | Some("..")));
    !ambiguous
}

#[cfg(test)]
mod tests {
    use super::path_is_public_candidate;

    #[test]
    fn dot_segments_and_encoded_separators_are_never_public() {
        for ok in ["/", "/public", "/public/a.b/c..d/...", "/static/app.js", "//x", "/a;b=c"] {
            assert!(path_is_public_candidate(ok), "{ok:?}");
        }
        for bad in [
            "/public/../admin",
            "/public/./x",
            "/public/..",
            "/public/%2e%2e/admin",
            "/public/%2E./admin",
            "/public%2fadmin",
            "/public%5cadmin",
            "/public\\..\\admin",
            "/public/..;/admin",
            "/public/.;x/admin",
            "/public%3b/x",
        ] {
            assert!(!path_is_public_candidate(bad), "{bad:?}");
        }
    }
}
