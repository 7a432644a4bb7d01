//! `r4b coordinator --metrics-port`: the replica's Prometheus text at `GET /metrics`, on its own
//! port (the coordinator's main port speaks gRPC only). `r4b serve` needs none: its gateway's
//! `/metrics` carries the in-process coordinator's metrics too.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::header;
use axum::routing::get;
use axum::Router;
use r4b_coordinator::EngineHandle;

/// Binds `addr` and serves `/metrics` of `engine` in the background.
pub async fn spawn(addr: SocketAddr, engine: EngineHandle) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics port {addr}"))?;
    eprintln!(
        "r4b: coordinator metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let engine = engine.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    engine.metrics_text(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("coordinator metrics server: {e}");
        }
    });
    Ok(())
}
