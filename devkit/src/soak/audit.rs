//! The checks at the end of a soak: every committed row published and
//! stored exactly once, in per-key order, at every subscriber; duplicates
//! within the bound of the fault that caused them; dead letters exactly the
//! poison rows.

use serde::Serialize;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::cluster::{IN_FLIGHT_BOUND, MAIN_TOPIC};
use super::faults::{FaultRecord, Losses};
use crate::Received;

/// What one subscriber (or the processors) got.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Delivery {
    pub subscriber: String,
    /// Rows it should have got (committed, not poison, not lost by an
    /// emulator restart).
    pub expected: usize,
    /// Distinct rows it got.
    pub delivered: usize,
    /// Expected and never got.
    pub lost: usize,
    /// Rows an emulator restart lost (accounted for separately).
    pub lost_to_restarts: usize,
    /// Got although not expected (or counted as lost).
    pub unexpected: usize,
    /// A row of a key that came before an earlier row of the key.
    pub reordered: usize,
    /// Rows published more than once (a new Pub/Sub message id), at a
    /// subscriber; rows stored or processed more than once, in the tables.
    pub duplicated: usize,
    /// Deliveries of the same publication again (Pub/Sub's at-least-once).
    pub redelivered: usize,
    /// A few of the lost, for the log.
    pub lost_examples: Vec<String>,
}

/// Dead letters against poison rows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeadLetters {
    pub poison_committed: usize,
    pub dead_lettered: usize,
    /// Dead letters that were not poison.
    pub unexpected: Vec<String>,
    /// Poison rows not dead-lettered.
    pub missing: Vec<String>,
    /// Dead letters in the inbox's table (should be none).
    pub inbox_dead_letters: i64,
}

/// A committed row, as the producers recorded it.
struct Committed {
    route: String,
    poison: bool,
}

/// Everything the checks found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Findings {
    pub committed: usize,
    pub deliveries: Vec<Delivery>,
    pub dead_letters: DeadLetters,
    pub outbox_left: i64,
    /// Re-publications that arrived before the first fault (should be none).
    pub duplicates_without_fault: usize,
}

