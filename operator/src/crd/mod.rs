//! The custom resources, `OutboxRelay` ([`outbox`]) and `InboxRelay` ([`inbox`]): the
//! types both share (Secret references, leader election, tracing, status), CRD generation
//! and spec validation.
//!
//! Validation is declared twice on purpose, from the same constants: in the CRD schema
//! (patterns, ranges and CEL `x-kubernetes-validations`, so the API server refuses a bad
//! resource at `kubectl apply` time) and in [`validate`], which `render` and the reconcile
//! loop both call so that a resource that slipped past an older CRD (or a CEL rule the
//! cluster does not evaluate) is reported with the same message everywhere.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use kube::{CustomResourceExt, KubeSchema};
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod inbox;
mod outbox;

pub use inbox::{InboxDatabaseSpec, InboxPubSubSpec, InboxRelay, InboxRelaySpec, validate_inbox};
pub use outbox::{DatabaseSpec, OutboxRelay, OutboxRelaySpec, PubSubSpec, validate};

/// API group of the custom resource.
pub const GROUP: &str = "outbox.dev";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";

/// A SQL identifier, optionally schema-qualified (`schema.table`); PostgreSQL truncates
/// identifiers at 63 bytes, so longer ones are refused rather than silently shortened.
pub const SQL_IDENTIFIER_PATTERN: &str =
    r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$";
/// A fully-qualified Pub/Sub topic name (`projects/P/topics/T`), following Google's naming
/// rules for project ids and topic ids.
pub const TOPIC_PATTERN: &str =
    r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~%+-]{2,254}$";
/// A fully-qualified Pub/Sub subscription name (`projects/P/subscriptions/S`), by the same
/// naming rules as topics.
pub const SUBSCRIPTION_PATTERN: &str =
    r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/subscriptions/[A-Za-z][A-Za-z0-9._~%+-]{2,254}$";
/// CEL rule for what the pattern cannot say: topic ids may not start with `goog`.
pub const TOPIC_NOT_GOOG_RULE: &str = "!self.matches('^projects/[^/]+/topics/goog')";
/// `host:port` of the Pub/Sub emulator.
pub const EMULATOR_HOST_PATTERN: &str =
    r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?:[0-9]{1,5}$";
/// Name of a Kubernetes object that must be a DNS-1123 subdomain (Secrets, Leases).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key inside a Secret's `data`.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// A duration both the worker (humantime) and CEL's `duration()` understand, e.g. `15s`,
/// `1m30s`, `500ms`.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,6}(ms|s|m|h))+$";
/// A container image reference: no whitespace.
pub const IMAGE_PATTERN: &str = r"^\S+$";
/// CEL rule tying the leader-election timings together, as client-go's leader election does.
pub const LEADER_TIMINGS_RULE: &str = "duration(self.renewDeadline) < duration(self.leaseDuration) && duration(self.retryPeriod) < duration(self.renewDeadline)";
/// CEL rule on the whole resource: the name becomes a label value, which is limited to 63.
pub const NAME_LENGTH_RULE: &str = "self.metadata.name.size() <= 63";
/// An OTLP collector endpoint: `http(s)://host[:port][/path]`, with no credentials, query or
/// fragment (credentials go in `headersSecretRef`).
pub const OTLP_ENDPOINT_PATTERN: &str = r"^https?://([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[-A-Za-z0-9._~%/]*)?$";
/// CEL rule on `tracing.endpoint`: says in words what the pattern checks first.
pub const OTLP_ENDPOINT_SCHEME_RULE: &str =
    "self.startsWith('http://') || self.startsWith('https://')";
/// Message of [`OTLP_ENDPOINT_SCHEME_RULE`] and of `validate` for a bad endpoint.
pub const OTLP_ENDPOINT_MESSAGE: &str = "must be an http:// or https:// URL of an OTLP collector (scheme, host, optional port and path; no credentials, query or fragment), e.g. http://otel-collector.observability.svc:4317";
/// CEL rule on `tracing`: an enabled tracing section needs an endpoint.
pub const TRACING_ENDPOINT_RULE: &str =
    "(has(self.enabled) && !self.enabled) || has(self.endpoint)";
