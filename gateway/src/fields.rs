//! Which request fields the server honours. Every field of a chat or completions body is one of:
//! - honoured (parsed and used by `validate`/`prompt`),
//! - informational and accepted (`user`, `metadata`: they change nothing OpenAI returns),
//! - defined by OpenAI (or vLLM) but not implemented here: a 400 `unsupported_parameter` naming
//!   it, unless its value is the neutral one (`null`, `tools: []`, `echo: false`, ...),
//! - unknown: a 400 `unknown_parameter` naming it, as OpenAI answers.
//!
//! So no request gets a 200 that silently ignores what it asked for.

use serde_json::{Map, Value};

use crate::validate::ValidationError;

/// Fields both generation endpoints honour (`CommonParams`).
const COMMON: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "n",
    "stream",
    "stream_options",
    "min_tokens",
    "ignore_eos",
    "max_thinking_tokens",
    "thinking_token_budget",
    // Informational: accepted, nothing to do (OpenAI uses them for abuse monitoring and
    // dashboards; they change nothing it returns).
    "user",
    "metadata",
    "safety_identifier",
];

/// Chat-only fields honoured.
const CHAT: &[&str] = &[
    "messages",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "add_generation_prompt",
    // Tool calling (`tools::ToolRequest`); the legacy `functions`/`function_call` stay refused.
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "prompt_logprobs",
    "return_tokens_as_token_ids",
];

/// Completions-only fields honoured.
const COMPLETIONS: &[&str] = &[
    "prompt",
    "logprobs",
    "echo",
    "prompt_logprobs",
    "return_tokens_as_token_ids",
];

/// Every field either endpoint honours or accepts (for the fuzz harness's mutations).
pub fn honoured() -> impl Iterator<Item = &'static str> {
    COMMON
        .iter()
        .chain(CHAT)
        .chain(COMPLETIONS)
        .chain(crate::structured::FIELDS)
        .copied()
}

/// Fields OpenAI or vLLM define that this server does not implement yet, with the values that
/// ask for nothing (accepted).
fn neutral(field: &str, v: &Value) -> Option<bool> {
    let empty = |v: &Value| match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    let yes = v.is_null()
        || match field {
            "tools" | "functions" | "logit_bias" => empty(v),
            "tool_choice" | "function_call" => v == "none",
            "parallel_tool_calls" => v.is_boolean(),
            "echo" | "store" => v == &Value::Bool(false),
            "best_of" => v.as_u64() == Some(1),
            "suffix" => v == "",
            "service_tier" => v == "auto" || v == "default",
            "modalities" => v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
            "audio"
            | "prediction"
            | "web_search_options"
            | "reasoning_effort"
            | "verbosity"
            | "prompt_cache_key"
            | "response_format_options"
            | "truncate_prompt_tokens"
            | "bad_words"
            | "allowed_token_ids"
            | "logits_processors"
            | "use_beam_search"
            | "length_penalty"
            | "include_stop_str_in_output"
            | "skip_special_tokens"
            | "spaces_between_special_tokens"
            | "priority"
            | "request_id"
            | "documents"
            | "chat_template"
            | "mm_processor_kwargs" => false,
            _ => return None,
        };
    Some(yes)
}

/// Which endpoint a body is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

fn unsupported(field: String, what: &str) -> ValidationError {
    ValidationError::Unsupported {
        field,
        reason: format!("{what} is not supported by this server yet"),
    }
}

/// Refuses the fields of `body` that would otherwise be ignored (see the module doc).
pub fn check(body: &Value, endpoint: Endpoint) -> Result<(), ValidationError> {
    let Some(obj) = body.as_object() else {
        return Ok(());
    };
    let own = match endpoint {
        Endpoint::Chat => CHAT,
        Endpoint::Completions => COMPLETIONS,
    };
    for (field, value) in obj {
        if COMMON.contains(&field.as_str())
            || own.contains(&field.as_str())
            || crate::structured::FIELDS.contains(&field.as_str())
        {
            continue;
        }
        match neutral(field, value) {
            Some(true) => {}
            Some(false) => return Err(unsupported(field.clone(), "this value")),
            None => {
                return Err(ValidationError::Unknown {
                    field: field.clone(),
                })
            }
        }
    }
    if let Some(Value::Object(opts)) = obj.get("stream_options") {
        check_object(
            opts,
            "stream_options",
            &["include_usage", "continuous_usage_stats"],
            |_, _| false,
        )?;
    }
    if let Some(Value::Array(messages)) = obj.get("messages") {
        for (i, m) in messages.iter().enumerate() {
            if let Some(m) = m.as_object() {
                check_object(
                    m,
                    &format!("messages[{i}]"),
                    &["role", "content", "tool_calls", "tool_call_id"],
                    |_, v| v.is_null(),
                )?;
            }
        }
    }
    Ok(())
}

