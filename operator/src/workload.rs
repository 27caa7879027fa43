//! What the operator needs to know about a kind of relay, so that one translation, one
//! status computation and one reconcile serve both `OutboxRelay` and `InboxRelay`.
//!
//! Each kind says which worker subcommand its pods run, how its objects are named and
//! labelled, the environment only it sets, and borrows out the fields both kinds share
//! ([`WorkerSpec`]). Everything else (ServiceAccount, Role, Deployment, PDB, status,
//! ownership checks) is written once, generic over this trait.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::EnvVar;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{InvalidSpec, WorkerSpec, WorkerStatus};

/// A kind of relay the operator runs as a Deployment of `outbox-worker`.
pub trait Workload:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The `outbox-worker` subcommand, the container's name and the
    /// `app.kubernetes.io/component` label (`relay`, `inbox`).
    const COMPONENT: &'static str;
    /// `app.kubernetes.io/name` of the pods: part of the Deployment's (immutable) selector,
    /// so that an OutboxRelay and an InboxRelay of one name never select each other's pods.
    const APP_NAME: &'static str;
    /// Appended to the resource's name to name the owned objects (so an OutboxRelay and an
    /// InboxRelay may share a name).
    const NAME_SUFFIX: &'static str;
    /// What the worker's progress is, for condition messages (`published`, `processed`).
    const PROGRESS: &'static str;
    /// The longest resource name: owned object names (name + suffix) stay within 63.
    const MAX_NAME: usize = 63 - Self::NAME_SUFFIX.len();

    /// The fields both kinds share.
    fn worker(&self) -> WorkerSpec<'_>;
    /// The current status, if any.
    fn worker_status(&self) -> Option<&WorkerStatus>;
    /// The same rules as the CRD schema (patterns, ranges, CEL).
    fn validate(&self) -> Result<(), InvalidSpec>;
    /// Environment only this kind sets (table, topic or subscription, batch sizes).
    fn worker_env(&self) -> Vec<EnvVar>;
    /// Whether the workers elect one active replica (`--leader-election kubernetes`).
    fn elects_leader(&self) -> bool;

    /// Name of every owned object (ServiceAccount, Role, RoleBinding, Deployment, PDB).
    fn object_name(&self) -> String {
        format!("{}{}", self.name_any(), Self::NAME_SUFFIX)
    }

    /// Name of the Lease the workers compete for and report their figures on.
    fn lease_name(&self) -> String {
        self.worker()
            .leader_election
            .and_then(|le| le.lease_name.clone())
            .unwrap_or_else(|| self.object_name())
    }

    /// `Kind namespace/name`, for log lines and messages.
    fn describe(&self) -> String {
        format!(
            "{} {}/{}",
            Self::kind(&()),
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }
}
