//! `r4b serve`, `r4b gateway`, `r4b coordinator`: flags (vLLM names where the meaning is the
//! same) and the wiring of the crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use r4b_coordinator::{GpuOptions, GroupConfig, Launch, ReplicaConfig};
use r4b_gateway::{AppState, GatewayConfig, ModelFiles};

/// Which checkpoint to serve.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a local directory or a hub id (e.g. YannQi/R-4B). Omitted: the embedded default.
    #[arg(value_name = "MODEL")]
    model_tag: Option<String>,
    /// Same as the positional MODEL.
    #[arg(long)]
    model: Option<String>,
    /// Where the embedded default is written (default: $R4B_CACHE or ~/.cache/r4b).
    #[arg(long, env = "R4B_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Accepted for `vllm serve` compatibility; R-4B needs no remote code here.
    #[arg(long)]
    trust_remote_code: bool,
}

impl ModelArgs {
    async fn dir(&self) -> Result<PathBuf> {
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(crate::default_cache_dir);
        crate::model::resolve(self.model.as_deref().or(self.model_tag.as_deref()), &cache).await
    }
}

/// Replica (coordinator + workers) flags.
#[derive(Args, Debug, Clone)]
pub struct ReplicaArgs {
    /// Worker processes, one per rank (1, 2, 4 or 8).
    #[arg(long, short = 't', default_value_t = 1, visible_alias = "tp")]
    tensor_parallel_size: usize,
    /// Longest prompt + output in tokens (default: the model's max positions).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Token budget of one step (prefill chunks + decodes); default 2048 on CPU, 8192 on CUDA.
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Where the workers run the model: `cpu` (f32 reference) or `cuda` (bf16 GPU engine, one GPU
    /// per rank; needs a binary built with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// KV block size in tokens.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// KV cache memory per rank, GiB (CPU workers).
    #[arg(long, default_value_t = 1.0)]
    kv_cache_space: f64,
    /// Exact number of KV blocks per rank (overrides --kv-cache-space).
    #[arg(long, visible_alias = "num-gpu-blocks-override")]
    num_kv_blocks: Option<u32>,
    /// Requests that may wait for admission; more get HTTP 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Turn prefix caching off (on by default).
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Accepted for vLLM compatibility (prefix caching is on by default).
    #[arg(long)]
    enable_prefix_caching: bool,
    /// Fraction of each GPU's memory for weights, KV cache and scratch (CUDA; CPU workers size
    /// the KV cache with --kv-cache-space).
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f32,
    /// No CUDA graphs for decode steps (CUDA).
    #[arg(long)]
    enforce_eager: bool,
    /// Attach to running workers (host:port, rank order) instead of starting them.
    #[arg(long, value_delimiter = ',')]
    worker_addrs: Vec<String>,
    /// Name clients use as `model` (default: the model argument, or "r4b" for the embedded default).
    #[arg(long)]
    served_model_name: Option<String>,
}

/// Gateway flags.
#[derive(Args, Debug, Clone)]
pub struct GatewayOpts {
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Allow image URLs on loopback / private / link-local addresses.
    #[arg(long)]
    allow_private_image_urls: bool,
    /// Thinking budget for requests that set none.
    #[arg(long)]
    default_max_thinking_tokens: Option<u32>,
    /// Largest request body, MiB (larger → 413).
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
    /// Largest `n`.
    #[arg(long, default_value_t = 8)]
    max_n: u32,
}

/// `r4b serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
    #[command(flatten)]
    gateway: GatewayOpts,
}

/// `r4b gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gateway: GatewayOpts,
    /// Coordinator URLs (http://host:port), comma-separated; requests are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    coordinator: Vec<String>,
    /// Name clients use as `model` (default: the coordinator's).
    #[arg(long)]
    served_model_name: Option<String>,
}

/// `r4b coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Address of the Coordinator gRPC service.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

fn served_name(explicit: Option<&str>, model: &ModelArgs) -> String {
    explicit
        .map(String::from)
        .or_else(|| model.model.clone().or_else(|| model.model_tag.clone()))
        .unwrap_or_else(|| "r4b".to_string())
}

