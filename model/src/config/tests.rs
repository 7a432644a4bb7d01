//! Unit tests of config resolution. Values are hand-written from R-4B's shapes and from the
//! transformers 5.17 config classes; `worker/tests/hf_config.rs` compares with transformers' own
//! resolution of generated checkpoints.

use super::*;

fn base() -> Value {
    serde_json::json!({
        "architectures": ["RForConditionalGeneration"],
        "model_type": "rvl",
        "image_token_index": 151669,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "image_grid_pinpoints": [[384, 384], [384, 768]],
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3",
            "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
            "max_position_embeddings": 40960
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
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

fn remove(v: &mut Value, path: &[&str]) {
    let (last, parents) = path.split_last().unwrap();
    let mut o = v;
    for p in parents {
        o = &mut o[*p];
    }
    o.as_object_mut().unwrap().remove(*last);
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
    assert_eq!(c.vision_feature_width(), 1152);
    assert_eq!(c.anyres_max_tiles, 9);
    assert_eq!(c.dtype, Some(DiskDtype::Bf16));
    for tp in SUPPORTED_TP {
        c.validate_tp(tp).unwrap();
    }
}

/// Qwen3Config's defaults (transformers 5.17 `configuration_qwen3.py`): vocab 151936, 32 heads,
/// head_dim 128 (not hidden/heads = 80), eps 1e-6, θ 10000; SigLIP's eps 1e-6 and tanh GELU.
#[test]
fn absent_fields_take_their_class_defaults() {
    let mut v = base();
    for f in [
        "vocab_size",
        "num_attention_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
    ] {
        remove(&mut v, &["text_config", f]);
    }
    remove(&mut v, &["vision_config", "layer_norm_eps"]);
    for f in [
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "tie_word_embeddings",
    ] {
        remove(&mut v, &[f]);
    }
    let c = parse(&v).unwrap();
    assert_eq!(c.text.vocab_size, 151_936);
    assert_eq!(c.text.num_attention_heads, 32);
    assert_eq!(c.text.head_dim, 128);
    assert_eq!(c.text.rms_norm_eps, 1e-6);
    assert_eq!(c.text.rope_theta, 10_000.0);
    assert_eq!(c.vision.layer_norm_eps, 1e-6);
    assert_eq!(c.vision_feature_layer, FeatureLayer::One(-1));
    assert!(!c.tie_word_embeddings);
    let src = |f: &str| c.provenance_of(f).unwrap().source.clone();
    assert_eq!(
        src("text_config.head_dim"),
        Source::ClassDefault("Qwen3Config")
    );
    assert_eq!(
        src("text_config.hidden_size"),
        Source::File(ConfigFile::Config)
    );
    assert_eq!(
        src("vision_config.hidden_act"),
        Source::ClassDefault("SiglipVisionConfig")
    );
    assert_eq!(
        src("vision_feature_layer"),
        Source::ClassDefault("LlavaOnevisionConfig")
    );
}

/// Without `vision_config` LlavaOnevisionConfig builds SigLIP-so400m (1152 / 4304 / 26 layers /
/// 16 heads / 384 px / patch 14), and without pinpoints its 36 (a·384, b·384), a, b ≤ 6.
#[test]
fn absent_vision_config_and_pinpoints_are_the_composite_defaults() {
    let mut v = base();
    remove(&mut v, &["vision_config"]);
    remove(&mut v, &["image_grid_pinpoints"]);
    let c = parse(&v).unwrap();
    assert_eq!(
        (c.vision.hidden_size, c.vision.intermediate_size),
        (1152, 4304)
    );
    assert_eq!(
        (c.vision.num_hidden_layers, c.vision.num_attention_heads),
        (26, 16)
    );
    assert_eq!((c.vision.image_size, c.vision.patch_size), (384, 14));
    assert_eq!(c.image_grid_pinpoints.len(), 36);
    assert_eq!(c.image_grid_pinpoints[0], (384, 384));
    assert_eq!(c.image_grid_pinpoints[35], (2304, 2304));
    assert_eq!(c.image_grid_pinpoints[6], (768, 384));
}

#[test]
fn wrong_and_refused_fields_are_named() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["vision_config"]["patch_size"] = "14".into()),
            "vision_config.patch_size",
        ),
        (
            Box::new(|v| v["image_grid_pinpoints"] = serde_json::json!([[384, 500]])),
            "image_grid_pinpoints[0]",
        ),
        (
            Box::new(|v| v["text_config"]["num_key_value_heads"] = 5.into()),
            "text_config.num_key_value_heads",
        ),
        (
            Box::new(|v| v["text_config"]["head_dim"] = Value::Null),
            "text_config.head_dim",
        ),
        (
            Box::new(|v| v["image_token_index"] = 200000.into()),
            "image_token_index",
        ),
        (
            Box::new(|v| v["vision_feature_layer"] = (-28).into()),
            "vision_feature_layer",
        ),
        (
            Box::new(|v| v["vision_feature_layer"] = serde_json::json!([-1, 27])),
            "vision_feature_layer",
        ),
        (
            Box::new(|v| v["vision_feature_select_strategy"] = "default".into()),
            "vision_feature_select_strategy",
        ),
        (
            Box::new(|v| remove(v, &["text_config", "model_type"])),
            "text_config.model_type",
        ),
        (Box::new(|v| remove(v, &["text_config"])), "text_config"),
        (
            Box::new(|v| v["vision_config"]["model_type"] = "clip_vision_model".into()),
            "vision_config.model_type",
        ),
        (Box::new(|v| v["model_type"] = "llava".into()), "model_type"),
        (Box::new(|v| remove(v, &["model_type"])), "model_type"),
        (
            Box::new(|v| v["architectures"] = serde_json::json!(["LlavaForConditionalGeneration"])),
            "architectures",
        ),
        (
            Box::new(|v| {
                v["text_config"]["rope_scaling"] =
                    serde_json::json!({"type": "linear", "factor": 2.0})
            }),
            "text_config.rope_scaling.rope_type",
        ),
        (
            Box::new(|v| v["text_config"]["use_sliding_window"] = true.into()),
            "text_config.use_sliding_window",
        ),
    ];
    for (edit, field) in cases {
        let mut v = base();
        edit(&mut v);
        assert_eq!(field_of(parse(&v).unwrap_err()), field);
    }
    assert_eq!(field_of(RConfig::from_json_str("{").unwrap_err()), "<root>");
}

