//! The cache-money benchmark: each scenario measured beside a reference in the same run, in
//! interleaved repetitions, reporting medians and the ratio to the reference.
//!
//!     cargo bench --bench cm_bench                 # the full run (a few minutes)
//!     cargo bench --bench cm_bench -- --quick      # seconds; CI runs it (as a debug build) so the harness keeps working
//!
//! Options: --reps N (3), --seconds S per measurement (3), --bust-entries N (1000000),
//! --footprint-seconds S (60), --only get50,get1,hops,lookup,memo-lease,memo-hit,memo-miss,batch,
//! h2load,floor,get50-metrics,near,bust,footprint (a comma-separated subset of the scenarios, for working on one), --cluster
//! (the bust again on a Redis Cluster of three primaries and three replicas started for it, the
//! entries spread over the primaries: `--only bust --cluster` compares the two).
//! `get50-metrics` runs a second server with `--metrics-listen` and a third just like the first
//! beside it, and measures the 50-caller Get on each, interleaved: the cost of metrics, and a
//! control whose distance from 1.0 is the noise floor of that comparison. `memo-hit` also
//! times the original Python library's `@cached` hit on the same Redis (benches/python_hit.py,
//! in a virtualenv with cache-money 1.3.0 made in target/bench-venv on first use, or
//! `CACHE_MONEY_BENCH_PYTHON`). `hops` splits a one-caller hit into its hops: the server's own
//! Redis round trip (a metered server's store GET time, sum over count) beside
//! redis-benchmark's, and the gRPC hop alone (a Get from the in-memory store). `floor` times
//! one caller against three stand-in servers (benches/floor: a bare hyper HTTP/2 responder,
//! tonic serving cache-money's generated service with a Get that only answers, and the bare
//! responder relaying a GET to Redis over a plain socket) and against cache-money on either
//! store, from h2load (1 × 1, when installed) and from the
//! client library, beside redis-benchmark's one caller: what any gRPC hop, and any relay to
//! Redis, costs on the machine. `near` times a memoize hit served from the client's near
//! cache beside the same hit through the service and beside the Python library's, then fills
//! the near cache to measure its memory per entry (the bench process's RSS before and after).
//! It starts its own redis-server and cache-money-server on loopback and stops them; every
//! loop is bounded by time and count.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "floor/mod.rs"]
mod floor;

use std::{
    fmt::Write as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use cache_money::{Client, ClientOptions, Ttl, pb, pb::cache_money_client::CacheMoneyClient};
use common::{CacheServer, RedisCluster, RedisServer, digest, key};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

/// The load generator allocates with mimalloc, like the server (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// HTTP/2 connections the load generator spreads its callers over, like a fleet of clients.
const CONNECTIONS: usize = 4;
/// The servers `floor` measures one caller against, in its table's order.
const FLOOR_SERVERS: [&str; 5] = [
    "bare HTTP/2 responder (hyper; benches/floor)",
    "bare tonic service: cache-money's generated service, a Get that only answers",
    "relay: the bare responder + a plain-socket Redis GET",
    "cache-money, in-memory store",
    "cache-money, Redis store",
];
/// The relay's place in FLOOR_SERVERS.
const FLOOR_RELAY: usize = 2;
/// cache-money on the Redis store's place in FLOOR_SERVERS.
const FLOOR_REDIS: usize = 4;
/// Callers in the concurrent scenarios (redis-benchmark's -c).
const CONCURRENCY: usize = 50;
/// Keys per GetMany.
const BATCH: usize = 100;
/// Callers in the batch scenario, on both sides.
const BATCH_CALLERS: usize = 8;

struct Settings {
    reps: usize,
    seconds: f64,
    bust_entries: u64,
    footprint_seconds: u64,
    quick: bool,
    /// Whether to run the bust on a Redis Cluster too.
    cluster: bool,
    /// Scenario ids to run; empty runs them all.
    only: Vec<String>,
}

impl Settings {
    fn from_args() -> Self {
        let mut settings = Settings {
            reps: 3,
            seconds: 3.0,
            bust_entries: 1_000_000,
            footprint_seconds: 60,
            quick: false,
            cluster: false,
            only: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        let number = |args: &mut dyn Iterator<Item = String>, flag: &str| -> f64 {
            args.next()
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{flag} takes a number"))
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    settings = Settings {
                        reps: 3,
                        seconds: 0.3,
                        bust_entries: 20_000,
                        footprint_seconds: 2,
                        quick: true,
                        cluster: settings.cluster,
                        only: settings.only,
                    };
                }
                "--cluster" => settings.cluster = true,
                "--reps" => settings.reps = number(&mut args, &arg) as usize,
                "--seconds" => settings.seconds = number(&mut args, &arg),
                "--only" => {
                    let ids = args.next().expect("--only takes scenario ids");
                    settings.only = ids.split(',').map(str::to_owned).collect();
                }
                "--bust-entries" => settings.bust_entries = number(&mut args, &arg) as u64,
                "--footprint-seconds" => {
                    settings.footprint_seconds = number(&mut args, &arg) as u64
                }
                // cargo bench passes --bench.
                "--bench" => {}
                other => panic!("unknown option {other}; see the header of benches/cm_bench.rs"),
            }
        }
        settings
    }

    /// Whether the scenario `id` is to run.
    fn wants(&self, id: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|wanted| wanted == id)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// One measurement: operations (or keys) per second and latency percentiles.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index])
}

fn sample(mut latencies_us: Vec<u32>, units: u64, elapsed: Duration) -> Sample {
    latencies_us.sort_unstable();
    Sample {
        per_second: units as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies_us, 0.50),
        p99_us: percentile(&latencies_us, 0.99),
    }
}

/// CPU time used so far, in clock ticks, by the processes a scenario involves: read from
/// `/proc/<pid>/stat` (utime + stime), and for this process also its finished children
/// (cutime + cstime), which is where redis-benchmark's time shows once it has exited.
#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    server: u64,
    redis: u64,
    generator: u64,
    children: u64,
}

/// (own, finished children's) CPU ticks of a process.
fn proc_ticks(pid: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    // utime, stime, cutime, cstime are fields 14–17 of stat(5), 11–14 after the name.
    let field = |n: usize| fields.get(n).copied().unwrap_or(0);
    (field(11) + field(12), field(13) + field(14))
}

impl CpuTicks {
    fn now(server_pid: u32, redis_pid: u32) -> Self {
        let (generator, children) = proc_ticks("self");
        CpuTicks {
            server: proc_ticks(&server_pid.to_string()).0,
            redis: proc_ticks(&redis_pid.to_string()).0,
            generator,
            children,
        }
    }

