//! The `cache_money.v1.CacheMoney` gRPC service: validates each request, calls the store, and
//! maps store failures to status codes. Nothing reaches the store until the whole request is
//! valid, so a bad request writes nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::key::{EntryKey, FunctionKey, KeyError, check_name, check_tag, check_tags};
use crate::pb::{self, cache_money_server::CacheMoney};
use crate::server::auth::{Access, authorize};
use crate::server::config::InvalidationMode;
use crate::server::metrics::{LeaseEvent, Lookup, Metrics};
use crate::server::observe::{
    Outcome, record_namespace, record_namespaces, request_id, spans_enabled,
};
use crate::server::store::{
    Acquired, Found, LeaseAsk, Meta, NewEntry, Scope, Seen, Store, StoreError, lease,
};
use crate::server::watch::{self, Follow, Hub, Invalidation};

/// Default page size of `Keys`.
pub const DEFAULT_KEYS_LIMIT: usize = 100;
/// Bytes a `GetMany` result adds to its value in the encoded answer (field tags, lengths,
/// the hit flag), with room to spare.
const RESULT_OVERHEAD: usize = 16;
/// Largest page size of `Keys`.
pub const MAX_KEYS_LIMIT: usize = 1000;
/// The longest a lookup told to wait for another caller's lease is asked to wait before
/// looking again: with one waiter per key per client process, 50 processes waiting on one
/// key look about 2,500 times a second, and each learns of the value within this much of its
/// write.
const MAX_RETRY_AFTER: Duration = Duration::from_millis(20);
/// How many times a leased lookup looks again when a value was written between its read and
/// its lease request, before it tells the caller to look again itself.
const LEASE_ATTEMPTS: usize = 3;

/// The request limits the service enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest TTL a write may ask for.
    pub max_ttl_seconds: u32,
    /// Largest value a write may carry.
    pub max_value_bytes: usize,
    /// Most keys or entries in one batch.
    pub max_batch: usize,
    /// Largest encoded `GetMany` response.
    pub max_response_bytes: usize,
    /// Most tags on one write.
    pub max_tags: usize,
    /// Longest tag, in bytes.
    pub max_tag_bytes: usize,
    /// Longest lease a Get may ask for.
    pub max_lease: Duration,
}

/// Counters behind the `Stats` RPC.
#[derive(Debug)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    busts: AtomicU64,
    busted_entries: AtomicU64,
    errors: AtomicU64,
    leases_won: AtomicU64,
    lease_waits: AtomicU64,
    leases_expired: AtomicU64,
    stale_writes_refused: AtomicU64,
    stale_served: AtomicU64,
    refreshes: AtomicU64,
    started: Instant,
}

/// What a Get asks for beyond a plain lookup.
#[derive(Debug, Clone, Default)]
struct Ask {
    lease: Option<Duration>,
    refresh_after: Option<Duration>,
    beta: Option<f64>,
    allow_stale: bool,
    /// Whether the caller asked for a hit's time left (`want_ttl`: a near cache).
    want_ttl: bool,
    /// The tags a leased result will be written with, validated, without repeats.
    tags: Vec<String>,
}

impl Ask {
    /// Whether the lookup needs a live value's time left: to tell whether it is due, and
    /// (with `allow_stale`, whose caller writes stale windows) to tell a value kept past its
    /// TTL from a live one in the same round trip), or to report it (`want_ttl`).
    fn needs_left(&self) -> bool {
        self.want_ttl || self.refresh_after.is_some() || self.beta.is_some() || self.allow_stale
    }

    /// Whether a live entry with `left` of its TTL to go and written with `meta` is due for
    /// recomputation: old enough, or XFetch's draw says so. A value written without a compute
    /// time or stale window (plainly) has no lease slot and is never due.
    fn due(&self, left: Option<Duration>, meta: Meta) -> bool {
        let (Some(ttl), Some(left)) = (meta.ttl, left) else {
            return false;
        };
        if self
            .refresh_after
            .is_some_and(|after| ttl.saturating_sub(left) >= after)
        {
            return true;
        }
        self.beta.is_some_and(|beta| {
            // U uniform in (0, 1]: -ln(U) is an exponential draw of mean 1.
            let draw = -(1.0 - fastrand::f64()).ln();
            f64::from(meta.compute_ms) * beta * draw >= left.as_secs_f64() * 1000.0
        })
    }
}

/// A hit's answer.
fn hit(value: Bytes, left: Option<Duration>, meta: Meta) -> pb::GetResponse {
    pb::GetResponse {
        hit: true,
        value,
        compute_ms: meta.compute_ms,
        ttl_ms: left.map_or(0, |left| left.as_millis() as u64),
        ..Default::default()
    }
}

