//! The runner: everything of a step that is not the model's math. It owns the step buffers, the
//! KV cache (lent to the model's forward), the image budget (reserved out of the KV sizing), the
//! plan upload, the CUDA graphs (one per (batch-size bucket, context-partition bucket)), the
//! timeline's step-level marks, the one-row product tuning at load and the sampler call.
//!
//! A step: plan on the host ([`StepPlan::build`]) → upload → the model's forward (eager, or a
//! graph replay for decode-only steps) → the head → arg-max (greedy rows), the GPU sampler, or
//! the host sampler over downloaded logits.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use r4b_kernels::cudarc::driver::sys as cu;
use r4b_kernels::cudarc::driver::CudaGraph;
use r4b_kernels::{Gpu, LinearImpl, OutType};

use super::buffers::StepBuffers;
use super::images::{DeviceImage, ImageMemory};
use super::kv::{GpuKv, KvShare};
use super::layers::{Ctx, Linear};
use super::models::r4b::{ImageBuffers, R4b};
use super::plan::{Pass, StepPlan};
use super::sample::GpuSampler;
use super::weights::gpu_err;
use super::{GpuLimits, GRAPH_BATCHES, PDL_MAX_TOKENS};
use crate::collective::Collective;
use crate::config::RConfig;
use crate::model::anyres::PixelViews;
use crate::model::SeqChunk;
use crate::prompt_logprobs::{prompt_logprobs_logits, HiddenRow, PromptJob, PromptLogprob};
use crate::sampling::{self, SampleRow, SampledToken};
use crate::{Error, Result};

/// See the module documentation.
pub struct Runner {
    limits: GpuLimits,
    bufs: StepBuffers,
    image_bufs: ImageBuffers,
    kv: GpuKv,
    graphs: HashMap<(usize, usize), CudaGraph>,
    sampler: GpuSampler,
    /// Sample on the host over downloaded logits instead.
    host_sampling: bool,
    /// The budget of the image rows live sequences hold (see `images`).
    images: ImageMemory,
    /// Row of each chunk's first token in the last forward (by original chunk index): the plan
    /// runs the chunks in its own order (paged first), not the step's.
    chunk_rows: Vec<usize>,
}

impl Runner {
    /// Allocates the step and image buffers, the sampler's and the KV cache (last: it takes what
    /// is left of the memory budget, less the image budget).
    pub fn new(
        ctx: &Ctx,
        model: &R4b,
        cfg: &RConfig,
        (limits, share): (GpuLimits, KvShare),
        host_sampling: bool,
    ) -> Result<Self> {
        let gpu = ctx.gpu;
        let d = &model.llm.dims;
        let bufs = StepBuffers::alloc(gpu, d, ctx.comm.world_size(), &limits)?;
        let image_bufs = model.image_buffers(gpu, cfg)?;
        gpu.sync().map_err(gpu_err)?;
        let sampler = GpuSampler::new(gpu, limits.max_seqs, ctx.comm)?;
        // The image rows of live sequences are allocated per image later, within this budget.
        let images = ImageMemory::new(&limits, d.hidden);
        let kv = GpuKv::alloc(
            gpu,
            (d.layers, d.nkv, d.head_dim),
            &limits,
            (&share, images.limit()),
        )?;
        Ok(Runner {
            limits,
            bufs,
            image_bufs,
            kv,
            graphs: HashMap::new(),
            sampler,
            host_sampling,
            images,
            chunk_rows: Vec::new(),
        })
    }

    /// KV blocks allocated (the scheduler's pool).
    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    /// The image budget.
    pub fn images(&self) -> &ImageMemory {
        &self.images
    }

    /// Turns CUDA graphs off (true) or on (false) for the following steps.
    pub fn set_enforce_eager(&mut self, eager: bool) {
        self.limits.enforce_eager = eager;
    }

