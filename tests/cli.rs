//! The `cache-money` admin CLI, run as the real binary against the real server (in memory and
//! in front of a real redis-server): every subcommand in both output formats, the key spec's
//! vectors, tokens right and wrong, TLS, a down server, a frozen one, and refusals.

mod common;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cache_money::{Client, Ttl};
use common::{CacheServer, RedisServer, digest, eventually, fill, free_port};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;

/// Bound on a CLI run that must not wait for its timeout: far above a refused connection's
/// few milliseconds, far below the timeouts given in those tests.
const PROMPT: Duration = Duration::from_secs(10);

/// What one run of the CLI printed and how it exited.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the run exited with `code`; returns it for more checks.
    fn exits(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts stdout has `text`.
    fn prints(&self, text: &str) -> &Self {
        assert_has("stdout", &self.stdout, text);
        self
    }

    /// Asserts stderr has `text`.
    fn complains(&self, text: &str) -> &Self {
        assert_has("stderr", &self.stderr, text);
        self
    }

    /// Asserts stderr starts with `text`: the first thing the operator reads.
    fn complains_first(&self, text: &str) -> &Self {
        assert!(
            self.stderr.starts_with(text),
            "stderr does not start with {text:?}:\n{}",
            self.stderr
        );
        self
    }

    /// stdout as the one JSON document `--output json` promises.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!("stdout is not one JSON document ({err}):\n{}", self.stdout)
        })
    }
}

fn assert_has(stream: &str, printed: &str, text: &str) {
    assert!(
        printed.contains(text),
        "{stream} lacks {text:?}:\n{printed}"
    );
}

/// The CLI, aimed at a server through `CACHE_MONEY_SERVER`, with none of the operator's own
/// `CACHE_MONEY_*` settings.
#[derive(Debug, Clone)]
struct Cli {
    env: Vec<(String, String)>,
}

impl Cli {
    fn new(server_url: &str) -> Self {
        Cli {
            env: vec![("CACHE_MONEY_SERVER".into(), server_url.into())],
        }
    }

    fn for_server(server: &CacheServer) -> Self {
        Self::new(&server.url())
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_fed(args, None)
    }

    /// As [`Cli::run`], with `input` on standard input (else none).
    fn run_fed(&self, args: &[&str], input: Option<&[u8]>) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cache-money"));
        for name in [
            "CACHE_MONEY_SERVER",
            "CACHE_MONEY_TOKEN",
            "CACHE_MONEY_TOKEN_FILE",
            "CACHE_MONEY_TLS_CA",
            "CACHE_MONEY_TIMEOUT",
            "CACHE_MONEY_OUTPUT",
        ] {
            command.env_remove(name);
        }
        let mut child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cache-money");
        if let Some(input) = input {
            // Dropped after writing: the CLI reads to the end.
            let mut stdin = child.stdin.take().expect("piped");
            std::io::Write::write_all(&mut stdin, input).expect("feed standard input");
        }
        let output = child.wait_with_output().expect("cache-money ran");
        Run {
            code: output
                .status
                .code()
                .expect("cache-money exited, not killed"),
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
        }
    }
}

/// A folder of files for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("cache-money-cli-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `digest` gives every key vector's canonical text and digest from its JSON arguments (both
/// output formats), and refuses every invalid vector with a usage error.
#[test]
fn digest_matches_every_key_vector() {
    let file: Value =
        serde_json::from_str(include_str!("vectors/keys.json")).expect("keys.json parses");
    let field = |case: &Value, name: &str| case[name].as_str().expect(name).to_owned();
    let vectors = file["vectors"].as_array().expect("a list of vectors");
    assert!(vectors.len() >= 30, "only {} vectors", vectors.len());
    // No server is needed: this one is never started.
    let cli = Cli::new(&format!("http://127.0.0.1:{}", free_port()));
    for vector in vectors {
        let (name, args, digest) = (
            field(vector, "name"),
            field(vector, "args"),
            field(vector, "digest"),
        );
        let json = cli
            .run(&["digest", "--output", "json", &args])
            .exits(0)
            .json();
        assert_eq!(json["digest"], digest, "{name}");
        assert_eq!(json["canonical"], vector["canonical"], "{name}");
        let table = cli.run(&["digest", &args]).exits(0);
        assert!(
            table.stdout.starts_with(&format!("digest     {digest}\n")),
            "{name}: {}",
            table.stdout
        );
    }
    for invalid in file["invalid"].as_array().expect("a list of invalid cases") {
        let refused = cli.run(&["digest", &field(invalid, "args")]).exits(2);
        refused.complains("cannot make a cache key");
        assert!(
            refused.stdout.is_empty(),
            "{}: {}",
            field(invalid, "name"),
            refused.stdout
        );
    }
    cli.run(&["digest", "{\"a\": 1}"])
        .exits(2)
        .complains("ARGS: must be a JSON array");
    cli.run(&["digest", "[3, 4"])
        .exits(2)
        .complains("ARGS: not JSON");
}