/// A miss's answer, with the stale value when there is one to give.
fn miss(stale: Option<(Bytes, Meta)>) -> pb::GetResponse {
    match stale {
        Some((value, meta)) => pb::GetResponse {
            stale: true,
            value,
            compute_ms: meta.compute_ms,
            ..Default::default()
        },
        None => pb::GetResponse::default(),
    }
}

/// A change whose invalidation is not yet known to be published: dropped armed (the
/// handler's future was dropped between the change and its publish, as tonic does when the
/// caller's deadline passes or at the drain timeout), it makes the hub owe a bust of
/// everything ([`Hub::owe`]), so the invalidation is never lost silently. Made before the
/// change; disarmed once the publish's outcome is in hand (a failure is then owed, or handed
/// to a task, by the code that saw it).
struct Unpublished<'a, S: Store> {
    hub: &'a Hub,
    store: &'a S,
    armed: bool,
}

impl<'a, S: Store> Unpublished<'a, S> {
    fn new(hub: &'a Hub, store: &'a S) -> Self {
        let armed = hub.mode() != InvalidationMode::Off;
        Unpublished { hub, store, armed }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<S: Store> Drop for Unpublished<'_, S> {
    fn drop(&mut self) {
        // `owe` spawns its payer: only within a runtime (a handler is dropped within one).
        if self.armed && tokio::runtime::Handle::try_current().is_ok() {
            self.hub.owe(self.store.clone());
        }
    }
}

/// The gRPC service over a store. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    store: S,
    limits: Limits,
    counters: Arc<Counters>,
    store_up: Arc<AtomicBool>,
    /// Whether requests carry a grant to check (the auth interceptor runs in front).
    auth_enabled: bool,
    metrics: Metrics,
    /// The invalidation sequence's reader and its watchers.
    hub: Hub,
    /// Whether RPC spans are on, so a Get's closing line wants its result ([`Outcome`]). Off,
    /// the response's extensions stay empty: their first entry allocates the map, ≈ 1 % of a
    /// Get's instructions (BENCHMARKS.md, "Instructions per request").
    outcomes: bool,
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        let message = err.to_string();
        match err {
            StoreError::Timeout { .. } | StoreError::Unavailable(_) => Status::unavailable(message),
            StoreError::Overloaded { .. } | StoreError::OutOfMemory(_) => {
                Status::resource_exhausted(message)
            }
            StoreError::InvalidCursor(_) => Status::invalid_argument(message),
            StoreError::StaleCursor(_) => Status::aborted(message),
            StoreError::Internal(_) => Status::internal(message),
        }
    }
}

fn invalid(err: KeyError) -> Status {
    Status::invalid_argument(err.to_string())
}

fn entry_key(key: Option<pb::Key>) -> Result<EntryKey, KeyError> {
    let key = key.unwrap_or_default();
    EntryKey::new(key.namespace, key.function, key.digest)
}

impl<S: Store> CacheService<S> {
    /// A service over `store`. `store_up` is the health monitor's latest verdict, reported by
    /// `Stats`. With `auth_enabled`, every request must carry the grant the auth interceptor
    /// attaches, and each RPC checks it against the namespaces it touches. Lookups, writes,
    /// busts and store failures are recorded into `metrics` as well as counted for `Stats`.
    /// Every write and bust is published to the store's invalidation sequence, which `hub`
    /// reads for the `Watch` streams. Set up logging first: whether RPC spans are on (and a
    /// Get's result is kept for their closing line) is asked of the log filter here.
    pub fn new(
        store: S,
        limits: Limits,
        store_up: Arc<AtomicBool>,
        auth_enabled: bool,
        metrics: Metrics,
        hub: Hub,
    ) -> Self {
        CacheService {
            store,
            limits,
            counters: Arc::new(Counters {
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                puts: AtomicU64::new(0),
                busts: AtomicU64::new(0),
                busted_entries: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                leases_won: AtomicU64::new(0),
                lease_waits: AtomicU64::new(0),
                leases_expired: AtomicU64::new(0),
                stale_writes_refused: AtomicU64::new(0),
                stale_served: AtomicU64::new(0),
                refreshes: AtomicU64::new(0),
                started: Instant::now(),
            }),
            store_up,
            auth_enabled,
            metrics,
            hub,
            outcomes: spans_enabled(),
        }
    }

