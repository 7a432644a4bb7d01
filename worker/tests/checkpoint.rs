//! The checkpoint loader: name layouts, shards, tied heads, dtypes, per-rank byte ranges, and
//! named errors for bad checkpoints. Variants are written from the HF fixture checkpoint.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use r4b_worker::checkpoint::{ByteRange, Checkpoint, NameLayout};
use r4b_worker::collective::{Collective, CollectiveError, SingleRank};
use r4b_worker::config::RConfig;
use r4b_worker::model::{OutputRows, R4bModel, SeqChunk};
use r4b_worker::parallel::Shard;
use r4b_worker::Error;
use safetensors::{Dtype, SafeTensors};

/// A stored tensor, owned.
#[derive(Clone)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_raw(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect()
}

fn write_raw(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn fixture_tensors() -> BTreeMap<String, Raw> {
    read_raw(&checkpoint_dir().join("model.safetensors"))
}

fn fixture_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(checkpoint_dir().join("config.json")).unwrap())
        .unwrap()
}

/// Writes a checkpoint directory with these tensors and config.
fn write_checkpoint(dir: &Path, tensors: &BTreeMap<String, Raw>, config: &serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    write_raw(&dir.join("model.safetensors"), tensors);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn load_model(dir: &Path) -> Result<R4bModel, Error> {
    let cfg = RConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    R4bModel::load(&ckpt, &cfg, Arc::new(SingleRank), &Device::Cpu)
}

/// Teacher-forced logits of the reference text prompt.
fn text_logits(model: &R4bModel) -> Vec<Vec<f32>> {
    let ids = ids(&reference(), "text");
    let mut kv = model.new_kv_cache(4, 16).unwrap();
    let chunk = SeqChunk {
        tokens: &ids,
        prompt_tokens: usize::MAX,
        start_pos: 0,
        block_table: &[0, 1, 2, 3],
        image_rows: None,
    };
    let h = model
        .forward_step(&[chunk], &mut kv, OutputRows::All)
        .unwrap();
    model.full_logits(&h).unwrap().to_vec2::<f32>().unwrap()
}

fn assert_logits(got: &[Vec<f32>], want: &Tensor, tol: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(rows(want)).enumerate() {
        let d = max_abs_diff(g, &w);
        assert!(d <= tol, "{what}: row {i}: max abs diff {d}");
    }
}

/// Renames to the pre-4.52 layout (`language_model.model.*`, `vision_tower.vision_model.*`, ...).
fn legacy_name(n: &str) -> String {
    if let Some(r) = n.strip_prefix("model.language_model.") {
        format!("language_model.model.{r}")
    } else if let Some(r) = n.strip_prefix("lm_head.") {
        format!("language_model.lm_head.{r}")
    } else if let Some(r) = n.strip_prefix("model.vision_tower.") {
        format!("vision_tower.vision_model.{r}")
    } else if let Some(r) = n.strip_prefix("model.") {
        r.to_string()
    } else {
        n.to_string()
    }
}

#[test]
fn legacy_layout_in_two_shards_gives_the_reference_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let all = fixture_tensors();
    let mut shards = [BTreeMap::new(), BTreeMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (n, r)) in all.iter().enumerate() {
        let name = legacy_name(n);
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), serde_json::Value::String(file));
        shards[i % 2].insert(name, r.clone());
    }
    write_raw(&dir.join("model-00001-of-00002.safetensors"), &shards[0]);
    write_raw(&dir.join("model-00002-of-00002.safetensors"), &shards[1]);
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), fixture_config().to_string()).unwrap();

    let ckpt = Checkpoint::open(dir).unwrap();
    assert_eq!(
        ckpt.layout(),
        NameLayout::Legacy {
            vision_model_segment: true
        }
    );
    assert_eq!(ckpt.files().len(), 2);
    let model = load_model(dir).unwrap();
    assert_logits(
        &text_logits(&model),
        &reference_tensors()["text.prompt_logits"],
        TOL,
        "legacy+shards",
    );
}

#[test]
fn without_lm_head_the_head_is_tied_to_the_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.remove("lm_head.weight");
    let mut cfg = fixture_config();
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    write_checkpoint(tmp.path(), &t, &cfg);
    let model = load_model(tmp.path()).unwrap();
    assert_logits(
        &text_logits(&model),
        &reference_tensors()["tied.text.prompt_logits"],
        TOL,
        "tied",
    );
}

