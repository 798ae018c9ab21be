//! The address of a cache entry: `{namespace, function, digest}`, and the rules each part obeys.
//!
//! Names are 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9_.-]` (ASCII, so bytes and characters
//! count alike). That charset has no `:`
//! (the separator in the Redis key) and no glob character, which is what makes busting one
//! function or namespace exact: the pattern for `fetch` can never match `fetch_user`.

use std::fmt;

/// The longest namespace or function name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The bytes a namespace or function name may hold, as a regex class.
pub const NAME_CHARSET: &str = "[A-Za-z0-9_.-]";

/// The length of a digest: an md5 in lowercase hex.
pub const DIGEST_LEN: usize = 32;

/// The most tags one write may carry unless the server is told otherwise (`--max-tags`).
pub const DEFAULT_MAX_TAGS: usize = 16;

/// The longest tag, in bytes, unless the server is told otherwise (`--max-tag-bytes`).
pub const DEFAULT_MAX_TAG_BYTES: usize = 256;

/// A key part that broke its rule, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    field: String,
    problem: String,
}

impl KeyError {
    fn new(field: &str, problem: String) -> Self {
        KeyError {
            field: field.to_owned(),
            problem,
        }
    }

    /// The field that was wrong, e.g. `namespace` or `keys[3].digest`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Places the field inside a message field, e.g. `digest` becomes `key.digest`.
    pub fn nested(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }

    /// Places the field inside a list, e.g. `digest` becomes `keys[3].digest`.
    pub fn within(mut self, list: &str, index: usize) -> Self {
        self.field = format!("{list}[{index}].{}", self.field);
        self
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for KeyError {}

/// Shows a rejected value in an error message: quoted, escaped and cut short, since it may be
/// 10 KB of control characters.
fn shown(value: &str) -> String {
    const SHOWN_CHARS: usize = 40;
    let mut out: String = value.chars().take(SHOWN_CHARS).collect();
    if out.len() < value.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// Whether `byte` may appear in a name: one of [`NAME_CHARSET`].
pub(crate) fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-')
}

/// Whether `name` is a namespace or function name: 1 to [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9_.-]`. The one statement of the rule, for [`check_name`] and for the server
/// reading keys back from Redis.
pub(crate) fn is_name(name: &[u8]) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len()) && name.iter().all(|&b| is_name_byte(b))
}

