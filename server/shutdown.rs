//! Shutdown signals: the first SIGTERM or Ctrl-C starts a graceful drain; a second one ends the
//! process at once, for an operator who will not wait.

use tokio::signal::unix::{Signal, SignalKind, signal as listen};
use tracing::{error, info};

/// Completes on the first SIGTERM or SIGINT (Ctrl-C). From then on, another of either exits
/// the process with status 1.
///
/// # Panics
/// When the signal handlers cannot be installed, which only happens outside a Tokio runtime
/// with signal support.
pub async fn signal() {
    // Installing fails only without a runtime's signal driver, which main always provides.
    let mut terminate = listen(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = listen(SignalKind::interrupt()).expect("SIGINT handler installs");
    let first = next(&mut terminate, &mut interrupt).await;
    info!(signal = first, "shutdown requested");
    // The same streams keep listening, so a second signal sent right after the first is not
    // lost between two handlers.
    tokio::spawn(async move {
        let second = next(&mut terminate, &mut interrupt).await;
        error!(
            signal = second,
            "second shutdown signal: exiting without waiting for in-flight RPCs"
        );
        std::process::exit(1);
    });
}

async fn next(terminate: &mut Signal, interrupt: &mut Signal) -> &'static str {
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}
