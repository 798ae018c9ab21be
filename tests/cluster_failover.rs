//! A Redis Cluster changing under a running server: a primary killed under steady load (its
//! replica promoted), a resharding racing a bust, and a tag index's primary frozen under a
//! tagged write and a BustTag. Each test has a cluster of its own, since it changes the
//! topology.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use cache_money::pb::{self, cache_money_client::CacheMoneyClient};
use common::{CacheServer, RedisCluster, digest, eventually, health_becomes, key, put};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// How soon a node declares a silent peer failed (`cluster-node-timeout`), in milliseconds.
const NODE_TIMEOUT_MS: u64 = 1_000;

/// What the load saw.
#[derive(Debug, Default)]
struct Tally {
    answered: AtomicU64,
    /// A hit whose value is not the one written under that key.
    wrong: AtomicU64,
    /// When each failed call failed, with what code and message.
    errors: Mutex<Vec<(Instant, Code, String)>>,
}

impl Tally {
    fn failed(&self, status: &tonic::Status) {
        self.errors.lock().unwrap().push((
            Instant::now(),
            status.code(),
            status.message().to_owned(),
        ));
    }
}

/// The value task `task` writes under entry `n`: every key is written once, so any hit has
/// exactly one right value (a write lost with the killed primary can only be a miss).
fn value(task: u64, n: u64) -> Vec<u8> {
    format!("task {task} entry {n}").into_bytes()
}

/// Puts new entries and reads back earlier ones (Get and GetMany) until `stop`.
async fn load(
    task: u64,
    mut cm: CacheMoneyClient<Channel>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let function = format!("t{task}");
    let mut written: Vec<u64> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        n += 1;
        match cm
            .put(put(key("load", &function, n), &value(task, n), 600))
            .await
        {
            Ok(_) => written.push(n),
            Err(status) => tally.failed(&status),
        }
        let Some(&last) = written.last() else {
            continue;
        };
        let earlier = written[(n as usize * 7919) % written.len()];
        match cm
            .get(common::get_request(key("load", &function, earlier)))
            .await
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                if reply.hit && reply.value != value(task, earlier) {
                    tally.wrong.fetch_add(1, Relaxed);
                }
                tally.answered.fetch_add(1, Relaxed);
            }
            Err(status) => tally.failed(&status),
        }
        let batch: Vec<u64> = [earlier, last, n + 1_000_000]
            .into_iter()
            .chain(written.iter().rev().take(5).copied())
            .collect();
        let keys = batch.iter().map(|&m| key("load", &function, m)).collect();
        match cm.get_many(pb::GetManyRequest { keys }).await {
            Ok(reply) => {
                for (m, result) in batch.iter().zip(reply.into_inner().results) {
                    if result.hit && result.value != value(task, *m) {
                        tally.wrong.fetch_add(1, Relaxed);
                    }
                }
                tally.answered.fetch_add(1, Relaxed);
            }
            Err(status) => tally.failed(&status),
        }
    }
}

