//! The background readiness check every worker runs, also while idle or
//! standing by: the database answers (and the lag figures are refreshed),
//! and the worker's Pub/Sub resource exists.
//!
//! The probe has a connection of its own, on which the server ends any
//! statement after the probe interval (`statement_timeout`): a figure that
//! takes long to compute on a large table is skipped, instead of running on
//! after the probe gave up and holding a connection the worker needs. The
//! figures are cheap by construction: the age of the oldest pending row
//! reads one index entry, and the backlog is counted exactly only up to
//! [`BACKLOG_EXACT_UP_TO`] rows.
//!
//! Besides the gauges, each round publishes what it read as [`Figures`]
//! (`None` for a figure it could not read this round), which the leader's
//! status report on its Lease is built from (`crate::report`).

use chrono::{DateTime, Utc};
use prometheus_client::metrics::gauge::Gauge;
use sqlx::{AssertSqlSafe, PgPool};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::health::{Component, Health};
use crate::pubsub::{PubSubResource, ResourceCheck};

/// Pending rows are counted exactly up to this many; beyond it the backlog
/// is PostgreSQL's estimate of live rows (outbox), or this cap (inbox).
pub const BACKLOG_EXACT_UP_TO: i64 = 100_000;

/// The SQL of the figures, built by each worker's store from validated names.
#[derive(Clone, Debug)]
pub struct ProbeQueries {
    /// Pending rows (one `bigint`).
    pub backlog: String,
    /// Seconds since the oldest pending row was written (one `float8`, or
    /// no row when nothing is pending).
    pub oldest_age: String,
    /// Rows given up on that wait for an operator (one `bigint`); the inbox
    /// has them (parked rows), the outbox does not (dead letters leave it).
    pub parked: Option<String>,
    /// When the newest processed row was processed (one `timestamptz`, or
    /// no row when none is); the inbox has it, the outbox does not.
    pub last_processed: Option<String>,
}

/// What the last probe round read; `None` where it could not (the
/// database did not answer, the figure took too long, or this worker has
/// no such figure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Pending rows.
    pub backlog: Option<i64>,
    /// Seconds since the oldest pending row was written (0 when none is).
    pub oldest_age: Option<f64>,
    /// Parked rows (inbox).
    pub parked: Option<i64>,
    /// The newest `processed_at` (inbox); `None` also when nothing was
    /// processed yet.
    pub last_processed: Option<DateTime<Utc>>,
}

/// `SELECT` of the rows of `table` (quoted) matching `filter`, counted up
/// to [`BACKLOG_EXACT_UP_TO`]; with no filter, the table's live-row
/// estimate beyond that.
pub fn capped_count(table: &str, filter: Option<&str>) -> String {
    let cap = BACKLOG_EXACT_UP_TO;
    let condition = filter.unwrap_or("TRUE");
    let beyond = match filter {
        None => format!(
            "greatest(c.n, coalesce((SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = '{table}'::regclass), 0))"
        ),
        Some(_) => "c.n".to_owned(),
    };
    format!(
        "SELECT CASE WHEN c.n < {cap} THEN c.n ELSE {beyond} END \
         FROM (SELECT count(*) AS n FROM (SELECT 1 FROM {table} WHERE {condition} LIMIT {cap}) s) c"
    )
}

/// What the probe looks at, and how often.
pub struct Probe {
    /// The probe's own connection to the worker's database, with
    /// `statement_timeout` set to the interval (see [`probe_pool`]).
    pub pool: PgPool,
    /// The figures to refresh.
    pub queries: ProbeQueries,
    /// Where the pending-row count goes.
    pub backlog: Gauge,
    /// Where the oldest pending row's age goes.
    pub oldest_age: Gauge<f64, AtomicU64>,
    /// Where the parked-row count goes, with [`ProbeQueries::parked`].
    pub parked: Option<Gauge>,
    /// Where each round's figures go, all at once.
    pub figures: watch::Sender<Figures>,
    /// The topic or subscription; `None` when no admin client could be built
    /// (readiness then follows the worker's own Pub/Sub calls).
    pub resource: Option<Arc<PubSubResource>>,
    /// Where readiness goes.
    pub health: Health,
    /// Readiness as a metric, for alerts (1 ready, 0 not).
    pub ready: Gauge,
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
            let ready = self.health.ready(&crate::health::READINESS).is_ok();
            self.ready.set(i64::from(ready));
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {},
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn check_database(&self) {
        let mut figures = Figures::default();
        self.read_figures(&mut figures).await;
        self.figures.send_replace(figures);
    }

