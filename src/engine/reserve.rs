//! Reserve: decide against every scope, downgrade if the tier says so, and hold.

use std::net::IpAddr;

use super::reservation::{scope_keys, Requested};
use super::{
    Ask, Engine, EngineError, Hold, HoldState, LimitStatus, Mutation, Refusal, Reservation,
    ReservationId, ScopeKey, ScopeKind, Scopes,
};
use crate::clock::MICROS_PER_SECOND;
use crate::policy::{Limits, Price};

/// The answer to a Reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Held, on the model asked for.
    Allowed,
    /// Held, on the tier's downgrade model, against its downgrade budget.
    Downgraded,
    /// A limit said no.
    Denied,
}

impl Decision {
    /// The decision's name, as logs and metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allowed => "ALLOWED",
            Decision::Downgraded => "DOWNGRADED",
            Decision::Denied => "DENIED",
        }
    }
}

/// A Reserve, already checked for shape and bounds (see `server::validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveInput {
    /// Whose quota.
    pub subject: String,
    /// The model.
    pub model: String,
    /// Prompt tokens, counted for `model`.
    pub prompt_tokens: u64,
    /// The same prompt counted for other models (the policy's downgrade models whose
    /// tokenizers differ). A model missing here takes `prompt_tokens` (the caller counted).
    pub prompt_tokens_for: Vec<(String, u64)>,
    /// Output tokens to hold.
    pub max_output_tokens: u64,
    /// Retry key.
    pub idempotency_key: Option<String>,
    /// Requested hold life; `None` takes the tier's `hold_seconds`.
    pub hold_us: Option<u64>,
    /// Decide, hold nothing.
    pub dry_run: bool,
    /// The group; `None` takes the subject's assigned group.
    pub group: Option<String>,
    /// The client IP, as `policy::ip_scope_key` gives it.
    pub client_ip: Option<IpAddr>,
    /// The id to give the hold (generated before the engine lock is taken).
    pub id: ReservationId,
    /// The authenticated caller (`[callers]`) making it: only it may settle or extend the
    /// hold. None when the Quota API is open.
    pub caller: Option<String>,
}

/// What a Reserve decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveOutcome {
    /// Allowed, downgraded or denied.
    pub decision: Decision,
    /// The subject's tier.
    pub tier: String,
    /// The hold, when held and not a dry run.
    pub reservation_id: Option<ReservationId>,
    /// The model granted.
    pub model: String,
    /// Tokens held (0 when denied).
    pub reserved_tokens: u64,
    /// Worst-case cost held, µUSD (0 when denied).
    pub reserved_usd: u64,
    /// Prompt tokens counted (for the granted model).
    pub prompt_tokens: u64,
    /// The limit that said no, as `scope.limit` (bare for the subject's own limits).
    pub denied_by: Option<String>,
    /// When a retry can succeed (None when allowed, or when none can).
    pub retry_after_us: Option<u64>,
    /// Every limit of every scope, after the decision.
    pub limits: Vec<LimitStatus>,
    /// When the hold expires.
    pub expires_us: Option<u64>,
    /// This answers an earlier Reserve with the same idempotency key.
    pub replayed: bool,
    /// Shadow mode: the limit that would have denied this Reserve, allowed anyway.
    pub shadow_denied_by: Option<String>,
    /// µUSD this decision saved: a denial's worst-case cost, or a downgrade's difference.
    pub saved_usd: u64,
}

/// Of several refusals, the one to report: the one a client must wait longest for, since a retry
/// can only succeed once every limit admits it (never counts as longest).
/// A model refusal is reported before anything else: it is the most basic one.
fn binding<'a>(refusals: impl Iterator<Item = &'a Refusal> + Clone) -> Option<Refusal> {
    refusals
        .clone()
        .find(|r| r.limit == "model" || r.limit == "unpriced_model")
        .or_else(|| refusals.max_by_key(|r| r.retry_after_us.unwrap_or(u64::MAX)))
        .copied()
}

/// One way to grant a Reserve: the model, its prompt count, and what it holds.
#[derive(Debug, Clone)]
struct Plan {
    model: String,
    prompt_tokens: u64,
    tokens: u64,
    price: Option<Price>,
    usd: u64,
    downgraded: bool,
}

impl Plan {
    fn new(model: &str, prompt_tokens: u64, output: u64, price: Option<Price>, dg: bool) -> Self {
        Self {
            model: model.to_string(),
            prompt_tokens,
            tokens: prompt_tokens.saturating_add(output),
            price,
            usd: price.map_or(0, |p| p.cost(prompt_tokens, output)),
            downgraded: dg,
        }
    }

