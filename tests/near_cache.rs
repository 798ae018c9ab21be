//! The client's near cache (`ClientOptions::near_cache_bytes`) against real servers: two
//! replicas over one `redis-server` or one Redis Cluster, a client with the near cache on
//! each. A bust or overwrite of any scope made through one replica reaches the other's
//! client within a bound (measured and printed); a client whose stream is killed or frozen
//! serves nothing from its copies until a stream is back (on the same replica or, with
//! `connect_many`, another); a bust applied while a lookup is in flight keeps that lookup's
//! answer out; a restarted sequence's RESET lowers `applied`; own busts and refreshes are
//! seen at once; the size bounds the copies; and a randomized run of memoize, bust and Put
//! on a few keys never returns a value older than the bound. Also: a stream whose heartbeats
//! stop stops the near cache even while invalidations flow; writes to other keys do not keep
//! copies out; the README example runs as written; a new namespace keeps the copies; a
//! refused stream is asked for again; a cancelled bust still drops the copy. A near hit's
//! cost against a remote hit's is printed.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use cache_money::{Client, ClientMetrics, ClientOptions, Function, Ttl, pb};
use common::{CacheServer, RedisCluster, RedisServer, eventually};
use tokio::sync::Notify;

/// How long a bust made through one replica may take to reach another replica's client's
/// near cache before the test fails: generous, for a loaded machine; the delay measured is
/// printed.
const BOUND: Duration = Duration::from_millis(500);

/// How long the near cache may take to become usable (its stream's first event), or to
/// notice an outage, before the test fails.
const SETTLE: Duration = Duration::from_secs(10);

/// The near cache's size in the tests: far more than they fill.
const NEAR_BYTES: usize = 1 << 20;

/// Which store the replicas share.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Redis,
    Cluster,
}

/// The store behind the replicas, kept alive while they run.
#[expect(dead_code, reason = "held only so the store outlives its servers")]
enum Behind {
    Redis(RedisServer),
    Cluster(Arc<RedisCluster>),
}

impl Backend {
    /// A store and the arguments that point a server at it (its own key prefix on the
    /// shared cluster); heartbeats every 100 ms, so streams start quickly.
    fn store(self) -> (Behind, Vec<String>) {
        let mut args = vec!["--watch-heartbeat-ms".to_owned(), "100".to_owned()];
        let behind = match self {
            Backend::Redis => {
                let redis = RedisServer::start();
                args.extend(["--redis-url".to_owned(), redis.url()]);
                Behind::Redis(redis)
            }
            Backend::Cluster => {
                let cluster = RedisCluster::shared();
                args.extend([
                    "--redis-cluster".to_owned(),
                    cluster.seeds(),
                    "--key-prefix".to_owned(),
                    common::unique_prefix("near"),
                ]);
                Behind::Cluster(cluster)
            }
        };
        (behind, args)
    }

    /// Two replicas over one fresh store.
    fn replicas(self) -> (Behind, CacheServer, CacheServer) {
        let (behind, args) = self.store();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (behind, CacheServer::start(&args), CacheServer::start(&args))
    }
}

fn near_options() -> ClientOptions {
    ClientOptions {
        near_cache_bytes: NEAR_BYTES,
        ..ClientOptions::default()
    }
}

/// A client of `server` with the near cache on.
async fn near_client(server: &CacheServer, options: ClientOptions) -> Client {
    Client::connect_with(server.url(), options)
        .await
        .expect("client")
}

/// A client of `server` without a near cache.
async fn plain_client(server: &CacheServer) -> Client {
    Client::connect(server.url()).await.expect("client")
}

/// The "source of truth" a memoized function reads: one version number.
#[derive(Debug, Default)]
struct Source(AtomicU64);

impl Source {
    fn get(&self) -> u64 {
        self.0.load(SeqCst)
    }

    fn set(&self, version: u64) {
        self.0.store(version, SeqCst)
    }
}

/// Memoizes `args` of `f`, computing the source's current version.
async fn read(f: &Function, args: u64, source: &Source) -> u64 {
    let version = source.get();
    f.memoize(&(args,), || async move { version })
        .await
        .expect("memoize")
}

/// Memoizes until the call is answered from the near cache with `expected`.
async fn warm(f: &Function, client: &Client, args: u64, source: &Source, expected: u64) {
    let warmed = eventually(SETTLE, || async {
        let before = client.metrics().near_hits;
        let value = read(f, args, source).await;
        value == expected && client.metrics().near_hits > before
    })
    .await;
    assert!(
        warmed,
        "no near hit within {SETTLE:?}: {:?}",
        client.metrics()
    );
}

/// How another client changes the entry that a near cache holds.
#[derive(Debug, Clone, Copy)]
enum Change {
    Bust,
    BustFunction,
    BustNamespace,
    BustTag,
    BustAll,
    Put,
}

