//! `outbox-worker migrate`

use anyhow::Context;
use clap::Args;

use super::DatabaseArgs;
use outbox_worker::db;

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

/// Applies the embedded migrations.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let options = db::connect_options(&args.database.database_url)?;
    let target = db::describe(&options);
    let pool = db::lazy_pool(options, 1);
    db::migrate(&pool)
        .await
        .with_context(|| format!("migrating {target}"))?;
    tracing::info!(database = %target, "migrations applied");
    Ok(())
}
