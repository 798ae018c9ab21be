//! The invalidation sequence behind `Watch`: what an invalidation is, how it is kept in the
//! store, the one reader per server process that follows it ([`Hub`]), and the stream each
//! watcher gets ([`watch`]).
//!
//! # Where the sequence lives
//! - **Redis and Redis Cluster**: one capped Redis Stream per key prefix,
//!   [`stream_key`] (`{prefix}#invalidations`). One key is one cluster slot, so a whole
//!   PutMany's invalidations go out as one pipeline to one node, and every replica over the
//!   same store and prefix reads the same sequence. Entries are added with `XADD … MAXLEN ~ N
//!   0-*` (`XADD_SCRIPT`): the id's first part is always 0 and Redis numbers the second, so
//!   the id *is* a plain counter with no gaps, starting from the stream's creation time
//!   ([`first_position`]) so that a re-created stream numbers above the old one. That makes
//!   the position a `uint64` any client compares with `<`, and makes losses detectable: a
//!   read after `p` whose first entry is not `p + 1` has lost what `MAXLEN` trimmed, a resume
//!   from before a re-creation finds a jump, and both answer a RESET. The
//!   key's name holds `#`, outside the name charset, and no `:`, so
//!   [`KeyLayout::classify`](crate::server::key::KeyLayout::classify) never takes it for an
//!   entry or a tag index and no bust (nor `SCAN MATCH` of a bust's pattern) touches it.
//! - **In memory**: a [`Ring`] of the same capacity, numbered the same way.
//!
//! Pub/Sub was the alternative: no per-write memory in Redis, but no resume (a watcher that
//! reconnects to another replica cannot know what it missed, so every reconnect would clear
//! every near cache) and no numbering, so no way to order an invalidation against a Get. The
//! stream costs one `XADD` per write or bust, waited for before the RPC answers: on one
//! Redis pipelined behind a Put's `SET` or a one-entry Bust's `UNLINK` (no extra round trip),
//! on a cluster a second round trip to the stream's node. Measured in README "Invalidation
//! stream": about 0.35-0.55 ms more per Put or Bust at p50 in a debug build, Get unchanged;
//! in Redis an `XADD` costs about what a `SET` does. The price on a cluster: the stream's
//! node takes every write's `XADD`, and while it fails over nothing can be published: with
//! `--invalidations best-effort` (the default) writes and busts still succeed and the server
//! owes a bust of everything ([`Hub::owe`]); with `required` they fail; with `off` nothing is
//! ever published (no `XADD`, no reader).
//!
//! An entry the servers did not write (an id other than `0-N`, or the key holding another
//! type) stops publishing and reading until an operator deletes the key: reads and publishes
//! answer UNAVAILABLE naming it, and the reader backs off rather than re-reading it.
//!
//! # One reader per process
//! [`Hub::start`] spawns the only task that reads the sequence (`XREAD BLOCK` on a connection
//! of its own: a blocked read would hold up every command queued behind it on a shared
//! multiplexed connection) and hands what it reads to a bounded [`broadcast`] channel that
//! every watcher of the process receives from. A watcher that falls more than the channel's
//! capacity behind is told so by the channel (`Lagged`) and gets a RESET, never a silent gap.
//! The reader also sends the heartbeats, only while it is healthy ([`Hub::healthy`]: it has
//! read where the sequence ended when it started, and its last read succeeded) and caught up
//! (its last read reached the end): one after such a read once the interval has passed. So
//! heartbeats never start before the reader knows where it stands, and stop when it cannot
//! read or falls behind, which is what a near cache must notice. Until the reader has started,
//! [`Hub::position`] is 0, which Gets answer as "unknown".

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{
            AtomicU64,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::Duration,
};

use tokio::sync::{Notify, broadcast, watch as signal};
use tonic::Status;
use tracing::{info, warn};

use crate::key::EntryKey;
use crate::lock;
use crate::pb;
use crate::server::config::InvalidationMode;
use crate::server::metrics::Metrics;
use crate::server::store::{Scope, Store, StoreError};

/// How many invalidations the reader asks for per read.
const READ_BATCH: usize = 512;
/// How many invalidations a resuming watcher's catch-up reads per page.
const CATCH_UP_PAGE: usize = 256;
/// The longest the reader waits before reading again after the store failed.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(1);

/// The least time between two catch-up busts of everything ([`Hub::owe`]): while publishes
/// keep failing, near caches are emptied at most this often, not back to back.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

/// The Redis key of the invalidation stream under `prefix`.
pub fn stream_key(prefix: &str) -> String {
    format!("{prefix}#invalidations")
}

/// The stream id of `position` (`0-{position}`).
pub fn stream_id(position: u64) -> String {
    format!("0-{position}")
}

/// The position a stream id stands for: its sequence part. `None` for an id that is not one
/// of ours (a first part other than 0).
pub fn position_of(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    (ms == "0").then(|| seq.parse().ok()).flatten()
}

/// Which entries an invalidation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One entry.
    Entry {
        /// Its namespace.
        namespace: String,
        /// Its function.
        function: String,
        /// Its digest.
        digest: String,
    },
    /// Every entry of one function.
    Function {
        /// Its namespace.
        namespace: String,
        /// The function.
        function: String,
    },
    /// Every entry of one namespace.
    Namespace(String),
    /// Every entry.
    All,
}

/// Why an invalidation was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// A bust of the target's extent.
    Bust,
    /// A write replaced the entry's value.
    Put,
    /// A tag bust in the target namespace, naming the tag.
    Tag(String),
}

/// One invalidation: what to drop and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// What to drop.
    pub target: Target,
    /// Why.
    pub cause: Cause,
}

impl Invalidation {
    /// The invalidation of a bust of `scope`.
    pub fn bust(scope: Scope<'_>) -> Self {
        let target = match scope {
            Scope::Entry(key) => Target::Entry {
                namespace: key.namespace().to_owned(),
                function: key.function().to_owned(),
                digest: key.digest().to_owned(),
            },
            Scope::Function(function) => Target::Function {
                namespace: function.namespace().to_owned(),
                function: function.function().to_owned(),
            },
            Scope::Namespace(namespace) => Target::Namespace(namespace.to_owned()),
            Scope::All => Target::All,
        };
        Invalidation {
            target,
            cause: Cause::Bust,
        }
    }

