//! The `/metrics` listener: hyper's HTTP/1 server (already in the build under tonic's), one
//! request per connection, every connection cut off after `--metrics-timeout-ms`, at most
//! `--metrics-max-connections` served at once. `GET
//! /metrics` answers the registry; anything else is 404. No token: it listens only where
//! `--metrics-listen` says (SECURITY.md).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, warn};

use super::{Format, Metrics};

/// The path metrics are served on.
pub const PATH: &str = "/metrics";

/// How long to wait after a failed accept (out of file descriptors, say) before the next, so
/// a failure that persists does not spin a core.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `metrics` on `listener` until the task is dropped, each connection for at most
/// `timeout` and at most `max_connections` at once. A connection past the cap is accepted and
/// closed at once rather than left in the backlog, so its client learns immediately and the
/// cap holds however many connections are opened.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    timeout: Duration,
    max_connections: usize,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(cause = %err, "metrics listener: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!(%peer, "metrics connection closed: --metrics-max-connections are open");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Held until the connection ends, however it ends.
            let _permit = permit;
            let respond = service_fn(move |request| {
                let response = respond(&metrics, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), respond);
            match tokio::time::timeout(timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => debug!(%peer, cause = %err, "metrics connection failed"),
                Err(_) => debug!(%peer, "metrics connection cut off after --metrics-timeout-ms"),
            }
        });
    }
}

/// The answer to one request: the metrics for `GET /metrics`, in OpenMetrics when the client
/// accepts it; 404 for anything else.
fn respond(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET || request.uri().path() != PATH {
        let mut response = Response::new(Full::from("not found: metrics are at GET /metrics\n"));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|accept| {
            accept
                .to_str()
                .is_ok_and(|accept| accept.contains("application/openmetrics-text"))
        });
    let format = if openmetrics {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    };
    let mut response = Response::new(Full::from(metrics.encode(format)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    response
}
