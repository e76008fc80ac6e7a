//! The bearer-token pipeline, cheapest check first. Pure functions: no I/O, no clock.
//!
//! `Authorization` parse → size limit → header decode (forbidden members rejected, never
//! fetched) → `alg` in the realm allow-list → `kid` names a loaded key *of that alg* →
//! signature → exp / nbf / iat → iss → aud → sub/jti/required claims.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use serde_json::{Map, Value};

use authrealm_contract::{Alg, SessionMode};

use crate::keys::KeyRing;
use crate::verifier::VerifyKey;

/// Why a request was not authenticated. `label()` goes to metrics and debug logs; clients
/// only ever see the HTTP status and the RFC 6750 error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// No Authorization header (401 without an error code, per RFC 6750 §3.1).
    Missing,
    /// Several Authorization headers, or a token in the query string (400 invalid_request).
    AmbiguousCredentials,
    NotBearer,
    Malformed,
    TooLarge,
    BadHeader,
    ForbiddenHeader,
    AlgNotAllowed,
    MissingKid,
    UnknownKid,
    KidAlgMismatch,
    BadSignature,
    BadClaims,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    /// Denylist realms: `exp - iat` longer than the realm's maximum token lifetime. Deny records
    /// and log-out cut-offs are kept only that long, so such a token could outlive its revocation.
    LifetimeTooLong,
    /// A claim mapped to an identity header cannot be passed to the app exactly (not visible
    /// ASCII, or leading/trailing white space the app's HTTP parser would trim).
    UnrepresentableClaim,
    /// The session store says the token is revoked, replaced or unknown.
    SessionRevoked,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::Missing => "missing",
            Reject::AmbiguousCredentials => "ambiguous_credentials",
            Reject::NotBearer => "not_bearer",
            Reject::Malformed => "malformed",
            Reject::TooLarge => "too_large",
            Reject::BadHeader => "bad_header",
            Reject::ForbiddenHeader => "forbidden_header",
            Reject::AlgNotAllowed => "alg_not_allowed",
            Reject::MissingKid => "missing_kid",
            Reject::UnknownKid => "unknown_kid",
            Reject::KidAlgMismatch => "kid_alg_mismatch",
            Reject::BadSignature => "bad_signature",
            Reject::BadClaims => "bad_claims",
            Reject::Expired => "expired",
            Reject::NotYetValid => "not_yet_valid",
            Reject::IssuedInFuture => "issued_in_future",
            Reject::WrongIssuer => "wrong_issuer",
            Reject::WrongAudience => "wrong_audience",
            Reject::MissingClaim => "missing_claim",
            Reject::LifetimeTooLong => "lifetime_too_long",
            Reject::UnrepresentableClaim => "unrepresentable_claim",
            Reject::SessionRevoked => "session_revoked",
        }
    }

    /// HTTP status: 400 for requests that are malformed at the HTTP level, 401 otherwise.
    pub fn status(self) -> http::StatusCode {
        match self {
            Reject::AmbiguousCredentials => http::StatusCode::BAD_REQUEST,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// RFC 6750 error code, if any.
    pub fn error_code(self) -> Option<&'static str> {
        match self {
            Reject::Missing | Reject::NotBearer => None,
            Reject::AmbiguousCredentials => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

/// What the realm requires of a token.
pub struct Policy {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Explicit allow-list; empty = algorithms of the loaded keys.
    pub algorithms: Vec<Alg>,
    pub leeway: i64,
    pub max_token_bytes: usize,
    pub required_claims: Vec<String>,
    pub session_mode: SessionMode,
    /// The realm's maximum token lifetime (`maxTokenTtlSeconds`); enforced in denylist mode.
    pub max_lifetime: i64,
}

/// A token that passed every local check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub kid: String,
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub exp: i64,
    /// The decoded payload: a JSON object, parsed as such once already (see [`Verified::claims`]).
    payload: Vec<u8>,
}

impl Verified {
    /// Every claim of the token. Parses the payload again, so it is called only where claims
    /// beyond the ones above are needed (identity headers of other claims, authorization rules,
    /// introspection); validation itself builds no map.
    pub fn claims(&self) -> Map<String, Value> {
        // Cannot fail: `validate` accepted exactly the payloads a `Map<String, Value>` accepts.
        serde_json::from_slice(&self.payload).unwrap_or_default()
    }
}

/// Longest `sub` / `jti` accepted (they become parts of Redis keys).
pub const MAX_ID_BYTES: usize = 512;

/// True when `s` can be sent as an HTTP header value and read back byte for byte: visible
/// ASCII and inner spaces/tabs only (no obs-text, no control characters), and no leading or
/// trailing white space (HTTP parsers trim it, so `" alice"` would reach the app as `alice`).
pub fn header_safe(s: &str) -> bool {
    let b = s.as_bytes();
    let ws = |c: &u8| *c == b' ' || *c == b'\t';
    b.iter().all(|c| (0x21..=0x7e).contains(c) || ws(c)) && !b.first().is_some_and(ws) && !b.last().is_some_and(ws)
}

/// The header value an identity claim is passed to the app as. `Ok(None)`: claim absent or
/// null (no header). `Err`: present but not representable exactly — the request is refused
/// rather than reaching the app with a missing or altered identity.
pub fn identity_value(v: Option<&Value>) -> Result<Option<http::HeaderValue>, Reject> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => identity_str(s).map(Some),
        Some(Value::Number(n)) => identity_str(&n.to_string()).map(Some),
        Some(Value::Bool(b)) => identity_str(if *b { "true" } else { "false" }).map(Some),
        Some(other) => identity_str(&other.to_string()).map(Some),
    }
}

