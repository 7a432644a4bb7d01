//! Worker processes: start one, learn its address, and watch it until it exits.
//!
//! Every spawned worker is owned by a small task that waits on the process. When the process
//! exits by itself the task reports `(rank, how)` on the group's exit channel at once (so a
//! `kill -9` is noticed within milliseconds, not at the next step); when the group asks it to
//! stop, or the [`Supervised`] handle is dropped, it sends SIGKILL and reaps the process. Either
//! way the process is reaped: no zombies.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{GroupError, LISTENING_PREFIX};

/// How a worker process ended, reported by its watcher: `(rank, description)`.
pub type Exit = (usize, String);

/// A spawned worker process and the task that reaps it.
#[derive(Debug)]
pub struct Supervised {
    /// Process id (for logs).
    pub pid: Option<u32>,
    kill: Option<oneshot::Sender<()>>,
    reaped: Option<JoinHandle<()>>,
}

impl Supervised {
    /// Sends SIGKILL (if the process still runs) and waits up to `wait` for it to be reaped.
    pub async fn kill(mut self, wait: Duration) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        self.wait(wait).await;
    }

    /// Waits up to `wait` for the process to exit by itself, then kills it.
    pub async fn wait_or_kill(mut self, wait: Duration) {
        if let Some(reaped) = self.reaped.as_mut() {
            if tokio::time::timeout(wait, reaped).await.is_ok() {
                self.reaped = None;
                return;
            }
        }
        self.kill(wait).await;
    }

    async fn wait(&mut self, wait: Duration) {
        if let Some(reaped) = self.reaped.take() {
            if tokio::time::timeout(wait, reaped).await.is_err() {
                tracing::warn!(pid = ?self.pid, "worker process not reaped within {wait:?}");
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // The watcher kills and reaps the process when its kill channel closes.
        drop(self.kill.take());
    }
}

/// `exited with status 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        (None, None) => "ended".into(),
    }
}

fn supervise(rank: usize, mut child: Child, exits: mpsc::UnboundedSender<Exit>) -> Supervised {
    let pid = child.id();
    // `Child::wait` closes stdin first; a worker started with `--exit-with-parent` would take
    // that as its parent's death. Keep our end open for as long as the watcher runs.
    let stdin = child.stdin.take();
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let reaped = tokio::spawn(async move {
        let _stdin = stdin;
        tokio::select! {
            status = child.wait() => {
                let how = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                tracing::warn!(rank, pid = ?pid, "worker process {how}");
                let _ = exits.send((rank, how));
            }
            // Asked to stop, or the group was dropped.
            _ = kill_rx => {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    });
    Supervised {
        pid,
        kill: Some(kill_tx),
        reaped: Some(reaped),
    }
}

/// Starts `exe worker --listen 127.0.0.1:0 --exit-with-parent ARGS` as rank `rank`, supervised,
/// and reads the address it prints (`R4B_WORKER_LISTENING <addr>`, within 60 s).
pub async fn spawn_worker(
    exe: &Path,
    rank: usize,
    args: &[String],
    secret: &r4b_proto::auth::Secret,
    exits: &mpsc::UnboundedSender<Exit>,
) -> Result<(Supervised, String), GroupError> {
    let err = |reason: String| GroupError::Spawn { rank, reason };
    let mut child = Command::new(exe)
        .arg("worker")
        .args(["--listen", "127.0.0.1:0", "--exit-with-parent"])
        .args(args)
        .env(r4b_proto::auth::SECRET_ENV, secret.expose())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        // the coordinator, which drains, and not the workers, which must keep running until
        // it is done. They exit when the coordinator closes their stdin or sends Shutdown.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("{}: {e}", exe.display())))?;
    let stdout = child.stdout.take().ok_or_else(|| err("no stdout".into()))?;
    let supervised = supervise(rank, child, exits.clone());
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.map_err(|e| err(e.to_string()))? {
            if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
                return Ok(addr.trim().to_string());
            }
        }
        Err(err("exited before listening".into()))
    })
    .await
    .map_err(|_| err("did not report its address within 60 s".into()))??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((supervised, addr))
}
