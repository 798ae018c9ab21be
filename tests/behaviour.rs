//! The behaviour suite: every RPC's contract, run against the real server binary three times:
//! over a real `redis-server`, over a real Redis Cluster (three primaries, three replicas,
//! shared by the tests, each under its own key prefix) and with the in-memory store.

mod common;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use cache_money::pb;
use common::{CacheServer, RedisCluster, RedisServer, digest, eventually, get, key, put};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

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
    _redis: Option<RedisServer>,
    _cluster: Option<Arc<RedisCluster>>,
}

impl Backend {
    fn start(self, extra: &[&str]) -> Env {
        match self {
            Backend::Memory => Env {
                server: CacheServer::memory(extra),
                _redis: None,
                _cluster: None,
            },
            Backend::Redis => {
                let redis = RedisServer::start();
                Env {
                    server: CacheServer::redis(&redis, extra),
                    _redis: Some(redis),
                    _cluster: None,
                }
            }
            Backend::Cluster => {
                let cluster = RedisCluster::shared();
                let prefix = common::unique_prefix("behaviour");
                let mut args = vec!["--key-prefix", prefix.as_str()];
                args.extend_from_slice(extra);
                Env {
                    server: CacheServer::cluster(&cluster, &args),
                    _redis: None,
                    _cluster: Some(cluster),
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
);

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
