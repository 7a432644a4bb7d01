//! The worker group of one replica: starts `N` worker processes (or attaches to given
//! addresses), sends each its shard plan (`Init`), then drives one bidirectional `Step` stream
//! per rank. Every step goes to every rank; the group waits for all answers (so a failing rank is
//! seen at once) and returns rank 0's, which carries the sampled tokens.
//!
//! A group fails as a whole: a worker process that exits (its watcher reports it at once, see
//! [`process`]), a step stream that breaks, a step that misses its deadline, or ranks that
//! disagree. The engine then kills and reaps every process ([`WorkerGroup::kill`]) and starts
//! a new group; nothing here retries.

mod process;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use r4b_proto::auth::{AttachSecret, AuthChannel, Secret};
use r4b_proto::v1 as pb;
use r4b_proto::v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

pub use process::describe;
use process::{spawn_worker, Exit, Supervised};

/// Line a worker prints on stdout once it listens: `R4B_WORKER_LISTENING <host:port>`.
pub const LISTENING_PREFIX: &str = "R4B_WORKER_LISTENING ";

/// Errors of the worker group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A worker process could not be started or did not report its address.
    #[error("starting worker rank {rank}: {reason}")]
    Spawn { rank: usize, reason: String },
    /// A worker could not be reached.
    #[error("connecting to worker rank {rank} at {addr}: {reason}")]
    Connect {
        rank: usize,
        addr: String,
        reason: String,
    },
    /// A worker's RPC failed.
    #[error("worker rank {rank}: {status}")]
    Rpc {
        rank: usize,
        status: Box<tonic::Status>,
    },
    /// A worker's step stream ended or answered out of order.
    #[error("worker rank {rank}: step stream {reason}")]
    Stream { rank: usize, reason: String },
    /// The configuration cannot work.
    #[error("worker group: {0}")]
    Config(String),
    /// A worker process ended.
    #[error("worker rank {rank} {how}")]
    Exited {
        /// The rank.
        rank: usize,
        /// How it ended (`killed by signal 9 (SIGKILL)`, ...).
        how: String,
    },
    /// A step did not finish within its deadline (a frozen rank or collective).
    #[error("step {step_id} ({tokens} tokens) did not finish within its deadline of {deadline:?}")]
    Deadline {
        /// The step.
        step_id: u64,
        /// Tokens in the step.
        tokens: usize,
        /// The deadline it missed.
        deadline: Duration,
    },
    /// Ranks answered a step differently where they must agree.
    #[error("worker rank {rank} disagrees with rank 0: {reason}")]
    Diverged {
        /// The rank.
        rank: usize,
        /// What differs.
        reason: String,
    },
}

/// How the ranks come to exist.
#[derive(Clone, Debug)]
pub enum Launch {
    /// Start `tp` child processes: `exe worker --listen 127.0.0.1:0` (plus `args`).
    Spawn {
        /// The `r4b` binary.
        exe: PathBuf,
        /// Tensor-parallel size.
        tp: usize,
        /// Extra arguments after `worker`.
        args: Vec<String>,
    },
    /// Use already running workers, rank `i` at `addrs[i]` (`host:port`).
    Attach {
        /// Worker addresses in rank order.
        addrs: Vec<String>,
    },
}

/// What the group needs to start.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Processes to start or attach.
    pub launch: Launch,
    /// Checkpoint directory (on the workers' host).
    pub checkpoint: PathBuf,
    /// KV block size in tokens.
    pub block_size: u32,
    /// KV bytes per rank (when `num_blocks` is None).
    pub kv_cache_bytes: u64,
    /// Explicit KV block count.
    pub num_blocks: Option<u32>,
    /// How long ranks wait for each other (collective timeout).
    pub peer_timeout: Duration,
    /// How long starting the group (spawn, connect, load, allocate) may take before it counts
    /// as failed.
    pub start_timeout: Duration,
    /// Where the workers run the model: "cpu" or "cuda".
    pub device: String,
    /// GPU engine sizing and options (ignored on CPU).
    pub gpu: GpuOptions,
    /// What every call to a worker carries; spawned workers get it in their environment and
    /// refuse calls without it (`r4b_proto::auth`).
    pub secret: Secret,
}

