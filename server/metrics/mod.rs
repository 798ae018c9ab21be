//! Prometheus metrics: one registry, its metric families, and [`Metrics`], the cheap handle
//! the RPC layer, the service and the stores record through. Without `--metrics-listen` the
//! handle is disabled and every recording is one branch; [`http`] serves the registry.
//!
//! Label values come from closed sets (method, status code, bust scope, store command, lookup
//! result) or are namespaces, of which at most `--metrics-max-namespaces` get series of their
//! own; later ones are counted under [`OTHER_NAMESPACE`]. Function names and digests never
//! become labels, so the number of series is bounded whatever callers send.

pub mod http;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        info::Info,
    },
    registry::{Registry, Unit},
};
use tonic::Code;

use crate::lock;
use crate::server::observe::Method;
use crate::server::store::{Store, StoreError};

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "cache_money";

/// Upper bounds of the latency histograms' buckets, in seconds: from 50 µs (a hit over
/// loopback) to 60 s. Past 2.5 s (ten default store timeouts) the buckets are for busts,
/// whose SCAN/UNLINK over a large keyspace takes seconds to minutes and would otherwise all
/// land in `+Inf`. Explicit and the same on every replica, so a fleet's histograms add up,
/// which summaries cannot.
pub const LATENCY_BUCKETS: [f64; 19] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The namespace label of lookups in namespaces past `--metrics-max-namespaces`. A namespace
/// really called `other` is counted there too.
pub const OTHER_NAMESPACE: &str = "other";

/// How one key's lookup ended, the `result` label of `cache_money_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The entry was there.
    Hit,
    /// It was not (absent or expired).
    Miss,
    /// The store failed, so nobody knows.
    Error,
    /// Refused at once because `--max-in-flight` store operations were running; the store was
    /// not asked, so this is load, not a store failure.
    Shed,
}

/// The text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, for scrapers that ask for it (Prometheus does).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for everyone else (curl, older scrapers).
    Prometheus,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// The canonical name of a gRPC status code (`OK`, `INVALID_ARGUMENT`, …), as the gRPC
/// specification and grpcurl write it: the `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    method: &'static str,
    outcome: &'static str,
}

/// The `outcome` label of `cache_money_rpc_duration_seconds`: `ok` for an RPC answered `OK`,
/// `error` for any other status. Refusals (shed, unauthenticated, invalid, store down) end in
/// microseconds; kept apart, they cannot pull the latency of answered RPCs down during an
/// incident.
pub fn outcome_name(code: Code) -> &'static str {
    if code == Code::Ok { "ok" } else { "error" }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// Something that happened to a lease, for `cache_money_lease_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease handed out (expired ones taken over and refreshes included).
    Won,
    /// A lookup told to wait for another caller's lease.
    Waited,
    /// A lease won by taking over one that expired unfulfilled.
    Expired,
    /// A write under a lease refused because the lease was voided.
    Refused,
    /// A lookup answered with a stale value.
    StaleServed,
    /// A lease won to refresh a live entry that was due.
    Refreshed,
}

