//! Prometheus metrics (the text that `health` serves at `/metrics`), kept in a `prometheus`
//! crate registry; every series but the per-endpoint and per-replica ones has the label
//! `model_name` (the served model name).
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

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
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

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    model: String,
    requests: IntCounterVec,
    finished: IntCounterVec,
    prompt_tokens: [IntCounter; 2],
    generation_tokens: [IntCounter; 2],
    running: IntGauge,
    /// Time to first token (vLLM's name).
    ttft: Histogram,
    /// Time between tokens (per streamed message, divided by its tokens; vLLM's inter-token
    /// latency).
    pub itl: Histogram,
    /// Time per output token of one request: (duration − TTFT) / (tokens − 1), once per request
    /// with at least two tokens (the OTel GenAI and vLLM definition).
    tpot: Histogram,
    /// Request duration.
    e2e: Histogram,
    gen_ai_ttft: HistogramVec,
    gen_ai_tpot: HistogramVec,
    gen_ai_duration: HistogramVec,
    auto_decisions: IntCounterVec,
    budget_closes: IntCounter,
    thinking_tokens: Histogram,
    otel: OtelGenAi,
}

/// Decrements the running-requests gauge when dropped.
#[derive(Debug)]
pub struct RunningGuard(Arc<Metrics>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.dec();
    }
}

/// The metrics could not be registered (a name clash: a bug).
#[derive(Debug, thiserror::Error)]
#[error("registering the gateway metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

