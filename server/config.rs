//! Server configuration: every limit has a `DEFAULT_*` constant, a flag and an environment
//! variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::key::NAME_CHARSET;

/// The environment variable that may hold the token grants as JSON, instead of a file.
pub const AUTH_TOKENS_ENV: &str = "CACHE_MONEY_AUTH_TOKENS";
/// Where the server listens unless told otherwise: loopback, so nothing is exposed by accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Prefix of every Redis key the server writes; `BustAll` removes only keys under it.
pub const DEFAULT_KEY_PREFIX: &str = "cm:";
/// Redis connections in the pool. Each is multiplexed and shared by concurrent commands, so
/// one is usually enough (Redis runs commands one at a time); more only spread the I/O.
pub const DEFAULT_POOL_SIZE: u32 = 4;
/// Store operations in flight at once; past it, requests are refused at once with
/// RESOURCE_EXHAUSTED instead of queueing behind a slow store.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Bound on one store operation, from pool checkout to reply: past it the RPC is UNAVAILABLE.
pub const DEFAULT_STORE_TIMEOUT_MS: u64 = 250;
/// How long a Redis command alone in flight is polled for, µs (`--redis-busy-poll-us`):
/// about twice a loopback Redis round trip.
pub const DEFAULT_REDIS_BUSY_POLL_US: u64 = 50;
/// The most `--redis-busy-poll-us` takes: a millisecond.
pub const MAX_REDIS_BUSY_POLL_US: u64 = 1000;
/// Bound on opening one Redis connection.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 200;
/// The longest time to live a `Put` may ask for: 30 days.
pub use crate::DEFAULT_MAX_TTL_SECONDS;
/// The largest value a `Put` may store: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The most keys or entries in one `GetMany` or `PutMany`.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// The longest tag, in bytes.
pub use crate::key::DEFAULT_MAX_TAG_BYTES;
/// Default of `--lease-max-ms`: a minute.
pub const DEFAULT_LEASE_MAX_MS: u32 = 60_000;
/// The most tags one write may carry.
pub use crate::key::DEFAULT_MAX_TAGS;
/// The largest gRPC message the server decodes; it bounds a whole `PutMany`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = crate::limits::DEFAULT_MAX_MESSAGE_BYTES;
/// The largest `GetMany` response the server sends: the client's default receive limit, so
/// a response the server sends is one the client reads.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = crate::limits::DEFAULT_MAX_MESSAGE_BYTES;
/// Room for keys and protobuf framing around the largest value, in a request or a response.
pub const MESSAGE_OVERHEAD_BYTES: usize = 4096;
/// Keys asked of each Redis `SCAN` step (and removed per `UNLINK`) while busting.
pub const DEFAULT_BUST_BATCH: usize = 1000;
/// Bytes the in-memory store may hold before it evicts the entries closest to expiry.
pub const DEFAULT_MEMORY_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Threads serving requests. One (a single-threaded runtime) measured fastest on a 2-core
/// host that also runs Redis: responses ready together are written together.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// How often the store is probed for the health service.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 500;
/// How long a client connection may be silent before the server PINGs it (HTTP/2) and the
/// kernel starts probing it (TCP keepalive): a client whose host vanished is let go.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 30_000;
/// How long the server waits for a PING's answer before closing the connection.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;
/// How long in-flight RPCs may run after a shutdown signal before the server exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// Namespaces that get metric series of their own; lookups in any later one are counted under
/// `other`, so a caller inventing namespaces cannot grow the metrics without bound.
pub const DEFAULT_METRICS_MAX_NAMESPACES: usize = 100;
/// How long one connection to the metrics listener may stay open, slow client or not: twice
/// a scrape's usual budget (Prometheus's default `scrape_timeout` is 10 s, a scrape takes
/// milliseconds).
pub const DEFAULT_METRICS_TIMEOUT_MS: u64 = 20_000;
/// Connections the metrics listener serves at once; one more is closed as soon as it is
/// accepted. A scrape is one short connection per scraper, so 16 leaves room for several
/// Prometheus replicas and a curl, while a client opening silent connections holds at most
/// 16 tasks and sockets, each for at most `--metrics-timeout-ms`.
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 16;

