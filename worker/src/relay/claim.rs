//! Stage 1 of the relay: prove leadership, claim the oldest pending rows,
//! and hand the rows to their topics' publishers, key by key, in id order
//! within each key.
//!
//! Leadership is proved inside the claiming transaction, behind the claim
//! gate (an advisory lock every claim holds shared, and a new leader takes
//! exclusively once before its first claim). The elector learns of a lost
//! lock only at its next renewal; the gate makes sure that two relays'
//! claims never overlap meanwhile, which would let each skip the other's
//! locked rows (`SKIP LOCKED`) and publish a key's rows out of order.
//!
//! A claim holds at most about `claim bytes` of payloads: small payloads
//! come with the claim's `SELECT`, larger ones are read one at a time just
//! before they are published, and once `claim bytes` of those are out the
//! claim waits for Pub/Sub before reading more. If Pub/Sub does not answer
//! in time, the claim stops there ([`Batch::stopped_short`]); its unsent
//! rows stay locked until it is finished, and the pipeline claims nothing
//! else meanwhile. A claim that timed out makes the next ones smaller
//! ([`ClaimSize`]).
//!
//! How many rows a claim takes follows the backlog ([`ClaimSize`]): while
//! the relay keeps up, claims stay small, so that a row committed behind a
//! claim waits only for a short one; once rows wait (a burst, a slow spell),
//! claims double up to the batch size, whose larger requests keep the relay
//! at full speed until it has caught up.

use std::time::Instant;

use tracing::{Instrument, info_span, warn};

use super::Relay;
use super::batch::{Batch, Entry, Outcome, PausedKeys, State};
use super::message::{OutboxRow, prepare};
use crate::leader::Fence;
use crate::pubsub::Verdict;

/// Why a claim produced no batch.
#[derive(Debug)]
pub enum ClaimError {
    /// The database failed; retried after a backoff. The claim rolled back;
    /// the keys it handed to publishers may be paused and are resumed once
    /// nothing is in flight.
    Database(sqlx::Error, PausedKeys),
    /// This replica no longer leads; the claim rolled back unpublished.
    NotLeader,
}

impl From<sqlx::Error> for ClaimError {
    fn from(e: sqlx::Error) -> Self {
        ClaimError::Database(e, PausedKeys::new())
    }
}

/// How much the next claim takes: rows, and payload bytes.
///
/// Three rules, each with its own reason:
/// - **Payload size**: no more rows than fit the payload budget.
/// - **Timeouts**: half the rows and bytes after a claim timed out (the link
///   or Pub/Sub is slower than a claim's worth of payloads within the publish
///   timeout), doubling back after claims that did not.
/// - **Backlog** (the pace): a claim that came back full (more rows are
///   waiting) or whose oldest row waited [`BACKLOG_AGE`] or longer doubles
///   the next one, up to the batch size; any other claim halves it, down to
///   [`STEADY_CLAIM_ROWS`]. At a steady load claims are small and a row never
///   waits behind a big one; under a burst the relay is back at full-size
///   claims within a few claims. Fullness matters for a burst committed at
///   once: its first rows are young when the relay wakes for them.
#[derive(Debug)]
pub struct ClaimSize {
    max_rows: i64,
    max_bytes: usize,
    rows: i64,
    bytes: usize,
    pace: i64,
}

/// The smallest payload budget a claim shrinks to (it always takes one row).
const MIN_CLAIM_BYTES: usize = 256 * 1024;
/// The oldest row of a claim waited this long (seconds): rows are queueing,
/// claim more.
const BACKLOG_AGE: f64 = 0.05;
/// Rows a claim takes while the relay keeps up (or the batch size, if
/// smaller).
const STEADY_CLAIM_ROWS: i64 = 500;

impl ClaimSize {
    /// At most `max_rows` rows and about `max_bytes` of payloads.
    pub fn new(max_rows: u32, max_bytes: usize) -> Self {
        let max_rows = i64::from(max_rows.max(1));
        let max_bytes = max_bytes.max(1);
        ClaimSize {
            max_rows,
            max_bytes,
            rows: max_rows,
            bytes: max_bytes,
            // From full size: a relay that starts finds a backlog as often
            // as not.
            pace: max_rows,
        }
    }

