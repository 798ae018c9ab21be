//! How calls reach the service: [`Transport`], the service the generated stub
//! ([`RawClient`](crate::RawClient)) sends its requests through.
//!
//! A client of one `http://` URL ([`Client::connect`](crate::Client::connect)) speaks HTTP/2
//! through the `h2` crate directly: each call opens its stream and writes its request from the
//! caller's own task, and one task per connection reads and writes the socket. tonic's
//! `Channel` puts more between a call and the socket (a tower `Buffer` and its worker task,
//! then hyper's client: its dispatch channel to the connection task and a task per request
//! for the response), and a memoize hit cost 81,664 client instructions through it against
//! 57,315 here (BENCHMARKS.md, "The client's transport"). Everything else goes through tonic's
//! `Channel`: `https://` (its TLS), several replicas (its balancer) and channels a caller made
//! ([`Client::from_channel`](crate::Client::from_channel)).
//!
//! The direct connection keeps the `Channel`'s guarantees:
//! - it connects lazily, one attempt at a time shared by every caller waiting, carried on by
//!   its own task when the callers that started it stop waiting (their deadlines are shorter
//!   than a slow handshake), and bounded by [`ClientOptions::connect_timeout`], which
//!   includes the server answering a first PING: a peer that accepts TCP but does not speak
//!   HTTP/2 is never sent a call;
//! - it PINGs every [`ClientOptions::keepalive_interval`], also while idle, and closes a
//!   connection whose PING goes unanswered for [`ClientOptions::keepalive_timeout`]: the
//!   calls on it fail `UNAVAILABLE` and the next call opens a new one;
//! - no call is ever sent twice. A call goes to a new connection only when the old one
//!   refused to open its stream (closed, or told to go away), so nothing of it was sent;
//! - a `grpc-timeout` a raw caller set bounds the call on the client too, until the
//!   response's head arrives (as tonic's `Channel`; here the wait for a connection counts);
//! - a dropped client leaves nothing running once its last stream has ended and an attempt
//!   to connect under way has finished (within the connect timeout).
//!
//! The connection's task runs on the runtime of the call that opened it. A client used from
//! several runtimes (one installed once, used by tests that each run their own) keeps working
//! when that runtime shuts down: the next call opens a new connection from its own runtime,
//! though calls in flight on the old connection at that moment fail `UNAVAILABLE`.

