//! Hostile input, generated: 10,000 Puts with names, digests, TTLs and values drawn from
//! unicode, glob characters, `:`, empty and 10 KB strings and control characters, through the
//! real server into a real Redis; and 500 pairs of look-alike names busted against each other.
//! Every outcome is judged by predicates written here, independent of the server's own code.

mod common;

use std::collections::BTreeSet;

use cache_money::pb;
use common::{CacheServer, RedisServer};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tonic::Code;

const MAX_VALUE: usize = 1000;
const MAX_TTL: u32 = 3600;

/// The naming rule, restated: 1-128 characters of [A-Za-z0-9_.-].
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

/// A Redis key the server may write: `cm:` + name + `:` + name + `:` + digest.
fn valid_redis_key(key: &str) -> bool {
    let Some(rest) = key.strip_prefix("cm:") else {
        return false;
    };
    let parts: Vec<&str> = rest.split(':').collect();
    parts.len() == 3 && valid_name(parts[0]) && valid_name(parts[1]) && valid_digest(parts[2])
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = RedisServer::start();
    let server = CacheServer::redis(
        &redis,
        &[
            "--max-value-bytes",
            &MAX_VALUE.to_string(),
            "--max-ttl-seconds",
            &MAX_TTL.to_string(),
        ],
    );
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
                        let key = format!("cm:{namespace}:{function}:{digest}");
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

    let keys: BTreeSet<String> = runtime.block_on(async {
        let mut conn = redis.connect().await;
        let (mut cursor, mut keys) = (0u64, BTreeSet::new());
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break keys;
            }
        }
    });
    for key in &keys {
        assert!(
            valid_redis_key(key),
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let cm = runtime.block_on(server.client());
    let conn = runtime.block_on(redis.connect());
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
            let (mut cm, mut conn) = (cm.clone(), conn.clone());
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
                        (format!("cm:{ns}:{b}:{digest}"), true),
                        (format!("cm:{b}:f:{digest}"), true),
                        (format!("cm:{ns}:{a}:{digest}"), false),
                        (format!("cm:{a}:f:{digest}"), false),
                    ] {
                        let exists: bool = redis::cmd("EXISTS")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        if exists != should_exist {
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