impl LeaseEvent {
    /// The `event` label value.
    pub fn name(self) -> &'static str {
        match self {
            LeaseEvent::Won => "won",
            LeaseEvent::Waited => "waited",
            LeaseEvent::Expired => "expired",
            LeaseEvent::Refused => "refused",
            LeaseEvent::StaleServed => "stale_served",
            LeaseEvent::Refreshed => "refreshed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    namespace: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Slots for the store's commands' series: more than either store sends kinds of.
const STORE_COMMAND_SLOTS: usize = 16;
const _: () = assert!(
    STORE_COMMAND_SLOTS >= crate::server::store::redis::REDIS_COMMANDS.len()
        && STORE_COMMAND_SLOTS >= crate::server::store::MEMORY_COMMANDS.len()
);

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// One namespace's series, resolved once: recording is then a hash lookup under a read lock
/// and an atomic add, never a label set built per request.
#[derive(Debug, Clone)]
struct NamespaceCounters {
    hits: Counter,
    misses: Counter,
    errors: Counter,
    shed: Counter,
    read_bytes: Counter,
    written_bytes: Counter,
}

/// The families namespaces have series in.
#[derive(Debug, Default)]
struct NamespaceFamilies {
    lookups: Family<LookupLabels, Counter>,
    read_bytes: Family<NamespaceLabels, Counter>,
    written_bytes: Family<NamespaceLabels, Counter>,
}

impl NamespaceFamilies {
    /// The series of `namespace`, created in the families.
    fn counters(&self, namespace: &str) -> NamespaceCounters {
        let lookup = |result| {
            self.lookups.get_or_create_owned(&LookupLabels {
                namespace: namespace.to_owned(),
                result,
            })
        };
        let labels = NamespaceLabels {
            namespace: namespace.to_owned(),
        };
        NamespaceCounters {
            hits: lookup("hit"),
            misses: lookup("miss"),
            errors: lookup("error"),
            shed: lookup("shed"),
            read_bytes: self.read_bytes.get_or_create_owned(&labels),
            written_bytes: self.written_bytes.get_or_create_owned(&labels),
        }
    }
}

/// The namespaces seen so far (up to the cap) and their counters.
#[derive(Debug)]
struct Namespaces {
    families: NamespaceFamilies,
    known: RwLock<HashMap<Box<str>, NamespaceCounters>>,
    other: NamespaceCounters,
    max: usize,
}

impl Namespaces {
    fn new(max: usize) -> Self {
        let families = NamespaceFamilies::default();
        Namespaces {
            other: families.counters(OTHER_NAMESPACE),
            families,
            known: RwLock::default(),
            max,
        }
    }

    /// Runs `record` with the counters of each namespace `of` names, taking the read lock once
    /// for the whole batch; the write lock only the first time a namespace is seen.
    fn record<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        of: impl Fn(&T) -> &str,
        record: impl Fn(&NamespaceCounters, T),
    ) {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
            for item in items.by_ref() {
                let namespace = of(&item);
                if let Some(counters) = known.get(namespace) {
                    record(counters, item);
                } else if namespace == OTHER_NAMESPACE || known.len() >= self.max {
                    record(&self.other, item);
                } else {
                    drop(known);
                    let counters = self.admit(namespace);
                    record(&counters, item);
                    break;
                }
            }
        }
    }

    /// Gives `namespace` series of its own while there is room; the counters it now uses.
    #[cold]
    fn admit(&self, namespace: &str) -> NamespaceCounters {
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(counters) = known.get(namespace) {
            return counters.clone();
        }
        if known.len() >= self.max {
            return self.other.clone();
        }
        let counters = self.families.counters(namespace);
        known.insert(namespace.into(), counters.clone());
        counters
    }
}

/// The gRPC status codes, 0 to 16.
const CODES: usize = 17;

/// One method's RPC series, each resolved in its family on first use, so an RPC records
/// without a label lookup.
#[derive(Debug)]
struct MethodSeries {
    /// By outcome: `ok` first, then `error`.
    duration: [OnceLock<Histogram>; 2],
    codes: [OnceLock<Counter>; CODES],
}

/// Everything an enabled handle records into.
#[derive(Debug)]
struct Recorder {
    /// Behind a lock only so the store's collector can join after start; scrapes read it.
    registry: Mutex<Registry>,
    rpcs: Family<RpcLabels, Counter>,
    rpc_duration: Histograms<DurationLabels>,
    /// By [`Method::index`].
    methods: Vec<MethodSeries>,
    rpcs_in_flight: Gauge,
    store_duration: Histograms<CommandLabels>,
    /// The store's commands' series, each resolved on first use (a store sends fewer kinds
    /// of command than there are slots), so a command records without a label lookup.
    store_commands: [OnceLock<(&'static str, Histogram)>; STORE_COMMAND_SLOTS],
    store_errors: Family<KindLabels, Counter>,
    shed: Counter,
    busts: Family<ScopeLabels, Counter>,
    busted_entries: Family<ScopeLabels, Counter>,
    lease_events: Family<EventLabels, Counter>,
    namespaces: Namespaces,
}

/// The server's metrics. Cloning is shallow; a disabled handle ([`Metrics::disabled`])
/// records nothing and costs a branch per call.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    recorder: Option<Arc<Recorder>>,
}

impl Metrics {
    /// A handle that records nothing: the server without `--metrics-listen`.
    pub fn disabled() -> Self {
        Metrics::default()
    }

