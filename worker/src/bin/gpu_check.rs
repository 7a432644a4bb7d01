//! `r4b-gpu-check`: the GPU engine against HF transformers, and engine-level figures (feature
//! `cuda`, TP = 1).
//!
//! ```text
//! r4b-gpu-check logits CKPT REF_DIR OUT.safetensors [--tp N]  # teacher-forced logits of REF_DIR/prompts.json
//! r4b-gpu-check decode CKPT [--batches 1,8,32,64,128,256] [--prompt 128] [--output 512] [--eager] [--sampled]
//! r4b-gpu-check profile                                  # copy bandwidth, GEMMs, attention, norms
//! r4b-gpu-check attn                                     # tensor-core prefill attention vs cuBLAS path
//! r4b-gpu-check sample                                   # GPU sampler vs the host sampler
//! r4b-gpu-check allreduce [--worlds 2,4,8]               # IPC all-reduce µs per call, ranks on one GPU
//! ```
//! `logits --tp N` runs N ranks as N processes (this one is rank 0 and starts the others), on
//! their GPUs as `r4b serve` places them (rank % visible GPUs), over the IPC all-reduce.
//! Engine flags, after any subcommand: `--kernel-arch auto|sm80`, `--no-pdl`, `--host-sampling`,
//! `--force-nccl` (`r4b-gpu-check --help`).
//! `logits` writes `logits.<name>` `[scored, vocab]` f32 for `bench/gpu/compare.py`.
//! `decode` prints load GB/s, KV capacity and decode tok/s at each batch size (greedy, every
//! sequence `prompt` random tokens then `output` decode steps, one engine step per token).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use r4b_kernels::{DBuf, DecodeAttn, FlashAttn, Gpu, OutType, Residual};
use r4b_kernels::{DecodeAttention, KernelArch, KernelOptions};
use r4b_worker::checkpoint::Checkpoint;
use r4b_worker::collective::{Collective, SingleRank, SocketCollective, SocketConfig, Solo};
use r4b_worker::config::{ImagePreprocessing, RConfig};
use r4b_worker::gpu::{
    attention_gemm, parts_for, AttnGemm, EngineOptions, GpuLimits, GpuModel, GpuSampler,
};
use r4b_worker::model::{anyres, ChunkImageRows, ImageRows, SeqChunk};
use r4b_worker::placement;
use r4b_worker::sampling::{self, SampleRow, SampledToken, SamplingParams, TokenHistory};

#[derive(Parser, Debug)]
#[command(
    name = "r4b-gpu-check",
    about = "GPU engine figures and the HF logits check (TP = 1)"
)]
struct Cli {
    #[command(flatten)]
    engine: EngineFlags,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Engine options of the run (accepted after any subcommand).
#[derive(Args, Debug)]
struct EngineFlags {
    /// Kernel variant: the device's own, or the sm_80 (A100) PTX on any device.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    kernel_arch: ArchFlag,
    /// No programmatic dependent launch.
    #[arg(long, global = true)]
    no_pdl: bool,
    /// Sample on the host instead of the GPU sampler.
    #[arg(long, global = true)]
    host_sampling: bool,
    /// Run the NCCL all-reduce at TP = 1.
    #[arg(long, global = true)]
    force_nccl: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ArchFlag {
    Auto,
    Sm80,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Teacher-forced logits of REF_DIR/prompts.json, for bench/gpu/compare.py.
    Logits {
        /// Checkpoint directory.
        ckpt: PathBuf,
        /// hf_reference.py's output directory.
        reference: PathBuf,
        /// Output `.safetensors` (`logits.<name>`).
        out: PathBuf,
        /// Tensor-parallel ranks (processes).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// This process's rank (set by rank 0 for the ranks it starts).
        #[arg(long, default_value_t = 0, hide = true)]
        rank: usize,
        /// The group's rendezvous socket (set by rank 0 for the ranks it starts).
        #[arg(long, hide = true)]
        rendezvous: Option<PathBuf>,
    },
    /// Load GB/s, KV capacity and decode tok/s per batch size.
    Decode {
        /// Checkpoint directory.
        ckpt: PathBuf,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256")]
        batches: Vec<usize>,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Decode steps per sequence.
        #[arg(long, default_value_t = 512)]
        output: usize,
        /// No CUDA graphs.
        #[arg(long)]
        eager: bool,
        /// Every row sampled (temperature 0.8, top-p 0.9) through the GPU sampler.
        #[arg(long)]
        sampled: bool,
    },
    /// Copy bandwidth, GEMMs, attention, norms.
    Profile,
    /// Tensor-core attention kernels against the cuBLAS-product path.
    Attn,
    /// The GPU sampler against the host sampler.
    Sample,
    /// The IPC all-reduce, ranks in this process on GPU 0 (one stream each): µs per call, one-shot
    /// and two-shot, at the sizes of a decode step and a prefill chunk.
    Allreduce {
        /// Group sizes.
        #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
        worlds: Vec<usize>,
    },
}

/// What `decode` measures.
struct DecodeRun {
    batches: Vec<usize>,
    prompt: usize,
    output: usize,
    eager: bool,
    sampled: bool,
}

fn load(dir: &Path, limits: GpuLimits, opts: &EngineOptions) -> Result<(RConfig, GpuModel)> {
    load_rank(dir, limits, opts, Arc::new(SingleRank))
}

/// Loads one rank of the group `comm` (placed as `r4b serve` places it).
fn load_rank(
    dir: &Path,
    limits: GpuLimits,
    opts: &EngineOptions,
    comm: Arc<dyn Collective>,
) -> Result<(RConfig, GpuModel)> {
    let cfg = RConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(dir)?;
    let t = Instant::now();
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut opts = *opts;
    opts.placement = placement::place(rank, world, &[], r4b_kernels::device_count()?)?;
    let model = GpuModel::load(&ckpt, &cfg, comm, None, (limits, opts))?;
    let (bytes, secs, gbps) = model.load_report;
    println!(
        "load: {:.2} GB of weights in {secs:.2} s = {gbps:.2} GB/s (whole load incl. buffers {:.2} s)",
        bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    for line in &model.tuning {
        println!("{line}");
    }
    println!(
        "kv: {} blocks x {} tokens = {} tokens ({} KiB/token)",
        model.num_blocks(),
        limits.block_size,
        model.num_blocks() * limits.block_size,
        model.kv_bytes_per_token() / 1024
    );
    Ok((cfg, model))
}

fn limits(max_model_len: usize, max_seqs: usize, eager: bool) -> GpuLimits {
    GpuLimits {
        max_tokens: 8192,
        max_seqs,
        max_model_len,
        block_size: 16,
        memory_utilization: 0.9,
        num_blocks: 0,
        enforce_eager: eager,
    }
}

/// The ranks of a `logits --tp N` group: rank 0 starts ranks 1.. as child processes (the same
/// command line with `--rank r`), and every rank joins the socket collective.
fn logits_group(tp: usize, rank: usize, rendezvous: Option<PathBuf>) -> Result<GroupRun> {
    if tp <= 1 {
        return Ok(GroupRun {
            comm: Arc::new(SingleRank),
            children: Vec::new(),
        });
    }
    let path = rendezvous.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("r4b-gpu-check-{}.sock", std::process::id()))
    });
    let mut children = Vec::new();
    if rank == 0 {
        let exe = std::env::current_exe()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        for r in 1..tp {
            children.push(
                std::process::Command::new(&exe)
                    .args(&args)
                    .args(["--rank", &r.to_string(), "--rendezvous"])
                    .arg(&path)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("starting a rank")?,
            );
        }
    }
    let comm = SocketCollective::connect(&SocketConfig {
        rendezvous: path,
        rank,
        world_size: tp,
        timeout: std::time::Duration::from_secs(600),
    })?;
    Ok(GroupRun {
        comm: Arc::new(comm),
        children,
    })
}

