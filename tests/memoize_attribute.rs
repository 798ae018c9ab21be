//! `#[cache_money::memoize]` end to end against the real server binary: methods, borrowed
//! arguments, `Result` and `Option`, argument names the expansion uses itself, `key`, `skip`,
//! versions and refresh.
//!
//! Each test starts its own server. The free functions here name their client with
//! `client = test_client()`, the client the running test put in a thread-local (each
//! `#[tokio::test]` runs on its own thread); the process default (`cache_money::install`) is
//! exercised in `tests/memoize_walkthrough.rs`, a binary of its own since it is global.

mod common;

use std::{
    cell::RefCell,
    sync::atomic::{AtomicUsize, Ordering::SeqCst},
};

use cache_money::{Client, Ttl, canonical, memoize};
use common::CacheServer;
use tokio::sync::oneshot;

thread_local! {
    static CLIENT: RefCell<Option<Client>> = const { RefCell::new(None) };
}

/// The running test's client.
fn test_client() -> Client {
    CLIENT.with(|client| client.borrow().clone().expect("the test set its client"))
}

/// Starts a server and makes its client the running test's.
async fn serve() -> (CacheServer, Client) {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    CLIENT.with(|client| *client.borrow_mut() = Some(cm.clone()));
    (server, cm)
}

/// The digest a plain handle gives these arguments: what the attribute must key a call as.
fn digest_of<A: serde::Serialize>(args: &A) -> String {
    canonical::digest(args).unwrap()
}

// --- Methods -------------------------------------------------------------------------------

struct Users {
    cache: Client,
    /// Differs between instances, to show `&self` is not keyed.
    instance: u32,
    lookups: AtomicUsize,
}

impl Users {
    #[memoize(client = &self.cache, ttl = Ttl::HOUR)]
    async fn name(&self, id: u64) -> String {
        self.lookups.fetch_add(1, SeqCst);
        format!("user-{id}")
    }

    #[memoize(client = self.cache.clone(), ttl = 60)]
    async fn rename(&mut self, id: u64) -> String {
        self.instance += 1;
        format!("renamed-{id}")
    }
}

/// A method keys only its arguments (`&self` skipped), so two instances share entries; its
/// `_bust`, `_bust_all` and `_function` companions act on that entry; `&mut self` works too.
#[tokio::test]
async fn methods_skip_self_and_have_companions() {
    let (_server, cm) = serve().await;
    let users = |instance| Users {
        cache: cm.clone(),
        instance,
        lookups: AtomicUsize::new(0),
    };
    let (first, second) = (users(1), users(2));
    assert_eq!(first.name(7).await, "user-7");
    assert_eq!(second.name(7).await, "user-7");
    assert_eq!(
        (first.lookups.load(SeqCst), second.lookups.load(SeqCst)),
        (1, 0),
        "the second instance computed: self was keyed"
    );

    let handle = first.name_function().unwrap();
    assert_eq!(handle.namespace(), "memoize_attribute");
    assert_eq!(handle.name(), "name");
    assert_eq!(handle.ttl(), Ttl::HOUR);
    assert_eq!(handle.digest(&(7,)).unwrap(), digest_of(&(7,)));

    assert!(second.name_bust(7).await.unwrap());
    assert!(!second.name_bust(7).await.unwrap(), "the entry stayed");
    assert_eq!(first.name(7).await, "user-7");
    assert_eq!(first.lookups.load(SeqCst), 2, "not recomputed after bust");
    first.name(8).await;
    assert_eq!(first.name_bust_all().await.unwrap(), 2);

    let mut renamer = users(3);
    assert_eq!(renamer.rename(1).await, "renamed-1");
    assert_eq!(renamer.rename(1).await, "renamed-1");
    assert_eq!(renamer.instance, 4, "a &mut self method ran twice");
    assert_eq!(renamer.rename_function().unwrap().ttl().as_secs(), 60);
}

struct Wrap<T> {
    cache: Client,
    value: T,
}

impl<T: Copy + serde::Serialize + serde::de::DeserializeOwned> Wrap<T> {
    #[memoize(client = &self.cache)]
    async fn value(&self, id: u32) -> (u32, T) {
        (id, self.value)
    }
}