/// put, get, keys and bust of one entry, in both formats: the value comes back as JSON, the
/// TTL reads as time left, a bust removes it and a miss exits 3.
fn round_trip(cli: &Cli) {
    // Every call is about one function: `COMMAND billing.invoices total REST...`.
    let call = |command: &str, rest: &[&str]| {
        let mut args = vec![command, "billing.invoices", "total"];
        args.extend_from_slice(rest);
        cli.run(&args)
    };
    let args = r#"[3, {"b": 1, "a": 2}]"#;
    let stored = call("put", &[args, r#"{"sum": 7}"#, "--ttl", "1h", "-o", "json"]);
    let stored = stored.exits(0).json();
    let digest = stored["key"]["digest"]
        .as_str()
        .expect("put names the digest");
    assert_eq!(stored["ttl_seconds"], 3600);
    // The same arguments written another way are the same entry.
    let hit = call("get", &[r#"[3,{"a":2,"b":1}]"#, "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(hit["hit"], true);
    assert_eq!(hit["encoding"], "json");
    assert_eq!(hit["value"], serde_json::json!({"sum": 7}));
    call("get", &["--digest", digest])
        .exits(0)
        .prints(r#"value  {"sum": 7}"#);

    let keys = call("keys", &["-o", "json"]).exits(0).json();
    let entries = keys["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["digest"], digest);
    let ttl_ms = entries[0]["ttl_ms"].as_u64().unwrap();
    assert!((3_500_000..=3_600_000).contains(&ttl_ms), "{ttl_ms}");
    assert!(keys["next_cursor"].is_null());
    let table = call("keys", &[]).exits(0);
    assert!(table.stdout.starts_with("DIGEST"), "{}", table.stdout);
    let time_left = |prefix: &str| table.stdout.contains(&format!("{digest}  {prefix}"));
    assert!(
        time_left("59m ") || time_left("1h"),
        "time left: {}",
        table.stdout
    );

    call("bust", &[args]).exits(0).prints("removed 1 entry");
    let again = call("bust", &["--digest", digest, "-o", "json"]).exits(0);
    assert_eq!(again.json()["removed"], 0);
    let miss = call("get", &["--digest", digest, "-o", "json"]).exits(3);
    assert_eq!(miss.json()["hit"], false);
    let miss = call("get", &["--digest", digest]).exits(3);
    miss.prints(&format!("miss: no entry billing.invoices:total:{digest}"));
}

/// An entry makes the round trip through the in-memory store.
#[test]
fn entries_round_trip_in_memory() {
    let server = CacheServer::memory(&[]);
    round_trip(&Cli::for_server(&server));
}

/// An entry makes the round trip through Redis.
#[test]
fn entries_round_trip_through_redis() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    round_trip(&Cli::for_server(&server));
}

/// Bytes that are not JSON go in with --base64 and come out as base64, in both formats.
#[test]
fn binary_values_print_as_base64() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    let digest = "0123456789abcdef0123456789abcdef";
    cli.run(&["put", "ns", "blob", "--digest", digest, "AAH/", "--base64"])
        .exits(0);
    let json = cli
        .run(&["get", "ns", "blob", "--digest", digest, "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(json["encoding"], "base64");
    assert_eq!(json["value"], "AAH/");
    let table = cli.run(&["get", "ns", "blob", "--digest", digest]).exits(0);
    table.prints("value (base64)  AAH/");
    // Text that is not JSON is refused rather than stored as something else.
    let refused = cli.run(&["put", "ns", "blob", "[1]", "hello"]).exits(2);
    refused.complains("VALUE: not JSON");
}

/// VALUE `-` reads the value from standard input: a value longer than a command line takes
/// (300 KB here) round-trips, stored without the trailing newline.
#[test]
fn long_values_come_from_standard_input() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    let long = format!("\"{}\"", "x".repeat(300_000));
    let piped = format!("{long}\n");
    cli.run_fed(&["put", "ns", "long", "[1]", "-"], Some(piped.as_bytes()))
        .exits(0);
    let json = cli
        .run(&["get", "ns", "long", "[1]", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(
        json["value"],
        serde_json::Value::String("x".repeat(300_000))
    );
}

/// What the library's memoize stored, the CLI finds with the same JSON arguments, and what
/// the CLI stored, memoize serves: both key calls alike.
#[tokio::test]
async fn the_cli_and_the_library_key_alike() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    let cm = Client::connect(server.url()).await.unwrap();
    let add = cm.function("__main__", "addition", Ttl::HOUR);
    let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await.unwrap();
    assert_eq!(sum, 7);
    let found = cli
        .run(&["get", "__main__", "addition", "[3, 4]", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(found["value"], 7);

    cli.run(&["put", "__main__", "addition", "[5, 6]", "11"])
        .exits(0);
    let served: i64 = add
        .memoize(&(5, 6), || async {
            panic!("the CLI's entry should have been served")
        })
        .await
        .unwrap();
    assert_eq!(served, 11);
}

/// Lists one function's entries by following each page's cursor; returns the digests and how
/// many pages it took.
fn list_by_cursor(cli: &Cli, namespace: &str, function: &str, limit: &str) -> (Vec<String>, usize) {
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for pages in 1..=1000 {
        let mut args = vec!["keys", namespace, function, "--limit", limit, "-o", "json"];
        if let Some(cursor) = &cursor {
            args.extend(["--cursor", cursor]);
        }
        let page = cli.run(&args).exits(0).json();
        for entry in page["entries"].as_array().unwrap() {
            listed.push(entry["digest"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (listed, pages),
        }
    }
    panic!("the listing of {namespace}:{function} never ended");
}

/// The digests `keys --all` lists, checking it says the listing is complete.
fn list_all(cli: &Cli, namespace: &str, function: &str, limit: &str) -> Vec<String> {
    let all = cli
        .run(&[
            "keys", namespace, function, "--limit", limit, "--all", "-o", "json",
        ])
        .exits(0)
        .json();
    assert!(all["next_cursor"].is_null(), "--all stopped early");
    all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// `keys` pages through the in-memory store: following each cursor, or `--all`, lists every
/// entry exactly once, and the table says where the next page starts.
#[test]
fn keys_pages_in_memory() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    let mut stored = BTreeSet::new();
    for n in 0..7 {
        let put = cli
            .run(&["put", "ns", "paged", &format!("[{n}]"), "1", "-o", "json"])
            .exits(0);
        stored.insert(put.json()["key"]["digest"].as_str().unwrap().to_owned());
    }
    let (listed, pages) = list_by_cursor(&cli, "ns", "paged", "3");
    assert!(pages >= 3, "7 entries at 3 a page came in {pages} pages");
    assert_eq!(listed.len(), 7, "each entry once: {listed:?}");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), stored);
    let all = list_all(&cli, "ns", "paged", "2");
    assert_eq!(all.len(), 7);
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), stored);
    let first_page = cli.run(&["keys", "ns", "paged", "--limit", "3"]).exits(0);
    first_page.prints("\nmore: --cursor ");
}

/// `keys` pages through Redis, where pages come from SCAN: 1000 entries at 100 a page are
/// each listed once, by cursor and with `--all`.
#[tokio::test]
async fn keys_pages_through_redis() {
    let redis = RedisServer::start();
    fill(&redis, "cm:", "paged", 1000).await;
    let server = CacheServer::redis(&redis, &[]);
    let cli = Cli::for_server(&server);
    let stored: BTreeSet<String> = (0..1000).map(digest).collect();
    let (listed, pages) = list_by_cursor(&cli, "ns", "paged", "100");
    assert!(pages >= 2, "1000 entries at 100 a page came in one page");
    assert_eq!(listed.len(), 1000, "each entry once");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), stored);
    let all = list_all(&cli, "ns", "paged", "100");
    assert_eq!(all.len(), 1000, "each entry once");
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), stored);
}

/// bust-function, bust-namespace and bust-all each remove exactly their scope and say how
/// many entries went.
#[test]
fn bust_scopes_remove_what_they_name() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let cli = Cli::for_server(&server);
    let entries = [("a", "f"), ("a", "f"), ("a", "g"), ("b", "f")];
    for (n, (namespace, function)) in entries.into_iter().enumerate() {
        cli.run(&["put", namespace, function, &format!("[{n}]"), "true"])
            .exits(0);
    }
    let function = cli
        .run(&["bust-function", "a", "f", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(function["removed"], 2);
    assert_eq!(function["scope"], "function");
    let left = |namespace: &str, function: &str| {
        let keys = cli
            .run(&["keys", namespace, function, "-o", "json"])
            .exits(0)
            .json();
        keys["entries"].as_array().unwrap().len()
    };
    assert_eq!((left("a", "f"), left("a", "g"), left("b", "f")), (0, 1, 1));
    let namespace = cli.run(&["bust-namespace", "a"]).exits(0);
    assert_eq!(namespace.stdout.trim(), "removed 1 entry (a)");
    assert_eq!((left("a", "g"), left("b", "f")), (0, 1));
    let all = cli
        .run(&["bust-all", "--yes", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(all["removed"], 1);
    assert_eq!(all["scope"], "all");
    assert_eq!(left("b", "f"), 0);
    let nothing = cli.run(&["bust-all", "--yes"]).exits(0);
    assert_eq!(
        nothing.stdout.trim(),
        "removed 0 entries (everything cache-money stored)"
    );
}

/// `put --tag` writes tagged entries and `bust-tag` removes exactly the ones carrying the
/// tag in that namespace (text and JSON reports); a bad tag is refused, writing nothing.
#[test]
fn put_tag_and_bust_tag() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    for (function, n, tags) in [
        ("profile", 7, &["--tag", "user:7"][..]),
        ("orders", 7, &["--tag", "user:7", "--tag", "shop:1"][..]),
        ("avatar", 7, &["--tag", "user:7"][..]),
        ("profile", 8, &["--tag", "user:8"][..]),
    ] {
        let args = format!("[{n}]");
        let mut command = vec!["put", "app", function, args.as_str(), "1"];
        command.extend_from_slice(tags);
        cli.run(&command).exits(0);
    }
    let busted = cli.run(&["bust-tag", "app", "user:7"]).exits(0);
    assert_eq!(
        busted.stdout.trim(),
        "removed 3 entries (tag \"user:7\" in app)"
    );
    let left = |function: &str, n: u32| cli.run(&["get", "app", function, &format!("[{n}]")]).code;
    assert_eq!(
        (
            left("profile", 7),
            left("orders", 7),
            left("avatar", 7),
            left("profile", 8)
        ),
        (3, 3, 3, 0)
    );
    let json = cli
        .run(&["bust-tag", "app", "user:8", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(json["scope"], "tag");
    assert_eq!(json["key"]["tag"], "user:8");
    assert_eq!(json["removed"], 1);
    let refused = cli.run(&["put", "app", "f", "[1]", "1", "--tag", ""]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("tags[0]"), "{}", refused.stderr);
    assert_eq!(left("f", 1), 3, "a refused put wrote");
}

/// bust-all with standard input not a terminal and no --yes is refused at once with a usage
/// error, and nothing is removed.
#[test]
fn bust_all_without_yes_or_terminal_is_refused() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    cli.run(&["put", "ns", "kept", "[1]", "1"]).exits(0);
    let started = Instant::now();
    let refused = cli.run(&["bust-all"]).exits(2);
    assert!(started.elapsed() < PROMPT, "bust-all waited for input");
    refused
        .complains("not a terminal")
        .complains("--yes")
        .complains(&server.url());
    cli.run(&["get", "ns", "kept", "[1]"]).exits(0);
}

/// stats reports the server's counters after a known sequence of calls, in both formats.
#[test]
fn stats_count_what_happened() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    cli.run(&["put", "ns", "f", "[1]", "1"]).exits(0);
    cli.run(&["put", "ns", "f", "[2]", "2"]).exits(0);
    cli.run(&["get", "ns", "f", "[1]"]).exits(0);
    cli.run(&["get", "ns", "f", "[3]"]).exits(3);
    cli.run(&["bust", "ns", "f", "[2]"]).exits(0);
    let stats = cli.run(&["stats", "-o", "json"]).exits(0).json();
    assert_eq!(
        (
            &stats["hits"],
            &stats["misses"],
            &stats["puts"],
            &stats["busts"],
            &stats["busted_entries"]
        ),
        (
            &Value::from(1),
            &Value::from(1),
            &Value::from(2),
            &Value::from(1),
            &Value::from(1)
        ),
        "{stats}"
    );
    assert_eq!(stats["store"], "memory");
    assert_eq!(stats["store_up"], true);
    // The CLI's own lookups ask for no lease.
    assert_eq!(
        (&stats["leases_won"], &stats["lease_waits"]),
        (&Value::from(0), &Value::from(0))
    );
    let table = cli.run(&["stats"]).exits(0);
    table.prints("store           memory (up)");
    table.prints("hit ratio       50.0%");
    table.prints("leases won      0");
    table.prints("refused writes  0");
}

/// health exits 0 with SERVING while Redis answers, and non-zero with NOT_SERVING once it is
/// gone (a container healthcheck), in both formats.
#[tokio::test]
async fn health_follows_the_store() {
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &[]);
    let cli = Cli::for_server(&server);
    let serving = cli.run(&["health"]).exits(0);
    assert_eq!(serving.stdout.trim(), "cache_money.v1.CacheMoney: SERVING");
    assert_eq!(
        cli.run(&["health", "-o", "json"]).exits(0).json()["status"],
        "SERVING"
    );
    redis.kill();
    let noticed = eventually(common::READY_TIMEOUT, || async {
        cli.run(&["health"]).code == 1
    })
    .await;
    assert!(noticed, "health never reported the store down");
    let down = cli.run(&["health", "-o", "json"]).exits(1).json();
    assert_eq!(down["status"], "NOT_SERVING");
    let down = cli.run(&["health"]).exits(1);
    assert_eq!(down.stdout.trim(), "cache_money.v1.CacheMoney: NOT_SERVING");
}

const BILLING: &str = "billing-token-5f2c9a71e0";
const OPS: &str = "ops-token-9d8c7b6a5f4e3d";

/// Tokens from CACHE_MONEY_TOKEN or --token-file are sent; a missing or wrong token and a
/// token without the right fail with the gRPC code and the server's message, exit 1.
#[test]
fn tokens_are_sent_and_refusals_explained() {
    let grants = format!(
        r#"{{"tokens": [
            {{"name": "billing", "token": "{BILLING}", "read": ["billing"], "write": ["billing"]}},
            {{"name": "ops", "token": "{OPS}", "read": ["*"], "write": ["*"], "admin": true}}
        ]}}"#
    );
    let server = CacheServer::start_with_env(&[], &[("CACHE_MONEY_AUTH_TOKENS", &grants)]);
    let anonymous = Cli::for_server(&server);
    let none = anonymous.run(&["get", "billing", "f", "[1]"]).exits(1);
    none.complains_first("error: cache-money answered Unauthenticated: missing credentials");

    let wrong = anonymous
        .clone()
        .env("CACHE_MONEY_TOKEN", "not-a-configured-token-1234");
    let refused = wrong.run(&["stats"]).exits(1);
    assert_eq!(
        refused.stderr.trim(),
        "error: cache-money answered Unauthenticated: authorization: unknown token"
    );
    let refused = wrong.run(&["stats", "-o", "json"]).exits(1).json();
    assert_eq!(refused["error"]["code"], "Unauthenticated");

    let billing = anonymous.clone().env("CACHE_MONEY_TOKEN", BILLING);
    billing.run(&["put", "billing", "f", "[1]", "1"]).exits(0);
    billing.run(&["get", "billing", "f", "[1]"]).exits(0);
    let denied = billing.run(&["bust-all", "--yes"]).exits(1);
    denied
        .complains_first("error: cache-money answered PermissionDenied: token \"billing\" may not");
    let denied = billing
        .run(&["get", "shipping", "f", "[1]", "-o", "json"])
        .exits(1)
        .json();
    assert_eq!(denied["error"]["code"], "PermissionDenied");

    // --token-file wins over the environment, so the wrong token above does not get in.
    let scratch = Scratch::new();
    let ops_file = scratch.write("ops-token", &format!("{OPS}\n"));
    let ops = wrong.env("CACHE_MONEY_TOKEN_FILE", &ops_file);
    let all = ops
        .run(&["bust-all", "--yes", "-o", "json"])
        .exits(0)
        .json();
    assert_eq!(all["removed"], 1);
    Cli::for_server(&server)
        .run(&["keys", "billing", "f", "--token-file", &ops_file])
        .exits(0);
    // Health needs no token.
    anonymous.run(&["health"]).exits(0);
    // The help says where the token goes, and there is no flag to put it in `ps`.
    anonymous
        .run(&["--help"])
        .exits(0)
        .prints("CACHE_MONEY_TOKEN")
        .prints("no --token flag");
    anonymous
        .run(&["stats", "--token", OPS])
        .exits(2)
        .complains("unexpected argument '--token'");
}

