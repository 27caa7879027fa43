//! Shared setup of the inbox tests: the relay's test environment plus a
//! second ordered subscription on its topic that the real
//! `outbox-worker inbox` binary pulls into the `inbox` table.

use std::time::Duration;

use devkit::WorkerProcess;
use outbox_worker::app::{Handler, InboxProcessor, ProcessorConfig};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

pub struct InboxEnv {
    pub env: TestEnv,
    /// The subscription the inbox worker pulls.
    pub subscription: String,
}

impl InboxEnv {
    pub async fn new(name: &str) -> InboxEnv {
        Self::with_ordering(name, true).await
    }

    /// With an ordered or unordered inbox subscription.
    pub async fn with_ordering(name: &str, ordered: bool) -> InboxEnv {
        let env = TestEnv::new(name).await;
        let subscription = format!("{}-inbox", env.subscription);
        let admin = outbox_worker::pubsub::subscription_admin(&endpoint(&env))
            .await
            .expect("admin");
        admin
            .create_subscription()
            .set_name(&subscription)
            .set_topic(&env.topic)
            .set_ack_deadline_seconds(60)
            .set_enable_message_ordering(ordered)
            .send()
            .await
            .expect("create inbox subscription");
        InboxEnv { env, subscription }
    }

    /// Starts the real inbox binary on the inbox subscription.
    pub fn spawn_inbox(&self, extra: &[&str]) -> WorkerProcess {
        self.spawn_inbox_with(extra, &[])
    }

    /// With extra flags and environment (later entries win).
    pub fn spawn_inbox_with(&self, extra: &[&str], env: &[(&str, String)]) -> WorkerProcess {
        let port = devkit::free_port().expect("free port");
        let log = log_dir().join(format!("{}-inbox-{port}.log", self.env.name));
        let mut args = vec!["inbox"];
        args.extend_from_slice(extra);
        let mut all = vec![
            ("DATABASE_URL", self.env.database_url.clone()),
            ("PUBSUB_SUBSCRIPTION", self.subscription.clone()),
            ("PUBSUB_EMULATOR_HOST", self.env.emulator_host.clone()),
            ("RETRY_MAX", "1s".to_owned()),
            ("PROBE_INTERVAL", "500ms".to_owned()),
            ("RUST_LOG", "info,outbox_worker=debug".to_owned()),
        ];
        all.extend(env.iter().cloned());
        WorkerProcess::spawn(&worker_binary(), &args, &all, port, log).expect("spawn inbox")
    }

    /// Rows in the inbox table.
    pub async fn stored(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&self.env.pool)
            .await
            .expect("count")
    }

    /// Waits until the inbox holds at least `n` rows.
    pub async fn wait_stored(&self, n: i64) {
        devkit::wait_for(&format!("{n} inbox rows"), WAIT, || async {
            (self.stored().await >= n).then_some(())
        })
        .await
        .expect("the inbox stores everything");
    }

    /// Processed rows in the inbox table.
    pub async fn processed(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM inbox WHERE processed_at IS NOT NULL")
            .fetch_one(&self.env.pool)
            .await
            .expect("count")
    }

    /// Runs `processors` library processors in the background until the
    /// returned token is cancelled.
    pub fn process_in_background<H>(
        &self,
        handler: H,
        config: ProcessorConfig,
        processors: usize,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>)
    where
        H: Handler + Clone + 'static,
    {
        let stop = CancellationToken::new();
        let tasks = (0..processors)
            .map(|_| {
                let processor = InboxProcessor::new(self.env.pool.clone(), config.clone());
                let handler = handler.clone();
                let stop = stop.clone();
                tokio::spawn(async move { processor.run(&handler, stop).await })
            })
            .collect();
        (stop, tasks)
    }
}

pub fn endpoint(env: &TestEnv) -> outbox_worker::pubsub::Endpoint {
    outbox_worker::pubsub::Endpoint {
        emulator_host: Some(env.emulator_host.clone()),
    }
}

/// A processor configuration for tests: quick retries.
pub fn quick_config() -> ProcessorConfig {
    let mut config = ProcessorConfig::new("inbox".parse().expect("table name"));
    config.retry_min = Duration::from_millis(50);
    config.retry_max = Duration::from_millis(200);
    config.poll_interval = Duration::from_millis(20);
    config.handler_timeout = Duration::from_secs(1);
    config.max_batch_bytes = 8 * 1024 * 1024;
    config
}
