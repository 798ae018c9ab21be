//! What the operator typed, turned into what the service takes: keys from JSON arguments or a
//! digest, values, durations, the token and the CA. Each error names the argument or flag.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use cache_money::{
    canonical::{args_value, canonical_text, digest_of},
    key::{EntryKey, FunctionKey, check_digest},
};
use serde_json::{Value, value::RawValue};

use crate::{
    args::{EntryArgs, FunctionArgs},
    error::CliError,
};

/// A call's key as the spec computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// The canonical JSON (RFC 8785) of the argument list.
    pub canonical: String,
    /// md5 of `canonical`, 32 lowercase hex characters.
    pub digest: String,
}

/// The digest of `args`, the JSON text of a call's whole argument list.
///
/// # Errors
/// [`CliError::Usage`] when the text is not JSON, not an array, or holds what the key spec
/// refuses (integers beyond ±(2^53 − 1)).
pub fn digest_args(args: &str) -> Result<Digest, CliError> {
    let list: Value = serde_json::from_str(args).map_err(|err| {
        CliError::Usage(format!(
            "ARGS: not JSON ({err}); give the argument list as a JSON array, e.g. '[3, 4]'"
        ))
    })?;
    if !list.is_array() {
        return Err(CliError::Usage(format!(
            "ARGS: must be a JSON array holding the call's arguments, e.g. '[3, 4]' or '[\"x\"]', \
             got {}",
            canonical_text(&list)
        )));
    }
    // Checked as a value the client library would key, so the CLI refuses exactly what the
    // spec refuses; the digest is of the list itself, which is the argument list.
    args_value(&list).map_err(|err| CliError::Usage(format!("ARGS: {err}")))?;
    Ok(Digest {
        canonical: canonical_text(&list),
        digest: digest_of(&list),
    })
}

/// The function named on the command line, with a Rust module path's `::` written as `.`,
/// as the client library does.
///
/// # Errors
/// [`CliError::Usage`] when a name breaks the naming rule.
pub fn function_key(function: &FunctionArgs) -> Result<FunctionKey, CliError> {
    FunctionKey::new(
        function.namespace.replace("::", "."),
        function.function.clone(),
    )
    .map_err(|err| CliError::Usage(err.to_string()))
}

/// One entry: from the JSON arguments, or from `--digest`.
///
/// # Errors
/// [`CliError::Usage`] on a bad name, digest or arguments.
pub fn entry_key(
    function: &FunctionArgs,
    args: Option<&str>,
    digest: Option<&str>,
) -> Result<EntryKey, CliError> {
    let function = function_key(function)?;
    let digest = match (args, digest) {
        (_, Some(digest)) => {
            check_digest("--digest", digest).map_err(|err| CliError::Usage(err.to_string()))?;
            digest.to_owned()
        }
        (Some(args), None) => digest_args(args)?.digest,
        (None, None) => {
            return Err(CliError::Usage(
                "give the call's arguments as a JSON array, or --digest HEX".to_owned(),
            ));
        }
    };
    EntryKey::new(
        function.namespace().to_owned(),
        function.function().to_owned(),
        digest,
    )
    .map_err(|err| CliError::Usage(err.to_string()))
}

impl EntryArgs {
    /// The entry these arguments name.
    ///
    /// # Errors
    /// As [`entry_key`].
    pub fn key(&self) -> Result<EntryKey, CliError> {
        entry_key(&self.function, self.args.as_deref(), self.digest.as_deref())
    }
}

/// The VALUE `put` was given: the argument, or with `-` all of `stdin` (for values longer than
/// a command line takes), less the trailing whitespace an editor or `echo` adds, which JSON
/// and base64 both ignore.
///
/// # Errors
/// [`CliError::Usage`] when `-` was given and standard input cannot be read as text.
pub fn value_text(value: &str, mut stdin: impl std::io::Read) -> Result<String, CliError> {
    if value != "-" {
        return Ok(value.to_owned());
    }
    let mut text = String::new();
    stdin.read_to_string(&mut text).map_err(|err| {
        CliError::Usage(format!(
            "VALUE -: standard input could not be read as text ({err}); give bytes as base64 \
             with --base64"
        ))
    })?;
    text.truncate(text.trim_end().len());
    Ok(text)
}

/// The bytes `put` stores: the JSON text as given, or the bytes base64 stands for.
///
/// # Errors
/// [`CliError::Usage`] when the value is not JSON (or, with `--base64`, not base64).
pub fn value_bytes(value: &str, base64: bool) -> Result<Bytes, CliError> {
    if base64 {
        return BASE64.decode(value.trim()).map(Bytes::from).map_err(|err| {
            CliError::Usage(format!("VALUE: not base64 ({err}), as --base64 says it is"))
        });
    }
    serde_json::from_str::<&RawValue>(value).map_err(|err| {
        CliError::Usage(format!(
            "VALUE: not JSON ({err}); quote text as a JSON string ('\"text\"'), or give any \
             bytes as base64 with --base64"
        ))
    })?;
    Ok(Bytes::copy_from_slice(value.as_bytes()))
}

/// A duration: whole seconds (`90`), or with units (`500ms`, `30s`, `15m`, `1h`, `7d`,
/// `1h 30m`).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|err| {
        format!("{err}; give seconds (90) or a duration with units (500ms, 30s, 15m, 1h, 7d)")
    })
}

