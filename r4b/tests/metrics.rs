//! `/metrics` of a running `r4b serve` (embedded model): Prometheus's own `promtool check metrics`
//! parses it and finds no problem other than the `vllm:` names' colons (kept on purpose: vLLM
//! exports the same names, and its dashboards, production-stack's router and KEDA rules query
//! them); after a known workload the token counters equal the usage the API returned.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

#[test]
fn metrics_pass_promtool_and_count_the_api_usage() {
    let s = Server::start(&[]);
    let (mut prompt, mut completion) = (0.0, 0.0);
    let mut add = |body: &serde_json::Value| {
        prompt += body["usage"]["prompt_tokens"].as_f64().expect("usage");
        completion += body["usage"]["completion_tokens"].as_f64().expect("usage");
    };
    for (text, n) in [("Hi", 5), ("How are you today?", 9), ("x", 1)] {
        add(&s.greedy_chat(text, n));
    }
    let (status, body) = s.post(
        "/v1/completions",
        &json!({"model": "r4b", "prompt": "Once upon", "max_tokens": 4, "temperature": 0,
                "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{body}");
    add(&body);

    let text = s.get_text("/metrics");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    };
    for name in [
        "vllm:prompt_tokens_total",
        "r4b_gateway_prompt_tokens_total",
    ] {
        assert_eq!(value(name), prompt, "{name}");
    }
    for name in [
        "vllm:generation_tokens_total",
        "r4b_gateway_generation_tokens_total",
    ] {
        assert_eq!(value(name), completion, "{name}");
    }

    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("SKIPPED the promtool half: promtool is not installed (Debian package `prometheus`; .ci/run installs it)");
        return;
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
    println!("promtool check metrics:\n{report}");
    // Exit 1 is a parse error; 3 is lint findings, of which only the colons are accepted.
    assert_ne!(out.status.code(), Some(1), "promtool cannot parse /metrics");
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("vllm:") && l.ends_with("metric names should not contain ':'")))
        .collect();
    assert!(findings.is_empty(), "promtool findings: {findings:#?}");
}
