//! R-4B on a CUDA GPU (feature `cuda`): bf16 weights, cuBLAS GEMMs, the `r4b-kernels` kernels,
//! a paged bf16 KV cache, a device collective (NCCL) for the tensor-parallel sums and CUDA graphs
//! for decode steps.
//!
//! Layered as ARCHITECTURE.md says:
//! - [`layers`]: weights and the kernels that apply them (`Linear` with its dtype, column/row/
//!   vocab-parallel types that own their communication, norms, `Attention` with its kernel
//!   choice);
//! - [`models`]: each model declares its layers and a forward that reads like the CPU reference
//!   (`models::r4b`: SigLIP + projector + Qwen3);
//! - `runner`: step buffers, the KV cache (lent to the forward), plan upload, CUDA graphs,
//!   sampler call; [`GpuModel`] is the public face, and chooses the group's
//!   [`DeviceCollective`] once at load.
//!
//! Same TP plan as the CPU model (ARCHITECTURE.md): q/k/v and gate/up are column-parallel (each
//! rank holds its heads / its slice of the FFN; here concatenated into one `qkv` and one `gate_up`
//! weight so a layer runs 4 GEMMs), o_proj and down_proj are row-parallel (partial sums, one
//! all-reduce each), the embedding and the head are vocab-parallel.
//!
//! A step orders its chunks "paged" first: decodes and short prefill chunks (tokens × context
//! ≤ [`PAGED_MAX_WORK`]) run the paged split-context attention kernel, one query token at a time;
//! long prefill chunks run the tensor-core flash kernel over the paged cache (or, for head dims
//! it lacks, two cuBLAS products over their gathered keys).
//! A step made only of decodes (and no images) is a CUDA graph replay, captured once per
//! (batch-size bucket, context-partition bucket), unless `enforce_eager`.
//!
//! Images stay on the GPU: [`GpuModel::encode_image`] packs an image's rows into a
//! [`DeviceImage`] the caller keeps (within the [`ImageMemory`] budget, reserved out of the KV
//! cache), and a prefill chunk scatters its rows from there into the embeddings.

mod buffers;
mod images;
mod kv;
pub mod layers;
pub mod models;
mod plan;
mod runner;
mod sample;
pub mod weights;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use r4b_kernels::{DBuf, Gpu};

use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, DeviceCollective, IpcCollective, NcclCollective, Solo};
use crate::config::RConfig;
use crate::model::anyres::PixelViews;
use crate::model::SeqChunk;
use crate::parallel::Shard;
pub use crate::placement::Placement;
use crate::prompt_logprobs::{PromptJob, PromptLogprob};
use crate::sampling::{SampleRow, SampledToken};
use crate::{Error, Result};

pub use images::{DeviceImage, ImageMemory, IMAGE_ROWS_PER_SEQ};
pub use kv::KvShare;
use layers::Ctx;
pub use layers::{attention_gemm, AttnGemm};
use models::r4b::R4b;
use runner::Runner;
pub use sample::{parts_for, GpuSampler, Packed};
use weights::{gpu_err, Loader};

/// A prefill chunk whose tokens × context is at most this runs the paged kernel.
pub const PAGED_MAX_WORK: usize = 1 << 18;

/// Keys per attention partition for `tokens` paged query tokens: small batches split the context
/// finer (more CTAs in flight), large ones coarser (less merge work).
pub fn part_size(tokens: usize) -> usize {
    // Measured on the H100 (r4b-gpu-check profile / attn): 64 keys at 1 query, 128 at 64; at 256
    // queries 1024 beats 512 by 7 % (one partition per query up to 1024 keys).
    match tokens {
        0..=8 => 64,
        9..=128 => 128,
        _ => 1024,
    }
}
/// Steps of at most this many tokens launch their kernels with programmatic dependent launch.
pub const PDL_MAX_TOKENS: usize = 128;
/// Batch-size buckets of the decode graphs.
pub const GRAPH_BATCHES: [usize; 12] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 192, 256];
/// Score scratch of the prefill attention, bytes (bf16 `[nkv, rows, ctx]`): a chunk's queries
/// run in as few row blocks as fit (one for a 3k-token image prompt), at least [`PREFILL_ROWS`].
pub const PREFILL_SCRATCH: usize = 512 << 20;
/// Fewest query rows per prefill-attention product the scratch must hold at `max_model_len`.
pub const PREFILL_ROWS: usize = 64;

