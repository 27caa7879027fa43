//! The soak's verdict: the figures of a run, what failed, a table for the
//! terminal and the same as JSON.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

use super::audit::{Findings, duplicates_within_bound};
use super::cluster::IN_FLIGHT_BOUND;
use super::faults::{FaultKind, FaultRecord, Planned};
use super::watch::{Memory, Sample};

/// Seconds after a partition heals before the NOTIFY queue must be empty
/// again (the partitioned relay's listening session held it meanwhile).
const AFTER_PARTITION_S: f64 = 15.0;
/// One page of PostgreSQL's NOTIFY queue as a fraction of the whole queue
/// (8 kB of 8 GB), the unit `pg_notification_queue_usage()` moves in.
const NOTIFY_PAGE: f64 = 1.0 / 1_048_576.0;
/// Pages the queue may hold although every listener has read everything:
/// PostgreSQL frees pages only every fourth page a notifier writes
/// (`QUEUE_CLEANUP_DELAY`), and the slowest listener may be a page behind at
/// that moment; a listener that stops reading at 2,000 notifications/s
/// passes this within a second.
const NOTIFY_SLACK_PAGES: f64 = 8.0;
/// A process's memory may grow this much (and this many MB) from the first
/// to the last third of its life before it counts as drift.
const DRIFT_PERCENT: f64 = 25.0;
const DRIFT_MB: f64 = 32.0;

/// The load as offered and as committed.
#[derive(Clone, Debug, Serialize)]
pub struct LoadFigures {
    pub target_rate: u32,
    pub seconds: f64,
    pub committed: u64,
    pub rate: f64,
    pub failed_commits: u64,
    pub poison: u64,
}

/// Per fault kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaultFigures {
    pub injected: usize,
    pub longest_recovery_s: f64,
    pub duplicates: usize,
    pub not_recovered: usize,
}

/// The NOTIFY queue and the listening backends.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NotifyFigures {
    pub samples: usize,
    pub max_queue_usage: f64,
    /// Outside partitions of a relay from PostgreSQL (its listening session
    /// cannot read then; see docs/soak.md).
    pub max_queue_usage_outside_partitions: f64,
    pub listener_blocked_samples_outside_partitions: usize,
    pub final_queue_usage: Option<f64>,
}

/// Memory of one process.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryFigures {
    pub process: String,
    pub seconds: f64,
    pub first_third_mb: f64,
    pub last_third_mb: f64,
    pub max_mb: f64,
    pub growth_percent: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub passed: bool,
    pub failures: Vec<String>,
    pub load: LoadFigures,
    pub schedule: Vec<Planned>,
    pub faults: Vec<FaultRecord>,
    pub by_kind: BTreeMap<&'static str, FaultFigures>,
    pub duplicate_bound_per_fault: usize,
    pub findings: Findings,
    pub notify: NotifyFigures,
    pub memory: Vec<MemoryFigures>,
    pub pool_timeouts: f64,
    pub max_outbox_lag_s: f64,
}

