//! Building the prompt: OpenAI messages → template messages + image references → rendered text
//! → token ids ([`render_chat`], shared by `/v1/chat/completions` and `/tokenize`) → `<image>`
//! expansion ([`expand_images`]) and length checks ([`finish_prompt`]).

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::api::ChatMessage;
use crate::error::ApiError;
use crate::images::ImageRef;
use crate::reasoning::think_open_in_prompt;
use crate::state::AppState;
use crate::template::{TemplateMessage, TemplatePart};
use crate::tokens::unescape;
use crate::validate::{
    expand_image_tokens, max_new_tokens, GenerationParams, ValidatedRequest, ValidationError,
};

/// Thinking modes R-4B's template knows.
const THINKING_MODES: [&str; 3] = ["auto", "long", "short"];

/// Messages for the template and the images they reference, in order.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    /// Messages with content as parts.
    pub messages: Vec<TemplateMessage>,
    /// Every image part, in message and part order.
    pub images: Vec<ImageRef>,
}

fn invalid(field: String, reason: &str) -> ValidationError {
    ValidationError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// Converts `messages` (required, non-empty; roles system/developer/user/assistant/tool).
pub fn conversation(messages: Option<Vec<ChatMessage>>) -> Result<Conversation, ValidationError> {
    let messages = messages.ok_or_else(|| ValidationError::Missing {
        field: "messages".into(),
    })?;
    if messages.is_empty() {
        return Err(invalid(
            "messages".into(),
            "must contain at least one message",
        ));
    }
    let mut conv = Conversation::default();
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                let reason = format!(
                    "unsupported role `{other}` (expected system, user, assistant or tool)"
                );
                return Err(invalid(format!("messages[{i}].role"), &reason));
            }
        };
        let parts = content_parts(i, &m.content, &mut conv.images)?;
        let tool_calls = tool_calls(i, role, &m.tool_calls)?;
        let tool_call_id = match (&m.tool_call_id, role) {
            (Value::String(id), "tool") => Some(id.clone()),
            (Value::Null, "tool") => {
                return Err(ValidationError::Missing {
                    field: format!("messages[{i}].tool_call_id"),
                })
            }
            (Value::Null, _) => None,
            (_, "tool") => {
                return Err(invalid(
                    format!("messages[{i}].tool_call_id"),
                    "must be a string",
                ))
            }
            _ => {
                return Err(invalid(
                    format!("messages[{i}].tool_call_id"),
                    "only `tool` messages answer a call",
                ))
            }
        };
        conv.messages.push(TemplateMessage {
            role: role.to_string(),
            parts,
            tool_calls,
            tool_call_id,
        });
    }
    Ok(conv)
}

/// An assistant message's `tool_calls` for the template: each `arguments` JSON text parsed into
/// a value, as vLLM hands them to the template (Qwen3's writes them back with `tojson`).
fn tool_calls(i: usize, role: &str, calls: &Value) -> Result<Vec<Value>, ValidationError> {
    let at = format!("messages[{i}].tool_calls");
    let list = match calls {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) if role == "assistant" => list,
        Value::Array(_) => return Err(invalid(at, "only `assistant` messages make calls")),
        _ => return Err(invalid(at, "must be a list of calls")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, call) in list.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let kind = call
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            return Err(invalid(format!("{at}.type"), "must be \"function\""));
        }
        let Some(function) = call.get("function") else {
            return Err(ValidationError::Missing {
                field: format!("{at}.function"),
            });
        };
        let Some(name) = function.get("name").and_then(Value::as_str) else {
            return Err(invalid(format!("{at}.function.name"), "must be a string"));
        };
        let arguments = match function.get("arguments") {
            Some(Value::String(text)) => serde_json::from_str::<Value>(text).map_err(|e| {
                invalid(
                    format!("{at}.function.arguments"),
                    &format!("must be JSON text: {e}"),
                )
            })?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => {
                return Err(invalid(
                    format!("{at}.function.arguments"),
                    "must be a JSON string",
                ))
            }
        };
        let mut entry = serde_json::json!({
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        });
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            entry["id"] = id.into();
        }
        out.push(entry);
    }
    Ok(out)
}

