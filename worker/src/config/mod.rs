//! The checkpoint's `config.json` (LLaVA-OneVision / R-4B `RConfig` fields), parsed into typed
//! structs. Every value the model uses is read here once; derived counts (`head_dim`, heads per
//! rank, layers used by the vision tower, tokens per tile) are methods, not literals elsewhere.
//!
//! Missing or inconsistent fields are errors that name the field, e.g.
//! `config.json: field `text_config.num_key_value_heads`: 8 is not divisible by tensor parallel size 3`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::model::anyres::{ImageGeometry, Normalize, Resample};
use crate::{Error, Result};

/// Tensor-parallel sizes the engine supports.
pub const SUPPORTED_TP: [usize; 4] = [1, 2, 4, 8];

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

/// The whole R-4B config.
#[derive(Clone, Debug, PartialEq)]
pub struct RConfig {
    /// Decoder.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Token id of `<image>`.
    pub image_token_index: u32,
    /// Which hidden state of the vision tower is the feature (negative counts from the end).
    pub vision_feature_layer: i64,
    /// Anyres resolutions as (height, width).
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    /// `N` of `vision_aspect_ratio = "anyres_max_N"`.
    pub anyres_max_tiles: usize,
    /// Whether the config asks to tie lm_head to the embedding. The loader still prefers a stored
    /// `lm_head.weight` (see r4b-model.md §2.1).
    pub tie_word_embeddings: bool,
    /// dtype on disk as declared (tensors carry their own dtype; this is informative).
    pub dtype: Option<DiskDtype>,
}