impl Report {
    /// Judges a run.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(
        seed: u64,
        load: LoadFigures,
        schedule: Vec<Planned>,
        faults: Vec<FaultRecord>,
        findings: Findings,
        samples: &[Sample],
        memory: &HashMap<String, Memory>,
        pool_timeouts: &HashMap<String, f64>,
    ) -> Report {
        let mut failures = Vec::new();
        let mut by_kind: BTreeMap<&'static str, FaultFigures> = BTreeMap::new();
        for fault in &faults {
            let figures = by_kind.entry(fault.kind.name()).or_default();
            figures.injected += 1;
            figures.duplicates += fault.duplicates;
            match fault.recovered_s {
                Some(at) => {
                    figures.longest_recovery_s = figures.longest_recovery_s.max(at - fault.ended_s)
                }
                None => {
                    figures.not_recovered += 1;
                    failures.push(format!(
                        "{} at {:.0}s: the relay did not catch up",
                        fault.kind.name(),
                        fault.started_s
                    ));
                }
            }
            if !duplicates_within_bound(fault) {
                failures.push(format!(
                    "{} at {:.0}s: {} duplicates, more than the {IN_FLIGHT_BOUND} a relay has in flight",
                    fault.kind.name(),
                    fault.started_s,
                    fault.duplicates
                ));
            }
        }
        for delivery in &findings.deliveries {
            let name = &delivery.subscriber;
            if delivery.lost > 0 {
                failures.push(format!(
                    "{name}: {} rows lost, e.g. {:?}",
                    delivery.lost, delivery.lost_examples
                ));
            }
            if delivery.reordered > 0 {
                failures.push(format!(
                    "{name}: {} rows out of per-key order",
                    delivery.reordered
                ));
            }
            if delivery.unexpected > 0 {
                failures.push(format!(
                    "{name}: {} rows not expected there",
                    delivery.unexpected
                ));
            }
            let tables = name == "inbox" || name == "processed";
            if tables && delivery.duplicated > 0 {
                failures.push(format!(
                    "{name}: {} rows more than once",
                    delivery.duplicated
                ));
            }
        }
        if findings.duplicates_without_fault > 0 {
            failures.push(format!(
                "{} duplicates before any fault",
                findings.duplicates_without_fault
            ));
        }
        let dl = &findings.dead_letters;
        if !dl.unexpected.is_empty() || !dl.missing.is_empty() || dl.inbox_dead_letters > 0 {
            failures.push(format!(
                "dead letters: {} not poison (e.g. {:?}), {} poison rows missing (e.g. {:?}), {} in the inbox's",
                dl.unexpected.len(),
                dl.unexpected,
                dl.missing.len(),
                dl.missing,
                dl.inbox_dead_letters
            ));
        }
        if findings.outbox_left > 0 {
            failures.push(format!("{} rows left in the outbox", findings.outbox_left));
        }
        let notify = notify_figures(samples, &faults);
        let slack = NOTIFY_SLACK_PAGES * NOTIFY_PAGE;
        if notify.max_queue_usage_outside_partitions > slack {
            failures.push(format!(
                "NOTIFY queue usage reached {} ({:.0} pages) outside partitions",
                notify.max_queue_usage_outside_partitions,
                notify.max_queue_usage_outside_partitions / NOTIFY_PAGE
            ));
        }
        if notify.listener_blocked_samples_outside_partitions > 0 {
            failures.push(format!(
                "a listening backend waited in ClientWrite in {} samples",
                notify.listener_blocked_samples_outside_partitions
            ));
        }
        if notify.final_queue_usage.is_some_and(|u| u > slack) {
            failures.push("the NOTIFY queue was not empty at the end".to_owned());
        }
        let memory = memory_figures(memory);
        for m in &memory {
            let grown_mb = m.last_third_mb - m.first_third_mb;
            if m.growth_percent > DRIFT_PERCENT && grown_mb > DRIFT_MB {
                failures.push(format!(
                    "{}: memory grew {:.0}% ({:.0} MB) over {:.0}s",
                    m.process, m.growth_percent, grown_mb, m.seconds
                ));
            }
        }
        let pool_timeouts: f64 = pool_timeouts.values().sum();
        if pool_timeouts > 0.0 {
            failures.push(format!(
                "{pool_timeouts} waits for a pooled connection timed out"
            ));
        }
        let max_outbox_lag_s = samples
            .iter()
            .filter_map(|s| s.outbox_lag)
            .fold(0.0, f64::max);
        Report {
            seed,
            passed: failures.is_empty(),
            failures,
            load,
            schedule,
            faults,
            by_kind,
            duplicate_bound_per_fault: IN_FLIGHT_BOUND,
            findings,
            notify,
            memory,
            pool_timeouts,
            max_outbox_lag_s,
        }
    }

    /// The table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let l = &self.load;
        out += &format!(
            "load          {} rows committed in {:.0}s: {:.0}/s of {} target ({:.1}%); {} failed commits; {} poison rows\n",
            l.committed,
            l.seconds,
            l.rate,
            l.target_rate,
            100.0 * l.rate / f64::from(l.target_rate.max(1)),
            l.failed_commits,
            l.poison
        );
        out += &format!(
            "faults        {:<18} {:>8} {:>16} {:>11}\n",
            "kind", "injected", "longest recovery", "duplicates"
        );
        for (kind, f) in &self.by_kind {
            out += &format!(
                "              {:<18} {:>8} {:>14.1} s {:>11}\n",
                kind, f.injected, f.longest_recovery_s, f.duplicates
            );
        }
        out += &format!(
            "              (duplicates: re-publications after the fault; bound per fault {})\n",
            self.duplicate_bound_per_fault
        );
        out += &format!(
            "delivery      {:<22} {:>9} {:>9} {:>5} {:>9} {:>10} {:>11} {:>16}\n",
            "subscriber",
            "expected",
            "delivered",
            "lost",
            "reordered",
            "duplicated",
            "redelivered",
            "lost to restarts"
        );
        for d in &self.findings.deliveries {
            out += &format!(
                "              {:<22} {:>9} {:>9} {:>5} {:>9} {:>10} {:>11} {:>16}\n",
                d.subscriber,
                d.expected,
                d.delivered,
                d.lost,
                d.reordered,
                d.duplicated,
                d.redelivered,
                d.lost_to_restarts
            );
        }
        let dl = &self.findings.dead_letters;
        out += &format!(
            "dead letters  {} poison rows committed, {} dead-lettered, {} not poison, {} poison missing\n",
            dl.poison_committed,
            dl.dead_lettered,
            dl.unexpected.len(),
            dl.missing.len()
        );
        let n = &self.notify;
        out += &format!(
            "NOTIFY queue  max {:.0} pages ({:.0} outside partitions; bound {NOTIFY_SLACK_PAGES} pages of 8 kB), listener blocked in {} samples, at the end {:.0} pages ({} samples)\n",
            n.max_queue_usage / NOTIFY_PAGE,
            n.max_queue_usage_outside_partitions / NOTIFY_PAGE,
            n.listener_blocked_samples_outside_partitions,
            n.final_queue_usage.unwrap_or(0.0) / NOTIFY_PAGE,
            n.samples
        );
        out += &format!("outbox lag    longest {:.1}s\n", self.max_outbox_lag_s);
        out += "memory        process        seconds  first third  last third     max  growth   (relays: while leading)\n";
        for m in &self.memory {
            out += &format!(
                "              {:<14} {:>7.0} {:>9.1} MB {:>8.1} MB {:>5.0} MB {:>5.1}%\n",
                m.process, m.seconds, m.first_third_mb, m.last_third_mb, m.max_mb, m.growth_percent
            );
        }
        out += &format!(
            "pool          {} connection waits timed out\n",
            self.pool_timeouts
        );
        if self.passed {
            out += "RESULT        PASS\n";
        } else {
            out += "RESULT        FAIL\n";
            for failure in &self.failures {
                out += &format!("              - {failure}\n");
            }
        }
        out
    }
}

