//! Bad requests straight to a coordinator's gRPC `Generate` (which skips the gateway): each is
//! refused with INVALID_ARGUMENT, by the coordinator's own checks or by the workers' admission
//! checks, while a generation beside it completes and the replica keeps serving. Calls without
//! the cluster secret, to the coordinator or to a worker, get UNAUTHENTICATED.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use r4b_proto::auth::{AttachSecret, AuthChannel, Secret, SECRET_ENV};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use r4b_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

/// The cluster secret the test's coordinator and workers are given.
const SECRET: &str = "grpc-faults-test-secret-0123456789";

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
        .env(SECRET_ENV, SECRET)
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

async fn connect(url: &str) -> CoordinatorClient<AuthChannel> {
    let secret = Secret::new(SECRET).unwrap();
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            let mut c = CoordinatorClient::with_interceptor(ch, AttachSecret::new(Some(&secret)))
                .max_encoding_message_size(64 << 20);
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
    c: &mut CoordinatorClient<AuthChannel>,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_cluster_secret_are_unauthenticated() {
    let coord = start_coordinator();
    let mut signed = connect(&coord.url).await;
    signed
        .health(pb::HealthRequest::default())
        .await
        .expect("with the secret");
    let ch = Channel::from_shared(coord.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut bare = CoordinatorClient::new(ch.clone());
    let e = bare
        .generate(request(vec![1, 2], 2))
        .await
        .expect_err("no secret");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let wrong = Secret::new("another-secret-of-enough-length").unwrap();
    let mut other = CoordinatorClient::with_interceptor(ch, AttachSecret::new(Some(&wrong)));
    let e = other
        .model_info(pb::ModelInfoRequest {})
        .await
        .expect_err("wrong secret");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A worker as a coordinator starts it: an outsider cannot Init it, its coordinator can talk
    // to it; without the variable it refuses to start.
    let mut worker = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args(["worker", "--listen", "127.0.0.1:0"])
        .env(SECRET_ENV, SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(worker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.split_whitespace().last().unwrap().to_string();
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = WorkerClient::new(ch.clone())
        .init(pb::InitRequest::default())
        .await
        .expect_err("an outsider's Init");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let secret = Secret::new(SECRET).unwrap();
    WorkerClient::with_interceptor(ch, AttachSecret::new(Some(&secret)))
        .health(pb::WorkerHealthRequest {})
        .await
        .expect("its coordinator's Health");
    let _ = worker.kill();
    let _ = worker.wait();
    let out = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args(["worker", "--listen", "127.0.0.1:0"])
        .env_remove(SECRET_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(SECRET_ENV));
}
