//! The cache-money server: [`run`] serves `cache_money.v1.CacheMoney`, gRPC health and server
//! reflection on a listener until a shutdown future completes.
//!
//! # Layout
//! - [`config`]: flags, environment variables and their `DEFAULT_*` constants.
//! - [`service`]: the gRPC service: validation, store calls, status mapping, stats.
//! - [`store`]: the [`Store`] trait and its Redis, Redis Cluster and in-memory
//!   implementations; tag indexes in Redis (`store::redis::tags`).
//! - [`key`]: the Redis key layout (entries and tag indexes) and the exact SCAN patterns of
//!   each bust scope.
//! - [`auth`]: bearer tokens and per-namespace grants.
//! - [`observe`]: each RPC's span, request id and RPC metrics, around the cache service.
//! - [`metrics`]: the Prometheus registry, the handle everything records through, and the
//!   `/metrics` listener.
//! - [`shutdown`]: SIGTERM / Ctrl-C handling.
//! - [`watch`]: the invalidation sequence behind `Watch`: its events, its one reader per
//!   process, and each watcher's stream.

pub mod auth;
pub mod config;
mod direct_get;
pub mod key;
pub mod metrics;
pub mod observe;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod watch;

use std::{
    fmt,
    future::{Future, pending},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use self::auth::Auth;
use self::config::{Config, LogFormat, redacted_seeds, redacted_url};
use self::direct_get::DirectGet;
use self::metrics::Metrics;
use self::observe::Observed;
use self::service::{CacheService, Limits};
use self::store::{ClusterStore, MemoryStore, RedisStore, Store, StoreError, redis::RedisSettings};
use self::watch::{Hub, WatchSettings};
use crate::pb::{self, cache_money_server::CacheMoneyServer};

/// The gRPC name of the cache service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "cache_money.v1.CacheMoney";

/// Why the server could not start or stopped with an error.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration is inconsistent.
    Config(String),
    /// The store could not be set up.
    Store(StoreError),
    /// The listener failed.
    Io(std::io::Error),
    /// The metrics listener could not bind its address.
    MetricsListen(SocketAddr, std::io::Error),
    /// Reflection could not load the descriptors (a build problem).
    Reflection(String),
    /// The gRPC transport failed.
    Transport(tonic::transport::Error),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeError::Config(message) => write!(f, "configuration: {message}"),
            ServeError::Store(err) => write!(f, "store: {err}"),
            ServeError::Io(err) => write!(f, "listener: {err}"),
            ServeError::MetricsListen(addr, err) => {
                write!(f, "cannot listen on {addr} (--metrics-listen): {err}")
            }
            ServeError::Reflection(message) => write!(f, "reflection: {message}"),
            ServeError::Transport(err) => write!(f, "transport: {err}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::Store(err) => Some(err),
            ServeError::Io(err) | ServeError::MetricsListen(_, err) => Some(err),
            ServeError::Transport(err) => Some(err),
            ServeError::Config(_) | ServeError::Reflection(_) => None,
        }
    }
}

