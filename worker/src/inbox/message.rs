//! Turning a received Pub/Sub message into an inbox row, or into a
//! dead-letter row with the reason it cannot be stored as is.
//!
//! PostgreSQL's `text` and `jsonb` reject the NUL character, which Pub/Sub
//! allows in attribute values and ordering keys. Such a message is checked
//! here, before the insert, so that it is recorded in the dead-letter table
//! instead of failing the whole batch.

use bytes::Bytes;
use google_cloud_pubsub::model::Message;
use std::collections::BTreeMap;

use crate::pubsub::MESSAGE_ID_ATTRIBUTE;
use crate::trace::Carried;

/// A message as the inbox stores it.
#[derive(Clone, Debug)]
pub struct InboxRow {
    /// The dedup key: the `message-id` attribute, or Pub/Sub's messageId.
    pub message_id: String,
    /// Pub/Sub's id of this delivery.
    pub pubsub_message_id: String,
    /// Message data, unchanged.
    pub payload: Bytes,
    /// Attributes as a JSON object (sorted keys).
    pub attributes: serde_json::Value,
    /// `None` when the message had no ordering key.
    pub ordering_key: Option<String>,
    /// Pub/Sub's publish time, as microseconds since the epoch.
    pub published_at_us: Option<i64>,
    /// The trace context the message carries, under the W3C names or
    /// Google's client libraries' (see [`crate::trace`]).
    pub trace: Option<Carried>,
}

/// A message that cannot be stored as is, in an escaped form that can.
#[derive(Clone, Debug)]
pub struct DeadRow {
    /// The dedup key, NUL escaped.
    pub message_id: String,
    /// Pub/Sub's id of this delivery, NUL escaped.
    pub pubsub_message_id: String,
    /// Message data, unchanged.
    pub payload: Bytes,
    /// The attributes as JSON text (JSON writes NUL as `\u0000`).
    pub attributes: String,
    /// NUL escaped.
    pub ordering_key: Option<String>,
    /// As in [`InboxRow`].
    pub published_at_us: Option<i64>,
    /// Why it could not be stored.
    pub error: String,
}

/// The dedup key of a message: its `message-id` attribute when present and
/// non-empty, otherwise Pub/Sub's messageId.
pub fn dedup_key(message: &Message) -> &str {
    message
        .attributes
        .get(MESSAGE_ID_ATTRIBUTE)
        .map(String::as_str)
        .filter(|id| !id.is_empty())
        .unwrap_or(&message.message_id)
}

fn published_at_us(message: &Message) -> Option<i64> {
    let t = message.publish_time.as_ref()?;
    let us = t
        .seconds()
        .checked_mul(1_000_000)?
        .checked_add(i64::from(t.nanos() / 1000))?;
    // 0 means "not set" for a protobuf Timestamp.
    (us != 0).then_some(us)
}

/// Writes NUL as `\u0000`; everything else is kept.
pub fn escape_nul(s: &str) -> String {
    s.replace('\0', "\\u0000")
}

/// What to do with a received message.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Insert it into the inbox table.
    Store(InboxRow),
    /// Record it in the dead-letter table, with the reason.
    Dead(DeadRow),
}

impl Prepared {
    /// The inbox row, unless dead-lettered.
    pub fn row(&self) -> Option<&InboxRow> {
        match self {
            Prepared::Store(row) => Some(row),
            Prepared::Dead(_) => None,
        }
    }

    /// The dead-letter row, if any.
    pub fn dead(&self) -> Option<&DeadRow> {
        match self {
            Prepared::Store(_) => None,
            Prepared::Dead(dead) => Some(dead),
        }
    }
}

