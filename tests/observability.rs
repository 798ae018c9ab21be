//! Operating the server: Prometheus metrics on `--metrics-listen` (exact values after a known
//! sequence of RPCs, read by the official Python parsers), the namespace cap, refused and shed
//! requests counted, the listener's bounds, the Grafana dashboard's queries checked against
//! what the server exports, and request ids in responses and logs. The parsers come from the
//! virtualenv `scripts/test` creates (`.venv`, or `CACHE_MONEY_PYTHON`).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cache_money::pb::{self, cache_money_client::CacheMoneyClient};
use cache_money::server::metrics::LATENCY_BUCKETS;
use cache_money::server::store::{MEMORY_COMMANDS, redis::REDIS_COMMANDS};
use common::{
    CacheServer, READY_TIMEOUT, RedisServer, eventually, get, http_get, http_request, key, put,
    venv_python,
};
use serde_json::Value;
use tonic::{Code, Request, transport::Channel};

/// The metrics text formats, and the parser that reads each.
#[derive(Debug, Clone, Copy)]
enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    fn accept(self) -> &'static [&'static str] {
        match self {
            Format::OpenMetrics => &["Accept: application/openmetrics-text; version=1.0.0"],
            Format::Prometheus => &[],
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    fn parser(self) -> &'static str {
        match self {
            Format::OpenMetrics => "openmetrics",
            Format::Prometheus => "prometheus",
        }
    }
}

/// A sample's name, its labels and the value it must have.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// One sample of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` page as the official parser read it.
#[derive(Debug)]
struct Scrape {
    /// Each family's name and type.
    families: Vec<(String, String)>,
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// Scrapes `server` in `format` and parses the page; fails when the parser refuses it.
    fn of(server: &CacheServer, format: Format) -> Self {
        let reply = http_get(server.metrics_addr(), "/metrics", format.accept());
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some(format.content_type()));
        Self::parse(reply.body, format)
    }

    fn parse(text: String, format: Format) -> Self {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/parse_metrics.py");
        let mut parser = Command::new(venv_python())
            .arg(script)
            .arg(format.parser())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the metrics parser");
        parser
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("hand the page to the parser");
        let output = parser.wait_with_output().expect("the parser finishes");
        assert!(
            output.status.success(),
            "the {} parser refused the page:\n{}\n--- page ---\n{text}",
            format.parser(),
            String::from_utf8_lossy(&output.stderr)
        );
        let parsed: Vec<Value> = serde_json::from_slice(&output.stdout).expect("parser JSON");
        let mut scrape = Scrape {
            families: Vec::new(),
            samples: Vec::new(),
            text,
        };
        for family in parsed {
            let text = |value: &Value| value.as_str().expect("a string").to_owned();
            scrape
                .families
                .push((text(&family["name"]), text(&family["type"])));
            for sample in family["samples"].as_array().expect("samples") {
                scrape.samples.push(Sample {
                    name: text(&sample["name"]),
                    labels: sample["labels"]
                        .as_object()
                        .expect("labels")
                        .iter()
                        .map(|(name, value)| (name.clone(), text(value)))
                        .collect(),
                    value: sample["value"].as_f64().expect("a number"),
                });
            }
        }
        scrape
    }

    /// The value of the sample `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == labels)
            .map(|sample| sample.value)
    }

    /// As [`Scrape::value`], failing with the page when the sample is missing.
    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// Checks the histogram `name` with `labels`: exactly the buckets of [`LATENCY_BUCKETS`]
    /// and `+Inf`, cumulative counts, `+Inf` equal to `_count`, and that count; a positive
    /// `_sum`.
    fn check_histogram(&self, name: &str, labels: &[(&str, &str)], count: f64) {
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|sample| sample.name == format!("{name}_bucket"))
            .filter(|sample| {
                labels.iter().all(|(label, value)| {
                    sample.labels.get(*label).map(String::as_str) == Some(value)
                })
            })
            .map(|sample| {
                let le = sample.labels.get("le").expect("a bucket has le");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                (bound, sample.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bounds: Vec<f64> = buckets.iter().map(|bucket| bucket.0).collect();
        let expected: Vec<f64> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .collect();
        assert_eq!(bounds, expected, "{name}{labels:?}: bucket bounds");
        assert!(
            buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1),
            "{name}{labels:?}: not cumulative: {buckets:?}"
        );
        assert_eq!(buckets.last().map(|bucket| bucket.0), Some(f64::INFINITY));
        assert_eq!(
            buckets.last().map(|bucket| bucket.1),
            Some(count),
            "{name}{labels:?}"
        );
        assert_eq!(self.expect(&format!("{name}_count"), labels), count);
        assert!(self.expect(&format!("{name}_sum"), labels) > 0.0);
    }

    /// The count of the histogram `name`'s bucket with upper bound `le` (seconds), among the
    /// samples with `labels`.
    fn bucket(&self, name: &str, labels: &[(&str, &str)], le: f64) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.name == format!("{name}_bucket"))
            .filter(|sample| {
                labels.iter().all(|(label, value)| {
                    sample.labels.get(*label).map(String::as_str) == Some(value)
                })
            })
            .find(|sample| {
                sample
                    .labels
                    .get("le")
                    .and_then(|le| le.parse::<f64>().ok())
                    == Some(le)
            })
            .map(|sample| sample.value)
            .unwrap_or_else(|| panic!("no {name}_bucket{labels:?} le={le} in\n{}", self.text))
    }

    /// The sample names PromQL may use: `_total` of counters, `_bucket`/`_sum`/`_count` of
    /// histograms, `_info` of info metrics, gauges by name.
    fn queryable_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (family, kind) in &self.families {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{family}{suffix}")));
        }
        names
    }
}

