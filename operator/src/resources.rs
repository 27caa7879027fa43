//! Pure translation of a relay (an `OutboxRelay` or an `InboxRelay`, see
//! [`crate::workload`]) into the objects the operator applies.
//!
//! Nothing here talks to the API server, so `render` and the tests can show exactly what the
//! reconcile loop will apply: a ServiceAccount, a Role limited to the relay's Lease, a
//! RoleBinding, the worker Deployment, and a PodDisruptionBudget when there is more than one
//! replica. The image is checked against the operator's allowlist here too, so `render`
//! refuses what reconcile would refuse.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::Value;

use crate::crd::InvalidSpec;
use crate::workload::Workload;

/// Downward-API variable of the worker container holding the pod's name (referenced as
/// `$(POD_NAME)` in `OTEL_RESOURCE_ATTRIBUTES`).
pub const POD_NAME_ENV: &str = "POD_NAME";

/// Default worker image: the worker released together with this operator.
pub const DEFAULT_WORKER_IMAGE: &str = concat!(
    "ghcr.io/outbox-dev/outbox-worker:",
    env!("CARGO_PKG_VERSION")
);
/// Pod-template annotation carrying the hash of the referenced Secret keys; changing it
/// (a rotated secret) rolls the pods.
pub const SECRET_HASH_ANNOTATION: &str = "outbox.dev/secret-hash";
/// Port of the worker's `/healthz`, `/readyz` and `/metrics`.
pub const HTTP_PORT: i32 = 8080;
/// Where a `credentialsSecretRef` is mounted.
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/google";
/// File name of the mounted service-account key.
pub const CREDENTIALS_FILE: &str = "key.json";
/// Value of `app.kubernetes.io/managed-by`; the operator watches objects with it.
pub const MANAGER: &str = "outbox-operator";
/// UID 65532 is the conventional "nonroot" user of distroless images.
const NONROOT_UID: i64 = 65532;

/// Operator-wide inputs of the translation that are not part of the resource.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image used when the relay does not set `spec.image`.
    pub default_image: String,
    /// Prefixes a `spec.image` may start with. Empty: only `default_image` may be named.
    /// Whoever may create a relay must not be able to run an arbitrary image with the
    /// namespace's Secrets, so any other image needs the cluster admin's consent here.
    pub image_allowlist: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_image: DEFAULT_WORKER_IMAGE.to_owned(),
            image_allowlist: Vec::new(),
        }
    }
}

impl Settings {
    /// The image the workers run, or why `spec.image` is refused.
    pub fn image(&self, requested: Option<&str>) -> Result<String, DesiredError> {
        match requested {
            None => Ok(self.default_image.clone()),
            Some(image)
                if image == self.default_image
                    || self
                        .image_allowlist
                        .iter()
                        .any(|prefix| !prefix.is_empty() && image.starts_with(prefix.as_str())) =>
            {
                Ok(image.to_owned())
            }
            Some(image) => Err(DesiredError::ImageNotAllowed(
                if self.image_allowlist.is_empty() {
                    format!(
                        "spec.image {image:?} is not allowed: this operator runs only its own worker image {:?} (an administrator can allow other images with the operator's --image-allowlist, chart value workerImageAllowlist)",
                        self.default_image
                    )
                } else {
                    format!(
                        "spec.image {image:?} is not allowed: it must be {:?} or start with one of {:?} (the operator's --image-allowlist)",
                        self.default_image, self.image_allowlist
                    )
                },
            )),
        }
    }
}

/// Everything the operator applies for one relay.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Identity of the worker pods.
    pub service_account: ServiceAccount,
    /// Leases in the relay's namespace, nothing else.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
    /// The worker pods.
    pub deployment: Deployment,
    /// Present only when `replicas` > 1 (a PDB with one replica would block node drains).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
}

