//! The outbox relay: PostgreSQL → Pub/Sub, at least once, in per-key order.
//!
//! Three stages, run by two tasks:
//!
//! 1. **claim** (this module, the claiming loop) — lock the oldest pending
//!    rows (`FOR UPDATE SKIP LOCKED`, in id order) in a transaction and hand
//!    each to the Pub/Sub publisher, which batches them into requests and
//!    keeps per-key order.
//! 2. **settle** ([`commit`], its own task) — wait until Pub/Sub answered for
//!    every row of the oldest batch in flight.
//! 3. **finish** ([`commit`]) — in the claiming transaction, delete the
//!    acknowledged rows and move the unpublishable ones to the dead-letter
//!    table, then commit.
//!
//! Up to `pipeline_depth` batches are in flight, so claiming and publishing
//! the next batch overlaps with waiting for and committing the previous ones.
//! A row leaves the outbox only in the same commit that records its
//! acknowledgement; a crash at any point rolls the claim back, and the rows
//! are published again (the only source of duplicates, bounded by what was in
//! flight).
//!
//! Order: rows are handed to the publisher in id order, and the publisher sends
//! one ordering key's messages in that order. When a publish fails, the client
//! pauses that key, so later messages of the key fail too instead of
//! overtaking it. The claiming loop then stops claiming until every batch in
//! flight is finished, resumes the paused keys and claims again from the
//! oldest row: the order holds across retries.

mod batch;
mod commit;
pub mod message;
pub mod store;
mod wakeup;

pub use wakeup::CHANNEL as NOTIFY_CHANNEL;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::Backoff;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::metrics::RelayMetrics;
use crate::pubsub::Publishers;
use batch::{Batch, Entry, PausedKeys, State};
use commit::{Committer, Finished};
use message::prepare;
use store::OutboxStore;
use wakeup::Wakeup;

