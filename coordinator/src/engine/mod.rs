//! The replica's engine: one task owns the [`Scheduler`] and the [`WorkerGroup`] and runs the
//! step loop. Requests reach it as [`Command`]s through an [`EngineHandle`]; tokens go back on a
//! per-request channel. A request whose channel closes (client gone) is aborted before the next
//! step and its KV blocks are freed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use r4b_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::scheduler::{
    Finish, ImageSpan, Scheduler, SchedulerConfig, SeqId, SeqRequest, Stopping, SubmitError,
};
use crate::workers::WorkerGroup;

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
    },
    /// Drop a request (client gone).
    Abort(SeqId),
}

/// Counters the engine publishes after every step.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    /// Scheduler counters and gauges.
    pub load: pb::LoadResponse,
    /// Unix ms of the last step that succeeded (0 = never).
    pub last_step_ok_unix_ms: u64,
    /// Set once a step failed: the replica is broken until restarted.
    pub failed: Option<String>,
}

/// A cloneable handle to the engine task.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
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
}

/// One admitted request.
struct Active {
    events: EventSender,
    sampling: pb::SamplingParams,
    images: Vec<pb::Image>,
    prompt_tokens: u32,
    first_sent: bool,
    /// When the request arrived, and when its first step was sent (time-to-first-token log).
    arrived: Instant,
    first_step: Option<Instant>,
}

