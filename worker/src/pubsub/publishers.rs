//! One `Publisher` per destination topic, all on one connection, created on
//! first use and let go again.
//!
//! Let go when idle for `idle_timeout` (a relay routes to many topics over
//! its life), and renewed once it has served `max_keys` ordering keys: the
//! client keeps a task and a channel per ordering key for the publisher's
//! whole life (its own TODO, googleapis/google-cloud-rust#4012), so a relay
//! whose keys are order ids would otherwise grow by a few kilobytes for
//! every order. Both happen only when the relay says nothing is in flight
//! ([`Publishers::tidy`]), so no pending message or paused key is lost.

use google_cloud_pubsub::client::{BasePublisher, Publisher};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::publisher::PublishFuture;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::ident::TopicName;

/// Batching for the relay: it hands over whole claimed batches, so the
/// client should send as soon as a request is full or the batch is handed
/// over.
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

/// Ordering keys a publisher serves before it is renewed (each costs the
/// client a few kilobytes until then).
pub const DEFAULT_MAX_KEYS: usize = 4_096;

/// The publishers of one relay (or tool).
pub struct Publishers {
    base: BasePublisher,
    batching: Batching,
    idle_timeout: Duration,
    max_keys: usize,
    by_topic: HashMap<TopicName, Cached>,
}

struct Cached {
    publisher: Publisher,
    last_used: Instant,
    /// Ordering keys this publisher has a task for.
    keys: HashSet<String>,
}

impl Publishers {
    /// Publishers on `base`; one unused for `idle_timeout` is let go at the
    /// next [`Publishers::tidy`].
    pub fn new(base: BasePublisher, batching: Batching, idle_timeout: Duration) -> Self {
        Publishers {
            base,
            batching,
            idle_timeout,
            max_keys: DEFAULT_MAX_KEYS,
            by_topic: HashMap::new(),
        }
    }

    /// Hands `message` to the publisher of `topic`; the future resolves with
    /// Pub/Sub's answer. Messages of one ordering key are sent in the order
    /// they are handed over.
    pub fn publish(&mut self, topic: &TopicName, message: Message) -> PublishFuture {
        let cached = self.cached(topic);
        if !message.ordering_key.is_empty() && !cached.keys.contains(&message.ordering_key) {
            cached.keys.insert(message.ordering_key.clone());
        }
        cached.publisher.publish(message)
    }

    /// Sends what the publisher of `topic` buffers now, and waits for it.
    pub async fn flush(&self, topic: &TopicName) {
        if let Some(cached) = self.by_topic.get(topic) {
            cached.publisher.flush().await;
        }
    }

    /// Lets a key the client paused after a failure publish again.
    pub fn resume(&self, topic: &TopicName, ordering_key: &str) {
        if let Some(cached) = self.by_topic.get(topic) {
            cached.publisher.resume_publish(ordering_key);
        }
    }

    /// Whether a publisher has served so many ordering keys that it should
    /// be renewed at the next quiet moment.
    pub fn want_renewal(&self) -> bool {
        self.by_topic
            .values()
            .any(|c| c.keys.len() >= self.max_keys)
    }

    /// Lets go of idle publishers and of those past the key limit (a new one
    /// is created on next use). Call only while no publish is in flight and
    /// no key is paused. Returns how many publishers are left.
    pub fn tidy(&mut self, now: Instant) -> usize {
        let (idle, max_keys) = (self.idle_timeout, self.max_keys);
        self.by_topic.retain(|topic, cached| {
            let keep = now.duration_since(cached.last_used) < idle && cached.keys.len() < max_keys;
            if !keep {
                tracing::debug!(%topic, keys = cached.keys.len(), "letting go of a publisher");
            }
            keep
        });
        self.by_topic.len()
    }

    /// Sends whatever the publishers still buffer (used at shutdown).
    pub async fn flush_all(&self) {
        for cached in self.by_topic.values() {
            cached.publisher.flush().await;
        }
    }

    fn cached(&mut self, topic: &TopicName) -> &mut Cached {
        let (base, batching) = (&self.base, self.batching);
        let cached = self
            .by_topic
            .entry(topic.clone())
            .or_insert_with(|| Cached {
                publisher: base
                    .publisher(topic.to_string())
                    .set_message_count_threshold(batching.max_messages)
                    .set_byte_threshold(batching.max_bytes)
                    .set_delay_threshold(batching.max_delay)
                    .build(),
                last_used: Instant::now(),
                keys: HashSet::new(),
            });
        cached.last_used = Instant::now();
        cached
    }
}
