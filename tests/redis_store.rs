//! What only Redis can show: the exact key layout and TTL as Redis holds them, the SCAN
//! patterns as Redis matches them, keys outside the prefix left alone, health probes that
//! neither queue behind load nor retire connections, outages survived, out-of-memory reported,
//! and shutdown draining RPCs that are really in flight.

mod common;

use std::{
    collections::BTreeSet,
    net::TcpStream,
    time::{Duration, Instant},
};

use cache_money::{
    key::{EntryKey, FunctionKey},
    pb,
    server::key::KeyLayout,
};
use common::{
    CacheServer, RedisServer, digest, eventually, fill, get, health, health_becomes, key, put,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A Get fails with UNAVAILABLE, and sooner than `within`.
async fn get_is_unavailable_within(
    cm: &mut pb::cache_money_client::CacheMoneyClient<tonic::transport::Channel>,
    within: Duration,
) {
    let started = Instant::now();
    let request = common::get_request(key("ns", "f", 1));
    let err = cm.get(request).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
}

/// A Put lands under `{prefix}{namespace}:{function}:{digest}` with the asked TTL.
#[tokio::test]
async fn entries_have_the_documented_key_and_ttl_in_redis() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let mut cm = server.client().await;
    cm.put(put(
        key("billing.invoices", "fetch_invoice", 7),
        b"{\"total\":3}",
        3600,
    ))
    .await
    .unwrap();

    let mut conn = redis.connect().await;
    let redis_key = format!("cm:billing.invoices:fetch_invoice:{}", digest(7));
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, b"{\"total\":3}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 3_590_000 && ttl <= 3_600_000, "PTTL {ttl}");
    assert_eq!(redis.dbsize().await, 1, "exactly one key written");
}

/// A custom prefix is honoured, and BustAll removes only entries under it: other prefixes,
/// unprefixed keys and keys of another shape inside the prefix (extra `:` segments, glob
/// characters, uppercase or 33 hex digits, empty names) survive.
#[tokio::test]
async fn bust_all_leaves_keys_outside_the_prefix() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--key-prefix", "app1:"]);
    let mut cm = server.client().await;
    for n in 0..20 {
        cm.put(put(key("ns", "f", n), b"v", 60)).await.unwrap();
    }
    let mut conn = redis.connect().await;
    let d = digest(1);
    let foreign = [
        "session:42".to_owned(),
        "cm:ns:f:0123".to_owned(),
        "app1:config".to_owned(),
        format!("app10:ns:f:{d}"),
        // Inside the prefix and the `app1:*:*:<hex>` pattern, but not entries: SCAN's `*`
        // matches `:` too, so only the exact grammar tells these apart.
        format!("app1:a:b:c:{d}"),
        format!("app1:tenant:ns:f:{d}"),
        format!("app1:ns:f:{d}:{d}"),
        format!("app1:x*:y:{d}"),
        format!("app1:ns:f:{}", d.to_uppercase().replace('0', "A")),
        format!("app1:ns:f:{d}0"),
        format!("app1:ns::{d}"),
    ];
    for foreign_key in &foreign {
        redis::cmd("SET")
            .arg(foreign_key)
            .arg("keep")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let stored: i64 = redis::cmd("EXISTS")
        .arg(format!("app1:ns:f:{}", digest(3)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 1, "entries go under the configured prefix");

    let removed = cm
        .bust_all(pb::BustAllRequest {})
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 20);
    for foreign_key in &foreign {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(foreign_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 1, "{foreign_key} was removed");
    }
    assert_eq!(redis.dbsize().await, foreign.len() as u64);
}

/// Busting a function with more entries than one SCAN batch removes them all, and only them.
#[tokio::test]
async fn bust_function_spans_many_scan_batches() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--bust-batch", "100"]);
    fill(&redis, "cm:", "big", 5_000).await;
    fill(&redis, "cm:", "big_sibling", 300).await;
    let mut cm = server.client().await;
    let removed = common::bust_function(&mut cm, "ns", "big").await;
    assert_eq!(removed, 5_000);
    assert_eq!(
        redis.dbsize().await,
        300,
        "only big_sibling's entries remain"
    );
}