/// Invalidations the store keeps for watchers to resume from (`MAXLEN ~` of the Redis
/// stream; the in-memory ring's size): a watcher that reconnects within this many
/// invalidations of where it left gets what it missed, else a RESET. In Redis an entry
/// invalidation costs about 105 bytes with short names and 367 with 128-character namespace
/// and function names (measured with `MEMORY USAGE`, 20,000 entries), so the default costs
/// about 10-37 MB.
pub const DEFAULT_WATCH_STREAM_LEN: usize = 100_000;
/// Milliseconds between heartbeats on an idle Watch stream.
pub const DEFAULT_WATCH_HEARTBEAT_MS: u64 = 1000;
/// Events each server buffers for its watchers; a watcher that falls further behind (a slow
/// reader) gets a RESET.
pub const DEFAULT_WATCH_BUFFER: usize = 4096;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Whether writes and busts publish invalidations for `Watch`, and what a failure to publish
/// does to the RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum InvalidationMode {
    /// Nothing published, no stream reader: `Watch` answers UNIMPLEMENTED and every position
    /// is 0. For fleets without near caches: no `XADD` per write.
    Off,
    /// Publish every change; a failed publish never fails its RPC (the change was made). The
    /// server then stops its watchers' heartbeats and publishes a bust of everything, retried
    /// until it lands, so every near cache in the fleet drops what it holds.
    #[default]
    BestEffort,
    /// Publish every change; a failed publish fails its RPC with the store's error (the change
    /// was made: retrying it is harmless), so a writer knows near caches may be stale.
    Required,
}

impl InvalidationMode {
    /// Its name as the flag takes it: `off`, `best-effort` or `required`.
    pub fn name(self) -> &'static str {
        match self {
            InvalidationMode::Off => "off",
            InvalidationMode::BestEffort => "best-effort",
            InvalidationMode::Required => "required",
        }
    }
}

/// Everything the server can be told, from flags or `CACHE_MONEY_*` environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cache-money-server",
    version,
    about = "Memoization as a service: a gRPC cache in front of Redis (or in memory)."
)]
pub struct Config {
    /// Address to serve gRPC on. Port 0 picks a free port (logged at start-up).
    #[arg(long, env = "CACHE_MONEY_LISTEN", default_value = DEFAULT_LISTEN, value_parser = socket_address)]
    pub listen: SocketAddr,

    /// Redis to store entries in, e.g. redis://127.0.0.1:6379/0, redis://:password@host,
    /// redis://user:password@host/0, rediss://host:6380 (TLS) or unix:///run/redis.sock.
    /// Absent: an in-memory store.
    #[arg(long, env = "CACHE_MONEY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster to store entries in, by seed nodes: comma-separated redis:// or rediss://
    /// URLs, e.g. redis://10.0.0.1:7000,redis://10.0.0.2:7001 (credentials as for
    /// --redis-url; one reachable seed is enough, the others are found from it). For
    /// ElastiCache or MemoryDB, the configuration endpoint. Not with --redis-url.
    #[arg(long, env = "CACHE_MONEY_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,

    /// PEM CA certificate to verify a rediss:// Redis with, when its certificate is not from a
    /// CA in the system's trust store.
    #[arg(long, env = "CACHE_MONEY_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,

    /// Prefix of every Redis key written; BustAll removes only keys under it.
    #[arg(long, env = "CACHE_MONEY_KEY_PREFIX", default_value = DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,

    /// Redis connections in the pool (each multiplexed and shared).
    #[arg(long, env = "CACHE_MONEY_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE)]
    pub pool_size: u32,

    /// Store operations in flight at once; past it, requests are refused at once with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "CACHE_MONEY_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// Milliseconds one store operation may take, checkout included, before UNAVAILABLE.
    #[arg(long, env = "CACHE_MONEY_STORE_TIMEOUT_MS", default_value_t = DEFAULT_STORE_TIMEOUT_MS)]
    pub store_timeout_ms: u64,

