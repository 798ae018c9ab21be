//! The command line: every subcommand and flag, as clap reads them.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::input::{parse_duration, parse_ttl};

/// Where the CLI looks for the service unless told otherwise: the server's default address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";
/// The environment variable holding the bearer token.
pub const TOKEN_ENV: &str = "CACHE_MONEY_TOKEN";
/// Entries asked for per `Keys` page unless `--limit` says otherwise (the server's default).
pub const DEFAULT_KEYS_LIMIT: u32 = 100;
/// The TTL of `put` without `--ttl`: the client library's default, an hour.
pub const DEFAULT_PUT_TTL: &str = "1h";

const PUT_USAGE: &str = concat!(
    "cache-money put [OPTIONS] <NAMESPACE> <FUNCTION> <ARGS> <VALUE>\n",
    "       cache-money put [OPTIONS] --digest <HEX> <NAMESPACE> <FUNCTION> <VALUE>",
);

const EXIT_CODES: &str = "\
Exit codes: 0 done; 1 the call failed (the gRPC status and the server's message are printed),
the server could not be reached or did not answer within --timeout (a bust cut off by
--timeout is cancelled part way: some entries may already be gone), health is not SERVING, or
bust-all was not confirmed with \"yes\" on the terminal (nothing removed); 2 usage (a bad flag,
argument, name, digest, TTL or value; bust-all without --yes when standard input is not a
terminal); 3 get found no entry.

Token: set CACHE_MONEY_TOKEN or pass --token-file. There is no --token flag on purpose: a
command line is visible to every user of the machine (ps, /proc).";

/// `cache-money`: look at and administer a cache-money service.
#[derive(Debug, Parser)]
#[command(
    name = "cache-money",
    version,
    about = "Look at and administer a cache-money service: find, read, write and bust entries.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// How to reach the service.
    #[command(flatten)]
    pub connection: Connection,

    /// `table` for people, `json` for scripts (one JSON document per command).
    #[arg(
        long,
        short,
        global = true,
        value_enum,
        env = "CACHE_MONEY_OUTPUT",
        default_value = "table"
    )]
    pub output: Output,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the service and prove who is calling.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The service's URL: http://host:port, or https://host:port for TLS.
    #[arg(long, global = true, env = "CACHE_MONEY_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,

    /// A file holding the bearer token (surrounding whitespace is ignored). Without it the
    /// token comes from CACHE_MONEY_TOKEN; there is no --token flag, since a command line is
    /// visible to every user of the machine.
    #[arg(
        long,
        global = true,
        env = "CACHE_MONEY_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub token_file: Option<PathBuf>,

    /// PEM CA certificate(s) to verify an https:// server with, instead of the system's
    /// trust store.
    #[arg(long, global = true, env = "CACHE_MONEY_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// Bound on connecting and on each call, e.g. 500ms, 10s, 2m [default: 5s; busts 60s].
    #[arg(long, global = true, env = "CACHE_MONEY_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Table,
    /// One JSON document per command, for scripts.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The digest of a call's arguments (no server needed).
    ///
    /// As every cache-money client computes it: md5 of the arguments' canonical JSON
    /// (RFC 8785).
    Digest {
        /// The call's whole argument list as a JSON array: '[3, 4]' for addition(3, 4),
        /// '[]' for no arguments, '[[1, 2]]' for one list argument.
        args: String,
    },
    /// The subcommands that call the service.
    #[command(flatten)]
    Service(ServiceCommand),
}

/// The subcommands that call the service.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Reads one entry (exits 3 when there is none).
    ///
    /// Values print as JSON when they are JSON, else as base64.
    Get(EntryArgs),
    /// Stores one entry.
    ///
    /// VALUE is JSON text, stored as those bytes, as the Rust client's memoize stores results
    /// ('7', '"text"', '{"a": 1}'); with --base64, VALUE is base64 of any bytes.
    #[command(override_usage = PUT_USAGE)]
    Put(PutArgs),
    /// Removes one entry.
    Bust(EntryArgs),
    /// Removes every entry of one function.
    BustFunction(FunctionArgs),
    /// Removes every entry of one namespace.
    BustNamespace {
        /// The namespace (the caller's module, e.g. billing.invoices).
        namespace: String,
    },
    /// Removes every entry of one namespace written with one tag, whatever its function.
    BustTag {
        /// The namespace (the caller's module, e.g. billing.invoices).
        namespace: String,
        /// The tag, exactly as it was written (e.g. user:7).
        tag: String,
    },
    /// Removes every entry cache-money stored (asks first, or needs --yes).
    ///
    /// On a terminal it asks for confirmation, naming the server; any answer but "yes" exits 1
    /// with nothing removed. With standard input not a terminal it refuses (exit 2) unless
    /// given --yes.
    BustAll {
        /// Do not ask: remove everything.
        #[arg(long)]
        yes: bool,
    },
    /// Lists one function's entries and the time each has left, a page at a time.
    Keys(KeysArgs),
    /// The server's counters since it started, and its store's state.
    Stats,
    /// Exits 0 only when the service is SERVING (a container healthcheck).
    ///
    /// Asks the gRPC health service (grpc.health.v1.Health/Check) about
    /// cache_money.v1.CacheMoney, which is NOT_SERVING while its store is unreachable.
    Health,
}

/// One function: its namespace and name.
#[derive(Debug, Clone, Args)]
pub struct FunctionArgs {
    /// The namespace (the caller's module, e.g. billing.invoices; a::b is written a.b).
    pub namespace: String,
    /// The function's name.
    pub function: String,
}

/// One entry: a function and a call's arguments, or its digest.
#[derive(Debug, Clone, Args)]
pub struct EntryArgs {
    /// The function.
    #[command(flatten)]
    pub function: FunctionArgs,
    /// The call's whole argument list as a JSON array, e.g. '[3, 4]'.
    #[arg(required_unless_present = "digest")]
    pub args: Option<String>,
    /// The entry's digest (32 lowercase hex characters) instead of ARGS.
    #[arg(long, conflicts_with = "args", value_name = "HEX")]
    pub digest: Option<String>,
}

/// What `put` stores, and for how long.
#[derive(Debug, Clone, Args)]
pub struct PutArgs {
    /// The function.
    #[command(flatten)]
    pub function: FunctionArgs,
    /// The call's argument list as a JSON array, then the value: `ARGS VALUE`, or `VALUE`
    /// alone with --digest. VALUE `-` reads it from standard input (for values longer than a
    /// command line takes).
    #[arg(value_names = ["ARGS", "VALUE"], num_args = 1..=2, required = true)]
    pub args_and_value: Vec<String>,
    /// The entry's digest (32 lowercase hex characters) instead of ARGS.
    #[arg(long, value_name = "HEX")]
    pub digest: Option<String>,
    /// How long the entry lives: seconds, or 30s, 15m, 1h, 7d.
    #[arg(long, default_value = DEFAULT_PUT_TTL, value_parser = parse_ttl)]
    pub ttl: u32,
    /// VALUE is base64 of the bytes to store (for binary values).
    #[arg(long)]
    pub base64: bool,
    /// A tag to bust the entry by with bust-tag (repeat for several), e.g. --tag user:7.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
}

/// Which page of a function's entries to list.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// The function.
    #[command(flatten)]
    pub function: FunctionArgs,
    /// Entries to aim for per page (at most the server's maximum, 1000 by default).
    #[arg(long, default_value_t = DEFAULT_KEYS_LIMIT)]
    pub limit: u32,
    /// Where to go on: the cursor printed with the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Every page, not only the first.
    #[arg(long)]
    pub all: bool,
}
