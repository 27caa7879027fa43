//! Names of the status report a leading worker writes on its Lease and the operator
//! reads back into a relay's status: the contract between the two binaries, kept in the
//! one crate both depend on. What each figure means for the relay and for the inbox
//! worker is documented where the worker builds the report (`worker/src/report.rs`) and
//! in docs/operator.md.

/// RFC 3339 UTC time the report was assembled.
pub const REPORT_TIME: &str = "outbox.dev/report-time";
/// Pending (relay) or unprocessed (inbox) rows, an integer.
pub const BACKLOG: &str = "outbox.dev/backlog";
/// Age of the oldest pending or unprocessed row, in decimal seconds.
pub const OLDEST_PENDING_AGE_SECONDS: &str = "outbox.dev/oldest-pending-age-seconds";
/// Messages published (relay) or stored (inbox) by the reporting process.
pub const MESSAGES_TOTAL: &str = "outbox.dev/messages-total";
/// Messages dead-lettered by the reporting process.
pub const DEAD_LETTERS_TOTAL: &str = "outbox.dev/dead-letters-total";
/// RFC 3339 time of the last progress: a published batch (relay), the newest processed
/// inbox row (inbox).
pub const LAST_PROGRESS_TIME: &str = "outbox.dev/last-progress-time";
/// Ordering keys currently paused (relay only).
pub const PAUSED_KEYS: &str = "outbox.dev/paused-keys";
/// Parked inbox rows (inbox only).
pub const PARKED_ROWS: &str = "outbox.dev/parked-rows";

/// Every annotation of the report.
pub const KEYS: [&str; 8] = [
    REPORT_TIME,
    BACKLOG,
    OLDEST_PENDING_AGE_SECONDS,
    MESSAGES_TOTAL,
    DEAD_LETTERS_TOTAL,
    LAST_PROGRESS_TIME,
    PAUSED_KEYS,
    PARKED_ROWS,
];
