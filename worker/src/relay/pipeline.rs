//! The claiming loop's decisions, as a state machine without I/O: when to
//! claim, when to wait for the committer, when to back off, and the one
//! moment paused ordering keys are resumed.
//!
//! ```text
//!            room, more rows             failure / stopped short
//!   Claim ─────────────────▶ in flight ─────────────────────────▶ Draining
//!     ▲  ◀── batch finished ──┘                                     │
//!     │                                      nothing left in flight │
//!     └──── (after a backoff, if Pub/Sub or the database failed) ◀── Resume(keys)
//! ```
//!
//! Why drain: batches in flight may hold later messages of a key whose
//! earlier message failed (the client pauses such keys, so those fail too).
//! Only when nothing of the failed claim or after it is in flight are the
//! keys resumed and claiming restarts from the oldest pending row, which
//! keeps every key in order across retries. A claim that stopped publishing
//! early (Pub/Sub did not answer in time) starts a drain at once: its unsent
//! rows stay locked, and a next claim would skip them (`SKIP LOCKED`) and
//! publish later rows of their keys first.

use std::time::Instant;

use super::batch::{Outcome, PausedKeys};
use crate::backoff::Backoff;
use crate::pubsub::Verdict;

/// What the claiming loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Claim a batch.
    Claim,
    /// Wait for the committer's next result.
    AwaitResult,
    /// Nothing in flight: resume these keys (the only place that does), and
    /// tidy what may only be touched while nothing is in flight.
    Resume(PausedKeys),
    /// Nothing in flight; retry after a failure at this instant.
    Sleep(Instant),
    /// Nothing in flight, nothing pending: wait for a wake-up.
    Idle,
    /// Stopping, and nothing is in flight any more.
    Done,
}

/// How a batch ended, as far as the pipeline cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its deletes and dead letters were committed.
    Committed,
    /// The commit failed; every row stays in the outbox.
    CommitFailed,
    /// Given up unfinished (leadership lost); rolled back.
    GivenUp,
}

/// The state of the claim pipeline.
#[derive(Debug)]
pub struct Pipeline {
    depth: usize,
    in_flight: usize,
    /// Rows are likely pending: the last claim was full, a batch finished,
    /// or a wake-up arrived.
    more: bool,
    /// Claim nothing until every batch in flight is finished.
    draining: Option<Draining>,
    /// After a failure: claim nothing before this instant.
    retry_at: Option<Instant>,
    backoff: Backoff,
    stopping: bool,
}

#[derive(Debug, Default)]
struct Draining {
    /// Keys to resume once drained.
    keys: PausedKeys,
    /// Pub/Sub or the database failed: back off before claiming again.
    back_off: bool,
}

impl Pipeline {
    /// Up to `depth` batches in flight; `backoff` paces retries after failures.
    pub fn new(depth: usize, backoff: Backoff) -> Self {
        Pipeline {
            depth: depth.max(1),
            in_flight: 0,
            more: true,
            draining: None,
            retry_at: None,
            backoff,
            stopping: false,
        }
    }

    /// Batches claimed and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Ordering keys waiting to be resumed once the failed claim drains.
    pub fn paused_keys(&self) -> usize {
        self.draining.as_ref().map_or(0, |d| d.keys.len())
    }

    /// The next step.
    pub fn next(&mut self, now: Instant) -> Next {
        if self.in_flight == 0
            && let Some(drained) = self.draining.take()
        {
            if drained.back_off {
                self.retry_at = Some(now + self.backoff.next_delay());
            }
            return Next::Resume(drained.keys);
        }
        if self.stopping {
            return if self.in_flight > 0 {
                Next::AwaitResult
            } else {
                Next::Done
            };
        }
        let blocked = self.draining.is_some() || self.retry_at.is_some();
        if self.in_flight > 0 && (blocked || self.in_flight >= self.depth || !self.more) {
            return Next::AwaitResult;
        }
        if let Some(at) = self.retry_at {
            if at > now {
                return Next::Sleep(at);
            }
            self.retry_at = None;
            self.more = true;
        }
        if self.more { Next::Claim } else { Next::Idle }
    }

    /// A claim was handed to the committer.
    pub fn claimed(&mut self, full: bool, stopped_short: bool) {
        self.in_flight += 1;
        self.more = full;
        if stopped_short {
            self.draining.get_or_insert_with(Draining::default).back_off = true;
        }
    }

    /// A claim found no rows.
    pub fn found_nothing(&mut self) {
        self.more = false;
    }

    /// A claim failed on the database side and rolled back; `keys` are
    /// those it may have had paused.
    pub fn claim_failed(&mut self, keys: PausedKeys) {
        self.more = false;
        let draining = self.draining.get_or_insert_with(Draining::default);
        draining.back_off = true;
        draining.keys.extend(keys);
    }

    /// A wake-up (notification or poll): rows may be pending.
    pub fn woken(&mut self) {
        self.more = true;
    }

