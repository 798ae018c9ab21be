//! How the client reaches the service: its own HTTP/2 connection over `h2`, or a tonic
//! [`Channel`] the caller configured.
//!
//! [`Client::connect`](crate::Client::connect) uses [`Connection`]: one HTTP/2 connection per
//! client, shared by every clone, opened on first use and again after it breaks. It exists for
//! speed. Through tonic's `Channel`, every call passed a buffer task and hyper's dispatcher,
//! and the request's HEADERS and DATA frames left in two writes; on loopback the server often
//! woke for each, which cost a single caller ~40 µs a Get (BENCHMARKS.md). Here the caller
//! queues both frames before the connection task runs, so they leave in one write, and no
//! other task sits between the caller and the connection.
//!
//! `https://` URLs, load balancing and other transport features stay with tonic: build a
//! `Channel` and use [`Client::from_channel`](crate::Client::from_channel).

use std::{
    fmt,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::{
    Request, Response, Uri,
    uri::{Authority, Scheme},
};
use http_body::{Body as _, Frame};
use tonic::{Status, body::Body, transport::Channel};
use tracing::debug;

use crate::lock;

/// The service behind [`RawClient`](crate::RawClient): calls go over the client's own
/// HTTP/2 [`Connection`], or over a tonic [`Channel`] given to
/// [`Client::from_channel`](crate::Client::from_channel).
#[derive(Clone, Debug)]
pub enum Transport {
    /// The client's own connection, from [`Client::connect`](crate::Client::connect).
    Connection(Connection),
    /// A tonic channel the caller built (TLS, load balancing, proxies).
    Channel(Channel),
}

/// The per-stream and per-connection HTTP/2 receive windows: room for the largest value the
/// server accepts by default without waiting for a WINDOW_UPDATE (hyper's defaults).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// One HTTP/2 connection to a cache-money server, shared by clones.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    /// The `host[:port]` every request carries as `:authority` (its `:scheme` is `http`).
    authority: Authority,
    connect_timeout: Duration,
    /// The open connection's request handle and its generation, `None` before the first call
    /// and after the connection ends.
    current: Mutex<Option<Opened>>,
    /// Held while waiting for a connection, so callers that find none open one, not one
    /// each.
    connecting: tokio::sync::Mutex<Connecting>,
}

/// The connection attempt under way, if any, and the generation of the latest attempt.
#[derive(Default)]
struct Connecting {
    generation: u64,
    /// A spawned attempt: it finishes, and stores its connection, even when every caller
    /// that waited for it gave up first (a 100 ms `memoize` deadline on a link whose
    /// handshake takes longer must not cancel connecting forever).
    attempt: Option<tokio::task::JoinHandle<Result<Opened, Status>>>,
}

