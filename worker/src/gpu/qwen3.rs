//! Qwen3 decoder on the GPU: one rank's shard, paged bf16 KV, the step's forward pass.
//! Shapes per rank (TP = w): nq = 32/w q heads, nkv = 8/w kv heads, hd = 128, F = 9728/w,
//! V = 151936/w vocabulary rows; H = 2560 is whole on every rank.

use r4b_kernels::{DBuf, DecodeAttn, FlashAttn, Gpu, LinearImpl, Nccl, OutType, Residual, RopeKv};

use super::weights::{gpu_err, Loader, Split};
use super::{
    alloc, attention_gemm, part_size, with_bf16, AttnGemm, GpuLimits, StepPlan, GRAPH_BATCHES,
    PREFILL_ROWS, PREFILL_SCRATCH,
};
use crate::config::RConfig;
use crate::parallel::Shard;
use crate::{Error, Result};

struct Layer {
    input_layernorm: DBuf,
    /// `q_proj | k_proj | v_proj` rows of this rank: `[(nq + 2·nkv)·hd, H]`.
    qkv: DBuf,
    q_norm: DBuf,
    k_norm: DBuf,
    /// `o_proj` columns of this rank: `[H, nq·hd]`.
    o_proj: DBuf,
    post_attention_layernorm: DBuf,
    /// `gate_proj | up_proj` rows of this rank: `[2F, H]`.
    gate_up: DBuf,
    /// `down_proj` columns of this rank: `[H, F]`.
    down: DBuf,
    k_cache: Option<DBuf>,
    v_cache: Option<DBuf>,
}

/// Step buffers, sized for `max_tokens` tokens and `max_seqs` sequences.
struct Bufs {
    ids: DBuf,
    positions: DBuf,
    slots: DBuf,
    ctx_lens: DBuf,
    bt_rows: DBuf,
    block_tables: DBuf,
    last_rows: DBuf,
    image_dst: DBuf,
    image_rows: DBuf,
    hidden: DBuf,
    normed: DBuf,
    qkv: DBuf,
    attn: DBuf,
    proj: DBuf,
    gate_up: DBuf,
    act: DBuf,
    last: DBuf,
    logits: DBuf,
    best_val: DBuf,
    best_idx: DBuf,
    gathered: DBuf,
    pm: DBuf,
    pl: DBuf,
    pacc: DBuf,
    kc: DBuf,
    vc: DBuf,
    s: DBuf,
    /// RoPE cos/sin of every position below max_model_len (f32 `[2, max_model_len, hd/2]`).
    rope: DBuf,
}

/// One rank of the decoder.
pub struct Qwen3Gpu {
    embed: DBuf,
    layers: Vec<Layer>,
    norm: DBuf,
    lm_head: DBuf,
    nccl: Option<Nccl>,
    bufs: Bufs,
    pub num_blocks: usize,
    pub vocab_local: usize,
    shard: Shard,
    h: usize,
    nq: usize,
    nkv: usize,
    hd: usize,
    f: usize,
    eps: f32,
    theta: f32,
    block_size: usize,
    max_blocks: usize,
    max_tokens: usize,
    max_seqs: usize,
    max_model_len: usize,
    /// Capacity of the attention partition scratch, in (token, head, partition) entries.
    part_entries: usize,
}

