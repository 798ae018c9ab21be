//! Why a command failed, and the exit code each failure gets.

use std::{error::Error as _, fmt, time::Duration};

use cache_money::describe_status;
use tonic::{Code, Status};

/// A command that could not be done.
#[derive(Debug)]
pub enum CliError {
    /// A flag or argument breaks its rule, or the command needs something it was not given.
    Usage(String),
    /// The service refused or failed the call, or could not be reached at `server`.
    Rpc {
        /// What the call ended with.
        status: Status,
        /// The URL the CLI called.
        server: String,
    },
    /// The service did not answer within the bound.
    Timeout {
        /// The bound that passed.
        after: Duration,
        /// The URL the CLI called.
        server: String,
    },
    /// A bust the service did not finish within the bound, so the CLI cancelled it; the
    /// service may have removed some of its entries already.
    BustCancelled {
        /// The bound that passed.
        after: Duration,
        /// The URL the CLI called.
        server: String,
    },
    /// The operator did not confirm `bust-all`.
    NotConfirmed,
}

/// Exit code of a command that was done.
pub const EXIT_OK: u8 = 0;
/// Exit code of a failed call, an unreachable or silent server, a bust cancelled at
/// `--timeout`, a health that is not SERVING, or a `bust-all` the operator did not confirm on
/// the terminal.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a usage error, as clap uses for its own.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of `get` when there is no entry.
pub const EXIT_MISS: u8 = 3;

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Rpc { .. }
            | CliError::Timeout { .. }
            | CliError::BustCancelled { .. }
            | CliError::NotConfirmed => EXIT_FAILED,
        }
    }

    /// A short name for scripts: the gRPC code's name for a failed call.
    pub fn code(&self) -> String {
        match self {
            CliError::Usage(_) => "Usage".to_owned(),
            CliError::Rpc { status, .. } => format!("{:?}", status.code()),
            CliError::Timeout { .. } | CliError::BustCancelled { .. } => {
                format!("{:?}", Code::DeadlineExceeded)
            }
            CliError::NotConfirmed => "NotConfirmed".to_owned(),
        }
    }
}

/// A failure the client saw on its side (no connection, TLS refused) rather than a status
/// the server sent: tonic attaches the transport error as the status's source.
fn unreachable(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.source().is_some()
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(message) => write!(f, "{message}"),
            CliError::Rpc { status, server } if unreachable(status) => write!(
                f,
                "cannot reach cache-money at {server} (--server, CACHE_MONEY_SERVER): {}",
                describe_status(status)
            ),
            CliError::Rpc { status, .. } => {
                write!(f, "cache-money answered {}", describe_status(status))
            }
            CliError::Timeout { after, server } => write!(
                f,
                "cache-money at {server} did not answer within {} (--timeout)",
                humantime::format_duration(*after)
            ),
            // The call was dropped, not undone: the service removes in batches, and the ones
            // done before the cancel stay done.
            CliError::BustCancelled { after, server } => write!(
                f,
                "bust cancelled after {} (--timeout) waiting for cache-money at {server}; some \
                 entries may already have been removed",
                humantime::format_duration(*after)
            ),
            CliError::NotConfirmed => write!(f, "bust-all: not confirmed; nothing was removed"),
        }
    }
}

impl std::error::Error for CliError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status the server sent is shown with its code and message, as the issue asks.
    #[test]
    fn server_refusals_show_code_and_message() {
        let err = CliError::Rpc {
            status: Status::permission_denied("token \"ops\" may not bust all"),
            server: "http://h:1".into(),
        };
        assert_eq!(
            err.to_string(),
            "cache-money answered PermissionDenied: token \"ops\" may not bust all"
        );
        assert_eq!(err.code(), "PermissionDenied");
        assert_eq!(err.exit_code(), EXIT_FAILED);
    }

    /// Usage errors exit 2, like clap's own.
    #[test]
    fn usage_exits_two() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
    }
}