    /// The invalidation of a write of `key`.
    pub fn put(key: &EntryKey) -> Self {
        Invalidation {
            cause: Cause::Put,
            ..Invalidation::bust(Scope::Entry(key))
        }
    }

    /// The invalidation of a bust of `tag` in `namespace`: the whole namespace, since which
    /// entries carried the tag is known only while the bust walks the index (one event of
    /// bounded size, however many entries the tag had, and no change to the stores' busts).
    pub fn tag(namespace: &str, tag: &str) -> Self {
        Invalidation {
            target: Target::Namespace(namespace.to_owned()),
            cause: Cause::Tag(tag.to_owned()),
        }
    }

    /// Its cause's name, for metrics: `bust`, `put` or `tag`.
    pub fn cause_name(&self) -> &'static str {
        match self.cause {
            Cause::Bust => "bust",
            Cause::Put => "put",
            Cause::Tag(_) => "tag",
        }
    }

    /// The field-value pairs of its stream entry: `scope` (`entry`, `function`, `namespace`,
    /// `all`), `cause` (`bust`, `put`, `tag`), and `ns`, `fn`, `digest`, `tag` as they apply.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = Vec::with_capacity(5);
        match &self.target {
            Target::Entry {
                namespace,
                function,
                digest,
            } => fields.extend([
                ("scope", "entry"),
                ("ns", namespace.as_str()),
                ("fn", function.as_str()),
                ("digest", digest.as_str()),
            ]),
            Target::Function {
                namespace,
                function,
            } => fields.extend([
                ("scope", "function"),
                ("ns", namespace.as_str()),
                ("fn", function.as_str()),
            ]),
            Target::Namespace(namespace) => {
                fields.extend([("scope", "namespace"), ("ns", namespace.as_str())])
            }
            Target::All => fields.push(("scope", "all")),
        }
        fields.push(("cause", self.cause_name()));
        if let Cause::Tag(tag) = &self.cause {
            fields.push(("tag", tag.as_str()));
        }
        fields
    }

    /// The invalidation a stream entry's fields describe. An entry of any other shape (not
    /// written by a server) invalidates everything: dropping too much costs misses, dropping
    /// too little serves stale values.
    pub fn from_fields(fields: &HashMap<String, redis::Value>) -> Self {
        let text = |name: &str| -> Option<String> {
            redis::from_redis_value_ref::<String>(fields.get(name)?).ok()
        };
        let cause = match text("cause").as_deref() {
            Some("bust") => Some(Cause::Bust),
            Some("put") => Some(Cause::Put),
            Some("tag") => text("tag").map(Cause::Tag),
            _ => None,
        };
        let target = match text("scope").as_deref() {
            Some("entry") => text("ns").zip(text("fn")).zip(text("digest")).map(
                |((namespace, function), digest)| Target::Entry {
                    namespace,
                    function,
                    digest,
                },
            ),
            Some("function") => {
                text("ns")
                    .zip(text("fn"))
                    .map(|(namespace, function)| Target::Function {
                        namespace,
                        function,
                    })
            }
            Some("namespace") => text("ns").map(Target::Namespace),
            Some("all") => Some(Target::All),
            _ => None,
        };
        match (target, cause) {
            (Some(target), Some(cause)) => Invalidation { target, cause },
            _ => Invalidation {
                target: Target::All,
                cause: Cause::Bust,
            },
        }
    }

    /// Its event on the wire, at `position`.
    pub fn event(&self, position: u64) -> pb::WatchEvent {
        let (scope, key) = match &self.target {
            Target::Entry {
                namespace,
                function,
                digest,
            } => (
                pb::InvalidationScope::ScopeEntry,
                Some(pb::Key {
                    namespace: namespace.clone(),
                    function: function.clone(),
                    digest: digest.clone(),
                }),
            ),
            Target::Function {
                namespace,
                function,
            } => (
                pb::InvalidationScope::ScopeFunction,
                Some(pb::Key {
                    namespace: namespace.clone(),
                    function: function.clone(),
                    digest: String::new(),
                }),
            ),
            Target::Namespace(namespace) => (
                pb::InvalidationScope::ScopeNamespace,
                Some(pb::Key {
                    namespace: namespace.clone(),
                    ..Default::default()
                }),
            ),
            Target::All => (pb::InvalidationScope::ScopeAll, None),
        };
        let (cause, tag) = match &self.cause {
            Cause::Bust => (pb::InvalidationCause::CauseBust, String::new()),
            Cause::Put => (pb::InvalidationCause::CausePut, String::new()),
            Cause::Tag(tag) => (pb::InvalidationCause::CauseTag, tag.clone()),
        };
        pb::WatchEvent {
            kind: pb::WatchEventKind::WatchEventInvalidation.into(),
            position,
            scope: scope.into(),
            cause: cause.into(),
            key,
            tag,
        }
    }
}

/// An invalidation and its position in the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its position: one more than the one before it.
    pub position: u64,
    /// What it invalidates.
    pub invalidation: Invalidation,
    /// The random nonce its stream entry was written with (none in the in-memory ring): what
    /// tells this entry from another at the same position in a re-created stream.
    pub nonce: Option<String>,
}

/// The in-memory store's sequence: the last `capacity` invalidations, numbered without gaps
/// from the process's start time (as a Redis stream is numbered from its creation, see
/// [`first_position`]), and a wake-up for a reader waiting for the next.
#[derive(Debug)]
pub struct Ring {
    state: Mutex<RingState>,
    arrived: Notify,
    capacity: usize,
    /// The position of the first invalidation.
    first: u64,
}

