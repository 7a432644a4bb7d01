//! Server-sent events for streamed responses: `data: {chunk}` events, an optional usage chunk,
//! then `data: [DONE]`. A failure after the stream started is sent as `data: {"error": ...}`
//! (the same error object as non-streamed responses) followed by `data: [DONE]`.
//!
//! The event stream owns the choices' gRPC streams: when the client disconnects, axum drops it
//! and the generations are cancelled.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::generate::{ChoiceEvent, ChoiceRun, FinishReason, RequestClock};
use crate::output::Delta;

/// How an endpoint writes its chunks (each method returns JSON texts, one per SSE event).
pub trait ChunkFormat: Send + 'static {
    /// Chunks sent before any output (e.g. the assistant role of each chat choice).
    fn head(&mut self) -> Vec<String>;
    /// Chunks for new output of choice `index`.
    fn delta(&mut self, index: u32, delta: Delta) -> Vec<String>;
    /// Chunks for the last output of choice `index` (ending with its finish reason).
    fn finish(&mut self, index: u32, delta: Delta, reason: FinishReason) -> Vec<String>;
    /// The usage chunk, if the client asked for one.
    fn usage(&mut self, completion_tokens: u32, reasoning_tokens: u32) -> Option<String>;
    /// Output of choice `index` that makes no chunk (no text, no logprobs: an EOS, text held
    /// back by the stop matcher): its tokens still count for `continuous_usage_stats`.
    fn quiet(&mut self, _index: u32, _delta: Delta) {}
}

/// JSON text of a chunk (serialisation of our own types cannot fail; an empty object if it did).
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string())
}

type EventStream = Pin<Box<dyn Stream<Item = (u32, ChoiceEvent)> + Send>>;

struct Driver<F> {
    events: EventStream,
    format: F,
    queue: VecDeque<String>,
    clock: Arc<RequestClock>,
    generated: u32,
    reasoning_tokens: u32,
    reasons: Vec<FinishReason>,
    done: bool,
    /// The request's span, held open until the stream ends (the handler returned long before).
    span: tracing::Span,
}

impl<F: ChunkFormat> Driver<F> {
    /// Fills the queue from the next choice event; marks the end when there is none.
    async fn advance(&mut self) {
        match self.events.next().await {
            Some((index, ChoiceEvent::Delta(delta))) => {
                if !delta.is_empty() {
                    self.queue.extend(self.format.delta(index, delta));
                } else {
                    self.format.quiet(index, delta);
                }
            }
            Some((
                index,
                ChoiceEvent::Finished {
                    delta,
                    reason,
                    generated,
                    reasoning_tokens,
                },
            )) => {
                self.generated += generated;
                self.reasoning_tokens += reasoning_tokens;
                self.reasons.push(reason);
                self.queue.extend(self.format.finish(index, delta, reason));
            }
            Some((_, ChoiceEvent::Failed(err))) => {
                tracing::error!(error = %err, detail = ?err, "stream failed after it started");
                self.queue.push_back(to_json(&err.body()));
                self.finish();
            }
            None => {
                self.clock.finish(self.generated, &self.reasons);
                self.queue
                    .extend(self.format.usage(self.generated, self.reasoning_tokens));
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.queue.push_back("[DONE]".to_string());
        self.done = true;
        self.events = Box::pin(futures::stream::empty()); // drop the gRPC streams now
        self.span = tracing::Span::none(); // ends the request span
    }
}

/// The SSE response for `runs`, formatted by `format`.
pub fn respond<F: ChunkFormat>(
    runs: Vec<ChoiceRun>,
    mut format: F,
    clock: Arc<RequestClock>,
) -> Response {
    let events: EventStream = Box::pin(futures::stream::select_all(
        runs.into_iter().map(|r| Box::pin(r.into_stream())),
    ));
    let queue = format.head().into();
    let driver = Driver {
        events,
        format,
        queue,
        clock,
        generated: 0,
        reasoning_tokens: 0,
        reasons: Vec::new(),
        done: false,
        span: tracing::Span::current(),
    };
    let stream = futures::stream::unfold(driver, |mut d| async move {
        loop {
            if let Some(data) = d.queue.pop_front() {
                return Some((Ok::<Event, Infallible>(Event::default().data(data)), d));
            }
            if d.done {
                return None;
            }
            d.advance().await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