/// A group of `logits` ranks; rank 0 waits for the ranks it started.
struct GroupRun {
    comm: Arc<dyn Collective>,
    children: Vec<std::process::Child>,
}

impl Drop for GroupRun {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn logits(
    dir: &Path,
    refdir: &Path,
    out: &Path,
    opts: &EngineOptions,
    group: &GroupRun,
) -> Result<()> {
    let prompts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(refdir.join("prompts.json")).context("prompts.json")?,
    )?;
    let (cfg, mut model) = load_rank(dir, limits(8192, 256, false), opts, group.comm.clone())?;
    let rank = group.comm.rank();
    let pre = ImagePreprocessing::from_dir(dir)?;
    let mut tensors: HashMap<String, (Vec<u8>, Vec<usize>)> = HashMap::new();
    let list = prompts["prompts"]
        .as_array()
        .context("prompts.json: no `prompts` array")?;
    for p in list {
        let name = p["name"].as_str().context("prompt name")?;
        let ids: Vec<u32> = p["ids"]
            .as_array()
            .context("ids")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as u32)
            .collect();
        let from = p["logits_from"].as_u64().unwrap_or(0) as usize;
        let image = match p["image"].as_str() {
            Some(f) => {
                let img = image::open(refdir.join(f))
                    .with_context(|| format!("opening {f}"))?
                    .to_rgb8();
                let views =
                    anyres::preprocess(&img, &cfg.image_geometry(), pre.resample, &pre.norm)?;
                // Once untimed (first-use costs), then with a timeline.
                model.encode_image(&views)?;
                let t = Instant::now();
                model.timeline_start()?;
                let rows = model.encode_image(&views)?;
                print_timeline(&format!("{name} vision"), &model.timeline_stop()?);
                println!(
                    "{name}: image {}x{} -> {} views, {} rows, encoded in {:.1} ms",
                    img.width(),
                    img.height(),
                    views.views,
                    rows.rows(),
                    t.elapsed().as_secs_f64() * 1e3
                );
                Some(ImageRows::Device(rows))
            }
            None => None,
        };
        let image_rows = image.as_ref().map(ChunkImageRows::whole).transpose()?;
        let blocks: Vec<u32> = (0..ids.len().div_ceil(16) as u32).collect();
        let chunk = SeqChunk {
            tokens: &ids,
            start_pos: 0,
            block_table: &blocks,
            prompt_tokens: ids.len(),
            image_rows,
        };
        let t = Instant::now();
        model.timeline_start()?;
        let all = model.logits_all(&chunk)?;
        print_timeline(
            &format!("{name} prefill ({} tokens)", ids.len()),
            &model.timeline_stop()?,
        );
        println!(
            "{name}: {} tokens, forward + all logits {:.1} ms",
            ids.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
        let v = cfg.text.vocab_size;
        let rows = ids.len() - from;
        let bytes: Vec<u8> = all[from * v..]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        tensors.insert(format!("logits.{name}"), (bytes, vec![rows, v]));
    }
    if group.comm.world_size() > 1 {
        println!(
            "TP = {}: the decode-path check runs at TP = 1 only",
            group.comm.world_size()
        );
    } else {
        decode_check(&mut model, &cfg, refdir, list)?;
    }
    if rank != 0 {
        return Ok(());
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, (b, s))| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The decode path against the reference: the first text prompt's first half as one prefill, then
/// one token per step (graphs, skinny GEMMs, paged attention); the logits of each decode step
/// against the reference rows of the same positions.
fn decode_check(
    model: &mut GpuModel,
    cfg: &RConfig,
    refdir: &Path,
    list: &[serde_json::Value],
) -> Result<()> {
    let p = list
        .iter()
        .find(|p| p["image"].is_null() && p["logits_from"].as_u64() == Some(0))
        .context("no text prompt scored from position 0")?;
    let name = p["name"].as_str().unwrap_or("?");
    let ids: Vec<u32> = p["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0) as u32)
        .collect();
    let bytes = std::fs::read(refdir.join("reference.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let r = st.tensor(&format!("logits.{name}"))?;
    let v = cfg.text.vocab_size;
    let reference: Vec<f32> = r
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let half = ids.len() / 2;
    // A block range of its own (the teacher-forced runs used blocks from 0).
    let first = 4096u32;
    let blocks: Vec<u32> = (first..first + ids.len().div_ceil(16) as u32).collect();
    let pre = SeqChunk {
        tokens: &ids[..half],
        start_pos: 0,
        block_table: &blocks,
        prompt_tokens: half,
        image_rows: None,
    };
    model.last_logits(std::slice::from_ref(&pre))?;
    let (mut num, mut den, mut agree, mut checked) = (0f64, 0f64, 0, 0);
    let t = Instant::now();
    for i in half..ids.len() {
        let c = SeqChunk {
            tokens: &ids[i..i + 1],
            start_pos: i,
            block_table: &blocks,
            prompt_tokens: 0,
            image_rows: None,
        };
        let ours = model.last_logits(std::slice::from_ref(&c))?;
        let want = &reference[i * v..(i + 1) * v];
        for (a, b) in ours.iter().zip(want) {
            num += f64::from(a - b).powi(2);
            den += f64::from(*b).powi(2);
        }
        let top = |x: &[f32]| {
            let mut idx: Vec<usize> = (0..x.len()).collect();
            idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
            (idx[0], x[idx[0]] - x[idx[1]])
        };
        let (rt, margin) = top(want);
        if margin > 0.05 {
            checked += 1;
            agree += usize::from(top(&ours).0 == rt);
        }
    }
    println!(
        "decode path ({name}, positions {half}..{}, one token per step): rel err vs HF {:.3e}, \
         top-1 {agree}/{checked} (margin > 0.05), {:.2} ms/step incl. logits download",
        ids.len(),
        (num / den.max(1e-30)).sqrt(),
        t.elapsed().as_secs_f64() * 1e3 / (ids.len() - half) as f64
    );
    Ok(())
}

fn print_timeline(what: &str, t: &[(&'static str, f64)]) {
    let total: f64 = t.iter().map(|(_, ms)| ms).sum();
    let parts: Vec<String> = t
        .iter()
        .map(|(l, ms)| format!("{l} {ms:.3} ({:.0}%)", ms / total.max(1e-12) * 100.0))
        .collect();
    println!(
        "breakdown {what}: {total:.3} ms GPU time = {}",
        parts.join(", ")
    );
}

/// `n` greedy sample rows for chunks `0..n`.
fn greedy_rows<'a>(
    n: usize,
    params: &'a SamplingParams,
    history: &'a TokenHistory,
) -> Vec<(usize, SampleRow<'a>)> {
    let row = SampleRow {
        params,
        history,
        seed: 0,
    };
    (0..n).map(|i| (i, row)).collect()
}

/// One decode chunk per sequence: token `toks[s]` at `pos` with block table `tables[s]`.
fn decode_chunks<'a>(
    toks: &'a [[u32; 1]],
    pos: usize,
    tables: &'a [Vec<u32>],
) -> Vec<SeqChunk<'a>> {
    toks.iter()
        .zip(tables)
        .map(|(t, table)| SeqChunk {
            tokens: t,
            start_pos: pos,
            block_table: table,
            prompt_tokens: 0,
            image_rows: None,
        })
        .collect()
}

fn decode(dir: &Path, run: DecodeRun, opts: &EngineOptions) -> Result<()> {
    let DecodeRun {
        batches,
        prompt,
        output,
        eager,
        sampled,
    } = run;
    let max_b = *batches.iter().max().unwrap_or(&1);
    let (cfg, mut model) = load(dir, limits(prompt + output + 16, max_b.max(8), eager), opts)?;
    let bs = 16;
    let per_seq = (prompt + output).div_ceil(bs);
    if per_seq * max_b > model.num_blocks() {
        bail!("{max_b} sequences need {} KV blocks", per_seq * max_b);
    }
    // --sampled: every row samples (temperature 0.8, top-p 0.9) through the GPU sampler.
    let params = if sampled {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            ..SamplingParams::default()
        }
    } else {
        SamplingParams::default()
    };
    let history = TokenHistory::default();
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 150_000) as u32
    };
    println!("| streams | decode tok/s (engine) | ms/step | prefill ms |");
    println!("|---|---|---|---|");
    for &b in &batches {
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..prompt).map(|_| next()).collect())
            .collect();
        // Prefill in chunks of ≤ 8192 tokens.
        let t = Instant::now();
        let mut last: Vec<u32> = vec![0; b];
        let per_step = (8192 / prompt).max(1);
        for first in (0..b).step_by(per_step) {
            let n = per_step.min(b - first);
            let chunks: Vec<SeqChunk> = (first..first + n)
                .map(|s| SeqChunk {
                    tokens: &prompts[s],
                    start_pos: 0,
                    block_table: &tables[s],
                    prompt_tokens: prompt,
                    image_rows: None,
                })
                .collect();
            let rows = greedy_rows(n, &params, &history);
            let out = model.step(&chunks, &rows, None)?;
            for (i, t) in out.iter().enumerate() {
                last[first + i] = t.id;
            }
        }
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        // Warm-up step (captures the graph), then time `output − 1` steps.
        let mut step_times = Vec::new();
        let t_all = Instant::now();
        for k in 0..output.saturating_sub(1) {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let chunks = decode_chunks(&toks, prompt + k, &tables);
            let rows = greedy_rows(b, &params, &history);
            let ts = Instant::now();
            let out = model.step(&chunks, &rows, None)?;
            if k > 0 {
                step_times.push(ts.elapsed().as_secs_f64());
            }
            for (i, t) in out.iter().enumerate() {
                last[i] = t.id.min(cfg.text.vocab_size as u32 - 1);
            }
        }
        let _ = t_all;
        // One more step, eager, with a per-op timeline.
        {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let chunks = decode_chunks(&toks, prompt + output - 1, &tables);
            let rows = greedy_rows(b, &params, &history);
            model.set_enforce_eager(true);
            let ts = Instant::now();
            model.step(&chunks, &rows, None)?;
            let eager_ms = ts.elapsed().as_secs_f64() * 1e3;
            model.timeline_start()?;
            model.step(&chunks, &rows, None)?;
            print_timeline(
                &format!("decode step, {b} streams (eager {eager_ms:.2} ms wall)"),
                &model.timeline_stop()?,
            );
            model.set_enforce_eager(eager);
        }
        step_times.sort_by(|a, b| a.total_cmp(b));
        let mean = step_times.iter().sum::<f64>() / step_times.len().max(1) as f64;
        println!(
            "| {b} | {:.0} | {:.3} (median {:.3}) | {prefill_ms:.1} |",
            b as f64 / mean,
            mean * 1e3,
            step_times.get(step_times.len() / 2).copied().unwrap_or(0.0) * 1e3
        );
    }
    Ok(())
}

