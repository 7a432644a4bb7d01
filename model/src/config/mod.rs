//! The checkpoint's `config.json` (LLaVA-OneVision / R-4B `RConfig` fields), resolved as
//! transformers resolves it and parsed into typed structs. Every value the model uses is read
//! here once; derived counts (`head_dim`, heads per rank, layers used by the vision tower, tokens
//! per tile) are methods, not literals elsewhere.
//!
//! - A field absent from `config.json` takes the default of its config class (`Qwen3Config`,
//!   `SiglipVisionConfig`, `LlavaOnevisionConfig`): one table, [`defaults`], with its source.
//!   Every resolved value keeps where it came from ([`Resolved`]); `r4b inspect` prints them.
//! - Every variant transformers accepts is either served exactly or refused here, at start-up,
//!   with the field named: e.g. `config.json: field `vision_feature_select_strategy`: ...`.
//! - `image_grid_pinpoints` may come from `config.json`, the class default or
//!   `preprocessor_config.json`; the model's and the processor's lists must agree
//!   ([`RConfig::from_file`]).

pub mod defaults;
mod preprocessor;
mod resolve;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde_json::Value;

use crate::anyres::ImageGeometry;
use crate::{Error, Result};

pub use preprocessor::ImagePreprocessing;
use resolve::{config_err, Log, Reader};
pub use resolve::{ConfigFile, Resolved, Source};

/// Tensor-parallel sizes the engine supports.
pub const SUPPORTED_TP: [usize; 4] = [1, 2, 4, 8];

/// `architectures` names served: vLLM registers R-4B as `RForConditionalGeneration` (`rvl.py`,
/// a LLaVA-OneVision subclass); transformers' own class is the LLaVA-OneVision one.
pub const ARCHITECTURES: [&str; 2] = [
    "RForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
];

/// `model_type` names served: LLaVA-OneVision's and `rvl` (vLLM's module name for R-4B). R-4B's
/// remote code (`auto_map.AutoConfig` = [`R4B_REMOTE_CONFIG`]) is accepted whatever its
/// `model_type`, with LLaVA-OneVision's class defaults.
pub const MODEL_TYPES: [&str; 2] = ["llava_onevision", "rvl"];

/// R-4B's remote config class (`auto_map.AutoConfig`; seen in HF's traceback, r4b-model.md §1.1).
pub const R4B_REMOTE_CONFIG: &str = "configuration_r.RConfig";

/// Floating-point type of the weights on disk (`torch_dtype` / `dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDtype {
    /// `float32`
    F32,
    /// `float16`
    F16,
    /// `bfloat16`
    Bf16,
}

/// The Qwen3 decoder (`text_config`). Reference: transformers `models/qwen3/modeling_qwen3.py`.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Model width (2560 for R-4B).
    pub hidden_size: usize,
    /// SwiGLU inner width (9728).
    pub intermediate_size: usize,
    /// Decoder layers (36).
    pub num_hidden_layers: usize,
    /// Query heads (32).
    pub num_attention_heads: usize,
    /// Key/value heads (8, GQA).
    pub num_key_value_heads: usize,
    /// Per-head width (128; not hidden_size / heads for Qwen3).
    pub head_dim: usize,
    /// RMSNorm epsilon (also q_norm / k_norm).
    pub rms_norm_eps: f64,
    /// RoPE base θ (1e6).
    pub rope_theta: f64,
    /// Embedding rows (151936).
    pub vocab_size: usize,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// Query heads over key/value heads (4 for R-4B).
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
    /// Width of the concatenated query heads (q_proj out features).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    /// Width of the concatenated key (or value) heads.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// The SigLIP vision tower (`vision_config`). Reference: transformers `models/siglip/modeling_siglip.py`.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Width (1152).
    pub hidden_size: usize,
    /// MLP inner width (4304).
    pub intermediate_size: usize,
    /// Encoder layers stored in the checkpoint (26 or 27).
    pub num_hidden_layers: usize,
    /// Attention heads (16).
    pub num_attention_heads: usize,
    /// Side of one view in pixels (384).
    pub image_size: usize,
    /// Side of one patch in pixels (14).
    pub patch_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Input channels (3).
    pub num_channels: usize,
}