/// Sets up `tracing` logs on standard error, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Serves on `listener` with the store `config` names, until `shutdown` completes; then stops
/// accepting connections, lets in-flight RPCs finish for up to the drain timeout, and returns.
///
/// # Errors
/// When the configuration is inconsistent, a Redis URL is malformed or the transport fails.
/// An unreachable Redis is not an error: the server serves, reporting NOT_SERVING.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    // Read before anything starts, so a bad token file stops start-up.
    let auth = config.load_auth().map_err(ServeError::Config)?;
    let tls = config.load_tls().map_err(ServeError::Config)?;
    let telemetry = Telemetry::bind(&config).await?;
    let metrics = telemetry.metrics.clone();
    let security = Security { auth, tls };
    let redis = |url: &String| -> Result<RedisSettings, ServeError> {
        Ok(RedisSettings {
            url: url.clone(),
            key_prefix: config.key_prefix.clone(),
            pool_size: config.pool_size,
            max_in_flight: config.max_in_flight,
            timeout: config.store_timeout(),
            connect_timeout: config.connect_timeout(),
            bust_batch: config.bust_batch,
            watch_stream_len: config.watch_stream_len,
            watch_block: config.watch_heartbeat(),
            busy_poll: match busy_polling(&config) {
                true => config.redis_busy_poll(),
                false => std::time::Duration::ZERO,
            },
            tls_ca: match &config.redis_tls_ca {
                None => None,
                Some(path) => Some(std::fs::read(path).map_err(|err| {
                    ServeError::Config(format!(
                        "--redis-tls-ca: cannot read {}: {err}",
                        path.display()
                    ))
                })?),
            },
        })
    };
    match (&config.redis_url, &config.redis_cluster) {
        (Some(url), _) => {
            let store = RedisStore::new(&redis(url)?)
                .map_err(ServeError::Store)?
                .with_metrics(metrics);
            serve(store, config, security, telemetry, listener, shutdown).await
        }
        (None, Some(seeds)) => {
            let store = ClusterStore::new(&redis(seeds)?)
                .map_err(ServeError::Config)?
                .with_metrics(metrics);
            serve(store, config, security, telemetry, listener, shutdown).await
        }
        (None, None) => {
            let store = MemoryStore::new(config.memory_max_bytes)
                .with_watch_len(config.watch_stream_len)
                .with_metrics(metrics);
            serve(store, config, security, telemetry, listener, shutdown).await
        }
    }
}

/// Whether a Redis store polls for its replies (`--redis-busy-poll-us`): only on a
/// current-thread runtime, the server's own with `--worker-threads 1` or whatever runtime a
/// caller of [`run`] made (see the busy_poll module's docs).
fn busy_polling(config: &Config) -> bool {
    config.redis_busy_poll_us > 0 && crate::busy_poll::on_current_thread_runtime()
}

