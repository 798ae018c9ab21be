//! Several server replicas behind one [`Channel`], for
//! [`Client::connect_many`](crate::Client::connect_many): tonic's balancer (power of two
//! choices over the replicas whose connection is ready) fed with
//! [`Change`]s by a watcher that keeps the set to the replicas that answer.
//!
//! Why a watcher: tonic's balanced connections reconnect lazily and report a failed connect as
//! *ready* (the error is handed to the next call), so the balancer never sets a dead replica
//! aside and keeps sending it its share of calls, each of which fails (hyperium/tonic#643,
//! measured in `tests/replicas.rs`). The watcher asks every replica's gRPC health service each
//! [`ClientOptions::probe_interval`], over a connection of its own:
//! - a replica that does not answer `SERVING` within [`ClientOptions::probe_timeout`] (dead,
//!   frozen, draining after SIGTERM, or cut off from the store) is removed from the balancer,
//!   and inserted again once it answers; the first round runs when the client is made,
//!   before the balancer gets any replica, so one dead from the start takes no calls
//!   (making the client then takes up to the probe timeout);
//! - when no replica answers, all of them stay in: calls then fail at once with the
//!   transport's reason, rather than waiting on an empty balancer for their whole deadline;
//! - with [`ClientOptions::resolve_interval`], each URL's host is looked up (tokio's
//!   `lookup_host`) when the client is made and again every interval, and each address it
//!   resolves to is a replica of its own (a headless Kubernetes service, a DNS round robin).
//!   A lookup that fails or finds nothing keeps the addresses found before; a name never
//!   resolved stays in as itself, so calls fail with the resolver's error.
//!
//! The watcher stops when the last clone of the channel is dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::{
    sync::mpsc::Sender,
    task::JoinSet,
    time::{MissedTickBehavior, interval, timeout},
};
use tonic::transport::{Channel, Endpoint, channel::Change};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::{info, warn};

use crate::{ClientOptions, Error, connect::Target, pb::cache_money_server::SERVICE_NAME};

/// How a replica is known to the balancer: the address it is dialled at
/// (`http://10.0.0.7:50051`), or its URL as given while it is dialled by name.
type Key = String;

/// The shortest interval between health checks or lookups: a zero interval would make the
/// watcher spin (and tokio's timer refuses it).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Room for the changes of a whole re-resolution in the balancer's queue; the watcher waits
/// for room beyond it.
const CHANGES_CAPACITY: usize = 256;

/// A replica the watcher knows of: how to reach it, and whether it answered its last probe.
#[derive(Debug)]
struct Replica {
    endpoint: Endpoint,
    probe: HealthClient<Channel>,
    healthy: bool,
}

impl Replica {
    fn new(endpoint: Endpoint) -> Self {
        // The probe's own connection, set up as the balancer's (keepalive, TLS, timeouts).
        let probe = HealthClient::new(endpoint.connect_lazy());
        Replica {
            endpoint,
            probe,
            // Until probed, a replica counts as up: `channel` probes them all before the
            // balancer gets any, and a replica found later is probed before it is published.
            healthy: true,
        }
    }
}

/// Checks `urls` and makes the balanced channel over them, starting the watcher when there is
/// anything to watch (more than one replica, or names to resolve).
///
/// # Errors
/// [`Error::InvalidUrl`] for an empty list, a URL [`Client::connect`](crate::Client::connect)
/// refuses, a URL listed twice, or `http://` and `https://` mixed in one list.
pub(crate) async fn channel(urls: Vec<String>, options: &ClientOptions) -> Result<Channel, Error> {
    let targets = checked(urls)?;
    let mut watcher = Watcher {
        targets,
        options: options.clone(),
        resolved: BTreeMap::new(),
        replicas: BTreeMap::new(),
        inserted: BTreeSet::new(),
    };
    if options.resolve_interval.is_some() {
        watcher.resolve().await;
    }
    watcher.refresh_candidates()?;
    // One health check of every replica (at once, within the probe timeout) before the
    // balancer gets any: a replica dead at start-up would otherwise take its share of the
    // first calls until the watcher's first round.
    if watcher.replicas.len() > 1 {
        watcher.probe().await;
    }
    let (channel, changes) = Channel::balance_channel(CHANGES_CAPACITY.max(watcher.replicas.len()));
    watcher.inserted = wanted(
        watcher
            .replicas
            .iter()
            .map(|(key, replica)| (key, replica.healthy)),
    );
    for key in &watcher.inserted {
        changes
            .try_send(Change::Insert(
                key.clone(),
                watcher.replicas[key].endpoint.clone(),
            ))
            .expect("the queue has room for every replica and its receiver is alive");
    }
    if watcher.replicas.len() > 1 || options.resolve_interval.is_some() {
        tokio::spawn(watcher.run(changes));
    }
    Ok(channel)
}

