//! How entries are laid out in Redis: `{prefix}{namespace}:{function}:{digest}`, and the SCAN
//! patterns that select exactly one entry, function, namespace or everything under the prefix.

use crate::key::{DIGEST_LEN, EntryKey, FunctionKey};

/// One lowercase hex character, as a glob class.
const HEX_CLASS: &str = "[0-9a-f]";

/// The Redis key layout under one prefix.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
    /// The prefix with glob characters escaped, for `SCAN MATCH`.
    prefix_glob: String,
    /// `HEX_CLASS` thirty-two times: the digest part of every pattern, so a bust never
    /// matches a key of another shape that happens to share the prefix.
    digest_glob: String,
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
    /// A layout under `prefix` (any text; glob characters in it are escaped in patterns).
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

    /// The start of every Redis key of one function; the digest follows it.
    pub fn function_prefix(&self, function: &FunctionKey) -> String {
        format!(
            "{}{}:{}:",
            self.prefix,
            function.namespace(),
            function.function()
        )
    }

    /// Matches exactly the entries of one function. Names hold no glob character and no `:`,
    /// so `fetch` cannot match `fetch_user` or `fetch.v2`.
    pub fn function_pattern(&self, function: &FunctionKey) -> String {
        format!(
            "{}{}:{}:{}",
            self.prefix_glob,
            function.namespace(),
            function.function(),
            self.digest_glob
        )
    }

    /// Matches exactly the entries of one (validated) namespace: `ns1` cannot match `ns10`.
    pub fn namespace_pattern(&self, namespace: &str) -> String {
        format!("{}{namespace}:*:{}", self.prefix_glob, self.digest_glob)
    }

    /// Matches every entry under the prefix, and no key of another shape.
    pub fn all_pattern(&self) -> String {
        format!("{}*:*:{}", self.prefix_glob, self.digest_glob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny glob matcher with Redis's rules for `*`, `[...]` and `\`, enough to check that
    /// the patterns select what they claim.
    fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
        match pattern.split_first() {
            None => text.is_empty(),
            Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_match(rest, &text[skip..])),
            Some((b'\\', rest)) => match (rest.split_first(), text.split_first()) {
                (Some((p, prest)), Some((t, trest))) => p == t && glob_match(prest, trest),
                _ => false,
            },
            Some((b'[', rest)) => {
                let close = rest.iter().position(|&b| b == b']').expect("closed class");
                let class = &rest[..close];
                let Some((&t, trest)) = text.split_first() else {
                    return false;
                };
                // Classes here are lists of ranges, like `0-9a-f`.
                let hit = class
                    .chunks(3)
                    .any(|range| (range[0]..=range[2]).contains(&t));
                hit && glob_match(&rest[close + 1..], trest)
            }
            Some((p, rest)) => text.first() == Some(p) && glob_match(rest, &text[1..]),
        }
    }

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

    /// Busting one function matches its entries and not those of similarly named functions.
    #[test]
    fn function_pattern_is_exact() {
        let layout = KeyLayout::new("cm:");
        let fetch = FunctionKey::new("ns".into(), "fetch".into()).unwrap();
        let pattern = layout.function_pattern(&fetch);
        assert!(glob_match(
            pattern.as_bytes(),
            entry(&layout, "ns", "fetch").as_bytes()
        ));
        for other in ["fetch_user", "fetch.v2", "fetc", "xfetch"] {
            assert!(
                !glob_match(pattern.as_bytes(), entry(&layout, "ns", other).as_bytes()),
                "{other}"
            );
        }
        assert!(!glob_match(
            pattern.as_bytes(),
            entry(&layout, "ns1", "fetch").as_bytes()
        ));
    }

    /// Busting `ns1` leaves `ns10`; busting everything leaves keys of other shapes.
    #[test]
    fn namespace_and_all_patterns_are_exact() {
        let layout = KeyLayout::new("cm:");
        let ns1 = layout.namespace_pattern("ns1");
        assert!(glob_match(
            ns1.as_bytes(),
            entry(&layout, "ns1", "f").as_bytes()
        ));
        assert!(!glob_match(
            ns1.as_bytes(),
            entry(&layout, "ns10", "f").as_bytes()
        ));
        let all = layout.all_pattern();
        assert!(glob_match(
            all.as_bytes(),
            entry(&layout, "a", "b").as_bytes()
        ));
        assert!(!glob_match(all.as_bytes(), b"cm:config"));
        assert!(!glob_match(
            all.as_bytes(),
            format!("other:a:b:{D}").as_bytes()
        ));
    }

    /// A prefix with glob characters matches only itself.
    #[test]
    fn prefix_globs_are_escaped() {
        let layout = KeyLayout::new("c*[m]?:");
        let all = layout.all_pattern();
        assert!(glob_match(
            all.as_bytes(),
            entry(&layout, "a", "b").as_bytes()
        ));
        assert!(!glob_match(
            all.as_bytes(),
            format!("cXXm?:a:b:{D}").as_bytes()
        ));
    }
}