/// When another node took over every slot of `victim` (polled each 20 ms, up to 60 s), then
/// the cluster settled if `settle`.
async fn promotion(cluster: Arc<RedisCluster>, victim: u16, settle: bool) -> Instant {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if cluster.slot_ranges().iter().all(|range| range.2 != victim) {
                if settle {
                    cluster.wait_until_settled();
                }
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
    .await
    .unwrap()
    .expect("no replica was promoted within 60 s")
}

/// A primary killed (SIGKILL) under four clients' steady Puts, Gets and GetManys: its replica
/// is promoted, the calls that fail meanwhile fail UNAVAILABLE, no call ever returns a value
/// other than the one written under its key, health goes NOT_SERVING after the kill (saying
/// why in the log) and SERVING again after the promotion, a `Keys` cursor from before is
/// refused ABORTED, and full service is back within a bounded time of the promotion (printed
/// for the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_under_load_fails_over_without_wrong_results() {
    let mut cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let server = CacheServer::cluster(&cluster, &["--health-interval-ms", "100"]);
    let mut cm = server.client().await;
    let entries = (0..300)
        .map(|n| put(key("ns", "listed", n), b"x", 600))
        .collect();
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
    let first_page = cm
        .keys(pb::KeysRequest {
            namespace: "ns".into(),
            function: "listed".into(),
            cursor: String::new(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !first_page.next_cursor.is_empty(),
        "one page held every entry"
    );

    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let mut tasks = Vec::new();
    for task in 0..4 {
        let client = server.client().await;
        tasks.push(tokio::spawn(load(
            task,
            client,
            tally.clone(),
            stop.clone(),
        )));
    }
    let warmed = eventually(Duration::from_secs(20), || async {
        tally.answered.load(Relaxed) >= 200
    })
    .await;
    assert!(warmed, "the load never got going");
    assert!(
        tally.errors.lock().unwrap().is_empty(),
        "errors before the kill"
    );

    let victim = cluster.primaries()[1];
    let killed_at = Instant::now();
    cluster.kill(victim);
    let unhealthy =
        health_becomes(&server, ServingStatus::NotServing, Duration::from_secs(10)).await;
    assert!(unhealthy, "health stayed SERVING with a primary dead");

    let cluster = Arc::new(cluster);
    let watched = cluster.clone();
    let promoted = promotion(watched, victim, true).await;

    let healthy = health_becomes(&server, ServingStatus::Serving, Duration::from_secs(20)).await;
    assert!(
        healthy,
        "health did not come back to SERVING after the promotion"
    );
    // Full service: keep the load on until two seconds pass without an error.
    let quiet = eventually(Duration::from_secs(30), || async {
        let errors = tally.errors.lock().unwrap();
        let last = errors.last().map_or(killed_at, |(at, ..)| *at);
        last.elapsed() >= Duration::from_secs(2)
    })
    .await;
    let answered_before_stop = tally.answered.load(Relaxed);
    stop.store(true, Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let errors = tally.errors.lock().unwrap().clone();
    let last_error = errors.last().map_or(killed_at, |(at, ..)| *at);
    let to_promotion = promoted - killed_at;
    let after_promotion = last_error.saturating_duration_since(promoted);
    eprintln!(
        "failover (cluster-node-timeout {NODE_TIMEOUT_MS} ms): kill -> promotion {to_promotion:?}; \
         kill -> last failed call {:?}; promotion -> full service {after_promotion:?}; \
         {} failed calls, {answered_before_stop} answered reads",
        last_error - killed_at,
        errors.len(),
    );
    assert_eq!(tally.wrong.load(Relaxed), 0, "calls returned wrong values");
    let others: Vec<&(Instant, Code, String)> = errors
        .iter()
        .filter(|(_, code, _)| *code != Code::Unavailable)
        .collect();
    assert!(
        others.is_empty(),
        "failures other than UNAVAILABLE: {others:?}"
    );
    assert!(quiet, "calls kept failing 30 s after the promotion");
    assert!(
        after_promotion < Duration::from_secs(10),
        "full service came back {after_promotion:?} after the promotion"
    );
    let log = server.log_text();
    assert!(
        log.lines().any(|line| line.contains("NOT_SERVING")
            && (line.contains("cluster_state") || line.contains(&victim.to_string()))),
        "no NOT_SERVING line with a reason:\n{log}"
    );

    let err = cm
        .keys(pb::KeysRequest {
            namespace: "ns".into(),
            function: "listed".into(),
            cursor: first_page.next_cursor,
            limit: 10,
        })
        .await
        .expect_err("a cursor from before the failover was accepted");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("empty cursor"), "{}", err.message());
}

/// Keys held by the primaries, summed: each primary's DBSIZE, the invalidation streams (one
/// per prefix, appended to by every write and bust) left out.
async fn cluster_size(cluster: &RedisCluster) -> u64 {
    let mut total = 0;
    for port in cluster.primaries() {
        let size: u64 = redis::cmd("DBSIZE")
            .query_async(&mut cluster.node(port).await)
            .await
            .unwrap();
        total += size;
    }
    total - cluster.scan_match(common::INVALIDATION_STREAMS).await.len() as u64
}

/// A slot set migrating while a bust walks the cluster makes the bust UNAVAILABLE saying its
/// count may be partial; a bust while the slot is still migrating is refused before it removes
/// anything; once the slot is stable again a bust finishes the job and counts the rest. A
/// primary frozen while a bust walks makes it UNAVAILABLE and partial too, within the store
/// timeout of each step, never a count that silently leaves that primary out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bust_racing_a_resharding_reports_a_partial_count() {
    const ENTRIES: u64 = 60_000;
    let cluster = RedisCluster::start(5_000);
    let keys: Vec<Vec<u8>> = (0..ENTRIES)
        .map(|n| format!("cm:ns:big:{}", digest(n)).into_bytes())
        .collect();
    cluster.set_keys(&keys, b"v").await;
    let server = CacheServer::cluster(&cluster, &["--bust-batch", "5"]);
    let cm = server.client().await;

    let bust = tokio::spawn({
        let mut cm = cm.clone();
        async move {
            cm.bust_function(pb::BustFunctionRequest {
                namespace: "ns".into(),
                function: "big".into(),
            })
            .await
        }
    });
    let under_way = eventually(Duration::from_secs(20), || async {
        cluster_size(&cluster).await < ENTRIES
    })
    .await;
    assert!(under_way, "the bust never started removing");
    let (source, target) = (cluster.primaries()[0], cluster.primaries()[1]);
    let mut source_node = cluster.node(source).await;
    let target_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut cluster.node(target).await)
        .await
        .unwrap();
    let slot = cluster
        .slot_ranges()
        .iter()
        .find(|range| range.2 == source)
        .unwrap()
        .0;
    let setslot = |state: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state);
        if state == "MIGRATING" {
            cmd.arg(&target_id);
        }
        cmd
    };
    setslot("MIGRATING")
        .query_async::<()>(&mut source_node)
        .await
        .unwrap();
    assert!(
        !bust.is_finished(),
        "the bust finished before the resharding began; the race was not run"
    );
    let err = bust
        .await
        .unwrap()
        .expect_err("a bust racing a resharding succeeded");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("may be partial"),
        "{}",
        err.message()
    );

    let mut cm = cm.clone();
    let request = || pb::BustFunctionRequest {
        namespace: "ns".into(),
        function: "big".into(),
    };
    let before = cluster_size(&cluster).await;
    let err = cm
        .bust_function(request())
        .await
        .expect_err("bust while migrating");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("nothing removed"),
        "{}",
        err.message()
    );
    assert_eq!(
        cluster_size(&cluster).await,
        before,
        "a refused bust removed entries"
    );

    setslot("STABLE")
        .query_async::<()>(&mut source_node)
        .await
        .unwrap();
    let removed = cm
        .bust_function(request())
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, before, "the second bust did not count the rest");
    assert_eq!(cluster_size(&cluster).await, 0);

    cluster.set_keys(&keys, b"v").await;
    let bust = tokio::spawn({
        let mut cm = cm.clone();
        async move { cm.bust_function(request()).await }
    });
    let under_way = eventually(Duration::from_secs(20), || async {
        cluster_size(&cluster).await < ENTRIES
    })
    .await;
    assert!(under_way, "the third bust never started removing");
    // The last primary in slot order is walked last: frozen now, the bust meets it.
    let frozen = *cluster
        .primaries()
        .iter()
        .max_by_key(|port| {
            let ranges = cluster.slot_ranges();
            ranges
                .iter()
                .find(|range| range.2 == **port)
                .map(|range| range.0)
        })
        .unwrap();
    cluster.freeze(frozen);
    let outcome = bust.await.unwrap();
    cluster.thaw(frozen);
    let err = outcome.expect_err("a bust with a frozen primary succeeded");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("may be partial"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&frozen.to_string()),
        "the message does not name the node: {}",
        err.message()
    );
}

