//! A rank's spans of one step. The step stream carries many requests, so trace context travels
//! per sequence (`SeqStep.trace_context`, set by the coordinator on prefill chunks and sampled
//! decode steps only): for each traced sequence this rank opens a `rank step` span, a child of
//! the coordinator's chunk span, and records the whole step's forward and collective times on it.
//! The `vision encode` of a traced sequence's images is a child of its `rank step`. A step with no
//! traced sequence creates no span.

use r4b_proto::v1 as pb;
use tracing::Span;

/// The `rank step` spans of one step, by sequence id.
#[derive(Debug, Default)]
pub struct StepSpans {
    spans: Vec<(u64, Span)>,
}

impl StepSpans {
    /// Opens a span for each traced sequence of `req` on rank `rank`.
    pub fn open(req: &pb::StepRequest, rank: usize) -> Self {
        let spans = req
            .seqs
            .iter()
            .filter(|s| !s.trace_context.is_empty())
            .map(|s| {
                let span = tracing::info_span!(
                    "rank step",
                    rank,
                    step_id = req.step_id,
                    batch = req.seqs.len(),
                    tokens = s.tokens.len(),
                    images = s.images.len(),
                    forward_ms = tracing::field::Empty,
                    collective_ms = tracing::field::Empty,
                    compute_ms = tracing::field::Empty,
                    error = tracing::field::Empty,
                );
                r4b_telemetry::set_parent(&span, r4b_telemetry::decode(&s.trace_context));
                (s.seq_id, span)
            })
            .collect();
        Self { spans }
    }

    /// Runs `f` inside the span of sequence `seq_id` (directly when it has none).
    pub fn in_scope<T>(&self, seq_id: u64, f: impl FnOnce() -> T) -> T {
        match self.spans.iter().find(|(id, _)| *id == seq_id) {
            Some((_, span)) => span.in_scope(f),
            None => f(),
        }
    }

    /// Records the step's outcome on every span and ends them.
    pub fn finish<E: std::fmt::Display>(self, resp: &Result<pb::StepResponse, E>) {
        let ms = |ns: u64| ns as f64 / 1e6;
        for (_, span) in &self.spans {
            match resp {
                Ok(r) => {
                    span.record("forward_ms", ms(r.forward_ns));
                    span.record("collective_ms", ms(r.collective_ns));
                    span.record(
                        "compute_ms",
                        ms(r.forward_ns.saturating_sub(r.collective_ns)),
                    );
                }
                Err(e) => {
                    span.record("error", tracing::field::display(e));
                }
            }
        }
    }
}
