//! Busy polling for a Redis reply: while a command waits for Redis alone, the server keeps
//! checking its sockets for up to a budget instead of going to sleep at once.
//!
//! At low load the server's thread has nothing else to do while its one command is in flight,
//! so it sleeps in `epoll_wait` and the reply has to wake it. On a VM that wake-up is dear (a
//! halted vCPU is woken by an interrupt through the hypervisor): measured on the Intel Xeon
//! KVM of BENCHMARKS.md, busy polling took the server's Redis hop from ≈ 35 to ≈ 25 µs and a
//! one-caller Get from ≈ 95 to ≈ 75 µs, at no more CPU per Get (the sleep and wake-up cost
//! the thread about what the polling does). It is Linux's `SO_BUSY_POLL`, done by the
//! server: bounded per command, and only where it pays:
//!
//! - only while the command is the one operation in flight, and the one before it was too:
//!   under concurrent load the thread has other work and does not sleep anyway;
//! - only while Redis has recently answered within the budget (a running average of the
//!   commands' times), so a Redis across a network, whose replies would never arrive within
//!   the poll, costs no polling at all;
//! - each round yields to the runtime, which checks every socket and timer (`epoll_wait` with
//!   no wait) and runs whatever became ready, so other requests, the store timeout and
//!   shutdown go on as before.
//!
//! `--redis-busy-poll-us 0` turns it off.

use std::{
    future::Future,
    pin::pin,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    task::Poll,
    time::Duration,
};

use tokio::time::Instant;

/// The budget, and what decides whether a command is polled for.
#[derive(Debug)]
pub(crate) struct BusyPoll {
    budget: Duration,
    /// Whether the last command started as the only operation in flight.
    alone: AtomicBool,
    /// A running average of the commands' times, µs (each new time weighs 1/8).
    recent_us: AtomicU64,
}

impl BusyPoll {
    /// Polling for up to `budget` per command; `Duration::ZERO` never polls.
    pub(crate) fn new(budget: Duration) -> Self {
        BusyPoll {
            budget,
            alone: AtomicBool::new(false),
            recent_us: AtomicU64::new(0),
        }
    }

    /// Runs `command`, started at `started` with `in_flight` operations then running (its
    /// own included), polling for it within the budget when it is worth it. `in_flight` is
    /// asked again each round: a second operation ends the polling.
    pub(crate) async fn run<F: Future>(
        &self,
        started: Instant,
        in_flight: impl Fn() -> u64,
        command: F,
    ) -> F::Output {
        let alone = in_flight() == 1;
        let was_alone = self.alone.swap(alone, Relaxed);
        let worth_it = alone
            && was_alone
            && !self.budget.is_zero()
            && self.recent_us.load(Relaxed) <= self.budget.as_micros() as u64;
        if !worth_it {
            return command.await;
        }
        let until = started + self.budget;
        let mut command = pin!(command);
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(command.as_mut().poll(cx))).await;
            if let Poll::Ready(output) = polled {
                return output;
            }
            if Instant::now() >= until || in_flight() > 1 {
                // The command's waker is registered: the reply wakes the task as usual.
                return command.await;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Records the time of a command started at `started` (nothing when polling is off).
    pub(crate) fn finished(&self, started: Instant) {
        if !self.budget.is_zero() {
            self.record(started.elapsed());
        }
    }

    /// Records a command's time, `took`, in the running average.
    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let recent = self.recent_us.load(Relaxed);
        self.recent_us
            .store(recent - recent / 8 + took / 8, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// `replied`, counting its polls in `polls` and noting when it last answered pending.
    fn counted<'a>(
        mut replied: tokio::sync::oneshot::Receiver<&'static str>,
        polls: &'a Mutex<(usize, Option<Instant>)>,
    ) -> impl Future<Output = &'static str> + 'a {
        std::future::poll_fn(move |cx| {
            let polled = std::pin::Pin::new(&mut replied).poll(cx);
            let mut polls = polls.lock().unwrap();
            polls.0 += 1;
            if polled.is_pending() {
                polls.1 = Some(Instant::now());
            }
            polled.map(Result::unwrap)
        })
    }

    #[tokio::test]
    async fn a_lone_command_is_polled_for_and_others_keep_running() {
        let poll = BusyPoll::new(Duration::from_secs(5));
        poll.alone.store(true, Relaxed);
        // The reply comes from another task on this one thread: it arrives only if polling
        // yields to the runtime (a poll that spun without yielding would never see it).
        let (reply, replied) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { reply.send("reply").unwrap() });
        let polls = Mutex::new((0, None));
        let started = Instant::now();
        assert_eq!(
            poll.run(started, || 1, counted(replied, &polls)).await,
            "reply"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited out the budget: {:?}",
            started.elapsed()
        );
        // Polled, then polled again after one yield: the second poll found the reply (the
        // task was not woken in between: only the polling looked again).
        assert_eq!(polls.lock().unwrap().0, 2);
    }

