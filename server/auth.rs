//! Bearer-token authentication and per-namespace authorization.
//!
//! Off unless tokens are configured. Each token is granted namespaces to read (Get, GetMany)
//! and to write (Put, PutMany, Bust, BustFunction), and optionally the admin RPCs that reach
//! across namespaces (BustNamespace, BustAll, Keys). Health and reflection never need a token.
//!
//! Tokens come from a JSON file (`--auth-file`) or the `CACHE_MONEY_AUTH_TOKENS` variable
//! (never a flag: a flag's value is visible to every user of the host through `ps`):
//!
//! ```json
//! {"tokens": [
//!   {"name": "billing-service", "token": "…at least 16 characters…", "read": ["billing"], "write": ["billing"]},
//!   {"name": "operator", "token": "…", "read": ["*"], "write": ["*"], "admin": true}
//! ]}
//! ```
//!
//! Tokens are compared in constant time and never logged; logs name the grant instead.

use std::{collections::HashSet, fmt, sync::Arc};

use serde::Deserialize;
use subtle::ConstantTimeEq;
use tonic::{Request, Status, metadata::MetadataMap};

use crate::key::check_name;

/// The shortest token accepted, so a guessable one cannot be configured by accident.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsFile {
    tokens: Vec<GrantSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    name: String,
    token: String,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// Namespaces a grant covers: every one (`"*"`) or a listed set.
#[derive(Debug, Clone)]
enum Namespaces {
    All,
    Listed(HashSet<String>),
}

impl Namespaces {
    fn parse(grant: &str, field: &str, names: Vec<String>) -> Result<Self, String> {
        if names.iter().any(|name| name == "*") {
            return Ok(Namespaces::All);
        }
        for name in &names {
            check_name("namespace", name)
                .map_err(|err| format!("token {grant:?}: {field}: {err}"))?;
        }
        Ok(Namespaces::Listed(names.into_iter().collect()))
    }

    fn covers(&self, namespace: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Listed(names) => names.contains(namespace),
        }
    }
}