/// [`identity_value`] of a string claim.
pub fn identity_str(s: &str) -> Result<http::HeaderValue, Reject> {
    if !header_safe(s) {
        return Err(Reject::UnrepresentableClaim);
    }
    http::HeaderValue::from_str(s).map_err(|_| Reject::UnrepresentableClaim)
}

/// Find the bearer token of a request. Exactly one `Authorization` header; the scheme is
/// case-insensitive; `access_token` in the query string is refused (RFC 6750 §2.3 is not
/// supported: query strings end up in logs).
pub fn extract_bearer<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Result<&'a str, Reject> {
    if let Some(q) = query
        && q.split('&').any(|kv| is_access_token_key(kv.split('=').next().unwrap_or("")))
    {
        return Err(Reject::AmbiguousCredentials);
    }
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Reject::Missing)?;
    if values.next().is_some() {
        return Err(Reject::AmbiguousCredentials);
    }
    let value = value.to_str().map_err(|_| Reject::NotBearer)?;
    let (scheme, rest) = value.split_once(' ').ok_or(Reject::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Reject::NotBearer);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(Reject::Malformed);
    }
    Ok(token)
}

/// True when a query-string key reads `access_token` once its `%XX` escapes are decoded (in
/// any letter case): `acc%65ss_token` is the same parameter to the app as `access_token`.
fn is_access_token_key(k: &str) -> bool {
    const NAME: &[u8] = b"access_token";
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded = Vec::with_capacity(NAME.len());
    let mut rest = k.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        if decoded.len() == NAME.len() {
            return false;
        }
        let escaped = match tail {
            [h, l, after @ ..] if c == b'%' => hex(*h).zip(hex(*l)).map(|(h, l)| ((h * 16 + l) as u8, after)),
            _ => None,
        };
        let (byte, next) = escaped.unwrap_or((c, tail));
        decoded.push(byte);
        rest = next;
    }
    decoded.eq_ignore_ascii_case(NAME)
}

/// The three segments of a compact JWS: exactly two dots, every segment non-empty base64url text.
fn split_compact(token: &str) -> Option<(&str, &str, &str)> {
    let b = token.as_bytes();
    // One pass without early exit over the whole token (the compiler vectorises it), then the
    // dots: this runs for every token never seen before.
    if !b.iter().fold(true, |ok, &c| ok & (c.is_ascii_alphanumeric() | (c == b'-') | (c == b'_') | (c == b'.'))) {
        return None;
    }
    let d1 = memchr::memchr(b'.', b)?;
    let d2 = d1 + 1 + memchr::memchr(b'.', &b[d1 + 1..])?;
    if memchr::memchr(b'.', &b[d2 + 1..]).is_some() {
        return None;
    }
    let (h, p, s) = (&token[..d1], &token[d1 + 1..d2], &token[d2 + 1..]);
    (!h.is_empty() && !p.is_empty() && !s.is_empty()).then_some((h, p, s))
}

fn numeric_date(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15).map(|f| f.floor() as i64))
        }
        _ => None,
    }
}

/// base64url-decode one token segment, into `buf` when it fits (the usual header), otherwise
/// into a new buffer. `None` when it is not valid base64url.
fn decode_part<'b>(part: &str, buf: &'b mut [u8]) -> Option<std::borrow::Cow<'b, [u8]>> {
    if part.len() / 4 * 3 + 3 <= buf.len() {
        let n = URL_SAFE_NO_PAD.decode_slice(part, buf).ok()?;
        Some(std::borrow::Cow::Borrowed(&buf[..n]))
    } else {
        URL_SAFE_NO_PAD.decode(part).ok().map(std::borrow::Cow::Owned)
    }
}

