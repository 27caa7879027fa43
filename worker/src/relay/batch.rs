//! One claimed batch on its way through the pipeline: the claimed rows,
//! their publish futures, and the transaction that holds the rows' locks
//! until Pub/Sub has answered for every one of them (or the batch's
//! deadline passed).

use google_cloud_pubsub::publisher::PublishFuture;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeSet;
use std::time::Instant;

use crate::health::Health;
use crate::ident::TopicName;
use crate::pubsub::{Verdict, classify, describe};
use crate::trace::PublishSpan;

/// Where one row stands.
pub enum State {
    /// Handed to the publisher; Pub/Sub has not answered yet.
    Pending(PublishFuture),
    /// Acknowledged by Pub/Sub.
    Published,
    /// Can never be published; goes to the dead-letter table with this reason.
    Dead(String),
    /// Not published this time; the row stays in the outbox.
    Retry(Failure),
}

/// Why a row was not published, and what that means (see [`Verdict`]).
#[derive(Clone, Debug)]
pub struct Failure {
    pub verdict: Verdict,
    pub reason: String,
}

/// A row of the batch.
pub struct Entry {
    /// Outbox id.
    pub id: i64,
    /// Destination, to resume a paused key after a failure.
    pub topic: Option<TopicName>,
    /// The row's `topic` column as written, to set a refusing topic aside.
    pub topic_column: Option<String>,
    /// Whether the destination is the relay's own topic.
    pub own_topic: bool,
    /// Pub/Sub ordering key ("" for none).
    pub ordering_key: String,
    /// Published in a request of its own (to find out whether it is the
    /// message Pub/Sub finds invalid).
    pub alone: bool,
    /// Seconds from insert to claim (measured by the database).
    pub age_at_claim: f64,
    /// Where the row stands.
    pub state: State,
}

/// A claimed batch; dropping it rolls the claim back and so releases the rows.
pub struct Batch {
    /// Holds the row locks; committed with the deletes.
    pub tx: Transaction<'static, Postgres>,
    /// Rows grouped by topic and ordering key, in id order within each.
    pub entries: Vec<Entry>,
    /// When the claim's last statement ran: the transaction is idle from
    /// here until the commit, and the batch's deadline counts from here.
    pub claimed_at: Instant,
    /// The claim returned as many rows as asked for: more are likely waiting.
    pub full: bool,
    /// The claim stopped publishing before its last row (Pub/Sub did not
    /// answer in time); its unsent rows stay locked until it is finished.
    pub stopped_short: bool,
    /// Payload bytes held by this batch (for the adaptive claim size).
    pub bytes: usize,
    /// The batch's `publish` span, when traced; ends with the batch.
    pub span: Option<PublishSpan>,
}

/// (topic, ordering key) pairs the publisher may hold paused after a failure,
/// to resume before their rows are claimed again.
pub type PausedKeys = BTreeSet<(TopicName, String)>;

impl Batch {
    /// The ordering keys of this batch: the keys the client may have paused,
    /// to resume when the batch is given up.
    pub fn keys(&self) -> PausedKeys {
        self.entries
            .iter()
            .filter(|e| !e.ordering_key.is_empty())
            .filter_map(|e| Some((e.topic.clone()?, e.ordering_key.clone())))
            .collect()
    }

    /// Waits for every pending publish of this batch and records the answers.
    /// Every acknowledgement is progress, and is reported to `health` as
    /// such. Cancel safe: dropping it leaves the unanswered rows pending.
    pub async fn settle(&mut self, health: &Health) {
        for entry in &mut self.entries {
            if let State::Pending(future) = &mut entry.state {
                entry.state = match future.await {
                    Ok(_server_id) => {
                        health.heartbeat();
                        State::Published
                    }
                    Err(error) => {
                        let verdict = classify(&error, entry.own_topic, entry.alone);
                        let topic = entry.topic.as_ref();
                        let reason = topic
                            .map(|t| describe(&error, t))
                            .unwrap_or_else(|| error.to_string());
                        match verdict {
                            Verdict::Invalid => State::Dead(reason),
                            verdict => State::Retry(Failure { verdict, reason }),
                        }
                    }
                };
            }
        }
    }

    /// Marks every still-pending row as timed out (Pub/Sub did not answer
    /// in time; the row stays in the outbox).
    pub fn abandon_pending(&mut self) {
        for entry in &mut self.entries {
            if matches!(entry.state, State::Pending(_)) {
                entry.state = State::Retry(Failure {
                    verdict: Verdict::Timeout,
                    reason: "no answer from Pub/Sub within the publish timeout".to_owned(),
                });
            }
        }
    }

    /// Ids to delete (published), rows to dead-letter, and what failed.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome {
            stopped_short: self.stopped_short,
            ..Outcome::default()
        };
        for entry in &self.entries {
            match &entry.state {
                State::Published => {
                    outcome.published.push(entry.id);
                    if let Some(topic) = &entry.topic_column {
                        outcome.accepted_topics.insert(topic.clone());
                    }
                }
                State::Dead(reason) => outcome.dead.push((entry.id, reason.clone())),
                State::Retry(failure) => outcome.failed.push(Failed {
                    id: entry.id,
                    topic_column: entry.topic_column.clone(),
                    failure: failure.clone(),
                }),
                State::Pending(_) => outcome.failed.push(Failed {
                    id: entry.id,
                    topic_column: entry.topic_column.clone(),
                    failure: Failure {
                        verdict: Verdict::Timeout,
                        reason: "not settled".to_owned(),
                    },
                }),
            }
            // Any failure pauses the key in the client; remember to resume it.
            let failed = matches!(entry.state, State::Dead(_) | State::Retry(_));
            if let (true, Some(topic)) = (failed && !entry.ordering_key.is_empty(), &entry.topic) {
                outcome
                    .paused_keys
                    .insert((topic.clone(), entry.ordering_key.clone()));
            }
        }
        outcome
    }
}

/// A row that was not published this time.
#[derive(Clone, Debug)]
pub struct Failed {
    pub id: i64,
    /// The row's `topic` column.
    pub topic_column: Option<String>,
    pub failure: Failure,
}

/// The result of a batch, ready to be applied in its transaction.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Acknowledged rows: delete.
    pub published: Vec<i64>,
    /// Rows to move to the dead-letter table, with the reason.
    pub dead: Vec<(i64, String)>,
    /// Rows left in the outbox for a later attempt, with why.
    pub failed: Vec<Failed>,
    /// Ordering keys the publisher paused after a failure.
    pub paused_keys: PausedKeys,
    /// Routed topics (as written in the `topic` column) that accepted a row.
    pub accepted_topics: BTreeSet<String>,
    /// The claim stopped publishing before its last row.
    pub stopped_short: bool,
}

impl Outcome {
    /// Whether any row failed with `verdict`.
    pub fn any(&self, verdict: Verdict) -> bool {
        self.failed.iter().any(|f| f.failure.verdict == verdict)
    }

    /// Why the first failed row failed, for the log.
    pub fn first_reason(&self) -> Option<&str> {
        self.failed.first().map(|f| f.failure.reason.as_str())
    }
}
