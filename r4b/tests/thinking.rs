//! thinking_mode and the thinking budget through the real stack: the rendered prompt for each
//! mode (via `/tokenize`), and `max_thinking_tokens` closing the think block server-side.

mod common;

use common::*;
use serde_json::json;

fn rendered(s: &Server, mode: Option<&str>, in_extra_body: bool) -> String {
    let mut body =
        json!({"model": "r4b", "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
    if let Some(m) = mode {
        let kwargs = json!({"chat_template_kwargs": {"thinking_mode": m}});
        if in_extra_body {
            body["extra_body"] = kwargs;
        } else {
            body["chat_template_kwargs"] = kwargs["chat_template_kwargs"].clone();
        }
    }
    let (st, b) = s.post("/tokenize", &body);
    assert_eq!(st, 200, "{b}");
    b["prompt"].as_str().unwrap().to_string()
}

fn count_tokens(s: &Server, text: &str) -> usize {
    let (st, b) = s.post(
        "/tokenize",
        &json!({"model": "r4b", "prompt": text, "add_special_tokens": false}),
    );
    assert_eq!(st, 200, "{b}");
    b["count"].as_u64().unwrap() as usize
}

#[test]
fn each_thinking_mode_renders_its_suffix() {
    let s = Server::start(&[]);
    for extra in [false, true] {
        assert!(rendered(&s, Some("short"), extra)
            .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(rendered(&s, Some("long"), extra).ends_with("<|im_start|>assistant\n<think>\n"));
        assert!(rendered(&s, Some("auto"), extra).ends_with("<|im_start|>assistant\n"));
    }
    // auto is the default and appends nothing after the generation prompt.
    assert_eq!(rendered(&s, None, false), rendered(&s, Some("auto"), false));
    // An unknown mode is a 400 naming the field.
    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "r4b", "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": {"thinking_mode": "medium"}}),
    );
    assert_eq!(st, 400, "{b}");
    assert!(b.to_string().contains("thinking_mode"), "{b}");
}

#[test]
fn the_thinking_budget_closes_the_block_and_the_answer_follows() {
    let s = Server::start(&[]);
    for budget_field in ["max_thinking_tokens", "thinking_token_budget"] {
        let mut body = json!({
            "model": "r4b",
            "messages": [{"role": "user", "content": "Solve 12 * 13 step by step."}],
            "max_tokens": 40, "min_tokens": 30, "temperature": 0,
            "extra_body": {"chat_template_kwargs": {"thinking_mode": "long"}}
        });
        body[budget_field] = json!(5);
        let (st, b) = s.post("/v1/chat/completions", &body);
        assert_eq!(st, 200, "{b}");
        let m = &b["choices"][0]["message"];
        let reasoning = m["reasoning_content"].as_str().unwrap_or("");
        let content = m["content"].as_str().unwrap_or("");
        assert!(
            count_tokens(&s, reasoning) <= 5,
            "{budget_field}: reasoning {reasoning:?} is over 5 tokens"
        );
        assert!(!content.is_empty(), "{budget_field}: empty content: {b}");
        for tag in ["<think>", "</think>"] {
            assert!(
                !content.contains(tag) && !reasoning.contains(tag),
                "{budget_field}: stray {tag}: {b}"
            );
        }
    }
}
