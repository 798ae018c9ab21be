//! The server answers Get without tonic's unary path (`server/direct_get.rs`); a request
//! carrying `grpc-encoding: identity` still takes tonic's. Each test here sends the same
//! bytes both ways over a plain HTTP/2 connection and requires the same answer — status code
//! and message (from the trailers, or the head of a trailers-only answer), the other response
//! headers, and the message bytes — so tonic is the reference for every malformed request a
//! peer can send, as well as for a good one.

mod common;

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use cache_money::pb;
use common::{CacheServer, framed, framed_with, key, put};
use http::{HeaderMap, HeaderValue, Request};
use prost::Message;
use tokio::net::TcpStream;
use tonic::Code;

const GET: &str = "/cache_money.v1.CacheMoney/Get";

/// What a raw gRPC call got back.
#[derive(Debug, PartialEq)]
struct Reply {
    code: Code,
    message: String,
    /// The response's headers but the status, its message and `date` (content-type and the
    /// like).
    headers: Vec<(String, String)>,
    /// The response's DATA, concatenated (the framed message).
    body: Bytes,
}

/// One call to `path` over a fresh HTTP/2 connection: `frames` sent as DATA frames in turn,
/// then `trailers` (if any) or the end of the stream, with `headers` besides gRPC's own
/// (`grpc-encoding: identity` sends a Get through tonic's path).
async fn call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    frames: &[Bytes],
    trailers: Option<HeaderMap>,
) -> Reply {
    // Bounded, so a call that hangs fails the test instead of stalling it.
    let within = std::time::Duration::from_secs(20);
    tokio::time::timeout(within, exchange(addr, path, headers, frames, trailers))
        .await
        .unwrap_or_else(|_| panic!("a call to {path} with {headers:?} hung"))
}

/// [`call`], unbounded.
async fn exchange(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    frames: &[Bytes],
    trailers: Option<HeaderMap>,
) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let end_with_data = trailers.is_none();
    let (response, mut send) = client
        .send_request(request.body(()).unwrap(), false)
        .expect("send the request");
    for (n, frame) in frames.iter().enumerate() {
        let last = end_with_data && n + 1 == frames.len();
        send.send_data(frame.clone(), last).expect("send DATA");
    }
    match trailers {
        Some(trailers) => send.send_trailers(trailers).expect("send trailers"),
        None if frames.is_empty() => send.send_data(Bytes::new(), true).expect("end"),
        None => {}
    }
    let response = response.await.expect("a response");
    let (parts, mut body) = response.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.put(chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    // A trailers-only response carries its status in the headers.
    let status_from = trailers.as_ref().unwrap_or(&parts.headers);
    let status = tonic::Status::from_header_map(status_from).expect("a grpc-status");
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(name, _)| !["grpc-status", "grpc-message", "date"].contains(&name.as_str()))
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    Reply {
        code: status.code(),
        message: status.message().to_owned(),
        headers,
        body: data.freeze(),
    }
}

/// A plain Get of entry `n`, encoded (not yet framed).
fn encoded_get(n: u64) -> Vec<u8> {
    common::get_request(key("ns", "f", n)).encode_to_vec()
}

const THROUGH_TONIC: (&str, &str) = ("grpc-encoding", "identity");

/// The same Get both ways: the answers must match; returns the direct path's.
async fn both_ways(server: &CacheServer, frames: &[Bytes], trailers: Option<HeaderMap>) -> Reply {
    let direct = call(server.addr(), GET, &[], frames, trailers.clone()).await;
    let tonic = call(server.addr(), GET, &[THROUGH_TONIC], frames, trailers).await;
    assert_eq!(direct, tonic, "the direct path answered unlike tonic's");
    direct
}

/// A server holding one 64-byte entry under key 1.
async fn server_with_entry(extra: &[&str]) -> CacheServer {
    let server = CacheServer::memory(extra);
    let mut client = server.client().await;
    client
        .put(put(key("ns", "f", 1), &[7; 64], 60))
        .await
        .expect("Put");
    server
}

