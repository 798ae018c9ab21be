//! Each subcommand: what it asks of the service, within what bound, and what it reports.

use std::{
    future::Future,
    io::{BufRead, Write},
    time::Duration,
};

use cache_money::{
    Client, ClientOptions, DEFAULT_BUST_DEADLINE, RawClient,
    key::EntryKey,
    pb::{
        BustAllRequest, BustFunctionRequest, BustNamespaceRequest, BustRequest, BustTagRequest,
        GetRequest, KeysRequest, PutRequest, StatsRequest,
    },
};
use tonic::{Response, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    args::{Command, Connection, KeysArgs, PutArgs, ServiceCommand, TOKEN_ENV},
    error::CliError,
    input::{self, digest_args, entry_key, function_key, value_bytes, value_text},
    report::{CACHE_SERVICE, Report, Scope},
};

/// Bound on connecting and on each call, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a bust unless `--timeout` says otherwise: a large bust walks the keyspace for
/// seconds, as the client library allows for.
pub const DEFAULT_BUST_TIMEOUT: Duration = DEFAULT_BUST_DEADLINE;
/// What `bust-all` asks on a terminal, naming the `server` it would empty, so an operator
/// whose `CACHE_MONEY_SERVER` points at production sees it before typing "yes".
pub fn bust_all_prompt(server: &str) -> String {
    format!("Type \"yes\" to remove every entry cache-money at {server} stored: ")
}

/// Runs `command`. `confirm` is asked before `bust-all` without `--yes`, with the server's
/// URL.
///
/// # Errors
/// A usage error, or the call's failure.
pub async fn run(
    connection: &Connection,
    command: Command,
    confirm: impl FnOnce(&str) -> Result<(), CliError>,
) -> Result<Report, CliError> {
    match command {
        // Needs no server: anyone can find an entry's digest.
        Command::Digest { args } => Ok(Report::Digest(digest_args(&args)?)),
        Command::Service(command) => {
            if let ServiceCommand::BustAll { yes: false } = command {
                confirm(&connection.server)?;
            }
            Service::connect(connection)?.run(command).await
        }
    }
}

/// Asks the operator to confirm `bust-all` of `server`: on a terminal, prints
/// [`bust_all_prompt`] to `prompt` and reads one line; anywhere else, refuses at once rather
/// than wait for input nobody will type.
///
/// # Errors
/// [`CliError::Usage`] when `input` is not a terminal, [`CliError::NotConfirmed`] when the
/// answer is not `yes`.
pub fn confirm_bust_all(
    server: &str,
    is_terminal: bool,
    mut input: impl BufRead,
    mut prompt: impl Write,
) -> Result<(), CliError> {
    if !is_terminal {
        return Err(CliError::Usage(format!(
            "bust-all: standard input is not a terminal, so nobody can confirm; pass --yes to \
             remove every entry cache-money at {server} stored"
        )));
    }
    // A prompt that cannot be shown or an answer that cannot be read is not a "yes".
    let _ = write!(prompt, "{}", bust_all_prompt(server));
    let _ = prompt.flush();
    let mut answer = String::new();
    match input.read_line(&mut answer) {
        Ok(_) if answer.trim() == "yes" => Ok(()),
        _ => Err(CliError::NotConfirmed),
    }
}

/// A connection to the service: the cache service through the client library, and the
/// health service, over one channel.
#[derive(Debug)]
struct Service {
    client: Client,
    channel: Channel,
    server: String,
    timeout: Option<Duration>,
}

impl Service {
    fn connect(connection: &Connection) -> Result<Self, CliError> {
        let token = input::token(
            connection.token_file.as_deref(),
            std::env::var(TOKEN_ENV).ok(),
        )?;
        let options = ClientOptions {
            token,
            tls_ca: input::tls_ca(connection.tls_ca.as_ref())?,
            connect_timeout: connection.timeout.unwrap_or(DEFAULT_TIMEOUT),
            ..ClientOptions::default()
        };
        let channel = cache_money::channel(&connection.server, &options)
            .map_err(|err| CliError::Usage(format!("--server: {err}")))?;
        let client = Client::from_channel_with(channel.clone(), options).map_err(|err| {
            CliError::Usage(format!("the token ({TOKEN_ENV}, --token-file): {err}"))
        })?;
        Ok(Service {
            client,
            channel,
            server: connection.server.clone(),
            timeout: connection.timeout,
        })
    }

