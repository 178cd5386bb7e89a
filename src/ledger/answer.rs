//! The local ledger as a [`Ledger`]: its outcomes turned into answers, and each decision
//! counted in the metrics and (sampled) in the log where it is made.
//!
//! Why the decisions are counted here and not in the service: a relay or follower serves the
//! same calls but decides nothing; counting there too would count each decision twice across
//! the fleet.

use std::sync::Arc;

use tonic::Status;

use super::{CallContext, ExportStream, Ledger, LocalLedger};
use crate::engine::{
    Decision, LimitStatus, ReservationId, ReserveInput, ReserveOutcome, ScopeKey, Usage, UsageQuery,
};
use crate::policy::{Overrides, Policy};
use crate::proto::{self, to_duration, to_timestamp};
use crate::sampled_log;
use crate::telemetry as metrics;

/// Limit statuses as the wire carries them.
fn limits(statuses: Vec<LimitStatus>) -> Vec<proto::LimitStatus> {
    statuses
        .into_iter()
        .map(|s| proto::LimitStatus {
            name: s.name.to_string(),
            limit: s.limit,
            remaining: s.remaining,
            reset_after: Some(to_duration(s.reset_after_us)),
            scope: s.scope.name().to_string(),
            scope_id: s.scope_id.to_string(),
        })
        .collect()
}

fn from_proto(o: proto::LimitOverrides) -> Overrides {
    Overrides {
        tokens_per_minute: o.tokens_per_minute,
        burst_tokens: o.burst_tokens,
        requests_per_minute: o.requests_per_minute,
        tokens_per_day: o.tokens_per_day,
        tokens_per_month: o.tokens_per_month,
        max_concurrent: o.max_concurrent,
        usd_per_day: o.micro_usd_per_day,
        usd_per_month: o.micro_usd_per_month,
        downgrade_tokens_per_day: o.downgrade_tokens_per_day,
    }
}

/// The overrides set, as `name=value` pairs for the audit log ("none" when none is set).
fn overrides_text(o: &Overrides) -> String {
    let set: Vec<String> = [
        ("tokens_per_minute", o.tokens_per_minute),
        ("burst_tokens", o.burst_tokens),
        ("requests_per_minute", o.requests_per_minute),
        ("tokens_per_day", o.tokens_per_day),
        ("tokens_per_month", o.tokens_per_month),
        ("max_concurrent", o.max_concurrent.map(u64::from)),
        ("micro_usd_per_day", o.usd_per_day),
        ("micro_usd_per_month", o.usd_per_month),
        ("downgrade_tokens_per_day", o.downgrade_tokens_per_day),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name}={v}")))
    .collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(",")
    }
}

fn to_proto(o: &Overrides) -> proto::LimitOverrides {
    proto::LimitOverrides {
        tokens_per_minute: o.tokens_per_minute,
        burst_tokens: o.burst_tokens,
        requests_per_minute: o.requests_per_minute,
        tokens_per_day: o.tokens_per_day,
        tokens_per_month: o.tokens_per_month,
        max_concurrent: o.max_concurrent,
        micro_usd_per_day: o.usd_per_day,
        micro_usd_per_month: o.usd_per_month,
        downgrade_tokens_per_day: o.downgrade_tokens_per_day,
    }
}

/// The methods below call the inherent ones of the same name (`LocalLedger::reserve` and so
/// on), which answer in engine types; these answer in the wire's.
#[tonic::async_trait]
impl Ledger for LocalLedger {
    fn policy(&self) -> Result<Arc<Policy>, Status> {
        Ok(LocalLedger::policy(self)?)
    }

