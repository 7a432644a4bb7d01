//! `GET /health` (the process is up), `GET /ready` (a replica can generate) and `GET /metrics`
//! (the Prometheus text of [`crate::metrics::Metrics`] plus each replica's load).
//!
//! `/health` is liveness: 200 while this process works, with what each replica is doing
//! (`serving`, `restarting` and why, `draining`, ...) from their state alone, never a probe, so
//! it cannot queue behind work. `/ready` asks every coordinator's Health RPC and answers 200
//! when at least one says `ready` (a real one-token forward succeeded within its readiness
//! window) and, if [`GatewayConfig::ready_window`](crate::GatewayConfig::ready_window) is set,
//! its last good step is at most that old. Otherwise, and while the gateway drains, 503 with the
//! details.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use r4b_proto::v1 as pb;
use serde_json::{json, Value};

use crate::state::AppState;

/// The operational routes: probes and the metrics scrape.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(scrape))
}

async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let loads = state.replicas().load().await;
    let mut text = state.metrics().render(&loads);
    if let Some(extra) = state.extra_metrics() {
        text.push_str(&extra);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    let answers = state.replicas().health(true).await;
    let replicas: Vec<Value> = answers
        .iter()
        .map(|(url, res)| match res {
            Ok(h) => json!({
                "replica": url,
                "state": state_name(h.state),
                "restarts": h.restarts,
                "detail": h.detail,
                "worker_pids": h.worker_pids,
            }),
            Err(status) => {
                json!({"replica": url, "state": "unreachable", "detail": status.message()})
            }
        })
        .collect();
    let status = if state.shutdown().is_draining() {
        "draining"
    } else {
        "ok"
    };
    Json(json!({"status": status, "replicas": replicas}))
}

/// The lower-case name of a `ReplicaState`.
fn state_name(state: i32) -> &'static str {
    match pb::ReplicaState::try_from(state) {
        Ok(pb::ReplicaState::Starting) => "starting",
        Ok(pb::ReplicaState::Serving) => "serving",
        Ok(pb::ReplicaState::Restarting) => "restarting",
        Ok(pb::ReplicaState::Draining) => "draining",
        Ok(pb::ReplicaState::Failed) => "failed",
        _ => "unknown",
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether one Health answer counts as ready under `window` (zero = trust the flag).
pub fn is_ready(h: &pb::HealthResponse, window: Duration, now_ms: u64) -> bool {
    if !h.ready {
        return false;
    }
    if window.is_zero() || h.last_step_ok_unix_ms == 0 {
        return true;
    }
    now_ms.saturating_sub(h.last_step_ok_unix_ms) <= window.as_millis() as u64
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.shutdown().is_draining() {
        let body = json!({"status": "draining", "replicas": []});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let window = state.config().ready_window;
    let now = now_ms();
    let answers = state.replicas().health(false).await;
    let mut any_ready = false;
    let replicas: Vec<Value> = answers
        .iter()
        .map(|(url, res)| match res {
            Ok(h) => {
                let ok = is_ready(h, window, now);
                any_ready |= ok;
                json!({
                    "replica": url,
                    "alive": h.alive,
                    "ready": ok,
                    "state": state_name(h.state),
                    "detail": h.detail,
                })
            }
            Err(status) => {
                json!({"replica": url, "alive": false, "ready": false, "detail": status.message()})
            }
        })
        .collect();
    let status = if any_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = if any_ready { "ready" } else { "not_ready" };
    (status, Json(json!({"status": word, "replicas": replicas})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_rules() {
        let h = |ready, last| pb::HealthResponse {
            alive: true,
            ready,
            last_step_ok_unix_ms: last,
            ..Default::default()
        };
        let w = Duration::from_secs(10);
        assert!(!is_ready(&h(false, 1_000), Duration::ZERO, 1_000));
        assert!(is_ready(&h(true, 1_000), Duration::ZERO, 999_999));
        assert!(is_ready(&h(true, 100_000), w, 105_000));
        assert!(!is_ready(&h(true, 100_000), w, 111_000));
        assert!(is_ready(&h(true, 0), w, 111_000));
    }
}