/// Requests refused as INVALID_ARGUMENT leave Redis's DBSIZE unchanged.
#[tokio::test]
async fn invalid_requests_leave_dbsize_unchanged() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--max-value-bytes", "100"]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap();
    let before = redis.dbsize().await;
    let bad = [
        put(key("ns:x", "f", 2), b"v", 60),
        put(key("ns", "f", 2), b"v", 0),
        put(key("ns", "f", 2), b"v", u32::MAX),
        put(key("ns", "f", 2), &[7; 101], 60),
        put(
            pb::Key {
                digest: "*".into(),
                ..key("ns", "f", 2)
            },
            b"v",
            60,
        ),
    ];
    for request in bad {
        let err = cm.put(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    let entries = vec![
        put(key("ns", "f", 3), b"v", 60),
        put(key("ns", "f", 4), &[7; 101], 60),
    ];
    assert_eq!(
        cm.put_many(pb::PutManyRequest { entries })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(redis.dbsize().await, before);
}

/// Redis killed: health goes NOT_SERVING and RPCs fail fast with UNAVAILABLE; Redis back: the
/// same server process reports SERVING and stores again.
#[tokio::test]
async fn redis_outage_is_reported_and_survived() {
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"before", 60)).await.unwrap();
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);

    redis.kill();
    assert!(health_becomes(&server, ServingStatus::NotServing, Duration::from_secs(5)).await);
    for _ in 0..3 {
        get_is_unavailable_within(&mut cm, Duration::from_secs(1)).await;
        let err = cm.put(put(key("ns", "f", 2), b"v", 60)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    }
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(!stats.store_up);
    assert!(stats.errors >= 6, "errors {}", stats.errors);

    redis.restart();
    assert!(health_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);
    cm.put(put(key("ns", "f", 1), b"after", 60))
        .await
        .expect("Put works again");
    assert_eq!(
        get(&mut cm, key("ns", "f", 1)).await.as_deref(),
        Some(&b"after"[..])
    );
}

/// The server starts while Redis is down, answering UNAVAILABLE within the timeout, and
/// begins serving when Redis comes up.
#[tokio::test]
async fn server_starts_while_redis_is_down() {
    let mut redis = RedisServer::start();
    redis.kill();
    let server = CacheServer::redis(&redis, &["--store-timeout-ms", "200"]);
    assert_eq!(health(&server).await, ServingStatus::NotServing as i32);
    let mut cm = server.client().await;
    let started = Instant::now();
    let err = cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );

    redis.restart();
    assert!(health_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);
    cm.put(put(key("ns", "f", 1), b"v", 60))
        .await
        .expect("Put works once Redis is up");
}

/// A frozen Redis (SIGSTOP) costs callers the store timeout, not a hang; after SIGCONT the
/// server serves normally.
#[tokio::test]
async fn frozen_redis_times_out_instead_of_hanging() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--store-timeout-ms", "300"]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap();

    let open_files = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let baseline = open_files();
    redis.pause();
    for _ in 0..3 {
        get_is_unavailable_within(&mut cm, Duration::from_secs(2)).await;
    }
    redis.resume();
    let recovered = eventually(Duration::from_secs(5), || {
        let mut cm = cm.clone();
        async move {
            cm.get(common::get_request(key("ns", "f", 1)))
                .await
                .is_ok_and(|reply| reply.into_inner().hit)
        }
    })
    .await;
    assert!(recovered, "no service after SIGCONT");
    // Connections abandoned while Redis was frozen are closed, not leaked.
    let settled = eventually(Duration::from_secs(5), || async {
        open_files() <= baseline + 1
    })
    .await;
    assert!(
        settled,
        "open files grew from {baseline} to {} across the freeze",
        open_files()
    );
}

/// Redis at its memory limit with `noeviction`: Put is RESOURCE_EXHAUSTED with a message
/// saying what to do, and Get keeps working.
#[tokio::test]
async fn out_of_memory_is_resource_exhausted() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let server = CacheServer::redis(&redis, &[]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 0), b"small", 60)).await.unwrap();
    let big = vec![b'x'; 100_000];
    let mut refused = None;
    for n in 1..200 {
        if let Err(err) = cm.put(put(key("ns", "f", n), &big, 60)).await {
            refused = Some(err);
            break;
        }
    }
    let err = refused.expect("Redis never ran out of memory");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("maxmemory"), "{}", err.message());
    assert_eq!(
        get(&mut cm, key("ns", "f", 0)).await.as_deref(),
        Some(&b"small"[..])
    );
}

type BustCall = tokio::task::JoinHandle<Result<tonic::Response<pb::BustResponse>, tonic::Status>>;

