//! The in-memory store: what the server uses when no Redis is configured, so the quick start
//! needs nothing installed. Same rules as Redis: every entry expires, busts are exact.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;

use super::lease::placeholder_life;
use super::{
    Acquired, Found, KeyInfo, KeysPage, LeaseAsk, MemoryState, Meta, NewEntry, Scope, Seen, Store,
    StoreError, StoreState,
};
use crate::key::{EntryKey, FunctionKey, check_digest};
use crate::lock;
use crate::server::metrics::Metrics;
use crate::server::watch::{Invalidation, Published, Ring};

/// The `command` label values of `cache_money_store_command_duration_seconds` for the
/// in-memory store: one per operation, as the README lists them.
pub const MEMORY_COMMANDS: [&str; 11] = [
    "get",
    "lease",
    "put_leased",
    "release",
    "get_many",
    "value_bytes",
    "put",
    "put_many",
    "bust",
    "bust_tag",
    "keys",
];

/// How often expired entries are swept out. Reads never see them either way; this only bounds
/// how long their memory stays counted.
const PURGE_INTERVAL: Duration = Duration::from_millis(250);

/// Bytes charged per entry on top of its key and value, for the map's own bookkeeping.
const ENTRY_OVERHEAD: usize = 96;

/// Bytes charged per tag of an entry on top of the tag's own bytes: the tag kept with the
/// entry, and the entry's key in the tag's index.
const TAG_OVERHEAD: usize = 64;

/// Entries in a process-local ordered map. Cloning is shallow.
///
/// Keys are `namespace:function:digest`. Names cannot contain `:`, so one function's entries
/// are exactly the range starting at `namespace:function:`, and a namespace's the range
/// starting at `namespace:`. Unlike Redis, the map holds nothing but keys built from
/// validated [`EntryKey`]s, so a bust needs no grammar check: every key in a range is an
/// entry of that scope. When the byte budget is reached, the entries closest to expiry
/// make room (Redis's `volatile-ttl`), since a cache that refuses writes helps nobody.
///
/// Tags are indexed per `namespace:tag`; an entry leaves its tags' indexes whenever it leaves
/// the map (bust, expiry sweep, eviction, overwrite), so the indexes hold live entries only and
/// an entry overwritten with other tags is no longer busted by its old ones. Each tag is
/// charged to its entry's bytes, so the budget bounds the indexes too.
///
/// Leases, stale copies and placeholders follow the Redis stores' rules exactly (see
/// [`lease`](super::lease)), on the map's own clock: an entry's `expires_at` includes its
/// stale window, and a lease placeholder is an entry without a value.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Mutex<State>>,
    metrics: Metrics,
    /// The invalidation sequence: this process is the whole fleet.
    invalidations: Arc<Ring>,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    expires_at: Instant,
    /// Tells apart two entries expiring at the same instant in `expirations`.
    seq: u64,
    /// Its tags, to find its place in their indexes when it goes.
    tags: Vec<String>,
    /// The TTL it was written with.
    ttl: Duration,
    /// How long past its TTL it is kept; included in `expires_at`.
    stale: Duration,
    /// Its writer's compute time, ms.
    compute_ms: u32,
    /// A lease placeholder: no value, only `lease`.
    placeholder: bool,
    /// The lease held on the key: its token and when it expires.
    lease: Option<(u64, Instant)>,
}

impl Entry {
    /// A value written with neither a stale window nor a compute time: as Redis stores it
    /// plainly, it has no lease slot.
    fn plain(&self) -> bool {
        !self.placeholder && self.stale.is_zero() && self.compute_ms == 0
    }

    fn meta(&self) -> Meta {
        Meta {
            ttl: (!self.plain()).then_some(self.ttl),
            compute_ms: self.compute_ms,
        }
    }

    /// What a lookup finds in it at `now` (it is not past `expires_at`), its time left
    /// included.
    fn found(&self, now: Instant) -> Found {
        if self.placeholder {
            return Found::Absent;
        }
        let value = self.value.clone();
        let meta = self.meta();
        match (self.expires_at - self.stale).checked_duration_since(now) {
            Some(left) if !left.is_zero() => Found::Live {
                value,
                left: Some(left),
                meta,
            },
            _ => Found::Stale { value, meta },
        }
    }
}

