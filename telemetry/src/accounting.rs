//! Counting what the trace exporter delivers and what it drops.
//!
//! The SDK's batch processor already never blocks: it queues finished spans
//! and exports them from its own thread, dropping new spans when its queue is
//! full. It does not say how many it dropped while running, so two thin
//! wrappers count for it: [`GatedProcessor`] in front of it admits a span
//! only while fewer than the queue size are waiting or being exported (and
//! counts the rest as dropped), and [`CountingExporter`] behind it counts
//! each export's spans as delivered or failed when the export ends.

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Why spans were dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` (the collector is slower than spans are made, or gone
    /// and timing out) or `export_failed` (the collector refused or could
    /// not be reached).
    pub reason: &'static str,
}

/// The exporter's figures, one set per process.
#[derive(Clone, Debug, Default)]
pub struct SpanMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
    /// Spans admitted and not yet exported or failed.
    in_flight: Arc<AtomicUsize>,
}

static GLOBAL: LazyLock<SpanMetrics> = LazyLock::new(SpanMetrics::default);

impl SpanMetrics {
    /// This process's figures (the exporter is process-wide too).
    pub fn global() -> SpanMetrics {
        GLOBAL.clone()
    }

    /// Registers `otel_spans_exported_total` and `otel_spans_dropped_total`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("otel");
        r.register(
            "spans_exported",
            "Spans the OTLP collector accepted",
            self.exported.clone(),
        );
        r.register(
            "spans_dropped",
            "Spans not delivered to the OTLP collector, by reason",
            self.dropped.clone(),
        );
    }

    /// Spans delivered so far.
    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    /// Spans dropped so far for this reason.
    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    fn drop_spans(&self, reason: &'static str, n: usize) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n as u64);
    }
}

/// Admits finished spans to the batch processor while fewer than `limit`
/// are waiting or being exported; drops and counts the rest.
#[derive(Debug)]
pub struct GatedProcessor<P> {
    inner: P,
    limit: usize,
    metrics: SpanMetrics,
}

impl<P> GatedProcessor<P> {
    pub fn new(inner: P, limit: usize, metrics: SpanMetrics) -> Self {
        GatedProcessor {
            inner,
            limit: limit.max(1),
            metrics,
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for GatedProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let admitted = self
            .metrics
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            self.metrics.drop_spans("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts each export's spans as delivered or failed when it ends (also
/// when the processor gives up on it and drops the future).
#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    metrics: SpanMetrics,
}

impl<E> CountingExporter<E> {
    pub fn new(inner: E, metrics: SpanMetrics) -> Self {
        CountingExporter { inner, metrics }
    }
}

/// Settles one export's count exactly once, however the export ends.
struct Settle {
    metrics: SpanMetrics,
    spans: usize,
    delivered: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        if self.delivered {
            self.metrics.exported.inc_by(self.spans as u64);
        } else {
            self.metrics.drop_spans("export_failed", self.spans);
        }
        self.metrics
            .in_flight
            .fetch_sub(self.spans, Ordering::AcqRel);
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut settle = Settle {
            metrics: self.metrics.clone(),
            spans: batch.len(),
            delivered: false,
        };
        let result = self.inner.export(batch).await;
        settle.delivered = result.is_ok();
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
