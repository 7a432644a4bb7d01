//! R-4B on a CUDA GPU (feature `cuda`): bf16 weights, cuBLAS GEMMs, the `r4b-kernels` kernels,
//! a paged bf16 KV cache, NCCL for the tensor-parallel sums and CUDA graphs for decode steps.
//!
//! Same TP plan as the CPU model (ARCHITECTURE.md): q/k/v and gate/up are column-parallel (each
//! rank holds its heads / its slice of the FFN; here concatenated into one `qkv` and one `gate_up`
//! weight so a layer runs 4 GEMMs), o_proj and down_proj are row-parallel (partial sums, one
//! all-reduce each), the embedding and the head are vocab-parallel.
//!
//! A step orders its chunks "paged" first: decodes and short prefill chunks (tokens × context
//! ≤ [`PAGED_MAX_WORK`]) run the paged split-context attention kernel, one query token at a time;
//! long prefill chunks run causal attention as two cuBLAS products over their gathered keys.
//! A step made only of decodes (and no images) is a CUDA graph replay, captured once per
//! (batch-size bucket, context-partition bucket), unless `enforce_eager`.

mod image_cache;
mod qwen3;
mod sample;
mod siglip;
pub mod weights;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use r4b_kernels::cudarc::driver::sys as cu;
use r4b_kernels::cudarc::driver::CudaGraph;
use r4b_kernels::{DBuf, DevPtr, Gemm, Gpu, Nccl, OutType};

use crate::checkpoint::Checkpoint;
use crate::collective::Collective;
use crate::config::RConfig;
use crate::model::anyres::PixelViews;
use crate::model::SeqChunk;
use crate::parallel::Shard;
use crate::sampling::{self, SampleRow, SampledToken};
use crate::{Error, Result};

use qwen3::Qwen3Gpu;
pub use sample::{parts_for, GpuSampler, Packed};
use siglip::VisionGpu;
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
}

/// Arguments of [`attention_gemm`]: causal (or full) attention of `rows` queries over `ctx`
/// contiguous keys, as two strided-batched cuBLAS products and a row softmax.
pub struct AttnGemm {
    pub q: DevPtr,
    pub q_ld: usize,
    pub k: DevPtr,
    pub k_ld: usize,
    pub v: DevPtr,
    pub v_ld: usize,
    pub out: DevPtr,
    pub out_ld: usize,
    pub rows: usize,
    pub ctx: usize,
    pub nkv: usize,
    pub group: usize,
    pub hd: usize,
    /// Position of the first query row (causal), or None (every query sees every key).
    pub causal_base: Option<usize>,
    /// Score scale (1/√hd).
    pub scale: f32,
    /// Scratch: bf16 `[nkv, rows, ctx]` (scores, then probabilities in place, as HF's eager
    /// attention rounds them).
    pub s: DevPtr,
}

/// `out[r, h] = softmax(q[r, h] · K[g]ᵀ · scale) · V[g]` for every head `h = g·group + j`
/// (the path for head dims without the tensor-core kernel, and its reference in
/// `r4b-gpu-check attn`).
///
/// # Safety
/// Every pointer must address device memory on `gpu` large enough for the strides and sizes in
/// `a` (queries `rows × q_ld`, keys/values `ctx × ld`, output `rows × out_ld`, scratch
/// `nkv · rows · ctx` bf16).
pub unsafe fn attention_gemm(gpu: &Gpu, a: &AttnGemm) -> Result<()> {
    let (rows, ctx, hd, g) = (a.rows, a.ctx, a.hd, a.group);
    let scale = a.scale;
    for j in 0..g {
        // S[g] (row-major [rows, ctx]) = Q_h · K_gᵀ, batched over kv heads g (h = g·group + j).
        gpu.gemm(&Gemm {
            trans_a: true,
            trans_b: false,
            m: ctx,
            n: rows,
            k: hd,
            a: a.k,
            lda: a.k_ld,
            stride_a: hd,
            b: a.q + (j * hd * 2) as u64,
            ldb: a.q_ld,
            stride_b: g * hd,
            c: a.s,
            ldc: ctx,
            stride_c: rows * ctx,
            batch: a.nkv,
            alpha: scale,
            beta: 0.0,
            out: OutType::Bf16,
        })
        .map_err(gpu_err)?;
        gpu.softmax_rows(a.s, (a.nkv * rows, ctx), rows, a.causal_base)
            .map_err(gpu_err)?;
        // O_h (row-major [rows, hd] at column h·hd) = P[g] · V_g.
        gpu.gemm(&Gemm {
            trans_a: false,
            trans_b: false,
            m: hd,
            n: rows,
            k: ctx,
            a: a.v,
            lda: a.v_ld,
            stride_a: hd,
            b: a.s,
            ldb: ctx,
            stride_b: rows * ctx,
            c: a.out + (j * hd * 2) as u64,
            ldc: a.out_ld,
            stride_c: g * hd,
            batch: a.nkv,
            alpha: 1.0,
            beta: 0.0,
            out: OutType::Bf16,
        })
        .map_err(gpu_err)?;
    }
    Ok(())
}

