//! `/v1/chat/completions` against a fake coordinator: prompts sent, responses, SSE framing,
//! reasoning split, forced (budget) tokens, stop strings, logprobs, n > 1, cancellation.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use futures::StreamExt;
use r4b_proto::v1 as pb;
use serde_json::{json, Value};
use tower::ServiceExt;

#[tokio::test]
async fn non_streamed_chat_sends_the_rendered_prompt() {
    let gw = gateway(|req| reply_text(req, "Hello")).await;
    let r = gw.post("/v1/chat/completions", chat_body("Hi")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "r4b");
    assert!(v["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["choices"][0]["message"]["reasoning_content"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    // Prompt: 21 tokens by hand; completion: 5 letters + EOS, no reasoning.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27, "prompt_tokens_details": {"cached_tokens": 3},
               "completion_tokens_details": {"reasoning_tokens": 0}})
    );

    let seen = gw.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.prompt_ids, user_prompt_ids("Hi"));
    assert_eq!(req.prompt_ids.len(), 21);
    let stopping = req.stopping.clone().expect("stopping");
    assert_eq!(stopping.stop_token_ids, vec![258, 256]);
    assert_eq!(stopping.max_new_tokens, MAX_MODEL_LEN - 21);
    assert_eq!(
        (stopping.think_open_id, stopping.think_close_id),
        (THINK, UNTHINK)
    );
    assert_eq!(stopping.think_close_ids, vec![10, UNTHINK, 10, 10]);
    assert!(!stopping.think_open_in_prompt);
    assert_eq!(stopping.max_thinking_tokens, None);
    let sampling = req.sampling.expect("sampling");
    assert_eq!(
        (sampling.temperature, sampling.top_p, sampling.top_k),
        (1.0, 1.0, 0)
    );
}

#[tokio::test]
async fn streamed_chat_with_usage_is_framed_like_openai() {
    let gw = gateway(|req| reply_text(req, "Hey")).await;
    let mut body = chat_body("Hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let events = r.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id per stream");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hey");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 21);
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["usage"]["total_tokens"], 25);
    for c in &chunks[..chunks.len() - 2] {
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        assert!(c.get("usage").is_none());
    }
}

#[tokio::test]
async fn long_mode_from_extra_body_splits_reasoning() {
    let gw = gateway(|req| {
        let mut t = ids("Two plus two.\n");
        t.push(UNTHINK);
        t.extend(ids("\n\nIt is 4."));
        t.push(EOS);
        reply_ids(req, &t, pb::FinishReason::Stop, Duration::ZERO)
    })
    .await;
    let mut body = chat_body("2+2?");
    body["extra_body"] = json!({"chat_template_kwargs": {"thinking_mode": "long"}});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "Two plus two.\n"
    );
    assert_eq!(v["choices"][0]["message"]["content"], "It is 4.");
    let req = &gw.seen()[0];
    let mut expected = user_prompt_ids("2+2?");
    expected.extend([THINK, 10]);
    assert_eq!(req.prompt_ids, expected, "long mode appends <think>\\n");
    assert!(req.stopping.clone().expect("stopping").think_open_in_prompt);
}

#[tokio::test]
async fn model_opened_think_block_splits_in_the_stream() {
    let gw = gateway(|req| {
        let mut t = vec![THINK];
        t.extend(ids("\nhmm\n"));
        t.push(UNTHINK);
        t.extend(ids("\n\nok"));
        t.push(EOS);
        reply_ids(req, &t, pb::FinishReason::Stop, Duration::ZERO)
    })
    .await;
    let mut body = chat_body("?");
    body["stream"] = json!(true);
    body["chat_template_kwargs"] = json!({"thinking_mode": "auto"});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events = r.sse_data();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(reasoning, "hmm\n");
    assert_eq!(content, "ok");
    assert!(
        !r.text.contains("think>"),
        "no think tags anywhere: {}",
        r.text
    );
    assert!(
        !gw.seen()[0]
            .stopping
            .clone()
            .expect("stopping")
            .think_open_in_prompt
    );
}

