//! Hostile input, generated: 10,000 Puts with names, digests, TTLs and values drawn from
//! unicode, glob characters, `:`, empty and 10 KB strings and control characters, through the
//! real server into a real Redis; 500 pairs of look-alike names busted against each other; and
//! 600 foreign keys shaped to fool the bust patterns, written straight into Redis beside real
//! entries, surviving every bust scope; and 400 tagged Puts with hostile tags, refused by
//! the tag rule or busted exactly by BustTag.
//! Every outcome is judged by predicates written here, independent of the server's own code.
//! Each runs against one Redis and against a Redis Cluster (shared by the cluster runs of this
//! binary, each under its own key prefix).

mod common;

use std::{collections::BTreeSet, sync::Arc};

use cache_money::pb;
use common::{CacheServer, RedisCluster, RedisServer};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tonic::Code;

const MAX_VALUE: usize = 1000;
const MAX_TTL: u32 = 3600;

/// The naming rule, restated: 1-128 bytes of [A-Za-z0-9_.-].
fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

fn valid_digest(digest: &str) -> bool {
    digest.len() == 32
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A Redis key the server may write: `prefix` + name + `:` + name + `:` + digest.
fn valid_redis_key(prefix: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let parts: Vec<&str> = rest.split(':').collect();
    parts.len() == 3 && valid_name(parts[0]) && valid_name(parts[1]) && valid_digest(parts[2])
}

/// `valid_redis_key` for a key read back as bytes (Redis keys need not be UTF-8).
fn valid_redis_key_bytes(prefix: &str, key: &[u8]) -> bool {
    std::str::from_utf8(key).is_ok_and(|key| valid_redis_key(prefix, key))
}

/// Where the server under test writes, and how the tests read it back without the server.
enum Keyspace {
    Redis(RedisServer, redis::aio::MultiplexedConnection),
    Cluster(Arc<RedisCluster>, redis::cluster_async::ClusterConnection),
}

/// A keyspace and the key prefix the server writes under.
struct Store {
    keyspace: Keyspace,
    prefix: String,
}

impl Store {
    /// One Redis of its own (prefix `cm:`), or the shared cluster under a prefix of its own.
    fn start(runtime: &tokio::runtime::Runtime, cluster: bool) -> Self {
        if !cluster {
            let redis = RedisServer::start();
            let connection = runtime.block_on(redis.connect());
            return Store {
                keyspace: Keyspace::Redis(redis, connection),
                prefix: "cm:".into(),
            };
        }
        let shared = RedisCluster::shared();
        let client =
            redis::cluster::ClusterClient::new(shared.seeds().split(',').collect::<Vec<_>>())
                .unwrap();
        let connection = runtime.block_on(client.get_async_connection()).unwrap();
        Store {
            keyspace: Keyspace::Cluster(shared, connection),
            prefix: common::unique_prefix("prop"),
        }
    }

    /// The server in front of it, with `extra` arguments.
    fn server(&self, extra: &[&str]) -> CacheServer {
        let mut args = vec!["--key-prefix", self.prefix.as_str()];
        args.extend_from_slice(extra);
        match &self.keyspace {
            Keyspace::Redis(redis, _) => CacheServer::redis(redis, &args),
            Keyspace::Cluster(cluster, _) => CacheServer::cluster(cluster, &args),
        }
    }

    /// `key` written for the prefix `cm:` rewritten for this store's prefix.
    fn prefixed(&self, key: &[u8]) -> Vec<u8> {
        let rest = key.strip_prefix(b"cm:").expect("written under cm:");
        [self.prefix.as_bytes(), rest].concat()
    }

    /// Every key in Redis (one Redis) or under the prefix (the shared cluster), the
    /// invalidation stream left out (every write and bust appends to it).
    async fn keys(&self) -> BTreeSet<Vec<u8>> {
        let mut keys: BTreeSet<Vec<u8>> = match &self.keyspace {
            Keyspace::Redis(redis, _) => redis
                .scan_match("*")
                .await
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            Keyspace::Cluster(cluster, _) => cluster.scan_match(&format!("{}*", self.prefix)).await,
        };
        keys.retain(|key| !common::is_invalidation_stream(key));
        keys
    }

    /// How many keys `keys` would list, counted by Redis on one Redis.
    async fn size(&self) -> u64 {
        match &self.keyspace {
            Keyspace::Redis(redis, _) => redis.dbsize().await,
            Keyspace::Cluster(..) => self.keys().await.len() as u64,
        }
    }

    async fn set(&self, keys: &BTreeSet<Vec<u8>>) {
        match &self.keyspace {
            Keyspace::Redis(_, connection) => {
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.cmd("SET").arg(key).arg("keep").ignore();
                }
                pipe.query_async::<()>(&mut connection.clone())
                    .await
                    .unwrap();
            }
            Keyspace::Cluster(cluster, _) => {
                cluster
                    .set_keys(&keys.iter().cloned().collect::<Vec<_>>(), b"keep")
                    .await
            }
        }
    }

    async fn exists(&self, key: &[u8]) -> bool {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(key);
        match &self.keyspace {
            Keyspace::Redis(_, connection) => exists.query_async(&mut connection.clone()).await,
            Keyspace::Cluster(_, connection) => exists.query_async(&mut connection.clone()).await,
        }
        .unwrap()
    }

    /// Removes every key a case left (FLUSHALL on one Redis; the prefix's keys on the shared
    /// cluster).
    async fn clear(&self) {
        match &self.keyspace {
            Keyspace::Redis(_, connection) => redis::cmd("FLUSHALL")
                .query_async::<()>(&mut connection.clone())
                .await
                .unwrap(),
            Keyspace::Cluster(_, connection) => {
                for key in self.keys().await {
                    redis::cmd("DEL")
                        .arg(key)
                        .query_async::<()>(&mut connection.clone())
                        .await
                        .unwrap();
                }
            }
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        14 => "[A-Za-z0-9_.-]{1,128}",
        1 => "[A-Za-z0-9_.-]{129,140}",
        1 => Just(String::new()),
        2 => r"[A-Za-z0-9_.:*?\[\]\\-]{1,20}",
        1 => any::<String>(),
        1 => "[\\x00-\\x1f\\x7f]{1,4}",
        1 => "\\PC{1,8}",
        1 => Just("n".repeat(10_000)),
        1 => Just("*".repeat(10_000)),
    ]
}

fn digest() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[0-9a-f]{32}",
        1 => "[0-9A-F]{32}",
        1 => "[0-9a-f]{31,33}",
        1 => r"[0-9a-f*?\[\]:]{32}",
        1 => any::<String>(),
        1 => Just(String::new()),
        1 => Just("f".repeat(10_000)),
    ]
}

