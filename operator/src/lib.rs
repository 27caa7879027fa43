//! `outbox-operator`: reconciles `OutboxRelay` resources into Deployments of the outbox
//! relay worker.
//!
//! The architecture, from pure to effectful:
//! - [`crd`]: the custom resource, its CRD and the validation shared by `render` and reconcile;
//! - [`resources`]: `OutboxRelay` → desired objects (pure);
//! - [`status`]: (Deployment, Lease) → status and conditions (pure);
//! - [`reconcile`]: the thin shell that reads Secrets, applies objects with server-side
//!   apply and writes status;
//! - [`metrics`], [`http`], [`telemetry`]: the operator's own observability.

#![warn(missing_docs)]

pub mod crd;
pub mod http;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod resources;
pub mod status;
pub mod telemetry;
