//! The Redis Cluster store: the same entries, timeouts, in-flight limit and exact busting as
//! [`RedisStore`](super::RedisStore), over redis-rs's async cluster client, which routes each
//! command to the primary of its key's slot and follows MOVED, ASK and topology changes.
//!
//! - **Batches** (`GetMany`, `PutMany`, the size check before a `GetMany`) are grouped by slot;
//!   each slot's commands go to its primary as one pipeline, all slots at once, and the replies
//!   are put back in request order. A node failing mid-batch fails the whole batch (UNAVAILABLE), never a wrong or
//!   missing value for a key that was there.
//! - **Busts** of a function, a namespace or everything walk every primary with its own SCAN
//!   cursor, check every key against the exact grammar, and UNLINK one slot's keys per command
//!   (never a multi-slot UNLINK), sent to the primary that was scanned. The primaries are
//!   asked for their own view (`CLUSTER NODES`: their `myself` line with role, slots, none
//!   migrating, config epoch, and the whole slot map, which all must agree on; `run_id` from
//!   `INFO server`) before and after the walk; a node failing mid-walk or any difference
//!   between the two views (a failover, a resharding, a restart) makes the bust an
//!   UNAVAILABLE error saying the count may be partial, never a silent undercount.
//!   Busts run on connections that never retry: redis-rs re-sends a whole pipeline on retry,
//!   and a re-sent UNLINK whose first send ran would count 0.
//! - **Tags**: a tagged Put or PutMany first writes its tag indexes (one script call per
//!   index, routed by the index key, every reply checked), then its entries; if the index
//!   write fails, no entry is written. BustTag ZSCANs the index on its slot's primary and
//!   UNLINKs the entries its members name, one UNLINK per slot to that slot's primary, between
//!   the same two topology confirmations as the other busts: a node failing or a failover
//!   mid-bust makes it UNAVAILABLE, the count partial. Namespace and all busts also unlink
//!   the tag indexes they find, without counting them.
//! - **`Keys`** pages through the primaries in slot order. Its cursor is
//!   `{topology}:{node id}:{SCAN cursor}`, `topology` naming the primaries and their slots; a
//!   cursor from a topology that has since changed is refused with ABORTED, and the listing
//!   starts again from an empty cursor.
//! - **Health** is SERVING while a primary reports `cluster_state:ok`, every slot's primary
//!   answers PING, and the connection serving requests routes each primary's slots to that
//!   primary (`CLUSTER MYID`, slot-routed). redis-rs reads a new slot map only when a node
//!   answers MOVED or drops a connection; a primary that goes silent (power loss, partition)
//!   does neither, so after its replica is promoted the old map would keep routing its slots
//!   to it for good. When the check finds such a stale route, the serving connection is
//!   replaced by a fresh one, which reads the slot map anew.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::try_join_all;
use redis::{
    Cmd, FromRedisValue, Pipeline, RedisError, TlsCertificates, Value,
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr},
};
use tokio::time::{Instant, timeout_at};
use tracing::warn;

use super::{
    Gate, classify, from_value, key_infos, nonce_reply, publish_error, published_position,
    read_reply, removable, scripts, stored, tags, tail_reply, xadd, xrange_at, xread,
    xrevrange_last,
};
use crate::key::{EntryKey, FunctionKey};
use crate::server::key::KeyLayout;
use crate::server::metrics::Metrics;
use crate::server::store::lease::{self, Acquired, Found, LeaseAsk};
use crate::server::store::{KeysPage, NewEntry, RedisTarget, Scope, Store, StoreError, StoreState};
use crate::server::watch::{Invalidation, Published, stream_key};

/// Hash slots in a Redis Cluster.
const SLOTS: u32 = 16_384;
/// Times redis-rs retries a command that met a redirect, a lost node or `TRYAGAIN`; the store
/// timeout bounds them all.
const RETRIES: u32 = 8;
/// The shortest wait before such a retry, in milliseconds. redis-rs waits 1.28 s by default,
/// longer than the whole store timeout, so a request would never see the promoted replica.
const MIN_RETRY_WAIT_MS: u64 = 5;
/// The longest wait before a retry, in milliseconds.
const MAX_RETRY_WAIT_MS: u64 = 100;

/// Entries in a Redis Cluster under `{prefix}{namespace}:{function}:{digest}`. Cloning is
/// shallow.
#[derive(Clone)]
pub struct ClusterStore {
    connection: Renewable,
    /// The health probe's own connections, so a probe never queues behind requests.
    probe: Renewable,
    /// Connections that never retry, for busts and `Keys`: redis-rs re-sends a whole
    /// pipeline on retry, and a re-sent UNLINK whose first send ran counts 0, so a retried
    /// bust would undercount silently; failing instead makes the count "may be partial".
    busts: Renewable,
    /// The invalidation reader's own connections: its blocking `XREAD` would hold up every
    /// command behind it on the stream node's shared connection.
    watch_reader: Renewable,
    gate: Gate,
    layout: KeyLayout,
    bust_batch: usize,
    /// The invalidation stream's key (one slot).
    invalidations: String,
    watch_stream_len: usize,
}

impl fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStore")
            .field("gate", &self.gate)
            .field("layout", &self.layout)
            .field("bust_batch", &self.bust_batch)
            .finish_non_exhaustive()
    }
}

/// A cluster connection that can be replaced by a fresh one (new node connections, the slot
/// map read anew) when it is found routing slots to a node that no longer serves them.
/// Cloning is shallow: clones share the current connection.
#[derive(Clone)]
struct Renewable {
    client: ClusterClient,
    config: ClusterConfig,
    current: Arc<RwLock<ClusterConnection>>,
    /// Set while a fresh connection is being made, so checks meanwhile start no other.
    renewing: Arc<AtomicBool>,
}

