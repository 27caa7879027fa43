//! Test 1: mixed rows arrive exactly as written, each once, with `message-id`.

use crate::harness::*;
use serde_json::json;
use std::collections::HashMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_rows_arrive_exactly_as_written() {
    let env = TestEnv::new("delivery").await;
    let mut rows = Vec::new();
    for i in 0..10_000usize {
        let payload = match i % 5 {
            0 => Vec::new(),
            1 => (0..=255u8).cycle().skip(i % 256).take(300).collect(), // binary, NULs included
            2 => format!("ünïcödé ✓ 日本語 🚀 #{i}").into_bytes(),
            3 if i % 1000 == 3 => vec![(i % 251) as u8; 1024 * 1024], // 1 MiB
            _ => format!("{{\"order\":{i}}}").into_bytes(),
        };
        let attributes = match i % 3 {
            0 => None,
            1 => Some(json!({"type": "order.created", "n": i.to_string(), "ünï": "✓"})),
            _ => Some(json!({})),
        };
        rows.push(NewRow {
            payload,
            ordering_key: (i % 4 != 0).then(|| format!("customer-{}", i % 37)),
            attributes,
            topic: None,
        });
    }
    let ids = insert(&env.pool, &rows).await;
    let expected: HashMap<String, &NewRow> = ids
        .iter()
        .map(|id| id.to_string())
        .zip(rows.iter())
        .collect();

    let relay = env.spawn_relay(&[]);
    let received = env
        .collector
        .wait_distinct(rows.len(), WAIT)
        .await
        .expect("all arrive");
    env.wait_drained().await;

    assert_eq!(received.len(), rows.len(), "no duplicates without a crash");
    for m in &received {
        let row = expected
            .get(&m.message_id)
            .unwrap_or_else(|| panic!("unexpected message-id {:?}", m.message_id));
        assert_eq!(m.data, row.payload, "payload of {}", m.message_id);
        assert_eq!(m.ordering_key, row.ordering_key.clone().unwrap_or_default());
        let mut attrs = m.attributes.clone();
        assert_eq!(
            attrs.remove("message-id").as_deref(),
            Some(m.message_id.as_str())
        );
        let want: HashMap<String, String> = row
            .attributes
            .as_ref()
            .and_then(|a| a.as_object())
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(attrs, want, "attributes of {}", m.message_id);
    }
    drop(relay);
}