    /// A write or bust that failed with `err`: its invalidations are still published when
    /// the store was asked at all (a timed-out write may have landed, a bust that failed
    /// halfway removed some entries; a needless invalidation costs a near cache a miss, a
    /// missing one a stale value). Best effort and in the background, so a store that is
    /// timing out does not make the failure take twice as long; then the failure is reported
    /// as usual.
    fn change_failed(
        &self,
        rpc: &'static str,
        context: &tonic::Extensions,
        err: StoreError,
        invalidations: Vec<Invalidation>,
    ) -> Status {
        if !matches!(err, StoreError::Overloaded { .. }) && self.hub.mode() != InvalidationMode::Off
        {
            let (store, hub) = (self.store.clone(), self.hub.clone());
            let request_id = request_id(context).to_owned();
            tokio::spawn(async move {
                match store.publish(&invalidations).await {
                    Ok(_) => hub.published(&invalidations),
                    Err(cause) => {
                        warn!(
                            rpc,
                            request_id,
                            cause = %cause,
                            "the invalidation of a failed change was not published"
                        );
                        hub.owe(store);
                    }
                }
            });
        }
        self.failed(rpc, context, err)
    }

    /// Publishes `invalidations` (nothing with `--invalidations off`): the store's answer,
    /// for [`CacheService::published`] to make of. Awaited under an [`Unpublished`] guard.
    async fn publish_outcome(&self, invalidations: &[Invalidation]) -> Result<u64, StoreError> {
        if self.hub.mode() == InvalidationMode::Off {
            return Ok(0);
        }
        self.store.publish(invalidations).await
    }

    /// What publishing `invalidations` after their change came to: the position. A failure
    /// is counted and logged as a store failure; with `--invalidations best-effort` the RPC
    /// still succeeds (its change was made) with position 0 (unknown), and the hub owes a
    /// bust of everything ([`Hub::owe`]); with `required` it fails the RPC (the caller must
    /// know; retrying a write or a bust is harmless) and the hub owes the bust all the same.
    fn published(
        &self,
        rpc: &'static str,
        context: &tonic::Extensions,
        invalidations: &[Invalidation],
        published: Result<u64, StoreError>,
    ) -> Result<u64, Status> {
        if self.hub.mode() == InvalidationMode::Off {
            return Ok(0);
        }
        let position = match published {
            Ok(position) => position,
            Err(err) => {
                let status = self.failed(rpc, context, err);
                // Owed in both modes: with `required` the caller learns of it, but the change
                // was made, and a near cache must still drop what it changed.
                self.hub.owe(self.store.clone());
                if self.hub.mode() != InvalidationMode::Required {
                    return Ok(0);
                }
                return Err(Status::new(
                    status.code(),
                    format!(
                        "the change was made but its invalidation was not published, so near caches may keep the old value; retry: {}",
                        status.message()
                    ),
                ));
            }
        };
        self.hub.published(invalidations);
        Ok(position)
    }

    /// Checks the grant in a request's `context` (its extensions) against `access`.
    fn allow(&self, context: &tonic::Extensions, access: Access<'_>) -> Result<(), Status> {
        authorize(context, self.auth_enabled, access)
    }

    /// Counts and logs a store failure, naming the request id from the request's `context`,
    /// then turns it into a status.
    fn failed(&self, rpc: &'static str, context: &tonic::Extensions, err: StoreError) -> Status {
        self.counters.errors.fetch_add(1, Relaxed);
        self.metrics.store_failed(&err);
        warn!(rpc, request_id = request_id(context), cause = %err, "store operation failed");
        err.into()
    }

    fn check_batch(&self, field: &str, len: usize) -> Result<(), Status> {
        if len > self.limits.max_batch {
            return Err(Status::invalid_argument(format!(
                "{field}: at most {} per call (--max-batch), got {len}",
                self.limits.max_batch
            )));
        }
        Ok(())
    }

    /// Validates one write; `field` prefixes the names in error messages (`entries[3].`).
    fn new_entry(&self, request: pb::PutRequest, field: &str) -> Result<NewEntry, Status> {
        let key = entry_key(request.key)
            .map_err(|err| Status::invalid_argument(format!("{field}key.{err}")))?;
        let max_ttl = self.limits.max_ttl_seconds;
        if request.ttl_seconds == 0 || request.ttl_seconds > max_ttl {
            return Err(Status::invalid_argument(format!(
                "{field}ttl_seconds: must be between 1 and {max_ttl}, got {}",
                request.ttl_seconds
            )));
        }
        let max_value = self.limits.max_value_bytes;
        if request.value.len() > max_value {
            return Err(Status::invalid_argument(format!(
                "{field}value: must be at most {max_value} bytes (--max-value-bytes), got {}",
                request.value.len()
            )));
        }
        let tags = self.checked_tags(&format!("{field}tags"), request.tags)?;
        let kept = u64::from(request.ttl_seconds) + u64::from(request.stale_seconds);
        if kept > u64::from(max_ttl) {
            return Err(Status::invalid_argument(format!(
                "{field}stale_seconds: ttl_seconds plus stale_seconds must be at most {max_ttl} (--max-ttl-seconds), got {} + {}",
                request.ttl_seconds, request.stale_seconds
            )));
        }
        Ok(NewEntry {
            key,
            value: request.value,
            ttl: Duration::from_secs(u64::from(request.ttl_seconds)),
            tags,
            stale: Duration::from_secs(u64::from(request.stale_seconds)),
            compute_ms: request.compute_ms,
        })
    }

