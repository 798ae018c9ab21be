//! Every RPC of the cache service, observed from outside the service: a request id (the
//! caller's `x-request-id`, or a generated one) named by the request's log lines and returned
//! in the response whenever a log line names it; a `tracing` span with the method, request id
//! and (once the service has validated it) the namespace, closed by a line with the result,
//! status and duration; the RPC metrics (count by method and status code, latency, in
//! flight). It wraps the authentication interceptor (when tokens are configured), so refused
//! and shed requests are counted like any other.
//!
//! The span and its closing line are at DEBUG level (as tower-http's `TraceLayer` does): a span
//! costs the log formatter a few percent of a Get's CPU, too much to pay on every request when
//! nothing is written. At the default `info` level a request's warnings carry its request id
//! as a field instead; `RUST_LOG=info,cache_money::server::observe=debug` turns the spans on.
//!
//! A generated id is made only when a log line asks for it (or the span needs it), and only
//! then returned: an id that no log line names identifies nothing, and a unique header on
//! every response cost the server ≈ 7 % of its instructions per Get (BENCHMARKS.md,
//! "Instructions per request"). A caller's own id is echoed on every response this layer
//! makes (not on one tonic's `grpc-timeout` layer, outside it, answers when the caller's
//! deadline passes). Echoed ids are sent never-indexed: each is unique, so entering them in
//! HTTP/2's header table would only evict what is worth keeping.

use std::{
    fmt::Write as _,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};
use tonic::{Code, Extensions, Status, body::Body, server::NamedService};
use tracing::{Instrument, Level, Span, debug, debug_span, field};

use crate::server::SERVICE_NAME;
use crate::server::metrics::{Metrics, code_name};

/// The metadata key of the request id, in requests and responses.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest request id taken from a caller; a longer one, or one with characters outside
/// `[A-Za-z0-9._:/+=-]`, is replaced by a generated id (a caller's id is written into the
/// request's log lines).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The RPCs of `cache_money.v1.CacheMoney`: the `method` label and span field. Any other path
/// is `unknown`, so a caller cannot add label values.
pub const METHODS: [&str; 13] = [
    "Get",
    "Put",
    "Release",
    "Bust",
    "BustFunction",
    "BustNamespace",
    "BustAll",
    "BustTag",
    "GetMany",
    "PutMany",
    "Keys",
    "Stats",
    "Watch",
];

/// What a lookup RPC found (`hit` or `miss`), put in the response's extensions by the service
/// for the RPC's closing log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);

/// A request's id, in its extensions for the service's log lines: the caller's, or one
/// generated the first time a log line asks for it. Shared with the layer, which returns it in
/// the response once it exists.
#[derive(Debug, Clone, Default)]
pub struct RequestId(Arc<OnceLock<HeaderValue>>);

impl RequestId {
    /// The caller's id when it sent an acceptable one; else none yet (see [`RequestId::get`]).
    fn of(headers: &HeaderMap) -> Self {
        let id = RequestId::default();
        if let Some(sent) = headers.get(REQUEST_ID_HEADER)
            && acceptable_request_id(sent.as_bytes())
        {
            let _ = id.0.set(sent.clone());
        }
        id
    }

    /// The id, generated now if the caller sent none: from here on the response returns it.
    fn get(&self) -> &HeaderValue {
        self.0.get_or_init(generated_request_id)
    }

    /// The id to return in the response: the caller's, or a generated one some log line named.
    fn named(&self) -> Option<HeaderValue> {
        self.0.get().map(|id| {
            let mut id = id.clone();
            id.set_sensitive(true);
            id
        })
    }
}

/// The request id in a request's extensions, for a log line (which makes the response return
/// it); empty when the request did not pass the layer.
pub fn request_id(extensions: &Extensions) -> &str {
    extensions
        .get::<RequestId>()
        .and_then(|id| id.get().to_str().ok())
        .unwrap_or_default()
}

/// Whether the log filter turns RPC spans on, by this module's target and the spans' level
/// (a filter naming the span, `[rpc]=debug`, is not seen here; nor does it show the closing
/// line, which is written outside the span). Asked once logging is set up: a service built
/// before it asks too early.
pub fn spans_enabled() -> bool {
    tracing::enabled!(Level::DEBUG)
}

/// Records the namespace an RPC touches on its span, when spans are on, so every later log
/// line of the request names it.
pub fn record_namespace(namespace: &str) {
    if spans_enabled() {
        Span::current().record("namespace", namespace);
    }
}

/// Records on the span the namespace a batch's items share, or `(several)`.
pub fn record_namespaces<'a>(mut namespaces: impl Iterator<Item = &'a str>) {
    let Some(first) = namespaces.next() else {
        return;
    };
    if namespaces.all(|namespace| namespace == first) {
        record_namespace(first);
    } else {
        record_namespace("(several)");
    }
}

/// An RPC of the cache service, by its place in [`METHODS`]; `unknown` past its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(usize);