fn ttl() -> impl Strategy<Value = u32> {
    prop_oneof![10 => 1..=MAX_TTL, 1 => Just(0u32), 1 => MAX_TTL + 1..=u32::MAX]
}

fn value_len() -> impl Strategy<Value = usize> {
    prop_oneof![10 => 0..=MAX_VALUE, 1 => Just(MAX_VALUE + 1), 1 => MAX_VALUE + 1..=4 * MAX_VALUE]
}

/// 10,000 generated Puts: each is stored or refused as INVALID_ARGUMENT naming the field that
/// broke the rule; the server never panics; Redis holds only keys of the documented shape,
/// one per accepted Put.
#[test]
fn generated_requests_are_stored_or_refused_by_the_rules() {
    generated_requests(false)
}

/// As `generated_requests_are_stored_or_refused_by_the_rules`, on a Redis Cluster: the keys
/// under the server's prefix on every primary are exactly those of the accepted Puts.
#[test]
fn generated_requests_are_stored_or_refused_by_the_rules_on_a_cluster() {
    generated_requests(true)
}

fn generated_requests(cluster: bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::start(&runtime, cluster);
    let server = store.server(&[
        "--max-value-bytes",
        &MAX_VALUE.to_string(),
        "--max-ttl-seconds",
        &MAX_TTL.to_string(),
    ]);
    let cm = runtime.block_on(server.client());
    // Accepted key → TTL of its latest Put.
    let accepted = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let refused = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (name(), name(), digest(), ttl(), value_len());
    runner
        .run(
            &strategy,
            |(namespace, function, digest, ttl_seconds, len)| {
                let request = pb::PutRequest {
                    key: Some(pb::Key {
                        namespace: namespace.clone(),
                        function: function.clone(),
                        digest: digest.clone(),
                    }),
                    value: vec![b'v'; len].into(),
                    ttl_seconds,
                    tags: Vec::new(),
                    ..Default::default()
                };
                let outcome = runtime.block_on(cm.clone().put(request));
                // The first broken rule, in the order the contract checks them.
                let broken = if !valid_name(&namespace) {
                    Some("key.namespace:")
                } else if !valid_name(&function) {
                    Some("key.function:")
                } else if !valid_digest(&digest) {
                    Some("key.digest:")
                } else if ttl_seconds == 0 || ttl_seconds > MAX_TTL {
                    Some("ttl_seconds:")
                } else if len > MAX_VALUE {
                    Some("value:")
                } else {
                    None
                };
                match (broken, outcome) {
                    (None, Ok(_)) => {
                        let key = format!("{}{namespace}:{function}:{digest}", store.prefix);
                        accepted.borrow_mut().insert(key, ttl_seconds);
                    }
                    (Some(field), Err(status)) => {
                        refused.set(refused.get() + 1);
                        prop_assert_eq!(status.code(), Code::InvalidArgument);
                        prop_assert!(
                            status.message().starts_with(field),
                            "{} vs {}",
                            field,
                            status.message()
                        );
                        prop_assert!(
                            status.message().len() < 400,
                            "message too long: {} bytes",
                            status.message().len()
                        );
                    }
                    (None, Err(status)) => {
                        prop_assert!(false, "a valid Put was refused: {status:?}")
                    }
                    (Some(field), Ok(_)) => {
                        prop_assert!(false, "a Put breaking {field} was stored")
                    }
                }
                Ok(())
            },
        )
        .unwrap();

    let keys: BTreeSet<String> = runtime
        .block_on(store.keys())
        .into_iter()
        .map(|key| String::from_utf8(key).expect("only UTF-8 keys are written"))
        .collect();
    for key in &keys {
        assert!(
            valid_redis_key(&store.prefix, key),
            "Redis holds a key outside the layout: {key:?}"
        );
    }
    // Both paths were exercised in bulk, not just one.
    assert!(refused.get() > 2000, "only {} refused", refused.get());
    assert!(keys.len() > 1500, "only {} stored", keys.len());
    let accepted = accepted.into_inner();
    let unexpected: Vec<&String> = keys
        .iter()
        .filter(|key| !accepted.contains_key(*key))
        .collect();
    assert!(
        unexpected.is_empty(),
        "Redis holds keys no accepted Put wrote: {unexpected:?}"
    );
    // Entries with short TTLs may expire during the run; long-lived ones must all be there.
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|(key, ttl)| **ttl >= 300 && !keys.contains(*key))
        .map(|(key, _)| key)
        .collect();
    assert!(
        missing.is_empty(),
        "accepted entries missing from Redis: {missing:?}"
    );
    assert!(
        !server.log_text().contains("panicked"),
        "the server panicked:\n{}",
        server.log_text()
    );
}

