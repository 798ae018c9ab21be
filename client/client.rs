//! [`Client`]: a cheap, cloneable handle to a cache-money service, shared by every
//! [`Function`] made from it.

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http::HeaderValue;
use tonic::{
    Code, Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tracing::{debug, info, warn};

use crate::{
    DEFAULT_MAX_TTL_SECONDS, Error, Function,
    breaker::{Breaker, Transition},
    connect::{self, describe},
    key::{EntryKey, check_name},
    lease::DEFAULT_LEASE,
    near::{
        DEFAULT_NEAR_CACHE_BYTES, DEFAULT_NEAR_CACHE_SILENCE, DEFAULT_NEAR_REFUSED_BACKOFF, Near,
        Scope,
    },
    pb::{self, cache_money_client::CacheMoneyClient},
    single_flight::SingleFlight,
    transport::Transport,
};

/// How long a cache lookup or store may take before `memoize` gives up on the cache.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);
/// How long a bust may take; a large bust walks the keyspace for seconds.
pub const DEFAULT_BUST_DEADLINE: Duration = Duration::from_secs(60);
/// Failures in a row that open the circuit breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
/// How long an open breaker skips the cache before probing it again.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
/// The TTL of handles made without one, as the seed's decorator defaults to an hour.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);
/// How long to wait for a TCP connection to the service.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may be silent before the client PINGs the server. With
/// [`DEFAULT_KEEPALIVE_TIMEOUT`] it bounds how long a dead or unreachable server goes
/// unnoticed: 7 s. cache-money's server answers PINGs at any rate; a gRPC proxy in between
/// may not (grpc-core servers send GOAWAY to clients that PING more often than every five
/// minutes unless configured otherwise): raise it there.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a PING may go unanswered before the connection is closed and replaced.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a direct connection's Get may poll for its reply before its task sleeps until
/// the reply wakes it ([`ClientOptions::busy_poll`]).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(100);
/// The longest [`ClientOptions::busy_poll`]: a reply that takes longer is not worth polling
/// for (the server's `--redis-busy-poll-us` has the same bound).
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);
/// How often a client of several replicas ([`Client::connect_many`]) asks each one's gRPC
/// health service whether it serves. With [`DEFAULT_PROBE_TIMEOUT`] it bounds how long a
/// dead, frozen or draining replica keeps being sent calls: 1.5 s.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a replica's health check may go unanswered before calls go to the others.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The largest response the client decodes: what the server sends at most by default
/// (`--max-response-bytes`, which bounds the whole encoded `GetMany` answer).
pub const DEFAULT_MAX_RECEIVE_BYTES: usize = crate::limits::DEFAULT_MAX_MESSAGE_BYTES;