impl Desired {
    /// All objects as JSON values in apply order (ServiceAccount, Role, RoleBinding,
    /// Deployment, PodDisruptionBudget), for `render` and schema checks.
    pub fn to_values(&self) -> Result<Vec<Value>, serde_json::Error> {
        // k8s-openapi's serializers write `apiVersion` and `kind`.
        let mut out = vec![
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.role)?,
            serde_json::to_value(&self.role_binding)?,
            serde_json::to_value(&self.deployment)?,
        ];
        if let Some(pdb) = &self.pod_disruption_budget {
            out.push(serde_json::to_value(pdb)?);
        }
        Ok(out)
    }
}

/// Why the translation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// The spec breaks a validation rule.
    #[error(transparent)]
    InvalidSpec(#[from] InvalidSpec),
    /// `spec.image` is neither the default image nor on the allowlist.
    #[error("{0}")]
    ImageNotAllowed(String),
    /// The relay has no namespace or uid (it was not read from the API server and `render`
    /// did not fill them in).
    #[error("relay is missing metadata.{0}")]
    MissingMetadata(&'static str),
}

/// The recommended `app.kubernetes.io/*` labels of everything owned by `relay`.
pub fn labels<W: Workload>(relay: &W, image: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(relay);
    labels.insert("app.kubernetes.io/component".into(), W::COMPONENT.into());
    labels.insert("app.kubernetes.io/part-of".into(), "pubsub-outbox".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    if let Some(version) = image_version(image) {
        labels.insert("app.kubernetes.io/version".into(), version);
    }
    labels
}

/// The immutable subset of [`labels`] used as the Deployment / PDB selector.
pub fn selector_labels<W: Workload>(relay: &W) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), W::APP_NAME.into()),
        ("app.kubernetes.io/instance".into(), relay.name_any()),
    ])
}

/// The image tag when it is a valid label value (digest-only references have none).
fn image_version(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let (_, tag) = last.split_once(':')?;
    let valid = !tag.is_empty()
        && tag.len() <= 63
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric())
        && tag.ends_with(|c: char| c.is_ascii_alphanumeric());
    valid.then(|| tag.to_owned())
}

