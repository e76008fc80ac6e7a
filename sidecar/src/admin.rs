//! The admin listener: liveness, readiness, Prometheus metrics.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::app::{App, Body, full, json_response};

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
    Ok(match req.uri().path() {
        "/healthz" | "/livez" => Response::new(full("ok\n")),
        "/readyz" => {
            let ready = app.ready();
            let ring = app.keys.ring();
            json_response(
                if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE },
                &json!({
                    "ready": ready,
                    "redis": if app.stateful() { json!(app.redis_ready()) } else { json!("not used") },
                    "failurePolicy": app.cfg.failure_policy,
                    "sessionMode": app.cfg.session_mode,
                    "keys": ring.keys.len(),
                    "currentKid": ring.current_kid(),
                    "canMint": ring.signer().is_some(),
                    "externalIssuers": app.external.issuers.iter().map(|x| json!({
                        "issuer": x.cfg.issuer,
                        "keys": x.keys().keys.len(),
                        "lastError": x.last_error(),
                    })).collect::<Vec<_>>(),
                }),
            )
        }
        "/metrics" => {
            let mut r = Response::new(full(app.metrics.encode()));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        _ => {
            let mut r = Response::new(full("not found\n"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    })
}
