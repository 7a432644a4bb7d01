//! `POST /v1/completions`: a raw prompt (string or token ids), no chat template, no reasoning
//! split (the text keeps any `<think>` tags), stop strings on the whole text.
//!
//! `echo` puts the prompt text first and, with `logprobs`, the prompt tokens' log-probabilities
//! (`logprobs.rs`); `max_tokens: 0` with `echo` scores the prompt without generating (lm-eval's
//! loglikelihood requests). Without `echo`, `max_tokens: 0` is a 400 naming it (vLLM refuses it
//! too: its sampler needs at least one token).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use tracing::Instrument;

use crate::api::{
    CommonParams, Completion, CompletionBody, CompletionChoice, CompletionLogprobs,
    PromptTokensDetails, Usage,
};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::generate::{self, FinishReason, RequestClock};
use crate::logprobs::{self as lp, Position};
use crate::metrics::Operation;
use crate::output::Delta;
use crate::prompt::{self, PromptParts};
use crate::sse::{self, to_json, ChunkFormat};
use crate::state::{unix_now, AppState};
use crate::tokens::TextTokenizer;
use crate::validate::{self, ValidatedRequest, ValidationError};

/// The completions route.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/completions", post(create))
}

async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let span = crate::telemetry::request_span("text_completion", &headers);
    async move {
        let batch = parse(&state, &body).await?;
        crate::telemetry::record_request(&batch.prompts[0]);
        run(state, batch).await
    }
    .instrument(span)
    .await
}

/// A validated completions request: one [`ValidatedRequest`] per prompt (never empty), with the
/// text that `echo` puts before each prompt's choices.
struct Batch {
    prompts: Vec<ValidatedRequest>,
    echo: Option<Vec<String>>,
    /// `logprobs: k` (alternatives per position), when asked for.
    logprobs: Option<u32>,
    /// `return_tokens_as_token_ids`.
    as_ids: bool,
    /// Alternatives per position of vLLM's `prompt_logprobs` in the response: the field's value,
    /// else `logprobs` with `echo` (vLLM computes them then too); `None`: no such field.
    prompt_logprobs: Option<u32>,
}

async fn run(state: AppState, batch: Batch) -> Result<Response, ApiError> {
    let clock = RequestClock::start(state.metrics(), Operation::TextCompletion);
    let req = &batch.prompts[0];
    let n = req.params.n;
    let mut runs = Vec::new();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    let tok = state.files().tokenizer().clone();
    let (mut echo_lp, mut prompt_lp) = (BTreeMap::new(), BTreeMap::new());
    let scored = batch.prompt_logprobs;
    // Prompt i's choice j is choice i*n + j, as OpenAI numbers them.
    // All prompts at once: `submit` waits for each choice's first message, which comes after
    // its prefill, so one prompt after another would serialise a batch's prefills (lm-eval's
    // scoring batches are nothing but prefills). A refusal drops, and so cancels, the others.
    let submitted = futures::future::try_join_all(
        batch
            .prompts
            .iter()
            .map(|prompt| generate::submit(&state, prompt, &clock)),
    )
    .await?;
    for (i, (prompt, mut these)) in batch.prompts.iter().zip(submitted).enumerate() {
        let (p, c) = generate::prompt_usage(&these, prompt);
        prompt_tokens += p;
        cached_tokens += c;
        for r in &mut these {
            r.index += i as u32 * n;
            let entries = std::mem::take(&mut r.prompt_logprobs);
            if let (Some(k), true) = (batch.logprobs, batch.echo.is_some()) {
                let positions = lp::echo_positions(&prompt.prompt_ids, &entries, k as usize);
                echo_lp.insert(r.index, positions);
            }
            if let (Some(k), false) = (scored, req.params.stream) {
                prompt_lp.insert(
                    r.index,
                    lp::vllm_prompt_logprobs(&tok, &entries, k as usize),
                );
            }
        }
        runs.extend(these);
    }
    let echo = batch
        .echo
        .map(|texts| {
            texts
                .into_iter()
                .enumerate()
                .flat_map(|(i, t)| (0..n).map(move |j| (i as u32 * n + j, t.clone())))
                .collect()
        })
        .unwrap_or_default();
    let mut format = CompletionFormat {
        id: req.id.clone(),
        created: unix_now(),
        model: state.config().served_model_name.clone(),
        tok,
        logprobs: req.params.sampling.logprobs,
        as_ids: batch.as_ids,
        include_usage: req.params.include_usage,
        continuous_usage: req.params.continuous_usage,
        generated: BTreeMap::new(),
        usage: Usage {
            prompt_tokens,
            completion_tokens: 0,
            total_tokens: prompt_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            completion_tokens_details: None,
        },
        offsets: BTreeMap::new(),
        echo,
        echo_lp,
        prompt_lp,
    };
    if req.params.stream {
        return Ok(sse::respond(runs, format, clock));
    }
    let outputs = generate::collect(runs).await?;
    let generated: u32 = outputs.iter().map(|o| o.generated).sum();
    let reasons: Vec<FinishReason> = outputs.iter().map(|o| o.reason).collect();
    clock.finish(generated, &reasons);
    let mut choices: Vec<CompletionChoice> = outputs
        .into_iter()
        .map(|o| {
            let delta = Delta {
                reasoning: String::new(),
                content: o.content,
                logprobs: o.logprobs,
                tokens: o.generated,
            };
            format.choice(o.index, delta, Some(o.reason.as_str()))
        })
        .collect();
    choices.sort_by_key(|c| c.index);
    let usage = format.usage_with(generated);
    Ok(Json(format.response(choices, Some(usage))).into_response())
}