/// Message of [`TRACING_ENDPOINT_RULE`].
pub const TRACING_ENDPOINT_MESSAGE: &str = "endpoint is required unless enabled is false";
/// CEL rule on `tracing`: a sampler argument (a ratio) only means something to the ratio
/// samplers.
pub const SAMPLER_ARG_RULE: &str =
    "!has(self.samplerArg) || (has(self.sampler) && self.sampler.endsWith('traceidratio'))";
/// Message of [`SAMPLER_ARG_RULE`].
pub const SAMPLER_ARG_MESSAGE: &str =
    "samplerArg (a ratio) is only valid with sampler traceidratio or parentbased_traceidratio";
/// A resource attribute name usable unencoded in `OTEL_RESOURCE_ATTRIBUTES` (a W3C baggage
/// key), e.g. `deployment.environment.name`.
pub const RESOURCE_ATTRIBUTE_KEY_PATTERN: &str = r"^[A-Za-z0-9._-]{1,255}$";
/// CEL rule on `tracing.resourceAttributes`: every key matches
/// [`RESOURCE_ATTRIBUTE_KEY_PATTERN`] (map keys cannot carry a schema pattern).
pub const RESOURCE_ATTRIBUTE_KEYS_RULE: &str = "self.all(k, k.matches('^[A-Za-z0-9._-]{1,255}$'))";
/// Message of [`RESOURCE_ATTRIBUTE_KEYS_RULE`].
pub const RESOURCE_ATTRIBUTE_KEYS_MESSAGE: &str =
    "resourceAttributes keys must be 1 to 255 letters, digits, '.', '_' or '-'";
/// Most resource attributes a relay may set.
pub const MAX_RESOURCE_ATTRIBUTES: usize = 32;
/// Longest resource attribute value (characters, before encoding).
pub const MAX_RESOURCE_ATTRIBUTE_VALUE: usize = 512;

/// A key of a Secret in the relay's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,
}

/// Leader-election timings, passed to the worker as `LEASE_DURATION`, `RENEW_DEADLINE`,
/// `RETRY_PERIOD`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.renewDeadline) < duration(self.leaseDuration) && duration(self.retryPeriod) < duration(self.renewDeadline)").message("leaderElection requires retryPeriod < renewDeadline < leaseDuration"))]
pub struct LeaderElectionSpec {
    /// InboxRelay only: `false` lets every replica consume at once, which is safe only for a
    /// subscription without message ordering. An OutboxRelay always elects one publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Name of the Lease (defaults to the name of the relay's Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub lease_name: Option<String>,
    /// How long a Lease is valid without renewal.
    #[serde(default = "default_lease_duration")]
    #[schemars(length(min = 2, max = 32), pattern(DURATION_PATTERN))]
    pub lease_duration: String,
    /// How long the leader keeps trying to renew before giving up leadership.
    #[serde(default = "default_renew_deadline")]
    #[schemars(length(min = 2, max = 32), pattern(DURATION_PATTERN))]
    pub renew_deadline: String,
    /// Interval between acquisition / renewal attempts.
    #[serde(default = "default_retry_period")]
    #[schemars(length(min = 2, max = 32), pattern(DURATION_PATTERN))]
    pub retry_period: String,
}

/// OpenTelemetry settings of the workers, each passed as the standard environment variable
/// of the OpenTelemetry SDK configuration spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(TRACING_ENDPOINT_RULE).message(TRACING_ENDPOINT_MESSAGE).field_path(".endpoint"),
    validation = Rule::new(SAMPLER_ARG_RULE).message(SAMPLER_ARG_MESSAGE).field_path(".samplerArg")
)]
pub struct TracingSpec {
    /// `false` keeps the settings but switches export off: only `OTEL_SDK_DISABLED=true`
    /// is set (which also overrides `OTEL_*` variables injected by other means).
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// OTLP collector URL, `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g.
    /// `http://otel-collector.observability.svc:4317`). Required unless `enabled` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(OTLP_ENDPOINT_PATTERN))]
    #[x_kube(validation = Rule::new(OTLP_ENDPOINT_SCHEME_RULE).message(OTLP_ENDPOINT_MESSAGE))]
    pub endpoint: Option<String>,

    /// OTLP transport, `OTEL_EXPORTER_OTLP_PROTOCOL`; unset leaves the SDK's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<OtlpProtocol>,

