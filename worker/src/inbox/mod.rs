//! The inbox worker: Pub/Sub → inbox table, each message stored once.
//!
//! The loop, mirroring the relay's:
//!
//! 1. **receive** — streaming pulls ([`source`]) feed a bounded channel.
//! 2. **batch** — take what is there, up to `batch_size` messages, waiting at
//!    most `linger` for more.
//! 3. **store** — one transaction: insert the batch in receive order with
//!    `ON CONFLICT (message_id) DO NOTHING` (duplicates are skipped and
//!    counted), record messages that cannot be stored in the dead-letter
//!    table, commit.
//! 4. **ack** — only after the commit. A crash before the commit loses nothing
//!    (Pub/Sub redelivers); a crash after it but before the acknowledgement
//!    reaches Pub/Sub gives a redelivery that the unique key absorbs.
//!
//! Leadership: with leader election, only the leader pulls ([`Inbox::run_term`]).
//! When it loses leadership it closes its streaming pulls at once and drops
//! what it received but did not store yet: those messages are not
//! acknowledged, so Pub/Sub redelivers them to the next leader; a message
//! both replicas store is absorbed by the unique key.
//!
//! Order: batches are stored one at a time, in the order received, and the
//! identity column follows the insert order; so with an ordered subscription
//! each key's rows have increasing ids, and the application library
//! processes them in id order.

pub mod message;
pub mod source;
pub mod store;

pub use source::{Delivery, FlowControl};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use google_cloud_pubsub::client::Subscriber;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backoff::Backoff;
use crate::health::{Component, Health};
use crate::ident::SubscriptionName;
use crate::metrics::InboxMetrics;
use message::{DeadRow, InboxRow, Prepared, prepare};
use source::Puller;
use store::{InboxStore, refuses_message};

/// Tuning knobs of the inbox loop.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    /// `projects/P/subscriptions/S`.
    pub subscription: SubscriptionName,
    /// Messages stored per transaction, at most.
    pub batch_size: usize,
    /// How long a batch waits for more messages once it has one.
    pub linger: Duration,
    /// Streaming-pull flow control.
    pub flow: FlowControl,
    /// How long to store what was received after SIGTERM.
    pub shutdown_timeout: Duration,
    /// Backoff after failures.
    pub retry_min: Duration,
    /// Cap of the backoff.
    pub retry_max: Duration,
}

impl InboxConfig {
    /// Defaults for everything but the subscription.
    pub fn new(subscription: SubscriptionName) -> Self {
        InboxConfig {
            subscription,
            batch_size: 500,
            linger: Duration::from_millis(5),
            flow: FlowControl::default(),
            shutdown_timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// What one committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// New rows in the inbox table.
    pub stored: usize,
    /// Messages already in the inbox.
    pub duplicates: usize,
    /// Messages recorded in the dead-letter table.
    pub dead: usize,
}

/// The inbox worker: one subscription into one inbox table.
pub struct Inbox {
    config: InboxConfig,
    pool: PgPool,
    store: InboxStore,
    client: Subscriber,
    metrics: InboxMetrics,
    health: Health,
}

impl Inbox {
    /// Assembles the worker; nothing is contacted until [`Inbox::run`].
    pub fn new(
        config: InboxConfig,
        pool: PgPool,
        store: InboxStore,
        client: Subscriber,
        metrics: InboxMetrics,
        health: Health,
    ) -> Self {
        Inbox {
            config,
            pool,
            store,
            client,
            metrics,
            health,
        }
    }

    /// Runs until `stop` is cancelled, then stores and acknowledges what was
    /// already received (within the shutdown timeout). Outages and a missing
    /// table are retried until then (and reported on readiness). For a
    /// worker that does not take part in leader election.
    pub async fn run(self, stop: CancellationToken) {
        self.run_term(&stop, &CancellationToken::new()).await;
    }

    /// One term of leadership: pulls and stores until `stop` (then stores
    /// and acknowledges what was already received, within the shutdown
    /// timeout) or until `lost` (then stops pulling at once and drops what
    /// was received but not stored: unacknowledged, it is redelivered to
    /// the next leader).
    pub async fn run_term(&self, stop: &CancellationToken, lost: &CancellationToken) {
        // Cancelled by either; ends the pulls and the store loop.
        let ending = CancellationToken::new();
        let forward = {
            let (ending, stop, lost) = (ending.clone(), stop.clone(), lost.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {},
                    _ = lost.cancelled() => {},
                }
                ending.cancel();
            })
        };
        self.term(&ending, lost).await;
        forward.abort();
    }