/// A hit and a miss read the same, byte for byte, as tonic's answers, and are what the stub
/// decodes.
#[tokio::test]
async fn hits_and_misses_are_answered_as_tonic_answers_them() {
    let server = server_with_entry(&[]).await;
    let hit = both_ways(&server, &[framed(&encoded_get(1))], None).await;
    assert_eq!(hit.code, Code::Ok, "{hit:?}");
    assert!(
        hit.headers
            .contains(&("content-type".into(), "application/grpc".into())),
        "{hit:?}"
    );
    let reply = pb::GetResponse::decode(&hit.body[5..]).expect("a GetResponse");
    assert!(reply.hit);
    assert_eq!(reply.value, Bytes::from(vec![7; 64]));
    assert_eq!(hit.body.len(), 5 + reply.encoded_len());

    let miss = both_ways(&server, &[framed(&encoded_get(2))], None).await;
    assert_eq!(miss.code, Code::Ok);
    assert!(!pb::GetResponse::decode(&miss.body[5..]).unwrap().hit);
}

/// However the body is cut into DATA frames — the header split, one byte per frame — the
/// message is read whole.
#[tokio::test]
async fn a_request_in_pieces_is_read_whole() {
    let server = server_with_entry(&[]).await;
    let whole = framed(&encoded_get(1));
    for cuts in [vec![3], vec![5], vec![5, 9], (1..whole.len()).collect()] {
        let mut frames = Vec::new();
        let mut from = 0;
        for cut in cuts.iter().copied().chain([whole.len()]) {
            frames.push(whole.slice(from..cut));
            from = cut;
        }
        let reply = both_ways(&server, &frames, None).await;
        assert_eq!(reply.code, Code::Ok, "cut at {cuts:?}: {reply:?}");
        assert!(
            pb::GetResponse::decode(&reply.body[5..]).unwrap().hit,
            "cut at {cuts:?}"
        );
    }
}

/// A second message in a unary request is read and dropped: the first is answered, as tonic
/// does; a request's trailers are read too.
#[tokio::test]
async fn a_second_message_and_trailers_are_read_and_the_first_answered() {
    let server = server_with_entry(&[]).await;
    let two = [framed(&encoded_get(1)), framed(&encoded_get(2))];
    let reply = both_ways(&server, &two, None).await;
    assert!(pb::GetResponse::decode(&reply.body[5..]).unwrap().hit);

    let mut trailers = HeaderMap::new();
    trailers.insert("x-note", HeaderValue::from_static("trailing"));
    let reply = both_ways(&server, &[framed(&encoded_get(1))], Some(trailers)).await;
    assert_eq!(reply.code, Code::Ok, "{reply:?}");
    assert!(pb::GetResponse::decode(&reply.body[5..]).unwrap().hit);
}