/// Times `f` (which enqueues work) over `reps` runs after 3 warm-ups; seconds per run.
fn time_it(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> r4b_kernels::Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    gpu.sync()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.sync()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// A device buffer of `n` random bf16 values in [-1, 1).
fn random_bf16(gpu: &Gpu, n: usize, seed: u64) -> Result<DBuf> {
    let mut x = seed | 1;
    let chunk: Vec<half::bf16> = (0..(1 << 22))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            half::bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    let buf = gpu.alloc(n * 2)?;
    let mut at = 0;
    while at < n {
        let m = chunk.len().min(n - at);
        // SAFETY: `buf` holds `n` bf16 values.
        unsafe { gpu.htod(&chunk[..m], buf.at(at, 2))? };
        at += m;
    }
    Ok(buf)
}

/// max |a − b| / max |b| over `n` outputs of two GEMM results.
fn max_rel_diff(gpu: &Gpu, (a, b): (u64, u64), n: usize, out: OutType) -> Result<f64> {
    let read = |p: u64| -> Result<Vec<f32>> {
        Ok(match out {
            OutType::F32 => {
                let mut v = vec![0f32; n];
                // SAFETY: `p` holds n f32.
                unsafe { gpu.dtoh(p, &mut v)? };
                v
            }
            OutType::Bf16 => {
                let mut v = vec![half::bf16::ZERO; n];
                // SAFETY: `p` holds n bf16.
                unsafe { gpu.dtoh(p, &mut v)? };
                v.iter().map(|x| x.to_f32()).collect()
            }
        })
    };
    let (va, vb) = (read(a)?, read(b)?);
    let scale = vb.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let d = va
        .iter()
        .zip(&vb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    Ok(if va.iter().any(|x| !x.is_finite()) {
        f64::NAN
    } else {
        d / scale.max(1e-30)
    })
}

fn profile(opts: &EngineOptions) -> Result<()> {
    let gpu = Gpu::new(0, &opts.kernels)?;
    // Copy bandwidth (bytes read + written).
    let n = 1usize << 30;
    let a = random_bf16(&gpu, n / 2, 1)?;
    let b = gpu.alloc(n)?;
    // SAFETY: both buffers hold n bytes.
    let t = time_it(&gpu, 20, || unsafe { gpu.dtod(a.ptr(), b.ptr(), n) })?;
    let copy = 2.0 * n as f64 / t / 1e9;
    println!("copy: {copy:.0} GB/s (1 GiB device-to-device, read + write)");
    // GEMMs of the decoder at TP = 1: Y[M, N] = X[M, K] · W[N, K]ᵀ.
    let shapes = [
        ("qkv", 6144, 2560, OutType::Bf16),
        ("o_proj", 2560, 4096, OutType::Bf16),
        ("gate_up", 19456, 2560, OutType::Bf16),
        ("down", 2560, 9728, OutType::Bf16),
        ("lm_head", 151936, 2560, OutType::F32),
    ];
    println!("| GEMM | M | µs | weight GB/s | % of copy | TFLOP/s | cuBLAS µs | max rel diff vs cuBLAS |");
    println!("|---|---|---|---|---|---|---|---|");
    let y2 = gpu.alloc(256 * 151936 * 4)?;
    let x = random_bf16(&gpu, 256 * 9728, 2)?;
    let y = gpu.alloc(256 * 151936 * 4)?;
    let mut per_layer = HashMap::new();
    for (name, nn, k, out) in shapes {
        let w = random_bf16(&gpu, nn * k, 3)?;
        for m in [1usize, 8, 64, 256] {
            // SAFETY: x holds 256·9728 ≥ m·k values, y 256·151936 f32 ≥ m·n outputs.
            let t = time_it(&gpu, 20, || unsafe {
                gpu.linear(x.ptr(), w.ptr(), y.ptr(), (m, nn, k), out, false)
            })?;
            // SAFETY: as above.
            let tb = time_it(&gpu, 20, || unsafe {
                gpu.linear_blas(x.ptr(), w.ptr(), y2.ptr(), (m, nn, k), out, false)
            })?;
            let diff = max_rel_diff(&gpu, (y.ptr(), y2.ptr()), m * nn, out)?;
            let gbs = (nn * k * 2) as f64 / t / 1e9;
            println!(
                "| {name} | {m} | {:.1} | {gbs:.0} | {:.0}% | {:.1} | {:.1} | {diff:.2e} |",
                t * 1e6,
                gbs / copy * 100.0,
                2.0 * (m * nn * k) as f64 / t / 1e12,
                tb * 1e6
            );
            *per_layer.entry(m).or_insert(0.0) += if name == "lm_head" { t / 36.0 } else { t };
        }
    }
    for m in [1usize, 8, 64, 256] {
        println!(
            "GEMMs per decode step at M = {m}: {:.3} ms (36 layers + head)",
            per_layer[&m] * 36.0 * 1e3
        );
    }
    // Prefill GEMMs (cuBLAS): the decoder at the image prompt's 2998 rows, SigLIP over 5 views.
    println!("| prefill GEMM (cuBLAS) | M | N | K | µs | TFLOP/s |");
    println!("|---|---|---|---|---|---|");
    let xp = random_bf16(&gpu, 3645 * 9728, 7)?;
    let yp = gpu.alloc(3645 * 19456 * 2)?;
    for (name, m, nn, k) in [
        ("qkv", 2998usize, 6144usize, 2560usize),
        ("o_proj", 2998, 2560, 4096),
        ("gate_up", 2998, 19456, 2560),
        ("down", 2998, 2560, 9728),
        ("SigLIP qkv", 3645, 3456, 1152),
        ("SigLIP out", 3645, 1152, 1152),
        ("SigLIP fc1", 3645, 4304, 1152),
        ("SigLIP fc2", 3645, 1152, 4304),
    ] {
        let w = random_bf16(&gpu, nn * k, 8)?;
        // SAFETY: xp holds 3645·9728 ≥ m·k values, yp 3645·19456 bf16 ≥ m·n outputs.
        let t = time_it(&gpu, 20, || unsafe {
            gpu.linear_blas(
                xp.ptr(),
                w.ptr(),
                yp.ptr(),
                (m, nn, k),
                OutType::Bf16,
                false,
            )
        })?;
        println!(
            "| {name} | {m} | {nn} | {k} | {:.1} | {:.0} |",
            t * 1e6,
            2.0 * (m * nn * k) as f64 / t / 1e12
        );
    }
    // Paged attention, one layer: nq 32, nkv 8, hd 128, block 16.
    let (nq, nkv, hd, bs) = (32usize, 8usize, 128usize, 16usize);
    println!("| attention | queries | ctx | part | µs/layer | KV GB/s |");
    println!("|---|---|---|---|---|---|");
    for (bsz, ctx) in [
        (1usize, 640usize),
        (1, 4096),
        (64, 640),
        (256, 384),
        (256, 640),
    ] {
        let blocks_per = ctx.div_ceil(bs);
        let nblocks = bsz * blocks_per;
        let kc = random_bf16(&gpu, nblocks * bs * nkv * hd, 4)?;
        let vc = random_bf16(&gpu, nblocks * bs * nkv * hd, 5)?;
        let q = random_bf16(&gpu, bsz * (nq + 2 * nkv) * hd, 6)?;
        let out = gpu.alloc(bsz * nq * hd * 2)?;
        let tables: Vec<i32> = (0..nblocks as i32).collect();
        let ctx_lens = vec![ctx as i32; bsz];
        let rows: Vec<i32> = (0..bsz as i32).collect();
        let (bt_d, cl_d, rw_d) = (
            gpu.alloc(nblocks * 4)?,
            gpu.alloc(bsz * 4)?,
            gpu.alloc(bsz * 4)?,
        );
        let max_parts = ctx.div_ceil(32);
        let (pm, pl, pacc) = (
            gpu.alloc(bsz * nq * max_parts * 4)?,
            gpu.alloc(bsz * nq * max_parts * 4)?,
            gpu.alloc(bsz * nq * max_parts * hd * 4)?,
        );
        // SAFETY: sizes as allocated above.
        unsafe {
            gpu.htod(&tables, bt_d.ptr())?;
            gpu.htod(&ctx_lens, cl_d.ptr())?;
            gpu.htod(&rows, rw_d.ptr())?;
        }
        for ps in [32usize, 64, 128, 256, 512] {
            let parts = ctx.div_ceil(ps);
            let args = DecodeAttn {
                q: q.ptr(),
                q_stride: (nq + 2 * nkv) * hd,
                k_cache: kc.ptr(),
                v_cache: vc.ptr(),
                ctx_lens: cl_d.ptr(),
                bt_rows: rw_d.ptr(),
                block_tables: bt_d.ptr(),
                max_blocks: blocks_per,
                block_size: bs,
                tokens: bsz,
                nq,
                nkv,
                head_dim: hd,
                part_size: ps,
                parts,
                scale: 0.088,
                pm: pm.ptr(),
                pl: pl.ptr(),
                pacc: pacc.ptr(),
                out: out.ptr(),
                out_stride: nq * hd,
                kernel: opts.kernels.decode_attention,
            };
            // SAFETY: as above (scratch sized for 32-key partitions).
            let t = time_it(&gpu, 50, || unsafe { gpu.decode_attention(&args) })?;
            let bytes = (bsz * ctx * nkv * hd * 2 * 2) as f64;
            let chosen = if ps == r4b_worker::gpu::part_size(bsz) {
                " (used)"
            } else {
                ""
            };
            println!(
                "| paged | {bsz} | {ctx} | {ps}{chosen} | {:.1} | {:.0} |",
                t * 1e6,
                bytes / t / 1e9
            );
        }
    }
    // Small kernels at 1 and 256 tokens.
    let h = 2560;
    let res = random_bf16(&gpu, 256 * h * 2, 7)?; // f32 residual: 2 bf16 slots per value
    let xx = random_bf16(&gpu, 256 * h, 8)?;
    let wn = random_bf16(&gpu, h, 9)?;
    let o = gpu.alloc(256 * h * 2)?;
    let gu = random_bf16(&gpu, 256 * 2 * 9728, 10)?;
    let act = gpu.alloc(256 * 9728 * 2)?;
    for t in [1usize, 256] {
        // SAFETY: buffers hold 256 rows.
        let a = time_it(&gpu, 100, || unsafe {
            gpu.add_rmsnorm(
                res.ptr(),
                Residual::Add(xx.ptr()),
                wn.ptr(),
                o.ptr(),
                (t, h),
                1e-6,
            )
        })?;
        let s = time_it(&gpu, 100, || unsafe {
            gpu.silu_mul(gu.ptr(), act.ptr(), t, 9728)
        })?;
        println!(
            "small kernels at {t} tokens: add_rmsnorm {:.1} µs, silu_mul {:.1} µs",
            a * 1e6,
            s * 1e6
        );
    }
    Ok(())
}

/// Relative L2 error and max |a − b| / max |b| of two bf16 device arrays of `n` values.
fn bf16_diff(gpu: &Gpu, (a, b): (u64, u64), n: usize) -> Result<(f64, f64)> {
    let read = |p: u64| -> Result<Vec<f32>> {
        let mut v = vec![half::bf16::ZERO; n];
        // SAFETY: `p` holds n bf16.
        unsafe { gpu.dtoh(p, &mut v)? };
        Ok(v.iter().map(|x| x.to_f32()).collect())
    };
    let (va, vb) = (read(a)?, read(b)?);
    if va.iter().any(|x| !x.is_finite()) {
        return Ok((f64::NAN, f64::NAN));
    }
    let (mut num, mut den, mut dmax, mut bmax) = (0f64, 0f64, 0f64, 0f64);
    for (x, y) in va.iter().zip(&vb) {
        let d = f64::from(x - y);
        num += d * d;
        den += f64::from(*y) * f64::from(*y);
        dmax = dmax.max(d.abs());
        bmax = bmax.max(f64::from(y.abs()));
    }
    Ok(((num / den.max(1e-30)).sqrt(), dmax / bmax.max(1e-30)))
}

/// The tensor-core prefill attention against the cuBLAS path (gathered keys, two products, a
/// bf16 row softmax — the path that matched HF), on random inputs: the decoder's shapes over a
/// shuffled paged cache, and SigLIP's (head dim 72, every view at once, not causal).
fn attn(opts: &EngineOptions) -> Result<()> {
    let mut gpu = Gpu::new(0, &opts.kernels)?;
    println!(
        "| case | flash 64 rows/CTA µs | flash 128 rows/CTA µs | cuBLAS path µs | best flash TFLOP/s | rel L2 (64 / 128) | max diff / max (64 / 128) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (nq, nkv, hd) = (32usize, 8usize, 128usize);
    let qkv_w = (nq + 2 * nkv) * hd;
    // (query rows, keys before them, score scale × 1/√hd, KV block size: 24 takes the kernel's
    // division path, powers of two its shift path)
    for (rows, base, sharp, bs) in [
        (2998usize, 0usize, 1.0f32, 16usize),
        (2998, 0, 8.0, 16),
        (1000, 1500, 1.0, 16),
        (1000, 1500, 1.0, 24),
        (200, 3000, 4.0, 16),
        (64, 0, 1.0, 16),
        (8192, 0, 1.0, 16),
    ] {
        let ctx = base + rows;
        let nblocks = ctx.div_ceil(bs);
        let pool = 2 * nblocks + 1;
        // Blocks far apart and in reverse order.
        let table: Vec<i32> = (0..nblocks).map(|i| (pool - 1 - 2 * i) as i32).collect();
        let kc = random_bf16(&gpu, pool * bs * nkv * hd, 11)?;
        let vc = random_bf16(&gpu, pool * bs * nkv * hd, 12)?;
        let q = random_bf16(&gpu, rows * qkv_w, 13)?;
        let (of, of2, or) = (
            gpu.alloc(rows * nq * hd * 2)?,
            gpu.alloc(rows * nq * hd * 2)?,
            gpu.alloc(rows * nq * hd * 2)?,
        );
        let (kg, vg) = (
            gpu.alloc(ctx * nkv * hd * 2)?,
            gpu.alloc(ctx * nkv * hd * 2)?,
        );
        let bt = gpu.alloc(nblocks * 4)?;
        // SAFETY: `bt` holds nblocks i32.
        unsafe { gpu.htod(&table, bt.ptr())? };
        let scale = sharp / (hd as f32).sqrt();
        let fa = FlashAttn {
            q: q.ptr(),
            q_ld: qkv_w,
            q_z: 0,
            k: kc.ptr(),
            v: vc.ptr(),
            kv_ld: nkv * hd,
            kv_z: 0,
            block_table: Some((bt.ptr(), bs)),
            out: of.ptr(),
            out_ld: nq * hd,
            out_z: 0,
            rows,
            batch: 1,
            ctx_base: base,
            nkeys: ctx,
            nq,
            nkv,
            head_dim: hd,
            causal: true,
            scale,
        };
        // Score rows per cuBLAS product that fit 512 MB.
        let block = ((512usize << 20) / (nkv * ctx * 2)).clamp(1, rows);
        let s = gpu.alloc(nkv * block * ctx * 2)?;
        // SAFETY: buffers sized above for `rows` queries over `ctx` keys.
        let (tf, tf2) = time_flash_variants(&mut gpu, &fa, of2.ptr())?;
        let tr = time_it(&gpu, 3, || unsafe {
            gpu.gather_kv(
                (kc.ptr(), vc.ptr()),
                bt.ptr(),
                (bs, nkv * hd, ctx),
                (kg.ptr(), vg.ptr()),
            )?;
            for r0 in (0..rows).step_by(block) {
                let n = block.min(rows - r0);
                attention_gemm(
                    &gpu,
                    &AttnGemm {
                        q: q.at(r0 * qkv_w, 2),
                        q_ld: qkv_w,
                        k: kg.ptr(),
                        k_ld: nkv * hd,
                        v: vg.ptr(),
                        v_ld: nkv * hd,
                        out: or.at(r0 * nq * hd, 2),
                        out_ld: nq * hd,
                        rows: n,
                        ctx: base + r0 + n,
                        nkv,
                        group: nq / nkv,
                        hd,
                        causal_base: Some(base + r0),
                        scale,
                        s: s.ptr(),
                    },
                )
                .map_err(|e| r4b_kernels::GpuError::Invalid(e.to_string()))?;
            }
            Ok(())
        })?;
        let (l2, mx) = bf16_diff(&gpu, (of.ptr(), or.ptr()), rows * nq * hd)?;
        let (l2b, mxb) = bf16_diff(&gpu, (of2.ptr(), or.ptr()), rows * nq * hd)?;
        let flops = 4.0 * (hd * nq) as f64 * (rows * base + rows * (rows + 1) / 2) as f64;
        println!(
            "| decoder {rows} rows after {base} keys, scale ×{sharp}, blocks of {bs} | {:.1} | {:.1} | {:.1} | {:.0} | {l2:.2e} / {l2b:.2e} | {mx:.2e} / {mxb:.2e} |",
            tf * 1e6,
            tf2 * 1e6,
            tr * 1e6,
            flops / tf.min(tf2) / 1e12
        );
    }
    // Paged decode attention: tensor-core kernel vs the CUDA-core kernel (the one the decode-path
    // check against HF validated), contexts varying per query so partitions end mid-tile.
    println!("| decode attention | queries | ctx | part | tensor-core µs | KV GB/s | CUDA-core µs | KV GB/s | rel L2 | max diff / max |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let bs = 16usize;
    for (bsz, ctx, ps, contiguous) in [
        (1usize, 640usize, 64usize, false),
        (1, 4096, 64, false),
        (8, 640, 64, false),
        (64, 640, 128, false),
        (256, 384, 512, false),
        (256, 640, 512, false),
        (256, 640, 256, false),
        (256, 640, 1024, false),
        (256, 640, 512, true),
    ] {
        let blocks_per = ctx.div_ceil(bs);
        let nblocks = bsz * blocks_per;
        let kc = random_bf16(&gpu, (nblocks + 1) * bs * nkv * hd, 21)?;
        let vc = random_bf16(&gpu, (nblocks + 1) * bs * nkv * hd, 22)?;
        let q = random_bf16(&gpu, bsz * qkv_w, 23)?;
        let (o1, o2) = (gpu.alloc(bsz * nq * hd * 2)?, gpu.alloc(bsz * nq * hd * 2)?);
        // Sequence t owns blocks t, t + bsz, t + 2·bsz, … (interleaved), or a run of its own.
        let tables: Vec<i32> = (0..bsz)
            .flat_map(|t| {
                (0..blocks_per).map(move |j| {
                    if contiguous {
                        (t * blocks_per + j) as i32
                    } else {
                        (j * bsz + t) as i32
                    }
                })
            })
            .collect();
        let ctx_lens: Vec<i32> = (0..bsz).map(|t| (ctx - (t * 7) % 37) as i32).collect();
        let rows: Vec<i32> = (0..bsz as i32).collect();
        let (bt_d, cl_d, rw_d) = (
            gpu.alloc(nblocks * 4)?,
            gpu.alloc(bsz * 4)?,
            gpu.alloc(bsz * 4)?,
        );
        let parts = ctx.div_ceil(ps);
        let (pm, pl, pacc) = (
            gpu.alloc(bsz * nq * parts * 4)?,
            gpu.alloc(bsz * nq * parts * 4)?,
            gpu.alloc(bsz * nq * parts * hd * 4)?,
        );
        // SAFETY: sizes as allocated above.
        unsafe {
            gpu.htod(&tables, bt_d.ptr())?;
            gpu.htod(&ctx_lens, cl_d.ptr())?;
            gpu.htod(&rows, rw_d.ptr())?;
        }
        let args = |out: u64, kernel| DecodeAttn {
            q: q.ptr(),
            q_stride: qkv_w,
            k_cache: kc.ptr(),
            v_cache: vc.ptr(),
            ctx_lens: cl_d.ptr(),
            bt_rows: rw_d.ptr(),
            block_tables: bt_d.ptr(),
            max_blocks: blocks_per,
            block_size: bs,
            tokens: bsz,
            nq,
            nkv,
            head_dim: hd,
            part_size: ps,
            parts,
            scale: 1.0 / (hd as f32).sqrt(),
            pm: pm.ptr(),
            pl: pl.ptr(),
            pacc: pacc.ptr(),
            out,
            out_stride: nq * hd,
            kernel,
        };
        // SAFETY: as above.
        let t1 = time_it(&gpu, 50, || unsafe {
            gpu.decode_attention(&args(o1.ptr(), DecodeAttention::TensorCore))
        })?;
        let t2 = time_it(&gpu, 50, || unsafe {
            gpu.decode_attention(&args(o2.ptr(), DecodeAttention::CudaCore))
        })?;
        let (l2, mx) = bf16_diff(&gpu, (o1.ptr(), o2.ptr()), bsz * nq * hd)?;
        let bytes: f64 = ctx_lens
            .iter()
            .map(|&c| (c as usize * nkv * hd * 4) as f64)
            .sum();
        println!(
            "| paged{} | {bsz} | {ctx} | {ps} | {:.1} | {:.0} | {:.1} | {:.0} | {l2:.2e} | {mx:.2e} |",
            if contiguous { " (blocks in order)" } else { "" },
            t1 * 1e6,
            bytes / t1 / 1e9,
            t2 * 1e6,
            bytes / t2 / 1e9
        );
    }
    // SigLIP: 5 views of 729 patches, 16 heads of 72, q|k|v rows of 3·1152.
    let (views, n, heads, vhd) = (5usize, 729usize, 16usize, 72usize);
    let c = heads * vhd;
    let qkv = random_bf16(&gpu, views * n * 3 * c, 14)?;
    let (of, of2, or) = (
        gpu.alloc(views * n * c * 2)?,
        gpu.alloc(views * n * c * 2)?,
        gpu.alloc(views * n * c * 2)?,
    );
    let s = gpu.alloc(heads * n * n * 2)?;
    for sharp in [1.0f32, 8.0] {
        let scale = sharp / (vhd as f32).sqrt();
        let fa = FlashAttn {
            q: qkv.ptr(),
            q_ld: 3 * c,
            q_z: n * 3 * c,
            k: qkv.at(c, 2),
            v: qkv.at(2 * c, 2),
            kv_ld: 3 * c,
            kv_z: n * 3 * c,
            block_table: None,
            out: of.ptr(),
            out_ld: c,
            out_z: n * c,
            rows: n,
            batch: views,
            ctx_base: 0,
            nkeys: n,
            nq: heads,
            nkv: heads,
            head_dim: vhd,
            causal: false,
            scale,
        };
        let (tf, tf2) = time_flash_variants(&mut gpu, &fa, of2.ptr())?;
        // SAFETY: buffers sized above.
        let tr = time_it(&gpu, 3, || unsafe {
            for v in 0..views {
                let qv = qkv.at(v * n * 3 * c, 2);
                attention_gemm(
                    &gpu,
                    &AttnGemm {
                        q: qv,
                        q_ld: 3 * c,
                        k: qv + (c * 2) as u64,
                        k_ld: 3 * c,
                        v: qv + (2 * c * 2) as u64,
                        v_ld: 3 * c,
                        out: or.at(v * n * c, 2),
                        out_ld: c,
                        rows: n,
                        ctx: n,
                        nkv: heads,
                        group: 1,
                        hd: vhd,
                        causal_base: None,
                        scale,
                        s: s.ptr(),
                    },
                )
                .map_err(|e| r4b_kernels::GpuError::Invalid(e.to_string()))?;
            }
            Ok(())
        })?;
        let (l2, mx) = bf16_diff(&gpu, (of.ptr(), or.ptr()), views * n * c)?;
        let (l2b, mxb) = bf16_diff(&gpu, (of2.ptr(), or.ptr()), views * n * c)?;
        let flops = 4.0 * (vhd * heads * views * n * n) as f64;
        println!(
            "| SigLIP {views} views × {n}, hd {vhd}, scale ×{sharp} | {:.1} | {:.1} | {:.1} | {:.0} | {l2:.2e} / {l2b:.2e} | {mx:.2e} / {mxb:.2e} |",
            tf * 1e6,
            tf2 * 1e6,
            tr * 1e6,
            flops / tf.min(tf2) / 1e12
        );
    }
    Ok(())
}

/// Times the prefill attention `fa` with 64 and then 128 query rows per CTA; the 64-row output
/// stays in `fa.out`, the 128-row one goes to `out128`. The automatic choice is restored after.
fn time_flash_variants(gpu: &mut Gpu, fa: &FlashAttn, out128: u64) -> Result<(f64, f64)> {
    let fa128 = FlashAttn { out: out128, ..*fa };
    let auto = gpu.options.prefill_rows;
    gpu.options.prefill_rows = Some(64);
    // SAFETY: the caller sized every buffer of `fa` (and `out128` like `fa.out`).
    let t64 = time_it(gpu, 10, || unsafe { gpu.flash_attention(fa) });
    gpu.options.prefill_rows = Some(128);
    // SAFETY: as above.
    let t128 = time_it(gpu, 10, || unsafe { gpu.flash_attention(&fa128) });
    gpu.options.prefill_rows = auto;
    Ok((t64?, t128?))
}

/// Random logits `[rows, vocab]` with the awkward cases of real ones in some rows: all equal
/// (ties everywhere), NaN, −inf, values on a coarse grid (ties at the top-k threshold).
fn sample_logits_host(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        for i in 0..vocab {
            // Roughly logit-like: a heavy head over a Gaussian-ish body.
            let body = (next() + next() + next() - 1.5) * 6.0;
            let v = match r % 8 {
                0 if r == 0 => 0.0,
                1 if i % 997 == 0 => f64::NAN,
                2 if i % 3 != 0 => f64::NEG_INFINITY,
                3 => (body * 2.0).round() / 2.0,
                _ => body + if i % 4093 == 7 { 12.0 * next() } else { 0.0 },
            };
            out.push(v as f32);
        }
    }
    out
}

/// The sampling configurations of the check, cycled over rows.
fn sample_params() -> Vec<SamplingParams> {
    let d = SamplingParams::default();
    let t = |temperature| SamplingParams {
        temperature,
        ..d.clone()
    };
    vec![
        SamplingParams {
            repetition_penalty: 1.3,
            ..d.clone()
        },
        t(0.7),
        SamplingParams {
            top_k: 50,
            ..t(1.0)
        },
        SamplingParams {
            top_p: 0.9,
            ..t(0.8)
        },
        SamplingParams {
            min_p: 0.05,
            ..t(1.0)
        },
        SamplingParams {
            top_k: 1024,
            top_p: 0.95,
            ..t(1.1)
        },
        SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.7,
            repetition_penalty: 1.2,
            logprobs: true,
            top_logprobs: 5,
            ..t(1.3)
        },
        SamplingParams {
            logprobs: true,
            top_logprobs: 20,
            ..d.clone()
        },
        SamplingParams {
            top_k: 5000,
            min_p: 0.01,
            logprobs: true,
            ..t(2.0)
        },
        SamplingParams {
            top_k: 3,
            top_p: 0.5,
            frequency_penalty: -1.0,
            ..t(0.3)
        },
    ]
}

fn same_tokens(a: &[SampledToken], b: &[SampledToken]) -> (usize, f32) {
    let mut diff = 0f32;
    let mut bad = 0;
    for (x, y) in a.iter().zip(b) {
        if x.id != y.id || x.top.len() != y.top.len() {
            bad += 1;
            continue;
        }
        diff = diff.max((x.logprob - y.logprob).abs());
        for (p, q) in x.top.iter().zip(&y.top) {
            if p.0 != q.0 {
                bad += 1;
                break;
            }
            diff = diff.max((p.1 - q.1).abs());
        }
    }
    (bad, diff)
}

/// The GPU sampler against the host sampler on the same logits: identical tokens, logprobs
/// within 1e-4; the merge of 4 simulated vocab slices; timings.
fn sample(opts: &EngineOptions) -> Result<()> {
    let gpu = Gpu::new(0, &opts.kernels)?;
    let vocab = 151_936usize;
    let n = 256usize;
    let host = sample_logits_host(n, vocab, 42);
    let params = sample_params();
    let mut histories = Vec::with_capacity(n);
    let mut x = 7u64;
    for r in 0..n {
        let mut h = TokenHistory::default();
        for j in 0..(50 + r % 300) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            h.push_prompt(((x >> 33) as usize % vocab) as u32);
            if j % 5 == 0 {
                // Outputs repeat a small set of ids (counts > 1) and some prompt ids.
                h.push_output(((x >> 40) as usize % 64 * 2371 % vocab) as u32);
            }
        }
        histories.push(h);
    }
    let rows: Vec<SampleRow> = (0..n)
        .map(|r| SampleRow {
            params: &params[r % params.len()],
            history: &histories[r],
            seed: 1000 + r as u64,
        })
        .collect();
    let expect = sampling::sample_logits(
        &candle_core::Tensor::from_vec(host.clone(), (n, vocab), &candle_core::Device::Cpu)?,
        &SingleRank,
        &rows,
    )?;
    let dl = gpu.alloc(n * vocab * 4)?;
    let upload = |buf: &DBuf| -> Result<()> {
        // SAFETY: `buf` holds n × vocab f32.
        unsafe { gpu.htod(&host, buf.ptr())? };
        Ok(())
    };
    let indexed: Vec<(usize, SampleRow)> = rows.iter().copied().enumerate().collect();
    let mut sampler = GpuSampler::new(&gpu, n, &Solo)?;
    let (mut bad_all, mut diff_all) = (0, 0f32);
    // 256 rows run one part per row, 10 rows many parts per row (stage 1 split, stage 2 merge).
    for m in [n, 10] {
        let (rs, ex) = (&indexed[..m], &expect[..m]);
        let srows = &rows[..m];
        upload(&dl)?;
        // SAFETY: `dl` holds n rows of `vocab` f32.
        let got = unsafe { sampler.sample(&gpu, (dl.ptr(), vocab, 0), &Solo, rs)? };
        let (bad, diff) = same_tokens(&got, ex);
        println!(
            "GPU sampler vs host sampler, {m} rows x {vocab} ({} parts per row; 10 configurations \
             incl. penalties, ties, NaN, -inf): {bad} rows differ, max |logprob diff| {diff:.2e}",
            parts_for(m, vocab)
        );
        // The merge kernel alone: the host merge over the GPU's packed candidates.
        upload(&dl)?;
        // SAFETY: as above.
        let (host_merge, gpu_merge) = unsafe {
            let packed = sampler.prepare(&gpu, (dl.ptr(), vocab, 0), rs, None)?;
            let parts = sampler.packed_parts(&gpu, packed)?;
            let hm = sampling::finish_packed(&[parts], srows, vocab)?;
            (
                hm,
                sampler.finish(&gpu, sampler.packed_ptr(), 1, packed, m)?,
            )
        };
        let (bad_m, diff_m) = same_tokens(&gpu_merge, &host_merge);
        let (bad_p, _) = same_tokens(&host_merge, ex);
        println!(
            "  host merge over GPU candidates vs host sampler: {bad_p} rows differ; GPU merge vs host merge: {bad_m} differ, {diff_m:.2e}"
        );
        // Four vocab slices (TP = 4 without the all-gather: the ranks' packed words side by side).
        let world = 4usize;
        let w = vocab / world;
        let slices: Vec<DBuf> = (0..world)
            .map(|r| -> Result<DBuf> {
                let mut part = Vec::with_capacity(m * w);
                for row in 0..m {
                    part.extend_from_slice(&host[row * vocab + r * w..row * vocab + (r + 1) * w]);
                }
                let b = gpu.alloc(m * w * 4)?;
                // SAFETY: `b` holds m × w f32.
                unsafe { gpu.htod(&part, b.ptr())? };
                Ok(b)
            })
            .collect::<Result<_>>()?;
        let (_, nf, nu) = sampling::packed_layout(srows, w)?;
        let gathered = gpu.alloc(world * (nf + nu) * 4)?;
        // SAFETY: each slice holds m rows of w f32; `gathered` holds world × (nf + nu) words.
        let got_tp = unsafe {
            let mut packed = None;
            for (r, b) in slices.iter().enumerate() {
                packed = Some(sampler.prepare(
                    &gpu,
                    (b.ptr(), w, r * w),
                    rs,
                    Some(gathered.at(r * (nf + nu), 4)),
                )?);
            }
            let packed = packed.context("no ranks")?;
            sampler.finish(&gpu, gathered.ptr(), world, packed, m)?
        };
        let (bad_tp, diff_tp) = same_tokens(&got_tp, ex);
        println!(
            "  {world} vocab slices ({} parts each) merged on the GPU vs host sampler on the whole vocabulary: {bad_tp} rows differ, {diff_tp:.2e}",
            parts_for(m, w)
        );
        bad_all += bad + bad_m + bad_p + bad_tp;
        diff_all = diff_all.max(diff).max(diff_m).max(diff_tp);
    }
    // Structured output: a token mask on 3 of every 4 rows (a seeded ~1/16 of the ids allowed,
    // row 4 only one id), applied in place by `apply_token_mask` before the GPU sampler. The
    // reference is the host sampler on a host copy masked by `apply_mask` (same semantics: raw
    // logprobs of the masked logits); its ids must also equal the host sampler's
    // processed-only masking (`sample_logits_masked`, the path that keeps raw logprobs), and
    // every id must be allowed.
    {
        let words = vocab.div_ceil(32);
        let masks: Vec<sampling::ShardMask> = (0..n)
            .map(|r| {
                if r % 4 == 3 {
                    return None;
                }
                let mut m = vec![0u32; words];
                let mut x = 0x5EED ^ r as u64;
                for j in 0..vocab {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if (r == 4 && j == 12_345) || (r != 4 && (x >> 60) == 0) {
                        m[j / 32] |= 1 << (j % 32);
                    }
                }
                Some(m)
            })
            .collect();
        let mut masked_host = host.clone();
        for (r, m) in masks.iter().enumerate() {
            if let Some(m) = m {
                sampling::apply_mask(&mut masked_host[r * vocab..(r + 1) * vocab], m);
            }
        }
        let cpu =
            |v: Vec<f32>| candle_core::Tensor::from_vec(v, (n, vocab), &candle_core::Device::Cpu);
        let expect = sampling::sample_logits(&cpu(masked_host)?, &SingleRank, &rows)?;
        let processed_only =
            sampling::sample_logits_masked(&cpu(host.clone())?, &SingleRank, &rows, &masks)?;
        upload(&dl)?;
        // SAFETY: `dl` holds n rows of `vocab` f32; the masks cover `vocab` columns.
        let got = unsafe {
            sampler.apply_masks(&gpu, (dl.ptr(), vocab), &indexed, &masks)?;
            sampler.sample(&gpu, (dl.ptr(), vocab, 0), &Solo, &indexed)?
        };
        let (bad, diff) = same_tokens(&got, &expect);
        let ids_differ = got
            .iter()
            .zip(&processed_only)
            .filter(|(a, b)| a.id != b.id)
            .count();
        let disallowed = got
            .iter()
            .zip(&masks)
            .filter(|(t, m)| {
                m.as_ref().is_some_and(|m| {
                    m.get(t.id as usize / 32)
                        .is_none_or(|w| (w >> (t.id % 32)) & 1 == 0)
                })
            })
            .count();
        println!(
            "masked rows (apply_token_mask + GPU sampler) vs host sampler on masked logits: {bad} \
             rows differ, {diff:.2e}; ids vs processed-only masking: {ids_differ} differ; \
             disallowed ids: {disallowed}"
        );
        bad_all += bad + ids_differ + disallowed;
        diff_all = diff_all.max(diff);
    }
    // Timings: sampled rows (temperature 0.8, top-p 0.9, no penalties), GPU vs host.
    let plain = SamplingParams {
        top_p: 0.9,
        ..SamplingParams {
            temperature: 0.8,
            ..SamplingParams::default()
        }
    };
    let empty = TokenHistory::default();
    println!("| sampled rows | GPU sampler ms | host sampler ms (logits already on the host) |");
    println!("|---|---|---|");
    for b in [1usize, 32, 256] {
        let rs: Vec<(usize, SampleRow)> = (0..b)
            .map(|i| {
                (
                    i,
                    SampleRow {
                        params: &plain,
                        history: &empty,
                        seed: i as u64,
                    },
                )
            })
            .collect();
        let mut best = f64::MAX;
        for _ in 0..5 {
            upload(&dl)?;
            gpu.sync()?;
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { sampler.sample(&gpu, (dl.ptr(), vocab, 0), &Solo, &rs)? };
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        let only: Vec<SampleRow> = rs.iter().map(|r| r.1).collect();
        let t = Instant::now();
        sampling::sample_logits(
            &candle_core::Tensor::from_vec(
                host[..b * vocab].to_vec(),
                (b, vocab),
                &candle_core::Device::Cpu,
            )?,
            &SingleRank,
            &only,
        )?;
        println!(
            "| {b} | {best:.3} | {:.1} |",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    if bad_all > 0 || diff_all > 1e-4 {
        bail!("GPU sampler check FAILED");
    }
    println!("GPU sampler check PASSED");
    Ok(())
}

impl EngineFlags {
    fn options(&self) -> EngineOptions {
        EngineOptions {
            collective_timeout: std::time::Duration::from_secs(30),
            disable_custom_all_reduce: false,
            peer_access: true,
            placement: Default::default(),
            kernels: KernelOptions {
                arch: match self.kernel_arch {
                    ArchFlag::Auto => KernelArch::Auto,
                    ArchFlag::Sm80 => KernelArch::Sm80,
                },
                pdl: !self.no_pdl,
                ..KernelOptions::default()
            },
            host_sampling: self.host_sampling,
            force_nccl: self.force_nccl,
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let opts = cli.engine.options();
    match cli.cmd {
        Cmd::Logits {
            ckpt,
            reference,
            out,
            tp,
            rank,
            rendezvous,
        } => {
            let group = logits_group(tp, rank, rendezvous)?;
            logits(&ckpt, &reference, &out, &opts, &group)
        }
        Cmd::Decode {
            ckpt,
            batches,
            prompt,
            output,
            eager,
            sampled,
        } => {
            let run = DecodeRun {
                batches,
                prompt,
                output,
                eager,
                sampled,
            };
            decode(&ckpt, run, &opts)
        }
        Cmd::Profile => profile(&opts),
        Cmd::Attn => attn(&opts),
        Cmd::Sample => sample(&opts),
        Cmd::Allreduce { worlds } => allreduce(&worlds),
    }
}

/// The IPC all-reduce with `world` ranks in this process on GPU 0, one stream each (they run
/// concurrently, as ranks on separate GPUs would; ranks in separate processes on one GPU
/// time-slice instead). Per size: µs per call one-shot and two-shot, device time: each rank
/// replays a CUDA graph of `CALLS` calls, so host launches do not count.
fn allreduce(worlds: &[usize]) -> Result<()> {
    use r4b_kernels::cudarc::driver::sys as cu;
    use r4b_kernels::{DeviceGroup, IpcAllReduce};
    const CALLS: usize = 20;
    let hidden = 2560;
    let rows = [1usize, 8, 32, 64, 128, 256, 1024, 2048, 8192];
    println!("| ranks | rows × 2560 bf16 | bytes | one-shot µs | two-shot µs |");
    println!("|---|---|---|---|---|");
    for &world in worlds {
        let gpus: Vec<Gpu> = (0..world)
            .map(|_| Gpu::new(0, &KernelOptions::default()))
            .collect::<std::result::Result<_, _>>()?;
        let stage = 8192 * hidden * 2;
        let mut group: Vec<IpcAllReduce> = gpus
            .iter()
            .enumerate()
            .map(|(r, g)| {
                IpcAllReduce::new(g, (r, world), stage, std::time::Duration::from_secs(10))
                    .map(|x| x.0)
            })
            .collect::<std::result::Result<_, _>>()?;
        IpcAllReduce::connect_local(&mut group, &gpus[0])?;
        let bufs: Vec<DBuf> = gpus
            .iter()
            .map(|g| g.alloc(8192 * hidden * 2))
            .collect::<std::result::Result<_, _>>()?;
        for (g, b) in gpus.iter().zip(&bufs) {
            // SAFETY: fresh allocation of this size.
            unsafe { g.memset0(b.ptr(), 8192 * hidden * 2)? };
        }
        for &n in &rows {
            let count = n * hidden;
            let mut us = [0f64; 2];
            for (k, min) in [usize::MAX, 0].into_iter().enumerate() {
                for g in &mut group {
                    g.set_two_shot_min_bytes(min);
                }
                let mut graphs = Vec::new();
                for (r, g) in gpus.iter().enumerate() {
                    g.stream.begin_capture(
                        cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    )?;
                    for _ in 0..CALLS {
                        // SAFETY: `bufs[r]` holds 8192 rows of `hidden` bf16.
                        unsafe { group[r].all_reduce_bf16(g, bufs[r].ptr(), count)? };
                    }
                    graphs.push(
                        g.stream
                            .end_capture(cu::CUgraphInstantiate_flags(0))?
                            .context("capture produced no graph")?,
                    );
                }
                let run = |reps: usize| -> Result<f64> {
                    for g in &gpus {
                        g.sync()?;
                    }
                    let t = Instant::now();
                    for _ in 0..reps {
                        for gr in &graphs {
                            gr.launch()?;
                        }
                    }
                    for g in &gpus {
                        g.sync()?;
                    }
                    Ok(t.elapsed().as_secs_f64() * 1e6 / (reps * CALLS) as f64)
                };
                run(2)?;
                us[k] = run(if n >= 1024 { 3 } else { 20 })?;
            }
            println!(
                "| {world} | {n} | {} | {:.1} | {:.1} |",
                count * 2,
                us[0],
                us[1]
            );
        }
    }
    Ok(())
}
