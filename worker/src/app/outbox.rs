//! Writing to the outbox from application code.

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use std::collections::BTreeMap;
use uuid::Uuid;

use crate::ident::TableName;
use crate::pubsub::MESSAGE_ID_ATTRIBUTE;

/// Why a message could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The `message-id` attribute was set to an empty value, which would
    /// stop subscribers from deduplicating (use [`OutboxMessage::message_id`]).
    #[error("attribute {MESSAGE_ID_ATTRIBUTE:?} is empty; leave it out or set a non-empty id")]
    EmptyMessageId,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// One message for the outbox, built up and then written with
/// [`OutboxMessage::write`] in the caller's transaction, so that it is
/// published if and only if the caller's own changes commit.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_worker::app::OutboxMessage;
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///     .execute(&mut *tx)
///     .await?;
/// OutboxMessage::new(br#"{"account":1,"debit":10}"#.to_vec())
///     .ordering_key("account-1")
///     .attribute("type", "account.debited")
///     .write(&mut tx)
///     .await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    payload: Vec<u8>,
    ordering_key: Option<String>,
    attributes: BTreeMap<String, String>,
    topic: Option<String>,
    message_id: Option<Uuid>,
    table: Option<TableName>,
}

impl OutboxMessage {
    /// A message with this payload (sent unchanged as the message data).
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        OutboxMessage {
            payload: payload.into(),
            ordering_key: None,
            attributes: BTreeMap::new(),
            topic: None,
            message_id: None,
            table: None,
        }
    }

    /// Messages with the same key are delivered in the order written.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Adds a message attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Routes the message to another topic than the relay's (a short id in
    /// the relay's project, or `projects/P/topics/T`).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Sets the id receivers deduplicate on (default: a random UUID chosen
    /// by the database). Use a deterministic id to make the write itself
    /// idempotent across retries of the caller's transaction.
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.message_id = Some(id);
        self
    }

    /// Writes to another outbox table than `outbox`.
    pub fn table(mut self, table: TableName) -> Self {
        self.table = Some(table);
        self
    }

    /// Inserts the row using the caller's connection or transaction
    /// (`&mut tx` or `&mut *tx`); returns the message id, which reaches
    /// subscribers as the `message-id` attribute.
    ///
    /// When called inside a `tracing` span that has an OpenTelemetry context
    /// (the application installed `tracing-opentelemetry`), that context is
    /// written as the `traceparent` and `tracestate` attributes, so that the
    /// relay's publish, the inbox and the consumer's handler join its trace.
    pub async fn write(&self, conn: &mut PgConnection) -> Result<Uuid, OutboxError> {
        if self
            .attributes
            .get(MESSAGE_ID_ATTRIBUTE)
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(OutboxError::EmptyMessageId);
        }
        let table = match &self.table {
            Some(t) => t.quoted(),
            None => "\"outbox\"".to_owned(),
        };
        // The caller's span becomes the message's trace context, unless the
        // caller set one itself.
        let mut attributes = self.attributes.clone();
        crate::trace::inject_current(&mut attributes);
        let attributes =
            (!attributes.is_empty()).then(|| serde_json::to_value(&attributes).unwrap_or_default());
        let sql = format!(
            "INSERT INTO {table} (message_id, payload, ordering_key, attributes, topic) \
             VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5) RETURNING message_id"
        );
        let id: Uuid = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(self.message_id)
            .bind(&self.payload)
            .bind(self.ordering_key.as_deref())
            .bind(attributes)
            .bind(self.topic.as_deref())
            .fetch_one(conn)
            .await?;
        Ok(id)
    }
}