/// A tied config with a stored lm_head that differs from the embedding is ambiguous
/// (transformers 5 keeps the stored head, vLLM ties): refused, naming the field.
#[test]
fn a_tied_config_with_a_different_stored_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = fixture_config();
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    write_checkpoint(tmp.path(), &fixture_tensors(), &cfg);
    match load_model(tmp.path()) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "tie_word_embeddings"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A stored lm_head equal to the embedding is the tied head either way: served, tied logits.
#[test]
fn a_stored_head_equal_to_the_embedding_is_the_tied_head() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    let embed = t["model.language_model.embed_tokens.weight"].clone();
    t.insert("lm_head.weight".into(), embed);
    let mut cfg = fixture_config();
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    write_checkpoint(tmp.path(), &t, &cfg);
    let model = load_model(tmp.path()).unwrap();
    assert_logits(
        &text_logits(&model),
        &reference_tensors()["tied.text.prompt_logits"],
        TOL,
        "tied, head stored",
    );
}

/// An untied config without lm_head.weight: transformers would use a random head; refused.
#[test]
fn an_untied_config_without_lm_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.remove("lm_head.weight");
    write_checkpoint(tmp.path(), &t, &fixture_config());
    match load_model(tmp.path()) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "tie_word_embeddings"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The load plan `r4b inspect` sums is what the CPU loader reads, rank by rank.
#[test]
fn the_load_plan_is_what_each_rank_reads() {
    use r4b_worker::model::{head, plan};
    let dir = checkpoint_dir();
    let cfg = RConfig::from_file(&dir.join("config.json")).unwrap();
    for world in [1usize, 2, 4] {
        for rank in 0..world {
            let ckpt = Checkpoint::open(&dir).unwrap();
            let h = head::head_source(&cfg, &ckpt).unwrap();
            let summary = plan::summarize(&plan::load_plan(&cfg, h), &ckpt, world).unwrap();
            let before = ckpt.bytes_read();
            R4bModel::load(
                &ckpt,
                &cfg,
                Arc::new(Place(Shard { rank, world })),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                ckpt.bytes_read() - before,
                summary.bytes_per_rank,
                "rank {rank} of {world}"
            );
        }
    }
}