/// How a [`Client`] behaves; [`Default`] gives the documented defaults.
#[derive(Clone)]
pub struct ClientOptions {
    /// Bound on each cache lookup and store made by `memoize`.
    pub deadline: Duration,
    /// Bound on each bust.
    pub bust_deadline: Duration,
    /// Failures in a row that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker skips the cache before one probe.
    pub breaker_cooldown: Duration,
    /// Bound on opening a connection to the service; more than zero.
    pub connect_timeout: Duration,
    /// How often the client PINGs the server, also while idle, to check the connection is
    /// alive (through a tonic `Channel`: after this long without a frame from the server); at
    /// least 10 ms.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is replaced; more than zero.
    pub keepalive_timeout: Duration,
    /// How long a Get (a `memoize` lookup, [`Client::raw_get`]) keeps checking for its reply
    /// before its task sleeps until the reply wakes it ([`DEFAULT_BUSY_POLL`], 100 µs; at
    /// most [`MAX_BUSY_POLL`]; `Duration::ZERO` turns it off).
    ///
    /// Cost: the caller's thread stays busy through the round trip instead of asleep, up to
    /// this much CPU per Get (on the AMD EPYC KVM of BENCHMARKS.md, "The client polls for its
    /// reply", 63 µs of CPU per hit against 30), which a CPU quota sees; a reply that comes
    /// just after the budget pays for the polling and the wake-up both. Gain: a sleeping
    /// thread has to be woken when the reply comes, which on a VM without guest halt-polling
    /// goes through the hypervisor: there a one-caller memoize hit took 60–61 µs instead of
    /// 95–99. Expect less on bare metal or a guest that halt-polls; set it to zero there, or
    /// where CPU is metered.
    ///
    /// Only where it can pay:
    /// - on a direct (`http://`) connection, from the thread of the tokio current-thread
    ///   runtime that opened it (`#[tokio::main(flavor = "current_thread")]`, and
    ///   `#[tokio::test]`'s; on the multi-thread runtime an idle worker holds the I/O
    ///   driver, so polling would not save the wake-up);
    /// - while the Get is the only one of this client's Gets awaiting its reply, and the
    ///   one before it was too (other calls, a put or a bust, do not count: a thread that
    ///   has only them to wait for would sleep as well);
    /// - while Gets have lately been answered within the budget (the average of their
    ///   times): a service further away than that costs no polling, but one nearer, a
    ///   sidecar or the same host, or a LAN answering within the budget, is polled for
    ///   through the whole round trip.
    ///
    /// Each round yields to the runtime, so the thread's other tasks and timers go on.
    /// [`ClientMetrics::polled_gets`] counts the replies it caught.
    pub busy_poll: Duration,
    /// How often each replica's health is checked, with several replicas
    /// ([`Client::connect_many`]) or [`ClientOptions::resolve_interval`]; at least 10 ms.
    pub probe_interval: Duration,
    /// How long a replica's health check may take before calls go to the other replicas.
    pub probe_timeout: Duration,
    /// `Some(every)`: look the service's host name up when the client is made and again
    /// `every`, and balance over every address it resolves to (a headless Kubernetes service,
    /// a DNS round robin). `None` (the default): each URL is one replica, its name resolved
    /// by each new connection. At least 10 ms.
    pub resolve_interval: Option<Duration>,
    /// PEM CA certificate(s) to verify an `https://` service with, instead of the system's
    /// trust store.
    pub tls_ca: Option<Vec<u8>>,
    /// The largest response the client accepts; keep it at least the server's
    /// `--max-response-bytes`.
    pub max_receive_bytes: usize,
    /// TTL of handles made by [`Client::function_with_default_ttl`].
    pub default_ttl: Duration,
    /// The longest TTL the service accepts: set it to the server's `--max-ttl-seconds`. A
    /// handle with a longer TTL is refused when it is made, since the service would refuse
    /// every store and `memoize` would never cache.
    pub max_ttl: Duration,
    /// `false` turns caching off: `memoize` calls the function every time and busts do
    /// nothing, as the seed allows for local development.
    pub enabled: bool,
    /// The lease lifetime `memoize` asks for on a miss, so one caller fleet-wide computes
    /// while the others wait for its result ([`DEFAULT_LEASE`], 5 s; README, "One
    /// computation per key"). Handles may set their own ([`Function::lease`]);
    /// `Duration::ZERO` turns leases off (every process computes a missing entry itself, as
    /// before leases). The server shortens a lease longer than its `--lease-max-ms` (60 s by
    /// default) to that. Keep it above the function's usual compute time: a holder that has
    /// not written when its lease expires loses it to the next caller.
    pub lease: Duration,
    /// Bearer token sent with every call, for a server with authentication on.
    pub token: Option<String>,
    /// The size in bytes of the near cache: copies of entries kept in this process so a
    /// repeated `memoize` call is answered without a round trip (README, "The near cache").
    /// 0 ([`DEFAULT_NEAR_CACHE_BYTES`]): off.
    ///
    /// Off by default because it changes what a caller can see: without it, a bust made by
    /// any process is seen by every later lookup at once; with it, another process's bust
    /// (or overwrite) reaches this client's copies through the service's invalidation stream,
    /// after a short delay (milliseconds while the stream is healthy; a client whose stream
    /// is unhealthy serves nothing from its copies). It also keeps one `Watch` stream open
    /// per client (following [`ClientOptions::near_cache_namespaces`] from the start, and
    /// the namespaces remote hits came from as they come). This client's own busts drop its
    /// copies before they return. Copies are weighed as their key and value bytes plus 320
    /// bytes per entry, about what a copy costs in memory beyond them, so this roughly bounds
    /// the memory the copies take (the allocator's rounding varies, and the record of
    /// namespaces and functions invalidated, at most 4,096 names, comes on top).
    pub near_cache_bytes: usize,
    /// Namespaces the near cache follows from the start: its stream opens when the client is
    /// made (in a Tokio runtime; otherwise at the first remote hit), so the first remote hit
    /// in one of them can already be copied. A namespace not named here is followed from
    /// this client's first remote hit in it: that hit and the lookups in flight while the
    /// stream is reopened to follow it are not copied. Every name must be one this client
    /// may read (a stream naming one it may not is refused, which bypasses the near cache
    /// until a retry succeeds). Empty by default. Ignored without `near_cache_bytes`.
    pub near_cache_namespaces: Vec<String>,
    /// How long the near cache trusts its invalidation stream without a heartbeat (servers
    /// send one every second by default, `--watch-heartbeat-ms`): after that long without a
    /// heartbeat or RESET, the copies are dropped and `memoize` goes to the service until a
    /// new stream speaks ([`DEFAULT_NEAR_CACHE_SILENCE`], 3 s). Invalidations do not count:
    /// a server that stops keeping up stops its heartbeats but may still relay other
    /// replicas' invalidations. This bounds how long a copy can outlive a bust that the
    /// stream failed to deliver. It must exceed about twice the server's heartbeat interval
    /// (two heartbeats can be up to about two intervals apart), or a healthy stream is taken
    /// for a silent one now and then; the default, three intervals of the server's default,
    /// leaves room for one late heartbeat.
    pub near_cache_silence: Duration,
    /// A test hook, not an API: looks hosts up instead of the system's resolver, with
    /// [`ClientOptions::resolve_interval`] (so a test can make one name resolve to several
    /// loopback replicas).
    #[doc(hidden)]
    pub resolver: Option<Resolver>,
    /// A test hook, not an API: awaited when a lookup's answer that may enter the near cache
    /// has arrived, before the rule decides whether it does, so a test can land a bust in
    /// between.
    #[doc(hidden)]
    pub near_insert_hook: Option<NearInsertHook>,
    /// A test hook, not an API: the first pause before the near cache asks again for a
    /// stream the service refused (1 minute, doubling up to 10).
    #[doc(hidden)]
    pub near_refused_backoff: Duration,
}

