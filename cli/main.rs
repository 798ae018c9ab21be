//! `cache-money`: the operators' command line. Parses the command, runs it against the service
//! on a single-threaded runtime, prints the report (or the error) and exits with its code.
//!
//! # Layout
//! - `args`: the subcommands and flags.
//! - `input`: what was typed, turned into keys, values, durations, the token and the CA.
//! - `command`: each subcommand's calls, each within a bound.
//! - `report`: what a command found, printed as a table or as JSON.
//! - `error`: why a command failed, and the exit codes.

mod args;
mod command;
mod error;
mod input;
mod report;

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use clap::Parser;
use serde_json::json;

use crate::{
    args::{Cli, Output},
    error::{CliError, EXIT_FAILED},
};

fn main() -> ExitCode {
    let Cli {
        connection,
        output,
        command,
    } = Cli::parse();
    let confirm = |server: &str| {
        let stdin = std::io::stdin();
        command::confirm_bust_all(server, stdin.is_terminal(), stdin.lock(), std::io::stderr())
    };
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command::run(&connection, command, confirm)),
        Err(err) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {err}"
            );
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let (printed, code) = match &outcome {
        Ok(report) => match output {
            Output::Table => (report.table(), report.exit_code()),
            Output::Json => (report.json(), report.exit_code()),
        },
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err}");
            match output {
                Output::Table => (String::new(), err.exit_code()),
                Output::Json => (error_json(err), err.exit_code()),
            }
        }
    };
    if !printed.is_empty() {
        // A closed pipe (`| head`) is the reader's choice, not a failure worth a panic.
        let _ = writeln!(std::io::stdout().lock(), "{printed}");
    }
    ExitCode::from(code)
}

/// A failure as the JSON document a script reads: `{"error": {"code", "message"}}`.
fn error_json(err: &CliError) -> String {
    report::to_json(&json!({"error": {"code": err.code(), "message": err.to_string()}}))
}
