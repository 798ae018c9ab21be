//! The invalidation stream (`Watch`) against the real server binary, over the in-memory
//! store, a real `redis-server` and a real Redis Cluster: each bust scope and overwrite
//! reaches the watchers that follow it and no other, positions grow, a resume replays what
//! came after it (or RESETs when that is gone), heartbeats keep an idle stream alive, an
//! invalidation made through one replica reaches a watcher on another (latency printed), a
//! watcher of a killed replica resumes on another without losing anything, and the reader's
//! blocking read is not cut short by the store timeout (lookups keep their position).

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cache_money::pb::{self, cache_money_client::CacheMoneyClient};
use common::{CacheServer, RedisCluster, RedisServer, key, put};
use tonic::{Code, Streaming, transport::Channel};

type Cm = CacheMoneyClient<Channel>;

/// How long any one expected event may take to arrive before the test fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which store the servers under test use.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// The store behind one or more servers, kept alive for as long as they run.
#[expect(dead_code, reason = "held only so the store outlives its servers")]
enum Behind {
    Nothing,
    Redis(RedisServer),
    Cluster(Arc<RedisCluster>),
}

impl Backend {
    /// What the servers need to share one store, and the arguments that point them at it
    /// (their own key prefix on the shared cluster).
    fn store(self) -> (Behind, Vec<String>) {
        match self {
            Backend::Memory => (Behind::Nothing, Vec::new()),
            Backend::Redis => {
                let redis = RedisServer::start();
                let args = vec!["--redis-url".to_owned(), redis.url()];
                (Behind::Redis(redis), args)
            }
            Backend::Cluster => {
                let cluster = RedisCluster::shared();
                let args = vec![
                    "--redis-cluster".to_owned(),
                    cluster.seeds(),
                    "--key-prefix".to_owned(),
                    common::unique_prefix("watch"),
                ];
                (Behind::Cluster(cluster), args)
            }
        }
    }

    /// One server over a fresh store (its own prefix on the cluster), with `extra` flags.
    fn start(self, extra: &[&str]) -> (Behind, CacheServer) {
        let (behind, args) = self.store();
        (behind, server(&args, extra))
    }
}

fn server(args: &[String], extra: &[&str]) -> CacheServer {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    CacheServer::start(&all)
}

/// A Watch stream and what it has delivered.
struct Watcher {
    events: Streaming<pb::WatchEvent>,
    /// The last position seen, heartbeats included.
    last: u64,
}