    /// Validates the tags of a write (or of a leased lookup's result) under `field`, and
    /// drops repeats: a repeated tag indexes the entry once.
    fn checked_tags(&self, field: &str, mut tags: Vec<String>) -> Result<Vec<String>, Status> {
        check_tags(
            field,
            &tags,
            self.limits.max_tags,
            self.limits.max_tag_bytes,
        )
        .map_err(invalid)?;
        tags.sort_unstable();
        tags.dedup();
        Ok(tags)
    }

    /// Validates what a Get asks for beyond a plain lookup. A lease longer than
    /// `--lease-max-ms` is shortened to it: a client configured for a longer one still gets
    /// leases (and hits) rather than an error on every lookup.
    fn ask(&self, request: &mut pb::GetRequest) -> Result<Ask, Status> {
        let lease = Duration::from_millis(u64::from(request.lease_ms)).min(self.limits.max_lease);
        let beta = f64::from(request.beta);
        if !beta.is_finite() || beta < 0.0 {
            return Err(Status::invalid_argument(format!(
                "beta: must be a finite number, 0 or more (1.0 is XFetch's usual), got {}",
                request.beta
            )));
        }
        let refreshing = request.refresh_after_ms > 0 || beta > 0.0;
        if refreshing && lease.is_zero() {
            return Err(Status::invalid_argument(
                "refresh_after_ms and beta: need lease_ms, since only a lease holder refreshes an entry",
            ));
        }
        let tags = std::mem::take(&mut request.tags);
        if !tags.is_empty() && lease.is_zero() {
            return Err(Status::invalid_argument(
                "tags: only with lease_ms (they are the tags a leased result will be written with)",
            ));
        }
        let tags = self.checked_tags("tags", tags)?;
        Ok(Ask {
            lease: (!lease.is_zero()).then_some(lease),
            refresh_after: (request.refresh_after_ms > 0)
                .then(|| Duration::from_millis(u64::from(request.refresh_after_ms))),
            beta: (beta > 0.0).then_some(beta),
            allow_stale: request.allow_stale,
            want_ttl: request.want_ttl,
            tags,
        })
    }

    /// Counts a lease handed out.
    fn won(&self, took_over: bool) {
        self.counters.leases_won.fetch_add(1, Relaxed);
        self.metrics.lease(LeaseEvent::Won);
        if took_over {
            self.counters.leases_expired.fetch_add(1, Relaxed);
            self.metrics.lease(LeaseEvent::Expired);
        }
    }

