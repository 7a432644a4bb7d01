//! Loading R-4B however Hugging Face saved it, against transformers 5.17 itself
//! (`tests/reference/make_variants.py` → `tests/fixtures/variants/`):
//!
//! - every config form (class-default diff, transformers 5.17 and 4.57 `save_pretrained`, full
//!   `to_dict()`) resolves, field by field, to what `AutoConfig.from_pretrained(dir).to_dict()`
//!   gave (`hf.json`), and the image processor to what transformers' processor read;
//! - the served variants give HF's logits within 1e-4 on a prompt with one image;
//! - the refused variants fail at start-up naming the field, and `hf.json` records what
//!   transformers does with them instead (fails on images, or picks a head vLLM would not);
//! - the PIL resample codes 0–5 give the processor's uint8 views bit for bit.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::collective::SingleRank;
use r4b_worker::config::{ImagePreprocessing, RConfig, Source};
use r4b_worker::model::anyres::{self, ImageGeometry, Resample};
use r4b_worker::model::head::{head_source, HeadSource};
use r4b_worker::model::{OutputRows, R4bModel, SeqChunk};
use r4b_worker::Error;
use serde_json::Value;
use sha2::{Digest, Sha256};

const FORMS: [&str; 4] = [
    "config.json",
    "config.save_pretrained.json",
    "config.tf4.json",
    "config.full.json",
];
const SERVED: [&str; 6] = [
    "untied",
    "tied",
    "feature-layer-list",
    "pinpoints-preprocessor",
    "resample-1",
    "resample-2",
];

fn variant(name: &str) -> PathBuf {
    fixtures().join("variants").join(name)
}

