//! The relay's SQL, in one place.
//!
//! The hot path is two statements per batch: one claim (`FOR UPDATE SKIP
//! LOCKED`, in id order) and, after Pub/Sub acknowledged, one `DELETE` (with
//! the dead-letter insert folded into it as a CTE), then `COMMIT`. Deleting
//! instead of marking rows keeps the table and its index small: marking leaves
//! dead index entries that every later claim has to skip.

use bytes::Bytes;
use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, PgPool, Row};
use uuid::Uuid;

use super::message::OutboxRow;
use crate::ident::TableName;

/// SQL for one outbox table and its dead-letter table, built once from
/// validated names.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    table: TableName,
    dead_letter: TableName,
    claim: String,
    fetch_payload: String,
    delete: String,
    delete_and_dead_letter: String,
    backlog: String,
    oldest_age: String,
}

/// High half of the claim gate's advisory lock key ("obc"); the election
/// lock uses "obr" (see `leader::postgres`).
const CLAIM_GATE_SPACE: i64 = 0x6f_62_63;

/// Errors that name the table involved.
pub use crate::db::ShapeError as StoreError;

impl OutboxStore {
    /// Builds the statements; the dead-letter table is `<table>_dead_letter`.
    pub fn new(table: TableName) -> Result<Self, crate::ident::NameError> {
        let dead_letter = table.with_suffix("_dead_letter")?;
        let t = table.quoted();
        let dl = dead_letter.quoted();
        Ok(OutboxStore {
            claim: format!(
                "SELECT id, message_id, \
                        CASE WHEN octet_length(payload) <= $2 THEN payload END AS payload, \
                        ordering_key, attributes, topic, \
                        EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS age \
                 FROM {t} WHERE topic IS NULL OR topic <> ALL($3) \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            fetch_payload: format!("SELECT payload FROM {t} WHERE id = $1"),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            delete_and_dead_letter: format!(
                "WITH gone AS (DELETE FROM {t} WHERE id = ANY($1) \
                     RETURNING id, message_id, payload, ordering_key, attributes, topic, created_at) \
                 INSERT INTO {dl} (id, message_id, payload, ordering_key, attributes, topic, created_at, error) \
                 SELECT g.id, g.message_id, g.payload, g.ordering_key, g.attributes, g.topic, g.created_at, e.error \
                 FROM gone g JOIN unnest($2::bigint[], $3::text[]) AS e(id, error) ON g.id = e.id \
                 ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, dead_lettered_at = EXCLUDED.dead_lettered_at"
            ),
            backlog: crate::probe::capped_count(&t, None),
            oldest_age: format!(
                "SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 \
                 FROM {t} ORDER BY id LIMIT 1"
            ),
            table,
            dead_letter,
        })
    }

    /// The outbox table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Fails with a readable error when either table is missing or lacks a
    /// column the relay needs.
    pub async fn check_shape(&self, pool: &PgPool) -> Result<(), StoreError> {
        let columns = "id, message_id, payload, ordering_key, attributes, topic, created_at";
        let tables = [(&self.table, columns), (&self.dead_letter, columns)];
        crate::db::check_columns(pool, &tables, "outbox").await
    }

