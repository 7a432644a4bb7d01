//! `/metrics` of every process that serves one, after a known workload:
//!
//! - Prometheus's own `promtool check metrics` parses each (`r4b serve`'s, which carries its
//!   coordinator's after the gateway's; a standalone `r4b coordinator --metrics-port`; a
//!   standalone `r4b gateway` in front of it) and
//!   finds no problem other than the `vllm:` names' colons (kept on purpose: vLLM exports the same
//!   names, and its dashboards, production-stack's router and KEDA rules query them);
//! - the gateway's token counters and the coordinator's per-request histograms equal the usage
//!   the API returned; every rank ran every step; the thinking counters match what the API shows;
//! - TPOT of a known streamed request equals (duration − TTFT) / (tokens − 1) as the client
//!   measured it, within 1 ms.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The value of the sample named exactly `series` (name and labels as exposed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

/// `promtool check metrics` on `text`; false (saying so) when promtool is not installed.
fn promtool(what: &str, text: &str) -> bool {
    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("SKIPPED promtool on {what}: promtool is not installed (Debian package `prometheus`; .ci/run installs it)");
        return false;
    };
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool check metrics ({what}):\n{report}");
    // Exit 1 is a parse error; 3 is lint findings, of which only the colons are accepted.
    assert_ne!(out.status.code(), Some(1), "promtool cannot parse {what}");
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("vllm:") && l.ends_with("metric names should not contain ':'")))
        .collect();
    assert!(
        findings.is_empty(),
        "promtool findings on {what}: {findings:#?}"
    );
    true
}

const M: &str = "{model_name=\"r4b\"}";

