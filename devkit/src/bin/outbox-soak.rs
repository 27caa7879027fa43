//! `outbox-soak`: runs the relay and the inbox under a steady load while
//! injecting faults on a seeded schedule, then checks that every committed
//! row arrived exactly once, in per-key order, and prints a report (also
//! written as JSON). Exit status 0 when every check passed.
//!
//! `make soak` runs it for 10 minutes at 1,000 transactions/s (what a
//! 2-core machine running everything at once holds end to end; see
//! docs/soak.md); `make test` runs a 2-minute soak. `--seed` reproduces a
//! run's schedule and load.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

use devkit::soak::faults::FaultKind;
use devkit::soak::{Settings, run};

#[derive(Parser)]
#[command(name = "outbox-soak", about = "Chaos soak of the relay and the inbox")]
struct Args {
    /// How long the load runs.
    #[arg(long, env = "SOAK_DURATION", default_value = "10m", value_parser = duration)]
    duration: Duration,
    /// Transactions per second (one business row and one outbox row each);
    /// the default is what a 2-core machine holds with every part on it.
    #[arg(long, env = "SOAK_RATE", default_value_t = 1000)]
    rate: u32,
    /// Producer connections.
    #[arg(long, env = "SOAK_PRODUCERS", default_value_t = 16)]
    producers: usize,
    /// Seed of the load and the fault schedule (default: random, printed).
    #[arg(long, env = "SOAK_SEED")]
    seed: Option<u64>,
    /// Fault kinds to inject (default: all).
    #[arg(long, env = "SOAK_FAULTS", value_enum, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// Mean pause between recovering from a fault and the next one.
    #[arg(long, env = "SOAK_FAULT_GAP", default_value = "10s", value_parser = duration)]
    gap: Duration,
    /// Load without faults at the start.
    #[arg(long, env = "SOAK_WARM_UP", default_value = "15s", value_parser = duration)]
    warm_up: Duration,
    /// How long the relay may take to catch up after a fault.
    #[arg(long, env = "SOAK_RECOVERY_LIMIT", default_value = "120s", value_parser = duration)]
    recovery_limit: Duration,
    /// How long everything may take to arrive after the load stops.
    #[arg(long, env = "SOAK_DRAIN_LIMIT", default_value = "300s", value_parser = duration)]
    drain_limit: Duration,
    /// The worker binary (default: outbox-worker next to this program).
    #[arg(long, env = "OUTBOX_WORKER_BIN")]
    worker_bin: Option<PathBuf>,
    /// Where the JSON report goes.
    #[arg(long, env = "SOAK_REPORT", default_value = "target/soak/report.json")]
    report: PathBuf,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 2m, 10m)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            % 1_000_000
    });
    let worker_bin = match args.worker_bin {
        Some(bin) => bin,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this program")?
            .join("outbox-worker"),
    };
    anyhow::ensure!(
        worker_bin.exists(),
        "worker binary {} not found (build it, or pass --worker-bin)",
        worker_bin.display()
    );
    let report_dir = args
        .report
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&report_dir)?;
    let settings = Settings {
        duration: args.duration,
        rate: args.rate,
        producers: args.producers,
        seed,
        faults: if args.faults.is_empty() {
            FaultKind::ALL.to_vec()
        } else {
            args.faults
        },
        gap: args.gap,
        warm_up: args.warm_up,
        recovery_limit: args.recovery_limit,
        drain_limit: args.drain_limit,
        worker_bin,
        log_dir: report_dir.join(format!("logs-{seed}")),
    };
    let report = run(settings).await?;
    println!("== soak report (seed {seed}; rerun with --seed {seed})");
    print!("{}", report.table());
    std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    println!("== JSON report: {}", args.report.display());
    anyhow::ensure!(
        report.passed,
        "the soak failed ({} checks)",
        report.failures.len()
    );
    Ok(())
}