/// Converts a message, or describes why it must be dead-lettered instead.
pub fn prepare(message: &Message) -> Prepared {
    let message_id = dedup_key(message);
    let mut problems = Vec::new();
    if message_id.contains('\0') {
        problems.push("the message id contains a NUL character".to_owned());
    }
    if message.message_id.contains('\0') {
        problems.push("Pub/Sub's messageId contains a NUL character".to_owned());
    }
    if message.ordering_key.contains('\0') {
        problems.push("the ordering key contains a NUL character".to_owned());
    }
    let mut keys: Vec<&String> = message
        .attributes
        .iter()
        .filter(|(k, v)| k.contains('\0') || v.contains('\0'))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    for key in keys {
        problems.push(format!(
            "attribute {:?} contains a NUL character",
            escape_nul(key)
        ));
    }
    let attributes: BTreeMap<&String, &String> = message.attributes.iter().collect();
    let ordering_key = (!message.ordering_key.is_empty()).then(|| message.ordering_key.clone());
    if problems.is_empty() {
        Prepared::Store(InboxRow {
            message_id: message_id.to_owned(),
            pubsub_message_id: message.message_id.clone(),
            payload: message.data.clone(),
            attributes: serde_json::to_value(&attributes).unwrap_or_default(),
            ordering_key,
            published_at_us: published_at_us(message),
            trace: Carried::from_attributes(|k| message.attributes.get(k).map(String::as_str)),
        })
    } else {
        Prepared::Dead(dead(
            message,
            format!(
                "cannot store in PostgreSQL text/jsonb: {}",
                problems.join("; ")
            ),
        ))
    }
}

/// The dead-letter form of any message, with `error`.
pub fn dead(message: &Message, error: String) -> DeadRow {
    let attributes: BTreeMap<&String, &String> = message.attributes.iter().collect();
    DeadRow {
        message_id: escape_nul(dedup_key(message)),
        pubsub_message_id: escape_nul(&message.message_id),
        payload: message.data.clone(),
        attributes: serde_json::to_string(&attributes).unwrap_or_else(|_| "{}".to_owned()),
        ordering_key: (!message.ordering_key.is_empty()).then(|| escape_nul(&message.ordering_key)),
        published_at_us: published_at_us(message),
        error,
    }
}

/// The dead-letter form of a prepared row that PostgreSQL refused anyway.
pub fn dead_from_row(row: &InboxRow, error: String) -> DeadRow {
    DeadRow {
        message_id: escape_nul(&row.message_id),
        pubsub_message_id: escape_nul(&row.pubsub_message_id),
        payload: row.payload.clone(),
        attributes: row.attributes.to_string(),
        ordering_key: row.ordering_key.as_deref().map(escape_nul),
        published_at_us: row.published_at_us,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(attrs: &[(&str, &str)], key: &str) -> Message {
        Message::new()
            .set_data(Bytes::from_static(b"\x00\xffdata"))
            .set_attributes(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .set_ordering_key(key)
            .set_message_id("123")
    }

    #[test]
    fn dedup_key_prefers_the_attribute() {
        assert_eq!(dedup_key(&message(&[("message-id", "abc")], "")), "abc");
        assert_eq!(dedup_key(&message(&[], "")), "123");
        assert_eq!(dedup_key(&message(&[("message-id", "")], "")), "123");
    }

    #[test]
    fn good_messages_are_kept_byte_for_byte() {
        let prepared = prepare(&message(&[("a", "1"), ("message-id", "m")], "k"));
        let row = prepared.row().unwrap();
        assert_eq!(row.message_id, "m");
        assert_eq!(&row.payload[..], b"\x00\xffdata");
        assert_eq!(row.ordering_key.as_deref(), Some("k"));
        assert_eq!(row.attributes["a"], "1");
        assert!(
            prepare(&message(&[], ""))
                .row()
                .unwrap()
                .ordering_key
                .is_none()
        );
    }

    #[test]
    fn nul_goes_to_the_dead_letter_form() {
        let prepared = prepare(&message(&[("bad", "x\0y")], "k\0"));
        let dead = prepared.dead().unwrap();
        assert!(dead.error.contains("attribute \"bad\""), "{}", dead.error);
        assert!(dead.error.contains("ordering key"), "{}", dead.error);
        assert!(!dead.attributes.contains('\0'));
        assert!(dead.attributes.contains("\\u0000"));
        assert_eq!(dead.ordering_key.as_deref(), Some("k\\u0000"));
    }
}
