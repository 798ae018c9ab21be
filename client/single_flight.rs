//! Single-flight: concurrent callers of one key in this process share one computation.
//!
//! A caller [joins](SingleFlight::join) the flight of its key and gets a [`Flight`]; the first
//! to ask for the result leads (runs the work), the others wait for its result. The table
//! counts the callers of each flight, and a [`Flight`] leaves it when dropped, whether its
//! caller finished, was cancelled or panicked, so an entry lives exactly as long as someone
//! is in it (or until its result is known) and the table never keeps dead flights.
//!
//! A leader that is cancelled or panics leaves no result: the next waiter leads in its place
//! (tokio's `OnceCell` hands the initialization on), and a caller arriving later starts anew.
//!
//! # Why not a crate
//! `async_singleflight` (0.6) is the maintained candidate, but it has the defect this module
//! exists to avoid: its leader removes the table entry only after its work completes, so a
//! lone leader that is cancelled leaves its entry behind until the key is asked for again,
//! and one cancelled between finishing and that removal (an async lock) leaves a finished
//! entry that answers every later call with the old result, past the cache and its busts. It
//! also hands every caller one `T: Clone`, where `memoize`'s leader keeps its own typed result
//! and the others get the encoded bytes, and adds `pin-project` and `thiserror`. Counting the
//! callers over tokio's `OnceCell` takes the few lines below.

use std::{
    collections::HashMap,
    fmt,
    future::{Future, poll_fn},
    hash::Hash,
    pin::pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
};

use quick_cache::DefaultHashBuilder;
use tokio::sync::OnceCell;

use crate::lock;

/// One key's flight in the table: the result its callers share, and how many callers are in
/// it.
struct Entry<V> {
    result: Arc<OnceCell<V>>,
    callers: usize,
    claim: Claim,
}

/// A flight's claim on its key: lost when a newer flight ([`SingleFlight::lead`]) replaces
/// it, so its leader knows a newer result is on its way and does not store its own over it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Claim(Arc<AtomicBool>);

impl Claim {
    /// Whether no newer flight of the key has started since this one.
    pub(crate) fn is_current(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }

    fn lose(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The flights under way, by key. Shared by every clone of a client.
///
/// Hashed with foldhash (quick_cache's `DefaultHashBuilder`, as the near cache's maps are)
/// rather than the standard SipHash: every memoize call hashes its key three times here (join,
/// then leave's lookup and removal); foldhash took 1.2 % off a remote hit's client
/// instructions (BENCHMARKS.md, "Instructions per request").
pub(crate) struct SingleFlight<K, V> {
    table: Mutex<HashMap<K, Entry<V>, DefaultHashBuilder>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            table: Mutex::new(HashMap::default()),
        }
    }
}

impl<K, V> fmt::Debug for SingleFlight<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("flights", &lock(&self.table).len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone, V> SingleFlight<K, V> {
    /// Joins the flight of `key`, starting one if none is under way.
    pub(crate) fn join<'a>(&'a self, key: &'a K) -> Flight<'a, K, V> {
        let mut table = lock(&self.table);
        let entry = table.entry(key.clone()).or_insert_with(|| Entry {
            result: Arc::default(),
            callers: 0,
            claim: Claim::default(),
        });
        entry.callers += 1;
        Flight {
            group: self,
            key,
            result: entry.result.clone(),
            claim: entry.claim.clone(),
        }
    }

    /// Runs `work` as the leader of a new flight of `key`: callers that join `key` while it
    /// runs wait for its result, while a flight already under way goes on for its own callers
    /// (a refresh must not hand out, or wait for, a result computed before it started) and
    /// loses its [`Claim`], as does an older `lead` of the key. `work` gets the new flight's
    /// claim, to check before it stores.
    ///
    /// The new flight is claimed before it is published: `work` starts (its cell's permit
    /// taken) before the table can hand the flight to anyone, so no joiner can lead it in
    /// `work`'s place, even on another thread.
    pub(crate) async fn lead<F, Fut>(&self, key: &K, work: F)
    where
        F: FnOnce(Claim) -> Fut,
        Fut: Future<Output = V>,
    {
        let claim = Claim::default();
        let result: Arc<OnceCell<V>> = Arc::default();
        let for_work = claim.clone();
        let mut init = pin!(result.get_or_init(|| work(for_work)));
        let finished = poll_fn(|cx| Poll::Ready(init.as_mut().poll(cx).is_ready())).await;
        // Published even when `work` is already done, so the flight it replaces loses its
        // claim; then dropped at once, which forgets the finished flight.
        let _flight = self.publish(key, result.clone(), claim);
        if !finished {
            init.await;
        }
    }

    /// Makes `result` the flight of `key` for callers who join from now on, with its leader
    /// as its one caller; the flight it replaces loses its claim.
    fn publish<'a>(
        &'a self,
        key: &'a K,
        result: Arc<OnceCell<V>>,
        claim: Claim,
    ) -> Flight<'a, K, V> {
        let entry = Entry {
            result: result.clone(),
            callers: 1,
            claim: claim.clone(),
        };
        if let Some(replaced) = lock(&self.table).insert(key.clone(), entry) {
            replaced.claim.lose();
        }
        Flight {
            group: self,
            key,
            result,
            claim,
        }
    }

    /// Takes one caller out of a flight. The flight is forgotten once it has a result (later
    /// callers start a new one, which finds the result in the cache) or when its last caller
    /// leaves.
    fn leave(&self, key: &K, result: &Arc<OnceCell<V>>) {
        let mut table = lock(&self.table);
        let Some(entry) = table.get_mut(key) else {
            return;
        };
        // A newer flight of the same key, started after this one was forgotten.
        if !Arc::ptr_eq(&entry.result, result) {
            return;
        }
        entry.callers -= 1;
        if entry.callers == 0 || result.initialized() {
            table.remove(key);
        }
    }

    /// How many flights are under way.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.table).len()
    }
}

