//! The client library end to end: the real server binary, a real `redis-server`, and
//! `cache_money::Client` as an application would use it.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use cache_money::{Client, ClientOptions, Error, Ttl, pb};
use common::{CacheServer, RedisServer, eventually};
use serde::{Deserialize, Serialize};

/// Redis keys with their remaining TTL in seconds, sorted.
async fn redis_entries(redis: &RedisServer) -> Vec<(String, i64)> {
    let mut conn = redis.connect().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    // The invalidation stream every write and bust appends to is no entry.
    keys.retain(|key| !common::is_invalidation_stream(key.as_bytes()));
    let mut entries = Vec::new();
    for key in keys {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        entries.push((key, ttl));
    }
    entries
}

/// The stats of a server, as its own client reports them.
async fn stats(server: &CacheServer) -> pb::StatsResponse {
    server
        .client()
        .await
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The seed README, step by step as the quickstart prints it: computed, cached, busted by
/// call and then computed again, busted by function and all, with the entries and TTLs
/// checked in Redis and a key outside the prefix surviving.
#[tokio::test]
async fn seed_readme_replays_exactly() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let addition = cm.function("__main__", "addition", Ttl::HOUR);
    let multiplication = cm.function("__main__", "multiplication", Ttl::HOUR);
    let calls = AtomicUsize::new(0);
    let add = |a: i64, b: i64| {
        let (addition, calls) = (&addition, &calls);
        async move {
            addition
                .memoize(&(a, b), || async {
                    calls.fetch_add(1, SeqCst);
                    a + b
                })
                .await
                .unwrap()
        }
    };

    assert_eq!(add(3, 4).await, 7);
    assert_eq!(add(3, 7).await, 10);
    assert_eq!(calls.load(SeqCst), 2, "both computed");
    assert_eq!(add(3, 4).await, 7);
    assert_eq!(calls.load(SeqCst), 2, "addition(3, 4) came from the cache");

    let entries = redis_entries(&redis).await;
    let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "cm:__main__:addition:716c80946bbe5b74492f00ace48b046a",
            "cm:__main__:addition:b814fa889082069ffb727ee1623c0944",
        ]
    );
    for (key, ttl) in &entries {
        assert!(*ttl > 3590 && *ttl <= 3600, "{key} ttl {ttl}");
    }

    assert!(addition.bust(&(3, 4)).await.unwrap());
    assert_eq!(redis_entries(&redis).await.len(), 1);
    assert_eq!(add(3, 4).await, 7);
    assert_eq!(
        calls.load(SeqCst),
        3,
        "addition(3, 4) computed again after its bust"
    );

    let product: i64 = multiplication
        .memoize(&(2, 4), || async {
            calls.fetch_add(1, SeqCst);
            8
        })
        .await
        .unwrap();
    assert_eq!(product, 8);
    assert_eq!(calls.load(SeqCst), 4, "multiplication(2, 4) computed");
    assert_eq!(
        addition.bust_all().await.unwrap(),
        2,
        "bust_all removes both addition entries"
    );
    let keys: Vec<String> = redis_entries(&redis)
        .await
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        keys,
        ["cm:__main__:multiplication:a157b852663a42e907fc1ae4884ff3e4"]
    );

    let mut conn = redis.connect().await;
    redis::cmd("SET")
        .arg("unrelated:key")
        .arg("keep")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(cm.bust_all().await.unwrap(), 1);
    let keys: Vec<String> = redis_entries(&redis)
        .await
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(keys, ["unrelated:key"]);
}

