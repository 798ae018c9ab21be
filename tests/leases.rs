//! One computation per key across the fleet (issue #12): leases, stale-while-revalidate and
//! stale-if-error, end to end against the real server over one Redis (and, where cheap, the
//! in-memory store and a Redis Cluster).
//!
//! A fleet is made of real OS processes: this test binary runs itself again (`--exact
//! fleet_child`), once per member, with the member's role in its environment. Every member
//! connects, says `READY`, and waits on standard input, so that all of them start calling at
//! once when the parent writes `go`; each prints one `REPORT` line (JSON) that the parent
//! adds up.

mod common;

use std::{
    collections::BTreeSet,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use cache_money::{Client, ClientOptions, Error, Function, pb};
use common::{CacheServer, RedisCluster, RedisServer, unique_prefix};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::{Mutex, mpsc, oneshot},
};

/// The environment variable that makes `fleet_child` a fleet member; its value is the role.
const ROLE: &str = "CM_FLEET_ROLE";
/// What a fleet member prints before its report's JSON.
const REPORT: &str = "CMFLEET REPORT ";
/// The arguments every call of the fleet tests is keyed by.
const ARGS: (&str,) = ("hot",);
/// Fleets are started one at a time: two at once on a 2-core machine would measure the
/// machine, not the leases.
static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Client options of the fleet: a lookup deadline far above what 20 processes starting at
/// once on two cores can cost a lookup, so that a slow answer (which memoize rightly treats as
/// a down service, and computes) does not pass for a lease failure.
fn options(deadline: Duration) -> ClientOptions {
    ClientOptions {
        deadline,
        breaker_threshold: 1000,
        ..ClientOptions::default()
    }
}

fn now_us() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970");
    u64::try_from(since.as_micros()).expect("microseconds fit u64")
}

/// One call made by a fleet member.
#[derive(Debug, Serialize, Deserialize)]
struct Call {
    value: String,
    started_us: u64,
    finished_us: u64,
}

impl Call {
    fn took(&self) -> Duration {
        Duration::from_micros(self.finished_us - self.started_us)
    }
}

/// What a fleet member did.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    pid: u32,
    /// How many times the function ran in this process.
    computed: u64,
    calls: Vec<Call>,
    leases_won: u64,
    lease_waits: u64,
    lease_wait_timeouts: u64,
    refreshes: u64,
}

/// A member's settings, passed in its environment.
#[derive(Debug, Clone)]
struct Member {
    role: &'static str,
    url: String,
    function: String,
    callers: usize,
    compute: Duration,
    /// `None`: the client's default lease.
    lease: Option<Duration>,
    refresh_after: Duration,
    deadline: Duration,
    /// For `until_changed`: the value callers see before the bust.
    seed: String,
}

impl Member {
    fn new(role: &'static str, server: &CacheServer, function: &str) -> Self {
        Member {
            role,
            url: server.url(),
            function: function.to_owned(),
            callers: 20,
            compute: Duration::from_millis(200),
            lease: None,
            refresh_after: Duration::ZERO,
            deadline: Duration::from_secs(1),
            seed: String::new(),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (ROLE, self.role.to_owned()),
            ("CM_FLEET_URL", self.url.clone()),
            ("CM_FLEET_FUNCTION", self.function.clone()),
            ("CM_FLEET_CALLERS", self.callers.to_string()),
            ("CM_FLEET_COMPUTE_MS", self.compute.as_millis().to_string()),
            (
                "CM_FLEET_REFRESH_AFTER_MS",
                self.refresh_after.as_millis().to_string(),
            ),
            (
                "CM_FLEET_DEADLINE_MS",
                self.deadline.as_millis().to_string(),
            ),
            ("CM_FLEET_SEED", self.seed.clone()),
        ];
        if let Some(lease) = self.lease {
            env.push(("CM_FLEET_LEASE_MS", lease.as_millis().to_string()));
        }
        env
    }
}

