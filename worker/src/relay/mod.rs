//! The outbox relay: PostgreSQL → Pub/Sub, at least once, in per-key order.
//!
//! The loop has three stages, each a method below:
//!
//! 1. **claim** — lock the oldest pending rows (`FOR UPDATE SKIP LOCKED`, in id
//!    order) in a transaction and hand each to the Pub/Sub publisher. The
//!    publisher batches them into requests and keeps per-key order.
//! 2. **settle** — wait until Pub/Sub answered for every row of the oldest
//!    batch in flight.
//! 3. **finish** — in the claiming transaction, delete the acknowledged rows and
//!    move the unpublishable ones to the dead-letter table, then commit.
//!
//! Up to `pipeline_depth` batches are in flight, so claiming and publishing
//! the next batch overlaps with waiting for the previous one. A row leaves the
//! outbox only in the same commit that records its acknowledgement; a crash at
//! any point rolls the claim back, and the rows are published again (the only
//! source of duplicates, bounded by what was in flight).
//!
//! Order: rows are handed to the publisher in id order, and the publisher sends
//! one ordering key's messages in that order. When a publish fails, the client
//! pauses that key, so later messages of the key fail too instead of
//! overtaking it. The relay then drains the pipeline, resumes the paused keys
//! and claims again from the oldest row: the order holds across retries.

mod batch;
pub mod message;
pub mod store;
mod wakeup;

pub use wakeup::CHANNEL as NOTIFY_CHANNEL;

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::metrics::RelayMetrics;
use crate::pubsub::Publishers;
use batch::{Batch, Entry, Outcome, State};
use message::prepare;
use store::OutboxStore;
use wakeup::Wakeup;

/// Tuning knobs of the relay loop.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The relay's own topic; rows with a NULL `topic` go here.
    pub topic: TopicName,
    /// Rows claimed per transaction.
    pub batch_size: u32,
    /// Claimed batches in flight at once.
    pub pipeline_depth: usize,
    /// Payload bytes a batch aims to hold; the claim size shrinks when rows
    /// are large, and payloads above `batch_bytes / batch_size` are read one
    /// at a time.
    pub batch_bytes: usize,
    /// Fallback poll when no notification arrives.
    pub poll_interval: Duration,
    /// How long to wait for Pub/Sub to answer a batch before retrying it.
    pub publish_timeout: Duration,
    /// How long to finish in-flight batches on shutdown before releasing them.
    pub shutdown_timeout: Duration,
    /// Backoff after failures.
    pub retry_min: Duration,
    /// Cap of the backoff.
    pub retry_max: Duration,
}