impl RConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::CheckpointFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_json_str(&text)
    }

    /// Parses and validates the JSON text of `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            field: "<root>".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let root = Obj::new(&root, "")?;
        let tc = root.object("text_config")?;
        let vc = root.object("vision_config")?;

        let hidden_size = tc.usize("hidden_size")?;
        let num_attention_heads = tc.usize("num_attention_heads")?;
        let head_dim = match tc.opt("head_dim") {
            Some(_) => tc.usize("head_dim")?,
            None => hidden_size / num_attention_heads.max(1),
        };
        let rope_theta = match tc.opt("rope_theta") {
            Some(_) => tc.f64("rope_theta")?,
            None => match tc.opt("rope_parameters") {
                Some(_) => tc.object("rope_parameters")?.f64("rope_theta")?,
                None => {
                    return Err(tc.err("rope_theta", "missing (nor rope_parameters.rope_theta)"))
                }
            },
        };
        if let Some(Value::Object(rp)) = tc.opt("rope_parameters") {
            if let Some(Value::String(t)) = rp.get("rope_type") {
                if t != "default" {
                    return Err(tc.err(
                        "rope_parameters.rope_type",
                        &format!("`{t}` is not supported (only default)"),
                    ));
                }
            }
        }
        if let Some(Value::Object(_)) = tc.opt("rope_scaling") {
            return Err(tc.err("rope_scaling", "RoPE scaling is not supported"));
        }
        if tc.bool_or("attention_bias", false)? {
            return Err(tc.err("attention_bias", "Qwen3 attention biases are not supported"));
        }
        let act = tc.string_or("hidden_act", "silu")?;
        if act != "silu" {
            return Err(tc.err("hidden_act", &format!("`{act}` is not supported (silu)")));
        }
        let text = TextConfig {
            hidden_size,
            intermediate_size: tc.usize("intermediate_size")?,
            num_hidden_layers: tc.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: tc.usize("num_key_value_heads")?,
            head_dim,
            rms_norm_eps: tc.f64("rms_norm_eps")?,
            rope_theta,
            vocab_size: tc.usize("vocab_size")?,
            max_position_embeddings: tc.usize("max_position_embeddings")?,
        };

        let vact = vc.string_or("hidden_act", "gelu_pytorch_tanh")?;
        if vact != "gelu_pytorch_tanh" {
            return Err(vc.err(
                "hidden_act",
                &format!("`{vact}` is not supported (gelu_pytorch_tanh)"),
            ));
        }
        let vision = VisionConfig {
            hidden_size: vc.usize("hidden_size")?,
            intermediate_size: vc.usize("intermediate_size")?,
            num_hidden_layers: vc.usize("num_hidden_layers")?,
            num_attention_heads: vc.usize("num_attention_heads")?,
            image_size: vc.usize("image_size")?,
            patch_size: vc.usize("patch_size")?,
            layer_norm_eps: vc.f64_or("layer_norm_eps", 1e-6)?,
            num_channels: vc.usize_or("num_channels", 3)?,
        };

        let image_token_index = match root.opt("image_token_index") {
            Some(_) => root.usize("image_token_index")?,
            None => root.usize("image_token_id")?,
        };
        let image_token_index = u32::try_from(image_token_index)
            .map_err(|_| root.err("image_token_index", "does not fit in u32"))?;
        let vision_feature_layer = match root.opt("vision_feature_layer") {
            None => -1,
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| root.err("vision_feature_layer", "not an integer"))?,
            Some(_) => {
                return Err(root.err(
                    "vision_feature_layer",
                    "only a single integer layer is supported",
                ))
            }
        };
        // SigLIP has no CLS token, so "default" (drop the first token) would drop a real patch.
        let strategy = root.string_or("vision_feature_select_strategy", "full")?;
        if strategy != "full" {
            return Err(root.err(
                "vision_feature_select_strategy",
                &format!("`{strategy}` is not supported (SigLIP has no CLS token; expected full)"),
            ));
        }
        let aspect = root.string_or("vision_aspect_ratio", "anyres_max_9")?;
        let anyres_max_tiles = aspect
            .strip_prefix("anyres_max_")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                root.err(
                    "vision_aspect_ratio",
                    &format!("`{aspect}` (expected anyres_max_N)"),
                )
            })?;
        let image_grid_pinpoints = root.pinpoints("image_grid_pinpoints", vision.image_size)?;
        let proj_act = root.string_or("projector_hidden_act", "gelu")?;
        if proj_act != "gelu" {
            return Err(root.err(
                "projector_hidden_act",
                &format!("`{proj_act}` is not supported (gelu)"),
            ));
        }
        if !root.bool_or("multimodal_projector_bias", true)? {
            return Err(root.err(
                "multimodal_projector_bias",
                "a projector without biases is not supported",
            ));
        }
        let tie_word_embeddings = match root.opt("tie_word_embeddings") {
            Some(_) => root.bool_or("tie_word_embeddings", false)?,
            None => tc.bool_or("tie_word_embeddings", false)?,
        };
        let dtype = match root.opt("torch_dtype").or_else(|| root.opt("dtype")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "float32" => DiskDtype::F32,
                "float16" => DiskDtype::F16,
                "bfloat16" => DiskDtype::Bf16,
                other => {
                    return Err(root.err("torch_dtype", &format!("`{other}` is not supported")))
                }
            }),
            Some(_) => return Err(root.err("torch_dtype", "not a string")),
        };

        let cfg = RConfig {
            text,
            vision,
            image_token_index,
            vision_feature_layer,
            image_grid_pinpoints,
            anyres_max_tiles,
            tie_word_embeddings,
            dtype,
        };
        cfg.check_consistency()?;
        Ok(cfg)
    }

    fn check_consistency(&self) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        let bad = |field: &str, reason: String| Error::Config {
            field: field.into(),
            reason,
        };
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
                return Err(bad(field, "must be > 0".into()));
            }
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(bad(
                "text_config.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return Err(bad(
                "text_config.head_dim",
                format!("{} is odd (RoPE rotates halves)", t.head_dim),
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(bad(
                "vision_config.num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    v.num_attention_heads, v.hidden_size
                ),
            ));
        }
        if v.image_size < v.patch_size {
            return Err(bad(
                "vision_config.image_size",
                format!("{} is smaller than patch_size", v.image_size),
            ));
        }
        if v.num_channels != 3 {
            return Err(bad(
                "vision_config.num_channels",
                format!("{} (only RGB, 3)", v.num_channels),
            ));
        }
        if self.image_token_index as usize >= t.vocab_size {
            return Err(bad(
                "image_token_index",
                format!(
                    "{} is outside the vocabulary ({})",
                    self.image_token_index, t.vocab_size
                ),
            ));
        }
        let n = v.num_hidden_layers as i64;
        let fl = self.vision_feature_layer;
        if fl < -(n + 1) || fl > n || fl == 0 {
            return Err(bad(
                "vision_feature_layer",
                format!("{fl} is not a hidden state of a {n}-layer tower"),
            ));
        }
        Ok(())
    }

    /// Number of SigLIP encoder layers that run: the feature is `hidden_states[vision_feature_layer]`
    /// (index 0 = embeddings), so `-1` → all layers, `-2` → all but the last.
    pub fn vision_layers_used(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64;
        let fl = self.vision_feature_layer;
        (if fl < 0 { n + 1 + fl } else { fl }) as usize
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
                return Err(Error::Config {
                    field: field.into(),
                    reason: format!("{value} is not divisible by tensor parallel size {tp}"),
                });
            }
        }
        Ok(())
    }
}

