//! Shutdown signals: the first SIGTERM or Ctrl-C starts a graceful drain; a second one ends the
//! process at once, for an operator who will not wait.

use tracing::{error, info};

/// Completes on the first SIGTERM or SIGINT (Ctrl-C). From then on, another of either exits
/// the process with status 1.
///
/// # Panics
/// When the signal handlers cannot be installed, which only happens outside a Tokio runtime
/// with signal support.
pub async fn signal() {
    first_of_sigterm_or_ctrl_c().await;
    tokio::spawn(async {
        first_of_sigterm_or_ctrl_c().await;
        error!("second shutdown signal: exiting without waiting for in-flight RPCs");
        std::process::exit(1);
    });
}

async fn first_of_sigterm_or_ctrl_c() {
    use tokio::signal::unix::{SignalKind, signal};
    // Installing a handler fails only without a runtime's signal driver, which main provides.
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = terminate.recv() => info!(signal = "SIGTERM", "shutdown requested"),
        _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutdown requested"),
    }
}
