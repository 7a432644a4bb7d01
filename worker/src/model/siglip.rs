//! SigLIP vision tower (R-4B: SigLIP2-so400m, 384 px, patch 14, 27×27 = 729 tokens per view).
//! Reference: transformers `models/siglip/modeling_siglip.py` (`SiglipVisionEmbeddings`,
//! `SiglipEncoderLayer`, `SiglipAttention`, `SiglipMLP`), r4b-model.md §6.
//!
//! Only the layers up to the deepest `vision_feature_layer` are loaded and run; the features are
//! the selected hidden states (0 = embeddings, `i` = after layer `i`) concatenated along the
//! channels in the config's order (transformers `LlavaOnevisionModel.get_image_features`), before
//! `post_layernorm` (which is never loaded), and there is no head.

use candle_core::Tensor;

use crate::checkpoint::Weights;
use crate::config::{RConfig, VisionConfig};
use crate::parallel::Linear;
use crate::Result;

/// LayerNorm with weight and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `{w}.weight [dim]`, `{w}.bias [dim]`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Patch embedding (a stride-14 convolution, computed as a matmul over flattened patches) plus
/// learned position embeddings (no interpolation at 384 px, no CLS token).
#[derive(Clone, Debug)]
struct Embeddings {
    /// `patch_embedding.weight` `[C, 3, p, p]` flattened to `[C, 3·p·p]`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// `position_embedding.weight` `[27², C]`.
    position: Tensor,
    grid: usize,
    patch: usize,
}

impl Embeddings {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (c, p, ch) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let pe = w.pp("patch_embedding");
        let patch_weight = pe.get("weight", &[c, ch, p, p])?.reshape((c, ch * p * p))?;
        Ok(Embeddings {
            patch_weight,
            patch_bias: pe.get("bias", &[c])?,
            position: w
                .pp("position_embedding")
                .get("weight", &[cfg.num_patches(), c])?,
            grid: cfg.grid_side(),
            patch: p,
        })
    }

    /// `pixels [1, 3, S, S] -> [27², C]`.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (g, p) = (self.grid, self.patch);
        let ch = pixels.dim(1)?;
        // 1. Valid convolution: only the top-left g·p pixels are seen (378 of 384).
        let x = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?; // [1, 3, g·p, g·p]
        let x = x.reshape((ch, g, p, g, p))?.permute((1, 3, 0, 2, 4))?; // [g, g, 3, p, p]
        let x = x.contiguous()?.reshape((g * g, ch * p * p))?; // [729, 588]
                                                               // 2. Patch projection + bias, then position embeddings.
        let x = x
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?; // [729, C]
        Ok((x + &self.position)?)
    }
}

/// Bidirectional multi-head self-attention with biases.
#[derive(Clone, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Attention {
            q_proj: Linear::load(&w.pp("q_proj"), c, c, true)?,
            k_proj: Linear::load(&w.pp("k_proj"), c, c, true)?,
            v_proj: Linear::load(&w.pp("v_proj"), c, c, true)?,
            out_proj: Linear::load(&w.pp("out_proj"), c, c, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `[N, C] -> [N, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, self.heads, self.head_dim))?
                .transpose(0, 1)?
                .contiguous()?) // [h, N, hd]
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?; // [h, N, N]
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [h, N, hd]
        let out = out
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, self.heads * self.head_dim))?;
        self.out_proj.forward(&out)
    }
}

/// `fc1 -> gelu_pytorch_tanh -> fc2`.
#[derive(Clone, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::load(&w.pp("fc1"), cfg.intermediate_size, cfg.hidden_size, true)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.hidden_size, cfg.intermediate_size, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu()?)
    }
}

/// Pre-LN encoder block: `x + Attn(LN1(x))`, then `x + MLP(LN2(x))`.
#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(
                &w.pp("layer_norm1"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::load(
                &w.pp("layer_norm2"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        Ok((&x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?)
    }
}

/// The vision tower, truncated at the deepest feature layer.
#[derive(Clone, Debug)]
pub struct VisionTower {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    /// Hidden-state indices whose outputs are concatenated (`RConfig::vision_feature_indices`).
    features: Vec<usize>,
}

impl VisionTower {
    /// Loads from the `model.vision_tower.vision_model` scope; only `cfg.vision_layers_used()` layers.
    pub fn load(w: &Weights, cfg: &RConfig) -> Result<Self> {
        let v = &cfg.vision;
        let embeddings = Embeddings::load(&w.pp("embeddings"), v)?;
        let layers = (0..cfg.vision_layers_used())
            .map(|i| EncoderLayer::load(&w.pp("encoder.layers").pp(i), v))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            embeddings,
            layers,
            features: cfg.vision_feature_indices(),
        })
    }

    /// `pixels [views, 3, S, S] -> features [views, 729, C · features]`, one view at a time
    /// (bounded memory).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let views = pixels.dim(0)?;
        let mut out = Vec::with_capacity(views);
        for i in 0..views {
            // hidden_states[0] = embeddings, hidden_states[l] = after layer l; keep the selected.
            let mut picked: Vec<Option<Tensor>> = vec![None; self.features.len()];
            let mut keep = |state: usize, x: &Tensor| {
                for (slot, &f) in picked.iter_mut().zip(&self.features) {
                    if f == state {
                        *slot = Some(x.clone());
                    }
                }
            };
            let mut x = self.embeddings.forward(&pixels.narrow(0, i, 1)?)?; // [729, C]
            keep(0, &x);
            for (l, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x)?;
                keep(l + 1, &x);
            }
            let picked = picked
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    crate::Error::Step("a vision feature layer was not computed".into())
                })?;
            out.push(Tensor::cat(&picked, 1)?.unsqueeze(0)?); // [1, 729, C · features]
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