/// Host-side plan of one step (chunks reordered decodes first).
#[derive(Debug, Default)]
struct StepPlan {
    /// Chunk indices in execution order.
    order: Vec<usize>,
    /// Leading paged chunks in `order` (decodes and short prefills) and their tokens.
    paged_chunks: usize,
    paged_tokens: usize,
    /// Every chunk is a single-token decode without images.
    decode_only: bool,
    /// Token count of each chunk, in `order`.
    lens: Vec<usize>,
    ids: Vec<i32>,
    positions: Vec<i32>,
    slots: Vec<i32>,
    /// Keys visible to each paged token, and its block-table row.
    ctx_lens: Vec<i32>,
    bt_rows: Vec<i32>,
    /// `[order.len(), table_width]`: each chunk's blocks, zero-padded to the widest chunk's
    /// (uploaded into device rows of `max_blocks`).
    block_tables: Vec<i32>,
    table_width: usize,
    /// Row of each chunk's last token, by ORIGINAL chunk index.
    last_rows: Vec<i32>,
    /// Image rows (bf16, contiguous, in step order) and their destination rows.
    image_dst: Vec<i32>,
    image_rows: Vec<Tensor>,
    /// Longest context of the paged tokens.
    max_paged_ctx: usize,
    tokens: usize,
}

/// One rank of R-4B on a GPU.
pub struct GpuModel {
    cfg: RConfig,
    shard: Shard,
    limits: GpuLimits,
    llm: Qwen3Gpu,
    vision: VisionGpu,
    comm: Arc<dyn Collective>,
    graphs: HashMap<(usize, usize), CudaGraph>,
    sampler: GpuSampler,
    /// Sample on the host over downloaded logits instead.
    host_sampling: bool,
    /// Report of the load: bytes, seconds, GB/s.
    pub load_report: (u64, f64, f64),
    /// The one-row product implementations measured and chosen at load.
    pub tuning: Vec<String>,
    /// Device copies of recently encoded images' rows (see `image_cache`).
    image_rows: std::sync::Mutex<image_cache::ImageRowCache>,
    // `gpu` last: buffers above free before the context goes.
    gpu: Gpu,
}

// SAFETY: the model is driven by one thread at a time (the worker's executor); every entry point
// binds the CUDA context to the calling thread first.
unsafe impl Send for GpuModel {}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("shard", &self.shard)
            .field("limits", &self.limits)
            .finish()
    }
}

impl GpuModel {
    /// Loads this rank's shard onto GPU `shard.rank` (local rank = device ordinal) and sizes the
    /// KV cache. `nccl_id` is rank 0's NCCL unique id (required when the world size is above 1).
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
        let devices = r4b_kernels::device_count().map_err(gpu_err)?;
        if shard.world > devices {
            return Err(Error::TensorParallel {
                tp: shard.world,
                reason: format!(
                    "{} ranks need {} GPUs, this machine has {devices}",
                    shard.world, shard.world
                ),
            });
        }
        let gpu = Gpu::new(shard.rank, &options.kernels).map_err(gpu_err)?;
        tracing::info!(
            rank = shard.rank,
            "GPU {}.{}: sm_{} kernels",
            gpu.compute_capability.0,
            gpu.compute_capability.1,
            gpu.ptx_arch
        );
        let nccl = match (shard.world, nccl_id) {
            (1, _) if options.force_nccl => {
                let id = r4b_kernels::nccl_unique_id().map_err(gpu_err)?;
                Some(Nccl::new(&gpu, &id, 0, 1).map_err(gpu_err)?)
            }
            (1, _) => None,
            (_, Some(id)) => Some(Nccl::new(&gpu, id, shard.rank, shard.world).map_err(gpu_err)?),
            (_, None) => {
                return Err(Error::Gpu(
                    "tensor parallel on GPUs needs rank 0's NCCL id".into(),
                ))
            }
        };
        let mut loader = Loader::new(ckpt, &gpu, shard, true);
        let vision = VisionGpu::load(&mut loader, cfg)?;
        let mut llm = Qwen3Gpu::load(&mut loader, cfg, shard, nccl, &limits)?;
        gpu.sync().map_err(gpu_err)?;
        let load_report = (loader.bytes, loader.elapsed_s(), loader.gbps());
        let sampler = GpuSampler::new(&gpu, limits.max_seqs, shard.world, llm.nccl().is_some())?;
        llm.alloc_kv(&gpu, &limits)?;
        let tuning = llm.tune_one_row(&gpu)?;
        for line in &tuning {
            tracing::debug!(rank = shard.rank, "{line}");
        }
        Ok(GpuModel {
            cfg: cfg.clone(),
            shard,
            limits,
            llm,
            vision,
            comm,
            graphs: HashMap::new(),
            sampler,
            host_sampling: options.host_sampling,
            load_report,
            tuning,
            image_rows: Default::default(),
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
        self.llm.num_blocks
    }

    /// KV bytes per token on this rank (bf16).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.llm.kv_bytes_per_token()
    }

