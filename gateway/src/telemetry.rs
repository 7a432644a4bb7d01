//! The request span of the HTTP API: the root of a request's trace (or a child of the client's
//! `traceparent`), carrying the OTel GenAI attributes. Its context travels to the coordinator in
//! the gRPC metadata of `Generate` (`replica.rs`).

use axum::http::HeaderMap;

use crate::validate::ValidatedRequest;

/// `gen_ai.provider.name` of r4b-serve's spans and metrics (OTel GenAI allows custom values).
pub const PROVIDER: &str = "r4b";

/// The span of one API request (`operation`: `chat` or `text_completion`, the OTel GenAI
/// operation names), parented to the client's W3C context when the headers carry one.
pub fn request_span(operation: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = operation,
        otel.kind = "server",
        gen_ai.operation.name = operation,
        gen_ai.provider.name = PROVIDER,
        request_id = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        images = tracing::field::Empty,
        n = tracing::field::Empty,
    );
    r4b_telemetry::set_parent(&span, r4b_telemetry::extract_http(headers));
    span
}

/// Records the parsed request's id and sizes on the current request span.
pub fn record_request(req: &ValidatedRequest) {
    let span = tracing::Span::current();
    span.record("request_id", req.id.as_str());
    span.record("prompt_tokens", req.prompt_ids.len());
    span.record("images", req.images.len());
    span.record("n", req.params.n);
}
