//! The policy file format (TOML) and its validation, with errors that name file, line and
//! reason so an operator can fix a bad policy without reading code.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::money::{micro_usd, Price, MAX_PRICE_USD_PER_MILLION};
use super::scopes::{ScopeLimits, IPV6_SCOPE_PREFIX, MAX_CIDR_ENTRIES, MAX_GROUP_ENTRIES};
use super::{
    Downgrade, Limits, ModelConfig, Policy, Tier, DEFAULT_HOLD_SECONDS, DEFAULT_MAX_COMMIT_TOKENS,
    DEFAULT_MAX_HOLD_LIFETIME_SECONDS, DEFAULT_MAX_HOLD_SECONDS, HOLD_SECONDS_CEILING,
    LIMIT_CEILING, MAX_MODEL_NAME_BYTES, MAX_TOKENS_PER_REQUEST,
};
use crate::tokens::{built_in_encoding, Encoding, ALL_ENCODINGS};

/// Why a policy was refused: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file (or `<embedded default policy>`).
    pub origin: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            // The file itself could not be read: there is no position to name.
            write!(f, "{}: {}", self.origin, self.reason)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.origin, self.line, self.column, self.reason
            )
        }
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    pub(super) fn unreadable(origin: &str, err: &std::io::Error) -> Self {
        Self {
            origin: origin.to_string(),
            line: 0,
            column: 0,
            reason: format!("cannot read the policy file: {err}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    enforce: Option<bool>,
    max_commit_tokens: Option<Spanned<u64>>,
    default_tier: Spanned<String>,
    tiers: Spanned<BTreeMap<String, Spanned<TierFile>>>,
    #[serde(default)]
    models: BTreeMap<String, Spanned<ModelFile>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<TierFile>>,
    ip: Option<Spanned<TierFile>>,
    global: Option<Spanned<TierFile>>,
    callers: Option<Spanned<BTreeMap<String, super::callers::CallerFile>>>,
    operators: Option<Spanned<BTreeMap<String, super::callers::OperatorFile>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    encoding: Option<Spanned<String>>,
    default_max_output_tokens: Option<Spanned<u64>>,
    input_usd_per_million: Option<Spanned<f64>>,
    output_usd_per_million: Option<Spanned<f64>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct DowngradeFile {
    model: Spanned<String>,
    tokens_per_day: Option<Spanned<u64>>,
}

/// A tier's table; `[groups.*]`, `[ip]` and `[global]` take the same keys except those that
/// only make sense for a tier (holds, models, downgrade), and only `[ip]` takes `cidr`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct TierFile {
    tokens_per_minute: Option<Spanned<u64>>,
    burst_tokens: Option<Spanned<u64>>,
    requests_per_minute: Option<Spanned<u64>>,
    tokens_per_day: Option<Spanned<u64>>,
    tokens_per_month: Option<Spanned<u64>>,
    max_concurrent: Option<Spanned<u32>>,
    enforce: Option<bool>,
    hold_seconds: Option<Spanned<u64>>,
    max_hold_seconds: Option<Spanned<u64>>,
    max_hold_lifetime_seconds: Option<Spanned<u64>>,
    models: Option<Spanned<Vec<String>>>,
    usd_per_day: Option<Spanned<f64>>,
    usd_per_month: Option<Spanned<f64>>,
    downgrade: Option<Spanned<DowngradeFile>>,
    fail: Option<Spanned<String>>,
    cidr: Option<BTreeMap<String, Spanned<TierFile>>>,
}

impl TierFile {
    /// These limits, with each one left out taken from `base` (a named group from
    /// `[groups.default]`, a CIDR entry from `[ip]`).
    fn inherit(mut self, base: &TierFile) -> TierFile {
        macro_rules! take {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = base.$f.clone(); } )* };
        }
        take!(
            tokens_per_minute,
            burst_tokens,
            requests_per_minute,
            tokens_per_day,
            tokens_per_month,
            max_concurrent,
            enforce,
            usd_per_day,
            usd_per_month
        );
        self
    }

    /// The first key that a scope table (not a tier) must not have, with its name.
    fn tier_only_key(&self, allow_cidr: bool) -> Option<&'static str> {
        [
            ("hold_seconds", self.hold_seconds.is_some()),
            ("max_hold_seconds", self.max_hold_seconds.is_some()),
            (
                "max_hold_lifetime_seconds",
                self.max_hold_lifetime_seconds.is_some(),
            ),
            ("models", self.models.is_some()),
            ("downgrade", self.downgrade.is_some()),
            ("fail", self.fail.is_some()),
            ("cidr", self.cidr.is_some() && !allow_cidr),
        ]
        .into_iter()
        .find_map(|(k, set)| set.then_some(k))
    }
}

