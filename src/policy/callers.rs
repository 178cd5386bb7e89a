//! Who may call: the `[callers]` table (app servers on the Quota API) and the `[operators]`
//! table (people and tools on the Admin API), read with the policy and reloaded with it.
//!
//! ```toml
//! [callers.chat-app]
//! token_sha256 = "…64 hex digits…"   # SHA-256 of its bearer token (`tollgate hash-token`)
//! san = "chat-app.internal"           # and/or: a DNS or URI SAN of its mTLS client certificate
//! calls = ["Reserve", "Commit", "Refund", "Extend", "GetUsage", "CountTokens"]  # default: all
//! subject_prefix = "chat:"            # optional: only subjects that start with it
//! groups = ["acme", "beta"]           # optional: a Reserve must name one of them as its group
//!
//! [operators.alice]
//! token_sha256 = "…"                  # an Admin token of alice's; calls are logged as hers
//! ```
//!
//! Why hashes: the policy file is a ConfigMap, readable by more people than the tokens should
//! be; a SHA-256 of a long random token gives nothing away. Tokens are compared by hashing the
//! one presented and comparing the digests in constant time, against every entry, so neither
//! the length of a guess nor which entry it came close to shows in the time taken.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The Quota calls a caller may be allowed.
pub const QUOTA_CALLS: [&str; 6] = [
    "Reserve",
    "Commit",
    "Refund",
    "Extend",
    "GetUsage",
    "CountTokens",
];

/// Longest `subject_prefix`, in bytes.
pub const MAX_PREFIX_BYTES: usize = 256;
/// Most entries in `groups` of one caller, and most callers or operators in a policy.
pub const MAX_LIST: usize = 1024;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// The SHA-256 of `token` in hex: what a `token_sha256` entry holds (`tollgate hash-token`).
pub fn token_sha256_hex(token: &str) -> String {
    hash_token(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 of `token`.
pub fn hash_token(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// One app server allowed on the Quota API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its name, as the policy gives it: in logs and in PERMISSION_DENIED messages.
    pub name: String,
    /// The SHA-256 of its bearer token.
    pub token_sha256: Option<Digest32>,
    /// A SAN its mTLS client certificate carries.
    pub san: Option<String>,
    /// The Quota calls it may make (by method name).
    pub calls: Vec<String>,
    /// If set, the only subjects it may name start with this.
    pub subject_prefix: Option<String>,
    /// If set, a Reserve of its must name one of these groups, and a GetUsage of a group
    /// must ask about one of them.
    pub groups: Option<Vec<String>>,
}

impl Caller {
    /// Whether it may make `call`.
    pub fn may_call(&self, call: &str) -> bool {
        self.calls.iter().any(|c| c == call)
    }

    /// Whether it may name `subject`.
    pub fn may_name(&self, subject: &str) -> bool {
        self.subject_prefix
            .as_deref()
            .is_none_or(|p| subject.starts_with(p))
    }

    /// Whether it may act in `group` (a Reserve's or GetUsage's `group`, or none). A caller
    /// bound to `groups` must name one of them. A caller bound only to a subject prefix may
    /// name no group: naming one would charge that group's budget (and free its subjects
    /// from their own group's), which only the groups listed for it may be. An unbound caller
    /// may name any.
    pub fn may_use_group(&self, group: Option<&str>) -> bool {
        match (&self.groups, group) {
            (Some(groups), Some(g)) => groups.iter().any(|x| x == g),
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(_)) => self.subject_prefix.is_none(),
        }
    }

    /// Whether it is bound to its subjects or groups (and so may not read what is shared).
    pub fn bound(&self) -> bool {
        self.subject_prefix.is_some() || self.groups.is_some()
    }
}

/// One person or tool allowed on the Admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The name every Admin call it makes is logged with.
    pub name: String,
    /// The SHA-256 of its bearer token.
    pub token_sha256: Digest32,
}

/// The `[callers]` and `[operators]` of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// App servers; none: the Quota API is open to anyone who reaches the port. Shared, so
    /// that a call holds its caller without copying its lists.
    pub callers: Vec<std::sync::Arc<Caller>>,
    /// Operators with names (beside `--admin-token`, if given).
    pub operators: Vec<Operator>,
}

impl Access {
    /// Whether the Quota API requires a known caller.
    pub fn callers_required(&self) -> bool {
        !self.callers.is_empty()
    }

    /// The caller whose token is `token`. Every entry is compared (in constant time), so the
    /// time taken does not say which came close.
    pub fn caller_by_token(&self, token: &str) -> Option<&std::sync::Arc<Caller>> {
        let given = hash_token(token);
        let mut found = None;
        for c in &self.callers {
            if let Some(h) = &c.token_sha256 {
                if bool::from(h.ct_eq(&given)) && found.is_none() {
                    found = Some(c);
                }
            }
        }
        found
    }

    /// The caller one of whose SANs is in `sans`.
    pub fn caller_by_san<'a>(&'a self, sans: &[String]) -> Option<&'a std::sync::Arc<Caller>> {
        self.callers
            .iter()
            .find(|c| c.san.as_ref().is_some_and(|s| sans.iter().any(|x| x == s)))
    }

    /// The operator whose token is `token` (every entry compared in constant time).
    pub fn operator_by_token(&self, token: &str) -> Option<&Operator> {
        let given = hash_token(token);
        let mut found = None;
        for o in &self.operators {
            if bool::from(o.token_sha256.ct_eq(&given)) && found.is_none() {
                found = Some(o);
            }
        }
        found
    }
}

