//! Prompt log-probabilities through the official `openai` Python SDK
//! (`tests/e2e/openai_sdk_logprobs.py`): `echo` + `logprobs` with and without generation
//! (`max_tokens: 0`), batched prompts, vLLM's `prompt_logprobs` on both endpoints,
//! `return_tokens_as_token_ids` against alternatives with the same text, and
//! `stream_options.continuous_usage_stats`, at TP = 1 and (prompt scoring) TP = 2.
//!
//! The expected values are independent of the serving path: this test writes the embedded
//! model's files itself, runs the f32 reference forward in-process (one chunk, every position,
//! world size 1, full logits), and hands the script each position's log-softmax, computed here
//! in f64. The script derives tokens, top-k and ranks from those rows and compares within 1e-4.

mod common;

use common::python::run_e2e;
use common::reference::{log_softmax_rows, log_softmax_rows_with_images, reference_model};
use common::Server;
use serde_json::{json, Value};

/// The prompts the script scores (token ids; the chat one comes from `/tokenize`).
fn prompts() -> Vec<Vec<u32>> {
    vec![
        "Hello world".bytes().map(u32::from).collect(),
        vec![49, 50, 51, 52, 53, 54, 55],
        // Not UTF-8 on their own: the alternatives of these positions often share the text
        // U+FFFD, which is what `return_tokens_as_token_ids` is for.
        vec![0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98],
    ]
}

/// `{"prompts": [{"ids": [...], "rows": [[...]]}], "chat": {...}}` for the script.
fn reference_file(s: &Server, dir: &std::path::Path) -> std::path::PathBuf {
    let model = reference_model(&dir.join("model"));
    let chat_body = json!({"model": "r4b", "messages": [{"role": "user", "content": "Hi there"}]});
    let (status, tokenized) = s.post("/tokenize", &chat_body);
    assert_eq!(status, 200, "{tokenized}");
    let chat_ids: Vec<u32> = tokenized["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let entry = |ids: &[u32]| json!({"ids": ids, "rows": log_softmax_rows(&model, ids)});
    let all: Vec<Value> = prompts().iter().map(|p| entry(p)).collect();
    let file = dir.join("reference.json");
    let doc = json!({"prompts": all, "chat": entry(&chat_ids)});
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    file
}

fn run_script(s: &Server, reference: &std::path::Path, mode: &str) {
    let args = [s.base.as_ref(), reference.as_os_str(), mode.as_ref()];
    run_e2e("openai_sdk_logprobs.py", &args, "logprobs SDK checks");
}

#[test]
fn prompt_logprobs_echo_and_usage_match_the_reference_through_the_openai_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&[]);
    let reference = reference_file(&s, dir.path());
    run_script(&s, &reference, "full");
}

#[test]
fn prompt_logprobs_at_tp2_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    // Small chunks: every prompt spans several prefill chunks (the carried row).
    let s = Server::start(&[
        "--tensor-parallel-size",
        "2",
        "--max-num-batched-tokens",
        "4",
    ]);
    let reference = reference_file(&s, dir.path());
    run_script(&s, &reference, "scoring");
}

#[test]
fn image_positions_get_prompt_logprobs_equal_to_the_reference() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let model = reference_model(&model_dir);
    let s = Server::start(&[]);
    let uri = common::png_data_uri(40, 24, 3);
    let png = base64::engine::general_purpose::STANDARD
        .decode(uri.split_once(',').unwrap().1)
        .unwrap();
    let messages = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "What is it?"}]}]);
    let (status, t) = s.post("/tokenize", &json!({"model": "r4b", "messages": messages}));
    assert_eq!(status, 200, "{t}");
    let ids: Vec<u32> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let body = json!({"model": "r4b", "messages": messages, "max_tokens": 1, "prompt_logprobs": 1});
    let (status, r) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    let plp = r["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        plp.len(),
        ids.len(),
        "one entry per prompt token, images expanded"
    );
    assert_eq!(r["usage"]["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    assert!(plp[0].is_null());
    let rows = log_softmax_rows_with_images(&model, &ids, &[png], &model_dir);
    let image_id = ids
        .iter()
        .copied()
        .max_by_key(|&id| ids.iter().filter(|&&x| x == id).count());
    let mut image_positions = 0;
    for t in 1..ids.len() {
        let e = &plp[t][ids[t].to_string()];
        let (got, want) = (e["logprob"].as_f64().unwrap(), rows[t - 1][ids[t] as usize]);
        assert!(
            (got - want).abs() < 1e-4,
            "position {t}: {got} vs reference {want}"
        );
        let rank = rows[t - 1].iter().filter(|&&x| x >= want).count() as u64;
        assert_eq!(e["rank"].as_u64(), Some(rank), "position {t}");
        image_positions += usize::from(Some(ids[t]) == image_id);
    }
    assert!(
        image_positions > 100,
        "{image_positions} image positions checked"
    );
}

#[test]
fn a_preempted_scoring_request_keeps_one_entry_per_prompt_position() {
    let dir = tempfile::tempdir().unwrap();
    let model = reference_model(&dir.path().join("model"));
    // 5 KV blocks of 16 tokens, 32 tokens per step: two 50-token prompts (4 blocks each) cannot
    // both be held, so one is preempted and recomputed, before or after its prompt entries went
    // out.
    let s = Server::start(&[
        "--num-kv-blocks",
        "5",
        "--block-size",
        "16",
        "--max-model-len",
        "64",
        "--max-num-batched-tokens",
        "32",
    ]);
    let prompts: Vec<Vec<u32>> = (0..2u32)
        .map(|j| (0..50u32).map(|i| (i * 7 + j * 13) % 200 + 32).collect())
        .collect();
    let responses: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                scope.spawn(move || {
                    let body = json!({"model": "r4b", "prompt": p, "max_tokens": 8, "echo": true,
                        "logprobs": 1, "temperature": 0, "ignore_eos": true});
                    let (status, r) = s.post("/v1/completions", &body);
                    assert_eq!(status, 200, "{r}");
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let preemptions = s.metric("vllm:num_preemptions_total").unwrap_or(0.0);
    assert!(preemptions >= 1.0, "no preemption happened");
    for (p, r) in prompts.iter().zip(&responses) {
        let lp = r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        assert_eq!(
            lp.len(),
            p.len() + 8,
            "prompt entries once each, then 8 tokens"
        );
        assert!(lp[0].is_null());
        let rows = log_softmax_rows(&model, p);
        for t in 1..p.len() {
            let (got, want) = (lp[t].as_f64().unwrap(), rows[t - 1][p[t] as usize]);
            assert!((got - want).abs() < 1e-4, "position {t}: {got} vs {want}");
        }
    }
}