    fn hold_on(&self, kind: ScopeKind) -> Hold {
        Hold {
            tokens: self.tokens,
            usd: self.usd,
            on_downgrade_budget: self.downgraded && kind == ScopeKind::Subject,
        }
    }
}

/// A hold life a Reserve or Extend asks for: at most the tier's `max_hold_seconds`.
pub(super) fn check_hold(limits: &Limits, tier: &str, hold_us: u64) -> Result<(), EngineError> {
    if hold_us > limits.max_hold_seconds * MICROS_PER_SECOND {
        return Err(EngineError::InvalidArgument {
            field: "hold",
            rule: format!(
                "must be at most {} seconds (max_hold_seconds of tier {tier:?})",
                limits.max_hold_seconds
            ),
        });
    }
    Ok(())
}

impl Engine {
    /// Every refusal of `plan` across the scopes.
    fn refusals(&self, scopes: &Scopes, plan: &Plan, now_us: u64) -> Vec<Refusal> {
        let mut out = Vec::new();
        for (key, limits, state) in &scopes.0 {
            let ask = Ask {
                hold: plan.hold_on(key.kind()),
                model: &plan.model,
                priced: plan.price.is_some(),
            };
            let enforced = self.enforces(limits);
            state.refusals(limits, now_us, key.kind(), &ask, enforced, &mut out);
        }
        out
    }

