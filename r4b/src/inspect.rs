//! `r4b inspect [MODEL]`: the model as `serve` would resolve it, before any GPU time is spent —
//! every config value and where it came from (a file or a class default), the image processor,
//! the tensors and bytes each rank reads at the given tensor-parallel size, the head, the chat
//! template's source and the special tokens with their ids. Anything `serve` would refuse is
//! listed at the end and makes the command exit non-zero.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use r4b_gateway::ModelFiles;
use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::config::{ImagePreprocessing, RConfig, Resolved};
use r4b_worker::model::{head, plan};

/// `r4b inspect` flags.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model: a local directory or a hub id (e.g. YannQi/R-4B). Omitted: the embedded default.
    #[arg(value_name = "MODEL")]
    model_tag: Option<String>,
    /// Same as the positional MODEL.
    #[arg(long)]
    model: Option<String>,
    /// Where the embedded default is written (default: $R4B_CACHE or ~/.cache/r4b).
    #[arg(long, env = "R4B_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Ranks the per-rank bytes are computed for (1, 2, 4 or 8).
    #[arg(long, short = 't', default_value_t = 1, visible_alias = "tp")]
    tensor_parallel_size: usize,
    /// Accepted for `vllm serve` compatibility, as in `serve`.
    #[arg(long)]
    trust_remote_code: bool,
}

/// Runs `r4b inspect`: prints the report on stdout; refusals make it fail.
pub async fn inspect(a: InspectArgs) -> Result<()> {
    let cache = a.cache_dir.clone().unwrap_or_else(crate::default_cache_dir);
    let model = a.model.as_deref().or(a.model_tag.as_deref());
    let dir = crate::model::resolve(model, &cache).await?;
    let (text, problems) = report(&dir, a.tensor_parallel_size);
    print!("{text}");
    if !problems.is_empty() {
        bail!(
            "`r4b serve` would refuse this model:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// The report text and the refusals found.
fn report(dir: &Path, tp: usize) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut problems = Vec::new();
    let _ = writeln!(out, "model: {}", dir.display());
    match RConfig::from_dir(dir) {
        Ok(cfg) => {
            config_section(&mut out, &cfg);
            preprocessor_section(&mut out, dir, &mut problems);
            checkpoint_section(&mut out, dir, &cfg, tp, &mut problems);
        }
        Err(e) => {
            let _ = writeln!(out, "\nconfig: not resolved");
            problems.push(e.to_string());
        }
    }
    tokenizer_section(&mut out, dir, &mut problems);
    (out, problems)
}

/// A JSON value on one line, long lists shortened.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match v.as_array() {
        Some(a) if s.len() > 48 && !a.is_empty() => {
            format!("[{} … {}] ({} entries)", a[0], a[a.len() - 1], a.len())
        }
        _ => s,
    }
}

fn table(out: &mut String, rows: &[Resolved]) {
    for r in rows {
        let _ = writeln!(
            out,
            "  {:<44} {:<34} {}",
            r.field,
            short(&r.value),
            r.source
        );
    }
}

fn config_section(out: &mut String, cfg: &RConfig) {
    let a = &cfg.architecture;
    let _ = writeln!(
        out,
        "\narchitecture: {:?}, model_type `{}`{}",
        a.architectures,
        a.model_type,
        a.remote_config
            .as_deref()
            .map(|c| format!(", remote config {c} (not run; LLaVA-OneVision defaults)"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "\nconfig (value, source):");
    table(out, &cfg.provenance);
    let (t, v) = (&cfg.text, &cfg.vision);
    let _ = writeln!(out, "\nderived:");
    let _ = writeln!(
        out,
        "  decoder: {} layers, {} query / {} KV heads of {} (q width {}), vocab {}",
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.q_width(),
        t.vocab_size
    );
    let _ = writeln!(
        out,
        "  vision: {} of {} layers run, hidden states {:?} → feature width {}, {}x{} = {} tokens per {} px view",
        cfg.vision_layers_used(),
        v.num_hidden_layers,
        cfg.vision_feature_indices(),
        cfg.vision_feature_width(),
        v.grid_side(),
        v.grid_side(),
        v.num_patches(),
        v.image_size
    );
    let _ = writeln!(
        out,
        "  KV cache: {} bytes per token in bf16 (all ranks together)",
        2 * t.num_hidden_layers * t.kv_width() * 2
    );
}

fn preprocessor_section(out: &mut String, dir: &Path, problems: &mut Vec<String>) {
    let _ = writeln!(out, "\nimage processor (value, source):");
    match ImagePreprocessing::from_dir(dir) {
        Ok(p) => {
            table(out, &p.provenance);
            let _ = writeln!(
                out,
                "  resize filter: {:?} (PIL {})",
                p.resample,
                p.resample.pil_code()
            );
        }
        Err(e) => problems.push(e.to_string()),
    }
}

fn checkpoint_section(
    out: &mut String,
    dir: &Path,
    cfg: &RConfig,
    tp: usize,
    problems: &mut Vec<String>,
) {
    let _ = writeln!(out, "\ncheckpoint:");
    let ckpt = match Checkpoint::open(dir) {
        Ok(c) => c,
        Err(e) => return problems.push(e.to_string()),
    };
    let stored: u64 = ckpt
        .entries()
        .values()
        .map(|e| (e.end - e.start) as u64)
        .sum();
    let _ = writeln!(
        out,
        "  {} file(s), {} stored tensors, {} bytes ({:.2} GiB), names {:?}",
        ckpt.files().len(),
        ckpt.entries().len(),
        stored,
        gib(stored),
        ckpt.layout()
    );
    let head = match head::head_source(cfg, &ckpt) {
        Ok(h) => h,
        Err(e) => return problems.push(e.to_string()),
    };
    let _ = writeln!(
        out,
        "  lm head: {}{}",
        head.tensor(),
        if head == head::HeadSource::TiedEmbedding {
            " (tied)"
        } else {
            ""
        }
    );
    if let Err(e) = cfg.validate_tp(tp) {
        problems.push(e.to_string());
    }
    let plan = plan::load_plan(cfg, head);
    match plan::summarize(&plan, &ckpt, tp) {
        Ok(s) => {
            let _ = writeln!(
                out,
                "  tensor parallel {tp}: each rank reads {} tensors, {} bytes ({:.2} GiB)",
                s.tensors,
                s.bytes_per_rank,
                gib(s.bytes_per_rank)
            );
            let _ = writeln!(out, "  stored but not read: {}", s.unused.len());
            for name in s.unused.iter().take(8) {
                let _ = writeln!(out, "    {name}");
            }
            if s.unused.len() > 8 {
                let _ = writeln!(out, "    … {} more", s.unused.len() - 8);
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
}

fn tokenizer_section(out: &mut String, dir: &Path, problems: &mut Vec<String>) {
    let _ = writeln!(out, "\ntokenizer and chat template:");
    match ModelFiles::load(dir) {
        Ok(f) => {
            let _ = writeln!(out, "  chat template: {}", f.template_source());
            for t in f.special_tokens() {
                let _ = writeln!(
                    out,
                    "  {:<10} id {:<8} {}  ({})",
                    t.token,
                    t.id,
                    if t.special { "special" } else { "not special" },
                    t.role
                );
            }
            let _ = writeln!(out, "  eos ids: {:?}", f.eos_ids());
        }
        Err(e) => problems.push(e.to_string()),
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
