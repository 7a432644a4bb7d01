//! Parse, don't validate: request fields → [`GenerationParams`] → [`ValidatedRequest`].
//!
//! Every bound is checked here and every [`ValidationError`] names the field and the bound, so
//! the 400 body needs no translation. A [`ValidatedRequest`] is the only thing that can be turned
//! into a coordinator `GenerateRequest`.

use r4b_proto::v1 as pb;

use r4b_model::sampling::{self, FloatBound, SamplingError};

use crate::api::{CommonParams, StopField};
use crate::config::GatewayConfig;
use crate::constraint::Grammar;
use crate::model_files::{SamplingDefaults, StopIds};

/// A request field that is missing, out of range or inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// A required field is absent.
    #[error("`{field}` is required")]
    Missing {
        /// The field.
        field: String,
    },
    /// A value outside its bounds.
    #[error("`{field}` must be {bound}, got {value}")]
    OutOfRange {
        /// The field.
        field: String,
        /// The bound, e.g. `in [0, 2]`.
        bound: String,
        /// The value sent.
        value: String,
    },
    /// A value that is not allowed for another reason.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The prompt alone does not fit the context.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, your request has \
         {prompt} prompt tokens, leaving no room for a completion. Please reduce the length of the \
         messages or prompt."
    )]
    PromptTooLong {
        /// Context length.
        max_model_len: usize,
        /// Prompt tokens (images expanded).
        prompt: usize,
    },
    /// The prompt's text is provably too long from its byte length (it was not tokenized).
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, your request has \
         {bytes} bytes of text, which is at least {min_tokens} tokens. Please reduce the length of \
         the messages or prompt."
    )]
    PromptTooLongBytes {
        /// Context length.
        max_model_len: usize,
        /// Bytes of text.
        bytes: usize,
        /// Fewest tokens that many bytes can be.
        min_tokens: usize,
    },
    /// Prompt plus `max_tokens` does not fit the context.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {} tokens ({prompt} in the messages, {completion} in the completion). Please reduce the \
         length of the messages or completion.", prompt + completion
    )]
    ContextLength {
        /// Context length.
        max_model_len: usize,
        /// Prompt tokens (images expanded).
        prompt: usize,
        /// `max_tokens`.
        completion: usize,
    },
    /// The rendered prompt's `<image>` placeholders and the images do not pair up.
    #[error("the prompt has {placeholders} `<image>` placeholder(s) but the request has {images} image(s)")]
    ImageCount {
        /// `<image>` tokens in the prompt.
        placeholders: usize,
        /// Images in the request.
        images: usize,
    },
    /// The chat template refused the conversation (`raise_exception`) or failed on it.
    #[error("chat template: {reason}")]
    Template {
        /// The template's message.
        reason: String,
    },
    /// A field OpenAI or vLLM defines, with a value this server does not implement.
    #[error("`{field}`: {reason}")]
    Unsupported {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A field no API defines.
    #[error("Unrecognized request argument supplied: {field}")]
    Unknown {
        /// The field.
        field: String,
    },
    /// The coordinator refused the request (INVALID_ARGUMENT).
    #[error("{reason}")]
    Rejected {
        /// The coordinator's message.
        reason: String,
    },
}

impl ValidationError {
    /// The field at fault, for the error object's `param`.
    pub fn param(&self) -> Option<String> {
        match self {
            ValidationError::Missing { field }
            | ValidationError::OutOfRange { field, .. }
            | ValidationError::Invalid { field, .. }
            | ValidationError::Unsupported { field, .. }
            | ValidationError::Unknown { field } => Some(field.clone()),
            ValidationError::PromptTooLong { .. }
            | ValidationError::PromptTooLongBytes { .. }
            | ValidationError::ContextLength { .. } => Some("messages".into()),
            ValidationError::ImageCount { .. } | ValidationError::Template { .. } => {
                Some("messages".into())
            }
            ValidationError::Rejected { .. } => None,
        }
    }

