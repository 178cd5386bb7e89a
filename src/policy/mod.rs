//! The policy: which tiers exist and what each allows. Parsed from TOML and validated once, so
//! the engine only ever sees a [`Policy`] that makes sense.

pub mod callers;
mod file;
mod money;
mod scopes;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::tokens::{built_in_encoding, Encoding};

pub use file::PolicyError;
pub use money::{micro_usd, Price, MICRO_USD_PER_USD};
pub use scopes::{ip_scope_key, ScopeLimits, IPV6_SCOPE_PREFIX};

/// The policy served when none is given: `tollgate serve` works out of the box.
pub const DEFAULT_POLICY_TOML: &str = include_str!("default.toml");

/// Hold life when a tier does not say (`hold_seconds`).
pub const DEFAULT_HOLD_SECONDS: u64 = 300;
/// Longest hold a Reserve may ask for when a tier does not say (`max_hold_seconds`).
pub const DEFAULT_MAX_HOLD_SECONDS: u64 = 3600;
/// Longest a hold may live in all, through Extends, when a tier does not say
/// (`max_hold_lifetime_seconds`): a day, or `max_hold_seconds` if that is longer.
pub const DEFAULT_MAX_HOLD_LIFETIME_SECONDS: u64 = 24 * 3600;
/// No hold may live longer than a week: expired holds must be settled within the late-commit
/// window, and a week-long hold is a leak, not a call.
pub const HOLD_SECONDS_CEILING: u64 = 7 * 24 * 3600;
/// Output tokens held when neither the Reserve nor the policy says: 4,096, the output ceiling
/// of many chat models, so a Reserve without `max_output_tokens` rarely undercharges.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4_096;
/// Longest model name, in bytes (requests and policy alike).
pub const MAX_MODEL_NAME_BYTES: usize = 128;
/// Most tokens one request may hold or report: 100 million, far above any model's context
/// window, and far enough below u64::MAX that no sum of them can overflow.
pub const MAX_TOKENS_PER_REQUEST: u64 = 100_000_000;
/// The largest value any limit may have: 10^15 keeps every sum in the engine far from overflow.
pub const LIMIT_CEILING: u64 = 1_000_000_000_000_000;
/// Most tokens (prompt + completion) one Commit may report beyond its hold when the policy
/// does not say (`max_commit_tokens`): 2 million, the largest context window the major hosted
/// APIs serve today (Gemini's), and one call's prompt and completion together fit in its
/// model's context window. A report above it is no real call (a bug, or a forged report), and
/// charging it would put every shared scope (group, IP, fleet) into debt for a long time.
pub const DEFAULT_MAX_COMMIT_TOKENS: u64 = 2_000_000;

/// The limits of one tier. `None` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Steady refill of the token bucket.
    pub tokens_per_minute: Option<u64>,
    /// Capacity of the token bucket (defaults to `tokens_per_minute`).
    pub burst_tokens: Option<u64>,
    /// Admitted Reserves in a rolling minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens charged and held in a UTC day.
    pub tokens_per_day: Option<u64>,
    /// Tokens charged and held in a UTC calendar month.
    pub tokens_per_month: Option<u64>,
    /// Open holds at once.
    pub max_concurrent: Option<u32>,
    /// Default hold life, in seconds.
    pub hold_seconds: u64,
    /// Longest hold a Reserve or Extend may ask for, in seconds.
    pub max_hold_seconds: u64,
    /// Longest a hold may live in all, from its Reserve to its (extended) expiry, in seconds.
    pub max_hold_lifetime_seconds: u64,
    /// False: shadow mode. Decide as usual, report and count what would have been denied, and
    /// allow anyway (a safe way to roll out new limits).
    pub enforce: bool,
    /// The models the tier may use (`None`: any). A name also admits its dated snapshots
    /// (`gpt-4o` admits `gpt-4o-2024-08-06`, not `gpt-4o-mini`).
    pub models: Option<Vec<String>>,
    /// Money spent (charged and held) in a UTC day, in µUSD.
    pub usd_per_day: Option<u64>,
    /// Money spent (charged and held) in a UTC calendar month, in µUSD.
    pub usd_per_month: Option<u64>,
    /// What a subject of the tier gets instead of a denial when its token or money quota is
    /// spent or it asks for a model outside `models` (tiers only).
    pub downgrade: Option<Downgrade>,
    /// Relay mode, when the central service cannot be reached: true allows the call (counted
    /// and reported), false (the default) denies it with `upstream_unavailable` (tiers only).
    pub fail_open: bool,
}

