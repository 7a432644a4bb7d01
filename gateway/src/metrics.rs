//! Prometheus metrics (the text that `health` serves at `/metrics`).
//!
//! Latency histograms carry OTel GenAI semantic-convention names
//! (`gen_ai_server_time_to_first_token_seconds`, `gen_ai_server_time_per_output_token_seconds`,
//! `gen_ai_server_request_duration_seconds`) and are repeated under vLLM's names
//! (`vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`,
//! `vllm:e2e_request_latency_seconds`; plus `vllm:inter_token_latency_seconds`) so existing
//! dashboards work. The `gen_ai_*` series carry the convention's required attributes as labels
//! (`gen_ai_operation_name`: `chat` or `text_completion`; `gen_ai_provider_name`: `r4b`).
//!
//! R-4B's thinking: `r4b_thinking_auto_decisions_total{decision}` (chat choices in `auto` mode
//! that opened a think block, or not), `r4b_request_thinking_tokens` (tokens inside the think
//! block of a choice that thought) and `r4b_thinking_budget_closes_total` (think blocks the
//! thinking budget closed).
//!
//! Queue, KV, prefix-cache and step metrics belong to the coordinators (`r4b_coordinator::metrics`,
//! on each coordinator's `/metrics`; `r4b serve` appends its coordinator's to this text). From the
//! coordinators' Load RPC the gateway keeps only its own view: `r4b_replica_*{replica}` and
//! `r4b_replica_up`.

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

/// More Prometheus text appended to `/metrics` (`r4b serve`: its in-process coordinator's).
pub struct ExtraMetrics(pub Box<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

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
        self.write_series(out, name, labels);
    }

    fn write_series(&self, out: &mut String, name: &str, labels: &str) {
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

/// The OTel GenAI operations of the API (`gen_ai.operation.name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    TextCompletion,
}

impl Operation {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::TextCompletion => "text_completion",
        }
    }
}

/// The GenAI server histograms of one operation.
#[derive(Debug)]
pub struct GenAi {
    /// `gen_ai.server.time_to_first_token`.
    pub ttft: Histogram,
    /// `gen_ai.server.time_per_output_token`.
    pub tpot: Histogram,
    /// `gen_ai.server.request.duration`.
    pub duration: Histogram,
}

impl Default for GenAi {
    fn default() -> Self {
        GenAi {
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(ITL_BUCKETS),
            duration: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// What one finished chat choice did with its think block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thinking {
    /// The prompt left the choice to the model (`thinking_mode` auto).
    pub auto: bool,
    /// A think block was open during generation (opened by the model or by the prompt).
    pub thought: bool,
    /// Tokens inside the think block.
    pub tokens: u32,
    /// The thinking budget closed the block (a forced `</think>`).
    pub budget_closed: bool,
}

const THINKING_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0,
];

/// The OTel GenAI server histograms exported over OTLP, with their required attributes. They
/// come from the global meter provider, a no-op one unless the OTLP metrics pipeline is on
/// (`r4b-telemetry`): then recording costs a virtual call.
#[derive(Debug)]
struct OtelGenAi {
    ttft: opentelemetry::metrics::Histogram<f64>,
    tpot: opentelemetry::metrics::Histogram<f64>,
    duration: opentelemetry::metrics::Histogram<f64>,
}

impl OtelGenAi {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("r4b-gateway");
        let h = |name: &'static str, help: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        OtelGenAi {
            ttft: h(
                "gen_ai.server.time_to_first_token",
                "Time to generate the first token.",
                TTFT_BUCKETS,
            ),
            tpot: h(
                "gen_ai.server.time_per_output_token",
                "Time per output token after the first: (duration - TTFT) / (tokens - 1).",
                ITL_BUCKETS,
            ),
            duration: h(
                "gen_ai.server.request.duration",
                "Generative AI server request duration.",
                E2E_BUCKETS,
            ),
        }
    }
}

fn gen_ai_attributes(op: Operation) -> [opentelemetry::KeyValue; 2] {
    [
        opentelemetry::KeyValue::new("gen_ai.operation.name", op.as_str()),
        opentelemetry::KeyValue::new("gen_ai.provider.name", crate::telemetry::PROVIDER),
    ]
}

