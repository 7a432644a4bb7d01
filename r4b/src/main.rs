//! `r4b`: one binary for every role of r4b-serve.
//!
//! - `r4b serve [MODEL]`: all-in-one — gateway + coordinator in this process, N workers as child
//!   processes. Flags follow `vllm serve` where the meaning is the same.
//! - `r4b gateway`, `r4b coordinator`, `r4b worker`: the roles on their own.
//! - `r4b inspect [MODEL]`: the resolved model and what `serve` would refuse, without serving.
//!
//! With no model, `serve` uses the embedded default: a tiny R-4B-shaped model with deterministic
//! weights, written on first run into the cache directory.

mod discovery;
mod inspect;
mod metrics_http;
mod model;
mod options;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// r4b-serve: an OpenAI-compatible serving cluster for R-4B.
#[derive(Parser, Debug)]
#[command(name = "r4b", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Export traces over OTLP/gRPC to this endpoint (vLLM's flag; the same as
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which spawned workers inherit). With neither this nor
    /// an `OTEL_EXPORTER_OTLP_*ENDPOINT` variable set, nothing is traced.
    #[arg(long, global = true, value_name = "URL")]
    otlp_traces_endpoint: Option<String>,
}

impl Cmd {
    /// Whether the role records metrics (gateway, coordinator); ranks and `inspect` do not.
    fn has_metrics(&self) -> bool {
        matches!(self, Cmd::Serve(_) | Cmd::Gateway(_) | Cmd::Coordinator(_))
    }

    /// `service.name` when `OTEL_SERVICE_NAME` does not set one, and the `r4b.role` attribute.
    fn role(&self) -> (&'static str, &'static str) {
        match self {
            Cmd::Serve(_) => ("r4b-serve", "serve"),
            Cmd::Gateway(_) => ("r4b-gateway", "gateway"),
            Cmd::Coordinator(_) => ("r4b-coordinator", "coordinator"),
            Cmd::Worker(_) => ("r4b-worker", "worker"),
            Cmd::Inspect(_) => ("r4b-inspect", "inspect"),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Gateway + coordinator + N worker processes, all on this host.
    Serve(serve::ServeArgs),
    /// The OpenAI HTTP gateway alone, in front of running coordinators.
    Gateway(serve::GatewayArgs),
    /// One replica's coordinator alone (starts or attaches to its workers).
    Coordinator(serve::CoordinatorArgs),
    /// One worker rank (normally started by the coordinator).
    Worker(WorkerArgs),
    /// Print the resolved model (values and their sources, bytes per rank, tokens); exit
    /// non-zero on anything `serve` would refuse.
    Inspect(inspect::InspectArgs),
}

/// `r4b worker` flags.
#[derive(Args, Debug)]
struct WorkerArgs {
    /// Address to listen on; port 0 picks a free port. The chosen address is printed on stdout
    /// as `R4B_WORKER_LISTENING <addr>`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Exit when stdin closes (the coordinator that started this worker holds its other end,
    /// so the worker never outlives it).
    #[arg(long)]
    exit_with_parent: bool,
}

/// Logs (fmt, filtered by `R4B_LOG`) and, when the `OTEL_*` variables ask for them, the OTLP trace
/// layer (every span at INFO and above, whatever `R4B_LOG` says) and the OTLP meter provider.
/// Must run inside the runtime.
fn init_tracing(
    service: &str,
    role: &str,
    has_metrics: bool,
) -> Result<Option<r4b_telemetry::Pipeline>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("R4B_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let pipeline = r4b_telemetry::Pipeline::from_env(service, role, has_metrics)?;
    let otel = pipeline
        .as_ref()
        .and_then(|p| p.layer())
        .map(|l| l.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(pipeline)
}

async fn run_worker(args: WorkerArgs) -> Result<()> {
    // Only its coordinator knows the secret (it sets the variable when it spawns the worker).
    let secret = r4b_proto::auth::Secret::from_env()
        .context(r4b_proto::auth::SECRET_ENV)?
        .with_context(|| {
            format!(
                "r4b worker needs {} (its coordinator sets it; for attached workers, the \
                 coordinator's --cluster-secret)",
                r4b_proto::auth::SECRET_ENV
            )
        })?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("{}{addr}", r4b_coordinator::workers::LISTENING_PREFIX);
    if args.exit_with_parent {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let service = r4b_worker::service::WorkerService::new();
    let stop = service.clone();
    tonic::transport::Server::builder()
        .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
        .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
        .layer(tonic::service::InterceptorLayer::new(
            r4b_proto::auth::RequireSecret::new(secret),
        ))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                tokio::select! {
                    _ = stop.shutdown_requested() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await
        .context("worker gRPC server")?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(endpoint) = &cli.otlp_traces_endpoint {
        // Before any thread exists; worker processes inherit it.
        std::env::set_var(r4b_telemetry::TRACES_ENDPOINT_ENV, endpoint);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (service, role) = cli.command.role();
    let has_metrics = cli.command.has_metrics();
    let pipeline = rt.block_on(async { init_tracing(service, role, has_metrics) })?;
    let result = rt.block_on(async move {
        match cli.command {
            Cmd::Serve(a) => serve::serve(a).await,
            Cmd::Gateway(a) => serve::gateway(a).await,
            Cmd::Coordinator(a) => serve::coordinator(a).await,
            Cmd::Worker(a) => run_worker(a).await,
            Cmd::Inspect(a) => inspect::inspect(a).await,
        }
    });
    if let Some(p) = pipeline {
        // The runtime still runs: the exporter's last batch goes out.
        p.shutdown();
    }
    result
}

/// The default cache directory: `$R4B_CACHE`, else `$XDG_CACHE_HOME/r4b`, else `~/.cache/r4b`.
fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("R4B_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("r4b");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("r4b")
}
