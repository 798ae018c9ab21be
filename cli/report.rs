//! What a command found or did, and how it is printed: aligned text for people, or one JSON
//! document for scripts. Values print as JSON when they are JSON, else as base64.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use bytes::Bytes;
use cache_money::{
    key::{EntryKey, FunctionKey},
    pb::{KeyEntry, StatsResponse},
};
use serde::Serialize;
use serde_json::{Value, json, value::RawValue};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    error::{EXIT_FAILED, EXIT_MISS, EXIT_OK},
    input::Digest,
};

/// The gRPC name of the cache service, as the health service knows it.
pub const CACHE_SERVICE: &str = "cache_money.v1.CacheMoney";

/// What a bust removed entries from.
#[derive(Debug, Clone)]
pub enum Scope {
    /// One entry.
    Entry(EntryKey),
    /// Every entry of one function.
    Function(FunctionKey),
    /// Every entry of one namespace.
    Namespace(String),
    /// Every entry of one namespace written with one tag.
    Tag {
        /// The namespace.
        namespace: String,
        /// The tag.
        tag: String,
    },
    /// Everything cache-money stored.
    All,
}

/// The result of a command that was done.
#[derive(Debug)]
pub enum Report {
    /// `digest`: the key of some arguments.
    Digest(Digest),
    /// `get`: the entry's value, or `None` on a miss.
    Entry {
        /// The entry looked up.
        key: EntryKey,
        /// Its bytes, when there was one.
        value: Option<Bytes>,
    },
    /// `put`: the entry stored.
    Stored {
        /// The entry written.
        key: EntryKey,
        /// For how long.
        ttl_seconds: u32,
    },
    /// A bust of any scope.
    Removed {
        /// What was busted.
        scope: Scope,
        /// How many entries went.
        removed: u64,
    },
    /// `keys`: one function's entries.
    Keys {
        /// The function listed.
        function: FunctionKey,
        /// Its entries, with the time each has left.
        entries: Vec<KeyEntry>,
        /// Where the listing goes on; empty when it is complete.
        next_cursor: String,
    },
    /// `stats`: the server's counters.
    Stats(StatsResponse),
    /// `health`: the cache service's health.
    Health(ServingStatus),
}

/// An entry's address in JSON output.
#[derive(Debug, Serialize)]
struct KeyJson<'a> {
    namespace: &'a str,
    function: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<&'a str>,
}

impl<'a> KeyJson<'a> {
    fn entry(key: &'a EntryKey) -> Self {
        KeyJson {
            namespace: key.namespace(),
            function: key.function(),
            digest: Some(key.digest()),
        }
    }

    fn function(function: &'a FunctionKey) -> Self {
        KeyJson {
            namespace: function.namespace(),
            function: function.function(),
            digest: None,
        }
    }
}

/// A stored value as shown: its own JSON text when it is JSON, else its bytes in base64.
#[derive(Debug)]
enum Shown<'a> {
    Json(&'a RawValue),
    Base64(String),
}

impl<'a> Shown<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        match serde_json::from_slice::<&RawValue>(bytes) {
            Ok(json) => Shown::Json(json),
            Err(_) => Shown::Base64(BASE64.encode(bytes)),
        }
    }

    fn encoding(&self) -> &'static str {
        match self {
            Shown::Json(_) => "json",
            Shown::Base64(_) => "base64",
        }
    }

    fn text(&self) -> &str {
        match self {
            Shown::Json(json) => json.get(),
            Shown::Base64(text) => text,
        }
    }
}

impl Serialize for Shown<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // Written as stored, so numbers beyond f64's precision are not rounded.
            Shown::Json(json) => json.serialize(serializer),
            Shown::Base64(text) => text.serialize(serializer),
        }
    }
}

/// `get` in JSON: the key, `hit`, and on a hit the value and how it is encoded.
#[derive(Debug, Serialize)]
struct EntryJson<'a> {
    #[serde(flatten)]
    key: KeyJson<'a>,
    hit: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Shown<'a>>,
}

/// Time left, to the second (`59m 12s`), or in milliseconds under a second.
pub fn human_ttl(ttl_ms: u64) -> String {
    if ttl_ms < 1000 {
        return format!("{ttl_ms}ms");
    }
    humantime::format_duration(Duration::from_secs(ttl_ms / 1000)).to_string()
}

