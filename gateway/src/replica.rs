//! The coordinators (one per model replica) and how a request picks one.
//!
//! The set comes from a [`Discovery`] (a static `--coordinator` list or etcd) and is followed as
//! it changes. [`ReplicaPool::start`] picks a replica by the configured [`Routing`]:
//! * `round-robin`: the next one in turn;
//! * `least-loaded`: power of two choices over each replica's load, the larger of what it pushed
//!   (waiting + running, etcd only) and this gateway's own count of its requests in flight;
//! * `prefix` (default): the replica holding the longest run of the request's leading KV blocks
//!   (from the block hashes replicas publish), when that run is at least half of the prompt's
//!   full blocks (a short shared head, such as a system prompt every replica soon holds, does not
//!   pin all traffic to one replica) and its load exceeds the least loaded one's by at most the
//!   slack; otherwise least-loaded.
//!
//! Between two summaries of a replica, the keys of the requests this gateway sent it count as
//! held (the published summary lags by up to ~200 ms plus etcd's propagation, while the next turn
//! of a conversation often follows at once).
//!
//! A replica that fails a call (UNAVAILABLE, a broken connection) or drains is skipped for
//! [`EJECT_FOR`] (or until etcd shows it registered again under a new lease), and a request
//! that has not received its first token is started again on another replica; so is one whose
//! replica's queue is full (RESOURCE_EXHAUSTED), without marking it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use r4b_discovery::{ReplicaEntry, ReplicaSet};
use r4b_proto::auth::{AttachSecret, AuthChannel, Secret};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::codec::Streaming;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::startup::GatewayError;

/// Largest gRPC message the gateway sends (a request with several large images).
const MAX_SEND_BYTES: usize = 512 << 20;
/// Largest gRPC message the gateway accepts.
const MAX_RECV_BYTES: usize = 64 << 20;
/// How long a replica that failed a call is skipped before it is tried again.
pub const EJECT_FOR: Duration = Duration::from_secs(2);

/// How the gateway picks a replica for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// In turn.
    RoundRobin,
    /// Power of two choices over load.
    LeastLoaded,
    /// Longest cached prefix unless overloaded, else least-loaded.
    #[default]
    Prefix,
}

impl std::str::FromStr for Routing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Routing::RoundRobin),
            "least-loaded" => Ok(Routing::LeastLoaded),
            "prefix" => Ok(Routing::Prefix),
            _ => Err(format!(
                "unknown routing {s:?} (round-robin, least-loaded, prefix)"
            )),
        }
    }
}

/// What the gateway knows of a replica besides its channel.
#[derive(Debug, Default)]
struct View {
    entry: ReplicaEntry,
    prefixes: HashSet<u64>,
    down_until: Option<Instant>,
}

/// One coordinator.
#[derive(Debug)]
pub struct Replica {
    /// Its URL.
    pub url: String,
    client: CoordinatorClient<AuthChannel>,
    inflight: AtomicU32,
    /// Requests sent to it (started streams) since the gateway started.
    started: AtomicU64,
    view: Mutex<View>,
}

impl Replica {
    /// Requests of this gateway in flight on it.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Requests this gateway started on it.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Load used for routing: the larger of the pushed waiting + running and the own count.
    fn load(&self) -> u32 {
        let v = self.view();
        (v.entry.waiting + v.entry.running).max(self.inflight())
    }

    fn usable(&self, now: Instant) -> bool {
        let v = self.view();
        v.entry.ready && v.down_until.is_none_or(|t| now >= t)
    }

    /// Leading blocks of `keys` it holds.
    fn cached_blocks(&self, keys: &[u64]) -> usize {
        let v = self.view();
        keys.iter().take_while(|k| v.prefixes.contains(k)).count()
    }

    fn eject(&self, why: &tonic::Status) {
        let mut v = self.view();
        if v.down_until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(replica = %self.url, status = %why, "replica failed; skipped for {EJECT_FOR:?}");
        }
        v.down_until = Some(Instant::now() + EJECT_FOR);
    }
}

/// A request of this gateway in flight on a replica (counted until dropped).
#[derive(Debug)]
pub struct InFlight(Arc<Replica>);

impl InFlight {
    fn new(r: Arc<Replica>) -> Self {
        r.inflight.fetch_add(1, Ordering::Relaxed);
        r.started.fetch_add(1, Ordering::Relaxed);
        InFlight(r)
    }

