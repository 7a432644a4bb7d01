//! The worker's gRPC service (`cluster.v1.Worker`): `Init` joins the TP group and loads this
//! rank's shard, `Step` is a bidirectional stream of steps executed in order on one dedicated
//! thread (the model is not `Sync`-shared across tasks), `Health` and `Shutdown`.
//!
//! Per sequence the executor keeps what later steps need: the `<image>` rows (encoded once when
//! the images arrive with the first chunk, kept where the engine computed them: host tensors on
//! the CPU, device memory on the GPU), the sampling parameters and the token history for
//! penalties, and a constrained sequence's grammar state ([`r4b_model::grammar::SeqConstraint`],
//! fed every output token as it arrives: the decode inputs are the sampled or forced tokens). Each
//! step computes the constrained rows' masks on the CPU (rayon over sequences; on the GPU engine
//! while the queued forward runs) and the sampler applies them. The coordinator releases that
//! state with `release_seq_ids`, a preempted sequence's too (its re-run brings its first chunk
//! and its images again); dropping it frees the rows.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use r4b_proto::v1 as pb;
use r4b_proto::v1::worker_server::{Worker, WorkerServer};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::admission::StepLimits;
use crate::checkpoint::Checkpoint;
use crate::collective::{Collective, CollectiveError, SingleRank, SocketCollective, SocketConfig};
use crate::config::{ImagePreprocessing, RConfig};
use crate::kv::PagedKvCache;
use crate::model::anyres::PixelViews;
use crate::model::{ChunkImageRows, ImageRows, OutputRows, R4bModel, SeqChunk};
use crate::prompt_logprobs::{score_prompts, ChunkSpan, PromptJob, PromptLogprob};
use crate::sampling::{SampleRow, SamplingParams, ShardMask, TokenHistory};
use crate::{Error, Result};
use r4b_model::grammar::{GrammarCompiler, SeqConstraint};

/// A collective that adds up the time spent in it (reported per step).
#[derive(Debug)]
struct Timed {
    inner: Arc<dyn Collective>,
    ns: AtomicU64,
}

impl Timed {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> std::result::Result<Tensor, CollectiveError> {
        self.time(|| self.inner.all_reduce_sum(t))
    }
    fn all_gather(&self, t: &Tensor) -> std::result::Result<Vec<Tensor>, CollectiveError> {
        self.time(|| self.inner.all_gather(t))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> std::result::Result<Tensor, CollectiveError> {
        self.time(|| self.inner.broadcast(t, root))
    }
}

/// What the executor remembers about one sequence between steps.
struct SeqState {
    /// `<image>` rows of the images received since the first chunk, one `[n_i, hidden]` per
    /// image, in order.
    image_rows: Vec<ImageRows>,
    params: SamplingParams,
    history: TokenHistory,
    seed: u64,
    prompt_len: usize,
    /// `prompt_logprobs = k`: score every prompt position after the first.
    prompt_logprobs: Option<u32>,
    /// With `prompt_logprobs`: what predicts this chunk's first token from the previous chunk's
    /// last position (the worker sees one chunk at a time): its final hidden state `[1, hidden]`
    /// on the CPU engine, this rank's logits `[1, V / world]` (host) on the GPU engine.
    carry: Option<Tensor>,
}

/// What a step computed for the sampling rows and the prompt jobs.
struct StepOutput {
    tokens: Vec<crate::sampling::SampledToken>,
    /// Per job: the entries, and the row it carries on.
    prompt: Vec<(Vec<PromptLogprob>, Option<Tensor>)>,
}

/// Where the model runs.
enum Backend {
    /// The f32 reference on the CPU (candle).
    Cpu {
        model: Box<R4bModel>,
        kv: PagedKvCache,
    },
    /// The bf16 engine on a CUDA GPU.
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::gpu::GpuModel>),
}

