//! [`Function`]: one function's cache entries, and `memoize`, the decorator's equivalent.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tracing::warn;

use crate::{
    Client, Error,
    canonical::{args_value, check_key_fn_output, scoped_digest_of, type_args},
    client::Flight,
    key::EntryKey,
    pb,
};

/// Turns the canonical arguments into the value that is keyed, like the seed's `key_fn`.
pub type KeyFn = Arc<dyn Fn(Value) -> Value + Send + Sync>;

/// What a call does with its entry: `memoize` reads it first, `refresh` recomputes and
/// overwrites it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Memoize,
    Refresh,
}

/// One function's cache entries: memoize calls, bust one call or all of them. Cloning is
/// shallow. Made by [`Client::function`].
#[derive(Clone)]
pub struct Function {
    client: Client,
    namespace: String,
    name: String,
    ttl: Duration,
    key_fn: Option<KeyFn>,
    cache_none: bool,
    /// The key space of the function's results; 1 is the unversioned one.
    version: u32,
    /// The type arguments of a `#[memoize]` method's `Self` (`<u64>`), keyed with the
    /// arguments so each instantiation of a generic `impl` has its own entries.
    self_type_args: Option<&'static str>,
    /// A value that does not decode is logged once per handle, not once per call.
    warned_undecodable: Arc<AtomicBool>,
    /// Likewise a request the service refuses (a value over its size limit).
    warned_refused: Arc<AtomicBool>,
    /// Written with every result ([`Function::tagged`]); shared by clones.
    tags: Arc<[String]>,
}

/// How [`Function::keep`] writes a fresh result: as memoize does, or as refresh does (a
/// result that is not cached removes the old entry).
#[derive(Debug, Clone, Copy)]
enum Write {
    Store,
    Overwrite,
}

/// The once-per-handle warnings of a [`Function`], to share between handles of one function
/// made per call (a `#[memoize]` function with its own client).
#[derive(Debug, Default)]
pub(crate) struct HandleWarnings {
    undecodable: Arc<AtomicBool>,
    refused: Arc<AtomicBool>,
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .field("key_fn", &self.key_fn.is_some())
            .field("cache_none", &self.cache_none)
            .field("version", &self.version)
            .field("tags", &self.tags)
            .field("self_type_args", &self.self_type_args)
            .finish()
    }
}

impl Function {
    pub(crate) fn new(client: Client, namespace: String, name: String, ttl: Duration) -> Self {
        Function {
            client,
            namespace,
            name,
            ttl,
            key_fn: None,
            cache_none: false,
            version: 1,
            self_type_args: None,
            warned_undecodable: Arc::new(AtomicBool::new(false)),
            warned_refused: Arc::new(AtomicBool::new(false)),
            tags: Arc::new([]),
        }
    }

    /// Keys calls by what `key_fn` makes of the canonical argument list (a JSON array)
    /// instead of the whole list, e.g. `|args| args[0].clone()` to ignore all but the first.
    /// What it returns obeys the arguments' rules: a result that cannot be keyed (an integer
    /// beyond ±(2^53 − 1)) makes the call fail with [`Error::Args`], as such an argument does.
    pub fn with_key_fn(mut self, key_fn: impl Fn(Value) -> Value + Send + Sync + 'static) -> Self {
        self.key_fn = Some(Arc::new(key_fn));
        self
    }

    /// Whether a result that serializes to `null` (`None`, `()`) is cached. Off by default,
    /// as in the seed.
    pub fn cache_none(mut self, cache_none: bool) -> Self {
        self.cache_none = cache_none;
        self
    }

    /// Puts the function's results in key space `version`, so entries written when its result
    /// type or meaning was different are never read: bump it when they change. Version 1 is
    /// the default and keys exactly as an unversioned handle (and the Python seed) do; from 2
    /// on the digest is `md5("v{version}:" + canonical arguments)` (README, the key spec).
    /// [`Function::bust_all`] removes the entries of every version, since they share the
    /// function's name.
    ///
    /// # Panics
    /// When `version` is 0: versions count from 1, and this is almost always a literal.
    pub fn version(mut self, version: u32) -> Self {
        assert!(
            version >= 1,
            "cache-money function version: must be 1 or more (1 is the unversioned key space), got 0"
        );
        self.version = version;
        self
    }