/// A time to live in whole seconds, at least one.
///
/// # Errors
/// A message naming the rule when the duration is under a second, has a fraction of a
/// second, or does not fit the protocol's 32 bits.
pub fn parse_ttl(text: &str) -> Result<u32, String> {
    let ttl = parse_duration(text)?;
    if ttl.subsec_nanos() != 0 || ttl.as_secs() == 0 {
        return Err(format!(
            "must be a whole number of seconds, at least 1, got {}",
            humantime::format_duration(ttl)
        ));
    }
    u32::try_from(ttl.as_secs()).map_err(|_| {
        format!(
            "must be at most {} seconds, got {}",
            u32::MAX,
            ttl.as_secs()
        )
    })
}

/// The bearer token: from `--token-file` when given, else from `from_env`
/// (`CACHE_MONEY_TOKEN`). Surrounding whitespace (a file's final newline) is not part of it.
///
/// # Errors
/// [`CliError::Usage`] when the file cannot be read or the token is empty.
pub fn token(
    token_file: Option<&Path>,
    from_env: Option<String>,
) -> Result<Option<String>, CliError> {
    let (token, source) = match token_file {
        Some(path) => (read_file("--token-file", path)?, "--token-file"),
        None => match from_env {
            Some(token) => (token.into_bytes(), crate::args::TOKEN_ENV),
            None => return Ok(None),
        },
    };
    let token = String::from_utf8(token)
        .map_err(|_| CliError::Usage(format!("{source}: the token is not UTF-8 text")))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(CliError::Usage(format!("{source}: the token is empty")));
    }
    Ok(Some(token.to_owned()))
}

/// The PEM bytes of `--tls-ca`, when given.
///
/// # Errors
/// [`CliError::Usage`] when the file cannot be read.
pub fn tls_ca(path: Option<&PathBuf>) -> Result<Option<Vec<u8>>, CliError> {
    path.map(|path| read_file("--tls-ca", path)).transpose()
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|err| CliError::Usage(format!("{flag}: cannot read {}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(namespace: &str) -> FunctionArgs {
        FunctionArgs {
            namespace: namespace.to_owned(),
            function: "addition".to_owned(),
        }
    }

    fn usage(result: Result<impl std::fmt::Debug, CliError>) -> String {
        match result {
            Err(CliError::Usage(message)) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    /// The argument list is the JSON array itself: `[3, 4]` keys as the spec's `[3,4]`.
    #[test]
    fn json_array_is_the_argument_list() {
        let digest = digest_args("[3, 4]").unwrap();
        assert_eq!(digest.canonical, "[3,4]");
        assert_eq!(digest.digest, "b814fa889082069ffb727ee1623c0944");
        assert_eq!(digest_args("[[1, 2]]").unwrap().canonical, "[[1,2]]");
    }

    /// Not JSON, not an array, and numbers the spec refuses are usage errors naming ARGS.
    #[test]
    fn refused_arguments_name_the_rule() {
        assert!(usage(digest_args("[3, 4")).starts_with("ARGS: not JSON"));
        assert!(usage(digest_args("5")).contains("must be a JSON array"));
        let big = usage(digest_args("[9007199254740992]"));
        assert!(big.contains("pass it as a string"), "{big}");
    }

    /// `--digest` replaces the arguments and is checked; a Rust module path is accepted.
    #[test]
    fn keys_from_a_digest_or_arguments() {
        let key = entry_key(
            &function("a::b"),
            None,
            Some("0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(key.namespace(), "a.b");
        assert_eq!(key.digest(), "0123456789abcdef0123456789abcdef");
        let bad = usage(entry_key(&function("ns"), None, Some("ABC")));
        assert!(
            bad.starts_with("--digest: must be 32 lowercase hex"),
            "{bad}"
        );
        let name = usage(entry_key(&function("a b"), Some("[]"), None));
        assert!(name.starts_with("namespace: must be 1-128"), "{name}");
    }

    /// `-` reads the value from standard input, without its trailing newline; anything else
    /// is the value itself.
    #[test]
    fn a_dash_reads_the_value_from_standard_input() {
        let long = format!("\"{}\"", "x".repeat(300_000));
        let piped = format!("{long}\n");
        assert_eq!(value_text("-", piped.as_bytes()).unwrap(), long);
        assert_eq!(value_text("7", "ignored".as_bytes()).unwrap(), "7");
        let not_text: &[u8] = &[0xff, 0xfe];
        assert!(usage(value_text("-", not_text)).contains("--base64"));
    }

    /// Values are JSON text kept byte for byte, or base64 with --base64.
    #[test]
    fn values_are_json_or_base64() {
        assert_eq!(value_bytes("{\"a\": 1}", false).unwrap(), "{\"a\": 1}");
        assert_eq!(value_bytes("AAH/", true).unwrap().as_ref(), [0, 1, 255]);
        assert!(usage(value_bytes("hello", false)).contains("--base64"));
        assert!(usage(value_bytes("!!", true)).starts_with("VALUE: not base64"));
    }

    /// TTLs take seconds or units, and refuse zero and fractions.
    #[test]
    fn ttls_are_whole_seconds() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("30s"), Ok(30));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0").unwrap_err().contains("at least 1"));
        assert!(parse_ttl("1500ms").unwrap_err().contains("whole number"));
        assert!(parse_ttl("soon").unwrap_err().contains("30s, 15m"));
    }

    /// The token file wins over the environment; whitespace around it is dropped.
    #[test]
    fn token_from_file_or_environment() {
        let path = std::env::temp_dir().join(format!("cm-cli-token-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let from_file = token(Some(&path), Some("from-env".into()));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(from_file.unwrap().as_deref(), Some("from-file"));
        assert_eq!(
            token(None, Some("from-env".into())).unwrap().as_deref(),
            Some("from-env")
        );
        assert_eq!(token(None, None).unwrap(), None);
        assert!(usage(token(None, Some(" ".into()))).contains("empty"));
        assert!(usage(token(Some(&path), None)).starts_with("--token-file: cannot read"));
    }
}