use std::{
    collections::VecDeque,
    fmt,
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{
    Ping, PingPong, Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{
    HeaderName, HeaderValue, Request, Response, Uri,
    header::{AUTHORIZATION, CONNECTION, TRANSFER_ENCODING, UPGRADE, USER_AGENT},
    uri::{Authority, Scheme},
};
use http_body::{Body as _, Frame};
use tokio::{net::TcpStream, sync::watch, time::Instant};
use tonic::{
    Code, Status, body::Body, codegen::StdError, metadata::MetadataMap, transport::Channel,
};

use prost::Message;

use crate::{
    ClientOptions,
    busy_poll::{self, BusyPoll},
    codec::{self, Codec, FRAME_HEADER, GET_PATH},
    connect::Target,
    lock,
    pb::{self, cache_money_client::CacheMoneyClient},
};

/// What the client's stub sends its calls through: a direct HTTP/2 connection to one
/// `http://` service, or a tonic `Channel` (TLS, several replicas, or one the caller made).
/// Adds the client's `authorization` header to every call. Cheap to clone: clones share the
/// connection.
#[derive(Clone)]
pub struct Transport {
    route: Route,
    authorization: Option<HeaderValue>,
}

#[derive(Clone)]
enum Route {
    Direct(Arc<Direct>),
    Channel(Channel),
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = match &self.route {
            Route::Direct(direct) => format!("direct HTTP/2 to {}", direct.url),
            Route::Channel(_) => "tonic Channel".to_owned(),
        };
        let authorization = if self.authorization.is_some() {
            "Bearer <redacted>"
        } else {
            "none"
        };
        f.debug_struct("Transport")
            .field("route", &route)
            .field("authorization", &authorization)
            .finish()
    }
}

impl Transport {
    /// A direct connection to `target` (an `http://` URL), opened at the first call.
    pub(crate) fn direct(
        target: &Target,
        options: &ClientOptions,
        authorization: Option<HeaderValue>,
    ) -> Self {
        debug_assert!(!target.is_secure(), "TLS goes through tonic's Channel");
        Transport {
            route: Route::Direct(Arc::new_cyclic(|this| Direct::new(this, target, options))),
            authorization,
        }
    }

    /// Calls through `channel`.
    pub(crate) fn channel(channel: Channel, authorization: Option<HeaderValue>) -> Self {
        Transport {
            route: Route::Channel(channel),
            authorization,
        }
    }

    /// Gets whose reply arrived while polling for it (none through a `Channel`).
    pub(crate) fn polled_gets(&self) -> u64 {
        match &self.route {
            Route::Direct(direct) => direct.busy_poll.caught(),
            Route::Channel(_) => 0,
        }
    }
}

/// The generated stub's view of a transport: a tower service from HTTP requests carrying a
/// gRPC body to HTTP responses.
impl tower_service::Service<Request<Body>> for Transport {
    type Response = Response<Body>;
    type Error = StdError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, StdError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StdError>> {
        match &mut self.route {
            // Readiness is the connection's, awaited in the call: it may have to connect.
            Route::Direct(_) => Poll::Ready(Ok(())),
            Route::Channel(channel) => channel.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert(AUTHORIZATION, authorization.clone());
        }
        match &mut self.route {
            Route::Direct(direct) => {
                let direct = Arc::clone(direct);
                Box::pin(async move { direct.call(request).await.map_err(Into::into) })
            }
            Route::Channel(channel) => {
                let call = channel.call(request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
        }
    }
}

/// The HTTP/1 connection-specific headers HTTP/2 forbids (those h2 refuses to send).
const CONNECTION_SPECIFIC: [HeaderName; 5] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Sent with every direct call, as gRPC asks of clients.
const USER_AGENT_VALUE: &str = concat!("cache-money-rust/", env!("CARGO_PKG_VERSION"));

/// hyper's HTTP/2 client settings, which tonic's `Channel` uses: a 2 MiB stream window and a
/// 5 MiB connection window (a large `GetMany` answer is not held up by window updates), 16 KiB
/// frames and header lists, at most 1 MiB buffered per stream before it stops asking for
/// room, 100 streams before the server's SETTINGS arrive.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
const MAX_FRAME: u32 = 16 << 10;
const MAX_HEADER_LIST: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 1 << 20;
/// Streams opened at once before the server's SETTINGS say how many it takes (hyper's). A
/// connection is used only after the server answered its first PING, by when its SETTINGS
/// (sent first) apply: this only keeps to hyper's settings.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// One `http://` service's connection: the live one if any, and the attempt under way.
struct Direct {
    /// Itself, for the attempt's task (which holds the client only while it connects).
    this: Weak<Direct>,
    url: Arc<str>,
    host: String,
    port: u16,
    authority: Authority,
    /// Where [`Transport::get`] sends its requests.
    get_uri: Uri,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    state: Mutex<State>,
    /// Polling for a Get's reply instead of sleeping until it wakes the caller.
    busy_poll: BusyPoll,
    /// Gets waiting for their reply right now (counted only while polling is on, and only
    /// those made from their connection's driver thread, [`Live::driver`]).
    gets_in_flight: AtomicU64,
}

/// An open connection: its handle for new streams, which one it is (connections are numbered
/// from 1), and the thread running its task when that is a current-thread runtime's
/// ([`busy_poll::thread_number`]; else 0). Only a Get made on that thread can see its reply
/// by polling: another thread would see it only once the driver's thread had been woken for
/// it.
#[derive(Clone)]
struct Live {
    sender: SendRequest<Bytes>,
    number: u64,
    driver: u64,
}

#[derive(Default)]
struct State {
    /// The open connection.
    live: Option<Live>,
    /// The attempt under way: its outcome, once known, for every caller waiting on it.
    opening: Option<watch::Receiver<Option<Result<(), Status>>>>,
    /// The number of the last connection opened.
    opened: u64,
}

impl Direct {
    fn new(this: &Weak<Direct>, target: &Target, options: &ClientOptions) -> Self {
        let (host, port) = target.host_port();
        Direct {
            this: this.clone(),
            url: target.url().into(),
            authority: target.authority(),
            get_uri: Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(target.authority())
                .path_and_query(GET_PATH)
                .build()
                .expect("an authority and a path make a URI"),
            host,
            port,
            connect_timeout: options.connect_timeout,
            keepalive_interval: options.keepalive_interval,
            keepalive_timeout: options.keepalive_timeout,
            state: Mutex::new(State::default()),
            busy_poll: BusyPoll::new(options.busy_poll),
            gets_in_flight: AtomicU64::new(0),
        }
    }

    /// One call: opens its stream, writes its request, and returns the response's head with
    /// its body still to come. A `grpc-timeout` the caller set (`tonic::Request::set_timeout`)
    /// bounds it here too until the response's head arrives, as tonic's `Channel` does:
    /// `CANCELLED` once it expires. A caller's own `user-agent` replaces the library's.
    async fn call(self: Arc<Self>, request: Request<Body>) -> Result<Response<Body>, Status> {
        let (mut head, body) = request.into_parts();
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = Uri::from_parts(uri)
            .map_err(|err| Status::internal(format!("request to {}: {err}", self.url)))?;
        // What HTTP/1 metadata a raw call may carry, HTTP/2 forbids (h2 would refuse the call).
        for name in CONNECTION_SPECIFIC {
            head.headers.remove(name);
        }
        head.headers
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(USER_AGENT_VALUE));
        let timeout = grpc_timeout(&head.headers);
        let request = Request::from_parts(head, ());
        let exchange = self.exchange(request, body);
        let response = match timeout {
            None => exchange.await?,
            Some(timeout) => tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| Status::cancelled("Timeout expired"))??,
        };
        let url = Arc::clone(&self.url);
        Ok(response.map(|recv| Body::new(ResponseBody::new(recv, url))))
    }

    /// Sends the request on a ready connection and waits for the response's head.
    async fn exchange(
        &self,
        request: Request<()>,
        body: Body,
    ) -> Result<Response<RecvStream>, Status> {
        let mut sender = self.ready().await?.sender;
        // From here on the request may reach the server: whatever happens, it is not sent again.
        let (response, stream) = sender
            .send_request(request, false)
            .map_err(|err| self.status(err))?;
        // A body the stream would not take (reset, or its connection lost meanwhile) says no
        // more than the response will: the server's status, or the connection's error.
        if let Err(Some(status)) = send_body(body, stream, &self.url).await {
            return Err(status);
        }
        response.await.map_err(|err| self.status(err))
    }

    /// A connection ready for a new stream. A connection that refuses one (closed, or the
    /// server said GOAWAY) has sent nothing of this call, so the call is made on a new
    /// connection, once.
    async fn ready(&self) -> Result<Live, Status> {
        let mut refused = None;
        for _ in 0..2 {
            let live = self.connection().await?;
            match live.sender.ready().await {
                Ok(sender) => return Ok(Live { sender, ..live }),
                Err(err) => {
                    self.forget(live.number);
                    refused = Some(err);
                }
            }
        }
        let err = refused.expect("the loop ran");
        Err(self.status(err))
    }

    /// The live connection, or the outcome of opening one (an attempt already under way is
    /// joined, not repeated). An attempt whose runtime shut down or stopped running it is
    /// made again, once, from this call's runtime.
    async fn connection(&self) -> Result<Live, Status> {
        match self.attempt().await {
            Err(Abandoned) => self.attempt().await.unwrap_or_else(|Abandoned| {
                Err(Status::unavailable(format!(
                    "connecting to {}: the attempt's runtime shut down",
                    self.url
                )))
            }),
            Ok(connection) => connection,
        }
    }

    /// As [`Direct::connection`], once.
    async fn attempt(&self) -> Result<Result<Live, Status>, Abandoned> {
        let mut outcome = {
            let mut state = lock(&self.state);
            if let Some(live) = &state.live {
                return Ok(Ok(live.clone()));
            }
            match &state.opening {
                Some(outcome) => outcome.clone(),
                None => {
                    let (done, outcome) = watch::channel(None);
                    state.opening = Some(outcome.clone());
                    // Its own task: the attempt carries on when the callers stop waiting.
                    tokio::spawn(open(self.this.clone(), done));
                    outcome
                }
            }
        };
        // An attempt ends within the connect timeout on a runtime that runs; one that has not
        // ended a second after is on a runtime that stopped running tasks (kept, but no longer
        // driven) or shut down.
        let patience = self.connect_timeout + Duration::from_secs(1);
        let waited = tokio::time::timeout(patience, outcome.wait_for(Option::is_some))
            .await
            .map(|waited| waited.map(|opened| opened.clone().expect("waited for an outcome")));
        let opened = match waited {
            Ok(Ok(opened)) => opened,
            Ok(Err(_)) | Err(_) => {
                // The attempt's task ended without an outcome, or is not being run: its runtime
                // shut down or stopped. A new attempt is made from this call's runtime.
                let mut state = lock(&self.state);
                if (state.opening.as_ref())
                    .is_some_and(|under_way| under_way.same_channel(&outcome))
                {
                    state.opening = None;
                }
                return Err(Abandoned);
            }
        };
        if let Err(status) = opened {
            return Ok(Err(status));
        }
        let state = lock(&self.state);
        Ok(match &state.live {
            Some(live) => Ok(live.clone()),
            None => Err(Status::unavailable(format!(
                "the connection to {} closed as soon as it opened",
                self.url
            ))),
        })
    }

    /// TCP to the first of the host's addresses that takes it (each tried for its share of
    /// what is left of the connect timeout, as tonic's connector does), `TCP_NODELAY` (every
    /// call is a small request waiting for a small answer), then HTTP/2's preface and a PING
    /// the server must answer: a peer that accepts TCP but does not speak HTTP/2 fails the
    /// attempt, before any call is sent to it. All of it by `deadline`.
    async fn handshake(&self, deadline: Instant) -> Result<Opened, Status> {
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let addresses: Vec<_> = tokio::time::timeout_at(deadline, lookup)
            .await
            .map_err(|_| self.timed_out(&format!("no address for {}", self.host)))?
            .map_err(|err| self.unreachable(err))?
            .collect();
        let mut failure = None;
        let mut tcp = None;
        for (tried, address) in addresses.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(addresses.len() - tried).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(connected)) => {
                    tcp = Some(connected);
                    break;
                }
                Ok(Err(err)) => failure = Some(self.unreachable(err)),
                Err(_) => {
                    failure = Some(Status::unavailable(format!(
                        "cannot connect to {}: no answer from {address} within {} ms",
                        self.url,
                        share.as_millis()
                    )));
                }
            }
        }
        let Some(tcp) = tcp else {
            return Err(failure.unwrap_or_else(|| {
                Status::unavailable(format!(
                    "cannot connect to {}: {} resolves to no address",
                    self.url, self.host
                ))
            }));
        };
        tcp.set_nodelay(true).map_err(|err| self.unreachable(err))?;
        let speak = async {
            let (sender, mut connection) = h2::client::Builder::new()
                .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_header_list_size(MAX_HEADER_LIST)
                .max_send_buffer_size(MAX_SEND_BUFFER)
                .enable_push(false)
                .handshake(tcp)
                .await
                .map_err(|err| self.unreachable(err))?;
            let mut pings = connection.ping_pong().expect("taken once, here");
            pings
                .send_ping(Ping::opaque())
                .map_err(|err| self.unreachable(err))?;
            let answered = poll_fn(|cx| pings.poll_pong(cx));
            tokio::select! {
                closed = &mut connection => Err(self.not_http2(closed.err())),
                answered = answered => match answered {
                    Ok(_) => Ok(Opened { sender, connection, pings }),
                    Err(err) => Err(self.not_http2(Some(err))),
                },
            }
        };
        tokio::time::timeout_at(deadline, speak)
            .await
            .map_err(|_| self.timed_out("no answer to HTTP/2"))?
    }

    /// A failed attempt: `cannot connect to URL: why`, the cause as the status's source.
    fn unreachable(&self, err: impl std::error::Error + Send + Sync + 'static) -> Status {
        let mut status = Status::unavailable(format!("cannot connect to {}: {err}", self.url));
        status.set_source(Arc::new(err));
        status
    }

    /// A peer that closed the connection, or broke HTTP/2, before answering its first PING.
    fn not_http2(&self, err: Option<h2::Error>) -> Status {
        let why = match &err {
            Some(err) => err.to_string(),
            None => "the server closed the connection before answering".to_owned(),
        };
        let mut status = Status::unavailable(format!(
            "cannot connect to {}: {why} (is it a gRPC port without TLS? use https:// for one with TLS)",
            self.url
        ));
        if let Some(err) = err {
            status.set_source(Arc::new(err));
        }
        status
    }

    /// An attempt that got no usable answer within the connect timeout.
    fn timed_out(&self, why: &str) -> Status {
        Status::unavailable(format!(
            "cannot connect to {}: {why} within {} ms (ClientOptions::connect_timeout)",
            self.url,
            self.connect_timeout.as_millis()
        ))
    }

    /// Drops connection `number` if it is still the live one: the next call opens another.
    fn forget(&self, number: u64) {
        let mut state = lock(&self.state);
        if state
            .live
            .as_ref()
            .is_some_and(|live| live.number == number)
        {
            state.live = None;
        }
    }

    fn status(&self, err: h2::Error) -> Status {
        status_of(err, &self.url)
    }
}

