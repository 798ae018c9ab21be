//! The Redis store: a bb8 pool of multiplexed redis-rs connections, every operation bounded by
//! the store timeout, busting by SCAN + UNLINK, tag indexes by the commands of [`tags`].
//! [`cluster`] is the same store over a Redis Cluster; both pass every operation through one
//! gate (in-flight limit, store timeout, timing) and share the error mapping.

pub mod cluster;
pub mod tags;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bb8::{ErrorSink, ManageConnection, Pool, RunError};
use bytes::Bytes;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, TlsCertificates, Value,
    aio::MultiplexedConnection,
};
use tokio::{
    sync::{Mutex, Semaphore},
    time::{Instant, timeout_at},
};
use tracing::warn;

use super::lease::{self, Acquired, Found, LeaseAsk};
use super::{
    KeyInfo, KeysPage, NewEntry, PoolState, RedisTarget, Scope, Store, StoreError, StoreState,
};
use crate::busy_poll::BusyPoll;
use crate::key::{EntryKey, FunctionKey};
use crate::lock;
use crate::server::key::{KeyLayout, LayoutKey};
use crate::server::metrics::Metrics;
use crate::server::watch::{Invalidation, Published, position_of, stream_id, stream_key};
use redis::streams::{StreamRangeReply, StreamReadReply};

/// The `command` label values of `cache_money_store_command_duration_seconds` for Redis: the
/// command (or pipeline) each store operation sends, as the README lists them. `STRLEN` is
/// GetMany's size check before it loads values; the health probe's `PING` is not timed.
/// The cluster store's topology checks (`CLUSTER SLOTS` before `Keys`, `CLUSTER NODES` around
/// a bust) are timed too. `EVAL (tag index)` writes the tag indexes of a tagged Put or PutMany
/// before its entries; `ZSCAN/UNLINK` is BustTag's walk through one index. `GET` is a lookup
/// (`GET` and `PTTL` in one pipeline); the `EVAL (…)` lease scripts are those of [`lease`].
///
/// [`lease`]: super::lease
///
/// `XADD` publishes invalidations (see [`watch`](crate::server::watch)); `XREAD` is a resuming
/// watcher's replay (the reader's blocking `XREAD` waits by design and is not timed);
/// `XREVRANGE` reads where the stream ends.
/// `SET+XADD` and `UNLINK+XADD` are a Put and a one-entry Bust sent with their invalidation
/// in one pipeline (one round trip).
pub const REDIS_COMMANDS: [&str; 21] = [
    "GET",
    "EVAL (lease)",
    "EVAL (leased SET)",
    "EVAL (release)",
    "MGET",
    "STRLEN",
    "SET",
    "SET (batch)",
    "EVAL (tag index)",
    "UNLINK",
    "SCAN/UNLINK",
    "ZSCAN/UNLINK",
    "SCAN",
    "PTTL",
    "CLUSTER SLOTS",
    "CLUSTER NODES",
    "XADD",
    "XREAD",
    "XREVRANGE",
    "SET+XADD",
    "UNLINK+XADD",
];

/// The lease scripts, sent by SHA once Redis has them (redis-rs loads a script that Redis
/// does not know, as after a restart, and sends it again).
pub(crate) struct Scripts {
    acquire: redis::Script,
    put: redis::Script,
    release: redis::Script,
}

/// The lease scripts of [`lease`], built once.
pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        acquire: redis::Script::new(lease::ACQUIRE_SCRIPT),
        put: redis::Script::new(lease::PUT_SCRIPT),
        release: redis::Script::new(lease::RELEASE_SCRIPT),
    })
}

impl Scripts {
    /// The acquire script's invocation for `ask` on the Redis key `key`.
    pub(crate) fn acquire(&self, key: String, ask: LeaseAsk) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.acquire.key(key);
        invocation
            .arg(lease::token_text(ask.token))
            .arg(ask.lease.as_millis() as u64)
            .arg(lease::placeholder_life(ask.lease).as_millis() as u64)
            .arg(if ask.refresh { "1" } else { "0" });
        invocation
    }

    /// The leased write's invocation of `entry` under `key`.
    pub(crate) fn put(
        &self,
        key: String,
        entry: &NewEntry,
        token: u64,
    ) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.put.key(key);
        invocation
            .arg(lease::token_text(token))
            .arg(stored(entry).as_ref())
            .arg(entry.kept_for().as_millis() as u64);
        invocation
    }

    /// The release's invocation of `token` on `key`.
    pub(crate) fn release(&self, key: String, token: u64) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.release.key(key);
        invocation.arg(lease::token_text(token));
        invocation
    }
}

/// The bytes Redis keeps for `entry` (see [`lease::stored_value`]).
pub(crate) fn stored(entry: &NewEntry) -> Bytes {
    lease::stored_value(&entry.value, entry.ttl, entry.stale, entry.compute_ms)
}

/// What the Redis store needs to know.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` or `unix://` URL, credentials included. For the
    /// [`cluster::ClusterStore`], the seed nodes' `redis://` or `rediss://` URLs separated by
    /// commas, as `--redis-cluster` takes them.
    pub url: String,
    /// Prefix of every key written.
    pub key_prefix: String,
    /// Connections in the pool (each multiplexed and shared); the cluster store keeps one
    /// multiplexed connection per node instead.
    pub pool_size: u32,
    /// Commands in flight at once.
    pub max_in_flight: usize,
    /// Bound on one operation, checkout included.
    pub timeout: Duration,
    /// Bound on opening one connection.
    pub connect_timeout: Duration,
    /// Keys per SCAN step while busting.
    pub bust_batch: usize,
    /// PEM CA to verify a `rediss://` Redis with, instead of the system's trust store.
    pub tls_ca: Option<Vec<u8>>,
    /// Invalidations the stream keeps (`XADD … MAXLEN ~`).
    pub watch_stream_len: usize,
    /// The longest the process's reader blocks in one `XREAD` (the heartbeat interval).
    pub watch_block: Duration,
    /// How long a command alone in flight is polled for before the server sleeps until its
    /// reply (see `crate::busy_poll`); zero never polls.
    pub busy_poll: Duration,
}

