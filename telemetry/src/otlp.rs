//! The OTLP exporter, configured the standard way: from the `OTEL_*`
//! environment variables, most of which the OpenTelemetry SDK and
//! `opentelemetry-otlp` read themselves (endpoint, headers, timeout,
//! sampler, resource, batch processor). This module decides only whether to
//! export at all and checks the protocol, so that a typo fails at start-up
//! with the variable's name instead of silently exporting nothing.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::accounting::{CountingExporter, GatedProcessor, SpanMetrics};

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable holds a value this build does not understand.
    #[error("{variable}={value:?}: {expected}")]
    Invalid {
        variable: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The exporter could not be built (e.g. an endpoint that is not a URL).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The wire protocol to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (collectors listen on 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318); the spec's default.
    HttpProtobuf,
}

/// What the environment asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub protocol: Protocol,
}

/// Spans the exporter holds before it drops new ones (`OTEL_BSP_MAX_QUEUE_SIZE`).
const DEFAULT_QUEUE: usize = 2048;
/// Spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
const DEFAULT_BATCH: usize = 512;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl ExportConfig {
    /// `None` when nothing is to be exported: no endpoint, `OTEL_SDK_DISABLED=true`
    /// or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if let Some(exporter) = get("OTEL_TRACES_EXPORTER") {
            match exporter.trim() {
                "none" => return Ok(None),
                "otlp" => {}
                _ => {
                    return Err(TelemetryError::Invalid {
                        variable: "OTEL_TRACES_EXPORTER",
                        value: exporter,
                        expected: "expected otlp or none",
                    });
                }
            }
        }
        if get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            && get("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        let (variable, value) = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(v)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                get("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match value.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(_) => {
                return Err(TelemetryError::Invalid {
                    variable,
                    value: value.unwrap_or_default(),
                    expected: "expected grpc or http/protobuf (http/json is not built in)",
                });
            }
        };
        Ok(Some(ExportConfig { protocol }))
    }
}

/// The layer that turns `tracing` spans into OpenTelemetry spans, and the
/// provider behind it (kept by [`crate::Telemetry`] to flush at exit).
///
/// Only spans the `traces` filter lets through are exported: the exporter's
/// own HTTP and gRPC calls must never be traced, or every export would
/// produce spans to export.
pub(crate) fn layer(
    config: &ExportConfig,
    service: &'static str,
    traces: &str,
) -> Result<(Box<dyn Layer<Registry> + Send + Sync>, SdkTracerProvider), TelemetryError> {
    let exporter = match config.protocol {
        Protocol::Grpc => SpanExporter::builder().with_tonic().build()?,
        Protocol::HttpProtobuf => SpanExporter::builder().with_http().build()?,
    };
    let metrics = SpanMetrics::global();
    // The SDK reads OTEL_BSP_* here; the gate in front of it uses the same
    // queue size, and the SDK's own queue gets room for one batch more, so
    // that the gate, which counts, is the one that drops.
    let queue = env_usize("OTEL_BSP_MAX_QUEUE_SIZE").unwrap_or(DEFAULT_QUEUE);
    let batch = env_usize("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").unwrap_or(DEFAULT_BATCH);
    let inner_batch = BatchConfigBuilder::default()
        .with_max_queue_size(queue + batch)
        .build();
    let processor = BatchSpanProcessor::builder(CountingExporter::new(exporter, metrics.clone()))
        .with_batch_config(inner_batch)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(GatedProcessor::new(processor, queue, metrics))
        .with_resource(resource(service))
        .build();
    let tracer = provider.tracer("outbox");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new(traces))
        .boxed();
    Ok((layer, provider))
}

/// The SDK's own attributes, `OTEL_RESOURCE_ATTRIBUTES` (percent-decoded,
/// as the specification says and the SDK's detector does not do), and the
/// service name: `OTEL_SERVICE_NAME`, else `service.name` among the
/// attributes, else this program's name.
fn resource(service: &'static str) -> Resource {
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
        .map(|v| resource_attributes(&v))
        .unwrap_or_default();
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| {
            attributes
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| service.to_owned());
    Resource::builder_empty()
        .with_detectors(&[Box::new(
            opentelemetry_sdk::resource::TelemetryResourceDetector,
        )])
        .with_attributes(
            attributes
                .into_iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k, v)),
        )
        .with_service_name(name)
        .build()
}

/// `key1=value1,key2=value2` with percent-encoded values; entries without
/// `=` or with an empty key are skipped.
fn resource_attributes(raw: &str) -> Vec<(String, String)> {
    raw.split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let key = key.trim();
            (!key.is_empty()).then(|| (key.to_owned(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let pair = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        );
        match (bytes[i], pair) {
            (b'%', (Some(h), Some(l))) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<ExportConfig>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn resource_attributes_are_percent_decoded() {
        assert_eq!(
            resource_attributes("team=billing%20%26%20payments, k8s.pod.name=p-1,bad,=x,eq=a%3Db"),
            vec![
                ("team".to_owned(), "billing & payments".to_owned()),
                ("k8s.pod.name".to_owned(), "p-1".to_owned()),
                ("eq".to_owned(), "a=b".to_owned()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(
            config(&[("OTEL_TRACES_SAMPLER", "always_on")]).unwrap(),
            None
        );
    }

    #[test]
    fn the_sdk_can_be_disabled_with_an_endpoint_set() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            config(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]).unwrap(),
            None
        );
        assert_eq!(
            config(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
        assert!(
            config(&[endpoint, ("OTEL_SDK_DISABLED", "false")])
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn the_protocol_defaults_to_http_protobuf_and_a_typo_is_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            config(&[endpoint]).unwrap().unwrap().protocol,
            Protocol::HttpProtobuf
        );
        let grpc = config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap();
        assert_eq!(grpc.unwrap().protocol, Protocol::Grpc);
        let traces_only = config(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(traces_only.unwrap().protocol, Protocol::Grpc);
        let error = config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "gprc")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=\"gprc\""),
            "{error}"
        );
    }
}
