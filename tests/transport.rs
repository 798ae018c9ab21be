//! The client's connection (the direct HTTP/2 transport `Client::connect` makes for an
//! `http://` URL) against the real server binary: flow control, one shared connection, errors
//! as statuses, cancelled calls, dead peers noticed by keepalive, reconnecting, bounded
//! connects, no call ever replayed, and nothing left running by a dropped client.
//! A [`Forwarder`] in front of the server counts connections and stands in for a load
//! balancer that sends new connections elsewhere.

mod common;

use std::time::{Duration, Instant};

use cache_money::{Client, ClientOptions, MAX_BUSY_POLL, RawClient, Ttl, pb};
use common::{CacheServer, Forwarder, RedisServer, eventually, key, put};
use tonic::Code;

async fn raw(url: String) -> RawClient {
    Client::connect(url).await.expect("client").raw()
}

async fn get(client: &mut RawClient, key: pb::Key) -> Result<pb::GetResponse, tonic::Status> {
    client
        .get(common::get_request(key))
        .await
        .map(tonic::Response::into_inner)
}

/// Options with short keepalive settings, so a dead peer is noticed within a test's patience:
/// within interval + timeout = 400 ms.
fn quick_keepalive() -> ClientOptions {
    ClientOptions {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    }
}

/// 7 MiB cross the connection each way in one message: more than HTTP/2's stream (2 MiB) and
/// connection (5 MiB) windows on either side, so it arrives only if WINDOW_UPDATEs flow.
#[tokio::test]
async fn messages_larger_than_every_window_round_trip() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(server.url()).await;
    let values: Vec<Vec<u8>> = (0..7u8)
        .map(|n| (0..1024 * 1024).map(|i| (i % 251) as u8 ^ n).collect())
        .collect();
    let entries = (0..7)
        .map(|n| put(key("transport", "big", n), &values[n as usize], 60))
        .collect();
    let stored = client
        .put_many(pb::PutManyRequest { entries })
        .await
        .expect("a 7 MiB PutMany is accepted")
        .into_inner()
        .stored;
    assert_eq!(stored, 7);
    let keys = (0..7).map(|n| key("transport", "big", n)).collect();
    let reply = client
        .get_many(pb::GetManyRequest { keys })
        .await
        .expect("a 7 MiB GetMany answer is received")
        .into_inner();
    assert_eq!(reply.results.len(), 7);
    for (result, value) in reply.results.iter().zip(&values) {
        assert!(
            result.hit && result.value == *value,
            "a value came back changed"
        );
    }
}

