//! Receiving: one or more streaming pulls of the subscription feeding a
//! bounded channel that the store loop drains in batches.
//!
//! The client library leases what it hands out and extends the leases until
//! the handler is acknowledged (after the inbox commit) or dropped (a nack:
//! Pub/Sub redelivers). Acknowledgements are sent in batches by the library's
//! lease loop (every 100 ms, up to 1000 ids per request).

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::health::{Component, Health};
use crate::ident::SubscriptionName;
use crate::metrics::InboxMetrics;
use crate::pubsub::Endpoint;

/// A received message and the handle that acknowledges it.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Acknowledge after the commit; dropping it nacks (redelivery).
    pub handler: Handler,
}

/// Flow control of the streaming pull.
#[derive(Clone, Debug)]
pub struct FlowControl {
    /// Parallel streaming-pull streams (each on its own gRPC subchannel).
    pub streams: usize,
    /// Messages Pub/Sub may have outstanding (unacknowledged) per stream.
    pub max_outstanding_messages: i64,
    /// Bytes Pub/Sub may have outstanding per stream.
    pub max_outstanding_bytes: i64,
    /// The lease the client asks for and keeps extending while a message is
    /// being stored (10 s to 10 min). After a crash, Pub/Sub redelivers the
    /// unacknowledged messages once this much time has passed.
    pub ack_deadline: Duration,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            streams: 8,
            max_outstanding_messages: 1_250,
            max_outstanding_bytes: 32 * 1024 * 1024,
            ack_deadline: Duration::from_secs(10),
        }
    }
}

/// The streaming-pull client, with one gRPC subchannel per stream.
pub async fn subscriber(
    endpoint: &Endpoint,
    streams: usize,
) -> Result<Subscriber, google_cloud_gax::client_builder::Error> {
    let mut builder = Subscriber::builder().with_grpc_subchannel_count(streams.max(1));
    if let Some(url) = endpoint.emulator_url() {
        builder = builder
            .with_endpoint(url)
            .with_credentials(anonymous::Builder::new().build());
    }
    builder.build().await
}

/// What a pulling task needs.
pub(super) struct Puller {
    pub client: Subscriber,
    pub subscription: SubscriptionName,
    pub flow: FlowControl,
    pub metrics: InboxMetrics,
    pub health: Health,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Puller {
    /// Pulls until `stop`, sending each delivery into `tx`. Stream errors
    /// reopen the stream after a backoff. On stop, waits until every handed
    /// out handler was acknowledged or dropped, so that the library's last
    /// acknowledgements are sent before the task ends.
    pub(super) async fn run(
        self,
        index: usize,
        tx: mpsc::Sender<Delivery>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(self.retry_min, self.retry_max);
        while !stop.is_cancelled() {
            let mut stream = self
                .client
                .subscribe(self.subscription.to_string())
                .set_max_outstanding_messages(self.flow.max_outstanding_messages)
                .set_max_outstanding_bytes(self.flow.max_outstanding_bytes)
                .set_max_lease_extension(self.flow.ack_deadline)
                .build();
            debug!(stream = index, "streaming pull opened");
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok((message, handler))) => {
                        backoff.reset();
                        self.metrics.received.inc();
                        let delivery = Delivery { message, handler };
                        let sent = tokio::select! {
                            biased;
                            _ = stop.cancelled() => false,
                            sent = tx.send(delivery) => sent.is_ok(),
                        };
                        if !sent {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        self.metrics.stream_errors.inc();
                        self.health
                            .failing(Component::PubSub, format!("streaming pull failed: {e}"));
                        warn!(stream = index, error = %e, "streaming pull failed; reopening");
                        break;
                    }
                    None => break,
                }
            }
            if stop.is_cancelled() {
                drop(tx);
                // Let the library flush the acknowledgements of everything
                // still being stored; it returns once all handlers are done.
                stream.shutdown_token().shutdown().await;
                info!(stream = index, "streaming pull closed");
                return;
            }
            drop(stream);
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {},
                _ = stop.cancelled() => return,
            }
        }
    }
}