/// Whether `digest` is [`DIGEST_LEN`] lowercase hex digits.
pub(crate) fn is_digest(digest: &[u8]) -> bool {
    digest.len() == DIGEST_LEN
        && digest
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a namespace or function name; `field` names it in the error.
///
/// # Errors
/// When the name is empty, longer than [`MAX_NAME_LEN`] bytes or has a byte outside
/// `[A-Za-z0-9_.-]`.
pub fn check_name(field: &str, name: &str) -> Result<(), KeyError> {
    if !is_name(name.as_bytes()) {
        return Err(KeyError::new(
            field,
            format!(
                "must be 1-{MAX_NAME_LEN} bytes of {NAME_CHARSET}, got {} ({} bytes)",
                shown(name),
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a digest: exactly [`DIGEST_LEN`] lowercase hex digits.
///
/// # Errors
/// When the digest has another length or a character outside `[0-9a-f]`.
pub fn check_digest(field: &str, digest: &str) -> Result<(), KeyError> {
    if !is_digest(digest.as_bytes()) {
        return Err(KeyError::new(
            field,
            format!(
                "must be {DIGEST_LEN} lowercase hex digits (an md5), got {}",
                shown(digest)
            ),
        ));
    }
    Ok(())
}

/// Checks a tag: 1 to `max_bytes` bytes of UTF-8 without control characters. Any other
/// character is allowed (`user:7`, `tenant/acme`, `ünïcode`): the store keys a tag by its md5,
/// never by its text, so a tag cannot collide with a name or a glob. Control characters are
/// refused so a tag reads the same in logs, the CLI and a terminal.
///
/// # Errors
/// When the tag is empty, longer than `max_bytes` or holds a control character.
pub fn check_tag(field: &str, tag: &str, max_bytes: usize) -> Result<(), KeyError> {
    if tag.is_empty() || tag.len() > max_bytes || tag.chars().any(char::is_control) {
        return Err(KeyError::new(
            field,
            format!(
                "must be 1-{max_bytes} bytes of UTF-8 without control characters, got {} ({} bytes)",
                shown(tag),
                tag.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the tags of one write: at most `max_tags`, each by [`check_tag`]; `field` names
/// the list (`tags`, so a bad one is `tags[2]`).
///
/// # Errors
/// When there are too many tags or one breaks the rule of [`check_tag`].
pub fn check_tags(
    field: &str,
    tags: &[String],
    max_tags: usize,
    max_bytes: usize,
) -> Result<(), KeyError> {
    if tags.len() > max_tags {
        return Err(KeyError::new(
            field,
            format!("at most {max_tags} tags per write, got {}", tags.len()),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        check_tag(&format!("{field}[{i}]"), tag, max_bytes)?;
    }
    Ok(())
}

/// One function: the scope of `BustFunction` and `Keys`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionKey {
    namespace: String,
    function: String,
}

impl FunctionKey {
    /// Validates and takes ownership of a namespace and a function name.
    ///
    /// # Errors
    /// When either breaks the rule of [`check_name`].
    pub fn new(namespace: String, function: String) -> Result<Self, KeyError> {
        check_name("namespace", &namespace)?;
        check_name("function", &function)?;
        Ok(FunctionKey {
            namespace,
            function,
        })
    }

    /// The caller's module, e.g. `billing.invoices`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The function's name.
    pub fn function(&self) -> &str {
        &self.function
    }
}

/// One call of one function: the address of a single cache entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryKey {
    function: FunctionKey,
    digest: String,
}

impl EntryKey {
    /// Validates and takes ownership of the three parts of a key.
    ///
    /// # Errors
    /// When a name breaks [`check_name`] or the digest breaks [`check_digest`].
    pub fn new(namespace: String, function: String, digest: String) -> Result<Self, KeyError> {
        let function = FunctionKey::new(namespace, function)?;
        check_digest("digest", &digest)?;
        Ok(EntryKey { function, digest })
    }

    /// The function this entry belongs to.
    pub fn function_key(&self) -> &FunctionKey {
        &self.function
    }

    /// The caller's module.
    pub fn namespace(&self) -> &str {
        self.function.namespace()
    }

    /// The function's name.
    pub fn function(&self) -> &str {
        self.function.function()
    }

    /// The md5 of the call's canonical arguments, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.namespace(),
            self.function(),
            self.digest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef";

    /// Every character of the charset is accepted, at both length bounds.
    #[test]
    fn names_in_the_charset_are_accepted() {
        for name in ["a", "__main__", "billing.invoices", "fetch-v2", "A_9.z-"] {
            assert_eq!(check_name("namespace", name), Ok(()), "{name}");
        }
        assert!(check_name("namespace", &"x".repeat(MAX_NAME_LEN)).is_ok());
    }

    /// Empty, too long, separators, globs, spaces and non-ASCII are refused, naming the field.
    #[test]
    fn names_outside_the_charset_are_refused() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for name in [
            "",
            "a:b",
            "a*",
            "a?",
            "[a]",
            "a\\b",
            "a b",
            "é",
            "a\n",
            long.as_str(),
        ] {
            let err = check_name("function", name).expect_err(name);
            assert_eq!(err.field(), "function");
            assert!(
                err.to_string().starts_with("function: must be 1-128"),
                "{err}"
            );
        }
    }

    /// Only 32 lowercase hex digits make a digest.
    #[test]
    fn digests_are_32_lowercase_hex() {
        assert!(check_digest("digest", DIGEST).is_ok());
        for bad in [
            "",
            &DIGEST[1..],
            &DIGEST.to_uppercase(),
            "g123456789abcdef0123456789abcdef",
        ] {
            assert!(check_digest("digest", bad).is_err(), "{bad}");
        }
    }

    /// A long bad value is cut short in the message rather than echoed whole.
    #[test]
    fn error_messages_stay_short() {
        let err = check_name("namespace", &"*".repeat(10_000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
        assert!(err.to_string().contains("10000 bytes"), "{err}");
    }

    /// Tags are any UTF-8 without control characters, up to the byte limit; empty, too long,
    /// control characters and too many tags are refused, naming the tag's position.
    #[test]
    fn tags_follow_their_rule() {
        for tag in ["user:7", "tenant/acme*", "ünï code", "x"] {
            assert_eq!(check_tag("tag", tag, 16), Ok(()), "{tag}");
        }
        assert!(check_tag("tag", &"é".repeat(8), 16).is_ok());
        for tag in ["", "a\nb", "\u{7f}", &"x".repeat(17), &"é".repeat(9)] {
            assert!(check_tag("tag", tag, 16).is_err(), "{tag:?}");
        }
        let tags: Vec<String> = vec!["ok".into(), "bad\t".into()];
        let err = check_tags("tags", &tags, 4, 16).unwrap_err();
        assert_eq!(err.field(), "tags[1]");
        let err = check_tags("tags", &tags, 1, 16).unwrap_err();
        assert_eq!(err.to_string(), "tags: at most 1 tags per write, got 2");
    }

    /// Errors inside a batch name the item's position.
    #[test]
    fn batch_errors_name_the_position() {
        let err = EntryKey::new("ns".into(), "f".into(), "nope".into()).unwrap_err();
        assert_eq!(err.within("keys", 3).field(), "keys[3].digest");
    }
}
