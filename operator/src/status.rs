//! Pure computation of an `OutboxRelay`'s status from what the cluster reports.
//!
//! Input: the relay (for its generation and previous conditions), the worker Deployment and
//! the Lease as read back from the API server, an optional blocker found by reconcile
//! (invalid spec, missing Secret), and the current time. Output: the whole status. Keeping
//! this free of I/O lets the condition logic be tested exhaustively.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::crd::{Condition, OutboxRelay, OutboxRelayStatus};

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
}

impl Blocker {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocker::InvalidSpec(_) => "InvalidSpec",
            Blocker::SecretNotFound(_) => "SecretNotFound",
            Blocker::SecretKeyNotFound(_) => "SecretKeyNotFound",
        }
    }
    /// The condition message.
    pub fn message(&self) -> &str {
        match self {
            Blocker::InvalidSpec(m)
            | Blocker::SecretNotFound(m)
            | Blocker::SecretKeyNotFound(m) => m,
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

/// Computes the relay's status. `deployment` and `lease` are `None` when they do not exist
/// (yet); `blocker` is what stopped reconcile from applying the desired objects.
pub fn compute(
    relay: &OutboxRelay,
    deployment: Option<&Deployment>,
    lease: Option<&Lease>,
    blocker: Option<&Blocker>,
    now: Timestamp,
) -> OutboxRelayStatus {
    let generation = relay.metadata.generation;
    let previous = relay
        .status
        .as_ref()
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
    let desired = relay.spec.replicas;

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
        } else if let Some(holder) = &leader {
            b.set(
                READY,
                true,
                "LeaderElected",
                format!("{ready}/{desired} replicas ready, {holder} is relaying"),
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

    OutboxRelayStatus {
        observed_generation: generation,
        replicas,
        ready_replicas,
        leader,
        conditions: b.out,
    }
}

/// The named condition of a status, for callers and tests.
pub fn condition<'a>(status: &'a OutboxRelayStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Whether status says the relay is Ready (used to pick the requeue interval).
pub fn is_ready(status: &OutboxRelayStatus) -> bool {
    condition(status, READY).is_some_and(|c| c.status == "True")
}

/// Name of the relay a status is about, for log lines.
pub fn describe(relay: &OutboxRelay) -> String {
    format!(
        "{}/{}",
        relay.namespace().unwrap_or_default(),
        relay.name_any()
    )
}