/// Every primary frozen (SIGSTOP): a Get, a GetMany and a bust each fail UNAVAILABLE within
/// about the store timeout instead of hanging, health reports NOT_SERVING; thawed, the same
/// server reports SERVING and answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_cluster_times_out_instead_of_hanging() {
    let cluster = RedisCluster::start(5_000);
    let server = CacheServer::cluster(&cluster, &["--health-interval-ms", "100"]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 600)).await.unwrap();
    let primaries = cluster.primaries();
    for port in &primaries {
        cluster.freeze(*port);
    }
    let started = Instant::now();
    let get = cm.get(common::get_request(key("ns", "f", 1))).await;
    let keys = (0..20).map(|n| key("ns", "f", n)).collect();
    let get_many = cm.get_many(pb::GetManyRequest { keys }).await;
    let bust = cm
        .bust_function(pb::BustFunctionRequest {
            namespace: "ns".into(),
            function: "f".into(),
        })
        .await;
    let elapsed = started.elapsed();
    let unhealthy =
        health_becomes(&server, ServingStatus::NotServing, Duration::from_secs(5)).await;
    for port in &primaries {
        cluster.thaw(*port);
    }
    for (rpc, code) in [
        ("Get", get.map(|_| ()).map_err(|status| status.code())),
        (
            "GetMany",
            get_many.map(|_| ()).map_err(|status| status.code()),
        ),
        (
            "BustFunction",
            bust.map(|_| ()).map_err(|status| status.code()),
        ),
    ] {
        assert_eq!(code, Err(Code::Unavailable), "{rpc}");
    }
    // Three calls, each bounded by the 250 ms store timeout (a bust by its first step).
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(unhealthy, "health stayed SERVING with every primary frozen");
    assert!(
        health_becomes(&server, ServingStatus::Serving, Duration::from_secs(20)).await,
        "health did not come back after the thaw"
    );
    let value = common::get(&mut cm, key("ns", "f", 1)).await;
    assert_eq!(value.as_deref(), Some(&b"v"[..]));
}