    /// Microseconds of CPU per request for each process since `earlier`.
    fn per_request_us(&self, earlier: &CpuTicks, requests: f64) -> [f64; 4] {
        // Linux reports /proc times in USER_HZ, 100 per second on every mainstream platform.
        let us = |now: u64, then: u64| (now - then) as f64 * 10_000.0 / requests.max(1.0);
        [
            us(self.server, earlier.server),
            us(self.redis, earlier.redis),
            us(self.generator, earlier.generator),
            us(self.children, earlier.children),
        ]
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `callers` concurrent loops of `op` for `duration`; each op counts `units`.
async fn load<F, Fut>(callers: usize, duration: Duration, units: u64, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                op(caller, n).await;
                latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                n += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("load task"));
    }
    let elapsed = started.elapsed();
    let count = all.len() as u64;
    sample(all, count * units, elapsed)
}

/// redis-benchmark's CSV line: rps, p50 and p99 (ms → µs).
fn redis_benchmark(port: u16, args: &[&str]) -> Sample {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--csv"])
        .args(args)
        .output()
        .expect("redis-benchmark is installed (redis-tools)");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .expect("redis-benchmark printed a result");
    let fields: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|field| field.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Sample {
        per_second: fields[0],
        p50_us: fields[3] * 1000.0,
        p99_us: fields[5] * 1000.0,
    }
}

/// The same Get from h2load (nghttp2-client), a C HTTP/2 load generator far lighter than a
/// tonic client, over `connections` × `streams` streams (4 × 13 — about 50 — shows how much
/// of the 50-caller gap is the Rust load generator competing for the 2 cores; 1 × 1 is one
/// lean caller). `None` when h2load is not installed. h2load reports no percentiles, only
/// throughput.
fn h2load_get(
    addr: std::net::SocketAddr,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> Option<Sample> {
    use prost::Message;
    let request = pb::GetRequest {
        key: Some(key("bench", "get", 0)),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(request.len() as u32).to_be_bytes());
    body.extend_from_slice(&request);
    let path = std::env::temp_dir().join(format!("cm-bench-get-{}.bin", std::process::id()));
    std::fs::write(&path, body).ok()?;
    let output = Command::new("h2load")
        .args([
            "-c",
            &connections.to_string(),
            "-m",
            &streams.to_string(),
            "-D",
            &format!("{}", duration.as_secs().max(1)),
        ])
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
        ])
        .arg(&path)
        .arg(format!("http://{addr}/cache_money.v1.CacheMoney/Get"))
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&output.stdout);
    // "finished in 3.00s, 74000.00 req/s, 7.2MB/s"
    let rps = text
        .lines()
        .find(|line| line.starts_with("finished in"))?
        .split(", ")
        .nth(1)?
        .trim_end_matches(" req/s")
        .parse()
        .ok()?;
    assert!(
        text.contains(" 0 failed, 0 errored"),
        "h2load saw failures:\n{text}"
    );
    Some(Sample {
        per_second: rps,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    })
}

/// redis-benchmark GET of the 64-byte value over `connections` connections, unpipelined.
fn redis_get(port: u16, connections: &str, requests: &str) -> Sample {
    redis_benchmark(
        port,
        &[
            "-t",
            "get",
            "-d",
            "64",
            "-c",
            connections,
            "-P",
            "1",
            "-n",
            requests,
        ],
    )
}

/// The Get of the 64-byte fixture, built once as a caller would.
fn fixture_request() -> pb::GetRequest {
    pb::GetRequest {
        key: Some(key("bench", "get", 0)),
        ..Default::default()
    }
}

/// One gRPC Get of the 64-byte fixture; it must hit.
async fn get_fixture(client: &Client, request: pb::GetRequest) {
    assert!(client.raw_get(request).await.unwrap().into_inner().hit);
}

/// How many requests redis-benchmark needs to run for about `duration` at `rps`.
fn requests_for(rps: f64, duration: Duration) -> String {
    ((rps * duration.as_secs_f64()) as u64)
        .max(1000)
        .to_string()
}

/// The 50-caller Get of the fixture through `clients`, and the CPU per request of the server
/// (`server_pid`), Redis and the load generator meanwhile.
async fn get50(
    clients: &[Client],
    duration: Duration,
    server_pid: u32,
    redis_pid: u32,
) -> (Sample, [f64; 3]) {
    let pool = clients.to_vec();
    let started = Instant::now();
    let before = CpuTicks::now(server_pid, redis_pid);
    let request = fixture_request();
    let measured = load(CONCURRENCY, duration, 1, move |caller, _| {
        let (client, request) = (pool[caller % CONNECTIONS].clone(), request.clone());
        async move {
            get_fixture(&client, request).await;
        }
    })
    .await;
    let after = CpuTicks::now(server_pid, redis_pid);
    let requests = measured.per_second * started.elapsed().as_secs_f64();
    let [server_us, redis_us, generator_us, _] = after.per_request_us(&before, requests);
    (measured, [server_us, redis_us, generator_us])
}

