//! Target `request`: a request body → the validated internal request, through the steps the
//! chat and completions handlers run before submitting to a coordinator (`chat::parse`,
//! `completions::parse`): `extract::parse_body`, `fields::check`, the body and common-parameter
//! parsing, `models::check_model`, the logprob and parameter validation, `prompt::render_chat`
//! (template + embedded tokenizer) or the completion prompt, image loading through the gateway's
//! `ImagePipeline` (data URIs only: URLs would leave the machine), `prompt::finish_prompt`, and
//! `ValidatedRequest::to_proto`.
//!
//! Input: a first line `chat` or `completions`, then the body bytes.

use std::sync::Arc;

use fastrand::Rng;
use r4b_gateway::api::{ChatBody, CommonParams, CompletionBody};
use r4b_gateway::extract::{parse_body, JsonBody};
use r4b_gateway::fields::{self, Endpoint};
use r4b_gateway::prompt::{self, PromptParts};
use r4b_gateway::validate::{self, ValidatedRequest};
use r4b_gateway::{ApiError, AppState};
use serde_json::{json, Map, Value};

use crate::env::Env;
use crate::mutate;
use crate::Target;

/// Field names the gateway refuses or does not know, and nested keys, for mutations; the honoured
/// ones come from `fields::honoured`.
const OTHER_FIELDS: &[&str] = &[
    "functions",
    "logit_bias",
    "function_call",
    "store",
    "best_of",
    "suffix",
    "service_tier",
    "modalities",
    "reasoning_effort",
    "truncate_prompt_tokens",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "priority",
    "request_id",
    "chat_template",
    "mm_processor_kwargs",
    "extra_body",
    "include_usage",
    "thinking_mode",
    "enable_thinking",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "url",
];

/// The `request` target.
pub struct RequestTarget {
    env: Arc<Env>,
    /// Data URIs of the image corpus, spliced into generated messages.
    images: Vec<String>,
    /// Field names the mutations pick from: the gateway's honoured ones and [`OTHER_FIELDS`].
    fields: Vec<&'static str>,
}

