//! The Kubernetes Lease backend against a stand-in API server (no API server
//! runs on the test machines). The stand-in keeps Lease objects, bumps
//! `resourceVersion` on every write and answers 409 Conflict to a write that
//! carries a stale one, like the real API server; each client can be cut off.
//! Also the metadata the holder writes: its status report, the owner
//! reference, and everyone else's labels, annotations and owners left alone.

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use outbox_worker::leader::kubernetes::LeaseElector;
use outbox_worker::leader::{Leadership, Timings};
use outbox_worker::metrics::RelayMetrics;
use outbox_worker::probe::Figures;
use outbox_worker::report;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const NS: &str = "relays";
const NAME: &str = "orders-relay";

#[derive(Default)]
struct Store {
    leases: HashMap<String, Value>,
    version: u64,
}

/// The stand-in: shared state, one client per candidate.
#[derive(Clone, Default)]
struct FakeApiServer {
    store: Arc<Mutex<Store>>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code.as_u16(),
               "reason": reason, "message": message}),
    )
}

impl FakeApiServer {
    fn handle(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let prefix = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases");
        let Some(rest) = path.strip_prefix(&prefix) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "unknown path");
        };
        let name = rest.trim_start_matches('/');
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        match (method.clone(), name.is_empty()) {
            (Method::GET, false) => match store.leases.get(name) {
                Some(lease) => (StatusCode::OK, lease.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", "lease not found"),
            },
            (Method::POST, true) => {
                let mut lease: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let name = lease["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if store.leases.contains_key(&name) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        "lease already exists",
                    );
                }
                store.version += 1;
                lease["metadata"]["resourceVersion"] = json!(store.version.to_string());
                lease["metadata"]["namespace"] = json!(NS);
                store.leases.insert(name, lease.clone());
                (StatusCode::CREATED, lease)
            }
            (Method::PUT, false) => {
                let mut lease: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let Some(current) = store.leases.get(name) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", "lease not found");
                };
                let sent = lease["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if sent
                    != current["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version",
                    );
                }
                store.version += 1;
                lease["metadata"]["resourceVersion"] = json!(store.version.to_string());
                store.leases.insert(name.to_owned(), lease.clone());
                (StatusCode::OK, lease)
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "unsupported",
            ),
        }
    }

    /// A client whose requests fail with 503 while `cut` is set, and whose
    /// writes are answered `delay_ms` after they took effect (a slow or
    /// congested API server).
    fn client(&self, cut: Arc<AtomicBool>, delay_ms: Arc<AtomicU64>) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            let cut = cut.clone();
            let delay_ms = delay_ms.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let (code, value) = if cut.load(Ordering::SeqCst) {
                    status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "cut off",
                    )
                } else {
                    api.handle(&parts.method, parts.uri.path(), &bytes)
                };
                let delay = delay_ms.load(Ordering::SeqCst);
                if delay > 0 && parts.method == Method::PUT {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let mut response = Response::new(Full::new(bytes::Bytes::from(value.to_string())));
                *response.status_mut() = code;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok::<_, Infallible>(response)
            }
        });
        kube::Client::new(service, NS)
    }

    fn lease(&self) -> Option<Value> {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leases
            .get(NAME)
            .cloned()
    }

    /// Writes `edit` into the stored Lease as another client would (a new
    /// resourceVersion).
    fn edit(&self, edit: impl FnOnce(&mut Value)) {
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        store.version += 1;
        let version = store.version.to_string();
        let lease = store.leases.entry(NAME.to_owned()).or_insert_with(|| {
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": NAME, "namespace": NS}, "spec": {}})
        });
        edit(lease);
        lease["metadata"]["resourceVersion"] = json!(version);
    }

    /// Waits (5 s at most) until the stored Lease satisfies `check`.
    async fn wait_lease(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(lease) = self.lease().filter(|l| check(l)) {
                return lease;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the Lease: {:?}",
                self.lease()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the holder wrote the Lease `n` more times.
    async fn wait_writes(&self, n: u64) -> Value {
        let version = |l: &Value| {
            l["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let from = self.lease().map_or(0, |l| version(&l));
        self.wait_lease(&format!("{n} more writes"), |l| version(l) >= from + n)
            .await
    }

    fn holder(&self) -> String {
        self.lease()
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

fn timings() -> Timings {
    Timings {
        lease_duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
    }
}

struct Candidate {
    leadership: Leadership,
    release: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    cut: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

fn candidate(api: &FakeApiServer, identity: &str) -> Candidate {
    candidate_with(api, identity, |elector| elector)
}

/// A candidate whose elector `configure` adds to (an owner, a report).
fn candidate_with(
    api: &FakeApiServer,
    identity: &str,
    configure: impl FnOnce(LeaseElector) -> LeaseElector,
) -> Candidate {
    let cut = Arc::new(AtomicBool::new(false));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let leases: Api<Lease> = Api::namespaced(api.client(cut.clone(), delay_ms.clone()), NS);
    let release = CancellationToken::new();
    let elector = configure(LeaseElector::new(
        leases,
        NAME.to_owned(),
        identity.to_owned(),
        timings(),
    ));
    let (leadership, task) = elector.spawn(release.clone());
    Candidate {
        leadership,
        release,
        task,
        cut,
        delay_ms,
    }
}

async fn until(what: &str, mut leadership: Leadership, leading: bool) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        leadership.wait_for(|l| l.is_some() == leading),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    .unwrap_or_else(|_| panic!("elector stopped while waiting for {what}"));
    started.elapsed()
}

#[tokio::test]
async fn acquires_a_missing_lease_and_renews_it() {
    let api = FakeApiServer::default();
    let a = candidate(&api, "pod-a");
    until("acquire", a.leadership.clone(), true).await;
    let lease = api.lease().expect("lease created");
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(lease["spec"]["leaseTransitions"], 0);
    let first_renew = lease["spec"]["renewTime"].clone();
    let version = lease["metadata"]["resourceVersion"].clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while api.lease().map(|l| l["spec"]["renewTime"].clone()) == Some(first_renew.clone()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("renewed");
    let lease = api.lease().expect("lease");
    assert_ne!(lease["metadata"]["resourceVersion"], version);
    assert!(
        a.leadership.borrow().is_some(),
        "still leading after renewals"
    );
}

#[tokio::test]
async fn a_standby_takes_over_an_expired_lease() {
    let api = FakeApiServer::default();
    let a = candidate(&api, "pod-a");
    until("a leads", a.leadership.clone(), true).await;
    let b = candidate(&api, "pod-b");
    // A dies without releasing (its task stops renewing).
    a.task.abort();
    let waited = until("b takes over", b.leadership.clone(), true).await;
    assert!(
        waited >= timings().lease_duration - Duration::from_millis(200),
        "took over after {waited:?}, before the lease could expire"
    );
    assert_eq!(api.holder(), "pod-b");
    assert_eq!(api.lease().expect("lease")["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_before_anyone_takes_over() {
    let api = FakeApiServer::default();
    let a = candidate(&api, "pod-a");
    until("a leads", a.leadership.clone(), true).await;
    let b = candidate(&api, "pod-b");
    a.cut.store(true, Ordering::SeqCst);
    let cut = Instant::now();
    until("a steps down", a.leadership.clone(), false).await;
    let stepped_down = cut.elapsed();
    until("b takes over", b.leadership.clone(), true).await;
    let taken_over = cut.elapsed();
    println!("lease: A stepped down {stepped_down:?} after the cut, B leads after {taken_over:?}");
    assert!(
        stepped_down < taken_over,
        "two leaders: A {stepped_down:?}, B {taken_over:?}"
    );
    // When A reaches the API again it finds B's lease and stays a standby.
    a.cut.store(false, Ordering::SeqCst);
    tokio::time::sleep(timings().lease_duration).await;
    assert!(
        !a.leadership.borrow().is_some(),
        "A came back as a second leader"
    );
    assert_eq!(api.holder(), "pod-b");
}

#[tokio::test]
async fn release_on_shutdown_hands_over_without_waiting_for_expiry() {
    let api = FakeApiServer::default();
    let a = candidate(&api, "pod-a");
    until("a leads", a.leadership.clone(), true).await;
    let b = candidate(&api, "pod-b");
    let released = Instant::now();
    a.release.cancel();
    a.task.await.expect("elector ends");
    assert_eq!(api.holder(), "", "the holder is cleared on release");
    until("b takes over", b.leadership.clone(), true).await;
    let handover = released.elapsed();
    println!("lease: handover after release took {handover:?}");
    assert!(
        handover < timings().lease_duration,
        "B waited for expiry: {handover:?}"
    );
}

#[tokio::test]
async fn candidates_racing_for_one_lease_never_both_lead() {
    let api = FakeApiServer::default();
    let candidates: Vec<_> = (0..5)
        .map(|i| candidate(&api, &format!("pod-{i}")))
        .collect();
    let started = Instant::now();
    let mut saw_leader = false;
    while started.elapsed() < Duration::from_secs(3) {
        let leading = candidates
            .iter()
            .filter(|c| c.leadership.borrow().is_some())
            .count();
        assert!(leading <= 1, "{leading} leaders at once");
        saw_leader |= leading == 1;
        // Kill the current leader once to force another race.
        let first_race_over = leading == 1
            && started.elapsed() > Duration::from_secs(1)
            && !candidates.iter().any(|c| c.task.is_finished());
        if let (true, Some(c)) = (
            first_race_over,
            candidates.iter().find(|c| c.leadership.borrow().is_some()),
        ) {
            c.release.cancel();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_leader, "nobody acquired the lease");
    let holder = api.holder();
    assert!(holder.starts_with("pod-"), "holder {holder:?}");
}

/// The instant `leadership` next becomes `leading`.
fn when(mut leadership: Leadership, leading: bool) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        let _ = leadership.wait_for(|l| l.is_some() == leading).await;
        Instant::now()
    })
}

/// The API server applies the leader's renewals at once but answers them
/// 800 ms later; after one such renewal the leader is cut off. A standby may take over one
/// lease duration (1.5 s) after the renewal took effect; the leader must
/// stop leading one renew deadline (1 s) after it *sent* that renewal, not
/// after the slow answer came back (which would be 1.8 s: two leaders).
#[tokio::test]
async fn a_slow_api_server_does_not_stretch_the_renew_deadline() {
    let api = FakeApiServer::default();
    let a = candidate(&api, "pod-a");
    until("a leads", a.leadership.clone(), true).await;
    let b = candidate(&api, "pod-b");
    let a_steps_down = when(a.leadership.clone(), false);
    let b_leads = when(b.leadership.clone(), true);
    a.delay_ms.store(800, Ordering::SeqCst);
    // The next renewal takes effect now; its answer is on its way for 800 ms.
    let version = |api: &FakeApiServer| {
        api.lease()
            .and_then(|l| l["metadata"]["resourceVersion"].as_str().map(str::to_owned))
    };
    let before = version(&api);
    let deadline = Instant::now() + Duration::from_secs(5);
    while version(&api) == before {
        assert!(Instant::now() < deadline, "no renewal within 5 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    a.cut.store(true, Ordering::SeqCst);
    let a_down = a_steps_down.await.expect("a steps down");
    let b_up = b_leads.await.expect("b leads");
    assert!(
        a_down < b_up,
        "two leaders for {:?}: A stepped down after B took over",
        a_down - b_up
    );
}

fn annotation<'a>(lease: &'a Value, key: &str) -> Option<&'a str> {
    lease["metadata"]["annotations"][key].as_str()
}

/// The relay's real report (`outbox_worker::report`): every renewal carries
/// the figures of that moment, and a figure that became unknown is removed.
#[tokio::test]
async fn the_holder_writes_its_status_report_with_every_renewal() {
    let api = FakeApiServer::default();
    let metrics = RelayMetrics::register(&mut prometheus_client::registry::Registry::default());
    let (figures, figures_rx) = tokio::sync::watch::channel(Figures::default());
    let source = report::relay_source(metrics.clone(), figures_rx);
    let a = candidate_with(&api, "pod-a", |e| e.with_report(source));
    until("a leads", a.leadership.clone(), true).await;
    let lease = api.lease().expect("lease created");
    assert_eq!(annotation(&lease, report::MESSAGES_TOTAL), Some("0"));
    assert_eq!(annotation(&lease, report::DEAD_LETTERS_TOTAL), Some("0"));
    assert_eq!(annotation(&lease, report::PAUSED_KEYS), Some("0"));
    assert_eq!(
        annotation(&lease, report::BACKLOG),
        None,
        "no backlog before the probe has read one"
    );
    assert_eq!(annotation(&lease, report::LAST_PROGRESS_TIME), None);
    let first_time = annotation(&lease, report::REPORT_TIME)
        .expect("report time")
        .to_owned();
    first_time
        .parse::<chrono::DateTime<chrono::Utc>>()
        .expect("RFC 3339");

    metrics.published.inc_by(42);
    metrics.dead_lettered.inc();
    metrics.paused_keys.set(3);
    metrics.last_published.set(1_700_000_000.5);
    figures.send_replace(Figures {
        backlog: Some(17),
        oldest_age: Some(2.5),
        ..Figures::default()
    });
    let lease = api
        .wait_lease("the new figures", |l| {
            annotation(l, report::MESSAGES_TOTAL) == Some("42")
        })
        .await;
    assert_eq!(annotation(&lease, report::BACKLOG), Some("17"));
    assert_eq!(
        annotation(&lease, report::OLDEST_PENDING_AGE_SECONDS),
        Some("2.5")
    );
    assert_eq!(annotation(&lease, report::DEAD_LETTERS_TOTAL), Some("1"));
    assert_eq!(annotation(&lease, report::PAUSED_KEYS), Some("3"));
    assert_eq!(
        annotation(&lease, report::LAST_PROGRESS_TIME),
        Some("2023-11-14T22:13:20.500Z")
    );
    assert_ne!(
        annotation(&lease, report::REPORT_TIME),
        Some(first_time.as_str())
    );
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");

    // The probe could not read the figures: they leave the Lease.
    figures.send_replace(Figures::default());
    let lease = api
        .wait_lease("the unknown figures removed", |l| {
            annotation(l, report::BACKLOG).is_none()
        })
        .await;
    assert_eq!(annotation(&lease, report::OLDEST_PENDING_AGE_SECONDS), None);
    assert_eq!(annotation(&lease, report::MESSAGES_TOTAL), Some("42"));
}

fn owner(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "outbox.dev/v1alpha1".to_owned(),
        kind: "OutboxRelay".to_owned(),
        name: "orders".to_owned(),
        uid: uid.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_created_lease_names_its_owner() {
    let api = FakeApiServer::default();
    let a = candidate_with(&api, "pod-a", |e| e.with_owner(Some(owner("uid-1"))));
    until("a leads", a.leadership.clone(), true).await;
    let lease = api.lease().expect("lease created");
    assert_eq!(
        lease["metadata"]["ownerReferences"],
        json!([{"apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
                "name": "orders", "uid": "uid-1", "controller": false}]),
        "one owner reference, not a controller, without blockOwnerDeletion"
    );
    // Renewals keep exactly one.
    let lease = api.wait_writes(2).await;
    assert_eq!(
        lease["metadata"]["ownerReferences"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

/// A Lease written before owners were set (or by someone else) gets the
/// owner reference at the holder's next renewal; labels, annotations and
/// owner references of others survive every write, also those added while
/// the holder renews.
#[tokio::test]
async fn renewals_add_the_owner_and_keep_everyone_elses_metadata() {
    let api = FakeApiServer::default();
    let foreign_owner = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": "orders-relay", "uid": "uid-deployment"});
    api.edit(|lease| {
        lease["metadata"]["labels"] = json!({"app.kubernetes.io/name": "orders"});
        lease["metadata"]["annotations"] = json!({"example.com/note": "keep me"});
        lease["metadata"]["ownerReferences"] = json!([foreign_owner.clone()]);
        // Held by pod-a, renewed just now: pod-a's first write is a renewal.
        lease["spec"] = json!({"holderIdentity": "pod-a", "leaseDurationSeconds": 1,
                               "renewTime": "2026-12-02T10:00:00.000000Z",
                               "leaseTransitions": 4});
    });
    let metrics = RelayMetrics::register(&mut prometheus_client::registry::Registry::default());
    let (_figures, figures_rx) = tokio::sync::watch::channel(Figures::default());
    let source = report::relay_source(metrics, figures_rx);
    let a = candidate_with(&api, "pod-a", |e| {
        e.with_owner(Some(owner("uid-1"))).with_report(source)
    });
    until("a leads", a.leadership.clone(), true).await;
    let lease = api.lease().expect("lease");
    assert_eq!(
        lease["spec"]["leaseTransitions"], 4,
        "a renewal, not a takeover"
    );
    assert_eq!(
        lease["metadata"]["ownerReferences"],
        json!([foreign_owner.clone(), {"apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
                "name": "orders", "uid": "uid-1", "controller": false}]),
        "our owner reference added after the foreign one"
    );

    // Someone annotates and labels the Lease between two renewals.
    api.edit(|lease| {
        lease["metadata"]["annotations"]["example.com/added-later"] = json!("also keep");
        lease["metadata"]["labels"]["team"] = json!("payments");
    });
    let lease = api.wait_writes(2).await;
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");
    assert_eq!(
        lease["metadata"]["labels"],
        json!({"app.kubernetes.io/name": "orders", "team": "payments"})
    );
    assert_eq!(annotation(&lease, "example.com/note"), Some("keep me"));
    assert_eq!(
        annotation(&lease, "example.com/added-later"),
        Some("also keep")
    );
    assert!(
        annotation(&lease, report::REPORT_TIME).is_some(),
        "the report sits beside them"
    );
    assert_eq!(
        lease["metadata"]["ownerReferences"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "no owner reference added twice"
    );
}