    /// A registry with every family registered, giving at most `max_namespaces` namespaces
    /// series of their own.
    pub fn new(max_namespaces: usize) -> Self {
        let recorder = Recorder {
            registry: Mutex::new(Registry::with_prefix(PREFIX)),
            rpcs: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_histogram),
            methods: (0..Method::COUNT)
                .map(|_| MethodSeries {
                    duration: [OnceLock::new(), OnceLock::new()],
                    codes: std::array::from_fn(|_| OnceLock::new()),
                })
                .collect(),
            rpcs_in_flight: Gauge::default(),
            store_duration: Family::new_with_constructor(latency_histogram),
            store_commands: std::array::from_fn(|_| OnceLock::new()),
            store_errors: Family::default(),
            shed: Counter::default(),
            busts: Family::default(),
            busted_entries: Family::default(),
            lease_events: Family::default(),
            namespaces: Namespaces::new(max_namespaces),
        };
        {
            let mut registry = lock(&recorder.registry);
            let r = &mut *registry;
            // Help texts without a final period: prometheus-client adds one.
            r.register(
                "build",
                "The server's version; always 1",
                Info::new(BuildLabels {
                    version: env!("CARGO_PKG_VERSION"),
                }),
            );
            r.register(
                "rpcs",
                "cache_money.v1.CacheMoney RPCs finished, by method and gRPC status code (refused ones included)",
                recorder.rpcs.clone(),
            );
            r.register_with_unit(
                "rpc_duration",
                "Time from receiving an RPC to sending its status, by method and outcome (ok: status OK; error: any other status)",
                Unit::Seconds,
                recorder.rpc_duration.clone(),
            );
            r.register(
                "rpcs_in_flight",
                "RPCs received and not yet answered",
                recorder.rpcs_in_flight.clone(),
            );
            r.register_with_unit(
                "store_command_duration",
                "Time one store command took, waiting for a connection included, by command",
                Unit::Seconds,
                recorder.store_duration.clone(),
            );
            r.register(
                "store_errors",
                "Store operations that failed, by kind (timeout, unavailable, out_of_memory, internal)",
                recorder.store_errors.clone(),
            );
            r.register(
                "requests_shed",
                "Requests refused at once with RESOURCE_EXHAUSTED because --max-in-flight store operations were already running",
                recorder.shed.clone(),
            );
            r.register(
                "busts",
                "Busts done, by scope (entry, function, namespace, all, tag)",
                recorder.busts.clone(),
            );
            r.register(
                "busted_entries",
                "Entries removed by busts, by scope",
                recorder.busted_entries.clone(),
            );
            r.register(
                "lease_events",
                "Lease decisions, by event (won, waited, expired: an expired lease taken over, refused: a write under a voided lease, stale_served, refreshed: a due entry leased for refresh)",
                recorder.lease_events.clone(),
            );
            r.register(
                "lookups",
                "Keys looked up by Get and GetMany, by namespace and result (hit, miss, error, shed)",
                recorder.namespaces.families.lookups.clone(),
            );
            r.register_with_unit(
                "read",
                "Value bytes served by hits, by namespace",
                Unit::Bytes,
                recorder.namespaces.families.read_bytes.clone(),
            );
            r.register_with_unit(
                "written",
                "Value bytes stored by Put and PutMany, by namespace",
                Unit::Bytes,
                recorder.namespaces.families.written_bytes.clone(),
            );
        }
        Metrics {
            recorder: Some(Arc::new(recorder)),
        }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.recorder.is_some()
    }

    /// Exports `store`'s state and `store_up` (the health monitor's verdict) on every scrape.
    pub fn watch_store<S: Store>(&self, store: S, store_up: Arc<AtomicBool>) {
        if let Some(recorder) = &self.recorder {
            lock(&recorder.registry)
                .register_collector(Box::new(StoreCollector { store, store_up }));
        }
    }

    /// The time now when recording, for [`Metrics::store_command`]; `None` (no clock read)
    /// when disabled.
    pub fn start(&self) -> Option<Instant> {
        self.recorder.as_ref().map(|_| Instant::now())
    }

    /// An RPC was received.
    pub fn rpc_started(&self) {
        if let Some(recorder) = &self.recorder {
            recorder.rpcs_in_flight.inc();
        }
    }