/// A test hook, not an API: what [`ClientOptions::near_insert_hook`] holds.
#[doc(hidden)]
pub type NearInsertHook =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A test hook, not an API: what [`ClientOptions::resolver`] holds, a host and port to the
/// addresses they resolve to.
#[doc(hidden)]
pub type Resolver = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("deadline", &self.deadline)
            .field("bust_deadline", &self.bust_deadline)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("busy_poll", &self.busy_poll)
            .field("probe_interval", &self.probe_interval)
            .field("probe_timeout", &self.probe_timeout)
            .field("resolve_interval", &self.resolve_interval)
            .field("resolver", &self.resolver.is_some())
            .field("near_insert_hook", &self.near_insert_hook.is_some())
            .field("near_refused_backoff", &self.near_refused_backoff)
            .field("tls_ca", &self.tls_ca.as_ref().map(|pem| pem.len()))
            .field("max_receive_bytes", &self.max_receive_bytes)
            .field("default_ttl", &self.default_ttl)
            .field("max_ttl", &self.max_ttl)
            .field("enabled", &self.enabled)
            .field("lease", &self.lease)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("near_cache_bytes", &self.near_cache_bytes)
            .field("near_cache_silence", &self.near_cache_silence)
            .field("near_cache_namespaces", &self.near_cache_namespaces)
            .finish()
    }
}

/// The shortest keepalive interval: shorter would spend the connection on PINGs.
const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(10);

/// Refuses connection settings that cannot work: a zero connect or keepalive timeout (every
/// connection would fail), a keepalive interval under [`MIN_KEEPALIVE_INTERVAL`], a polling
/// budget over [`MAX_BUSY_POLL`].
fn check_connection_options(options: &ClientOptions) -> Result<(), Error> {
    let refuse = |what: String| Err(Error::InvalidOption(what));
    if options.connect_timeout.is_zero() {
        return refuse("connect_timeout: must be more than zero".into());
    }
    if options.keepalive_timeout.is_zero() {
        return refuse("keepalive_timeout: must be more than zero".into());
    }
    if options.keepalive_interval < MIN_KEEPALIVE_INTERVAL {
        return refuse(format!(
            "keepalive_interval: must be at least {} ms",
            MIN_KEEPALIVE_INTERVAL.as_millis()
        ));
    }
    if options.busy_poll > MAX_BUSY_POLL {
        return refuse(format!(
            "busy_poll: at most {} µs (a reply that takes longer is not worth polling for), got {} µs",
            MAX_BUSY_POLL.as_micros(),
            options.busy_poll.as_micros()
        ));
    }
    Ok(())
}

/// The `authorization` header carrying the options' token, if any (sent never-indexed).
///
/// # Errors
/// [`Error::InvalidToken`] when the token cannot travel in metadata (gRPC's ASCII rules).
fn authorization(options: &ClientOptions) -> Result<Option<HeaderValue>, Error> {
    let Some(token) = &options.token else {
        return Ok(None);
    };
    let value = format!("Bearer {token}");
    MetadataValue::<Ascii>::try_from(value.as_str()).map_err(|_| Error::InvalidToken)?;
    let mut header = HeaderValue::try_from(value).map_err(|_| Error::InvalidToken)?;
    header.set_sensitive(true);
    Ok(Some(header))
}

/// The generated stub as this client uses it: over its [`Transport`], which adds the
/// client's token to every call.
pub type RawClient = CacheMoneyClient<Transport>;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: DEFAULT_DEADLINE,
            bust_deadline: DEFAULT_BUST_DEADLINE,
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            busy_poll: DEFAULT_BUSY_POLL,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            resolve_interval: None,
            resolver: None,
            near_insert_hook: None,
            near_refused_backoff: DEFAULT_NEAR_REFUSED_BACKOFF,
            tls_ca: None,
            max_receive_bytes: DEFAULT_MAX_RECEIVE_BYTES,
            default_ttl: DEFAULT_TTL,
            max_ttl: Duration::from_secs(DEFAULT_MAX_TTL_SECONDS.into()),
            enabled: true,
            lease: DEFAULT_LEASE,
            token: None,
            near_cache_bytes: DEFAULT_NEAR_CACHE_BYTES,
            near_cache_silence: DEFAULT_NEAR_CACHE_SILENCE,
            near_cache_namespaces: Vec::new(),
        }
    }
}