    /// Decide a Reserve and, if every limit of every scope admits it (on the model asked for,
    /// or on the tier's downgrade), hold its tokens and money.
    pub fn reserve(
        &mut self,
        input: ReserveInput,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<ReserveOutcome, EngineError> {
        if input
            .prompt_tokens
            .checked_add(input.max_output_tokens)
            .is_none()
        {
            return Err(EngineError::InvalidArgument {
                field: "max_output_tokens",
                rule: "prompt_tokens + max_output_tokens overflows".into(),
            });
        }
        if !input.dry_run {
            if let Some(replay) = self.replay(&input, now_us)? {
                return Ok(replay);
            }
        }

        let group = input
            .group
            .clone()
            .or_else(|| self.assigned_group(&input.subject).map(str::to_string));
        let mut scopes = self.scopes_of(scope_keys(
            &input.subject,
            group.as_deref(),
            input.client_ip,
        ));
        let limits = scopes.subject_limits().clone();
        let tier = self.tier_of(&input.subject).name.clone();
        let hold_us = match input.hold_us {
            Some(h) => {
                check_hold(&limits, &tier, h)?;
                h
            }
            None => limits.hold_seconds * MICROS_PER_SECOND,
        };
        let asked = Plan::new(
            &input.model,
            input.prompt_tokens,
            input.max_output_tokens,
            self.policy.price(&input.model),
            false,
        );
        let refusals = self.refusals(&scopes, &asked, now_us);
        let mut denied = binding(refusals.iter().filter(|r| r.enforced));
        let mut granted = None;
        if denied.is_none() {
            granted = Some((asked.clone(), binding(refusals.iter())));
        } else if let Some(dg) = scopes
            .subject_limits()
            .downgrade
            .clone()
            .filter(|_| refusals.iter().any(|r| r.enforced && r.downgradable()))
        {
            let prompt = input
                .prompt_tokens_for
                .iter()
                .find(|(m, _)| *m == dg.model)
                .map_or(input.prompt_tokens, |(_, n)| *n);
            let plan = Plan::new(
                &dg.model,
                prompt,
                input.max_output_tokens,
                self.policy.price(&dg.model),
                true,
            );
            let again = self.refusals(&scopes, &plan, now_us);
            denied = binding(again.iter().filter(|r| r.enforced));
            if denied.is_none() {
                granted = Some((plan, binding(again.iter())));
            }
        }

        let Some((plan, shadow)) = granted else {
            let refusal = denied.expect("a Reserve not granted was refused");
            if !input.dry_run {
                // What the denial saved: the whole worst-case cost of what was asked.
                self.record_denial(&mut scopes, &input.subject, now_us, asked.usd);
            }
            return Ok(ReserveOutcome {
                decision: Decision::Denied,
                tier,
                reservation_id: None,
                model: input.model,
                reserved_tokens: 0,
                reserved_usd: 0,
                prompt_tokens: input.prompt_tokens,
                denied_by: Some(refusal.name()),
                retry_after_us: refusal.retry_after_us,
                limits: scopes.statuses(now_us),
                expires_us: None,
                replayed: false,
                shadow_denied_by: None,
                saved_usd: asked.usd,
            });
        };
        let decision = if plan.downgraded {
            Decision::Downgraded
        } else {
            Decision::Allowed
        };
        let saved_usd = if plan.downgraded {
            asked.usd.saturating_sub(plan.usd)
        } else {
            0
        };
        let shadow_denied_by = shadow.map(|r| r.name());
        if input.dry_run {
            return Ok(ReserveOutcome {
                decision,
                tier,
                reservation_id: None,
                model: plan.model,
                reserved_tokens: plan.tokens,
                reserved_usd: plan.usd,
                prompt_tokens: plan.prompt_tokens,
                denied_by: None,
                retry_after_us: None,
                limits: scopes.statuses(now_us),
                expires_us: None,
                replayed: false,
                shadow_denied_by,
                saved_usd,
            });
        }
        self.check_room(&scopes, now_us, out)?;

        // Admitted: charge every limit of every scope together.
        for (key, limits, state) in &mut scopes.0 {
            state.hold(limits, now_us, plan.hold_on(key.kind()));
            if shadow_denied_by.is_some() {
                state
                    .day_shadow_denials
                    .add(crate::clock::utc_day(now_us), 1);
            }
            if plan.downgraded {
                state.record_saving(now_us, saved_usd, true);
            }
            self.put_scope(key, *state, out);
        }

        let expires_us = now_us.saturating_add(hold_us);
        let reservation = Reservation {
            id: input.id,
            subject: input.subject,
            model: plan.model.clone(),
            prompt_tokens: plan.prompt_tokens,
            max_output_tokens: input.max_output_tokens,
            requested_hold_us: input.hold_us,
            created_us: now_us,
            expires_us,
            idempotency_key: input.idempotency_key,
            state: HoldState::Held,
            group,
            client_ip: input.client_ip,
            price: plan.price,
            held_usd: plan.usd,
            downgraded_from: plan.downgraded.then_some(Requested {
                model: input.model,
                prompt_tokens: input.prompt_tokens,
            }),
            caller: input.caller,
        };
        if let Some(key) = &reservation.idempotency_key {
            // The key's last reservation, if still kept, is past its retention (or replay()
            // would have answered with it): the key is this hold's now.
            self.settled.release_key(&reservation.subject, key);
            self.open_keys
                .insert((reservation.subject.clone(), key.clone()), reservation.id);
        }
        self.deadlines.insert((expires_us, reservation.id));
        let outcome = ReserveOutcome {
            decision,
            tier,
            reservation_id: Some(reservation.id),
            model: plan.model,
            reserved_tokens: plan.tokens,
            reserved_usd: plan.usd,
            prompt_tokens: plan.prompt_tokens,
            denied_by: None,
            retry_after_us: None,
            limits: scopes.statuses(now_us),
            expires_us: Some(expires_us),
            replayed: false,
            shadow_denied_by,
            saved_usd,
        };
        self.put_open(reservation, out);
        Ok(outcome)
    }

    /// Count a denial and what it saved in the scopes of the Reserve that can take it without
    /// piling up state: every scope that already has state, and, while the table has room, the
    /// fleet, a subject an operator assigned (SetSubject), and a group that the policy names
    /// (`[groups."name"]`) or an operator assigned to the subject. A denial never creates any
    /// other subject's scope, a client IP's, or a group the caller made up: those names are the
    /// caller's to invent, and a flood of denied Reserves, each with a new subject and IP, must
    /// leave nothing behind that could fill the table and lock admitted users out (the fleet,
    /// and the group where it is bounded, still count every one).
    ///
    /// Pushes no record: the sweeper persists denial counters in batches (see `unsaved`).
    fn record_denial(&mut self, scopes: &mut Scopes, subject: &str, now_us: u64, saved_usd: u64) {
        for (key, _, state) in &mut scopes.0 {
            let counts_here = self.scopes.contains_key(key)
                || (self.scopes.len() < self.bounds.max_scopes
                    && self.denial_may_create(key, subject));
            if !counts_here {
                continue;
            }
            state.record_saving(now_us, saved_usd, false);
            self.put_scope_unsaved(key, *state);
        }
    }

    /// Whether a denial may create `key`'s scope: only scopes whose number the policy or the
    /// operators bound, never one a caller can name at will.
    fn denial_may_create(&self, key: &ScopeKey, subject: &str) -> bool {
        match key {
            ScopeKey::Global => true,
            ScopeKey::Subject(_) => self.assignments.contains_key(subject),
            ScopeKey::Group(g) => {
                self.policy.scopes().groups.contains_key(&**g)
                    || self.assigned_group(subject) == Some(&**g)
            }
            ScopeKey::Ip(_) => false,
        }
    }

    /// Bounds on memory that an admitted hold must fit within. A scope table at its bound first
    /// evicts scopes no limit needs any more (see [`Engine::room_for`]): a real user is refused
    /// only when what fills the table still counts against some limit.
    fn check_room(
        &mut self,
        scopes: &Scopes,
        now_us: u64,
        out: &mut Vec<Mutation>,
    ) -> Result<(), EngineError> {
        if self.open_holds() >= self.bounds.max_open_holds {
            return Err(EngineError::Exhausted {
                what: "open holds",
                bound: self.bounds.max_open_holds as u64,
            });
        }
        if scopes.0[0].2.open_holds >= self.bounds.max_holds_per_subject {
            return Err(EngineError::Exhausted {
                what: "open holds of this subject",
                bound: u64::from(self.bounds.max_holds_per_subject),
            });
        }
        let new = scopes
            .0
            .iter()
            .filter(|(k, _, _)| !self.scopes.contains_key(k))
            .count();
        self.room_for(new, scopes, now_us, out)
    }

    /// The first answer again, if this is a retry of a Reserve with the same key.
    fn replay(
        &self,
        input: &ReserveInput,
        now_us: u64,
    ) -> Result<Option<ReserveOutcome>, EngineError> {
        let Some(key) = &input.idempotency_key else {
            return Ok(None);
        };
        let Some(id) = self.key_owner(&input.subject, key) else {
            return Ok(None);
        };
        let Some(first) = self.record(id) else {
            return Ok(None);
        };
        if self.past_retention(&first, now_us) {
            return Ok(None);
        }
        let differs = |field: &'static str, a: String, b: String| {
            Err(EngineError::IdempotencyConflict {
                key: key.clone(),
                field,
                first: a,
                now: b,
            })
        };
        if first.caller != input.caller {
            // Another caller's key: checked first, so that nothing of that caller's request
            // (its model, sizes, group or end user's IP) shows in the refusal.
            return differs("caller", "another caller".into(), "this caller".into());
        }
        let (asked_model, asked_prompt) = match &first.downgraded_from {
            Some(r) => (&r.model, r.prompt_tokens),
            None => (&first.model, first.prompt_tokens),
        };
        if *asked_model != input.model {
            return differs(
                "model",
                format!("{asked_model:?}"),
                format!("{:?}", input.model),
            );
        }
        if asked_prompt != input.prompt_tokens {
            return differs(
                "prompt_tokens",
                asked_prompt.to_string(),
                input.prompt_tokens.to_string(),
            );
        }
        if first.max_output_tokens != input.max_output_tokens {
            return differs(
                "max_output_tokens",
                first.max_output_tokens.to_string(),
                input.max_output_tokens.to_string(),
            );
        }
        // The group is compared when the retry names one: a retry without one takes the group
        // the first attempt was counted in (the subject's assignment may have changed since).
        if input.group.is_some() && input.group != first.group {
            let show =
                |g: &Option<String>| g.as_deref().map_or("(none)".into(), |g| format!("{g:?}"));
            return differs("group", show(&first.group), show(&input.group));
        }
        if first.client_ip != input.client_ip {
            let show = |ip: Option<IpAddr>| {
                ip.map_or("(none)".into(), |ip| ScopeKey::Ip(ip).id().to_string())
            };
            return differs("client_ip", show(first.client_ip), show(input.client_ip));
        }
        if first.requested_hold_us != input.hold_us {
            let show = |h: Option<u64>| h.map_or("(default)".to_string(), |us| format!("{us}us"));
            return differs("hold", show(first.requested_hold_us), show(input.hold_us));
        }
        let scopes = self.scopes_of(first.scopes());
        Ok(Some(ReserveOutcome {
            tier: self.tier_of(&input.subject).name.clone(),
            decision: if first.downgraded_from.is_some() {
                Decision::Downgraded
            } else {
                Decision::Allowed
            },
            reservation_id: Some(first.id),
            model: first.model.clone(),
            reserved_tokens: first.held_tokens(),
            reserved_usd: first.held_usd,
            prompt_tokens: first.prompt_tokens,
            denied_by: None,
            retry_after_us: None,
            limits: scopes.statuses(now_us),
            expires_us: Some(first.expires_us),
            replayed: true,
            shadow_denied_by: None,
            saved_usd: 0,
        }))
    }
}