/// Names made to collide: one stem and its look-alikes (prefixes, extensions, dots, dashes).
fn look_alikes() -> impl Strategy<Value = (String, String)> {
    let stem = "[a-z]{1,5}";
    let variant = |stem: String| {
        prop_oneof![
            Just(stem.clone()),
            Just(format!("{stem}_user")),
            Just(format!("{stem}.v2")),
            Just(format!("{stem}-1")),
            Just(format!("{stem}0")),
            Just(format!("x{stem}")),
            Just(format!("{stem}{stem}")),
            Just(stem[..stem.len().div_ceil(2)].to_string()),
        ]
    };
    stem.prop_flat_map(move |stem| (variant(stem.clone()), variant(stem)))
        .prop_filter("two different names", |(a, b)| a != b)
}

/// 500 pairs of look-alike function names and 500 of namespace names: busting one never
/// removes an entry of the other, checked in Redis.
#[test]
fn busting_never_touches_a_look_alike() {
    look_alikes_survive(false)
}

/// As `busting_never_touches_a_look_alike`, on a Redis Cluster, checked on the nodes.
#[test]
fn busting_never_touches_a_look_alike_on_a_cluster() {
    look_alikes_survive(true)
}

fn look_alikes_survive(cluster: bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::start(&runtime, cluster);
    let server = store.server(&[]);
    let cm = runtime.block_on(server.client());
    let rounds = std::cell::Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&look_alikes(), |(a, b)| {
            rounds.set(rounds.get() + 1);
            let round = rounds.get();
            let (mut cm, store) = (cm.clone(), &store);
            let foreign_deletes = runtime.block_on(async {
                // Function pair inside one namespace, then a namespace pair.
                let ns = format!("round{round}");
                let digests: Vec<String> = (0..3).map(|i| common::digest(round * 10 + i)).collect();
                let mut entries = Vec::new();
                for function in [&a, &b] {
                    for digest in &digests {
                        let key = pb::Key {
                            namespace: ns.clone(),
                            function: function.clone(),
                            digest: digest.clone(),
                        };
                        entries.push(common::put(key.clone(), b"v", 600));
                        let key = pb::Key {
                            namespace: function.clone(),
                            function: "f".into(),
                            digest: digest.clone(),
                        };
                        entries.push(common::put(key, b"v", 600));
                    }
                }
                cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
                cm.bust_function(pb::BustFunctionRequest {
                    namespace: ns.clone(),
                    function: a.clone(),
                })
                .await
                .unwrap();
                cm.bust_namespace(pb::BustNamespaceRequest {
                    namespace: a.clone(),
                })
                .await
                .unwrap();
                let mut foreign_deletes = 0;
                for digest in &digests {
                    for (key, should_exist) in [
                        (format!("{}{ns}:{b}:{digest}", store.prefix), true),
                        (format!("{}{b}:f:{digest}", store.prefix), true),
                        (format!("{}{ns}:{a}:{digest}", store.prefix), false),
                        (format!("{}{a}:f:{digest}", store.prefix), false),
                    ] {
                        if store.exists(key.as_bytes()).await != should_exist {
                            foreign_deletes += 1;
                        }
                    }
                }
                // Leave nothing of b behind for later rounds that reuse its name.
                cm.bust_namespace(pb::BustNamespaceRequest {
                    namespace: b.clone(),
                })
                .await
                .unwrap();
                foreign_deletes
            });
            prop_assert_eq!(foreign_deletes, 0, "busting {:?} disturbed {:?}", a, b);
            Ok(())
        })
        .unwrap();
    assert!(
        rounds.get() >= 500,
        "only {} pairs were tried",
        rounds.get()
    );
}