#[tokio::test]
async fn short_mode_prompt_and_thinking_budget() {
    let gw = gateway(|req| reply_text(req, "Fast.")).await;
    let body = json!({
        "model": "r4b", "messages": [{"role": "user", "content": "q"}],
        "chat_template_kwargs": {"thinking_mode": "short"}, "max_thinking_tokens": 7,
    });
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Fast.");
    let req = &gw.seen()[0];
    let mut expected = user_prompt_ids("q");
    expected.push(THINK);
    expected.extend(ids("\n\n"));
    expected.push(UNTHINK);
    expected.extend(ids("\n\n"));
    assert_eq!(req.prompt_ids, expected);
    let s = req.stopping.clone().expect("stopping");
    assert!(!s.think_open_in_prompt);
    assert_eq!(s.max_thinking_tokens, Some(7));
}

#[tokio::test]
async fn forced_budget_close_is_not_text_and_budget_comes_from_extra_body() {
    let gw = gateway(|req| {
        let mut t = ids("abcde");
        t.extend([10, UNTHINK, 10, 10]);
        t.extend(ids("Yes."));
        t.push(EOS);
        match reply_ids(req, &t, pb::FinishReason::Stop, Duration::ZERO) {
            Script::Reply {
                mut messages,
                delay,
                then,
            } => {
                // The coordinator appended "\n</think>\n\n" after the 5-token budget.
                for m in &mut messages[5..9] {
                    m.tokens.iter_mut().for_each(|t| t.forced = true);
                }
                Script::Reply {
                    messages,
                    delay,
                    then,
                }
            }
            other => other,
        }
    })
    .await;
    let mut body = chat_body("q");
    body["logprobs"] = json!(true);
    body["extra_body"] =
        json!({"chat_template_kwargs": {"thinking_mode": "long"}, "max_thinking_tokens": 5});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "abcde");
    assert_eq!(message["content"], "Yes.");
    assert_eq!(v["usage"]["completion_tokens"], 5 + 4 + 4 + 1);
    let tokens: Vec<&str> = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|t| t["token"].as_str().expect("token"))
        .collect();
    assert_eq!(
        tokens,
        vec!["a", "b", "c", "d", "e", "Y", "e", "s", ".", "<|im_end|>"],
        "forced tokens have no logprobs"
    );
    let s = gw.seen()[0].stopping.clone().expect("stopping");
    assert_eq!(s.max_thinking_tokens, Some(5));
    assert!(s.think_open_in_prompt);

    let mut body = chat_body("q");
    body["extra_body"] = json!({"thinking_token_budget": 3});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let s = gw.seen()[1].stopping.clone().expect("stopping");
    assert_eq!(s.max_thinking_tokens, Some(3));
}

#[tokio::test]
async fn stop_string_truncates_and_cancels_the_generation() {
    let gw = gateway(|req| {
        let t = ids("Hello world, and a long tail that should never be generated");
        reply_ids(req, &t, pb::FinishReason::Length, Duration::from_millis(15))
    })
    .await;
    let mut body = chat_body("Hi");
    body["stop"] = json!(["lo w", "zzz"]);
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Hel");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"]["completion_tokens"], 7,
        "tokens up to the end of the stop string"
    );
    assert!(
        gw.wait_cancelled(1).await,
        "the coordinator stream was not dropped"
    );
}

