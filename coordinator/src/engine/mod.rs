//! The replica's engine: one task owns the [`Scheduler`] and the [`WorkerGroup`] and runs the
//! step loop. Requests reach it as [`Command`]s through an [`EngineHandle`]; tokens go back on a
//! per-request channel. A request whose channel closes (client gone) is aborted before the next
//! step and its KV blocks are freed.
//!
//! # Failures
//!
//! * **A sequence the workers refuse** (their admission checks, `StepResponse.rejected`) fails
//!   alone with INVALID_ARGUMENT; the step and the other sequences go on.
//! * **A failed group** (a worker exits, a stream breaks, a step misses its deadline, ranks
//!   disagree): every process is killed and reaped, requests that already streamed tokens (or
//!   were retried once already) fail with UNAVAILABLE, the others are queued again, and a new
//!   group is started in the background while new requests keep queueing. More than
//!   [`RestartPolicy::max_failures`] failures within [`RestartPolicy::window`] and the engine
//!   gives up: [`EngineHandle::failed`] resolves and the process should exit non-zero.
//! * **Drain** ([`Command::Drain`], on SIGTERM): new requests get UNAVAILABLE, running ones finish
//!   until the timeout, then what is left fails with UNAVAILABLE and the workers are shut down.

mod lifecycle;
mod trace;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use r4b_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::deadline::StepDeadline;
use crate::metrics::{Metrics, RequestTimes};
use crate::scheduler::{
    Finish, ImageSpan, Scheduler, SchedulerConfig, SeqId, SeqRequest, StepPlan, Stopping,
    SubmitError,
};
use crate::workers::{GroupConfig, GroupError, WorkerGroup};

/// Messages a request's stream receives.
pub type EventSender = mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>;

/// What the engine is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Admit a request; `ack` answers with its id or why it was refused.
    Submit {
        /// The request.
        req: Box<pb::GenerateRequest>,
        /// Where its tokens go.
        events: EventSender,
        /// Admission result.
        ack: oneshot::Sender<Result<SeqId, Status>>,
        /// The request's span (parented to the caller's trace context); its children are the
        /// queue, prefill-chunk and sampled decode-step spans (`trace.rs`).
        span: tracing::Span,
    },
    /// Drop a request (client gone).
    Abort(SeqId),
    /// The prefix cache's routing keys ([`Scheduler::prefix_keys`]), unless its version is
    /// still `since` (then `None`).
    PrefixKeys {
        /// The version the caller has.
        since: Option<u64>,
        /// Most keys.
        cap: usize,
        /// `(version, keys)`.
        reply: oneshot::Sender<Option<(u64, Vec<u64>)>>,
    },
    /// Stop admitting, let running requests finish for up to `timeout`, fail the rest, shut the
    /// workers down; `done` fires when the engine has stopped.
    Drain {
        /// How long running requests may take.
        timeout: Duration,
        /// Fired when the engine stopped.
        done: oneshot::Sender<()>,
    },
}

/// When a failing worker group is restarted and when the engine gives up.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// Most group failures tolerated within `window`; one more and the engine gives up.
    pub max_failures: usize,
    /// The window failures are counted in.
    pub window: Duration,
}

impl Default for RestartPolicy {
    /// 5 failures in 10 minutes.
    fn default() -> Self {
        RestartPolicy {
            max_failures: 5,
            window: Duration::from_secs(600),
        }
    }
}

/// Everything the engine needs besides a started group.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Scheduler limits (`num_blocks` from the started group).
    pub scheduler: SchedulerConfig,
    /// How to start the group again after a failure.
    pub group: GroupConfig,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Step deadline policy.
    pub deadline: StepDeadline,
    /// The replica's metrics (steps, ranks, finished requests).
    pub metrics: Metrics,
}

/// Counters and state the engine publishes after every step and state change.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    /// Scheduler counters and gauges.
    pub load: pb::LoadResponse,
    /// Unix ms of the last step that succeeded (0 = never).
    pub last_step_ok_unix_ms: u64,
    /// What the replica is doing.
    pub state: pb::ReplicaState,
    /// Why, when not serving (restart reason, drain, gave up).
    pub detail: String,
    /// Group restarts since start.
    pub restarts: u32,
    /// Process ids of the running group's ranks (empty while it is down).
    pub worker_pids: Vec<u32>,
}