impl Backend {
    fn config(&self) -> &RConfig {
        match self {
            Backend::Cpu { model, .. } => model.config(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(m) => m.config(),
        }
    }

    fn shard(&self) -> crate::parallel::Shard {
        match self {
            Backend::Cpu { model, .. } => model.shard(),
            #[cfg(feature = "cuda")]
            Backend::Gpu(m) => m.shard(),
        }
    }

    fn encode_image(&self, views: &PixelViews) -> Result<ImageRows> {
        match self {
            Backend::Cpu { model, .. } => Ok(ImageRows::Host(model.encode_image(views)?)),
            #[cfg(feature = "cuda")]
            Backend::Gpu(m) => Ok(ImageRows::Device(m.encode_image(views)?)),
        }
    }

    /// Whether `rows` more image rows fit where the engine keeps them (the GPU engine's image
    /// budget; the CPU engine's host memory is not budgeted). The same answer on every rank.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn check_image_room(&self, rows: usize) -> std::result::Result<(), String> {
        match self {
            Backend::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Gpu(m) => m.check_image_room(rows),
        }
    }

    /// Runs the step, samples one token per `(chunk index, row)` and scores the prompt jobs;
    /// `masks` (when some row is constrained) computes the rows' token masks (structured output)
    /// while the forward runs.
    fn step(
        &mut self,
        chunks: &[SeqChunk],
        rows: &[(usize, SampleRow)],
        masks: Option<&mut MaskFn>,
        jobs: &[PromptJob],
    ) -> Result<StepOutput> {
        match self {
            Backend::Cpu { model, kv } => {
                let all = if jobs.is_empty() {
                    OutputRows::Last
                } else {
                    OutputRows::All
                };
                let hidden = model.forward_step(chunks, kv, all)?;
                let prompt = if jobs.is_empty() {
                    Vec::new()
                } else {
                    score_prompts(model, &hidden, jobs)?
                };
                // The CPU forward already keeps every core busy: the masks (rayon over
                // sequences) follow it instead of contending with it from another thread.
                let masks = masks.map(|f| f()).unwrap_or_default();
                if rows.is_empty() {
                    return Ok(StepOutput {
                        tokens: Vec::new(),
                        prompt,
                    });
                }
                // Row of each sampling chunk: its index (Last), or its last token (All).
                let mut ends = Vec::with_capacity(chunks.len());
                let mut end = 0;
                for c in chunks {
                    end += c.tokens.len();
                    ends.push(end - 1);
                }
                let idx: Vec<u32> = rows
                    .iter()
                    .map(|&(i, _)| match all {
                        OutputRows::Last => i as u32,
                        OutputRows::All => ends[i] as u32,
                    })
                    .collect();
                let idx = Tensor::from_vec(idx, rows.len(), hidden.device())?;
                let hidden = hidden.index_select(&idx, 0)?;
                let srows: Vec<SampleRow> = rows.iter().map(|(_, r)| *r).collect();
                Ok(StepOutput {
                    tokens: model.sample_masked(&hidden, &srows, &masks)?,
                    prompt,
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Gpu(m) => {
                let (tokens, prompt) = m.step_scored(chunks, rows, masks, jobs)?;
                Ok(StepOutput { tokens, prompt })
            }
        }
    }
}

/// Computes one token mask per sample row of a step (`None`: unconstrained).
pub type MaskFn<'a> = dyn FnMut() -> Vec<ShardMask> + Send + 'a;

/// Executes steps for one rank.
pub struct StepExecutor {
    model: Backend,
    pre: ImagePreprocessing,
    comm: Arc<Timed>,
    seqs: HashMap<u64, SeqState>,
    limits: StepLimits,
    /// llguidance over the checkpoint's tokenizer, or why there is none.
    grammars: std::result::Result<GrammarCompiler, String>,
    /// Grammar state of the constrained sequences.
    constraints: HashMap<u64, SeqConstraint>,
}

impl std::fmt::Debug for StepExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepExecutor")
            .field("shard", &self.model.shard())
            .field("seqs", &self.seqs.len())
            .finish()
    }
}

/// The GPU engine's options from `Init` (defaults when absent).
#[cfg(feature = "cuda")]
fn engine_options(req: &pb::InitRequest) -> Result<crate::gpu::EngineOptions> {
    use r4b_kernels::{DecodeAttention, KernelArch, KernelOptions};
    let k = req.kernels.clone().unwrap_or_default();
    let arch = match k.arch.as_str() {
        "" | "auto" => KernelArch::Auto,
        "sm80" => KernelArch::Sm80,
        other => {
            return Err(Error::Gpu(format!(
                "kernel arch `{other}`: expected `auto` or `sm80`"
            )))
        }
    };
    Ok(crate::gpu::EngineOptions {
        kernels: KernelOptions {
            arch,
            pdl: !k.no_pdl,
            prefill_rows: (k.prefill_rows > 0).then_some(k.prefill_rows as usize),
            decode_attention: if k.cuda_core_decode {
                DecodeAttention::CudaCore
            } else {
                DecodeAttention::TensorCore
            },
        },
        host_sampling: k.host_sampling,
        force_nccl: k.force_nccl,
        disable_custom_all_reduce: k.disable_custom_all_reduce,
        placement: Default::default(),
        peer_access: true,
        collective_timeout: Duration::from_secs(u64::from(req.timeout_s.max(1))),
    })
}

/// Converts the proto's sampling message.
pub fn sampling_from_proto(p: &pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs,
    }
}

