//! The replica's Prometheus metrics (through the `prometheus` crate), served at `/metrics` by
//! whoever runs the coordinator (`r4b coordinator --metrics-port`, and `r4b serve` appends them to
//! its gateway's `/metrics`).
//!
//! Names are vLLM's where vLLM has the same meaning, so its dashboards, production-stack's router,
//! llm-d's endpoint picker and KEDA rules read them unchanged: `vllm:num_requests_waiting`,
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
//! `vllm:prefix_cache_hits_total`, `vllm:num_preemptions_total` and the per-request histograms
//! `vllm:request_{prompt,generation,max_num_generation}_tokens` (1-2-5 buckets up to the
//! context length) and `vllm:request_{queue,prefill,decode,inference}_time_seconds` (vLLM's
//! request-latency buckets). r4b's own: step time and batch tokens, and each rank's forward and
//! collective time per step (`r4b_rank_*{rank}`). Every series has the constant label
//! `model_name`; the only other label is `rank` (at most the tensor-parallel size): no request
//! ids, no prompts.
//!
//! Over OTLP (when the OTLP metrics pipeline of `r4b-telemetry` is on; no-op instruments
//! otherwise): `r4b.engine.requests.waiting|running`, `r4b.engine.kv_cache.usage` (gauges),
//! `r4b.engine.step.duration` and `r4b.rank.forward|collective.duration{rank}` (histograms).

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, Registry,
    TextEncoder,
};
use r4b_proto::v1 as pb;

/// vLLM's request-latency buckets (seconds): queue, prefill, decode, inference, e2e.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Step and per-rank time buckets (seconds): a decode step is milliseconds, a long prefill
/// chunk seconds.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Tokens per step (vLLM's `iteration_tokens` edges).
const BATCH_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// vLLM's `build_1_2_5_buckets(max)`: 1, 2, 5, 10, 20, 50, … up to `max`.
pub fn buckets_1_2_5(max: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exp = 1u64;
    'outer: loop {
        for m in [1, 2, 5] {
            let v = m * exp;
            if v > max {
                break 'outer;
            }
            out.push(v as f64);
        }
        exp = match exp.checked_mul(10) {
            Some(e) => e,
            None => break,
        };
    }
    out
}

/// What one finished request measured (coordinator side).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimes {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub generation_tokens: u32,
    /// The request's `max_new_tokens`.
    pub max_new_tokens: u32,
    /// Arrival to first scheduled step.
    pub queue: Duration,
    /// First scheduled step to first token.
    pub prefill: Duration,
    /// First token to the last.
    pub decode: Duration,
}

/// The replica's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    waiting: IntGauge,
    running: IntGauge,
    kv_usage: Gauge,
    kv_blocks: IntGauge,
    kv_blocks_used: IntGauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    group_restarts: IntCounter,
    rejected: IntCounter,
    step_seconds: Histogram,
    batch_tokens: Histogram,
    rank_forward: HistogramVec,
    rank_collective: HistogramVec,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    max_generation_tokens: Histogram,
    queue_time: Histogram,
    prefill_time: Histogram,
    decode_time: Histogram,
    inference_time: Histogram,
    otel: Otel,
}

/// The instruments exported over OTLP.
#[derive(Clone, Debug)]
struct Otel {
    meter: opentelemetry::metrics::Meter,
    step: opentelemetry::metrics::Histogram<f64>,
    forward: opentelemetry::metrics::Histogram<f64>,
    collective: opentelemetry::metrics::Histogram<f64>,
}

impl Otel {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("r4b-coordinator");
        let h = |name: &'static str, help: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(STEP_BUCKETS.to_vec())
                .build()
        };
        Otel {
            step: h("r4b.engine.step.duration", "Wall time of an engine step."),
            forward: h("r4b.rank.forward.duration", "One rank's time in a step."),
            collective: h(
                "r4b.rank.collective.duration",
                "One rank's time inside collectives in a step.",
            ),
            meter,
        }
    }
}