/// A Python with the original library (cache-money 1.3.0 from PyPI, and the redis-py it
/// works with): `CACHE_MONEY_BENCH_PYTHON`, else a virtualenv in `target/bench-venv`, made on
/// first use. `None` (the row is left out, and the report says why) when there is none and
/// making one fails, or in `--quick` mode, which installs nothing.
fn python_reference(quick: bool) -> Option<std::path::PathBuf> {
    let works = |python: &std::path::Path| {
        Command::new(python)
            .args(["-c", "import cache_money"])
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if let Some(python) = std::env::var_os("CACHE_MONEY_BENCH_PYTHON") {
        let python = std::path::PathBuf::from(python);
        return works(&python).then_some(python);
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-venv");
    let python = venv.join("bin/python");
    if works(&python) {
        return Some(python);
    }
    if quick {
        eprintln!("the Python reference is skipped in --quick mode (it installs a virtualenv)");
        return None;
    }
    eprintln!("making {} with cache-money==1.3.0", venv.display());
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|status| status.success())
        && Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            // 1.3.0 uses redis.asyncio's API as it was before redis-py 5.
            .args(["cache-money==1.3.0", "redis<5"])
            .status()
            .is_ok_and(|status| status.success());
    if made && works(&python) {
        Some(python)
    } else {
        eprintln!("no Python with cache-money 1.3.0: its row is left out");
        None
    }
}

/// The original library's hit, one caller, `duration` long, against the Redis on `port`.
fn python_hit(python: &std::path::Path, port: u16, duration: Duration) -> Sample {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python_hit.py");
    let output = Command::new(python)
        .arg(script)
        .arg(port.to_string())
        .arg(duration.as_secs_f64().to_string())
        .output()
        .expect("run benches/python_hit.py");
    assert!(
        output.status.success(),
        "benches/python_hit.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    #[derive(Deserialize)]
    struct Measured {
        per_second: f64,
        p50_us: f64,
        p99_us: f64,
    }
    let measured: Measured =
        serde_json::from_slice(&output.stdout).expect("python_hit.py prints one JSON line");
    Sample {
        per_second: measured.per_second,
        p50_us: measured.p50_us,
        p99_us: measured.p99_us,
    }
}

/// One caller's Gets of the fixture through `client`, back to back, for `duration`.
async fn one_caller_gets(client: &Client, duration: Duration) -> Sample {
    let (single, request) = (client.clone(), fixture_request());
    load(1, duration, 1, move |_, _| {
        let (client, request) = (single.clone(), request.clone());
        async move {
            get_fixture(&client, request).await;
        }
    })
    .await
}

/// One repetition of `floor`: redis-benchmark -c 1's [µs per request, p50], and per entry of
/// FLOOR_SERVERS [h2load 1×1's µs per request (NaN without h2load), the client library's p50].
type FloorRun = ([f64; 2], [[f64; 2]; FLOOR_SERVERS.len()]);

/// A cache-money server on the in-memory store holding the 64-byte Get fixture, and a client.
async fn memory_with_fixture(value64: &[u8]) -> (CacheServer, Client) {
    let memory = CacheServer::memory(&[]);
    let client = Client::connect(memory.url()).await.unwrap();
    client
        .raw()
        .put(common::put(key("bench", "get", 0), value64, 3600))
        .await
        .unwrap();
    (memory, client)
}

/// `floor`'s table: one caller against each of FLOOR_SERVERS, from h2load and from the client
/// library, beside redis-benchmark's one caller (medians of the repetitions).
fn floor_table(floors: &[FloorRun], report: &mut String) {
    let reference = |n: usize| median(floors.iter().map(|(reference, _)| reference[n]).collect());
    let (per_request, p50) = (reference(0), reference(1));
    let _ = writeln!(
        report,
        "\nOne caller against the floor (medians); redis-benchmark GET -c 1: {per_request:.1} µs per request, p50 {p50:.1} µs\n\n\
         | server | h2load 1×1: µs per request | × redis-benchmark | client library Get p50 | × redis-benchmark p50 |\n\
         |---|---|---|---|---|"
    );
    for (n, name) in FLOOR_SERVERS.iter().enumerate() {
        let column = |c: usize| median(floors.iter().map(|(_, measured)| measured[n][c]).collect());
        let (lean, library) = (column(0), column(1));
        let shown = if lean.is_nan() {
            "– (no h2load)".to_owned()
        } else {
            format!("{lean:.1}")
        };
        let _ = writeln!(
            report,
            "| {name} | {shown} | {} | {library:.0} µs | {} |",
            ratio(lean / per_request),
            ratio(library / p50),
        );
    }
    // cache-money on Redis against the relay, within each repetition: how far its server is
    // from the cheapest relay, whatever the machine's round trips cost.
    let against_relay = |c: usize| {
        ratio(median(
            floors
                .iter()
                .map(|(_, measured)| measured[FLOOR_REDIS][c] / measured[FLOOR_RELAY][c])
                .collect(),
        ))
    };
    let _ = writeln!(
        report,
        "\ncache-money's Redis store against the relay, within each repetition (medians): {} from h2load, {} from the client library",
        against_relay(0),
        against_relay(1),
    );
}

/// A ratio as the tables show it (`1.23×`), or `–` when either side was not measured.
fn ratio(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else {
        format!("{value:.2}×")
    }
}

/// The number a metrics page gives the sample that starts `prefix` (name and labels).
fn scraped(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(prefix)?.trim().parse().ok())
}

/// The load generator's clients: the client library's, each over its own connection.
async fn channels(server: &CacheServer) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Client::connect(server.url()).await.expect("client"));
    }
    clients
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    plan: String,
    credits: i64,
}

fn profile() -> Profile {
    Profile {
        id: 918_273,
        name: "Ada Lovelace".into(),
        plan: "enterprise".into(),
        credits: 1200,
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One caller's memoize hits of the bench's profile through `handle`, for `duration`.
async fn memoize_hits(handle: cache_money::Function, duration: Duration) -> Sample {
    load(1, duration, 1, move |_, _| {
        let hit = handle.clone();
        async move {
            let got: Profile = hit
                .memoize(&(1u64,), || async { unreachable!("cached") })
                .await
                .unwrap();
            assert_eq!(got.id, 918_273);
        }
    })
    .await
}

/// [`memoize_hits`] from a tokio multi-thread runtime of two workers (`#[tokio::main]`'s
/// kind), through a client of its own (a direct connection's task runs on the runtime that
/// opened it), where the client does not poll for its replies.
async fn multi_thread_memoize_hits(url: String, duration: Duration) -> Sample {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = Client::connect(url).await.unwrap();
            let handle = client.function("bench", "profile", Ttl::HOUR);
            let sample = memoize_hits(handle, duration).await;
            assert_eq!(
                client.metrics().polled_gets,
                0,
                "polled on a multi-thread runtime"
            );
            sample
        })
    })
    .await
    .unwrap()
}

/// Hits timed in batches: a near-cache hit takes about a microsecond, below the
/// microsecond clock `load` records one operation with.
const NEAR_BATCH: u64 = 100;

/// One caller's memoize hits from the near cache through `handle` for `duration`, timed per
/// batch of [`NEAR_BATCH`]; the percentiles are per hit (a batch's time divided by its size).
async fn near_hits(handle: cache_money::Function, duration: Duration) -> Sample {
    let started = Instant::now();
    let mut per_hit_ns = Vec::new();
    while started.elapsed() < duration {
        let t = Instant::now();
        for _ in 0..NEAR_BATCH {
            let got: Profile = handle
                .memoize(&(1u64,), || async { unreachable!("cached") })
                .await
                .unwrap();
            assert_eq!(got.id, 918_273);
        }
        per_hit_ns.push((t.elapsed().as_nanos() / u128::from(NEAR_BATCH)) as u32);
    }
    let elapsed = started.elapsed();
    let hits = per_hit_ns.len() as u64 * NEAR_BATCH;
    let mut sample = sample(per_hit_ns, hits, elapsed);
    sample.p50_us /= 1000.0;
    sample.p99_us /= 1000.0;
    sample
}

