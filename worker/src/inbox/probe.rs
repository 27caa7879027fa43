//! Keeps the backlog gauge and the readiness of both dependencies current,
//! also while no messages arrive.

use std::sync::Arc;
use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::store::InboxStore;
use crate::health::{Component, Health};
use crate::ident::SubscriptionName;
use crate::metrics::InboxMetrics;

/// What the probe looks at, and how often.
pub struct Probe {
    /// The inbox database.
    pub pool: PgPool,
    /// The inbox table, for the backlog count.
    pub store: InboxStore,
    /// The subscription pulled.
    pub subscription: SubscriptionName,
    /// `None` when no admin client could be built: readiness then follows
    /// the streaming pull only.
    pub admin: Option<Arc<google_cloud_pubsub::client::SubscriptionAdmin>>,
    /// Where the backlog goes.
    pub metrics: InboxMetrics,
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
            self.check_subscription(&mut warned_permission).await;
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

    async fn check_subscription(&self, warned_permission: &mut bool) {
        let (Some(admin), health, name) = (&self.admin, &self.health, &self.subscription) else {
            return;
        };
        let lookup = admin
            .get_subscription()
            .set_subscription(name.to_string())
            .send();
        match tokio::time::timeout(self.interval, lookup).await {
            Ok(Ok(_)) => health.ok(Component::PubSub),
            Ok(Err(e)) => match e.status().map(|s| s.code) {
                Some(Code::NotFound) => health.failing(
                    Component::PubSub,
                    format!("subscription {name} does not exist"),
                ),
                Some(Code::PermissionDenied) => {
                    // roles/pubsub.subscriber may pull but not read metadata.
                    if !*warned_permission {
                        info!(
                            "no permission to read subscription metadata; readiness follows the pull"
                        );
                        *warned_permission = true;
                        health.ok(Component::PubSub);
                    }
                }
                _ => health.failing(Component::PubSub, format!("unreachable: {e}")),
            },
            Err(_) => health.failing(Component::PubSub, "no answer within the probe interval"),
        }
    }
}