/// With nothing listening, every subcommand that calls the server fails at once with a
/// message naming the address, exit 1; none waits for its timeout.
#[test]
fn a_down_server_fails_fast_and_clearly() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let cli = Cli::new("http://127.0.0.1:1");
    let calls: [&[&str]; 9] = [
        &["get", "ns", "f", "[1]"],
        &["put", "ns", "f", "[1]", "1"],
        &["bust", "ns", "f", "[1]"],
        &["bust-function", "ns", "f"],
        &["bust-namespace", "ns"],
        &["bust-all", "--yes"],
        &["keys", "ns", "f"],
        &["stats"],
        &["health"],
    ];
    for call in calls {
        let mut args = call.to_vec();
        args.extend(["--server", url.as_str(), "--timeout", "60s"]);
        let started = Instant::now();
        let failed = cli.run(&args).exits(1);
        assert!(
            started.elapsed() < PROMPT,
            "{call:?} waited for its timeout"
        );
        let expected = format!(
            "error: cannot reach cache-money at {url} (--server, CACHE_MONEY_SERVER): Unavailable:"
        );
        failed.complains_first(&expected);
        assert!(
            failed.stderr.contains("Connection refused"),
            "{call:?}: {}",
            failed.stderr
        );
    }
    let json = cli
        .run(&["stats", "--server", &url, "-o", "json"])
        .exits(1)
        .json();
    assert_eq!(json["error"]["code"], "Unavailable");
}