/// The names the foreign keys below are built from, and the scopes the test busts: a foreign
/// key only tests a bust if it falls inside that bust's SCAN pattern.
const BUSTED_NAMES: [&str; 4] = ["tenant", "a", "x", "ns"];

fn busted_name() -> impl Strategy<Value = String> {
    proptest::sample::select(&BUSTED_NAMES[..]).prop_map(String::from)
}

/// A key under `cm:` that is not an entry, shaped to fall inside the SCAN patterns of the
/// busts (`cm:*:*:` followed by 32 hex digits, `cm:a:*:…`): extra `:` segments, another
/// deployment's prefix that starts with ours (`cm:tenant:`), glob characters in names,
/// uppercase hex, 31 or 33 hex digits, names over 128 bytes, empty segments, other bytes.
fn foreign_key() -> impl Strategy<Value = Vec<u8>> {
    let n = busted_name;
    let d = || "[0-9a-f]{32}";
    prop_oneof![
        (n(), n(), n(), d()).prop_map(|(a, b, c, d)| format!("cm:{a}:{b}:{c}:{d}").into_bytes()),
        (n(), n(), d()).prop_map(|(a, b, d)| format!("cm:tenant:{a}:{b}:{d}").into_bytes()),
        (n(), n(), d(), d()).prop_map(|(a, b, d, e)| format!("cm:{a}:{b}:{d}:{e}").into_bytes()),
        (n(), n(), n(), n(), d())
            .prop_map(|(a, b, c, e, d)| format!("cm:{a}:{b}:{c}:{e}:{d}").into_bytes()),
        (n(), r"[*?\[\]\\^]{1,3}", n(), d())
            .prop_map(|(a, glob, b, d)| format!("cm:{a}{glob}:{b}:{d}").into_bytes()),
        (n(), r"[*?\[\]\\^]{1,3}", d())
            .prop_map(|(a, glob, d)| format!("cm:{a}:{glob}:{d}").into_bytes()),
        (n(), n(), "[0-9a-f]{31}[A-F]")
            .prop_map(|(a, b, d)| format!("cm:{a}:{b}:{d}").into_bytes()),
        (n(), n(), "[0-9A-F]{32}").prop_map(|(a, b, d)| format!("cm:{a}:{b}:{d}").into_bytes()),
        (n(), n(), prop_oneof!["[0-9a-f]{31}", "[0-9a-f]{33}"])
            .prop_map(|(a, b, d)| format!("cm:{a}:{b}:{d}").into_bytes()),
        (n(), "[a-z]{129,140}", d())
            .prop_map(|(a, long, d)| format!("cm:{a}:{long}:{d}").into_bytes()),
        ("[a-z]{129,140}", n(), d())
            .prop_map(|(long, b, d)| format!("cm:{long}:{b}:{d}").into_bytes()),
        (n(), d()).prop_map(|(b, d)| format!("cm::{b}:{d}").into_bytes()),
        (n(), d()).prop_map(|(a, d)| format!("cm:{a}::{d}").into_bytes()),
        d().prop_map(|d| format!("cm:::{d}").into_bytes()),
        (n(), n(), d()).prop_map(|(a, b, d)| format!("cm:{a}:{b}:{d}:").into_bytes()),
        (n(), n(), d()).prop_map(|(a, b, d)| format!("cm:{a}:{b}:{d}0").into_bytes()),
        (n(), "[ é\u{0}\n]{1,3}", n(), d())
            .prop_map(|(a, odd, b, d)| format!("cm:{a}{odd}:{b}:{d}").into_bytes()),
        (n(), n(), d()).prop_map(|(a, b, d)| {
            let mut key = format!("cm:{a}").into_bytes();
            key.push(0xff);
            key.extend(format!(":{b}:{d}").into_bytes());
            key
        }),
    ]
    .prop_filter("a foreign key, not an entry", |key| {
        !valid_redis_key_bytes("cm:", key)
    })
}