/// The primary holding a tag's index frozen (SIGSTOP): a tagged Put whose entry lives on
/// another primary fails UNAVAILABLE and writes no entry; a BustTag already walking the index
/// fails UNAVAILABLE saying its count may be partial and naming the index; thawed, BustTag
/// removes and counts exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_index_primary_frozen_fails_writes_and_busts_honestly() {
    const ENTRIES: u64 = 30_000;
    let cluster = RedisCluster::start(5_000);
    let server = CacheServer::cluster(&cluster, &["--bust-batch", "5"]);
    let mut cm = server.client().await;
    let tagged = |n: u64| pb::PutRequest {
        tags: vec!["user:7".into()],
        ..put(key("ns", "big", n), b"v", 600)
    };
    cm.put(tagged(0)).await.unwrap();
    let index = cluster
        .scan_match("cm:ns:#tag:*")
        .await
        .pop_first()
        .map(|key| String::from_utf8(key).unwrap())
        .expect("the tag's index");
    let index_node = cluster.primary_of(index.as_bytes());
    let entry = |n: u64| format!("cm:ns:big:{}", digest(n)).into_bytes();

    // An entry on another primary than the index: its write must not happen without it.
    let elsewhere = (1..)
        .find(|&n| cluster.primary_of(&entry(n)) != index_node)
        .unwrap();
    cluster.freeze(index_node);
    let put_result = cm.put(tagged(elsewhere)).await;
    cluster.thaw(index_node);
    let err = put_result.expect_err("a tagged Put succeeded without its index");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    let written: bool = redis::cmd("EXISTS")
        .arg(entry(elsewhere))
        .query_async(&mut cluster.node(cluster.primary_of(&entry(elsewhere))).await)
        .await
        .unwrap();
    assert!(!written, "the entry was written though its index was not");

    // Many tagged entries over every primary, indexed directly (as the Put's script would).
    let keys: Vec<Vec<u8>> = (1..ENTRIES).map(entry).collect();
    cluster.set_keys(&keys, b"v").await;
    assert_eq!(cluster.primaries_of(&keys).len(), 3);
    let mut index_conn = cluster.node(index_node).await;
    for chunk in (1..ENTRIES).collect::<Vec<_>>().chunks(5_000) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&index);
        for n in chunk {
            zadd.arg(i64::MAX).arg(format!("big:{}", digest(*n)));
        }
        zadd.query_async::<()>(&mut index_conn).await.unwrap();
    }
    let stored = cluster_size(&cluster).await;
    let bust = tokio::spawn({
        let mut cm = cm.clone();
        async move {
            cm.bust_tag(pb::BustTagRequest {
                namespace: "ns".into(),
                tag: "user:7".into(),
            })
            .await
        }
    });
    let under_way = eventually(Duration::from_secs(20), || async {
        cluster_size(&cluster).await < stored
    })
    .await;
    assert!(under_way, "the BustTag never started removing");
    cluster.freeze(index_node);
    let outcome = bust.await.unwrap();
    cluster.thaw(index_node);
    let err = outcome.expect_err("a BustTag with its index's primary frozen succeeded");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("may be partial") && err.message().contains(&index),
        "{}",
        err.message()
    );

    // The rest: every entry still there, and only those, counted by the next BustTag.
    let left = cluster.scan_match("cm:ns:big:*").await.len() as u64;
    assert!(left > 0 && left < ENTRIES, "{left} entries left");
    let removed = common::bust_tag(&mut cm, "ns", "user:7").await;
    assert_eq!(removed, left, "the second BustTag did not count the rest");
    assert!(cluster.scan_match("cm:ns:big:*").await.is_empty());
}

