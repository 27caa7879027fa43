//! Turning an outbox row into a Pub/Sub message, or saying why it never can be.
//!
//! Everything Pub/Sub would reject for good is checked here, before publishing,
//! so that one bad row goes to the dead-letter table with a readable reason
//! instead of failing a whole publish request.

use bytes::Bytes;
use google_cloud_pubsub::model::Message;
use std::collections::HashMap;
use uuid::Uuid;

use crate::ident::TopicName;
use crate::pubsub::MESSAGE_ID_ATTRIBUTE;
use crate::trace::{self, Carried};

/// Pub/Sub's limits (https://cloud.google.com/pubsub/quotas#resource_limits).
pub mod limits {
    /// A publish request, and so one message with its attributes, is at most 10 MB.
    pub const MAX_MESSAGE_BYTES: usize = 10_000_000;
    /// Room left in a request for framing and the topic name.
    pub const REQUEST_OVERHEAD_BYTES: usize = 4_096;
    pub const MAX_ATTRIBUTES: usize = 100;
    pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
    pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
    pub const MAX_ORDERING_KEY_BYTES: usize = 1024;
}

/// A claimed row, as read from the outbox table.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Primary key; claim and publish order.
    pub id: i64,
    /// Stable id, sent as the `message-id` attribute.
    pub message_id: Uuid,
    /// Message data; `None` until read for rows too large to claim inline.
    pub payload: Option<Bytes>,
    /// Pub/Sub ordering key; empty or NULL means none.
    pub ordering_key: Option<String>,
    /// Should be a JSON object of strings; anything else is dead-lettered.
    pub attributes: Option<serde_json::Value>,
    /// Routed topic (short id or full name); NULL means the relay's topic.
    pub topic: Option<String>,
    /// Seconds since the row was inserted, measured by the database at claim time.
    pub age_at_claim: f64,
}

/// A message ready to publish, and where to.
#[derive(Debug)]
pub struct Prepared {
    /// Destination topic.
    pub topic: TopicName,
    /// Whether the destination is the relay's own topic (a missing own topic
    /// is an outage, a missing routed topic is a bad row).
    pub own_topic: bool,
    /// The message.
    pub message: Message,
    /// Approximate size on the wire, for memory accounting.
    pub bytes: usize,
    /// The trace context the row carries (see [`crate::trace`]).
    pub trace: Option<Carried>,
}

/// Converts a row, or returns the reason it can never be published.
pub fn prepare(row: &OutboxRow, own_topic: &TopicName) -> Result<Prepared, String> {
    let payload = row.payload.clone().unwrap_or_default();
    let (topic, is_own) = match row.topic.as_deref() {
        None => (own_topic.clone(), true),
        Some(routed) => {
            let topic = own_topic
                .resolve(routed)
                .map_err(|e| format!("column topic: {e}"))?;
            let is_own = &topic == own_topic;
            (topic, is_own)
        }
    };

    let mut attributes = attributes(row.attributes.as_ref())?;
    // An application may use its own idempotency key, but an empty one
    // would silently stop deduplication downstream (the inbox falls back to
    // Pub/Sub's id, which changes with every publish).
    if attributes
        .get(MESSAGE_ID_ATTRIBUTE)
        .is_some_and(|id| id.trim().is_empty())
    {
        return Err(format!(
            "column attributes: {MESSAGE_ID_ATTRIBUTE:?} is empty; leave it out to use the row's message_id, or set a non-empty id"
        ));
    }
    attributes
        .entry(MESSAGE_ID_ATTRIBUTE.to_owned())
        .or_insert_with(|| row.message_id.to_string());
    if attributes.len() > limits::MAX_ATTRIBUTES {
        return Err(format!(
            "column attributes: {} attributes, Pub/Sub allows {} including {MESSAGE_ID_ATTRIBUTE:?}",
            attributes.len(),
            limits::MAX_ATTRIBUTES
        ));
    }
    // Google's client libraries read the context under their own names; a
    // row that leaves no room for them still carries the W3C ones.
    let trace = if attributes.len() + 2 <= limits::MAX_ATTRIBUTES {
        trace::add_google_names(&mut attributes)
    } else {
        Carried::from_attributes(|k| attributes.get(k).map(String::as_str))
    };

    let ordering_key = row.ordering_key.clone().unwrap_or_default();
    if ordering_key.len() > limits::MAX_ORDERING_KEY_BYTES {
        return Err(format!(
            "column ordering_key: {} bytes, Pub/Sub allows {}",
            ordering_key.len(),
            limits::MAX_ORDERING_KEY_BYTES
        ));
    }

    let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    let bytes = payload.len() + attribute_bytes + ordering_key.len();
    let limit = limits::MAX_MESSAGE_BYTES - limits::REQUEST_OVERHEAD_BYTES;
    if bytes > limit {
        return Err(format!(
            "message too large: {bytes} bytes (payload {} + attributes {attribute_bytes} + ordering key {}), Pub/Sub allows {limit}",
            payload.len(),
            ordering_key.len()
        ));
    }

    let message = Message::new()
        .set_data(payload)
        .set_attributes(attributes)
        .set_ordering_key(ordering_key);
    Ok(Prepared {
        topic,
        own_topic: is_own,
        message,
        bytes,
        trace,
    })
}