/// One running fleet member: its stdin (the barrier) and its stdout lines.
struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Process {
    async fn spawn(member: &Member) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
            .args([
                "--exact",
                "fleet_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .envs(member.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run the test binary as a fleet member");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            stdin,
            lines,
        }
    }

    /// Waits for a line with `marker` (the test harness may have printed `test fleet_child
    /// ... ` before it on the same line); returns what follows it.
    async fn line(&mut self, marker: &str) -> String {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if let Some(at) = line.find(marker) {
                    return line[at + marker.len()..].to_owned();
                }
            }
            panic!("fleet member ended without printing {marker:?}");
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("no {marker:?} from a fleet member within 30 s"))
    }

    async fn go(&mut self) {
        self.stdin.write_all(b"go\n").await.expect("write go");
        self.stdin.flush().await.expect("flush go");
    }

    async fn report(mut self) -> Report {
        let json = self.line(REPORT).await;
        let status = self.child.wait().await.expect("wait for the member");
        assert!(status.success(), "fleet member failed: {status}");
        serde_json::from_str(&json).expect("a report")
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// `n` members, all connected and waiting at the barrier.
async fn fleet(n: usize, member: &Member) -> Vec<Process> {
    let mut processes = Vec::with_capacity(n);
    for _ in 0..n {
        processes.push(Process::spawn(member).await);
    }
    for process in &mut processes {
        process.line("CMFLEET READY").await;
    }
    processes
}

/// Lets every member of `fleet` start at once.
async fn go(fleet: &mut [Process]) {
    for process in fleet {
        process.go().await;
    }
}

async fn reports(fleet: Vec<Process>) -> Vec<Report> {
    let mut reports = Vec::with_capacity(fleet.len());
    for process in fleet {
        reports.push(process.report().await);
    }
    reports
}

/// The handle every member (and the parent) uses for `member.function`.
fn handle(cm: &Client, member: &Member) -> Function {
    let mut function = cm.function("leases", &member.function, Duration::from_secs(60));
    if let Some(lease) = member.lease {
        function = function.lease(lease);
    }
    if !member.refresh_after.is_zero() {
        function = function.refresh_after(member.refresh_after);
    }
    function
}

fn env_ms(name: &str) -> Duration {
    let ms = std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    Duration::from_millis(ms.parse().expect("milliseconds"))
}

/// Not a test of its own: the body of one fleet member, started by the fleet tests below
/// with its role in `CM_FLEET_ROLE`; without it (a plain test run) it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let lease = std::env::var("CM_FLEET_LEASE_MS")
        .ok()
        .map(|ms| Duration::from_millis(ms.parse().expect("milliseconds")));
    let member = Member {
        role: "child",
        url: var("CM_FLEET_URL"),
        function: var("CM_FLEET_FUNCTION"),
        callers: var("CM_FLEET_CALLERS").parse().expect("callers"),
        compute: env_ms("CM_FLEET_COMPUTE_MS"),
        lease,
        refresh_after: env_ms("CM_FLEET_REFRESH_AFTER_MS"),
        deadline: env_ms("CM_FLEET_DEADLINE_MS"),
        seed: var("CM_FLEET_SEED"),
    };
    let cm = Client::connect_with(&member.url, options(member.deadline))
        .await
        .expect("connect");
    // Open the connection before the barrier, so the race is the calls', not the connects'.
    cm.raw()
        .stats(pb::StatsRequest {})
        .await
        .expect("the server answers");
    let function = handle(&cm, &member);
    println!("CMFLEET READY");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    stdin.next_line().await.expect("read the barrier");

    let computed = Arc::new(AtomicU64::new(0));
    let compute = {
        let computed = computed.clone();
        let pause = member.compute;
        move || async move {
            // Printed first, so a parent can kill this process mid-computation.
            println!("CMFLEET COMPUTING");
            tokio::time::sleep(pause).await;
            let n = computed.fetch_add(1, SeqCst);
            format!("{}-{n}", std::process::id())
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..member.callers {
        let (function, compute, seed) = (function.clone(), compute.clone(), member.seed.clone());
        let role = role.clone();
        tasks.spawn(async move {
            match role.as_str() {
                "detached" => {
                    let started_us = now_us();
                    let value: String = function.memoize_detached(&ARGS, compute).await.unwrap();
                    vec![Call {
                        value,
                        started_us,
                        finished_us: now_us(),
                    }]
                }
                "until_changed" => {
                    // Calls until the value is no longer the seed, at a modest pace.
                    let mut calls = Vec::new();
                    let give_up = Instant::now() + Duration::from_secs(15);
                    loop {
                        let started_us = now_us();
                        let value: String = function.memoize(&ARGS, compute.clone()).await.unwrap();
                        let changed = value != seed;
                        if calls.is_empty() {
                            println!("CMFLEET CALLING {value}");
                        }
                        calls.push(Call {
                            value,
                            started_us,
                            finished_us: now_us(),
                        });
                        if changed || Instant::now() > give_up {
                            return calls;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                _ => {
                    let started_us = now_us();
                    let value: String = function.memoize(&ARGS, compute).await.unwrap();
                    vec![Call {
                        value,
                        started_us,
                        finished_us: now_us(),
                    }]
                }
            }
        });
    }
    let mut calls: Vec<Call> = tasks.join_all().await.into_iter().flatten().collect();
    calls.sort_by_key(|call| call.finished_us);
    if role == "detached" && cm.metrics().refreshes > 0 {
        // The recomputation runs in a spawned task: stay until it wrote, or it dies with us.
        let raw = cm.raw();
        let key = pb::Key {
            namespace: "leases".into(),
            function: member.function.clone(),
            digest: function.digest(&ARGS).unwrap(),
        };
        let mine = format!("{}-", std::process::id());
        let wrote = common::eventually(Duration::from_secs(10), || {
            let (mut raw, key, mine) = (raw.clone(), key.clone(), mine.clone());
            async move {
                let reply = raw
                    .get(common::get_request(key))
                    .await
                    .unwrap()
                    .into_inner();
                reply.hit && String::from_utf8_lossy(&reply.value).contains(&mine)
            }
        })
        .await;
        assert!(wrote, "the detached recomputation never wrote");
    }
    let metrics = cm.metrics();
    let report = Report {
        pid: std::process::id(),
        computed: computed.load(SeqCst),
        calls,
        leases_won: metrics.leases_won,
        lease_waits: metrics.lease_waits,
        lease_wait_timeouts: metrics.lease_wait_timeouts,
        refreshes: metrics.refreshes,
    };
    println!("{REPORT}{}", serde_json::to_string(&report).unwrap());
}

fn total_computed(reports: &[Report]) -> u64 {
    reports.iter().map(|report| report.computed).sum()
}

fn values(reports: &[Report]) -> BTreeSet<&str> {
    reports
        .iter()
        .flat_map(|report| &report.calls)
        .map(|call| call.value.as_str())
        .collect()
}

/// Milliseconds, for printing.
fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// 20 processes × 20 concurrent `memoize` calls of one cold key whose function takes 200 ms:
/// the function runs once in the whole fleet, and every caller gets its value. Prints how
/// long the callers of other processes took to see the value after the winner had it.
#[tokio::test]
async fn a_cold_key_is_computed_once_across_twenty_processes() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    cold_key_stampede("redis", &server, 20, 20).await;
}

/// The same with 10 processes × 10 callers in memory and on a Redis Cluster.
#[tokio::test]
async fn a_cold_key_is_computed_once_in_memory_and_on_a_cluster() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let memory = CacheServer::memory(&[]);
    cold_key_stampede("memory", &memory, 10, 10).await;
    drop(memory);
    let cluster = RedisCluster::shared();
    let server = CacheServer::cluster(&cluster, &["--key-prefix", &unique_prefix("fleet")]);
    cold_key_stampede("cluster", &server, 10, 10).await;
}

/// Runs `processes` × `callers` calls of one cold key at once and checks it was computed
/// once, every caller got the value, and waiters saw it promptly after the write.
async fn cold_key_stampede(store: &str, server: &CacheServer, processes: usize, callers: usize) {
    let member = Member {
        callers,
        ..Member::new("stampede", server, "cold")
    };
    let mut fleet_processes = fleet(processes, &member).await;
    let started = Instant::now();
    go(&mut fleet_processes).await;
    let reports = reports(fleet_processes).await;
    let wall = started.elapsed();

    assert_eq!(
        total_computed(&reports),
        1,
        "{store}: computations: {reports:?}"
    );
    let values = values(&reports);
    assert_eq!(
        values.len(),
        1,
        "{store}: callers got different values: {values:?}"
    );
    assert_eq!(
        reports.iter().map(|r| r.calls.len()).sum::<usize>(),
        processes * callers
    );
    let winner = reports.iter().find(|r| r.computed == 1).expect("a winner");
    assert_eq!(winner.leases_won, 1);
    let waiters: Vec<&Report> = reports.iter().filter(|r| r.computed == 0).collect();
    assert!(
        waiters
            .iter()
            .all(|r| r.leases_won == 0 && r.lease_waits == 1),
        "{store}: each other process waited once and won nothing: {waiters:?}"
    );
    assert!(waiters.iter().all(|r| r.lease_wait_timeouts == 0));
    // The winner's callers return once its write was answered.
    let written_us = winner.calls.iter().map(|c| c.finished_us).min().unwrap();
    let mut after: Vec<i64> = waiters
        .iter()
        .flat_map(|r| &r.calls)
        .map(|c| c.finished_us as i64 - written_us as i64)
        .collect();
    after.sort();
    eprintln!(
        "{store}, leases on: 1 computation for {} callers in {processes} processes ({:.0} ms \
         wall); waiters returned {:.1} ms (median) / {:.1} ms (max) after the winner's write \
         was answered",
        processes * callers,
        ms(wall),
        after[after.len() / 2] as f64 / 1000.0,
        after[after.len() - 1] as f64 / 1000.0,
    );
    // A waiter looks again within 20 ms (the server's cap), stretched by at most a quarter.
    assert!(
        after[after.len() - 1] < 250_000,
        "{store}: a waiter took {} µs after the write",
        after[after.len() - 1]
    );
}

/// The same fleet with leases off (`lease(Duration::ZERO)`): every process that misses
/// computes. Prints the count (about 20) and asserts more than one, which is what leases
/// prevent.
#[tokio::test]
async fn without_leases_each_process_computes() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let member = Member {
        lease: Some(Duration::ZERO),
        ..Member::new("stampede", &server, "cold_unleased")
    };
    let mut processes = fleet(20, &member).await;
    go(&mut processes).await;
    let reports = reports(processes).await;
    let computed = total_computed(&reports);
    eprintln!("leases off: {computed} computations for 400 callers in 20 processes");
    assert!(computed > 1, "only {computed} computation without leases");
    assert!(
        reports
            .iter()
            .all(|r| r.leases_won == 0 && r.lease_waits == 0)
    );
}

/// 20 processes keep calling a cached key; a `BustFunction` lands while they do: the new
/// value is computed once in the whole fleet and every caller ends up with it.
#[tokio::test]
async fn a_busted_hot_key_is_recomputed_once_across_twenty_processes() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let member = Member {
        callers: 5,
        seed: "seed".to_owned(),
        ..Member::new("until_changed", &server, "busted")
    };
    let cm = Client::connect_with(server.url(), options(member.deadline))
        .await
        .unwrap();
    let function = handle(&cm, &member);
    let seed: String = function
        .memoize(&ARGS, || async { "seed".to_owned() })
        .await
        .unwrap();
    assert_eq!(seed, "seed");
    let mut processes = fleet(20, &member).await;
    go(&mut processes).await;
    for process in &mut processes {
        let first = process.line("CMFLEET CALLING ").await;
        assert_eq!(first, "seed", "a member did not see the cached value first");
    }
    assert_eq!(function.bust_all().await.unwrap(), 1);
    let reports = reports(processes).await;

    assert_eq!(total_computed(&reports), 1, "computations: {reports:?}");
    let last: BTreeSet<&str> = reports
        .iter()
        .flat_map(|r| r.calls.last())
        .map(|c| c.value.as_str())
        .collect();
    assert_eq!(
        last.len(),
        1,
        "callers ended with different values: {last:?}"
    );
    assert_ne!(last.first(), Some(&"seed"));
    let calls: usize = reports.iter().map(|r| r.calls.len()).sum();
    eprintln!("bust under load: 1 computation; {calls} calls in 20 processes");
}

/// The lease holder is SIGKILLed mid-computation (so it never writes nor releases): callers
/// in other processes wait, one of them computes once the 1 s lease has expired, and none
/// waits longer than the lease's lifetime plus the deadline (plus its own computation).
#[tokio::test]
async fn a_killed_lease_holder_is_replaced_after_the_lease_expires() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let lease = Duration::from_secs(1);
    let deadline = Duration::from_millis(250);
    let holder = Member {
        callers: 1,
        compute: Duration::from_secs(30),
        lease: Some(lease),
        deadline,
        ..Member::new("stampede", &server, "crash")
    };
    let mut doomed = fleet(1, &holder).await;
    go(&mut doomed).await;
    doomed[0].line("CMFLEET COMPUTING").await;
    let won_at = Instant::now();

    let member = Member {
        callers: 5,
        compute: Duration::from_millis(100),
        ..holder.clone()
    };
    let mut processes = fleet(4, &member).await;
    go(&mut processes).await;
    let pid = doomed[0].pid();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let reports = reports(processes).await;
    let replaced_after = won_at.elapsed();

    assert_eq!(total_computed(&reports), 1, "computations: {reports:?}");
    assert_eq!(values(&reports).len(), 1);
    assert!(
        reports.iter().all(|r| r.lease_waits == 1),
        "every survivor waited for the killed holder's lease: {reports:?}"
    );
    assert_eq!(
        reports.iter().map(|r| r.leases_won).sum::<u64>(),
        1,
        "one survivor took the expired lease over"
    );
    assert!(reports.iter().all(|r| r.lease_wait_timeouts == 0));
    let bound = lease + deadline + member.compute;
    let slowest = reports
        .iter()
        .flat_map(|r| &r.calls)
        .map(Call::took)
        .max()
        .unwrap();
    eprintln!(
        "killed holder: replaced {:.0} ms after it won; slowest caller {:.0} ms (bound {:.0} ms)",
        ms(replaced_after),
        ms(slowest),
        ms(bound)
    );
    // Margin for 4 processes' scheduling on a small machine.
    assert!(slowest < bound + Duration::from_millis(300), "{slowest:?}");
    assert!(
        replaced_after >= lease,
        "computed again before the lease expired"
    );
}

