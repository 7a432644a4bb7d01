//! The structured-output fields of a request → one [`Grammar`], compiled once here against the
//! served tokenizer so a bad schema, regex or grammar is a 400 naming its field (llguidance's
//! message), never a failure in the workers.
//!
//! Fields (at most one of them may ask for a constraint):
//! - `response_format`: `text` (none), `json_object` (any JSON object), `json_schema`
//!   (`json_schema.schema`; `strict` is accepted either way: the output always follows it).
//! - vLLM's `guided_json` (a schema, or its JSON text), `guided_regex`, `guided_choice` (a list
//!   of strings), `guided_grammar` (a Lark grammar in llguidance's dialect), and the newer
//!   `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`, and
//!   `disable_any_whitespace`: compact JSON).
//! - JSON is whitespace-flexible between tokens, as in vLLM; a schema may say otherwise with
//!   llguidance's `"x-guidance": {"whitespace_flexible": false}`.
//! - `guided_decoding_backend`: only values meaning llguidance (`guidance`, `llguidance`,
//!   `auto`), else a 400.

use r4b_model::grammar::GrammarCompiler;
use serde_json::{json, Value};

use crate::constraint::Grammar;
use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::ValidationError;

/// Fields this module reads (honoured on both endpoints).
pub const FIELDS: &[&str] = &[
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "guided_decoding_backend",
];

/// Backends that mean this server's llguidance.
const BACKENDS: &[&str] = &["auto", "guidance", "llguidance"];

fn invalid(field: &str, reason: impl ToString) -> ValidationError {
    ValidationError::Invalid {
        field: field.into(),
        reason: reason.to_string(),
    }
}

/// A schema given as an object/bool, or as its JSON text (vLLM accepts both).
fn schema(field: &str, v: &Value) -> Result<Value, ValidationError> {
    match v {
        Value::String(s) => {
            serde_json::from_str(s).map_err(|e| invalid(field, format!("not a JSON schema: {e}")))
        }
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(invalid(field, "must be a JSON schema (an object)")),
    }
}

fn string(field: &str, v: &Value) -> Result<String, ValidationError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(field, "must be a string"))
}

/// `guided_choice`: the output is exactly one of the strings.
fn choice(field: &str, v: &Value) -> Result<Grammar, ValidationError> {
    let items = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid(field, "must be a non-empty list of strings"))?;
    let alts = items
        .iter()
        .map(|c| {
            c.as_str()
                .map(regex_syntax::escape)
                .ok_or_else(|| invalid(field, "must be a non-empty list of strings"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Grammar::Regex(format!("({})", alts.join("|"))))
}

/// `response_format`.
fn response_format(v: &Value) -> Result<Option<Grammar>, ValidationError> {
    const F: &str = "response_format";
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(F, "needs a `type`: text, json_object or json_schema"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::JsonSchema(json!({"type": "object"})))),
        "json_schema" => {
            let js = v
                .get("json_schema")
                .filter(|j| j.is_object())
                .ok_or_else(|| invalid(F, "`json_schema` (an object) is required"))?;
            match js.get("schema") {
                None | Some(Value::Null) => {
                    Ok(Some(Grammar::JsonSchema(json!({"type": "object"}))))
                }
                Some(s) => Ok(Some(Grammar::JsonSchema(schema(F, s)?))),
            }
        }
        other => Err(ValidationError::Unsupported {
            field: F.into(),
            reason: format!("type `{other}` is not supported (text, json_object or json_schema)"),
        }),
    }
}

/// vLLM's `structured_outputs` object.
fn structured_outputs(v: &Value) -> Result<Option<Grammar>, ValidationError> {
    const F: &str = "structured_outputs";
    let Some(obj) = v.as_object() else {
        return Err(invalid(F, "must be an object"));
    };
    let mut found = None;
    let compact = obj.get("disable_any_whitespace") == Some(&Value::Bool(true));
    for (k, x) in obj {
        if x.is_null() || x == &Value::Bool(false) || k == "disable_any_whitespace" {
            continue;
        }
        let g = match k.as_str() {
            "json" => Grammar::JsonSchema(schema(F, x)?),
            "regex" => Grammar::Regex(string(F, x)?),
            "choice" => choice(F, x)?,
            "grammar" => Grammar::Lark(string(F, x)?),
            "json_object" if x == &Value::Bool(true) => {
                Grammar::JsonSchema(json!({"type": "object"}))
            }
            "disable_additional_properties"
            | "whitespace_pattern"
            | "structural_tag"
            | "disable_fallback"
            | "json_object"
            | "_backend" => {
                return Err(ValidationError::Unsupported {
                    field: format!("{F}.{k}"),
                    reason: "is not supported by this server".into(),
                })
            }
            _ => {
                return Err(ValidationError::Unknown {
                    field: format!("{F}.{k}"),
                })
            }
        };
        if found.replace(g).is_some() {
            return Err(invalid(F, "asks for more than one constraint"));
        }
    }
    Ok(match found {
        // No whitespace between JSON tokens (llguidance's `whitespace_flexible: false`).
        Some(Grammar::JsonSchema(schema)) if compact => {
            let mut schema = match schema {
                Value::Bool(true) => json!({}),
                other => other,
            };
            if let Some(o) = schema.as_object_mut() {
                o.insert("x-guidance".into(), json!({"whitespace_flexible": false}));
            }
            Some(Grammar::JsonSchema(schema))
        }
        other => other,
    })
}