/// Controller owner reference to `relay`, so the garbage collector deletes the owned objects
/// with it and the controller is triggered by their changes.
pub fn owner_reference<W: Workload>(relay: &W) -> Result<OwnerReference, DesiredError> {
    let uid = relay
        .meta()
        .uid
        .clone()
        .ok_or(DesiredError::MissingMetadata("uid"))?;
    Ok(OwnerReference {
        api_version: W::api_version(&()).into_owned(),
        kind: W::kind(&()).into_owned(),
        name: relay.name_any(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Whether `meta` names `owner_uid` as its controller: the only objects the operator
/// writes over or deletes.
pub fn is_controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// A container environment variable with a literal value.
pub(crate) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

/// Escapes `$` for a container env `value`, in which the kubelet expands `$(VAR)` and reads
/// `$$` as a literal `$`: what the spec says arrives in the container unchanged.
fn literal(value: &str) -> String {
    value.replace('$', "$$")
}

/// Percent-encodes a resource attribute value for `OTEL_RESOURCE_ATTRIBUTES`: the
/// OpenTelemetry spec requires encoding every character outside the W3C baggage-octet range
/// (controls, space, `"`, `,`, `;`, `\` and non-ASCII, byte by byte in UTF-8); `%` is
/// encoded as well so that decoding gives the value back.
pub fn encode_resource_attribute_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        let baggage_octet =
            matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
        if baggage_octet && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `OTEL_*` variables of the worker container for `spec.tracing`:
/// - no tracing section: none;
/// - `enabled: false` (or, past validation, no endpoint): only `OTEL_SDK_DISABLED=true`;
/// - otherwise `OTEL_SERVICE_NAME` (`serviceName`, else `resourceAttributes["service.name"]`,
///   else the name of the relay's Deployment), `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
///   `OTEL_EXPORTER_OTLP_HEADERS` (from the Secret), `OTEL_TRACES_SAMPLER`,
///   `OTEL_TRACES_SAMPLER_ARG` (the optional ones only when set) and
///   `OTEL_RESOURCE_ATTRIBUTES`: `k8s.namespace.name`, `k8s.deployment.name`,
///   `k8s.pod.name` (`$(POD_NAME)`, which the kubelet expands), then the spec's attributes,
///   which replace an added key of the same name.
///
/// The container must define `POD_NAME` before these variables.
pub fn tracing_env<W: Workload>(relay: &W) -> Vec<EnvVar> {
    let Some(tracing) = relay.worker().tracing else {
        return Vec::new();
    };
    let Some(endpoint) = tracing.endpoint.as_ref().filter(|_| tracing.enabled) else {
        return vec![env("OTEL_SDK_DISABLED", "true")];
    };
    let name = relay.object_name();
    let user_attrs = tracing.resource_attributes.clone().unwrap_or_default();
    let service_name = tracing
        .service_name
        .clone()
        .or_else(|| user_attrs.get("service.name").cloned())
        .unwrap_or_else(|| name.clone());
    let mut vars = vec![
        env("OTEL_SERVICE_NAME", literal(&service_name)),
        env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
    ];
    if let Some(protocol) = tracing.protocol {
        vars.push(env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.as_str()));
    }
    if let Some(headers) = &tracing.headers_secret_ref {
        vars.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_HEADERS".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: headers.name.clone(),
                    key: headers.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        });
    }
    if let Some(sampler) = tracing.sampler {
        vars.push(env("OTEL_TRACES_SAMPLER", sampler.as_str()));
    }
    if let Some(arg) = tracing.sampler_arg {
        vars.push(env("OTEL_TRACES_SAMPLER_ARG", arg.to_string()));
    }
    // Names of Kubernetes objects need no encoding.
    let mut attrs: Vec<(String, String)> = vec![
        (
            "k8s.namespace.name".into(),
            relay.namespace().unwrap_or_default(),
        ),
        ("k8s.deployment.name".into(), name),
        ("k8s.pod.name".into(), format!("$({POD_NAME_ENV})")),
    ];
    for (key, value) in &user_attrs {
        let encoded = literal(&encode_resource_attribute_value(value));
        match attrs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = encoded,
            None => attrs.push((key.clone(), encoded)),
        }
    }
    let joined: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    vars.push(env("OTEL_RESOURCE_ATTRIBUTES", joined.join(",")));
    vars
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("50m".into())),
            ("memory".into(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity("256Mi".into()),
        )])),
        claims: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(2),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Translates `relay` into the objects to apply. `secret_hash` is the hash of the