impl Renewable {
    /// A connection of `client` with `config`, made lazily.
    fn new(client: ClusterClient, config: ClusterConfig) -> Self {
        let current = client.get_pending_async_connection_with_config(config.clone());
        Renewable {
            client,
            config,
            current: Arc::new(RwLock::new(current)),
            renewing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The current connection (a cheap handle).
    fn get(&self) -> ClusterConnection {
        // A panic while holding the lock cannot leave the handle half-written: it is only
        // ever replaced whole.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes a fresh connection in the background and, once it has connected and read the
    /// slot map, puts it in place of the current one; requests already sent on the old one
    /// finish (or time out) there. Swapping only a ready connection matters: a lazy one would
    /// spend its first store timeout waiting on a silent seed, and the check that follows
    /// would find it wanting too.
    fn renew(&self) {
        if self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let renewable = self.clone();
        tokio::spawn(async move {
            let fresh = renewable
                .client
                .get_async_connection_with_config(renewable.config.clone())
                .await;
            match fresh {
                Ok(fresh) => {
                    *renewable
                        .current
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = fresh;
                }
                Err(err) => warn!(cause = %err, "reconnecting to the cluster failed"),
            }
            renewable.renewing.store(false, Ordering::Release);
        });
    }
}

/// A primary and the slots it serves, as `CLUSTER SLOTS` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Primary {
    /// The node id, stable across restarts.
    id: String,
    host: String,
    port: u16,
    /// Inclusive slot ranges, in order.
    slots: Vec<(u16, u16)>,
}

impl Primary {
    fn route(&self) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        })
    }

    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The primaries, ordered by their first slot, together serving every slot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topology {
    primaries: Vec<Primary>,
}

impl Topology {
    /// Reads a `CLUSTER SLOTS` reply: `[start, end, [host, port, id, …], replicas…]` per range.
    fn parse(reply: &Value) -> Result<Self, StoreError> {
        let odd = || StoreError::Internal("CLUSTER SLOTS reply has an unexpected shape".into());
        let ranges: Vec<Value> = from_value(reply)?;
        let mut by_id: HashMap<String, Primary> = HashMap::new();
        for range in &ranges {
            let Value::Array(fields) = range else {
                return Err(odd());
            };
            let [start, end, primary, ..] = fields.as_slice() else {
                return Err(odd());
            };
            let (start, end): (u16, u16) = (from_value(start)?, from_value(end)?);
            let Value::Array(node) = primary else {
                return Err(odd());
            };
            let [host, port, id, ..] = node.as_slice() else {
                return Err(odd());
            };
            let id: String = from_value(id)?;
            by_id
                .entry(id.clone())
                .or_insert(Primary {
                    id,
                    host: from_value(host)?,
                    port: from_value(port)?,
                    slots: Vec::new(),
                })
                .slots
                .push((start, end));
        }
        let mut primaries: Vec<Primary> = by_id.into_values().collect();
        for primary in &mut primaries {
            primary.slots.sort_unstable();
        }
        primaries.sort_by_key(|primary| primary.slots.first().copied());
        let served: u32 = primaries
            .iter()
            .flat_map(|primary| &primary.slots)
            .map(|(start, end)| u32::from(end - start) + 1)
            .sum();
        if served != SLOTS {
            return Err(StoreError::Unavailable(format!(
                "the cluster serves {served} of {SLOTS} slots (a primary failed, or slots are unassigned)"
            )));
        }
        Ok(Topology { primaries })
    }

    /// A short stable name for the primaries and their slots, for `Keys` cursors.
    fn fingerprint(&self) -> String {
        let mut text = String::new();
        for primary in &self.primaries {
            text.push_str(&primary.id);
            for (start, end) in &primary.slots {
                text.push_str(&format!(",{start}-{end}"));
            }
            text.push(';');
        }
        format!("{:x}", md5::compute(text))[..16].to_owned()
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.primaries.iter().position(|primary| primary.id == id)
    }
}

/// What one primary says of itself in `CLUSTER NODES` (its `myself` line): the facts a bust
/// compares before and after its walk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SelfView {
    id: String,
    /// Bumped by every failover or slot handover that involves the node.
    config_epoch: String,
    /// Its slot fields as it lists them, migration markers (`[slot->-id]`) included.
    slots: Vec<String>,
    /// Its `run_id` (`INFO server`), new at every start: a restart mid-walk (nodes.conf kept,
    /// so the same id, epoch and slots) may have lost writes or keys the walk counted on.
    run_id: String,
}

impl SelfView {
    /// The `myself` line of a `CLUSTER NODES` reply, checked against what `CLUSTER SLOTS` said
    /// of `primary`: still a primary, the same slots, none migrating.
    ///
    /// The whole slot map it lists (every primary and its slots) must also be the one
    /// `topology` holds: a stale primary cut off from a failover still calls itself primary,
    /// but its map names it where the others name its successor.
    fn confirm(topology: &Topology, primary: &Primary, nodes: &str) -> Result<Self, String> {
        let mut listed: Vec<(&str, Vec<(u16, u16)>)> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let [id, _, flags, _, _, _, _, _, slots @ ..] = fields.as_slice() else {
                    return None;
                };
                let master = flags.split(',').any(|flag| flag == "master");
                let ranges = slot_ranges(slots);
                (master && !ranges.is_empty()).then_some((*id, ranges))
            })
            .collect();
        listed.sort_unstable();
        let mut expected: Vec<(&str, Vec<(u16, u16)>)> = topology
            .primaries
            .iter()
            .map(|primary| (primary.id.as_str(), merged(primary.slots.clone())))
            .collect();
        expected.sort_unstable();
        if listed != expected {
            return Err(format!(
                "{} lists another slot map than CLUSTER SLOTS did (a failover or resharding under way)",
                primary.address()
            ));
        }
        let line = nodes
            .lines()
            .find(|line| line.split(' ').nth(2).is_some_and(|f| f.contains("myself")))
            .ok_or("no myself line in CLUSTER NODES")?;
        let fields: Vec<&str> = line.split(' ').collect();
        let [id, _, flags, _, _, _, config_epoch, _, slots @ ..] = fields.as_slice() else {
            return Err(format!("unexpected CLUSTER NODES line {line:?}"));
        };
        if *id != primary.id || !flags.split(',').any(|flag| flag == "master") {
            return Err(format!(
                "{} is no longer primary {}",
                primary.address(),
                primary.id
            ));
        }
        if slots.iter().any(|slot| slot.starts_with('[')) {
            return Err(format!("slots of {} are migrating", primary.address()));
        }
        if slot_ranges(slots) != merged(primary.slots.clone()) {
            return Err(format!("slots of {} changed", primary.address()));
        }
        Ok(SelfView {
            id: (*id).to_owned(),
            config_epoch: (*config_epoch).to_owned(),
            slots: slots.iter().map(|slot| (*slot).to_owned()).collect(),
            run_id: String::new(),
        })
    }
}

/// The slot ranges of `CLUSTER NODES` slot fields (`0-5460`, `9000`), migration markers left
/// out, sorted and merged.
fn slot_ranges(fields: &[&str]) -> Vec<(u16, u16)> {
    merged(
        fields
            .iter()
            .filter_map(|slot| match slot.split_once('-') {
                Some((start, end)) => Some((start.parse().ok()?, end.parse().ok()?)),
                None => slot.parse().ok().map(|slot| (slot, slot)),
            })
            .collect(),
    )
}

