//! The application library in one file: a service that writes orders and
//! their `order.created` events in one transaction (outbox side), and keeps
//! a per-customer projection from the events it receives (inbox side).
//!
//! ```text
//! # PostgreSQL with the migrations applied (outbox-worker migrate), then:
//! outbox-worker relay --topic projects/P/topics/orders &
//! outbox-worker inbox --subscription projects/P/subscriptions/orders-projection &
//! cargo run -p worker --example orders -- --database-url postgres://... --orders 100
//! ```
//!
//! With `--orders N` it writes N orders first; then it processes the inbox
//! until Ctrl-C (or, with `--until-idle`, until nothing was due for a second).

use anyhow::Context;
use clap::Parser;
use futures::future::BoxFuture;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use outbox_worker::app::{
    HandlerError, InboxMessage, InboxProcessor, OutboxMessage, ProcessorConfig,
};

#[derive(Parser)]
struct Args {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Orders to write before processing.
    #[arg(long, default_value_t = 0)]
    orders: u32,
    /// Stop once nothing was due for a second, instead of running until Ctrl-C.
    #[arg(long)]
    until_idle: bool,
}

/// The producing side: the order row and its event commit together, or not at all.
async fn place_order(pool: &sqlx::PgPool, customer: &str, cents: i64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let order_id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer, amount_cents) VALUES ($1, $2) RETURNING id",
    )
    .bind(customer)
    .bind(cents)
    .fetch_one(&mut *tx)
    .await?;
    let event =
        serde_json::json!({"order_id": order_id, "customer": customer, "amount_cents": cents});
    OutboxMessage::new(serde_json::to_vec(&event)?)
        .ordering_key(customer) // one customer's events stay in order
        .attribute("type", "order.created")
        .write(&mut tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The consuming side: runs inside the inbox transaction, so the projection
/// changes exactly once per message, even when messages are redelivered or
/// the handler is retried.
fn project<'a>(
    tx: &'a mut sqlx::PgConnection,
    message: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let customer = event["customer"].as_str().ok_or("event without customer")?;
        let cents = event["amount_cents"]
            .as_i64()
            .ok_or("event without amount")?;
        sqlx::query(
            "INSERT INTO order_projection (customer, orders, total_cents) VALUES ($1, 1, $2) \
             ON CONFLICT (customer) DO UPDATE SET orders = order_projection.orders + 1, \
                 total_cents = order_projection.total_cents + EXCLUDED.total_cents",
        )
        .bind(customer)
        .bind(cents)
        .execute(&mut *tx)
        .await?;
        Ok(())
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting")?;
    outbox_worker::db::migrate(&pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, \
             amount_cents BIGINT NOT NULL); \
         CREATE TABLE IF NOT EXISTS order_projection (customer TEXT PRIMARY KEY, \
             orders BIGINT NOT NULL, total_cents BIGINT NOT NULL);",
    )
    .execute(&pool)
    .await?;

    for i in 0..args.orders {
        place_order(&pool, &format!("customer-{}", i % 10), 100 + i64::from(i)).await?;
    }
    println!("wrote {} orders and their outbox messages", args.orders);

    let mut config = ProcessorConfig::new("inbox".parse()?);
    config.max_attempts = 10;
    let processor = InboxProcessor::new(pool.clone(), config);
    if args.until_idle {
        let mut idle_since = std::time::Instant::now();
        while idle_since.elapsed() < Duration::from_secs(1) {
            let report = processor.process_batch(&project).await?;
            if report.claimed > 0 {
                println!("{report:?}");
                idle_since = std::time::Instant::now();
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    } else {
        let stop = CancellationToken::new();
        let on_ctrl_c = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_ctrl_c.cancel();
        });
        processor.run(&project, stop).await;
    }
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT customer, orders, total_cents FROM order_projection ORDER BY customer",
    )
    .fetch_all(&pool)
    .await?;
    for (customer, orders, cents) in rows {
        println!("{customer:<14} {orders:>6} orders {cents:>10} cents");
    }
    Ok(())
}
