//! Leases, stale-while-revalidate and stale-if-error: the state a key carries beside its value,
//! and how the Redis stores keep it (the in-memory store keeps the same state in its map).
//!
//! # The state of one key
//! - **nothing**: a miss; a lookup asking for a lease wins it.
//! - **a lease placeholder**: no value, a lease (token, until when). A miss for every reader;
//!   a lookup asking for a lease waits while the lease runs and takes it over once it has
//!   expired. The placeholder itself lives longer than its lease ([`placeholder_life`]), so a
//!   holder that overran its lease may still write, as long as nobody took the lease over.
//! - **a value**, live until its TTL, then kept as a *stale* copy for its `stale_seconds`
//!   (stale-if-error): never a hit, only handed to lookups that `allow_stale`. A value
//!   carries a lease slot too: a stale value is leased like a miss, a live one that is due
//!   (stale-while-revalidate) is leased to exactly one refresher while everyone else reads it.
//!
//! A write carrying a token lands only while the key still holds that token; a bust of any
//! scope removes the key with its lease, an unconditional write clears the lease, and a
//! takeover replaces the token, so a result computed before any of them is refused.
//!
//! # In Redis
//! Everything lives in the entry's own key (so every step touches one key, one cluster slot,
//! and a bust needs no extra work to void leases or drop stale copies). A value written
//! without a compute time or stale window is stored as its plain bytes, as before; otherwise
//! the key holds an [`ENVELOPE`]: a fixed-width ASCII header ([`HEADER_LEN`] bytes, readable in
//! `redis-cli`) and the value's bytes after it. Its `PX` is the TTL plus the stale window;
//! how much of the TTL is left is `PTTL` minus the window, so no server's clock is involved.
//! Lease deadlines are Redis's own clock (`TIME` inside the scripts), the clock every lease
//! decision on that key is made by. The three scripts ([`ACQUIRE_SCRIPT`], [`PUT_SCRIPT`],
//! [`RELEASE_SCRIPT`]) each touch only `KEYS[1]`.

use std::time::Duration;

use bytes::Bytes;

/// The first bytes of an enveloped value: a NUL (no JSON or text value starts with one) and a
/// format tag.
pub const ENVELOPE: &[u8; 4] = b"\0cm1";

/// The header's length: magic (4), kind (1, `V` value or `L` lease placeholder), lease token
/// (16 hex digits, all `0` when none), lease deadline (13 digits, ms since the epoch on Redis's
/// clock), TTL (13 digits, ms), stale window (13 digits, ms), compute time (10 digits, ms).
pub const HEADER_LEN: usize = 70;

/// The token field of a key no lease is held on.
pub const NO_TOKEN: &str = "0000000000000000";

/// A lease token in the header's form: 16 lowercase hex digits.
pub fn token_text(token: u64) -> String {
    format!("{token:016x}")
}

/// A fresh lease token: random, never 0 (0 means "no token" on the wire).
pub fn new_token() -> u64 {
    fastrand::u64(1..)
}

/// How long a lease placeholder stays after it is written (or taken over): its lease, then as
/// long again and ten seconds more, during which a holder that overran its lease may still
/// write if nobody took over.
pub fn placeholder_life(lease: Duration) -> Duration {
    lease * 2 + Duration::from_secs(10)
}

/// What a value carries beside its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// The TTL it was written with, to tell its age; `None` for a plain value.
    pub ttl: Option<Duration>,
    /// How long computing it took, as its writer said (XFetch's δ).
    pub compute_ms: u32,
}

/// What a lookup found under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing, or a lease placeholder (no value yet).
    Absent,
    /// A value within its TTL.
    Live {
        /// The value's bytes.
        value: Bytes,
        /// Time left until its TTL runs out, when the lookup read it (see [`Found::live`]).
        left: Option<Duration>,
        /// What it was written with.
        meta: Meta,
    },
    /// A value past its TTL, kept for its stale window.
    Stale {
        /// The value's bytes.
        value: Bytes,
        /// What it was written with.
        meta: Meta,
    },
}

impl Found {
    /// The live value, if any: what a plain lookup answers.
    pub fn live(self) -> Option<Bytes> {
        match self {
            Found::Live { value, .. } => Some(value),
            Found::Absent | Found::Stale { .. } => None,
        }
    }
}

