//! Processing inbox rows exactly once, in the caller's transaction.
//!
//! One batch is one transaction:
//!
//! 1. claim unprocessed rows that are due (`FOR UPDATE SKIP LOCKED`, in id
//!    order) that are the oldest unprocessed row of their ordering key (the
//!    key's *head*), then lock the rows that follow those heads in their
//!    keys. Holding a key's head keeps every other processor off the key, so
//!    a key's rows are processed one after the other in receive order, also
//!    with several processors. The claim reads payload sizes, not payloads;
//!    the batch keeps rows in id order up to `max_batch_bytes` of payloads
//!    (at least one row), and only their payloads are read;
//! 2. for each row in id order, in a savepoint: run the handler with the
//!    transaction, for at most `handler_timeout` (the server also cancels
//!    any statement that runs longer); after a failure, the key's later rows
//!    in the batch are left for a later batch.
//!    On success the row is marked processed; on failure (an error, a
//!    timeout, or `Ok` from a handler whose statement failed, which leaves
//!    the transaction aborted) the savepoint is rolled back (the handler's
//!    effects are undone) and the failure is recorded: attempts + 1, the
//!    error, and when to retry (exponential backoff); after `max_attempts`
//!    the row is parked;
//! 3. commit: the effects and `processed_at` become visible together.
//!
//! A crash anywhere rolls the whole batch back; nothing was applied, and the
//! rows are claimed again.

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Acquire, AssertSqlSafe, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::backoff::Backoff;
use crate::ident::TableName;
use crate::trace::{self, Carried};

/// What a handler returns on failure; any error type converts into it
/// (including `anyhow::Error`) with `?`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// An inbox row, as handed to the handler.
#[derive(Clone, Debug)]
pub struct InboxMessage {
    /// Row id: receive order.
    pub id: i64,
    /// The dedup key (the producer's `message-id`).
    pub message_id: String,
    /// Message data.
    pub payload: Vec<u8>,
    /// Message attributes.
    pub attributes: HashMap<String, String>,
    /// The ordering key, if any.
    pub ordering_key: Option<String>,
    /// Pub/Sub's publish time.
    pub published_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the inbox stored it.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// Failed attempts before this one.
    pub attempts: i32,
    /// The trace context the message carried (the producer's span), under
    /// which the handler runs.
    pub trace: Option<Carried>,
}

/// The application's processing of one message. It runs inside the batch
/// transaction (`tx`): everything it writes there commits together with the
/// row's `processed_at`, or not at all.
///
/// Implemented for closures returning a boxed future:
///
/// ```no_run
/// # use outbox_worker::app::{Handler, InboxMessage, HandlerError};
/// let handler = |tx: &mut sqlx::PgConnection, m: &InboxMessage| -> futures::future::BoxFuture<'_, Result<(), HandlerError>> {
///     Box::pin(async move {
///         sqlx::query("INSERT INTO seen (message_id) VALUES ($1)")
///             .bind(&m.message_id)
///             .execute(&mut *tx)
///             .await?;
///         Ok(())
///     })
/// };
/// ```
pub trait Handler: Send + Sync {
    /// Processes `message` using `tx`; an error rolls back what it did.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(
            &'a mut PgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync,
{
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self(tx, message)
    }
}

/// How the processor claims, retries and parks.
#[derive(Clone, Debug)]
pub struct ProcessorConfig {
    /// The inbox table.
    pub table: TableName,
    /// Rows claimed per transaction.
    pub batch_size: i64,
    /// Of those, at most this many are found by the head scan (the oldest
    /// unprocessed row of a key, or an unkeyed row); the rest of the batch
    /// is the rows that follow the claimed heads in their keys. The head
    /// scan reads pending rows in id order until it has found this many, so
    /// keeping it below the number of active keys keeps claims cheap.
    pub heads_per_batch: i64,
    /// Failed attempts after which a row is parked (not retried).
    pub max_attempts: i32,
    /// Delay before the first retry of a failed row; doubles per attempt.
    pub retry_min: Duration,
    /// Longest delay between retries of a row.
    pub retry_max: Duration,
    /// How often [`InboxProcessor::run`] looks for new rows when idle.
    pub poll_interval: Duration,
    /// Payload bytes a batch holds at most (and at least one row).
    pub max_batch_bytes: i64,
    /// How long a handler may take for one message; then it is a failed
    /// attempt. Also the server-side `statement_timeout` of the batch.
    pub handler_timeout: Duration,
}

