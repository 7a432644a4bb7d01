//! The gateway state the targets run against: the embedded tokenizer and chat template
//! (`ModelFiles`, as the gateway's own tests load them) and an [`AppState`] connected to a fake
//! coordinator on 127.0.0.1 that answers `ModelInfo` with R-4B's image geometry and refuses
//! `Generate` (the targets stop before submitting anyway).

use std::sync::Arc;

use r4b_gateway::{embedded, AppState, GatewayConfig, ModelFiles};
use r4b_model::anyres::ImageGeometry;
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use tokio::runtime::Runtime;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// Context length the fake reports (R-4B's 32768).
pub const MAX_MODEL_LEN: u32 = 32768;

/// R-4B's image geometry: 384-pixel tiles of 14-pixel patches, pinpoints up to 6x6 tiles,
/// `anyres_max_9`.
pub fn r4b_geometry() -> ImageGeometry {
    let mut pinpoints = Vec::new();
    for h in 1..=6 {
        for w in 1..=6 {
            pinpoints.push((h * 384, w * 384));
        }
    }
    ImageGeometry {
        tile: 384,
        patch: 14,
        pinpoints,
        max_tiles: 9,
    }
}

#[derive(Clone, Copy)]
struct Fake;

#[tonic::async_trait]
impl Coordinator for Fake {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        _: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unavailable(
            "the fuzz coordinator does not generate",
        ))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            alive: true,
            ..Default::default()
        }))
    }

    async fn model_info(
        &self,
        _: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let g = r4b_geometry();
        Ok(Response::new(pb::ModelInfoResponse {
            model_name: "r4b".into(),
            max_model_len: MAX_MODEL_LEN,
            vocab_size: r4b_model::embedded::VOCAB as u32,
            image_token_id: r4b_model::embedded::IMAGE_TOKEN,
            tile: g.tile as u32,
            patch: g.patch as u32,
            pinpoints: g
                .pinpoints
                .iter()
                .flat_map(|&(h, w)| [h as u32, w as u32])
                .collect(),
            anyres_max_tiles: g.max_tiles as u32,
            tensor_parallel_size: 1,
            block_size: 16,
            num_blocks: 1024,
        }))
    }

    async fn load(
        &self,
        _: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(pb::LoadResponse::default()))
    }
}

/// A runtime, a fake coordinator and gateway states over the embedded model files.
pub struct Env {
    /// The runtime the fake coordinator and the image pipeline run on.
    pub runtime: Runtime,
    /// Default configuration (special tokens in content are escaped).
    pub state: AppState,
    /// `--allow-special-tokens-in-content`.
    pub state_allow_special: AppState,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Env {
    /// Starts everything (the harness's own setup: errors are fatal).
    pub fn start() -> anyhow::Result<Arc<Env>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let dir = std::env::temp_dir().join(format!(
            "r4b-fuzz-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = tempfile_dir::Dir(dir);
        embedded::write_tokenizer_files(&dir.0)?;
        let (state, state_allow_special) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let server = tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(Fake))
                .serve_with_incoming(TcpListenerStream::new(listener));
            tokio::spawn(server);
            let connect = |allow: bool| {
                let url = url.clone();
                let dir = dir.0.clone();
                async move {
                    let mut config = GatewayConfig::new("r4b");
                    config.allow_special_tokens_in_content = allow;
                    let files = ModelFiles::load(&dir)?;
                    anyhow::Ok(AppState::connect(config, files, vec![url]).await?)
                }
            };
            anyhow::Ok((connect(false).await?, connect(true).await?))
        })?;
        Ok(Arc::new(Env {
            runtime,
            state,
            state_allow_special,
            _dir: dir,
        }))
    }
}