/// A tier's auto-downgrade: the cheaper model granted, and the budget for degraded use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downgrade {
    /// The model granted instead (it need not be in the tier's `models`).
    pub model: String,
    /// Tokens (charged and held) a subject may use on the downgrade model in a UTC day
    /// (`None`: unlimited).
    pub tokens_per_day: Option<u64>,
}

impl Limits {
    /// No limit at all: what a scope the policy says nothing about gets.
    pub fn unlimited() -> Self {
        Self {
            tokens_per_minute: None,
            burst_tokens: None,
            requests_per_minute: None,
            tokens_per_day: None,
            tokens_per_month: None,
            max_concurrent: None,
            hold_seconds: DEFAULT_HOLD_SECONDS,
            max_hold_seconds: DEFAULT_MAX_HOLD_SECONDS,
            max_hold_lifetime_seconds: DEFAULT_MAX_HOLD_LIFETIME_SECONDS,
            enforce: true,
            models: None,
            usd_per_day: None,
            usd_per_month: None,
            downgrade: None,
            fail_open: false,
        }
    }
}

/// Limits set for one subject by an operator (Admin.SetSubject), over its tier's. Each set
/// field replaces the tier's value; an override cannot make a limit unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overrides {
    /// Replaces `tokens_per_minute`.
    pub tokens_per_minute: Option<u64>,
    /// Replaces `burst_tokens` (applies where `tokens_per_minute` is set).
    pub burst_tokens: Option<u64>,
    /// Replaces `requests_per_minute`.
    pub requests_per_minute: Option<u64>,
    /// Replaces `tokens_per_day`.
    pub tokens_per_day: Option<u64>,
    /// Replaces `tokens_per_month`.
    pub tokens_per_month: Option<u64>,
    /// Replaces `max_concurrent`.
    pub max_concurrent: Option<u32>,
    /// Replaces `usd_per_day` (µUSD).
    pub usd_per_day: Option<u64>,
    /// Replaces `usd_per_month` (µUSD).
    pub usd_per_month: Option<u64>,
    /// Replaces the downgrade budget's `tokens_per_day` (applies where the tier downgrades).
    pub downgrade_tokens_per_day: Option<u64>,
}

impl Overrides {
    /// Whether no limit is overridden.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The first value above [`LIMIT_CEILING`], as (field, value).
    pub fn out_of_range(&self) -> Option<(&'static str, u64)> {
        [
            ("tokens_per_minute", self.tokens_per_minute),
            ("burst_tokens", self.burst_tokens),
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
            ("usd_per_day", self.usd_per_day),
            ("usd_per_month", self.usd_per_month),
            ("downgrade_tokens_per_day", self.downgrade_tokens_per_day),
        ]
        .into_iter()
        .find_map(|(f, v)| v.filter(|v| *v > LIMIT_CEILING).map(|v| (f, v)))
    }

    /// `limits` with these overrides applied.
    pub fn apply(&self, limits: &Limits) -> Limits {
        let mut l = limits.clone();
        if let Some(v) = self.tokens_per_minute {
            l.tokens_per_minute = Some(v);
        }
        if let Some(v) = self.burst_tokens {
            l.burst_tokens = Some(v);
        }
        if let Some(v) = self.requests_per_minute {
            l.requests_per_minute = Some(v);
        }
        if let Some(v) = self.tokens_per_day {
            l.tokens_per_day = Some(v);
        }
        if let Some(v) = self.tokens_per_month {
            l.tokens_per_month = Some(v);
        }
        if let Some(v) = self.max_concurrent {
            l.max_concurrent = Some(v);
        }
        if let Some(v) = self.usd_per_day {
            l.usd_per_day = Some(v);
        }
        if let Some(v) = self.usd_per_month {
            l.usd_per_month = Some(v);
        }
        if let (Some(v), Some(d)) = (self.downgrade_tokens_per_day, l.downgrade.as_mut()) {
            d.tokens_per_day = Some(v);
        }
        l
    }
}