    /// One image → its `<image>` rows (bf16, host).
    pub fn encode_image(&self, views: &PixelViews) -> Result<Tensor> {
        self.gpu.bind().map_err(gpu_err)?;
        self.gpu.set_pdl(false);
        let (rows, on_device) = self.vision.encode(&self.gpu, views, &self.cfg)?;
        if let (Some(dev), Ok(mut cache)) = (on_device, self.image_rows.lock()) {
            // SAFETY: the vision tower's packed buffer holds exactly `rows`.
            unsafe { cache.insert(&self.gpu, &rows, dev)? };
        }
        Ok(rows)
    }

    fn plan(&self, chunks: &[SeqChunk]) -> Result<StepPlan> {
        let lim = &self.limits;
        let bs = lim.block_size;
        let image_id = self.cfg.image_token_index;
        let mut p = StepPlan {
            last_rows: vec![0; chunks.len()],
            ..Default::default()
        };
        if chunks.len() > lim.max_seqs {
            return Err(Error::Step(format!(
                "{} sequences in one step, the worker holds {}",
                chunks.len(),
                lim.max_seqs
            )));
        }
        let is_paged =
            |c: &SeqChunk| c.tokens.len() * (c.start_pos + c.tokens.len()) <= PAGED_MAX_WORK;
        p.order = (0..chunks.len())
            .filter(|&i| is_paged(&chunks[i]))
            .collect();
        p.paged_chunks = p.order.len();
        p.order
            .extend((0..chunks.len()).filter(|&i| !is_paged(&chunks[i])));
        p.decode_only = chunks
            .iter()
            .all(|c| c.tokens.len() == 1 && c.image_count(image_id) == 0);
        for (j, &ci) in p.order.clone().iter().enumerate() {
            let c = &chunks[ci];
            if c.tokens.is_empty() {
                return Err(Error::Step("empty chunk".into()));
            }
            let end = c.start_pos + c.tokens.len();
            if end > lim.max_model_len {
                return Err(Error::Step(format!(
                    "position {end} exceeds the worker's max_model_len {}",
                    lim.max_model_len
                )));
            }
            let need = end.div_ceil(bs);
            if c.block_table.len() < need {
                return Err(Error::Kv(format!(
                    "block table has {} blocks, {need} needed",
                    c.block_table.len()
                )));
            }
            if let Some(&b) = c.block_table[..need]
                .iter()
                .find(|&&b| b as usize >= self.llm.num_blocks)
            {
                return Err(Error::Kv(format!(
                    "block {b} out of range ({} blocks)",
                    self.llm.num_blocks
                )));
            }
            p.table_width = p.table_width.max(need);
            c.checked_image_count(image_id)?;
            if let Some(r) = &c.image_rows {
                // Uploaded straight from the tensor's storage (no host copy).
                p.image_rows
                    .push(r.to_dtype(candle_core::DType::BF16)?.contiguous()?);
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                let pos = c.start_pos + i;
                let row = p.ids.len() as i32;
                if i < c.prompt_tokens && t == image_id {
                    p.image_dst.push(row);
                }
                if t as usize >= self.cfg.text.vocab_size {
                    return Err(Error::Step(format!(
                        "token {t} outside the vocabulary ({})",
                        self.cfg.text.vocab_size
                    )));
                }
                p.ids.push(t as i32);
                p.positions.push(pos as i32);
                let blk = c.block_table[pos / bs] as usize;
                p.slots.push((blk * bs + pos % bs) as i32);
            }
            p.last_rows[ci] = p.ids.len() as i32 - 1;
            p.lens.push(c.tokens.len());
            if j < p.paged_chunks {
                for i in 0..c.tokens.len() {
                    p.ctx_lens.push((c.start_pos + i + 1) as i32);
                    p.bt_rows.push(j as i32);
                }
                p.paged_tokens += c.tokens.len();
                p.max_paged_ctx = p.max_paged_ctx.max(end);
            }
        }
        // Block tables at the widest chunk's width (the device rows are `max_blocks` wide).
        let width = p.table_width.max(1);
        p.table_width = width;
        p.block_tables = vec![0i32; p.order.len() * width];
        for (j, &ci) in p.order.iter().enumerate() {
            let c = &chunks[ci];
            let need = (c.start_pos + c.tokens.len()).div_ceil(bs);
            for (d, &b) in p.block_tables[j * width..]
                .iter_mut()
                .zip(&c.block_table[..need])
            {
                *d = b as i32;
            }
        }
        p.tokens = p.ids.len();
        if p.tokens > lim.max_tokens {
            return Err(Error::Step(format!(
                "{} tokens in one step, the worker holds {}",
                p.tokens, lim.max_tokens
            )));
        }
        Ok(p)
    }

