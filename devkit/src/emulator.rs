//! The Pub/Sub emulator.

use anyhow::Context;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{signal, spawn_tied};
use outbox_worker::pubsub::Endpoint;

/// A running emulator on 127.0.0.1.
pub struct Emulator {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Extra command-line flags, kept across restarts.
    flags: Vec<String>,
    /// The JVM's options.
    java_options: &'static str,
    child: Option<Child>,
}

/// JVM options for a quick start (tests): a small serial collector and the
/// quick compiler only.
const JAVA_QUICK_START: &str = "-Xss1m -XX:+UseSerialGC -XX:TieredStopAtLevel=1";
/// JVM options for long, busy runs.
const JAVA_LONG_RUNS: &str = "-Xss1m -XX:+UseParallelGC -Xms1g -Xmx4g";

/// `$PUBSUB_EMULATOR_BIN`, or where the Google Cloud SDK's Debian package puts it.
pub fn find_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var("PUBSUB_EMULATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(
                "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
            )
        });
    anyhow::ensure!(
        path.exists(),
        "Pub/Sub emulator not found at {}. Install it with `apt-get install google-cloud-cli-pubsub-emulator` \
         (needs Java 17: `apt-get install openjdk-17-jre-headless`), or set PUBSUB_EMULATOR_BIN",
        path.display()
    );
    Ok(path)
}

impl Emulator {
    /// Starts the emulator on a free port; returns once it answers HTTP.
    pub async fn start() -> anyhow::Result<Emulator> {
        Self::start_with_flags(Vec::new()).await
    }

    /// Starts the emulator with its IAM integration on, asking `iam` (see
    /// [`crate::IamStandIn`]) whether each call is permitted.
    pub async fn start_with_iam(iam: &crate::IamStandIn) -> anyhow::Result<Emulator> {
        Self::start_with_flags(vec![
            "--enable_iam_integration=true".to_owned(),
            "--iam_host=127.0.0.1".to_owned(),
            format!("--iam_port={}", iam.port()),
        ])
        .await
    }

    async fn start_with_flags(flags: Vec<String>) -> anyhow::Result<Emulator> {
        Self::start_jvm(flags, JAVA_QUICK_START).await
    }

    /// Starts the emulator tuned for a long, busy run (`make soak`): the
    /// JVM's optimizing compiler and a parallel collector, at the cost of a
    /// slower start. With the quick-start settings the tests use, a
    /// sustained 2,000 messages/s slows the emulator down within a minute.
    pub async fn start_for_long_runs() -> anyhow::Result<Emulator> {
        Self::start_jvm(Vec::new(), JAVA_LONG_RUNS).await
    }

    async fn start_jvm(flags: Vec<String>, java_options: &'static str) -> anyhow::Result<Emulator> {
        let mut emulator = Emulator {
            dir: tempfile::Builder::new()
                .prefix("outbox-pubsub-")
                .tempdir()?,
            bin: find_bin()?,
            port: crate::free_port()?,
            flags,
            java_options,
            child: None,
        };
        emulator.start_process().await?;
        Ok(emulator)
    }

    async fn start_process(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("emulator.log"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--host=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .args(&self.flags)
            .env("JAVA_TOOL_OPTIONS", self.java_options)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn_tied(&mut cmd).context("starting the Pub/Sub emulator")?);
        let port = self.port;
        crate::wait_for(
            "the Pub/Sub emulator to answer",
            Duration::from_secs(60),
            || async move {
                tokio::task::spawn_blocking(move || http_ok(port))
                    .await
                    .ok()
                    .flatten()
            },
        )
        .await
        .with_context(|| format!("emulator log: {}", self.log()))
    }

    /// The emulator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("emulator.log")).unwrap_or_default()
    }

    /// `host:port`, the value of `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// An endpoint for the worker library's clients.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            emulator_host: Some(self.host()),
        }
    }

    /// Freezes the process (SIGSTOP): connections hang, nothing is refused.
    pub fn pause(&self) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP)?;
        }
        Ok(())
    }

    /// Thaws a paused emulator.
    pub fn resume(&self) -> anyhow::Result<()> {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT)?;
        }
        Ok(())
    }

    /// Kills the emulator; its topics and messages are gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = signal(&child, libc::SIGCONT);
            signal(&child, libc::SIGKILL)?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts a fresh emulator on the same port (empty: recreate topics).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.start_process().await
    }

    /// Creates a topic (`projects/P/topics/T`).
    pub async fn create_topic(&self, topic: &str) -> anyhow::Result<()> {
        let admin = outbox_worker::pubsub::topic_admin(&self.endpoint()).await?;
        admin
            .create_topic()
            .set_name(topic)
            .send()
            .await
            .with_context(|| format!("creating topic {topic}"))?;
        Ok(())
    }

    /// Creates a subscription, with message ordering enabled when `ordered`.
    pub async fn create_subscription(
        &self,
        subscription: &str,
        topic: &str,
        ordered: bool,
    ) -> anyhow::Result<()> {
        let admin = outbox_worker::pubsub::subscription_admin(&self.endpoint()).await?;
        admin
            .create_subscription()
            .set_name(subscription)
            .set_topic(topic)
            .set_ack_deadline_seconds(60)
            .set_enable_message_ordering(ordered)
            .send()
            .await
            .with_context(|| format!("creating subscription {subscription}"))?;
        Ok(())
    }
}

fn http_ok(port: u16) -> Option<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    buf[..n].starts_with(b"HTTP/1.1 200").then_some(())
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