/// What one token may do. Its `Debug` shows the name, never the token.
#[derive(Clone)]
pub struct Grant {
    name: String,
    /// SHA-256 of the token: every comparison is of 32 bytes, so its time does not depend
    /// on the length of the token presented or of the one configured.
    token: TokenDigest,
    read: Namespaces,
    write: Namespaces,
    admin: bool,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("name", &self.name)
            .field("read", &self.read)
            .field("write", &self.write)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// The grant's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// Read entries of a namespace.
    Read(&'a str),
    /// Write or bust entries of a namespace.
    Write(&'a str),
    /// An RPC across namespaces (BustNamespace, BustAll, Keys).
    Admin,
    /// Any valid token (Stats).
    Any,
}

/// The configured tokens. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Auth {
    grants: Arc<Vec<Grant>>,
}

/// A token as the server keeps it: its SHA-256.
type TokenDigest = [u8; 32];

fn token_digest(token: &str) -> TokenDigest {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Compares two token digests in constant time (`subtle`): fixed-length inputs, so neither
/// the position of the first difference nor a length tells anything.
fn constant_time_eq(a: &TokenDigest, b: &TokenDigest) -> bool {
    a.ct_eq(b).into()
}

impl Auth {
    /// Parses the JSON document of grants.
    ///
    /// # Errors
    /// A message naming the problem (never a token): bad JSON, an unknown field, a token
    /// shorter than [`MIN_TOKEN_LEN`], a duplicate token or name, a bad namespace.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let file: GrantsFile = serde_json::from_str(text)
            // serde_json's message quotes no values, only positions and field names.
            .map_err(|err| format!("tokens: {err}"))?;
        if file.tokens.is_empty() {
            return Err(
                "tokens: the list is empty; remove the setting to turn authentication off".into(),
            );
        }
        let mut grants: Vec<Grant> = Vec::new();
        for spec in file.tokens {
            if spec.token.len() < MIN_TOKEN_LEN || spec.token.chars().any(|c| !c.is_ascii_graphic())
            {
                return Err(format!(
                    "token {:?}: must be at least {MIN_TOKEN_LEN} printable ASCII characters without spaces",
                    spec.name
                ));
            }
            if grants.iter().any(|grant| grant.name == spec.name) {
                return Err(format!("token {:?}: the name is used twice", spec.name));
            }
            let token = token_digest(&spec.token);
            if grants
                .iter()
                .any(|grant| constant_time_eq(&grant.token, &token))
            {
                return Err(format!(
                    "token {:?}: the same token is configured twice",
                    spec.name
                ));
            }
            grants.push(Grant {
                read: Namespaces::parse(&spec.name, "read", spec.read)?,
                write: Namespaces::parse(&spec.name, "write", spec.write)?,
                admin: spec.admin,
                token,
                name: spec.name,
            });
        }
        Ok(Auth {
            grants: Arc::new(grants),
        })
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether no token is configured (never true for a parsed `Auth`).
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Finds the grant of the request's `authorization: Bearer <token>` metadata.
    ///
    /// # Errors
    /// UNAUTHENTICATED when the metadata is missing, malformed or names no configured token.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Grant, Status> {
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| Status::unauthenticated("authorization: expected 'Bearer <token>'"))?;
        // Every grant is compared, so the time taken does not tell which one nearly matched.
        let presented = token_digest(presented);
        let mut found = None;
        for grant in self.grants.iter() {
            if constant_time_eq(&grant.token, &presented) {
                found = Some(grant);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Status::unauthenticated("authorization: unknown token"))
    }

    /// The interceptor for the cache service: authenticates and attaches the grant.
    pub fn interceptor(self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        move |mut request: Request<()>| {
            let grant = self.authenticate(request.metadata())?;
            request.extensions_mut().insert(Arc::new(grant));
            Ok(request)
        }
    }
}

/// Checks that the grant the interceptor attached to a request's extensions (if
/// authentication is on) allows `access`.
///
/// # Errors
/// PERMISSION_DENIED naming the grant and what it lacks; UNAUTHENTICATED when authentication
/// is on but the request carries no grant (it did not pass the interceptor).
pub fn authorize(
    extensions: &tonic::Extensions,
    enabled: bool,
    access: Access<'_>,
) -> Result<(), Status> {
    if !enabled {
        return Ok(());
    }
    let Some(grant) = extensions.get::<Arc<Grant>>() else {
        return Err(Status::unauthenticated("missing credentials"));
    };
    let allowed = match access {
        Access::Read(namespace) => grant.read.covers(namespace),
        Access::Write(namespace) => grant.write.covers(namespace),
        Access::Admin => grant.admin,
        Access::Any => true,
    };
    if allowed {
        return Ok(());
    }
    let what = match access {
        Access::Read(namespace) => format!("read namespace {namespace:?}"),
        Access::Write(namespace) => format!("write namespace {namespace:?}"),
        Access::Admin => "call admin RPCs (BustNamespace, BustAll, Keys)".to_owned(),
        Access::Any => unreachable!("any grant allows Any"),
    };
    Err(Status::permission_denied(format!(
        "token {:?} may not {what}",
        grant.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRANTS: &str = r#"{"tokens": [
        {"name": "billing", "token": "billing-token-0123456789", "read": ["billing"], "write": ["billing"]},
        {"name": "ops", "token": "ops-token-0123456789abcd", "read": ["*"], "write": ["*"], "admin": true}
    ]}"#;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().unwrap());
        map
    }

    /// Tokens are compared by their digests: equal only for the same token, whatever the
    /// lengths, and a prefix or an extension of a token is not the token.
    #[test]
    fn token_comparison_is_exact_on_fixed_length_digests() {
        let token = token_digest("billing-token-0123456789");
        assert!(constant_time_eq(
            &token,
            &token_digest("billing-token-0123456789")
        ));
        for other in [
            "billing-token-012345678",
            "billing-token-01234567890",
            "",
            "Billing-token-0123456789",
        ] {
            assert!(!constant_time_eq(&token, &token_digest(other)), "{other:?}");
        }
    }

    /// The right token finds its grant; others are refused as UNAUTHENTICATED.
    #[test]
    fn tokens_authenticate() {
        let auth = Auth::from_json(GRANTS).unwrap();
        let grant = auth
            .authenticate(&metadata("Bearer billing-token-0123456789"))
            .unwrap();
        assert_eq!(grant.name(), "billing");
        assert_eq!(
            auth.authenticate(&metadata("bearer ops-token-0123456789abcd"))
                .unwrap()
                .name(),
            "ops"
        );
        for bad in [
            "Bearer billing-token-012345678",
            "Basic billing-token-0123456789",
            "billing-token-0123456789",
        ] {
            let err = auth.authenticate(&metadata(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert_eq!(
            auth.authenticate(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    /// Bad configurations are refused without echoing the token.
    #[test]
    fn bad_configurations_are_refused() {
        let short = r#"{"tokens": [{"name": "a", "token": "short"}]}"#;
        let err = Auth::from_json(short).unwrap_err();
        assert!(
            err.contains("at least 16") && !err.contains("short\""),
            "{err}"
        );
        let twice = r#"{"tokens": [{"name": "a", "token": "0123456789abcdef"}, {"name": "b", "token": "0123456789abcdef"}]}"#;
        assert!(Auth::from_json(twice).unwrap_err().contains("twice"));
        let bad_ns = r#"{"tokens": [{"name": "a", "token": "0123456789abcdef", "read": ["a:b"]}]}"#;
        assert!(Auth::from_json(bad_ns).unwrap_err().contains("read"));
        let typo = r#"{"tokens": [{"name": "a", "token": "0123456789abcdef", "writes": ["x"]}]}"#;
        assert!(Auth::from_json(typo).unwrap_err().contains("unknown field"));
        assert!(Auth::from_json(r#"{"tokens": []}"#).is_err());
    }

    /// A grant's Debug output never contains its token.
    #[test]
    fn debug_hides_the_token() {
        let auth = Auth::from_json(GRANTS).unwrap();
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("billing") && !shown.contains("billing-token"),
            "{shown}"
        );
    }
}