/// A cloneable handle to the engine task.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    failed: watch::Receiver<Option<String>>,
    metrics: Metrics,
}

impl EngineHandle {
    /// Sends a command (fails only when the engine task is gone).
    pub fn send(&self, cmd: Command) -> Result<(), Status> {
        self.tx
            .send(cmd)
            .map_err(|_| Status::unavailable("the engine has stopped"))
    }

    /// The latest published stats.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The replica's metrics as Prometheus text (see [`crate::metrics`]).
    pub fn metrics_text(&self) -> String {
        self.metrics.render(&self.stats().load)
    }

    /// Resolves with the reason once the engine gave up (too many group failures). Pending
    /// forever otherwise.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.clone();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The prefix cache's routing keys if they changed since version `since` (see
    /// [`Command::PrefixKeys`]); `None` when unchanged or the engine is gone.
    pub async fn prefix_keys(&self, since: Option<u64>, cap: usize) -> Option<(u64, Vec<u64>)> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PrefixKeys { since, cap, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Drains the engine (see [`Command::Drain`]) and waits until it stopped.
    pub async fn drain(&self, timeout: Duration) {
        let (done, rx) = oneshot::channel();
        if self.send(Command::Drain { timeout, done }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// One admitted request.
struct Active {
    events: EventSender,
    /// The request, its seed resolved; kept to queue it again after a group failure.
    req: Box<pb::GenerateRequest>,
    sampling: pb::SamplingParams,
    first_sent: bool,
    /// Prompt log-probabilities received so far (positions 1, 2, ... in order; a recompute's
    /// repeats are dropped), sent with the first message.
    prompt_logprobs: Vec<pb::PromptLogprob>,
    /// Times it was queued again after a group failure.
    retries: u32,
    /// When the request arrived, and when its first step was sent (time-to-first-token log).
    arrived: Instant,
    first_step: Option<Instant>,
    /// When its first token was sent, and how many it was sent (request metrics).
    first_token: Option<Instant>,
    generated: u32,
    /// Its spans, when it is traced.
    trace: Option<trace::ReqTrace>,
}

/// What the scheduler needs to know of the model.
#[derive(Clone, Copy, Debug)]
struct ModelCosts {
    /// `<image>` token id.
    image_token: u32,
    /// Step budget (tokens) one image view's encode is charged.
    view_cost: usize,
}

impl ModelCosts {
    /// From the facts the workers reported. One view costs a quarter of its patch count in
    /// tokens (R-4B: 729 / 4 = 182): on the H200 a SigLIP view took ~3 ms and a prefill token
    /// ~16 µs (bench/RESULTS.md, fourth pass), 190 tokens per view.
    fn of(facts: &pb::ModelFacts) -> Self {
        let side = (facts.tile / facts.patch.max(1)) as usize;
        ModelCosts {
            image_token: facts.image_token_id,
            view_cost: (side * side / 4).max(1),
        }
    }
}

/// Builds the scheduler's view of a request; checks images against `<image>` runs.
fn seq_request(
    id: SeqId,
    req: &pb::GenerateRequest,
    costs: ModelCosts,
) -> Result<SeqRequest, Status> {
    let image_token = costs.image_token;
    let ids = &req.prompt_ids;
    let mut spans = Vec::with_capacity(req.images.len());
    let mut cursor = 0;
    for (i, img) in req.images.iter().enumerate() {
        let start = ids[cursor..]
            .iter()
            .position(|&t| t == image_token)
            .map(|p| p + cursor)
            .ok_or_else(|| {
                Status::invalid_argument(format!("image {i} has no `<image>` tokens in the prompt"))
            })?;
        let len = img.num_tokens as usize;
        if start + len > ids.len() || ids[start..start + len].iter().any(|&t| t != image_token) {
            return Err(Status::invalid_argument(format!(
                "image {i} needs {len} consecutive `<image>` tokens"
            )));
        }
        let digest: [u8; 32] =
            img.digest.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!("image {i}: digest must be 32 bytes"))
            })?;
        spans.push(ImageSpan {
            start,
            len,
            digest,
            encode_cost: img.views as usize * costs.view_cost,
        });
        cursor = start + len;
    }
    if ids[cursor..].contains(&image_token) {
        return Err(Status::invalid_argument(
            "more `<image>` tokens than images",
        ));
    }
    let s = req.stopping.clone().unwrap_or_default();
    let stopping = Stopping {
        max_new_tokens: s.max_new_tokens as usize,
        stop_token_ids: s.stop_token_ids,
        min_new_tokens: s.min_new_tokens as usize,
        ignore_eos: s.ignore_eos,
        max_thinking_tokens: s.max_thinking_tokens.map(|n| n as usize),
        think_open_id: (s.think_open_id != 0).then_some(s.think_open_id),
        think_close_id: (s.think_close_id != 0).then_some(s.think_close_id),
        think_close_ids: s.think_close_ids,
        think_open_in_prompt: s.think_open_in_prompt,
    };
    Ok(SeqRequest {
        id,
        prompt_ids: ids.clone(),
        images: spans,
        stopping,
        score_prompt: req
            .sampling
            .as_ref()
            .is_some_and(|s| s.prompt_logprobs.is_some()),
    })
}

fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::Full(_) => {
            Status::resource_exhausted("the request queue is full; retry later")
        }
        other => Status::invalid_argument(other.to_string()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A group being started in the background.
type Restarting = Pin<Box<dyn Future<Output = Result<WorkerGroup, GroupError>> + Send>>;

/// A drain in progress.
struct Drain {
    deadline: Instant,
    done: Vec<oneshot::Sender<()>>,
}

/// The engine task's state.
struct Engine {
    scheduler: Scheduler,
    sched_cfg: SchedulerConfig,
    group_cfg: GroupConfig,
    policy: RestartPolicy,
    deadline: StepDeadline,
    /// The running group (None while restarting or after giving up).
    group: Option<WorkerGroup>,
    restart: Option<Restarting>,
    /// Times of recent group failures (within the policy's window).
    failures: VecDeque<Instant>,
    drain: Option<Drain>,
    gave_up: bool,
    active: HashMap<SeqId, Active>,
    next_id: u64,
    step_id: u64,
    costs: ModelCosts,
    stats: Arc<Mutex<EngineStats>>,
    failed: watch::Sender<Option<String>>,
    totals: pb::LoadResponse,
    metrics: Metrics,
}

/// What woke the engine up.
enum Wake {
    /// A command (None: every handle is gone).
    Command(Option<Command>),
    /// The idle group failed.
    GroupFailed(GroupError),
    /// The background restart ended.
    Restarted(Result<WorkerGroup, GroupError>),
    /// The drain deadline passed.
    DrainDeadline,
    /// There is work to schedule.
    Work,
}

/// Starts the engine task over a started worker group.
pub fn spawn(group: WorkerGroup, cfg: EngineConfig) -> Result<EngineHandle, String> {
    let scheduler = Scheduler::new(cfg.scheduler.clone()).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(EngineStats {
        state: pb::ReplicaState::Serving,
        worker_pids: group.pids(),
        ..Default::default()
    }));
    let (failed, failed_rx) = watch::channel(None);
    let engine = Engine {
        costs: ModelCosts::of(&group.facts),
        scheduler,
        totals: pb::LoadResponse {
            queue_capacity: cfg.scheduler.max_queue as u32,
            ..Default::default()
        },
        sched_cfg: cfg.scheduler,
        group_cfg: cfg.group,
        policy: cfg.restart,
        deadline: cfg.deadline,
        group: Some(group),
        restart: None,
        failures: VecDeque::new(),
        drain: None,
        gave_up: false,
        active: HashMap::new(),
        next_id: 1,
        step_id: 0,
        stats: stats.clone(),
        failed,
        metrics: cfg.metrics.clone(),
    };
    tokio::spawn(engine.run(rx));
    let published = stats.clone();
    cfg.metrics
        .export_load(move || published.lock().map(|s| s.load).unwrap_or_default());
    Ok(EngineHandle {
        tx,
        stats,
        failed: failed_rx,
        metrics: cfg.metrics,
    })
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        self.publish();
        loop {
            if self.gave_up || self.drain_over() {
                break;
            }
            match self.wake(&mut rx).await {
                Wake::Command(Some(cmd)) => {
                    self.handle(cmd);
                    continue;
                }
                Wake::Command(None) => break,
                Wake::GroupFailed(e) => {
                    self.on_group_failure(e).await;
                    continue;
                }
                Wake::Restarted(r) => {
                    self.on_restarted(r).await;
                    continue;
                }
                Wake::DrainDeadline => continue,
                Wake::Work => {}
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            self.reap_closed();
            let Some(plan) = self.scheduler.schedule() else {
                tracing::trace!(idle = self.scheduler.is_idle(), "nothing to schedule");
                self.publish();
                tokio::task::yield_now().await;
                continue;
            };
            if let Err(e) = self.run_step(plan).await {
                self.on_group_failure(e).await;
                continue;
            }
            self.publish();
        }
        self.stop().await;
    }

    /// Waits for something to do: work when sequences are scheduled, otherwise a command, a
    /// failure of the idle group, the end of a restart or the drain deadline.
    async fn wake(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) -> Wake {
        let drain_at = self.drain.as_ref().map(|d| d.deadline);
        let drain_deadline = async move {
            match drain_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        if let Some(restart) = self.restart.as_mut() {
            return tokio::select! {
                c = rx.recv() => Wake::Command(c),
                r = restart => Wake::Restarted(r),
                _ = drain_deadline => Wake::DrainDeadline,
            };
        }
        let Some(group) = self.group.as_mut() else {
            return tokio::select! {
                c = rx.recv() => Wake::Command(c),
                _ = drain_deadline => Wake::DrainDeadline,
            };
        };
        if !self.scheduler.is_idle() {
            return Wake::Work;
        }
        tokio::select! {
            c = rx.recv() => Wake::Command(c),
            e = group.wait_failure() => Wake::GroupFailed(e),
            _ = drain_deadline => Wake::DrainDeadline,
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                req,
                events,
                ack,
                span,
            } => {
                let _ = ack.send(self.submit(req, events, span));
            }
            Command::Abort(id) => {
                tracing::debug!(%id, "abort");
                if self.active.remove(&id).is_some() {
                    self.scheduler.abort(id);
                }
            }
            Command::Drain { timeout, done } => self.start_drain(timeout, done),
            Command::PrefixKeys { since, cap, reply } => {
                let keys = (since != Some(self.scheduler.prefix_version()))
                    .then(|| self.scheduler.prefix_keys(cap));
                let _ = reply.send(keys);
            }
        }
    }

    fn submit(
        &mut self,
        req: Box<pb::GenerateRequest>,
        events: EventSender,
        span: tracing::Span,
    ) -> Result<SeqId, Status> {
        if self.drain.is_some() {
            return Err(Status::unavailable("the replica is shutting down"));
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let sr = seq_request(id, &req, self.costs)?;
        self.scheduler.submit(sr).map_err(submit_status)?;
        let mut sampling = req.sampling.unwrap_or_else(neutral_sampling);
        if sampling.seed.is_none() {
            sampling.seed = Some(random_seed(id));
        }
        self.active.insert(
            id,
            Active {
                events,
                req,
                sampling,
                first_sent: false,
                prompt_logprobs: Vec::new(),
                retries: 0,
                arrived: Instant::now(),
                first_step: None,
                first_token: None,
                generated: 0,
                trace: trace::ReqTrace::start(span),
            },
        );
        Ok(id)
    }

    /// Aborts requests whose client went away.
    fn reap_closed(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tracing::debug!(%id, "client gone");
            self.active.remove(&id);
            self.scheduler.abort(id);
        }
    }

    /// The step of `plan`, and the spans of its traced chunks (ended when the step is done).
    fn step_request(&mut self, plan: &StepPlan) -> (pb::StepRequest, Vec<tracing::Span>) {
        self.step_id += 1;
        let (step_id, batch) = (self.step_id, plan.chunks.len());
        let mut spans = Vec::new();
        let seqs = plan
            .chunks
            .iter()
            .map(|c| {
                let a = self.active.get_mut(&c.seq_id);
                let first = c.first_chunk;
                let mut trace_context = String::new();
                let a = a.map(|a| {
                    a.first_step.get_or_insert_with(Instant::now);
                    if let Some(span) = a.trace.as_mut().and_then(|t| t.chunk(c, step_id, batch)) {
                        trace_context = r4b_telemetry::encode(&span);
                        spans.push(span);
                    }
                    &*a
                });
                pb::SeqStep {
                    seq_id: c.seq_id.0,
                    tokens: c.tokens.clone(),
                    start_pos: c.start_pos as u32,
                    block_table: c.block_table.clone(),
                    prompt_len: c.prompt_len as u32,
                    images: a
                        .and_then(|a| a.req.images.get(c.encode_images.clone()))
                        .map(<[pb::Image]>::to_vec)
                        .unwrap_or_default(),
                    image_row_offset: c.image_row_offset as u32,
                    sample: c.sample,
                    sampling: if first { a.map(|a| a.sampling) } else { None },
                    history: c.history.clone(),
                    trace_context,
                    constraint: if first {
                        a.and_then(|a| a.req.constraint.clone())
                    } else {
                        None
                    },
                }
            })
            .collect();
        let req = pb::StepRequest {
            step_id,
            seqs,
            release_seq_ids: plan.release.iter().map(|s| s.0).collect(),
        };
        (req, spans)
    }

    async fn run_step(&mut self, plan: StepPlan) -> Result<(), GroupError> {
        let (req, spans) = self.step_request(&plan);
        let tokens: usize = req.seqs.iter().map(|s| s.tokens.len()).sum();
        let views: usize = req
            .seqs
            .iter()
            .flat_map(|s| &s.images)
            .map(|i| i.views as usize)
            .sum();
        let deadline = self.deadline.for_step(tokens, views);
        tracing::trace!(
            step = req.step_id,
            seqs = req.seqs.len(),
            tokens,
            ?deadline,
            "step"
        );
        let group = self
            .group
            .as_mut()
            .ok_or_else(|| GroupError::Config("no worker group".into()))?;
        let result = group.step(req, deadline).await;
        let (resp, timing) = match result {
            Ok(r) => r,
            Err(e) => {
                // End the plan; the failure handler requeues or fails its sequences.
                self.scheduler.on_step_done(&plan, &[]);
                return Err(e);
            }
        };
        self.deadline.observe(tokens, timing.wall);
        trace::record_step(&spans, &timing);
        self.metrics
            .observe_step(timing.wall, tokens, &timing.ranks);
        drop(spans);
        // Sequences the workers refused fail alone.
        for r in &resp.rejected {
            self.refuse(SeqId(r.seq_id), &r.reason);
        }
        for p in resp.prompt_logprobs {
            let Some(a) = self.active.get_mut(&SeqId(p.seq_id)) else {
                continue;
            };
            for e in p.entries {
                // Positions start at 1; a recompute after preemption sends known ones again.
                if !a.first_sent && e.position as usize == a.prompt_logprobs.len() + 1 {
                    a.prompt_logprobs.push(e);
                }
            }
        }
        let mut tokens_by_seq: HashMap<u64, pb::Token> = HashMap::new();
        let sampled: Vec<(SeqId, u32)> = resp
            .sampled
            .into_iter()
            .filter_map(|s| {
                let t = s.token?;
                let id = t.id;
                tokens_by_seq.insert(s.seq_id, t);
                Some((SeqId(s.seq_id), id))
            })
            .collect();
        let refused = |id: SeqId| resp.rejected.iter().any(|r| r.seq_id == id.0);
        let expected = plan
            .chunks
            .iter()
            .filter(|c| c.sample && !refused(c.seq_id))
            .count();
        if sampled.len() != expected {
            self.scheduler.on_step_done(&plan, &[]);
            return Err(GroupError::Diverged {
                rank: 0,
                reason: format!("sampled {} tokens for {expected} sequences", sampled.len()),
            });
        }
        let t = &mut self.totals;
        t.steps += 1;
        t.step_wall_ns += timing.wall.as_nanos() as u64;
        t.step_forward_ns += timing.forward.as_nanos() as u64;
        t.collective_ns += timing.collective.as_nanos() as u64;
        t.batch_tokens += tokens as u64;
        if let Ok(mut s) = self.stats.lock() {
            s.last_step_ok_unix_ms = now_ms();
        }
        for ev in self.scheduler.on_step_done(&plan, &sampled) {
            let Some(a) = self.active.get_mut(&ev.seq_id) else {
                continue;
            };
            let mut msg = pb::GenerateResponse::default();
            if !a.first_sent {
                msg.prompt_tokens = a.req.prompt_ids.len() as u32;
                msg.cached_tokens = ev.cached_tokens.unwrap_or(0) as u32;
                msg.prompt_logprobs = std::mem::take(&mut a.prompt_logprobs);
                a.first_sent = true;
                // All of them are out: a recompute after a preemption need not score again.
                a.sampling.prompt_logprobs = None;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let started = a.first_step.unwrap_or(a.arrived);
                tracing::debug!(
                    id = %ev.seq_id,
                    queued_ms = ms(started - a.arrived),
                    steps_ms = ms(started.elapsed()),
                    "first token"
                );
            }
            for (id, forced) in ev.tokens {
                let mut tok = if forced {
                    None
                } else {
                    tokens_by_seq.remove(&ev.seq_id.0)
                };
                if tok.as_ref().is_some_and(|t| t.id != id) {
                    tok = None;
                }
                msg.tokens.push(tok.unwrap_or(pb::Token {
                    id,
                    forced,
                    ..Default::default()
                }));
            }
            if let Some(f) = ev.finish {
                msg.finish_reason = match f {
                    Finish::Length => pb::FinishReason::Length,
                    Finish::Stop => pb::FinishReason::Stop,
                } as i32;
            }
            let done = ev.finish.is_some();
            a.generated += msg.tokens.len() as u32;
            let now = Instant::now();
            let first_token = *a.first_token.get_or_insert(now);
            if done && a.req.request_id != crate::service::PROBE_ID {
                let started = a.first_step.unwrap_or(a.arrived);
                self.metrics.observe_request(&RequestTimes {
                    prompt_tokens: a.req.prompt_ids.len() as u32,
                    generation_tokens: a.generated,
                    max_new_tokens: a.req.stopping.as_ref().map_or(0, |s| s.max_new_tokens),
                    queue: started.saturating_duration_since(a.arrived),
                    prefill: first_token.saturating_duration_since(started),
                    decode: now.saturating_duration_since(first_token),
                });
            }
            let _ = a.events.send(Ok(msg));
            if done {
                self.active.remove(&ev.seq_id);
            }
        }
        Ok(())
    }

    /// Fails one request the workers refused (its data cannot run); the others go on.
    fn refuse(&mut self, id: SeqId, reason: &str) {
        tracing::warn!(%id, reason, "request refused by the workers");
        self.totals.rejected_seqs += 1;
        if let Some(a) = self.active.remove(&id) {
            let _ = a
                .events
                .send(Err(Status::invalid_argument(reason.to_string())));
        }
        self.scheduler.abort(id);
    }

    fn publish(&mut self) {
        let st = self.scheduler.stats();
        let mut load = self.totals;
        load.waiting = st.waiting as u32;
        load.running = st.running as u32;
        load.kv_blocks_used = st.blocks_used as u32;
        load.kv_blocks_total = st.blocks_total as u32;
        load.prefix_hit_tokens = st.prefix_hit_tokens;
        load.prefix_query_tokens = st.prefix_query_tokens;
        load.preemptions = st.preemptions;
        if let Ok(mut s) = self.stats.lock() {
            s.load = load;
        }
    }

    /// Sets the published state and its detail.
    fn set_state(&mut self, state: pb::ReplicaState, detail: String) {
        let pids = self
            .group
            .as_ref()
            .map(WorkerGroup::pids)
            .unwrap_or_default();
        if let Ok(mut s) = self.stats.lock() {
            s.state = state;
            s.detail = detail;
            s.restarts = self.totals.group_restarts as u32;
            s.worker_pids = pids;
        }
    }
}

/// Greedy, no penalties: the parameters of a request that sent none.
fn neutral_sampling() -> pb::SamplingParams {
    pb::SamplingParams {
        top_p: 1.0,
        repetition_penalty: 1.0,
        ..Default::default()
    }
}

/// A seed for requests that did not ask for one: different per request and per run.
fn random_seed(id: SeqId) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut z = t ^ id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// How long a successful step keeps the replica "ready".
pub const READY_WINDOW: Duration = Duration::from_secs(30);

/// Whether the replica serves and a step succeeded within `window`.
pub fn is_ready(stats: &EngineStats, window: Duration) -> bool {
    stats.state == pb::ReplicaState::Serving
        && stats.last_step_ok_unix_ms > 0
        && now_ms().saturating_sub(stats.last_step_ok_unix_ms) <= window.as_millis() as u64
}
