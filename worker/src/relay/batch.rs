//! One claimed batch on its way through the pipeline: claimed rows, their
//! publish futures, and the transaction that holds the rows' locks until
//! Pub/Sub has answered for every one of them.

use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::publisher::PublishFuture;
use sqlx::{Postgres, Transaction};
use std::collections::BTreeSet;
use std::time::Instant;

use crate::ident::TopicName;

/// Where one row stands.
pub enum State {
    /// Handed to the publisher; Pub/Sub has not answered yet.
    Pending(PublishFuture),
    /// Acknowledged by Pub/Sub.
    Published,
    /// Can never be published; goes to the dead-letter table with this reason.
    Dead(String),
    /// Failed for now; the row stays in the outbox and is retried.
    Retry(String),
}

/// A row of the batch.
pub struct Entry {
    /// Outbox id.
    pub id: i64,
    /// Destination and ordering key, to resume a paused key after a failure.
    pub topic: Option<TopicName>,
    /// Whether the destination is the relay's own topic.
    pub own_topic: bool,
    /// Pub/Sub ordering key ("" for none).
    pub ordering_key: String,
    /// Seconds from insert to claim (measured by the database).
    pub age_at_claim: f64,
    /// Where the row stands.
    pub state: State,
}

/// A claimed batch; dropping it rolls the claim back and so releases the rows.
pub struct Batch {
    /// Holds the row locks; committed with the deletes.
    pub tx: Transaction<'static, Postgres>,
    /// Rows in id order.
    pub entries: Vec<Entry>,
    /// When the claim returned.
    pub claimed_at: Instant,
    /// The claim returned as many rows as asked for: more are likely waiting.
    pub full: bool,
    /// Payload bytes held by this batch (for the adaptive claim size).
    pub bytes: usize,
}

/// How a publish failure is handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never publishable: dead-letter.
    Permanent,
    /// Retry later; the row stays.
    Transient,
    /// The relay's own topic does not exist: an outage, not a bad row.
    OwnTopicMissing,
}

/// Classifies a publish error for a message sent to the relay's own topic
/// (`own_topic`) or to a routed topic.
pub fn classify(error: &PublishError, own_topic: bool) -> Verdict {
    use google_cloud_gax::error::rpc::Code;
    match error {
        PublishError::Rpc(e) => match e.status().map(|s| s.code) {
            Some(Code::NotFound) if own_topic => Verdict::OwnTopicMissing,
            Some(Code::NotFound) | Some(Code::InvalidArgument) => Verdict::Permanent,
            _ => Verdict::Transient,
        },
        // A paused ordering key, or a client that is shutting down: retry.
        _ => Verdict::Transient,
    }
}

/// A readable reason for the dead-letter table: destination, status code and
/// the service's message.
pub fn describe(error: &PublishError, topic: Option<&TopicName>) -> String {
    let topic = topic.map(|t| t.to_string()).unwrap_or_default();
    match error {
        PublishError::Rpc(e) => match e.status() {
            Some(status) => format!(
                "Pub/Sub rejected the message for {topic}: {:?}: {}",
                status.code, status.message
            ),
            None => format!("publishing to {topic} failed: {e}"),
        },
        other => format!("publishing to {topic} failed: {other}"),
    }
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
    pub async fn settle(&mut self) -> SettleSummary {
        let mut summary = SettleSummary::default();
        for entry in &mut self.entries {
            if let State::Pending(future) = &mut entry.state {
                entry.state = match future.await {
                    Ok(_server_id) => State::Published,
                    Err(error) => match classify(&error, entry.own_topic) {
                        Verdict::Permanent => State::Dead(describe(&error, entry.topic.as_ref())),
                        Verdict::Transient => State::Retry(error.to_string()),
                        Verdict::OwnTopicMissing => {
                            summary.own_topic_missing = true;
                            State::Retry(error.to_string())
                        }
                    },
                };
            }
        }
        summary
    }

    /// Marks every still-pending row for retry (used when Pub/Sub did not
    /// answer in time; the row stays in the outbox).
    pub fn abandon_pending(&mut self, reason: &str) {
        for entry in &mut self.entries {
            if matches!(entry.state, State::Pending(_)) {
                entry.state = State::Retry(reason.to_owned());
            }
        }
    }

    /// Ids to delete (published) and rows to dead-letter.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome::default();
        for entry in &self.entries {
            match &entry.state {
                State::Published => outcome.published.push(entry.id),
                State::Dead(reason) => outcome.dead.push((entry.id, reason.clone())),
                State::Retry(reason) => {
                    outcome.retry += 1;
                    outcome
                        .first_retry_reason
                        .get_or_insert_with(|| reason.clone());
                }
                State::Pending(_) => outcome.retry += 1,
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

/// What [`Batch::settle`] noticed beyond per-row results.
#[derive(Debug, Default)]
pub struct SettleSummary {
    /// Pub/Sub said the relay's own topic does not exist.
    pub own_topic_missing: bool,
}

/// The result of a batch, ready to be applied in its transaction.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Acknowledged rows: delete.
    pub published: Vec<i64>,
    /// Rows to move to the dead-letter table, with the reason.
    pub dead: Vec<(i64, String)>,
    /// Rows left in the outbox for a later attempt.
    pub retry: usize,
    /// Why the first of those failed, for the log.
    pub first_retry_reason: Option<String>,
    /// Ordering keys the publisher paused after a failure.
    pub paused_keys: PausedKeys,
}
