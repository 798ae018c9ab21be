//! What only a Redis Cluster can show: busts that walk every primary and remove exactly their
//! own entries, counted truly; keys outside the prefix left alone on every node; batches whose
//! keys live on every primary answered in request order; BustTag over entries on every
//! primary. One cluster is shared by the tests of this binary, each under its own key prefix.

mod common;

use std::collections::BTreeSet;

use cache_money::pb;
use common::{CacheServer, RedisCluster, digest, get, key, put, unique_prefix};

/// The Redis keys of `count` entries of `ns.{function}` under `prefix`.
fn entry_keys(prefix: &str, function: &str, count: u64) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| format!("{prefix}ns:{function}:{}", digest(n)).into_bytes())
        .collect()
}

/// 50,000 entries of one function spread over the three primaries, beside 5,000 of a sibling
/// function and keys of another prefix: BustFunction reports exactly 50,000 and leaves every
/// other key on every node.
#[tokio::test]
async fn bust_function_walks_every_primary_and_counts_truly() {
    const ENTRIES: u64 = 50_000;
    let cluster = RedisCluster::shared();
    let prefix = unique_prefix("big");
    let big = entry_keys(&prefix, "big", ENTRIES);
    let sibling = entry_keys(&prefix, "big_sibling", 5_000);
    let foreign = entry_keys(&format!("other{prefix}"), "big", 1_000);
    for keys in [&big, &sibling, &foreign] {
        cluster.set_keys(keys, b"v").await;
    }
    let on_primaries = cluster.primaries_of(&big);
    assert_eq!(on_primaries.len(), 3, "entries on {on_primaries:?}");

    let server = CacheServer::cluster(&cluster, &["--key-prefix", &prefix]);
    let mut cm = server.client().await;
    let started = std::time::Instant::now();
    let removed = common::bust_function(&mut cm, "ns", "big").await;
    eprintln!(
        "cluster BustFunction of {ENTRIES} entries over 3 primaries: {:?}",
        started.elapsed()
    );
    assert_eq!(removed, ENTRIES);
    let mut left = cluster.scan_match(&format!("{prefix}*")).await;
    // The bust's own invalidation stream is no entry.
    left.retain(|key| !common::is_invalidation_stream(key));
    let expected: BTreeSet<Vec<u8>> = sibling.into_iter().collect();
    assert_eq!(left.len(), expected.len(), "entries of big left behind");
    assert_eq!(left, expected);
    let others = cluster.scan_match(&format!("other{prefix}*")).await;
    assert_eq!(
        others.len(),
        foreign.len(),
        "another prefix's keys were removed"
    );
    assert_eq!(common::bust_function(&mut cm, "ns", "big").await, 0);
}

/// BustAll on a cluster removes only entries under the server's prefix: keys of another
/// shape inside the prefix (extra `:` segments, glob characters, uppercase or 33 hex digits,
/// empty names), another prefix and unprefixed keys survive on every node.
#[tokio::test]
async fn bust_all_leaves_foreign_keys_on_every_node() {
    let cluster = RedisCluster::shared();
    let prefix = unique_prefix("app");
    let server = CacheServer::cluster(&cluster, &["--key-prefix", &prefix]);
    let mut cm = server.client().await;
    for n in 0..60 {
        cm.put(put(key("ns", "f", n), b"v", 60)).await.unwrap();
    }
    let d = digest(1);
    let mut foreign = Vec::new();
    for n in 0..20 {
        foreign.extend([
            format!("{prefix}a:b:c{n}:{d}"),
            format!("{prefix}tenant{n}:ns:f:{d}"),
            format!("{prefix}ns{n}:f:{d}:{d}"),
            format!("{prefix}x*{n}:y:{d}"),
            format!("{prefix}ns{n}:f:{}", d.to_uppercase().replace('0', "A")),
            format!("{prefix}ns{n}:f:{d}0"),
            format!("{prefix}ns{n}::{d}"),
            format!("{}ns{n}:f:{d}", prefix.trim_end_matches(':')),
        ]);
    }
    let foreign: Vec<Vec<u8>> = foreign.into_iter().map(String::into_bytes).collect();
    cluster.set_keys(&foreign, b"keep").await;
    let nodes = cluster.primaries_of(&foreign);
    assert_eq!(nodes.len(), 3, "foreign keys on {nodes:?}");

    assert_eq!(common::bust_all(&mut cm).await, 60);
    let mut left = cluster
        .scan_match(&format!("{}*", prefix.trim_end_matches(':')))
        .await;
    // The bust's own invalidation stream is no entry: BustAll leaves it.
    left.retain(|key| !common::is_invalidation_stream(key));
    let expected: BTreeSet<Vec<u8>> = foreign.into_iter().collect();
    assert_eq!(left, expected, "foreign keys removed or entries left");
}

