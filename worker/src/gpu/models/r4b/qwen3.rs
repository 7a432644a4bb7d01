//! Qwen3 decoder on the GPU: one rank's shard, the same blocks as the CPU reference
//! (`model/qwen3.rs`; transformers `models/qwen3/modeling_qwen3.py`: `Qwen3Attention`,
//! `Qwen3MLP`, `Qwen3DecoderLayer`, `Qwen3Model`).
//!
//! Shapes per rank (TP = w): nq = 32/w q heads, nkv = 8/w kv heads, hd = 128, F = 9728/w,
//! V = 151936/w vocabulary rows; H = 2560 is whole on every rank; T = tokens of the step,
//! S = sequences. The residual stream is f32 (`hidden`), everything else bf16.

use r4b_kernels::Residual;

use crate::config::RConfig;
use crate::gpu::buffers::StepBuffers;
use crate::gpu::kv::GpuKv;
use crate::gpu::layers::{
    Attention, AttentionKernels, ColumnParallelLinear, Ctx, RmsNorm, Rotary, RowParallelLinear,
    VocabParallelEmbedding, VocabParallelHead,
};
use crate::gpu::plan::Pass;
use crate::gpu::weights::{gpu_err, Loader};
use crate::parallel::Shard;
use crate::Result;

/// The decoder's sizes on one rank, computed once from the config and the shard.
#[derive(Clone, Copy, Debug)]
pub struct Qwen3Dims {
    pub layers: usize,
    /// H.
    pub hidden: usize,
    pub nq: usize,
    pub nkv: usize,
    pub head_dim: usize,
    /// F (this rank's part of `intermediate_size`).
    pub intermediate: usize,
    /// V / w.
    pub vocab_local: usize,
}

impl Qwen3Dims {
    /// Per-rank sizes (the config was checked against the world size by `validate_tp`).
    pub fn new(cfg: &RConfig, shard: Shard) -> Self {
        let (t, w) = (&cfg.text, shard.world.max(1));
        Qwen3Dims {
            layers: t.num_hidden_layers,
            hidden: t.hidden_size,
            nq: t.num_attention_heads / w,
            nkv: t.num_key_value_heads / w,
            head_dim: t.head_dim,
            intermediate: t.intermediate_size / w,
            vocab_local: t.vocab_size / w,
        }
    }

    /// Width of the fused `q | k | v` output: `(nq + 2·nkv)·hd`.
    pub fn qkv_width(&self) -> usize {
        (self.nq + 2 * self.nkv) * self.head_dim
    }