/// 2,000 calls in flight at once from clones of one client all get their own answer, over
/// one TCP connection.
#[tokio::test]
async fn many_concurrent_calls_share_one_connection() {
    let server = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(server.addr()).await;
    let client = raw(forwarder.url()).await;
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..2000u64 {
        let mut client = client.clone();
        calls.spawn(async move {
            let value = n.to_be_bytes();
            client
                .put(put(key("transport", "many", n), &value, 60))
                .await
                .unwrap();
            let reply = get(&mut client, key("transport", "many", n)).await.unwrap();
            assert_eq!(
                reply.value.as_ref(),
                value,
                "call {n} got another call's answer"
            );
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    assert_eq!(forwarder.accepted(), 1, "clones must share one connection");
}

/// A refused request comes back as the server's status and message (a trailers-only reply),
/// and the connection goes on serving.
#[tokio::test]
async fn server_errors_arrive_as_statuses() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(server.url()).await;
    let mut bad = key("transport", "bad", 1);
    bad.digest = "not-a-digest".into();
    let status = get(&mut client, bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("digest"), "{status:?}");
    assert!(
        !get(&mut client, key("transport", "bad", 2))
            .await
            .unwrap()
            .hit
    );
}

/// Calls abandoned mid-flight (their futures dropped) reset only their own streams: the
/// connection they shared serves the next call, and no new one was opened.
#[tokio::test]
async fn abandoned_calls_leave_the_connection_usable() {
    let server = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(server.addr()).await;
    let mut client = raw(forwarder.url()).await;
    client
        .put(put(key("transport", "drop", 1), b"kept", 60))
        .await
        .unwrap();
    for _ in 0..200 {
        let mut caller = client.clone();
        // Abandoned after its first poll, before any answer can have arrived.
        let call = get(&mut caller, key("transport", "drop", 1));
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let reply = get(&mut client, key("transport", "drop", 1)).await.unwrap();
    assert_eq!(reply.value.as_ref(), b"kept");
    assert_eq!(
        forwarder.accepted(),
        1,
        "a cancelled call cost a connection"
    );
}

/// A raw call's own timeout (`tonic::Request::set_timeout`) bounds it on the client, as it
/// did through tonic's `Channel`: against a frozen server the call ends CANCELLED at its
/// timeout, not when keepalive gives up on the connection (7 s by default).
#[tokio::test]
async fn a_raw_calls_own_timeout_bounds_it() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(server.url()).await;
    get(&mut client, key("transport", "timeout", 1))
        .await
        .unwrap();
    server.freeze();
    let mut request = tonic::Request::new(common::get_request(key("transport", "timeout", 1)));
    let timeout = Duration::from_millis(100);
    request.set_timeout(timeout);
    let started = Instant::now();
    let outcome = client.get(request).await;
    let took = started.elapsed();
    server.thaw();
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(
        took >= timeout && took < Duration::from_secs(2),
        "the call ended after {took:?}"
    );
}

/// A client that is dropped closes its connection: nothing it started (the connection's task,
/// its keepalive PINGs) outlives it.
#[tokio::test]
async fn a_dropped_client_closes_its_connection() {
    let server = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(server.addr()).await;
    let cm = Client::connect_with(forwarder.url(), quick_keepalive())
        .await
        .unwrap();
    let mut raw = cm.raw();
    get(&mut raw, key("transport", "dropped", 1)).await.unwrap();
    assert_eq!(forwarder.closed_by_client(), 0);
    drop((cm, raw));
    let closed = eventually(Duration::from_secs(5), || async {
        forwarder.closed_by_client() == 1
    })
    .await;
    assert!(closed, "the dropped client's connection stayed open");
}

/// A stream outlives the client that opened it: with the client dropped, a `Watch` its caller
/// still reads keeps its connection (and its keepalive) and goes on receiving events, over
/// many keepalive intervals.
#[tokio::test]
async fn a_stream_outlives_its_dropped_client() {
    let server = CacheServer::memory(&["--watch-heartbeat-ms", "50"]);
    let cm = Client::connect_with(server.url(), quick_keepalive())
        .await
        .unwrap();
    let mut raw = cm.raw();
    let request = pb::WatchRequest {
        namespaces: vec!["kept".into()],
        ..Default::default()
    };
    let mut events = raw.watch(request).await.unwrap().into_inner();
    let patience = Duration::from_secs(2);
    tokio::time::timeout(patience, events.message())
        .await
        .expect("an event within 2 s")
        .unwrap()
        .expect("subscribed");
    drop((cm, raw));
    let started = Instant::now();
    let mut heartbeats = 0;
    // Six keepalive intervals (100 ms) after the client went.
    while started.elapsed() < Duration::from_millis(600) {
        let event = tokio::time::timeout(patience, events.message())
            .await
            .expect("an event within 2 s");
        assert!(matches!(event, Ok(Some(_))), "the stream ended: {event:?}");
        heartbeats += 1;
    }
    assert!(heartbeats >= 5, "{heartbeats} events in 600 ms");
}

/// A client made on one runtime keeps working on another once the first shuts down (a
/// default client installed once, used by each test's own runtime): the connection's task
/// died with its runtime, and the next call opens a new connection from the runtime it runs
/// on instead of failing for ever.
#[test]
fn a_client_outlives_the_runtime_it_connected_on() {
    let server = CacheServer::memory(&[]);
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let mut client = first.block_on(raw(server.url()));
    first
        .block_on(get(&mut client, key("transport", "runtimes", 1)))
        .unwrap();
    drop(first);
    let second = runtime();
    let reply = second.block_on(get(&mut client, key("transport", "runtimes", 1)));
    assert!(reply.is_ok(), "{reply:?}");
}

/// After the server restarts, the client opens a new connection by itself and calls succeed
/// again.
#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    let mut server = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(server.addr()).await;
    let mut client = raw(forwarder.url()).await;
    assert!(
        get(&mut client, key("transport", "restart", 1))
            .await
            .is_ok()
    );
    server.restart();
    let back = eventually(Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            get(&mut client, key("transport", "restart", 1))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(back, "calls never succeeded after the restart");
    assert_eq!(forwarder.accepted(), 2, "one connection before, one after");
}

/// Nothing listening: UNAVAILABLE at once, and the error says why.
#[tokio::test]
async fn refused_connections_are_unavailable() {
    let port = common::free_port();
    let cm = Client::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let started = Instant::now();
    let err = cm.bust_all().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    let cache_money::Error::Rpc(status) = &err else {
        panic!("expected a status, got {err:?}");
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let said = err.to_string();
    assert!(
        said.starts_with(&format!(
            "cache-money answered Unavailable: cannot connect to http://127.0.0.1:{port}: "
        )) && said.contains("refused")
            && said.matches("refused").count() == 1,
        "{said}"
    );
}

/// A peer that accepts TCP but never speaks HTTP/2 cannot hang a call: the connection's first
/// PING goes unanswered, the attempt fails within the connect timeout, and the call fails
/// UNAVAILABLE, saying so.
#[tokio::test]
async fn silent_peers_are_given_up_on() {
    // The kernel completes the TCP handshake from the backlog; nobody ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..quick_keepalive()
    };
    let bound = options.connect_timeout;
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut client = Client::connect_with(url, options).await.unwrap().raw();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        get(&mut client, key("transport", "silent", 1)),
    )
    .await
    .expect("the call hung past the connect timeout");
    let waited = started.elapsed();
    let status = outcome.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("connect_timeout"), "{status:?}");
    assert!(
        waited < bound * 3,
        "gave up after {waited:?}, connect timeout {bound:?}"
    );
}