#[derive(Debug)]
struct State {
    entries: BTreeMap<String, Entry>,
    /// (expiry, seq) → key: the next entry to expire (or to evict) is the first.
    expirations: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
    /// `namespace:tag` → the map keys of the entries carrying it. Names hold no `:`, so the
    /// first `:` ends the namespace.
    tags: HashMap<String, BTreeSet<String>>,
    bytes: usize,
    max_bytes: usize,
}

fn charge(key: &str, value: &[u8], tags: &[String]) -> usize {
    let tags: usize = tags.iter().map(|tag| tag.len() + TAG_OVERHEAD).sum();
    key.len() + value.len() + ENTRY_OVERHEAD + tags
}

/// The key of the index of `tag` in `namespace`.
fn tag_index(namespace: &str, tag: &str) -> String {
    format!("{namespace}:{tag}")
}

/// The namespace part of a map key.
fn namespace_of(key: &str) -> &str {
    key.split_once(':').map_or(key, |(namespace, _)| namespace)
}

impl State {
    /// Removes one entry and every trace of it: its expiry, its tags' index places, its bytes.
    fn remove(&mut self, key: &str) -> bool {
        self.take(key).is_some()
    }

    /// Removes one entry and every trace of it, returning it.
    fn take(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.expirations.remove(&(entry.expires_at, entry.seq));
        self.bytes -= charge(key, &entry.value, &entry.tags);
        for tag in &entry.tags {
            let index = tag_index(namespace_of(key), tag);
            if let Some(members) = self.tags.get_mut(&index) {
                members.remove(key);
                if members.is_empty() {
                    self.tags.remove(&index);
                }
            }
        }
        Some(entry)
    }

