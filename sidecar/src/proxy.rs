//! The public listener: authenticate, then stream the request to the app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use authrealm_contract::FailurePolicy;

use crate::app::{App, Body, BoxError, full, json_response, now_unix};
use crate::authz::AmbiguousPath;
use crate::longlived::Grant;
use crate::paths::path_is_public_candidate;
use crate::tokencache::VerifiedToken;

/// Responses announcing at most this many bytes are not re-checked while they stream.
const SHORT_BODY_BYTES: u64 = 256 * 1024;
use crate::session::SessionState;
use crate::token::{Reject, extract_bearer, identity_str, identity_value};

pub type UpstreamClient = crate::upstream::Upstream;

/// The keep-alive connection pool to the app (see `upstream`): at most `limits.maxConnections`
/// idle connections.
pub fn upstream_client(app: &App) -> UpstreamClient {
    crate::upstream::Pool::new(
        &app.cfg.upstream.address,
        Duration::from_millis(app.cfg.upstream.connect_timeout_ms),
        app.cfg.limits.max_connections as usize,
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// RFC 9110 §7.6.1 hop-by-hop fields, always removed when forwarding.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a `Connection` header lists `token` (ASCII case-insensitive), without allocating.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

/// Position of `name` in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = if name == header::CONNECTION {
        0
    } else if name == header::PROXY_AUTHORIZATION {
        3
    } else if name == header::TE {
        4
    } else if name == header::TRAILER {
        5
    } else if name == header::TRANSFER_ENCODING {
        6
    } else if name == header::UPGRADE {
        7
    } else {
        match name.as_str() {
            "keep-alive" => 1,
            "proxy-connection" => 2,
            _ => return None,
        }
    };
    debug_assert_eq!(HOP_BY_HOP[i], name);
    Some(i)
}

/// Remove the names a `Connection` value lists (never `host`).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    for t in connection.as_bytes().split(|&b| b == b',').map(|t| t.trim_ascii()) {
        // Never let `Connection: host` or similar remove framing-critical fields.
        if t.is_empty() || t.eq_ignore_ascii_case(b"host") {
            continue;
        }
        // A `&str` key is matched case-insensitively without allocating; invalid names match
        // nothing.
        if let Ok(name) = std::str::from_utf8(t) {
            headers.remove(name);
        }
    }
}

