//! `POST /v1/chat/completions`: parse → submit → stream | collect.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tracing::Instrument;

use crate::api::{
    ChatBody, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
    ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, CommonParams, CompletionTokensDetails,
    PromptTokensDetails, TopLogprobEntry, Usage,
};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::generate::{self, ChoiceOutput, FinishReason, RequestClock};
use crate::metrics::Operation;
use crate::output::{Delta, TokenLogprob};
use crate::prompt::{self, PromptParts};
use crate::sse::{self, to_json, ChunkFormat};
use crate::state::{unix_now, AppState};
use crate::tokens::TextTokenizer;
use crate::validate::{self, ValidatedRequest};

/// The chat route.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/chat/completions", post(create))
}

async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let span = crate::telemetry::request_span("chat", &headers);
    async move {
        let (req, as_ids) = parse(&state, &body).await?;
        crate::telemetry::record_request(&req);
        run(state, req, as_ids).await
    }
    .instrument(span)
    .await
}

/// Submits a validated request and answers with SSE or one JSON body (`as_ids`:
/// `return_tokens_as_token_ids`).
async fn run(state: AppState, req: ValidatedRequest, as_ids: bool) -> Result<Response, ApiError> {
    let clock = RequestClock::start(state.metrics(), Operation::Chat);
    let runs = generate::submit(&state, &req, &clock).await?;
    let (prompt_tokens, cached_tokens) = generate::prompt_usage(&runs, &req);
    let tok = state.files().tokenizer();
    // Every choice scores the same prompt: the first one's entries are the request's.
    let prompt_logprobs = req.params.sampling.prompt_logprobs.map(|k| {
        let entries = runs.first().map_or(&[][..], |r| &r.prompt_logprobs[..]);
        crate::logprobs::vllm_prompt_logprobs(tok, entries, k as usize)
    });
    let format = ChatFormat {
        as_ids,
        continuous_usage: req.params.continuous_usage,
        generated: std::collections::BTreeMap::new(),
        prompt_logprobs,
        id: req.id.clone(),
        created: unix_now(),
        model: state.config().served_model_name.clone(),
        tok: state.files().tokenizer().clone(),
        logprobs: req.params.sampling.logprobs,
        include_usage: req.params.include_usage,
        n: req.params.n,
        prompt_tokens,
        cached_tokens,
    };
    if req.params.stream {
        return Ok(sse::respond(runs, format, clock));
    }
    let outputs = generate::collect(runs).await?;
    let generated = outputs.iter().map(|o| o.generated).sum();
    let reasons: Vec<FinishReason> = outputs.iter().map(|o| o.reason).collect();
    clock.finish(generated, &reasons);
    Ok(Json(format.completion(outputs)).into_response())
}

/// Parses and validates a chat body into a [`ValidatedRequest`] (images fetched and expanded),
/// and `return_tokens_as_token_ids`.
async fn parse(state: &AppState, body: &JsonBody) -> Result<(ValidatedRequest, bool), ApiError> {
    crate::fields::check(&body.0, crate::fields::Endpoint::Chat)?;
    let chat: ChatBody = body.parse()?;
    let common: CommonParams = body.parse()?;
    let config = state.config();
    crate::models::check_model(chat.model.as_deref(), &config.served_model_name)?;
    let logprobs =
        validate::chat_logprobs(chat.logprobs, chat.top_logprobs, config.max_top_logprobs)?;
    let mut params =
        validate::validate_params(&common, logprobs, state.files().sampling_defaults(), config)?;
    params.sampling.prompt_logprobs = crate::logprobs::prompt_logprobs_param(
        chat.prompt_logprobs,
        config.max_top_logprobs,
        params.stream,
    )?;
    let as_ids = chat.return_tokens_as_token_ids.unwrap_or(false);
    let (messages, kwargs) = (chat.messages, chat.chat_template_kwargs);
    let add_generation_prompt = chat.add_generation_prompt.unwrap_or(true);
    let rendered = prompt::off_runtime(state, move |state| {
        prompt::render_chat(state, messages, kwargs, add_generation_prompt, false, true)
    })
    .await?;
    let images = state.images().load_all(&rendered.images).await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let parts = PromptParts {
        id,
        ids: rendered.ids,
        images,
        params,
        split_reasoning: true,
        thinking_auto: rendered.thinking_auto,
    };
    Ok((prompt::finish_prompt(state, parts)?, as_ids))
}

