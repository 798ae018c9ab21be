//! `Client::raw_get` frames its request and reads the response itself on a direct connection
//! (`client/transport.rs`), where `client.raw().get()` goes through tonic's generic unary
//! path. A stand-in HTTP/2 server answers every call with one scripted response — the usual
//! one, and each odd shape a server or proxy can send — and both calls must come back alike:
//! the same message, or the same status code and message. tonic is the reference.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use cache_money::{Client, ClientOptions, pb};
use common::{framed, framed_with};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use prost::Message;
use tokio::net::TcpListener;

/// One step of a scripted response.
#[derive(Clone, Debug)]
enum Step {
    /// The response's head: its HTTP status and headers (content-type is added).
    Head(StatusCode, &'static [(&'static str, &'static str)]),
    Data(Bytes),
    Trailers(&'static [(&'static str, &'static str)]),
    /// The stream reset with this reason.
    Reset(h2::Reason),
    /// Nothing more, ever: the stream stays open.
    Stall,
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )
        })
        .collect()
}

/// A server answering every request with `script`, after reading the request whole.
async fn stand_in(script: Vec<Step>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    tokio::spawn(answer(request.into_body(), respond, script.clone()));
                }
            });
        }
    });
    addr
}

async fn answer(
    mut body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    script: Vec<Step>,
) {
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let Some((Step::Head(status, pairs), rest)) = script.split_first() else {
        panic!("a script starts with its head");
    };
    let mut head = Response::builder().status(*status);
    *head.headers_mut().unwrap() = headers(pairs);
    head.headers_mut()
        .unwrap()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    let mut send = respond
        .send_response(head.body(()).unwrap(), rest.is_empty())
        .unwrap();
    for (n, step) in rest.iter().enumerate() {
        let last = n + 1 == rest.len();
        match step {
            Step::Head(..) => panic!("one head per response"),
            Step::Data(data) => send.send_data(data.clone(), last).unwrap(),
            Step::Trailers(pairs) => send.send_trailers(headers(pairs)).unwrap(),
            Step::Reset(reason) => send.send_reset(*reason),
            Step::Stall => {
                // Until the client gives the stream up.
                let _ = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
            }
        }
    }
}

