//! Tool calling against a fake coordinator: the prompt with tools and an agent loop, calls
//! parsed from the output (whole and streamed, the stream assembled equals the whole response),
//! `finish_reason: tool_calls`, `tool_choice` none/required/named (the grammar sent), and the
//! 400s that name the field.

mod common;

use std::time::Duration;

use common::*;
use r4b_proto::v1 as pb;
use serde_json::{json, Value};

const TOOL_CALL: u32 = 263;
const TOOL_CALL_END: u32 = 264;

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }}])
}

/// The model's answer: text, then two calls (tags as their single tokens), then EOS.
fn answer_ids() -> Vec<u32> {
    let mut t = ids("I'll check.\n");
    for city in ["Paris", "Oslo"] {
        t.push(TOOL_CALL);
        t.extend(ids(&format!(
            "\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n"
        )));
        t.push(TOOL_CALL_END);
        t.extend(ids("\n"));
    }
    t.push(EOS);
    t
}

/// A gateway whose context fits the tools' system turn (the byte tokenizer makes it ~550 tokens).
async fn gateway(
    script: impl Fn(&pb::GenerateRequest) -> Script + Send + Sync + 'static,
) -> TestGateway {
    let opts = Options {
        max_model_len: 2048,
        ..Options::default()
    };
    gateway_with(script, opts).await
}

fn tools_body(stream: bool) -> Value {
    json!({"model": "r4b", "messages": [{"role": "user", "content": "Weather?"}],
        "tools": weather_tools(), "stream": stream})
}