/// Fills one function with `count` entries and starts busting it; returns once Redis shows
/// the bust under way (entries disappearing), so the RPC is really in flight.
async fn bust_in_flight(redis: &RedisServer, server: &CacheServer, count: u64) -> BustCall {
    fill(redis, "cm:", "f", count).await;
    let mut cm = server.client().await;
    let bust = tokio::spawn(async move {
        let request = pb::BustFunctionRequest {
            namespace: "ns".into(),
            function: "f".into(),
        };
        cm.bust_function(request).await
    });
    let started = eventually(Duration::from_secs(10), || async {
        redis.dbsize().await < count
    })
    .await;
    assert!(started, "the bust never started");
    bust
}

/// SIGTERM while a bust is in flight: new connections are refused, the bust finishes, and the
/// process exits 0.
#[tokio::test]
async fn sigterm_lets_in_flight_rpcs_finish() {
    let redis = RedisServer::start();
    let mut server = CacheServer::redis(&redis, &["--bust-batch", "20"]);
    let bust = bust_in_flight(&redis, &server, 50_000).await;
    server.terminate();
    let left_at_signal = redis.dbsize().await;
    assert!(
        left_at_signal > 0,
        "the bust finished before SIGTERM; nothing was in flight"
    );

    let addr = server.addr();
    assert!(
        eventually(Duration::from_secs(5), || async move {
            TcpStream::connect(addr).is_err()
        })
        .await,
        "new connections still accepted after SIGTERM"
    );
    let removed = bust
        .await
        .unwrap()
        .expect("the in-flight bust completes")
        .into_inner()
        .removed;
    assert_eq!(removed, 50_000);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("server exits after draining");
    assert!(status.success(), "{status:?}");
}

/// An RPC still running when the drain timeout passes does not keep the process alive.
#[tokio::test]
async fn drain_timeout_bounds_shutdown() {
    let redis = RedisServer::start();
    let mut server =
        CacheServer::redis(&redis, &["--bust-batch", "1", "--drain-timeout-ms", "200"]);
    let bust = bust_in_flight(&redis, &server, 20_000).await;
    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("server exits at the drain timeout");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    assert!(
        redis.dbsize().await > 0,
        "the bust finished within the drain timeout; nothing was cut short"
    );
    assert!(
        bust.await.unwrap().is_err(),
        "the cut-short RPC reports an error"
    );
    assert!(
        server.log_text().contains("drain timeout passed"),
        "{}",
        server.log_text()
    );
}

/// The SCAN patterns of each bust scope, matched by Redis: each finds every entry of its
/// scope and none of look-alike names, other prefixes or a prefix's escaped glob characters;
/// and `*` does cross `:`, which is why busts check every key against the grammar too.
#[tokio::test]
async fn scan_patterns_select_their_scope_in_redis() {
    let redis = RedisServer::start();
    let d = digest(1);
    let cm = KeyLayout::new("cm:");
    let globby = KeyLayout::new("c*[m]?:");
    let entry = |layout: &KeyLayout, ns: &str, function: &str| {
        layout.entry(&EntryKey::new(ns.into(), function.into(), d.clone()).unwrap())
    };
    let functions = [
        ("ns", "fetch"),
        ("ns", "fetch_user"),
        ("ns", "fetch.v2"),
        ("ns", "fetc"),
        ("ns", "xfetch"),
        ("ns1", "fetch"),
        ("ns1", "g"),
        ("ns10", "fetch"),
    ];
    let entries: BTreeSet<String> = functions
        .iter()
        .map(|(ns, function)| entry(&cm, ns, function))
        .collect();
    let globby_entry = entry(&globby, "a", "b");
    let others = [
        "cm:config".to_owned(),
        format!("other:ns:fetch:{d}"),
        format!("cXXm?:a:b:{d}"),
        format!("cm:ns:fetch:{}", &d[1..]),
    ];
    let extra_segments = format!("cm:ns:a:b:{d}");
    let mut conn = redis.connect().await;
    let mut pipe = redis::pipe();
    for key in entries
        .iter()
        .chain(&others)
        .chain([&globby_entry, &extra_segments])
    {
        pipe.cmd("SET").arg(key).arg("v").ignore();
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();

    let fetch = FunctionKey::new("ns".into(), "fetch".into()).unwrap();
    assert_eq!(
        redis.scan_match(&cm.function_pattern(&fetch)).await,
        BTreeSet::from([entry(&cm, "ns", "fetch")])
    );
    assert_eq!(
        redis.scan_match(&cm.namespace_pattern("ns1")).await,
        BTreeSet::from([entry(&cm, "ns1", "fetch"), entry(&cm, "ns1", "g")])
    );
    let mut all = entries.clone();
    all.insert(extra_segments.clone());
    assert_eq!(redis.scan_match(&cm.all_pattern()).await, all);
    assert_eq!(
        redis.scan_match(&globby.all_pattern()).await,
        BTreeSet::from([globby_entry])
    );
    // What the pattern lets through, the grammar refuses.
    assert_eq!(cm.parse(extra_segments.as_bytes()), None);
    assert!(
        entries
            .iter()
            .all(|entry| cm.parse(entry.as_bytes()).is_some())
    );
}

/// A connection for the test's own commands, with no response timeout: `DEBUG SLEEP` and a
/// paused Redis must not fail it.
async fn admin_connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The number after `field` in Redis's `INFO section`, e.g. `blocked_clients:` in `clients`
/// or `cmdstat_ping:calls=` in `commandstats`; 0 when the line is absent.
async fn info_number(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?;
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..digits].parse().ok()
        })
        .unwrap_or(0)
}