    /// Keys calls as those of a `#[memoize]` method of `Self` = the type named `type_name`
    /// (from [`core::any::type_name`]): with its type arguments, if it has any (README, the
    /// key spec).
    pub(crate) fn self_type(mut self, type_name: &'static str) -> Self {
        self.self_type_args = type_args(type_name);
        self
    }

    /// Shares `warnings` (each logged once) with the other handles given them.
    pub(crate) fn warnings(mut self, warnings: &HandleWarnings) -> Self {
        self.warned_undecodable = warnings.undecodable.clone();
        self.warned_refused = warnings.refused.clone();
        self
    }

    /// The namespace entries are stored under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The function name entries are stored under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long results are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The digest of one call's arguments, as the service sees it.
    ///
    /// # Errors
    /// [`Error::Args`] when the arguments, or what the key function made of them, cannot be
    /// keyed (NaN, integers beyond ±(2^53 − 1), non-string map keys).
    pub fn digest<A: Serialize + ?Sized>(&self, args: &A) -> Result<String, Error> {
        let args = args_value(args)?;
        let keyed = match &self.key_fn {
            Some(key_fn) => {
                let keyed = key_fn(args);
                check_key_fn_output(&keyed)?;
                keyed
            }
            None => args,
        };
        Ok(scoped_digest_of(&keyed, self.version, self.self_type_args))
    }

    pub(crate) fn entry_key<A: Serialize + ?Sized>(&self, args: &A) -> Result<EntryKey, Error> {
        Ok(EntryKey::new(
            self.namespace.clone(),
            self.name.clone(),
            self.digest(args)?,
        )?)
    }

    fn pb_key(key: &EntryKey) -> pb::Key {
        pb::Key {
            namespace: key.namespace().to_owned(),
            function: key.function().to_owned(),
            digest: key.digest().to_owned(),
        }
    }