/// Lines of `label  value`, the labels padded to one width.
fn rows(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn entries(count: u64) -> String {
    match count {
        1 => "1 entry".to_owned(),
        n => format!("{n} entries"),
    }
}

impl Report {
    /// The process exit code: 3 for a miss, 1 for a health that is not SERVING, else 0.
    pub fn exit_code(&self) -> u8 {
        match self {
            Report::Entry { value: None, .. } => EXIT_MISS,
            Report::Health(status) if *status != ServingStatus::Serving => EXIT_FAILED,
            _ => EXIT_OK,
        }
    }

    /// The report for people.
    pub fn table(&self) -> String {
        match self {
            Report::Digest(digest) => rows(&[
                ("digest", digest.digest.clone()),
                ("canonical", digest.canonical.clone()),
            ]),
            Report::Entry { key, value: None } => format!("miss: no entry {key}"),
            Report::Entry {
                key,
                value: Some(value),
            } => {
                let shown = Shown::of(value);
                let label = match shown {
                    Shown::Json(_) => "value",
                    Shown::Base64(_) => "value (base64)",
                };
                rows(&[("key", key.to_string()), (label, shown.text().to_owned())])
            }
            Report::Stored { key, ttl_seconds } => format!(
                "stored {key} for {}",
                humantime::format_duration(Duration::from_secs(u64::from(*ttl_seconds)))
            ),
            Report::Removed { scope, removed } => {
                let from = match scope {
                    Scope::Entry(key) => key.to_string(),
                    Scope::Function(function) => {
                        format!("{}:{}", function.namespace(), function.function())
                    }
                    Scope::Namespace(namespace) => namespace.clone(),
                    Scope::Tag { namespace, tag } => format!("tag {tag:?} in {namespace}"),
                    Scope::All => "everything cache-money stored".to_owned(),
                };
                format!("removed {} ({from})", entries(*removed))
            }
            Report::Keys {
                function,
                entries: listed,
                next_cursor,
            } => {
                let mut lines = vec![format!("{:32}  EXPIRES IN", "DIGEST")];
                lines.extend(
                    listed
                        .iter()
                        .map(|entry| format!("{:32}  {}", entry.digest, human_ttl(entry.ttl_ms))),
                );
                lines.push(format!(
                    "{} of {}:{}",
                    entries(listed.len() as u64),
                    function.namespace(),
                    function.function()
                ));
                if !next_cursor.is_empty() {
                    lines.push(format!("more: --cursor {next_cursor}"));
                }
                lines.join("\n")
            }
            Report::Stats(stats) => {
                let lookups = stats.hits + stats.misses;
                let ratio = if lookups == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}%", 100.0 * stats.hits as f64 / lookups as f64)
                };
                let store = if stats.store_up { "up" } else { "DOWN" };
                rows(&[
                    ("store", format!("{} ({store})", stats.store)),
                    (
                        "uptime",
                        humantime::format_duration(Duration::from_secs(stats.uptime_seconds))
                            .to_string(),
                    ),
                    ("hits", stats.hits.to_string()),
                    ("misses", stats.misses.to_string()),
                    ("hit ratio", ratio),
                    ("puts", stats.puts.to_string()),
                    ("busts", stats.busts.to_string()),
                    ("busted entries", stats.busted_entries.to_string()),
                    ("errors", stats.errors.to_string()),
                    ("leases won", stats.leases_won.to_string()),
                    ("lease waits", stats.lease_waits.to_string()),
                    ("leases expired", stats.leases_expired.to_string()),
                    ("refused writes", stats.stale_writes_refused.to_string()),
                    ("stale served", stats.stale_served.to_string()),
                    ("refreshes", stats.refreshes.to_string()),
                ])
            }
            Report::Health(status) => format!("{CACHE_SERVICE}: {}", status.as_str_name()),
        }
    }

    /// The report for scripts: one JSON document.
    pub fn json(&self) -> String {
        let document = match self {
            Report::Digest(digest) => {
                json!({"digest": digest.digest, "canonical": digest.canonical})
            }
            Report::Entry { key, value } => {
                let shown = value.as_deref().map(Shown::of);
                let entry = EntryJson {
                    key: KeyJson::entry(key),
                    hit: value.is_some(),
                    encoding: shown.as_ref().map(Shown::encoding),
                    value: shown,
                };
                // Serialized directly: through `serde_json::Value` a JSON value would be
                // re-parsed and its numbers possibly rounded.
                return to_json(&entry);
            }
            Report::Stored { key, ttl_seconds } => {
                json!({"key": KeyJson::entry(key), "ttl_seconds": ttl_seconds})
            }
            Report::Removed { scope, removed } => {
                let (scope, key) = match scope {
                    Scope::Entry(key) => ("entry", json!(KeyJson::entry(key))),
                    Scope::Function(function) => ("function", json!(KeyJson::function(function))),
                    Scope::Namespace(namespace) => ("namespace", json!({"namespace": namespace})),
                    Scope::Tag { namespace, tag } => {
                        ("tag", json!({"namespace": namespace, "tag": tag}))
                    }
                    Scope::All => ("all", Value::Null),
                };
                json!({"scope": scope, "key": key, "removed": removed})
            }
            Report::Keys {
                function,
                entries,
                next_cursor,
            } => {
                let entries: Vec<_> = entries
                    .iter()
                    .map(|entry| {
                        json!({
                            "digest": entry.digest,
                            "ttl_ms": entry.ttl_ms,
                            "ttl": human_ttl(entry.ttl_ms),
                        })
                    })
                    .collect();
                let next_cursor = (!next_cursor.is_empty()).then_some(next_cursor);
                json!({
                    "key": KeyJson::function(function),
                    "entries": entries,
                    "next_cursor": next_cursor,
                })
            }
            Report::Stats(stats) => json!({
                "hits": stats.hits,
                "misses": stats.misses,
                "puts": stats.puts,
                "busts": stats.busts,
                "busted_entries": stats.busted_entries,
                "errors": stats.errors,
                "store": stats.store,
                "store_up": stats.store_up,
                "uptime_seconds": stats.uptime_seconds,
                "leases_won": stats.leases_won,
                "lease_waits": stats.lease_waits,
                "leases_expired": stats.leases_expired,
                "stale_writes_refused": stats.stale_writes_refused,
                "stale_served": stats.stale_served,
                "refreshes": stats.refreshes,
            }),
            Report::Health(status) => {
                json!({"service": CACHE_SERVICE, "status": status.as_str_name()})
            }
        };
        to_json(&document)
    }
}

