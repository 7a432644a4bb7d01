//! `r4b serve`, `r4b gateway`, `r4b coordinator`: flags (vLLM names where the meaning is the
//! same) and the wiring of the crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use r4b_coordinator::{
    EngineHandle, GpuOptions, GroupConfig, Launch, ReplicaConfig, RestartPolicy, StepDeadline,
};
use r4b_gateway::server::HttpTimeouts;
use r4b_gateway::{AppState, GatewayConfig, ModelFiles};
use r4b_proto::auth::{RequireSecret, Secret};
use tokio::sync::oneshot;
use tonic::service::InterceptorLayer;

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
    /// Seconds every step may take before the worker group counts as frozen, plus an allowance
    /// per token and image view (larger of a floor and 8x what recent steps took).
    #[arg(long, default_value_t = 15.0)]
    step_timeout: f64,
    /// Seconds a rank waits for its peers inside a collective before it gives up.
    #[arg(long, default_value_t = 60)]
    collective_timeout: u64,
    /// Seconds starting the workers (spawn, load, allocate) may take before the attempt fails.
    #[arg(long, default_value_t = 900)]
    worker_start_timeout: u64,
    /// Worker-group failures tolerated within --worker-restart-window; one more and the process
    /// exits non-zero (so Kubernetes restarts the pod).
    #[arg(long, default_value_t = 5)]
    max_worker_restarts: usize,
    /// Window, in seconds, in which --max-worker-restarts failures are counted.
    #[arg(long, default_value_t = 600)]
    worker_restart_window: u64,
    #[command(flatten)]
    gpu: crate::options::GpuFlags,
}

/// Shutdown flags.
#[derive(Args, Debug, Clone)]
pub struct ShutdownOpts {
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT; those left then end with
    /// an error (SSE: an error event and `[DONE]`). A second signal ends them at once.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

/// Gateway flags.
#[derive(Args, Debug, Clone)]
pub struct GatewayOpts {
    /// Address to bind. 0.0.0.0 by default so that the server is reachable in a container; on a
    /// shared host, bind 127.0.0.1 or set `--api-key` (a warning is logged when neither is done).
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// API key clients must send as `Authorization: Bearer <key>`; repeatable. From the
    /// environment, `R4B_API_KEY` holds one or more keys separated by commas. None: open.
    #[arg(
        long = "api-key",
        env = "R4B_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_key: Vec<String>,
    /// Require the API key on `/health`, `/ready` and `/metrics` too (open by default).
    #[arg(long)]
    auth_probes: bool,
    /// Let special tokens typed in message content (`<|im_end|><|im_start|>system`) act as control
    /// tokens, as before. Off by default: user text is encoded as plain text and only the chat
    /// template places control tokens, so no user can forge a turn.
    #[arg(long)]
    allow_special_tokens_in_content: bool,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Allow image URLs on loopback / private / link-local addresses.
    #[arg(long)]
    allow_private_image_urls: bool,
    /// Hosts (`host` or `host:port`, comma-separated) whose image URLs skip the private-address
    /// guards: your own media servers. Redirects from them are still checked.
    #[arg(long, value_delimiter = ',')]
    allowed_media_hosts: Vec<String>,
    /// Thinking budget for requests that set none.
    #[arg(long)]
    default_max_thinking_tokens: Option<u32>,
    /// Largest request body, MiB (larger → 413).
    #[arg(long, default_value_t = 32)]
    max_body_mb: usize,
    /// Largest `n`.
    #[arg(long, default_value_t = 8)]
    max_n: u32,
    /// Largest image, in pixels (width x height), checked from its header before decoding.
    #[arg(long, default_value_t = 33_177_600)]
    max_image_pixels: u64,
    /// Seconds a client may take to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = 10)]
    http_header_timeout: u64,
    /// How a request picks its replica: `prefix` (where its longest prompt prefix is cached,
    /// unless that replica is overloaded; else least-loaded), `least-loaded` (power of two
    /// choices over load) or `round-robin`.
    #[arg(long, default_value = "prefix")]
    routing: r4b_gateway::replica::Routing,
    /// Prefix-aware routing skips a replica whose load (requests waiting + running) exceeds the
    /// least loaded one's by more than this.
    #[arg(long, default_value_t = 4)]
    prefix_overload_slack: u32,
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
    #[command(flatten)]
    shutdown: ShutdownOpts,
}

/// The secret of the component links (`r4b_proto::auth`), for the split `gateway` and
/// `coordinator` commands (`serve` makes its own).
#[derive(Args, Debug)]
pub struct SecretOpt {
    /// Shared secret every gRPC call between gateway, coordinator and workers carries (16-256
    /// printable ASCII characters, e.g. `openssl rand -hex 32`). Prefer the environment
    /// variable: a command line is visible to every user of the host.
    #[arg(
        long = "cluster-secret",
        env = "R4B_CLUSTER_SECRET",
        hide_env_values = true,
        required = true
    )]
    cluster_secret: String,
}