/// Sizes the worker is started with.
#[derive(Clone, Copy, Debug)]
pub struct GpuLimits {
    /// Most tokens in one step.
    pub max_tokens: usize,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Longest sequence (prompt + output).
    pub max_model_len: usize,
    pub block_size: usize,
    /// Fraction of the device memory this process may use (weights, KV, scratch).
    pub memory_utilization: f64,
    /// KV blocks wanted (0 = as many as fit).
    pub num_blocks: usize,
    pub enforce_eager: bool,
}

/// The engine's choices besides its sizes: the kernels' options and the engine's own.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Kernel choices (PTX, PDL, attention kernels).
    pub kernels: r4b_kernels::KernelOptions,
    /// Sample on the host over downloaded logits (the reference path).
    pub host_sampling: bool,
    /// Run the NCCL calls at TP = 1 too (a one-GPU check of that path, graphs included).
    pub force_nccl: bool,
    /// TP > 1 over NCCL instead of the IPC all-reduce (vLLM's `--disable-custom-all-reduce`).
    pub disable_custom_all_reduce: bool,
    /// This rank's GPU and how many ranks share it.
    pub placement: Placement,
    /// Every pair of the group's GPUs has peer access (or the group uses one GPU): the IPC
    /// all-reduce can run. The same on every rank ([`peer_access`]).
    pub peer_access: bool,
    /// How long a collective waits for a peer before it fails the step (and the context).
    pub collective_timeout: Duration,
}

