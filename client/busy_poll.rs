//! Busy polling for a reply: while a request waits for its reply alone, the thread keeps
//! checking its sockets for up to a budget instead of going to sleep at once. The server
//! polls for Redis's reply (`--redis-busy-poll-us`), the client for a Get's reply from the
//! service ([`ClientOptions::busy_poll`](crate::ClientOptions::busy_poll)).
//!
//! At low load the thread has nothing else to do while its one request is in flight, so it
//! sleeps in `epoll_wait` and the reply has to wake it. On a VM that wake-up is dear (a halted
//! vCPU is woken through the hypervisor): on the Intel Xeon KVM of BENCHMARKS.md ("Busy
//! polling for the Redis reply"), the server's polling took 6–8 µs off its Redis hop and
//! 8–15 % off its one-caller Get, for the same to 16 % more CPU per Get (the sleep and the
//! wake-up cost the thread about what the polling does); on the AMD EPYC KVM of "The client
//! polls for its reply", the client's polling took a memoize hit from 95–99 to 60–61 µs. It is
//! Linux's `SO_BUSY_POLL`, done in the process: bounded per request, and only where it pays:
//!
//! - only while the request is the one operation in flight, and the request that started
//!   before it was too: under concurrent load the thread has other work and does not sleep
//!   anyway, and a second operation arriving ends the polling;
//! - only while the requests have lately taken no longer than the budget (a running average
//!   of their times), so a peer across a network, whose replies would never arrive within the
//!   poll, costs no polling at all (nor does one whose requests are often slow, which is the
//!   price of a simple rule);
//! - each round yields to the runtime, which runs whatever else is ready and then, with
//!   nothing left, checks every socket and timer without sleeping (`epoll_wait` with a zero
//!   timeout), so other tasks, timeouts and shutdown go on as before.
//!
//! Only on the single-thread runtime ([`on_current_thread_runtime`]), from the thread that
//! runs it: on tokio's multi-thread one an idle worker sleeping in `epoll_wait` holds the I/O
//! driver, and a connection's socket belongs to the runtime that opened it, so a polling
//! thread other than the driver's would see the reply only once that thread had been woken
//! for it: no wake-up saved, only CPU spent. (The client knows that thread as the one its
//! connection was opened from; a current-thread runtime moved to another thread, or entered
//! with `block_on` from several, defeats that, costing at most the budget per request or
//! missing a saving.) While a caller sends requests one after another,
//! its thread is busy through each round trip instead of asleep: a CPU quota sees that. A
//! budget of zero turns it off.
//!
//! Every request's time counts in the average, also a request its caller gave up on (a
//! timeout: a slow peer is one not worth polling for); one dropped early for another reason
//! (a `select!` that took another branch) pulls the average down instead.

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
    /// Whether the last command to start was then the only operation in flight.
    alone: AtomicBool,
    /// A running average of the operations' times, ns (each new time weighs 1/8). Updates
    /// from two threads at once may lose one: an average, not an account.
    recent_ns: AtomicU64,
    /// Replies seen while polling, since it was made.
    caught: AtomicU64,
}

impl BusyPoll {
    /// Polling for up to `budget` per command; `Duration::ZERO` never polls.
    pub(crate) fn new(budget: Duration) -> Self {
        BusyPoll {
            budget,
            alone: AtomicBool::new(false),
            recent_ns: AtomicU64::new(0),
            caught: AtomicU64::new(0),
        }
    }

    /// Whether it ever polls: a budget above zero.
    pub(crate) fn is_on(&self) -> bool {
        !self.budget.is_zero()
    }