/// Image preprocessing settings from `preprocessor_config.json` (mean/std, rescale factor,
/// resampling filter). Defaults when the file is absent: SigLIP's mean = std = 0.5, 1/255,
/// bicubic (r4b-model.md §5.1).
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePreprocessing {
    /// Rescale and normalisation.
    pub norm: Normalize,
    /// Resampling filter.
    pub resample: Resample,
}

impl Default for ImagePreprocessing {
    fn default() -> Self {
        ImagePreprocessing {
            norm: Normalize {
                mean: [0.5; 3],
                std: [0.5; 3],
                rescale: 1.0 / 255.0,
            },
            resample: Resample::Bicubic,
        }
    }
}

impl ImagePreprocessing {
    /// Reads `dir/preprocessor_config.json` if it exists, else the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::CheckpointFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json_str(&text)
    }

    /// Parses the JSON text of `preprocessor_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let bad = |field: &str, reason: &str| Error::Config {
            field: format!("preprocessor_config.{field}"),
            reason: reason.into(),
        };
        let v: Value = serde_json::from_str(text)
            .map_err(|e| bad("<root>", &format!("not valid JSON: {e}")))?;
        let mut out = Self::default();
        let triple = |field: &str| -> Result<Option<[f32; 3]>> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut t = [0f32; 3];
                    for (i, x) in a.iter().enumerate() {
                        t[i] = x
                            .as_f64()
                            .ok_or_else(|| bad(field, "not a list of 3 numbers"))?
                            as f32;
                    }
                    Ok(Some(t))
                }
                Some(_) => Err(bad(field, "not a list of 3 numbers")),
            }
        };
        if let Some(m) = triple("image_mean")? {
            out.norm.mean = m;
        }
        if let Some(s) = triple("image_std")? {
            if s.contains(&0.0) {
                return Err(bad("image_std", "contains 0"));
            }
            out.norm.std = s;
        }
        if let Some(r) = v.get("rescale_factor").filter(|r| !r.is_null()) {
            out.norm.rescale =
                r.as_f64()
                    .ok_or_else(|| bad("rescale_factor", "not a number"))? as f32;
        }
        out.resample = match v.get("resample").and_then(|r| r.as_u64()) {
            None => Resample::Bicubic,
            Some(2) => Resample::Bilinear,
            Some(3) => Resample::Bicubic,
            Some(other) => {
                return Err(bad(
                    "resample",
                    &format!("{other} (supported: 2 bilinear, 3 bicubic)"),
                ))
            }
        };
        Ok(out)
    }
}