/// Each instantiation of a generic `impl` keys its `Self` type's arguments: `Wrap<u64>` and
/// `Wrap<i64>` called with the same arguments get their own entries and handles.
#[tokio::test]
async fn generic_impls_key_each_instantiation() {
    let (_server, cm) = serve().await;
    let unsigned = Wrap {
        cache: cm.clone(),
        value: 7u64,
    };
    let signed = Wrap {
        cache: cm.clone(),
        value: -7i64,
    };
    assert_eq!(unsigned.value(1).await, (1, 7));
    assert_eq!(
        signed.value(1).await,
        (1, -7),
        "Wrap<i64> read Wrap<u64>'s entry"
    );
    assert_eq!(unsigned.value(1).await, (1, 7));

    let (unsigned_fn, signed_fn) = (
        unsigned.value_function().unwrap(),
        signed.value_function().unwrap(),
    );
    let md5 = |input: &str| format!("{:x}", md5::compute(input));
    assert_eq!(unsigned_fn.digest(&(1,)).unwrap(), md5("<u64>:[1]"));
    assert_eq!(signed_fn.digest(&(1,)).unwrap(), md5("<i64>:[1]"));
    assert!(signed.value_bust(1).await.unwrap());
    assert!(
        unsigned.value_bust(1).await.unwrap(),
        "Wrap<u64>'s entry was busted too"
    );
}

struct Catalog {
    cache: Client,
}

impl Catalog {
    #[memoize(client = &self.cache)]
    async fn title(&self, id: u32) -> String {
        format!("title-{id}")
    }
}

/// A method's explicit client is not kept alive by its memoized function: once the last
/// handle of it is dropped, its connection closes.
#[tokio::test]
async fn an_explicit_client_is_not_kept_alive() {
    let server = CacheServer::memory(&[]);
    let forwarder = common::Forwarder::start(server.addr()).await;
    let catalog = Catalog {
        cache: Client::connect(forwarder.url()).await.unwrap(),
    };
    assert_eq!(catalog.title(1).await, "title-1");
    assert_eq!(forwarder.accepted(), 1, "the call reached the service");
    drop(catalog);
    let closed = common::eventually(std::time::Duration::from_secs(5), || async {
        forwarder.closed_by_client() == 1
    })
    .await;
    assert!(
        closed,
        "the client's connection stayed open after it was dropped"
    );
}

// --- Borrowed arguments, Result, Option ----------------------------------------------------

static GREETINGS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
async fn greet(name: &str, tags: &[String]) -> String {
    GREETINGS.fetch_add(1, SeqCst);
    format!("hello {name} {}", tags.join(","))
}

/// `&str` and `&[T]` arguments need neither `Clone` nor `'static`: a call with borrowed,
/// short-lived data is cached and keyed as `[name, [tags…]]`.
#[tokio::test]
async fn borrowed_arguments_are_keyed() {
    let (_server, cm) = serve().await;
    let name = String::from("ada");
    let tags = vec!["x".to_owned(), "y".to_owned()];
    assert_eq!(greet(&name, &tags).await, "hello ada x,y");
    assert_eq!(greet(name.as_str(), &tags[..]).await, "hello ada x,y");
    assert_eq!(GREETINGS.load(SeqCst), 1, "the second call computed");
    let stored: String = cm
        .function("memoize_attribute", "greet", Ttl::HOUR)
        .memoize(&("ada", ["x", "y"]), || async { unreachable!("stored") })
        .await
        .unwrap();
    assert_eq!(stored, "hello ada x,y");
}

/// An error type with no serde at all: `Err` is never stored, so it needs none.
#[derive(Debug, PartialEq)]
struct NotFound;

static FETCHES: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
async fn fetch(id: u32) -> Result<String, NotFound> {
    FETCHES.fetch_add(1, SeqCst);
    if id == 0 {
        return Err(NotFound);
    }
    let doubled: u32 = format!("{}", id * 2).parse().map_err(|_| NotFound)?;
    Ok(format!("item-{doubled}"))
}

