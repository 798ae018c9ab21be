//! Leases: one computation per key across the fleet (the service's `Leases` contract).
//!
//! `memoize`'s leader asks the service for the key's lease with its lookup: on a miss the
//! service hands it to exactly one caller fleet-wide (`LEASE_WON`, with a token) and tells the
//! others to look again shortly (`LEASE_WAIT`). The winner computes and writes with the
//! token; a bust meanwhile voids the token, so a result computed from data older than the bust
//! is refused instead of stored. This module holds what that takes on the client, apart from
//! the flow in [`Function`](crate::Function): a handle's lease settings and the lookup they
//! make ([`LeasePolicy`]), the bound on waiting ([`WaitBudget`]), and the guard that gives a
//! lease back when its computation fails, panics or is cancelled ([`LeaseGuard`]).

use std::time::{Duration, Instant};

use crate::{Client, pb};

/// How long a lease lasts unless set otherwise ([`ClientOptions::lease`](crate::ClientOptions::lease),
/// [`Function::lease`](crate::Function::lease)): longer than most computations, short enough
/// that a caller whose lease holder died computes itself within seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// The shortest pause between two lookups of a caller waiting for another's lease, whatever
/// the service suggests, so a reply of 0 cannot turn waiting into a busy loop.
const MIN_RETRY: Duration = Duration::from_millis(1);
/// How much longer than the service's `retry_after_ms` a waiter may sleep, at most (a
/// fraction, drawn uniformly): enough to spread waiters of one key in many processes, who got
/// the same answer at about the same time, over a few milliseconds.
const JITTER: f64 = 0.25;

/// A handle's lease settings: the lease lifetime it asks for, and the stale-while-revalidate
/// and stale-if-error options built on leases. `Copy`, a field of every `Function`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LeasePolicy {
    /// `None`: the client's default ([`ClientOptions::lease`](crate::ClientOptions::lease)).
    /// `Some(ZERO)`: leases off.
    pub(crate) lease: Option<Duration>,
    /// A live entry at least this old is recomputed by one caller (zero: never by age).
    pub(crate) refresh_after: Duration,
    /// XFetch's beta (zero: off).
    pub(crate) beta: f32,
    /// How long a value is kept past its TTL to serve when computing fails (zero: none).
    pub(crate) stale_if_error: Duration,
}

impl LeasePolicy {
    /// The lease lifetime in effect, `client_default` unless the handle set one; zero when
    /// leases are off.
    pub(crate) fn lifetime(&self, client_default: Duration) -> Duration {
        self.lease.unwrap_or(client_default)
    }

    /// The lookup of `key` a `memoize` leader sends with lease lifetime `lifetime`: it asks
    /// for the lease and, with leases on, for a due entry's recomputation and for a stale
    /// value. Without a lease the service would refuse (or ignore) the others, so they are
    /// only sent with one.
    /// A leased lookup declares `tags`, those its result will be written with, so a BustTag
    /// of any of them voids the lease.
    pub(crate) fn get_request(
        &self,
        key: pb::Key,
        lifetime: Duration,
        tags: &[String],
    ) -> pb::GetRequest {
        let lease_ms = millis_u32(lifetime);
        if lease_ms == 0 {
            return pb::GetRequest {
                key: Some(key),
                ..Default::default()
            };
        }
        pb::GetRequest {
            key: Some(key),
            lease_ms,
            refresh_after_ms: millis_u32(self.refresh_after),
            beta: self.beta,
            allow_stale: !self.stale_if_error.is_zero(),
            tags: tags.to_vec(),
            want_ttl: false,
        }
    }

    /// The `stale_seconds` to write with a value kept for `ttl`: [`LeasePolicy::stale_if_error`]
    /// rounded up to whole seconds (the service keeps whole seconds, and keeping a value a
    /// little longer than asked is what the caller wants), and at most what keeps TTL plus it
    /// within `max_ttl` (the service refuses a write past its maximum, and a refused write
    /// would not cache at all).
    pub(crate) fn stale_seconds(&self, ttl: Duration, max_ttl: Duration) -> u32 {
        let asked =
            self.stale_if_error.as_secs() + u64::from(self.stale_if_error.subsec_nanos() > 0);
        let room = max_ttl.as_secs().saturating_sub(ttl.as_secs());
        u32::try_from(asked.min(room)).unwrap_or(u32::MAX)
    }
}

