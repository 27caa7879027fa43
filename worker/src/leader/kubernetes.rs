//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! semantics.
//!
//! Why not a crate: `kube-lease-manager` (the maintained option for kube 5)
//! keeps reporting leadership while renewals fail, with no renew deadline, so
//! a cut-off leader would keep publishing after its lease expired. This module
//! is the small part we need, tested against a stand-in API server that
//! rejects stale writes (`tests/lease.rs`).
//!
//! - Writes carry the `resourceVersion` that was read, so two candidates racing
//!   for one Lease cannot both win: the API server answers 409 to the loser.
//! - Expiry is judged by the candidate's own clock: a Lease is expired when its
//!   record (holder, renew time) has not changed for `lease_duration` since this
//!   candidate first saw it, which tolerates clock skew between nodes.
//! - The leader gives up when it has not renewed for `renew_deadline`, before
//!   anyone can consider the Lease expired. The deadline counts from when
//!   the last successful renewal was *sent*, so a slow API server cannot
//!   stretch it past the lease; the relay checks it at every claim
//!   ([`Fence::Lease`]).
//! - On release the holder is cleared, so a standby acquires at its next retry.
//! - Every write starts from the Lease as read, so labels, annotations and
//!   owner references written by others survive. Optionally the holder
//!   makes sure the Lease names an owner (so it is garbage-collected with
//!   it) and writes a status report as annotations in the same write
//!   ([`Report`]; what the report says is the caller's business).

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Fence, Leadership, LeaseValidity, Timings};

/// Annotations the holder writes on the Lease with every acquisition and
/// renewal.
#[derive(Clone)]
pub struct Report {
    /// Every key a report may hold. A key missing from this write's report
    /// (a figure not known at the moment) is removed from the Lease, so a
    /// stale value does not linger; annotations under other keys are left
    /// alone.
    pub keys: Vec<String>,
    /// Builds the annotations; called once per write.
    pub source: Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>,
}

impl Report {
    /// Puts this report into `annotations`, leaving foreign keys alone.
    fn apply(&self, annotations: &mut BTreeMap<String, String>) {
        let mut report = (self.source)();
        report.retain(|key, _| self.keys.contains(key));
        annotations.retain(|key, _| !self.keys.contains(key));
        annotations.extend(report);
    }
}

/// Elects a leader through one Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    /// Added to the Lease's owner references when missing.
    owner: Option<OwnerReference>,
    /// Written with every acquisition and renewal.
    report: Option<Report>,
    /// The last Lease record seen, and when it was first seen by us.
    observed: Option<(Record, Instant)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<Timestamp>,
    transitions: i32,
}

/// What one acquire-or-renew attempt found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Holding,
    /// Someone else holds an unexpired Lease, or won the race.
    HeldByOther(String),
    /// Our renewal met a write in between (409): perhaps someone else's
    /// label or annotation. Not a loss by itself: nobody can take over
    /// before our renew deadline has passed, so the leader keeps leading
    /// and tries again at the next retry, and steps down only at the renew
    /// deadline or on seeing another holder.
    Conflict,
}

impl LeaseElector {
    /// `api` is namespaced to where the Lease lives.
    pub fn new(api: Api<Lease>, name: String, identity: String, timings: Timings) -> Self {
        LeaseElector {
            api,
            name,
            identity,
            timings,
            owner: None,
            report: None,
            observed: None,
        }
    }

    /// The holder makes sure the Lease names `owner` among its owner
    /// references (set on create, added on a later write if missing), so
    /// the Lease is garbage-collected with its owner. Not a controller
    /// reference and without `blockOwnerDeletion`: the Lease is only a
    /// dependent, and the holder needs no permission on the owner.
    pub fn with_owner(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner.map(|mut owner| {
            owner.controller = Some(false);
            owner.block_owner_deletion = None;
            owner
        });
        self
    }

    /// The holder writes `report` into the Lease's annotations with every
    /// acquisition and renewal, in the same write.
    pub fn with_report(mut self, report: Report) -> Self {
        self.report = Some(report);
        self
    }

