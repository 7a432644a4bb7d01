//! # r4b-telemetry
//!
//! OpenTelemetry for every process of r4b-serve, in two parts:
//!
//! - [`Pipeline`]: the OTLP export (gRPC through tonic) of traces and of metrics, configured by the
//!   standard `OTEL_*` variables only. Traces exist only when an endpoint is set
//!   (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) and the SDK is not
//!   disabled (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`); otherwise there is no
//!   exporter, no propagator and no `tracing` layer: tracing off costs nothing. Metrics likewise
//!   (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`,
//!   `OTEL_METRICS_EXPORTER=none`, `OTEL_METRIC_EXPORT_INTERVAL`): without them the global meter
//!   provider stays the no-op one and the instruments the crates create from it record nothing.
//! - Propagation: the W3C `traceparent`/`tracestate` of a span into gRPC metadata ([`inject`])
//!   and out of it or HTTP headers ([`extract`], [`extract_http`]), and as a compact string for
//!   the sequences of a worker step ([`encode`], [`decode`]): one step stream carries many
//!   requests, so their contexts travel per sequence, not per stream.
//!
//! With no pipeline the global propagator is the no-op one, so `inject` writes nothing and
//! `extract` finds nothing.
//!
//! The design decision: the context is the span's; callers create `tracing` spans as usual and
//! only call [`set_parent`] where a request enters a process.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

/// Why the OTLP pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (a bad endpoint, say).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The variable vLLM's `--otlp-traces-endpoint` flag sets in r4b (and what spawned workers
/// inherit).
pub const TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

fn signal_enabled(endpoint_env: &str, exporter_env: &str) -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var(exporter_env).is_ok_and(|v| v.split(',').all(|e| e.trim() == "none"));
    !disabled && (set(endpoint_env) || set(ENDPOINT_ENV))
}

/// Whether the `OTEL_*` variables ask for trace export.
pub fn traces_enabled() -> bool {
    signal_enabled(TRACES_ENDPOINT_ENV, "OTEL_TRACES_EXPORTER")
}

/// Whether the `OTEL_*` variables ask for metrics export.
pub fn metrics_enabled() -> bool {
    signal_enabled(
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_METRICS_EXPORTER",
    )
}

/// The running OTLP export of this process. Call [`Pipeline::shutdown`] before the tokio
/// runtime stops, so the spans still batched and the last metrics are sent.
pub struct Pipeline {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl Pipeline {
    /// Builds the exporter and installs the W3C propagator when the `OTEL_*` variables ask for
    /// it; `Ok(None)` otherwise. Must run inside a tokio runtime (the tonic client spawns its
    /// connection there). `default_service` is `service.name` unless `OTEL_SERVICE_NAME` or
    /// `OTEL_RESOURCE_ATTRIBUTES` names one; `role` becomes the resource attribute `r4b.role`.
    /// `has_metrics`: the process records metrics (a worker rank does not: no meter provider).
    pub fn from_env(
        default_service: &str,
        role: &str,
        has_metrics: bool,
    ) -> Result<Option<Self>, TelemetryError> {
        let (traces, metrics) = (traces_enabled(), has_metrics && metrics_enabled());
        if !traces && !metrics {
            return Ok(None);
        }
        let mut resource = Resource::builder()
            .with_attribute(opentelemetry::KeyValue::new("r4b.role", role.to_string()));
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        if !named {
            resource = resource.with_service_name(default_service.to_string());
        }
        let resource = resource.build();
        let provider = if traces {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            // The sampler (`OTEL_TRACES_SAMPLER`, `_ARG`) and the batch (`OTEL_BSP_*`) come from
            // the environment through the SDK's defaults.
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build();
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            Some(provider)
        } else {
            None
        };
        let meters = if metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()?;
            // The export interval is `OTEL_METRIC_EXPORT_INTERVAL` (60 s by default).
            let meters = SdkMeterProvider::builder()
                .with_periodic_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            Some(meters)
        } else {
            None
        };
        Ok(Some(Self { provider, meters }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans of this pipeline (`None`
    /// when only metrics are exported).
    pub fn layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        self.provider.as_ref().map(|p| {
            // Span attributes are the spans' own fields: no thread ids, source locations
            // or busy/idle times on every span.
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("r4b"))
                .with_threads(false)
                .with_location(false)
                .with_tracked_inactivity(false)
        })
    }

    /// Sends the spans still batched and the last metrics, and stops the exporters.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("r4b: OTLP trace export shutdown: {e}");
            }
        }
        if let Some(m) = self.meters {
            if let Err(e) = m.shutdown() {
                eprintln!("r4b: OTLP metrics export shutdown: {e}");
            }
        }
    }
}

/// Makes `cx` (from [`extract`], [`extract_http`] or [`decode`]) the parent of `span`. A context
/// with no valid span (nothing was propagated) leaves `span` a root.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    use opentelemetry::trace::TraceContextExt;
    if cx.span().span_context().is_valid() {
        // Fails only when the span was already started by a layer, which ours never is here.
        let _ = span.set_parent(cx);
    }
}

/// Adds a link from `span` to the span of `cx`, when it has one.
pub fn add_link(span: &tracing::Span, cx: &Context) {
    use opentelemetry::trace::TraceContextExt;
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataRef<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the context of `span` into gRPC request metadata (nothing when tracing is off).
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Metadata(metadata))
    });
}

/// The context a caller propagated in gRPC request metadata.
pub fn extract(metadata: &tonic::metadata::MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataRef(metadata)))
}

/// The context an HTTP client sent (`traceparent`, `tracestate`).
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)))
}

/// The context of `span` as one string (`traceparent` then, if any, a newline and `tracestate`)
/// for a field of a step message; empty when tracing is off or the span is not sampled.
pub fn encode(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return String::new();
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    match (fields.get("traceparent"), fields.get("tracestate")) {
        (Some(tp), Some(ts)) if !ts.is_empty() => format!("{tp}\n{ts}"),
        (Some(tp), _) => tp.clone(),
        _ => String::new(),
    }
}

/// The context [`encode`] wrote (an empty or malformed string gives an empty context).
pub fn decode(s: &str) -> Context {
    if s.is_empty() {
        return Context::new();
    }
    let mut fields = HashMap::new();
    let mut parts = s.splitn(2, '\n');
    if let Some(tp) = parts.next() {
        fields.insert("traceparent".to_string(), tp.to_string());
    }
    if let Some(ts) = parts.next() {
        fields.insert("tracestate".to_string(), ts.to_string());
    }
    // The W3C format is fixed, so decoding does not depend on the global propagator.
    TraceContextPropagator::new().extract(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn decode_reads_a_traceparent_and_refuses_garbage() {
        let cx = decode("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nk=v");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.trace_state().get("k"), Some("v"));
        assert!(!decode("not a traceparent").span().span_context().is_valid());
        assert!(!decode("").span().span_context().is_valid());
    }

    #[test]
    fn off_injects_nothing() {
        // No pipeline in this test process: the global propagator is the no-op one.
        let mut md = tonic::metadata::MetadataMap::new();
        inject(&tracing::Span::none(), &mut md);
        assert!(md.is_empty());
        assert_eq!(encode(&tracing::Span::none()), "");
    }
}