/// R-4B's remote code: any model_type is accepted when auto_map names `configuration_r.RConfig`.
#[test]
fn r4b_remote_config_is_recognised_by_auto_map() {
    let mut v = base();
    v["model_type"] = "r_vl".into();
    v["auto_map"] = serde_json::json!({"AutoConfig": "configuration_r.RConfig"});
    let c = parse(&v).unwrap();
    assert_eq!(c.architecture.model_type, "r_vl");
    assert_eq!(
        c.architecture.remote_config.as_deref(),
        Some("configuration_r.RConfig")
    );
}

#[test]
fn rope_theta_resolution_and_image_token_id_alias() {
    // rope_parameters wins over the legacy top-level rope_theta (transformers 5.17).
    let mut v = base();
    v["text_config"]["rope_parameters"] =
        serde_json::json!({"rope_type": "default", "rope_theta": 5e5});
    let o = v.as_object_mut().unwrap();
    o.remove("image_token_index");
    o.insert("image_token_id".into(), serde_json::json!(7));
    let c = parse(&v).unwrap();
    assert_eq!(c.text.rope_theta, 5e5);
    assert_eq!(c.image_token_index, 7);
    // rope_parameters without θ: the legacy key fills it.
    let mut v = base();
    v["text_config"]["rope_parameters"] = serde_json::json!({"rope_type": "default"});
    assert_eq!(parse(&v).unwrap().text.rope_theta, 1e6);
    // rope_scaling: null (transformers 4 configs) is no scaling.
    let mut v = base();
    v["text_config"]["rope_scaling"] = Value::Null;
    assert_eq!(parse(&v).unwrap().text.rope_theta, 1e6);
}

