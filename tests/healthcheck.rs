//! `cache-money-server health-check` against the real binary: exit 0 only when the server it
//! is pointed at reports SERVING, and a bounded, explained failure otherwise.

mod common;

use std::{
    net::TcpListener,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{CacheServer, free_port};

/// Runs `cache-money-server --listen LISTEN health-check EXTRA…` with a clean environment.
fn health_check(listen: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cache-money-server"))
        .args(["--listen", listen, "health-check"])
        .args(extra)
        .env_clear()
        .output()
        .expect("run cache-money-server health-check")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A serving server passes the check: exit 0.
#[test]
fn serving_server_passes() {
    let server = CacheServer::memory(&[]);
    let output = health_check(&server.addr().to_string(), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// `0.0.0.0` in the listen setting (as in the container image) is probed over loopback,
/// read from `CACHE_MONEY_LISTEN` as the image sets it.
#[test]
fn unspecified_listen_address_is_probed_over_loopback() {
    let server = CacheServer::memory(&[]);
    let listen = format!("0.0.0.0:{}", server.addr().port());
    let output = Command::new(env!("CARGO_BIN_EXE_cache-money-server"))
        .arg("health-check")
        .env_clear()
        .env("CACHE_MONEY_LISTEN", &listen)
        .output()
        .expect("run cache-money-server health-check");
    assert!(output.status.success(), "{}", stderr(&output));
}

/// A server whose Redis is unreachable fails the check, saying NOT_SERVING.
#[test]
fn server_without_its_store_fails() {
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let server = CacheServer::start(&["--redis-url", &nowhere]);
    let output = health_check(&server.addr().to_string(), &[]);
    assert!(!output.status.success(), "passed without a store");
    assert!(
        stderr(&output).contains("reports NOT_SERVING"),
        "{}",
        stderr(&output)
    );
}

/// Nothing listening fails the check with a message naming the address.
#[test]
fn absent_server_fails() {
    let listen = format!("127.0.0.1:{}", free_port());
    let output = health_check(&listen, &[]);
    assert!(!output.status.success(), "passed with no server");
    let message = stderr(&output);
    assert!(
        message.contains(&format!("cannot connect to http://{listen}")),
        "{message}"
    );
}

/// A peer that accepts connections but never answers fails the check within `--timeout-ms`
/// instead of hanging.
#[test]
fn silent_server_fails_within_the_timeout() {
    // Bound but never accepted: the kernel completes the TCP handshake, nothing speaks HTTP/2.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind a silent listener");
    let listen = silent.local_addr().expect("local addr").to_string();
    let started = Instant::now();
    let output = health_check(&listen, &["--timeout-ms", "300"]);
    let took = started.elapsed();
    assert!(!output.status.success(), "passed against a silent peer");
    assert!(
        stderr(&output).contains("within 300 ms (--timeout-ms)"),
        "{}",
        stderr(&output)
    );
    // Far above 300 ms so a loaded machine cannot fail it, far below a hang.
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
