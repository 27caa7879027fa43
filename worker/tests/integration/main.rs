//! Integration tests of the relay against a real PostgreSQL and the real
//! Pub/Sub emulator, both started by the harness (see `harness.rs`). One test
//! binary, so the crates link once.

mod harness;
mod lease;

mod crash;
mod dead_letter;
mod delivery;
mod failover;
mod inbox_bench;
mod inbox_crash;
mod inbox_delivery;
mod inbox_duplicates;
mod inbox_order;
mod inbox_processing;
mod inbox_support;
mod ordering;
mod outage;
mod probes;
mod shutdown;