/// The bench process's RSS growth, in bytes, over three passes of `count` memoize calls of
/// new arguments from `first` on through `handle` (computed and written, then read back, then
/// read again): with a near cache, the second pass copies each entry and the third hits it.
async fn rss_growth(handle: &cache_money::Function, first: u64, count: u64) -> u64 {
    let before = rss_kib(std::process::id());
    for pass in 0..3 {
        for n in first..first + count {
            let got: Profile = handle.memoize(&(n,), || async { profile() }).await.unwrap();
            assert_eq!(got.id, 918_273, "pass {pass}");
        }
    }
    rss_kib(std::process::id()).saturating_sub(before) * 1024
}

/// The near cache's memory per copy: the bench process's RSS growth over [`rss_growth`] with
/// `handle`'s near cache, less the same calls' growth through `control` (the same service,
/// no near cache: what the calls cost whatever keeps their answers), per copy made. Returns
/// that, the growth with the near cache per copy, and the copies made.
async fn near_footprint(
    cm: &Client,
    handle: &cache_money::Function,
    control: &cache_money::Function,
    count: u64,
) -> (f64, f64, u64) {
    // The control first, so what both pay once (buffers, tables) lands on it.
    let plain = rss_growth(control, 2_000_000, count).await;
    let hits_before = cm.metrics().near_hits;
    let near = rss_growth(handle, 1_000_000, count).await;
    let copied = (cm.metrics().near_hits - hits_before).max(1);
    let per = |bytes: u64| bytes as f64 / copied as f64;
    (per(near.saturating_sub(plain)), per(near), copied)
}

/// A scenario's medians on both sides.
struct Row {
    name: &'static str,
    reference: &'static str,
    cm: Vec<Sample>,
    reference_samples: Vec<Sample>,
}

impl Row {
    fn new(name: &'static str, reference: &'static str) -> Self {
        Row {
            name,
            reference,
            cm: Vec::new(),
            reference_samples: Vec::new(),
        }
    }

    fn medians(samples: &[Sample]) -> Sample {
        Sample {
            per_second: median(samples.iter().map(|s| s.per_second).collect()),
            p50_us: median(samples.iter().map(|s| s.p50_us).collect()),
            p99_us: median(samples.iter().map(|s| s.p99_us).collect()),
        }
    }