impl Method {
    /// How many methods there are, `unknown` included.
    pub const COUNT: usize = METHODS.len() + 1;

    /// The method a request path calls; `unknown` for a path outside [`METHODS`].
    pub fn of_path(path: &str) -> Method {
        let index = path
            .strip_prefix('/')
            .and_then(|path| path.strip_prefix(SERVICE_NAME))
            .and_then(|path| path.strip_prefix('/'))
            .and_then(|name| METHODS.iter().position(|method| *method == name));
        Method(index.unwrap_or(METHODS.len()))
    }

    /// Its name: the `method` label and span field.
    pub fn name(self) -> &'static str {
        METHODS.get(self.0).copied().unwrap_or("unknown")
    }

    /// Its place, below [`Method::COUNT`].
    pub fn index(self) -> usize {
        self.0
    }
}

fn acceptable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._:/+=-".contains(&b))
}

/// A new random 128-bit id in hex. Only unique, not secret: a fast non-cryptographic
/// generator does.
fn generated_request_id() -> HeaderValue {
    // Sized up front: one allocation, which the header value then takes over.
    let mut id = String::with_capacity(32);
    write!(id, "{:032x}", fastrand::u128(..)).expect("writing to a String cannot fail");
    HeaderValue::try_from(id).expect("hex digits are a valid header value")
}

/// Returns `id` in `response`'s headers when a log line named it (or the caller sent it).
fn return_named<B>(id: &RequestId, response: &mut http::Response<B>) {
    if let Some(id) = id.named() {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
}

/// The cache service (`S`, with its interceptor when tokens are configured) under observation.
/// Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> Observed<S> {
    /// Observes `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Metrics) -> Self {
        Observed { inner, metrics }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for Observed<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Unpin + Send + 'static,
    R: http_body::Body<Data = Bytes, Error = Status> + Unpin + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Observing<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let request_id = RequestId::of(request.headers());
        request.extensions_mut().insert(request_id.clone());
        let method = Method::of_path(request.uri().path());
        // The span's fields are recorded when it is made: the id only when it is on.
        let span = debug_span!(
            "rpc",
            method = method.name(),
            request_id = field::Empty,
            namespace = field::Empty,
        );
        let spanned = !span.is_disabled();
        if !spanned && !self.metrics.is_enabled() {
            // Nothing to record: return the id if something named it, and that is all.
            return Observing(Path::Quick {
                response: self.inner.call(request),
                request_id,
            });
        }
        if spanned {
            span.record("request_id", request_id.get().to_str().unwrap_or_default());
        }
        self.metrics.rpc_started();
        let finish = Finish {
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
            span: span.clone(),
            done: false,
        };
        // The interceptor runs inside `call`: its work belongs to the span too. Entering and
        // instrumenting a disabled span still costs a poll wrapper per RPC, so only when on.
        let response = if spanned {
            span.in_scope(|| self.inner.call(request))
        } else {
            self.inner.call(request)
        };
        let observed = async move {
            let mut response = response.await?;
            return_named(&request_id, &mut response);
            let outcome = response.extensions().get::<Outcome>().copied();
            // A refusal or failure is trailers-only: the status is in the headers.
            if let Some(status) = response.headers().get("grpc-status") {
                finish.done(Code::from_bytes(status.as_bytes()), outcome);
                return Ok(response.map(Body::new));
            }
            if http_body::Body::is_end_stream(response.body()) {
                // No status in the headers and no body to carry one: a broken response.
                finish.done(Code::Unknown, outcome);
                return Ok(response.map(Body::new));
            }
            Ok(response.map(|body| {
                Body::new(ObservedBody {
                    inner: body,
                    finish: Some(finish),
                    outcome,
                })
            }))
        };
        if spanned {
            Observing(Path::Full(Box::pin(observed.instrument(span))))
        } else {
            Observing(Path::Full(Box::pin(observed)))
        }
    }
}

/// The future of an observed RPC. With nothing to record, the inner response polled in place
/// (the generated service's future is boxed already, so a second box per RPC would only cost
/// an allocation and a move), returning the request id if something named it; otherwise the
/// observation's own future.
pub struct Observing<F, E>(Path<F, E>);

/// The observation's own future, when there is something to record.
type Observation<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

enum Path<F, E> {
    /// Nothing to record.
    Quick { response: F, request_id: RequestId },
    /// Metrics or a span to record.
    Full(Observation<E>),
}

impl<F, E> std::fmt::Debug for Observing<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match self.0 {
            Path::Quick { .. } => "Quick",
            Path::Full(_) => "Full",
        };
        f.debug_tuple("Observing").field(&path).finish()
    }
}

impl<F, E, R> Future for Observing<F, E>
where
    F: Future<Output = Result<http::Response<R>, E>> + Unpin,
    R: http_body::Body<Data = Bytes, Error = Status> + Send + 'static,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Path::Quick {
                response,
                request_id,
            } => Pin::new(response).poll(cx).map_ok(|mut response| {
                return_named(request_id, &mut response);
                response.map(Body::new)
            }),
            Path::Full(observed) => observed.as_mut().poll(cx),
        }
    }
}

