//! Prometheus metrics (the text that `health` serves at `/metrics`).
//!
//! Latency histograms carry OTel GenAI semantic-convention names
//! (`gen_ai_server_time_to_first_token_seconds`, `gen_ai_server_time_per_output_token_seconds`,
//! `gen_ai_server_request_duration_seconds`) and are repeated under vLLM's names
//! (`vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`,
//! `vllm:e2e_request_latency_seconds`; plus `vllm:inter_token_latency_seconds`) so existing
//! dashboards work. Queue and KV gauges come from the coordinators' Load RPC at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use r4b_proto::v1 as pb;

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A fixed-bucket histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    finished: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    running: AtomicI64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between tokens (per streamed message, divided by its tokens; vLLM's inter-token latency).
    pub itl: Histogram,
    /// Time per output token of one request: (duration − TTFT) / (tokens − 1), once per request
    /// with at least two tokens (the OTel GenAI and vLLM definition).
    pub tpot: Histogram,
    /// Request duration.
    pub e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            finished: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            running: AtomicI64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            tpot: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// Decrements the running-requests gauge when dropped.
#[derive(Debug)]
pub struct RunningGuard(Arc<Metrics>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one HTTP response.
    pub fn record_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
        }
    }

    /// Counts one finished choice by finish reason.
    pub fn record_finish(&self, reason: &'static str) {
        if let Ok(mut m) = self.finished.lock() {
            *m.entry(reason).or_insert(0) += 1;
        }
    }

    /// Generations in flight at this gateway.
    pub fn running(&self) -> i64 {
        self.running.load(Ordering::Relaxed)
    }

    /// Marks a generation as running until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> RunningGuard {
        self.running.fetch_add(1, Ordering::Relaxed);
        RunningGuard(self.clone())
    }

    /// Adds prompt tokens.
    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds generated tokens.
    pub fn add_generation_tokens(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text for model `model`, with replica gauges from `loads`.
    pub fn render(
        &self,
        model: &str,
        loads: &[(String, Result<pb::LoadResponse, tonic::Status>)],
    ) -> String {
        let mut out = String::new();
        let m = format!("model_name=\"{}\"", escape(model));
        self.write_counters(&mut out, &m);
        self.itl.write(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Time between output tokens (per streamed message).",
            &m,
        );
        let hist = [
            (
                &self.ttft,
                "gen_ai_server_time_to_first_token_seconds",
                "vllm:time_to_first_token_seconds",
                "Time to first token.",
            ),
            (
                &self.tpot,
                "gen_ai_server_time_per_output_token_seconds",
                "vllm:request_time_per_output_token_seconds",
                "Time per output token of a request: (duration - TTFT) / (tokens - 1).",
            ),
            (
                &self.e2e,
                "gen_ai_server_request_duration_seconds",
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
            ),
        ];
        for (h, otel, vllm, help) in hist {
            h.write(&mut out, otel, help, &m);
            h.write(&mut out, vllm, help, &m);
        }
        write_load_gauges(&mut out, &m, loads);
        out
    }

    fn write_counters(&self, out: &mut String, m: &str) {
        let _ = writeln!(
            out,
            "# HELP r4b_gateway_http_requests_total HTTP responses by endpoint and status."
        );
        let _ = writeln!(out, "# TYPE r4b_gateway_http_requests_total counter");
        if let Ok(reqs) = self.requests.lock() {
            for ((endpoint, status), n) in reqs.iter() {
                let _ = writeln!(
                    out,
                    "r4b_gateway_http_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                    escape(endpoint)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Finished generations by finish reason."
        );
        let _ = writeln!(out, "# TYPE vllm:request_success_total counter");
        if let Ok(fin) = self.finished.lock() {
            for (reason, n) in fin.iter() {
                let _ = writeln!(
                    out,
                    "vllm:request_success_total{{{m},finished_reason=\"{reason}\"}} {n}"
                );
            }
        }
        let prompt = self.prompt_tokens.load(Ordering::Relaxed);
        let generated = self.generation_tokens.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "r4b_gateway_prompt_tokens_total",
                "Prompt tokens processed.",
                prompt,
            ),
            (
                "vllm:prompt_tokens_total",
                "Prompt tokens processed.",
                prompt,
            ),
            (
                "r4b_gateway_generation_tokens_total",
                "Tokens generated.",
                generated,
            ),
            (
                "vllm:generation_tokens_total",
                "Tokens generated.",
                generated,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{m}}} {v}"
            );
        }
        let running = self.running.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP r4b_gateway_requests_running Generations in flight at this gateway.\n\
             # TYPE r4b_gateway_requests_running gauge\nr4b_gateway_requests_running{{{m}}} {running}"
        );
    }
}