impl StepExecutor {
    /// Joins the group, loads the shard and allocates the KV cache (blocking).
    pub fn init(req: &pb::InitRequest) -> Result<(Self, pb::InitResponse)> {
        let t0 = Instant::now();
        let dir = std::path::Path::new(&req.checkpoint);
        let cfg = RConfig::from_file(&dir.join("config.json"))?;
        let world = req.world_size as usize;
        cfg.validate_tp(world)?;
        let inner: Arc<dyn Collective> = if world == 1 {
            Arc::new(SingleRank)
        } else {
            Arc::new(SocketCollective::connect(&SocketConfig {
                rendezvous: req.rendezvous.clone().into(),
                rank: req.rank as usize,
                world_size: world,
                timeout: Duration::from_secs(u64::from(req.timeout_s.max(1))),
            })?)
        };
        let comm = Arc::new(Timed {
            inner,
            ns: AtomicU64::new(0),
        });
        let ckpt = Checkpoint::open(dir)?;
        let block_size = req.block_size as usize;
        let (model, num_blocks, per_token) = match req.device.as_str() {
            "" | "cpu" => {
                let model = R4bModel::load(&ckpt, &cfg, comm.clone(), &Device::Cpu)?;
                let per_token = model.kv_shape(1, 1).bytes_per_token();
                let num_blocks = match req.num_blocks {
                    0 => (req.kv_cache_bytes as usize / (per_token * block_size.max(1))).max(1),
                    n => n as usize,
                };
                let kv = model.new_kv_cache(num_blocks, block_size)?;
                let model = Box::new(model);
                (Backend::Cpu { model, kv }, num_blocks, per_token)
            }
            "cuda" => Self::load_gpu(req, &ckpt, &cfg, comm.clone())?,
            other => {
                return Err(Error::Step(format!(
                    "device `{other}`: expected `cpu` or `cuda`"
                )))
            }
        };
        let pre = ImagePreprocessing::from_dir(dir)?;
        let grammars = std::fs::read_to_string(dir.join("tokenizer.json"))
            .map_err(|e| format!("tokenizer.json: {e}"))
            .and_then(|t| GrammarCompiler::from_tokenizer_json(&t).map_err(|e| e.to_string()));
        if let Err(e) = &grammars {
            tracing::warn!("structured output unavailable: {e}");
        }
        let geom = cfg.image_geometry();
        // The GPU engine sized its buffers for `max_model_len` positions.
        let max_positions = match (req.device.as_str(), req.max_model_len) {
            ("cuda", n) if n > 0 => (n as usize).min(cfg.text.max_position_embeddings),
            _ => cfg.text.max_position_embeddings,
        };
        let limits = StepLimits {
            vocab_size: cfg.text.vocab_size,
            max_positions,
            num_blocks,
            block_size: block_size.max(1),
            image_token: cfg.image_token_index,
            geometry: geom.clone(),
        };
        let facts = pb::ModelFacts {
            vocab_size: cfg.text.vocab_size as u32,
            image_token_id: cfg.image_token_index,
            max_position_embeddings: cfg.text.max_position_embeddings as u32,
            tile: geom.tile as u32,
            patch: geom.patch as u32,
            pinpoints: geom
                .pinpoints
                .iter()
                .flat_map(|&(h, w)| [h as u32, w as u32])
                .collect(),
            anyres_max_tiles: geom.max_tiles as u32,
            kv_bytes_per_token: per_token as u64,
        };
        let resp = pb::InitResponse {
            bytes_loaded: ckpt.bytes_read(),
            load_ms: t0.elapsed().as_millis() as u64,
            num_blocks: num_blocks as u32,
            facts: Some(facts),
        };
        Ok((
            StepExecutor {
                model,
                pre,
                comm,
                seqs: HashMap::new(),
                limits,
                grammars,
                constraints: HashMap::new(),
            },
            resp,
        ))
    }

