//! Inbox test 1: 10,000 messages published through the relay arrive in the
//! inbox exactly once, matching byte for byte.

use std::collections::HashMap;

use sqlx::Row;

use crate::harness::*;
use crate::inbox_support::*;

/// Deterministic pseudo-random bytes (all 256 values, not UTF-8).
fn bytes(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_stores_10000_relayed_messages_exactly_once_byte_for_byte() {
    let ib = InboxEnv::new("inbox_delivery").await;
    let rows: Vec<NewRow> = (0..10_000)
        .map(|i| NewRow {
            payload: bytes(i, 1 + (i * 37) % 2000),
            ordering_key: (i % 3 != 0).then(|| format!("key-{}", i % 17)),
            attributes: (i % 2 == 0)
                .then(|| serde_json::json!({"n": i.to_string(), "kind": "ünïcode ✓"})),
            topic: None,
        })
        .collect();
    let ids = insert(&ib.env.pool, &rows).await;
    let relay = ib.env.spawn_relay(&[]);
    let inbox = ib.spawn_inbox(&[]);
    ib.wait_stored(ids.len() as i64).await;
    ib.env.wait_drained().await;

    let stored = sqlx::query(
        "SELECT message_id, payload, attributes, ordering_key, published_at IS NOT NULL AS has_time, \
                subscription FROM inbox",
    )
    .fetch_all(&ib.env.pool)
    .await
    .expect("read inbox");
    assert_eq!(stored.len(), ids.len(), "exactly one row per message");
    let by_id: HashMap<String, &NewRow> = ids
        .iter()
        .map(|id| id.to_string())
        .zip(rows.iter())
        .collect();
    for row in &stored {
        let message_id: String = row.get("message_id");
        let expected = by_id
            .get(&message_id)
            .unwrap_or_else(|| panic!("unexpected message {message_id}"));
        let payload: Vec<u8> = row.get("payload");
        assert_eq!(payload, expected.payload, "payload of {message_id}");
        let key: Option<String> = row.get("ordering_key");
        assert_eq!(key, expected.ordering_key, "ordering key of {message_id}");
        let attributes: serde_json::Value = row.get("attributes");
        let mut want = expected
            .attributes
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        want["message-id"] = serde_json::Value::String(message_id.clone());
        assert_eq!(attributes, want, "attributes of {message_id}");
        assert!(row.get::<bool, _>("has_time"), "publish time recorded");
        assert_eq!(row.get::<String, _>("subscription"), ib.subscription);
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_dead_letter")
        .fetch_one(&ib.env.pool)
        .await
        .expect("count");
    assert_eq!(dead, 0);
    let stored_metric = devkit::wait_for("the stored counter", WAIT, || async {
        inbox
            .metric("inbox_messages_stored_total")
            .await
            .filter(|n| *n >= ids.len() as f64)
    })
    .await
    .expect("metric");
    assert_eq!(stored_metric, ids.len() as f64);
    drop(relay);
}
