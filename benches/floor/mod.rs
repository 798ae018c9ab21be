//! `--only floor`: what a gRPC hop costs on this machine when built from the cheapest parts at
//! hand, to read cache-money's one-caller figures against. Three stand-in servers, each on a
//! thread of its own with a current-thread runtime (as cache-money-server runs by default):
//!
//! - the **bare responder** answers every request with the same `GetResponse` (a hit of 64
//!   bytes) once it has read the request: the least one HTTP/2 request and response cost here;
//! - the **relay** is the bare responder answering after a `GET` of the 64-byte fixture over
//!   one plain TCP connection to Redis (the RESP exchange written out, no client library, no
//!   pool, no permit): the cheapest gRPC-to-Redis relay built here;
//! - the **bare tonic service** is cache-money's generated service on tonic's server with
//!   default settings, its `Get` answering the same hit at once (every other RPC
//!   unimplemented): what tonic's server path adds to the bare responder, before any of
//!   cache-money's own work.
//!
//! None of them does cache-money's work (the tonic one only shares its generated code). They
//! show what hyper, tonic and a Redis round trip cost on their own, so the distance from them
//! to cache-money's server is the part of a hit that cache-money's own choices decide.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Mutex,
};

use cache_money::pb::{self, cache_money_server::CacheMoney};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

/// `GET key:__rand_int__` in RESP: redis-benchmark's key, which cm_bench's fixtures set to 64
/// bytes.
const FIXTURE_GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n";

/// How long the relay waits for Redis before giving up on the run.
const REDIS_WAIT: Duration = Duration::from_secs(5);

/// Starts a stand-in server on a loopback port: the bare responder, or with `relay_to` (a
/// Redis port) the relay. It serves until the process ends.
pub fn start(relay_to: Option<u16>) -> SocketAddr {
    on_own_thread(move |listener| async move {
        let redis = match relay_to {
            Some(port) => Some(Arc::new(Mutex::new(Relay::connect(port).await))),
            None => None,
        };
        loop {
            let (socket, _) = listener.accept().await.expect("accept");
            socket.set_nodelay(true).expect("nodelay");
            let redis = redis.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, redis.clone()));
                // A connection ends when its client goes; nothing to report.
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}

/// Starts the bare tonic service on a loopback port; it serves until the process ends.
pub fn start_tonic() -> SocketAddr {
    on_own_thread(|listener| async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(pb::cache_money_server::CacheMoneyServer::new(BareService))
            .serve_with_incoming(incoming)
            .await
            .expect("the bare tonic service serves");
    })
}

/// Runs `serve` with a loopback listener on a thread of its own (a current-thread runtime),
/// returning the listener's address once it is bound.
fn on_own_thread<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (bound, address) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("floor".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the stand-in server");
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                bound
                    .send(listener.local_addr().expect("bound"))
                    .expect("send");
                serve(listener).await;
            });
        })
        .expect("spawn the stand-in server");
    address.recv().expect("the stand-in server is listening")
}

/// A hit of 64 bytes, read from Redis first when relaying.
async fn answer(
    request: Request<Incoming>,
    redis: Option<Arc<Mutex<Relay>>>,
) -> Result<Response<impl hyper::body::Body<Data = Bytes, Error = Infallible>>, Infallible> {
    // The whole request is read, as a gRPC server must before answering.
    let _ = request.into_body().collect().await;
    let value = match redis {
        Some(redis) => redis.lock().await.get().await,
        None => Bytes::from_static(&[b'x'; 64]),
    };
    let message = hit(value).encode_to_vec();
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(Bytes::from(framed)).with_trailers(async move { Some(Ok(trailers)) });
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .expect("a valid response"))
}

/// The answer every stand-in gives: a hit of `value`.
fn hit(value: Bytes) -> pb::GetResponse {
    pb::GetResponse {
        hit: true,
        value,
        ..Default::default()
    }
}

/// cache-money's service with a `Get` that does nothing but answer.
struct BareService;

