//! Tool calling: the request's `tools`, `tool_choice` and `parallel_tool_calls`
//! ([`ToolRequest`]), the grammar that forces a call ([`ToolRequest::grammar`]) and the parser of
//! the model's `<tool_call>{json}</tool_call>` blocks ([`ToolCallParser`]).
//!
//! The format is Qwen3's (Hermes): each call is a block `<tool_call>\n{"name": ..., "arguments":
//! {...}}\n</tool_call>`, parsed as vLLM's `hermes` parser does. Decisions:
//! - A block whose text is not a JSON object with a string `name` and an `arguments` value stays
//!   in the content, tags included. vLLM's non-streamed parser returns the whole output as
//!   content once any block fails (and its streamed one cannot take back calls it sent); judging
//!   each block alone keeps the two responses equal. `arguments` is written as vLLM writes it,
//!   `json.dumps(arguments, ensure_ascii=False)`.
//! - Whitespace between the text and a block, and between blocks, is dropped, so `content` is
//!   the text outside the calls (null when there is none).
//! - A call is emitted when its block closes (or when the output ends inside a block whose text
//!   parses). Streaming therefore sends each call as two deltas (header, then the whole
//!   arguments) and equals the non-streamed response by construction: both run this parser.
//! - With `parallel_tool_calls: false`, calls after the first are dropped (the forcing grammar
//!   allows only one).
//! - A forced call's arguments follow the function's `parameters`, with objects that list
//!   `properties` closed to other keys (as OpenAI's strict mode requires them to be).

use std::sync::OnceLock;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities};
use llguidance::ParserFactory;
use serde_json::{json, Map, Value};

use crate::constraint::Grammar;
use crate::validate::ValidationError;

/// Opening tag of a call block.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closing tag of a call block.
pub const CALL_CLOSE: &str = "</tool_call>";

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model does not call tools; its output is not parsed.
    None,
    /// The model decides; calls in its output are parsed.
    Auto,
    /// At least one call, forced by a grammar.
    Required,
    /// Exactly one call of this function, forced by a grammar.
    Named(String),
}

/// One function of `tools`.
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    /// `function.name`.
    pub name: String,
    /// `function.parameters` (a JSON schema; `{"type": "object"}` when absent).
    pub parameters: Value,
}

/// The validated tool fields of a chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// `tools` as sent (for the chat template).
    pub tools: Vec<Value>,
    /// The functions, in order.
    pub functions: Vec<Function>,
    /// `tool_choice` (default `auto` with tools, `none` without).
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true).
    pub parallel: bool,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// OpenAI's rule for function names: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn function_of(i: usize, tool: &Value) -> Result<(Function, bool), ValidationError> {
    let at = format!("tools[{i}]");
    let obj = tool
        .as_object()
        .ok_or_else(|| invalid(&at, "must be an object"))?;
    for key in obj.keys() {
        if key != "type" && key != "function" {
            return Err(invalid(format!("{at}.{key}"), "unknown field of a tool"));
        }
    }
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(format!("{at}.type"), "must be \"function\""));
    }
    let f = obj
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(format!("{at}.function"), "must be an object"))?;
    for (key, v) in f {
        let ok = match key.as_str() {
            "name" => true,
            "description" => v.is_string() || v.is_null(),
            "parameters" => v.is_object() || v.is_null(),
            "strict" => v.is_boolean() || v.is_null(),
            _ => return Err(invalid(format!("{at}.function.{key}"), "unknown field")),
        };
        if !ok {
            return Err(invalid(
                format!("{at}.function.{key}"),
                "has the wrong type",
            ));
        }
    }
    let name = match f.get("name") {
        Some(Value::String(n)) if valid_name(n) => n.clone(),
        Some(_) => {
            return Err(invalid(
                format!("{at}.function.name"),
                "must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
            ))
        }
        None => {
            return Err(ValidationError::Missing {
                field: format!("{at}.function.name"),
            })
        }
    };
    let parameters = match f.get("parameters") {
        Some(p @ Value::Object(_)) => p.clone(),
        _ => json!({"type": "object", "properties": {}, "additionalProperties": false}),
    };
    let strict = f.get("strict").and_then(Value::as_bool) == Some(true);
    Ok((Function { name, parameters }, strict))
}

fn choice_of(choice: Option<&Value>) -> Result<Option<ToolChoice>, ValidationError> {
    let bad = || {
        invalid(
            "tool_choice",
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    Ok(Some(match choice {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad());
            }
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            ToolChoice::Named(name.to_string())
        }
        Some(_) => return Err(bad()),
    }))
}

