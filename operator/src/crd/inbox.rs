//! `InboxRelay`: a Pub/Sub subscription stored into a PostgreSQL inbox table, each message
//! once, by `outbox-worker inbox` (one elected consumer at a time, unless switched off).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Checker, DURATION_PATTERN, EMULATOR_HOST_PATTERN, IMAGE_PATTERN, InvalidSpec,
    LeaderElectionSpec, SQL_IDENTIFIER, SQL_IDENTIFIER_PATTERN, SUBSCRIPTION, SUBSCRIPTION_PATTERN,
    SecretKeyRef, TracingSpec, WorkerSpec, WorkerStatus, default_replicas, default_stalled_after,
    validate_worker,
};
use crate::resources::env;
use crate::workload::Workload;

/// Desired state of an inbox worker: one Deployment of `outbox-worker inbox` storing the
/// messages of a Pub/Sub subscription in a PostgreSQL inbox table, each exactly once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "InboxRelay",
    plural = "inboxrelays",
    singular = "inboxrelay",
    shortname = "ibr",
    category = "outbox",
    namespaced,
    status = "WorkerStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    derive = "PartialEq",
    doc = "InboxRelay runs the inbox worker (Pub/Sub subscription to PostgreSQL inbox table, each message once) as a Deployment with leader election.",
    validation = Rule::new("self.metadata.name.size() <= 57").message("metadata.name must be at most 57 characters (the owned objects are named <name>-inbox)"),
    printcolumn(name = "Subscription", type_ = "string", json_path = ".spec.pubsub.subscription", description = "Pub/Sub subscription"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "Desired worker replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Ready worker replicas"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader", description = "Pod holding the inbox worker's Lease"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog", description = "Inbox rows not yet processed"),
    printcolumn(name = "Lag", type_ = "string", json_path = ".status.oldestPendingAge", description = "Age of the oldest unprocessed row"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "Reason of the Ready condition"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct InboxRelaySpec {
    /// Number of worker pods. With leader election (the default) only the Lease holder
    /// consumes; the others are hot standbys.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 20))]
    pub replicas: i32,

    /// Where the inbox table lives.
    pub database: InboxDatabaseSpec,

    /// Where messages come from.
    pub pubsub: InboxPubSubSpec,

    /// Most messages stored per transaction (the worker's default, 500, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: Option<i32>,

    /// Streaming pulls the active worker opens (the worker's default, 8, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub streams: Option<i32>,

    /// Leader election: one active consumer, which a subscription with message ordering
    /// needs (per-key order is only kept by one consumer). `enabled: false` lets every
    /// replica consume, which is safe only for a subscription without ordering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_election: Option<LeaderElectionSpec>,

    /// `Ready` turns `False` (reason `Stalled`) when inbox rows wait and the application
    /// processed none for this long (e.g. `5m`).
    #[serde(default = "default_stalled_after")]
    #[schemars(length(min = 2, max = 32), pattern(DURATION_PATTERN))]
    pub stalled_after: String,

    /// Worker image; defaults to the operator's `--worker-image`. Any other image must
    /// match the operator's image allowlist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), pattern(IMAGE_PATTERN))]
    pub image: Option<String>,

    /// Compute resources of the worker container (defaults: 50m CPU / 64Mi requested,
    /// 256Mi memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node selector of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// OpenTelemetry trace export of the workers (see OutboxRelay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// PostgreSQL settings of an inbox worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxDatabaseSpec {
    /// Secret key holding the PostgreSQL connection URL (`DATABASE_URL`).
    pub url_secret_ref: SecretKeyRef,

    /// Inbox table, optionally schema-qualified (`schema.table`).
    #[serde(default = "default_inbox_table")]
    #[schemars(length(min = 1, max = 127), pattern(SQL_IDENTIFIER_PATTERN))]
    pub table: String,
}

/// Pub/Sub settings of an inbox worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboxPubSubSpec {
    /// Full subscription name, `projects/PROJECT/subscriptions/SUBSCRIPTION`.
    #[schemars(length(min = 1, max = 300), pattern(SUBSCRIPTION_PATTERN))]
    #[x_kube(validation = Rule::new("!self.matches('^projects/[^/]+/subscriptions/goog')").message("subscription id must not start with \"goog\""))]
    pub subscription: String,

    /// `host:port` of a Pub/Sub emulator (development clusters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 260), pattern(EMULATOR_HOST_PATTERN))]
    pub emulator_host: Option<String>,

    /// Secret key holding a service-account JSON key; without it the worker uses Workload
    /// Identity / Application Default Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
}

fn default_inbox_table() -> String {
    "inbox".to_owned()
}

impl Workload for InboxRelay {
    const COMPONENT: &'static str = "inbox";
    const APP_NAME: &'static str = "outbox-inbox-worker";
    const NAME_SUFFIX: &'static str = "-inbox";
    const PROGRESS: &'static str = "processed";

    fn worker(&self) -> WorkerSpec<'_> {
        let s = &self.spec;
        WorkerSpec {
            replicas: s.replicas,
            url_secret_ref: &s.database.url_secret_ref,
            credentials_secret_ref: s.pubsub.credentials_secret_ref.as_ref(),
            emulator_host: s.pubsub.emulator_host.as_deref(),
            leader_election: s.leader_election.as_ref(),
            image: s.image.as_deref(),
            resources: s.resources.as_ref(),
            node_selector: s.node_selector.as_ref(),
            tolerations: s.tolerations.as_ref(),
            tracing: s.tracing.as_ref(),
            stalled_after: &s.stalled_after,
        }
    }

    fn worker_status(&self) -> Option<&WorkerStatus> {
        self.status.as_ref()
    }

    fn validate(&self) -> Result<(), InvalidSpec> {
        validate_inbox(self)
    }

    fn worker_env(&self) -> Vec<EnvVar> {
        let mut vars = vec![
            env("INBOX_TABLE", self.spec.database.table.clone()),
            env("PUBSUB_SUBSCRIPTION", self.spec.pubsub.subscription.clone()),
        ];
        if let Some(batch) = self.spec.batch_size {
            vars.push(env("INBOX_BATCH_SIZE", batch.to_string()));
        }
        if let Some(streams) = self.spec.streams {
            vars.push(env("INBOX_STREAMS", streams.to_string()));
        }
        vars
    }

    fn elects_leader(&self) -> bool {
        self.spec
            .leader_election
            .as_ref()
            .and_then(|le| le.enabled)
            .unwrap_or(true)
    }
}

