//! `make demo`: the whole outbox and inbox flow on throwaway infrastructure.
//!
//! A producer writes an `orders` row and an `outbox` row in one transaction
//! (the classic pattern, through the library's `OutboxMessage`), the real
//! `outbox-worker relay` publishes the outbox to the Pub/Sub emulator, a
//! subscriber counts what arrives, the real `outbox-worker inbox` stores each
//! message once in the `inbox` table, and a consumer processes the inbox
//! through the library's `InboxProcessor`, keeping an `order_projection`
//! table in the same transaction. Progress is printed every second; the
//! summary says what was sent, received, stored, processed, duplicated and
//! lost.

use anyhow::Context;
use clap::Parser;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devkit::{Collector, Emulator, Postgres, WorkerProcess};
use futures::future::BoxFuture;
use outbox_worker::app::{
    HandlerError, InboxMessage, InboxProcessor, OutboxMessage, ProcessorConfig,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Run producer -> outbox -> relay -> Pub/Sub -> inbox -> consumer locally")]
struct Args {
    /// How long the producer writes.
    #[arg(long, env = "DEMO_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Orders per second in total, or `max`: as fast as the producers can
    /// commit. The default is a steady load, so that the latency printed is
    /// what an application at that load sees; with `max` the producers take
    /// the CPU the relay and the emulator share, and latency shows a
    /// saturated machine.
    #[arg(long, env = "DEMO_RATE", default_value = "1000", value_parser = parse_rate)]
    rate: Rate,
    /// Concurrent producer connections.
    #[arg(long, env = "DEMO_PRODUCERS", default_value_t = 4)]
    producers: usize,
    /// Distinct customers (ordering keys).
    #[arg(long, default_value_t = 100)]
    customers: u64,
}

/// The producers' total rate.
#[derive(Clone, Copy, Debug)]
enum Rate {
    /// As fast as the producers can commit.
    Max,
    /// Orders per second in total.
    PerSecond(u64),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s.trim() {
        "max" => Ok(Rate::Max),
        n => match n.parse::<u64>() {
            Ok(0) | Err(_) => Err(format!(
                "`{s}` is not a rate: give orders per second (e.g. 1000) or `max`"
            )),
            Ok(n) => Ok(Rate::PerSecond(n)),
        },
    }
}

const PROJECT: &str = "demo";
const TOPIC: &str = "projects/demo/topics/orders";
const SUBSCRIPTION: &str = "projects/demo/subscriptions/orders-audit";
const INBOX_SUBSCRIPTION: &str = "projects/demo/subscriptions/orders-inbox";

/// The consumer: applies an `order.created` event to the projection, in the
/// inbox transaction (so exactly once per order).
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

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn worker_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(path) = std::env::var("OUTBOX_WORKER_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("outbox-worker");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it with `cargo build --release -p worker` (make demo does)",
        path.display()
    );
    Ok(path)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = PROJECT;
    println!("== starting PostgreSQL and the Pub/Sub emulator (throwaway, in a temp dir)");
    let (pg, emulator) = tokio::try_join!(Postgres::start(), Emulator::start())?;
    let url = pg.create_database("demo").await?;
    println!("   postgres  {}", url);
    println!("   pubsub    {} (PUBSUB_EMULATOR_HOST)", emulator.host());

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.producers as u32 + 4)
        .connect(&url)
        .await?;
    let worker = worker_binary()?;
    let status = std::process::Command::new(&worker)
        .args(["migrate", "--database-url", &url])
        .status()
        .context("running outbox-worker migrate")?;
    anyhow::ensure!(status.success(), "outbox-worker migrate failed");
    sqlx::query(
        "CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, \
         amount_cents BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "CREATE TABLE order_projection (customer TEXT PRIMARY KEY, orders BIGINT NOT NULL, \
         total_cents BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    emulator.create_topic(TOPIC).await?;
    emulator
        .create_subscription(SUBSCRIPTION, TOPIC, true)
        .await?;
    emulator
        .create_subscription(INBOX_SUBSCRIPTION, TOPIC, true)
        .await?;
    println!("   topic     {TOPIC}\n   subscription {SUBSCRIPTION} (ordered)");
    println!(
        "   subscription {INBOX_SUBSCRIPTION} (ordered) -> outbox-worker inbox -> inbox table"
    );

    let log_dir = tempfile::Builder::new().prefix("outbox-demo-").tempdir()?;
    let log = log_dir.path().join("relay.log");
    let health_port = devkit::free_port()?;
    let mut relay = WorkerProcess::spawn(
        &worker,
        &["relay"],
        &[
            ("DATABASE_URL", url.clone()),
            ("PUBSUB_TOPIC", TOPIC.to_owned()),
            ("PUBSUB_EMULATOR_HOST", emulator.host()),
        ],
        health_port,
        log.clone(),
    )?;
    relay.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "== relay ready: http://{}/metrics  (log: {})",
        relay.health_addr,
        log.display()
    );
    let inbox_log = log_dir.path().join("inbox.log");
    let mut inbox = WorkerProcess::spawn(
        &worker,
        &["inbox"],
        &[
            ("DATABASE_URL", url.clone()),
            ("PUBSUB_SUBSCRIPTION", INBOX_SUBSCRIPTION.to_owned()),
            ("PUBSUB_EMULATOR_HOST", emulator.host()),
        ],
        devkit::free_port()?,
        inbox_log.clone(),
    )?;
    inbox.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "== inbox ready: http://{}/metrics  (log: {})",
        inbox.health_addr,
        inbox_log.display()
    );
    // The consumer: two library processors on the inbox table.
    let consumer_stop = CancellationToken::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let processor = InboxProcessor::new(
            pool.clone(),
            ProcessorConfig {
                batch_size: 200,
                poll_interval: Duration::from_millis(50),
                ..ProcessorConfig::new("inbox".parse()?)
            },
        );
        let stop = consumer_stop.clone();
        consumers.push(tokio::spawn(
            async move { processor.run(&project, stop).await },
        ));
    }

    let collector = Collector::with_streams(emulator.endpoint(), SUBSCRIPTION.to_owned(), 4);
    let produced = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + args.duration;
    println!(
        "== producing for {:?} with {} connections ({}), each order and its outbox row in one transaction",
        args.duration,
        args.producers,
        match args.rate {
            Rate::Max => "as fast as possible".to_owned(),
            Rate::PerSecond(n) => format!("{n} orders/s"),
        }
    );
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let pool = pool.clone();
        let produced = produced.clone();
        let per_producer = match args.rate {
            Rate::Max => 0.0,
            Rate::PerSecond(n) => n as f64 / args.producers as f64,
        };
        let customers = args.customers;
        producers.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut n: u64 = 0;
            while Instant::now() < stop_at {
                if per_producer > 0.0 {
                    let due = started + Duration::from_secs_f64(n as f64 / per_producer);
                    tokio::time::sleep_until(due.into()).await;
                }
                let customer = format!("customer-{}", (n * args_producers_mix(p)) % customers);
                let amount = (n % 10_000) as i64 + 100;
                let mut tx = pool.begin().await?;
                let order_id: i64 = sqlx::query_scalar(
                    "INSERT INTO orders (customer, amount_cents) VALUES ($1, $2) RETURNING id",
                )
                .bind(&customer)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?;
                let payload = serde_json::json!({
                    "order_id": order_id, "customer": customer, "amount_cents": amount,
                    "sent_at_us": now_micros(),
                });
                OutboxMessage::new(serde_json::to_vec(&payload)?)
                    .ordering_key(customer.as_str())
                    .attribute("type", "order.created")
                    .write(&mut tx)
                    .await?;
                tx.commit().await?;
                produced.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(())
        }));
    }

    let started = Instant::now();
    let mut last = (0usize, Instant::now());
    let mut latencies: Vec<f64> = Vec::new();
    let mut seen_upto = 0usize;
    let mut seen = HashSet::new();
    let mut duplicates = 0usize;
    let mut done_producing = false;
    let drain_deadline = stop_at + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let received = collector.snapshot();
        let mut window = Vec::new();
        for m in &received[seen_upto..] {
            if !seen.insert(m.message_id.clone()) {
                duplicates += 1;
                continue;
            }
            if let Some(sent) = serde_json::from_slice::<serde_json::Value>(&m.data)
                .ok()
                .and_then(|v| v["sent_at_us"].as_u64())
            {
                let ms = now_micros().saturating_sub(sent) as f64 / 1000.0;
                window.push(ms);
            }
        }
        seen_upto = received.len();
        let rate = (seen.len() - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (seen.len(), Instant::now());
        let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        let (stored, processed): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(processed_at) FROM inbox")
                .fetch_one(&pool)
                .await?;
        window.sort_by(f64::total_cmp);
        let sent = produced.load(Ordering::Relaxed);
        println!(
            "   t={:>4.0}s  sent {:>8}  received {:>8}  {:>7.0} msg/s  backlog {:>6}  latency p50 {:>6.1} ms  p99 {:>6.1} ms  inbox stored {:>8} processed {:>8}",
            started.elapsed().as_secs_f64(),
            sent,
            seen.len(),
            rate,
            backlog,
            percentile(&window, 0.50),
            percentile(&window, 0.99),
            stored,
            processed,
        );
        latencies.extend(window);
        if !done_producing && Instant::now() >= stop_at {
            done_producing = true;
            for p in producers.drain(..) {
                p.await??;
            }
            println!("== producer stopped; waiting for the rest to arrive");
        }
        let sent = produced.load(Ordering::Relaxed);
        let all_processed = processed as u64 >= sent;
        if done_producing
            && ((seen.len() as u64 >= sent && all_processed) || Instant::now() > drain_deadline)
        {
            break;
        }
    }
    let inbox_duplicates = inbox.metric("inbox_duplicates_total").await.unwrap_or(0.0);
    let inbox_dead = inbox.metric("inbox_dead_letter_total").await.unwrap_or(0.0);
    let relay_latency = relay
        .get("/metrics")
        .await
        .map(|(_, body)| {
            let q =
                |q| devkit::worker::histogram_quantile(&body, "outbox_publish_latency_seconds", q);
            (q(0.5), q(0.99))
        })
        .unwrap_or((None, None));
    let status = relay.terminate(Duration::from_secs(15)).await?;
    let inbox_status = inbox.terminate(Duration::from_secs(15)).await?;
    consumer_stop.cancel();
    for c in consumers {
        c.await?;
    }
    collector.stop().await;

    let sent = produced.load(Ordering::Relaxed);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await?;
    let (stored, processed, inbox_distinct): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(processed_at), count(DISTINCT message_id) FROM inbox",
    )
    .fetch_one(&pool)
    .await?;
    // The projection must equal the orders table: each event applied once.
    let (projected_orders, projected_cents, order_cents): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(orders), 0)::bigint FROM order_projection), \
                (SELECT coalesce(sum(total_cents), 0)::bigint FROM order_projection), \
                (SELECT coalesce(sum(amount_cents), 0)::bigint FROM orders)",
    )
    .fetch_one(&pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    let producing = args.duration.as_secs_f64();
    let lost = sent.saturating_sub(seen.len() as u64);
    let inbox_lost = sent.saturating_sub(processed as u64);
    println!("== summary");
    println!("   orders committed        {orders}");
    println!(
        "   outbox messages sent    {sent}  ({:.0}/s while producing)",
        sent as f64 / producing
    );
    println!("   received (distinct)     {}", seen.len());
    println!("   duplicates              {duplicates}");
    println!("   lost                    {lost}");
    println!("   left in the outbox      {pending}");
    println!(
        "   commit-to-receive       p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    let bound = |v: Option<f64>| v.map_or("n/a".to_owned(), |s| format!("<= {:.0} ms", s * 1000.0));
    println!(
        "   relay insert-to-publish p50 {}  p99 {}  (relay histogram buckets)",
        bound(relay_latency.0),
        bound(relay_latency.1)
    );
    println!("   relay exit on SIGTERM   {status}");
    println!("   inbox stored            {stored}  (distinct {inbox_distinct})");
    println!("   inbox processed         {processed}");
    println!("   inbox duplicates        {inbox_duplicates}  (redeliveries absorbed)");
    println!("   inbox dead-lettered     {inbox_dead}");
    println!("   inbox lost              {inbox_lost}");
    println!(
        "   projection              {projected_orders} orders, {projected_cents} cents (orders table: {orders}, {order_cents} cents)"
    );
    println!("   inbox exit on SIGTERM   {inbox_status}");
    anyhow::ensure!(lost == 0 && orders as u64 == sent, "messages were lost");
    anyhow::ensure!(
        inbox_lost == 0 && stored as u64 == sent && inbox_distinct == stored,
        "the inbox lost or duplicated messages"
    );
    anyhow::ensure!(
        projected_orders == orders && projected_cents == order_cents,
        "the projection does not match the orders"
    );
    anyhow::ensure!(
        inbox_status.success(),
        "inbox worker did not exit cleanly; log: {}",
        inbox_log.display()
    );
    anyhow::ensure!(
        status.success(),
        "relay did not exit cleanly; log: {}",
        log.display()
    );
    println!("== cleaning up");
    drop(pg);
    drop(emulator);
    Ok(())
}

/// Spreads producers over customers.
fn args_producers_mix(p: usize) -> u64 {
    [1, 7, 13, 31, 37, 43, 61, 67][p % 8]
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_a_positive_number_or_max() {
        assert!(matches!(parse_rate("1000"), Ok(Rate::PerSecond(1000))));
        assert!(matches!(parse_rate("max"), Ok(Rate::Max)));
        for bad in ["0", "-5", "fast", ""] {
            let error = parse_rate(bad).expect_err(bad);
            assert!(error.contains("orders per second"), "{error}");
        }
    }
}
