//! Proof of leadership, checked at every claim.
//!
//! An elector learns that it lost its lock only at its next renewal, up to a
//! retry period later; meanwhile a standby may already lead. So the relay
//! does not trust the elector's last word: inside each claiming transaction,
//! after it entered the claim gate (a shared advisory lock) and before it
//! locks any row, it checks that this replica still leads. If the check
//! passes, a new leader, which closes the gate exclusively before its first
//! claim, waits for this claim to end; if it fails, the claim rolls back
//! having locked and published nothing.

use sqlx::postgres::PgConnection;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the relay checks before publishing a claim.
#[derive(Clone, Debug)]
pub enum Fence {
    /// No election (`--leader-election none`): a single instance.
    Unfenced,
    /// PostgreSQL: the advisory lock `key` is held by the lock session
    /// (`pid`, started at `backend_start`; both, because a pid can be
    /// reused by a later session).
    AdvisoryLock {
        key: i64,
        pid: i32,
        backend_start: chrono::DateTime<chrono::Utc>,
    },
    /// Kubernetes: the Lease was renewed recently enough.
    Lease(Arc<LeaseValidity>),
}

impl Fence {
    /// Whether this replica still leads, checked on `conn` (the claiming
    /// transaction, inside the claim gate).
    pub async fn holds(&self, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
        match self {
            Fence::Unfenced => Ok(true),
            Fence::Lease(validity) => Ok(validity.valid()),
            Fence::AdvisoryLock {
                key,
                pid,
                backend_start,
            } => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $2 \
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND l.classid = ($1 >> 32)::oid AND l.objid = ($1 & 4294967295)::oid \
                       AND l.objsubid = 1 AND a.backend_start = $3)",
                )
                .bind(key)
                .bind(pid)
                .bind(backend_start)
                .fetch_one(conn)
                .await
            }
        }
    }
}

/// Until when a Lease holder may consider itself the leader: the instant it
/// *sent* its last successful renewal, plus the renew deadline. Measured
/// from the request, not the answer, so a slow API server cannot stretch it.
#[derive(Debug)]
pub struct LeaseValidity {
    until: Mutex<Instant>,
}

impl LeaseValidity {
    /// Valid for `renew_deadline` from `sent`.
    pub fn new(sent: Instant, renew_deadline: Duration) -> Self {
        LeaseValidity {
            until: Mutex::new(sent + renew_deadline),
        }
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&self, sent: Instant, renew_deadline: Duration) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        *until = (*until).max(sent + renew_deadline);
    }

    /// Whether the renew deadline has not passed.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long until the renew deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_validity_counts_from_the_request() {
        let sent = Instant::now() - Duration::from_millis(800);
        let validity = LeaseValidity::new(sent, Duration::from_secs(1));
        assert!(validity.valid());
        assert!(validity.remaining() <= Duration::from_millis(200));
        validity.renewed(sent - Duration::from_secs(5), Duration::from_secs(1));
        assert!(validity.valid(), "an older renewal does not shorten it");
        let expired = LeaseValidity::new(
            Instant::now() - Duration::from_secs(2),
            Duration::from_secs(1),
        );
        assert!(!expired.valid());
    }
}