    /// Sampler, `OTEL_TRACES_SAMPLER`; unset leaves the SDK's default
    /// (`parentbased_always_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<TracesSampler>,

    /// Sampling ratio between 0 and 1, `OTEL_TRACES_SAMPLER_ARG`; only with the
    /// `traceidratio` and `parentbased_traceidratio` samplers (the SDK's default is 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampler_arg: Option<f64>,

    /// `OTEL_SERVICE_NAME`; defaults to `resourceAttributes["service.name"]`, else the
    /// relay's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub service_name: Option<String>,

    /// Extra resource attributes, `OTEL_RESOURCE_ATTRIBUTES` (values percent-encoded as the
    /// spec requires). `k8s.namespace.name`, `k8s.deployment.name` and `k8s.pod.name` are
    /// always added; a key given here replaces the added one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 512}
    ))]
    #[x_kube(validation = Rule::new(RESOURCE_ATTRIBUTE_KEYS_RULE).message(RESOURCE_ATTRIBUTE_KEYS_MESSAGE))]
    pub resource_attributes: Option<BTreeMap<String, String>>,

    /// Secret key holding the OTLP headers, `OTEL_EXPORTER_OTLP_HEADERS`
    /// (`key=value,key2=value2`, values percent-encoded, e.g.
    /// `authorization=Bearer%20TOKEN`). Part of the secret hash: rotating it rolls the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretKeyRef>,
}

impl TracingSpec {
    /// Whether the workers export traces (enabled, with an endpoint).
    pub fn is_active(&self) -> bool {
        self.enabled && self.endpoint.is_some()
    }
}

/// OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    #[allow(missing_docs)]
    Grpc,
    #[serde(rename = "http/protobuf")]
    #[allow(missing_docs)]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The value of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Trace sampler (`OTEL_TRACES_SAMPLER`), the values of the OpenTelemetry SDK configuration
/// spec that need nothing beyond an optional ratio.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(missing_docs)]
pub enum TracesSampler {
    #[serde(rename = "always_on")]
    AlwaysOn,
    #[serde(rename = "always_off")]
    AlwaysOff,
    #[serde(rename = "traceidratio")]
    TraceIdRatio,
    #[serde(rename = "parentbased_always_on")]
    ParentBasedAlwaysOn,
    #[serde(rename = "parentbased_always_off")]
    ParentBasedAlwaysOff,
    #[serde(rename = "parentbased_traceidratio")]
    ParentBasedTraceIdRatio,
}

impl TracesSampler {
    /// The value of `OTEL_TRACES_SAMPLER`.
    pub fn as_str(self) -> &'static str {
        match self {
            TracesSampler::AlwaysOn => "always_on",
            TracesSampler::AlwaysOff => "always_off",
            TracesSampler::TraceIdRatio => "traceidratio",
            TracesSampler::ParentBasedAlwaysOn => "parentbased_always_on",
            TracesSampler::ParentBasedAlwaysOff => "parentbased_always_off",
            TracesSampler::ParentBasedTraceIdRatio => "parentbased_traceidratio",
        }
    }

    /// Whether the sampler takes a ratio (`OTEL_TRACES_SAMPLER_ARG`).
    pub fn takes_ratio(self) -> bool {
        matches!(
            self,
            TracesSampler::TraceIdRatio | TracesSampler::ParentBasedTraceIdRatio
        )
    }
}

impl Default for LeaderElectionSpec {
    fn default() -> Self {
        Self {
            enabled: None,
            lease_name: None,
            lease_duration: default_lease_duration(),
            renew_deadline: default_renew_deadline(),
            retry_period: default_retry_period(),
        }
    }
}

