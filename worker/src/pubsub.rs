//! Everything about Pub/Sub in one place: connecting (the real service with
//! Application Default Credentials, or the emulator when
//! `PUBSUB_EMULATOR_HOST` is set), the publishers per topic
//! ([`publishers`]), the `message-id` attribute subscribers deduplicate on,
//! what a failed publish means for the row ([`classify`]), and the
//! readiness check of a topic or subscription.

mod publishers;

pub use publishers::{Batching, Publishers};

use google_cloud_auth::credentials::anonymous;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::retry_policy::RetryableErrors;
use std::time::Duration;

use crate::ident::{SubscriptionName, TopicName};

/// The attribute that carries an outbox row's stable id (its `message_id`
/// column, or the application's own non-empty value). It survives
/// re-publication, unlike Pub/Sub's messageId, so subscribers (the inbox
/// worker among them) deduplicate on it.
pub const MESSAGE_ID_ATTRIBUTE: &str = "message-id";

/// What a failed publish means for the row. Decided by [`classify`] and
/// nowhere else; the relay acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pub/Sub rejected the message itself (`INVALID_ARGUMENT` for a message
    /// that was published alone, e.g. a payload the topic's schema refuses):
    /// it never will be accepted. Dead-letter it.
    Invalid,
    /// `INVALID_ARGUMENT` for a request that held other messages too: any of
    /// them may be the cause. Publish it alone to find out.
    Suspect,
    /// A routed topic refuses it (`PERMISSION_DENIED`, `NOT_FOUND`,
    /// `FAILED_PRECONDITION`, ...): perhaps only for now (a topic or a grant
    /// not yet in place). Retry a bounded number of times, then dead-letter.
    Refused,
    /// The relay's own topic refuses it (missing, or not permitted): the
    /// relay is misconfigured, not the row. Report not ready and retry.
    OwnTopicRefused,
    /// No answer in time (`DEADLINE_EXCEEDED`, or the client's time limit):
    /// retry with less in flight.
    Timeout,
    /// Not this message's fault: the ordering key was paused after an
    /// earlier message of the key failed, or the publisher shut down. Retry
    /// as soon as the cause is dealt with.
    Paused,
    /// Pub/Sub unreachable or failing (`UNAVAILABLE`, `INTERNAL`,
    /// `RESOURCE_EXHAUSTED`, a broken connection, ...): retry after a backoff.
    Outage,
}

/// Classifies a failed publish of a message sent to the relay's own topic
/// (`own_topic`) or a routed one, in a request of its own (`alone`) or
/// together with others.
pub fn classify(error: &PublishError, own_topic: bool, alone: bool) -> Verdict {
    let PublishError::Rpc(e) = error else {
        // OrderingKeyPaused, Shutdown (and future variants): a consequence.
        return Verdict::Paused;
    };
    if e.is_timeout() {
        return Verdict::Timeout;
    }
    let refused = |own_topic: bool| {
        if own_topic {
            Verdict::OwnTopicRefused
        } else {
            Verdict::Refused
        }
    };
    match e.status().map(|s| s.code) {
        Some(Code::InvalidArgument) if alone => Verdict::Invalid,
        Some(Code::InvalidArgument) => Verdict::Suspect,
        Some(Code::DeadlineExceeded) => Verdict::Timeout,
        Some(
            Code::NotFound
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented,
        ) => refused(own_topic),
        _ => Verdict::Outage,
    }
}

/// A readable reason for logs and the dead-letter table: destination,
/// status code and the service's message.
pub fn describe(error: &PublishError, topic: &TopicName) -> String {
    match error {
        PublishError::Rpc(e) => match e.status() {
            Some(status) => format!(
                "Pub/Sub rejected the message for {topic}: {:?}: {}",
                status.code, status.message
            ),
            None => format!("publishing to {topic} failed: {e}"),
        },
        other => format!("publishing to {topic} failed: {other}"),
    }
}

/// The environment variable Google's clients read to find the emulator.
pub const EMULATOR_HOST_ENV: &str = "PUBSUB_EMULATOR_HOST";

/// Where and how to reach Pub/Sub.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// `host:port` of the emulator; `None` for the real service.
    pub emulator_host: Option<String>,
}

impl Endpoint {
    /// Reads `PUBSUB_EMULATOR_HOST`, like Google's own clients.
    pub fn from_env() -> Self {
        Endpoint {
            emulator_host: std::env::var(EMULATOR_HOST_ENV)
                .ok()
                .filter(|h| !h.trim().is_empty()),
        }
    }