/// `duration` in whole milliseconds, saturating at `u32::MAX` (the contract's field width).
pub(crate) fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// A computation's duration as the `compute_ms` a write carries: whole milliseconds, at least
/// 1, since 0 means "unknown" to XFetch and a computation always takes some time.
pub(crate) fn compute_ms(took: Duration) -> u32 {
    millis_u32(took).max(1)
}

/// How long a caller waiting for another's lease may keep looking: the lease's lifetime plus
/// one lookup deadline, stretched when the service reports a new holder (one that took an
/// expired lease over: it gets its own lease's time, so the other waiters do not all give up
/// and compute), but never past two lifetimes plus the deadline. By then a holder has
/// written, given the lease up, or lost it by expiry, so waiting longer only means something
/// is wrong: the caller computes itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitBudget {
    until: Instant,
    deadline: Duration,
    /// The most it may be stretched to.
    cap: Instant,
}

impl WaitBudget {
    /// A budget of `lifetime` + `deadline` from `started`.
    pub(crate) fn new(started: Instant, lifetime: Duration, deadline: Duration) -> Self {
        WaitBudget {
            until: started + lifetime + deadline,
            deadline,
            cap: started + lifetime * 2 + deadline,
        }
    }

    /// The service said at `now` that the holder's lease has `left` to run: wait for it (and
    /// one deadline more), within the cap.
    pub(crate) fn holder_has(&mut self, left: Duration, now: Instant) {
        self.until = self.until.max((now + left + self.deadline).min(self.cap));
    }

    /// How long to sleep before the next lookup, when the service asked for `retry_after_ms`
    /// and it is `now`: the ask stretched by a random fraction up to [`JITTER`] (so waiters
    /// do not come back in step), at least [`MIN_RETRY`], and cut to what is left of the
    /// budget. `None` once the
    /// budget is spent: stop waiting.
    pub(crate) fn next_sleep(&self, retry_after_ms: u32, now: Instant) -> Option<Duration> {
        let left = self
            .until
            .checked_duration_since(now)
            .filter(|left| !left.is_zero())?;
        let asked = Duration::from_millis(retry_after_ms.into()).max(MIN_RETRY);
        let stretched = asked.mul_f64(1.0 + fastrand::f64() * JITTER);
        Some(stretched.min(left))
    }
}

/// A won lease, given back (`Release`) when dropped armed: the computation failed, panicked
/// or its caller was cancelled, so the next lookup anywhere wins the lease at once instead of
/// waiting for it to expire. Dropping spawns the `Release` (fail-open, bounded by the client's
/// deadline) on the current tokio runtime, so a panicking or cancelled caller is not held up;
/// outside a runtime the lease simply expires. [`LeaseGuard::disarm`] once the lease was
/// written with or released.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    armed: Option<(Client, pb::Key, u64)>,
}

impl LeaseGuard {
    /// Guards lease `token` of `key`.
    pub(crate) fn new(client: &Client, key: pb::Key, token: u64) -> Self {
        LeaseGuard {
            armed: Some((client.clone(), key, token)),
        }
    }

    /// The lease is spoken for (written with, or released): nothing to do when dropped.
    pub(crate) fn disarm(&mut self) {
        self.armed = None;
    }