/// Remove hop-by-hop headers and those the sender declared hop-by-hop in `Connection`.
/// Returns the `Upgrade` value when the message asked for a protocol upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // One pass over the names, no hashing; most messages carry none or only `Connection`.
    let mut present = 0u16;
    for n in headers.keys() {
        if let Some(i) = hop_by_hop_index(n) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return None;
    }
    let mut upgrade = None;
    if present & 1 != 0 {
        if connection_has(headers, "upgrade") {
            upgrade = headers.get(header::UPGRADE).cloned();
        }
        let mut values = headers.get_all(header::CONNECTION).iter();
        match (values.next().cloned(), values.next().is_some()) {
            (Some(v), false) => remove_listed(headers, &v),
            _ => {
                let all: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
                for v in &all {
                    remove_listed(headers, v);
                }
            }
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    upgrade
}

/// `name` (a header name, lower case) equals `folded` with `_` read as `-`.
fn folds_to(name: &str, folded: &str) -> bool {
    name.len() == folded.len()
        && name.bytes().zip(folded.bytes()).all(|(a, b)| (if a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == b)
}

/// `X-Forwarded-For` with the peer's address appended.
fn forwarded_for(prev: Option<&HeaderValue>, peer: std::net::IpAddr) -> Option<HeaderValue> {
    let mut buf = [0u8; 64];
    let format = |buf: &mut [u8; 64]| -> Option<usize> {
        use std::io::Write as _;
        let mut w = &mut buf[..];
        write!(w, "{peer}").ok()?;
        let left = w.len();
        Some(64 - left)
    };
    match prev {
        None => {
            // Most requests carry none: the peer's address alone, formatted once per thread and
            // address (a new value costs formatting and an allocation; a clone is a reference count).
            thread_local! {
                static LAST: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> =
                    const { std::cell::RefCell::new(None) };
            }
            LAST.with(|last| {
                let mut last = last.borrow_mut();
                match &*last {
                    Some((addr, v)) if *addr == peer => Some(v.clone()),
                    _ => {
                        let n = format(&mut buf)?;
                        let v = HeaderValue::from_bytes(&buf[..n]).ok()?;
                        *last = Some((peer, v.clone()));
                        Some(v)
                    }
                }
            })
        }
        Some(prev) => {
            let n = format(&mut buf)?;
            let ip = &buf[..n];
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
        }
    }
}

fn www_auth_response(app: &App, reject: Reject) -> Response<Body> {
    let status = reject.status();
    let mut r = Response::new(full(match reject.error_code() {
        Some(code) => format!("{{\"error\":\"{code}\"}}"),
        None => "{\"error\":\"unauthorized\"}".to_string(),
    }));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let value = match reject.error_code() {
        None => app.www_authenticate.clone(),
        Some("invalid_token") => app.www_authenticate_invalid.clone(),
        Some(code) => {
            HeaderValue::from_str(&format!("Bearer realm=\"{}\", error=\"{code}\"", app.cfg.realm)).expect("ascii")
        }
    };
    h.insert(header::WWW_AUTHENTICATE, value);
    r
}

/// `403` for a valid token that lacks what the route requires (RFC 6750 §3.1): the rule's
/// precomputed challenge names the required scopes, never anything from the token.
fn forbidden(rule: &crate::authz::Rule) -> Response<Body> {
    let mut r = Response::new(full(&b"{\"error\":\"insufficient_scope\"}"[..]));
    *r.status_mut() = StatusCode::FORBIDDEN;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::WWW_AUTHENTICATE, rule.challenge.clone());
    r
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn unavailable() -> Response<Body> {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "session store unavailable\n");
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Size of the request line and headers as they would appear on the wire.
fn head_size(req: &Request<Incoming>) -> usize {
    let uri = req.uri().path_and_query().map(|p| p.as_str().len()).unwrap_or(1);
    uri + 16 + req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>()
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1 message carries one,
/// joined with "; " (RFC 9113 §8.2.3). Many apps read only the first.
fn join_cookies(headers: &mut http::HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let parts: Vec<Vec<u8>> = headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes().to_vec()).collect();
    let joined = parts.join(&b"; "[..]);
    headers.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Outcome of authentication for one request.
enum Auth {
    Public,
    /// The verified token: its identity headers for the app, and what a long-lived exchange
    /// needs to re-check it.
    Allowed(Grant),
}

/// Verify `token`, or find it verified in the cache (then only the time checks run again).
async fn verify(app: &App, token: &str, now: i64) -> Result<Grant, Reject> {
    // Computed before any key is read: a key set that changes meanwhile makes this entry stale.
    let digest = app.trust_digest(&app.keys.ring().digest);
    if let Some(v) = app.token_cache.get(token, &digest) {
        v.check_time(now, app.policy.leeway)?;
        return Ok(v);
    }
    let started = Instant::now();
    let verified = app.validate_token(token, now).await;
    app.metrics.validation_seconds.observe(started.elapsed().as_secs_f64());
    let (v, external) = verified?;
    // The claims map is built only when an identity header or a rule reads a claim beyond `sub`
    // and `jti` (validation has both).
    let mut claims = None;
    let mut identity = Vec::with_capacity(app.identity.len());
    for ih in &app.identity {
        // `sub` is the token's subject: for an external issuer, its `subjectClaim`.
        let value = match ih.claim.as_str() {
            "sub" => v.sub.as_deref().map(identity_str).transpose()?,
            "jti" => v.jti.as_deref().map(identity_str).transpose()?,
            name => identity_value(claims.get_or_insert_with(|| v.claims()).get(name))?,
        };
        if let Some(value) = value {
            identity.push((ih.name.clone(), value));
        }
    }
    let authz = if app.authz.reads_claims() {
        app.authz.grant(claims.get_or_insert_with(|| v.claims()))
    } else {
        Default::default()
    };
    let session_key = app
        .session_layout
        .as_ref()
        .map(|l| crate::session::SessionKey::new(l, v.sub.as_deref().unwrap_or(""), v.jti.as_deref().unwrap_or("")));
    let grant = Arc::new(VerifiedToken {
        kid: v.kid,
        sub: v.sub,
        jti: v.jti,
        iat: v.iat,
        nbf: v.nbf,
        exp: v.exp,
        identity,
        authz,
        external,
        session_key,
    });
    app.token_cache.insert(token, &digest, grant.clone());
    Ok(grant)
}

async fn authenticate(app: &App, req: &Request<Incoming>) -> Result<Auth, Box<Response<Body>>> {
    let path = req.uri().path();
    // Dot segments and encoded '.', '/', '\' or ';' never count as public (see `paths`), nor do
    // requests with a method or path override the app may route by.
    if !app.cfg.public_routes.is_empty()
        && path_is_public_candidate(path)
        && app.cfg.public_routes.iter().any(|r| r.matches(req.method().as_str(), path))
        && !crate::authz::has_override(req.uri().query(), req.headers())
    {
        app.metrics.request("public", "public_route");
        return Ok(Auth::Public);
    }
    // The rules that decide this route (authorization.rules), found before any token work; a
    // path the app could resolve to another route is refused when rules exist.
    let decision = match app.authz.decide(req.method().as_str(), path, req.uri().query(), req.headers()) {
        Ok(decision) => decision,
        Err(AmbiguousPath) => {
            app.metrics.request("rejected", "ambiguous_path");
            return Err(Box::new(plain(StatusCode::BAD_REQUEST, "ambiguous request path\n")));
        }
    };
    // A valid, live token: the route's requirements decide (after the session check, so a
    // revoked token gets 401, never 403).
    let admit = |verified: Grant, outcome: &'static str, reason: &'static str| {
        if let Err((rule, denied)) = decision.check(&verified.authz) {
            app.metrics.request("forbidden", denied.label());
            tracing::debug!(reason = denied.label(), rule = rule.index, "request forbidden");
            return Err(Box::new(forbidden(rule)));
        }
        app.metrics.request(outcome, reason);
        Ok(Auth::Allowed(verified))
    };
    let reject = |r: Reject| {
        app.metrics.request("rejected", r.label());
        tracing::debug!(reason = r.label(), "request rejected");
        Err(Box::new(www_auth_response(app, r)))
    };
    let token = match extract_bearer(req.headers(), req.uri().query()) {
        Ok(t) => t,
        Err(r) => return reject(r),
    };
    let verified = match verify(app, token, now_unix()).await {
        Ok(v) => v,
        Err(r) => return reject(r),
    };
    if !app.stateful() {
        return admit(verified, "allowed", "ok");
    }
    let (sub, jti) = (verified.sub.as_deref().unwrap_or(""), verified.jti.as_deref().unwrap_or(""));
    let redis_started = Instant::now();
    let (state, local) = match app.sessions() {
        Some(store) => store.check_sourced(sub, jti, verified.iat, verified.session_key.as_ref()).await,
        None => (Err(crate::session::StoreError::NotConnected), false),
    };
    match state {
        Ok(SessionState::Active) => {
            // A session-cache hit made no Redis round trip: not counted as one.
            if !local {
                app.metrics.redis("check", "ok", redis_started.elapsed().as_secs_f64());
            }
            admit(verified, "allowed", "ok")
        }
        Ok(SessionState::Revoked) => {
            app.metrics.redis("check", "ok", redis_started.elapsed().as_secs_f64());
            reject(Reject::SessionRevoked)
        }
        Err(e) => {
            app.metrics.redis("check", e.kind(), redis_started.elapsed().as_secs_f64());
            match app.cfg.failure_policy {
                FailurePolicy::Closed => {
                    app.metrics.request("unavailable", e.kind());
                    tracing::debug!(error = %e, "session check failed; failing closed");
                    Err(Box::new(unavailable()))
                }
                FailurePolicy::Open => {
                    app.note_fail_open(e.kind());
                    admit(verified, "fail_open", e.kind())
                }
            }
        }
    }
}

/// The public listener's response body: the app's (streamed from its pooled connection, not
/// boxed: one allocation less per request) or any other.
pub enum ProxyBody {
    Upstream(crate::upstream::PooledBody),
    Other(Body),
}

fn other(r: Response<Body>) -> Response<ProxyBody> {
    r.map(ProxyBody::Other)
}

impl http_body::Body for ProxyBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            ProxyBody::Other(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Other(b) => b.is_end_stream(),
        }
    }
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Other(b) => b.size_hint(),
        }
    }
}