/// A request for a key's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAsk {
    /// The token to hold it by if won.
    pub token: u64,
    /// How long the lease lasts.
    pub lease: Duration,
    /// Whether a live value is to be refreshed (it is due); otherwise a live value means no
    /// lease is needed.
    pub refresh: bool,
}

/// Whether a value (live or stale) sat under the key when a lease was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Nothing, or only a lease placeholder.
    Nothing,
    /// A value.
    Value,
}

/// What a request for a lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The caller holds the lease.
    Won {
        /// What sat under the key.
        seen: Seen,
        /// Whether an expired lease of another caller was taken over.
        took_over: bool,
    },
    /// Another caller holds it, for `left` more.
    Held {
        /// What sat under the key.
        seen: Seen,
        /// Time until that lease expires.
        left: Duration,
    },
    /// A live value is there (written since the caller looked), and no refresh was asked; or
    /// a refresh was asked of a value that carries no lease slot (written plainly).
    Live,
}

/// The bytes Redis stores for a value written with `ttl`, a stale window and a compute time:
/// the plain bytes when there is neither, else the envelope. Its lease slot is empty: a write
/// clears any lease.
pub fn stored_value(value: &[u8], ttl: Duration, stale: Duration, compute_ms: u32) -> Bytes {
    if stale.is_zero() && compute_ms == 0 {
        return Bytes::copy_from_slice(value);
    }
    let header = format!(
        "V{NO_TOKEN}{:013}{:013}{:013}{:010}",
        0,
        ttl.as_millis(),
        stale.as_millis(),
        compute_ms
    );
    let mut stored = Vec::with_capacity(HEADER_LEN + value.len());
    stored.extend_from_slice(ENVELOPE);
    stored.extend_from_slice(header.as_bytes());
    debug_assert_eq!(stored.len(), HEADER_LEN);
    stored.extend_from_slice(value);
    Bytes::from(stored)
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// True for a lease placeholder (no value).
    pub placeholder: bool,
    /// The TTL the value was written with.
    pub ttl: Duration,
    /// Its stale window.
    pub stale: Duration,
    /// Its compute time, ms.
    pub compute_ms: u32,
}

fn field(bytes: &[u8], from: usize, len: usize) -> Option<u64> {
    std::str::from_utf8(bytes.get(from..from + len)?)
        .ok()?
        .parse()
        .ok()
}

/// The header of `stored`, when it is an envelope; `None` for a plain value.
pub fn header(stored: &[u8]) -> Option<Header> {
    if stored.len() < HEADER_LEN || !stored.starts_with(ENVELOPE) {
        return None;
    }
    let placeholder = match stored[4] {
        b'V' => false,
        b'L' => true,
        _ => return None,
    };
    Some(Header {
        placeholder,
        ttl: Duration::from_millis(field(stored, 34, 13)?),
        stale: Duration::from_millis(field(stored, 47, 13)?),
        compute_ms: u32::try_from(field(stored, 60, 10)?).ok()?,
    })
}

/// Whether a `GET` reply is a value kept past its TTL for a while, whose `PTTL` tells whether
/// it is still live; any other value is live for as long as it exists.
pub fn needs_pttl(stored: Option<&[u8]>) -> bool {
    stored
        .and_then(header)
        .is_some_and(|header| !header.placeholder && !header.stale.is_zero())
}

/// What a Redis `GET` of one key holds, given its `PTTL` when it was read too (it must be for
/// a value that [`needs_pttl`]).
pub fn found(stored: Option<Vec<u8>>, pttl: Option<i64>) -> Found {
    let Some(stored) = stored else {
        return Found::Absent;
    };
    // -2: gone between the GET and the PTTL; -1: no expiry (not written by us).
    if pttl == Some(-2) {
        return Found::Absent;
    }
    let pttl = pttl.map(|pttl| Duration::from_millis(pttl.max(0) as u64));
    let Some(header) = header(&stored) else {
        return Found::Live {
            value: Bytes::from(stored),
            left: pttl,
            meta: Meta::default(),
        };
    };
    if header.placeholder {
        return Found::Absent;
    }
    let meta = Meta {
        ttl: Some(header.ttl),
        compute_ms: header.compute_ms,
    };
    let value = Bytes::from(stored).slice(HEADER_LEN..);
    let Some(pttl) = pttl else {
        debug_assert!(
            header.stale.is_zero(),
            "a value with a stale window read without its PTTL"
        );
        // Without its PTTL a value kept past its TTL cannot be told live: never serve it so.
        return if header.stale.is_zero() {
            Found::Live {
                value,
                left: None,
                meta,
            }
        } else {
            Found::Stale { value, meta }
        };
    };
    match pttl.checked_sub(header.stale) {
        Some(left) if !left.is_zero() => Found::Live {
            value,
            left: Some(left),
            meta,
        },
        _ => Found::Stale { value, meta },
    }
}