/// Stale-while-revalidate with `memoize_detached`: 20 processes hit an entry that is due;
/// every call returns the cached value in well under the 500 ms computation, and the entry
/// is recomputed exactly once, in the background of one of them.
#[tokio::test]
async fn a_due_entry_is_refreshed_once_in_the_background() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let member = Member {
        callers: 1,
        compute: Duration::from_millis(500),
        refresh_after: Duration::from_millis(300),
        ..Member::new("detached", &server, "due_detached")
    };
    let reports = due_entry_fleet(&server, &member).await;
    assert_eq!(total_computed(&reports), 1, "recomputations: {reports:?}");
    assert_eq!(reports.iter().map(|r| r.refreshes).sum::<u64>(), 1);
    let took: Vec<Duration> = reports
        .iter()
        .flat_map(|r| &r.calls)
        .map(Call::took)
        .collect();
    let slowest = took.iter().max().unwrap();
    eprintln!(
        "stale-while-revalidate (detached): 20 calls, slowest {:.1} ms; 1 background recomputation",
        ms(*slowest)
    );
    assert!(
        *slowest < Duration::from_millis(250),
        "a caller waited: {took:?}"
    );
    assert!(values(&reports) == BTreeSet::from(["seed"]));
    let refreshed = refreshed_value(&server, &member).await;
    assert_ne!(
        refreshed, "seed",
        "the background recomputation was not written"
    );
}

