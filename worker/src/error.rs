//! The worker's typed errors. Every error a checkpoint, a config or a request can cause is a variant
//! here that names what was wrong; nothing reachable from input panics.

use std::path::PathBuf;

/// Errors of the r4b-worker library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` is missing a field, has a wrong type or an inconsistent value.
    #[error("config.json: field `{field}`: {reason}")]
    Config { field: String, reason: String },
    /// A file of the checkpoint could not be opened, mapped or parsed.
    #[error("checkpoint file {path}: {reason}")]
    CheckpointFile { path: PathBuf, reason: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("checkpoint: missing tensor `{name}`")]
    MissingTensor { name: String },
    /// A tensor has another shape than the config implies.
    #[error("checkpoint: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype the loader does not read.
    #[error("checkpoint: tensor `{name}` has unsupported dtype {dtype}")]
    TensorDtype { name: String, dtype: String },
    /// The tensor-parallel size is not usable with this model.
    #[error("tensor parallel size {tp}: {reason}")]
    TensorParallel { tp: usize, reason: String },
    /// An image could not be preprocessed.
    #[error("image: {0}")]
    Image(#[from] crate::model::anyres::AnyresError),
    /// A collective operation failed (peer gone, timeout, protocol error).
    #[error("collective: {0}")]
    Collective(#[from] crate::collective::CollectiveError),
    /// A step was malformed (wrong image rows, block table too short, position out of range, ...).
    #[error("step: {0}")]
    Step(String),
    /// The GPU engine's image memory has no room for an image's rows (see `gpu::ImageMemory`).
    #[error(
        "GPU image memory: {need} MiB of image rows do not fit, {used} of {limit} MiB are held by \
         live sequences' images (the budget is reserved at load, out of the KV cache)"
    )]
    ImageMemory {
        need: usize,
        used: usize,
        limit: usize,
    },
    /// The KV cache has no room for the step.
    #[error("kv cache: {0}")]
    Kv(String),
    /// The GPU (driver, cuBLAS, NCCL, out of memory) failed or refused the request.
    #[error("gpu: {0}")]
    Gpu(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result with the worker's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<r4b_model::Error> for Error {
    fn from(e: r4b_model::Error) -> Self {
        match e {
            r4b_model::Error::Config { field, reason } => Error::Config { field, reason },
            r4b_model::Error::CheckpointFile { path, reason } => {
                Error::CheckpointFile { path, reason }
            }
            r4b_model::Error::TensorParallel { tp, reason } => Error::TensorParallel { tp, reason },
            r4b_model::Error::Image(e) => Error::Image(e),
        }
    }
}