/// Largest money budget: a billion dollars (10¹⁵ µUSD, the limit ceiling).
const MAX_BUDGET_USD: f64 = 1e9;

struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, reason: impl Into<String>) -> PolicyError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        PolicyError {
            origin: self.origin.to_string(),
            line,
            column,
            reason: reason.into(),
        }
    }
}

/// A name of a tier, a caller or an operator: 1 to 64 of A-Z, a-z, 0-9, `_`, `-`, `.`.
pub(super) fn valid_tier_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(super) fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let src = Source { text, origin };
    let file: PolicyFile = toml::from_str(text)
        .map_err(|e| src.error(e.span().unwrap_or(0..0), e.message().trim_end().to_string()))?;
    let tiers_span = file.tiers.span();
    let mut tiers = BTreeMap::new();
    // Where each downgrade is written, to name it if its model turns out unknown.
    let mut downgrade_spans = BTreeMap::new();
    for (name, tier) in file.tiers.into_inner() {
        if let Some(d) = &tier.get_ref().downgrade {
            downgrade_spans.insert(name.clone(), d.span());
        }
        if !valid_tier_name(&name) {
            return Err(src.error(
                tier.span(),
                format!(
                    "tier name {name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-', '.'"
                ),
            ));
        }
        if tier.get_ref().cidr.is_some() {
            return Err(src.error(
                tier.span(),
                format!("[tiers.{name:?}]: cidr applies to [ip] only"),
            ));
        }
        let limits = tier_limits(&src, tier)?;
        tiers.insert(
            name.clone(),
            Tier {
                name,
                limits: Arc::new(limits),
            },
        );
    }
    if tiers.is_empty() {
        return Err(src.error(tiers_span, "the policy must define at least one tier"));
    }
    if !tiers.contains_key(file.default_tier.get_ref()) {
        let names: Vec<_> = tiers.keys().map(String::as_str).collect();
        return Err(src.error(
            file.default_tier.span(),
            format!(
                "default_tier {:?} is not a tier of this policy (tiers: {})",
                file.default_tier.get_ref(),
                names.join(", ")
            ),
        ));
    }
    let mut models = BTreeMap::new();
    for (name, model) in file.models {
        let span = model.span();
        if name.is_empty()
            || name.len() > MAX_MODEL_NAME_BYTES
            || name.chars().any(char::is_control)
        {
            return Err(src.error(
                span,
                format!("model name {name:?} must be 1 to {MAX_MODEL_NAME_BYTES} bytes without control characters"),
            ));
        }
        let m = model.into_inner();
        let encoding = match m.encoding {
            Some(e) => Some(Encoding::from_name(e.get_ref()).ok_or_else(|| {
                let known: Vec<_> = ALL_ENCODINGS.iter().map(|e| e.name()).collect();
                src.error(
                    e.span(),
                    format!(
                        "encoding {:?} is unknown (known: {})",
                        e.get_ref(),
                        known.join(", ")
                    ),
                )
            })?),
            None => None,
        };
        let default_max_output_tokens = match m.default_max_output_tokens {
            Some(v) if *v.get_ref() > MAX_TOKENS_PER_REQUEST => {
                return Err(src.error(
                    v.span(),
                    format!("default_max_output_tokens must be at most {MAX_TOKENS_PER_REQUEST}"),
                ))
            }
            Some(v) => Some(v.into_inner()),
            None => None,
        };
        let price = match (m.input_usd_per_million, m.output_usd_per_million) {
            (None, None) => None,
            (Some(i), Some(o)) => {
                let per_million = |v: &Spanned<f64>, field: &str| {
                    micro_usd(*v.get_ref(), MAX_PRICE_USD_PER_MILLION)
                        .map_err(|rule| src.error(v.span(), format!("{field} {rule}")))
                };
                Some(Price {
                    input_per_million: per_million(&i, "input_usd_per_million")?,
                    output_per_million: per_million(&o, "output_usd_per_million")?,
                })
            }
            _ => {
                return Err(src.error(
                    span,
                    format!("model {name:?}: give both input_usd_per_million and output_usd_per_million, or neither"),
                ))
            }
        };
        if encoding.is_none() && built_in_encoding(&name).is_none() {
            return Err(src.error(
                span,
                format!("model {name:?} is not in the built-in table: give it an encoding (e.g. encoding = \"o200k_base\")"),
            ));
        }
        models.insert(
            name,
            ModelConfig {
                encoding,
                default_max_output_tokens,
                price,
            },
        );
    }
    let scopes = scope_limits(&src, file.groups, file.ip, file.global)?;
    let max_commit_tokens = match file.max_commit_tokens {
        Some(v) if !(1..=MAX_TOKENS_PER_REQUEST).contains(v.get_ref()) => {
            return Err(src.error(
                v.span(),
                format!("max_commit_tokens must be from 1 to {MAX_TOKENS_PER_REQUEST} (what one request may report)"),
            ))
        }
        Some(v) => v.into_inner(),
        None => DEFAULT_MAX_COMMIT_TOKENS,
    };
    let access_span = file
        .callers
        .as_ref()
        .map(Spanned::span)
        .or_else(|| file.operators.as_ref().map(Spanned::span))
        .unwrap_or(0..0);
    let access = super::callers::access(
        file.callers.map(Spanned::into_inner).unwrap_or_default(),
        file.operators.map(Spanned::into_inner).unwrap_or_default(),
    )
    .map_err(|reason| src.error(access_span, reason))?;
    let policy = Policy::new(
        file.enforce.unwrap_or(true),
        file.default_tier.into_inner(),
        tiers,
        models,
        scopes,
        max_commit_tokens,
    )
    .with_access(access);
    // The same lookup a Reserve makes: an exact entry, a dated snapshot of one, or the
    // built-in table.
    for tier in policy.tiers() {
        if let Some(d) = &tier.limits.downgrade {
            if policy.encoding_for(&d.model).is_none() {
                return Err(src.error(
                    downgrade_spans.get(&tier.name).cloned().unwrap_or(0..0),
                    format!(
                        "tier {:?}: downgrade model {:?} has no known tokenizer; add [models.{:?}] with an encoding",
                        tier.name, d.model, d.model
                    ),
                ));
            }
        }
    }
    Ok(policy)
}

