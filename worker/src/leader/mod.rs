//! Leader election: exactly one replica of a relay publishes at a time, and
//! one replica of an inbox worker pulls.
//!
//! Every backend follows the same contract, modelled on client-go's leader
//! election:
//!
//! - A candidate becomes leader when it acquires the lock, and reports it on a
//!   `watch` channel ([`Leadership`]).
//! - The leader renews every `retry_period`. If it cannot confirm its
//!   leadership for `renew_deadline`, it reports `false` at once, so the relay
//!   stops claiming *before* anyone else can acquire the lock (which needs
//!   `lease_duration` > `renew_deadline` to pass without a renewal).
//! - On shutdown the leader releases the lock immediately, so a rolling update
//!   hands over without waiting for expiry.
//! - Leadership comes with a [`Fence`]: the relay checks it inside every
//!   claiming transaction, after the claim's row locks, and claims nothing
//!   unless this replica still leads at that moment. A new leader waits for
//!   the row locks of claims that passed the check before (see
//!   `Relay::wait_for_previous_claims`), so two relays never hold claims at
//!   once, however late the elector's own renewal notices a loss.
//!
//! Backends: [`kubernetes`] (a `coordination.k8s.io/v1` Lease), [`postgres`]
//! (a session-level advisory lock on a dedicated connection) and `none`.

mod fence;
pub mod kubernetes;
pub mod postgres;

pub use fence::{Fence, LeaseValidity};

use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which lock decides leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A Kubernetes Lease (the default inside a cluster).
    Kubernetes,
    /// A PostgreSQL advisory lock (the default elsewhere; no extra permissions).
    Postgres,
    /// No election: every replica works at once. A relay must then run as
    /// a single instance; inbox workers all pull, which is only safe for an
    /// unordered subscription.
    None,
}

impl Backend {
    /// `kubernetes` inside a pod (the service account is mounted), otherwise
    /// `postgres`.
    pub fn detect() -> Backend {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            Backend::Kubernetes
        } else {
            Backend::Postgres
        }
    }
}

/// Timings shared by the backends (client-go's names and defaults).
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a lock stays valid without renewal; others wait this long.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a confirmed renewal.
    pub renew_deadline: Duration,
    /// Time between renewals and between acquisition attempts.
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Why the timings cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingsError {
    #[error(
        "renew deadline ({renew:?}) must be shorter than the lease duration ({lease:?}), or two replicas could lead at once"
    )]
    DeadlineNotBeforeExpiry { renew: Duration, lease: Duration },
    #[error("retry period ({retry:?}) must be shorter than the renew deadline ({renew:?})")]
    RetryNotBeforeDeadline { retry: Duration, renew: Duration },
}

impl Timings {
    /// Checks the ordering that makes the election safe.
    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.renew_deadline >= self.lease_duration {
            return Err(TimingsError::DeadlineNotBeforeExpiry {
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(TimingsError::RetryNotBeforeDeadline {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// The receiving side: `Some(fence)` while this replica leads.
pub type Leadership = watch::Receiver<Option<Fence>>;

/// Leadership that never changes (backend `none`).
pub fn always_leader() -> (watch::Sender<Option<Fence>>, Leadership) {
    watch::channel(Some(Fence::Unfenced))
}

/// Waits until this replica leads and returns the fence of the term; `None`
/// if `stop` came first or the elector stopped.
pub async fn wait_until_leading(
    leadership: &mut Leadership,
    stop: &CancellationToken,
) -> Option<Fence> {
    tokio::select! {
        result = leadership.wait_for(Option::is_some) => result.ok().and_then(|fence| fence.clone()),
        _ = stop.cancelled() => None,
    }
}

/// A token cancelled when leadership is lost (or the elector stops).
pub fn lost_token(mut leadership: Leadership) -> CancellationToken {
    let token = CancellationToken::new();
    let lost = token.clone();
    tokio::spawn(async move {
        let _ = leadership.wait_for(Option::is_none).await;
        lost.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_must_be_ordered() {
        assert!(Timings::default().validate().is_ok());
        let t = Timings {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert!(matches!(
            t.validate(),
            Err(TimingsError::DeadlineNotBeforeExpiry { .. })
        ));
        let t = Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_secs(2),
        };
        assert!(matches!(
            t.validate(),
            Err(TimingsError::RetryNotBeforeDeadline { .. })
        ));
    }
}
