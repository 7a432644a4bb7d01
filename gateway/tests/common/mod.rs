//! Test harness: a fake coordinator (a real tonic server on 127.0.0.1:0 with scripted token
//! streams) and a gateway router connected to it, using the embedded tokenizer files.

#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use r4b_gateway::{embedded, AppState, GatewayConfig, ModelFiles};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Response, Status};
use tower::ServiceExt;

/// `<|im_end|>` of the embedded tokenizer.
pub const EOS: u32 = 258;
/// `<think>`.
pub const THINK: u32 = 259;
/// `</think>`.
pub const UNTHINK: u32 = 260;
/// `<image>`.
pub const IMAGE: u32 = 261;
/// Context length the fake reports.
pub const MAX_MODEL_LEN: u32 = 200;

/// What the fake does for one Generate call.
pub enum Script {
    /// Send these messages, `delay` apart, then optionally fail with a status.
    Reply {
        messages: Vec<pb::GenerateResponse>,
        delay: Duration,
        then: Option<Status>,
    },
    /// Refuse the call with this status.
    Refuse(Status),
    /// Send the token `x` every `delay` until the client goes away.
    Endless { delay: Duration },
}

/// Chooses the script of a call from its request.
pub type ScriptFn = Arc<dyn Fn(&pb::GenerateRequest) -> Script + Send + Sync>;

/// The fake coordinator.
#[derive(Clone)]
pub struct Fake {
    script: ScriptFn,
    /// Every GenerateRequest received.
    pub seen: Arc<Mutex<Vec<pb::GenerateRequest>>>,
    /// Streams whose client went away before the script ended.
    pub cancelled: Arc<AtomicUsize>,
    ready: bool,
    max_model_len: u32,
}

/// Byte ids of `text` (the embedded tokenizer has one token per byte).
pub fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn token(id: u32) -> pb::Token {
    pb::Token {
        id,
        logprob: -0.5,
        top: vec![
            pb::TopLogprob { id, logprob: -0.5 },
            pb::TopLogprob {
                id: u32::from(b'?'),
                logprob: -2.0,
            },
        ],
        forced: false,
    }
}

/// One message per token; the first carries the prompt size, the last the finish reason.
pub fn reply_ids(
    req: &pb::GenerateRequest,
    tokens: &[u32],
    finish: pb::FinishReason,
    delay: Duration,
) -> Script {
    let n = tokens.len();
    let messages = tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| pb::GenerateResponse {
            tokens: vec![token(id)],
            finish_reason: if i + 1 == n { finish as i32 } else { 0 },
            prompt_tokens: if i == 0 {
                req.prompt_ids.len() as u32
            } else {
                0
            },
            cached_tokens: if i == 0 { 3 } else { 0 },
            prompt_logprobs: Vec::new(),
        })
        .collect();
    Script::Reply {
        messages,
        delay,
        then: None,
    }
}

/// `text` then EOS, finish reason STOP.
pub fn reply_text(req: &pb::GenerateRequest, text: &str) -> Script {
    let mut t = ids(text);
    t.push(EOS);
    reply_ids(req, &t, pb::FinishReason::Stop, Duration::ZERO)
}

/// Sends `item` after `delay` unless the client has gone; false when it has.
async fn send(
    tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    item: Result<pb::GenerateResponse, Status>,
    delay: Duration,
    cancelled: &AtomicUsize,
) -> bool {
    let sent = tokio::select! {
        _ = tx.closed() => false,
        _ = tokio::time::sleep(delay) => tx.send(item).await.is_ok(),
    };
    if !sent {
        cancelled.fetch_add(1, Ordering::SeqCst);
    }
    sent
}

#[tonic::async_trait]
impl Coordinator for Fake {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        self.seen.lock().expect("lock").push(req.clone());
        let (tx, rx) = mpsc::channel(1);
        let cancelled = self.cancelled.clone();
        match (self.script)(&req) {
            Script::Refuse(status) => return Err(status),
            Script::Reply {
                messages,
                delay,
                then,
            } => {
                tokio::spawn(async move {
                    for m in messages {
                        if !send(&tx, Ok(m), delay, &cancelled).await {
                            return;
                        }
                    }
                    if let Some(status) = then {
                        let _ = tx.send(Err(status)).await;
                    }
                });
            }
            Script::Endless { delay } => {
                tokio::spawn(async move {
                    let mut first = true;
                    loop {
                        let msg = pb::GenerateResponse {
                            tokens: vec![token(u32::from(b'x'))],
                            finish_reason: 0,
                            prompt_tokens: if first { 1 } else { 0 },
                            cached_tokens: 0,
                            prompt_logprobs: Vec::new(),
                        };
                        first = false;
                        if !send(&tx, Ok(msg), delay, &cancelled).await {
                            return;
                        }
                    }
                });
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn health(
        &self,
        _: tonic::Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            alive: true,
            ready: self.ready,
            last_step_ok_unix_ms: 0,
            detail: if self.ready {
                String::new()
            } else {
                "warming up".into()
            },
            state: if self.ready {
                pb::ReplicaState::Serving
            } else {
                pb::ReplicaState::Starting
            } as i32,
            restarts: 0,
            worker_pids: Vec::new(),
        }))
    }

    async fn model_info(
        &self,
        _: tonic::Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            model_name: "r4b".into(),
            max_model_len: self.max_model_len,
            vocab_size: 512,
            image_token_id: IMAGE,
            tile: 28,
            patch: 14,
            pinpoints: vec![28, 28, 28, 56, 56, 28, 56, 56],
            anyres_max_tiles: 9,
            tensor_parallel_size: 1,
            block_size: 16,
            num_blocks: 64,
        }))
    }

    async fn load(
        &self,
        _: tonic::Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(pb::LoadResponse {
            waiting: 1,
            running: 2,
            kv_blocks_used: 16,
            kv_blocks_total: 64,
            queue_capacity: 8,
            ..Default::default()
        }))
    }
}

