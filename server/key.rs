//! How entries are laid out in Redis: `{prefix}{namespace}:{function}:{digest}`; tag indexes
//! at `{prefix}{namespace}:#tag:{md5 of the tag}`; the SCAN patterns that find the keys of one
//! function, one namespace or everything under the prefix; and [`KeyLayout::classify`], the
//! exact grammar every key a pattern finds is checked against before a bust removes it.
//!
//! A tag index cannot be mistaken for an entry, nor an entry for an index: `#` is outside the
//! name charset, so no function is called `#tag`. Since md5 hex is 32 lowercase hex digits,
//! the namespace and all patterns find indexes too, and the grammar tells them apart.
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

/// The function part of a tag index's key: outside the name charset, so never a function.
pub const TAG_INDEX_MARK: &str = "#tag";

/// The parts of a Redis key that has the exact shape of a tag index, borrowed from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagIndexParts<'k> {
    /// The namespace whose entries it lists.
    pub namespace: &'k str,
    /// The md5 of the tag, 32 lowercase hex digits.
    pub tag_digest: &'k str,
}

/// What a Redis key under the prefix is, by the exact grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKey<'k> {
    /// An entry.
    Entry(EntryParts<'k>),
    /// The index of one tag in one namespace.
    TagIndex(TagIndexParts<'k>),
}

impl<'k> LayoutKey<'k> {
    /// The namespace the key belongs to.
    pub fn namespace(&self) -> &'k str {
        match self {
            LayoutKey::Entry(entry) => entry.namespace,
            LayoutKey::TagIndex(index) => index.namespace,
        }
    }
}

/// The md5 of a tag, lowercase hex: how the tag appears in its index's key, so a tag of any
/// characters makes a key of the grammar's charset.
pub fn tag_digest(tag: &str) -> String {
    format!("{:x}", md5::compute(tag.as_bytes()))
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

    /// The Redis key of the index of `tag` in `namespace` (a validated name).
    pub fn tag_index(&self, namespace: &str, tag: &str) -> String {
        format!(
            "{}{namespace}:{TAG_INDEX_MARK}:{}",
            self.prefix,
            tag_digest(tag)
        )
    }

    /// The member naming `entry` in a tag index: `{function}:{digest}`, the entry's key
    /// without the prefix and namespace the index's own key holds.
    pub fn tag_member(entry: &EntryKey) -> String {
        format!("{}:{}", entry.function(), entry.digest())
    }

    /// The Redis key of the entry a tag index member names, when the member has the exact
    /// shape `{function}:{digest}`; `None` for anything else (a foreign write to the index).
    pub fn tag_member_entry(&self, namespace: &str, member: &[u8]) -> Option<String> {
        let (function, digest) = split_once(member, b':')?;
        if !(is_name(function) && is_digest(digest)) {
            return None;
        }
        // Both are ASCII by now.
        let member = std::str::from_utf8(member).ok()?;
        Some(format!("{}{namespace}:{member}", self.prefix))
    }

    /// What `key` is when it has the exact shape of an entry
    /// (`{prefix}{name}:{name}:{digest}`) or of a tag index
    /// (`{prefix}{name}:#tag:{digest}`), names and digests by the rules of [`crate::key`];
    /// `None` for any other key.
    pub fn classify<'k>(&self, key: &'k [u8]) -> Option<LayoutKey<'k>> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        // A third `:` stays in the digest part, which then fails the digest rule.
        let mut parts = rest.splitn(3, |&byte| byte == b':');
        let (namespace, function, digest) = (parts.next()?, parts.next()?, parts.next()?);
        if !(is_name(namespace) && is_digest(digest)) {
            return None;
        }
        // The namespace and digest are ASCII by now, and so is a valid function name.
        let namespace = std::str::from_utf8(namespace).ok()?;
        let digest = std::str::from_utf8(digest).ok()?;
        if function == TAG_INDEX_MARK.as_bytes() {
            return Some(LayoutKey::TagIndex(TagIndexParts {
                namespace,
                tag_digest: digest,
            }));
        }
        if !is_name(function) {
            return None;
        }
        Some(LayoutKey::Entry(EntryParts {
            namespace,
            function: std::str::from_utf8(function).ok()?,
            digest,
        }))
    }

    /// The parts of `key` when it is an entry exactly (see [`KeyLayout::classify`]); `None`
    /// for any other key, tag indexes included.
    pub fn parse<'k>(&self, key: &'k [u8]) -> Option<EntryParts<'k>> {
        match self.classify(key)? {
            LayoutKey::Entry(entry) => Some(entry),
            LayoutKey::TagIndex(_) => None,
        }
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

    /// Finds the entries and tag indexes of one (validated) namespace (`ns1` cannot match
    /// `ns10`), and keys with more `:` segments after it, which [`KeyLayout::classify`]
    /// refuses.
    pub fn namespace_pattern(&self, namespace: &str) -> String {
        format!("{}{namespace}:*:{}", self.prefix_glob, self.digest_glob)
    }

    /// Finds every entry and tag index under the prefix, and keys with more `:` segments,
    /// which [`KeyLayout::classify`] refuses.
    pub fn all_pattern(&self) -> String {
        format!("{}*:*:{}", self.prefix_glob, self.digest_glob)
    }
}

/// `bytes` split at the first `separator`, which neither part keeps.
fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&byte| byte == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
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

    /// A tag index's key classifies as that index, never as an entry, under any prefix; an
    /// entry's key classifies as the entry.
    #[test]
    fn tag_indexes_are_told_from_entries() {
        for prefix in ["cm:", "cm:tenant:", "c*[m]?:"] {
            let layout = KeyLayout::new(prefix);
            let index = layout.tag_index("billing", "user:7");
            let digest = tag_digest("user:7");
            assert_eq!(index, format!("{prefix}billing:#tag:{digest}"));
            assert_eq!(
                layout.classify(index.as_bytes()),
                Some(LayoutKey::TagIndex(TagIndexParts {
                    namespace: "billing",
                    tag_digest: &digest,
                }))
            );
            assert_eq!(layout.parse(index.as_bytes()), None);
            let key = entry(&layout, "billing", "fetch");
            assert!(matches!(
                layout.classify(key.as_bytes()),
                Some(LayoutKey::Entry(_))
            ));
        }
        let layout = KeyLayout::new("cm:");
        for other in [
            format!("cm:ns:#tag:{}", &D[1..]),
            format!("cm:ns:#tags:{D}"),
            format!("cm:ns:#TAG:{D}"),
            format!("cm:ns:#tag:{D}:x"),
            format!("cm::#tag:{D}"),
            format!("cm:a:b:#tag:{D}"),
        ] {
            assert_eq!(layout.classify(other.as_bytes()), None, "{other}");
        }
    }

    /// Index members map back to entry keys of the index's namespace only when they are
    /// `{function}:{digest}` exactly.
    #[test]
    fn tag_members_name_entries_exactly() {
        let layout = KeyLayout::new("cm:");
        let key = EntryKey::new("ns".into(), "f".into(), D.into()).unwrap();
        let member = KeyLayout::tag_member(&key);
        assert_eq!(
            layout.tag_member_entry("ns", member.as_bytes()),
            Some(layout.entry(&key))
        );
        for bad in [
            format!("f:{D}:x"),
            format!("other:f:{D}"),
            format!("f:{}", &D[1..]),
            format!("#tag:{D}"),
            format!("f*:{D}"),
            D.to_owned(),
            String::new(),
        ] {
            assert_eq!(layout.tag_member_entry("ns", bad.as_bytes()), None, "{bad}");
        }
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