/// Every (namespace, function) pair of `BUSTED_NAMES`.
fn busted_functions() -> Vec<(&'static str, &'static str)> {
    BUSTED_NAMES
        .iter()
        .flat_map(|ns| BUSTED_NAMES.iter().map(move |function| (*ns, *function)))
        .collect()
}

/// Runs every bust scope through the server over entries it wrote itself: one entry, one
/// function, each namespace, then everything. Returns how many entries the busts reported.
async fn bust_every_scope(
    cm: &mut pb::cache_money_client::CacheMoneyClient<tonic::transport::Channel>,
) -> u64 {
    let mut removed = 0;
    removed += cm
        .bust(pb::BustRequest {
            key: Some(common::key("a", "x", 0)),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    removed += common::bust_function(cm, "tenant", "a").await;
    for namespace in BUSTED_NAMES {
        let request = pb::BustNamespaceRequest {
            namespace: namespace.into(),
        };
        removed += cm
            .bust_namespace(request)
            .await
            .unwrap()
            .into_inner()
            .removed;
    }
    removed += cm
        .bust_all(pb::BustAllRequest {})
        .await
        .unwrap()
        .into_inner()
        .removed;
    removed
}

/// 600 foreign keys shaped to fool the SCAN patterns, written straight into Redis beside
/// entries the server wrote: every bust scope removes exactly the server's entries, `Keys`
/// lists only them, and every foreign key is still in Redis afterwards.
#[test]
fn busts_never_touch_foreign_keys_inside_their_patterns() {
    foreign_keys_survive(false)
}

/// As `busts_never_touch_foreign_keys_inside_their_patterns`, on a Redis Cluster: the
/// foreign keys spread over every primary and survive busts that walk them all.
#[test]
fn busts_never_touch_foreign_keys_inside_their_patterns_on_a_cluster() {
    foreign_keys_survive(true)
}

fn foreign_keys_survive(cluster: bool) {
    const CASES: u32 = 4;
    const KEYS_PER_CASE: usize = 150;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::start(&runtime, cluster);
    let server = store.server(&["--bust-batch", "50"]);
    let cm = runtime.block_on(server.client());
    let checked = std::cell::Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = proptest::collection::btree_set(foreign_key(), KEYS_PER_CASE);
    runner
        .run(&strategy, |foreign| {
            let (mut cm, store) = (cm.clone(), &store);
            let foreign: BTreeSet<Vec<u8>> =
                foreign.iter().map(|key| store.prefixed(key)).collect();
            let (removed, listed, survivors) = runtime.block_on(async {
                store.clear().await;
                store.set(&foreign).await;
                let entries = busted_functions()
                    .into_iter()
                    .flat_map(|(ns, function)| {
                        (0..2).map(move |n| common::put(common::key(ns, function, n), b"v", 600))
                    })
                    .collect();
                cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
                let mut listed = Vec::new();
                for (ns, function) in busted_functions() {
                    let request = pb::KeysRequest {
                        namespace: ns.into(),
                        function: function.into(),
                        ..Default::default()
                    };
                    let page = cm.keys(request).await.unwrap().into_inner();
                    listed.push(page.entries.len());
                }
                let removed = bust_every_scope(&mut cm).await;
                let mut exists = Vec::new();
                for key in &foreign {
                    exists.push(store.exists(key).await);
                }
                let dbsize = store.size().await;
                let gone: Vec<String> = foreign
                    .iter()
                    .zip(exists)
                    .filter(|(_, exists)| !exists)
                    .map(|(key, _)| String::from_utf8_lossy(key).into_owned())
                    .collect();
                (removed, listed, (gone, dbsize))
            });
            let (gone, dbsize) = survivors;
            prop_assert!(gone.is_empty(), "busts removed foreign keys: {:?}", gone);
            let entries = busted_functions().len() as u64 * 2;
            prop_assert_eq!(removed, entries, "busts reported a wrong count");
            prop_assert_eq!(dbsize, foreign.len() as u64, "entries left behind");
            prop_assert!(
                listed.iter().all(|&n| n == 2),
                "Keys listed more or less than a function's 2 entries: {:?}",
                listed
            );
            checked.set(checked.get() + foreign.len());
            Ok(())
        })
        .unwrap();
    assert!(
        checked.get() >= CASES as usize * KEYS_PER_CASE,
        "only {} foreign keys were checked",
        checked.get()
    );
}

/// Keys as text (every key these tests write is UTF-8).
fn utf8(keys: BTreeSet<Vec<u8>>) -> BTreeSet<String> {
    keys.into_iter()
        .map(|key| String::from_utf8(key).expect("a UTF-8 key"))
        .collect()
}

/// The tag rule, restated: 1-256 bytes of UTF-8 without control characters.
fn valid_tag(tag: &str) -> bool {
    (1..=256).contains(&tag.len()) && !tag.chars().any(char::is_control)
}

fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => "(user|shop):[0-9]",
        2 => r"[*?\[\]\\:#{}]{1,6}",
        2 => "\\PC{1,12}",
        1 => any::<String>(),
        1 => Just(String::new()),
        1 => "[\\x00-\\x1f\\x7f]{1,3}",
        1 => "x{257,300}",
        1 => Just("é".repeat(128)),
        1 => Just("é".repeat(129)),
    ]
}

