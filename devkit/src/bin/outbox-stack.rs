//! `outbox-stack`: starts PostgreSQL and the Pub/Sub emulator (throwaway, on
//! free ports in a temporary directory), creates a database, a topic and an
//! ordered subscription, prints where they are as one JSON line on stdout,
//! and keeps them running until stdin closes or SIGTERM/SIGINT arrives. Then
//! both are stopped and their directories removed; if this process is killed,
//! the kernel kills them too.
//!
//! For tests in other languages (charts/tests/test_chart_alerts.py) that need
//! the real infrastructure the Rust tests use:
//!
//! ```console
//! $ outbox-stack
//! {"database_url":"postgres://postgres@127.0.0.1:41234/outbox","emulator_host":"127.0.0.1:42345",...}
//! ```

use clap::Parser;
use std::io::{Read, Write};

use devkit::{Emulator, Postgres};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "outbox-stack",
    about = "Start PostgreSQL and the Pub/Sub emulator, print their addresses as JSON, run until stdin closes or SIGTERM"
)]
struct Args {
    /// Name of the database to create.
    #[arg(long, default_value = "outbox")]
    database: String,
    /// Pub/Sub project of the topic and the subscription.
    #[arg(long, default_value = "outbox-stack")]
    project: String,
    /// Topic id to create.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Subscription id to create on the topic (message ordering on).
    #[arg(long, default_value = "orders-inbox")]
    subscription: String,
}

// One thread: the children's parent-death signal is tied to the thread that
// spawned them, so they must not be spawned from a pool thread that may exit.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Installed before anything starts, so that an early SIGTERM still stops
    // them in order instead of killing this process outright.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let (pg, emulator) = tokio::try_join!(Postgres::start(), Emulator::start())?;
    let database_url = pg.create_database(&args.database).await?;
    let topic = format!("projects/{}/topics/{}", args.project, args.topic);
    let subscription = format!(
        "projects/{}/subscriptions/{}",
        args.project, args.subscription
    );
    emulator.create_topic(&topic).await?;
    emulator
        .create_subscription(&subscription, &topic, true)
        .await?;

    let line = serde_json::json!({
        "database_url": database_url,
        "postgres_port": pg.port(),
        "emulator_host": emulator.host(),
        "project": args.project,
        "topic": topic,
        "subscription": subscription,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);

    // A plain thread, not tokio's stdin: a read blocked in tokio's pool would
    // hold up the runtime's shutdown after a signal.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        // Anything written is ignored; end of input (or an error) ends the run.
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let why = tokio::select! {
        _ = closed_rx => "stdin closed",
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    eprintln!("outbox-stack: {why}; stopping PostgreSQL and the emulator");
    drop(emulator);
    drop(pg);
    Ok(())
}
