//! Test 7: the HTTP endpoints answer and the counters match what was delivered;
//! a missing own topic makes the relay not ready without dead-lettering; the
//! inbox probe's figures make the status report on the Lease.

use std::time::Duration;

use crate::harness::*;
use devkit::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_match_deliveries() {
    let env = TestEnv::new("probes").await;
    let relay = env.spawn_relay(&[]);
    relay.wait_ready(WAIT).await.expect("ready");
    assert_eq!(relay.get("/healthz").await.map(|r| r.0), Some(200));

    let ids = insert(&env.pool, &numbered(0, 500, 5)).await;
    env.collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive");
    env.wait_drained().await;

    wait_for("published counter to reach 500", WAIT, || async {
        (relay.metric("outbox_messages_published_total").await == Some(500.0)).then_some(())
    })
    .await
    .expect("counter");
    wait_for("backlog gauge to reach 0", WAIT, || async {
        (relay.metric("outbox_backlog").await == Some(0.0)).then_some(())
    })
    .await
    .expect("backlog");
    let (status, body) = relay.get("/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for line in [
        "outbox_dead_letter_total 0",
        "outbox_publish_latency_seconds_count 500",
        "outbox_is_leader 1",
    ] {
        assert!(body.contains(line), "{line} missing:\n{body}");
    }
    assert_eq!(
        relay.metric("outbox_publish_errors_total").await,
        None,
        "no errors:\n{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_own_topic_means_not_ready_and_rows_wait() {
    let env = TestEnv::new("notopic").await;
    let missing = format!("{}-later", env.topic);
    let port = devkit::free_port().expect("port");
    let relay = devkit::WorkerProcess::spawn(
        &worker_binary(),
        &["relay", "--topic", &missing],
        &[
            ("DATABASE_URL", env.database_url.clone()),
            ("PUBSUB_EMULATOR_HOST", env.emulator_host.clone()),
            ("RETRY_MAX", "500ms".to_owned()),
            ("PROBE_INTERVAL", "300ms".to_owned()),
        ],
        port,
        log_dir().join(format!("{}-relay.log", env.name)),
    )
    .expect("spawn");
    insert(&env.pool, &numbered(0, 50, 0)).await;
    let body = wait_for("readyz to say the topic is missing", WAIT, || async {
        relay
            .get("/readyz")
            .await
            .filter(|(s, b)| *s == 503 && b.contains("does not exist"))
            .map(|(_, b)| b)
    })
    .await
    .expect("not ready");
    assert!(body.contains(&missing), "{body}");
    wait_for("a failed publish attempt", WAIT, || async {
        relay
            .metric("outbox_publish_errors_total{kind=\"transient\"}")
            .await
            .filter(|n| *n > 0.0)
    })
    .await
    .expect("publish attempted");
    assert_eq!(env.pending().await, 50, "rows stay in the outbox");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_dead_letter")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(dead, 0, "a missing own topic is an outage, not a bad row");

    // Create the topic: the relay recovers by itself.
    let endpoint = outbox_worker::pubsub::Endpoint {
        emulator_host: Some(env.emulator_host.clone()),
    };
    let sub = format!("{}-later", env.subscription);
    create_topic_and_subscription(&endpoint, &missing, &sub).await;
    relay.wait_ready(WAIT).await.expect("ready again");
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_and_never_show_the_password() {
    let env = TestEnv::new("logs").await;
    // Trust authentication ignores the password, so the URL still works.
    let url = env
        .database_url
        .replace("postgres://postgres@", "postgres://postgres:s3cret-pw@");
    let relay = env.spawn_relay_with(
        &[],
        &[("DATABASE_URL", url), ("LOG_FORMAT", "json".to_owned())],
    );
    relay.wait_ready(WAIT).await.expect("ready");
    let ids = insert(&env.pool, &numbered(0, 10, 0)).await;
    env.expect_delivered(&ids).await;
    let log = relay.log();
    assert!(
        !log.contains("s3cret-pw"),
        "the password leaked into the log:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{log}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value.get("level").is_some() && value.get("message").is_some(),
            "{line}"
        );
    }
}

/// The backlog probe on a large outbox (5 million rows) (the relay catching up after an
/// outage): an exact `count(*)` of millions of rows outlives the probe's
/// timeout, and the server keeps running it on a pooled connection after the
/// client gave up, so probes pile up exactly while the relay needs its
/// connections. Every probe statement must be bounded on the server, and the
/// lag users alert on (the oldest pending row's age) must be exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_probe_is_bounded_on_the_server() {
    let (env, _pg, emulator) = TestEnv::isolated("probe_bound").await;
    sqlx::query(
        "INSERT INTO outbox (payload, created_at) \
         SELECT 'x', clock_timestamp() - interval '1 hour' FROM generate_series(1, 5000000)",
    )
    .execute(&env.pool)
    .await
    .expect("a large backlog");
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&env.pool)
        .await
        .expect("vacuum");
    // A database that counts with one process (as many are configured),
    // so that an exact count takes a while.
    let db = env
        .database_url
        .rsplit('/')
        .next()
        .expect("database")
        .to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" SET max_parallel_workers_per_gather = 0"
    )))
    .execute(&env.pool)
    .await
    .expect("no parallel scans");
    // Pub/Sub frozen: the relay holds its claims and the backlog stays.
    emulator.pause().expect("SIGSTOP emulator");
    let relay = env.spawn_relay_with(&[], &[("PROBE_INTERVAL", "50ms".to_owned())]);
    let mut longest = Duration::ZERO;
    for _ in 0..50 {
        let running: Option<f64> = sqlx::query_scalar(
            "SELECT max(EXTRACT(EPOCH FROM clock_timestamp() - query_start))::float8 \
             FROM pg_stat_activity WHERE application_name LIKE 'outbox-worker%' \
               AND state = 'active' AND query NOT LIKE '%FOR UPDATE%' AND query NOT LIKE 'LISTEN%'",
        )
        .fetch_one(&env.pool)
        .await
        .expect("activity");
        longest = longest.max(Duration::from_secs_f64(running.unwrap_or(0.0)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let age = relay.metric("outbox_oldest_pending_age_seconds").await;
    let backlog = relay.metric("outbox_backlog").await;
    emulator.resume().expect("SIGCONT emulator");
    assert!(
        longest < Duration::from_millis(100),
        "a probe statement ran for {longest:?} with a 50 ms probe interval\n{}",
        relay.log()
    );
    let age = age.expect("outbox_oldest_pending_age_seconds is exported");
    assert!(
        (3_500.0..3_700.0).contains(&age),
        "oldest pending age {age}"
    );
    assert!(
        backlog.is_some_and(|b| b >= 100_000.0),
        "backlog {backlog:?}"
    );
}

/// The probe's figures of an inbox table, read from a real database, make
/// the inbox worker's status report: unprocessed and parked rows, and the
/// newest `processed_at` as the last progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_probe_figures_feed_the_lease_report() {
    use outbox_worker::health::Health;
    use outbox_worker::inbox::store::InboxStore;
    use outbox_worker::metrics::InboxMetrics;
    use outbox_worker::probe::{Figures, Probe, probe_pool};
    use outbox_worker::report;

    let env = TestEnv::new("inbox_report").await;
    sqlx::query(
        "INSERT INTO inbox (message_id, payload, processed_at, parked_at) VALUES \
         ('done-1', '', '2026-01-01T00:00:01Z', NULL), \
         ('done-2', '', '2026-01-01T00:00:02.5Z', NULL), \
         ('parked', '', NULL, now()), \
         ('pending', '', NULL, NULL)",
    )
    .execute(&env.pool)
    .await
    .expect("rows");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = InboxMetrics::register(&mut registry);
    let (figures, mut figures_rx) = tokio::sync::watch::channel(Figures::default());
    let options = outbox_worker::db::connect_options(&env.database_url).expect("url");
    let store = InboxStore::new("inbox".parse().expect("table")).expect("store");
    let probe = Probe {
        pool: probe_pool(&options, Duration::from_secs(1)),
        queries: store.probe_queries(),
        backlog: metrics.backlog.clone(),
        oldest_age: metrics.oldest_unprocessed_age.clone(),
        parked: Some(metrics.parked.clone()),
        figures,
        ready: metrics.ready.clone(),
        resource: None,
        health: Health::new(Duration::from_secs(60)),
        interval: Duration::from_secs(1),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(probe.run(stop.clone()));
    let read = tokio::time::timeout(WAIT, figures_rx.changed()).await;
    stop.cancel();
    let _ = task.await;
    read.expect("a probe round within the deadline")
        .expect("the probe ran");

    let report = report::inbox(chrono::Utc::now(), &metrics, &figures_rx.borrow());
    assert_eq!(
        report.get(report::BACKLOG).map(String::as_str),
        Some("1"),
        "{report:?}"
    );
    assert_eq!(
        report.get(report::PARKED_ROWS).map(String::as_str),
        Some("1")
    );
    assert_eq!(
        report.get(report::LAST_PROGRESS_TIME).map(String::as_str),
        Some("2026-01-01T00:00:02.500Z")
    );
    let age: f64 = report
        .get(report::OLDEST_PENDING_AGE_SECONDS)
        .and_then(|a| a.parse().ok())
        .expect("the oldest unprocessed row's age");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(
        report.get(report::MESSAGES_TOTAL).map(String::as_str),
        Some("0")
    );
}
