//! Prometheus metrics of the operator: reconcile counts, errors and durations.
//!
//! Served on `/metrics` by [`crate::http`]; the registry is owned here so that tests can
//! read the counters back.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the per-outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `blocked` (invalid spec / missing secret) or `error`.
    pub outcome: String,
}

/// Label of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Short error class, see `reconcile::Error::metric_label`.
    pub error: String,
}

/// All metrics of the operator.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by outcome.
    pub reconciliations: Family<OutcomeLabels, Counter>,
    /// Failed reconciliations by error class.
    pub errors: Family<ErrorLabels, Counter>,
    /// Duration of reconciliations.
    pub duration: Histogram,
    /// 1 while this replica holds the operator's Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics under the `outbox_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_operator");
        crate::telemetry::SpanMetrics::global().register(&mut registry);
        let reconciliations = Family::<OutcomeLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let leader = Gauge::default();
        registry.register(
            "reconciliations",
            "Reconciliations of OutboxRelay resources by outcome",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error class",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of OutboxRelay reconciliations",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the active (leader) operator",
            leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            errors,
            duration,
            leader,
        }
    }

    /// Records one finished reconciliation.
    pub fn observe(&self, outcome: &str, elapsed: Duration) {
        self.reconciliations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Records a failed reconciliation.
    pub fn error(&self, class: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: class.to_owned(),
            })
            .inc();
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