/// A Get of `key`.
fn get_of(key: pb::Key) -> pb::GetRequest {
    common::get_request(key)
}

/// `message` with a bearer token and a request id, each when given.
fn tagged<T>(message: T, token: Option<&str>, request_id: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let bearer = format!("Bearer {token}").parse().unwrap();
        request.metadata_mut().insert("authorization", bearer);
    }
    if let Some(id) = request_id {
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
    }
    request
}

async fn bust(cm: &mut CacheMoneyClient<Channel>, key: pb::Key) -> u64 {
    cm.bust(pb::BustRequest { key: Some(key) })
        .await
        .expect("Bust succeeds")
        .into_inner()
        .removed
}

/// After a known sequence of RPCs against Redis, each counter has its exact value in both
/// text formats, histograms have ordered cumulative buckets ending in `+Inf` = count, and the
/// official OpenMetrics and Prometheus parsers both accept the page.
#[tokio::test]
async fn metrics_count_a_known_sequence_exactly() {
    let redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--metrics-listen", "127.0.0.1:0"]);
    let mut cm = server.client().await;
    cm.put(put(key("billing", "invoice", 1), b"hello", 60))
        .await
        .unwrap();
    cm.put(put(key("billing", "invoice", 2), b"ab", 60))
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(get(&mut cm, key("billing", "invoice", 1)).await.is_some());
    }
    for _ in 0..2 {
        assert!(get(&mut cm, key("billing", "invoice", 3)).await.is_none());
    }
    let keys = vec![key("billing", "invoice", 1), key("shipping", "label", 9)];
    let found = cm
        .get_many(pb::GetManyRequest { keys })
        .await
        .unwrap()
        .into_inner();
    let hits: Vec<bool> = found.results.iter().map(|result| result.hit).collect();
    assert_eq!(hits, [true, false]);
    let entries = vec![put(key("shipping", "label", 1), b"xyz", 60)];
    cm.put_many(pb::PutManyRequest { entries }).await.unwrap();
    let bad_digest = pb::Key {
        digest: "not-a-digest".into(),
        ..key("billing", "invoice", 1)
    };
    let refused = cm.get(common::get_request(bad_digest)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(bust(&mut cm, key("billing", "invoice", 2)).await, 1);
    assert_eq!(
        common::bust_function(&mut cm, "billing", "invoice").await,
        1
    );
    let namespace = pb::BustNamespaceRequest {
        namespace: "shipping".into(),
    };
    assert_eq!(
        cm.bust_namespace(namespace)
            .await
            .unwrap()
            .into_inner()
            .removed,
        1
    );
    let tag = pb::BustTagRequest {
        namespace: "billing".into(),
        tag: "user:7".into(),
    };
    assert_eq!(cm.bust_tag(tag).await.unwrap().into_inner().removed, 0);
    let stats = cm.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (stats.hits, stats.misses, stats.puts),
        (4, 3, 3),
        "Stats keeps counting"
    );

    let version = env!("CARGO_PKG_VERSION");
    let expected: &[Expected] = &[
        (
            "cache_money_rpcs_total",
            &[("method", "Put"), ("code", "OK")],
            2.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Get"), ("code", "OK")],
            5.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Get"), ("code", "INVALID_ARGUMENT")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "GetMany"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "PutMany"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Bust"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "BustFunction"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "BustNamespace"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "BustTag"), ("code", "OK")],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Stats"), ("code", "OK")],
            1.0,
        ),
        ("cache_money_rpcs_in_flight", &[], 0.0),
        (
            "cache_money_lookups_total",
            &[("namespace", "billing"), ("result", "hit")],
            4.0,
        ),
        (
            "cache_money_lookups_total",
            &[("namespace", "billing"), ("result", "miss")],
            2.0,
        ),
        (
            "cache_money_lookups_total",
            &[("namespace", "billing"), ("result", "error")],
            0.0,
        ),
        (
            "cache_money_lookups_total",
            &[("namespace", "shipping"), ("result", "hit")],
            0.0,
        ),
        (
            "cache_money_lookups_total",
            &[("namespace", "shipping"), ("result", "miss")],
            1.0,
        ),
        (
            "cache_money_read_bytes_total",
            &[("namespace", "billing")],
            20.0,
        ),
        (
            "cache_money_read_bytes_total",
            &[("namespace", "shipping")],
            0.0,
        ),
        (
            "cache_money_written_bytes_total",
            &[("namespace", "billing")],
            7.0,
        ),
        (
            "cache_money_written_bytes_total",
            &[("namespace", "shipping")],
            3.0,
        ),
        ("cache_money_busts_total", &[("scope", "entry")], 1.0),
        ("cache_money_busts_total", &[("scope", "function")], 1.0),
        ("cache_money_busts_total", &[("scope", "namespace")], 1.0),
        ("cache_money_busts_total", &[("scope", "tag")], 1.0),
        ("cache_money_busted_entries_total", &[("scope", "tag")], 0.0),
        (
            "cache_money_busted_entries_total",
            &[("scope", "entry")],
            1.0,
        ),
        (
            "cache_money_busted_entries_total",
            &[("scope", "function")],
            1.0,
        ),
        (
            "cache_money_busted_entries_total",
            &[("scope", "namespace")],
            1.0,
        ),
        ("cache_money_requests_shed_total", &[], 0.0),
        ("cache_money_store_up", &[("store", "redis")], 1.0),
        ("cache_money_store_operations_in_flight", &[], 0.0),
        ("cache_money_store_pool_connections_broken_total", &[], 0.0),
        ("cache_money_build_info", &[("version", version)], 1.0),
    ];
    for format in [Format::OpenMetrics, Format::Prometheus] {
        let scrape = Scrape::of(&server, format);
        for (name, labels, value) in expected {
            assert_eq!(
                scrape.expect(name, labels),
                *value,
                "{format:?}: {name}{labels:?}"
            );
        }
        assert!(scrape.expect("cache_money_store_pool_connections", &[]) >= 1.0);
        assert!(scrape.expect("cache_money_store_pool_connections_opened_total", &[]) >= 1.0);
        // OpenMetrics reserves `_created` for a counter's creation time.
        assert!(
            !scrape
                .families
                .iter()
                .any(|(family, _)| family.ends_with("_created")),
            "{format:?}: a family named …_created: {:?}",
            scrape.families
        );
        scrape.check_histogram(
            "cache_money_rpc_duration_seconds",
            &[("method", "Get"), ("outcome", "ok")],
            5.0,
        );
        // Seconds, not milliseconds: a Get over loopback takes well under 0.1 s, so all five
        // are in the bucket of 0.1 s (in milliseconds they would be counted past it).
        assert_eq!(
            scrape.bucket(
                "cache_money_rpc_duration_seconds",
                &[("method", "Get"), ("outcome", "ok")],
                0.1
            ),
            5.0,
            "{format:?}: loopback Gets slower than 0.1 s"
        );
        scrape.check_histogram(
            "cache_money_rpc_duration_seconds",
            &[("method", "Get"), ("outcome", "error")],
            1.0,
        );
        scrape.check_histogram(
            "cache_money_rpc_duration_seconds",
            &[("method", "Put"), ("outcome", "ok")],
            2.0,
        );
        for (command, count) in [
            ("GET", 5.0),
            ("MGET", 1.0),
            ("SET+XADD", 2.0),
            ("SET (batch)", 1.0),
        ] {
            scrape.check_histogram(
                "cache_money_store_command_duration_seconds",
                &[("command", command)],
                count,
            );
        }
        assert!(
            !scrape.text.contains(&common::digest(1)),
            "{format:?}: a digest became a label"
        );
    }
}

