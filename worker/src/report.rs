//! The status report a leading worker writes on its Kubernetes Lease: the
//! one place that builds it, and the contract the operator reads.
//!
//! At every successful acquisition and renewal of the Lease (kubernetes
//! backend only: the postgres backend has no object to write on), the
//! holder sets these `metadata.annotations` in the same write. The names
//! are fixed; the operator depends on them.
//!
//! | annotation | relay | inbox worker |
//! |---|---|---|
//! | `outbox.dev/report-time` | RFC 3339 UTC time this report was assembled (the probe's figures in it are at most one probe interval older) | same |
//! | `outbox.dev/backlog` | pending outbox rows (integer) | unprocessed inbox rows: `processed_at IS NULL AND parked_at IS NULL` |
//! | `outbox.dev/oldest-pending-age-seconds` | decimal seconds since the oldest pending outbox row was written, `0` when none | same, for the oldest unprocessed inbox row |
//! | `outbox.dev/messages-total` | messages published by this process since it started (integer) | messages stored in the inbox by this process since it started |
//! | `outbox.dev/dead-letters-total` | rows dead-lettered by this process since it started | messages dead-lettered by this process since it started |
//! | `outbox.dev/last-progress-time` | RFC 3339: when this process last committed the deletes of a published batch | RFC 3339: the newest `processed_at` in the inbox table (when the application's processors last finished a row) |
//! | `outbox.dev/paused-keys` | ordering keys currently paused after a failed publish (integer) | — |
//! | `outbox.dev/parked-rows` | — | parked rows (integer) |
//!
//! `backlog`, `oldest-pending-age-seconds`, `parked-rows` and the inbox's
//! `last-progress-time` come from the readiness probe's last round
//! ([`crate::probe::Figures`]): they are omitted while unknown (the probe
//! has not run yet, or could not read them in its last round). The relay's
//! `last-progress-time` is omitted until its first published batch, the
//! inbox's while no row was processed. The counters are the Prometheus
//! counters of this process (`outbox_messages_published_total`,
//! `outbox_dead_letter_total`, `inbox_messages_stored_total`,
//! `inbox_dead_letter_total`), so they restart at 0 with the process. A
//! key missing from a write is removed from the Lease; annotations under
//! other keys are left alone.