/// The public listener's service.
pub async fn handle(
    app: Arc<App>,
    client: UpstreamClient,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // A guard, not inc/dec around the await: hyper drops this future when the client goes away
    // (connection closed, HTTP/2 stream reset) and the gauge must still come down.
    struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);
    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    app.metrics.in_flight.inc();
    let _in_flight = InFlight(&app.metrics.in_flight);
    Ok(handle_inner(&app, &client, peer, req).await)
}

async fn handle_inner(
    app: &Arc<App>,
    client: &UpstreamClient,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    // HTTP-level checks first: they need no key and no Redis.
    if head_size(&req) > app.cfg.limits.max_header_bytes {
        app.metrics.request("rejected", "headers_too_large");
        return other(plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request header fields too large\n"));
    }
    let h = req.headers();
    let te = h.get_all(header::TRANSFER_ENCODING).iter().count();
    let cl = h.get_all(header::CONTENT_LENGTH).iter().count();
    if te > 1 || cl > 1 || (te > 0 && cl > 0) {
        app.metrics.request("rejected", "ambiguous_framing");
        return other(plain(StatusCode::BAD_REQUEST, "ambiguous message framing\n"));
    }
    if req.uri().path() == "/.well-known/jwks.json" && (req.method() == Method::GET || req.method() == Method::HEAD) {
        app.metrics.request("public", "jwks");
        let mut r = Response::new(full(app.keys.ring().jwks_json.clone()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
        return other(r);
    }

    let auth = match authenticate(app, &req).await {
        Ok(a) => a,
        Err(resp) => return other(*resp),
    };

    // Build the upstream request.
    let client_upgrade = if req.version() == Version::HTTP_11 && connection_has(req.headers(), "upgrade") {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    let upgrade = strip_hop_by_hop(&mut parts.headers);
    // Spoofed identity: every header whose folded name matches an identity header.
    let spoofed: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|n| app.identity.iter().any(|i| folds_to(n.as_str(), &i.folded)))
        .cloned()
        .collect();
    for n in spoofed {
        parts.headers.remove(n);
    }
    let grant = match auth {
        Auth::Allowed(grant) => {
            for (name, value) in &grant.identity {
                parts.headers.insert(name.clone(), value.clone());
            }
            Some(grant)
        }
        Auth::Public => None,
    };
    if let (Some(value), Some(_)) = (upgrade, client_upgrade.as_ref()) {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
    let xff = forwarded_for(parts.headers.get(X_FORWARDED_FOR).filter(|v| v.to_str().is_ok()), peer.ip());
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR, v);
    }
    parts.headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if !parts.headers.contains_key(header::HOST) {
        // The client's authority (absolute-form or HTTP/2), else the app's address.
        let host = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => HeaderValue::from_str(&app.cfg.upstream.address).ok(),
        };
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
    }
    // The app gets origin-form (`/path?query`); most requests already are.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        parts.uri = match Uri::builder().path_and_query(pq).build() {
            Ok(u) => u,
            Err(_) => return other(plain(StatusCode::BAD_REQUEST, "bad request target\n")),
        };
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    parts.version = Version::HTTP_11;
    let body_limit = Duration::from_millis(app.cfg.limits.body_read_timeout_ms);
    let upstream_req = Request::from_parts(parts, crate::longlived::BodyDeadline::new(body, body_limit));

    // One clock read for both the deadline and the latency metric.
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(app.cfg.upstream.response_timeout_ms);
    let mut resp = match tokio::time::timeout_at(deadline, client.request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            app.metrics.upstream_response("error");
            tracing::warn!(error = %e, "upstream request failed");
            return other(plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n"));
        }
        Err(_) => {
            app.metrics.upstream_response("timeout");
            return other(plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"));
        }
    };
    app.metrics.upstream_seconds.observe(started.elapsed().as_secs_f64());
    app.metrics.upstream_response(status_class(resp.status()));

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return other(plain(StatusCode::BAD_GATEWAY, "unexpected protocol switch\n"));
        };
        let Ok(slot) = app.tunnels.clone().try_acquire_owned() else {
            app.metrics.connections_refused.inc();
            return other(plain(StatusCode::SERVICE_UNAVAILABLE, "too many upgraded connections\n"));
        };
        let websocket = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // The connection now belongs to the tunnel: drive it until it hands its socket over.
        resp.body_mut().take_upgrade();
        let app = app.clone();
        tokio::spawn(async move {
            match (client_upgrade.await, upstream_upgrade.await) {
                (Ok(c), Ok(u)) => {
                    crate::longlived::tunnel(app, grant, TokioIo::new(c), TokioIo::new(u), websocket).await;
                }
                _ => tracing::debug!("upgrade failed"),
            }
            drop(slot);
        });
        let (mut parts, _) = resp.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade {
            parts.headers.insert(header::UPGRADE, u);
        }
        return other(Response::from_parts(parts, full(bytes::Bytes::new())));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // A response that may stream for long re-checks its token while it does (see longlived).
    let short = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= SHORT_BODY_BYTES);
    match grant {
        Some(grant) if !short && !body.is_end_stream() => {
            let sse = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
            let body = body.map_err(BoxError::from);
            let body = crate::longlived::Revalidated::new(body, app.clone(), grant, sse).boxed();
            Response::from_parts(parts, ProxyBody::Other(body))
        }
        _ => Response::from_parts(parts, ProxyBody::Upstream(body)),
    }
}

