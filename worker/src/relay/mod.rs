//! The outbox relay: PostgreSQL → Pub/Sub, at least once, in per-key order.
//!
//! Three stages, run by two tasks, one way:
//!
//! 1. **claim** ([`claim`], the claiming loop) — lock the oldest pending rows
//!    (`FOR UPDATE SKIP LOCKED`, in id order), check in the same transaction
//!    that this replica still leads, and hand each row to its topic's
//!    publisher, which batches them into requests and keeps per-key order.
//! 2. **settle** ([`commit`], its own task) — wait until Pub/Sub answered for
//!    every row of the oldest batch in flight, up to the batch's deadline.
//! 3. **finish** ([`commit`]) — in the claiming transaction, delete the
//!    acknowledged rows and move the unpublishable ones to the dead-letter
//!    table, then commit.
//!
//! Up to `pipeline_depth` batches are in flight, so claiming and publishing
//! the next batch overlaps with waiting for and committing the previous
//! ones. What the loop does next is decided by one state machine
//! ([`pipeline`]): it is also the one place that resumes ordering keys the
//! client paused after a failure. What to do with rows that failed (publish
//! alone, set their topic aside, give up after a number of attempts) is
//! decided in [`retries`]; what a Pub/Sub error means, in
//! [`crate::pubsub::classify`].
//!
//! A row leaves the outbox only in the same commit that records its
//! acknowledgement; a crash at any point rolls the claim back, and the rows
//! are published again (the only source of duplicates, bounded by what was
//! in flight).

mod batch;
mod claim;
mod commit;
pub mod message;
mod pipeline;
mod retries;
pub mod store;
mod wakeup;

pub use wakeup::CHANNEL as NOTIFY_CHANNEL;

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::leader::Fence;
use crate::metrics::RelayMetrics;
use crate::pubsub::Publishers;
use batch::{Batch, PausedKeys};
use claim::{ClaimError, ClaimSize};
use commit::{Committer, Finished};
use pipeline::{End, Next, Pipeline};
use retries::Retries;
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
/// Times a routed topic may refuse a row before it is dead-lettered.
pub const DEFAULT_MAX_PUBLISH_ATTEMPTS: u32 = 10;
/// Added to the publish timeout: how long a batch may wait for Pub/Sub.
const SETTLE_GRACE: Duration = Duration::from_secs(5);
/// Added to a batch's deadline: how long the server lets a claim sit idle.
const IDLE_MARGIN: Duration = Duration::from_secs(5);

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
    /// Times a routed topic may refuse a row before it is dead-lettered.
    pub max_publish_attempts: u32,
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
            max_publish_attempts: DEFAULT_MAX_PUBLISH_ATTEMPTS,
        }
    }

    /// How long a claimed batch may wait for Pub/Sub, counted from the
    /// claim's last statement: the publish timeout plus a grace period.
    pub fn settle_window(&self) -> Duration {
        self.publish_timeout + SETTLE_GRACE
    }

    /// The `idle_in_transaction_session_timeout` of the relay's sessions:
    /// longer than any claim waits idle (a batch's settle window), so the
    /// server never ends a claim the relay still waits on, and short enough
    /// to free a silent leader's claims soon.
    pub fn idle_in_transaction_timeout(&self) -> Duration {
        self.settle_window() + IDLE_MARGIN
    }

    /// The `/healthz` timeout must exceed the longest a loop turn can take
    /// without progress: one batch's settle window.
    pub fn shortest_liveness_timeout(&self) -> Duration {
        self.settle_window()
    }
}

/// Why a term of relaying ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown was requested.
    Stopped,
    /// The elector reported that leadership was lost.
    LeadershipLost,
    /// A claim found that this replica no longer leads, before the elector
    /// noticed.
    NotLeader,
}