/// The service: `Get` answers, every other RPC is unimplemented (not part of the
/// measurement). The whole impl comes from the macro so that `async_trait` sees every method.
macro_rules! bare_service {
    ($($rpc:ident($request:ident) -> $response:ident;)*) => {
        #[tonic::async_trait]
        impl CacheMoney for BareService {
            async fn get(
                &self,
                _: GrpcRequest<pb::GetRequest>,
            ) -> Result<GrpcResponse<pb::GetResponse>, Status> {
                Ok(GrpcResponse::new(hit(Bytes::from_static(&[b'x'; 64]))))
            }

            type WatchStream = std::pin::Pin<
                Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>,
            >;

            async fn watch(
                &self,
                _: GrpcRequest<pb::WatchRequest>,
            ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
                Err(Status::unimplemented("not part of the floor"))
            }

            $(
                async fn $rpc(
                    &self,
                    _: GrpcRequest<pb::$request>,
                ) -> Result<GrpcResponse<pb::$response>, Status> {
                    Err(Status::unimplemented("not part of the floor"))
                }
            )*
        }
    };
}

bare_service! {
    put(PutRequest) -> PutResponse;
    release(ReleaseRequest) -> ReleaseResponse;
    bust(BustRequest) -> BustResponse;
    bust_function(BustFunctionRequest) -> BustResponse;
    bust_namespace(BustNamespaceRequest) -> BustResponse;
    bust_all(BustAllRequest) -> BustResponse;
    bust_tag(BustTagRequest) -> BustResponse;
    get_many(GetManyRequest) -> GetManyResponse;
    put_many(PutManyRequest) -> PutManyResponse;
    keys(KeysRequest) -> KeysResponse;
    stats(StatsRequest) -> StatsResponse;
}

/// One plain connection to Redis, one command at a time.
struct Relay {
    port: u16,
    socket: TcpStream,
    reply: Vec<u8>,
    /// A command was written whose reply has not been read whole: its request was dropped
    /// mid-way (a client that went away), and the connection is out of step.
    in_flight: bool,
}

impl Relay {
    async fn connect(port: u16) -> Self {
        Relay {
            port,
            socket: Self::dial(port).await,
            reply: Vec::with_capacity(256),
            in_flight: false,
        }
    }

    async fn dial(port: u16) -> TcpStream {
        let socket = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the relay connects to Redis");
        socket.set_nodelay(true).expect("nodelay");
        socket
    }

    /// `GET` of the fixture: the command written, then its bulk reply read whole, within
    /// [`REDIS_WAIT`]. A connection left out of step by a dropped request is replaced first,
    /// so a reply is never taken for the next command's.
    async fn get(&mut self) -> Bytes {
        if self.in_flight {
            self.socket = Self::dial(self.port).await;
        }
        self.in_flight = true;
        let value = tokio::time::timeout(REDIS_WAIT, self.exchange())
            .await
            .unwrap_or_else(|_| panic!("Redis did not answer the relay within {REDIS_WAIT:?}"));
        self.in_flight = false;
        value
    }

    async fn exchange(&mut self) -> Bytes {
        self.socket
            .write_all(FIXTURE_GET)
            .await
            .expect("write to Redis");
        self.reply.clear();
        loop {
            if let Some(value) = bulk(&self.reply) {
                return value;
            }
            let read = self.socket.read_buf(&mut self.reply).await.expect("read");
            assert!(read > 0, "Redis closed the relay's connection");
        }
    }
}

/// The value of a complete bulk reply (`$<len>\r\n<bytes>\r\n`), or `None` while incomplete.
fn bulk(reply: &[u8]) -> Option<Bytes> {
    let end = reply.windows(2).position(|pair| pair == b"\r\n")?;
    let length: usize = std::str::from_utf8(&reply[..end])
        .ok()
        .and_then(|header| header.strip_prefix('$'))
        .and_then(|length| length.parse().ok())
        .unwrap_or_else(|| panic!("expected the fixture's value (a bulk string), got {reply:?}"));
    let start = end + 2;
    (reply.len() >= start + length + 2)
        .then(|| Bytes::copy_from_slice(&reply[start..start + length]))
}
