//! Several replicas of the real server over one real Redis, and a client of all of them
//! (`Client::connect_many`): calls spread over the replicas, a killed or frozen replica is left
//! within the health checks' bound and given calls again once it is back, and busts reach the
//! shared store whichever replica takes them.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cache_money::{Client, ClientOptions, Function, Ttl, pb};
use common::{CacheServer, Forwarder, RedisServer, key, put};
use tonic::transport::{Channel, Endpoint};

/// Calls in a row that must all succeed before a replica counts as left: while a dead replica
/// still takes about half of the calls, 40 successes in a row come up once in 2^40 tries.
const STREAK: u32 = 40;

/// Lookups (hits and misses) a server has answered, by its own `Stats`.
async fn lookups(server: &CacheServer) -> u64 {
    let stats = server
        .client()
        .await
        .stats(pb::StatsRequest {})
        .await
        .expect("Stats")
        .into_inner();
    stats.hits + stats.misses
}

/// Two replicas over one Redis.
fn replicas(redis: &RedisServer) -> (CacheServer, CacheServer) {
    (
        CacheServer::redis(redis, &[]),
        CacheServer::redis(redis, &[]),
    )
}

/// Options that measure the transport alone: the breaker never opens, so every call goes to
/// some replica.
fn no_breaker() -> ClientOptions {
    ClientOptions {
        breaker_threshold: u32::MAX,
        ..ClientOptions::default()
    }
}

/// One `memoize` call of `f` with argument `n`, checked: it must return `n * 2` whatever
/// happens to the replicas. Returns whether it reached a replica without failing.
async fn call(cm: &Client, f: &Function, n: u64) -> bool {
    let failures = cm.metrics().rpc_failures;
    let value: u64 = f.memoize(&(n,), || async move { n * 2 }).await.unwrap();
    assert_eq!(value, n * 2, "memoize returned a wrong value");
    cm.metrics().rpc_failures == failures
}

/// Calls `f` with fresh arguments from `*n` on until [`STREAK`] calls in a row succeed;
/// returns when the last failure happened (`since` itself when none did). Fails after 30 s.
async fn until_calls_succeed(cm: &Client, f: &Function, n: &mut u64, since: Instant) -> Instant {
    let (mut streak, mut last_failure) = (0, since);
    while streak < STREAK {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "calls still fail 30 s on: {:?}",
            cm.metrics()
        );
        *n += 1;
        if call(cm, f, *n).await {
            streak += 1;
        } else {
            streak = 0;
            last_failure = Instant::now();
        }
    }
    last_failure
}

/// Calls `f` until `server` has answered more than `already` lookups; returns how long that
/// took from `since`.
async fn until_it_takes_calls(
    cm: &Client,
    f: &Function,
    n: &mut u64,
    (server, already): (&CacheServer, u64),
    since: Instant,
) -> Duration {
    loop {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the replica got no call in 30 s"
        );
        for _ in 0..20 {
            *n += 1;
            call(cm, f, *n).await;
        }
        if lookups(server).await > already {
            return since.elapsed();
        }
    }
}

/// Calls spread over both replicas: each answers at least a quarter of 200 lookups.
#[tokio::test]
async fn calls_spread_across_replicas() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis);
    let cm = Client::connect_many_with([a.url(), b.url()], no_breaker())
        .await
        .unwrap();
    let f = cm.function("replicas", "spread", Ttl::MINUTE);
    for n in 0..200 {
        call(&cm, &f, n).await;
    }
    let (on_a, on_b) = (lookups(&a).await, lookups(&b).await);
    eprintln!("200 memoize calls: {on_a} lookups on replica a, {on_b} on replica b");
    assert!(on_a + on_b <= 200, "{on_a} + {on_b}");
    assert!(on_a >= 50 && on_b >= 50, "a: {on_a}, b: {on_b}");
}

/// A client of replicas `a` and `b` without a breaker, a function handle, and the health
/// checks' bound (probe interval + timeout), returned once `b` has answered calls.
async fn client_of(a: &CacheServer, b: &CacheServer, n: &mut u64) -> (Client, Function, Duration) {
    let options = no_breaker();
    let bound = options.probe_interval + options.probe_timeout;
    let cm = Client::connect_many_with([a.url(), b.url()], options)
        .await
        .unwrap();
    let f = cm.function("replicas", "fault", Ttl::MINUTE);
    until_it_takes_calls(&cm, &f, n, (b, 0), Instant::now()).await;
    (cm, f, bound)
}

