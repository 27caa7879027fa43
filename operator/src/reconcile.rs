//! The thin, effectful shell around [`crate::resources`] and [`crate::status`], generic
//! over the kind of relay ([`Workload`]).
//!
//! One reconcile: validate the spec and the image, read the referenced Secrets (to hash
//! them), make sure no object it would write belongs to someone else, apply the desired
//! objects with server-side apply under the `outbox-operator` field manager, read back the
//! Deployment and the worker's Lease (with the figures the active worker reports on it),
//! and write the status subresource. Deletion needs no code: every owned object carries a
//! controller owner reference, and the workers' Lease an owner reference, so the garbage
//! collector removes them with the relay.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::crd::{InboxRelay, OutboxRelay, SecretKeyRef, WorkerSpec, WorkerStatus};
use crate::metrics::Metrics;
use crate::resources::{self, DesiredError, MANAGER, Settings};
use crate::status::{self, Blocker};
use crate::workload::Workload;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "outbox-operator";
/// Resync of a Ready relay: how quickly a rotated Secret, new figures on the Lease and a
/// stall are noticed.
pub const RESYNC: Duration = Duration::from_secs(30);
/// Resync of a relay that is not Ready yet (rollout, leader election, missing Secret).
pub const RESYNC_NOT_READY: Duration = Duration::from_secs(15);

/// Why a reconcile failed; the controller requeues it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed (after retries for conflicts).
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// The relay lacks metadata the API server always sets.
    #[error(transparent)]
    Desired(#[from] DesiredError),
}

impl Error {
    /// Short class for the `reconcile_errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Desired(_) => "metadata",
        }
    }
}

/// How conflicting writes (HTTP 409) are retried inside one reconcile.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Delay before the first retry; grows linearly.
    pub delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 4,
            delay: Duration::from_millis(200),
        }
    }
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Operator-wide settings of the translation (default image).
    pub settings: Settings,
    /// Metrics to update.
    pub metrics: Arc<Metrics>,
    /// Event publisher.
    pub recorder: Recorder,
    /// Conflict retries.
    pub retry: RetryPolicy,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Builds a context; `instance` identifies this replica in Events (its pod name).
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance,
            },
        );
        Self {
            client,
            settings,
            metrics,
            recorder,
            retry: RetryPolicy::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self, key: &str, failed: bool) -> u32 {
        let mut map = match self.failures.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if failed {
            let n = map.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        } else {
            map.remove(key);
            0
        }
    }
}

/// Requeue delay after `failures` consecutive failures: 5s, 10s, 20s, ... capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(5u64 << exp).min(Duration::from_secs(300))
}

/// Hash of the referenced secret values, in a stable order. Only the referenced keys count,
/// so unrelated edits of a shared Secret do not roll the pods.
pub fn hash_secret_values(values: &[(&str, &str, &[u8])]) -> String {
    let mut hasher = Sha256::new();
    for (name, key, value) in values {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value);
    }
    let digest = hasher.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn secret_refs<'a>(spec: &WorkerSpec<'a>) -> Vec<(&'static str, &'a SecretKeyRef)> {
    let mut refs = vec![("spec.database.urlSecretRef", spec.url_secret_ref)];
    if let Some(r) = spec.credentials_secret_ref {
        refs.push(("spec.pubsub.credentialsSecretRef", r));
    }
    // Only when the workers use it: a disabled tracing section needs no Secret.
    if let Some(r) = spec
        .tracing
        .filter(|t| t.is_active())
        .and_then(|t| t.headers_secret_ref.as_ref())
    {
        refs.push(("spec.tracing.headersSecretRef", r));
    }
    refs
}

/// Reads the referenced Secrets and hashes their keys, or says which one is missing.
async fn secret_hash(
    client: &Client,
    namespace: &str,
    spec: &WorkerSpec<'_>,
) -> Result<Result<String, Blocker>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut values = Vec::new();
    for (field, r) in secret_refs(spec) {
        let Some(secret) = api.get_opt(&r.name).await? else {
            return Ok(Err(Blocker::SecretNotFound(format!(
                "{field}: Secret {namespace}/{} not found",
                r.name
            ))));
        };
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|v| v.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|v| v.clone().into_bytes())
            });
        let Some(value) = value else {
            return Ok(Err(Blocker::SecretKeyNotFound(format!(
                "{field}: Secret {namespace}/{} has no key {:?}",
                r.name, r.key
            ))));
        };
        values.push((r.name.clone(), r.key.clone(), value));
    }
    let borrowed: Vec<(&str, &str, &[u8])> = values
        .iter()
        .map(|(n, k, v)| (n.as_str(), k.as_str(), v.as_slice()))
        .collect();
    Ok(Ok(hash_secret_values(&borrowed)))
}