/// The `XADD`s of `invalidations` onto the stream `key`, trimmed to about `len` entries, one
/// reply (the new id) each: [`XADD_SCRIPT`] run once per invalidation.
pub(crate) fn xadd(pipe: &mut redis::Pipeline, key: &str, len: usize, invalidation: &Invalidation) {
    let command = pipe
        .cmd("EVAL")
        .arg(XADD_SCRIPT)
        .arg(1)
        .arg(key)
        .arg(len)
        // Tells this entry from another at the same id in a re-created stream.
        .arg(NONCE_FIELD)
        .arg(fastrand::u64(..));
    for (field, value) in invalidation.fields() {
        command.arg(field).arg(value);
    }
}

/// Appends one invalidation (`ARGV[1]`: the length to trim to, then the entry's fields) to the
/// stream `KEYS[1]`: `XADD … MAXLEN ~ len 0-*`, the first part of the id fixed at 0 and the
/// second numbered by Redis, a plain gapless counter. The entry that creates the stream is
/// numbered from Redis's clock instead, `0-{unix milliseconds}000000`, so a stream deleted and
/// re-created (a Redis restarted without persistence, an operator's `DEL`) numbers above
/// everything the old one did (unless its clock went back, or the old one took more than 10^6
/// invalidations per millisecond of its life), and a watcher resuming with an old position is
/// answered with a RESET, never a replay of the new stream's entries as if they followed it.
/// The number is built as text: Lua's numbers are doubles, exact only to 2^53.
pub(crate) const XADD_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local millis = string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  return redis.call('XADD', KEYS[1], '0-' .. now[1] .. millis .. '000000', unpack(ARGV, 2))
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '0-*', unpack(ARGV, 2))
";

/// The stream entry field holding the entry's random nonce.
pub(crate) const NONCE_FIELD: &str = "nonce";

/// `XRANGE key 0-position 0-position`: the entry at `position`.
pub(crate) fn xrange_at(key: &str, position: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key)
        .arg(stream_id(position))
        .arg(stream_id(position));
    cmd
}

/// The nonce of the entry an [`xrange_at`] answered: `""` for none (or none recorded).
pub(crate) fn nonce_reply(reply: StreamRangeReply) -> Option<String> {
    let nonce = reply
        .ids
        .first()
        .and_then(|entry| entry.map.get(NONCE_FIELD))
        .and_then(|value| redis::from_redis_value_ref::<String>(value).ok());
    Some(nonce.unwrap_or_default())
}

/// The position an `XADD` pipeline's last reply names.
pub(crate) fn published_position(ids: &[Value]) -> Result<u64, StoreError> {
    let Some(last) = ids.last() else {
        return Ok(0);
    };
    let id: String = from_value(last)?;
    position_of(&id).ok_or_else(|| StoreError::Internal(format!("XADD answered the id {id:?}")))
}

/// `XREAD [BLOCK ms] COUNT count STREAMS key 0-after`.
pub(crate) fn xread(key: &str, after: u64, count: usize, block: Option<Duration>) -> redis::Cmd {
    let mut cmd = redis::cmd("XREAD");
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    cmd.arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(key)
        .arg(stream_id(after));
    cmd
}

/// What an operator does about an invalidation stream holding `what` cache-money did not
/// write: no `XADD 0-*` can follow it, and no position can be read past it.
fn foreign_stream(key: &str, what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the invalidation stream {key} holds {what}, not written by cache-money, so no invalidation can be published or read; delete the key (DEL {key}): watchers then get a RESET"
    ))
}

/// A publish's error: UNAVAILABLE naming the key to delete when the stream's own state
/// refuses our `XADD` (the key holds another type, or an entry with a larger id written by
/// something else), not INTERNAL; any other error as it is.
pub(crate) fn publish_error(key: &str, err: StoreError) -> StoreError {
    match err {
        // Redis before 7.0 knows no `0-*` id.
        StoreError::Internal(message) if message.contains("Invalid stream ID") => {
            StoreError::Unavailable(format!(
                "cannot publish invalidations to {key}: the invalidation stream needs Redis 7.0 or later ({message}); upgrade Redis, or run with --invalidations off"
            ))
        }
        StoreError::Internal(message)
            if message.contains("WRONGTYPE")
                || message.contains("equal or smaller than the target stream top item") =>
        {
            foreign_stream(key, &format!("something else ({message})"))
        }
        other => other,
    }
}

/// The invalidations an `XREAD` of stream `key` answered (nil: none).
///
/// # Errors
/// UNAVAILABLE naming the key to delete when an entry's id is not one of ours (written by
/// hand with `*`): skipping it would read it again at once, forever.
pub(crate) fn read_reply(
    key: &str,
    reply: Option<StreamReadReply>,
) -> Result<Vec<Published>, StoreError> {
    let Some(reply) = reply else {
        return Ok(Vec::new());
    };
    let mut read = Vec::new();
    for stream in reply.keys {
        for entry in stream.ids {
            let Some(position) = position_of(&entry.id) else {
                return Err(foreign_stream(
                    key,
                    &format!("an entry with the id {}", entry.id),
                ));
            };
            let nonce = entry
                .map
                .get(NONCE_FIELD)
                .and_then(|value| redis::from_redis_value_ref::<String>(value).ok());
            read.push(Published {
                position,
                nonce: Some(nonce.unwrap_or_default()),
                invalidation: Invalidation::from_fields(&entry.map),
            });
        }
    }
    Ok(read)
}

/// `XREVRANGE key + - COUNT 1`: where the stream ends.
pub(crate) fn xrevrange_last(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(1);
    cmd
}

/// The position of the entry an [`xrevrange_last`] of stream `key` answered; 0 for none.
///
/// # Errors
/// UNAVAILABLE naming the key to delete when that entry's id is not one of ours.
pub(crate) fn tail_reply(key: &str, reply: StreamRangeReply) -> Result<u64, StoreError> {
    let Some(entry) = reply.ids.first() else {
        return Ok(0);
    };
    position_of(&entry.id)
        .ok_or_else(|| foreign_stream(key, &format!("an entry with the id {}", entry.id)))
}

