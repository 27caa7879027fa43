//! `make soak`: the relay and the inbox under a steady load and a schedule of
//! faults, checked continuously and at the end (see `outbox-soak --help` and
//! docs/soak.md).
//!
//! - [`load`]: the producers and the tables that record what was committed.
//! - [`cluster`]: PostgreSQL, the emulator, two relays, the inbox worker, the
//!   processors and the audit subscribers.
//! - [`faults`]: the fault kinds, the seeded schedule, the injection.
//! - [`watch`]: what is sampled every second.
//! - [`audit`]: the checks at the end.
//! - `report`: the verdict, as a table and as JSON.

pub mod audit;
pub mod cluster;
pub mod faults;
pub mod load;
mod report;
pub mod watch;

pub use report::Report;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cluster::{Cluster, MAIN_TOPIC, MISSING_TOPIC, ROUTED_TOPICS};
use faults::{FaultKind, Losses};
use load::{Load, LoadSettings, Routes};
use watch::{Target, Watch};

/// How a soak runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub duration: Duration,
    pub rate: u32,
    pub producers: usize,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    /// Mean pause between one fault's recovery and the next fault.
    pub gap: Duration,
    /// Load without faults at the start.
    pub warm_up: Duration,
    /// How long the relay may take to catch up after a fault.
    pub recovery_limit: Duration,
    /// How long everything may take to arrive after the load stops.
    pub drain_limit: Duration,
    pub worker_bin: PathBuf,
    /// Worker logs go here.
    pub log_dir: PathBuf,
}

