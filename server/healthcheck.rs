//! `cache-money-server health-check`: asks a running server whether it is SERVING and exits 0
//! only if so. Container images without a gRPC probe tool (the Docker image is Debian slim)
//! check the server with its own binary, e.g. in a compose `healthcheck`.
//!
//! The server probed is the one the same configuration describes: `--listen` (or
//! `CACHE_MONEY_LISTEN`), where an unspecified address (`0.0.0.0`, `[::]`) is reached over
//! loopback. It asks `grpc.health.v1.Health/Check` for the cache service, which is
//! NOT_SERVING while the store is unreachable and while the server drains.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{SERVICE_NAME, config::Config};

/// How long a health check may take, connecting included, before it fails: well inside the
/// few seconds container runtimes give a check.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 1000;

/// The options of `health-check`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthCheckArgs {
    /// Milliseconds the check may take, connecting included, before it fails.
    #[arg(
        long,
        env = "CACHE_MONEY_HEALTH_CHECK_TIMEOUT_MS",
        default_value_t = DEFAULT_HEALTH_CHECK_TIMEOUT_MS
    )]
    pub timeout_ms: u64,
}

/// Why a health check did not find the server SERVING.
#[derive(Debug)]
pub enum HealthCheckError {
    /// The configuration names no server this check can reach.
    Config(String),
    /// No connection could be opened.
    Unreachable {
        /// The server's URL.
        url: String,
        /// Why the connection failed.
        source: tonic::transport::Error,
    },
    /// The server answered the health call with an error status.
    Failed {
        /// The server's URL.
        url: String,
        /// The status it answered with.
        status: tonic::Status,
    },
    /// The server answered, but not SERVING.
    NotServing {
        /// The server's URL.
        url: String,
        /// What it reported.
        status: ServingStatus,
    },
    /// No answer within the timeout.
    TimedOut {
        /// The server's URL.
        url: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The async runtime could not start.
    Runtime(std::io::Error),
}

impl fmt::Display for HealthCheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheckError::Config(message) => write!(f, "health-check: {message}"),
            HealthCheckError::Unreachable { url, .. } => {
                write!(f, "health-check: cannot connect to {url}")
            }
            HealthCheckError::Failed { url, status } => write!(
                f,
                "health-check: {url} answered {:?}: {}",
                status.code(),
                status.message()
            ),
            HealthCheckError::NotServing { url, status } => write!(
                f,
                "health-check: {url} reports {} for {SERVICE_NAME} (store unreachable, or draining)",
                status.as_str_name()
            ),
            HealthCheckError::TimedOut { url, timeout } => write!(
                f,
                "health-check: no answer from {url} within {} ms (--timeout-ms)",
                timeout.as_millis()
            ),
            HealthCheckError::Runtime(_) => write!(f, "health-check: cannot start the runtime"),
        }
    }
}

impl std::error::Error for HealthCheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HealthCheckError::Unreachable { source, .. } => Some(source),
            HealthCheckError::Failed { status, .. } => Some(status),
            HealthCheckError::Runtime(err) => Some(err),
            HealthCheckError::Config(_)
            | HealthCheckError::NotServing { .. }
            | HealthCheckError::TimedOut { .. } => None,
        }
    }
}

/// Checks the server `config` describes, on a runtime of its own; `Ok` when it is SERVING.
///
/// # Errors
/// When the configuration names no reachable server, or the server is unreachable, slow, or
/// not SERVING.
pub fn run(config: &Config, args: &HealthCheckArgs) -> Result<(), HealthCheckError> {
    if args.timeout_ms == 0 {
        return Err(HealthCheckError::Config(
            "--timeout-ms: must be at least 1".to_owned(),
        ));
    }
    if config.tls_cert.is_some() {
        // The listener's certificate names a host, not loopback, and its CA is not known here.
        return Err(HealthCheckError::Config(
            "--tls-cert is set, but health-check speaks plaintext gRPC only; \
             probe a TLS listener with a gRPC health client that trusts its CA"
                .to_owned(),
        ));
    }
    let url = target(config.listen)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HealthCheckError::Runtime)?;
    runtime.block_on(check(&url, Duration::from_millis(args.timeout_ms)))
}

/// The URL that reaches, from this host, a server listening on `listen`: an unspecified
/// address is reached over loopback.
///
/// # Errors
/// When the port is 0: the server's real port is not known from its configuration.
pub fn target(listen: SocketAddr) -> Result<String, HealthCheckError> {
    if listen.port() == 0 {
        return Err(HealthCheckError::Config(
            "--listen: port 0 picks a free port at start-up, so the server's port is unknown; \
             set the port the server listens on"
                .to_owned(),
        ));
    }
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(format!("http://{}", SocketAddr::new(ip, listen.port())))
}

/// Asks the server at `url` whether the cache service is SERVING, within `timeout`.
///
/// # Errors
/// When the server is unreachable, answers with an error, is not SERVING, or does not answer
/// within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), HealthCheckError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| HealthCheckError::Config(format!("{url} is not a valid URL: {err}")))?
        .connect_timeout(timeout);
    let ask = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| HealthCheckError::Unreachable {
                url: url.to_owned(),
                source,
            })?;
        let request = HealthCheckRequest {
            service: SERVICE_NAME.to_owned(),
        };
        let reply = HealthClient::new(channel)
            .check(request)
            .await
            .map_err(|status| HealthCheckError::Failed {
                url: url.to_owned(),
                status,
            })?;
        match reply.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            status => Err(HealthCheckError::NotServing {
                url: url.to_owned(),
                status,
            }),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .unwrap_or_else(|_| {
            Err(HealthCheckError::TimedOut {
                url: url.to_owned(),
                timeout,
            })
        })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::server::config::Command;

    fn parse(args: &[&str]) -> (Config, HealthCheckArgs) {
        let mut argv = vec!["cache-money-server"];
        argv.extend_from_slice(args);
        let config = Config::try_parse_from(argv).expect("arguments parse");
        let Some(Command::HealthCheck(check)) = config.command.clone() else {
            panic!("{args:?} is not a health check");
        };
        (config, check)
    }

    /// An unspecified listen address is probed over loopback; a specific one as it is.
    #[test]
    fn target_reaches_the_listen_address_from_this_host() {
        let target = |listen: &str| target(listen.parse().unwrap()).unwrap();
        assert_eq!(target("0.0.0.0:50051"), "http://127.0.0.1:50051");
        assert_eq!(target("[::]:50051"), "http://[::1]:50051");
        assert_eq!(target("10.1.2.3:7000"), "http://10.1.2.3:7000");
    }

    /// Port 0, a TLS listener and a zero timeout are refused, naming the flag.
    #[test]
    fn unreachable_configurations_are_refused() {
        let (config, check) = parse(&["--listen", "127.0.0.1:0", "health-check"]);
        let err = run(&config, &check).unwrap_err().to_string();
        assert!(err.contains("--listen: port 0"), "{err}");

        let (config, check) = parse(&[
            "--tls-cert",
            "server.pem",
            "--tls-key",
            "server.key",
            "health-check",
        ]);
        let err = run(&config, &check).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");

        let (config, check) = parse(&["health-check", "--timeout-ms", "0"]);
        let err = run(&config, &check).unwrap_err().to_string();
        assert!(err.contains("--timeout-ms: must be at least 1"), "{err}");
    }
}