    async fn term(&self, ending: &CancellationToken, lost: &CancellationToken) {
        self.wait_for_tables(ending).await;
        if ending.is_cancelled() {
            return;
        }
        info!(
            table = %self.store.table(),
            subscription = %self.config.subscription,
            batch_size = self.config.batch_size,
            streams = self.config.flow.streams,
            max_outstanding_messages = self.config.flow.max_outstanding_messages,
            "inbox started"
        );
        let capacity = (self.config.flow.max_outstanding_messages.max(1) as usize
            * self.config.flow.streams.max(1))
        .clamp(self.config.batch_size.max(1), 1_000_000);
        let (tx, mut rx) = mpsc::channel::<Delivery>(capacity);
        let mut pullers = Vec::new();
        for index in 0..self.config.flow.streams.max(1) {
            let puller = Puller {
                client: self.client.clone(),
                subscription: self.config.subscription.clone(),
                flow: self.config.flow.clone(),
                metrics: self.metrics.clone(),
                health: self.health.clone(),
                retry_min: self.config.retry_min,
                retry_max: self.config.retry_max,
            };
            pullers.push(tokio::spawn(puller.run(index, tx.clone(), ending.clone())));
        }
        drop(tx);

        let mut batch: Vec<Delivery> = Vec::with_capacity(self.config.batch_size);
        loop {
            self.health.heartbeat();
            // Wake up every second while idle, for the liveness heartbeat
            // (recv_many is cancel safe).
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, self.config.batch_size.max(1)) => n,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = ending.cancelled() => 0,
            };
            if n == 0 {
                break;
            }
            let linger_until = tokio::time::Instant::now() + self.config.linger;
            while batch.len() < self.config.batch_size {
                let room = self.config.batch_size - batch.len();
                let more = rx.recv_many(&mut batch, room);
                match tokio::time::timeout_at(linger_until, more).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            self.store_batch(std::mem::take(&mut batch), ending, None)
                .await;
        }