    /// An RPC received earlier was answered with `code` after `elapsed`.
    pub fn rpc_finished(&self, method: Method, code: Code, elapsed: Duration) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder.rpcs_in_flight.dec();
        let series = &recorder.methods[method.index()];
        let name = method.name();
        series.codes[code as usize]
            .get_or_init(|| {
                recorder.rpcs.get_or_create_owned(&RpcLabels {
                    method: name,
                    code: code_name(code),
                })
            })
            .inc();
        let outcome = outcome_name(code);
        series.duration[usize::from(code != Code::Ok)]
            .get_or_init(|| {
                recorder.rpc_duration.get_or_create_owned(&DurationLabels {
                    method: name,
                    outcome,
                })
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts lookups: each item's namespace, result and value size.
    pub fn lookups<'a>(&self, lookups: impl IntoIterator<Item = (&'a str, Lookup, usize)>) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder.namespaces.record(
            lookups,
            |(namespace, _, _)| namespace,
            |counters, (_, result, bytes)| match result {
                Lookup::Hit => {
                    counters.hits.inc();
                    counters.read_bytes.inc_by(bytes as u64);
                }
                Lookup::Miss => {
                    counters.misses.inc();
                }
                Lookup::Error => {
                    counters.errors.inc();
                }
                Lookup::Shed => {
                    counters.shed.inc();
                }
            },
        );
    }

    /// Counts values written: each item's namespace and value size.
    pub fn written<'a>(&self, writes: impl IntoIterator<Item = (&'a str, usize)>) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        recorder.namespaces.record(
            writes,
            |(namespace, _)| namespace,
            |counters, (_, bytes)| {
                counters.written_bytes.inc_by(bytes as u64);
            },
        );
    }

    /// Counts a bust of `scope` (see [`Scope::name`](crate::server::store::Scope::name)) that
    /// removed `removed` entries.
    pub fn bust(&self, scope: &'static str, removed: u64) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let labels = ScopeLabels { scope };
        recorder.busts.get_or_create(&labels).inc();
        recorder
            .busted_entries
            .get_or_create(&labels)
            .inc_by(removed);
    }

    /// Counts one lease event.
    pub fn lease(&self, event: LeaseEvent) {
        if let Some(recorder) = &self.recorder {
            recorder
                .lease_events
                .get_or_create(&EventLabels {
                    event: event.name(),
                })
                .inc();
        }
    }

    /// Counts a failed store operation: shed when it was refused for `--max-in-flight`.
    pub fn store_failed(&self, err: &StoreError) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let kind = match err {
            StoreError::Overloaded { .. } => {
                recorder.shed.inc();
                return;
            }
            StoreError::Timeout { .. } => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::OutOfMemory(_) => "out_of_memory",
            StoreError::InvalidCursor(_) => "invalid_cursor",
            StoreError::StaleCursor(_) => "stale_cursor",
            StoreError::Internal(_) => "internal",
        };
        recorder
            .store_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Records the time a store `command` took since `started` ([`Metrics::start`], or a clock
    /// reading the caller took anyway).
    pub fn store_command(&self, command: &'static str, started: Option<Instant>) {
        if let (Some(recorder), Some(started)) = (&self.recorder, started) {
            let elapsed = started.elapsed().as_secs_f64();
            for slot in &recorder.store_commands {
                let (name, series) = slot.get_or_init(|| {
                    let series = recorder
                        .store_duration
                        .get_or_create_owned(&CommandLabels { command });
                    (command, series)
                });
                if *name == command {
                    series.observe(elapsed);
                    return;
                }
            }
            recorder
                .store_duration
                .get_or_create(&CommandLabels { command })
                .observe(elapsed);
        }
    }

    /// Every metric in `format`; empty when disabled.
    pub fn encode(&self, format: Format) -> String {
        let mut text = String::new();
        if let Some(recorder) = &self.recorder {
            let registry = lock(&recorder.registry);
            let encoded = match format {
                Format::OpenMetrics => {
                    prometheus_client::encoding::text::encode(&mut text, &registry)
                }
                Format::Prometheus => {
                    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
                }
            };
            // Writing to a String cannot fail, and every metric here encodes.
            encoded.expect("metrics encode into a String");
        }
        text
    }
}

