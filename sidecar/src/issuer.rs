//! The issuer API, on a loopback-only listener: mint, revoke, introspect.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use authrealm_contract::SessionMode;

use crate::app::{App, Body, json_response, now_unix, now_unix_ms};
use crate::proxy::json_error;
use crate::session::{Durability, SessionState, StoreError, latest_exp_for_iat};
use crate::token::{MAX_ID_BYTES, MintError, mint};

const MAX_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    subject: String,
    #[serde(default)]
    claims: Option<Map<String, Value>>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    audience: Option<Value>,
}

/// Decode `%XX` escapes of a path segment; `None` on malformed escapes or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits exactly: `from_str_radix` alone would also take a sign ("%+a").
            let hex =
                std::str::from_utf8(b.get(i + 1..i + 3)?).ok().filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(&v.replace('+', " "))).flatten()
    })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(json_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request", "body too large or unreadable")),
    }
}

fn store_error(app: &App, op: &'static str, e: &StoreError) -> Response<Body> {
    app.metrics.issuer_requests.get_or_create(&crate::metrics::OpLabel { op, outcome: "unavailable" }).inc();
    tracing::warn!(op, error = %e, "issuer operation failed: redis unavailable");
    let mut r =
        json_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "session store unavailable; retry");
    r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

fn not_replicated(app: &App, op: &'static str, d: Durability, extra: Value) -> Response<Body> {
    app.metrics.issuer_requests.get_or_create(&crate::metrics::OpLabel { op, outcome: "not_replicated" }).inc();
    let mut body = json!({
        "error": "not_replicated",
        "error_description": "the change was applied on the master but not confirmed by enough replicas in time; retry",
        "replicas_confirmed": d.replicas_confirmed,
        "replicas_required": d.replicas_required,
    });
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let mut r = json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
    r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

fn ok(app: &App, op: &'static str, status: StatusCode, body: Value) -> Response<Body> {
    app.metrics.issuer_requests.get_or_create(&crate::metrics::OpLabel { op, outcome: "ok" }).inc();
    json_response(status, &body)
}

fn bad(app: &App, op: &'static str, status: StatusCode, code: &str, msg: &str) -> Response<Body> {
    app.metrics.issuer_requests.get_or_create(&crate::metrics::OpLabel { op, outcome: "rejected" }).inc();
    json_error(status, code, msg)
}

/// Subjects and jtis: 1..512 bytes of visible ASCII (inner spaces allowed), so the app receives
/// them in `X-Auth-Subject` / `X-Auth-Jti` exactly as they are keyed in Redis (OpenID Connect
/// also limits `sub` to ASCII).
fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_BYTES && crate::token::header_safe(s)
}

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let resp = match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["v1", "tokens"]) => mint_token(&app, req).await,
        (Method::DELETE, ["v1", "tokens", jti]) => {
            let jti = percent_decode(jti);
            let subject = query_param(req.uri().query(), "subject");
            revoke_token(&app, jti, subject).await
        }
        (Method::DELETE, ["v1", "subjects", subject, "tokens"]) => revoke_subject(&app, percent_decode(subject)).await,
        (Method::POST, ["v1", "introspect"]) => introspect(&app, req).await,
        (_, ["v1", ..]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "unsupported method or path"),
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    Ok(resp)
}