/// `[callers.NAME]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallerFile {
    token_sha256: Option<String>,
    san: Option<String>,
    calls: Option<Vec<String>>,
    subject_prefix: Option<String>,
    groups: Option<Vec<String>>,
}

/// `[operators.NAME]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OperatorFile {
    token_sha256: String,
}

fn digest(what: &str, hex: &str) -> Result<Digest32, String> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "{what}: token_sha256 must be 64 hex digits (the SHA-256 of the token: `tollgate hash-token`)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The access tables from their file form; an error names the entry and the rule.
pub(super) fn access(
    callers: BTreeMap<String, CallerFile>,
    operators: BTreeMap<String, OperatorFile>,
) -> Result<Access, String> {
    if callers.len() > MAX_LIST || operators.len() > MAX_LIST {
        return Err(format!(
            "at most {MAX_LIST} callers and {MAX_LIST} operators"
        ));
    }
    let mut out = Access::default();
    for (name, c) in callers {
        let what = format!("[callers.{name}]");
        if !super::file::valid_tier_name(&name) {
            return Err(format!(
                "{what}: a caller's name must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.'"
            ));
        }
        let token_sha256 = c
            .token_sha256
            .as_deref()
            .map(|h| digest(&what, h))
            .transpose()?;
        if token_sha256.is_none() && c.san.is_none() {
            return Err(format!(
                "{what}: needs token_sha256 or san (how the caller proves who it is)"
            ));
        }
        if let Some(san) = &c.san {
            if san.is_empty() || san.len() > 256 || san.chars().any(char::is_control) {
                return Err(format!(
                    "{what}: san must be 1 to 256 bytes without control characters"
                ));
            }
        }
        let calls = c
            .calls
            .unwrap_or_else(|| QUOTA_CALLS.iter().map(|s| (*s).to_string()).collect());
        if let Some(bad) = calls.iter().find(|c| !QUOTA_CALLS.contains(&c.as_str())) {
            return Err(format!(
                "{what}: calls: {bad:?} is not a Quota call ({})",
                QUOTA_CALLS.join(", ")
            ));
        }
        if let Some(p) = &c.subject_prefix {
            if p.is_empty() || p.len() > MAX_PREFIX_BYTES {
                return Err(format!(
                    "{what}: subject_prefix must be 1 to {MAX_PREFIX_BYTES} bytes"
                ));
            }
        }
        if let Some(groups) = &c.groups {
            if groups.is_empty() || groups.len() > MAX_LIST {
                return Err(format!("{what}: groups must list 1 to {MAX_LIST} groups"));
            }
            if groups.iter().any(|g| g.is_empty() || g.len() > 128) {
                return Err(format!("{what}: each group must be 1 to 128 bytes"));
            }
        }
        out.callers.push(std::sync::Arc::new(Caller {
            name,
            token_sha256,
            san: c.san,
            calls,
            subject_prefix: c.subject_prefix,
            groups: c.groups,
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for c in &out.callers {
        if let Some(h) = c.token_sha256 {
            if !seen.insert(h) {
                return Err(format!(
                    "[callers.{}]: its token_sha256 is another caller's too",
                    c.name
                ));
            }
        }
    }
    for (name, o) in operators {
        let what = format!("[operators.{name}]");
        if !super::file::valid_tier_name(&name) {
            return Err(format!(
                "{what}: an operator's name must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.'"
            ));
        }
        out.operators.push(Operator {
            token_sha256: digest(&what, &o.token_sha256)?,
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_by_its_hash_and_a_near_miss_is_not() {
        let mut callers = BTreeMap::new();
        callers.insert(
            "chat".to_string(),
            CallerFile {
                token_sha256: Some(token_sha256_hex("s3cret-token")),
                san: None,
                calls: None,
                subject_prefix: Some("chat:".into()),
                groups: None,
            },
        );
        let a = access(callers, BTreeMap::new()).unwrap();
        assert_eq!(a.caller_by_token("s3cret-token").unwrap().name, "chat");
        assert!(a.caller_by_token("s3cret-tokem").is_none());
        assert!(a.caller_by_token("s3cret-token ").is_none());
        assert!(a.caller_by_token("").is_none());
        let c = &a.callers[0];
        assert!(c.may_name("chat:alice") && !c.may_name("search:alice"));
        assert!(c.may_call("Commit"));
    }

    #[test]
    fn bad_entries_are_refused_naming_the_rule() {
        let bad = |f: CallerFile| {
            let mut m = BTreeMap::new();
            m.insert("x".to_string(), f);
            access(m, BTreeMap::new()).unwrap_err()
        };
        let none = CallerFile {
            token_sha256: None,
            san: None,
            calls: None,
            subject_prefix: None,
            groups: None,
        };
        assert!(bad(none).contains("needs token_sha256 or san"));
        let short = CallerFile {
            token_sha256: Some("abc".into()),
            san: None,
            calls: None,
            subject_prefix: None,
            groups: None,
        };
        assert!(bad(short).contains("64 hex digits"));
        let call = CallerFile {
            token_sha256: None,
            san: Some("a".into()),
            calls: Some(vec!["SetSubject".into()]),
            subject_prefix: None,
            groups: None,
        };
        assert!(bad(call).contains("is not a Quota call"));
    }
}
