//! What `#[memoize]` runs: the process's default client ([`install`]), and the hidden runtime
//! the attribute expands to (`__private`: one [`Site`] per memoized function).
//!
//! A memoized function without a client (none installed, or a handle that cannot be made)
//! computes every call without caching and says so once at warn, as a call does while the
//! service is down; its busts return the error, since a bust that did not happen must be
//! reported.

use std::{
    borrow::Cow,
    convert::Infallible,
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::{
    Client, Error, Function,
    key::EntryKey,
    memoize::{HandleWarnings, Mode},
};

/// The client memoized functions use when they name none (`client = …`).
static DEFAULT_CLIENT: OnceLock<Client> = OnceLock::new();
/// Whether a call without a client has been warned about: once per process.
static WARNED_NOT_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Makes `client` the process's default client, the one `#[memoize]` functions cache through
/// unless they name another (`client = …`). Call it once at start-up, before the first
/// memoized call; calls made before compute without caching (warned once), and their busts
/// return [`Error::NotInstalled`].
///
/// # Errors
/// [`Error::AlreadyInstalled`] when a client was installed before: the first one stays, since
/// handles already made use it.
pub fn install(client: Client) -> Result<(), Error> {
    DEFAULT_CLIENT
        .set(client)
        .map_err(|_| Error::AlreadyInstalled)
}

/// The client [`install`]ed as the process's default, if any.
pub fn installed() -> Option<&'static Client> {
    DEFAULT_CLIENT.get()
}

/// One memoized function: its names and options as the attribute wrote them, and the
/// [`Function`] handle made from them on first use. Lives in a `static`.
#[derive(Debug)]
pub struct Site {
    namespace: &'static str,
    name: &'static str,
    /// The `ttl` option, evaluated when the handle is made; the client's default otherwise.
    ttl: Option<fn() -> Duration>,
    version: u32,
    cache_none: bool,
    /// The `lease`, `refresh_after` and `stale_if_error` options, evaluated when the handle
    /// is made.
    lease: Option<fn() -> Duration>,
    refresh_after: Option<fn() -> Duration>,
    stale_if_error: Option<fn() -> Duration>,
    /// The handle of the installed default client, which lives as long as the process
    /// anyway. Another client (`client = …`) gets a handle of its own per call, so the site
    /// keeps no client alive.
    handle: OnceLock<Function>,
    /// The once-per-handle warnings (undecodable values, refused stores) of every handle made
    /// here, so per-call handles do not warn on every call.
    handle_warnings: OnceLock<HandleWarnings>,
    /// Whether this function's own problem (a bad name or TTL, arguments that cannot be
    /// keyed) has been warned about.
    warned: AtomicBool,
}

impl Site {
    /// A function memoized under `namespace` (a module path) and `name`.
    pub const fn new(
        namespace: &'static str,
        name: &'static str,
        ttl: Option<fn() -> Duration>,
        version: u32,
        cache_none: bool,
    ) -> Self {
        Site {
            namespace,
            name,
            ttl,
            version,
            cache_none,
            lease: None,
            refresh_after: None,
            stale_if_error: None,
            handle: OnceLock::new(),
            handle_warnings: OnceLock::new(),
            warned: AtomicBool::new(false),
        }
    }

    /// The site with the attribute's lease options ([`Function::lease`],
    /// [`Function::refresh_after`], [`Function::stale_if_error`]); `None` leaves each as a
    /// handle has it by default.
    pub const fn leases(
        mut self,
        lease: Option<fn() -> Duration>,
        refresh_after: Option<fn() -> Duration>,
        stale_if_error: Option<fn() -> Duration>,
    ) -> Self {
        self.lease = lease;
        self.refresh_after = refresh_after;
        self.stale_if_error = stale_if_error;
        self
    }

