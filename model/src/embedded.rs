//! The embedded default model: a tiny checkpoint with R-4B's exact architecture (SigLIP at
//! 384 px / patch 14 → projector → anyres → Qwen3 with q/k norms and GQA) and deterministic
//! weights, written on first run so the whole stack serves the OpenAI API with no download.
//!
//! Widths are small, and every TP-split count (16 Q heads, 8 KV heads, FFN 256, vocab 512)
//! divides by 8, so TP ∈ {1, 2, 4, 8} all work on it. Token ids agree with the gateway's
//! embedded tokenizer (`r4b_gateway::embedded`): 0–255 bytes, 256 `<|endoftext|>`,
//! 257 `<|im_start|>`, 258 `<|im_end|>`, 259 `<think>`, 260 `</think>`, 261 `<image>`,
//! 262 `<video>`.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::{Error, Result};

/// Vocabulary rows of the embedded model.
pub const VOCAB: usize = 512;
/// `<image>` token id.
pub const IMAGE_TOKEN: u32 = 261;
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 256;
const LAYERS: usize = 4;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 16;
const V_HIDDEN: usize = 32;
const V_INTERMEDIATE: usize = 64;
const V_LAYERS: usize = 2;
const V_HEADS: usize = 4;
const TILE: usize = 384;
const PATCH: usize = 14;
/// Longest sequence the embedded model accepts.
pub const MAX_POSITIONS: usize = 16384;

/// SplitMix64: a small deterministic generator, so the weights are the same on every machine.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// The `config.json` of the embedded model.
pub fn config_json() -> serde_json::Value {
    let pinpoints: Vec<[usize; 2]> = (1..=6)
        .flat_map(|a| (1..=6).map(move |b| [a * TILE, b * TILE]))
        .collect();
    json!({
        "architectures": ["RForConditionalGeneration"],
        "model_type": "rvl",
        "image_token_index": IMAGE_TOKEN,
        "video_token_index": IMAGE_TOKEN + 1,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": pinpoints,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen3", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": MAX_POSITIONS, "attention_bias": false, "vocab_size": VOCAB,
            "bos_token_id": 256, "eos_token_id": 258, "tie_word_embeddings": false
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": V_HIDDEN, "intermediate_size": V_INTERMEDIATE,
            "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS, "patch_size": PATCH,
            "image_size": TILE, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6
        }
    })
}

/// Every tensor of the embedded model: (name, shape, kind).
fn tensor_specs() -> Vec<(String, Vec<usize>, Init)> {
    let mut t = Vec::new();
    let vt = "model.vision_tower.vision_model";
    t.push((
        format!("{vt}.embeddings.patch_embedding.weight"),
        vec![V_HIDDEN, 3, PATCH, PATCH],
        Init::Fan,
    ));
    t.push((
        format!("{vt}.embeddings.patch_embedding.bias"),
        vec![V_HIDDEN],
        Init::Bias,
    ));
    let grid = TILE / PATCH;
    t.push((
        format!("{vt}.embeddings.position_embedding.weight"),
        vec![grid * grid, V_HIDDEN],
        Init::Embed,
    ));
    for i in 0..V_LAYERS {
        let p = format!("{vt}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            t.push((format!("{p}.{ln}.weight"), vec![V_HIDDEN], Init::Norm));
            t.push((format!("{p}.{ln}.bias"), vec![V_HIDDEN], Init::Bias));
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push((
                format!("{p}.self_attn.{proj}.weight"),
                vec![V_HIDDEN, V_HIDDEN],
                Init::Fan,
            ));
            t.push((
                format!("{p}.self_attn.{proj}.bias"),
                vec![V_HIDDEN],
                Init::Bias,
            ));
        }
        t.push((
            format!("{p}.mlp.fc1.weight"),
            vec![V_INTERMEDIATE, V_HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.mlp.fc1.bias"),
            vec![V_INTERMEDIATE],
            Init::Bias,
        ));
        t.push((
            format!("{p}.mlp.fc2.weight"),
            vec![V_HIDDEN, V_INTERMEDIATE],
            Init::Fan,
        ));
        t.push((format!("{p}.mlp.fc2.bias"), vec![V_HIDDEN], Init::Bias));
    }
    let pj = "model.multi_modal_projector";
    t.push((format!("{pj}.pre_norm.weight"), vec![V_HIDDEN], Init::Norm));
    t.push((format!("{pj}.pre_norm.bias"), vec![V_HIDDEN], Init::Bias));
    t.push((
        format!("{pj}.linear_1.weight"),
        vec![HIDDEN, V_HIDDEN],
        Init::Fan,
    ));
    t.push((format!("{pj}.linear_1.bias"), vec![HIDDEN], Init::Bias));
    t.push((
        format!("{pj}.linear_2.weight"),
        vec![HIDDEN, HIDDEN],
        Init::Fan,
    ));
    t.push((format!("{pj}.linear_2.bias"), vec![HIDDEN], Init::Bias));
    t.push(("model.image_newline".to_string(), vec![HIDDEN], Init::Embed));
    let lm = "model.language_model";
    t.push((
        format!("{lm}.embed_tokens.weight"),
        vec![VOCAB, HIDDEN],
        Init::Embed,
    ));
    for i in 0..LAYERS {
        let p = format!("{lm}.layers.{i}");
        t.push((
            format!("{p}.input_layernorm.weight"),
            vec![HIDDEN],
            Init::Norm,
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![HIDDEN],
            Init::Norm,
        ));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * HEAD_DIM, HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            Init::Fan,
        ));
        t.push((
            format!("{p}.self_attn.q_norm.weight"),
            vec![HEAD_DIM],
            Init::Norm,
        ));
        t.push((
            format!("{p}.self_attn.k_norm.weight"),
            vec![HEAD_DIM],
            Init::Norm,
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
            Init::Fan,
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTERMEDIATE],
            Init::Fan,
        ));
    }
    t.push((format!("{lm}.norm.weight"), vec![HIDDEN], Init::Norm));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN], Init::Fan));
    t
}