    fn render(&self, out: &mut String) {
        let cm = Self::medians(&self.cm);
        let reference = Self::medians(&self.reference_samples);
        let shown = |value: f64, unit: &str| {
            if value.is_nan() {
                "–".to_owned()
            } else if value < 10.0 {
                format!("{value:.2}{unit}")
            } else {
                format!("{value:.0}{unit}")
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.name,
            shown(cm.per_second, "/s"),
            shown(cm.p50_us, " µs"),
            shown(cm.p99_us, " µs"),
            self.reference,
            shown(reference.per_second, "/s"),
            shown(reference.p50_us, " µs"),
            shown(reference.p99_us, " µs"),
            ratio(cm.per_second / reference.per_second),
            ratio(cm.p50_us / reference.p50_us),
            ratio(cm.p99_us / reference.p99_us),
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let settings = Settings::from_args();
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--max-batch", "1000"]);
    let server_pid = server.pid();
    let clients = channels(&server).await;
    // Fixtures and administration go over a plain tonic channel.
    let mut raw = CacheMoneyClient::new(server.channel().await);
    let mut conn: MultiplexedConnection = redis.connect().await;
    let duration = settings.duration();

    // Fixtures: one 64-byte entry on each side, the memoize value, the batch keys.
    let value64 = vec![b'x'; 64];
    raw.put(common::put(key("bench", "get", 0), &value64, 3600))
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("key:__rand_int__")
        .arg(&value64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let cm = Client::connect(server.url()).await.unwrap();
    let memo = cm.function("bench", "profile", Ttl::HOUR);
    let stored: Profile = memo
        .memoize(&(1u64,), || async { profile() })
        .await
        .unwrap();
    let encoded = serde_json::to_vec(&stored).unwrap();
    let _: () = redis::cmd("SET")
        .arg("ref:profile")
        .arg(&encoded)
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = (0..BATCH as u64)
        .map(|n| common::put(key("bench", "batch", n), &value64, 3600))
        .collect();
    raw.put_many(pb::PutManyRequest { entries }).await.unwrap();

    let h2load = Command::new("h2load").arg("--version").output().is_ok();
    let mut rows = [
        Row::new(
            "Get hit, 64 B, 50 callers",
            "redis-benchmark GET -c 50 -P 1",
        ),
        Row::new("Get hit, 64 B, 1 caller", "redis-benchmark GET -c 1"),
        Row::new("memoize hit, 1 caller", "redis-rs GET + JSON decode"),
        Row::new("memoize miss, 1 caller", "redis-rs GET + SET EX"),
        Row::new(
            "GetMany(100), 8 callers (keys/s)",
            "100 × Get, 8 callers (keys/s)",
        ),
        Row::new(
            "Get hit, 64 B, ~50 streams from h2load",
            "redis-benchmark GET -c 50 -P 1",
        ),
        Row::new(
            "Get hit, 64 B, 50 callers, metrics on",
            "the same, metrics off",
        ),
        Row::new(
            "control: Get hit, 50 callers, a second server with metrics off",
            "the same, the first server",
        ),
        Row::new(
            "memoize hit, 1 caller",
            "the original Python library's @cached hit (cache-money 1.3.0)",
        ),
        Row::new(
            "Get hit, 64 B, 1 caller, in-memory store (the gRPC hop alone)",
            "redis-benchmark GET -c 1",
        ),
        Row::new(
            "the server's lookup: redis-rs GET + PTTL in one pipeline, 1 caller",
            "redis-rs GET, 1 caller",
        ),
        Row::new(
            "memoize hit, 1 caller, leases on (the default)",
            "the same, leases off (lease(Duration::ZERO))",
        ),
        Row::new(
            "memoize hit from the near cache, 1 caller",
            "memoize hit through the service, 1 caller",
        ),
        Row::new(
            "memoize hit from the near cache, 1 caller",
            "the original Python library's @cached hit (cache-money 1.3.0)",
        ),
        Row::new(
            "memoize hit, 1 caller (the client polls for its reply, the default)",
            "the same, busy_poll off",
        ),
        Row::new(
            "memoize hit, 1 caller, on a multi-thread runtime (2 workers: no polling)",
            "the original Python library's @cached hit (cache-money 1.3.0)",
        ),
    ];
    // For `memo-hit`: the same hits through a client that does not poll for its replies.
    let not_polling = if settings.wants("memo-hit") {
        let options = ClientOptions {
            busy_poll: Duration::ZERO,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(server.url(), options).await.unwrap();
        let handle = client.function("bench", "profile", Ttl::HOUR);
        Some((client, handle))
    } else {
        None
    };
    // For `near`: a client with a near cache, its copy of the profile made before measuring.
    let near = if settings.wants("near") {
        let options = ClientOptions {
            near_cache_bytes: 256 << 20,
            ..ClientOptions::default()
        };
        let near_cm = Client::connect_with(server.url(), options).await.unwrap();
        let handle = near_cm.function("bench", "profile", Ttl::HOUR);
        let copied = Instant::now();
        while near_cm.metrics().near_hits == 0 {
            assert!(
                copied.elapsed() < Duration::from_secs(10),
                "no near hit within 10 s: {:?}",
                near_cm.metrics()
            );
            let _: Profile = handle
                .memoize(&(1u64,), || async { profile() })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some((near_cm, handle))
    } else {
        None
    };
    // For `hops`: a server with metrics on, whose store command histogram times its own Redis
    // hop (sum / count: the mean, finer than any bucket), and one on the in-memory store.
    let hop_servers = if settings.wants("hops") {
        let metered = CacheServer::redis(&redis, &["--metrics-listen", "127.0.0.1:0"]);
        let metered_client = Client::connect(metered.url()).await.unwrap();
        let (memory, memory_client) = memory_with_fixture(&value64).await;
        Some((metered, metered_client, memory, memory_client))
    } else {
        None
    };
    // Per repetition: [redis-benchmark -c 1 mean, the server's Redis hop mean], µs.
    let mut hops = Vec::new();
    // For `floor`: the stand-in servers and cache-money's two stores, each with a client, in
    // FLOOR_SERVERS' order.
    let floor_targets = if settings.wants("floor") {
        let (memory, _) = memory_with_fixture(&value64).await;
        let addrs = [
            floor::start(None),
            floor::start_tonic(),
            floor::start(Some(redis.port())),
            memory.addr(),
            server.addr(),
        ];
        let mut targets = Vec::new();
        for addr in addrs {
            let client = Client::connect(format!("http://{addr}")).await.unwrap();
            targets.push((addr, client));
        }
        Some((memory, targets))
    } else {
        None
    };
    let mut floors: Vec<FloorRun> = Vec::new();
    // The library cache-money replaces, timed by its own script (benches/python_hit.py).
    let python = if settings.wants("memo-hit") || settings.wants("near") {
        python_reference(settings.quick)
    } else {
        None
    };
    // A second server in front of the same Redis, with metrics on, for get50-metrics.
    let metered = if settings.wants("get50-metrics") {
        let server = CacheServer::redis(
            &redis,
            &["--max-batch", "1000", "--metrics-listen", "127.0.0.1:0"],
        );
        let clients = channels(&server).await;
        // The control: a second server just like the first (metrics off), measured the same
        // way. How far its ratio to the first strays from 1 is the noise floor of the
        // metrics row: a difference smaller than that is not a measured cost.
        let control = CacheServer::redis(&redis, &["--max-batch", "1000"]);
        let control_clients = channels(&control).await;
        Some((server, clients, control, control_clients))
    } else {
        None
    };
    // The bench process's CPU µs per memoize hit, [polling on, off], per repetition.
    let mut memo_cpu = Vec::new();
    // CPU µs per Get of the server, metrics [off, on, the control], per repetition.
    let mut metrics_cpu = Vec::new();
    // Calibrate redis-benchmark's request counts to the measurement time.
    let rps50 = redis_get(redis.port(), "50", "20000").per_second;
    let rps1 = redis_get(redis.port(), "1", "5000").per_second;

    // CPU µs per request in the 50-caller scenario, per repetition:
    // [redis-server, redis-benchmark] and [cache-money-server, redis-server, load generator].
    let (mut reference_cpu, mut cm_cpu) = (Vec::new(), Vec::new());
    for rep in 0..settings.reps {
        eprintln!("repetition {}/{}", rep + 1, settings.reps);
        // Interleaved: reference, then cache-money, for every scenario in each repetition.
        if settings.wants("get50") {
            let requests = requests_for(rps50, duration);
            let before = CpuTicks::now(server_pid, redis.pid());
            let reference = redis_get(redis.port(), "50", &requests);
            let after = CpuTicks::now(server_pid, redis.pid());
            let [_, redis_us, _, benchmark_us] =
                after.per_request_us(&before, requests.parse().unwrap_or(1.0));
            reference_cpu.push([redis_us, benchmark_us]);
            rows[0].reference_samples.push(reference);
            let (measured, cpu) = get50(&clients, duration, server_pid, redis.pid()).await;
            cm_cpu.push(cpu);
            rows[0].cm.push(measured);
        }

        if let Some((metered, metered_clients, control, control_clients)) = &metered {
            // Rotating which goes first, so drift on the shared machine favours none.
            let mut order = [0, 1, 2];
            order.rotate_left(rep % 3);
            let mut measured = [None, None, None];
            for which in order {
                let (clients, pid) = match which {
                    0 => (&clients, server_pid),
                    1 => (metered_clients, metered.pid()),
                    _ => (control_clients, control.pid()),
                };
                measured[which] = Some(get50(clients, duration, pid, redis.pid()).await);
            }
            let [
                Some((off, [off_us, ..])),
                Some((on, [on_us, ..])),
                Some((second, [second_us, ..])),
            ] = measured
            else {
                unreachable!("each of the three servers was measured")
            };
            rows[6].reference_samples.push(off);
            rows[6].cm.push(on);
            rows[7].reference_samples.push(off);
            rows[7].cm.push(second);
            metrics_cpu.push([off_us, on_us, second_us]);
        }

        if h2load && settings.wants("h2load") {
            let reference = redis_get(redis.port(), "50", &requests_for(rps50, duration));
            if let Some(sample) = h2load_get(server.addr(), CONNECTIONS, 13, duration) {
                rows[5].reference_samples.push(reference);
                rows[5].cm.push(sample);
            }
        }

        if settings.wants("get1") {
            rows[1].reference_samples.push(redis_get(
                redis.port(),
                "1",
                &requests_for(rps1, duration),
            ));
            rows[1]
                .cm
                .push(one_caller_gets(&clients[0], duration).await);
        }

        if let Some((metered, metered_client, _, memory_client)) = &hop_servers {
            let reference = redis_get(redis.port(), "1", &requests_for(rps1, duration));
            let get_hop = || {
                let page = common::http_get(metered.metrics_addr(), "/metrics", &[]).body;
                let of = |series: &str| {
                    scraped(
                        &page,
                        &format!("cache_money_store_command_duration_seconds_{series}{{command=\"GET\"}} "),
                    )
                    .unwrap_or(0.0)
                };
                (of("sum"), of("count"))
            };
            let (sum_before, count_before) = get_hop();
            one_caller_gets(metered_client, duration).await;
            let (sum_after, count_after) = get_hop();
            let hop_us = (sum_after - sum_before) / (count_after - count_before) * 1e6;
            hops.push([1e6 / reference.per_second, hop_us]);
            rows[9].reference_samples.push(reference);
            rows[9]
                .cm
                .push(one_caller_gets(memory_client, duration).await);
        }

        if let Some((_, targets)) = &floor_targets {
            let reference = redis_get(redis.port(), "1", &requests_for(rps1, duration));
            let mut measured = [[f64::NAN; 2]; FLOOR_SERVERS.len()];
            for ((addr, client), row) in targets.iter().zip(&mut measured) {
                if h2load {
                    let sample = h2load_get(*addr, 1, 1, duration).expect("h2load measured");
                    row[0] = 1e6 / sample.per_second;
                }
                row[1] = one_caller_gets(client, duration).await.p50_us;
            }
            floors.push(([1e6 / reference.per_second, reference.p50_us], measured));
        }

        if settings.wants("lookup") {
            // What a Get costs the server's Redis hop since leases: the value's PTTL rides in
            // the same pipeline as its GET. Both sides on one multiplexed connection.
            let reference_conn = conn.clone();
            rows[10].reference_samples.push(
                load(1, duration, 1, move |_, _| {
                    let mut conn = reference_conn.clone();
                    async move {
                        let bytes: Option<Vec<u8>> = redis::cmd("GET")
                            .arg("key:__rand_int__")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        assert!(bytes.is_some());
                    }
                })
                .await,
            );
            let measured_conn = conn.clone();
            rows[10].cm.push(
                load(1, duration, 1, move |_, _| {
                    let mut conn = measured_conn.clone();
                    async move {
                        let (bytes, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
                            .cmd("GET")
                            .arg("key:__rand_int__")
                            .cmd("PTTL")
                            .arg("key:__rand_int__")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        assert!(bytes.is_some() && pttl == -1);
                    }
                })
                .await,
            );
        }

        if settings.wants("memo-lease") {
            // The cost of leases on a hit: the same handle with leases off is the reference.
            rows[11]
                .reference_samples
                .push(memoize_hits(memo.clone().lease(Duration::ZERO), duration).await);
            rows[11].cm.push(memoize_hits(memo.clone(), duration).await);
        }

        if let Some((_, handle)) = &near {
            let remote = memoize_hits(memo.clone(), duration).await;
            let local = near_hits(handle.clone(), duration).await;
            rows[12].reference_samples.push(remote);
            rows[12].cm.push(local);
            if let Some(python) = &python {
                rows[13].cm.push(local);
                rows[13]
                    .reference_samples
                    .push(python_hit(python, redis.port(), duration));
            }
        }

        if settings.wants("memo-hit") {
            let reference_conn = conn.clone();
            rows[2].reference_samples.push(
                load(1, duration, 1, move |_, _| {
                    let mut conn = reference_conn.clone();
                    async move {
                        let bytes: Vec<u8> = redis::cmd("GET")
                            .arg("ref:profile")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        let decoded: Profile = serde_json::from_slice(&bytes).unwrap();
                        assert_eq!(decoded.id, 918_273);
                    }
                })
                .await,
            );
            // Polling on (the default) and off, in turns (odd repetitions start with off),
            // each with the bench process's CPU per hit.
            let (mut measured, mut off) = (None, None);
            for polling in [rep % 2 == 0, rep % 2 == 1] {
                let handle = match (polling, &not_polling) {
                    (true, _) => memo.clone(),
                    (false, Some((_, handle))) => handle.clone(),
                    (false, None) => continue,
                };
                let before = proc_ticks("self").0;
                let sample = memoize_hits(handle, duration).await;
                // USER_HZ ticks of 10 ms, over the hits.
                let cpu_us = (proc_ticks("self").0 - before) as f64 * 10_000.0
                    / (sample.per_second * duration.as_secs_f64()).max(1.0);
                match polling {
                    true => measured = Some((sample, cpu_us)),
                    false => off = Some((sample, cpu_us)),
                }
            }
            let (measured, polling_cpu) = measured.expect("measured with polling");
            rows[2].cm.push(measured);
            if let Some((sample, cpu_us)) = off {
                rows[14].cm.push(measured);
                rows[14].reference_samples.push(sample);
                memo_cpu.push([polling_cpu, cpu_us]);
            }
            // The same hits against the library they replace, measured right after them.
            if let Some(python) = &python {
                let multi_thread = multi_thread_memoize_hits(server.url(), duration).await;
                let reference = python_hit(python, redis.port(), duration);
                rows[8].cm.push(measured);
                rows[8].reference_samples.push(reference);
                rows[15].cm.push(multi_thread);
                rows[15].reference_samples.push(reference);
            }
        }

        if settings.wants("memo-miss") {
            let reference_conn = conn.clone();
            rows[3].reference_samples.push(
                load(1, duration, 1, move |_, n| {
                    let mut conn = reference_conn.clone();
                    async move {
                        let key = format!("ref:miss:{rep}:{n}");
                        let found: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        assert!(found.is_none());
                        let encoded = serde_json::to_vec(&profile()).unwrap();
                        let _: () = redis::cmd("SET")
                            .arg(&key)
                            .arg(encoded)
                            .arg("EX")
                            .arg(3600)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                })
                .await,
            );
            let miss = cm.function("bench", &format!("miss{rep}"), Ttl::HOUR);
            rows[3].cm.push(
                load(1, duration, 1, move |_, n| {
                    let miss = miss.clone();
                    async move {
                        let got: Profile =
                            miss.memoize(&(n,), || async { profile() }).await.unwrap();
                        assert_eq!(got.id, 918_273);
                    }
                })
                .await,
            );
        }

        if settings.wants("batch") {
            let pool = clients.clone();
            rows[4].reference_samples.push(
                load(BATCH_CALLERS, duration, 1, move |caller, n| {
                    let client = pool[caller % CONNECTIONS].clone();
                    async move {
                        let request = pb::GetRequest {
                            key: Some(key("bench", "batch", n % BATCH as u64)),
                            ..Default::default()
                        };
                        // The stub's Get, as GetMany's: the row compares the two RPCs.
                        let reply = client.raw().get(request).await.unwrap();
                        assert!(reply.into_inner().hit);
                    }
                })
                .await,
            );
            let pool = clients.clone();
            rows[4].cm.push(
                load(BATCH_CALLERS, duration, BATCH as u64, move |caller, _| {
                    let client = pool[caller % CONNECTIONS].clone();
                    async move {
                        let keys = (0..BATCH as u64)
                            .map(|n| key("bench", "batch", n))
                            .collect();
                        let reply = client
                            .raw()
                            .get_many(pb::GetManyRequest { keys })
                            .await
                            .unwrap()
                            .into_inner();
                        assert!(reply.results.iter().all(|result| result.hit));
                    }
                })
                .await,
            );
        }
    }

    let mut report = String::new();
    // The scenarios' table, when any of its rows was measured (`--only floor` fills none).
    if rows.iter().any(|row| !row.cm.is_empty()) {
        let _ = writeln!(
            report,
            "\n| scenario | cache-money | p50 | p99 | reference | reference | p50 | p99 | throughput ratio | p50 ratio | p99 ratio |"
        );
        let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for row in rows.iter().filter(|row| !row.cm.is_empty()) {
        row.render(&mut report);
    }
    if !cm_cpu.is_empty() {
        let column = |rows: &[[f64; 3]], n: usize| median(rows.iter().map(|row| row[n]).collect());
        let reference =
            |n: usize| median(reference_cpu.iter().map(|row: &[f64; 2]| row[n]).collect());
        let _ = writeln!(
            report,
            "\nCPU per Get at 50 callers (medians): cache-money-server {:.1} µs + redis-server {:.1} µs + load generator {:.1} µs; reference: redis-server {:.1} µs + redis-benchmark {:.1} µs",
            column(&cm_cpu, 0),
            column(&cm_cpu, 1),
            column(&cm_cpu, 2),
            reference(0),
            reference(1),
        );
    }
    if let Some((metered, ..)) = &metered {
        let page = common::http_get(metered.metrics_addr(), "/metrics", &[]).body;
        let counted = scraped(&page, "cache_money_rpcs_total{method=\"Get\",code=\"OK\"} ")
            .expect("the metered server counted its Gets");
        let column = |n: usize| median(metrics_cpu.iter().map(|cpu: &[f64; 3]| cpu[n]).collect());
        let (off, on, second) = (column(0), column(1), column(2));
        // The fair comparison: the metered server against the control, two servers started
        // the same way after the first (which this machine tends to favour).
        let per_second = |row: &Row| Row::medians(&row.cm).per_second;
        let _ = writeln!(
            report,
            "\nMetrics on against the control (both second servers): Gets/s {:.2}×, server CPU per Get {:+.1} %",
            per_second(&rows[6]) / per_second(&rows[7]),
            (on / second - 1.0) * 100.0,
        );
        let _ = writeln!(
            report,
            "\nCPU per Get at 50 callers (medians): cache-money-server metrics off {off:.1} µs, on {on:.1} µs ({:+.1} %); the control server (off) {second:.1} µs ({:+.1} %); the metered server counted {counted} Gets",
            (on / off - 1.0) * 100.0,
            (second / off - 1.0) * 100.0,
        );
    }
    if !memo_cpu.is_empty() {
        let column = |n: usize| median(memo_cpu.iter().map(|cpu: &[f64; 2]| cpu[n]).collect());
        let _ = writeln!(
            report,
            "\nThe caller's CPU per memoize hit (the bench process, medians): polling {:.1} µs, not polling {:.1} µs",
            column(0),
            column(1),
        );
    }
    if settings.wants("memo-hit") {
        let metrics = cm.metrics();
        let _ = writeln!(
            report,
            "\nThe measuring client's polling caught {} replies of its {} lookups and stores (ClientMetrics::polled_gets, rpc_attempts)",
            metrics.polled_gets, metrics.rpc_attempts,
        );
    }
    if !hops.is_empty() {
        let column = |n: usize| median(hops.iter().map(|hop: &[f64; 2]| hop[n]).collect());
        let (reference, hop) = (column(0), column(1));
        let _ = writeln!(
            report,
            "\nThe server's own Redis hop at one caller (store GET, mean from its histogram's sum and count; medians): {hop:.1} µs; redis-benchmark GET -c 1 mean {reference:.1} µs; ratio {:.2}×",
            hop / reference
        );
    }
    if !floors.is_empty() {
        floor_table(&floors, &mut report);
    }
    if let Some((near_cm, handle)) = &near {
        let count = if settings.quick { 2_000 } else { 20_000 };
        let control = cm.function("bench", "profile_control", Ttl::HOUR);
        let (bytes, gross, copied) = near_footprint(near_cm, handle, &control, count).await;
        let _ = writeln!(
            report,
            "\nNear cache memory: {bytes:.0} bytes of the bench process's RSS per copy ({gross:.0} gross, less the same calls' growth without a near cache; {copied} copies of a {}-byte JSON profile, keys of a 5-byte namespace, 7-byte function and 32-byte digest)",
            serde_json::to_vec(&profile()).unwrap().len(),
        );
    }
    if !h2load {
        let _ = writeln!(
            report,
            "(h2load not installed: apt-get install nghttp2-client adds its cross-check row)"
        );
    }

    if settings.wants("bust") {
        eprintln!("bust: filling {} entries", settings.bust_entries);
        fill(&mut conn, "bench", "big", settings.bust_entries).await;
        fill(&mut conn, "bench", "big_sibling", 1000).await;
        bust("one Redis", &settings, &clients, &mut raw, &mut report).await;
    }
    if settings.cluster {
        cluster_bust(&settings, &mut report).await;
    }
    if settings.wants("footprint") {
        footprint(&settings, &clients, server_pid, &mut report).await;
    }
    let _ = writeln!(
        report,
        "\n{} repetitions of {:.1} s each, interleaved, medians{}.",
        settings.reps,
        settings.seconds,
        if settings.quick {
            " (--quick: too short to quote)"
        } else {
            ""
        }
    );
    println!("{report}");
}

/// The bust on a Redis Cluster: its own cluster and server, the entries written straight into
/// the primaries their slots name.
async fn cluster_bust(settings: &Settings, report: &mut String) {
    let cluster = RedisCluster::start(5_000);
    let server = CacheServer::cluster(&cluster, &["--max-batch", "1000"]);
    let clients = channels(&server).await;
    let mut raw = CacheMoneyClient::new(server.channel().await);
    raw.put(common::put(key("bench", "get", 0), &[b'x'; 64], 3600))
        .await
        .unwrap();
    eprintln!("bust (cluster): filling {} entries", settings.bust_entries);
    for (function, count) in [("big", settings.bust_entries), ("big_sibling", 1000)] {
        let keys: Vec<Vec<u8>> = (0..count)
            .map(|n| format!("cm:bench:{function}:{}", digest(n)).into_bytes())
            .collect();
        cluster.set_keys(&keys, b"v").await;
    }
    // The 50-caller Get on the cluster beside redis-benchmark --cluster against the same
    // cluster, interleaved, before the bust.
    let mut row = Row::new(
        "Get hit, 64 B, 50 callers, Redis Cluster",
        "redis-benchmark --cluster GET -c 50 -P 1",
    );
    let seed = cluster.ports()[0];
    let duration = settings.duration();
    // redis-benchmark's GET reads the key its SET writes: a 64-byte hit, as ours.
    redis_benchmark(
        seed,
        &["--cluster", "-t", "set", "-d", "64", "-c", "1", "-n", "100"],
    );
    let reference = |requests: &str| {
        redis_benchmark(
            seed,
            &[
                "--cluster",
                "-t",
                "get",
                "-d",
                "64",
                "-c",
                "50",
                "-P",
                "1",
                "-n",
                requests,
            ],
        )
    };
    // Calibrated once, as the single-Redis scenarios are, to the measurement time.
    let calibration = reference("20000").per_second;
    for _ in 0..settings.reps {
        row.reference_samples
            .push(reference(&requests_for(calibration, duration)));
        let pool = clients.clone();
        let request = fixture_request();
        row.cm.push(
            load(CONCURRENCY, duration, 1, move |caller, _| {
                let (client, request) = (pool[caller % CONNECTIONS].clone(), request.clone());
                async move {
                    get_fixture(&client, request).await;
                }
            })
            .await,
        );
    }
    let _ = writeln!(
        report,
        "\nOn the Redis Cluster (seed port {seed}):\n\n| scenario | cache-money | p50 | p99 | reference | reference | p50 | p99 | throughput ratio | p50 ratio | p99 ratio |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    row.render(report);
    let label = "Redis Cluster, 3 primaries";
    bust(label, settings, &clients, &mut raw, report).await;
}

/// Bust: one function of N entries (already written) removed while other callers keep
/// reading.
async fn bust(
    store: &str,
    settings: &Settings,
    clients: &[Client],
    raw: &mut CacheMoneyClient<Channel>,
    report: &mut String,
) {
    let reading = Arc::new(AtomicBool::new(true));
    let mut readers = Vec::new();
    for caller in 0..8 {
        let (client, reading) = (clients[caller % CONNECTIONS].clone(), reading.clone());
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Bounded: stops when the bust ends, or after 10 minutes at the very most.
            let give_up = Instant::now() + Duration::from_secs(600);
            while reading.load(Relaxed) && Instant::now() < give_up {
                let t = Instant::now();
                let _ = client
                    .raw_get(pb::GetRequest {
                        key: Some(key("bench", "get", 0)),
                        ..Default::default()
                    })
                    .await;
                latencies.push(t.elapsed().as_micros() as u32);
            }
            latencies
        }));
    }
    let started = Instant::now();
    let removed = common::bust_function(raw, "bench", "big").await;
    let bust_seconds = started.elapsed().as_secs_f64();
    reading.store(false, Relaxed);
    let mut during = Vec::new();
    for reader in readers {
        during.extend(reader.await.unwrap());
    }
    let during = sample(during, 0, Duration::from_secs(1));
    let sibling = raw
        .keys(pb::KeysRequest {
            namespace: "bench".into(),
            function: "big_sibling".into(),
            cursor: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let siblings_left = count_siblings(raw, sibling).await;
    let _ = writeln!(
        report,
        "\nBustFunction of {} entries ({store}): removed {removed} in {bust_seconds:.2} s; concurrent Get p50 {:.0} µs, p99 {:.0} µs; other function's entries left: {siblings_left} of 1000",
        settings.bust_entries, during.p50_us, during.p99_us
    );
    assert_eq!(
        removed, settings.bust_entries,
        "the bust removed the wrong number of entries\n{report}"
    );
    assert_eq!(
        siblings_left, 1000,
        "the bust touched another function's entries\n{report}"
    );
}

/// Footprint: server RSS under the 50-caller load, at the start and after a while.
async fn footprint(settings: &Settings, clients: &[Client], server_pid: u32, report: &mut String) {
    let pool = clients.to_vec();
    let footprint = Duration::from_secs(settings.footprint_seconds);
    let early = Arc::new(std::sync::Mutex::new(0u64));
    let early_probe = early.clone();
    let probe = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1).min(footprint / 2)).await;
        *early_probe.lock().unwrap() = rss_kib(server_pid);
    });
    load(CONCURRENCY, footprint, 1, move |caller, _| {
        let client = pool[caller % CONNECTIONS].clone();
        async move {
            let _ = client
                .raw_get(pb::GetRequest {
                    key: Some(key("bench", "get", 0)),
                    ..Default::default()
                })
                .await;
        }
    })
    .await;
    probe.await.unwrap();
    let (early, late) = (*early.lock().unwrap(), rss_kib(server_pid));
    let _ = writeln!(
        report,
        "Server RSS under 50 callers: {:.1} MiB after 1 s, {:.1} MiB after {} s ({:+.1}%)",
        early as f64 / 1024.0,
        late as f64 / 1024.0,
        settings.footprint_seconds,
        (late as f64 / early.max(1) as f64 - 1.0) * 100.0
    );
}

async fn fill(conn: &mut MultiplexedConnection, namespace: &str, function: &str, count: u64) {
    let mut n = 0;
    while n < count {
        let mut pipe = redis::pipe();
        for i in n..(n + 10_000).min(count) {
            pipe.cmd("SET")
                .arg(format!("cm:{namespace}:{function}:{}", digest(i)))
                .arg("v")
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        pipe.query_async::<()>(conn).await.expect("fill");
        n += 10_000;
    }
}

async fn count_siblings(raw: &mut CacheMoneyClient<Channel>, first: pb::KeysResponse) -> usize {
    let mut count = first.entries.len();
    let mut cursor = first.next_cursor;
    while !cursor.is_empty() {
        let page = raw
            .keys(pb::KeysRequest {
                namespace: "bench".into(),
                function: "big_sibling".into(),
                cursor,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        count += page.entries.len();
        cursor = page.next_cursor;
    }
    count
}
