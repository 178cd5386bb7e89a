//! GetUsage: the figures of one scope, and the status of every limit that applies.

use std::net::IpAddr;
use std::sync::Arc;

use super::reservation::scope_keys;
use super::{Engine, LimitStatus, ScopeKey, ScopeKind};
use crate::clock::{utc_day, utc_month};

/// Whose usage: the first given of subject, group and client IP names the scope reported; none
/// given reports the fleet. The others add their scopes' limits (as a Reserve with the same
/// fields would be checked against).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// A subject.
    pub subject: Option<String>,
    /// A group (for a subject: instead of its assigned one).
    pub group: Option<String>,
    /// A client IP, as `policy::ip_scope_key` gives it.
    pub client_ip: Option<IpAddr>,
}

/// One scope's usage, for GetUsage. Day figures are for the current UTC day, month figures for
/// the current UTC calendar month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    /// Which scope the figures are of.
    pub scope: ScopeKind,
    /// The subject (empty unless the scope is a subject).
    pub subject: String,
    /// The subject's tier (empty unless the scope is a subject).
    pub tier: String,
    /// The group: given, or the subject's assigned one.
    pub group: Option<String>,
    /// Tokens charged today, downgraded use included.
    pub used_tokens: u64,
    /// Tokens charged this month (downgraded use excluded: it has its own budget).
    pub used_tokens_month: u64,
    /// Tokens charged today to the downgrade budget.
    pub downgraded_tokens: u64,
    /// Tokens in open holds.
    pub held_tokens: u64,
    /// Reserves admitted today.
    pub requests: u64,
    /// Open holds.
    pub open_holds: u32,
    /// Reserves allowed today only because of shadow mode.
    pub shadow_denials: u64,
    /// Reserves denied today.
    pub denials: u64,
    /// Reserves downgraded today.
    pub downgrades: u64,
    /// µUSD charged today.
    pub spent_usd: u64,
    /// µUSD charged this month.
    pub spent_usd_month: u64,
    /// µUSD in open holds (worst case).
    pub held_usd: u64,
    /// µUSD saved today by denials and downgrades.
    pub saved_usd: u64,
    /// µUSD saved this month.
    pub saved_usd_month: u64,
    /// Every limit of every scope that applies.
    pub limits: Vec<LimitStatus>,
}

impl Engine {
    /// The usage of the scope `query` names, with the limits of every scope that applies.
    pub fn usage(&self, query: &UsageQuery, now_us: u64) -> UsageReport {
        let group = query.group.clone().or_else(|| {
            query
                .subject
                .as_deref()
                .and_then(|s| self.assigned_group(s).map(str::to_string))
        });
        let keys = match &query.subject {
            Some(subject) => scope_keys(subject, group.as_deref(), query.client_ip),
            None => {
                let mut keys = Vec::new();
                if let Some(g) = &group {
                    keys.push(ScopeKey::Group(Arc::from(g.as_str())));
                }
                if let Some(ip) = query.client_ip {
                    keys.push(ScopeKey::Ip(ip));
                }
                keys.push(ScopeKey::Global);
                keys
            }
        };
        let scopes = self.scopes_of(keys);
        let (key, _, state) = &scopes.0[0];
        let (day, month) = (utc_day(now_us), utc_month(now_us));
        UsageReport {
            scope: key.kind(),
            subject: query.subject.clone().unwrap_or_default(),
            tier: query
                .subject
                .as_deref()
                .map(|s| self.tier_of(s).name.clone())
                .unwrap_or_default(),
            group,
            used_tokens: state
                .day_tokens
                .get(day)
                .saturating_add(state.downgrade_day_tokens.get(day)),
            used_tokens_month: state.month_tokens.get(month),
            downgraded_tokens: state.downgrade_day_tokens.get(day),
            held_tokens: state.held_tokens,
            requests: state.day_requests.get(day),
            open_holds: state.open_holds,
            shadow_denials: state.day_shadow_denials.get(day),
            denials: state.day_denials.get(day),
            downgrades: state.day_downgrades.get(day),
            spent_usd: state.day_usd.get(day),
            spent_usd_month: state.month_usd.get(month),
            held_usd: state.held_usd,
            saved_usd: state.day_saved_usd.get(day),
            saved_usd_month: state.month_saved_usd.get(month),
            limits: scopes.statuses(now_us),
        }
    }
}
