//! End-to-end serving properties of the real binaries on loopback: greedy outputs independent
//! of TP size and of batching, and KV blocks freed when a client disconnects.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const PROMPTS: [&str; 3] = [
    "Hello there",
    "Explain paged attention in one line.",
    "1 2 3 4 5 6 7 8 9 10",
];

fn image_body() -> Value {
    json!({
        "model": "r4b",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_uri(200, 130, 3)}},
            {"type": "text", "text": "What is in the picture?"}
        ]}],
        "max_tokens": 16, "temperature": 0, "ignore_eos": true
    })
}

fn outputs(s: &Server) -> Vec<String> {
    let mut out: Vec<String> = PROMPTS
        .iter()
        .map(|p| choice_text(&s.greedy_chat(p, 24)))
        .collect();
    let (status, body) = s.post("/v1/chat/completions", &image_body());
    assert_eq!(status, 200, "{body}");
    out.push(choice_text(&body));
    out
}

#[test]
fn greedy_outputs_are_identical_for_tp_1_2_and_8() {
    let base = outputs(&Server::start(&["--tensor-parallel-size", "1"]));
    assert!(base.iter().all(|t| t.len() > 1), "{base:?}");
    for tp in ["2", "8"] {
        let got = outputs(&Server::start(&["--tensor-parallel-size", tp]));
        assert_eq!(got, base, "TP={tp}");
    }
}

/// Streams one chat request; returns the concatenated reasoning + content deltas.
async fn stream_text(client: &reqwest::Client, base: &str, body: Value) -> String {
    let mut body = body;
    body["stream"] = json!(true);
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let (mut reasoning, mut content) = (String::new(), String::new());
    for line in buf.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(d) = v["choices"].get(0).map(|c| &c["delta"]) {
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(d["content"].as_str().unwrap_or(""));
        }
    }
    format!("{reasoning}|{content}")
}

#[test]
fn greedy_output_is_the_same_alone_and_among_64_concurrent_streams() {
    let s = Server::start(&[]);
    let target = greedy_body(PROMPTS[1], 32);
    let alone = choice_text(&s.post("/v1/chat/completions", &target).1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let together = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let body = if i % 16 == 0 {
                target.clone()
            } else {
                greedy_body(
                    &format!("request {i}: {}", "some words ".repeat(i % 7 + 1)),
                    24 + (i as u32 % 9),
                )
            };
            let (client, base) = (client.clone(), s.base.clone());
            tasks.push(tokio::spawn(async move {
                (i, stream_text(&client, &base, body).await)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, text) in together.iter().filter(|(i, _)| i % 16 == 0) {
        assert_eq!(text, &alone, "request {i} among 64 concurrent streams");
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_kv_blocks() {
    let s = Server::start(&["--no-enable-prefix-caching"]);
    let idle = s
        .metric("r4b_replica_kv_blocks_used")
        .expect("kv blocks metric");
    assert_eq!(idle, 0.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut body = greedy_body("a long story please", 4000);
        body["stream"] = json!(true);
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut stream = resp.bytes_stream();
        let mut seen = 0;
        while let Some(chunk) = stream.next().await {
            seen += String::from_utf8_lossy(&chunk.unwrap())
                .matches("data: ")
                .count();
            if seen >= 20 {
                break;
            }
        }
        drop(stream);
    });
    // Shut the client runtime down so the connection is closed, as a client process exiting would.
    drop(rt);
    let mut busy_seen = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = s.metric("r4b_replica_kv_blocks_used").unwrap();
        eprintln!(
            "used {used} running {:?} gw {:?}",
            s.metric("r4b_replica_requests_running"),
            s.metric("r4b_gateway_requests_running")
        );
        if used > 0.0 {
            busy_seen = true;
        }
        if used == idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KV blocks still in use after the client left: {used}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The generation (4000 tokens) cannot have finished by itself in this time on the tiny model
    // only if it was aborted; check the finish was an abort, not a completion.
    let done = s.metric("vllm:request_success_total").unwrap_or(0.0);
    assert_eq!(
        done, 0.0,
        "the request completed instead of being aborted (busy seen: {busy_seen})"
    );
}

#[test]
fn a_repeated_prompt_is_served_from_the_prefix_cache() {
    let s = Server::start(&[]);
    let text = "The same long system-like preamble, repeated so that several KV blocks fill up. "
        .repeat(3);
    let first = s.greedy_chat(&text, 4);
    let second = s.greedy_chat(&text, 4);
    let cached = |b: &Value| {
        b["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    };
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(cached(&first), 0, "{first}");
    // Whole 16-token blocks are reused; the last prompt token is always recomputed.
    assert_eq!(cached(&second), (prompt - 1) / 16 * 16, "{second}");
    assert_eq!(choice_text(&first), choice_text(&second));
    assert!(s.metric("vllm:prefix_cache_hits_total").unwrap_or(0.0) > 0.0);
}

#[test]
fn seeded_sampling_repeats_and_logprobs_come_back() {
    let s = Server::start(&[]);
    let body = |seed: u64| {
        json!({
            "model": "r4b", "messages": [{"role": "user", "content": "Pick some words."}],
            "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": seed,
            "presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1,
            "ignore_eos": true, "logprobs": true, "top_logprobs": 3
        })
    };
    let run = |seed| {
        let (st, b) = s.post("/v1/chat/completions", &body(seed));
        assert_eq!(st, 200, "{b}");
        b
    };
    let (a, b, c) = (run(42), run(42), run(7));
    assert_eq!(choice_text(&a), choice_text(&b), "same seed, same text");
    let lp = |v: &Value| {
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone()
    };
    // The second run hits the prefix cache, so its prefill differs by float rounding only.
    let toks = |v: &Value| lp(v).iter().map(|e| e["bytes"].clone()).collect::<Vec<_>>();
    assert_eq!(toks(&a), toks(&b), "same seed, same tokens");
    for (x, y) in lp(&a).iter().zip(lp(&b)) {
        let d = (x["logprob"].as_f64().unwrap() - y["logprob"].as_f64().unwrap()).abs();
        assert!(d < 1e-4, "same seed, logprob differs by {d}");
    }
    assert_ne!(
        toks(&a),
        toks(&c),
        "another seed should sample other tokens"
    );
    let entries = lp(&a);
    assert_eq!(entries.len(), 24, "one logprobs entry per generated token");
    for e in &entries {
        let p = e["logprob"].as_f64().unwrap();
        assert!(p <= 0.0 && p.is_finite(), "{e}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let best = top[0]["logprob"].as_f64().unwrap();
        assert!(
            best >= p - 1e-6,
            "the top alternative is at least as likely as the choice: {e}"
        );
    }
}
