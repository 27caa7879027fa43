//! Waking the relay when rows commit, with a slow poll as the safety net.
//!
//! The migration installs a statement-level trigger that sends
//! `NOTIFY outbox_relay, '<schema>.<table>'`; PostgreSQL delivers it at
//! commit, so the relay claims within milliseconds instead of waiting for a
//! tick.
//!
//! A listening task reads every notification as it arrives, whatever the
//! relay is doing, and folds them into one pending wake-up. It must: the
//! server writes notifications to the listening connection, and a client
//! that stops reading lets the socket fill; the server's backend then blocks
//! (`wait_event = ClientWrite`) and the cluster-wide NOTIFY queue grows until
//! every transaction that notifies fails ("too many notifications in the
//! NOTIFY queue"). A busy relay never idles, so reading only while idle is
//! not enough.
//!
//! A notification can be missed while the listening connection is down,
//! which is why the poll stays, and why a reconnect counts as a wake-up.

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The channel the migration's trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// "There may be new rows": notifications folded into one pending wake-up.
pub struct Wakeup {
    pending: Arc<Notify>,
    poll_interval: Duration,
    listener: JoinHandle<()>,
}

impl Wakeup {
    /// Starts listening in the background (connecting lazily, so a dead
    /// database does not stop start-up).
    pub fn start(pool: PgPool, poll_interval: Duration) -> Self {
        let pending = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(pool, pending.clone(), poll_interval));
        Wakeup {
            pending,
            poll_interval,
            listener,
        }
    }

    /// Returns at once if a notification arrived since the last call,
    /// otherwise when one arrives, or after the poll interval (or `at_most`,
    /// if sooner).
    pub async fn wait(&self, at_most: Option<Duration>) {
        let timeout = at_most.map_or(self.poll_interval, |d| d.min(self.poll_interval));
        let _ = tokio::time::timeout(timeout, self.pending.notified()).await;
    }
}

impl Drop for Wakeup {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Reads notifications until aborted, reconnecting after failures.
async fn listen(pool: PgPool, pending: Arc<Notify>, retry: Duration) {
    loop {
        let mut listener = match connect(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for notifications; polling");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        // Rows may have committed while nobody listened.
        pending.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_notification)) => pending.notify_one(),
                // The connection was lost; the next call reconnects.
                Ok(None) => {
                    tracing::debug!("notification connection lost; reconnecting");
                    pending.notify_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "notification connection failed; reconnecting");
                    pending.notify_one();
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