    /// The gRPC endpoint URL for the emulator, if one is configured.
    pub fn emulator_url(&self) -> Option<String> {
        self.emulator_host.as_ref().map(|host| {
            if host.starts_with("http://") || host.starts_with("https://") {
                host.clone()
            } else {
                format!("http://{host}")
            }
        })
    }
}

/// Builds the shared publishing connection. Each publish attempt (with the
/// client's own retries of transient errors) is bounded by `attempt_timeout`;
/// after that the relay's loop takes over with its own backoff, so a long
/// outage never blocks shutdown or hides behind the client.
pub async fn base_publisher(
    endpoint: &Endpoint,
    attempt_timeout: Duration,
) -> Result<BasePublisher, google_cloud_gax::client_builder::Error> {
    let mut builder = BasePublisher::builder()
        .with_retry_policy(RetryableErrors.with_time_limit(attempt_timeout));
    if let Some(url) = endpoint.emulator_url() {
        builder = builder
            .with_endpoint(url)
            .with_credentials(anonymous::Builder::new().build());
    }
    builder.build().await
}

/// The admin client for topics, pointed at the same endpoint.
pub async fn topic_admin(
    endpoint: &Endpoint,
) -> Result<google_cloud_pubsub::client::TopicAdmin, google_cloud_gax::client_builder::Error> {
    let mut builder = google_cloud_pubsub::client::TopicAdmin::builder();
    if let Some(url) = endpoint.emulator_url() {
        builder = builder
            .with_endpoint(url)
            .with_credentials(anonymous::Builder::new().build());
    }
    builder.build().await
}

/// The admin client for subscriptions, pointed at the same endpoint.
pub async fn subscription_admin(
    endpoint: &Endpoint,
) -> Result<google_cloud_pubsub::client::SubscriptionAdmin, google_cloud_gax::client_builder::Error>
{
    let mut builder = google_cloud_pubsub::client::SubscriptionAdmin::builder();
    if let Some(url) = endpoint.emulator_url() {
        builder = builder
            .with_endpoint(url)
            .with_credentials(anonymous::Builder::new().build());
    }
    builder.build().await
}

/// The streaming-pull client, pointed at the same endpoint.
pub async fn subscriber(
    endpoint: &Endpoint,
) -> Result<google_cloud_pubsub::client::Subscriber, google_cloud_gax::client_builder::Error> {
    let mut builder = google_cloud_pubsub::client::Subscriber::builder();
    if let Some(url) = endpoint.emulator_url() {
        builder = builder
            .with_endpoint(url)
            .with_credentials(anonymous::Builder::new().build());
    }
    builder.build().await
}

/// What a readiness check learned about a topic or subscription.
#[derive(Debug, PartialEq, Eq)]
pub enum ResourceCheck {
    /// It exists.
    Exists,
    /// It does not exist: the worker cannot succeed.
    Missing,
    /// We may publish or pull but not read its metadata (`roles/pubsub.publisher`
    /// and `roles/pubsub.subscriber` lack `*.get`); reachability is then judged
    /// by the worker's own calls.
    NotPermitted,
    /// Pub/Sub could not be reached or answered with another error.
    Unreachable(String),
}

/// The Pub/Sub resource a worker depends on, with the client to look it up.
pub enum PubSubResource {
    /// The relay's own topic.
    Topic(google_cloud_pubsub::client::TopicAdmin, TopicName),
    /// The inbox worker's subscription.
    Subscription(
        google_cloud_pubsub::client::SubscriptionAdmin,
        SubscriptionName,
    ),
}

impl PubSubResource {
    /// "topic projects/p/topics/t", for readiness messages.
    pub fn describe(&self) -> String {
        match self {
            PubSubResource::Topic(_, name) => format!("topic {name}"),
            PubSubResource::Subscription(_, name) => format!("subscription {name}"),
        }
    }

    /// Looks the resource up.
    pub async fn check(&self) -> ResourceCheck {
        use google_cloud_gax::error::rpc::Code;
        let result = match self {
            PubSubResource::Topic(admin, name) => admin
                .get_topic()
                .set_topic(name.to_string())
                .send()
                .await
                .map(|_| ()),
            PubSubResource::Subscription(admin, name) => admin
                .get_subscription()
                .set_subscription(name.to_string())
                .send()
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => ResourceCheck::Exists,
            Err(e) => match e.status().map(|s| s.code) {
                Some(Code::NotFound) => ResourceCheck::Missing,
                Some(Code::PermissionDenied) => ResourceCheck::NotPermitted,
                _ => ResourceCheck::Unreachable(e.to_string()),
            },
        }
    }
}
