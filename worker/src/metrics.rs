//! Prometheus metrics, exposed on `/metrics` by [`crate::health`].
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client: it
//! owns the exposition format, so nothing here formats text by hand.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Whether a failure will be retried (`transient`) or the message was moved to
/// the dead-letter table (`permanent`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `transient` or `permanent`.
    pub kind: &'static str,
}

/// The relay's metrics. Cheap to clone: every metric is shared.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Messages acknowledged by Pub/Sub and removed from the outbox.
    pub published: Counter,
    /// Messages whose publish failed, by kind.
    pub publish_errors: Family<ErrorLabels, Counter>,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: Counter,
    /// Pending rows in the outbox (sampled; exact up to 100,000).
    pub backlog: Gauge,
    /// Seconds since the oldest pending row was written (sampled): the lag.
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    /// Seconds from the row's insert to Pub/Sub's acknowledgement.
    pub latency: Histogram,
    /// Rows per claimed batch.
    pub batch_size: Histogram,
    /// Claims and completions that failed on the database side.
    pub db_errors: Counter,
    /// Of those, waits for a pooled connection that timed out.
    pub pool_timeouts: Counter,
    /// Rows dead-lettered because their routed topic refused them
    /// `--max-publish-attempts` times.
    pub attempts_exhausted: Counter,
    /// Topic publishers held (idle ones are let go).
    pub publishers: Gauge,
    /// 1 while this replica holds leadership (always 1 without leader election).
    pub is_leader: Gauge,
    /// 1 while `/readyz` would answer 200 (sampled by the probe).
    pub ready: Gauge,
    /// Times this replica gained or lost leadership.
    pub leader_transitions: Counter,
    /// Ordering keys held paused until the failed claim drains (not
    /// exported; read by the status report on the Lease).
    pub paused_keys: Gauge,
    /// Unix time (seconds) of the last commit that deleted published rows;
    /// 0 before the first (not exported; read by the status report).
    pub last_published: Gauge<f64, AtomicU64>,
}

impl RelayMetrics {
    /// Creates the metrics and registers them under the `outbox_` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = RelayMetrics {
            published: Counter::default(),
            publish_errors: Family::default(),
            dead_lettered: Counter::default(),
            backlog: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            // 1 ms .. ~56 s in steps of 25 %, so that p99 can be read to
            // within a quarter, not a factor of two.
            latency: Histogram::new(exponential_buckets(0.001, 1.25, 50)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            db_errors: Counter::default(),
            pool_timeouts: Counter::default(),
            attempts_exhausted: Counter::default(),
            publishers: Gauge::default(),
            is_leader: Gauge::default(),
            ready: Gauge::default(),
            leader_transitions: Counter::default(),
            paused_keys: Gauge::default(),
            last_published: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("outbox");
        r.register(
            "messages_published",
            "Messages acknowledged by Pub/Sub and removed from the outbox",
            metrics.published.clone(),
        );
        r.register(
            "publish_errors",
            "Messages whose publish failed (transient: retried; permanent: dead-lettered)",
            metrics.publish_errors.clone(),
        );
        r.register(
            "dead_letter",
            "Rows moved to the dead-letter table",
            metrics.dead_lettered.clone(),
        );
        r.register(
            "backlog",
            "Pending rows in the outbox table (sampled; exact up to 100000, estimated beyond)",
            metrics.backlog.clone(),
        );
        r.register(
            "oldest_pending_age_seconds",
            "Seconds since the oldest pending row was written (sampled; 0 when none is pending)",
            metrics.oldest_pending_age.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Time from the row's insert to Pub/Sub's acknowledgement",
            metrics.latency.clone(),
        );
        r.register(
            "batch_rows",
            "Rows per claimed batch",
            metrics.batch_size.clone(),
        );
        r.register(
            "database_errors",
            "Database operations of the relay loop that failed",
            metrics.db_errors.clone(),
        );
        r.register(
            "database_pool_timeouts",
            "Waits for a pooled database connection that timed out (pool exhausted)",
            metrics.pool_timeouts.clone(),
        );
        r.register(
            "publish_attempts_exhausted",
            "Rows dead-lettered after their routed topic refused them --max-publish-attempts times",
            metrics.attempts_exhausted.clone(),
        );
        r.register(
            "topic_publishers",
            "Topic publishers held by the relay (idle ones are let go)",
            metrics.publishers.clone(),
        );
        r.register(
            "is_leader",
            "1 while this replica is the one that publishes",
            metrics.is_leader.clone(),
        );
        r.register(
            "leader_transitions",
            "Times this replica gained or lost leadership",
            metrics.leader_transitions.clone(),
        );
        r.register(
            "ready",
            "1 while the relay's dependencies (PostgreSQL, Pub/Sub and its topic) answer, as /readyz says (sampled)",
            metrics.ready.clone(),
        );
        metrics
    }

    /// Counts failed publishes of one kind.
    pub fn publish_error(&self, kind: &'static str, n: u64) {
        self.publish_errors
            .get_or_create(&ErrorLabels { kind })
            .inc_by(n);
    }
}