/// A primary frozen (SIGSTOP: its connections stay open, nothing answers) until its replica is
/// promoted: Get and GetMany for its keys answer again within a bound of the promotion
/// (printed), with their values, and health is never SERVING while they still fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_primary_replaced_then_its_keys_answer_again() {
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let server = CacheServer::cluster(&cluster, &[]);
    let mut cm = server.client().await;
    let entries = (0..60).map(|n| put(key("ns", "silent", n), &[n as u8], 600));
    cm.put_many(pb::PutManyRequest {
        entries: entries.collect(),
    })
    .await
    .unwrap();
    // Not the node the harness asks for the slot map, which must stay live.
    let asked = cluster.ports()[0];
    let victim = *cluster
        .primaries()
        .iter()
        .find(|port| **port != asked)
        .unwrap();
    let on_victim: Vec<u64> = (0..60)
        .filter(|n| cluster.primary_of(format!("cm:ns:silent:{}", digest(*n)).as_bytes()) == victim)
        .collect();
    assert!(!on_victim.is_empty(), "no entry on {victim}");
    // Replication is asynchronous: wait until the replica has every write, or the promoted
    // replica would rightly miss them.
    let replicated = eventually(Duration::from_secs(10), || async {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut cluster.node(victim).await)
            .await
            .unwrap();
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name).map(str::to_owned))
        };
        let offset = field("master_repl_offset:");
        let replica = field("slave0:").and_then(|line| {
            line.split(',')
                .find_map(|part| part.strip_prefix("offset=").map(str::to_owned))
        });
        offset.is_some() && offset == replica
    })
    .await;
    assert!(replicated, "the replica of {victim} did not catch up");

    cluster.freeze(victim);
    let cluster = Arc::new(cluster);
    let watched = cluster.clone();
    // Not settled: the frozen node cannot say it is.
    let promoted = promotion(watched, victim, false).await;

    let (mut serving_while_failing, mut recovered) = (Vec::new(), None);
    while promoted.elapsed() < Duration::from_secs(20) {
        let status = common::health(&server).await;
        let keys = on_victim.iter().map(|&n| key("ns", "silent", n)).collect();
        let get_many = cm.get_many(pb::GetManyRequest { keys }).await;
        let get = cm
            .get(common::get_request(key("ns", "silent", on_victim[0])))
            .await;
        match (get_many, get) {
            (Ok(many), Ok(one)) => {
                let values: Vec<Vec<u8>> = many
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|result| result.value.to_vec())
                    .collect();
                let expected: Vec<Vec<u8>> = on_victim.iter().map(|&n| vec![n as u8]).collect();
                assert_eq!(values, expected, "GetMany after the failover");
                assert_eq!(one.into_inner().value.to_vec(), vec![on_victim[0] as u8]);
                recovered = Some(promoted.elapsed());
                break;
            }
            (many, one) => {
                if status == ServingStatus::Serving as i32 {
                    let codes = (many.err().map(|s| s.code()), one.err().map(|s| s.code()));
                    serving_while_failing.push(codes);
                }
            }
        }
    }
    cluster.thaw(victim);
    eprintln!(
        "silent primary (cluster-node-timeout {NODE_TIMEOUT_MS} ms): promotion -> its keys answer {recovered:?}"
    );
    let recovered = recovered
        .expect("Gets for the frozen primary's keys failed 20 s after its replica's promotion");
    assert!(
        serving_while_failing.is_empty(),
        "health was SERVING while Gets failed: {serving_while_failing:?}"
    );
    assert!(recovered < Duration::from_secs(5), "took {recovered:?}");
}
