//! One caller's memoize hits, back to back, for profiling a hit (BENCHMARKS.md, "One caller
//! against the floor": `benches/critical_path.py` records the socket syscalls of the client,
//! the server and Redis while this runs).
//!
//! Start a server on the Redis store (`cargo run --release -- --redis-url redis://127.0.0.1:6379`;
//! the in-memory store works too, but has no Redis hop to trace), then:
//!     cargo run --release --example hit_loop -- [URL] [SECONDS] [channel|no-poll]
//! URL defaults to http://127.0.0.1:50051, SECONDS to 10; `channel` calls through a tonic
//! `Channel` (`Client::from_channel_with`) instead of the client's direct transport, to compare
//! the two (BENCHMARKS.md, "The client's transport"); `no-poll` is the direct transport with
//! `ClientOptions::busy_poll` off (the client sleeps until each reply wakes it, as before it
//! polled; what instruction counts under callgrind compare with). Waits up to 5 s for a first hit (a
//! server still starting), prints the hits' p50 and p99, and fails when the calls are not hits
//! (the server unreachable: memoize computes instead).

use std::time::{Duration, Instant};

use cache_money::{Client, ClientOptions, Ttl};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let seconds: f64 = match args.next().map(|text| text.parse::<f64>()) {
        None => 10.0,
        Some(Ok(seconds)) if seconds.is_finite() && seconds >= 0.0 => seconds,
        Some(_) => {
            eprintln!(
                "usage: hit_loop [URL] [SECONDS] [channel|no-poll]   (SECONDS: a number, 0 or more)"
            );
            std::process::exit(2);
        }
    };
    let (through_channel, options) = match args.next().as_deref() {
        None => (false, ClientOptions::default()),
        Some("channel") => (true, ClientOptions::default()),
        Some("no-poll") => {
            let options = ClientOptions {
                busy_poll: Duration::ZERO,
                ..ClientOptions::default()
            };
            (false, options)
        }
        Some(_) => {
            eprintln!("usage: hit_loop [URL] [SECONDS] [channel|no-poll]");
            std::process::exit(2);
        }
    };
    let connected = if through_channel {
        cache_money::channel(&url, &options)
            .and_then(|channel| Client::from_channel_with(channel, options))
    } else {
        Client::connect_with(url.clone(), options).await
    };
    let cache = match connected {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    };
    let profile = cache.function("bench", "hit_loop", Ttl::HOUR);
    let value = || async { "x".repeat(64) };
    // The first call stores the value and every later one must be a hit: wait (up to 5 s,
    // for a server still starting) until one is.
    let waited = Instant::now();
    loop {
        let before = cache.metrics().hits;
        let _: String = profile.memoize(&(1u64,), value).await.expect("memoize");
        if cache.metrics().hits > before {
            break;
        }
        if waited.elapsed() > Duration::from_secs(5) {
            eprintln!("no hit within 5 s: is {url} reachable and caching?");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = cache.metrics().hits;
    let mut latencies = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let started = Instant::now();
        let hit: String = profile.memoize(&(1u64,), value).await.expect("memoize");
        latencies.push(started.elapsed());
        assert_eq!(hit.len(), 64);
    }
    let hits = cache.metrics().hits - before;
    if hits < latencies.len() as u64 {
        eprintln!(
            "only {hits} of {} calls were hits: is {url} reachable and caching?",
            latencies.len()
        );
        std::process::exit(1);
    }
    if latencies.is_empty() {
        eprintln!("no calls in {seconds} s");
        std::process::exit(2);
    }
    latencies.sort();
    let at = |quantile: f64| latencies[((latencies.len() - 1) as f64 * quantile) as usize];
    println!(
        "{} hits, p50 {:.1} µs, p99 {:.1} µs",
        latencies.len(),
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
}