static FINDS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
async fn find(id: u32) -> Option<u32> {
    FINDS.fetch_add(1, SeqCst);
    (id > 0).then_some(id)
}

#[memoize(client = test_client(), name = "find_keeping_none", cache_none = true)]
async fn find_keeping_none(id: u32) -> Option<u32> {
    FINDS.fetch_add(1, SeqCst);
    (id > 0).then_some(id)
}

/// A `Result` function caches `Ok` and never `Err` (with `?` and `return` in its body); an
/// `Option` function caches `Some` and not `None`, unless `cache_none = true`.
#[tokio::test]
async fn results_and_options() {
    let (_server, _cm) = serve().await;
    assert_eq!(fetch(0).await, Err(NotFound));
    assert_eq!(fetch(0).await, Err(NotFound));
    assert_eq!(FETCHES.load(SeqCst), 2, "an Err was cached");
    assert_eq!(fetch(4).await, Ok("item-8".to_owned()));
    assert_eq!(fetch(4).await, Ok("item-8".to_owned()));
    assert_eq!(FETCHES.load(SeqCst), 3, "an Ok was not cached");
    assert_eq!(fetch::refresh(4).await, Ok("item-8".to_owned()));
    assert_eq!(FETCHES.load(SeqCst), 4, "refresh did not run the function");

    assert_eq!(find(0).await, None);
    assert_eq!(find(0).await, None);
    assert_eq!(FINDS.load(SeqCst), 2, "None was cached");
    assert_eq!(find(3).await, Some(3));
    assert_eq!(find(3).await, Some(3));
    assert_eq!(FINDS.load(SeqCst), 3, "Some was not cached");
    assert_eq!(find_keeping_none(0).await, None);
    assert_eq!(find_keeping_none(0).await, None);
    assert_eq!(
        FINDS.load(SeqCst),
        4,
        "cache_none = true did not cache None"
    );
}

// --- Names the expansion uses, key and skip ------------------------------------------------

static SHADOWS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
#[allow(clippy::too_many_arguments)]
async fn shadows(
    key: u32,
    client: u32,
    args: u32,
    prepared: u32,
    site: u32,
    compute: u32,
    mut total: u32,
) -> u32 {
    SHADOWS.fetch_add(1, SeqCst);
    total += key + client + args + prepared + site + compute;
    total
}

/// Arguments named like the expansion's own variables (`key`, `client`, `args`, `prepared`,
/// …, and a `mut` one) compile, reach the body unchanged and key as the arguments.
#[tokio::test]
async fn arguments_may_take_any_name() {
    let (_server, cm) = serve().await;
    assert_eq!(shadows(1, 2, 3, 4, 5, 6, 100).await, 121);
    assert_eq!(shadows(1, 2, 3, 4, 5, 6, 100).await, 121);
    assert_eq!(SHADOWS.load(SeqCst), 1);
    let handle = cm.function("memoize_attribute", "shadows", Ttl::HOUR);
    assert!(handle.bust(&(1, 2, 3, 4, 5, 6, 100)).await.unwrap());
}

/// A stand-in for a database handle: not `Serialize`, so it can only be skipped.
struct Db {
    rows: Vec<String>,
}

#[derive(serde::Serialize)]
struct Query {
    id: usize,
    trace: String,
}

#[memoize(client = test_client(), skip(db))]
async fn row(db: &Db, id: usize) -> String {
    db.rows[id].clone()
}

#[memoize(client = test_client(), key = (query.id,), ns = "__main__", name = "row_by_query")]
async fn row_by_query(db: &Db, query: Query) -> String {
    format!("{}-{}", db.rows[query.id], query.trace)
}