/// Records an RPC's end once: its status when known, CANCELLED when it is dropped first (the
/// caller went away).
struct Finish {
    metrics: Metrics,
    method: Method,
    started: Instant,
    span: Span,
    done: bool,
}

impl Finish {
    fn done(mut self, code: Code, outcome: Option<Outcome>) {
        self.record(code, outcome);
    }

    fn record(&mut self, code: Code, outcome: Option<Outcome>) {
        self.done = true;
        let elapsed = self.started.elapsed();
        self.metrics.rpc_finished(self.method, code, elapsed);
        debug!(
            parent: &self.span,
            code = code_name(code),
            result = outcome.map(|Outcome(result)| result),
            duration_us = elapsed.as_micros() as u64,
            "rpc finished"
        );
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled, None);
        }
    }
}

/// A response body that finishes the RPC when its trailers (the status) go out.
struct ObservedBody<R> {
    inner: R,
    finish: Option<Finish>,
    outcome: Option<Outcome>,
}

impl<R: http_body::Body<Data = Bytes, Error = Status> + Unpin> http_body::Body for ObservedBody<R> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                trailers
                    .get("grpc-status")
                    .map_or(Code::Unknown, |status| Code::from_bytes(status.as_bytes()))
            }),
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            // A gRPC body that ends without trailers broke the protocol.
            Poll::Ready(None) => Some(Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(finish) = this.finish.take()
        {
            finish.done(code, this.outcome);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The method list is exactly the RPCs the contract declares.
    #[test]
    fn methods_are_the_contracts_rpcs() {
        let proto = include_str!("../proto/cache_money/v1/cache_money.proto");
        let mut declared: Vec<&str> = proto
            .lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .map(|rest| rest.split(['(', ' ']).next().unwrap_or_default())
            .collect();
        let mut methods = METHODS.to_vec();
        declared.sort_unstable();
        methods.sort_unstable();
        assert_eq!(declared, methods);
    }

    /// Paths of the cache service map to their RPC; any other path is `unknown`.
    #[test]
    fn paths_map_to_bounded_methods() {
        let name = |path| Method::of_path(path).name();
        assert_eq!(name("/cache_money.v1.CacheMoney/Get"), "Get");
        assert_eq!(name("/cache_money.v1.CacheMoney/BustAll"), "BustAll");
        assert_eq!(name("/cache_money.v1.CacheMoney/Nope"), "unknown");
        assert_eq!(name("/other.Service/Get"), "unknown");
        assert_eq!(name("Get"), "unknown");
        assert!(Method::of_path("/x").index() < Method::COUNT);
    }

    /// A caller's id is kept, and returned, when it is short and plain; otherwise there is no
    /// id until a log line asks for one, which gets a 32-hex id that is returned from then on.
    #[test]
    fn request_ids_are_kept_or_generated_when_named() {
        let mut headers = HeaderMap::new();
        headers.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_static("req-42_a.b:c/d+e="),
        );
        let id = RequestId::of(&headers);
        let returned = id.named().expect("a caller's id is always returned");
        assert_eq!(returned, "req-42_a.b:c/d+e=");
        assert!(returned.is_sensitive(), "echoed ids are never indexed");
        assert_eq!(id.get(), "req-42_a.b:c/d+e=");
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in ["", "with space", "quote\"", long.as_str()] {
            headers.insert(REQUEST_ID_HEADER, HeaderValue::from_str(bad).unwrap());
            let id = RequestId::of(&headers);
            assert_eq!(id.named(), None, "{bad:?}: nothing named it yet");
            let generated = id.get().clone();
            assert_eq!(generated.len(), 32, "{bad:?}");
            assert!(
                generated.as_bytes().iter().all(u8::is_ascii_hexdigit),
                "{bad:?}"
            );
            assert_eq!(id.named(), Some(generated.clone()), "{bad:?}");
            assert_eq!(id.get(), &generated, "{bad:?}: made once");
        }
        let (a, b) = (RequestId::default(), RequestId::default());
        assert_ne!(a.get(), b.get());
    }

    /// The accessor the service's log lines use is what makes a generated id returned, and
    /// every clone of a request's id (the layer keeps one) sees it.
    #[test]
    fn a_log_line_naming_the_id_returns_it() {
        let id = RequestId::default();
        let mut extensions = Extensions::new();
        extensions.insert(id.clone());
        let mut response = http::Response::new(());
        return_named(&id, &mut response);
        assert!(response.headers().get(REQUEST_ID_HEADER).is_none());
        let logged = request_id(&extensions).to_owned();
        assert_eq!(logged.len(), 32);
        return_named(&id, &mut response);
        assert_eq!(response.headers()[REQUEST_ID_HEADER], logged.as_str());
        assert!(response.headers()[REQUEST_ID_HEADER].is_sensitive());
        assert_eq!(request_id(&Extensions::new()), "");
    }
}
