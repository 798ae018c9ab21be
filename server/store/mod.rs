//! Where entries live: one [`Store`] trait, implemented by Redis (the product), a Redis
//! Cluster (the scale-out engine) and an in-memory map (the embedded default). All obey the
//! same TTL, bust and limit rules, and the same behaviour suite in `tests/` runs against each.

pub mod lease;
mod memory;
pub mod redis;

use std::{fmt, future::Future, time::Duration};

use bytes::Bytes;

use crate::key::{EntryKey, FunctionKey};
use crate::server::key::{EntryParts, KeyLayout, LayoutKey};
use crate::server::watch::{Invalidation, Published};

pub use self::lease::{Acquired, Found, LeaseAsk, Meta, Seen};
pub use self::memory::{MEMORY_COMMANDS, MemoryStore};
pub use self::redis::{RedisStore, cluster::ClusterStore};

/// Which entries a bust removes.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One call of one function.
    Entry(&'a EntryKey),
    /// Every call of one function.
    Function(&'a FunctionKey),
    /// Every function of one namespace (a validated name).
    Namespace(&'a str),
    /// Everything the server stored.
    All,
}

impl Scope<'_> {
    /// The scope's name, for metrics: `entry`, `function`, `namespace` or `all`.
    pub fn name(&self) -> &'static str {
        match self {
            Scope::Entry(_) => "entry",
            Scope::Function(_) => "function",
            Scope::Namespace(_) => "namespace",
            Scope::All => "all",
        }
    }

    /// Whether the entry with these parts is in this scope.
    pub fn contains(&self, entry: &EntryParts<'_>) -> bool {
        match *self {
            Scope::Entry(key) => {
                (key.namespace(), key.function(), key.digest())
                    == (entry.namespace, entry.function, entry.digest)
            }
            Scope::Function(function) => {
                (function.namespace(), function.function()) == (entry.namespace, entry.function)
            }
            Scope::Namespace(namespace) => namespace == entry.namespace,
            Scope::All => true,
        }
    }

    /// Where a Redis store finds this scope's entries under `layout`: one entry's key, or the
    /// SCAN pattern of a function, a namespace or everything.
    pub fn redis_target(&self, layout: &KeyLayout) -> RedisTarget {
        match *self {
            Scope::Entry(key) => RedisTarget::Key(layout.entry(key)),
            Scope::Function(function) => RedisTarget::Pattern(layout.function_pattern(function)),
            Scope::Namespace(namespace) => {
                RedisTarget::Pattern(layout.namespace_pattern(namespace))
            }
            Scope::All => RedisTarget::Pattern(layout.all_pattern()),
        }
    }

    /// Whether a key SCAN found is an entry in this scope: a SCAN pattern is only a coarse
    /// filter (its `*` matches `:` too), so nothing is removed or listed unless it has the
    /// exact shape of an entry under `layout` and belongs to the scope (a tag index never
    /// does: `Keys` lists entries only; see [`Scope::removes`] for what a bust removes).
    pub fn holds(&self, layout: &KeyLayout, key: &[u8]) -> bool {
        layout.parse(key).is_some_and(|entry| self.contains(&entry))
    }

    /// Whether a bust of this scope removes `key`: the entries it [contains], and the tag
    /// indexes of a namespace or of everything (an entry or function bust leaves indexes to
    /// expire with their other entries).
    ///
    /// [contains]: Scope::contains
    pub fn removes(&self, key: &LayoutKey<'_>) -> bool {
        match (key, *self) {
            (LayoutKey::Entry(entry), _) => self.contains(entry),
            (LayoutKey::TagIndex(index), Scope::Namespace(namespace)) => {
                index.namespace == namespace
            }
            (LayoutKey::TagIndex(_), Scope::All) => true,
            (LayoutKey::TagIndex(_), Scope::Entry(_) | Scope::Function(_)) => false,
        }
    }
}

/// Where a bust finds its entries in Redis (see [`Scope::redis_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// The one key of one entry, removed by name.
    Key(String),
    /// A SCAN pattern, a coarse filter every key it finds is checked against.
    Pattern(String),
}

/// One entry as `Keys` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The entry's digest.
    pub digest: String,
    /// Time until it expires.
    pub ttl: Duration,
}

/// One page of a function's entries.
#[derive(Debug, Clone, Default)]
pub struct KeysPage {
    /// The entries on this page.
    pub entries: Vec<KeyInfo>,
    /// Where the next page starts; empty when the listing is complete.
    pub next_cursor: String,
}

/// What a store reports about itself when metrics are scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreState {
    /// Store operations holding one of the `--max-in-flight` permits right now.
    pub in_flight: u64,
    /// The Redis connection pool; `None` for a store without one.
    pub pool: Option<PoolState>,
    /// The in-memory store's contents; `None` for Redis, whose own metrics tell.
    pub memory: Option<MemoryState>,
}