/// `skip(db)` leaves a non-`Serialize` argument out of the key; `key = (query.id,)` keys by
/// part of an argument, so another `trace` is a hit; `ns` and `name` replace the defaults.
#[tokio::test]
async fn skip_and_key_choose_what_is_keyed() {
    let (_server, cm) = serve().await;
    let db = Db {
        rows: vec!["zero".into(), "one".into()],
    };
    assert_eq!(row(&db, 1).await, "one");
    assert_eq!(
        row::function().unwrap().digest(&(1,)).unwrap(),
        digest_of(&(1,))
    );
    assert!(
        row::bust(&db, 1).await.unwrap(),
        "row(db, 1) was keyed without db as [1]"
    );

    let first = row_by_query(
        &db,
        Query {
            id: 1,
            trace: "a".into(),
        },
    )
    .await;
    let second = row_by_query(
        &db,
        Query {
            id: 1,
            trace: "b".into(),
        },
    )
    .await;
    assert_eq!((first.as_str(), second.as_str()), ("one-a", "one-a"));
    let handle = cm.function("__main__", "row_by_query", Ttl::HOUR);
    assert!(handle.bust(&(1,)).await.unwrap(), "not keyed as [query.id]");
}

// --- Versions ------------------------------------------------------------------------------

static V1_RUNS: AtomicUsize = AtomicUsize::new(0);
static V2_RUNS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client(), name = "price")]
async fn price_v1(sku: &str) -> u32 {
    V1_RUNS.fetch_add(1, SeqCst);
    sku.len() as u32
}

#[memoize(client = test_client(), name = "price", version = 2)]
async fn price_v2(sku: &str) -> String {
    V2_RUNS.fetch_add(1, SeqCst);
    format!("{} cents", sku.len() * 100)
}

/// Version 2 of a function never reads version 1's entry (whose type changed), keys as
/// `md5("v2:" + canonical arguments)`, and `bust_all` removes the entries of both versions;
/// version 1 keys exactly as an unversioned handle.
#[tokio::test]
async fn versions_have_their_own_key_space() {
    let (_server, cm) = serve().await;
    assert_eq!(price_v1("abc").await, 3);
    assert_eq!(price_v2("abc").await, "300 cents");
    assert_eq!(price_v1("abc").await, 3);
    assert_eq!(price_v2("abc").await, "300 cents");
    assert_eq!(
        (V1_RUNS.load(SeqCst), V2_RUNS.load(SeqCst)),
        (1, 1),
        "each version computes once and then reads its own entry"
    );

    let unversioned = cm.function("memoize_attribute", "price", Ttl::HOUR);
    assert_eq!(
        price_v1::function().unwrap().digest(&("abc",)).unwrap(),
        unversioned.digest(&("abc",)).unwrap()
    );
    let v2 = price_v2::function().unwrap();
    let expected = format!("{:x}", md5::compute(r#"v2:["abc"]"#));
    assert_eq!(v2.digest(&("abc",)).unwrap(), expected);
    assert_eq!(
        unversioned.clone().version(2).digest(&("abc",)).unwrap(),
        expected
    );

    assert_eq!(
        price_v2::bust_all().await.unwrap(),
        2,
        "both versions' entries"
    );
    assert_eq!(price_v1("abc").await, 3);
    assert_eq!(
        V1_RUNS.load(SeqCst),
        2,
        "version 1's entry survived bust_all"
    );
}

// --- Refresh -------------------------------------------------------------------------------

static STOCK: AtomicUsize = AtomicUsize::new(10);
static STOCK_READS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
async fn stock(sku: &str) -> usize {
    STOCK_READS.fetch_add(1, SeqCst);
    STOCK.load(SeqCst) + sku.len()
}

/// `refresh` runs the function although the entry is fresh, overwrites it, and later calls
/// read the new value.
#[tokio::test]
async fn refresh_overwrites_the_entry() {
    let (_server, _cm) = serve().await;
    assert_eq!(stock("a").await, 11);
    STOCK.store(20, SeqCst);
    assert_eq!(stock("a").await, 11, "served from the cache");
    assert_eq!(stock::refresh("a").await, 21);
    assert_eq!(stock("a").await, 21, "the entry was not overwritten");
    assert_eq!(STOCK_READS.load(SeqCst), 2);
}

static SHELF: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(Some(5));
static SHELF_READS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client())]
async fn shelf(id: u32) -> Option<u32> {
    SHELF_READS.fetch_add(1, SeqCst);
    SHELF.lock().unwrap().map(|stock| stock + id)
}

