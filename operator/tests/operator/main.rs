//! Tests of the operator (one test binary; see the modules).
//!
//! - `desired`: OutboxRelay → objects (golden files, security context, probes, labels, owners);
//! - `inbox`: the same for InboxRelay (golden files, validation, CEL, objects);
//! - `crd`: the generated CRD matches `crds/`, printer columns, schema shape;
//! - `validation`: sample resources, and the CEL rules' logic through `crd::validate`;
//! - `status`: (Deployment, Lease) → status and conditions, figures and `Stalled`;
//! - `reconcile`: the reconcile shell against `fake_api`, an in-memory API-server stand-in;
//! - `flow`: Lease figures in status, `Stalled` and its Events, InboxRelay reconcile;
//! - `ownership`: name conflicts, the image allowlist, the workers' Lease and the GC.

mod cel;
mod common;
mod crd;
mod desired;
mod fake_api;
mod flow;
mod http;
mod inbox;
mod ownership;
mod reconcile;
mod status;
mod validation;