async fn mint_token(app: &App, req: Request<Incoming>) -> Response<Body> {
    const OP: &str = "mint";
    if app.keys.ring().signer().is_none() {
        return bad(app, OP, StatusCode::FORBIDDEN, "verify_only", "this sidecar holds no signing key");
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let m: MintRequest = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return bad(app, OP, StatusCode::BAD_REQUEST, "invalid_request", &format!("body: {e}")),
    };
    if !valid_id(&m.subject) {
        return bad(
            app,
            OP,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject must be 1..512 bytes of visible ASCII, without leading or trailing spaces",
        );
    }
    let ttl = m.ttl_seconds.unwrap_or(app.cfg.token_ttl_seconds);
    if ttl == 0 || ttl > app.cfg.max_token_ttl_seconds {
        return bad(
            app,
            OP,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "ttl_seconds must be between 1 and the realm's maximum",
        );
    }
    let audience = match m.audience {
        None => Value::String(app.cfg.audiences[0].clone()),
        Some(Value::String(a)) if app.cfg.audiences.contains(&a) => Value::String(a),
        Some(Value::Array(list))
            if !list.is_empty()
                && list.iter().all(|a| a.as_str().is_some_and(|a| app.cfg.audiences.iter().any(|x| x == a))) =>
        {
            Value::Array(list)
        }
        Some(_) => {
            return bad(
                app,
                OP,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "audience must be one or more of the realm's audiences",
            );
        }
    };
    // Claims the sidecar passes to the app as headers must survive that trip unchanged.
    if let Some(claims) = &m.claims
        && let Some(ih) = app.identity.iter().find(|ih| crate::token::identity_value(claims.get(&ih.claim)).is_err())
    {
        return bad(
            app,
            OP,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "claim {:?} is passed to the app in a header: it must be visible ASCII without leading or trailing spaces",
                ih.claim
            ),
        );
    }
    let iat = match issue_time(app, &m.subject).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let minted = {
        let ring = app.keys.ring();
        mint(&ring, &app.cfg.issuer, &m.subject, audience, m.claims.unwrap_or_default(), iat, ttl as i64)
    };
    let minted = match minted {
        Ok(t) => t,
        Err(MintError::NoSigningKey) => {
            return bad(app, OP, StatusCode::FORBIDDEN, "verify_only", "this sidecar holds no signing key");
        }
        Err(MintError::ReservedClaim(c)) => {
            return bad(app, OP, StatusCode::BAD_REQUEST, "invalid_request", &format!("claim {c:?} is reserved"));
        }
        Err(MintError::Sign) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "signing failed"),
    };
    // Refuse, before any session is registered (single mode would end the previous one), a
    // token this realm's own sidecars would reject.
    if minted.token.len() > app.cfg.limits.max_token_bytes {
        return bad(
            app,
            OP,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the token would exceed limits.maxTokenBytes; send fewer or smaller claims",
        );
    }

    let mut body = json!({
        "access_token": minted.token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "jti": minted.jti,
        "kid": minted.kid,
    });
    if app.stateful() {
        let Some(store) = app.sessions() else { return store_error(app, OP, &StoreError::NotConnected) };
        match store.register(&m.subject, &minted.jti, minted.exp, now_unix_ms()).await {
            Ok((replaced, d)) => {
                if !d.acknowledged() {
                    return not_replicated(app, OP, d, json!({}));
                }
                body["replaced_sessions"] = replaced.into();
                body["replicas_confirmed"] = d.replicas_confirmed.into();
            }
            Err(e) => return store_error(app, OP, &e),
        }
    }
    ok(app, OP, StatusCode::CREATED, body)
}

/// The `iat` of a token minted now for `subject`. In denylist realms "log out everywhere" revokes
/// every token with `iat` at or before the subject's cut-off, a whole second: a token minted in the
/// same second as the log-out would be refused forever. So a mint whose second is not past the
/// cut-off waits for the next second (at most about a second; a "sign out all other sessions,
/// keep this one" flow just works). A cut-off further ahead (written by a pod whose clock runs
/// ahead of ours) is not waited for: the token's `iat` becomes the second after the cut-off.
async fn issue_time(app: &App, subject: &str) -> Result<i64, Response<Body>> {
    const OP: &str = "mint";
    let now_ms = now_unix_ms();
    if app.cfg.session_mode != SessionMode::Denylist {
        return Ok(now_ms.div_euclid(1000));
    }
    let Some(store) = app.sessions() else { return Err(store_error(app, OP, &StoreError::NotConnected)) };
    let cut = match store.cutoff(subject).await {
        Ok(c) => c,
        Err(e) => return Err(store_error(app, OP, &e)),
    };
    Ok(match cut {
        Some(cut) if cut >= now_ms.div_euclid(1000) => {
            let first_ok_ms = (cut + 1) * 1000;
            let wait = first_ok_ms - now_unix_ms();
            if wait > 0 && wait <= 2000 {
                tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
            }
            now_unix().max(cut + 1)
        }
        _ => now_ms.div_euclid(1000),
    })
}

