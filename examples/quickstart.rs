//! The seed's walkthrough in Rust: `addition` and `multiplication` memoized in cache-money.
//!
//! Start a server (`cargo run --release`), then:
//!     cargo run --example quickstart
//! Set CACHE_MONEY_SERVER (as for the `cache-money` CLI) to use another server than
//! http://127.0.0.1:50051.

use cache_money::{Client, Function, Ttl};

async fn addition(cache: &Function, a: i64, b: i64) -> Result<i64, cache_money::Error> {
    cache
        .memoize(&(a, b), || async move {
            println!("  computing addition({a}, {b})");
            a + b
        })
        .await
}

async fn multiplication(cache: &Function, a: i64, b: i64) -> Result<i64, cache_money::Error> {
    cache
        .memoize(&(a, b), || async move {
            println!("  computing multiplication({a}, {b})");
            a * b
        })
        .await
}

#[tokio::main]
async fn main() {
    // memoize never fails because the cache is down (it computes instead); busts do report it.
    if let Err(err) = run().await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), cache_money::Error> {
    let url =
        std::env::var("CACHE_MONEY_SERVER").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let cm = Client::connect(url).await?;
    // The Python seed keys by module and function name; "__main__" shares entries with a
    // Python script's @cached functions.
    let add = cm.function("__main__", "addition", Ttl::HOUR);
    let mul = cm.function("__main__", "multiplication", Ttl::HOUR);

    println!("addition(3, 4) = {}", addition(&add, 3, 4).await?);
    println!("addition(3, 7) = {}", addition(&add, 3, 7).await?);
    println!(
        "addition(3, 4) = {}   (again: no 'computing' line when cached)",
        addition(&add, 3, 4).await?
    );

    println!(
        "bust addition(3, 4): removed = {}",
        add.bust(&(3, 4)).await?
    );
    println!("addition(3, 4) = {}", addition(&add, 3, 4).await?);

    println!(
        "multiplication(2, 4) = {}",
        multiplication(&mul, 2, 4).await?
    );
    println!("addition.bust_all(): removed {}", add.bust_all().await?);
    println!("bust everything: removed {}", cm.bust_all().await?);

    let metrics = cm.metrics();
    println!(
        "client: {} hits, {} computed, breaker open: {}",
        metrics.hits, metrics.computed, metrics.breaker_open
    );
    if metrics.rpc_failures > 0 {
        println!(
            "(the service did not answer every call: results were computed instead; is the server running?)"
        );
    }
    Ok(())
}