    fn make(&self, client: &Client) -> Result<Function, Error> {
        let ttl = match self.ttl {
            Some(ttl) => ttl(),
            None => client.options().default_ttl,
        };
        let mut function = client
            .try_function(self.namespace, self.name, ttl)?
            .version(self.version)
            .cache_none(self.cache_none)
            .warnings(self.handle_warnings.get_or_init(HandleWarnings::default));
        if let Some(lease) = self.lease {
            function = function.lease(lease());
        }
        if let Some(age) = self.refresh_after {
            function = function.refresh_after(age());
        }
        if let Some(keep) = self.stale_if_error {
            function = function.stale_if_error(keep());
        }
        Ok(function)
    }

    /// This site as a method of `T`, the `Self` of the `impl` it is in: a generic `impl`'s
    /// instantiations share the one `static` site, so each call names its own `Self`, whose
    /// type arguments are keyed (`Function::self_type`).
    pub fn of<T: ?Sized>(&'static self) -> MethodSite {
        MethodSite {
            site: self,
            self_type: Some(std::any::type_name::<T>()),
        }
    }

    /// A free function's site: no `Self` to key.
    fn free(&'static self) -> MethodSite {
        MethodSite {
            site: self,
            self_type: None,
        }
    }

    /// The handle for `client`, or for the installed default client when `None`.
    ///
    /// # Errors
    /// [`Error::NotInstalled`] without a client; [`Error::InvalidName`] or
    /// [`Error::InvalidTtl`] when the handle cannot be made.
    pub fn function(&'static self, client: Option<Client>) -> Result<Function, Error> {
        self.free().function(client)
    }

    fn handle(&'static self, client: Option<Client>) -> Result<Cow<'static, Function>, Error> {
        let installed = installed();
        let client = match client {
            Some(client) if !installed.is_some_and(|default| default.same(&client)) => {
                return Ok(Cow::Owned(self.make(&client)?));
            }
            _ => installed.ok_or(Error::NotInstalled)?,
        };
        if let Some(handle) = self.handle.get() {
            return Ok(Cow::Borrowed(handle));
        }
        let made = self.make(client)?;
        // Another thread may have made it meanwhile, for the same client: keep the first.
        let _ = self.handle.set(made);
        Ok(Cow::Borrowed(
            self.handle
                .get()
                .expect("set just now, by this thread or another"),
        ))
    }

    /// The handle and key of one call, ready to run: the arguments are only borrowed here,
    /// so the call can then move them into the function. When either cannot be had, the call
    /// will compute without caching (warned once).
    pub fn prepare<A: Serialize + ?Sized>(
        &'static self,
        client: Option<Client>,
        args: &A,
    ) -> Prepared {
        self.free().prepare(client, args)
    }

    fn warn_uncached(&self, err: &Error) {
        let (function, namespace) = (self.name, self.namespace);
        if matches!(err, Error::NotInstalled) {
            if !WARNED_NOT_INSTALLED.swap(true, Relaxed) {
                warn!(%namespace, %function, "no cache-money client is installed (call cache_money::install(client) at start-up): memoized functions compute every call without caching (logged once)");
            }
        } else if !self.warned.swap(true, Relaxed) {
            warn!(%namespace, %function, cause = %err, "this memoized function cannot be cached: it computes without caching (logged once per function)");
        }
    }

    /// `bust` of the function's handle.
    ///
    /// # Errors
    /// As [`Site::function`] and [`Function::bust`].
    pub async fn bust<A: Serialize + ?Sized>(
        &'static self,
        client: Option<Client>,
        args: &A,
    ) -> Result<bool, Error> {
        self.free().bust(client, args).await
    }

    /// `bust_all` of the function's handle.
    ///
    /// # Errors
    /// As [`Site::function`] and [`Function::bust_all`].
    pub async fn bust_all(&'static self, client: Option<Client>) -> Result<u64, Error> {
        self.handle(client)?.bust_all().await
    }
}

/// A [`Site`] as a method of one `Self` type ([`Site::of`]), or as a free function.
#[derive(Debug, Clone, Copy)]
pub struct MethodSite {
    site: &'static Site,
    /// `core::any::type_name::<Self>()`, for a method.
    self_type: Option<&'static str>,
}

impl MethodSite {
    /// The site's handle for `client`, keying this `Self` type's arguments. The site keeps
    /// handles without them, so no instantiation is handed another's.
    fn handle(self, client: Option<Client>) -> Result<Cow<'static, Function>, Error> {
        let handle = self.site.handle(client)?;
        Ok(match self.self_type {
            Some(self_type) => Cow::Owned(handle.into_owned().self_type(self_type)),
            None => handle,
        })
    }

