//! Where the model comes from: the embedded default (written on first run into the cache), a
//! local directory, or a Hugging Face hub id (hf-hub; `HF_HUB_OFFLINE=1` reads the cache only).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Files a checkpoint directory may hold besides the weights.
const OPTIONAL_FILES: [&str; 6] = [
    "tokenizer_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Version tag of the embedded default; bump when its files change.
const EMBEDDED_DIR: &str = "embedded-r4b-tiny-v2";

/// The embedded default's directory, created on first use.
pub fn embedded(cache_dir: &Path) -> Result<PathBuf> {
    let dir = cache_dir.join(EMBEDDED_DIR);
    let complete = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .all(|f| dir.join(f).exists());
    if complete {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let tmp = cache_dir.join(format!("{EMBEDDED_DIR}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    r4b_worker::embedded::write_model_files(&tmp).context("writing the embedded model")?;
    r4b_gateway::embedded::write_tokenizer_files(&tmp).context("writing the embedded tokenizer")?;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have finished first; use its copy if it is complete.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").exists() {
            return Err(e)
                .with_context(|| format!("moving the embedded model into {}", dir.display()));
        }
    }
    Ok(dir)
}

/// Resolves `--model`: None → embedded default; an existing path → itself; else a hub id.
pub async fn resolve(model: Option<&str>, cache_dir: &Path) -> Result<PathBuf> {
    let Some(model) = model else {
        return embedded(cache_dir);
    };
    let path = Path::new(model);
    if path.exists() {
        if !path.join("config.json").exists() {
            bail!("{} has no config.json", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if model.starts_with('.') || model.starts_with('/') || model.matches('/').count() != 1 {
        bail!("--model {model}: no such directory, and not a hub id of the form owner/name");
    }
    from_hub(model).await
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

/// Downloads (or finds in the cache) every file of a hub checkpoint; returns the snapshot dir.
async fn from_hub(id: &str) -> Result<PathBuf> {
    if offline() {
        let cache = hf_hub::Cache::from_env();
        let repo = cache.model(id.to_string());
        let config = repo
            .get("config.json")
            .with_context(|| format!("{id}: not in the hub cache (HF_HUB_OFFLINE=1)"))?;
        let dir = config
            .parent()
            .context("cache path has no parent")?
            .to_path_buf();
        if repo.get("model.safetensors").is_none()
            && repo.get("model.safetensors.index.json").is_none()
        {
            bail!("{id}: the cache has config.json but no safetensors weights");
        }
        return Ok(dir);
    }
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("hf-hub client")?;
    let repo = api.model(id.to_string());
    let config = repo
        .get("config.json")
        .await
        .with_context(|| format!("{id}: downloading config.json"))?;
    let dir = config
        .parent()
        .context("cache path has no parent")?
        .to_path_buf();
    repo.get("tokenizer.json")
        .await
        .with_context(|| format!("{id}: downloading tokenizer.json"))?;
    for f in OPTIONAL_FILES {
        let _ = repo.get(f).await;
    }
    match repo.get("model.safetensors.index.json").await {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let v: serde_like::Index = serde_like::parse(&text)?;
            for shard in v.shards() {
                repo.get(&shard)
                    .await
                    .with_context(|| format!("{id}: downloading {shard}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .await
                .with_context(|| format!("{id}: downloading model.safetensors"))?;
        }
    }
    Ok(dir)
}

/// Just enough of the safetensors index to list its shard files.
mod serde_like {
    use anyhow::{Context, Result};

    /// `model.safetensors.index.json`.
    pub struct Index(serde_json::Value);

    pub fn parse(text: &str) -> Result<Index> {
        Ok(Index(
            serde_json::from_str(text).context("model.safetensors.index.json is not JSON")?,
        ))
    }

    impl Index {
        /// Distinct shard file names, sorted.
        pub fn shards(&self) -> Vec<String> {
            let mut v: Vec<String> = self.0["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v.dedup();
            v
        }
    }
}