/// A gateway router wired to a fake coordinator.
pub struct TestGateway {
    /// The router.
    pub app: Router,
    /// The fake (requests seen, cancellations).
    pub fake: Fake,
}

/// Options of [`gateway_with`].
pub struct Options {
    /// Config tweaks.
    pub config: GatewayConfig,
    /// Fake's readiness.
    pub ready: bool,
    /// The context length the fake reports.
    pub max_model_len: u32,
    /// A chat template in place of the embedded one.
    pub chat_template: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        let mut config = GatewayConfig::new("r4b");
        config.connect_timeout = Duration::from_secs(5);
        Options {
            config,
            ready: true,
            max_model_len: MAX_MODEL_LEN,
            chat_template: None,
        }
    }
}

/// Starts a fake coordinator with `script` and a gateway in front of it.
pub async fn gateway(
    script: impl Fn(&pb::GenerateRequest) -> Script + Send + Sync + 'static,
) -> TestGateway {
    gateway_with(script, Options::default()).await
}

/// [`gateway`] with options.
pub async fn gateway_with(
    script: impl Fn(&pb::GenerateRequest) -> Script + Send + Sync + 'static,
    opts: Options,
) -> TestGateway {
    let fake = Fake {
        script: Arc::new(script),
        seen: Arc::default(),
        cancelled: Arc::default(),
        ready: opts.ready,
        max_model_len: opts.max_model_len,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(CoordinatorServer::new(fake.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    let dir = tempfile::tempdir().expect("tempdir");
    embedded::write_tokenizer_files(dir.path()).expect("tokenizer files");
    if let Some(template) = opts.chat_template {
        let path = dir.path().join("tokenizer_config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        config["chat_template"] = template.into();
        std::fs::write(&path, config.to_string()).expect("write");
    }
    let files = ModelFiles::load(dir.path()).expect("model files");
    let state = AppState::connect(opts.config, files, vec![url])
        .await
        .expect("connect");
    TestGateway {
        app: r4b_gateway::router(state),
        fake,
    }
}

/// A response read to the end.
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body text.
    pub text: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }

    /// The `data:` payloads of an SSE body, in order (keep-alive comments skipped).
    pub fn sse_data(&self) -> Vec<String> {
        assert!(
            self.text.ends_with("data: [DONE]\n\n"),
            "SSE body must end with [DONE]: {:?}",
            self.text
        );
        self.text
            .split("\n\n")
            .filter(|e| !e.is_empty() && !e.starts_with(':'))
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("bad SSE event {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

impl TestGateway {
    /// Sends a request and reads the whole response.
    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        Reply {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
        }
    }

    /// POSTs a raw body.
    pub async fn post_raw(&self, path: &str, body: impl Into<Body>) -> Reply {
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(body.into())
            .expect("request");
        self.send(req).await
    }

    /// POSTs JSON.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_raw(path, body.to_string()).await
    }

    /// GETs a path.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Body::empty()).expect("request"))
            .await
    }

    /// Requests seen by the fake.
    pub fn seen(&self) -> Vec<pb::GenerateRequest> {
        self.fake.seen.lock().expect("lock").clone()
    }

    /// Waits up to 5 s for `n` cancelled streams.
    pub async fn wait_cancelled(&self, n: usize) -> bool {
        for _ in 0..500 {
            if self.fake.cancelled.load(Ordering::SeqCst) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

/// The prompt ids of one user turn `text` with the generation prompt, written out by hand:
/// `<|im_start|>user \n{text}<|im_end|><|im_start|>assistant\n`.
pub fn user_prompt_ids(text: &str) -> Vec<u32> {
    let mut v = vec![257];
    v.extend(ids("user \n"));
    v.extend(ids(text));
    v.push(EOS);
    v.push(257);
    v.extend(ids("assistant\n"));
    v
}

/// A chat body with one user message.
pub fn chat_body(text: &str) -> Value {
    serde_json::json!({"model": "r4b", "messages": [{"role": "user", "content": text}]})
}

/// A `w`×`h` PNG as a `data:` URI.
pub fn png_data_uri(w: u32, h: u32) -> String {
    use base64::Engine;
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(out.into_inner())
    )
}
