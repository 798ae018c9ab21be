//! The client's own HTTP/2 connection (`client/transport.rs`) against the real server binary:
//! large messages both ways, many calls at once, errors as gRPC statuses, cancelled calls,
//! reconnecting after the server restarts, bounded connects, and connects slower than a
//! caller's deadline.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use cache_money::{Client, ClientOptions, RawClient, Ttl, pb};
use common::{CacheServer, eventually, key, put};
use tonic::Code;

async fn raw(server: &CacheServer) -> RawClient {
    Client::connect(server.url()).await.expect("client").raw()
}

async fn get(client: &mut RawClient, key: pb::Key) -> Result<pb::GetResponse, tonic::Status> {
    client
        .get(pb::GetRequest { key: Some(key) })
        .await
        .map(tonic::Response::into_inner)
}

/// A value of the largest size the server accepts by default crosses the connection both
/// ways intact: more than HTTP/2's initial 64 KiB windows, so flow control has to work.
#[tokio::test]
async fn a_one_mebibyte_value_round_trips() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(&server).await;
    let value: Vec<u8> = (0..1024 * 1024).map(|n| (n % 251) as u8).collect();
    client
        .put(put(key("transport", "big", 1), &value, 60))
        .await
        .unwrap();
    let reply = get(&mut client, key("transport", "big", 1)).await.unwrap();
    assert!(reply.hit);
    assert_eq!(reply.value.len(), value.len());
    assert!(reply.value == value, "the value came back changed");
}

/// 2,000 calls in flight at once on one connection all get their own answer.
#[tokio::test]
async fn many_concurrent_calls_share_one_connection() {
    let server = CacheServer::memory(&[]);
    let client = raw(&server).await;
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..2000u64 {
        let mut client = client.clone();
        calls.spawn(async move {
            let value = n.to_be_bytes();
            client
                .put(put(key("transport", "many", n), &value, 60))
                .await
                .unwrap();
            let reply = get(&mut client, key("transport", "many", n)).await.unwrap();
            assert_eq!(
                reply.value.as_ref(),
                value,
                "call {n} got another call's answer"
            );
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
}

/// A refused request comes back as the server's status and message (a trailers-only reply),
/// and the connection goes on serving.
#[tokio::test]
async fn server_errors_arrive_as_statuses() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(&server).await;
    let mut bad = key("transport", "bad", 1);
    bad.digest = "not-a-digest".into();
    let status = get(&mut client, bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("digest"), "{status:?}");
    assert!(
        !get(&mut client, key("transport", "bad", 2))
            .await
            .unwrap()
            .hit
    );
}

/// A call abandoned mid-flight (its future dropped) resets only its own stream.
#[tokio::test]
async fn abandoned_calls_leave_the_connection_usable() {
    let server = CacheServer::memory(&[]);
    let mut client = raw(&server).await;
    client
        .put(put(key("transport", "drop", 1), b"kept", 60))
        .await
        .unwrap();
    for _ in 0..200 {
        let mut caller = client.clone();
        // Abandoned after its first poll, before any answer can have arrived.
        let call = get(&mut caller, key("transport", "drop", 1));
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let reply = get(&mut client, key("transport", "drop", 1)).await.unwrap();
    assert_eq!(reply.value.as_ref(), b"kept");
}

/// After the server restarts, the first call finds the old connection closed and opens a new
/// one: it succeeds, rather than failing once as the price of noticing.
#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    let mut server = CacheServer::memory(&[]);
    let mut client = raw(&server).await;
    assert!(
        !get(&mut client, key("transport", "restart", 1))
            .await
            .unwrap()
            .hit
    );
    server.restart();
    // The old connection's end reaches the client asynchronously; the call must cope with
    // either order.
    let reply = get(&mut client, key("transport", "restart", 1)).await;
    assert!(
        reply.is_ok(),
        "the first call after a restart failed: {reply:?}"
    );
}

/// Nothing listening: UNAVAILABLE at once, naming the address.
#[tokio::test]
async fn refused_connections_are_unavailable() {
    let port = common::free_port();
    let mut client = Client::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
        .raw();
    let status = get(&mut client, key("transport", "refused", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&format!("127.0.0.1:{port}")),
        "{status:?}"
    );
}

/// A peer that accepts TCP but never speaks HTTP/2 costs the connect timeout, no more.
#[tokio::test]
async fn silent_peers_cost_the_connect_timeout() {
    // The kernel completes the TCP handshake from the backlog; nobody ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut client = Client::connect_with(url, options).await.unwrap().raw();
    let started = Instant::now();
    let status = get(&mut client, key("transport", "silent", 1))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("300 ms"), "{status:?}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "gave up after {waited:?}"
    );
}

/// URLs the client cannot use are refused when the client is made, with the reason.
#[tokio::test]
async fn unusable_urls_are_refused_up_front() {
    for url in ["not a url", "http://", "/just/a/path"] {
        let err = Client::connect(url).await.unwrap_err();
        assert!(
            matches!(err, cache_money::Error::InvalidUrl(_)),
            "{url}: {err:?}"
        );
    }
}

/// A TCP forwarder to `target` that holds back everything the server says on each new
/// connection for `delay`: a link whose HTTP/2 handshake takes that long.
async fn slow_link(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut client_read, mut client_write) = inbound.into_split();
                let (mut server_read, mut server_write) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                tokio::time::sleep(delay).await;
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    addr
}

/// Each `memoize` lookup gives up after 100 ms, but the handshake takes 400 ms: the attempt
/// must carry on without the caller that started it, or caching would never begin.
#[tokio::test]
async fn a_connect_slower_than_the_deadline_still_completes() {
    let server = CacheServer::memory(&[]);
    let link = slow_link(server.addr(), Duration::from_millis(400)).await;
    let cm = Client::connect(format!("http://{link}")).await.unwrap();
    let one = cm.function("transport", "slow_link", Ttl::MINUTE);
    let started = Instant::now();
    let cached = eventually(Duration::from_secs(10), || async {
        let value: u32 = one.memoize(&(1,), || async { 1 }).await.unwrap();
        assert_eq!(value, 1);
        cm.metrics().hits > 0
    })
    .await;
    assert!(cached, "never served from the cache: {:?}", cm.metrics());
    assert!(started.elapsed() >= Duration::from_millis(400));
}