/// 1,000 calls against a stopped service return correct values; the breaker opened, so only
/// a handful of RPCs were tried; once the server is back, caching resumes on the same client.
#[tokio::test]
async fn fail_open_when_the_server_is_down() {
    let mut server = CacheServer::memory(&[]);
    let options = ClientOptions {
        breaker_cooldown: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options).await.unwrap();
    let square = cm.function("fail_open", "square", Ttl::MINUTE);
    let calls = AtomicUsize::new(0);
    let square_of = |n: u64| {
        let (square, calls) = (&square, &calls);
        async move {
            square
                .memoize(&(n,), || async {
                    calls.fetch_add(1, SeqCst);
                    n * n
                })
                .await
                .unwrap()
        }
    };
    assert_eq!(square_of(3).await, 9);

    server.kill();
    let before = cm.metrics();
    for n in 0..1000 {
        assert_eq!(square_of(n).await, n * n);
    }
    let after = cm.metrics();
    let attempts = after.rpc_attempts - before.rpc_attempts;
    assert!(
        attempts < 50,
        "{attempts} RPCs tried for 1000 calls: the breaker never opened"
    );
    assert!(after.skipped - before.skipped > 900, "{after:?}");
    assert!(after.breaker_open);
    assert_eq!(
        calls.load(SeqCst),
        1001,
        "every call computed while the cache was down"
    );

    server.restart();
    let resumed = eventually(Duration::from_secs(10), || async {
        square_of(12).await;
        cm.metrics().hits > after.hits
    })
    .await;
    assert!(resumed, "caching did not resume: {:?}", cm.metrics());
    assert!(!cm.metrics().breaker_open);
}

/// With Redis stopped behind a live server, calls still return correct values, the breaker
/// limits the attempts, and caching resumes when Redis is back.
#[tokio::test]
async fn fail_open_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let options = ClientOptions {
        breaker_cooldown: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options).await.unwrap();
    let double = cm.function("fail_open", "double", Ttl::MINUTE);
    let double_of = |n: u64| {
        let double = &double;
        async move { double.memoize(&(n,), || async { n * 2 }).await.unwrap() }
    };
    assert_eq!(double_of(1).await, 2);

    redis.kill();
    let before = cm.metrics();
    for n in 0..1000 {
        assert_eq!(double_of(n).await, n * 2);
    }
    let after = cm.metrics();
    let attempts = after.rpc_attempts - before.rpc_attempts;
    assert!(
        attempts < 50,
        "{attempts} RPCs tried for 1000 calls: the breaker never opened"
    );
    assert!(after.rpc_failures > before.rpc_failures);

    redis.restart();
    let resumed = eventually(Duration::from_secs(10), || async {
        double_of(21).await;
        cm.metrics().hits > after.hits
    })
    .await;
    assert!(resumed, "caching did not resume: {:?}", cm.metrics());
}

/// 200 concurrent callers of a cold key: the function runs once and all get its result.
#[tokio::test]
async fn single_flight_runs_the_function_once() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let slow = cm.function("single_flight", "slow", Ttl::MINUTE);
    let runs = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..200 {
        let (slow, runs, entered) = (slow.clone(), runs.clone(), entered.clone());
        callers.push(tokio::spawn(async move {
            // Joining the flight happens in memoize's first poll, right after this count, so
            // once all 200 are counted they are all in the flight.
            entered.fetch_add(1, SeqCst);
            slow.memoize(&("cold",), || async {
                runs.fetch_add(1, SeqCst);
                let all_in = eventually(Duration::from_secs(10), || {
                    let entered = entered.clone();
                    async move { entered.load(SeqCst) == 200 }
                })
                .await;
                assert!(all_in);
                String::from("computed once")
            })
            .await
            .unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), "computed once");
    }
    assert_eq!(runs.load(SeqCst), 1);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Invoice {
    id: u32,
    total_cents: i64,
}

/// Garbage bytes, or a value of another type, under a key: recomputed and overwritten, no error.
#[tokio::test]
async fn undecodable_values_are_misses() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let invoice = cm.function("billing", "invoice", Ttl::MINUTE);
    let mut raw = cm.raw();
    let poison = |args: u32, value: &'static [u8]| pb::PutRequest {
        key: Some(pb::Key {
            namespace: "billing".into(),
            function: "invoice".into(),
            digest: invoice.digest(&(args,)).unwrap(),
        }),
        value: value.into(),
        ttl_seconds: 60,
        tags: Vec::new(),
        ..Default::default()
    };
    raw.put(poison(1, b"\xff\x00garbage")).await.unwrap();
    raw.put(poison(2, b"\"a string, not an invoice\""))
        .await
        .unwrap();
    for id in [1, 2] {
        let fresh = Invoice {
            id,
            total_cents: 1250,
        };
        let got: Invoice = invoice
            .memoize(&(id,), || async {
                Invoice {
                    id,
                    total_cents: 1250,
                }
            })
            .await
            .expect("poison is a miss, not an error");
        assert_eq!(got, fresh);
        // Overwritten: the next call is a hit with the right type.
        let again: Invoice = invoice
            .memoize(&(id,), || async { unreachable!("cached") })
            .await
            .unwrap();
        assert_eq!(again, fresh);
    }
    assert_eq!(cm.metrics().undecodable, 2);
}

