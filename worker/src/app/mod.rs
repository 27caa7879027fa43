//! The application library: what a Rust service links to take part in the
//! outbox and inbox patterns with its own `sqlx` transactions.
//!
//! - [`OutboxMessage`]: write a message to the outbox inside the caller's
//!   transaction; the relay publishes it after the commit.
//! - [`InboxProcessor`]: process the rows `outbox-worker inbox` stored, each
//!   in a transaction that also marks it processed; failures are retried with
//!   a backoff and parked after a number of attempts.
//! - [`delete_processed`]: retention of processed inbox rows.
//!
//! worker/INBOX.md documents the SQL each of these runs, for applications in
//! other languages.

mod outbox;
mod processor;
mod retention;

pub use outbox::{OutboxError, OutboxMessage};
pub use processor::{
    BatchReport, Handler, HandlerError, InboxMessage, InboxProcessor, ProcessorConfig,
};
pub use retention::delete_processed;