/// URLs the client cannot use are refused when the client is made, with the reason.
#[tokio::test]
async fn unusable_urls_are_refused_up_front() {
    for url in [
        "not a url",
        "http://",
        "/just/a/path",
        "ftp://127.0.0.1:50051",
        "127.0.0.1:50051",
    ] {
        let err = Client::connect(url).await.unwrap_err();
        assert!(
            matches!(err, cache_money::Error::InvalidUrl(_)),
            "{url}: {err:?}"
        );
    }
}

/// Connection settings that cannot work are refused when the client is made, naming the
/// option, rather than failing every call (or PINGing without pause).
#[tokio::test]
async fn unusable_connection_settings_are_refused_up_front() {
    let zero = Duration::ZERO;
    for (options, named) in [
        (
            ClientOptions {
                connect_timeout: zero,
                ..ClientOptions::default()
            },
            "connect_timeout",
        ),
        (
            ClientOptions {
                keepalive_timeout: zero,
                ..ClientOptions::default()
            },
            "keepalive_timeout",
        ),
        (
            ClientOptions {
                keepalive_interval: Duration::from_millis(9),
                ..ClientOptions::default()
            },
            "keepalive_interval",
        ),
        (
            ClientOptions {
                busy_poll: MAX_BUSY_POLL + Duration::from_micros(1),
                ..ClientOptions::default()
            },
            "busy_poll: at most 1000 µs",
        ),
    ] {
        let err = Client::connect_with("http://127.0.0.1:50051", options)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, cache_money::Error::InvalidOption(message) if message.contains(named)),
            "{named}: {err:?}"
        );
    }
}

/// Options that poll for up to the largest budget, so a debug server on a busy machine still
/// answers within it, and whose breaker never opens (a test's failures must not stop Gets).
fn polling() -> ClientOptions {
    ClientOptions {
        busy_poll: MAX_BUSY_POLL,
        breaker_threshold: u32::MAX,
        ..ClientOptions::default()
    }
}

/// `count` memoize hits of one entry of `function` through `cm`, after a first call that
/// computes it unless cached; `cm`'s metrics after them.
async fn hits(cm: &Client, function: &str, count: u64) -> cache_money::ClientMetrics {
    let f = cm.function("transport", function, Ttl::MINUTE);
    let value: u32 = f.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!(value, 1);
    let computed = cm.metrics().computed;
    for _ in 0..count {
        let value: u32 = f.memoize(&(1,), || async { 1 }).await.unwrap();
        assert_eq!(value, 1);
    }
    let metrics = cm.metrics();
    assert_eq!(metrics.computed, computed, "not all hits: {metrics:?}");
    metrics
}

/// Lone memoize hits of one entry of `function` through `cm` until polling catches a reply,
/// for up to 10 s (a loaded machine's slow Gets keep the average over the budget for a
/// while): the Gets it took, if it did.
async fn until_polled(cm: &Client, function: &str) -> Option<u64> {
    let f = cm.function("transport", function, Ttl::MINUTE);
    let before = cm.metrics().polled_gets;
    let started = Instant::now();
    let mut gets = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let value: u32 = f.memoize(&(1,), || async { 1 }).await.unwrap();
        assert_eq!(value, 1);
        gets += 1;
        if cm.metrics().polled_gets > before {
            return Some(gets);
        }
    }
    None
}

