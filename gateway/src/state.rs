//! [`AppState`]: what every handler shares (config, model files, image pipeline, replicas,
//! metrics). Built once by [`AppState::connect`], which asks a coordinator for the model facts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use r4b_model::anyres::ImageGeometry;
use r4b_proto::v1 as pb;

use crate::config::GatewayConfig;
use crate::images::ImagePipeline;
use crate::metrics::Metrics;
use crate::model_files::ModelFiles;
use crate::replica::ReplicaPool;
use crate::startup::GatewayError;
use r4b_discovery::{Discovery, StaticDiscovery};

/// Shared state of the HTTP handlers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shutdown: Shutdown,
    config: GatewayConfig,
    files: ModelFiles,
    images: ImagePipeline,
    replicas: Arc<ReplicaPool>,
    /// Keeps the replica set followed (etcd: its watch task).
    _discovery: Arc<dyn Discovery>,
    block_size: usize,
    metrics: Arc<Metrics>,
    extra_metrics: std::sync::OnceLock<crate::metrics::ExtraMetrics>,
    max_model_len: usize,
    vocab_size: u32,
    image_token_id: Option<u32>,
    created: u64,
}

/// The gateway's part of a graceful shutdown: once [`Shutdown::start_draining`] ran, `/ready` is
/// 503 and new generation requests get 503; [`Shutdown::end_streams`] makes every open
/// generation end now with an error (an SSE error event and `[DONE]` for streams).
#[derive(Debug)]
pub struct Shutdown {
    draining: AtomicBool,
    end: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            draining: AtomicBool::new(false),
            end: watch::channel(false).0,
        }
    }
}

impl Shutdown {
    /// Stops admitting generation requests.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ends every open generation with an error.
    pub fn end_streams(&self) {
        self.start_draining();
        self.end.send_replace(true);
    }

    /// Resolves once [`Shutdown::end_streams`] ran.
    pub async fn streams_ended(&self) {
        let mut rx = self.end.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Image geometry from ModelInfo; `None` when the coordinator reports none (text-only) or an
/// unusable one.
fn geometry_of(info: &pb::ModelInfoResponse) -> Option<ImageGeometry> {
    if info.tile == 0
        || info.patch == 0
        || info.pinpoints.is_empty()
        || !info.pinpoints.chunks_exact(2).remainder().is_empty()
    {
        return None;
    }
    let geometry = ImageGeometry {
        tile: info.tile as usize,
        patch: info.patch as usize,
        pinpoints: info
            .pinpoints
            .chunks_exact(2)
            .map(|p| (p[0] as usize, p[1] as usize))
            .collect(),
        max_tiles: info.anyres_max_tiles as usize,
    };
    match geometry.validate() {
        Ok(()) => Some(geometry),
        Err(e) => {
            tracing::warn!(error = %e, "coordinator reported an unusable image geometry; images are refused");
            None
        }
    }
}

impl AppState {
    /// Connects to the coordinators and reads ModelInfo (retrying for `config.connect_timeout`).
    /// The context length is the smaller of the configured and the coordinator's (0 = unset);
    /// an empty `served_model_name` takes the coordinator's model name.
    pub async fn connect(
        config: GatewayConfig,
        files: ModelFiles,
        coordinator_urls: Vec<String>,
    ) -> Result<Self, GatewayError> {
        let discovery =
            StaticDiscovery::new(&coordinator_urls).map_err(|_| GatewayError::NoReplicas)?;
        Self::connect_with(config, files, Arc::new(discovery)).await
    }

    /// Like [`AppState::connect`], with the replicas from `discovery` (followed as they change);
    /// waits up to `config.connect_timeout` for one to answer ModelInfo.
    pub async fn connect_with(
        mut config: GatewayConfig,
        files: ModelFiles,
        discovery: Arc<dyn Discovery>,
    ) -> Result<Self, GatewayError> {
        let replicas = Arc::new(
            ReplicaPool::new(
                config.rpc_timeout,
                config.cluster_secret.as_ref(),
                config.routing,
                config.prefix_overload_slack,
            )
            .with_tls(config.coordinator_tls.clone()),
        );
        replicas.follow(discovery.subscribe());
        let info = replicas.model_info(config.connect_timeout).await?;
        let max_model_len = match (config.max_model_len, info.max_model_len as usize) {
            (0, 0) => {
                return Err(GatewayError::Mismatch(
                    "max_model_len is set neither here nor by the coordinator".into(),
                ))
            }
            (0, c) => c,
            (g, 0) => g,
            (g, c) => g.min(c),
        };
        let image_token_id = files.image_token_id();
        if let Some(tok_id) = image_token_id {
            if info.image_token_id != 0 && info.image_token_id != tok_id {
                return Err(GatewayError::Mismatch(format!(
                    "the coordinator's image_token_id is {} but the tokenizer's `<image>` is {tok_id}",
                    info.image_token_id
                )));
            }
        }
        if config.served_model_name.is_empty() {
            config.served_model_name = info.model_name.clone();
        }
        let images =
            ImagePipeline::new(geometry_of(&info), files.resample(), &config).map_err(|e| {
                GatewayError::Coordinator {
                    url: "image fetcher".into(),
                    reason: e.to_string(),
                }
            })?;
        // Gives memory back after large requests (see `trim`).
        tokio::spawn(crate::trim::run(std::time::Duration::from_secs(1)));
        let metrics = Arc::new(Metrics::new(&config.served_model_name)?);
        Ok(AppState {
            inner: Arc::new(Inner {
                shutdown: Shutdown::default(),
                config,
                files,
                images,
                replicas,
                _discovery: discovery,
                block_size: info.block_size as usize,
                metrics,
                extra_metrics: std::sync::OnceLock::new(),
                max_model_len,
                vocab_size: info.vocab_size,
                image_token_id,
                created: unix_now(),
            }),
        })
    }

    /// Shutdown state: draining, and the signal that ends the streams still open.
    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// The configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// Tokenizer, template and special ids.
    pub fn files(&self) -> &ModelFiles {
        &self.inner.files
    }

    /// The image pipeline.
    pub fn images(&self) -> &ImagePipeline {
        &self.inner.images
    }

    /// The coordinators.
    pub fn replicas(&self) -> &ReplicaPool {
        &self.inner.replicas
    }

    /// Tokens per KV block of the replicas (0: unknown; no prefix-aware routing).
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Appends `text()` to every `/metrics` answer (set once; later calls are ignored).
    pub fn set_extra_metrics(&self, text: impl Fn() -> String + Send + Sync + 'static) {
        let _ = self
            .inner
            .extra_metrics
            .set(crate::metrics::ExtraMetrics(Box::new(text)));
    }

    /// The text set by [`AppState::set_extra_metrics`], if any.
    pub fn extra_metrics(&self) -> Option<String> {
        self.inner.extra_metrics.get().map(|f| (f.0)())
    }

    /// Context length in tokens.
    pub fn max_model_len(&self) -> usize {
        self.inner.max_model_len
    }

    /// The model's vocabulary size (ModelInfo); 0 when the coordinator did not say.
    pub fn vocab_size(&self) -> u32 {
        self.inner.vocab_size
    }

    /// `<image>` token id, if the tokenizer has one.
    pub fn image_token_id(&self) -> Option<u32> {
        self.inner.image_token_id
    }

    /// Unix seconds when the state was built (`created` of `/v1/models`).
    pub fn created(&self) -> u64 {
        self.inner.created
    }
}