    /// Looks `key` up as `ask` says: a plain lookup, or one that decides the key's lease (see
    /// the proto's "Leases").
    async fn answer(&self, key: &EntryKey, ask: &Ask) -> Result<pb::GetResponse, StoreError> {
        for _ in 0..LEASE_ATTEMPTS {
            let found = self.store.lookup(key, ask.needs_left()).await?;
            let stale = match &found {
                Found::Stale { value, meta } if ask.allow_stale => Some((value.clone(), *meta)),
                _ => None,
            };
            let lease = match (found, ask.lease) {
                (Found::Live { value, left, meta }, lease) => {
                    // The time left is reported only when asked for (a plain lookup may have
                    // read it to tell a stale copy from a live value).
                    let reported = left.filter(|_| ask.needs_left());
                    let mut response = hit(value, reported, meta);
                    if let Some(lease) = lease
                        && ask.due(left, meta)
                    {
                        let token = lease::new_token();
                        let refresh = LeaseAsk {
                            token,
                            lease,
                            refresh: true,
                        };
                        if let Acquired::Won { took_over, .. } =
                            self.store.acquire(key, refresh, &ask.tags).await?
                        {
                            self.won(took_over);
                            self.counters.refreshes.fetch_add(1, Relaxed);
                            self.metrics.lease(LeaseEvent::Refreshed);
                            response.lease = pb::Lease::Won.into();
                            response.lease_token = token;
                        }
                    }
                    return Ok(response);
                }
                (_, None) => return Ok(self.served(miss(stale))),
                (_, Some(lease)) => lease,
            };
            let token = lease::new_token();
            let ask_lease = LeaseAsk {
                token,
                lease,
                refresh: false,
            };
            // A stale value is served only if the lease decision still saw it: one busted since
            // the read is never served.
            let mut response = match self.store.acquire(key, ask_lease, &ask.tags).await? {
                Acquired::Live => continue,
                Acquired::Won { seen, took_over } => {
                    self.won(took_over);
                    let mut response = miss(stale.filter(|_| seen == Seen::Value));
                    response.lease = pb::Lease::Won.into();
                    response.lease_token = token;
                    response
                }
                Acquired::Held { seen, left } => {
                    self.counters.lease_waits.fetch_add(1, Relaxed);
                    self.metrics.lease(LeaseEvent::Waited);
                    let mut response = miss(stale.filter(|_| seen == Seen::Value));
                    response.lease = pb::Lease::Wait.into();
                    response.retry_after_ms = left
                        .clamp(Duration::from_millis(1), MAX_RETRY_AFTER)
                        .as_millis() as u32;
                    response.lease_left_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX);
                    response
                }
            };
            response = self.served(response);
            return Ok(response);
        }
        // Written, then gone again, between each read and its lease request: let the caller
        // look again rather than spin here.
        self.counters.lease_waits.fetch_add(1, Relaxed);
        self.metrics.lease(LeaseEvent::Waited);
        Ok(pb::GetResponse {
            lease: pb::Lease::Wait.into(),
            retry_after_ms: 1,
            ..Default::default()
        })
    }

    /// Counts `response` as stale served when it carries a stale value.
    fn served(&self, response: pb::GetResponse) -> pb::GetResponse {
        if response.stale {
            self.counters.stale_served.fetch_add(1, Relaxed);
            self.metrics.lease(LeaseEvent::StaleServed);
        }
        response
    }

    /// A `GetMany` whose answer would pass `--max-response-bytes`.
    ///
    /// OUT_OF_RANGE, not RESOURCE_EXHAUSTED: the batch itself is too big, as a request over
    /// --max-message-bytes is (which tonic answers OUT_OF_RANGE). Retrying it cannot help, and
    /// it says nothing about the server's health, so clients must not back off or count it
    /// against the service, as RESOURCE_EXHAUSTED would have them.
    fn response_too_large(&self, size: u64) -> Status {
        Status::out_of_range(format!(
            "keys: the values found come to {size} bytes, over --max-response-bytes ({}); ask for them in smaller batches",
            self.limits.max_response_bytes
        ))
    }

    /// Counts the lookups of `keys`, for `Stats` and the metrics, given the values found.
    fn record_lookups(&self, keys: &[EntryKey], values: &[Option<Bytes>]) {
        let hits = values.iter().filter(|value| value.is_some()).count() as u64;
        self.counters.hits.fetch_add(hits, Relaxed);
        self.counters
            .misses
            .fetch_add(values.len() as u64 - hits, Relaxed);
        self.metrics
            .lookups(keys.iter().zip(values).map(|(key, value)| match value {
                Some(value) => (key.namespace(), Lookup::Hit, value.len()),
                None => (key.namespace(), Lookup::Miss, 0),
            }));
    }

    /// Counts the lookups of `keys` that failed with the store's `err`: shed when it was
    /// refused for `--max-in-flight` (the store was never asked), an error otherwise.
    fn lookups_failed(&self, keys: &[EntryKey], err: &StoreError) {
        let result = match err {
            StoreError::Overloaded { .. } => Lookup::Shed,
            _ => Lookup::Error,
        };
        self.metrics
            .lookups(keys.iter().map(|key| (key.namespace(), result, 0)));
    }

    async fn bust_scope(
        &self,
        rpc: &'static str,
        context: &tonic::Extensions,
        scope: Scope<'_>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        let invalidation = Invalidation::bust(scope);
        // Published even when nothing was removed: a near cache may still hold what the
        // store has evicted.
        let mut unpublished = Unpublished::new(&self.hub, &self.store);
        let done = if self.hub.mode() == InvalidationMode::Off {
            self.store.bust(scope).await.map(|removed| (removed, Ok(0)))
        } else {
            self.store.bust_then_publish(scope).await
        };
        unpublished.disarm();
        let (removed, published) = match done {
            Ok(done) => done,
            Err(err) => {
                return Err(self.change_failed(rpc, context, err, vec![invalidation]));
            }
        };
        let position = self.published(rpc, context, &[invalidation], published)?;
        self.counters.busts.fetch_add(1, Relaxed);
        self.counters.busted_entries.fetch_add(removed, Relaxed);
        self.metrics.bust(scope.name(), removed);
        Ok(Response::new(pb::BustResponse { removed, position }))
    }
}

fn lookup(value: Option<bytes::Bytes>) -> pb::GetResponse {
    match value {
        Some(value) => pb::GetResponse {
            hit: true,
            value,
            ..Default::default()
        },
        None => pb::GetResponse::default(),
    }
}

