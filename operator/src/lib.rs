//! `outbox-operator`: reconciles `OutboxRelay` and `InboxRelay` resources into Deployments
//! of the outbox relay and the inbox worker.
//!
//! The architecture, from pure to effectful:
//! - [`crd`]: the custom resources, their CRDs and the validation shared by `render` and
//!   reconcile;
//! - [`workload`]: what differs between the two kinds, so everything below is written once;
//! - [`resources`]: relay → desired objects (pure);
//! - [`report`]: the figures the active worker writes on its Lease (pure);
//! - [`status`]: (Deployment, Lease) → status and conditions, `Stalled` included (pure);
//! - [`reconcile`]: the thin shell that reads Secrets, applies objects with server-side
//!   apply and writes status;
//! - [`metrics`], [`http`], [`telemetry`]: the operator's own observability.

#![warn(missing_docs)]

pub mod crd;
pub mod http;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod resources;
pub mod status;
pub mod telemetry;
pub mod workload;
