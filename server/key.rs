//! How entries are laid out in Redis: `{prefix}{namespace}:{function}:{digest}`; the SCAN
//! patterns that find the entries of one function, one namespace or everything under the
//! prefix; and [`KeyLayout::parse`], the exact grammar every key a pattern finds is checked
//! against before a bust removes it.
//!
//! A pattern alone cannot be exact: in `SCAN MATCH`, `*` matches `:` too, so the namespace
//! pattern `cm:tenant:*:<hex>` also finds `cm:tenant:a:b:<hex>`, a key of a deployment whose
//! prefix is `cm:tenant:`. Names cannot contain `:`, so the grammar can tell them apart.

use crate::key::{DIGEST_LEN, EntryKey, FunctionKey, is_digest, is_name};

/// One lowercase hex character, as a glob class.
const HEX_CLASS: &str = "[0-9a-f]";

/// The Redis key layout under one prefix.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
    /// The prefix with glob characters escaped, for `SCAN MATCH`.
    prefix_glob: String,
    /// `HEX_CLASS` thirty-two times: the digest part of every pattern, so SCAN hands back
    /// few keys of other shapes.
    digest_glob: String,
}

/// The parts of a Redis key that has the exact shape of an entry, borrowed from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryParts<'k> {
    /// The namespace: 1-128 bytes of `[A-Za-z0-9_.-]`.
    pub namespace: &'k str,
    /// The function's name, by the same rule.
    pub function: &'k str,
    /// 32 lowercase hex digits.
    pub digest: &'k str,
}

/// Escapes the characters Redis glob patterns give meaning to.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl KeyLayout {
    /// A layout under `prefix` (glob characters in it are escaped in patterns). The prefix
    /// should end with a character outside the name charset, as `Config::validate` demands,
    /// or an entry could not be told apart from a key of another prefix.
    pub fn new(prefix: &str) -> Self {
        KeyLayout {
            prefix: prefix.to_owned(),
            prefix_glob: glob_escape(prefix),
            digest_glob: HEX_CLASS.repeat(DIGEST_LEN),
        }
    }

    /// The Redis key of one entry.
    pub fn entry(&self, key: &EntryKey) -> String {
        let (namespace, function, digest) = (key.namespace(), key.function(), key.digest());
        let mut out = String::with_capacity(
            self.prefix.len() + namespace.len() + function.len() + digest.len() + 2,
        );
        for part in [self.prefix.as_str(), namespace, ":", function, ":", digest] {
            out.push_str(part);
        }
        out
    }

    /// The parts of `key` when it is `{prefix}{name}:{name}:{digest}` exactly, names and
    /// digest by the rules of [`crate::key`]; `None` for any other key.
    pub fn parse<'k>(&self, key: &'k [u8]) -> Option<EntryParts<'k>> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        // A third `:` stays in the digest part, which then fails the digest rule.
        let mut parts = rest.splitn(3, |&byte| byte == b':');
        let (namespace, function, digest) = (parts.next()?, parts.next()?, parts.next()?);
        if !(is_name(namespace) && is_name(function) && is_digest(digest)) {
            return None;
        }
        // All three are ASCII by now.
        Some(EntryParts {
            namespace: std::str::from_utf8(namespace).ok()?,
            function: std::str::from_utf8(function).ok()?,
            digest: std::str::from_utf8(digest).ok()?,
        })
    }

    /// Finds the entries of one function. Names hold no glob character and no `:`, so
    /// `fetch` cannot match `fetch_user` or `fetch.v2`.
    pub fn function_pattern(&self, function: &FunctionKey) -> String {
        format!(
            "{}{}:{}:{}",
            self.prefix_glob,
            function.namespace(),
            function.function(),
            self.digest_glob
        )
    }

    /// Finds the entries of one (validated) namespace (`ns1` cannot match `ns10`), and keys
    /// with more `:` segments after it, which [`KeyLayout::parse`] refuses.
    pub fn namespace_pattern(&self, namespace: &str) -> String {
        format!("{}{namespace}:*:{}", self.prefix_glob, self.digest_glob)
    }

    /// Finds every entry under the prefix, and keys with more `:` segments, which
    /// [`KeyLayout::parse`] refuses.
    pub fn all_pattern(&self) -> String {
        format!("{}*:*:{}", self.prefix_glob, self.digest_glob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "0123456789abcdef0123456789abcdef";

    fn entry(layout: &KeyLayout, namespace: &str, function: &str) -> String {
        layout.entry(&EntryKey::new(namespace.into(), function.into(), D.into()).unwrap())
    }

    /// The documented layout, byte for byte.
    #[test]
    fn entry_key_layout() {
        assert_eq!(
            entry(&KeyLayout::new("cm:"), "billing", "fetch"),
            format!("cm:billing:fetch:{D}")
        );
    }

    /// Every entry key parses back into the parts it was built from, under any prefix.
    #[test]
    fn entries_parse_back() {
        for prefix in ["cm:", "cm:tenant:", "c*[m]?:", "app/"] {
            let layout = KeyLayout::new(prefix);
            for (namespace, function) in [("billing.invoices", "fetch_v2"), ("a", "B-1")] {
                let key = entry(&layout, namespace, function);
                let expected = EntryParts {
                    namespace,
                    function,
                    digest: D,
                };
                assert_eq!(layout.parse(key.as_bytes()), Some(expected), "{key}");
            }
        }
        let longest = "n".repeat(crate::key::MAX_NAME_LEN);
        let key = entry(&KeyLayout::new("cm:"), &longest, "f");
        assert!(KeyLayout::new("cm:").parse(key.as_bytes()).is_some());
    }

    /// Keys of any other shape under the prefix do not parse: extra or empty segments, glob
    /// characters, uppercase hex, 31 or 33 digits, long names, other prefixes, other bytes.
    #[test]
    fn other_shapes_do_not_parse() {
        let layout = KeyLayout::new("cm:");
        let long = "n".repeat(crate::key::MAX_NAME_LEN + 1);
        let upper = D.to_uppercase();
        let others = [
            format!("cm:a:b:c:{D}"),
            format!("cm:tenant:a:b:{D}"),
            format!("cm:a:b:{D}:{D}"),
            format!("cm:a:b:{D}:"),
            format!("cm:x*:y:{D}"),
            format!("cm:x?:y:{D}"),
            format!("cm:[x]:y:{D}"),
            format!("cm:a:b:{upper}"),
            format!("cm:a:b:{}", &D[1..]),
            format!("cm:a:b:{D}0"),
            format!("cm:{long}:b:{D}"),
            format!("cm:a:{long}:{D}"),
            format!("cm::b:{D}"),
            format!("cm:a::{D}"),
            format!("cm:::{D}"),
            format!("cm:a b:c:{D}"),
            format!("cm:\u{e9}:c:{D}"),
            format!("cmx:a:b:{D}"),
            format!("CM:a:b:{D}"),
            format!("a:b:{D}"),
            "cm:config".to_owned(),
            String::new(),
        ];
        for key in &others {
            assert_eq!(layout.parse(key.as_bytes()), None, "{key:?}");
        }
        let mut binary = b"cm:a".to_vec();
        binary.push(0xff);
        binary.extend_from_slice(format!(":b:{D}").as_bytes());
        assert_eq!(layout.parse(&binary), None);
    }
}