/// bf16 and f16 on disk load as the same numbers `half` rounds the f32 weights to.
#[test]
fn bf16_and_f16_checkpoints_load_as_rounded_f32() {
    let f32_tensors = fixture_tensors();
    let name = "model.language_model.layers.0.mlp.gate_proj.weight";
    let src: Vec<f32> = f32_tensors[name]
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let converted: BTreeMap<String, Raw> = f32_tensors
            .iter()
            .map(|(n, r)| {
                let data = r
                    .data
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        match dtype {
                            Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                            _ => half::f16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (
                    n.clone(),
                    Raw {
                        dtype,
                        shape: r.shape.clone(),
                        data,
                    },
                )
            })
            .collect();
        write_checkpoint(tmp.path(), &converted, &fixture_config());
        let ckpt = Checkpoint::open(tmp.path()).unwrap();
        let got = ckpt
            .load(name, &[160, 64], &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = src
            .iter()
            .map(|&x| match dtype {
                Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
                _ => half::f16::from_f32(x).to_f32(),
            })
            .collect();
        assert_eq!(got, want, "{dtype:?}");
        // The whole model loads and still tracks the f32 reference closely.
        let model = load_model(tmp.path()).unwrap();
        let tol = if dtype == Dtype::BF16 { 0.5 } else { 0.05 };
        assert_logits(
            &text_logits(&model),
            &reference_tensors()["text.prompt_logits"],
            tol,
            "half",
        );
    }
}

/// A collective that only knows its place: loading never communicates.
#[derive(Debug)]
struct Place(Shard);

impl Collective for Place {
    fn rank(&self) -> usize {
        self.0.rank
    }
    fn world_size(&self) -> usize {
        self.0.world
    }
    fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor, CollectiveError> {
        Err(CollectiveError::Protocol("loading only".into()))
    }
    fn all_gather(&self, _: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        Err(CollectiveError::Protocol("loading only".into()))
    }
    fn broadcast(&self, _: &Tensor, _: usize) -> Result<Tensor, CollectiveError> {
        Err(CollectiveError::Protocol("loading only".into()))
    }
}

fn overlaps(a: &ByteRange, b: &ByteRange) -> bool {
    a.file == b.file && a.start < b.end && b.start < a.end
}

/// Each rank of TP=2 and TP=4 reads only its own slices of the split tensors, the replicated
/// tensors whole, and nothing of the vision layers past the feature layer, the vision head or
/// post_layernorm.
#[test]
fn each_rank_reads_only_its_own_slices() {
    let dir = checkpoint_dir();
    let cfg = RConfig::from_file(&dir.join("config.json")).unwrap();
    for world in [2usize, 4] {
        let mut per_rank = Vec::new();
        for rank in 0..world {
            let ckpt = Checkpoint::open(&dir).unwrap();
            ckpt.record_reads();
            R4bModel::load(
                &ckpt,
                &cfg,
                Arc::new(Place(Shard { rank, world })),
                &Device::Cpu,
            )
            .unwrap();
            per_rank.push((ckpt.recorded_reads(), ckpt.bytes_read(), ckpt));
        }
        let entries = per_rank[0].2.entries().clone();
        let file_len = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        for (rank, (reads, bytes, _)) in per_rank.iter().enumerate() {
            assert!(
                *bytes < file_len,
                "rank {rank} read {bytes} of {file_len} bytes"
            );
            for (name, e) in &entries {
                let whole = ByteRange {
                    file: e.file,
                    start: e.start,
                    end: e.end,
                };
                let touched: usize = reads
                    .iter()
                    .filter(|r| overlaps(r, &whole))
                    .map(|r| r.end.min(e.end) - r.start.max(e.start))
                    .sum();
                let never = name.contains("encoder.layers.2.")
                    || name.contains("vision_tower.head.")
                    || name.contains("post_layernorm");
                let split = name.contains("language_model.")
                    && (name.ends_with("proj.weight") || name.contains("embed_tokens"))
                    || name == "lm_head.weight";
                let size = e.end - e.start;
                if never {
                    assert_eq!(touched, 0, "rank {rank} read unused {name}");
                } else if split {
                    assert_eq!(touched, size / world, "rank {rank} of {world}: {name}");
                } else {
                    assert_eq!(touched, size, "rank {rank}: replicated {name}");
                }
            }
        }
        // Split tensors: no byte is read by two ranks.
        for a in 0..world {
            for b in a + 1..world {
                for (name, e) in entries
                    .iter()
                    .filter(|(n, _)| n.contains("proj.weight") && n.contains("language_model"))
                {
                    let whole = ByteRange {
                        file: e.file,
                        start: e.start,
                        end: e.end,
                    };
                    let ra: Vec<_> = per_rank[a]
                        .0
                        .iter()
                        .filter(|r| overlaps(r, &whole))
                        .collect();
                    let rb: Vec<_> = per_rank[b]
                        .0
                        .iter()
                        .filter(|r| overlaps(r, &whole))
                        .collect();
                    assert!(
                        !ra.iter().any(|x| rb.iter().any(|y| overlaps(x, y))),
                        "ranks {a} and {b} both read bytes of {name}"
                    );
                }
            }
        }
    }
}

/// Rank 0's slices load intact from a file whose rank-1 halves are all NaN.
#[test]
fn rank_slices_ignore_poisoned_bytes_of_other_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    let q = "model.language_model.layers.0.self_attn.q_proj.weight"; // [256, 64], rows split
    let o = "model.language_model.layers.0.self_attn.o_proj.weight"; // [64, 256], cols split
    let nan = f32::NAN.to_le_bytes();
    let raw = t.get_mut(q).unwrap();
    for c in raw.data[128 * 64 * 4..].chunks_exact_mut(4) {
        c.copy_from_slice(&nan);
    }
    let raw = t.get_mut(o).unwrap();
    for row in raw.data.chunks_exact_mut(256 * 4) {
        for c in row[128 * 4..].chunks_exact_mut(4) {
            c.copy_from_slice(&nan);
        }
    }
    write_checkpoint(tmp.path(), &t, &fixture_config());
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    let r0 = Shard { rank: 0, world: 2 };
    for (name, shape, rows) in [(q, [256usize, 64], true), (o, [64, 256], false)] {
        let x = if rows {
            ckpt.load_rows(name, &shape, r0, &Device::Cpu)
        } else {
            ckpt.load_cols(name, &shape, r0, &Device::Cpu)
        };
        let v = x.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v.len(), 256 * 64 / 2);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: rank 0 saw rank 1's bytes"
        );
        let y = if rows {
            ckpt.load_rows(name, &shape, Shard { rank: 1, world: 2 }, &Device::Cpu)
        } else {
            ckpt.load_cols(name, &shape, Shard { rank: 1, world: 2 }, &Device::Cpu)
        };
        assert!(y
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_nan()));
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    t.remove("model.language_model.layers.1.mlp.up_proj.weight");
    write_checkpoint(tmp.path(), &t, &fixture_config());
    match load_model(tmp.path()) {
        Err(Error::MissingTensor { name }) => {
            assert_eq!(name, "model.language_model.layers.1.mlp.up_proj.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn a_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = fixture_tensors();
    let r = t
        .get_mut("model.multi_modal_projector.linear_1.weight")
        .unwrap();
    r.shape = vec![32, 64]; // stored transposed
    write_checkpoint(tmp.path(), &t, &fixture_config());
    match load_model(tmp.path()) {
        Err(Error::TensorShape {
            name,
            found,
            expected,
        }) => {
            assert_eq!(name, "model.multi_modal_projector.linear_1.weight");
            assert_eq!(found, vec![32, 64]);
            assert_eq!(expected, vec![64, 32]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
}

#[test]
fn a_truncated_file_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), fixture_config().to_string()).unwrap();
    let bytes = std::fs::read(checkpoint_dir().join("model.safetensors")).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 4, 0] {
        std::fs::write(tmp.path().join("model.safetensors"), &bytes[..cut]).unwrap();
        match Checkpoint::open(tmp.path()) {
            Err(Error::CheckpointFile { path, reason }) => {
                assert!(path.ends_with("model.safetensors"), "{path:?}");
                assert!(!reason.is_empty());
            }
            other => panic!("cut at {cut}: expected CheckpointFile, got {other:?}"),
        }
    }
}

#[test]
fn no_safetensors_at_all_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        Checkpoint::open(tmp.path()),
        Err(Error::CheckpointFile { .. })
    ));
}

