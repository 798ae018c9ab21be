//! [`Function`]: one function's cache entries, and `memoize`, the decorator's equivalent.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tracing::{debug, warn};

use crate::{
    Client, Error,
    canonical::{args_value, check_key_fn_output, scoped_digest_of, type_args},
    client::{Event, Flight, Shared},
    key::EntryKey,
    lease::{LeaseGuard, LeasePolicy, WaitBudget, compute_ms},
    near::{Near, Scope},
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
    /// Leases, stale-while-revalidate and stale-if-error ([`Function::lease`] and the rest).
    policy: LeasePolicy,
}

/// A result of [`Function::try_memoize_served`], and whether it is stale: a value past its
/// TTL, served because no fresh one could be had ([`Function::stale_if_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Served<T> {
    /// The result.
    pub value: T,
    /// `true` when `value` is a stale value (its TTL passed; kept by stale-if-error) served
    /// because computing a fresh one failed, or because another caller held the key's lease
    /// past its lifetime without writing. `false` for a fresh value, whether cached or
    /// just computed.
    pub stale: bool,
}

impl<T> Served<T> {
    fn fresh(value: T) -> Self {
        Served {
            value,
            stale: false,
        }
    }

    /// The result, whether stale or not.
    pub fn into_value(self) -> T {
        self.value
    }
}

/// How a `memoize` call came out of its flight.
enum Outcome<T, E, F> {
    /// Its result.
    Done(Result<Served<T>, E>),
    /// It found a live entry that is due for recomputation and won the lease to recompute it
    /// (stale-while-revalidate): `current` is the entry's value, `compute` is still unused.
    Due { current: T, token: u64, compute: F },
}

/// What a leader's lookup came to.
enum Found<T> {
    /// A live value; `due`: the lease to recompute it, when it is due and this caller won.
    Hit {
        value: T,
        bytes: Bytes,
        due: Option<u64>,
    },
    /// No fresh value and no lease within the wait bound, but a stale one to serve.
    Stale((T, Bytes)),
    /// Compute, then write as `lease` says; `stale` is the value to serve if computing fails.
    Compute {
        lease: Lease,
        stale: Option<(T, Bytes)>,
    },
}

/// Whether and how a computed result is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Unconditionally: leases are off, the service does not hand them out, the lookup
    /// failed (fail-open, as before leases), or a refresh.
    None,
    /// With the token of the lease this caller won.
    Won(u64),
    /// Not at all: waiting for another caller's lease ran out, so that caller (or whoever
    /// took its lease over) is still expected to write, and its write must not be voided.
    Uncached,
}

/// How a fresh result is written: with which lease, the guard that gives the lease back if it
/// goes unused, and how long the computation took (written with the value, XFetch's delta).
#[derive(Debug)]
struct Fresh {
    took: Duration,
    lease: Lease,
    guard: Option<LeaseGuard>,
}

