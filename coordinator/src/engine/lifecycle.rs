//! The engine's life beyond steps: a failed worker group (kill, requeue, restart, give up) and
//! the drain on shutdown.

use std::time::{Duration, Instant};

use r4b_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::Status;

use super::{seq_request, submit_status, Drain, Engine};
use crate::scheduler::{Scheduler, SeqId};
use crate::workers::{GroupError, WorkerGroup};

/// Times a request that produced no token is queued again after group failures.
const MAX_RETRIES: u32 = 1;
/// Longest wait between restart attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl Engine {
    /// A group failed: kill and reap it, fail what cannot be retried, queue the rest again,
    /// and start a new group (or give up, per the restart policy).
    pub(super) async fn on_group_failure(&mut self, err: GroupError) {
        let reason = err.to_string();
        tracing::error!(%reason, "worker group failed");
        if let Some(group) = self.group.take() {
            group.kill().await;
        }
        self.restart = None;
        self.requeue_after_failure(&reason);
        self.after_failure(&reason);
    }

    /// A background start ended.
    pub(super) async fn on_restarted(&mut self, result: Result<WorkerGroup, GroupError>) {
        self.restart = None;
        let group = match result {
            Ok(g) => g,
            Err(e) => {
                let reason = format!("restarting the worker group: {e}");
                tracing::error!(%reason);
                self.after_failure(&reason);
                return;
            }
        };
        let blocks = group.num_blocks as usize;
        if blocks != self.sched_cfg.num_blocks {
            tracing::warn!(
                was = self.sched_cfg.num_blocks,
                now = blocks,
                "the restarted group allocated another KV block count"
            );
            let mut cfg = self.sched_cfg.clone();
            cfg.num_blocks = blocks;
            match Scheduler::new(cfg.clone()) {
                Ok(s) => {
                    self.sched_cfg = cfg;
                    self.scheduler = s;
                    self.resubmit_all();
                }
                Err(e) => {
                    group.kill().await;
                    self.after_failure(&format!("the restarted group does not fit: {e}"));
                    return;
                }
            }
        }
        tracing::info!(
            restarts = self.totals.group_restarts,
            queued = self.active.len(),
            "worker group restarted"
        );
        self.costs = super::ModelCosts::of(&group.facts);
        self.group = Some(group);
        let (state, detail) = match self.drain {
            Some(_) => (pb::ReplicaState::Draining, "shutting down".to_string()),
            None => (pb::ReplicaState::Serving, String::new()),
        };
        self.set_state(state, detail);
        self.publish();
    }

    /// Counts a failure against the policy; then gives up or schedules the next start.
    fn after_failure(&mut self, reason: &str) {
        let now = Instant::now();
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > self.policy.window)
        {
            self.failures.pop_front();
        }
        self.totals.group_restarts += 1;
        if self.failures.len() > self.policy.max_failures {
            let why = format!(
                "the worker group failed {} times within {:?} (last: {reason}); giving up",
                self.failures.len(),
                self.policy.window
            );
            self.give_up(&why);
            return;
        }
        if self.drain.is_some() {
            self.fail_all("the replica is shutting down and its worker group failed");
            return;
        }
        let attempt = self.failures.len() as u32;
        // 0 s before the first attempt, then 1, 2, 4 ... s.
        let backoff = match attempt {
            0 | 1 => Duration::ZERO,
            n => Duration::from_secs(1u64 << (n - 2).min(8)).min(MAX_BACKOFF),
        };
        let cfg = self.group_cfg.clone();
        self.restart = Some(Box::pin(async move {
            tokio::time::sleep(backoff).await;
            WorkerGroup::start(&cfg).await
        }));
        self.set_state(
            pb::ReplicaState::Restarting,
            format!("worker group failed ({reason}); restarting, attempt {attempt}"),
        );
        self.publish();
    }

    /// After a failure the KV cache is gone: a fresh scheduler holds the requests that produced
    /// no token yet (once), in arrival order; the others fail with UNAVAILABLE.
    fn requeue_after_failure(&mut self, reason: &str) {
        let mut ids: Vec<SeqId> = self.active.keys().copied().collect();
        ids.sort();
        for id in ids {
            let Some(a) = self.active.get_mut(&id) else {
                continue;
            };
            if a.first_sent || a.retries >= MAX_RETRIES {
                // The reason stays in the log and in Health: it names processes and streams.
                tracing::debug!(%id, reason, "request interrupted by the group failure");
                let msg = "the replica's worker group failed; the request was interrupted";
                let _ = a.events.send(Err(Status::unavailable(msg)));
                self.active.remove(&id);
            } else {
                a.retries += 1;
                a.first_step = None;
            }
        }
        self.resubmit_all();
    }

    /// Replaces the scheduler by an empty one and submits every active request to it again.
    fn resubmit_all(&mut self) {
        self.scheduler = match Scheduler::new(self.sched_cfg.clone()) {
            Ok(s) => s,
            Err(e) => {
                self.give_up(&format!("scheduler: {e}"));
                return;
            }
        };
        let mut ids: Vec<SeqId> = self.active.keys().copied().collect();
        ids.sort();
        for id in ids {
            let Some(a) = self.active.get(&id) else {
                continue;
            };
            let submitted = seq_request(id, &a.req, self.costs)
                .and_then(|sr| self.scheduler.submit(sr).map_err(submit_status));
            if let Err(status) = submitted {
                if let Some(a) = self.active.remove(&id) {
                    let _ = a.events.send(Err(status));
                }
            }
        }
    }

    /// Too many failures: everything fails, the engine stops and `failed` fires.
    fn give_up(&mut self, why: &str) {
        tracing::error!("{why}");
        // Clients get no internals; the reason goes to the log, Health and the exit message.
        self.fail_all("the replica failed and is shutting down");
        self.gave_up = true;
        self.restart = None;
        self.set_state(pb::ReplicaState::Failed, why.to_string());
        self.publish();
        let _ = self.failed.send(Some(why.to_string()));
    }

    /// Fails every request with UNAVAILABLE.
    fn fail_all(&mut self, why: &str) {
        for (id, a) in self.active.drain() {
            let _ = a.events.send(Err(Status::unavailable(why.to_string())));
            self.scheduler.abort(id);
        }
    }

    pub(super) fn start_drain(&mut self, timeout: Duration, done: oneshot::Sender<()>) {
        match &mut self.drain {
            Some(d) => d.done.push(done),
            None => {
                tracing::info!(
                    running = self.active.len(),
                    "draining: no new requests; running ones get {timeout:?}"
                );
                self.drain = Some(Drain {
                    deadline: Instant::now() + timeout,
                    done: vec![done],
                });
                self.set_state(pb::ReplicaState::Draining, "shutting down".into());
            }
        }
    }

    /// Whether a drain is finished: nothing runs any more, or the deadline passed (then what is
    /// left fails).
    pub(super) fn drain_over(&mut self) -> bool {
        let Some(d) = &self.drain else {
            return false;
        };
        if self.active.is_empty() {
            return true;
        }
        if Instant::now() >= d.deadline {
            let left = self.active.len();
            tracing::warn!(left, "shutdown timeout: failing the requests left");
            self.fail_all("the server is shutting down; the request did not finish in time");
            return true;
        }
        false
    }

    /// Shuts the workers down and reports the drain done.
    pub(super) async fn stop(&mut self) {
        self.fail_all("the replica stopped");
        if let Some(group) = self.group.take() {
            group.shutdown().await;
        }
        self.publish();
        if let Some(d) = self.drain.take() {
            for done in d.done {
                let _ = done.send(());
            }
        }
    }
}