/// An attempt to connect whose runtime shut down before it ended.
struct Abandoned;

/// A connection the server has answered on: its handle for new streams, the connection to
/// drive, and its PINGs.
struct Opened {
    sender: SendRequest<Bytes>,
    connection: Connection<TcpStream, Bytes>,
    pings: PingPong,
}

/// Opens a connection for `direct` and tells the callers waiting on it how that went.
async fn open(direct: Weak<Direct>, done: watch::Sender<Option<Result<(), Status>>>) {
    let Some(direct) = direct.upgrade() else {
        return;
    };
    let deadline = Instant::now() + direct.connect_timeout;
    let outcome = match direct.handshake(deadline).await {
        Ok(opened) => {
            let mut state = lock(&direct.state);
            state.opened += 1;
            let number = state.opened;
            // `drive`, spawned below, runs on this runtime: on this thread if it is a
            // current-thread one.
            let driver = match busy_poll::on_current_thread_runtime() {
                true => busy_poll::thread_number(),
                false => 0,
            };
            state.live = Some(Live {
                sender: opened.sender,
                number,
                driver,
            });
            state.opening = None;
            drop(state);
            let keepalive = (direct.keepalive_interval, direct.keepalive_timeout);
            tokio::spawn(drive(
                opened.connection,
                opened.pings,
                keepalive,
                Arc::downgrade(&direct),
                number,
            ));
            Ok(())
        }
        Err(status) => Err(status),
    };
    if outcome.is_err() {
        lock(&direct.state).opening = None;
    }
    let _ = done.send(Some(outcome));
}