impl ToolRequest {
    /// Validates the tool fields of a chat body. `None` when the request involves no tools.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<&Value>,
    ) -> Result<Option<ToolRequest>, ValidationError> {
        let tools: Vec<Value> = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(invalid("tools", "must be a list of tools")),
        };
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("parallel_tool_calls", "must be a boolean")),
        };
        let mut functions: Vec<Function> = Vec::with_capacity(tools.len());
        let mut strict = None;
        for (i, tool) in tools.iter().enumerate() {
            let (f, is_strict) = function_of(i, tool)?;
            if functions.iter().any(|g| g.name == f.name) {
                return Err(invalid(
                    format!("tools[{i}].function.name"),
                    format!("duplicate function name `{}`", f.name),
                ));
            }
            if is_strict {
                strict.get_or_insert(i);
            }
            functions.push(f);
        }
        let choice = choice_of(choice)?;
        if functions.is_empty() {
            return match choice {
                None | Some(ToolChoice::None) | Some(ToolChoice::Auto) => Ok(None),
                Some(_) => Err(invalid(
                    "tool_choice",
                    "\"required\" or a named function needs `tools`",
                )),
            };
        }
        let choice = choice.unwrap_or(ToolChoice::Auto);
        if let ToolChoice::Named(name) = &choice {
            if !functions.iter().any(|f| &f.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("no function named `{name}` in `tools`"),
                ));
            }
        }
        // Only a forcing grammar makes the arguments follow the schema.
        if let Some(i) = strict {
            if matches!(choice, ToolChoice::Auto | ToolChoice::None) {
                return Err(ValidationError::Unsupported {
                    field: format!("tools[{i}].function.strict"),
                    reason: "strict function calling is only supported with tool_choice \
                             \"required\" or a named function"
                        .into(),
                });
            }
        }
        let request = ToolRequest {
            tools,
            functions,
            choice,
            parallel,
        };
        request.check_forced_schemas()?;
        Ok(Some(request))
    }

    /// Compiles each forced function's call grammar, so that a `parameters` schema llguidance
    /// cannot compile is a 400 naming it here, not a failed sequence in the workers.
    fn check_forced_schemas(&self) -> Result<(), ValidationError> {
        for (i, f) in self.functions.iter().enumerate() {
            let forced = match &self.choice {
                ToolChoice::Required => true,
                ToolChoice::Named(name) => name == &f.name,
                ToolChoice::None | ToolChoice::Auto => false,
            };
            if !forced {
                continue;
            }
            if let Err(e) = compiles(&call_grammar(&[f], false)) {
                let first = e.lines().next().unwrap_or_default().to_string();
                return Err(invalid(
                    format!("tools[{i}].function.parameters"),
                    format!("cannot force a call with this schema: {first}"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the output is parsed for calls.
    pub fn parses(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces the calls (`required`, named), else `None`.
    pub fn grammar(&self) -> Option<Grammar> {
        let allowed: Vec<&Function> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Named(name) => self.functions.iter().filter(|f| &f.name == name).collect(),
        };
        Some(Grammar::Lark(call_grammar(
            &allowed,
            self.parallel && self.choice == ToolChoice::Required,
        )))
    }

    /// A parser of the output, if the output is parsed.
    pub fn parser(&self) -> Option<ToolCallParser> {
        self.parses()
            .then(|| ToolCallParser::new(if self.parallel { usize::MAX } else { 1 }))
    }
}

/// Closes every object schema that lists `properties` but leaves `additionalProperties` open:
/// a forced call passes only the arguments the function declares, as OpenAI's strict function
/// calling does (an open object would let a weak model invent keys until `max_tokens`).
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("properties").is_some_and(Value::is_object)
                && !map.contains_key("additionalProperties")
            {
                map.insert("additionalProperties".into(), false.into());
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(list) => list.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// The JSON schema of one call's object: `{"name": <this name>, "arguments": <parameters>}`,
/// written with Python's `json.dumps` separators and no other whitespace, as Qwen3's template
/// shows calls to the model (free whitespace would let a weak model pad until `max_tokens`).
fn call_schema(f: &Function) -> Value {
    let mut arguments = f.parameters.clone();
    close_objects(&mut arguments);
    let mut props = Map::new();
    props.insert("name".into(), json!({"const": f.name}));
    props.insert("arguments".into(), arguments);
    json!({
        "type": "object",
        "properties": props,
        "required": ["name", "arguments"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
    })
}

/// Lark (llguidance dialect) for one `<tool_call>` block of one of `functions`, or (`many`)
/// one or more blocks separated by a newline: the format Qwen3's template teaches.
fn call_grammar(functions: &[&Function], many: bool) -> String {
    let alternatives: Vec<String> = (0..functions.len()).map(|i| format!("fn_{i}")).collect();
    let mut lark = String::new();
    lark.push_str(if many {
        "start: block (\"\\n\" block)*\n"
    } else {
        "start: block\n"
    });
    lark.push_str("block: \"<tool_call>\\n\" call \"\\n</tool_call>\"\n");
    lark.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (i, f) in functions.iter().enumerate() {
        // A JSON object is valid inline Lark after `%json`.
        lark.push_str(&format!("fn_{i}: %json {}\n", call_schema(f)));
    }
    lark
}

/// Whether llguidance compiles `lark`. Schema errors do not depend on the vocabulary, so a
/// one-byte-per-token vocabulary built once serves every model.
fn compiles(lark: &str) -> Result<(), String> {
    static FACTORY: OnceLock<Option<ParserFactory>> = OnceLock::new();
    let factory = FACTORY.get_or_init(|| {
        let env = ApproximateTokEnv::single_byte_env();
        let mut f = ParserFactory::new(&env, InferenceCapabilities::default(), &[]).ok()?;
        f.quiet();
        Some(f)
    });
    let Some(factory) = factory else {
        return Ok(()); // cannot happen for the built-in vocabulary; the workers still check
    };
    factory
        .create_parser(TopLevelGrammar::from_lark(lark.to_string()))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One call parsed from the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    /// Function name.
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A piece of parsed output, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Content text.
    Text(String),
    /// A call.
    Call(ParsedCall),
}

/// Streaming parser of `<tool_call>` blocks in content text (see the module doc).
#[derive(Clone, Debug)]
pub struct ToolCallParser {
    /// Text not yet decided: a possible start of `<tool_call>`, or a block's body.
    buf: String,
    in_call: bool,
    /// Whitespace after the last text, held until it is known not to precede a call.
    pending_ws: String,
    /// The whitespace before the open block (restored if the block is not a call).
    ws_before_block: String,
    /// Right after a block: leading whitespace is dropped.
    after_call: bool,
    calls: usize,
    max_calls: usize,
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_tag(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

fn parse_call(body: &str) -> Option<ParsedCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    // As vLLM writes them: `json.dumps(arguments, ensure_ascii=False)`.
    let arguments = crate::template::python_json(v.get("arguments")?);
    Some(ParsedCall { name, arguments })
}

impl ToolCallParser {
    /// A parser keeping at most `max_calls` calls.
    pub fn new(max_calls: usize) -> Self {
        ToolCallParser {
            buf: String::new(),
            in_call: false,
            pending_ws: String::new(),
            ws_before_block: String::new(),
            after_call: false,
            calls: 0,
            max_calls,
        }
    }

    /// Whether any call was parsed.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// Parses the next content text.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CALL_CLOSE) else {
                    break;
                };
                let body: String = self.buf.drain(..end + CALL_CLOSE.len()).collect();
                self.in_call = false;
                self.end_block(&body[..end], true, &mut out);
            } else if let Some(start) = self.buf.find(CALL_OPEN) {
                let text: String = self.buf.drain(..start + CALL_OPEN.len()).collect();
                self.text(&text[..start], &mut out);
                // Whitespace before a call is dropped (kept if the block is malformed).
                self.ws_before_block = std::mem::take(&mut self.pending_ws);
                self.in_call = true;
            } else {
                let keep = partial_tag(&self.buf, CALL_OPEN);
                let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.text(&text, &mut out);
                break;
            }
        }
        out
    }

    /// Ends the output: an open block becomes a call if its text parses, else content.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if self.in_call {
            self.in_call = false;
            self.end_block(&rest, false, &mut out);
        } else {
            self.text(&rest, &mut out);
        }
        let ws = std::mem::take(&mut self.pending_ws);
        if !ws.is_empty() {
            out.push(Piece::Text(ws));
        }
        out
    }

    fn end_block(&mut self, body: &str, closed: bool, out: &mut Vec<Piece>) {
        let ws_before = std::mem::take(&mut self.ws_before_block);
        match parse_call(body) {
            Some(call) => {
                if self.calls < self.max_calls {
                    out.push(Piece::Call(call));
                }
                self.calls += 1;
                self.after_call = true;
            }
            None => {
                let close = if closed { CALL_CLOSE } else { "" };
                let raw = format!("{CALL_OPEN}{body}{close}");
                self.pending_ws = ws_before;
                self.text(&raw, out);
            }
        }
    }

    /// Emits content text, holding its trailing whitespace back.
    fn text(&mut self, text: &str, out: &mut Vec<Piece>) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if text.is_empty() {
            return;
        }
        self.after_call = false;
        let body = text.trim_end();
        if body.is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let mut emit = std::mem::take(&mut self.pending_ws);
        emit.push_str(body);
        self.pending_ws.push_str(&text[body.len()..]);
        out.push(Piece::Text(emit));
    }
}

/// The whole output split into content (`None` when empty) and calls.
pub fn parse_all(parser: &mut ToolCallParser, text: &str) -> (Option<String>, Vec<ParsedCall>) {
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    ((!content.is_empty()).then_some(content), calls)
}

#[cfg(test)]
mod tests;
