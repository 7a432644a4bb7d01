//! Serving benchmarks on the embedded default model (prints figures; not a test):
//!
//! 1. cold start: `r4b serve` with an empty cache → first chat answer;
//! 2. gateway overhead per request: the same one-token request through HTTP (gateway →
//!    coordinator) and straight to the coordinator over gRPC; p50/p99 of both and the difference;
//! 3. per-step control overhead at a given TP: (coordinator wall time per step − rank 0's forward
//!    time), from the Load RPC counters around a decode workload.
//!
//! `cargo run -p r4b --example bench_serving -- [--r4b target/debug/r4b] [--requests 200] [--tp 8]
//! [--streams 8] [--control-only]`

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use r4b_proto::auth::{AttachSecret, AuthChannel, Secret};
use r4b_proto::v1 as pb;
use r4b_proto::v1::coordinator_client::CoordinatorClient;
use serde_json::{json, Value};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn spawn(bin: &str, args: &[&str], cache: &std::path::Path) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .env("R4B_CACHE", cache)
            .env("R4B_LOG", "warn")
            .env(r4b_proto::auth::SECRET_ENV, BENCH_SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting r4b"),
    )
}

fn chat_body() -> Value {
    json!({"model": "r4b", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 1, "temperature": 0})
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn cold_start(bin: &str) {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = reqwest::blocking::Client::new();
    let t0 = Instant::now();
    let _p = spawn(
        bin,
        &["serve", "--host", "127.0.0.1", "--port", &port.to_string()],
        cache.path(),
    );
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    loop {
        if let Ok(r) = http.post(&url).json(&chat_body()).send() {
            if r.status() == 200 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no answer within 120 s"
        );
    }
    println!(
        "cold start (empty cache → first chat answer): {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
}

/// The cluster secret the benchmark's processes share.
const BENCH_SECRET: &str = "bench-serving-secret-0123456789";

async fn coordinator(port: u16) -> CoordinatorClient<AuthChannel> {
    let url = format!("http://127.0.0.1:{port}");
    let secret = Secret::new(BENCH_SECRET).expect("valid secret");
    let t0 = Instant::now();
    loop {
        let endpoint = tonic::transport::Channel::from_shared(url.clone()).expect("url");
        if let Ok(ch) = endpoint.connect().await {
            return CoordinatorClient::with_interceptor(ch, AttachSecret::new(Some(&secret)));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "coordinator did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn generate(c: &mut CoordinatorClient<AuthChannel>, ids: &[u32], n: u32) {
    let req = pb::GenerateRequest {
        request_id: "bench".into(),
        prompt_ids: ids.to_vec(),
        sampling: Some(pb::SamplingParams {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        stopping: Some(pb::StoppingParams {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = c.generate(req).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
}

async fn gateway_overhead(bin: &str, requests: usize) {
    let cache = tempfile::tempdir().unwrap();
    let (cport, gport) = (free_port(), free_port());
    let _c = spawn(
        bin,
        &["coordinator", "--listen", &format!("127.0.0.1:{cport}")],
        cache.path(),
    );
    let mut client = coordinator(cport).await;
    let _g = spawn(
        bin,
        &[
            "gateway",
            "--coordinator",
            &format!("http://127.0.0.1:{cport}"),
            "--host",
            "127.0.0.1",
            "--port",
            &gport.to_string(),
        ],
        cache.path(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gport}");
    let t0 = Instant::now();
    while http
        .get(format!("{base}/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tok = chat_body();
    tok.as_object_mut().unwrap().remove("max_tokens");
    let ids: Vec<u32> = http
        .post(format!("{base}/tokenize"))
        .json(&tok)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let (mut via_http, mut via_grpc) = (Vec::new(), Vec::new());
    for i in 0..requests + 20 {
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let h = t.elapsed().as_secs_f64() * 1e6;
        let t = Instant::now();
        generate(&mut client, &ids, 1).await;
        let g = t.elapsed().as_secs_f64() * 1e6;
        if i >= 20 {
            via_http.push(h);
            via_grpc.push(g);
        }
    }
    let (h50, h99) = (
        percentile(&mut via_http, 0.5),
        percentile(&mut via_http, 0.99),
    );
    let (g50, g99) = (
        percentile(&mut via_grpc, 0.5),
        percentile(&mut via_grpc, 0.99),
    );
    println!(
        "one-token chat request, {requests} sequential, {} prompt tokens:",
        ids.len()
    );
    println!("  through the gateway (HTTP): p50 {h50:.0} µs, p99 {h99:.0} µs");
    println!("  coordinator directly (gRPC): p50 {g50:.0} µs, p99 {g99:.0} µs");
    println!(
        "  gateway overhead: p50 {:.0} µs, p99 {:.0} µs",
        h50 - g50,
        h99 - g99
    );
}

async fn control_overhead(bin: &str, tp: &str) {
    let cache = tempfile::tempdir().unwrap();
    let cport = free_port();
    let _c = spawn(
        bin,
        &[
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{cport}"),
            "--tensor-parallel-size",
            tp,
        ],
        cache.path(),
    );
    let mut client = coordinator(cport).await;
    generate(&mut client, &[257, 72, 105, 258], 4).await; // warm up
    let streams: u32 = arg("--streams", "8").parse().unwrap();
    let before = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            generate(&mut c, &[257, 72 + i % 100, 105, 258], 64).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t.elapsed();
    let after = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    let steps = (after.steps - before.steps) as f64;
    let per = |a: u64, b: u64| (a - b) as f64 / steps / 1e3;
    let step_wall = per(after.step_wall_ns, before.step_wall_ns);
    let forward = per(after.step_forward_ns, before.step_forward_ns);
    let collective = per(after.collective_ns, before.collective_ns);
    println!(
        "TP={tp}, {streams} streams x 64 tokens: {steps} steps in {:.2} s",
        wall.as_secs_f64()
    );
    println!("  per step: coordinator wall {step_wall:.0} µs, rank-0 forward {forward:.0} µs (of which collectives {collective:.0} µs)");
    println!(
        "  control overhead (gRPC fan-out + answers): {:.0} µs per step",
        step_wall - forward
    );
}

fn main() {
    let bin = arg(
        "--r4b",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/r4b"),
    );
    let requests: usize = arg("--requests", "200").parse().unwrap();
    let tp = arg("--tp", "8");
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::args().any(|a| a == "--control-only") {
        rt.block_on(control_overhead(&bin, &tp));
        return;
    }
    cold_start(&bin);
    rt.block_on(gateway_overhead(&bin, requests));
    rt.block_on(control_overhead(&bin, "1"));
    rt.block_on(control_overhead(&bin, &tp));
}