/// The metrics could not be registered (a name clash: a bug).
#[derive(Debug, thiserror::Error)]
#[error("registering the replica metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// The metrics of a replica serving `model_name` with context length `max_model_len`.
    pub fn new(model_name: &str, max_model_len: usize) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(
            None,
            Some(
                [("model_name".to_string(), model_name.to_string())]
                    .into_iter()
                    .collect(),
            ),
        )?;
        let tokens = buckets_1_2_5(max_model_len as u64);
        let r = &registry;
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            m: T,
        ) -> Result<T, prometheus::Error> {
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .and_then(|h| reg(r, h))
        };
        let rank_hist = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(STEP_BUCKETS.to_vec()),
                &["rank"],
            )
            .and_then(|h| reg(r, h))
        };
        let latency = || REQUEST_LATENCY_BUCKETS.to_vec();
        Ok(Metrics {
            waiting: reg(
                r,
                IntGauge::new(
                    "vllm:num_requests_waiting",
                    "Requests waiting in the queue.",
                )?,
            )?,
            running: reg(
                r,
                IntGauge::new("vllm:num_requests_running", "Requests being generated.")?,
            )?,
            kv_usage: reg(
                r,
                Gauge::new("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).")?,
            )?,
            kv_blocks: reg(
                r,
                IntGauge::new("r4b_engine_kv_blocks", "KV blocks of the replica.")?,
            )?,
            kv_blocks_used: reg(
                r,
                IntGauge::new("r4b_engine_kv_blocks_used", "KV blocks in use.")?,
            )?,
            prefix_queries: reg(
                r,
                IntCounter::new(
                    "vllm:prefix_cache_queries_total",
                    "Prompt tokens looked up in the prefix cache.",
                )?,
            )?,
            prefix_hits: reg(
                r,
                IntCounter::new(
                    "vllm:prefix_cache_hits_total",
                    "Prompt tokens served from the prefix cache.",
                )?,
            )?,
            preemptions: reg(
                r,
                IntCounter::new(
                    "vllm:num_preemptions_total",
                    "Sequences preempted (recomputed later).",
                )?,
            )?,
            group_restarts: reg(
                r,
                IntCounter::new(
                    "r4b_engine_group_restarts_total",
                    "Worker-group restarts after a failure.",
                )?,
            )?,
            rejected: reg(
                r,
                IntCounter::new(
                    "r4b_engine_rejected_sequences_total",
                    "Sequences the workers refused.",
                )?,
            )?,
            step_seconds: hist(
                "r4b_engine_step_duration_seconds",
                "Wall time of an engine step: sent to every rank until the last rank answered.",
                STEP_BUCKETS.to_vec(),
            )?,
            batch_tokens: hist(
                "r4b_engine_batch_tokens",
                "Tokens in one engine step (prefill chunks and decodes).",
                BATCH_TOKEN_BUCKETS.to_vec(),
            )?,
            rank_forward: rank_hist(
                "r4b_rank_forward_seconds",
                "One rank's time in a step (forward and sampling, collectives included).",
            )?,
            rank_collective: rank_hist(
                "r4b_rank_collective_seconds",
                "One rank's time inside collectives (all-reduce, gathers) in a step.",
            )?,
            prompt_tokens: hist(
                "vllm:request_prompt_tokens",
                "Prompt tokens of a finished request.",
                tokens.clone(),
            )?,
            generation_tokens: hist(
                "vllm:request_generation_tokens",
                "Tokens generated by a finished request.",
                tokens.clone(),
            )?,
            max_generation_tokens: hist(
                "vllm:request_max_num_generation_tokens",
                "The max_tokens a finished request asked for.",
                tokens,
            )?,
            queue_time: hist(
                "vllm:request_queue_time_seconds",
                "Time a request waited before its first step.",
                latency(),
            )?,
            prefill_time: hist(
                "vllm:request_prefill_time_seconds",
                "From a request's first step to its first token.",
                latency(),
            )?,
            decode_time: hist(
                "vllm:request_decode_time_seconds",
                "From a request's first token to its last.",
                latency(),
            )?,
            inference_time: hist(
                "vllm:request_inference_time_seconds",
                "From a request's first step to its last token.",
                latency(),
            )?,
            otel: Otel::new(),
            registry,
        })
    }

    /// Records one successful step: its wall time, tokens, and every rank's
    /// `(forward, collective)` time.
    pub fn observe_step(&self, wall: Duration, tokens: usize, ranks: &[(Duration, Duration)]) {
        self.step_seconds.observe(wall.as_secs_f64());
        self.batch_tokens.observe(tokens as f64);
        self.otel.step.record(wall.as_secs_f64(), &[]);
        for (rank, (fwd, coll)) in ranks.iter().enumerate() {
            let attrs = [opentelemetry::KeyValue::new("rank", rank as i64)];
            self.otel.forward.record(fwd.as_secs_f64(), &attrs);
            self.otel.collective.record(coll.as_secs_f64(), &attrs);
            let label = rank.to_string();
            self.rank_forward
                .with_label_values(&[label.as_str()])
                .observe(fwd.as_secs_f64());
            self.rank_collective
                .with_label_values(&[label.as_str()])
                .observe(coll.as_secs_f64());
        }
    }

    /// Exports the load gauges over OTLP, read from `load` at each collection.
    pub fn export_load(&self, load: impl Fn() -> pb::LoadResponse + Send + Sync + 'static) {
        let load = std::sync::Arc::new(load);
        let l = load.clone();
        self.otel
            .meter
            .u64_observable_gauge("r4b.engine.requests.waiting")
            .with_description("Requests waiting in the queue.")
            .with_callback(move |o| o.observe(u64::from(l().waiting), &[]))
            .build();
        let l = load.clone();
        self.otel
            .meter
            .u64_observable_gauge("r4b.engine.requests.running")
            .with_description("Requests being generated.")
            .with_callback(move |o| o.observe(u64::from(l().running), &[]))
            .build();
        self.otel
            .meter
            .f64_observable_gauge("r4b.engine.kv_cache.usage")
            .with_unit("1")
            .with_description("KV-cache usage (1 = full).")
            .with_callback(move |o| {
                let l = load();
                if l.kv_blocks_total > 0 {
                    o.observe(
                        f64::from(l.kv_blocks_used) / f64::from(l.kv_blocks_total),
                        &[],
                    );
                }
            })
            .build();
    }

    /// Records one finished request.
    pub fn observe_request(&self, t: &RequestTimes) {
        self.prompt_tokens.observe(f64::from(t.prompt_tokens));
        self.generation_tokens
            .observe(f64::from(t.generation_tokens));
        self.max_generation_tokens
            .observe(f64::from(t.max_new_tokens));
        self.queue_time.observe(t.queue.as_secs_f64());
        self.prefill_time.observe(t.prefill.as_secs_f64());
        self.decode_time.observe(t.decode.as_secs_f64());
        self.inference_time
            .observe((t.prefill + t.decode).as_secs_f64());
    }

    /// The Prometheus text, gauges and counters taken from `load` (the engine's latest stats).
    pub fn render(&self, load: &pb::LoadResponse) -> String {
        self.waiting.set(i64::from(load.waiting));
        self.running.set(i64::from(load.running));
        self.kv_blocks.set(i64::from(load.kv_blocks_total));
        self.kv_blocks_used.set(i64::from(load.kv_blocks_used));
        self.kv_usage.set(if load.kv_blocks_total > 0 {
            f64::from(load.kv_blocks_used) / f64::from(load.kv_blocks_total)
        } else {
            0.0
        });
        // The engine keeps these totals; the counters follow them (they never go down).
        for (c, total) in [
            (&self.prefix_queries, load.prefix_query_tokens),
            (&self.prefix_hits, load.prefix_hit_tokens),
            (&self.preemptions, load.preemptions),
            (&self.group_restarts, load.group_restarts),
            (&self.rejected, load.rejected_seqs),
        ] {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        }
        let mut out = Vec::new();
        // Encoding into memory fails only on a metric family the registry built wrong.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding the replica metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_1_2_5_buckets() {
        assert_eq!(
            buckets_1_2_5(1000),
            [1., 2., 5., 10., 20., 50., 100., 200., 500., 1000.]
        );
        assert_eq!(buckets_1_2_5(4), [1., 2.]);
    }

    #[test]
    fn render_has_the_vllm_names_and_per_rank_series() {
        let m = Metrics::new("r4b", 4096).unwrap();
        let ms = Duration::from_millis;
        m.observe_step(ms(10), 40, &[(ms(8), ms(2)), (ms(9), ms(3))]);
        m.observe_request(&RequestTimes {
            prompt_tokens: 12,
            generation_tokens: 5,
            max_new_tokens: 16,
            queue: ms(100),
            prefill: ms(200),
            decode: ms(400),
        });
        let load = pb::LoadResponse {
            waiting: 2,
            running: 3,
            kv_blocks_used: 25,
            kv_blocks_total: 100,
            prefix_hit_tokens: 30,
            prefix_query_tokens: 40,
            preemptions: 1,
            ..Default::default()
        };
        let text = m.render(&load);
        for line in [
            "vllm:num_requests_waiting{model_name=\"r4b\"} 2",
            "vllm:num_requests_running{model_name=\"r4b\"} 3",
            "vllm:kv_cache_usage_perc{model_name=\"r4b\"} 0.25",
            "vllm:prefix_cache_hits_total{model_name=\"r4b\"} 30",
            "vllm:prefix_cache_queries_total{model_name=\"r4b\"} 40",
            "vllm:num_preemptions_total{model_name=\"r4b\"} 1",
            "vllm:request_prompt_tokens_bucket{model_name=\"r4b\",le=\"10\"} 0",
            "vllm:request_prompt_tokens_bucket{model_name=\"r4b\",le=\"20\"} 1",
            "vllm:request_queue_time_seconds_sum{model_name=\"r4b\"} 0.1",
            "vllm:request_inference_time_seconds_sum{model_name=\"r4b\"} 0.6",
            "r4b_rank_collective_seconds_sum{rank=\"1\",model_name=\"r4b\"} 0.003",
            "r4b_rank_forward_seconds_count{rank=\"0\",model_name=\"r4b\"} 1",
            "r4b_engine_batch_tokens_sum{model_name=\"r4b\"} 40",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Counters follow the engine's totals, once.
        let again = m.render(&load);
        assert!(again.contains("vllm:prefix_cache_hits_total{model_name=\"r4b\"} 30"));
    }
}