/// Reads the store's state when metrics are scraped, rather than on every request.
#[derive(Debug)]
struct StoreCollector<S> {
    store: S,
    store_up: Arc<AtomicBool>,
}

/// Writes one unlabelled gauge or counter.
fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl<S: Store> Collector for StoreCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let up = ConstGauge::new(i64::from(self.store_up.load(Relaxed)));
        let mut family = encoder.encode_descriptor(
            "store_up",
            "Whether the store answered the latest health probe (1) or not (0), by store (redis, redis-cluster, memory).",
            None,
            MetricType::Gauge,
        )?;
        up.encode(family.encode_family(&[("store", self.store.kind())])?)?;
        let state = self.store.state();
        encode_one(
            &mut encoder,
            "store_operations_in_flight",
            "Store operations holding one of the --max-in-flight permits.",
            &ConstGauge::new(state.in_flight as i64),
        )?;
        if let Some(pool) = state.pool {
            encode_one(
                &mut encoder,
                "store_pool_connections",
                "Redis connections open in the pool (idle or in use).",
                &ConstGauge::new(i64::from(pool.connections)),
            )?;
            encode_one(
                &mut encoder,
                "store_pool_idle_connections",
                "Redis connections open in the pool and idle.",
                &ConstGauge::new(i64::from(pool.idle)),
            )?;
            encode_one(
                &mut encoder,
                // Not `…_created`: OpenMetrics reserves that suffix for a counter's creation
                // time.
                "store_pool_connections_opened",
                "Redis connections opened since start.",
                &ConstCounter::new(pool.created),
            )?;
            encode_one(
                &mut encoder,
                "store_pool_connections_broken",
                "Redis connections retired since start because a command on them failed or timed out.",
                &ConstCounter::new(pool.broken),
            )?;
        }
        if let Some(memory) = state.memory {
            encode_one(
                &mut encoder,
                "memory_store_entries",
                "Entries in the in-memory store.",
                &ConstGauge::new(memory.entries as i64),
            )?;
            let bytes = ConstGauge::new(memory.bytes as i64);
            bytes.encode(encoder.encode_descriptor(
                "memory_store",
                "Bytes the in-memory store charges against --memory-max-bytes.",
                Some(&Unit::Bytes),
                bytes.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_line(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find(|line| line.starts_with(prefix))
            .map(str::to_owned)
    }

    /// Past the cap, new namespaces share the `other` series; the first ones keep theirs.
    #[test]
    fn namespaces_past_the_cap_fold_into_other() {
        let metrics = Metrics::new(2);
        for namespace in ["a", "b", "c", "d", "a", "other"] {
            metrics.lookups([(namespace, Lookup::Miss, 0)]);
        }
        let text = metrics.encode(Format::Prometheus);
        let misses = |namespace: &str| {
            counter_line(
                &text,
                &format!("cache_money_lookups_total{{namespace=\"{namespace}\",result=\"miss\"}} "),
            )
            .map(|line| line.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(misses("a").as_deref(), Some("2"));
        assert_eq!(misses("b").as_deref(), Some("1"));
        assert_eq!(misses("other").as_deref(), Some("3"));
        assert_eq!(misses("c"), None);
        assert_eq!(misses("d"), None);
    }

    /// A disabled handle records nothing and exports nothing.
    #[test]
    fn disabled_metrics_export_nothing() {
        let metrics = Metrics::disabled();
        metrics.rpc_started();
        metrics.lookups([("a", Lookup::Hit, 3)]);
        assert!(!metrics.is_enabled());
        assert_eq!(metrics.start(), None);
        assert_eq!(metrics.encode(Format::OpenMetrics), "");
    }

    /// Every gRPC status code has its canonical upper-case name.
    #[test]
    fn code_names_are_canonical() {
        for (number, name) in [
            (0, "OK"),
            (3, "INVALID_ARGUMENT"),
            (8, "RESOURCE_EXHAUSTED"),
            (14, "UNAVAILABLE"),
            (16, "UNAUTHENTICATED"),
        ] {
            assert_eq!(code_name(Code::from_i32(number)), name);
        }
        let names: std::collections::HashSet<_> =
            (0..17).map(|n| code_name(Code::from_i32(n))).collect();
        assert_eq!(names.len(), 17);
    }
}
