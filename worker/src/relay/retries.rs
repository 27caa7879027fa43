//! What the relay remembers between claims about rows that were not
//! published, and the decisions that follow from it:
//!
//! - a row a routed topic refuses (`PERMISSION_DENIED`, `NOT_FOUND`, ...) is
//!   tried at most `max_attempts` times, then dead-lettered with the reason;
//! - meanwhile its topic is set aside, with a growing delay, so that rows no
//!   topic will take cannot fill every claim and stop the other topics
//!   (leaving all of a topic's rows out keeps each key of that topic in
//!   order: Pub/Sub orders per topic and key);
//! - a row whose request Pub/Sub found invalid is published alone next time,
//!   to tell the invalid message from the innocent ones around it.
//!
//! Kept in memory for one term of leadership: a new leader starts afresh,
//! which at worst grants a row another `max_attempts`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::batch::Outcome;
use crate::pubsub::Verdict;

/// The relay's memory of failed rows.
#[derive(Debug)]
pub struct Retries {
    max_attempts: u32,
    retry_min: Duration,
    retry_max: Duration,
    /// Rows a routed topic refused: attempts so far and the last reason.
    refused: HashMap<i64, (u32, String)>,
    /// Routed topics (as written in the `topic` column) left out of claims.
    set_aside: HashMap<String, SetAside>,
    /// Rows to publish alone.
    alone: HashSet<i64>,
}

#[derive(Debug)]
struct SetAside {
    until: Instant,
    /// Refusals in a row, for the growing delay.
    refusals: u32,
}

impl Retries {
    /// `max_attempts` per refused row; topics are set aside between
    /// `retry_min` and `retry_max`, doubling.
    pub fn new(max_attempts: u32, retry_min: Duration, retry_max: Duration) -> Self {
        Retries {
            max_attempts: max_attempts.max(1),
            retry_min,
            retry_max,
            refused: HashMap::new(),
            set_aside: HashMap::new(),
            alone: HashSet::new(),
        }
    }

    /// Learns from a finished (committed) batch.
    pub fn learn(&mut self, outcome: &Outcome, now: Instant) {
        for id in outcome
            .published
            .iter()
            .chain(outcome.dead.iter().map(|d| &d.0))
        {
            self.refused.remove(id);
            self.alone.remove(id);
        }
        for topic in &outcome.accepted_topics {
            self.set_aside.remove(topic);
        }
        let mut refusing = HashSet::new();
        for failed in &outcome.failed {
            match failed.failure.verdict {
                Verdict::Refused => {
                    let entry = self.refused.entry(failed.id).or_insert((0, String::new()));
                    entry.0 += 1;
                    entry.1.clone_from(&failed.failure.reason);
                    if let Some(topic) = &failed.topic_column {
                        refusing.insert(topic.clone());
                    }
                }
                Verdict::Suspect => {
                    self.alone.insert(failed.id);
                }
                _ => {}
            }
        }
        for topic in refusing {
            let aside = self.set_aside.entry(topic).or_insert(SetAside {
                until: now,
                refusals: 0,
            });
            let factor = 2u32.saturating_pow(aside.refusals.min(20));
            let delay = self.retry_min.saturating_mul(factor).min(self.retry_max);
            aside.refusals += 1;
            aside.until = now + delay;
        }
    }

    /// The dead-letter reason of a row that has used up its attempts.
    pub fn exhausted(&self, id: i64) -> Option<String> {
        let (attempts, reason) = self.refused.get(&id)?;
        (*attempts >= self.max_attempts)
            .then(|| format!("gave up after {attempts} attempts: {reason}"))
    }

    /// Whether to publish this row in a request of its own.
    pub fn publish_alone(&self, id: i64) -> bool {
        self.alone.contains(&id)
    }

    /// The routed topics (as written in the `topic` column) to leave out of
    /// a claim now. A topic whose delay is over is tried again; it stays
    /// remembered until it accepts a row or its rows are given up.
    pub fn topics_set_aside(&self, now: Instant) -> Vec<String> {
        self.set_aside
            .iter()
            .filter(|(_, aside)| aside.until > now)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// When the next topic set aside is due again, if any.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.set_aside
            .values()
            .map(|a| a.until)
            .filter(|&u| u > now)
            .min()
    }

    /// Forgets everything (a new term of leadership).
    pub fn forget(&mut self) {
        self.refused.clear();
        self.set_aside.clear();
        self.alone.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::batch::{Failed, Failure};

    fn refused(id: i64, topic: &str) -> Failed {
        Failed {
            id,
            topic_column: Some(topic.to_owned()),
            failure: Failure {
                verdict: Verdict::Refused,
                reason: "PermissionDenied".to_owned(),
            },
        }
    }

    #[test]
    fn a_refused_row_is_given_up_after_max_attempts_and_its_topic_set_aside() {
        let mut retries = Retries::new(3, Duration::from_millis(100), Duration::from_secs(1));
        let now = Instant::now();
        for attempt in 1..=3 {
            assert!(retries.exhausted(7).is_none(), "attempt {attempt}");
            let outcome = Outcome {
                failed: vec![refused(7, "audit")],
                ..Outcome::default()
            };
            retries.learn(&outcome, now);
            assert_eq!(retries.topics_set_aside(now), vec!["audit".to_owned()]);
        }
        let reason = retries.exhausted(7).expect("given up");
        assert!(
            reason.starts_with("gave up after 3 attempts: PermissionDenied"),
            "{reason}"
        );
        // The delay doubled: 100 ms, 200 ms, 400 ms.
        assert!(
            retries
                .topics_set_aside(now + Duration::from_millis(350))
                .len()
                == 1
        );
        assert!(
            retries
                .topics_set_aside(now + Duration::from_millis(450))
                .is_empty()
        );
        // Dead-lettered: forgotten.
        let outcome = Outcome {
            dead: vec![(7, reason)],
            ..Outcome::default()
        };
        retries.learn(&outcome, now);
        assert!(retries.exhausted(7).is_none());
    }

    #[test]
    fn a_suspect_is_published_alone_until_it_is_settled() {
        let mut retries = Retries::new(3, Duration::from_millis(100), Duration::from_secs(1));
        let now = Instant::now();
        let outcome = Outcome {
            failed: vec![Failed {
                id: 3,
                topic_column: None,
                failure: Failure {
                    verdict: Verdict::Suspect,
                    reason: "InvalidArgument".to_owned(),
                },
            }],
            ..Outcome::default()
        };
        retries.learn(&outcome, now);
        assert!(retries.publish_alone(3) && !retries.publish_alone(4));
        assert!(
            retries.topics_set_aside(now).is_empty(),
            "no topic set aside"
        );
        retries.learn(
            &Outcome {
                published: vec![3],
                ..Outcome::default()
            },
            now,
        );
        assert!(!retries.publish_alone(3));
    }
}