/// What happens to a replica.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL, then a restart on the same address.
    Killed,
    /// SIGSTOP (its connections stay open, nothing answers), then SIGCONT.
    Frozen,
}

/// Two replicas behind `connect_many`, replica b hit by `fault` while calls go on: `memoize`
/// keeps returning correct values, b gets no call from the health checks' bound on, and gets
/// calls again once it is back. Prints both times.
async fn left_and_rejoined(fault: Fault) {
    let redis = RedisServer::start();
    let (a, mut b) = replicas(&redis);
    let mut n = 0;
    let (cm, f, bound) = client_of(&a, &b, &mut n).await;
    let before = lookups(&b).await;

    match fault {
        Fault::Killed => b.kill(),
        Fault::Frozen => b.freeze(),
    }
    let struck = Instant::now();
    let failures = cm.metrics().rpc_failures;
    let left = until_calls_succeed(&cm, &f, &mut n, struck).await - struck;
    let failed = cm.metrics().rpc_failures - failures;
    eprintln!(
        "{fault:?} replica: last call sent to it {left:?} after the fault ({failed} calls \
         failed; bound: probe interval + timeout = {bound:?})"
    );
    assert!(
        left < bound * 3,
        "the {fault:?} replica got calls for {left:?}"
    );

    let already = match fault {
        // A new process: its counters start from zero.
        Fault::Killed => {
            b.restart();
            0
        }
        // Calls that timed out while it was frozen are answered once it thaws, and count as
        // lookups too: wait for more than they could add up to.
        Fault::Frozen => {
            b.thaw();
            before + failed
        }
    };
    let back = until_it_takes_calls(&cm, &f, &mut n, (&b, already), Instant::now()).await;
    eprintln!("{fault:?} replica: calls again {back:?} after it was back");
    assert!(
        back < bound * 3,
        "the {fault:?} replica got no call for {back:?}"
    );
}

/// A replica killed with SIGKILL is left within the health checks' bound while `memoize`
/// keeps returning correct values, and is given calls again once restarted.
#[tokio::test]
async fn a_killed_replica_is_left_and_rejoined() {
    left_and_rejoined(Fault::Killed).await;
}

/// A replica frozen with SIGSTOP is left within the health checks' bound, well before
/// keepalive (7 s) would close its connection, and is given calls again once thawed.
#[tokio::test]
async fn a_frozen_replica_is_left_and_rejoined() {
    left_and_rejoined(Fault::Frozen).await;
}

/// A replica cut off from its store answers its health check `NOT_SERVING`: the client
/// leaves it within the health checks' bound (plus the server's own store probe), though it
/// still answers calls (with UNAVAILABLE).
#[tokio::test]
async fn a_replica_cut_off_from_its_store_is_left() {
    let (redis, mut lost) = (RedisServer::start(), RedisServer::start());
    let a = CacheServer::redis(&redis, &[]);
    // Its own Redis, so that one can go while a's stays.
    let b = CacheServer::redis(&lost, &["--health-interval-ms", "100"]);
    let mut n = 0;
    let (cm, f, bound) = client_of(&a, &b, &mut n).await;

    lost.kill();
    let cut = Instant::now();
    let left = until_calls_succeed(&cm, &f, &mut n, cut).await - cut;
    eprintln!("replica without its store: last call sent to it {left:?} after (bound {bound:?})");
    assert!(
        left < bound * 3,
        "the cut-off replica got calls for {left:?}"
    );
}