/// A JSON error body for the issuer API and admin listener.
pub fn json_error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": code, "error_description": description }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_lists_are_removed() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "Keep-Alive, X-Secret ,upgrade"),
            ("connection", "HOST, x-other"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("X-Other", "2"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("trailer", "x"),
            ("x-kept", "3"),
        ]);
        let upgrade = strip_hop_by_hop(&mut h);
        assert_eq!(upgrade.unwrap(), "websocket");
        assert_eq!(names(&h), ["host", "x-kept"]);

        let mut h = map(&[("host", "a"), ("connection", "close")]);
        assert!(strip_hop_by_hop(&mut h).is_none());
        assert_eq!(names(&h), ["host"]);

        let mut h = map(&[("host", "a"), ("x-a", "1")]);
        assert!(strip_hop_by_hop(&mut h).is_none());
        assert_eq!(names(&h), ["host", "x-a"]);

        // Garbage tokens match nothing and break nothing.
        let mut h = map(&[("connection", "bad name, (x), ,,"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-a"]);
    }

    #[test]
    fn identity_names_fold_underscores_and_case() {
        assert!(folds_to("x-auth-subject", "x-auth-subject"));
        assert!(folds_to("x_auth_subject", "x-auth-subject"));
        assert!(folds_to("x-auth_subject", "x-auth-subject"));
        assert!(!folds_to("x-auth-subjec", "x-auth-subject"));
        assert!(!folds_to("x-auth-subjects", "x-auth-subject"));
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(forwarded_for(None, ip).unwrap(), "10.1.2.3");
        let prev = HeaderValue::from_static("1.1.1.1");
        assert_eq!(forwarded_for(Some(&prev), ip).unwrap(), "1.1.1.1, 10.1.2.3");
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert_eq!(forwarded_for(None, v6).unwrap(), "::1");
        // The per-thread cache answers for its address only.
        for _ in 0..3 {
            assert_eq!(forwarded_for(None, ip).unwrap(), "10.1.2.3");
            assert_eq!(forwarded_for(None, ip).unwrap(), "10.1.2.3");
            assert_eq!(forwarded_for(None, v6).unwrap(), "::1");
            assert_eq!(forwarded_for(Some(&prev), v6).unwrap(), "1.1.1.1, ::1");
        }
    }
}
