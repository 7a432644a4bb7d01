//! etcd discovery: [`Registration`] (a coordinator's entry under a lease) and [`EtcdDiscovery`]
//! (a gateway's view of the prefix: get, then watch from the revision read).
//!
//! Both reconnect on their own, every [`RETRY`], for as long as they live. While etcd is away a
//! gateway keeps the last set it knew and a coordinator keeps serving; when etcd is back the
//! coordinator registers again under a new lease and the gateway reads the prefix afresh.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::{
    decode_prefixes, encode_prefixes, prefixes_key, Discovery, DiscoveryError, ReplicaEntry,
    ReplicaSet, PREFIXES_SUFFIX,
};

/// Pause between attempts to reach etcd.
pub const RETRY: Duration = Duration::from_millis(500);
/// Time limit of one unary etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

fn err(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Etcd(e.to_string())
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(DiscoveryError::Etcd(format!("{what} timed out"))),
    }
}

async fn connect(endpoints: &[String]) -> Result<Client, DiscoveryError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        // A vanished etcd (host down, no RST) is noticed within ~4 s on a silent stream.
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    call("connect", Client::connect(endpoints, Some(opts))).await
}

/// Endpoints from `--etcd` values: `http://host:port` or `host:port`, several comma-separated.
pub fn endpoints(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect()
}

/// A coordinator's registration: its entry under `<prefix><id>` (JSON) and its prefix keys under
/// `<prefix><id>/prefixes` (little-endian `u64`s), both attached to a lease that is renewed every
/// third of its TTL and revoked by [`Registration::revoke`]. Each key is put again when its part
/// of the watched value changes (the caller rate-limits the changes).
#[derive(Debug)]
pub struct Registration {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    lease: watch::Receiver<i64>,
}

impl Registration {
    /// Starts registering `entry` (its current and future values) with etcd at `endpoints`;
    /// `ttl`: the lease's time to live in seconds (at least 2).
    pub fn start(
        endpoints: Vec<String>,
        prefix: String,
        entry: watch::Receiver<ReplicaEntry>,
        ttl: i64,
    ) -> Self {
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let (lease_tx, lease_rx) = watch::channel(0);
        let ttl = ttl.max(2);
        let task = tokio::spawn(async move {
            let mut entry = entry;
            let mut quiet = false;
            loop {
                let once = register_once(&endpoints, &prefix, &mut entry, ttl, &lease_tx);
                tokio::select! {
                    r = once => {
                        lease_tx.send_replace(0);
                        if let Err(e) = r {
                            if !quiet {
                                tracing::warn!(error = %e, "etcd registration lost; retrying every {RETRY:?}");
                            }
                            quiet = true;
                        }
                    }
                    _ = &mut stop_rx => {
                        let lease = *lease_tx.borrow();
                        if lease != 0 {
                            if let Ok(mut c) = connect(&endpoints).await {
                                match call("lease revoke", c.lease_revoke(lease)).await {
                                    Ok(_) => tracing::info!(lease, "etcd registration revoked"),
                                    Err(e) => tracing::warn!(error = %e, "revoking the etcd lease"),
                                }
                            }
                        }
                        return;
                    }
                }
                tokio::time::sleep(RETRY).await;
                if *lease_tx.borrow() != 0 {
                    quiet = false;
                }
            }
        });
        Registration {
            stop: Some(stop_tx),
            task,
            lease: lease_rx,
        }
    }