/// What an operator set for one subject: its tier and limit overrides. Persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubjectConfig {
    /// The tier (if a policy reload removes it, the default tier applies).
    pub tier: String,
    /// Limits over the tier's.
    pub overrides: Overrides,
    /// The group (organisation or team) a Reserve without `group` is counted in.
    pub group: Option<String>,
}

/// A limit for display: its value, or "unlimited".
fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "unlimited".to_string(), |v| v.to_string())
}

/// Micro-dollars as dollars, without trailing zeros (2500000 -> "2.5").
fn dollars(micro: u64) -> String {
    let whole = micro / MICRO_USD_PER_USD;
    let frac = micro % MICRO_USD_PER_USD;
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{frac:06}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// Whether `model` is `name` or one of its dated snapshots (`name-<digit>...`).
pub fn model_matches(name: &str, model: &str) -> bool {
    model == name
        || model.strip_prefix(name).is_some_and(|rest| {
            rest.strip_prefix('-')
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
}

impl Limits {
    /// Whether the tier may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| model_matches(n, model)))
    }
}

impl Limits {
    /// The token bucket's configuration, if the tier limits tokens per minute.
    pub fn bucket(&self) -> Option<crate::engine::BucketLimit> {
        self.tokens_per_minute
            .map(|per_minute| crate::engine::BucketLimit {
                capacity: self.burst_tokens.unwrap_or(per_minute),
                per_minute,
            })
    }
}

/// A named set of limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// The tier's name, as subjects are assigned to it.
    pub name: String,
    /// What the tier allows.
    /// Shared, so a decision takes the tier's limits with a reference count, not a deep copy.
    pub limits: Arc<Limits>,
}

/// What the policy says about one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// The encoding that counts its prompts (default: the built-in table).
    pub encoding: Option<Encoding>,
    /// Output tokens held when a Reserve gives no `max_output_tokens`.
    pub default_max_output_tokens: Option<u64>,
    /// Its price (`None`: not priced; its calls cost nothing, and a scope with a money budget
    /// refuses it).
    pub price: Option<Price>,
}

/// The policy in force, swapped whole by a reload and read without any other lock: the request
/// path reads it (to pick a tokenizer) before it takes the engine lock, and must not contend
/// with decisions for it.
#[derive(Debug)]
pub struct PolicyCell(std::sync::RwLock<Arc<Policy>>);