/// Serves connection `number` until it closes, PINGing it every keepalive interval and
/// closing it when a PING goes unanswered for the keepalive timeout. Then makes sure the
/// next call opens a new one. Once the client is dropped, h2 closes the connection when its
/// last stream (a `Watch` the caller still reads, say) ends.
async fn drive(
    mut connection: Connection<TcpStream, Bytes>,
    mut pings: PingPong,
    (interval, timeout): (Duration, Duration),
    owner: Weak<Direct>,
    number: u64,
) {
    loop {
        tokio::select! {
            _ = &mut connection => break,
            () = tokio::time::sleep(interval) => {}
        }
        if pings.send_ping(Ping::opaque()).is_err() {
            break;
        }
        let pong = tokio::time::timeout(timeout, poll_fn(|cx| pings.poll_pong(cx)));
        tokio::select! {
            _ = &mut connection => break,
            answered = pong => if !matches!(answered, Ok(Ok(_))) {
                // Unanswered: dropping the connection closes its socket and fails its calls.
                break;
            }
        }
    }
    drop(connection);
    if let Some(direct) = owner.upgrade() {
        direct.forget(number);
    }
}

/// Writes the request's body on `stream`: what is ready now from the caller's task (all of a
/// unary or server-streaming call's request, one message), the rest, if any, from a task of
/// its own, which stops when the server resets the stream. Fails with the body's own status
/// when encoding it failed or h2 refused to send it, or with `None` when the stream would not
/// take it (reset, or its connection lost): the response says why.
async fn send_body(
    body: Body,
    mut stream: SendStream<Bytes>,
    url: &str,
) -> Result<(), Option<Status>> {
    let mut pump = Pump { body, held: None };
    let first = poll_fn(|cx| Poll::Ready(pump.pump(&mut stream, cx))).await;
    match first {
        Poll::Ready(Ok(())) => Ok(()),
        Poll::Ready(Err(Ok(status))) => Err(Some(status)),
        // The server reset the stream, or the connection went: the response says which.
        Poll::Ready(Err(Err(err))) if err.is_reset() || err.is_go_away() || err.is_io() => {
            Err(None)
        }
        // Refused here (a frame h2 will not send): fail now; dropping the stream resets it.
        Poll::Ready(Err(Err(err))) => Err(Some(status_of(err, url))),
        Poll::Pending => {
            tokio::spawn(async move {
                poll_fn(|cx| {
                    if stream.poll_reset(cx).is_ready() {
                        return Poll::Ready(());
                    }
                    pump.pump(&mut stream, cx).map(|_| ())
                })
                .await;
            });
            Ok(())
        }
    }
}