/// Gives a won lease back now, if there is one.
async fn release(guard: Option<LeaseGuard>) {
    if let Some(guard) = guard {
        guard.release().await;
    }
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
            .field("lease", &self.policy.lease)
            .field("refresh_after", &self.policy.refresh_after)
            .field("xfetch_beta", &self.policy.beta)
            .field("stale_if_error", &self.policy.stale_if_error)
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
            policy: LeasePolicy::default(),
        }
    }

    /// Sets the lease lifetime this handle's `memoize` calls ask for on a miss, instead of
    /// the client's ([`ClientOptions::lease`](crate::ClientOptions::lease), 5 s by default):
    /// one caller fleet-wide computes, the others wait for its write (README, "One
    /// computation per key"). `Duration::ZERO` turns leases off for this handle: every
    /// process computes a missing entry itself, and [`Function::refresh_after`],
    /// [`Function::xfetch`] and [`Function::stale_if_error`]'s stale values (which need a
    /// lease) are off too.
    ///
    /// Choose it above the function's usual compute time (a holder that has not written when
    /// its lease expires loses it to the next caller, and two computations run); the server
    /// shortens one longer than its `--lease-max-ms` (60 s by default) to that. A caller
    /// waits for another's result as long as the holder's lease runs plus
    /// [`ClientOptions::deadline`](crate::ClientOptions::deadline) (a new holder that took an
    /// expired lease over gets its own lease's time), at most twice the lifetime plus the
    /// deadline, then computes itself.
    pub fn lease(mut self, lifetime: Duration) -> Self {
        self.policy.lease = Some(lifetime);
        self
    }

    /// The lease lifetime this handle's `memoize` calls ask for; zero when leases are off.
    pub fn lease_lifetime(&self) -> Duration {
        self.policy.lifetime(self.client.options().lease)
    }

    /// Stale-while-revalidate by age: a cached entry at least `age` old is due, and the
    /// first caller to find it so (one fleet-wide, through the entry's lease) recomputes and
    /// rewrites it, while every other caller gets the cached value at once. See
    /// [`Function::memoize`] (the winner recomputes before it returns) and
    /// [`Function::memoize_detached`] (the winner returns at once too, the recomputation runs
    /// in a spawned task). `Duration::ZERO` (the default): never by age. Needs leases on.
    /// Such a handle does not use the client's near cache: the service decides when an entry
    /// is due, so every lookup must reach it.
    pub fn refresh_after(mut self, age: Duration) -> Self {
        self.policy.refresh_after = age;
        self
    }

    /// Stale-while-revalidate by XFetch (Vattani et al., VLDB 2015): a cached entry becomes
    /// due before it expires with a probability that grows with its compute time (measured
    /// and written with it) and as its expiry nears, so one caller usually recomputes it
    /// before anyone misses. `beta` 1.0 is the paper's default; larger recomputes earlier;
    /// 0 (the default) turns it off. The recomputation happens as for
    /// [`Function::refresh_after`]. Needs leases on. Such a handle does not use the client's
    /// near cache either.
    ///
    /// # Panics
    /// When `beta` is negative, infinite or NaN: almost always a literal.
    pub fn xfetch(mut self, beta: f32) -> Self {
        assert!(
            beta.is_finite() && beta >= 0.0,
            "cache-money xfetch beta: must be a finite number of 0 or more (1.0 is the usual), got {beta}"
        );
        self.policy.beta = beta;
        self
    }

    /// Stale-if-error: results are written to be kept `keep` past their TTL (rounded up to
    /// whole seconds, and cut so TTL plus it stays within
    /// [`ClientOptions::max_ttl`](crate::ClientOptions::max_ttl)), and when a call finds no
    /// fresh value and computing one fails (`Err`, with `try_memoize`), or another caller
    /// holds the lease past its lifetime without writing, that stale value is served instead,
    /// counted in [`ClientMetrics::stale_served`](crate::ClientMetrics::stale_served).
    /// [`Function::try_memoize_served`] tells the caller. A bust removes the stale value with
    /// the entry: a busted value is never served. `Duration::ZERO` (the default): off. Needs
    /// leases on.
    pub fn stale_if_error(mut self, keep: Duration) -> Self {
        self.policy.stale_if_error = keep;
        self
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

    /// The client's near cache, when it has one and this handle may use it. A handle with
    /// stale-while-revalidate ([`Function::refresh_after`], [`Function::xfetch`]) does not:
    /// its hits must reach the service, which decides when one is due and hands out the
    /// lease to recompute it; a near copy would hide that, and the entry would never refresh.
    fn near(&self) -> Option<&Arc<Near>> {
        let refreshes = !self.policy.refresh_after.is_zero() || self.policy.beta > 0.0;
        self.client.near().filter(|_| !refreshes)
    }

    /// The near cache's copy of `key`, decoded, when it has a servable one (and it decodes).
    fn near_hit<T: DeserializeOwned>(&self, key: &EntryKey) -> Option<T> {
        let near = self.near()?;
        let bytes = near.get(key)?;
        let Some(value) = self.decode::<T>(&bytes) else {
            near.discard(key);
            return None;
        };
        self.client.count_hit();
        Some(value)
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
    /// get its result. Across processes, leases (on by default, [`Function::lease`]) make one
    /// caller fleet-wide compute a missing entry while the others wait for its write and get
    /// its value; a result computed from data older than a bust is returned to its callers
    /// but not stored. When the service is down, slow or erroring, the result is computed and
    /// returned all the same (fail-open); a stored value that no longer decodes into `T` is
    /// treated as a miss and overwritten.
    ///
    /// With a near cache ([`ClientOptions::near_cache_bytes`](crate::ClientOptions::near_cache_bytes)),
    /// a call whose entry this process has copied is answered from the copy, without a round
    /// trip; another process's bust of it is then seen within milliseconds of returning
    /// (README, "The near cache"), this process's own at once.
    ///
    /// With [`Function::refresh_after`] or [`Function::xfetch`], a cached entry that is due is
    /// recomputed by the one caller that wins its lease, **inside this call**: that caller
    /// returns the new value once computed, everyone else (in this process and elsewhere) the
    /// cached value at once. `compute` is borrowed, so it cannot outlive the call; for a
    /// winner that returns at once too, use [`Function::memoize_detached`].
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
    /// never (each waiting caller then runs the function itself). With
    /// [`Function::stale_if_error`], an `Err` when a stale value is at hand serves that value
    /// instead ([`Function::try_memoize_served`] says which happened). A failed computation
    /// gives its lease back at once, so the next caller anywhere can try.
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

    /// As [`Function::try_memoize`], saying whether the result is stale: a value past its
    /// TTL served by [`Function::stale_if_error`] because computing a fresh one failed (or
    /// another caller held the lease past its lifetime without writing). Use it where a stale
    /// answer must be shown as such (a banner, a header, a metric).
    ///
    /// ```no_run
    /// # async fn example(cm: cache_money::Client) -> Result<(), cache_money::Error> {
    /// use std::time::Duration;
    /// use cache_money::Ttl;
    /// let rates = cm
    ///     .function("app", "exchange_rates", Ttl::MINUTE)
    ///     .stale_if_error(Duration::from_secs(3600));
    /// let served = rates
    ///     .try_memoize_served(&("EUR",), || async { Ok::<f64, cache_money::Error>(1.08) })
    ///     .await?;
    /// if served.stale {
    ///     // the upstream failed: this is the last known rate, up to an hour old
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `compute`'s error when no stale value is at hand, or [`Error::Args`] converted into
    /// `E`.
    pub async fn try_memoize_served<A, T, E, F, Fut>(
        &self,
        args: &A,
        compute: F,
    ) -> Result<Served<T>, E>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if !self.client.options().enabled {
            return compute().await.map(Served::fresh);
        }
        let key = self.entry_key(args)?;
        self.memoize_inline(&key, &self.tags, compute).await
    }

    /// As [`Function::memoize`], except that a caller winning the lease to recompute a due
    /// entry ([`Function::refresh_after`], [`Function::xfetch`]) returns the cached value at
    /// once like everyone else, and the recomputation runs in a task spawned on the current
    /// tokio runtime, writing its result with the lease when done. So with
    /// stale-while-revalidate no caller ever waits for a recomputation; the price is that
    /// `compute` (and what it captures) must be `Send + 'static`, as it may run after the
    /// call returned. On a miss there is nothing to return yet, so the caller computes in
    /// the call, as with [`Function::memoize`].
    ///
    /// (Named for the recomputation being detached from the call, like a spawned task. The
    /// spawned recomputation's errors and panics stay in its task: the entry then stays as it
    /// was and its lease is given back, so a later caller recomputes it.)
    ///
    /// ```no_run
    /// # async fn example(cm: cache_money::Client) -> Result<(), cache_money::Error> {
    /// use std::time::Duration;
    /// use cache_money::Ttl;
    /// let report = cm
    ///     .function("app", "report", Ttl::HOUR)
    ///     .refresh_after(Duration::from_secs(600));
    /// let id = 7_u64;
    /// let text: String = report
    ///     .memoize_detached(&(id,), move || async move { format!("report {id}") })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Only [`Error::Args`], as [`Function::memoize`].
    pub async fn memoize_detached<A, T, F, Fut>(&self, args: &A, compute: F) -> Result<T, Error>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.try_memoize_detached(args, move || async move { Ok::<T, Error>(compute().await) })
            .await
    }

    /// As [`Function::try_memoize`], recomputing due entries in a spawned task as
    /// [`Function::memoize_detached`] does. A failed spawned recomputation leaves the entry
    /// as it was (and gives the lease back); its error is logged at debug, not returned to
    /// anyone.
    ///
    /// # Errors
    /// `compute`'s error (from a computation in the call, on a miss), or [`Error::Args`]
    /// converted into `E`.
    pub async fn try_memoize_detached<A, T, E, F, Fut>(&self, args: &A, compute: F) -> Result<T, E>
    where
        A: Serialize + ?Sized,
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: From<Error> + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        if !self.client.options().enabled {
            return compute().await;
        }
        let key = self.entry_key(args)?;
        match self.memoize_key(&key, &self.tags, compute).await {
            Outcome::Done(result) => result.map(Served::into_value),
            Outcome::Due {
                current,
                token,
                compute,
            } => {
                // Counted now, not in the task: the caller's metrics say at once that a
                // recomputation is under way.
                self.client.count(Event::Refreshed);
                let this = self.clone();
                tokio::spawn(async move {
                    let tags = this.tags.clone();
                    this.revalidate(&key, &tags, token, compute).await;
                });
                Ok(current)
            }
        }
    }

    /// `try_memoize` of `key`, recomputing a due entry in the call.
    async fn memoize_inline<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        compute: F,
    ) -> Result<Served<T>, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.memoize_key(key, tags, compute).await {
            Outcome::Done(result) => result,
            Outcome::Due {
                current,
                token,
                compute,
            } => {
                self.client.count(Event::Refreshed);
                let value = self.revalidate(key, tags, token, compute).await;
                Ok(Served::fresh(value.unwrap_or(current)))
            }
        }
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
            Mode::Memoize => self
                .memoize_inline(key, tags, compute)
                .await
                .map(Served::into_value),
            Mode::Refresh => self.refresh_key(key, tags, compute).await,
        }
    }

    /// `try_memoize` of `key`: this process's single flight, the lookup (with the lease),
    /// and the computation. A due entry's recomputation is left to the caller ([`Outcome`]).
    async fn memoize_key<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        compute: F,
    ) -> Outcome<T, E, F>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // A near copy is a live hit, never stale: no flight, no lease, no round trip.
        if let Some(value) = self.near_hit::<T>(key) {
            return Outcome::Done(Ok(Served::fresh(value)));
        }
        // Leaves the flight when dropped, even if this caller is cancelled or panics.
        let flight = self.client.flights().join(key);
        let mut compute = Some(compute);
        // The first caller (the leader) looks up and computes; the others wait for it here.
        let mut led: Option<Outcome<T, E, F>> = None;
        let shared = flight
            .get_or_lead(|| async {
                let compute = compute.take().expect("the leader runs init once");
                let (outcome, shared) = self.lead(key, tags, &flight, compute).await;
                led = Some(outcome);
                shared
            })
            .await
            .clone();
        drop(flight);
        if let Some(outcome) = led {
            return outcome;
        }
        if let Some(shared) = shared
            && let Some(value) = self.decode::<T>(&shared.bytes)
        {
            return Outcome::Done(Ok(Served {
                value,
                stale: shared.stale,
            }));
        }
        // The leader's result could not be shared (an error, or it did not encode): compute
        // our own. `compute` is still ours, since only the leader took it.
        match compute.take() {
            Some(compute) => {
                self.client.count_computed();
                Outcome::Done(compute().await.map(Served::fresh))
            }
            None => unreachable!("a follower keeps its compute function"),
        }
    }

    /// The leader's work: a lookup (waiting for another caller's lease if need be), else the
    /// computation and a write. Returns the outcome and what to share with the followers. A
    /// result computed while a [`Function::refresh`] of the key took over its flight is
    /// returned but not stored: the refresh's newer value stays.
    async fn lead<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        flight: &Flight<'_>,
        compute: F,
    ) -> (Outcome<T, E, F>, Option<Shared>)
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (lease, stale) = match self.lookup::<T>(key, tags).await {
            Found::Hit { value, bytes, due } => {
                let shared = Some(Shared {
                    bytes,
                    stale: false,
                });
                let outcome = match due {
                    Some(token) => Outcome::Due {
                        current: value,
                        token,
                        compute,
                    },
                    None => Outcome::Done(Ok(Served::fresh(value))),
                };
                return (outcome, shared);
            }
            Found::Stale(stale) => return self.serve_stale(stale),
            Found::Compute { lease, stale } => (lease, stale),
        };
        self.client.count_computed();
        let guard = match lease {
            Lease::Won(token) => Some(LeaseGuard::new(&self.client, Self::pb_key(key), token)),
            Lease::None | Lease::Uncached => None,
        };
        let started = Instant::now();
        let result = compute().await;
        let took = started.elapsed();
        match result {
            Ok(value) => {
                let fresh = Fresh { took, lease, guard };
                let bytes = self
                    .keep(key, tags, &value, Write::Store, fresh, || {
                        flight.is_current()
                    })
                    .await;
                let shared = bytes.map(|bytes| Shared {
                    bytes,
                    stale: false,
                });
                (Outcome::Done(Ok(Served::fresh(value))), shared)
            }
            Err(err) => {
                if let Some(guard) = guard {
                    guard.release().await;
                }
                match stale {
                    Some(stale) => self.serve_stale(stale),
                    None => (Outcome::Done(Err(err)), None),
                }
            }
        }
    }

    /// Serves a value past its TTL (stale-if-error), to this caller and its followers.
    fn serve_stale<T, E, F>(
        &self,
        (value, bytes): (T, Bytes),
    ) -> (Outcome<T, E, F>, Option<Shared>) {
        self.client.count(Event::StaleServed);
        debug!(namespace = %self.namespace, function = %self.name, "serving a stale value: no fresh one could be had");
        let shared = Some(Shared { bytes, stale: true });
        (Outcome::Done(Ok(Served { value, stale: true })), shared)
    }

    /// The leader's lookup of `key`: with leases on, it asks for the lease, and while another
    /// caller holds it looks again (as the service says, jittered) until there is a value, the
    /// lease is this caller's, or the [`WaitBudget`] is spent.
    async fn lookup<T: DeserializeOwned>(&self, key: &EntryKey, tags: &[String]) -> Found<T> {
        let lifetime = self.policy.lifetime(self.client.options().lease);
        let mut request = self.policy.get_request(Self::pb_key(key), lifetime, tags);
        let near = self.near();
        // A near copy must not outlive its entry's TTL: ask for the time it has left.
        request.want_ttl = near.is_some();
        let leased = request.lease_ms > 0;
        let mut stale = None;
        let mut budget: Option<WaitBudget> = None;
        loop {
            let request = request.clone();
            // Taken before sending: the copy's expiry counts from here, and what empties the
            // near cache meanwhile keeps this answer out of it.
            let ticket = near.and_then(|near| near.ticket(&self.namespace));
            let found = self
                .client
                .cache_rpc("Get", &self.warned_refused, || self.client.raw_get(request))
                .await;
            let Some(reply) = found else {
                // Fail-open, and the result is written as before leases (unconditionally):
                // a lookup that merely timed out (a cold connection, a busy host) must not
                // leave the entry unwritten. The price: such a write is not kept out by a
                // bust made while computing, as no write was before leases.
                return Found::Compute {
                    lease: Lease::None,
                    stale,
                };
            };
            let won = (reply.lease == pb::Lease::Won as i32).then_some(reply.lease_token);
            if won.is_some() {
                self.client.count(Event::LeaseWon);
            }
            if reply.hit {
                if let Some(value) = self.decode::<T>(&reply.value) {
                    self.client.count_hit();
                    // Only a live hit that is not due goes into the near cache (a stale value
                    // is never a hit; a due one is being recomputed).
                    if let (Some(near), None) = (near, won) {
                        if let (Some(hook), Some(_)) =
                            (&self.client.options().near_insert_hook, ticket)
                        {
                            hook().await;
                        }
                        near.offer(
                            key,
                            reply.value.clone(),
                            ticket,
                            reply.position,
                            reply.ttl_ms,
                        );
                    }
                    return Found::Hit {
                        value,
                        bytes: reply.value,
                        due: won,
                    };
                }
                // A value of another type: recompute and overwrite it (with the lease, if it
                // was due and this caller got it).
                let lease = won.map_or(Lease::None, Lease::Won);
                return Found::Compute { lease, stale: None };
            }
            // Only the latest answer's stale value counts: one seen earlier may have been
            // busted since, and a busted value is never served.
            stale = if reply.stale {
                self.decode::<T>(&reply.value)
                    .map(|value| (value, reply.value.clone()))
            } else {
                None
            };
            if let Some(token) = won {
                return Found::Compute {
                    lease: Lease::Won(token),
                    stale,
                };
            }
            if !leased || reply.lease != pb::Lease::Wait as i32 {
                // No lease asked for, or a service that does not hand them out: as before
                // leases, every process computes and writes.
                return Found::Compute {
                    lease: Lease::None,
                    stale,
                };
            }
            let budget = budget.get_or_insert_with(|| {
                self.client.count(Event::LeaseWaited);
                WaitBudget::new(Instant::now(), lifetime, self.client.options().deadline)
            });
            budget.holder_has(
                Duration::from_millis(reply.lease_left_ms.into()),
                Instant::now(),
            );
            match budget.next_sleep(reply.retry_after_ms, Instant::now()) {
                Some(pause) => tokio::time::sleep(pause).await,
                None => {
                    self.client.count(Event::LeaseWaitTimedOut);
                    debug!(namespace = %self.namespace, function = %self.name, "a lease holder did not write within the lease's lifetime; computing without caching");
                    return match stale {
                        Some(stale) => Found::Stale(stale),
                        None => Found::Compute {
                            lease: Lease::Uncached,
                            stale: None,
                        },
                    };
                }
            }
        }
    }

    /// Recomputes a live entry that is due (stale-while-revalidate) with lease `token`, won
    /// by this caller alone, and writes the result with it. Returns the new value, or `None`
    /// when the computation failed (the lease is then released and the entry stays as it
    /// was, to be recomputed by a later caller).
    async fn revalidate<T, E, F, Fut>(
        &self,
        key: &EntryKey,
        tags: &[String],
        token: u64,
        compute: F,
    ) -> Option<T>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.client.count_computed();
        let guard = LeaseGuard::new(&self.client, Self::pb_key(key), token);
        let started = Instant::now();
        let result = compute().await;
        let took = started.elapsed();
        match result {
            Ok(value) => {
                let fresh = Fresh {
                    took,
                    lease: Lease::Won(token),
                    guard: Some(guard),
                };
                self.store(key, tags, &value, fresh).await;
                Some(value)
            }
            Err(_) => {
                debug!(namespace = %self.namespace, function = %self.name, "recomputing a due entry failed; it stays as it was and its lease is released");
                guard.release().await;
                None
            }
        }
    }

    fn encode<T: Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(value).map(Bytes::from)
    }

    /// Encodes and stores a fresh result as `fresh` says; returns its encoding when it can be
    /// shared. A lease that ends up unused (nothing to write) is released.
    async fn store<T: Serialize>(
        &self,
        key: &EntryKey,
        tags: &[String],
        value: &T,
        fresh: Fresh,
    ) -> Option<Bytes> {
        let Fresh { took, lease, guard } = fresh;
        let encoded = match Self::encode(value) {
            Ok(encoded) => encoded,
            Err(err) => {
                warn!(namespace = %self.namespace, function = %self.name, cause = %err, "result does not encode as JSON; not cached");
                release(guard).await;
                return None;
            }
        };
        let token = match lease {
            Lease::Uncached => return Some(encoded),
            Lease::None => 0,
            Lease::Won(token) => token,
        };
        if !self.cache_none && encoded.as_ref() == b"null" {
            release(guard).await;
            return Some(encoded);
        }
        let request = pb::PutRequest {
            key: Some(Self::pb_key(key)),
            value: encoded.clone(),
            ttl_seconds: u32::try_from(self.ttl.as_secs()).unwrap_or(u32::MAX),
            tags: tags.to_vec(),
            lease_token: token,
            compute_ms: compute_ms(took),
            stale_seconds: self
                .policy
                .stale_seconds(self.ttl, self.client.options().max_ttl),
        };
        let mut rpc = self.client.raw();
        let reply = self
            .client
            .cache_rpc("Put", &self.warned_refused, || async move {
                rpc.put(request).await
            })
            .await;
        // Answered: the lease is spent (written with, or voided already). Not answered (the
        // service refused the write as invalid, failed or timed out): the guard, dropped
        // armed, gives the lease back from a spawned task, so the callers elsewhere need not
        // wait for it to expire, nor this one for the Release. (A write that timed out but
        // lands after the Release is refused: uncached, never wrong.)
        if reply.is_some()
            && let Some(mut guard) = guard
        {
            guard.disarm();
        }
        if reply.is_some_and(|reply| reply.refused) {
            self.client.count(Event::RefusedWrite);
            debug!(namespace = %self.namespace, function = %self.name, "write refused: the lease was voided (a bust or a newer write) while computing; the result is returned, not cached");
        }
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
                // From here the key's calls in this process wait for the refresh: none may
                // read this process's old copy meanwhile, nor a lookup already in flight put
                // one back.
                self.client.own_change(&Scope::Entry(key.clone()));
                self.client.count_computed();
                let started = Instant::now();
                let result = compute().await;
                let encoded = match &result {
                    // No lease: a refresh is newer than any lease, and its write voids them.
                    Ok(value) => {
                        let fresh = Fresh {
                            took: started.elapsed(),
                            lease: Lease::None,
                            guard: None,
                        };
                        self.keep(key, tags, value, Write::Overwrite, fresh, || {
                            claim.is_current()
                        })
                        .await
                    }
                    Err(_) => None,
                };
                *led_by_refresh = Some(result);
                encoded.map(|bytes| Shared {
                    bytes,
                    stale: false,
                })
            })
            .await;
        led.expect("lead runs the refresh to completion before it returns")
    }

    /// Stores a fresh `value` of `key` (as [`Write`] and `fresh` say) while this computation
    /// still holds the key, and returns its encoding for the callers sharing it; a refresh
    /// that started later stores its newer value instead (and this one's lease, if any, is
    /// given back).
    async fn keep<T: Serialize>(
        &self,
        key: &EntryKey,
        tags: &[String],
        value: &T,
        write: Write,
        fresh: Fresh,
        is_current: impl Fn() -> bool,
    ) -> Option<Bytes> {
        if !is_current() {
            release(fresh.guard).await;
            return Self::encode(value).ok();
        }
        let lease = fresh.lease;
        let encoded = match write {
            Write::Store => self.store(key, tags, value, fresh).await,
            Write::Overwrite => self.overwrite(key, tags, value, fresh).await,
        };
        // A write with a lease needs no clean-up: a refresh's write voids the lease, so this
        // one is either refused or lands first and is overwritten. Nor does one never sent.
        if lease == Lease::None {
            self.unless_replaced(key, is_current).await;
        }
        encoded
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
        // Before sending as well as after, as `Client::bust_rpc` does: a dropped future
        // still drops the copy.
        self.client.own_change(&Scope::Entry(key.clone()));
        let mut rpc = self.client.raw();
        self.client
            .cache_rpc("Bust", &self.warned_refused, || async move {
                rpc.bust(request).await
            })
            .await;
        self.client.own_change(&Scope::Entry(key.clone()));
    }

    /// Stores a refreshed result; one that is not cached (`null`) removes the old entry.
    async fn overwrite<T: Serialize>(
        &self,
        key: &EntryKey,
        tags: &[String],
        value: &T,
        fresh: Fresh,
    ) -> Option<Bytes> {
        let encoded = self.store(key, tags, value, fresh).await;
        // A refresh replaces the entry: this process's copy goes before it returns.
        self.client.own_change(&Scope::Entry(key.clone()));
        let encoded = encoded?;
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
        let entry = self.entry_key(args)?;
        let key = Some(Self::pb_key(&entry));
        let removed = self
            .client
            .bust_rpc(Scope::Entry(entry), |mut rpc| async move {
                rpc.bust(pb::BustRequest { key }).await
            })
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
        let scope = Scope::Function(self.namespace.clone(), self.name.clone());
        self.client
            .bust_rpc(
                scope,
                |mut rpc| async move { rpc.bust_function(request).await },
            )
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