/// Who may call, and over what: the token grants and the listener's TLS, both optional.
struct Security {
    auth: Option<Auth>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// The metrics and their listener: both off without `--metrics-listen`.
struct Telemetry {
    metrics: Metrics,
    listener: Option<TcpListener>,
}

impl Telemetry {
    /// Binds `--metrics-listen` when set, so a taken port stops start-up.
    async fn bind(config: &Config) -> Result<Self, ServeError> {
        let Some(addr) = config.metrics_listen else {
            return Ok(Telemetry {
                metrics: Metrics::disabled(),
                listener: None,
            });
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| ServeError::MetricsListen(addr, err))?;
        Ok(Telemetry {
            metrics: Metrics::new(config.metrics_max_namespaces),
            listener: Some(listener),
        })
    }
}

async fn serve<S: Store>(
    store: S,
    config: Config,
    Security { auth, tls }: Security,
    Telemetry {
        metrics,
        listener: metrics_listener,
    }: Telemetry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::Io)?;
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr().map_err(ServeError::Io)?),
        None => None,
    };
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let store_up = Arc::new(AtomicBool::new(false));
    // The first probe runs before serving, so health is right from the first request.
    let monitor = HealthMonitor {
        store: store.clone(),
        reporter: reporter.clone(),
        store_up: store_up.clone(),
    };
    monitor.probe().await;
    let monitor = tokio::spawn(monitor.watch(config.health_interval()));

    let limits = Limits {
        max_ttl_seconds: config.max_ttl_seconds,
        max_value_bytes: config.max_value_bytes,
        max_batch: config.max_batch,
        max_response_bytes: config.max_response_bytes,
        max_tags: config.max_tags,
        max_tag_bytes: config.max_tag_bytes,
        max_lease: std::time::Duration::from_millis(u64::from(config.lease_max_ms)),
    };
    metrics.watch_store(store.clone(), store_up.clone());
    let settings = WatchSettings {
        heartbeat: config.watch_heartbeat(),
        buffer: config.watch_buffer,
        mode: config.invalidations,
    };
    let hub = if config.invalidations == config::InvalidationMode::Off {
        Hub::new(settings, metrics.clone())
    } else {
        Hub::start(store.clone(), settings, metrics.clone())
    };
    let service = Arc::new(CacheService::new(
        store.clone(),
        limits,
        store_up.clone(),
        auth.is_some(),
        metrics.clone(),
        hub.clone(),
    ));
    let tokens = auth.as_ref().map_or(0, Auth::len);
    let cache = NameTheMessageLimit {
        inner: DirectGet::new(
            CacheMoneyServer::from_arc(service.clone())
                .max_decoding_message_size(config.max_message_bytes),
            service,
            config.max_message_bytes,
        ),
        max_message_bytes: config.max_message_bytes,
    };
    let rpc_metrics = metrics.clone();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|err| ServeError::Reflection(err.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|err| ServeError::Reflection(err.to_string()))?;

    info!(
        listen = %local_addr,
        store = store.kind(),
        redis_url = config.redis_url.as_deref().map(redacted_url).unwrap_or_default(),
        redis_cluster = config.redis_cluster.as_deref().map(redacted_seeds).unwrap_or_default(),
        redis_tls_ca = config.redis_tls_ca.as_deref().map(|path| path.display().to_string()).unwrap_or_default(),
        key_prefix = %config.key_prefix,
        store_up = store_up.load(Relaxed),
        pool_size = config.pool_size,
        max_in_flight = config.max_in_flight,
        store_timeout_ms = config.store_timeout_ms,
        redis_busy_poll_us = config.redis_busy_poll_us,
        redis_busy_polling = store.busy_polls(),
        connect_timeout_ms = config.connect_timeout_ms,
        max_ttl_seconds = config.max_ttl_seconds,
        max_value_bytes = config.max_value_bytes,
        max_batch = config.max_batch,
        max_tags = config.max_tags,
        max_tag_bytes = config.max_tag_bytes,
        lease_max_ms = config.lease_max_ms,
        max_message_bytes = config.max_message_bytes,
        max_response_bytes = config.max_response_bytes,
        bust_batch = config.bust_batch,
        invalidations = config.invalidations.name(),
        watch_stream_len = config.watch_stream_len,
        watch_heartbeat_ms = config.watch_heartbeat_ms,
        watch_buffer = config.watch_buffer,
        memory_max_bytes = config.memory_max_bytes,
        health_interval_ms = config.health_interval_ms,
        drain_timeout_ms = config.drain_timeout_ms,
        worker_threads = config.worker_threads,
        auth_tokens = tokens,
        tls = tls.is_some(),
        tls_client_certificates = config.tls_client_ca.is_some(),
        reflection = config.reflection,
        metrics_listen = metrics_addr.map(|addr| addr.to_string()).unwrap_or_default(),
        metrics_max_namespaces = config.metrics_max_namespaces,
        metrics_timeout_ms = config.metrics_timeout_ms,
        metrics_max_connections = config.metrics_max_connections,
        keepalive_interval_ms = config.keepalive_interval_ms,
        keepalive_timeout_ms = config.keepalive_timeout_ms,
        "cache-money serving"
    );
    let metrics_server = metrics_listener.map(|listener| {
        tokio::spawn(metrics::http::serve(
            listener,
            metrics,
            config.metrics_timeout(),
            config.metrics_max_connections,
        ))
    });

    let (signalled_tx, signalled_rx) = oneshot::channel();
    let stop_reporter = reporter.clone();
    let signal = async move {
        shutdown.await;
        info!(
            drain_timeout_ms = config.drain_timeout_ms,
            "shutting down: refusing new connections, finishing in-flight RPCs"
        );
        // Load balancers stop routing here before the listener closes.
        set_status(&stop_reporter, ServingStatus::NotServing).await;
        // Watch streams never end by themselves: end them now (UNAVAILABLE, "watch again
        // elsewhere"), or the drain would wait its whole timeout for them.
        hub.close();
        let _ = signalled_tx.send(());
    };
    // Keepalive both ways: a client whose host vanished (or whose flow a firewall dropped)
    // would otherwise hold its connection, and any stream on it, open forever.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(config.keepalive_interval()));
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval()))
        .http2_keepalive_timeout(Some(config.keepalive_timeout()));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(ServeError::Transport)?;
    }
    let router = builder
        .add_service(health_service)
        .add_optional_service(config.reflection.then_some(reflection_v1))
        .add_optional_service(config.reflection.then_some(reflection_v1alpha));
    // Only the cache service is behind authentication: health and reflection stay open for
    // probes and operators. Without tokens there is nothing to check, and the interceptor's
    // layer (which rebuilds every request as a tonic::Request and back: ≈ 1.5 % of a Get's
    // instructions, BENCHMARKS.md "Instructions per request") is left out.
    let router = match auth {
        Some(auth) => router.add_service(Observed::new(
            InterceptedService::new(cache, auth.interceptor()),
            rpc_metrics,
        )),
        None => router.add_service(Observed::new(cache, rpc_metrics)),
    };
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    let drain_deadline = async {
        match signalled_rx.await {
            Ok(()) => tokio::time::sleep(config.drain_timeout()).await,
            // The server ended without a signal; it decides the outcome.
            Err(_) => pending().await,
        }
    };
    let result = tokio::select! {
        result = server => result.map_err(ServeError::Transport),
        () = drain_deadline => {
            warn!(drain_timeout_ms = config.drain_timeout_ms, "drain timeout passed with RPCs in flight; stopping anyway");
            Ok(())
        }
    };
    monitor.abort();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    info!("cache-money stopped");
    result
}