/// A request body on its way to its stream. The last data frame is held until the body says
/// whether more follows, so a one-message request goes out as one DATA frame that ends the
/// stream.
struct Pump {
    body: Body,
    held: Option<Bytes>,
}

impl Pump {
    /// Sends what the body has ready; fails with the body's status or the stream's error.
    fn pump(
        &mut self,
        stream: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Result<Status, h2::Error>>> {
        loop {
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    self.send_held(stream).map_err(Err)?;
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    let data = self.held.take().unwrap_or_default();
                    return Poll::Ready(stream.send_data(data, true).map_err(Err));
                }
                Poll::Ready(Some(Err(status))) => {
                    stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(Ok(status)));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    self.send_held(stream).map_err(Err)?;
                    self.held = Some(data);
                }
                Err(frame) => {
                    self.send_held(stream).map_err(Err)?;
                    if let Ok(trailers) = frame.into_trailers() {
                        return Poll::Ready(stream.send_trailers(trailers).map_err(Err));
                    }
                }
            }
        }
    }

    /// Sends the data frame held back, now that more of the body is known to follow.
    fn send_held(&mut self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        match self.held.take() {
            Some(data) => stream.send_data(data, false),
            None => Ok(()),
        }
    }
}

/// A response's body as the stub reads it: its DATA (the room each frame took handed back to
/// the server as it is read), then its trailers.
struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    url: Arc<str>,
}

