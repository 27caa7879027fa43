//! Integration tests of the relay against a real PostgreSQL and the real
//! Pub/Sub emulator, both started by the harness (see `harness.rs`). One test
//! binary, so the crates link once.

mod harness;
mod lease;

mod crash;
mod dead_letter;
mod delivery;
mod failover;
mod ordering;
mod outage;
mod probes;
mod shutdown;