/// The limits of `[groups.*]`, `[ip]` (with its `cidr` entries) and `[global]`.
fn scope_limits(
    src: &Source<'_>,
    groups: BTreeMap<String, Spanned<TierFile>>,
    ip: Option<Spanned<TierFile>>,
    global: Option<Spanned<TierFile>>,
) -> Result<ScopeLimits, PolicyError> {
    let scope = |table: &str, t: Spanned<TierFile>, allow_cidr: bool| {
        if let Some(key) = t.get_ref().tier_only_key(allow_cidr) {
            let whom = if key == "cidr" { "[ip]" } else { "tiers" };
            return Err(src.error(t.span(), format!("{table}: {key} applies to {whom} only")));
        }
        tier_limits(src, t).map(Arc::new)
    };
    let mut out = ScopeLimits::default();
    if groups.len() > MAX_GROUP_ENTRIES {
        return Err(src.error(
            0..0,
            format!("at most {MAX_GROUP_ENTRIES} [groups] entries"),
        ));
    }
    let default_group = groups.get("default").map(|g| g.get_ref().clone());
    for (name, g) in groups {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(src.error(
                g.span(),
                format!("group name {name:?} must be 1 to 256 bytes without control characters"),
            ));
        }
        let span = g.span();
        let g = match &default_group {
            Some(base) => Spanned::new(span, g.into_inner().inherit(base)),
            None => g,
        };
        let limits = scope(&format!("[groups.{name:?}]"), g, false)?;
        if name == "default" {
            out.group_default = limits;
        } else {
            out.groups.insert(name, limits);
        }
    }
    if let Some(ip) = ip {
        let span = ip.span();
        let mut ip = ip.into_inner();
        let cidrs = ip.cidr.take().unwrap_or_default();
        if cidrs.len() > MAX_CIDR_ENTRIES {
            return Err(src.error(
                span.clone(),
                format!("[ip] may have at most {MAX_CIDR_ENTRIES} cidr entries"),
            ));
        }
        for (net, entry) in cidrs {
            let parsed: ipnet::IpNet = net.parse().map_err(|_| {
                src.error(
                    entry.span(),
                    format!("[ip.cidr] key {net:?} must be a CIDR block, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""),
                )
            })?;
            if matches!(parsed, ipnet::IpNet::V6(_)) && parsed.prefix_len() > IPV6_SCOPE_PREFIX {
                return Err(src.error(
                    entry.span(),
                    format!("[ip.cidr] {net:?}: IPv6 is counted per /{IPV6_SCOPE_PREFIX}, so a block must be /{IPV6_SCOPE_PREFIX} or wider"),
                ));
            }
            let e_span = entry.span();
            let entry = Spanned::new(e_span, entry.into_inner().inherit(&ip));
            let limits = scope(&format!("[ip.cidr.{net:?}]"), entry, false)?;
            out.ip_ranges.push((parsed.trunc(), limits));
        }
        // Most specific first: the first block that contains an address is its entry.
        out.ip_ranges
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        out.ip_default = scope("[ip]", Spanned::new(span, ip), true)?;
    }
    if let Some(g) = global {
        out.global = scope("[global]", g, false)?;
    }
    Ok(out)
}