impl SecretOpt {
    fn secret(&self) -> Result<Secret> {
        Secret::new(&self.cluster_secret).context("--cluster-secret / R4B_CLUSTER_SECRET")
    }
}

/// TLS on the gateway → coordinator link (PEM files; r4b_proto::tls).
#[derive(Args, Debug, Default)]
pub struct TlsOpts {
    /// Certificate chain this process presents (a coordinator: its server certificate; a
    /// gateway: its client certificate for mutual TLS).
    #[arg(long, env = "R4B_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert.
    #[arg(long, env = "R4B_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificates: a coordinator then requires gateways to present a certificate they
    /// signed (mutual TLS); a gateway checks the coordinators' certificates against them.
    #[arg(long, env = "R4B_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl TlsOpts {
    fn files(&self) -> r4b_proto::tls::TlsFiles {
        r4b_proto::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }
}

/// `r4b gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gateway: GatewayOpts,
    /// Coordinator URLs (http://host:port), comma-separated; requests are spread over them
    /// (`--routing`). Or `--etcd`: the coordinators registered there.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    coordinator: Vec<String>,
    #[command(flatten)]
    etcd: crate::discovery::EtcdOpts,
    /// Name clients use as `model` (default: the coordinator's).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    secret: SecretOpt,
    /// TLS to the coordinators (their URLs then start with https://).
    #[command(flatten)]
    tls: TlsOpts,
    #[command(flatten)]
    shutdown: ShutdownOpts,
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
    /// Serve the replica's Prometheus metrics at `GET /metrics` on this port (same host as
    /// --listen). None: not served.
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    #[command(flatten)]
    etcd: crate::discovery::EtcdOpts,
    /// URL gateways reach this coordinator at, as registered in etcd (default: http:// and the
    /// listen address; required when that is 0.0.0.0 or ::, e.g. `http://$(POD_IP):50051`).
    #[arg(long, env = "R4B_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Seconds the etcd registration outlives a coordinator that stopped renewing it (crash).
    #[arg(long, default_value_t = 3)]
    etcd_lease_ttl: i64,
    #[command(flatten)]
    secret: SecretOpt,
    /// TLS on the gRPC port (with --tls-ca: mutual TLS, gateways must present a certificate).
    #[command(flatten)]
    tls: TlsOpts,
    #[command(flatten)]
    shutdown: ShutdownOpts,
}

fn served_name(explicit: Option<&str>, model: &ModelArgs) -> String {
    explicit
        .map(String::from)
        .or_else(|| model.model.clone().or_else(|| model.model_tag.clone()))
        .unwrap_or_else(|| "r4b".to_string())
}

fn replica_config(
    r: &ReplicaArgs,
    m: &ModelArgs,
    checkpoint: PathBuf,
    secret: Secret,
) -> Result<ReplicaConfig> {
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
    if !(r.step_timeout.is_finite() && r.step_timeout > 0.0) {
        bail!("--step-timeout must be a positive number of seconds");
    }
    let step_base = Duration::from_secs_f64(r.step_timeout);
    Ok(ReplicaConfig {
        group: GroupConfig {
            launch,
            checkpoint,
            block_size: r.block_size,
            kv_cache_bytes: (r.kv_cache_space * (1u64 << 30) as f64) as u64,
            num_blocks: r.num_kv_blocks,
            peer_timeout: Duration::from_secs(r.collective_timeout.max(1)),
            start_timeout: Duration::from_secs(r.worker_start_timeout.max(1)),
            device: r.device.clone(),
            gpu: GpuOptions {
                max_num_seqs: r.max_num_seqs as u32,
                max_num_batched_tokens: max_num_batched_tokens as u32,
                max_model_len: r.max_model_len.unwrap_or(0) as u32,
                gpu_memory_utilization: r.gpu_memory_utilization,
                enforce_eager: r.enforce_eager,
                kernels: r.gpu.resolve()?,
            },
            secret,
        },
        served_model_name: served_name(r.served_model_name.as_deref(), m),
        max_model_len: r.max_model_len,
        max_num_seqs: r.max_num_seqs,
        max_num_batched_tokens,
        max_queue: r.max_queue,
        enable_prefix_caching: !r.no_enable_prefix_caching,
        restart: RestartPolicy {
            max_failures: r.max_worker_restarts,
            window: Duration::from_secs(r.worker_restart_window),
        },
        step_deadline: StepDeadline::for_device(&r.device, step_base),
    })
}