/// One latency histogram: the vLLM-named one, the GenAI one of an operation, the OTel name, the
/// vLLM name, the help text.
type LatencySeries<'a> = (
    &'a Histogram,
    fn(&GenAi) -> &Histogram,
    &'static str,
    &'static str,
    &'static str,
);

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// OTel GenAI histograms: chat, text_completion.
    gen_ai: [GenAi; 2],
    otel: OtelGenAi,
    auto_think: AtomicU64,
    auto_no_think: AtomicU64,
    budget_closes: AtomicU64,
    /// Thinking tokens of a choice that thought.
    pub thinking_tokens: Histogram,
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
            gen_ai: [GenAi::default(), GenAi::default()],
            otel: OtelGenAi::new(),
            auto_think: AtomicU64::new(0),
            auto_no_think: AtomicU64::new(0),
            budget_closes: AtomicU64::new(0),
            thinking_tokens: Histogram::new(THINKING_TOKEN_BUCKETS),
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
    /// The GenAI histograms of `op`.
    pub fn gen_ai(&self, op: Operation) -> &GenAi {
        match op {
            Operation::Chat => &self.gen_ai[0],
            Operation::TextCompletion => &self.gen_ai[1],
        }
    }

    /// Records a request's time to first token (`seconds`): vLLM's and GenAI's histograms, and
    /// over OTLP when it is on.
    pub fn record_ttft(&self, op: Operation, seconds: f64) {
        self.ttft.observe(seconds);
        self.gen_ai(op).ttft.observe(seconds);
        self.otel.ttft.record(seconds, &gen_ai_attributes(op));
    }

    /// Records a request's time per output token.
    pub fn record_tpot(&self, op: Operation, seconds: f64) {
        self.tpot.observe(seconds);
        self.gen_ai(op).tpot.observe(seconds);
        self.otel.tpot.record(seconds, &gen_ai_attributes(op));
    }

    /// Records a request's duration.
    pub fn record_duration(&self, op: Operation, seconds: f64) {
        self.e2e.observe(seconds);
        self.gen_ai(op).duration.observe(seconds);
        self.otel.duration.record(seconds, &gen_ai_attributes(op));
    }

    /// Records one finished chat choice's thinking.
    pub fn record_thinking(&self, t: Thinking) {
        if t.auto {
            let c = if t.thought {
                &self.auto_think
            } else {
                &self.auto_no_think
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        if t.thought {
            self.thinking_tokens.observe(f64::from(t.tokens));
        }
        if t.budget_closed {
            self.budget_closes.fetch_add(1, Ordering::Relaxed);
        }
    }

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
        let hist: [LatencySeries; 3] = [
            (
                &self.ttft,
                |g| &g.ttft,
                "gen_ai_server_time_to_first_token_seconds",
                "vllm:time_to_first_token_seconds",
                "Time to first token.",
            ),
            (
                &self.tpot,
                |g| &g.tpot,
                "gen_ai_server_time_per_output_token_seconds",
                "vllm:request_time_per_output_token_seconds",
                "Time per output token of a request: (duration - TTFT) / (tokens - 1).",
            ),
            (
                &self.e2e,
                |g| &g.duration,
                "gen_ai_server_request_duration_seconds",
                "vllm:e2e_request_latency_seconds",
                "End-to-end request latency.",
            ),
        ];
        for (h, of, otel, vllm, help) in hist {
            let _ = writeln!(out, "# HELP {otel} {help}\n# TYPE {otel} histogram");
            for op in [Operation::Chat, Operation::TextCompletion] {
                let labels = format!(
                    "{m},gen_ai_operation_name=\"{}\",gen_ai_provider_name=\"{}\"",
                    op.as_str(),
                    crate::telemetry::PROVIDER
                );
                of(self.gen_ai(op)).write_series(&mut out, otel, &labels);
            }
            h.write(&mut out, vllm, help, &m);
        }
        self.write_thinking(&mut out, &m);
        write_load_gauges(&mut out, loads);
        out
    }

    fn write_thinking(&self, out: &mut String, m: &str) {
        let _ = writeln!(
            out,
            "# HELP r4b_thinking_auto_decisions_total Chat choices in thinking_mode auto, by \
             whether the model opened a think block.\n\
             # TYPE r4b_thinking_auto_decisions_total counter"
        );
        for (decision, c) in [
            ("think", &self.auto_think),
            ("no_think", &self.auto_no_think),
        ] {
            let _ = writeln!(
                out,
                "r4b_thinking_auto_decisions_total{{{m},decision=\"{decision}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP r4b_thinking_budget_closes_total Think blocks closed by the thinking budget.\n\
             # TYPE r4b_thinking_budget_closes_total counter\n\
             r4b_thinking_budget_closes_total{{{m}}} {}",
            self.budget_closes.load(Ordering::Relaxed)
        );
        self.thinking_tokens.write(
            out,
            "r4b_request_thinking_tokens",
            "Tokens inside the think block of a chat choice that thought.",
            m,
        );
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
    loads: &[(String, Result<pb::LoadResponse, tonic::Status>)],
) {
    let ok: Vec<(&String, &pb::LoadResponse)> = loads
        .iter()
        .filter_map(|(u, r)| r.as_ref().ok().map(|l| (u, l)))
        .collect();
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
        m.ttft.observe(0.25);
        m.gen_ai(Operation::Chat).ttft.observe(0.25);
        m.record_thinking(Thinking {
            auto: true,
            thought: true,
            tokens: 7,
            budget_closed: true,
        });
        m.record_thinking(Thinking::default());
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
            "r4b_replica_requests_waiting{replica=\"http://a\"} 2",
            "r4b_replica_kv_blocks_used{replica=\"http://a\"} 25",
            "r4b_replica_up{replica=\"http://a\"} 1",
            "r4b_replica_up{replica=\"http://b\"} 0",
            "gen_ai_server_time_to_first_token_seconds_count{model_name=\"r4b\",gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"r4b\"} 1",
            "gen_ai_server_time_to_first_token_seconds_count{model_name=\"r4b\",gen_ai_operation_name=\"text_completion\",gen_ai_provider_name=\"r4b\"} 0",
            "vllm:time_to_first_token_seconds_count{model_name=\"r4b\"} 1",
            "r4b_thinking_auto_decisions_total{model_name=\"r4b\",decision=\"think\"} 1",
            "r4b_thinking_auto_decisions_total{model_name=\"r4b\",decision=\"no_think\"} 0",
            "r4b_thinking_budget_closes_total{model_name=\"r4b\"} 1",
            "r4b_request_thinking_tokens_sum{model_name=\"r4b\"} 7",
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