/// How a tensor is initialised.
#[derive(Clone, Copy)]
enum Init {
    /// N(0, 1/fan_in): weights of linear layers and convolutions.
    Fan,
    /// N(0, 1): embeddings.
    Embed,
    /// 1 + N(0, 0.1²): norm weights.
    Norm,
    /// N(0, 0.1²): biases.
    Bias,
}

/// Writes `config.json`, `model.safetensors` and `preprocessor_config.json` into `dir`.
pub fn write_model_files(dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::CheckpointFile {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut rng = Rng(0x5234_4221_0000_0001);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, init) in tensor_specs() {
        let n: usize = shape.iter().product();
        let fan_in = (n / shape[0]).max(1) as f32;
        let mut bytes = Vec::with_capacity(n * 4);
        for _ in 0..n {
            let z = rng.normal();
            let v = match init {
                Init::Fan => z / fan_in.sqrt(),
                Init::Embed => z,
                Init::Norm => 1.0 + 0.1 * z,
                Init::Bias => 0.1 * z,
            };
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        data.push((name, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::CheckpointFile {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    let tmp = dir.join("model.safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| Error::CheckpointFile {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(io)?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(dir.join("config.json"), pretty(&config_json())).map_err(io)?;
    let pre = json!({
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1.0 / 255.0, "resample": 3, "do_convert_rgb": true,
        "size": {"height": TILE, "width": TILE}
    });
    std::fs::write(dir.join("preprocessor_config.json"), pretty(&pre)).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RConfig;

    #[test]
    fn the_embedded_model_is_r4b_shaped_and_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_model_files(a.path()).unwrap();
        write_model_files(b.path()).unwrap();
        let bytes_a = std::fs::read(a.path().join("model.safetensors")).unwrap();
        assert_eq!(
            bytes_a,
            std::fs::read(b.path().join("model.safetensors")).unwrap()
        );
        let cfg = RConfig::from_file(&a.path().join("config.json")).unwrap();
        assert_eq!(cfg.vision.num_patches(), 729);
        assert_eq!(cfg.image_geometry().num_image_tokens(480, 640), 2929);
        for tp in [1, 2, 4, 8] {
            cfg.validate_tp(tp).unwrap();
        }
        let st = safetensors::SafeTensors::deserialize(&bytes_a).unwrap();
        let names = st.names();
        assert!(names.contains(&"lm_head.weight"));
        assert!(names.contains(&"model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"));
    }
}