fn hit(value: &[u8]) -> Vec<u8> {
    pb::GetResponse {
        hit: true,
        value: value.to_vec().into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A call's metadata, comparable: each header's name and value, sorted.
type Metadata = Vec<(String, String)>;

/// What a Get came back with, comparable: the reply or the status, each with its metadata.
type Outcome = Result<(pb::GetResponse, Metadata), (tonic::Code, String, Metadata)>;

fn metadata(map: &tonic::metadata::MetadataMap) -> Metadata {
    let mut pairs: Metadata = map
        .clone()
        .into_headers()
        .iter()
        .map(|(name, value)| (name.to_string(), format!("{value:?}")))
        .collect();
    pairs.sort();
    pairs
}

/// The same Get through the stub and through `raw_get`, against a stand-in answering with
/// `script`: the two must agree. Returns `raw_get`'s.
async fn both_ways(script: Vec<Step>, options: ClientOptions) -> Outcome {
    let addr = stand_in(script.clone()).await;
    let client = Client::connect_with(format!("http://{addr}"), options)
        .await
        .expect("connect");
    let request = common::get_request(common::key("ns", "f", 1));
    let outcome = |result: Result<tonic::Response<pb::GetResponse>, tonic::Status>| match result {
        Ok(response) => Ok((response.get_ref().clone(), metadata(response.metadata()))),
        Err(status) => Err((
            status.code(),
            status.message().to_owned(),
            metadata(status.metadata()),
        )),
    };
    // Bounded, so a call that hangs fails the test instead of stalling it.
    let within = std::time::Duration::from_secs(20);
    let stub = tokio::time::timeout(within, client.raw().get(request.clone()))
        .await
        .expect("the stub's call hung");
    let direct = tokio::time::timeout(within, client.raw_get(request))
        .await
        .expect("raw_get hung where the stub did not");
    let (stub, direct) = (outcome(stub), outcome(direct));
    assert_eq!(direct, stub, "raw_get differs from the stub for {script:?}");
    direct
}

const OK_HEAD: Step = Step::Head(StatusCode::OK, &[]);
const OK_TRAILERS: Step = Step::Trailers(&[("grpc-status", "0")]);

/// The usual response, and the same message cut into two DATA frames.
#[tokio::test]
async fn a_usual_response_is_read_as_the_stub_reads_it() {
    let message = hit(&[7; 64]);
    let reply = both_ways(
        vec![OK_HEAD, Step::Data(framed(&message)), OK_TRAILERS],
        ClientOptions::default(),
    )
    .await
    .expect("a hit")
    .0;
    assert!(reply.hit);
    assert_eq!(reply.value.as_ref(), &[7; 64]);

    let whole = framed(&message);
    let reply = both_ways(
        vec![
            OK_HEAD,
            Step::Data(whole.slice(..3)),
            Step::Data(whole.slice(3..)),
            OK_TRAILERS,
        ],
        ClientOptions::default(),
    )
    .await
    .expect("a hit in two frames")
    .0;
    assert_eq!(reply.value.as_ref(), &[7; 64]);
}

/// Every odd response gets the stub's outcome: statuses in the head or the trailers, a
/// missing message or status, HTTP errors, a compressed or unknown flag, an encoding the
/// client did not offer, bytes that are not the message, a message cut short, two messages,
/// a message over the client's limit, a reset stream.
#[tokio::test]
async fn odd_responses_get_the_stub_s_outcome() {
    let message = hit(b"v");
    let data = || Step::Data(framed(&message));
    let cases: Vec<(&str, Vec<Step>, Option<tonic::Code>)> = vec![
        (
            "a status in the head",
            vec![Step::Head(
                StatusCode::OK,
                &[("grpc-status", "5"), ("grpc-message", "gone%20away")],
            )],
            Some(tonic::Code::NotFound),
        ),
        (
            "OK in the head, no message",
            vec![Step::Head(StatusCode::OK, &[("grpc-status", "0")])],
            Some(tonic::Code::Internal),
        ),
        (
            "an error status after a message",
            vec![
                OK_HEAD,
                data(),
                Step::Trailers(&[("grpc-status", "13"), ("grpc-message", "broke")]),
            ],
            Some(tonic::Code::Internal),
        ),
        (
            "no trailers",
            vec![OK_HEAD, data()],
            Some(tonic::Code::Unknown),
        ),
        (
            "trailers without a status",
            vec![OK_HEAD, data(), Step::Trailers(&[("x-other", "1")])],
            Some(tonic::Code::Unknown),
        ),
        (
            "HTTP 404",
            vec![Step::Head(StatusCode::NOT_FOUND, &[]), Step::Trailers(&[])],
            Some(tonic::Code::Unimplemented),
        ),
        (
            "HTTP 503 after a message",
            vec![
                Step::Head(StatusCode::SERVICE_UNAVAILABLE, &[]),
                data(),
                Step::Trailers(&[]),
            ],
            Some(tonic::Code::Unavailable),
        ),
        (
            "the compressed flag",
            vec![
                OK_HEAD,
                Step::Data(framed_with(1, message.len() as u32, &message)),
                OK_TRAILERS,
            ],
            Some(tonic::Code::Internal),
        ),
        (
            "flag 9",
            vec![
                OK_HEAD,
                Step::Data(framed_with(9, message.len() as u32, &message)),
                OK_TRAILERS,
            ],
            Some(tonic::Code::Internal),
        ),
        (
            "gzip, not offered",
            vec![
                Step::Head(StatusCode::OK, &[("grpc-encoding", "gzip")]),
                data(),
                OK_TRAILERS,
            ],
            Some(tonic::Code::Unimplemented),
        ),
        (
            "identity encoding named",
            vec![
                Step::Head(StatusCode::OK, &[("grpc-encoding", "identity")]),
                data(),
                OK_TRAILERS,
            ],
            None,
        ),
        (
            "not protobuf",
            vec![OK_HEAD, Step::Data(framed(&[0xff; 7])), OK_TRAILERS],
            Some(tonic::Code::Internal),
        ),
        (
            "a message cut short",
            vec![
                OK_HEAD,
                Step::Data(framed(&message).slice(..4 + message.len())),
                OK_TRAILERS,
            ],
            Some(tonic::Code::Internal),
        ),
        (
            "two messages",
            vec![OK_HEAD, data(), data(), OK_TRAILERS],
            None,
        ),
        (
            "an OK status whose grpc-message does not decode",
            vec![
                OK_HEAD,
                data(),
                Step::Trailers(&[("grpc-status", "0"), ("grpc-message", "%FF")]),
            ],
            Some(tonic::Code::Unknown),
        ),
        (
            "not protobuf, then nothing",
            vec![OK_HEAD, Step::Data(framed(&[0xff; 7])), Step::Stall],
            Some(tonic::Code::Internal),
        ),
        (
            "the compressed flag, then nothing",
            vec![
                OK_HEAD,
                Step::Data(framed_with(1, message.len() as u32, &message)),
                Step::Stall,
            ],
            Some(tonic::Code::Internal),
        ),
        (
            "a reset after the head",
            vec![OK_HEAD, Step::Reset(h2::Reason::INTERNAL_ERROR)],
            Some(tonic::Code::Internal),
        ),
        (
            "a reset after the message",
            vec![OK_HEAD, data(), Step::Reset(h2::Reason::REFUSED_STREAM)],
            Some(tonic::Code::Unavailable),
        ),
    ];
    for (what, script, code) in cases {
        let outcome = both_ways(script, ClientOptions::default()).await;
        match (code, &outcome) {
            (None, Ok((reply, _))) => assert!(reply.hit, "{what}: {outcome:?}"),
            (Some(code), Err((got, ..))) => assert_eq!(*got, code, "{what}: {outcome:?}"),
            _ => panic!("{what}: expected {code:?}, got {outcome:?}"),
        }
    }
}

/// A response over the client's `max_receive_bytes` is refused as the stub refuses it: from
/// its header, without waiting for (or holding) the rest of it.
#[tokio::test]
async fn a_response_over_the_client_s_limit_is_refused_alike() {
    let options = || ClientOptions {
        max_receive_bytes: 1000,
        ..ClientOptions::default()
    };
    let big = hit(&[1; 2000]);
    let outcome = both_ways(
        vec![OK_HEAD, Step::Data(framed(&big)), OK_TRAILERS],
        options(),
    )
    .await;
    assert_eq!(outcome.unwrap_err().0, tonic::Code::OutOfRange);
    // Announced, never sent: refused from the header alone.
    let announced = framed_with(0, 1 << 20, &[1; 100]);
    let outcome = both_ways(vec![OK_HEAD, Step::Data(announced), Step::Stall], options()).await;
    assert_eq!(outcome.unwrap_err().0, tonic::Code::OutOfRange);
}
