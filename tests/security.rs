//! Authentication and authorization against the real server: the matrix of every RPC with no
//! token, a wrong token, a token for another namespace and the right token; health and
//! reflection open without one; tokens kept out of the logs.

mod common;

use cache_money::{Client, ClientOptions, Ttl, pb, pb::cache_money_client::CacheMoneyClient};
use common::{CacheServer, key, put};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const BILLING: &str = "billing-token-5f2c9a71e0";
const SHIPPING: &str = "shipping-token-77ab31c4d9";
const READER: &str = "reader-token-0c1d2e3f4a5b";
const OPS: &str = "ops-token-9d8c7b6a5f4e3d";
const WRONG: &str = "not-a-configured-token-1234";

fn grants() -> String {
    format!(
        r#"{{"tokens": [
            {{"name": "billing", "token": "{BILLING}", "read": ["billing"], "write": ["billing"]}},
            {{"name": "shipping", "token": "{SHIPPING}", "read": ["shipping"], "write": ["shipping"]}},
            {{"name": "reader", "token": "{READER}", "read": ["billing"]}},
            {{"name": "ops", "token": "{OPS}", "read": ["*"], "write": ["*"], "admin": true}}
        ]}}"#
    )
}

fn secured(extra_env: &[(&str, &str)]) -> CacheServer {
    let grants = grants();
    let mut env = vec![("CACHE_MONEY_AUTH_TOKENS", grants.as_str())];
    env.extend_from_slice(extra_env);
    CacheServer::start_with_env(&[], &env)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    Get,
    Put,
    Bust,
    BustFunction,
    BustNamespace,
    BustAll,
    BustTag,
    GetMany,
    PutMany,
    Keys,
    Stats,
    Watch,
}

const RPCS: [Rpc; 12] = [
    Rpc::Get,
    Rpc::Put,
    Rpc::Bust,
    Rpc::BustFunction,
    Rpc::BustNamespace,
    Rpc::BustAll,
    Rpc::BustTag,
    Rpc::GetMany,
    Rpc::PutMany,
    Rpc::Keys,
    Rpc::Stats,
    Rpc::Watch,
];

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Calls `rpc` on namespace `billing` with `token`.
async fn call(
    cm: &mut CacheMoneyClient<Channel>,
    rpc: Rpc,
    token: Option<&str>,
) -> Result<(), Status> {
    let ns = || "billing".to_string();
    match rpc {
        Rpc::Get => cm
            .get(with_token(
                common::get_request(key("billing", "f", 1)),
                token,
            ))
            .await
            .map(drop),
        Rpc::Put => cm
            .put(with_token(put(key("billing", "f", 1), b"v", 60), token))
            .await
            .map(drop),
        Rpc::Bust => cm
            .bust(with_token(
                pb::BustRequest {
                    key: Some(key("billing", "f", 1)),
                },
                token,
            ))
            .await
            .map(drop),
        Rpc::BustFunction => {
            let request = pb::BustFunctionRequest {
                namespace: ns(),
                function: "f".into(),
            };
            cm.bust_function(with_token(request, token)).await.map(drop)
        }
        Rpc::BustNamespace => cm
            .bust_namespace(with_token(
                pb::BustNamespaceRequest { namespace: ns() },
                token,
            ))
            .await
            .map(drop),
        Rpc::BustAll => cm
            .bust_all(with_token(pb::BustAllRequest {}, token))
            .await
            .map(drop),
        Rpc::BustTag => {
            let request = pb::BustTagRequest {
                namespace: ns(),
                tag: "user:7".into(),
            };
            cm.bust_tag(with_token(request, token)).await.map(drop)
        }
        Rpc::GetMany => {
            let request = pb::GetManyRequest {
                keys: vec![key("billing", "f", 1)],
            };
            cm.get_many(with_token(request, token)).await.map(drop)
        }
        Rpc::PutMany => {
            let request = pb::PutManyRequest {
                entries: vec![put(key("billing", "f", 2), b"v", 60)],
            };
            cm.put_many(with_token(request, token)).await.map(drop)
        }
        Rpc::Keys => {
            let request = pb::KeysRequest {
                namespace: ns(),
                function: "f".into(),
                cursor: String::new(),
                limit: 10,
            };
            cm.keys(with_token(request, token)).await.map(drop)
        }
        Rpc::Stats => cm
            .stats(with_token(pb::StatsRequest {}, token))
            .await
            .map(drop),
        Rpc::Watch => {
            let request = pb::WatchRequest {
                functions: vec![pb::WatchedFunction {
                    namespace: ns(),
                    function: "f".into(),
                }],
                ..Default::default()
            };
            cm.watch(with_token(request, token)).await.map(drop)
        }
    }
}

fn is_admin(rpc: Rpc) -> bool {
    matches!(rpc, Rpc::BustNamespace | Rpc::BustAll | Rpc::Keys)
}