/// The Redis connection pool, from bb8's own accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Connections open (idle or lent out).
    pub connections: u32,
    /// Connections open and idle.
    pub idle: u32,
    /// Connections opened since start.
    pub created: u64,
    /// Connections retired since start because a command on them failed or timed out.
    pub broken: u64,
}

/// How full the in-memory store is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryState {
    /// Entries held, expired ones not yet swept included.
    pub entries: u64,
    /// Bytes charged against `--memory-max-bytes`.
    pub bytes: u64,
}

/// One entry to write.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Where it goes.
    pub key: EntryKey,
    /// The encoded value.
    pub value: Bytes,
    /// Time to live; the service has checked it against the configured maximum.
    pub ttl: Duration,
    /// Tags to bust it by, validated and without repeats; usually none.
    pub tags: Vec<String>,
    /// How long past its TTL it is kept as a stale copy (stale-if-error); usually none.
    pub stale: Duration,
    /// How long computing it took, in ms, as its writer said; 0 when not said.
    pub compute_ms: u32,
}

impl NewEntry {
    /// An entry with no stale window, compute time or tags.
    pub fn new(key: EntryKey, value: Bytes, ttl: Duration) -> Self {
        NewEntry {
            key,
            value,
            ttl,
            tags: Vec::new(),
            stale: Duration::ZERO,
            compute_ms: 0,
        }
    }

    /// How long the store keeps it: its TTL and its stale window.
    pub fn kept_for(&self) -> Duration {
        self.ttl + self.stale
    }
}

