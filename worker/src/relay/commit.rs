//! Stages 2 and 3 of the relay, in their own task: wait for Pub/Sub's answers
//! to a claimed batch, then delete, dead-letter and commit.
//!
//! Running them apart from the claiming loop lets the next claim (a database
//! round trip) overlap with waiting for Pub/Sub and committing the previous
//! batch. Batches are finished strictly in claim order, one at a time; each
//! result goes back to the claiming loop, which alone decides what happens
//! after a failure (see `Relay::run`).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span, warn};

use super::batch::{Batch, Outcome, PausedKeys, State};
use super::store::OutboxStore;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::metrics::RelayMetrics;

/// A batch that went through stages 2 and 3.
pub struct Finished {
    /// What Pub/Sub said, row by row.
    pub outcome: Outcome,
    /// Whether the deletes and the commit went through; when they did not,
    /// every row of the batch stays in the outbox.
    pub committed: Result<(), sqlx::Error>,
}

/// Finishes claimed batches; owns clones of what it needs, so it can run as
/// its own task.
pub struct Committer {
    pub store: OutboxStore,
    pub metrics: RelayMetrics,
    pub health: Health,
    /// The relay's own topic, for the "topic does not exist" report.
    pub topic: TopicName,
    /// How long Pub/Sub may take to answer a batch.
    pub publish_timeout: Duration,
}

impl Committer {
    /// Finishes the batches from `batches` in order and reports each on
    /// `finished`, until `batches` closes. When `lost` fires, every batch it
    /// still holds is dropped, which rolls its claim back at once, and the
    /// ordering keys of those batches are returned so they can be resumed.
    pub async fn run(
        self,
        mut batches: mpsc::Receiver<Batch>,
        finished: mpsc::UnboundedSender<Finished>,
        lost: CancellationToken,
    ) -> PausedKeys {
        let mut keys = PausedKeys::new();
        loop {
            let mut batch = tokio::select! {
                biased;
                _ = lost.cancelled() => break,
                next = batches.recv() => match next {
                    Some(batch) => batch,
                    None => return keys,
                },
            };
            let span = info_span!(
                "finish",
                rows = batch.entries.len(),
                first_id = batch.entries.first().map(|e| e.id)
            );
            let settled = tokio::select! {
                settled = self.settle(&mut batch).instrument(span.clone()) => settled,
                _ = lost.cancelled() => {
                    keys.extend(batch.keys());
                    break;
                }
            };
            let outcome = batch.outcome();
            let committed = tokio::select! {
                committed = self.commit(batch, &outcome).instrument(span.clone()) => committed,
                _ = lost.cancelled() => {
                    keys.extend(outcome.paused_keys);
                    break;
                }
            };
            if committed.is_ok() {
                let _entered = span.enter();
                self.record(&outcome, settled);
            }
            let report = Finished { outcome, committed };
            if finished.send(report).is_err() {
                // The claiming loop is gone; nobody needs more results.
                return keys;
            }
        }
        // Leadership lost: give up everything still queued, too.
        batches.close();
        while let Ok(batch) = batches.try_recv() {
            keys.extend(batch.keys());
        }
        keys
    }

    /// Stage 2: wait for every answer, but not forever.
    async fn settle(&self, batch: &mut Batch) -> Settled {
        let deadline = self.publish_timeout + Duration::from_secs(5);
        let own_topic_missing = match tokio::time::timeout(deadline, batch.settle()).await {
            Ok(summary) => summary.own_topic_missing,
            Err(_) => {
                batch.abandon_pending("no answer from Pub/Sub in time");
                false
            }
        };
        let ages_at_claim = batch
            .entries
            .iter()
            .filter(|e| matches!(e.state, State::Published))
            .map(|e| e.age_at_claim)
            .collect();
        Settled {
            own_topic_missing,
            claimed_at: batch.claimed_at,
            ages_at_claim,
        }
    }

    /// Stage 3: delete what Pub/Sub acknowledged, dead-letter what it never
    /// will, and commit; rows to retry stay locked until the commit frees them.
    async fn commit(&self, mut batch: Batch, outcome: &Outcome) -> Result<(), sqlx::Error> {
        self.store
            .finish(&mut batch.tx, &outcome.published, &outcome.dead)
            .await?;
        batch.tx.commit().await?;
        self.health.ok(Component::Database);
        Ok(())
    }

    /// Metrics, health and logs for a committed batch.
    fn record(&self, outcome: &Outcome, settled: Settled) {
        // Insert to acknowledged and deleted: the row's age when claimed
        // (measured by the database) plus the time since the claim.
        let since_claim = settled.claimed_at.elapsed().as_secs_f64();
        for age in &settled.ages_at_claim {
            self.metrics.latency.observe(age + since_claim);
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
        if outcome.retry > 0 {
            self.metrics
                .publish_error("transient", outcome.retry as u64);
            let reason = outcome.first_retry_reason.as_deref().unwrap_or("unknown");
            if settled.own_topic_missing {
                self.health.failing(
                    Component::PubSub,
                    format!("topic {} does not exist", self.topic),
                );
                error!(topic = %self.topic, "the relay's topic does not exist; retrying");
            } else if outcome.published.is_empty() {
                self.health
                    .failing(Component::PubSub, format!("publish failed: {reason}"));
            }
            warn!(failed = outcome.retry, published = outcome.published.len(), %reason, "publish failed; rows stay in the outbox and will be retried");
        }
        if !outcome.published.is_empty() {
            self.health.ok(Component::PubSub);
        }
        debug!(
            published = outcome.published.len(),
            dead = outcome.dead.len(),
            retry = outcome.retry,
            "batch committed"
        );
    }
}

/// What settling noticed beyond the per-row results.
struct Settled {
    own_topic_missing: bool,
    claimed_at: Instant,
    /// Seconds from insert to claim of each published row.
    ages_at_claim: Vec<f64>,
}
