//! Faults a production cache meets, driven against the real server and a real `redis-server`
//! (killed, frozen and restarted by PID): overload, Redis dying under steady load, a second
//! SIGTERM, oversized messages, Redis with a password, and big requests whose small survivors
//! must not pin the whole request in memory.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cache_money::pb;
use common::{CacheServer, RedisServer, eventually, key, put};
use tonic::Code;

/// More concurrent work than --max-in-flight while Redis is frozen: every caller is answered
/// quickly with UNAVAILABLE or RESOURCE_EXHAUSTED; none queues without bound.
#[tokio::test]
async fn overload_is_refused_quickly() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(
        &redis,
        &["--max-in-flight", "4", "--store-timeout-ms", "300"],
    );
    let cm = server.client().await;
    redis.pause();
    let started = Instant::now();
    let mut callers = Vec::new();
    for n in 0..50 {
        let mut cm = cm.clone();
        callers.push(tokio::spawn(async move {
            let request = common::get_request(key("ns", "f", n));
            let result = cm.get(request).await;
            (result.map(drop), Instant::now())
        }));
    }
    let mut codes = Vec::new();
    for caller in callers {
        let (result, finished) = caller.await.unwrap();
        let err = result.expect_err("a frozen Redis cannot answer");
        assert!(
            finished - started < Duration::from_secs(2),
            "a caller waited {:?}",
            finished - started
        );
        codes.push(err.code());
    }
    redis.resume();
    assert!(
        codes
            .iter()
            .all(|code| matches!(code, Code::Unavailable | Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert!(
        codes.contains(&Code::ResourceExhausted),
        "nobody was told the server is overloaded: {codes:?}"
    );
}

/// When a request finished, what it returned (a hit's value, or the status code), and which
/// key it was for.
type Outcome = (Instant, Result<Option<Vec<u8>>, Code>, u64);

/// Redis killed under ~200 requests/s for about 5 s, then restarted: no caller ever gets a
/// wrong value, the only errors are UNAVAILABLE, and service resumes within 1 s of Redis
/// being back, with no server restart.
#[tokio::test]
async fn redis_killed_under_load_then_restarted() {
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let cm = server.client().await;
    fn value_of(n: u64) -> Vec<u8> {
        format!("value-{n}").into_bytes()
    }
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Open loop: a request every 5 ms whatever earlier ones are doing, as a fleet sends them.
    let load = {
        let (cm, log, stop) = (cm.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut requests = Vec::new();
            // Bounded: stops when told, or after 60 s whatever happens.
            let give_up = Instant::now() + Duration::from_secs(60);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < give_up {
                tick.tick().await;
                let (mut cm, log) = (cm.clone(), log.clone());
                requests.push(tokio::spawn(async move {
                    let id = n % 50;
                    let outcome = if n.is_multiple_of(2) {
                        cm.put(put(key("load", "f", id), &value_of(id), 60))
                            .await
                            .map(|_| None)
                    } else {
                        let request = common::get_request(key("load", "f", id));
                        cm.get(request).await.map(|reply| {
                            let reply = reply.into_inner();
                            reply.hit.then(|| reply.value.to_vec())
                        })
                    };
                    log.lock().unwrap().push((
                        Instant::now(),
                        outcome.map_err(|status| status.code()),
                        id,
                    ));
                }));
                n += 1;
            }
            for request in requests {
                request.await.expect("request task");
            }
        })
    };
    let served = || {
        let log = log.clone();
        move |since: Instant| {
            log.lock()
                .unwrap()
                .iter()
                .any(|(at, outcome, _)| *at > since && outcome.is_ok())
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || {
            let served = served();
            async move { served(Instant::now() - Duration::from_millis(100)) }
        })
        .await
    );
    redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage under test, not a wait for readiness
    redis.restart();
    let back = Instant::now();
    let resumed = eventually(Duration::from_secs(5), || {
        let served = served();
        async move { served(back) }
    })
    .await;
    let resumed_after = back.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(resumed, "no successful request after Redis came back");

    let log = log.lock().unwrap();
    let first_success_after_back = log
        .iter()
        .filter(|(at, outcome, _)| *at > back && outcome.is_ok())
        .map(|(at, _, _)| *at - back)
        .min()
        .unwrap_or(resumed_after);
    assert!(
        first_success_after_back < Duration::from_secs(1),
        "service resumed {first_success_after_back:?} after Redis"
    );
    let errors: Vec<Code> = log
        .iter()
        .filter_map(|(_, outcome, _)| outcome.clone().err())
        .collect();
    assert!(!errors.is_empty(), "the outage caused no errors at all");
    assert!(
        errors.iter().all(|code| *code == Code::Unavailable),
        "{errors:?}"
    );
    let during: usize = log
        .iter()
        .filter(|(at, _, _)| *at > killed && *at < back)
        .count();
    assert!(
        during > 300,
        "only {during} requests were made during the outage"
    );
    for (_, outcome, id) in log.iter() {
        if let Ok(Some(value)) = outcome {
            assert_eq!(
                value,
                &value_of(*id),
                "a wrong value was served for key {id}"
            );
        }
    }
}

/// A second SIGTERM during a long drain ends the process at once, with status 1.
#[tokio::test]
async fn second_sigterm_forces_exit() {
    let redis = RedisServer::start();
    let mut server = CacheServer::redis(
        &redis,
        &["--bust-batch", "1", "--drain-timeout-ms", "60000"],
    );
    let mut conn = redis.connect().await;
    let mut pipe = redis::pipe();
    for n in 0..20_000u64 {
        pipe.cmd("SET")
            .arg(format!("cm:ns:f:{}", common::digest(n)))
            .arg("v")
            .ignore();
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();
    let mut cm = server.client().await;
    let bust = tokio::spawn(async move {
        cm.bust_function(pb::BustFunctionRequest {
            namespace: "ns".into(),
            function: "f".into(),
        })
        .await
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            redis.dbsize().await < 20_000
        })
        .await
    );
    server.terminate();
    assert!(
        server
            .wait_for_log("shutting down", Duration::from_secs(5))
            .is_some()
    );
    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("the second SIGTERM ends the process");
    assert_eq!(status.code(), Some(1));
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(
        bust.await.unwrap().is_err(),
        "the cut-short bust reports an error"
    );
}

/// A request over --max-message-bytes is refused with OUT_OF_RANGE naming the flag, and
/// nothing is written.
#[tokio::test]
async fn oversized_messages_are_refused() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(
        &redis,
        &["--max-value-bytes", "1000", "--max-message-bytes", "6000"],
    );
    let mut cm = server.client().await;
    let entries = (0..10)
        .map(|n| put(key("ns", "f", n), &[7u8; 900], 60))
        .collect();
    let err = cm
        .put_many(pb::PutManyRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("--max-message-bytes (6000 bytes)")
            && err.message().contains("split a batch into smaller ones"),
        "the message names neither the flag nor the way out: {}",
        err.message()
    );
    assert_eq!(redis.dbsize().await, 0);
    let entries = (0..5)
        .map(|n| put(key("ns", "f", n), &[7u8; 900], 60))
        .collect();
    cm.put_many(pb::PutManyRequest { entries })
        .await
        .expect("a batch under the limit is stored");
    assert_eq!(redis.dbsize().await, 5);
}