    /// Locks and reads up to `limit` pending rows, oldest first, leaving out
    /// rows routed to `set_aside` topics (as written in the `topic` column).
    /// Payloads larger than `inline_bytes` come back as `None` and are read
    /// with [`Self::fetch_payload`] just before publishing, so that a batch
    /// never holds many large payloads at once.
    ///
    /// Always from the oldest row: ids are taken at insert, not at commit, so
    /// a row can become visible below rows already claimed. Starting above
    /// the rows in flight would skip it and publish a later row of its key
    /// first (the test `a_late_commit_is_published_before_the_next_message_of_its_key`).
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        limit: i64,
        inline_bytes: i32,
        set_aside: &[String],
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        // Streamed and converted row by row, so the raw rows of a whole
        // claim are never held next to their converted copies.
        let mut rows = Vec::with_capacity(limit.clamp(0, 10_000) as usize);
        let mut stream = sqlx::query(AssertSqlSafe(self.claim.as_str()))
            .bind(limit)
            .bind(inline_bytes)
            .bind(set_aside)
            .fetch(conn);
        while let Some(r) = stream.try_next().await? {
            rows.push(OutboxRow {
                id: r.try_get("id")?,
                message_id: r.try_get::<Uuid, _>("message_id")?,
                payload: r.try_get::<Option<Vec<u8>>, _>("payload")?.map(Bytes::from),
                ordering_key: r.try_get("ordering_key")?,
                attributes: r.try_get("attributes")?,
                topic: r.try_get("topic")?,
                age_at_claim: r.try_get::<Option<f64>, _>("age")?.unwrap_or(0.0),
            });
        }
        Ok(rows)
    }

    /// Reads one payload of a row this transaction already holds.
    pub async fn fetch_payload(
        &self,
        conn: &mut PgConnection,
        id: i64,
    ) -> Result<Bytes, sqlx::Error> {
        let payload: Vec<u8> = sqlx::query_scalar(AssertSqlSafe(self.fetch_payload.as_str()))
            .bind(id)
            .fetch_one(conn)
            .await?;
        Ok(Bytes::from(payload))
    }

    /// Removes published rows and moves dead ones to the dead-letter table,
    /// in the claiming transaction.
    pub async fn finish(
        &self,
        conn: &mut PgConnection,
        done: &[i64],
        dead: &[(i64, String)],
    ) -> Result<(), sqlx::Error> {
        if dead.is_empty() {
            if !done.is_empty() {
                sqlx::query(AssertSqlSafe(self.delete.as_str()))
                    .bind(done)
                    .execute(conn)
                    .await?;
            }
            return Ok(());
        }
        let all: Vec<i64> = done
            .iter()
            .copied()
            .chain(dead.iter().map(|d| d.0))
            .collect();
        let dead_ids: Vec<i64> = dead.iter().map(|d| d.0).collect();
        let errors: Vec<&str> = dead.iter().map(|d| d.1.as_str()).collect();
        sqlx::query(AssertSqlSafe(self.delete_and_dead_letter.as_str()))
            .bind(&all)
            .bind(&dead_ids)
            .bind(&errors)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The key of this table's claim gate, an advisory lock (see
    /// [`Self::enter_claim_gate`]): "obc" in the high half, the table's OID in
    /// the low half (advisory locks are per database, like OIDs).
    pub async fn claim_gate(&self, pool: &PgPool) -> Result<i64, sqlx::Error> {
        let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::bigint")
            .bind(self.table.quoted())
            .fetch_one(pool)
            .await?;
        Ok((CLAIM_GATE_SPACE << 32) | oid)
    }

    /// Every claim passes the gate first: it holds the gate shared until it
    /// ends, so claims of one leader never wait for each other.
    pub async fn enter_claim_gate(
        &self,
        conn: &mut PgConnection,
        gate: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(gate)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// A new leader closes the gate once before its first claim: taking it
    /// exclusively waits until every claim that passed it (a previous
    /// leader's) has ended, and a previous leader's next claim waits behind
    /// it and then fails its leadership check. `Ok(false)`: still waiting
    /// after `wait` (call again).
    pub async fn close_claim_gate(
        &self,
        pool: &PgPool,
        gate: i64,
        wait: std::time::Duration,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let ms = wait.as_millis().max(1);
        sqlx::query(AssertSqlSafe(format!("SET LOCAL lock_timeout = {ms}")))
            .execute(&mut *tx)
            .await?;
        match sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(gate)
            .execute(&mut *tx)
            .await
        {
            Ok(_) => {
                tx.commit().await?;
                Ok(true)
            }
            // 55P03: lock_timeout.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Backends of other sessions that hold row locks (claims) on the outbox
    /// table of this database (relation OIDs repeat across databases, e.g.
    /// in one created from another as its template).
    pub async fn other_claimers(&self, pool: &PgPool) -> Result<Vec<i32>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT pid FROM pg_locks \
             WHERE locktype = 'relation' AND relation = $1::regclass \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND mode = 'RowShareLock' AND granted AND pid <> pg_backend_pid()",
        )
        .bind(self.table.quoted())
        .fetch_all(pool)
        .await
    }

    /// What the probe measures: pending rows (exact up to a cap, an estimate
    /// beyond) and the age of the oldest pending row.
    pub fn probe_queries(&self) -> crate::probe::ProbeQueries {
        crate::probe::ProbeQueries {
            backlog: self.backlog.clone(),
            oldest_age: self.oldest_age.clone(),
            parked: None,
            last_processed: None,
        }
    }
}
