//! Tag indexes in Redis, as commands any Redis store sends on its own connection (the
//! single-node store pipelines them; a cluster store routes each by its key).
//!
//! The index of tag `t` in namespace `ns` is a sorted set at `{prefix}ns:#tag:{md5(t)}`
//! (see [`KeyLayout::tag_index`]). Each member is an entry of that namespace, written
//! `{function}:{digest}`, scored by when the entry expires (Redis's clock, in ms).
//!
//! - **Write**: before the entries, one [`index_command`] per index: a script on that one
//!   key (so one cluster slot) that adds the members, drops the members whose entries have
//!   expired, and sets the index to expire with its last member. The index is bounded by the
//!   live entries carrying its tag and goes when the last of them does. It is written before
//!   the entries, so a failure in between leaves a member without an entry (harmless: busting
//!   it removes nothing), never an entry its tag cannot find.
//! - **Bust**: ZSCAN the index ([`scan_command`]) and UNLINK the entries its members name,
//!   each checked against the grammar ([`member_entries`]), so a foreign write to the index
//!   cannot make a bust remove a key cache-money did not write or one of another namespace.
//!   The members stay, to expire with the entries they named: a put whose index write lands
//!   before the bust and whose entry write lands after it is then still found by the next
//!   bust of the tag, where removing the index would lose track of it.
//! - A put that replaces a tagged entry with other tags leaves it in its old tags' indexes
//!   until they expire; busting an old tag then removes the new value too. Over-invalidation
//!   is safe (the next call recomputes) and costs no bookkeeping on every write.

use std::{collections::BTreeMap, time::Duration};

use super::super::NewEntry;
use crate::server::key::KeyLayout;

/// How much longer than its entry a member is kept. The entry's own TTL starts when its SET
/// runs, after the index script: within one store timeout on one node, within two on a
/// cluster (another node, another command). A member that outlives its entry costs a wasted
/// UNLINK; one that expired first would let a bust miss a live entry.
pub fn index_slack(store_timeout: Duration) -> Duration {
    store_timeout * 2 + Duration::from_secs(1)
}

/// The index script with `$zadd` (extra `ZADD` arguments, e.g. `, 'GT'`) spliced in, so the
/// plain and the lease variant are one text.
macro_rules! index_script {
    ($zadd:literal) => {
        concat!(
            r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1]",
            $zadd,
            r", string.format('%d', now + tonumber(ARGV[i])), ARGV[i + 1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
redis.call('ZREMRANGEBYSCORE', KEYS[1], string.format('(%d', now + tonumber(ARGV[1])), '+inf')
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], string.format('%d', tonumber(last[2])))
return (#ARGV - 1) / 2
"
        )
    };
}

/// The script run on one index: `KEYS[1]` the index, `ARGV[1]` the horizon (ms), then pairs
/// of (time to live in ms, member). Scores come from Redis's clock (`TIME`), the clock the
/// entries' `PX` runs on, so no server's clock skew can make a member expire before its
/// entry. `ZADD` lowers a member's score when its entry is overwritten with a shorter TTL, as
/// the entry's expiry is. Members scored past the horizon were not written by cache-money
/// (no TTL reaches it) and are dropped, so a foreign write cannot make an index immortal or
/// its expiry unrepresentable.
pub const INDEX_SCRIPT: &str = index_script!("");

/// The longest a member may live, in ms: the longest TTL the protocol can carry (a `u32` of
/// seconds), plus the slack.
fn horizon_ms(slack: Duration) -> u64 {
    u64::from(u32::MAX) * 1000 + slack.as_millis() as u64
}

/// The index writes the tagged `entries` need, one command per index key, each touching
/// only that key (one slot). Returns the key beside its command, for routing.
pub fn index_commands(
    layout: &KeyLayout,
    entries: &[NewEntry],
    slack: Duration,
) -> Vec<(String, redis::Cmd)> {
    let mut members: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for entry in entries {
        let ttl_ms = (entry.kept_for() + slack).as_millis() as u64;
        for tag in &entry.tags {
            members
                .entry(layout.tag_index(entry.key.namespace(), tag))
                .or_default()
                .push((ttl_ms, KeyLayout::tag_member(&entry.key)));
        }
    }
    members
        .into_iter()
        .map(|(index, members)| {
            let command = index_command(&index, horizon_ms(slack), &members);
            (index, command)
        })
        .collect()
}

/// The script call writing `members` (time to live in ms, member) into `index`, dropping
/// members scored more than `horizon_ms` ahead.
pub fn index_command(index: &str, horizon_ms: u64, members: &[(u64, String)]) -> redis::Cmd {
    index_command_with(INDEX_SCRIPT, index, horizon_ms, members)
}

