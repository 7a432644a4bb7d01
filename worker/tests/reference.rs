//! The R-4B forward against HF transformers: logits and greedy tokens recorded by
//! `tests/reference/make_fixtures.py` on a tiny random R-4B-shaped model (f32, CPU).

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::collective::SingleRank;
use r4b_worker::config::{ImagePreprocessing, RConfig};
use r4b_worker::engine::{run_greedy, GreedyOptions, Prompt};
use r4b_worker::model::{anyres, OutputRows, R4bModel, SeqChunk};

fn load() -> (RConfig, R4bModel) {
    let dir = checkpoint_dir();
    let cfg = RConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = R4bModel::load(&ckpt, &cfg, Arc::new(SingleRank), &Device::Cpu).unwrap();
    (cfg, model)
}

fn prompt(model: &R4bModel, r: &serde_json::Value, name: &str) -> Prompt {
    let cfg = model.config();
    let pre = ImagePreprocessing::from_dir(&checkpoint_dir()).unwrap();
    let images = images(r, name)
        .iter()
        .map(|f| {
            let img = image::open(fixtures().join(f)).unwrap().to_rgb8();
            let views =
                anyres::preprocess(&img, &cfg.image_geometry(), pre.resample, &pre.norm).unwrap();
            model.encode_image(&views).unwrap()
        })
        .collect();
    Prompt {
        input_ids: ids(r, name),
        images,
    }
}

/// Teacher-forced logits of every prompt position, one chunk.
fn prompt_logits(model: &R4bModel, p: &Prompt) -> Vec<Vec<f32>> {
    let n = p.input_ids.len();
    let mut kv = model.new_kv_cache(n.div_ceil(16), 16).unwrap();
    let table: Vec<u32> = (0..n.div_ceil(16) as u32).collect();
    let image_rows = if p.images.is_empty() {
        None
    } else {
        Some(Tensor::cat(&p.images, 0).unwrap().into())
    };
    let chunk = SeqChunk {
        tokens: &p.input_ids,
        prompt_tokens: usize::MAX,
        start_pos: 0,
        block_table: &table,
        image_rows,
    };
    let hidden = model
        .forward_step(&[chunk], &mut kv, OutputRows::All)
        .unwrap();
    model
        .full_logits(&hidden)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn greedy_opts() -> GreedyOptions {
    GreedyOptions {
        steps: 32,
        block_size: 16,
        prefill_chunk: None,
        batched: false,
        record_logits: true,
    }
}

fn check_prompt(name: &str, tail_key: &str, all_positions: bool) {
    let r = reference();
    let t = reference_tensors();
    let (_, model) = load();
    let p = prompt(&model, &r, name);

    // Teacher-forced prompt logits.
    let got = prompt_logits(&model, &p);
    let want = rows(&t[tail_key]);
    let got = if all_positions {
        &got[..]
    } else {
        &got[got.len() - want.len()..]
    };
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOL, "{name}: prompt logits row {i}: max abs diff {d}");
    }

    // 32 greedy steps: tokens identical, logits of every step within tolerance.
    let run = run_greedy(&model, &[p], &greedy_opts()).unwrap().remove(0);
    assert_eq!(run.tokens, greedy(&r, name), "{name}: greedy tokens");
    let want = rows(&t[&format!("{name}.step_logits")]);
    for (i, (g, w)) in run.logits.iter().zip(&want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOL, "{name}: step {i} logits: max abs diff {d}");
    }
}

#[test]
fn text_prompt_matches_hf() {
    check_prompt("text", "text.prompt_logits", true);
}

#[test]
fn one_non_square_image_matches_hf() {
    check_prompt("image", "image.prompt_logits_tail", false);
}

#[test]
fn two_images_of_different_sizes_match_hf() {
    check_prompt("two_images", "two_images.prompt_logits_tail", false);
}

