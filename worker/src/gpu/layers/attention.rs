//! Attention: Qwen3's paged self-attention layer ([`Attention`]) and the kernel choice it makes
//! once ([`AttentionKernels`]); the cuBLAS-product path ([`attention_gemm`]) shared with SigLIP.

use r4b_kernels::{
    DBuf, DecodeAttention, DecodeAttn, DevPtr, FlashAttn, Gemm, Gpu, OutType, RopeKv,
};

use super::{ColumnParallelLinear, Ctx, RmsNorm, RowParallelLinear};
use crate::gpu::buffers::StepBuffers;
use crate::gpu::kv::KvLayer;
use crate::gpu::plan::Pass;
use crate::gpu::weights::gpu_err;
use crate::Result;

/// How causal attention over a long prefill chunk (and SigLIP's full attention) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// Tensor-core flash attention, straight from the paged cache.
    Flash,
    /// Keys gathered, two strided-batched cuBLAS products and a row softmax ([`attention_gemm`]):
    /// head dims the flash kernel is not built for.
    GemmProducts,
}

/// The attention kernels of one head dim on one GPU, chosen when the layer is built.
///
/// Decodes and short prefill chunks run the paged split-context kernel (one query token at a
/// time) named by `decode`; long prefill chunks run [`PrefillKernel`] (rows per CTA:
/// `KernelOptions::prefill_rows`, applied by `Gpu::flash_attention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionKernels {
    pub prefill: PrefillKernel,
    /// The paged decode kernel: `KernelOptions::decode_attention` where it is built for the head
    /// dim and group, else the CUDA-core kernel.
    pub decode: DecodeAttention,
}

impl AttentionKernels {
    /// The kernels for `head_dim` with `group` query heads per kv head on `gpu` (from its
    /// `KernelOptions`).
    pub fn choose(gpu: &Gpu, head_dim: usize, group: usize) -> Self {
        let wanted = gpu.options.decode_attention;
        AttentionKernels {
            prefill: match gpu.has_flash(head_dim) {
                true => PrefillKernel::Flash,
                false => PrefillKernel::GemmProducts,
            },
            decode: match gpu.has_decode_attention(wanted, head_dim, group) {
                true => wanted,
                false => DecodeAttention::CudaCore,
            },
        }
    }
}

/// RoPE cos/sin of every position below `max_positions` (f32 `[2, max_positions, hd/2]`),
/// computed once on the device.
pub struct Rotary {
    table: DBuf,
    max_positions: usize,
    theta: f32,
}