/// The prompts as token ids: a string (tokenized with the post-processor), a list of ids, a
/// list of strings, or a list of token-id lists (a batch: one prompt each). Public for the fuzz
/// harness (`fuzz/`), which drives the same steps as the handler.
pub fn prompt_ids(state: &AppState, prompt: Option<Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = || ValidationError::Invalid {
        field: "prompt".into(),
        reason: "must be a string, a list of token ids, a list of strings, or a list of \
                 token-id lists"
            .into(),
    };
    let text = |s: &str| -> Result<Vec<u32>, ApiError> {
        prompt::check_text_length(state, s.len())?;
        prompt::tokenize(state, s, true)
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map_err(ApiError::from)
    };
    match prompt {
        None | Some(Value::Null) => Err(ValidationError::Missing {
            field: "prompt".into(),
        }
        .into()),
        Some(Value::String(s)) => Ok(vec![text(&s)?]),
        Some(Value::Array(items)) => match items.first() {
            None => Err(bad().into()),
            Some(Value::Number(_)) => Ok(vec![ids(&items)?]),
            Some(_) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => text(s),
                    Value::Array(inner) if !inner.is_empty() => ids(inner),
                    _ => Err(bad().into()),
                })
                .collect(),
        },
        Some(_) => Err(bad().into()),
    }
}

/// Most prompts in one request.
const MAX_PROMPTS: usize = 256;

async fn parse(state: &AppState, body: &JsonBody) -> Result<Batch, ApiError> {
    crate::fields::check(&body.0, crate::fields::Endpoint::Completions)?;
    let req: CompletionBody = body.parse()?;
    let common: CommonParams = body.parse()?;
    let config = state.config();
    crate::models::check_model(req.model.as_deref(), &config.served_model_name)?;
    let logprobs = validate::completion_logprobs(req.logprobs, config.max_top_logprobs)?;
    let echo = req.echo.unwrap_or(false);
    let stream = common.stream.unwrap_or(false);
    let asked = lp::prompt_logprobs_param(req.prompt_logprobs, config.max_top_logprobs, stream)?;
    // `max_tokens: 0` (or `max_completion_tokens: 0`) scores the prompt: only with `echo`.
    let (max_field, max_raw) = match common.max_completion_tokens {
        Some(v) => ("max_completion_tokens", Some(v)),
        None => ("max_tokens", common.max_tokens),
    };
    let score_only = max_raw == Some(0);
    if score_only && !echo {
        return Err(ValidationError::OutOfRange {
            field: max_field.into(),
            bound: "at least 1 (0 only with echo: scoring the prompt)".into(),
            value: "0".into(),
        }
        .into());
    }
    let mut common = common;
    if score_only {
        common.max_tokens = None;
        common.max_completion_tokens = None;
    }
    let mut params =
        validate::validate_params(&common, logprobs, state.files().sampling_defaults(), config)?;
    params.grammar = crate::structured::from_request(state, &body.0).await?;
    if score_only {
        if params.min_tokens > 0 {
            return Err(ValidationError::OutOfRange {
                field: "min_tokens".into(),
                bound: format!("at most {max_field} (0)"),
                value: params.min_tokens.to_string(),
            }
            .into());
        }
        params.max_tokens = Some(0);
    }
    // The worker computes the larger of what `echo` + `logprobs` and `prompt_logprobs` need.
    let for_echo = logprobs.filter(|_| echo);
    params.sampling.prompt_logprobs = match (asked, for_echo) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
    };
    let prompt = req.prompt;
    let batch = prompt::off_runtime(state, move |state| prompt_ids(state, prompt)).await?;
    if batch.len() > MAX_PROMPTS {
        return Err(ValidationError::Invalid {
            field: "prompt".into(),
            reason: format!("at most {MAX_PROMPTS} prompts in one request"),
        }
        .into());
    }
    let echo = if echo {
        let tok = state.files().tokenizer().clone();
        let texts = batch
            .iter()
            .map(|ids| {
                tok.decode(ids, false)
                    .map_err(|e| ApiError::Internal(format!("decoding the prompt: {e}")))
            })
            .collect::<Result<Vec<String>, _>>()?;
        Some(texts)
    } else {
        None
    };
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let mut prompts = Vec::with_capacity(batch.len());
    for ids in batch {
        let parts = PromptParts {
            thinking_auto: false,
            id: id.clone(),
            ids,
            images: Vec::new(),
            params: params.clone(),
            split_reasoning: false,
        };
        prompts.push(prompt::finish_prompt(state, parts)?);
    }
    Ok(Batch {
        prompts,
        echo,
        logprobs,
        as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        prompt_logprobs: asked.or(for_echo),
    })
}