impl VisionConfig {
    /// Patches per side: 384 / 14 = 27.
    pub fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per view: 27² = 729.
    pub fn num_patches(&self) -> usize {
        self.grid_side() * self.grid_side()
    }
    /// Per-head width: 1152 / 16 = 72.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// `vision_feature_layer`: which hidden states of the vision tower are the image features.
/// Index 0 is the embedding output, `i` the output of encoder layer `i`; negative counts from the
/// end (`-1` = last layer). A list concatenates those hidden states along the channels, in order
/// (transformers `LlavaOnevisionModel.get_image_features`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureLayer {
    /// One hidden state.
    One(i64),
    /// Several, concatenated along the channels.
    Concat(Vec<i64>),
}

impl FeatureLayer {
    /// The indices as written.
    pub fn as_slice(&self) -> &[i64] {
        match self {
            FeatureLayer::One(i) => std::slice::from_ref(i),
            FeatureLayer::Concat(v) => v,
        }
    }
}

/// What the checkpoint says it is (`architectures`, `model_type`, `auto_map.AutoConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Architecture {
    /// `architectures`, as listed (empty when absent).
    pub architectures: Vec<String>,
    /// `model_type`.
    pub model_type: String,
    /// `auto_map.AutoConfig`, when the checkpoint ships remote code.
    pub remote_config: Option<String>,
}

/// The whole R-4B config.
#[derive(Clone, Debug, PartialEq)]
pub struct RConfig {
    /// What the checkpoint says it is.
    pub architecture: Architecture,
    /// Decoder.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Token id of `<image>`.
    pub image_token_index: u32,
    /// Which hidden states of the vision tower are the features.
    pub vision_feature_layer: FeatureLayer,
    /// Anyres resolutions as (height, width); the model's and the processor's list (they agree).
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// `N` of `vision_aspect_ratio = "anyres_max_N"`.
    pub anyres_max_tiles: usize,
    /// Whether the head is tied to the embedding, as transformers resolves it: the top-level
    /// `tie_word_embeddings`, or `text_config`'s when that one is true. Which tensor the head
    /// then is (and when a stored `lm_head.weight` makes it ambiguous) is decided once in
    /// `model::head`, for both backends.
    pub tie_word_embeddings: bool,
    /// dtype on disk as declared (tensors carry their own dtype; this is informative).
    pub dtype: Option<DiskDtype>,
    /// Every resolved value with its source, in reading order.
    pub provenance: Vec<Resolved>,
}

