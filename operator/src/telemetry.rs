//! Logging and trace export for the operator: `tracing` with an env filter
//! (`RUST_LOG`), JSON lines when `LOG_FORMAT=json` (what log collectors in a
//! cluster want), text otherwise; reconcile spans exported over OTLP when
//! the chart's `tracing` values set `OTEL_EXPORTER_OTLP_ENDPOINT` (the same
//! `outbox-telemetry` crate the workers use).

pub use outbox_telemetry::{SpanMetrics, Telemetry, TelemetryError};

/// Installs the global subscriber; keep the guard until exit (it flushes
/// queued spans). Logs go to stderr so `crd` / `render` keep a clean stdout.
pub fn init(json: bool) -> Result<Telemetry, TelemetryError> {
    let format = if json {
        outbox_telemetry::LogFormat::Json
    } else {
        outbox_telemetry::LogFormat::Text
    };
    outbox_telemetry::init(
        format,
        "info,kube_runtime=info,kube_client=warn,tower=warn,hyper=warn",
        // kube-runtime's "reconciling object" span per reconciliation, and ours.
        "kube_runtime::controller=info,outbox_operator=info",
        "outbox-operator",
    )
}
