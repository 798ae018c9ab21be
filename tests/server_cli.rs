//! The binary as an operator meets it: `--help`, every setting as a flag and as an
//! environment variable, refused configurations, JSON logs.

mod common;

use std::{net::TcpListener, process::Command};

use cache_money::server::config::Config;
use clap::CommandFactory;
use common::CacheServer;

fn server() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cache-money-server"));
    command
        .env_remove("CACHE_MONEY_REDIS_URL")
        .env_remove("CACHE_MONEY_REDIS_CLUSTER")
        .env("RUST_LOG", "info");
    command
}

/// The flag's environment variable: `--max-batch` is `CACHE_MONEY_MAX_BATCH`.
fn env_name(flag: &str) -> String {
    format!("CACHE_MONEY_{}", flag.to_uppercase().replace('-', "_"))
}

/// Every flag of `Config` (clap's own `--help` and `--version` aside).
fn config_flags() -> Vec<String> {
    Config::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|flag| !matches!(*flag, "help" | "version"))
        .map(str::to_owned)
        .collect()
}

/// Every flag of `Config` has the `CACHE_MONEY_*` variable named after it, and `--help`
/// documents both.
#[test]
fn help_documents_every_setting() {
    let output = server().arg("--help").output().expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let command = Config::command();
    for arg in command.get_arguments() {
        let Some(flag) = arg.get_long() else { continue };
        if matches!(flag, "help" | "version") {
            continue;
        }
        let env = env_name(flag);
        assert_eq!(
            arg.get_env().and_then(|env| env.to_str()),
            Some(env.as_str()),
            "--{flag} has no {env}"
        );
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing from --help"
        );
        assert!(help.contains(&env), "{env} missing from --help");
    }
}

/// Files the settings below point at, in a temporary folder removed on drop.
struct SettingFiles {
    dir: std::path::PathBuf,
}

