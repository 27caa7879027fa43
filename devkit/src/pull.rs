//! Raw Pub/Sub helpers for tests and benchmarks: publishing messages
//! directly (bypassing the outbox), and the reference pull+ack loops the
//! inbox worker's throughput is compared with.

use anyhow::Context;
use google_cloud_pubsub::model::Message;
use std::time::{Duration, Instant};

use outbox_worker::pubsub::{Batching, Endpoint, Publishers};

/// Publishes `messages` to `topic` directly, in order, and waits for every
/// acknowledgement; returns Pub/Sub's message ids.
pub async fn publish_raw(
    endpoint: &Endpoint,
    topic: &str,
    messages: Vec<Message>,
) -> anyhow::Result<Vec<String>> {
    let base = outbox_worker::pubsub::base_publisher(endpoint, Duration::from_secs(30)).await?;
    let mut publishers = Publishers::new(base, Batching::default(), Duration::from_secs(60));
    let topic: outbox_worker::ident::TopicName = topic.parse()?;
    let pending: Vec<_> = messages
        .into_iter()
        .map(|m| publishers.publish(&topic, m))
        .collect();
    let mut ids = Vec::with_capacity(pending.len());
    for p in pending {
        ids.push(p.await.context("publishing")?);
    }
    Ok(ids)
}

/// `n` messages of `payload_bytes` bytes each, with a `message-id` attribute
/// `{prefix}-{i}` and, when `keys > 0`, ordering key `key-{i % keys}`.
pub fn synthetic(prefix: &str, n: usize, payload_bytes: usize, keys: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let mut data = format!("{}:{i}:", i % keys.max(1)).into_bytes();
            data.resize(payload_bytes.max(data.len()), b'x');
            let m = Message::new()
                .set_data(data)
                .set_attributes([("message-id".to_owned(), format!("{prefix}-{i}"))]);
            if keys > 0 {
                m.set_ordering_key(format!("key-{}", i % keys))
            } else {
                m
            }
        })
        .collect()
}

/// How fast a loop drained a subscription.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Messages acknowledged.
    pub messages: usize,
    /// From the first pull to the last acknowledgement.
    pub elapsed: Duration,
}

impl Rate {
    /// Messages per second.
    pub fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The emulator's reference rate: a plain REST loop of `:pull` (up to 1000
/// messages) and `:acknowledge` (every ack id of that pull), with nothing
/// else to do, until `expected` messages were acknowledged or `timeout`.
/// Only for the emulator (no credentials).
pub async fn rest_pull_ack(
    emulator_host: &str,
    subscription: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Rate> {
    let client = reqwest::Client::new();
    let base = format!("http://{emulator_host}/v1/{subscription}");
    let deadline = Instant::now() + timeout;
    let mut started: Option<Instant> = None;
    let mut acked = 0usize;
    while acked < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "REST pull+ack: only {acked} of {expected} messages within {timeout:?}"
        );
        let response: serde_json::Value = client
            .post(format!("{base}:pull"))
            .json(&serde_json::json!({"maxMessages": 1000, "returnImmediately": false}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let ack_ids: Vec<&str> = response["receivedMessages"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["ackId"].as_str()).collect())
            .unwrap_or_default();
        if ack_ids.is_empty() {
            continue;
        }
        started.get_or_insert_with(Instant::now);
        client
            .post(format!("{base}:acknowledge"))
            .json(&serde_json::json!({ "ackIds": ack_ids }))
            .send()
            .await?
            .error_for_status()?;
        acked += ack_ids.len();
    }
    Ok(Rate {
        messages: acked,
        elapsed: started.map(|s| s.elapsed()).unwrap_or_default(),
    })
}

/// Pulls once without acknowledging and without waiting for messages to
/// arrive (REST, emulator only): how many messages the subscription would
/// hand out right now. Used to show that nothing was left unacknowledged.
pub async fn rest_peek(emulator_host: &str, subscription: &str) -> anyhow::Result<usize> {
    let response = reqwest::Client::new()
        .post(format!("http://{emulator_host}/v1/{subscription}:pull"))
        .json(&serde_json::json!({"maxMessages": 1000, "returnImmediately": true}))
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    anyhow::ensure!(status.is_success(), "pull answered {status}: {body}");
    let response: serde_json::Value = serde_json::from_str(&body)?;
    Ok(response["receivedMessages"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0))
}

/// Settings of the Rust client's streaming pull, for [`streaming_pull_ack`].
#[derive(Clone, Copy, Debug)]
pub struct StreamSettings {
    /// Parallel streams (each on its own gRPC subchannel).
    pub streams: usize,
    /// Flow control per stream.
    pub max_outstanding_messages: i64,
    /// Flow control per stream.
    pub max_outstanding_bytes: i64,
}

/// The Rust client's streaming pull, acknowledging each message at once,
/// until `expected` messages arrived (duplicates included) or `timeout`.
pub async fn streaming_pull_ack(
    endpoint: &Endpoint,
    subscription: &str,
    settings: StreamSettings,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Rate> {
    let client = outbox_worker::inbox::source::subscriber(endpoint, settings.streams).await?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..settings.streams.max(1) {
        let mut stream = client
            .subscribe(subscription)
            .set_max_outstanding_messages(settings.max_outstanding_messages)
            .set_max_outstanding_bytes(settings.max_outstanding_bytes)
            .build();
        let (count, first, stop) = (count.clone(), first.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = stop.cancelled() => break,
                };
                match next {
                    Some(Ok((_, handler))) => {
                        handler.ack();
                        first
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert_with(Instant::now);
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "streaming pull failed");
                        break;
                    }
                    None => break,
                }
            }
            stream.shutdown_token().shutdown().await;
        }));
    }
    let waited = crate::wait_for("streaming pull to receive everything", timeout, || {
        let n = count.load(std::sync::atomic::Ordering::Relaxed);
        async move { (n >= expected).then_some(()) }
    })
    .await;
    let end = Instant::now();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    waited?;
    let started = first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(end);
    Ok(Rate {
        messages: count.load(std::sync::atomic::Ordering::Relaxed),
        elapsed: end.duration_since(started),
    })
}