    /// Loads this rank on its GPU (`--device-map`, by default rank % visible GPUs; feature
    /// `cuda`).
    #[cfg(feature = "cuda")]
    fn load_gpu(
        req: &pb::InitRequest,
        ckpt: &Checkpoint,
        cfg: &RConfig,
        comm: Arc<dyn Collective>,
    ) -> Result<(Backend, usize, usize)> {
        let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
        let limits = crate::gpu::GpuLimits {
            max_seqs: or(req.max_num_seqs, 256),
            max_tokens: or(req.max_num_batched_tokens, 8192),
            max_model_len: or(req.max_model_len, cfg.text.max_position_embeddings),
            block_size: req.block_size.max(1) as usize,
            memory_utilization: if req.gpu_memory_utilization > 0.0 {
                f64::from(req.gpu_memory_utilization)
            } else {
                0.9
            },
            num_blocks: req.num_blocks as usize,
            enforce_eager: req.enforce_eager,
        };
        let id = (!req.nccl_id.is_empty()).then_some(req.nccl_id.as_slice());
        let mut options = engine_options(req)?;
        let map = req
            .kernels
            .as_ref()
            .map(|k| k.device_map.as_slice())
            .unwrap_or_default();
        let visible = r4b_kernels::device_count().map_err(crate::gpu::weights::gpu_err)?;
        options.placement = crate::placement::place(
            req.rank as usize,
            req.world_size.max(1) as usize,
            map,
            visible,
        )?;
        options.peer_access = crate::gpu::peer_access(&crate::placement::devices(
            req.world_size.max(1) as usize,
            map,
            visible,
        )?)?;
        let model = crate::gpu::GpuModel::load(ckpt, cfg, comm, id, (limits, options))?;
        let (bytes, secs, gbps) = model.load_report;
        tracing::info!(
            rank = req.rank,
            "weights on GPU: {:.2} GB in {secs:.2} s ({gbps:.2} GB/s); {} KV blocks",
            bytes as f64 / 1e9,
            model.num_blocks()
        );
        let (n, per_token) = (model.num_blocks(), model.kv_bytes_per_token());
        Ok((Backend::Gpu(Box::new(model)), n, per_token))
    }

    #[cfg(not(feature = "cuda"))]
    fn load_gpu(
        _: &pb::InitRequest,
        _: &Checkpoint,
        _: &RConfig,
        _: Arc<dyn Collective>,
    ) -> Result<(Backend, usize, usize)> {
        Err(Error::Gpu(
            "this binary was built without the `cuda` feature (cargo build --features cuda)".into(),
        ))
    }

    /// Runs one step. Rank 0's response carries the sampled tokens. Sequences whose data fail
    /// the admission checks are refused alone (`rejected`); an error is a failure of the rank.
    pub fn step(&mut self, req: &pb::StepRequest) -> Result<pb::StepResponse> {
        let spans = crate::trace::StepSpans::open(req, self.model.shard().rank);
        let resp = self.run_step(req, &spans);
        spans.finish(&resp);
        resp
    }

