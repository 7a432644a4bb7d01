//! `r4b-discovery`: how a gateway finds the replicas (coordinators) it routes to.
//!
//! A [`Discovery`] hands out a [`tokio::sync::watch`] of the current [`ReplicaSet`]. Two
//! implementations:
//! * [`StaticDiscovery`]: a fixed list of coordinator URLs (`r4b gateway --coordinator`); nothing
//!   is known of their load but what the gateway counts itself.
//! * `etcd::EtcdDiscovery` (feature `etcd`): coordinators register a [`ReplicaEntry`] under
//!   `<prefix><id>` with a lease ([`etcd::Registration`]); gateways get the prefix and watch it
//!   from the revision they read. While etcd is away the last known set stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[cfg(feature = "etcd")]
pub mod etcd;

/// Default key prefix of the registrations.
pub const DEFAULT_PREFIX: &str = "/r4b/replicas/";

/// Most block hashes a replica publishes (8 bytes each).
pub const MAX_PREFIX_HASHES: usize = 4096;

/// What a coordinator publishes about its replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEntry {
    /// Registration id (the key's last segment).
    pub id: String,
    /// Where gateways reach its Coordinator gRPC service (`http://host:port`).
    pub url: String,
    /// Served model name.
    pub model: String,
    /// Tensor-parallel size.
    pub tp: u32,
    /// Whether it serves (false while its workers restart).
    pub ready: bool,
    /// Requests waiting for admission.
    pub waiting: u32,
    /// Requests being generated.
    pub running: u32,
    /// KV blocks a new request can still get (free or evictable).
    pub kv_free: u32,
    /// KV blocks in all.
    pub kv_total: u32,
    /// Tokens per KV block (the prefix hashes are per block).
    pub block_size: u32,
    /// The first 8 bytes (little-endian `u64`) of the chained hashes of the KV blocks the replica
    /// holds or caches, most recently used first, at most [`MAX_PREFIX_HASHES`]. Not part of the
    /// entry's JSON: etcd keeps them under their own key ([`prefixes_key`]), put less often than
    /// the load, so that load updates stay small.
    #[serde(skip)]
    pub prefixes: Arc<Vec<u64>>,
    /// The etcd lease the entry lives under (0 for a static entry); a new lease means a new
    /// process or a new registration.
    #[serde(default)]
    pub lease: i64,
}

impl ReplicaEntry {
    /// A static entry: only the URL is known; counted as ready.
    pub fn static_url(url: &str) -> Self {
        ReplicaEntry {
            id: url.to_string(),
            url: url.to_string(),
            ready: true,
            ..Default::default()
        }
    }

    /// Sets [`ReplicaEntry::prefixes`] (at most [`MAX_PREFIX_HASHES`]).
    pub fn set_prefixes(&mut self, hashes: &[u64]) {
        self.prefixes = Arc::new(hashes.iter().take(MAX_PREFIX_HASHES).copied().collect());
    }
}

/// Suffix of the key that holds a replica's prefix keys (`<prefix><id>/prefixes`).
pub const PREFIXES_SUFFIX: &str = "/prefixes";

/// The key of replica `id`'s prefix keys under `prefix`.
pub fn prefixes_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{id}{PREFIXES_SUFFIX}")
}

/// The value of a prefix-keys key: the keys as concatenated little-endian `u64`s.
pub fn encode_prefixes(keys: &[u64]) -> Vec<u8> {
    keys.iter()
        .take(MAX_PREFIX_HASHES)
        .flat_map(|h| h.to_le_bytes())
        .collect()
}

/// The keys of a prefix-keys value (a trailing partial key is ignored).
pub fn decode_prefixes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .take(MAX_PREFIX_HASHES)
        .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
        .collect()
}

/// The known replicas, by registration id.
pub type ReplicaSet = Arc<BTreeMap<String, ReplicaEntry>>;

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No coordinator URL was given.
    #[error("no coordinator given")]
    Empty,
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A registration could not be encoded.
    #[error("encoding the registration: {0}")]
    Encode(#[from] serde_json::Error),
    /// Built without the `etcd` feature.
    #[error(
        "this binary was built without etcd support; rebuild with `--features etcd` \
         (its build needs protoc: apt-get install protobuf-compiler)"
    )]
    NoEtcd,
}

/// A source of the current replica set.
pub trait Discovery: Send + Sync + std::fmt::Debug {
    /// The set, updated in place as replicas come and go.
    fn subscribe(&self) -> watch::Receiver<ReplicaSet>;
}

/// A fixed list of coordinator URLs.
#[derive(Debug)]
pub struct StaticDiscovery {
    tx: watch::Sender<ReplicaSet>,
}

impl StaticDiscovery {
    /// The replicas at `urls`.
    pub fn new(urls: &[String]) -> Result<Self, DiscoveryError> {
        if urls.is_empty() {
            return Err(DiscoveryError::Empty);
        }
        let set = urls
            .iter()
            .map(|u| (u.clone(), ReplicaEntry::static_url(u)))
            .collect();
        Ok(StaticDiscovery {
            tx: watch::Sender::new(Arc::new(set)),
        })
    }
}

impl Discovery for StaticDiscovery {
    fn subscribe(&self) -> watch::Receiver<ReplicaSet> {
        self.tx.subscribe()
    }
}

/// The registration id for a coordinator reachable at `url`: its host and port, with
/// characters other than `[A-Za-z0-9._-]` replaced by `_`.
pub fn id_for_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_and_are_bounded() {
        let mut e = ReplicaEntry::default();
        let hashes: Vec<u64> = (0..(MAX_PREFIX_HASHES as u64 + 10))
            .map(|i| i * 77)
            .collect();
        e.set_prefixes(&hashes);
        assert_eq!(e.prefixes[..], hashes[..MAX_PREFIX_HASHES]);
        let bytes = encode_prefixes(&hashes);
        assert_eq!(bytes.len(), 8 * MAX_PREFIX_HASHES);
        assert_eq!(decode_prefixes(&bytes), hashes[..MAX_PREFIX_HASHES]);
        assert_eq!(decode_prefixes(&bytes[..11]), hashes[..1]);
        // Not in the JSON.
        let json = serde_json::to_string(&e).unwrap_or_default();
        assert!(!json.contains("prefixes"), "{json}");
    }

    #[test]
    fn ids_from_urls() {
        assert_eq!(id_for_url("http://10.0.0.7:50051"), "10.0.0.7_50051");
        assert_eq!(id_for_url("http://[::1]:5/"), "___1__5");
    }

    #[test]
    fn static_list() {
        assert!(StaticDiscovery::new(&[]).is_err());
        let d = StaticDiscovery::new(&["http://a:1".into(), "http://b:2".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let set = d.subscribe().borrow().clone();
        assert_eq!(set.len(), 2);
        assert!(set.values().all(|e| e.ready));
    }
}