/// The TTL `Keys` reports for a key with `PTTL` `pttl` and first bytes `head`: the time left
/// of a value's TTL; `None` for a lease placeholder or a stale copy (not entries to list).
pub fn listed_ttl(head: &[u8], pttl: i64) -> Option<Duration> {
    if pttl < 0 {
        return None;
    }
    let pttl = Duration::from_millis(pttl as u64);
    match header(head) {
        None => Some(pttl),
        Some(header) if header.placeholder => None,
        Some(header) => pttl
            .checked_sub(header.stale)
            .filter(|left| !left.is_zero()),
    }
}

/// The script that decides a lease: `KEYS[1]` the entry; `ARGV[1]` the token (16 hex
/// digits), `ARGV[2]` the lease (ms), `ARGV[3]` a placeholder's life (ms), `ARGV[4]` `1` to
/// refresh a live value. Answers `{'live'}`, `{'won', seen, took_over}` or
/// `{'held', seen, ms left}`, `seen` being `value` or `nothing`.
///
/// A lease won on a value (stale, or live and due) must not die with the value's key: the key
/// is kept at least a placeholder's life, the extra time added to its stale window so that
/// what is live stays live exactly as long as before (`PTTL` minus the window is unchanged).
pub const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = string.format('%013d', now + tonumber(ARGV[2]))
local life = tonumber(ARGV[3])
local h = redis.call('GETRANGE', KEYS[1], 0, 69)
if h == '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'live'} end
  redis.call('SET', KEYS[1], '\0cm1L' .. ARGV[1] .. deadline .. string.rep('0', 36), 'PX', life)
  return {'won', 'nothing', 0}
end
if #h < 70 or string.sub(h, 1, 4) ~= '\0cm1' then return {'live'} end
local kind = string.sub(h, 5, 5)
local seen = 'nothing'
local pttl = 0
local stale = 0
if kind == 'V' then
  seen = 'value'
  pttl = redis.call('PTTL', KEYS[1])
  stale = tonumber(string.sub(h, 48, 60))
  if pttl - stale > 0 and ARGV[4] ~= '1' then return {'live'} end
end
local holder = string.sub(h, 6, 21)
local expires = tonumber(string.sub(h, 22, 34))
if holder ~= '0000000000000000' and expires > now then
  return {'held', seen, expires - now}
end
redis.call('SETRANGE', KEYS[1], 5, ARGV[1] .. deadline)
if kind == 'L' then
  redis.call('PEXPIRE', KEYS[1], life)
elseif pttl < life then
  redis.call('SETRANGE', KEYS[1], 47, string.format('%013d', stale + life - pttl))
  redis.call('PEXPIRE', KEYS[1], life)
end
if holder ~= '0000000000000000' then return {'won', seen, 1} end
return {'won', seen, 0}
";

/// The script of a write under a lease: `KEYS[1]` the entry; `ARGV[1]` the token, `ARGV[2]`
/// the bytes to store, `ARGV[3]` their `PX`. Stores and answers 1 only while the key holds
/// the token; 0 otherwise, writing nothing.
pub const PUT_SCRIPT: &str = r"
local h = redis.call('GETRANGE', KEYS[1], 0, 20)
if string.sub(h, 1, 4) == '\0cm1' and string.sub(h, 6, 21) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The script that gives a lease up: `KEYS[1]` the entry, `ARGV[1]` the token. A placeholder
/// goes; a value stays with its lease slot emptied. Answers 1, or 0 when the key did not hold
/// the token.
pub const RELEASE_SCRIPT: &str = r"
local h = redis.call('GETRANGE', KEYS[1], 0, 20)
if string.sub(h, 1, 4) == '\0cm1' and string.sub(h, 6, 21) == ARGV[1] then
  if string.sub(h, 5, 5) == 'L' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SETRANGE', KEYS[1], 5, '0000000000000000' .. string.rep('0', 13))
  end
  return 1