impl RequestTarget {
    /// Starts the environment (fake coordinator, gateway state).
    pub fn new() -> anyhow::Result<Self> {
        use base64::Engine;
        let dir = crate::crate_dir().join("corpus").join("image");
        let images = crate::runner::load_corpus(&dir)?
            .iter()
            .filter(|b| b.len() < 64 << 10)
            .map(|b| {
                format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(b)
                )
            })
            .collect();
        Ok(RequestTarget {
            env: Env::start()?,
            images,
            fields: r4b_gateway::fields::honoured()
                .chain(OTHER_FIELDS.iter().copied())
                .collect(),
        })
    }

    fn random_value(&self, rng: &mut Rng, depth: u32) -> Value {
        let big = |rng: &mut Rng| -> Value {
            match rng.u8(..8) {
                0 => json!(i64::MAX),
                1 => json!(i64::MIN),
                2 => json!(u64::MAX),
                3 => json!(f64::MAX),
                4 => json!(-1),
                5 => json!(1e-300),
                6 => json!(u32::MAX as u64 + 1),
                _ => json!(rng.i64(-3..100)),
            }
        };
        match rng.u8(..12) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => big(rng),
            3 => json!(rng.f64() * 4.0 - 1.0),
            4 | 5 => Value::String(mutate::text(rng, 8)),
            6 if depth < 4 => Value::Array(
                (0..rng.usize(0..4))
                    .map(|_| self.random_value(rng, depth + 1))
                    .collect(),
            ),
            7 if depth < 4 => {
                let mut m = Map::new();
                for _ in 0..rng.usize(0..4) {
                    let k = mutate::pick(rng, &self.fields).copied().unwrap_or("x");
                    m.insert(k.to_string(), self.random_value(rng, depth + 1));
                }
                Value::Object(m)
            }
            8 => self.random_message(rng),
            9 => match mutate::pick(rng, &self.images) {
                Some(uri) => json!({"type": "image_url", "image_url": {"url": uri}}),
                None => Value::Null,
            },
            10 => json!({"type": "text", "text": mutate::text(rng, 6)}),
            _ => json!(rng.u32(..600)),
        }
    }

    fn random_message(&self, rng: &mut Rng) -> Value {
        let role = ["system", "user", "assistant", "developer", "tool", ""][rng.usize(..6)];
        let content = if rng.bool() {
            Value::String(mutate::text(rng, 8))
        } else {
            Value::Array(
                (0..rng.usize(0..3))
                    .map(|_| self.random_value(rng, 3))
                    .collect(),
            )
        };
        json!({"role": role, "content": content})
    }

    /// Replaces, inserts or deletes one node of `v`.
    fn mutate_json(&self, rng: &mut Rng, v: &mut Value, depth: u32) {
        let descend = depth < 6 && rng.u8(..3) > 0;
        match v {
            Value::Object(m) if !m.is_empty() && descend => {
                let keys: Vec<String> = m.keys().cloned().collect();
                if let Some(k) = mutate::pick(rng, &keys) {
                    if let Some(child) = m.get_mut(k) {
                        self.mutate_json(rng, child, depth + 1);
                    }
                }
            }
            Value::Array(a) if !a.is_empty() && descend => {
                let i = rng.usize(..a.len());
                self.mutate_json(rng, &mut a[i], depth + 1);
            }
            Value::Object(m) if rng.bool() => {
                if rng.bool() {
                    let k = mutate::pick(rng, &self.fields).copied().unwrap_or("x");
                    m.insert(k.to_string(), self.random_value(rng, depth));
                } else if let Some(k) = m.keys().nth(rng.usize(..m.len().max(1))).cloned() {
                    m.remove(&k);
                }
            }
            Value::Array(a) if rng.bool() => {
                if rng.bool() || a.is_empty() {
                    let at = rng.usize(..=a.len());
                    a.insert(at, self.random_value(rng, depth));
                } else {
                    a.remove(rng.usize(..a.len()));
                }
            }
            _ => *v = self.random_value(rng, depth),
        }
    }

    fn parse(&self, state: &AppState, endpoint: &str, body: &[u8]) -> Result<bool, ApiError> {
        let body = JsonBody(parse_body(body)?);
        let req = match endpoint {
            "completions" => self.completions(state, &body)?,
            _ => match self.chat(state, &body)? {
                Some(req) => req,
                None => return Ok(false),
            },
        };
        let pb = req.to_proto(0, state.files().stop_ids());
        if pb.prompt_ids.is_empty() {
            return Err(ApiError::Internal(
                "validated request without a prompt".into(),
            ));
        }
        Ok(true)
    }

    fn chat(
        &self,
        state: &AppState,
        body: &JsonBody,
    ) -> Result<Option<ValidatedRequest>, ApiError> {
        fields::check(&body.0, Endpoint::Chat)?;
        let chat: ChatBody = body.parse()?;
        let common: CommonParams = body.parse()?;
        let config = state.config();
        r4b_gateway::models::check_model(chat.model.as_deref(), &config.served_model_name)?;
        let logprobs =
            validate::chat_logprobs(chat.logprobs, chat.top_logprobs, config.max_top_logprobs)?;
        let mut params = validate::validate_params(
            &common,
            logprobs,
            state.files().sampling_defaults(),
            config,
        )?;
        params.grammar = r4b_gateway::structured::grammar(&body.0, state.files().grammars())?;
        let tools = r4b_gateway::tools::ToolRequest::parse(
            chat.tools.as_ref(),
            chat.tool_choice.as_ref(),
            chat.parallel_tool_calls.as_ref(),
        )?;
        let tools = tools.map(|t| t.tools).unwrap_or_default();
        let (messages, kwargs) = (chat.messages, chat.chat_template_kwargs);
        let agp = chat.add_generation_prompt.unwrap_or(true);
        let rendered = prompt::render_chat(state, messages, tools, kwargs, agp, false, true)?;
        if !rendered.images.iter().all(|i| i.url.starts_with("data:")) {
            // Network URLs: the SSRF-guarded fetcher is not fuzzed here.
            return Ok(None);
        }
        let images = self
            .env
            .runtime
            .block_on(state.images().load_all(&rendered.images))?;
        let parts = PromptParts {
            thinking_auto: rendered.thinking_auto,
            id: "chatcmpl-fuzz".into(),
            ids: rendered.ids,
            images,
            params,
            split_reasoning: true,
        };
        Ok(Some(prompt::finish_prompt(state, parts)?))
    }

    fn completions(&self, state: &AppState, body: &JsonBody) -> Result<ValidatedRequest, ApiError> {
        fields::check(&body.0, Endpoint::Completions)?;
        let req: CompletionBody = body.parse()?;
        let common: CommonParams = body.parse()?;
        let config = state.config();
        r4b_gateway::models::check_model(req.model.as_deref(), &config.served_model_name)?;
        let logprobs = validate::completion_logprobs(req.logprobs, config.max_top_logprobs)?;
        let mut params = validate::validate_params(
            &common,
            logprobs,
            state.files().sampling_defaults(),
            config,
        )?;
        params.grammar = r4b_gateway::structured::grammar(&body.0, state.files().grammars())?;
        let batch = r4b_gateway::completions::prompt_ids(state, req.prompt)?;
        let mut last = None;
        for ids in batch {
            let parts = PromptParts {
                thinking_auto: false,
                id: "cmpl-fuzz".into(),
                ids,
                images: Vec::new(),
                params: params.clone(),
                split_reasoning: false,
            };
            last = Some(prompt::finish_prompt(state, parts)?);
        }
        last.ok_or_else(|| ApiError::Internal("an empty prompt batch was accepted".into()))
    }
}

