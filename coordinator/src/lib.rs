//! `r4b-coordinator`: one replica of the R-4B model.
//!
//! The coordinator owns everything about a replica except model math: admission and
//! backpressure, the continuous-batching scheduler (chunked prefill under a token budget,
//! decode-first, recompute preemption), the paged-KV block manager with its prefix cache, and the
//! request lifecycle. Workers stay thin: every step they receive says exactly which tokens to run
//! for which sequence, at which positions, in which KV blocks.
//!
//! # Design
//!
//! * **A synchronous core owned by one actor.** [`scheduler::Scheduler`] is plain data with
//!   `&mut self` methods (`submit`, `abort`, `schedule`, `on_step_done`). The runtime owns it
//!   inside one task and talks to it through messages, so the policy is tested without any task.
//! * **Explicit lease discipline for KV blocks.** A block is handed out as a non-`Clone` lease that
//!   only the block manager can create and that must be given back to it; a seeded randomized test
//!   checks that no lease is ever lost.
//! * **vLLM-style policy.** Every step gives each running decode one token first, then fills the
//!   token budget with prefill chunks, then admits waiting requests in FIFO order.
//! * **Recompute preemption.** When blocks run out the most recently admitted sequence gives its
//!   blocks back and is re-prefilled later from its prompt plus its output so far.

pub mod scheduler;

pub mod deadline;
pub mod engine;
pub mod metrics;
pub mod service;
pub mod workers;

use std::time::Duration;

use r4b_proto::v1 as pb;

pub use deadline::StepDeadline;
pub use engine::{EngineHandle, RestartPolicy};
pub use service::CoordinatorService;
pub use workers::{GpuOptions, GroupConfig, Launch, WorkerGroup};

/// Limits and policy of one replica (the `r4b serve` / `r4b coordinator` flags).
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// Workers and KV sizing.
    pub group: GroupConfig,
    /// Name the gateway serves the model under.
    pub served_model_name: String,
    /// Longest prompt + output; None = the model's max positions.
    pub max_model_len: Option<usize>,
    /// Running batch cap.
    pub max_num_seqs: usize,
    /// Token budget per step.
    pub max_num_batched_tokens: usize,
    /// Waiting-queue cap (overflow → RESOURCE_EXHAUSTED → HTTP 429).
    pub max_queue: usize,
    /// Reuse KV blocks of shared prompt prefixes.
    pub enable_prefix_caching: bool,
    /// When a failed worker group is restarted and when the replica gives up.
    pub restart: RestartPolicy,
    /// How long a step may take before the group counts as frozen.
    pub step_deadline: StepDeadline,
}

/// Errors starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The workers did not come up.
    #[error(transparent)]
    Group(#[from] workers::GroupError),
    /// The limits do not fit the model or the KV cache.
    #[error("{0}")]
    Config(String),
    /// The metrics registry refused a metric (a name clash: a bug).
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// A started replica: its gRPC service (serve it with tonic) and the model facts.
#[derive(Debug)]
pub struct Replica {
    /// The Coordinator service.
    pub service: CoordinatorService,
    /// The engine: drain it on shutdown, and exit non-zero when [`EngineHandle::failed`] fires.
    pub engine: EngineHandle,
    /// What ModelInfo answers.
    pub info: pb::ModelInfoResponse,
    /// Rank 0's shard load time.
    pub load_time: Duration,
}

/// Starts the workers, sizes the scheduler from what they allocated and spawns the engine.
pub async fn start_replica(cfg: ReplicaConfig) -> Result<Replica, ReplicaError> {
    let group = WorkerGroup::start(&cfg.group).await?;
    let facts = group.facts.clone();
    let max_pos = facts.max_position_embeddings as usize;
    let max_model_len = cfg.max_model_len.unwrap_or(max_pos);
    if max_model_len > max_pos {
        return Err(ReplicaError::Config(format!(
            "--max-model-len {max_model_len} exceeds the model's max_position_embeddings {max_pos}"
        )));
    }
    let num_blocks = group.num_blocks as usize;
    let block_size = cfg.group.block_size as usize;
    let sched = scheduler::SchedulerConfig {
        num_blocks,
        block_size,
        max_num_seqs: cfg.max_num_seqs,
        max_batched_tokens: cfg.max_num_batched_tokens,
        max_queue: cfg.max_queue,
        enable_prefix_caching: cfg.enable_prefix_caching,
        max_model_len,
    };
    let info = pb::ModelInfoResponse {
        model_name: cfg.served_model_name.clone(),
        max_model_len: max_model_len as u32,
        vocab_size: facts.vocab_size,
        image_token_id: facts.image_token_id,
        tile: facts.tile,
        patch: facts.patch,
        pinpoints: facts.pinpoints.clone(),
        anyres_max_tiles: facts.anyres_max_tiles,
        tensor_parallel_size: group.world_size() as u32,
        block_size: block_size as u32,
        num_blocks: num_blocks as u32,
    };
    let load_time = Duration::from_millis(group.load_ms);
    let engine_cfg = engine::EngineConfig {
        scheduler: sched,
        group: cfg.group.clone(),
        restart: cfg.restart.clone(),
        deadline: cfg.step_deadline.clone(),
        metrics: metrics::Metrics::new(&cfg.served_model_name, max_model_len)?,
    };
    let engine = engine::spawn(group, engine_cfg).map_err(ReplicaError::Config)?;
    Ok(Replica {
        service: CoordinatorService::new(engine.clone(), info.clone()),
        engine,
        info,
        load_time,
    })
}
