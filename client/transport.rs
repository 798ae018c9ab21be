//! How calls reach the service: [`Transport`], the service the generated stub
//! ([`RawClient`](crate::RawClient)) sends its requests through.
//!
//! A client of one `http://` URL ([`Client::connect`](crate::Client::connect)) speaks HTTP/2
//! through the `h2` crate directly: each call opens its stream and writes its request from the
//! caller's own task, and one task per connection reads and writes the socket. tonic's
//! `Channel` puts two more tasks between a call and the socket (a tower `Buffer` worker, then
//! hyper's client, which spawns a task per request to pipe its body) and costs about twice
//! the instructions per call (68,000 against 35,000 at one caller: BENCHMARKS.md, "The
//! client's transport"). Everything else goes through tonic's `Channel`: `https://` (its
//! TLS), several replicas (its balancer) and channels a caller made
//! ([`Client::from_channel`](crate::Client::from_channel)).
//!
//! The direct connection keeps the `Channel`'s guarantees:
//! - it connects lazily, one attempt at a time shared by every caller waiting, bounded by
//!   [`ClientOptions::connect_timeout`], and carried on by its own task when the callers
//!   that started it stop waiting (their deadlines are shorter than a slow handshake);
//! - it PINGs every [`ClientOptions::keepalive_interval`], also while idle, and closes a
//!   connection whose PING goes unanswered for [`ClientOptions::keepalive_timeout`]: the
//!   calls on it fail `UNAVAILABLE` and the next call opens a new one;
//! - no call is ever sent twice. A call goes to a new connection only when the old one
//!   refused to open its stream (closed, or told to go away), so nothing of it was sent.