#[test]
fn image_rows_have_the_hf_processor_token_count() {
    let r = reference();
    let (cfg, model) = load();
    let pre = ImagePreprocessing::from_dir(&checkpoint_dir()).unwrap();
    for (name, w, h) in [
        ("img_500x300.png", 500, 300),
        ("img_260x190.png", 260, 190),
        ("img_150x330.png", 150, 330),
    ] {
        let img = image::open(fixtures().join(name)).unwrap().to_rgb8();
        let views =
            anyres::preprocess(&img, &cfg.image_geometry(), pre.resample, &pre.norm).unwrap();
        let rows = model.encode_image(&views).unwrap().dim(0).unwrap();
        let want = r["image_token_counts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["width"] == w && c["height"] == h)
            .map(|c| c["processor"].as_u64().unwrap() as usize);
        if let Some(want) = want {
            assert_eq!(rows, want, "{name}");
        }
        assert_eq!(rows, cfg.image_geometry().num_image_tokens(h, w), "{name}");
    }
}

/// Three sequences of different lengths (text, one image, two images), run together — each
/// joins one step later than the previous, so steps mix a prefill chunk with others' decodes,
/// and prefills are cut into 300-token chunks — give what each gives alone.
#[test]
fn batched_paged_steps_equal_sequences_run_alone() {
    let r = reference();
    let (_, model) = load();
    let prompts: Vec<Prompt> = ["text", "image", "two_images"]
        .iter()
        .map(|n| prompt(&model, &r, n))
        .collect();
    let mut opts = greedy_opts();
    opts.steps = 12;
    let alone = run_greedy(&model, &prompts, &opts).unwrap();
    opts.batched = true;
    opts.prefill_chunk = Some(300);
    opts.block_size = 8;
    let together = run_greedy(&model, &prompts, &opts).unwrap();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, b.tokens, "sequence {i} tokens");
        for (s, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
            let d = max_abs_diff(x, y);
            assert!(d <= TOL, "sequence {i} step {s}: max abs diff {d}");
        }
    }
    // And the batched run still matches HF.
    for (i, name) in ["text", "image", "two_images"].iter().enumerate() {
        assert_eq!(together[i].tokens[..], greedy(&r, name)[..12], "{name}");
    }
}

#[test]
fn a_step_with_mismatched_image_rows_is_an_error() {
    let r = reference();
    let (_, model) = load();
    let p = prompt(&model, &r, "image");
    let n = p.input_ids.len();
    let mut kv = model.new_kv_cache(n.div_ceil(16), 16).unwrap();
    let table: Vec<u32> = (0..n.div_ceil(16) as u32).collect();
    let rows = p.images[0].narrow(0, 0, 10).unwrap();
    let chunk = SeqChunk {
        tokens: &p.input_ids,
        prompt_tokens: usize::MAX,
        start_pos: 0,
        block_table: &table,
        image_rows: Some(rows.into()),
    };
    let err = model
        .forward_step(&[chunk], &mut kv, OutputRows::Last)
        .unwrap_err();
    assert!(err.to_string().contains("image rows"), "{err}");
    let chunk = SeqChunk {
        tokens: &p.input_ids,
        prompt_tokens: usize::MAX,
        start_pos: 0,
        block_table: &table[..1],
        image_rows: None,
    };
    assert!(model
        .forward_step(&[chunk], &mut kv, OutputRows::Last)
        .is_err());
    let chunk = SeqChunk {
        tokens: &[5000],
        prompt_tokens: usize::MAX,
        start_pos: 0,
        block_table: &table,
        image_rows: None,
    };
    let err = model
        .forward_step(&[chunk], &mut kv, OutputRows::Last)
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
}

/// An `<image>` id after the prompt (the model generated it) is embedded like any token.
#[test]
fn a_generated_image_token_is_an_ordinary_token() {
    let (cfg, model) = load();
    let mut kv = model.new_kv_cache(2, 16).unwrap();
    let ids = [5, 6, cfg.image_token_index];
    let chunk = SeqChunk {
        tokens: &ids,
        start_pos: 0,
        block_table: &[0, 1],
        prompt_tokens: 2,
        image_rows: None,
    };
    let h = model
        .forward_step(&[chunk], &mut kv, OutputRows::All)
        .unwrap();
    assert_eq!(h.dims(), &[3, cfg.text.hidden_size]);
}