    /// KV bytes per token on this rank (bf16).
    pub fn kv_bytes_per_token(&self) -> usize {
        GpuKv::bytes_per_token(self.layers, self.nkv, self.head_dim)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
pub struct Mlp {
    /// `gate_proj | up_proj` rows of this rank: `[2F, H]`.
    pub gate_up: ColumnParallelLinear,
    /// `down_proj` columns of this rank: `[H, F]`.
    pub down_proj: RowParallelLinear,
}

/// Pre-norm decoder layer: `x += attn(norm(x))`, `x += mlp(norm(x))`.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// One rank of the decoder.
pub struct Qwen3 {
    pub embed_tokens: VocabParallelEmbedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: VocabParallelHead,
    pub rotary: Rotary,
    pub dims: Qwen3Dims,
}

impl Qwen3 {
    /// Loads this rank's shard (`model.language_model.*`); the rotary table covers
    /// `max_positions` positions.
    pub fn load(l: &mut Loader, cfg: &RConfig, max_positions: usize) -> Result<Self> {
        let t = &cfg.text;
        let dims = Qwen3Dims::new(cfg, l.shard);
        let (h, hd, f_all) = (t.hidden_size, t.head_dim, t.intermediate_size);
        let eps = t.rms_norm_eps as f32;
        let root = "model.language_model";
        let embed_tokens =
            VocabParallelEmbedding::load(l, &format!("{root}.embed_tokens"), (t.vocab_size, h))?;
        let kernels =
            AttentionKernels::choose(l.gpu, hd, dims.nq.checked_div(dims.nkv).unwrap_or(0));
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let pre = format!("{root}.layers.{i}");
            let a = format!("{pre}.self_attn");
            let m = format!("{pre}.mlp");
            let (q, k, v) = (
                format!("{a}.q_proj"),
                format!("{a}.k_proj"),
                format!("{a}.v_proj"),
            );
            let qkv = ColumnParallelLinear::load(
                l,
                &[
                    (&q, t.num_attention_heads * hd),
                    (&k, t.num_key_value_heads * hd),
                    (&v, t.num_key_value_heads * hd),
                ],
                h,
            )?;
            let (gate, up) = (format!("{m}.gate_proj"), format!("{m}.up_proj"));
            let gate_up = ColumnParallelLinear::load(l, &[(&gate, f_all), (&up, f_all)], h)?;
            let input_layernorm = RmsNorm::load(l, &format!("{pre}.input_layernorm"), h, eps)?;
            let self_attn = Attention {
                qkv,
                q_norm: RmsNorm::load(l, &format!("{a}.q_norm"), hd, eps)?,
                k_norm: RmsNorm::load(l, &format!("{a}.k_norm"), hd, eps)?,
                o_proj: RowParallelLinear::load(
                    l,
                    &format!("{a}.o_proj"),
                    (h, t.num_attention_heads * hd),
                )?,
                nq: dims.nq,
                nkv: dims.nkv,
                head_dim: hd,
                kernels,
            };
            let post_attention_layernorm =
                RmsNorm::load(l, &format!("{pre}.post_attention_layernorm"), h, eps)?;
            let down_proj = RowParallelLinear::load(l, &format!("{m}.down_proj"), (h, f_all))?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp: Mlp { gate_up, down_proj },
            });
        }
        let norm = RmsNorm::load(l, &format!("{root}.norm"), h, eps)?;
        // Stored lm_head or tied embedding: the CPU model's decision (model/head.rs).
        let head = crate::model::head::head_source(cfg, l.ckpt)?;
        let lm_head = VocabParallelHead::load(l, head.tensor(), (t.vocab_size, h))?;
        let rotary = Rotary::new(l.gpu, max_positions, hd, t.rope_theta as f32)?;
        Ok(Qwen3 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            dims,
        })
    }

    /// Token embeddings `b.ids` (i32 `[T]`) → `b.proj` (bf16 `[T, H]`), summed over ranks.
    ///
    /// # Safety
    /// The step buffers hold `tokens` rows of the uploaded plan.
    pub unsafe fn embed(&self, ctx: &Ctx, b: &StepBuffers, tokens: usize) -> Result<()> {
        self.embed_tokens
            .forward(ctx, b.ids.ptr(), b.proj.ptr(), tokens)
    }

    /// The decoder over the embeddings in `b.proj` (`pass.tokens` rows) up to the final norm:
    /// `b.normed [T, H]` holds the normed hidden states. Reads and writes `kv`.
    ///
    /// # Safety
    /// The step buffers hold the uploaded plan of `pass`; `kv` is this model's cache.
    pub unsafe fn forward_embeds(
        &self,
        ctx: &Ctx,
        b: &StepBuffers,
        kv: &GpuKv,
        pass: &Pass,
    ) -> Result<()> {
        let tokens = pass.tokens;
        for (i, l) in self.layers.iter().enumerate() {
            let kv = kv.layer(i)?;
            // 1. x = x + mlp(previous) (layer 0: x = embeddings); normed = RMSNorm(x).
            let prev = match i {
                0 => Residual::Set(b.proj.ptr()),
                _ => Residual::Add(b.proj.ptr()),
            };
            l.input_layernorm.forward_residual(
                ctx.gpu,
                b.hidden.ptr(),
                prev,
                b.normed.ptr(),
                tokens,
            )?;
            ctx.mark("add_rmsnorm")?;
            // 2. proj = attention(normed) [T, H], all-reduced.
            l.self_attn.forward(ctx, b, &kv, &self.rotary, pass)?;
            // 3. x = x + proj; normed = RMSNorm(x).
            l.post_attention_layernorm.forward_residual(
                ctx.gpu,
                b.hidden.ptr(),
                Residual::Add(b.proj.ptr()),
                b.normed.ptr(),
                tokens,
            )?;
            ctx.mark("add_rmsnorm")?;
            // 4. act = silu(gate) · up [T, F]; proj = act · downᵀ [T, H], all-reduced (added to x
            // by the next layer's norm, or the final norm).
            l.mlp.gate_up.forward_silu_mul(
                ctx,
                b.normed.ptr(),
                (b.gate_up.ptr(), b.act.ptr()),
                tokens,
            )?;
            ctx.mark("gemm gate_up + silu_mul")?;
            l.mlp
                .down_proj
                .forward(ctx, b.act.ptr(), b.proj.ptr(), tokens, "gemm down")?;
        }
        // 5. x = x + proj; normed = RMSNorm(x) (final norm).
        self.norm.forward_residual(
            ctx.gpu,
            b.hidden.ptr(),
            Residual::Add(b.proj.ptr()),
            b.normed.ptr(),
            tokens,
        )
    }

    /// Each sequence's last row (`b.last_rows`) → its logits `b.logits [S, V/w]` and local
    /// arg-max.
    ///
    /// # Safety
    /// After [`Qwen3::forward_embeds`]; the buffers hold `seqs` rows.
    pub unsafe fn head(&self, ctx: &Ctx, b: &StepBuffers, seqs: usize) -> Result<()> {
        ctx.gpu
            .gather_rows(
                b.last_rows.ptr(),
                b.normed.ptr(),
                b.last.ptr(),
                seqs,
                self.dims.hidden,
            )
            .map_err(gpu_err)?;
        self.lm_head
            .forward(ctx, b.last.ptr(), b.logits.ptr(), &b.argmax(), seqs)
    }
}