/// With every `--max-in-flight` permit held by a write that Redis keeps waiting (`CLIENT
/// PAUSE WRITE`), health probes still reach Redis and report SERVING.
#[tokio::test]
async fn health_probes_need_no_in_flight_permit() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(
        &redis,
        &[
            "--max-in-flight",
            "1",
            "--store-timeout-ms",
            "10000",
            "--health-interval-ms",
            "20",
        ],
    );
    let mut cm = server.client().await;
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);
    let mut admin = admin_connection(&redis).await;
    RedisServer::pause_writes(&mut admin, 10_000).await;
    // A write blocked in Redis holds the only permit. (Before probes ran outside the limit, a
    // probe could hold it at that instant and the write was refused; then try again.)
    let mut held = None;
    for _ in 0..10 {
        let mut writer = cm.clone();
        let write = tokio::spawn(async move { writer.put(put(key("ns", "f", 1), b"v", 60)).await });
        eventually(Duration::from_secs(5), || {
            let mut admin = admin.clone();
            let finished = write.is_finished();
            async move { finished || info_number(&mut admin, "clients", "blocked_clients:").await == 1 }
        })
        .await;
        if !write.is_finished() {
            held = Some(write);
            break;
        }
    }
    let held = held.expect("no write got blocked in Redis");
    let refused = cm
        .get(common::get_request(key("ns", "f", 2)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let pings = info_number(&mut admin, "commandstats", "cmdstat_ping:calls=").await;
    let probed =
        eventually(Duration::from_secs(5), || {
            let mut admin = admin.clone();
            async move {
                info_number(&mut admin, "commandstats", "cmdstat_ping:calls=").await >= pings + 3
            }
        })
        .await;
    assert!(
        probed,
        "no health probe reached Redis while the permit was held"
    );
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);
    assert!(!held.is_finished(), "the write stopped holding the permit");
    RedisServer::unpause(&mut admin).await;
    held.await.unwrap().expect("the paused write completes");
    assert!(get(&mut cm, key("ns", "f", 1)).await.is_some());
}