    /// Machine-readable code for the error object.
    pub fn code(&self) -> &'static str {
        match self {
            ValidationError::Missing { .. } => "missing_required_parameter",
            ValidationError::Unsupported { .. } => "unsupported_parameter",
            ValidationError::Unknown { .. } => "unknown_parameter",
            ValidationError::PromptTooLong { .. }
            | ValidationError::PromptTooLongBytes { .. }
            | ValidationError::ContextLength { .. } => "context_length_exceeded",
            _ => "invalid_value",
        }
    }
}

fn out_of_range(field: &str, bound: &str, value: impl ToString) -> ValidationError {
    ValidationError::OutOfRange {
        field: field.into(),
        bound: bound.into(),
        value: value.to_string(),
    }
}

/// Log-probabilities asked for: `None` = off, `Some(k)` = chosen token plus `k` alternatives.
pub type LogprobRequest = Option<u32>;

/// Validated generation fields, before the prompt is known.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    /// Sampling, ready for the coordinator.
    pub sampling: pb::SamplingParams,
    /// Stop strings (checked by the gateway on the output text).
    pub stop_strings: Vec<String>,
    /// Extra stop token ids (added to the EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// `max_tokens` / `max_completion_tokens`, if given.
    pub max_tokens: Option<u32>,
    /// `min_tokens`.
    pub min_tokens: u32,
    /// `ignore_eos`.
    pub ignore_eos: bool,
    /// Thinking budget.
    pub max_thinking_tokens: Option<u32>,
    /// Choices.
    pub n: u32,
    /// Stream SSE.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// With `include_usage`: every chunk carries the usage so far (vLLM's
    /// `stream_options.continuous_usage_stats`).
    pub continuous_usage: bool,
    /// Structured output (`response_format`, `guided_*`, a forced tool call); None = free.
    pub grammar: Option<Grammar>,
}

/// A float field converted to the worker's `f32` and checked against the shared bound.
fn float_param(bound: &FloatBound, v: Option<f64>) -> Result<Option<f32>, ValidationError> {
    v.map(|x| bound.check_f64(x))
        .transpose()
        .map_err(ValidationError::from)
}

impl From<SamplingError> for ValidationError {
    fn from(e: SamplingError) -> Self {
        ValidationError::OutOfRange {
            field: e.field.into(),
            bound: e.bound.into(),
            value: e.value,
        }
    }
}