fn attributes(value: Option<&serde_json::Value>) -> Result<HashMap<String, String>, String> {
    let object = match value {
        None | Some(serde_json::Value::Null) => return Ok(HashMap::new()),
        Some(serde_json::Value::Object(object)) => object,
        Some(other) => {
            return Err(format!(
                "column attributes: expected a JSON object of strings, got {}",
                json_kind(other)
            ));
        }
    };
    let mut out = HashMap::with_capacity(object.len() + 1);
    for (key, value) in object {
        let serde_json::Value::String(value) = value else {
            return Err(format!(
                "column attributes: value of {key:?} must be a string, got {}",
                json_kind(value)
            ));
        };
        if key.is_empty() {
            return Err("column attributes: empty attribute name".to_owned());
        }
        if key.len() > limits::MAX_ATTRIBUTE_KEY_BYTES {
            return Err(format!(
                "column attributes: name {key:.40?}... is {} bytes, Pub/Sub allows {}",
                key.len(),
                limits::MAX_ATTRIBUTE_KEY_BYTES
            ));
        }
        if key.to_ascii_lowercase().starts_with("goog") {
            return Err(format!(
                "column attributes: name {key:?} is reserved (names may not start with \"goog\")"
            ));
        }
        if value.len() > limits::MAX_ATTRIBUTE_VALUE_BYTES {
            return Err(format!(
                "column attributes: value of {key:?} is {} bytes, Pub/Sub allows {}",
                value.len(),
                limits::MAX_ATTRIBUTE_VALUE_BYTES
            ));
        }
        out.insert(key.clone(), value.clone());
    }
    Ok(out)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topic() -> TopicName {
        "projects/demo/topics/events".parse().unwrap()
    }

    fn row(payload: &[u8], attributes: Option<serde_json::Value>) -> OutboxRow {
        OutboxRow {
            id: 1,
            message_id: Uuid::nil(),
            payload: Some(Bytes::copy_from_slice(payload)),
            ordering_key: Some("k".into()),
            attributes,
            topic: None,
            age_at_claim: 0.0,
        }
    }

    #[test]
    fn plain_row() {
        let p = prepare(&row(b"hi", Some(json!({"a": "b"}))), &topic()).unwrap();
        assert!(p.own_topic);
        assert_eq!(p.message.data.as_ref(), b"hi");
        assert_eq!(p.message.ordering_key, "k");
        assert_eq!(p.message.attributes["a"], "b");
        assert_eq!(
            p.message.attributes[MESSAGE_ID_ATTRIBUTE],
            Uuid::nil().to_string()
        );
    }

    #[test]
    fn caller_may_set_its_own_message_id_but_not_an_empty_one() {
        let p = prepare(&row(b"", Some(json!({"message-id": "order-7"}))), &topic()).unwrap();
        assert_eq!(p.message.attributes[MESSAGE_ID_ATTRIBUTE], "order-7");
        for empty in ["", "  "] {
            let err = prepare(&row(b"", Some(json!({"message-id": empty}))), &topic()).unwrap_err();
            assert!(err.contains("\"message-id\" is empty"), "{err}");
        }
    }

    #[test]
    fn a_trace_context_is_also_sent_under_googles_names_when_there_is_room() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let p = prepare(
            &row(
                b"x",
                Some(json!({"traceparent": parent, "tracestate": "a=1"})),
            ),
            &topic(),
        )
        .unwrap();
        assert_eq!(p.message.attributes["googclient_traceparent"], parent);
        assert_eq!(p.message.attributes["googclient_tracestate"], "a=1");
        assert_eq!(p.trace.unwrap().traceparent, parent);
        assert!(
            p.bytes > 2 * parent.len(),
            "the copies count toward the size"
        );

        // 98 attributes + message-id + traceparent: no room for the copies,
        // and the row is still published.
        let mut full: serde_json::Map<String, serde_json::Value> =
            (0..98).map(|i| (format!("a{i}"), json!("v"))).collect();
        full.insert("traceparent".into(), json!(parent));
        let p = prepare(&row(b"x", Some(full.into())), &topic()).unwrap();
        assert_eq!(p.message.attributes.len(), limits::MAX_ATTRIBUTES);
        assert!(!p.message.attributes.contains_key("googclient_traceparent"));
        assert!(p.trace.is_some());

        let plain = prepare(&row(b"x", None), &topic()).unwrap();
        assert!(plain.trace.is_none());
        assert!(
            !plain
                .message
                .attributes
                .contains_key("googclient_traceparent")
        );
    }

    #[test]
    fn routing() {
        let mut r = row(b"x", None);
        r.topic = Some("audit".into());
        let p = prepare(&r, &topic()).unwrap();
        assert_eq!(p.topic.to_string(), "projects/demo/topics/audit");
        assert!(!p.own_topic);
        r.topic = Some("projects/demo/topics/events".into());
        assert!(prepare(&r, &topic()).unwrap().own_topic);
        r.topic = Some("no spaces".into());
        assert!(prepare(&r, &topic()).unwrap_err().contains("column topic"));
    }

    #[test]
    fn bad_attributes_say_what_is_wrong() {
        let cases = [
            (json!(["a"]), "got an array"),
            (
                json!({"n": 1}),
                "value of \"n\" must be a string, got a number",
            ),
            (json!({"": "x"}), "empty attribute name"),
            (json!({"googx": "x"}), "reserved"),
            (json!({"k": "v".repeat(1025)}), "1025 bytes"),
        ];
        for (attrs, expected) in cases {
            let err = prepare(&row(b"", Some(attrs)), &topic()).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let many: serde_json::Map<_, _> = (0..100).map(|i| (format!("a{i}"), json!("v"))).collect();
        let err = prepare(&row(b"", Some(many.into())), &topic()).unwrap_err();
        assert!(err.contains("101 attributes"), "{err}");
    }

    #[test]
    fn size_limit() {
        let big = vec![0u8; limits::MAX_MESSAGE_BYTES];
        let err = prepare(&row(&big, None), &topic()).unwrap_err();
        assert!(err.starts_with("message too large"), "{err}");
        let ok = vec![0u8; 9_000_000];
        assert!(prepare(&row(&ok, None), &topic()).is_ok());
    }
}