    /// Returns the cached result for `args`, or runs `compute`, caches its result for the
    /// handle's TTL and returns it.
    ///
    /// Concurrent calls with the same arguments in this process run `compute` once and all
    /// get its result. When the service is down, slow or erroring, the result is computed and
    /// returned all the same (fail-open); a stored value that no longer decodes into `T` is
    /// treated as a miss and overwritten.
    ///
    /// ```no_run
    /// # async fn example(cm: cache_money::Client) -> Result<(), cache_money::Error> {
    /// use cache_money::Ttl;
    /// let add = cm.function("__main__", "addition", Ttl::HOUR);
    /// let sum: i64 = add.memoize(&(3, 4), || async { 3 + 4 }).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Only [`Error::Args`]: arguments, or a key function's result, that cannot make a key
    /// (NaN, integers beyond ±(2^53 − 1), non-string map keys).
    pub async fn memoize<A, T, F, Fut>(&self, args: &A, compute: F) -> Result<T, Error>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let computed = self
            .try_memoize(args, || async { Ok::<T, Error>(compute().await) })
            .await?;
        Ok(computed)
    }

    /// As [`Function::memoize`] for a function that can fail: `Ok` results are cached, `Err`
    /// never (each waiting caller then runs the function itself).
    ///
    /// # Errors
    /// `compute`'s error, or [`Error::Args`] converted into `E`.
    pub async fn try_memoize<A, T, E, F, Fut>(&self, args: &A, compute: F) -> Result<T, E>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.try_run(Mode::Memoize, args, compute).await
    }

    /// A handle whose calls (`memoize`, `refresh` and their `try_` forms) write their
    /// results with `tags` instead of this handle's (none by default), so [`Client::bust_tag`] of any of them (in this function's namespace) removes
    /// the entry, whatever function wrote it. Tags usually name what the result was computed
    /// from and depend on the arguments:
    ///
    /// ```no_run
    /// # async fn example(cm: cache_money::Client) -> Result<(), cache_money::Error> {
    /// use cache_money::Ttl;
    /// let profile = cm.function("app", "profile", Ttl::HOUR);
    /// let id = 7;
    /// let name: String = profile
    ///     .tagged([format!("user:{id}")])
    ///     .memoize(&(id,), || async { "Ada".to_owned() })
    ///     .await?;
    /// cm.bust_tag("app", "user:7").await?; // and every other entry about user 7
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A tag is 1-256 bytes of UTF-8 without control characters, at most 16 per call (the
    /// service's defaults); a write the service refuses for its tags is not cached (warned
    /// once per handle), and the result is returned all the same. Tags only travel with
    /// writes: a hit returns the entry as it was written, and when concurrent calls of the
    /// same arguments share one computation, the tags of the call that ran it are written.
    /// The handle is a clone, as cheap as [`Function`]'s, sharing the function's entries.
    pub fn tagged<I, S>(&self, tags: I) -> Function
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Function {
            tags: tags.into_iter().map(Into::into).collect(),
            ..self.clone()
        }
    }

    /// The tags this handle writes with (see [`Function::tagged`]).
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// `try_memoize` or `try_refresh` of `args`.
    async fn try_run<A, T, E, F, Fut>(&self, mode: Mode, args: &A, compute: F) -> Result<T, E>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if !self.client.options().enabled {
            return compute().await;
        }
        let key = self.entry_key(args)?;
        self.run_key(mode, &key, &self.tags, compute).await
    }

    /// `try_memoize` or `try_refresh` with the key already made (by `#[memoize]`, whose
    /// arguments are borrowed for the key and then moved into `compute`).
    pub(crate) async fn run_key<T, E, F, Fut>(
        &self,
        mode: Mode,
        key: &EntryKey,
        tags: &[String],
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if !self.client.options().enabled {
            return compute().await;
        }
        match mode {
            Mode::Memoize => self.memoize_key(key, tags, compute).await,
            Mode::Refresh => self.refresh_key(key, tags, compute).await,
        }
    }

    async fn memoize_key<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // Leaves the flight when dropped, even if this caller is cancelled or panics.
        let flight = self.client.flights().join(key);
        let mut compute = Some(compute);
        // The first caller (the leader) looks up and computes; the others wait for it here.
        let mut led: Option<Result<T, E>> = None;
        let shared = flight
            .get_or_lead(|| async {
                let compute = compute.take().expect("the leader runs init once");
                let (result, encoded) = self.lookup_or_compute(key, tags, &flight, compute).await;
                led = Some(result);
                encoded
            })
            .await
            .clone();
        drop(flight);
        if let Some(result) = led {
            return result;
        }
        if let Some(value) = shared.as_deref().and_then(|bytes| self.decode::<T>(bytes)) {
            return Ok(value);
        }
        // The leader's result could not be shared (an error, or it did not encode): compute
        // our own. `compute` is still ours, since only the leader took it.
        match compute.take() {
            Some(compute) => {
                self.client.count_computed();
                compute().await
            }
            None => unreachable!("a follower keeps its compute function"),
        }
    }

    /// The leader's work: a cache lookup, else the computation and a store. Returns the
    /// result and its encoding for the followers. A result computed while a
    /// [`Function::refresh`] of the key took over its flight is returned but not stored: the
    /// refresh's newer value stays.
    async fn lookup_or_compute<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        flight: &Flight<'_>,
        compute: F,
    ) -> (Result<T, E>, Option<Bytes>)
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let request = pb::GetRequest {
            key: Some(Self::pb_key(key)),
            ..Default::default()
        };
        let found = self
            .client
            .cache_rpc("Get", &self.warned_refused, |mut rpc| async move {
                rpc.get(request).await
            })
            .await;
        if let Some(pb::GetResponse {
            hit: true, value, ..
        }) = found
            && let Some(decoded) = self.decode::<T>(&value)
        {
            self.client.count_hit();
            return (Ok(decoded), Some(value));
        }
        self.client.count_computed();
        let result = compute().await;
        let encoded = self
            .keep(key, tags, &result, Write::Store, || flight.is_current())
            .await;
        (result, encoded)
    }

    fn encode<T: Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(value).map(Bytes::from)
    }

    /// Encodes and stores a fresh result; returns its encoding when it can be shared.
    async fn store<T: Serialize>(
        &self,
        key: &EntryKey,
        tags: &[String],
        value: &T,
    ) -> Option<Bytes> {
        let encoded = match Self::encode(value) {
            Ok(encoded) => encoded,
            Err(err) => {
                warn!(namespace = %self.namespace, function = %self.name, cause = %err, "result does not encode as JSON; not cached");
                return None;
            }
        };
        if !self.cache_none && encoded.as_ref() == b"null" {
            return Some(encoded);
        }
        let request = pb::PutRequest {
            key: Some(Self::pb_key(key)),
            value: encoded.clone(),
            ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX),
            tags: tags.to_vec(),
            ..Default::default()
        };
        self.client
            .cache_rpc("Put", &self.warned_refused, |mut rpc| async move {
                rpc.put(request).await
            })
            .await;
        Some(encoded)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Option<T> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Some(value),
            Err(err) => {
                self.client.count_undecodable();
                if !self.warned_undecodable.swap(true, Relaxed) {
                    warn!(
                        namespace = %self.namespace,
                        function = %self.name,
                        cause = %err,
                        "cached value does not decode into the expected type; recomputing and overwriting (logged once per handle)"
                    );
                }
                None
            }
        }
    }

    /// Runs `compute` now and overwrites the cached result for `args` with its result, which
    /// it returns: for when the source changed and the next caller must not wait for the TTL.
    ///
    /// Within this process, `memoize` calls of the same arguments that start while the refresh
    /// runs wait for it and get its result (they neither read the old entry nor compute
    /// again). A `memoize` computation that was already running when the refresh started is
    /// not joined, since it may have started from older data: it finishes for its own callers,
    /// and its result does not stay over the refresh's; nor does that of an older refresh of
    /// the same arguments that finishes after a newer one. One that finishes after the refresh
    /// started is not stored; one whose store was already under way is removed again once
    /// stored (so until then it can be read, and the entry may end up empty, a miss, rather
    /// than holding the refresh's value). This holds for stores answered within their deadline:
    /// one that times out on the client may still land later. (Callers in other processes are
    /// not coordinated: one that read the old entry before the refresh stored may still return
    /// it.)
    ///
    /// A result that is not cached (`None` or `()` without [`Function::cache_none`]) removes
    /// the old entry instead. Like `memoize` it is fail-open: when the service is down the
    /// result is returned all the same and the old entry may stay until its TTL; use
    /// [`Function::bust`] for an invalidation that reports failure.
    ///
    /// # Errors
    /// Only [`Error::Args`], as [`Function::memoize`].
    pub async fn refresh<A, T, F, Fut>(&self, args: &A, compute: F) -> Result<T, Error>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.try_refresh(args, || async { Ok::<T, Error>(compute().await) })
            .await
    }

    /// As [`Function::refresh`] for a function that can fail: an `Ok` result overwrites the
    /// entry; an `Err` is returned and leaves the entry as it was (callers waiting on the
    /// refresh then compute their own, as after a failed `memoize`).
    ///
    /// # Errors
    /// `compute`'s error, or [`Error::Args`] converted into `E`.
    pub async fn try_refresh<A, T, E, F, Fut>(&self, args: &A, compute: F) -> Result<T, E>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.try_run(Mode::Refresh, args, compute).await
    }

    async fn refresh_key<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut led = None;
        let led_by_refresh = &mut led;
        self.client
            .flights()
            .lead(key, |claim| async move {
                self.client.count_computed();
                let result = compute().await;
                let encoded = self
                    .keep(key, tags, &result, Write::Overwrite, || claim.is_current())
                    .await;
                *led_by_refresh = Some(result);
                encoded
            })
            .await;
        led.expect("lead runs the refresh to completion before it returns")
    }

    /// Stores a fresh `result` of `key` (as [`Write`] says) while this computation still holds
    /// the key, and returns its encoding for the callers sharing it; a refresh that started
    /// later stores its newer value instead. An error is neither stored nor shared.
    async fn keep<T: Serialize, E>(
        &self,
        key: &EntryKey,
        tags: &[String],
        result: &Result<T, E>,
        write: Write,
        is_current: impl Fn() -> bool,
    ) -> Option<Bytes> {
        match result {
            Ok(value) if is_current() => {
                let encoded = match write {
                    Write::Store => self.store(key, tags, value).await,
                    Write::Overwrite => self.overwrite(key, tags, value).await,
                };
                self.unless_replaced(key, is_current).await;
                encoded
            }
            Ok(value) => Self::encode(value).ok(),
            Err(_) => None,
        }
    }

    /// Removes what was just stored under `key` if a newer refresh took the key over while it
    /// was stored (`is_current` now false): the refresh's Put may have landed first, and the
    /// older value must not stay over it. A refresh that takes over later sends its Put after
    /// this one was answered, so it lands after. Fail-open, as the store.
    async fn unless_replaced(&self, key: &EntryKey, is_current: impl Fn() -> bool) {
        if !is_current() {
            self.remove(key).await;
        }
    }

    /// Removes `key`'s entry, fail-open (a failure is the breaker's and the metrics', not the
    /// caller's).
    async fn remove(&self, key: &EntryKey) {
        let request = pb::BustRequest {
            key: Some(Self::pb_key(key)),
        };
        self.client
            .cache_rpc("Bust", &self.warned_refused, |mut rpc| async move {
                rpc.bust(request).await
            })
            .await;
    }

    /// Stores a refreshed result; one that is not cached (`null`) removes the old entry.
    async fn overwrite<T: Serialize>(
        &self,
        key: &EntryKey,
        tags: &[String],
        value: &T,
    ) -> Option<Bytes> {
        let encoded = self.store(key, tags, value).await?;
        if !self.cache_none && encoded.as_ref() == b"null" {
            self.remove(key).await;
        }
        Some(encoded)
    }

    /// Removes the cached result of one call (the seed's `fn.bust(*args)`); returns whether
    /// there was one.
    ///
    /// # Errors
    /// [`Error::Args`], or the service's failure: a bust that did not happen is reported.
    pub async fn bust<A: Serialize + ?Sized>(&self, args: &A) -> Result<bool, Error> {
        let key = Some(Self::pb_key(&self.entry_key(args)?));
        let removed = self
            .client
            .bust_rpc(|mut rpc| async move { rpc.bust(pb::BustRequest { key }).await })
            .await?;
        Ok(removed > 0)
    }

    /// Removes every cached call of this function, of every [version](Function::version)
    /// (the seed's `fn.bust_all()`); returns how many there were.
    ///
    /// # Errors
    /// The service's failure: a bust that did not happen is reported.
    pub async fn bust_all(&self) -> Result<u64, Error> {
        let request = pb::BustFunctionRequest {
            namespace: self.namespace.clone(),
            function: self.name.clone(),
        };
        self.client
            .bust_rpc(|mut rpc| async move { rpc.bust_function(request).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use crate::{Client, Ttl};

    /// Version 0 is refused when the handle is made: versions count from 1.
    #[tokio::test]
    #[should_panic(expected = "must be 1 or more")]
    async fn version_zero_is_refused() {
        let cm = Client::connect("http://127.0.0.1:1").await.unwrap();
        let _ = cm.function("ns", "f", Ttl::MINUTE).version(0);
    }

    /// A `memoize` call cancelled while it computes leaves nothing in the single-flight table.
    #[tokio::test]
    async fn cancelled_memoize_leaves_no_flight() {
        // Nothing listens on port 1: the lookup fails at once and the call computes.
        let cm = Client::connect("http://127.0.0.1:1").await.unwrap();
        let slow = cm.function("ns", "slow", Ttl::MINUTE);
        let (started, computing) = oneshot::channel();
        let call = slow.memoize(&(1,), || async {
            started.send(()).unwrap();
            std::future::pending::<u32>().await
        });
        tokio::select! {
            _ = call => unreachable!("the computation never ends"),
            _ = computing => {}
        }
        assert_eq!(cm.flights().len(), 0, "the cancelled call's flight stayed");
    }
}
