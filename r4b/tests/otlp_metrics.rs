//! Metrics over OTLP: a real OTLP receiver (the collector's gRPC `MetricsService`, from
//! opentelemetry-proto's generated tonic server) on loopback, `r4b serve --tensor-parallel-size 2`
//! exporting to it (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, a 200 ms export interval). After one
//! chat request the gateway's GenAI histograms arrive with their required attributes and one
//! observation each, and the coordinator's per-rank step histograms have one series per rank with
//! equal counts.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;

/// The latest data point of one series: (metric name, sorted attributes) → (count or value).
type Points = HashMap<(String, Vec<(String, String)>), f64>;

#[derive(Clone, Default)]
struct Receiver {
    points: Arc<Mutex<Points>>,
}

fn attrs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = kvs
        .iter()
        .map(|kv| {
            let val = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), val)
        })
        .collect();
    v.sort();
    v
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut points = self.points.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    match m.data {
                        Some(Data::Histogram(h)) => {
                            for p in h.data_points {
                                points
                                    .insert((m.name.clone(), attrs(&p.attributes)), p.count as f64);
                            }
                        }
                        Some(Data::Gauge(g)) => {
                            for p in g.data_points {
                                let v = match p.value {
                                    Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i as f64,
                                    Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d,
                                    None => f64::NAN,
                                };
                                points.insert((m.name.clone(), attrs(&p.attributes)), v);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[test]
fn gen_ai_and_per_rank_metrics_arrive_over_otlp() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = MetricsServiceServer::new(receiver.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let endpoint = format!("http://{addr}");
    let s = Server::start_env(
        &["--tensor-parallel-size", "2"],
        &[
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ],
    );
    let body = s.greedy_chat("Hello there", 4);
    assert_eq!(body["usage"]["completion_tokens"], 4);

    let genai = |name: &str| {
        (
            name.to_string(),
            vec![
                ("gen_ai.operation.name".to_string(), "chat".to_string()),
                ("gen_ai.provider.name".to_string(), "r4b".to_string()),
            ],
        )
    };
    let rank = |name: &str, r: &str| (name.to_string(), vec![("rank".to_string(), r.to_string())]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let points = loop {
        let points = receiver.points.lock().unwrap().clone();
        let ready = [
            "gen_ai.server.request.duration",
            "gen_ai.server.time_to_first_token",
            "gen_ai.server.time_per_output_token",
        ]
        .iter()
        .all(|n| points.get(&genai(n)) == Some(&1.0))
            && points.contains_key(&rank("r4b.rank.forward.duration", "1"))
            && points.contains_key(&("r4b.engine.requests.waiting".to_string(), vec![]));
        if ready {
            // Two more exports: a collection taken while a step was being recorded is replaced.
            std::thread::sleep(Duration::from_millis(500));
            break receiver.points.lock().unwrap().clone();
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not arrive in 30 s; got {:#?}",
            points
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Both ranks ran every step; the collective histogram has the same steps.
    let steps = points[&("r4b.engine.step.duration".to_string(), vec![])];
    assert!(steps >= 4.0, "{steps} steps for 4 tokens");
    for r in ["0", "1"] {
        assert_eq!(
            points[&rank("r4b.rank.forward.duration", r)],
            steps,
            "rank {r}"
        );
        assert_eq!(
            points[&rank("r4b.rank.collective.duration", r)],
            steps,
            "rank {r}"
        );
    }
    assert_eq!(
        points[&("r4b.engine.requests.running".to_string(), vec![])],
        0.0
    );
    drop(s);
}
