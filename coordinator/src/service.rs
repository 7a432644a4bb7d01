//! The `cluster.v1.Coordinator` gRPC service of one replica: `Generate` streams a request's
//! tokens (dropping the stream aborts it), `Health` reports readiness (running a one-token probe
//! through the real step path when no step succeeded recently, unless `no_probe`), `ModelInfo`
//! and `Load`.
//!
//! `Generate` applies the gateway's checks itself ([`check_request`]: prompt ids against the
//! vocabulary, sampling bounds, image payloads), since a gRPC client can skip the gateway. The
//! workers check again per sequence; whatever reaches them still fails only its own request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::engine::{is_ready, Command, EngineHandle, READY_WINDOW};
use crate::scheduler::SeqId;

/// The request id of the readiness probe's one-token request (left out of the request metrics).
pub const PROBE_ID: &str = "health-probe";

/// The gRPC service.
#[derive(Clone, Debug)]
pub struct CoordinatorService {
    engine: EngineHandle,
    info: pb::ModelInfoResponse,
}

/// Checks a `Generate` request as the gateway does (INVALID_ARGUMENT naming what is wrong).
pub fn check_request(
    req: &pb::GenerateRequest,
    info: &pb::ModelInfoResponse,
) -> Result<(), Status> {
    let invalid = |e: &dyn std::fmt::Display| Status::invalid_argument(e.to_string());
    if req.prompt_ids.is_empty() {
        return Err(Status::invalid_argument("prompt_ids is empty"));
    }
    r4b_model::check_prompt_ids(&req.prompt_ids, info.vocab_size).map_err(|e| invalid(&e))?;
    if let Some(p) = &req.sampling {
        r4b_model::check_sampling(p).map_err(|e| invalid(&format!("sampling: {e}")))?;
    }
    if let Some(s) = &req.stopping {
        // Appended to the sequence by the thinking budget, so they are run like prompt ids.
        r4b_model::check_prompt_ids(&s.think_close_ids, info.vocab_size)
            .map_err(|e| invalid(&format!("stopping.think_close_ids: {e}")))?;
    }
    let limits = r4b_model::ImageLimits::from_pinpoints(info.tile, &info.pinpoints);
    for (i, img) in req.images.iter().enumerate() {
        r4b_model::check_image(i, img, limits).map_err(|e| invalid(&e))?;
    }
    Ok(())
}

impl CoordinatorService {
    /// A service over a running engine.
    pub fn new(engine: EngineHandle, info: pb::ModelInfoResponse) -> Self {
        CoordinatorService { engine, info }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    async fn submit(
        &self,
        req: pb::GenerateRequest,
        span: tracing::Span,
    ) -> Result<
        (
            SeqId,
            UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>,
        ),
        Status,
    > {
        let (events, rx) = mpsc::unbounded_channel();
        let (ack, ack_rx) = oneshot::channel();
        self.engine.send(Command::Submit {
            req: Box::new(req),
            events,
            ack,
            span,
        })?;
        let id = ack_rx
            .await
            .map_err(|_| Status::unavailable("the engine has stopped"))??;
        Ok((id, UnboundedReceiverStream::new(rx)))
    }

    /// Runs a one-token generation through the real step path.
    async fn probe(&self) -> Result<(), Status> {
        let req = pb::GenerateRequest {
            request_id: PROBE_ID.into(),
            prompt_ids: vec![0],
            stopping: Some(pb::StoppingParams {
                max_new_tokens: 1,
                ..Default::default()
            }),
            sampling: Some(pb::SamplingParams {
                top_p: 1.0,
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (_, mut stream) = self.submit(req, tracing::Span::none()).await?;
        while let Some(msg) = stream.next().await {
            if msg?.finish_reason != pb::FinishReason::Unspecified as i32 {
                return Ok(());
            }
        }
        Err(Status::unavailable("probe ended without a token"))
    }
}

/// A token stream that aborts its request when dropped before the end.
struct AbortOnDrop {
    inner: UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>,
    id: SeqId,
    engine: EngineHandle,
    finished: bool,
}

impl Stream for AbortOnDrop {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let p = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(item) = &p {
            let last = match item {
                None | Some(Err(_)) => true,
                Some(Ok(m)) => m.finish_reason != pb::FinishReason::Unspecified as i32,
            };
            if last {
                self.finished = true;
            }
        }
        p
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.engine.send(Command::Abort(self.id));
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let parent = r4b_telemetry::extract(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!(
            "generate",
            otel.kind = "server",
            request_id = %req.request_id,
            prompt_tokens = req.prompt_ids.len(),
            images = req.images.len(),
        );
        r4b_telemetry::set_parent(&span, parent);
        check_request(&req, &self.info)?;
        let (id, inner) = self.submit(req, span).await?;
        let stream = AbortOnDrop {
            inner,
            id,
            engine: self.engine.clone(),
            finished: false,
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let no_probe = request.into_inner().no_probe;
        let mut stats = self.engine.stats();
        let mut detail = stats.detail.clone();
        let serving = stats.state == pb::ReplicaState::Serving;
        if serving && !no_probe && !is_ready(&stats, READY_WINDOW) {
            match tokio::time::timeout(Duration::from_secs(20), self.probe()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => detail = format!("probe failed: {}", e.message()),
                Err(_) => detail = "probe timed out".into(),
            }
            stats = self.engine.stats();
        }
        Ok(Response::new(pb::HealthResponse {
            alive: stats.state != pb::ReplicaState::Failed,
            ready: is_ready(&stats, READY_WINDOW),
            last_step_ok_unix_ms: stats.last_step_ok_unix_ms,
            detail,
            state: stats.state as i32,
            restarts: stats.restarts,
            worker_pids: stats.worker_pids,
        }))
    }

    async fn model_info(
        &self,
        _: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load(
        &self,
        _: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(self.engine.stats().load))
    }
}