    /// Gives the lease up now and waits for the answer (at most the client's deadline).
    pub(crate) async fn release(mut self) {
        if let Some((client, key, token)) = self.armed.take() {
            client.release_lease(key, token).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some((client, key, token)) = self.armed.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { client.release_lease(key, token).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> pb::Key {
        pb::Key {
            namespace: "ns".into(),
            function: "f".into(),
            digest: "0".repeat(32),
        }
    }

    /// Stale-if-error is written in whole seconds rounded up, and kept within the maximum TTL.
    #[test]
    fn stale_seconds_round_up_and_fit_the_maximum() {
        let policy = |stale_ms: u64| LeasePolicy {
            stale_if_error: Duration::from_millis(stale_ms),
            ..LeasePolicy::default()
        };
        let ttl = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(policy(0).stale_seconds(ttl, max), 0);
        assert_eq!(policy(1).stale_seconds(ttl, max), 1);
        assert_eq!(policy(1000).stale_seconds(ttl, max), 1);
        assert_eq!(policy(1001).stale_seconds(ttl, max), 2);
        assert_eq!(policy(10_000_000).stale_seconds(ttl, max), 3540);
        assert_eq!(policy(5000).stale_seconds(max, max), 0);
    }

    /// A computation's time is sent in milliseconds, never as 0.
    #[test]
    fn compute_ms_is_at_least_one() {
        assert_eq!(compute_ms(Duration::ZERO), 1);
        assert_eq!(compute_ms(Duration::from_micros(900)), 1);
        assert_eq!(compute_ms(Duration::from_millis(250)), 250);
        assert_eq!(compute_ms(Duration::from_secs(u64::MAX / 4)), u32::MAX);
    }

    /// Without a lease the lookup is a plain Get: no revalidation or stale value is asked
    /// for; with one, every option travels.
    #[test]
    fn lookups_ask_for_options_only_with_a_lease() {
        let policy = LeasePolicy {
            lease: None,
            refresh_after: Duration::from_millis(300),
            beta: 1.0,
            stale_if_error: Duration::from_secs(60),
        };
        let off = policy.get_request(key(), Duration::ZERO, &[]);
        assert_eq!(
            (
                off.lease_ms,
                off.refresh_after_ms,
                off.beta,
                off.allow_stale
            ),
            (0, 0, 0.0, false)
        );
        let on = policy.get_request(key(), policy.lifetime(DEFAULT_LEASE), &[]);
        assert_eq!(
            (on.lease_ms, on.refresh_after_ms, on.beta, on.allow_stale),
            (5000, 300, 1.0, true)
        );
        let own = LeasePolicy {
            lease: Some(Duration::from_millis(1500)),
            ..LeasePolicy::default()
        };
        assert_eq!(own.lifetime(DEFAULT_LEASE), Duration::from_millis(1500));
        assert!(
            !own.get_request(key(), Duration::from_secs(1), &[])
                .allow_stale
        );
    }

    /// Waiting sleeps what the service asks, stretched by at most a quarter, never less than
    /// a millisecond, never past the budget, and not at all once it is spent.
    #[test]
    fn waiting_is_jittered_and_bounded() {
        let start = Instant::now();
        let budget = WaitBudget::new(start, Duration::from_secs(1), Duration::from_millis(100));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let sleep = budget.next_sleep(20, start).expect("budget left");
            assert!(
                (Duration::from_millis(20)..=Duration::from_millis(25)).contains(&sleep),
                "{sleep:?}"
            );
            seen.insert(sleep);
        }
        assert!(seen.len() > 10, "no jitter: {seen:?}");
        assert!(budget.next_sleep(0, start).unwrap() >= MIN_RETRY);
        let near_end = start + Duration::from_millis(1095);
        assert!(budget.next_sleep(20, near_end).unwrap() <= Duration::from_millis(5));
        assert_eq!(
            budget.next_sleep(20, start + Duration::from_millis(1100)),
            None
        );
        assert_eq!(budget.next_sleep(20, start + Duration::from_secs(5)), None);
    }

    /// A guard dropped armed inside a runtime sends Release (seen as an RPC attempt, to an
    /// address nobody serves); a disarmed one sends nothing.
    #[tokio::test]
    async fn an_armed_guard_releases_when_dropped() {
        let cm = Client::connect("http://127.0.0.1:1").await.unwrap();
        let mut disarmed = LeaseGuard::new(&cm, key(), 7);
        disarmed.disarm();
        drop(disarmed);
        tokio::task::yield_now().await;
        assert_eq!(cm.metrics().rpc_attempts, 0, "a disarmed guard released");
        drop(LeaseGuard::new(&cm, key(), 7));
        let released = async {
            while cm.metrics().rpc_attempts == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), released)
            .await
            .expect("the dropped guard sent Release");
    }
}