/// What to follow.
fn follow(namespaces: &[&str], functions: &[(&str, &str)]) -> pb::WatchRequest {
    pb::WatchRequest {
        namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
        functions: functions
            .iter()
            .map(|(namespace, function)| pb::WatchedFunction {
                namespace: namespace.to_string(),
                function: function.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn kind(event: &pb::WatchEvent) -> pb::WatchEventKind {
    pb::WatchEventKind::try_from(event.kind).expect("a known kind")
}

impl Watcher {
    /// Starts watching and waits for the first event: a HEARTBEAT once the watcher is
    /// subscribed (and caught up, when resuming), or a RESET first; every event published
    /// after it returns reaches the stream.
    async fn start(cm: &mut Cm, request: pb::WatchRequest) -> (Watcher, pb::WatchEvent) {
        let events = cm.watch(request).await.expect("Watch starts").into_inner();
        let mut watcher = Watcher { events, last: 0 };
        let first = watcher.next().await;
        (watcher, first)
    }

    /// Starts watching from now, and waits until it is subscribed.
    async fn ready(cm: &mut Cm, request: pb::WatchRequest) -> Watcher {
        let (watcher, first) = Watcher::start(cm, request).await;
        assert_eq!(kind(&first), pb::WatchEventKind::WatchEventHeartbeat);
        watcher
    }

    /// The next event of any kind, checking that positions never go down.
    async fn next(&mut self) -> pb::WatchEvent {
        let event = tokio::time::timeout(EVENT_TIMEOUT, self.events.message())
            .await
            .expect("an event within the timeout")
            .expect("the stream is healthy")
            .expect("the stream has not ended");
        if kind(&event) != pb::WatchEventKind::WatchEventReset {
            assert!(
                event.position >= self.last,
                "position went down: {} after {}",
                event.position,
                self.last
            );
        }
        self.last = event.position;
        event
    }

    /// The next invalidation, heartbeats and RESETs skipped; within [`EVENT_TIMEOUT`] each.
    async fn next_invalidation(&mut self) -> pb::WatchEvent {
        loop {
            let event = self.next_change().await;
            if kind(&event) == pb::WatchEventKind::WatchEventInvalidation {
                return event;
            }
        }
    }

    /// The next invalidation or RESET, heartbeats skipped; within [`EVENT_TIMEOUT`] in all,
    /// so a lost event fails the test even while heartbeats keep coming.
    async fn next_change(&mut self) -> pb::WatchEvent {
        let change = async {
            loop {
                let event = self.next().await;
                if kind(&event) != pb::WatchEventKind::WatchEventHeartbeat {
                    return event;
                }
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, change)
            .await
            .expect("an invalidation or RESET within the timeout, heartbeats aside")
    }

    /// The next invalidation, which must be of `scope` and `cause` over `namespace`,
    /// `function` and `digest` (empty: not named) at `position`.
    async fn expect(
        &mut self,
        what: &str,
        scope: pb::InvalidationScope,
        cause: pb::InvalidationCause,
        names: (&str, &str, &str),
        position: u64,
    ) {
        let event = self.next_change().await;
        assert_eq!(
            kind(&event),
            pb::WatchEventKind::WatchEventInvalidation,
            "{what}: {event:?}"
        );
        assert_eq!(event.scope, scope as i32, "{what}: {event:?}");
        assert_eq!(event.cause, cause as i32, "{what}: {event:?}");
        let key = event.key.clone().unwrap_or_default();
        assert_eq!(
            (
                key.namespace.as_str(),
                key.function.as_str(),
                key.digest.as_str()
            ),
            names,
            "{what}: {event:?}"
        );
        assert_eq!(event.position, position, "{what}: the RPC's own position");
    }
}

async fn bust(cm: &mut Cm, key: pb::Key) -> u64 {
    cm.bust(pb::BustRequest { key: Some(key) })
        .await
        .expect("Bust")
        .into_inner()
        .position
}

async fn bust_function(cm: &mut Cm, namespace: &str, function: &str) -> u64 {
    let request = pb::BustFunctionRequest {
        namespace: namespace.into(),
        function: function.into(),
    };
    cm.bust_function(request)
        .await
        .expect("BustFunction")
        .into_inner()
        .position
}

async fn bust_namespace(cm: &mut Cm, namespace: &str) -> u64 {
    let request = pb::BustNamespaceRequest {
        namespace: namespace.into(),
    };
    cm.bust_namespace(request)
        .await
        .expect("BustNamespace")
        .into_inner()
        .position
}

/// A Get of `key`, which must succeed: its whole answer (hit, value, position).
async fn lookup(cm: &mut Cm, key: pb::Key) -> pb::GetResponse {
    cm.get(common::get_request(key))
        .await
        .expect("Get")
        .into_inner()
}

async fn write(cm: &mut Cm, key: pb::Key) -> u64 {
    let reply = cm.put(put(key, b"v", 60)).await.expect("Put").into_inner();
    assert!(!reply.refused);
    reply.position
}

use pb::{InvalidationCause as Cause, InvalidationScope as Scope};

/// Every bust scope and every kind of write reaches the watchers that follow it, with the
/// position its RPC answered, in order; a watcher of another namespace hears only the bust
/// of everything.
async fn each_scope_reaches_its_watchers(backend: Backend) {
    let (_store, server) = backend.start(&[]);
    let mut cm = server.client().await;
    let mut namespace = Watcher::ready(&mut cm, follow(&["wa"], &[])).await;
    let mut function = Watcher::ready(&mut cm, follow(&[], &[("wa", "f")])).await;
    let mut other = Watcher::ready(&mut cm, follow(&["wb"], &[])).await;

    let digest = |n| common::digest(n);
    let p = write(&mut cm, key("wa", "f", 1)).await;
    for watcher in [&mut namespace, &mut function] {
        let names = ("wa", "f", digest(1));
        let names = (names.0, names.1, names.2.as_str());
        watcher
            .expect("Put", Scope::ScopeEntry, Cause::CausePut, names, p)
            .await;
    }
    let p = bust(&mut cm, key("wa", "f", 1)).await;
    for watcher in [&mut namespace, &mut function] {
        let d = digest(1);
        watcher
            .expect(
                "Bust",
                Scope::ScopeEntry,
                Cause::CauseBust,
                ("wa", "f", &d),
                p,
            )
            .await;
    }
    // Another function of the namespace: the namespace's watcher only.
    let p = bust_function(&mut cm, "wa", "g").await;
    namespace
        .expect(
            "BustFunction g",
            Scope::ScopeFunction,
            Cause::CauseBust,
            ("wa", "g", ""),
            p,
        )
        .await;
    let p = bust_function(&mut cm, "wa", "f").await;
    for watcher in [&mut namespace, &mut function] {
        watcher
            .expect(
                "BustFunction f",
                Scope::ScopeFunction,
                Cause::CauseBust,
                ("wa", "f", ""),
                p,
            )
            .await;
    }
    let tagged = pb::PutRequest {
        tags: vec!["user:7".into()],
        ..put(key("wa", "g", 2), b"v", 60)
    };
    let p_tagged = cm
        .put(tagged)
        .await
        .expect("tagged Put")
        .into_inner()
        .position;
    let p = cm
        .bust_tag(pb::BustTagRequest {
            namespace: "wa".into(),
            tag: "user:7".into(),
        })
        .await
        .expect("BustTag")
        .into_inner()
        .position;
    let d = digest(2);
    namespace
        .expect(
            "tagged Put",
            Scope::ScopeEntry,
            Cause::CausePut,
            ("wa", "g", &d),
            p_tagged,
        )
        .await;
    for watcher in [&mut namespace, &mut function] {
        let event = watcher.next_change().await;
        assert_eq!(event.scope, Scope::ScopeNamespace as i32, "{event:?}");
        assert_eq!(event.cause, Cause::CauseTag as i32, "{event:?}");
        assert_eq!(event.tag, "user:7");
        assert_eq!(event.key.unwrap_or_default().namespace, "wa");
        assert_eq!(event.position, p);
    }
    // A batch: one invalidation per entry, in order.
    let batch = pb::PutManyRequest {
        entries: vec![
            put(key("wa", "f", 3), b"v", 60),
            put(key("wa", "h", 4), b"v", 60),
        ],
    };
    let last = cm
        .put_many(batch)
        .await
        .expect("PutMany")
        .into_inner()
        .position;
    let d3 = digest(3);
    let d4 = digest(4);
    namespace
        .expect(
            "PutMany 1",
            Scope::ScopeEntry,
            Cause::CausePut,
            ("wa", "f", &d3),
            last - 1,
        )
        .await;
    namespace
        .expect(
            "PutMany 2",
            Scope::ScopeEntry,
            Cause::CausePut,
            ("wa", "h", &d4),
            last,
        )
        .await;
    function
        .expect(
            "PutMany f",
            Scope::ScopeEntry,
            Cause::CausePut,
            ("wa", "f", &d3),
            last - 1,
        )
        .await;
    // A Put under a lease that was stored is an overwrite like any other.
    let leased = cm
        .get(pb::GetRequest {
            key: Some(key("wa", "f", 5)),
            lease_ms: 5_000,
            ..Default::default()
        })
        .await
        .expect("leased Get")
        .into_inner();
    assert_eq!(leased.lease, pb::Lease::Won as i32);
    let reply = cm
        .put(pb::PutRequest {
            lease_token: leased.lease_token,
            ..put(key("wa", "f", 5), b"v", 60)
        })
        .await
        .expect("leased Put")
        .into_inner();
    assert!(!reply.refused);
    let d5 = digest(5);
    for watcher in [&mut namespace, &mut function] {
        watcher
            .expect(
                "leased Put",
                Scope::ScopeEntry,
                Cause::CausePut,
                ("wa", "f", &d5),
                reply.position,
            )
            .await;
    }
    let p = bust_namespace(&mut cm, "wa").await;
    for watcher in [&mut namespace, &mut function] {
        watcher
            .expect(
                "BustNamespace",
                Scope::ScopeNamespace,
                Cause::CauseBust,
                ("wa", "", ""),
                p,
            )
            .await;
    }
    let p = cm
        .bust_all(pb::BustAllRequest {})
        .await
        .expect("BustAll")
        .into_inner()
        .position;
    // The other namespace's watcher: everything above was published before this, in order,
    // so its first invalidation being the bust of everything proves it heard none of them.
    for watcher in [&mut namespace, &mut function, &mut other] {
        watcher
            .expect(
                "BustAll",
                Scope::ScopeAll,
                Cause::CauseBust,
                ("", "", ""),
                p,
            )
            .await;
    }
}

/// A Get answers the position the server had read before its lookup: at least that of an
/// invalidation a watcher of the same server has already received.
async fn get_carries_the_position_before_its_lookup(backend: Backend) {
    let (_store, server) = backend.start(&[]);
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["pos"], &[])).await;
    let written = write(&mut cm, key("pos", "f", 1)).await;
    watcher.next_change().await;
    let answer = lookup(&mut cm, key("pos", "f", 1)).await;
    assert!(answer.hit);
    assert!(
        answer.position >= written,
        "Get position {} below the write's {written}",
        answer.position
    );
    let busted = bust(&mut cm, key("pos", "f", 1)).await;
    assert!(busted > answer.position, "a later bust is numbered above");
    let batch = cm
        .get_many(pb::GetManyRequest {
            keys: vec![key("pos", "f", 1)],
        })
        .await
        .expect("GetMany")
        .into_inner();
    assert!(batch.results[0].position >= written);
}

/// A watcher resuming after a position gets what was published since, in order, then a
/// heartbeat; one resuming from a position past the end gets a RESET.
async fn resume_replays_what_came_after(backend: Backend) {
    let (_store, server) = backend.start(&[]);
    let mut cm = server.client().await;
    let first = bust(&mut cm, key("rs", "f", 1)).await;
    let second = bust(&mut cm, key("rs", "f", 2)).await;
    bust(&mut cm, key("other", "f", 3)).await;
    let third = bust_function(&mut cm, "rs", "g").await;
    let (mut watcher, event) = Watcher::start(
        &mut cm,
        pb::WatchRequest {
            after: first,
            ..follow(&["rs"], &[])
        },
    )
    .await;
    assert_eq!(kind(&event), pb::WatchEventKind::WatchEventInvalidation);
    assert_eq!(event.position, second, "{event:?}");
    let event = watcher.next().await;
    assert_eq!(event.position, third, "the other namespace's is skipped");
    let event = watcher.next().await;
    assert_eq!(kind(&event), pb::WatchEventKind::WatchEventHeartbeat);
    assert_eq!(event.position, third);

    let (_, event) = Watcher::start(
        &mut cm,
        pb::WatchRequest {
            after: third + 1000,
            ..follow(&["rs"], &[])
        },
    )
    .await;
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventReset,
        "{event:?}"
    );
    assert_eq!(event.position, third);
}

/// A watcher resuming from a position the store has trimmed gets a RESET first, then what
/// the store still keeps.
async fn resume_from_a_trimmed_position_resets(backend: Backend) {
    let (_store, server) = backend.start(&["--watch-stream-len", "5"]);
    let mut cm = server.client().await;
    let first = bust(&mut cm, key("tr", "f", 0)).await;
    // Redis trims `MAXLEN ~` whole stream nodes (100 entries) at a time: write a few.
    let entries = (1..=350)
        .map(|n| put(key("tr", "f", n), b"v", 60))
        .collect();
    let last = cm
        .put_many(pb::PutManyRequest { entries })
        .await
        .expect("PutMany")
        .into_inner()
        .position;
    let (mut watcher, event) = Watcher::start(
        &mut cm,
        pb::WatchRequest {
            after: first,
            ..follow(&["tr"], &[])
        },
    )
    .await;
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventReset,
        "{event:?}"
    );
    assert!(event.position > first && event.position < last, "{event:?}");
    // Then the kept ones, up to the last.
    loop {
        let event = watcher.next().await;
        if kind(&event) == pb::WatchEventKind::WatchEventHeartbeat {
            assert_eq!(event.position, last);
            break;
        }
        assert_eq!(kind(&event), pb::WatchEventKind::WatchEventInvalidation);
    }
}

/// An idle stream carries heartbeats at the configured interval, positions unchanged.
async fn idle_streams_carry_heartbeats(backend: Backend) {
    let (_store, server) = backend.start(&["--watch-heartbeat-ms", "100"]);
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["hb"], &[])).await;
    let position = bust(&mut cm, key("hb", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, position);
    let started = Instant::now();
    for _ in 0..5 {
        let event = watcher.next().await;
        assert_eq!(kind(&event), pb::WatchEventKind::WatchEventHeartbeat);
        assert!(event.position >= position);
    }
    // Five at 100 ms, far below the 1 s default: the flag is used.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// With the default flags (heartbeat 1 s, store timeout 250 ms, given here so an exported
/// variable cannot change them) the reader's blocking read outlasts the store timeout, yet is
/// never cut short by it: the reader stays healthy, so every Get across several heartbeat
/// intervals carries the position (a failing reader makes lookups answer 0, which a near
/// cache may not cache), and the server never logs a failed read.
async fn lookups_keep_their_position_between_heartbeats(backend: Backend) {
    const WINDOW: Duration = Duration::from_millis(2_500);
    const FAILED: &str = "reading the invalidation stream failed";
    let (_store, server) =
        backend.start(&["--watch-heartbeat-ms", "1000", "--store-timeout-ms", "250"]);
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["steady"], &[])).await;
    let busted = bust(&mut cm, key("steady", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, busted);
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(10));
    let mut lookups = 0;
    while started.elapsed() < WINDOW {
        every.tick().await;
        let answer = lookup(&mut cm, key("steady", "f", 2)).await;
        lookups += 1;
        assert!(
            answer.position >= busted,
            "lookup {lookups}, {:?} in: position {} (the bust read was {busted}); server log:\n{}",
            started.elapsed(),
            answer.position,
            server.log_text()
        );
    }
    let log = server.log_text();
    assert!(!log.contains(FAILED), "the reader failed:\n{log}");
}