static LEDGER: std::sync::Mutex<Result<u32, &str>> = std::sync::Mutex::new(Ok(10));

#[memoize(client = test_client())]
async fn ledger(id: u32) -> Result<u32, &'static str> {
    LEDGER.lock().unwrap().map(|balance| balance + id)
}

/// A refresh whose result is not cached (`None`) removes the old entry, so callers stop
/// reading it; one that fails (`Err`) returns the error and leaves the entry.
#[tokio::test]
async fn refresh_to_none_removes_and_errors_keep_the_entry() {
    let (_server, _cm) = serve().await;
    assert_eq!(shelf(1).await, Some(6));
    *SHELF.lock().unwrap() = None;
    assert_eq!(shelf(1).await, Some(6), "served from the cache");
    assert_eq!(shelf::refresh(1).await, None);
    assert_eq!(shelf(1).await, None, "the old entry was still read");
    assert_eq!(SHELF_READS.load(SeqCst), 3);

    assert_eq!(ledger(1).await, Ok(11));
    *LEDGER.lock().unwrap() = Err("ledger down");
    assert_eq!(ledger::refresh(1).await, Err("ledger down"));
    assert_eq!(
        ledger(1).await,
        Ok(11),
        "the failed refresh removed the entry"
    );
}

type Gates = std::sync::Mutex<Vec<(u32, oneshot::Receiver<u32>)>>;

/// The gates [`gated`] calls wait on, by argument, in the order the test added them.
static GATES: Gates = std::sync::Mutex::new(Vec::new());
static GATED_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Adds a gate for the next `gated(id)` computation; it returns what is sent through it.
fn add_gate(id: u32) -> oneshot::Sender<u32> {
    let (open, shut) = oneshot::channel();
    GATES.lock().unwrap().push((id, shut));
    open
}

/// Lets other tasks run until `runs` `gated` computations have started (each takes its gate
/// as it starts); panics if they have not within 10 s.
async fn started(runs: usize) {
    let wait = async {
        while GATED_RUNS.load(SeqCst) < runs {
            tokio::task::yield_now().await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        panic!(
            "{runs} gated computations had not started after 10 s ({} had)",
            GATED_RUNS.load(SeqCst)
        );
    }
}

/// Returns what the test sends through the next gate of `id`.
#[memoize(client = test_client())]
async fn gated(id: u32) -> u32 {
    GATED_RUNS.fetch_add(1, SeqCst);
    let value = {
        let mut gates = GATES.lock().unwrap();
        let at = gates
            .iter()
            .position(|(gate, _)| *gate == id)
            .expect("a gate for the call");
        gates.remove(at).1
    };
    value.await.expect("the test opens the gate")
}

/// While a refresh runs, `memoize` calls of the same arguments wait for it and get its value
/// (no call computes, none reads the old entry); a `memoize` computation that was already
/// running when the refresh started, or an older refresh, finishes for its caller but does
/// not overwrite the newer refresh's entry.
#[tokio::test]
async fn memoize_during_refresh_gets_the_refreshed_value() {
    let (_server, cm) = serve().await;
    let handle = cm.function("memoize_attribute", "gated", Ttl::HOUR);
    let open = add_gate(1);
    open.send(100).unwrap();
    assert_eq!(gated(1).await, 100, "the first value, cached");

    // A refresh computing, and callers arriving meanwhile.
    let open_refresh = add_gate(1);
    let refresh = tokio::spawn(gated::refresh(1));
    started(2).await;
    let rpcs_before = cm.metrics().rpc_attempts;
    let callers: Vec<_> = (0..5).map(|_| tokio::spawn(gated(1))).collect();
    // The current-thread runtime polls each spawned caller before this task again; a
    // caller's first poll joins the refresh's flight (or, wrongly, starts a lookup).
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    assert!(
        callers.iter().all(|caller| !caller.is_finished()),
        "a caller did not wait for the refresh"
    );
    open_refresh.send(200).unwrap();
    assert_eq!(refresh.await.unwrap(), 200);
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 200);
    }
    assert_eq!(GATED_RUNS.load(SeqCst), 2, "a waiting caller computed");
    assert_eq!(
        cm.metrics().rpc_attempts - rpcs_before,
        1,
        "only the refresh's Put: a waiting caller looked the old entry up"
    );

    // A memoize computation under way when a refresh starts and ends does not overwrite it.
    let open_old = add_gate(2);
    let old = tokio::spawn(gated(2));
    started(3).await;
    let open_new = add_gate(2);
    open_new.send(2000).unwrap();
    assert_eq!(gated::refresh(2).await, 2000);
    open_old.send(1000).unwrap();
    assert_eq!(
        old.await.unwrap(),
        1000,
        "the older computation's caller gets its own result"
    );
    let stored: u32 = handle
        .memoize(&(2,), || async { unreachable!("an entry is stored") })
        .await
        .unwrap();
    assert_eq!(stored, 2000, "the older computation overwrote the refresh");

    // Of two refreshes at once, the later one's value stays, though the older finishes last.
    let open_first = add_gate(3);
    let first = tokio::spawn(gated::refresh(3));
    started(5).await;
    let open_second = add_gate(3);
    open_second.send(30).unwrap();
    assert_eq!(gated::refresh(3).await, 30);
    open_first.send(3).unwrap();
    assert_eq!(
        first.await.unwrap(),
        3,
        "the older refresh returns its own result"
    );
    let stored: u32 = handle
        .memoize(&(3,), || async { unreachable!("an entry is stored") })
        .await
        .unwrap();
    assert_eq!(stored, 30, "the older refresh overwrote the newer one");
}

