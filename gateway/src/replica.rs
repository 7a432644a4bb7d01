//! The coordinators (one per model replica) and how a request picks one: round-robin, moving on
//! to the next replica when one answers UNAVAILABLE or cannot be reached.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use r4b_proto::auth::{AttachSecret, AuthChannel, Secret};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use tonic::codec::Streaming;
use tonic::transport::Endpoint;

use crate::startup::GatewayError;

/// Largest gRPC message the gateway sends (a request with several large images).
const MAX_SEND_BYTES: usize = 512 << 20;
/// Largest gRPC message the gateway accepts.
const MAX_RECV_BYTES: usize = 64 << 20;

/// One coordinator.
#[derive(Clone, Debug)]
pub struct Replica {
    /// Its URL.
    pub url: String,
    client: CoordinatorClient<AuthChannel>,
}

/// All coordinators of the served model.
#[derive(Debug)]
pub struct ReplicaPool {
    replicas: Vec<Replica>,
    next: AtomicUsize,
    rpc_timeout: Duration,
}

fn coordinator_error(url: &str, reason: impl ToString) -> GatewayError {
    GatewayError::Coordinator {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

impl ReplicaPool {
    /// Channels to `urls` (connected lazily; the first RPC connects); every call carries
    /// `secret` (the coordinators' cluster secret).
    pub fn new(
        urls: &[String],
        rpc_timeout: Duration,
        secret: Option<&Secret>,
    ) -> Result<Self, GatewayError> {
        if urls.is_empty() {
            return Err(GatewayError::NoReplicas);
        }
        let replicas = urls
            .iter()
            .map(|url| {
                let endpoint =
                    Endpoint::from_shared(url.clone()).map_err(|e| coordinator_error(url, e))?;
                let channel = endpoint
                    .connect_timeout(rpc_timeout)
                    .tcp_nodelay(true)
                    .initial_stream_window_size(r4b_proto::STREAM_WINDOW)
                    .initial_connection_window_size(r4b_proto::CONNECTION_WINDOW)
                    .connect_lazy();
                let client =
                    CoordinatorClient::with_interceptor(channel, AttachSecret::new(secret))
                        .max_encoding_message_size(MAX_SEND_BYTES)
                        .max_decoding_message_size(MAX_RECV_BYTES);
                Ok(Replica {
                    url: url.clone(),
                    client,
                })
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(ReplicaPool {
            replicas,
            next: AtomicUsize::new(0),
            rpc_timeout,
        })
    }

    /// The replicas.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// ModelInfo from the first replica that answers, retrying every 200 ms for `wait`.
    pub async fn model_info(&self, wait: Duration) -> Result<pb::ModelInfoResponse, GatewayError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut last = None;
            for r in &self.replicas {
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

    /// Starts a generation on the next replica (round-robin); on UNAVAILABLE or a connection
    /// failure, tries the others once each.
    pub async fn generate(
        &self,
        req: pb::GenerateRequest,
    ) -> Result<Streaming<pb::GenerateResponse>, tonic::Status> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = tonic::Status::unavailable("no replica");
        let mut req = Some(req);
        for attempt in 0..n {
            let replica = &self.replicas[(start + attempt) % n];
            let mut client = replica.client.clone();
            // Clone for attempts that may be retried; move into the last one.
            let request = if attempt + 1 == n {
                req.take()
            } else {
                req.clone()
            }
            .unwrap_or_default();
            let mut request = tonic::Request::new(request);
            r4b_telemetry::inject(&tracing::Span::current(), request.metadata_mut());
            match client.generate(request).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable && attempt + 1 < n => {
                    tracing::warn!(replica = %replica.url, %status, "replica unavailable, trying the next");
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
        let calls = self.replicas.iter().map(|r| async move {
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
        let calls = self.replicas.iter().map(|r| async move {
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