fn gateway_config(g: &GatewayOpts, served_model_name: String, secret: Secret) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(served_model_name);
    cfg.cluster_secret = Some(secret);
    cfg.allow_private_image_urls = g.allow_private_image_urls;
    cfg.allowed_media_hosts = g.allowed_media_hosts.clone();
    cfg.default_max_thinking_tokens = g.default_max_thinking_tokens;
    cfg.body_limit_bytes = g.max_body_mb << 20;
    cfg.max_n = g.max_n;
    cfg.max_image_pixels = g.max_image_pixels;
    cfg.api_keys = r4b_gateway::auth::ApiKeys::new(&g.api_key);
    cfg.auth_probes = g.auth_probes;
    cfg.allow_special_tokens_in_content = g.allow_special_tokens_in_content;
    cfg.routing = g.routing;
    cfg.prefix_overload_slack = g.prefix_overload_slack;
    let loopback = g
        .host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
        || g.host == "localhost";
    if !cfg.api_keys.enabled() && !loopback {
        tracing::warn!(
            host = %g.host,
            "the gateway listens beyond loopback without an API key; set --api-key or R4B_API_KEY"
        );
    }
    cfg
}

/// Starts the replica and serves its Coordinator gRPC service on `listener` in the background;
/// calls without the cluster secret get UNAUTHENTICATED.
async fn start_coordinator(
    cfg: ReplicaConfig,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<r4b_coordinator::Replica> {
    let require = InterceptorLayer::new(RequireSecret::new(cfg.group.secret.clone()));
    let tp = cfg.group.launch.clone();
    let replica = r4b_coordinator::start_replica(cfg)
        .await
        .with_context(|| format!("starting the replica ({tp:?})"))?;
    let service = replica.service.clone().into_server();
    tokio::spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("coordinator gRPC server TLS: {e}");
                    return;
                }
            };
        }
        if let Err(e) = builder
            .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
            .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
            .layer(require)
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("coordinator gRPC server: {e}");
        }
    });
    Ok(replica)
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Why a process stops.
enum Stop {
    /// SIGTERM or SIGINT: drain, exit 0.
    Signal,
    /// The replica gave up (too many worker-group failures): exit non-zero.
    Failed(String),
}

