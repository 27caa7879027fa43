//! Stages 2 and 3 of the relay, in their own task: wait for Pub/Sub's answers
//! to a claimed batch, then delete, dead-letter and commit.
//!
//! Running them apart from the claiming loop lets the next claim (a database
//! round trip) overlap with waiting for and committing the previous batch.
//! Batches are finished strictly in claim order, one at a time, and every
//! batch handed over is reported back exactly once; the claiming loop alone
//! decides what happens after a failure (see [`super::pipeline`]).
//!
//! Each batch has a deadline: the publish timeout plus a grace period,
//! counted from the claim's last statement. Its transaction is idle from
//! then until the commit, and the server ends transactions idle for longer
//! than that deadline plus a margin (the relay's pool sets
//! `idle_in_transaction_session_timeout`; see [`super::RelayConfig`]), which
//! frees the claims of a leader that went silent. A batch that waited for
//! the one before it gets no extra time: the server would not grant it.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::batch::{Batch, Entry, Outcome, PausedKeys, State};
use super::pipeline::End;
use super::store::OutboxStore;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::metrics::RelayMetrics;
use crate::pubsub::Verdict;

/// A batch that went through stages 2 and 3 (or was given up).
pub struct Finished {
    /// What Pub/Sub said, row by row.
    pub outcome: Outcome,
    /// How it ended.
    pub end: End,
    /// Why the commit failed, if it did.
    pub commit_error: Option<sqlx::Error>,
}

/// Finishes claimed batches; owns clones of what it needs, so it can run as
/// its own task.
pub struct Committer {
    pub store: OutboxStore,
    pub metrics: RelayMetrics,
    pub health: Health,
    /// The relay's own topic, for readiness messages.
    pub topic: TopicName,
    /// How long a batch may wait for Pub/Sub after its claim.
    pub settle_window: std::time::Duration,
}

impl Committer {
    /// Finishes the batches from `batches` in order and reports each on
    /// `finished`, until `batches` closes. When `lost` fires, every batch
    /// still held is dropped, which rolls its claim back at once, and
    /// reported as given up, with its ordering keys to resume.
    pub async fn run(
        self,
        mut batches: mpsc::Receiver<Batch>,
        finished: mpsc::UnboundedSender<Finished>,
        lost: CancellationToken,
    ) {
        while let Some(mut batch) = batches.recv().await {
            let span = info_span!(
                "finish",
                rows = batch.entries.len(),
                first_id = batch.entries.first().map(|e| e.id)
            );
            // Stage 2; cancel safe, so leadership lost meanwhile drops it.
            let settled = !lost.is_cancelled()
                && tokio::select! {
                    _ = self.settle(&mut batch).instrument(span.clone()) => true,
                    _ = lost.cancelled() => false,
                };
            let report = if settled {
                let outcome = batch.outcome();
                // A batch that failed may have had its keys paused.
                let keys = outcome.paused_keys.clone();
                tokio::select! {
                    report = self.finish(batch, outcome).instrument(span) => report,
                    _ = lost.cancelled() => given_up(keys),
                }
            } else {
                given_up(batch.keys())
            };
            if finished.send(report).is_err() {
                // The claiming loop is gone; nobody needs more results.
                return;
            }
        }
    }

    /// Stage 2: wait for every answer until the batch's deadline.
    async fn settle(&self, batch: &mut Batch) {
        let deadline = batch.claimed_at + self.settle_window;
        if tokio::time::timeout_at(deadline.into(), batch.settle(&self.health))
            .await
            .is_err()
        {
            batch.abandon_pending();
        }
    }

    /// Stage 3: delete what Pub/Sub acknowledged, dead-letter what it never
    /// will, and commit; rows to retry stay locked until the commit frees
    /// them.
    async fn finish(&self, mut batch: Batch, outcome: Outcome) -> Finished {
        let committed = async {
            self.store
                .finish(&mut batch.tx, &outcome.published, &outcome.dead)
                .await?;
            batch.tx.commit().await
        }
        .await;
        match committed {
            Ok(()) => {
                self.health.ok(Component::Database);
                self.record(&outcome, batch.claimed_at, &batch.entries);
                if let Some(span) = &batch.span {
                    span.finish(
                        outcome.published.len(),
                        outcome.dead.len(),
                        outcome.failed.len(),
                    );
                }
                Finished {
                    outcome,
                    end: End::Committed,
                    commit_error: None,
                }
            }
            Err(e) => {
                if let Some(span) = &batch.span {
                    span.commit_failed(&e);
                }
                Finished {
                    outcome,
                    end: End::CommitFailed,
                    commit_error: Some(e),
                }
            }
        }
    }

    /// Metrics, health and logs for a committed batch.
    fn record(&self, outcome: &Outcome, claimed_at: Instant, entries: &[Entry]) {
        // Insert to acknowledged and deleted: the row's age when claimed
        // (measured by the database) plus the time since the claim.
        let since_claim = claimed_at.elapsed().as_secs_f64();
        for entry in entries
            .iter()
            .filter(|e| matches!(e.state, State::Published))
        {
            self.metrics
                .latency
                .observe(entry.age_at_claim + since_claim);
        }
        self.metrics
            .published
            .inc_by(outcome.published.len() as u64);
        if !outcome.dead.is_empty() {
            self.metrics.dead_lettered.inc_by(outcome.dead.len() as u64);
            self.metrics
                .publish_error("permanent", outcome.dead.len() as u64);
            for (id, reason) in &outcome.dead {
                warn!(id, %reason, "moved to the dead-letter table");
            }
        }
        if !outcome.failed.is_empty() {
            self.metrics
                .publish_error("transient", outcome.failed.len() as u64);
            let reason = outcome.first_reason().unwrap_or("unknown");
            if outcome.any(Verdict::OwnTopicRefused) {
                self.health.failing(
                    Component::PubSub,
                    format!("topic {} refuses messages: {reason}", self.topic),
                );
                error!(topic = %self.topic, %reason, "the relay's topic refuses messages; retrying");
            } else if outcome.published.is_empty()
                && (outcome.any(Verdict::Outage) || outcome.any(Verdict::Timeout))
            {
                self.health
                    .failing(Component::PubSub, format!("publish failed: {reason}"));
            }
            warn!(failed = outcome.failed.len(), published = outcome.published.len(), %reason, "publish failed; rows stay in the outbox and will be retried");
        }
        if !outcome.published.is_empty() {
            self.health.ok(Component::PubSub);
            // Progress, for the status report on the Lease: the deletes of
            // published rows were just committed.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.metrics.last_published.set(now);
        }
        debug!(
            published = outcome.published.len(),
            dead = outcome.dead.len(),
            failed = outcome.failed.len(),
            "batch committed"
        );
    }
}

/// The report of a batch dropped unfinished (its claim rolls back), with
/// the ordering keys the client may have paused.
fn given_up(paused_keys: PausedKeys) -> Finished {
    let outcome = Outcome {
        paused_keys,
        ..Outcome::default()
    };
    Finished {
        outcome,
        end: End::GivenUp,
        commit_error: None,
    }
}