/// The first position of a sequence created at `unix_millis`: `{unix milliseconds}000000`,
/// what a Redis stream's creating entry is numbered (see `XADD_SCRIPT`). A sequence created
/// a millisecond or more later numbers above everything an earlier one did (unless the
/// earlier one took more than 10^6 invalidations per millisecond of its life), so a position
/// from before a restart is always told apart: resuming from it answers a RESET.
pub fn first_position(unix_millis: u64) -> u64 {
    unix_millis.saturating_mul(1_000_000)
}

#[derive(Debug, Default)]
struct RingState {
    /// The last position handed out (0: none yet).
    last: u64,
    /// The newest invalidations, oldest first, positions consecutive.
    kept: VecDeque<Published>,
}

impl Ring {
    /// An empty ring keeping the last `capacity` invalidations (at least one), numbered from
    /// now ([`first_position`]).
    pub fn new(capacity: usize) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        Self::numbered_from(capacity, first_position(now).max(1))
    }

    /// An empty ring keeping the last `capacity` invalidations (at least one), the first
    /// numbered `first` (at least 1).
    pub fn numbered_from(capacity: usize, first: u64) -> Self {
        Ring {
            state: Mutex::default(),
            arrived: Notify::new(),
            capacity: capacity.max(1),
            first: first.max(1),
        }
    }

    /// Appends `invalidations` in order, forgetting the oldest past the capacity; the position
    /// of the last (the current last when there are none).
    pub fn publish(&self, invalidations: &[Invalidation]) -> u64 {
        let last = {
            let mut state = lock(&self.state);
            for invalidation in invalidations {
                state.last = match state.last {
                    0 => self.first,
                    last => last + 1,
                };
                let position = state.last;
                state.kept.push_back(Published {
                    position,
                    nonce: None,
                    invalidation: invalidation.clone(),
                });
                if state.kept.len() > self.capacity {
                    state.kept.pop_front();
                }
            }
            state.last
        };
        self.arrived.notify_waiters();
        last
    }

    /// The last position handed out (0: none yet).
    pub fn tail(&self) -> u64 {
        lock(&self.state).last
    }

    /// Up to `count` invalidations after `after`, oldest first; the first is not `after + 1`
    /// when that one has been forgotten.
    pub fn read(&self, after: u64, count: usize) -> Vec<Published> {
        let state = lock(&self.state);
        let Some(first) = state.kept.front().map(|published| published.position) else {
            return Vec::new();
        };
        let skip = after.saturating_sub(first - 1).min(state.kept.len() as u64) as usize;
        state.kept.iter().skip(skip).take(count).cloned().collect()
    }

    /// [`Ring::read`], waiting up to `block` for one to arrive when there is none yet.
    pub async fn read_waiting(&self, after: u64, count: usize, block: Duration) -> Vec<Published> {
        // Created before looking, so a publish in between still wakes it.
        let arrived = self.arrived.notified();
        let found = self.read(after, count);
        if !found.is_empty() {
            return found;
        }
        let _ = tokio::time::timeout(block, arrived).await;
        self.read(after, count)
    }
}

/// What one watcher follows.
#[derive(Debug, Clone, Default)]
pub struct Follow {
    /// Every namespace.
    pub all: bool,
    /// Whole namespaces.
    pub namespaces: HashSet<String>,
    /// Single functions, as (namespace, function).
    pub functions: HashSet<(String, String)>,
}

impl Follow {
    /// Whether a watcher following this must hear of `invalidation`: anything in what it
    /// follows, and anything wider that includes it (a bust of everything reaches everyone).
    pub fn wants(&self, invalidation: &Invalidation) -> bool {
        if self.all {
            return true;
        }
        let namespace_followed = |namespace: &str| {
            self.namespaces.contains(namespace)
                || self.functions.iter().any(|(ns, _)| ns == namespace)
        };
        match &invalidation.target {
            Target::All => true,
            Target::Namespace(namespace) => namespace_followed(namespace),
            Target::Function {
                namespace,
                function,
            }
            | Target::Entry {
                namespace,
                function,
                ..
            } => {
                self.namespaces.contains(namespace)
                    || self
                        .functions
                        .contains(&(namespace.clone(), function.clone()))
            }
        }
    }
}

/// What the reader hands every watcher.
#[derive(Debug, Clone)]
enum Message {
    Invalidation(Arc<Published>),
    /// Everything up to this position has been read.
    Heartbeat(u64),
    /// The sequence restarted (its key was deleted) or lost entries before the reader read
    /// them: everything up to `position` may have been missed. `generation` counts the
    /// resets the reader has sent ([`HubInner::generation`]).
    Reset {
        position: u64,
        generation: u64,
    },
}

/// The server's counters of watching, for `Stats`.
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// Watch streams open.
    pub watchers: AtomicU64,
    /// Invalidations published.
    pub published: AtomicU64,
    /// Invalidation events sent to watchers.
    pub delivered: AtomicU64,
    /// RESET events sent to watchers.
    pub resets: AtomicU64,
}

/// How the hub runs.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// Time between heartbeats (and the longest the reader's blocking read waits).
    pub heartbeat: Duration,
    /// Messages the broadcast channel holds: how far a watcher may fall behind before it
    /// gets a RESET.
    pub buffer: usize,
    /// Whether changes are published, and what a failed publish does.
    pub mode: InvalidationMode,
}

