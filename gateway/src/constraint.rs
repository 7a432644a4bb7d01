//! Structured output: the grammar a request constrains its output to (`response_format`, vLLM's
//! `guided_*`, a forced tool call), sent to the workers as an llguidance `TopLevelGrammar`. The
//! workers compile it against the checkpoint's tokenizer and mask the vocabulary each step.

use llguidance::api::TopLevelGrammar;
use r4b_proto::v1 as pb;
use serde_json::Value;

use crate::model_files::StopIds;

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON schema (`{}`-like `true` schema = any JSON object/value, as `json_object`).
    JsonSchema(Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark grammar in llguidance's dialect.
    Lark(String),
}

impl Grammar {
    /// The llguidance `TopLevelGrammar` JSON the workers compile.
    pub fn to_llguidance_json(&self) -> String {
        // A struct of strings, vectors and JSON values: serialising it cannot fail.
        serde_json::to_string(&self.to_top_level()).unwrap_or_default()
    }

    /// The llguidance `TopLevelGrammar`.
    pub fn to_top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }

    /// The proto constraint; `thinking`: the output may open a think block first (chat), whose
    /// text is free; the grammar applies after it closes.
    pub fn to_proto(
        &self,
        ids: &StopIds,
        thinking: bool,
        think_open_in_prompt: bool,
    ) -> pb::Constraint {
        let (open, close) = match (thinking, ids.think_open, ids.think_close) {
            (true, Some(o), Some(c)) => (o, c),
            _ => (0, 0),
        };
        pb::Constraint {
            grammar: self.to_llguidance_json(),
            think_open_id: open,
            think_close_id: close,
            think_open_in_prompt: think_open_in_prompt && open != 0,
            stop_token_ids: ids.eos.clone(),
        }
    }
}
