//! Listeners, connection serving and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::app::{App, Body};

/// hyper's HTTP/1 read-buffer limit: a head that does not fit is answered 431 by hyper.
fn hyper_buf_size(app: &App) -> usize {
    app.cfg.limits.max_header_bytes.max(8192) + 1024
}

fn builder(app: &App) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let limits = &app.cfg.limits;
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(hyper_buf_size(app))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(256);
    b
}

/// Accept connections on `listener` until `shutdown` flips, then drain in-flight requests
/// for at most `drain`.
pub async fn serve<F, Fut>(
    app: Arc<App>,
    listener: TcpListener,
    guard_framing: bool,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handler: F,
) where
    F: Fn(SocketAddr, http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let builder = builder(&app);
    let graceful = GracefulShutdown::new();
    // Above hyper's limit: hyper has answered 431 before the guard would stop inspecting a head.
    let max_head = hyper_buf_size(&app) + 1;
    loop {
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        if guard_framing {
            // Set when this connection answers 101: the guard then steps aside for the new protocol.
            let switched = Arc::new(AtomicBool::new(false));
            let flag = switched.clone();
            let svc = service_fn(move |req| {
                let (h, flag) = (h.clone(), flag.clone());
                async move {
                    let resp = h(peer, req).await?;
                    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        flag.store(true, Ordering::Release);
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = TokioIo::new(crate::framing::Guarded::new(stream, max_head, switched));
            let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
            tokio::spawn(graceful.watch(conn));
        } else {
            let svc = service_fn(move |req| h(peer, req));
            let io = TokioIo::new(stream);
            let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
            tokio::spawn(graceful.watch(conn));
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain deadline passed with connections still open");
    }
}