/// Every malformed body gets tonic's status, code and words: none, cut short, compressed
/// without an encoding, a flag that is no flag, not protobuf, over the message limit (which
/// the server's own wording names), and a bad request inside a good frame.
#[tokio::test]
async fn malformed_requests_get_tonic_s_status() {
    let server =
        server_with_entry(&["--max-value-bytes", "1000", "--max-message-bytes", "6000"]).await;
    let message = encoded_get(1);
    let cases: [(&str, Vec<Bytes>, Code, &str); 7] = [
        (
            "no message",
            vec![],
            Code::Internal,
            "Missing request message.",
        ),
        (
            "a message cut short",
            vec![framed(&message).slice(..message.len())],
            Code::Internal,
            "Unexpected EOF decoding stream.",
        ),
        (
            "half a header",
            vec![Bytes::from_static(&[0, 0])],
            Code::Internal,
            "Unexpected EOF decoding stream.",
        ),
        (
            "the compressed flag",
            vec![framed_with(1, message.len() as u32, &message)],
            Code::Internal,
            "compressed-flag but no grpc-encoding",
        ),
        (
            "flag 7",
            vec![framed_with(7, message.len() as u32, &message)],
            Code::Internal,
            "invalid compression flag: 7",
        ),
        (
            "not protobuf",
            vec![framed(&[0xff; 9])],
            Code::Internal,
            "failed to decode Protobuf message",
        ),
        (
            "over the message limit",
            vec![framed_with(0, 7000, &[])],
            Code::OutOfRange,
            "larger than --max-message-bytes (6000 bytes)",
        ),
    ];
    for (what, frames, code, words) in cases {
        let reply = both_ways(&server, &frames, None).await;
        assert_eq!(reply.code, code, "{what}: {reply:?}");
        assert!(reply.message.contains(words), "{what}: {reply:?}");
        assert!(
            reply.body.is_empty(),
            "{what}: a body with an error: {reply:?}"
        );
    }
    // Shapes where what is left over decides nothing, as in tonic's decoder: a header whose
    // message never came ends as no message at all; after a whole message, a lone header, or
    // stray bytes before the trailers, are ignored.
    let reply = both_ways(&server, &[framed_with(0, 40, &[])], None).await;
    assert_eq!(
        (reply.code, reply.message.as_str()),
        (Code::Internal, "Missing request message.")
    );
    let whole = framed(&message);
    let lone_header = framed_with(0, 40, &[]);
    let reply = both_ways(&server, &[whole.clone(), lone_header], None).await;
    assert_eq!(reply.code, Code::Ok, "{reply:?}");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-note", HeaderValue::from_static("trailing"));
    let stray = Bytes::from_static(&[0, 0, 1]);
    let reply = both_ways(&server, &[whole, stray], Some(trailers)).await;
    assert_eq!(reply.code, Code::Ok, "{reply:?}");
    // Valid protobuf, invalid request: the service's own validation, on either path.
    let no_key = framed(&pb::GetRequest::default().encode_to_vec());
    let reply = both_ways(&server, &[no_key], None).await;
    assert_eq!(reply.code, Code::InvalidArgument, "{reply:?}");
}

/// With tokens, a Get on the direct path is checked as any other RPC: refused without a
/// token, answered with one.
#[tokio::test]
async fn the_direct_path_is_behind_authentication() {
    let tokens = r#"{"tokens": [{"name": "app", "token": "s3cret-s3cret-s3cret", "read": ["*"], "write": ["*"]}]}"#;
    let server = CacheServer::start_with_env(&[], &[("CACHE_MONEY_AUTH_TOKENS", tokens)]);
    let frames = [framed(&encoded_get(1))];
    let refused = call(server.addr(), GET, &[], &frames, None).await;
    assert_eq!(refused.code, Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        refused,
        call(server.addr(), GET, &[THROUGH_TONIC], &frames, None).await,
        "the direct path refused unlike tonic's"
    );
    let bearer = ("authorization", "Bearer s3cret-s3cret-s3cret");
    let answered = call(server.addr(), GET, &[bearer], &frames, None).await;
    assert_eq!(answered.code, Code::Ok, "{answered:?}");
    assert_eq!(
        answered,
        call(server.addr(), GET, &[bearer, THROUGH_TONIC], &frames, None).await
    );
}

/// Other RPCs are untouched: a Put over the same raw connection is answered by tonic.
#[tokio::test]
async fn other_rpcs_go_through_tonic() {
    let server = CacheServer::memory(&[]);
    let request = put(key("ns", "f", 3), b"v", 60).encode_to_vec();
    let reply = call(
        server.addr(),
        "/cache_money.v1.CacheMoney/Put",
        &[],
        &[framed(&request)],
        None,
    )
    .await;
    assert_eq!(reply.code, Code::Ok, "{reply:?}");
    let reply = call(server.addr(), GET, &[], &[framed(&encoded_get(3))], None).await;
    assert!(pb::GetResponse::decode(&reply.body[5..]).unwrap().hit);
}