fn tier_limits(src: &Source<'_>, tier: Spanned<TierFile>) -> Result<Limits, PolicyError> {
    let span = tier.span();
    let t = tier.into_inner();
    let bounded = |field: &str, v: &Option<Spanned<u64>>| -> Result<Option<u64>, PolicyError> {
        match v {
            Some(v) if *v.get_ref() > LIMIT_CEILING => {
                Err(src.error(v.span(), format!("{field} must be at most {LIMIT_CEILING}")))
            }
            Some(v) => Ok(Some(*v.get_ref())),
            None => Ok(None),
        }
    };
    let tokens_per_minute = bounded("tokens_per_minute", &t.tokens_per_minute)?;
    let burst_tokens = bounded("burst_tokens", &t.burst_tokens)?;
    let requests_per_minute = bounded("requests_per_minute", &t.requests_per_minute)?;
    let tokens_per_day = bounded("tokens_per_day", &t.tokens_per_day)?;
    let tokens_per_month = bounded("tokens_per_month", &t.tokens_per_month)?;
    let hold = bounded("hold_seconds", &t.hold_seconds)?;
    let max_hold = bounded("max_hold_seconds", &t.max_hold_seconds)?;
    if burst_tokens.is_some() && tokens_per_minute.is_none() {
        return Err(src.error(
            span,
            "burst_tokens needs tokens_per_minute (the bucket's refill)",
        ));
    }
    let lifetime = bounded("max_hold_lifetime_seconds", &t.max_hold_lifetime_seconds)?;
    let usd = |field: &str, v: &Option<Spanned<f64>>| -> Result<Option<u64>, PolicyError> {
        v.as_ref()
            .map(|v| {
                micro_usd(*v.get_ref(), MAX_BUDGET_USD)
                    .map_err(|rule| src.error(v.span(), format!("{field} {rule}")))
            })
            .transpose()
    };
    let usd_per_day = usd("usd_per_day", &t.usd_per_day)?;
    let usd_per_month = usd("usd_per_month", &t.usd_per_month)?;
    let downgrade = match &t.downgrade {
        Some(d) => {
            let at = d.span();
            let d = d.get_ref();
            let model = d.model.get_ref();
            if model.is_empty() || model.len() > MAX_MODEL_NAME_BYTES {
                return Err(src.error(
                    at,
                    format!("downgrade.model must be 1 to {MAX_MODEL_NAME_BYTES} bytes"),
                ));
            }
            Some(Downgrade {
                model: model.clone(),
                tokens_per_day: bounded("downgrade.tokens_per_day", &d.tokens_per_day)?,
            })
        }
        None => None,
    };
    // Defaults give way to what the tier sets: a default never contradicts an explicit value.
    let max_hold_seconds = max_hold.unwrap_or_else(|| {
        let d = DEFAULT_MAX_HOLD_SECONDS.max(hold.unwrap_or(0));
        lifetime.map_or(d, |l| d.min(l).max(hold.unwrap_or(0)))
    });
    let max_hold_lifetime_seconds =
        lifetime.unwrap_or(DEFAULT_MAX_HOLD_LIFETIME_SECONDS.max(max_hold_seconds));
    let hold_seconds = hold.unwrap_or(DEFAULT_HOLD_SECONDS.min(max_hold_seconds));
    for (field, value, v) in [
        ("hold_seconds", hold_seconds, &t.hold_seconds),
        ("max_hold_seconds", max_hold_seconds, &t.max_hold_seconds),
        (
            "max_hold_lifetime_seconds",
            max_hold_lifetime_seconds,
            &t.max_hold_lifetime_seconds,
        ),
    ] {
        if !(1..=HOLD_SECONDS_CEILING).contains(&value) {
            let at = v.as_ref().map_or(span.clone(), Spanned::span);
            return Err(src.error(
                at,
                format!("{field} must be from 1 to {HOLD_SECONDS_CEILING} (a week)"),
            ));
        }
    }
    if max_hold_seconds > max_hold_lifetime_seconds {
        return Err(src.error(
            span,
            format!("max_hold_seconds ({max_hold_seconds}) must not exceed max_hold_lifetime_seconds ({max_hold_lifetime_seconds})"),
        ));
    }
    if hold_seconds > max_hold_seconds {
        return Err(src.error(
            span,
            format!("hold_seconds ({hold_seconds}) must not exceed max_hold_seconds ({max_hold_seconds})"),
        ));
    }
    let fail_open = match &t.fail {
        None => false,
        Some(f) => match f.get_ref().as_str() {
            "closed" => false,
            "open" => true,
            other => {
                return Err(src.error(
                    f.span(),
                    format!("fail must be \"closed\" or \"open\" (got {other:?})"),
                ))
            }
        },
    };
    Ok(Limits {
        fail_open,
        tokens_per_minute,
        burst_tokens,
        requests_per_minute,
        tokens_per_day,
        tokens_per_month,
        max_concurrent: t.max_concurrent.map(Spanned::into_inner),
        enforce: t.enforce.unwrap_or(true),
        hold_seconds,
        max_hold_seconds,
        max_hold_lifetime_seconds,
        usd_per_day,
        usd_per_month,
        downgrade,
        models: match t.models {
            Some(list) => {
                let at = list.span();
                let names = list.into_inner();
                if let Some(bad) = names
                    .iter()
                    .find(|n| n.is_empty() || n.len() > MAX_MODEL_NAME_BYTES)
                {
                    return Err(src.error(
                        at,
                        format!("models: {bad:?} must be 1 to {MAX_MODEL_NAME_BYTES} bytes"),
                    ));
                }
                Some(names)
            }
            None => None,
        },
    })
}