/// Redis with `requirepass`: the password in the URL works and never reaches the logs; a
/// wrong one leaves the server up, NOT_SERVING, answering UNAVAILABLE with a hint.
#[tokio::test]
async fn redis_password_is_used_and_kept_secret() {
    let password = "pa55-w0rd-for-redis";
    let redis = RedisServer::start_with(&["--requirepass", password]);
    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port());
    let server = CacheServer::start(&["--redis-url", &url]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60))
        .await
        .expect("authenticated to Redis");
    assert!(
        !server.log_text().contains(password),
        "the Redis password was logged"
    );
    assert!(
        server.log_text().contains(":***@"),
        "the URL is logged redacted"
    );

    let wrong = format!("redis://:wrong-password@127.0.0.1:{}", redis.port());
    let refused = CacheServer::start(&["--redis-url", &wrong]);
    let mut cm = refused.client().await;
    let err = cm.put(put(key("ns", "f", 1), b"v", 60)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("--redis-url"), "{}", err.message());
}

/// An ACL user in the URL (`redis://user:password@host`) authenticates as that user.
#[tokio::test]
async fn redis_acl_user_is_used() {
    let redis = RedisServer::start_with(&[
        "--user",
        "cache-money",
        "on",
        ">acl-s3cret",
        "~cm:*",
        "&*",
        "+@all",
    ]);
    let url = format!("redis://cache-money:acl-s3cret@127.0.0.1:{}", redis.port());
    let server = CacheServer::start(&["--redis-url", &url]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60))
        .await
        .expect("authenticated as the ACL user");
    let mut admin = redis.connect().await;
    let whoami: Vec<String> = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async::<String>(&mut admin)
        .await
        .unwrap()
        .lines()
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("user="))
                .map(str::to_owned)
        })
        .collect();
    assert!(
        whoami.iter().any(|user| user == "cache-money"),
        "connected users: {whoami:?}"
    );
    assert!(
        !server.log_text().contains("acl-s3cret"),
        "the ACL password was logged"
    );
}

/// The server's resident memory (`VmRSS`), in bytes.
fn resident_bytes(server: &CacheServer) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("/proc/<pid>/status has VmRSS");
    kib * 1024
}

/// 24 PutMany requests of about 7 MiB into the in-memory store, each leaving one 1-byte
/// entry behind once its big entries are busted: the survivors are copied out of the request,
/// so the server's resident memory grows by less than its budget, not by 24 requests.
#[tokio::test]
async fn in_memory_survivors_do_not_pin_their_requests() {
    const BUDGET: usize = 16 * 1024 * 1024;
    const ROUNDS: u64 = 24;
    const BIG: usize = 1024 * 1024;
    let server = CacheServer::memory(&["--memory-max-bytes", &BUDGET.to_string()]);
    let mut cm = server.client().await;
    let big = vec![7u8; BIG];
    let round = |n: u64| {
        let mut cm = cm.clone();
        let big = big.clone();
        async move {
            let mut entries: Vec<pb::PutRequest> = (0..7)
                .map(|i| put(key("ns", "big", n * 10 + i), &big, 60))
                .collect();
            entries.push(put(key("ns", "small", n), b"s", 3600));
            cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
            let removed = common::bust_function(&mut cm, "ns", "big").await;
            assert_eq!(removed, 7);
        }
    };
    // One round first, so buffers and allocator pools that any request needs are counted in
    // the baseline.
    round(0).await;
    let baseline = resident_bytes(&server);
    for n in 1..=ROUNDS {
        round(n).await;
    }
    let bound = baseline + BUDGET;
    let settled = eventually(Duration::from_secs(10), || async {
        resident_bytes(&server) <= bound
    })
    .await;
    assert!(
        settled,
        "resident memory grew from {baseline} to {} bytes; the budget is {BUDGET}",
        resident_bytes(&server)
    );
    let keys = (0..=ROUNDS).map(|n| key("ns", "small", n)).collect();
    let reply = cm.get_many(pb::GetManyRequest { keys }).await.unwrap();
    assert!(
        reply.into_inner().results.iter().all(|result| result.hit),
        "a surviving entry was lost"
    );
}
