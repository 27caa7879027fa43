//! The figures the active worker reports on its Lease, read back for status.
//!
//! The worker holding a relay's Lease writes these annotations at every renewal (every
//! `retryPeriod`), in the same write that renews it, so the operator learns how messages
//! flow without database access or pod networking. The contract (names and formats) is
//! the worker's (names in `outbox_telemetry::lease_report`, meanings in `worker/src/report.rs`); a value that does not parse
//! is treated as absent rather than failing the reconcile.
//!
//! | annotation | meaning |
//! |---|---|
//! | `outbox.dev/report-time` | RFC 3339 time the figures were read |
//! | `outbox.dev/backlog` | rows waiting (outbox: unpublished; inbox: unprocessed) |
//! | `outbox.dev/oldest-pending-age-seconds` | age of the oldest waiting row |
//! | `outbox.dev/messages-total` | published / stored by this process |
//! | `outbox.dev/dead-letters-total` | dead-lettered by this process |
//! | `outbox.dev/last-progress-time` | RFC 3339: last publish (outbox) / newest processed row (inbox) |
//! | `outbox.dev/paused-keys` | ordering keys held back (outbox) |
//! | `outbox.dev/parked-rows` | parked inbox rows (inbox) |

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

use outbox_telemetry::lease_report::{
    BACKLOG, DEAD_LETTERS_TOTAL, LAST_PROGRESS_TIME, MESSAGES_TOTAL, OLDEST_PENDING_AGE_SECONDS,
    PARKED_ROWS, PAUSED_KEYS, REPORT_TIME,
};

/// What a Lease says about the flow of messages; every field is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// When the worker read the figures.
    pub report_time: Option<Timestamp>,
    /// Rows waiting.
    pub backlog: Option<i64>,
    /// Age of the oldest waiting row.
    pub oldest_pending_age: Option<Duration>,
    /// Messages published or stored.
    pub messages_total: Option<i64>,
    /// Dead letters.
    pub dead_letters: Option<i64>,
    /// Last progress.
    pub last_progress: Option<Timestamp>,
    /// Paused ordering keys.
    pub paused_keys: Option<i64>,
    /// Parked rows.
    pub parked_rows: Option<i64>,
}

/// Reads the report annotations of `lease` (all absent when it has none).
pub fn read(lease: &Lease) -> Report {
    let Some(annotations) = lease.metadata.annotations.as_ref() else {
        return Report::default();
    };
    let text = |key: &str| annotations.get(key).map(|v| v.trim());
    let count = |key: &str| {
        text(key)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|n| *n >= 0)
    };
    let time = |key: &str| text(key).and_then(|v| v.parse::<Timestamp>().ok());
    Report {
        report_time: time(REPORT_TIME),
        backlog: count(BACKLOG),
        oldest_pending_age: text(OLDEST_PENDING_AGE_SECONDS)
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok()),
        messages_total: count(MESSAGES_TOTAL),
        dead_letters: count(DEAD_LETTERS_TOTAL),
        last_progress: time(LAST_PROGRESS_TIME),
        paused_keys: count(PAUSED_KEYS),
        parked_rows: count(PARKED_ROWS),
    }
}

/// A duration as `kubectl` prints ages: `45s`, `3m12s`, `2h5m`, `3d4h` (whole seconds).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn lease(pairs: &[(&str, &str)]) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: Some(
                    pairs
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            spec: None,
        }
    }

    #[test]
    fn every_figure_is_read() {
        let r = read(&lease(&[
            (REPORT_TIME, "2026-12-02T10:00:00Z"),
            (BACKLOG, "1234"),
            (OLDEST_PENDING_AGE_SECONDS, "12.5"),
            (MESSAGES_TOTAL, "99"),
            (DEAD_LETTERS_TOTAL, "2"),
            (LAST_PROGRESS_TIME, "2026-12-02T09:59:58.5Z"),
            (PAUSED_KEYS, "3"),
            (PARKED_ROWS, "4"),
        ]));
        assert_eq!(r.backlog, Some(1234));
        assert_eq!(r.oldest_pending_age, Some(Duration::from_millis(12_500)));
        assert_eq!(r.messages_total, Some(99));
        assert_eq!(r.dead_letters, Some(2));
        assert_eq!(r.paused_keys, Some(3));
        assert_eq!(r.parked_rows, Some(4));
        assert_eq!(
            r.report_time,
            Some("2026-12-02T10:00:00Z".parse().expect("time"))
        );
        assert!(r.last_progress.is_some());
    }

    #[test]
    fn malformed_values_are_absent_not_errors() {
        let r = read(&lease(&[
            (BACKLOG, "-1"),
            (OLDEST_PENDING_AGE_SECONDS, "NaN"),
            (MESSAGES_TOTAL, "many"),
            (LAST_PROGRESS_TIME, "yesterday"),
        ]));
        assert_eq!(r, Report::default());
        assert_eq!(read(&Lease::default()), Report::default());
    }

    #[test]
    fn durations_read_like_kubectl_ages() {
        let d = |s| human_duration(Duration::from_secs(s));
        assert_eq!(
            [d(0), d(59), d(61), d(3599), d(3660), d(90_000)],
            ["0s", "59s", "1m1s", "59m59s", "1h1m", "1d1h"]
        );
    }
}