fn content_parts(
    i: usize,
    content: &Value,
    images: &mut Vec<ImageRef>,
) -> Result<Vec<TemplatePart>, ValidationError> {
    let list = match content {
        Value::Null => return Ok(Vec::new()),
        Value::String(s) => return Ok(vec![TemplatePart::Text(s.clone())]),
        Value::Array(list) => list,
        _ => {
            return Err(invalid(
                format!("messages[{i}].content"),
                "must be a string or a list of content parts",
            ))
        }
    };
    let mut parts = Vec::with_capacity(list.len());
    for (j, part) in list.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        let kind = part.get("type").and_then(Value::as_str);
        match kind {
            Some("text") => match part.get("text") {
                Some(Value::String(t)) => parts.push(TemplatePart::Text(t.clone())),
                _ => return Err(invalid(format!("{at}.text"), "must be a string")),
            },
            Some("image_url") => {
                let url = match part.get("image_url") {
                    Some(Value::String(u)) => u.clone(),
                    Some(Value::Object(o)) => match o.get("url") {
                        Some(Value::String(u)) => u.clone(),
                        _ => {
                            return Err(invalid(format!("{at}.image_url.url"), "must be a string"))
                        }
                    },
                    _ => {
                        return Err(invalid(
                            format!("{at}.image_url"),
                            "must be a URL string or {\"url\": ...}",
                        ))
                    }
                };
                images.push(ImageRef {
                    param: format!("{at}.image_url"),
                    url,
                });
                parts.push(TemplatePart::Image);
            }
            Some(other) => {
                let reason = format!(
                    "unsupported content part type `{other}` (expected `text` or `image_url`)"
                );
                return Err(invalid(format!("{at}.type"), &reason));
            }
            None => {
                return Err(ValidationError::Missing {
                    field: format!("{at}.type"),
                })
            }
        }
    }
    Ok(parts)
}

/// Checks `chat_template_kwargs`: `thinking_mode` must be auto, long or short. Without a
/// `thinking_mode`, Qwen3's boolean `enable_thinking` maps to long (true) or short (false).
pub fn template_kwargs(
    kwargs: Option<Map<String, Value>>,
) -> Result<Map<String, Value>, ValidationError> {
    let mut kwargs = kwargs.unwrap_or_default();
    match kwargs.get("thinking_mode") {
        None | Some(Value::Null) => {
            if let Some(enable) = kwargs.get("enable_thinking").and_then(Value::as_bool) {
                kwargs.insert(
                    "thinking_mode".into(),
                    if enable { "long" } else { "short" }.into(),
                );
            }
        }
        Some(Value::String(mode)) if THINKING_MODES.contains(&mode.as_str()) => {}
        Some(other) => {
            return Err(ValidationError::OutOfRange {
                field: "chat_template_kwargs.thinking_mode".into(),
                bound: "one of \"auto\", \"long\", \"short\"".into(),
                value: other.to_string(),
            })
        }
    }
    Ok(kwargs)
}

/// Renders the conversation (and `tools`) with the model's chat template. A template that never
/// reads `tools` cannot show them to the model: such a request is refused, never served
/// without them.
pub fn render(
    state: &AppState,
    conv: &Conversation,
    tools: &[Value],
    add_generation_prompt: bool,
    kwargs: &Map<String, Value>,
) -> Result<String, ValidationError> {
    let template = state.files().template().ok_or_else(|| {
        invalid(
            "messages".into(),
            "the served model has no chat template; use /v1/completions",
        )
    })?;
    if !tools.is_empty() && !template.uses_tools() {
        return Err(ValidationError::Unsupported {
            field: "tools".into(),
            reason: "the served model's chat template does not render tools".into(),
        });
    }
    template
        .render_with_tools(&conv.messages, tools, add_generation_prompt, kwargs)
        .map_err(|e| ValidationError::Template { reason: e.0 })
}

/// Applies `f` to every string inside `v` (keys excluded).
fn map_strings(v: &mut Value, f: &impl Fn(&str) -> Option<String>) {
    match v {
        Value::String(s) => {
            if let Some(new) = f(s) {
                *s = new;
            }
        }
        Value::Array(list) => list.iter_mut().for_each(|x| map_strings(x, f)),
        Value::Object(map) => map.values_mut().for_each(|x| map_strings(x, f)),
        _ => {}
    }
}

/// Runs `f` on the blocking pool: rendering and tokenizing a large body takes seconds of CPU,
/// which must not stall the async runtime that serves every other request.
pub async fn off_runtime<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))?
}

/// Refuses text that is too long for the context from its byte length alone, before it is
/// tokenized: `bytes` of text are at least [`TextTokenizer::min_tokens`] tokens.
///
/// [`TextTokenizer::min_tokens`]: crate::tokens::TextTokenizer::min_tokens
pub fn check_text_length(state: &AppState, bytes: usize) -> Result<(), ValidationError> {
    let min_tokens = state.files().tokenizer().min_tokens(bytes);
    let max_model_len = state.max_model_len();
    if min_tokens >= max_model_len {
        return Err(ValidationError::PromptTooLongBytes {
            max_model_len,
            bytes,
            min_tokens,
        });
    }
    Ok(())
}

