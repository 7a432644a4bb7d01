//! The scheduler's public data types: configuration, requests, plans, events, statistics.

use std::fmt;

/// Coordinator-wide identity of one generation (the proto's `seq_id`).
///
/// Chosen by the runtime; must be unique among the sequences the scheduler currently holds
/// (a duplicate is refused by [`Scheduler::submit`](super::Scheduler::submit)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// Scheduler limits. Build it with [`SchedulerConfig::new`] to get the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV blocks in the cache (all ranks allocate the same number).
    pub num_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences running at once (the batch cap). Default 256.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks + decodes) in one step. Default 2048.
    pub max_batched_tokens: usize,
    /// Most sequences waiting for admission beyond the free running slots (the ones the next
    /// step admits anyway), preempted ones included. Default 1024.
    pub max_queue: usize,
    /// Reuse KV blocks of identical prompt prefixes. Default true.
    pub enable_prefix_caching: bool,
    /// Longest prompt + output, in tokens.
    pub max_model_len: usize,
}

impl SchedulerConfig {
    /// Default batch cap.
    pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
    /// Default token budget per step.
    pub const DEFAULT_MAX_BATCHED_TOKENS: usize = 2048;
    /// Default waiting-queue capacity.
    pub const DEFAULT_MAX_QUEUE: usize = 1024;

    /// A configuration for `num_blocks` blocks of `block_size` tokens and a model length, with the
    /// other limits at their defaults.
    pub fn new(num_blocks: usize, block_size: usize, max_model_len: usize) -> Self {
        Self {
            num_blocks,
            block_size,
            max_num_seqs: Self::DEFAULT_MAX_NUM_SEQS,
            max_batched_tokens: Self::DEFAULT_MAX_BATCHED_TOKENS,
            max_queue: Self::DEFAULT_MAX_QUEUE,
            enable_prefix_caching: true,
            max_model_len,
        }
    }

    /// Checks the limits against each other.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let zero = [
            (self.num_blocks, "num_blocks"),
            (self.block_size, "block_size"),
            (self.max_num_seqs, "max_num_seqs"),
            (self.max_batched_tokens, "max_batched_tokens"),
            (self.max_queue, "max_queue"),
            (self.max_model_len, "max_model_len"),
        ];
        if let Some((_, field)) = zero.iter().find(|(v, _)| *v == 0) {
            return Err(ConfigError::Zero { field });
        }
        if u32::try_from(self.num_blocks).is_err() {
            return Err(ConfigError::TooManyBlocks {
                num_blocks: self.num_blocks,
            });
        }
        let capacity = self.num_blocks.saturating_mul(self.block_size);
        if capacity < self.max_model_len {
            return Err(ConfigError::KvTooSmall {
                capacity,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }
}

/// Why a [`SchedulerConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A limit that must be at least 1 is 0.
    #[error("scheduler config: {field} must be at least 1")]
    Zero {
        /// The field's name.
        field: &'static str,
    },
    /// Block ids travel as `u32`.
    #[error("scheduler config: num_blocks = {num_blocks} exceeds u32::MAX")]
    TooManyBlocks {
        /// The configured block count.
        num_blocks: usize,
    },
    /// One sequence of `max_model_len` tokens must fit in the cache on its own, or preemption
    /// could not always make progress.
    #[error(
        "scheduler config: KV cache holds {capacity} tokens, fewer than max_model_len = {max_model_len}"
    )]
    KvTooSmall {
        /// `num_blocks * block_size`.
        capacity: usize,
        /// The configured model length.
        max_model_len: usize,
    },
}

/// One image's `<image>` tokens inside a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    /// Index in `prompt_ids` of the image's first `<image>` token.
    pub start: usize,
    /// Number of `<image>` tokens the image expands to.
    pub len: usize,
    /// Content digest (the proto's SHA-256 `Image.digest`): the image's prefix-cache identity.
    pub digest: [u8; 32],
    /// What encoding the image (vision tower + projector) costs, in tokens of a step's budget.
    pub encode_cost: usize,
}

/// When generation ends, and the thinking budget (the proto's `StoppingParams`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stopping {
    /// Most tokens to generate, forced tokens included. 0 scores the prompt only: the sequence
    /// ends (`Length`, no token) when its prefill is done.
    pub max_new_tokens: usize,
    /// Token ids that end generation; the stop token itself is reported.
    pub stop_token_ids: Vec<u32>,
    /// A stop token ends generation only once at least this many tokens were generated before it.
    pub min_new_tokens: usize,
    /// Never stop on `stop_token_ids`.
    pub ignore_eos: bool,
    /// Most tokens generated inside think blocks (all blocks together) before the scheduler
    /// closes the open block itself. `None` = no budget.
    pub max_thinking_tokens: Option<usize>,
    /// Token that opens a think block (`<think>`).
    pub think_open_id: Option<u32>,
    /// Token that closes a think block (`</think>`).
    pub think_close_id: Option<u32>,
    /// Tokens the scheduler appends to close a block when the budget is spent
    /// (e.g. the ids of `"\n</think>\n\n"`). Required when `max_thinking_tokens` is set.
    pub think_close_ids: Vec<u32>,
    /// The prompt already opened a think block.
    pub think_open_in_prompt: bool,
}

/// A generation request as the scheduler sees it: token ids, image spans, stopping rules.
///
/// Sampling parameters and image pixels stay with the runtime, which attaches them to the
/// sequence's chunks whose [`PlannedChunk::first_chunk`] is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqRequest {
    /// The sequence's id.
    pub id: SeqId,
    /// Prompt token ids, every `<image>` already expanded.
    pub prompt_ids: Vec<u32>,
    /// The prompt's images in order; spans must lie inside the prompt and not overlap.
    pub images: Vec<ImageSpan>,
    /// Stopping rules.
    pub stopping: Stopping,
    /// Every prompt position must be computed (prompt log-probabilities): no prefix-cache hit
    /// at admission.
    pub score_prompt: bool,
}

