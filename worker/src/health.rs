//! The HTTP endpoints every worker serves on `--health-addr`:
//!
//! - `GET /healthz` — liveness: the work loop has made progress recently. A
//!   loop stuck for longer than the liveness timeout gets the pod restarted.
//! - `GET /readyz` — readiness: the database and Pub/Sub were reachable on the
//!   last attempt. A failing dependency makes the worker not ready, never dead:
//!   it keeps retrying by itself.
//! - `GET /metrics` — Prometheus text format.
//!
//! Served with axum; the body of a failing probe says which dependency failed
//! and why (`curl <pod>:8080/readyz`: `kubectl describe pod` shows only the
//! status code); the probe also exports readiness as `*_ready` for alerts.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What readiness needs, for `/readyz` and the `*_ready` metric alike.
pub const READINESS: [Component; 2] = [Component::Database, Component::PubSub];

/// A dependency whose reachability decides readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// PostgreSQL.
    Database,
    /// Pub/Sub (or the emulator), including the relay's own topic.
    PubSub,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Database => "database",
            Component::PubSub => "pubsub",
        }
    }
}

#[derive(Debug)]
struct State_ {
    heartbeat: Instant,
    /// `None` = healthy; `Some(reason)` = failing. Absent = not checked yet.
    components: std::collections::BTreeMap<Component, Option<String>>,
}

/// Shared health state: the work loops report into it, the probes read it.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Mutex<State_>>,
    liveness_timeout: Duration,
}

impl Health {
    /// `liveness_timeout`: how long the loop may go without a heartbeat before
    /// `/healthz` fails.
    pub fn new(liveness_timeout: Duration) -> Self {
        Health {
            inner: Arc::new(Mutex::new(State_ {
                heartbeat: Instant::now(),
                components: Default::default(),
            })),
            liveness_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        // A panic while holding this lock cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The work loop is alive.
    pub fn heartbeat(&self) {
        self.lock().heartbeat = Instant::now();
    }

    /// Records that `component` answered.
    pub fn ok(&self, component: Component) {
        self.lock().components.insert(component, None);
    }

    /// Records that `component` failed, with a reason for the probe's body.
    pub fn failing(&self, component: Component, reason: impl Into<String>) {
        self.lock()
            .components
            .insert(component, Some(reason.into()));
    }

    /// Liveness, with a reason when failing.
    pub fn live(&self) -> Result<(), String> {
        let age = self.lock().heartbeat.elapsed();
        if age < self.liveness_timeout {
            Ok(())
        } else {
            Err(format!(
                "work loop stalled: no progress for {:.1}s (limit {:.1}s)",
                age.as_secs_f64(),
                self.liveness_timeout.as_secs_f64()
            ))
        }
    }

    /// Readiness: every component expected has answered on its last attempt.
    pub fn ready(&self, expected: &[Component]) -> Result<(), String> {
        let state = self.lock();
        let problems: Vec<String> = expected
            .iter()
            .filter_map(|c| match state.components.get(c) {
                Some(None) => None,
                Some(Some(reason)) => Some(format!("{}: {reason}", c.name())),
                None => Some(format!("{}: not checked yet", c.name())),
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    expected: Arc<Vec<Component>>,
    registry: Arc<Registry>,
}

/// Binds the HTTP address up front, so that a taken port fails start-up with
/// a clear error instead of leaving a worker without probes.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (--health-addr): {e}"),
        )
    })
}

/// Serves the probes and metrics until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    expected: Vec<Component>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let app = router(health, expected, registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn router(health: Health, expected: Vec<Component>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health,
            expected: Arc::new(expected),
            registry,
        })
}

fn probe_response(result: Result<(), String>) -> impl IntoResponse {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    probe_response(state.health.live())
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    probe_response(state.health.ready(&state.expected))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_component() {
        let h = Health::new(Duration::from_secs(10));
        let both = [Component::Database, Component::PubSub];
        assert!(h.ready(&both).unwrap_err().contains("not checked yet"));
        h.ok(Component::Database);
        h.failing(Component::PubSub, "topic projects/p/topics/t not found");
        let err = h.ready(&both).unwrap_err();
        assert!(
            err.contains("pubsub: topic projects/p/topics/t not found"),
            "{err}"
        );
        assert!(!err.contains("database"));
        h.ok(Component::PubSub);
        assert!(h.ready(&both).is_ok());
    }

    #[test]
    fn liveness_follows_heartbeat() {
        let h = Health::new(Duration::ZERO);
        assert!(h.live().unwrap_err().contains("stalled"));
        let h = Health::new(Duration::from_secs(60));
        h.heartbeat();
        assert!(h.live().is_ok());
    }
}
