//! Pure computation of a relay's status (either kind) from what the cluster reports.
//!
//! Input: the relay (for its generation, previous conditions and `stalledAfter`), the
//! worker Deployment and the Lease as read back from the API server (the Lease carries the
//! active worker's figures, see [`crate::report`]), an optional blocker found by reconcile
//! (invalid spec, missing Secret, name conflict, image not allowed), and the current time.
//! Output: the whole status. Keeping this free of I/O lets the condition logic be tested
//! exhaustively.
//!
//! `Ready` means messages flow, not only that pods run: it is `False` with reason `Stalled`
//! while rows wait and the active worker reports no progress for `stalledAfter` (counted
//! from its last progress, or from when it took the Lease if it made none since).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{Condition, WorkerStatus};
use crate::report::{self, Report, human_duration};
use crate::resources::selector_labels;
use crate::workload::Workload;

/// Condition type: at least one worker is ready and a worker holds the Lease.
pub const READY: &str = "Ready";
/// Condition type: a rollout of the worker Deployment is in progress.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something needs a human (bad spec, missing Secret, failing rollout).
pub const DEGRADED: &str = "Degraded";

/// A problem found by reconcile before anything was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    /// The spec breaks a validation rule; the message names the field.
    InvalidSpec(String),
    /// A referenced Secret does not exist.
    SecretNotFound(String),
    /// A referenced Secret exists but lacks the key.
    SecretKeyNotFound(String),
    /// An object the relay would own exists and belongs to someone else; it is left alone.
    NameConflict(String),
    /// `spec.image` is not the operator's worker image and not on its allowlist.
    ImageNotAllowed(String),
}

impl Blocker {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::InvalidSpec(_) => "InvalidSpec",
            Blocker::SecretNotFound(_) => "SecretNotFound",
            Blocker::SecretKeyNotFound(_) => "SecretKeyNotFound",
            Blocker::NameConflict(_) => "NameConflict",
            Blocker::ImageNotAllowed(_) => "ImageNotAllowed",
        }
    }
    /// The condition message.
    pub fn message(&self) -> &str {
        match self {
            Blocker::InvalidSpec(m)
            | Blocker::SecretNotFound(m)
            | Blocker::SecretKeyNotFound(m)
            | Blocker::NameConflict(m)
            | Blocker::ImageNotAllowed(m) => m,
        }
    }
}

/// The holder of `lease` if the Lease is still valid at `now` (renewed within its duration).
pub fn current_leader(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    (renewed + duration >= now).then_some(holder)
}

fn deployment_condition<'a>(
    deployment: &'a Deployment,
    type_: &str,
) -> Option<&'a k8s_openapi::api::apps::v1::DeploymentCondition> {
    deployment
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

struct Builder<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: String,
    out: Vec<Condition>,
}

impl Builder<'_> {
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        let status = if status { "True" } else { "False" };
        // Keep the transition time while the status does not change.
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        self.out.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
            last_transition_time,
            observed_generation: self.generation,
        });
    }
}

/// Why `Ready` is `False` with reason `Stalled`, or `None` when messages flow (or nothing
/// waits, or the figures are missing). `since` is when the term of the reporting worker
/// began (the Lease's acquire time).
pub fn stalled(
    report: &Report,
    since: Option<Timestamp>,
    stalled_after: std::time::Duration,
    progress: &str,
    now: Timestamp,
) -> Option<String> {
    let backlog = report.backlog.filter(|n| *n > 0)?;
    let last = match (report.last_progress, since) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    let quiet = now.duration_since(last);
    let quiet = std::time::Duration::try_from(quiet).unwrap_or_default();
    (quiet > stalled_after).then(|| {
        format!(
            "{backlog} rows wait and none was {progress} for {} (stalledAfter {})",
            human_duration(quiet),
            human_duration(stalled_after)
        )
    })
}