impl RelayConfig {
    /// Defaults for everything but the topic.
    pub fn new(topic: TopicName) -> Self {
        RelayConfig {
            topic,
            batch_size: 1000,
            pipeline_depth: 3,
            batch_bytes: 16 * 1024 * 1024,
            poll_interval: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Errors that stop the relay (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// The relay: one outbox table to one default topic.
pub struct Relay {
    config: RelayConfig,
    pool: PgPool,
    store: OutboxStore,
    publishers: Publishers,
    metrics: RelayMetrics,
    health: Health,
    /// Rows to claim next (adapts to payload size).
    claim_limit: i64,
}

impl Relay {
    /// Assembles a relay; nothing is contacted until [`Relay::run`].
    pub fn new(
        config: RelayConfig,
        pool: PgPool,
        store: OutboxStore,
        publishers: Publishers,
        metrics: RelayMetrics,
        health: Health,
    ) -> Self {
        Relay {
            claim_limit: i64::from(config.batch_size.max(1)),
            config,
            pool,
            store,
            publishers,
            metrics,
            health,
        }
    }

    /// Relays while this replica leads.
    ///
    /// Returns when `stop` is cancelled (shutdown: finish or release what is in
    /// flight within the shutdown timeout) or when `lost` is cancelled
    /// (leadership lost: roll every in-flight claim back at once, so that the
    /// next leader publishes those rows again instead of this replica
    /// committing half of them). Database and Pub/Sub outages are retried
    /// forever; only a misconfigured table stops the relay.
    pub async fn run(
        &mut self,
        stop: &CancellationToken,
        lost: &CancellationToken,
    ) -> Result<(), RelayError> {
        let either = CancellationToken::new();
        let _guard = either.clone().drop_guard();
        {
            let (either, stop, lost) = (either.clone(), stop.clone(), lost.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {},
                    _ = lost.cancelled() => {},
                    _ = either.cancelled() => {},
                }
                either.cancel();
            });
        }
        let stop = &either;
        self.wait_for_tables(stop).await;
        self.wait_for_previous_claims(stop).await;
        info!(
            table = %self.store.table(),
            topic = %self.config.topic,
            batch_size = self.config.batch_size,
            pipeline_depth = self.config.pipeline_depth,
            "relay started"
        );
        let mut wakeup = Wakeup::new(self.pool.clone(), self.config.poll_interval);
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut in_flight: VecDeque<Batch> = VecDeque::new();
        let mut retry_at: Option<Instant> = None;
        let mut more = true;

        while !stop.is_cancelled() {
            self.health.heartbeat();

            // 1. Claim while there is room in the pipeline and rows to claim.
            if more && retry_at.is_none() && in_flight.len() < self.config.pipeline_depth {
                let claimed = tokio::select! {
                    claimed = self.claim() => claimed,
                    // Leadership lost mid-claim: the claim rolls back.
                    _ = lost.cancelled() => continue,
                };
                match claimed {
                    Ok(Some(batch)) => {
                        more = batch.full;
                        in_flight.push_back(batch);
                        continue;
                    }
                    Ok(None) => more = false,
                    Err(e) => {
                        self.database_failed("claim", &e);
                        more = false;
                        retry_at = Some(Instant::now() + backoff.next_delay());
                    }
                }
            }

            // 2.+3. Settle and finish the oldest batch.
            if let Some(batch) = in_flight.pop_front() {
                let completed = tokio::select! {
                    completed = self.complete(batch) => completed,
                    // Leadership lost: dropping the batch rolls its claim back.
                    _ = lost.cancelled() => continue,
                };
                let failed = match completed {
                    Ok(outcome) => {
                        let keys = outcome.paused_keys;
                        if outcome.retry > 0 {
                            Some(keys)
                        } else {
                            self.resume(&keys);
                            None
                        }
                    }
                    Err(e) => {
                        self.database_failed("commit", &e);
                        Some(BTreeSet::new())
                    }
                };
                if let Some(mut paused) = failed {
                    // Later batches may hold messages of the failed keys: let
                    // them all finish (they fail fast on paused keys), so the
                    // next claim starts again from the oldest pending row.
                    while let Some(batch) = in_flight.pop_front() {
                        match self.complete(batch).await {
                            Ok(outcome) => paused.extend(outcome.paused_keys),
                            Err(e) => self.database_failed("commit", &e),
                        }
                    }
                    self.resume(&paused);
                    let delay = backoff.next_delay();
                    debug!(
                        delay_ms = delay.as_millis() as u64,
                        "retrying after failure"
                    );
                    retry_at = Some(Instant::now() + delay);
                } else {
                    backoff.reset();
                }
                more = true;
                continue;
            }

            // Nothing in flight: wait for a retry, a notification or the poll.
            if let Some(at) = retry_at.take() {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {},
                    _ = stop.cancelled() => {},
                }
            } else if !more {
                // Keep /healthz green while idle, without dropping the wait.
                let wait = wakeup.wait();
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => self.health.heartbeat(),
                    }
                }
            }
            more = true;
        }

