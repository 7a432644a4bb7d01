//! Submitting a [`ValidatedRequest`] to a replica and reading the token streams back.
//!
//! One `Generate` call per choice. [`submit`] waits for each call's first message so that a
//! coordinator refusal (queue full, not ready, bad request) still becomes a proper HTTP status
//! before any SSE header is sent. A [`ChoiceRun`] owns its gRPC stream; dropping it (client
//! gone, stop string matched, another choice failed) cancels the generation at the coordinator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use r4b_proto::v1 as pb;
use tonic::codec::Streaming;

use crate::error::ApiError;
use crate::metrics::{Metrics, Operation, RunningGuard};
use crate::output::{Delta, OutputPipeline, TokenLogprob};
use crate::state::AppState;
use crate::validate::ValidatedRequest;

/// Why a choice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// The OpenAI string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one step of a choice produced.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// New output.
    Delta(Delta),
    /// The last output of the choice.
    Finished {
        /// Output of the last message (may be empty).
        delta: Delta,
        /// Why it ended.
        reason: FinishReason,
        /// Tokens this choice generated.
        generated: u32,
        /// Of them, tokens of its reasoning.
        reasoning_tokens: u32,
    },
    /// The choice failed (coordinator error, broken stream).
    Failed(ApiError),
}

/// Timing and gauges of one request, shared by its choices.
#[derive(Debug)]
pub struct RequestClock {
    start: Instant,
    first_token_seen: AtomicBool,
    /// When the first token of any choice arrived (for the per-request TPOT).
    first_token_at: std::sync::OnceLock<Instant>,
    metrics: Arc<Metrics>,
    operation: Operation,
    _running: RunningGuard,
}

impl RequestClock {
    /// Starts timing a request (and counts it as running until dropped).
    pub fn start(metrics: &Arc<Metrics>, operation: Operation) -> Arc<Self> {
        Arc::new(RequestClock {
            operation,
            start: Instant::now(),
            first_token_seen: AtomicBool::new(false),
            first_token_at: std::sync::OnceLock::new(),
            metrics: metrics.clone(),
            _running: metrics.start_request(),
        })
    }

    /// Records the end of the request: latency, generated tokens, finish reasons.
    pub fn finish(&self, generated: u32, reasons: &[FinishReason]) {
        let end = Instant::now();
        let op = self.operation;
        self.metrics
            .record_duration(op, end.duration_since(self.start).as_secs_f64());
        if let (Some(first), true) = (self.first_token_at.get(), generated >= 2) {
            let decode = end.duration_since(*first).as_secs_f64();
            self.metrics
                .record_tpot(op, decode / f64::from(generated - 1));
        }
        self.metrics.add_generation_tokens(u64::from(generated));
        for r in reasons {
            self.metrics.record_finish(r.as_str());
        }
    }
}

/// One running choice: its gRPC stream and output pipeline.
#[derive(Debug)]
pub struct ChoiceRun {
    /// Choice index.
    pub index: u32,
    /// Prompt tokens the coordinator counted (0 if it did not say).
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// The prompt's log-probabilities (positions 1.., when the request asked for them).
    pub prompt_logprobs: Vec<pb::PromptLogprob>,
    stream: Option<Streaming<pb::GenerateResponse>>,
    /// Counts the choice against its replica (least-loaded routing) while it runs.
    inflight: Option<crate::replica::InFlight>,
    first: Option<pb::GenerateResponse>,
    pipeline: OutputPipeline,
    clock: Arc<RequestClock>,
    last_token_at: Option<Instant>,
    /// For the shutdown signal that ends open generations.
    app: AppState,
}

impl ChoiceRun {
    /// The next event, or `None` after the choice ended.
    pub async fn next_event(&mut self) -> Option<ChoiceEvent> {
        let msg = match self.first.take() {
            Some(m) => Ok(Some(m)),
            None => {
                let (stream, app) = (self.stream.as_mut()?, &self.app);
                tokio::select! {
                    m = stream.message() => m,
                    _ = app.shutdown().streams_ended() => Err(tonic::Status::unavailable(
                        "the server is shutting down; the request did not finish in time",
                    )),
                }
            }
        };
        let event = match msg {
            Err(status) => {
                tracing::warn!(index = self.index, %status, "generation stream failed");
                ChoiceEvent::Failed(ApiError::from_status(&status))
            }
            Ok(None) => ChoiceEvent::Failed(ApiError::Internal(
                "the coordinator ended a stream without a finish reason".into(),
            )),
            Ok(Some(resp)) => {
                self.observe(&resp);
                self.handle(&resp)
            }
        };
        if !matches!(event, ChoiceEvent::Delta(_)) {
            self.stream = None; // ends (and so cancels) the generation at the coordinator
            self.inflight = None;
        }
        Some(event)
    }

    fn handle(&mut self, resp: &pb::GenerateResponse) -> ChoiceEvent {
        let result = self.pipeline.push(&resp.tokens).and_then(|mut delta| {
            let reason = if self.pipeline.stop_matched() {
                Some(FinishReason::Stop)
            } else {
                match pb::FinishReason::try_from(resp.finish_reason) {
                    Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
                    Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
                    _ => None,
                }
            };
            match reason {
                Some(reason) => {
                    delta.append(self.pipeline.finish()?);
                    if let Some(t) = self.pipeline.thinking() {
                        self.clock.metrics.record_thinking(t);
                    }
                    Ok(ChoiceEvent::Finished {
                        delta,
                        reason,
                        generated: self.pipeline.generated(),
                        reasoning_tokens: self.pipeline.reasoning_tokens(),
                    })
                }
                None => Ok(ChoiceEvent::Delta(delta)),
            }
        });
        result.unwrap_or_else(|e| ChoiceEvent::Failed(ApiError::Internal(e.to_string())))
    }

