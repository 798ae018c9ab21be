//! A circuit breaker: after repeated failures the client stops paying the deadline on every
//! call, and lets one probe through now and then to find out when the service is back.
//!
//! Time is tokio's clock: the breaker is only consulted from `memoize`'s RPCs, which run in a
//! tokio runtime, and tests pause and advance that clock instead of sleeping against the
//! cool-down.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Calls go through; this many have failed in a row.
    Closed { failures: u32 },
    /// Calls are skipped until the instant; then one probe goes through.
    Open { until: Instant },
    /// One probe is in flight; others are skipped. A probe that never reports (its caller
    /// went away) is replaced after a cool-down.
    Probing { since: Instant },
}

/// What a report did to the breaker, so the caller can log the moments that matter once
/// rather than on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The breaker was closed (or open) and stays so.
    None,
    /// A failure opened a closed breaker: the service just became unreachable.
    Opened,
    /// A success closed an open breaker: the service is back.
    Closed,
}

/// Shared by every clone of a client.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` failures in a row; probes every `cooldown` while open.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single assignment, so a poisoned lock still holds a valid state.
        crate::lock(&self.state)
    }

    /// Whether a call may go to the service now.
    pub(crate) fn allow(&self) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::Probing { since: now };
                true
            }
            State::Probing { since } if now.duration_since(since) >= self.cooldown => {
                *state = State::Probing { since: now };
                true
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }

    /// The service answered.
    pub(crate) fn success(&self) -> Transition {
        let mut state = self.state();
        let was_open = !matches!(*state, State::Closed { .. });
        *state = State::Closed { failures: 0 };
        if was_open {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    /// The service failed or did not answer in time.
    pub(crate) fn failure(&self) -> Transition {
        let mut state = self.state();
        let (failures, was_closed) = match *state {
            State::Closed { failures } => (failures + 1, true),
            State::Open { .. } | State::Probing { .. } => (self.threshold, false),
        };
        *state = if failures >= self.threshold {
            State::Open {
                until: Instant::now() + self.cooldown,
            }
        } else {
            State::Closed { failures }
        };
        if was_closed && failures >= self.threshold {
            Transition::Opened
        } else {
            Transition::None
        }
    }

    /// Whether calls are currently being skipped.
    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.state(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    /// Long enough that a test passing by real time would be noticed; the clock is paused.
    const COOLDOWN: Duration = Duration::from_secs(30);
    const TICK: Duration = Duration::from_millis(1);

    /// Closed → open after the threshold → one probe exactly when the cool-down ends → closed
    /// on success.
    #[tokio::test(start_paused = true)]
    async fn opens_probes_and_closes() {
        let breaker = Breaker::new(3, COOLDOWN);
        for _ in 0..2 {
            assert!(breaker.allow());
            breaker.failure();
        }
        assert!(!breaker.is_open(), "two failures are below the threshold");
        breaker.failure();
        assert!(breaker.is_open());
        assert!(!breaker.allow(), "open: calls are skipped");
        advance(COOLDOWN - TICK).await;
        assert!(!breaker.allow(), "still cooling down");
        advance(TICK).await;
        assert!(
            breaker.allow(),
            "after the cool-down one probe goes through"
        );
        assert!(!breaker.allow(), "only one probe at a time");
        breaker.success();
        assert!(!breaker.is_open());
        assert!(breaker.allow());
    }

    /// A failed probe reopens the breaker for a whole new cool-down.
    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens() {
        let breaker = Breaker::new(1, COOLDOWN);
        breaker.failure();
        advance(COOLDOWN).await;
        assert!(breaker.allow());
        breaker.failure();
        assert!(!breaker.allow());
        advance(COOLDOWN - TICK).await;
        assert!(!breaker.allow(), "the new cool-down has not ended");
        advance(TICK).await;
        assert!(breaker.allow(), "the next probe after the new cool-down");
    }

    /// A probe that never reports (its caller went away) is replaced after a cool-down, not
    /// before.
    #[tokio::test(start_paused = true)]
    async fn silent_probe_is_replaced_after_a_cooldown() {
        let breaker = Breaker::new(1, COOLDOWN);
        breaker.failure();
        advance(COOLDOWN).await;
        assert!(breaker.allow(), "the first probe");
        advance(COOLDOWN - TICK).await;
        assert!(!breaker.allow(), "the probe may still answer");
        advance(TICK).await;
        assert!(breaker.allow(), "a replacement probe");
        assert!(breaker.is_open(), "still open until a probe succeeds");
    }

    /// A success resets the count of failures in a row.
    #[test]
    fn success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.failure();
        breaker.success();
        breaker.failure();
        assert!(!breaker.is_open());
    }

    /// Opening and closing are each reported once, so the client logs an outage once.
    #[tokio::test(start_paused = true)]
    async fn transitions_are_reported_once() {
        let breaker = Breaker::new(2, COOLDOWN);
        assert_eq!(breaker.failure(), Transition::None);
        assert_eq!(breaker.failure(), Transition::Opened);
        advance(COOLDOWN).await;
        assert!(breaker.allow());
        assert_eq!(
            breaker.failure(),
            Transition::None,
            "a failed probe is no news"
        );
        advance(COOLDOWN).await;
        assert!(breaker.allow());
        assert_eq!(breaker.success(), Transition::Closed);
        assert_eq!(breaker.success(), Transition::None);
    }
}