    #[tokio::test]
    async fn polling_stops_at_the_budget_and_the_command_still_completes() {
        let poll = BusyPoll::new(Duration::from_millis(20));
        poll.alone.store(true, Relaxed);
        let (reply, replied) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            reply.send("late").unwrap()
        });
        let polls = Mutex::new((0, None));
        let started = Instant::now();
        assert_eq!(
            poll.run(started, || 1, counted(replied, &polls)).await,
            "late"
        );
        let (rounds, last_pending) = *polls.lock().unwrap();
        assert!(rounds > 2, "not polled for: {rounds} polls");
        // The last pending poll came at the budget (20 ms), not just before the reply
        // (300 ms): from then on the task slept until the reply woke it.
        let last_pending = last_pending.unwrap() - started;
        assert!(
            last_pending < Duration::from_millis(150),
            "polled until {last_pending:?}"
        );
    }

    #[tokio::test]
    async fn a_second_operation_ends_the_polling() {
        let poll = BusyPoll::new(Duration::from_secs(5));
        poll.alone.store(true, Relaxed);
        let (reply, replied) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply.send("reply").unwrap()
        });
        // Alone when the command starts and at the first round; another operation from then.
        let asked = std::sync::atomic::AtomicU64::new(0);
        let in_flight = || 1 + u64::from(asked.fetch_add(1, Relaxed) >= 2);
        let polls = Mutex::new((0, None));
        let started = Instant::now();
        assert_eq!(
            poll.run(started, in_flight, counted(replied, &polls)).await,
            "reply"
        );
        // Polled at the start, after one round, once more as the polling ends (awaited from
        // then on), and when the reply woke it: not the thousands of rounds of 100 ms.
        assert_eq!(polls.lock().unwrap().0, 4);
    }

    #[tokio::test]
    async fn busy_or_far_or_off_is_not_polled_for() {
        // Each case: (what, budget, the last command alone, operations in flight, the time
        // Redis has been taking).
        let cases = [
            (
                "another operation in flight",
                Duration::from_secs(1),
                true,
                2,
                None,
            ),
            (
                "the last command was not alone",
                Duration::from_secs(1),
                false,
                1,
                None,
            ),
            ("turned off", Duration::ZERO, true, 1, None),
            (
                "Redis answers slower than the budget",
                Duration::from_secs(1),
                true,
                1,
                Some(2),
            ),
        ];
        for (case, budget, was_alone, in_flight, redis_seconds) in cases {
            let poll = BusyPoll::new(budget);
            poll.alone.store(was_alone, Relaxed);
            for _ in 0..redis_seconds.map_or(0, |_| 32) {
                poll.record(Duration::from_secs(redis_seconds.unwrap_or(0)));
            }
            let (reply, replied) = tokio::sync::oneshot::channel();
            let polls = Mutex::new((0, None));
            let run = poll.run(Instant::now(), || in_flight, counted(replied, &polls));
            // Nothing replies within 50 ms: a command not polled for is polled once and
            // sleeps; one polled for would be polled again and again. (The sleep is checked
            // first, so the command is not polled again when it ends.)
            tokio::select! {
                biased;
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = run => panic!("{case}: answered without a reply"),
            }
            assert_eq!(polls.lock().unwrap().0, 1, "{case}: polled for");
            drop(reply);
        }
    }

    #[test]
    fn the_average_follows_the_commands() {
        let poll = BusyPoll::new(Duration::from_micros(50));
        for _ in 0..64 {
            poll.record(Duration::from_micros(400));
        }
        let far = poll.recent_us.load(Relaxed);
        assert!((390..=400).contains(&far), "{far}");
        for _ in 0..64 {
            poll.record(Duration::from_micros(20));
        }
        let near = poll.recent_us.load(Relaxed);
        assert!(near <= 25, "{near}");
    }
}
