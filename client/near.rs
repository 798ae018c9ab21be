//! The near cache (L1): copies of cache entries in this process, kept coherent by the
//! service's invalidation stream (`Watch`), so a repeated `memoize` call costs a map lookup
//! instead of a round trip. Off unless
//! [`ClientOptions::near_cache_bytes`](crate::ClientOptions::near_cache_bytes) is set.
//!
//! # The rule
//! The proto's "Invalidation stream" comment states the rule a near cache follows; this
//! module is that rule, under one lock ([`Coherence`]) that both applying an event and
//! inserting a lookup's answer take:
//! - nothing is cached, or served, until the current stream has delivered its first event,
//!   nor after it dropped or went without a heartbeat (or RESET) for
//!   [`ClientOptions::near_cache_silence`](crate::ClientOptions::near_cache_silence).
//!   Invalidations do not count: a server stops its heartbeats when its reader falls behind
//!   or it owes a bust of everything, while invalidations other replicas published keep
//!   flowing, so only a heartbeat says the stream is complete up to now;
//! - a lookup's answer of key `k` with position `p` is inserted only if `p != 0`, no
//!   invalidation applied so far with a position above `p` names `k`, and nothing that
//!   empties the cache (a flush, a RESET, this client's own bust) happened between sending
//!   the lookup and its answer (the `generation` a [`Ticket`] carries). The proto's rule,
//!   `applied <= p` (`applied`: the highest position of any event processed, heartbeats
//!   included), refuses the answer if any invalidation above `p` was applied, whatever it
//!   names; this cache remembers the last [`RECENT_INVALIDATIONS`] (position and scope)
//!   and refuses it only if one of them names `k`, so writes to other keys of a namespace
//!   do not keep its lookups out. When `p` is older than what it remembers (the `floor`:
//!   below it, invalidations were forgotten or never received), the answer is refused as
//!   the proto's rule would;
//! - an INVALIDATION drops what its scope names, a RESET drops everything and sets `applied`
//!   to its position (which may be lower: a restarted sequence);
//! - a copy does not outlive its entry's TTL: it expires at the time its lookup was sent
//!   plus the time left the service reported. (An entry the store evicts, Redis under
//!   `maxmemory` or the memory store over its budget, publishes nothing: its copy lives to
//!   that expiry.)
//!
//! # One stream, the namespaces named and used so far
//! A client has no right, in general, to follow every namespace (that needs the admin grant),
//! so the stream follows the namespaces named in
//! [`ClientOptions::near_cache_namespaces`](crate::ClientOptions::near_cache_namespaces)
//! (from when the client is made) and those the service has answered this client's
//! near-cached lookups with hits in (a namespace it may not read never gets that far). When a
//! new one shows up, the stream is replaced by one that follows it too, resuming after
//! `applied`, and the copies are kept: the new stream replays every invalidation after
//! `applied` of every namespace it follows, so nothing published meanwhile is missed; the
//! copies are served meanwhile only while the old stream's last heartbeat is within the
//! silence bound, as always. The new namespace has no copies yet, and its lookups are
//! copied once the new stream has spoken, if they are newer than where it started (the
//! `floor`: its invalidations from before were never received).
//!
//! # Writes
//! A value this client has just written is not inserted: its own write publishes an
//! invalidation of the entry, which would drop it again (telling it apart would mean
//! remembering our own positions). The next lookup, a remote hit, fills the near cache.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter, unsync};
use tokio::{sync::Notify, task::JoinHandle};
use tonic::Code;
use tracing::{debug, warn};

use crate::{client::RawClient, connect::describe, key::EntryKey, lock, pb};

/// The near cache's size unless set: 0, off. A near cache changes what a caller can see (a
/// bust made by another process is seen after a bounded delay instead of at once) and opens
/// a `Watch` stream per client, so it is asked for, not given.
pub const DEFAULT_NEAR_CACHE_BYTES: usize = 0;

/// How long the near cache trusts a stream without a heartbeat: with no heartbeat (or RESET)
/// for this long (the server sends one every second by default), it is emptied and bypassed
/// until a new stream speaks. Invalidations do not count, since a server that stops its
/// heartbeats (reader behind, a bust of everything owed) may still relay other replicas'
/// invalidations. Three heartbeat intervals: heartbeats can come up to about two intervals
/// apart, and one late heartbeat is not an outage.
pub const DEFAULT_NEAR_CACHE_SILENCE: Duration = Duration::from_secs(3);

/// What one copy costs beyond its key's and value's bytes: the map's slot (the key's three
/// strings, the value's handle, the expiry, the queue links), the key's and the value's
/// allocations, and the value's shared header once a hit has cloned it. Measured at about
/// 220–460 bytes per copy of a small value, run to run (BENCHMARKS.md, "Near cache"): so
/// `near_cache_bytes` roughly bounds the process's memory for the copies, not just their
/// payload.
const ENTRY_OVERHEAD: u64 = 320;

/// The most namespaces and functions whose drops are remembered (see [`Dropped`]); a drop
/// past it walks the copies once, removing what the table hides, and starts the table afresh.
const MAX_DROPPED_SCOPES: usize = 4096;

/// The weight the cache sizes itself for, per entry, to guess how many entries it will hold.
const TYPICAL_ENTRY: usize = 512;

/// How many applied invalidations the near cache remembers (position and scope), so that a
/// lookup's answer is kept out only when an invalidation after it names its key. Past this
/// many invalidations during one lookup, its answer is kept out whatever it names.
pub(crate) const RECENT_INVALIDATIONS: usize = 1024;

/// The shortest [`ClientOptions::near_cache_silence`](crate::ClientOptions::near_cache_silence)
/// accepted: below it no stream would stay healthy between two heartbeats.
pub(crate) const MIN_SILENCE: Duration = Duration::from_millis(100);

/// The longest [`ClientOptions::near_cache_silence`](crate::ClientOptions::near_cache_silence)
/// accepted: the bound on serving copies from a stream that stopped vouching for them.
pub(crate) const MAX_SILENCE: Duration = Duration::from_secs(3600);

/// Checks the near cache's options: a silence within [`MIN_SILENCE`]..=[`MAX_SILENCE`], and
/// namespaces to follow that are valid names.
///
/// # Errors
/// [`Error::InvalidOption`](crate::Error::InvalidOption) or
/// [`Error::InvalidName`](crate::Error::InvalidName), naming the field.
pub(crate) fn check_options(silence: Duration, namespaces: &[String]) -> Result<(), crate::Error> {
    if !(MIN_SILENCE..=MAX_SILENCE).contains(&silence) {
        return Err(crate::Error::InvalidOption(format!(
            "near_cache_silence: must be from {} ms to {} s (keep it above twice the server's --watch-heartbeat-ms), got {} ms",
            MIN_SILENCE.as_millis(),
            MAX_SILENCE.as_secs(),
            silence.as_millis()
        )));
    }
    for namespace in namespaces {
        crate::key::check_name("near_cache_namespaces", namespace)?;
    }
    Ok(())
}

/// The first pause before reconnecting a dropped stream; doubled after each failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);

/// The longest pause between two reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The first pause before asking again for a stream the server refused (invalidations off,
/// no right to watch, a request it does not take): doubled after each refusal, up to
/// [`REFUSED_BACKOFF_MAX`]. Long, since a refusal usually lasts (a configuration), but not
/// for ever: in a rolling upgrade, the replica that refused may be replaced by one that
/// streams.
pub(crate) const DEFAULT_NEAR_REFUSED_BACKOFF: Duration = Duration::from_secs(60);

/// The longest pause between two requests for a refused stream.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// The longest a paused watch task sleeps before checking that its client still exists.
const PAUSE_STEP: Duration = Duration::from_secs(1);

