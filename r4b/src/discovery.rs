//! Discovery wiring of the split roles: a gateway's replica source (`--coordinator` list or
//! `--etcd`), and a coordinator's etcd registration (`--etcd`), kept current from its engine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use r4b_coordinator::EngineHandle;
use r4b_discovery::{Discovery, ReplicaEntry, StaticDiscovery};
use r4b_proto::v1 as pb;

/// How often a coordinator refreshes its entry (it is put only when it changed).
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub const REFRESH: Duration = Duration::from_millis(200);
/// How often it refreshes its prefix keys (up to 32 KiB; the gateway also counts the keys of
/// the requests it just sent as held, so a slower refresh costs little).
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub const PREFIX_REFRESH: Duration = Duration::from_secs(1);

/// etcd flags (gateway and coordinator).
#[derive(Args, Debug, Clone)]
pub struct EtcdOpts {
    /// etcd endpoints (`http://host:2379`), comma-separated or repeated. A coordinator registers
    /// its replica there; a gateway routes to the replicas registered there. Needs a binary
    /// built with `--features etcd`.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of the registrations.
    #[arg(long, default_value = r4b_discovery::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
}

/// The gateway's replica source: etcd when `--etcd` is given, else the static list.
pub async fn gateway_source(
    etcd: &EtcdOpts,
    coordinators: &[String],
) -> Result<Arc<dyn Discovery>> {
    if etcd.etcd.is_empty() {
        return Ok(Arc::new(StaticDiscovery::new(coordinators)?));
    }
    if !coordinators.is_empty() {
        bail!("--coordinator and --etcd exclude each other");
    }
    etcd_source(etcd).await
}

#[cfg(feature = "etcd")]
async fn etcd_source(etcd: &EtcdOpts) -> Result<Arc<dyn Discovery>> {
    use anyhow::Context;
    let d = r4b_discovery::etcd::EtcdDiscovery::start(
        r4b_discovery::etcd::endpoints(&etcd.etcd),
        etcd.etcd_prefix.clone(),
    );
    d.synced(Duration::from_secs(30))
        .await
        .with_context(|| format!("reading the registrations from etcd {:?}", etcd.etcd))?;
    Ok(Arc::new(d))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_source(_: &EtcdOpts) -> Result<Arc<dyn Discovery>> {
    Err(r4b_discovery::DiscoveryError::NoEtcd.into())
}

/// A coordinator's registration and the task that keeps its entry current.
#[derive(Debug)]
pub struct Announced {
    #[cfg(feature = "etcd")]
    reg: r4b_discovery::etcd::Registration,
    task: tokio::task::JoinHandle<()>,
}

impl Announced {
    /// Removes the registration now (drain, shutdown, failure).
    pub async fn withdraw(self) {
        self.task.abort();
        #[cfg(feature = "etcd")]
        self.reg.revoke(Duration::from_secs(2)).await;
    }
}

/// The entry of a replica from its engine's state.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn entry_of(
    id: &str,
    url: &str,
    info: &pb::ModelInfoResponse,
    engine: &EngineHandle,
    keys: &[u64],
) -> ReplicaEntry {
    let stats = engine.stats();
    let mut e = ReplicaEntry {
        id: id.to_string(),
        url: url.to_string(),
        model: info.model_name.clone(),
        tp: info.tensor_parallel_size,
        ready: stats.state == pb::ReplicaState::Serving,
        waiting: stats.load.waiting,
        running: stats.load.running,
        kv_free: stats
            .load
            .kv_blocks_total
            .saturating_sub(stats.load.kv_blocks_used),
        kv_total: stats.load.kv_blocks_total,
        block_size: info.block_size,
        ..Default::default()
    };
    e.set_prefixes(keys);
    e
}

/// Registers the replica reachable at `url` with etcd (when `--etcd` is given) and keeps its
/// entry current: load, readiness and prefix keys, checked every [`REFRESH`] and put on change.
pub fn announce(
    etcd: &EtcdOpts,
    url: &str,
    info: &pb::ModelInfoResponse,
    engine: &EngineHandle,
    ttl: i64,
) -> Result<Option<Announced>> {
    if etcd.etcd.is_empty() {
        return Ok(None);
    }
    announce_etcd(etcd, url, info, engine, ttl).map(Some)
}

#[cfg(feature = "etcd")]
fn announce_etcd(
    etcd: &EtcdOpts,
    url: &str,
    info: &pb::ModelInfoResponse,
    engine: &EngineHandle,
    ttl: i64,
) -> Result<Announced> {
    let id = r4b_discovery::id_for_url(url);
    let (tx, rx) = tokio::sync::watch::channel(entry_of(&id, url, info, engine, &[]));
    let (url, info, engine) = (url.to_string(), info.clone(), engine.clone());
    let task = tokio::spawn(async move {
        let mut version = None;
        let mut keys = Vec::new();
        let mut tick = tokio::time::interval(REFRESH);
        let mut keys_at: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            if keys_at.is_none_or(|t| t.elapsed() >= PREFIX_REFRESH) {
                keys_at = Some(tokio::time::Instant::now());
                if let Some((v, k)) = engine
                    .prefix_keys(version, r4b_discovery::MAX_PREFIX_HASHES)
                    .await
                {
                    version = Some(v);
                    keys = k;
                }
            }
            let next = entry_of(&id, &url, &info, &engine, &keys);
            tx.send_if_modified(|e| {
                let changed = *e != next;
                if changed {
                    *e = next;
                }
                changed
            });
        }
    });
    let reg = r4b_discovery::etcd::Registration::start(
        r4b_discovery::etcd::endpoints(&etcd.etcd),
        etcd.etcd_prefix.clone(),
        rx,
        ttl,
    );
    Ok(Announced { reg, task })
}

#[cfg(not(feature = "etcd"))]
fn announce_etcd(
    _: &EtcdOpts,
    _: &str,
    _: &pb::ModelInfoResponse,
    _: &EngineHandle,
    _: i64,
) -> Result<Announced> {
    Err(r4b_discovery::DiscoveryError::NoEtcd.into())
}
