//! TLS on the gRPC listener, with certificates generated here: a CA, a server certificate for
//! 127.0.0.1 and localhost, and a client certificate for mutual TLS.

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use cache_money::{Client, ClientOptions, Ttl, pb::cache_money_client::CacheMoneyClient};
use common::{CacheServer, Logs, key, put};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// PEM files in a temporary folder, removed on drop.
struct Pki {
    dir: PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    /// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate.
    fn generate() -> Self {
        Self::generate_for(&["localhost", "127.0.0.1"])
    }

    /// A CA, a server certificate valid for `server_names` only, and a client certificate.
    fn generate_for(server_names: &[&str]) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(server_names);
        let (client_cert, client_key) = leaf(&["billing-service"]);

        let dir = std::env::temp_dir().join(format!(
            "cache-money-pki-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.pem", server_cert),
            ("server.key", server_key),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        Pki {
            dir,
            ca: ca_cert.pem(),
            client_cert,
            client_key,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn server_args(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ];
        if mutual {
            args.extend(["--tls-client-ca".into(), self.path("ca.pem")]);
        }
        args
    }

    fn client_tls(&self, with_certificate: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if with_certificate {
            tls.identity(Identity::from_pem(&self.client_cert, &self.client_key))
        } else {
            tls
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn start(pki: &Pki, mutual: bool) -> CacheServer {
    let args = pki.server_args(mutual);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    CacheServer::memory(&args)
}

async fn tls_channel(
    server: &CacheServer,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{}", server.addr()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Over TLS, the raw stubs and the client library both work.
#[tokio::test]
async fn tls_clients_are_served() {
    let pki = Pki::generate();
    let server = start(&pki, false);
    let channel = tls_channel(&server, pki.client_tls(false))
        .await
        .expect("TLS handshake");
    let mut raw = CacheMoneyClient::new(channel.clone());
    raw.put(put(key("ns", "f", 1), b"over tls", 60))
        .await
        .unwrap();
    let reply = raw
        .get(common::get_request(key("ns", "f", 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.value.as_ref(), b"over tls");

    let cm = Client::from_channel_with(channel, ClientOptions::default()).unwrap();
    let f = cm.function("ns", "g", Ttl::MINUTE);
    let first: u32 = f.memoize(&(1,), || async { 5 }).await.unwrap();
    let second: u32 = f
        .memoize(&(1,), || async { unreachable!("cached") })
        .await
        .unwrap();
    assert_eq!((first, second), (5, 5));
}

/// A plaintext client against the TLS port fails promptly with an error, not a hang.
#[tokio::test]
async fn plaintext_client_fails_cleanly() {
    let pki = Pki::generate();
    let server = start(&pki, false);
    let started = Instant::now();
    let attempt = async {
        let channel = Endpoint::from_shared(server.url())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        CacheMoneyClient::new(channel)
            .get(common::get_request(key("ns", "f", 1)))
            .await
            .map(drop)
            .map_err(|status| status.into())
    };
    let outcome: Result<(), Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .expect("the plaintext attempt hung");
    assert!(
        outcome.is_err(),
        "a plaintext request was served on the TLS port"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    // The server is unharmed.
    let channel = tls_channel(&server, pki.client_tls(false)).await.unwrap();
    CacheMoneyClient::new(channel)
        .put(put(key("ns", "f", 1), b"v", 60))
        .await
        .unwrap();
}

/// `http://` to a TLS port through the client's direct transport fails promptly, saying what
/// is likely wrong (the server was not sent a call in plaintext).
#[tokio::test]
async fn http_to_a_tls_server_says_to_use_https() {
    let pki = Pki::generate();
    let server = start(&pki, false);
    let url = format!("http://{}", server.addr());
    let mut raw = Client::connect(url).await.unwrap().raw();
    let started = Instant::now();
    let status = raw
        .get(common::get_request(key("ns", "f", 1)))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{status:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("https://"), "{status:?}");
}

/// With --tls-client-ca, only clients with a certificate from that CA are served.
#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let pki = Pki::generate();
    let server = start(&pki, true);
    let with_cert = tls_channel(&server, pki.client_tls(true))
        .await
        .expect("mutual TLS handshake");
    CacheMoneyClient::new(with_cert)
        .put(put(key("ns", "f", 1), b"v", 60))
        .await
        .unwrap();

    let refused = match tls_channel(&server, pki.client_tls(false)).await {
        Err(_) => true,
        Ok(channel) => CacheMoneyClient::new(channel)
            .get(common::get_request(key("ns", "f", 1)))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
}

/// A missing certificate file stops start-up with a message naming the flag.
#[test]
fn unreadable_certificate_is_reported() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cache-money-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-cert: cannot read"), "{stderr}");
}

/// rediss://: the server talks TLS to a Redis whose certificate it verifies against
/// --redis-tls-ca; without that CA the certificate is refused and nothing is stored.
#[tokio::test]
async fn redis_over_tls() {
    let pki = Pki::generate();
    let tls_port = common::free_port().to_string();
    let redis = common::RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &pki.path("server.pem"),
        "--tls-key-file",
        &pki.path("server.key"),
        "--tls-ca-cert-file",
        &pki.path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let server = CacheServer::start(&["--redis-url", &url, "--redis-tls-ca", &pki.path("ca.pem")]);
    let mut cm = server.client().await;
    cm.put(put(key("ns", "f", 1), b"through tls", 60))
        .await
        .expect("Put over rediss://");
    let reply = cm
        .get(common::get_request(key("ns", "f", 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.value.as_ref(), b"through tls");
    assert_eq!(redis.dbsize().await, 1, "the entry is in this Redis");

    let unverified = CacheServer::start(&["--redis-url", &url]);
    let mut cm = unverified.client().await;
    let err = cm.put(put(key("ns", "f", 2), b"v", 60)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    assert_eq!(
        redis.dbsize().await,
        1,
        "nothing was stored without a verified certificate"
    );
}

/// `Client::connect("https://…")` speaks TLS, verified against the configured CA: memoize
/// caches and busts succeed.
#[tokio::test]
async fn https_urls_connect_with_a_configured_ca() {
    let pki = Pki::generate();
    let server = start(&pki, false);
    let options = ClientOptions {
        tls_ca: Some(pki.ca.clone().into_bytes()),
        ..ClientOptions::default()
    };
    let url = format!("https://{}", server.addr());
    let cm = Client::connect_with(url, options).await.unwrap();
    let f = cm.function("ns", "https", Ttl::MINUTE);
    let first: u32 = f.memoize(&(1,), || async { 9 }).await.unwrap();
    let second: u32 = f
        .memoize(&(1,), || async { unreachable!("cached") })
        .await
        .unwrap();
    assert_eq!((first, second), (9, 9));
    assert_eq!(cm.metrics().hits, 1, "{:?}", cm.metrics());
    assert_eq!(f.bust_all().await.unwrap(), 1);
}

/// Against a server whose certificate another CA signed, a bust fails with an error that
/// names the certificate problem, and memoize computes and says once, at warn, that caching
/// is off and why.
#[tokio::test]
async fn a_wrong_ca_is_reported_and_memoize_warns_once() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let server = start(&pki, false);
    let options = ClientOptions {
        tls_ca: Some(stranger.ca.clone().into_bytes()),
        ..ClientOptions::default()
    };
    let cm = Client::connect_with(format!("https://{}", server.addr()), options)
        .await
        .unwrap();
    let err = cm.bust_all().await.unwrap_err();
    assert!(
        err.to_string().contains("certificate"),
        "the error should name the certificate problem: {err}"
    );

    let logs = Logs::default();
    let _guard = logs.capture();
    let f = cm.function("ns", "wrong_ca", Ttl::MINUTE);
    for n in 0..20u32 {
        let value: u32 = f.memoize(&(n,), || async move { n * 2 }).await.unwrap();
        assert_eq!(value, n * 2);
    }
    let warnings = logs.warnings();
    assert_eq!(warnings.len(), 1, "expected one warning: {warnings:#?}");
    assert!(
        warnings[0].contains("caching is off") && warnings[0].contains("certificate"),
        "{}",
        warnings[0]
    );
    assert_eq!(cm.metrics().hits, 0);
}

/// `https://` to a server without TLS fails with an error that says so and what to do.
#[tokio::test]
async fn https_to_a_plaintext_server_says_it_does_not_speak_tls() {
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(format!("https://{}", server.addr()))
        .await
        .unwrap();
    let err = cm.bust_all().await.unwrap_err();
    assert!(
        err.to_string().contains("does not speak TLS: use http://"),
        "{err}"
    );
}

/// Two `https://` replicas named `localhost`, resolved to their addresses: calls over TLS
/// verify each replica's certificate against the name (it is valid for `localhost` only, not
/// the address dialled), and the health checks run over TLS too, since a killed replica is
/// left: 40 calls in a row then succeed.
#[tokio::test]
async fn https_replicas_are_balanced_and_checked_over_tls() {
    let pki = Pki::generate_for(&["localhost"]);
    let (a, mut b) = (start(&pki, false), start(&pki, false));
    let options = ClientOptions {
        tls_ca: Some(pki.ca.clone().into_bytes()),
        resolve_interval: Some(Duration::from_secs(60)),
        breaker_threshold: u32::MAX,
        ..ClientOptions::default()
    };
    let urls = [a.addr(), b.addr()].map(|addr| format!("https://localhost:{}", addr.port()));
    let cm = Client::connect_many_with(urls, options).await.unwrap();
    let f = cm.function("ns", "https_replicas", Ttl::MINUTE);
    for n in 0..50u32 {
        let value: u32 = f.memoize(&(n,), || async move { n }).await.unwrap();
        assert_eq!(value, n);
    }
    assert_eq!(cm.metrics().rpc_failures, 0, "{:?}", cm.metrics());

    b.kill();
    let killed = Instant::now();
    let (mut n, mut streak) = (50u32, 0);
    while streak < 40 {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "calls still fail 10 s after a replica was killed: {:?}",
            cm.metrics()
        );
        let failures = cm.metrics().rpc_failures;
        n += 1;
        let value: u32 = f.memoize(&(n,), || async move { n }).await.unwrap();
        assert_eq!(value, n);
        streak = if cm.metrics().rpc_failures == failures {
            streak + 1
        } else {
            0
        };
    }
}
