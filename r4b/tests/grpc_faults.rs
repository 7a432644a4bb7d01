//! Bad requests straight to a coordinator's gRPC `Generate` (which skips the gateway): each is
//! refused with INVALID_ARGUMENT, by the coordinator's own checks or by the workers' admission
//! checks, while a generation beside it completes and the replica keeps serving.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// `r4b coordinator` (TP 2, embedded model) on a free port; killed on drop.
struct Coordinator {
    child: Child,
    url: String,
    _cache: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_coordinator() -> Coordinator {
    let cache = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--tensor-parallel-size", "2", "--kv-cache-space", "0.25"])
        .env("R4B_CACHE", cache.path())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Coordinator {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _cache: cache,
    }
}

async fn connect(url: &str) -> CoordinatorClient<Channel> {
    for _ in 0..600 {
        if let Ok(c) = CoordinatorClient::connect(url.to_string()).await {
            let mut c = c.max_encoding_message_size(64 << 20);
            if c.model_info(pb::ModelInfoRequest {}).await.is_ok() {
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the coordinator at {url} never answered");
}

fn neutral() -> pb::SamplingParams {
    pb::SamplingParams {
        top_p: 1.0,
        repetition_penalty: 1.0,
        ..Default::default()
    }
}

fn request(prompt: Vec<u32>, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: "test".into(),
        prompt_ids: prompt,
        sampling: Some(neutral()),
        stopping: Some(pb::StoppingParams {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a generation to its end: the tokens and the finish reason.
async fn run(
    c: &mut CoordinatorClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(usize, i32), tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.message().await? {
        tokens += msg.tokens.len();
        if msg.finish_reason != 0 {
            return Ok((tokens, msg.finish_reason));
        }
    }
    Err(tonic::Status::internal(
        "stream ended without a finish reason",
    ))
}

/// One `num_tokens`-row image of `w x h` pixels as the gateway would send it (black views).
fn image(info: &pb::ModelInfoResponse, views: u32, num_tokens: u32) -> pb::Image {
    let side = info.tile as usize;
    pb::Image {
        views_u8: vec![0; views as usize * 3 * side * side],
        views,
        tile: info.tile,
        height: info.tile,
        width: info.tile,
        digest: vec![1; 32],
        num_tokens,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generate_requests_fail_alone() {
    let coord = start_coordinator();
    let mut c = connect(&coord.url).await;
    let info = c
        .model_info(pb::ModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut beside_client = c.clone();
    let beside =
        tokio::spawn(async move { run(&mut beside_client, request(vec![1, 2, 3], 200)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut cases: Vec<(&str, pb::GenerateRequest)> = Vec::new();
    cases.push(("token id 100000", request(vec![1, 100_000], 2)));
    cases.push(("token id = vocab", request(vec![info.vocab_size], 2)));
    for (field, value) in [
        ("temperature", f32::NAN),
        ("top_p", 0.0),
        ("repetition_penalty", f32::INFINITY),
        ("min_p", -1.0),
        ("presence_penalty", f32::MAX),
    ] {
        let mut r = request(vec![1, 2], 2);
        let s = r.sampling.as_mut().unwrap();
        match field {
            "temperature" => s.temperature = value,
            "top_p" => s.top_p = value,
            "repetition_penalty" => s.repetition_penalty = value,
            "min_p" => s.min_p = value,
            _ => s.presence_penalty = value,
        }
        cases.push((field, r));
    }
    // A thinking budget whose close ids lie outside the vocabulary.
    let mut r = request(vec![1, 2], 8);
    r.stopping.as_mut().unwrap().think_close_ids = vec![999_999];
    cases.push(("think_close_ids", r));
    // Image payloads: too few bytes (caught by the coordinator), and a token count that does not
    // match the image size (caught by the workers' admission, after the coordinator let it by).
    let good_tokens = {
        // A tile-sized image fits the 1x1 grid: the base view and one tile.
        let n = info.tile / info.patch;
        n * n + n * n + n
    };
    for (what, mut img, tokens) in [
        ("short payload", image(&info, 2, good_tokens), good_tokens),
        (
            "wrong token count",
            image(&info, 2, good_tokens + 1),
            good_tokens + 1,
        ),
    ] {
        if what == "short payload" {
            img.views_u8.truncate(100);
        }
        let mut prompt = vec![1];
        prompt.extend(std::iter::repeat_n(info.image_token_id, tokens as usize));
        prompt.push(2);
        let mut r = request(prompt, 2);
        r.images = vec![img];
        cases.push((what, r));
    }
    for (what, req) in cases {
        match run(&mut c, req).await {
            Err(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}"),
            Ok(r) => panic!("{what}: served ({r:?}) instead of refused"),
        }
    }
    let (tokens, finish) = beside
        .await
        .unwrap()
        .expect("the generation beside the bad ones");
    assert_eq!((tokens, finish), (200, pb::FinishReason::Length as i32));
    // The same image with the right token count is served.
    let mut prompt = vec![1];
    prompt.extend(std::iter::repeat_n(
        info.image_token_id,
        good_tokens as usize,
    ));
    prompt.push(2);
    let mut r = request(prompt, 3);
    r.images = vec![image(&info, 2, good_tokens)];
    assert_eq!(run(&mut c, r).await.expect("a good image").0, 3);
    let health = c
        .health(pb::HealthRequest { no_probe: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.state, pb::ReplicaState::Serving as i32, "{health:?}");
    assert_eq!(health.restarts, 0, "a bad request restarted the workers");
}
