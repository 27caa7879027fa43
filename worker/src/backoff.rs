//! Capped exponential backoff for the workers' retry loops.
//!
//! The delays come from `backon` (jittered exponential); this wrapper only adds
//! the "reset after a success" the long-running loops need.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// Retry delays for a loop that runs forever: grows on each failure up to
/// `max`, starts again from `min` after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    failures: u32,
}

impl Backoff {
    /// A backoff between `min` and `max`, doubling with jitter.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            current: builder.build(),
            builder,
            failures: 0,
        }
    }

    /// The delay before the next attempt after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.failures += 1;
        self.current.next().unwrap_or(Duration::from_secs(1))
    }

    /// How many failures in a row since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Called after a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            self.current = self.builder.build();
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100));
        // Jitter adds at most one extra min-delay-sized share; the cap holds.
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(2), "{delays:?}");
        assert_eq!(b.failures(), 12);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() < Duration::from_millis(400));
    }
}
