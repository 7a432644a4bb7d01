//! The checkpoint's Jinja chat template, rendered with minijinja.
//!
//! The environment mimics transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
//! loop controls, Python string/dict/list methods (minijinja-contrib `pycompat`),
//! `raise_exception(msg)`, and a `tojson` filter that writes JSON the way Python's `json.dumps`
//! does (`", "` and `": "` separators, no HTML escaping, optional `indent`).
//!
//! Message content reaches the template in one of two shapes, chosen from the template source
//! ([`ContentFormat`]): a list of parts (`{"type": "text", "text": ...}` / `{"type": "image"}`)
//! when the template loops over a message's content (R-4B, LLaVA, Qwen-VL), else a plain string
//! with image parts written as `<image>` placeholders and parts joined by newlines.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Map;

/// Name of the template inside the environment.
const NAME: &str = "chat";

/// One part of a message as the template sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplatePart {
    /// Text.
    Text(String),
    /// An image (its pixels travel separately; the template writes a placeholder).
    Image,
}

/// One chat message for the template.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Content parts in order.
    pub parts: Vec<TemplatePart>,
    /// An assistant message's calls, as Qwen3's template reads them: `{id, type, function:
    /// {name, arguments}}` with `arguments` an object (vLLM parses the JSON text likewise).
    pub tool_calls: Vec<serde_json::Value>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
}

/// How the template expects `message.content`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// A list of typed parts.
    Parts,
    /// A string.
    String,
}

/// Template rendering failures (bad template source, or the template raised on the input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

impl From<Error> for TemplateError {
    fn from(e: Error) -> Self {
        let detail = e
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        TemplateError(detail)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    format: ContentFormat,
    uses_tools: bool,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("format", &self.format)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are passed to every render.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(TemplateError::from)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())?;
        let uses_tools = env
            .get_template(NAME)?
            .undeclared_variables(false)
            .contains("tools");
        Ok(ChatTemplate {
            env,
            format: detect_content_format(source),
            uses_tools,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// The content shape this template expects.
    pub fn content_format(&self) -> ContentFormat {
        self.format
    }

    /// Whether the template reads a `tools` variable (renders function definitions).
    pub fn uses_tools(&self) -> bool {
        self.uses_tools
    }

    /// Renders `messages`. `kwargs` (`chat_template_kwargs`, e.g. `thinking_mode`) become template
    /// variables; `messages`, `tools`, `add_generation_prompt`, `bos_token` and `eos_token` are
    /// set by the gateway and cannot be overridden.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
        kwargs: &Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        self.render_with_tools(messages, &[], add_generation_prompt, kwargs)
    }

    /// [`render`](Self::render) with `tools` (OpenAI's `[{type: function, function: {...}}]`);
    /// none = the variable is unset, as transformers leaves it.
    pub fn render_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        kwargs: &Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let mut ctx = kwargs.clone();
        ctx.remove("tools");
        if !tools.is_empty() {
            ctx.insert("tools".into(), tools.to_vec().into());
        }
        let msgs: Vec<serde_json::Value> = messages.iter().map(|m| self.message_json(m)).collect();
        ctx.insert("messages".into(), msgs.into());
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        let tpl = self.env.get_template(NAME)?;
        Ok(tpl.render(Value::from(minijinja::value::Serde(&ctx)))?)
    }

    fn message_json(&self, m: &TemplateMessage) -> serde_json::Value {
        let content: serde_json::Value = match self.format {
            ContentFormat::Parts => m
                .parts
                .iter()
                .map(|p| match p {
                    TemplatePart::Text(t) => serde_json::json!({"type": "text", "text": t}),
                    TemplatePart::Image => serde_json::json!({"type": "image"}),
                })
                .collect::<Vec<_>>()
                .into(),
            ContentFormat::String => m
                .parts
                .iter()
                .map(|p| match p {
                    TemplatePart::Text(t) => t.as_str(),
                    TemplatePart::Image => "<image>",
                })
                .collect::<Vec<_>>()
                .join("\n")
                .into(),
        };
        let mut msg = serde_json::json!({"role": m.role, "content": content});
        if !m.tool_calls.is_empty() {
            msg["tool_calls"] = m.tool_calls.clone().into();
        }
        if let Some(id) = &m.tool_call_id {
            msg["tool_call_id"] = id.clone().into();
        }
        msg
    }
}

