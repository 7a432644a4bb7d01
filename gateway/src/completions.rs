//! `POST /v1/completions`: a raw prompt (string or token ids), no chat template, no reasoning
//! split (the text keeps any `<think>` tags), stop strings on the whole text.

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
use crate::metrics::Operation;
use crate::output::{Delta, TokenLogprob};
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
}

async fn run(state: AppState, batch: Batch) -> Result<Response, ApiError> {
    let clock = RequestClock::start(state.metrics(), Operation::TextCompletion);
    let req = &batch.prompts[0];
    let n = req.params.n;
    let mut runs = Vec::new();
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    // Prompt i's choice j is choice i*n + j, as OpenAI numbers them.
    for (i, prompt) in batch.prompts.iter().enumerate() {
        let mut these = generate::submit(&state, prompt, &clock).await?;
        let (p, c) = generate::prompt_usage(&these, prompt);
        prompt_tokens += p;
        cached_tokens += c;
        for r in &mut these {
            r.index += i as u32 * n;
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
        tok: state.files().tokenizer().clone(),
        logprobs: req.params.sampling.logprobs,
        include_usage: req.params.include_usage,
        usage: Usage {
            prompt_tokens,
            completion_tokens: 0,
            total_tokens: prompt_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            completion_tokens_details: None,
        },
        offsets: BTreeMap::new(),
        echo,
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
    if echo && logprobs.is_some() {
        return Err(ValidationError::Unsupported {
            field: "echo".into(),
            reason: "echo together with logprobs (prompt logprobs) is not supported by this \
                     server yet"
                .into(),
        }
        .into());
    }
    let mut params =
        validate::validate_params(&common, logprobs, state.files().sampling_defaults(), config)?;
    params.grammar = crate::structured::from_request(state, &body.0).await?;
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
    Ok(Batch { prompts, echo })
}

/// Writes completion responses and chunks.
struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    tok: Arc<TextTokenizer>,
    logprobs: bool,
    include_usage: bool,
    usage: Usage,
    /// Text length so far per choice (for `text_offset`).
    offsets: BTreeMap<u32, usize>,
    /// `echo`: the prompt text each choice starts with (taken by its first chunk).
    echo: BTreeMap<u32, String>,
}

impl CompletionFormat {
    fn usage_with(&self, completion_tokens: u32) -> Usage {
        Usage {
            completion_tokens,
            total_tokens: self.usage.prompt_tokens + completion_tokens,
            ..self.usage.clone()
        }
    }

    fn logprobs_of(&mut self, index: u32, items: &[TokenLogprob]) -> CompletionLogprobs {
        let offset = self.offsets.entry(index).or_insert(0);
        let mut out = CompletionLogprobs::default();
        for t in items {
            let token = self.tok.token_text(t.id);
            out.text_offset.push(*offset);
            *offset += token.len();
            out.token_logprobs.push(t.logprob);
            out.top_logprobs.push(
                t.top
                    .iter()
                    .map(|&(id, lp)| (self.tok.token_text(id), lp))
                    .collect(),
            );
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
        let logprobs = self
            .logprobs
            .then(|| self.logprobs_of(index, &delta.logprobs));
        CompletionChoice {
            index,
            text: delta.content,
            logprobs,
            finish_reason,
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
}

impl ChunkFormat for CompletionFormat {
    fn head(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<String> {
        let choice = self.choice(index, delta, None);
        vec![to_json(&self.response(vec![choice], None))]
    }

    fn finish(&mut self, index: u32, delta: Delta, reason: FinishReason) -> Vec<String> {
        let choice = self.choice(index, delta, Some(reason.as_str()));
        vec![to_json(&self.response(vec![choice], None))]
    }

    fn usage(&mut self, completion_tokens: u32, _reasoning_tokens: u32) -> Option<String> {
        let usage = self.usage_with(completion_tokens);
        self.include_usage
            .then(|| to_json(&self.response(Vec::new(), Some(usage))))
    }
}
