//! `--only floor`: what any gRPC hop costs on this machine, to read cache-money's one-caller
//! figures against. Two stand-in servers, each a bare hyper HTTP/2 server on a thread of its
//! own with a current-thread runtime (as cache-money-server runs by default):
//!
//! - the **bare responder** answers every request with the same `GetResponse` (a hit of 64
//!   bytes) once it has read the request: the least one HTTP/2 request and response cost here;
//! - the **relay** answers after a `GET` of the 64-byte fixture over one plain TCP connection
//!   to Redis (the RESP exchange written out, no client library, no timer, no pool): the least
//!   a gRPC-to-Redis relay costs;
//! - the **bare tonic service** is cache-money's generated service on tonic's server with
//!   default settings, its `Get` answering the same hit at once (every other RPC
//!   unimplemented): what tonic's server path adds to the bare responder, before any of
//!   cache-money's own work.
//!
//! Neither is cache-money code. They bound from below what cache-money's server could reach
//! with any gRPC stack and any Redis client, so the distance from each to cache-money's
//! server is the part of a hit that cache-money's own choices decide.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

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

/// The fixture's key in Redis (cm_bench's fixtures set it to 64 bytes).
const FIXTURE: &[u8] = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n";

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
    socket: TcpStream,
    reply: Vec<u8>,
}

impl Relay {
    async fn connect(port: u16) -> Self {
        let socket = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the relay connects to Redis");
        socket.set_nodelay(true).expect("nodelay");
        Relay {
            socket,
            reply: Vec::with_capacity(256),
        }
    }

    /// `GET` of the fixture: the command written, then its bulk reply read whole.
    async fn get(&mut self) -> Bytes {
        self.socket
            .write_all(FIXTURE)
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
        .unwrap_or_else(|| panic!("the fixture is a string: {reply:?}"));
    let start = end + 2;
    (reply.len() >= start + length + 2)
        .then(|| Bytes::copy_from_slice(&reply[start..start + length]))
}