/// How long a pooled connection may sit unused before its next checkout PINGs it first.
/// Redis closes clients idle longer than its `timeout` (whole seconds, at least 1), as NATs
/// and load balancers drop idle flows; redis-rs notices, but says so only to RESP3
/// connections. A connection used within the last 0.9 s cannot have been closed that way, so
/// it is used without the round trip; after a pause, one PING finds a closed one before a
/// request fails on it (the pattern of HikariCP's `aliveBypassWindowMs`). The pool hands out
/// its connections in turn, so below about one request per second per pooled connection
/// (`--pool-size`) each request pays that round trip.
const IDLE_CHECK: Duration = Duration::from_millis(900);

/// Opens multiplexed connections and notices when one has died.
///
/// bb8-redis's manager (and redis-rs's own) can only find a dead connection by sending PING on
/// every checkout, which costs a round trip per request; without it a connection that Redis
/// dropped (a restart) would stay in the pool, failing forever. This one marks a connection
/// broken when a command on it fails at the I/O level or times out, and bb8 replaces it; a
/// connection unused for [`IDLE_CHECK`] is PINGed at its checkout.
#[derive(Debug)]
struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    /// Bumped when the health probe finds its connection lost (a Redis restart, a dropped
    /// flow): pooled connections opened before then are retired at their next checkout
    /// instead of failing the request that draws them.
    generation: Arc<AtomicU64>,
}

/// A pooled connection and whether a command on it has failed in a way that leaves it
/// unusable. The flag is shared with the handles cloned from it, since commands run on clones
/// after the pooled connection went back to the pool.
#[derive(Debug)]
struct Connection {
    redis: MultiplexedConnection,
    broken: Arc<AtomicBool>,
    /// The manager's generation when it was opened.
    generation: u64,
    /// When it was opened, and when it was last handed out in use or found alive
    /// (nanoseconds after `opened`). Real time, not tokio's clock, as Redis's idle timeout is.
    opened: std::time::Instant,
    used: AtomicU64,
}

impl Connection {
    /// `now` as [`Connection::used`] counts it.
    fn since_opened(&self, now: std::time::Instant) -> u64 {
        u64::try_from(now.duration_since(self.opened).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the connection has been unused for [`IDLE_CHECK`] at `now`; if not, records
    /// its use at `now`. One that has is recorded only once found alive
    /// ([`Connection::alive_at`]), so a check cut short is made again at the next checkout.
    fn paused(&self, now: u64) -> bool {
        let paused =
            Duration::from_nanos(now.saturating_sub(self.used.load(Relaxed))) >= IDLE_CHECK;
        if !paused {
            self.used.store(now, Relaxed);
        }
        paused
    }

    /// Records that a PING at `now` was answered.
    fn alive_at(&self, now: u64) {
        self.used.store(now, Relaxed);
    }

    /// Whether it can no longer be trusted: a command on it failed, or the health probe lost
    /// its own connection since this one was opened.
    fn retired(&self, generation: &AtomicU64) -> bool {
        self.broken.load(Relaxed) || self.generation < generation.load(Relaxed)
    }
}

impl ManageConnection for Manager {
    type Connection = Connection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Connection, RedisError> {
        let generation = self.generation.load(Relaxed);
        let redis = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(Connection {
            redis,
            broken: Arc::new(AtomicBool::new(false)),
            generation,
            opened: std::time::Instant::now(),
            used: AtomicU64::new(0),
        })
    }

    async fn is_valid(&self, _: &mut Connection) -> Result<(), RedisError> {
        // Not called: test_on_check_out is off (see the type's doc).
        Ok(())
    }

    fn has_broken(&self, connection: &mut Connection) -> bool {
        connection.retired(&self.generation)
    }
}

/// The latest failure to open a connection. bb8 hands connection errors to its error sink and
/// lets the waiting caller time out; keeping the error lets that caller be told why.
#[derive(Debug, Clone, Default)]
struct ConnectErrors {
    latest: Arc<std::sync::Mutex<Option<(Instant, String)>>>,
}

impl ConnectErrors {
    /// The latest connection error, if it happened within `window`.
    fn recent(&self, window: Duration) -> Option<String> {
        let latest = lock(&self.latest);
        latest
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= window)
            .map(|(_, cause)| cause.clone())
    }
}

impl ErrorSink<RedisError> for ConnectErrors {
    fn sink(&self, err: RedisError) {
        let cause = describe(&err);
        *lock(&self.latest) = Some((Instant::now(), cause));
    }

    fn boxed_clone(&self) -> Box<dyn ErrorSink<RedisError>> {
        Box::new(self.clone())
    }
}

/// Whether Redis refused our credentials or permissions (redis-rs 1.x reports a failed AUTH
/// as a kind, not a `WRONGPASS` code).
fn refused_credentials(err: &RedisError) -> bool {
    err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        // A command a script ran that the user may not (Redis 7 answers it without a code).
        || err.to_string().contains("The user executing the script can't run this command")
}

/// Whether the connection the error came on can no longer be used.
fn connection_lost(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error()
}

/// A Redis error in words an operator can act on.
fn describe(err: &RedisError) -> String {
    if refused_credentials(err) {
        format!("redis refused our credentials or permissions ({err}); check --redis-url")
    } else {
        err.to_string()
    }
}

/// The health probe's own connection, apart from the pool (see [`RedisStore::ping`]).
#[derive(Debug, Default)]
struct Probe {
    connection: Option<MultiplexedConnection>,
    /// Whether the latest PING on `connection` timed out.
    timed_out: bool,
}

/// Entries in Redis under `{prefix}{namespace}:{function}:{digest}`. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct RedisStore {
    pool: Pool<Manager>,
    /// Opens the probe's connection, as the pool's manager opens its own.
    client: Client,
    config: AsyncConnectionConfig,
    probe: Arc<Mutex<Probe>>,
    /// The pool's generation (see [`Manager`]), bumped by the health probe.
    generation: Arc<AtomicU64>,
    gate: Gate,
    connect_errors: ConnectErrors,
    layout: KeyLayout,
    timeout: Duration,
    bust_batch: usize,
    /// The invalidation stream's key.
    invalidations: String,
    watch_stream_len: usize,
    /// The reader's own connection: a blocking `XREAD` holds up every command behind it on
    /// a multiplexed connection, so it never shares one with requests.
    watch_reader: Arc<Mutex<Option<MultiplexedConnection>>>,
}

