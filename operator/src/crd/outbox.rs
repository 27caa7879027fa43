//! `OutboxRelay`: a PostgreSQL outbox table relayed to a Pub/Sub topic by one elected
//! `outbox-worker relay` at a time.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Checker, DURATION_PATTERN, EMULATOR_HOST_PATTERN, IMAGE_PATTERN, InvalidSpec,
    LeaderElectionSpec, SQL_IDENTIFIER, SQL_IDENTIFIER_PATTERN, SecretKeyRef, TOPIC, TOPIC_PATTERN,
    TracingSpec, WorkerSpec, WorkerStatus, default_replicas, default_stalled_after,
    validate_worker,
};
use crate::resources::env;
use crate::workload::Workload;

/// Desired state of a relay: one Deployment of `outbox-worker relay` with leader election,
/// moving rows from a PostgreSQL outbox table to a Pub/Sub topic.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "outbox.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    plural = "outboxrelays",
    singular = "outboxrelay",
    shortname = "obr",
    category = "outbox",
    namespaced,
    status = "WorkerStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    derive = "PartialEq",
    doc = "OutboxRelay runs the transactional-outbox relay (PostgreSQL table to Pub/Sub topic) as a Deployment with leader election.",
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name must be at most 63 characters (it is used as a label value)"),
    printcolumn(name = "Topic", type_ = "string", json_path = ".spec.pubsub.topic", description = "Pub/Sub topic"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "Desired worker replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Ready worker replicas"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader", description = "Pod holding the relay's Lease"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog", description = "Outbox rows not yet published"),
    printcolumn(name = "Lag", type_ = "string", json_path = ".status.oldestPendingAge", description = "Age of the oldest unpublished row"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "Reason of the Ready condition"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// Number of worker pods. Only the Lease holder relays; the others are hot standbys.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 20))]
    pub replicas: i32,

    /// Where the outbox table lives.
    pub database: DatabaseSpec,

    /// Where messages are published.
    pub pubsub: PubSubSpec,

    /// Maximum rows claimed and published per batch (the worker's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: Option<i32>,

    /// Timings of the worker's leader election (client-go semantics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(RELAY_ELECTS_RULE).message(RELAY_ELECTS_MESSAGE))]
    pub leader_election: Option<LeaderElectionSpec>,

    /// `Ready` turns `False` (reason `Stalled`) when rows are pending and nothing was
    /// published for this long (e.g. `5m`).
    #[serde(default = "default_stalled_after")]
    #[schemars(length(min = 2, max = 32), pattern(DURATION_PATTERN))]
    pub stalled_after: String,

    /// Worker image; defaults to the operator's `--worker-image`.
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

    /// OpenTelemetry trace export of the workers, as the standard `OTEL_*` environment
    /// variables. Absent: no `OTEL_*` variable is set (the worker exports nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// PostgreSQL settings. The URL (with its password) only ever comes from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret key holding the PostgreSQL connection URL (`DATABASE_URL`).
    pub url_secret_ref: SecretKeyRef,

    /// Outbox table, optionally schema-qualified (`schema.table`).
    #[serde(default = "default_table")]
    #[schemars(length(min = 1, max = 127), pattern(SQL_IDENTIFIER_PATTERN))]
    pub table: String,
}

/// Pub/Sub settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PubSubSpec {
    /// Full topic name, `projects/PROJECT/topics/TOPIC`.
    #[schemars(length(min = 1, max = 300), pattern(TOPIC_PATTERN))]
    #[x_kube(validation = Rule::new("!self.matches('^projects/[^/]+/topics/goog')").message("topic id must not start with \"goog\""))]
    pub topic: String,

    /// `host:port` of a Pub/Sub emulator (development clusters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 260), pattern(EMULATOR_HOST_PATTERN))]
    pub emulator_host: Option<String>,

    /// Secret key holding a service-account JSON key; without it the worker uses Workload
    /// Identity / Application Default Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
}

fn default_table() -> String {
    "outbox".to_owned()
}

/// CEL rule on an OutboxRelay's `leaderElection`: it cannot be switched off.
pub const RELAY_ELECTS_RULE: &str = "!has(self.enabled) || self.enabled";
/// Message of [`RELAY_ELECTS_RULE`].
pub const RELAY_ELECTS_MESSAGE: &str = "an OutboxRelay always elects one publisher (two would break per-key order); leaderElection.enabled must not be false";

impl Workload for OutboxRelay {
    const COMPONENT: &'static str = "relay";
    const APP_NAME: &'static str = "outbox-worker";
    const NAME_SUFFIX: &'static str = "";
    const PROGRESS: &'static str = "published";

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
        validate(self)
    }

    fn worker_env(&self) -> Vec<EnvVar> {
        let mut vars = vec![
            env("OUTBOX_TABLE", self.spec.database.table.clone()),
            env("PUBSUB_TOPIC", self.spec.pubsub.topic.clone()),
        ];
        if let Some(batch) = self.spec.batch_size {
            vars.push(env("BATCH_SIZE", batch.to_string()));
        }
        vars
    }

    fn elects_leader(&self) -> bool {
        true
    }
}

/// Validates a relay with the same rules as the CRD schema (patterns, ranges and the CEL
/// rules). Called by `render` and by every reconcile; the error text is the `InvalidSpec`
/// condition message.
pub fn validate(relay: &OutboxRelay) -> Result<(), InvalidSpec> {
    let mut c = Checker::new();
    let spec = &relay.spec;
    validate_worker(
        &mut c,
        &relay.name_any(),
        OutboxRelay::MAX_NAME,
        &relay.worker(),
    );
    c.pattern(
        "spec.database.table",
        &spec.database.table,
        &SQL_IDENTIFIER,
        SQL_IDENTIFIER_PATTERN,
        127,
    );
    let topic = &spec.pubsub.topic;
    c.pattern("spec.pubsub.topic", topic, &TOPIC, TOPIC_PATTERN, 300);
    if TOPIC.is_match(topic)
        && topic
            .split_once("/topics/")
            .is_some_and(|(_, id)| id.starts_with("goog"))
    {
        c.fail("spec.pubsub.topic", "topic id must not start with \"goog\"");
    }
    if let Some(b) = spec.batch_size
        && !(1..=10_000).contains(&b)
    {
        c.fail("spec.batchSize", "must be between 1 and 10000");
    }
    if spec
        .leader_election
        .as_ref()
        .is_some_and(|le| le.enabled == Some(false))
    {
        c.fail("spec.leaderElection.enabled", RELAY_ELECTS_MESSAGE);
    }
    c.finish("OutboxRelay")
}
