//! Qwen3 decoder (R-4B's LLM: Qwen3-4B, 36 layers, 32 Q / 8 KV heads of 128, SwiGLU 9728).
//! Reference: transformers `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`, `Qwen3MLP`,
//! `Qwen3DecoderLayer`, `Qwen3RMSNorm`, `Qwen3RotaryEmbedding`), r4b-model.md §7.
//!
//! The decoder sees embeddings, never images. A step is a flat batch of `T` tokens from several
//! sequences (prefill chunks and single-token decodes); attention reads and writes the paged KV
//! cache through each sequence's block table.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::checkpoint::Weights;
use crate::collective::Collective;
use crate::config::TextConfig;
use crate::kv::PagedKvCache;
use crate::parallel::{ColumnParallelLinear, RowParallelLinear, Shard, VocabParallelEmbedding};
use crate::{Error, Result};

/// Where one sequence's tokens sit in a step's flat batch.
#[derive(Clone, Debug)]
pub struct SeqSpan<'a> {
    /// Row of the first token in the flat batch.
    pub offset: usize,
    /// Tokens of this sequence in the step.
    pub len: usize,
    /// Position of the first token.
    pub start_pos: usize,
    /// The sequence's KV blocks.
    pub block_table: &'a [u32],
}

/// RMSNorm without bias or offset, computed in f32: `x · rsqrt(mean(x²) + eps) · w`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{w}.weight [dim]`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get("weight", &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Rotary position embedding, NeoX "rotate_half" convention over the full head width.
/// Frequencies are computed in f32 exactly as transformers does (`inv_freq = 1 / θ^(2i/d)`,
/// `angle = pos · inv_freq`), so positions land on the same floats.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = 1 / θ^(2i / head_dim)`, `i < head_dim / 2`.
    pub fn new(theta: f64, head_dim: usize) -> Self {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { inv_freq }
    }

    /// `cos, sin [T, head_dim]` for the given positions (each half repeated, as `cat(freqs, freqs)`).
    pub fn cos_sin(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for &p in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let dims = (positions.len(), 2 * half);
        Ok((
            Tensor::from_vec(cos, dims, device)?,
            Tensor::from_vec(sin, dims, device)?,
        ))
    }

    /// `x [T, heads, d] -> x·cos + rotate_half(x)·sin`, with `cos, sin [T, d]`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?); // [T, 1, d]
        Ok((x.broadcast_mul(&cos.to_dtype(x.dtype())?)?
            + rotated.broadcast_mul(&sin.to_dtype(x.dtype())?)?)?)
    }
}

/// Grouped-query attention with per-head q/k RMSNorm, split by heads across ranks.
#[derive(Clone, Debug)]
struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    /// Query heads on this rank.
    heads: usize,
    /// KV heads on this rank.
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(
        w: &Weights,
        cfg: &TextConfig,
        shard: Shard,
        comm: &Arc<dyn Collective>,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Attention {
            q_proj: ColumnParallelLinear::load(&w.pp("q_proj"), cfg.q_width(), h, shard)?,
            k_proj: ColumnParallelLinear::load(&w.pp("k_proj"), cfg.kv_width(), h, shard)?,
            v_proj: ColumnParallelLinear::load(&w.pp("v_proj"), cfg.kv_width(), h, shard)?,
            o_proj: RowParallelLinear::load(
                &w.pp("o_proj"),
                h,
                cfg.q_width(),
                shard,
                comm.clone(),
            )?,
            q_norm: RmsNorm::load(&w.pp("q_norm"), d, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(&w.pp("k_norm"), d, cfg.rms_norm_eps)?,
            heads: shard.part(cfg.num_attention_heads, "num_attention_heads")?,
            kv_heads: shard.part(cfg.num_key_value_heads, "num_key_value_heads")?,
            head_dim: d,
        })
    }

    /// `x [T, hidden] -> [T, hidden]` (all-reduced), writing this step's K/V into the cache.
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        spans: &[SeqSpan],
        kv: &mut PagedKvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let d = self.head_dim;
        // 1. Projections, per-head RMSNorm on q and k, then RoPE (after the norms).
        let q = self
            .q_norm
            .forward(&self.q_proj.forward(x)?.reshape((t, self.heads, d))?)?; // [T, hq, d]
        let k = self
            .k_norm
            .forward(&self.k_proj.forward(x)?.reshape((t, self.kv_heads, d))?)?; // [T, hkv, d]
        let v = self.v_proj.forward(x)?.reshape((t, self.kv_heads, d))?; // [T, hkv, d]
        let q = Rope::apply(&q, rope.0, rope.1)?;
        let k = Rope::apply(&k, rope.0, rope.1)?;
        // 2. Per sequence: store K/V, attend causally over everything the sequence has cached.
        let mut outs = Vec::with_capacity(spans.len());
        for s in spans {
            let k_s = k
                .narrow(0, s.offset, s.len)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let v_s = v
                .narrow(0, s.offset, s.len)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            kv.write(layer, s.block_table, s.start_pos, &k_s, &v_s)?;
            outs.push(self.attend(&q.narrow(0, s.offset, s.len)?, s, kv, layer)?);
        }
        let o = Tensor::cat(&outs, 0)?; // [T, hq·d]
        self.o_proj.forward(&o)
    }

    /// `q [n, hq, d]` of one sequence against its cached `K, V [L, hkv, d]`, `L = start + n`.
    fn attend(&self, q: &Tensor, s: &SeqSpan, kv: &PagedKvCache, layer: usize) -> Result<Tensor> {
        let (n, d) = (s.len, self.head_dim);
        let l = s.start_pos + n;
        let group = self.heads / self.kv_heads;
        let (k, v) = kv.gather(layer, s.block_table, l, q.device())?;
        let k = k.to_dtype(q.dtype())?.transpose(0, 1)?.contiguous()?; // [hkv, L, d]
        let v = v.to_dtype(q.dtype())?.transpose(0, 1)?.contiguous()?; // [hkv, L, d]
                                                                       // Query head h = g·group + j uses KV head g: [hq, n, d] -> [hkv, group·n, d].
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.kv_heads, group * n, d))?;
        let scale = (d as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((self.kv_heads, group, n, l))?;
        // Causal mask: query i (position start + i) sees keys 0 ..= start + i.
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..l).map(move |j| {
                    if j <= s.start_pos + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, l), q.device())?.to_dtype(scores.dtype())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let out = probs.reshape((self.kv_heads, group * n, l))?.matmul(&v)?; // [hkv, group·n, d]
        let out = out.reshape((self.heads, n, d))?.transpose(0, 1)?; // [n, hq, d]
        Ok(out.contiguous()?.reshape((n, self.heads * d))?)
    }
}