/// The cache service, with tonic's answer to a request over `--max-message-bytes` (an
/// OUT_OF_RANGE that names no flag) replaced by one that names the flag and the way out.
#[derive(Debug, Clone)]
struct NameTheMessageLimit<S> {
    inner: S,
    max_message_bytes: usize,
}

/// How tonic's message for a request over the decoding limit starts (tonic 0.14,
/// `codec/decode.rs`); `tests/faults.rs` notices if a tonic upgrade changes it.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

impl<F> Renamed<F> {
    /// `response`, or, when it is tonic's refusal of a request over the limit, one naming the
    /// flag and the way out.
    fn rename<B: Default>(
        max_message_bytes: usize,
        response: http::Response<B>,
    ) -> http::Response<B> {
        // A trailers-only response: the status is in the headers, before any body.
        let Some(status) = tonic::Status::from_header_map(response.headers()) else {
            return response;
        };
        if status.code() != tonic::Code::OutOfRange
            || !status.message().starts_with(TONIC_TOO_LARGE)
        {
            return response;
        }
        tonic::Status::out_of_range(format!(
            "request: larger than --max-message-bytes ({max_message_bytes} bytes); split a batch into smaller ones (a single value may be at most --max-value-bytes) ({})",
            status.message()
        ))
        .into_http()
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for NameTheMessageLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Request, B> tonic::codegen::Service<Request> for NameTheMessageLimit<S>
where
    S: tonic::codegen::Service<Request, Response = http::Response<B>>,
    S::Future: Unpin,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    // Not boxed: the generated service's future is boxed already (so `Unpin`), and a second
    // box per RPC cost more than the check itself.
    type Future = Renamed<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Renamed {
            response: self.inner.call(request),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// The future of a [`NameTheMessageLimit`] call: the inner response, renamed when it is
/// tonic's answer to a request over the limit.
#[derive(Debug)]
struct Renamed<F> {
    response: F,
    max_message_bytes: usize,
}

impl<F, B, E> Future for Renamed<F>
where
    F: Future<Output = Result<http::Response<B>, E>> + Unpin,
    B: Default,
{
    type Output = Result<http::Response<B>, E>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let limit = self.max_message_bytes;
        std::pin::Pin::new(&mut self.response)
            .poll(cx)
            .map_ok(|response| Self::rename(limit, response))
    }
}

async fn set_status(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Probes the store and keeps the health service (and `Stats.store_up`) in step with it.
struct HealthMonitor<S> {
    store: S,
    reporter: HealthReporter,
    store_up: Arc<AtomicBool>,
}

impl<S: Store> HealthMonitor<S> {
    async fn probe(&self) {
        let result = self.store.ping().await;
        let up = result.is_ok();
        let was_up = self.store_up.swap(up, Relaxed);
        match result {
            Ok(()) if !was_up => info!(store = self.store.kind(), "store reachable: SERVING"),
            Err(err) if was_up => {
                warn!(store = self.store.kind(), cause = %err, "store unreachable: NOT_SERVING")
            }
            Err(err) => tracing::debug!(cause = %err, "store still unreachable"),
            Ok(()) => {}
        }
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_status(&self.reporter, status).await;
    }

    async fn watch(self, interval: std::time::Duration) {
        loop {
            tokio::time::sleep(interval).await;
            self.probe().await;
        }
    }
}