/// The most namespaces the stream follows: the server's default `--max-batch`, which bounds
/// the namespaces one `Watch` may name. Namespaces used past this many are not followed, and
/// their lookups bypass the near cache.
pub(crate) const MAX_FOLLOWED: usize = 1000;

/// Which copies an invalidation (or this client's own bust) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// One entry.
    Entry(EntryKey),
    /// Every entry of one function: (namespace, function).
    Function(String, String),
    /// Every entry of one namespace.
    Namespace(String),
    /// Every entry.
    All,
}

impl Scope {
    /// Whether `key` is among what the scope names.
    fn covers(&self, key: &EntryKey) -> bool {
        match self {
            Scope::Entry(entry) => entry == key,
            Scope::Function(namespace, function) => {
                key.namespace() == namespace && key.function() == function
            }
            Scope::Namespace(namespace) => key.namespace() == namespace,
            Scope::All => true,
        }
    }

    /// The scope of an INVALIDATION event; everything when it names something this client
    /// cannot read (an unknown scope, a malformed key), since dropping too much only costs
    /// misses.
    fn of_event(event: &pb::WatchEvent) -> Scope {
        let key = event.key.as_ref();
        let namespace = || key.map(|key| key.namespace.clone());
        match pb::InvalidationScope::try_from(event.scope) {
            Ok(pb::InvalidationScope::ScopeEntry) => key
                .and_then(|key| {
                    EntryKey::new(
                        key.namespace.clone(),
                        key.function.clone(),
                        key.digest.clone(),
                    )
                    .ok()
                })
                .map_or(Scope::All, Scope::Entry),
            Ok(pb::InvalidationScope::ScopeFunction) => key.map_or(Scope::All, |key| {
                Scope::Function(key.namespace.clone(), key.function.clone())
            }),
            Ok(pb::InvalidationScope::ScopeNamespace) => {
                namespace().map_or(Scope::All, Scope::Namespace)
            }
            _ => Scope::All,
        }
    }
}

/// One copy: the encoded value, when it stops being served, and its stamp (see [`Dropped`]).
#[derive(Debug, Clone)]
struct Held {
    bytes: Bytes,
    expires: Instant,
    stamp: u64,
}

/// Drops of whole namespaces and functions, applied lazily: each drop takes the next stamp,
/// and a copy stamped (inserted) before the last drop of its namespace or function is gone,
/// removed when it is next looked up or pushed out by newer copies. So an invalidation of a
/// namespace (every `BustTag`) or of a function costs a map write under the lock a hit takes
/// (a namespace's also frees its functions' entries), not a walk over every copy; a hit pays
/// one map lookup (two when its namespace had functions dropped), none while nothing was
/// dropped.
#[derive(Debug, Default)]
struct Dropped {
    /// The stamp the latest drop took; copies inserted now carry it.
    stamp: u64,
    namespaces: HashMap<String, NamespaceDrops, DefaultHashBuilder>,
    /// Functions remembered across `namespaces`, to bound the memory.
    function_count: usize,
}

/// One namespace's drops: of the whole namespace (0: none), and of functions since then.
#[derive(Debug, Default)]
struct NamespaceDrops {
    whole: u64,
    functions: HashMap<String, u64, DefaultHashBuilder>,
}

impl Dropped {
    /// Whether a copy of `key` stamped `stamp` was dropped since.
    /// (A lookup in an empty map hashes nothing, so a hit pays no hashing while nothing
    /// was dropped.)
    fn covers(&self, key: &EntryKey, stamp: u64) -> bool {
        let Some(drops) = self.namespaces.get(key.namespace()) else {
            return false;
        };
        stamp < drops.whole
            || drops
                .functions
                .get(key.function())
                .is_some_and(|&at| stamp < at)
    }

    /// Records a drop of `scope` (a namespace or a function); false when that would remember
    /// more than [`MAX_DROPPED_SCOPES`] namespaces and functions.
    fn record(&mut self, scope: &Scope) -> bool {
        let (namespace, function) = match scope {
            Scope::Namespace(namespace) => (namespace, None),
            Scope::Function(namespace, function) => (namespace, Some(function)),
            Scope::Entry(_) | Scope::All => unreachable!("only namespaces and functions"),
        };
        let remembered = self.namespaces.len() + self.function_count;
        let known = self.namespaces.get(namespace);
        let adds = usize::from(known.is_none())
            + usize::from(function.is_some_and(|function| {
                known.is_none_or(|drops| !drops.functions.contains_key(function))
            }));
        if remembered + adds > MAX_DROPPED_SCOPES {
            return false;
        }
        self.stamp += 1;
        let drops = self.namespaces.entry(namespace.clone()).or_default();
        match function {
            None => {
                // The whole namespace outranks its functions' earlier drops.
                drops.whole = self.stamp;
                self.function_count -= drops.functions.len();
                drops.functions = HashMap::default();
            }
            Some(function) => {
                if drops
                    .functions
                    .insert(function.clone(), self.stamp)
                    .is_none()
                {
                    self.function_count += 1;
                }
            }
        }
        true
    }

    /// Forgets every drop: the copies they hide are gone.
    fn clear(&mut self) {
        self.namespaces.clear();
        self.function_count = 0;
    }
}

/// Weighs a copy by its key's and value's bytes plus [`ENTRY_OVERHEAD`].
#[derive(Debug, Clone, Copy)]
struct Bytewise;

impl Weighter<EntryKey, Held> for Bytewise {
    fn weight(&self, key: &EntryKey, copy: &Held) -> u64 {
        let key_bytes = key.namespace().len() + key.function().len() + key.digest().len();
        (key_bytes + copy.bytes.len()) as u64 + ENTRY_OVERHEAD
    }
}

/// Counts copies pushed out to make room: not those an invalidation removed, but those it
/// had only hidden (a whole namespace's or function's, see [`Dropped`]) are counted.
#[derive(Debug, Clone, Default)]
struct Evictions(Arc<AtomicU64>);

impl Lifecycle<EntryKey, Held> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: EntryKey, _copy: Held) {
        self.0.fetch_add(1, Relaxed);
    }
}

type Copies = unsync::Cache<EntryKey, Held, Bytewise, DefaultHashBuilder, Evictions>;

/// What a lookup carries from before it was sent to its answer: which state of the near
/// cache it was sent in, and when (its copy expires counted from then).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    generation: u64,
    sent: Instant,
}

/// What applying one event did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Invalidation,
    Heartbeat,
    Reset,
}

/// The coherence rule's state, all under one lock: the copies, `applied`, whether the stream
/// is healthy, and the generation that every emptying bumps.
struct Coherence {
    copies: Copies,
    /// Namespaces and functions dropped since their copies were inserted.
    dropped: Dropped,
    /// The highest position of any event processed (or a RESET's position).
    applied: u64,
    /// The last [`RECENT_INVALIDATIONS`] invalidations applied, oldest first: position and
    /// scope.
    recent: VecDeque<(u64, Scope)>,
    /// `recent` holds every invalidation applied with a position above this (in the
    /// namespaces the stream follows): the position of the last one forgotten, the RESET's,
    /// or where the current stream started from.
    floor: u64,
    /// Bumped whenever the cache is emptied or this client busts: a lookup sent before is not
    /// inserted.
    generation: u64,
    /// Whether the current stream has delivered its first event and has not dropped since.
    healthy: bool,
    /// When the stream last said it is complete up to now: its last heartbeat or RESET (or
    /// its first event). Invalidations do not count (see the module doc).
    last_heard: Instant,
    /// The namespaces the healthy stream follows; only their entries are cached.
    followed: BTreeSet<String>,
    /// The namespaces that have used the near cache: what the next stream follows.
    wanted: BTreeSet<String>,
    /// Before when a lookup must have been sent for its answer not to be inserted: set by a
    /// RESET that lowered positions, since
    /// another replica's reader may still answer lookups with positions of the numbering
    /// the RESET left (it notices within a heartbeat), and those would compare as newer.
    quarantine: Option<Instant>,
    /// The server refused the last stream asked for (invalidations off, no right to watch):
    /// bypassed until a stream is granted.
    disabled: bool,
}

