//! `r4b-worker-offline`: one rank of a tensor-parallel group that runs a fixed job (prompts →
//! greedy tokens) without the gRPC control plane. Start `--tp N` copies with ranks `0..N` and the
//! same `--rendezvous`; they meet over the CPU socket collective, run the same steps, and rank 0
//! writes the result JSON. Used by the TP tests and for offline runs on a checkpoint.
//!
//! Job JSON: `{"prompts": [{"input_ids": [..], "images": ["a.png", ..]}], "steps": 32,
//! "block_size": 16, "prefill_chunk": null, "batched": false, "record_logits": true}`
//! (image paths relative to the job file). Output: `{"runs": [{"tokens": [..], "logits": [[..]]}]}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use serde::{Deserialize, Serialize};

use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::collective::{Collective, SingleRank, SocketCollective, SocketConfig};
use r4b_worker::config::{ImagePreprocessing, RConfig};
use r4b_worker::engine::{run_greedy, GreedyOptions, Prompt};
use r4b_worker::model::{anyres, R4bModel};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "r4b-worker-offline",
    about = "Run one TP rank of a fixed greedy job"
)]
struct Args {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// This rank.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Unix socket path where the ranks meet (required for --tp > 1).
    #[arg(long)]
    rendezvous: Option<PathBuf>,
    /// Job file.
    #[arg(long)]
    job: PathBuf,
    /// Output file (written by rank 0).
    #[arg(long)]
    out: PathBuf,
    /// Seconds a rank waits for its peers before failing.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Deserialize, Debug)]
struct Job {
    prompts: Vec<JobPrompt>,
    steps: usize,
    #[serde(default = "default_block_size")]
    block_size: usize,
    #[serde(default)]
    prefill_chunk: Option<usize>,
    #[serde(default)]
    batched: bool,
    #[serde(default)]
    record_logits: bool,
}

fn default_block_size() -> usize {
    16
}

#[derive(Deserialize, Debug)]
struct JobPrompt {
    input_ids: Vec<u32>,
    #[serde(default)]
    images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Output {
    runs: Vec<RunOut>,
}

#[derive(Serialize)]
struct RunOut {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let job_text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("reading job {}", args.job.display()))?;
    let job: Job = serde_json::from_str(&job_text).context("parsing job JSON")?;
    let cfg =
        RConfig::from_file(&args.checkpoint.join("config.json")).context("reading config.json")?;
    cfg.validate_tp(args.tp)?;
    if args.rank >= args.tp {
        bail!("--rank {} is not below --tp {}", args.rank, args.tp);
    }
    let comm: Arc<dyn Collective> = if args.tp == 1 {
        Arc::new(SingleRank)
    } else {
        let rendezvous = args
            .rendezvous
            .clone()
            .context("--rendezvous is required when --tp > 1")?;
        Arc::new(SocketCollective::connect(&SocketConfig {
            rendezvous,
            rank: args.rank,
            world_size: args.tp,
            timeout: Duration::from_secs(args.timeout_s),
        })?)
    };
    let device = Device::Cpu;
    let ckpt = Checkpoint::open(&args.checkpoint).context("opening checkpoint")?;
    let model = R4bModel::load(&ckpt, &cfg, comm, &device).context("loading model")?;
    let pre = ImagePreprocessing::from_dir(&args.checkpoint)?;
    let base = args.job.parent().unwrap_or(Path::new("."));
    let mut prompts = Vec::with_capacity(job.prompts.len());
    for p in &job.prompts {
        let mut images = Vec::with_capacity(p.images.len());
        for path in &p.images {
            let path = base.join(path);
            let img = image::open(&path)
                .with_context(|| format!("decoding {}", path.display()))?
                .to_rgb8();
            let views = anyres::preprocess(&img, &cfg.image_geometry(), pre.resample, &pre.norm)?;
            images.push(model.encode_image(&views)?);
        }
        prompts.push(Prompt {
            input_ids: p.input_ids.clone(),
            images,
        });
    }
    let opts = GreedyOptions {
        steps: job.steps,
        block_size: job.block_size,
        prefill_chunk: job.prefill_chunk,
        batched: job.batched,
        record_logits: job.record_logits,
    };
    let runs = run_greedy(&model, &prompts, &opts)?;
    if args.rank == 0 {
        let out = Output {
            runs: runs
                .into_iter()
                .map(|r| RunOut {
                    tokens: r.tokens,
                    logits: r.logits,
                })
                .collect(),
        };
        std::fs::write(&args.out, serde_json::to_vec(&out)?)
            .with_context(|| format!("writing {}", args.out.display()))?;
    }
    Ok(())
}
