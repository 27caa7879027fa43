//! Connecting to Pub/Sub: the real service with Application Default
//! Credentials, or the emulator when `PUBSUB_EMULATOR_HOST` is set.

use google_cloud_auth::credentials::anonymous;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher};
use google_cloud_pubsub::retry_policy::RetryableErrors;
use std::collections::HashMap;
use std::time::Duration;

use crate::ident::{SubscriptionName, TopicName};

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

/// Batching for the relay: we hand over whole claimed batches, so the client
/// should send as soon as a request is full or the batch is handed over.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Messages per publish request (Pub/Sub allows 1000).
    pub max_messages: u32,
    /// Bytes per publish request (Pub/Sub allows 10 MB).
    pub max_bytes: u32,
    /// How long the client waits for more messages before sending.
    pub max_delay: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_messages: 1000,
            max_bytes: 9_000_000,
            max_delay: Duration::from_millis(1),
        }
    }
}

/// One [`Publisher`] per destination topic, created on first use and sharing
/// the underlying connection.
pub struct Publishers {
    base: BasePublisher,
    batching: Batching,
    by_topic: HashMap<TopicName, Publisher>,
}

impl Publishers {
    /// A cache on top of one connection.
    pub fn new(base: BasePublisher, batching: Batching) -> Self {
        Publishers {
            base,
            batching,
            by_topic: HashMap::new(),
        }
    }

    /// The publisher for `topic`.
    pub fn get(&mut self, topic: &TopicName) -> &Publisher {
        let base = &self.base;
        let batching = self.batching;
        self.by_topic.entry(topic.clone()).or_insert_with(|| {
            base.publisher(topic.to_string())
                .set_message_count_threshold(batching.max_messages)
                .set_byte_threshold(batching.max_bytes)
                .set_delay_threshold(batching.max_delay)
                .build()
        })
    }

    /// Sends whatever the publishers still buffer (used at shutdown).
    pub async fn flush_all(&self) {
        for publisher in self.by_topic.values() {
            publisher.flush().await;
        }
    }
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