/// Observed state of a relay (either kind), written by the operator through the status
/// subresource. The figures (`backlog` to `reportTime`) are what the active worker last
/// reported on its Lease (see [`crate::report`]); they are absent while no worker leads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods that exist (from the Deployment); the scale subresource's status replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Worker pods that are ready (from the Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Label selector of the worker pods, for the scale subresource (HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Pod currently holding the relay's Lease, if the Lease is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Rows waiting: unpublished outbox rows, or unprocessed inbox rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Age of the oldest waiting row (e.g. `1m5s`; `0s` when nothing waits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<String>,
    /// Messages published (outbox) or stored in the inbox by the active worker since it
    /// started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_total: Option<i64>,
    /// Messages dead-lettered by the active worker since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<i64>,
    /// Last progress (RFC 3339): the last published batch (outbox), or the newest row the
    /// application processed (inbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<String>,
    /// Ordering keys the relay holds back after a failed publish (outbox only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_keys: Option<i64>,
    /// Inbox rows parked after too many failed attempts, waiting for a person (inbox only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_rows: Option<i64>,
    /// When the worker took the figures above (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_time: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase machine-readable reason, e.g. `SecretNotFound`.
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// `metadata.generation` the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn default_true() -> bool {
    true
}
pub(crate) fn default_replicas() -> i32 {
    2
}
fn default_lease_duration() -> String {
    "15s".to_owned()
}
fn default_renew_deadline() -> String {
    "10s".to_owned()
}
fn default_retry_period() -> String {
    "2s".to_owned()
}

/// Renders the CRD as YAML; what `outbox-operator crd` prints and `crds/` stores.
/// `plural` picks one (`outboxrelays`; anything else is `inboxrelays`, the only other
/// name the CLI accepts); `None` gives both as two documents.
pub fn crd_yaml(plural: Option<&str>) -> Result<String, serde_norway::Error> {
    let outbox = || serde_norway::to_string(&OutboxRelay::crd());
    let inbox = || serde_norway::to_string(&InboxRelay::crd());
    match plural {
        None => Ok(format!("{}---\n{}", outbox()?, inbox()?)),
        Some("outboxrelays") => outbox(),
        Some(_) => inbox(),
    }
}

/// One problem in a spec, naming the field as `kubectl` would (`spec.pubsub.topic`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of an invalid spec; the text becomes the `InvalidSpec` condition message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec {
    /// Kind of the resource (`OutboxRelay`, `InboxRelay`).
    pub kind: &'static str,
    /// Every problem found.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        write!(f, "invalid {}: {}", self.kind, parts.join("; "))
    }
}

fn re(pattern: &'static str) -> Regex {
    // The patterns are constants of this module and covered by tests.
    Regex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern}: {e}"))
}

pub(crate) static SQL_IDENTIFIER: LazyLock<Regex> = LazyLock::new(|| re(SQL_IDENTIFIER_PATTERN));
pub(crate) static TOPIC: LazyLock<Regex> = LazyLock::new(|| re(TOPIC_PATTERN));
pub(crate) static SUBSCRIPTION: LazyLock<Regex> = LazyLock::new(|| re(SUBSCRIPTION_PATTERN));
static EMULATOR_HOST: LazyLock<Regex> = LazyLock::new(|| re(EMULATOR_HOST_PATTERN));
static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| re(DNS_SUBDOMAIN_PATTERN));
static SECRET_KEY: LazyLock<Regex> = LazyLock::new(|| re(SECRET_KEY_PATTERN));
static DURATION: LazyLock<Regex> = LazyLock::new(|| re(DURATION_PATTERN));
static IMAGE: LazyLock<Regex> = LazyLock::new(|| re(IMAGE_PATTERN));
static DURATION_PART: LazyLock<Regex> = LazyLock::new(|| re(r"([0-9]+)(ms|s|m|h)"));
static OTLP_ENDPOINT: LazyLock<Regex> = LazyLock::new(|| re(OTLP_ENDPOINT_PATTERN));
static RESOURCE_ATTRIBUTE_KEY: LazyLock<Regex> =
    LazyLock::new(|| re(RESOURCE_ATTRIBUTE_KEY_PATTERN));

/// Parses a duration accepted by [`DURATION_PATTERN`] (`1m30s`, `500ms`, ...).
pub fn parse_duration(text: &str) -> Option<Duration> {
    if !DURATION.is_match(text) {
        return None;
    }
    let mut total = Duration::ZERO;
    for cap in DURATION_PART.captures_iter(text) {
        let n: u64 = cap.get(1)?.as_str().parse().ok()?;
        let part = match cap.get(2)?.as_str() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
    }
    Some(total)
}

pub(crate) struct Checker(Vec<FieldError>);

