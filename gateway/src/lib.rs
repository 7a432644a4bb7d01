//! # r4b-gateway
//!
//! The OpenAI-compatible HTTP front of r4b-serve. It owns all text work, so coordinators and
//! workers only ever see token ids and preprocessed pixels:
//!
//! 1. parse and validate the body ([`extract`], [`validate`]): wrong types and out-of-range
//!    values are 400s naming the field;
//! 2. render the checkpoint's chat template with `thinking_mode` ([`template`], [`prompt`]),
//!    tokenize ([`tokens`]), fetch/decode/tile images ([`fetch`], [`images`]) and expand each
//!    `<image>` to its token count;
//! 3. send one `Generate` per choice to a replica ([`replica`], [`generate`]);
//! 4. turn token ids back into text ([`output`]): incremental detokenization that never splits a
//!    UTF-8 character, the `<think>…</think>` split into `reasoning_content` by token id
//!    ([`reasoning`]), stop strings ([`stop`]); answer with SSE ([`sse`]) or one JSON body.
//!
//! [`tokenize`] serves vLLM's `/tokenize` and `/detokenize` with the same prompt path as chat.
//!
//! Design decisions: the gateway is stateless (scale it out); a request is parsed into a
//! [`validate::ValidatedRequest`] before anything is sent; [`error::ApiError`] is the single map
//! from failures to HTTP statuses and OpenAI error objects, also used inside SSE streams; a
//! coordinator refusal (queue full → 429 with `Retry-After`) is detected before SSE headers go
//! out by waiting for each stream's first message; dropping a response (client gone) drops the
//! gRPC streams, which cancels the generations.

#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod chat;
pub mod completions;
pub mod config;
pub mod constraint;
pub mod embedded;
pub mod error;
pub mod extract;
pub mod fetch;
pub mod fields;
pub mod generate;
pub mod health;
pub mod images;
pub mod logprobs;
pub mod metrics;
pub mod model_files;
pub mod models;
pub mod output;
pub mod prefix;
pub mod prompt;
pub mod reasoning;
pub mod replica;
pub mod server;
pub mod special_tokens;
pub mod sse;
pub mod startup;
pub mod state;
pub mod stop;
pub mod structured;
pub mod telemetry;
pub mod template;
pub mod tokenize;
pub mod tokens;
pub mod tools;
pub mod trim;
pub mod validate;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Uri;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

pub use config::GatewayConfig;
pub use error::ApiError;
pub use model_files::ModelFiles;
pub use startup::GatewayError;
pub use state::AppState;

/// The gateway's HTTP API: chat, completions, `/tokenize`, `/detokenize`, models, `/health`,
/// `/ready`, `/metrics`.
pub fn router(state: AppState) -> Router {
    let limit = state.config().body_limit_bytes;
    Router::new()
        .merge(chat::router())
        .merge(completions::router())
        .merge(tokenize::router())
        .merge(models::router())
        .merge(health::router())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_draining,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::check_request,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// While the gateway drains, new generations get 503 (health, metrics and the rest still answer).
async fn refuse_while_draining(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let generates = path == "/v1/chat/completions" || path == "/v1/completions";
    if generates && state.shutdown().is_draining() {
        // Read the body first: closing a socket with unread data resets the connection, and
        // the client would see that instead of the 503.
        let limit = state.config().body_limit_bytes;
        let read = axum::body::to_bytes(req.into_body(), limit);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
        return ApiError::Unavailable("the server is shutting down".into()).into_response();
    }
    next.run(req).await
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

/// Counts every response by route and status, and logs the details of internal errors.
async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let endpoint = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(req).await;
    if let Some(error::InternalDetail(detail)) =
        response.extensions().get::<error::InternalDetail>()
    {
        tracing::error!(%endpoint, %detail, "internal error");
    }
    state
        .metrics()
        .record_request(&endpoint, response.status().as_u16());
    response
}
