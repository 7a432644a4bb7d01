//! Target `template`: user content → `prompt::render_chat` (content escaping, the chat template,
//! `TextTokenizer::encode_rendered`) → token ids, with properties:
//!
//! * escaping: `unescape(escape_content(t)) == t`, and no special token's text survives in
//!   `escape_content(t)`;
//! * no control tokens from content (default configuration): the special-token ids of the
//!   prompt are exactly those of the same conversation with every text replaced by `a`, i.e.
//!   only the template places them;
//! * the ids decode (special tokens kept) to the rendered text the gateway reports.
//!
//! With `"allow_special": true` the state of `--allow-special-tokens-in-content` renders the
//! input (no-panic and the decode property only).
//!
//! Input: JSON `{"messages": [...], "chat_template_kwargs": {...}, "add_generation_prompt": b,
//! "allow_special": b}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use fastrand::Rng;
use r4b_gateway::api::ChatMessage;
use r4b_gateway::prompt;
use r4b_gateway::tokens::{unescape, TextTokenizer};
use r4b_gateway::ApiError;
use serde_json::{json, Map, Value};

use crate::env::Env;
use crate::mutate;
use crate::Target;

/// The `template` target.
pub struct TemplateTarget {
    env: Arc<Env>,
    specials: Vec<String>,
}

impl TemplateTarget {
    /// Starts the environment.
    pub fn new() -> anyhow::Result<Self> {
        let env = Env::start()?;
        let specials = env
            .state
            .files()
            .tokenizer()
            .inner()
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        Ok(TemplateTarget { env, specials })
    }
}

fn texts(messages: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for m in messages {
        match m.get("content") {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(Value::String(t)) = p.get("text") {
                        out.push(t.clone());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The same messages with every text replaced by `a`.
fn blanked(messages: &[Value]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            match m.get_mut("content") {
                Some(c @ Value::String(_)) => *c = json!("a"),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t @ Value::String(_)) = p.get_mut("text") {
                            *t = json!("a");
                        }
                    }
                }
                _ => {}
            }
            m
        })
        .collect()
}

fn special_counts(tok: &TextTokenizer, ids: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for &id in ids.iter().filter(|&&id| tok.is_special(id)) {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

fn random_content(rng: &mut Rng) -> Value {
    if rng.u8(..3) > 0 {
        return Value::String(mutate::text(rng, 12));
    }
    let parts: Vec<Value> = (0..rng.usize(0..4))
        .map(|_| {
            if rng.u8(..5) == 0 {
                json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
            } else {
                json!({"type": "text", "text": mutate::text(rng, 10)})
            }
        })
        .collect();
    Value::Array(parts)
}

fn random_case(rng: &mut Rng) -> Value {
    let messages: Vec<Value> = (0..rng.usize(1..=5))
        .map(|_| {
            let role = ["system", "user", "assistant", "developer"][rng.usize(..4)];
            json!({"role": role, "content": random_content(rng)})
        })
        .collect();
    let mut kwargs = Map::new();
    match rng.u8(..6) {
        0 => {}
        1 => {
            kwargs.insert("enable_thinking".into(), json!(rng.bool()));
        }
        _ => {
            let mode = ["auto", "long", "short"][rng.usize(..3)];
            kwargs.insert("thinking_mode".into(), json!(mode));
        }
    }
    json!({
        "messages": messages,
        "chat_template_kwargs": kwargs,
        "add_generation_prompt": rng.u8(..4) != 0,
        "allow_special": rng.u8(..8) == 0,
    })
}

/// Inserts a random piece into one text of `case`.
fn mutate_case(rng: &mut Rng, case: &mut Value) {
    let Some(messages) = case.get_mut("messages").and_then(Value::as_array_mut) else {
        return;
    };
    if messages.is_empty() {
        return;
    }
    let i = rng.usize(..messages.len());
    let Some(content) = messages[i].get_mut("content") else {
        return;
    };
    let piece = mutate::text(rng, 3);
    let edit = |rng: &mut Rng, s: &mut String| {
        let mut chars: Vec<char> = s.chars().collect();
        if rng.u8(..4) == 0 && !chars.is_empty() {
            chars.remove(rng.usize(..chars.len()));
        }
        let at = rng.usize(..=chars.len());
        chars.splice(at..at, piece.chars());
        *s = chars.into_iter().collect();
    };
    match content {
        Value::String(s) => edit(rng, s),
        Value::Array(parts) if !parts.is_empty() => {
            let j = rng.usize(..parts.len());
            match parts[j].get_mut("text") {
                Some(Value::String(s)) => edit(rng, s),
                _ => parts[j] = json!({"type": "text", "text": piece}),
            }
        }
        other => *other = random_content(rng),
    }
}

impl Target for TemplateTarget {
    fn name(&self) -> &'static str {
        "template"
    }

    fn generate(&self, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut case = match mutate::pick(rng, seeds) {
            Some(seed) if rng.u8(..3) > 0 => {
                serde_json::from_slice(seed).unwrap_or_else(|_| random_case(rng))
            }
            _ => random_case(rng),
        };
        for _ in 0..rng.usize(1..=4) {
            mutate_case(rng, &mut case);
        }
        serde_json::to_vec(&case).unwrap_or_default()
    }

    fn run(&self, input: &[u8]) -> Result<bool, String> {
        let Ok(case) = serde_json::from_slice::<Value>(input) else {
            return Ok(false);
        };
        let raw: Vec<Value> = match case.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => return Ok(false),
        };
        let Ok(messages) = serde_json::from_value::<Vec<ChatMessage>>(Value::Array(raw.clone()))
        else {
            return Ok(false);
        };
        let kwargs = case
            .get("chat_template_kwargs")
            .and_then(Value::as_object)
            .cloned();
        let agp = case
            .get("add_generation_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let allow = case
            .get("allow_special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let state = if allow {
            &self.env.state_allow_special
        } else {
            &self.env.state
        };
        let tok = state.files().tokenizer();
        for t in texts(&raw) {
            let escaped = tok.escape_content(&t);
            if unescape(&escaped) != t {
                return Err(format!(
                    "unescape(escape_content({t:?})) = {:?}",
                    unescape(&escaped)
                ));
            }
            if let Some(s) = self.specials.iter().find(|s| escaped.contains(s.as_str())) {
                return Err(format!("escape_content({t:?}) still holds {s:?}"));
            }
        }
        let rendered = match prompt::render_chat(
            state,
            Some(messages),
            vec![],
            kwargs.clone(),
            agp,
            false,
            false,
        ) {
            Ok(r) => r,
            Err(ApiError::Internal(m)) => return Err(format!("internal error: {m}")),
            Err(_) => return Ok(false),
        };
        let decoded = tok
            .decode(&rendered.ids, false)
            .map_err(|e| format!("decode failed: {e}"))?;
        if decoded != rendered.text {
            return Err(format!(
                "ids decode to {decoded:?}, the rendered text is {:?}",
                rendered.text
            ));
        }
        if !allow {
            let blank: Vec<ChatMessage> = serde_json::from_value(Value::Array(blanked(&raw)))
                .map_err(|e| format!("blanked messages: {e}"))?;
            let base = prompt::render_chat(state, Some(blank), vec![], kwargs, agp, false, false)
                .map_err(|e| format!("the blanked conversation fails: {e}"))?;
            let (got, want) = (
                special_counts(tok, &rendered.ids),
                special_counts(tok, &base.ids),
            );
            if got != want {
                return Err(format!(
                    "user content changed the control tokens: {got:?}, the template alone places {want:?}"
                ));
            }
        }
        Ok(true)
    }
}