    /// Microseconds the server keeps checking for a Redis reply before it sleeps until the
    /// reply wakes it, while that command is the only one in flight and store operations
    /// have lately taken no longer than this: at low load on a VM it saves a wake-up per
    /// command, the server's thread staying busy through the round trip instead. Only with
    /// --worker-threads 1; at most 1000; 0 turns it off.
    #[arg(long, env = "CACHE_MONEY_REDIS_BUSY_POLL_US", default_value_t = DEFAULT_REDIS_BUSY_POLL_US)]
    pub redis_busy_poll_us: u64,

    /// Milliseconds to open one Redis connection.
    #[arg(long, env = "CACHE_MONEY_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,

    /// Longest time to live a Put may ask for, in seconds.
    #[arg(long, env = "CACHE_MONEY_MAX_TTL_SECONDS", default_value_t = DEFAULT_MAX_TTL_SECONDS)]
    pub max_ttl_seconds: u32,

    /// Largest value a Put may store, in bytes.
    #[arg(long, env = "CACHE_MONEY_MAX_VALUE_BYTES", default_value_t = DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_bytes: usize,

    /// Most keys or entries in one GetMany or PutMany.
    #[arg(long, env = "CACHE_MONEY_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// Most tags one Put or PutMany entry may carry.
    #[arg(long, env = "CACHE_MONEY_MAX_TAGS", default_value_t = DEFAULT_MAX_TAGS)]
    pub max_tags: usize,

    /// Longest tag, in bytes (UTF-8, no control characters).
    #[arg(long, env = "CACHE_MONEY_MAX_TAG_BYTES", default_value_t = DEFAULT_MAX_TAG_BYTES)]
    pub max_tag_bytes: usize,

    /// Longest lease a Get may ask for (`lease_ms`), in milliseconds. A lease bounds how long
    /// other callers wait for its holder, so keep it a little above your slowest computation.
    #[arg(long, env = "CACHE_MONEY_LEASE_MAX_MS", default_value_t = DEFAULT_LEASE_MAX_MS)]
    pub lease_max_ms: u32,

    /// Largest gRPC request the server decodes, in bytes; it bounds a whole PutMany.
    #[arg(long, env = "CACHE_MONEY_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Largest GetMany response the server sends, in bytes; a batch whose values exceed it is
    /// refused with OUT_OF_RANGE. Keep it at most the clients' receive limit.
    #[arg(long, env = "CACHE_MONEY_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES)]
    pub max_response_bytes: usize,

    /// Keys per SCAN step and UNLINK while busting.
    #[arg(long, env = "CACHE_MONEY_BUST_BATCH", default_value_t = DEFAULT_BUST_BATCH)]
    pub bust_batch: usize,

    /// Invalidations for Watch streams: off (no publishing, Watch unimplemented),
    /// best-effort (a failed publish never fails the write or bust) or required (it does).
    #[arg(long, env = "CACHE_MONEY_INVALIDATIONS", value_enum, default_value_t = InvalidationMode::BestEffort)]
    pub invalidations: InvalidationMode,

    /// Invalidations kept for Watch streams to resume from (the Redis stream's MAXLEN ~, or
    /// the in-memory ring's size, outside --memory-max-bytes); resuming from further back
    /// answers a RESET.
    #[arg(long, env = "CACHE_MONEY_WATCH_STREAM_LEN", default_value_t = DEFAULT_WATCH_STREAM_LEN)]
    pub watch_stream_len: usize,

    /// Milliseconds between heartbeats on Watch streams (sent while the server is reading
    /// the invalidation stream: a client stops trusting its near cache when they stop).
    #[arg(long, env = "CACHE_MONEY_WATCH_HEARTBEAT_MS", default_value_t = DEFAULT_WATCH_HEARTBEAT_MS)]
    pub watch_heartbeat_ms: u64,

    /// Events the server buffers for its watchers; one that falls further behind gets a
    /// RESET.
    #[arg(long, env = "CACHE_MONEY_WATCH_BUFFER", default_value_t = DEFAULT_WATCH_BUFFER)]
    pub watch_buffer: usize,