#[test]
fn kv_heads_not_divisible_by_tp_are_refused_by_name() {
    let mut cfg = fixture_config();
    cfg["text_config"]["num_key_value_heads"] = serde_json::json!(4);
    let c = RConfig::from_json_str(&cfg.to_string()).unwrap();
    c.validate_tp(4).unwrap();
    match c.validate_tp(8) {
        Err(r4b_model::Error::Config { field, reason }) => {
            assert_eq!(field, "text_config.num_key_value_heads");
            assert!(
                reason.contains("not divisible by tensor parallel size 8"),
                "{reason}"
            );
        }
        other => panic!("expected Config error, got {other:?}"),
    }
    let ckpt = Checkpoint::open(&checkpoint_dir()).unwrap();
    let err = R4bModel::load(
        &ckpt,
        &c,
        Arc::new(Place(Shard { rank: 0, world: 8 })),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    for tp in [3usize, 5, 6, 16] {
        assert!(
            matches!(
                c.validate_tp(tp),
                Err(r4b_model::Error::TensorParallel { .. })
            ),
            "tp {tp}"
        );
    }
}

/// The layout of real R-4B checkpoints (transformers 4.5x): `model.vision_tower.vision_model.*`.
/// The tower loaded through it computes the same image rows as through the fixture's layout.
#[test]
fn current_layout_with_vision_model_segment_loads_the_same_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let t: BTreeMap<String, Raw> = fixture_tensors()
        .into_iter()
        .map(|(n, r)| match n.strip_prefix("model.vision_tower.") {
            Some(rest) => (format!("model.vision_tower.vision_model.{rest}"), r),
            None => (n, r),
        })
        .collect();
    write_checkpoint(tmp.path(), &t, &fixture_config());
    let ckpt = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(
        ckpt.layout(),
        NameLayout::Current {
            vision_model_segment: true
        }
    );
    let a = load_model(tmp.path()).unwrap();
    let b = load_model(&checkpoint_dir()).unwrap();
    let cfg = a.config().clone();
    let img = image::RgbImage::from_fn(200, 120, |x, y| {
        image::Rgb([
            (x % 251) as u8,
            (y * 2 % 253) as u8,
            ((x + y) % 7 * 30) as u8,
        ])
    });
    let pre = r4b_worker::config::ImagePreprocessing::default();
    let views =
        r4b_worker::model::anyres::preprocess(&img, &cfg.image_geometry(), pre.resample, &pre.norm)
            .unwrap();
    let ra = a
        .encode_image(&views)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let rb = b
        .encode_image(&views)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(ra, rb);
}