#[tokio::test]
async fn calls_are_parsed_whole_and_streamed_alike() {
    let gw =
        gateway(|req| reply_ids(req, &answer_ids(), pb::FinishReason::Stop, Duration::ZERO)).await;
    let r = gw.post("/v1/chat/completions", tools_body(false)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "I'll check.");
    let calls = choice["message"]["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 2);
    for (call, city) in calls.iter().zip(["Paris", "Oslo"]) {
        assert!(call["id"].as_str().expect("id").starts_with("call_"));
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("text"))
                .expect("arguments are JSON");
        assert_eq!(args, json!({"city": city}));
    }
    // No grammar with tool_choice auto.
    assert!(gw.seen()[0].constraint.is_none());

    let r = gw.post("/v1/chat/completions", tools_body(true)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events = r.sse_data();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let mut content = String::new();
    let mut streamed: Vec<Value> = Vec::new();
    let mut finish = Value::Null;
    for c in &chunks {
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            content.push_str(t);
        }
        for d in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().expect("index") as usize;
            if i == streamed.len() {
                // The first fragment of a call: id, type, name and empty arguments.
                assert!(d["id"].as_str().expect("id").starts_with("call_"), "{d}");
                assert_eq!(d["type"], "function");
                assert_eq!(d["function"]["arguments"], "");
                streamed.push(json!({"name": d["function"]["name"], "arguments": ""}));
            } else {
                assert!(
                    d.get("id").is_none() && d["function"].get("name").is_none(),
                    "{d}"
                );
                let args = streamed[i]["arguments"].as_str().expect("text").to_string()
                    + d["function"]["arguments"].as_str().expect("fragment");
                streamed[i]["arguments"] = args.into();
            }
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!(content, "I'll check.");
    assert_eq!(finish, "tool_calls");
    let whole: Vec<Value> = calls
        .iter()
        .map(|c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
        .collect();
    assert_eq!(streamed, whole);
}

#[tokio::test]
async fn malformed_calls_stay_content_and_length_is_not_tool_calls() {
    let text = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {</tool_call>";
    let gw = gateway(move |req| reply_text(req, text)).await;
    let v = gw
        .post("/v1/chat/completions", tools_body(false))
        .await
        .json();
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let gw = gateway(|req| {
        let t = answer_ids();
        reply_ids(
            req,
            &t[..t.len() - 3],
            pb::FinishReason::Length,
            Duration::ZERO,
        )
    })
    .await;
    let v = gw
        .post("/v1/chat/completions", tools_body(false))
        .await
        .json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

#[tokio::test]
async fn tool_choice_none_leaves_the_text_alone() {
    let gw =
        gateway(|req| reply_ids(req, &answer_ids(), pb::FinishReason::Stop, Duration::ZERO)).await;
    let mut body = tools_body(false);
    body["tool_choice"] = json!("none");
    let v = gw.post("/v1/chat/completions", body).await.json();
    let message = &v["choices"][0]["message"];
    assert!(message.get("tool_calls").is_none());
    assert!(message["content"]
        .as_str()
        .expect("content")
        .contains("<tool_call>\n{\"name\": \"get_weather\""));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn required_and_named_send_a_grammar_after_the_think_block() {
    let gw = gateway(|req| reply_text(req, "x")).await;
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let mut body = tools_body(false);
        body["tool_choice"] = choice.clone();
        body["chat_template_kwargs"] = json!({"thinking_mode": "long"});
        let r = gw.post("/v1/chat/completions", body).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for req in gw.seen() {
        let c = req.constraint.expect("a constraint");
        assert_eq!((c.think_open_id, c.think_close_id), (THINK, UNTHINK));
        assert!(
            c.think_open_in_prompt,
            "long mode opens the think block in the prompt"
        );
        let g: Value = serde_json::from_str(&c.grammar).expect("grammar JSON");
        let lark = g["grammars"][0]["lark_grammar"].as_str().expect("lark");
        assert!(
            lark.contains("<tool_call>") && lark.contains("\"const\":\"get_weather\""),
            "{lark}"
        );
    }
}

#[tokio::test]
async fn bad_tool_fields_are_400s_naming_them() {
    let gw = gateway(|req| reply_text(req, "x")).await;
    let cases = [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tool_choice": "required", "tools": []}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"function_call": "auto"}), "function_call"),
        (json!({"parallel_tool_calls": 1}), "parallel_tool_calls"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ];
    for (extra, field) in cases {
        let mut body = tools_body(false);
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = gw.post("/v1/chat/completions", body).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.text);
        assert_eq!(r.json()["error"]["param"], field, "{extra}: {}", r.text);
    }
    assert!(gw.seen().is_empty());
}

#[tokio::test]
async fn a_template_without_tools_refuses_them() {
    let opts = Options {
        chat_template: Some(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
                .into(),
        ),
        ..Options::default()
    };
    let gw = gateway_with(|req| reply_text(req, "x"), opts).await;
    let r = gw.post("/v1/chat/completions", tools_body(false)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"]["param"], "tools");
    // Without tools the same template serves.
    let r = gw.post("/v1/chat/completions", chat_body("hi")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// An agent loop's second turn: the prompt is the template's, written out by hand.
#[tokio::test]
async fn agent_loop_second_turn_renders_calls_and_results() {
    let gw = gateway(|req| reply_text(req, "18C in Paris.")).await;
    let body = json!({"model": "r4b", "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "18C in Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let want = concat!(
        "<|im_start|>system \n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "#,
        r#""parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#,
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>",
        "<|im_start|>user \nWeather?<|im_end|>",
        "<|im_start|>assistant \n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
        "<|im_start|>user \n<tool_response>\n18C\n</tool_response><|im_end|>",
        "<|im_start|>assistant\n",
    );
    assert_eq!(gw.seen()[0].prompt_ids, hand_ids(want));
}

/// Token ids by hand: the embedded tokenizer's added tokens by their fixed ids, every other
/// byte as itself.
fn hand_ids(text: &str) -> Vec<u32> {
    const ADDED: [(&str, u32); 6] = [
        ("<|im_start|>", 257),
        ("<|im_end|>", 258),
        ("<tool_call>", 263),
        ("</tool_call>", 264),
        ("<tool_response>", 265),
        ("</tool_response>", 266),
    ];
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some((tag, id)) = ADDED.iter().find(|(tag, _)| rest.starts_with(tag)) {
            out.push(*id);
            rest = &rest[tag.len()..];
        } else {
            out.push(u32::from(rest.as_bytes()[0]));
            rest = &rest[1..];
        }
    }
    out
}