fn replica_config(r: &ReplicaArgs, m: &ModelArgs, checkpoint: PathBuf) -> Result<ReplicaConfig> {
    if r.enable_prefix_caching && r.no_enable_prefix_caching {
        bail!("--enable-prefix-caching and --no-enable-prefix-caching contradict each other");
    }
    let launch = if r.worker_addrs.is_empty() {
        Launch::Spawn {
            exe: std::env::current_exe().context("locating the r4b binary")?,
            tp: r.tensor_parallel_size,
            args: Vec::new(),
        }
    } else {
        if r.worker_addrs.len() != r.tensor_parallel_size {
            bail!(
                "--worker-addrs lists {} workers for --tensor-parallel-size {}",
                r.worker_addrs.len(),
                r.tensor_parallel_size
            );
        }
        Launch::Attach {
            addrs: r.worker_addrs.clone(),
        }
    };
    if r.kv_cache_space.is_nan() || r.kv_cache_space <= 0.0 {
        bail!("--kv-cache-space must be positive");
    }
    if !(r.gpu_memory_utilization > 0.0 && r.gpu_memory_utilization <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1]");
    }
    let max_num_batched_tokens =
        r.max_num_batched_tokens
            .unwrap_or(if r.device == "cuda" { 8192 } else { 2048 });
    Ok(ReplicaConfig {
        group: GroupConfig {
            launch,
            checkpoint,
            block_size: r.block_size,
            kv_cache_bytes: (r.kv_cache_space * (1u64 << 30) as f64) as u64,
            num_blocks: r.num_kv_blocks,
            peer_timeout: Duration::from_secs(600),
            device: r.device.clone(),
            gpu: GpuOptions {
                max_num_seqs: r.max_num_seqs as u32,
                max_num_batched_tokens: max_num_batched_tokens as u32,
                max_model_len: r.max_model_len.unwrap_or(0) as u32,
                gpu_memory_utilization: r.gpu_memory_utilization,
                enforce_eager: r.enforce_eager,
            },
        },
        served_model_name: served_name(r.served_model_name.as_deref(), m),
        max_model_len: r.max_model_len,
        max_num_seqs: r.max_num_seqs,
        max_num_batched_tokens,
        max_queue: r.max_queue,
        enable_prefix_caching: !r.no_enable_prefix_caching,
    })
}

fn gateway_config(g: &GatewayOpts, served_model_name: String) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(served_model_name);
    cfg.allow_private_image_urls = g.allow_private_image_urls;
    cfg.default_max_thinking_tokens = g.default_max_thinking_tokens;
    cfg.body_limit_bytes = g.max_body_mb << 20;
    cfg.max_n = g.max_n;
    cfg
}

/// Starts the replica and serves its Coordinator gRPC service on `listener` in the background.
async fn start_coordinator(
    cfg: ReplicaConfig,
    listener: tokio::net::TcpListener,
) -> Result<r4b_coordinator::Replica> {
    let tp = cfg.group.launch.clone();
    let replica = r4b_coordinator::start_replica(cfg)
        .await
        .with_context(|| format!("starting the replica ({tp:?})"))?;
    let service = replica.service.clone().into_server();
    tokio::spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = tonic::transport::Server::builder()
            .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
            .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("coordinator gRPC server: {e}");
        }
    });
    Ok(replica)
}

async fn serve_http(state: AppState, g: &GatewayOpts) -> Result<()> {
    let addr = format!("{}:{}", g.host, g.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("r4b: OpenAI API on http://{}", listener.local_addr()?);
    // Small SSE chunks and responses must not wait for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, r4b_gateway::router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("HTTP server")
}

/// `r4b serve`: gateway + coordinator here, workers as child processes.
pub async fn serve(a: ServeArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = a.model.dir().await?;
    // Tokenizer checks refuse before any worker starts.
    let files = ModelFiles::load(&dir).context("loading tokenizer and chat template")?;
    let cfg = replica_config(&a.replica, &a.model, dir.clone())?;
    let name = cfg.served_model_name.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coord_url = format!("http://{}", listener.local_addr()?);
    let replica = start_coordinator(cfg, listener).await?;
    eprintln!(
        "r4b: model {} (tp {}, {} KV blocks of {} tokens, max_model_len {}) loaded in {:.2} s",
        dir.display(),
        replica.info.tensor_parallel_size,
        replica.info.num_blocks,
        replica.info.block_size,
        replica.info.max_model_len,
        t0.elapsed().as_secs_f64()
    );
    let state = AppState::connect(gateway_config(&a.gateway, name), files, vec![coord_url]).await?;
    serve_http(state, &a.gateway).await
}

/// `r4b gateway`.
pub async fn gateway(a: GatewayArgs) -> Result<()> {
    let dir = a.model.dir().await?;
    let files = ModelFiles::load(&dir).context("loading tokenizer and chat template")?;
    let name = a.served_model_name.clone().unwrap_or_default();
    let state = AppState::connect(
        gateway_config(&a.gateway, name),
        files,
        a.coordinator.clone(),
    )
    .await?;
    serve_http(state, &a.gateway).await
}

/// `r4b coordinator`.
pub async fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let dir = a.model.dir().await?;
    let cfg = replica_config(&a.replica, &a.model, dir)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    eprintln!("r4b: coordinator on {}", listener.local_addr()?);
    let _replica = start_coordinator(cfg, listener).await?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