    fn run_step(
        &mut self,
        req: &pb::StepRequest,
        spans: &crate::trace::StepSpans,
    ) -> Result<pb::StepResponse> {
        let t0 = Instant::now();
        self.comm.ns.store(0, Ordering::Relaxed);
        for id in &req.release_seq_ids {
            self.seqs.remove(id);
            self.constraints.remove(id);
        }
        let mut rejected = Vec::new();
        let mut run = Vec::with_capacity(req.seqs.len());
        for s in &req.seqs {
            match spans.in_scope(s.seq_id, || self.admit(s))? {
                Ok(()) => run.push(s),
                Err(reason) => {
                    tracing::warn!(seq = s.seq_id, %reason, "sequence refused");
                    self.seqs.remove(&s.seq_id);
                    self.constraints.remove(&s.seq_id);
                    rejected.push(pb::SeqRejection {
                        seq_id: s.seq_id,
                        reason,
                    });
                }
            }
        }
        let mut resp = pb::StepResponse {
            step_id: req.step_id,
            rejected,
            ..Default::default()
        };
        if run.is_empty() {
            return Ok(resp);
        }
        let image_id = self.model.config().image_token_index;
        let chunks = run
            .iter()
            .map(|s| chunk(&self.seqs, image_id, s))
            .collect::<Result<Vec<_>>>()?;
        let states: Vec<(usize, &SeqState)> = (0..run.len())
            .filter(|&i| run[i].sample)
            .map(|i| {
                self.seqs
                    .get(&run[i].seq_id)
                    .map(|s| (i, s))
                    .ok_or_else(|| Error::Step("unknown sequence".into()))
            })
            .collect::<Result<_>>()?;
        let rows: Vec<(usize, SampleRow)> = states
            .iter()
            .map(|&(i, s)| {
                (
                    i,
                    SampleRow {
                        params: &s.params,
                        history: &s.history,
                        seed: s.seed,
                    },
                )
            })
            .collect();
        let (start, width) = self.vocab_shard();
        let mut cjobs: Vec<(usize, &mut SeqConstraint)> = Vec::new();
        let mut wanted: HashMap<u64, usize> = rows
            .iter()
            .enumerate()
            .map(|(r, &(i, _))| (run[i].seq_id, r))
            .collect();
        for (id, c) in self.constraints.iter_mut() {
            if let Some(r) = wanted.remove(id) {
                cjobs.push((r, c));
            }
        }
        let n_rows = rows.len();
        let jobs_empty = cjobs.is_empty();
        let mut failed: Vec<(usize, String)> = Vec::new();
        let failed_ref = &mut failed;
        let mut masks = move || -> Vec<ShardMask> {
            use rayon::prelude::*;
            let done: Vec<(usize, std::result::Result<ShardMask, String>)> = cjobs
                .par_iter_mut()
                .map(|(r, c)| {
                    let m = c.mask().map(|m| m.shard_bits(start, width));
                    (*r, m.map_err(|e| format!("structured output: {e}")))
                })
                .collect();
            let mut out: Vec<ShardMask> = vec![None; n_rows];
            for (r, m) in done {
                match m {
                    Ok(m) => out[r] = m,
                    Err(e) => failed_ref.push((r, e)),
                }
            }
            out
        };
        let t_fwd = Instant::now();
        let constrained = !jobs_empty;
        let pjobs = prompt_jobs(&run, &self.seqs);
        let StepOutput { tokens, prompt } =
            self.model
                .step(&chunks, &rows, constrained.then_some(&mut masks), &pjobs)?;
        drop(masks);
        let n_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if n_tokens > chunks.len() {
            tracing::debug!(
                "step {}: {} sequences, {n_tokens} tokens, forward + sample {:.1} ms",
                req.step_id,
                chunks.len(),
                t_fwd.elapsed().as_secs_f64() * 1e3
            );
        }
        drop(chunks);
        // A sequence whose grammar cannot go on fails alone (the same on every rank).
        for (r, reason) in &failed {
            let id = run[rows[*r].0].seq_id;
            tracing::warn!(seq = id, %reason, "sequence refused");
            resp.rejected.push(pb::SeqRejection {
                seq_id: id,
                reason: reason.clone(),
            });
        }
        let failed_rows: Vec<usize> = failed.iter().map(|f| f.0).collect();
        let failed_ids: Vec<u64> = failed_rows.iter().map(|&r| run[rows[r].0].seq_id).collect();
        if self.model.shard().rank == 0 {
            resp.sampled = rows
                .iter()
                .zip(tokens)
                .enumerate()
                .filter(|(r, _)| !failed_rows.contains(r))
                .map(|(_, x)| x)
                .map(|(&(i, _), t)| pb::Sampled {
                    seq_id: run[i].seq_id,
                    token: Some(pb::Token {
                        id: t.id,
                        logprob: t.logprob,
                        top: t
                            .top
                            .into_iter()
                            .map(|(id, logprob)| pb::TopLogprob { id, logprob })
                            .collect(),
                        forced: false,
                    }),
                })
                .collect();
        }
        drop(rows);
        for id in failed_ids {
            self.seqs.remove(&id);
            self.constraints.remove(&id);
        }
        for (job, (entries, keep)) in pjobs.iter().zip(prompt) {
            let seq_id = run[job.chunk].seq_id;
            if let Some(st) = self.seqs.get_mut(&seq_id) {
                st.carry = keep;
            }
            if self.model.shard().rank == 0 && !entries.is_empty() {
                resp.prompt_logprobs.push(pb::SeqPromptLogprobs {
                    seq_id,
                    entries: job
                        .targets
                        .iter()
                        .zip(entries)
                        .map(|(&(position, _, _), e)| pb::PromptLogprob {
                            position,
                            id: e.id,
                            logprob: e.logprob,
                            rank: e.rank,
                            top: e
                                .top
                                .into_iter()
                                .map(|(id, logprob)| pb::TopLogprob { id, logprob })
                                .collect(),
                        })
                        .collect(),
                });
            }
        }
        resp.forward_ns = t0.elapsed().as_nanos() as u64;
        resp.collective_ns = self.comm.ns.load(Ordering::Relaxed);
        Ok(resp)
    }

