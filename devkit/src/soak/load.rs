//! The load: producers that commit, at a fixed total rate, one business row
//! (`soak_committed`, the record of what was committed) and one outbox row
//! per transaction, as an application would, with the mix a relay meets in
//! production: keyed rows (a few hot keys and a growing space of order
//! keys), unkeyed rows, rows routed to other topics, payloads from 0 B to
//! 1 MB, and a few poison rows that can never be published.
//!
//! Each ordering key belongs to one producer, which commits its rows one
//! after the other, so a key's sequence numbers are its commit order.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The tables the soak keeps beside the outbox.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS soak_committed (
    message_id   UUID PRIMARY KEY,
    route        TEXT NOT NULL,
    ordering_key TEXT,
    seq          BIGINT NOT NULL,
    poison       TEXT,
    bytes        INT NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS soak_processed (
    pos          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   TEXT NOT NULL,
    ordering_key TEXT,
    seq          BIGINT NOT NULL
);";

/// Where a row goes: the relay's topic, or a routed one.
#[derive(Clone, Debug)]
pub struct Routes {
    /// Short ids of the routed topics that exist.
    pub routed: Vec<String>,
    /// A short id no topic has (poison).
    pub missing: String,
}

/// What the producers are asked to do.
#[derive(Clone, Debug)]
pub struct LoadSettings {
    /// Transactions per second, all producers together.
    pub rate: u32,
    /// Producers (connections).
    pub producers: usize,
    pub seed: u64,
    pub routes: Routes,
    /// One oversized (10.5 MB) poison row this often, from producer 0.
    pub oversized_every: Duration,
}

/// Counters the producers keep.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Transactions committed.
    pub committed: AtomicU64,
    /// Transactions that failed (e.g. while PostgreSQL restarts); a failed
    /// commit may have committed, which `soak_committed` tells.
    pub failed: AtomicU64,
    /// Poison rows committed.
    pub poison: AtomicU64,
}

/// The running producers.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub stats: Arc<LoadStats>,
}

