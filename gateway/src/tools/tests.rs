//! Tool-call parsing on hand-written model outputs, the request checks, and the forcing grammars
//! checked by llguidance against the embedded tokenizer.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::*;
use crate::embedded;

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

fn whole(text: &str) -> (Option<String>, Vec<ParsedCall>) {
    parse_all(&mut ToolCallParser::new(usize::MAX), text)
}

/// Feeds `pieces` one push each, then finishes; joins the output like a client assembling
/// stream deltas.
fn streamed(pieces: &[&str]) -> (Option<String>, Vec<ParsedCall>) {
    let mut p = ToolCallParser::new(usize::MAX);
    let mut out: Vec<Piece> = pieces.iter().flat_map(|t| p.push(t)).collect();
    out.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in out {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    ((!content.is_empty()).then_some(content), calls)
}

const WEATHER: &str =
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";

#[test]
fn one_well_formed_call() {
    assert_eq!(
        whole(WEATHER),
        (None, vec![call("get_weather", r#"{"city": "Paris"}"#)])
    );
}

#[test]
fn two_calls_with_text_around() {
    let text = format!(
        "Let me check.\n{WEATHER}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>\n\nDone ✓"
    );
    assert_eq!(
        whole(&text),
        (
            Some("Let me check.Done ✓".into()),
            vec![
                call("get_weather", r#"{"city": "Paris"}"#),
                call("get_time", "{}")
            ]
        )
    );
}

#[test]
fn text_without_calls_is_unchanged() {
    for text in [
        "",
        "  hi \n",
        "a < b <tool",
        "<tool_response>x",
        "<tool_cal",
    ] {
        let want = (!text.is_empty()).then(|| text.to_string());
        assert_eq!(whole(text), (want, vec![]), "{text:?}");
    }
}

#[test]
fn malformed_blocks_stay_content() {
    for block in [
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\n</tool_call>",
        "<tool_call>{\"arguments\": {}}</tool_call>",
        "<tool_call>{\"name\": 3, \"arguments\": {}}</tool_call>",
        "<tool_call>{\"name\": \"f\"}</tool_call>",
        "<tool_call>[1, 2]</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"argu",
    ] {
        let text = format!("x {block}");
        assert_eq!(whole(&text), (Some(text.clone()), vec![]), "{block}");
    }
    // A good call next to a malformed one is still a call.
    let text = format!("<tool_call>oops</tool_call>{WEATHER}");
    assert_eq!(
        whole(&text),
        (
            Some("<tool_call>oops</tool_call>".into()),
            vec![call("get_weather", r#"{"city": "Paris"}"#)]
        )
    );
}

#[test]
fn unclosed_block_that_parses_is_a_call() {
    let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}\n";
    assert_eq!(whole(text), (None, vec![call("f", r#"{"a": [1, 2]}"#)]));
}

#[test]
fn one_call_when_not_parallel() {
    let text = format!("{WEATHER}\n{WEATHER}");
    let got = parse_all(&mut ToolCallParser::new(1), &text);
    assert_eq!(
        got,
        (None, vec![call("get_weather", r#"{"city": "Paris"}"#)])
    );
}

#[test]
fn split_at_every_byte_equals_whole() {
    let texts = [
        format!("Sure — I'll look.\n{WEATHER}\n<tool_call>\n{{\"name\": \"t\", \"arguments\": {{\"q\": \"é</tool\"}}}}\n</tool_call> bye  "),
        format!("<tool_call>bad</tool_call> {WEATHER}<tool_"),
        "  just text <tool_c and more\n".to_string(),
    ];
    for text in &texts {
        let want = whole(text);
        // Two pieces split at every character boundary.
        for (i, _) in text.char_indices() {
            assert_eq!(streamed(&[&text[..i], &text[i..]]), want, "split at {i}");
        }
        // One character per push.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(streamed(&refs), want, "char by char: {text:?}");
    }
    assert_eq!(
        whole(&texts[0]).1,
        vec![
            call("get_weather", r#"{"city": "Paris"}"#),
            call("t", r#"{"q": "é</tool"}"#)
        ]
    );
    assert_eq!(
        whole(&texts[0]).0.as_deref(),
        Some("Sure — I'll look.bye  ")
    );
}

fn tools_json() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]}
                },
                "required": ["city"],
                "additionalProperties": false
            }
        }},
        {"type": "function", "function": {"name": "get_time"}}
    ])
}

fn request(choice: Value, parallel: Option<bool>) -> Result<Option<ToolRequest>, ValidationError> {
    let parallel = parallel.map(Value::from);
    ToolRequest::parse(Some(&tools_json()), Some(&choice), parallel.as_ref())
}

fn field(r: Result<Option<ToolRequest>, ValidationError>) -> Option<String> {
    r.err().and_then(|e| e.param())
}

#[test]
fn request_checks_name_the_field() {
    let ok = request(json!("auto"), None).expect("valid").expect("tools");
    assert_eq!(ok.choice, ToolChoice::Auto);
    assert!(ok.parallel && ok.parses() && ok.grammar().is_none());
    let none = request(Value::Null, None).expect("valid").expect("tools");
    assert_eq!(
        none.choice,
        ToolChoice::Auto,
        "auto is the default with tools"
    );
    let named = request(
        json!({"type": "function", "function": {"name": "get_time"}}),
        None,
    )
    .expect("valid")
    .expect("tools");
    assert_eq!(named.choice, ToolChoice::Named("get_time".into()));
    assert_eq!(
        field(request(
            json!({"type": "function", "function": {"name": "nope"}}),
            None
        ))
        .as_deref(),
        Some("tool_choice")
    );
    assert_eq!(
        field(request(json!("always"), None)).as_deref(),
        Some("tool_choice")
    );
    assert_eq!(
        field(ToolRequest::parse(None, Some(&json!("required")), None)).as_deref(),
        Some("tool_choice")
    );
    assert_eq!(
        ToolRequest::parse(None, Some(&json!("none")), None).ok(),
        Some(None)
    );
    let bad = |tools: Value| field(ToolRequest::parse(Some(&tools), None, None));
    assert_eq!(bad(json!({"a": 1})).as_deref(), Some("tools"));
    assert_eq!(
        bad(json!([{"type": "retrieval"}])).as_deref(),
        Some("tools[0].type")
    );
    assert_eq!(
        bad(json!([{"type": "function", "function": {"name": "a b"}}])).as_deref(),
        Some("tools[0].function.name")
    );
    assert_eq!(
        bad(json!([{"type": "function", "function": {"name": "a", "parameters": 3}}])).as_deref(),
        Some("tools[0].function.parameters")
    );
    assert_eq!(
        bad(json!([{"type": "function", "function": {"name": "a", "strict": true}}])).as_deref(),
        Some("tools[0].function.strict")
    );
    assert_eq!(
        bad(json!([{"type": "function", "function": {"name": "a"}},
                   {"type": "function", "function": {"name": "a"}}]))
        .as_deref(),
        Some("tools[1].function.name")
    );
    assert_eq!(
        field(ToolRequest::parse(
            Some(&tools_json()),
            None,
            Some(&json!("yes"))
        ))
        .as_deref(),
        Some("parallel_tool_calls")
    );
}

/// A matcher of `grammar` over the embedded tokenizer's vocabulary, as the workers build one.
fn matcher(grammar: &Grammar) -> Matcher {
    let tok = embedded::build_tokenizer().expect("tokenizer");
    let tok_json: Value = serde_json::from_str(&tok.to_string(false).expect("json")).expect("json");
    let words = llguidance::token_bytes_from_tokenizer_json(&tok_json).expect("token bytes");
    let info = TokRxInfo::new(words.len() as u32, embedded::IM_END_ID);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
    let factory = ParserFactory::new_simple(&env).expect("factory");
    let top: TopLevelGrammar =
        serde_json::from_str(&grammar.to_llguidance_json()).expect("TopLevelGrammar JSON");
    let m = Matcher::new(factory.create_parser(top));
    assert!(
        !m.is_error(),
        "grammar does not compile: {:?}",
        m.get_error()
    );
    m
}

/// Whether the grammar accepts `text` as the whole output (tokenized as the model would write
/// it: the tool tags as their single tokens).
fn accepts(grammar: &Grammar, text: &str) -> bool {
    let tok = crate::tokens::TextTokenizer::new(embedded::build_tokenizer().expect("tokenizer"));
    let ids = tok.encode(text, false).expect("encode");
    let mut m = matcher(grammar);
    m.consume_tokens(&ids).is_ok() && m.is_accepting().unwrap_or(false)
}

#[test]
fn forcing_grammars_accept_calls_and_reject_the_rest() {
    let required = request(json!("required"), None)
        .expect("valid")
        .expect("tools")
        .grammar()
        .expect("grammar");
    let weather = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
    let time = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    assert!(accepts(&required, weather));
    assert!(accepts(&required, time));
    assert!(
        accepts(&required, &format!("{weather}\n{time}")),
        "parallel"
    );
    for bad in [
        "",
        "Sure!",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>", // city required
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"P\", \"unit\": \"k\"}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\":\"get_time\",\"arguments\":{}}\n</tool_call>", // not Qwen3's separators
        &format!("{time} and text"),
    ] {
        assert!(!accepts(&required, bad), "accepted {bad:?}");
    }
    // Named: only that function, once.
    let named = request(
        json!({"type": "function", "function": {"name": "get_time"}}),
        None,
    )
    .expect("valid")
    .expect("tools")
    .grammar()
    .expect("grammar");
    assert!(accepts(&named, time));
    assert!(!accepts(&named, weather));
    assert!(!accepts(&named, &format!("{time}\n{time}")));
    // parallel_tool_calls: false → one call.
    let single = request(json!("required"), Some(false))
        .expect("valid")
        .expect("tools")
        .grammar()
        .expect("grammar");
    assert!(accepts(&single, weather));
    assert!(!accepts(&single, &format!("{weather}\n{time}")));
    // Objects the schema leaves open are closed: no invented arguments.
    let open = json!([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}}}]);
    let f = ToolRequest::parse(Some(&open), Some(&json!("required")), None)
        .expect("valid")
        .expect("tools")
        .grammar()
        .expect("grammar");
    let call = |args: &str| {
        format!("<tool_call>\n{{\"name\": \"f\", \"arguments\": {args}}}\n</tool_call>")
    };
    assert!(accepts(&f, &call(r#"{"a": {"b": 1}}"#)));
    assert!(accepts(&f, &call("{}")));
    assert!(!accepts(&f, &call(r#"{"z": 1}"#)));
    assert!(!accepts(&f, &call(r#"{"a": {"b": 1, "c": 2}}"#)));
    // auto and none force nothing.
    assert!(request(json!("none"), None)
        .expect("valid")
        .expect("tools")
        .grammar()
        .is_none());
}