/// What a client has done since it was made, for dashboards and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientMetrics {
    /// Lookups and stores sent to the service.
    pub rpc_attempts: u64,
    /// Of those, the ones that failed or timed out.
    pub rpc_failures: u64,
    /// Of those, the ones the service refused as invalid (e.g. a value over its size limit):
    /// not failures of the service, but results that were not cached.
    pub refused: u64,
    /// Lookups and stores skipped because the breaker was open.
    pub skipped: u64,
    /// `memoize` calls answered from the cache (the near cache's hits included).
    pub hits: u64,
    /// `memoize` calls that ran the function.
    pub computed: u64,
    /// Stored values that did not decode into the expected type (treated as misses).
    pub undecodable: u64,
    /// Leases this client won: its caller computed a missing entry (or recomputed a due one)
    /// for the whole fleet.
    pub leases_won: u64,
    /// `memoize` calls that waited for another caller's lease (each counted once, however
    /// many times it looked again).
    pub lease_waits: u64,
    /// Of those, the ones that stopped waiting because the lease's lifetime plus the deadline
    /// passed without a value, and computed (or served a stale value) themselves.
    pub lease_wait_timeouts: u64,
    /// Results written with a lease the service no longer honoured (a bust, a refresh or a
    /// takeover voided it while computing): returned to their callers, not stored.
    pub refused_writes: u64,
    /// Values past their TTL served because computing a fresh one failed (stale-if-error).
    pub stale_served: u64,
    /// Live entries recomputed because they were due (stale-while-revalidate), by this client
    /// for the fleet.
    pub refreshes: u64,
    /// Whether the breaker is currently open.
    pub breaker_open: bool,
    /// Gets whose answer (a reply, or the connection's error) arrived while the client polled
    /// for it ([`ClientOptions::busy_poll`]), rather than waking its caller's thread. Always
    /// 0 through a tonic `Channel` (`https://`, several replicas, [`Client::from_channel`]).
    pub polled_gets: u64,
    /// `memoize` calls answered from the near cache, without a round trip (also in `hits`).
    pub near_hits: u64,
    /// `memoize` calls that looked in the near cache and found nothing servable (no copy, or
    /// the cache bypassed while its stream is unhealthy).
    pub near_misses: u64,
    /// Copies pushed out of the near cache to stay within its size (including copies an
    /// invalidation of their whole namespace or function had already hidden).
    pub near_evictions: u64,
    /// Invalidation events applied to the near cache.
    pub near_invalidations: u64,
    /// RESET events applied to the near cache (each dropped every copy).
    pub near_resets: u64,
    /// Times the near cache, in use, was emptied because its stream dropped, was refused, or
    /// went without a heartbeat for [`ClientOptions::near_cache_silence`] (failed
    /// reconnections before the next stream's first event are not counted again).
    pub near_flushes: u64,
    /// Live hits that could have been copied into the near cache (looked up while its stream
    /// was healthy) but were kept out by its coherence rule: an invalidation of the key (or
    /// a RESET, a flush, or this client's own bust) arrived while the lookup was in flight,
    /// or more than the invalidations it remembers did.
    pub near_insert_refused: u64,
    /// Whether the near cache's stream is healthy (it delivered its first event and sent a
    /// heartbeat within [`ClientOptions::near_cache_silence`]): only then are copies served.
    pub near_stream_healthy: bool,
    /// Whether the near cache is off because the service refused its last request for a
    /// stream (invalidations off: UNIMPLEMENTED; no right to watch: PERMISSION_DENIED; more
    /// namespaces than the server takes in one request: INVALID_ARGUMENT). Logged at warn the
    /// first time. The stream is asked for again after 1 minute, doubling up to 10 (a
    /// rolling upgrade may replace the replica that refused), and the near cache is used
    /// again once one is granted.
    pub near_disabled: bool,
}

#[derive(Debug, Default)]
struct Counters {
    rpc_attempts: AtomicU64,
    rpc_failures: AtomicU64,
    refused: AtomicU64,
    skipped: AtomicU64,
    hits: AtomicU64,
    computed: AtomicU64,
    undecodable: AtomicU64,
    leases_won: AtomicU64,
    lease_waits: AtomicU64,
    lease_wait_timeouts: AtomicU64,
    refused_writes: AtomicU64,
    stale_served: AtomicU64,
    refreshes: AtomicU64,
}

/// The lease events [`Client::count`] records, one per [`ClientMetrics`] counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    LeaseWon,
    LeaseWaited,
    LeaseWaitTimedOut,
    RefusedWrite,
    StaleServed,
    Refreshed,
}

/// What a `memoize` flight's leader shares with the callers waiting for it: the encoded value,
/// and whether it is a stale one (stale-if-error).
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) bytes: Bytes,
    pub(crate) stale: bool,
}