    /// Rows to claim.
    pub fn rows(&self) -> i64 {
        self.rows.min(self.pace)
    }

    /// Payload bytes a claim holds before waiting for Pub/Sub.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Payloads up to this size come with the claim; larger ones are read
    /// one at a time.
    pub fn inline_bytes(&self) -> i32 {
        (self.bytes / self.rows.max(1) as usize).clamp(1024, i32::MAX as usize) as i32
    }

    /// Learns from a claimed batch: fewer rows when they are large; more
    /// when it was `full` or its oldest row had waited `oldest_age` seconds
    /// (a backlog), fewer when neither.
    pub fn claimed(&mut self, rows: usize, bytes: usize, full: bool, oldest_age: f64) {
        let per_row = (bytes / rows.max(1)).max(1);
        let fits = (self.bytes / per_row).max(1) as i64;
        self.rows = fits.min(self.max_rows);
        self.pace = if full || oldest_age >= BACKLOG_AGE {
            self.pace.saturating_mul(2).min(self.max_rows)
        } else {
            (self.pace / 2).max(STEADY_CLAIM_ROWS.min(self.max_rows))
        };
    }

    /// Learns from a finished batch: smaller after a timeout, larger again
    /// after a batch that went through without any failure (a batch that
    /// failed otherwise, e.g. behind another's timeout, says nothing).
    pub fn finished(&mut self, outcome: &Outcome) {
        if outcome.stopped_short || outcome.any(Verdict::Timeout) {
            self.bytes = (self.bytes / 2).max(MIN_CLAIM_BYTES.min(self.max_bytes));
            self.rows = (self.rows / 2).max(1);
        } else if outcome.failed.is_empty()
            && (self.bytes < self.max_bytes || self.rows < self.max_rows)
        {
            self.bytes = self.bytes.saturating_mul(2).min(self.max_bytes);
            self.rows = self.rows.saturating_mul(2).min(self.max_rows);
        }
    }
}

impl Relay {
    /// Claims a batch and hands its rows to the publishers. `Ok(None)`: no
    /// rows pending.
    pub(super) async fn claim(
        &mut self,
        gate: i64,
        fence: &Fence,
    ) -> Result<Option<Batch>, ClaimError> {
        let mut tx = self.pool.begin().await?;
        // Leadership is checked inside the claim gate, before any row lock:
        // a new leader closes the gate before its first claim, so if this
        // replica still leads now, no other relay claims until this claim
        // ends; if it does not, nothing was locked or published.
        self.store.enter_claim_gate(&mut tx, gate).await?;
        if !fence.holds(&mut tx).await? {
            tx.rollback().await?;
            return Err(ClaimError::NotLeader);
        }
        let set_aside = self.retries.topics_set_aside(Instant::now());
        let rows = self
            .store
            .claim(
                &mut tx,
                self.size.rows(),
                self.size.inline_bytes(),
                &set_aside,
            )
            .await?;
        self.health.ok(crate::health::Component::Database);
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let oldest_age = rows[0].age_at_claim;
        let span = info_span!("batch", rows = rows.len(), first_id = rows[0].id);
        self.metrics.batch_size.observe(rows.len() as f64);
        let mut batch = Batch {
            full: rows.len() as i64 >= self.size.rows(),
            tx,
            entries: Vec::with_capacity(rows.len()),
            claimed_at: Instant::now(),
            stopped_short: false,
            bytes: 0,
            span: crate::trace::publish_span(&self.config.topic, rows.len()),
        };
        let published = self.publish_rows(&mut batch, rows).instrument(span).await;
        batch.claimed_at = Instant::now();
        if let Err(e) = published {
            // The claim rolls back and its rows are published again later.
            return Err(ClaimError::Database(e, batch.keys()));
        }
        self.size
            .claimed(batch.entries.len(), batch.bytes, batch.full, oldest_age);
        Ok(Some(batch))
    }