    /// Reads the figures into `figures` and the gauges; stops at the first
    /// query the database does not answer.
    async fn read_figures(&self, figures: &mut Figures) {
        let backlog = sqlx::query_scalar::<_, i64>(AssertSqlSafe(self.queries.backlog.as_str()))
            .fetch_one(&self.pool);
        let Some(backlog) = self.answered(backlog, "backlog").await else {
            return;
        };
        if let Some(n) = backlog {
            self.backlog.set(n);
        }
        figures.backlog = backlog;
        let age =
            sqlx::query_scalar::<_, Option<f64>>(AssertSqlSafe(self.queries.oldest_age.as_str()))
                .fetch_optional(&self.pool);
        let Some(age) = self.answered(age, "oldest pending age").await else {
            return;
        };
        if let Some(age) = age {
            let seconds = age.flatten().unwrap_or(0.0).max(0.0);
            self.oldest_age.set(seconds);
            figures.oldest_age = Some(seconds);
        }
        if let (Some(sql), Some(gauge)) = (&self.queries.parked, &self.parked) {
            let parked =
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.as_str())).fetch_one(&self.pool);
            let Some(parked) = self.answered(parked, "parked rows").await else {
                return;
            };
            if let Some(n) = parked {
                gauge.set(n);
            }
            figures.parked = parked;
        }
        if let Some(sql) = &self.queries.last_processed {
            let newest =
                sqlx::query_scalar::<_, Option<DateTime<Utc>>>(AssertSqlSafe(sql.as_str()))
                    .fetch_optional(&self.pool);
            if let Some(Some(newest)) = self.answered(newest, "last processed").await {
                figures.last_processed = newest.flatten();
            }
        }
    }

    /// Runs one figure's query. `None`: the database did not answer (health
    /// updated); `Some(None)`: it answered but the figure took too long.
    async fn answered<T>(
        &self,
        query: impl std::future::Future<Output = Result<T, sqlx::Error>>,
        figure: &str,
    ) -> Option<Option<T>> {
        // A little longer than the server's bound, so the server's answer wins.
        let limit = self.interval + Duration::from_secs(1);
        match tokio::time::timeout(limit, query).await {
            Ok(Ok(value)) => {
                self.health.ok(Component::Database);
                Some(Some(value))
            }
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("57014") => {
                debug!(
                    figure,
                    "probe figure took longer than the probe interval; skipped"
                );
                self.health.ok(Component::Database);
                Some(None)
            }
            Ok(Err(e)) => {
                self.health
                    .failing(Component::Database, format!("unreachable: {e}"));
                None
            }
            Err(_) => {
                self.health
                    .failing(Component::Database, "no answer within the probe interval");
                None
            }
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

/// The probe's connection: one, on which the server cancels any statement
/// after `interval`.
pub fn probe_pool(options: &sqlx::postgres::PgConnectOptions, interval: Duration) -> PgPool {
    let ms = interval.as_millis().max(1).to_string();
    let options = options
        .clone()
        .application_name("outbox-worker probe")
        .options([("statement_timeout", ms.as_str())]);
    crate::db::lazy_pool(options, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_count_estimates_only_without_a_filter() {
        let all = capped_count("\"outbox\"", None);
        assert!(
            all.contains("LIMIT 100000") && all.contains("n_live_tup"),
            "{all}"
        );
        let some = capped_count("\"inbox\"", Some("processed_at IS NULL"));
        assert!(
            some.contains("WHERE processed_at IS NULL LIMIT 100000"),
            "{some}"
        );
        assert!(!some.contains("n_live_tup"), "{some}");
    }
}