/// Tokenizes prompt text.
pub fn tokenize(
    state: &AppState,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    state
        .files()
        .tokenizer()
        .encode(text, add_special_tokens)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Checks that the `<image>` placeholders in `ids` pair up with `images` images (before they
/// are fetched).
pub fn check_placeholders(
    state: &AppState,
    ids: &[u32],
    images: usize,
) -> Result<(), ValidationError> {
    let placeholders = state
        .image_token_id()
        .map_or(0, |img| ids.iter().filter(|&&t| t == img).count());
    if placeholders != images {
        return Err(ValidationError::ImageCount {
            placeholders,
            images,
        });
    }
    Ok(())
}

/// A chat conversation rendered with the template and tokenized; its images are referenced,
/// not fetched yet.
#[derive(Clone, Debug)]
pub struct RenderedChat {
    /// The rendered template text.
    pub text: String,
    /// Token ids of `text` (one `<image>` token per image).
    pub ids: Vec<u32>,
    /// Every image part, in message and part order.
    pub images: Vec<ImageRef>,
    /// `thinking_mode` is auto (or unset): the model decides whether to think.
    pub thinking_auto: bool,
}

/// The chat prompt path shared by `/v1/chat/completions` and `/tokenize`: converts `messages`,
/// checks `chat_template_kwargs` (`thinking_mode`), renders the template, tokenizes the text and
/// checks that its `<image>` placeholders pair up with the images.
///
/// With `check_length`, text that is provably longer than the context (from its byte length)
/// is refused before the template runs.
pub fn render_chat(
    state: &AppState,
    messages: Option<Vec<ChatMessage>>,
    mut tools: Vec<Value>,
    kwargs: Option<Map<String, Value>>,
    add_generation_prompt: bool,
    add_special_tokens: bool,
    check_length: bool,
) -> Result<RenderedChat, ApiError> {
    let conv = conversation(messages)?;
    if check_length {
        let bytes = conv
            .messages
            .iter()
            .flat_map(|m| &m.parts)
            .map(|p| match p {
                TemplatePart::Text(t) => t.len(),
                TemplatePart::Image => 0,
            })
            .sum();
        check_text_length(state, bytes)?;
    }
    let kwargs = template_kwargs(kwargs)?;
    let thinking_auto = kwargs
        .get("thinking_mode")
        .and_then(Value::as_str)
        .is_none_or(|m| m == "auto");
    let mut conv = conv;
    let tokenizer = state.files().tokenizer();
    if !state.config().allow_special_tokens_in_content {
        // User text reaches the template with its special tokens defused (see
        // `TextTokenizer::escape_content`); only the template's own text places control tokens.
        for part in conv.messages.iter_mut().flat_map(|m| m.parts.iter_mut()) {
            if let TemplatePart::Text(t) = part {
                if let Cow::Owned(escaped) = tokenizer.escape_content(t) {
                    *t = escaped;
                }
            }
        }
        // Function definitions and earlier calls are user text too.
        let escape = |s: &str| match tokenizer.escape_content(s) {
            Cow::Owned(escaped) => Some(escaped),
            Cow::Borrowed(_) => None,
        };
        for v in conv
            .messages
            .iter_mut()
            .flat_map(|m| m.tool_calls.iter_mut())
            .chain(tools.iter_mut())
        {
            map_strings(v, &escape);
        }
    }
    let escaped = render(state, &conv, &tools, add_generation_prompt, &kwargs)?;
    let ids = tokenizer
        .encode_rendered(&escaped, add_special_tokens)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    check_placeholders(state, &ids, conv.images.len())?;
    Ok(RenderedChat {
        text: unescape(&escaped).into_owned(),
        thinking_auto,
        ids,
        images: conv.images,
    })
}

/// Replaces the `i`-th `<image>` token of `ids` by `images[i].num_tokens` copies.
pub fn expand_images(
    state: &AppState,
    ids: Vec<u32>,
    images: &[r4b_proto::v1::Image],
) -> Result<Vec<u32>, ValidationError> {
    let counts: Vec<u32> = images.iter().map(|i| i.num_tokens).collect();
    match state.image_token_id() {
        Some(image_id) => expand_image_tokens(&ids, image_id, &counts),
        None if counts.is_empty() => Ok(ids),
        None => Err(ValidationError::ImageCount {
            placeholders: 0,
            images: counts.len(),
        }),
    }
}

/// What [`finish_prompt`] needs besides the state.
#[derive(Debug)]
pub struct PromptParts {
    /// Request id.
    pub id: String,
    /// Prompt ids before `<image>` expansion.
    pub ids: Vec<u32>,
    /// Preprocessed images in order.
    pub images: Vec<r4b_proto::v1::Image>,
    /// Validated generation fields.
    pub params: GenerationParams,
    /// Split reasoning from content in the output.
    pub split_reasoning: bool,
    /// Chat in `thinking_mode` auto (for the thinking metrics).
    pub thinking_auto: bool,
}

/// Expands `<image>` tokens, checks the context length and assembles the [`ValidatedRequest`].
pub fn finish_prompt(
    state: &AppState,
    parts: PromptParts,
) -> Result<ValidatedRequest, ValidationError> {
    let prompt_ids = expand_images(state, parts.ids, &parts.images)?;
    if prompt_ids.is_empty() {
        return Err(invalid("prompt".into(), "the prompt is empty"));
    }
    if state.vocab_size() > 0 {
        r4b_model::check_prompt_ids(&prompt_ids, state.vocab_size())
            .map_err(|e| invalid("prompt".into(), &e.to_string()))?;
    }
    let max_new_tokens = max_new_tokens(
        prompt_ids.len(),
        parts.params.max_tokens,
        state.max_model_len(),
    )?;
    let ids = state.files().stop_ids();
    let open = match (ids.think_open, ids.think_close) {
        (Some(o), Some(c)) => think_open_in_prompt(&prompt_ids, o, c),
        _ => false,
    };
    Ok(ValidatedRequest {
        id: parts.id,
        prompt_ids,
        images: parts.images,
        params: parts.params,
        max_new_tokens,
        think_open_in_prompt: open,
        split_reasoning: parts.split_reasoning,
        thinking_auto: parts.thinking_auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: Value) -> Option<Vec<ChatMessage>> {
        Some(serde_json::from_value(v).expect("typed messages"))
    }

    #[test]
    fn parts_and_images_in_order() {
        let conv = conversation(msgs(json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": "http://example.com/b.png"},
            ]},
            {"role": "assistant", "content": null},
        ])))
        .expect("valid");
        assert_eq!(conv.messages.len(), 3);
        assert_eq!(
            conv.messages[1].parts,
            vec![
                TemplatePart::Image,
                TemplatePart::Text("what?".into()),
                TemplatePart::Image
            ]
        );
        assert_eq!(conv.messages[2].parts, vec![]);
        let urls: Vec<&str> = conv.images.iter().map(|i| i.url.as_str()).collect();
        assert_eq!(
            urls,
            vec!["data:image/png;base64,AAAA", "http://example.com/b.png"]
        );
        assert_eq!(conv.images[1].param, "messages[1].content[2].image_url");
    }

    #[test]
    fn bad_messages_name_the_field() {
        let field = |v: Value| conversation(msgs(v)).expect_err("invalid").param();
        assert_eq!(
            conversation(None).expect_err("missing").param().as_deref(),
            Some("messages")
        );
        assert_eq!(field(json!([])).as_deref(), Some("messages"));
        assert_eq!(
            field(json!([{"role": "function", "content": "x"}])).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            field(json!([{"role": "user", "content": 5}])).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            field(json!([{"role": "user", "content": [{"type": "audio"}]}])).as_deref(),
            Some("messages[0].content[0].type")
        );
        assert_eq!(
            field(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}])).as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
    }

    #[test]
    fn thinking_mode_checks() {
        let kw = |v: Value| template_kwargs(Some(serde_json::from_value(v).expect("map")));
        assert_eq!(
            kw(json!({"thinking_mode": "long"})).expect("ok")["thinking_mode"],
            "long"
        );
        assert_eq!(
            kw(json!({"enable_thinking": false})).expect("ok")["thinking_mode"],
            "short"
        );
        assert_eq!(
            kw(json!({"enable_thinking": true, "thinking_mode": "auto"})).expect("ok")
                ["thinking_mode"],
            "auto"
        );
        let e = kw(json!({"thinking_mode": "medium"})).expect_err("bad mode");
        assert_eq!(
            e.param().as_deref(),
            Some("chat_template_kwargs.thinking_mode")
        );
        assert!(template_kwargs(None).expect("ok").is_empty());
    }
}