        rx.close();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let mut rest = Vec::new();
        if lost.is_cancelled() {
            // No longer the leader: store nothing more. Dropped handlers are
            // nacked, so Pub/Sub redelivers at once, to the next leader.
            let mut dropped = 0;
            while rx.recv_many(&mut rest, self.config.batch_size.max(1)).await > 0 {
                dropped += rest.len();
                rest.clear();
            }
            warn!(
                dropped,
                "leadership lost: stopped pulling; what was received but not stored will be redelivered"
            );
        } else {
            // Shutdown: store what was already received, within the timeout.
            while rx.recv_many(&mut rest, self.config.batch_size.max(1)).await > 0 {
                if Instant::now() < deadline {
                    self.store_batch(std::mem::take(&mut rest), ending, Some(deadline))
                        .await;
                } else {
                    rest.clear(); // dropped handlers are nacked: redelivered later
                }
            }
        }
        drop(rx);
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        for puller in pullers {
            if tokio::time::timeout(left, puller).await.is_err() {
                warn!("a streaming pull did not close in time");
            }
        }
        info!("inbox stopped");
    }

    /// Stores a batch (retrying database failures) and acknowledges it.
    /// While stopping, gives up at `deadline`: the messages are nacked and
    /// Pub/Sub redelivers them.
    async fn store_batch(
        &self,
        batch: Vec<Delivery>,
        stop: &CancellationToken,
        deadline: Option<Instant>,
    ) {
        if batch.is_empty() {
            return;
        }
        let span = info_span!(
            "batch",
            messages = batch.len(),
            first = %message::dedup_key(&batch[0].message)
        );
        async {
            let prepared: Vec<Prepared> =
                batch.iter().map(|d| prepare(&d.message)).collect();
            // One span per sampled message, ended when it is acknowledged.
            let traced: Vec<tracing::Span> = prepared
                .iter()
                .filter_map(Prepared::row)
                .filter_map(|row| {
                    crate::trace::receive_span(
                        &self.config.subscription,
                        &row.pubsub_message_id,
                        &row.message_id,
                        row.trace.as_ref(),
                    )
                })
                .collect();
            let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
            loop {
                match self.try_store(&prepared).await {
                    Ok(outcome) => {
                        self.health.ok(Component::Database);
                        self.record(&batch, &prepared, outcome);
                        for delivery in batch {
                            delivery.handler.ack();
                        }
                        drop(traced);
                        return;
                    }
                    Err(e) => {
                        self.health.heartbeat();
                        self.metrics.db_errors.inc();
                        if matches!(e, sqlx::Error::PoolTimedOut) {
                            self.metrics.pool_timeouts.inc();
                        }
                        self.health
                            .failing(Component::Database, format!("store failed: {e}"));
                        warn!(error = %e, "storing the batch failed; will retry");
                    }
                }
                let delay = backoff.next_delay();
                let give_up = match deadline {
                    Some(at) => Instant::now() + delay >= at,
                    None => false,
                };
                if give_up {
                    warn!("shutdown timeout reached; the batch will be redelivered");
                    return;
                }
                if deadline.is_none() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = stop.cancelled() => {
                            // Stopping: one last attempt happens in the drain.
                            warn!("stopping during a database outage; the batch will be redelivered");
                            return;
                        }
                    }
                } else {
                    tokio::time::sleep(delay).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One transaction for the batch. A data error (the database refusing a
    /// value we did not foresee) falls back to one savepoint per message.
    async fn try_store(&self, prepared: &[Prepared]) -> Result<Stored, sqlx::Error> {
        let subscription = self.config.subscription.to_string();
        let good: Vec<&InboxRow> = prepared.iter().filter_map(Prepared::row).collect();
        let dead: Vec<&DeadRow> = prepared.iter().filter_map(Prepared::dead).collect();
        let mut tx = self.pool.begin().await?;
        let stored = match self.store.insert(&mut tx, &subscription, &good).await {
            Ok(n) => n,
            Err(e) if refuses_message(&e) => {
                warn!(error = %e, "the batch was refused; storing it message by message");
                tx.rollback().await?;
                return self.store_one_by_one(&subscription, &good, &dead).await;
            }
            Err(e) => return Err(e),
        };
        self.store
            .insert_dead(&mut tx, &subscription, &dead)
            .await?;
        tx.commit().await?;
        Ok(Stored {
            stored,
            duplicates: good.len() - stored,
            dead: dead.len(),
        })
    }

    async fn store_one_by_one(
        &self,
        subscription: &str,
        good: &[&InboxRow],
        dead: &[&DeadRow],
    ) -> Result<Stored, sqlx::Error> {
        use sqlx::Acquire;
        let mut tx = self.pool.begin().await?;
        let mut refused = Vec::new();
        let mut stored = 0;
        for row in good {
            let mut savepoint = tx.begin().await?;
            match self
                .store
                .insert(&mut savepoint, subscription, &[row])
                .await
            {
                Ok(n) => {
                    savepoint.commit().await?;
                    stored += n;
                }
                Err(e) if refuses_message(&e) => {
                    savepoint.rollback().await?;
                    refused.push(message::dead_from_row(
                        row,
                        format!("refused by PostgreSQL: {e}"),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let all_dead: Vec<&DeadRow> = dead.iter().copied().chain(refused.iter()).collect();
        self.store
            .insert_dead(&mut tx, subscription, &all_dead)
            .await?;
        tx.commit().await?;
        Ok(Stored {
            stored,
            duplicates: good.len() - stored - refused.len(),
            dead: all_dead.len(),
        })
    }

    /// Metrics and logs for a committed batch.
    fn record(&self, batch: &[Delivery], prepared: &[Prepared], s: Stored) {
        self.metrics.batch_size.observe(batch.len() as f64);
        self.metrics.stored.inc_by(s.stored as u64);
        self.metrics.duplicates.inc_by(s.duplicates as u64);
        self.metrics.dead_lettered.inc_by(s.dead as u64);
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        for row in prepared.iter().filter_map(Prepared::row) {
            if let Some(at) = row.published_at_us {
                self.metrics
                    .latency
                    .observe((now_us - at).max(0) as f64 / 1e6);
            }
        }
        for dead in prepared.iter().filter_map(Prepared::dead) {
            warn!(message_id = %dead.message_id, error = %dead.error, "recorded in the dead-letter table");
        }
        if s.duplicates > 0 {
            debug!(duplicates = s.duplicates, "duplicates acknowledged");
        }
        debug!(
            stored = s.stored,
            duplicates = s.duplicates,
            dead = s.dead,
            "batch committed"
        );
    }

    /// Waits until the tables exist with the expected columns.
    async fn wait_for_tables(&self, stop: &CancellationToken) {
        let retry = (self.config.retry_min, self.config.retry_max);
        let check = || self.store.check_shape(&self.pool);
        crate::db::wait_until_usable("inbox table", check, &self.health, retry, stop).await;
    }
}