// --- Tags ----------------------------------------------------------------------------------

static ABOUT_USER_RUNS: AtomicUsize = AtomicUsize::new(0);

#[memoize(client = test_client(), ns = "tags_app", tags = ["user:{id}"])]
async fn profile(id: u64) -> String {
    ABOUT_USER_RUNS.fetch_add(1, SeqCst);
    format!("profile-{id}")
}

#[memoize(client = test_client(), ns = "tags_app", tags = ["user:{id}", "shop:{shop}"])]
async fn orders(shop: &str, id: u64) -> Vec<u64> {
    ABOUT_USER_RUNS.fetch_add(1, SeqCst);
    vec![id, shop.len() as u64]
}

#[memoize(client = test_client(), ns = "tags_app", skip(size), tags = ["user:{id}", "{{size={size:>3}}}"])]
async fn avatar(id: u64, size: u32) -> String {
    ABOUT_USER_RUNS.fetch_add(1, SeqCst);
    format!("avatar-{id}-{size}")
}

/// Three functions tagged `user:{id}` from their arguments: busting `user:7` removes exactly
/// user 7's three entries (not user 8's), placeholders format like `format!` (a skipped
/// argument and a format spec included), and refresh writes with the tags too.
#[tokio::test]
async fn tags_interpolate_arguments_and_bust_together() {
    let (_server, cm) = serve().await;
    let runs = || ABOUT_USER_RUNS.load(SeqCst);
    for id in [7, 8] {
        profile(id).await;
        orders("acme", id).await;
        avatar(id, 64).await;
    }
    assert_eq!(runs(), 6);
    profile(7).await;
    assert_eq!(runs(), 6, "served from the cache");
    assert_eq!(cm.bust_tag("tags_app", "user:7").await.unwrap(), 3);
    for id in [7, 8] {
        profile(id).await;
        orders("acme", id).await;
        avatar(id, 64).await;
    }
    assert_eq!(
        runs(),
        9,
        "user 7's three were recomputed, user 8's were not"
    );
    assert_eq!(cm.bust_tag("tags_app", "shop:acme").await.unwrap(), 2);
    assert_eq!(cm.bust_tag("tags_app", "{size= 64}").await.unwrap(), 2);
    assert_eq!(profile::refresh(9).await, "profile-9");
    assert_eq!(cm.bust_tag("tags_app", "user:9").await.unwrap(), 1);
    assert_eq!(cm.bust_tag("other_ns", "user:8").await.unwrap(), 0);
}