    /// Bytes the in-memory store may hold before evicting the entries closest to expiry.
    #[arg(long, env = "CACHE_MONEY_MEMORY_MAX_BYTES", default_value_t = DEFAULT_MEMORY_MAX_BYTES)]
    pub memory_max_bytes: usize,

    /// Milliseconds between store health probes.
    #[arg(long, env = "CACHE_MONEY_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS)]
    pub health_interval_ms: u64,

    /// Milliseconds in-flight RPCs may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "CACHE_MONEY_DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,

    /// Threads serving requests: 1 runs a single-threaded runtime (fastest where Redis shares
    /// the host's cores); raise it on larger hosts.
    #[arg(long, env = "CACHE_MONEY_WORKER_THREADS", default_value_t = DEFAULT_WORKER_THREADS)]
    pub worker_threads: usize,

    /// JSON file of bearer tokens and what each may do (see SECURITY.md). Absent, and no
    /// CACHE_MONEY_AUTH_TOKENS: no authentication, for local use.
    #[arg(long, env = "CACHE_MONEY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// PEM certificate (chain) for TLS on the gRPC listener; with --tls-key. Absent: plaintext.
    #[arg(long, env = "CACHE_MONEY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "CACHE_MONEY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): when set, clients must present a certificate signed by one.
    #[arg(long, env = "CACHE_MONEY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve gRPC reflection (v1 and v1alpha), so grpcurl needs no proto file.
    #[arg(long, env = "CACHE_MONEY_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// Address to serve Prometheus metrics on (GET /metrics), e.g. 127.0.0.1:9464. Absent: no
    /// metrics. It asks for no token: listen only where your scrapers, not your callers, reach
    /// (SECURITY.md). Port 0 picks a free port (logged at start-up).
    #[arg(long, env = "CACHE_MONEY_METRICS_LISTEN", value_parser = socket_address)]
    pub metrics_listen: Option<SocketAddr>,

    /// Namespaces that get metric series of their own; lookups in later ones are counted
    /// under namespace "other".
    #[arg(long, env = "CACHE_MONEY_METRICS_MAX_NAMESPACES", default_value_t = DEFAULT_METRICS_MAX_NAMESPACES)]
    pub metrics_max_namespaces: usize,

    /// Milliseconds one connection to the metrics listener may stay open.
    #[arg(long, env = "CACHE_MONEY_METRICS_TIMEOUT_MS", default_value_t = DEFAULT_METRICS_TIMEOUT_MS)]
    pub metrics_timeout_ms: u64,

    /// Connections the metrics listener serves at once; past it, a new connection is closed
    /// as soon as it is accepted.
    #[arg(long, env = "CACHE_MONEY_METRICS_MAX_CONNECTIONS", default_value_t = DEFAULT_METRICS_MAX_CONNECTIONS)]
    pub metrics_max_connections: usize,

    /// Milliseconds a client connection may be silent before the server PINGs it; a client
    /// that does not answer within --keepalive-timeout-ms is disconnected.
    #[arg(long, env = "CACHE_MONEY_KEEPALIVE_INTERVAL_MS", default_value_t = DEFAULT_KEEPALIVE_INTERVAL_MS)]
    pub keepalive_interval_ms: u64,

    /// Milliseconds the server waits for a PING's answer before closing the connection.
    #[arg(long, env = "CACHE_MONEY_KEEPALIVE_TIMEOUT_MS", default_value_t = DEFAULT_KEEPALIVE_TIMEOUT_MS)]
    pub keepalive_timeout_ms: u64,

    /// Log line format. Verbosity comes from RUST_LOG (default: info).
    #[arg(long, env = "CACHE_MONEY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// An address to listen on: an IP address and a port. A host name is refused with the
/// forms that work (listening needs the address itself).
fn socket_address(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "give an IP address and port, e.g. 127.0.0.1:50051, 0.0.0.0:50051 or [::]:50051 \
             (not a host name such as localhost), got {text:?}"
        )
    })
}