/// Runs a soak and judges it.
pub async fn run(settings: Settings) -> anyhow::Result<Report> {
    let schedule = faults::plan(settings.seed, &settings.faults, 200, settings.gap);
    println!(
        "== soak: seed {}, {:?} at {} transactions/s, faults {}",
        settings.seed,
        settings.duration,
        settings.rate,
        settings
            .faults
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut planned = String::new();
    for (i, p) in schedule.iter().take(12).enumerate() {
        planned += &format!(" {}.{}{}", i + 1, p.kind.name(), hold(p.hold_s));
    }
    println!("== schedule (first 12):{planned} ...");
    println!(
        "== starting PostgreSQL, the emulator, two relays, the inbox worker (logs: {})",
        settings.log_dir.display()
    );
    let mut cluster = Cluster::start(settings.worker_bin.clone(), settings.log_dir.clone()).await?;
    let started = Instant::now();
    let watch = Watch::start(cluster.pool.clone(), started);
    watch.set_targets(targets(&cluster));
    let load = Load::start(
        cluster.pool.clone(),
        LoadSettings {
            rate: settings.rate,
            producers: settings.producers,
            seed: settings.seed,
            routes: Routes {
                routed: ROUTED_TOPICS.iter().map(|t| (*t).to_owned()).collect(),
                missing: MISSING_TOPIC.to_owned(),
            },
            oversized_every: Duration::from_secs(90),
        },
    );
    let mut losses = Losses::default();
    let mut records = Vec::new();
    let mut used = 0;

    let warm_up = settings.warm_up.min(settings.duration);
    progress_until(&cluster, &watch, &load, started, started + warm_up).await;
    for fault in &schedule {
        let left = settings.duration.saturating_sub(started.elapsed());
        if left < Duration::from_secs(fault.hold_s) + Duration::from_secs(10) {
            break;
        }
        used += 1;
        println!(
            "[{:>6.1}s] fault {used}: {}{}",
            started.elapsed().as_secs_f64(),
            fault.kind.name(),
            hold(fault.hold_s)
        );
        let mut record = faults::inject(&mut cluster, fault, started, &mut losses).await?;
        watch.set_targets(targets(&cluster));
        record.recovered_s = recover(&cluster, started, settings.recovery_limit).await;
        println!(
            "          {} ({}): recovered {}",
            record.kind.name(),
            record.target,
            match record.recovered_s {
                Some(at) => format!("{:.1}s after the fault ended", at - record.ended_s),
                None => "NOT within the limit".to_owned(),
            }
        );
        records.push(record);
        let until = Instant::now() + Duration::from_secs_f64(fault.gap_s);
        progress_until(
            &cluster,
            &watch,
            &load,
            started,
            until.min(started + settings.duration),
        )
        .await;
    }
    progress_until(
        &cluster,
        &watch,
        &load,
        started,
        started + settings.duration,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let stats = load.stats.clone();
    load.stop().await;
    println!("== load stopped after {seconds:.0}s; waiting for everything to arrive");
    drain(&cluster, &losses, settings.drain_limit).await;
    cluster.stop_processors();
    let (samples, memory, pool_timeouts) = watch.stop().await;
    let audits: Vec<(String, Vec<crate::Received>)> = cluster
        .audits
        .iter()
        .map(|(topic, c)| (topic.clone(), c.snapshot()))
        .collect();
    let findings = audit::check(&cluster.pool, &audits, &losses, &mut records, started).await?;
    let committed = stats.committed.load(Ordering::Relaxed);
    let load = report::LoadFigures {
        target_rate: settings.rate,
        seconds,
        committed,
        rate: committed as f64 / seconds.max(1e-9),
        failed_commits: stats.failed.load(Ordering::Relaxed),
        poison: stats.poison.load(Ordering::Relaxed),
    };
    let schedule = schedule.into_iter().take(used).collect();
    Ok(Report::judge(
        settings.seed,
        load,
        schedule,
        records,
        findings,
        &samples,
        &memory,
        &pool_timeouts,
    ))
}

fn hold(seconds: u64) -> String {
    if seconds > 0 {
        format!(" ({seconds}s)")
    } else {
        String::new()
    }
}

fn targets(cluster: &Cluster) -> Vec<Target> {
    let mut targets: Vec<Target> = cluster
        .replicas
        .iter()
        .filter_map(|r| {
            Some(Target {
                name: format!("{}#{}", r.name, r.generation),
                pid: r.process.pid()?,
                health_addr: r.process.health_addr.clone(),
            })
        })
        .collect();
    if let Some(pid) = cluster.inbox.pid() {
        targets.push(Target {
            name: "inbox".to_owned(),
            pid,
            health_addr: cluster.inbox.health_addr.clone(),
        });
    }
    targets
}

/// Prints a line every 10 s until `until`.
async fn progress_until(
    cluster: &Cluster,
    watch: &Watch,
    load: &Load,
    started: Instant,
    until: Instant,
) {
    let mut next = Instant::now();
    while Instant::now() < until {
        if Instant::now() >= next {
            let sample = watch.last();
            let lag = sample.as_ref().and_then(|s| s.outbox_lag);
            let pending = sample.as_ref().and_then(|s| s.outbox_rows);
            println!(
                "[{:>6.1}s] committed {:>8}  pending {:>6}  relay lag {:>6}  audit {:>8}  leader {}",
                started.elapsed().as_secs_f64(),
                load.stats.committed.load(Ordering::Relaxed),
                pending.map_or("-".to_owned(), |p| p.to_string()),
                lag.map_or("-".to_owned(), |l| format!("{l:.2}s")),
                cluster.audits[0].1.distinct(),
                match cluster.leader().await {
                    Some(i) => cluster.replicas[i].name.as_str(),
                    None => "none",
                }
            );
            next += Duration::from_secs(10);
        }
        let wait = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        tokio::time::sleep(wait).await;
    }
}

/// Waits until a relay leads and the oldest pending row is under a second
/// old; returns when (seconds since the start), or `None` after `limit`.
/// Poison rows do not count: a row its topic refuses waits out its
/// publish attempts (seconds) before it is dead-lettered, by design.
async fn recover(cluster: &Cluster, started: Instant, limit: Duration) -> Option<f64> {
    crate::wait_for("the relay to catch up", limit, || async {
        cluster.leader().await?;
        let lag: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp() - o.created_at)::float8 \
             FROM outbox o JOIN soak_committed c USING (message_id) \
             WHERE c.poison IS NULL ORDER BY o.id LIMIT 1",
        )
        .fetch_optional(&cluster.pool)
        .await
        .ok()?;
        (lag.unwrap_or(0.0) < 1.0).then(|| started.elapsed().as_secs_f64())
    })
    .await
    .ok()
}

/// After the load: waits until the outbox is empty and every subscriber and
/// the processors have everything they should (or `limit`).
async fn drain(cluster: &Cluster, losses: &Losses, limit: Duration) {
    let result = crate::wait_for("everything to arrive", limit, || async {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), \
                    (SELECT count(*) FROM inbox WHERE processed_at IS NULL), \
                    (SELECT count(*) FROM inbox)",
        )
        .fetch_one(&cluster.pool)
        .await
        .ok()?;
        if counts.0 > 0 || counts.1 > 0 {
            return None;
        }
        for (topic, collector) in &cluster.audits {
            let route = if topic == MAIN_TOPIC {
                "main"
            } else {
                topic.as_str()
            };
            let expected: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM soak_committed WHERE route = $1 AND poison IS NULL",
            )
            .bind(route)
            .fetch_one(&cluster.pool)
            .await
            .ok()?;
            let lost = losses.audit.get(topic).map_or(0, |l| l.len()) as i64;
            if (collector.distinct() as i64) < expected - lost {
                return None;
            }
            if topic == MAIN_TOPIC && counts.2 < expected - losses.inbox.len() as i64 {
                return None;
            }
        }
        Some(())
    })
    .await;
    if let Err(e) = result {
        println!("== {e:#}; checking what arrived");
    }
}