    async fn reserve(
        &self,
        cx: &CallContext,
        mut input: ReserveInput,
    ) -> Result<proto::ReserveResponse, Status> {
        input.caller = cx.caller.clone();
        let subject = input.subject.clone();
        let dry_run = input.dry_run;
        let o = LocalLedger::reserve(self, input).await?;
        let decision = match o.decision {
            Decision::Allowed => proto::Decision::Allowed,
            Decision::Downgraded => proto::Decision::Downgraded,
            Decision::Denied => proto::Decision::Denied,
        };
        record_reserve(&subject, &o, dry_run);
        Ok(proto::ReserveResponse {
            decision: decision as i32,
            reservation_id: o
                .reservation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            model: o.model,
            reserved_tokens: o.reserved_tokens,
            denied_by: o.denied_by.unwrap_or_default(),
            retry_after: o.retry_after_us.map(to_duration),
            limits: limits(o.limits),
            expires_at: o.expires_us.map(to_timestamp),
            prompt_tokens: o.prompt_tokens,
            replayed: o.replayed,
            shadow_denied_by: o.shadow_denied_by.unwrap_or_default(),
            reserved_micro_usd: o.reserved_usd,
            saved_micro_usd: o.saved_usd,
            tier: o.tier,
        })
    }

    async fn commit(
        &self,
        cx: &CallContext,
        id: ReservationId,
        usage: Usage,
    ) -> Result<proto::CommitResponse, Status> {
        let o = self.commit_by(cx.caller.as_deref(), id, usage).await?;
        if !o.replayed {
            metrics::add(metrics::TOKENS_CHARGED, o.settlement.charged_tokens);
            metrics::add(metrics::TOKENS_RELEASED, o.settlement.released_tokens);
            metrics::add(metrics::SPENT, o.settlement.charged_usd);
        }
        Ok(proto::CommitResponse {
            charged_tokens: o.settlement.charged_tokens,
            released_tokens: o.settlement.released_tokens,
            debt_tokens: o.settlement.debt_tokens,
            charged_micro_usd: o.settlement.charged_usd,
            limits: limits(o.limits),
        })
    }

    async fn refund(
        &self,
        cx: &CallContext,
        id: ReservationId,
    ) -> Result<proto::RefundResponse, Status> {
        let o = self.refund_by(cx.caller.as_deref(), id).await?;
        if !o.replayed {
            metrics::add(metrics::TOKENS_RELEASED, o.released_tokens);
        }
        Ok(proto::RefundResponse {
            released_tokens: o.released_tokens,
        })
    }

    async fn extend(
        &self,
        cx: &CallContext,
        id: ReservationId,
        hold_us: u64,
    ) -> Result<proto::ExtendResponse, Status> {
        let expires_us = self.extend_by(cx.caller.as_deref(), id, hold_us).await?;
        Ok(proto::ExtendResponse {
            expires_at: Some(to_timestamp(expires_us)),
        })
    }

    async fn usage(
        &self,
        _cx: &CallContext,
        query: UsageQuery,
    ) -> Result<proto::GetUsageResponse, Status> {
        let u = LocalLedger::usage(self, &query).await?;
        Ok(proto::GetUsageResponse {
            scope: u.scope.name().to_string(),
            subject: u.subject,
            tier: u.tier,
            group: u.group.unwrap_or_default(),
            client_ip: query
                .client_ip
                .map(|ip| ScopeKey::Ip(ip).id().to_string())
                .unwrap_or_default(),
            spent_micro_usd: u.spent_usd,
            spent_micro_usd_month: u.spent_usd_month,
            saved_micro_usd: u.saved_usd,
            saved_micro_usd_month: u.saved_usd_month,
            denials: u.denials,
            downgrades: u.downgrades,
            downgraded_tokens: u.downgraded_tokens,
            held_micro_usd: u.held_usd,
            used_tokens: u.used_tokens,
            held_tokens: u.held_tokens,
            requests: u.requests,
            open_holds: u.open_holds,
            limits: limits(u.limits),
            used_tokens_month: u.used_tokens_month,
            shadow_denials: u.shadow_denials,
        })
    }