impl SettingFiles {
    fn write() -> Self {
        let dir = std::env::temp_dir().join(format!("cache-money-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let files = [
            ("cert.pem", certified.cert.pem()),
            ("key.pem", certified.signing_key.serialize_pem()),
            (
                "tokens.json",
                r#"{"tokens": [{"name": "ops", "token": "ops-token-0123456789", "admin": true}]}"#
                    .to_owned(),
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        SettingFiles { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for SettingFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each flag of `Config`, a value other than its default, and what the JSON start-up line
/// shows when the value took effect.
fn every_setting(files: &SettingFiles) -> Vec<(&'static str, String, String)> {
    let port = common::free_port();
    let redis_port = common::free_port();
    let metrics_port = common::free_port();
    let cert = files.path("cert.pem");
    let number = |flag: &'static str, value: u64| {
        let field = flag.replace('-', "_");
        (flag, value.to_string(), format!("\"{field}\":{value}"))
    };
    vec![
        (
            "listen",
            format!("127.0.0.1:{port}"),
            format!("\"listen\":\"127.0.0.1:{port}\""),
        ),
        (
            // Nothing listens there: the server starts anyway, NOT_SERVING.
            "redis-url",
            format!("rediss://127.0.0.1:{redis_port}"),
            format!("\"redis_url\":\"rediss://127.0.0.1:{redis_port}\""),
        ),
        (
            "redis-tls-ca",
            cert.clone(),
            format!("\"redis_tls_ca\":\"{cert}\""),
        ),
        (
            "key-prefix",
            "cli:".into(),
            "\"key_prefix\":\"cli:\"".into(),
        ),
        number("pool-size", 3),
        number("max-in-flight", 77),
        number("store-timeout-ms", 251),
        number("redis-busy-poll-us", 49),
        number("connect-timeout-ms", 201),
        number("max-ttl-seconds", 3601),
        number("max-value-bytes", 1001),
        number("max-batch", 51),
        number("max-tags", 5),
        number("max-tag-bytes", 99),
        number("lease-max-ms", 59_999),
        number("max-message-bytes", 100_001),
        number("max-response-bytes", 100_002),
        number("bust-batch", 101),
        (
            "invalidations",
            "off".into(),
            "\"invalidations\":\"off\"".into(),
        ),
        number("watch-stream-len", 99_999),
        number("watch-heartbeat-ms", 999),
        number("watch-buffer", 4095),
        number("memory-max-bytes", 1_000_003),
        number("health-interval-ms", 501),
        number("drain-timeout-ms", 10_001),
        number("worker-threads", 2),
        (
            "auth-file",
            files.path("tokens.json"),
            "\"auth_tokens\":1".into(),
        ),
        ("tls-cert", cert.clone(), "\"tls\":true".into()),
        ("tls-key", files.path("key.pem"), "\"tls\":true".into()),
        (
            "tls-client-ca",
            cert,
            "\"tls_client_certificates\":true".into(),
        ),
        ("reflection", "false".into(), "\"reflection\":false".into()),
        (
            "metrics-listen",
            format!("127.0.0.1:{metrics_port}"),
            format!("\"metrics_listen\":\"127.0.0.1:{metrics_port}\""),
        ),
        number("metrics-max-namespaces", 7),
        number("metrics-timeout-ms", 20_001),
        number("metrics-max-connections", 17),
        number("keepalive-interval-ms", 30_001),
        number("keepalive-timeout-ms", 10_001),
        // A JSON start-up line is the proof.
        (
            "log-format",
            "json".into(),
            "\"message\":\"cache-money serving\"".into(),
        ),
    ]
}

/// Every flag of `Config`, given once as flags and once only as `CACHE_MONEY_*` environment
/// variables, is read: the start-up line reports each value as the server's configuration.
/// (What each setting does is proven by the behaviour, fault and security suites.)
#[test]
fn every_setting_is_read_from_flag_and_from_environment_variable() {
    let files = SettingFiles::write();
    let settings = every_setting(&files);
    let covered: Vec<&str> = settings.iter().map(|(flag, _, _)| *flag).collect();
    // --redis-cluster excludes --redis-url, so it is read in a start-up of its own below.
    for flag in config_flags()
        .into_iter()
        .filter(|flag| flag != "redis-cluster")
    {
        assert!(
            covered.contains(&flag.as_str()),
            "--{flag} is not checked here"
        );
    }
    let flags: Vec<String> = settings
        .iter()
        .flat_map(|(flag, value, _)| [format!("--{flag}"), value.clone()])
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let env: Vec<(String, String)> = settings
        .iter()
        .map(|(flag, value, _)| (env_name(flag), value.clone()))
        .collect();
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    // One after the other: both listen on the same port.
    for how in ["flags", "environment"] {
        let server = match how {
            "flags" => CacheServer::start(&flags),
            _ => CacheServer::start_with_env(&[], &env),
        };
        let line = server
            .wait_for_log("cache-money serving", common::READY_TIMEOUT)
            .unwrap();
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "{how}: {line}"
        );
        for (flag, _, shown) in &settings {
            assert!(
                line.contains(shown.as_str()),
                "{how}: --{flag}: {shown} not in {line}"
            );
        }
    }
    // Nothing listens there: the server starts anyway, NOT_SERVING; the password is redacted.
    let (a, b) = (common::free_port(), common::free_port());
    let seeds = format!("redis://:pw@127.0.0.1:{a},redis://:pw@127.0.0.1:{b}");
    let shown = format!("redis_cluster=\"redis://:***@127.0.0.1:{a},redis://:***@127.0.0.1:{b}\"");
    for server in [
        CacheServer::start(&["--redis-cluster", &seeds]),
        CacheServer::start_with_env(&[], &[("CACHE_MONEY_REDIS_CLUSTER", &seeds)]),
    ] {
        let line = server
            .wait_for_log("cache-money serving", common::READY_TIMEOUT)
            .unwrap();
        assert!(line.contains(&shown), "{shown} not in {line}");
        assert!(!line.contains("pw"), "the password was logged: {line}");
    }
}

/// Settings that cannot work stop start-up with a message naming the flag.
#[test]
fn bad_configuration_is_refused_clearly() {
    let cases: [(&[&str], &str); 11] = [
        (
            &["--key-prefix", "cache"],
            "--key-prefix: must end with a character outside [A-Za-z0-9_.-] such as ':', so entries cannot be confused with other keys; got \"cache\"",
        ),
        (
            &["--key-prefix", ""],
            "--key-prefix: must end with a character outside [A-Za-z0-9_.-]",
        ),
        (
            &["--max-response-bytes", "1000"],
            "--max-response-bytes: must be at least --max-value-bytes + 4096",
        ),
        (&["--pool-size", "0"], "--pool-size: must be at least 1"),
        (
            &["--redis-busy-poll-us", "1001"],
            "--redis-busy-poll-us: at most 1000 (a Redis that takes longer is not worth polling for), got 1001",
        ),
        (
            &["--store-timeout-ms", "1", "--redis-busy-poll-us", "1000"],
            "--redis-busy-poll-us: must be below --store-timeout-ms (1 ms = 1000 µs), got 1000",
        ),
        (
            &["--metrics-timeout-ms", "0"],
            "--metrics-timeout-ms: must be at least 1",
        ),
        (
            &["--metrics-max-connections", "0"],
            "--metrics-max-connections: must be at least 1",
        ),
        (
            &["--max-value-bytes", "9000000"],
            "--max-message-bytes: must be at least",
        ),
        (
            &["--redis-url", "localhost:6379"],
            "--redis-url: must start with redis://",
        ),
        (
            &["--metrics-listen", "localhost:9464"],
            "give an IP address and port, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051 (not a host name such as localhost), got \"localhost:9464\"",
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
    // A Redis and a Redis Cluster at once, from the environment too: refused, saying to pick.
    let both = "--redis-url and --redis-cluster are both set";
    let from_env = server()
        .args(["--listen", "127.0.0.1:0"])
        .env("CACHE_MONEY_REDIS_URL", "redis://127.0.0.1:6379")
        .env("CACHE_MONEY_REDIS_CLUSTER", "redis://127.0.0.1:7000")
        .output()
        .expect("run server");
    let from_flags = server()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:6379",
        ])
        .args(["--redis-cluster", "redis://127.0.0.1:7000"])
        .output()
        .expect("run server");
    for output in [from_env, from_flags] {
        assert!(!output.status.success(), "both stores accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(both), "{stderr}");
    }
    let output = server()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis-cluster",
            "127.0.0.1:7000",
        ])
        .output()
        .expect("run server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--redis-cluster: each seed must be a redis:// or rediss:// URL"),
        "{stderr}"
    );
}

/// A port already in use, for gRPC or for metrics, is reported as such, with the flag to
/// change.
#[test]
fn taken_port_is_reported() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (busy, free) = (addr.as_str(), "127.0.0.1:0");
    for (flag, args) in [
        ("--listen", ["--listen", busy, "--metrics-listen", free]),
        (
            "--metrics-listen",
            ["--listen", free, "--metrics-listen", busy],
        ),
    ] {
        let output = server().args(args).output().expect("run server");
        assert!(!output.status.success(), "{flag}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("cannot listen on {addr} ({flag})")),
            "{flag}: {stderr}"
        );
    }
}

/// Busy polling for Redis replies is on with the single-thread runtime and off with more
/// worker threads (where it cannot see the reply), and the start-up line says which.
#[test]
fn busy_polling_is_on_only_for_the_single_thread_runtime() {
    // Nothing listens there: the server starts anyway, NOT_SERVING.
    let url = format!("redis://127.0.0.1:{}", common::free_port());
    for (threads, polling) in [("1", true), ("2", false)] {
        let server = CacheServer::start(&["--redis-url", &url, "--worker-threads", threads]);
        let line = server
            .wait_for_log("cache-money serving", common::READY_TIMEOUT)
            .unwrap();
        assert!(
            line.contains(&format!("redis_busy_polling={polling}")),
            "{threads} threads: {line}"
        );
        assert!(line.contains("redis_busy_poll_us=50"), "{line}");
    }
    // Off by the flag, and on the in-memory store, which has no replies to wait for.
    for args in [&["--redis-url", &url, "--redis-busy-poll-us", "0"][..], &[]] {
        let server = CacheServer::start(args);
        let line = server
            .wait_for_log("cache-money serving", common::READY_TIMEOUT)
            .unwrap();
        assert!(
            line.contains("redis_busy_polling=false"),
            "{args:?}: {line}"
        );
    }
}