/// What every operation of a Redis store passes through: the in-flight limit, the store
/// timeout, busy polling for a lone command's reply, and the command's timing in the metrics.
/// Cloning is shallow.
#[derive(Debug, Clone)]
struct Gate {
    /// Bounds the commands in flight: past it, callers are refused at once (load shedding)
    /// rather than queueing behind a slow Redis.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    metrics: Metrics,
    busy_poll: Arc<BusyPoll>,
}

impl Gate {
    /// The limit, timeout and busy polling `settings` name; metrics off until a store's
    /// `with_metrics`.
    fn new(settings: &RedisSettings) -> Self {
        Gate {
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            max_in_flight: settings.max_in_flight,
            timeout: settings.timeout,
            metrics: Metrics::disabled(),
            busy_poll: Arc::new(BusyPoll::new(settings.busy_poll)),
        }
    }

    /// Runs `operation` with a permit, handing it the deadline the store timeout sets; its
    /// time, from the permit on, is the command's latency in the metrics.
    async fn run<T, F, Fut>(&self, op: &'static str, operation: F) -> Result<T, StoreError>
    where
        F: FnOnce(Instant) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        debug_assert!(REDIS_COMMANDS.contains(&op), "{op}");
        let started = Instant::now();
        let deadline = started + self.timeout;
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(StoreError::Overloaded {
                limit: self.max_in_flight,
            });
        };
        let result = self
            .busy_poll
            .run(started, || self.in_flight(), operation(deadline))
            .await;
        // The clock reading the deadline came from: one fewer per command.
        self.metrics.store_command(op, Some(started.into_std()));
        result
    }

    /// Operations holding a permit right now.
    fn in_flight(&self) -> u64 {
        (self.max_in_flight - self.in_flight.available_permits()) as u64
    }
}

/// A store error for a Redis error: out of memory, unreachable (a lost connection, refused
/// credentials, a node loading, failing over or moving slots) or unexpected.
fn classify(err: RedisError) -> StoreError {
    if err.code() == Some("OOM") {
        return StoreError::OutOfMemory(format!(
            "redis refused the write ({}); raise its maxmemory or set an eviction policy",
            err.detail().unwrap_or("OOM")
        ));
    }
    if connection_lost(&err) || err.kind() == ErrorKind::ClusterConnectionNotFound {
        return StoreError::Unavailable(err.to_string());
    }
    if refused_credentials(&err) {
        return StoreError::Unavailable(describe(&err));
    }
    match err.code() {
        Some(
            "LOADING" | "MASTERDOWN" | "READONLY" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MOVED"
            | "ASK",
        ) => StoreError::Unavailable(err.to_string()),
        _ => StoreError::Internal(err.to_string()),
    }
}

