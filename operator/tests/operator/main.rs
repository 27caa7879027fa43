//! Tests of the operator (one test binary; see the modules).
//!
//! - `desired`: OutboxRelay → objects (golden files, security context, probes, labels, owners);
//! - `crd`: the generated CRD matches `crds/`, printer columns, schema shape;
//! - `validation`: sample resources, and the CEL rules' logic through `crd::validate`;
//! - `status`: (Deployment, Lease) → status and conditions;
//! - `reconcile`: the reconcile shell against `fake_api`, an in-memory API-server stand-in.

mod cel;
mod common;
mod crd;
mod desired;
mod fake_api;
mod http;
mod reconcile;
mod status;
mod validation;
