//! A real OTLP trace receiver: what an OpenTelemetry Collector's `otlp`
//! receiver does, minus the pipeline. It accepts export requests over
//! OTLP/HTTP (`POST /v1/traces`, protobuf) and OTLP/gRPC, decodes them with
//! the official protobuf definitions (`opentelemetry-proto`) and keeps every
//! span, so that tests assert on what really crossed the wire.

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One received span, flattened for assertions.
#[derive(Clone, Debug)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    /// Lower-case hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SPAN_KIND_*` without the prefix, lower case (`producer`, `consumer`...).
    pub kind: String,
    /// Attribute values rendered as strings.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// `ok`, `error` or `unset`.
    pub status: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<Span>>,
    requests: AtomicUsize,
}

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(render)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let kind = span.kind().as_str_name();
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: kind.trim_start_matches("SPAN_KIND_").to_lowercase(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    kv.value.as_ref().map(render).unwrap_or_default(),
                                )
                            })
                            .collect(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        status: match span.status.map(|s| s.code) {
                            Some(1) => "ok",
                            Some(2) => "error",
                            _ => "unset",
                        }
                        .to_owned(),
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                    });
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn render(value: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The gRPC side.
struct Grpc(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    received: Arc<Received>,
    http_port: u16,
    grpc_port: u16,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Listens on two free ports of 127.0.0.1, one per protocol.
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let received = Arc::new(Received::default());
        let stop = CancellationToken::new();

        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_port = http.local_addr()?.port();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .with_state(received.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(http, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });

        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_port = grpc.local_addr()?.port();
        let service = TraceServiceServer::new(Grpc(received.clone()));
        let until = stop.clone();
        let incoming = tonic::transport::server::TcpIncoming::from(grpc);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, until.cancelled_owned())
                .await;
        });
        Ok(OtlpReceiver {
            received,
            http_port,
            grpc_port,
            stop,
        })
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf` (the default).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Export requests received so far (over both protocols).
    pub fn requests(&self) -> usize {
        self.received.requests.load(Ordering::Relaxed)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `check` finds what it needs among the spans received.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Span]) -> Option<T>,
    ) -> anyhow::Result<T> {
        crate::wait_for(what, timeout, || {
            let found = check(&self.spans());
            async move { found }
        })
        .await
        .with_context(|| format!("{} spans received: {:#?}", self.spans().len(), self.names()))
    }

    fn names(&self) -> Vec<String> {
        self.spans()
            .iter()
            .map(|s| format!("{} {} ({})", s.service, s.name, s.trace_id))
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn http_export(
    axum::extract::State(received): axum::extract::State<Arc<Received>>,
    body: axum::body::Bytes,
) -> Result<([(axum::http::HeaderName, &'static str); 1], Vec<u8>), (axum::http::StatusCode, String)>
{
    let request = ExportTraceServiceRequest::decode(body).map_err(|e| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            format!("not an ExportTraceServiceRequest: {e}"),
        )
    })?;
    received.take(request);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    ))
}

/// Renders one trace as an indented tree (children under their parent,
/// links noted), the way a trace viewer shows it; for the README and for
/// failure messages.
pub fn render_trace(spans: &[Span], trace_id: &str) -> String {
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let linked: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id != trace_id && s.links.iter().any(|(t, _)| t == trace_id))
        .collect();
    let start = in_trace
        .iter()
        .chain(&linked)
        .map(|s| s.start_unix_nano)
        .min()
        .unwrap_or(0);
    let mut out = format!("trace {trace_id}\n");
    fn walk(
        out: &mut String,
        spans: &[&Span],
        linked: &[&Span],
        parent: &str,
        depth: usize,
        start: u64,
    ) {
        let mut children: Vec<&&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent)
            .collect();
        children.sort_by_key(|s| s.start_unix_nano);
        for span in children {
            line(out, span, depth, start, "");
            for l in linked
                .iter()
                .filter(|l| l.links.iter().any(|(_, id)| *id == span.span_id))
            {
                line(out, l, depth + 1, start, "linked: ");
            }
            walk(out, spans, linked, &span.span_id, depth + 1, start);
        }
    }
    fn line(out: &mut String, span: &Span, depth: usize, start: u64, prefix: &str) {
        let at = span.start_unix_nano.saturating_sub(start) as f64 / 1e6;
        let took = span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e6;
        out.push_str(&format!(
            "{:indent$}{prefix}{} [{}] {} +{at:.1} ms, {took:.1} ms\n",
            "",
            span.name,
            span.service,
            span.kind,
            indent = 2 + depth * 2
        ));
    }
    let roots: Vec<&Span> = in_trace
        .iter()
        .filter(|s| {
            s.parent_span_id.is_empty() || !in_trace.iter().any(|p| p.span_id == s.parent_span_id)
        })
        .copied()
        .collect();
    for root in roots {
        line(&mut out, root, 0, start, "");
        for l in linked
            .iter()
            .filter(|l| l.links.iter().any(|(_, id)| *id == root.span_id))
        {
            line(&mut out, l, 1, start, "linked: ");
        }
        walk(&mut out, &in_trace, &linked, &root.span_id, 1, start);
    }
    out
}