use std::{
    fmt,
    future::{Future, poll_fn},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{
    Ping, Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{
    HeaderValue, Request, Response, Uri,
    header::{AUTHORIZATION, USER_AGENT},
    uri::{Authority, Scheme},
};
use http_body::{Body as _, Frame};
use tokio::{net::TcpStream, sync::watch};
use tonic::{Code, Status, body::Body, codegen::StdError, transport::Channel};

use crate::{ClientOptions, connect::Target, lock};

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
            route: Route::Direct(Arc::new(Direct::new(target, options))),
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

/// Sent with every direct call, as gRPC asks of clients.
const USER_AGENT_VALUE: &str = concat!("cache-money-rust/", env!("CARGO_PKG_VERSION"));

/// hyper's HTTP/2 client settings, which tonic's `Channel` uses: a 2 MiB stream window and a
/// 5 MiB connection window (a large `GetMany` answer is not held up by window updates), 16 KiB
/// frames and header lists, at most 1 MiB buffered per stream before it stops asking for room.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
const MAX_FRAME: u32 = 16 << 10;
const MAX_HEADER_LIST: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 1 << 20;

/// One `http://` service's connection: the live one if any, and the attempt under way.
struct Direct {
    url: Arc<str>,
    host: String,
    port: u16,
    authority: Authority,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The open connection, and which one it is (connections are numbered from 1).
    live: Option<(SendRequest<Bytes>, u64)>,
    /// The attempt under way: its outcome, once known, for every caller waiting on it.
    opening: Option<watch::Receiver<Option<Result<(), Status>>>>,
    /// The number of the last connection opened.
    opened: u64,
}

impl Direct {
    fn new(target: &Target, options: &ClientOptions) -> Self {
        let (host, port) = target.host_port();
        Direct {
            url: target.url().into(),
            authority: target.authority(),
            host,
            port,
            connect_timeout: options.connect_timeout,
            keepalive_interval: options.keepalive_interval,
            keepalive_timeout: options.keepalive_timeout,
            state: Mutex::new(State::default()),
        }
    }

    /// One call: opens its stream, writes its request, and returns the response's head with
    /// its body still to come.
    async fn call(self: Arc<Self>, request: Request<Body>) -> Result<Response<Body>, Status> {
        let (mut head, body) = request.into_parts();
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = Uri::from_parts(uri)
            .map_err(|err| Status::internal(format!("request to {}: {err}", self.url)))?;
        head.headers
            .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        let request = Request::from_parts(head, ());

        let mut sender = self.ready().await?;
        // From here on the request may reach the server: whatever happens, it is not sent again.
        let (response, stream) = sender
            .send_request(request, false)
            .map_err(|err| self.status(&err))?;
        send_body(body, stream, &self.url).await?;
        let response = response.await.map_err(|err| self.status(&err))?;
        let url = Arc::clone(&self.url);
        Ok(response.map(|recv| Body::new(ResponseBody::new(recv, url))))
    }

    /// A connection ready for a new stream. A connection that refuses one (closed, or the
    /// server said GOAWAY) has sent nothing of this call, so the call is made on a new
    /// connection, once.
    async fn ready(self: &Arc<Self>) -> Result<SendRequest<Bytes>, Status> {
        let mut refused = None;
        for _ in 0..2 {
            let (sender, number) = self.connection().await?;
            match sender.ready().await {
                Ok(sender) => return Ok(sender),
                Err(err) => {
                    self.forget(number);
                    refused = Some(err);
                }
            }
        }
        let err = refused.expect("the loop ran");
        Err(self.status(&err))
    }

    /// The live connection, or the outcome of opening one (an attempt already under way is
    /// joined, not repeated).
    async fn connection(self: &Arc<Self>) -> Result<(SendRequest<Bytes>, u64), Status> {
        let mut outcome = {
            let mut state = lock(&self.state);
            if let Some((sender, number)) = &state.live {
                return Ok((sender.clone(), *number));
            }
            match &state.opening {
                Some(outcome) => outcome.clone(),
                None => {
                    let (done, outcome) = watch::channel(None);
                    state.opening = Some(outcome.clone());
                    // Its own task: the attempt carries on when the callers stop waiting.
                    tokio::spawn(Arc::clone(self).open(done));
                    outcome
                }
            }
        };
        let waited = outcome
            .wait_for(Option::is_some)
            .await
            .map(|opened| opened.clone().expect("waited for an outcome"));
        let opened = match waited {
            Ok(opened) => opened,
            Err(_) => {
                // The attempt's task ended without an outcome: its runtime shut down. The next
                // call starts another (on its own runtime).
                let mut state = lock(&self.state);
                if (state.opening.as_ref())
                    .is_some_and(|under_way| under_way.same_channel(&outcome))
                {
                    state.opening = None;
                }
                return Err(Status::unavailable(format!(
                    "connecting to {}: the attempt's runtime shut down",
                    self.url
                )));
            }
        };
        opened?;
        let state = lock(&self.state);
        match &state.live {
            Some((sender, number)) => Ok((sender.clone(), *number)),
            None => Err(Status::unavailable(format!(
                "the connection to {} closed as soon as it opened",
                self.url
            ))),
        }
    }

    /// Opens a connection and tells the callers waiting on it how that went.
    async fn open(self: Arc<Self>, done: watch::Sender<Option<Result<(), Status>>>) {
        let outcome = match tokio::time::timeout(self.connect_timeout, self.handshake()).await {
            Ok(Ok((sender, connection))) => {
                let mut state = lock(&self.state);
                state.opened += 1;
                let number = state.opened;
                state.live = Some((sender, number));
                state.opening = None;
                drop(state);
                tokio::spawn(drive(connection, Arc::downgrade(&self), number));
                Ok(())
            }
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable(format!(
                "connecting to {}: no connection within {} ms (ClientOptions::connect_timeout)",
                self.url,
                self.connect_timeout.as_millis()
            ))),
        };
        if outcome.is_err() {
            lock(&self.state).opening = None;
        }
        let _ = done.send(Some(outcome));
    }

    /// TCP (`TCP_NODELAY`: every call is a small request waiting for a small answer), then
    /// HTTP/2's preface and settings.
    async fn handshake(
        &self,
    ) -> Result<(SendRequest<Bytes>, Connection<TcpStream, Bytes>), Status> {
        let unreachable = |err: &dyn fmt::Display| {
            Status::unavailable(format!("cannot connect to {}: {err}", self.url))
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| unreachable(&err))?;
        tcp.set_nodelay(true).map_err(|err| unreachable(&err))?;
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake(tcp)
            .await
            .map_err(|err| unreachable(&err))
    }

    /// Drops connection `number` if it is still the live one: the next call opens another.
    fn forget(&self, number: u64) {
        let mut state = lock(&self.state);
        if state.live.as_ref().is_some_and(|(_, live)| *live == number) {
            state.live = None;
        }
    }

    fn status(&self, err: &h2::Error) -> Status {
        status_of(err, &self.url)
    }
}

/// Serves connection `number` until it closes, PINGing it every keepalive interval and
/// closing it when a PING goes unanswered for the keepalive timeout, or when the client is
/// gone. Then makes sure the next call opens a new one.
async fn drive(mut connection: Connection<TcpStream, Bytes>, owner: Weak<Direct>, number: u64) {
    let Some((interval, timeout)) = owner
        .upgrade()
        .map(|direct| (direct.keepalive_interval, direct.keepalive_timeout))
    else {
        return;
    };
    let mut pings = connection.ping_pong().expect("taken once, here");
    loop {
        tokio::select! {
            _ = &mut connection => break,
            () = tokio::time::sleep(interval) => {}
        }
        if owner.strong_count() == 0 || pings.send_ping(Ping::opaque()).is_err() {
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
/// its own.
async fn send_body(
    body: Body,
    mut stream: SendStream<Bytes>,
    url: &Arc<str>,
) -> Result<(), Status> {
    let mut pump = Pump {
        body,
        held: None,
        url: Arc::clone(url),
    };
    let first = poll_fn(|cx| Poll::Ready(pump.poll(&mut stream, cx))).await;
    match first {
        Poll::Ready(outcome) => outcome,
        Poll::Pending => {
            tokio::spawn(async move {
                let _ = poll_fn(|cx| pump.poll(&mut stream, cx)).await;
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
    url: Arc<str>,
}

impl Pump {
    fn poll(
        &mut self,
        stream: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Status>> {
        self.pump(stream, cx)
            .map_err(|err| err.unwrap_or_else(|err| status_of(&err, &self.url)))
    }

    /// As [`Pump::poll`], failing with the body's status or the stream's error.
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
                    return Poll::Ready(Some(Err(status_of(&err, &this.url))));
                }
                None => this.data_done = true,
            }
        }
        this.done = true;
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(status_of(&err, &this.url)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// An HTTP/2 failure as a gRPC status, as tonic maps them: a lost or closed connection, a
/// server going away or a refused stream is `UNAVAILABLE` (the call may be made again by its
/// caller); a cancelled stream `CANCELLED`; the rest `INTERNAL`.
fn status_of(err: &h2::Error, url: &str) -> Status {
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
    Status::new(code, format!("connection to {url}: {err}"))
}