impl Load {
    /// Starts `settings.producers` producers on `pool`.
    pub fn start(pool: PgPool, settings: LoadSettings) -> Load {
        let stop = CancellationToken::new();
        let stats = Arc::new(LoadStats::default());
        let tasks = (0..settings.producers.max(1))
            .map(|index| {
                tokio::spawn(produce(
                    index,
                    pool.clone(),
                    settings.clone(),
                    stats.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load { stop, tasks, stats }
    }

    /// Stops every producer after its current transaction.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One row to commit.
struct Row {
    message_id: Uuid,
    route: String,
    topic_column: Option<String>,
    ordering_key: Option<String>,
    seq: i64,
    payload: Vec<u8>,
    attributes: serde_json::Value,
    poison: Option<&'static str>,
}

/// Draws rows for one producer, reproducibly from the seed.
struct Mix {
    producer: usize,
    rng: StdRng,
    routes: Routes,
    seqs: HashMap<(String, String), i64>,
    order: u64,
    order_rows_left: u32,
}

impl Mix {
    fn next(&mut self, oversized: bool) -> Row {
        let rng = &mut self.rng;
        let message_id = Uuid::from_bytes(rng.random::<[u8; 16]>());
        let message_id = uuid::Builder::from_random_bytes(*message_id.as_bytes()).into_uuid();
        let poison = if oversized {
            Some("oversized")
        } else if rng.random_bool(0.00005) {
            Some(["attributes", "empty-message-id", "missing-topic"][rng.random_range(0..3)])
        } else {
            None
        };
        let (route, topic_column) = if poison == Some("missing-topic") {
            ("missing".to_owned(), Some(self.routes.missing.clone()))
        } else if !self.routes.routed.is_empty() && rng.random_bool(0.05) {
            let topic = self.routes.routed[rng.random_range(0..self.routes.routed.len())].clone();
            (topic.clone(), Some(topic))
        } else {
            ("main".to_owned(), None)
        };
        let draw: f64 = rng.random();
        let ordering_key = if draw < 0.20 {
            None
        } else if draw < 0.95 {
            Some(format!(
                "p{}-account-{}",
                self.producer,
                rng.random_range(0..8)
            ))
        } else {
            if self.order_rows_left == 0 {
                self.order += 1;
                self.order_rows_left = rng.random_range(5..=15);
            }
            self.order_rows_left -= 1;
            Some(format!("p{}-order-{}", self.producer, self.order))
        };
        // Mostly small, as events are, with a long tail up to 1 MB: about
        // 300 B on average, so that the rate stays within what the emulator
        // (a JVM on the same two cores) can take in and fan out.
        let size = if oversized {
            10_500_000
        } else {
            let draw: f64 = rng.random();
            if draw < 0.05 {
                0
            } else if draw < 0.95 {
                rng.random_range(16..256)
            } else if draw < 0.999 {
                rng.random_range(256..4_096)
            } else if draw < 0.9999 {
                rng.random_range(4_096..65_536)
            } else {
                rng.random_range(65_536..=1_048_576)
            }
        };
        let seq = {
            let key = (route.clone(), ordering_key.clone().unwrap_or_default());
            let next = self.seqs.entry(key).or_insert(0);
            *next += 1;
            *next
        };
        let attributes = match poison {
            Some("attributes") => json!(["not", "an", "object"]),
            Some("empty-message-id") => json!({"message-id": "", "seq": seq.to_string()}),
            _ => json!({"seq": seq.to_string(), "producer": self.producer.to_string()}),
        };
        Row {
            message_id,
            route,
            topic_column,
            ordering_key,
            seq,
            payload: vec![b'x'; size],
            attributes,
            poison,
        }
    }
}

async fn produce(
    index: usize,
    pool: PgPool,
    settings: LoadSettings,
    stats: Arc<LoadStats>,
    stop: CancellationToken,
) {
    let mut mix = Mix {
        producer: index,
        rng: StdRng::seed_from_u64(
            settings.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ),
        routes: settings.routes.clone(),
        seqs: HashMap::new(),
        order: 0,
        order_rows_left: 0,
    };
    let period =
        Duration::from_secs_f64(settings.producers.max(1) as f64 / f64::from(settings.rate.max(1)));
    let mut next = Instant::now();
    let mut last_oversized = Instant::now();
    while !stop.is_cancelled() {
        next += period;
        // After a stall (PostgreSQL restarting), catch up for at most a
        // second's worth instead of bursting the whole backlog.
        let now = Instant::now();
        if next + Duration::from_secs(1) < now {
            next = now - Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {},
            _ = stop.cancelled() => break,
        }
        let oversized = index == 0 && last_oversized.elapsed() >= settings.oversized_every;
        if oversized {
            last_oversized = Instant::now();
        }
        let row = mix.next(oversized);
        match commit(&pool, &row).await {
            Ok(()) => {
                stats.committed.fetch_add(1, Ordering::Relaxed);
                if row.poison.is_some() {
                    stats.poison.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {},
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
}

/// The business row and the outbox row, in one transaction (one statement).
async fn commit(pool: &PgPool, row: &Row) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH business AS ( \
             INSERT INTO soak_committed (message_id, route, ordering_key, seq, poison, bytes) \
             VALUES ($1, $2, $3, $4, $5, $6)) \
         INSERT INTO outbox (message_id, payload, ordering_key, attributes, topic) \
         VALUES ($1, $7, $3, $8, $9)",
    )
    .bind(row.message_id)
    .bind(&row.route)
    .bind(row.ordering_key.as_deref())
    .bind(row.seq)
    .bind(row.poison)
    .bind(row.payload.len() as i32)
    .bind(&row.payload)
    .bind(&row.attributes)
    .bind(row.topic_column.as_deref())
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(seed: u64) -> Mix {
        Mix {
            producer: 3,
            rng: StdRng::seed_from_u64(seed),
            routes: Routes {
                routed: vec!["audit-log".to_owned()],
                missing: "nowhere".to_owned(),
            },
            seqs: HashMap::new(),
            order: 0,
            order_rows_left: 0,
        }
    }

    #[test]
    fn the_mix_is_reproducible_from_the_seed_and_numbers_each_key() {
        let (mut a, mut b) = (mix(7), mix(7));
        let mut last: HashMap<(String, Option<String>), i64> = HashMap::new();
        let mut poison = 0;
        for _ in 0..50_000 {
            let (x, y) = (a.next(false), b.next(false));
            assert_eq!(
                (x.message_id, x.seq, x.payload.len()),
                (y.message_id, y.seq, y.payload.len())
            );
            let previous = last.insert((x.route.clone(), x.ordering_key.clone()), x.seq);
            assert_eq!(x.seq, previous.unwrap_or(0) + 1, "per-key sequence");
            assert!(x.payload.len() <= 1_048_576);
            poison += usize::from(x.poison.is_some());
        }
        assert!(poison < 10, "{poison} poison rows");
        assert_ne!(mix(8).next(false).message_id, mix(7).next(false).message_id);
    }
}