/// referenced Secret keys (see `reconcile::secret_hash`); it ends up in a pod-template
/// annotation so that rotating the secret rolls the pods.
pub fn desired<W: Workload>(
    relay: &W,
    settings: &Settings,
    secret_hash: &str,
) -> Result<Desired, DesiredError> {
    relay.validate()?;
    let spec = relay.worker();
    let image = settings.image(spec.image)?;
    let name = relay.object_name();
    let namespace = relay
        .namespace()
        .ok_or(DesiredError::MissingMetadata("namespace"))?;
    let owner = owner_reference(relay)?;
    let labels = labels(relay, &image);
    let selector = selector_labels(relay);
    let lease_name = relay.lease_name();
    let le = spec.leader_election_or_default();

    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };

    let service_account = ServiceAccount {
        metadata: meta(&name),
        automount_service_account_token: Some(true),
        ..Default::default()
    };

    let leases = || PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(&name),
        rules: Some(vec![
            PolicyRule {
                resource_names: Some(vec![lease_name.clone()]),
                verbs: vec!["get".into(), "update".into(), "patch".into()],
                ..leases()
            },
            // `create` cannot be restricted by resourceNames.
            PolicyRule {
                verbs: vec!["create".into()],
                ..leases()
            },
        ]),
    };

    let role_binding = RoleBinding {
        metadata: meta(&name),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: Some(namespace.clone()),
            api_group: None,
        }]),
    };

    let mut env_vars = vec![EnvVar {
        name: "DATABASE_URL".into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: spec.url_secret_ref.name.clone(),
                key: spec.url_secret_ref.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }];
    env_vars.extend(relay.worker_env());
    if let Some(host) = spec.emulator_host {
        env_vars.push(env("PUBSUB_EMULATOR_HOST", host));
    }
    if spec.credentials_secret_ref.is_some() {
        env_vars.push(env(
            "GOOGLE_APPLICATION_CREDENTIALS",
            format!("{CREDENTIALS_DIR}/{CREDENTIALS_FILE}"),
        ));
    }
    let backend = if relay.elects_leader() {
        "kubernetes"
    } else {
        "none"
    };
    env_vars.extend([
        env("HEALTH_ADDR", format!("0.0.0.0:{HTTP_PORT}")),
        env("LOG_FORMAT", "json"),
        env("LEADER_ELECTION", backend),
    ]);
    if relay.elects_leader() {
        env_vars.extend([
            env("LEASE_NAME", lease_name.clone()),
            env("LEASE_DURATION", le.lease_duration.clone()),
            env("RENEW_DEADLINE", le.renew_deadline.clone()),
            env("RETRY_PERIOD", le.retry_period.clone()),
            // The Lease the workers create belongs to the relay: it goes with it.
            env("LEASE_OWNER_API_VERSION", owner.api_version.clone()),
            env("LEASE_OWNER_KIND", owner.kind.clone()),
            env("LEASE_OWNER_NAME", owner.name.clone()),
            env("LEASE_OWNER_UID", owner.uid.clone()),
        ]);
    }
    env_vars.extend([
        env_field(POD_NAME_ENV, "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
    ]);
    // After POD_NAME: OTEL_RESOURCE_ATTRIBUTES refers to it as $(POD_NAME).
    env_vars.extend(tracing_env(relay));

    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: Some(Quantity("16Mi".into())),
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if let Some(creds) = spec.credentials_secret_ref {
        volumes.push(Volume {
            name: "google-credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(creds.name.clone()),
                items: Some(vec![KeyToPath {
                    key: creds.key.clone(),
                    path: CREDENTIALS_FILE.into(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "google-credentials".into(),
            mount_path: CREDENTIALS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }

    let seccomp = || {
        Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        })
    };
    let container = Container {
        name: W::COMPONENT.into(),
        image: Some(image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["outbox-worker".into()]),
        args: Some(vec![
            W::COMPONENT.into(),
            "--leader-election".into(),
            backend.into(),
        ]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        resources: Some(spec.resources.cloned().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT_UID),
            run_as_group: Some(NONROOT_UID),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: seccomp(),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let mut pod_annotations = BTreeMap::from([
        (SECRET_HASH_ANNOTATION.to_owned(), secret_hash.to_owned()),
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), HTTP_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    pod_annotations.insert(
        "kubectl.kubernetes.io/default-container".into(),
        W::COMPONENT.into(),
    );

    let deployment = Deployment {
        metadata: meta(&name),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    automount_service_account_token: Some(true),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(NONROOT_UID),
                        run_as_group: Some(NONROOT_UID),
                        fs_group: Some(NONROOT_UID),
                        seccomp_profile: seccomp(),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: spec.node_selector.cloned(),
                    tolerations: spec.tolerations.cloned(),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    };

    let pod_disruption_budget = (spec.replicas > 1).then(|| PodDisruptionBudget {
        metadata: meta(&name),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            }),
            ..Default::default()
        }),
        status: None,
    });

    Ok(Desired {
        service_account,
        role,
        role_binding,
        deployment,
        pod_disruption_budget,
    })
}

#[cfg(test)]
mod tests {
    use super::image_version;

    #[test]
    fn version_label_from_image_tag() {
        assert_eq!(image_version("ghcr.io/a/b:1.2.3").as_deref(), Some("1.2.3"));
        assert_eq!(image_version("localhost:5000/b:v1").as_deref(), Some("v1"));
        assert_eq!(image_version("localhost:5000/b").as_deref(), None);
        assert_eq!(image_version("b@sha256:abc").as_deref(), None);
        assert_eq!(image_version("b:1.0@sha256:abc").as_deref(), Some("1.0"));
        assert_eq!(image_version("b:-bad").as_deref(), None);
        assert_eq!(
            image_version(&format!("b:{}", "1".repeat(64))).as_deref(),
            None
        );
    }
}
