//! The faults the soak injects, on a schedule drawn from the seed, and how
//! each is done to the running cluster.
//!
//! One fault at a time: the runner injects one, waits until it is over and
//! the relay has caught up (that time is the fault's recovery), then pauses
//! before the next. Every kind comes up once before any comes up again.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::cluster::{Cluster, MAIN_TOPIC, ROUTED_TOPICS};

/// What can go wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of the leading relay; a new process replaces it.
    LeaderKill9,
    /// SIGTERM of the leading relay (a rolling update); a new process replaces it.
    LeaderSigterm,
    /// `pg_terminate_backend` of the leader's advisory-lock session.
    LockSession,
    /// `pg_terminate_backend` of the sessions holding claims.
    ClaimSessions,
    /// PostgreSQL stops (fast shutdown) and starts again.
    PostgresRestart,
    /// The emulator is frozen (SIGSTOP) for a while.
    EmulatorPause,
    /// The emulator is killed and started again, empty: what it had
    /// accepted and not delivered is lost (accounted for separately).
    EmulatorRestart,
    /// The leader's link to PostgreSQL hangs silently for a while.
    Partition,
    /// The leader's link to Pub/Sub slows down to 256 kB/s for a while.
    SlowLink,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 9] = [
        FaultKind::LeaderKill9,
        FaultKind::LeaderSigterm,
        FaultKind::LockSession,
        FaultKind::ClaimSessions,
        FaultKind::PostgresRestart,
        FaultKind::EmulatorPause,
        FaultKind::EmulatorRestart,
        FaultKind::Partition,
        FaultKind::SlowLink,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LeaderKill9 => "leader-kill9",
            FaultKind::LeaderSigterm => "leader-sigterm",
            FaultKind::LockSession => "lock-session",
            FaultKind::ClaimSessions => "claim-sessions",
            FaultKind::PostgresRestart => "postgres-restart",
            FaultKind::EmulatorPause => "emulator-pause",
            FaultKind::EmulatorRestart => "emulator-restart",
            FaultKind::Partition => "partition",
            FaultKind::SlowLink => "slow-link",
        }
    }

    /// How long a lasting fault lasts, drawn from `rng`.
    fn hold(self, rng: &mut StdRng) -> Duration {
        let secs = match self {
            FaultKind::EmulatorPause => rng.random_range(5..=15),
            // Longer than the renew deadline, so that the standby takes over.
            FaultKind::Partition => rng.random_range(12..=20),
            FaultKind::SlowLink => rng.random_range(10..=20),
            _ => 0,
        };
        Duration::from_secs(secs)
    }
}

/// One planned fault.
#[derive(Clone, Debug, Serialize)]
pub struct Planned {
    pub kind: FaultKind,
    /// How long it lasts (0 for instant faults).
    pub hold_s: u64,
    /// Pause after recovery, before the next fault.
    pub gap_s: f64,
}

/// The schedule for a seed: `n` faults of the given kinds.
pub fn plan(seed: u64, kinds: &[FaultKind], n: usize, gap: Duration) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed.rotate_left(17) ^ 0x5EED);
    let mut planned = Vec::with_capacity(n);
    while planned.len() < n && !kinds.is_empty() {
        let mut round = kinds.to_vec();
        round.shuffle(&mut rng);
        for kind in round.into_iter().take(n - planned.len()) {
            planned.push(Planned {
                kind,
                hold_s: kind.hold(&mut rng).as_secs(),
                gap_s: gap.as_secs_f64() * rng.random_range(0.5..1.5),
            });
        }
    }
    planned
}

/// What happened when a fault was injected.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// Which relay, session or process it hit.
    pub target: String,
    /// Seconds since the start of the soak.
    pub started_s: f64,
    pub ended_s: f64,
    /// When the relay had caught up again (oldest pending row under 1 s).
    pub recovered_s: Option<f64>,
    /// Relay duplicates (re-publications) that arrived from this fault's
    /// start until the next fault's start.
    pub duplicates: usize,
}

