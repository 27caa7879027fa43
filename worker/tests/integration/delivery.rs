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

/// Claims start above the rows this relay already holds, which would skip a
/// row that commits late with a lower id (ids are taken at insert). Such a
/// row must still go out within about a second, not wait until the backlog
/// is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_below_claimed_rows_is_not_starved() {
    let env = TestEnv::new("late-commit").await;
    // Takes a low id and commits only once the relay is deep in the backlog.
    let mut late = env.pool.begin().await.expect("begin");
    let (late_id, late_message): (i64, uuid::Uuid) =
        sqlx::query_as("INSERT INTO outbox (payload) VALUES ('late') RETURNING id, message_id")
            .fetch_one(&mut *late)
            .await
            .expect("insert the late row");
    let total = 30_000usize;
    let ids = insert(&env.pool, &numbered(0, total, 0)).await;

    // Tiny claims: the backlog lasts several seconds.
    let relay = env.spawn_relay(&["--batch-size", "10"]);
    env.wait_pending_at_most(total as i64 - 2_000).await;
    late.commit().await.expect("commit the late row");
    let committed = std::time::Instant::now();

    let still_pending = devkit::wait_for("the late row to be published", WAIT, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = $1")
            .bind(late_id)
            .fetch_one(&env.pool)
            .await
            .ok()?;
        if left > 0 {
            return None;
        }
        Some(env.pending().await)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    println!(
        "late row published {:?} after its commit, {still_pending} rows of the backlog still pending",
        committed.elapsed()
    );
    assert!(
        still_pending > 0,
        "the late row went out only after the whole backlog: it waited for a short claim"
    );
    let mut all = ids;
    all.push(late_message);
    let received = env
        .collector
        .wait_distinct(total + 1, WAIT)
        .await
        .expect("all arrive");
    assert_eq!(assert_all_arrived(&all, &received), 0, "no duplicates");
    drop(relay);
}
