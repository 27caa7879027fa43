//! Connecting to PostgreSQL, and the embedded migrations.

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// The migrations under `migrations/`, compiled into the binary so that
/// `outbox-worker migrate` needs no files at run time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Errors from database setup; the URL itself is never part of a message.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Parses a connection URL. Statement logging is turned off: statements carry
/// payloads, and slow-statement warnings would flood the logs under load.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, DbError> {
    let options = PgConnectOptions::from_str(url).map_err(DbError::InvalidUrl)?;
    Ok(options
        .application_name("outbox-worker")
        .disable_statement_logging())
}

/// A pool that connects lazily, so a worker starts (and reports not ready)
/// while the database is down, and reconnects by itself when it returns.
pub fn lazy_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// Where the URL points, for logs: host, port and database, never the password.
pub fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default)")
    )
}

/// Applies the embedded migrations; already-applied ones are skipped.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// A table a worker cannot use as it is, or a database that did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "table {table} is missing or has the wrong shape ({source}); run `outbox-worker migrate` or create it like the `{like}` table in migrations/"
    )]
    Shape {
        table: String,
        /// The migrated table to copy.
        like: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Fails with a readable error when a table is missing or lacks one of the
/// listed columns (`SELECT <columns> FROM <table> LIMIT 0`). `like` names the
/// table in `migrations/` to create it from.
pub async fn check_columns(
    pool: &PgPool,
    tables: &[(&crate::ident::TableName, &str)],
    like: &'static str,
) -> Result<(), ShapeError> {
    for (table, columns) in tables {
        let sql = format!("SELECT {columns} FROM {} LIMIT 0", table.quoted());
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map_err(|source| match source {
                sqlx::Error::Database(_) => ShapeError::Shape {
                    table: table.to_string(),
                    like,
                    source,
                },
                other => ShapeError::Sql(other),
            })?;
    }
    Ok(())
}

/// Waits until `check` (a table-shape check) passes, reporting the failure
/// on readiness and in the log (every tenth attempt). A missing table is a
/// configuration error, retried in case a migration is running; connection
/// errors are retried like everything else. Returns early on `stop`.
pub async fn wait_until_usable<F, Fut, E>(
    what: &str,
    mut check: F,
    health: &crate::health::Health,
    retry: (std::time::Duration, std::time::Duration),
    stop: &tokio_util::sync::CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use crate::health::Component;
    let mut backoff = crate::backoff::Backoff::new(retry.0, retry.1);
    loop {
        match check().await {
            Ok(()) => {
                health.ok(Component::Database);
                return;
            }
            Err(e) => {
                health.failing(Component::Database, e.to_string());
                if backoff.failures().is_multiple_of(10) {
                    tracing::error!(error = %e, "{what} not usable yet");
                }
            }
        }
        health.heartbeat();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {},
            _ = stop.cancelled() => return,
        }
    }
}

/// A cheap round trip, for readiness.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_hides_password() {
        let options = connect_options("postgres://app:s3cret@db.example:6543/orders").unwrap();
        let text = describe(&options);
        assert_eq!(text, "db.example:6543/orders");
        assert!(!text.contains("s3cret"));
    }

    #[test]
    fn invalid_url_does_not_echo_it() {
        let err = connect_options("postgres://u:topsecret@h:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }
}