impl Qwen3Gpu {
    pub fn load(
        l: &mut Loader,
        cfg: &RConfig,
        shard: Shard,
        nccl: Option<Nccl>,
        lim: &GpuLimits,
    ) -> Result<Self> {
        let t = &cfg.text;
        let w = shard.world;
        let (h, hd, f_all) = (t.hidden_size, t.head_dim, t.intermediate_size);
        let (nq, nkv, f) = (
            t.num_attention_heads / w,
            t.num_key_value_heads / w,
            f_all / w,
        );
        let vocab_local = t.vocab_size / w;
        let root = "model.language_model";
        let embed = l.upload(
            &format!("{root}.embed_tokens.weight"),
            &[t.vocab_size, h],
            Split::Rows,
        )?;
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let pre = format!("{root}.layers.{i}");
            let a = format!("{pre}.self_attn");
            let m = format!("{pre}.mlp");
            let qkv = alloc(l.gpu, (nq + 2 * nkv) * hd * h * 2)?;
            let mut at = 0;
            for (n, heads) in [
                ("q_proj", t.num_attention_heads),
                ("k_proj", t.num_key_value_heads),
                ("v_proj", t.num_key_value_heads),
            ] {
                at += l.upload_into(
                    &format!("{a}.{n}.weight"),
                    &[heads * hd, h],
                    Split::Rows,
                    &qkv,
                    at,
                )?;
            }
            let gate_up = alloc(l.gpu, 2 * f * h * 2)?;
            let n = l.upload_into(
                &format!("{m}.gate_proj.weight"),
                &[f_all, h],
                Split::Rows,
                &gate_up,
                0,
            )?;
            l.upload_into(
                &format!("{m}.up_proj.weight"),
                &[f_all, h],
                Split::Rows,
                &gate_up,
                n,
            )?;
            layers.push(Layer {
                input_layernorm: l.upload(
                    &format!("{pre}.input_layernorm.weight"),
                    &[h],
                    Split::Replicated,
                )?,
                qkv,
                q_norm: l.upload(&format!("{a}.q_norm.weight"), &[hd], Split::Replicated)?,
                k_norm: l.upload(&format!("{a}.k_norm.weight"), &[hd], Split::Replicated)?,
                o_proj: l.upload(
                    &format!("{a}.o_proj.weight"),
                    &[h, t.num_attention_heads * hd],
                    Split::Cols,
                )?,
                post_attention_layernorm: l.upload(
                    &format!("{pre}.post_attention_layernorm.weight"),
                    &[h],
                    Split::Replicated,
                )?,
                gate_up,
                down: l.upload(&format!("{m}.down_proj.weight"), &[h, f_all], Split::Cols)?,
                k_cache: None,
                v_cache: None,
            });
        }
        let norm = l.upload(&format!("{root}.norm.weight"), &[h], Split::Replicated)?;
        // Stored lm_head or tied embedding: the CPU model's decision (model/head.rs).
        let head = crate::model::head::head_source(cfg, l.ckpt)?;
        let lm_head = l.upload(head.tensor(), &[t.vocab_size, h], Split::Rows)?;