/// Server-side apply of `obj`, retrying conflicts (HTTP 409) a few times before giving the
/// error to the controller's backoff.
pub async fn apply<K>(api: &Api<K>, obj: &K, retry: RetryPolicy) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut attempt = 0;
    loop {
        match api.patch(&name, &params, &Patch::Apply(obj)).await {
            Ok(applied) => return Ok(applied),
            Err(kube::Error::Api(s)) if s.is_conflict() && attempt < retry.retries => {
                attempt += 1;
                debug!(%name, attempt, "conflict on apply, retrying");
                tokio::time::sleep(retry.delay * attempt).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes the status subresource (server-side apply, conflicts retried) unless unchanged.
async fn write_status<W: Workload>(
    ctx: &Context,
    relay: &W,
    namespace: &str,
    status: &WorkerStatus,
) -> Result<(), Error> {
    if relay.worker_status() == Some(status) {
        return Ok(());
    }
    let api: Api<W> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": W::api_version(&()),
        "kind": W::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = relay.name_any();
    let mut attempt = 0;
    loop {
        match api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() && attempt < ctx.retry.retries => {
                attempt += 1;
                tokio::time::sleep(ctx.retry.delay * attempt).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn publish<W: Workload>(
    ctx: &Context,
    relay: &W,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &relay.object_ref(&())).await {
        warn!(relay = %relay.describe(), error = %e, "could not publish event");
    }
}

/// Records a blocker: Warning Event plus status, leaving already-applied objects alone.
/// After a name conflict the same-named Deployment and Lease are someone else's: status
/// does not read them.
async fn block<W: Workload>(
    ctx: &Context,
    relay: &W,
    namespace: &str,
    blocker: Blocker,
) -> Result<(), Error> {
    warn!(relay = %relay.describe(), reason = blocker.reason(), message = blocker.message(), "relay blocked");
    publish(
        ctx,
        relay,
        EventType::Warning,
        blocker.reason(),
        blocker.message().to_owned(),
    )
    .await;
    let (deployment, lease) = if matches!(blocker, Blocker::NameConflict(_)) {
        (None, None)
    } else {
        (
            Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&relay.object_name())
                .await?,
            Api::<Lease>::namespaced(ctx.client.clone(), namespace)
                .get_opt(&relay.lease_name())
                .await?,
        )
    };
    let status = status::compute(
        relay,
        deployment.as_ref(),
        lease.as_ref(),
        Some(&blocker),
        Timestamp::now(),
    );
    write_status(ctx, relay, namespace, &status).await
}

/// `Kind namespace/name` of an existing object named `name` that `owner_uid` does not
/// control; `None` when there is no such object or it is ours.
async fn foreign<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    owner_uid: &str,
) -> Result<Option<String>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let existing = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    Ok(existing
        .filter(|obj| !resources::is_controlled_by(obj.meta(), owner_uid))
        .map(|_| format!("{} {namespace}/{name}", K::kind(&()))))
}

/// Refuses to write over objects the relay does not own: a relay named like an existing
/// ServiceAccount or Role would otherwise rewrite it, and deleting the relay would let the
/// garbage collector delete it. The workers' Lease counts as foreign only when it names
/// other owners (a Lease without owners may be one our workers created before they set
/// their owner).
async fn name_conflict<W: Workload>(
    ctx: &Context,
    relay: &W,
    namespace: &str,
    desired: &resources::Desired,
) -> Result<Option<Blocker>, Error> {
    let uid = relay
        .meta()
        .uid
        .clone()
        .ok_or(DesiredError::MissingMetadata("uid"))?;
    let name = relay.object_name();
    let client = &ctx.client;
    let mut found = vec![
        foreign::<ServiceAccount>(client, namespace, &name, &uid).await?,
        foreign::<Role>(client, namespace, &name, &uid).await?,
        foreign::<RoleBinding>(client, namespace, &name, &uid).await?,
        foreign::<Deployment>(client, namespace, &name, &uid).await?,
    ];
    if desired.pod_disruption_budget.is_some() {
        found.push(foreign::<PodDisruptionBudget>(client, namespace, &name, &uid).await?);
    }
    if relay.elects_leader() {
        let lease_name = relay.lease_name();
        let lease = Api::<Lease>::namespaced(client.clone(), namespace)
            .get_opt(&lease_name)
            .await?;
        if lease.is_some_and(|l| {
            !l.owner_references().is_empty() && !l.owner_references().iter().any(|o| o.uid == uid)
        }) {
            found.push(Some(format!("Lease {namespace}/{lease_name}")));
        }
    }
    let found: Vec<String> = found.into_iter().flatten().collect();
    if found.is_empty() {
        return Ok(None);
    }
    Ok(Some(Blocker::NameConflict(format!(
        "{} already exist{} and {} not owned by this {}; the operator leaves {} alone (rename the {}, or delete {} if it is a leftover)",
        found.join(", "),
        if found.len() == 1 { "s" } else { "" },
        if found.len() == 1 { "is" } else { "are" },
        W::kind(&()),
        if found.len() == 1 { "it" } else { "them" },
        W::kind(&()),
        if found.len() == 1 { "it" } else { "them" },
    ))))
}

/// Applies the desired objects (and prunes the PDB when it is no longer wanted); returns
/// the Deployment as the API server stored it.
async fn apply_all<W: Workload>(
    ctx: &Context,
    relay: &W,
    namespace: &str,
    desired: &resources::Desired,
    hash: &str,
) -> Result<Deployment, Error> {
    let name = relay.object_name();
    let client = &ctx.client;
    let retry = ctx.retry;
    apply(
        &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
        &desired.service_account,
        retry,
    )
    .await?;
    apply(
        &Api::<Role>::namespaced(client.clone(), namespace),
        &desired.role,
        retry,
    )
    .await?;
    apply(
        &Api::<RoleBinding>::namespaced(client.clone(), namespace),
        &desired.role_binding,
        retry,
    )
    .await?;
    let previous_hash = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(&name)
        .await?
        .and_then(|d| {
            d.spec?
                .template
                .metadata?
                .annotations?
                .remove(resources::SECRET_HASH_ANNOTATION)
        });
    let deployment = apply(
        &Api::<Deployment>::namespaced(client.clone(), namespace),
        &desired.deployment,
        retry,
    )
    .await?;
    if previous_hash.as_ref().is_some_and(|h| h != hash) {
        info!(relay = %relay.describe(), "referenced Secret changed; rolling the workers");
        publish(
            ctx,
            relay,
            EventType::Normal,
            "SecretRotated",
            "referenced Secret changed; rolling the workers".into(),
        )
        .await;
    }
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace);
    match &desired.pod_disruption_budget {
        Some(pdb) => {
            apply(&pdbs, pdb, retry).await?;
        }
        None => {
            // Only delete a PDB this relay controls, never a same-named foreign one.
            let uid = relay.uid().unwrap_or_default();
            let owned = pdbs
                .get_opt(&name)
                .await?
                .is_some_and(|pdb| resources::is_controlled_by(pdb.meta(), &uid));
            if owned {
                match pdbs.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    Ok(deployment)
}

/// Reconciles one relay. Called by the controller, and directly by the tests.
pub async fn reconcile<W: Workload>(relay: Arc<W>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let key = relay.describe();
    let result = reconcile_inner(relay.as_ref(), &ctx).await;
    match &result {
        Ok((outcome, _)) => {
            ctx.metrics.observe(outcome, started.elapsed());
            ctx.failures(&key, false);
        }
        Err(e) => {
            ctx.metrics.observe("error", started.elapsed());
            ctx.metrics.error(e.metric_label());
        }
    }
    result.map(|(_, action)| action)
}

/// The reason of the Ready condition, if any.
fn ready_reason(status: Option<&WorkerStatus>) -> Option<&str> {
    status
        .and_then(|s| status::condition(s, status::READY))
        .map(|c| c.reason.as_str())
}

async fn reconcile_inner<W: Workload>(
    relay: &W,
    ctx: &Context,
) -> Result<(&'static str, Action), Error> {
    let namespace = relay
        .namespace()
        .ok_or(DesiredError::MissingMetadata("namespace"))?;
    debug!(relay = %relay.describe(), "reconciling");
    if relay.meta().deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the owned objects; re-applying them
        // now would only fight it.
        return Ok(("deleting", Action::await_change()));
    }

    if let Err(invalid) = relay.validate() {
        block(
            ctx,
            relay,
            &namespace,
            Blocker::InvalidSpec(invalid.to_string()),
        )
        .await?;
        // Only a spec change can fix it; the watch triggers on that.
        return Ok(("blocked", Action::await_change()));
    }
    if let Err(refused) = ctx.settings.image(relay.worker().image) {
        block(
            ctx,
            relay,
            &namespace,
            Blocker::ImageNotAllowed(refused.to_string()),
        )
        .await?;
        // A spec change, or the operator restarted with another allowlist.
        return Ok(("blocked", Action::await_change()));
    }

    let hash = match secret_hash(&ctx.client, &namespace, &relay.worker()).await? {
        Ok(hash) => hash,
        Err(blocker) => {
            block(ctx, relay, &namespace, blocker).await?;
            return Ok(("blocked", Action::requeue(RESYNC_NOT_READY)));
        }
    };

    let desired = resources::desired(relay, &ctx.settings, &hash)?;
    if let Some(conflict) = name_conflict(ctx, relay, &namespace, &desired).await? {
        block(ctx, relay, &namespace, conflict).await?;
        // The other object may be renamed or deleted at any time; look again.
        return Ok(("blocked", Action::requeue(RESYNC_NOT_READY)));
    }
    let deployment = match apply_all(ctx, relay, &namespace, &desired, &hash).await {
        Ok(deployment) => deployment,
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 422 => {
            // Refused as invalid (e.g. a malformed resource quantity the CRD schema cannot
            // check): a spec problem, not something retrying fixes.
            let message = format!(
                "the API server refused the generated objects: {}",
                s.message
            );
            block(ctx, relay, &namespace, Blocker::InvalidSpec(message)).await?;
            return Ok(("blocked", Action::await_change()));
        }
        Err(e) => return Err(e),
    };
    let lease = if relay.elects_leader() {
        Api::<Lease>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&relay.lease_name())
            .await?
    } else {
        None
    };
    let status = status::compute(
        relay,
        Some(&deployment),
        lease.as_ref(),
        None,
        Timestamp::now(),
    );
    write_status(ctx, relay, &namespace, &status).await?;
    announce_stall_changes(ctx, relay, &status).await;
    let requeue = if status::is_ready(&status) {
        RESYNC
    } else {
        RESYNC_NOT_READY
    };
    Ok(("ok", Action::requeue(requeue)))
}

/// An Event when messages stop flowing (`Stalled`) and when they flow again.
async fn announce_stall_changes<W: Workload>(ctx: &Context, relay: &W, status: &WorkerStatus) {
    let before = ready_reason(relay.worker_status()) == Some("Stalled");
    let now = ready_reason(Some(status)) == Some("Stalled");
    let message = status::condition(status, status::READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    if now && !before {
        warn!(relay = %relay.describe(), %message, "stalled");
        publish(ctx, relay, EventType::Warning, "Stalled", message).await;
    } else if before && !now {
        info!(relay = %relay.describe(), "messages flow again");
        publish(
            ctx,
            relay,
            EventType::Normal,
            "Recovered",
            format!("no longer stalled: {message}"),
        )
        .await;
    }
}

/// Requeues a failed reconcile with per-relay exponential backoff.
pub fn error_policy<W: Workload>(relay: Arc<W>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = relay.describe();
    let failures = ctx.failures(&key, true);
    let delay = backoff(failures);
    warn!(relay = %key, %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One controller: watches relays of kind `W` (in `namespace`, or all) and the objects they
/// own, and reconciles them until a shutdown signal.
async fn control<W: Workload>(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    Controller::new(api::<W>(&client, &namespace), watcher::Config::default())
        .owns(api::<Deployment>(&client, &namespace), owned.clone())
        .owns(api::<ServiceAccount>(&client, &namespace), owned.clone())
        .owns(api::<Role>(&client, &namespace), owned.clone())
        .owns(api::<RoleBinding>(&client, &namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned)
        .shutdown_on_signal()
        .run(reconcile::<W>, error_policy::<W>, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(relay = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile loop"),
            }
        })
        .await;
}

/// Runs both controllers (OutboxRelay and InboxRelay) until a shutdown signal.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    tokio::join!(
        control::<OutboxRelay>(ctx.clone(), namespace.clone()),
        control::<InboxRelay>(ctx, namespace),
    );
    info!("controllers stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(0), Duration::from_secs(5));
    }

    #[test]
    fn secret_hash_depends_on_referenced_values_only() {
        let a = hash_secret_values(&[("db", "url", b"postgres://a")]);
        assert_eq!(a, hash_secret_values(&[("db", "url", b"postgres://a")]));
        assert_ne!(a, hash_secret_values(&[("db", "url", b"postgres://b")]));
        assert_ne!(a, hash_secret_values(&[("db2", "url", b"postgres://a")]));
        // Length-prefixed: moving bytes between fields changes the hash.
        assert_ne!(
            hash_secret_values(&[("a", "b", b"c"), ("d", "e", b"f")]),
            hash_secret_values(&[("a", "b", b"cd"), ("", "e", b"f")])
        );
        assert_eq!(a.len(), 32);
    }
}