    /// Awaits one bust within `--timeout`, or [`DEFAULT_BUST_TIMEOUT`] without it. A bust
    /// that runs out of time is cancelled, not undone: the error says entries may be gone.
    async fn bust<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match self.call(DEFAULT_BUST_TIMEOUT, call).await {
            Err(CliError::Timeout { after, server }) => {
                Err(CliError::BustCancelled { after, server })
            }
            other => other,
        }
    }

    /// Awaits one call within `--timeout`, or `default` without it.
    async fn call<T>(
        &self,
        default: Duration,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, CliError> {
        let after = self.timeout.unwrap_or(default);
        match tokio::time::timeout(after, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(CliError::Rpc {
                status,
                server: self.server.clone(),
            }),
            Err(_) => Err(CliError::Timeout {
                after,
                server: self.server.clone(),
            }),
        }
    }

    async fn run(&self, command: ServiceCommand) -> Result<Report, CliError> {
        let mut rpc = self.client.raw();
        match command {
            ServiceCommand::Get(entry) => {
                let key = entry.key()?;
                let request = GetRequest {
                    key: Some(wire(&key)),
                    ..Default::default()
                };
                let reply = self.call(DEFAULT_TIMEOUT, rpc.get(request)).await?;
                let value = reply.hit.then_some(reply.value);
                Ok(Report::Entry { key, value })
            }
            ServiceCommand::Put(put) => self.put(&mut rpc, put).await,
            ServiceCommand::Bust(entry) => {
                let key = entry.key()?;
                let request = BustRequest {
                    key: Some(wire(&key)),
                };
                let reply = self.bust(rpc.bust(request));
                Ok(Report::Removed {
                    removed: reply.await?.removed,
                    scope: Scope::Entry(key),
                })
            }
            ServiceCommand::BustFunction(function) => {
                let function = function_key(&function)?;
                let request = BustFunctionRequest {
                    namespace: function.namespace().to_owned(),
                    function: function.function().to_owned(),
                };
                let reply = self.bust(rpc.bust_function(request));
                Ok(Report::Removed {
                    removed: reply.await?.removed,
                    scope: Scope::Function(function),
                })
            }
            ServiceCommand::BustNamespace { namespace } => {
                let namespace = namespace.replace("::", ".");
                cache_money::key::check_name("namespace", &namespace)
                    .map_err(|err| CliError::Usage(err.to_string()))?;
                let request = BustNamespaceRequest {
                    namespace: namespace.clone(),
                };
                let reply = self.bust(rpc.bust_namespace(request));
                Ok(Report::Removed {
                    removed: reply.await?.removed,
                    scope: Scope::Namespace(namespace),
                })
            }
            ServiceCommand::BustTag { namespace, tag } => {
                let namespace = namespace.replace("::", ".");
                cache_money::key::check_name("namespace", &namespace)
                    .map_err(|err| CliError::Usage(err.to_string()))?;
                let request = BustTagRequest {
                    namespace: namespace.clone(),
                    tag: tag.clone(),
                };
                let reply = self.bust(rpc.bust_tag(request));
                Ok(Report::Removed {
                    removed: reply.await?.removed,
                    scope: Scope::Tag { namespace, tag },
                })
            }
            ServiceCommand::Keys(keys) => self.keys(&mut rpc, keys).await,
            ServiceCommand::Stats => {
                let stats = self
                    .call(DEFAULT_TIMEOUT, rpc.stats(StatsRequest {}))
                    .await?;
                Ok(Report::Stats(stats))
            }
            ServiceCommand::Health => {
                let mut health = HealthClient::new(self.channel.clone());
                let request = HealthCheckRequest {
                    service: CACHE_SERVICE.to_owned(),
                };
                let reply = self.call(DEFAULT_TIMEOUT, health.check(request)).await?;
                let status =
                    ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown);
                Ok(Report::Health(status))
            }
            ServiceCommand::BustAll { .. } => {
                let reply = self.bust(rpc.bust_all(BustAllRequest {}));
                Ok(Report::Removed {
                    removed: reply.await?.removed,
                    scope: Scope::All,
                })
            }
        }
    }

    async fn put(&self, rpc: &mut RawClient, put: PutArgs) -> Result<Report, CliError> {
        let (args, value) = match (put.digest.is_some(), put.args_and_value.as_slice()) {
            (false, [args, value]) => (Some(args.as_str()), value),
            (true, [value]) => (None, value),
            _ => {
                return Err(CliError::Usage(
                    "put: give ARGS and VALUE, or VALUE alone with --digest".to_owned(),
                ));
            }
        };
        let key = entry_key(&put.function, args, put.digest.as_deref())?;
        let request = PutRequest {
            key: Some(wire(&key)),
            value: value_bytes(&value_text(value, std::io::stdin())?, put.base64)?,
            ttl_seconds: put.ttl,
            tags: put.tags,
            ..Default::default()
        };
        self.call(DEFAULT_TIMEOUT, rpc.put(request)).await?;
        Ok(Report::Stored {
            key,
            ttl_seconds: put.ttl,
        })
    }

    /// One page, or with `--all` every page from the cursor on.
    async fn keys(&self, rpc: &mut RawClient, keys: KeysArgs) -> Result<Report, CliError> {
        let function = function_key(&keys.function)?;
        let mut cursor = keys.cursor.unwrap_or_default();
        let mut entries = Vec::new();
        loop {
            let request = KeysRequest {
                namespace: function.namespace().to_owned(),
                function: function.function().to_owned(),
                cursor,
                limit: keys.limit,
            };
            let page = self.call(DEFAULT_TIMEOUT, rpc.keys(request)).await?;
            entries.extend(page.entries);
            cursor = page.next_cursor;
            if !keys.all || cursor.is_empty() {
                break;
            }
        }
        Ok(Report::Keys {
            function,
            entries,
            next_cursor: cursor,
        })
    }
}

