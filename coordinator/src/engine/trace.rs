//! The coordinator's spans of one traced request, children of its `generate` span (which is
//! parented to the gateway's context from the gRPC metadata):
//!
//! - `queue`: from admission to the first step that runs the request;
//! - `prefill chunk`: one per prefill chunk, from sending the step to the last rank's answer;
//! - `decode step`: sampled, the 1st decode step and then every [`DECODE_SPAN_EVERY`]th (a span
//!   per token would be too many).
//!
//! Each chunk span's context goes to every rank in the chunk's `SeqStep.trace_context`; each rank
//! parents its own `rank step` span to it. An untraced request (tracing off, or not sampled) has
//! no [`ReqTrace`] and costs nothing per step.

use tracing::Span;

use crate::scheduler::PlannedChunk;
use crate::workers::StepTiming;

/// One decode step in this many gets a span (plus the first).
pub(super) const DECODE_SPAN_EVERY: u32 = 32;

/// The spans of one traced request.
#[derive(Debug)]
pub(super) struct ReqTrace {
    span: Span,
    queue: Option<Span>,
    decodes: u32,
}

impl ReqTrace {
    /// `None` when `span` is not exported (tracing off or the request not sampled).
    pub(super) fn start(span: Span) -> Option<Self> {
        if r4b_telemetry::encode(&span).is_empty() {
            return None;
        }
        let queue = tracing::info_span!(parent: &span, "queue");
        Some(Self {
            span,
            queue: Some(queue),
            decodes: 0,
        })
    }

    /// The span of `chunk` in step `step_id` of `batch` sequences, if this chunk gets one.
    /// Ends the `queue` span.
    pub(super) fn chunk(
        &mut self,
        chunk: &PlannedChunk,
        step_id: u64,
        batch: usize,
    ) -> Option<Span> {
        self.queue = None;
        let span = if chunk.start_pos < chunk.prompt_len {
            tracing::info_span!(
                parent: &self.span,
                "prefill chunk",
                step_id,
                batch,
                start_pos = chunk.start_pos,
                tokens = chunk.tokens.len(),
                images = chunk.encode_images.len(),
                wall_ms = tracing::field::Empty,
                forward_ms = tracing::field::Empty,
                collective_ms = tracing::field::Empty,
            )
        } else {
            self.decodes += 1;
            if self.decodes != 1 && !self.decodes.is_multiple_of(DECODE_SPAN_EVERY) {
                return None;
            }
            tracing::info_span!(
                parent: &self.span,
                "decode step",
                step_id,
                batch,
                decode_index = self.decodes,
                position = chunk.start_pos,
                wall_ms = tracing::field::Empty,
                forward_ms = tracing::field::Empty,
                collective_ms = tracing::field::Empty,
            )
        };
        Some(span)
    }
}

/// Records a finished step's times (rank 0's forward and collective) on its chunk spans.
pub(super) fn record_step(spans: &[Span], timing: &StepTiming) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    for s in spans {
        s.record("wall_ms", ms(timing.wall));
        s.record("forward_ms", ms(timing.forward));
        s.record("collective_ms", ms(timing.collective));
    }
}