/// A client of `server` with [`polling`] options, its lone Gets of `function` seen polled for.
async fn polled_client(server: &CacheServer, function: &str) -> Client {
    let cm = Client::connect_with(server.url(), polling()).await.unwrap();
    let polled = until_polled(&cm, function).await;
    assert!(polled.is_some(), "lone Gets never polled for");
    cm
}

/// On a current-thread runtime (this test's), a Get alone in flight is polled for: its
/// reply is seen by the polling instead of waking the task (`polled_gets`). Not the first
/// Get: none was alone before it. Turned off, nothing is.
#[tokio::test]
async fn lone_gets_are_polled_for_on_a_current_thread_runtime() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect_with(server.url(), polling()).await.unwrap();
    let first = cm.function("transport", "first", Ttl::MINUTE);
    let value: u32 = first.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!((value, cm.metrics().polled_gets), (1, 0));
    let gets = until_polled(&cm, "polled").await;
    assert!(gets.is_some(), "no reply caught by polling within 10 s");
    let polled = hits(&cm, "polled", 50).await.polled_gets;
    println!("a reply caught after {gets:?} Gets; then {polled} in all after 50 more");
    let off = ClientOptions {
        busy_poll: Duration::ZERO,
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), off).await.unwrap();
    assert_eq!(hits(&cm, "not_polled", 50).await.polled_gets, 0);
}

/// While another caller's Gets are in flight on the same client, a Get is not polled for
/// (the thread has other work). Lone Gets of the same client are, first. Of 50 overlapping
/// Gets at most 2 are: the other caller's Get in flight as this one's first started may
/// have begun alone, and another may if the other caller paused between Gets.
#[tokio::test]
async fn overlapping_gets_are_not_polled_for() {
    let server = CacheServer::memory(&[]);
    let cm = polled_client(&server, "overlapped").await;
    let other = cm.function("transport", "overlapping", Ttl::MINUTE);
    let _: u32 = other.memoize(&(2,), || async { 2 }).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _: u32 = other.memoize(&(2,), || async { 2 }).await.unwrap();
            }
        }
    });
    // The other caller is under way once it has hit.
    let started = cm.metrics().hits;
    while cm.metrics().hits < started + 3 {
        tokio::task::yield_now().await;
    }
    let before = cm.metrics().polled_gets;
    let after = hits(&cm, "overlapped", 50).await.polled_gets;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    background.await.unwrap();
    assert!(
        after - before <= 2,
        "{} of 51 overlapping Gets polled for",
        after - before
    );
}

/// A Get given up on (a frozen server: `memoize`'s 100 ms deadline drops it, its polling
/// long over) leaves the client's count of Gets in flight as it was: once the server
/// answers again and the given-up Get's time has left the average, Gets are polled for
/// again (a leaked count would make every later Get look overlapped, never polled).
#[tokio::test]
async fn a_get_given_up_on_leaves_polling_working() {
    let server = CacheServer::memory(&[]);
    let cm = polled_client(&server, "given_up").await;
    server.freeze();
    let f = cm.function("transport", "given_up", Ttl::MINUTE);
    let failures = cm.metrics().rpc_failures;
    let value: u32 = f.memoize(&(2,), || async { 2 }).await.unwrap();
    server.thaw();
    assert_eq!(value, 2);
    assert!(
        cm.metrics().rpc_failures > failures,
        "the lookup was not given up on: {:?}",
        cm.metrics()
    );
    // The given-up Get counted its 100 ms: about 35 Gets of under a millisecond bring the
    // average back within the budget.
    let gets = until_polled(&cm, "given_up").await;
    println!("polled for again after {gets:?} Gets");
    assert!(
        gets.is_some(),
        "no Get polled for after one was given up on"
    );
}

/// On tokio's multi-thread runtime polling would not save the wake-up (an idle worker holds
/// the I/O driver): nothing is polled for, even with the largest budget, from tasks on the
/// workers (where the connection's task runs too) as from the test's own thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_are_not_polled_for_on_a_multi_thread_runtime() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect_with(server.url(), polling()).await.unwrap();
    for _ in 0..4 {
        let cm = cm.clone();
        let spawned = tokio::spawn(async move { hits(&cm, "multi_thread", 50).await });
        assert_eq!(spawned.await.unwrap().polled_gets, 0);
    }
    assert_eq!(hits(&cm, "multi_thread", 50).await.polled_gets, 0);
}