/// The key as the protocol carries it.
fn wire(key: &EntryKey) -> cache_money::pb::Key {
    cache_money::pb::Key {
        namespace: key.namespace().to_owned(),
        function: key.function().to_owned(),
        digest: key.digest().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "https://cache.prod.example:50051";

    /// Without a terminal bust-all is refused at once, never waiting on input.
    #[test]
    fn bust_all_needs_a_terminal_or_yes() {
        let mut prompt = Vec::new();
        let err = confirm_bust_all(SERVER, false, &b"yes\n"[..], &mut prompt).unwrap_err();
        assert!(
            matches!(&err, CliError::Usage(message) if message.contains("--yes") && message.contains(SERVER)),
            "{err}"
        );
        assert!(prompt.is_empty(), "nothing is asked when nobody can answer");
    }

    /// On a terminal only the answer "yes" goes ahead; the prompt says what is at stake,
    /// naming the server that would be emptied.
    #[test]
    fn bust_all_asks_on_a_terminal() {
        let mut prompt = Vec::new();
        assert!(confirm_bust_all(SERVER, true, &b"yes\n"[..], &mut prompt).is_ok());
        assert_eq!(
            String::from_utf8(prompt).unwrap(),
            format!("Type \"yes\" to remove every entry cache-money at {SERVER} stored: ")
        );
        for answer in ["no\n", "y\n", "", "YES please\n"] {
            let refused = confirm_bust_all(SERVER, true, answer.as_bytes(), Vec::new());
            assert!(matches!(refused, Err(CliError::NotConfirmed)), "{answer:?}");
        }
    }
}