fn int_in(field: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<u32>, ValidationError> {
    match v {
        Some(x) if x < lo || x > hi => Err(out_of_range(field, &format!("in [{lo}, {hi}]"), x)),
        Some(x) => Ok(u32::try_from(x).ok()),
        None => Ok(None),
    }
}

fn sampling(
    raw: &CommonParams,
    defaults: &SamplingDefaults,
    logprobs: LogprobRequest,
) -> Result<pb::SamplingParams, ValidationError> {
    let temperature = float_param(&sampling::TEMPERATURE, raw.temperature)?;
    let top_p = float_param(&sampling::TOP_P, raw.top_p)?;
    let min_p = float_param(&sampling::MIN_P, raw.min_p)?;
    let presence = float_param(&sampling::PRESENCE_PENALTY, raw.presence_penalty)?;
    let frequency = float_param(&sampling::FREQUENCY_PENALTY, raw.frequency_penalty)?;
    let repetition = float_param(&sampling::REPETITION_PENALTY, raw.repetition_penalty)?;
    let top_k = match raw.top_k {
        None => None,
        Some(-1) | Some(0) => Some(0),
        Some(k) if k >= 1 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => return Err(out_of_range("top_k", "-1, 0 (off) or >= 1", k)),
    };
    let params = pb::SamplingParams {
        temperature: temperature.or(defaults.temperature).unwrap_or(1.0),
        top_p: top_p.or(defaults.top_p).unwrap_or(1.0),
        top_k: top_k.or(defaults.top_k).unwrap_or(0),
        min_p: min_p.or(defaults.min_p).unwrap_or(0.0),
        seed: raw.seed.map(|s| s as u64),
        presence_penalty: presence.unwrap_or(0.0),
        frequency_penalty: frequency.unwrap_or(0.0),
        repetition_penalty: repetition.or(defaults.repetition_penalty).unwrap_or(1.0),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        prompt_logprobs: None,
    };
    // The generation_config.json defaults pass the same bounds as the request fields.
    r4b_model::check_sampling(&params)?;
    Ok(params)
}

fn stop_strings(stop: &Option<StopField>, max: usize) -> Result<Vec<String>, ValidationError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stops.len() > max {
        return Err(out_of_range(
            "stop",
            &format!("a list of at most {max} strings"),
            format!("{} strings", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ValidationError::Invalid {
            field: "stop".into(),
            reason: "stop strings must not be empty".into(),
        });
    }
    Ok(stops)
}

/// Validates the shared generation fields.
pub fn validate_params(
    raw: &CommonParams,
    logprobs: LogprobRequest,
    defaults: &SamplingDefaults,
    config: &GatewayConfig,
) -> Result<GenerationParams, ValidationError> {
    let sampling = sampling(raw, defaults, logprobs)?;
    let (max_field, max_raw) = match raw.max_completion_tokens {
        Some(v) => ("max_completion_tokens", Some(v)),
        None => ("max_tokens", raw.max_tokens),
    };
    let max_tokens = int_in(max_field, max_raw, 1, i64::from(u32::MAX))?;
    let min_tokens = int_in("min_tokens", raw.min_tokens, 0, i64::from(u32::MAX))?.unwrap_or(0);
    if let Some(max) = max_tokens.filter(|&m| min_tokens > m) {
        return Err(out_of_range(
            "min_tokens",
            &format!("at most {max_field} ({max})"),
            min_tokens,
        ));
    }
    let n = int_in("n", raw.n, 1, i64::from(config.max_n))?.unwrap_or(1);
    let budget = match raw.max_thinking_tokens {
        Some(v) => int_in("max_thinking_tokens", Some(v), 0, i64::from(u32::MAX))?,
        None => int_in(
            "thinking_token_budget",
            raw.thinking_token_budget,
            0,
            i64::from(u32::MAX),
        )?,
    };
    let stop_token_ids = raw
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| {
            u32::try_from(id).map_err(|_| out_of_range("stop_token_ids", "token ids >= 0", id))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GenerationParams {
        sampling,
        stop_strings: stop_strings(&raw.stop, config.max_stop_strings)?,
        stop_token_ids,
        max_tokens,
        min_tokens,
        ignore_eos: raw.ignore_eos.unwrap_or(false),
        max_thinking_tokens: budget.or(config.default_max_thinking_tokens),
        n,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        continuous_usage: raw.stream_options.as_ref().is_some_and(|o| {
            o.include_usage.unwrap_or(false) && o.continuous_usage_stats.unwrap_or(false)
        }),
        grammar: None,
    })
}

/// Chat `logprobs` (bool) + `top_logprobs` (0..=max, needs `logprobs: true`).
pub fn chat_logprobs(
    logprobs: Option<bool>,
    top: Option<i64>,
    max: u32,
) -> Result<LogprobRequest, ValidationError> {
    let top = int_in("top_logprobs", top, 0, i64::from(max))?;
    match (logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(k)) if k > 0 => Err(ValidationError::Invalid {
            field: "top_logprobs".into(),
            reason: "requires `logprobs` to be true".into(),
        }),
        (false, _) => Ok(None),
    }
}

/// Completions `logprobs` (an integer 0..=max).
pub fn completion_logprobs(
    logprobs: Option<i64>,
    max: u32,
) -> Result<LogprobRequest, ValidationError> {
    int_in("logprobs", logprobs, 0, i64::from(max))
}

/// Completion budget for a prompt of `prompt_len` tokens: `max_tokens`, or what is left of the
/// context. Errors like vLLM when the request does not fit.
pub fn max_new_tokens(
    prompt_len: usize,
    max_tokens: Option<u32>,
    max_model_len: usize,
) -> Result<u32, ValidationError> {
    match max_tokens {
        Some(m) if prompt_len + m as usize > max_model_len => Err(ValidationError::ContextLength {
            max_model_len,
            prompt: prompt_len,
            completion: m as usize,
        }),
        Some(m) => Ok(m),
        None if prompt_len >= max_model_len => Err(ValidationError::PromptTooLong {
            max_model_len,
            prompt: prompt_len,
        }),
        None => Ok(u32::try_from(max_model_len - prompt_len).unwrap_or(u32::MAX)),
    }
}

/// Replaces the `i`-th `<image>` token by `counts[i]` copies. The number of `<image>` tokens must
/// equal the number of images.
pub fn expand_image_tokens(
    ids: &[u32],
    image_id: u32,
    counts: &[u32],
) -> Result<Vec<u32>, ValidationError> {
    let placeholders = ids.iter().filter(|&&t| t == image_id).count();
    if placeholders != counts.len() {
        return Err(ValidationError::ImageCount {
            placeholders,
            images: counts.len(),
        });
    }
    let extra: usize = counts.iter().map(|&c| c as usize).sum();
    let mut out = Vec::with_capacity(ids.len() + extra);
    let mut next = counts.iter();
    for &t in ids {
        if t == image_id {
            let n = next.next().copied().unwrap_or(0) as usize;
            out.extend(std::iter::repeat_n(image_id, n));
        } else {
            out.push(t);
        }
    }
    Ok(out)
}

/// A request that passed every check: what the gateway sends (once per choice) and how it
/// post-processes the output.
#[derive(Clone, Debug)]
pub struct ValidatedRequest {
    /// Request id (`chatcmpl-...` / `cmpl-...`).
    pub id: String,
    /// Prompt ids, every `<image>` expanded.
    pub prompt_ids: Vec<u32>,
    /// Images in prompt order.
    pub images: Vec<pb::Image>,
    /// Validated generation fields.
    pub params: GenerationParams,
    /// Completion budget.
    pub max_new_tokens: u32,
    /// The prompt ends inside a think block.
    pub think_open_in_prompt: bool,
    /// Split `<think>…</think>` into reasoning (chat) or keep the raw text (completions).
    pub split_reasoning: bool,
    /// Chat in `thinking_mode` auto: the model decides whether to think.
    pub thinking_auto: bool,
}

impl ValidatedRequest {
    /// The coordinator request of choice `index` (seeds differ per choice).
    pub fn to_proto(&self, index: u32, ids: &StopIds) -> pb::GenerateRequest {
        let mut sampling = self.params.sampling;
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(u64::from(index)));
        let mut stop_token_ids = ids.eos.clone();
        for &t in &self.params.stop_token_ids {
            if !stop_token_ids.contains(&t) {
                stop_token_ids.push(t);
            }
        }
        let thinking = ids.think_open.zip(ids.think_close);
        pb::GenerateRequest {
            request_id: format!("{}-{index}", self.id),
            prompt_ids: self.prompt_ids.clone(),
            images: self.images.clone(),
            sampling: Some(sampling),
            stopping: Some(pb::StoppingParams {
                max_new_tokens: self.max_new_tokens,
                stop_token_ids: stop_token_ids.clone(),
                min_new_tokens: self.params.min_tokens,
                ignore_eos: self.params.ignore_eos,
                max_thinking_tokens: thinking.and(self.params.max_thinking_tokens),
                think_open_id: ids.think_open.unwrap_or(0),
                think_close_ids: if thinking.is_some() {
                    ids.think_close_ids.clone()
                } else {
                    Vec::new()
                },
                think_close_id: ids.think_close.unwrap_or(0),
                think_open_in_prompt: self.think_open_in_prompt,
            }),
            constraint: self.params.grammar.as_ref().map(|g| {
                // A think block may only be opened by the model in auto mode (or be open).
                let thinking =
                    self.split_reasoning && (self.thinking_auto || self.think_open_in_prompt);
                let mut c = g.to_proto(ids, thinking, self.think_open_in_prompt);
                c.stop_token_ids = stop_token_ids.clone();
                c
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: serde_json::Value) -> Result<GenerationParams, ValidationError> {
        let raw: CommonParams = serde_json::from_value(v).expect("well-typed test body");
        validate_params(
            &raw,
            None,
            &SamplingDefaults::default(),
            &GatewayConfig::default(),
        )
    }

    fn rejects(v: serde_json::Value, field: &str, bound_part: &str) {
        match params(v.clone()) {
            Err(e) => {
                assert_eq!(e.param().as_deref(), Some(field), "{v}: {e}");
                assert!(
                    e.to_string().contains(bound_part),
                    "{v}: `{e}` lacks `{bound_part}`"
                );
            }
            Ok(_) => panic!("{v} must be rejected"),
        }
    }

    #[test]
    fn bounds_are_enforced_and_named() {
        rejects(json!({"temperature": 2.5}), "temperature", "in [0, 2]");
        rejects(json!({"temperature": -0.1}), "temperature", "in [0, 2]");
        rejects(json!({"top_p": 0}), "top_p", "in (0, 1]");
        rejects(json!({"top_p": 1.01}), "top_p", "in (0, 1]");
        rejects(json!({"top_k": -2}), "top_k", ">= 1");
        rejects(json!({"min_p": 1.5}), "min_p", "in [0, 1]");
        rejects(
            json!({"presence_penalty": 2.1}),
            "presence_penalty",
            "in [-2, 2]",
        );
        rejects(
            json!({"frequency_penalty": -3}),
            "frequency_penalty",
            "in [-2, 2]",
        );
        rejects(
            json!({"repetition_penalty": 0}),
            "repetition_penalty",
            "in [0.01, 100]",
        );
        // Values that pass in f64 but break in the worker's f32 are refused too.
        rejects(
            json!({"repetition_penalty": 1e300}),
            "repetition_penalty",
            "infinite as a 32-bit float",
        );
        rejects(json!({"top_p": 1e-300}), "top_p", "0 as a 32-bit float");
        rejects(
            json!({"repetition_penalty": 1e-300}),
            "repetition_penalty",
            "in [0.01, 100]",
        );
        rejects(json!({"max_tokens": 0}), "max_tokens", "in [1,");
        rejects(json!({"max_tokens": -5}), "max_tokens", "got -5");
        rejects(
            json!({"max_completion_tokens": 0}),
            "max_completion_tokens",
            "in [1,",
        );
        rejects(json!({"n": 0}), "n", "in [1, 8]");
        rejects(json!({"n": 9}), "n", "in [1, 8]");
        rejects(
            json!({"min_tokens": 10, "max_tokens": 5}),
            "min_tokens",
            "at most max_tokens (5)",
        );
        rejects(json!({"stop": vec!["a"; 17]}), "stop", "at most 16");
        rejects(json!({"stop": ""}), "stop", "empty");
        rejects(
            json!({"max_thinking_tokens": -1}),
            "max_thinking_tokens",
            "in [0,",
        );
        rejects(
            json!({"thinking_token_budget": -1}),
            "thinking_token_budget",
            "in [0,",
        );
    }

    #[test]
    fn defaults_and_mapping() {
        let p = params(json!({})).expect("empty is fine");
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, 1.0);
        assert_eq!(p.sampling.top_k, 0);
        assert_eq!(p.sampling.repetition_penalty, 1.0);
        assert_eq!(
            (p.n, p.stream, p.include_usage, p.max_tokens),
            (1, false, false, None)
        );
        let p = params(json!({
            "temperature": 0, "top_k": -1, "seed": -1, "stop": "END", "max_tokens": 7,
            "stream": true, "stream_options": {"include_usage": true}, "thinking_token_budget": 12,
        }))
        .expect("valid");
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_k, 0);
        assert_eq!(p.sampling.seed, Some(u64::MAX));
        assert_eq!(p.stop_strings, vec!["END".to_string()]);
        assert_eq!(
            (
                p.max_tokens,
                p.stream,
                p.include_usage,
                p.max_thinking_tokens
            ),
            (Some(7), true, true, Some(12))
        );
        let p = params(json!({"max_tokens": 3, "max_completion_tokens": 9})).expect("valid");
        assert_eq!(p.max_tokens, Some(9));
    }

    #[test]
    fn generation_config_defaults_apply_when_unset() {
        let raw: CommonParams = serde_json::from_value(json!({"top_p": 0.5})).expect("typed");
        let defaults = SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.95),
            top_k: Some(20),
            ..Default::default()
        };
        let p = validate_params(&raw, None, &defaults, &GatewayConfig::default()).expect("valid");
        assert_eq!(
            (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k),
            (0.6, 0.5, 20)
        );
    }

    #[test]
    fn logprob_fields() {
        assert_eq!(chat_logprobs(Some(true), Some(3), 20).expect("ok"), Some(3));
        assert_eq!(chat_logprobs(Some(true), None, 20).expect("ok"), Some(0));
        assert_eq!(chat_logprobs(None, None, 20).expect("ok"), None);
        assert!(matches!(
            chat_logprobs(Some(true), Some(21), 20),
            Err(ValidationError::OutOfRange { .. })
        ));
        assert!(matches!(
            chat_logprobs(Some(false), Some(2), 20),
            Err(ValidationError::Invalid { .. })
        ));
        assert_eq!(completion_logprobs(Some(2), 20).expect("ok"), Some(2));
        assert!(completion_logprobs(Some(-1), 20).is_err());
    }

    #[test]
    fn context_length_messages() {
        assert_eq!(max_new_tokens(10, None, 100).expect("fits"), 90);
        assert_eq!(max_new_tokens(10, Some(90), 100).expect("fits"), 90);
        let e = max_new_tokens(10, Some(91), 100).expect_err("too long");
        assert_eq!(
            e.to_string(),
            "This model's maximum context length is 100 tokens. However, you requested 101 tokens \
             (10 in the messages, 91 in the completion). Please reduce the length of the messages or completion."
        );
        assert!(matches!(
            max_new_tokens(100, None, 100),
            Err(ValidationError::PromptTooLong { .. })
        ));
    }

    #[test]
    fn image_expansion() {
        assert_eq!(
            expand_image_tokens(&[1, 9, 2, 9, 3], 9, &[2, 3]).expect("ok"),
            vec![1, 9, 9, 2, 9, 9, 9, 3]
        );
        assert!(matches!(
            expand_image_tokens(&[1, 9, 2], 9, &[]),
            Err(ValidationError::ImageCount {
                placeholders: 1,
                images: 0
            })
        ));
        assert!(matches!(
            expand_image_tokens(&[1, 2], 9, &[4]),
            Err(ValidationError::ImageCount {
                placeholders: 0,
                images: 1
            })
        ));
    }

    #[test]
    fn proto_request_per_choice() {
        let mut p = params(json!({"seed": 5, "stop_token_ids": [7, 258]})).expect("valid");
        p.max_thinking_tokens = Some(4);
        let req = ValidatedRequest {
            id: "chatcmpl-x".into(),
            prompt_ids: vec![1, 2],
            images: vec![],
            params: p,
            max_new_tokens: 10,
            think_open_in_prompt: true,
            split_reasoning: true,
            thinking_auto: false,
        };
        let ids = StopIds {
            eos: vec![258, 256],
            think_open: Some(259),
            think_close: Some(260),
            think_close_ids: vec![10, 260, 10, 10],
        };
        let g = req.to_proto(1, &ids);
        assert_eq!(g.request_id, "chatcmpl-x-1");
        assert_eq!(g.sampling.expect("sampling").seed, Some(6));
        let s = g.stopping.expect("stopping");
        assert_eq!(s.stop_token_ids, vec![258, 256, 7]);
        assert_eq!(
            (
                s.max_new_tokens,
                s.max_thinking_tokens,
                s.think_open_id,
                s.think_close_id
            ),
            (10, Some(4), 259, 260)
        );
        assert_eq!(s.think_close_ids, vec![10, 260, 10, 10]);
        assert!(s.think_open_in_prompt);
    }
}