#[tokio::test]
async fn stop_string_in_a_stream() {
    let gw = gateway(|req| reply_text(req, "one. two. three.")).await;
    let mut body = chat_body("count");
    body["stream"] = json!(true);
    body["stop"] = json!(". t");
    let r = gw.post("/v1/chat/completions", body).await;
    let events = r.sse_data();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "one");
    assert_eq!(
        chunks.last().expect("chunk")["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn logprobs_have_the_openai_shape() {
    let gw = gateway(|req| reply_text(req, "Hé")).await;
    let mut body = chat_body("x");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content list")
        .clone();
    assert_eq!(content.len(), 4, "H, the two bytes of é, EOS");
    assert_eq!(
        content[0],
        json!({"token": "H", "logprob": -0.5, "bytes": [72],
               "top_logprobs": [{"token": "H", "logprob": -0.5, "bytes": [72]}, {"token": "?", "logprob": -2.0, "bytes": [63]}]})
    );
    assert_eq!(content[1]["bytes"], json!([0xC3]));
    assert_eq!(content[3]["token"], "<|im_end|>");
    assert_eq!(gw.seen()[0].sampling.expect("sampling").top_logprobs, 2);
}

#[tokio::test]
async fn n_two_makes_two_generations() {
    let gw = gateway(|req| {
        let text = if req.request_id.ends_with("-0") {
            "zero"
        } else {
            "one"
        };
        reply_text(req, text)
    })
    .await;
    let mut body = chat_body("pick");
    body["n"] = json!(2);
    body["seed"] = json!(40);
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["content"], "zero");
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][1]["message"]["content"], "one");
    assert_eq!(v["usage"]["completion_tokens"], 5 + 4);
    let mut seeds: Vec<Option<u64>> = gw
        .seen()
        .iter()
        .map(|r| r.sampling.expect("sampling").seed)
        .collect();
    seeds.sort();
    assert_eq!(
        seeds,
        vec![Some(40), Some(41)],
        "choices get distinct seeds"
    );
}

#[tokio::test]
async fn n_two_streams_both_choices() {
    let gw = gateway(|req| {
        let text = if req.request_id.ends_with("-0") {
            "aa"
        } else {
            "bbb"
        };
        reply_text(req, text)
    })
    .await;
    let mut body = chat_body("pick");
    body["n"] = json!(2);
    body["stream"] = json!(true);
    let r = gw.post("/v1/chat/completions", body).await;
    let events = r.sse_data();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    for (index, want) in [(0, "aa"), (1, "bbb")] {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want);
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            mine.last().expect("chunk")["choices"][0]["finish_reason"],
            "stop"
        );
    }
}

#[tokio::test]
async fn dropping_the_client_stream_cancels_the_generation() {
    let gw = gateway(|_| Script::Endless {
        delay: Duration::from_millis(10),
    })
    .await;
    let mut body = chat_body("go on forever");
    body["stream"] = json!(true);
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = gw.app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body().into_data_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"x") {
        let chunk = stream.next().await.expect("more data").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        gw.fake.cancelled.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    drop(stream);
    assert!(
        gw.wait_cancelled(1).await,
        "dropping the SSE body must cancel the coordinator stream"
    );
}

#[tokio::test]
async fn error_after_the_stream_started_is_an_sse_error_event() {
    let gw = gateway(|req| {
        match reply_ids(
            req,
            &ids("ab"),
            pb::FinishReason::Unspecified,
            Duration::ZERO,
        ) {
            Script::Reply {
                messages, delay, ..
            } => Script::Reply {
                messages,
                delay,
                then: Some(tonic::Status::internal("worker crashed")),
            },
            other => other,
        }
    })
    .await;
    let mut body = chat_body("x");
    body["stream"] = json!(true);
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200);
    let events = r.sse_data();
    let err: Value = serde_json::from_str(&events[events.len() - 2]).expect("error JSON");
    assert_eq!(err["error"]["type"], "server_error");
    assert_eq!(
        err["error"]["message"], "Internal server error.",
        "details stay in the log"
    );
    assert!(!r.text.contains("worker crashed"));
}

#[tokio::test]
async fn length_finish_reason() {
    let gw =
        gateway(|req| reply_ids(req, &ids("abc"), pb::FinishReason::Length, Duration::ZERO)).await;
    let mut body = chat_body("x");
    body["max_tokens"] = json!(3);
    let r = gw.post("/v1/chat/completions", body).await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "abc");
    assert_eq!(
        gw.seen()[0]
            .stopping
            .clone()
            .expect("stopping")
            .max_new_tokens,
        3
    );
}