/// A connection's generation and its request handle.
type Opened = (u64, SendRequest<Bytes>);

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("authority", &self.shared.authority)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection to `uri` (`http://host:port`; the port defaults to 80), opened by the
    /// first call, not here.
    ///
    /// # Errors
    /// A message for a person when the URI is not `http://host[:port]`.
    pub fn lazy(uri: &Uri, connect_timeout: Duration) -> Result<Self, String> {
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err("the URL must start with http:// (for https://, build a tonic Channel with your TLS settings and use Client::from_channel)".into());
        }
        let authority = uri
            .authority()
            .ok_or("the URL needs a host, as in http://127.0.0.1:50051")?
            .clone();
        Ok(Connection {
            shared: Arc::new(Shared {
                authority,
                connect_timeout,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(Connecting::default()),
            }),
        })
    }

    fn current(&self) -> Option<Opened> {
        lock(&self.shared.current).clone()
    }

    /// Forgets connection `generation` once it has failed, unless a newer one replaced it.
    fn forget(&self, generation: u64) {
        let mut current = lock(&self.shared.current);
        if current
            .as_ref()
            .is_some_and(|(open, _)| *open == generation)
        {
            *current = None;
        }
    }

    /// A request handle ready for a new stream, with its connection's generation: the open
    /// connection's, or a new connection's when there is none or it has ended.
    async fn ready(&self) -> Result<Opened, Status> {
        if let Some((generation, sender)) = self.current() {
            match sender.ready().await {
                Ok(sender) => return Ok((generation, sender)),
                // It ended (server gone, GOAWAY): nothing was sent, so open another.
                Err(err) => {
                    debug!(cause = %err, "connection to cache-money ended; reconnecting");
                    self.forget(generation);
                }
            }
        }
        let mut connecting = self.shared.connecting.lock().await;
        // Someone else may have connected while this caller waited.
        if let Some((generation, sender)) = self.current() {
            let sender = sender.ready().await.map_err(|err| self.status(err))?;
            return Ok((generation, sender));
        }
        if connecting.attempt.is_none() {
            connecting.generation += 1;
            let (this, generation) = (self.clone(), connecting.generation);
            connecting.attempt = Some(tokio::spawn(async move {
                let timeout = this.shared.connect_timeout;
                let sender = tokio::time::timeout(timeout, this.open(generation))
                    .await
                    .map_err(|_| {
                        Status::unavailable(format!(
                            "cannot connect to {}: no HTTP/2 answer within {} ms",
                            this.shared.authority,
                            timeout.as_millis()
                        ))
                    })??;
                *lock(&this.shared.current) = Some((generation, sender.clone()));
                Ok((generation, sender))
            }));
        }
        // Awaited in place: if this caller gives up, the next one waits for the same attempt.
        let attempt = connecting
            .attempt
            .as_mut()
            .expect("an attempt was just ensured");
        let outcome = attempt.await;
        connecting.attempt = None;
        let (generation, sender) = outcome.map_err(|err| {
            Status::internal(format!("connecting to the service failed: {err}"))
        })??;
        let sender = sender.ready().await.map_err(|err| self.status(err))?;
        Ok((generation, sender))
    }

    /// Opens connection `generation`: TCP, the HTTP/2 handshake, and a PING answered, so a
    /// peer that accepts but does not speak HTTP/2 fails here, within the connect timeout. A
    /// task drives the connection and forgets it when it ends.
    async fn open(&self, generation: u64) -> Result<SendRequest<Bytes>, Status> {
        let authority = &self.shared.authority;
        let refused = |err: std::io::Error| {
            Status::unavailable(format!("cannot connect to {authority}: {err}"))
        };
        // `[::1]` in a URL is `::1` to the resolver.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(refused)?;
        tcp.set_nodelay(true).map_err(refused)?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|err| self.status(err))?;
        let mut ping_pong = connection.ping_pong();
        let this = self.clone();
        let driver = AbortOnDrop(Some(tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(cause = %err, "connection to cache-money failed");
            }
            this.forget(generation);
        })));
        if let Some(ping_pong) = ping_pong.as_mut() {
            ping_pong
                .ping(h2::Ping::opaque())
                .await
                .map_err(|err| self.status(err))?;
        }
        driver.keep();
        Ok(sender)
    }

    /// The status of a failed call: UNAVAILABLE when the connection itself failed (the
    /// server went away, or said GOAWAY), otherwise tonic's mapping of the stream's error.
    fn status(&self, err: h2::Error) -> Status {
        if connection_ended(&err) {
            Status::unavailable(format!(
                "connection to {} failed: {err}",
                self.shared.authority
            ))
        } else {
            Status::from(err)
        }
    }

    /// One call: the request's headers and its whole body are queued together, so they leave
    /// in one write. A call whose connection turns out to have ended is sent once more on a
    /// new connection: every RPC of `cache_money.v1` is idempotent, and without this the
    /// first call after a server restart would fail only because it was first to notice.
    async fn call(self, request: Request<Body>) -> Result<Response<Body>, Status> {
        let (parts, mut body) = request.into_parts();
        // A unary request's body is one encoded message, ready at once: sent as it is, or
        // joined when the encoder produced several frames.
        let mut message = Bytes::new();
        let mut joined: Option<BytesMut> = None;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            match joined.as_mut() {
                None if message.is_empty() => message = data,
                None => {
                    let mut buffer = BytesMut::from(&message[..]);
                    buffer.extend_from_slice(&data);
                    joined = Some(buffer);
                }
                Some(buffer) => buffer.extend_from_slice(&data),
            }
        }
        if let Some(buffer) = joined {
            message = buffer.freeze();
        }
        let mut uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.shared.authority.clone());
        if let Some(path) = parts.uri.path_and_query() {
            uri = uri.path_and_query(path.clone());
        }
        let uri = uri
            .build()
            .map_err(|err| Status::internal(format!("cannot address the request: {err}")))?;
        let head = |uri: Uri| {
            let mut request = Request::new(());
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = parts.headers.clone();
            request
        };
        let (generation, sender) = self.ready().await?;
        match send(sender, head(uri.clone()), message.clone()).await {
            Err(err) if connection_ended(&err) => {
                debug!(cause = %err, "connection to cache-money ended under a call; sending it again");
                self.forget(generation);
                let (_, sender) = self.ready().await?;
                send(sender, head(uri), message)
                    .await
                    .map_err(|err| self.status(err))
            }
            sent => sent.map_err(|err| self.status(err)),
        }
    }
}

/// Whether an error means the whole connection is gone (so the stream never got an answer),
/// rather than a reset of one stream.
fn connection_ended(err: &h2::Error) -> bool {
    err.is_io() || err.is_go_away() || err.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Queues the request's HEADERS and its DATA frame, then waits for the response's headers.
async fn send(
    mut sender: SendRequest<Bytes>,
    request: Request<()>,
    message: Bytes,
) -> Result<Response<Body>, h2::Error> {
    let (response, mut stream) = sender.send_request(request, message.is_empty())?;
    if !message.is_empty() {
        stream.send_data(message, true)?;
    }
    let response = response.await?;
    Ok(response.map(|stream| {
        Body::new(ResponseBody {
            stream,
            data_done: false,
        })
    }))
}

/// Aborts a spawned task when dropped, unless [`AbortOnDrop::keep`] released it: a connection
/// whose set-up timed out must not live on.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Lets the task run on by itself.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A response's body as tonic reads it: the DATA frames, then the trailers that carry the
/// gRPC status. Received data is released from flow control as it is handed on.
struct ResponseBody {
    stream: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(Status::from(err)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(Status::from(err)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data_done && self.stream.is_end_stream()
    }
}

impl tower_service::Service<Request<Body>> for Transport {
    type Response = Response<Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            // Readiness is awaited inside the call, where a broken connection is replaced.
            Transport::Connection(_) => Poll::Ready(Ok(())),
            Transport::Channel(channel) => channel.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self {
            Transport::Connection(connection) => {
                let connection = connection.clone();
                Box::pin(async move { connection.call(request).await.map_err(Into::into) })
            }
            Transport::Channel(channel) => {
                let call = channel.call(request);
                Box::pin(async move { Ok(call.await?) })
            }
        }
    }
}
