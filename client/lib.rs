//! cache-money: memoization as a service.
//!
//! A gRPC service (`cache_money.v1.CacheMoney`) keeps memoized results in Redis, or in memory
//! when no Redis is configured, so every service in a fleet shares one cache, one key scheme
//! and one place to administer it. This crate is both the server (feature `server`, on by
//! default) and the client library (always).
//!
//! ```no_run
//! use cache_money::{Client, Ttl};
//!
//! # async fn example() -> Result<(), cache_money::Error> {
//! let cm = Client::connect("http://127.0.0.1:50051").await?;
//! let add = cm.function("__main__", "addition", Ttl::HOUR);
//! let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await?; // computed, then cached
//! add.bust(&(3, 4)).await?; // one call
//! add.bust_all().await?; // every call of `addition`
//! cm.bust_all().await?; // everything
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`Client`] (`client`): the connection, options, circuit breaker and metrics.
//! - [`Function`] (`memoize`): one function's entries: `memoize`, `try_memoize`, `refresh`,
//!   busts, versions, tags ([`Client::bust_tag`]), leases, stale-while-revalidate
//!   (`memoize_detached`) and stale-if-error ([`Served`]).
//! - [`install`] (`memoized`): the default client of `#[memoize]` functions, and the runtime
//!   the attribute expands to (hidden, `__private`).
//! - [`memoize`](macro@memoize) (feature `macros`, the `macros/` crate): the attribute.
//! - [`Ttl`] (`ttl`): the seed's TTL constants, and the default maximum TTL both sides use.
//! - `busy_poll`: waiting for a reply by polling rather than sleeping, bounded; the
//!   client's Gets ([`ClientOptions::busy_poll`]) and the server's Redis commands use it.
//! - `breaker`: the circuit breaker that keeps a down service from costing every call.
//! - `near` ([`ClientOptions::near_cache_bytes`]): the near cache, copies of entries in the
//!   process kept coherent by the service's invalidation stream (`Watch`).
//! - `single_flight`: concurrent `memoize` calls of one key in a process share one computation.
//! - `lease` ([`DEFAULT_LEASE`]): one computation per key across the fleet: a handle's lease
//!   settings, the bound on waiting for another caller's lease, giving a lease back.
//! - [`Transport`] (`transport`): how calls reach the service: a direct HTTP/2 connection
//!   (the `h2` crate) to one `http://` URL, or a tonic `Channel` for TLS and replicas.
//! - [`channel`] (`connect`): how a URL and [`ClientOptions`] become a tonic `Channel`
//!   (keepalive, TLS, timeouts), and [`describe_status`], a failed call in words.
//! - `replicas`: several server replicas behind one channel ([`Client::connect_many`]): tonic's
//!   balancer, fed by health checks and DNS lookups so calls go only to replicas that answer.
//! - `codec`: the protobuf codec of both stubs, with buffers sized for cache traffic.
//! - [`Error`] (`error`): the client's error type.
//! - [`pb`]: the generated protobuf types and gRPC stubs, for raw RPCs.
//! - [`canonical`]: the canonical key of a call's arguments (RFC 8785 JSON, md5).
//! - [`key`]: the address of a cache entry (namespace, function, digest) and its validation,
//!   shared by client and server so both enforce the same rules.
//! - [`limits`]: the message size limits client and server share.
//! - `server` (feature `server`): configuration, the gRPC service, the Redis, Redis Cluster and
//!   in-memory stores, health, RPC spans and request ids, Prometheus metrics, and graceful shutdown.
//! - The `cache-money` binary (feature `cli`, in `cli/`): the operators' command line, a
//!   client of the service built on this library.

mod breaker;
mod busy_poll;
pub mod canonical;
mod client;
mod codec;
mod connect;
mod error;
pub mod key;
mod lease;
pub mod limits;
mod memoize;
mod memoized;
mod near;
mod replicas;
mod single_flight;
mod transport;
mod ttl;

pub use client::{
    Client, ClientMetrics, ClientOptions, DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_BUST_DEADLINE, DEFAULT_BUSY_POLL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DEADLINE,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_RECEIVE_BYTES,
    DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT, DEFAULT_TTL, MAX_BUSY_POLL, RawClient,
};
pub use connect::{channel, describe as describe_status};
pub use error::Error;
pub use lease::DEFAULT_LEASE;
pub use memoize::{Function, KeyFn, Served};
pub use memoized::{install, installed};
pub use near::{DEFAULT_NEAR_CACHE_BYTES, DEFAULT_NEAR_CACHE_SILENCE};
pub use transport::Transport;
pub use ttl::{DEFAULT_MAX_TTL_SECONDS, Ttl};

/// A [`Function`] handle named after the calling module: `function!(client, "addition",
/// Ttl::HOUR)` is `client.function(module_path!(), "addition", Ttl::HOUR)`, with the
/// module path's `::` written as `.` (`my_app::billing` becomes `my_app.billing`). Without a
/// TTL the client's default TTL applies.
#[macro_export]
macro_rules! function {
    ($client:expr, $name:expr, $ttl:expr) => {
        $client.function(::std::module_path!(), $name, $ttl)
    };
    ($client:expr, $name:expr) => {
        $client.function_with_default_ttl(::std::module_path!(), $name)
    };
}

/// What `#[memoize]` expands to; not an API.
#[doc(hidden)]
pub mod __private {
    pub use crate::memoized::{MethodSite, Prepared, Site};
}

#[cfg(feature = "macros")]
#[doc = include_str!("memoize_attribute.md")]
pub use cache_money_macros::memoize;

/// The generated protobuf messages and gRPC client and server stubs of `cache_money.v1`.
pub mod pb {
    #![allow(missing_docs)]
    tonic::include_proto!("cache_money.v1");

    /// The encoded `FileDescriptorSet` of the contract, served by server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cache_money_descriptor.bin"));
}

/// Locks `mutex`, taking the guard even when a thread panicked while holding it. Every mutex
/// in this crate guards state that stays valid across a panic (each update is a single
/// assignment, or completes before anything that can panic), and a cache must not stop
/// working because one caller panicked.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(feature = "server")]
#[path = "../server/mod.rs"]
pub mod server;