/// Rows per claim. Large claims matter most with ordering keys: Pub/Sub sends
/// one request per key at a time, so rows per key per claim set the request
/// size. 5,000 measured 1.4–1.8 x faster than 1,000 in `make bench`.
pub const DEFAULT_BATCH_SIZE: u32 = 5000;
/// Claimed batches in flight at once: one being claimed and published while
/// the previous one settles and commits. A third added memory (about a
/// third more rows in flight), not speed, in `make bench`.
pub const DEFAULT_PIPELINE_DEPTH: usize = 2;
/// Payload bytes a claim aims to hold: bounds memory whatever the row size.
pub const DEFAULT_BATCH_BYTES: usize = 8 * 1024 * 1024;

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
    /// are large, and payloads above `batch_bytes / rows claimed` are read one
    /// at a time, waiting for Pub/Sub after every `batch_bytes` of them.
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
            batch_size: DEFAULT_BATCH_SIZE,
            pipeline_depth: DEFAULT_PIPELINE_DEPTH,
            batch_bytes: DEFAULT_BATCH_BYTES,
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

        // Stages 2 and 3 run in their own task, fed in claim order.
        let depth = self.config.pipeline_depth.max(1);
        let (to_commit, batches) = mpsc::channel::<Batch>(depth);
        let (finished_tx, mut finished) = mpsc::unbounded_channel::<Finished>();
        let committer = Committer {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            topic: self.config.topic.clone(),
            publish_timeout: self.config.publish_timeout,
        };
        let mut committer = AbortOnDrop(tokio::spawn(committer.run(
            batches,
            finished_tx,
            lost.clone(),
        )));

        let mut wakeup = Wakeup::new(self.pool.clone(), self.config.poll_interval);
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut pipeline = Pipeline::default();
        let mut retry_at: Option<Instant> = None;
        let mut more = true;

        while !stop.is_cancelled() {
            self.health.heartbeat();

            // Take in what the committer finished meanwhile, without waiting.
            while let Ok(done) = finished.try_recv() {
                more = true;
                self.absorb(done, &mut pipeline, &mut backoff);
            }

            // After a failure, once everything claimed before it is finished:
            // resume the paused keys and start again from the oldest row.
            if pipeline.in_flight == 0
                && let Some(drained) = pipeline.draining.take()
            {
                self.resume(&drained.keys);
                if drained.failed {
                    let delay = backoff.next_delay();
                    debug!(
                        delay_ms = delay.as_millis() as u64,
                        "retrying after failure"
                    );
                    retry_at = Some(Instant::now() + delay);
                }
            }

            // 1. Claim while there is room in the pipeline and rows to claim.
            let may_claim = retry_at.is_none() && pipeline.has_room(depth);
            if more && may_claim {
                let claimed = tokio::select! {
                    claimed = self.claim() => claimed,
                    // Leadership lost mid-claim: the claim rolls back.
                    _ = lost.cancelled() => break,
                };
                match claimed {
                    Ok(Some(batch)) => {
                        more = batch.full;
                        pipeline.in_flight += 1;
                        if let Err(unsent) = to_commit.send(batch).await {
                            // The committer stops only when leadership is
                            // lost; this batch rolls back here.
                            self.resume(&unsent.0.keys());
                            break;
                        }
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

            // 2.+3. run in the committer: wait for its next result. Rows
            // that arrive meanwhile wait for it too and so make the next
            // claim a larger one: at moderate load one batch in flight at a
            // time keeps requests and commits few, and latency low.
            if pipeline.in_flight > 0 {
                tokio::select! {
                    done = finished.recv() => match done {
                        Some(done) => {
                            more = true;
                            self.absorb(done, &mut pipeline, &mut backoff);
                        }
                        None => break,
                    },
                    _ = stop.cancelled() => {},
                }
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

        drop(to_commit);
        if lost.is_cancelled() {
            // The committer gives up its batches at once (rolling them back)
            // and hands back their ordering keys.
            let keys = match (&mut committer.0).await {
                Ok(keys) => keys,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => PausedKeys::new(),
            };
            if pipeline.in_flight > 0 {
                warn!(
                    batches = pipeline.in_flight,
                    "rolled back in-flight claims; the next leader publishes them again"
                );
            }
            self.resume(&keys);
            info!("relay stopped: leadership lost");
        } else {
            self.drain(&mut committer, pipeline.in_flight).await;
            info!("relay stopped");
        }
        // A later term (this replica may lead again) starts with every key
        // resumed, also those of failures not yet booked.
        let mut paused = pipeline.draining.take().map(|d| d.keys).unwrap_or_default();
        while let Ok(done) = finished.try_recv() {
            if let Err(e) = &done.committed {
                self.database_failed("commit", e);
            }
            paused.extend(done.outcome.paused_keys);
        }
        self.resume(&paused);
        Ok(())
    }

    /// Books a finished batch. A failure (rows left to retry, or a commit
    /// that did not go through) or a key the client paused starts a drain:
    /// batches claimed before it may hold later messages of the same keys, so
    /// nothing new is claimed until they are all finished (they fail fast on
    /// paused keys); then the keys are resumed and claiming starts again from
    /// the oldest pending row, which keeps each key in order.
    fn absorb(&mut self, done: Finished, pipeline: &mut Pipeline, backoff: &mut Backoff) {
        pipeline.in_flight = pipeline.in_flight.saturating_sub(1);
        if let Err(e) = &done.committed {
            self.database_failed("commit", e);
        }
        let failed = done.outcome.retry > 0 || done.committed.is_err();
        if failed || !done.outcome.paused_keys.is_empty() || pipeline.draining.is_some() {
            let draining = pipeline.draining.get_or_insert_with(Draining::default);
            draining.failed |= failed;
            draining.keys.extend(done.outcome.paused_keys);
        } else {
            backoff.reset();
        }
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
        // Rows up to this size come with the claim; the claim then holds at
        // most about `batch_bytes` of payloads. Larger ones are read one by one.
        let inline_bytes = (self.config.batch_bytes / self.claim_limit.max(1) as usize)
            .clamp(1024, i32::MAX as usize) as i32;
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
            // Payload bytes read one by one and not yet acknowledged.
            let mut large_pending = 0usize;
            for mut row in rows {
                let large = row.payload.is_none();
                if large {
                    // Bound memory: once about `batch_bytes` of large payloads
                    // are out, wait for Pub/Sub before reading more.
                    if large_pending >= self.config.batch_bytes {
                        let deadline = self.config.publish_timeout + Duration::from_secs(5);
                        if tokio::time::timeout(deadline, batch.settle()).await.is_err() {
                            // Pub/Sub hangs: publish no more of this claim.
                            // The rest stays pending, and the rows in flight
                            // count as failed, so the relay drains and retries.
                            batch.abandon_pending("no answer from Pub/Sub in time");
                            warn!("Pub/Sub did not answer for large payloads; retrying the claim later");
                            break;
                        }
                        large_pending = 0;
                    }
                    let payload = self.store.fetch_payload(&mut batch.tx, row.id).await?;
                    large_pending += payload.len();
                    row.payload = Some(payload);
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
            }
            Ok::<_, sqlx::Error>(())
        }
        .instrument(span)
        .await;
        if let Err(e) = published {
            // The claim rolls back and the rows are published again later. A
            // key the client paused meanwhile must not stay paused.
            self.resume(&batch.keys());
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

    fn resume(&mut self, keys: &PausedKeys) {
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

    /// On shutdown: let the committer finish what is in flight within the
    /// shutdown timeout; whatever is left is rolled back (by aborting the
    /// committer, which drops its batches) and published again by the next run.
    async fn drain(&mut self, committer: &mut AbortOnDrop, in_flight: usize) {
        if in_flight > 0 {
            info!(batches = in_flight, "finishing in-flight batches");
        }
        let timeout = self.config.shutdown_timeout;
        match tokio::time::timeout(timeout, &mut committer.0).await {
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
            Err(_) => {
                warn!("shutdown timeout reached; releasing the rest for the next run");
                committer.0.abort();
            }
        }
        self.publishers.flush_all().await;
    }

    /// Waits until the tables exist with the expected columns.
    async fn wait_for_tables(&self, stop: &CancellationToken) {
        let retry = (self.config.retry_min, self.config.retry_max);
        let check = || self.store.check_shape(&self.pool);
        crate::db::wait_until_usable("outbox table", check, &self.health, retry, stop).await;
    }
}

/// What the claiming loop knows about the batches it handed to the committer.
#[derive(Default)]
struct Pipeline {
    /// Batches claimed and not yet finished.
    in_flight: usize,
    /// Set after a failure: claim nothing until the pipeline is empty.
    draining: Option<Draining>,
}

impl Pipeline {
    fn has_room(&self, depth: usize) -> bool {
        self.draining.is_none() && self.in_flight < depth
    }
}

/// Keys to resume and whether to back off once the pipeline is drained.
#[derive(Default)]
struct Draining {
    keys: PausedKeys,
    /// Rows were left to retry or a commit failed (not only a dead letter).
    failed: bool,
}

/// Aborts the committer task if the relay loop is dropped, so its batches
/// roll back instead of finishing behind the caller's back.
struct AbortOnDrop(JoinHandle<PausedKeys>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
