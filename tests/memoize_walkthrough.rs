//! The seed's README walkthrough written with `#[cache_money::memoize]` and the process's
//! default client (`cache_money::install`), against the real server binary in front of a real
//! `redis-server`. The default client is global, so this binary holds one test.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use cache_money::{Client, Error, Ttl, memoize};
use common::{CacheServer, Logs, RedisServer};

static ADDITIONS: AtomicUsize = AtomicUsize::new(0);
static MULTIPLICATIONS: AtomicUsize = AtomicUsize::new(0);

#[memoize(ttl = Ttl::HOUR)]
async fn addition(a: i64, b: i64) -> i64 {
    ADDITIONS.fetch_add(1, SeqCst);
    a + b
}

#[memoize(ttl = Ttl::HOUR)]
async fn multiplication(a: i64, b: i64) -> i64 {
    MULTIPLICATIONS.fetch_add(1, SeqCst);
    a * b
}

/// The Redis keys under the server's prefix, sorted, its invalidation stream left out.
async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    redis
        .scan_match("cm:*")
        .await
        .into_iter()
        .filter(|key| !common::is_invalidation_stream(key.as_bytes()))
        .collect()
}

fn entry(function: &str, args: &(i64, i64)) -> String {
    let digest = cache_money::canonical::digest(args).unwrap();
    format!("cm:memoize_walkthrough:{function}:{digest}")
}

/// Before `install`, memoized calls compute without caching (warned once) and busts say no
/// client is installed; after it, the seed's walkthrough replays: computed once then cached,
/// `bust` by call, `bust_all` by function, then the client's `BustNamespace` and `BustAll`,
/// with the entries checked in Redis under `module_path!()` and the function's name.
#[tokio::test]
async fn seed_walkthrough_with_the_attribute() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);

    let logs = Logs::default();
    let capture = logs.capture();
    assert_eq!(addition(3, 4).await, 7);
    assert_eq!(addition(3, 4).await, 7);
    assert_eq!(ADDITIONS.load(SeqCst), 2, "cached without a client");
    assert!(matches!(
        addition::bust(3, 4).await,
        Err(Error::NotInstalled)
    ));
    assert!(matches!(addition::function(), Err(Error::NotInstalled)));
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("cache_money::install"),
        "{warnings:#?}"
    );
    drop(capture);

    let cm = Client::connect(server.url()).await.unwrap();
    cache_money::install(cm.clone()).unwrap();
    let again = Client::connect(server.url()).await.unwrap();
    assert!(matches!(
        cache_money::install(again),
        Err(Error::AlreadyInstalled)
    ));
    ADDITIONS.store(0, SeqCst);

    assert_eq!(addition(3, 4).await, 7);
    assert_eq!(addition(3, 7).await, 10);
    assert_eq!(ADDITIONS.load(SeqCst), 2, "both computed");
    assert_eq!(addition(3, 4).await, 7);
    assert_eq!(
        ADDITIONS.load(SeqCst),
        2,
        "addition(3, 4) came from the cache"
    );
    let mut expected = vec![entry("addition", &(3, 4)), entry("addition", &(3, 7))];
    expected.sort();
    assert_eq!(redis_keys(&redis).await, expected);
    let ttl: i64 = redis::cmd("TTL")
        .arg(entry("addition", &(3, 4)))
        .query_async(&mut redis.connect().await)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "TTL {ttl}");

    assert!(addition::bust(3, 4).await.unwrap());
    assert!(!addition::bust(3, 4).await.unwrap());
    assert_eq!(addition(3, 4).await, 7);
    assert_eq!(ADDITIONS.load(SeqCst), 3, "recomputed after bust");

    assert_eq!(multiplication(2, 4).await, 8);
    assert_eq!(MULTIPLICATIONS.load(SeqCst), 1);
    assert_eq!(addition::bust_all().await.unwrap(), 2);
    assert_eq!(
        redis_keys(&redis).await,
        vec![entry("multiplication", &(2, 4))]
    );

    assert_eq!(cm.bust_namespace("memoize_walkthrough").await.unwrap(), 1);
    assert_eq!(multiplication(2, 4).await, 8);
    assert_eq!(
        MULTIPLICATIONS.load(SeqCst),
        2,
        "recomputed after BustNamespace"
    );
    assert_eq!(addition(1, 1).await, 2);
    assert_eq!(cm.bust_all().await.unwrap(), 2);
    assert!(redis_keys(&redis).await.is_empty());
    assert_eq!(multiplication(2, 4).await, 8);
    assert_eq!(MULTIPLICATIONS.load(SeqCst), 3, "recomputed after BustAll");
}