impl Checker {
    pub(crate) fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }
    pub(crate) fn pattern(
        &mut self,
        field: &str,
        value: &str,
        regex: &Regex,
        pattern: &str,
        max: usize,
    ) {
        if value.len() > max {
            self.fail(field, format!("must be at most {max} characters"));
        } else if !regex.is_match(value) {
            self.fail(field, format!("{value:?} must match {pattern}"));
        }
    }
    pub(crate) fn secret_ref(&mut self, field: &str, r: &SecretKeyRef) {
        self.pattern(
            &format!("{field}.name"),
            &r.name,
            &DNS_SUBDOMAIN,
            DNS_SUBDOMAIN_PATTERN,
            253,
        );
        self.pattern(
            &format!("{field}.key"),
            &r.key,
            &SECRET_KEY,
            SECRET_KEY_PATTERN,
            253,
        );
    }
}

/// The fields both kinds of relay share, borrowed from either spec: what the Deployment,
/// the Role and the shared validation are made from.
#[derive(Clone, Copy, Debug)]
pub struct WorkerSpec<'a> {
    /// Desired worker pods.
    pub replicas: i32,
    /// Secret key of the database URL.
    pub url_secret_ref: &'a SecretKeyRef,
    /// Secret key of a Google service-account key.
    pub credentials_secret_ref: Option<&'a SecretKeyRef>,
    /// Pub/Sub emulator `host:port`.
    pub emulator_host: Option<&'a str>,
    /// Leader-election settings.
    pub leader_election: Option<&'a LeaderElectionSpec>,
    /// Worker image.
    pub image: Option<&'a str>,
    /// Worker container resources.
    pub resources: Option<&'a ResourceRequirements>,
    /// Node selector of the pods.
    pub node_selector: Option<&'a BTreeMap<String, String>>,
    /// Tolerations of the pods.
    pub tolerations: Option<&'a Vec<Toleration>>,
    /// Trace export.
    pub tracing: Option<&'a TracingSpec>,
    /// How long rows may wait without progress before `Ready` turns `False` (`Stalled`).
    pub stalled_after: &'a str,
}

impl WorkerSpec<'_> {
    /// The tracing section when the workers export traces (see [`TracingSpec::is_active`]).
    pub fn active_tracing(&self) -> Option<&TracingSpec> {
        self.tracing.filter(|t| t.is_active())
    }
    /// Leader-election settings with defaults filled in.
    pub fn leader_election_or_default(&self) -> LeaderElectionSpec {
        self.leader_election.cloned().unwrap_or_default()
    }
    /// `stalledAfter` as a duration (the default when it does not parse; validation
    /// reports that).
    pub fn stalled_after(&self) -> Duration {
        parse_duration(self.stalled_after).unwrap_or(DEFAULT_STALLED_AFTER)
    }
}

/// Default of `spec.stalledAfter`.
pub const DEFAULT_STALLED_AFTER: Duration = Duration::from_secs(300);

pub(crate) fn default_stalled_after() -> String {
    "5m".to_owned()
}