/// `ranges` sorted, adjacent ones joined, so two listings of the same slots compare equal.
fn merged(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut joined: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match joined.last_mut() {
            Some(last) if u32::from(last.1) + 1 == u32::from(start) => last.1 = end,
            _ => joined.push((start, end)),
        }
    }
    joined
}

/// A bust that stopped after removing entries: UNAVAILABLE, saying the count is partial.
fn partial(removed: u64, cause: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(format!(
        "bust interrupted ({cause}); at least {removed} entries were removed, the count may be partial: bust again to finish"
    ))
}

/// What a bust that failed with `err` after removing `removed` entries answers: a store out
/// of reach becomes UNAVAILABLE saying the count is partial; other kinds (overload, out of
/// memory, an odd reply) keep their own status.
fn interrupted(removed: u64, err: StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(_) | StoreError::Timeout { .. } => partial(removed, err),
        other => other,
    }
}

/// A store error for the first server error among pipeline `replies` (one command's OOM
/// among many), if any.
fn first_error(replies: Vec<Value>) -> Result<Vec<Value>, StoreError> {
    replies
        .into_iter()
        .map(|reply| reply.extract_error().map_err(classify))
        .collect()
}

/// The route to the primary serving `slot`.
fn primary_of(slot: Slot) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master))
}