/// Requests refused by authentication or authorization and requests shed at
/// `--max-in-flight` are counted by method and status code (the shed lookup as `shed` in its
/// namespace, not as a store error) and timed under `outcome="error"`, while the in-flight gauges show the request
/// holding the only permit.
#[tokio::test]
async fn refused_and_shed_requests_are_counted() {
    const TOKEN: &str = "billing-token-0123456789";
    let redis = RedisServer::start();
    let grants = format!(
        r#"{{"tokens": [{{"name": "billing", "token": "{TOKEN}", "read": ["billing"], "write": ["billing"]}}]}}"#
    );
    let url = redis.url();
    let server = CacheServer::start_with_env(
        &[
            "--redis-url",
            &url,
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-in-flight",
            "1",
            "--store-timeout-ms",
            "10000",
        ],
        &[("CACHE_MONEY_AUTH_TOKENS", &grants)],
    );
    let mut cm = server.client().await;
    let refused = cm
        .get(tagged(get_of(key("billing", "f", 1)), None, None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = cm
        .get(tagged(get_of(key("shipping", "f", 1)), Some(TOKEN), None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // A write Redis holds back (CLIENT PAUSE WRITE) keeps the only permit.
    let mut admin = redis.connect().await;
    RedisServer::pause_writes(&mut admin, 10_000).await;
    let mut writer = cm.clone();
    let write = tagged(put(key("billing", "f", 2), b"v", 60), Some(TOKEN), None);
    let held = tokio::spawn(async move { writer.put(write).await });
    let metrics = server.metrics_addr();
    let holding = eventually(READY_TIMEOUT, || async move {
        http_get(metrics, "/metrics", &[])
            .body
            .lines()
            .any(|line| line == "cache_money_store_operations_in_flight 1")
    })
    .await;
    assert!(holding, "the write never took the permit");
    let shed = cm
        .get(tagged(get_of(key("billing", "f", 3)), Some(TOKEN), None))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");

    let scrape = Scrape::of(&server, Format::OpenMetrics);
    for (name, labels, value) in [
        (
            "cache_money_rpcs_total",
            &[("method", "Get"), ("code", "UNAUTHENTICATED")][..],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Get"), ("code", "PERMISSION_DENIED")][..],
            1.0,
        ),
        (
            "cache_money_rpcs_total",
            &[("method", "Get"), ("code", "RESOURCE_EXHAUSTED")][..],
            1.0,
        ),
        ("cache_money_requests_shed_total", &[][..], 1.0),
        (
            "cache_money_lookups_total",
            &[("namespace", "billing"), ("result", "shed")][..],
            1.0,
        ),
        (
            "cache_money_lookups_total",
            &[("namespace", "billing"), ("result", "error")][..],
            0.0,
        ),
        ("cache_money_rpcs_in_flight", &[][..], 1.0),
        ("cache_money_store_operations_in_flight", &[][..], 1.0),
    ] {
        assert_eq!(scrape.expect(name, labels), value, "{name}{labels:?}");
    }
    assert_eq!(
        scrape.value(
            "cache_money_lookups_total",
            &[("namespace", "shipping"), ("result", "miss")]
        ),
        None
    );
    // Refusals are timed apart from answered RPCs, so they cannot pull the latency of
    // answered Gets down.
    scrape.check_histogram(
        "cache_money_rpc_duration_seconds",
        &[("method", "Get"), ("outcome", "error")],
        3.0,
    );
    assert_eq!(
        scrape.value(
            "cache_money_rpc_duration_seconds_count",
            &[("method", "Get"), ("outcome", "ok")]
        ),
        None
    );

    RedisServer::unpause(&mut admin).await;
    held.await.unwrap().expect("the held write completes");
    let scrape = Scrape::of(&server, Format::OpenMetrics);
    assert_eq!(
        scrape.expect(
            "cache_money_rpcs_total",
            &[("method", "Put"), ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(scrape.expect("cache_money_rpcs_in_flight", &[]), 0.0);
}

/// With `--metrics-max-namespaces 2`, the first two namespaces keep their own series and
/// every later one is counted under `other`; none of them gets a series.
#[tokio::test]
async fn namespaces_past_the_cap_are_counted_as_other() {
    let server = CacheServer::memory(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-max-namespaces",
        "2",
    ]);
    let mut cm = server.client().await;
    for namespace in ["first", "second", "third", "fourth", "third", "first"] {
        assert!(get(&mut cm, key(namespace, "f", 1)).await.is_none());
    }
    let scrape = Scrape::of(&server, Format::Prometheus);
    let misses = |namespace| {
        scrape.value(
            "cache_money_lookups_total",
            &[("namespace", namespace), ("result", "miss")],
        )
    };
    assert_eq!(misses("first"), Some(2.0));
    assert_eq!(misses("second"), Some(1.0));
    assert_eq!(misses("other"), Some(3.0));
    assert_eq!(misses("third"), None);
    assert_eq!(misses("fourth"), None);
    let namespaces: HashSet<&str> = scrape
        .samples
        .iter()
        .filter_map(|sample| sample.labels.get("namespace").map(String::as_str))
        .collect();
    assert_eq!(namespaces, HashSet::from(["first", "second", "other"]));
}

/// The metrics listener answers 404 to anything but `GET /metrics`, keeps serving scrapes
/// while a client sends nothing, and closes that client's connection after
/// `--metrics-timeout-ms`.
#[test]
fn metrics_listener_is_small_and_bounded() {
    let server = CacheServer::memory(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-timeout-ms",
        "300",
    ]);
    let addr = server.metrics_addr();
    assert_eq!(http_get(addr, "/", &[]).status, 404);
    assert_eq!(http_get(addr, "/metrics/extra", &[]).status, 404);
    assert_eq!(
        http_request(addr, "POST", "/metrics", &["Content-Length: 0"]).status,
        404
    );
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let started = Instant::now();
    let scrape = http_get(addr, "/metrics", &[]);
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("cache_money_rpcs_in_flight 0"),
        "{}",
        scrape.body
    );
    let mut buffer = [0u8; 64];
    let read = silent.read(&mut buffer);
    assert!(
        matches!(read, Ok(0)),
        "the silent connection was not closed: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Whether `GET /metrics` over a new connection to `addr` is answered 200; false when the
/// listener closes the connection without an answer.
fn scrape_answered(addr: std::net::SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics listener");
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    // A write to a connection the listener already closed may fail; that is "no answer".
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 200")
}

/// With `--metrics-max-connections` silent connections open, every further connection is
/// closed at once (long before `--metrics-timeout-ms`), a scrape included; once the silent
/// ones go away, scrapes are answered again.
#[tokio::test]
async fn metrics_connections_past_the_cap_are_closed_at_once() {
    let server = CacheServer::memory(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-timeout-ms",
        "60000",
        "--metrics-max-connections",
        "2",
    ]);
    let addr = server.metrics_addr();
    // Accepted in order, so these two take both places.
    let holders: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    for extra in 0..3 {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        let mut buffer = [0u8; 64];
        let read = stream.read(&mut buffer);
        assert!(
            matches!(&read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|err| err.kind() == ErrorKind::ConnectionReset),
            "connection {extra} past the cap was not closed: {read:?}"
        );
    }
    assert!(!scrape_answered(addr), "a scrape past the cap was served");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
    drop(holders);
    let served = eventually(READY_TIMEOUT, || async move { scrape_answered(addr) }).await;
    assert!(
        served,
        "scrapes are not served once the silent connections closed"
    );
}

/// The README's table lists exactly the `command` label values each store records (Redis's
/// `STRLEN` and memory's `value_bytes` included), in the stores' order.
#[test]
fn readme_lists_every_store_command_label() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("read README.md");
    let row = readme
        .lines()
        .find(|line| line.starts_with("| `cache_money_store_command_duration_seconds`"))
        .expect("the README has a row for the store command histogram");
    // The label values: backticked items, each followed by `,`, ` (`, `;` or `)`.
    let listed = |after: &str, until: &str| -> Vec<String> {
        let start = row
            .find(after)
            .unwrap_or_else(|| panic!("no {after:?} in {row}"))
            + after.len();
        let part = &row[start..];
        let part = &part[..part.find(until).unwrap_or(part.len())];
        part.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(listed("Redis:", "; in memory:"), REDIS_COMMANDS, "{row}");
    assert_eq!(listed("in memory:", "|"), MEMORY_COMMANDS, "{row}");
}

/// The names PromQL `expr` mentions that start with `cache_money_`.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.match_indices("cache_money_")
        .map(|(start, _)| {
            let rest = &expr[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// The selector written after each `cache_money_` metric `expr` names (`{…}` without the
/// braces); `None` for a name with no selector.
fn metric_selectors(expr: &str) -> Vec<(&str, Option<&str>)> {
    metric_names(expr)
        .into_iter()
        .zip(expr.match_indices("cache_money_"))
        .map(|(name, (start, _))| {
            let selector = expr[start + name.len()..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(selector, _)| selector);
            (name, selector)
        })
        .collect()
}

/// The Grafana dashboard is well formed and reusable: every panel and query uses the
/// `${datasource}` template variable (whose default is the datasource Grafana is provisioned
/// with) and filters every metric by the `$job` and `$instance` variables; it covers hit
/// ratio, RPC rate and latency, errors, busts, store latency and shed load, and every metric
/// its queries (variables' included) name is one a real server exports (histograms through
/// `_bucket`, `_sum` and `_count` of an exported histogram).
#[tokio::test]
async fn dashboard_queries_name_only_exported_metrics() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana");
    let read = |path: &str| {
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
    };
    let datasources = read("provisioning/datasources/prometheus.yml");
    let uid = datasources
        .lines()
        .find_map(|line| line.trim().strip_prefix("uid:"))
        .expect("the datasource has a uid")
        .trim();
    let dashboard: Value =
        serde_json::from_str(&read("cache-money.json")).expect("the dashboard is JSON");
    assert!(dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty()));
    assert!(
        dashboard["title"]
            .as_str()
            .is_some_and(|title| !title.is_empty())
    );
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());

    // Traffic that gives every family a sample: the parser leaves out families without one.
    let mut redis = RedisServer::start();
    let server = CacheServer::redis(&redis, &["--metrics-listen", "127.0.0.1:0"]);
    let mut cm = server.client().await;
    cm.put(put(key("billing", "invoice", 1), b"v", 60))
        .await
        .unwrap();
    assert!(get(&mut cm, key("billing", "invoice", 1)).await.is_some());
    assert_eq!(bust(&mut cm, key("billing", "invoice", 1)).await, 1);
    redis.kill();
    let failed = cm
        .get(get_of(key("billing", "invoice", 1)))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let exported = Scrape::of(&server, Format::OpenMetrics).queryable_names();

    const DATASOURCE: &str = "${datasource}";
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|variable| variable["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    assert_eq!(
        datasource["current"]["value"].as_str(),
        Some(uid),
        "the datasource variable's default is the provisioned datasource"
    );
    for name in ["job", "instance"] {
        let filter = variable(name);
        assert_eq!(filter["type"], "query", "${name}");
        assert_eq!(filter["datasource"]["uid"], DATASOURCE, "${name}");
        assert_eq!(filter["includeAll"], true, "${name}");
        let query = filter["query"]["query"].as_str().expect("a variable query");
        let names = metric_names(query);
        assert!(!names.is_empty(), "${name}: {query}");
        for metric in names {
            assert!(
                exported.contains(metric),
                "${name}: {metric} is not exported"
            );
        }
    }

    let mut ids = HashSet::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a panel has an id")),
            "{title}: id used twice"
        );
        assert!(
            ["timeseries", "stat", "table", "gauge", "bargauge"]
                .contains(&panel["type"].as_str().unwrap_or_default()),
            "{title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(
            x + w <= 24 && grid["h"].as_u64().is_some() && grid["y"].as_u64().is_some(),
            "{title}: gridPos"
        );
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some(DATASOURCE),
            "{title}: datasource"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut ref_ids = HashSet::new();
        for target in targets {
            assert!(
                ref_ids.insert(target["refId"].as_str().expect("refId")),
                "{title}: refId twice"
            );
            assert_eq!(
                target["datasource"]["uid"].as_str(),
                Some(DATASOURCE),
                "{title}: target datasource"
            );
            let expr = target["expr"].as_str().expect("expr");
            for (name, selector) in metric_selectors(expr) {
                let selector = selector.unwrap_or_default();
                assert!(
                    selector.contains(r#"job=~"$job""#)
                        && selector.contains(r#"instance=~"$instance""#),
                    "{title}: {name} is not filtered by $job and $instance in {expr}"
                );
            }
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} names no cache-money metric"
            );
            for name in names {
                assert!(
                    exported.contains(name),
                    "{title}: {name} is not exported; the server exports {exported:?}"
                );
                used.insert(name.to_owned());
            }
        }
    }
    for needed in [
        "cache_money_lookups_total",
        "cache_money_rpcs_total",
        "cache_money_rpc_duration_seconds_bucket",
        "cache_money_busts_total",
        "cache_money_store_command_duration_seconds_bucket",
        "cache_money_requests_shed_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

/// At the default log level, with the store down, a failing request's warning carries the
/// request id the caller sent, echoed in the response; a request without one gets a generated
/// 128-bit hex id, returned and logged the same way (the warning names it).
#[tokio::test]
async fn request_ids_reach_the_logs_and_the_caller() {
    let closed = common::free_port();
    let url = format!("redis://127.0.0.1:{closed}");
    let server = CacheServer::start(&["--redis-url", &url, "--store-timeout-ms", "100"]);
    let mut cm = server.client().await;
    let request = tagged(
        get_of(key("billing", "invoice", 1)),
        None,
        Some("caller-id-7"),
    );
    let failed = cm.get(request).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert_eq!(
        failed
            .metadata()
            .get("x-request-id")
            .map(|id| id.to_str().unwrap()),
        Some("caller-id-7")
    );
    let line = server
        .wait_for_log("caller-id-7", READY_TIMEOUT)
        .unwrap_or_else(|| panic!("the request id is not in the log:\n{}", server.log_text()));
    for part in [
        "store operation failed",
        "rpc=\"Get\"",
        "request_id=\"caller-id-7\"",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }

    let failed = cm
        .get(common::get_request(key("billing", "invoice", 2)))
        .await
        .unwrap_err();
    let generated = failed
        .metadata()
        .get("x-request-id")
        .expect("a generated id is returned")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 32, "{generated}");
    assert!(
        generated.bytes().all(|b| b.is_ascii_hexdigit()),
        "{generated}"
    );
    let line = server
        .wait_for_log(&generated, READY_TIMEOUT)
        .unwrap_or_else(|| panic!("the generated id is not in the log:\n{}", server.log_text()));
    assert!(line.contains("store operation failed"), "{line}");
}

/// A generated id is returned only when a log line names it: not on a successful Get at the
/// default level (no line names it), on every RPC once spans are on (each closing line names
/// it), and a caller's own id always.
#[tokio::test]
async fn a_generated_id_is_returned_when_a_log_line_names_it() {
    let returned = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get("x-request-id")
            .map(|id| id.to_str().unwrap().to_owned())
    };
    let hit = get_of(key("billing", "invoice", 1));
    // Without and with metrics: the layer takes a shorter path when it records nothing.
    for args in [&[][..], &["--metrics-listen", "127.0.0.1:0"][..]] {
        let quiet = CacheServer::memory(args);
        let mut cm = quiet.client().await;
        cm.put(put(key("billing", "invoice", 1), b"1", 60))
            .await
            .unwrap();
        let response = cm.get(hit.clone()).await.unwrap();
        assert!(response.get_ref().hit);
        assert_eq!(
            returned(response.metadata()),
            None,
            "{args:?}: no line named it"
        );
        let response = cm
            .get(tagged(hit.clone(), None, Some("caller-id-8")))
            .await
            .unwrap();
        assert_eq!(
            returned(response.metadata()).as_deref(),
            Some("caller-id-8"),
            "{args:?}"
        );
    }

    let spans = CacheServer::start_with_env(
        &[],
        &[("RUST_LOG", "info,cache_money::server::observe=debug")],
    );
    let mut cm = spans.client().await;
    let response = cm.get(hit).await.unwrap();
    let generated = returned(response.metadata()).expect("the span names the id");
    assert_eq!(generated.len(), 32, "{generated}");
    let line = spans
        .wait_for_log(&format!("request_id=\"{generated}\""), READY_TIMEOUT)
        .unwrap_or_else(|| panic!("{generated} not in the log:\n{}", spans.log_text()));
    assert!(line.contains("rpc finished"), "{line}");
}

/// With the filter the README documents (`RUST_LOG=info,cache_money::server::observe=debug`,
/// not the whole crate at debug) each RPC ends with one line in its span: method, request id,
/// namespace, result, status code and duration; refused requests too. Values and tokens never
/// appear.
#[tokio::test]
async fn each_rpc_is_a_span_with_its_outcome() {
    const TOKEN: &str = "span-test-token-0123456789";
    const VALUE: &str = "value-marker-5f1e9a";
    let grants = format!(
        r#"{{"tokens": [{{"name": "billing", "token": "{TOKEN}", "read": ["billing"], "write": ["billing"]}}]}}"#
    );
    let server = CacheServer::start_with_env(
        &[],
        &[
            ("CACHE_MONEY_AUTH_TOKENS", &grants),
            ("RUST_LOG", "info,cache_money::server::observe=debug"),
        ],
    );
    let mut cm = server.client().await;
    let stored = put(key("billing", "invoice", 1), VALUE.as_bytes(), 60);
    cm.put(tagged(stored, Some(TOKEN), Some("put-id-1")))
        .await
        .unwrap();
    let hit = common::get_request(key("billing", "invoice", 1));
    assert!(
        cm.get(tagged(hit.clone(), Some(TOKEN), Some("get-id-2")))
            .await
            .unwrap()
            .into_inner()
            .hit
    );
    let miss = common::get_request(key("billing", "invoice", 2));
    assert!(
        !cm.get(tagged(miss, Some(TOKEN), Some("get-id-3")))
            .await
            .unwrap()
            .into_inner()
            .hit
    );
    let refused = cm
        .get(tagged(hit, None, Some("refused-id-4")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    for (id, parts) in [
        (
            "put-id-1",
            &["method=\"Put\"", "namespace=\"billing\"", "code=\"OK\""][..],
        ),
        (
            "get-id-2",
            &[
                "method=\"Get\"",
                "namespace=\"billing\"",
                "code=\"OK\"",
                "result=\"hit\"",
            ][..],
        ),
        (
            "get-id-3",
            &["method=\"Get\"", "code=\"OK\"", "result=\"miss\""][..],
        ),
        (
            "refused-id-4",
            &["method=\"Get\"", "code=\"UNAUTHENTICATED\""][..],
        ),
    ] {
        let line = server
            .wait_for_log(&format!("request_id=\"{id}\""), READY_TIMEOUT)
            .unwrap_or_else(|| panic!("{id} not in the log:\n{}", server.log_text()));
        assert!(
            line.contains("rpc finished") && line.contains("duration_us="),
            "{line}"
        );
        for part in parts {
            assert!(line.contains(part), "{part} not in {line}");
        }
    }
    let log = server.log_text();
    assert!(!log.contains(VALUE), "a value reached the log:\n{log}");
    assert!(!log.contains(TOKEN), "a token reached the log:\n{log}");
}