    /// Times the one-row products of a decode step on this rank's real weights (every layer in
    /// turn, so the weights stream from memory as in a step, not from L2) through each
    /// implementation, and keeps the fastest. Runs before any graph is captured. Returns one
    /// line per decision.
    pub fn tune_one_row(&self, gpu: &Gpu, model: &R4b) -> Result<Vec<String>> {
        let b = &self.bufs;
        let llm = &model.llm;
        let pick = |f: fn(&super::models::r4b::qwen3::DecoderLayer) -> &Linear| -> Vec<&Linear> {
            llm.layers.iter().map(f).collect()
        };
        let shapes = [
            (
                "qkv",
                pick(|l| l.self_attn.qkv.linear()),
                b.normed.ptr(),
                b.qkv.ptr(),
            ),
            (
                "o_proj",
                pick(|l| l.self_attn.o_proj.linear()),
                b.attn.ptr(),
                b.proj.ptr(),
            ),
            (
                "gate_up",
                pick(|l| l.mlp.gate_up.linear()),
                b.normed.ptr(),
                b.gate_up.ptr(),
            ),
            (
                "down",
                pick(|l| l.mlp.down_proj.linear()),
                b.act.ptr(),
                b.proj.ptr(),
            ),
        ];
        let imps = [LinearImpl::Blas, LinearImpl::Gemv, LinearImpl::Gemv4];
        let mut report = Vec::new();
        for (name, weights, x, y) in shapes {
            let Some((n, k)) = weights.first().map(|w| w.shape()) else {
                continue;
            };
            let layers = weights.len().max(1) as f64;
            let mut best = (f64::INFINITY, LinearImpl::Blas);
            let mut line = format!("one-row {name} [{n}x{k}]:");
            for imp in imps {
                let ms = gpu
                    .time_ms(3, || {
                        for w in &weights {
                            // SAFETY: x/y are step buffers of at least one row of k/n values.
                            unsafe { w.forward_one_row_with(gpu, imp, (x, y), OutType::Bf16)? };
                        }
                        Ok(())
                    })
                    .map_err(gpu_err)?
                    / layers;
                line += &format!(" {imp:?} {:.1} µs", ms * 1e3);
                if ms < best.0 {
                    best = (ms, imp);
                }
            }
            gpu.set_linear_impl((n, k), OutType::Bf16, best.1);
            report.push(format!("{line} -> {:?}", best.1));
        }
        // The head (one weight, far larger than L2).
        let head = llm.lm_head.linear();
        let (v, h) = head.shape();
        let mut best = (f64::INFINITY, LinearImpl::Blas);
        let mut line = format!("one-row lm_head [{v}x{h}]:");
        for imp in imps {
            let ms = gpu
                .time_ms(5, || {
                    // SAFETY: `last` holds a row of H, `logits` a row of the local vocabulary.
                    unsafe {
                        head.forward_one_row_with(
                            gpu,
                            imp,
                            (b.last.ptr(), b.logits.ptr()),
                            OutType::F32,
                        )
                    }
                })
                .map_err(gpu_err)?;
            line += &format!(" {imp:?} {:.1} µs", ms * 1e3);
            if ms < best.0 {
                best = (ms, imp);
            }
        }
        gpu.set_linear_impl((v, h), OutType::F32, best.1);
        report.push(format!("{line} -> {:?}", best.1));
        Ok(report)
    }

    /// One image → its `<image>` rows on the device, within the image budget.
    pub fn encode_image(
        &self,
        ctx: &Ctx,
        model: &R4b,
        cfg: &RConfig,
        views: &PixelViews,
    ) -> Result<DeviceImage> {
        model.encode_image(ctx, &self.image_bufs, views, cfg, &self.images)
    }

    /// Plans a step (host side).
    pub fn plan(&self, cfg: &RConfig, chunks: &[SeqChunk]) -> Result<StepPlan> {
        StepPlan::build(chunks, cfg, &self.limits, self.kv.num_blocks())
    }