    /// Records a sequence's first chunk (sampling, history), encodes the images the step
    /// brings, and this chunk's tokens. The inner `Err` refuses the sequence (its data cannot
    /// run); the outer one fails the rank.
    fn admit(&mut self, s: &pb::SeqStep) -> Result<std::result::Result<(), String>> {
        if let Some(p) = &s.sampling {
            if let Err(reason) = self.limits.check_first_chunk(s, p) {
                return Ok(Err(reason));
            }
            let params = sampling_from_proto(p);
            let prompt_len = s.prompt_len as usize;
            let mut history = TokenHistory::default();
            for (i, &t) in s.history.iter().enumerate() {
                if i < prompt_len {
                    history.push_prompt(t);
                } else {
                    history.push_output(t);
                }
            }
            let seed = params.seed.unwrap_or(s.seq_id);
            self.constraints.remove(&s.seq_id);
            if let Some(c) = &s.constraint {
                let output = s.history.get(prompt_len..).unwrap_or_default();
                match self.new_constraint(c, output) {
                    Ok(sc) => {
                        self.constraints.insert(s.seq_id, sc);
                    }
                    Err(reason) => return Ok(Err(reason)),
                }
            }
            self.seqs.insert(
                s.seq_id,
                SeqState {
                    image_rows: Vec::new(),
                    params,
                    history,
                    seed,
                    prompt_len,
                    prompt_logprobs: p.prompt_logprobs,
                    carry: None,
                },
            );
        }
        if !self.seqs.contains_key(&s.seq_id) {
            return Ok(Err(format!(
                "sequence {} has no state (its first chunk never came)",
                s.seq_id
            )));
        }
        if !s.images.is_empty() {
            if let Err(reason) = self.limits.check_images(&s.images) {
                return Ok(Err(reason));
            }
            let rows = s.images.iter().map(|i| i.num_tokens as usize).sum();
            if let Err(reason) = self.model.check_image_room(rows) {
                return Ok(Err(reason));
            }
            let t = Instant::now();
            let rows = tracing::info_span!("vision encode", images = s.images.len())
                .in_scope(|| self.encode_images(&s.images))?;
            tracing::debug!(
                seq = s.seq_id,
                "encoded {} image(s) in {:.1} ms",
                s.images.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            if let Some(st) = self.seqs.get_mut(&s.seq_id) {
                st.image_rows.extend(rows);
            }
        }
        let Some(st) = self.seqs.get_mut(&s.seq_id) else {
            return Ok(Err(format!("sequence {} has no state", s.seq_id)));
        };
        let mut rows = 0;
        for r in &st.image_rows {
            rows += r.rows()?;
        }
        if let Err(reason) = self.limits.check_chunk(s, rows, st.prompt_len) {
            return Ok(Err(reason));
        }
        for (i, &t) in s.tokens.iter().enumerate() {
            if s.start_pos as usize + i < st.prompt_len {
                st.history.push_prompt(t);
            } else {
                st.history.push_output(t);
                if let Some(c) = self.constraints.get_mut(&s.seq_id) {
                    if let Err(e) = c.consume(t) {
                        return Ok(Err(format!("structured output: {e}")));
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// A sequence's grammar state, after the output it already has (a preempted sequence).
    fn new_constraint(
        &self,
        c: &pb::Constraint,
        output: &[u32],
    ) -> std::result::Result<SeqConstraint, String> {
        let compiler = self
            .grammars
            .as_ref()
            .map_err(|e| format!("structured output unavailable: {e}"))?;
        let mut sc =
            SeqConstraint::new(compiler, c).map_err(|e| format!("structured output: {e}"))?;
        for &t in output {
            sc.consume(t)
                .map_err(|e| format!("structured output: {e}"))?;
        }
        Ok(sc)
    }

    /// This rank's vocabulary columns: `(first global id, width)`.
    fn vocab_shard(&self) -> (u32, usize) {
        let world = self.model.shard().world.max(1);
        let width = self.model.config().text.vocab_size / world;
        let start = self.model.shard().rank * width;
        (u32::try_from(start).unwrap_or(u32::MAX), width)
    }

    /// Each image's `<image>` rows, in order (an error drops, and so frees, those already
    /// encoded).
    fn encode_images(&self, images: &[pb::Image]) -> Result<Vec<ImageRows>> {
        let mut rows = Vec::with_capacity(images.len());
        for img in images {
            let views = PixelViews::from_u8_chw(
                &img.views_u8,
                img.views as usize,
                img.tile as usize,
                (img.height as usize, img.width as usize),
                &self.pre.norm,
            )?;
            let r = self.model.encode_image(&views)?;
            if r.rows()? != img.num_tokens as usize {
                return Err(Error::Step(format!(
                    "image {}x{} gives {} rows, the request expected {}",
                    img.width,
                    img.height,
                    r.rows()?,
                    img.num_tokens
                )));
            }
            rows.push(r);
        }
        Ok(rows)
    }
}

/// The prompt positions each chunk of `run` scores (sequences with `prompt_logprobs`; see
/// [`PromptJob::plan`]).
fn prompt_jobs(run: &[&pb::SeqStep], seqs: &HashMap<u64, SeqState>) -> Vec<PromptJob> {
    let mut jobs = Vec::new();
    let mut offset = 0;
    for (i, s) in run.iter().enumerate() {
        let base = offset;
        offset += s.tokens.len();
        let Some(st) = seqs.get(&s.seq_id) else {
            continue;
        };
        let Some(k) = st.prompt_logprobs else {
            continue;
        };
        let chunk = ChunkSpan {
            index: i,
            row: base,
            start: s.start_pos as usize,
            tokens: &s.tokens,
            prompt_len: st.prompt_len,
        };
        jobs.extend(PromptJob::plan(&chunk, k as usize, st.carry.as_ref()));
    }
    jobs
}

/// The chunk of `s` over its sequence's state in `seqs` (the chunk borrows the image rows).
fn chunk<'a>(
    seqs: &'a HashMap<u64, SeqState>,
    image_id: u32,
    s: &'a pb::SeqStep,
) -> Result<SeqChunk<'a>> {
    let st = seqs
        .get(&s.seq_id)
        .ok_or_else(|| Error::Step(format!("unknown sequence {}", s.seq_id)))?;
    let mut chunk = SeqChunk {
        tokens: &s.tokens,
        start_pos: s.start_pos as usize,
        block_table: &s.block_table,
        prompt_tokens: st.prompt_len.saturating_sub(s.start_pos as usize),
        image_rows: None,
    };
    let n = chunk.image_count(image_id);
    if n > 0 {
        chunk.image_rows = Some(ChunkImageRows::select(
            &st.image_rows,
            s.image_row_offset as usize,
            n,
        )?);
    }
    Ok(chunk)
}

type Job = (pb::StepRequest, oneshot::Sender<Result<pb::StepResponse>>);

/// The tonic service: forwards init and steps to the executor thread.
#[derive(Clone)]
pub struct WorkerService {
    inner: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
    shutdown: Arc<tokio::sync::Notify>,
    rank: Arc<AtomicU64>,
}

impl Default for WorkerService {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerService {
    /// A service with no shard loaded yet.
    pub fn new() -> Self {
        WorkerService {
            inner: Arc::new(Mutex::new(None)),
            shutdown: Arc::new(tokio::sync::Notify::new()),
            rank: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Resolves when `Shutdown` was called.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    fn sender(&self) -> std::result::Result<mpsc::Sender<Job>, Status> {
        self.inner
            .lock()
            .map_err(|_| Status::internal("worker state poisoned"))?
            .clone()
            .ok_or_else(|| Status::failed_precondition("Init has not completed"))
    }
}

fn status(e: Error) -> Status {
    match e {
        Error::Step(_) | Error::Kv(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> std::result::Result<Response<pb::InitResponse>, Status> {
        let req = request.into_inner();
        self.rank.store(u64::from(req.rank), Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("r4b-rank{}", req.rank))
            .spawn(move || {
                let mut exec = match StepExecutor::init(&req) {
                    Ok((exec, resp)) => {
                        let _ = ready_tx.send(Ok(resp));
                        exec
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some((step, reply)) = rx.blocking_recv() {
                    let _ = reply.send(exec.step(&step));
                }
            })
            .map_err(|e| Status::internal(format!("spawning the executor thread: {e}")))?;
        let resp = ready_rx
            .await
            .map_err(|_| Status::internal("executor thread died during init"))?
            .map_err(status)?;
        *self
            .inner
            .lock()
            .map_err(|_| Status::internal("worker state poisoned"))? = Some(tx);
        Ok(Response::new(resp))
    }

    type StepStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::StepResponse, Status>> + Send>>;

    async fn step(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> std::result::Result<Response<Self::StepStream>, Status> {
        let exec = self.sender()?;
        let mut inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let resp = match msg {
                    // The coordinator's side of the stream broke (it exited or the connection
                    // dropped): nothing to answer, not a failed step.
                    Err(e) => {
                        tracing::warn!("step stream from the coordinator ended: {}", e.message());
                        break;
                    }
                    Ok(step) => {
                        tracing::trace!(step = step.step_id, "worker got step");
                        let (tx, rx) = oneshot::channel();
                        if exec.send((step, tx)).await.is_err() {
                            Err(Status::internal("executor thread is gone"))
                        } else {
                            match rx.await {
                                Ok(r) => r.map_err(status),
                                Err(_) => Err(Status::internal("executor thread is gone")),
                            }
                        }
                    }
                };
                let failed = resp.is_err();
                if let Err(e) = &resp {
                    tracing::error!("step failed: {}", e.message());
                }
                if out_tx.send(resp).await.is_err() || failed {
                    tracing::trace!("worker step loop ends");
                    break;
                }
            }
            tracing::trace!("worker inbound ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn health(
        &self,
        _: Request<pb::WorkerHealthRequest>,
    ) -> std::result::Result<Response<pb::WorkerHealthResponse>, Status> {
        let loaded = self.inner.lock().map(|g| g.is_some()).unwrap_or(false);
        Ok(Response::new(pb::WorkerHealthResponse {
            rank: self.rank.load(Ordering::Relaxed) as u32,
            loaded,
        }))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> std::result::Result<Response<pb::ShutdownResponse>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn nccl_id(
        &self,
        _: Request<pb::NcclIdRequest>,
    ) -> std::result::Result<Response<pb::NcclIdResponse>, Status> {
        #[cfg(feature = "cuda")]
        {
            let id = r4b_kernels::nccl_unique_id()
                .map_err(|e| Status::internal(format!("NCCL unique id: {e}")))?;
            Ok(Response::new(pb::NcclIdResponse { id }))
        }
        #[cfg(not(feature = "cuda"))]
        Err(Status::failed_precondition(
            "this worker was built without the `cuda` feature",
        ))
    }
}