/// Every key of `obj` is in `honoured` or `accepted(key, value)`; otherwise a 400 naming
/// `prefix.key`.
fn check_object(
    obj: &Map<String, Value>,
    prefix: &str,
    honoured: &[&str],
    accepted: impl Fn(&str, &Value) -> bool,
) -> Result<(), ValidationError> {
    for (k, v) in obj {
        if !honoured.contains(&k.as_str()) && !accepted(k, v) {
            return Err(unsupported(format!("{prefix}.{k}"), "this field"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(body: Value, e: Endpoint) -> Option<(String, &'static str)> {
        check(&body, e)
            .err()
            .map(|e| (e.param().unwrap_or_default(), e.code()))
    }

    #[test]
    fn honoured_neutral_unsupported_and_unknown() {
        let chat = |extra: Value| {
            let mut b = json!({"model": "r4b", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.5, "user": "u1", "metadata": {"a": "b"}});
            for (k, v) in extra.as_object().expect("object") {
                b[k] = v.clone();
            }
            field_of(b, Endpoint::Chat)
        };
        assert_eq!(chat(json!({})), None);
        for neutral in [
            json!({"tools": []}),
            json!({"tool_choice": "none"}),
            json!({"response_format": {"type": "text"}}),
            json!({"logit_bias": {}}),
            json!({"stream_options": {"include_usage": true, "continuous_usage_stats": false}}),
            json!({"guided_json": null}),
        ] {
            assert_eq!(chat(neutral.clone()), None, "{neutral}");
        }
        let unsupported = |f: &str| Some((f.to_string(), "unsupported_parameter"));
        // Tools are honoured in chat (tools.rs checks their values), not in completions.
        assert_eq!(
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required", "parallel_tool_calls": false})
            ),
            None
        );
        assert_eq!(
            chat(json!({"functions": [{"name": "f"}]})),
            unsupported("functions")
        );
        assert_eq!(
            chat(json!({"function_call": "auto"})),
            unsupported("function_call")
        );
        // Structured output is honoured (its values are checked by `structured`).
        assert_eq!(
            chat(json!({"response_format": {"type": "json_object"}})),
            None
        );
        assert_eq!(chat(json!({"guided_regex": "a+"})), None);
        assert_eq!(
            chat(json!({"logit_bias": {"5": 3}})),
            unsupported("logit_bias")
        );
        for honoured in [
            json!({"stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
            json!({"prompt_logprobs": 2, "return_tokens_as_token_ids": true}),
        ] {
            assert_eq!(chat(honoured.clone()), None, "{honoured}");
        }
        assert_eq!(
            chat(json!({"stream_options": {"include_obfuscation": true}})),
            unsupported("stream_options.include_obfuscation")
        );
        assert_eq!(
            chat(json!({"messages": [{"role": "user", "content": "x", "name": "bob"}]})),
            unsupported("messages[0].name")
        );
        assert_eq!(
            chat(json!({"frobnicate": 1})),
            Some(("frobnicate".into(), "unknown_parameter"))
        );
        // `prompt` belongs to completions, `messages` to chat.
        assert_eq!(
            chat(json!({"prompt": "x"})),
            Some(("prompt".into(), "unknown_parameter"))
        );
        let completion = |extra: Value| {
            let mut b = json!({"model": "r4b", "prompt": "hi", "logprobs": 2});
            for (k, v) in extra.as_object().expect("object") {
                b[k] = v.clone();
            }
            field_of(b, Endpoint::Completions)
        };
        assert_eq!(completion(json!({"echo": false, "best_of": 1})), None);
        assert_eq!(completion(json!({"echo": true})), None);
        assert_eq!(
            completion(json!({"prompt_logprobs": 1, "return_tokens_as_token_ids": true})),
            None
        );
        assert_eq!(chat(json!({"echo": true})), unsupported("echo"));
        assert_eq!(completion(json!({"suffix": "end"})), unsupported("suffix"));
        assert_eq!(
            completion(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            unsupported("tools")
        );
        assert_eq!(
            completion(json!({"messages": []})),
            Some(("messages".into(), "unknown_parameter"))
        );
    }
}