/// SwiGLU: `down(silu(gate(x)) ⊙ up(x))`, gate/up split by columns, down by rows.
#[derive(Clone, Debug)]
struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

impl Mlp {
    fn load(
        w: &Weights,
        cfg: &TextConfig,
        shard: Shard,
        comm: &Arc<dyn Collective>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: ColumnParallelLinear::load(&w.pp("gate_proj"), i, h, shard)?,
            up_proj: ColumnParallelLinear::load(&w.pp("up_proj"), i, h, shard)?,
            down_proj: RowParallelLinear::load(&w.pp("down_proj"), h, i, shard, comm.clone())?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?; // [T, I / world]
        self.down_proj.forward(&h)
    }
}

/// `h = x + Attn(RMSNorm(x))`, `x' = h + MLP(RMSNorm(h))`.
#[derive(Clone, Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        w: &Weights,
        cfg: &TextConfig,
        shard: Shard,
        comm: &Arc<dyn Collective>,
    ) -> Result<Self> {
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                &w.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg, shard, comm)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(&w.pp("mlp"), cfg, shard, comm)?,
        })
    }
}

/// The Qwen3 decoder stack (`model.language_model` scope): embeddings, layers, final norm.
#[derive(Clone, Debug)]
pub struct Qwen3 {
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: Rope,
    vocab_size: usize,
}

impl Qwen3 {
    /// Loads this rank's shard.
    pub fn load(
        w: &Weights,
        cfg: &TextConfig,
        shard: Shard,
        comm: Arc<dyn Collective>,
    ) -> Result<Self> {
        let embed_tokens = VocabParallelEmbedding::load(
            &w.pp("embed_tokens"),
            cfg.vocab_size,
            cfg.hidden_size,
            shard,
            comm.clone(),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(&w.pp("layers").pp(i), cfg, shard, &comm))
            .collect::<Result<Vec<_>>>()?;
        Ok(Qwen3 {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            rope: Rope::new(cfg.rope_theta, cfg.head_dim),
            vocab_size: cfg.vocab_size,
        })
    }

    /// `ids [T] -> embeddings [T, hidden]` (vocab-parallel lookup + all-reduce).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::Step(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.vocab_size
            )));
        }
        self.embed_tokens.forward(ids)
    }

    /// `embeds [T, hidden] -> final-normed hidden states [T, hidden]`, for a flat batch laid out by `spans`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        spans: &[SeqSpan],
        kv: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let positions: Vec<usize> = spans
            .iter()
            .flat_map(|s| s.start_pos..s.start_pos + s.len)
            .collect();
        if positions.len() != embeds.dim(0)? {
            return Err(Error::Step(format!(
                "{} positions for {} embedding rows",
                positions.len(),
                embeds.dim(0)?
            )));
        }
        let (cos, sin) = self.rope.cos_sin(&positions, embeds.device())?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.self_attn.forward(
                &layer.input_layernorm.forward(&x)?,
                (&cos, &sin),
                spans,
                kv,
                i,
            )?;
            let h = (x + h)?;
            let m = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&h)?)?;
            x = (h + m)?;
        }
        self.norm.forward(&x)
    }
}
