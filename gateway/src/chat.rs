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
    FunctionCall, FunctionCallDelta, PromptTokensDetails, ToolCall, ToolCallDelta, TopLogprobEntry,
    Usage,
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
use crate::tools::{self, ParsedCall, Piece, ToolCallParser, ToolRequest};
use crate::validate::{self, ValidatedRequest, ValidationError};

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
        let (req, tools, as_ids) = parse(&state, &body).await?;
        crate::telemetry::record_request(&req);
        run(state, req, tools, as_ids).await
    }
    .instrument(span)
    .await
}

/// Submits a validated request and answers with SSE or one JSON body (`as_ids`:
/// `return_tokens_as_token_ids`).
async fn run(
    state: AppState,
    req: ValidatedRequest,
    tools: Option<ToolRequest>,
    as_ids: bool,
) -> Result<Response, ApiError> {
    let clock = RequestClock::start(state.metrics(), Operation::Chat);
    let runs = generate::submit(&state, &req, &clock).await?;
    let (prompt_tokens, cached_tokens) = generate::prompt_usage(&runs, &req);
    let tok = state.files().tokenizer();
    // Every choice scores the same prompt: the first one's entries are the request's.
    let prompt_logprobs = req.params.sampling.prompt_logprobs.map(|k| {
        let entries = runs.first().map_or(&[][..], |r| &r.prompt_logprobs[..]);
        crate::logprobs::vllm_prompt_logprobs(tok, entries, k as usize)
    });
    let mut format = ChatFormat {
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
        parsers: (0..req.params.n)
            .map(|_| tools.as_ref().and_then(ToolRequest::parser))
            .collect(),
        calls_sent: vec![0; req.params.n as usize],
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
/// its tool fields and `return_tokens_as_token_ids`.
async fn parse(
    state: &AppState,
    body: &JsonBody,
) -> Result<(ValidatedRequest, Option<ToolRequest>, bool), ApiError> {
    crate::fields::check(&body.0, crate::fields::Endpoint::Chat)?;
    let chat: ChatBody = body.parse()?;
    let common: CommonParams = body.parse()?;
    let config = state.config();
    crate::models::check_model(chat.model.as_deref(), &config.served_model_name)?;
    let logprobs =
        validate::chat_logprobs(chat.logprobs, chat.top_logprobs, config.max_top_logprobs)?;
    let mut params =
        validate::validate_params(&common, logprobs, state.files().sampling_defaults(), config)?;
    params.grammar = crate::structured::from_request(state, &body.0).await?;
    let tools = ToolRequest::parse(
        chat.tools.as_ref(),
        chat.tool_choice.as_ref(),
        chat.parallel_tool_calls.as_ref(),
    )?;
    if let Some(grammar) = tools.as_ref().and_then(ToolRequest::grammar) {
        if params.grammar.is_some() {
            return Err(ValidationError::Invalid {
                field: "tool_choice".into(),
                reason: "a forced tool call cannot be combined with another output constraint"
                    .into(),
            }
            .into());
        }
        params.grammar = Some(grammar);
    }
    params.sampling.prompt_logprobs = crate::logprobs::prompt_logprobs_param(
        chat.prompt_logprobs,
        config.max_top_logprobs,
        params.stream,
    )?;
    let as_ids = chat.return_tokens_as_token_ids.unwrap_or(false);
    let (messages, kwargs) = (chat.messages, chat.chat_template_kwargs);
    let tool_list = tools.as_ref().map(|t| t.tools.clone()).unwrap_or_default();
    let add_generation_prompt = chat.add_generation_prompt.unwrap_or(true);
    let rendered = prompt::off_runtime(state, move |state| {
        let generation = add_generation_prompt;
        prompt::render_chat(state, messages, tool_list, kwargs, generation, false, true)
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
    Ok((prompt::finish_prompt(state, parts)?, tools, as_ids))
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

fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// OpenAI's finish reason: `tool_calls` when the choice called and stopped by itself.
fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        r => r.as_str(),
    }
}

/// The two deltas of a streamed call: the header (`id`, `type`, `name`, empty arguments),
/// then the arguments.
fn call_deltas(index: u32, call: ParsedCall) -> [ChatDelta; 2] {
    let header = ToolCallDelta {
        index,
        id: Some(call_id()),
        kind: Some("function"),
        function: FunctionCallDelta {
            name: Some(call.name),
            arguments: String::new(),
        },
    };
    let arguments = ToolCallDelta {
        index,
        id: None,
        kind: None,
        function: FunctionCallDelta {
            name: None,
            arguments: call.arguments,
        },
    };
    [header, arguments].map(|c| ChatDelta {
        tool_calls: Some(vec![c]),
        ..ChatDelta::default()
    })
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
    /// Per choice: the tool-call parser of its content (when tools are parsed).
    parsers: Vec<Option<ToolCallParser>>,
    /// Per choice: calls streamed so far.
    calls_sent: Vec<u32>,
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

    /// The chunks of new output of choice `index`: its content goes through the choice's
    /// tool-call parser (`last`: the output ended, flush it), so text and calls come out in
    /// order; reasoning and log-probabilities ride on the first chunk.
    fn delta_chunks(&mut self, index: u32, delta: Delta, last: bool) -> Vec<String> {
        let logprobs = self
            .logprobs
            .then(|| chat_logprobs(&self.tok, &delta.logprobs, self.as_ids));
        let pieces = match self.parsers.get_mut(index as usize) {
            Some(Some(parser)) => {
                let mut pieces = parser.push(&delta.content);
                if last {
                    pieces.extend(parser.finish());
                }
                pieces
            }
            _ => vec![Piece::Text(delta.content)],
        };
        let mut deltas = vec![ChatDelta {
            reasoning_content: non_empty(delta.reasoning),
            ..ChatDelta::default()
        }];
        for piece in pieces {
            match piece {
                Piece::Text(text) => match deltas.last_mut() {
                    Some(d) if d.tool_calls.is_none() => {
                        d.content.get_or_insert_with(String::new).push_str(&text)
                    }
                    _ => deltas.push(ChatDelta {
                        content: Some(text),
                        ..ChatDelta::default()
                    }),
                },
                Piece::Call(call) => {
                    let sent = self.calls_sent.get_mut(index as usize);
                    let n = sent.map_or(0, |c| {
                        *c += 1;
                        *c - 1
                    });
                    deltas.extend(call_deltas(n, call));
                }
            }
        }
        let mut logprobs = logprobs.filter(|l| !l.content.is_empty());
        deltas
            .into_iter()
            .filter_map(|mut d| {
                d.content = d.content.and_then(non_empty);
                let lp = logprobs.take();
                let empty =
                    d.content.is_none() && d.reasoning_content.is_none() && d.tool_calls.is_none();
                if empty && lp.is_none() {
                    return None;
                }
                let choice = ChatChunkChoice {
                    index,
                    delta: d,
                    logprobs: lp.or_else(|| self.logprobs.then(ChatLogprobs::default)),
                    finish_reason: None,
                };
                Some(self.chunk(vec![choice], self.running_usage(index)))
            })
            .collect()
    }

    fn completion(&mut self, outputs: Vec<ChoiceOutput>) -> ChatCompletion {
        let generated = outputs.iter().map(|o| o.generated).sum();
        let reasoning = outputs.iter().map(|o| o.reasoning_tokens).sum();
        let choices = outputs
            .into_iter()
            .map(|o| {
                let parser = self
                    .parsers
                    .get_mut(o.index as usize)
                    .and_then(Option::take);
                let (content, calls) = match parser {
                    Some(mut p) => tools::parse_all(&mut p, &o.content),
                    None => (Some(o.content), Vec::new()),
                };
                let tool_calls: Vec<ToolCall> = calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: call_id(),
                        kind: "function",
                        function: FunctionCall {
                            name: c.name,
                            arguments: c.arguments,
                        },
                    })
                    .collect();
                ChatChoice {
                    index: o.index,
                    finish_reason: Some(finish_reason(o.reason, !tool_calls.is_empty())),
                    message: ChatResponseMessage {
                        role: "assistant",
                        content,
                        reasoning_content: non_empty(o.reasoning),
                        tool_calls,
                    },
                    logprobs: self
                        .logprobs
                        .then(|| chat_logprobs(&self.tok, &o.logprobs, self.as_ids)),
                }
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
                    ..ChatDelta::default()
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
        self.delta_chunks(index, delta, false)
    }

    fn quiet(&mut self, index: u32, delta: Delta) {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
    }

    fn finish(&mut self, index: u32, delta: Delta, reason: FinishReason) -> Vec<String> {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
        let mut out = self.delta_chunks(index, delta, true);
        let called = self.calls_sent.get(index as usize).is_some_and(|&n| n > 0);
        let last = ChatChunkChoice {
            index,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason(reason, called)),
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
