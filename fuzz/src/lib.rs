//! # r4b-fuzz
//!
//! Fuzzing of the gateway's input paths on the stable toolchain. Three [`Target`]s drive the
//! real gateway code: [`request`] (request JSON → validated request), [`image`] (image bytes →
//! decoded image → anyres views) and [`template`] (user content → chat template → token ids,
//! with properties checked). The [`runner`] mutates the seed files of `fuzz/corpus/<target>/`,
//! mixes them with generated inputs, runs every case on a worker thread under a deadline and
//! an allocation ceiling, and writes a failing input to `fuzz/artifacts/<target>/`.

#![deny(missing_docs)]

pub mod alloc;
pub mod env;
pub mod image;
pub mod mutate;
pub mod request;
pub mod runner;
pub mod template;

use std::path::PathBuf;

/// One fuzz target.
pub trait Target: Send + Sync {
    /// Name (also the corpus and artifact folder name).
    fn name(&self) -> &'static str;
    /// A new input: a mutation of `seeds` (the corpus files) or a generated one.
    fn generate(&self, rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8>;
    /// Runs one input: `Ok(true)` when the gateway accepted it (went the whole path),
    /// `Ok(false)` when it refused it with an error (fine); `Err` is a broken property.
    fn run(&self, input: &[u8]) -> Result<bool, String>;
}

/// `fuzz/` of this crate (corpus and artifacts live under it).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A target by name.
pub fn target(name: &str) -> anyhow::Result<Box<dyn Target>> {
    Ok(match name {
        "request" => Box::new(request::RequestTarget::new()?),
        "image" => Box::new(image::ImageTarget::new()?),
        "template" => Box::new(template::TemplateTarget::new()?),
        other => anyhow::bail!("unknown target `{other}` (request, image, template)"),
    })
}

/// The target names.
pub const TARGETS: [&str; 3] = ["request", "image", "template"];