/// A JSON object with its path, for error messages that name the field.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: path.to_string(),
            }),
            _ => Err(Error::Config {
                field: if path.is_empty() {
                    "<root>".into()
                } else {
                    path.into()
                },
                reason: "not an object".into(),
            }),
        }
    }
    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
    fn err(&self, key: &str, reason: &str) -> Error {
        Error::Config {
            field: self.name(key),
            reason: reason.into(),
        }
    }
    fn opt(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }
    fn get(&self, key: &str) -> Result<&'a Value> {
        self.map.get(key).ok_or_else(|| self.err(key, "missing"))
    }
    fn object(&self, key: &str) -> Result<Obj<'a>> {
        Obj::new(self.get(key)?, &self.name(key))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)?
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, "not a non-negative integer"))
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.opt(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| self.err(key, "not a number"))
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.opt(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.f64(key),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.opt(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.err(key, "not a boolean")),
        }
    }
    fn string_or(&self, key: &str, default: &str) -> Result<String> {
        match self.opt(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.err(key, "not a string")),
        }
    }
    /// `image_grid_pinpoints`: a list of `[height, width]`, each a multiple of the tile side.
    fn pinpoints(&self, key: &str, tile: usize) -> Result<Vec<(usize, usize)>> {
        let list = self
            .get(key)?
            .as_array()
            .ok_or_else(|| self.err(key, "not a list"))?;
        if list.is_empty() {
            return Err(self.err(key, "empty"));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let pair = item
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
                .ok_or_else(|| {
                    self.err(
                        &format!("{key}[{i}]"),
                        "not a [height, width] pair of integers",
                    )
                })?;
            if pair.0 == 0
                || pair.1 == 0
                || !pair.0.is_multiple_of(tile)
                || !pair.1.is_multiple_of(tile)
            {
                return Err(self.err(
                    &format!("{key}[{i}]"),
                    &format!("{pair:?} is not a positive multiple of the tile size {tile}"),
                ));
            }
            out.push(pair);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "image_token_index": 151669,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "image_grid_pinpoints": [[384, 384], [384, 768]],
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "text_config": {
                "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
                "max_position_embeddings": 40960
            },
            "vision_config": {
                "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
                "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6
            }
        })
    }

    fn parse(v: &Value) -> Result<RConfig> {
        RConfig::from_json_str(&v.to_string())
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn r4b_shaped_config_parses_with_derived_values() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.text.gqa_group(), 4);
        assert_eq!(c.text.q_width(), 4096);
        assert_eq!(c.vision.grid_side(), 27);
        assert_eq!(c.vision.num_patches(), 729);
        assert_eq!(c.vision.head_dim(), 72);
        assert_eq!(c.vision_layers_used(), 26);
        assert_eq!(c.anyres_max_tiles, 9);
        assert_eq!(c.dtype, Some(DiskDtype::Bf16));
        for tp in SUPPORTED_TP {
            c.validate_tp(tp).unwrap();
        }
    }

    #[test]
    fn missing_and_wrong_fields_are_named() {
        let mut v = base();
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("num_key_value_heads");
        assert_eq!(
            field_of(parse(&v).unwrap_err()),
            "text_config.num_key_value_heads"
        );

        let mut v = base();
        v["vision_config"]["patch_size"] = serde_json::json!("14");
        assert_eq!(field_of(parse(&v).unwrap_err()), "vision_config.patch_size");

        let mut v = base();
        v.as_object_mut().unwrap().remove("image_grid_pinpoints");
        assert_eq!(field_of(parse(&v).unwrap_err()), "image_grid_pinpoints");

        let mut v = base();
        v["image_grid_pinpoints"] = serde_json::json!([[384, 500]]);
        assert_eq!(field_of(parse(&v).unwrap_err()), "image_grid_pinpoints[0]");

        let mut v = base();
        v["text_config"]["num_key_value_heads"] = serde_json::json!(5);
        assert_eq!(
            field_of(parse(&v).unwrap_err()),
            "text_config.num_key_value_heads"
        );

        let mut v = base();
        v["image_token_index"] = serde_json::json!(200000);
        assert_eq!(field_of(parse(&v).unwrap_err()), "image_token_index");

        let mut v = base();
        v["vision_feature_layer"] = serde_json::json!(-28);
        assert_eq!(field_of(parse(&v).unwrap_err()), "vision_feature_layer");

        assert_eq!(field_of(RConfig::from_json_str("{").unwrap_err()), "<root>");
    }

    #[test]
    fn rope_theta_from_rope_parameters_and_image_token_id_alias() {
        let mut v = base();
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("rope_theta");
        v["text_config"]["rope_parameters"] =
            serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
        let o = v.as_object_mut().unwrap();
        o.remove("image_token_index");
        o.insert("image_token_id".into(), serde_json::json!(7));
        let c = parse(&v).unwrap();
        assert_eq!(c.text.rope_theta, 5e5);
        assert_eq!(c.image_token_index, 7);
    }

    #[test]
    fn tensor_parallel_sizes_are_checked() {
        let c = parse(&base()).unwrap();
        assert!(matches!(
            c.validate_tp(3),
            Err(Error::TensorParallel { tp: 3, .. })
        ));
        assert!(matches!(
            c.validate_tp(16),
            Err(Error::TensorParallel { tp: 16, .. })
        ));
        let mut v = base();
        v["text_config"]["num_key_value_heads"] = serde_json::json!(2);
        v["text_config"]["num_attention_heads"] = serde_json::json!(8);
        let c = parse(&v).unwrap();
        c.validate_tp(2).unwrap();
        assert_eq!(
            field_of(c.validate_tp(4).unwrap_err()),
            "text_config.num_key_value_heads"
        );
    }
}
