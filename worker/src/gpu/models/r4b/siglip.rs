//! SigLIP vision tower + R-4B projector on the GPU (bf16). Same blocks
//! and math as `model/siglip.rs` and `model/projector.rs` (transformers
//! `models/siglip/modeling_siglip.py`: `SiglipVisionEmbeddings`, `SiglipEncoderLayer`,
//! `SiglipAttention`, `SiglipMLP`; vLLM `models/rvl.py`: `RVLMultiModalProjector`).
//!
//! Shapes: a batch of `nv ≤ VIEWS_PER_BATCH` views of 384² px; patch 14, so `N = 27² = 729`
//! tokens per view and `R = nv·N` rows; C = 1152 channels, 16 heads of 72, MLP 4304; the projector
//! maps C → H = 2560. Only the layers up to the feature layer are loaded and run.
//!
//! At TP > 1 the tower is sharded like the decoder, so each image runs once over the group, not
//! once per rank: q/k/v, fc1 and the projector's linear_1 are column-parallel (each rank holds
//! `heads / world` heads and its slice of the MLP), out_proj, fc2 and linear_2 row-parallel
//! (one all-reduce each, the bias added once after it). Every rank ends with the same rows.
//! Chosen over splitting images across ranks: a request usually brings one image (7 views at
//! most), which would leave most of 8 ranks idle, while the sharded tower splits every view's
//! work 8 ways with the layer types and all-reduce the decoder already uses.

use r4b_kernels::{DBuf, FlashAttn, Gpu, OutType};

use crate::config::RConfig;
use crate::gpu::layers::{
    attention_gemm, AttentionKernels, AttnGemm, ColumnParallelLinear, Ctx, LayerNorm,
    PrefillKernel, RowParallelLinear,
};
use crate::gpu::weights::{gpu_err, Loader, Split};
use crate::{Error, Result};

/// Views encoded per batch (bounds the activation buffers).
pub const VIEWS_PER_BATCH: usize = 8;

/// Patch embedding (a stride-14 convolution as a product over flattened patches) plus learned
/// position embeddings.
struct Embeddings {
    /// `patch_embedding.weight` `[C, 3, p, p]` (read as `[C, 3·p·p]`) and its bias `[C]`.
    patch_weight: DBuf,
    patch_bias: DBuf,
    /// `position_embedding.weight` `[N, C]`.
    position: DBuf,
}

/// Full (non-causal) multi-head attention within each view; `q | k | v` fused.
struct SiglipAttention {
    /// `q_proj | k_proj | v_proj`: this rank's heads, `[3C / world, C]`, bias `[3C / world]`.
    qkv: ColumnParallelLinear,
    /// `[C, C / world]`, bias `[C]`.
    out_proj: RowParallelLinear,
    /// Heads on this rank.
    heads: usize,
    head_dim: usize,
    kernels: AttentionKernels,
}

struct Mlp {
    /// `[F / world, C]`.
    fc1: ColumnParallelLinear,
    /// `[C, F / world]`.
    fc2: RowParallelLinear,
}

/// Pre-LN encoder block: `x + Attn(LN1(x))`, then `x + MLP(LN2(x))`.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SiglipAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

/// `pre_norm` LayerNorm(1e-6) → `linear_1` → GELU(erf) → `linear_2`.
struct Projector {
    pre_norm: LayerNorm,
    /// `[H / world, C]`.
    linear_1: ColumnParallelLinear,
    /// `[H, H / world]`.
    linear_2: RowParallelLinear,
}

/// Activations of one batch of views (owned by the runner, passed to [`Siglip::forward`]).
pub struct VisionBuffers {
    /// f32 pixels `[nv, 3, 384, 384]`.
    pub px: DBuf,
    patches: DBuf,
    x: DBuf,
    n: DBuf,
    qkv: DBuf,
    attn: DBuf,
    tmp: DBuf,
    f: DBuf,
    s: DBuf,
    proj1: DBuf,
}

/// The vision tower and the projector.
pub struct Siglip {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    projector: Projector,
    /// C, MLP width, H (whole).
    channels: usize,
    intermediate: usize,
    text_hidden: usize,
    /// Ranks the tower is sharded over.
    world: usize,
    /// View side (px), patch side (px), patches per side.
    image_size: usize,
    patch_size: usize,
    grid: usize,
}