/// One JSON document, indented for reading.
pub fn to_json<T: Serialize>(value: &T) -> String {
    // Only fails on maps with non-string keys, and every report's keys are strings.
    serde_json::to_string_pretty(value).expect("a report serializes to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EntryKey {
        EntryKey::new(
            "__main__".into(),
            "addition".into(),
            "b814fa889082069ffb727ee1623c0944".into(),
        )
        .unwrap()
    }

    /// TTLs read like `59m 12s`, to the second.
    #[test]
    fn ttls_are_human() {
        assert_eq!(human_ttl(3_552_345), "59m 12s");
        assert_eq!(human_ttl(7 * 86_400 * 1000), "7days");
        assert_eq!(human_ttl(250), "250ms");
    }

    /// A JSON value prints as itself, unrounded; other bytes print as base64.
    #[test]
    fn values_print_as_json_or_base64() {
        let big = Report::Entry {
            key: key(),
            value: Some(Bytes::from_static(b"123456789012345678901234567890")),
        };
        assert!(
            big.json()
                .contains("\"value\": 123456789012345678901234567890")
        );
        assert!(big.json().contains("\"encoding\": \"json\""));
        assert!(
            big.table()
                .ends_with("value  123456789012345678901234567890")
        );
        let binary = Report::Entry {
            key: key(),
            value: Some(Bytes::from_static(&[0, 1, 255])),
        };
        assert!(
            binary.json().contains("\"value\": \"AAH/\""),
            "{}",
            binary.json()
        );
        assert!(binary.table().ends_with("value (base64)  AAH/"));
    }

    /// A miss exits 3; a health that is not SERVING exits 1.
    #[test]
    fn exit_codes_follow_the_outcome() {
        assert_eq!(
            Report::Entry {
                key: key(),
                value: None
            }
            .exit_code(),
            EXIT_MISS
        );
        assert_eq!(
            Report::Health(ServingStatus::NotServing).exit_code(),
            EXIT_FAILED
        );
        assert_eq!(Report::Health(ServingStatus::Serving).exit_code(), EXIT_OK);
    }
}