/// One member of the JOSE header as the checks need it: absent, a string (borrowed from the
/// decoded header when it has no escapes), or any other JSON value.
#[derive(Default)]
enum Member<'a> {
    #[default]
    Absent,
    Str(std::borrow::Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Member<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Member<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Member<'a>, E> {
                Ok(Member::Str(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Member<'a>, E> {
                Ok(Member::Str(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Member<'a>, E> {
                Ok(Member::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Member<'a>, E> {
                Ok(Member::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Member<'a>, E> {
                Ok(Member::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Member<'a>, E> {
                Ok(Member::Other)
            }
            fn visit_unit<E>(self) -> Result<Member<'a>, E> {
                Ok(Member::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Member<'a>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Member::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Member<'a>, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Member::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// What the checks read from the payload: the registered claims, the subject claim (`sub`, or an
/// external issuer's `subjectClaim`) and which required claims are present. Every member's value
/// is parsed as a `serde_json::Value` — so exactly the payloads a `Map<String, Value>` accepts are
/// accepted, and a repeated member counts with its last value, as in such a map — but no map is
/// built: other members' values are dropped at once.
#[derive(Default)]
struct Claims {
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    subject: Option<Value>,
    jti: Option<Value>,
    /// One flag per `Policy::required_claims` entry.
    required_seen: Vec<bool>,
}

impl Claims {
    /// `None` unless `payload` is one JSON object.
    fn parse(payload: &[u8], subject_claim: &str, required: &[String]) -> Option<Claims> {
        use serde::de::DeserializeSeed as _;
        let mut de = serde_json::Deserializer::from_slice(payload);
        let claims = ClaimsSeed { subject_claim, required }.deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(claims)
    }
}

struct ClaimsSeed<'p> {
    subject_claim: &'p str,
    required: &'p [String],
}

impl<'de> serde::de::DeserializeSeed<'de> for ClaimsSeed<'_> {
    type Value = Claims;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Claims, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ClaimsSeed<'_> {
    type Value = Claims;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object of claims")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        let mut c = Claims { required_seen: vec![false; self.required.len()], ..Claims::default() };
        while let Some(key) = map.next_key::<Member<'de>>()? {
            let Member::Str(key) = key else { return Err(serde::de::Error::custom("claim name is not a string")) };
            let value: Value = map.next_value()?;
            for (name, seen) in self.required.iter().zip(c.required_seen.iter_mut()) {
                *seen |= **name == *key;
            }
            let slot = match &*key {
                "exp" => Some(&mut c.exp),
                "nbf" => Some(&mut c.nbf),
                "iat" => Some(&mut c.iat),
                "iss" => Some(&mut c.iss),
                "aud" => Some(&mut c.aud),
                "jti" => Some(&mut c.jti),
                _ => None,
            };
            // The value is moved where it is read; copied only for a claim in two roles.
            match (slot, *key == *self.subject_claim) {
                (Some(slot), true) => {
                    c.subject = Some(value.clone());
                    *slot = Some(value);
                }
                (Some(slot), false) => *slot = Some(value),
                (None, true) => c.subject = Some(value),
                (None, false) => {}
            }
        }
        Ok(c)
    }
}

/// The JOSE header, as far as the checks read it; other members are parsed (the header must be
/// valid JSON) and ignored. Members that make a token unacceptable — they ask the verifier to
/// trust material or processing rules carried by the token itself — are recorded whatever their
/// value (`null` included). A member given twice is refused (RFC 7515 §4 allows refusing
/// duplicate names; the alternative, "the last one wins", would let two parsers disagree).
#[derive(serde::Deserialize)]
struct JoseHeader<'a> {
    #[serde(default, borrow)]
    alg: Member<'a>,
    #[serde(default, borrow)]
    kid: Member<'a>,
    #[serde(default, borrow)]
    crit: Member<'a>,
    #[serde(default, borrow)]
    b64: Member<'a>,
    #[serde(default, borrow)]
    jwk: Member<'a>,
    #[serde(default, borrow)]
    jku: Member<'a>,
    #[serde(default, borrow)]
    x5u: Member<'a>,
    #[serde(default, borrow)]
    x5c: Member<'a>,
    #[serde(default, borrow)]
    zip: Member<'a>,
}

impl<'a> JoseHeader<'a> {
    /// `None` unless `bytes` is one JSON object (serde would also read a struct from an array).
    fn parse(bytes: &'a [u8]) -> Option<JoseHeader<'a>> {
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    fn has_forbidden_member(&self) -> bool {
        [&self.crit, &self.b64, &self.jwk, &self.jku, &self.x5u, &self.x5c, &self.zip]
            .iter()
            .any(|m| !matches!(m, Member::Absent))
    }
}

/// Where a token's verification key comes from: the realm's own key ring, or one external
/// issuer's JWKS ([`crate::jwks::ExtKeySet`]). A `kid` is only ever looked up in the set of the
/// issuer the token names.
pub trait TokenKeys {
    /// True when some key verifies `alg` (the allow-list when the policy names none).
    fn has_alg(&self, alg: Alg) -> bool;
    /// The key `kid`, usable with `alg`: otherwise `UnknownKid` or `KidAlgMismatch`.
    fn key_for(&self, kid: &str, alg: Alg) -> Result<&VerifyKey, Reject>;
}

impl TokenKeys for KeyRing {
    fn has_alg(&self, alg: Alg) -> bool {
        self.keys.iter().any(|k| k.alg == alg)
    }
    fn key_for(&self, kid: &str, alg: Alg) -> Result<&VerifyKey, Reject> {
        let key = self.get(kid).ok_or(Reject::UnknownKid)?;
        if key.alg != alg {
            return Err(Reject::KidAlgMismatch);
        }
        Ok(&key.verify)
    }
}

/// Run every local check on `token` at time `now` (unix seconds), with the realm's own keys.
pub fn validate(token: &str, ring: &KeyRing, policy: &Policy, now: i64) -> Result<Verified, Reject> {
    validate_with(token, ring, policy, "sub", now)
}

/// [`validate`] with any key source; `subject_claim` names the claim that is the subject.
pub fn validate_with<K: TokenKeys + ?Sized>(
    token: &str,
    ring: &K,
    policy: &Policy,
    subject_claim: &str,
    now: i64,
) -> Result<Verified, Reject> {
    if token.len() > policy.max_token_bytes {
        return Err(Reject::TooLarge);
    }
    let (h64, p64, s64) = split_compact(token).ok_or(Reject::Malformed)?;

    // Header.
    let mut header_buf = [0u8; 512];
    let header_bytes = decode_part(h64, &mut header_buf).ok_or(Reject::BadHeader)?;
    let header = JoseHeader::parse(&header_bytes).ok_or(Reject::BadHeader)?;
    if header.has_forbidden_member() {
        return Err(Reject::ForbiddenHeader);
    }
    let alg = match &header.alg {
        Member::Str(a) => Alg::from_jose(a),
        _ => None,
    }
    .ok_or(Reject::AlgNotAllowed)?;
    let allowed = if policy.algorithms.is_empty() { ring.has_alg(alg) } else { policy.algorithms.contains(&alg) };
    if !allowed {
        return Err(Reject::AlgNotAllowed);
    }
    let kid: &str = match &header.kid {
        Member::Str(k) => k,
        Member::Other => return Err(Reject::BadHeader),
        Member::Absent => return Err(Reject::MissingKid),
    };
    let key = ring.key_for(kid, alg)?;

    // Signature, with the key's own algorithm (`key_for` checked that the key carries `alg`).
    let signing_input = &token[..h64.len() + 1 + p64.len()];
    if !key.verify_b64(alg, signing_input.as_bytes(), s64) {
        return Err(Reject::BadSignature);
    }

    // Claims.
    let payload = URL_SAFE_NO_PAD.decode(p64).map_err(|_| Reject::BadClaims)?;
    let claims = Claims::parse(&payload, subject_claim, &policy.required_claims).ok_or(Reject::BadClaims)?;
    let leeway = policy.leeway;
    let exp = match claims.exp.as_ref() {
        Some(v) => numeric_date(v).ok_or(Reject::BadClaims)?,
        None => return Err(Reject::MissingClaim),
    };
    if now > exp.saturating_add(leeway) {
        return Err(Reject::Expired);
    }
    let nbf = match claims.nbf.as_ref() {
        Some(v) => {
            let nbf = numeric_date(v).ok_or(Reject::BadClaims)?;
            if nbf > now.saturating_add(leeway) {
                return Err(Reject::NotYetValid);
            }
            Some(nbf)
        }
        None => None,
    };
    let iat = match claims.iat.as_ref() {
        Some(v) => {
            let iat = numeric_date(v).ok_or(Reject::BadClaims)?;
            if iat > now.saturating_add(leeway) {
                return Err(Reject::IssuedInFuture);
            }
            Some(iat)
        }
        None => None,
    };
    match claims.iss.as_ref() {
        Some(Value::String(iss)) if *iss == policy.issuer => {}
        Some(Value::String(_)) => return Err(Reject::WrongIssuer),
        Some(_) => return Err(Reject::BadClaims),
        None => return Err(Reject::MissingClaim),
    }
    let aud_ok = match claims.aud.as_ref() {
        Some(Value::String(a)) => policy.audiences.iter().any(|x| x == a),
        Some(Value::Array(list)) => {
            if list.is_empty() || !list.iter().all(Value::is_string) {
                return Err(Reject::BadClaims);
            }
            list.iter().any(|a| policy.audiences.iter().any(|x| Some(x.as_str()) == a.as_str()))
        }
        Some(_) => return Err(Reject::BadClaims),
        None => return Err(Reject::MissingClaim),
    };
    if !aud_ok {
        return Err(Reject::WrongAudience);
    }
    let id = |v: Option<Value>| -> Result<Option<String>, Reject> {
        match v {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Ok(Some(s)),
            Some(_) => Err(Reject::BadClaims),
            None => Ok(None),
        }
    };
    let sub = id(claims.subject)?;
    let jti = id(claims.jti)?;
    if policy.session_mode != SessionMode::Stateless && (sub.is_none() || jti.is_none()) {
        return Err(Reject::MissingClaim);
    }
    if policy.session_mode == SessionMode::Denylist {
        // Revocations of tokens minted elsewhere are remembered for the realm's maximum lifetime
        // (plus leeway), and "log out everywhere" compares iat: both need a bounded lifetime.
        let Some(iat) = iat else { return Err(Reject::MissingClaim) };
        if exp.saturating_sub(iat) > policy.max_lifetime.saturating_add(leeway) {
            return Err(Reject::LifetimeTooLong);
        }
    }
    if claims.required_seen.iter().any(|seen| !seen) {
        return Err(Reject::MissingClaim);
    }
    Ok(Verified { kid: kid.to_owned(), sub, jti, iat, nbf, exp, payload })
}

/// Claims a caller may not set when minting.
pub const RESERVED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"];

/// A freshly signed token.
pub struct Minted {
    pub token: String,
    pub jti: String,
    pub kid: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("this sidecar holds no signing key (verify-only)")]
    NoSigningKey,
    #[error("claim {0:?} is reserved and set by the sidecar")]
    ReservedClaim(String),
    #[error("signing failed")]
    Sign,
}

/// A random token id: 16 bytes, base64url.
pub fn new_jti() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut b).expect("system random");
    URL_SAFE_NO_PAD.encode(b)
}

/// Sign a token for `subject` with the ring's current key.
pub fn mint(
    ring: &KeyRing,
    issuer: &str,
    subject: &str,
    audience: Value,
    extra: Map<String, Value>,
    now: i64,
    ttl: i64,
) -> Result<Minted, MintError> {
    let key = ring.signer().ok_or(MintError::NoSigningKey)?;
    let signing = key.sign.as_ref().ok_or(MintError::NoSigningKey)?;
    if let Some(k) = extra.keys().find(|k| RESERVED_CLAIMS.contains(&k.as_str())) {
        return Err(MintError::ReservedClaim(k.clone()));
    }
    let jti = new_jti();
    let mut claims = extra;
    claims.insert("iss".into(), issuer.into());
    claims.insert("sub".into(), subject.into());
    claims.insert("aud".into(), audience);
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), (now + ttl).into());
    claims.insert("jti".into(), jti.clone().into());
    let mut header = jsonwebtoken::Header::new(key.alg.to_jsonwebtoken());
    header.kid = Some(key.kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, signing).map_err(|_| MintError::Sign)?;
    Ok(Minted { token, jti, kid: key.kid.clone(), iat: now, exp: now + ttl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use authrealm_contract::keygen::generate;
    use authrealm_contract::{KeySet, KeyState};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn ring() -> KeyRing {
        let set = KeySet {
            version: authrealm_contract::keyset::KEYSET_VERSION.into(),
            keys: vec![
                generate(Alg::ES256, "es", 0, KeyState::Current).unwrap(),
                generate(Alg::HS256, "hs", 0, KeyState::Retired).unwrap(),
                generate(Alg::EdDSA, "ed", 0, KeyState::Retired).unwrap(),
            ],
        };
        KeyRing::from_set(&set, [0; 32]).unwrap()
    }

    fn policy(mode: SessionMode) -> Policy {
        Policy {
            issuer: "https://iss".into(),
            audiences: vec!["a".into(), "b".into()],
            algorithms: vec![],
            leeway: 30,
            max_token_bytes: 4096,
            required_claims: vec![],
            session_mode: mode,
            max_lifetime: 900,
        }
    }

    fn sign(ring: &KeyRing, kid: &str, header: Value, claims: Value) -> String {
        let key = ring.get(kid).unwrap();
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key.sign.as_ref().unwrap(), key.alg.to_jsonwebtoken())
            .unwrap();
        format!("{input}.{sig}")
    }

    fn claims(over: Value) -> Value {
        let mut c = json!({"iss": "https://iss", "aud": "a", "sub": "s", "jti": "j", "iat": NOW, "exp": NOW + 60});
        for (k, v) in over.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    #[test]
    fn every_check_in_order() {
        let r = ring();
        let p = policy(SessionMode::Single);
        let h = |alg: &str, kid: &str| json!({"alg": alg, "kid": kid});
        let cases: Vec<(&str, String, Result<(), Reject>)> = vec![
            ("good ES256", sign(&r, "es", h("ES256", "es"), claims(json!({}))), Ok(())),
            ("good HS256", sign(&r, "hs", h("HS256", "hs"), claims(json!({}))), Ok(())),
            ("good EdDSA", sign(&r, "ed", h("EdDSA", "ed"), claims(json!({}))), Ok(())),
            ("aud list", sign(&r, "es", h("ES256", "es"), claims(json!({"aud": ["x", "b"]}))), Ok(())),
            ("exp within leeway", sign(&r, "es", h("ES256", "es"), claims(json!({"exp": NOW - 10}))), Ok(())),
            ("expired", sign(&r, "es", h("ES256", "es"), claims(json!({"exp": NOW - 31}))), Err(Reject::Expired)),
            (
                "nbf future",
                sign(&r, "es", h("ES256", "es"), claims(json!({"nbf": NOW + 31}))),
                Err(Reject::NotYetValid),
            ),
            (
                "iat future",
                sign(&r, "es", h("ES256", "es"), claims(json!({"iat": NOW + 31}))),
                Err(Reject::IssuedInFuture),
            ),
            ("iss", sign(&r, "es", h("ES256", "es"), claims(json!({"iss": "x"}))), Err(Reject::WrongIssuer)),
            (
                "iss array",
                sign(&r, "es", h("ES256", "es"), claims(json!({"iss": ["https://iss"]}))),
                Err(Reject::BadClaims),
            ),
            ("aud", sign(&r, "es", h("ES256", "es"), claims(json!({"aud": "z"}))), Err(Reject::WrongAudience)),
            ("aud number", sign(&r, "es", h("ES256", "es"), claims(json!({"aud": 1}))), Err(Reject::BadClaims)),
            (
                "aud mixed list",
                sign(&r, "es", h("ES256", "es"), claims(json!({"aud": ["a", 1]}))),
                Err(Reject::BadClaims),
            ),
            ("aud empty list", sign(&r, "es", h("ES256", "es"), claims(json!({"aud": []}))), Err(Reject::BadClaims)),
            (
                "exp string",
                sign(&r, "es", h("ES256", "es"), claims(json!({"exp": "9999999999"}))),
                Err(Reject::BadClaims),
            ),
            ("no sub", sign(&r, "es", h("ES256", "es"), claims(json!({"sub": null}))), Err(Reject::MissingClaim)),
            ("no jti", sign(&r, "es", h("ES256", "es"), claims(json!({"jti": null}))), Err(Reject::MissingClaim)),
            ("sub number", sign(&r, "es", h("ES256", "es"), claims(json!({"sub": 5}))), Err(Reject::BadClaims)),
            ("kid of other alg", sign(&r, "hs", h("ES256", "hs"), claims(json!({}))), Err(Reject::KidAlgMismatch)),
            ("unknown kid", sign(&r, "es", h("ES256", "zz"), claims(json!({}))), Err(Reject::UnknownKid)),
            ("alg not loaded", sign(&r, "es", h("RS256", "es"), claims(json!({}))), Err(Reject::AlgNotAllowed)),
            (
                "crit",
                sign(&r, "es", json!({"alg": "ES256", "kid": "es", "crit": []}), claims(json!({}))),
                Err(Reject::ForbiddenHeader),
            ),
            (
                "kid number",
                sign(&r, "es", json!({"alg": "ES256", "kid": 1}), claims(json!({}))),
                Err(Reject::BadHeader),
            ),
            ("payload not object", sign(&r, "es", h("ES256", "es"), json!([1])), Err(Reject::BadClaims)),
        ];
        for (name, token, want) in cases {
            assert_eq!(validate(&token, &r, &p, NOW).map(|_| ()), want, "{name}");
        }
        // An explicit allow-list overrides the loaded algorithms.
        let mut p2 = policy(SessionMode::Single);
        p2.algorithms = vec![Alg::ES256];
        let hs = sign(&r, "hs", h("HS256", "hs"), claims(json!({})));
        assert_eq!(validate(&hs, &r, &p2, NOW).unwrap_err(), Reject::AlgNotAllowed);
        // Stateless realms do not need sub/jti; denylist realms need iat.
        let no_ids = sign(&r, "es", h("ES256", "es"), claims(json!({"sub": null, "jti": null})));
        assert!(validate(&no_ids, &r, &policy(SessionMode::Stateless), NOW).is_ok());
        let no_iat = sign(&r, "es", h("ES256", "es"), claims(json!({"iat": null})));
        assert_eq!(validate(&no_iat, &r, &policy(SessionMode::Denylist), NOW).unwrap_err(), Reject::MissingClaim);
        assert!(validate(&no_iat, &r, &policy(SessionMode::Multi), NOW).is_ok());
        // Denylist realms bound a token's lifetime (max 900 s + 30 s leeway here): revocation
        // records are kept only that long.
        let dl = policy(SessionMode::Denylist);
        let lived = |secs: i64| sign(&r, "es", h("ES256", "es"), claims(json!({"iat": NOW, "exp": NOW + secs})));
        assert!(validate(&lived(930), &r, &dl, NOW).is_ok());
        assert_eq!(validate(&lived(931), &r, &dl, NOW).unwrap_err(), Reject::LifetimeTooLong);
        assert_eq!(validate(&lived(86_400), &r, &dl, NOW).unwrap_err(), Reject::LifetimeTooLong);
        assert!(validate(&lived(86_400), &r, &policy(SessionMode::Single), NOW).is_ok());
    }

    /// The header as raw JSON text (members `serde_json::json!` could not write: duplicates,
    /// escapes, a non-object).
    fn sign_raw_header(ring: &KeyRing, kid: &str, header: &str) -> String {
        let key = ring.get(kid).unwrap();
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims(json!({})).to_string()));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key.sign.as_ref().unwrap(), key.alg.to_jsonwebtoken())
            .unwrap();
        format!("{input}.{sig}")
    }

    /// The map the checks used to read, for comparison.
    fn as_map(payload: &str) -> Option<Map<String, Value>> {
        serde_json::from_str(payload).ok()
    }

    #[test]
    fn claims_are_read_as_a_map_would_read_them() {
        let req = vec!["email".to_string(), "roles".to_string()];
        let cases = [
            r#"{"exp":1,"sub":"a","jti":"j","email":null,"roles":[]}"#,
            r#"{"exp":1,"exp":2,"sub":"a","sub":"b"}"#,
            r#"{"\u0065xp":7,"s\u0075b":"x\ny","iss":"i","aud":["a","b"],"nbf":1.5,"iat":-3}"#,
            r#"{"exp":1,"big":1e400}"#,
            r#"{"exp":1,"big":-1e400}"#,
            r#"{"exp":18446744073709551616}"#,
            r#"{"exp":1,"bad":"\ud800"}"#,
            r#"{"exp":1,"bad":"\x"}"#,
            r#"{"exp":1,"n":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
            r#"[{"exp":1}]"#,
            r#""exp""#,
            r#"{"exp":1} {}"#,
            r#"{"exp":1,}"#,
            r#"{}"#,
            r#" { "exp" : 1 } "#,
        ];
        for p in cases {
            let map = as_map(p);
            let claims = Claims::parse(p.as_bytes(), "sub", &req);
            assert_eq!(claims.is_some(), map.is_some(), "{p}");
            let (Some(c), Some(m)) = (claims, map) else { continue };
            assert_eq!(c.exp.as_ref(), m.get("exp"), "{p}");
            assert_eq!(c.nbf.as_ref(), m.get("nbf"), "{p}");
            assert_eq!(c.iat.as_ref(), m.get("iat"), "{p}");
            assert_eq!(c.iss.as_ref(), m.get("iss"), "{p}");
            assert_eq!(c.aud.as_ref(), m.get("aud"), "{p}");
            assert_eq!(c.subject.as_ref(), m.get("sub"), "{p}");
            assert_eq!(c.jti.as_ref(), m.get("jti"), "{p}");
            assert_eq!(c.required_seen, req.iter().map(|r| m.contains_key(r)).collect::<Vec<_>>(), "{p}");
        }
        // Another subject claim; the same claim may fill two roles.
        let c = Claims::parse(br#"{"email":"e@x","jti":"j"}"#, "email", &[]).unwrap();
        assert_eq!(c.subject, Some(json!("e@x")));
        let c = Claims::parse(br#"{"jti":"j"}"#, "jti", &[]).unwrap();
        assert_eq!((c.subject, c.jti), (Some(json!("j")), Some(json!("j"))));
    }

    proptest::proptest! {
        /// Random edits of a payload: accepted exactly when a map accepts it, with the same values.
        #[test]
        fn claims_parse_agrees_with_a_map_on_mangled_payloads(
            cut in 0usize..120,
            insert in proptest::sample::select(vec!["", ",", "\"", "\\", "1e400", "\"exp\":2,", "}", "{", "[", "null", "\\u0000", " "]),
        ) {
            let base = r#"{"iss":"https://iss","sub":"s","aud":["a"],"exp":1800000060,"iat":1800000000,"jti":"j","x":{"y":[1,2.5,true]}}"#;
            let at = cut.min(base.len());
            let p = format!("{}{}{}", &base[..at], insert, &base[at..]);
            let map = as_map(&p);
            let claims = Claims::parse(p.as_bytes(), "sub", &["x".to_string()]);
            proptest::prop_assert_eq!(claims.is_some(), map.is_some(), "{}", p);
            if let (Some(c), Some(m)) = (claims, map) {
                proptest::prop_assert_eq!(c.exp.as_ref(), m.get("exp"));
                proptest::prop_assert_eq!(c.subject.as_ref(), m.get("sub"));
                proptest::prop_assert_eq!(c.aud.as_ref(), m.get("aud"));
                proptest::prop_assert_eq!(c.required_seen[0], m.contains_key("x"));
            }
        }
    }

    #[test]
    fn verified_tokens_keep_every_claim() {
        let r = ring();
        let token = sign(&r, "es", json!({"alg": "ES256", "kid": "es"}), claims(json!({"roles": ["a"], "n": 1.5})));
        let v = validate(&token, &r, &policy(SessionMode::Single), NOW).unwrap();
        let m = v.claims();
        assert_eq!(m.get("roles"), Some(&json!(["a"])));
        assert_eq!(m.get("n"), Some(&json!(1.5)));
        assert_eq!(m.get("iss"), Some(&json!("https://iss")));
        assert_eq!(m.len(), 8);
    }

    #[test]
    fn compact_form_is_three_non_empty_base64url_segments() {
        assert_eq!(split_compact("a.b.c"), Some(("a", "b", "c")));
        assert_eq!(split_compact("aZ09-_.x.Y-_"), Some(("aZ09-_", "x", "Y-_")));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            ".b.c",
            "a..c",
            "a.b.",
            "a.b+.c",
            "a.b.c=",
            "a.b.c ",
            "a.\u{e9}.c",
            "a.b.c\n",
            "..",
            "...",
        ] {
            assert_eq!(split_compact(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_members_are_read_strictly() {
        let r = ring();
        let p = policy(SessionMode::Single);
        let long_typ = format!(r#"{{"alg":"ES256","kid":"es","typ":"{}"}}"#, "J".repeat(2000));
        let cases: Vec<(&str, String, Result<(), Reject>)> = vec![
            ("escaped strings", r#"{"alg":"ES256","kid":"es","typ":"JWT"}"#.into(), Ok(())),
            (
                "white space, unknown members",
                r#" { "x": [1, {"y": null}], "alg": "ES256", "kid": "es" } "#.into(),
                Ok(()),
            ),
            ("a header longer than the stack buffer", long_typ, Ok(())),
            ("duplicate alg", r#"{"alg":"HS256","alg":"ES256","kid":"es"}"#.into(), Err(Reject::BadHeader)),
            ("duplicate kid", r#"{"alg":"ES256","kid":"hs","kid":"es"}"#.into(), Err(Reject::BadHeader)),
            ("array, not object", r#"["ES256","es"]"#.into(), Err(Reject::BadHeader)),
            ("not JSON", r#"{"alg":"ES256","kid":"es""#.into(), Err(Reject::BadHeader)),
            ("trailing data", r#"{"alg":"ES256","kid":"es"} x"#.into(), Err(Reject::BadHeader)),
            ("crit null", r#"{"alg":"ES256","kid":"es","crit":null}"#.into(), Err(Reject::ForbiddenHeader)),
            ("jwk object", r#"{"alg":"ES256","kid":"es","jwk":{"kty":"EC"}}"#.into(), Err(Reject::ForbiddenHeader)),
            ("zip", r#"{"alg":"ES256","kid":"es","zip":"DEF"}"#.into(), Err(Reject::ForbiddenHeader)),
            ("alg number", r#"{"alg":256,"kid":"es"}"#.into(), Err(Reject::AlgNotAllowed)),
            ("alg null", r#"{"alg":null,"kid":"es"}"#.into(), Err(Reject::AlgNotAllowed)),
            ("alg none", r#"{"alg":"none","kid":"es"}"#.into(), Err(Reject::AlgNotAllowed)),
            ("no alg", r#"{"kid":"es"}"#.into(), Err(Reject::AlgNotAllowed)),
            ("kid null", r#"{"alg":"ES256","kid":null}"#.into(), Err(Reject::BadHeader)),
            ("kid list", r#"{"alg":"ES256","kid":["es"]}"#.into(), Err(Reject::BadHeader)),
            ("no kid", r#"{"alg":"ES256"}"#.into(), Err(Reject::MissingKid)),
        ];
        for (name, header, want) in cases {
            let token = sign_raw_header(&r, "es", &header);
            assert_eq!(validate(&token, &r, &p, NOW).map(|_| ()), want, "{name}");
        }
        // base64url characters, but a length no encoding has.
        let good = sign_raw_header(&r, "es", r#"{"alg":"ES256","kid":"es"}"#);
        let (h64, rest) = good.split_once('.').unwrap();
        let h64 = if h64.len() % 4 == 0 {
            format!("{h64}A")
        } else {
            format!("{h64}AAAA")[..h64.len() / 4 * 4 + 5].to_string()
        };
        assert_eq!(h64.len() % 4, 1);
        assert_eq!(validate(&format!("{h64}.{rest}"), &r, &p, NOW).unwrap_err(), Reject::BadHeader);
    }

    #[test]
    fn identity_values_reach_the_app_exactly_or_not_at_all() {
        for ok in ["alice", "a b", "user@example.com", "x\ty", "{\"k\":1}"] {
            assert!(header_safe(ok), "{ok:?}");
        }
        for bad in [" alice", "alice ", "\talice", "jos\u{e9}", "a\r\nb", "a\u{7f}", "a\0"] {
            assert!(!header_safe(bad), "{bad:?}");
            assert_eq!(identity_value(Some(&json!(bad))), Err(Reject::UnrepresentableClaim));
        }
        assert_eq!(identity_value(None), Ok(None));
        assert_eq!(identity_value(Some(&Value::Null)), Ok(None));
        assert_eq!(identity_value(Some(&json!(42))).unwrap().unwrap(), "42");
        assert_eq!(identity_value(Some(&json!(["a", 1]))).unwrap().unwrap(), r#"["a",1]"#);
    }

    #[test]
    fn bearer_extraction() {
        let mut h = HeaderMap::new();
        assert_eq!(extract_bearer(&h, None), Err(Reject::Missing));
        h.insert("authorization", "BeArEr abc".parse().unwrap());
        assert_eq!(extract_bearer(&h, None), Ok("abc"));
        assert_eq!(extract_bearer(&h, Some("x=1&access_token=abc")), Err(Reject::AmbiguousCredentials));
        // Found by a property test: only `access%5Ftoken` was recognised among encoded spellings.
        for q in ["ACCESS_TOKEN=a", "access%5ftoken=a", "acc%65ss_token=a", "%61ccess_toke%6E", "x&access%5Ftoken"] {
            assert_eq!(extract_bearer(&h, Some(q)), Err(Reject::AmbiguousCredentials), "{q}");
        }
        for q in ["access_tokens=a", "access_token%=a", "access%255Ftoken=a", "x=access_token"] {
            assert_eq!(extract_bearer(&h, Some(q)), Ok("abc"), "{q}");
        }
        h.append("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(extract_bearer(&h, None), Err(Reject::AmbiguousCredentials));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(extract_bearer(&h, None), Err(Reject::NotBearer));
        h.insert("authorization", "Bearer".parse().unwrap());
        assert_eq!(extract_bearer(&h, None), Err(Reject::NotBearer));
    }

    #[test]
    fn minted_tokens_validate_and_reserved_claims_are_refused() {
        let r = ring();
        let p = policy(SessionMode::Multi);
        let m = mint(&r, "https://iss", "alice", json!("a"), Map::new(), NOW, 60).unwrap();
        let v = validate(&m.token, &r, &p, NOW).unwrap();
        assert_eq!(v.sub.as_deref(), Some("alice"));
        assert_eq!(v.jti.as_deref(), Some(m.jti.as_str()));
        assert_eq!(v.kid, "es");
        let mut extra = Map::new();
        extra.insert("exp".into(), json!(1));
        assert!(matches!(
            mint(&r, "https://iss", "alice", json!("a"), extra, NOW, 60),
            Err(MintError::ReservedClaim(_))
        ));
        assert_ne!(new_jti(), new_jti());
    }
}