use chrono::{DateTime, SecondsFormat, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

use crate::leader::kubernetes::Report;
use crate::metrics::{InboxMetrics, RelayMetrics};
use crate::probe::Figures;

pub use outbox_telemetry::lease_report::{
    BACKLOG, DEAD_LETTERS_TOTAL, KEYS, LAST_PROGRESS_TIME, MESSAGES_TOTAL,
    OLDEST_PENDING_AGE_SECONDS, PARKED_ROWS, PAUSED_KEYS, REPORT_TIME,
};

/// Decimal seconds to the millisecond, without trailing zeros (`0` when
/// nothing is pending).
fn seconds(age: f64) -> String {
    let text = format!("{:.3}", age.max(0.0));
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The figures every worker reports.
fn common(
    now: DateTime<Utc>,
    figures: &Figures,
    messages: u64,
    dead: u64,
) -> BTreeMap<String, String> {
    let mut report = BTreeMap::new();
    report.insert(REPORT_TIME.to_owned(), rfc3339(now));
    if let Some(n) = figures.backlog {
        report.insert(BACKLOG.to_owned(), n.to_string());
    }
    if let Some(age) = figures.oldest_age {
        report.insert(OLDEST_PENDING_AGE_SECONDS.to_owned(), seconds(age));
    }
    report.insert(MESSAGES_TOTAL.to_owned(), messages.to_string());
    report.insert(DEAD_LETTERS_TOTAL.to_owned(), dead.to_string());
    report
}

/// The relay's report, from its metrics and the probe's last figures.
pub fn relay(
    now: DateTime<Utc>,
    metrics: &RelayMetrics,
    figures: &Figures,
) -> BTreeMap<String, String> {
    let mut report = common(
        now,
        figures,
        metrics.published.get(),
        metrics.dead_lettered.get(),
    );
    let last = metrics.last_published.get();
    if last > 0.0
        && let Some(at) = DateTime::from_timestamp_micros((last * 1e6) as i64)
    {
        report.insert(LAST_PROGRESS_TIME.to_owned(), rfc3339(at));
    }
    report.insert(
        PAUSED_KEYS.to_owned(),
        metrics.paused_keys.get().max(0).to_string(),
    );
    report
}

/// The inbox worker's report, from its metrics and the probe's last figures.
pub fn inbox(
    now: DateTime<Utc>,
    metrics: &InboxMetrics,
    figures: &Figures,
) -> BTreeMap<String, String> {
    let mut report = common(
        now,
        figures,
        metrics.stored.get(),
        metrics.dead_lettered.get(),
    );
    if let Some(at) = figures.last_processed {
        report.insert(LAST_PROGRESS_TIME.to_owned(), rfc3339(at));
    }
    if let Some(n) = figures.parked {
        report.insert(PARKED_ROWS.to_owned(), n.to_string());
    }
    report
}

/// The report of a relay, for the Lease elector.
pub fn relay_source(metrics: RelayMetrics, figures: watch::Receiver<Figures>) -> Report {
    source(move || relay(Utc::now(), &metrics, &figures.borrow()))
}

/// The report of an inbox worker, for the Lease elector.
pub fn inbox_source(metrics: InboxMetrics, figures: watch::Receiver<Figures>) -> Report {
    source(move || inbox(Utc::now(), &metrics, &figures.borrow()))
}

fn source(build: impl Fn() -> BTreeMap<String, String> + Send + Sync + 'static) -> Report {
    Report {
        keys: KEYS.iter().map(|k| (*k).to_owned()).collect(),
        source: Arc::new(build),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("a time")
    }

    #[test]
    fn relay_report_omits_what_is_unknown() {
        let metrics = RelayMetrics::register(&mut Registry::default());
        let now = at("2026-12-02T10:00:00Z");
        let report = relay(now, &metrics, &Figures::default());
        assert_eq!(
            report,
            BTreeMap::from([
                (
                    REPORT_TIME.to_owned(),
                    "2026-12-02T10:00:00.000Z".to_owned()
                ),
                (MESSAGES_TOTAL.to_owned(), "0".to_owned()),
                (DEAD_LETTERS_TOTAL.to_owned(), "0".to_owned()),
                (PAUSED_KEYS.to_owned(), "0".to_owned()),
            ])
        );

        metrics.published.inc_by(7);
        metrics.dead_lettered.inc();
        metrics.paused_keys.set(2);
        metrics
            .last_published
            .set(at("2026-12-02T09:59:58.5Z").timestamp_millis() as f64 / 1e3);
        let figures = Figures {
            backlog: Some(12),
            oldest_age: Some(1.25),
            ..Figures::default()
        };
        let report = relay(now, &metrics, &figures);
        assert_eq!(report[BACKLOG], "12");
        assert_eq!(report[OLDEST_PENDING_AGE_SECONDS], "1.25");
        assert_eq!(report[MESSAGES_TOTAL], "7");
        assert_eq!(report[DEAD_LETTERS_TOTAL], "1");
        assert_eq!(report[PAUSED_KEYS], "2");
        assert_eq!(report[LAST_PROGRESS_TIME], "2026-12-02T09:59:58.500Z");
        assert!(!report.contains_key(PARKED_ROWS));
    }

    #[test]
    fn inbox_report_has_parked_rows_and_the_last_processed_time() {
        let metrics = InboxMetrics::register(&mut Registry::default());
        metrics.stored.inc_by(3);
        let figures = Figures {
            backlog: Some(0),
            oldest_age: Some(0.0),
            parked: Some(1),
            last_processed: Some(at("2026-12-02T09:00:00Z")),
        };
        let report = inbox(at("2026-12-02T10:00:00Z"), &metrics, &figures);
        assert_eq!(report[BACKLOG], "0");
        assert_eq!(report[OLDEST_PENDING_AGE_SECONDS], "0");
        assert_eq!(report[MESSAGES_TOTAL], "3");
        assert_eq!(report[PARKED_ROWS], "1");
        assert_eq!(report[LAST_PROGRESS_TIME], "2026-12-02T09:00:00.000Z");
        assert!(!report.contains_key(PAUSED_KEYS));
        for key in report.keys() {
            assert!(KEYS.contains(&key.as_str()), "{key} is not in KEYS");
        }
    }
}