/// Why [`Scheduler::submit`](super::Scheduler::submit) refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The waiting queue is at `max_queue`; the request is handed back (answer 429, retry later).
    /// Boxed to keep `Result<(), SubmitError>` small.
    #[error("waiting queue is full")]
    Full(Box<SeqRequest>),
    /// The prompt leaves no room for one generated token within `max_model_len`.
    #[error("prompt has {len} tokens, at most {max} are allowed")]
    TooLong {
        /// Prompt length.
        len: usize,
        /// Longest prompt accepted (`max_model_len - 1`).
        max: usize,
    },
    /// The prompt has no tokens.
    #[error("prompt is empty")]
    Empty,
    /// A sequence with this id is already waiting or running.
    #[error("{0} is already scheduled")]
    DuplicateId(SeqId),
    /// An image span lies outside the prompt or overlaps the previous one.
    #[error("image span {index} is outside the prompt or overlaps another")]
    BadImageSpan {
        /// Index of the span in `images`.
        index: usize,
    },
    /// The stopping rules cannot be honoured.
    #[error("invalid stopping parameters: {0}")]
    BadStopping(&'static str),
}

/// One step for every rank: what to run and which sequences to forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences in this step, in batch order (decodes first, then prefill chunks).
    pub chunks: Vec<PlannedChunk>,
    /// Sequences that finished, were aborted or were preempted since the previous plan and whose
    /// state the workers may hold: drop their image rows and sampling state (before running
    /// `chunks`).
    pub release: Vec<SeqId>,
}

/// One sequence's part of a step (the proto's `SeqStep`, minus what the runtime attaches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    /// The sequence.
    pub seq_id: SeqId,
    /// Tokens to run: a prefill chunk, one decode token, or a decode token plus forced tokens.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` (tokens of this sequence already in the KV cache).
    pub start_pos: usize,
    /// The sequence's KV blocks, covering `start_pos + tokens.len()` positions.
    pub block_table: Vec<u32>,
    /// Original prompt length (tokens before it are prompt, after it output), for penalties
    /// and seeds; unchanged by preemption.
    pub prompt_len: usize,
    /// Sample a token after this chunk (the last chunk of a prefill, or a decode).
    pub sample: bool,
    /// First chunk since (re)admission: the runtime attaches images, sampling parameters and
    /// `history`.
    pub first_chunk: bool,
    /// Images of the sequence (indexes into its `images`) the workers encode in this step,
    /// before running the chunk; they hold their rows until the sequence is released. Images
    /// are encoded in order, each once per admission, when a chunk is about to reach them;
    /// images wholly inside a prefix-cache hit are never sent.
    pub encode_images: std::ops::Range<usize>,
    /// Rows of the images the workers hold for this sequence (those sent since its latest
    /// admission, in order) that come before `start_pos`: where the chunk's `<image>` rows start.
    pub image_row_offset: usize,
    /// When `first_chunk`: every token before `start_pos` (a prefix-cache hit, or what is already
    /// recomputed), for penalties. Empty otherwise.
    pub history: Vec<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Finish {
    /// `max_new_tokens` or `max_model_len` reached.
    Length,
    /// A stop token was generated.
    Stop,
}

/// What one step produced for one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqEvent {
    /// The sequence.
    pub seq_id: SeqId,
    /// New tokens in order, each with `forced` (appended by the thinking budget, not sampled).
    pub tokens: Vec<(u32, bool)>,
    /// Set when the sequence ended with this event; it is then forgotten.
    pub finish: Option<Finish>,
    /// On the sequence's first event only: prompt tokens served from the prefix cache at its
    /// first admission (the proto's `cached_tokens`).
    pub cached_tokens: Option<usize>,
}

/// Counters and gauges of the scheduler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences waiting for admission (preempted ones included).
    pub waiting: usize,
    /// Sequences admitted and not finished.
    pub running: usize,
    /// Blocks held by at least one sequence.
    pub blocks_used: usize,
    /// Blocks held by none but kept in the prefix cache (evictable).
    pub blocks_cached: usize,
    /// Blocks held by none and not cached.
    pub blocks_free: usize,
    /// All blocks (`used + cached + free`).
    pub blocks_total: usize,
    /// Prompt tokens served from the prefix cache, summed over admissions.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, summed over admissions.
    pub prefix_query_tokens: u64,
    /// Preemptions so far.
    pub preemptions: u64,
}

/// A full view of the scheduler's state, for tests and debugging (`O(blocks + tokens)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerSnapshot {
    /// Every block, indexed by block id.
    pub blocks: Vec<BlockSnapshot>,
    /// Every sequence held, waiting ones included.
    pub seqs: Vec<SeqSnapshot>,
}

/// One block in a [`SchedulerSnapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSnapshot {
    /// Sequences holding the block.
    pub ref_count: u32,
    /// The block's content is registered in the prefix cache.
    pub cached: bool,
}

/// One sequence in a [`SchedulerSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSnapshot {
    /// The sequence.
    pub id: SeqId,
    /// Admitted (else waiting).
    pub running: bool,
    /// Prompt and output tokens so far.
    pub tokens: Vec<u32>,
    /// Original prompt length.
    pub prompt_len: usize,
    /// Tokens whose KV is computed.
    pub kv_len: usize,
    /// Blocks held, in position order.
    pub block_table: Vec<u32>,
}