/// Whether every pair of `devices` (each rank's GPU) has peer access; true for one GPU.
pub fn peer_access(devices: &[usize]) -> Result<bool> {
    for &a in devices {
        for &b in devices {
            if !r4b_kernels::can_access_peer(a, b).map_err(gpu_err)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Staging bytes of the IPC all-reduce per buffer: larger messages run in pieces of this size.
const IPC_STAGE_BYTES: usize = 16 << 20;

/// One rank of R-4B on a GPU: the model (its layers and weights), the runner (buffers, KV
/// cache, graphs, sampler) and the group's device collective.
pub struct GpuModel {
    cfg: RConfig,
    shard: Shard,
    // Dropped in this order: graphs and buffers, weights, the communicator, then the context.
    runner: Runner,
    model: R4b,
    comm: Box<dyn DeviceCollective>,
    /// The host collective (the host sampler's candidate exchange).
    host_comm: Arc<dyn Collective>,
    /// Report of the load: bytes, seconds, GB/s.
    pub load_report: (u64, f64, f64),
    /// The one-row product implementations measured and chosen at load.
    pub tuning: Vec<String>,
    gpu: Gpu,
}

// SAFETY: the model is driven by one thread at a time (the worker's executor); every entry point
// binds the CUDA context to the calling thread first.
unsafe impl Send for GpuModel {}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("shard", &self.shard)
            .field("comm", &self.comm)
            .finish_non_exhaustive()
    }
}

/// Starts the group's device collective, the one choice of its kind, made the same way on every
/// rank: [`Solo`] for one rank (NCCL when forced); at TP > 1 the all-reduce over CUDA IPC memory
/// when the group's GPUs are one or all have peer access, else NCCL (also when
/// `disable_custom_all_reduce` asks for it; NCCL cannot run two ranks on one GPU).
fn start_group(
    gpu: &Gpu,
    host: &dyn Collective,
    nccl_id: Option<&[u8]>,
    options: &EngineOptions,
    stage_bytes: usize,
) -> Result<Box<dyn DeviceCollective>> {
    let (rank, world) = (host.rank(), host.world_size());
    if world == 1 {
        if options.force_nccl {
            let id = r4b_kernels::nccl_unique_id().map_err(gpu_err)?;
            return Ok(Box::new(NcclCollective::join(gpu, &id, 0, 1)?));
        }
        return Ok(Box::new(Solo));
    }
    let p = options.placement;
    if options.peer_access && !options.disable_custom_all_reduce {
        let ipc = IpcCollective::join(gpu, host, stage_bytes, options.collective_timeout)?;
        tracing::info!(
            rank,
            world,
            device = p.device,
            ranks_on_device = p.ranks_on_device,
            "tensor parallel over CUDA IPC memory"
        );
        return Ok(Box::new(ipc));
    }
    if p.ranks_on_device > 1 {
        return Err(Error::TensorParallel {
            tp: world,
            reason: format!(
                "{} ranks share GPU {} and NCCL cannot run two ranks on one GPU{}",
                p.ranks_on_device,
                p.device,
                if options.disable_custom_all_reduce {
                    ": drop --disable-custom-all-reduce"
                } else {
                    ""
                }
            ),
        });
    }
    let id = nccl_id
        .ok_or_else(|| Error::Gpu("tensor parallel over NCCL needs rank 0's NCCL id".into()))?;
    Ok(Box::new(NcclCollective::join(gpu, id, rank, world)?))
}

impl GpuModel {
    /// Loads this rank's shard onto its GPU (`options.placement`) and sizes the KV cache (its
    /// share of the budget when ranks share the GPU). `nccl_id` is rank 0's NCCL unique id
    /// (needed when the group runs over NCCL).
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &RConfig,
        comm: Arc<dyn Collective>,
        nccl_id: Option<&[u8]>,
        (limits, options): (GpuLimits, EngineOptions),
    ) -> Result<Self> {
        let shard = Shard {
            rank: comm.rank(),
            world: comm.world_size(),
        };
        cfg.validate_tp(shard.world)?;
        let gpu = Gpu::new(options.placement.device, &options.kernels).map_err(gpu_err)?;
        tracing::info!(
            rank = shard.rank,
            device = options.placement.device,
            "GPU {}.{}: sm_{} kernels",
            gpu.compute_capability.0,
            gpu.compute_capability.1,
            gpu.ptx_arch
        );
        let stage = IPC_STAGE_BYTES.max(GpuSampler::gather_bytes(limits.max_seqs));
        let device_comm = start_group(&gpu, comm.as_ref(), nccl_id, &options, stage)?;
        let mut loader = Loader::new(ckpt, &gpu, shard, true);
        let model = R4b::load(&mut loader, cfg, limits.max_model_len)?;
        gpu.sync().map_err(gpu_err)?;
        let load_report = (loader.bytes, loader.elapsed_s(), loader.gbps());
        let ctx = Ctx {
            gpu: &gpu,
            comm: device_comm.as_ref(),
        };
        let share = KvShare {
            ranks_on_device: options.placement.ranks_on_device,
            host: comm.as_ref(),
        };
        let runner = Runner::new(&ctx, &model, cfg, (limits, share), options.host_sampling)?;
        let tuning = runner.tune_one_row(&gpu, &model)?;
        for line in &tuning {
            tracing::debug!(rank = shard.rank, "{line}");
        }
        Ok(GpuModel {
            cfg: cfg.clone(),
            shard,
            runner,
            model,
            comm: device_comm,
            host_comm: comm,
            load_report,
            tuning,
            gpu,
        })
    }

    pub fn config(&self) -> &RConfig {
        &self.cfg
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// KV blocks allocated (the scheduler's pool).
    pub fn num_blocks(&self) -> usize {
        self.runner.num_blocks()
    }

    /// KV bytes per token on this rank (bf16).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.model.llm.dims.kv_bytes_per_token()
    }

    /// One image → its `<image>` rows `[n, H]` (bf16, on this GPU, counted against the image
    /// budget until dropped). The work is queued on the GPU's stream; the steps that read the
    /// rows run after it on the same stream.
    pub fn encode_image(&self, views: &PixelViews) -> Result<DeviceImage> {
        self.gpu.bind().map_err(gpu_err)?;
        self.gpu.set_pdl(false);
        let ctx = Ctx {
            gpu: &self.gpu,
            comm: self.comm.as_ref(),
        };
        self.runner
            .encode_image(&ctx, &self.model, &self.cfg, views)
    }

    /// Whether `rows` more image rows fit in the image budget (a refusal reason otherwise).
    pub fn check_image_room(&self, rows: usize) -> std::result::Result<(), String> {
        self.runner
            .images()
            .check(rows * self.cfg.text.hidden_size * 2)
            .map_err(|e| e.to_string())
    }

    /// Runs one step and samples one token for each `(chunk index, row)` in `rows`.
    pub fn step(
        &mut self,
        chunks: &[SeqChunk],
        rows: &[(usize, SampleRow)],
        masks: Option<&mut crate::service::MaskFn>,
    ) -> Result<Vec<SampledToken>> {
        Ok(self.step_scored(chunks, rows, masks, &[])?.0)
    }

    /// [`GpuModel::step`], then the prompt jobs scored (per job: the entries, and this rank's
    /// logits row it carries on).
    #[allow(clippy::type_complexity)]
    pub(crate) fn step_scored(
        &mut self,
        chunks: &[SeqChunk],
        rows: &[(usize, SampleRow)],
        masks: Option<&mut crate::service::MaskFn>,
        jobs: &[PromptJob],
    ) -> Result<(Vec<SampledToken>, Vec<(Vec<PromptLogprob>, Option<Tensor>)>)> {
        let ctx = Ctx {
            gpu: &self.gpu,
            comm: self.comm.as_ref(),
        };
        let tokens = self.runner.step(
            &ctx,
            (&self.model, &self.cfg),
            self.host_comm.as_ref(),
            chunks,
            rows,
            masks,
        )?;
        let prompt = self.runner.score_prompts(
            &ctx,
            &self.model,
            self.host_comm.as_ref(),
            (jobs, chunks),
        )?;
        Ok((tokens, prompt))
    }

    /// Records a timeline of the following eager steps (per-op GPU time, see
    /// [`GpuModel::timeline_stop`]).
    pub fn timeline_start(&self) -> Result<()> {
        self.gpu.bind().map_err(gpu_err)?;
        self.gpu.timeline_start().map_err(gpu_err)
    }

    /// Milliseconds of GPU time per op label since [`GpuModel::timeline_start`].
    pub fn timeline_stop(&self) -> Result<Vec<(&'static str, f64)>> {
        self.gpu.timeline_stop().map_err(gpu_err)
    }

    /// Turns CUDA graphs off (true) or on (false) for the following steps.
    pub fn set_enforce_eager(&mut self, eager: bool) {
        self.runner.set_enforce_eager(eager);
    }

    /// The step's logits of each chunk's last token `[chunks, vocab]` (TP = 1; checks of the
    /// decode path: graphs, skinny GEMMs, paged attention).
    pub fn last_logits(&mut self, chunks: &[SeqChunk]) -> Result<Vec<f32>> {
        if self.shard.world != 1 {
            return Err(Error::Gpu("last_logits runs at TP = 1".into()));
        }
        let ctx = Ctx {
            gpu: &self.gpu,
            comm: self.comm.as_ref(),
        };
        self.runner
            .last_logits(&ctx, &self.model, &self.cfg, chunks)
    }

    /// Teacher-forced logits of every token of one sequence's chunk `[T, vocab]` (correctness
    /// checks; every rank must call it, and every rank gets the whole vocabulary: the slices of
    /// the vocab-parallel head are gathered over the host collective). Runs as a prefill and
    /// writes the chunk's keys into the cache.
    pub fn logits_all(&mut self, chunk: &SeqChunk) -> Result<Vec<f32>> {
        let ctx = Ctx {
            gpu: &self.gpu,
            comm: self.comm.as_ref(),
        };
        let local = self
            .runner
            .logits_all(&ctx, &self.model, &self.cfg, chunk)?;
        if self.shard.world == 1 {
            return Ok(local);
        }
        let t = chunk.tokens.len().max(1);
        let slice = Tensor::from_vec(
            local,
            (t, self.cfg.text.vocab_size / self.shard.world),
            &Device::Cpu,
        )?;
        let parts = self.host_comm.all_gather(&slice)?;
        Ok(Tensor::cat(&parts, 1)?.flatten_all()?.to_vec1()?)
    }
}

/// A scratch allocation helper that maps errors.
pub(crate) fn alloc(gpu: &Gpu, bytes: usize) -> Result<DBuf> {
    gpu.alloc(bytes).map_err(gpu_err)
}