/// `Ok` results are cached, `Err` never; `None` is not cached unless asked.
#[tokio::test]
async fn errors_and_none_are_not_cached() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let lookup = cm.function("ns", "lookup", Ttl::MINUTE);
    let runs = AtomicUsize::new(0);
    for _ in 0..2 {
        let result: Result<u32, Error> = lookup
            .try_memoize(&("fails",), || async {
                runs.fetch_add(1, SeqCst);
                Err(Error::InvalidTtl("stand-in failure".into()))
            })
            .await;
        assert!(result.is_err());
    }
    assert_eq!(runs.load(SeqCst), 2, "an Err was cached");
    for _ in 0..2 {
        let ok: Result<u32, Error> = lookup
            .try_memoize(&("works",), || async {
                runs.fetch_add(1, SeqCst);
                Ok(5)
            })
            .await;
        assert_eq!(ok.unwrap(), 5);
    }
    assert_eq!(runs.load(SeqCst), 3, "an Ok was not cached");

    let find = |function: cache_money::Function| {
        let runs = &runs;
        async move {
            function
                .memoize(&("missing",), || async {
                    runs.fetch_add(1, SeqCst);
                    None::<u32>
                })
                .await
                .unwrap()
        }
    };
    let plain = cm.function("ns", "find", Ttl::MINUTE);
    find(plain.clone()).await;
    find(plain).await;
    assert_eq!(runs.load(SeqCst), 5, "None was cached by default");
    let keeps_none = cm
        .function("ns", "find_cached", Ttl::MINUTE)
        .cache_none(true);
    find(keeps_none.clone()).await;
    find(keeps_none).await;
    assert_eq!(runs.load(SeqCst), 6, "cache_none(true) did not cache None");
}

/// With caching disabled every call computes and nothing reaches the service.
#[tokio::test]
async fn disabled_client_always_computes() {
    let server = CacheServer::memory(&[]);
    let options = ClientOptions {
        enabled: false,
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options).await.unwrap();
    let f = cm.function("ns", "f", Ttl::MINUTE);
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        f.memoize(&(1,), || async { runs.fetch_add(1, SeqCst) })
            .await
            .unwrap();
    }
    assert_eq!(runs.load(SeqCst), 3);
    assert_eq!(cm.metrics().rpc_attempts, 0);
    let stats = stats(&server).await;
    assert_eq!((stats.hits, stats.misses, stats.puts), (0, 0, 0));
}

/// A key function decides what identifies a call: here only the first argument.
#[tokio::test]
async fn key_function_chooses_what_is_keyed() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let user = cm
        .function("ns", "user", Ttl::MINUTE)
        .with_key_fn(|args| args[0].clone());
    let first: String = user
        .memoize(&(7, "request-1"), || async { "ada".to_string() })
        .await
        .unwrap();
    let second: String = user
        .memoize(&(7, "request-2"), || async { unreachable!("same key") })
        .await
        .unwrap();
    assert_eq!((first.as_str(), second.as_str()), ("ada", "ada"));
    // What the key function returns is hashed as it is.
    let expected = cache_money::canonical::digest_of(&serde_json::json!(7));
    assert_eq!(user.digest(&(7, "x")).unwrap(), expected);
}

