//! One chat request with an image through `r4b serve --tensor-parallel-size 2` (embedded model,
//! CPU) is one trace: a real OTLP receiver (the collector's gRPC `TraceService`, from
//! opentelemetry-proto's generated tonic server) listens on loopback, the server exports to it
//! (`--otlp-traces-endpoint`), and the test checks that the gateway's, the coordinator's and both
//! ranks' spans share the trace id the client sent in `traceparent`, and that every span's parent
//! is the one the design names (README "Observability"). A second test sets a batch delay of ten
//! minutes and checks that SIGTERM's drain still delivers every process's spans (flush on exit).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::json;

/// A received span, flattened.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let service = res.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A real OTLP trace receiver on a loopback port: (its runtime, what it received, its URL).
fn start_receiver() -> (tokio::runtime::Runtime, Receiver, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(receiver.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (rt, receiver, format!("http://{addr}"))
}

/// With a batch delay longer than the test, the spans still arrive: SIGTERM drains the server,
/// the coordinator shuts its workers down, and every process flushes its last batch on exit.
#[test]
fn spans_are_flushed_when_the_server_drains() {
    let (_rt, receiver, endpoint) = start_receiver();
    let mut s = Server::start_env(
        &["--tensor-parallel-size", "2"],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    );
    let resp = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(&greedy_body("Hello", 3))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    std::thread::sleep(Duration::from_millis(300));
    let ours = |r: &Receiver| {
        r.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .map(|s| (s.name.clone(), s.attrs.get("rank").cloned()))
            .collect::<Vec<_>>()
    };
    assert!(
        ours(&receiver).is_empty(),
        "batched for 10 minutes, yet exported"
    );
    common::procs::signal(s.pid(), "TERM");
    let status = s.wait_exit(Duration::from_secs(60)).expect("drained");
    assert!(status.success(), "{status}");
    let spans = ours(&receiver);
    for (name, rank) in [
        ("chat", None),
        ("generate", None),
        ("prefill chunk", None),
        ("rank step", Some("0")),
        ("rank step", Some("1")),
    ] {
        assert!(
            spans
                .iter()
                .any(|(n, r)| n == name && (rank.is_none() || r.as_deref() == rank)),
            "{name} {rank:?} not flushed: {spans:?}"
        );
    }
}

#[test]
fn one_image_request_at_tp2_is_one_trace_through_every_rank() {
    let (_rt, receiver, endpoint) = start_receiver();
    let s = Server::start_env(
        &[
            "--tensor-parallel-size",
            "2",
            "--otlp-traces-endpoint",
            &endpoint,
        ],
        // A short batch delay: the spans arrive while the server still runs.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let body = json!({
        "model": "r4b",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": png_data_uri(40, 30, 3)}},
        ]}],
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": true
    });
    let resp = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().unwrap_or_default());

    // Health probes and the like may be traced too; this request's spans carry the client's id.
    let wanted = |spans: &[Span]| {
        let has = |name: &str, rank: Option<&str>| {
            spans.iter().any(|s| {
                s.name == name
                    && rank.is_none_or(|r| s.attrs.get("rank").map(String::as_str) == Some(r))
            })
        };
        [
            "chat",
            "image",
            "image fetch",
            "image decode",
            "image views",
            "generate",
            "queue",
        ]
        .iter()
        .all(|n| has(n, None))
            && has("prefill chunk", None)
            && has("decode step", None)
            && ["0", "1"]
                .iter()
                .all(|r| has("rank step", Some(r)) && has("vision encode", None))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<Span> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .cloned()
            .collect();
        if wanted(&spans) {
            // Late batches of the same trace (the other rank's last step).
            std::thread::sleep(Duration::from_millis(500));
            break receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == TRACE_ID)
                .cloned()
                .collect::<Vec<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "not every span arrived in 30 s; got {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "span ids are unique");
    let parent_name = |s: &Span| by_id.get(s.parent.as_str()).map(|p| p.name.as_str());
    for s in &spans {
        let expected: &[&str] = match s.name.as_str() {
            "chat" => &[],
            "image" | "generate" => &["chat"],
            "image fetch" | "image decode" | "image views" => &["image"],
            "queue" | "prefill chunk" | "decode step" => &["generate"],
            "rank step" => &["prefill chunk", "decode step"],
            "vision encode" => &["rank step"],
            other => panic!("unexpected span {other:?} in the request's trace: {s:?}"),
        };
        if expected.is_empty() {
            // The gateway's span is the root of our part: its parent is the client's span.
            assert_eq!(s.parent, CLIENT_SPAN, "{s:?}");
        } else {
            let p = parent_name(s);
            assert!(
                p.is_some_and(|p| expected.contains(&p)),
                "{} has parent {p:?}, expected one of {expected:?}",
                s.name
            );
        }
    }
    // Which process each part comes from: the gateway and coordinator run in `r4b serve`, each
    // rank is its own worker process.
    let service_of = |name: &str| -> Vec<&str> {
        let mut v: Vec<&str> = spans
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.service.as_str())
            .collect();
        v.dedup();
        v
    };
    assert_eq!(service_of("chat"), ["r4b-serve"]);
    assert_eq!(service_of("generate"), ["r4b-serve"]);
    assert_eq!(service_of("rank step"), ["r4b-worker"]);
    let gateway = spans.iter().find(|s| s.name == "chat").unwrap();
    assert_eq!(gateway.attrs["gen_ai.operation.name"], "chat");
    assert_eq!(gateway.attrs["gen_ai.provider.name"], "r4b");

    // Every traced chunk ran on both ranks: one `rank step` per rank under it, carrying that
    // rank's forward and collective times (a TP=2 step all-reduces, so collective time > 0).
    let chunks: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "prefill chunk" || s.name == "decode step")
        .collect();
    // max_tokens 3: a prefill samples the 1st token, decode steps 1 and 2 the others; only the
    // 1st decode step of every DECODE_SPAN_EVERY has a span.
    assert_eq!(
        chunks.iter().filter(|c| c.name == "decode step").count(),
        1,
        "decode steps are sampled"
    );
    for c in &chunks {
        let mut ranks: Vec<&str> = spans
            .iter()
            .filter(|s| s.name == "rank step" && s.parent == c.span_id)
            .map(|s| s.attrs["rank"].as_str())
            .collect();
        ranks.sort_unstable();
        assert_eq!(ranks, ["0", "1"], "ranks under {c:?}");
        for r in spans
            .iter()
            .filter(|s| s.name == "rank step" && s.parent == c.span_id)
        {
            let f: f64 = r.attrs["forward_ms"].parse().unwrap();
            let col: f64 = r.attrs["collective_ms"].parse().unwrap();
            assert!(f > 0.0 && col > 0.0 && col <= f, "{r:?}");
        }
    }
    // The image is encoded on both ranks, inside the prefill chunk that reaches it.
    let mut vision_ranks: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "vision encode")
        .map(|s| by_id[s.parent.as_str()].attrs["rank"].as_str())
        .collect();
    vision_ranks.sort_unstable();
    assert_eq!(vision_ranks, ["0", "1"]);
    drop(s);
}