    async fn set_subject(
        &self,
        cx: &CallContext,
        request: proto::SetSubjectRequest,
    ) -> Result<proto::SetSubjectResponse, Status> {
        let group = (!request.group.is_empty()).then(|| request.group.clone());
        let overrides = request.overrides.map(from_proto).unwrap_or_default();
        let (old_tier, _, old_overrides, old_group) = self.subject_config(&request.subject)?;
        LocalLedger::set_subject(
            self,
            &request.subject,
            &request.tier,
            group,
            overrides.clone(),
        )
        .await?;
        // The audit line: who changed what, old -> new.
        tracing::info!(
            operator = %cx.operator.as_deref().unwrap_or("-"),
            subject = %crate::sampled_log::subject(&request.subject),
            tier = %format!("{old_tier} -> {}", request.tier),
            group = %format!("{} -> {}", old_group.as_deref().unwrap_or("-"), if request.group.is_empty() { "-" } else { &request.group }),
            overrides = %format!("{} -> {}", overrides_text(&old_overrides), overrides_text(&overrides)),
            "subject set"
        );
        Ok(proto::SetSubjectResponse {
            subject: request.subject,
            tier: request.tier,
            overrides: Some(to_proto(&overrides)),
            group: request.group,
        })
    }

    async fn get_subject(
        &self,
        _cx: &CallContext,
        subject: String,
    ) -> Result<proto::GetSubjectResponse, Status> {
        let (tier, assigned, overrides, group) = self.subject_config(&subject)?;
        Ok(proto::GetSubjectResponse {
            subject,
            tier,
            assigned,
            overrides: Some(to_proto(&overrides)),
            group: group.unwrap_or_default(),
        })
    }

    async fn reset_usage(
        &self,
        cx: &CallContext,
        subject: String,
    ) -> Result<proto::ResetUsageResponse, Status> {
        LocalLedger::reset_usage(self, &subject).await?;
        tracing::info!(
            operator = %cx.operator.as_deref().unwrap_or("-"),
            subject = %crate::sampled_log::subject(&subject),
            "usage reset"
        );
        Ok(proto::ResetUsageResponse { subject })
    }

    async fn export(&self, cx: &CallContext) -> Result<ExportStream, Status> {
        // Everything decided before the call, denials' counters included (the sweeper
        // persists those in batches), is in the store the export reads.
        self.flush().await?;
        tracing::info!(
            operator = %cx.operator.as_deref().unwrap_or("-"),
            "export started"
        );
        let chunks = super::export::start(self).await?;
        Ok(Box::pin(chunks))
    }
}

/// Log and count one Reserve's decision. Never the prompt: only counts and names. Denials and
/// shadow-mode allowances are sampled (see [`sampled_log`]): a flood of them must not flood
/// the logs; the metrics count every one.
fn record_reserve(subject: &str, o: &ReserveOutcome, dry_run: bool) {
    let subject = sampled_log::subject(subject);
    let denied_by = o.denied_by.as_deref().unwrap_or("");
    let decision = o.decision.name();
    if o.decision == Decision::Denied {
        if sampled_log::DENIALS.sample(denied_by) {
            tracing::info!(
                %subject,
                tier = %o.tier,
                denied_by,
                prompt_tokens = o.prompt_tokens,
                dry_run,
                "reserve denied"
            );
        }
    } else {
        tracing::debug!(
            %subject,
            tier = %o.tier,
            decision,
            model = %o.model,
            reserved_tokens = o.reserved_tokens,
            replayed = o.replayed,
            dry_run,
            "reserve decided"
        );
    }
    if let Some(would) = o
        .shadow_denied_by
        .as_deref()
        .filter(|_| !dry_run && !o.replayed)
    {
        if sampled_log::SHADOW_ALLOWED.sample(would) {
            tracing::info!(
                %subject,
                tier = %o.tier,
                would_deny = %would,
                "shadow mode: allowed a Reserve that would have been denied"
            );
        }
    }
    if dry_run || o.replayed {
        return;
    }
    metrics::decision(&o.tier, decision, denied_by);
    metrics::add(metrics::SAVED, o.saved_usd);
    if o.reservation_id.is_some() {
        metrics::add(metrics::TOKENS_HELD, o.reserved_tokens);
    }
}
