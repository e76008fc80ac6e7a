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
use crate::longlived::Grant;
use crate::paths::path_is_public_candidate;
use crate::tokencache::VerifiedToken;

/// Responses announcing at most this many bytes are not re-checked while they stream.
const SHORT_BODY_BYTES: u64 = 256 * 1024;
use crate::session::SessionState;
use crate::token::{Reject, extract_bearer, identity_value, validate};

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

/// Names listed in `Connection` headers (lower case).
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a `Connection` header lists `token` (ASCII case-insensitive), without allocating.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Remove hop-by-hop headers and those the sender declared hop-by-hop in `Connection`.
/// Returns the `Upgrade` value when the message asked for a protocol upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Most messages carry none of them: one pass over the names, no hashing.
    if !headers.keys().any(is_hop_by_hop) {
        return None;
    }
    let tokens = connection_tokens(headers);
    let upgrade = if tokens.iter().any(|t| t == "upgrade") { headers.get(header::UPGRADE).cloned() } else { None };
    for t in &tokens {
        // Never let `Connection: host` or similar remove framing-critical fields.
        if t == "host" {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
            headers.remove(name);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
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
    use std::io::Write as _;
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    write!(w, "{peer}").ok()?;
    let left = w.len();
    let ip = &buf[..buf.len() - left];
    match prev {
        None => HeaderValue::from_bytes(ip).ok(),
        Some(prev) => {
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
fn verify(app: &App, token: &str, now: i64) -> Result<Grant, Reject> {
    let ring = app.keys.ring();
    if let Some(v) = app.token_cache.get(token, &ring.digest) {
        v.check_time(now, app.policy.leeway)?;
        return Ok(v);
    }
    let started = Instant::now();
    let verified = validate(token, &ring, &app.policy, now);
    app.metrics.validation_seconds.observe(started.elapsed().as_secs_f64());
    let v = verified?;
    let mut identity = Vec::with_capacity(app.identity.len());
    for ih in &app.identity {
        if let Some(value) = identity_value(v.claims.get(&ih.claim))? {
            identity.push((ih.name.clone(), value));
        }
    }
    let grant =
        Arc::new(VerifiedToken { kid: v.kid, sub: v.sub, jti: v.jti, iat: v.iat, nbf: v.nbf, exp: v.exp, identity });
    app.token_cache.insert(token, &ring.digest, grant.clone());
    Ok(grant)
}

async fn authenticate(app: &App, req: &Request<Incoming>) -> Result<Auth, Box<Response<Body>>> {
    let path = req.uri().path();
    // Dot segments and encoded '.', '/', '\' or ';' never count as public (see `paths`).
    if path_is_public_candidate(path) && app.cfg.public_routes.iter().any(|r| r.matches(req.method().as_str(), path)) {
        app.metrics.request("public", "public_route");
        return Ok(Auth::Public);
    }
    let reject = |r: Reject| {
        app.metrics.request("rejected", r.label());
        tracing::debug!(reason = r.label(), "request rejected");
        Err(Box::new(www_auth_response(app, r)))
    };
    let token = match extract_bearer(req.headers(), req.uri().query()) {
        Ok(t) => t,
        Err(r) => return reject(r),
    };
    let verified = match verify(app, token, now_unix()) {
        Ok(v) => v,
        Err(r) => return reject(r),
    };
    if !app.stateful() {
        app.metrics.request("allowed", "ok");
        return Ok(Auth::Allowed(verified));
    }
    let (sub, jti) = (verified.sub.as_deref().unwrap_or(""), verified.jti.as_deref().unwrap_or(""));
    let redis_started = Instant::now();
    let state = match app.sessions() {
        Some(store) => store.check(sub, jti, verified.iat).await,
        None => Err(crate::session::StoreError::NotConnected),
    };
    match state {
        Ok(SessionState::Active) => {
            app.metrics.redis("check", "ok", redis_started.elapsed().as_secs_f64());
            app.metrics.request("allowed", "ok");
            Ok(Auth::Allowed(verified))
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
                    app.metrics.request("fail_open", e.kind());
                    Ok(Auth::Allowed(verified))
                }
            }
        }
    }
}

/// The public listener's service.
pub async fn handle(
    app: Arc<App>,
    client: UpstreamClient,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
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
) -> Response<Body> {
    // HTTP-level checks first: they need no key and no Redis.
    if head_size(&req) > app.cfg.limits.max_header_bytes {
        app.metrics.request("rejected", "headers_too_large");
        return plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request header fields too large\n");
    }
    let h = req.headers();
    let te = h.get_all(header::TRANSFER_ENCODING).iter().count();
    let cl = h.get_all(header::CONTENT_LENGTH).iter().count();
    if te > 1 || cl > 1 || (te > 0 && cl > 0) {
        app.metrics.request("rejected", "ambiguous_framing");
        return plain(StatusCode::BAD_REQUEST, "ambiguous message framing\n");
    }
    if req.uri().path() == "/.well-known/jwks.json" && (req.method() == Method::GET || req.method() == Method::HEAD) {
        app.metrics.request("public", "jwks");
        let mut r = Response::new(full(app.keys.ring().jwks_json.clone()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
        return r;
    }

    let auth = match authenticate(app, &req).await {
        Ok(a) => a,
        Err(resp) => return *resp,
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
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request target\n"),
        };
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    parts.version = Version::HTTP_11;
    let body_limit = Duration::from_millis(app.cfg.limits.body_read_timeout_ms);
    let upstream_req = Request::from_parts(parts, crate::longlived::BodyDeadline::new(body, body_limit));

    let started = Instant::now();
    let timeout = Duration::from_millis(app.cfg.upstream.response_timeout_ms);
    let mut resp = match tokio::time::timeout(timeout, client.request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            app.metrics.upstream_response("error");
            tracing::warn!(error = %e, "upstream request failed");
            return plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n");
        }
        Err(_) => {
            app.metrics.upstream_response("timeout");
            return plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n");
        }
    };
    app.metrics.upstream_seconds.observe(started.elapsed().as_secs_f64());
    app.metrics.upstream_response(status_class(resp.status()));

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return plain(StatusCode::BAD_GATEWAY, "unexpected protocol switch\n");
        };
        let Ok(slot) = app.tunnels.clone().try_acquire_owned() else {
            app.metrics.connections_refused.inc();
            return plain(StatusCode::SERVICE_UNAVAILABLE, "too many upgraded connections\n");
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
        return Response::from_parts(parts, full(bytes::Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = body.map_err(BoxError::from);
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
            Response::from_parts(parts, crate::longlived::Revalidated::new(body, app.clone(), grant, sse).boxed())
        }
        _ => Response::from_parts(parts, body.boxed()),
    }
}

/// A JSON error body for the issuer API and admin listener.
pub fn json_error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": code, "error_description": description }))
}