/// Stale-while-revalidate with `memoize` (inline): of 20 processes × 2 callers hitting a
/// due entry, exactly one call recomputes (and returns the new value after about 500 ms);
/// the other 39, its own process's other caller included, return the cached value at once.
#[tokio::test]
async fn a_due_entry_is_refreshed_once_by_its_winner() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let member = Member {
        callers: 2,
        compute: Duration::from_millis(500),
        refresh_after: Duration::from_millis(300),
        ..Member::new("stampede", &server, "due_inline")
    };
    let reports = due_entry_fleet(&server, &member).await;
    assert_eq!(total_computed(&reports), 1, "recomputations: {reports:?}");
    let mut calls: Vec<&Call> = reports.iter().flat_map(|r| &r.calls).collect();
    calls.sort_by_key(|call| call.took());
    let (winner, fast) = calls.split_last().unwrap();
    eprintln!(
        "stale-while-revalidate (inline): 39 calls, slowest {:.1} ms; the winner {:.0} ms",
        ms(fast.last().unwrap().took()),
        ms(winner.took())
    );
    assert!(winner.took() >= member.compute, "{:?}", winner.took());
    assert_ne!(winner.value, "seed", "the winner returns the new value");
    assert!(fast.iter().all(|call| call.value == "seed"));
    assert!(
        fast.iter()
            .all(|call| call.took() < Duration::from_millis(250)),
        "a caller waited: {fast:?}"
    );
    assert_eq!(refreshed_value(&server, &member).await, winner.value);
}

