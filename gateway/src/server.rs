//! The HTTP server loop: hyper with a header-read timeout, so neither a client that never
//! finishes its headers (slowloris) nor an idle keep-alive connection holds a socket forever.
//!
//! hyper's HTTP/1 header timer runs whenever the server waits for a request head: while the
//! first headers trickle in, and again while a keep-alive connection sits idle after a response.
//! One setting therefore bounds both; the timer does not run while a request body is read or a
//! response (an SSE stream) is written. HTTP/2 connections are pinged and closed when the peer
//! stops answering.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Connection-level limits.
#[derive(Clone, Copy, Debug)]
pub struct HttpTimeouts {
    /// Longest wait for a request's headers, also the idle keep-alive timeout (see the module
    /// docs). Default 10 s.
    pub header_read: Duration,
    /// How long in-flight connections may take to finish once shutdown began. Default 10 s.
    pub graceful_close: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            header_read: Duration::from_secs(10),
            graceful_close: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and gives open
/// connections `graceful_close` to finish their responses.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    timeouts: HttpTimeouts,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Small SSE chunks and responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection closed: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(timeouts.graceful_close, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {:?} after shutdown began; closing them",
            timeouts.graceful_close
        );
    }
    Ok(())
}