/// A client whose connection was opened by another thread's current-thread runtime (one
/// client shared by several runtimes) does not poll from this one: the reply reaches that
/// thread's driver first, which has to be woken for it anyway. From that thread it does.
#[tokio::test]
async fn a_connection_another_runtime_drives_is_not_polled_for() {
    let server = CacheServer::memory(&[]);
    let url = server.url();
    let (opened, client) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let other = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // The first call opens the connection, on this runtime, which then polls.
            let cm = Client::connect_with(url, polling()).await.unwrap();
            let polled = until_polled(&cm, "other_runtime").await;
            opened.send((cm, polled)).unwrap();
            let _ = stopped.await;
        });
    });
    let (cm, polled) = client.await.unwrap();
    assert!(
        polled.is_some(),
        "never polled for from the driver's thread"
    );
    let before = cm.metrics().polled_gets;
    let after = hits(&cm, "other_runtime", 50).await.polled_gets;
    stop.send(()).unwrap();
    other.join().unwrap();
    assert_eq!(
        after, before,
        "polled for replies another runtime's thread receives"
    );
}

/// Each `memoize` lookup gives up after 100 ms, but the handshake takes 400 ms: the attempt
/// must carry on without the caller that started it, or caching would never begin.
#[tokio::test]
async fn a_connect_slower_than_the_deadline_still_completes() {
    let server = CacheServer::memory(&[]);
    let link = Forwarder::start_with_delay(server.addr(), Duration::from_millis(400)).await;
    let cm = Client::connect(link.url()).await.unwrap();
    let one = cm.function("transport", "slow_link", Ttl::MINUTE);
    let cached = eventually(Duration::from_secs(10), || async {
        let value: u32 = one.memoize(&(1,), || async { 1 }).await.unwrap();
        assert_eq!(value, 1);
        cm.metrics().hits > 0
    })
    .await;
    assert!(cached, "never served from the cache: {:?}", cm.metrics());
    assert_eq!(link.accepted(), 1, "the attempt was not shared");
}

/// A server frozen mid-connection (SIGSTOP: the socket stays open, nothing answers) costs
/// each `memoize` its deadline, not a hang; keepalive notices the dead connection and the
/// client reaches a replacement behind the same address within twice the keepalive timeout.
#[tokio::test]
async fn a_frozen_server_is_left_for_a_replacement() {
    let frozen = CacheServer::memory(&[]);
    let replacement = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(frozen.addr()).await;
    let options = ClientOptions {
        // Probe as soon as keepalive may have replaced the connection: this measures the
        // transport, not the breaker's cool-down.
        breaker_cooldown: Duration::from_millis(20),
        ..quick_keepalive()
    };
    let target = options.keepalive_timeout * 2;
    let deadline = options.deadline;
    let cm = Client::connect_with(forwarder.url(), options)
        .await
        .unwrap();
    let f = cm.function("transport", "frozen", Ttl::MINUTE);
    let _: u32 = f.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!(forwarder.accepted(), 1);

    frozen.freeze();
    forwarder.point_at(replacement.addr());
    let frozen_at = Instant::now();
    let started = Instant::now();
    let value: u32 = f.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!(value, 1, "memoize computes while the server is frozen");
    assert!(
        started.elapsed() < deadline * 3,
        "a frozen server cost {:?}",
        started.elapsed()
    );
    // The replacement is empty: once a put lands there, a lookup hits.
    let moved = eventually(Duration::from_secs(10), || async {
        let _: u32 = f.memoize(&(2,), || async { 2 }).await.unwrap();
        forwarder.accepted() >= 2 && replacement_has(&replacement, &f).await
    })
    .await;
    let took = frozen_at.elapsed();
    frozen.thaw();
    assert!(moved, "the client never left the frozen server");
    println!("frozen server left after {took:?} (target: 2 × keepalive timeout = {target:?})");
    assert!(
        took <= target,
        "took {took:?} to leave a frozen server, over twice the keepalive timeout ({target:?})"
    );
}

