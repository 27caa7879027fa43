//! Integration tests of the relay against a real PostgreSQL and the real
//! Pub/Sub emulator, both started by the harness (see `harness.rs`). One test
//! binary, so the crates link once.

mod harness;
mod lease;

mod claims;
mod crash;
mod dead_letter;
mod delivery;
mod failover;
mod fencing;
mod inbox_bench;
mod inbox_crash;
mod inbox_delivery;
mod inbox_duplicates;
mod inbox_failover;
mod inbox_faults;
mod inbox_order;
mod inbox_processing;
mod inbox_support;
mod notify;
mod ordering;
mod outage;
mod probes;
mod refusals;
mod shutdown;
mod traces;