    /// Our additions to the Lease's metadata, on top of what was read.
    fn stamp(&self, metadata: &mut ObjectMeta) {
        if let Some(owner) = &self.owner {
            let references = metadata.owner_references.get_or_insert_with(Vec::new);
            if !references.iter().any(|r| r.uid == owner.uid) {
                references.push(owner.clone());
            }
        }
        if let Some(report) = &self.report {
            report.apply(metadata.annotations.get_or_insert_with(BTreeMap::new));
        }
    }

    /// Runs the election until `release` is cancelled, then releases.
    pub fn spawn(self, release: CancellationToken) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.run(tx, release));
        (rx, task)
    }

    async fn run(mut self, tx: watch::Sender<Option<Fence>>, release: CancellationToken) {
        let deadline = self.timings.renew_deadline;
        // While leading: until when this term is valid.
        let mut term: Option<Arc<LeaseValidity>> = None;
        loop {
            // A renewal counts from when it was sent, not from its answer.
            let sent = Instant::now();
            let attempt = match &term {
                Some(validity) => {
                    tokio::time::timeout(validity.remaining(), self.try_acquire_or_renew())
                        .await
                        .unwrap_or_else(|_| Err(kube::Error::Service("renewal timed out".into())))
                }
                None => self.try_acquire_or_renew().await,
            };
            match attempt {
                Ok(Attempt::Holding) => match &term {
                    Some(validity) => validity.renewed(sent, deadline),
                    None => {
                        info!(identity = %self.identity, lease = %self.name, "became leader (Lease acquired)");
                        let validity = Arc::new(LeaseValidity::new(sent, deadline));
                        let _ = tx.send(Some(Fence::Lease(validity.clone())));
                        term = Some(validity);
                    }
                },
                Ok(Attempt::Conflict) => {
                    debug!(identity = %self.identity, "the Lease changed while renewing it; retrying")
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    if term.take().is_some() {
                        warn!(identity = %self.identity, %holder, "lost leadership: the Lease was taken over");
                        let _ = tx.send(None);
                    }
                }
                Err(e) => debug!(error = %e, "Lease request failed"),
            }
            if term.as_ref().is_some_and(|validity| !validity.valid()) {
                term = None;
                warn!(identity = %self.identity, "lost leadership: could not renew the Lease within the renew deadline");
                let _ = tx.send(None);
            }
            // Wake at the renew deadline at the latest, to step down on time.
            let pause = match &term {
                Some(validity) => self.timings.retry_period.min(validity.remaining()),
                None => self.timings.retry_period,
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {},
                _ = release.cancelled() => break,
            }
        }
        let _ = tx.send(None);
        if term.is_some() {
            match tokio::time::timeout(Duration::from_secs(2), self.release()).await {
                Ok(Ok(())) => info!(identity = %self.identity, "released the Lease"),
                Ok(Err(e)) => {
                    warn!(error = %e, "could not release the Lease; it expires by itself")
                }
                Err(_) => warn!("releasing the Lease timed out; it expires by itself"),
            }
        }
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn record(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.unwrap_or_default(),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }

    /// One step of the protocol: create, take over an expired or free Lease,
    /// or renew our own.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let duration_seconds = self.timings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let mut metadata = ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            };
            self.stamp(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Holding),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldByOther(String::new()))
                }
                Err(e) => Err(e),
            };
        };

        let record = Self::record(&lease);
        let now = Instant::now();
        let first_seen = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => now,
        };
        self.observed = Some((record.clone(), first_seen));
        let ours = record.holder == self.identity;
        let free = record.holder.is_empty();
        let expired = now.duration_since(first_seen) >= self.timings.lease_duration;
        if !ours && !free && !expired {
            return Ok(Attempt::HeldByOther(record.holder));
        }

        let mut spec = lease.spec.take().unwrap_or_default();
        if !ours {
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(record.transitions + if free { 0 } else { 1 });
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(Self::now());
        lease.spec = Some(spec);
        self.stamp(&mut lease.metadata);
        // `lease.metadata.resource_version` is the one we read: a concurrent
        // writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observed = Some((Self::record(&updated), Instant::now()));
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(e)) if e.code == 409 && ours => Ok(Attempt::Conflict),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther(String::new())),
            Err(e) => Err(e),
        }
    }

    /// Clears the holder if it is still us, so a standby need not wait for
    /// expiry.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}
