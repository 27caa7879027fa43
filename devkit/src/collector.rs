//! A subscriber that records everything it receives, for assertions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use outbox_worker::pubsub::Endpoint;

/// One received message.
#[derive(Clone, Debug)]
pub struct Received {
    /// Message data (empty for a collector that keeps no data).
    pub data: Vec<u8>,
    /// Attributes, including `message-id`.
    pub attributes: HashMap<String, String>,
    /// Ordering key ("" for none).
    pub ordering_key: String,
    /// The `message-id` attribute.
    pub message_id: String,
    /// Pub/Sub's id of this publication (a re-publication gets a new one; a
    /// redelivery keeps it).
    pub pubsub_id: String,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// Pulls a subscription in the background (restarting the stream after
/// errors, e.g. while the emulator is down) and acknowledges everything.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Collector {
    /// Starts pulling `subscription` from `endpoint`.
    pub fn start(endpoint: Endpoint, subscription: String) -> Collector {
        Self::with_streams(endpoint, subscription, 1)
    }

    /// Pulls with several streams at once. The emulator hands each stream
    /// ~100 messages per 50 ms (~1.9k msg/s), so a fast consumer needs
    /// several; arrival order across streams is not defined, so tests that
    /// check per-key order use one.
    pub fn with_streams(endpoint: Endpoint, subscription: String, streams: usize) -> Collector {
        Self::build(endpoint, subscription, streams, true)
    }

    /// Like [`Collector::with_streams`], but keeps no message data (for long
    /// runs with large payloads).
    pub fn without_data(endpoint: Endpoint, subscription: String, streams: usize) -> Collector {
        Self::build(endpoint, subscription, streams, false)
    }

    fn build(
        endpoint: Endpoint,
        subscription: String,
        streams: usize,
        keep_data: bool,
    ) -> Collector {
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let streams: Vec<_> = (0..streams.max(1))
            .map(|_| {
                tokio::spawn(pull(
                    endpoint.clone(),
                    subscription.clone(),
                    received.clone(),
                    stop.clone(),
                    keep_data,
                ))
            })
            .collect();
        let task = tokio::spawn(async move {
            for stream in streams {
                let _ = stream.await;
            }
        });
        Collector {
            received,
            stop,
            task: Some(task),
        }
    }

    /// How many messages arrived so far (duplicates included).
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// How many distinct `message-id`s arrived so far.
    pub fn distinct(&self) -> usize {
        let all = self.lock();
        all.iter()
            .map(|m| m.message_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// A copy of what arrived so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Received> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until at least `n` distinct `message-id`s arrived.
    pub async fn wait_distinct(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        crate::wait_for(&format!("{n} distinct messages"), timeout, || async {
            let all = self.snapshot();
            let distinct: std::collections::HashSet<_> =
                all.iter().map(|m| &m.message_id).collect();
            (distinct.len() >= n).then(|| all.clone())
        })
        .await
        .map_err(|e| {
            let all = self.snapshot();
            let distinct: std::collections::HashSet<_> =
                all.iter().map(|m| &m.message_id).collect();
            e.context(format!(
                "received {} messages, {} distinct",
                all.len(),
                distinct.len()
            ))
        })
    }

    /// Stops pulling.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pull(
    endpoint: Endpoint,
    subscription: String,
    received: Arc<Mutex<Vec<Received>>>,
    stop: CancellationToken,
    keep_data: bool,
) {
    while !stop.is_cancelled() {
        let client = match outbox_worker::pubsub::subscriber(&endpoint).await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "collector: cannot create subscriber");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut stream = client
            .subscribe(subscription.clone())
            .set_max_outstanding_messages(20_000)
            .set_max_outstanding_bytes(512 * 1024 * 1024)
            .build();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = stop.cancelled() => return,
            };
            match next {
                Some(Ok((message, handler))) => {
                    let message_id = message
                        .attributes
                        .get(outbox_worker::pubsub::MESSAGE_ID_ATTRIBUTE)
                        .cloned()
                        .unwrap_or_default();
                    received
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Received {
                            data: if keep_data {
                                message.data.to_vec()
                            } else {
                                Vec::new()
                            },
                            attributes: message.attributes.clone(),
                            ordering_key: message.ordering_key.clone(),
                            message_id,
                            pubsub_id: message.message_id.clone(),
                            at: std::time::Instant::now(),
                        });
                    handler.ack();
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "collector: stream error; reconnecting");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
