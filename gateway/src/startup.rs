//! Errors of starting the gateway: loading the model files, reaching the coordinators.

use std::path::PathBuf;

/// Errors of loading the model files or connecting to the coordinators.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A model file is missing, unreadable or malformed.
    #[error("model file {path}: {reason}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A token the prompt path depends on is not one added token with the expected id.
    #[error("tokenizer: `{token}` {reason}")]
    SpecialToken {
        /// The token text.
        token: String,
        /// What is wrong, with the ids.
        reason: String,
    },
    /// The chat template does not compile.
    #[error("chat template: {0}")]
    Template(String),
    /// No coordinator URL was given.
    #[error("no coordinator URLs given")]
    NoReplicas,
    /// The metrics registry refused a metric (a name clash: a bug).
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A coordinator could not be reached or answered with an error.
    #[error("coordinator {url}: {reason}")]
    Coordinator {
        /// The coordinator's URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The coordinator's model facts contradict the model files.
    #[error("model mismatch: {0}")]
    Mismatch(String),
}
