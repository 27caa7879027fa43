//! Keeps the backlog gauge and the readiness of both dependencies current,
//! also while the relay is idle (or, later, standing by).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::store::OutboxStore;
use crate::health::{Component, Health};
use crate::ident::TopicName;
use crate::metrics::RelayMetrics;
use crate::pubsub::{TopicCheck, check_topic};

/// What the probe looks at, and how often.
pub struct Probe {
    /// The relay's database.
    pub pool: PgPool,
    /// The outbox table, for the backlog count.
    pub store: OutboxStore,
    /// The relay's own topic.
    pub topic: TopicName,
    /// `None` when no admin client could be built: readiness then follows
    /// publish results only.
    pub admin: Option<Arc<google_cloud_pubsub::client::TopicAdmin>>,
    /// Where the backlog goes.
    pub metrics: RelayMetrics,
    /// Where readiness goes.
    pub health: Health,
    /// Time between checks, and the timeout of each.
    pub interval: Duration,
}

impl Probe {
    /// Checks until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut warned_permission = false;
        loop {
            self.check_database().await;
            self.check_topic(&mut warned_permission).await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {},
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn check_database(&self) {
        let health = &self.health;
        match tokio::time::timeout(self.interval, self.store.backlog(&self.pool)).await {
            Ok(Ok(n)) => {
                self.metrics.backlog.set(n);
                health.ok(Component::Database);
            }
            Ok(Err(e)) => health.failing(Component::Database, format!("unreachable: {e}")),
            Err(_) => health.failing(Component::Database, "no answer within the probe interval"),
        }
    }

    async fn check_topic(&self, warned_permission: &mut bool) {
        let (Some(admin), health, topic) = (&self.admin, &self.health, &self.topic) else {
            return;
        };
        match tokio::time::timeout(self.interval, check_topic(admin, topic)).await {
            Ok(TopicCheck::Exists) => health.ok(Component::PubSub),
            Ok(TopicCheck::Missing) => {
                health.failing(Component::PubSub, format!("topic {topic} does not exist"))
            }
            Ok(TopicCheck::NotPermitted) => {
                if !*warned_permission {
                    info!(
                        "no permission to read topic metadata; readiness follows publish results"
                    );
                    *warned_permission = true;
                    health.ok(Component::PubSub);
                }
            }
            Ok(TopicCheck::Unreachable(e)) => {
                health.failing(Component::PubSub, format!("unreachable: {e}"))
            }
            Err(_) => health.failing(Component::PubSub, "no answer within the probe interval"),
        }
    }
}