fn register<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: T,
) -> Result<T, prometheus::Error> {
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

impl Metrics {
    /// The metrics of a gateway serving `model` (the `model_name` label).
    pub fn new(model: &str) -> Result<Self, MetricsError> {
        let r = Registry::new();
        let m = [model];
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let v = register(
                &r,
                IntCounterVec::new(Opts::new(name, help), &["model_name"])?,
            )?;
            Ok(v.with_label_values(&m))
        };
        let hist = |name: &str, help: &str, b: &[f64]| -> Result<Histogram, prometheus::Error> {
            let opts = HistogramOpts::new(name, help).buckets(b.to_vec());
            let v = register(&r, HistogramVec::new(opts, &["model_name"])?)?;
            Ok(v.with_label_values(&m))
        };
        let gen_ai =
            |name: &str, help: &str, b: &[f64]| -> Result<HistogramVec, prometheus::Error> {
                let opts = HistogramOpts::new(name, help).buckets(b.to_vec());
                let labels = [
                    "model_name",
                    "gen_ai_operation_name",
                    "gen_ai_provider_name",
                ];
                let v = register(&r, HistogramVec::new(opts, &labels)?)?;
                // Both operations' series exist from the start.
                for op in [Operation::Chat, Operation::TextCompletion] {
                    v.with_label_values(&[model, op.as_str(), crate::telemetry::PROVIDER]);
                }
                Ok(v)
            };
        const TTFT: &str = "Time to first token.";
        const TPOT: &str = "Time per output token of a request: (duration - TTFT) / (tokens - 1).";
        const E2E: &str = "End-to-end request latency.";
        let metrics = Metrics {
            requests: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "r4b_gateway_http_requests_total",
                        "HTTP responses by endpoint and status.",
                    ),
                    &["endpoint", "status"],
                )?,
            )?,
            finished: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "vllm:request_success_total",
                        "Finished generations by finish reason.",
                    ),
                    &["model_name", "finished_reason"],
                )?,
            )?,
            prompt_tokens: [
                counter(
                    "r4b_gateway_prompt_tokens_total",
                    "Prompt tokens processed.",
                )?,
                counter("vllm:prompt_tokens_total", "Prompt tokens processed.")?,
            ],
            generation_tokens: [
                counter("r4b_gateway_generation_tokens_total", "Tokens generated.")?,
                counter("vllm:generation_tokens_total", "Tokens generated.")?,
            ],
            running: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "r4b_gateway_requests_running",
                        "Generations in flight at this gateway.",
                    ),
                    &["model_name"],
                )?,
            )?
            .with_label_values(&m),
            ttft: hist("vllm:time_to_first_token_seconds", TTFT, TTFT_BUCKETS)?,
            itl: hist(
                "vllm:inter_token_latency_seconds",
                "Time between output tokens (per streamed message).",
                ITL_BUCKETS,
            )?,
            tpot: hist(
                "vllm:request_time_per_output_token_seconds",
                TPOT,
                ITL_BUCKETS,
            )?,
            e2e: hist("vllm:e2e_request_latency_seconds", E2E, E2E_BUCKETS)?,
            gen_ai_ttft: gen_ai(
                "gen_ai_server_time_to_first_token_seconds",
                TTFT,
                TTFT_BUCKETS,
            )?,
            gen_ai_tpot: gen_ai(
                "gen_ai_server_time_per_output_token_seconds",
                TPOT,
                ITL_BUCKETS,
            )?,
            gen_ai_duration: gen_ai("gen_ai_server_request_duration_seconds", E2E, E2E_BUCKETS)?,
            auto_decisions: {
                let v = register(
                    &r,
                    IntCounterVec::new(
                        Opts::new(
                            "r4b_thinking_auto_decisions_total",
                            "Chat choices in thinking_mode auto, by whether the model opened a think block.",
                        ),
                        &["model_name", "decision"],
                    )?,
                )?;
                for d in ["think", "no_think"] {
                    v.with_label_values(&[model, d]);
                }
                v
            },
            budget_closes: counter(
                "r4b_thinking_budget_closes_total",
                "Think blocks closed by the thinking budget.",
            )?,
            thinking_tokens: hist(
                "r4b_request_thinking_tokens",
                "Tokens inside the think block of a chat choice that thought.",
                THINKING_TOKEN_BUCKETS,
            )?,
            otel: OtelGenAi::new(),
            model: model.to_string(),
            registry: r,
        };
        Ok(metrics)
    }

    fn gen_ai_labels(&self, op: Operation) -> [&str; 3] {
        [&self.model, op.as_str(), crate::telemetry::PROVIDER]
    }

    /// Records a request's time to first token (`seconds`): vLLM's and GenAI's histograms, and
    /// over OTLP when it is on.
    pub fn record_ttft(&self, op: Operation, seconds: f64) {
        self.ttft.observe(seconds);
        self.gen_ai_ttft
            .with_label_values(&self.gen_ai_labels(op))
            .observe(seconds);
        self.otel.ttft.record(seconds, &gen_ai_attributes(op));
    }

    /// Records a request's time per output token.
    pub fn record_tpot(&self, op: Operation, seconds: f64) {
        self.tpot.observe(seconds);
        self.gen_ai_tpot
            .with_label_values(&self.gen_ai_labels(op))
            .observe(seconds);
        self.otel.tpot.record(seconds, &gen_ai_attributes(op));
    }

    /// Records a request's duration.
    pub fn record_duration(&self, op: Operation, seconds: f64) {
        self.e2e.observe(seconds);
        self.gen_ai_duration
            .with_label_values(&self.gen_ai_labels(op))
            .observe(seconds);
        self.otel.duration.record(seconds, &gen_ai_attributes(op));
    }

    /// Records one finished chat choice's thinking.
    pub fn record_thinking(&self, t: Thinking) {
        if t.auto {
            let d = if t.thought { "think" } else { "no_think" };
            self.auto_decisions
                .with_label_values(&[self.model.as_str(), d])
                .inc();
        }
        if t.thought {
            self.thinking_tokens.observe(f64::from(t.tokens));
        }
        if t.budget_closed {
            self.budget_closes.inc();
        }
    }

    /// Counts one HTTP response (`endpoint`: the matched route or `unmatched`).
    pub fn record_request(&self, endpoint: &str, status: u16) {
        self.requests
            .with_label_values(&[endpoint, status.to_string().as_str()])
            .inc();
    }

    /// Counts one finished choice by finish reason.
    pub fn record_finish(&self, reason: &'static str) {
        self.finished
            .with_label_values(&[self.model.as_str(), reason])
            .inc();
    }

    /// Generations in flight at this gateway.
    pub fn running(&self) -> i64 {
        self.running.get()
    }

    /// Marks a generation as running until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> RunningGuard {
        self.running.inc();
        RunningGuard(self.clone())
    }

    /// Adds prompt tokens.
    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.iter().for_each(|c| c.inc_by(n));
    }

    /// Adds generated tokens.
    pub fn add_generation_tokens(&self, n: u64) {
        self.generation_tokens.iter().for_each(|c| c.inc_by(n));
    }

    /// The Prometheus text, with each replica's load (`loads`, from its Load RPC) as this gateway
    /// sees it.
    pub fn render(&self, loads: &[(String, Result<pb::LoadResponse, tonic::Status>)]) -> String {
        let mut families = self.registry.gather();
        match replica_families(loads) {
            Ok(f) => families.extend(f),
            Err(e) => tracing::error!("the per-replica metrics: {e}"),
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!("encoding the gateway metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One per-replica gauge of a Load answer.
type LoadField = fn(&pb::LoadResponse) -> u32;

/// The per-replica gauges of one scrape (a registry of their own: replicas come and go).
fn replica_families(
    loads: &[(String, Result<pb::LoadResponse, tonic::Status>)],
) -> Result<Vec<prometheus::proto::MetricFamily>, prometheus::Error> {
    let r = Registry::new();
    let gauge = |name: &str, help: &str| {
        register(&r, IntGaugeVec::new(Opts::new(name, help), &["replica"])?)
    };
    let fields: [(IntGaugeVec, LoadField); 4] = [
        (
            gauge(
                "r4b_replica_requests_waiting",
                "Requests waiting at one replica.",
            )?,
            |l| l.waiting,
        ),
        (
            gauge(
                "r4b_replica_requests_running",
                "Requests running at one replica.",
            )?,
            |l| l.running,
        ),
        (
            gauge(
                "r4b_replica_kv_blocks_used",
                "KV blocks in use at one replica.",
            )?,
            |l| l.kv_blocks_used,
        ),
        (
            gauge("r4b_replica_kv_blocks", "KV blocks at one replica.")?,
            |l| l.kv_blocks_total,
        ),
    ];
    let up = gauge("r4b_replica_up", "Whether the replica answered Load.")?;
    for (url, load) in loads {
        up.with_label_values(&[url.as_str()])
            .set(i64::from(load.is_ok()));
        if let Ok(l) = load {
            for (g, field) in &fields {
                g.with_label_values(&[url.as_str()])
                    .set(i64::from(field(l)));
            }
        }
    }
    Ok(r.gather())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_vllm_aliases_gen_ai_labels_thinking_and_replica_gauges() {
        let m = Arc::new(Metrics::new("r4b").unwrap());
        m.record_request("/v1/chat/completions", 200);
        m.add_prompt_tokens(12);
        m.add_generation_tokens(5);
        m.record_finish("stop");
        m.record_ttft(Operation::Chat, 0.25);
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
                    ..Default::default()
                }),
            ),
            (
                "http://b".to_string(),
                Err(tonic::Status::unavailable("down")),
            ),
        ];
        let text = m.render(&loads);
        for line in [
            "r4b_gateway_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
            "vllm:prompt_tokens_total{model_name=\"r4b\"} 12",
            "vllm:generation_tokens_total{model_name=\"r4b\"} 5",
            "r4b_gateway_generation_tokens_total{model_name=\"r4b\"} 5",
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"r4b\"} 1",
            "r4b_gateway_requests_running{model_name=\"r4b\"} 1",
            "r4b_replica_requests_waiting{replica=\"http://a\"} 2",
            "r4b_replica_kv_blocks_used{replica=\"http://a\"} 25",
            "r4b_replica_up{replica=\"http://a\"} 1",
            "r4b_replica_up{replica=\"http://b\"} 0",
            "gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"r4b\",model_name=\"r4b\"} 1",
            "gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name=\"text_completion\",gen_ai_provider_name=\"r4b\",model_name=\"r4b\"} 0",
            "vllm:time_to_first_token_seconds_count{model_name=\"r4b\"} 1",
            "vllm:time_to_first_token_seconds_bucket{model_name=\"r4b\",le=\"0.1\"} 0",
            "vllm:time_to_first_token_seconds_bucket{model_name=\"r4b\",le=\"0.25\"} 1",
            "r4b_thinking_auto_decisions_total{decision=\"think\",model_name=\"r4b\"} 1",
            "r4b_thinking_auto_decisions_total{decision=\"no_think\",model_name=\"r4b\"} 0",
            "r4b_thinking_budget_closes_total{model_name=\"r4b\"} 1",
            "r4b_request_thinking_tokens_sum{model_name=\"r4b\"} 7",
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
            .render(&[])
            .contains("r4b_gateway_requests_running{model_name=\"r4b\"} 0"));
    }
}