/// Builds the scheduler's view of a request; checks images against `<image>` runs.
fn seq_request(
    id: SeqId,
    req: &pb::GenerateRequest,
    image_token: u32,
) -> Result<SeqRequest, Status> {
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
        spans.push(ImageSpan { start, len, digest });
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

/// The engine task's state.
struct Engine {
    scheduler: Scheduler,
    group: WorkerGroup,
    active: HashMap<SeqId, Active>,
    next_id: u64,
    step_id: u64,
    image_token: u32,
    stats: Arc<Mutex<EngineStats>>,
    totals: pb::LoadResponse,
}

/// Starts the engine task over a started worker group.
pub fn spawn(group: WorkerGroup, cfg: SchedulerConfig) -> Result<EngineHandle, String> {
    let scheduler = Scheduler::new(cfg.clone()).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(EngineStats::default()));
    let engine = Engine {
        image_token: group.facts.image_token_id,
        scheduler,
        group,
        active: HashMap::new(),
        next_id: 1,
        step_id: 0,
        stats: stats.clone(),
        totals: pb::LoadResponse {
            queue_capacity: cfg.max_queue as u32,
            ..Default::default()
        },
    };
    tokio::spawn(engine.run(rx));
    Ok(EngineHandle { tx, stats })
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        self.publish();
        loop {
            // Block for work only when there is nothing to run.
            if self.scheduler.is_idle() {
                match rx.recv().await {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
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
                self.fail_all(&e);
                // A broken group cannot run steps; answer every later request with the error.
                while let Some(cmd) = rx.recv().await {
                    if let Command::Submit { ack, .. } = cmd {
                        let _ = ack.send(Err(Status::unavailable(format!("replica failed: {e}"))));
                    }
                }
                break;
            }
            self.publish();
        }
        self.group.shutdown().await;
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { req, events, ack } => {
                let id = SeqId(self.next_id);
                self.next_id += 1;
                let result = seq_request(id, &req, self.image_token)
                    .and_then(|sr| self.scheduler.submit(sr).map_err(submit_status))
                    .map(|()| {
                        let mut sampling = req.sampling.unwrap_or_default();
                        if sampling.seed.is_none() {
                            sampling.seed = Some(random_seed(id));
                        }
                        let prompt_tokens = req.prompt_ids.len() as u32;
                        self.active.insert(
                            id,
                            Active {
                                events,
                                sampling,
                                images: req.images,
                                prompt_tokens,
                                first_sent: false,
                                arrived: Instant::now(),
                                first_step: None,
                            },
                        );
                        id
                    });
                let _ = ack.send(result);
            }
            Command::Abort(id) => {
                tracing::debug!(%id, "abort");
                if self.active.remove(&id).is_some() {
                    self.scheduler.abort(id);
                }
            }
        }
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

    fn step_request(&mut self, plan: &crate::scheduler::StepPlan) -> pb::StepRequest {
        self.step_id += 1;
        let seqs = plan
            .chunks
            .iter()
            .map(|c| {
                let a = self.active.get_mut(&c.seq_id);
                let first = c.first_chunk;
                let a = a.map(|a| {
                    a.first_step.get_or_insert_with(Instant::now);
                    &*a
                });
                pb::SeqStep {
                    seq_id: c.seq_id.0,
                    tokens: c.tokens.clone(),
                    start_pos: c.start_pos as u32,
                    block_table: c.block_table.clone(),
                    prompt_len: c.prompt_len as u32,
                    images: if first {
                        a.map(|a| a.images.clone()).unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    image_row_offset: c.image_row_offset as u32,
                    sample: c.sample,
                    sampling: if first { a.map(|a| a.sampling) } else { None },
                    history: c.history.clone(),
                }
            })
            .collect();
        pb::StepRequest {
            step_id: self.step_id,
            seqs,
            release_seq_ids: plan.release.iter().map(|s| s.0).collect(),
        }
    }

    async fn run_step(&mut self, plan: crate::scheduler::StepPlan) -> Result<(), String> {
        let req = self.step_request(&plan);
        tracing::trace!(
            step = req.step_id,
            seqs = req.seqs.len(),
            release = req.release_seq_ids.len(),
            "step"
        );
        let batch_tokens: usize = plan.chunks.iter().map(|c| c.tokens.len()).sum();
        let (resp, timing) = self.group.step(req).await.map_err(|e| e.to_string())?;
        tracing::trace!(step = self.step_id, "step done");
        let mut tokens: HashMap<u64, pb::Token> = HashMap::new();
        let sampled: Vec<(SeqId, u32)> = resp
            .sampled
            .into_iter()
            .filter_map(|s| {
                let t = s.token?;
                let id = t.id;
                tokens.insert(s.seq_id, t);
                Some((SeqId(s.seq_id), id))
            })
            .collect();
        let expected = plan.chunks.iter().filter(|c| c.sample).count();
        if sampled.len() != expected {
            return Err(format!(
                "rank 0 sampled {} tokens for {expected} sequences",
                sampled.len()
            ));
        }
        let t = &mut self.totals;
        t.steps += 1;
        t.step_wall_ns += timing.wall.as_nanos() as u64;
        t.step_forward_ns += timing.forward.as_nanos() as u64;
        t.collective_ns += timing.collective.as_nanos() as u64;
        t.batch_tokens += batch_tokens as u64;
        if let Ok(mut s) = self.stats.lock() {
            s.last_step_ok_unix_ms = now_ms();
        }
        for ev in self.scheduler.on_step_done(&plan, &sampled) {
            let Some(a) = self.active.get_mut(&ev.seq_id) else {
                continue;
            };
            let mut msg = pb::GenerateResponse::default();
            if !a.first_sent {
                msg.prompt_tokens = a.prompt_tokens;
                msg.cached_tokens = ev.cached_tokens.unwrap_or(0) as u32;
                a.first_sent = true;
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
                    tokens.remove(&ev.seq_id.0)
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
            let _ = a.events.send(Ok(msg));
            if done {
                self.active.remove(&ev.seq_id);
            }
        }
        Ok(())
    }

    fn fail_all(&mut self, err: &str) {
        tracing::error!("step failed, replica stops: {err}");
        for (_, a) in self.active.drain() {
            let _ = a
                .events
                .send(Err(Status::unavailable(format!("replica failed: {err}"))));
        }
        if let Ok(mut s) = self.stats.lock() {
            s.failed = Some(err.to_string());
        }
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

/// Whether a step succeeded within `window` and nothing has failed since.
pub fn is_ready(stats: &EngineStats, window: Duration) -> bool {
    stats.failed.is_none()
        && stats.last_step_ok_unix_ms > 0
        && now_ms().saturating_sub(stats.last_step_ok_unix_ms) <= window.as_millis() as u64
}
