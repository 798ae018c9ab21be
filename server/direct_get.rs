//! Get, the hot RPC, decoded and answered without tonic's generic unary path.
//!
//! Every other RPC goes through the generated service as before. For a Get, tonic builds a
//! `Grpc` with its codec, a `Streaming` decoder over the request body, a response stream of
//! one message and an encoding body that frames it. Here the request's one message is read
//! from the body as it arrives (without a copy when it comes in one frame), handed to the same
//! [`CacheMoney::get`], and the answer goes out as one prebuilt frame followed by the
//! `grpc-status` trailers: 4.6 % fewer of the server's instructions per Get under h2load's
//! 4 × 13 streams, 3.4 % at one caller (BENCHMARKS.md, "Get without tonic's unary path").
//!
//! Nothing else changes: the layers around the service (auth, metrics, the message limit's
//! wording) see the same requests and responses, and each way a request can be malformed gets
//! the status tonic gives it (same code, same message), which `tests/direct_get.rs` checks
//! against tonic's own path. A compressed request (`grpc-encoding`, which cache-money does not
//! accept) is left to tonic, whose answer lists what is accepted.

use std::{
    convert::Infallible,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame};
use prost::Message;
use tonic::{
    Status,
    codegen::{BoxFuture, StdError},
    metadata::MetadataMap,
    server::NamedService,
};

use crate::{
    codec::{self, FRAME_HEADER, GET_PATH},
    pb::{self, cache_money_server::CacheMoney},
};

/// The generated service `inner`, with its Gets answered by `service` directly.
#[derive(Debug)]
pub(crate) struct DirectGet<S, T> {
    inner: S,
    service: Arc<T>,
    max_message_bytes: usize,
}

impl<S: Clone, T> Clone for DirectGet<S, T> {
    fn clone(&self) -> Self {
        DirectGet {
            inner: self.inner.clone(),
            service: self.service.clone(),
            max_message_bytes: self.max_message_bytes,
        }
    }
}

impl<S, T> DirectGet<S, T> {
    /// `inner` (the generated service over `service`), its Gets taken over; a request over
    /// `max_message_bytes` is refused as tonic refuses one over its decoding limit.
    pub(crate) fn new(inner: S, service: Arc<T>, max_message_bytes: usize) -> Self {
        DirectGet {
            inner,
            service,
            max_message_bytes,
        }
    }
}

impl<S: NamedService, T> NamedService for DirectGet<S, T> {
    const NAME: &'static str = S::NAME;
}

impl<S, T, B> tonic::codegen::Service<http::Request<B>> for DirectGet<S, T>
where
    S: tonic::codegen::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        >,
    T: CacheMoney,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != GET_PATH || request.headers().contains_key("grpc-encoding") {
            return self.inner.call(request);
        }
        let service = self.service.clone();
        let limit = self.max_message_bytes;
        Box::pin(async move { Ok(get(&*service, request, limit).await) })
    }
}

/// One Get: the request read, answered by `service`, the answer framed.
async fn get<T: CacheMoney, B>(
    service: &T,
    request: http::Request<B>,
    limit: usize,
) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    let (mut parts, body) = request.into_parts();
    let message = match read_one::<pb::GetRequest, B>(body, limit, &mut parts.headers).await {
        Ok(message) => message,
        Err(status) => return status.into_http(),
    };
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    match service.get(request).await {
        Ok(response) => respond(response),
        Err(status) => status.into_http(),
    }
}