    /// A batch came back from the committer.
    pub fn finished(&mut self, outcome: &Outcome, end: End) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.more = true;
        let back_off = end != End::Committed
            || outcome.stopped_short
            || [Verdict::Outage, Verdict::Timeout, Verdict::OwnTopicRefused]
                .into_iter()
                .any(|v| outcome.any(v));
        let failed = back_off || !outcome.failed.is_empty() || !outcome.paused_keys.is_empty();
        if failed || self.draining.is_some() {
            let draining = self.draining.get_or_insert_with(Draining::default);
            draining.back_off |= back_off;
            draining.keys.extend(outcome.paused_keys.iter().cloned());
        } else {
            self.backoff.reset();
        }
    }

    /// Let the batches in flight finish, claim nothing new, and pass by
    /// [`Next::Resume`] (used to renew publishers at a quiet moment).
    pub fn quiesce(&mut self) {
        self.draining.get_or_insert_with(Draining::default);
    }

    /// Claim nothing more; [`Next::Done`] once nothing is in flight.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// The batches in flight were dropped unreported (the shutdown timeout
    /// aborted the committer).
    pub fn forget_in_flight(&mut self) {
        self.in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::batch::{Failed, Failure};
    use std::time::Duration;

    fn pipeline(depth: usize) -> Pipeline {
        Pipeline::new(
            depth,
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        )
    }

    fn failed(verdict: Verdict) -> Outcome {
        let mut outcome = Outcome {
            failed: vec![Failed {
                id: 1,
                topic_column: None,
                failure: Failure {
                    verdict,
                    reason: String::new(),
                },
            }],
            ..Outcome::default()
        };
        outcome
            .paused_keys
            .insert(("projects/p/topics/topic".parse().unwrap(), "k".to_owned()));
        outcome
    }

    #[test]
    fn claims_until_the_pipeline_is_full_then_waits() {
        let now = Instant::now();
        let mut p = pipeline(2);
        assert_eq!(p.next(now), Next::Claim);
        p.claimed(true, false);
        assert_eq!(p.next(now), Next::Claim);
        p.claimed(true, false);
        assert_eq!(p.next(now), Next::AwaitResult);
        p.finished(&Outcome::default(), End::Committed);
        assert_eq!(p.next(now), Next::Claim);
    }

    #[test]
    fn a_claim_that_is_not_full_waits_for_its_result_then_claims_again() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(false, false);
        assert_eq!(p.next(now), Next::AwaitResult);
        p.finished(&Outcome::default(), End::Committed);
        assert_eq!(p.next(now), Next::Claim);
        p.found_nothing();
        assert_eq!(p.next(now), Next::Idle);
        p.woken();
        assert_eq!(p.next(now), Next::Claim);
    }

    #[test]
    fn a_claim_that_stopped_short_is_not_overtaken() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(true, true);
        // Full, and room for another: but its unsent rows are still locked.
        assert_eq!(p.next(now), Next::AwaitResult);
        let outcome = Outcome {
            stopped_short: true,
            ..failed(Verdict::Timeout)
        };
        p.finished(&outcome, End::Committed);
        let Next::Resume(keys) = p.next(now) else {
            panic!("drained: resume")
        };
        assert_eq!(keys.len(), 1);
        assert!(matches!(p.next(now), Next::Sleep(_)), "backs off");
    }

    #[test]
    fn a_failure_drains_resumes_once_and_backs_off() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(true, false);
        p.claimed(true, false);
        p.finished(&failed(Verdict::Outage), End::Committed);
        assert_eq!(
            p.next(now),
            Next::AwaitResult,
            "the second batch is in flight"
        );
        p.finished(&failed(Verdict::Paused), End::Committed);
        assert!(matches!(p.next(now), Next::Resume(_)));
        let Next::Sleep(at) = p.next(now) else {
            panic!("backs off")
        };
        assert_eq!(p.next(at), Next::Claim);
    }

    #[test]
    fn rows_refused_by_a_topic_or_suspect_do_not_back_off() {
        let now = Instant::now();
        for verdict in [Verdict::Refused, Verdict::Suspect] {
            let mut p = pipeline(2);
            p.claimed(true, false);
            p.finished(&failed(verdict), End::Committed);
            assert!(matches!(p.next(now), Next::Resume(_)), "{verdict:?}");
            assert_eq!(p.next(now), Next::Claim, "{verdict:?}");
        }
    }

    #[test]
    fn a_failed_commit_backs_off() {
        let now = Instant::now();
        let mut p = pipeline(1);
        p.claimed(false, false);
        p.finished(&Outcome::default(), End::CommitFailed);
        assert!(matches!(p.next(now), Next::Resume(_)));
        assert!(matches!(p.next(now), Next::Sleep(_)));
    }

    #[test]
    fn a_failed_claim_resumes_its_keys_and_backs_off() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(true, false);
        p.claim_failed(failed(Verdict::Paused).paused_keys);
        assert_eq!(p.next(now), Next::AwaitResult, "a batch is still in flight");
        p.finished(&Outcome::default(), End::Committed);
        assert!(matches!(p.next(now), Next::Resume(k) if k.len() == 1));
        assert!(matches!(p.next(now), Next::Sleep(_)));
    }

    #[test]
    fn stopping_waits_for_what_is_in_flight() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(true, false);
        p.stop();
        assert_eq!(p.next(now), Next::AwaitResult);
        p.finished(&failed(Verdict::Paused), End::GivenUp);
        assert!(matches!(p.next(now), Next::Resume(k) if k.len() == 1));
        assert_eq!(p.next(now), Next::Done);
    }

    #[test]
    fn quiesce_passes_by_resume_without_backing_off() {
        let now = Instant::now();
        let mut p = pipeline(2);
        p.claimed(true, false);
        p.quiesce();
        assert_eq!(p.next(now), Next::AwaitResult);
        p.finished(&Outcome::default(), End::Committed);
        assert_eq!(p.next(now), Next::Resume(PausedKeys::new()));
        assert_eq!(p.next(now), Next::Claim);
    }
}