/// The URLs as targets, refusing a list the client cannot balance over.
fn checked(urls: Vec<String>) -> Result<Vec<Target>, Error> {
    if urls.is_empty() {
        return Err(Error::InvalidUrl(
            "no replica URLs given: list at least one, as in [\"http://127.0.0.1:50051\"]".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut targets: Vec<Target> = Vec::with_capacity(urls.len());
    for url in urls {
        let target = Target::parse(&url)?;
        if !seen.insert(url.clone()) {
            return Err(Error::InvalidUrl(format!("{url:?}: listed twice")));
        }
        if let Some(first) = targets.first()
            && first.is_secure() != target.is_secure()
        {
            return Err(Error::InvalidUrl(format!(
                "{:?} and {url:?}: every replica must use the same scheme (all http:// or all \
                 https://), or calls would be encrypted or not depending on the replica chosen",
                first.url()
            )));
        }
        targets.push(target);
    }
    Ok(targets)
}

/// Keeps the balancer's set of replicas to those that answer.
struct Watcher {
    targets: Vec<Target>,
    options: ClientOptions,
    /// The addresses each target's host last resolved to (by target index); a target with
    /// none is dialled by its URL.
    resolved: BTreeMap<usize, Vec<SocketAddr>>,
    /// Every replica there is, healthy or not.
    replicas: BTreeMap<Key, Replica>,
    /// The replicas the balancer has.
    inserted: BTreeSet<Key>,
}

impl Watcher {
    async fn run(mut self, changes: Sender<Change<Key, Endpoint>>) {
        let mut probes = interval(self.options.probe_interval.max(MIN_INTERVAL));
        probes.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Without resolution the timer never fires: a week stands in for "never".
        let every = self
            .options
            .resolve_interval
            .unwrap_or(Duration::from_secs(7 * 24 * 3600))
            .max(MIN_INTERVAL);
        let mut lookups = interval(every);
        lookups.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first lookup was made when the channel was.
        lookups.tick().await;
        loop {
            tokio::select! {
                _ = changes.closed() => return,
                _ = probes.tick() => self.probe().await,
                _ = lookups.tick(), if self.options.resolve_interval.is_some() => {
                    self.resolve().await;
                    if let Err(err) = self.refresh_candidates() {
                        warn!(cause = %err, "cache-money replicas: a resolved address cannot be used");
                    }
                    // New addresses are probed before they are trusted with calls.
                    self.probe().await;
                }
            }
            if self.publish(&changes).await.is_err() {
                // The balancer is gone: every clone of the channel was dropped.
                return;
            }
        }
    }

    /// Looks up every target's host; a lookup that fails or finds nothing keeps what the
    /// previous one found.
    async fn resolve(&mut self) {
        let within = self.options.connect_timeout;
        for (index, target) in self.targets.iter().enumerate() {
            let (host, port) = target.host_port();
            let found = match &self.options.resolver {
                Some(resolver) => Ok(resolver(&host, port)),
                None => timeout(within, tokio::net::lookup_host((host.as_str(), port)))
                    .await
                    .map(|found| found.map(Iterator::collect)),
            };
            match found {
                Ok(Ok(mut addrs)) => {
                    addrs.sort();
                    addrs.dedup();
                    if !addrs.is_empty() {
                        self.resolved.insert(index, addrs);
                        continue;
                    }
                    warn!(
                        url = target.url(),
                        "cache-money replicas: the name resolved to no address; keeping the previous ones"
                    );
                }
                Ok(Err(err)) => {
                    warn!(url = target.url(), cause = %err, "cache-money replicas: looking up the name failed; keeping the previous addresses");
                }
                Err(_) => {
                    warn!(
                        url = target.url(),
                        "cache-money replicas: looking up the name took over the connect timeout; keeping the previous addresses"
                    );
                }
            }
        }
    }

    /// Brings `replicas` in line with the targets and what they resolved to, keeping what is
    /// known of replicas that remain (their probe connection, their health).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when an address cannot make an endpoint.
    fn refresh_candidates(&mut self) -> Result<(), Error> {
        let mut wanted: BTreeMap<Key, (usize, Option<SocketAddr>)> = BTreeMap::new();
        for (index, target) in self.targets.iter().enumerate() {
            match self.resolved.get(&index) {
                Some(addrs) => {
                    let scheme = if target.is_secure() { "https" } else { "http" };
                    for addr in addrs {
                        wanted.insert(format!("{scheme}://{addr}"), (index, Some(*addr)));
                    }
                }
                None => {
                    wanted.insert(target.url().to_owned(), (index, None));
                }
            }
        }
        self.replicas.retain(|key, _| wanted.contains_key(key));
        for (key, (index, addr)) in wanted {
            if self.replicas.contains_key(&key) {
                continue;
            }
            let target = &self.targets[index];
            let endpoint = match addr {
                Some(addr) => target.endpoint_at(addr, &self.options)?,
                None => target.endpoint(&self.options)?,
            };
            self.replicas.insert(key, Replica::new(endpoint));
        }
        Ok(())
    }

    /// Asks every replica's health service at once; each answer, or its absence within the
    /// probe timeout, sets that replica's health.
    async fn probe(&mut self) {
        let within = self.options.probe_timeout;
        let mut probes = JoinSet::new();
        for (key, replica) in &self.replicas {
            let (key, mut client) = (key.clone(), replica.probe.clone());
            probes.spawn(async move {
                let request = HealthCheckRequest {
                    service: SERVICE_NAME.to_owned(),
                };
                let verdict = match timeout(within, client.check(request)).await {
                    Err(_) => Err(format!("no answer within {} ms", within.as_millis())),
                    Ok(Ok(reply)) => match reply.into_inner().status() {
                        ServingStatus::Serving => Ok(()),
                        other => Err(format!("health reports {}", other.as_str_name())),
                    },
                    // A server without the health service (behind a proxy that hides it) is
                    // reachable, which is what the balancer needs to know.
                    Ok(Err(status))
                        if matches!(
                            status.code(),
                            tonic::Code::Unimplemented | tonic::Code::NotFound
                        ) =>
                    {
                        Ok(())
                    }
                    Ok(Err(status)) => Err(crate::connect::describe(&status)),
                };
                (key, verdict)
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((key, verdict)) = done else { continue };
            let Some(replica) = self.replicas.get_mut(&key) else {
                continue;
            };
            match verdict {
                Ok(()) if !replica.healthy => {
                    info!(replica = %key, "cache-money replica answers again: calls go to it");
                    replica.healthy = true;
                }
                Err(cause) if replica.healthy => {
                    warn!(replica = %key, cause = %cause, "cache-money replica does not answer its health check: calls go to the others");
                    replica.healthy = false;
                }
                _ => {}
            }
        }
    }

    /// Sends the balancer the changes that make its set the healthy replicas, or every
    /// replica when none is healthy.
    ///
    /// # Errors
    /// When the balancer is gone.
    async fn publish(&mut self, changes: &Sender<Change<Key, Endpoint>>) -> Result<(), ()> {
        let wanted = wanted(
            self.replicas
                .iter()
                .map(|(key, replica)| (key, replica.healthy)),
        );
        // Insertions first: when the set moves from {a} to {b}, the balancer never holds
        // nothing in between (calls would wait for a replica).
        for key in wanted.difference(&self.inserted) {
            let endpoint = self.replicas[key].endpoint.clone();
            changes
                .send(Change::Insert(key.clone(), endpoint))
                .await
                .map_err(drop)?;
        }
        for key in self.inserted.difference(&wanted) {
            changes
                .send(Change::Remove(key.clone()))
                .await
                .map_err(drop)?;
        }
        self.inserted = wanted;
        Ok(())
    }
}

/// The replicas the balancer should have, given each one's health: the healthy ones, or all
/// of them when none is, so a call fails fast with a reason instead of waiting for a replica
/// that is not coming.
fn wanted<'a>(health: impl Iterator<Item = (&'a Key, bool)> + Clone) -> BTreeSet<Key> {
    let healthy: BTreeSet<Key> = health
        .clone()
        .filter(|(_, healthy)| *healthy)
        .map(|(key, _)| key.clone())
        .collect();
    if healthy.is_empty() {
        health.map(|(key, _)| key.clone()).collect()
    } else {
        healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|url| url.to_string()).collect()
    }

    fn refused(list: &[&str]) -> String {
        match checked(urls(list)) {
            Err(Error::InvalidUrl(why)) => why,
            other => panic!("{list:?} was not refused: {other:?}"),
        }
    }

    /// An empty list, a URL listed twice, mixed schemes and a bad URL are refused with a reason.
    #[test]
    fn unusable_lists_are_refused() {
        assert!(refused(&[]).contains("no replica URLs"));
        assert!(refused(&["http://a:1", "http://a:1"]).contains("listed twice"));
        assert!(refused(&["http://a:1", "https://b:1"]).contains("same scheme"));
        assert!(refused(&["http://a:1", "b:1"]).contains("http://host:port"));
        assert_eq!(
            checked(urls(&["https://a:1", "https://b:2"]))
                .unwrap()
                .len(),
            2
        );
    }

    /// What a name resolves to becomes the replicas: a new lookup adds the new addresses and
    /// removes the gone ones, keeps what it knew of the others (a replica found unhealthy
    /// stays out), and the balancer is told exactly those changes, insertions before removals
    /// so it is never left empty in between.
    #[tokio::test]
    async fn lookups_add_and_remove_replicas() {
        let addr = |last: u8| SocketAddr::from(([10, 0, 0, last], 50051));
        let mut watcher = Watcher {
            targets: checked(urls(&["http://cache.example:50051"])).unwrap(),
            options: ClientOptions::default(),
            resolved: BTreeMap::from([(0, vec![addr(1), addr(2)])]),
            replicas: BTreeMap::new(),
            inserted: BTreeSet::new(),
        };
        let (changes, mut balancer) = tokio::sync::mpsc::channel(16);
        let mut told = async |watcher: &mut Watcher| {
            watcher.refresh_candidates().unwrap();
            watcher.publish(&changes).await.unwrap();
            let mut told = Vec::new();
            while let Ok(change) = balancer.try_recv() {
                told.push(match change {
                    Change::Insert(key, _) => format!("+{key}"),
                    Change::Remove(key) => format!("-{key}"),
                });
            }
            told
        };
        assert_eq!(
            told(&mut watcher).await,
            ["+http://10.0.0.1:50051", "+http://10.0.0.2:50051"]
        );
        watcher
            .replicas
            .get_mut("http://10.0.0.1:50051")
            .unwrap()
            .healthy = false;
        assert_eq!(told(&mut watcher).await, ["-http://10.0.0.1:50051"]);
        watcher.resolved.insert(0, vec![addr(1), addr(3)]);
        assert_eq!(
            told(&mut watcher).await,
            ["+http://10.0.0.3:50051", "-http://10.0.0.2:50051"]
        );
        assert!(!watcher.replicas["http://10.0.0.1:50051"].healthy);
        // Unresolved, a target is dialled by its URL.
        watcher.resolved.clear();
        assert_eq!(
            told(&mut watcher).await,
            ["+http://cache.example:50051", "-http://10.0.0.3:50051"]
        );
    }

    /// The balancer gets the healthy replicas; when none is healthy it gets them all.
    #[test]
    fn the_balancer_gets_the_healthy_replicas_or_all() {
        let (a, b) = ("a".to_string(), "b".to_string());
        let set = |keys: &[&String]| {
            keys.iter()
                .map(|key| (*key).clone())
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(wanted([(&a, true), (&b, false)].into_iter()), set(&[&a]));
        assert_eq!(wanted([(&a, true), (&b, true)].into_iter()), set(&[&a, &b]));
        assert_eq!(
            wanted([(&a, false), (&b, false)].into_iter()),
            set(&[&a, &b])
        );
    }
}