    fn observe(&mut self, resp: &pb::GenerateResponse) {
        if resp.tokens.is_empty() {
            return;
        }
        let now = Instant::now();
        let metrics = &self.clock.metrics;
        if let Some(last) = self.last_token_at {
            metrics
                .itl
                .observe(now.duration_since(last).as_secs_f64() / resp.tokens.len() as f64);
        } else if !self.clock.first_token_seen.swap(true, Ordering::Relaxed) {
            let _ = self.clock.first_token_at.set(now);
            let ttft = now.duration_since(self.clock.start).as_secs_f64();
            metrics.record_ttft(self.clock.operation, ttft);
        }
        self.last_token_at = Some(now);
    }

    /// The choice as a stream of `(index, event)`.
    pub fn into_stream(self) -> impl futures::Stream<Item = (u32, ChoiceEvent)> + Send {
        futures::stream::unfold(self, |mut run| async move {
            let event = run.next_event().await?;
            Some(((run.index, event), run))
        })
    }
}

/// Starts all choices of `req`; fails (and cancels the started ones) if any is refused.
pub async fn submit(
    state: &AppState,
    req: &ValidatedRequest,
    clock: &Arc<RequestClock>,
) -> Result<Vec<ChoiceRun>, ApiError> {
    state
        .metrics()
        .add_prompt_tokens(req.prompt_ids.len() as u64);
    let starts = (0..req.params.n).map(|index| start_choice(state, req, index, clock));
    futures::future::try_join_all(starts).await
}

async fn start_choice(
    state: &AppState,
    req: &ValidatedRequest,
    index: u32,
    clock: &Arc<RequestClock>,
) -> Result<ChoiceRun, ApiError> {
    let files = state.files();
    let proto = req.to_proto(index, files.stop_ids());
    let submitted = Instant::now();
    // Routing keys: the coordinator's hashes of the prompt's full KV blocks.
    let keys = crate::prefix::block_hashes(
        &proto.prompt_ids,
        &proto.images,
        state.image_token_id(),
        state.block_size(),
    );
    let started = state
        .replicas()
        .start(proto, &keys)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    let (stream, mut first) = (started.stream, started.first);
    let prompt_logprobs = std::mem::take(&mut first.prompt_logprobs);
    // Where a request's time to first token goes, gateway side (the coordinator logs its part).
    tracing::debug!(
        index,
        before_submit_ms = (submitted - clock.start).as_secs_f64() * 1e3,
        first_message_ms = submitted.elapsed().as_secs_f64() * 1e3,
        "first message"
    );
    Ok(ChoiceRun {
        index,
        prompt_tokens: first.prompt_tokens,
        cached_tokens: first.cached_tokens,
        prompt_logprobs,
        stream: Some(stream),
        inflight: Some(started.inflight),
        first: Some(first),
        pipeline: OutputPipeline::new(files.tokenizer().clone(), req, files.stop_ids()),
        clock: clock.clone(),
        last_token_at: None,
        app: state.clone(),
    })
}

/// The whole output of one choice.
#[derive(Clone, Debug)]
pub struct ChoiceOutput {
    /// Choice index.
    pub index: u32,
    /// Reasoning text.
    pub reasoning: String,
    /// Content text.
    pub content: String,
    /// Log-probabilities (when asked for).
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended.
    pub reason: FinishReason,
    /// Tokens generated.
    pub generated: u32,
    /// Of them, tokens of the reasoning.
    pub reasoning_tokens: u32,
}

/// Runs every choice to its end; the first failure cancels the others.
pub async fn collect(runs: Vec<ChoiceRun>) -> Result<Vec<ChoiceOutput>, ApiError> {
    futures::future::try_join_all(runs.into_iter().map(collect_one)).await
}

async fn collect_one(mut run: ChoiceRun) -> Result<ChoiceOutput, ApiError> {
    let mut all = Delta::default();
    loop {
        match run.next_event().await {
            Some(ChoiceEvent::Delta(d)) => all.append(d),
            Some(ChoiceEvent::Finished {
                delta,
                reason,
                generated,
                reasoning_tokens,
            }) => {
                all.append(delta);
                return Ok(ChoiceOutput {
                    index: run.index,
                    reasoning: all.reasoning,
                    content: all.content,
                    logprobs: all.logprobs,
                    reason,
                    generated,
                    reasoning_tokens,
                });
            }
            Some(ChoiceEvent::Failed(e)) => return Err(e),
            None => return Err(ApiError::Internal("choice ended twice".into())),
        }
    }
}

/// Prompt and cached token counts of a request: the coordinator's, else the gateway's count.
pub fn prompt_usage(runs: &[ChoiceRun], req: &ValidatedRequest) -> (u32, u32) {
    let first = runs.first();
    let prompt = first
        .map(|r| r.prompt_tokens)
        .filter(|&p| p > 0)
        .unwrap_or(req.prompt_ids.len() as u32);
    (prompt, first.map(|r| r.cached_tokens).unwrap_or(0))
}