    /// Uploads the step's plan; image rows still on the device are copied there.
    ///
    /// # Safety
    /// As [`Qwen3Gpu::upload_plan`].
    unsafe fn upload_plan(&self, p: &StepPlan, pad_to: Option<usize>) -> Result<()> {
        let cache = self
            .image_rows
            .lock()
            .map_err(|_| Error::Step("image row cache poisoned".into()))?;
        self.llm
            .upload_plan(&self.gpu, p, pad_to, &|rows| cache.find(rows))
    }

    /// Runs one step; the logits of each chunk's last token are left in the logits buffer
    /// (row = chunk index, original order) and their arg-max in the arg-max buffers.
    fn forward(&mut self, chunks: &[SeqChunk]) -> Result<()> {
        self.gpu.bind().map_err(gpu_err)?;
        let p = self.plan(chunks)?;
        // Programmatic dependent launch pays for small steps only (measured, see Gpu::set_pdl).
        self.gpu.set_pdl(p.tokens <= PDL_MAX_TOKENS);
        let graphable = !self.limits.enforce_eager && p.decode_only && p.tokens > 0;
        if graphable {
            if let Some(&bucket) = GRAPH_BATCHES.iter().find(|&&b| b >= p.tokens) {
                if bucket <= self.limits.max_seqs {
                    return self.forward_graph(&p, bucket);
                }
            }
        }
        // SAFETY: the plan was validated against the buffers' sizes (tokens, seqs, blocks).
        unsafe {
            self.upload_plan(&p, None)?;
            let split = self.llm.split_for(p.paged_tokens, p.max_paged_ctx, false);
            self.llm.run(&self.gpu, &p, p.tokens, chunks.len(), split)?;
        }
        Ok(())
    }