/// An idle connection is checked too: with no call in flight, keepalive PINGs find a frozen
/// server and close the connection, so the next call goes straight to a replacement instead
/// of paying its deadline on a dead connection first.
#[tokio::test]
async fn idle_connections_to_a_frozen_server_are_closed() {
    let frozen = CacheServer::memory(&[]);
    let replacement = CacheServer::memory(&[]);
    let forwarder = Forwarder::start(frozen.addr()).await;
    let options = quick_keepalive();
    let bound = options.keepalive_interval + options.keepalive_timeout;
    let mut client = Client::connect_with(forwarder.url(), options)
        .await
        .unwrap()
        .raw();
    get(&mut client, key("transport", "idle", 1)).await.unwrap();

    frozen.freeze();
    forwarder.point_at(replacement.addr());
    let frozen_at = Instant::now();
    let closed = eventually(Duration::from_secs(5), || async {
        forwarder.closed_by_client() >= 1
    })
    .await;
    let took = frozen_at.elapsed();
    frozen.thaw();
    assert!(
        closed,
        "the idle connection to the frozen server was never closed"
    );
    assert!(
        took <= bound * 2,
        "closed after {took:?}, keepalive bound {bound:?}"
    );
    let reply = tokio::time::timeout(
        Duration::from_millis(500),
        get(&mut client, key("transport", "idle", 1)),
    )
    .await
    .expect("the first call after the close went to a dead connection");
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(forwarder.accepted(), 2);
}

async fn replacement_has(server: &CacheServer, f: &cache_money::Function) -> bool {
    let digest = f.digest(&(2,)).unwrap();
    let mut raw = server.client().await;
    let key = pb::Key {
        namespace: f.namespace().into(),
        function: f.name().into(),
        digest,
    };
    common::get(&mut raw, key).await.is_some()
}

/// A server that stops (SIGTERM, then its drain runs out) in the middle of a large
/// BustFunction: the caller sees an error or the true count, never the `0` or partial
/// count of a replay against a replacement server.
#[tokio::test]
async fn a_bust_cut_off_by_shutdown_is_never_replayed() {
    const ENTRIES: u64 = 200_000;
    let redis = RedisServer::start();
    let mut first = CacheServer::redis(&redis, &["--drain-timeout-ms", "50"]);
    let replacement = CacheServer::redis(&redis, &[]);
    let forwarder = Forwarder::start(first.addr()).await;
    let cm = Client::connect(forwarder.url()).await.unwrap();
    let f = cm.function("ns", "cut_off", Ttl::HOUR);
    common::fill(&redis, "cm:", "cut_off", ENTRIES).await;
    // Make sure the connection exists before the bust, so the bust is its only call.
    let _: u32 = f.memoize(&("warm",), || async { 0 }).await.unwrap();
    forwarder.point_at(replacement.addr());

    let bust = tokio::spawn({
        let f = f.clone();
        async move { f.bust_all().await }
    });
    // Wait until the bust is under way (entries are going), then stop the server.
    let under_way = eventually(Duration::from_secs(10), || async {
        redis.dbsize().await < ENTRIES
    })
    .await;
    assert!(under_way, "the bust never started");
    first.terminate();
    let outcome = bust.await.unwrap();
    first.wait_exit(Duration::from_secs(10));
    let left = redis.dbsize().await;
    match outcome {
        Ok(removed) => assert_eq!(
            removed,
            ENTRIES + 1 - left,
            "a successful bust must report what it removed"
        ),
        // Cut off: some entries may be gone, and the caller is told the bust failed.
        Err(err) => println!("cut-off bust reported {err} with {left} entries left"),
    }
}

/// The server lets go of a client that vanished: when a client's flow goes silent (a dropped
/// flow, a host gone), the server's keepalive PING goes unanswered and the server closes the
/// connection within its keepalive interval + timeout, instead of holding it forever.
#[tokio::test]
async fn the_server_closes_connections_of_vanished_clients() {
    let server = CacheServer::memory(&[
        "--keepalive-interval-ms",
        "200",
        "--keepalive-timeout-ms",
        "200",
    ]);
    let forwarder = Forwarder::start(server.addr()).await;
    let mut client = raw(forwarder.url()).await;
    get(&mut client, key("transport", "vanish", 1))
        .await
        .unwrap();
    forwarder.blackhole();
    let vanished_at = Instant::now();
    // Well before the client's own keepalive (7 s) would close it from its side.
    let closed = eventually(Duration::from_secs(3), || async {
        forwarder.closed_by_server() >= 1
    })
    .await;
    assert!(closed, "the server kept the vanished client's connection");
    // The client's own keepalive (5 s + 2 s) cannot have closed it this early.
    let took = vanished_at.elapsed();
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
}
