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
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use authrealm_contract::FailurePolicy;

use crate::app::{App, Body, BoxError, full, json_response, now_unix};
use crate::longlived::Grant;
use crate::paths::path_is_public_candidate;

/// Responses announcing at most this many bytes are not re-checked while they stream.
const SHORT_BODY_BYTES: u64 = 256 * 1024;
use crate::session::SessionState;
use crate::token::{Reject, extract_bearer, identity_value, validate};

pub type UpstreamClient = Client<HttpConnector, crate::longlived::BodyDeadline<Incoming>>;

pub fn upstream_client(app: &App) -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(Duration::from_millis(app.cfg.upstream.connect_timeout_ms)));
    conn.set_nodelay(true);
    conn.enforce_http(true);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(conn)
}

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

/// Remove hop-by-hop headers and those the sender declared hop-by-hop in `Connection`.
/// Returns whether the message asked for a protocol upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
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
    /// The identity headers for the app, computed once from the verified claims, and what a
    /// long-lived exchange needs to re-check the token.
    Allowed(Vec<(HeaderName, HeaderValue)>, Grant),
}

fn grant(v: crate::token::Verified) -> Grant {
    Grant { kid: v.kid, sub: v.sub, jti: v.jti, iat: v.iat, exp: v.exp }
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
    let started = Instant::now();
    let verified = {
        let ring = app.keys.ring();
        validate(token, &ring, &app.policy, now_unix())
    };
    app.metrics.validation_seconds.observe(started.elapsed().as_secs_f64());
    let verified = match verified {
        Ok(v) => v,
        Err(r) => return reject(r),
    };
    let mut identity = Vec::with_capacity(app.identity.len());
    for ih in &app.identity {
        match identity_value(verified.claims.get(&ih.claim)) {
            Ok(Some(value)) => identity.push((ih.name.clone(), value)),
            Ok(None) => {}
            Err(r) => return reject(r),
        }
    }
    if !app.stateful() {
        app.metrics.request("allowed", "ok");
        return Ok(Auth::Allowed(identity, grant(verified)));
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
            Ok(Auth::Allowed(identity, grant(verified)))
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
                    Ok(Auth::Allowed(identity, grant(verified)))
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
    let client_upgrade =
        if req.version() == Version::HTTP_11 && connection_tokens(req.headers()).iter().any(|t| t == "upgrade") {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().cloned();
    let upgrade = strip_hop_by_hop(&mut parts.headers);
    // Spoofed identity: every header whose folded name matches an identity header.
    let spoofed: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|n| {
            let folded = crate::app::fold_header_name(n.as_str());
            app.identity.iter().any(|i| i.folded == folded)
        })
        .cloned()
        .collect();
    for n in spoofed {
        parts.headers.remove(n);
    }
    let grant = match auth {
        Auth::Allowed(identity, grant) => {
            for (name, value) in identity {
                parts.headers.insert(name, value);
            }
            Some(grant)
        }
        Auth::Public => None,
    };
    if let (Some(value), Some(_)) = (upgrade.clone(), client_upgrade.as_ref()) {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
    let peer_ip = peer.ip().to_string();
    let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri =
        match Uri::builder().scheme("http").authority(app.cfg.upstream.address.as_str()).path_and_query(pq).build() {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request target\n"),
        };
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
            app.metrics.upstream_responses.get_or_create(&crate::metrics::StatusLabel { status: "error" }).inc();
            tracing::warn!(error = %e, "upstream request failed");
            return plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n");
        }
        Err(_) => {
            app.metrics.upstream_responses.get_or_create(&crate::metrics::StatusLabel { status: "timeout" }).inc();
            return plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n");
        }
    };
    app.metrics.upstream_seconds.observe(started.elapsed().as_secs_f64());
    app.metrics
        .upstream_responses
        .get_or_create(&crate::metrics::StatusLabel { status: status_class(resp.status()) })
        .inc();

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