impl RedisStore {
    /// A store for `settings`. Connects lazily, so the server starts (and reports NOT_SERVING)
    /// while Redis is down.
    ///
    /// # Errors
    /// When the URL cannot be parsed.
    pub fn new(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = match &settings.tls_ca {
            None => Client::open(settings.url.as_str()),
            Some(ca) => {
                let certificates = TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                };
                Client::build_with_tls(settings.url.as_str(), certificates)
            }
        }
        .map_err(|err| StoreError::Internal(format!("--redis-url: {err}")))?;
        // No response timeout inside redis-rs: `run` bounds every command by the store
        // timeout already, and a second timer per command cost a syscall (BENCHMARKS.md).
        // The invalidation reader's blocking XREAD needs it too: redis-rs's default (500 ms)
        // would cut a read that blocks for a heartbeat interval.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(None);
        let connect_errors = ConnectErrors::default();
        let generation = Arc::new(AtomicU64::new(0));
        let pool = Pool::builder()
            .max_size(settings.pool_size)
            .min_idle(None)
            .test_on_check_out(false)
            // No connect retry loop inside bb8: each checkout makes at most one attempt. bb8
            // reports the failure to the error sink, not to the waiting caller, who waits out
            // the timeout and is then told the cause (see `connection`).
            .retry_connection(false)
            .connection_timeout(settings.timeout)
            .error_sink(Box::new(connect_errors.clone()))
            .build_unchecked(Manager {
                client: client.clone(),
                config: config.clone(),
                generation: generation.clone(),
            });
        Ok(RedisStore {
            pool,
            client,
            config,
            probe: Arc::default(),
            generation,
            gate: Gate::new(settings),
            connect_errors,
            layout: KeyLayout::new(&settings.key_prefix),
            timeout: settings.timeout,
            bust_batch: settings.bust_batch,
            invalidations: stream_key(&settings.key_prefix),
            watch_stream_len: settings.watch_stream_len,
            watch_reader: Arc::default(),
        })
    }

    /// The same store, timing its commands into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.gate.metrics = metrics;
        self
    }

    /// Drops the probe's connection after it was lost, and retires the pooled connections
    /// opened before: whatever took the probe's connection (a Redis restart, a dropped flow)
    /// most likely took theirs, and they are replaced at checkout rather than failing the
    /// next requests one by one.
    fn retire_probe(&self, probe: &mut Probe) {
        *probe = Probe::default();
        self.generation.fetch_add(1, Relaxed);
    }

    /// A connection handle by `deadline`. The pooled connection goes straight back to the
    /// pool: callers share multiplexed connections, so redis-rs writes the commands queued on
    /// one in a single syscall and Redis answers them together. Holding a connection per
    /// command would cost a write and a read per command (measured in BENCHMARKS.md).
    async fn connection(
        &self,
        op: &'static str,
        deadline: Instant,
    ) -> Result<(MultiplexedConnection, Arc<AtomicBool>), StoreError> {
        loop {
            let pooled = match timeout_at(deadline, self.pool.get()).await {
                Ok(Ok(pooled)) => pooled,
                Ok(Err(RunError::User(err))) => return Err(classify(err)),
                Ok(Err(RunError::TimedOut)) | Err(_) => {
                    // Waiting out the timeout right after connecting failed: say why.
                    return Err(match self.connect_errors.recent(self.timeout * 2) {
                        Some(cause) => {
                            StoreError::Unavailable(format!("cannot connect to redis: {cause}"))
                        }
                        None => StoreError::Timeout {
                            op,
                            after: self.timeout,
                        },
                    });
                }
            };
            // A connection that broke since it was last returned is dropped on return (bb8
            // asks has_broken); take another.
            if pooled.retired(&self.generation) {
                continue;
            }
            // Held through the PING, so no other caller takes it unchecked meanwhile.
            let now = pooled.since_opened(std::time::Instant::now());
            if pooled.paused(now) {
                let (mut redis, ping) = (pooled.redis.clone(), redis::cmd("PING"));
                match timeout_at(deadline, ping.query_async::<()>(&mut redis)).await {
                    Ok(Ok(())) => pooled.alive_at(now),
                    Ok(Err(err)) if connection_lost(&err) => {
                        pooled.broken.store(true, Relaxed);
                        continue;
                    }
                    // Redis answering with an error (LOADING, BUSY): the connection works.
                    Ok(Err(err)) => return Err(classify(err)),
                    Err(_) => {
                        pooled.broken.store(true, Relaxed);
                        return Err(StoreError::Timeout {
                            op,
                            after: self.timeout,
                        });
                    }
                }
            }
            return Ok((pooled.redis.clone(), pooled.broken.clone()));
        }
    }

    /// Runs one command (or pipeline) within the store timeout, waiting and checkout
    /// included, and retires the connection when the failure means it can no longer be
    /// trusted. Its time, from the permit on, is the command's latency in the metrics.
    async fn run<T, F, Fut>(&self, op: &'static str, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.gate
            .run(op, |deadline| self.run_by(deadline, op, command))
            .await
    }

    /// [`RedisStore::run`] once it holds a permit.
    async fn run_by<T, F, Fut>(
        &self,
        deadline: Instant,
        op: &'static str,
        command: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (redis, broken) = self.connection(op, deadline).await?;
        match timeout_at(deadline, command(redis)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if connection_lost(&err) {
                    broken.store(true, Relaxed);
                }
                Err(classify(err))
            }
            Err(_) => {
                // A reply may still arrive for a command we gave up on; a fresh connection
                // keeps later callers from waiting behind a stalled one.
                broken.store(true, Relaxed);
                Err(StoreError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
        }
    }

    /// Sends `pipe`, a change and then the `XADD` of its invalidation, in one round trip
    /// (Redis runs them in order on the connection, so the invalidation is in the stream
    /// once the reply arrives): the change's reply, and the invalidation's position or why
    /// it was not published. A failed change is an error; the `XADD` after it ran anyway,
    /// which costs watchers at most a needless invalidation.
    async fn changed_and_published(
        &self,
        op: &'static str,
        mut pipe: redis::Pipeline,
    ) -> Result<(Value, Result<u64, StoreError>), StoreError> {
        pipe.ignore_errors();
        let mut replies: Vec<RedisResult<Value>> = self
            .run(
                op,
                |mut conn| async move { pipe.query_async(&mut conn).await },
            )
            .await?;
        let (Some(published), Some(changed), None) = (replies.pop(), replies.pop(), replies.pop())
        else {
            return Err(StoreError::Internal(format!("{op}: not two replies")));
        };
        let changed = changed.map_err(classify)?;
        let published = published
            .map_err(classify)
            .and_then(|id| published_position(std::slice::from_ref(&id)))
            .map_err(|err| publish_error(&self.invalidations, err));
        Ok((changed, published))
    }

    /// Runs `cmd` on the invalidation reader's own connection (opened when there is none,
    /// dropped when a command on it fails), within `bound`, outside the in-flight limit.
    async fn on_reader<T: redis::FromRedisValue>(
        &self,
        bound: Duration,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut reader = self.watch_reader.lock().await;
        let connection = match reader.as_mut() {
            Some(connection) => connection,
            None => {
                // The config bounds the connect (--connect-timeout-ms).
                let connection = self
                    .client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await
                    .map_err(classify)?;
                reader.insert(connection)
            }
        };
        match tokio::time::timeout(bound, cmd.query_async(connection)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(err)) => {
                *reader = None;
                Err(classify(err))
            }
            Err(_) => {
                *reader = None;
                Err(StoreError::Timeout {
                    op: "XREAD",
                    after: bound,
                })
            }
        }
    }

    /// Writes the tag indexes of the tagged `entries`, before the entries themselves (see
    /// [`tags`]); nothing when none is tagged.
    async fn write_tag_indexes(&self, entries: &[NewEntry]) -> Result<(), StoreError> {
        let commands = tags::index_commands(&self.layout, entries, tags::index_slack(self.timeout));
        self.write_indexes(commands).await
    }

    /// Sends index writes (see [`tags`]) in one pipeline; nothing when there are none.
    async fn write_indexes(&self, commands: Vec<(String, redis::Cmd)>) -> Result<(), StoreError> {
        if commands.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (_, command) in commands {
            pipe.add_command(command).ignore();
        }
        self.run("EVAL (tag index)", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// SCANs `scope`'s pattern and UNLINKs the entries of `scope` it finds, and the tag
    /// indexes a namespace or all bust covers, batch by batch; each step is bounded by the
    /// store timeout, the whole bust by nothing but the work (a million keys take seconds).
    /// Each round trip unlinks one batch and asks for the next, halving the round trips.
    /// Only entries count as removed.
    async fn bust_matching(&self, scope: Scope<'_>, pattern: String) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut indexes: Vec<Vec<u8>> = Vec::new();
        let mut removed = 0;
        loop {
            let mut pipe = redis::pipe();
            if !batch.is_empty() {
                pipe.cmd("UNLINK").arg(&batch);
            }
            if !indexes.is_empty() {
                pipe.cmd("UNLINK").arg(&indexes).ignore();
            }
            pipe.cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(self.bust_batch);
            let replies: Vec<Value> = self
                .run("SCAN/UNLINK", |mut conn| async move {
                    pipe.query_async(&mut conn).await
                })
                .await?;
            let (unlinked, scanned): (u64, (u64, Vec<Vec<u8>>)) = match replies.as_slice() {
                [unlinked, scanned] => (from_value(unlinked)?, from_value(scanned)?),
                [scanned] => (0, from_value(scanned)?),
                _ => return Err(StoreError::Internal("SCAN pipeline reply".into())),
            };
            removed += unlinked;
            let found;
            (cursor, found) = scanned;
            (batch, indexes) = removable(&self.layout, scope, found);
            if cursor == 0 {
                break;
            }
        }
        if !(batch.is_empty() && indexes.is_empty()) {
            let mut pipe = redis::pipe();
            if !batch.is_empty() {
                pipe.cmd("UNLINK").arg(&batch);
            }
            if !indexes.is_empty() {
                pipe.cmd("UNLINK").arg(&indexes).ignore();
            }
            removed += self.unlink(pipe).await?;
        }
        Ok(removed)
    }

    /// ZSCANs the index of `tag` in `namespace` and UNLINKs the entries its members name,
    /// batch by batch as [`RedisStore::bust_matching`] does (see [`tags`]).
    async fn bust_tagged(&self, namespace: &str, tag: &str) -> Result<u64, StoreError> {
        let index = self.layout.tag_index(namespace, tag);
        let mut cursor: u64 = 0;
        let mut batch: Vec<String> = Vec::new();
        let mut removed = 0;
        loop {
            let mut pipe = redis::pipe();
            if !batch.is_empty() {
                pipe.cmd("UNLINK").arg(&batch);
            }
            pipe.add_command(tags::scan_command(&index, cursor, self.bust_batch));
            let replies: Vec<Value> = self
                .run("ZSCAN/UNLINK", |mut conn| async move {
                    pipe.query_async(&mut conn).await
                })
                .await?;
            let (unlinked, scanned): (u64, (u64, Vec<Vec<u8>>)) = match replies.as_slice() {
                [unlinked, scanned] => (from_value(unlinked)?, from_value(scanned)?),
                [scanned] => (0, from_value(scanned)?),
                _ => return Err(StoreError::Internal("ZSCAN pipeline reply".into())),
            };
            removed += unlinked;
            cursor = scanned.0;
            batch = tags::member_entries(&self.layout, namespace, &scanned.1);
            if cursor == 0 {
                break;
            }
        }
        if !batch.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("UNLINK").arg(&batch);
            removed += self.unlink(pipe).await?;
        }
        Ok(removed)
    }

    /// Runs a pipeline of UNLINKs, returning how many keys its counted ones removed.
    async fn unlink(&self, pipe: redis::Pipeline) -> Result<u64, StoreError> {
        let unlinked: Vec<u64> = self
            .run("UNLINK", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(unlinked.iter().sum())
    }
}

/// The entries of `keys` with their `PTTL` and first bytes (`GETRANGE` of the header),
/// leaving out those gone since the SCAN (a `PTTL` of -2), lease placeholders and stale copies.
fn key_infos(layout: &KeyLayout, keys: &[Vec<u8>], replies: Vec<(i64, Vec<u8>)>) -> Vec<KeyInfo> {
    keys.iter()
        .zip(replies)
        .filter_map(|(key, (pttl, head))| {
            Some(KeyInfo {
                digest: layout.parse(key)?.digest.to_owned(),
                ttl: lease::listed_ttl(&head, pttl)?,
            })
        })
        .collect()
}

/// What a bust of `scope` removes among the keys a SCAN `found`, by the exact grammar: the
/// entries it counts, and the tag indexes it unlinks without counting them.
fn removable(
    layout: &KeyLayout,
    scope: Scope<'_>,
    found: Vec<Vec<u8>>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut entries, mut indexes) = (Vec::new(), Vec::new());
    for key in found {
        match layout.classify(&key) {
            Some(LayoutKey::Entry(entry)) if scope.contains(&entry) => entries.push(key),
            Some(index @ LayoutKey::TagIndex(_)) if scope.removes(&index) => indexes.push(key),
            _ => {}
        }
    }
    (entries, indexes)
}