impl Config {
    /// Checks the values against each other, so a bad setting stops start-up with a clear
    /// message instead of failing requests later.
    ///
    /// # Errors
    /// A message naming the flag and the rule it breaks.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--pool-size", u64::from(self.pool_size)),
            ("--max-in-flight", self.max_in_flight as u64),
            ("--store-timeout-ms", self.store_timeout_ms),
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--max-ttl-seconds", u64::from(self.max_ttl_seconds)),
            ("--max-value-bytes", self.max_value_bytes as u64),
            ("--max-batch", self.max_batch as u64),
            ("--max-tag-bytes", self.max_tag_bytes as u64),
            ("--lease-max-ms", u64::from(self.lease_max_ms)),
            ("--bust-batch", self.bust_batch as u64),
            ("--watch-stream-len", self.watch_stream_len as u64),
            ("--watch-heartbeat-ms", self.watch_heartbeat_ms),
            ("--watch-buffer", self.watch_buffer as u64),
            ("--health-interval-ms", self.health_interval_ms),
            ("--worker-threads", self.worker_threads as u64),
            ("--metrics-timeout-ms", self.metrics_timeout_ms),
            (
                "--metrics-max-connections",
                self.metrics_max_connections as u64,
            ),
            ("--keepalive-interval-ms", self.keepalive_interval_ms),
            ("--keepalive-timeout-ms", self.keepalive_timeout_ms),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{flag}: must be at least 1"));
        }
        // Room for the key and framing of a Put, or a GetMany answer, carrying the largest
        // value.
        let needed = self.max_value_bytes.saturating_add(MESSAGE_OVERHEAD_BYTES);
        for (flag, value) in [
            ("--max-message-bytes", self.max_message_bytes),
            ("--max-response-bytes", self.max_response_bytes),
        ] {
            if value < needed {
                return Err(format!(
                    "{flag}: must be at least --max-value-bytes + {MESSAGE_OVERHEAD_BYTES} ({needed}), got {value}"
                ));
            }
        }
        if self.redis_busy_poll_us > MAX_REDIS_BUSY_POLL_US {
            return Err(format!(
                "--redis-busy-poll-us: at most {MAX_REDIS_BUSY_POLL_US} (a Redis that takes longer is not worth polling for), got {}",
                self.redis_busy_poll_us
            ));
        }
        if self.redis_busy_poll_us >= self.store_timeout_ms.saturating_mul(1000) {
            return Err(format!(
                "--redis-busy-poll-us: must be below --store-timeout-ms ({} ms = {} µs), got {}",
                self.store_timeout_ms,
                self.store_timeout_ms.saturating_mul(1000),
                self.redis_busy_poll_us
            ));
        }
        if self.redis_url.is_some() && self.redis_cluster.is_some() {
            return Err(
                "--redis-url and --redis-cluster are both set (or CACHE_MONEY_REDIS_URL and CACHE_MONEY_REDIS_CLUSTER); use one: --redis-cluster for a Redis Cluster, --redis-url for one Redis"
                    .to_owned(),
            );
        }
        if let Some(seeds) = &self.redis_cluster {
            let seeds: Vec<&str> = seeds.split(',').map(str::trim).collect();
            if let Some(bad) = seeds.iter().find(|seed| {
                !(seed.starts_with("redis://") || seed.starts_with("rediss://"))
                    || seed.len() <= "rediss://".len()
            }) {
                return Err(format!(
                    "--redis-cluster: each seed must be a redis:// or rediss:// URL, comma-separated, got {:?}",
                    redacted_url(bad)
                ));
            }
            seeds_agree(&seeds)?;
        }
        let in_memory = self.redis_url.is_none() && self.redis_cluster.is_none();
        if in_memory && self.memory_max_bytes < self.max_value_bytes {
            return Err(format!(
                "--memory-max-bytes: must be at least --max-value-bytes ({}), got {}",
                self.max_value_bytes, self.memory_max_bytes
            ));
        }
        // The prefix is what tells entries from other keys in a shared Redis: after a prefix
        // like `cache`, the key `cache_users:profile:<md5>` could be an entry of namespace
        // `_users` or a foreign key.
        let ends_in_charset = self
            .key_prefix
            .bytes()
            .last()
            .is_none_or(crate::key::is_name_byte);
        if ends_in_charset {
            return Err(format!(
                "--key-prefix: must end with a character outside {NAME_CHARSET} such as ':', so entries cannot be confused with other keys; got {:?}",
                self.key_prefix
            ));
        }
        if self
            .key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "--key-prefix: must not contain whitespace or control characters, got {:?}",
                self.key_prefix
            ));
        }
        if let Some(url) = &self.redis_url {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://") || !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix")
            {
                return Err(format!(
                    "--redis-url: must start with redis://, rediss:// or unix://, got {:?}",
                    redacted_url(url)
                ));
            }
        }
        Ok(())
    }

    /// The configured tokens: from `--auth-file`, or the JSON in the environment variable
    /// `CACHE_MONEY_AUTH_TOKENS` (never a flag, whose value any local user can read with
    /// `ps`); `None` when neither is set.
    ///
    /// # Errors
    /// When both are set, the file cannot be read, or the grants are invalid.
    pub fn load_auth(&self) -> Result<Option<crate::server::auth::Auth>, String> {
        let from_env = std::env::var(AUTH_TOKENS_ENV).ok();
        let text = match (&self.auth_file, from_env) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "--auth-file and {AUTH_TOKENS_ENV} are both set; use one"
                ));
            }
            (Some(path), None) => std::fs::read_to_string(path)
                .map_err(|err| format!("--auth-file: cannot read {}: {err}", path.display()))?,
            (None, Some(text)) => text,
            (None, None) => return Ok(None),
        };
        crate::server::auth::Auth::from_json(&text).map(Some)
    }

    /// The TLS settings of the listener, read from the PEM files; `None` for plaintext.
    ///
    /// # Errors
    /// When a file cannot be read.
    pub fn load_tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, String> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|err| format!("{flag}: cannot read {}: {err}", path.display()))
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let identity = Identity::from_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
        }
        Ok(Some(tls))
    }

    /// Time between heartbeats on Watch streams.
    pub fn watch_heartbeat(&self) -> Duration {
        Duration::from_millis(self.watch_heartbeat_ms)
    }

    /// Bound on one store operation.
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }

    /// How long a Redis command alone in flight is polled for.
    pub fn redis_busy_poll(&self) -> Duration {
        Duration::from_micros(self.redis_busy_poll_us)
    }

    /// Bound on opening one Redis connection.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Time between store health probes.
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    /// Time in-flight RPCs get after a shutdown signal.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// Time one metrics connection may stay open.
    pub fn metrics_timeout(&self) -> Duration {
        Duration::from_millis(self.metrics_timeout_ms)
    }

    /// Silence on a client connection before the server PINGs it.
    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms)
    }

    /// How long a PING may go unanswered before the connection is closed.
    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_timeout_ms)
    }
}