    /// The key's entry while it is kept (a lease placeholder and a stale copy included).
    fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        self.entries.get(key).filter(|entry| entry.expires_at > now)
    }

    /// What a lookup of `key` finds at `now`.
    fn found(&self, key: &str, now: Instant) -> Found {
        self.live(key, now)
            .map_or(Found::Absent, |entry| entry.found(now))
    }

    /// Stores a copy of `value`: a value decoded from a request is a slice of the whole
    /// request's buffer, so keeping the slice would keep (say) an 8 MiB `PutMany` alive for
    /// one surviving 1-byte entry, while the budget counted only the byte.
    fn insert(&mut self, entry: &NewEntry, now: Instant) {
        self.place(
            map_key(&entry.key),
            Entry {
                value: Bytes::copy_from_slice(&entry.value),
                expires_at: now + entry.kept_for(),
                seq: 0,
                tags: entry.tags.clone(),
                ttl: entry.ttl,
                stale: entry.stale,
                compute_ms: entry.compute_ms,
                placeholder: false,
                lease: None,
            },
        );
    }

    /// Puts `entry` under `key` in place of whatever was there, making room in the budget.
    fn place(&mut self, key: String, mut entry: Entry) {
        self.remove(&key);
        let cost = charge(&key, &entry.value, &entry.tags);
        while self.bytes + cost > self.max_bytes {
            let Some((_, victim)) = self.expirations.pop_first() else {
                break;
            };
            self.remove(&victim);
        }
        entry.seq = self.next_seq;
        self.next_seq += 1;
        self.expirations
            .insert((entry.expires_at, entry.seq), key.clone());
        for tag in &entry.tags {
            self.tags
                .entry(tag_index(namespace_of(&key), tag))
                .or_default()
                .insert(key.clone());
        }
        self.entries.insert(key, entry);
        self.bytes += cost;
    }

    /// Decides `key`'s lease for `ask`, as [`lease::ACQUIRE_SCRIPT`] does in Redis.
    ///
    /// [`lease::ACQUIRE_SCRIPT`]: super::lease::ACQUIRE_SCRIPT
    ///
    /// `tags`, those its result will be written with, are added to the entry's (a placeholder's
    /// only tags), so a BustTag of any of them voids the lease.
    fn acquire(&mut self, key: &str, ask: LeaseAsk, tags: &[String], now: Instant) -> Acquired {
        let lease = Some((ask.token, now + ask.lease));
        let life = placeholder_life(ask.lease);
        let Some(entry) = self.live(key, now) else {
            self.place(
                key.to_owned(),
                Entry {
                    value: Bytes::new(),
                    expires_at: now + life,
                    seq: 0,
                    tags: tags.to_vec(),
                    ttl: Duration::ZERO,
                    stale: Duration::ZERO,
                    compute_ms: 0,
                    placeholder: true,
                    lease,
                },
            );
            return Acquired::Won {
                seen: Seen::Nothing,
                took_over: false,
            };
        };
        if entry.plain() {
            return Acquired::Live;
        }
        let seen = if entry.placeholder {
            Seen::Nothing
        } else {
            Seen::Value
        };
        if matches!(entry.found(now), Found::Live { .. }) && !ask.refresh {
            return Acquired::Live;
        }
        if let Some((_, until)) = entry.lease
            && until > now
        {
            return Acquired::Held {
                seen,
                left: until - now,
            };
        }
        let took_over = entry.lease.is_some();
        let mut entry = self.take(key).expect("found above");
        entry.lease = lease;
        for tag in tags {
            if !entry.tags.contains(tag) {
                entry.tags.push(tag.clone());
            }
        }
        if entry.placeholder {
            entry.expires_at = now + life;
        } else if entry.expires_at < now + life {
            // A lease must not die with the value it was won on: keep the value a
            // placeholder's life, the extra time in its stale window, so it is live exactly as
            // long as before (as the acquire script does in Redis).
            entry.stale += now + life - entry.expires_at;
            entry.expires_at = now + life;
        }
        self.place(key.to_owned(), entry);
        Acquired::Won { seen, took_over }
    }

    /// Whether `key` holds the lease `token` at `now`.
    fn holds(&self, key: &str, token: u64, now: Instant) -> bool {
        self.live(key, now)
            .and_then(|entry| entry.lease)
            .is_some_and(|(holder, _)| holder == token)
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(entry) = self.expirations.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.remove(&key);
        }
    }

    /// Removes every key starting with `prefix` (empty: all), returning how many were live.
    fn remove_prefixed(&mut self, prefix: &str, now: Instant) -> u64 {
        let doomed: Vec<String> = self
            .entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect();
        self.remove_all(doomed, now)
    }

    /// Removes the entries under `keys`, returning how many were live.
    fn remove_all(&mut self, keys: impl IntoIterator<Item = String>, now: Instant) -> u64 {
        let mut live = 0;
        for key in keys {
            if self.live(&key, now).is_some() {
                live += 1;
            }
            self.remove(&key);
        }
        live
    }
}

fn map_key(key: &EntryKey) -> String {
    key.to_string()
}

fn function_prefix(function: &FunctionKey) -> String {
    format!("{}:{}:", function.namespace(), function.function())
}

impl MemoryStore {
    /// An empty store that holds at most `max_bytes` (keys, values and bookkeeping).
    ///
    /// Must be called inside a Tokio runtime: it starts the task that sweeps expired entries,
    /// which ends when the last clone of the store is dropped.
    pub fn new(max_bytes: usize) -> Self {
        let shared = Arc::new(Mutex::new(State {
            entries: BTreeMap::new(),
            expirations: BTreeMap::new(),
            next_seq: 0,
            tags: HashMap::new(),
            bytes: 0,
            max_bytes,
        }));
        tokio::spawn(purge_expired(Arc::downgrade(&shared)));
        MemoryStore {
            shared,
            metrics: Metrics::disabled(),
            invalidations: Arc::new(Ring::new(crate::server::config::DEFAULT_WATCH_STREAM_LEN)),
        }
    }

    /// The same store, keeping the last `len` invalidations for watchers to resume from.
    pub fn with_watch_len(self, len: usize) -> Self {
        MemoryStore {
            invalidations: Arc::new(Ring::new(len)),
            ..self
        }
    }