impl ProcessorConfig {
    /// Defaults for `table`: 100 rows and 8 MB of payloads per batch,
    /// handlers may take 60 s, parked after 5 attempts, retries after 1 s,
    /// 2 s, 4 s, ... up to 5 min.
    pub fn new(table: TableName) -> Self {
        ProcessorConfig {
            table,
            batch_size: 100,
            heads_per_batch: 32,
            max_attempts: 5,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            poll_interval: Duration::from_millis(200),
            max_batch_bytes: 8 * 1024 * 1024,
            handler_timeout: Duration::from_secs(60),
        }
    }
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed (rows after a failed row of the same key are left for a
    /// later batch, so `claimed` may exceed `processed + failed`).
    pub claimed: usize,
    /// Rows processed and marked.
    pub processed: usize,
    /// Rows whose handler failed (to be retried).
    pub failed: usize,
    /// Of those, rows parked for good.
    pub parked: usize,
}

/// Processes an inbox table with an application handler.
#[derive(Clone, Debug)]
pub struct InboxProcessor {
    pool: PgPool,
    config: ProcessorConfig,
    claim: String,
    followers: String,
    payloads: String,
    done: String,
    fail: String,
}

impl InboxProcessor {
    /// A processor for `config.table` on `pool`.
    pub fn new(pool: PgPool, config: ProcessorConfig) -> Self {
        let t = config.table.quoted();
        InboxProcessor {
            claim: format!(
                "SELECT id, message_id, octet_length(payload) AS bytes, attributes, ordering_key, published_at, received_at, attempts, traceparent, tracestate \
                 FROM {t} i \
                 WHERE processed_at IS NULL AND parked_at IS NULL AND next_attempt_at <= clock_timestamp() \
                   AND (ordering_key IS NULL OR NOT EXISTS ( \
                        SELECT 1 FROM {t} o WHERE o.ordering_key = i.ordering_key \
                          AND o.id < i.id AND o.processed_at IS NULL)) \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            followers: format!(
                "SELECT id, message_id, octet_length(payload) AS bytes, attributes, ordering_key, published_at, received_at, attempts, traceparent, tracestate, \
                        (parked_at IS NULL AND next_attempt_at <= clock_timestamp()) AS due \
                 FROM {t} \
                 WHERE ordering_key = ANY($1) AND processed_at IS NULL AND NOT (id = ANY($2)) \
                 ORDER BY id LIMIT $3 FOR UPDATE"
            ),
            payloads: format!("SELECT id, payload FROM {t} WHERE id = ANY($1)"),
            done: format!("UPDATE {t} SET processed_at = clock_timestamp() WHERE id = ANY($1)"),
            fail: format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = $2, \
                     next_attempt_at = clock_timestamp() + \
                         least($4::float8, $3::float8 * power(2, attempts)) * interval '1 second', \
                     parked_at = CASE WHEN attempts + 1 >= $5 THEN clock_timestamp() END \
                 WHERE id = $1 RETURNING parked_at IS NOT NULL"
            ),
            pool,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// Claims and processes one batch; returns what happened (`claimed == 0`
    /// when nothing was due). A database error rolls the whole batch back.
    pub async fn process_batch<H: Handler + ?Sized>(
        &self,
        handler: &H,
    ) -> Result<BatchReport, sqlx::Error> {
        let limit = self.config.batch_size.max(1);
        let mut tx = self.pool.begin().await?;
        // The server cancels any statement of the batch, the handler's too,
        // that runs longer than a handler may.
        let timeout_ms = self.config.handler_timeout.as_millis().max(1);
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL statement_timeout = {timeout_ms}"
        )))
        .execute(&mut *tx)
        .await?;
        let heads = sqlx::query(AssertSqlSafe(self.claim.as_str()))
            .bind(self.config.heads_per_batch.clamp(1, limit))
            .fetch_all(&mut *tx)
            .await?;
        if heads.is_empty() {
            tx.rollback().await?;
            return Ok(BatchReport::default());
        }
        let mut claimed = heads
            .iter()
            .map(to_message)
            .collect::<Result<Vec<_>, _>>()?;
        // The rows after each claimed head, up to the first one that is not
        // due (backing off or parked): no one else can claim them while we
        // hold the head.
        let keys: Vec<&str> = claimed
            .iter()
            .filter_map(|(m, _)| m.ordering_key.as_deref())
            .collect();
        let room = limit - claimed.len() as i64;
        if !keys.is_empty() && room > 0 {
            let head_ids: Vec<i64> = claimed.iter().map(|(m, _)| m.id).collect();
            let rows = sqlx::query(AssertSqlSafe(self.followers.as_str()))
                .bind(&keys)
                .bind(&head_ids)
                .bind(room)
                .fetch_all(&mut *tx)
                .await?;
            let mut stopped: HashSet<String> = HashSet::new();
            let mut followers = Vec::new();
            for row in &rows {
                let follower = to_message(row)?;
                let key = follower.0.ordering_key.clone().unwrap_or_default();
                if stopped.contains(&key) {
                    continue;
                }
                if !row.try_get::<bool, _>("due")? {
                    stopped.insert(key);
                    continue;
                }
                followers.push(follower);
            }
            claimed.extend(followers);
            claimed.sort_by_key(|(m, _)| m.id);
        }
        let messages = self.with_payloads(&mut tx, claimed).await?;
        let mut report = BatchReport {
            claimed: messages.len(),
            ..Default::default()
        };
        let span = info_span!("process", rows = messages.len());
        async {
            let mut done = Vec::with_capacity(messages.len());
            let mut failed_keys: HashSet<String> = HashSet::new();
            for message in messages {
                if let Some(key) = &message.ordering_key
                    && failed_keys.contains(key)
                {
                    // An earlier row of this key failed: keep the order.
                    continue;
                }
                let Err(error) = self.handle_one(&mut tx, handler, &message).await? else {
                    done.push(message.id);
                    continue;
                };
                report.failed += 1;
                if let Some(key) = &message.ordering_key {
                    failed_keys.insert(key.clone());
                }
                let parked: bool = sqlx::query_scalar(AssertSqlSafe(self.fail.as_str()))
                    .bind(message.id)
                    .bind(&error)
                    .bind(self.config.retry_min.as_secs_f64())
                    .bind(self.config.retry_max.as_secs_f64())
                    .bind(self.config.max_attempts)
                    .fetch_one(&mut *tx)
                    .await?;
                if parked {
                    report.parked += 1;
                    warn!(id = message.id, message_id = %message.message_id, attempts = message.attempts + 1, %error, "handler failed; row parked");
                } else {
                    debug!(id = message.id, message_id = %message.message_id, %error, "handler failed; will retry");
                }
            }
            sqlx::query(AssertSqlSafe(self.done.as_str()))
                .bind(&done)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            report.processed = done.len();
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Keeps the claimed rows, in id order, up to `max_batch_bytes` of
    /// payloads (at least one row), and reads their payloads. Rows left out
    /// stay locked until the batch ends and come in a later batch.
    async fn with_payloads(
        &self,
        tx: &mut PgConnection,
        claimed: Vec<(InboxMessage, i64)>,
    ) -> Result<Vec<InboxMessage>, sqlx::Error> {
        let mut total = 0i64;
        let mut messages: Vec<InboxMessage> = Vec::with_capacity(claimed.len());
        for (message, bytes) in claimed {
            if !messages.is_empty() && total + bytes > self.config.max_batch_bytes {
                break;
            }
            total += bytes;
            messages.push(message);
        }
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        let mut payloads: HashMap<i64, Vec<u8>> =
            sqlx::query_as(AssertSqlSafe(self.payloads.as_str()))
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        for message in &mut messages {
            message.payload = payloads.remove(&message.id).unwrap_or_default();
        }
        Ok(messages)
    }

    /// Runs the handler for one message in a savepoint. `Err(reason)`: the
    /// handler failed, timed out, or returned `Ok` although a statement it
    /// ran failed (the transaction is then aborted and cannot be kept); its
    /// effects are rolled back.
    async fn handle_one<H: Handler + ?Sized>(
        &self,
        tx: &mut PgConnection,
        handler: &H,
        message: &InboxMessage,
    ) -> Result<Result<(), String>, sqlx::Error> {
        let span = trace::process_span(
            &self.config.table,
            message.id,
            &message.message_id,
            message.attempts + 1,
            message.trace.as_ref(),
        );
        let outcome = async {
            let mut savepoint = tx.begin().await?;
            let timeout = self.config.handler_timeout;
            match tokio::time::timeout(timeout, handler.handle(&mut savepoint, message)).await {
                Ok(Ok(())) => match savepoint.commit().await {
                    Ok(()) => Ok(Ok(())),
                    // The failed RELEASE dropped the savepoint, which rolls it back.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25P02") => Ok(Err(
                        "the handler returned Ok, but a statement it ran failed, which aborted its transaction; return that statement's error instead".to_owned(),
                    )),
                    Err(e) => Err(e),
                },
                Ok(Err(error)) => {
                    savepoint.rollback().await?;
                    Ok(Err(error.to_string()))
                }
                Err(_) => {
                    savepoint.rollback().await?;
                    Ok(Err(format!("the handler timed out after {timeout:?}")))
                }
            }
        }
        .instrument(span.clone())
        .await;
        match &outcome {
            Ok(Err(reason)) => trace::fail(&span, reason),
            Err(error) => trace::fail(&span, &error.to_string()),
            Ok(Ok(())) => {}
        }
        outcome
    }

    /// Processes batches until `stop` is cancelled: back to back while rows
    /// are due, every `poll_interval` otherwise. Database errors are logged
    /// and retried with a backoff.
    pub async fn run<H: Handler + ?Sized>(&self, handler: &H, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while !stop.is_cancelled() {
            let wait = match self.process_batch(handler).await {
                Ok(report) if report.claimed > 0 => {
                    backoff.reset();
                    continue;
                }
                Ok(_) => {
                    backoff.reset();
                    self.config.poll_interval
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, "inbox processing failed; will retry");
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = stop.cancelled() => {},
            }
        }
    }
}

/// A claimed row without its payload, and the payload's size.
fn to_message(row: &sqlx::postgres::PgRow) -> Result<(InboxMessage, i64), sqlx::Error> {
    let attributes: Option<serde_json::Value> = row.try_get("attributes")?;
    let attributes = match attributes {
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => HashMap::new(),
    };
    let bytes: Option<i32> = row.try_get("bytes")?;
    let message = InboxMessage {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        payload: Vec::new(),
        attributes,
        ordering_key: row.try_get("ordering_key")?,
        published_at: row.try_get("published_at")?,
        received_at: row.try_get("received_at")?,
        attempts: row.try_get("attempts")?,
        trace: row
            .try_get::<Option<String>, _>("traceparent")?
            .map(|traceparent| Carried {
                traceparent,
                tracestate: row.try_get("tracestate").ok().flatten(),
            }),
    };
    Ok((message, i64::from(bytes.unwrap_or(0))))
}