/// Checks that cluster seeds agree on scheme, user, password and database, and that the
/// database is 0: redis-rs takes TLS and credentials from the first seed alone (a second
/// seed's password would be ignored, then NOAUTH), and a cluster has only database 0.
fn seeds_agree(seeds: &[&str]) -> Result<(), String> {
    // (scheme, user info, database) of a seed URL already known to have a scheme.
    let parts = |seed: &str| {
        let (scheme, rest) = seed.split_once("://").unwrap_or(("", seed));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let userinfo = authority.rfind('@').map_or("", |at| &authority[..at]);
        let database = path.split('?').next().unwrap_or_default();
        (scheme.to_owned(), userinfo.to_owned(), database.to_owned())
    };
    let first = parts(seeds[0]);
    for seed in seeds {
        let (scheme, userinfo, database) = parts(seed);
        if !(database.is_empty() || database == "0") {
            return Err(format!(
                "--redis-cluster: a Redis Cluster has only database 0, got /{database} in {:?}",
                redacted_url(seed)
            ));
        }
        if (&scheme, &userinfo) != (&first.0, &first.1) {
            return Err(format!(
                "--redis-cluster: every seed must use the same scheme (redis:// or rediss://), user and password; {:?} differs from {:?}",
                redacted_url(seed),
                redacted_url(seeds[0])
            ));
        }
    }
    Ok(())
}