    /// The same store, timing its commands into `metrics`.
    pub fn with_metrics(self, metrics: Metrics) -> Self {
        MemoryStore { metrics, ..self }
    }

    fn locked(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every mutation is
        // completed before anything that can panic), so a poisoned lock is still usable.
        lock(&self.shared)
    }

    /// Runs `work` on the entries at one instant, timed as `command` (one of
    /// [`MEMORY_COMMANDS`]).
    fn timed<T>(&self, command: &'static str, work: impl FnOnce(&mut State, Instant) -> T) -> T {
        debug_assert!(MEMORY_COMMANDS.contains(&command), "{command}");
        let started = self.metrics.start();
        let result = work(&mut self.locked(), Instant::now());
        self.metrics.store_command(command, started);
        result
    }
}

async fn purge_expired(shared: Weak<Mutex<State>>) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        lock(&shared).purge_expired(Instant::now());
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn lookup(&self, key: &EntryKey, left: bool) -> Result<Found, StoreError> {
        let mut found = self.timed("get", |state, now| state.found(&map_key(key), now));
        // Reported only when asked, as by Redis (whose PTTL costs a command).
        if let Found::Live { left: known, .. } = &mut found
            && !left
        {
            *known = None;
        }
        Ok(found)
    }

    async fn acquire(
        &self,
        key: &EntryKey,
        ask: LeaseAsk,
        tags: &[String],
    ) -> Result<Acquired, StoreError> {
        Ok(self.timed("lease", |state, now| {
            state.acquire(&map_key(key), ask, tags, now)
        }))
    }

    async fn put_leased(&self, entry: &NewEntry, token: u64) -> Result<bool, StoreError> {
        Ok(self.timed("put_leased", |state, now| {
            let held = state.holds(&map_key(&entry.key), token, now);
            if held {
                state.insert(entry, now);
            }
            held
        }))
    }

    async fn release(&self, key: &EntryKey, token: u64) -> Result<bool, StoreError> {
        Ok(self.timed("release", |state, now| {
            let key = map_key(key);
            if !state.holds(&key, token, now) {
                return false;
            }
            match state.entries.get_mut(&key) {
                Some(entry) if entry.placeholder => {
                    state.remove(&key);
                }
                Some(entry) => entry.lease = None,
                None => {}
            }
            true
        }))
    }

    async fn get_many(&self, keys: &[EntryKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        Ok(self.timed("get_many", |state, now| {
            keys.iter()
                .map(|key| state.found(&map_key(key), now).live())
                .collect()
        }))
    }

    async fn value_bytes(&self, keys: &[EntryKey]) -> Result<u64, StoreError> {
        Ok(self.timed("value_bytes", |state, now| {
            keys.iter()
                .filter_map(|key| state.found(&map_key(key), now).live())
                .map(|value| value.len() as u64)
                .sum()
        }))
    }

    async fn put(&self, entry: &NewEntry) -> Result<(), StoreError> {
        self.timed("put", |state, now| state.insert(entry, now));
        Ok(())
    }

    async fn put_many(&self, entries: &[NewEntry]) -> Result<(), StoreError> {
        self.timed("put_many", |state, now| {
            for entry in entries {
                state.insert(entry, now);
            }
        });
        Ok(())
    }

    async fn bust(&self, scope: Scope<'_>) -> Result<u64, StoreError> {
        Ok(self.timed("bust", |state, now| match scope {
            Scope::Entry(key) => {
                let key = map_key(key);
                let live = state.live(&key, now).is_some();
                state.remove(&key);
                u64::from(live)
            }
            Scope::Function(function) => state.remove_prefixed(&function_prefix(function), now),
            Scope::Namespace(namespace) => state.remove_prefixed(&format!("{namespace}:"), now),
            Scope::All => state.remove_prefixed("", now),
        }))
    }

    async fn bust_tag(&self, namespace: &str, tag: &str) -> Result<u64, StoreError> {
        Ok(self.timed("bust_tag", |state, now| {
            match state.tags.remove(&tag_index(namespace, tag)) {
                Some(members) => state.remove_all(members, now),
                None => 0,
            }
        }))
    }

    async fn keys(
        &self,
        function: &FunctionKey,
        cursor: &str,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        if !cursor.is_empty() && check_digest("cursor", cursor).is_err() {
            return Err(StoreError::InvalidCursor(cursor.to_owned()));
        }
        let prefix = function_prefix(function);
        // The cursor is the last digest handed out; the page starts just after it.
        let start = format!("{prefix}{cursor}");
        let lower = if cursor.is_empty() {
            Bound::Included(start.as_str())
        } else {
            Bound::Excluded(start.as_str())
        };
        self.timed("keys", |state, now| {
            let mut live = state
                .entries
                .range::<str, _>((lower, Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(&prefix))
                .filter_map(|(key, entry)| match entry.found(now) {
                    Found::Live {
                        left: Some(left), ..
                    } if entry.expires_at > now => Some(KeyInfo {
                        digest: key[prefix.len()..].to_owned(),
                        ttl: left,
                    }),
                    _ => None,
                });
            let entries: Vec<KeyInfo> = live.by_ref().take(limit).collect();
            let next_cursor = match (live.next(), entries.last()) {
                (Some(_), Some(last)) => last.digest.clone(),
                _ => String::new(),
            };
            Ok(KeysPage {
                entries,
                next_cursor,
            })
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn publish(&self, invalidations: &[Invalidation]) -> Result<u64, StoreError> {
        Ok(self.invalidations.publish(invalidations))
    }

    async fn read_invalidations(
        &self,
        after: u64,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Published>, StoreError> {
        Ok(match block {
            Some(block) => self.invalidations.read_waiting(after, count, block).await,
            None => self.invalidations.read(after, count),
        })
    }

    async fn invalidation_tail(&self) -> Result<u64, StoreError> {
        Ok(self.invalidations.tail())
    }

    fn state(&self) -> StoreState {
        let state = self.locked();
        StoreState {
            in_flight: 0,
            pool: None,
            memory: Some(MemoryState {
                entries: state.entries.len() as u64,
                bytes: state.bytes as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(function: &str, n: u32) -> EntryKey {
        EntryKey::new("ns".into(), function.into(), format!("{n:032x}")).unwrap()
    }

    fn entry(function: &str, n: u32, value: &'static [u8], ttl: Duration) -> NewEntry {
        NewEntry::new(key(function, n), Bytes::from_static(value), ttl)
    }

    fn tagged(function: &str, n: u32, ttl: Duration, tags: &[&str]) -> NewEntry {
        NewEntry {
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            ..entry(function, n, b"v", ttl)
        }
    }

    /// The byte budget holds: the entry closest to expiry is evicted to make room.
    #[tokio::test]
    async fn full_store_evicts_soonest_expiring() {
        let one = charge(&key("f", 0).to_string(), b"v", &[]);
        let store = MemoryStore::new(one * 2);
        store
            .put(&entry("f", 0, b"v", Duration::from_secs(10)))
            .await
            .unwrap();
        store
            .put(&entry("f", 1, b"v", Duration::from_secs(5)))
            .await
            .unwrap();
        store
            .put(&entry("f", 2, b"v", Duration::from_secs(20)))
            .await
            .unwrap();
        assert!(
            store.get(&key("f", 1)).await.unwrap().is_none(),
            "soonest to expire goes"
        );
        assert!(store.get(&key("f", 0)).await.unwrap().is_some());
        assert!(store.get(&key("f", 2)).await.unwrap().is_some());
        assert_eq!(store.locked().bytes, one * 2);
    }

    /// Overwriting an entry replaces its charge and expiry instead of adding to them.
    #[tokio::test]
    async fn overwrite_keeps_accounting_exact() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(&entry("f", 0, b"first", Duration::from_secs(1)))
            .await
            .unwrap();
        store
            .put(&entry("f", 0, b"second", Duration::from_secs(60)))
            .await
            .unwrap();
        let state = store.locked();
        assert_eq!(state.entries.len(), 1);
        assert_eq!(state.expirations.len(), 1);
        assert_eq!(
            state.bytes,
            charge(&key("f", 0).to_string(), b"second", &[])
        );
    }

    /// Expired entries are invisible at once and swept from memory by the purge task.
    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(&entry("f", 0, b"v", Duration::from_secs(1)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(store.get(&key("f", 0)).await.unwrap().is_none());
        tokio::time::sleep(PURGE_INTERVAL * 2).await;
        assert_eq!(store.locked().entries.len(), 0);
        assert_eq!(store.locked().bytes, 0);
    }

    /// Tagged entries' tag bookkeeping goes with them when they expire: the sweep leaves no
    /// index behind and the byte count returns to zero.
    #[tokio::test(start_paused = true)]
    async fn tag_indexes_expire_with_their_entries() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(&tagged(
                "f",
                0,
                Duration::from_secs(1),
                &["user:7", "org:1"],
            ))
            .await
            .unwrap();
        store
            .put(&tagged("g", 0, Duration::from_secs(2), &["user:7"]))
            .await
            .unwrap();
        assert_eq!(store.locked().tags.len(), 2);
        assert!(store.locked().bytes > 0);
        tokio::time::advance(Duration::from_millis(1001)).await;
        tokio::time::sleep(PURGE_INTERVAL * 2).await;
        assert_eq!(
            store.locked().tags.len(),
            1,
            "org:1 outlived its only entry"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::time::sleep(PURGE_INTERVAL * 2).await;
        let state = store.locked();
        assert!(state.tags.is_empty(), "{:?}", state.tags);
        assert_eq!((state.entries.len(), state.bytes), (0, 0));
    }

    /// Tags are charged to the budget, and an entry evicted to make room leaves its indexes.
    #[tokio::test]
    async fn tags_are_charged_and_evicted() {
        let tags = ["t".repeat(100)];
        let plain = charge(&key("f", 0).to_string(), b"v", &[]);
        let one = charge(&key("f", 0).to_string(), b"v", &tags);
        assert_eq!(one, plain + 100 + TAG_OVERHEAD);
        let store = MemoryStore::new(one * 2);
        for n in 0..3 {
            let ttl = Duration::from_secs(10 + u64::from(n));
            store.put(&tagged("f", n, ttl, &[&tags[0]])).await.unwrap();
        }
        assert!(store.get(&key("f", 0)).await.unwrap().is_none(), "evicted");
        let state = store.locked();
        assert_eq!(state.bytes, one * 2);
        assert_eq!(state.tags[&tag_index("ns", &tags[0])].len(), 2);
    }

    /// Overwriting an entry with other tags takes it out of its old tags' indexes: BustTag of
    /// the old tag leaves it alone.
    #[tokio::test]
    async fn overwrite_moves_an_entry_between_tags() {
        let store = MemoryStore::new(1 << 20);
        let ttl = Duration::from_secs(60);
        store.put(&tagged("f", 0, ttl, &["old"])).await.unwrap();
        store.put(&tagged("f", 0, ttl, &["new"])).await.unwrap();
        assert_eq!(store.bust_tag("ns", "old").await.unwrap(), 0);
        assert!(store.get(&key("f", 0)).await.unwrap().is_some());
        assert_eq!(store.bust_tag("ns", "new").await.unwrap(), 1);
        assert!(store.locked().tags.is_empty());
        assert_eq!(store.locked().bytes, 0);
    }

    /// Paging with a cursor visits every entry of a function once, and no other function's.
    #[tokio::test]
    async fn keys_pages_through_one_function() {
        let store = MemoryStore::new(1 << 20);
        for n in 0..25 {
            store
                .put(&entry("f", n, b"v", Duration::from_secs(60)))
                .await
                .unwrap();
            store
                .put(&entry("f_user", n, b"v", Duration::from_secs(60)))
                .await
                .unwrap();
        }
        let function = key("f", 0).function_key().clone();
        let (mut cursor, mut seen) = (String::new(), Vec::new());
        loop {
            let page = store.keys(&function, &cursor, 10).await.unwrap();
            assert!(page.entries.len() <= 10);
            seen.extend(page.entries.into_iter().map(|info| info.digest));
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor;
        }
        let expected: Vec<String> = (0..25).map(|n| format!("{n:032x}")).collect();
        assert_eq!(seen, expected);
    }
}