/// A PING slower than the store timeout (Redis busy in `DEBUG SLEEP`) fails one probe but
/// retires no connection: Redis accepts no new connection from the server afterwards. A
/// stall through two probes in a row does replace the probe's connection.
#[tokio::test]
async fn one_slow_health_probe_keeps_the_connection_two_replace_it() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let server = CacheServer::redis(
        &redis,
        &["--store-timeout-ms", "400", "--health-interval-ms", "20"],
    );
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap();
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);
    let mut admin = admin_connection(&redis).await;
    let connections = "total_connections_received:";
    let before = info_number(&mut admin, "stats", connections).await;
    // Longer than one probe's timeout, shorter than two probes back to back (2 x 400 + 20 ms).
    redis::cmd("DEBUG")
        .arg(&["SLEEP", "0.55"][..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    assert!(
        server
            .wait_for_log("store unreachable", Duration::from_secs(5))
            .is_some(),
        "no probe outlasted the store timeout; the test proved nothing:\n{}",
        server.log_text()
    );
    assert!(health_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);
    assert!(get(&mut cm, key("ns", "f", 1)).await.is_some());
    cm.put(put(key("ns", "f", 2), b"v", 60)).await.unwrap();
    assert_eq!(
        info_number(&mut admin, "stats", connections).await,
        before,
        "the server opened a new connection after one slow PING"
    );

    // Longer than two probes back to back, with room to spare.
    redis::cmd("DEBUG")
        .arg(&["SLEEP", "1.2"][..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    assert!(health_becomes(&server, ServingStatus::Serving, Duration::from_secs(5)).await);
    assert!(
        info_number(&mut admin, "stats", connections).await > before,
        "two timed-out PINGs in a row left the probe on its old connection"
    );
}

/// A `GetMany` whose values would pass `--max-response-bytes` is refused OUT_OF_RANGE before
/// any value is read: Redis is asked only for lengths (no MGET), so a huge batch never lands
/// in the server's memory. A batch that fits is read as usual.
#[tokio::test]
async fn oversized_get_many_is_refused_before_reading_values() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let mut conn = redis.connect().await;
    let value = vec![b'v'; 1024 * 1024];
    for n in 0..20 {
        let _: () = redis::cmd("SET")
            .arg(format!("cm:ns:big:{}", digest(n)))
            .arg(&value)
            .arg("EX")
            .arg(600)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mgets = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .unwrap();
            stats
                .lines()
                .find_map(|line| line.strip_prefix("cmdstat_mget:calls="))
                .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    let mut client = server.client().await;
    let keys = (0..20).map(|n| key("ns", "big", n)).collect();
    let status = client
        .get_many(pb::GetManyRequest { keys })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("--max-response-bytes"),
        "{status:?}"
    );
    assert_eq!(
        mgets(&mut conn).await,
        0,
        "the values were read before refusing"
    );

    let keys = (0..3).map(|n| key("ns", "big", n)).collect();
    let reply = client
        .get_many(pb::GetManyRequest { keys })
        .await
        .expect("3 MiB fit the bound")
        .into_inner();
    assert!(
        reply
            .results
            .iter()
            .all(|result| result.hit && result.value.len() == value.len())
    );
    assert_eq!(mgets(&mut conn).await, 1);
}

/// After Redis restarts while no request comes, the health probe finds its connection lost
/// and the pool's connections are retired with it: once the server reports SERVING again,
/// the next requests succeed instead of each failing once on a dead pooled connection.
#[tokio::test]
async fn requests_after_an_idle_redis_restart_succeed() {
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--health-interval-ms", "50"]);
    let mut client = server.client().await;
    // A request opens a pooled connection, which the restart then kills.
    get(&mut client, key("ns", "idle", 0)).await;
    redis.restart();
    let mut conn = redis.connect().await;
    // The probe has noticed once it has reconnected: the new Redis sees its connection
    // (ours is the other one) and health is SERVING.
    let noticed = eventually(Duration::from_secs(10), || {
        let (conn, server) = (&conn, &server);
        async move {
            client_list(conn).await.lines().count() >= 2
                && health(server).await == ServingStatus::Serving as i32
        }
    })
    .await;
    assert!(noticed, "the health probe never reconnected");
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    idle_gets_succeed(&mut client, "the restart").await;
}

/// Redis's `CLIENT LIST`: one line per connection.
async fn client_list(conn: &redis::aio::MultiplexedConnection) -> String {
    redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn.clone())
        .await
        .unwrap()
}

/// The `id=` of each client Redis lists whose last command was `command`.
async fn clients_running(conn: &redis::aio::MultiplexedConnection, command: &str) -> Vec<String> {
    client_list(conn)
        .await
        .lines()
        .filter(|line| line.contains(&format!(" cmd={command} ")))
        .filter_map(|line| line.split(' ').next().map(str::to_owned))
        .collect()
}

/// Four Gets of `ns.idle`, each of which must succeed after `what`.
async fn idle_gets_succeed(
    client: &mut pb::cache_money_client::CacheMoneyClient<tonic::transport::Channel>,
    what: &str,
) {
    for n in 0..4 {
        let reply = client.get(common::get_request(key("ns", "idle", n))).await;
        assert!(reply.is_ok(), "request {n} after {what} failed: {reply:?}");
    }
}

/// Redis closes connections idle longer than its `timeout` (as a NAT or a load balancer drops
/// idle flows) while the health probe's, used every interval, stays open: the pool finds
/// each connection Redis closed before a request is sent on it, so no request fails.
#[tokio::test]
async fn connections_redis_closes_while_idle_fail_no_request() {
    let redis = RedisServer::start();
    // The default health interval (500 ms): the probe's PINGs keep its connection under the
    // 1 s timeout below, so the probe never retires the pool on its own (checked below).
    let server = CacheServer::redis(&redis, &["--health-interval-ms", "500"]);
    let mut client = server.client().await;
    let mut conn = redis.connect().await;
    // Gets at once, so the pool holds more than one connection.
    let mut gets = tokio::task::JoinSet::new();
    for n in 0..8 {
        let mut client = client.clone();
        gets.spawn(async move { common::get(&mut client, key("ns", "idle", n)).await });
    }
    while let Some(done) = gets.join_next().await {
        done.expect("a Get before the timeout");
    }
    assert!(
        !clients_running(&conn, "get").await.is_empty(),
        "no pooled connection ran a GET"
    );
    let probe = clients_running(&conn, "ping").await;
    assert_eq!(probe.len(), 1, "one health probe connection: {probe:?}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let closed = eventually(Duration::from_secs(10), || {
        let conn = conn.clone();
        async move { clients_running(&conn, "get").await.is_empty() }
    })
    .await;
    assert!(closed, "Redis never closed the idle pooled connections");
    idle_gets_succeed(&mut client, "Redis closed the idle connections").await;
    // The same probe connection throughout: had Redis closed it too, the probe would have
    // retired the whole pool, which would hide what this tests.
    assert_eq!(
        clients_running(&conn, "ping").await,
        probe,
        "the probe's connection was replaced"
    );
}