impl fmt::Debug for Coherence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coherence")
            .field("copies", &self.copies.len())
            .field("applied", &self.applied)
            .field("generation", &self.generation)
            .field("healthy", &self.healthy)
            .field("followed", &self.followed)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

impl Coherence {
    fn new(bytes: usize, evictions: Evictions, now: Instant) -> Self {
        let items = (bytes / TYPICAL_ENTRY).max(16);
        Coherence {
            copies: Copies::with(
                items,
                bytes as u64,
                Bytewise,
                DefaultHashBuilder::default(),
                evictions,
            ),
            dropped: Dropped::default(),
            applied: 0,
            recent: VecDeque::new(),
            floor: 0,
            generation: 0,
            healthy: false,
            last_heard: now,
            followed: BTreeSet::new(),
            wanted: BTreeSet::new(),
            quarantine: None,
            disabled: false,
        }
    }

    /// Whether copies may be served and inserted now: a healthy stream that sent a heartbeat
    /// within `silence`. (The watch task flushes a silent stream too; checking here as well keeps a
    /// starved task from stretching the bound.)
    fn usable(&self, now: Instant, silence: Duration) -> bool {
        self.healthy && !self.disabled && now.saturating_duration_since(self.last_heard) < silence
    }

    /// A ticket for a lookup of `namespace` sent now, when its answer may be cached.
    fn ticket(&self, namespace: &str, now: Instant, silence: Duration) -> Option<Ticket> {
        (self.usable(now, silence) && self.followed.contains(namespace)).then_some(Ticket {
            generation: self.generation,
            sent: now,
        })
    }

    /// The live copy of `key`, if it may be served now.
    fn get(&mut self, key: &EntryKey, now: Instant, silence: Duration) -> Option<Bytes> {
        if !self.usable(now, silence) {
            return None;
        }
        let copy = self.copies.get(key)?;
        if copy.expires <= now || self.dropped.covers(key, copy.stamp) {
            self.copies.remove(key);
            return None;
        }
        Some(copy.bytes.clone())
    }

    /// Inserts a lookup's answer (position `position`, `ttl` left) if the rule allows;
    /// returns whether it did.
    fn insert(
        &mut self,
        key: EntryKey,
        bytes: Bytes,
        ticket: Ticket,
        position: u64,
        ttl: Duration,
    ) -> bool {
        let quarantined = self.quarantine.is_some_and(|until| ticket.sent < until);
        let allowed = self.healthy
            && !self.disabled
            && !quarantined
            && ticket.generation == self.generation
            && position != 0
            && self.floor <= position
            && !self.invalidated_after(&key, position)
            && !ttl.is_zero();
        if allowed {
            let expires = ticket.sent + ttl;
            let stamp = self.dropped.stamp;
            self.copies.insert(
                key,
                Held {
                    bytes,
                    expires,
                    stamp,
                },
            );
        }
        allowed
    }

    /// Whether an invalidation applied with a position above `position` names `key`.
    fn invalidated_after(&self, key: &EntryKey, position: u64) -> bool {
        self.recent
            .iter()
            .rev()
            .take_while(|(at, _)| *at > position)
            .any(|(_, scope)| scope.covers(key))
    }

    /// Remembers an applied invalidation, forgetting the oldest past
    /// [`RECENT_INVALIDATIONS`].
    fn remember(&mut self, position: u64, scope: Scope) {
        if self.recent.len() == RECENT_INVALIDATIONS
            && let Some((forgotten, _)) = self.recent.pop_front()
        {
            self.floor = self.floor.max(forgotten);
        }
        self.recent.push_back((position, scope));
    }

    /// Applies one event of the stream following `followed`, which asked for the events
    /// after `after` (0: from now on); a stream silent for `silence` or more (a watch task
    /// that was not run for that long finds its events waiting) empties the copies first.
    fn apply(
        &mut self,
        event: &pb::WatchEvent,
        followed: &BTreeSet<String>,
        after: u64,
        now: Instant,
        silence: Duration,
    ) -> Applied {
        if self.healthy && now.saturating_duration_since(self.last_heard) >= silence {
            // The bound has passed: what was copied is no longer vouched for, whatever this
            // event says.
            self.empty();
        }
        if !self.healthy || self.followed != *followed {
            // The stream's first event: from here on, every invalidation after `after` (or
            // after this event's position, for a stream started from now) in the namespaces
            // it follows reaches this cache, but not necessarily those before it (a namespace
            // the previous stream did not follow).
            if !self.healthy {
                // A stream after an outage starts from an empty cache: its first event
                // starts the silence clock. A stream replacing a healthy one (more
                // namespaces) keeps the copies and the clock: only a heartbeat or a RESET
                // vouches for them again.
                self.last_heard = now;
            }
            self.healthy = true;
            self.disabled = false;
            self.followed = followed.clone();
            let start = if after == 0 { event.position } else { after };
            self.floor = self.floor.max(start);
        }
        match pb::WatchEventKind::try_from(event.kind) {
            Ok(pb::WatchEventKind::WatchEventHeartbeat) => {
                self.last_heard = now;
                self.applied = self.applied.max(event.position);
                Applied::Heartbeat
            }
            Ok(pb::WatchEventKind::WatchEventInvalidation) => {
                let scope = Scope::of_event(event);
                self.drop_scope(&scope);
                self.applied = self.applied.max(event.position);
                self.remember(event.position, scope);
                Applied::Invalidation
            }
            Ok(pb::WatchEventKind::WatchEventReset)
            | Ok(pb::WatchEventKind::Unspecified)
            | Err(_) => {
                // A restarted sequence numbers from lower: `applied` follows it down, and
                // lookups in flight (positions of the old numbering) are not inserted.
                self.empty();
                if event.position < self.applied {
                    self.quarantine = Some(now + silence);
                }
                self.applied = event.position;
                self.recent.clear();
                self.floor = event.position;
                self.last_heard = now;
                Applied::Reset
            }
        }
    }

    /// Drops the copies `scope` names.
    fn drop_scope(&mut self, scope: &Scope) {
        match scope {
            Scope::Entry(key) => {
                self.copies.remove(key);
            }
            Scope::All => self.clear_copies(),
            Scope::Namespace(_) | Scope::Function(..) => {
                if !self.dropped.record(scope) {
                    // The table is full: apply what it remembers and this drop by walking
                    // the copies once, and start it afresh.
                    let dropped = &self.dropped;
                    self.copies
                        .retain(|key, copy| !dropped.covers(key, copy.stamp) && !scope.covers(key));
                    self.dropped.clear();
                }
            }
        }
    }

    /// This client's own bust (or overwrite) of `scope`: its copies go at once, and no
    /// lookup sent before it is inserted (it may have read what the bust removed).
    fn own_change(&mut self, scope: &Scope) {
        self.drop_scope(scope);
        self.generation += 1;
    }

    /// Drops every copy; lookups in flight are not inserted.
    fn empty(&mut self) {
        self.clear_copies();
        self.generation += 1;
    }

    /// Drops every copy, and with them the drops remembered.
    fn clear_copies(&mut self) {
        self.copies.clear();
        self.dropped.clear();
    }