/// One caller's place in a flight; leaves the flight when dropped.
pub(crate) struct Flight<'a, K: Hash + Eq + Clone, V> {
    group: &'a SingleFlight<K, V>,
    key: &'a K,
    result: Arc<OnceCell<V>>,
    claim: Claim,
}

impl<K: Hash + Eq + Clone, V> Flight<'_, K, V> {
    /// The flight's result: runs `lead` when nobody has the result or is computing it, else
    /// waits for the caller who is. A leader that is cancelled or panics leaves the lead to
    /// the next waiter.
    pub(crate) async fn get_or_lead<F, Fut>(&self, lead: F) -> &V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        self.result.get_or_init(lead).await
    }

    /// Whether no [`SingleFlight::lead`] of the key has started since this flight did.
    pub(crate) fn is_current(&self) -> bool {
        self.claim.is_current()
    }
}

impl<K: Hash + Eq + Clone, V> Drop for Flight<'_, K, V> {
    fn drop(&mut self) {
        self.group.leave(self.key, &self.result);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::pin,
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
        task::{Context, Poll, Waker},
    };

    use tokio::sync::oneshot;

    use super::*;

    const KEY: &str = "key";

    type Flights = SingleFlight<&'static str, u32>;

    /// Polls a future once, as an executor would before it is cancelled or woken.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A lone leader dropped mid-computation leaves no entry, and the next caller leads.
    #[tokio::test]
    async fn cancelled_leader_leaves_no_entry() {
        let flights = Flights::default();
        {
            let mut leader = pin!(async {
                let flight = flights.join(&KEY);
                *flight.get_or_lead(std::future::pending).await
            });
            assert!(poll_once(leader.as_mut()).is_pending());
            assert_eq!(flights.len(), 1, "the leader is in flight");
        }
        assert_eq!(flights.len(), 0, "the cancelled leader's entry stayed");

        let flight = flights.join(&KEY);
        let led = AtomicUsize::new(0);
        let result = *flight
            .get_or_lead(|| async {
                led.fetch_add(1, SeqCst);
                7
            })
            .await;
        assert_eq!((result, led.load(SeqCst)), (7, 1), "the next caller led");
        drop(flight);
        assert_eq!(flights.len(), 0);
    }

    /// A lone leader whose task panics leaves no entry behind.
    #[tokio::test]
    async fn panicking_lone_leader_leaves_no_entry() {
        let flights = Arc::new(Flights::default());
        let leader = tokio::spawn({
            let flights = flights.clone();
            async move {
                let flight = flights.join(&KEY);
                *flight
                    .get_or_lead(|| async { panic!("the leader's computation panicked") })
                    .await
            }
        });
        assert!(leader.await.unwrap_err().is_panic());
        assert_eq!(flights.len(), 0, "the panicked leader's entry stayed");
    }

    /// When the leader's task panics, a caller waiting for it leads instead and gets its own
    /// result; then the table is empty.
    #[tokio::test]
    async fn waiter_leads_when_the_leader_panics() {
        let flights = Arc::new(Flights::default());
        let (started, leader_started) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let leader = tokio::spawn({
            let flights = flights.clone();
            async move {
                let flight = flights.join(&KEY);
                *flight
                    .get_or_lead(|| async {
                        started.send(()).unwrap();
                        released.await.unwrap();
                        panic!("the leader's computation panicked")
                    })
                    .await
            }
        });
        leader_started.await.unwrap();

        let waiter = flights.join(&KEY);
        let mut waiting = Box::pin(waiter.get_or_lead(|| async { 8 }));
        assert!(
            poll_once(waiting.as_mut()).is_pending(),
            "the waiter waits for the leader"
        );
        release.send(()).unwrap();
        assert!(leader.await.unwrap_err().is_panic());
        assert_eq!(*waiting.await, 8, "the waiter led after the panic");
        drop(waiter);
        assert_eq!(flights.len(), 0);
    }

    /// Callers in one flight run the work once and all get its result; then the table is
    /// empty.
    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        const CALLERS: usize = 50;
        let flights = Flights::default();
        let runs = AtomicUsize::new(0);
        let (release, released) = oneshot::channel::<()>();
        let released = std::sync::Mutex::new(Some(released));
        let joined: Vec<_> = (0..CALLERS).map(|_| flights.join(&KEY)).collect();
        assert_eq!(flights.len(), 1, "one flight for one key");
        let mut calls: Vec<_> = joined
            .iter()
            .map(|flight| {
                Box::pin(flight.get_or_lead(|| async {
                    runs.fetch_add(1, SeqCst);
                    let released = lock(&released).take().expect("only one caller leads");
                    released.await.unwrap();
                    42
                }))
            })
            .collect();
        for call in &mut calls {
            assert!(poll_once(call.as_mut()).is_pending());
        }
        release.send(()).unwrap();
        for call in calls {
            assert_eq!(*call.await, 42);
        }
        assert_eq!(runs.load(SeqCst), 1);
        drop(joined);
        assert_eq!(flights.len(), 0);
    }

    /// A led flight takes the key over: callers joining while it runs wait for its result,
    /// the flight it replaced is no longer current, and the table is empty afterwards.
    #[tokio::test]
    async fn lead_takes_the_key_over() {
        let flights = Flights::default();
        let older = flights.join(&KEY);
        assert!(older.is_current());
        let (release, released) = oneshot::channel::<()>();
        let mut leading = Box::pin(flights.lead(&KEY, |_| async {
            released.await.unwrap();
            9
        }));
        assert!(poll_once(leading.as_mut()).is_pending());
        assert!(!older.is_current(), "the lead did not take the key over");

        let joiner = flights.join(&KEY);
        let mut joined = Box::pin(joiner.get_or_lead(|| async { 1 }));
        assert!(
            poll_once(joined.as_mut()).is_pending(),
            "the joiner led instead of waiting for the refresh"
        );
        release.send(()).unwrap();
        leading.await;
        assert_eq!(*joined.await, 9, "the joiner got the led result");
        drop((joiner, older));
        assert_eq!(flights.len(), 0);
    }

    /// A second lead of a key takes the claim of the first, which is still running; the
    /// second keeps its own.
    #[tokio::test]
    async fn a_newer_lead_takes_the_older_ones_claim() {
        let flights = Flights::default();
        let (release, released) = oneshot::channel::<()>();
        let first_claim = std::sync::Mutex::new(None);
        let mut first = Box::pin(flights.lead(&KEY, |claim| {
            *lock(&first_claim) = Some(claim);
            async {
                released.await.unwrap();
                1
            }
        }));
        assert!(poll_once(first.as_mut()).is_pending());
        let first_claim = lock(&first_claim).take().expect("the work got its claim");
        assert!(first_claim.is_current());
        let mut second_claim = None;
        flights
            .lead(&KEY, |claim| {
                second_claim = Some(claim);
                async { 2 }
            })
            .await;
        assert!(!first_claim.is_current(), "the older lead kept its claim");
        assert!(second_claim.expect("the work got its claim").is_current());
        release.send(()).unwrap();
        first.await;
        assert_eq!(flights.len(), 0);
    }

    /// Work that finishes at its first poll still ends the current flight's claim on the key,
    /// and leaves no entry.
    #[tokio::test]
    async fn lead_that_finishes_at_once_leaves_no_entry() {
        let flights = Flights::default();
        let older = flights.join(&KEY);
        flights.lead(&KEY, |_| async { 3 }).await;
        assert!(!older.is_current());
        drop(older);
        assert_eq!(flights.len(), 0);
    }

    /// A caller of a finished flight leaving late does not disturb the key's next flight.
    #[tokio::test]
    async fn late_leavers_do_not_end_a_newer_flight() {
        let flights = Flights::default();
        let first = flights.join(&KEY);
        let late = flights.join(&KEY);
        assert_eq!(*first.get_or_lead(|| async { 1 }).await, 1);
        drop(first);
        assert_eq!(flights.len(), 0, "a finished flight is forgotten");

        let next = flights.join(&KEY);
        drop(late);
        assert_eq!(flights.len(), 1, "the late leaver ended the newer flight");
        assert_eq!(*next.get_or_lead(|| async { 2 }).await, 2);
        drop(next);
        assert_eq!(flights.len(), 0);
    }
}