#[tonic::async_trait]
impl<S: Store> CacheMoney for CacheService<S> {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let (_, context, mut request) = request.into_parts();
        let mut ask = self.ask(&mut request)?;
        let key = entry_key(request.key).map_err(|err| invalid(err.nested("key")))?;
        record_namespace(key.namespace());
        self.allow(&context, Access::Read(key.namespace()))?;
        if ask.lease.is_some()
            && self
                .allow(&context, Access::Write(key.namespace()))
                .is_err()
        {
            // A lease is the right to write the entry: a reader without it gets a plain
            // lookup (LEASE_NONE), as a client with leases off would.
            ask = Ask {
                allow_stale: ask.allow_stale,
                want_ttl: ask.want_ttl,
                ..Ask::default()
            };
        }
        // Read before the lookup: every invalidation at or below it is older than the value.
        let position = self.hub.lookup_position();
        let mut answer = self.answer(&key, &ask).await.map_err(|err| {
            self.lookups_failed(std::slice::from_ref(&key), &err);
            self.failed("Get", &context, err)
        })?;
        answer.position = position;
        let value = answer.hit.then(|| answer.value.clone());
        self.record_lookups(std::slice::from_ref(&key), std::slice::from_ref(&value));
        let hit = answer.hit;
        let mut response = Response::new(answer);
        if self.outcomes {
            let outcome = Outcome(if hit { "hit" } else { "miss" });
            response.extensions_mut().insert(outcome);
        }
        Ok(response)
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let token = request.lease_token;
        let entry = self.new_entry(request, "")?;
        record_namespace(entry.key.namespace());
        self.allow(&context, Access::Write(entry.key.namespace()))?;
        let invalidation = Invalidation::put(&entry.key);
        // A plain write goes with its invalidation (one round trip where the store can); a
        // leased one publishes only once it is known to have been stored.
        let off = self.hub.mode() == InvalidationMode::Off;
        let mut unpublished = Unpublished::new(&self.hub, &self.store);
        let (stored, published) = match if token == 0 && off {
            self.store.put(&entry).await.map(|()| (true, Some(Ok(0))))
        } else if token == 0 {
            self.store
                .put_then_publish(&entry)
                .await
                .map(|published| (true, Some(published)))
        } else {
            self.store
                .put_leased(&entry, token)
                .await
                .map(|stored| (stored, None))
        } {
            Ok(done) => done,
            Err(err) => {
                unpublished.disarm();
                return Err(self.change_failed("Put", &context, err, vec![invalidation]));
            }
        };
        if !stored {
            unpublished.disarm();
            self.counters.stale_writes_refused.fetch_add(1, Relaxed);
            self.metrics.lease(LeaseEvent::Refused);
            return Ok(Response::new(pb::PutResponse {
                refused: true,
                position: 0,
            }));
        }
        let position = match published {
            Some(published) => {
                unpublished.disarm();
                self.published("Put", &context, &[invalidation], published)?
            }
            None => {
                let invalidations = [invalidation];
                let published = self.publish_outcome(&invalidations).await;
                unpublished.disarm();
                self.published("Put", &context, &invalidations, published)?
            }
        };
        self.counters.puts.fetch_add(1, Relaxed);
        self.metrics
            .written([(entry.key.namespace(), entry.value.len())]);
        Ok(Response::new(pb::PutResponse {
            refused: false,
            position,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let key = entry_key(request.key).map_err(|err| invalid(err.nested("key")))?;
        if request.lease_token == 0 {
            return Err(Status::invalid_argument(
                "lease_token: must be the token a Get handed out (LEASE_WON), got 0",
            ));
        }
        record_namespace(key.namespace());
        self.allow(&context, Access::Write(key.namespace()))?;
        let released = self
            .store
            .release(&key, request.lease_token)
            .await
            .map_err(|err| self.failed("Release", &context, err))?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn bust(
        &self,
        request: Request<pb::BustRequest>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let key = entry_key(request.key).map_err(|err| invalid(err.nested("key")))?;
        record_namespace(key.namespace());
        self.allow(&context, Access::Write(key.namespace()))?;
        self.bust_scope("Bust", &context, Scope::Entry(&key)).await
    }

    async fn bust_function(
        &self,
        request: Request<pb::BustFunctionRequest>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let function = FunctionKey::new(request.namespace, request.function).map_err(invalid)?;
        record_namespace(function.namespace());
        self.allow(&context, Access::Write(function.namespace()))?;
        self.bust_scope("BustFunction", &context, Scope::Function(&function))
            .await
    }

    async fn bust_namespace(
        &self,
        request: Request<pb::BustNamespaceRequest>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let namespace = request.namespace;
        check_name("namespace", &namespace).map_err(invalid)?;
        record_namespace(&namespace);
        self.allow(&context, Access::Admin)?;
        self.bust_scope("BustNamespace", &context, Scope::Namespace(&namespace))
            .await
    }

    async fn bust_all(
        &self,
        request: Request<pb::BustAllRequest>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        self.allow(request.extensions(), Access::Admin)?;
        self.bust_scope("BustAll", request.extensions(), Scope::All)
            .await
    }

    async fn bust_tag(
        &self,
        request: Request<pb::BustTagRequest>,
    ) -> Result<Response<pb::BustResponse>, Status> {
        let (_, context, request) = request.into_parts();
        check_name("namespace", &request.namespace).map_err(invalid)?;
        check_tag("tag", &request.tag, self.limits.max_tag_bytes).map_err(invalid)?;
        record_namespace(&request.namespace);
        self.allow(&context, Access::Write(&request.namespace))?;
        let mut unpublished = Unpublished::new(&self.hub, &self.store);
        let removed = match self.store.bust_tag(&request.namespace, &request.tag).await {
            Ok(removed) => removed,
            Err(err) => {
                unpublished.disarm();
                let invalidation = Invalidation::tag(&request.namespace, &request.tag);
                return Err(self.change_failed("BustTag", &context, err, vec![invalidation]));
            }
        };
        let invalidations = [Invalidation::tag(&request.namespace, &request.tag)];
        let published = self.publish_outcome(&invalidations).await;
        unpublished.disarm();
        let position = self.published("BustTag", &context, &invalidations, published)?;
        self.counters.busts.fetch_add(1, Relaxed);
        self.counters.busted_entries.fetch_add(removed, Relaxed);
        self.metrics.bust("tag", removed);
        Ok(Response::new(pb::BustResponse { removed, position }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let keys = request.keys;
        self.check_batch("keys", keys.len())?;
        let keys = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| {
                EntryKey::new(key.namespace, key.function, key.digest)
                    .map_err(|err| invalid(err.within("keys", i)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        record_namespaces(keys.iter().map(EntryKey::namespace));
        for key in &keys {
            self.allow(&context, Access::Read(key.namespace()))?;
        }
        // A batch whose values could exceed the response bound is measured first (one round
        // trip of lengths), so it is refused before its values are loaded into memory.
        let worst = keys
            .len()
            .saturating_mul(self.limits.max_value_bytes.saturating_add(RESULT_OVERHEAD));
        if worst > self.limits.max_response_bytes {
            let present = self.store.value_bytes(&keys).await.map_err(|err| {
                self.lookups_failed(&keys, &err);
                self.failed("GetMany", &context, err)
            })?;
            if present > self.limits.max_response_bytes as u64 {
                return Err(self.response_too_large(present));
            }
        }
        let position = self.hub.lookup_position();
        let values = self.store.get_many(&keys).await.map_err(|err| {
            self.lookups_failed(&keys, &err);
            self.failed("GetMany", &context, err)
        })?;
        let response = pb::GetManyResponse {
            results: values
                .iter()
                .cloned()
                .map(|value| pb::GetResponse {
                    position,
                    ..lookup(value)
                })
                .collect(),
        };
        // Values may have grown since they were measured; the bound holds all the same.
        let size = prost::Message::encoded_len(&response);
        if size > self.limits.max_response_bytes {
            return Err(self.response_too_large(size as u64));
        }
        self.record_lookups(&keys, &values);
        Ok(Response::new(response))
    }

    async fn put_many(
        &self,
        request: Request<pb::PutManyRequest>,
    ) -> Result<Response<pb::PutManyResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let entries = request.entries;
        self.check_batch("entries", entries.len())?;
        let entries = entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                if entry.lease_token != 0 {
                    return Err(Status::invalid_argument(format!(
                        "entries[{i}].lease_token: PutMany takes no lease tokens; write a leased result with Put"
                    )));
                }
                self.new_entry(entry, &format!("entries[{i}]."))
            })
            .collect::<Result<Vec<_>, _>>()?;
        record_namespaces(entries.iter().map(|entry| entry.key.namespace()));
        for entry in &entries {
            self.allow(&context, Access::Write(entry.key.namespace()))?;
        }
        let stored = entries.len() as u64;
        let invalidations: Vec<Invalidation> = entries
            .iter()
            .map(|entry| Invalidation::put(&entry.key))
            .collect();
        let mut unpublished = Unpublished::new(&self.hub, &self.store);
        if let Err(err) = self.store.put_many(&entries).await {
            unpublished.disarm();
            return Err(self.change_failed("PutMany", &context, err, invalidations));
        }
        let published = self.publish_outcome(&invalidations).await;
        unpublished.disarm();
        let position = self.published("PutMany", &context, &invalidations, published)?;
        self.counters.puts.fetch_add(stored, Relaxed);
        self.metrics.written(
            entries
                .iter()
                .map(|entry| (entry.key.namespace(), entry.value.len())),
        );
        Ok(Response::new(pb::PutManyResponse { stored, position }))
    }

    async fn keys(
        &self,
        request: Request<pb::KeysRequest>,
    ) -> Result<Response<pb::KeysResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let function = FunctionKey::new(request.namespace, request.function).map_err(invalid)?;
        record_namespace(function.namespace());
        self.allow(&context, Access::Admin)?;
        let limit = match request.limit as usize {
            0 => DEFAULT_KEYS_LIMIT,
            limit if limit <= MAX_KEYS_LIMIT => limit,
            limit => {
                return Err(Status::invalid_argument(format!(
                    "limit: must be at most {MAX_KEYS_LIMIT} (0 means {DEFAULT_KEYS_LIMIT}), got {limit}"
                )));
            }
        };
        let page = self
            .store
            .keys(&function, &request.cursor, limit)
            .await
            .map_err(|err| match err {
                StoreError::InvalidCursor(_) | StoreError::StaleCursor(_) => Status::from(err),
                err => self.failed("Keys", &context, err),
            })?;
        let entries = page
            .entries
            .into_iter()
            .map(|info| pb::KeyEntry {
                digest: info.digest,
                ttl_ms: info.ttl.as_millis() as u64,
            })
            .collect();
        Ok(Response::new(pb::KeysResponse {
            entries,
            next_cursor: page.next_cursor,
        }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.allow(request.extensions(), Access::Any)?;
        let counters = &self.counters;
        Ok(Response::new(pb::StatsResponse {
            hits: counters.hits.load(Relaxed),
            misses: counters.misses.load(Relaxed),
            puts: counters.puts.load(Relaxed),
            busts: counters.busts.load(Relaxed),
            busted_entries: counters.busted_entries.load(Relaxed),
            errors: counters.errors.load(Relaxed),
            store: self.store.kind().to_owned(),
            store_up: self.store_up.load(Relaxed),
            uptime_seconds: counters.started.elapsed().as_secs(),
            leases_won: counters.leases_won.load(Relaxed),
            lease_waits: counters.lease_waits.load(Relaxed),
            leases_expired: counters.leases_expired.load(Relaxed),
            stale_writes_refused: counters.stale_writes_refused.load(Relaxed),
            stale_served: counters.stale_served.load(Relaxed),
            refreshes: counters.refreshes.load(Relaxed),
            watchers: self.hub.counters().watchers.load(Relaxed),
            invalidations_published: self.hub.counters().published.load(Relaxed),
            watch_events_delivered: self.hub.counters().delivered.load(Relaxed),
            watch_resets: self.hub.counters().resets.load(Relaxed),
        }))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if self.hub.mode() == InvalidationMode::Off {
            return Err(Status::unimplemented(
                "Watch: this server publishes no invalidations (--invalidations off, CACHE_MONEY_INVALIDATIONS=off); start it with --invalidations best-effort to watch",
            ));
        }
        let (_, context, request) = request.into_parts();
        let named = request.namespaces.len() + request.functions.len();
        if !request.all_namespaces && named == 0 {
            return Err(Status::invalid_argument(
                "namespaces, functions: name at least one namespace or function to follow, or set all_namespaces",
            ));
        }
        self.check_batch("namespaces and functions", named)?;
        let mut follow = Follow {
            all: request.all_namespaces,
            ..Follow::default()
        };
        for (i, namespace) in request.namespaces.into_iter().enumerate() {
            check_name(&format!("namespaces[{i}]"), &namespace).map_err(invalid)?;
            follow.namespaces.insert(namespace);
        }
        for (i, function) in request.functions.into_iter().enumerate() {
            let function = FunctionKey::new(function.namespace, function.function)
                .map_err(|err| invalid(err.within("functions", i)))?;
            follow.functions.insert((
                function.namespace().to_owned(),
                function.function().to_owned(),
            ));
        }
        if follow.all {
            self.allow(&context, Access::Admin)?;
        }
        let namespaces = follow
            .namespaces
            .iter()
            .chain(follow.functions.iter().map(|(namespace, _)| namespace));
        for namespace in namespaces {
            self.allow(&context, Access::Read(namespace))?;
        }
        let stream = watch::watch(&self.hub, self.store.clone(), follow, request.after)
            .await
            .map_err(|err| self.failed("Watch", &context, err))?;
        Ok(Response::new(stream))
    }
}