/// Messages an emulator restart lost (accepted by the old emulator, not
/// delivered before it died), per audit topic and for the inbox.
#[derive(Debug, Default)]
pub struct Losses {
    pub audit: HashMap<String, HashSet<String>>,
    pub inbox: HashSet<String>,
}

/// Injects `fault` and returns once it is over (not yet recovered from).
pub async fn inject(
    cluster: &mut Cluster,
    fault: &Planned,
    started: Instant,
    losses: &mut Losses,
) -> anyhow::Result<FaultRecord> {
    let at = |i: Instant| i.duration_since(started).as_secs_f64();
    let begin = Instant::now();
    let hold = Duration::from_secs(fault.hold_s);
    let leader = match cluster.leader().await {
        Some(leader) => leader,
        None => {
            crate::wait_for("a leader", Duration::from_secs(60), || async {
                cluster.leader().await
            })
            .await?
        }
    };
    let leader_name = cluster.replicas[leader].name.clone();
    let target = match fault.kind {
        FaultKind::LeaderKill9 => {
            cluster.replicas[leader].process.kill()?;
            cluster.respawn(leader)?;
            leader_name
        }
        FaultKind::LeaderSigterm => {
            let status = cluster.replicas[leader]
                .process
                .terminate(Duration::from_secs(60))
                .await?;
            anyhow::ensure!(
                status.success(),
                "{leader_name} exited with {status} on SIGTERM"
            );
            cluster.respawn(leader)?;
            leader_name
        }
        FaultKind::LockSession => {
            let pids = terminate(
                cluster,
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND classid = x'6f6272'::int::oid AND pid <> pg_backend_pid()",
            )
            .await?;
            format!("{leader_name} lock session {pids:?}")
        }
        FaultKind::ClaimSessions => {
            let mut pids = Vec::new();
            // Claims come and go; catch some within a few seconds.
            let until = Instant::now() + Duration::from_secs(5);
            while pids.is_empty() && Instant::now() < until {
                pids = terminate(
                    cluster,
                    &format!(
                        "SELECT DISTINCT pid FROM pg_locks WHERE {CLAIM_LOCK} \
                         AND pid <> pg_backend_pid()"
                    ),
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            format!("{leader_name} claim sessions {pids:?}")
        }
        FaultKind::PostgresRestart => {
            cluster.pg.restart().await?;
            "PostgreSQL".to_owned()
        }
        FaultKind::EmulatorPause => {
            cluster.emulator.pause()?;
            tokio::time::sleep(hold).await;
            cluster.emulator.resume()?;
            "emulator".to_owned()
        }
        FaultKind::EmulatorRestart => {
            restart_emulator(cluster, losses).await?;
            "emulator".to_owned()
        }
        FaultKind::Partition => {
            let link = &cluster.replicas[leader].db_link;
            link.cut();
            tokio::time::sleep(hold).await;
            cluster.replicas[leader].db_link.heal();
            format!("{leader_name} from PostgreSQL")
        }
        FaultKind::SlowLink => {
            cluster.replicas[leader].pubsub_link.throttle(Some(256_000));
            tokio::time::sleep(hold).await;
            cluster.replicas[leader].pubsub_link.throttle(None);
            format!("{leader_name} to Pub/Sub")
        }
    };
    Ok(FaultRecord {
        kind: fault.kind,
        target,
        started_s: at(begin),
        ended_s: at(Instant::now()),
        recovered_s: None,
        duplicates: 0,
    })
}

/// A `pg_locks` row of a claim: the row-share lock a claiming transaction
/// holds on the outbox table.
const CLAIM_LOCK: &str = "locktype = 'relation' AND relation = 'outbox'::regclass \
     AND mode = 'RowShareLock' AND granted";

/// Runs `select_pids` and ends those sessions; returns their pids.
async fn terminate(cluster: &Cluster, select_pids: &str) -> anyhow::Result<Vec<i32>> {
    let sql = format!(
        "WITH victims AS MATERIALIZED ({select_pids}) \
         SELECT pid FROM victims WHERE pg_terminate_backend(pid)"
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&cluster.pool)
        .await?)
}

/// Kills the emulator and starts an empty one on the same port, keeping
/// every relay away from it meanwhile (their links cut and reset, so that
/// nothing the old emulator said reaches them later), so that nothing is
/// published before the topics and subscriptions exist again. Records what
/// the old emulator had accepted and not delivered.
async fn restart_emulator(cluster: &mut Cluster, losses: &mut Losses) -> anyhow::Result<()> {
    for replica in &cluster.replicas {
        replica.pubsub_link.cut();
        replica.pubsub_link.reset();
    }
    let cut_at: f64 = sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
        .fetch_one(&cluster.pool)
        .await?;
    cluster.emulator.kill()?;
    // Nothing arrives any more: what each subscriber has is final.
    let mut received: HashMap<String, HashSet<String>> = HashMap::new();
    for (topic, collector) in &cluster.audits {
        received.insert(
            topic.clone(),
            collector
                .snapshot()
                .into_iter()
                .map(|r| r.message_id)
                .collect(),
        );
    }
    // The inbox worker stores what it had received.
    crate::wait_for(
        "the inbox worker to store what it received",
        Duration::from_secs(30),
        || async {
            let metric = |name| cluster.inbox.metric(name);
            let received = metric("inbox_messages_received_total").await?;
            let done = metric("inbox_messages_stored_total").await?
                + metric("inbox_duplicates_total").await?
                + metric("inbox_dead_letter_total").await?;
            (done >= received).then_some(())
        },
    )
    .await?;
    let stored: HashSet<String> = sqlx::query_scalar("SELECT message_id FROM inbox")
        .fetch_all(&cluster.pool)
        .await?
        .into_iter()
        .collect();
    cluster.emulator.restart().await?;
    cluster.recreate_pubsub().await?;
    // A batch claimed before the cut may hold rows the old emulator
    // acknowledged while it waits, in claim order, behind an earlier batch
    // that never will be: it deletes them when it finishes. Wait until every
    // claim that began before the cut has ended, so that the outbox says
    // exactly what the old emulator accepted (later claims get no answer).
    crate::wait_for(
        "the claims begun before the cut to end",
        Duration::from_secs(120),
        || async {
            let open: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) \
                 WHERE {CLAIM_LOCK} AND xact_start <= to_timestamp($1)"
            )))
            .bind(cut_at)
            .fetch_one(&cluster.pool)
            .await
            .ok()?;
            (open == 0).then_some(())
        },
    )
    .await?;
    // Relays got no answer from the old emulator since their links were
    // cut: every row deleted from the outbox by now was accepted by it.
    let published: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.message_id::text, c.route FROM soak_committed c \
         WHERE c.poison IS NULL \
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.message_id = c.message_id)",
    )
    .fetch_all(&cluster.pool)
    .await?;
    for (id, route) in published {
        let topic = if route == "main" {
            MAIN_TOPIC
        } else {
            route.as_str()
        };
        if received.get(topic).is_some_and(|r| !r.contains(&id)) {
            losses
                .audit
                .entry(topic.to_owned())
                .or_default()
                .insert(id.clone());
        }
        if route == "main" && !stored.contains(&id) {
            losses.inbox.insert(id);
        }
    }
    debug_assert!(ROUTED_TOPICS.iter().all(|t| *t != MAIN_TOPIC));
    for replica in &cluster.replicas {
        replica.pubsub_link.heal();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_reproducible_and_covers_every_kind() {
        let gap = Duration::from_secs(10);
        let a = plan(42, &FaultKind::ALL, 18, gap);
        let b = plan(42, &FaultKind::ALL, 18, gap);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        for round in a.chunks(FaultKind::ALL.len()) {
            let kinds: HashSet<_> = round.iter().map(|p| p.kind).collect();
            assert_eq!(
                kinds.len(),
                FaultKind::ALL.len(),
                "each kind once per round"
            );
        }
        assert_ne!(
            format!("{a:?}"),
            format!("{:?}", plan(43, &FaultKind::ALL, 18, gap))
        );
        let partition = a.iter().find(|p| p.kind == FaultKind::Partition).unwrap();
        assert!(partition.hold_s >= 12);
    }
}