    /// Hands the rows to the publishers, each ordering key's rows in id
    /// order; stops short when Pub/Sub does not answer in time for large
    /// payloads or a suspect.
    async fn publish_rows(
        &mut self,
        batch: &mut Batch,
        mut rows: Vec<OutboxRow>,
    ) -> Result<(), sqlx::Error> {
        group_by_key(&mut rows);
        // Payload bytes read one by one and not yet answered.
        let mut large_pending = 0usize;
        for mut row in rows {
            if let Some(reason) = self.retries.exhausted(row.id) {
                self.metrics.attempts_exhausted.inc();
                batch.entries.push(dead_entry(&row, reason));
                continue;
            }
            let alone = self.retries.publish_alone(row.id);
            let large = row.payload.is_none();
            // Wait for what is out before reading more large payloads, and
            // before publishing a suspect alone.
            if (large && large_pending >= self.size.bytes()) || alone {
                if !self.wait_for_answers(batch).await {
                    return Ok(());
                }
                large_pending = 0;
            }
            if large {
                let payload = self.store.fetch_payload(&mut batch.tx, row.id).await?;
                large_pending += payload.len();
                row.payload = Some(payload);
            }
            let prepared = match prepare(&row, &self.config.topic) {
                Ok(prepared) => prepared,
                Err(reason) => {
                    warn!(id = row.id, %reason, "row cannot be published; moving it to the dead-letter table");
                    batch.entries.push(dead_entry(&row, reason));
                    continue;
                }
            };
            batch.bytes += prepared.bytes;
            if let (Some(span), Some(carried)) = (&mut batch.span, &prepared.trace) {
                span.link(carried);
            }
            let ordering_key = prepared.message.ordering_key.clone();
            let future = self.publishers.publish(&prepared.topic, prepared.message);
            let entry = Entry {
                id: row.id,
                topic: Some(prepared.topic.clone()),
                topic_column: row.topic.clone(),
                own_topic: prepared.own_topic,
                ordering_key,
                alone,
                age_at_claim: row.age_at_claim,
                state: State::Pending(future),
            };
            batch.entries.push(entry);
            if alone {
                // Sent in a request of its own; its answer says whether it
                // is the message Pub/Sub finds invalid.
                self.publishers.flush(&prepared.topic).await;
                if !self.wait_for_answers(batch).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Waits for every publish of `batch` so far, up to the publish timeout
    /// plus a grace period. `false`: Pub/Sub did not answer in time; the
    /// claim stops publishing, and what is unanswered counts as timed out.
    async fn wait_for_answers(&mut self, batch: &mut Batch) -> bool {
        let window = self.config.settle_window();
        if tokio::time::timeout(window, batch.settle(&self.health))
            .await
            .is_ok()
        {
            return true;
        }
        batch.abandon_pending();
        batch.stopped_short = true;
        warn!(
            waited_ms = window.as_millis() as u64,
            "Pub/Sub did not answer for large payloads in time; the claim stops here and comes back smaller"
        );
        false
    }
}

/// Puts the rows of each (topic, ordering key) next to each other, in id
/// order within each. Order only matters within a key, and the client runs
/// one task per key: handed over key by key, each task wakes once for its
/// run of messages instead of once per message, and sends them in one
/// request as soon as they are there (rows of 100 keys in id order woke a
/// different task for every message).
fn group_by_key(rows: &mut [OutboxRow]) {
    // Stable: rows of one key keep their id order.
    rows.sort_by(|a, b| {
        (a.topic.as_deref(), a.ordering_key.as_deref())
            .cmp(&(b.topic.as_deref(), b.ordering_key.as_deref()))
    });
}

/// A row that goes to the dead-letter table without being published.
fn dead_entry(row: &OutboxRow, reason: String) -> Entry {
    Entry {
        id: row.id,
        topic: None,
        topic_column: row.topic.clone(),
        own_topic: false,
        ordering_key: String::new(),
        alone: false,
        age_at_claim: row.age_at_claim,
        state: State::Dead(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(verdict: Verdict) -> Outcome {
        Outcome {
            failed: vec![crate::relay::batch::Failed {
                id: 1,
                topic_column: None,
                failure: crate::relay::batch::Failure {
                    verdict,
                    reason: String::new(),
                },
            }],
            ..Outcome::default()
        }
    }

    fn row(id: i64, topic: Option<&str>, key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id,
            message_id: uuid::Uuid::nil(),
            payload: None,
            ordering_key: key.map(str::to_owned),
            attributes: None,
            topic: topic.map(str::to_owned),
            age_at_claim: 0.0,
        }
    }

    #[test]
    fn rows_are_grouped_by_topic_and_key_in_id_order_within_each() {
        let mut rows = vec![
            row(1, None, Some("b")),
            row(2, None, Some("a")),
            row(3, Some("other"), Some("a")),
            row(4, None, Some("b")),
            row(5, None, None),
            row(6, None, Some("a")),
            row(7, None, None),
        ];
        group_by_key(&mut rows);
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        assert_eq!(ids, [5, 7, 2, 6, 1, 4, 3]);
    }

    #[test]
    fn a_claim_that_timed_out_comes_back_smaller_and_grows_back() {
        let mut size = ClaimSize::new(5000, 8 << 20);
        assert_eq!((size.rows(), size.bytes()), (5000, 8 << 20));
        size.finished(&failed(Verdict::Timeout));
        assert_eq!((size.rows(), size.bytes()), (2500, 4 << 20));
        // The batch behind it failed only because its key was paused.
        size.finished(&failed(Verdict::Paused));
        assert_eq!((size.rows(), size.bytes()), (2500, 4 << 20));
        for _ in 0..20 {
            size.finished(&failed(Verdict::Timeout));
        }
        assert_eq!(size.bytes(), MIN_CLAIM_BYTES);
        assert_eq!(size.rows(), 1);
        for _ in 0..20 {
            size.finished(&Outcome::default());
        }
        assert_eq!((size.rows(), size.bytes()), (5000, 8 << 20));
    }

    #[test]
    fn large_rows_make_claims_of_fewer_rows() {
        let mut size = ClaimSize::new(5000, 8 << 20);
        size.claimed(10, 10 << 20, false, 1.0);
        assert_eq!(size.rows(), 8);
        assert_eq!(size.inline_bytes(), (8 << 20) / 8);
        size.claimed(100, 1000, false, 1.0);
        assert_eq!(size.rows(), 5000);
        assert_eq!(size.inline_bytes(), 1677);
    }

    #[test]
    fn claims_stay_small_while_the_relay_keeps_up_and_grow_under_a_backlog() {
        let mut size = ClaimSize::new(5000, 8 << 20);
        assert_eq!(size.rows(), 5000, "a relay starts at full size");
        // Young rows, fewer than asked for: the relay keeps up.
        for expected in [2500, 1250, 625, 500, 500] {
            size.claimed(10, 1000, false, 0.005);
            assert_eq!(size.rows(), expected);
        }
        // Rows queue: the oldest row claimed waited.
        for expected in [1000, 2000, 4000, 5000, 5000] {
            size.claimed(100, 10_000, false, BACKLOG_AGE);
            assert_eq!(size.rows(), expected);
        }
        // A burst committed at once: its rows are young when claimed, but
        // every claim comes back full, so the claims stay at full size.
        let mut burst = ClaimSize::new(5000, 8 << 20);
        for _ in 0..5 {
            burst.claimed(5000, 500_000, true, 0.001);
            assert_eq!(burst.rows(), 5000);
        }
        // Large rows still cap the claim whatever the pace.
        size.claimed(10, 10 << 20, false, 1.0);
        assert_eq!(size.rows(), 8);
        // A batch size below the steady size is the floor.
        let mut small = ClaimSize::new(100, 8 << 20);
        small.claimed(1, 100, false, 0.0);
        assert_eq!(small.rows(), 100);
    }
}