/// Computes the relay's status. `deployment` and `lease` are `None` when they do not exist
/// (yet); `blocker` is what stopped reconcile from applying the desired objects.
pub fn compute<W: Workload>(
    relay: &W,
    deployment: Option<&Deployment>,
    lease: Option<&Lease>,
    blocker: Option<&Blocker>,
    now: Timestamp,
) -> WorkerStatus {
    let generation = relay.meta().generation;
    let previous = relay
        .worker_status()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut b = Builder {
        previous,
        generation,
        now: now.to_string(),
        out: Vec::new(),
    };

    let dep_status = deployment.and_then(|d| d.status.as_ref());
    let replicas = dep_status
        .and_then(|s| s.replicas)
        .or(deployment.map(|_| 0));
    let ready_replicas = dep_status
        .and_then(|s| s.ready_replicas)
        .or(deployment.map(|_| 0));
    let leader = lease.and_then(|l| current_leader(l, now));
    let desired = relay.worker().replicas;
    // Figures count only while their reporter leads: a stale report says nothing.
    let report = lease
        .filter(|_| leader.is_some())
        .map(report::read)
        .unwrap_or_default();
    let term_start = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.acquire_time.as_ref())
        .map(|t| t.0);
    let stall = stalled(
        &report,
        term_start,
        relay.worker().stalled_after(),
        W::PROGRESS,
        now,
    );

    if let Some(blocker) = blocker {
        let (reason, message) = (blocker.reason(), blocker.message().to_owned());
        b.set(READY, false, reason, message.clone());
        b.set(PROGRESSING, false, reason, message.clone());
        b.set(DEGRADED, true, reason, message);
    } else if let Some(dep) = deployment {
        let status = dep.status.clone().unwrap_or_default();
        let observed = status.observed_generation.unwrap_or(0)
            >= dep.metadata.generation.unwrap_or(0)
            && status.observed_generation.is_some();
        let updated = status.updated_replicas.unwrap_or(0);
        let total = status.replicas.unwrap_or(0);
        let available = status.available_replicas.unwrap_or(0);
        let rolled_out = observed && updated >= desired && total == desired && available >= desired;
        let ready = status.ready_replicas.unwrap_or(0);

        let deadline = deployment_condition(dep, "Progressing").filter(|c| {
            c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        let failure = deployment_condition(dep, "ReplicaFailure").filter(|c| c.status == "True");

        if rolled_out {
            b.set(
                PROGRESSING,
                false,
                "RolloutComplete",
                format!("{updated}/{desired} replicas up to date"),
            );
        } else if deadline.is_some() {
            b.set(
                PROGRESSING,
                false,
                "ProgressDeadlineExceeded",
                "the worker rollout made no progress",
            );
        } else {
            b.set(
                PROGRESSING,
                true,
                "RollingOut",
                format!("{updated}/{desired} replicas updated, {available} available"),
            );
        }

        if let Some(c) = deadline {
            b.set(
                DEGRADED,
                true,
                "ProgressDeadlineExceeded",
                c.message.clone().unwrap_or_default(),
            );
        } else if let Some(c) = failure {
            b.set(
                DEGRADED,
                true,
                "ReplicaFailure",
                c.message.clone().unwrap_or_default(),
            );
        } else {
            b.set(DEGRADED, false, "AsExpected", "");
        }

        if desired == 0 {
            b.set(
                READY,
                false,
                "ScaledToZero",
                "spec.replicas is 0; nothing is relayed",
            );
        } else if ready == 0 {
            b.set(
                READY,
                false,
                "NoReadyReplicas",
                format!("0/{desired} worker replicas ready"),
            );
        } else if !relay.elects_leader() {
            b.set(
                READY,
                true,
                "AllConsuming",
                format!("{ready}/{desired} replicas ready, all consuming (no leader election)"),
            );
        } else if let Some(stall) = &stall {
            b.set(READY, false, "Stalled", stall.clone());
        } else if let Some(holder) = &leader {
            b.set(
                READY,
                true,
                "LeaderElected",
                format!(
                    "{ready}/{desired} replicas ready, {holder} is the active {}",
                    W::COMPONENT
                ),
            );
        } else {
            b.set(
                READY,
                false,
                "NoLeader",
                format!(
                    "{ready}/{desired} replicas ready, no worker holds Lease {}",
                    relay.lease_name()
                ),
            );
        }
    } else {
        b.set(
            PROGRESSING,
            true,
            "DeploymentPending",
            "waiting for the worker Deployment",
        );
        b.set(DEGRADED, false, "AsExpected", "");
        b.set(
            READY,
            false,
            "DeploymentPending",
            "waiting for the worker Deployment",
        );
    }

    // Stable order: Ready, Progressing, Degraded.
    let order = |t: &str| [READY, PROGRESSING, DEGRADED].iter().position(|x| *x == t);
    b.out.sort_by_key(|c| order(&c.type_));

    let selector = selector_labels(relay)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    WorkerStatus {
        observed_generation: generation,
        replicas,
        ready_replicas,
        selector: Some(selector),
        leader,
        backlog: report.backlog,
        oldest_pending_age: report.oldest_pending_age.map(human_duration),
        messages_total: report.messages_total,
        dead_letters: report.dead_letters,
        last_progress_time: report.last_progress.map(|t| t.to_string()),
        paused_keys: report.paused_keys,
        parked_rows: report.parked_rows,
        report_time: report.report_time.map(|t| t.to_string()),
        conditions: b.out,
    }
}

/// The named condition of a status, for callers and tests.
pub fn condition<'a>(status: &'a WorkerStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Whether status says the relay is Ready (used to pick the requeue interval).
pub fn is_ready(status: &WorkerStatus) -> bool {
    condition(status, READY).is_some_and(|c| c.status == "True")
}