/// The first message of a unary request's body, read to its end as tonic's decoder reads it:
/// any later message is decoded and dropped; trailers are appended to `headers` and end it
/// (whatever is left unread), as does a body the peer cancelled. Errors are tonic's, word for
/// word.
async fn read_one<M: Message + Default, B>(
    body: B,
    limit: usize,
    headers: &mut http::HeaderMap,
) -> Result<M, Status>
where
    B: Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    let mut body = pin!(body);
    let mut buffered = BytesMut::new();
    // Some(length) once a message's header is read and its bytes are awaited.
    let mut expecting = None;
    let mut message = None;
    loop {
        decode_ready(&mut buffered, &mut expecting, limit, &mut message)?;
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        match frame {
            None if buffered.is_empty() => break,
            None => return Err(Status::internal("Unexpected EOF decoding stream.")),
            Some(Err(err)) => {
                let status = Status::from_error(err.into());
                // tonic ends a cancelled request's stream there, without looking at what
                // is left of a message.
                if status.code() == tonic::Code::Cancelled {
                    break;
                }
                return Err(status);
            }
            Some(Ok(frame)) => match frame.into_data() {
                // The usual case: whole messages in the frame, taken from it without a copy;
                // only what is left of a message waits in `buffered`.
                Ok(mut data) if buffered.is_empty() => {
                    decode_ready(&mut data, &mut expecting, limit, &mut message)?;
                    buffered.extend_from_slice(&data);
                }
                Ok(data) => buffered.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        headers.extend(trailers);
                    }
                    break;
                }
            },
        }
    }
    message.ok_or_else(|| Status::internal("Missing request message."))
}

/// Decodes each whole message `buffered` holds, keeping the first in `first` (later ones are
/// dropped), and leaves what is left of the next in `buffered`.
fn decode_ready<M: Message + Default>(
    buffered: &mut impl Buf,
    expecting: &mut Option<usize>,
    limit: usize,
    first: &mut Option<M>,
) -> Result<(), Status> {
    while let Some(bytes) = next_message(buffered, expecting, limit)? {
        let decoded = M::decode(bytes).map_err(|err| Status::internal(err.to_string()))?;
        first.get_or_insert(decoded);
    }
    Ok(())
}

/// The next whole message in `buffered`, if it holds one, its header consumed as soon as it
/// is there (so a message's bytes are awaited with the header already checked, as tonic's
/// decoder does). `expecting` carries a read header's length between calls.
fn next_message(
    buffered: &mut impl Buf,
    expecting: &mut Option<usize>,
    limit: usize,
) -> Result<Option<Bytes>, Status> {
    let len = match *expecting {
        Some(len) => len,
        None => {
            // Both buffers read here (a frame's `Bytes`, the `BytesMut` of a message in
            // pieces) are contiguous: the chunk is all of it.
            let Some((flag, len)) = codec::frame_header(buffered.chunk()) else {
                return Ok(None);
            };
            match flag {
                0 => {}
                1 => {
                    return Err(Status::internal(
                        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                    ));
                }
                flag => {
                    return Err(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: {flag} (valid flags are 0 and 1), while sending request"
                    )));
                }
            }
            if len > limit {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {len} bytes, the limit is: {limit} bytes"
                )));
            }
            buffered.advance(FRAME_HEADER);
            len
        }
    };
    if buffered.remaining() < len {
        *expecting = Some(len);
        return Ok(None);
    }
    *expecting = None;
    Ok(Some(buffered.copy_to_bytes(len)))
}