    /// Runs `command`, started at `started`, with `in_flight` operations running (its own
    /// included), polling for it within the budget when it is worth it, and times it from
    /// `started` into the average that decides that ([`BusyPoll::timing`]; a caller that has
    /// read the clock already passes its reading). `in_flight` is asked again each round: a
    /// second operation ends the polling.
    pub(crate) async fn run<F: Future>(
        &self,
        started: Instant,
        in_flight: impl Fn() -> u64,
        command: F,
    ) -> F::Output {
        if !self.is_on() {
            // Off: not even the shared flag is touched.
            return command.await;
        }
        let _timing = self.timing(started);
        let alone = in_flight() == 1;
        let was_alone = self.alone.swap(alone, Relaxed);
        let worth_it = alone
            && was_alone
            && u128::from(self.recent_ns.load(Relaxed)) <= self.budget.as_nanos();
        if !worth_it {
            return command.await;
        }
        // The wall clock, not tokio's: under a paused test clock tokio's would never reach
        // `until` while the polling keeps the runtime busy.
        let until = std::time::Instant::now() + self.budget;
        let mut command = pin!(command);
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(command.as_mut().poll(cx))).await;
            if let Poll::Ready(output) = polled {
                self.caught.fetch_add(1, Relaxed);
                return output;
            }
            if std::time::Instant::now() >= until || in_flight() > 1 {
                // Awaited from here, as any command: the reply wakes the task. (The await
                // polls it once more first, needlessly but harmlessly.)
                return command.await;
            }
            tokio::task::yield_now().await;
        }
    }

    /// How many replies were seen while polling (rather than waking their caller).
    pub(crate) fn caught(&self) -> u64 {
        self.caught.load(Relaxed)
    }

    /// Times an operation started at `started` into the running average when the returned
    /// guard is dropped: when it finishes, or when its caller gives up on it (a slow
    /// operation counts whether or not anyone waited for it). Nothing when polling is off.
    fn timing(&self, started: Instant) -> Timing<'_> {
        Timing {
            poll: self.is_on().then_some(self),
            started,
        }
    }

    /// Records an operation's time, `took`, in the running average; the first one recorded
    /// is the average (a peer slower than the budget is not polled for while an average
    /// starting from zero climbs to its time).
    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let recent = self.recent_ns.load(Relaxed);
        let average = match recent {
            0 => took,
            _ => recent - recent / 8 + took / 8,
        };
        self.recent_ns.store(average, Relaxed);
    }
}

/// A number for the calling thread, unique in the process and never 0.
pub(crate) fn thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static NUMBER: u64 = NEXT.fetch_add(1, Relaxed));
    NUMBER.with(|number| *number)
}

/// Whether the task asking runs on a tokio current-thread runtime, the only kind polling
/// works on (see the module's docs).
pub(crate) fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
    })
}

