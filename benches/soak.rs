//! Soak: mixed load against the real server for a while, with Redis killed and restarted
//! periodically; reports server RSS over time, errors by status code, and wrong results
//! (which must be 0). Not part of CI.
//!
//!     cargo bench --bench soak -- --minutes 10
//!
//! Options: --minutes M (10), --rate R requests/s (400), --outage-every S (120) seconds
//! between Redis kills, each outage lasting 5 s. Loopback only; stops by itself.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use cache_money::{Client, ClientOptions, Ttl, pb};
use common::{CacheServer, RedisServer, key, put};

const KEYS: u64 = 500;
const OUTAGE: Duration = Duration::from_secs(5);

fn value_of(id: u64) -> Vec<u8> {
    format!("soak-value-{id}-{}", "x".repeat((id % 200) as usize)).into_bytes()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    wrong: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, code: tonic::Code) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(format!("{code:?}"))
            .or_default() += 1;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut minutes = 10.0;
    let mut rate = 400.0;
    let mut outage_every = 120.0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || {
            args.next()
                .and_then(|v| v.parse::<f64>().ok())
                .expect("a number")
        };
        match arg.as_str() {
            "--minutes" => minutes = number(),
            "--rate" => rate = number(),
            "--outage-every" => outage_every = number(),
            "--bench" => {}
            other => panic!("unknown option {other}; see the header of benches/soak.rs"),
        }
    }
    let mut redis = RedisServer::start();
    let end_after = Duration::from_secs_f64(minutes * 60.0);
    let server = CacheServer::redis(&redis, &[]);
    let pid = server.pid();
    let raw = server.client().await;
    let options = ClientOptions {
        breaker_cooldown: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options).await.unwrap();
    let square = cm.function("soak", "square", Ttl::MINUTE);
    let tally = Arc::new(Tally::default());
    let memo_wrong = Arc::new(AtomicU64::new(0));

    let started = Instant::now();
    let end = started + end_after;
    let mut rss = vec![(0u64, rss_kib(pid))];
    // Outages run beside the load, which keeps its rate through them.
    let outages = tokio::spawn(async move {
        let mut outages = 0;
        loop {
            tokio::time::sleep(Duration::from_secs_f64(outage_every)).await;
            if Instant::now() + OUTAGE >= end {
                // Handed back so Redis lives until the load has stopped.
                return (outages, redis);
            }
            eprintln!(
                "[{:>4}s] killing Redis for {} s",
                started.elapsed().as_secs(),
                OUTAGE.as_secs()
            );
            redis.kill();
            tokio::time::sleep(OUTAGE).await;
            redis.restart();
            outages += 1;
        }
    });
    let mut next_sample = started + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut n = 0u64;
    let mut inflight = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let now = Instant::now();
        if now >= next_sample {
            rss.push((started.elapsed().as_secs(), rss_kib(pid)));
            next_sample += Duration::from_secs(30);
        }
        let id = n % KEYS;
        let (mut raw, tally, square, memo_wrong) = (
            raw.clone(),
            tally.clone(),
            square.clone(),
            memo_wrong.clone(),
        );
        inflight.push(tokio::spawn(async move {
            let outcome = match n % 10 {
                0..=3 => raw
                    .get(pb::GetRequest {
                        key: Some(key("soak", "f", id)),
                        ..Default::default()
                    })
                    .await
                    .map(|reply| {
                        let reply = reply.into_inner();
                        if reply.hit && reply.value.as_ref() != value_of(id) {
                            tally.wrong.fetch_add(1, Relaxed);
                        }
                    }),
                4..=6 => raw
                    .put(put(key("soak", "f", id), &value_of(id), 60))
                    .await
                    .map(drop),
                7 => {
                    let keys = (0..20).map(|i| key("soak", "f", (id + i) % KEYS)).collect();
                    raw.get_many(pb::GetManyRequest { keys })
                        .await
                        .map(|reply| {
                            for (i, result) in reply.into_inner().results.into_iter().enumerate() {
                                if result.hit
                                    && result.value.as_ref() != value_of((id + i as u64) % KEYS)
                                {
                                    tally.wrong.fetch_add(1, Relaxed);
                                }
                            }
                        })
                }
                8 => raw
                    .bust(pb::BustRequest {
                        key: Some(key("soak", "f", id)),
                    })
                    .await
                    .map(drop),
                _ => {
                    // memoize is fail-open: it never errors, and must always be right.
                    let got: u64 = square
                        .memoize(&(id,), || async move { id * id })
                        .await
                        .unwrap();
                    if got != id * id {
                        memo_wrong.fetch_add(1, Relaxed);
                    }
                    Ok(())
                }
            };
            match outcome {
                Ok(()) => {
                    tally.ok.fetch_add(1, Relaxed);
                }
                Err(status) => tally.error(status.code()),
            }
        }));
        if inflight.len() >= 10_000 {
            for request in inflight.drain(..) {
                request.await.unwrap();
            }
        }
        n += 1;
    }
    for request in inflight {
        request.await.unwrap();
    }
    rss.push((started.elapsed().as_secs(), rss_kib(pid)));
    let (outages, _redis) = outages.await.unwrap();

    let first = rss
        .iter()
        .find(|(t, _)| *t >= 30)
        .unwrap_or(&rss[0])
        .1
        .max(1);
    let last = rss.last().unwrap().1;
    println!(
        "soak: {:.1} min, {n} requests at {rate}/s, {outages} Redis outages of {} s",
        minutes,
        OUTAGE.as_secs()
    );
    println!("ok: {}", tally.ok.load(Relaxed));
    println!("errors by code: {:?}", tally.errors.lock().unwrap());
    println!(
        "wrong results: {} (raw) + {} (memoize)",
        tally.wrong.load(Relaxed),
        memo_wrong.load(Relaxed)
    );
    println!("client: {:?}", cm.metrics());
    println!(
        "server RSS: {:.1} MiB at 30 s, {:.1} MiB at the end ({:+.1}%); samples (s, KiB): {:?}",
        first as f64 / 1024.0,
        last as f64 / 1024.0,
        (last as f64 / first as f64 - 1.0) * 100.0,
        rss
    );
    // Health transitions, to line errors up with the outages.
    for line in server
        .log_text()
        .lines()
        .filter(|line| line.contains("SERVING"))
    {
        println!("server: {line}");
    }
    assert_eq!(
        tally.wrong.load(Relaxed) + memo_wrong.load(Relaxed),
        0,
        "wrong results were served"
    );
}