    /// Copies the plan's metadata to the device (the image rows stay where they are: the forward
    /// reads them from their images); with `pad_to`, pads the decode rows to that many (padding
    /// tokens: id 0 at position 0 in the scratch block, context 1).
    ///
    /// # Safety
    /// The plan was built by [`Runner::plan`] (validated against the buffers' sizes).
    unsafe fn upload_plan(&self, gpu: &Gpu, p: &StepPlan, pad_to: Option<usize>) -> Result<()> {
        let b = &self.bufs;
        let n = pad_to.unwrap_or(p.tokens);
        if n > b.max_tokens || p.order.len() > b.max_seqs {
            return Err(Error::Step("step larger than the worker's buffers".into()));
        }
        let pad = n - p.tokens;
        let scratch_slot = (self.kv.scratch_block() * self.kv.block_size()) as i32;
        let ext = |v: &Vec<i32>, fill: i32| -> Vec<i32> {
            let mut o = v.clone();
            o.extend(std::iter::repeat_n(fill, pad));
            o
        };
        let ids = ext(&p.ids, 0);
        let positions = ext(&p.positions, 0);
        let slots = ext(&p.slots, scratch_slot);
        let ctx_lens = ext(&p.ctx_lens, 1);
        let mut bt_rows = p.bt_rows.clone();
        bt_rows.extend((p.order.len()..p.order.len() + pad).map(|r| r as i32));
        // Padded rows read the scratch block only.
        let width = p.table_width.max(1);
        let mut bt = p.block_tables.clone();
        for _ in 0..pad {
            bt.push(self.kv.scratch_block() as i32);
            bt.extend(std::iter::repeat_n(0, width - 1));
        }
        let mut last = p.last_rows.clone();
        last.extend((p.tokens..n).map(|r| r as i32));
        let map = |e| gpu_err(e);
        gpu.htod(&ids, b.ids.ptr()).map_err(map)?;
        gpu.htod(&positions, b.positions.ptr()).map_err(map)?;
        gpu.htod(&slots, b.slots.ptr()).map_err(map)?;
        gpu.htod(&ctx_lens, b.ctx_lens.ptr()).map_err(map)?;
        gpu.htod(&bt_rows, b.bt_rows.ptr()).map_err(map)?;
        if width > b.max_blocks {
            return Err(Error::Kv(format!(
                "block tables of {width} blocks, the worker holds {}",
                b.max_blocks
            )));
        }
        gpu.htod_rows_i32(
            &bt,
            (p.order.len() + pad, width),
            b.block_tables.ptr(),
            b.max_blocks,
        )
        .map_err(map)?;
        gpu.htod(&last, b.last_rows.ptr()).map_err(map)?;
        gpu.htod(&p.image_dst, b.image_dst.ptr()).map_err(map)?;
        Ok(())
    }

    /// Runs one step; the logits of each chunk's last token are left in the logits buffer
    /// (row = chunk index, original order) and their arg-max in the arg-max buffers.
    pub fn forward(
        &mut self,
        ctx: &Ctx,
        model: &R4b,
        cfg: &RConfig,
        chunks: &[SeqChunk],
    ) -> Result<()> {
        ctx.gpu.bind().map_err(gpu_err)?;
        let p = self.plan(cfg, chunks)?;
        self.chunk_rows = p
            .last_rows
            .iter()
            .zip(chunks)
            .map(|(&last, c)| (last as usize + 1).saturating_sub(c.tokens.len()))
            .collect();
        // Programmatic dependent launch pays for small steps only (measured, see Gpu::set_pdl).
        ctx.gpu.set_pdl(p.tokens <= PDL_MAX_TOKENS);
        let graphable = !self.limits.enforce_eager && p.decode_only && p.tokens > 0;
        if graphable {
            if let Some(&bucket) = GRAPH_BATCHES.iter().find(|&&b| b >= p.tokens) {
                if bucket <= self.limits.max_seqs {
                    return self.forward_graph(ctx, model, &p, bucket);
                }
            }
        }
        // SAFETY: the plan was validated against the buffers' sizes (tokens, seqs, blocks).
        unsafe {
            self.upload_plan(ctx.gpu, &p, None)?;
            let split = self.bufs.split_for(p.paged_tokens, p.max_paged_ctx, false);
            let pass = Pass {
                plan: &p,
                tokens: p.tokens,
                split,
            };
            self.run(ctx, model, &pass, chunks.len())?;
        }
        Ok(())
    }

    /// The whole step over an uploaded plan: the model's forward, then the head over `seqs`
    /// last rows.
    ///
    /// # Safety
    /// The plan of `pass` is uploaded.
    unsafe fn run(&self, ctx: &Ctx, model: &R4b, pass: &Pass, seqs: usize) -> Result<()> {
        model.forward(ctx, &self.bufs, &self.kv, pass)?;
        model.llm.head(ctx, &self.bufs, seqs)
    }

