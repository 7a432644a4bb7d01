//! The continuous-batching scheduler and paged-KV block manager of one replica.
//!
//! # Design
//!
//! [`Scheduler`] is a synchronous state machine owned by one actor task: the runtime calls
//! [`submit`](Scheduler::submit) and [`abort`](Scheduler::abort) as requests come and go, and
//! drives steps with [`schedule`](Scheduler::schedule) → run the [`StepPlan`] on every rank →
//! [`on_step_done`](Scheduler::on_step_done) with rank 0's sampled tokens. At most one plan is
//! outstanding: `schedule` returns `None` until the previous plan's `on_step_done`.
//!
//! **Policy (vLLM style).** Each step has a budget of `max_batched_tokens` tokens:
//! 1. every running sequence that is decoding gets its pending tokens (one sampled token, or that
//!    token plus forced think-close tokens), oldest admission first;
//! 2. running sequences that are still prefilling get prompt chunks from what is left;
//! 3. waiting sequences are admitted in FIFO order (at most `max_num_seqs` running) while the
//!    budget and free blocks allow, unless this step preempted. The last chunk is cut to the
//!    budget, so a long prompt is prefilled over several steps.
//!
//! **KV blocks.** A sequence holds `ceil(kv_len / block_size)` blocks, allocated as its chunks
//! are planned. Full computed blocks are registered in the prefix cache under a hash chained over
//! the block's tokens (image tokens contribute their image digest and index); an admission reuses
//! the longest cached run of leading blocks, always leaving the last prompt token to compute.
//! Released blocks with a hash stay cached until reused or evicted (least recently released
//! first). Leases are explicit: only the block manager creates or consumes them.
//!
//! **Preemption by recompute.** When a running sequence needs blocks and none are left (after
//! eviction), the most recently admitted running sequence gives all its blocks back, leaves this
//! step's plan, goes to the front of the waiting queue and is named in `release`; it is later
//! re-prefilled from its prompt plus its output so far (`first_chunk` again, with `history`).
//!
//! **Lifecycle.** `on_step_done` commits the KV progress of every chunk, appends sampled tokens,
//! applies the stopping rules and the thinking budget, and frees finished sequences. Sequences
//! that finished, were aborted or preempted appear in the next plan's `release` when the workers
//! may hold their state; a plan may carry only releases.
#![warn(missing_docs)]

mod blocks;
mod hash;
mod policy;
mod queue;
mod sequence;
mod step;
mod types;

use std::collections::HashMap;

pub use blocks::BlockId;
pub use types::{
    BlockSnapshot, ConfigError, Finish, ImageSpan, PlannedChunk, SchedulerConfig,
    SchedulerSnapshot, SchedulerStats, SeqEvent, SeqId, SeqRequest, SeqSnapshot, StepPlan,
    Stopping, SubmitError,
};

use blocks::BlockManager;
use queue::WaitQueue;
use sequence::{validate_request, Sequence};

/// The scheduler of one replica. See the [module docs](self) for the policy.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    /// Every sequence held, waiting or running.
    seqs: HashMap<SeqId, Sequence>,
    waiting: WaitQueue<SeqId>,
    /// Running sequences in admission order (the last one is preempted first).
    running: Vec<SeqId>,
    /// Ids for the next plan's `release`.
    release: Vec<SeqId>,
    /// A plan was returned and its `on_step_done` has not come yet.
    outstanding: bool,
    prefix_hit_tokens: u64,
    prefix_query_tokens: u64,
    preemptions: u64,
}

impl Scheduler {
    /// An idle scheduler with every block free.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            blocks: BlockManager::new(cfg.num_blocks),
            seqs: HashMap::new(),
            waiting: WaitQueue::new(cfg.max_queue),
            running: Vec::new(),
            release: Vec::new(),
            outstanding: false,
            prefix_hit_tokens: 0,
            prefix_query_tokens: 0,
            preemptions: 0,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request for admission.
    ///
    /// Errors: [`SubmitError::Full`] (with the request) when `max_queue` sequences wait; the
    /// other variants for a request this replica can never serve.
    pub fn submit(&mut self, req: SeqRequest) -> Result<(), SubmitError> {
        validate_request(&req, self.cfg.max_model_len)?;
        if self.seqs.contains_key(&req.id) {
            return Err(SubmitError::DuplicateId(req.id));
        }
        // Requests that free running slots will take at the next step are not queued.
        let free = self.cfg.max_num_seqs.saturating_sub(self.running.len());
        if self.waiting.push_back(req.id, free).is_err() {
            return Err(SubmitError::Full(Box::new(req)));
        }
        self.seqs.insert(req.id, Sequence::new(req));
        Ok(())
    }

    /// Forgets a sequence, waiting or running, and gives its blocks back; a running one is named
    /// in the next plan's `release`. Returns whether the id was known (unknown ids are a no-op).
    /// If a plan holding the sequence is outstanding, its `on_step_done` ignores the sequence.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        if seq.running {
            self.running.retain(|&r| r != id);
        } else {
            self.waiting.remove(&id);
        }
        self.blocks.release_all(&mut seq.blocks);
        if seq.worker_state {
            self.release.push(id);
        }
        true
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            blocks_used: self.blocks.num_used(),
            blocks_cached: self.blocks.num_cached(),
            blocks_free: self.blocks.num_free(),
            blocks_total: self.blocks.total(),
            prefix_hit_tokens: self.prefix_hit_tokens,
            prefix_query_tokens: self.prefix_query_tokens,
            preemptions: self.preemptions,
        }
    }

    /// Routing keys (first 8 bytes, little-endian) of at most `cap` cached or held block hashes,
    /// held and most recently used first, with the version of the cache they were read at.
    pub fn prefix_keys(&self, cap: usize) -> (u64, Vec<u64>) {
        let keys = self
            .blocks
            .recent_hashes(cap)
            .iter()
            .map(|h| {
                let mut k = [0u8; 8];
                k.copy_from_slice(&h.0[..8]);
                u64::from_le_bytes(k)
            })
            .collect();
        (self.blocks.version(), keys)
    }

    /// Version of the prefix cache's contents (see [`Scheduler::prefix_keys`]).
    pub fn prefix_version(&self) -> u64 {
        self.blocks.version()
    }

    /// Whether nothing waits, runs, or awaits release.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.release.is_empty()
    }

    /// The whole state, for tests and debugging: every block's reference count and cache flag,
    /// and every sequence (running first, in admission order, then waiting in queue order).
    pub fn snapshot(&self) -> SchedulerSnapshot {
        let blocks = self
            .blocks
            .states()
            .map(|(ref_count, cached)| BlockSnapshot { ref_count, cached })
            .collect();
        let seqs = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .map(|id| {
                let s = &self.seqs[id];
                SeqSnapshot {
                    id: *id,
                    running: s.running,
                    tokens: s.tokens.clone(),
                    prompt_len: s.prompt_len,
                    kv_len: s.num_computed,
                    block_table: s.block_table(),
                }
            })
            .collect();
        SchedulerSnapshot { blocks, seqs }
    }
}