/// Splits an input into its endpoint line and body.
pub fn split_input(input: &[u8]) -> (&str, &[u8]) {
    let (head, body) = match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (&input[..0], input),
    };
    match head {
        b"completions" => ("completions", body),
        _ => ("chat", body),
    }
}

impl Target for RequestTarget {
    fn name(&self) -> &'static str {
        "request"
    }

    fn generate(&self, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
        let seed = mutate::pick(rng, seeds).cloned().unwrap_or_default();
        let (endpoint, body) = split_input(&seed);
        let endpoint = if rng.u8(..20) == 0 {
            ["chat", "completions"][rng.usize(..2)]
        } else {
            endpoint
        };
        let mut out = format!("{endpoint}\n").into_bytes();
        match rng.u8(..10) {
            0..=6 => {
                let mut v = serde_json::from_slice(body).unwrap_or_else(|_| json!({}));
                for _ in 0..rng.usize(1..=4) {
                    self.mutate_json(rng, &mut v, 0);
                }
                out.extend(serde_json::to_vec(&v).unwrap_or_default());
            }
            7 | 8 => {
                let mut b = body.to_vec();
                let dict: Vec<&[u8]> = mutate::TEXT_PIECES
                    .iter()
                    .map(|s| s.as_bytes())
                    .chain([
                        &b"{"[..],
                        b"}",
                        b"[",
                        b"]",
                        b"\"",
                        b":",
                        b",",
                        b"null",
                        b"1e999",
                        b"-0",
                    ])
                    .collect();
                mutate::bytes(rng, &mut b, 8, &dict);
                out.extend(b);
            }
            _ => {
                let other = mutate::pick(rng, seeds).cloned().unwrap_or_default();
                let (_, other) = split_input(&other);
                out.extend(mutate::splice(rng, body, other));
            }
        }
        out
    }

    fn run(&self, input: &[u8]) -> Result<bool, String> {
        let (endpoint, body) = split_input(input);
        match self.parse(&self.env.state, endpoint, body) {
            Err(ApiError::Internal(m)) => {
                Err(format!("internal error (a 500) for user input: {m}"))
            }
            Err(_) => Ok(false),
            Ok(accepted) => Ok(accepted),
        }
    }
}