impl Siglip {
    /// Loads `model.vision_tower.vision_model.*` (the layers used) and
    /// `model.multi_modal_projector.*`.
    pub fn load(l: &mut Loader, cfg: &RConfig) -> Result<Self> {
        let v = &cfg.vision;
        let (c, f, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
        let h = cfg.text.hidden_size;
        let eps = v.layer_norm_eps as f32;
        let world = l.shard.world.max(1);
        for (field, value) in [
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.intermediate_size", f),
            ("text_config.hidden_size", h),
        ] {
            if !value.is_multiple_of(world) {
                return Err(Error::TensorParallel {
                    tp: world,
                    reason: format!("{field} = {value} is not divisible by it (vision tower)"),
                });
            }
        }
        let root = "model.vision_tower.vision_model";
        let emb = format!("{root}.embeddings");
        let embeddings = Embeddings {
            patch_weight: l.upload(
                &format!("{emb}.patch_embedding.weight"),
                &[c, v.num_channels, p, p],
                Split::Replicated,
            )?,
            patch_bias: l.upload(
                &format!("{emb}.patch_embedding.bias"),
                &[c],
                Split::Replicated,
            )?,
            position: l.upload(
                &format!("{emb}.position_embedding.weight"),
                &[v.num_patches(), c],
                Split::Replicated,
            )?,
        };
        // Full attention, heads = kv heads (the decode kernel is never used here).
        let kernels = AttentionKernels::choose(l.gpu, c / v.num_attention_heads, 1);
        let mut layers = Vec::new();
        for i in 0..cfg.vision_layers_used() {
            let pre = format!("{root}.encoder.layers.{i}");
            let a = format!("{pre}.self_attn");
            let (q, k, vv) = (
                format!("{a}.q_proj"),
                format!("{a}.k_proj"),
                format!("{a}.v_proj"),
            );
            let qkv = ColumnParallelLinear::load_biased(l, &[(&q, c), (&k, c), (&vv, c)], c)?;
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(l, &format!("{pre}.layer_norm1"), c, eps)?,
                self_attn: SiglipAttention {
                    qkv,
                    out_proj: RowParallelLinear::load_biased(l, &format!("{a}.out_proj"), (c, c))?,
                    heads: v.num_attention_heads / world,
                    head_dim: c / v.num_attention_heads,
                    kernels,
                },
                layer_norm2: LayerNorm::load(l, &format!("{pre}.layer_norm2"), c, eps)?,
                mlp: Mlp {
                    fc1: ColumnParallelLinear::load_biased(
                        l,
                        &[(&format!("{pre}.mlp.fc1"), f)],
                        c,
                    )?,
                    fc2: RowParallelLinear::load_biased(l, &format!("{pre}.mlp.fc2"), (c, f))?,
                },
            });
        }
        let proj = "model.multi_modal_projector";
        let projector = Projector {
            pre_norm: LayerNorm::load(l, &format!("{proj}.pre_norm"), c, 1e-6)?,
            linear_1: ColumnParallelLinear::load_biased(l, &[(&format!("{proj}.linear_1"), h)], c)?,
            linear_2: RowParallelLinear::load_biased(l, &format!("{proj}.linear_2"), (h, h))?,
        };
        Ok(Siglip {
            embeddings,
            layers,
            projector,
            channels: c,
            intermediate: f,
            text_hidden: h,
            world,
            image_size: v.image_size,
            patch_size: p,
            grid: v.grid_side(),
        })
    }

    /// Tokens per view (`N = grid²`).
    pub fn tokens_per_view(&self) -> usize {
        self.grid * self.grid
    }

    /// f32 pixel values per view (`3 · 384²`).
    pub fn pixels_per_view(&self) -> usize {
        3 * self.image_size * self.image_size
    }

    /// Activation buffers for [`VIEWS_PER_BATCH`] views.
    pub fn buffers(&self, gpu: &Gpu, cfg: &RConfig) -> Result<VisionBuffers> {
        let (c, f, h, p) = (
            self.channels,
            self.intermediate,
            self.text_hidden,
            self.patch_size,
        );
        let n = self.tokens_per_view();
        let rows = VIEWS_PER_BATCH * n;
        let a = |bytes: usize| gpu.alloc(bytes).map_err(gpu_err);
        Ok(VisionBuffers {
            px: a(VIEWS_PER_BATCH * self.pixels_per_view() * 4)?,
            patches: a(rows * 3 * p * p * 2)?,
            x: a(rows * c * 2)?,
            n: a(rows * c * 2)?,
            qkv: a(rows * 3 * c * 2)?,
            attn: a(rows * c * 2)?,
            tmp: a(rows * c * 2)?,
            f: a(rows * f * 2)?,
            s: a(cfg.vision.num_attention_heads * n * n * 2)?,
            proj1: a(rows * h * 2)?,
        })
    }

    /// `nv` views' pixels (already in `b.px`) → projected features `out [nv·N, H]` (bf16).
    ///
    /// # Safety
    /// `nv ≤ VIEWS_PER_BATCH`; `out` holds `nv·N` rows of H.
    pub unsafe fn forward(&self, ctx: &Ctx, b: &VisionBuffers, nv: usize, out: u64) -> Result<()> {
        let gpu = ctx.gpu;
        let (c, n) = (self.channels, self.tokens_per_view());
        let rows = nv * n;
        // 1. Patches: [nv, 3, 384, 384] -> [R, 3·p·p] -> [R, C], + bias + position embeddings.
        gpu.im2col_patches(
            b.px.ptr(),
            b.patches.ptr(),
            nv,
            (self.image_size, self.patch_size),
        )
        .map_err(gpu_err)?;
        let k = 3 * self.patch_size * self.patch_size;
        let e = &self.embeddings;
        gpu.linear(
            b.patches.ptr(),
            e.patch_weight.ptr(),
            b.x.ptr(),
            (rows, c, k),
            OutType::Bf16,
            false,
        )
        .map_err(gpu_err)?;
        gpu.add_pos_embed(
            b.x.ptr(),
            (e.patch_bias.ptr(), e.position.ptr()),
            (rows, c, n),
        )
        .map_err(gpu_err)?;
        ctx.mark("vision patch embed")?;
        // 2. Encoder layers: [R, C] -> [R, C].
        for layer in &self.layers {
            self.layer(ctx, b, layer, nv)?;
        }
        // 3. Projector: [R, C] -> LayerNorm -> linear_1 + GELU(erf) [R, H] -> linear_2 [R, H].
        let p = &self.projector;
        p.pre_norm.forward(gpu, b.x.ptr(), b.n.ptr(), rows)?;
        p.linear_1
            .forward_bias_act(ctx, b.n.ptr(), b.proj1.ptr(), rows, 2)?;
        p.linear_2
            .forward_bias_act(ctx, b.proj1.ptr(), out, rows, 0)?;
        ctx.mark("vision projector")
    }

    /// One pre-LN encoder block over `nv` views (`x` in place).
    unsafe fn layer(
        &self,
        ctx: &Ctx,
        b: &VisionBuffers,
        l: &EncoderLayer,
        nv: usize,
    ) -> Result<()> {
        let gpu = ctx.gpu;
        // c: this rank's channels of the attention (its heads); the residual stream is whole.
        let (c, n) = (self.channels / self.world, self.tokens_per_view());
        let rows = nv * n;
        // x = x + out_proj(Attn(LN1(x))).
        l.layer_norm1.forward(gpu, b.x.ptr(), b.n.ptr(), rows)?;
        let a = &l.self_attn;
        a.qkv
            .forward_bias_act(ctx, b.n.ptr(), b.qkv.ptr(), rows, 0)?;
        ctx.mark("vision ln + qkv")?;
        let hd = a.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        match a.kernels.prefill {
            // Every view at once: view z's rows start at z·N.
            PrefillKernel::Flash => gpu
                .flash_attention(&FlashAttn {
                    q: b.qkv.ptr(),
                    q_ld: 3 * c,
                    q_z: n * 3 * c,
                    k: b.qkv.at(c, 2),
                    v: b.qkv.at(2 * c, 2),
                    kv_ld: 3 * c,
                    kv_z: n * 3 * c,
                    block_table: None,
                    out: b.attn.ptr(),
                    out_ld: c,
                    out_z: n * c,
                    rows: n,
                    batch: nv,
                    ctx_base: 0,
                    nkeys: n,
                    nq: a.heads,
                    nkv: a.heads,
                    head_dim: hd,
                    causal: false,
                    scale,
                })
                .map_err(gpu_err)?,
            PrefillKernel::GemmProducts => {
                for v in 0..nv {
                    let q = b.qkv.at(v * n * 3 * c, 2);
                    attention_gemm(
                        gpu,
                        &AttnGemm {
                            q,
                            q_ld: 3 * c,
                            k: q + (c * 2) as u64,
                            k_ld: 3 * c,
                            v: q + (2 * c * 2) as u64,
                            v_ld: 3 * c,
                            out: b.attn.at(v * n * c, 2),
                            out_ld: c,
                            rows: n,
                            ctx: n,
                            nkv: a.heads,
                            group: 1,
                            hd,
                            causal_base: None,
                            scale,
                            s: b.s.ptr(),
                        },
                    )?;
                }
            }
        }
        a.out_proj
            .forward_residual(ctx, b.attn.ptr(), (b.tmp.ptr(), b.x.ptr()), rows)?;
        ctx.mark("vision attention + out")?;
        // x = x + fc2(GELU-tanh(fc1(LN2(x)))).
        l.layer_norm2.forward(gpu, b.x.ptr(), b.n.ptr(), rows)?;
        l.mlp
            .fc1
            .forward_bias_act(ctx, b.n.ptr(), b.f.ptr(), rows, 1)?;
        l.mlp
            .fc2
            .forward_residual(ctx, b.f.ptr(), (b.tmp.ptr(), b.x.ptr()), rows)?;
        ctx.mark("vision mlp")
    }
}