impl ResponseBody {
    fn new(recv: RecvStream, url: Arc<str>) -> Self {
        ResponseBody {
            recv,
            data_done: false,
            done: false,
            url,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status_of(err, &this.url))));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(status_of(err, &this.url)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// An HTTP/2 failure as a gRPC status, the error as its source. A connection lost, closed or
/// sent away (GOAWAY), or a stream the server refused, is `UNAVAILABLE`; a cancelled stream
/// `CANCELLED`; the rest as tonic maps them (`INTERNAL` for protocol errors). An `UNAVAILABLE`
/// call may still have run on the server: the connection may have been lost after the server
/// had the request.
fn status_of(err: h2::Error, url: &str) -> Status {
    let code = if err.is_io() || err.is_go_away() {
        Code::Unavailable
    } else {
        match err.reason() {
            Some(Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(Reason::CANCEL) => Code::Cancelled,
            Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            Some(_) => Code::Internal,
            None => Code::Unknown,
        }
    };
    let mut status = Status::new(code, format!("connection to {url}: {err}"));
    status.set_source(Arc::new(err));
    status
}

/// The `grpc-timeout` a call carries, as tonic's `Channel` reads it: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`). One it cannot read bounds nothing here (the server refuses
/// it).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at_checked(text.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 60 * 60),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

impl Transport {
    /// `Get`, as the generated stub makes it (`RawClient::get` with its decoding limit set to
    /// `max_receive`), with the same answer and the same status for every way a response can
    /// go wrong. On a direct connection the request is framed and the response read here,
    /// without tonic's generic unary path (its encoding body, its `Streaming` decoder): a
    /// memoize hit costs the client 49,299 instructions instead of 58,292 (BENCHMARKS.md, "Get
    /// without tonic's unary path"). At the first sign of a response of any shape but the
    /// usual one (one DATA frame holding one message, then an OK status), tonic's own decoder
    /// takes over, so what it makes of it is tonic's. Through a `Channel`, the stub.
    pub(crate) async fn get(
        &self,
        request: pb::GetRequest,
        max_receive: usize,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        match &self.route {
            Route::Direct(direct) => {
                direct
                    .get(request, self.authorization.as_ref(), max_receive)
                    .await
            }
            Route::Channel(_) => {
                CacheMoneyClient::new(self.clone())
                    .max_decoding_message_size(max_receive)
                    .get(request)
                    .await
            }
        }
    }
}

impl Direct {
    /// [`Transport::get`] on this connection.
    async fn get(
        &self,
        message: pb::GetRequest,
        authorization: Option<&HeaderValue>,
        max_receive: usize,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.get_uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(authorization) = authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let frame = codec::frame(&message)?;

        let Live {
            mut sender, driver, ..
        } = self.ready().await?;
        // From here on the request may reach the server: whatever happens, it is not sent again.
        let (response, mut stream) = sender
            .send_request(request, false)
            .map_err(|err| self.status(err))?;
        if let Err(err) = stream.send_data(frame, true) {
            // As `send_body`: a stream that would not take it says no more than the response.
            if !(err.is_reset() || err.is_go_away() || err.is_io()) {
                return Err(status_of(err, &self.url));
            }
        }
        let answer = async {
            let response = response.await.map_err(|err| self.status(err))?;
            unary_response(response, max_receive, &self.url).await
        };
        // The wait for the reply, polled for where it pays (`ClientOptions::busy_poll`): from
        // the thread whose current-thread runtime drives the connection.
        if !self.busy_poll.is_on() || driver != busy_poll::thread_number() {
            return answer.await;
        }
        let _in_flight = InFlight::count(&self.gets_in_flight);
        self.busy_poll
            .run(Instant::now(), || self.gets_in_flight.load(Relaxed), answer)
            .await
    }
}

/// One Get in flight on a connection, counted in its `gets_in_flight` until dropped.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn count(gets_in_flight: &'a AtomicU64) -> Self {
        gets_in_flight.fetch_add(1, Relaxed);
        InFlight(gets_in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A unary response read whole: its message when it has the usual shape, else whatever
/// tonic's own decoder makes of the same frames.
async fn unary_response<M: Message + Default + Send + 'static>(
    response: Response<RecvStream>,
    max_receive: usize,
    url: &Arc<str>,
) -> Result<tonic::Response<M>, Status> {
    let (mut parts, recv) = response.into_parts();
    // As tonic's `Grpc::create_response`: an encoding the client did not offer, then a
    // status in the headers (a trailers-only response).
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        let named = match std::str::from_utf8(encoding.as_bytes()) {
            Ok(named) => named.to_owned(),
            Err(_) => format!("{:?}", encoding.as_bytes()),
        };
        let mut status = Status::unimplemented(format!(
            "Content is compressed with `{named}` which isn't supported"
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            tonic::metadata::MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    // An OK there means no trailers will follow: tonic then reads the body without them.
    let trailers_only = match Status::from_header_map(&parts.headers) {
        Some(status) if status.code() != Code::Ok => return Err(status),
        Some(_) => true,
        None => false,
    };
    let mut body = ResponseBody::new(recv, Arc::clone(url));
    // What was read before the response turned out unusual, for tonic's decoder to read again.
    let mut read = VecDeque::new();
    if !trailers_only && parts.status == http::StatusCode::OK {
        // The usual shape: one DATA frame holding one whole message, then trailers with an OK
        // status. At the first sign of anything else, tonic's decoder takes over, from the
        // frames already read and then the live stream, so it stops where it would have.
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if is_one_message(&data, max_receive) => {
                    // Decoded at once, as tonic does: a message that is not one fails now,
                    // whatever follows (or does not).
                    let message = M::decode(data.slice(FRAME_HEADER..)).map_err(|err| {
                        with_headers(Status::internal(err.to_string()), &parts.headers)
                    })?;
                    match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                        Some(Ok(frame)) if frame.trailers_ref().is_some_and(is_ok) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                parts.headers.extend(trailers);
                            }
                            return Ok(tonic::Response::from_parts(
                                MetadataMap::from_headers(parts.headers),
                                message,
                                parts.extensions,
                            ));
                        }
                        next => {
                            read.push_back(Ok(Frame::data(data)));
                            read.extend(next);
                        }
                    }
                }
                Ok(data) => read.push_back(Ok(Frame::data(data))),
                Err(frame) => read.push_back(Ok(frame)),
            },
            first => read.extend(first),
        }
    }
    // Any other shape: tonic's decoder, as its unary call reads a response.
    let status = parts.status;
    let body = Replay { read, rest: body };
    let mut codec = Codec::<pb::GetRequest, M>::default();
    let decoder = tonic::codec::Codec::decoder(&mut codec);
    let mut streaming = if trailers_only {
        tonic::Streaming::new_empty(decoder, body)
    } else {
        tonic::Streaming::new_response(decoder, body, status, None, Some(max_receive))
    };
    let message = streaming
        .message()
        .await
        .map_err(|status| with_headers(status, &parts.headers))?
        .ok_or_else(|| Status::internal("Missing response message."))?;
    if let Some(trailers) = streaming.trailers().await? {
        parts.headers.extend(trailers.into_headers());
    }
    Ok(tonic::Response::from_parts(
        MetadataMap::from_headers(parts.headers),
        message,
        parts.extensions,
    ))
}