impl RConfig {
    /// Reads `config.json` at `path` and, when it exists, `preprocessor_config.json` next to
    /// it: the processor's pinpoints and tile must agree with the model's, as transformers would
    /// otherwise tile images with one list and pack their features with another.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::CheckpointFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let pre = match path.parent() {
            Some(dir) if dir.join("preprocessor_config.json").exists() => {
                Some(ImagePreprocessing::from_dir(dir)?)
            }
            _ => None,
        };
        Self::resolve(&text, pre.as_ref())
    }

    /// [`RConfig::from_file`] on `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Parses and resolves the JSON text of `config.json` alone (no processor to agree with).
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::resolve(text, None)
    }

    /// Resolves `config.json`'s text; `pre` is the image processor the checkpoint ships.
    pub fn resolve(text: &str, pre: Option<&ImagePreprocessing>) -> Result<Self> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| config_err("<root>", format!("not valid JSON: {e}")))?;
        let log = Log::default();
        let top = Reader::new(
            Some(&root),
            "",
            ConfigFile::Config,
            &defaults::LLAVA_ONEVISION,
            &log,
        )?;
        let architecture = architecture(&top)?;
        let (text, text_tie) = text_config(&top, &log)?;
        let vision = vision_config(&top, &log)?;
        let mut cfg = composite(&top, text, vision, text_tie)?;
        cfg.architecture = architecture;
        if let Some(pre) = pre {
            cfg.agree_with_processor(pre)?;
        }
        cfg.provenance = log.into_inner();
        cfg.check_consistency()?;
        Ok(cfg)
    }

    /// The model's pinpoints and tile against the processor's.
    fn agree_with_processor(&mut self, pre: &ImagePreprocessing) -> Result<()> {
        if let Some(tile) = pre.tile {
            if tile != self.vision.image_size {
                return Err(config_err(
                    "preprocessor.size",
                    format!(
                        "{tile} px views, but vision_config.image_size is {}",
                        self.vision.image_size
                    ),
                ));
            }
        }
        if let Some(list) = &pre.pinpoints {
            if *list != self.image_grid_pinpoints {
                let model_source = self
                    .provenance_of("image_grid_pinpoints")
                    .map_or_else(String::new, |r| r.source.to_string());
                return Err(config_err(
                    "image_grid_pinpoints",
                    format!(
                        "the model's list ({} pinpoints, from {model_source}) differs from the \
                         image processor's ({} pinpoints, from {}): transformers would tile images \
                         with one and pack their features with the other, which fails or silently \
                         mismatches for some image sizes; write the same list in config.json and \
                         preprocessor_config.json",
                        self.image_grid_pinpoints.len(),
                        list.len(),
                        pre.pinpoints_source()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The resolved entry of a field, if recorded.
    pub fn provenance_of(&self, field: &str) -> Option<&Resolved> {
        self.provenance.iter().find(|r| r.field == field)
    }

    fn check_consistency(&self) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        for (field, value) in [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.patch_size", v.patch_size),
        ] {
            if value == 0 {
                return Err(config_err(field, "must be > 0"));
            }
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(config_err(
                "text_config.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return Err(config_err(
                "text_config.head_dim",
                format!("{} is odd (RoPE rotates halves)", t.head_dim),
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(config_err(
                "vision_config.num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    v.num_attention_heads, v.hidden_size
                ),
            ));
        }
        if v.image_size < v.patch_size {
            return Err(config_err(
                "vision_config.image_size",
                format!("{} is smaller than patch_size", v.image_size),
            ));
        }
        if v.num_channels != 3 {
            return Err(config_err(
                "vision_config.num_channels",
                format!("{} (only RGB, 3)", v.num_channels),
            ));
        }
        if self.image_token_index as usize >= t.vocab_size {
            return Err(config_err(
                "image_token_index",
                format!(
                    "{} is outside the vocabulary ({})",
                    self.image_token_index, t.vocab_size
                ),
            ));
        }
        let n = v.num_hidden_layers as i64;
        for &fl in self.vision_feature_layer.as_slice() {
            if fl < -(n + 1) || fl > n {
                return Err(config_err(
                    "vision_feature_layer",
                    format!(
                        "{fl} is not a hidden state of a {n}-layer tower ({} states)",
                        n + 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Indices into the tower's hidden states (0 = embeddings, `i` = after layer `i`), in the
    /// order their features are concatenated.
    pub fn vision_feature_indices(&self) -> Vec<usize> {
        let n = self.vision.num_hidden_layers as i64;
        self.vision_feature_layer
            .as_slice()
            .iter()
            .map(|&fl| (if fl < 0 { n + 1 + fl } else { fl }).max(0) as usize)
            .collect()
    }

    /// Number of SigLIP encoder layers that run: up to the deepest selected hidden state
    /// (`-1` → all layers, `-2` → all but the last).
    pub fn vision_layers_used(&self) -> usize {
        self.vision_feature_indices().into_iter().max().unwrap_or(0)
    }

    /// Width of the selected vision features: `hidden_size` per selected hidden state (the
    /// projector's input width).
    pub fn vision_feature_width(&self) -> usize {
        self.vision_feature_layer.as_slice().len() * self.vision.hidden_size
    }

    /// The anyres geometry for image preprocessing and token counting.
    pub fn image_geometry(&self) -> ImageGeometry {
        ImageGeometry {
            tile: self.vision.image_size,
            patch: self.vision.patch_size,
            pinpoints: self.image_grid_pinpoints.clone(),
            max_tiles: self.anyres_max_tiles,
        }
    }

    /// Checks that the model splits evenly over `tp` ranks (the TP plan in ARCHITECTURE.md).
    pub fn validate_tp(&self, tp: usize) -> Result<()> {
        if !SUPPORTED_TP.contains(&tp) {
            return Err(Error::TensorParallel {
                tp,
                reason: format!("supported sizes are {SUPPORTED_TP:?}"),
            });
        }
        let t = &self.text;
        for (field, value) in [
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.vocab_size", t.vocab_size),
        ] {
            if !value.is_multiple_of(tp) {
                return Err(config_err(
                    field,
                    format!("{value} is not divisible by tensor parallel size {tp}"),
                ));
            }
        }
        Ok(())
    }
}

/// `architectures`, `model_type`, `auto_map.AutoConfig`: is this R-4B (or LLaVA-OneVision)?
fn architecture(top: &Reader) -> Result<Architecture> {
    let architectures = match top.raw("architectures") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| top.err("architectures", "not a list of strings"))?,
        Some(_) => return Err(top.err("architectures", "not a list of strings")),
    };
    if !architectures.is_empty()
        && !architectures
            .iter()
            .any(|a| ARCHITECTURES.contains(&a.as_str()))
    {
        return Err(top.err(
            "architectures",
            format!("{architectures:?} names no architecture served here ({ARCHITECTURES:?})"),
        ));
    }
    let remote_config = top
        .raw("auto_map")
        .and_then(|m| m.get("AutoConfig"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let model_type = match top.raw("model_type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(top.err("model_type", "not a string")),
        None => {
            return Err(top.err(
                "model_type",
                "missing (transformers needs it to pick the config class)",
            ))
        }
    };
    let r4b_remote = remote_config
        .as_deref()
        .is_some_and(|c| c.ends_with(R4B_REMOTE_CONFIG));
    if !MODEL_TYPES.contains(&model_type.as_str()) && !r4b_remote {
        return Err(top.err(
            "model_type",
            format!(
                "`{model_type}` is neither {MODEL_TYPES:?} nor R-4B's remote config \
                 (auto_map.AutoConfig = {R4B_REMOTE_CONFIG}); its class defaults are unknown"
            ),
        ));
    }
    for (key, v) in [
        ("architectures", Value::from(architectures.clone())),
        ("model_type", Value::from(model_type.clone())),
    ] {
        if top.raw(key).is_some() {
            top.record(key, v, Source::File(ConfigFile::Config));
        }
    }
    Ok(Architecture {
        architectures,
        model_type,
        remote_config,
    })
}

/// `text_config` (Qwen3). Also returns its `tie_word_embeddings`.
fn text_config(top: &Reader, log: &Log) -> Result<(TextConfig, bool)> {
    let Some(value) = top.raw("text_config") else {
        return Err(top.err(
            "text_config",
            "missing: LlavaOnevisionConfig then builds a Qwen2 decoder, which is not served here \
             (R-4B's decoder is Qwen3)",
        ));
    };
    match value.get("model_type").and_then(Value::as_str) {
        Some("qwen3") => {}
        None => {
            return Err(top.err(
                "text_config.model_type",
                "missing: LlavaOnevisionConfig reads such a text_config as qwen2, which is not \
                 served here (expected qwen3)",
            ))
        }
        Some(other) => {
            return Err(top.err(
                "text_config.model_type",
                format!("`{other}` is not served here (expected qwen3)"),
            ))
        }
    }
    let tc = Reader::new(
        Some(value),
        "text_config",
        ConfigFile::Config,
        &defaults::QWEN3,
        log,
    )?;
    tc.record(
        "model_type",
        Value::from("qwen3"),
        Source::File(ConfigFile::Config),
    );
    let hidden_size = tc.usize("hidden_size")?;
    let num_attention_heads = tc.usize("num_attention_heads")?;
    // `num_key_value_heads: int | None`: None means one KV head per query head.
    let num_key_value_heads = if tc.is_null("num_key_value_heads") {
        tc.record(
            "num_key_value_heads",
            Value::from(num_attention_heads),
            Source::Derived("null in config.json: num_attention_heads (Qwen3Config)".into()),
        );
        num_attention_heads
    } else {
        tc.usize("num_key_value_heads")?
    };
    let text = TextConfig {
        hidden_size,
        intermediate_size: tc.usize("intermediate_size")?,
        num_hidden_layers: tc.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim: tc.usize("head_dim")?,
        rms_norm_eps: tc.f64("rms_norm_eps")?,
        rope_theta: rope_theta(&tc)?,
        vocab_size: tc.usize("vocab_size")?,
        max_position_embeddings: tc.usize("max_position_embeddings")?,
    };
    if tc.bool("attention_bias")? {
        return Err(tc.err("attention_bias", "Qwen3 attention biases are not supported"));
    }
    if tc.bool("use_sliding_window")? {
        return Err(tc.err(
            "use_sliding_window",
            "sliding-window attention is not supported",
        ));
    }
    let act = tc.string("hidden_act")?;
    if act != "silu" {
        return Err(tc.err("hidden_act", format!("`{act}` is not supported (silu)")));
    }
    let tie = tc.bool("tie_word_embeddings")?;
    Ok((text, tie))
}

/// RoPE θ as transformers 5 resolves it: `rope_parameters` (or the legacy `rope_scaling`) with
/// `rope_type` default, its `rope_theta`, else the legacy top-level `rope_theta`, else 10000.
fn rope_theta(tc: &Reader) -> Result<f64> {
    let params = ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|k| tc.raw(k).map(|v| (k, v)));
    let mut from_params = None;
    if let Some((key, p)) = params {
        let obj = p.as_object().ok_or_else(|| tc.err(key, "not an object"))?;
        let ty = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if ty != "default" {
            return Err(tc.err(
                &format!("{key}.rope_type"),
                format!("`{ty}` is not supported (only default)"),
            ));
        }
        tc.record(
            "rope_parameters.rope_type",
            Value::from("default"),
            Source::File(ConfigFile::Config),
        );
        if let Some(t) = obj.get("rope_theta").filter(|t| !t.is_null()) {
            from_params = Some(
                t.as_f64()
                    .ok_or_else(|| tc.err(&format!("{key}.rope_theta"), "not a number"))?,
            );
        }
    }
    let (theta, source) = match (from_params, tc.raw("rope_theta")) {
        (Some(t), _) => (t, Source::File(ConfigFile::Config)),
        (None, Some(t)) => (
            t.as_f64()
                .ok_or_else(|| tc.err("rope_theta", "not a number"))?,
            Source::File(ConfigFile::Config),
        ),
        (None, None) => {
            let (v, source) = tc.value("rope_parameters.rope_theta")?;
            (v.as_f64().unwrap_or(10_000.0), source)
        }
    };
    tc.record("rope_parameters.rope_theta", Value::from(theta), source);
    Ok(theta)
}

/// `vision_config` (SigLIP); LLaVA-OneVision's so400m values when it is absent.
fn vision_config(top: &Reader, log: &Log) -> Result<VisionConfig> {
    let value = top.raw("vision_config");
    match value
        .and_then(|v| v.get("model_type"))
        .and_then(Value::as_str)
    {
        None | Some("siglip_vision_model") => {}
        Some(other) => {
            return Err(top.err(
                "vision_config.model_type",
                format!("`{other}` is not served here (expected siglip_vision_model)"),
            ))
        }
    }
    let vc = Reader::new(
        value,
        "vision_config",
        ConfigFile::Config,
        &defaults::SIGLIP_VISION,
        log,
    )?;
    let vc = if value.is_none() {
        vc.with_overrides(&defaults::COMPOSITE_VISION)
    } else {
        vc
    };
    let vision = VisionConfig {
        hidden_size: vc.usize("hidden_size")?,
        intermediate_size: vc.usize("intermediate_size")?,
        num_hidden_layers: vc.usize("num_hidden_layers")?,
        num_attention_heads: vc.usize("num_attention_heads")?,
        image_size: vc.usize("image_size")?,
        patch_size: vc.usize("patch_size")?,
        layer_norm_eps: vc.f64("layer_norm_eps")?,
        num_channels: vc.usize("num_channels")?,
    };
    let act = vc.string("hidden_act")?;
    if act != "gelu_pytorch_tanh" {
        return Err(vc.err(
            "hidden_act",
            format!("`{act}` is not supported (gelu_pytorch_tanh)"),
        ));
    }
    Ok(vision)
}

/// The composite's own fields (LLaVA-OneVision / R-4B).
fn composite(
    top: &Reader,
    text: TextConfig,
    vision: VisionConfig,
    text_tie: bool,
) -> Result<RConfig> {
    // `image_token_id` is an alias (attribute_map) of `image_token_index`.
    let image_token_index = match (top.raw("image_token_index"), top.raw("image_token_id")) {
        (None, Some(v)) => {
            let id = v
                .as_u64()
                .ok_or_else(|| top.err("image_token_id", "not a non-negative integer"))?;
            top.record(
                "image_token_index",
                v.clone(),
                Source::File(ConfigFile::Config),
            );
            id as usize
        }
        _ => top.usize("image_token_index")?,
    };
    let image_token_index = u32::try_from(image_token_index)
        .map_err(|_| top.err("image_token_index", "does not fit in u32"))?;
    let (fl, fl_source) = top.value("vision_feature_layer")?;
    let vision_feature_layer = match &fl {
        Value::Number(n) => FeatureLayer::One(
            n.as_i64()
                .ok_or_else(|| top.err("vision_feature_layer", "not an integer"))?,
        ),
        Value::Array(a) if !a.is_empty() => FeatureLayer::Concat(
            a.iter()
                .map(Value::as_i64)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| top.err("vision_feature_layer", "not a list of integers"))?,
        ),
        _ => {
            return Err(top.err(
                "vision_feature_layer",
                "neither an integer nor a non-empty list of integers",
            ))
        }
    };
    top.record("vision_feature_layer", fl, fl_source);
    let strategy = top.string("vision_feature_select_strategy")?;
    match strategy.as_str() {
        "full" => {}
        "default" => {
            return Err(top.err(
                "vision_feature_select_strategy",
                "`default` drops the first token of every view, but SigLIP has no CLS token: \
                 transformers' LLaVA-OneVision packing then fails on every image (728 tokens do \
                 not form the 27x27 grid); only `full` is served",
            ))
        }
        other => {
            return Err(top.err(
                "vision_feature_select_strategy",
                format!("`{other}` is neither `full` nor `default`"),
            ))
        }
    }
    let aspect = top.string("vision_aspect_ratio")?;
    let anyres_max_tiles = aspect
        .strip_prefix("anyres_max_")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            top.err(
                "vision_aspect_ratio",
                format!("`{aspect}` (expected anyres_max_N)"),
            )
        })?;
    let image_grid_pinpoints = top.pinpoints("image_grid_pinpoints", vision.image_size)?;
    let proj_act = top.string("projector_hidden_act")?;
    if proj_act != "gelu" {
        return Err(top.err(
            "projector_hidden_act",
            format!("`{proj_act}` is not supported (gelu)"),
        ));
    }
    if !top.bool("multimodal_projector_bias")? {
        return Err(top.err(
            "multimodal_projector_bias",
            "a projector without biases is not supported",
        ));
    }
    let tie_word_embeddings = tie(top, text_tie)?;
    let dtype = match top.raw("torch_dtype").or_else(|| top.raw("dtype")) {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "float32" => DiskDtype::F32,
            "float16" => DiskDtype::F16,
            "bfloat16" => DiskDtype::Bf16,
            other => return Err(top.err("torch_dtype", format!("`{other}` is not supported"))),
        }),
        Some(_) => return Err(top.err("torch_dtype", "not a string")),
    };
    Ok(RConfig {
        architecture: Architecture {
            architectures: Vec::new(),
            model_type: String::new(),
            remote_config: None,
        },
        text,
        vision,
        image_token_index,
        vision_feature_layer,
        image_grid_pinpoints,
        anyres_max_tiles,
        tie_word_embeddings,
        dtype,
        provenance: Vec::new(),
    })
}

/// The effective `tie_word_embeddings`: LlavaOnevisionConfig.__post_init__ takes text_config's
/// value when the top-level one is false.
fn tie(top: &Reader, text_tie: bool) -> Result<bool> {
    let (v, source) = top.value("tie_word_embeddings")?;
    let own = v
        .as_bool()
        .ok_or_else(|| top.err("tie_word_embeddings", format!("{v} is not a boolean")))?;
    if !own && text_tie {
        top.record(
            "tie_word_embeddings",
            Value::from(true),
            Source::Derived(
                "text_config.tie_word_embeddings is true (LlavaOnevisionConfig.__post_init__)"
                    .into(),
            ),
        );
        return Ok(true);
    }
    top.record("tie_word_embeddings", v, source);
    Ok(own)
}