/// 400 generated tagged Puts (tags of globs, separators, unicode, control characters, empty
/// and overlong, up to three per write): each is stored or refused by the tag rule naming
/// the tag; Redis then holds only entries and tag indexes of the documented shapes; and a
/// BustTag of every accepted (namespace, tag) removes exactly the entries written with it
/// that no earlier BustTag removed, leaving only the untagged ones.
#[test]
fn generated_tags_are_refused_or_bust_exactly_their_entries() {
    generated_tags(false)
}

/// As `generated_tags_are_refused_or_bust_exactly_their_entries`, on a Redis Cluster: indexes
/// and entries under the server's prefix on every primary, busted across slots.
#[test]
fn generated_tags_are_refused_or_bust_exactly_their_entries_on_a_cluster() {
    generated_tags(true)
}

fn generated_tags(cluster: bool) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Store::start(&runtime, cluster);
    let prefix = store.prefix.clone();
    let server = store.server(&[]);
    let cm = runtime.block_on(server.client());
    // (namespace, tag) → the entries written with it; and the untagged entries.
    let tagged = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let untagged = std::cell::RefCell::new(BTreeSet::new());
    let written = std::cell::Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::sample::select(&["app", "billing"][..]),
        proptest::sample::select(&["f", "g", "h"][..]),
        proptest::collection::vec(tag(), 0..=3),
    );
    runner
        .run(&strategy, |(namespace, function, tags)| {
            // A digest of its own per write, so no entry is ever rewritten with other tags.
            written.set(written.get() + 1);
            let digest = format!("{:032x}", written.get());
            let entry = format!("{prefix}{namespace}:{function}:{digest}");
            let request = pb::PutRequest {
                key: Some(pb::Key {
                    namespace: namespace.into(),
                    function: function.into(),
                    digest,
                }),
                value: b"v".to_vec().into(),
                ttl_seconds: 600,
                tags: tags.clone(),
                ..Default::default()
            };
            let outcome = runtime.block_on(cm.clone().put(request));
            match (tags.iter().position(|tag| !valid_tag(tag)), outcome) {
                (None, Ok(_)) if tags.is_empty() => {
                    untagged.borrow_mut().insert(entry);
                }
                (None, Ok(_)) => {
                    for tag in tags {
                        tagged
                            .borrow_mut()
                            .entry((namespace, tag))
                            .or_insert_with(BTreeSet::new)
                            .insert(entry.clone());
                    }
                }
                (Some(i), Err(status)) => {
                    prop_assert_eq!(status.code(), Code::InvalidArgument);
                    let field = format!("tags[{i}]:");
                    prop_assert!(status.message().starts_with(&field), "{}", status.message());
                }
                (None, Err(status)) => prop_assert!(false, "valid tags refused: {status:?}"),
                (Some(i), Ok(_)) => prop_assert!(false, "tag {:?} was stored", tags[i]),
            }
            Ok(())
        })
        .unwrap();

    let tagged = tagged.into_inner();
    let untagged = untagged.into_inner();
    let indexes: BTreeSet<String> = tagged
        .keys()
        .map(|(namespace, tag)| format!("{prefix}{namespace}:#tag:{:x}", md5::compute(tag)))
        .collect();
    let entries: BTreeSet<String> = tagged.values().flatten().cloned().collect();
    let keys = utf8(runtime.block_on(store.keys()));
    let expected: BTreeSet<String> = indexes
        .iter()
        .chain(&entries)
        .chain(&untagged)
        .cloned()
        .collect();
    assert_eq!(
        keys, expected,
        "Redis holds exactly the entries and indexes"
    );
    assert!(
        tagged.len() > 20 && entries.len() > 100,
        "too few tagged writes"
    );

    let mut busted = BTreeSet::new();
    for ((namespace, tag), carrying) in &tagged {
        let removed = runtime
            .block_on(cm.clone().bust_tag(pb::BustTagRequest {
                namespace: (*namespace).into(),
                tag: tag.clone(),
            }))
            .unwrap()
            .into_inner()
            .removed;
        let fresh = carrying.difference(&busted).count() as u64;
        assert_eq!(removed, fresh, "BustTag {namespace} {tag:?}");
        busted.extend(carrying.iter().cloned());
    }
    let left: BTreeSet<String> = utf8(runtime.block_on(store.keys()))
        .into_iter()
        .filter(|key| !indexes.contains(key))
        .collect();
    assert_eq!(left, untagged, "only the untagged entries are left");
}