/// The grammar the body asks for (None = free output), not yet compiled.
pub fn parse(body: &Value) -> Result<Option<(&'static str, Grammar)>, ValidationError> {
    let Some(obj) = body.as_object() else {
        return Ok(None);
    };
    if let Some(b) = obj.get("guided_decoding_backend").filter(|b| !b.is_null()) {
        let name = b.as_str().unwrap_or_default();
        if !BACKENDS.contains(&name) {
            return Err(ValidationError::Unsupported {
                field: "guided_decoding_backend".into(),
                reason: format!(
                    "this server's structured output is llguidance; use one of {BACKENDS:?}"
                ),
            });
        }
    }
    let mut found: Option<(&'static str, Grammar)> = None;
    for &field in &FIELDS[..FIELDS.len() - 1] {
        let Some(v) = obj.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let g = match field {
            "response_format" => response_format(v)?,
            "guided_json" => Some(Grammar::JsonSchema(schema(field, v)?)),
            "guided_regex" => Some(Grammar::Regex(string(field, v)?)),
            "guided_choice" => Some(choice(field, v)?),
            "guided_grammar" => Some(Grammar::Lark(string(field, v)?)),
            _ => structured_outputs(v)?,
        };
        if let Some(g) = g {
            if let Some((first, _)) = &found {
                return Err(invalid(
                    field,
                    format!(
                        "only one structured-output constraint per request (`{first}` is set too)"
                    ),
                ));
            }
            found = Some((field, g));
        }
    }
    Ok(found)
}

/// Parses the body's constraint and compiles it with llguidance against the served tokenizer.
pub fn grammar(
    body: &Value,
    compiler: Result<&GrammarCompiler, &str>,
) -> Result<Option<Grammar>, ValidationError> {
    let Some((field, g)) = parse(body)? else {
        return Ok(None);
    };
    let compiler = compiler.map_err(|e| ValidationError::Unsupported {
        field: field.into(),
        reason: format!("structured output is unavailable for this model's tokenizer: {e}"),
    })?;
    compiler
        .check(&g.to_top_level())
        .map_err(|e| invalid(field, e.to_string().lines().next().unwrap_or_default()))?;
    Ok(Some(g))
}

/// [`grammar`] for a handler: parsing stays on the runtime; compiling (milliseconds for a
/// large schema over a 150k-token vocabulary) runs on the blocking pool.
pub async fn from_request(state: &AppState, body: &Value) -> Result<Option<Grammar>, ApiError> {
    if parse(body)?.is_none() {
        return Ok(None);
    }
    let body = body.clone();
    crate::prompt::off_runtime(state, move |state| {
        grammar(&body, state.files().grammars()).map_err(ApiError::from)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiler() -> GrammarCompiler {
        let dir = tempfile::tempdir().expect("tmp");
        crate::embedded::write_tokenizer_files(dir.path()).expect("files");
        let text = std::fs::read_to_string(dir.path().join("tokenizer.json")).expect("read");
        GrammarCompiler::from_tokenizer_json(&text).expect("compiler")
    }

    fn field_of(e: ValidationError) -> String {
        e.param().unwrap_or_default()
    }

    #[test]
    fn each_field_gives_its_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(Grammar::JsonSchema(json!({"type": "object"}))),
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "strict": true, "schema": schema}}}),
                Some(Grammar::JsonSchema(schema.clone())),
            ),
            (
                json!({"guided_json": schema.to_string()}),
                Some(Grammar::JsonSchema(schema.clone())),
            ),
            (
                json!({"guided_regex": "[a-z]+"}),
                Some(Grammar::Regex("[a-z]+".into())),
            ),
            (
                json!({"guided_choice": ["a.b", "c"]}),
                Some(Grammar::Regex(r"(a\.b|c)".into())),
            ),
            (
                json!({"guided_grammar": "start: \"x\""}),
                Some(Grammar::Lark("start: \"x\"".into())),
            ),
            (
                json!({"structured_outputs": {"regex": "x+"}, "guided_decoding_backend": "auto"}),
                Some(Grammar::Regex("x+".into())),
            ),
        ];
        let c = compiler();
        for (body, want) in cases {
            assert_eq!(
                grammar(&body, Ok(&c)).expect("valid").as_ref(),
                want.as_ref(),
                "{body}"
            );
        }
    }

    #[test]
    fn bad_constraints_name_their_field() {
        let c = compiler();
        let cases = [
            (json!({"guided_regex": "a("}), "guided_regex"),
            (json!({"guided_json": {"type": "nonsense"}}), "guided_json"),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}),
                "response_format",
            ),
            (json!({"guided_grammar": "start: ("}), "guided_grammar"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": [1]}), "guided_choice"),
            (
                json!({"guided_regex": "a", "guided_choice": ["b"]}),
                "guided_choice",
            ),
            (
                json!({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}),
                "guided_decoding_backend",
            ),
            (
                json!({"response_format": {"type": "grammar"}}),
                "response_format",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structured_outputs.structural_tag",
            ),
        ];
        for (body, field) in cases {
            let e = grammar(&body, Ok(&c)).expect_err(&body.to_string());
            assert_eq!(field_of(e), field, "{body}");
        }
    }
}