/// Writes "seed" for `member`'s key, starts 20 members, lets the entry become due
/// (`refresh_after`), and runs them.
async fn due_entry_fleet(server: &CacheServer, member: &Member) -> Vec<Report> {
    let mut processes = fleet(20, member).await;
    let cm = Client::connect_with(server.url(), options(member.deadline))
        .await
        .unwrap();
    let function = handle(&cm, member);
    let seed: String = function
        .memoize(&ARGS, || async { "seed".to_owned() })
        .await
        .unwrap();
    assert_eq!(seed, "seed");
    // Due by age: the entry must be `refresh_after` old. Time is the subject here, not a
    // stand-in for a readiness check.
    tokio::time::sleep(member.refresh_after + Duration::from_millis(50)).await;
    go(&mut processes).await;
    reports(processes).await
}

/// The value stored for `member`'s key, read without asking for anything.
async fn refreshed_value(server: &CacheServer, member: &Member) -> String {
    let cm = Client::connect(server.url()).await.unwrap();
    let function = handle(&cm, member);
    let key = pb::Key {
        namespace: "leases".into(),
        function: member.function.clone(),
        digest: function.digest(&ARGS).unwrap(),
    };
    let value = common::get(&mut server.client().await, key)
        .await
        .expect("an entry");
    serde_json::from_slice(&value).unwrap()
}

/// The stores the in-process tests run against.
enum Store {
    Redis(RedisServer),
    Cluster(Arc<RedisCluster>),
    Memory,
}

impl Store {
    fn server(&self) -> CacheServer {
        match self {
            Store::Redis(redis) => CacheServer::redis(redis, &[]),
            Store::Cluster(cluster) => {
                CacheServer::cluster(cluster, &["--key-prefix", &unique_prefix("leases")])
            }
            Store::Memory => CacheServer::memory(&[]),
        }
    }
}

fn stores() -> Vec<(&'static str, Store)> {
    vec![
        ("redis", Store::Redis(RedisServer::start())),
        ("memory", Store::Memory),
        ("cluster", Store::Cluster(RedisCluster::shared())),
    ]
}

/// A computation that starts before a bust and finishes after it is returned to its caller
/// but refused by the service (`refused_writes`), so the next caller computes the new value;
/// for a bust of the one call and of the whole function, on Redis, in memory and on a
/// cluster.
#[tokio::test]
async fn a_result_computed_before_a_bust_is_not_stored() {
    for (name, store) in stores() {
        let server = store.server();
        let cm = Client::connect_with(server.url(), options(Duration::from_secs(1)))
            .await
            .unwrap();
        for scope in ["bust", "bust_all"] {
            let function = cm.function(
                "leases",
                &format!("stale_set_{scope}"),
                Duration::from_secs(60),
            );
            let (started, computing) = oneshot::channel();
            let (finish, finished) = oneshot::channel::<()>();
            let old = tokio::spawn({
                let function = function.clone();
                async move {
                    function
                        .memoize(&ARGS, || async {
                            started.send(()).unwrap();
                            finished.await.unwrap();
                            "old".to_owned()
                        })
                        .await
                        .unwrap()
                }
            });
            computing.await.unwrap();
            let refused_before = cm.metrics().refused_writes;
            match scope {
                "bust" => {
                    function.bust(&ARGS).await.unwrap();
                }
                _ => {
                    function.bust_all().await.unwrap();
                }
            }
            finish.send(()).unwrap();
            assert_eq!(
                old.await.unwrap(),
                "old",
                "{name} {scope}: its caller gets it"
            );
            assert_eq!(
                cm.metrics().refused_writes,
                refused_before + 1,
                "{name} {scope}: the write after the bust was not refused"
            );
            let next: String = function
                .memoize(&ARGS, || async { "new".to_owned() })
                .await
                .unwrap();
            assert_eq!(next, "new", "{name} {scope}: the old result was stored");
        }
    }
}

/// Stale-if-error: once an entry's TTL has passed, a failing computation serves the value
/// kept by `stale_if_error`, marked stale; after a bust nothing stale is served and the error
/// is returned; on Redis, in memory and on a cluster.
#[tokio::test]
async fn a_failure_serves_the_stale_value_until_a_bust() {
    for (name, store) in stores() {
        let server = store.server();
        let cm = Client::connect_with(server.url(), options(Duration::from_secs(1)))
            .await
            .unwrap();
        let rates = cm
            .function("leases", "rates", Duration::from_secs(1))
            .stale_if_error(Duration::from_secs(60));
        let fresh = rates
            .try_memoize_served(&ARGS, || async { Ok::<u32, Error>(108) })
            .await
            .unwrap();
        assert_eq!((fresh.value, fresh.stale), (108, false), "{name}");
        let key = pb::Key {
            namespace: "leases".into(),
            function: "rates".into(),
            digest: rates.digest(&ARGS).unwrap(),
        };
        let raw = server.client().await;
        let expired = common::eventually(Duration::from_secs(5), || {
            let (mut raw, key) = (raw.clone(), key.clone());
            async move { common::get(&mut raw, key).await.is_none() }
        })
        .await;
        assert!(expired, "{name}: the entry never expired");

        let failing = || async { Err::<u32, Error>(Error::InvalidToken) };
        let served = rates.try_memoize_served(&ARGS, failing).await.unwrap();
        assert_eq!((served.value, served.stale), (108, true), "{name}");
        assert_eq!(cm.metrics().stale_served, 1, "{name}");
        // Plain try_memoize serves it too, without saying so.
        assert_eq!(rates.try_memoize(&ARGS, failing).await.unwrap(), 108);

        rates.bust(&ARGS).await.unwrap();
        let after_bust = rates.try_memoize_served(&ARGS, failing).await;
        assert!(
            matches!(after_bust, Err(Error::InvalidToken)),
            "{name}: served {after_bust:?} after a bust"
        );
        assert_eq!(cm.metrics().stale_served, 2, "{name}");
    }
}