    /// The stream dropped, fell silent or is being replaced: empty and bypass the cache until
    /// the next stream's first event.
    fn flush(&mut self) {
        self.empty();
        self.healthy = false;
        self.followed.clear();
    }
}

/// The near cache's counters (see [`ClientMetrics`](crate::ClientMetrics)).
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Evictions,
    invalidations: AtomicU64,
    resets: AtomicU64,
    flushes: AtomicU64,
    refused: AtomicU64,
}

/// What the near cache reports in [`ClientMetrics`](crate::ClientMetrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NearMetrics {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evictions: u64,
    pub(crate) invalidations: u64,
    pub(crate) resets: u64,
    pub(crate) flushes: u64,
    pub(crate) insert_refused: u64,
    pub(crate) stream_healthy: bool,
    pub(crate) disabled: bool,
}

/// A client's near cache and the handle of its watch task. Shared by the client's clones.
pub(crate) struct Near {
    state: Mutex<Coherence>,
    silence: Duration,
    counters: Counters,
    /// Woken when a namespace is added to `wanted`, so the stream follows it.
    grown: Arc<Notify>,
    /// The watch task, once started (with the client, or by the first hit). A task whose
    /// runtime shut down (a client shared by several runtimes, as tests do) is started again
    /// by the next hit.
    task: Mutex<Option<JoinHandle<()>>>,
    /// The stub the watch task calls `Watch` with.
    rpc: RawClient,
    /// The first pause before asking again for a refused stream.
    refused_backoff: Duration,
    /// Whether a refusal was logged at warn (once per client).
    warned: AtomicBool,
}