    /// The lease the entry currently lives under (0: not registered now).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Revokes the lease (the entry disappears at once) and stops renewing it.
    pub async fn revoke(mut self, timeout: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(timeout, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// One registration under one lease, until an error.
async fn register_once(
    endpoints: &[String],
    prefix: &str,
    entry: &mut watch::Receiver<ReplicaEntry>,
    ttl: i64,
    lease_tx: &watch::Sender<i64>,
) -> Result<(), DiscoveryError> {
    let mut client = connect(endpoints).await?;
    let lease = call("lease grant", client.lease_grant(ttl, None))
        .await?
        .id();
    let (mut keeper, mut acks) = call("lease keep-alive", client.lease_keep_alive(lease)).await?;
    let key = |e: &ReplicaEntry| format!("{prefix}{}", e.id);
    // What was put last: the entry (its prefixes aside) and the prefix keys.
    let mut put_entry: Option<ReplicaEntry> = None;
    let mut put_keys: Option<Arc<Vec<u64>>> = None;
    let mut current = entry.borrow_and_update().clone();
    let mut renew = tokio::time::interval(Duration::from_millis(ttl as u64 * 1000 / 3));
    let mut last_ack = tokio::time::Instant::now();
    loop {
        let mut main = current.clone();
        main.prefixes = Arc::default();
        main.lease = lease;
        if put_entry.as_ref() != Some(&main) {
            let value = serde_json::to_vec(&main)?;
            let opts = PutOptions::new().with_lease(lease);
            call("put", client.put(key(&main), value, Some(opts))).await?;
            if put_entry.is_none() {
                lease_tx.send_replace(lease);
                tracing::info!(lease, key = %key(&main), "registered in etcd");
            }
            put_entry = Some(main);
        }
        if put_keys.as_ref() != Some(&current.prefixes) {
            let opts = PutOptions::new().with_lease(lease);
            let value = encode_prefixes(&current.prefixes);
            let k = prefixes_key(prefix, &current.id);
            call("put", client.put(k, value, Some(opts))).await?;
            put_keys = Some(current.prefixes.clone());
        }
        let changed = renew_until_change(
            &mut keeper,
            &mut acks,
            entry,
            ttl,
            lease,
            &mut renew,
            &mut last_ack,
        )
        .await?;
        if changed {
            current = entry.borrow_and_update().clone();
        }
    }
}

/// Renews the lease until the entry changes (`Ok(true)`), its owner is gone and the lease is
/// to be kept as is (never returns), or an error.
async fn renew_until_change(
    keeper: &mut etcd_client::LeaseKeeper,
    acks: &mut etcd_client::LeaseKeepAliveStream,
    entry: &mut watch::Receiver<ReplicaEntry>,
    ttl: i64,
    lease: i64,
    renew: &mut tokio::time::Interval,
    last_ack: &mut tokio::time::Instant,
) -> Result<bool, DiscoveryError> {
    loop {
        tokio::select! {
            _ = renew.tick() => {
                if last_ack.elapsed() > Duration::from_secs(ttl as u64) {
                    return Err(DiscoveryError::Etcd("no lease renewal acknowledged within its TTL".into()));
                }
                keeper.keep_alive().await.map_err(err)?;
            }
            ack = acks.message() => match ack.map_err(err)? {
                Some(a) if a.ttl() > 0 => *last_ack = tokio::time::Instant::now(),
                Some(_) => return Err(DiscoveryError::Etcd(format!("lease {lease} expired"))),
                None => return Err(DiscoveryError::Etcd("keep-alive stream ended".into())),
            },
            changed = entry.changed() => {
                if changed.is_err() {
                    // The owner is gone: stop renewing; the lease runs out.
                    std::future::pending::<()>().await;
                }
                return Ok(true);
            }
        }
    }
}

/// A gateway's view of the registrations under a prefix.
#[derive(Debug)]
pub struct EtcdDiscovery {
    tx: watch::Sender<ReplicaSet>,
    synced: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EtcdDiscovery {
    /// Starts following `prefix` on etcd at `endpoints`. The set starts empty and is replaced by
    /// each full read (at start and after every reconnection), then kept current by the watch.
    pub fn start(endpoints: Vec<String>, prefix: String) -> Self {
        let tx = watch::Sender::new(ReplicaSet::default());
        let (synced_tx, synced) = watch::channel(false);
        let task_tx = tx.clone();
        let task = tokio::spawn(async move {
            let mut quiet = false;
            loop {
                if let Err(e) = follow(&endpoints, &prefix, &task_tx, &synced_tx).await {
                    if !quiet {
                        tracing::warn!(error = %e, "etcd watch lost; routing on the last known {} replicas", task_tx.borrow().len());
                    }
                    quiet = true;
                } else {
                    quiet = false;
                }
                tokio::time::sleep(RETRY).await;
            }
        });
        EtcdDiscovery { tx, synced, task }
    }

    /// Waits until the prefix was read once, or `timeout`.
    pub async fn synced(&self, timeout: Duration) -> Result<(), DiscoveryError> {
        let mut rx = self.synced.clone();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        );
        if ok {
            Ok(())
        } else {
            Err(DiscoveryError::Etcd(format!(
                "could not read the registrations within {timeout:?}"
            )))
        }
    }
}

impl Discovery for EtcdDiscovery {
    fn subscribe(&self) -> watch::Receiver<ReplicaSet> {
        self.tx.subscribe()
    }
}

/// What the watched prefix holds: entries and prefix keys by replica id.
#[derive(Default)]
struct Known {
    entries: BTreeMap<String, ReplicaEntry>,
    keys: BTreeMap<String, Arc<Vec<u64>>>,
}

impl Known {
    /// Applies a put (`Some(kv)`) or a delete (`None` value) of `key`.
    fn apply(&mut self, prefix: &str, kv: &KeyValue, deleted: bool) {
        let Some(rest) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| k.strip_prefix(prefix))
        else {
            return;
        };
        if let Some(id) = rest.strip_suffix(PREFIXES_SUFFIX) {
            if deleted {
                self.keys.remove(id);
            } else {
                self.keys
                    .insert(id.to_string(), Arc::new(decode_prefixes(kv.value())));
            }
            return;
        }
        if deleted {
            self.entries.remove(rest);
            return;
        }
        match serde_json::from_slice::<ReplicaEntry>(kv.value()) {
            Ok(mut e) => {
                e.id = rest.to_string();
                e.lease = kv.lease();
                self.entries.insert(rest.to_string(), e);
            }
            Err(e) => tracing::warn!(key = rest, error = %e, "ignoring an unreadable registration"),
        }
    }

    /// The entries with their prefix keys.
    fn set(&self) -> ReplicaSet {
        let mut set = self.entries.clone();
        for (id, e) in set.iter_mut() {
            if let Some(k) = self.keys.get(id) {
                e.prefixes = k.clone();
            }
        }
        Arc::new(set)
    }
}

/// Reads the prefix, publishes it, then applies the watch's events until an error.
async fn follow(
    endpoints: &[String],
    prefix: &str,
    tx: &watch::Sender<ReplicaSet>,
    synced: &watch::Sender<bool>,
) -> Result<(), DiscoveryError> {
    let mut client = connect(endpoints).await?;
    let resp = call(
        "get",
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut known = Known::default();
    for kv in resp.kvs() {
        known.apply(prefix, kv, false);
    }
    tracing::info!(
        replicas = known.entries.len(),
        revision,
        "etcd: registrations read"
    );
    tx.send_replace(known.set());
    synced.send_replace(true);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = call("watch", client.watch(prefix, Some(opts))).await?;
    while let Some(resp) = stream.message().await.map_err(err)? {
        if resp.canceled() {
            return Err(DiscoveryError::Etcd(format!(
                "watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        if resp.events().is_empty() {
            continue;
        }
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                known.apply(prefix, kv, ev.event_type() == EventType::Delete);
            }
        }
        tx.send_replace(known.set());
    }
    Err(DiscoveryError::Etcd("watch stream ended".into()))
}