fn from_value<T: redis::FromRedisValue>(value: &Value) -> Result<T, StoreError> {
    redis::from_redis_value_ref(value).map_err(|err| StoreError::Internal(err.to_string()))
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn busy_polls(&self) -> bool {
        self.gate.busy_poll.is_on()
    }

    async fn lookup(&self, key: &EntryKey, left: bool) -> Result<Found, StoreError> {
        let key = self.layout.entry(key);
        if !left {
            let stored: Option<Vec<u8>> = self
                .run("GET", |mut conn| {
                    let key = key.clone();
                    async move { redis::cmd("GET").arg(key).query_async(&mut conn).await }
                })
                .await?;
            if !lease::needs_pttl(stored.as_deref()) {
                return Ok(lease::found(stored, None));
            }
            // A value with a stale window, read by a caller that did not expect one: its
            // PTTL says whether it is still live (a second round trip, for such values only).
        }
        let (stored, pttl): (Option<Vec<u8>>, i64) = self
            .run("GET", |mut conn| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(lease::found(stored, Some(pttl)))
    }

    async fn acquire(
        &self,
        entry: &EntryKey,
        ask: LeaseAsk,
        tags: &[String],
    ) -> Result<Acquired, StoreError> {
        self.write_indexes(tags::lease_index_commands(
            &self.layout,
            entry,
            tags,
            lease::placeholder_life(ask.lease),
            tags::index_slack(self.timeout),
        ))
        .await?;
        let key = self.layout.entry(entry);
        let reply: Value = self
            .run("EVAL (lease)", |mut conn| async move {
                scripts().acquire(key, ask).invoke_async(&mut conn).await
            })
            .await?;
        lease::acquired(&reply).map_err(StoreError::Internal)
    }

    async fn put_leased(&self, entry: &NewEntry, token: u64) -> Result<bool, StoreError> {
        self.write_tag_indexes(std::slice::from_ref(entry)).await?;
        let key = self.layout.entry(&entry.key);
        self.run("EVAL (leased SET)", |mut conn| async move {
            scripts()
                .put(key, entry, token)
                .invoke_async(&mut conn)
                .await
        })
        .await
    }

    async fn release(&self, key: &EntryKey, token: u64) -> Result<bool, StoreError> {
        let key = self.layout.entry(key);
        self.run("EVAL (release)", |mut conn| async move {
            scripts().release(key, token).invoke_async(&mut conn).await
        })
        .await
    }

    async fn get_many(&self, keys: &[EntryKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = keys.iter().map(|key| self.layout.entry(key)).collect();
        let values: Vec<Option<Vec<u8>>> = self
            .run("MGET", |mut conn| {
                let keys = keys.clone();
                async move { redis::cmd("MGET").arg(keys).query_async(&mut conn).await }
            })
            .await?;
        // Values kept past their TTL need their PTTL to tell whether they are still live: a
        // second round trip, only for them.
        let stale_kept: Vec<usize> = (0..values.len())
            .filter(|&index| lease::needs_pttl(values[index].as_deref()))
            .collect();
        let mut pttls = vec![None; values.len()];
        if !stale_kept.is_empty() {
            let mut pipe = redis::pipe();
            for &index in &stale_kept {
                pipe.cmd("PTTL").arg(&keys[index]);
            }
            let replies: Vec<i64> = self
                .run("PTTL", |mut conn| async move {
                    pipe.query_async(&mut conn).await
                })
                .await?;
            for (index, pttl) in stale_kept.into_iter().zip(replies) {
                pttls[index] = Some(pttl);
            }
        }
        Ok(values
            .into_iter()
            .zip(pttls)
            .map(|(stored, pttl)| lease::found(stored, pttl).live())
            .collect())
    }

    async fn value_bytes(&self, keys: &[EntryKey]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("STRLEN").arg(self.layout.entry(key));
        }
        let lengths: Vec<u64> = self
            .run("STRLEN", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(lengths.iter().sum())
    }

    async fn put(&self, entry: &NewEntry) -> Result<(), StoreError> {
        self.write_tag_indexes(std::slice::from_ref(entry)).await?;
        let key = self.layout.entry(&entry.key);
        self.run("SET", |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(stored(entry).as_ref())
                .arg("PX")
                .arg(entry.kept_for().as_millis() as u64)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    async fn put_many(&self, entries: &[NewEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write_tag_indexes(entries).await?;
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("SET")
                .arg(self.layout.entry(&entry.key))
                .arg(stored(entry).as_ref())
                .arg("PX")
                .arg(entry.kept_for().as_millis() as u64)
                .ignore();
        }
        self.run("SET (batch)", |mut conn| async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    async fn bust(&self, scope: Scope<'_>) -> Result<u64, StoreError> {
        match scope.redis_target(&self.layout) {
            RedisTarget::Key(key) => {
                self.run("UNLINK", |mut conn| async move {
                    redis::cmd("UNLINK").arg(key).query_async(&mut conn).await
                })
                .await
            }
            RedisTarget::Pattern(pattern) => self.bust_matching(scope, pattern).await,
        }
    }

    async fn bust_tag(&self, namespace: &str, tag: &str) -> Result<u64, StoreError> {
        self.bust_tagged(namespace, tag).await
    }

    async fn put_then_publish(
        &self,
        entry: &NewEntry,
    ) -> Result<Result<u64, StoreError>, StoreError> {
        self.write_tag_indexes(std::slice::from_ref(entry)).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.layout.entry(&entry.key))
            .arg(stored(entry).as_ref())
            .arg("PX")
            .arg(entry.kept_for().as_millis() as u64);
        let invalidation = Invalidation::put(&entry.key);
        xadd(
            &mut pipe,
            &self.invalidations,
            self.watch_stream_len,
            &invalidation,
        );
        self.changed_and_published("SET+XADD", pipe)
            .await
            .map(|(_, published)| published)
    }

    async fn bust_then_publish(
        &self,
        scope: Scope<'_>,
    ) -> Result<(u64, Result<u64, StoreError>), StoreError> {
        let invalidation = Invalidation::bust(scope);
        let RedisTarget::Key(key) = scope.redis_target(&self.layout) else {
            let removed = self.bust(scope).await?;
            return Ok((removed, self.publish(&[invalidation]).await));
        };
        let mut pipe = redis::pipe();
        pipe.cmd("UNLINK").arg(key);
        xadd(
            &mut pipe,
            &self.invalidations,
            self.watch_stream_len,
            &invalidation,
        );
        let (removed, published) = self.changed_and_published("UNLINK+XADD", pipe).await?;
        Ok((from_value(&removed)?, published))
    }

    async fn publish(&self, invalidations: &[Invalidation]) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        for invalidation in invalidations {
            xadd(
                &mut pipe,
                &self.invalidations,
                self.watch_stream_len,
                invalidation,
            );
        }
        let ids: Vec<Value> = self
            .run("XADD", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await
            .map_err(|err| publish_error(&self.invalidations, err))?;
        published_position(&ids)
    }

    async fn read_invalidations(
        &self,
        after: u64,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Published>, StoreError> {
        let cmd = xread(&self.invalidations, after, count, block);
        let Some(block) = block else {
            let reply = self
                .run("XREAD", |mut conn| async move {
                    cmd.query_async(&mut conn).await
                })
                .await?;
            return read_reply(&self.invalidations, reply);
        };
        self.on_reader(block + self.timeout, cmd)
            .await
            .and_then(|reply| read_reply(&self.invalidations, reply))
    }

    async fn invalidation_tail(&self) -> Result<u64, StoreError> {
        let cmd = xrevrange_last(&self.invalidations);
        let reply = self
            .run("XREVRANGE", |mut conn| async move {
                cmd.query_async(&mut conn).await
            })
            .await?;
        tail_reply(&self.invalidations, reply)
    }

    async fn reader_tail(&self) -> Result<u64, StoreError> {
        // On the reader's own connection: a background read never takes (or is shed by) a
        // request's --max-in-flight permit.
        let cmd = xrevrange_last(&self.invalidations);
        self.on_reader(self.timeout, cmd)
            .await
            .and_then(|reply| tail_reply(&self.invalidations, reply))
    }

    async fn reader_nonce(&self, position: u64) -> Result<Option<String>, StoreError> {
        let cmd = xrange_at(&self.invalidations, position);
        self.on_reader(self.timeout, cmd).await.map(nonce_reply)
    }

    async fn keys(
        &self,
        function: &FunctionKey,
        cursor: &str,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        let mut cursor: u64 = match cursor {
            "" => 0,
            text => text
                .parse()
                .map_err(|_| StoreError::InvalidCursor(text.to_owned()))?,
        };
        let pattern = self.layout.function_pattern(function);
        let mut found: Vec<Vec<u8>> = Vec::new();
        // SCAN may return nothing for many steps when the keyspace is large and the function
        // small; keep stepping until the page has entries or the scan is done.
        loop {
            let step = |mut conn: MultiplexedConnection| {
                let pattern = pattern.clone();
                async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(limit.max(100))
                        .query_async::<(u64, Vec<Vec<u8>>)>(&mut conn)
                        .await
                }
            };
            let (next, keys) = self.run("SCAN", step).await?;
            found.extend(
                keys.into_iter()
                    .filter(|key| Scope::Function(function).holds(&self.layout, key)),
            );
            cursor = next;
            if cursor == 0 || found.len() >= limit {
                break;
            }
        }
        let mut pipe = redis::pipe();
        for key in &found {
            pipe.cmd("PTTL").arg(key);
            pipe.cmd("GETRANGE")
                .arg(key)
                .arg(0)
                .arg(lease::HEADER_LEN - 1);
        }
        let replies: Vec<(i64, Vec<u8>)> = if found.is_empty() {
            Vec::new()
        } else {
            self.run("PTTL", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?
        };
        Ok(KeysPage {
            entries: key_infos(&self.layout, &found, replies),
            next_cursor: if cursor == 0 {
                String::new()
            } else {
                cursor.to_string()
            },
        })
    }

    /// PINGs Redis on the probe's own connection, within the store timeout.
    ///
    /// Not through the pool or the in-flight limit: a burst of requests must not make the
    /// probe fail (every replica would report NOT_SERVING at once and readiness would drain
    /// the fleet), and a PING must not queue behind the requests on a shared connection,
    /// such as writes held by `CLIENT PAUSE WRITE` during a failover. One slow reply (Redis
    /// busy with a long command) keeps the connection; a second in a row replaces it, since
    /// only a new connection can tell a silently dead one (a half-open TCP flow) from a slow
    /// Redis.
    async fn ping(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.timeout;
        let timeout = || StoreError::Timeout {
            op: "PING",
            after: self.timeout,
        };
        // Only the health monitor probes, one probe at a time; the lock is never contended.
        let mut probe = self.probe.lock().await;
        let mut connection = match &probe.connection {
            Some(connection) => connection.clone(),
            None => {
                let connect = self
                    .client
                    .get_multiplexed_async_connection_with_config(&self.config);
                let connection = timeout_at(deadline, connect)
                    .await
                    .map_err(|_| timeout())?
                    .map_err(|err| {
                        StoreError::Unavailable(format!(
                            "cannot connect to redis: {}",
                            describe(&err)
                        ))
                    })?;
                probe.connection = Some(connection.clone());
                connection
            }
        };
        let ping = async {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        match timeout_at(deadline, ping).await {
            Ok(Ok(pong)) => {
                probe.timed_out = false;
                if pong != "PONG" {
                    warn!(reply = %pong, "redis answered PING oddly");
                }
                Ok(())
            }
            Ok(Err(err)) => {
                if connection_lost(&err) {
                    self.retire_probe(&mut probe);
                }
                Err(classify(err))
            }
            Err(_) => {
                if probe.timed_out {
                    self.retire_probe(&mut probe);
                } else {
                    probe.timed_out = true;
                }
                Err(timeout())
            }
        }
    }

    fn state(&self) -> StoreState {
        let pool = self.pool.state();
        StoreState {
            in_flight: self.gate.in_flight(),
            pool: Some(PoolState {
                connections: pool.connections,
                idle: pool.idle_connections,
                created: pool.statistics.connections_created,
                broken: pool.statistics.connections_closed_broken,
            }),
            memory: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::busy_poll::tests::seen_only_by_polling;

    /// The gate polls for a command alone in flight (after one that was alone too): a
    /// command answered in a way that wakes nobody completes only by being polled for.
    #[tokio::test]
    async fn the_gate_polls_for_a_lone_command() {
        let gate = Gate::new(&RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "cm:".into(),
            pool_size: 1,
            max_in_flight: 4,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            bust_batch: 100,
            tls_ca: None,
            watch_stream_len: 100,
            watch_block: Duration::from_secs(1),
            busy_poll: Duration::from_secs(5),
        });
        gate.run("GET", |_| async { Ok(()) }).await.unwrap();
        let answered = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let answered = answered.clone();
            async move { answered.store(true, Relaxed) }
        });
        // A store command's result, from a command that only polling sees answered.
        let seen = |answered, polls| async move {
            Ok::<_, StoreError>(seen_only_by_polling(answered, polls).await)
        };
        let polls = std::sync::atomic::AtomicUsize::new(0);
        tokio::select! {
            reply = gate.run("GET", |_| seen(&answered, &polls)) => assert_eq!(reply.unwrap(), "reply"),
            () = tokio::time::sleep(Duration::from_secs(2)) => panic!("not polled for"),
        }
        // With another operation holding a permit, a command is polled once and waits.
        let _other = gate.in_flight.clone().try_acquire_owned().unwrap();
        let (never, polls) = (
            AtomicBool::new(false),
            std::sync::atomic::AtomicUsize::new(0),
        );
        let unanswered = |_| seen(&never, &polls);
        tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = gate.run("GET", unanswered) => unreachable!("never answered"),
        }
        assert_eq!(
            polls.load(Relaxed),
            1,
            "polled for beside another operation"
        );
    }

    /// A Redis too old for `XADD … 0-*` is named as such, with what to do, not as an internal
    /// error.
    #[test]
    fn a_redis_without_0_star_ids_is_named() {
        let err = publish_error(
            "cm:#invalidations",
            StoreError::Internal(
                "ERR Invalid stream ID specified as stream command argument".into(),
            ),
        );
        let StoreError::Unavailable(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("Redis 7.0") && message.contains("--invalidations off"));
    }
}