/// A key function whose result cannot be keyed fails the call with `Error::Args`, as such an
/// argument does: nothing is computed and nothing reaches the service.
#[tokio::test]
async fn key_function_results_obey_the_argument_rules() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let user = cm
        .function("ns", "user", Ttl::MINUTE)
        .with_key_fn(|args| serde_json::json!({ "id": args[0], "shard": u64::MAX }));
    let runs = AtomicUsize::new(0);
    let result = user
        .memoize(&(7,), || async { runs.fetch_add(1, SeqCst) })
        .await;
    let Err(Error::Args(err)) = result else {
        panic!("an unkeyable key function result was keyed: {result:?}")
    };
    assert!(err.to_string().contains("key_fn"), "{err}");
    assert_eq!(runs.load(SeqCst), 0, "the function ran");
    assert!(matches!(user.digest(&(7,)), Err(Error::Args(_))));
    assert!(matches!(user.bust(&(7,)).await, Err(Error::Args(_))));
    let stats = stats(&server).await;
    assert_eq!(
        (stats.hits, stats.misses, stats.puts, stats.busts),
        (0, 0, 0, 0)
    );
}

/// A TTL over the service's maximum is refused when the handle is made, naming the rule and
/// `ClientOptions::max_ttl`; the default maximum is the server's own, so a month caches, and
/// a client told a lower server maximum enforces that one.
#[tokio::test]
async fn ttls_over_the_service_maximum_are_refused_at_the_handle() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let too_long = Ttl::MONTH + Duration::from_secs(1);
    let refused = cm.try_function("ns", "f", too_long);
    let Err(Error::InvalidTtl(message)) = &refused else {
        panic!("a TTL over 30 days made a handle: {refused:?}")
    };
    assert!(
        message.contains("ClientOptions::max_ttl") && message.contains("2592000 seconds"),
        "{message}"
    );
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cm.function("ns", "f", too_long)
    }))
    .expect_err("Client::function accepted a TTL over the maximum");
    let panic_message = panicked
        .downcast_ref::<String>()
        .expect("a formatted panic");
    assert!(panic_message.contains("max_ttl"), "{panic_message}");

    let monthly = cm.function("ns", "monthly", Ttl::MONTH);
    monthly.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!(
        stats(&server).await.puts,
        1,
        "a month is within the server's maximum"
    );

    let strict = CacheServer::memory(&["--max-ttl-seconds", "3600"]);
    let options = ClientOptions {
        max_ttl: Ttl::HOUR,
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(strict.url(), options).await.unwrap();
    assert!(matches!(
        cm.try_function("ns", "f", Ttl::HOURS_8),
        Err(Error::InvalidTtl(_))
    ));
    let hourly = cm.function("ns", "hourly", Ttl::HOUR);
    hourly.memoize(&(1,), || async { 1 }).await.unwrap();
    assert_eq!(
        stats(&strict).await.puts,
        1,
        "an hour is within the maximum"
    );
}

/// Busts report failure when the service is unreachable, rather than pretending.
#[tokio::test]
async fn busts_report_failure() {
    let mut server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let f = cm.function("ns", "f", Ttl::MINUTE);
    server.kill();
    assert!(matches!(f.bust(&(1,)).await, Err(Error::Rpc(_))));
    assert!(matches!(f.bust_all().await, Err(Error::Rpc(_))));
    assert!(cm.bust_all().await.is_err());
    assert!(cm.bust_namespace("ns").await.is_err());
}

/// Handles check names and TTLs; Rust module paths become dotted namespaces.
#[tokio::test]
async fn handles_validate_names_and_take_module_paths() {
    let cm = Client::connect("http://127.0.0.1:1").await.unwrap();
    let here = cache_money::function!(cm, "f", Ttl::HOUR);
    assert_eq!(here.namespace(), module_path!().replace("::", "."));
    let defaulted = cache_money::function!(cm, "g");
    assert_eq!(
        (defaulted.name(), defaulted.ttl()),
        ("g", cache_money::DEFAULT_TTL)
    );
    assert_eq!(
        cm.function("my_app::billing", "f", Ttl::HOUR).namespace(),
        "my_app.billing"
    );
    assert!(matches!(
        cm.try_function("ns", "bad:name", Ttl::HOUR),
        Err(Error::InvalidName(_))
    ));
    assert!(matches!(
        cm.try_function("ns", "f", Duration::from_millis(10)),
        Err(Error::InvalidTtl(_))
    ));
    assert!(matches!(
        Client::connect("not a url").await,
        Err(Error::InvalidUrl(_))
    ));
    let nan = cm
        .function("ns", "f", Ttl::HOUR)
        .memoize(&(f64::NAN,), || async { 1 })
        .await;
    assert!(matches!(nan, Err(Error::Args(_))));
}