impl ClusterStore {
    /// A store over the cluster whose seed nodes `settings.url` lists, comma-separated.
    /// Connects lazily, so the server starts (and reports NOT_SERVING) while the cluster is
    /// down.
    ///
    /// # Errors
    /// A configuration message when redis-rs refuses the seeds (an unparsable URL, seeds
    /// disagreeing on credentials or TLS).
    pub fn new(settings: &super::RedisSettings) -> Result<Self, String> {
        let seeds: Vec<&str> = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .collect();
        // The builder's response timeout also bounds each request as a whole (its "overall"
        // timeout, retries included), and a connection's `ClusterConfig` changes only the
        // per-node one: a client that waits longer needs a builder of its own.
        let build = |retries: u32, response_timeout: Duration| {
            let mut builder = ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(settings.connect_timeout)
                .response_timeout(response_timeout)
                .retries(retries)
                .min_retry_wait(MIN_RETRY_WAIT_MS)
                .max_retry_wait(MAX_RETRY_WAIT_MS);
            if let Some(ca) = &settings.tls_ca {
                builder = builder.certs(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                });
            }
            builder.build().map_err(|err| {
                format!(
                    "--redis-cluster: the seeds were refused ({err}); give redis:// or rediss:// URLs that agree on scheme, user, password and database 0"
                )
            })
        };
        let (client, once) = (
            build(RETRIES, settings.timeout)?,
            build(0, settings.timeout)?,
        );
        // A blocking read may take the whole block before its node answers.
        let reading_timeout = settings.timeout + settings.watch_block;
        let reader = build(RETRIES, reading_timeout)?;
        // redis-rs takes each node's response timeout from this config, not the builder's:
        // without it a node that accepts connections but never answers (SIGSTOP, a partition)
        // would hang a fresh connection's start-up PING for good.
        let config = ClusterConfig::new()
            .set_connection_timeout(settings.connect_timeout)
            .set_response_timeout(settings.timeout);
        let reading = config.clone().set_response_timeout(reading_timeout);
        Ok(ClusterStore {
            connection: Renewable::new(client.clone(), config.clone()),
            probe: Renewable::new(client.clone(), config.clone()),
            watch_reader: Renewable::new(reader, reading),
            busts: Renewable::new(once, config),
            gate: Gate::new(settings),
            bust_batch: settings.bust_batch,
            layout: KeyLayout::new(&settings.key_prefix),
            invalidations: stream_key(&settings.key_prefix),
            watch_stream_len: settings.watch_stream_len,
        })
    }

    /// The same store, timing its commands into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.gate.metrics = metrics;
        self
    }

    /// Runs `cmd` on the invalidation reader's own connections within `bound`, outside the
    /// in-flight limit; a failure or a silent node has them made anew (the slot map read
    /// again), as a failover of the stream's primary needs.
    async fn on_reader<T: FromRedisValue>(
        &self,
        bound: Duration,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        let mut connection = self.watch_reader.get();
        match tokio::time::timeout(bound, cmd.query_async(&mut connection)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(err)) => {
                self.watch_reader.renew();
                Err(classify(err))
            }
            Err(_) => {
                self.watch_reader.renew();
                Err(StoreError::Timeout {
                    op: "XREAD",
                    after: bound,
                })
            }
        }
    }

    fn timed_out(&self, op: &'static str) -> StoreError {
        StoreError::Timeout {
            op,
            after: self.gate.timeout,
        }
    }

    /// Awaits a redis-rs call by `deadline`.
    async fn by<T>(
        &self,
        op: &'static str,
        deadline: Instant,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match timeout_at(deadline, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(self.timed_out(op)),
        }
    }

    /// One command, routed by its key, within the store timeout and a permit.
    async fn one<T: FromRedisValue>(&self, op: &'static str, cmd: Cmd) -> Result<T, StoreError> {
        self.one_on(op, &self.connection, cmd).await
    }

    /// [`ClusterStore::one`] on `connection`.
    async fn one_on<T: FromRedisValue>(
        &self,
        op: &'static str,
        connection: &Renewable,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        self.gate
            .run(op, |deadline| {
                let mut connection = connection.get();
                self.by(op, deadline, async move {
                    cmd.query_async(&mut connection).await
                })
            })
            .await
    }

    /// One lease script, routed by its key, within the store timeout and a permit.
    async fn script<T: FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'static>,
    ) -> Result<T, StoreError> {
        self.gate
            .run(op, |deadline| {
                let mut connection = self.connection.get();
                self.by(op, deadline, async move {
                    invocation.invoke_async(&mut connection).await
                })
            })
            .await
    }

    /// One command to the node `route` names, on `connection`, by `deadline`.
    async fn to_node<T: FromRedisValue>(
        &self,
        op: &'static str,
        deadline: Instant,
        connection: &Renewable,
        cmd: Cmd,
        route: RoutingInfo,
    ) -> Result<T, StoreError> {
        let mut connection = connection.get();
        let reply = self
            .by(op, deadline, connection.route_command(cmd, route))
            .await?;
        from_value(&reply.extract_error().map_err(classify)?)
    }

    /// One command per key of `keys`, built by `command`, grouped by slot: each slot's
    /// commands go to its primary as one pipeline, all slots at once, by `deadline`. The
    /// replies come back in the order of `keys`; any failure fails them all.
    async fn per_slot<K: AsRef<[u8]>>(
        &self,
        op: &'static str,
        deadline: Instant,
        keys: &[K],
        command: impl Fn(&mut Pipeline, usize),
    ) -> Result<Vec<Value>, StoreError> {
        self.per_slot_by(op, deadline, keys, 1, command).await
    }

    /// [`ClusterStore::per_slot`] with `per_key` commands per key: the replies of each key's
    /// commands come back together, in the order of `keys`.
    async fn per_slot_by<K: AsRef<[u8]>>(
        &self,
        op: &'static str,
        deadline: Instant,
        keys: &[K],
        per_key: usize,
        command: impl Fn(&mut Pipeline, usize),
    ) -> Result<Vec<Value>, StoreError> {
        let mut groups: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (index, key) in keys.iter().enumerate() {
            groups.entry(Slot::for_key(key)).or_default().push(index);
        }
        let sends = groups.into_iter().map(|(slot, indices)| {
            let mut pipe = redis::pipe();
            for &index in &indices {
                command(&mut pipe, index);
            }
            let mut connection = self.connection.get();
            async move {
                let replies = connection
                    .route_pipeline(pipe, 0, indices.len() * per_key, primary_of(slot))
                    .await?;
                Ok::<_, RedisError>((indices, replies))
            }
        });
        let groups = self.by(op, deadline, try_join_all(sends)).await?;
        let mut replies = vec![Value::Nil; keys.len() * per_key];
        for (indices, values) in groups {
            if values.len() != indices.len() * per_key {
                return Err(StoreError::Internal(format!(
                    "{op}: {} replies to {} commands",
                    values.len(),
                    indices.len() * per_key
                )));
            }
            let values = first_error(values)?;
            for (index, values) in indices.into_iter().zip(values.chunks(per_key)) {
                replies[index * per_key..(index + 1) * per_key].clone_from_slice(values);
            }
        }
        Ok(replies)
    }

    /// The primaries and their slots, as a primary of the cluster lists them, on `connection`.
    async fn topology(
        &self,
        deadline: Instant,
        connection: &Renewable,
    ) -> Result<Topology, StoreError> {
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let reply: Value = self
            .to_node("CLUSTER SLOTS", deadline, connection, slots, route)
            .await?;
        Topology::parse(&reply)
    }

    /// Asks every primary of `topology` for its own view, by `deadline`; an error when one
    /// does not answer, is no longer a primary, or has slots migrating or changed.
    async fn confirm(
        &self,
        deadline: Instant,
        topology: &Topology,
    ) -> Result<Vec<SelfView>, StoreError> {
        let asks = topology.primaries.iter().map(|primary| async move {
            let mut nodes = redis::cmd("CLUSTER");
            nodes.arg("NODES");
            let mut info = redis::cmd("INFO");
            info.arg("server");
            let (text, info): (String, String) = tokio::try_join!(
                self.to_node(
                    "CLUSTER NODES",
                    deadline,
                    &self.busts,
                    nodes,
                    primary.route()
                ),
                self.to_node(
                    "CLUSTER NODES",
                    deadline,
                    &self.busts,
                    info,
                    primary.route()
                ),
            )
            .map_err(|err| {
                StoreError::Unavailable(format!("primary {}: {err}", primary.address()))
            })?;
            let mut view =
                SelfView::confirm(topology, primary, &text).map_err(StoreError::Unavailable)?;
            view.run_id = info
                .lines()
                .find_map(|line| line.trim().strip_prefix("run_id:"))
                .unwrap_or_default()
                .to_owned();
            Ok(view)
        });
        try_join_all(asks).await
    }

    /// The topology and every primary's confirmation of it, within one permit and timeout.
    async fn confirmed_topology(&self) -> Result<(Topology, Vec<SelfView>), StoreError> {
        self.gate
            .run("CLUSTER NODES", |deadline| async move {
                let topology = self.topology(deadline, &self.busts).await?;
                let views = self.confirm(deadline, &topology).await?;
                Ok((topology, views))
            })
            .await
    }

    /// One `SCAN` step on `primary`.
    async fn scan(
        &self,
        deadline: Instant,
        primary: &Primary,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        self.to_node("SCAN", deadline, &self.busts, scan, primary.route())
            .await
    }

    /// UNLINKs `keys` and `uncounted`, which a SCAN of `primary` found: one UNLINK per slot
    /// and list, all in one pipeline to `primary`, which served those slots when it was
    /// scanned. A slot that has moved since is redirected (MOVED) and the topology check
    /// after the walk fails the bust as partial. Returns how many of `keys` existed.
    async fn unlink(
        &self,
        deadline: Instant,
        primary: &Primary,
        keys: &[Vec<u8>],
        uncounted: &[Vec<u8>],
    ) -> Result<u64, StoreError> {
        if keys.is_empty() && uncounted.is_empty() {
            return Ok(0);
        }
        fn by_slot(keys: &[Vec<u8>]) -> HashMap<Slot, Vec<&[u8]>> {
            let mut slots: HashMap<Slot, Vec<&[u8]>> = HashMap::new();
            for key in keys {
                slots.entry(Slot::for_key(key)).or_default().push(key);
            }
            slots
        }
        let (counted, other) = (by_slot(keys), by_slot(uncounted));
        let mut pipe = redis::pipe();
        for keys in counted.values().chain(other.values()) {
            pipe.cmd("UNLINK").arg(keys);
        }
        let commands = counted.len() + other.len();
        let mut connection = self.busts.get();
        let route = SingleNodeRoutingInfo::ByAddress {
            host: primary.host.clone(),
            port: primary.port,
        };
        let replies = self
            .by(
                "UNLINK",
                deadline,
                connection.route_pipeline(pipe, 0, commands, route),
            )
            .await?;
        if replies.len() != commands {
            return Err(StoreError::Internal(format!(
                "UNLINK: {} replies to {commands} commands",
                replies.len()
            )));
        }
        first_error(replies)?[..counted.len()]
            .iter()
            .map(from_value::<u64>)
            .sum()
    }

    /// Writes the tag indexes of the tagged `entries`, before the entries themselves (see
    /// [`tags`]): one script call per index, each routed by its index key (an index and its
    /// entries are in different slots), all slots at once, every reply checked. Nothing when
    /// none is tagged. On failure nothing has been claimed written, and the caller writes no
    /// entry, so no entry exists that its tag cannot find.
    async fn write_tag_indexes(&self, entries: &[NewEntry]) -> Result<(), StoreError> {
        let commands =
            tags::index_commands(&self.layout, entries, tags::index_slack(self.gate.timeout));
        self.write_indexes(commands).await
    }

    /// Sends index writes (see [`tags`]), each routed by its index key, all slots at once,
    /// every reply checked; nothing when there are none.
    async fn write_indexes(&self, commands: Vec<(String, Cmd)>) -> Result<(), StoreError> {
        if commands.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = commands.iter().map(|(key, _)| key.as_str()).collect();
        self.gate
            .run("EVAL (tag index)", |deadline| {
                self.per_slot("EVAL (tag index)", deadline, &keys, |pipe, index| {
                    pipe.add_command(commands[index].1.clone());
                })
            })
            .await
            .map_err(|err| match err {
                StoreError::Unavailable(cause) => StoreError::Unavailable(format!(
                    "tag indexes not written, so neither were the entries: {cause}"
                )),
                other => other,
            })?;
        Ok(())
    }

    /// ZSCANs the index of `tag` in `namespace` (routed by its key to its slot's primary) and
    /// UNLINKs the entries its members name, one UNLINK per slot to that slot's primary, each
    /// round trip unlinking one batch while asking for the next; between two confirmations of
    /// the topology, as the other busts. A node failing mid-walk or a failover or resharding
    /// (the index's primary replaced: its replica may lack the latest members, and a ZSCAN
    /// cursor means nothing on another node) makes the bust UNAVAILABLE, the count partial.
    async fn bust_tagged(&self, namespace: &str, tag: &str) -> Result<u64, StoreError> {
        let index = self.layout.tag_index(namespace, tag);
        let (_, before) = self.confirmed_topology().await.map_err(|err| {
            StoreError::Unavailable(format!("bust not started, nothing removed: {err}"))
        })?;
        let (mut cursor, mut removed) = (0u64, 0u64);
        let mut batch: Vec<String> = Vec::new();
        // As `interrupted`, naming the index.
        let interrupted = |removed, err: StoreError| match err {
            StoreError::Unavailable(_) | StoreError::Timeout { .. } => {
                partial(removed, format!("tag index {index}: {err}"))
            }
            other => other,
        };
        loop {
            let unlinking = &batch;
            let index = &index;
            let step = self
                .gate
                .run("ZSCAN/UNLINK", |deadline| async move {
                    tokio::try_join!(
                        self.unlink_by_slot(deadline, unlinking),
                        self.zscan(deadline, index, cursor)
                    )
                })
                .await;
            let (unlinked, (next, found)) = step.map_err(|err| interrupted(removed, err))?;
            removed += unlinked;
            batch = tags::member_entries(&self.layout, namespace, &found);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        removed += self
            .gate
            .run("UNLINK", |deadline| self.unlink_by_slot(deadline, &batch))
            .await
            .map_err(|err| interrupted(removed, err))?;
        self.confirm_unchanged(&before, removed).await
    }

    /// Ends a bust that removed `removed` entries: its count, when every primary still
    /// confirms the view `before` it started from; otherwise UNAVAILABLE, the count partial.
    async fn confirm_unchanged(
        &self,
        before: &[SelfView],
        removed: u64,
    ) -> Result<u64, StoreError> {
        let (_, after) = self
            .confirmed_topology()
            .await
            .map_err(|err| partial(removed, err))?;
        if after != before {
            return Err(partial(
                removed,
                "the cluster's topology changed during the bust (a failover or resharding)",
            ));
        }
        Ok(removed)
    }

    /// One `ZSCAN` step through `index`, routed to the primary of its slot.
    async fn zscan(
        &self,
        deadline: Instant,
        index: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let route = RoutingInfo::SingleNode(primary_of(Slot::for_key(index)));
        let command = tags::scan_command(index, cursor, self.bust_batch);
        self.to_node("ZSCAN/UNLINK", deadline, &self.busts, command, route)
            .await
    }

    /// UNLINKs `keys`, which span slots: one UNLINK per slot, each to the primary of its
    /// slot, all at once. Returns how many existed.
    async fn unlink_by_slot(&self, deadline: Instant, keys: &[String]) -> Result<u64, StoreError> {
        let mut slots: HashMap<Slot, Vec<&str>> = HashMap::new();
        for key in keys {
            slots.entry(Slot::for_key(key)).or_default().push(key);
        }
        let unlinks = slots.into_iter().map(|(slot, keys)| {
            let mut unlink = redis::cmd("UNLINK");
            unlink.arg(keys);
            let route = RoutingInfo::SingleNode(primary_of(slot));
            self.to_node::<u64>("UNLINK", deadline, &self.busts, unlink, route)
        });
        Ok(try_join_all(unlinks).await?.iter().sum())
    }

    /// SCANs `primary` for `pattern` and UNLINKs the entries of `scope` it finds, and the tag
    /// indexes a namespace or all bust covers (not counted), each round trip unlinking one
    /// batch while asking for the next. On failure, says how many entries it had removed.
    async fn walk(
        &self,
        scope: Scope<'_>,
        primary: &Primary,
        pattern: &str,
    ) -> Result<u64, (u64, StoreError)> {
        let (mut cursor, mut removed) = (0u64, 0u64);
        let (mut batch, mut indexes) = (Vec::new(), Vec::new());
        loop {
            let (unlinking, uncounted) = (&batch, &indexes);
            let step = self
                .gate
                .run("SCAN/UNLINK", |deadline| async move {
                    tokio::try_join!(
                        self.unlink(deadline, primary, unlinking, uncounted),
                        self.scan(deadline, primary, cursor, pattern, self.bust_batch)
                    )
                })
                .await;
            let (unlinked, (next, found)) = step.map_err(|err| match err {
                StoreError::Unavailable(_) | StoreError::Timeout { .. } => {
                    let err = StoreError::Unavailable(format!("{}: {err}", primary.address()));
                    (removed, err)
                }
                other => (removed, other),
            })?;
            removed += unlinked;
            (batch, indexes) = removable(&self.layout, scope, found);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let last = self
            .gate
            .run("UNLINK", |deadline| {
                self.unlink(deadline, primary, &batch, &indexes)
            })
            .await;
        last.map(|unlinked| removed + unlinked)
            .map_err(|err| (removed, err))
    }

    /// Busts `scope` on every primary, one after the other (each with its own SCAN cursor),
    /// between two confirmations of the topology that must agree.
    ///
    /// One primary at a time, not all at once: walking three primaries at once busted 300,000
    /// entries in 2.5 s instead of 4.2 s, but the Gets served meanwhile (on the same runtime)
    /// had a p99 of 66 ms instead of 18 ms (`cm_bench --only bust --cluster`, BENCHMARKS.md).
    async fn bust_matching(&self, scope: Scope<'_>, pattern: String) -> Result<u64, StoreError> {
        let (topology, before) = self.confirmed_topology().await.map_err(|err| {
            StoreError::Unavailable(format!("bust not started, nothing removed: {err}"))
        })?;
        let mut removed = 0;
        let mut failure = None;
        for primary in &topology.primaries {
            match self.walk(scope, primary, &pattern).await {
                Ok(count) => removed += count,
                Err((count, err)) => {
                    removed += count;
                    failure.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failure {
            return Err(interrupted(removed, err));
        }
        self.confirm_unchanged(&before, removed).await
    }

    /// `cluster_state` from a primary and the topology, on the probe's connections.
    async fn probe_topology(&self, deadline: Instant) -> Result<Topology, StoreError> {
        let mut info = redis::cmd("CLUSTER");
        info.arg("INFO");
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let info: String = self
            .to_node("PING", deadline, &self.probe, info, route)
            .await?;
        let state = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("cluster_state:"))
            .unwrap_or("absent");
        if state != "ok" {
            return Err(StoreError::Unavailable(format!(
                "cluster_state:{state}: the cluster cannot serve every slot (a primary is down and not yet replaced, or slots are unassigned)"
            )));
        }
        self.topology(deadline, &self.probe).await
    }

    /// Reads a `Keys` cursor: the primary to scan and where, or a clear error.
    fn resume(&self, topology: &Topology, cursor: &str) -> Result<(usize, u64), StoreError> {
        if cursor.is_empty() {
            return Ok((0, 0));
        }
        let invalid = || StoreError::InvalidCursor(cursor.to_owned());
        let mut parts = cursor.split(':');
        let (Some(fingerprint), Some(id), Some(position), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let position: u64 = position.parse().map_err(|_| invalid())?;
        if fingerprint.len() != 16 || id.is_empty() {
            return Err(invalid());
        }
        if fingerprint != topology.fingerprint() {
            return Err(StoreError::StaleCursor(
                "the cluster's primaries or slots changed since this cursor was handed out (a failover or resharding)"
                    .into(),
            ));
        }
        let node = topology.position(id).ok_or_else(invalid)?;
        Ok((node, position))
    }
}

impl Store for ClusterStore {
    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn busy_polls(&self) -> bool {
        self.gate.busy_poll.is_on()
    }

    async fn lookup(&self, key: &EntryKey, left: bool) -> Result<Found, StoreError> {
        let key = self.layout.entry(key);
        if !left {
            let mut get = redis::cmd("GET");
            get.arg(&key);
            let stored: Option<Vec<u8>> = self.one("GET", get).await?;
            if !lease::needs_pttl(stored.as_deref()) {
                return Ok(lease::found(stored, None));
            }
            // A value with a stale window, read by a caller that did not expect one: its
            // PTTL says whether it is still live (a second round trip, for such values only).
        }
        // One key, so one slot: redis-rs routes the pipeline by it, following redirects as
        // for a single command.
        let (stored, pttl): (Option<Vec<u8>>, i64) = self
            .gate
            .run("GET", |deadline| {
                let mut connection = self.connection.get();
                self.by("GET", deadline, async move {
                    redis::pipe()
                        .cmd("GET")
                        .arg(&key)
                        .cmd("PTTL")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await
                })
            })
            .await?;
        Ok(lease::found(stored, Some(pttl)))
    }

    async fn acquire(
        &self,
        key: &EntryKey,
        ask: LeaseAsk,
        tags: &[String],
    ) -> Result<Acquired, StoreError> {
        self.write_indexes(tags::lease_index_commands(
            &self.layout,
            key,
            tags,
            lease::placeholder_life(ask.lease),
            tags::index_slack(self.gate.timeout),
        ))
        .await?;
        let invocation = scripts().acquire(self.layout.entry(key), ask);
        let reply: Value = self.script("EVAL (lease)", invocation).await?;
        lease::acquired(&reply).map_err(StoreError::Internal)
    }

    async fn put_leased(&self, entry: &NewEntry, token: u64) -> Result<bool, StoreError> {
        self.write_tag_indexes(std::slice::from_ref(entry)).await?;
        let invocation = scripts().put(self.layout.entry(&entry.key), entry, token);
        self.script("EVAL (leased SET)", invocation).await
    }

    async fn release(&self, key: &EntryKey, token: u64) -> Result<bool, StoreError> {
        let invocation = scripts().release(self.layout.entry(key), token);
        self.script("EVAL (release)", invocation).await
    }

    async fn get_many(&self, keys: &[EntryKey]) -> Result<Vec<Option<Bytes>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Not one multi-slot MGET for redis-rs to split: during a failover its reassembly
        // failed with "Mismatch in the number of multi-slot results" (tests/cluster_failover.rs).
        let keys: Vec<String> = keys.iter().map(|key| self.layout.entry(key)).collect();
        let replies = self
            .gate
            .run("MGET", |deadline| {
                self.per_slot("MGET", deadline, &keys, |pipe, index| {
                    pipe.cmd("GET").arg(&keys[index]);
                })
            })
            .await?;
        let values: Vec<Option<Vec<u8>>> =
            replies.iter().map(from_value).collect::<Result<_, _>>()?;
        // Values kept past their TTL need their PTTL to tell whether they are still live: a
        // second round trip, only for them.
        let stale_kept: Vec<&String> = (0..values.len())
            .filter(|&index| lease::needs_pttl(values[index].as_deref()))
            .map(|index| &keys[index])
            .collect();
        let mut pttls = vec![None; values.len()];
        if !stale_kept.is_empty() {
            let replies = self
                .gate
                .run("PTTL", |deadline| {
                    self.per_slot("PTTL", deadline, &stale_kept, |pipe, index| {
                        pipe.cmd("PTTL").arg(stale_kept[index]);
                    })
                })
                .await?;
            let mut replies = replies.iter();
            for (index, pttl) in pttls.iter_mut().enumerate() {
                if lease::needs_pttl(values[index].as_deref()) {
                    *pttl = Some(from_value(
                        replies.next().expect("one reply per key asked"),
                    )?);
                }
            }
        }
        Ok(values
            .into_iter()
            .zip(pttls)
            .map(|(stored, pttl)| lease::found(stored, pttl).live())
            .collect())
    }

    async fn value_bytes(&self, keys: &[EntryKey]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = keys.iter().map(|key| self.layout.entry(key)).collect();
        let replies = self
            .gate
            .run("STRLEN", |deadline| {
                self.per_slot("STRLEN", deadline, &keys, |pipe, index| {
                    pipe.cmd("STRLEN").arg(&keys[index]);
                })
            })
            .await?;
        replies.iter().map(from_value::<u64>).sum()
    }

    async fn put(&self, entry: &NewEntry) -> Result<(), StoreError> {
        self.write_tag_indexes(std::slice::from_ref(entry)).await?;
        let mut set = redis::cmd("SET");
        set.arg(self.layout.entry(&entry.key))
            .arg(stored(entry).as_ref())
            .arg("PX")
            .arg(entry.kept_for().as_millis() as u64);
        self.one("SET", set).await
    }

    async fn put_many(&self, entries: &[NewEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write_tag_indexes(entries).await?;
        let keys: Vec<String> = entries
            .iter()
            .map(|entry| self.layout.entry(&entry.key))
            .collect();
        self.gate
            .run("SET (batch)", |deadline| {
                self.per_slot("SET (batch)", deadline, &keys, |pipe, index| {
                    let entry = &entries[index];
                    pipe.cmd("SET")
                        .arg(&keys[index])
                        .arg(stored(entry).as_ref())
                        .arg("PX")
                        .arg(entry.kept_for().as_millis() as u64);
                })
            })
            .await?;
        Ok(())
    }

    async fn bust(&self, scope: Scope<'_>) -> Result<u64, StoreError> {
        match scope.redis_target(&self.layout) {
            RedisTarget::Key(key) => {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(key);
                self.one_on("UNLINK", &self.busts, unlink).await
            }
            RedisTarget::Pattern(pattern) => self.bust_matching(scope, pattern).await,
        }
    }

    async fn bust_tag(&self, namespace: &str, tag: &str) -> Result<u64, StoreError> {
        self.bust_tagged(namespace, tag).await
    }

    async fn keys(
        &self,
        function: &FunctionKey,
        cursor: &str,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        let topology = self
            .gate
            .run("CLUSTER SLOTS", |deadline| {
                self.topology(deadline, &self.busts)
            })
            .await?;
        let (mut node, mut position) = self.resume(&topology, cursor)?;
        let pattern = self.layout.function_pattern(function);
        let mut found: Vec<Vec<u8>> = Vec::new();
        // SCAN may return nothing for many steps when the keyspace is large and the function
        // small; keep stepping (node after node) until the page has entries or all are done.
        while node < topology.primaries.len() && found.len() < limit {
            let primary = &topology.primaries[node];
            let (next, keys) = self
                .gate
                .run("SCAN", |deadline| {
                    self.scan(deadline, primary, position, &pattern, limit.max(100))
                })
                .await?;
            found.extend(
                keys.into_iter()
                    .filter(|key| Scope::Function(function).holds(&self.layout, key)),
            );
            position = next;
            if position == 0 {
                node += 1;
            }
        }
        let replies: Vec<(i64, Vec<u8>)> = if found.is_empty() {
            Vec::new()
        } else {
            let replies = self
                .gate
                .run("PTTL", |deadline| {
                    self.per_slot_by("PTTL", deadline, &found, 2, |pipe, index| {
                        pipe.cmd("PTTL").arg(&found[index]);
                        pipe.cmd("GETRANGE")
                            .arg(&found[index])
                            .arg(0)
                            .arg(lease::HEADER_LEN - 1);
                    })
                })
                .await?;
            replies
                .chunks(2)
                .map(|pair| Ok((from_value(&pair[0])?, from_value(&pair[1])?)))
                .collect::<Result<_, StoreError>>()?
        };
        let next_cursor = match topology.primaries.get(node) {
            Some(primary) => format!("{}:{}:{position}", topology.fingerprint(), primary.id),
            None => String::new(),
        };
        Ok(KeysPage {
            entries: key_infos(&self.layout, &found, replies),
            next_cursor,
        })
    }

    async fn publish(&self, invalidations: &[Invalidation]) -> Result<u64, StoreError> {
        // One key, so one pipeline to one node; a retried pipeline publishes twice, which
        // costs watchers a redundant invalidation, never a missing one.
        let keys = vec![self.invalidations.as_str(); invalidations.len()];
        let ids = self
            .gate
            .run("XADD", |deadline| {
                self.per_slot("XADD", deadline, &keys, |pipe, index| {
                    xadd(
                        pipe,
                        &self.invalidations,
                        self.watch_stream_len,
                        &invalidations[index],
                    )
                })
            })
            .await
            .map_err(|err| publish_error(&self.invalidations, err))?;
        published_position(&ids)
    }

    async fn read_invalidations(
        &self,
        after: u64,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Published>, StoreError> {
        let cmd = xread(&self.invalidations, after, count, block);
        // `block` is at most the heartbeat interval (`watch_block`), which the reader's client
        // waits beyond the store timeout (`ClusterStore::new`).
        let Some(block) = block else {
            return read_reply(&self.invalidations, self.one("XREAD", cmd).await?);
        };
        self.on_reader(block + self.gate.timeout, cmd)
            .await
            .and_then(|reply| read_reply(&self.invalidations, reply))
    }

    async fn invalidation_tail(&self) -> Result<u64, StoreError> {
        let reply = self
            .one("XREVRANGE", xrevrange_last(&self.invalidations))
            .await?;
        tail_reply(&self.invalidations, reply)
    }

    async fn reader_nonce(&self, position: u64) -> Result<Option<String>, StoreError> {
        let cmd = xrange_at(&self.invalidations, position);
        self.on_reader(self.gate.timeout, cmd)
            .await
            .map(nonce_reply)
    }

    async fn reader_tail(&self) -> Result<u64, StoreError> {
        let cmd = xrevrange_last(&self.invalidations);
        self.on_reader(self.gate.timeout, cmd)
            .await
            .and_then(|reply| tail_reply(&self.invalidations, reply))
    }

    /// Asks a primary for `cluster_state`, PINGs the primary of every slot on the probe's own
    /// connections, then checks that the serving connection routes each primary's slots to
    /// that primary, all within the store timeout: NOT_SERVING while any slot cannot be
    /// served, with the reason. A probe connection that fails is renewed, and so is a serving
    /// connection found routing to a node that no longer serves the slot (see the module doc).
    async fn ping(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.gate.timeout;
        let topology = self.probe_topology(deadline).await.inspect_err(|_| {
            // Its slot map may name a silent node: the next probe starts from the seeds.
            self.probe.renew();
        })?;
        let pings = topology.primaries.iter().map(|primary| async move {
            let pong: String = self
                .to_node(
                    "PING",
                    deadline,
                    &self.probe,
                    redis::cmd("PING"),
                    primary.route(),
                )
                .await
                .map_err(|err| {
                    StoreError::Unavailable(format!("primary {}: {err}", primary.address()))
                })?;
            match pong.as_str() {
                "PONG" => Ok(()),
                odd => Err(StoreError::Internal(format!("PING answered {odd:?}"))),
            }
        });
        try_join_all(pings).await?;
        for connection in [&self.connection, &self.busts] {
            let routes = topology.primaries.iter().map(|primary| async move {
                let (start, _) = primary.slots[0];
                let mut myid = redis::cmd("CLUSTER");
                myid.arg("MYID");
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(start, SlotAddr::Master),
                ));
                let answer = self
                    .to_node::<String>("PING", deadline, connection, myid, route)
                    .await;
                match answer {
                    Ok(id) if id == primary.id => Ok(()),
                    Ok(id) => Err(format!(
                        "slot {start} went to node {id}, not {} at {}",
                        primary.id,
                        primary.address()
                    )),
                    Err(err) => Err(format!(
                        "slot {start}, served by {}: {err}",
                        primary.address()
                    )),
                }
            });
            if let Err(stale) = try_join_all(routes).await {
                connection.renew();
                return Err(StoreError::Unavailable(format!(
                    "requests were not reaching the primaries that serve their slots ({stale}); reconnected to the cluster to read its slot map anew"
                )));
            }
        }
        Ok(())
    }

    fn state(&self) -> StoreState {
        StoreState {
            in_flight: self.gate.in_flight(),
            pool: None,
            memory: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn range(start: i64, end: i64, port: i64, id: &str) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk(id)]),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(port + 3), bulk("r")]),
        ])
    }

    /// CLUSTER SLOTS is read into primaries in slot order, split ranges gathered; a reply that
    /// leaves slots unserved is UNAVAILABLE.
    #[test]
    fn topology_reads_cluster_slots() {
        let reply = Value::Array(vec![
            range(10_923, 16_383, 7002, "c"),
            range(0, 5460, 7000, "a"),
            range(5461, 10_000, 7001, "b"),
            range(10_001, 10_922, 7000, "a"),
        ]);
        let topology = Topology::parse(&reply).unwrap();
        let ids: Vec<&str> = topology.primaries.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(topology.primaries[0].slots, [(0, 5460), (10_001, 10_922)]);
        assert_eq!(topology.primaries[1].address(), "127.0.0.1:7001");

        let reply = Value::Array(vec![range(0, 5460, 7000, "a")]);
        let err = Topology::parse(&reply).unwrap_err();
        assert!(
            err.to_string().contains("serves 5461 of 16384 slots"),
            "{err}"
        );
    }

    /// A primary's CLUSTER NODES confirms it only while it is still that primary with the same
    /// slots, none migrating, and lists the same slot map as CLUSTER SLOTS.
    #[test]
    fn self_view_confirms_only_an_unchanged_primary() {
        let primary = Primary {
            id: "a1".into(),
            host: "127.0.0.1".into(),
            port: 7000,
            slots: vec![(0, 5460), (9000, 9000)],
        };
        let topology = Topology {
            primaries: vec![
                primary.clone(),
                Primary {
                    id: "b2".into(),
                    host: "127.0.0.1".into(),
                    port: 7001,
                    slots: vec![(5461, 8999), (9001, 16_383)],
                },
            ],
        };
        let nodes = |b2: &str, flags: &str, slots: &str| {
            format!(
                "b2 127.0.0.1:7001@17001 {b2} - 0 1 2 connected 5461-8999 9001-16383\n\
                 a1 127.0.0.1:7000@17000 {flags} - 0 0 7 connected {slots}\n"
            )
        };
        let view = SelfView::confirm(
            &topology,
            &primary,
            &nodes("master", "myself,master", "0-5460 9000"),
        )
        .unwrap();
        assert_eq!(view.config_epoch, "7");
        for (b2, flags, slots) in [
            ("master", "myself,slave", "0-5460 9000"),
            ("master", "myself,master", "0-5460"),
            ("master", "myself,master", "0-5460 9000 [9000->-b2]"),
            // a zombie: b2 took over elsewhere, but this node's map still has b2 a replica
            ("slave", "myself,master", "0-5460 9000"),
        ] {
            assert!(
                SelfView::confirm(&topology, &primary, &nodes(b2, flags, slots)).is_err(),
                "{b2} {flags} {slots}"
            );
        }
    }

    /// A bust cut short by an unreachable store says its count is partial; one refused for
    /// overload keeps RESOURCE_EXHAUSTED's kind.
    #[test]
    fn interrupted_busts_keep_their_error_kind() {
        let after = std::time::Duration::from_millis(250);
        let timeout = interrupted(7, StoreError::Timeout { op: "SCAN", after });
        let StoreError::Unavailable(message) = timeout else {
            panic!("{timeout:?}");
        };
        assert!(message.contains("at least 7 entries"), "{message}");
        let overloaded = interrupted(7, StoreError::Overloaded { limit: 4 });
        assert!(matches!(overloaded, StoreError::Overloaded { limit: 4 }));
        let odd = interrupted(0, StoreError::Internal("odd".into()));
        assert!(matches!(odd, StoreError::Internal(_)));
    }

    /// The fingerprint changes when a slot changes hands.
    #[test]
    fn fingerprint_names_the_slot_map() {
        let one = Topology::parse(&Value::Array(vec![
            range(0, 8191, 7000, "a"),
            range(8192, 16_383, 7001, "b"),
        ]))
        .unwrap();
        let two = Topology::parse(&Value::Array(vec![
            range(0, 8192, 7000, "a"),
            range(8193, 16_383, 7001, "b"),
        ]))
        .unwrap();
        assert_eq!(one.fingerprint(), one.clone().fingerprint());
        assert_ne!(one.fingerprint(), two.fingerprint());
        assert_eq!(one.fingerprint().len(), 16);
    }
}