/// `response` as tonic would send it: its metadata as headers, the message in one frame, then
/// `grpc-status: 0` as trailers.
fn respond<M: Message>(response: tonic::Response<M>) -> http::Response<tonic::body::Body> {
    let (metadata, message, extensions) = response.into_parts();
    // A message over 4 GB is unreachable under the message limits; tonic refuses it with the
    // same status, though in trailers after a 200 head (it finds out while streaming the body).
    let frame = match codec::frame(&message) {
        Ok(frame) => frame,
        Err(status) => return status.into_http(),
    };
    let mut http = http::Response::new(tonic::body::Body::new(OneMessage {
        frame: Some(frame),
        done: false,
    }));
    *http.version_mut() = http::Version::HTTP_2;
    let mut headers = metadata.into_headers();
    // What tonic leaves out of a response's metadata: gRPC's own headers.
    for reserved in RESERVED {
        headers.remove(reserved);
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    *http.headers_mut() = headers;
    *http.extensions_mut() = extensions;
    http
}

/// The headers tonic removes from a response's metadata (`MetadataMap::GRPC_RESERVED_HEADERS`).
const RESERVED: [&str; 5] = [
    "te",
    "content-type",
    "grpc-message",
    "grpc-message-type",
    "grpc-status",
];

/// A successful unary response's body: one framed message, then the OK status as trailers.
struct OneMessage {
    frame: Option<Bytes>,
    done: bool,
}

impl Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.frame.take() {
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use tonic::codegen::Service;

    use super::*;
    use crate::server::{
        config::InvalidationMode,
        metrics::Metrics,
        service::{CacheService, Limits},
        store::MemoryStore,
        watch::{Hub, WatchSettings},
    };

    /// A `DirectGet` over a real in-memory cache service, whose inner service only counts the
    /// requests that reach it.
    fn direct_get(
        reached: Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
    > {
        let metrics = Metrics::disabled();
        let settings = WatchSettings {
            heartbeat: Duration::from_secs(1),
            buffer: 16,
            mode: InvalidationMode::Off,
        };
        let limits = Limits {
            max_ttl_seconds: 60,
            max_value_bytes: 1024,
            max_batch: 10,
            max_response_bytes: 1 << 20,
            max_tags: 4,
            max_tag_bytes: 64,
            max_lease: Duration::from_secs(1),
        };
        let service = CacheService::new(
            MemoryStore::new(1 << 20),
            limits,
            Arc::new(AtomicBool::new(true)),
            false,
            metrics.clone(),
            Hub::new(settings, metrics),
        );
        DirectGet::new(Counting(reached), Arc::new(service), 4096)
    }

    /// Stands in for the generated service: counts the requests it is given.
    #[derive(Clone)]
    struct Counting(Arc<AtomicUsize>);

    impl Service<http::Request<tonic::body::Body>> for Counting {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            self.0.fetch_add(1, SeqCst);
            Box::pin(async { Ok(Status::unknown("inner").into_http()) })
        }
    }

    fn request(path: &str, encoding: Option<&str>) -> http::Request<tonic::body::Body> {
        let message = pb::GetRequest {
            key: Some(pb::Key {
                namespace: "ns".into(),
                function: "f".into(),
                digest: "0".repeat(32),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let mut request = http::Request::post(path);
        if let Some(encoding) = encoding {
            request = request.header("grpc-encoding", encoding);
        }
        request
            .body(tonic::body::Body::new(Full::new(Bytes::from(framed))))
            .unwrap()
    }

    /// A plain Get is answered here, never reaching the generated service; a Get with an
    /// encoding, and any other RPC, go to it.
    #[tokio::test]
    async fn only_plain_gets_are_taken_over() {
        let reached = Arc::new(AtomicUsize::new(0));
        let mut service = direct_get(reached.clone());

        let response = service.call(request(GET_PATH, None)).await.unwrap();
        assert_eq!(reached.load(SeqCst), 0, "the Get reached the inner service");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let body = response.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        let framed = body.to_bytes();
        let reply = pb::GetResponse::decode(&framed[FRAME_HEADER..]).expect("a GetResponse");
        assert!(!reply.hit, "a miss in an empty store");
        assert_eq!(framed[0], 0);
        assert_eq!(
            u32::from_be_bytes(framed[1..FRAME_HEADER].try_into().unwrap()) as usize,
            framed.len() - FRAME_HEADER
        );

        service
            .call(request(GET_PATH, Some("identity")))
            .await
            .unwrap();
        assert_eq!(
            reached.load(SeqCst),
            1,
            "a Get with an encoding stayed here"
        );
        service
            .call(request("/cache_money.v1.CacheMoney/Put", None))
            .await
            .unwrap();
        assert_eq!(reached.load(SeqCst), 2, "a Put stayed here");
    }

    /// A response's metadata goes out as its headers, without gRPC's own names (as tonic
    /// sanitizes it), and with gRPC's content type.
    #[test]
    fn responses_carry_metadata_without_grpc_s_own_headers() {
        let mut response = tonic::Response::new(pb::GetResponse::default());
        for (name, value) in [
            ("x-kept", "yes"),
            ("grpc-status", "13"),
            ("grpc-message", "no"),
            ("grpc-message-type", "no"),
            ("te", "no"),
            ("content-type", "text/plain"),
        ] {
            response.metadata_mut().insert(name, value.parse().unwrap());
        }
        let http = respond(response);
        let headers = http.headers();
        assert_eq!(headers["x-kept"], "yes");
        assert_eq!(headers["content-type"], "application/grpc");
        for reserved in ["grpc-status", "grpc-message", "grpc-message-type", "te"] {
            assert!(!headers.contains_key(reserved), "{reserved} went out");
        }
    }
}