/// Redis down from the moment the server starts: memoize still returns correct values, and
/// once Redis appears caching starts, with the same client.
#[tokio::test]
async fn memoize_works_when_redis_is_down_at_start() {
    let mut redis = RedisServer::start();
    redis.kill();
    let server = CacheServer::redis(&redis, &[]);
    let options = ClientOptions {
        breaker_cooldown: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options).await.unwrap();
    let cube = cm.function("down_at_start", "cube", Ttl::MINUTE);
    for n in 0..200u64 {
        let got: u64 = cube
            .memoize(&(n,), || async move { n * n * n })
            .await
            .unwrap();
        assert_eq!(got, n * n * n);
    }
    assert!(cm.metrics().rpc_attempts < 50, "{:?}", cm.metrics());
    redis.restart();
    let cached = eventually(Duration::from_secs(10), || async {
        let _: u64 = cube.memoize(&(7u64,), || async { 343 }).await.unwrap();
        cm.metrics().hits > 0
    })
    .await;
    assert!(cached, "caching never started: {:?}", cm.metrics());
}

/// A result the service refuses to store (over its `--max-value-bytes`) is computed and
/// returned every time, counted as refused rather than as an outage (the breaker stays
/// closed), and logged at warn once per handle with the server's reason.
#[tokio::test]
async fn refused_writes_are_warned_once_and_do_not_open_the_breaker() {
    let server = CacheServer::memory(&["--max-value-bytes", "100"]);
    let cm = Client::connect(server.url()).await.unwrap();
    let logs = common::Logs::default();
    let _guard = logs.capture();
    let big = cm.function("client", "big_result", Ttl::MINUTE);
    for _ in 0..10 {
        let value: String = big
            .memoize(&(1,), || async { "x".repeat(1000) })
            .await
            .unwrap();
        assert_eq!(value.len(), 1000);
    }
    let metrics = cm.metrics();
    assert_eq!(metrics.computed, 10, "{metrics:?}");
    assert_eq!(metrics.refused, 10, "{metrics:?}");
    assert_eq!(metrics.rpc_failures, 0, "{metrics:?}");
    assert!(!metrics.breaker_open, "{metrics:?}");
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("not cached") && warnings[0].contains("--max-value-bytes"),
        "{}",
        warnings[0]
    );
}

/// `Function::tagged` writes with its tags, so `Client::bust_tag` removes the entries of
/// several functions at once; a refused tag is fail-open: the result comes back, uncached.
#[tokio::test]
async fn tagged_calls_bust_together() {
    let server = CacheServer::memory(&["--max-tag-bytes", "16"]);
    let cm = Client::connect(server.url()).await.unwrap();
    let runs = AtomicUsize::new(0);
    let run = |value: u64| {
        runs.fetch_add(1, SeqCst);
        async move { value }
    };
    let profile = cm.function("app", "profile", Ttl::HOUR);
    let orders = cm.function("app", "orders", Ttl::HOUR);
    let user = |id: u64| [format!("user:{id}")];
    for id in [7, 8] {
        let _: u64 = profile
            .tagged(user(id))
            .memoize(&(id,), || run(id))
            .await
            .unwrap();
        let _: u64 = orders
            .tagged(user(id))
            .memoize(&(id,), || run(id))
            .await
            .unwrap();
    }
    assert_eq!(profile.tagged(user(7)).tags(), ["user:7"]);
    assert_eq!(cm.bust_tag("app", "user:7").await.unwrap(), 2);
    let _: u64 = profile.memoize(&(8,), || run(8)).await.unwrap();
    assert_eq!(runs.load(SeqCst), 4, "user 8 was busted");
    let long = "x".repeat(17);
    let value: u64 = profile
        .tagged([long.as_str()])
        .memoize(&(9,), || run(9))
        .await
        .unwrap();
    assert_eq!(value, 9);
    let _: u64 = profile.memoize(&(9,), || run(9)).await.unwrap();
    assert_eq!(runs.load(SeqCst), 6, "a refused write was cached");
    assert!(matches!(
        cm.bust_tag("a:b", "user:7").await,
        Err(Error::InvalidName(_))
    ));
}