/// Writes completion responses and chunks.
struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    tok: Arc<TextTokenizer>,
    logprobs: bool,
    /// `return_tokens_as_token_ids`.
    as_ids: bool,
    include_usage: bool,
    /// `stream_options.continuous_usage_stats`: usage in every chunk.
    continuous_usage: bool,
    /// Tokens generated so far per choice (continuous usage).
    generated: BTreeMap<u32, u32>,
    usage: Usage,
    /// Text length so far per choice (for `text_offset`).
    offsets: BTreeMap<u32, usize>,
    /// `echo`: the prompt text each choice starts with (taken by its first chunk).
    echo: BTreeMap<u32, String>,
    /// `echo` with `logprobs`: the prompt's positions each choice's logprobs start with (taken by
    /// its first chunk).
    echo_lp: BTreeMap<u32, Vec<Position>>,
    /// vLLM's `prompt_logprobs` per choice (whole responses only).
    prompt_lp: BTreeMap<u32, Vec<Option<crate::api::PromptLogprobs>>>,
}

impl CompletionFormat {
    fn usage_with(&self, completion_tokens: u32) -> Usage {
        Usage {
            completion_tokens,
            total_tokens: self.usage.prompt_tokens + completion_tokens,
            ..self.usage.clone()
        }
    }

    fn logprobs_of(&mut self, index: u32, items: &[Position]) -> CompletionLogprobs {
        let offset = self.offsets.entry(index).or_insert(0);
        let mut out = CompletionLogprobs::default();
        let key = |id: u32| lp::token_key(&self.tok, id, self.as_ids);
        for t in items {
            let token = key(t.id);
            out.text_offset.push(*offset);
            // OpenAI's (and vLLM's) offsets count characters of the text, not bytes.
            *offset += token.chars().count();
            match &t.scored {
                None => {
                    out.token_logprobs.push(None);
                    out.top_logprobs.push(None);
                }
                Some((logprob, top)) => {
                    out.token_logprobs.push(Some(lp::clamp(*logprob)));
                    let mut alternatives: Vec<(String, f32)> =
                        top.iter().map(|&(id, l)| (key(id), lp::clamp(l))).collect();
                    // "The API will always return the logprob of the sampled token, so there
                    // may be up to logprobs+1 elements" (OpenAI); vLLM does the same.
                    if !alternatives.iter().any(|(k, _)| k == &token) {
                        alternatives.push((token.clone(), lp::clamp(*logprob)));
                    }
                    out.top_logprobs
                        .push(Some(alternatives.into_iter().collect()));
                }
            }
            out.tokens.push(token);
        }
        out
    }

    fn choice(
        &mut self,
        index: u32,
        delta: Delta,
        finish_reason: Option<&'static str>,
    ) -> CompletionChoice {
        let mut delta = delta;
        if let Some(prompt) = self.echo.remove(&index) {
            delta.content.insert_str(0, &prompt);
        }
        *self.generated.entry(index).or_insert(0) += delta.tokens;
        let logprobs = self.logprobs.then(|| {
            let mut items = self.echo_lp.remove(&index).unwrap_or_default();
            items.extend(delta.logprobs.iter().map(|t| Position {
                id: t.id,
                scored: Some((t.logprob, t.top.clone())),
            }));
            self.logprobs_of(index, &items)
        });
        CompletionChoice {
            index,
            text: delta.content,
            logprobs,
            finish_reason,
            prompt_logprobs: self.prompt_lp.remove(&index),
        }
    }

    fn response(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// A streamed chunk of one choice, with the usage so far when `continuous_usage_stats`.
    fn chunk(&mut self, choice: CompletionChoice) -> String {
        let usage = self.continuous_usage.then(|| {
            let so_far = self.generated.get(&choice.index).copied().unwrap_or(0);
            self.usage_with(so_far)
        });
        to_json(&self.response(vec![choice], usage))
    }
}

impl ChunkFormat for CompletionFormat {
    fn head(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<String> {
        let choice = self.choice(index, delta, None);
        vec![self.chunk(choice)]
    }

    fn finish(&mut self, index: u32, delta: Delta, reason: FinishReason) -> Vec<String> {
        let choice = self.choice(index, delta, Some(reason.as_str()));
        vec![self.chunk(choice)]
    }

    fn quiet(&mut self, index: u32, delta: Delta) {
        *self.generated.entry(index).or_insert(0) += delta.tokens;
    }

    fn usage(&mut self, completion_tokens: u32, _reasoning_tokens: u32) -> Option<String> {
        let usage = self.usage_with(completion_tokens);
        self.include_usage
            .then(|| to_json(&self.response(Vec::new(), Some(usage))))
    }
}