/// Watch refuses a request that follows nothing, and bad names.
async fn watch_validates_its_request(backend: Backend) {
    let (_store, server) = backend.start(&[]);
    let mut cm = server.client().await;
    for request in [
        follow(&[], &[]),
        follow(&["bad name"], &[]),
        follow(&[], &[("ns", "")]),
    ] {
        let err = cm.watch(request.clone()).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}: {err}");
    }
}

/// Expands each behaviour into one test per store.
macro_rules! suite {
    ($($behaviour:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::Backend::Redis).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(super::Backend::Cluster).await
                }
            )*
        }
    };
}

suite!(
    each_scope_reaches_its_watchers,
    get_carries_the_position_before_its_lookup,
    resume_replays_what_came_after,
    resume_from_a_trimmed_position_resets,
    idle_streams_carry_heartbeats,
    lookups_keep_their_position_between_heartbeats,
    watch_validates_its_request,
);

/// The `q` quantile of sorted `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index]
}

/// The mean of a Prometheus histogram's series for `command`, from a scrape of `text`.
fn mean_command_seconds(text: &str, command: &str) -> Option<f64> {
    let value = |suffix: &str| -> Option<f64> {
        let prefix = format!(
            "cache_money_store_command_duration_seconds_{suffix}{{command=\"{command}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
    };
    Some(value("sum")? / value("count")?)
}

/// Busts through replica 2 reach a watcher on replica 1 (fan-out through the shared store):
/// every one of `BUSTS`, in order, with the latency from the bust RPC returning to the event
/// arriving printed (p50, p99) and bounded generously, beside replica 2's own timing of its
/// store commands (the publish cost: `XADD`, alone or pipelined behind the change).
async fn fan_out(backend: Backend) {
    const BUSTS: u64 = 200;
    let (_store, args) = backend.store();
    let one = server(&args, &[]);
    let two = server(&args, &["--metrics-listen", "127.0.0.1:0"]);
    let mut watching = one.client().await;
    let mut busting = two.client().await;
    let mut watcher = Watcher::ready(&mut watching, follow(&["fan"], &[])).await;
    let (mut latencies, mut round_trips) = (Vec::new(), Vec::new());
    for n in 0..BUSTS {
        write(&mut busting, key("fan", "f", n)).await;
        watcher.next_change().await;
        let sent = Instant::now();
        let position = bust(&mut busting, key("fan", "f", n)).await;
        let returned = Instant::now();
        let event = watcher.next_change().await;
        latencies.push(returned.elapsed());
        round_trips.push(sent.elapsed());
        assert_eq!(event.position, position, "the bust's own event, in order");
        assert_eq!(event.scope, Scope::ScopeEntry as i32);
        assert_eq!(event.key.unwrap_or_default().digest, common::digest(n));
    }
    latencies.sort();
    round_trips.sort();
    let (p50, p99) = (quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    let scrape = common::http_get(two.metrics_addr(), "/metrics", &[]);
    // One Redis sends a write or a one-entry bust with its XADD in one pipeline; the cluster
    // sends the XADD to the stream's node after it.
    let timed: Vec<String> = ["SET", "UNLINK", "XADD", "SET+XADD", "UNLINK+XADD"]
        .into_iter()
        .filter_map(|command| {
            let mean = mean_command_seconds(&scrape.body, command)?;
            Some(format!("{command} {:.0} us", mean * 1e6))
        })
        .collect();
    assert!(!timed.is_empty(), "no store command timed");
    eprintln!(
        "watch fan-out over {backend:?}: bust returned on replica 2 -> event on replica 1's watcher: p50 {p50:?}, p99 {p99:?}, max {:?}; bust sent -> event: p50 {:?}, p99 {:?} ({BUSTS} busts); replica 2's mean store commands: {}",
        latencies[latencies.len() - 1],
        quantile(&round_trips, 0.5),
        quantile(&round_trips, 0.99),
        timed.join(", "),
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
}

/// A watcher whose replica is killed sees its stream fail, reconnects to another replica
/// with its last position, and receives what was published meanwhile; a replica shut down
/// with SIGTERM ends its streams at once with UNAVAILABLE rather than holding the drain.
async fn resume_on_another_replica(backend: Backend) {
    let (_store, args) = backend.store();
    let mut one = server(&args, &[]);
    let two = server(&args, &["--drain-timeout-ms", "30000"]);
    let mut cm_one = one.client().await;
    let mut cm_two = two.client().await;
    let mut watcher = Watcher::ready(&mut cm_one, follow(&["rr"], &[])).await;
    let seen = bust(&mut cm_two, key("rr", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, seen);
    let last = watcher.last;

    one.kill();
    let ended = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match watcher.events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream ends when its replica dies");
    assert!(
        ended.is_some(),
        "a killed replica's stream ends in an error"
    );

    let missed = [
        bust(&mut cm_two, key("rr", "f", 2)).await,
        bust_function(&mut cm_two, "rr", "g").await,
    ];
    let (mut resumed, first) = Watcher::start(
        &mut cm_two,
        pb::WatchRequest {
            after: last,
            ..follow(&["rr"], &[])
        },
    )
    .await;
    assert_eq!(first.position, missed[0], "{first:?}");
    assert_eq!(resumed.next().await.position, missed[1]);
    assert_eq!(
        kind(&resumed.next().await),
        pb::WatchEventKind::WatchEventHeartbeat
    );

    // SIGTERM: the stream ends with UNAVAILABLE long before the 30 s drain timeout.
    let started = Instant::now();
    two.terminate();
    let status = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match resumed.events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends at shutdown");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    assert!(status.message().contains("after="), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

mod replicas {
    use super::Backend;

    #[tokio::test]
    async fn redis_fan_out() {
        super::fan_out(Backend::Redis).await
    }

    #[tokio::test]
    async fn cluster_fan_out() {
        super::fan_out(Backend::Cluster).await
    }

    #[tokio::test]
    async fn redis_resume_on_another_replica() {
        super::resume_on_another_replica(Backend::Redis).await
    }

    #[tokio::test]
    async fn cluster_resume_on_another_replica() {
        super::resume_on_another_replica(Backend::Cluster).await
    }
}

/// A watcher that stops reading falls behind the server's buffer and, once it reads again,
/// gets a RESET (never a silent gap) followed by newer events; `Stats` counts the watcher,
/// what was published and the reset.
#[tokio::test]
async fn a_watcher_that_falls_behind_gets_a_reset() {
    // Far more events than HTTP/2 flow control lets the server push ahead into the
    // connection's windows, so the server's own buffer (16) overflows.
    const BATCHES: u64 = 60;
    const BATCH: u64 = 1000;
    let server = CacheServer::memory(&["--watch-buffer", "16"]);
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["slow"], &[])).await;
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.watchers, 1);
    let mut last = 0;
    for batch in 0..BATCHES {
        let entries = (0..BATCH)
            .map(|n| put(key("slow", "f", batch * BATCH + n), b"v", 60))
            .collect();
        last = cm
            .put_many(pb::PutManyRequest { entries })
            .await
            .expect("PutMany")
            .into_inner()
            .position;
    }
    let mut reset = None;
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let event = watcher.next().await;
            if kind(&event) == pb::WatchEventKind::WatchEventReset && reset.is_none() {
                reset = Some(event.position);
            }
            if event.position >= last {
                break;
            }
        }
    })
    .await
    .expect("caught up within the timeout");
    let reset = reset.expect("a RESET before the watcher caught up");
    assert!(reset < last, "events newer than the reset follow it");
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.invalidations_published, BATCHES * BATCH);
    assert!(stats.watch_resets >= 1, "{stats:?}");
    assert!(stats.watch_events_delivered < BATCHES * BATCH, "{stats:?}");
    drop(watcher);
    let gone = common::eventually(EVENT_TIMEOUT, || {
        let mut cm = cm.clone();
        async move {
            cm.stats(pb::StatsRequest {})
                .await
                .unwrap()
                .into_inner()
                .watchers
                == 0
        }
    })
    .await;
    assert!(gone, "a closed stream still counted as a watcher");
}