/// The NOTIFY figures, leaving out partitions of a relay from PostgreSQL.
fn notify_figures(samples: &[Sample], faults: &[FaultRecord]) -> NotifyFigures {
    let partitioned = |t: f64| {
        faults.iter().any(|f| {
            f.kind == FaultKind::Partition
                && t >= f.started_s
                && t <= f.recovered_s.unwrap_or(f.ended_s).max(f.ended_s) + AFTER_PARTITION_S
        })
    };
    let mut figures = NotifyFigures {
        samples: samples.len(),
        final_queue_usage: samples.iter().rev().find_map(|s| s.notify_queue),
        ..NotifyFigures::default()
    };
    for sample in samples {
        let Some(usage) = sample.notify_queue else {
            continue;
        };
        figures.max_queue_usage = figures.max_queue_usage.max(usage);
        if !partitioned(sample.t) {
            figures.max_queue_usage_outside_partitions =
                figures.max_queue_usage_outside_partitions.max(usage);
            if sample.client_write.is_some_and(|n| n > 0) {
                figures.listener_blocked_samples_outside_partitions += 1;
            }
        }
    }
    figures
}

/// Memory per process: medians of the first and last third of its samples
/// (after its first 30 s, when it has warmed up; a relay's samples are
/// those while it led).
fn memory_figures(memory: &HashMap<String, Memory>) -> Vec<MemoryFigures> {
    let mut figures: Vec<MemoryFigures> = memory
        .iter()
        .filter_map(|(process, m)| {
            let start = m.rss_kb.first()?.0;
            let warm: Vec<(f64, u64)> = m
                .rss_kb
                .iter()
                .copied()
                .filter(|(t, _)| *t >= start + 30.0)
                .collect();
            if warm.len() < 9 {
                return None;
            }
            let third = warm.len() / 3;
            let median = |part: &[(f64, u64)]| {
                let mut kb: Vec<u64> = part.iter().map(|s| s.1).collect();
                kb.sort_unstable();
                kb[kb.len() / 2] as f64 / 1024.0
            };
            let first = median(&warm[..third]);
            let last = median(&warm[warm.len() - third..]);
            Some(MemoryFigures {
                process: process.clone(),
                seconds: warm.last()?.0 - warm.first()?.0,
                first_third_mb: first,
                last_third_mb: last,
                max_mb: warm.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0,
                growth_percent: 100.0 * (last - first) / first.max(1.0),
            })
        })
        .collect();
    figures.sort_by(|a, b| a.process.cmp(&b.process));
    figures
}
