//! Service URLs, how one becomes a tonic [`Channel`] (for `https://`, several replicas, or a
//! caller sharing the connection with other services), and how a transport failure is put
//! into words. A client of one `http://` URL uses the direct transport instead
//! (`client/transport.rs`), with the same settings.
//!
//! The channel is tonic's, configured for a cache that must notice a dead peer quickly:
//! - HTTP/2 keepalive PINGs, also while idle, so a half-open connection (server host gone,
//!   flow dropped by a firewall, process frozen) is closed after at most
//!   [`ClientOptions::keepalive_interval`] + [`ClientOptions::keepalive_timeout`], and the
//!   next call opens a new one;
//! - a bound on opening a connection ([`ClientOptions::connect_timeout`]);
//! - `TCP_NODELAY`, since every call is a small request waiting for a small answer;
//! - TLS for `https://` (feature `tls`): the system's trust store, or
//!   [`ClientOptions::tls_ca`].
//!
//! No call is ever sent twice. A call that may have reached the server (a bust that ran, a
//! put that landed before a later bust) is reported as failed, never replayed.

use std::{error::Error as _, fmt::Write as _, net::SocketAddr};

use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

use crate::{ClientOptions, Error};

/// A lazily connecting channel to `url` (`http://host:port` or `https://host:port`) with the
/// options' connection settings, as [`Client::connect_with`](crate::Client::connect_with) uses
/// for `https://` (for `http://` it connects directly: the channel PINGs after
/// `keepalive_interval` without a frame from the server rather than every interval). Made separately,
/// one connection can carry the cache service (through
/// [`Client::from_channel_with`](crate::Client::from_channel_with)) and the server's other
/// services, such as gRPC health.
///
/// # Errors
/// [`Error::InvalidUrl`] when the URL is not an `http://` or `https://` address with a host,
/// or asks for TLS in a build without the `tls` feature.
pub fn channel(url: &str, options: &ClientOptions) -> Result<Channel, Error> {
    Ok(Target::parse(url)?.endpoint(options)?.connect_lazy())
}

/// A service URL checked for use: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    url: String,
    uri: http::Uri,
    secure: bool,
}

impl Target {
    /// Checks `url`.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when it is not an `http://` or `https://` address with a host.
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let invalid = |why: &str| Error::InvalidUrl(format!("{url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|err| invalid(&format!("{err}")))?;
        let secure = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(invalid(
                    "give the service's address as http://host:port (or https://host:port)",
                ));
            }
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid(
                "the URL needs a host, as in http://127.0.0.1:50051",
            ));
        }
        Ok(Target {
            url: url.to_owned(),
            uri,
            secure,
        })
    }

    /// The URL's `host:port` (the port as given, if given), as requests name it.
    pub(crate) fn authority(&self) -> http::uri::Authority {
        self.uri
            .authority()
            .cloned()
            .expect("a parsed target has a host")
    }

    /// The URL as given.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether the URL asks for TLS (`https://`).
    pub(crate) fn is_secure(&self) -> bool {
        self.secure
    }

    /// The host and port to look up, the port defaulting to the scheme's.
    pub(crate) fn host_port(&self) -> (String, u16) {
        let host = self.uri.host().unwrap_or_default();
        // An IPv6 literal keeps its brackets in the URI; the resolver wants the address alone.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if self.secure { 443 } else { 80 });
        (host, port)
    }

    /// The service's endpoint, dialled by its URL (a name is resolved by each new connection).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] when TLS is asked for and cannot be set up.
    pub(crate) fn endpoint(&self, options: &ClientOptions) -> Result<Endpoint, Error> {
        self.configure(Endpoint::from(self.uri.clone()), None, options)
    }

    /// The same service dialled at `addr`, one of the addresses its name resolves to: requests
    /// still name the URL's host (`:authority`), and TLS verifies the certificate against it.
    ///
    /// # Errors
    /// As [`Target::endpoint`].
    pub(crate) fn endpoint_at(
        &self,
        addr: SocketAddr,
        options: &ClientOptions,
    ) -> Result<Endpoint, Error> {
        let scheme = if self.secure { "https" } else { "http" };
        let dialled: http::Uri = format!("{scheme}://{addr}")
            .parse()
            .map_err(|err| Error::InvalidUrl(format!("{:?} at {addr}: {err}", self.url)))?;
        let endpoint = Endpoint::from(dialled).origin(self.uri.clone());
        let host = self.host_port().0;
        self.configure(endpoint, Some(&host), options)
    }

    /// Applies the connection settings every channel of the client shares: keepalive while
    /// idle, the connect timeout, `TCP_NODELAY`, and TLS for `https://` (verified against
    /// `tls_name` when given, else the URL's host).
    fn configure(
        &self,
        endpoint: Endpoint,
        tls_name: Option<&str>,
        options: &ClientOptions,
    ) -> Result<Endpoint, Error> {
        let endpoint = endpoint
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(true);
        if !self.secure {
            return Ok(endpoint);
        }
        with_tls(endpoint, tls_name, options)
            .map_err(|why| Error::InvalidUrl(format!("{:?}: {why}", self.url)))
    }
}

#[cfg(feature = "tls")]
fn with_tls(
    endpoint: Endpoint,
    tls_name: Option<&str>,
    options: &ClientOptions,
) -> Result<Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig};
    let tls = match &options.tls_ca {
        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    let tls = match tls_name {
        Some(name) => tls.domain_name(name),
        None => tls,
    };
    endpoint
        .tls_config(tls)
        .map_err(|err| format!("TLS settings: {}", chain(&err)))
}

#[cfg(not(feature = "tls"))]
fn with_tls(_: Endpoint, _: Option<&str>, _: &ClientOptions) -> Result<Endpoint, String> {
    Err("https:// needs cache-money's `tls` feature, which this build leaves out".into())
}

/// An error and every cause under it, `outer: inner: innermost`, skipping a cause that only
/// repeats the text before it (tonic and hyper often wrap an error in one that says the same).
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        let text = err.to_string();
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        cause = err.source();
    }
    out
}

/// A status in words a person can act on: its code, its message and, for a transport
/// failure, the causes underneath (`tcp connect error: Connection refused`, `invalid peer
/// certificate: UnknownIssuer`), which tonic keeps out of the message.
pub fn describe(status: &Status) -> String {
    let code = status.code();
    let message = status.message();
    let mut out = match status.source().map(chain) {
        // tonic copies the innermost cause into the message; the chain says it in context.
        Some(causes) if causes.contains(message) => format!("{code:?}: {causes}"),
        // The direct transport's messages already say their cause.
        Some(causes) if message.contains(&causes) => format!("{code:?}: {message}"),
        Some(causes) => format!("{code:?}: {message}: {causes}"),
        None => format!("{code:?}: {message}"),
    };
    // rustls's words for a peer that answered the TLS handshake in plaintext.
    if out.contains("InvalidContentType") {
        out.push_str(
            " (the server does not speak TLS: use http:// for it, or start it with --tls-cert)",
        );
    }
    out
}
