//! The background readiness check every worker runs, also while idle or
//! standing by: the database answers (and the backlog gauge is refreshed), and
//! the worker's Pub/Sub resource exists.

use prometheus_client::metrics::gauge::Gauge;
use sqlx::{AssertSqlSafe, PgPool};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::health::{Component, Health};
use crate::pubsub::{PubSubResource, ResourceCheck};

/// What the probe looks at, and how often.
pub struct Probe {
    /// The worker's database.
    pub pool: PgPool,
    /// `SELECT count(*) ...` of pending rows, built by the worker's store from
    /// validated names.
    pub backlog_query: String,
    /// Where the pending-row count goes.
    pub backlog: Gauge,
    /// The topic or subscription; `None` when no admin client could be built
    /// (readiness then follows the worker's own Pub/Sub calls).
    pub resource: Option<Arc<PubSubResource>>,
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
            self.check_pubsub(&mut warned_permission).await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {},
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn check_database(&self) {
        let query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.backlog_query.as_str()))
            .fetch_one(&self.pool);
        match tokio::time::timeout(self.interval, query).await {
            Ok(Ok(n)) => {
                self.backlog.set(n);
                self.health.ok(Component::Database);
            }
            Ok(Err(e)) => self
                .health
                .failing(Component::Database, format!("unreachable: {e}")),
            Err(_) => self
                .health
                .failing(Component::Database, "no answer within the probe interval"),
        }
    }

    async fn check_pubsub(&self, warned_permission: &mut bool) {
        let Some(resource) = &self.resource else {
            return;
        };
        let health = &self.health;
        match tokio::time::timeout(self.interval, resource.check()).await {
            Ok(ResourceCheck::Exists) => health.ok(Component::PubSub),
            Ok(ResourceCheck::Missing) => health.failing(
                Component::PubSub,
                format!("{} does not exist", resource.describe()),
            ),
            Ok(ResourceCheck::NotPermitted) => {
                if !*warned_permission {
                    info!(
                        resource = %resource.describe(),
                        "no permission to read its metadata; readiness follows the worker's own Pub/Sub calls"
                    );
                    *warned_permission = true;
                    health.ok(Component::PubSub);
                }
            }
            Ok(ResourceCheck::Unreachable(e)) => {
                health.failing(Component::PubSub, format!("unreachable: {e}"))
            }
            Err(_) => health.failing(Component::PubSub, "no answer within the probe interval"),
        }
    }
}