/// A server that accepts connections but never answers is given up on after --timeout, with
/// a message saying so, exit 1.
#[test]
fn a_frozen_server_is_bounded_by_the_timeout() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    server.freeze();
    let started = Instant::now();
    let timed_out = cli.run(&["stats", "--timeout", "500ms"]);
    let elapsed = started.elapsed();
    server.thaw();
    let timed_out = timed_out.exits(1);
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < PROMPT,
        "{elapsed:?}"
    );
    assert_eq!(
        timed_out.stderr.trim(),
        format!(
            "error: cache-money at {} did not answer within 500ms (--timeout)",
            server.url()
        )
    );
    cli.run(&["stats"]).exits(0);
}

/// A bust the server does not finish within --timeout is reported as cancelled, warning that
/// some entries may already be gone (not as a call that did nothing), exit 1.
#[test]
fn a_bust_cut_off_by_the_timeout_says_entries_may_be_gone() {
    let server = CacheServer::memory(&[]);
    let cli = Cli::for_server(&server);
    server.freeze();
    let timed_out = cli.run(&["bust-namespace", "ns", "--timeout", "500ms", "-o", "json"]);
    server.thaw();
    let json = timed_out.exits(1).json();
    assert_eq!(json["error"]["code"], "DeadlineExceeded");
    assert_eq!(
        json["error"]["message"],
        format!(
            "bust cancelled after 500ms (--timeout) waiting for cache-money at {}; some entries \
             may already have been removed",
            server.url()
        )
    );
}