/// Every RPC: no token and a wrong token are UNAUTHENTICATED; a token for another namespace
/// (or without admin, for admin RPCs) is PERMISSION_DENIED; the right token is OK.
#[tokio::test]
async fn every_rpc_checks_its_caller() {
    let server = secured(&[]);
    let mut cm = server.client().await;
    for rpc in RPCS {
        for token in [None, Some(WRONG)] {
            let err = call(&mut cm, rpc, token)
                .await
                .expect_err(&format!("{rpc:?} with {token:?}"));
            assert_eq!(
                err.code(),
                Code::Unauthenticated,
                "{rpc:?} with {token:?}: {}",
                err.message()
            );
        }
        let other = call(&mut cm, rpc, Some(SHIPPING)).await;
        if rpc == Rpc::Stats {
            assert!(other.is_ok(), "Stats needs only a valid token");
        } else {
            let err = other.expect_err(&format!("{rpc:?} with another namespace's token"));
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{rpc:?}: {}",
                err.message()
            );
            assert!(
                err.message().contains("\"shipping\""),
                "names the grant: {}",
                err.message()
            );
        }
        let right = if is_admin(rpc) { OPS } else { BILLING };
        call(&mut cm, rpc, Some(right))
            .await
            .unwrap_or_else(|err| panic!("{rpc:?} with the right token: {err}"));
    }
}