/// The relay: one outbox table to one default topic.
pub struct Relay {
    config: RelayConfig,
    pool: PgPool,
    store: OutboxStore,
    publishers: Publishers,
    metrics: RelayMetrics,
    health: Health,
    /// How much the next claim takes (adapts to payload size and timeouts).
    size: ClaimSize,
    /// What failed rows are owed (see [`retries`]).
    retries: Retries,
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
            size: ClaimSize::new(config.batch_size, config.batch_bytes),
            retries: Retries::new(
                config.max_publish_attempts,
                config.retry_min,
                config.retry_max,
            ),
            config,
            pool,
            store,
            publishers,
            metrics,
            health,
        }
    }

    /// Relays while this replica leads, proving it with `fence` at every
    /// claim.
    ///
    /// Returns when `stop` is cancelled (shutdown: finish what is in flight
    /// within the shutdown timeout, release the rest), when `lost` is
    /// cancelled (leadership lost: roll every in-flight claim back at once,
    /// so that the next leader publishes those rows again instead of this
    /// replica committing half of them), or when a claim finds that the
    /// fence no longer holds. Database and Pub/Sub outages are retried
    /// forever.
    pub async fn run(
        &mut self,
        stop: &CancellationToken,
        lost: &CancellationToken,
        fence: &Fence,
    ) -> TermEnd {
        let either = stop.child_token();
        let _either_guard = either.clone().drop_guard();
        let forward_lost = {
            let (either, lost) = (either.clone(), lost.clone());
            AbortOnDrop(tokio::spawn(async move {
                lost.cancelled().await;
                either.cancel();
            }))
        };
        self.wait_for_tables(&either).await;
        self.wait_for_previous_claims(&either).await;
        let Some(gate) = self.close_claim_gate(&either).await else {
            return if lost.is_cancelled() {
                TermEnd::LeadershipLost
            } else {
                TermEnd::Stopped
            };
        };
        self.retries.forget();
        info!(
            table = %self.store.table(),
            topic = %self.config.topic,
            batch_size = self.config.batch_size,
            pipeline_depth = self.config.pipeline_depth,
            "relay started"
        );

        // Stages 2 and 3 run in their own task, fed in claim order; every
        // batch handed over comes back as exactly one report.
        let depth = self.config.pipeline_depth.max(1);
        let (to_commit, batches) = mpsc::channel::<Batch>(depth);
        let (reports, mut finished) = mpsc::unbounded_channel::<Finished>();
        let committer = Committer {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            topic: self.config.topic.clone(),
            settle_window: self.config.settle_window(),
        };
        let committer = AbortOnDrop(tokio::spawn(committer.run(batches, reports, lost.clone())));

        let wakeup = Wakeup::start(self.pool.clone(), self.config.poll_interval);
        let backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut pipeline = Pipeline::new(depth, backoff);
        let mut end = TermEnd::Stopped;
        let mut shutdown_deadline: Option<Instant> = None;

        loop {
            self.health.heartbeat();
            while let Ok(report) = finished.try_recv() {
                self.absorb(report, &mut pipeline);
            }
            // For the status report on the Lease.
            self.metrics.paused_keys.set(pipeline.paused_keys() as i64);
            if (either.is_cancelled() || lost.is_cancelled()) && shutdown_deadline.is_none() {
                pipeline.stop();
                shutdown_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                if lost.is_cancelled() {
                    end = TermEnd::LeadershipLost;
                } else if pipeline.in_flight() > 0 {
                    info!(
                        batches = pipeline.in_flight(),
                        "finishing in-flight batches"
                    );
                }
            }
            match pipeline.next(Instant::now()) {
                Next::Resume(keys) => self.resume(&keys, &mut pipeline),
                Next::Claim => {
                    let claimed = tokio::select! {
                        claimed = self.claim(gate, fence) => claimed,
                        // Leadership lost mid-claim: the claim rolls back.
                        _ = lost.cancelled() => continue,
                    };
                    match claimed {
                        Ok(Some(batch)) => {
                            pipeline.claimed(batch.full, batch.stopped_short);
                            if to_commit.send(batch).await.is_err() {
                                // The committer is gone (it only ends with
                                // the relay); the batch rolled back.
                                pipeline.forget_in_flight();
                                break;
                            }
                        }
                        Ok(None) => pipeline.found_nothing(),
                        Err(ClaimError::Database(e, keys)) => {
                            self.database_failed("claim", &e);
                            pipeline.claim_failed(keys);
                        }
                        Err(ClaimError::NotLeader) => {
                            warn!(
                                "this replica no longer holds the leader lock; stopping before the elector notices"
                            );
                            end = TermEnd::NotLeader;
                            either.cancel();
                        }
                    }
                }
                Next::AwaitResult => {
                    let deadline = shutdown_deadline.filter(|_| !lost.is_cancelled());
                    tokio::select! {
                        report = finished.recv() => match report {
                            Some(report) => self.absorb(report, &mut pipeline),
                            None => {
                                pipeline.forget_in_flight();
                                break;
                            }
                        },
                        _ = either.cancelled(), if shutdown_deadline.is_none() => {},
                        _ = sleep_until(deadline), if deadline.is_some() => {
                            warn!("shutdown timeout reached; releasing the rest for the next run");
                            committer.0.abort();
                            pipeline.forget_in_flight();
                        }
                    }
                }
                Next::Sleep(at) => {
                    debug!(
                        delay_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "retrying after failure"
                    );
                    tokio::select! {
                        _ = sleep_until(Some(at)) => {},
                        _ = either.cancelled() => {},
                    }
                }
                Next::Idle => {
                    self.tidy_publishers();
                    // Rows of a topic set aside are due again at this time.
                    let due = self
                        .retries
                        .next_due(Instant::now())
                        .map(|at| at.saturating_duration_since(Instant::now()));
                    let wait = wakeup.wait(due);
                    tokio::pin!(wait);
                    // Keep /healthz green while idle, without dropping the wait.
                    loop {
                        tokio::select! {
                            _ = &mut wait => break,
                            _ = either.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => self.health.heartbeat(),
                        }
                    }
                    pipeline.woken();
                }
                Next::Done => break,
            }
        }
        drop(to_commit);
        drop(forward_lost);
        if end == TermEnd::Stopped {
            self.publishers.flush_all().await;
            info!("relay stopped");
        } else {
            info!(?end, "relay stopped: no longer leading");
        }
        end
    }

    /// Books a finished batch: pipeline, claim size and retry memory.
    fn absorb(&mut self, report: Finished, pipeline: &mut Pipeline) {
        if let Some(e) = &report.commit_error {
            self.database_failed("commit", e);
        }
        if report.end == End::Committed {
            self.retries.learn(&report.outcome, Instant::now());
        }
        if report.end != End::GivenUp {
            self.size.finished(&report.outcome);
        }
        if self.publishers.want_renewal() {
            pipeline.quiesce();
        }
        pipeline.finished(&report.outcome, report.end);
    }

    /// Resumes the keys the client may have paused. Called only when the
    /// pipeline says nothing is in flight ([`Next::Resume`]).
    fn resume(&mut self, keys: &PausedKeys, pipeline: &mut Pipeline) {
        debug_assert_eq!(pipeline.in_flight(), 0);
        for (topic, key) in keys {
            self.publishers.resume(topic, key);
        }
        self.tidy_publishers();
    }

    /// Lets go of idle publishers (nothing is in flight when this runs).
    fn tidy_publishers(&mut self) {
        let left = self.publishers.tidy(Instant::now());
        self.metrics.publishers.set(left as i64);
    }

    /// A new leader must not claim past rows that a previous leader still
    /// holds locked (a partitioned leader's transaction lingers until the
    /// server times it out, and a leader's claim that passed its fence just
    /// before the lock moved is still running): claims skip locked rows,
    /// which would publish a key's later rows before its earlier ones. So
    /// wait until no other session holds row locks on the outbox table.
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

    /// Closes the claim gate once (see [`claim`]): returns when every claim
    /// of a previous leader has ended, with the gate's key; `None` if `stop`
    /// came first.
    async fn close_claim_gate(&self, stop: &CancellationToken) -> Option<i64> {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let mut reported = false;
        while !stop.is_cancelled() {
            self.health.heartbeat();
            let closed = async {
                let gate = self.store.claim_gate(&self.pool).await?;
                let closed = self
                    .store
                    .close_claim_gate(&self.pool, gate, Duration::from_secs(1))
                    .await?;
                Ok::<_, sqlx::Error>(closed.then_some(gate))
            };
            let delay = tokio::select! {
                closed = closed => match closed {
                    Ok(Some(gate)) => {
                        if reported {
                            info!(waited_ms = started.elapsed().as_millis() as u64, "previous leader's claims ended");
                        }
                        return Some(gate);
                    }
                    Ok(None) => {
                        if !reported {
                            warn!("waiting for a previous leader's claims to end");
                            reported = true;
                        }
                        Duration::ZERO
                    }
                    Err(e) => {
                        self.database_failed("claim gate", &e);
                        backoff.next_delay()
                    }
                },
                _ = stop.cancelled() => return None,
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {},
                _ = stop.cancelled() => return None,
            }
        }
        None
    }

    fn database_failed(&self, stage: &str, error: &sqlx::Error) {
        self.metrics.db_errors.inc();
        if matches!(error, sqlx::Error::PoolTimedOut) {
            self.metrics.pool_timeouts.inc();
        }
        self.health
            .failing(Component::Database, format!("{stage} failed: {error}"));
        warn!(stage, %error, "database operation failed; will retry");
    }

    /// Waits until the tables exist with the expected columns.
    async fn wait_for_tables(&self, stop: &CancellationToken) {
        let retry = (self.config.retry_min, self.config.retry_max);
        let check = || self.store.check_shape(&self.pool);
        crate::db::wait_until_usable("outbox table", check, &self.health, retry, stop).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Aborts a task when dropped, so that the committer's batches roll back
/// instead of finishing behind the relay's back.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