fn hf(name: &str) -> Value {
    let text = std::fs::read_to_string(variant(name).join("hf.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `a.b.c` in a JSON object.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// JSON equality with numbers compared as f64 (transformers writes 1e-06, we 1e-6).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

/// Our resolution against transformers' `to_dict()` (`hf["config"]`): the fields the model uses,
/// by name, then every value we recorded that transformers' dict also holds.
fn assert_matches_hf(cfg: &RConfig, hf: &Value, what: &str) {
    let c = &hf["config"];
    let num = |path: &str| {
        lookup(c, path)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{what}: hf.json has no number at {path}"))
    };
    let (t, v) = (&cfg.text, &cfg.vision);
    let used: [(&str, f64); 19] = [
        ("text_config.hidden_size", t.hidden_size as f64),
        ("text_config.intermediate_size", t.intermediate_size as f64),
        ("text_config.num_hidden_layers", t.num_hidden_layers as f64),
        (
            "text_config.num_attention_heads",
            t.num_attention_heads as f64,
        ),
        (
            "text_config.num_key_value_heads",
            t.num_key_value_heads as f64,
        ),
        ("text_config.head_dim", t.head_dim as f64),
        ("text_config.rms_norm_eps", t.rms_norm_eps),
        ("text_config.rope_parameters.rope_theta", t.rope_theta),
        ("text_config.vocab_size", t.vocab_size as f64),
        (
            "text_config.max_position_embeddings",
            t.max_position_embeddings as f64,
        ),
        ("vision_config.hidden_size", v.hidden_size as f64),
        (
            "vision_config.intermediate_size",
            v.intermediate_size as f64,
        ),
        (
            "vision_config.num_hidden_layers",
            v.num_hidden_layers as f64,
        ),
        (
            "vision_config.num_attention_heads",
            v.num_attention_heads as f64,
        ),
        ("vision_config.image_size", v.image_size as f64),
        ("vision_config.patch_size", v.patch_size as f64),
        ("vision_config.layer_norm_eps", v.layer_norm_eps),
        ("vision_config.num_channels", v.num_channels as f64),
        ("image_token_index", f64::from(cfg.image_token_index)),
    ];
    for (path, ours) in used {
        assert_eq!(ours, num(path), "{what}: {path}");
    }
    let layers: Vec<i64> = match &c["vision_feature_layer"] {
        Value::Array(a) => a.iter().map(|x| x.as_i64().unwrap()).collect(),
        x => vec![x.as_i64().unwrap()],
    };
    assert_eq!(cfg.vision_feature_layer.as_slice(), &layers[..], "{what}");
    let pinpoints: Vec<(usize, usize)> = c["image_grid_pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(cfg.image_grid_pinpoints, pinpoints, "{what}");
    assert_eq!(
        format!("anyres_max_{}", cfg.anyres_max_tiles),
        c["vision_aspect_ratio"].as_str().unwrap(),
        "{what}"
    );
    assert_eq!(
        Some(cfg.tie_word_embeddings),
        c["tie_word_embeddings"].as_bool(),
        "{what}"
    );
    assert_eq!(
        Some(cfg.architecture.model_type.as_str()),
        c["model_type"].as_str(),
        "{what}"
    );
    for (path, want) in [
        ("text_config.hidden_act", "silu"),
        ("vision_config.hidden_act", "gelu_pytorch_tanh"),
        ("vision_feature_select_strategy", "full"),
        ("projector_hidden_act", "gelu"),
    ] {
        assert_eq!(
            lookup(c, path).and_then(Value::as_str),
            Some(want),
            "{what}: {path}"
        );
    }
    let mut compared = 0;
    for r in &cfg.provenance {
        if let Some(theirs) = lookup(c, &r.field) {
            assert!(
                same(&r.value, theirs),
                "{what}: {} = {} ({}) but transformers has {theirs}",
                r.field,
                r.value,
                r.source
            );
            compared += 1;
        }
    }
    assert!(compared >= 30, "{what}: only {compared} values compared");
}

/// The image processor's settings against transformers' processor (`hf["image_processor"]`).
fn assert_processor_matches_hf(pre: &ImagePreprocessing, hf: &Value, what: &str) {
    let p = &hf["image_processor"];
    assert_eq!(
        u64::from(pre.resample.pil_code()),
        p["resample"].as_u64().unwrap(),
        "{what}"
    );
    for (ours, key) in [(pre.norm.mean, "image_mean"), (pre.norm.std, "image_std")] {
        let theirs: Vec<f32> = p[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(ours.to_vec(), theirs, "{what}: {key}");
    }
    let theirs: Vec<(usize, usize)> = p["image_grid_pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x[0].as_u64().unwrap() as usize,
                x[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(pre.pinpoints.as_ref(), Some(&theirs), "{what}: pinpoints");
}

#[test]
fn every_config_form_resolves_as_transformers_does() {
    let mut checked = 0;
    for name in SERVED
        .iter()
        .chain(&["tied-stored-head", "full-size"])
        .copied()
    {
        let h = hf(name);
        assert_eq!(h["versions"]["transformers"], "5.17.0");
        for form in FORMS {
            let path = variant(name).join(form);
            assert!(path.exists(), "{name}/{form}");
            let cfg = RConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}/{form}: {e}"));
            assert_matches_hf(&cfg, &h, &format!("{name}/{form}"));
            checked += 1;
        }
        if name != "full-size" {
            let pre = ImagePreprocessing::from_dir(&variant(name)).unwrap();
            assert_processor_matches_hf(&pre, &h, name);
        }
    }
    assert_eq!(checked, 8 * FORMS.len());
}

/// R-4B's shapes (r4b-model.md §1.3) from every form, including the class-default diff that
/// leaves out vocab_size, num_attention_heads, head_dim and rms_norm_eps.
#[test]
fn full_size_diff_config_resolves_to_the_spec_shapes() {
    for form in FORMS {
        let cfg = RConfig::from_file(&variant("full-size").join(form)).unwrap();
        let t = &cfg.text;
        assert_eq!(
            (
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads
            ),
            (36, 32, 8),
            "{form}"
        );
        assert_eq!(
            (t.head_dim, t.vocab_size, t.hidden_size),
            (128, 151_936, 2560),
            "{form}"
        );
        assert_eq!((t.intermediate_size, t.rope_theta), (9728, 1e6), "{form}");
        assert_eq!(t.rms_norm_eps, 1e-6, "{form}");
        let v = &cfg.vision;
        assert_eq!(
            (
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads
            ),
            (1152, 4304, 26, 16),
            "{form}"
        );
        assert_eq!(cfg.image_grid_pinpoints.len(), 36, "{form}");
        assert_eq!(cfg.image_token_index, 151_669, "{form}");
        for tp in [1, 2, 4, 8] {
            cfg.validate_tp(tp).unwrap();
        }
    }
    // The diff form really relies on the defaults.
    let text = std::fs::read_to_string(variant("full-size").join("config.json")).unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    let cfg = RConfig::from_file(&variant("full-size").join("config.json")).unwrap();
    for f in [
        "vocab_size",
        "num_attention_heads",
        "head_dim",
        "rms_norm_eps",
    ] {
        assert!(
            raw["text_config"].get(f).is_none(),
            "{f} is in the diff form"
        );
        assert_eq!(
            cfg.provenance_of(&format!("text_config.{f}"))
                .unwrap()
                .source,
            Source::ClassDefault("Qwen3Config"),
            "{f}"
        );
    }
}

/// HF's logits (last rows of a prompt with one 260x190 image) for every served variant.
#[test]
fn served_variants_match_hf_logits() {
    let image = image::open(fixtures().join("img_260x190.png"))
        .unwrap()
        .to_rgb8();
    for name in SERVED {
        let dir = variant(name);
        let h = hf(name);
        let cfg = RConfig::from_dir(&dir).unwrap();
        let pre = ImagePreprocessing::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let want_head = match h["behaviour"]["hf_head"].as_str().unwrap() {
            "embed_tokens" => HeadSource::TiedEmbedding,
            _ => HeadSource::LmHead,
        };
        assert_eq!(head_source(&cfg, &ckpt).unwrap(), want_head, "{name}");
        let model = R4bModel::load(&ckpt, &cfg, Arc::new(SingleRank), &Device::Cpu).unwrap();
        let views =
            anyres::preprocess(&image, &cfg.image_geometry(), pre.resample, &pre.norm).unwrap();
        let rows = model.encode_image(&views).unwrap();
        let ids: Vec<u32> = h["prompt"]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let mut kv = model.new_kv_cache(n.div_ceil(16), 16).unwrap();
        let table: Vec<u32> = (0..n.div_ceil(16) as u32).collect();
        let chunk = SeqChunk {
            tokens: &ids,
            prompt_tokens: usize::MAX,
            start_pos: 0,
            block_table: &table,
            image_rows: Some(rows.into()),
        };
        let hidden = model
            .forward_step(&[chunk], &mut kv, OutputRows::All)
            .unwrap();
        let got = model
            .full_logits(&hidden)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t = candle_core::safetensors::load(dir.join("hf_logits.safetensors"), &Device::Cpu)
            .unwrap();
        let want = rows_of(&t["image.logits_tail"]);
        let got = &got[got.len() - want.len()..];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(d <= TOL, "{name}: logits row {i}: max abs diff {d}");
        }
    }
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn field_of(e: impl Into<Error>) -> String {
    match e.into() {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error naming a field, got {other}"),
    }
}

/// `vision_feature_select_strategy: default`: transformers fails on every image (hf.json), so we
/// refuse at start-up.
#[test]
fn strategy_default_is_refused_at_startup() {
    let h = hf("strategy-default");
    let hf_error = h["behaviour"]["hf_image_error"].as_str().unwrap();
    assert!(hf_error.contains("not consistent"), "{hf_error}");
    for form in FORMS {
        let e = RConfig::from_file(&variant("strategy-default").join(form)).unwrap_err();
        assert_eq!(field_of(e), "vision_feature_select_strategy", "{form}");
    }
}

/// Pinpoints only in preprocessor_config.json, differing from the class default the model then
/// uses: transformers fails on some image sizes (hf.json), so we refuse at start-up. The same
/// placement with the default list (`pinpoints-preprocessor`) is served above.
#[test]
fn disagreeing_processor_pinpoints_are_refused_at_startup() {
    let h = hf("pinpoints-preprocessor-other");
    let failures = h["behaviour"]["grids"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| !g["hf_error"].is_null())
        .count();
    assert!(failures >= 1, "transformers failed on no image size");
    for form in FORMS {
        let e =
            RConfig::from_file(&variant("pinpoints-preprocessor-other").join(form)).unwrap_err();
        assert_eq!(field_of(e), "image_grid_pinpoints", "{form}");
    }
}

/// Tied config with a different stored lm_head: transformers 5.17 keeps the stored head
/// (hf.json), vLLM ties; we refuse at start-up rather than pick one.
#[test]
fn tied_config_with_a_different_stored_head_is_refused_at_load() {
    let h = hf("tied-stored-head");
    assert_eq!(h["behaviour"]["hf_head"], "lm_head.weight");
    let dir = variant("tied-stored-head");
    let cfg = RConfig::from_dir(&dir).unwrap();
    assert!(cfg.tie_word_embeddings);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let e = R4bModel::load(&ckpt, &cfg, Arc::new(SingleRank), &Device::Cpu).unwrap_err();
    assert_eq!(field_of(e), "tie_word_embeddings");
}

/// sha256 of each uint8 view (HWC) the PIL image processor made, for every resample code.
#[test]
fn resample_codes_give_the_pil_processor_views() {
    let text = std::fs::read_to_string(fixtures().join("variants/resample_views.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let geom = ImageGeometry {
        tile: 384,
        patch: 14,
        pinpoints: r["pinpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_u64().unwrap() as usize,
                )
            })
            .collect(),
        max_tiles: 9,
    };
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    for case in cases {
        let code = case["resample"].as_u64().unwrap() as u8;
        let name = case["image"].as_str().unwrap();
        let img = image::open(fixtures().join(name)).unwrap().to_rgb8();
        let views = anyres::views_u8(&img, &geom, Resample::from_pil(code).unwrap()).unwrap();
        let want: Vec<&str> = case["sha256"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let got: Vec<String> = views
            .iter()
            .map(|v| {
                Sha256::digest(v.as_raw())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .collect();
        assert_eq!(got, want, "resample {code}, {name}");
    }
}