thread_local! {
    /// The client of the `#[memoize]` functions below, per test thread.
    static ATTRIBUTE_CLIENT: std::cell::RefCell<Option<Client>> = const { std::cell::RefCell::new(None) };
}

fn attribute_client() -> Client {
    ATTRIBUTE_CLIENT.with(|client| client.borrow().clone().expect("the test set a client"))
}

/// The attribute's `stale_if_error` and `lease` options.
#[cache_money::memoize(ns = "leases", client = attribute_client(), ttl = 1, stale_if_error = 60, skip(fail))]
async fn exchange_rate(currency: &str, fail: bool) -> Result<u32, Error> {
    if fail {
        return Err(Error::InvalidToken);
    }
    Ok(u32::try_from(currency.len()).unwrap() * 100)
}

#[cache_money::memoize(ns = "leases", client = attribute_client(), lease = 0, refresh_after = std::time::Duration::from_millis(300))]
async fn unleased(n: u32) -> u32 {
    n
}

/// `#[memoize(stale_if_error = 60)]` serves the stale value when its function fails after
/// the TTL, and `lease = 0` turns leases off for its handle (in memory).
#[tokio::test(flavor = "current_thread")]
async fn the_attribute_takes_the_lease_options() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    ATTRIBUTE_CLIENT.with(|client| *client.borrow_mut() = Some(cm.clone()));
    assert_eq!(
        unleased::function().unwrap().lease_lifetime(),
        Duration::ZERO
    );
    assert_eq!(
        exchange_rate::function().unwrap().lease_lifetime(),
        cache_money::DEFAULT_LEASE
    );
    assert_eq!(unleased(3).await, 3);
    assert_eq!(cm.metrics().leases_won, 0, "unleased asked for a lease");

    assert_eq!(exchange_rate("EUR", false).await.unwrap(), 300);
    let handle = exchange_rate::function().unwrap();
    let key = pb::Key {
        namespace: "leases".into(),
        function: "exchange_rate".into(),
        digest: handle.digest(&("EUR",)).unwrap(),
    };
    let raw = server.client().await;
    let expired = common::eventually(Duration::from_secs(5), || {
        let (mut raw, key) = (raw.clone(), key.clone());
        async move { common::get(&mut raw, key).await.is_none() }
    })
    .await;
    assert!(expired, "the entry never expired");
    assert_eq!(
        exchange_rate("EUR", true).await.unwrap(),
        300,
        "not served stale"
    );
    assert_eq!(cm.metrics().stale_served, 1);
    let served = handle
        .try_memoize_served(&("EUR",), || async {
            Err::<u32, Error>(Error::InvalidToken)
        })
        .await
        .unwrap();
    assert_eq!((served.value, served.stale), (300, true));
}

/// How a lease holder's computation ends without a value.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Err,
    Panic,
    Cancel,
}

/// A lease holder whose computation fails, panics or is cancelled gives the lease back at
/// once: a caller of another client, waiting for it, computes well before the 5 s lease
/// would have expired (in memory; the holder and the waiter are separate clients, as two
/// processes are).
#[tokio::test]
async fn a_failed_computation_gives_its_lease_back() {
    let server = CacheServer::memory(&[]);
    for ending in [Ending::Err, Ending::Panic, Ending::Cancel] {
        // A generous deadline: the panic's backtrace, printed on the test's one thread, must
        // not make the waiter's lookup time out (which would compute without a lease).
        let holder = Client::connect_with(server.url(), options(Duration::from_secs(2)))
            .await
            .unwrap();
        let waiter = Client::connect_with(server.url(), options(Duration::from_secs(2)))
            .await
            .unwrap();
        let name = format!("released_{ending:?}").to_lowercase();
        let held = holder.function("leases", &name, Duration::from_secs(60));
        assert_eq!(held.lease_lifetime(), Duration::from_secs(5));
        let (started, computing) = oneshot::channel();
        let (finish, finished) = oneshot::channel::<()>();
        let holding = tokio::spawn(async move {
            held.try_memoize(&ARGS, || async move {
                started.send(()).unwrap();
                let _ = finished.await;
                match ending {
                    Ending::Panic => panic!("the holder's computation panicked"),
                    _ => Err::<String, Error>(Error::InvalidToken),
                }
            })
            .await
        });
        computing.await.unwrap();

        let waiting = tokio::spawn({
            let function = waiter.function("leases", &name, Duration::from_secs(60));
            async move {
                let started = Instant::now();
                let value: String = function
                    .memoize(&ARGS, || async { "the waiter's".to_owned() })
                    .await
                    .unwrap();
                (value, started.elapsed())
            }
        });
        let waits = common::eventually(Duration::from_secs(5), || async {
            waiter.metrics().lease_waits == 1
        })
        .await;
        assert!(waits, "{ending:?}: the waiter did not wait for the holder");
        match ending {
            Ending::Err => {
                finish.send(()).unwrap();
                assert!(holding.await.unwrap().is_err());
            }
            Ending::Panic => {
                finish.send(()).unwrap();
                assert!(holding.await.unwrap_err().is_panic());
            }
            Ending::Cancel => {
                holding.abort();
                assert!(holding.await.unwrap_err().is_cancelled());
                drop(finish);
            }
        }
        let (value, took) = waiting.await.unwrap();
        assert_eq!(value, "the waiter's", "{ending:?}");
        assert!(
            took < Duration::from_secs(2),
            "{ending:?}: the waiter waited {took:?}, as for an expired lease"
        );
        assert_eq!(waiter.metrics().leases_won, 1, "{ending:?}");
        assert_eq!(waiter.metrics().lease_wait_timeouts, 0, "{ending:?}");
    }
}