impl PolicyCell {
    /// A cell holding `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self(std::sync::RwLock::new(policy))
    }

    /// The policy in force (a snapshot).
    pub fn get(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Put `policy` in force.
    pub fn set(&self, policy: Arc<Policy>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    enforce: bool,
    default_tier: String,
    tiers: BTreeMap<String, Tier>,
    models: BTreeMap<String, ModelConfig>,
    scopes: ScopeLimits,
    /// Most tokens a Commit may report beyond its hold (see [`Policy::max_commit_tokens`]).
    max_commit_tokens: u64,
    /// Every model a tier downgrades to, once, with its encoding: worked out at load, since
    /// each Reserve with a prompt to count needs it.
    downgrades: Vec<(String, Encoding)>,
    /// Who may call: `[callers]` and `[operators]`.
    access: Arc<callers::Access>,
}

impl Policy {
    /// Parse and validate policy TOML; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, PolicyError> {
        file::parse(text, origin)
    }

    /// Read, parse and validate a policy file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let origin = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(&origin, &e))?;
        Self::from_toml(&text, &origin)
    }

    /// The embedded default policy.
    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_POLICY_TOML, "<embedded default policy>")
            .expect("the embedded default policy is valid (checked by a unit test)")
    }

    pub(crate) fn new(
        enforce: bool,
        default_tier: String,
        tiers: BTreeMap<String, Tier>,
        models: BTreeMap<String, ModelConfig>,
        scopes: ScopeLimits,
        max_commit_tokens: u64,
    ) -> Self {
        debug_assert!(tiers.contains_key(&default_tier));
        let mut policy = Self {
            enforce,
            default_tier,
            tiers,
            models,
            scopes,
            max_commit_tokens,
            downgrades: Vec::new(),
            access: Arc::default(),
        };
        let mut downgrades: Vec<(String, Encoding)> = policy
            .tiers
            .values()
            .filter_map(|t| t.limits.downgrade.as_ref())
            .filter_map(|d| policy.encoding_for(&d.model).map(|e| (d.model.clone(), e)))
            .collect();
        downgrades.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        downgrades.dedup();
        policy.downgrades = downgrades;
        policy
    }

    /// This policy with `access` as its callers and operators.
    pub(crate) fn with_access(mut self, access: callers::Access) -> Self {
        self.access = Arc::new(access);
        self
    }

    /// Who may call the Quota and Admin APIs.
    pub fn access(&self) -> &Arc<callers::Access> {
        &self.access
    }

    /// The limits of groups, client IPs and the whole fleet.
    pub fn scopes(&self) -> &ScopeLimits {
        &self.scopes
    }

    /// Most tokens (prompt + completion) a Commit may report: more than this is refused, unless
    /// the hold itself was larger (a Commit within its hold takes nothing that was not admitted).
    ///
    /// Why a bound on what a Commit reports at all, when usage is truth: the overage of a
    /// Commit above its hold is charged to every scope the hold counts in, the fleet's among
    /// them, so one report no real call can have (10^8 tokens) would put `[global]`'s bucket
    /// into debt for the whole fleet for as long as it takes to refill. One fleet-wide number,
    /// not one per tier: what no call can use is a property of the models, not of who pays.
    pub fn max_commit_tokens(&self) -> u64 {
        self.max_commit_tokens
    }

    /// `model`'s price, if the policy gives one.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.model(model).and_then(|m| m.price)
    }

    /// Every model a tier downgrades to, with its encoding (a Reserve's prompt is counted for
    /// each of them too when their encodings differ from the requested model's).
    pub fn downgrades(&self) -> &[(String, Encoding)] {
        &self.downgrades
    }

    /// The policy's entry for `model`: the entry of that exact name, or of the name it is a
    /// dated snapshot of (`gpt-4o-2024-08-06` and `gpt-4-0613` take the entries `gpt-4o` and
    /// `gpt-4`: a `-` then a digit follows the name). `gpt-4o-mini` does not take `gpt-4o`'s.
    pub fn model(&self, model: &str) -> Option<&ModelConfig> {
        if let Some(m) = self.models.get(model) {
            return Some(m);
        }
        self.models
            .iter()
            .filter(|(name, _)| model_matches(name, model))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, m)| m)
    }

    /// The encoding that counts `model`'s prompts: the policy's `[models]` entry if it names
    /// one, else the built-in table; `None` for a model neither knows.
    pub fn encoding_for(&self, model: &str) -> Option<Encoding> {
        self.model(model)
            .and_then(|m| m.encoding)
            .or_else(|| built_in_encoding(model))
    }

    /// Output tokens to hold for `model` when a Reserve gives no `max_output_tokens`.
    pub fn default_max_output_tokens(&self, model: &str) -> u64 {
        self.model(model)
            .and_then(|m| m.default_max_output_tokens)
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
    }

    /// A readable summary: each tier's limits (the default marked), the scopes' limits, and
    /// each model entry.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "commits: at most {} tokens (prompt + completion) each, or the hold if larger",
            self.max_commit_tokens
        );
        for t in self.tiers.values() {
            let l = &t.limits;
            let default = if t.name == self.default_tier {
                " (default)"
            } else {
                ""
            };
            let _ = writeln!(out, "tier {}{default}", t.name);
            let _ = writeln!(out, "  {}", self.limits_line(l));
            let _ = writeln!(
                out,
                "  holds: {} s by default, at most {} s a request, {} s in all",
                l.hold_seconds, l.max_hold_seconds, l.max_hold_lifetime_seconds
            );
            let _ = writeln!(
                out,
                "  models: {}",
                l.models
                    .as_ref()
                    .map_or_else(|| "any".to_string(), |m| m.join(", "))
            );
            if l.fail_open {
                let _ = writeln!(
                    out,
                    "  relay: fails open when the central service is unreachable"
                );
            }
            if let Some(d) = &l.downgrade {
                let _ = writeln!(
                    out,
                    "  downgrade: to {}, tokens_per_day {}",
                    d.model,
                    show(d.tokens_per_day)
                );
            }
        }
        let scopes = &self.scopes;
        let _ = writeln!(
            out,
            "groups (default): {}",
            self.limits_line(&scopes.group_default)
        );
        for (name, l) in &scopes.groups {
            let _ = writeln!(out, "group {name}: {}", self.limits_line(l));
        }
        let _ = writeln!(out, "ip: {}", self.limits_line(&scopes.ip_default));
        for (net, l) in &scopes.ip_ranges {
            let _ = writeln!(out, "ip {net}: {}", self.limits_line(l));
        }
        let _ = writeln!(out, "global: {}", self.limits_line(&scopes.global));
        for (name, m) in &self.models {
            let price = m.price.map_or_else(
                || "no price".to_string(),
                |p| {
                    format!(
                        "${} / ${} per million tokens in / out",
                        dollars(p.input_per_million),
                        dollars(p.output_per_million)
                    )
                },
            );
            let _ = writeln!(
                out,
                "model {name}: encoding {}, default_max_output_tokens {}, {price}",
                self.encoding_for(name).map_or("?", Encoding::name),
                m.default_max_output_tokens
                    .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
            );
        }
        out
    }

    /// One line with the counting limits `l` sets (the others are unlimited).
    fn limits_line(&self, l: &Limits) -> String {
        let usd = |v: Option<u64>| v.map(|v| format!("${}", dollars(v)));
        let n = |v: Option<u64>| v.map(|v| v.to_string());
        let parts: Vec<String> = [
            (
                "tokens_per_minute",
                l.bucket()
                    .map(|b| format!("{} (burst {})", b.per_minute, b.capacity)),
            ),
            ("requests_per_minute", n(l.requests_per_minute)),
            ("tokens_per_day", n(l.tokens_per_day)),
            ("tokens_per_month", n(l.tokens_per_month)),
            ("usd_per_day", usd(l.usd_per_day)),
            ("usd_per_month", usd(l.usd_per_month)),
            ("max_concurrent", n(l.max_concurrent.map(u64::from))),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name} {v}")))
        .collect();
        let mut line = if parts.is_empty() {
            "no limits".to_string()
        } else {
            parts.join(", ")
        };
        if !(l.enforce && self.enforce) {
            line.push_str(" (shadow mode: not enforced)");
        }
        line
    }

    /// Every encoding the policy's models may need, for loading at start.
    pub fn encodings_in_use(&self) -> Vec<Encoding> {
        let mut out: Vec<Encoding> = vec![Encoding::O200kBase, Encoding::Cl100kBase];
        for e in self.models.values().filter_map(|m| m.encoding) {
            if !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }

    /// False: the whole policy is in shadow mode (see [`Limits::enforce`]).
    pub fn enforce(&self) -> bool {
        self.enforce
    }

    /// The tier a subject without an assignment gets.
    pub fn default_tier(&self) -> &Tier {
        &self.tiers[&self.default_tier]
    }

    /// A tier by name.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.get(name)
    }

    /// All tiers, by name.
    pub fn tiers(&self) -> impl Iterator<Item = &Tier> {
        self.tiers.values()
    }

    /// The tier for an assignment: the assigned tier if it still exists, else the default (a
    /// policy reload may remove a tier that subjects were assigned to).
    pub fn resolve(&self, assigned: Option<&str>) -> &Tier {
        assigned
            .and_then(|name| self.tiers.get(name))
            .unwrap_or_else(|| self.default_tier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let p = Policy::embedded_default();
        assert_eq!(p.default_tier().name, "free");
        assert_eq!(p.tier("free").unwrap().limits.tokens_per_day, Some(10_000));
        assert_eq!(p.tier("pro").unwrap().limits.tokens_per_day, Some(500_000));
    }

    #[test]
    fn minimal_policy_is_valid_and_leaves_the_rest_unlimited() {
        let p = Policy::from_toml(
            "default_tier = \"free\"\n\n[tiers.free]\ntokens_per_day = 500\n",
            "min.toml",
        )
        .unwrap();
        let l = &p.default_tier().limits;
        assert_eq!(l.tokens_per_day, Some(500));
        assert_eq!(l.tokens_per_minute, None);
        assert_eq!(l.requests_per_minute, None);
        assert_eq!(l.max_concurrent, None);
        assert_eq!(l.hold_seconds, DEFAULT_HOLD_SECONDS);
    }

    #[test]
    fn a_lifetime_alone_caps_the_default_max_hold() {
        let p = Policy::from_toml(
            "default_tier = \"t\"\n[tiers.t]\nmax_hold_lifetime_seconds = 600\n",
            "p.toml",
        )
        .unwrap();
        let l = &p.default_tier().limits;
        assert_eq!(
            (l.max_hold_seconds, l.max_hold_lifetime_seconds),
            (600, 600)
        );
        assert_eq!(l.hold_seconds, DEFAULT_HOLD_SECONDS);
    }

    #[test]
    fn an_unreadable_file_is_named_without_a_position() {
        let e = Policy::from_file(Path::new("/nonexistent/policy.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/policy.toml: cannot read"),
            "{e}"
        );
    }

    fn error_of(text: &str) -> String {
        Policy::from_toml(text, "p.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = error_of("default_tier = \"gold\"\n\n[tiers.free]\ntokens_per_day = 500\n");
        assert!(e.starts_with("p.toml:1:"), "{e}");
        assert!(e.contains("default_tier \"gold\" is not a tier"), "{e}");

        let e = error_of("default_tier = \"free\"\n[tiers.free]\ntokens_per_dya = 5\n");
        assert!(e.starts_with("p.toml:3:"), "{e}");
        assert!(e.contains("tokens_per_dya"), "{e}");

        let e = error_of("default_tier = \"free\"\n[tiers.free]\ntokens_per_day = -5\n");
        assert!(e.starts_with("p.toml:3:"), "{e}");

        let e = error_of("default_tier = \"free\"\n[tiers.free]\nburst_tokens = 5\n");
        assert!(e.starts_with("p.toml:2:"), "{e}");
        assert!(e.contains("burst_tokens needs tokens_per_minute"), "{e}");

        let e = error_of(
            "default_tier = \"free\"\n[tiers.free]\nhold_seconds = 100\nmax_hold_seconds = 50\n",
        );
        assert!(
            e.contains("hold_seconds (100) must not exceed max_hold_seconds (50)"),
            "{e}"
        );

        let e = error_of(
            "default_tier = \"free\"\n[tiers.free]\ntokens_per_day = 1000000000000000000\n",
        );
        assert!(e.contains("at most 1000000000000000"), "{e}");

        let e = error_of(
            "default_tier = \"free\"\n[tiers.free]\ntokens_per_day = 5\n[tiers.\"bad name\"]\n",
        );
        assert!(e.contains("tier name \"bad name\""), "{e}");
        let e = error_of("default_tier = \"t\"\n[tiers.t]\nusd_per_day = 0.0000001\n");
        assert!(e.starts_with("p.toml:3:"), "{e}");
        assert!(
            e.contains("usd_per_day must have at most six decimal places"),
            "{e}"
        );

        let e = error_of(
            "default_tier = \"t\"\n[tiers.t]\n[models.\"gpt-4o\"]\ninput_usd_per_million = 2.5\n",
        );
        assert!(
            e.contains("give both input_usd_per_million and output_usd_per_million"),
            "{e}"
        );

        let e = error_of(
            "default_tier = \"t\"\n[tiers.t]\ndowngrade = { model = \"mystery\", tokens_per_day = 5 }\n",
        );
        assert!(e.starts_with("p.toml:3:"), "{e}");
        assert!(
            e.contains("downgrade model \"mystery\" has no known tokenizer"),
            "{e}"
        );

        let e = error_of("default_tier = \"t\"\n[tiers.t]\n[global]\nhold_seconds = 5\n");
        assert!(e.starts_with("p.toml:3:"), "{e}");
        assert!(
            e.contains("[global]: hold_seconds applies to tiers only"),
            "{e}"
        );
    }

    #[test]
    fn max_commit_tokens_defaults_above_context_windows_and_is_bounded() {
        assert_eq!(
            Policy::embedded_default().max_commit_tokens(),
            DEFAULT_MAX_COMMIT_TOKENS
        );
        let p = Policy::from_toml(
            "max_commit_tokens = 5000\ndefault_tier = \"t\"\n[tiers.t]\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.max_commit_tokens(), 5_000);
        assert!(
            p.summary()
                .contains("commits: at most 5000 tokens (prompt + completion) each"),
            "{}",
            p.summary()
        );
        for bad in ["0", "100000001"] {
            let e = error_of(&format!(
                "default_tier = \"t\"\nmax_commit_tokens = {bad}\n[tiers.t]\n"
            ));
            assert!(e.starts_with("p.toml:2:"), "{e}");
            assert!(
                e.contains("max_commit_tokens must be from 1 to 100000000"),
                "{e}"
            );
        }
        let e = error_of("default_tier = \"t\"\nmax_commit_tokens = -1\n[tiers.t]\n");
        assert!(e.starts_with("p.toml:2:"), "{e}");
        // A fleet-wide bound: not a tier's key.
        let e = error_of("default_tier = \"t\"\n[tiers.t]\nmax_commit_tokens = 5\n");
        assert!(e.starts_with("p.toml:3:"), "{e}");
    }

    #[test]
    fn prices_and_budgets_are_whole_micro_dollars_and_named_groups_inherit_the_default() {
        let p = Policy::from_toml(
            r#"
default_tier = "t"
[tiers.t]
usd_per_day = 12.345678
downgrade = { model = "gpt-4o-mini" }
[groups.default]
tokens_per_day = 100
max_concurrent = 3
[groups."acme"]
tokens_per_day = 900
[ip]
requests_per_minute = 10
[ip.cidr."10.0.0.0/8"]
requests_per_minute = 1000
[ip.cidr."10.1.0.0/16"]
max_concurrent = 1
[models."gpt-4o-mini"]
input_usd_per_million = 0.15
output_usd_per_million = 0.6
"#,
            "p.toml",
        )
        .unwrap();
        let t = &p.default_tier().limits;
        assert_eq!(t.usd_per_day, Some(12_345_678));
        assert_eq!(t.downgrade.as_ref().unwrap().tokens_per_day, None);
        assert_eq!(
            p.price("gpt-4o-mini-2024-07-18"),
            Some(Price {
                input_per_million: 150_000,
                output_per_million: 600_000
            })
        );
        let acme = p.scopes().group("acme");
        assert_eq!(
            (acme.tokens_per_day, acme.max_concurrent),
            (Some(900), Some(3))
        );
        let other = p.scopes().group("other");
        assert_eq!(other.tokens_per_day, Some(100));
        // The most specific block wins, and takes what it leaves out from [ip].
        let ip = |a: [u8; 4]| p.scopes().ip(std::net::IpAddr::from(a));
        let narrow = ip([10, 1, 2, 3]);
        assert_eq!(
            (narrow.requests_per_minute, narrow.max_concurrent),
            (Some(10), Some(1))
        );
        assert_eq!(ip([10, 2, 0, 1]).requests_per_minute, Some(1000));
        assert_eq!(ip([192, 0, 2, 1]).requests_per_minute, Some(10));
    }
}
