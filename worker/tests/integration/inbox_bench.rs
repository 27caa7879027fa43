//! Inbox throughput next to the emulator's raw pull+ack rate, in one run.
//! Ignored by default (it measures, it does not check):
//!
//! ```text
//! cd worker && cargo test --release --test integration -- inbox_bench --ignored --nocapture
//! ```
//!
//! `INBOX_BENCH_MESSAGES` sets the number of messages (default 50,000).

use std::time::Duration;

use devkit::pull::{Rate, StreamSettings, rest_pull_ack, streaming_pull_ack, synthetic};

use crate::harness::*;
use crate::inbox_support::*;

const MIB: i64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn inbox_bench() {
    let n: usize = std::env::var("INBOX_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let ib = InboxEnv::with_ordering("inbox_bench", false).await;
    let endpoint = endpoint(&ib.env);
    let topic = format!("{}-bench", ib.env.topic);
    let admin = outbox_worker::pubsub::topic_admin(&endpoint)
        .await
        .expect("admin");
    admin
        .create_topic()
        .set_name(&topic)
        .send()
        .await
        .expect("topic");
    let subs = outbox_worker::pubsub::subscription_admin(&endpoint)
        .await
        .expect("admin");
    let streams: Vec<(&str, usize, i64)> = vec![
        ("stream-1x1000", 1, 1000),
        ("stream-1x10k", 1, 10_000),
        ("stream-2x5k", 2, 5_000),
        ("stream-4x2500", 4, 2_500),
        ("stream-8x1250", 8, 1_250),
    ];
    let inboxes: Vec<(&str, bool, &[&str])> = vec![
        ("inbox-1-stream", false, &["--streams", "1"]),
        ("inbox-4-streams", false, &["--streams", "4"]),
        ("inbox-8-streams", false, &["--streams", "8"]),
        ("inbox-ordered-8-streams", true, &["--streams", "8"]),
        ("inbox-defaults", false, &[]),
    ];
    let mut variants: Vec<(&str, bool)> = vec![("rest", false)];
    variants.extend(streams.iter().map(|(v, _, _)| (*v, false)));
    variants.extend(inboxes.iter().map(|(v, o, _)| (*v, *o)));
    let mut names = std::collections::HashMap::new();
    for (variant, ordered) in &variants {
        let name = format!("{}-{variant}", ib.subscription);
        subs.create_subscription()
            .set_name(&name)
            .set_topic(&topic)
            .set_ack_deadline_seconds(60)
            .set_enable_message_ordering(*ordered)
            .send()
            .await
            .expect("subscription");
        names.insert(*variant, name);
    }
    let started = std::time::Instant::now();
    for chunk in synthetic("bench", n, 200, 100).chunks(10_000) {
        devkit::pull::publish_raw(&endpoint, &topic, chunk.to_vec())
            .await
            .expect("publish");
    }
    println!(
        "published {n} messages (200 B, 100 ordering keys) to {} subscriptions in {:.1}s",
        variants.len(),
        started.elapsed().as_secs_f64()
    );
    let timeout = Duration::from_secs(300);
    let report = |what: &str, rate: Rate| {
        println!(
            "{what:<44} {:>7} msgs in {:>6.2}s = {:>7.0} msg/s",
            rate.messages,
            rate.elapsed.as_secs_f64(),
            rate.per_second()
        );
    };

    let rest = rest_pull_ack(&ib.env.emulator_host, &names["rest"], n, timeout)
        .await
        .expect("rest");
    report("raw REST pull(1000)+ack loop", rest);
    for (variant, streams, outstanding) in &streams {
        let settings = StreamSettings {
            streams: *streams,
            max_outstanding_messages: *outstanding,
            max_outstanding_bytes: 256 * MIB,
        };
        let rate = streaming_pull_ack(&endpoint, &names[variant], settings, n, timeout)
            .await
            .expect("stream");
        report(&format!("Rust streaming pull + ack ({variant})"), rate);
    }
    for (variant, _, args) in &inboxes {
        let rate = inbox_rate(&ib, &names[variant], n, args).await;
        report(&format!("outbox-worker inbox ({variant})"), rate);
    }
}

/// Runs the inbox worker on `subscription` until `n` rows are stored; the
/// rate is taken from the rows' own receive timestamps.
async fn inbox_rate(ib: &InboxEnv, subscription: &str, n: usize, args: &[&str]) -> Rate {
    sqlx::query("TRUNCATE inbox")
        .execute(&ib.env.pool)
        .await
        .expect("truncate");
    let port = devkit::free_port().expect("port");
    let log = log_dir().join(format!("{}-bench-{port}.log", ib.env.name));
    let mut worker = devkit::WorkerProcess::spawn(
        &worker_binary(),
        &[&["inbox"], args].concat(),
        &[
            ("DATABASE_URL", ib.env.database_url.clone()),
            ("PUBSUB_SUBSCRIPTION", subscription.to_owned()),
            ("PUBSUB_EMULATOR_HOST", ib.env.emulator_host.clone()),
            ("RUST_LOG", "info".to_owned()),
        ],
        port,
        log,
    )
    .expect("spawn");
    devkit::wait_for(
        "the inbox to store everything",
        Duration::from_secs(300),
        || async { (ib.stored().await >= n as i64).then_some(()) },
    )
    .await
    .expect("stored");
    let _ = worker.terminate(Duration::from_secs(20)).await;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(received_at) - min(received_at))::float8 FROM inbox",
    )
    .fetch_one(&ib.env.pool)
    .await
    .expect("span");
    Rate {
        messages: n,
        elapsed: Duration::from_secs_f64(seconds.max(1e-6)),
    }
}