    fn forward_graph(&mut self, ctx: &Ctx, model: &R4b, p: &StepPlan, bucket: usize) -> Result<()> {
        let split = self.bufs.split_for(bucket, p.max_paged_ctx, true);
        // SAFETY: as in `forward`; the padded rows read a reserved scratch block.
        unsafe {
            self.upload_plan(ctx.gpu, p, Some(bucket))?;
            let key = (bucket, split.1);
            if !self.graphs.contains_key(&key) {
                let stream = ctx.gpu.stream.clone();
                stream
                    .begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                let pass = Pass {
                    plan: p,
                    tokens: bucket,
                    split,
                };
                let run = self.run(ctx, model, &pass, bucket);
                let graph = stream
                    .end_capture(cu::CUgraphInstantiate_flags(0))
                    .map_err(|e| Error::Gpu(e.to_string()))?;
                run?;
                let graph =
                    graph.ok_or_else(|| Error::Gpu("graph capture produced no graph".into()))?;
                self.graphs.insert(key, graph);
            }
            let graph = self
                .graphs
                .get(&key)
                .ok_or_else(|| Error::Gpu("decode graph missing".into()))?;
            graph.launch().map_err(|e| Error::Gpu(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs one step and samples one token for each `(chunk index, row)` in `rows`.
    pub fn step(
        &mut self,
        ctx: &Ctx,
        (model, cfg): (&R4b, &RConfig),
        host_comm: &dyn Collective,
        chunks: &[SeqChunk],
        rows: &[(usize, SampleRow)],
        masks: Option<&mut crate::service::MaskFn>,
    ) -> Result<Vec<SampledToken>> {
        self.forward(ctx, model, cfg, chunks)?;
        let gpu = ctx.gpu;
        if rows.is_empty() {
            gpu.sync().map_err(gpu_err)?;
            return Ok(Vec::new());
        }
        // The forward is queued on the GPU: the grammar masks are computed meanwhile.
        let masks = masks.map(|f| f()).unwrap_or_default();
        let masked = masks.iter().any(Option::is_some);
        // Raw logprobs of a masked row need the unmasked logits: such steps mask on the host
        // sampler's processed copy instead of in place.
        let host_masks = masked
            && rows
                .iter()
                .zip(&masks)
                .any(|((_, r), m)| m.is_some() && r.params.logprobs);
        let fast = rows.iter().all(|(_, r)| {
            r.params.temperature < sampling::GREEDY_TEMPERATURE
                && !r.params.logprobs
                && r.params.presence_penalty == 0.0
                && r.params.frequency_penalty == 0.0
                && r.params.repetition_penalty == 1.0
        });
        let head = &model.llm.lm_head;
        let width = head.vocab_local();
        if masked && rows.iter().any(|&(ci, _)| ci >= chunks.len()) {
            return Err(Error::Step("sample row names no chunk of the step".into()));
        }
        // SAFETY: the logits/argmax buffers hold max_seqs rows; chunk indices < chunks.len().
        unsafe {
            if fast {
                let bufs = self.bufs.argmax();
                if masked {
                    // The forward's arg-max saw the unmasked logits: again over the masked ones.
                    self.sampler
                        .apply_masks(gpu, (self.bufs.logits.ptr(), width), rows, &masks)?;
                    gpu.argmax_rows(
                        self.bufs.logits.ptr(),
                        (chunks.len(), width),
                        bufs.best_val,
                        bufs.best_idx,
                    )
                    .map_err(gpu_err)?;
                }
                let best = head.argmax(ctx, &bufs, chunks.len())?;
                return rows
                    .iter()
                    .map(|&(ci, _)| {
                        Ok(SampledToken {
                            id: *best.get(ci).ok_or_else(|| {
                                Error::Step("sample row names no chunk of the step".into())
                            })?,
                            logprob: 0.0,
                            top: Vec::new(),
                        })
                    })
                    .collect();
            }
            if rows.iter().any(|&(ci, _)| ci >= chunks.len()) {
                return Err(Error::Step("sample row names no chunk of the step".into()));
            }
            let world = ctx.comm.world_size();
            if masked && !host_masks {
                self.sampler
                    .apply_masks(gpu, (self.bufs.logits.ptr(), width), rows, &masks)?;
            }
            if !host_masks && !self.host_sampling && self.sampler.accepts(world, rows) {
                let logits = (self.bufs.logits.ptr(), width, ctx.comm.rank() * width);
                return self.sampler.sample(gpu, logits, ctx.comm, rows);
            }
            let mut host = vec![0f32; chunks.len() * width];
            gpu.dtoh(self.bufs.logits.ptr(), &mut host)
                .map_err(gpu_err)?;
            let mut picked = Vec::with_capacity(rows.len() * width);
            for &(ci, _) in rows {
                picked.extend_from_slice(&host[ci * width..(ci + 1) * width]);
            }
            let t = Tensor::from_vec(picked, (rows.len(), width), &Device::Cpu)?;
            let srows: Vec<SampleRow> = rows.iter().map(|(_, r)| *r).collect();
            if host_masks {
                sampling::sample_logits_masked(&t, host_comm, &srows, &masks)
            } else {
                sampling::sample_logits(&t, host_comm, &srows)
            }
        }
    }

    /// Scores the step's prompt jobs (`prompt_logprobs`), after its sampling: the forward left
    /// the final-normed hidden state of every row in `normed [T, H]` (the head only reads each
    /// chunk's last row), so the head runs again over the rows the jobs need, in blocks of the
    /// logits buffer (`max_seqs` rows: no new device memory), each block downloaded and scored
    /// on the host exactly as on the CPU engine ([`prompt_logprobs_logits`], vocab-parallel
    /// through the host collective). A job's carried row is this rank's host logits `[1, V/w]`
    /// of the previous chunk's last position (not its hidden state); its kept row likewise.
    pub(crate) fn score_prompts(
        &mut self,
        ctx: &Ctx,
        model: &R4b,
        host_comm: &dyn Collective,
        (jobs, chunks): (&[PromptJob], &[SeqChunk]),
    ) -> Result<Vec<(Vec<PromptLogprob>, Option<Tensor>)>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let width = model.llm.lm_head.vocab_local();
        let block = self.bufs.max_seqs.max(1);
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        // The jobs name rows in the step's chunk order; the forward ran the plan's order.
        let mut step_start = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            step_start.push(at);
            at += c.tokens.len();
        }
        let to_gpu_row = |ci: usize, row: usize| -> Result<usize> {
            match (step_start.get(ci), self.chunk_rows.get(ci), chunks.get(ci)) {
                (Some(&s), Some(&g), Some(c)) if (s..s + c.tokens.len()).contains(&row) => {
                    Ok(g + row - s)
                }
                _ => Err(Error::Step(format!(
                    "prompt logprobs: row {row} is not in chunk {ci} of the step"
                ))),
            }
        };
        let mut srcs = Vec::new();
        let mut targets = Vec::new();
        for job in jobs {
            for &(_, src, target) in &job.targets {
                let src = match src {
                    HiddenRow::Step(i) => HiddenRow::Step(to_gpu_row(job.chunk, i)?),
                    HiddenRow::Carry => HiddenRow::Carry,
                };
                srcs.push((src, job.carry.as_ref()));
                targets.push(target);
            }
        }
        // In slices of one logits buffer; every rank slices alike (the same jobs), so the
        // collective calls pair up.
        let mut scored = Vec::with_capacity(targets.len());
        for (srcs, targets) in srcs.chunks(block).zip(targets.chunks(block)) {
            let step_rows: Vec<usize> = srcs
                .iter()
                .filter_map(|&(s, _)| match s {
                    HiddenRow::Step(i) => Some(i),
                    HiddenRow::Carry => None,
                })
                .collect();
            let fresh = self.row_logits(ctx, model, &step_rows, tokens)?;
            let mut fresh = fresh.chunks_exact(width);
            let mut host = Vec::with_capacity(srcs.len() * width);
            for &(src, carry) in srcs {
                match (src, carry) {
                    (HiddenRow::Step(_), _) => {
                        host.extend_from_slice(fresh.next().ok_or_else(|| {
                            Error::Step("prompt logprobs: missing logits row".into())
                        })?)
                    }
                    (HiddenRow::Carry, Some(c)) => {
                        let row = c.flatten_all()?.to_vec1::<f32>()?;
                        if row.len() != width {
                            return Err(Error::Step(format!(
                                "prompt logprobs: carried row of {} logits, expected {width}",
                                row.len()
                            )));
                        }
                        host.extend(row);
                    }
                    (HiddenRow::Carry, None) => {
                        return Err(Error::Step("prompt logprobs: no carried row".into()))
                    }
                }
            }
            let t = Tensor::from_vec(host, (srcs.len(), width), &Device::Cpu)?;
            scored.extend(prompt_logprobs_logits(&t, host_comm, targets)?);
        }
        // The rows carried into each sequence's next chunk (at most one per job).
        let keep_rows = jobs
            .iter()
            .filter_map(|j| j.keep.map(|i| to_gpu_row(j.chunk, i)))
            .collect::<Result<Vec<usize>>>()?;
        let kept = self.row_logits(ctx, model, &keep_rows, tokens)?;
        let mut kept = kept.chunks_exact(width);
        let mut scored = scored.into_iter();
        jobs.iter()
            .map(|job| {
                let entries: Vec<PromptLogprob> = scored.by_ref().take(job.targets.len()).collect();
                let keep = match job.keep {
                    Some(_) => {
                        let row = kept.next().ok_or_else(|| {
                            Error::Step("prompt logprobs: missing kept row".into())
                        })?;
                        Some(Tensor::from_slice(row, (1, width), &Device::Cpu)?)
                    }
                    None => None,
                };
                Ok((entries, keep))
            })
            .collect()
    }

    /// This rank's f32 logits `[rows, V/w]` of the given rows of the last forward's `normed`
    /// (each < `tokens`, the step's rows), downloaded; through `last` and `logits` in blocks of
    /// `max_seqs` rows (the next step uploads its own `last_rows`).
    fn row_logits(
        &self,
        ctx: &Ctx,
        model: &R4b,
        rows: &[usize],
        tokens: usize,
    ) -> Result<Vec<f32>> {
        let b = &self.bufs;
        let head = &model.llm.lm_head;
        let (width, hidden) = (head.vocab_local(), model.llm.dims.hidden);
        if tokens > b.max_tokens || rows.iter().any(|&r| r >= tokens) {
            return Err(Error::Step(format!(
                "prompt logprobs: a row outside the step's {tokens} rows"
            )));
        }
        let mut out = vec![0f32; rows.len() * width];
        let block = b.max_seqs.max(1);
        for (k, blk) in rows.chunks(block).enumerate() {
            let idx: Vec<i32> = blk.iter().map(|&r| r as i32).collect();
            let r0 = k * block;
            // SAFETY: `last_rows` holds max_seqs ≥ blk.len() i32, `last` as many rows of H,
            // `logits` as many rows of V/w; every index is a row of `normed` this step wrote.
            unsafe {
                ctx.gpu.htod(&idx, b.last_rows.ptr()).map_err(gpu_err)?;
                ctx.gpu
                    .gather_rows(
                        b.last_rows.ptr(),
                        b.normed.ptr(),
                        b.last.ptr(),
                        blk.len(),
                        hidden,
                    )
                    .map_err(gpu_err)?;
                head.logits(ctx, b.last.ptr(), b.logits.ptr(), blk.len())?;
                ctx.gpu
                    .dtoh(
                        b.logits.ptr(),
                        &mut out[r0 * width..(r0 + blk.len()) * width],
                    )
                    .map_err(gpu_err)?;
            }
        }
        Ok(out)
    }

    /// The step's logits of each chunk's last token `[chunks, vocab]` (TP = 1).
    pub fn last_logits(
        &mut self,
        ctx: &Ctx,
        model: &R4b,
        cfg: &RConfig,
        chunks: &[SeqChunk],
    ) -> Result<Vec<f32>> {
        self.forward(ctx, model, cfg, chunks)?;
        let mut host = vec![0f32; chunks.len() * model.llm.lm_head.vocab_local()];
        // SAFETY: the logits buffer holds max_seqs ≥ chunks.len() rows.
        unsafe { ctx.gpu.dtoh(self.bufs.logits.ptr(), &mut host) }.map_err(gpu_err)?;
        Ok(host)
    }

    /// Teacher-forced logits of every token of one chunk `[T, vocab]` (TP = 1). Runs as a
    /// prefill and writes the chunk's keys into the cache.
    pub fn logits_all(
        &mut self,
        ctx: &Ctx,
        model: &R4b,
        cfg: &RConfig,
        chunk: &SeqChunk,
    ) -> Result<Vec<f32>> {
        ctx.gpu.bind().map_err(gpu_err)?;
        let p = self.plan(cfg, std::slice::from_ref(chunk))?;
        ctx.gpu.set_pdl(p.tokens <= PDL_MAX_TOKENS);
        ctx.mark("host plan")?;
        // SAFETY: as in `forward`.
        unsafe {
            self.upload_plan(ctx.gpu, &p, None)?;
            ctx.mark("plan upload")?;
            let split = self.bufs.split_for(p.paged_tokens, p.max_paged_ctx, false);
            let pass = Pass {
                plan: &p,
                tokens: p.tokens,
                split,
            };
            model.forward(ctx, &self.bufs, &self.kv, &pass)?;
            let b = &self.bufs;
            model.llm.lm_head.logits_all(
                ctx,
                b.normed.ptr(),
                b.logits.ptr(),
                (p.tokens, b.max_seqs),
            )
        }
    }
}