/// Chat logprobs of some tokens (`as_ids`: tokens named `token_id:N`).
fn chat_logprobs(tok: &TextTokenizer, items: &[TokenLogprob], as_ids: bool) -> ChatLogprobs {
    let entry = |id: u32| {
        (
            crate::logprobs::token_key(tok, id, as_ids),
            tok.token_bytes(id),
        )
    };
    let content = items
        .iter()
        .map(|t| {
            let (token, bytes) = entry(t.id);
            let top_logprobs = t
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = entry(id);
                    TopLogprobEntry {
                        token,
                        logprob: crate::logprobs::clamp(logprob),
                        bytes,
                    }
                })
                .collect();
            ChatTokenLogprob {
                token,
                logprob: crate::logprobs::clamp(t.logprob),
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Writes chat responses and chunks.
struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    tok: Arc<TextTokenizer>,
    logprobs: bool,
    include_usage: bool,
    n: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    /// `return_tokens_as_token_ids`.
    as_ids: bool,
    /// `stream_options.continuous_usage_stats`: usage in every chunk.
    continuous_usage: bool,
    /// Tokens generated so far per choice (continuous usage).
    generated: std::collections::BTreeMap<u32, u32>,
    /// vLLM's `prompt_logprobs` (whole responses only).
    prompt_logprobs: Option<Vec<Option<crate::api::PromptLogprobs>>>,
}

impl ChatFormat {
    fn usage_of(&self, completion_tokens: u32, reasoning_tokens: u32) -> Usage {
        Usage {
            completion_tokens_details: Some(CompletionTokensDetails { reasoning_tokens }),
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached_tokens,
            },
        }
    }

    /// The usage so far of choice `index`, when `continuous_usage_stats` asks for it.
    fn running_usage(&self, index: u32) -> Option<Usage> {
        self.continuous_usage.then(|| {
            let so_far = self.generated.get(&index).copied().unwrap_or(0);
            Usage {
                completion_tokens_details: None,
                ..self.usage_of(so_far, 0)
            }
        })
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        to_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn delta_choice(
        &self,
        index: u32,
        delta: Delta,
        finish_reason: Option<&'static str>,
    ) -> ChatChunkChoice {
        let logprobs = self
            .logprobs
            .then(|| chat_logprobs(&self.tok, &delta.logprobs, self.as_ids));
        ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: non_empty(delta.content),
                reasoning_content: non_empty(delta.reasoning),
            },
            logprobs,
            finish_reason,
        }
    }

    fn completion(&self, outputs: Vec<ChoiceOutput>) -> ChatCompletion {
        let generated = outputs.iter().map(|o| o.generated).sum();
        let reasoning = outputs.iter().map(|o| o.reasoning_tokens).sum();
        let choices = outputs
            .into_iter()
            .map(|o| ChatChoice {
                index: o.index,
                message: ChatResponseMessage {
                    role: "assistant",
                    content: Some(o.content),
                    reasoning_content: non_empty(o.reasoning),
                },
                logprobs: self
                    .logprobs
                    .then(|| chat_logprobs(&self.tok, &o.logprobs, self.as_ids)),
                finish_reason: Some(o.reason.as_str()),
            })
            .collect();
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.usage_of(generated, reasoning),
            prompt_logprobs: self.prompt_logprobs.clone(),
        }
    }
}

impl ChunkFormat for ChatFormat {
    fn head(&mut self) -> Vec<String> {
        (0..self.n)
            .map(|index| {
                let delta = ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    reasoning_content: None,
                };
                self.chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta,
                        logprobs: None,
                        finish_reason: None,
                    }],
                    self.running_usage(index),
                )
            })
            .collect()
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<String> {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
        let choice = self.delta_choice(index, delta, None);
        vec![self.chunk(vec![choice], self.running_usage(index))]
    }

    fn quiet(&mut self, index: u32, delta: Delta) {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
    }

    fn finish(&mut self, index: u32, delta: Delta, reason: FinishReason) -> Vec<String> {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
        let mut out = Vec::with_capacity(2);
        if !delta.is_empty() {
            let choice = self.delta_choice(index, delta, None);
            out.push(self.chunk(vec![choice], self.running_usage(index)));
        }
        let last = ChatChunkChoice {
            index,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some(reason.as_str()),
        };
        out.push(self.chunk(vec![last], self.running_usage(index)));
        out
    }

    fn usage(&mut self, completion_tokens: u32, reasoning_tokens: u32) -> Option<String> {
        self.include_usage.then(|| {
            let usage = self.usage_of(completion_tokens, reasoning_tokens);
            self.chunk(Vec::new(), Some(usage))
        })
    }
}