    /// As [`Site::function`].
    ///
    /// # Errors
    /// As [`Site::function`].
    pub fn function(self, client: Option<Client>) -> Result<Function, Error> {
        self.handle(client).map(Cow::into_owned)
    }

    /// As [`Site::prepare`].
    pub fn prepare<A: Serialize + ?Sized>(self, client: Option<Client>, args: &A) -> Prepared {
        let target = self
            .handle(client)
            .and_then(|handle| Ok((handle.entry_key(args)?, handle)));
        match target {
            Ok((key, handle)) => Prepared {
                target: Some((handle, key)),
                tags: Vec::new(),
            },
            Err(err) => {
                self.site.warn_uncached(&err);
                Prepared {
                    target: None,
                    tags: Vec::new(),
                }
            }
        }
    }

    /// As [`Site::bust`].
    ///
    /// # Errors
    /// As [`Site::bust`].
    pub async fn bust<A: Serialize + ?Sized>(
        self,
        client: Option<Client>,
        args: &A,
    ) -> Result<bool, Error> {
        self.handle(client)?.bust(args).await
    }

    /// As [`Site::bust_all`]: every entry of the function, of every `Self` type.
    ///
    /// # Errors
    /// As [`Site::bust_all`].
    pub async fn bust_all(self, client: Option<Client>) -> Result<u64, Error> {
        self.site.bust_all(client).await
    }
}

/// One call of a memoized function, keyed: run it with `memoize`, `refresh` or their `try_`
/// forms. Without a handle or key (see [`Site::prepare`]) each computes without caching.
#[derive(Debug)]
pub struct Prepared {
    target: Option<(Cow<'static, Function>, EntryKey)>,
    /// Written with the result (the attribute's `tags`).
    tags: Vec<String>,
}

impl Prepared {
    /// The call, writing its result with `tags` (see [`Function::tagged`]).
    pub fn tagged(self, tags: Vec<String>) -> Self {
        Prepared { tags, ..self }
    }

    /// [`Function::memoize`] of the call.
    pub async fn memoize<T, F, Fut>(self, compute: F) -> T
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.run(Mode::Memoize, compute).await
    }

    /// [`Function::refresh`] of the call.
    pub async fn refresh<T, F, Fut>(self, compute: F) -> T
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.run(Mode::Refresh, compute).await
    }

    /// [`Function::try_memoize`] of the call: `Ok` is cached, `Err` never.
    ///
    /// # Errors
    /// `compute`'s.
    pub async fn try_memoize<T, E, F, Fut>(self, compute: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.try_run(Mode::Memoize, compute).await
    }

    /// [`Function::try_refresh`] of the call.
    ///
    /// # Errors
    /// `compute`'s.
    pub async fn try_refresh<T, E, F, Fut>(self, compute: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.try_run(Mode::Refresh, compute).await
    }

    async fn run<T, F, Fut>(self, mode: Mode, compute: F) -> T
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let result: Result<T, Infallible> =
            self.try_run(mode, || async { Ok(compute().await) }).await;
        match result {
            Ok(value) => value,
        }
    }

    async fn try_run<T, E, F, Fut>(self, mode: Mode, compute: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match &self.target {
            Some((handle, key)) => handle.run_key(mode, key, &self.tags, compute).await,
            None => compute().await,
        }
    }
}