/// --tls-ca verifies an https:// server against the given CA; without it the certificate is
/// refused and the reason printed.
#[test]
fn tls_ca_verifies_https_servers() {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &Issuer::new(ca_params, ca_key))
        .unwrap();
    let scratch = Scratch::new();
    let ca_path = scratch.write("ca.pem", &ca.pem());
    let cert_path = scratch.write("server.pem", &server_cert.pem());
    let key_path = scratch.write("server.key", &server_key.serialize_pem());
    let server = CacheServer::memory(&["--tls-cert", &cert_path, "--tls-key", &key_path]);
    let cli = Cli::new(&format!("https://{}", server.addr()));

    cli.run(&[
        "put",
        "ns",
        "f",
        "[1]",
        "\"over tls\"",
        "--tls-ca",
        &ca_path,
    ])
    .exits(0);
    let hit = cli
        .run(&["get", "ns", "f", "[1]", "--tls-ca", &ca_path, "-o", "json"])
        .exits(0);
    assert_eq!(hit.json()["value"], "over tls");
    cli.clone()
        .env("CACHE_MONEY_TLS_CA", &ca_path)
        .run(&["health"])
        .exits(0);

    let untrusted = cli.run(&["stats"]).exits(1);
    untrusted.complains("invalid peer certificate");
    let unreadable = cli
        .run(&["stats", "--tls-ca", "/nonexistent/ca.pem"])
        .exits(2);
    unreadable.complains_first("error: --tls-ca: cannot read");
}