/// The invalidation stream deleted behind the servers' backs (a `FLUSHALL`, an eviction under
/// `allkeys-*`) restarts its numbering: watchers get a RESET at the new end, then the new
/// events.
#[tokio::test]
async fn a_restarted_stream_resets_its_watchers() {
    let (behind, server) = Backend::Redis.start(&["--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["rst"], &[])).await;
    for n in 0..3 {
        let position = bust(&mut cm, key("rst", "f", n)).await;
        assert_eq!(watcher.next_change().await.position, position);
    }
    let deleted: u64 = ::redis::cmd("DEL")
        .arg("cm:#invalidations")
        .query_async(&mut redis.connect().await)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the stream lives under the prefix");
    let restarted = bust(&mut cm, key("rst", "f", 9)).await;
    assert!(
        restarted > 1_000_000_000,
        "numbering starts again from the clock, not from 1: {restarted}"
    );
    let event = watcher.next_change().await;
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventReset,
        "{event:?}"
    );
    // The reader may see the restart before or after the first bust of the new stream.
    assert!(
        event.position <= restarted,
        "{event:?} after a restart at {restarted}"
    );
    let next = bust(&mut cm, key("rst", "f", 10)).await;
    let mut event = watcher.next_change().await;
    if event.position < next {
        // The restart's first bust, read after the RESET.
        assert_eq!(event.position, restarted, "{event:?}");
        event = watcher.next_change().await;
    }
    assert_eq!(kind(&event), pb::WatchEventKind::WatchEventInvalidation);
    assert_eq!(event.position, next);
}

/// Until the reader has read where the stream ends, nothing is claimed: a watcher from now
/// gets no heartbeat and a Get answers position 0 (unknown). An invalidation published in that
/// window is covered by the first heartbeat, which comes only once the reader knows the end
/// (review H1: a HEARTBEAT at 0 before the reader started, then the invalidation never sent).
#[tokio::test]
async fn nothing_is_claimed_before_the_reader_knows_the_end() {
    let redis = RedisServer::start();
    let mut admin = redis.connect().await;
    // A string where the stream belongs: the reader cannot read where the stream ends.
    let () = ::redis::cmd("SET")
        .arg("cm:#invalidations")
        .arg("in the way")
        .query_async(&mut admin)
        .await
        .unwrap();
    let server = server(
        &["--redis-url".to_owned(), redis.url()],
        &["--watch-heartbeat-ms", "100"],
    );
    assert!(
        server
            .wait_for_log("cannot read the invalidation stream's end", EVENT_TIMEOUT)
            .is_some(),
        "the reader tried and failed"
    );
    let mut cm = server.client().await;
    let events = cm
        .watch(follow(&["early"], &[]))
        .await
        .expect("Watch starts")
        .into_inner();
    let mut watcher = Watcher { events, last: 0 };
    let answer = lookup(&mut cm, key("early", "f", 1)).await;
    assert_eq!(answer.position, 0, "unknown until the reader knows the end");
    // At once: the string goes and the stream comes with one invalidation in it, so the
    // reader's first successful read of the end finds it published.
    let (id,): (String,) = ::redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg("cm:#invalidations")
        .ignore()
        .cmd("XADD")
        .arg("cm:#invalidations")
        .arg("0-*")
        .arg("scope")
        .arg("namespace")
        .arg("ns")
        .arg("early")
        .arg("cause")
        .arg("bust")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(id, "0-1");
    let first = watcher.next().await;
    assert_eq!(kind(&first), pb::WatchEventKind::WatchEventHeartbeat);
    assert_eq!(
        first.position, 1,
        "the first heartbeat covers what was published before the reader started"
    );
    let position = bust(&mut cm, key("early", "f", 2)).await;
    assert_eq!(watcher.next_change().await.position, position);
}

/// The reader's own reads never take a request's `--max-in-flight` permit: with the only
/// permit held by a write Redis holds back, heartbeats go on (each after the reader read the
/// stream's end on an idle read), nothing is shed and none of those reads ran under a permit
/// (review M1: the reader's tail read could shed a request on one Redis).
#[tokio::test]
async fn the_reader_never_takes_a_request_permit() {
    let redis = RedisServer::start();
    let server = server(
        &["--redis-url".to_owned(), redis.url()],
        &[
            "--watch-heartbeat-ms",
            "20",
            "--max-in-flight",
            "1",
            "--store-timeout-ms",
            "10000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["gate"], &[])).await;
    let mut admin = redis.connect().await;
    RedisServer::pause_writes(&mut admin, 10_000).await;
    let mut writer = cm.clone();
    let held = tokio::spawn(async move { writer.put(put(key("gate", "f", 1), b"v", 60)).await });
    let metrics = server.metrics_addr();
    let metric = move |name: &'static str| {
        common::http_get(metrics, "/metrics", &[])
            .body
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
    };
    let holding = common::eventually(EVENT_TIMEOUT, || async move {
        metric("cache_money_store_operations_in_flight") == Some(1.0)
    })
    .await;
    assert!(holding, "the write never took the permit");
    for _ in 0..5 {
        let event = watcher.next().await;
        assert_eq!(kind(&event), pb::WatchEventKind::WatchEventHeartbeat);
    }
    assert_eq!(
        metric("cache_money_requests_shed_total"),
        Some(0.0),
        "a request was shed"
    );
    // Only commands run under a permit are timed as store commands: the reader read the
    // stream's end before each of those heartbeats, none of it under a permit.
    assert_eq!(
        metric("cache_money_store_command_duration_seconds_count{command=\"XREVRANGE\"}"),
        None,
        "the reader's reads of the stream's end took request permits"
    );
    RedisServer::unpause(&mut admin).await;
    held.await.unwrap().expect("the held write goes through");
}

/// By default a failed publish never fails its write (the change was made): the Put answers
/// with position 0 (unknown) and its value is served; once the stream works again a bust of
/// everything is published in its place and reaches the watchers (review H4).
#[tokio::test]
async fn a_failed_publish_does_not_fail_the_write() {
    let (behind, server) = Backend::Redis.start(&["--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["be"], &[])).await;
    let before = bust(&mut cm, key("be", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, before);
    let admin = redis.connect().await;
    // XADD denied to the server's user: every publish fails, reads go on.
    let acl = |rule: &'static str| {
        let mut admin = admin.clone();
        async move {
            let () = ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg(rule)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    acl("-xadd").await;
    let written = tokio::time::timeout(EVENT_TIMEOUT, cm.put(put(key("be", "f", 2), b"v", 60)))
        .await
        .expect("the write answers")
        .expect("the write succeeds though its publish failed")
        .into_inner();
    assert_eq!(written.position, 0, "unknown: not published");
    let answer = lookup(&mut cm, key("be", "f", 2)).await;
    assert!(answer.hit, "the change was made");
    assert_eq!(
        answer.position, 0,
        "a lookup while the server owes a bust is answered with position 0 (never cached)"
    );
    let busted = tokio::time::timeout(
        EVENT_TIMEOUT,
        cm.bust(pb::BustRequest {
            key: Some(key("be", "f", 2)),
        }),
    )
    .await
    .expect("the bust answers")
    .expect("the bust succeeds though its publish failed")
    .into_inner();
    assert_eq!((busted.removed, busted.position), (1, 0));
    acl("+xadd").await;
    let event = tokio::time::timeout(EVENT_TIMEOUT, watcher.next_change())
        .await
        .expect("the bust of everything within the timeout");
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventInvalidation,
        "{event:?}"
    );
    assert_eq!(event.scope, Scope::ScopeAll as i32, "{event:?}");
    assert_eq!(event.position, before + 1, "nothing else was published");
    // Paid: lookups carry positions again (once the reader has read the bust).
    let positioned = common::eventually(EVENT_TIMEOUT, || {
        let mut cm = cm.clone();
        async move { lookup(&mut cm, key("be", "f", 3)).await.position > before }
    })
    .await;
    assert!(
        positioned,
        "lookups stayed at position 0 after the debt was paid"
    );
}

/// A Put whose caller's deadline passes while the store is slow (writes paused) is dropped
/// by tonic mid-handler; its invalidation is not lost silently: the dropped handler owes a
/// bust of everything, which reaches the watchers once writes resume (review: cancel safety).
#[tokio::test]
async fn a_write_dropped_at_its_deadline_owes_a_bust_of_everything() {
    let (behind, server) = Backend::Redis.start(&["--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["cs"], &[])).await;
    let before = bust(&mut cm, key("cs", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, before);
    let mut admin = redis.connect().await;
    let () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut request = tonic::Request::new(put(key("cs", "f", 2), b"v", 60));
    request.set_timeout(Duration::from_millis(50));
    let err = cm
        .put(request)
        .await
        .expect_err("the deadline passes first");
    // The client gives up on its own (CANCELLED) as the server drops the handler.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err}"
    );
    let found = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let event = watcher.next_change().await;
            if kind(&event) == pb::WatchEventKind::WatchEventInvalidation
                && event.scope == Scope::ScopeAll as i32
            {
                return event;
            }
        }
    })
    .await
    .expect("a bust of everything once writes resume");
    assert!(found.position > before, "{found:?}");
}

/// With `--invalidations required` a failed publish fails its write, and, the change having
/// been made, a bust of everything is still owed and reaches the watchers once the stream
/// works again (review).
#[tokio::test]
async fn a_required_publish_that_fails_is_owed_too() {
    let (behind, server) =
        Backend::Redis.start(&["--invalidations", "required", "--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["ro"], &[])).await;
    let before = bust(&mut cm, key("ro", "f", 1)).await;
    assert_eq!(watcher.next_change().await.position, before);
    let mut admin = redis.connect().await;
    for rule in ["-xadd", "+xadd"] {
        if rule == "+xadd" {
            let err = tokio::time::timeout(EVENT_TIMEOUT, cm.put(put(key("ro", "f", 2), b"v", 60)))
                .await
                .expect("the write answers")
                .expect_err("required: the publish fails");
            assert_eq!(err.code(), Code::Unavailable, "{err}");
        }
        let () = ::redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let event = tokio::time::timeout(EVENT_TIMEOUT, watcher.next_change())
        .await
        .expect("the bust of everything within the timeout");
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventInvalidation,
        "{event:?}"
    );
    assert_eq!(event.scope, Scope::ScopeAll as i32, "{event:?}");
    assert_eq!(event.position, before + 1, "nothing else was published");
}

/// With `--invalidations off` nothing is published (no stream in Redis), writes and busts
/// answer position 0, and Watch answers UNIMPLEMENTED naming the flag (review H4).
#[tokio::test]
async fn invalidations_off_publishes_nothing() {
    let (behind, server) = Backend::Redis.start(&["--invalidations", "off"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let err = cm.watch(follow(&["off"], &[])).await.expect_err("no Watch");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    assert!(err.message().contains("--invalidations"), "{err}");
    assert_eq!(write(&mut cm, key("off", "f", 1)).await, 0);
    assert_eq!(bust(&mut cm, key("off", "f", 1)).await, 0);
    assert_eq!(bust_namespace(&mut cm, "off").await, 0);
    let exists: u64 = ::redis::cmd("EXISTS")
        .arg("cm:#invalidations")
        .query_async(&mut redis.connect().await)
        .await
        .unwrap();
    assert_eq!(exists, 0, "nothing was published");
}

/// The `XREAD` calls Redis has run so far.
async fn xread_calls(admin: &mut ::redis::aio::MultiplexedConnection) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_xread:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// An entry cache-money did not write (`XADD … * foo bar`) is reported, not spun on: a write
/// that must publish (`--invalidations required`) answers UNAVAILABLE naming the key to
/// delete, not INTERNAL; the reader backs off instead of reading in a hot loop; deleting the
/// key brings watchers back through a RESET (review H3).
#[tokio::test]
async fn a_foreign_entry_is_reported_not_spun_on() {
    let (behind, server) =
        Backend::Redis.start(&["--invalidations", "required", "--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["fe"], &[])).await;
    for n in 0..3 {
        let position = bust(&mut cm, key("fe", "f", n)).await;
        assert_eq!(watcher.next_change().await.position, position);
    }
    let mut admin = redis.connect().await;
    let _: String = ::redis::cmd("XADD")
        .arg("cm:#invalidations")
        .arg("*")
        .arg("foo")
        .arg("bar")
        .query_async(&mut admin)
        .await
        .unwrap();
    let err = cm
        .put(put(key("fe", "f", 9), b"v", 60))
        .await
        .expect_err("required: the publish fails");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("DEL cm:#invalidations"), "{err}");
    // A rate, so measured over a window: a hot loop runs thousands of XREADs in it.
    let before = xread_calls(&mut admin).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spent = xread_calls(&mut admin).await - before;
    assert!(spent < 50, "{spent} XREADs in 500 ms");
    let () = ::redis::cmd("DEL")
        .arg("cm:#invalidations")
        .query_async(&mut admin)
        .await
        .unwrap();
    let event = watcher.next_change().await;
    assert_eq!(
        kind(&event),
        pb::WatchEventKind::WatchEventReset,
        "{event:?}"
    );
    let position = bust(&mut cm, key("fe", "f", 10)).await;
    // The failed Put left the hub owing a bust of everything, published once the stream
    // takes writes again: it may reach the watcher first, and only it may.
    let mut event = watcher.next_invalidation().await;
    if event.position != position {
        assert_eq!(
            event.scope,
            pb::InvalidationScope::ScopeAll as i32,
            "{event:?}"
        );
        assert!(event.position < position, "{event:?}");
        event = watcher.next_invalidation().await;
    }
    assert_eq!(event.position, position, "{event:?}");
}

/// The reviewer's experiment: a stream replaced under the same numbering (5 Puts, then
/// `MULTI; DEL; XADD 0-1; XADD 0-2; EXEC`, then 4 Puts: the new stream ends above the
/// reader's last position) gives watchers a RESET, never a silent skip of the new entries
/// the reader had numbered already (review H2).
#[tokio::test]
async fn a_stream_replaced_under_the_same_numbering_resets() {
    let (behind, server) = Backend::Redis.start(&["--watch-heartbeat-ms", "100"]);
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let mut cm = server.client().await;
    let mut watcher = Watcher::ready(&mut cm, follow(&["rep"], &[])).await;
    for n in 0..5 {
        let position = write(&mut cm, key("rep", "f", n)).await;
        assert_eq!(watcher.next_change().await.position, position);
    }
    let mut admin = redis.connect().await;
    let (first, second): (String, String) = ::redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg("cm:#invalidations")
        .ignore()
        .cmd("XADD")
        .arg("cm:#invalidations")
        .arg("0-1")
        .arg("scope")
        .arg("namespace")
        .arg("ns")
        .arg("rep")
        .arg("cause")
        .arg("bust")
        .cmd("XADD")
        .arg("cm:#invalidations")
        .arg("0-2")
        .arg("scope")
        .arg("namespace")
        .arg("ns")
        .arg("rep")
        .arg("cause")
        .arg("bust")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!((first.as_str(), second.as_str()), ("0-1", "0-2"));
    let mut last = 0;
    for n in 5..9 {
        last = write(&mut cm, key("rep", "f", n)).await;
    }
    assert_eq!(last, 6, "numbering went on from the new stream's 0-2");
    let mut reset = false;
    loop {
        let event = watcher.next_change().await;
        reset |= kind(&event) == pb::WatchEventKind::WatchEventReset;
        if event.position >= last {
            break;
        }
    }
    assert!(reset, "the replaced entries were skipped silently");
}

/// A stream deleted and re-created (a Redis restarted without persistence) numbers above the
/// old one, from Redis's clock: a watcher resuming from a position of the old stream gets a
/// RESET, even once the new stream has more entries than the old one had (with a plain count
/// from 1 the old position would then name an entry of the new stream, and the new entries
/// before it would be skipped silently). Memory too: a restarted server numbers from its
/// start time.
async fn a_recreated_sequence_numbers_above_the_old_one(backend: Backend) {
    let (behind, mut server) = backend.start(&["--watch-heartbeat-ms", "100"]);
    let mut cm = server.client().await;
    let old = write(&mut cm, key("re", "f", 1)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        old >= (now - 60) * 1_000_000_000,
        "the first position {old} is not numbered from the clock"
    );
    // The clock must move on by a millisecond for the re-created sequence to number above.
    tokio::time::sleep(Duration::from_millis(5)).await;
    match &behind {
        Behind::Redis(redis) => {
            let mut admin = redis.connect().await;
            let _: () = ::redis::cmd("DEL")
                .arg("cm:#invalidations")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        Behind::Nothing => {
            server.restart();
            cm = server.client().await;
        }
        Behind::Cluster(_) => unreachable!("memory and Redis only"),
    }
    let new = write(&mut cm, key("re", "f", 2)).await;
    assert!(new > old, "the new sequence numbers {new}, not above {old}");
    let (mut resumed, first) = Watcher::start(
        &mut cm,
        pb::WatchRequest {
            after: old,
            ..follow(&["re"], &[])
        },
    )
    .await;
    assert_eq!(kind(&first), pb::WatchEventKind::WatchEventReset);
    assert!(
        first.position < new,
        "the reset covers what came before the new sequence"
    );
    assert_eq!(
        resumed.next_change().await.position,
        new,
        "then the new one's replay"
    );
    let later = write(&mut cm, key("re", "f", 3)).await;
    // The reader's own RESET for the deletion may come in between (it notices on its next
    // read); the write's invalidation follows.
    assert_eq!(resumed.next_invalidation().await.position, later);
}

#[tokio::test]
async fn memory_a_recreated_sequence_numbers_above_the_old_one() {
    a_recreated_sequence_numbers_above_the_old_one(Backend::Memory).await
}

#[tokio::test]
async fn redis_a_recreated_sequence_numbers_above_the_old_one() {
    a_recreated_sequence_numbers_above_the_old_one(Backend::Redis).await
}
