//! The client's error type.

use std::{fmt, time::Duration};

use crate::{canonical::ArgsError, connect::describe, key::KeyError};

/// What can go wrong in the client. `memoize` fails only on [`Error::Args`] (a call that
/// cannot be keyed); a cache that is down or slow is never an error there (fail-open). Busts
/// report every failure, since a bust that silently failed would serve stale data.
#[derive(Debug)]
pub enum Error {
    /// The service URL cannot be used.
    InvalidUrl(String),
    /// The token has characters that cannot travel in gRPC metadata.
    InvalidToken,
    /// A namespace or function name breaks the naming rule.
    InvalidName(KeyError),
    /// A TTL outside what the service accepts.
    InvalidTtl(String),
    /// A [`ClientOptions`](crate::ClientOptions) field out of its range.
    InvalidOption(String),
    /// The arguments cannot make a canonical key.
    Args(ArgsError),
    /// The service answered a bust with an error status.
    Rpc(tonic::Status),
    /// The service did not answer a bust within the bust deadline.
    Timeout(Duration),
    /// A `#[memoize]` function's bust without a client: none was [`install`](crate::install)ed.
    NotInstalled,
    /// [`install`](crate::install) was called a second time; the first client stays.
    AlreadyInstalled,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(message) => write!(f, "cache-money url: {message}"),
            Error::InvalidToken => write!(f, "token: must be printable ASCII without spaces"),
            Error::InvalidName(err) => write!(f, "{err}"),
            Error::InvalidTtl(message) => write!(f, "ttl: {message}"),
            Error::InvalidOption(message) => write!(f, "client options: {message}"),
            Error::Args(err) => write!(f, "{err}"),
            Error::Rpc(status) => write!(f, "cache-money answered {}", describe(status)),
            Error::Timeout(after) => {
                write!(
                    f,
                    "cache-money did not answer within {} ms",
                    after.as_millis()
                )
            }
            Error::NotInstalled => write!(
                f,
                "no cache-money client is installed: call cache_money::install(client) at \
                 start-up, or name one with #[memoize(client = …)]"
            ),
            Error::AlreadyInstalled => write!(
                f,
                "a cache-money client is installed already: install it once, at start-up"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::InvalidName(err) => Some(err),
            Error::Args(err) => Some(err),
            Error::Rpc(status) => Some(status),
            Error::InvalidUrl(_)
            | Error::InvalidToken
            | Error::InvalidTtl(_)
            | Error::InvalidOption(_)
            | Error::Timeout(_)
            | Error::NotInstalled
            | Error::AlreadyInstalled => None,
        }
    }
}

impl From<ArgsError> for Error {
    fn from(err: ArgsError) -> Self {
        Error::Args(err)
    }
}

impl From<KeyError> for Error {
    fn from(err: KeyError) -> Self {
        Error::InvalidName(err)
    }
}