/// The seed URLs of `--redis-cluster` with any password replaced by `***`.
pub fn redacted_seeds(seeds: &str) -> String {
    seeds
        .split(',')
        .map(|seed| redacted_url(seed.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Redis URL with any password replaced by `***`, fit for logs and error messages.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["cache-money-server"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).expect("arguments parse")
    }

    /// With no flags the server is in-memory on loopback with the documented limits.
    #[test]
    fn defaults_are_valid_and_in_memory() {
        let config = config(&[]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.redis_url, None);
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.max_ttl_seconds, 2_592_000);
    }

    /// Settings that contradict each other stop start-up, naming the flag.
    #[test]
    fn contradictions_are_refused() {
        let err = config(&["--max-value-bytes", "9000000"])
            .validate()
            .unwrap_err();
        assert!(err.starts_with("--max-message-bytes"), "{err}");
        let err = config(&["--pool-size", "0"]).validate().unwrap_err();
        assert_eq!(err, "--pool-size: must be at least 1");
        let err = config(&["--redis-url", "localhost:6379"])
            .validate()
            .unwrap_err();
        assert!(err.starts_with("--redis-url"), "{err}");
        let err = config(&["--max-response-bytes", "5000"])
            .validate()
            .unwrap_err();
        assert!(err.starts_with("--max-response-bytes"), "{err}");
    }

    /// A prefix that is empty or ends inside the name charset is refused, saying why; one
    /// ending in any other character is accepted.
    #[test]
    fn key_prefix_must_end_outside_the_name_charset() {
        for prefix in ["", "cache", "cm:x", "a_", "v1.", "x-", "9"] {
            let err = config(&["--key-prefix", prefix]).validate().unwrap_err();
            assert_eq!(
                err,
                format!(
                    "--key-prefix: must end with a character outside [A-Za-z0-9_.-] such as ':', so entries cannot be confused with other keys; got {prefix:?}"
                )
            );
        }
        for prefix in [":", "cm:", "cm:tenant:", "app/", "c*[m]?:", "cache|"] {
            assert_eq!(
                config(&["--key-prefix", prefix]).validate(),
                Ok(()),
                "{prefix}"
            );
        }
    }

    /// --redis-url and --redis-cluster together are refused, saying to use one; cluster seeds
    /// must each be redis:// or rediss:// URLs agreeing on scheme, credentials and database 0.
    #[test]
    fn redis_cluster_takes_seed_urls_and_excludes_redis_url() {
        let both = config(&[
            "--redis-url",
            "redis://h:6379",
            "--redis-cluster",
            "redis://h:7000",
        ]);
        let err = both.validate().unwrap_err();
        assert!(
            err.starts_with("--redis-url and --redis-cluster are both set"),
            "{err}"
        );
        let seeds = "rediss://user:pw@a:7000, rediss://user:pw@b:7001/0";
        assert_eq!(config(&["--redis-cluster", seeds]).validate(), Ok(()));
        for (mixed, rule) in [
            ("redis://a:7000,rediss://b:7001", "the same scheme"),
            ("redis://a:7000,redis://:pw@b:7001", "the same scheme"),
            ("redis://u:pw@a:7000,redis://v:pw@b:7001", "the same scheme"),
            (
                "redis://:pw@a:7000,redis://:other@b:7001",
                "the same scheme",
            ),
            ("redis://a:7000/2,redis://b:7001/2", "only database 0"),
        ] {
            let err = config(&["--redis-cluster", mixed]).validate().unwrap_err();
            assert!(err.contains(rule), "{mixed}: {err}");
            assert!(!err.contains("other"), "a password in {err}");
        }
        for bad in [
            "a:7000",
            "redis://a:7000,",
            "unix:///run/r.sock",
            "redis://a,b:7000",
        ] {
            let err = config(&["--redis-cluster", bad]).validate().unwrap_err();
            assert!(
                err.starts_with("--redis-cluster: each seed"),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            redacted_seeds("redis://:pw@a:7000,redis://b:7001"),
            "redis://:***@a:7000,redis://b:7001"
        );
    }

    /// Passwords never reach the logs.
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redacted_url("redis://:s3cret@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(
            redacted_url("redis://app:s3cret@h/1"),
            "redis://app:***@h/1"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