/// `Parts` when some `{% for ... in EXPR %}` iterates an expression mentioning `content`.
fn detect_content_format(source: &str) -> ContentFormat {
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let end = after.find("%}").unwrap_or(after.len());
        let tag = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(head) = tag.strip_prefix("for ") {
            if head
                .split_once(" in ")
                .is_some_and(|(_, expr)| expr.contains("content"))
            {
                return ContentFormat::Parts;
            }
        }
        rest = &after[end.min(after.len())..];
    }
    ContentFormat::String
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python `json.dumps` separators: `", "` between items and `": "` after keys (compact form), or
/// `","` + newline with `indent`.
struct PyFormatter {
    indent: Option<Vec<u8>>,
    depth: usize,
    has_value: bool,
}

impl PyFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(unit) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(unit)?;
            }
        }
        Ok(())
    }

    fn begin<W: ?Sized + std::io::Write>(&mut self, w: &mut W, open: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + std::io::Write>(&mut self, w: &mut W, close: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        self.has_value = true;
        w.write_all(close)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.begin(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.end(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// `json.dumps(value, ensure_ascii=False)`: JSON text with Python's `", "` and `": "`
/// separators (vLLM writes tool-call arguments so).
pub fn python_json(value: &serde_json::Value) -> String {
    let fmt = PyFormatter {
        indent: None,
        depth: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serialising a JSON value into memory cannot fail, and the output is UTF-8.
    match value.serialize(&mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let fmt = PyFormatter {
        indent: indent.map(|n| vec![b' '; n]),
        depth: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_msg(role: &str, text: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            parts: vec![TemplatePart::Text(text.into())],
            ..Default::default()
        }
    }

    #[test]
    fn content_format_detection() {
        assert_eq!(
            detect_content_format(crate::embedded::CHAT_TEMPLATE),
            ContentFormat::Parts
        );
        let qwen_like = "{%- for message in messages %}{{ message.content }}{% endfor %}";
        assert_eq!(detect_content_format(qwen_like), ContentFormat::String);
        let vl_like = "{% for m in messages %}{% for c in m['content'] %}{{ c.type }}{% endfor %}{% endfor %}";
        assert_eq!(detect_content_format(vl_like), ContentFormat::Parts);
    }

    #[test]
    fn string_content_templates_get_strings() {
        let src = "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}";
        let tpl = ChatTemplate::new(src, None, None).expect("compile");
        let msg = TemplateMessage {
            role: "user".into(),
            parts: vec![TemplatePart::Image, TemplatePart::Text("what?".into())],
            ..Default::default()
        };
        assert_eq!(
            tpl.render(&[msg], true, &Map::new()).expect("render"),
            "[user|<image>\nwhat?]"
        );
    }

    #[test]
    fn hf_isms_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                   {{ messages[0].content.strip().upper() }}|{{ {'a': [1, 'x<y']} | tojson }}|{{ bos_token }}{{ eos_token }}";
        let tpl = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).expect("compile");
        let out = tpl
            .render(&[text_msg("user", "  hi ")], false, &Map::new())
            .expect("render");
        assert_eq!(out, "HI|{\"a\": [1, \"x<y\"]}|<s></s>");
        let err = tpl
            .render(&[text_msg("system", "x")], false, &Map::new())
            .expect_err("raises");
        assert!(err.0.contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_indent_matches_python() {
        let src = "{{ {'a': 1, 'b': [true, none], 'c': {}} | tojson(indent=2) }}";
        let tpl = ChatTemplate::new(src, None, None).expect("compile");
        let out = tpl.render(&[], false, &Map::new()).expect("render");
        assert_eq!(
            out,
            "{\n  \"a\": 1,\n  \"b\": [\n    true,\n    null\n  ],\n  \"c\": {}\n}"
        );
    }

    #[test]
    fn kwargs_reach_the_template_but_cannot_replace_messages() {
        let src = "{{ thinking_mode }}:{{ messages | length }}:{{ add_generation_prompt }}";
        let tpl = ChatTemplate::new(src, None, None).expect("compile");
        let mut kwargs = Map::new();
        kwargs.insert("thinking_mode".into(), "long".into());
        kwargs.insert("messages".into(), serde_json::json!([1, 2, 3]));
        let out = tpl
            .render(&[text_msg("user", "x")], true, &kwargs)
            .expect("render");
        assert_eq!(out, "long:1:True"); // Jinja2 prints Python booleans
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(ChatTemplate::new("{% for x in %}", None, None).is_err());
    }
}