/// Dropping every clone of the client closes every connection it opened, the health checks'
/// included: nothing is left running behind it.
#[tokio::test]
async fn dropping_the_client_closes_its_connections() {
    let (a, b) = (CacheServer::memory(&[]), CacheServer::memory(&[]));
    let (to_a, to_b) = (
        Forwarder::start(a.addr()).await,
        Forwarder::start(b.addr()).await,
    );
    let cm = Client::connect_many([to_a.url(), to_b.url()])
        .await
        .unwrap();
    let f = cm.function("replicas", "dropped", Ttl::MINUTE);
    let mut n = 0;
    // Calls and health checks on both: two connections through each forwarder.
    let both = async {
        while to_a.accepted() < 2 || to_b.accepted() < 2 {
            n += 1;
            call(&cm, &f, n).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("calls and health checks reach both replicas");
    drop(f);
    drop(cm);
    let closed = common::eventually(Duration::from_secs(5), || async {
        to_a.closed_by_client() == to_a.accepted() && to_b.closed_by_client() == to_b.accepted()
    })
    .await;
    assert!(
        closed,
        "connections left open: a {}/{} closed, b {}/{}",
        to_a.closed_by_client(),
        to_a.accepted(),
        to_b.closed_by_client(),
        to_b.accepted()
    );
}

/// A put through replica a, a bust through replica b: a lookup through a misses, since both
/// replicas work on the one store.
#[tokio::test]
async fn busts_reach_the_shared_store_through_any_replica() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis);
    let (mut via_a, mut via_b) = (a.client().await, b.client().await);
    for n in 0..3 {
        via_a
            .put(put(key("replicas", "shared", n), b"v", 60))
            .await
            .unwrap();
    }
    assert_eq!(
        common::get(&mut via_b, key("replicas", "shared", 0)).await,
        Some(b"v".to_vec()),
        "b does not see a's put"
    );
    via_b
        .bust(pb::BustRequest {
            key: Some(key("replicas", "shared", 0)),
        })
        .await
        .unwrap();
    assert_eq!(
        common::get(&mut via_a, key("replicas", "shared", 0)).await,
        None
    );
    assert_eq!(
        common::bust_function(&mut via_b, "replicas", "shared").await,
        2
    );
    assert_eq!(
        common::get(&mut via_a, key("replicas", "shared", 1)).await,
        None
    );
}

/// The same through `connect_many`: a memoized value busted through the client (whichever
/// replica takes the bust) is computed again on the next call, whichever replica takes it.
#[tokio::test]
async fn a_bust_through_the_balanced_client_is_seen_by_every_replica() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis);
    let cm = Client::connect_many([a.url(), b.url()]).await.unwrap();
    let f = cm.function("replicas", "busted", Ttl::MINUTE);
    for round in 0..10u64 {
        let fresh: u64 = f.memoize(&(), || async move { round }).await.unwrap();
        assert_eq!(fresh, round, "round {round} was served a busted value");
        // Cached now, through either replica.
        let cached: u64 = f.memoize(&(), || async { u64::MAX }).await.unwrap();
        assert_eq!(cached, round);
        assert!(f.bust(&()).await.unwrap(), "round {round}: nothing busted");
    }
    assert!(lookups(&a).await > 0 && lookups(&b).await > 0);
}

/// A replica that does not answer when the client is made gets none of its first calls:
/// every replica is health-checked before the balancer is given any.
#[tokio::test]
async fn a_replica_silent_at_start_gets_no_calls() {
    let live = CacheServer::memory(&[]);
    // Connections complete (the kernel's backlog) but nothing ever answers on them, so a
    // call sent there fails at its deadline and its health check at the probe timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let cm = Client::connect_many_with([silent_url, live.url()], no_breaker())
        .await
        .unwrap();
    let f = cm.function("replicas", "silent_at_start", Ttl::MINUTE);
    for n in 0..u64::from(STREAK) {
        assert!(
            call(&cm, &f, n).await,
            "call {n} went to the silent replica: {:?}",
            cm.metrics()
        );
    }
}

/// Lists the client cannot balance over are refused when it is made, with the reason.
#[tokio::test]
async fn unusable_replica_lists_are_refused_up_front() {
    let cases: [(Vec<&str>, &str); 4] = [
        (vec![], "no replica URLs"),
        (
            vec!["http://127.0.0.1:1", "127.0.0.1:2"],
            "http://host:port",
        ),
        (
            vec!["http://127.0.0.1:1", "https://127.0.0.1:2"],
            "same scheme",
        ),
        (
            vec!["http://127.0.0.1:1", "http://127.0.0.1:1"],
            "listed twice",
        ),
    ];
    for (urls, why) in cases {
        let err = Client::connect_many(urls.clone()).await.unwrap_err();
        assert!(
            matches!(&err, cache_money::Error::InvalidUrl(text) if text.contains(why)),
            "{urls:?}: {err}"
        );
    }
}