/// The process's one reader of the invalidation sequence and the channel it feeds every
/// watcher from. Cloning is shallow.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    sender: broadcast::Sender<Message>,
    /// The last position the reader has read (0: none yet).
    position: AtomicU64,
    /// How many resets the reader has sent. A restart's reset may number below what came
    /// before it, so a watcher that lagged past one must not keep its old cursor: it tells by
    /// this count having moved (stored after `position`, read before it).
    generation: AtomicU64,
    /// Whether the reader knows where it stands: it has read where the sequence ended when
    /// it started, and its last read succeeded. No heartbeat and no "caught up" claim while
    /// it does not.
    healthy: signal::Sender<bool>,
    /// Changes made whose invalidation this server failed to publish and no bust of
    /// everything published since covers: while any, no heartbeat.
    debt: AtomicU64,
    /// When the last catch-up bust of everything was published (none yet: `None`), so the
    /// next, by whichever payer, waits out [`CATCH_UP_INTERVAL`].
    last_catch_up: std::sync::Mutex<Option<tokio::time::Instant>>,
    mode: InvalidationMode,
    closed: signal::Sender<bool>,
    counters: WatchCounters,
    metrics: Metrics,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("position", &self.position())
            .field("watchers", &self.inner.counters.watchers.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub with no reader yet ([`Hub::start`] starts one): its position stays 0 and its
    /// watchers hear nothing but what they replay.
    pub fn new(settings: WatchSettings, metrics: Metrics) -> Self {
        let (sender, _) = broadcast::channel(settings.buffer.max(1));
        let (closed, _) = signal::channel(false);
        let (healthy, _) = signal::channel(false);
        Hub {
            inner: Arc::new(HubInner {
                sender,
                position: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                healthy,
                debt: AtomicU64::new(0),
                last_catch_up: std::sync::Mutex::new(None),
                mode: settings.mode,
                closed,
                counters: WatchCounters::default(),
                metrics,
            }),
        }
    }

    /// A hub whose reader follows `store`'s sequence until [`Hub::close`].
    pub fn start<S: Store>(store: S, settings: WatchSettings, metrics: Metrics) -> Self {
        let hub = Hub::new(settings, metrics);
        tokio::spawn(hub.clone().follow(store, settings.heartbeat));
        hub
    }

    /// The last position the reader has read: every invalidation at or below it was
    /// published (its store change made) before now. Never above the sequence's true end.
    /// 0 until the reader has read where the sequence ended when it started: unknown, not
    /// "before everything" (a near cache must not cache a value answered with position 0).
    pub fn position(&self) -> u64 {
        self.inner.position.load(Relaxed)
    }

    /// The position a lookup answers with ([`Hub::position`], read before the lookup): 0
    /// (unknown, never cached) while the reader is not healthy ([`Hub::healthy`]: failing,
    /// or this server owes a bust of everything). A failing reader may still be on a
    /// numbering the sequence has left (replaced under a lower one, which another replica's
    /// reader has followed), and a near cache comparing such a position with what it applied
    /// from another replica would keep a value an invalidation it applied already covers.
    pub fn lookup_position(&self) -> u64 {
        if self.healthy() { self.position() } else { 0 }
    }

    /// Whether the reader knows where it stands: it has read where the sequence ended when
    /// it started, and its last read succeeded. Until it does, watchers get no heartbeat.
    pub fn healthy(&self) -> bool {
        *self.inner.healthy.borrow() && !self.owes()
    }

    /// Whether changes are published, and what a failed publish does.
    pub fn mode(&self) -> InvalidationMode {
        self.inner.mode
    }

    /// Whether a change was made whose invalidation is not published yet (see [`Hub::owe`]).
    pub fn owes(&self) -> bool {
        self.inner.debt.load(SeqCst) > 0
    }

    /// Records a change made whose invalidation could not be published to `store`'s
    /// sequence. Until a bust of everything is published in its place (retried in the
    /// background, with backoff, until it lands), this server's watchers get no heartbeat, so
    /// their near caches stop serving; once it lands every watcher of every replica drops
    /// everything. One bust of everything rather than a queue of the missed invalidations:
    /// bounded whatever the outage, and a publish outage is rare enough that emptying near
    /// caches once is the cheaper thing to get right.
    pub fn owe<S: Store>(&self, store: S) {
        if self.inner.debt.fetch_add(1, SeqCst) > 0 {
            // A task is already paying; it pays again for debts incurred meanwhile.
            return;
        }
        warn!(
            "watch: an invalidation was not published; heartbeats stop until a bust of everything is published in its place"
        );
        let hub = self.clone();
        tokio::spawn(async move {
            let mut closed = hub.inner.closed.subscribe();
            let everything = [Invalidation::bust(Scope::All)];
            let mut retry = Duration::from_millis(50);
            loop {
                let last_bust = *hub
                    .inner
                    .last_catch_up
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // Two busts of everything at least CATCH_UP_INTERVAL apart, however often
                // publishes fail meanwhile: heartbeats stay stopped while it waits.
                if let Some(last) = last_bust {
                    tokio::select! {
                        () = tokio::time::sleep_until(last + CATCH_UP_INTERVAL) => {}
                        _ = closed.wait_for(|closed| *closed) => return,
                    }
                }
                let covered = hub.inner.debt.load(SeqCst);
                match store.publish(&everything).await {
                    Ok(_) => {
                        *hub.inner
                            .last_catch_up
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                            Some(tokio::time::Instant::now());
                        hub.published(&everything);
                        // Debts incurred while it was in flight may be older than its XADD:
                        // publish again for them.
                        if hub
                            .inner
                            .debt
                            .compare_exchange(covered, 0, SeqCst, SeqCst)
                            .is_ok()
                        {
                            info!(
                                "watch: published a bust of everything for the invalidations that were not; heartbeats resume"
                            );
                            return;
                        }
                    }
                    Err(err) => {
                        warn!(cause = %err, "watch: publishing a bust of everything failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(retry) => {}
                            _ = closed.wait_for(|closed| *closed) => return,
                        }
                        retry = (retry * 2).min(MAX_RETRY_WAIT);
                    }
                }
            }
        });
    }

    fn set_healthy(&self, healthy: bool) {
        self.inner.healthy.send_if_modified(|now| {
            let changed = *now != healthy;
            *now = healthy;
            changed
        });
    }

    /// The counters, for `Stats`.
    pub fn counters(&self) -> &WatchCounters {
        &self.inner.counters
    }

    /// Counts `invalidations` published by this server.
    pub fn published(&self, invalidations: &[Invalidation]) {
        self.inner
            .counters
            .published
            .fetch_add(invalidations.len() as u64, Relaxed);
        for invalidation in invalidations {
            self.inner.metrics.invalidation(invalidation.cause_name());
        }
    }

    /// Stops the reader and ends every watcher's stream with UNAVAILABLE (the server is
    /// shutting down: graceful shutdown would otherwise wait on streams that never end).
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Moves the reader to `position` and tells every watcher that what came up to it may
    /// have been missed.
    fn reset_all(&self, position: u64) {
        self.inner.position.store(position, SeqCst);
        let generation = self.inner.generation.fetch_add(1, SeqCst) + 1;
        self.send(Message::Reset {
            position,
            generation,
        });
    }

    fn send(&self, message: Message) {
        // No receivers is normal: nobody is watching.
        let _ = self.inner.sender.send(message);
    }

    /// The reader: follows the sequence from its current end, forever.
    async fn follow<S: Store>(self, store: S, heartbeat: Duration) {
        let mut closed = self.inner.closed.subscribe();
        let start = until_read("end", &mut closed, || store.reader_tail());
        let Some(mut last) = start.await else { return };
        self.inner.position.store(last, Relaxed);
        // A nonce that cannot be read is read again before anyone is told it is caught up.
        let nonce_read = until_read("newest entry", &mut closed, || Self::nonce_at(&store, last));
        let Some(mut nonce) = nonce_read.await else {
            return;
        };
        let mut retry = Duration::from_millis(50);
        // Only now may a watcher be told it is caught up: an invalidation published before
        // this read is at or below `last`, one published after it is read below.
        self.set_healthy(true);
        if !self.owes() {
            self.send(Message::Heartbeat(last));
        }
        info!(position = last, "watch: following the invalidation stream");
        let mut beat = tokio::time::Instant::now();
        let mut failing = false;
        loop {
            // Blocks only until the next heartbeat is due, so an invalidation read just before
            // it does not push the heartbeat a whole interval later (heartbeats stay at most
            // one interval apart while the reader is healthy and caught up).
            let block = heartbeat
                .saturating_sub(beat.elapsed())
                .max(Duration::from_millis(1));
            let read = tokio::select! {
                read = store.read_invalidations(last, READ_BATCH, Some(block)) => read,
                _ = closed.wait_for(|closed| *closed) => return,
            };
            // The entry at `last` checked (its nonce learnt when not known) before anything
            // read is delivered: a nonce that cannot be read fails the read.
            let read = match read {
                Ok(batch) => match Self::replaced(&store, last, &mut nonce).await {
                    Ok(replaced) => Ok((batch, replaced)),
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            match read {
                Ok((batch, replaced)) => {
                    let caught_up = batch.len() < READ_BATCH;
                    if failing {
                        info!(
                            position = last,
                            "watch: reading the invalidation stream again"
                        );
                        failing = false;
                        retry = Duration::from_millis(50);
                        self.set_healthy(true);
                    }
                    // The entry at `last` no longer being the one read: the sequence was
                    // replaced under the same numbering (deleted and re-created, or a promoted
                    // replica missing the newest entries, then written up to `last` again).
                    // What this read returned may come from either; all is covered by a RESET.
                    if replaced {
                        let tail = match store.reader_tail().await {
                            Ok(tail) => tail,
                            Err(err) => {
                                // Still replaced when read again: the check repeats.
                                warn!(cause = %err, "watch: cannot read the invalidation stream's end; retrying");
                                failing = true;
                                self.set_healthy(false);
                                tokio::select! {
                                    () = tokio::time::sleep(retry) => {}
                                    _ = closed.wait_for(|closed| *closed) => return,
                                }
                                retry = (retry * 2).min(MAX_RETRY_WAIT);
                                continue;
                            }
                        };
                        nonce = self
                            .renumbered(&store, last, tail, "was replaced under the same numbering")
                            .await;
                        last = tail;
                        continue;
                    }
                    if batch.is_empty() {
                        // Nothing after `last`: normal when idle, but also what a sequence
                        // restarted below `last` (its key deleted) looks like.
                        if let Ok(tail) = store.reader_tail().await
                            && tail < last
                        {
                            nonce = self.renumbered(&store, last, tail, "restarted").await;
                            last = tail;
                            continue;
                        }
                    }
                    if let Some(newest) = batch.last() {
                        nonce.clone_from(&newest.nonce);
                    }
                    for published in batch {
                        if Some(published.position) != last.checked_add(1) && last != 0 {
                            // Trimmed before this reader read them.
                            self.reset_all(published.position - 1);
                        }
                        last = published.position;
                        self.inner.position.store(last, Relaxed);
                        self.send(Message::Invalidation(Arc::new(published)));
                    }
                    if !self.owes() && heartbeat_due(caught_up, beat.elapsed(), heartbeat) {
                        beat = tokio::time::Instant::now();
                        self.send(Message::Heartbeat(last));
                    }
                }
                Err(err) => {
                    if !failing {
                        warn!(cause = %err, "watch: reading the invalidation stream failed; heartbeats stop until it recovers");
                        failing = true;
                        self.set_healthy(false);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        _ = closed.wait_for(|closed| *closed) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }
}

impl Hub {
    /// The sequence `what` (restarted, replaced…): moves the reader from `was` to `tail`,
    /// resets every watcher, and returns the nonce of the entry at `tail`. One that cannot be
    /// read now is `None`, learnt by the next read's check before a heartbeat claims
    /// caught-up.
    async fn renumbered<S: Store>(
        &self,
        store: &S,
        was: u64,
        tail: u64,
        what: &str,
    ) -> Option<String> {
        warn!(
            was,
            now = tail,
            "watch: the invalidation stream {what}; resetting watchers"
        );
        self.reset_all(tail);
        Self::nonce_at(store, tail).await.unwrap_or(None)
    }

    /// The nonce of the entry at `position` (none for position 0 or for a store that cannot
    /// be replaced).
    async fn nonce_at<S: Store>(store: &S, position: u64) -> Result<Option<String>, StoreError> {
        if position == 0 {
            return Ok(None);
        }
        store.reader_nonce(position).await
    }

    /// Whether the entry at `last` is no longer the one whose nonce is `nonce` (the sequence
    /// was replaced under the same numbering). With no nonce known, it is read now and kept.
    async fn replaced<S: Store>(
        store: &S,
        last: u64,
        nonce: &mut Option<String>,
    ) -> Result<bool, StoreError> {
        let now = Self::nonce_at(store, last).await?;
        match (nonce.as_ref(), now) {
            (Some(expected), Some(now)) => Ok(now != *expected),
            (None, now) => {
                *nonce = now;
                Ok(false)
            }
            (Some(_), None) => Ok(false),
        }
    }
}

/// Reads with `read` until it succeeds (warning of each failure, naming `what` of the stream
/// it could not read, and backing off up to [`MAX_RETRY_WAIT`]); `None` when the hub closes
/// first.
async fn until_read<T, F, Fut>(
    what: &str,
    closed: &mut signal::Receiver<bool>,
    read: F,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let reading = async {
        let mut retry = Duration::from_millis(50);
        loop {
            match read().await {
                Ok(value) => return value,
                Err(err) => {
                    warn!(cause = %err, "watch: cannot read the invalidation stream's {what}; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    };
    tokio::select! {
        value = reading => Some(value),
        _ = closed.wait_for(|closed| *closed) => None,
    }
}

/// Whether the reader sends a heartbeat after a read: only once `interval` has passed since
/// the last one, and only when the read reached the sequence's end (`caught_up`: fewer than
/// it asked for). A reader working through a backlog is not caught up, and a heartbeat then
/// would tell near caches that a stale value is current.
fn heartbeat_due(caught_up: bool, since_last: Duration, interval: Duration) -> bool {
    caught_up && since_last >= interval
}

/// The stream a `Watch` RPC answers with.
pub type WatchStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>>;

/// The events for one watcher following `follow` from `after` (0: from now): a replay of
/// what `store` kept after `after` first, then what the hub reads; a HEARTBEAT once caught up.
///
/// # Errors
/// UNAVAILABLE when `after` is given and the store cannot say where its sequence ends.
pub async fn watch<S: Store>(
    hub: &Hub,
    store: S,
    follow: Follow,
    after: u64,
) -> Result<WatchStream, StoreError> {
    // Subscribed before anything is read, so nothing published from here on is missed.
    let receiver = hub.inner.sender.subscribe();
    // Read before the position: the reader stores its position before it turns healthy, and
    // before it counts a reset.
    let healthy = hub.healthy();
    let generation = hub.inner.generation.load(SeqCst);
    let mut watcher = Watcher {
        guard: WatcherGuard::new(hub.clone()),
        receiver,
        closed: hub.inner.closed.subscribe(),
        healthy: hub.inner.healthy.subscribe(),
        store,
        follow,
        cursor: hub.position(),
        generation,
        catching_up: false,
        pending: VecDeque::new(),
        ended: false,
    };
    if after == 0 {
        // Before the reader knows where the sequence ends, nothing can be claimed: its
        // first heartbeat (sent once it does) reaches this watcher through the channel.
        if healthy {
            watcher.heartbeat(watcher.cursor);
        }
    } else {
        let tail = watcher.store.invalidation_tail().await?;
        if after > tail {
            // A position from a sequence since restarted, or from another store.
            watcher.cursor = tail;
            watcher.reset(tail);
        } else {
            watcher.cursor = after;
        }
        watcher.catching_up = true;
    }
    Ok(Box::pin(futures_util::stream::unfold(
        watcher,
        |mut watcher| async move { watcher.next().await.map(|event| (event, watcher)) },
    )))
}

/// Counts a watcher while its stream lives.
struct WatcherGuard {
    hub: Hub,
}

impl WatcherGuard {
    fn new(hub: Hub) -> Self {
        hub.inner.counters.watchers.fetch_add(1, Relaxed);
        hub.inner.metrics.watchers(1);
        WatcherGuard { hub }
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.hub.inner.counters.watchers.fetch_sub(1, Relaxed);
        self.hub.inner.metrics.watchers(-1);
    }
}

/// One watcher's state.
struct Watcher<S> {
    guard: WatcherGuard,
    receiver: broadcast::Receiver<Message>,
    closed: signal::Receiver<bool>,
    /// The hub's health (see [`Hub::healthy`]): a replay ends only while it is healthy.
    healthy: signal::Receiver<bool>,
    store: S,
    follow: Follow,
    /// The last position this watcher has been told about (sent or skipped as not followed).
    cursor: u64,
    /// The reader's reset count ([`HubInner::generation`]) this watcher's cursor is in.
    generation: u64,
    /// Whether the replay from the store is still going.
    catching_up: bool,
    /// Events ready to send.
    pending: VecDeque<pb::WatchEvent>,
    /// Whether the stream has ended (after its final error).
    ended: bool,
}

impl<S: Store> Watcher<S> {
    fn hub(&self) -> &Hub {
        &self.guard.hub
    }

    fn heartbeat(&mut self, position: u64) {
        self.pending.push_back(pb::WatchEvent {
            kind: pb::WatchEventKind::WatchEventHeartbeat.into(),
            position,
            ..Default::default()
        });
    }

    fn reset(&mut self, position: u64) {
        self.hub().inner.counters.resets.fetch_add(1, Relaxed);
        self.hub().inner.metrics.watch_reset();
        self.pending.push_back(pb::WatchEvent {
            kind: pb::WatchEventKind::WatchEventReset.into(),
            position,
            ..Default::default()
        });
    }

    /// Queues `published` if it is new to this watcher and followed.
    fn offer(&mut self, published: &Published) {
        if published.position <= self.cursor {
            return;
        }
        self.cursor = published.position;
        if self.follow.wants(&published.invalidation) {
            self.hub().inner.counters.delivered.fetch_add(1, Relaxed);
            self.hub().inner.metrics.watch_delivered();
            self.pending
                .push_back(published.invalidation.event(published.position));
        }
    }

    fn end(&mut self, status: Status) -> Option<Result<pb::WatchEvent, Status>> {
        self.ended = true;
        Some(Err(status))
    }

    fn shutting_down(&self) -> Status {
        Status::unavailable(format!(
            "the server is shutting down; watch again (any replica) with after={}",
            self.cursor
        ))
    }

    async fn next(&mut self) -> Option<Result<pb::WatchEvent, Status>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.ended {
                return None;
            }
            if *self.closed.borrow() {
                let status = self.shutting_down();
                return self.end(status);
            }
            if self.catching_up {
                match self
                    .store
                    .read_invalidations(self.cursor, CATCH_UP_PAGE, None)
                    .await
                {
                    Ok(page) if page.is_empty() => {
                        if !*self.healthy.borrow_and_update() {
                            // Until the reader has read where the sequence ends, what is
                            // published now might reach neither this replay (already past)
                            // nor the channel (below the reader's start): replay again
                            // once it has.
                            tokio::select! {
                                _ = self.healthy.wait_for(|healthy| *healthy) => {}
                                _ = self.closed.changed() => {}
                            }
                            continue;
                        }
                        self.catching_up = false;
                        if !self.hub().owes() {
                            self.heartbeat(self.cursor);
                        }
                    }
                    Ok(page) => {
                        if page[0].position > self.cursor.saturating_add(1) {
                            // What came between was trimmed from the store.
                            self.cursor = page[0].position - 1;
                            self.reset(self.cursor);
                        }
                        for published in &page {
                            self.offer(published);
                        }
                    }
                    Err(err) => {
                        let status = Status::unavailable(format!(
                            "cannot replay the invalidations after {}: {err}; watch again with after={}",
                            self.cursor, self.cursor
                        ));
                        return self.end(status);
                    }
                }
                continue;
            }
            let message = tokio::select! {
                message = self.receiver.recv() => message,
                _ = self.closed.changed() => continue,
            };
            match message {
                Ok(Message::Invalidation(published)) => self.offer(&published),
                Ok(Message::Heartbeat(position)) => {
                    self.cursor = self.cursor.max(position);
                    self.heartbeat(self.cursor);
                }
                Ok(Message::Reset {
                    position,
                    generation,
                }) => {
                    self.cursor = position;
                    self.generation = generation;
                    self.reset(position);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // The oldest messages still in the channel follow; those at or below the
                    // reset's position are skipped as covered by it. A reset among the
                    // messages missed may have renumbered the sequence below the cursor:
                    // then the reader's position is the only one that counts.
                    let generation = self.hub().inner.generation.load(SeqCst);
                    let position = self.hub().position();
                    self.cursor = if generation == self.generation {
                        self.cursor.max(position)
                    } else {
                        position
                    };
                    self.generation = generation;
                    self.reset(self.cursor);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let status = self.shutting_down();
                    return self.end(status);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::FunctionKey;

    const D: &str = "0123456789abcdef0123456789abcdef";

    fn key(namespace: &str, function: &str) -> EntryKey {
        EntryKey::new(namespace.into(), function.into(), D.into()).unwrap()
    }

    fn fields(invalidation: &Invalidation) -> HashMap<String, redis::Value> {
        invalidation
            .fields()
            .into_iter()
            .map(|(name, value)| {
                (
                    name.to_owned(),
                    redis::Value::BulkString(value.as_bytes().to_vec()),
                )
            })
            .collect()
    }

    /// Every kind of invalidation survives its trip through stream fields; anything else
    /// reads as invalidating everything.
    #[test]
    fn fields_round_trip() {
        let function = FunctionKey::new("ns".into(), "f".into()).unwrap();
        for invalidation in [
            Invalidation::put(&key("ns", "f")),
            Invalidation::bust(Scope::Entry(&key("ns", "f"))),
            Invalidation::bust(Scope::Function(&function)),
            Invalidation::bust(Scope::Namespace("ns")),
            Invalidation::bust(Scope::All),
            Invalidation::tag("ns", "user:7"),
        ] {
            assert_eq!(
                Invalidation::from_fields(&fields(&invalidation)),
                invalidation
            );
        }
        let mut odd = fields(&Invalidation::put(&key("ns", "f")));
        odd.remove("digest");
        assert_eq!(
            Invalidation::from_fields(&odd),
            Invalidation::bust(Scope::All)
        );
        assert_eq!(
            Invalidation::from_fields(&HashMap::new()),
            Invalidation::bust(Scope::All)
        );
    }

    /// A ring numbers from its creation time, so a ring made a millisecond later (a restarted
    /// server) numbers above everything a busy earlier one did.
    #[test]
    fn a_ring_numbers_from_its_creation_time() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ring = Ring::new(4);
        assert_eq!(ring.tail(), 0, "nothing published yet");
        let first = ring.publish(&[Invalidation::bust(Scope::All)]);
        assert!((first_position(now)..=first_position(now + 60_000)).contains(&first));
        assert_eq!(first % 1_000_000, 0, "the first is a whole millisecond's");
        // A ring made the next millisecond: room for 10^6 invalidations in between.
        let later = Ring::numbered_from(4, first_position(first / 1_000_000 + 1));
        assert_eq!(
            later.publish(&[Invalidation::bust(Scope::All)]),
            first + 1_000_000
        );
        assert_eq!(first_position(u64::MAX), u64::MAX, "saturates");
    }

    /// Positions are the counter part of `0-N` ids only.
    #[test]
    fn positions_are_stream_counters() {
        assert_eq!(position_of(&stream_id(42)), Some(42));
        assert_eq!(position_of("1700000000000-0"), None);
        assert_eq!(position_of("0-x"), None);
        assert_eq!(position_of("7"), None);
    }

    /// A watcher hears what it follows and what includes it, nothing of other namespaces or
    /// functions.
    #[test]
    fn follows_what_it_names_and_what_includes_it() {
        let follow = Follow {
            all: false,
            namespaces: ["a".to_owned()].into(),
            functions: [("b".to_owned(), "f".to_owned())].into(),
        };
        let function = |ns: &str, f: &str| FunctionKey::new(ns.into(), f.into()).unwrap();
        let wanted = [
            Invalidation::put(&key("a", "x")),
            Invalidation::bust(Scope::Function(&function("a", "x"))),
            Invalidation::bust(Scope::Namespace("a")),
            Invalidation::put(&key("b", "f")),
            Invalidation::bust(Scope::Function(&function("b", "f"))),
            Invalidation::bust(Scope::Namespace("b")),
            Invalidation::tag("b", "t"),
            Invalidation::bust(Scope::All),
        ];
        for invalidation in &wanted {
            assert!(follow.wants(invalidation), "{invalidation:?}");
        }
        let unwanted = [
            Invalidation::put(&key("b", "g")),
            Invalidation::bust(Scope::Function(&function("b", "g"))),
            Invalidation::bust(Scope::Namespace("c")),
            Invalidation::tag("c", "t"),
            Invalidation::put(&key("ab", "f")),
        ];
        for invalidation in &unwanted {
            assert!(!follow.wants(invalidation), "{invalidation:?}");
        }
        let everything = Follow {
            all: true,
            ..Follow::default()
        };
        assert!(unwanted.iter().all(|i| everything.wants(i)));
    }

    /// The ring numbers without gaps from its first position, forgets the oldest past its capacity, and a read
    /// after a forgotten position starts past the gap.
    #[test]
    fn ring_numbers_and_forgets() {
        let ring = Ring::numbered_from(3, 1);
        assert_eq!(ring.tail(), 0);
        assert!(ring.read(0, 10).is_empty());
        let put = Invalidation::put(&key("a", "f"));
        assert_eq!(ring.publish(&[put.clone(), put.clone()]), 2);
        assert_eq!(
            ring.read(0, 10)
                .iter()
                .map(|p| p.position)
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(ring.publish(&[put.clone(), put.clone(), put.clone()]), 5);
        let positions = |after| {
            ring.read(after, 10)
                .iter()
                .map(|p| p.position)
                .collect::<Vec<_>>()
        };
        assert_eq!(positions(0), [3, 4, 5]);
        assert_eq!(positions(1), [3, 4, 5]);
        assert_eq!(positions(3), [4, 5]);
        assert_eq!(positions(5), Vec::<u64>::new());
        assert_eq!(positions(9), Vec::<u64>::new());
        assert_eq!(ring.read(2, 1).len(), 1);
    }

    /// The next event's kind and position, within 10 s.
    async fn next_event(events: &mut WatchStream) -> (pb::WatchEventKind, u64) {
        use futures_util::StreamExt;
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("an event")
            .expect("no error");
        (event.kind(), event.position)
    }

    /// A watcher that lags past a reset which renumbered the sequence below its cursor (a
    /// stream replaced by a lower-numbered one) takes the reader's new position, so what is
    /// published next reaches it. Keeping the larger of its old cursor and the reader's
    /// position (as before the fix) skips every invalidation below the old cursor, silently.
    #[tokio::test]
    async fn a_watcher_lagging_past_a_renumbering_reset_takes_the_new_numbering() {
        use futures_util::StreamExt;
        let settings = WatchSettings {
            heartbeat: Duration::from_secs(3600),
            buffer: 4,
            mode: InvalidationMode::BestEffort,
        };
        let hub = Hub::new(settings, Metrics::disabled());
        hub.inner.position.store(1_000, SeqCst);
        hub.set_healthy(true);
        let store = crate::server::store::MemoryStore::new(1 << 20);
        let follow = Follow {
            all: true,
            ..Follow::default()
        };
        let mut events = watch(&hub, store, follow, 0).await.unwrap();
        assert_eq!(
            next_event(&mut events).await,
            (pb::WatchEventKind::WatchEventHeartbeat, 1_000)
        );
        let publish = |position| {
            hub.inner.position.store(position, SeqCst);
            hub.send(Message::Invalidation(Arc::new(Published {
                position,
                invalidation: Invalidation::put(&key("a", "f")),
                nonce: None,
            })));
        };
        // The reset to 10 and what follows it, more than the channel holds, unread.
        hub.reset_all(10);
        for position in 11..=30 {
            publish(position);
        }
        let (kind, position) = next_event(&mut events).await;
        assert_eq!(kind, pb::WatchEventKind::WatchEventReset);
        assert_eq!(position, 30, "the old numbering kept");
        // What the channel still holds is covered by the reset: nothing more to send (the
        // poll lets the watcher skip it, so the next publish does not lag it again).
        let idle = tokio::time::timeout(Duration::from_millis(50), events.next()).await;
        assert!(idle.is_err(), "an event covered by the reset: {idle:?}");
        publish(31);
        assert_eq!(
            next_event(&mut events).await,
            (pb::WatchEventKind::WatchEventInvalidation, 31)
        );
    }

    /// A reader waiting on an empty ring wakes for the next publish, well before its bound.
    #[tokio::test]
    async fn ring_wakes_a_waiting_reader() {
        let ring = Arc::new(Ring::new(8));
        let reader = {
            let ring = ring.clone();
            tokio::spawn(async move { ring.read_waiting(0, 10, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        ring.publish(&[Invalidation::bust(Scope::All)]);
        let read = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("woken by the publish")
            .unwrap();
        assert_eq!(read.len(), 1);
    }

    /// A heartbeat goes out only when the interval has passed and the read reached the end: a
    /// full batch (more waiting) never looks healthy, however long since the last one.
    #[test]
    fn heartbeats_only_when_caught_up() {
        let interval = Duration::from_millis(100);
        assert!(heartbeat_due(true, interval, interval));
        assert!(!heartbeat_due(true, interval / 2, interval));
        assert!(!heartbeat_due(false, interval * 10, interval));
    }

    /// The stream's key is never an entry or a tag index to a bust's grammar check.
    #[test]
    fn the_stream_is_no_entry() {
        for prefix in ["cm:", "cm:tenant:", "app/"] {
            let layout = crate::server::key::KeyLayout::new(prefix);
            assert_eq!(layout.classify(stream_key(prefix).as_bytes()), None);
        }
    }
}