impl Rotary {
    pub fn new(gpu: &Gpu, max_positions: usize, head_dim: usize, theta: f32) -> Result<Self> {
        let table = gpu
            .alloc(2 * max_positions * (head_dim / 2) * 4)
            .map_err(gpu_err)?;
        // SAFETY: `table` holds 2 · max_positions · hd/2 f32.
        unsafe { gpu.rope_table(table.ptr(), max_positions, head_dim, theta) }.map_err(gpu_err)?;
        Ok(Rotary {
            table,
            max_positions,
            theta,
        })
    }
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

/// Qwen3 self-attention of one rank (its `nq` query heads and `nkv` kv heads):
/// `qkv` column-parallel (fused `q | k | v`), per-head RMSNorm of q and k, RoPE, the paged KV
/// write, attention, `o_proj` row-parallel.
pub struct Attention {
    /// `q_proj | k_proj | v_proj` rows of this rank: `[(nq + 2·nkv)·hd, H]`.
    pub qkv: ColumnParallelLinear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    /// `o_proj` columns of this rank: `[H, nq·hd]`.
    pub o_proj: RowParallelLinear,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    pub kernels: AttentionKernels,
}

impl Attention {
    fn qkv_width(&self) -> usize {
        (self.nq + 2 * self.nkv) * self.head_dim
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// `b.normed [T, H]` → `b.proj [T, H]` (all-reduced); writes the step's keys and values into
    /// `kv` (the slots of the plan).
    ///
    /// # Safety
    /// The step buffers hold `pass.tokens` rows and the uploaded plan; `kv` is this layer's cache.
    pub unsafe fn forward(
        &self,
        ctx: &Ctx,
        b: &StepBuffers,
        kv: &KvLayer,
        rotary: &Rotary,
        pass: &Pass,
    ) -> Result<()> {
        let (gpu, tokens) = (ctx.gpu, pass.tokens);
        let (nq, nkv, hd) = (self.nq, self.nkv, self.head_dim);
        let qkv_w = self.qkv_width();
        // 1. qkv = normed · [q|k|v]ᵀ: [T, H] -> [T, (nq + 2·nkv)·hd].
        self.qkv.forward(ctx, b.normed.ptr(), b.qkv.ptr(), tokens)?;
        ctx.mark("gemm qkv")?;
        // 2. q, k ← RMSNorm per head, RoPE at each token's position; k, v → the paged cache.
        gpu.qk_norm_rope_kv(&RopeKv {
            qkv: b.qkv.ptr(),
            q_norm: self.q_norm.weight_ptr(),
            k_norm: self.k_norm.weight_ptr(),
            positions: b.positions.ptr(),
            slots: b.slots.ptr(),
            k_cache: kv.k,
            v_cache: kv.v,
            tokens,
            nq,
            nkv,
            head_dim: hd,
            eps: self.q_norm.eps(),
            theta: rotary.theta,
            table: Some((rotary.table.ptr(), rotary.max_positions)),
        })
        .map_err(gpu_err)?;
        ctx.mark("qk_norm_rope_kv")?;
        // 3. Paged rows (decodes, short prefills): split-context attention → attn [T, nq·hd].
        let paged = pass.paged_rows();
        if paged > 0 {
            let (ps, parts) = pass.split;
            gpu.decode_attention(&DecodeAttn {
                q: b.qkv.ptr(),
                q_stride: qkv_w,
                k_cache: kv.k,
                v_cache: kv.v,
                ctx_lens: b.ctx_lens.ptr(),
                bt_rows: b.bt_rows.ptr(),
                block_tables: b.block_tables.ptr(),
                max_blocks: kv.max_blocks,
                block_size: kv.block_size,
                tokens: paged,
                nq,
                nkv,
                head_dim: hd,
                part_size: ps,
                parts,
                scale: self.scale(),
                pm: b.pm.ptr(),
                pl: b.pl.ptr(),
                pacc: b.pacc.ptr(),
                out: b.attn.ptr(),
                out_stride: nq * hd,
                kernel: self.kernels.decode,
            })
            .map_err(gpu_err)?;
            ctx.mark("attention (paged)")?;
        }
        // 4. Long prefill chunks: causal attention over their cached keys.
        self.prefill(gpu, b, kv, pass)?;
        ctx.mark("attention (prefill gemm)")?;
        // 5. proj = attn · o_projᵀ: [T, nq·hd] -> [T, H], summed over ranks.
        self.o_proj
            .forward(ctx, b.attn.ptr(), b.proj.ptr(), tokens, "gemm o_proj")
    }

    /// Causal attention of every long prefill chunk (after the paged rows) over its cached keys.
    unsafe fn prefill(&self, gpu: &Gpu, b: &StepBuffers, kv: &KvLayer, pass: &Pass) -> Result<()> {
        let p = pass.plan;
        let (nq, nkv, hd) = (self.nq, self.nkv, self.head_dim);
        let qkv_w = self.qkv_width();
        let mut row = p.paged_tokens;
        for j in p.paged_chunks..p.order.len() {
            let len = p.lens[j];
            let first_pos = p.positions[row] as usize;
            let ctx = first_pos + len;
            let bt = b.block_tables.at(j * kv.max_blocks, 4);
            match self.kernels.prefill {
                PrefillKernel::Flash => {
                    gpu.flash_attention(&FlashAttn {
                        q: b.qkv.at(row * qkv_w, 2),
                        q_ld: qkv_w,
                        q_z: 0,
                        k: kv.k,
                        v: kv.v,
                        kv_ld: nkv * hd,
                        kv_z: 0,
                        block_table: Some((bt, kv.block_size)),
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
                        scale: self.scale(),
                    })
                    .map_err(gpu_err)?;
                }
                PrefillKernel::GemmProducts => {
                    gpu.gather_kv(
                        (kv.k, kv.v),
                        bt,
                        (kv.block_size, nkv * hd, ctx),
                        (b.kc.ptr(), b.vc.ptr()),
                    )
                    .map_err(gpu_err)?;
                    // As many query rows per product as the score scratch holds at this context.
                    let block = (b.s.bytes() / (nkv * ctx * 2)).max(1);
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
                                scale: self.scale(),
                                s: b.s.ptr(),
                            },
                        )?;
                    }
                }
            }
            row += len;
        }
        Ok(())
    }
}