async fn revoke_token(app: &App, jti: Option<String>, subject: Option<String>) -> Response<Body> {
    const OP: &str = "revoke";
    let Some(jti) = jti.filter(|j| valid_id(j)) else {
        return bad(app, OP, StatusCode::BAD_REQUEST, "invalid_request", "malformed jti");
    };
    if !app.stateful() {
        return bad(app, OP, StatusCode::CONFLICT, "stateless_realm", "tokens of a stateless realm cannot be revoked");
    }
    let Some(store) = app.sessions() else { return store_error(app, OP, &StoreError::NotConnected) };
    let now_ms = now_unix_ms();
    let located = match store.locate(&jti).await {
        Ok(l) => l,
        Err(e) => return store_error(app, OP, &e),
    };
    let (exp, sub) = match (located, subject) {
        (Some((exp, sub)), _) => (exp, sub),
        // Tokens minted elsewhere (denylist realms): the caller names the subject.
        (None, Some(sub)) if app.cfg.session_mode == SessionMode::Denylist && valid_id(&sub) => {
            // Such a token is accepted only while iat <= now + leeway on the verifying pod, whose
            // clock may run up to leeway ahead of ours, and exp - iat <= max + leeway
            // (token::validate).
            let latest_iat = now_ms.div_euclid(1000) + 2 * app.cfg.leeway_seconds as i64;
            (latest_exp_for_iat(latest_iat, app.cfg.max_token_ttl_seconds, app.cfg.leeway_seconds), sub)
        }
        (None, _) => {
            return bad(
                app,
                OP,
                StatusCode::NOT_FOUND,
                "unknown_jti",
                "no live token with this jti (expired, never minted here, or already revoked)",
            );
        }
    };
    match store.revoke(&sub, &jti, exp, now_ms).await {
        Ok((revoked, d)) if d.acknowledged() => ok(
            app,
            OP,
            StatusCode::OK,
            json!({ "jti": jti, "revoked": revoked, "replicas_confirmed": d.replicas_confirmed, "replicas_required": d.replicas_required }),
        ),
        Ok((revoked, d)) => not_replicated(app, OP, d, json!({ "jti": jti, "revoked": revoked })),
        Err(e) => store_error(app, OP, &e),
    }
}

async fn revoke_subject(app: &App, subject: Option<String>) -> Response<Body> {
    const OP: &str = "revoke_subject";
    let Some(subject) = subject.filter(|s| valid_id(s)) else {
        return bad(app, OP, StatusCode::BAD_REQUEST, "invalid_request", "malformed subject");
    };
    if !app.stateful() {
        return bad(app, OP, StatusCode::CONFLICT, "stateless_realm", "tokens of a stateless realm cannot be revoked");
    }
    let Some(store) = app.sessions() else { return store_error(app, OP, &StoreError::NotConnected) };
    match store.revoke_subject(&subject, now_unix_ms(), app.cfg.max_token_ttl_seconds).await {
        Ok((n, d)) => {
            let mut body = json!({ "subject": subject, "replicas_confirmed": d.replicas_confirmed, "replicas_required": d.replicas_required });
            // Denylist realms revoke by time cut-off: the count of tokens is unknown.
            body["revoked"] = if n >= 0 { n.into() } else { Value::String("all issued until now".into()) };
            if d.acknowledged() { ok(app, OP, StatusCode::OK, body) } else { not_replicated(app, OP, d, body) }
        }
        Err(e) => store_error(app, OP, &e),
    }
}

/// RFC 7662: `token=…` (form) or `{"token": "…"}` (JSON); inactive tokens get only
/// `{"active": false}`.
async fn introspect(app: &App, req: Request<Incoming>) -> Response<Body> {
    const OP: &str = "introspect";
    let is_json = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let token = if is_json {
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("token")?.as_str().map(str::to_string))
    } else {
        std::str::from_utf8(&body).ok().and_then(|s| query_param(Some(s), "token"))
    };
    let Some(token) = token else {
        return bad(app, OP, StatusCode::BAD_REQUEST, "invalid_request", "missing token parameter");
    };
    let inactive = || ok(app, OP, StatusCode::OK, json!({ "active": false }));
    let Ok((v, _)) = app.validate_token(&token, now_unix()).await else { return inactive() };
    if app.stateful() {
        let Some(store) = app.sessions() else { return store_error(app, OP, &StoreError::NotConnected) };
        match store.check(v.sub.as_deref().unwrap_or(""), v.jti.as_deref().unwrap_or(""), v.iat).await {
            Ok(SessionState::Active) => {}
            Ok(SessionState::Revoked) => return inactive(),
            Err(e) => return store_error(app, OP, &e),
        }
    }
    let mut out = v.claims();
    out.insert("active".into(), true.into());
    out.insert("token_type".into(), "Bearer".into());
    ok(app, OP, StatusCode::OK, Value::Object(out))
}
