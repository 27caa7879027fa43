//! Throwaway infrastructure for tests, `make demo` and `make bench`: a real
//! PostgreSQL and the real Pub/Sub emulator, each on a free port in a
//! temporary directory, killed when dropped (or when this process dies).
//!
//! Nothing here is mocked; if a binary is missing the error says what to
//! install instead of skipping.

pub mod collector;
pub mod emulator;
pub mod iam;
pub mod otlp;
pub mod postgres;
mod process;
pub mod proxy;
pub mod pull;
pub mod soak;
pub mod worker;

pub use collector::{Collector, Received};
pub use emulator::Emulator;
pub use iam::IamStandIn;
pub use otlp::OtlpReceiver;
pub use postgres::{Durability, Postgres};
pub use proxy::Proxy;
pub use worker::WorkerProcess;

use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` until it returns `Some`, or fails with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