/// [`INDEX_SCRIPT`] as a lease writes it: `ZADD GT`, so indexing a lease's tags only ever
/// raises a member's expiry (a value already indexed for longer keeps its place; Redis 6.2
/// or later).
pub const LEASE_INDEX_SCRIPT: &str = index_script!(", 'GT'");

/// The index writes a lease on `key` needs for the `tags` its result will be written with:
/// each member kept for the lease placeholder's `life` (plus the slack), never less than it
/// already was.
pub fn lease_index_commands(
    layout: &KeyLayout,
    key: &crate::key::EntryKey,
    tags: &[String],
    life: Duration,
    slack: Duration,
) -> Vec<(String, redis::Cmd)> {
    let ttl_ms = (life + slack).as_millis() as u64;
    let member = [(ttl_ms, KeyLayout::tag_member(key))];
    tags.iter()
        .map(|tag| {
            let index = layout.tag_index(key.namespace(), tag);
            let command =
                index_command_with(LEASE_INDEX_SCRIPT, &index, horizon_ms(slack), &member);
            (index, command)
        })
        .collect()
}

fn index_command_with(
    script: &str,
    index: &str,
    horizon_ms: u64,
    members: &[(u64, String)],
) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command.arg(script).arg(1).arg(index).arg(horizon_ms);
    for (ttl_ms, member) in members {
        command.arg(*ttl_ms).arg(member);
    }
    command
}

/// One step through an index's members: `ZSCAN index cursor COUNT count`.
pub fn scan_command(index: &str, cursor: u64, count: usize) -> redis::Cmd {
    let mut command = redis::cmd("ZSCAN");
    command.arg(index).arg(cursor).arg("COUNT").arg(count);
    command
}

/// The entry keys named by one ZSCAN reply's flat `[member, score, member, score, …]` list,
/// keeping only members that name an entry of `namespace` exactly.
pub fn member_entries(layout: &KeyLayout, namespace: &str, reply: &[Vec<u8>]) -> Vec<String> {
    reply
        .iter()
        .step_by(2)
        .filter_map(|member| layout.tag_member_entry(namespace, member))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::EntryKey;
    use bytes::Bytes;

    const D: &str = "0123456789abcdef0123456789abcdef";

    fn tagged(namespace: &str, function: &str, tags: &[&str]) -> NewEntry {
        NewEntry {
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            ..NewEntry::new(
                EntryKey::new(namespace.into(), function.into(), D.into()).unwrap(),
                Bytes::new(),
                Duration::from_secs(60),
            )
        }
    }

    /// A batch writes one script call per (namespace, tag), each holding all its members,
    /// scored with the slack; untagged entries write none.
    #[test]
    fn one_command_per_index() {
        let layout = KeyLayout::new("cm:");
        let entries = [
            tagged("ns", "f", &["user:7"]),
            tagged("ns", "g", &["user:7", "org:1"]),
            tagged("other", "f", &["user:7"]),
            tagged("ns", "h", &[]),
        ];
        let commands = index_commands(&layout, &entries, Duration::from_secs(1));
        let keys: Vec<&str> = commands.iter().map(|(key, _)| key.as_str()).collect();
        let mut expected = vec![
            layout.tag_index("ns", "user:7"),
            layout.tag_index("ns", "org:1"),
            layout.tag_index("other", "user:7"),
        ];
        expected.sort();
        assert_eq!(keys, expected);
        let user7 = &commands[keys
            .iter()
            .position(|k| *k == layout.tag_index("ns", "user:7"))
            .unwrap()]
        .1;
        let args: Vec<Vec<u8>> = user7
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            args.len(),
            5 + 4,
            "EVAL script 1 key horizon + two (ttl, member) pairs"
        );
        assert_eq!(args[5], b"61000");
        assert_eq!(args[6], format!("f:{D}").into_bytes());
        assert_eq!(args[8], format!("g:{D}").into_bytes());
    }

    /// Only members naming an entry exactly are busted; scores are skipped.
    #[test]
    fn members_are_checked_before_busting() {
        let layout = KeyLayout::new("cm:");
        let reply: Vec<Vec<u8>> = [
            format!("f:{D}"),
            "1".into(),
            format!("ns2:f:{D}"),
            "1".into(),
            "cm:config".into(),
            "1".into(),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect();
        assert_eq!(
            member_entries(&layout, "ns", &reply),
            vec![format!("cm:ns:f:{D}")]
        );
    }
}
