//! What the soak watches while it runs, sampled every second: the NOTIFY
//! queue and listening backends blocked on their clients, the relay's lag,
//! the workers' memory and their pool timeouts.

use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::worker::parse_metric;

/// A worker process to watch.
#[derive(Clone, Debug)]
pub struct Target {
    /// `relay-a#2` (replica and process generation) or `inbox`.
    pub name: String,
    pub pid: u32,
    /// Its health/metrics address.
    pub health_addr: String,
}

/// One sample.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    /// `pg_notification_queue_usage()`; `None` while PostgreSQL is down.
    pub notify_queue: Option<f64>,
    /// Listening (`LISTEN`) backends of the workers waiting to write to
    /// their client (`ClientWrite`): notifications the relay does not read.
    pub client_write: Option<i64>,
    /// Age of the oldest pending outbox row, seconds (0 when empty).
    pub outbox_lag: Option<f64>,
    /// Pending outbox rows.
    pub outbox_rows: Option<i64>,
    /// Age of the oldest unprocessed inbox row, seconds.
    pub inbox_lag: Option<f64>,
}

/// Memory of one process over its life; of a relay, only while it leads
/// (a standby holds a third of a leader's memory, so a standby that takes
/// over would look like drift).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    /// (seconds since the start, resident kB).
    pub rss_kb: Vec<(f64, u64)>,
}

/// The watcher and what it saw.
pub struct Watch {
    targets: Arc<Mutex<Vec<Target>>>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    pub memory: Arc<Mutex<HashMap<String, Memory>>>,
    /// Highest pool-timeout counter seen per process.
    pub pool_timeouts: Arc<Mutex<HashMap<String, f64>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// Samples every second until stopped.
    pub fn start(pool: PgPool, started: Instant) -> Watch {
        let targets: Arc<Mutex<Vec<Target>>> = Arc::default();
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let memory: Arc<Mutex<HashMap<String, Memory>>> = Arc::default();
        let pool_timeouts: Arc<Mutex<HashMap<String, f64>>> = Arc::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(
            pool,
            started,
            targets.clone(),
            samples.clone(),
            memory.clone(),
            pool_timeouts.clone(),
            stop.clone(),
        ));
        Watch {
            targets,
            samples,
            memory,
            pool_timeouts,
            stop,
            task,
        }
    }

    /// The processes to watch from now on.
    pub fn set_targets(&self, targets: Vec<Target>) {
        *lock(&self.targets) = targets;
    }

    /// The latest sample.
    pub fn last(&self) -> Option<Sample> {
        lock(&self.samples).last().cloned()
    }

    /// Stops sampling.
    pub async fn stop(self) -> (Vec<Sample>, HashMap<String, Memory>, HashMap<String, f64>) {
        self.stop.cancel();
        let _ = self.task.await;
        (
            take(&self.samples),
            take(&self.memory),
            take(&self.pool_timeouts),
        )
    }
}

fn take<T: Default>(m: &Mutex<T>) -> T {
    std::mem::take(&mut *lock(m))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    pool: PgPool,
    started: Instant,
    targets: Arc<Mutex<Vec<Target>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    memory: Arc<Mutex<HashMap<String, Memory>>>,
    pool_timeouts: Arc<Mutex<HashMap<String, f64>>>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = stop.cancelled() => return,
        }
        let t = started.elapsed().as_secs_f64();
        let sample = sample_database(&pool, t).await;
        lock(&samples).push(sample);
        let now: Vec<Target> = lock(&targets).clone();
        for target in now {
            let url = format!("http://{}/metrics", target.health_addr);
            let Ok(response) = http.get(url).send().await else {
                continue;
            };
            let Ok(body) = response.text().await else {
                continue;
            };
            let standby = parse_metric(&body, "outbox_is_leader") == Some(0.0);
            if let Some(kb) = rss_kb(target.pid).filter(|_| !standby) {
                lock(&memory)
                    .entry(target.name.clone())
                    .or_default()
                    .rss_kb
                    .push((t, kb));
            }
            let timeouts = parse_metric(&body, "outbox_database_pool_timeouts_total")
                .or_else(|| parse_metric(&body, "inbox_database_pool_timeouts_total"));
            if let Some(n) = timeouts {
                let mut seen = lock(&pool_timeouts);
                let entry = seen.entry(target.name.clone()).or_insert(0.0);
                *entry = entry.max(n);
            }
        }
    }
}

async fn sample_database(pool: &PgPool, t: f64) -> Sample {
    let figures = sqlx::query_as::<_, (f64, i64, Option<f64>, i64, Option<f64>)>(
        "SELECT pg_notification_queue_usage(), \
           (SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite' \
              AND application_name LIKE 'outbox-worker%' AND query LIKE 'LISTEN%'), \
           (SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 FROM outbox ORDER BY id LIMIT 1), \
           (SELECT count(*) FROM outbox), \
           (SELECT EXTRACT(EPOCH FROM clock_timestamp() - received_at)::float8 FROM inbox \
              WHERE processed_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1)",
    )
    .fetch_one(pool);
    match tokio::time::timeout(Duration::from_secs(2), figures).await {
        Ok(Ok((queue, client_write, outbox_lag, outbox_rows, inbox_lag))) => Sample {
            t,
            notify_queue: Some(queue),
            client_write: Some(client_write),
            outbox_lag: Some(outbox_lag.unwrap_or(0.0)),
            outbox_rows: Some(outbox_rows),
            inbox_lag: Some(inbox_lag.unwrap_or(0.0)),
        },
        _ => Sample {
            t,
            notify_queue: None,
            client_write: None,
            outbox_lag: None,
            outbox_rows: None,
            inbox_lag: None,
        },
    }
}

/// Resident memory of a process, from `/proc`.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_resident_memory() {
        let kb = rss_kb(std::process::id()).expect("VmRSS");
        assert!(kb > 100, "{kb} kB");
    }
}
