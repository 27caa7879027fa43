//! Leader election on a PostgreSQL advisory lock.
//!
//! The lock is session-level and held on a dedicated connection: if the
//! connection dies, so does leadership. The key is derived from the table's
//! OID (the outbox table for a relay, the inbox table for an inbox worker)
//! and a high half per kind of worker ([`LockSpace`]), so relays of
//! different tables never contend, a relay and an inbox worker on one
//! database never share a lock, and no extra permission is needed.
//!
//! Timings map onto PostgreSQL like this:
//! - **retry period**: the leader confirms its session with a round trip.
//! - **renew deadline**: without a confirmed round trip for this long, the
//!   leader reports that it lost leadership and stops claiming.
//! - **lease duration**: the lock session runs with `idle_session_timeout` set
//!   to it, so the server ends the session of a leader that went silent (a
//!   network partition without RST) and frees the lock for a standby.
//!
//! Candidates wait in `pg_advisory_lock` (bounded by `lock_timeout`), so they
//! take over the moment the lock is released: within milliseconds after a
//! graceful shutdown or a crash that closes the socket.

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Fence, Leadership, Timings};
use crate::ident::TableName;

/// Which workers contend for the lock: the high half of the advisory lock
/// key (the low half is the table's OID). The relay's claim gate uses "obc"
/// (`relay::store`), so the three never meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockSpace {
    /// The relays of one outbox table ("obr" for OutboxRelay).
    Relay,
    /// The inbox workers of one inbox table ("obi" for OutBox Inbox).
    Inbox,
}

impl LockSpace {
    fn high_half(self) -> i64 {
        match self {
            LockSpace::Relay => 0x6f_62_72,
            LockSpace::Inbox => 0x6f_62_69,
        }
    }
}

/// Elects a leader among the workers of one table.
pub struct PgElector {
    options: PgConnectOptions,
    table: TableName,
    space: LockSpace,
    timings: Timings,
    identity: String,
}

impl PgElector {
    /// `options` are the worker's connection options; a separate connection
    /// is opened for the lock. `table` is the outbox table (`space` Relay)
    /// or the inbox table (`space` Inbox).
    pub fn new(
        options: PgConnectOptions,
        table: TableName,
        space: LockSpace,
        timings: Timings,
        identity: String,
    ) -> Self {
        PgElector {
            options,
            table,
            space,
            timings,
            identity,
        }
    }

    /// Runs the election until `release` is cancelled, then releases the lock.
    pub fn spawn(self, release: CancellationToken) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.run(tx, release));
        (rx, task)
    }

    async fn run(self, tx: watch::Sender<Option<Fence>>, release: CancellationToken) {
        while !release.is_cancelled() {
            match self.acquire(&release).await {
                Ok(Some((conn, key, fence))) => {
                    info!(identity = %self.identity, table = %self.table, "became leader (advisory lock acquired)");
                    let _ = tx.send(Some(fence));
                    let released = self.lead(conn, key, &release).await;
                    let _ = tx.send(None);
                    if released {
                        info!(identity = %self.identity, "released leadership");
                        return;
                    }
                    warn!(identity = %self.identity, "lost leadership: the lock connection could not be confirmed within the renew deadline");
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, "leader election: cannot reach the database; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(self.timings.retry_period) => {},
                        _ = release.cancelled() => {},
                    }
                }
            }
        }
        let _ = tx.send(None);
    }

    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let lease_ms = self.timings.lease_duration.as_millis().to_string();
        let options = self
            .options
            .clone()
            .application_name(&format!("outbox-worker leader {}", self.identity))
            .options([
                // The server ends a leader's session that stops confirming itself.
                ("idle_session_timeout", lease_ms.as_str()),
                // Candidates wait for the lock at most this long per attempt.
                ("lock_timeout", lease_ms.as_str()),
            ])
            .disable_statement_logging();
        tokio::time::timeout(self.timings.renew_deadline, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    /// Waits for the lock. `Ok(None)`: an attempt timed out (try again).
    /// On success, the fence names the lock and the session holding it.
    async fn acquire(
        &self,
        release: &CancellationToken,
    ) -> Result<Option<(PgConnection, i64, Fence)>, sqlx::Error> {
        let mut conn = self.connect().await?;
        let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::bigint")
            .bind(self.table.quoted())
            .fetch_one(&mut conn)
            .await?;
        let key = (self.space.high_half() << 32) | oid;
        // Bounded on the server by lock_timeout and here by a little more, in
        // case the connection itself went silent.
        let wait = self.timings.lease_duration + self.timings.retry_period;
        let attempt = sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut conn);
        let acquired = tokio::select! {
            result = tokio::time::timeout(wait, attempt) => match result {
                Ok(Ok(_)) => true,
                // 55P03: lock_timeout; someone else leads.
                Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("55P03") => false,
                Ok(Err(e)) => return Err(e),
                Err(_) => false,
            },
            // Dropping the connection withdraws the lock request.
            _ = release.cancelled() => false,
        };
        if !acquired {
            return Ok(None);
        }
        let (pid, backend_start) = sqlx::query_as(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await?;
        let fence = Fence::AdvisoryLock {
            key,
            pid,
            backend_start,
        };
        Ok(Some((conn, key, fence)))
    }

    /// Confirms the session every retry period. Returns `true` when released
    /// on request, `false` when leadership was lost.
    async fn lead(&self, mut conn: PgConnection, key: i64, release: &CancellationToken) -> bool {
        let mut confirmed = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.timings.retry_period) => {},
                _ = release.cancelled() => {
                    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut conn);
                    let _ = tokio::time::timeout(Duration::from_secs(1), unlock).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                    return true;
                }
            }
            let left = self
                .timings
                .renew_deadline
                .saturating_sub(confirmed.elapsed());
            // A confirmation counts from when it was asked for, not from the
            // answer: a slow answer must not stretch the renew deadline.
            let asked = Instant::now();
            let ping = sqlx::query("SELECT 1").execute(&mut conn);
            match tokio::time::timeout(left, ping).await {
                Ok(Ok(_)) => confirmed = asked,
                Ok(Err(e)) => {
                    warn!(error = %e, "leader lock connection failed");
                    return false;
                }
                Err(_) => return false,
            }
            if confirmed.elapsed() >= self.timings.renew_deadline {
                return false;
            }
        }
    }
}
