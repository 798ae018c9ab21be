//! The behaviour suite: every RPC's contract, run against the real server binary three times:
//! over a real `redis-server`, over a real Redis Cluster (three primaries, three replicas,
//! shared by the tests, each under its own key prefix) and with the in-memory store.

mod common;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use cache_money::pb;
use common::{
    CacheServer, RedisCluster, RedisServer, bust_function, bust_tag, digest, eventually, get,
    http_get, key, put,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The server's default `--key-prefix`.
const DEFAULT_PREFIX: &str = "cm:";

/// Which store the server under test uses.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// A running server, and the Redis behind it when there is one.
struct Env {
    server: CacheServer,
    redis: Option<RedisServer>,
    cluster: Option<Arc<RedisCluster>>,
    /// The server's key prefix (its own on the shared cluster).
    prefix: String,
}

/// The Redis keys behind a server, read directly, for the behaviours that look at tag
/// indexes: one `redis-server`, or every primary of the cluster under the server's prefix.
enum Keyspace<'e> {
    Redis(&'e RedisServer),
    Cluster(&'e RedisCluster),
}

impl Env {
    /// The keys behind the server; `None` for the in-memory store.
    fn keyspace(&self) -> Option<Keyspace<'_>> {
        match (&self.redis, &self.cluster) {
            (Some(redis), _) => Some(Keyspace::Redis(redis)),
            (None, Some(cluster)) => Some(Keyspace::Cluster(cluster)),
            (None, None) => None,
        }
    }

    /// The keys `pattern` matches (SCAN MATCH on the one Redis, on every primary of a cluster).
    async fn scan(&self, pattern: &str) -> BTreeSet<String> {
        match self.keyspace().expect("a Redis behind the server") {
            Keyspace::Redis(redis) => redis.scan_match(pattern).await,
            Keyspace::Cluster(cluster) => cluster
                .scan_match(pattern)
                .await
                .into_iter()
                .map(|key| String::from_utf8(key).expect("a UTF-8 key"))
                .collect(),
        }
    }

    /// The tag indexes under the server's prefix.
    async fn tag_index_keys(&self) -> BTreeSet<String> {
        self.scan(&format!("{}*:#tag:*", self.prefix)).await
    }

    /// Every key under the server's prefix (the whole database on a single Redis), the
    /// invalidation stream left out.
    /// The invalidation stream is not counted: every write and bust appends to it.
    async fn stored_keys(&self) -> BTreeSet<String> {
        let mut keys = match self.keyspace().expect("a Redis behind the server") {
            Keyspace::Redis(_) => self.scan("*").await,
            Keyspace::Cluster(_) => self.scan(&format!("{}*", self.prefix)).await,
        };
        keys.retain(|key| !common::is_invalidation_stream(key.as_bytes()));
        keys
    }

    /// A connection to the node holding `key` (the one Redis, or the primary of its slot).
    async fn node_of(&self, key: &str) -> ::redis::aio::MultiplexedConnection {
        match self.keyspace().expect("a Redis behind the server") {
            Keyspace::Redis(redis) => redis.connect().await,
            Keyspace::Cluster(cluster) => cluster.node(cluster.primary_of(key.as_bytes())).await,
        }
    }
}

impl Backend {
    fn start(self, extra: &[&str]) -> Env {
        match self {
            Backend::Memory => Env {
                server: CacheServer::memory(extra),
                redis: None,
                cluster: None,
                prefix: DEFAULT_PREFIX.into(),
            },
            Backend::Redis => {
                let redis = RedisServer::start();
                Env {
                    server: CacheServer::redis(&redis, extra),
                    redis: Some(redis),
                    cluster: None,
                    prefix: DEFAULT_PREFIX.into(),
                }
            }
            Backend::Cluster => {
                let cluster = RedisCluster::shared();
                let prefix = common::unique_prefix("behaviour");
                let mut args = vec!["--key-prefix", prefix.as_str()];
                args.extend_from_slice(extra);
                Env {
                    server: CacheServer::cluster(&cluster, &args),
                    redis: None,
                    cluster: Some(cluster),
                    prefix,
                }
            }
        }
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
    miss_then_put_then_hit,
    put_replaces_value_and_ttl,
    entries_expire_after_their_ttl,
    bust_removes_one_call,
    bust_function_is_exact,
    bust_namespace_is_exact,
    bust_all_removes_every_entry,
    batches_keep_request_order,
    keys_pages_through_one_function,
    invalid_requests_are_refused_and_write_nothing,
    oversized_batches_are_refused,
    oversized_responses_are_refused,
    stats_count_what_happened,
    health_serves_and_reflection_lists_services,
    bust_tag_removes_exactly_the_tagged_entries,
    tag_indexes_expire_with_their_entries,
    bust_tag_ignores_foreign_and_stale_members,
    invalid_tags_are_refused_and_write_nothing,
    bust_all_and_namespace_remove_tag_indexes,
    one_lease_per_key_until_written,
    busts_of_every_scope_void_leases,
    an_unconditional_put_voids_a_lease,
    an_expired_lease_is_taken_over_once,
    an_overrun_lease_still_writes_if_nobody_took_over,
    release_frees_the_lease_at_once,
    stale_copies_serve_only_when_asked_and_never_after_a_bust,
    a_due_entry_is_leased_to_one_refresher,
    a_lease_on_a_value_outlives_the_value,
    lease_requests_are_validated,
);

/// A client of the service under test.
type Cm = pb::cache_money_client::CacheMoneyClient<tonic::transport::Channel>;

/// A Get asking for a lease of `lease_ms`, with `extra` fields.
fn leased(key: pb::Key, lease_ms: u32, extra: pb::GetRequest) -> pb::GetRequest {
    pb::GetRequest {
        key: Some(key),
        lease_ms,
        ..extra
    }
}

/// Asks for `key`'s lease (5 s); returns the answer.
async fn lease(cm: &mut Cm, key: pb::Key) -> pb::GetResponse {
    cm.get(leased(key, 5_000, pb::GetRequest::default()))
        .await
        .expect("a leased Get succeeds")
        .into_inner()
}

/// A Put of `value` under the lease `token`; returns whether it was refused.
async fn put_under(cm: &mut Cm, key: pb::Key, value: &[u8], token: u64) -> bool {
    let request = pb::PutRequest {
        lease_token: token,
        compute_ms: 7,
        ..put(key, value, 60)
    };
    cm.put(request)
        .await
        .expect("a leased Put succeeds")
        .into_inner()
        .refused
}

/// On a miss exactly one caller wins the lease; the others are told to wait (briefly), a plain
/// Get still misses and Keys lists nothing; the winner's write lands, carries its compute time,
/// and clears the lease, so its token cannot write again.
async fn one_lease_per_key_until_written(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let won = lease(&mut cm, key("ns", "f", 1)).await;
    assert_eq!(won.lease(), pb::Lease::Won);
    assert!(!won.hit && won.lease_token != 0);
    for _ in 0..3 {
        let waiting = lease(&mut cm, key("ns", "f", 1)).await;
        assert_eq!(waiting.lease(), pb::Lease::Wait);
        assert!(!waiting.hit && waiting.lease_token == 0);
        assert!(
            (1..=20).contains(&waiting.retry_after_ms),
            "retry after {} ms",
            waiting.retry_after_ms
        );
    }
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await,
        None,
        "a lease is no value"
    );
    assert!(
        keys_page(&mut cm, "ns", "f", "", 10)
            .await
            .entries
            .is_empty()
    );
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"v1", won.lease_token).await);
    let found = lease(&mut cm, key("ns", "f", 1)).await;
    assert!(found.hit);
    assert_eq!(found.value.as_ref(), b"v1");
    assert_eq!(found.lease(), pb::Lease::None);
    assert_eq!(found.compute_ms, 7);
    assert_eq!(found.ttl_ms, 0, "a plain lookup reads no TTL");
    let with_ttl = pb::GetRequest {
        allow_stale: true,
        ..Default::default()
    };
    let timed = cm
        .get(leased(key("ns", "f", 1), 5_000, with_ttl))
        .await
        .unwrap()
        .into_inner();
    assert!(timed.hit);
    assert!(
        (59_000..=60_000).contains(&timed.ttl_ms),
        "ttl {}",
        timed.ttl_ms
    );
    assert!(
        put_under(&mut cm, key("ns", "f", 1), b"v2", won.lease_token).await,
        "a spent token wrote again"
    );
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"v1"[..])
    );
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.leases_won, stats.lease_waits), (1, 3));
    assert_eq!(stats.stale_writes_refused, 1);
}

