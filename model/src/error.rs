//! Errors of reading the model's configuration and preprocessing its images.

use std::path::PathBuf;

use crate::anyres::AnyresError;

/// What went wrong reading a model's files or preprocessing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` (or `preprocessor_config.json`) is missing a field, has a wrong type or an
    /// inconsistent value.
    #[error("config.json: field `{field}`: {reason}")]
    Config {
        /// The field (dotted path).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A file of the checkpoint could not be read or parsed.
    #[error("checkpoint file {path}: {reason}")]
    CheckpointFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tensor-parallel size is not usable with this model.
    #[error("tensor parallel size {tp}: {reason}")]
    TensorParallel {
        /// The size asked for.
        tp: usize,
        /// Why not.
        reason: String,
    },
    /// An image could not be preprocessed.
    #[error("image: {0}")]
    Image(#[from] AnyresError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