/// A GetMany whose keys live on all three primaries answers every key in request order with
/// its own value, misses included; the entries sit where their slots say.
#[tokio::test]
async fn batches_span_every_primary_in_request_order() {
    let cluster = RedisCluster::shared();
    let prefix = unique_prefix("batch");
    let server = CacheServer::cluster(&cluster, &["--key-prefix", &prefix]);
    let mut cm = server.client().await;
    let entries = (0..300)
        .map(|n| put(key("ns", "f", n), format!("value {n}").as_bytes(), 60))
        .collect();
    let reply = cm.put_many(pb::PutManyRequest { entries }).await;
    assert_eq!(reply.unwrap().into_inner().stored, 300);
    let redis_key = |n: u64| format!("{prefix}ns:f:{}", digest(n)).into_bytes();
    let nodes = cluster.primaries_of(&(0..300).map(redis_key).collect::<Vec<_>>());
    assert_eq!(nodes.len(), 3);
    // Each entry is on the primary its slot names, not merely somewhere.
    for n in [0, 150, 299] {
        let mut node = cluster.node(cluster.primary_of(&redis_key(n))).await;
        let value: Vec<u8> = redis::cmd("GET")
            .arg(redis_key(n))
            .query_async(&mut node)
            .await
            .unwrap();
        assert_eq!(value, format!("value {n}").as_bytes());
    }
    let order: Vec<u64> = (0..400).rev().step_by(3).collect();
    let keys = order.iter().map(|&n| key("ns", "f", n)).collect();
    let answers: Vec<Option<Vec<u8>>> = cm
        .get_many(pb::GetManyRequest { keys })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|result| result.hit.then(|| result.value.to_vec()))
        .collect();
    let expected: Vec<Option<Vec<u8>>> = order
        .iter()
        .map(|&n| (n < 300).then(|| format!("value {n}").into_bytes()))
        .collect();
    assert_eq!(answers, expected);
    assert_eq!(
        get(&mut cm, key("ns", "f", 7)).await.as_deref(),
        Some(&b"value 7"[..])
    );
}

/// Tagged entries of three functions spread over every primary, the tag's index on one:
/// BustTag removes and counts exactly them, one UNLINK per slot wherever they live, and
/// leaves another tag's entries and untagged ones on every node.
#[tokio::test]
async fn bust_tag_removes_tagged_entries_on_every_primary() {
    let cluster = RedisCluster::shared();
    let prefix = unique_prefix("tags");
    let server = CacheServer::cluster(&cluster, &["--key-prefix", &prefix]);
    let mut cm = server.client().await;
    let tagged = |function: &str, n: u64, tag: Option<&str>| pb::PutRequest {
        tags: tag.into_iter().map(str::to_owned).collect(),
        ..put(key("ns", function, n), b"v", 60)
    };
    let mut entries = Vec::new();
    for function in ["profile", "orders", "avatar"] {
        entries.extend((0..100).map(|n| tagged(function, n, Some("user:7"))));
        entries.push(tagged(function, 100, Some("user:8")));
        entries.push(tagged(function, 101, None));
    }
    let reply = cm.put_many(pb::PutManyRequest { entries }).await;
    assert_eq!(reply.unwrap().into_inner().stored, 306);
    let entry_key = |function: &str, n: u64| format!("{prefix}ns:{function}:{}", digest(n));
    let busted: Vec<String> = ["profile", "orders", "avatar"]
        .iter()
        .flat_map(|function| (0..100).map(|n| entry_key(function, n)))
        .collect();
    assert_eq!(cluster.primaries_of(&busted).len(), 3);

    assert_eq!(common::bust_tag(&mut cm, "ns", "user:7").await, 300);
    let left: BTreeSet<Vec<u8>> = cluster
        .scan_match(&format!("{prefix}ns:*"))
        .await
        .into_iter()
        .filter(|key| !key.windows(5).any(|part| part == b":#tag"))
        .collect();
    let expected: BTreeSet<Vec<u8>> = ["profile", "orders", "avatar"]
        .iter()
        .flat_map(|function| [100, 101].map(|n| entry_key(function, n).into_bytes()))
        .collect();
    assert_eq!(left, expected);
}
