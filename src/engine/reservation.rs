//! Reservations (holds) and their state machine.
//!
//! ```text
//!            Commit                    (late) Commit
//!   HELD ───────────────► COMMITTED ◄──────────────── EXPIRED
//!    │ │                                                  ▲
//!    │ └── Refund ──► REFUNDED                            │
//!    └──────────────────── deadline passes ───────────────┘
//! ```
//! Every other transition is illegal and reported with the current state.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Hold, ScopeKey, ScopeKind};
use crate::policy::Price;

/// A reservation id: a UUIDv7, so ids sort by creation time and carry their age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReservationId(pub u128);

impl ReservationId {
    /// A new time-ordered id for a reservation made at `now_us`.
    pub fn generate(now_us: u64) -> Self {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            now_us / 1_000_000,
            u32::try_from((now_us % 1_000_000) * 1_000).unwrap_or(0),
        );
        Self(uuid::Uuid::new_v7(ts).as_u128())
    }

    /// The id's bytes, big-endian (sorts like the id).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// A reservation id that is not a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedId;

impl FromStr for ReservationId {
    type Err = MalformedId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only the hyphenated form tollgate hands out (36 characters); anything else is a client
        // bug worth reporting rather than guessing at.
        if s.len() != 36 {
            return Err(MalformedId);
        }
        uuid::Uuid::try_parse(s)
            .map(|u| Self(u.as_u128()))
            .map_err(|_| MalformedId)
    }
}

/// What a Commit reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens the provider reported.
    pub prompt_tokens: u64,
    /// Completion tokens the provider reported.
    pub completion_tokens: u64,
    /// The call happened but its usage is unknown: the full hold is charged.
    pub usage_unknown: bool,
}

/// The outcome of a Commit, kept so a retried Commit returns it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// Tokens charged.
    pub charged_tokens: u64,
    /// Tokens given back to the limits.
    pub released_tokens: u64,
    /// Tokens charged beyond the hold.
    pub debt_tokens: u64,
    /// µUSD charged: the reported usage at the prices the hold was made with.
    pub charged_usd: u64,
}

impl Settlement {
    /// What charging `usage` to a hold of `held` tokens comes to: the reported tokens (the whole
    /// hold when the usage is unknown), what flows back, and what goes beyond the hold (debt).
    pub fn of(held: u64, usage: &Usage, charged_usd: u64) -> Self {
        let charged = if usage.usage_unknown {
            held
        } else {
            usage.prompt_tokens.saturating_add(usage.completion_tokens)
        };
        Self {
            charged_tokens: charged,
            released_tokens: held.saturating_sub(charged),
            debt_tokens: charged.saturating_sub(held),
            charged_usd,
        }
    }
}

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    /// Tokens are set aside.
    Held,
    /// Usage was charged.
    Committed {
        /// What the Commit reported.
        usage: Usage,
        /// What it came to.
        settlement: Settlement,
        /// When.
        at_us: u64,
    },
    /// The hold was given back.
    Refunded {
        /// When.
        at_us: u64,
    },
    /// The deadline passed with no Commit or Refund: the hold was charged in full.
    Expired {
        /// When.
        at_us: u64,
    },
}

impl HoldState {
    /// The state's name, as reported in errors.
    pub fn name(&self) -> &'static str {
        match self {
            HoldState::Held => "HELD",
            HoldState::Committed { .. } => "COMMITTED",
            HoldState::Refunded { .. } => "REFUNDED",
            HoldState::Expired { .. } => "EXPIRED",
        }
    }

    /// When the reservation left HELD, if it has.
    pub fn finished_at(&self) -> Option<u64> {
        match *self {
            HoldState::Held => None,
            HoldState::Committed { at_us, .. }
            | HoldState::Refunded { at_us }
            | HoldState::Expired { at_us } => Some(at_us),
        }
    }
}

/// One Reserve's hold and everything needed to settle it, replay it, and persist it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The id handed to the caller.
    pub id: ReservationId,
    /// Whose quota it is.
    pub subject: String,
    /// The model granted.
    pub model: String,
    /// Prompt tokens held.
    pub prompt_tokens: u64,
    /// Output tokens held.
    pub max_output_tokens: u64,
    /// The hold life the caller asked for, if it asked (kept to compare idempotent retries).
    pub requested_hold_us: Option<u64>,
    /// When it was made.
    pub created_us: u64,
    /// When it expires unless settled.
    pub expires_us: u64,
    /// The caller's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Where it is in its life.
    pub state: HoldState,
    /// The group it counts in, if any.
    pub group: Option<String>,
    /// The client IP it counts under (as `policy::ip_scope_key` gives it), if any.
    pub client_ip: Option<IpAddr>,
    /// The price of `model` when the hold was made (kept, so a Commit charges at the prices
    /// the hold was made with even if a reload changes them).
    pub price: Option<Price>,
    /// Worst-case cost held, µUSD: the prompt at the input price plus `max_output_tokens` at
    /// the output price.
    pub held_usd: u64,
    /// Set when the hold was downgraded: what the Reserve asked for.
    pub downgraded_from: Option<Requested>,
    /// The caller that made it (`[callers]`), the only one that may settle or extend it.
    /// Not in the serde form: the record appends it after the rest only when set, so a
    /// record without one has the bytes it had before callers existed (`store/records.rs`).
    #[serde(skip)]
    pub caller: Option<String>,
}

/// What a downgraded Reserve asked for (kept to compare idempotent retries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requested {
    /// The model asked for.
    pub model: String,
    /// Its prompt tokens, counted with its own tokenizer.
    pub prompt_tokens: u64,
}

impl Reservation {
    /// Tokens held: prompt plus output.
    pub fn held_tokens(&self) -> u64 {
        self.prompt_tokens + self.max_output_tokens
    }

    /// Every scope the hold counts in: subject, group, client IP, fleet.
    pub fn scopes(&self) -> Vec<ScopeKey> {
        scope_keys(&self.subject, self.group.as_deref(), self.client_ip)
    }

    /// What the hold puts on a scope of the given kind.
    pub fn hold_on(&self, kind: ScopeKind) -> Hold {
        Hold {
            tokens: self.held_tokens(),
            usd: self.held_usd,
            on_downgrade_budget: kind == ScopeKind::Subject && self.downgraded_from.is_some(),
        }
    }

    /// The cost of reported usage, at the hold's prices (nothing for an unpriced model).
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        self.price
            .map_or(0, |p| p.cost(prompt_tokens, completion_tokens))
    }
}

/// The scopes of a Reserve, subject first and fleet last.
pub fn scope_keys(subject: &str, group: Option<&str>, ip: Option<IpAddr>) -> Vec<ScopeKey> {
    let mut keys = Vec::with_capacity(4);
    keys.push(ScopeKey::Subject(Arc::from(subject)));
    if let Some(g) = group {
        keys.push(ScopeKey::Group(Arc::from(g)));
    }
    if let Some(ip) = ip {
        keys.push(ScopeKey::Ip(ip));
    }
    keys.push(ScopeKey::Global);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_time() {
        let a = ReservationId::generate(1_700_000_000_000_000);
        let b = ReservationId::generate(1_700_000_000_001_000);
        assert!(a < b);
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s.parse::<ReservationId>(), Ok(a));
        assert_eq!("not-an-id".parse::<ReservationId>(), Err(MalformedId));
        assert_eq!(
            "0192a8a4-1c2b-7cc0-8d1e-ZZZZZZZZZZZZ".parse::<ReservationId>(),
            Err(MalformedId)
        );
    }
}
