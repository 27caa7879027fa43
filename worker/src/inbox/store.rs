//! The inbox worker's SQL, in one place.
//!
//! The hot path is one statement per batch: an `INSERT ... SELECT FROM
//! unnest(...) WITH ORDINALITY ORDER BY n ON CONFLICT (message_id) DO NOTHING`
//! that stores the batch in receive order (so the identity column follows the
//! order messages were received) and returns which rows were new; then
//! `COMMIT`. Messages that cannot be stored go to `<table>_dead_letter` in the
//! same transaction.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, PgPool};

use super::message::{DeadRow, InboxRow};
use crate::ident::TableName;

/// SQL for one inbox table and its dead-letter table, built once from
/// validated names.
#[derive(Debug, Clone)]
pub struct InboxStore {
    table: TableName,
    dead_letter: TableName,
    insert: String,
    insert_dead: String,
    backlog: String,
    oldest_age: String,
    parked: String,
    last_processed: String,
}

/// Errors that name the table involved.
pub use crate::db::ShapeError as StoreError;

impl InboxStore {
    /// Builds the statements; the dead-letter table is `<table>_dead_letter`.
    pub fn new(table: TableName) -> Result<Self, crate::ident::NameError> {
        let dead_letter = table.with_suffix("_dead_letter")?;
        let t = table.quoted();
        let dl = dead_letter.quoted();
        Ok(InboxStore {
            insert: format!(
                "INSERT INTO {t} (message_id, pubsub_message_id, subscription, payload, attributes, ordering_key, published_at, traceparent, tracestate) \
                 SELECT m, pm, $7, p, a, k, pt, tp, ts \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[], $5::text[], $6::timestamptz[], $8::text[], $9::text[]) \
                      WITH ORDINALITY AS b(m, pm, p, a, k, pt, tp, ts, n) \
                 ORDER BY n \
                 ON CONFLICT (message_id) DO NOTHING \
                 RETURNING message_id"
            ),
            insert_dead: format!(
                "INSERT INTO {dl} (message_id, pubsub_message_id, subscription, payload, attributes, ordering_key, published_at, error) \
                 SELECT m, pm, $8, p, a, k, pt, e \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::timestamptz[], $7::text[]) \
                      AS b(m, pm, p, a, k, pt, e) \
                 ON CONFLICT (message_id) DO NOTHING"
            ),
            backlog: crate::probe::capped_count(
                &t,
                Some("processed_at IS NULL AND parked_at IS NULL"),
            ),
            parked: crate::probe::capped_count(&t, Some("parked_at IS NOT NULL")),
            oldest_age: format!(
                "SELECT EXTRACT(EPOCH FROM clock_timestamp() - received_at)::float8 FROM {t} \
                 WHERE processed_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1"
            ),
            // Reads one entry of inbox_processed_at_idx (newest first); on a
            // table without that index, the probe's statement timeout bounds it.
            last_processed: format!(
                "SELECT processed_at FROM {t} WHERE processed_at IS NOT NULL \
                 ORDER BY processed_at DESC LIMIT 1"
            ),
            table,
            dead_letter,
        })
    }

    /// The inbox table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Fails with a readable error when either table is missing or lacks a
    /// column the worker needs.
    pub async fn check_shape(&self, pool: &PgPool) -> Result<(), StoreError> {
        let inbox = "id, message_id, pubsub_message_id, subscription, payload, attributes, \
                     ordering_key, published_at, received_at, processed_at, traceparent, tracestate";
        let dead = "id, message_id, pubsub_message_id, subscription, payload, attributes, \
                    ordering_key, published_at, received_at, error";
        let tables = [(&self.table, inbox), (&self.dead_letter, dead)];
        crate::db::check_columns(pool, &tables, "inbox").await
    }

    /// Inserts `rows` in order, skipping those already stored; returns how
    /// many were new.
    pub async fn insert(
        &self,
        conn: &mut PgConnection,
        subscription: &str,
        rows: &[&InboxRow],
    ) -> Result<usize, sqlx::Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
        let pubsub_ids: Vec<&str> = rows.iter().map(|r| r.pubsub_message_id.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|r| &r.payload[..]).collect();
        let attributes: Vec<&serde_json::Value> = rows.iter().map(|r| &r.attributes).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.ordering_key.as_deref()).collect();
        let published: Vec<Option<DateTime<Utc>>> = rows
            .iter()
            .map(|r| r.published_at_us.and_then(DateTime::from_timestamp_micros))
            .collect();
        let traceparents: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.trace.as_ref().map(|t| t.traceparent.as_str()))
            .collect();
        let tracestates: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.trace.as_ref().and_then(|t| t.tracestate.as_deref()))
            .collect();
        let inserted: Vec<String> = sqlx::query_scalar(AssertSqlSafe(self.insert.as_str()))
            .bind(&ids)
            .bind(&pubsub_ids)
            .bind(&payloads)
            .bind(&attributes)
            .bind(&keys)
            .bind(&published)
            .bind(subscription)
            .bind(&traceparents)
            .bind(&tracestates)
            .fetch_all(conn)
            .await?;
        Ok(inserted.len())
    }

    /// Records messages that cannot be stored as they are; a message already
    /// dead-lettered (a redelivery) is skipped.
    pub async fn insert_dead(
        &self,
        conn: &mut PgConnection,
        subscription: &str,
        rows: &[&DeadRow],
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
        let pubsub_ids: Vec<&str> = rows.iter().map(|r| r.pubsub_message_id.as_str()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|r| &r.payload[..]).collect();
        let attributes: Vec<&str> = rows.iter().map(|r| r.attributes.as_str()).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.ordering_key.as_deref()).collect();
        let published: Vec<Option<DateTime<Utc>>> = rows
            .iter()
            .map(|r| r.published_at_us.and_then(DateTime::from_timestamp_micros))
            .collect();
        let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
        sqlx::query(AssertSqlSafe(self.insert_dead.as_str()))
            .bind(&ids)
            .bind(&pubsub_ids)
            .bind(&payloads)
            .bind(&attributes)
            .bind(&keys)
            .bind(&published)
            .bind(&errors)
            .bind(subscription)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// What the probe measures: unprocessed rows (exact up to a cap), the
    /// age of the oldest one, parked rows, and when a row was last processed.
    pub fn probe_queries(&self) -> crate::probe::ProbeQueries {
        crate::probe::ProbeQueries {
            backlog: self.backlog.clone(),
            oldest_age: self.oldest_age.clone(),
            parked: Some(self.parked.clone()),
            last_processed: Some(self.last_processed.clone()),
        }
    }
}

/// Whether an error is the database refusing this message, as opposed to
/// an outage: SQLSTATE class 22 (data exception, e.g. an unsupported
/// Unicode escape), 23 (integrity constraint violation, e.g. a CHECK
/// constraint the application added) or 54 (program limit exceeded, e.g. a
/// value too large for an index). The batch is then stored message by
/// message, and each message refused is dead-lettered with the reason.
pub fn refuses_message(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class))),
        _ => false,
    }
}