    fn forward_graph(&mut self, p: &StepPlan, bucket: usize) -> Result<()> {
        let split = self.llm.split_for(bucket, p.max_paged_ctx, true);
        // SAFETY: as in `forward`; the padded rows read a reserved scratch block.
        unsafe {
            self.upload_plan(p, Some(bucket))?;
            let key = (bucket, split.1);
            if !self.graphs.contains_key(&key) {
                let stream = self.gpu.stream.clone();
                stream
                    .begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                let run = self.llm.run(&self.gpu, p, bucket, bucket, split);
                let graph = stream
                    .end_capture(cu::CUgraphInstantiate_flags(0))
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                run?;
                let graph =
                    graph.ok_or_else(|| Error::Gpu("graph capture produced no graph".into()))?;
                self.graphs.insert(key, graph);
            }
            let graph = &self.graphs[&key];
            graph.launch().map_err(|e| Error::Gpu(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs one step and samples one token for each `(chunk index, row)` in `rows`.
    pub fn step(
        &mut self,
        chunks: &[SeqChunk],
        rows: &[(usize, SampleRow)],
    ) -> Result<Vec<SampledToken>> {
        self.forward(chunks)?;
        if rows.is_empty() {
            self.gpu.sync().map_err(gpu_err)?;
            return Ok(Vec::new());
        }
        let fast = rows.iter().all(|(_, r)| {
            r.params.temperature < sampling::GREEDY_TEMPERATURE
                && !r.params.logprobs
                && r.params.presence_penalty == 0.0
                && r.params.frequency_penalty == 0.0
                && r.params.repetition_penalty == 1.0
        });
        // SAFETY: the logits/argmax buffers hold max_seqs rows; chunk indices < chunks.len().
        unsafe {
            if fast {
                let best = self.llm.argmax(&self.gpu, chunks.len())?;
                return Ok(rows
                    .iter()
                    .map(|&(ci, _)| SampledToken {
                        id: best[ci],
                        logprob: 0.0,
                        top: Vec::new(),
                    })
                    .collect());
            }
            let width = self.llm.vocab_local;
            if rows.iter().any(|&(ci, _)| ci >= chunks.len()) {
                return Err(Error::Step("sample row names no chunk of the step".into()));
            }
            let world = self.shard.world;
            if !self.host_sampling && self.sampler.accepts(world, rows) {
                let logits = (self.llm.logits_ptr(), width, self.shard.rank * width);
                return self
                    .sampler
                    .sample(&self.gpu, logits, self.llm.nccl(), rows);
            }
            let mut host = vec![0f32; chunks.len() * width];
            self.gpu
                .dtoh(self.llm.logits_ptr(), &mut host)
                .map_err(gpu_err)?;
            let mut picked = Vec::with_capacity(rows.len() * width);
            for &(ci, _) in rows {
                picked.extend_from_slice(&host[ci * width..(ci + 1) * width]);
            }
            let t = Tensor::from_vec(picked, (rows.len(), width), &Device::Cpu)?;
            let srows: Vec<SampleRow> = rows.iter().map(|(_, r)| *r).collect();
            sampling::sample_logits(&t, self.comm.as_ref(), &srows)
        }
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
        self.limits.enforce_eager = eager;
    }

    /// The step's logits of each chunk's last token `[chunks, vocab]` (TP = 1; checks of the
    /// decode path: graphs, skinny GEMMs, paged attention).
    pub fn last_logits(&mut self, chunks: &[SeqChunk]) -> Result<Vec<f32>> {
        if self.shard.world != 1 {
            return Err(Error::Gpu("last_logits runs at TP = 1".into()));
        }
        self.forward(chunks)?;
        let mut host = vec![0f32; chunks.len() * self.llm.vocab_local];
        // SAFETY: the logits buffer holds max_seqs ≥ chunks.len() rows.
        unsafe { self.gpu.dtoh(self.llm.logits_ptr(), &mut host) }.map_err(gpu_err)?;
        Ok(host)
    }

    /// Teacher-forced logits of every token of one sequence's chunk `[T, vocab]` (TP = 1 only;
    /// correctness checks). Runs as a prefill and writes the chunk's keys into the cache.
    pub fn logits_all(&mut self, chunk: &SeqChunk) -> Result<Vec<f32>> {
        if self.shard.world != 1 {
            return Err(Error::Gpu("logits_all runs at TP = 1".into()));
        }
        self.gpu.bind().map_err(gpu_err)?;
        let p = self.plan(std::slice::from_ref(chunk))?;
        self.gpu.set_pdl(p.tokens <= PDL_MAX_TOKENS);
        self.gpu.mark("host plan").map_err(gpu_err)?;
        // SAFETY: as in `forward`.
        unsafe {
            self.upload_plan(&p, None)?;
            self.gpu.mark("plan upload").map_err(gpu_err)?;
            let split = self.llm.split_for(p.paged_tokens, p.max_paged_ctx, false);
            self.llm.run_hidden(&self.gpu, &p, p.tokens, split)?;
            self.llm.logits_all(&self.gpu, p.tokens)
        }
    }
}

/// The bf16 values of a contiguous CPU tensor, borrowed from its storage.
fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> Result<R>) -> Result<R> {
    let (st, layout) = t.storage_and_layout();
    match (&*st, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)), Some((a, b))) => f(&v[a..b]),
        _ => Err(Error::Step(
            "image rows must be a contiguous bf16 CPU tensor".into(),
        )),
    }
}

/// A scratch allocation helper that maps errors.
pub(crate) fn alloc(gpu: &Gpu, bytes: usize) -> Result<DBuf> {
    gpu.alloc(bytes).map_err(gpu_err)
}