/// The `memoize` calls under way, by key. A flight's result is the value to share, or `None`
/// when it could not be shared (an error, or a value that does not encode), so each waiter
/// computes its own.
pub(crate) type Flights = SingleFlight<EntryKey, Option<Shared>>;
/// One caller's place in a [`Flights`] flight.
pub(crate) type Flight<'a> = crate::single_flight::Flight<'a, EntryKey, Option<Shared>>;

#[derive(Debug)]
struct Inner {
    rpc: RawClient,
    /// What `rpc` sends through, for the Gets made without it ([`Transport::get`]).
    transport: Transport,
    options: ClientOptions,
    breaker: Breaker,
    counters: Counters,
    flights: Flights,
    /// The near cache, when [`ClientOptions::near_cache_bytes`] is set.
    near: Option<Arc<Near>>,
}

/// A handle to a cache-money service. Cloning is shallow: clones share the connection, the
/// circuit breaker and the in-process single-flight table.
///
/// ```no_run
/// use cache_money::{Client, Ttl};
///
/// # async fn example() -> Result<(), cache_money::Error> {
/// let cm = Client::connect("http://127.0.0.1:50051").await?;
/// let add = cm.function("__main__", "addition", Ttl::HOUR);
/// let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await?;
/// assert_eq!(sum, 7);
/// add.bust(&(3, 4)).await?;
/// add.bust_all().await?;
/// cm.bust_all().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A client for the service at `url` (e.g. `http://127.0.0.1:50051`) with default options.
    ///
    /// Connects lazily: a service that is down now does not stop the application from
    /// starting; `memoize` computes until it is back.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when the URL cannot be parsed.
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// As [`Client::connect`], with options: deadlines, keepalive, TLS, a token.
    ///
    /// `https://` URLs use TLS (feature `tls`, on by default), verified against the system's
    /// trust store or [`ClientOptions::tls_ca`]. A certificate that does not verify fails each
    /// call with the reason; `memoize` then computes, and logs at warn once that caching is
    /// off and why.
    ///
    /// With [`ClientOptions::resolve_interval`] set, the URL's host is looked up and every
    /// address it resolves to is a replica, as with [`Client::connect_many_with`].
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when the URL is not `http://host:port` or `https://host:port`,
    /// [`Error::InvalidToken`] when the token cannot travel in metadata,
    /// [`Error::InvalidOption`] for a connection setting that cannot work (a zero connect or
    /// keepalive timeout, a keepalive interval under 10 ms, a `busy_poll` over 1 ms) or a
    /// near-cache setting out of range.
    pub async fn connect_with(
        url: impl Into<String>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        if options.resolve_interval.is_some() {
            return Self::connect_many_with([url], options).await;
        }
        check_connection_options(&options)?;
        let url = url.into();
        let target = connect::Target::parse(&url)?;
        if target.is_secure() {
            // TLS is tonic's.
            let channel = target.endpoint(&options)?.connect_lazy();
            return Self::from_channel_with(channel, options);
        }
        let transport = Transport::direct(&target, &options, authorization(&options)?);
        Self::build(transport, options)
    }

    /// A client of several replicas of the service, with default options: calls are spread
    /// over them (tonic's balancer), and a replica that stops answering its health check
    /// (dead, frozen, draining, or cut off from the store) is left within
    /// [`ClientOptions::probe_interval`] + [`ClientOptions::probe_timeout`] (1.5 s) and
    /// sent calls again once it answers. Replicas must share one store (Redis, not the
    /// in-memory store) and accept the same token.
    ///
    /// Connects lazily, like [`Client::connect`]; each replica gets a connection for calls
    /// and one for its health checks. The first health checks run before this returns (all at
    /// once, up to [`ClientOptions::probe_timeout`]), so a replica down from the start gets
    /// no calls.
    ///
    /// ```no_run
    /// use cache_money::{Client, Ttl};
    ///
    /// # async fn example() -> Result<(), cache_money::Error> {
    /// let cm = Client::connect_many(["http://10.0.0.7:50051", "http://10.0.0.8:50051"]).await?;
    /// let add = cm.function("__main__", "addition", Ttl::HOUR);
    /// let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await?; // any replica
    /// add.bust(&(3, 4)).await?; // reaches the shared store whichever replica takes it
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for an empty list, a URL [`Client::connect`] refuses, a URL
    /// listed twice, or `http://` and `https://` mixed in one list.
    pub async fn connect_many<I>(urls: I) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::connect_many_with(urls, ClientOptions::default()).await
    }

    /// As [`Client::connect_many`], with options: those of [`Client::connect_with`], the
    /// health checks' [`ClientOptions::probe_interval`] and [`ClientOptions::probe_timeout`],
    /// and [`ClientOptions::resolve_interval`] to balance over every address a name resolves
    /// to, looked up again every interval.
    ///
    /// # Errors
    /// As [`Client::connect_many`], and [`Error::InvalidToken`] and [`Error::InvalidOption`]
    /// as for [`Client::connect_with`].
    pub async fn connect_many_with<I>(urls: I, options: ClientOptions) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        check_connection_options(&options)?;
        let urls = urls.into_iter().map(Into::into).collect();
        let channel = crate::replicas::channel(urls, &options).await?;
        Self::from_channel_with(channel, options)
    }

    /// A client over a channel you configured yourself (a proxy, a custom resolver or load
    /// balancing), with default options.
    pub fn from_channel(channel: Channel) -> Self {
        Self::build(Transport::channel(channel, None), ClientOptions::default())
            .expect("the default options are valid")
    }

    /// As [`Client::from_channel`], with options. The connection settings among them
    /// (timeouts, keepalive, TLS) are the channel's own and are not applied here.
    ///
    /// # Errors
    /// [`Error::InvalidToken`] when the token cannot travel in metadata,
    /// [`Error::InvalidOption`] for a near-cache setting out of range.
    pub fn from_channel_with(channel: Channel, options: ClientOptions) -> Result<Self, Error> {
        let transport = Transport::channel(channel, authorization(&options)?);
        Self::build(transport, options)
    }

    fn build(transport: Transport, options: ClientOptions) -> Result<Self, Error> {
        crate::near::check_options(options.near_cache_silence, &options.near_cache_namespaces)?;
        let rpc = CacheMoneyClient::new(transport.clone())
            .max_decoding_message_size(options.max_receive_bytes);
        let near = (options.enabled && options.near_cache_bytes > 0).then(|| {
            let near = Arc::new(Near::new(
                options.near_cache_bytes,
                options.near_cache_silence,
                &options.near_cache_namespaces,
                options.near_refused_backoff,
                rpc.clone(),
            ));
            near.start();
            near
        });
        Ok(Client {
            inner: Arc::new(Inner {
                rpc,
                transport,
                near,
                breaker: Breaker::new(options.breaker_threshold, options.breaker_cooldown),
                options,
                counters: Counters::default(),
                flights: Flights::default(),
            }),
        })
    }

    /// A handle for one function's cache entries, kept for `ttl`.
    ///
    /// `namespace` is the caller's module: `__main__`, `billing.invoices`, or a Rust
    /// `module_path!()` (`a::b` is written `a.b`, `a::r#type` `a.type`). See [`function!`](crate::function) for a
    /// shorthand.
    ///
    /// # Panics
    /// When a name breaks the naming rule (1–128 bytes of `[A-Za-z0-9_.-]`) or `ttl` is
    /// under one second or over [`ClientOptions::max_ttl`] (30 days unless set): names and
    /// TTLs are almost always literals, so this is a programming error, like an invalid regex
    /// literal. Use [`Client::try_function`] for names made at run time.
    pub fn function(&self, namespace: &str, name: &str, ttl: Duration) -> Function {
        self.try_function(namespace, name, ttl)
            .unwrap_or_else(|err| panic!("cache-money function handle: {err}"))
    }

    /// As [`Client::function`], with the client's default TTL ([`ClientOptions::default_ttl`],
    /// one hour unless set).
    ///
    /// # Panics
    /// As [`Client::function`].
    pub fn function_with_default_ttl(&self, namespace: &str, name: &str) -> Function {
        self.function(namespace, name, self.inner.options.default_ttl)
    }

    /// As [`Client::function`], returning an error instead of panicking.
    ///
    /// # Errors
    /// [`Error::InvalidName`], or [`Error::InvalidTtl`] when `ttl` is under one second or
    /// over [`ClientOptions::max_ttl`].
    pub fn try_function(
        &self,
        namespace: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<Function, Error> {
        let namespace = namespace_of(namespace);
        check_name("namespace", &namespace)?;
        check_name("function", name)?;
        let max_ttl = self.inner.options.max_ttl;
        // Stores send whole seconds, so that is what the service's maximum is checked against.
        if ttl < Duration::from_secs(1) || ttl.as_secs() > max_ttl.as_secs() {
            return Err(Error::InvalidTtl(format!(
                "must be between 1 second and {} seconds (ClientOptions::max_ttl, the \
                 service's --max-ttl-seconds), got {ttl:?}",
                max_ttl.as_secs()
            )));
        }
        Ok(Function::new(self.clone(), namespace, name.to_owned(), ttl))
    }

    /// Removes every entry of one namespace (every function of a module).
    ///
    /// # Errors
    /// [`Error::InvalidName`], or the service's failure: a bust that did not happen is
    /// reported, never swallowed.
    pub async fn bust_namespace(&self, namespace: &str) -> Result<u64, Error> {
        let namespace = namespace_of(namespace);
        check_name("namespace", &namespace)?;
        let scope = Scope::Namespace(namespace.clone());
        let request = pb::BustNamespaceRequest { namespace };
        self.bust_rpc(
            scope,
            |mut rpc| async move { rpc.bust_namespace(request).await },
        )
        .await
    }

    /// Removes every entry of `namespace` written with `tag` (see [`Function::tagged`] and
    /// `#[memoize(tags = …)]`), whatever function wrote it; returns how many there were.
    /// Tags are compared byte for byte.
    ///
    /// # Errors
    /// [`Error::InvalidName`], or the service's failure (a bad tag is its
    /// `INVALID_ARGUMENT`): a bust that did not happen is reported.
    pub async fn bust_tag(&self, namespace: &str, tag: &str) -> Result<u64, Error> {
        let namespace = namespace.replace("::", ".");
        check_name("namespace", &namespace)?;
        // The near cache does not know which copies carried the tag: the namespace goes.
        let scope = Scope::Namespace(namespace.clone());
        let request = pb::BustTagRequest {
            namespace,
            tag: tag.to_owned(),
        };
        self.bust_rpc(scope, |mut rpc| async move { rpc.bust_tag(request).await })
            .await
    }

    /// Removes every entry cache-money stored (the seed's global `bust()`).
    ///
    /// # Errors
    /// The service's failure.
    pub async fn bust_all(&self) -> Result<u64, Error> {
        self.bust_rpc(Scope::All, |mut rpc| async move {
            rpc.bust_all(pb::BustAllRequest {}).await
        })
        .await
    }

    /// A snapshot of what this client (and its clones) has done.
    pub fn metrics(&self) -> ClientMetrics {
        let counters = &self.inner.counters;
        let near = self
            .inner
            .near
            .as_ref()
            .map(|near| near.metrics())
            .unwrap_or_default();
        ClientMetrics {
            rpc_attempts: counters.rpc_attempts.load(Relaxed),
            rpc_failures: counters.rpc_failures.load(Relaxed),
            refused: counters.refused.load(Relaxed),
            skipped: counters.skipped.load(Relaxed),
            hits: counters.hits.load(Relaxed),
            computed: counters.computed.load(Relaxed),
            undecodable: counters.undecodable.load(Relaxed),
            leases_won: counters.leases_won.load(Relaxed),
            lease_waits: counters.lease_waits.load(Relaxed),
            lease_wait_timeouts: counters.lease_wait_timeouts.load(Relaxed),
            refused_writes: counters.refused_writes.load(Relaxed),
            stale_served: counters.stale_served.load(Relaxed),
            refreshes: counters.refreshes.load(Relaxed),
            breaker_open: self.inner.breaker.is_open(),
            polled_gets: self.inner.transport.polled_gets(),
            near_hits: near.hits,
            near_misses: near.misses,
            near_evictions: near.evictions,
            near_invalidations: near.invalidations,
            near_resets: near.resets,
            near_flushes: near.flushes,
            near_insert_refused: near.insert_refused,
            near_stream_healthy: near.stream_healthy,
            near_disabled: near.disabled,
        }
    }

    /// The raw generated stub, for RPCs the helpers do not cover.
    pub fn raw(&self) -> RawClient {
        self.inner.rpc.clone()
    }

    pub(crate) fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Runs a bust RPC of `scope` within the bust deadline. Busts bypass the breaker: they are
    /// rare and their outcome matters. The near cache's copies of `scope` are dropped before
    /// the request is sent and again before it returns, whatever the outcome (a bust that
    /// failed, or whose caller stopped waiting, may still have happened).
    pub(crate) async fn bust_rpc<F, Fut>(&self, scope: Scope, call: F) -> Result<u64, Error>
    where
        F: FnOnce(RawClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::BustResponse>, Status>>,
    {
        if !self.inner.options.enabled {
            return Ok(0);
        }
        let deadline = self.inner.options.bust_deadline;
        // Before sending as well as after: a caller that drops this future once the request
        // is sent (the bust may happen) still has its copies dropped; after, so a lookup
        // that read the old value while the bust was in flight is not copied.
        self.own_change(&scope);
        let outcome = tokio::time::timeout(deadline, call(self.inner.rpc.clone())).await;
        self.own_change(&scope);
        match outcome {
            Ok(Ok(reply)) => Ok(reply.into_inner().removed),
            Ok(Err(status)) => Err(Error::Rpc(status)),
            Err(_) => Err(Error::Timeout(deadline)),
        }
    }

    /// Runs a lookup or store for `memoize`: skipped while the breaker is open, bounded by the
    /// deadline, and counted. `None` means the cache could not help this time.
    ///
    /// A request the service refuses as invalid (a value over its `--max-value-bytes`, a TTL
    /// over its `--max-ttl-seconds`) says nothing about its health, so it does not count
    /// towards the breaker; it is logged at warn once per `warned` flag (one per handle), since
    /// it means that function's results are computed but never cached.
    pub(crate) async fn cache_rpc<T, F, Fut>(
        &self,
        what: &'static str,
        warned: &AtomicBool,
        call: F,
    ) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let counters = &self.inner.counters;
        if !self.inner.breaker.allow() {
            counters.skipped.fetch_add(1, Relaxed);
            return None;
        }
        counters.rpc_attempts.fetch_add(1, Relaxed);
        let deadline = self.inner.options.deadline;
        let status = match tokio::time::timeout(deadline, call()).await {
            Ok(Ok(reply)) => {
                if self.inner.breaker.success() == Transition::Closed {
                    info!(rpc = what, "cache-money answers again: caching is back on");
                }
                return Some(reply.into_inner());
            }
            Ok(Err(status)) => status,
            Err(_) => {
                Status::deadline_exceeded(format!("no answer within {} ms", deadline.as_millis()))
            }
        };
        if matches!(status.code(), Code::InvalidArgument | Code::OutOfRange) {
            counters.refused.fetch_add(1, Relaxed);
            if !warned.swap(true, Relaxed) {
                warn!(rpc = what, cause = %describe(&status), "cache-money refused this function's request: its results are computed but not cached (logged once per handle)");
            }
            return None;
        } else {
            counters.rpc_failures.fetch_add(1, Relaxed);
            if self.inner.breaker.failure() == Transition::Opened {
                // Once per outage, not per call: the breaker opens once until it closes.
                warn!(rpc = what, cause = %describe(&status), "cache-money calls are failing: caching is off, memoize computes every call until a call succeeds again");
                return None;
            }
        }
        debug!(rpc = what, cause = %describe(&status), "cache unavailable; computing instead");
        None
    }

    pub(crate) fn count_hit(&self) {
        self.inner.counters.hits.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_computed(&self) {
        self.inner.counters.computed.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_undecodable(&self) {
        self.inner.counters.undecodable.fetch_add(1, Relaxed);
    }

    pub(crate) fn count(&self, event: Event) {
        let counters = &self.inner.counters;
        let counter = match event {
            Event::LeaseWon => &counters.leases_won,
            Event::LeaseWaited => &counters.lease_waits,
            Event::LeaseWaitTimedOut => &counters.lease_wait_timeouts,
            Event::RefusedWrite => &counters.refused_writes,
            Event::StaleServed => &counters.stale_served,
            Event::Refreshed => &counters.refreshes,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Gives up lease `token` of `key` (its computation failed), fail-open: bounded by the
    /// deadline, and a failure only costs the other callers the lease's remaining life.
    pub(crate) async fn release_lease(&self, key: pb::Key, token: u64) {
        let request = pb::ReleaseRequest {
            key: Some(key),
            lease_token: token,
        };
        // Release is refused only for a bad key or token, which memoize never sends: one
        // flag per process is enough to keep such a warning to one.
        static WARNED: AtomicBool = AtomicBool::new(false);
        let mut rpc = self.raw();
        self.cache_rpc(
            "Release",
            &WARNED,
            || async move { rpc.release(request).await },
        )
        .await;
    }

    /// A raw `Get`: what `self.raw().get(request)` answers, status for status, in about
    /// 15 % fewer of the client's instructions when the client has a direct connection (one
    /// `http://` URL, [`Client::connect`]): the request is framed and the response read
    /// without the generated stub's generic path (BENCHMARKS.md, "Get without tonic's unary
    /// path"). `memoize` looks up through it. Like any raw call it has no deadline, breaker or
    /// near cache: set a deadline around it.
    ///
    /// # Errors
    /// The service's status, or the connection's (`UNAVAILABLE` when it is lost), as the
    /// stub's `get` returns them.
    pub async fn raw_get(
        &self,
        request: pb::GetRequest,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        let max_receive = self.inner.options.max_receive_bytes;
        self.inner.transport.get(request, max_receive).await
    }

    /// Whether `other` is this client or a clone of it (one connection, one breaker).
    pub(crate) fn same(&self, other: &Client) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The near cache, when one is configured.
    pub(crate) fn near(&self) -> Option<&Arc<Near>> {
        self.inner.near.as_ref()
    }

    /// This client's own bust or overwrite of `scope`: the near cache's copies go at once.
    pub(crate) fn own_change(&self, scope: &Scope) {
        if let Some(near) = &self.inner.near {
            near.own_change(scope);
        }
    }

    /// The in-process single-flight table shared by every clone.
    pub(crate) fn flights(&self) -> &Flights {
        &self.inner.flights
    }
}

/// A namespace as the service takes it, from a Rust module path (`module_path!()`) or a
/// dotted name: `::` is written `.`, and a raw identifier's `r#` is dropped (`m::r#type` is
/// `m.type`), since `#` breaks the naming rule.
fn namespace_of(path: &str) -> String {
    path.split("::")
        .map(|segment| segment.strip_prefix("r#").unwrap_or(segment))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Module paths become dotted namespaces, raw identifiers without their `r#`.
    #[test]
    fn module_paths_become_namespaces() {
        assert_eq!(namespace_of("app::billing"), "app.billing");
        assert_eq!(namespace_of("m::r#type"), "m.type");
        assert_eq!(namespace_of("r#async::r#fn"), "async.fn");
        assert_eq!(namespace_of("__main__"), "__main__");
        assert!(check_name("namespace", &namespace_of("m::r#type")).is_ok());
    }
}