/// One per-replica gauge of a Load answer.
type LoadField = fn(&pb::LoadResponse) -> u32;

fn write_load_gauges(
    out: &mut String,
    m: &str,
    loads: &[(String, Result<pb::LoadResponse, tonic::Status>)],
) {
    let ok: Vec<(&String, &pb::LoadResponse)> = loads
        .iter()
        .filter_map(|(u, r)| r.as_ref().ok().map(|l| (u, l)))
        .collect();
    let waiting: u64 = ok.iter().map(|(_, l)| u64::from(l.waiting)).sum();
    let running: u64 = ok.iter().map(|(_, l)| u64::from(l.running)).sum();
    let used: u64 = ok.iter().map(|(_, l)| u64::from(l.kv_blocks_used)).sum();
    let total: u64 = ok.iter().map(|(_, l)| u64::from(l.kv_blocks_total)).sum();
    let usage = if total > 0 {
        used as f64 / total as f64
    } else {
        0.0
    };
    for (name, help, v) in [
        (
            "vllm:num_requests_waiting",
            "Requests waiting in the coordinators' queues.",
            waiting as f64,
        ),
        (
            "vllm:num_requests_running",
            "Requests being generated by the coordinators.",
            running as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage (1 = full).",
            usage,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{m}}} {v}"
        );
    }
    let sum64 = |f: fn(&pb::LoadResponse) -> u64| ok.iter().map(|(_, l)| f(l)).sum::<u64>();
    let count = |f: fn(&pb::LoadResponse) -> u64| sum64(f).to_string();
    // Step time split: coordinator wall per step vs rank 0's forward (+ sampling) and its
    // collectives; wall − forward is the control overhead (gRPC fan-out, scheduling, answers).
    let secs = |f: fn(&pb::LoadResponse) -> u64| format!("{:.6}", sum64(f) as f64 / 1e9);
    for (name, help, v) in [
        (
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            count(|l| l.prefix_query_tokens),
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prompt tokens served from the prefix cache.",
            count(|l| l.prefix_hit_tokens),
        ),
        (
            "vllm:num_preemptions_total",
            "Sequences preempted by the coordinators.",
            count(|l| l.preemptions),
        ),
        (
            "r4b_engine_steps_total",
            "Engine steps run by the coordinators.",
            count(|l| l.steps),
        ),
        (
            "r4b_engine_batch_tokens_total",
            "Tokens in the engine steps (prefill chunks and decodes).",
            count(|l| l.batch_tokens),
        ),
        (
            "r4b_engine_step_wall_seconds_total",
            "Coordinator wall time of the engine steps.",
            secs(|l| l.step_wall_ns),
        ),
        (
            "r4b_engine_step_forward_seconds_total",
            "Rank 0 forward and sampling time of the engine steps.",
            secs(|l| l.step_forward_ns),
        ),
        (
            "r4b_engine_collective_seconds_total",
            "Rank 0 time in collectives during the engine steps.",
            secs(|l| l.collective_ns),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{m}}} {v}"
        );
    }
    let per_replica: [(&str, &str, LoadField); 4] = [
        (
            "r4b_replica_requests_waiting",
            "Requests waiting at one replica.",
            |l| l.waiting,
        ),
        (
            "r4b_replica_requests_running",
            "Requests running at one replica.",
            |l| l.running,
        ),
        (
            "r4b_replica_kv_blocks_used",
            "KV blocks in use at one replica.",
            |l| l.kv_blocks_used,
        ),
        ("r4b_replica_kv_blocks", "KV blocks at one replica.", |l| {
            l.kv_blocks_total
        }),
    ];
    for (name, help, field) in per_replica {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (url, load) in &ok {
            let _ = writeln!(out, "{name}{{replica=\"{}\"}} {}", escape(url), field(load));
        }
    }
    let _ = writeln!(
        out,
        "# HELP r4b_replica_up Whether the replica answered Load.\n# TYPE r4b_replica_up gauge"
    );
    for (url, r) in loads {
        let _ = writeln!(
            out,
            "r4b_replica_up{{replica=\"{}\"}} {}",
            escape(url),
            u8::from(r.is_ok())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text_is_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.0625);
        h.observe(0.5);
        h.observe(3.0);
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "X.", "a=\"b\"");
        let expected = "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
            x_seconds_bucket{a=\"b\",le=\"0.1\"} 1\nx_seconds_bucket{a=\"b\",le=\"1\"} 2\n\
            x_seconds_bucket{a=\"b\",le=\"+Inf\"} 3\nx_seconds_sum{a=\"b\"} 3.5625\nx_seconds_count{a=\"b\"} 3\n";
        assert_eq!(out, expected);
    }

    #[test]
    fn render_has_vllm_aliases_and_load_gauges() {
        let m = Arc::new(Metrics::default());
        m.record_request("/v1/chat/completions", 200);
        m.add_prompt_tokens(12);
        m.add_generation_tokens(5);
        m.record_finish("stop");
        let guard = m.start_request();
        let loads = vec![
            (
                "http://a".to_string(),
                Ok(pb::LoadResponse {
                    waiting: 2,
                    running: 3,
                    kv_blocks_used: 25,
                    kv_blocks_total: 100,
                    queue_capacity: 8,
                    prefix_hit_tokens: 30,
                    prefix_query_tokens: 40,
                    preemptions: 1,
                    steps: 4,
                    step_wall_ns: 10_000_000,
                    step_forward_ns: 7_500_000,
                    batch_tokens: 40,
                    ..Default::default()
                }),
            ),
            (
                "http://b".to_string(),
                Err(tonic::Status::unavailable("down")),
            ),
        ];
        let text = m.render("r4b", &loads);
        for line in [
            "r4b_gateway_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
            "vllm:prompt_tokens_total{model_name=\"r4b\"} 12",
            "vllm:generation_tokens_total{model_name=\"r4b\"} 5",
            "vllm:request_success_total{model_name=\"r4b\",finished_reason=\"stop\"} 1",
            "r4b_gateway_requests_running{model_name=\"r4b\"} 1",
            "vllm:num_requests_waiting{model_name=\"r4b\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"r4b\"} 0.25",
            "vllm:prefix_cache_hits_total{model_name=\"r4b\"} 30",
            "vllm:num_preemptions_total{model_name=\"r4b\"} 1",
            "r4b_engine_steps_total{model_name=\"r4b\"} 4",
            "r4b_engine_batch_tokens_total{model_name=\"r4b\"} 40",
            "r4b_engine_step_wall_seconds_total{model_name=\"r4b\"} 0.010000",
            "r4b_engine_step_forward_seconds_total{model_name=\"r4b\"} 0.007500",
            "r4b_replica_up{replica=\"http://b\"} 0",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            "# TYPE gen_ai_server_time_to_first_token_seconds histogram",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            "# TYPE vllm:inter_token_latency_seconds histogram",
            "# TYPE vllm:request_time_per_output_token_seconds histogram",
            "# TYPE gen_ai_server_time_per_output_token_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        drop(guard);
        assert!(m
            .render("r4b", &[])
            .contains("r4b_gateway_requests_running{model_name=\"r4b\"} 0"));
    }
}