/// Read and write are separate: a read-only token reads but cannot write or bust, and a
/// namespace token cannot call admin RPCs even for its own namespace.
#[tokio::test]
async fn read_write_and_admin_are_separate_rights() {
    let server = secured(&[]);
    let mut cm = server.client().await;
    call(&mut cm, Rpc::Put, Some(BILLING)).await.unwrap();
    for rpc in [Rpc::Get, Rpc::GetMany, Rpc::Watch] {
        call(&mut cm, rpc, Some(READER)).await.unwrap();
    }
    // Following every namespace is an admin's right, whatever a token may read.
    let everything = || pb::WatchRequest {
        all_namespaces: true,
        ..Default::default()
    };
    let err = cm
        .watch(with_token(everything(), Some(READER)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    cm.watch(with_token(everything(), Some(OPS)))
        .await
        .expect("an admin follows everything");
    // A watch naming a namespace the token cannot read is refused whole.
    let mixed = pb::WatchRequest {
        namespaces: vec!["billing".into(), "shipping".into()],
        ..Default::default()
    };
    let err = cm.watch(with_token(mixed, Some(READER))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    for rpc in [
        Rpc::Put,
        Rpc::PutMany,
        Rpc::Bust,
        Rpc::BustFunction,
        Rpc::BustTag,
    ] {
        let err = call(&mut cm, rpc, Some(READER)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{rpc:?}");
    }
    for rpc in [Rpc::BustNamespace, Rpc::BustAll, Rpc::Keys] {
        let err = call(&mut cm, rpc, Some(BILLING)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{rpc:?}");
    }
    // A batch touching a namespace the token lacks is refused whole.
    let mixed = pb::GetManyRequest {
        keys: vec![key("billing", "f", 1), key("shipping", "f", 1)],
    };
    let err = cm
        .get_many(with_token(mixed, Some(BILLING)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Health and reflection answer without a token, so probes and grpcurl keep working.
#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let server = secured(&[]);
    let channel = server.channel().await;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "cache_money.v1.CacheMoney".into(),
        })
        .await
        .expect("health without a token")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(
        reflection_lists_services(channel).await,
        "reflection without a token"
    );
}

async fn reflection_lists_services(channel: Channel) -> bool {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    match ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
    {
        Ok(replies) => replies
            .into_inner()
            .message()
            .await
            .is_ok_and(|reply| reply.is_some()),
        Err(_) => false,
    }
}

/// `--reflection false` turns reflection off; the cache service still answers.
#[tokio::test]
async fn reflection_can_be_turned_off() {
    let server = CacheServer::memory(&["--reflection", "false"]);
    assert!(!reflection_lists_services(server.channel().await).await);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"v", 60))
        .await
        .expect("the cache service is unaffected");
}

/// No token, right or wrong, appears in the logs, even at trace level with failures logged.
#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let server = secured(&[("RUST_LOG", "trace")]);
    let mut cm = server.client().await;
    for rpc in RPCS {
        for token in [None, Some(WRONG), Some(SHIPPING), Some(BILLING), Some(OPS)] {
            let _ = call(&mut cm, rpc, token).await;
        }
    }
    let logs = server.log_text();
    assert!(
        logs.lines().count() > 50,
        "trace logging produced too little to be a real check"
    );
    for token in [BILLING, SHIPPING, READER, OPS, WRONG] {
        assert!(!logs.contains(token), "token {token} found in the logs");
    }
    assert!(
        logs.contains("auth_tokens=4"),
        "the start-up line counts the tokens"
    );
}

/// The client library sends its token; without one it is refused, and memoize stays
/// fail-open (computes) while busts report the refusal.
#[tokio::test]
async fn client_sends_its_token() {
    let server = secured(&[]);
    let options = ClientOptions {
        token: Some(BILLING.into()),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(server.url(), options.clone())
        .await
        .unwrap();
    let f = cm.function("billing", "f", Ttl::MINUTE);
    let first: u32 = f.memoize(&(1,), || async { 7 }).await.unwrap();
    let second: u32 = f
        .memoize(&(1,), || async { unreachable!("cached") })
        .await
        .unwrap();
    assert_eq!((first, second), (7, 7));
    assert!(f.bust(&(1,)).await.unwrap());
    assert!(
        !format!("{options:?}").contains(BILLING),
        "Debug shows the token"
    );

    let anonymous = Client::connect(server.url()).await.unwrap();
    let g = anonymous.function("billing", "f", Ttl::MINUTE);
    let computed: u32 = g.memoize(&(2,), || async { 9 }).await.unwrap();
    assert_eq!(computed, 9);
    let refused = g.bust_all().await.unwrap_err();
    assert!(refused.to_string().contains("Unauthenticated"), "{refused}");
}

/// Tokens from a file work like tokens from the environment; a bad file stops start-up.
#[tokio::test]
async fn tokens_load_from_a_file() {
    let path = std::env::temp_dir().join(format!("cache-money-tokens-{}.json", std::process::id()));
    std::fs::write(&path, grants()).unwrap();
    let server = CacheServer::memory(&["--auth-file", path.to_str().unwrap()]);
    let mut cm = server.client().await;
    assert_eq!(
        call(&mut cm, Rpc::Put, None).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    call(&mut cm, Rpc::Put, Some(BILLING)).await.unwrap();
    drop(server);

    std::fs::write(
        &path,
        r#"{"tokens": [{"name": "a", "token": "too-short"}]}"#,
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cache-money-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--auth-file",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 16"), "{stderr}");
    assert!(
        !stderr.contains("too-short"),
        "the error echoes the token: {stderr}"
    );
}

/// A read-only token's `memoize` reads what a writer cached: its leased lookups are answered
/// as plain lookups (a lease is the right to write), not refused; Release is a write.
#[tokio::test]
async fn a_reader_memoizes_from_the_cache_without_a_lease() {
    let server = secured(&[]);
    let options = |token: &str| ClientOptions {
        token: Some(token.into()),
        ..ClientOptions::default()
    };
    let writer = Client::connect_with(server.url(), options(BILLING))
        .await
        .unwrap();
    let reader = Client::connect_with(server.url(), options(READER))
        .await
        .unwrap();
    let written: u32 = writer
        .function("billing", "f", Ttl::MINUTE)
        .memoize(&(1,), || async { 1 })
        .await
        .unwrap();
    assert_eq!(written, 1);
    let read: u32 = reader
        .function("billing", "f", Ttl::MINUTE)
        .memoize(&(1,), || async { 2 })
        .await
        .unwrap();
    assert_eq!(read, 1, "a read-only client recomputed a cached entry");
    assert_eq!(reader.metrics().rpc_failures, 0);
    let mut raw = CacheMoneyClient::new(server.channel().await);
    let leased = pb::GetRequest {
        key: Some(key("billing", "g", 1)),
        lease_ms: 5_000,
        ..Default::default()
    };
    let reply = raw
        .get(with_token(leased, Some(READER)))
        .await
        .expect("a reader's leased Get is a plain lookup")
        .into_inner();
    assert!(!reply.hit);
    assert_eq!(reply.lease(), pb::Lease::None);
    let release = pb::ReleaseRequest {
        key: Some(key("billing", "g", 1)),
        lease_token: 7,
    };
    let status = raw
        .release(with_token(release, Some(READER)))
        .await
        .expect_err("Release is a write");
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// With tokens the cache service sits behind the interceptor's layer (without, it does not):
/// a request over --max-message-bytes still gets the message that names the flag.
#[tokio::test]
async fn oversized_messages_are_named_behind_authentication() {
    let server = secured(&[
        ("CACHE_MONEY_MAX_VALUE_BYTES", "1000"),
        ("CACHE_MONEY_MAX_MESSAGE_BYTES", "6000"),
    ]);
    let mut cm = server.client().await;
    let entries = (0..10)
        .map(|n| put(key("billing", "f", n), &[7u8; 900], 60))
        .collect();
    let err = cm
        .put_many(with_token(pb::PutManyRequest { entries }, Some(BILLING)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("--max-message-bytes (6000 bytes)"),
        "the message does not name the flag: {}",
        err.message()
    );
}