/// A computation that started before a bust and finishes after it is refused, whatever the
/// bust's scope, and the next lookup misses and wins a new lease.
async fn busts_of_every_scope_void_leases(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    for (n, scope) in ["entry", "function", "namespace", "all", "tag"]
        .into_iter()
        .enumerate()
    {
        let key = || key("ns", "f", n as u64);
        // The lookup declares the tag its result will be written with.
        let tagged = pb::GetRequest {
            tags: vec!["user:7".into()],
            ..Default::default()
        };
        let won = cm
            .get(leased(key(), 5_000, tagged))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(won.lease(), pb::Lease::Won, "{scope}");
        match scope {
            "tag" => assert_eq!(
                bust_tag(&mut cm, "ns", "user:7").await,
                1,
                "the lease's key"
            ),
            "entry" => drop(cm.bust(pb::BustRequest { key: Some(key()) }).await.unwrap()),
            "function" => drop(bust_function(&mut cm, "ns", "f").await),
            "namespace" => drop(
                cm.bust_namespace(pb::BustNamespaceRequest {
                    namespace: "ns".into(),
                })
                .await
                .unwrap(),
            ),
            _ => drop(cm.bust_all(pb::BustAllRequest {}).await.unwrap()),
        }
        assert!(
            put_under(&mut cm, key(), b"computed before the bust", won.lease_token).await,
            "{scope}: a stale write landed"
        );
        let next = lease(&mut cm, key()).await;
        assert!(!next.hit, "{scope}");
        assert_eq!(next.lease(), pb::Lease::Won, "{scope}");
        assert_ne!(next.lease_token, won.lease_token);
        assert!(
            !put_under(&mut cm, key(), b"new", next.lease_token).await,
            "{scope}"
        );
        assert_eq!(
            get(&mut cm, key()).await.as_deref(),
            Some(&b"new"[..]),
            "{scope}"
        );
    }
}

/// A plain Put is newer than any outstanding lease: the lease's write is refused after it.
async fn an_unconditional_put_voids_a_lease(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let won = lease(&mut cm, key("ns", "f", 1)).await;
    cm.put(put(key("ns", "f", 1), b"newer", 60)).await.unwrap();
    assert!(put_under(&mut cm, key("ns", "f", 1), b"older", won.lease_token).await);
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"newer"[..])
    );
    assert_eq!(
        lease(&mut cm, key("ns", "f", 1)).await.lease(),
        pb::Lease::None
    );
}

/// A holder that never writes frees the key when its lease expires: exactly one later lookup
/// takes the lease over (counted as expired), and the first holder's late write is refused.
async fn an_expired_lease_is_taken_over_once(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let short = |cm: &mut Cm| {
        let mut cm = cm.clone();
        async move {
            cm.get(leased(key("ns", "f", 1), 300, pb::GetRequest::default()))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = short(&mut cm).await;
    assert_eq!(first.lease(), pb::Lease::Won);
    let waiting = short(&mut cm).await;
    assert_eq!(waiting.lease(), pb::Lease::Wait);
    // The lease's expiry is the behaviour under test: wait it out.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let second = short(&mut cm).await;
    assert_eq!(
        second.lease(),
        pb::Lease::Won,
        "the expired lease was not taken over"
    );
    assert_eq!(
        short(&mut cm).await.lease(),
        pb::Lease::Wait,
        "taken over twice"
    );
    assert!(put_under(&mut cm, key("ns", "f", 1), b"late", first.lease_token).await);
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"v", second.lease_token).await);
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.leases_won, stats.leases_expired), (2, 1));
}

/// A holder slower than its lease still writes when nobody took the lease over meanwhile.
async fn an_overrun_lease_still_writes_if_nobody_took_over(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let won = cm
        .get(leased(key("ns", "f", 1), 100, pb::GetRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(won.lease(), pb::Lease::Won);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"slow", won.lease_token).await);
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"slow"[..])
    );
}

