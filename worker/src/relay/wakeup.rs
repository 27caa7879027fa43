//! Waking the relay when rows commit, with a slow poll as the safety net.
//!
//! The migration installs a statement-level trigger that sends
//! `NOTIFY outbox_relay, '<schema>.<table>'`; PostgreSQL delivers it at commit,
//! so the relay claims within milliseconds instead of waiting for a tick. A
//! notification can be missed while the listening connection is down, which is
//! why the poll stays.

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::time::Duration;

/// The channel the migration's trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// Waits for "there may be new rows".
pub struct Wakeup {
    pool: PgPool,
    listener: Option<PgListener>,
    poll_interval: Duration,
}

impl Wakeup {
    /// Listening starts lazily, so a dead database does not stop start-up.
    pub fn new(pool: PgPool, poll_interval: Duration) -> Self {
        Wakeup {
            pool,
            listener: None,
            poll_interval,
        }
    }

    /// Returns when a notification arrives, or at the latest after the poll
    /// interval (or sooner if the listening connection is lost, since a
    /// notification may have been missed).
    pub async fn wait(&mut self) {
        if self.listener.is_none() {
            match self.connect().await {
                Ok(listener) => self.listener = Some(listener),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot listen for notifications; polling");
                    tokio::time::sleep(self.poll_interval).await;
                    return;
                }
            }
        }
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        // Fold notifications that arrived while we were busy into this one.
        let mut drained = false;
        while listener.next_buffered().is_some() {
            drained = true;
        }
        if drained {
            return;
        }
        match tokio::time::timeout(self.poll_interval, listener.try_recv()).await {
            Err(_elapsed) => {}
            Ok(Ok(Some(_notification))) => {}
            Ok(Ok(None)) => {
                tracing::debug!("notification connection lost; will reconnect");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "notification connection failed; will reconnect");
                self.listener = None;
            }
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }
}