/// A tagged Put with `ttl_seconds` of `function`'s call `n` in namespace `app`.
fn tagged_put(function: &str, n: u64, ttl_seconds: u32, tag: &str) -> pb::PutRequest {
    pb::PutRequest {
        tags: vec![tag.to_owned()],
        ..put(key("app", function, n), b"v", ttl_seconds)
    }
}

/// The index of `tag` in namespace `app`, under the default prefix.
fn tag_index(tag: &str) -> String {
    format!("cm:app:#tag:{:x}", md5::compute(tag))
}

/// A tag index expires with its latest entry, plus the slack (two store timeouts and a
/// second): extended by a longer-lived entry, shortened again when that entry is rewritten
/// with a short TTL.
#[tokio::test]
async fn tag_index_expires_with_its_latest_entry() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--store-timeout-ms", "250"]);
    let mut cm = server.client().await;
    let mut conn = redis.connect().await;
    let index = tag_index("user:7");
    let pttl = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let index = index.clone();
        async move {
            redis::cmd("PTTL")
                .arg(index)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let slack = 1_500;
    cm.put(tagged_put("f", 1, 60, "user:7")).await.unwrap();
    let ttl = pttl(&mut conn).await;
    assert!((55_000..=60_000 + slack).contains(&ttl), "{ttl}");
    cm.put(tagged_put("g", 1, 600, "user:7")).await.unwrap();
    let ttl = pttl(&mut conn).await;
    assert!((595_000..=600_000 + slack).contains(&ttl), "{ttl}");
    cm.put(tagged_put("g", 1, 10, "user:7")).await.unwrap();
    let ttl = pttl(&mut conn).await;
    assert!((55_000..=60_000 + slack).contains(&ttl), "{ttl}");
}

/// The race a BustTag keeps its members for: a Put whose index write landed before the bust
/// and whose entry write lands after it (simulated by writing the entry straight into Redis)
/// is still removed by the next BustTag of the tag.
#[tokio::test]
async fn an_entry_landing_after_a_tag_bust_stays_findable() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let mut cm = server.client().await;
    cm.put(tagged_put("f", 1, 60, "user:7")).await.unwrap();
    let bust_tag = || pb::BustTagRequest {
        namespace: "app".into(),
        tag: "user:7".into(),
    };
    assert_eq!(
        cm.bust_tag(bust_tag()).await.unwrap().into_inner().removed,
        1
    );
    let mut conn = redis.connect().await;
    redis::cmd("SET")
        .arg(format!("cm:app:f:{}", digest(1)))
        .arg("late")
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(get(&mut cm, key("app", "f", 1)).await.is_some());
    assert_eq!(
        cm.bust_tag(bust_tag()).await.unwrap().into_inner().removed,
        1
    );
    assert_eq!(get(&mut cm, key("app", "f", 1)).await, None);
}
