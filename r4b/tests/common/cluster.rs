//! A real etcd, split coordinators and a gateway on loopback, for the discovery and routing
//! tests (`r4b/tests/cluster.rs`) and the prefix-routing bench (`bench/prefix_hit_rate.sh`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::{client, free_port, procs};

/// The secret every process of the test cluster shares.
pub const SECRET: &str = "test-cluster-secret-0123456789abcdef";

/// Where Debian's etcd-server puts the binary.
pub const ETCD: &str = "/usr/bin/etcd";

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Forwards a child's stderr to the test output, prefixed.
fn forward(child: &mut Child, tag: String) {
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                println!("[{tag}] {line}");
            }
        });
    }
}

/// A real etcd on free loopback ports with a temporary data directory; stopped by its PID.
pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Etcd {
    /// Starts etcd and waits until it answers; `None` when there is no etcd binary.
    pub fn start() -> Option<Etcd> {
        if !Path::new(ETCD).exists() {
            return None;
        }
        let client_port = free_port();
        let peer_port = free_port();
        let mut e = Etcd {
            child: None,
            data: tempfile::tempdir().unwrap(),
            client_port,
            peer_port,
            url: format!("http://127.0.0.1:{client_port}"),
        };
        e.restart();
        Some(e)
    }

    /// Starts the process again on the same ports and data directory; waits until healthy.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new(ETCD)
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.data.path().join("etcd"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        forward(&mut child, format!("etcd:{}", self.client_port));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = client()
                .get(format!("{}/health", self.url))
                .timeout(Duration::from_secs(1))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["health"] == "true");
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops etcd by its PID (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            procs::signal(c.id(), "KILL");
            let _ = c.wait();
        }
    }

    /// The registrations under `/r4b/replicas/`, read from etcd's own JSON API (not through
    /// r4b code): each entry's JSON with `"lease"` set from the key's lease.
    pub fn registrations(&self) -> Vec<Value> {
        let body = json!({
            "key": b64(b"/r4b/replicas/"),
            "range_end": b64(b"/r4b/replicas0"),
        });
        let Ok(resp) = client()
            .post(format!("{}/v3/kv/range", self.url))
            .timeout(Duration::from_secs(2))
            .json(&body)
            .send()
        else {
            return Vec::new();
        };
        let v: Value = resp.json().unwrap_or_default();
        let decode = |s: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_str().unwrap_or_default())
                .unwrap_or_default()
        };
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    // `<id>/prefixes` holds the prefix keys (binary), not an entry.
                    .filter(|kv| !decode(&kv["key"]).ends_with(b"/prefixes"))
                    .filter_map(|kv| {
                        let mut e: Value = serde_json::from_slice(&decode(&kv["value"])).ok()?;
                        // int64 fields are JSON strings in etcd's gateway.
                        e["lease"] = json!(kv["lease"]
                            .as_str()
                            .and_then(|l| l.parse::<i64>().ok())
                            .or_else(|| kv["lease"].as_i64())
                            .unwrap_or(0));
                        Some(e)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `f` holds for the registrations; the time it took.
    pub fn wait_registrations(
        &self,
        timeout: Duration,
        f: impl Fn(&[Value]) -> bool,
    ) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if f(&self.registrations()) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `r4b coordinator` (its workers are its children and exit with it).
pub struct Coordinator {
    child: Option<Child>,
    /// Its gRPC port.
    pub port: u16,
    args: Vec<String>,
    cache: PathBuf,
}

impl Coordinator {
    /// Starts a coordinator with TP = `tp` on a free port, registering in etcd at `etcd` (an
    /// empty string: no etcd).
    pub fn start(etcd: &str, tp: usize, cache: &Path, extra: &[&str]) -> Coordinator {
        let mut c = Coordinator {
            child: None,
            port: free_port(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            cache: cache.to_path_buf(),
        };
        c.args
            .extend(["--tensor-parallel-size".into(), tp.to_string()]);
        if !etcd.is_empty() {
            c.args.extend(["--etcd".into(), etcd.into()]);
        }
        c.restart();
        c
    }

    /// Starts the process again (same port and flags).
    pub fn restart(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_r4b"))
            .arg("coordinator")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--kv-cache-space", "0.25", "--shutdown-timeout", "5"])
            .args(&self.args)
            .env("R4B_CACHE", &self.cache)
            .env("R4B_CLUSTER_SECRET", SECRET)
            .env("RAYON_NUM_THREADS", "1")
            .env(
                "R4B_LOG",
                std::env::var("R4B_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        forward(&mut child, format!("coordinator:{}", self.port));
        self.child = Some(child);
    }

    /// The URL it registers (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            procs::signal(c.id(), "KILL");
            let _ = c.wait();
        }
    }

    /// Waits until its gRPC service answers `Load` (its workers are up).
    pub fn wait_up(&self, timeout: Duration) {
        let t0 = Instant::now();
        while self.load().is_none() {
            assert!(
                t0.elapsed() < timeout,
                "coordinator {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM (drain), then waits up to `timeout` for the exit; its status, if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        procs::signal(c.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its `Load` counters, asked over gRPC directly (not through the gateway).
    pub fn load(&self) -> Option<r4b_proto::v1::LoadResponse> {
        let url = self.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .ok()?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
                .ok()?;
            let secret = r4b_proto::auth::Secret::new(SECRET).ok()?;
            let mut c = r4b_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
                channel,
                r4b_proto::auth::AttachSecret::new(Some(&secret)),
            );
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.load(r4b_proto::v1::LoadRequest {}),
            )
            .await
            .ok()?
            .ok()?;
            Some(r.into_inner())
        })
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An `r4b gateway` following etcd.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Gateway {
    /// Starts a gateway on `--etcd etcd` with `extra` flags; waits until `/ready` is 200.
    pub fn start(etcd: &str, cache: &Path, extra: &[&str]) -> Gateway {
        let mut args = vec!["--etcd", etcd];
        args.extend_from_slice(extra);
        Gateway::start_with(cache, &args)
    }

    /// Starts a gateway with `args` (the replica source among them); waits until `/ready` is 200.
    pub fn start_with(cache: &Path, args: &[&str]) -> Gateway {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_r4b"))
            .arg("gateway")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .env("R4B_CACHE", cache)
            .env("R4B_CLUSTER_SECRET", SECRET)
            .env(
                "R4B_LOG",
                std::env::var("R4B_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        forward(&mut child, format!("gateway:{port}"));
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("r4b gateway exited early: {status}");
            }
            if client()
                .get(format!("{base}/ready"))
                .send()
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "r4b gateway did not become ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Gateway { child, base }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `regs` holds a ready registration for every URL of `urls`.
pub fn all_ready(regs: &[Value], urls: &[String]) -> bool {
    urls.iter().all(|u| {
        regs.iter()
            .any(|r| r["url"] == u.as_str() && r["ready"] == true)
    })
}