/// Checks the audit subscribers' records, the inbox and the processors'
/// table against what was committed; fills in each fault's duplicates.
pub async fn check(
    pool: &PgPool,
    audits: &[(String, Vec<Received>)],
    losses: &Losses,
    faults: &mut [FaultRecord],
    started: Instant,
) -> anyhow::Result<Findings> {
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT message_id::text, route, poison FROM soak_committed")
            .fetch_all(pool)
            .await?;
    let committed: HashMap<String, Committed> = rows
        .into_iter()
        .map(|(id, route, poison)| {
            let route = if route == "main" {
                MAIN_TOPIC.to_owned()
            } else {
                route
            };
            (
                id,
                Committed {
                    route,
                    poison: poison.is_some(),
                },
            )
        })
        .collect();
    let expected_on = |topic: &str, lost: Option<&HashSet<String>>| -> HashSet<String> {
        committed
            .iter()
            .filter(|(id, c)| {
                c.route == topic && !c.poison && lost.is_none_or(|l| !l.contains(*id))
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    let mut findings = Findings {
        committed: committed.len(),
        ..Findings::default()
    };

    for (topic, received) in audits {
        let lost = losses.audit.get(topic);
        let expected = expected_on(topic, lost);
        let mut delivery = Delivery {
            subscriber: format!("audit {topic}"),
            lost_to_restarts: lost.map_or(0, HashSet::len),
            ..Delivery::default()
        };
        let mut publications: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut last: HashMap<&str, i64> = HashMap::new();
        for message in received {
            let seen = publications.entry(message.message_id.as_str()).or_default();
            if seen.contains(&message.pubsub_id.as_str()) {
                delivery.redelivered += 1;
                continue;
            }
            seen.push(message.pubsub_id.as_str());
            if seen.len() > 1 {
                delivery.duplicated += 1;
                let t = message.at.duration_since(started).as_secs_f64();
                match faults.iter_mut().rev().find(|f| f.started_s <= t) {
                    Some(fault) => fault.duplicates += 1,
                    None => findings.duplicates_without_fault += 1,
                }
                continue;
            }
            if !message.ordering_key.is_empty() {
                let seq = message
                    .attributes
                    .get("seq")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(-1);
                let previous = last.insert(message.ordering_key.as_str(), seq);
                if previous.is_some_and(|p| p > seq) {
                    delivery.reordered += 1;
                    last.insert(message.ordering_key.as_str(), previous.unwrap_or(seq));
                }
            }
        }
        let got: HashSet<String> = publications.keys().map(|id| (*id).to_owned()).collect();
        tally(&mut delivery, &expected, &got);
        findings.deliveries.push(delivery);
    }

    // The inbox: each row once (its unique key), in receive order per key.
    let inbox: Vec<(String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT message_id, ordering_key, (attributes->>'seq')::bigint FROM inbox ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    let expected = expected_on(MAIN_TOPIC, Some(&losses.inbox));
    findings.deliveries.push(table_delivery(
        "inbox",
        &inbox,
        &expected,
        losses.inbox.len(),
    ));

    // The processors: every stored row processed once, in order per key.
    let processed: Vec<(String, Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT message_id, ordering_key, seq FROM soak_processed ORDER BY pos")
            .fetch_all(pool)
            .await?;
    let stored: HashSet<String> = inbox.iter().map(|r| r.0.clone()).collect();
    findings
        .deliveries
        .push(table_delivery("processed", &processed, &stored, 0));

    let dead: HashSet<String> =
        sqlx::query_scalar("SELECT message_id::text FROM outbox_dead_letter")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let poison: HashSet<&String> = committed
        .iter()
        .filter(|(_, c)| c.poison)
        .map(|(id, _)| id)
        .collect();
    findings.dead_letters = DeadLetters {
        poison_committed: poison.len(),
        dead_lettered: dead.len(),
        unexpected: dead
            .iter()
            .filter(|id| !poison.contains(id))
            .take(10)
            .cloned()
            .collect(),
        missing: poison
            .iter()
            .filter(|id| !dead.contains(**id))
            .take(10)
            .map(|id| (*id).clone())
            .collect(),
        inbox_dead_letters: sqlx::query_scalar("SELECT count(*) FROM inbox_dead_letter")
            .fetch_one(pool)
            .await?,
    };
    findings.outbox_left = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?;
    Ok(findings)
}

/// A table of (message id, key, seq) in order: once each, in order per key.
fn table_delivery(
    name: &str,
    rows: &[(String, Option<String>, Option<i64>)],
    expected: &HashSet<String>,
    lost_to_restarts: usize,
) -> Delivery {
    let mut delivery = Delivery {
        subscriber: name.to_owned(),
        lost_to_restarts,
        ..Delivery::default()
    };
    let mut got = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (id, key, seq) in rows {
        if !got.insert(id.clone()) {
            delivery.duplicated += 1;
            continue;
        }
        if let Some(key) = key {
            let seq = seq.unwrap_or(-1);
            let previous = last.insert(key.as_str(), seq);
            if previous.is_some_and(|p| p > seq) {
                delivery.reordered += 1;
                last.insert(key.as_str(), previous.unwrap_or(seq));
            }
        }
    }
    tally(&mut delivery, expected, &got);
    delivery
}

fn tally(delivery: &mut Delivery, expected: &HashSet<String>, got: &HashSet<String>) {
    delivery.expected = expected.len();
    delivery.delivered = got.len();
    let lost: Vec<&String> = expected.iter().filter(|id| !got.contains(*id)).collect();
    delivery.lost = lost.len();
    delivery.lost_examples = lost.iter().take(5).map(|id| (*id).clone()).collect();
    delivery.unexpected = got.iter().filter(|id| !expected.contains(*id)).count();
}

/// Whether a fault's duplicates are within the bound of what one relay can
/// have in flight.
pub fn duplicates_within_bound(fault: &FaultRecord) -> bool {
    fault.duplicates <= IN_FLIGHT_BOUND
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_checked_for_order_duplicates_and_losses() {
        let row = |id: &str, key: &str, seq: i64| (id.to_owned(), Some(key.to_owned()), Some(seq));
        let rows = vec![
            row("a", "k", 1),
            row("c", "k", 3),
            row("b", "k", 2),
            row("c", "k", 3),
        ];
        let expected: HashSet<String> =
            ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let d = table_delivery("t", &rows, &expected, 0);
        assert_eq!(
            (d.delivered, d.lost, d.reordered, d.duplicated, d.unexpected),
            (3, 1, 1, 1, 0)
        );
        assert_eq!(d.lost_examples, vec!["d".to_owned()]);
    }
}