/// What a GPU worker sizes its buffers and KV cache for.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Most sequences per step.
    pub max_num_seqs: u32,
    /// Most tokens per step.
    pub max_num_batched_tokens: u32,
    /// Longest sequence (0 = the model's max positions).
    pub max_model_len: u32,
    /// Fraction of device memory for weights, KV cache and scratch.
    pub gpu_memory_utilization: f32,
    /// No CUDA graphs.
    pub enforce_eager: bool,
    /// Kernel choices (the binary's flags and environment overrides).
    pub kernels: pb::GpuKernelOptions,
}

/// Timings of one step.
#[derive(Clone, Debug, Default)]
pub struct StepTiming {
    /// From sending the step to the last rank's answer.
    pub wall: Duration,
    /// Rank 0's forward time.
    pub forward: Duration,
    /// Rank 0's time inside collectives.
    pub collective: Duration,
    /// Every rank's `(forward, collective)` time, by rank.
    pub ranks: Vec<(Duration, Duration)>,
}

struct Rank {
    tx: mpsc::Sender<pb::StepRequest>,
    rx: Streaming<pb::StepResponse>,
}

/// The ranks of one replica.
pub struct WorkerGroup {
    children: Vec<Supervised>,
    /// Exits of spawned workers, reported by their watchers.
    exits: mpsc::UnboundedReceiver<Exit>,
    clients: Vec<WorkerClient<AuthChannel>>,
    ranks: Vec<Rank>,
    /// Model facts reported by rank 0.
    pub facts: pb::ModelFacts,
    /// KV blocks per rank (the smallest any rank allocated).
    pub num_blocks: u32,
    /// Seconds rank 0 took to load its shard.
    pub load_ms: u64,
    /// Bytes each rank read from the checkpoint.
    pub bytes_loaded: Vec<u64>,
}

impl std::fmt::Debug for WorkerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerGroup")
            .field("ranks", &self.ranks.len())
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

impl WorkerGroup {
    /// Starts (or attaches to) the ranks, initialises them together and opens the step streams.
    /// A worker that exits while the group starts fails the start at once.
    pub async fn start(cfg: &GroupConfig) -> Result<Self, GroupError> {
        let (exits_tx, mut exits) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let addrs = match &cfg.launch {
            Launch::Spawn { exe, tp, args } => {
                let mut addrs = Vec::with_capacity(*tp);
                for rank in 0..*tp {
                    let (child, addr) =
                        spawn_worker(exe, rank, args, &cfg.secret, &exits_tx).await?;
                    children.push(child);
                    addrs.push(addr);
                }
                addrs
            }
            Launch::Attach { addrs } => addrs.clone(),
        };
        drop(exits_tx);
        let started = tokio::select! {
            r = Self::connect_and_init(cfg, &addrs) => r,
            Some((rank, how)) = exits.recv() => Err(GroupError::Exited { rank, how }),
            _ = tokio::time::sleep(cfg.start_timeout) => Err(GroupError::Config(format!(
                "the workers did not start within {:?}",
                cfg.start_timeout
            ))),
        };
        let (clients, ranks, inits) = match started {
            Ok(x) => x,
            Err(e) => {
                for c in children {
                    c.kill(KILL_WAIT).await;
                }
                return Err(e);
            }
        };
        let facts = inits[0]
            .facts
            .clone()
            .ok_or_else(|| GroupError::Config("rank 0 reported no model facts".into()))?;
        Ok(WorkerGroup {
            children,
            exits,
            clients,
            ranks,
            facts,
            num_blocks: inits.iter().map(|r| r.num_blocks).min().unwrap_or(0),
            load_ms: inits[0].load_ms,
            bytes_loaded: inits.iter().map(|r| r.bytes_loaded).collect(),
        })
    }