/// Validates an inbox relay with the same rules as the CRD schema.
pub fn validate_inbox(relay: &InboxRelay) -> Result<(), InvalidSpec> {
    let mut c = Checker::new();
    let spec = &relay.spec;
    validate_worker(
        &mut c,
        &relay.name_any(),
        InboxRelay::MAX_NAME,
        &relay.worker(),
    );
    c.pattern(
        "spec.database.table",
        &spec.database.table,
        &SQL_IDENTIFIER,
        SQL_IDENTIFIER_PATTERN,
        127,
    );
    let sub = &spec.pubsub.subscription;
    c.pattern(
        "spec.pubsub.subscription",
        sub,
        &SUBSCRIPTION,
        SUBSCRIPTION_PATTERN,
        300,
    );
    if SUBSCRIPTION.is_match(sub)
        && sub
            .split_once("/subscriptions/")
            .is_some_and(|(_, id)| id.starts_with("goog"))
    {
        c.fail(
            "spec.pubsub.subscription",
            "subscription id must not start with \"goog\"",
        );
    }
    if let Some(b) = spec.batch_size
        && !(1..=10_000).contains(&b)
    {
        c.fail("spec.batchSize", "must be between 1 and 10000");
    }
    if let Some(n) = spec.streams
        && !(1..=16).contains(&n)
    {
        c.fail("spec.streams", "must be between 1 and 16");
    }
    c.finish("InboxRelay")
}