/// A caller never waits past twice its lease's lifetime plus its deadline, however long the
/// holder's lease: here another process holds a 10 s lease and never writes, so the waiter
/// (1 s leases) stops after 2.2 s and computes without writing (in memory).
#[tokio::test]
async fn waiting_ends_at_twice_the_lifetime_plus_the_deadline() {
    let server = CacheServer::memory(&[]);
    let served = outwaited(&server, "outwaited", false).await;
    assert_eq!(
        (served.value.as_str(), served.stale),
        ("computed after waiting", false)
    );
}

/// As above with stale-if-error and an expired entry: the caller whose wait ran out serves
/// the stale value, marked stale, instead of computing.
#[tokio::test]
async fn waiting_that_runs_out_serves_the_stale_value() {
    let server = CacheServer::memory(&[]);
    let served = outwaited(&server, "outwaited_stale", true).await;
    assert_eq!((served.value.as_str(), served.stale), ("old", true));
}

/// One client (1 s leases, 200 ms deadline) calls a key whose lease another process holds for
/// 10 s without ever writing; returns what it got once its wait ran out. With `stale`, an
/// expired value with a stale copy is there first.
async fn outwaited(server: &CacheServer, name: &str, stale: bool) -> cache_money::Served<String> {
    let lease = Duration::from_secs(1);
    let deadline = Duration::from_millis(200);
    let cm = Client::connect_with(server.url(), options(deadline))
        .await
        .unwrap();
    let mut function = cm
        .function("leases", name, Duration::from_secs(1))
        .lease(lease);
    if stale {
        function = function.stale_if_error(Duration::from_secs(60));
    }
    let key = pb::Key {
        namespace: "leases".into(),
        function: name.into(),
        digest: function.digest(&ARGS).unwrap(),
    };
    let mut raw = server.client().await;
    if stale {
        let old: String = function
            .memoize(&ARGS, || async { "old".to_owned() })
            .await
            .unwrap();
        assert_eq!(old, "old");
        let expired = common::eventually(Duration::from_secs(5), || {
            let (mut raw, key) = (raw.clone(), key.clone());
            async move { common::get(&mut raw, key).await.is_none() }
        })
        .await;
        assert!(expired, "the entry never expired");
    }
    let holder = raw
        .get(pb::GetRequest {
            key: Some(key.clone()),
            lease_ms: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(holder.lease(), pb::Lease::Won);
    let started = Instant::now();
    let served = function
        .try_memoize_served(&ARGS, || async {
            Ok::<String, Error>("computed after waiting".to_owned())
        })
        .await
        .unwrap();
    let took = started.elapsed();
    let metrics = cm.metrics();
    eprintln!(
        "the waiter that ran out returned after {:.0} ms ({})",
        ms(took),
        if stale { "served stale" } else { "computed" }
    );
    assert_eq!(metrics.lease_wait_timeouts, 1, "{metrics:?}");
    assert_eq!(metrics.stale_served, u64::from(stale), "{metrics:?}");
    let cap = lease * 2 + deadline;
    assert!(took >= cap, "stopped waiting before its cap: {took:?}");
    assert!(took < cap + Duration::from_millis(300), "waited {took:?}");
    assert_eq!(
        common::get(&mut raw, key).await,
        None,
        "the waiter that ran out wrote a value"
    );
    served
}

/// A leased write the service refuses as invalid (a value over `--max-value-bytes`) gives the
/// lease back: the next caller of another client computes at once instead of waiting for the
/// 5 s lease to expire (in memory).
#[tokio::test]
async fn a_write_refused_as_invalid_gives_its_lease_back() {
    let server = CacheServer::memory(&["--max-value-bytes", "100"]);
    let first = Client::connect_with(server.url(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let second = Client::connect_with(server.url(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let big = |cm: &Client| cm.function("leases", "big", Duration::from_secs(60));
    let value: String = big(&first)
        .memoize(&ARGS, || async { "x".repeat(1000) })
        .await
        .unwrap();
    assert_eq!(value.len(), 1000);
    assert_eq!(
        first.metrics().refused,
        1,
        "the write was not refused as invalid"
    );
    let started = Instant::now();
    let value: String = big(&second)
        .memoize(&ARGS, || async { "y".repeat(1000) })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(&value[..1], "y");
    assert_eq!(second.metrics().leases_won, 1);
    assert!(
        took < Duration::from_secs(1),
        "waited {took:?} for an unused lease"
    );
}

/// XFetch: the compute time written with a value makes it due early, by `beta`. With an
/// overwhelming beta the next lookup of a fresh entry (a minute left) is due and its caller
/// recomputes it; without `xfetch` the same entry is a plain hit (in memory).
#[tokio::test]
async fn xfetch_recomputes_early_by_compute_time() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect_with(server.url(), options(Duration::from_secs(1)))
        .await
        .unwrap();
    let plain = cm.function("leases", "xfetch", Duration::from_secs(60));
    let first: u32 = plain
        .memoize(&ARGS, || async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            1
        })
        .await
        .unwrap();
    assert_eq!(first, 1);
    let hit: u32 = plain.memoize(&ARGS, || async { 2 }).await.unwrap();
    assert_eq!((hit, cm.metrics().refreshes), (1, 0), "due without xfetch");

    let eager = plain.clone().xfetch(1e30);
    let refreshed: u32 = eager.memoize(&ARGS, || async { 3 }).await.unwrap();
    assert_eq!(refreshed, 3, "the winner returns the recomputed value");
    assert_eq!(cm.metrics().refreshes, 1);
    let after: u32 = plain.memoize(&ARGS, || async { 4 }).await.unwrap();
    assert_eq!(after, 3, "the recomputed value was not written");
}

/// A stale value handed out with an earlier WAIT is not served once the key was busted: the
/// latest answer decides (here: the lease, with nothing stale), and the failure comes back.
#[tokio::test]
async fn a_stale_value_busted_while_waiting_is_not_served() {
    let server = CacheServer::memory(&[]);
    let mut raw = server.client().await;
    let cm = Client::connect(server.url()).await.unwrap();
    let f = cm
        .function("ns", "busted_while_waiting", Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(60))
        .lease(Duration::from_secs(3));
    let first: String = f
        .memoize(&(1,), || async { "old".to_owned() })
        .await
        .unwrap();
    assert_eq!(first, "old");
    let key = pb::Key {
        namespace: "ns".into(),
        function: "busted_while_waiting".into(),
        digest: f.digest(&(1,)).unwrap(),
    };
    // Past its TTL: a stale copy, whose lease another process holds.
    let expired = common::eventually(Duration::from_secs(5), || {
        let mut raw = raw.clone();
        let key = key.clone();
        async move { common::get(&mut raw, key).await.is_none() }
    })
    .await;
    assert!(expired);
    let other = raw
        .get(pb::GetRequest {
            key: Some(key.clone()),
            lease_ms: 3_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.lease(), pb::Lease::Won);
    let (asked, waiting) = tokio::sync::oneshot::channel();
    let waiter = f.clone();
    let call = tokio::spawn(async move {
        waiter
            .try_memoize_served(&(1,), || async move {
                let _ = asked.send(());
                Err::<String, Error>(Error::Timeout(Duration::from_millis(1)))
            })
            .await
    });
    // The waiter has seen the stale value (WAIT) by the time the holder's lease is busted;
    // the bust also frees the lease, so its next look wins and its computation fails.
    let seen = common::eventually(Duration::from_secs(5), || async {
        cm.metrics().lease_waits > 0
    })
    .await;
    assert!(seen, "the call never waited");
    raw.bust(pb::BustRequest {
        key: Some(key.clone()),
    })
    .await
    .unwrap();
    waiting.await.expect("the call computed after the bust");
    match call.await.unwrap() {
        Ok(served) => panic!(
            "served {:?} (stale: {}) after the value was busted",
            served.value, served.stale
        ),
        Err(err) => assert!(matches!(err, Error::Timeout(_)), "{err}"),
    }
}

/// A lease holder that dies: after its lease expires one waiter takes the lease over, and
/// the other waiters wait for that one (its new lease) rather than all computing.
#[tokio::test]
async fn after_a_dead_holder_the_waiters_wait_for_the_new_one() {
    let server = CacheServer::memory(&[]);
    let mut raw = server.client().await;
    let probe = Client::connect(server.url()).await.unwrap();
    let handle = |cm: &Client| {
        cm.function("ns", "dead_holder", Duration::from_secs(60))
            .lease(Duration::from_secs(1))
    };
    let key = pb::Key {
        namespace: "ns".into(),
        function: "dead_holder".into(),
        digest: handle(&probe).digest(&(1,)).unwrap(),
    };
    // This "process" wins the lease and dies without a word.
    let dead = raw
        .get(pb::GetRequest {
            key: Some(key),
            lease_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.lease(), pb::Lease::Won);
    let computed = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for _ in 0..5 {
        // Five clients: five processes as far as single-flight goes.
        let cm = Client::connect(server.url()).await.unwrap();
        let f = handle(&cm);
        let computed = computed.clone();
        calls.push(tokio::spawn(async move {
            let value: u64 = f
                .memoize(&(1,), || async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    computed.fetch_add(1, SeqCst)
                })
                .await
                .unwrap();
            (value, cm.metrics().lease_wait_timeouts)
        }));
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    assert_eq!(
        computed.load(SeqCst),
        1,
        "computations after the dead holder: results {results:?}"
    );
    assert!(
        results
            .iter()
            .all(|&(value, timeouts)| value == 0 && timeouts == 0),
        "{results:?}"
    );
}
