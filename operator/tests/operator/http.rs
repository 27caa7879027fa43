//! The operator's own probes and metrics endpoint.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use outbox_operator::http::{Probes, router};
use outbox_operator::metrics::Metrics;
use tower::ServiceExt;

async fn get(probes: &Probes, path: &str) -> (StatusCode, String) {
    let req = Request::get(path).body(Body::empty()).expect("request");
    let resp = router(probes.clone()).oneshot(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn probes_and_metrics() {
    let metrics = Arc::new(Metrics::new());
    let probes = Probes {
        ready: Arc::default(),
        metrics: metrics.clone(),
    };
    assert_eq!(get(&probes, "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        get(&probes, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    probes.ready.store(true, Ordering::Relaxed);
    assert_eq!(get(&probes, "/readyz").await.0, StatusCode::OK);

    metrics.observe("ok", Duration::from_millis(20));
    metrics.error("api");
    let (status, body) = get(&probes, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        "outbox_operator_reconciliations_total{outcome=\"ok\"} 1",
        "outbox_operator_reconcile_errors_total{error=\"api\"} 1",
        "outbox_operator_reconcile_duration_seconds_count 1",
        "outbox_operator_leader 0",
    ] {
        assert!(body.contains(needle), "{needle} missing from\n{body}");
    }
}
