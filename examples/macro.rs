//! The seed's walkthrough with `#[cache_money::memoize]`: the decorator's shape in Rust.
//!
//! Start a server (`cargo run --release`), then:
//!     cargo run --example macro
//! Set CACHE_MONEY_SERVER (as for the `cache-money` CLI) to use another server than
//! http://127.0.0.1:50051.

use cache_money::{Client, Ttl, memoize};

// `ns = "__main__"` shares entries with the Python seed's script functions (and with
// examples/quickstart.rs); without it the namespace is this module's path, `r#macro`.
#[memoize(ns = "__main__", ttl = Ttl::HOUR)]
async fn addition(a: i64, b: i64) -> i64 {
    println!("  computing addition({a}, {b})");
    a + b
}

#[memoize(ns = "__main__", ttl = Ttl::HOUR)]
async fn multiplication(a: i64, b: i64) -> i64 {
    println!("  computing multiplication({a}, {b})");
    a * b
}

// Memoized calls never fail because the cache is down (they compute instead); busts do
// report it, and end the example with the error.
#[tokio::main]
async fn main() -> Result<(), cache_money::Error> {
    let url = std::env::var("CACHE_MONEY_SERVER");
    let url = url.as_deref().unwrap_or("http://127.0.0.1:50051");
    cache_money::install(Client::connect(url).await?)?;

    println!("addition(3, 4) = {}", addition(3, 4).await);
    println!("addition(3, 7) = {}", addition(3, 7).await);
    println!(
        "addition(3, 4) = {}   (again: no 'computing' line when cached)",
        addition(3, 4).await
    );
    println!(
        "bust addition(3, 4): removed = {}",
        addition::bust(3, 4).await?
    );
    println!("addition(3, 4) = {}", addition(3, 4).await);
    println!("refresh addition(3, 4) = {}", addition::refresh(3, 4).await);
    println!("multiplication(2, 4) = {}", multiplication(2, 4).await);
    println!(
        "addition::bust_all(): removed {}",
        addition::bust_all().await?
    );
    let cm = cache_money::installed().expect("installed above");
    println!("bust everything: removed {}", cm.bust_all().await?);
    Ok(())
}