/// Whether `data` is one whole uncompressed message within `max_receive` bytes.
fn is_one_message(data: &Bytes, max_receive: usize) -> bool {
    // `frame_header` answers only with the header all there: the subtraction cannot wrap,
    // where adding the peer's length to it could on a 32-bit target.
    matches!(codec::frame_header(data),
        Some((0, len)) if len == data.len() - FRAME_HEADER && len <= max_receive)
}

/// Whether `trailers` carry an OK status, as tonic reads it.
fn is_ok(trailers: &http::HeaderMap) -> bool {
    Status::from_header_map(trailers).is_some_and(|status| status.code() == Code::Ok)
}

/// `status` with the response's headers added to its metadata, as tonic's unary call adds them
/// to a failure to read the message.
fn with_headers(mut status: Status, headers: &http::HeaderMap) -> Status {
    let mut merged = std::mem::take(status.metadata_mut()).into_headers();
    merged.extend(headers.clone());
    *status.metadata_mut() = MetadataMap::from_headers(merged);
    status
}

/// A response body for tonic's decoder: the frames already read (or the error that ended
/// them), then the rest of the stream.
struct Replay {
    read: VecDeque<Result<Frame<Bytes>, Status>>,
    rest: ResponseBody,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_tonic_writes_them() {
        let timeout = |text: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(text).unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("250000u"), Some(Duration::from_micros(250_000)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for unreadable in ["", "m", "100", "100x", "123456789m", "-1m", "1.5S"] {
            assert_eq!(timeout(unreadable), None, "{unreadable:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    /// The usual response is recognised as such (so a hit takes the fast path), and each
    /// near miss of it is not: those go to tonic's decoder.
    #[test]
    fn only_the_usual_shape_is_read_here() {
        use bytes::{BufMut, BytesMut};
        let framed = |flag: u8, len: u32, payload: &[u8]| {
            let mut frame = BytesMut::new();
            frame.put_u8(flag);
            frame.put_u32(len);
            frame.put_slice(payload);
            frame.freeze()
        };
        let message = [8, 1, 18, 1, b'v'];
        assert!(is_one_message(&framed(0, 5, &message), 5));
        assert!(is_one_message(&framed(0, 0, &[]), 5), "an empty message");
        assert!(
            !is_one_message(&framed(0, 5, &message), 4),
            "over the limit"
        );
        assert!(!is_one_message(&framed(1, 5, &message), 5), "compressed");
        assert!(!is_one_message(&framed(0, 6, &message), 5), "cut short");
        assert!(!is_one_message(&framed(0, 4, &message), 5), "more than one");
        assert!(
            !is_one_message(&Bytes::from_static(&[0, 0, 0]), 5),
            "half a header"
        );

        let trailers = |pairs: &[(&'static str, &'static str)]| {
            pairs
                .iter()
                .map(|(name, value)| {
                    (
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    )
                })
                .collect::<http::HeaderMap>()
        };
        assert!(is_ok(&trailers(&[("grpc-status", "0")])));
        assert!(!is_ok(&trailers(&[("grpc-status", "13")])));
        assert!(!is_ok(&trailers(&[])));
        assert!(
            !is_ok(&trailers(&[("grpc-status", "0"), ("grpc-message", "%FF")])),
            "a message tonic cannot decode makes the status UNKNOWN"
        );
    }
}
