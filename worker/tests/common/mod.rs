//! Shared helpers for the worker's integration tests: fixture paths and the HF reference.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

/// `tests/fixtures` at the repository root (made by `tests/reference/make_fixtures.py`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// The tiny R-4B checkpoint.
pub fn checkpoint_dir() -> PathBuf {
    fixtures().join("tiny-r4b")
}

/// `reference.json`.
pub fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `reference.safetensors` (logits recorded by HF transformers).
pub fn reference_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// A prompt's token ids from `reference.json`.
pub fn ids(r: &Value, prompt: &str) -> Vec<u32> {
    r["prompts"][prompt]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// A prompt's greedy tokens from `reference.json`.
pub fn greedy(r: &Value, prompt: &str) -> Vec<u32> {
    r["prompts"][prompt]["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// A prompt's image file names.
pub fn images(r: &Value, prompt: &str) -> Vec<String> {
    r["prompts"][prompt]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Max |a - b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rows of a 2-D reference tensor.
pub fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// The tolerance the issue sets for f32 logits against the HF reference.
pub const TOL: f32 = 1e-4;
