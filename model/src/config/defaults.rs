//! The one table of config-class defaults: what transformers fills in for a field that
//! `config.json` (or `preprocessor_config.json`) leaves out.
//!
//! Source: transformers **5.17.0** (the version the reference fixtures pin), read from
//! - `models/qwen3/configuration_qwen3.py` — `Qwen3Config` (`text_config`, `model_type` `qwen3`);
//! - `models/siglip/configuration_siglip.py` — `SiglipVisionConfig` (`vision_config`,
//!   `model_type` `siglip_vision_model`);
//! - `models/llava_onevision/configuration_llava_onevision.py` — `LlavaOnevisionConfig` (the
//!   composite, `model_type` `llava_onevision`; also used for R-4B's remote `RConfig`, whose
//!   source we cannot read: vLLM's `rvl.py` treats it as LLaVA-OneVision with another projector);
//! - `models/llava_onevision/image_processing_pil_llava_onevision.py` —
//!   `LlavaOnevisionImageProcessorPil` (`preprocessor_config.json`).
//!
//! `tests/fixtures/variants/*/hf.json` hold transformers' own resolution of configs that omit
//! these fields (`worker/tests/hf_config.rs` compares ours with it field by field).
//!
//! Two composite defaults are not plain values and are handled where they are read
//! (`config/resolve.rs`): an absent `vision_config` is SigLIP-so400m (below, [`COMPOSITE_VISION`]);
//! an absent `text_config`, or one without `model_type`, is **Qwen2**, which this engine does not
//! serve.

/// The transformers version the table was read from.
pub const TRANSFORMERS_VERSION: &str = "5.17.0";

/// A default value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(&'static str),
    /// LLaVA-OneVision's 36 pinpoints: every `(a·384, b·384)` with `a, b ∈ 1..=6`, row-major in `a`.
    Pinpoints6x6,
    /// Three floats (mean / std).
    Triple([f64; 3]),
}

/// The defaults of one config class.
#[derive(Debug)]
pub struct ClassDefaults {
    /// `model_type` the class registers.
    pub model_type: &'static str,
    /// Class name, as reported by `r4b inspect`.
    pub class: &'static str,
    /// `(field, default)`; a dotted field is nested (`rope_parameters.rope_theta`).
    pub fields: &'static [(&'static str, Value)],
}

impl ClassDefaults {
    /// The default of `field`, if the class has one.
    pub fn get(&self, field: &str) -> Option<Value> {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| *v)
    }
}

/// `Qwen3Config` (`text_config`). `num_key_value_heads: null` means `num_attention_heads`.
pub const QWEN3: ClassDefaults = ClassDefaults {
    model_type: "qwen3",
    class: "Qwen3Config",
    fields: &[
        ("vocab_size", Value::Int(151_936)),
        ("hidden_size", Value::Int(4096)),
        ("intermediate_size", Value::Int(22_016)),
        ("num_hidden_layers", Value::Int(32)),
        ("num_attention_heads", Value::Int(32)),
        ("num_key_value_heads", Value::Int(32)),
        ("head_dim", Value::Int(128)),
        ("hidden_act", Value::Str("silu")),
        ("max_position_embeddings", Value::Int(32_768)),
        ("rms_norm_eps", Value::Float(1e-6)),
        ("tie_word_embeddings", Value::Bool(false)),
        ("attention_bias", Value::Bool(false)),
        ("use_sliding_window", Value::Bool(false)),
        ("rope_parameters.rope_type", Value::Str("default")),
        ("rope_parameters.rope_theta", Value::Float(10_000.0)),
    ],
};

/// `SiglipVisionConfig` (`vision_config` given as an object).
pub const SIGLIP_VISION: ClassDefaults = ClassDefaults {
    model_type: "siglip_vision_model",
    class: "SiglipVisionConfig",
    fields: &[
        ("hidden_size", Value::Int(768)),
        ("intermediate_size", Value::Int(3072)),
        ("num_hidden_layers", Value::Int(12)),
        ("num_attention_heads", Value::Int(12)),
        ("num_channels", Value::Int(3)),
        ("image_size", Value::Int(224)),
        ("patch_size", Value::Int(16)),
        ("hidden_act", Value::Str("gelu_pytorch_tanh")),
        ("layer_norm_eps", Value::Float(1e-6)),
    ],
};

/// `LlavaOnevisionConfig.__post_init__` when `vision_config` is absent: SigLIP with these values,
/// the rest from [`SIGLIP_VISION`].
pub const COMPOSITE_VISION: ClassDefaults = ClassDefaults {
    model_type: "siglip_vision_model",
    class: "LlavaOnevisionConfig (vision_config absent)",
    fields: &[
        ("hidden_size", Value::Int(1152)),
        ("intermediate_size", Value::Int(4304)),
        ("patch_size", Value::Int(14)),
        ("image_size", Value::Int(384)),
        ("num_hidden_layers", Value::Int(26)),
        ("num_attention_heads", Value::Int(16)),
    ],
};

/// `LlavaOnevisionConfig` (the composite; assumed for R-4B's `RConfig`). The effective
/// `tie_word_embeddings` is the top-level value, or `text_config`'s when that one is true.
pub const LLAVA_ONEVISION: ClassDefaults = ClassDefaults {
    model_type: "llava_onevision",
    class: "LlavaOnevisionConfig",
    fields: &[
        ("image_token_index", Value::Int(151_646)),
        ("video_token_index", Value::Int(151_647)),
        ("projector_hidden_act", Value::Str("gelu")),
        ("vision_feature_select_strategy", Value::Str("full")),
        ("vision_feature_layer", Value::Int(-1)),
        ("multimodal_projector_bias", Value::Bool(true)),
        ("tie_word_embeddings", Value::Bool(false)),
        ("image_grid_pinpoints", Value::Pinpoints6x6),
        ("vision_aspect_ratio", Value::Str("anyres_max_9")),
    ],
};

/// `LlavaOnevisionImageProcessorPil` (`preprocessor_config.json`). Mean and std are OpenAI CLIP's
/// (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` in `image_utils.py`), not SigLIP's 0.5.
pub const LLAVA_ONEVISION_PROCESSOR: ClassDefaults = ClassDefaults {
    model_type: "llava_onevision",
    class: "LlavaOnevisionImageProcessor",
    fields: &[
        ("resample", Value::Int(3)),
        (
            "image_mean",
            Value::Triple([0.481_454_66, 0.457_827_5, 0.408_210_73]),
        ),
        (
            "image_std",
            Value::Triple([0.268_629_54, 0.261_302_58, 0.275_777_11]),
        ),
        ("rescale_factor", Value::Float(1.0 / 255.0)),
        ("image_grid_pinpoints", Value::Pinpoints6x6),
    ],
};

/// The 36 pinpoints of [`Value::Pinpoints6x6`] as `(height, width)`.
pub fn pinpoints_6x6() -> Vec<(usize, usize)> {
    (1..=6)
        .flat_map(|a| (1..=6).map(move |b| (a * 384, b * 384)))
        .collect()
}