impl fmt::Debug for Near {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Near")
            .field("state", &*lock(&self.state))
            .field("silence", &self.silence)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Near {
    /// A near cache of `bytes` whose stream is trusted for `silence` without a heartbeat,
    /// following `namespaces` from the start (up to [`MAX_FOLLOWED`]), asking again for a
    /// refused stream after `refused_backoff` (doubling); its watch task starts with
    /// [`Near::start`] or the first namespace it is asked to follow.
    pub(crate) fn new(
        bytes: usize,
        silence: Duration,
        namespaces: &[String],
        refused_backoff: Duration,
        rpc: RawClient,
    ) -> Self {
        let counters = Counters::default();
        let mut state = Coherence::new(bytes, counters.evictions.clone(), Instant::now());
        state.wanted = namespaces.iter().take(MAX_FOLLOWED).cloned().collect();
        Near {
            state: Mutex::new(state),
            silence,
            counters,
            grown: Arc::new(Notify::new()),
            task: Mutex::new(None),
            rpc,
            refused_backoff,
            warned: AtomicBool::new(false),
        }
    }

    /// Starts the watch task now if there are namespaces to follow and a runtime to run it
    /// on (else the first hit starts it).
    pub(crate) fn start(self: &Arc<Self>) {
        let wanted = !lock(&self.state).wanted.is_empty();
        if wanted && tokio::runtime::Handle::try_current().is_ok() {
            self.watching(false);
        }
    }

    /// Makes sure the watch task runs (starting it, the first time or when its runtime is
    /// gone); when `grown`, wakes it to reopen the stream with the namespaces added.
    fn watching(self: &Arc<Self>, grown: bool) {
        let mut task = lock(&self.task);
        if task.as_ref().is_some_and(|task| !task.is_finished()) {
            if grown {
                self.grown.notify_one();
            }
            return;
        }
        // A task that died with its runtime left the state as it was: start from empty, as
        // after any lost stream.
        lock(&self.state).flush();
        *task = Some(tokio::spawn(watch(
            Arc::downgrade(self),
            self.grown.clone(),
            self.rpc.clone(),
        )));
    }

    /// The copy of `key` if one may be served, counted as a near hit or miss (not counted
    /// while the service refuses the stream).
    pub(crate) fn get(&self, key: &EntryKey) -> Option<Bytes> {
        let found = {
            let mut state = lock(&self.state);
            if state.disabled {
                return None;
            }
            state.get(key, Instant::now(), self.silence)
        };
        let counter = match found {
            Some(_) => &self.counters.hits,
            None => &self.counters.misses,
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    /// A lookup's hit turned out not to be servable (it does not decode): drops it and
    /// counts a miss in place of the hit.
    pub(crate) fn discard(&self, key: &EntryKey) {
        lock(&self.state).copies.remove(key);
        self.counters.hits.fetch_sub(1, Relaxed);
        self.counters.misses.fetch_add(1, Relaxed);
    }

    /// A ticket for a lookup of a key of `namespace` about to be sent, when its answer may
    /// be cached.
    pub(crate) fn ticket(&self, namespace: &str) -> Option<Ticket> {
        lock(&self.state).ticket(namespace, Instant::now(), self.silence)
    }

    /// Offers a live hit of `key` answered at `position` with `ttl_ms` left: copied if its
    /// lookup had a `ticket` and the rule allows. The first hit of a namespace has the stream
    /// follow it, so its later hits can be copied: following only namespaces the service has
    /// answered hits of keeps one the client may not read from getting the stream refused.
    /// One lock in all.
    pub(crate) fn offer(
        self: &Arc<Self>,
        key: &EntryKey,
        bytes: Bytes,
        ticket: Option<Ticket>,
        position: u64,
        ttl_ms: u64,
    ) {
        let ttl = Duration::from_millis(ttl_ms);
        // The answer's value is a slice of the whole buffer its response was decoded from (the
        // HTTP/2 connection's read buffer, or tonic's decode buffer of 512 bytes at least,
        // `client/codec.rs`): a copy gets an allocation of its own, made before taking the
        // lock hits take.
        let owned = ticket.map(|ticket| (ticket, Bytes::copy_from_slice(&bytes)));
        let new = {
            let mut state = lock(&self.state);
            if let Some((ticket, bytes)) = owned
                && !state.insert(key.clone(), bytes, ticket, position, ttl)
            {
                self.counters.refused.fetch_add(1, Relaxed);
            }
            let namespace = key.namespace();
            // Past the limit a new namespace is not followed: its lookups bypass the near
            // cache, and the stream keeps working for the others.
            !state.wanted.contains(namespace)
                && state.wanted.len() < MAX_FOLLOWED
                && state.wanted.insert(namespace.to_owned())
        };
        if new {
            debug!(
                namespace = key.namespace(),
                "cache-money near cache: following a new namespace"
            );
        }
        self.watching(new);
    }

    /// This client's own bust or overwrite of `scope`: its copies go before the call returns.
    pub(crate) fn own_change(&self, scope: &Scope) {
        lock(&self.state).own_change(scope);
    }

    /// A snapshot of the counters and the stream's state.
    pub(crate) fn metrics(&self) -> NearMetrics {
        let counters = &self.counters;
        let (stream_healthy, disabled) = {
            let state = lock(&self.state);
            (state.usable(Instant::now(), self.silence), state.disabled)
        };
        NearMetrics {
            hits: counters.hits.load(Relaxed),
            misses: counters.misses.load(Relaxed),
            evictions: counters.evictions.0.load(Relaxed),
            invalidations: counters.invalidations.load(Relaxed),
            resets: counters.resets.load(Relaxed),
            flushes: counters.flushes.load(Relaxed),
            insert_refused: counters.refused.load(Relaxed),
            stream_healthy,
            disabled,
        }
    }

    /// What the next stream asks for: the namespaces wanted so far, after `applied`.
    fn request(&self) -> (pb::WatchRequest, BTreeSet<String>) {
        let state = lock(&self.state);
        let request = pb::WatchRequest {
            namespaces: state.wanted.iter().cloned().collect(),
            after: state.applied,
            ..Default::default()
        };
        (request, state.wanted.clone())
    }

    /// When a healthy stream was last heard from (its copies kept across a switch are vouched
    /// for only until that plus the silence); none after an outage.
    fn heard(&self) -> Option<Instant> {
        let state = lock(&self.state);
        state.healthy.then_some(state.last_heard)
    }

    /// Whether namespaces were added since the stream following `followed` started.
    fn grew(&self, followed: &BTreeSet<String>) -> bool {
        lock(&self.state).wanted.len() != followed.len()
    }

    /// Applies one event of the stream following `followed` after `after`; returns when the
    /// stream was last heard from (its last heartbeat, RESET or first event), from which its
    /// silence is measured.
    fn apply(&self, event: &pb::WatchEvent, followed: &BTreeSet<String>, after: u64) -> Instant {
        let (applied, heard) = {
            let mut state = lock(&self.state);
            let applied = state.apply(event, followed, after, Instant::now(), self.silence);
            (applied, state.last_heard)
        };
        let counter = match applied {
            Applied::Invalidation => &self.counters.invalidations,
            Applied::Reset => &self.counters.resets,
            Applied::Heartbeat => return heard,
        };
        counter.fetch_add(1, Relaxed);
        heard
    }

    /// Empties and bypasses the cache until the next stream's first event: an outage (a
    /// drop or silence).
    fn flush(&self) {
        self.flush_marking(false);
    }

    /// [`Near::flush`], and marks the cache `disabled` (refused) when `refused` (else leaves
    /// the mark as it is). Counted when the cache was in use (a reconnection that fails again
    /// before any event has nothing to flush).
    fn flush_marking(&self, refused: bool) {
        let was_healthy = {
            let mut state = lock(&self.state);
            let was_healthy = state.healthy;
            state.flush();
            state.disabled |= refused;
            was_healthy
        };
        if was_healthy {
            self.counters.flushes.fetch_add(1, Relaxed);
        }
    }

    /// The service refused the stream: empty and bypass the cache until a stream asked for
    /// later is granted. Logged at warn the first time only.
    fn disable(&self, status: &tonic::Status) {
        self.flush_marking(true);
        if !self.warned.swap(true, Relaxed) {
            warn!(cause = %describe(status), "cache-money near cache off: the service does not stream invalidations to this client (invalidations off, or no read access to watch); memoize goes to the service every call, and the stream is asked for again every few minutes");
        } else {
            debug!(cause = %describe(status), "cache-money near cache: the invalidation stream is still refused");
        }
    }
}

/// Whether a `Watch` failure is a refusal rather than an outage: invalidations are off
/// (UNIMPLEMENTED), the client may not watch a namespace it uses (PERMISSION_DENIED), or the
/// request itself is refused (INVALID_ARGUMENT: more namespaces than the server's
/// `--max-batch`). Retrying soon would only repeat it; it is retried after a long pause.
fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unimplemented | Code::PermissionDenied | Code::InvalidArgument
    )
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// It failed, ended, or stayed silent: an outage.
    Lost,
    /// It is replaced by one following more namespaces (the copies stay).
    Grown,
    /// The server refused it.
    Refused,
    /// The client is gone.
    Stop,
}

/// The watch task: keeps one stream of the wanted namespaces open (reconnecting with backoff,
/// resuming after `applied`), and applies its events. Holds the near cache weakly, so it ends
/// within one silence period of the client being dropped.
async fn watch(near: Weak<Near>, grown: Arc<Notify>, mut rpc: RawClient) {
    let mut backoff = BACKOFF_FIRST;
    let Some(refused_first) = near.upgrade().map(|near| near.refused_backoff) else {
        return;
    };
    let mut refused = refused_first;
    loop {
        let Some((request, followed, silence)) = near.upgrade().map(|near| {
            let (request, followed) = near.request();
            (request, followed, near.silence)
        }) else {
            return;
        };
        let end = stream(
            &near,
            &grown,
            &mut rpc,
            request,
            &followed,
            silence,
            &mut backoff,
        )
        .await;
        if end == End::Refused {
            if !pause(&near, refused).await {
                return;
            }
            refused = (refused * 2).min(REFUSED_BACKOFF_MAX.max(refused_first));
            continue;
        }
        if backoff == BACKOFF_FIRST {
            // The stream delivered an event: a later refusal starts the long pauses over.
            refused = refused_first;
        }
        let Some(this) = near.upgrade() else { return };
        match end {
            End::Stop | End::Refused => return,
            // The copies stay: the next stream resumes after `applied`. With nothing applied
            // yet (0 asks for "from now on", which would skip what came meanwhile), they go.
            End::Grown => {
                if lock(&this.state).applied == 0 {
                    this.flush();
                }
            }
            End::Lost => {
                this.flush();
                drop(this);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Opens one stream and applies its events until it ends.
async fn stream(
    near: &Weak<Near>,
    grown: &Notify,
    rpc: &mut RawClient,
    request: pb::WatchRequest,
    followed: &BTreeSet<String>,
    silence: Duration,
    backoff: &mut Duration,
) -> End {
    let after = request.after;
    let mut events = match tokio::time::timeout(silence, rpc.watch(request)).await {
        Ok(Ok(reply)) => reply.into_inner(),
        Ok(Err(status)) => return failed(near, &status),
        Err(_) => return End::Lost,
    };
    // Silence is counted from the last heartbeat (or RESET, or the first event), not from
    // the last event: invalidations keep flowing from a server that stopped keeping up. A
    // stream replacing a healthy one carries its clock on.
    let heard = near.upgrade().and_then(|near| near.heard());
    let mut deadline = heard.map_or_else(
        || tokio::time::Instant::now() + silence,
        |heard| tokio::time::Instant::from_std(heard + silence),
    );
    loop {
        tokio::select! {
            () = grown.notified() => {
                let Some(this) = near.upgrade() else { return End::Stop };
                if this.grew(followed) {
                    return End::Grown;
                }
            }
            next = tokio::time::timeout_at(deadline, events.message()) => {
                let Some(this) = near.upgrade() else { return End::Stop };
                match next {
                    Ok(Ok(Some(event))) => {
                        let heard = this.apply(&event, followed, after);
                        deadline = tokio::time::Instant::from_std(heard + silence);
                        *backoff = BACKOFF_FIRST;
                    }
                    Ok(Ok(None)) => return End::Lost,
                    Ok(Err(status)) => return failed(near, &status),
                    Err(_) => {
                        debug!(silence_ms = silence.as_millis() as u64, "cache-money near cache: no heartbeat on the invalidation stream; emptying and reconnecting");
                        return End::Lost;
                    }
                }
            }
        }
    }
}

/// Sleeps `pause` in steps, so a dropped client's task ends within a step; whether the
/// client is still there.
async fn pause(near: &Weak<Near>, pause: Duration) -> bool {
    let until = tokio::time::Instant::now() + pause;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            return near.strong_count() > 0;
        }
        tokio::time::sleep((until - now).min(PAUSE_STEP)).await;
        if near.strong_count() == 0 {
            return false;
        }
    }
}

/// What a failed `Watch` comes to: a long pause (refused), or a reconnection.
fn failed(near: &Weak<Near>, status: &tonic::Status) -> End {
    let Some(this) = near.upgrade() else {
        return End::Stop;
    };
    if is_refusal(status) {
        this.disable(status);
        return End::Refused;
    }
    debug!(cause = %describe(status), "cache-money near cache: the invalidation stream failed; emptying and reconnecting");
    End::Lost
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: Duration = Duration::from_secs(3);

    fn key(function: &str, n: u8) -> EntryKey {
        EntryKey::new("ns".into(), function.into(), format!("{n:032x}")).unwrap()
    }

    fn event(kind: pb::WatchEventKind, position: u64) -> pb::WatchEvent {
        pb::WatchEvent {
            kind: kind as i32,
            position,
            ..Default::default()
        }
    }

    fn heartbeat(position: u64) -> pb::WatchEvent {
        event(pb::WatchEventKind::WatchEventHeartbeat, position)
    }

    fn invalidation(scope: pb::InvalidationScope, key: pb::Key, position: u64) -> pb::WatchEvent {
        pb::WatchEvent {
            scope: scope as i32,
            key: Some(key),
            ..event(pb::WatchEventKind::WatchEventInvalidation, position)
        }
    }

    fn pb_key(namespace: &str, function: &str, digest: &str) -> pb::Key {
        pb::Key {
            namespace: namespace.into(),
            function: function.into(),
            digest: digest.into(),
        }
    }

    fn followed() -> BTreeSet<String> {
        BTreeSet::from(["ns".to_owned()])
    }

    /// A near cache whose service is nowhere (its stream never connects).
    fn unconnected() -> Near {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let rpc =
            pb::cache_money_client::CacheMoneyClient::new(crate::Transport::channel(channel, None));
        Near::new(1 << 20, SILENCE, &[], SILENCE, rpc)
    }

    /// A healthy cache: its stream delivered a first heartbeat at `position`.
    fn healthy(position: u64) -> (Coherence, Instant) {
        let now = Instant::now();
        let mut state = Coherence::new(1 << 20, Evictions::default(), now);
        state.apply(&heartbeat(position), &followed(), 0, now, SILENCE);
        (state, now)
    }

    fn put(state: &mut Coherence, key: &EntryKey, position: u64, now: Instant) -> bool {
        let ticket = state.ticket("ns", now, SILENCE).expect("a ticket");
        let ttl = Duration::from_secs(60);
        state.insert(key.clone(), Bytes::from_static(b"1"), ticket, position, ttl)
    }

    /// A stream replacing a healthy one (more namespaces) keeps the copies but not a fresh
    /// silence clock: its first event, an invalidation replayed, vouches for nothing, so the
    /// copies go when the old stream's last heartbeat is a silence old (second review: each
    /// new namespace used to add a whole silence to the bound).
    #[test]
    fn a_stream_switch_keeps_the_silence_clock() {
        let (mut state, now) = healthy(1);
        assert!(put(&mut state, &key("f", 1), 1, now));
        let more = BTreeSet::from(["ns".to_owned(), "other".to_owned()]);
        let switched = now + SILENCE * 3 / 4;
        let replayed = invalidation(
            pb::InvalidationScope::ScopeEntry,
            pb_key("other", "g", &format!("{:032x}", 2)),
            2,
        );
        state.apply(&replayed, &more, 1, switched, SILENCE);
        assert!(
            state.get(&key("f", 1), switched, SILENCE).is_some(),
            "the copies stay across the switch"
        );
        let past = now + SILENCE;
        assert!(
            state.get(&key("f", 1), past, SILENCE).is_none(),
            "served a silence after the last heartbeat"
        );
    }

    /// A flush is counted once per outage: reconnections that fail before the next stream's
    /// first event have nothing to flush and are not counted again.
    #[tokio::test]
    async fn one_outage_is_one_flush() {
        let near = unconnected();
        near.flush();
        assert_eq!(near.metrics().flushes, 0, "nothing was in use");
        lock(&near.state).apply(&heartbeat(1), &followed(), 0, Instant::now(), SILENCE);
        near.flush();
        near.flush();
        near.flush();
        assert_eq!(
            near.metrics().flushes,
            1,
            "one outage, three failed reconnections"
        );
    }

    /// The near cache's options are checked when the client is made.
    #[test]
    fn options_out_of_range_are_refused() {
        assert!(check_options(DEFAULT_NEAR_CACHE_SILENCE, &["billing.invoices".into()]).is_ok());
        for silence in [Duration::ZERO, Duration::from_millis(99), Duration::MAX] {
            let err = check_options(silence, &[]).unwrap_err();
            assert!(err.to_string().contains("near_cache_silence"), "{err}");
        }
        let err = check_options(DEFAULT_NEAR_CACHE_SILENCE, &["a::b".into()]).unwrap_err();
        assert!(err.to_string().contains("near_cache_namespaces"), "{err}");
    }

    /// Nothing is cached before the stream's first event, nor served.
    #[test]
    fn nothing_before_the_first_event() {
        let now = Instant::now();
        let mut state = Coherence::new(1 << 20, Evictions::default(), now);
        assert!(state.ticket("ns", now, SILENCE).is_none());
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
    }

    /// An answer is inserted only when applied <= its position, and never at position 0.
    #[test]
    fn inserts_only_at_or_after_applied() {
        let (mut state, now) = healthy(10);
        assert!(!put(&mut state, &key("f", 1), 9, now), "older than applied");
        assert!(!put(&mut state, &key("f", 2), 0, now), "unknown position");
        assert!(put(&mut state, &key("f", 3), 10, now), "equal to applied");
        assert!(put(&mut state, &key("f", 4), 11, now), "newer than applied");
        assert!(state.get(&key("f", 3), now, SILENCE).is_some());
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
    }

    /// An invalidation processed while a lookup was in flight keeps its older answer out.
    #[test]
    fn an_invalidation_during_a_lookup_keeps_its_answer_out() {
        let (mut state, now) = healthy(10);
        let ticket = state.ticket("ns", now, SILENCE).unwrap();
        let k = key("f", 1);
        let digest = k.digest().to_owned();
        state.apply(
            &invalidation(
                pb::InvalidationScope::ScopeEntry,
                pb_key("ns", "f", &digest),
                12,
            ),
            &followed(),
            0,
            now,
            SILENCE,
        );
        // The lookup read its value at position 11, before the bust at 12.
        let ttl = Duration::from_secs(60);
        assert!(!state.insert(k.clone(), Bytes::new(), ticket, 11, ttl));
        assert!(state.get(&k, now, SILENCE).is_none());
    }

    /// Invalidations of other keys while a lookup is in flight do not keep its answer out;
    /// one of the same key, or of a scope covering it, does.
    #[test]
    fn only_invalidations_naming_the_key_keep_an_answer_out() {
        let (mut state, now) = healthy(10);
        let ticket = state.ticket("ns", now, SILENCE).unwrap();
        let other = invalidation(
            pb::InvalidationScope::ScopeEntry,
            pb_key("ns", "f", key("f", 2).digest()),
            12,
        );
        state.apply(&other, &followed(), 0, now, SILENCE);
        let g = invalidation(
            pb::InvalidationScope::ScopeFunction,
            pb_key("ns", "g", ""),
            13,
        );
        state.apply(&g, &followed(), 0, now, SILENCE);
        let ttl = Duration::from_secs(60);
        assert!(state.insert(key("f", 1), Bytes::new(), ticket, 11, ttl));
        assert!(!state.insert(key("g", 1), Bytes::new(), ticket, 11, ttl));
        assert!(
            state.insert(key("g", 2), Bytes::new(), ticket, 13, ttl),
            "read after the bust"
        );
        assert!(!state.insert(key("f", 2), Bytes::new(), ticket, 11, ttl));
        assert_eq!(state.applied, 13);
    }

    /// Past the invalidations it remembers, an older answer is kept out whatever it names:
    /// the forgotten ones might have named it.
    #[test]
    fn an_answer_older_than_what_is_remembered_is_kept_out() {
        let (mut state, now) = healthy(10);
        let ticket = state.ticket("ns", now, SILENCE).unwrap();
        for n in 0..=RECENT_INVALIDATIONS as u64 {
            let other = invalidation(
                pb::InvalidationScope::ScopeEntry,
                pb_key("ns", "g", &format!("{n:032x}")),
                12 + n,
            );
            state.apply(&other, &followed(), 0, now, SILENCE);
        }
        assert_eq!(state.recent.len(), RECENT_INVALIDATIONS);
        assert_eq!(state.floor, 12, "the first one is forgotten");
        let ttl = Duration::from_secs(60);
        assert!(!state.insert(key("f", 1), Bytes::new(), ticket, 11, ttl));
        assert!(state.insert(key("f", 2), Bytes::new(), ticket, 12, ttl));
    }

    /// A stream that follows a namespace the previous one did not resumes after `applied`:
    /// it delivers the new namespace's invalidations only from there, so an answer older
    /// than that is kept out.
    #[test]
    fn a_new_stream_covers_only_what_is_after_its_start() {
        let (mut state, now) = healthy(10);
        state.apply(&heartbeat(20), &followed(), 0, now, SILENCE);
        let more = BTreeSet::from(["ns".to_owned(), "new".to_owned()]);
        state.apply(&heartbeat(21), &more, 20, now, SILENCE);
        let ticket = state.ticket("new", now, SILENCE).unwrap();
        let new_key = EntryKey::new("new".into(), "f".into(), format!("{:032x}", 1)).unwrap();
        let ttl = Duration::from_secs(60);
        assert!(!state.insert(new_key.clone(), Bytes::new(), ticket, 19, ttl));
        assert!(state.insert(new_key, Bytes::new(), ticket, 20, ttl));
    }

    /// A RESET empties the cache and sets applied to its position, even a lower one; a
    /// lookup sent before it is not inserted.
    #[test]
    fn a_reset_lowers_applied_and_voids_lookups_in_flight() {
        let (mut state, now) = healthy(100);
        assert!(put(&mut state, &key("f", 1), 100, now));
        let before = state.ticket("ns", now, SILENCE).unwrap();
        state.apply(
            &event(pb::WatchEventKind::WatchEventReset, 5),
            &followed(),
            0,
            now,
            SILENCE,
        );
        assert_eq!(state.applied, 5);
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
        let ttl = Duration::from_secs(60);
        assert!(!state.insert(key("f", 2), Bytes::new(), before, 100, ttl));
        assert!(
            !put(&mut state, &key("f", 3), 6, now),
            "lookups sent within a silence of a lowering RESET are kept out: another replica \
             may still answer them with positions of the old numbering"
        );
        // Heartbeats only raise applied.
        let later = now + SILENCE;
        state.apply(&heartbeat(4), &followed(), 0, later, SILENCE);
        assert_eq!(state.applied, 5, "a lower heartbeat does not lower applied");
        assert!(
            put(&mut state, &key("f", 3), 6, later),
            "then the new numbering's positions count"
        );
    }

    /// Each scope drops exactly what it names.
    #[test]
    fn scopes_drop_what_they_name() {
        let (mut state, now) = healthy(1);
        let (f1, f2, g1) = (key("f", 1), key("f", 2), key("g", 1));
        let other = EntryKey::new("other".into(), "f".into(), format!("{:032x}", 1)).unwrap();
        let fill = |state: &mut Coherence| {
            let position = state.applied;
            for k in [&f1, &f2, &g1] {
                assert!(put(state, k, position, now));
            }
            state.followed.insert("other".into());
            let ticket = state.ticket("other", now, SILENCE).unwrap();
            let ttl = Duration::from_secs(60);
            assert!(state.insert(other.clone(), Bytes::new(), ticket, position, ttl));
        };
        let present = |state: &mut Coherence| {
            [&f1, &f2, &g1, &other].map(|k| state.get(k, now, SILENCE).is_some())
        };
        let cases = [
            (
                invalidation(
                    pb::InvalidationScope::ScopeEntry,
                    pb_key("ns", "f", f1.digest()),
                    2,
                ),
                [false, true, true, true],
            ),
            (
                invalidation(
                    pb::InvalidationScope::ScopeFunction,
                    pb_key("ns", "f", ""),
                    2,
                ),
                [false, false, true, true],
            ),
            (
                invalidation(
                    pb::InvalidationScope::ScopeNamespace,
                    pb_key("ns", "", ""),
                    2,
                ),
                [false, false, false, true],
            ),
            (
                invalidation(pb::InvalidationScope::ScopeAll, pb::Key::default(), 2),
                [false, false, false, false],
            ),
        ];
        for (event, expected) in cases {
            fill(&mut state);
            state.apply(&event, &followed(), 0, now, SILENCE);
            assert_eq!(present(&mut state), expected, "after {event:?}");
        }
    }

    /// A flush bypasses the cache until the next first event; a silent stream is not
    /// served from either.
    #[test]
    fn a_flushed_or_silent_stream_serves_nothing() {
        let (mut state, now) = healthy(1);
        assert!(put(&mut state, &key("f", 1), 1, now));
        let late = now + SILENCE;
        assert!(state.get(&key("f", 1), late, SILENCE).is_none(), "silent");
        assert!(state.ticket("ns", late, SILENCE).is_none());
        state.flush();
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
        assert!(state.ticket("ns", now, SILENCE).is_none());
        state.apply(&heartbeat(2), &followed(), 0, now, SILENCE);
        assert!(state.ticket("ns", now, SILENCE).is_some());
    }

    /// Invalidations do not keep a stream healthy: a server that stopped its heartbeats
    /// (reader behind, a bust owed) may still relay other replicas' invalidations, so only
    /// a heartbeat or RESET restarts the silence.
    #[test]
    fn only_heartbeats_keep_a_stream_healthy() {
        let (mut state, now) = healthy(1);
        assert!(put(&mut state, &key("f", 1), 1, now));
        let mut at = now;
        for position in 2..10 {
            at += SILENCE / 4;
            let other = invalidation(
                pb::InvalidationScope::ScopeEntry,
                pb_key("ns", "g", &format!("{position:032x}")),
                position,
            );
            state.apply(&other, &followed(), 0, at, SILENCE);
        }
        assert!(at >= now + SILENCE);
        assert!(
            state.get(&key("f", 1), at, SILENCE).is_none(),
            "still served"
        );
        assert!(state.ticket("ns", at, SILENCE).is_none());
        state.apply(&heartbeat(10), &followed(), 0, at, SILENCE);
        assert!(
            state.ticket("ns", at, SILENCE).is_some(),
            "a heartbeat makes the stream usable again"
        );
        assert!(
            state.get(&key("f", 1), at, SILENCE).is_none(),
            "but what was copied before the silence passed is gone: nothing vouched for it"
        );
    }

    /// A copy expires when its entry would: the lookup's send time plus the time left.
    #[test]
    fn copies_expire_with_their_entries() {
        let (mut state, now) = healthy(1);
        let ticket = state.ticket("ns", now, SILENCE).unwrap();
        let k = key("f", 1);
        assert!(state.insert(
            k.clone(),
            Bytes::new(),
            ticket,
            1,
            Duration::from_millis(50)
        ));
        assert!(
            state
                .get(&k, now + Duration::from_millis(49), SILENCE)
                .is_some()
        );
        assert!(
            state
                .get(&k, now + Duration::from_millis(50), SILENCE)
                .is_none()
        );
    }

    /// This client's own bust drops its copies and keeps lookups sent before it out.
    #[test]
    fn own_busts_drop_at_once_and_void_lookups_in_flight() {
        let (mut state, now) = healthy(1);
        assert!(put(&mut state, &key("f", 1), 1, now));
        let before = state.ticket("ns", now, SILENCE).unwrap();
        state.own_change(&Scope::Function("ns".into(), "f".into()));
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
        let ttl = Duration::from_secs(60);
        assert!(!state.insert(key("f", 2), Bytes::new(), before, 2, ttl));
    }

    /// Copies are pushed out to fit the size, and counted.
    #[test]
    fn the_size_bounds_the_copies() {
        let evictions = Evictions::default();
        let now = Instant::now();
        let mut state = Coherence::new(4096, evictions.clone(), now);
        state.apply(&heartbeat(1), &followed(), 0, now, SILENCE);
        for n in 0..100 {
            let ticket = state.ticket("ns", now, SILENCE).unwrap();
            let value = Bytes::from(vec![b'x'; 100]);
            state.insert(key("f", n), value, ticket, 1, Duration::from_secs(60));
        }
        assert!(state.copies.weight() <= 4096);
        assert!(evictions.0.load(Relaxed) > 0);
    }

    /// A namespace's or a function's invalidation hides exactly the copies inserted before
    /// it in that namespace or function, without walking the copies (they go as they are
    /// looked up), whatever order drops and inserts come in.
    #[test]
    fn scoped_invalidations_hide_the_older_copies_of_their_scope() {
        let now = Instant::now();
        let both = BTreeSet::from(["ns".to_owned(), "other".to_owned()]);
        let mut state = Coherence::new(1 << 20, Evictions::default(), now);
        state.apply(&heartbeat(1), &both, 0, now, SILENCE);
        let ttl = Duration::from_secs(60);
        let put = |state: &mut Coherence, key: &EntryKey, position: u64| {
            let ticket = state.ticket(key.namespace(), now, SILENCE).unwrap();
            assert!(state.insert(key.clone(), Bytes::from_static(b"1"), ticket, position, ttl));
        };
        let served = |state: &mut Coherence, key: &EntryKey| state.get(key, now, SILENCE).is_some();
        let elsewhere = EntryKey::new("other".into(), "f".into(), format!("{:032x}", 1)).unwrap();
        for n in 0..100 {
            put(&mut state, &key("f", n), 1);
            put(&mut state, &key("g", n), 1);
        }
        put(&mut state, &elsewhere, 1);

        let namespace = invalidation(
            pb::InvalidationScope::ScopeNamespace,
            pb_key("ns", "", ""),
            2,
        );
        state.apply(&namespace, &both, 0, now, SILENCE);
        assert_eq!(
            state.copies.len(),
            201,
            "a namespace's invalidation walked the copies"
        );
        put(&mut state, &key("g", 200), 3);
        assert!(!served(&mut state, &key("f", 1)));
        assert!(!served(&mut state, &key("g", 99)));
        assert!(
            served(&mut state, &key("g", 200)),
            "a copy inserted after it"
        );
        assert!(served(&mut state, &elsewhere), "another namespace's copy");
        assert_eq!(
            state.copies.len(),
            200,
            "the two hidden copies looked up are gone"
        );

        put(&mut state, &key("f", 1), 4);
        let function = invalidation(
            pb::InvalidationScope::ScopeFunction,
            pb_key("ns", "g", ""),
            5,
        );
        state.apply(&function, &both, 0, now, SILENCE);
        assert!(served(&mut state, &key("f", 1)), "another function's copy");
        assert!(!served(&mut state, &key("g", 200)));
        put(&mut state, &key("g", 200), 6);
        assert!(
            served(&mut state, &key("g", 200)),
            "a copy inserted after it"
        );
        // A second invalidation of the namespace outranks the function's.
        state.apply(
            &invalidation(
                pb::InvalidationScope::ScopeNamespace,
                pb_key("ns", "", ""),
                7,
            ),
            &both,
            0,
            now,
            SILENCE,
        );
        assert!(!served(&mut state, &key("g", 200)));
        assert!(!served(&mut state, &key("f", 1)));
        assert!(served(&mut state, &elsewhere));
    }

    /// Past [`MAX_DROPPED_SCOPES`] remembered drops, a new one walks the copies once: what
    /// the table hid and what the new drop names go, every other copy stays, and the table
    /// starts afresh. A drop of a scope already remembered only updates it.
    #[test]
    fn the_drops_remembered_are_bounded() {
        let (mut state, now) = healthy(1);
        assert!(put(&mut state, &key("f", 1), 1, now));
        assert!(put(&mut state, &key("g", 1), 1, now));
        assert!(put(&mut state, &key("busted7", 1), 1, now));
        // The namespace and MAX - 1 functions: the table is full.
        for n in 0..MAX_DROPPED_SCOPES - 1 {
            state.own_change(&Scope::Function("ns".into(), format!("busted{n}")));
        }
        let remembered =
            |state: &Coherence| state.dropped.namespaces.len() + state.dropped.function_count;
        assert_eq!(remembered(&state), MAX_DROPPED_SCOPES);
        // A scope remembered already is dropped again: its entry is updated, and hides the
        // copies inserted before this drop.
        assert!(put(&mut state, &key("busted0", 1), 1, now));
        state.own_change(&Scope::Function("ns".into(), "busted0".into()));
        assert_eq!(
            remembered(&state),
            MAX_DROPPED_SCOPES,
            "a drop again updates"
        );
        assert_eq!(state.copies.len(), 4, "nothing was walked");
        assert!(state.get(&key("busted0", 1), now, SILENCE).is_none());
        assert!(put(&mut state, &key("h", 1), 1, now));
        state.own_change(&Scope::Function("ns".into(), "g".into()));
        assert_eq!(remembered(&state), 0, "the table starts afresh");
        assert_eq!(
            state.copies.len(),
            2,
            "the copies the table hid and the new drop's went at once"
        );
        assert!(state.get(&key("g", 1), now, SILENCE).is_none());
        assert!(
            state.get(&key("f", 1), now, SILENCE).is_some(),
            "a live copy was kept"
        );
        assert!(
            state.get(&key("h", 1), now, SILENCE).is_some(),
            "a live copy was kept"
        );
        // Full again: a namespace's drop is taken (it replaces its functions' entries).
        for n in 0..MAX_DROPPED_SCOPES - 1 {
            state.own_change(&Scope::Function("ns".into(), format!("busted{n}")));
        }
        assert_eq!(remembered(&state), MAX_DROPPED_SCOPES);
        state.own_change(&Scope::Namespace("ns".into()));
        assert_eq!(remembered(&state), 1);
        assert_eq!(state.copies.len(), 2, "nothing was walked");
        assert!(state.get(&key("f", 1), now, SILENCE).is_none());
        assert!(state.get(&key("h", 1), now, SILENCE).is_none());
    }

    /// A copy keeps its value in an allocation of its own: an answer's value is a slice of
    /// the buffer its whole response was decoded into, which a copy must not keep alive.
    #[tokio::test]
    async fn a_copy_does_not_keep_its_response_buffer() {
        let near = Arc::new(unconnected());
        // The watch task started (it runs at this test's first await, which never comes), so
        // `offer` does not start one, which would flush.
        near.watching(false);
        lock(&near.state).apply(&heartbeat(1), &followed(), 0, Instant::now(), SILENCE);
        let response = Bytes::from(vec![b'x'; 8192]);
        let value = response.slice(100..170);
        let ticket = near.ticket("ns");
        assert!(ticket.is_some());
        near.offer(&key("f", 1), value.clone(), ticket, 1, 60_000);
        let held = near.get(&key("f", 1)).expect("the copy");
        assert_eq!(held, value);
        assert!(
            !response.as_ptr_range().contains(&held.as_ptr()),
            "the copy points into the 8 KiB response buffer"
        );
    }
}