    /// The replica.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A started generation: its stream, first message, and the in-flight count it holds.
#[derive(Debug)]
pub struct Started {
    /// The token stream.
    pub stream: Streaming<pb::GenerateResponse>,
    /// Its first message (the first tokens).
    pub first: pb::GenerateResponse,
    /// Counts the request against its replica until dropped.
    pub inflight: InFlight,
}

/// All coordinators of the served model.
#[derive(Debug)]
pub struct ReplicaPool {
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    next: AtomicUsize,
    rpc_timeout: Duration,
    secret: Option<Secret>,
    routing: Routing,
    overload_slack: u32,
    tls: Option<ClientTlsConfig>,
}

fn coordinator_error(url: &str, reason: impl ToString) -> GatewayError {
    GatewayError::Coordinator {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

/// Whether a call failed because of the replica (so another one may take the request), not
/// because of the request.
fn replica_failed(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// A pseudo-random number from a counter (for the two choices; no need for a real RNG).
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ReplicaPool {
    /// An empty pool; every call carries `secret` (the coordinators' cluster secret).
    pub fn new(
        rpc_timeout: Duration,
        secret: Option<&Secret>,
        routing: Routing,
        overload_slack: u32,
    ) -> Self {
        ReplicaPool {
            replicas: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            rpc_timeout,
            secret: secret.cloned(),
            routing,
            overload_slack,
            tls: None,
        }
    }

    /// Connects to the coordinators over TLS (`https://` URLs).
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Applies the current set of `rx` and follows its changes in a background task.
    pub fn follow(self: &Arc<Self>, mut rx: watch::Receiver<ReplicaSet>) {
        let set = rx.borrow_and_update().clone();
        self.apply(&set);
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let set = rx.borrow_and_update().clone();
                match pool.upgrade() {
                    Some(p) => p.apply(&set),
                    None => return,
                }
            }
        });
    }

    fn client(&self, url: &str) -> Result<CoordinatorClient<AuthChannel>, GatewayError> {
        let mut endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|e| coordinator_error(url, e))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| coordinator_error(url, e))?;
        }
        let channel = endpoint
            .connect_timeout(self.rpc_timeout.min(Duration::from_secs(1)))
            .tcp_nodelay(true)
            .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
            .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
            .connect_lazy();
        Ok(
            CoordinatorClient::with_interceptor(channel, AttachSecret::new(self.secret.as_ref()))
                .max_encoding_message_size(MAX_SEND_BYTES)
                .max_decoding_message_size(MAX_RECV_BYTES),
        )
    }

    /// Makes the pool match `set` (by URL): new replicas get a channel, gone ones are dropped,
    /// known ones take the new entry (a new lease clears a failure mark).
    pub fn apply(&self, set: &ReplicaSet) {
        let current = self.replicas();
        let by_url: HashMap<&str, &Arc<Replica>> =
            current.iter().map(|r| (r.url.as_str(), r)).collect();
        let mut next = Vec::with_capacity(set.len());
        for entry in set.values() {
            let replica = match by_url.get(entry.url.as_str()) {
                Some(r) => (*r).clone(),
                None => match self.client(&entry.url) {
                    Ok(client) => {
                        tracing::info!(replica = %entry.url, "replica added");
                        Arc::new(Replica {
                            url: entry.url.clone(),
                            client,
                            inflight: AtomicU32::new(0),
                            started: AtomicU64::new(0),
                            view: Mutex::new(View::default()),
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a replica with a bad URL");
                        continue;
                    }
                },
            };
            {
                let mut v = replica.view();
                if v.entry.lease != entry.lease {
                    v.down_until = None;
                }
                if !Arc::ptr_eq(&v.entry.prefixes, &entry.prefixes)
                    && v.entry.prefixes != entry.prefixes
                {
                    v.prefixes = entry.prefixes.iter().copied().collect();
                }
                v.entry = entry.clone();
            }
            next.push(replica);
        }
        for r in current.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, r)) {
                tracing::info!(replica = %r.url, "replica removed");
            }
        }
        *self.replicas.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// The replicas now.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// ModelInfo from the first replica that answers, retrying every 200 ms for `wait`.
    pub async fn model_info(&self, wait: Duration) -> Result<pb::ModelInfoResponse, GatewayError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut last = None;
            for r in self.replicas().iter() {
                let mut client = r.client.clone();
                let call = client.model_info(pb::ModelInfoRequest {});
                match tokio::time::timeout(self.rpc_timeout, call).await {
                    Ok(Ok(resp)) => return Ok(resp.into_inner()),
                    Ok(Err(status)) => last = Some(coordinator_error(&r.url, status)),
                    Err(_) => last = Some(coordinator_error(&r.url, "ModelInfo timed out")),
                }
            }
            if Instant::now() >= deadline {
                return Err(last.unwrap_or(GatewayError::NoReplicas));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The replica for a request whose leading block keys are `keys`, among those not in
    /// `tried`; usable ones first, then any (a marked replica may have come back).
    pub fn pick(&self, keys: &[u64], tried: &[Arc<Replica>]) -> Option<Arc<Replica>> {
        let all = self.replicas();
        let now = Instant::now();
        let fresh: Vec<&Arc<Replica>> = all
            .iter()
            .filter(|r| !tried.iter().any(|t| Arc::ptr_eq(t, r)))
            .collect();
        let usable: Vec<&Arc<Replica>> = fresh.iter().copied().filter(|r| r.usable(now)).collect();
        let cands = if usable.is_empty() { fresh } else { usable };
        if cands.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.routing {
            Routing::RoundRobin => cands[n % cands.len()],
            Routing::LeastLoaded => two_choices(&cands, n),
            Routing::Prefix => {
                let least = cands.iter().map(|r| r.load()).min().unwrap_or(0);
                let enough = keys.len().div_ceil(2).max(1);
                let best = cands
                    .iter()
                    .map(|r| (r.cached_blocks(keys), r))
                    .filter(|(blocks, r)| {
                        *blocks >= enough && r.load() <= least + self.overload_slack
                    })
                    // Longest prefix; among equals the least loaded.
                    .max_by_key(|(blocks, r)| (*blocks, std::cmp::Reverse(r.load())));
                match best {
                    Some((_, r)) => r,
                    None => two_choices(&cands, n),
                }
            }
        };
        Some(chosen.clone())
    }

    /// Starts a generation and waits for its first message. A replica that fails before the
    /// first token is marked and the request goes to another one (each replica once).
    pub async fn start(
        &self,
        req: pb::GenerateRequest,
        keys: &[u64],
    ) -> Result<Started, tonic::Status> {
        let mut tried: Vec<Arc<Replica>> = Vec::new();
        let mut last = tonic::Status::unavailable("no replica is registered");
        while let Some(replica) = self.pick(keys, &tried) {
            tried.push(replica.clone());
            let inflight = InFlight::new(replica.clone());
            let mut client = replica.client.clone();
            let attempt = async {
                let mut request = tonic::Request::new(req.clone());
                r4b_telemetry::inject(&tracing::Span::current(), request.metadata_mut());
                let mut stream = client.generate(request).await?.into_inner();
                let first = stream.message().await?.ok_or_else(|| {
                    tonic::Status::unavailable(
                        "the coordinator closed a stream before its first message",
                    )
                })?;
                Ok::<_, tonic::Status>((stream, first))
            };
            match attempt.await {
                Ok((stream, first)) => {
                    // The replica now holds this prompt's blocks: known here at once, before
                    // its next published summary (which replaces this guess).
                    if self.routing == Routing::Prefix {
                        replica.view().prefixes.extend(keys.iter().copied());
                    }
                    return Ok(Started {
                        stream,
                        first,
                        inflight,
                    });
                }
                Err(status) if replica_failed(&status) => {
                    replica.eject(&status);
                    tracing::warn!(replica = %replica.url, %status, "request not started; trying another replica");
                    last = status;
                }
                // Its queue is full: another replica may have room (the 429 stands if none has).
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    tracing::debug!(replica = %replica.url, "queue full; trying another replica");
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }

    /// Health of every replica (errors and timeouts as `Err`). `no_probe`: the replicas answer
    /// from their state without running a probe forward.
    pub async fn health(
        &self,
        no_probe: bool,
    ) -> Vec<(String, Result<pb::HealthResponse, tonic::Status>)> {
        let all = self.replicas();
        let calls = all.iter().map(|r| async move {
            let mut client = r.client.clone();
            let req = pb::HealthRequest { no_probe };
            let result = match tokio::time::timeout(self.rpc_timeout, client.health(req)).await {
                Ok(res) => res.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("Health timed out")),
            };
            (r.url.clone(), result)
        });
        futures::future::join_all(calls).await
    }

    /// Load of every replica (errors and timeouts as `Err`).
    pub async fn load(&self) -> Vec<(String, Result<pb::LoadResponse, tonic::Status>)> {
        let all = self.replicas();
        let calls = all.iter().map(|r| async move {
            let mut client = r.client.clone();
            let result =
                match tokio::time::timeout(self.rpc_timeout, client.load(pb::LoadRequest {})).await
                {
                    Ok(res) => res.map(tonic::Response::into_inner),
                    Err(_) => Err(tonic::Status::deadline_exceeded("Load timed out")),
                };
            (r.url.clone(), result)
        });
        futures::future::join_all(calls).await
    }
}

/// Power of two choices: the less loaded of two candidates drawn from `n`.
fn two_choices<'a>(cands: &[&'a Arc<Replica>], n: usize) -> &'a Arc<Replica> {
    let len = cands.len();
    if len == 1 {
        return cands[0];
    }
    let r = mix(n as u64);
    let a = (r % len as u64) as usize;
    let b = (a + 1 + ((r >> 32) % (len as u64 - 1)) as usize) % len;
    let (ra, rb) = (cands[a], cands[b]);
    if rb.load() < ra.load() {
        rb
    } else {
        ra
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(url: &str, load: u32, prefixes: &[u64]) -> ReplicaEntry {
        let mut e = ReplicaEntry::static_url(url);
        e.waiting = load;
        e.set_prefixes(prefixes);
        e
    }

    fn pool(routing: Routing, entries: Vec<ReplicaEntry>) -> ReplicaPool {
        let p = ReplicaPool::new(Duration::from_secs(1), None, routing, 4);
        let set: BTreeMap<_, _> = entries.into_iter().map(|e| (e.id.clone(), e)).collect();
        p.apply(&Arc::new(set));
        p
    }

    fn url_of(r: Option<Arc<Replica>>) -> String {
        r.map(|r| r.url.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn prefix_wins_unless_overloaded() {
        let p = pool(
            Routing::Prefix,
            vec![
                entry("http://a:1", 0, &[]),
                entry("http://b:1", 2, &[10, 11, 12]),
                entry("http://c:1", 0, &[10, 11]),
            ],
        );
        for _ in 0..10 {
            assert_eq!(url_of(p.pick(&[10, 11, 12], &[])), "http://b:1");
        }
        // b is too busy: c has the next longest prefix.
        let p = pool(
            Routing::Prefix,
            vec![
                entry("http://a:1", 0, &[]),
                entry("http://b:1", 9, &[10, 11, 12]),
                entry("http://c:1", 1, &[10, 11]),
            ],
        );
        assert_eq!(url_of(p.pick(&[10, 11, 12], &[])), "http://c:1");
        // A match on under half of the prompt's blocks does not count: least-loaded decides.
        let p = pool(
            Routing::Prefix,
            vec![entry("http://a:1", 3, &[10]), entry("http://b:1", 0, &[])],
        );
        for _ in 0..10 {
            assert_eq!(url_of(p.pick(&[10, 11, 12], &[])), "http://b:1");
        }
    }

    #[tokio::test]
    async fn two_choices_avoid_the_busiest_and_failed_ones_are_skipped() {
        let p = pool(
            Routing::LeastLoaded,
            vec![entry("http://a:1", 50, &[]), entry("http://b:1", 0, &[])],
        );
        for _ in 0..10 {
            assert_eq!(url_of(p.pick(&[], &[])), "http://b:1");
        }
        let b = p.pick(&[], &[]).unwrap_or_else(|| panic!("no pick"));
        b.eject(&tonic::Status::unavailable("test"));
        assert_eq!(url_of(p.pick(&[], &[])), "http://a:1");
        // Only marked ones left: still tried rather than nothing.
        let a = p.replicas()[0].clone();
        assert_eq!(url_of(p.pick(&[], &[a])), "http://b:1");
    }

    #[tokio::test]
    async fn not_ready_replicas_are_avoided_and_round_robin_alternates() {
        let mut busy = entry("http://a:1", 0, &[]);
        busy.ready = false;
        let p = pool(Routing::RoundRobin, vec![busy, entry("http://b:1", 0, &[])]);
        assert_eq!(url_of(p.pick(&[], &[])), "http://b:1");
        let p = pool(
            Routing::RoundRobin,
            vec![entry("http://a:1", 0, &[]), entry("http://b:1", 0, &[])],
        );
        let picks: HashSet<String> = (0..4).map(|_| url_of(p.pick(&[], &[]))).collect();
        assert_eq!(picks.len(), 2);
    }
}
