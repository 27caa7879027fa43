//! Transactional outbox and inbox between PostgreSQL and Google Cloud Pub/Sub.
//!
//! Where to look:
//! - [`relay`]: the outbox relay, PostgreSQL → Pub/Sub (claim, publish, acknowledge).
//! - [`leader`]: leader election (Kubernetes Lease, PostgreSQL advisory lock).
//! - [`inbox`]: the inbox worker, Pub/Sub → inbox table, each message once.
//! - [`app`]: the library for applications: write to the outbox, process the inbox.
//! - [`health`]: the HTTP probes (`/healthz`, `/readyz`) and `/metrics`.
//! - [`metrics`]: the Prometheus metrics the workers export.
//! - [`report`]: the status report a leader writes on its Kubernetes Lease.
//! - [`db`]: connecting to PostgreSQL and the embedded migrations.
//! - [`pubsub`]: connecting to Pub/Sub (or its emulator).
//! - [`ident`]: validation of table, topic and subscription names.
//! - [`trace`]: trace context in message attributes, and the messaging spans.

pub mod app;
pub mod backoff;
pub mod db;
pub mod health;
pub mod ident;
pub mod inbox;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod pubsub;
pub mod relay;
pub mod report;
pub mod shutdown;
pub mod trace;
