//! R-4B's multimodal projector: `pre_norm` LayerNorm(eps 1e-6) → `linear_1` (vision → text width,
//! bias) → GELU (exact erf) → `linear_2` (text → text, bias). Its input width is the selected
//! features' ([`RConfig::vision_feature_width`]: `vision_config.hidden_size` per feature layer).
//! Reference: vLLM `model_executor/models/rvl.py` (`RVLMultiModalProjector`), r4b-model.md §1.1.

use candle_core::Tensor;

use crate::checkpoint::Weights;
use crate::config::RConfig;
use crate::model::siglip::LayerNorm;
use crate::parallel::Linear;
use crate::Result;

/// Projector from SigLIP features to the decoder width.
#[derive(Clone, Debug)]
pub struct Projector {
    pre_norm: LayerNorm,
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    /// Loads from the `model.multi_modal_projector` scope.
    pub fn load(w: &Weights, cfg: &RConfig) -> Result<Self> {
        let (cv, ct) = (cfg.vision_feature_width(), cfg.text.hidden_size);
        Ok(Projector {
            pre_norm: LayerNorm::load(&w.pp("pre_norm"), cv, 1e-6)?,
            linear_1: Linear::load(&w.pp("linear_1"), ct, cv, true)?,
            linear_2: Linear::load(&w.pp("linear_2"), ct, ct, true)?,
        })
    }

    /// `[N, C_vision] -> [N, C_text]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .linear_1
            .forward(&self.pre_norm.forward(x)?)?
            .gelu_erf()?;
        self.linear_2.forward(&h)
    }
}