/// Why a store operation failed.
#[derive(Debug)]
pub enum StoreError {
    /// The store did not answer within the configured time.
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// The store could not be reached, or dropped the connection.
    Unavailable(String),
    /// As many store operations as allowed are already in flight (Redis is slow); the request
    /// was refused at once rather than queued.
    Overloaded {
        /// The limit (`--max-in-flight`).
        limit: usize,
    },
    /// The store is out of memory and refuses writes.
    OutOfMemory(String),
    /// A `Keys` cursor that this store never handed out.
    InvalidCursor(String),
    /// A `Keys` cursor handed out before the Redis Cluster's topology changed (a failover or
    /// resharding): the listing must start again from an empty cursor.
    StaleCursor(String),
    /// The store answered something unexpected.
    Internal(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout { op, after } => {
                write!(
                    f,
                    "store did not answer {op} within {} ms",
                    after.as_millis()
                )
            }
            StoreError::Unavailable(cause) => write!(f, "store unreachable: {cause}"),
            StoreError::Overloaded { limit } => write!(
                f,
                "{limit} store operations already in flight (--max-in-flight); the store is slow, retry later"
            ),
            StoreError::OutOfMemory(cause) => write!(f, "store out of memory: {cause}"),
            StoreError::InvalidCursor(cursor) => {
                write!(f, "cursor: not one this server handed out, got {cursor:?}")
            }
            StoreError::StaleCursor(why) => write!(
                f,
                "cursor: {why}; start the listing again from an empty cursor"
            ),
            StoreError::Internal(cause) => write!(f, "store answered unexpectedly: {cause}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A place to keep entries. Cloning is shallow: clones share the same entries.
///
/// Every write carries a TTL; every operation is bounded in time and fails with a
/// [`StoreError`] rather than hanging.
pub trait Store: Clone + fmt::Debug + Send + Sync + 'static {
    /// `"redis"`, `"redis-cluster"` or `"memory"`, for stats and logs.
    fn kind(&self) -> &'static str;

    /// Whether the store busy-polls for its replies (`--redis-busy-poll-us`, in effect only on
    /// a current-thread runtime), for the start-up line.
    fn busy_polls(&self) -> bool {
        false
    }

    /// Reads one entry; `None` when absent, expired, past its TTL (a stale copy) or only
    /// leased.
    fn get(
        &self,
        key: &EntryKey,
    ) -> impl Future<Output = Result<Option<Bytes>, StoreError>> + Send {
        async move { Ok(self.lookup(key, false).await?.live()) }
    }

    /// Reads one entry with what leases need: live, stale, or absent. A live value's time
    /// left is read when `left` asks for it (Redis then sends `PTTL` with the `GET`); a value
    /// with a stale window has its `PTTL` read either way, to tell whether it is live.
    fn lookup(
        &self,
        key: &EntryKey,
        left: bool,
    ) -> impl Future<Output = Result<Found, StoreError>> + Send;

    /// Decides `key`'s lease for `ask` in one atomic step (see [`lease`]). `tags`, those the
    /// result will be written with, are indexed first (only raising an index member's expiry),
    /// so a BustTag of any of them before the write removes the key and voids the lease.
    fn acquire(
        &self,
        key: &EntryKey,
        ask: LeaseAsk,
        tags: &[String],
    ) -> impl Future<Output = Result<Acquired, StoreError>> + Send;

    /// Writes `entry` only while its key holds the lease `token`; returns whether it did.
    /// Tag indexes are written first either way (a refused write leaves a member naming the
    /// key, harmless: a bust of that tag then removes whatever the key holds).
    fn put_leased(
        &self,
        entry: &NewEntry,
        token: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives up the lease `token` on `key`: a placeholder goes, a value stays. Returns whether
    /// the key held the token.
    fn release(
        &self,
        key: &EntryKey,
        token: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Reads many entries in one round trip, results in key order.
    fn get_many(
        &self,
        keys: &[EntryKey],
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, StoreError>> + Send;

    /// The total size in bytes of the values present under `keys` (absent ones count 0),
    /// found without reading the values, so a batch too large to answer is refused before it
    /// is loaded into memory.
    fn value_bytes(
        &self,
        keys: &[EntryKey],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Writes one entry, replacing any earlier value and TTL.
    fn put(&self, entry: &NewEntry) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes many entries in one round trip.
    fn put_many(&self, entries: &[NewEntry])
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the entries in `scope` with their leases and stale copies, returning how many
    /// keys there were (a lease placeholder or a stale copy counts as one).
    fn bust(&self, scope: Scope<'_>) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Removes every live entry of `namespace` (a validated name) written with `tag`,
    /// whatever its function, returning how many there were. An entry whose tag index was
    /// written before the bust read it is removed; one written after survives.
    fn bust_tag(
        &self,
        namespace: &str,
        tag: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Lists up to about `limit` entries of one function from `cursor` (empty: the start).
    fn keys(
        &self,
        function: &FunctionKey,
        cursor: &str,
        limit: usize,
    ) -> impl Future<Output = Result<KeysPage, StoreError>> + Send;

    /// Checks that the store answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Appends `invalidations`, in order, to the invalidation sequence every server over this
    /// store shares (see [`watch`](crate::server::watch)); the position of the last. Only
    /// once this returns may the RPC that caused them answer.
    fn publish(
        &self,
        invalidations: &[Invalidation],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// [`Store::put`] of `entry`, then [`Store::publish`] of its overwrite: a store may send
    /// both in one round trip. `Err`: the write failed (its invalidation may or may not have
    /// been published); `Ok(Err)`: written but not published; `Ok(Ok)`: the position.
    fn put_then_publish(
        &self,
        entry: &NewEntry,
    ) -> impl Future<Output = Result<Result<u64, StoreError>, StoreError>> + Send {
        async move {
            self.put(entry).await?;
            Ok(self.publish(&[Invalidation::put(&entry.key)]).await)
        }
    }

    /// [`Store::bust`] of `scope`, then [`Store::publish`] of its invalidation, as
    /// [`Store::put_then_publish`] does: the entries removed, and the position or why it was
    /// not published.
    fn bust_then_publish(
        &self,
        scope: Scope<'_>,
    ) -> impl Future<Output = Result<(u64, Result<u64, StoreError>), StoreError>> + Send {
        async move {
            let removed = self.bust(scope).await?;
            Ok((removed, self.publish(&[Invalidation::bust(scope)]).await))
        }
    }

    /// Up to `count` invalidations after position `after`, oldest first; when there is none
    /// yet and `block` is given, waits that long for one (on a connection of its own, for the
    /// one reader per process). The first is not `after + 1` when the ones between were
    /// trimmed.
    fn read_invalidations(
        &self,
        after: u64,
        count: usize,
        block: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<Published>, StoreError>> + Send;

    /// The last position of the invalidation sequence (0 when it is empty or absent).
    fn invalidation_tail(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// [`Store::invalidation_tail`] for the process's one reader: on its own connection and
    /// outside the in-flight limit, so background reads never take a request's permit.
    fn reader_tail(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.invalidation_tail()
    }

    /// The random nonce the entry at `position` was written with, read by the process's one
    /// reader on its own connection: a different one than the reader read means the sequence
    /// was replaced under the same numbering (deleted and re-created, or a promoted replica
    /// missing the last entries). `Some("")` when there is no such entry; `None` when the
    /// store cannot be replaced behind the server's back (the in-memory ring).
    fn reader_nonce(
        &self,
        position: u64,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        let _ = position;
        async { Ok(None) }
    }

    /// Its connections and load right now, for `/metrics`; never waits on the store.
    fn state(&self) -> StoreState;
}