    /// Connects to every rank, sends `Init` to all of them together and opens the step streams.
    async fn connect_and_init(
        cfg: &GroupConfig,
        addrs: &[String],
    ) -> Result<
        (
            Vec<WorkerClient<AuthChannel>>,
            Vec<Rank>,
            Vec<pb::InitResponse>,
        ),
        GroupError,
    > {
        if addrs.is_empty() {
            return Err(GroupError::Config("no workers".into()));
        }
        let mut clients = Vec::with_capacity(addrs.len());
        for (rank, addr) in addrs.iter().enumerate() {
            let url = format!("http://{addr}");
            let channel = Channel::from_shared(url)
                .map_err(|e| GroupError::Connect {
                    rank,
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?
                .tcp_nodelay(true)
                .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
                .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
                .connect()
                .await
                .map_err(|e| GroupError::Connect {
                    rank,
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            clients.push(
                WorkerClient::with_interceptor(channel, AttachSecret::new(Some(&cfg.secret)))
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20),
            );
        }
        let world = clients.len() as u32;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let rendezvous =
            std::env::temp_dir().join(format!("r4b-{}-{stamp}.sock", std::process::id()));
        // GPU groups: rank 0 makes the NCCL id, every rank's Init carries it.
        let nccl_id = if cfg.device == "cuda" && world > 1 {
            let mut c0 = clients[0].clone();
            c0.nccl_id(pb::NcclIdRequest {})
                .await
                .map_err(|s| GroupError::Rpc {
                    rank: 0,
                    status: Box::new(s),
                })?
                .into_inner()
                .id
        } else {
            Vec::new()
        };
        let inits = clients.iter().enumerate().map(|(rank, c)| {
            let mut c = c.clone();
            let req = pb::InitRequest {
                checkpoint: cfg.checkpoint.to_string_lossy().into_owned(),
                rank: rank as u32,
                world_size: world,
                rendezvous: rendezvous.to_string_lossy().into_owned(),
                block_size: cfg.block_size,
                kv_cache_bytes: cfg.kv_cache_bytes,
                timeout_s: cfg.peer_timeout.as_secs().max(1) as u32,
                num_blocks: cfg.num_blocks.unwrap_or(0),
                device: cfg.device.clone(),
                nccl_id: nccl_id.clone(),
                max_num_seqs: cfg.gpu.max_num_seqs,
                max_num_batched_tokens: cfg.gpu.max_num_batched_tokens,
                max_model_len: cfg.gpu.max_model_len,
                gpu_memory_utilization: cfg.gpu.gpu_memory_utilization,
                enforce_eager: cfg.gpu.enforce_eager,
                kernels: Some(cfg.gpu.kernels.clone()),
            };
            async move {
                c.init(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| GroupError::Rpc {
                        rank,
                        status: Box::new(s),
                    })
            }
        });
        let inits = futures::future::join_all(inits)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mut ranks = Vec::with_capacity(clients.len());
        for (rank, c) in clients.iter().enumerate() {
            let (tx, rx) = mpsc::channel(4);
            let resp =
                c.clone()
                    .step(ReceiverStream::new(rx))
                    .await
                    .map_err(|s| GroupError::Rpc {
                        rank,
                        status: Box::new(s),
                    })?;
            ranks.push(Rank {
                tx,
                rx: resp.into_inner(),
            });
        }
        Ok((clients, ranks, inits))
    }

    /// Process ids of the spawned ranks, in rank order (empty when attached).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|c| c.pid).collect()
    }

    /// Tensor-parallel size.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Runs one step on every rank; returns rank 0's answer and the timings. Fails when a rank
    /// exits, a stream breaks, the ranks disagree on which sequences they refused, or the step
    /// takes longer than `deadline`.
    pub async fn step(
        &mut self,
        req: pb::StepRequest,
        deadline: Duration,
    ) -> Result<(pb::StepResponse, StepTiming), GroupError> {
        let step_id = req.step_id;
        let tokens = req.seqs.iter().map(|s| s.tokens.len()).sum();
        let WorkerGroup { ranks, exits, .. } = self;
        tokio::select! {
            r = step_all(ranks, req) => r,
            Some((rank, how)) = exits.recv() => Err(GroupError::Exited { rank, how }),
            _ = tokio::time::sleep(deadline) => Err(GroupError::Deadline { step_id, tokens, deadline }),
        }
    }

    /// Resolves when the idle group fails: a worker process exits, or a step stream ends or
    /// answers while no step is outstanding. Cancel-safe (call it in a `select!`).
    pub async fn wait_failure(&mut self) -> GroupError {
        let WorkerGroup { ranks, exits, .. } = self;
        let streams = futures::future::select_all(
            ranks
                .iter_mut()
                .enumerate()
                .map(|(rank, r)| Box::pin(async move { (rank, r.rx.message().await) })),
        );
        tokio::select! {
            Some((rank, how)) = exits.recv() => GroupError::Exited { rank, how },
            ((rank, msg), _, _) = streams => match msg {
                Ok(Some(m)) => GroupError::Stream {
                    rank,
                    reason: format!("answered step {} while none was running", m.step_id),
                },
                Ok(None) => GroupError::Stream { rank, reason: "ended".into() },
                Err(s) => GroupError::Rpc { rank, status: Box::new(s) },
            },
        }
    }

    /// Kills every spawned rank (SIGKILL) and reaps it; asks attached ranks to exit (whoever
    /// runs them restarts them). For a failed group: nothing is waited for beyond that.
    pub async fn kill(mut self) {
        self.ranks.clear();
        if self.children.is_empty() {
            self.shutdown_attached().await;
        }
        for child in self.children.drain(..) {
            child.kill(KILL_WAIT).await;
        }
    }

    /// Asks every rank to exit, then waits briefly for spawned processes (killing laggards).
    pub async fn shutdown(mut self) {
        self.ranks.clear();
        self.shutdown_attached().await;
        for child in self.children.drain(..) {
            child.wait_or_kill(KILL_WAIT).await;
        }
    }

    async fn shutdown_attached(&mut self) {
        let calls = self.clients.iter_mut().map(|c| {
            tokio::time::timeout(Duration::from_secs(1), c.shutdown(pb::ShutdownRequest {}))
        });
        futures::future::join_all(calls).await;
    }
}

/// How long a killed or shut-down worker may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Sends `req` to every rank and reads every answer (see [`WorkerGroup::step`]).
async fn step_all(
    ranks: &mut [Rank],
    req: pb::StepRequest,
) -> Result<(pb::StepResponse, StepTiming), GroupError> {
    let t0 = Instant::now();
    let step_id = req.step_id;
    // Every rank but the last gets a copy; the last one takes the request itself.
    let last = ranks.len().saturating_sub(1);
    let mut req = Some(req);
    for (rank, r) in ranks.iter().enumerate() {
        let msg = if rank == last {
            req.take()
        } else {
            req.clone()
        };
        let Some(msg) = msg else { break };
        r.tx.send(msg).await.map_err(|_| GroupError::Stream {
            rank,
            reason: "is closed".into(),
        })?;
    }
    tracing::trace!(step_id, "sent to all ranks");
    let mut rank0: Option<pb::StepResponse> = None;
    let mut per_rank = Vec::with_capacity(ranks.len());
    for (rank, r) in ranks.iter_mut().enumerate() {
        let resp = match r.rx.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(GroupError::Stream {
                    rank,
                    reason: "ended".into(),
                })
            }
            Err(s) => {
                return Err(GroupError::Rpc {
                    rank,
                    status: Box::new(s),
                })
            }
        };
        if resp.step_id != step_id {
            return Err(GroupError::Stream {
                rank,
                reason: format!("answered step {} for step {step_id}", resp.step_id),
            });
        }
        per_rank.push((
            Duration::from_nanos(resp.forward_ns),
            Duration::from_nanos(resp.collective_ns),
        ));
        match &rank0 {
            None => rank0 = Some(resp),
            Some(r0) => {
                let ids =
                    |r: &pb::StepResponse| r.rejected.iter().map(|x| x.seq_id).collect::<Vec<_>>();
                if ids(r0) != ids(&resp) {
                    return Err(GroupError::Diverged {
                        rank,
                        reason: format!(
                            "refused sequences {:?}, rank 0 refused {:?}",
                            ids(&resp),
                            ids(r0)
                        ),
                    });
                }
            }
        }
    }
    let rank0 = rank0.ok_or_else(|| GroupError::Config("no ranks".into()))?;
    let timing = StepTiming {
        wall: t0.elapsed(),
        forward: Duration::from_nanos(rank0.forward_ns),
        collective: Duration::from_nanos(rank0.collective_ns),
        ranks: per_rank,
    };
    Ok((rank0, timing))
}