/// Records an operation's time when dropped (see [`BusyPoll::timing`]).
#[derive(Debug)]
pub(crate) struct Timing<'a> {
    poll: Option<&'a BusyPoll>,
    started: Instant,
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if let Some(poll) = self.poll {
            poll.record(self.started.elapsed());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, atomic::AtomicUsize};

    /// A command answered `reply` after `delay` by another task (its answer wakes the
    /// command), counting its polls in `polls` and noting when it last answered pending.
    fn counted<'a>(
        delay: Duration,
        reply: &'static str,
        polls: &'a Mutex<(usize, Option<Instant>)>,
    ) -> impl Future<Output = &'static str> + 'a {
        let (answer, mut replied) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            answer.send(reply).unwrap()
        });
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

    /// A command ready once `answered` is set, which wakes nobody: only polling sees it.
    /// (The gate's own test uses it too.)
    pub(crate) fn seen_only_by_polling<'a>(
        answered: &'a AtomicBool,
        polls: &'a AtomicUsize,
    ) -> impl Future<Output = &'static str> + 'a {
        std::future::poll_fn(move |_| {
            polls.fetch_add(1, Relaxed);
            if answered.load(Relaxed) {
                Poll::Ready("reply")
            } else {
                Poll::Pending
            }
        })
    }

    #[tokio::test]
    async fn a_lone_command_is_polled_for_and_others_keep_running() {
        let poll = BusyPoll::new(Duration::from_secs(5));
        poll.alone.store(true, Relaxed);
        // The answer comes from another task on this one thread: it arrives only if polling
        // yields to the runtime; and as it wakes nobody, it is seen only by polling.
        let answered = std::sync::Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let answered = answered.clone();
            async move { answered.store(true, Relaxed) }
        });
        let polls = AtomicUsize::new(0);
        tokio::select! {
            reply = poll.run(Instant::now(), || 1, seen_only_by_polling(&answered, &polls)) => {
                assert_eq!(reply, "reply");
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => panic!("not polled for"),
        }
        // Polled, then polled again after one yield, which let the other task answer.
        assert_eq!(polls.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn polling_stops_at_the_budget_and_the_command_still_completes() {
        let poll = BusyPoll::new(Duration::from_millis(20));
        poll.alone.store(true, Relaxed);
        let polls = Mutex::new((0, None));
        let started = Instant::now();
        let command = counted(Duration::from_millis(300), "late", &polls);
        assert_eq!(poll.run(started, || 1, command).await, "late");
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
        // Alone when the command starts and at the first round; another operation from then.
        let asked = AtomicU64::new(0);
        let in_flight = || 1 + u64::from(asked.fetch_add(1, Relaxed) >= 2);
        let polls = Mutex::new((0, None));
        let command = counted(Duration::from_millis(100), "reply", &polls);
        assert_eq!(poll.run(Instant::now(), in_flight, command).await, "reply");
        // Polled at the start, after one round, once more as the polling ends (awaited from
        // then on), and when the reply woke it: not the thousands of rounds of 100 ms.
        assert_eq!(polls.lock().unwrap().0, 4);
    }

    #[tokio::test]
    async fn busy_or_far_or_off_is_not_polled_for() {
        // Each case: (what, budget, the last command alone, operations in flight, the time
        // operations have been taking).
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
                "the peer answers slower than the budget",
                Duration::from_secs(1),
                true,
                1,
                Some(2),
            ),
        ];
        for (case, budget, was_alone, in_flight, seconds) in cases {
            let poll = BusyPoll::new(budget);
            poll.alone.store(was_alone, Relaxed);
            // One operation's time is enough: the first sets the average.
            if let Some(seconds) = seconds {
                poll.record(Duration::from_secs(seconds));
            }
            // Never answered: a command not polled for is polled once and sleeps; one polled
            // for would be polled again and again. (The sleep is checked first, so the
            // command is not polled again when it ends.)
            let (answered, polls) = (AtomicBool::new(false), AtomicUsize::new(0));
            tokio::select! {
                biased;
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = poll.run(Instant::now(), || in_flight, seen_only_by_polling(&answered, &polls)) => {
                    unreachable!("never answered")
                }
            }
            assert_eq!(polls.load(Relaxed), 1, "{case}: polled for");
        }
    }

    #[test]
    fn the_average_follows_the_operations_and_their_guards() {
        let poll = BusyPoll::new(Duration::from_micros(50));
        // The first time recorded is the average: not an eighth of it.
        poll.record(Duration::from_micros(400));
        assert_eq!(poll.recent_ns.load(Relaxed), 400_000);
        for _ in 0..64 {
            poll.record(Duration::from_micros(400));
        }
        let far = poll.recent_ns.load(Relaxed);
        assert_eq!(far, 400_000);
        for _ in 0..64 {
            poll.record(Duration::from_micros(49));
        }
        // Back under the budget: truncation leaves at most a few ns of bias.
        let near = poll.recent_ns.load(Relaxed);
        assert!((49_000..50_000).contains(&near), "{near}");
        // A guard records when dropped, however its operation ended.
        let before = poll.recent_ns.load(Relaxed);
        drop(poll.timing(Instant::now() - Duration::from_secs(1)));
        assert!(poll.recent_ns.load(Relaxed) > before + 100_000_000);
        // Off: nothing is recorded.
        let off = BusyPoll::new(Duration::ZERO);
        drop(off.timing(Instant::now() - Duration::from_secs(1)));
        assert_eq!(off.recent_ns.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn run_times_its_command_from_its_start_finished_or_dropped() {
        let second_ago = || Instant::now() - Duration::from_secs(1);
        let at_least_a_second = |poll: &BusyPoll| poll.recent_ns.load(Relaxed) >= 1_000_000_000;
        // Finished: recorded from the start given, not from the call.
        let poll = BusyPoll::new(Duration::from_micros(50));
        assert_eq!(
            poll.run(second_ago(), || 1, async { "reply" }).await,
            "reply"
        );
        assert!(at_least_a_second(&poll), "{}", poll.recent_ns.load(Relaxed));
        // Given up on (dropped unanswered): recorded all the same.
        let poll = BusyPoll::new(Duration::from_micros(50));
        tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = poll.run(second_ago(), || 1, std::future::pending::<()>()) => unreachable!(),
        }
        assert!(at_least_a_second(&poll), "{}", poll.recent_ns.load(Relaxed));
        // Off: nothing recorded.
        let off = BusyPoll::new(Duration::ZERO);
        assert_eq!(
            off.run(second_ago(), || 1, async { "reply" }).await,
            "reply"
        );
        assert_eq!(off.recent_ns.load(Relaxed), 0);
    }
}