/// Bad names, digests, TTLs and argument counts are usage errors (exit 2) naming what is
/// wrong, caught before anything is sent.
#[test]
fn usage_errors_name_the_argument() {
    // Nothing listens here: a usage error must not need the server.
    let cli = Cli::new(&format!("http://127.0.0.1:{}", free_port()));
    let cases: [(&[&str], &str); 7] = [
        (
            &["get", "a:b", "f", "[1]"],
            "error: namespace: must be 1-128 bytes",
        ),
        (
            &["bust-function", "ns", "f*"],
            "error: function: must be 1-128 bytes",
        ),
        (
            &["bust-namespace", "a b"],
            "error: namespace: must be 1-128 bytes",
        ),
        (
            &["get", "ns", "f", "--digest", "ABC"],
            "error: --digest: must be 32 lowercase hex",
        ),
        (
            &["put", "ns", "f", "[1]", "1", "--ttl", "1500ms"],
            "--ttl <TTL>': must be a whole number of seconds",
        ),
        (
            &[
                "put",
                "ns",
                "f",
                "--digest",
                "0123456789abcdef0123456789abcdef",
                "[1]",
                "1",
            ],
            "error: put: give ARGS and VALUE",
        ),
        (
            &["stats", "--server", "127.0.0.1:50051"],
            "error: --server: cache-money url:",
        ),
    ];
    for (args, expected) in cases {
        cli.run(args).exits(2).complains(expected);
    }
    let json = cli
        .run(&["get", "a:b", "f", "[1]", "-o", "json"])
        .exits(2)
        .json();
    assert_eq!(json["error"]["code"], "Usage");
}
