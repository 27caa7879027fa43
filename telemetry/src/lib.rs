//! Logs and traces for the worker and the operator: one `tracing` subscriber
//! that writes logs to stderr and, when an OTLP endpoint is configured,
//! exports spans with OpenTelemetry.
//!
//! Export is configured only by the standard OpenTelemetry variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SDK_DISABLED`, `OTEL_BSP_*`), read by the
//! OpenTelemetry SDK itself where it can ([`otlp`]). Without an endpoint
//! nothing is exported and no OpenTelemetry layer is installed, so spans cost
//! what they cost before. With one, spans go through the SDK's batch
//! processor, which never blocks the caller; what it cannot deliver is
//! dropped and counted ([`accounting`]).
//!
//! It also names the figures a leading worker reports on its Lease for the
//! operator ([`lease_report`]), so both binaries share one contract.

pub mod accounting;
pub mod lease_report;
pub mod otlp;

use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use accounting::SpanMetrics;
pub use otlp::{ExportConfig, TelemetryError};

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines for terminals.
    Text,
    /// One JSON object per line for log collectors.
    Json,
}

/// Whether spans are exported. Code that would do extra work only for a
/// trace (parsing trace contexts, adding links) asks this first.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// True when an OpenTelemetry exporter is installed in this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; dropping it flushes what is queued (for at
/// most the SDK's shutdown timeout, 5 s) and shuts the exporter down.
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            // Errors here mean the collector is gone; the spans were counted
            // as dropped, and there is nobody left to tell.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (else
/// `default_filter`), and, when the environment asks for it, export of the
/// spans `traces` (an `EnvFilter` directive) lets through. `service` names
/// the service when `OTEL_SERVICE_NAME` does not.
///
/// Must be called inside a Tokio runtime (the gRPC exporter needs one).
pub fn init(
    format: LogFormat,
    default_filter: &str,
    traces: &str,
    service: &'static str,
) -> Result<Telemetry, TelemetryError> {
    let export = ExportConfig::from_env()?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    };
    let mut layers = vec![logs.with_filter(filter).boxed()];
    let provider = match export {
        Some(config) => {
            let (layer, provider) = otlp::layer(&config, service, traces)?;
            layers.push(layer);
            Some(provider)
        }
        None => None,
    };
    // A second init (tests that call it twice) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(target: "telemetry", "exporting traces over OTLP");
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}