/// With `resolve_interval`, the URL's host name is looked up and the client calls the server
/// at the address it resolves to.
#[tokio::test]
async fn a_name_is_resolved_to_its_replicas() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let options = ClientOptions {
        resolve_interval: Some(Duration::from_millis(200)),
        ..ClientOptions::default()
    };
    let url = format!("http://localhost:{}", server.addr().port());
    let cm = Client::connect_with(url, options).await.unwrap();
    assert_eq!(cm.bust_all().await.unwrap(), 0);
    let f = cm.function("replicas", "resolved", Ttl::MINUTE);
    let mut n = 0;
    until_it_takes_calls(&cm, &f, &mut n, (&server, 0), Instant::now()).await;
}

/// A name that resolves to several addresses (two replicas, through the client's resolver
/// hook) makes each address a replica: both take calls, and every call succeeds.
#[tokio::test]
async fn a_name_resolving_to_two_addresses_balances_over_both() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis);
    let addrs = vec![a.addr(), b.addr()];
    let options = ClientOptions {
        resolve_interval: Some(Duration::from_secs(60)),
        resolver: Some(Arc::new(move |host: &str, _port| match host {
            "cache-money.test" => Ok(addrs.clone()),
            other => Err(std::io::Error::other(format!("unknown host {other}"))),
        })),
        ..no_breaker()
    };
    let cm = Client::connect_with("http://cache-money.test:50051", options)
        .await
        .unwrap();
    let f = cm.function("replicas", "two_addresses", Ttl::MINUTE);
    let mut n = 0;
    until_it_takes_calls(&cm, &f, &mut n, (&a, 0), Instant::now()).await;
    until_it_takes_calls(&cm, &f, &mut n, (&b, 0), Instant::now()).await;
    assert_eq!(cm.metrics().rpc_failures, 0, "{:?}", cm.metrics());
}

/// A name that does not resolve leaves no empty balancer behind: a bust fails at once with
/// the resolver's error instead of waiting out its 60 s deadline.
#[tokio::test]
async fn a_name_that_does_not_resolve_fails_fast() {
    let options = ClientOptions {
        resolve_interval: Some(Duration::from_secs(1)),
        ..ClientOptions::default()
    };
    let cm = Client::connect_many_with(["http://cache-money.invalid:50051"], options)
        .await
        .unwrap();
    let started = Instant::now();
    let err = cm.bust_all().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        matches!(&err, cache_money::Error::Rpc(status) if status.code() == tonic::Code::Unavailable),
        "{err}"
    );
}

/// Why the client checks replicas' health: tonic's balancer alone keeps sending a share of
/// the calls to a killed replica, long after the health checks would have left it. If this
/// ever fails, tonic learned to leave dead endpoints itself.
#[tokio::test]
async fn tonic_balance_alone_keeps_sending_to_a_dead_replica() {
    let (a, mut b) = (CacheServer::memory(&[]), CacheServer::memory(&[]));
    let endpoints = [a.url(), b.url()].map(|url| {
        Endpoint::from_shared(url)
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
    });
    let mut raw =
        pb::cache_money_client::CacheMoneyClient::new(Channel::balance_list(endpoints.into_iter()));
    b.kill();
    let killed = Instant::now();
    let window = ClientOptions::default().probe_interval + ClientOptions::default().probe_timeout;
    let (mut calls, mut failed) = (0u32, 0u32);
    // Only the calls after the window count: by then the health checks would have left b.
    while killed.elapsed() < window * 2 {
        let outcome = raw
            .get(common::get_request(key("replicas", "plain", 1)))
            .await;
        if killed.elapsed() > window {
            calls += 1;
            failed += u32::from(outcome.is_err());
        }
    }
    eprintln!(
        "tonic balance_list alone: {failed} of {calls} calls failed {window:?} to {:?} after a kill",
        window * 2
    );
    assert!(failed > 0, "none of {calls} calls went to the dead replica");
}
