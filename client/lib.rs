//! cache-money: memoization as a service.
//!
//! A gRPC service (`cache_money.v1.CacheMoney`) keeps memoized results in Redis, or in memory
//! when no Redis is configured, so every service in a fleet shares one cache, one key scheme
//! and one place to administer it. This crate is both the server (feature `server`, on by
//! default) and the client library (always).
//!
//! # Layout
//! - [`pb`]: the generated protobuf types and gRPC stubs, for raw RPCs.
//! - [`canonical`]: the canonical key of a call's arguments (RFC 8785 JSON, md5).
//! - [`key`]: the address of a cache entry (namespace, function, digest) and its validation,
//!   shared by client and server so both enforce the same rules.
//! - `server` (feature `server`): configuration, the gRPC service, the Redis and in-memory
//!   stores, health and graceful shutdown.

pub mod canonical;
pub mod key;

/// The generated protobuf messages and gRPC client and server stubs of `cache_money.v1`.
pub mod pb {
    #![allow(missing_docs)]
    tonic::include_proto!("cache_money.v1");

    /// The encoded `FileDescriptorSet` of the contract, served by server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cache_money_descriptor.bin"));
}

#[cfg(feature = "server")]
#[path = "../server/mod.rs"]
pub mod server;
