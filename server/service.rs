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
use crate::server::metrics::{Lookup, Metrics};
use crate::server::observe::{Outcome, record_namespace, record_namespaces, request_id};
use crate::server::store::{NewEntry, Scope, Store, StoreError};

/// Default page size of `Keys`.
pub const DEFAULT_KEYS_LIMIT: usize = 100;
/// Bytes a `GetMany` result adds to its value in the encoded answer (field tags, lengths,
/// the hit flag), with room to spare.
const RESULT_OVERHEAD: usize = 16;
/// Largest page size of `Keys`.
pub const MAX_KEYS_LIMIT: usize = 1000;

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
    started: Instant,
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
    pub fn new(
        store: S,
        limits: Limits,
        store_up: Arc<AtomicBool>,
        auth_enabled: bool,
        metrics: Metrics,
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
                started: Instant::now(),
            }),
            store_up,
            auth_enabled,
            metrics,
        }
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
        let mut tags = request.tags;
        check_tags(
            &format!("{field}tags"),
            &tags,
            self.limits.max_tags,
            self.limits.max_tag_bytes,
        )
        .map_err(invalid)?;
        // A repeated tag indexes the entry once.
        tags.sort_unstable();
        tags.dedup();
        Ok(NewEntry {
            key,
            value: request.value,
            ttl: Duration::from_secs(u64::from(request.ttl_seconds)),
            tags,
        })
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
        let removed = self
            .store
            .bust(scope)
            .await
            .map_err(|err| self.failed(rpc, context, err))?;
        self.counters.busts.fetch_add(1, Relaxed);
        self.counters.busted_entries.fetch_add(removed, Relaxed);
        self.metrics.bust(scope.name(), removed);
        Ok(Response::new(pb::BustResponse { removed }))
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
        let (_, context, request) = request.into_parts();
        let key = entry_key(request.key).map_err(|err| invalid(err.nested("key")))?;
        record_namespace(key.namespace());
        self.allow(&context, Access::Read(key.namespace()))?;
        let value = self.store.get(&key).await.map_err(|err| {
            self.lookups_failed(std::slice::from_ref(&key), &err);
            self.failed("Get", &context, err)
        })?;
        self.record_lookups(std::slice::from_ref(&key), std::slice::from_ref(&value));
        let outcome = Outcome(if value.is_some() { "hit" } else { "miss" });
        let mut response = Response::new(lookup(value));
        response.extensions_mut().insert(outcome);
        Ok(response)
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let (_, context, request) = request.into_parts();
        let entry = self.new_entry(request, "")?;
        record_namespace(entry.key.namespace());
        self.allow(&context, Access::Write(entry.key.namespace()))?;
        self.store
            .put(&entry)
            .await
            .map_err(|err| self.failed("Put", &context, err))?;
        self.counters.puts.fetch_add(1, Relaxed);
        self.metrics
            .written([(entry.key.namespace(), entry.value.len())]);
        Ok(Response::new(pb::PutResponse { refused: false }))
    }

    async fn release(
        &self,
        _request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        Err(Status::unimplemented("Release: leases are not served yet"))
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
        let removed = self
            .store
            .bust_tag(&request.namespace, &request.tag)
            .await
            .map_err(|err| self.failed("BustTag", &context, err))?;
        self.counters.busts.fetch_add(1, Relaxed);
        self.counters.busted_entries.fetch_add(removed, Relaxed);
        self.metrics.bust("tag", removed);
        Ok(Response::new(pb::BustResponse { removed }))
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
        let values = self.store.get_many(&keys).await.map_err(|err| {
            self.lookups_failed(&keys, &err);
            self.failed("GetMany", &context, err)
        })?;
        let response = pb::GetManyResponse {
            results: values.iter().cloned().map(lookup).collect(),
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
            .map(|(i, entry)| self.new_entry(entry, &format!("entries[{i}].")))
            .collect::<Result<Vec<_>, _>>()?;
        record_namespaces(entries.iter().map(|entry| entry.key.namespace()));
        for entry in &entries {
            self.allow(&context, Access::Write(entry.key.namespace()))?;
        }
        let stored = entries.len() as u64;
        self.store
            .put_many(&entries)
            .await
            .map_err(|err| self.failed("PutMany", &context, err))?;
        self.counters.puts.fetch_add(stored, Relaxed);
        self.metrics.written(
            entries
                .iter()
                .map(|entry| (entry.key.namespace(), entry.value.len())),
        );
        Ok(Response::new(pb::PutManyResponse { stored }))
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
            ..Default::default()
        }))
    }
}
