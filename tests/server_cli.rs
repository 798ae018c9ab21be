//! The binary as an operator meets it: `--help`, refused configurations, JSON logs.

mod common;

use std::{net::TcpListener, process::Command};

use common::CacheServer;

fn server() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cache-money-server"));
    command
        .env_remove("CACHE_MONEY_REDIS_URL")
        .env("RUST_LOG", "info");
    command
}

/// `--help` documents every flag with its environment variable.
#[test]
fn help_documents_every_setting() {
    let output = server().arg("--help").output().expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let settings = [
        "listen",
        "redis-url",
        "redis-tls-ca",
        "key-prefix",
        "pool-size",
        "store-timeout-ms",
        "connect-timeout-ms",
        "max-ttl-seconds",
        "max-value-bytes",
        "max-batch",
        "max-message-bytes",
        "bust-batch",
        "memory-max-bytes",
        "health-interval-ms",
        "drain-timeout-ms",
        "log-format",
    ];
    for setting in settings {
        assert!(
            help.contains(&format!("--{setting}")),
            "--{setting} missing from --help"
        );
        let env = format!("CACHE_MONEY_{}", setting.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from --help");
    }
}

/// Settings that cannot work stop start-up with a message naming the flag.
#[test]
fn bad_configuration_is_refused_clearly() {
    let cases: [(&[&str], &str); 3] = [
        (&["--pool-size", "0"], "--pool-size: must be at least 1"),
        (
            &["--max-value-bytes", "9000000"],
            "--max-message-bytes: must be at least",
        ),
        (
            &["--redis-url", "localhost:6379"],
            "--redis-url: must start with redis://",
        ),
    ];
    for (args, message) in cases {
        let output = server()
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run server");
        assert!(!output.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// A port already in use is reported as such, with the flag to change.
#[test]
fn taken_port_is_reported() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = server()
        .args(["--listen", &addr])
        .output()
        .expect("run server");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (--listen)")),
        "{stderr}"
    );
}

/// With `--log-format json` every log line is a JSON object, the start-up line included, and
/// the environment variable works as well as the flag.
#[test]
fn json_logs_carry_the_effective_configuration() {
    let server = CacheServer::start(&["--log-format", "json", "--key-prefix", "jl:"]);
    let line = server
        .wait_for_log("cache-money serving", common::READY_TIMEOUT)
        .unwrap();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"key_prefix\":\"jl:\""), "{line}");
    assert!(line.contains("\"store\":\"memory\""), "{line}");
}
