//! # r4b-worker
//!
//! One tensor-parallel rank of R-4B (SigLIP vision tower + projector + Qwen3 decoder).
//!
//! Design decisions:
//! - The CPU model (`model`, f32 over `candle-core`) is the reference and what CI runs.
//!   Parallelism lives in the layer types of [`parallel`] (column-, row- and vocab-parallel), never
//!   in `if rank == 0` branches in the model.
//! - The GPU engine (`gpu`, feature `cuda`) runs the same math in bf16 on fixed device buffers
//!   with the `r4b-kernels` kernels, cuBLAS, NCCL and CUDA graphs; its TP plan is the same (each
//!   rank loads its row / column / vocabulary slices).
//! - A rank memory-maps the checkpoint and reads only the byte ranges of its own slices
//!   ([`checkpoint`]).
//! - The vision side (`encode_images`) and the LLM side (`forward_embeds`) are separate: the
//!   decoder does not know images exist; image features are rows handed to a step.
//! - The KV cache is paged ([`kv`]); a step mixes prefill chunks and single-token decodes of
//!   sequences of different lengths.

pub mod admission;
pub mod checkpoint;
pub mod collective;
/// The model configuration (moved to `r4b-model`, shared with the gateway).
pub use r4b_model::config;
pub use r4b_model::embedded;
pub mod engine;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod placement;
pub mod prompt_logprobs;
pub mod sampling;
pub mod service;
pub mod shard;
pub mod trace;

pub use error::{Error, Result};