        let (tmax, smax) = (lim.max_tokens.max(lim.max_seqs), lim.max_seqs);
        let max_blocks = lim.max_model_len.div_ceil(lim.block_size);
        // Partition scratch: what the largest graph bucket needs (eager steps adapt the partition
        // size to it).
        let part_entries = GRAPH_BATCHES
            .iter()
            .filter(|&&b| b <= smax)
            .map(|&b| b * nq * lim.max_model_len.div_ceil(part_size(b)).next_power_of_two())
            .max()
            .unwrap_or(0)
            // Every paged token of an eager step needs at least one partition.
            .max(tmax * nq * 2);
        let qkv_w = (nq + 2 * nkv) * hd;
        let ctx = lim.max_model_len;
        let a = |bytes: usize| alloc(l.gpu, bytes);
        let bufs = Bufs {
            ids: a(tmax * 4)?,
            positions: a(tmax * 4)?,
            slots: a(tmax * 4)?,
            ctx_lens: a(tmax * 4)?,
            bt_rows: a(tmax * 4)?,
            block_tables: a(smax * max_blocks * 4)?,
            last_rows: a(smax * 4)?,
            image_dst: a(tmax * 4)?,
            image_rows: a(tmax * h * 2)?,
            // The residual stream, f32.
            hidden: a(tmax * h * 4)?,
            normed: a(tmax * h * 2)?,
            qkv: a(tmax * qkv_w * 2)?,
            attn: a(tmax * nq * hd * 2)?,
            proj: a(tmax * h * 2)?,
            gate_up: a(tmax * 2 * f * 2)?,
            act: a(tmax * f * 2)?,
            last: a(smax * h * 2)?,
            logits: a(smax * vocab_local * 4)?,
            best_val: a(smax * 4)?,
            best_idx: a(smax * 4)?,
            gathered: a(w * smax * 2 * 4)?,
            pm: a(part_entries * 4)?,
            pl: a(part_entries * 4)?,
            pacc: a(part_entries * hd * 4)?,
            kc: a(ctx * nkv * hd * 2)?,
            vc: a(ctx * nkv * hd * 2)?,
            s: a(PREFILL_SCRATCH.max(nkv * PREFILL_ROWS * ctx * 2))?,
            rope: a(2 * ctx * (hd / 2) * 4)?,
        };
        // SAFETY: `rope` holds 2 · max_model_len · hd/2 f32.
        unsafe {
            l.gpu
                .rope_table(bufs.rope.ptr(), ctx, hd, t.rope_theta as f32)
        }
        .map_err(gpu_err)?;
        Ok(Qwen3Gpu {
            embed,
            layers,
            norm,
            lm_head,
            nccl,
            bufs,
            num_blocks: 0,
            vocab_local,
            shard,
            h,
            nq,
            nkv,
            hd,
            f,
            eps: t.rms_norm_eps as f32,
            theta: t.rope_theta as f32,
            block_size: lim.block_size,
            max_blocks,
            max_tokens: tmax,
            max_seqs: smax,
            max_model_len: lim.max_model_len,
            part_entries,
        })
    }

    /// Times the one-row products of a decode step on this rank's real weights (every layer in
    /// turn, so the weights stream from memory as in a step, not from L2) through each
    /// implementation, and keeps the fastest. Runs before any graph is captured. Returns one
    /// line per decision.
    pub fn tune_one_row(&self, gpu: &Gpu) -> Result<Vec<String>> {
        let b = &self.bufs;
        let (h, f, qkv_w) = (self.h, self.f, (self.nq + 2 * self.nkv) * self.hd);
        let layers = self.layers.len().max(1) as f64;
        type Pick = fn(&Layer) -> u64;
        let shapes: [(&str, Pick, u64, u64, usize, usize); 4] = [
            (
                "qkv",
                |l| l.qkv.ptr(),
                b.normed.ptr(),
                b.qkv.ptr(),
                qkv_w,
                h,
            ),
            (
                "o_proj",
                |l| l.o_proj.ptr(),
                b.attn.ptr(),
                b.proj.ptr(),
                h,
                self.nq * self.hd,
            ),
            (
                "gate_up",
                |l| l.gate_up.ptr(),
                b.normed.ptr(),
                b.gate_up.ptr(),
                2 * f,
                h,
            ),
            ("down", |l| l.down.ptr(), b.act.ptr(), b.proj.ptr(), h, f),
        ];
        let imps = [LinearImpl::Blas, LinearImpl::Gemv, LinearImpl::Gemv4];
        let mut report = Vec::new();
        for (name, pick, x, y, n, k) in shapes {
            let mut best = (f64::INFINITY, LinearImpl::Blas);
            let mut line = format!("one-row {name} [{n}x{k}]:");
            for imp in imps {
                let ms = gpu
                    .time_ms(3, || {
                        for l in &self.layers {
                            // SAFETY: x/y are step buffers of at least one row of k/n values.
                            unsafe {
                                gpu.linear_with(imp, x, pick(l), y, (1, n, k), OutType::Bf16)?
                            };
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
        let mut best = (f64::INFINITY, LinearImpl::Blas);
        let mut line = format!("one-row lm_head [{}x{h}]:", self.vocab_local);
        for imp in imps {
            let ms = gpu
                .time_ms(5, || {
                    // SAFETY: `last` holds a row of H, `logits` a row of the local vocabulary.
                    unsafe {
                        gpu.linear_with(
                            imp,
                            b.last.ptr(),
                            self.lm_head.ptr(),
                            b.logits.ptr(),
                            (1, self.vocab_local, h),
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
        gpu.set_linear_impl((self.vocab_local, h), OutType::F32, best.1);
        report.push(format!("{line} -> {:?}", best.1));
        Ok(report)
    }

    /// `(part_size, parts)` of the paged attention for `tokens` queries whose longest context is
    /// `max_ctx`. For graphs the partition count is rounded up to a power of two (fewer graphs).
    pub fn split_for(&self, tokens: usize, max_ctx: usize, graph: bool) -> (usize, usize) {
        let mut ps = part_size(tokens);
        let cap_parts = |ps: usize| self.max_model_len.div_ceil(ps).next_power_of_two();
        let mut parts = max_ctx.div_ceil(ps).max(1);
        if graph {
            parts = parts.next_power_of_two().min(cap_parts(ps));
        }
        let entries = |parts: usize| tokens.max(1) * self.nq * parts;
        while entries(parts) > self.part_entries && ps < self.max_model_len {
            ps *= 2;
            parts = max_ctx.div_ceil(ps).max(1);
            if graph {
                parts = parts.next_power_of_two().min(cap_parts(ps));
            }
        }
        (ps, parts)
    }

    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * 2 * self.nkv * self.hd * 2
    }

    /// Allocates the KV cache: `limits.num_blocks` blocks, or as many as fit in
    /// `memory_utilization` of the device, plus one scratch block (padded graph rows write
    /// there). Every rank must end with the same count: the caller takes the minimum.
    pub fn alloc_kv(&mut self, gpu: &Gpu, lim: &GpuLimits) -> Result<()> {
        let (free, total) = gpu.mem_info().map_err(gpu_err)?;
        let used = total - free;
        let budget = (total as f64 * lim.memory_utilization) as usize;
        // Graphs, cuBLAS and NCCL take some memory after this point.
        let reserve = 512 << 20;
        let per_block = self.kv_bytes_per_token() * self.block_size;
        let fit = budget.saturating_sub(used + reserve) / per_block.max(1);
        let blocks = match lim.num_blocks {
            0 => fit,
            n => n,
        };
        if blocks < 2 || (lim.num_blocks > 0 && lim.num_blocks > fit) {
            return Err(Error::Kv(format!(
                "{blocks} KV blocks wanted, {fit} fit in {:.1} GiB ({:.0}% of {:.1} GiB, {:.1} GiB in use)",
                budget.saturating_sub(used) as f64 / (1u64 << 30) as f64,
                lim.memory_utilization * 100.0,
                total as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64
            )));
        }
        // The last block is the scratch block.
        self.num_blocks = blocks - 1;
        let layer_bytes = blocks * self.block_size * self.nkv * self.hd * 2;
        for l in &mut self.layers {
            let k = alloc(gpu, layer_bytes)?;
            let v = alloc(gpu, layer_bytes)?;
            // SAFETY: fresh allocations of `layer_bytes`.
            unsafe {
                gpu.memset0(k.ptr(), layer_bytes).map_err(gpu_err)?;
                gpu.memset0(v.ptr(), layer_bytes).map_err(gpu_err)?;
            }
            l.k_cache = Some(k);
            l.v_cache = Some(v);
        }
        gpu.sync().map_err(gpu_err)
    }

    /// This rank's NCCL communicator (world size above 1, or forced at 1).
    pub fn nccl(&self) -> Option<&Nccl> {
        self.nccl.as_ref()
    }

    pub fn logits_ptr(&self) -> u64 {
        self.bufs.logits.ptr()
    }

    /// Copies the plan's metadata and image rows to the device; with `pad_to`, pads the decode
    /// rows to that many (padding tokens: id 0 at position 0 in the scratch block, context 1).
    /// `on_device` says where a chunk's image rows already are on the device, if anywhere.
    pub unsafe fn upload_plan(
        &self,
        gpu: &Gpu,
        p: &StepPlan,
        pad_to: Option<usize>,
        on_device: &dyn Fn(&[half::bf16]) -> Option<u64>,
    ) -> Result<()> {
        let b = &self.bufs;
        let n = pad_to.unwrap_or(p.tokens);
        if n > self.max_tokens || p.order.len() > self.max_seqs {
            return Err(Error::Step("step larger than the worker's buffers".into()));
        }
        let pad = n - p.tokens;
        let scratch_slot = (self.num_blocks * self.block_size) as i32;
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
            bt.push(self.num_blocks as i32);
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
        if width > self.max_blocks {
            return Err(Error::Kv(format!(
                "block tables of {width} blocks, the worker holds {}",
                self.max_blocks
            )));
        }
        gpu.htod_rows_i32(
            &bt,
            (p.order.len() + pad, width),
            b.block_tables.ptr(),
            self.max_blocks,
        )
        .map_err(map)?;
        gpu.htod(&last, b.last_rows.ptr()).map_err(map)?;
        gpu.htod(&p.image_dst, b.image_dst.ptr()).map_err(map)?;
        let mut at = 0;
        for r in &p.image_rows {
            let n = r.elem_count();
            if at + n > self.max_tokens * self.h {
                return Err(Error::Step(
                    "image rows larger than the step buffers".into(),
                ));
            }
            // SAFETY: `image_rows` holds max_tokens rows of H (checked just above); a device
            // copy of `r` holds as many values as `r`.
            with_bf16(r, |v| match on_device(v) {
                Some(src) => gpu
                    .dtod(src, b.image_rows.at(at, 2), v.len() * 2)
                    .map_err(map),
                None => gpu.htod(v, b.image_rows.at(at, 2)).map_err(map),
            })?;
            at += n;
        }
        Ok(())
    }

    /// All-reduce over the group (no-op at TP = 1).
    unsafe fn all_reduce(&self, buf: u64, count: usize) -> Result<()> {
        if let Some(n) = &self.nccl {
            n.all_reduce_bf16(buf, count).map_err(gpu_err)?;
        }
        Ok(())
    }

    /// The decoder over `tokens` rows (the plan's, possibly padded) up to the final norm:
    /// `bufs.normed` holds the normed hidden states.
    pub unsafe fn run_hidden(
        &self,
        gpu: &Gpu,
        p: &StepPlan,
        tokens: usize,
        (ps, parts): (usize, usize),
    ) -> Result<()> {
        let b = &self.bufs;
        let (h, nq, nkv, hd, f) = (self.h, self.nq, self.nkv, self.hd, self.f);
        let e = gpu_err;
        let start = self.shard.rank * self.vocab_local;
        // Embeddings (bf16, in `proj`): vocab-parallel rows summed over ranks, then the image rows.
        gpu.embed_gather(
            b.ids.ptr(),
            self.embed.ptr(),
            b.proj.ptr(),
            tokens,
            h,
            (start, self.vocab_local),
        )
        .map_err(e)?;
        self.all_reduce(b.proj.ptr(), tokens * h)?;
        gpu.scatter_rows(
            b.image_dst.ptr(),
            b.image_rows.ptr(),
            b.proj.ptr(),
            p.image_dst.len(),
            h,
        )
        .map_err(e)?;
        gpu.mark("embed").map_err(e)?;
        let qkv_w = (nq + 2 * nkv) * hd;
        // Padded graph rows are decodes too.
        let paged = if tokens > p.tokens {
            tokens
        } else {
            p.paged_tokens
        };
        for (i, l) in self.layers.iter().enumerate() {
            let (kc, vc) = match (&l.k_cache, &l.v_cache) {
                (Some(k), Some(v)) => (k.ptr(), v.ptr()),
                _ => return Err(Error::Kv("KV cache not allocated".into())),
            };
            // x = x + mlp(previous) (layer 0: x = embeddings); normed = RMSNorm(x).
            let prev = if i == 0 {
                Residual::Set(b.proj.ptr())
            } else {
                Residual::Add(b.proj.ptr())
            };
            gpu.add_rmsnorm(
                b.hidden.ptr(),
                prev,
                l.input_layernorm.ptr(),
                b.normed.ptr(),
                (tokens, h),
                self.eps,
            )
            .map_err(e)?;
            gpu.mark("add_rmsnorm").map_err(e)?;
            gpu.linear(
                b.normed.ptr(),
                l.qkv.ptr(),
                b.qkv.ptr(),
                (tokens, qkv_w, h),
                OutType::Bf16,
                false,
            )
            .map_err(e)?;
            gpu.mark("gemm qkv").map_err(e)?;
            gpu.qk_norm_rope_kv(&RopeKv {
                qkv: b.qkv.ptr(),
                q_norm: l.q_norm.ptr(),
                k_norm: l.k_norm.ptr(),
                positions: b.positions.ptr(),
                slots: b.slots.ptr(),
                k_cache: kc,
                v_cache: vc,
                tokens,
                nq,
                nkv,
                head_dim: hd,
                eps: self.eps,
                theta: self.theta,
                table: Some((b.rope.ptr(), self.max_model_len)),
            })
            .map_err(e)?;
            gpu.mark("qk_norm_rope_kv").map_err(e)?;
            if paged > 0 {
                gpu.decode_attention(&DecodeAttn {
                    q: b.qkv.ptr(),
                    q_stride: qkv_w,
                    k_cache: kc,
                    v_cache: vc,
                    ctx_lens: b.ctx_lens.ptr(),
                    bt_rows: b.bt_rows.ptr(),
                    block_tables: b.block_tables.ptr(),
                    max_blocks: self.max_blocks,
                    block_size: self.block_size,
                    tokens: paged,
                    nq,
                    nkv,
                    head_dim: hd,
                    part_size: ps,
                    parts,
                    scale: 1.0 / (hd as f32).sqrt(),
                    pm: b.pm.ptr(),
                    pl: b.pl.ptr(),
                    pacc: b.pacc.ptr(),
                    out: b.attn.ptr(),
                    out_stride: nq * hd,
                })
                .map_err(e)?;
                gpu.mark("attention (paged)").map_err(e)?;
            }
            self.prefill_attention(gpu, p, (kc, vc))?;
            gpu.mark("attention (prefill gemm)").map_err(e)?;
            gpu.linear(
                b.attn.ptr(),
                l.o_proj.ptr(),
                b.proj.ptr(),
                (tokens, h, nq * hd),
                OutType::Bf16,
                false,
            )
            .map_err(e)?;
            gpu.mark("gemm o_proj").map_err(e)?;
            self.all_reduce(b.proj.ptr(), tokens * h)?;
            gpu.mark("all-reduce").map_err(e)?;
            gpu.add_rmsnorm(
                b.hidden.ptr(),
                Residual::Add(b.proj.ptr()),
                l.post_attention_layernorm.ptr(),
                b.normed.ptr(),
                (tokens, h),
                self.eps,
            )
            .map_err(e)?;
            gpu.mark("add_rmsnorm").map_err(e)?;
            gpu.gate_up_silu(
                b.normed.ptr(),
                l.gate_up.ptr(),
                (b.gate_up.ptr(), b.act.ptr()),
                (tokens, f, h),
            )
            .map_err(e)?;
            gpu.mark("gemm gate_up + silu_mul").map_err(e)?;
            gpu.linear(
                b.act.ptr(),
                l.down.ptr(),
                b.proj.ptr(),
                (tokens, h, f),
                OutType::Bf16,
                false,
            )
            .map_err(e)?;
            gpu.mark("gemm down").map_err(e)?;
            self.all_reduce(b.proj.ptr(), tokens * h)?;
            gpu.mark("all-reduce").map_err(e)?;
        }
        gpu.add_rmsnorm(
            b.hidden.ptr(),
            Residual::Add(b.proj.ptr()),
            self.norm.ptr(),
            b.normed.ptr(),
            (tokens, h),
            self.eps,
        )
        .map_err(e)?;
        Ok(())
    }

    /// Causal attention of every long prefill chunk (after the paged rows) over its cached keys:
    /// the tensor-core kernel, or gathered keys and cuBLAS products for head dims it lacks.
    unsafe fn prefill_attention(
        &self,
        gpu: &Gpu,
        p: &StepPlan,
        (kc, vc): (u64, u64),
    ) -> Result<()> {
        let b = &self.bufs;
        let (nq, nkv, hd) = (self.nq, self.nkv, self.hd);
        let qkv_w = (nq + 2 * nkv) * hd;
        let mut row = p.paged_tokens;
        for j in p.paged_chunks..p.order.len() {
            let len = p.lens[j];
            let first_pos = p.positions[row] as usize;
            let ctx = first_pos + len;
            let bt = b.block_tables.at(j * self.max_blocks, 4);
            if gpu.has_flash(hd) {
                // Tensor cores, straight from the paged cache.
                gpu.flash_attention(&FlashAttn {
                    q: b.qkv.at(row * qkv_w, 2),
                    q_ld: qkv_w,
                    q_z: 0,
                    k: kc,
                    v: vc,
                    kv_ld: nkv * hd,
                    kv_z: 0,
                    block_table: Some((bt, self.block_size)),
                    out: b.attn.at(row * nq * hd, 2),
                    out_ld: nq * hd,
                    out_z: 0,
                    rows: len,
                    batch: 1,
                    ctx_base: first_pos,
                    nkeys: ctx,
                    nq,
                    nkv,
                    head_dim: hd,
                    causal: true,
                    scale: 1.0 / (hd as f32).sqrt(),
                })
                .map_err(gpu_err)?;
                row += len;
                continue;
            }
            // Other head dims: the keys gathered, two cuBLAS products and a row softmax.
            gpu.gather_kv(
                (kc, vc),
                bt,
                (self.block_size, nkv * hd, ctx),
                (b.kc.ptr(), b.vc.ptr()),
            )
            .map_err(gpu_err)?;
            // As many query rows per product as the score scratch holds at this context.
            let block = (self.bufs.s.bytes() / (nkv * ctx * 2)).max(1);
            for r0 in (0..len).step_by(block) {
                let rows = block.min(len - r0);
                attention_gemm(
                    gpu,
                    &AttnGemm {
                        q: b.qkv.at((row + r0) * qkv_w, 2),
                        q_ld: qkv_w,
                        k: b.kc.ptr(),
                        k_ld: nkv * hd,
                        v: b.vc.ptr(),
                        v_ld: nkv * hd,
                        out: b.attn.at((row + r0) * nq * hd, 2),
                        out_ld: nq * hd,
                        rows,
                        ctx: first_pos + r0 + rows,
                        nkv,
                        group: nq / nkv,
                        hd,
                        causal_base: Some(first_pos + r0),
                        scale: 1.0 / (hd as f32).sqrt(),
                        s: b.s.ptr(),
                    },
                )?;
            }
            row += len;
        }
        Ok(())
    }

    /// The whole step: decoder, last rows, head, arg-max (`seqs` rows).
    pub unsafe fn run(
        &self,
        gpu: &Gpu,
        p: &StepPlan,
        tokens: usize,
        seqs: usize,
        split: (usize, usize),
    ) -> Result<()> {
        self.run_hidden(gpu, p, tokens, split)?;
        let b = &self.bufs;
        let e = gpu_err;
        gpu.gather_rows(
            b.last_rows.ptr(),
            b.normed.ptr(),
            b.last.ptr(),
            seqs,
            self.h,
        )
        .map_err(e)?;
        gpu.linear(
            b.last.ptr(),
            self.lm_head.ptr(),
            b.logits.ptr(),
            (seqs, self.vocab_local, self.h),
            OutType::F32,
            false,
        )
        .map_err(e)?;
        gpu.mark("final norm + lm_head").map_err(e)?;
        gpu.argmax_rows(
            b.logits.ptr(),
            (seqs, self.vocab_local),
            b.best_val.ptr(),
            b.best_idx.ptr(),
        )
        .map_err(e)?;
        gpu.mark("argmax").map_err(e)?;
        Ok(())
    }

    /// Global arg-max of the first `seqs` logit rows (ties: lowest id), merged over ranks.
    pub unsafe fn argmax(&self, gpu: &Gpu, seqs: usize) -> Result<Vec<u32>> {
        let b = &self.bufs;
        let world = self.shard.world;
        let mut words = vec![0u32; world * 2 * seqs];
        if let Some(n) = &self.nccl {
            // Pack [values | indices] and gather from every rank.
            gpu.dtod(b.best_val.ptr(), b.gathered.ptr(), seqs * 4)
                .map_err(gpu_err)?;
            gpu.dtod(
                b.best_idx.ptr(),
                b.gathered.ptr() + (seqs * 4) as u64,
                seqs * 4,
            )
            .map_err(gpu_err)?;
            let recv = b.gathered.ptr() + (2 * seqs * 4) as u64;
            n.all_gather_u32(b.gathered.ptr(), recv, 2 * seqs)
                .map_err(gpu_err)?;
            gpu.dtoh(recv, &mut words).map_err(gpu_err)?;
        } else {
            gpu.dtoh(b.best_val.ptr(), &mut words[..seqs])
                .map_err(gpu_err)?;
            gpu.dtoh(b.best_idx.ptr(), &mut words[seqs..2 * seqs])
                .map_err(gpu_err)?;
        }
        let mut out = Vec::with_capacity(seqs);
        for s in 0..seqs {
            let mut best = (f32::NEG_INFINITY, u32::MAX);
            for r in 0..world {
                let base = r * 2 * seqs;
                let v = f32::from_bits(words[base + s]);
                let id = words[base + seqs + s] + (r * self.vocab_local) as u32;
                if v > best.0 || (v == best.0 && id < best.1) {
                    best = (v, id);
                }
            }
            out.push(best.1);
        }
        Ok(out)
    }

    /// Logits of all `tokens` rows after `run_hidden` (TP = 1), `[tokens, vocab]` f32 on the host.
    pub unsafe fn logits_all(&self, gpu: &Gpu, tokens: usize) -> Result<Vec<f32>> {
        let b = &self.bufs;
        let mut out = vec![0f32; tokens * self.vocab_local];
        for r0 in (0..tokens).step_by(self.max_seqs) {
            let n = self.max_seqs.min(tokens - r0);
            gpu.linear(
                b.normed.at(r0 * self.h, 2),
                self.lm_head.ptr(),
                b.logits.ptr(),
                (n, self.vocab_local, self.h),
                OutType::F32,
                false,
            )
            .map_err(gpu_err)?;
            gpu.dtoh(
                b.logits.ptr(),
                &mut out[r0 * self.vocab_local..(r0 + n) * self.vocab_local],
            )
            .map_err(gpu_err)?;
        }
        Ok(out)
    }
}