#[test]
fn metrics_pass_promtool_and_count_the_api_usage() {
    let s = Server::start(&["--tensor-parallel-size", "2"]);
    let (mut prompt, mut completion, mut requests, mut max_tokens) = (0.0, 0.0, 0.0, 0.0);
    let mut add = |body: &Value, max: u32| {
        prompt += body["usage"]["prompt_tokens"].as_f64().expect("usage");
        completion += body["usage"]["completion_tokens"].as_f64().expect("usage");
        requests += 1.0;
        max_tokens += f64::from(max);
    };
    // Chat in the default thinking_mode (auto): the model decides whether to think.
    for (text, n) in [("Hi", 5), ("How are you today?", 9), ("x", 1)] {
        add(&s.greedy_chat(text, n), n);
    }
    let (status, body) = s.post(
        "/v1/completions",
        &json!({"model": "r4b", "prompt": "Once upon", "max_tokens": 4, "temperature": 0,
                "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{body}");
    add(&body, 4);
    // thinking_mode long with a budget of 3: the think block is open from the prompt; unless the
    // model closes it itself, the budget closes it with forced tokens, which get no logprobs.
    let thinking = |t: &str| {
        (
            value(t, &format!("r4b_request_thinking_tokens_count{M}")),
            value(t, &format!("r4b_request_thinking_tokens_sum{M}")),
        )
    };
    let (count0, sum0) = thinking(&s.get_text("/metrics"));
    let (status, long) = s.post(
        "/v1/chat/completions",
        &json!({"model": "r4b", "messages": [{"role": "user", "content": "Think."}],
                "max_tokens": 12, "min_tokens": 12, "temperature": 0, "logprobs": true,
                "max_thinking_tokens": 3,
                "chat_template_kwargs": {"thinking_mode": "long"}}),
    );
    assert_eq!(status, 200, "{long}");
    add(&long, 12);
    let forced = long["usage"]["completion_tokens"].as_u64().expect("usage") as usize
        - long["choices"][0]["logprobs"]["content"]
            .as_array()
            .map_or(0, Vec::len);

    let text = s.get_text("/metrics");
    // The gateway's counters.
    for name in [
        "vllm:prompt_tokens_total",
        "r4b_gateway_prompt_tokens_total",
    ] {
        assert_eq!(value(&text, &format!("{name}{M}")), prompt, "{name}");
    }
    for name in [
        "vllm:generation_tokens_total",
        "r4b_gateway_generation_tokens_total",
    ] {
        assert_eq!(value(&text, &format!("{name}{M}")), completion, "{name}");
    }
    // The coordinator's per-request histograms (one observation per finished request).
    for (name, sum) in [
        ("vllm:request_prompt_tokens", prompt),
        ("vllm:request_generation_tokens", completion),
        ("vllm:request_max_num_generation_tokens", max_tokens),
    ] {
        assert_eq!(value(&text, &format!("{name}_sum{M}")), sum, "{name}_sum");
        assert_eq!(
            value(&text, &format!("{name}_count{M}")),
            requests,
            "{name}_count"
        );
    }
    for name in [
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ] {
        assert_eq!(
            value(&text, &format!("{name}_count{M}")),
            requests,
            "{name}_count"
        );
    }
    // Both ranks ran every step, and a rank's collective time is part of its step time.
    let steps = value(&text, &format!("r4b_engine_step_duration_seconds_count{M}"));
    // Each request took a step per sampled token at least (forced tokens ride along in one).
    assert!(steps >= requests, "{steps} steps for {requests} requests");
    for rank in ["0", "1"] {
        let l = format!("{{rank=\"{rank}\",model_name=\"r4b\"}}");
        assert_eq!(
            value(&text, &format!("r4b_rank_forward_seconds_count{l}")),
            steps
        );
        let fwd = value(&text, &format!("r4b_rank_forward_seconds_sum{l}"));
        let coll = value(&text, &format!("r4b_rank_collective_seconds_sum{l}"));
        assert!(
            coll > 0.0 && coll < fwd,
            "rank {rank}: collective {coll} s of {fwd} s"
        );
    }
    assert!(value(&text, &format!("vllm:prefix_cache_queries_total{M}")) >= 1.0);
    assert_eq!(value(&text, &format!("vllm:num_requests_running{M}")), 0.0);
    // Thinking: the three auto chats decided one way or the other; the long one is not auto.
    let decided = value(
        &text,
        "r4b_thinking_auto_decisions_total{decision=\"think\",model_name=\"r4b\"}",
    ) + value(
        &text,
        "r4b_thinking_auto_decisions_total{decision=\"no_think\",model_name=\"r4b\"}",
    );
    assert_eq!(decided, 3.0);
    let closes = value(&text, &format!("r4b_thinking_budget_closes_total{M}"));
    assert_eq!(
        closes,
        if forced > 0 { 1.0 } else { 0.0 },
        "{forced} forced tokens"
    );
    // The long choice thought (one observation), at most its budget of 3 tokens.
    let (count1, sum1) = thinking(&text);
    assert_eq!(count1 - count0, 1.0, "one thinking choice");
    assert!(
        (0.0..=3.0).contains(&(sum1 - sum0)),
        "{} thinking tokens",
        sum1 - sum0
    );
    // The GenAI histograms carry the required attributes, per operation.
    let genai = |op: &str| {
        format!(
            "gen_ai_server_request_duration_seconds_count{{gen_ai_operation_name=\"{op}\",gen_ai_provider_name=\"r4b\",model_name=\"r4b\"}}"
        )
    };
    assert_eq!(value(&text, &genai("chat")), 4.0);
    assert_eq!(value(&text, &genai("text_completion")), 1.0);
    promtool("r4b serve /metrics", &text);

    tpot_is_the_per_request_definition(&s);
}

/// One streamed completion alone: the TPOT histograms gain exactly one observation, equal to
/// (end − first token) / (tokens − 1) as the client measured it, within 1 ms.
fn tpot_is_the_per_request_definition(s: &Server) {
    let series = [
        format!("vllm:request_time_per_output_token_seconds_{{}}{M}"),
        "gen_ai_server_time_per_output_token_seconds_{}{gen_ai_operation_name=\"text_completion\",gen_ai_provider_name=\"r4b\",model_name=\"r4b\"}".to_string(),
    ];
    let read = |text: &str| -> Vec<(f64, f64)> {
        series
            .iter()
            .map(|f| {
                (
                    value(text, &f.replace("{}", "sum")),
                    value(text, &f.replace("{}", "count")),
                )
            })
            .collect()
    };
    let before = read(&s.get_text("/metrics"));
    let body = json!({"model": "r4b", "prompt": "Count with me", "max_tokens": 24,
                      "temperature": 0, "ignore_eos": true, "logprobs": 1, "stream": true,
                      "stream_options": {"include_usage": true}});
    let sent = Instant::now();
    let resp = client()
        .post(format!("{}/v1/completions", s.base))
        .json(&body)
        .send()
        .expect("send");
    assert_eq!(resp.status(), 200);
    let (mut first, mut end, mut tokens) = (None, None, 0u64);
    let mut reader = std::io::BufReader::new(resp);
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).expect("read") > 0 {
        let now = Instant::now();
        if let Some(data) = line.trim().strip_prefix("data: ") {
            if data != "[DONE]" {
                let v: Value = serde_json::from_str(data).expect("chunk");
                if let Some(c) = v["choices"].get(0) {
                    first.get_or_insert(now);
                    if !c["finish_reason"].is_null() {
                        end = Some(now);
                    }
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n;
                }
            }
        }
        line.clear();
    }
    let (first, end) = (first.expect("a token"), end.expect("a finish"));
    assert_eq!(tokens, 24);
    let client_tpot = end.duration_since(first).as_secs_f64() / (tokens - 1) as f64;
    let after = read(&s.get_text("/metrics"));
    for ((name, b), a) in series.iter().zip(&before).zip(&after) {
        assert_eq!(a.1 - b.1, 1.0, "{name}: one observation");
        let server_tpot = a.0 - b.0;
        assert!(
            (server_tpot - client_tpot).abs() < 1e-3,
            "{name}: {server_tpot} s per token, the client measured {client_tpot} s \
             (request took {:?})",
            sent.elapsed()
        );
    }
}

const SECRET: &str = "metrics-test-secret-0123456789abcdef";

/// Kills a child process on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GETs `url` until it answers 200 (or `child` exits, or two minutes pass).
fn wait_for(url: &str, child: &mut Killed) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the process behind {url} exited: {status}");
        }
        if let Ok(r) = client().get(url).send() {
            if r.status() == 200 {
                return r.text().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no answer from {url}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The roles on their own: `r4b coordinator --metrics-port` serves the replica's metrics on their
/// own port, `r4b gateway` in front of it only the gateway's; both pass promtool.
#[test]
fn a_standalone_coordinator_and_gateway_serve_their_own_metrics() {
    let cache = tempfile::tempdir().unwrap();
    let (port, metrics_port, http_port) = (free_port(), free_port(), free_port());
    let spawn = |args: &[&str]| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_r4b"))
                .args(args)
                .env("R4B_CACHE", cache.path())
                .env("RAYON_NUM_THREADS", "1")
                .env(r4b_proto::auth::SECRET_ENV, SECRET)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let mut coordinator = spawn(&[
        "coordinator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--metrics-port",
        &metrics_port.to_string(),
        "--kv-cache-space",
        "0.25",
    ]);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    wait_for(&metrics_url, &mut coordinator);
    let mut gateway = spawn(&[
        "gateway",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--host",
        "127.0.0.1",
        "--port",
        &http_port.to_string(),
    ]);
    let base = format!("http://127.0.0.1:{http_port}");
    wait_for(&format!("{base}/ready"), &mut gateway);
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&greedy_body("Hi", 3))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    let replica = wait_for(&metrics_url, &mut coordinator);
    assert_eq!(
        value(&replica, &format!("vllm:num_requests_waiting{M}")),
        0.0
    );
    assert!(value(&replica, &format!("r4b_engine_kv_blocks{M}")) > 0.0);
    assert_eq!(
        value(&replica, &format!("vllm:request_generation_tokens_sum{M}")),
        3.0
    );
    // No gateway metrics there: they belong to the gateway.
    assert!(!replica.contains("vllm:time_to_first_token_seconds"));
    promtool("r4b coordinator --metrics-port", &replica);

    let gw = wait_for(&format!("{base}/metrics"), &mut gateway);
    assert_eq!(value(&gw, &format!("vllm:generation_tokens_total{M}")), 3.0);
    // The engine's gauges are the coordinator's to export; the gateway has its view per replica.
    assert!(!gw.contains("vllm:num_requests_waiting"));
    assert!(gw.contains("r4b_replica_up{replica="));
    promtool("r4b gateway /metrics", &gw);
}
