//! The f32 reference forward in-process (world size 1): expected values for the end-to-end
//! tests that are computed without the serving path (no worker process, no vocab-parallel
//! exchange, no coordinator or gateway).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::collective::SingleRank;
use r4b_worker::config::{ImagePreprocessing, RConfig};
use r4b_worker::model::{anyres, OutputRows, R4bModel, SeqChunk};

/// The reference model (the embedded default, written here, f32, world size 1).
pub fn reference_model(dir: &std::path::Path) -> R4bModel {
    r4b_worker::embedded::write_model_files(dir).unwrap();
    let cfg = RConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    R4bModel::load(&ckpt, &cfg, Arc::new(SingleRank), &Device::Cpu).unwrap()
}

/// Log-softmax (f64) of the logits at every position of `ids`, teacher-forced in one chunk.
pub fn log_softmax_rows(model: &R4bModel, ids: &[u32]) -> Vec<Vec<f64>> {
    log_softmax_rows_with_images(model, ids, &[], std::path::Path::new(""))
}

/// [`log_softmax_rows`] for a prompt whose `<image>` runs are `images` (PNG or JPEG bytes, in
/// order), preprocessed with the checkpoint's `dir` settings and encoded by the reference vision
/// tower.
pub fn log_softmax_rows_with_images(
    model: &R4bModel,
    ids: &[u32],
    images: &[Vec<u8>],
    dir: &std::path::Path,
) -> Vec<Vec<f64>> {
    let image_rows = if images.is_empty() {
        None
    } else {
        let pre = ImagePreprocessing::from_dir(dir).unwrap();
        let geometry = model.config().image_geometry();
        let rows: Vec<Tensor> = images
            .iter()
            .map(|bytes| {
                let img = image::load_from_memory(bytes).unwrap().to_rgb8();
                let views = anyres::preprocess(&img, &geometry, pre.resample, &pre.norm).unwrap();
                model.encode_image(&views).unwrap()
            })
            .collect();
        Some(Tensor::cat(&rows, 0).unwrap().into())
    };
    let bs = 16;
    let blocks = ids.len().div_ceil(bs);
    let mut kv = model.new_kv_cache(blocks, bs).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let chunk = SeqChunk {
        tokens: ids,
        prompt_tokens: ids.len(),
        start_pos: 0,
        block_table: &table,
        image_rows,
    };
    let hidden = model
        .forward_step(&[chunk], &mut kv, OutputRows::All)
        .unwrap();
    let logits = model
        .full_logits(&hidden)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    logits
        .iter()
        .map(|row| {
            let m = row.iter().map(|&x| f64::from(x)).fold(f64::MIN, f64::max);
            let lse = m + row
                .iter()
                .map(|&x| (f64::from(x) - m).exp())
                .sum::<f64>()
                .ln();
            row.iter().map(|&x| f64::from(x) - lse).collect()
        })
        .collect()
}