        if lost.is_cancelled() {
            self.abandon(in_flight);
            info!("relay stopped: leadership lost");
        } else {
            self.drain(in_flight).await;
            info!("relay stopped");
        }
        Ok(())
    }

    /// Rolls back every in-flight claim (dropping a batch rolls back its
    /// transaction) and un-pauses their ordering keys for the next term.
    fn abandon(&mut self, in_flight: VecDeque<Batch>) {
        let rows: usize = in_flight.iter().map(|b| b.entries.len()).sum();
        if rows > 0 {
            warn!(
                rows,
                "rolling back in-flight claims; the next leader publishes them again"
            );
        }
        let keys: BTreeSet<_> = in_flight
            .iter()
            .flat_map(|b| b.entries.iter())
            .filter(|e| !e.ordering_key.is_empty())
            .filter_map(|e| Some((e.topic.clone()?, e.ordering_key.clone())))
            .collect();
        drop(in_flight);
        self.resume(&keys);
    }

    /// A new leader must not claim past rows that a previous leader still
    /// holds locked (a partitioned leader's transaction lingers until the
    /// server times it out): claims skip locked rows, which would publish a
    /// key's later rows before its earlier ones. So wait until no other
    /// session holds row locks on the outbox table.
    async fn wait_for_previous_claims(&self, stop: &CancellationToken) {
        let started = Instant::now();
        let mut reported = false;
        while !stop.is_cancelled() {
            match self.store.other_claimers(&self.pool).await {
                Ok(pids) if pids.is_empty() => {
                    if reported {
                        info!(
                            waited_ms = started.elapsed().as_millis() as u64,
                            "previous claims ended"
                        );
                    }
                    return;
                }
                Ok(pids) => {
                    if !reported && started.elapsed() > Duration::from_secs(1) {
                        warn!(
                            ?pids,
                            "waiting for another session's claims on the outbox to end (a previous leader?)"
                        );
                        reported = true;
                    }
                }
                Err(e) => self.database_failed("fence", &e),
            }
            self.health.heartbeat();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {},
                _ = stop.cancelled() => {},
            }
        }
    }

    /// Stage 1: claim a batch and hand its rows to the publisher.
    async fn claim(&mut self) -> Result<Option<Batch>, sqlx::Error> {
        let inline_bytes =
            (self.config.batch_bytes / self.config.batch_size.max(1) as usize).max(1024) as i32;
        let mut tx = self.pool.begin().await?;
        let rows = self
            .store
            .claim(&mut tx, self.claim_limit, inline_bytes)
            .await?;
        self.health.ok(Component::Database);
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let span = info_span!("batch", rows = rows.len(), first_id = rows[0].id);
        let full = rows.len() as i64 >= self.claim_limit;
        self.metrics.batch_size.observe(rows.len() as f64);

        let mut batch = Batch {
            tx,
            entries: Vec::with_capacity(rows.len()),
            claimed_at: Instant::now(),
            full,
            bytes: 0,
        };
        let published = async {
            for mut row in rows {
                let large = row.payload.is_none();
                if large {
                    // Bound memory: let earlier messages go out first, then
                    // read and publish this one on its own.
                    batch.settle().await;
                    row.payload = Some(self.store.fetch_payload(&mut batch.tx, row.id).await?);
                }
                let entry = match prepare(&row, &self.config.topic) {
                    Ok(prepared) => {
                        batch.bytes += prepared.bytes;
                        let ordering_key = prepared.message.ordering_key.clone();
                        let future = self.publishers.get(&prepared.topic).publish(prepared.message);
                        Entry {
                            id: row.id,
                            topic: Some(prepared.topic),
                            own_topic: prepared.own_topic,
                            ordering_key,
                            age_at_claim: row.age_at_claim,
                            state: State::Pending(future),
                        }
                    }
                    Err(reason) => {
                        warn!(id = row.id, %reason, "row cannot be published; moving it to the dead-letter table");
                        Entry {
                            id: row.id,
                            topic: None,
                            own_topic: false,
                            ordering_key: String::new(),
                            age_at_claim: row.age_at_claim,
                            state: State::Dead(reason),
                        }
                    }
                };
                batch.entries.push(entry);
                if large {
                    batch.settle().await;
                }
            }
            Ok::<_, sqlx::Error>(())
        }
        .instrument(span)
        .await;
        if let Err(e) = published {
            // The claim rolls back and the rows are published again later. A
            // key the client paused meanwhile must not stay paused.
            let keys: BTreeSet<_> = batch
                .entries
                .iter()
                .filter(|e| !e.ordering_key.is_empty())
                .filter_map(|e| Some((e.topic.clone()?, e.ordering_key.clone())))
                .collect();
            self.resume(&keys);
            return Err(e);
        }
        self.adapt_claim_limit(&batch);
        Ok(Some(batch))
    }

    /// Shrinks the claim when rows are large, grows it back when they are not.
    fn adapt_claim_limit(&mut self, batch: &Batch) {
        let rows = batch.entries.len().max(1);
        let per_row = (batch.bytes / rows).max(1);
        let fits = (self.config.batch_bytes / per_row).max(1) as i64;
        self.claim_limit = fits.min(i64::from(self.config.batch_size.max(1)));
    }

    /// Stages 2 and 3: wait for Pub/Sub's answers, then delete, dead-letter
    /// and commit in the claiming transaction.
    async fn complete(&mut self, mut batch: Batch) -> Result<Outcome, sqlx::Error> {
        let span = info_span!(
            "finish",
            rows = batch.entries.len(),
            first_id = batch.entries.first().map(|e| e.id)
        );
        async {
            let deadline = self.config.publish_timeout + Duration::from_secs(5);
            let summary = match tokio::time::timeout(deadline, batch.settle()).await {
                Ok(summary) => summary,
                Err(_) => {
                    batch.abandon_pending("no answer from Pub/Sub in time");
                    Default::default()
                }
            };
            let outcome = batch.outcome();
            self.store
                .finish(&mut batch.tx, &outcome.published, &outcome.dead)
                .await?;
            batch.tx.commit().await?;
            self.health.ok(Component::Database);
            self.record(
                &batch.entries,
                batch.claimed_at,
                &outcome,
                summary.own_topic_missing,
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// Metrics, health and logs for a committed batch.
    fn record(
        &self,
        entries: &[Entry],
        claimed_at: Instant,
        outcome: &Outcome,
        own_topic_missing: bool,
    ) {
        let since_claim = claimed_at.elapsed().as_secs_f64();
        for entry in entries {
            if matches!(entry.state, State::Published) {
                self.metrics
                    .latency
                    .observe(entry.age_at_claim + since_claim);
            }
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
            if own_topic_missing {
                self.health.failing(
                    Component::PubSub,
                    format!("topic {} does not exist", self.config.topic),
                );
                error!(topic = %self.config.topic, "the relay's topic does not exist; retrying");
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

    fn resume(&mut self, keys: &BTreeSet<(TopicName, String)>) {
        for (topic, key) in keys {
            self.publishers.get(topic).resume_publish(key.clone());
        }
    }

    fn database_failed(&self, stage: &str, error: &sqlx::Error) {
        self.metrics.db_errors.inc();
        self.health
            .failing(Component::Database, format!("{stage} failed: {error}"));
        warn!(stage, %error, "database operation failed; will retry");
    }

    /// On shutdown: finish what is in flight within the shutdown timeout;
    /// whatever is left is rolled back and published again by the next run.
    async fn drain(&mut self, mut in_flight: VecDeque<Batch>) {
        if in_flight.is_empty() {
            return;
        }
        let rows: usize = in_flight.iter().map(|b| b.entries.len()).sum();
        info!(
            batches = in_flight.len(),
            rows, "finishing in-flight batches"
        );
        let deadline = Instant::now() + self.config.shutdown_timeout;
        while let Some(batch) = in_flight.pop_front() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.complete(batch)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.database_failed("commit", &e),
                Err(_) => {
                    warn!("shutdown timeout reached; releasing the rest for the next run");
                    break;
                }
            }
        }
        // Dropping the remaining batches rolls their claims back.
        drop(in_flight);
        self.publishers.flush_all().await;
    }

    /// Waits until the tables exist with the expected columns.
    async fn wait_for_tables(&self, stop: &CancellationToken) {
        let retry = (self.config.retry_min, self.config.retry_max);
        let check = || self.store.check_shape(&self.pool);
        crate::db::wait_until_usable("outbox table", check, &self.health, retry, stop).await;
    }
}