/// Waits for a signal, or for the replica to give up.
async fn stop_reason(engine: Option<&EngineHandle>) -> Stop {
    let failed = async {
        match engine {
            Some(e) => e.failed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = termination() => Stop::Signal,
        why = failed => Stop::Failed(why),
    }
}

/// The HTTP side of a process: the gateway router on `g.host:g.port`, with a drain on
/// SIGTERM/SIGINT. `engine` (the in-process replica of `r4b serve`) is drained with it, and
/// its failure ends the process with an error.
async fn serve_http(
    state: AppState,
    g: &GatewayOpts,
    shutdown: &ShutdownOpts,
    engine: Option<EngineHandle>,
) -> Result<()> {
    let addr = format!("{}:{}", g.host, g.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("r4b: OpenAI API on http://{}", listener.local_addr()?);
    let timeouts = HttpTimeouts {
        header_read: Duration::from_secs(g.http_header_timeout.max(1)),
        ..HttpTimeouts::default()
    };
    let (close_tx, close_rx) = oneshot::channel::<()>();
    let router = r4b_gateway::router(state.clone());
    // Its own task: it keeps accepting (and answering 503 and /health) during the drain.
    let mut http = tokio::spawn(r4b_gateway::server::serve(
        listener,
        router,
        timeouts,
        async move {
            let _ = close_rx.await;
        },
    ));
    let stop = tokio::select! {
        r = &mut http => return r.context("HTTP server task")?.context("HTTP server"),
        stop = stop_reason(engine.as_ref()) => stop,
    };
    let timeout = Duration::from_secs(shutdown.shutdown_timeout);
    let failed = match stop {
        Stop::Signal => {
            eprintln!(
                "r4b: draining: no new requests, {} running get up to {timeout:?}",
                state.metrics().running()
            );
            state.shutdown().start_draining();
            let drain = async {
                match &engine {
                    Some(e) => e.drain(timeout).await,
                    None => wait_idle(&state, timeout).await,
                }
            };
            tokio::select! {
                _ = drain => {}
                _ = termination() => eprintln!("r4b: second signal: ending the requests left now"),
            }
            None
        }
        Stop::Failed(why) => Some(why),
    };
    // Whatever is still open ends with an error event and `[DONE]`.
    state.shutdown().end_streams();
    let _ = close_tx.send(());
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    match failed {
        None => {
            eprintln!("r4b: drained, exiting");
            Ok(())
        }
        Some(why) => bail!("the replica gave up: {why}"),
    }
}

/// Waits until this gateway has no generation in flight, or `timeout`.
async fn wait_idle(state: &AppState, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while state.metrics().running() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `r4b serve`: gateway + coordinator here, workers as child processes.
pub async fn serve(a: ServeArgs) -> Result<()> {
    let t0 = Instant::now();
    let dir = a.model.dir().await?;
    // Tokenizer checks refuse before any worker starts.
    let files = ModelFiles::load(&dir).context("loading tokenizer and chat template")?;
    // One process holds both ends of every link: a fresh secret, never shown.
    let secret = Secret::generate().context("generating the cluster secret")?;
    let cfg = replica_config(&a.replica, &a.model, dir.clone(), secret.clone())?;
    let name = cfg.served_model_name.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coord_url = format!("http://{}", listener.local_addr()?);
    let replica = start_coordinator(cfg, listener, None).await?;
    eprintln!(
        "r4b: model {} (tp {}, {} KV blocks of {} tokens, max_model_len {}) loaded in {:.2} s",
        dir.display(),
        replica.info.tensor_parallel_size,
        replica.info.num_blocks,
        replica.info.block_size,
        replica.info.max_model_len,
        t0.elapsed().as_secs_f64()
    );
    let state = AppState::connect(
        gateway_config(&a.gateway, name, secret),
        files,
        vec![coord_url],
    )
    .await?;
    // One process, one scrape: the coordinator's metrics follow the gateway's on `/metrics`.
    let engine = replica.engine.clone();
    state.set_extra_metrics(move || engine.metrics_text());
    serve_http(state, &a.gateway, &a.shutdown, Some(replica.engine.clone())).await
}

/// `r4b gateway`.
pub async fn gateway(a: GatewayArgs) -> Result<()> {
    let dir = a.model.dir().await?;
    let files = ModelFiles::load(&dir).context("loading tokenizer and chat template")?;
    let name = a.served_model_name.clone().unwrap_or_default();
    let source = crate::discovery::gateway_source(&a.etcd, &a.coordinator).await?;
    let mut config = gateway_config(&a.gateway, name, a.secret.secret()?);
    config.coordinator_tls = a.tls.files().client().context("--tls-*")?;
    let state = AppState::connect_with(config, files, source).await?;
    serve_http(state, &a.gateway, &a.shutdown, None).await
}

/// `r4b coordinator`.
pub async fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let dir = a.model.dir().await?;
    let cfg = replica_config(&a.replica, &a.model, dir, a.secret.secret()?)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let local = listener.local_addr()?;
    eprintln!("r4b: coordinator on {local}");
    let url = match (&a.advertise_url, local.ip().is_unspecified()) {
        (Some(u), _) => u.clone(),
        (None, false) => format!("http://{local}"),
        (None, true) if !a.etcd.etcd.is_empty() => {
            bail!("--listen {local} is not an address gateways can dial: set --advertise-url")
        }
        (None, true) => String::new(),
    };
    let tls = a.tls.files().server().context("--tls-*")?;
    let replica = start_coordinator(cfg, listener, tls).await?;
    if let Some(port) = a.metrics_port {
        crate::metrics_http::spawn(SocketAddr::new(a.listen.ip(), port), replica.engine.clone())
            .await?;
    }
    let announced = crate::discovery::announce(
        &a.etcd,
        &url,
        &replica.info,
        &replica.engine,
        a.etcd_lease_ttl,
    )?;
    let stop = stop_reason(Some(&replica.engine)).await;
    // Gateways stop sending here at once (the entry disappears); the drain finishes the rest.
    if let Some(a) = announced {
        a.withdraw().await;
    }
    match stop {
        Stop::Signal => {
            let timeout = Duration::from_secs(a.shutdown.shutdown_timeout);
            eprintln!("r4b: draining: no new requests, running ones get up to {timeout:?}");
            tokio::select! {
                _ = replica.engine.drain(timeout) => {}
                _ = termination() => eprintln!("r4b: second signal: stopping now"),
            }
            Ok(())
        }
        Stop::Failed(why) => bail!("the replica gave up: {why}"),
    }
}