/// Checks what both kinds share: the name (at most `max_name` characters, which leaves
/// room for the suffix of the owned objects' names) and the [`WorkerSpec`] fields.
pub(crate) fn validate_worker(c: &mut Checker, name: &str, max_name: usize, w: &WorkerSpec) {
    if name.is_empty() {
        c.fail("metadata.name", "is required");
    } else if name.len() > max_name {
        c.fail(
            "metadata.name",
            format!("must be at most {max_name} characters (it is used as a label value)"),
        );
    } else if !DNS_SUBDOMAIN.is_match(name) {
        c.fail(
            "metadata.name",
            format!("{name:?} must match {DNS_SUBDOMAIN_PATTERN}"),
        );
    }
    if !(0..=20).contains(&w.replicas) {
        c.fail("spec.replicas", "must be between 0 and 20");
    }
    c.secret_ref("spec.database.urlSecretRef", w.url_secret_ref);
    if let Some(host) = w.emulator_host {
        c.pattern(
            "spec.pubsub.emulatorHost",
            host,
            &EMULATOR_HOST,
            EMULATOR_HOST_PATTERN,
            260,
        );
    }
    if let Some(r) = w.credentials_secret_ref {
        c.secret_ref("spec.pubsub.credentialsSecretRef", r);
    }
    if let Some(image) = w.image {
        if image.is_empty() {
            c.fail("spec.image", "must not be empty");
        } else {
            c.pattern("spec.image", image, &IMAGE, IMAGE_PATTERN, 512);
        }
    }
    if let Some(le) = w.leader_election {
        if let Some(lease) = &le.lease_name {
            c.pattern(
                "spec.leaderElection.leaseName",
                lease,
                &DNS_SUBDOMAIN,
                DNS_SUBDOMAIN_PATTERN,
                253,
            );
        }
        let mut parsed = Vec::new();
        for (field, value) in [
            ("spec.leaderElection.leaseDuration", &le.lease_duration),
            ("spec.leaderElection.renewDeadline", &le.renew_deadline),
            ("spec.leaderElection.retryPeriod", &le.retry_period),
        ] {
            match parse_duration(value).filter(|_| value.len() <= 32) {
                Some(d) => parsed.push(d),
                None => c.fail(field, format!("{value:?} must match {DURATION_PATTERN}")),
            }
        }
        if let [lease, renew, retry] = parsed[..]
            && !(renew < lease && retry < renew)
        {
            c.fail(
                "spec.leaderElection",
                "leaderElection requires retryPeriod < renewDeadline < leaseDuration",
            );
        }
    }
    if parse_duration(w.stalled_after)
        .filter(|d| w.stalled_after.len() <= 32 && !d.is_zero())
        .is_none()
    {
        c.fail(
            "spec.stalledAfter",
            format!(
                "{:?} must be a duration above zero matching {DURATION_PATTERN}",
                w.stalled_after
            ),
        );
    }
    if let Some(t) = w.tracing {
        validate_tracing(c, t);
    }
}

impl Checker {
    /// An empty checker.
    pub(crate) fn new() -> Checker {
        Checker(Vec::new())
    }
    /// `Ok` when nothing failed, else every failure under `kind`.
    pub(crate) fn finish(self, kind: &'static str) -> Result<(), InvalidSpec> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec {
                kind,
                errors: self.0,
            })
        }
    }
}

fn validate_tracing(c: &mut Checker, t: &TracingSpec) {
    match &t.endpoint {
        None if t.enabled => c.fail("spec.tracing.endpoint", TRACING_ENDPOINT_MESSAGE),
        None => {}
        Some(e) if e.len() > 1024 => {
            c.fail("spec.tracing.endpoint", "must be at most 1024 characters")
        }
        Some(e) if !OTLP_ENDPOINT.is_match(e) => c.fail(
            "spec.tracing.endpoint",
            format!("{e:?} {OTLP_ENDPOINT_MESSAGE}"),
        ),
        Some(_) => {}
    }
    if let Some(arg) = t.sampler_arg {
        // NaN fails the range check too.
        if !(0.0..=1.0).contains(&arg) {
            c.fail("spec.tracing.samplerArg", "must be between 0 and 1");
        }
        if !t.sampler.is_some_and(TracesSampler::takes_ratio) {
            c.fail("spec.tracing.samplerArg", SAMPLER_ARG_MESSAGE);
        }
    }
    if let Some(name) = &t.service_name
        && !(1..=255).contains(&name.chars().count())
    {
        c.fail("spec.tracing.serviceName", "must be 1 to 255 characters");
    }
    if let Some(attrs) = &t.resource_attributes {
        if attrs.len() > MAX_RESOURCE_ATTRIBUTES {
            c.fail(
                "spec.tracing.resourceAttributes",
                format!("must have at most {MAX_RESOURCE_ATTRIBUTES} entries"),
            );
        }
        if attrs.keys().any(|k| !RESOURCE_ATTRIBUTE_KEY.is_match(k)) {
            c.fail(
                "spec.tracing.resourceAttributes",
                RESOURCE_ATTRIBUTE_KEYS_MESSAGE,
            );
        }
        for (k, v) in attrs {
            if v.chars().count() > MAX_RESOURCE_ATTRIBUTE_VALUE {
                c.fail(
                    &format!("spec.tracing.resourceAttributes.{k}"),
                    format!("must be at most {MAX_RESOURCE_ATTRIBUTE_VALUE} characters"),
                );
            }
        }
    }
    if let Some(r) = &t.headers_secret_ref {
        c.secret_ref("spec.tracing.headersSecretRef", r);
    }
}