async fn change(how: Change, other: &Client, f: &Function, args: u64, new: u64) {
    match how {
        Change::Bust => {
            f.bust(&(args,)).await.expect("bust");
        }
        Change::BustFunction => {
            f.bust_all().await.expect("bust function");
        }
        Change::BustNamespace => {
            other.bust_namespace(f.namespace()).await.expect("bust ns");
        }
        Change::BustTag => {
            other.bust_tag(f.namespace(), "t").await.expect("bust tag");
        }
        Change::BustAll => {
            other.bust_all().await.expect("bust all");
        }
        Change::Put => {
            let request = pb::PutRequest {
                key: Some(pb::Key {
                    namespace: f.namespace().to_owned(),
                    function: f.name().to_owned(),
                    digest: f.digest(&(args,)).expect("digest"),
                }),
                value: serde_json::to_vec(&new).expect("encode").into(),
                ttl_seconds: 60,
                ..Default::default()
            };
            other.raw().put(request).await.expect("put");
        }
    }
}

/// A bust of every scope, and an overwrite, made by a client of replica 2 reaches a client of
/// replica 1 whose near cache holds the value: the invalidation is applied, and its next
/// `memoize` returns the new value, within [`BOUND`] of the change returning (both delays
/// printed; the second includes the remote miss and write that fetch the new value).
async fn changes_reach_other_replicas(backend: Backend) {
    let (_store, one, two) = backend.replicas();
    let near = near_client(&one, near_options()).await;
    let other = plain_client(&two).await;
    let source = Source::default();
    let mut delays = Vec::new();
    for (n, how) in [
        Change::Bust,
        Change::BustFunction,
        Change::BustNamespace,
        Change::BustTag,
        Change::BustAll,
        Change::Put,
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as u64;
        let (old, new) = (2 * n + 1, 2 * n + 2);
        let mine = near.function("near.app", "f", Ttl::MINUTE).tagged(["t"]);
        let theirs = other.function("near.app", "f", Ttl::MINUTE);
        source.set(old);
        warm(&mine, &near, n, &source, old).await;
        source.set(new);
        let invalidations = near.metrics().near_invalidations;
        change(how, &other, &theirs, n, new).await;
        let changed = Instant::now();
        // When the invalidation is applied (it may come before the change's own answer).
        while near.metrics().near_invalidations == invalidations {
            assert!(
                changed.elapsed() < BOUND,
                "{how:?}: no invalidation {BOUND:?} after the change"
            );
            tokio::task::yield_now().await;
        }
        let dropped = changed.elapsed();
        let seen = loop {
            if read(&mine, n, &source).await == new {
                break changed.elapsed();
            }
            assert!(
                changed.elapsed() < BOUND,
                "{how:?}: still the old value {BOUND:?} after the change: {:?}",
                near.metrics()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(
            near.metrics().near_invalidations > invalidations,
            "{how:?} came through the stream"
        );
        delays.push(format!("{how:?} {dropped:?} / {seen:?}"));
    }
    eprintln!(
        "near cache over {backend:?}: change returned on replica 2 -> invalidation applied by replica 1's client / new value read by it: {}",
        delays.join(", ")
    );
}

/// A client whose replica is killed (SIGKILL) stops serving from its near cache as soon as
/// its stream fails (not a single near hit after), and serves from it again once the
/// replica is back; the time to notice is printed.
async fn a_killed_stream_stops_the_near_cache(backend: Backend) {
    let (_store, mut one, _two) = backend.replicas();
    let near = near_client(&one, near_options()).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;
    assert!(near.metrics().near_stream_healthy);

    let killed = Instant::now();
    one.kill();
    let noticed = eventually(SETTLE, || async { !near.metrics().near_stream_healthy }).await;
    assert!(
        noticed,
        "the stream still looks healthy: {:?}",
        near.metrics()
    );
    let took = killed.elapsed();
    let before = near.metrics();
    for _ in 0..10 {
        read(&f, 1, &source).await;
    }
    let after = near.metrics();
    assert_eq!(
        after.near_hits, before.near_hits,
        "served from the near cache"
    );
    assert!(after.near_flushes >= 1, "{after:?}");

    one.restart();
    warm(&f, &near, 1, &source, 1).await;
    let metrics = near.metrics();
    eprintln!(
        "near cache over {backend:?}: a killed replica's stream noticed after {took:?}; near hits again after restart ({metrics:?})",
    );
}

/// A client whose replica is frozen (SIGSTOP: its connection stays open, nothing arrives)
/// stops serving from its near cache once the stream has been silent for
/// `near_cache_silence`, and serves again once the replica is thawed.
#[tokio::test]
async fn a_silent_stream_stops_the_near_cache() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let silence = Duration::from_millis(500);
    let options = ClientOptions {
        near_cache_silence: silence,
        ..near_options()
    };
    let near = near_client(&one, options).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;

    one.freeze();
    let frozen = Instant::now();
    let noticed = eventually(SETTLE, || async { !near.metrics().near_stream_healthy }).await;
    let took = frozen.elapsed();
    one.thaw();
    assert!(noticed, "a silent stream still looks healthy");
    assert!(
        took >= silence / 2,
        "noticed after {took:?}, before any silence"
    );
    warm(&f, &near, 1, &source, 1).await;
    let metrics = near.metrics();
    assert!(metrics.near_flushes >= 1, "{metrics:?}");
    eprintln!(
        "near cache: a frozen replica's stream given up after {took:?} (silence {silence:?})"
    );
}

/// A replica that owes a bust of everything (its publish failed: its Redis user may not
/// XADD) stops its heartbeats, but its watchers still get the invalidations other replicas
/// publish in their namespaces. Those must not keep the near cache trusting the stream: it
/// stops serving its copies within `near_cache_silence` (plus a margin) of the last
/// heartbeat, so the value overwritten through the indebted replica is not served from the
/// copy for long. Without the fix (silence counted from any event) the old value was still
/// served 8 s later (the review's probe).
#[tokio::test]
async fn invalidations_without_heartbeats_do_not_keep_copies_served() {
    let redis = RedisServer::start();
    let mut admin = redis.connect().await;
    let () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("r1")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER r1");
    let url1 = format!("redis://r1:pw@127.0.0.1:{}", redis.port());
    let one = CacheServer::start(&["--redis-url", &url1, "--watch-heartbeat-ms", "100"]);
    let two = CacheServer::start(&["--redis-url", &redis.url(), "--watch-heartbeat-ms", "100"]);
    let silence = Duration::from_millis(500);
    let options = ClientOptions {
        near_cache_silence: silence,
        ..near_options()
    };
    let near = near_client(&one, options).await;
    let writer = plain_client(&one).await;
    let other = plain_client(&two).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;

    // From here replica 1 cannot publish: its overwrite answers position 0 and it owes a
    // bust of everything, so it stops its heartbeats.
    let () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("r1")
        .arg("-xadd")
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER r1 -xadd");
    let request = pb::PutRequest {
        key: Some(pb::Key {
            namespace: "near.app".into(),
            function: "f".into(),
            digest: f.digest(&(1u64,)).expect("digest"),
        }),
        value: serde_json::to_vec(&2u64).expect("json").into(),
        ttl_seconds: 60,
        ..Default::default()
    };
    let put = writer.raw().put(request).await.expect("put").into_inner();
    assert_eq!(put.position, 0, "the publish was expected to fail");
    let changed = Instant::now();
    source.set(3);

    // Meanwhile replica 2 publishes invalidations of other keys of the namespace.
    let g = other.function("near.app", "g", Ttl::MINUTE);
    let mut last_stale = None;
    let mut n = 0u64;
    while changed.elapsed() < Duration::from_secs(4) {
        n += 1;
        g.bust(&(n,)).await.expect("bust");
        let before = near.metrics().near_hits;
        let value = read(&f, 1, &source).await;
        if value == 1 && near.metrics().near_hits > before {
            last_stale = Some(changed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bound = silence + Duration::from_secs(1);
    eprintln!(
        "near cache: with heartbeats stopped and {n} invalidations flowing, the old copy was served until {last_stale:?} after the overwrite (bound {bound:?}); {:?}",
        near.metrics()
    );
    assert!(
        last_stale.is_none_or(|at| at < bound),
        "the old value was served from the copy {last_stale:?} after the overwrite"
    );
    assert_eq!(read(&f, 1, &source).await, 2, "the overwrite is read");
}

/// A bust whose invalidation the near cache applies while one of its lookups is in flight
/// (the lookup read the old value before the bust; its answer arrives after) keeps that
/// answer out of the near cache: the next call gets the new value, not a near hit. The
/// client's test hook holds the answer until the invalidation is applied, so the race is
/// made, not hoped for. Without the rule (insert only if applied <= the answer's position),
/// the old value would be inserted after the invalidation that should have dropped it, and
/// served until its TTL.
async fn a_bust_during_a_lookup_is_not_lost(backend: Backend) {
    let (_store, one, two) = backend.replicas();
    let answered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let armed = Arc::new(AtomicBool::new(false));
    let hook = {
        let (answered, release, armed) = (answered.clone(), release.clone(), armed.clone());
        Arc::new(move || {
            let (answered, release, armed) = (answered.clone(), release.clone(), armed.clone());
            Box::pin(async move {
                if armed.swap(false, SeqCst) {
                    answered.notify_one();
                    release.notified().await;
                }
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        })
    };
    let options = ClientOptions {
        near_insert_hook: Some(hook),
        ..near_options()
    };
    let near = near_client(&one, options).await;
    let other = plain_client(&two).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    // The stream is healthy (a near hit of another key), and key 7 is stored remotely with
    // version 1 but not copied (written by the other client).
    warm(&f, &near, 0, &source, 1).await;
    let theirs = other.function("near.app", "f", Ttl::MINUTE);
    assert_eq!(read(&theirs, 7, &source).await, 1);

    armed.store(true, SeqCst);
    let lookup = {
        let f = f.clone();
        tokio::spawn(async move {
            let source = Source::default();
            read(&f, 7, &source).await
        })
    };
    answered.notified().await;
    // The lookup has its answer (version 1): bust through the other replica and wait until
    // this client's stream has applied the invalidation.
    let invalidations = near.metrics().near_invalidations;
    source.set(2);
    theirs.bust(&(7,)).await.expect("bust");
    let applied = eventually(SETTLE, || async {
        near.metrics().near_invalidations > invalidations
    })
    .await;
    assert!(applied, "the bust's invalidation never arrived");
    release.notify_one();
    assert_eq!(lookup.await.expect("lookup"), 1, "it read before the bust");

    let hits = near.metrics().near_hits;
    assert_eq!(read(&f, 7, &source).await, 2, "the old value was cached");
    assert_eq!(near.metrics().near_hits, hits, "served from the near cache");
}

/// Writes to other keys of a namespace (every memoize miss elsewhere makes one) do not keep
/// this client's lookups of unchanged keys out of its near cache: it remembers what recent
/// invalidations named, and keeps an answer out only when one after it names its key.
/// Without that (any invalidation after a lookup was sent kept its answer out), about half
/// of the answers were refused under a few hundred writes a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_other_keys_do_not_keep_copies_out() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let writer = plain_client(&one).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 0, &source, 1).await;
    // The keys read below are written (and their invalidations applied) before the traffic.
    let theirs = writer.function("near.app", "f", Ttl::MINUTE);
    let keys = 100..300u64;
    for k in keys.clone() {
        assert_eq!(read(&theirs, k, &source).await, 1);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..4u64)
        .map(|t| {
            let (g, stop, writes) = (
                writer.function("near.app", "g", Ttl::MINUTE),
                stop.clone(),
                writes.clone(),
            );
            tokio::spawn(async move {
                let mut n = t * 1_000_000;
                while !stop.load(SeqCst) {
                    n += 1;
                    let _: u64 = g.memoize(&(n,), || async move { n }).await.expect("g");
                    writes.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let before = near.metrics();
    let mut copied = 0;
    for k in keys.clone() {
        assert_eq!(read(&f, k, &source).await, 1);
        let hits = near.metrics().near_hits;
        assert_eq!(read(&f, k, &source).await, 1);
        if near.metrics().near_hits > hits {
            copied += 1;
        }
    }
    let took = started.elapsed();
    stop.store(true, SeqCst);
    for task in tasks {
        task.await.expect("writer");
    }
    let after = near.metrics();
    let tried = keys.count();
    let rate = writes.load(SeqCst) as f64 / (took + Duration::from_millis(200)).as_secs_f64();
    eprintln!(
        "near cache: with {rate:.0} writes/s to other keys of the namespace, {copied} of {tried} remote hits copied ({} refused, {} flushes)",
        after.near_insert_refused - before.near_insert_refused,
        after.near_flushes - before.near_flushes,
    );
    assert!(
        rate > 50.0,
        "too little traffic to tell: {rate:.0} writes/s"
    );
    assert!(
        copied * 10 >= tried * 9,
        "{copied} of {tried} copied; {after:?}"
    );
}

/// The invalidation sequence deleted behind the servers' backs restarts its numbering (from
/// the clock, above the old one): the near cache gets a RESET, drops its copies, takes the
/// RESET's position as `applied`, and stays coherent with busts made after it. (A RESET that
/// lowers `applied`, a stream replaced under a lower numbering, is the unit test
/// `a_reset_lowers_applied_and_voids_lookups_in_flight` in `client/near.rs`.)
#[tokio::test]
async fn a_restarted_sequence_resets_the_near_cache() {
    let (behind, one, two) = Backend::Redis.replicas();
    let Behind::Redis(redis) = &behind else {
        unreachable!("a Redis backend")
    };
    let near = near_client(&one, near_options()).await;
    let other = plain_client(&two).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let theirs = other.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;

    let deleted: u64 = ::redis::cmd("DEL")
        .arg("cm:#invalidations")
        .query_async(&mut redis.connect().await)
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the stream lives under the default prefix");
    theirs.bust(&(99,)).await.expect("bust");
    let reset = eventually(SETTLE, || async { near.metrics().near_resets >= 1 }).await;
    assert!(reset, "no RESET applied: {:?}", near.metrics());
    let hits = near.metrics().near_hits;
    assert_eq!(read(&f, 1, &source).await, 1);
    assert_eq!(near.metrics().near_hits, hits, "a copy survived the RESET");
    warm(&f, &near, 1, &source, 1).await;

    source.set(2);
    theirs.bust(&(1,)).await.expect("bust");
    let changed = Instant::now();
    while read(&f, 1, &source).await != 2 {
        assert!(
            changed.elapsed() < BOUND,
            "the bust after the RESET was missed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A client of two replicas (`Client::connect_many`) keeps its near cache through the loss of
/// either: after replica 1 is killed its stream is on replica 2; replica 1 comes back, replica
/// 2 is killed, and the stream (which was on replica 2) drops, empties the copies and moves to
/// replica 1, where copies are served again. The time to recover is printed.
#[tokio::test]
async fn a_stream_moves_to_another_replica() {
    let (_store, mut one, mut two) = Backend::Redis.replicas();
    let near = Client::connect_many_with([one.url(), two.url()], near_options())
        .await
        .expect("client");
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;

    one.kill();
    warm(&f, &near, 1, &source, 1).await;
    // Ready when this returns; the client's health checks take it back within a second.
    one.restart();

    let flushes = near.metrics().near_flushes;
    let killed = Instant::now();
    two.kill();
    let dropped = eventually(SETTLE, || async { near.metrics().near_flushes > flushes }).await;
    assert!(
        dropped,
        "the stream was not on replica 2: {:?}",
        near.metrics()
    );
    warm(&f, &near, 1, &source, 1).await;
    eprintln!(
        "near cache: stream moved to the other replica, copies served again {:?} after the kill",
        killed.elapsed()
    );
}

/// Copies are pushed out to stay within `near_cache_bytes`, and counted.
#[tokio::test]
async fn the_size_bounds_the_near_cache() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let options = ClientOptions {
        near_cache_bytes: 4096,
        ..near_options()
    };
    let near = near_client(&one, options).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 0, &source, 1).await;
    // Each entry weighs about 360 bytes (320 of them overhead): 4 KiB holds about eleven.
    for round in 0..2 {
        for n in 0..200 {
            assert_eq!(read(&f, n, &source).await, 1, "round {round}");
        }
    }
    let metrics = near.metrics();
    assert!(metrics.near_evictions > 0, "{metrics:?}");
    assert!(metrics.near_misses > 200, "{metrics:?}");
}

/// A handle with stale-while-revalidate does not use the near cache: every hit reaches the
/// service, which decides when the entry is due.
#[tokio::test]
async fn refreshing_handles_skip_the_near_cache() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let plain = near.function("near.app", "f", Ttl::MINUTE);
    let refreshing = near
        .function("near.app", "g", Ttl::MINUTE)
        .refresh_after(Duration::from_secs(3600));
    let source = Source::default();
    source.set(1);
    warm(&plain, &near, 1, &source, 1).await;
    let before = near.metrics();
    for _ in 0..20 {
        assert_eq!(read(&refreshing, 1, &source).await, 1);
    }
    let after = near.metrics();
    assert_eq!(after.near_hits, before.near_hits, "{after:?}");
    assert!(after.hits >= before.hits + 19, "{after:?}");
}

/// A client whose watch task died with the runtime it was started on (the first hits came
/// from a short-lived runtime) stops serving copies once the stream has been silent, and the
/// next hit on another runtime starts the task again: copies are served again.
#[test]
fn a_watch_task_that_died_with_its_runtime_is_started_again() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let main = tokio::runtime::Runtime::new().expect("runtime");
    let options = ClientOptions {
        near_cache_silence: Duration::from_millis(500),
        ..near_options()
    };
    let near = main.block_on(near_client(&one, options));
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    let short = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    short.block_on(warm(&f, &near, 1, &source, 1));
    drop(short);
    main.block_on(async {
        let silent = eventually(SETTLE, || async { !near.metrics().near_stream_healthy }).await;
        assert!(silent, "a dead task's stream still looks healthy");
        warm(&f, &near, 1, &source, 1).await;
    });
}

/// The log of one key's versions for the randomized run: when each change to it began and
/// when it returned.
#[derive(Debug, Default)]
struct History {
    /// `(began, returned)` of version `i`'s change; version 0 began with the run.
    changes: Vec<(Instant, Option<Instant>)>,
}

/// One key of the randomized run: the current version, its history, and a lock that makes
/// changes to the key one at a time (so a late write cannot undo a later bust, which would
/// be the workload's race, not the cache's).
struct Tracked {
    version: AtomicU64,
    history: Mutex<History>,
    changing: tokio::sync::Mutex<()>,
}

/// What one memoize call of the randomized run returned, and when it ran.
struct Observed {
    key: u64,
    value: (u64, u64),
    started: Instant,
    ended: Instant,
}

/// Changes `key` to a new version with `how` (a bust of the entry, or a Put of the new
/// version) and records when the change began and returned.
async fn versioned_change(tracked: &Tracked, key: u64, client: &Client, f: &Function, put: bool) {
    let _one_at_a_time = tracked.changing.lock().await;
    let next = {
        let mut history = tracked.history.lock().unwrap();
        history.changes.push((Instant::now(), None));
        history.changes.len() as u64 - 1
    };
    tracked.version.store(next, SeqCst);
    if put {
        let request = pb::PutRequest {
            key: Some(pb::Key {
                namespace: f.namespace().to_owned(),
                function: f.name().to_owned(),
                digest: f.digest(&(key,)).expect("digest"),
            }),
            value: serde_json::to_vec(&(key, next)).expect("encode").into(),
            ttl_seconds: 60,
            ..Default::default()
        };
        client.raw().put(request).await.expect("put");
    } else {
        f.bust(&(key,)).await.expect("bust");
    }
    tracked.history.lock().unwrap().changes[next as usize].1 = Some(Instant::now());
}

/// Four clients with near caches, two on each replica, memoize, bust and overwrite a few keys
/// at random for 30 s; every value a memoize call returned was current at some instant within
/// [its start − [`BOUND`], its end]. Changes come in bursts: every other second nobody
/// changes anything and the clients only read, so a stale copy inserted during a burst (which
/// the key's next change would soon drop) is still there to be read, past the bound, in the
/// quiet second after it (second review: without quiet phases the checker could not catch a
/// stale insert). Counts, the near hit ratio and the largest staleness seen are printed.
async fn randomized_run(backend: Backend) {
    const KEYS: u64 = 6;
    const RUN: Duration = Duration::from_secs(30);
    const PHASE_MS: u128 = 1_000;
    const MAX_OPS: usize = 40_000;
    let (_store, one, two) = backend.replicas();
    let started = Instant::now();
    let keys: Arc<Vec<Tracked>> = Arc::new(
        (0..KEYS)
            .map(|_| Tracked {
                version: AtomicU64::new(0),
                history: Mutex::new(History {
                    changes: vec![(started, None)],
                }),
                changing: tokio::sync::Mutex::new(()),
            })
            .collect(),
    );
    // A lookup that times out is written unconditionally (fail-open), so it could undo a
    // bust made while it computed: the workload's race, not the near cache's. A long
    // deadline keeps it out of the run on a loaded machine.
    let options = ClientOptions {
        deadline: Duration::from_secs(5),
        ..near_options()
    };
    let mut clients = Vec::new();
    for server in [&one, &one, &two, &two] {
        clients.push(near_client(server, options.clone()).await);
    }
    let mut tasks = Vec::new();
    for (n, client) in clients.iter().enumerate() {
        let client = client.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let f = client.function("near.rand", "f", Ttl::MINUTE);
            let mut rng = fastrand::Rng::with_seed(n as u64 + 1);
            let mut seen = Vec::new();
            let (mut busts, mut puts) = (0_u64, 0_u64);
            while started.elapsed() < RUN && seen.len() < MAX_OPS {
                let key = rng.u64(0..KEYS);
                let tracked = &keys[key as usize];
                let quiet = (started.elapsed().as_millis() / PHASE_MS) % 2 == 1;
                let draw = if quiet { 99 } else { rng.u32(0..100) };
                match draw {
                    0..4 => {
                        versioned_change(tracked, key, &client, &f, false).await;
                        busts += 1;
                    }
                    4..8 => {
                        versioned_change(tracked, key, &client, &f, true).await;
                        puts += 1;
                    }
                    _ => {
                        let began = Instant::now();
                        let value = f
                            .memoize(&(key,), || async { (key, tracked.version.load(SeqCst)) })
                            .await
                            .expect("memoize");
                        seen.push(Observed {
                            key,
                            value,
                            started: began,
                            ended: Instant::now(),
                        });
                        // Some calls back to back, some spread out.
                        if rng.bool() {
                            tokio::time::sleep(Duration::from_micros(rng.u64(0..2000))).await;
                        }
                    }
                }
            }
            (seen, busts, puts)
        }));
    }
    let mut observed = Vec::new();
    let (mut busts, mut puts) = (0, 0);
    for task in tasks {
        let (seen, b, p) = task.await.expect("client task");
        observed.extend(seen);
        busts += b;
        puts += p;
    }
    let (mut violations, mut worst) = (Vec::new(), Duration::ZERO);
    for call in &observed {
        let history = keys[call.key as usize].history.lock().unwrap();
        let (key, version) = call.value;
        let Some(&(began, _)) = history.changes.get(version as usize) else {
            violations.push(format!(
                "key {} returned unknown version {version}",
                call.key
            ));
            continue;
        };
        // Version v was current from its change's start to the return of the change to v+1.
        let superseded = history
            .changes
            .get(version as usize + 1)
            .map(|&(_, returned)| returned.expect("every change returned"));
        let stale_by = superseded.map_or(Duration::ZERO, |at| {
            call.started.saturating_duration_since(at)
        });
        worst = worst.max(stale_by);
        if key != call.key || began > call.ended || stale_by > BOUND {
            violations.push(format!(
                "key {} returned {:?}, stale by {stale_by:?}",
                call.key, call.value
            ));
        }
    }
    let metrics: Vec<ClientMetrics> = clients.iter().map(Client::metrics).collect();
    let near_hits: u64 = metrics.iter().map(|m| m.near_hits).sum();
    let invalidations: u64 = metrics.iter().map(|m| m.near_invalidations).sum();
    eprintln!(
        "near cache randomized over {backend:?}: {} memoize calls ({near_hits} near hits), {busts} busts, {puts} puts, {invalidations} invalidations applied, largest staleness {worst:?} (bound {BOUND:?}), {} violations",
        observed.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(near_hits > 0, "the near cache was never used");
}

mod redis {
    use super::Backend;

    #[tokio::test]
    async fn changes_reach_other_replicas() {
        super::changes_reach_other_replicas(Backend::Redis).await
    }

    #[tokio::test]
    async fn a_killed_stream_stops_the_near_cache() {
        super::a_killed_stream_stops_the_near_cache(Backend::Redis).await
    }

    #[tokio::test]
    async fn a_bust_during_a_lookup_is_not_lost() {
        super::a_bust_during_a_lookup_is_not_lost(Backend::Redis).await
    }

    #[tokio::test]
    async fn randomized_run() {
        super::randomized_run(Backend::Redis).await
    }
}

mod cluster {
    use super::Backend;

    #[tokio::test]
    async fn changes_reach_other_replicas() {
        super::changes_reach_other_replicas(Backend::Cluster).await
    }

    #[tokio::test]
    async fn a_killed_stream_stops_the_near_cache() {
        super::a_killed_stream_stops_the_near_cache(Backend::Cluster).await
    }

    #[tokio::test]
    async fn a_bust_during_a_lookup_is_not_lost() {
        super::a_bust_during_a_lookup_is_not_lost(Backend::Cluster).await
    }

    #[tokio::test]
    async fn randomized_run() {
        super::randomized_run(Backend::Cluster).await
    }
}

/// A server with invalidations off answers Watch with UNIMPLEMENTED: the near cache turns
/// itself off for good (says so in the metrics, and once at warn), and `memoize` works as
/// without it.
#[tokio::test]
async fn invalidations_off_turns_the_near_cache_off() {
    // The watch task runs on this test's one thread, so its warning is captured.
    let logs = common::Logs::default();
    let _capture = logs.capture();
    let server = CacheServer::memory(&["--invalidations", "off"]);
    let near = near_client(&server, near_options()).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    // The first hit has the near cache follow the namespace, and the server refuses.
    let off = eventually(SETTLE, || async {
        assert_eq!(read(&f, 1, &source).await, 1);
        near.metrics().near_disabled
    })
    .await;
    assert!(off, "{:?}", near.metrics());
    for _ in 0..5 {
        assert_eq!(read(&f, 1, &source).await, 1);
    }
    let metrics = near.metrics();
    assert_eq!(metrics.near_hits, 0, "{metrics:?}");
    assert!(metrics.hits >= 5, "{metrics:?}");
    let other = near.function("near.other", "f", Ttl::MINUTE);
    assert_eq!(read(&other, 1, &source).await, 1);
    let warnings: Vec<String> = logs
        .warnings()
        .into_iter()
        .filter(|line| line.contains("near cache off"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
}

/// The README's near cache example, as written: with the namespace followed from the start
/// (`near_cache_namespaces`), the first call computes, the second is a remote hit that is
/// copied, and the third is answered from the copy. The stream opens when the client is
/// made; the test waits for its first event (milliseconds), which the README's reader gets
/// for free while the first call computes and stores.
#[tokio::test]
async fn the_readme_example_does_what_it_says() {
    let server = CacheServer::memory(&[]);
    let options = ClientOptions {
        near_cache_bytes: 64 << 20,
        near_cache_namespaces: vec!["__main__".into()],
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options)
        .await
        .expect("client");
    let started = eventually(SETTLE, || async { cm.metrics().near_stream_healthy }).await;
    assert!(started, "the stream did not start with the client");
    let add = cm.function("__main__", "addition", Ttl::HOUR);
    let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await.expect("1");
    assert_eq!(sum, 7);
    let first = cm.metrics();
    assert_eq!((first.computed, first.hits), (1, 0), "{first:?}");
    let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await.expect("2");
    assert_eq!(sum, 7);
    let second = cm.metrics();
    assert_eq!((second.hits, second.near_hits), (1, 0), "{second:?}");
    let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await.expect("3");
    assert_eq!(sum, 7);
    let third = cm.metrics();
    assert_eq!((third.hits, third.near_hits), (2, 1), "{third:?}");
    add.bust(&(3, 4)).await.expect("bust");
    let _: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await.expect("4");
    let fourth = cm.metrics();
    assert_eq!(fourth.computed, 2, "the bust dropped the copy: {fourth:?}");
}

/// A namespace used later has the stream reopened to follow it too, and the copies of the
/// namespaces already followed stay (the new stream resumes after `applied`, so nothing is
/// missed): they are still served, and no flush is counted. Busts in both namespaces made
/// through the other replica still reach the copies afterwards.
#[tokio::test]
async fn a_new_namespace_keeps_the_copies() {
    let (_store, one, two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let other = plain_client(&two).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let g = near.function("near.more", "g", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;
    // A hit in a new namespace: the stream is replaced by one following both.
    let theirs_g = other.function("near.more", "g", Ttl::MINUTE);
    assert_eq!(read(&theirs_g, 1, &source).await, 1);
    assert_eq!(read(&g, 1, &source).await, 1);
    warm(&g, &near, 1, &source, 1).await;
    let hits = near.metrics().near_hits;
    assert_eq!(read(&f, 1, &source).await, 1);
    let metrics = near.metrics();
    assert_eq!(
        metrics.near_hits,
        hits + 1,
        "the copy was dropped: {metrics:?}"
    );
    assert_eq!(metrics.near_flushes, 0, "{metrics:?}");
    // Both namespaces' busts still arrive.
    source.set(2);
    let theirs_f = other.function("near.app", "f", Ttl::MINUTE);
    theirs_f.bust(&(1,)).await.expect("bust f");
    theirs_g.bust(&(1,)).await.expect("bust g");
    let seen = eventually(SETTLE, || async {
        read(&f, 1, &source).await == 2 && read(&g, 1, &source).await == 2
    })
    .await;
    assert!(seen, "{:?}", near.metrics());
}

/// A refused stream is asked for again after a pause: a client whose replica has
/// invalidations off bypasses its near cache (`near_disabled`), and uses it once a replica
/// at that address streams (a rolling upgrade). The pause is shortened by a test hook; it is
/// a minute by default. Without the retry, the near cache stayed off for the life of the
/// client.
#[tokio::test]
async fn a_refused_stream_is_asked_for_again() {
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut old = CacheServer::memory(&["--listen", &listen, "--invalidations", "off"]);
    let options = ClientOptions {
        near_refused_backoff: Duration::from_millis(200),
        near_cache_namespaces: vec!["near.app".into()],
        ..near_options()
    };
    let near = near_client(&old, options).await;
    let off = eventually(SETTLE, || async { near.metrics().near_disabled }).await;
    assert!(off, "{:?}", near.metrics());
    old.kill();
    let _new = CacheServer::memory(&["--listen", &listen, "--watch-heartbeat-ms", "100"]);
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;
    assert!(!near.metrics().near_disabled, "{:?}", near.metrics());
}

/// A bust whose caller stops waiting for it (its future dropped once polled: the request
/// may have been sent, and the bust may happen) still drops this client's copy at once.
/// Without the drop before sending, the copy stayed until the stream's invalidation (if the
/// bust happened) or its TTL (if not).
#[tokio::test]
async fn a_cancelled_bust_still_drops_the_copy() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;
    // Polled once, then dropped: the bust is cancelled partway.
    let cancelled = tokio::time::timeout(Duration::ZERO, f.bust(&(1,))).await;
    assert!(cancelled.is_err(), "the bust completed in one poll");
    let hits = near.metrics().near_hits;
    read(&f, 1, &source).await;
    let metrics = near.metrics();
    assert_eq!(metrics.near_hits, hits, "served from the copy: {metrics:?}");
}

/// A near hit costs far less than a remote one: at least 100 times less in a release build,
/// 50 in a debug one (both printed). Each is the fastest of several batches, so other tests
/// running beside it (the near hit is all CPU, the remote one mostly waiting) do not decide
/// the outcome.
#[tokio::test]
async fn near_hits_are_much_faster_than_remote_ones() {
    const BATCHES: u32 = 10;
    const CALLS: u32 = 200;
    let (_store, one, _two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let remote = plain_client(&one).await;
    let source = Source::default();
    source.set(1);
    let f = near.function("near.app", "f", Ttl::MINUTE);
    warm(&f, &near, 1, &source, 1).await;
    let g = remote.function("near.app", "f", Ttl::MINUTE);
    let fastest = |f: Function| {
        let source = &source;
        async move {
            let mut best = Duration::MAX;
            for _ in 0..BATCHES {
                let started = Instant::now();
                for _ in 0..CALLS {
                    read(&f, 1, source).await;
                }
                best = best.min(started.elapsed() / CALLS);
            }
            best
        }
    };
    let remote_hit = fastest(g).await;
    let before = near.metrics().near_hits;
    let near_hit = fastest(f).await;
    assert_eq!(
        near.metrics().near_hits - before,
        u64::from(BATCHES * CALLS)
    );
    let ratio = remote_hit.as_secs_f64() / near_hit.as_secs_f64();
    eprintln!("near hit {near_hit:?} per call, remote hit {remote_hit:?} per call ({ratio:.0}x)");
    // Unoptimized, the near hit's encoding, md5 and decoding cost several times more, and
    // the remote hit's share of them does not change the ratio much.
    let required = if cfg!(debug_assertions) { 50.0 } else { 100.0 };
    assert!(
        ratio >= required,
        "near {near_hit:?}, remote {remote_hit:?}"
    );
}

/// A client's own bust, and its own refresh, drop its near copy before they return: the
/// very next call gets the new value, without waiting for the stream to deliver the change.
#[tokio::test]
async fn own_busts_and_refreshes_are_seen_at_once() {
    let (_store, one, _two) = Backend::Redis.replicas();
    let near = near_client(&one, near_options()).await;
    let f = near.function("near.app", "f", Ttl::MINUTE);
    let source = Source::default();
    source.set(1);
    warm(&f, &near, 1, &source, 1).await;
    source.set(2);
    f.bust(&(1,)).await.expect("bust");
    assert_eq!(read(&f, 1, &source).await, 2);

    warm(&f, &near, 1, &source, 2).await;
    let refreshed: u64 = f.refresh(&(1,), || async { 3 }).await.expect("refresh");
    assert_eq!(refreshed, 3);
    assert_eq!(read(&f, 1, &source).await, 3, "the old copy was served");
}