/// Release gives the lease up: the next lookup wins at once; a spent or foreign token
/// releases nothing; releasing a refresh lease leaves the value.
async fn release_frees_the_lease_at_once(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let release = |token: u64| pb::ReleaseRequest {
        key: Some(key("ns", "f", 1)),
        lease_token: token,
    };
    let won = lease(&mut cm, key("ns", "f", 1)).await;
    assert!(
        cm.release(release(won.lease_token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(
        !cm.release(release(won.lease_token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let next = lease(&mut cm, key("ns", "f", 1)).await;
    assert_eq!(next.lease(), pb::Lease::Won);
    assert!(
        !cm.release(release(next.lease_token ^ 1))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"v", next.lease_token).await);
    let due = pb::GetRequest {
        beta: 1e9,
        ..Default::default()
    };
    let refresh = cm
        .get(leased(key("ns", "f", 1), 5_000, due))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refresh.lease(), pb::Lease::Won);
    assert!(
        cm.release(release(refresh.lease_token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"v"[..])
    );
}

/// A value written with stale_seconds is a miss once its TTL passes, handed out marked stale
/// only to lookups that allow it (with the lease, to recompute), never listed, and gone for
/// good after a bust.
async fn stale_copies_serve_only_when_asked_and_never_after_a_bust(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    for n in [1, 2] {
        let request = pb::PutRequest {
            stale_seconds: 60,
            ..put(key("ns", "f", n), b"old", 1)
        };
        cm.put(request).await.unwrap();
    }
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"old"[..]),
        "a value with a stale window is a hit within its TTL"
    );
    // Both, since key 2 was written a moment after key 1 and expires after it.
    let expired = eventually(Duration::from_secs(5), || {
        let mut cm = cm.clone();
        async move {
            get(&mut cm, key("ns", "f", 1)).await.is_none()
                && get(&mut cm, key("ns", "f", 2)).await.is_none()
        }
    })
    .await;
    assert!(expired, "a 1 s entry was still a hit after 5 s");
    assert!(
        keys_page(&mut cm, "ns", "f", "", 10)
            .await
            .entries
            .is_empty(),
        "a stale copy was listed"
    );
    let allow = || pb::GetRequest {
        allow_stale: true,
        ..Default::default()
    };
    let stale = cm
        .get(pb::GetRequest {
            key: Some(key("ns", "f", 1)),
            ..allow()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stale.hit && stale.stale);
    assert_eq!(stale.value.as_ref(), b"old");
    let won = cm
        .get(leased(key("ns", "f", 1), 5_000, allow()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(won.lease(), pb::Lease::Won);
    assert!(won.stale, "the lease winner is not handed the stale value");
    let waiting = cm
        .get(leased(key("ns", "f", 1), 5_000, allow()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.lease(), pb::Lease::Wait);
    assert!(waiting.stale && waiting.value.as_ref() == b"old");
    let batch = cm
        .get_many(pb::GetManyRequest {
            keys: vec![key("ns", "f", 1), key("ns", "f", 2)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        batch.results.iter().all(|result| !result.hit),
        "GetMany served a stale copy as a hit"
    );
    cm.bust(pb::BustRequest {
        key: Some(key("ns", "f", 1)),
    })
    .await
    .unwrap();
    bust_function(&mut cm, "ns", "f").await;
    for n in [1, 2] {
        let after = cm
            .get(pb::GetRequest {
                key: Some(key("ns", "f", n)),
                ..allow()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            !after.stale && after.value.is_empty(),
            "a busted value was served stale"
        );
    }
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.stale_served, 3);
}

/// Stale-while-revalidate: a live entry that is due (by age or by XFetch) is answered as a
/// hit to everyone, and leased to exactly one refresher, whose write replaces it. A value
/// written plainly (no compute time) is never due.
async fn a_due_entry_is_leased_to_one_refresher(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let computed = pb::PutRequest {
        compute_ms: 50,
        ..put(key("ns", "f", 1), b"v1", 60)
    };
    cm.put(computed).await.unwrap();
    cm.put(put(key("ns", "f", 2), b"plain", 60)).await.unwrap();
    let by_age = || pb::GetRequest {
        refresh_after_ms: 1,
        ..Default::default()
    };
    let refresher = cm
        .get(leased(key("ns", "f", 1), 5_000, by_age()))
        .await
        .unwrap()
        .into_inner();
    // Written at least a millisecond ago by now (the Put was answered before).
    assert!(refresher.hit);
    assert_eq!(refresher.value.as_ref(), b"v1");
    assert_eq!(refresher.lease(), pb::Lease::Won);
    for _ in 0..3 {
        let other = cm
            .get(leased(key("ns", "f", 1), 5_000, by_age()))
            .await
            .unwrap()
            .into_inner();
        assert!(other.hit && other.value.as_ref() == b"v1");
        assert_eq!(other.lease(), pb::Lease::None, "a second refresher");
    }
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"v2", refresher.lease_token).await);
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"v2"[..])
    );
    let young = pb::GetRequest {
        refresh_after_ms: 3_600_000,
        ..Default::default()
    };
    let fresh = cm
        .get(leased(key("ns", "f", 1), 5_000, young))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.lease(), pb::Lease::None, "a fresh entry was due");
    let xfetch = || pb::GetRequest {
        beta: 1e9,
        ..Default::default()
    };
    let early = cm
        .get(leased(key("ns", "f", 1), 5_000, xfetch()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        early.lease(),
        pb::Lease::Won,
        "XFetch with a huge beta is always due"
    );
    let plain = cm
        .get(leased(key("ns", "f", 2), 5_000, xfetch()))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.hit);
    assert_eq!(
        plain.lease(),
        pb::Lease::None,
        "a plainly written value was due"
    );
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.refreshes, stats.leases_won), (2, 2));
    // XFetch weighs the compute time: at beta 1 and a minute left, a value that took 1 ms is
    // never due early (chance about e^-60000), one that took 49 days almost always is.
    for (n, compute_ms) in [(3, 1), (4, u32::MAX)] {
        let written = pb::PutRequest {
            compute_ms,
            ..put(key("ns", "f", n), b"v", 60)
        };
        cm.put(written).await.unwrap();
    }
    let at_beta_one = || pb::GetRequest {
        beta: 1.0,
        ..Default::default()
    };
    for _ in 0..20 {
        let cheap = cm
            .get(leased(key("ns", "f", 3), 5_000, at_beta_one()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cheap.lease(), pb::Lease::None, "a 1 ms value was due");
    }
    let costly = cm
        .get(leased(key("ns", "f", 4), 5_000, at_beta_one()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(costly.lease(), pb::Lease::Won, "a 49-day value was not due");
}

/// A lease won on a value (stale, or live and due) lasts its whole lifetime even when the
/// value's key would have expired first: nobody else wins it meanwhile, and its holder's
/// write lands. The value's liveness is not stretched.
async fn a_lease_on_a_value_outlives_the_value(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let allow = || pb::GetRequest {
        allow_stale: true,
        ..Default::default()
    };
    let due = || pb::GetRequest {
        refresh_after_ms: 1_000,
        ..Default::default()
    };
    // Key 1: a value with a 2 s stale window past its 1 s TTL (its key lives 3 s); key 2: a
    // 2 s value (its key lives 2 s).
    let stale = pb::PutRequest {
        stale_seconds: 2,
        ..put(key("ns", "f", 1), b"old", 1)
    };
    cm.put(stale).await.unwrap();
    let computed = pb::PutRequest {
        compute_ms: 300,
        ..put(key("ns", "f", 2), b"v1", 2)
    };
    cm.put(computed).await.unwrap();
    // Expiry is the behaviour under test. At 1.2 s key 1 is a stale copy and key 2 is due.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let holder = cm
        .get(leased(key("ns", "f", 1), 5_000, allow()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(holder.lease(), pb::Lease::Won);
    assert!(holder.stale);
    let refresher = cm
        .get(leased(key("ns", "f", 2), 5_000, due()))
        .await
        .unwrap()
        .into_inner();
    assert!(refresher.hit);
    assert_eq!(refresher.lease(), pb::Lease::Won);
    // Past both keys' own lives (3 s and 2 s): the leases keep them.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(
        get(&mut cm, key("ns", "f", 2)).await,
        None,
        "the lease stretched the value's TTL"
    );
    for (n, request) in [(1, allow()), (2, due())] {
        let other = cm
            .get(leased(key("ns", "f", n), 5_000, request))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(other.lease(), pb::Lease::Wait, "key {n}: a second lease");
    }
    assert!(!put_under(&mut cm, key("ns", "f", 1), b"new1", holder.lease_token).await);
    assert!(!put_under(&mut cm, key("ns", "f", 2), b"v2", refresher.lease_token).await);
    assert_eq!(
        get(&mut cm, key("ns", "f", 2)).await.as_deref(),
        Some(&b"v2"[..])
    );
}

/// Lease fields out of bounds are refused with INVALID_ARGUMENT naming the field, and write
/// nothing.
async fn lease_requests_are_validated(backend: Backend) {
    let env = backend.start(&["--lease-max-ms", "10000"]);
    let mut cm = env.server.client().await;
    let refused = |result: Result<tonic::Response<pb::GetResponse>, tonic::Status>, field: &str| {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    };
    let tags_alone = pb::GetRequest {
        key: Some(key("ns", "f", 1)),
        tags: vec!["user:7".into()],
        ..Default::default()
    };
    refused(cm.get(tags_alone).await, "tags");
    let control = pb::GetRequest {
        tags: vec!["a\u{7}".into()],
        ..Default::default()
    };
    refused(
        cm.get(leased(key("ns", "f", 1), 1_000, control)).await,
        "tags[0]",
    );
    let without_lease = pb::GetRequest {
        key: Some(key("ns", "f", 1)),
        refresh_after_ms: 10,
        ..Default::default()
    };
    refused(cm.get(without_lease).await, "refresh_after_ms");
    for beta in [f32::NAN, -1.0, f32::INFINITY] {
        let bad = pb::GetRequest {
            beta,
            ..Default::default()
        };
        refused(cm.get(leased(key("ns", "f", 1), 1_000, bad)).await, "beta");
    }
    let too_stale = pb::PutRequest {
        stale_seconds: 2_592_000,
        ..put(key("ns", "f", 1), b"v", 60)
    };
    let status = cm.put(too_stale).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("stale_seconds"), "{status:?}");
    let tokened = pb::PutRequest {
        lease_token: 9,
        ..put(key("ns", "f", 1), b"v", 60)
    };
    let status = cm
        .put_many(pb::PutManyRequest {
            entries: vec![tokened],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("entries[0].lease_token"),
        "{status:?}"
    );
    let status = cm
        .release(pb::ReleaseRequest {
            key: Some(key("ns", "f", 1)),
            lease_token: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await,
        None,
        "a refused request wrote"
    );
    assert_eq!(
        lease(&mut cm, key("ns", "f", 1)).await.lease(),
        pb::Lease::Won,
        "a refused request leased"
    );
    // A lease over --lease-max-ms is shortened to it, not refused.
    let long = cm
        .get(leased(key("ns", "f", 2), 10_001, pb::GetRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long.lease(), pb::Lease::Won);
    let waiting = cm
        .get(leased(key("ns", "f", 2), 10_001, pb::GetRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        (9_000..=10_000).contains(&waiting.lease_left_ms),
        "lease left {} ms",
        waiting.lease_left_ms
    );
}

/// A Put carrying `tags`.
fn tagged(key: pb::Key, ttl_seconds: u32, tags: &[&str]) -> pb::PutRequest {
    pb::PutRequest {
        tags: tags.iter().map(|tag| tag.to_string()).collect(),
        ..put(key, b"v", ttl_seconds)
    }
}

/// The in-memory store's entries and charged bytes, from `/metrics`.
fn memory_usage(server: &CacheServer) -> (u64, u64) {
    let body = http_get(server.metrics_addr(), "/metrics", &[]).body;
    let value = |name: &str| {
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .trim()
            .parse::<u64>()
            .expect("a whole number")
    };
    (
        value("cache_money_memory_store_entries"),
        value("cache_money_memory_store_bytes"),
    )
}

/// A Get before any Put misses; after Put it returns the stored bytes, even empty ones.
async fn miss_then_put_then_hit(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    assert_eq!(get(&mut cm, key("ns", "f", 1)).await, None);
    cm.put(put(key("ns", "f", 1), b"seven", 60)).await.unwrap();
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"seven"[..])
    );
    cm.put(put(key("ns", "f", 2), b"", 60)).await.unwrap();
    assert_eq!(
        get(&mut cm, key("ns", "f", 2)).await,
        Some(Vec::new()),
        "empty value is a hit"
    );
}

/// A second Put replaces both the value and the time to live.
async fn put_replaces_value_and_ttl(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(put(key("ns", "f", 1), b"old", 10)).await.unwrap();
    cm.put(put(key("ns", "f", 1), b"new", 5000)).await.unwrap();
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"new"[..])
    );
    let page = keys_page(&mut cm, "ns", "f", "", 10).await;
    assert_eq!(page.entries.len(), 1);
    assert!(
        page.entries[0].ttl_ms > 4_990_000,
        "ttl {}",
        page.entries[0].ttl_ms
    );
    // A near cache asks for the time left with a plain lookup; without asking, none is read.
    let ask = |want_ttl| pb::GetRequest {
        key: Some(key("ns", "f", 1)),
        want_ttl,
        ..Default::default()
    };
    let timed = cm.get(ask(true)).await.unwrap().into_inner();
    assert!(timed.hit);
    assert!(
        (4_990_000..=5_000_000).contains(&timed.ttl_ms),
        "want_ttl: ttl {}",
        timed.ttl_ms
    );
    let plain = cm.get(ask(false)).await.unwrap().into_inner();
    assert_eq!(plain.ttl_ms, 0, "a plain lookup reads no TTL");
}

/// An entry is gone once its time to live has passed.
async fn entries_expire_after_their_ttl(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 1)).await.unwrap();
    cm.put(put(key("ns", "f", 2), b"v", 600)).await.unwrap();
    let expired = eventually(Duration::from_secs(5), || {
        let mut cm = cm.clone();
        async move { get(&mut cm, key("ns", "f", 1)).await.is_none() }
    })
    .await;
    assert!(expired, "a 1 s entry was still served after 5 s");
    assert!(
        get(&mut cm, key("ns", "f", 2)).await.is_some(),
        "a 600 s entry expired"
    );
    let page = keys_page(&mut cm, "ns", "f", "", 10).await;
    assert_eq!(page.entries.len(), 1, "Keys still lists the expired entry");
}

/// Bust removes exactly one call and says whether it was there.
async fn bust_removes_one_call(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(put(key("ns", "f", 1), b"a", 60)).await.unwrap();
    cm.put(put(key("ns", "f", 2), b"b", 60)).await.unwrap();
    let bust = |n| pb::BustRequest {
        key: Some(key("ns", "f", n)),
    };
    assert_eq!(cm.bust(bust(1)).await.unwrap().into_inner().removed, 1);
    assert_eq!(
        cm.bust(bust(1)).await.unwrap().into_inner().removed,
        0,
        "already gone"
    );
    assert_eq!(get(&mut cm, key("ns", "f", 1)).await, None);
    assert!(
        get(&mut cm, key("ns", "f", 2)).await.is_some(),
        "the other call survives"
    );
}

/// Busting `fetch` removes all its calls and none of `fetch_user`, `fetch.v2`, `fetc` or
/// another namespace's `fetch`.
async fn bust_function_is_exact(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let survivors = [
        ("ns", "fetch_user"),
        ("ns", "fetch.v2"),
        ("ns", "fetc"),
        ("ns2", "fetch"),
    ];
    for n in 0..3 {
        cm.put(put(key("ns", "fetch", n), b"x", 60)).await.unwrap();
        for (namespace, function) in survivors {
            cm.put(put(key(namespace, function, n), b"x", 60))
                .await
                .unwrap();
        }
    }
    let removed = common::bust_function(&mut cm, "ns", "fetch").await;
    assert_eq!(removed, 3);
    for n in 0..3 {
        assert_eq!(get(&mut cm, key("ns", "fetch", n)).await, None);
        for (namespace, function) in survivors {
            assert!(
                get(&mut cm, key(namespace, function, n)).await.is_some(),
                "{namespace}:{function} was busted"
            );
        }
    }
}

/// Busting namespace `ns1` removes its functions' entries and leaves `ns10` and `ns`.
async fn bust_namespace_is_exact(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    for (namespace, function, n) in [
        ("ns1", "a", 1),
        ("ns1", "a", 2),
        ("ns1", "b", 1),
        ("ns10", "a", 1),
        ("ns", "a", 1),
        ("ns1.x", "a", 1),
    ] {
        cm.put(put(key(namespace, function, n), b"x", 60))
            .await
            .unwrap();
    }
    let removed = cm
        .bust_namespace(pb::BustNamespaceRequest {
            namespace: "ns1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 3);
    assert_eq!(get(&mut cm, key("ns1", "b", 1)).await, None);
    for (namespace, function) in [("ns10", "a"), ("ns", "a"), ("ns1.x", "a")] {
        assert!(
            get(&mut cm, key(namespace, function, 1)).await.is_some(),
            "{namespace} was busted"
        );
    }
}

/// BustAll removes every entry and reports how many.
async fn bust_all_removes_every_entry(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    for n in 0..5 {
        cm.put(put(key("a", "f", n), b"x", 60)).await.unwrap();
        cm.put(put(key("b", "g", n), b"x", 60)).await.unwrap();
    }
    assert_eq!(
        cm.bust_all(pb::BustAllRequest {})
            .await
            .unwrap()
            .into_inner()
            .removed,
        10
    );
    assert_eq!(get(&mut cm, key("a", "f", 0)).await, None);
    assert_eq!(
        cm.bust_all(pb::BustAllRequest {})
            .await
            .unwrap()
            .into_inner()
            .removed,
        0
    );
}

/// PutMany stores a batch; GetMany answers in request order, misses included.
async fn batches_keep_request_order(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let entries = (0..10)
        .map(|n| put(key("ns", "f", n), n.to_string().as_bytes(), 60))
        .collect();
    let stored = cm
        .put_many(pb::PutManyRequest { entries })
        .await
        .unwrap()
        .into_inner()
        .stored;
    assert_eq!(stored, 10);
    let order = [9, 100, 0, 5, 101, 3];
    let keys = order.iter().map(|&n| key("ns", "f", n)).collect();
    let results = cm
        .get_many(pb::GetManyRequest { keys })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), order.len());
    for (n, result) in order.iter().zip(results) {
        if *n >= 100 {
            assert!(!result.hit, "{n} should miss");
        } else {
            assert!(result.hit, "{n} should hit");
            assert_eq!(result.value, n.to_string().as_bytes());
        }
    }
    let empty = cm
        .get_many(pb::GetManyRequest { keys: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.results.is_empty());
}

async fn keys_page(
    cm: &mut pb::cache_money_client::CacheMoneyClient<tonic::transport::Channel>,
    namespace: &str,
    function: &str,
    cursor: &str,
    limit: u32,
) -> pb::KeysResponse {
    cm.keys(pb::KeysRequest {
        namespace: namespace.into(),
        function: function.into(),
        cursor: cursor.into(),
        limit,
    })
    .await
    .expect("Keys succeeds")
    .into_inner()
}

/// Keys pages through every entry of one function, with TTLs, and lists no other function's.
async fn keys_pages_through_one_function(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    let entries = (0..250)
        .map(|n| put(key("ns", "f", n), b"x", 600))
        .collect();
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
    let entries = (0..50)
        .map(|n| put(key("ns", "f_other", n), b"x", 600))
        .collect();
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();

    let (mut cursor, mut seen, mut pages) = (String::new(), BTreeSet::new(), 0);
    loop {
        let page = keys_page(&mut cm, "ns", "f", &cursor, 100).await;
        pages += 1;
        assert!(pages < 100, "paging never ended");
        for entry in &page.entries {
            assert!(
                entry.ttl_ms > 590_000 && entry.ttl_ms <= 600_000,
                "ttl {}",
                entry.ttl_ms
            );
            seen.insert(entry.digest.clone());
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    let expected: BTreeSet<String> = (0..250).map(digest).collect();
    assert_eq!(seen, expected);

    let err = cm
        .keys(pb::KeysRequest {
            namespace: "ns".into(),
            function: "f".into(),
            cursor: "not a cursor".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("cursor:"), "{}", err.message());
}

/// Bad names, digests, TTLs, values and limits get INVALID_ARGUMENT naming the field, and
/// nothing is written.
async fn invalid_requests_are_refused_and_write_nothing(backend: Backend) {
    let env = backend.start(&["--max-ttl-seconds", "3600", "--max-value-bytes", "1000"]);
    let mut cm = env.server.client().await;
    let with_key = |namespace: &str, function: &str, digest: &str| pb::Key {
        namespace: namespace.into(),
        function: function.into(),
        digest: digest.into(),
    };
    let good = digest(1);
    let bad_puts = [
        (put(with_key("a:b", "f", &good), b"v", 60), "key.namespace:"),
        (put(with_key("", "f", &good), b"v", 60), "key.namespace:"),
        (put(with_key("ns", "f*", &good), b"v", 60), "key.function:"),
        (
            put(with_key("ns", &"f".repeat(129), &good), b"v", 60),
            "key.function:",
        ),
        (put(with_key("ns", "f", "ABCDEF"), b"v", 60), "key.digest:"),
        (
            put(
                with_key("ns", "f", "0123456789ABCDEF0123456789ABCDEF"),
                b"v",
                60,
            ),
            "key.digest:",
        ),
        (
            put(key("ns", "f", 1), b"v", 0),
            "ttl_seconds: must be between 1 and 3600, got 0",
        ),
        (
            put(key("ns", "f", 1), b"v", 3601),
            "ttl_seconds: must be between 1 and 3600, got 3601",
        ),
        (
            put(key("ns", "f", 1), &[0u8; 1001], 60),
            "value: must be at most 1000 bytes",
        ),
        (
            pb::PutRequest {
                key: None,
                value: vec![1].into(),
                ttl_seconds: 60,
                tags: Vec::new(),
                ..Default::default()
            },
            "key.namespace:",
        ),
    ];
    for (request, field) in bad_puts {
        let err = cm
            .put(request.clone())
            .await
            .expect_err(&format!("{request:?}"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field} vs {}",
            err.message()
        );
    }
    // One bad entry refuses the whole batch: the good one before it is not written either.
    let entries = vec![
        put(key("ns", "f", 1), b"v", 60),
        put(key("ns", "f", 2), b"v", 0),
    ];
    let err = cm
        .put_many(pb::PutManyRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("entries[1].ttl_seconds:"),
        "{}",
        err.message()
    );
    let err = cm
        .get_many(pb::GetManyRequest {
            keys: vec![key("ns", "f", 1), with_key("ns", "f", "x")],
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("keys[1].digest:"),
        "{}",
        err.message()
    );
    let err = cm
        .bust(pb::BustRequest {
            key: Some(with_key("n s", "f", &good)),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("key.namespace:"),
        "{}",
        err.message()
    );
    let err = cm
        .bust_function(pb::BustFunctionRequest {
            namespace: "ns".into(),
            function: "*".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message().starts_with("function:")),
        (Code::InvalidArgument, true)
    );
    let err = cm
        .bust_namespace(pb::BustNamespaceRequest {
            namespace: "ns*".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message().starts_with("namespace:")),
        (Code::InvalidArgument, true)
    );
    let err = cm
        .keys(pb::KeysRequest {
            namespace: "ns".into(),
            function: "f".into(),
            cursor: String::new(),
            limit: 1001,
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("limit:"), "{}", err.message());

    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (stats.puts, stats.errors),
        (0, 0),
        "validation failures are not store errors"
    );
    assert_eq!(
        cm.bust_all(pb::BustAllRequest {})
            .await
            .unwrap()
            .into_inner()
            .removed,
        0,
        "something was written"
    );
}

/// Batches over --max-batch are refused whole.
async fn oversized_batches_are_refused(backend: Backend) {
    let env = backend.start(&["--max-batch", "5"]);
    let mut cm = env.server.client().await;
    let entries = (0..6).map(|n| put(key("ns", "f", n), b"v", 60)).collect();
    let err = cm
        .put_many(pb::PutManyRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "entries: at most 5 per call (--max-batch), got 6"
    );
    let keys = (0..6).map(|n| key("ns", "f", n)).collect();
    let err = cm.get_many(pb::GetManyRequest { keys }).await.unwrap_err();
    assert_eq!(
        err.message(),
        "keys: at most 5 per call (--max-batch), got 6"
    );
    assert_eq!(
        cm.bust_all(pb::BustAllRequest {})
            .await
            .unwrap()
            .into_inner()
            .removed,
        0
    );
}

/// A GetMany whose values would exceed --max-response-bytes is refused with OUT_OF_RANGE
/// naming the flag; a smaller batch of the same entries is answered.
async fn oversized_responses_are_refused(backend: Backend) {
    let env = backend.start(&[
        "--max-value-bytes",
        "1000",
        "--max-message-bytes",
        "20000",
        "--max-response-bytes",
        "10000",
    ]);
    let mut cm = env.server.client().await;
    let entries = (0..20)
        .map(|n| put(key("ns", "f", n), &[7; 900], 60))
        .collect();
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
    let keys = (0..20).map(|n| key("ns", "f", n)).collect();
    let err = cm.get_many(pb::GetManyRequest { keys }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("--max-response-bytes (10000)")
            && err.message().contains("smaller batches"),
        "{}",
        err.message()
    );
    let keys = (0..5).map(|n| key("ns", "f", n)).collect();
    let results = cm
        .get_many(pb::GetManyRequest { keys })
        .await
        .expect("a batch under the bound is answered")
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|result| result.hit && result.value.len() == 900)
    );
}

/// Stats counts hits, misses, puts and busts, and names the store.
async fn stats_count_what_happened(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap();
    let entries = (2..4).map(|n| put(key("ns", "f", n), b"v", 60)).collect();
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
    get(&mut cm, key("ns", "f", 1)).await;
    get(&mut cm, key("ns", "f", 9)).await;
    let keys = vec![key("ns", "f", 2), key("ns", "f", 8)];
    cm.get_many(pb::GetManyRequest { keys }).await.unwrap();
    cm.bust_all(pb::BustAllRequest {}).await.unwrap();
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.hits, stats.misses, stats.puts), (2, 2, 3));
    assert_eq!((stats.busts, stats.busted_entries, stats.errors), (1, 3, 0));
    let expected_store = match backend {
        Backend::Memory => "memory",
        Backend::Redis => "redis",
        Backend::Cluster => "redis-cluster",
    };
    assert_eq!(stats.store, expected_store);
    assert!(stats.store_up);
}

/// Health reports SERVING for the server and the cache service; reflection v1 and v1alpha
/// both list the services, so grpcurl works without a proto file.
async fn health_serves_and_reflection_lists_services(backend: Backend) {
    let env = backend.start(&[]);
    let channel = env.server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "cache_money.v1.CacheMoney"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    use tonic_reflection::pb::{v1, v1alpha};
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a v1 reply");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("v1 reflection did not list services");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in ["cache_money.v1.CacheMoney", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "cache_money.v1.CacheMoney".into(),
            ),
        ),
    };
    let mut replies = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a v1alpha reply");
    assert!(
        matches!(
            reply.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty()
        ),
        "v1alpha reflection did not describe the service: {reply:?}"
    );
}

/// Entries of three functions tagged `user:7` and one tagged `user:8`: BustTag `user:7`
/// removes exactly the three, whether written by Put or PutMany, and nothing of another tag,
/// another namespace or without tags.
async fn bust_tag_removes_exactly_the_tagged_entries(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(tagged(key("app", "profile", 1), 60, &["user:7"]))
        .await
        .unwrap();
    cm.put(tagged(key("app", "orders", 1), 60, &["user:7", "shop:1"]))
        .await
        .unwrap();
    cm.put_many(pb::PutManyRequest {
        entries: vec![
            tagged(key("app", "avatar", 1), 60, &["user:7", "user:7"]),
            tagged(key("app", "profile", 2), 60, &["user:8"]),
            put(key("app", "profile", 3), b"v", 60),
            tagged(key("other", "profile", 1), 60, &["user:7"]),
            tagged(key("app", "profile", 4), 60, &["user:70", "User:7"]),
        ],
    })
    .await
    .unwrap();
    assert_eq!(bust_tag(&mut cm, "app", "user:7").await, 3);
    for (function, n) in [("profile", 1), ("orders", 1), ("avatar", 1)] {
        assert_eq!(
            get(&mut cm, key("app", function, n)).await,
            None,
            "{function}"
        );
    }
    for (namespace, n) in [("app", 2), ("app", 3), ("other", 1), ("app", 4)] {
        assert!(
            get(&mut cm, key(namespace, "profile", n)).await.is_some(),
            "{namespace} profile {n} was busted"
        );
    }
    assert_eq!(bust_tag(&mut cm, "app", "user:7").await, 0, "nothing left");
    assert_eq!(bust_tag(&mut cm, "app", "user:8").await, 1);
    assert_eq!(bust_tag(&mut cm, "app", "never-written").await, 0);
}

/// Tag bookkeeping goes with the entries: in Redis (one node or a cluster) the index keys
/// expire with their last entry; in memory the entry count and charged bytes return to zero.
async fn tag_indexes_expire_with_their_entries(backend: Backend) {
    let env = backend.start(&["--metrics-listen", "127.0.0.1:0"]);
    let mut cm = env.server.client().await;
    cm.put(tagged(key("app", "f", 1), 1, &["user:7", "org:1"]))
        .await
        .unwrap();
    cm.put(tagged(key("app", "g", 1), 2, &["user:7"]))
        .await
        .unwrap();
    if env.keyspace().is_some() {
        assert_eq!(env.tag_index_keys().await.len(), 2);
        // The index outlives its last entry by the slack only (2 x store timeout + 1 s).
        let gone = eventually(Duration::from_secs(8), || async {
            env.tag_index_keys().await.is_empty()
        })
        .await;
        assert!(gone, "{:?}", env.tag_index_keys().await);
        assert_eq!(env.stored_keys().await, BTreeSet::new());
    } else {
        assert_ne!(memory_usage(&env.server), (0, 0));
        let swept = eventually(Duration::from_secs(6), || async {
            memory_usage(&env.server) == (0, 0)
        })
        .await;
        assert!(swept, "{:?}", memory_usage(&env.server));
    }
    assert_eq!(bust_tag(&mut cm, "app", "user:7").await, 0);
}

/// BustTag removes only entries it indexed: in Redis (one node or a cluster), members a foreign client added to the
/// index that name no entry of the namespace leave their keys alone, and so do keys shaped
/// like an index, and a tagged write after them still succeeds. On Redis an entry busted
/// and written again untagged is busted again (its old member stays until it expires: safe
/// over-invalidation); memory knows it is untagged.
async fn bust_tag_ignores_foreign_and_stale_members(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    cm.put(tagged(key("app", "f", 1), 60, &["user:7"]))
        .await
        .unwrap();
    if env.keyspace().is_some() {
        let p = &env.prefix;
        let index = env.tag_index_keys().await.pop_first().unwrap();
        let foreign = [
            format!("{p}config"),
            format!("{p}other:f:{}", digest(1)),
            format!("{p}app:#tag:{}", digest(9)),
        ];
        for key in &foreign {
            ::redis::cmd("SET")
                .arg(key)
                .arg("x")
                .query_async::<()>(&mut env.node_of(key).await)
                .await
                .unwrap();
        }
        ::redis::cmd("ZADD")
            .arg(&index)
            .arg(i64::MAX)
            .arg(&foreign[0])
            .arg(i64::MAX)
            .arg(format!("other:f:{}", digest(1)))
            .arg(i64::MAX)
            .arg(format!("f:{}:x", digest(1)))
            .query_async::<()>(&mut env.node_of(&index).await)
            .await
            .unwrap();
        assert_eq!(bust_tag(&mut cm, "app", "user:7").await, 1);
        for key in &foreign {
            let left: Option<String> = ::redis::cmd("GET")
                .arg(key)
                .query_async(&mut env.node_of(key).await)
                .await
                .unwrap();
            assert_eq!(left.as_deref(), Some("x"), "{key} was busted");
        }
    } else {
        assert_eq!(bust_tag(&mut cm, "app", "user:7").await, 1);
    }
    cm.put(put(key("app", "f", 1), b"v", 60)).await.unwrap();
    cm.put(tagged(key("app", "g", 1), 60, &["user:7"]))
        .await
        .unwrap();
    assert_eq!(
        bust_tag(&mut cm, "app", "user:7").await,
        2 - u64::from(matches!(backend, Backend::Memory)),
        "Redis keeps busted members until they expire, so the rewritten entry goes again; memory knows it is untagged"
    );
}

/// Too many tags, empty, overlong or control-character tags get INVALID_ARGUMENT naming
/// the tag and the rule, and nothing is written, in a Put or anywhere in a PutMany; so does
/// a bad BustTag.
async fn invalid_tags_are_refused_and_write_nothing(backend: Backend) {
    let env = backend.start(&["--max-tags", "2", "--max-tag-bytes", "8"]);
    let mut cm = env.server.client().await;
    let bad = [
        (vec!["a", "b", "c"], "tags: at most 2 tags per write, got 3"),
        (
            vec!["ok", ""],
            "tags[1]: must be 1-8 bytes of UTF-8 without control characters",
        ),
        (vec!["123456789"], "tags[0]: must be 1-8 bytes"),
        (vec!["a\nb"], "tags[0]: must be 1-8 bytes"),
    ];
    for (tags, message) in bad {
        let err = cm
            .put(tagged(key("app", "f", 1), 60, &tags))
            .await
            .expect_err(message);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(message), "{}", err.message());
        let err = cm
            .put_many(pb::PutManyRequest {
                entries: vec![
                    tagged(key("app", "f", 2), 60, &["good"]),
                    tagged(key("app", "f", 3), 60, &tags),
                ],
            })
            .await
            .expect_err(message);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("entries[1].{message}")),
            "{}",
            err.message()
        );
    }
    for n in 1..=3 {
        assert_eq!(get(&mut cm, key("app", "f", n)).await, None);
    }
    if env.keyspace().is_some() {
        assert_eq!(
            env.stored_keys().await,
            BTreeSet::new(),
            "an index was written"
        );
    }
    assert_eq!(bust_tag(&mut cm, "app", "good").await, 0);
    for (namespace, tag, field) in [
        ("a:b", "t", "namespace:"),
        ("app", "", "tag:"),
        ("app", "123456789", "tag:"),
    ] {
        let err = cm
            .bust_tag(pb::BustTagRequest {
                namespace: namespace.into(),
                tag: tag.into(),
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
}

/// BustNamespace removes its tag indexes with its entries and leaves another namespace's;
/// BustAll removes them all; neither counts an index as an entry, and BustFunction leaves
/// indexes alone. Keys never lists an index.
async fn bust_all_and_namespace_remove_tag_indexes(backend: Backend) {
    let env = backend.start(&[]);
    let mut cm = env.server.client().await;
    for namespace in ["a", "b"] {
        cm.put(tagged(key(namespace, "f", 1), 60, &["t1", "t2"]))
            .await
            .unwrap();
        cm.put(tagged(key(namespace, "g", 1), 60, &["t1"]))
            .await
            .unwrap();
    }
    let indexes = || async {
        match env.keyspace() {
            Some(_) => env.tag_index_keys().await.len(),
            None => 0,
        }
    };
    let removed = bust_function(&mut cm, "a", "g").await;
    assert_eq!(removed, 1);
    if env.keyspace().is_some() {
        assert_eq!(indexes().await, 4, "BustFunction removed an index");
    }
    assert_eq!(keys_page(&mut cm, "a", "f", "", 10).await.entries.len(), 1);
    let removed = cm
        .bust_namespace(pb::BustNamespaceRequest {
            namespace: "a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 1, "indexes are not entries");
    if env.keyspace().is_some() {
        assert_eq!(indexes().await, 2, "a's indexes stayed or b's went");
    }
    assert_eq!(bust_tag(&mut cm, "a", "t1").await, 0);
    assert_eq!(bust_tag(&mut cm, "b", "t2").await, 1);
    cm.put(tagged(key("b", "f", 1), 60, &["t2"])).await.unwrap();
    let all = cm.bust_all(pb::BustAllRequest {}).await.unwrap();
    assert_eq!(all.into_inner().removed, 2);
    if env.keyspace().is_some() {
        assert_eq!(env.stored_keys().await, BTreeSet::new());
    }
    assert_eq!(bust_tag(&mut cm, "b", "t1").await, 0);
}