/// LlavaOnevisionConfig.__post_init__: the top-level flag, or text_config's when that is true.
#[test]
fn tie_word_embeddings_follows_text_config_when_true() {
    for (top, text, want) in [
        (false, false, false),
        (true, false, true),
        (false, true, true),
        (true, true, true),
    ] {
        let mut v = base();
        v["tie_word_embeddings"] = top.into();
        v["text_config"]["tie_word_embeddings"] = text.into();
        assert_eq!(parse(&v).unwrap().tie_word_embeddings, want, "{top} {text}");
    }
}

/// A list of feature layers concatenates hidden states: [-1, -3] of 26 layers → states 26 and 24.
#[test]
fn feature_layer_lists_select_hidden_states_in_order() {
    let mut v = base();
    v["vision_feature_layer"] = serde_json::json!([-1, -3, 0]);
    let c = parse(&v).unwrap();
    assert_eq!(c.vision_feature_indices(), vec![26, 24, 0]);
    assert_eq!(c.vision_layers_used(), 26);
    assert_eq!(c.vision_feature_width(), 3 * 1152);
    v["vision_feature_layer"] = (-2).into();
    assert_eq!(parse(&v).unwrap().vision_layers_used(), 25);
}

#[test]
fn pinpoints_of_model_and_processor_must_agree() {
    let pre = |list: &str| {
        ImagePreprocessing::from_json_str(&format!(r#"{{"image_grid_pinpoints": {list}}}"#))
            .unwrap()
    };
    let text = base().to_string();
    RConfig::resolve(&text, Some(&pre("[[384, 384], [384, 768]]"))).unwrap();
    let e = RConfig::resolve(&text, Some(&pre("[[384, 384]]"))).unwrap_err();
    assert_eq!(field_of(e), "image_grid_pinpoints");
    // A processor file without pinpoints has the class default (36), not the config's two.
    let e = RConfig::resolve(
        &text,
        Some(&ImagePreprocessing::from_json_str("{}").unwrap()),
    )
    .unwrap_err();
    assert_eq!(field_of(e), "image_grid_pinpoints");
}

/// PIL codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming; others refused.
#[test]
fn preprocessor_resample_codes_and_class_defaults() {
    use crate::anyres::Resample;
    for (code, want) in [
        (0, Resample::Nearest),
        (1, Resample::Lanczos),
        (2, Resample::Bilinear),
        (3, Resample::Bicubic),
        (4, Resample::Box),
        (5, Resample::Hamming),
    ] {
        let p = ImagePreprocessing::from_json_str(&format!(r#"{{"resample": {code}}}"#)).unwrap();
        assert_eq!(p.resample, want);
    }
    for bad in ["6", "\"bicubic\"", "-1"] {
        let e =
            ImagePreprocessing::from_json_str(&format!(r#"{{"resample": {bad}}}"#)).unwrap_err();
        assert_eq!(field_of(e), "preprocessor.resample");
    }
    // LlavaOnevisionImageProcessor's defaults: OpenAI CLIP mean/std, bicubic, 1/255.
    let p = ImagePreprocessing::from_json_str("{}").unwrap();
    let f = |x: f64| x as f32;
    assert_eq!(p.norm.mean, [f(0.48145466), f(0.4578275), f(0.40821073)]);
    assert_eq!(p.norm.std, [f(0.26862954), f(0.26130258), f(0.27577711)]);
    assert_eq!(p.resample, Resample::Bicubic);
    assert_eq!(p.pinpoints.as_ref().map(Vec::len), Some(36));
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