/// The inbox worker's metrics (`inbox_` prefix), the counterpart of
/// [`RelayMetrics`]. Cheap to clone: every metric is shared.
#[derive(Clone)]
pub struct InboxMetrics {
    /// Messages pulled from the subscription (duplicates included).
    pub received: Counter,
    /// Messages inserted into the inbox table (first deliveries only).
    pub stored: Counter,
    /// Messages already in the inbox (same dedup key), acknowledged and dropped.
    pub duplicates: Counter,
    /// Messages recorded in the dead-letter table instead.
    pub dead_lettered: Counter,
    /// Unprocessed rows in the inbox table (sampled; exact up to 100,000).
    pub backlog: Gauge,
    /// Seconds since the oldest unprocessed row was stored (sampled).
    pub oldest_unprocessed_age: Gauge<f64, AtomicU64>,
    /// Rows parked after too many failed handler runs (sampled).
    pub parked: Gauge,
    /// 1 while `/readyz` would answer 200 (sampled by the probe).
    pub ready: Gauge,
    /// Seconds from Pub/Sub's publish time to the inbox commit.
    pub latency: Histogram,
    /// Messages per stored batch (one transaction each).
    pub batch_size: Histogram,
    /// Batches whose transaction failed (retried).
    pub db_errors: Counter,
    /// Of those, waits for a pooled connection that timed out.
    pub pool_timeouts: Counter,
    /// Streaming-pull errors (the stream is reopened).
    pub stream_errors: Counter,
    /// 1 while this replica leads, so pulls (always 1 without leader election).
    pub is_leader: Gauge,
    /// Times this replica gained or lost leadership.
    pub leader_transitions: Counter,
}

impl InboxMetrics {
    /// Creates the metrics and registers them under the `inbox_` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = InboxMetrics {
            received: Counter::default(),
            stored: Counter::default(),
            duplicates: Counter::default(),
            dead_lettered: Counter::default(),
            backlog: Gauge::default(),
            oldest_unprocessed_age: Gauge::default(),
            parked: Gauge::default(),
            ready: Gauge::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            db_errors: Counter::default(),
            pool_timeouts: Counter::default(),
            stream_errors: Counter::default(),
            is_leader: Gauge::default(),
            leader_transitions: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("inbox");
        r.register(
            "messages_received",
            "Messages pulled from the subscription, duplicates included",
            metrics.received.clone(),
        );
        r.register(
            "messages_stored",
            "Messages inserted into the inbox table",
            metrics.stored.clone(),
        );
        r.register(
            "duplicates",
            "Messages already in the inbox (same message id), acknowledged without storing",
            metrics.duplicates.clone(),
        );
        r.register(
            "dead_letter",
            "Messages recorded in the inbox dead-letter table",
            metrics.dead_lettered.clone(),
        );
        r.register(
            "backlog",
            "Unprocessed rows in the inbox table (sampled; exact up to 100000)",
            metrics.backlog.clone(),
        );
        r.register(
            "oldest_unprocessed_age_seconds",
            "Seconds since the oldest unprocessed row was stored (sampled; 0 when none)",
            metrics.oldest_unprocessed_age.clone(),
        );
        r.register(
            "ready",
            "1 while the inbox worker's dependencies (PostgreSQL, Pub/Sub and its subscription) answer, as /readyz says (sampled)",
            metrics.ready.clone(),
        );
        r.register(
            "parked_rows",
            "Inbox rows parked after their handler failed the configured number of times, waiting for an operator (sampled; exact up to 100000)",
            metrics.parked.clone(),
        );
        r.register(
            "store_latency_seconds",
            "Time from Pub/Sub's publish time to the inbox commit",
            metrics.latency.clone(),
        );
        r.register(
            "batch_messages",
            "Messages per inbox transaction",
            metrics.batch_size.clone(),
        );
        r.register(
            "database_errors",
            "Inbox transactions that failed and were retried",
            metrics.db_errors.clone(),
        );
        r.register(
            "database_pool_timeouts",
            "Waits for a pooled database connection that timed out (pool exhausted)",
            metrics.pool_timeouts.clone(),
        );
        r.register(
            "stream_errors",
            "Streaming-pull errors; the stream is reopened",
            metrics.stream_errors.clone(),
        );
        r.register(
            "is_leader",
            "1 while this replica is the one that pulls the subscription",
            metrics.is_leader.clone(),
        );
        r.register(
            "leader_transitions",
            "Times this replica gained or lost leadership",
            metrics.leader_transitions.clone(),
        );
        metrics
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let mut registry = Registry::default();
        let m = RelayMetrics::register(&mut registry);
        m.published.inc_by(3);
        m.publish_error("transient", 2);
        m.latency.observe(0.004);
        let text = render(&registry);
        for name in [
            "outbox_messages_published_total 3",
            "outbox_publish_errors_total{kind=\"transient\"} 2",
            "outbox_backlog 0",
            "outbox_dead_letter_total 0",
            "outbox_publish_latency_seconds_bucket",
            "outbox_is_leader 0",
            "outbox_leader_transitions_total 0",
            "outbox_oldest_pending_age_seconds 0.0",
            "outbox_database_pool_timeouts_total 0",
            "outbox_publish_attempts_exhausted_total 0",
            "outbox_topic_publishers 0",
            "outbox_ready 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
    #[test]
    fn inbox_names_follow_the_contract() {
        let mut registry = Registry::default();
        let m = InboxMetrics::register(&mut registry);
        m.stored.inc_by(2);
        m.duplicates.inc();
        let text = render(&registry);
        for name in [
            "inbox_messages_stored_total 2",
            "inbox_duplicates_total 1",
            "inbox_messages_received_total 0",
            "inbox_dead_letter_total 0",
            "inbox_backlog 0",
            "inbox_oldest_unprocessed_age_seconds 0.0",
            "inbox_parked_rows 0",
            "inbox_ready 0",
            "inbox_database_pool_timeouts_total 0",
            "inbox_is_leader 0",
            "inbox_leader_transitions_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