end
return 0
";

/// What [`ACQUIRE_SCRIPT`] answered.
///
/// # Errors
/// A reply of another shape, naming it.
pub fn acquired(reply: &redis::Value) -> Result<Acquired, String> {
    let parts: Vec<redis::Value> =
        redis::from_redis_value_ref(reply).map_err(|err| format!("lease script reply: {err}"))?;
    let text = |index: usize| -> Option<String> {
        redis::from_redis_value_ref::<String>(parts.get(index)?).ok()
    };
    let number = |index: usize| -> Option<u64> {
        redis::from_redis_value_ref::<u64>(parts.get(index)?).ok()
    };
    let seen = || match text(1).as_deref() {
        Some("value") => Some(Seen::Value),
        Some("nothing") => Some(Seen::Nothing),
        _ => None,
    };
    let decided = match text(0).as_deref() {
        Some("live") => Some(Acquired::Live),
        Some("won") => seen()
            .zip(number(2))
            .map(|(seen, took_over)| Acquired::Won {
                seen,
                took_over: took_over == 1,
            }),
        Some("held") => seen().zip(number(2)).map(|(seen, left)| Acquired::Held {
            seen,
            left: Duration::from_millis(left),
        }),
        _ => None,
    };
    decided.ok_or_else(|| format!("lease script: unexpected reply {reply:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An enveloped value decodes back into its bytes and metadata, live or stale by PTTL.
    #[test]
    fn envelope_round_trip() {
        let stored = stored_value(
            b"{\"a\":1}",
            Duration::from_secs(60),
            Duration::from_secs(30),
            250,
        );
        assert_eq!(&stored[..4], ENVELOPE);
        assert_eq!(stored.len(), HEADER_LEN + 7);
        let meta = Meta {
            ttl: Some(Duration::from_secs(60)),
            compute_ms: 250,
        };
        assert_eq!(
            found(Some(stored.to_vec()), Some(40_000)),
            Found::Live {
                value: Bytes::from_static(b"{\"a\":1}"),
                left: Some(Duration::from_secs(10)),
                meta
            }
        );
        assert_eq!(
            found(Some(stored.to_vec()), Some(30_000)),
            Found::Stale {
                value: Bytes::from_static(b"{\"a\":1}"),
                meta
            }
        );
        assert_eq!(listed_ttl(&stored, 40_000), Some(Duration::from_secs(10)));
        assert_eq!(listed_ttl(&stored, 20_000), None);
    }

    /// A value written with neither a stale window nor a compute time is stored plainly, and
    /// a plain value (even one starting with a NUL) reads as itself.
    #[test]
    fn plain_values_stay_plain() {
        let stored = stored_value(b"\0cm", Duration::from_secs(60), Duration::ZERO, 0);
        assert_eq!(stored.as_ref(), b"\0cm");
        assert_eq!(
            found(Some(b"\0cm".to_vec()), Some(5_000)),
            Found::Live {
                value: Bytes::from_static(b"\0cm"),
                left: Some(Duration::from_secs(5)),
                meta: Meta::default()
            }
        );
        assert_eq!(
            found(Some(b"x".to_vec()), None),
            Found::Live {
                value: Bytes::from_static(b"x"),
                left: None,
                meta: Meta::default()
            }
        );
        assert!(!needs_pttl(Some(b"x")));
        assert_eq!(found(None, Some(-2)), Found::Absent);
        assert_eq!(found(Some(b"x".to_vec()), Some(-2)), Found::Absent);
    }

    /// A placeholder, as the acquire script writes it, is no value and is not listed.
    #[test]
    fn placeholders_are_misses() {
        let placeholder = format!(
            "\0cm1L{}{:013}{}",
            token_text(7),
            1_700_000_000_000u64,
            "0".repeat(36)
        );
        assert_eq!(placeholder.len(), HEADER_LEN);
        assert_eq!(
            found(Some(placeholder.clone().into_bytes()), Some(9_000)),
            Found::Absent
        );
        assert!(!needs_pttl(Some(placeholder.as_bytes())));
        assert_eq!(listed_ttl(placeholder.as_bytes(), 9_000), None);
    }

    #[test]
    fn tokens_are_sixteen_hex_digits_and_never_zero() {
        assert_eq!(token_text(255), "00000000000000ff");
        assert!((0..1000).all(|_| new_token() != 0));
    }
}
