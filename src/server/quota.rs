//! The `tollgate.v1.Quota` service: a thin adapter from gRPC to the ledger.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::prompt::PromptCounter;
use super::validate::{self, to_duration, to_timestamp};
use crate::engine::{Decision, LimitStatus, ScopeKey};
use crate::ledger::Ledger;
use crate::proto;
use crate::telemetry as metrics;

/// Serves Reserve, Commit, Refund, GetUsage and CountTokens.
#[derive(Debug, Clone)]
pub struct QuotaService {
    ledger: Arc<Ledger>,
    prompts: PromptCounter,
    max_prompt_bytes: usize,
}

impl QuotaService {
    /// A service over `ledger`, counting prompts with `prompts`, refusing prompts over
    /// `max_prompt_bytes` of text.
    pub fn new(ledger: Arc<Ledger>, prompts: PromptCounter, max_prompt_bytes: usize) -> Self {
        Self {
            ledger,
            prompts,
            max_prompt_bytes,
        }
    }
}

pub(super) fn limits(statuses: Vec<LimitStatus>) -> Vec<proto::LimitStatus> {
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

/// The handlers, each timed by the trait impl below.
impl QuotaService {
    async fn reserve_call(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let call = validate::reserve(request.into_inner(), self.max_prompt_bytes)?;
        let input = self
            .prompts
            .reserve_input(call, || Ok(self.ledger.policy()?))
            .await?;
        let subject = input.subject.clone();
        let dry_run = input.dry_run;
        let o = self.ledger.reserve(input).await?;
        let decision = match o.decision {
            Decision::Allowed => proto::Decision::Allowed,
            Decision::Downgraded => proto::Decision::Downgraded,
            Decision::Denied => proto::Decision::Denied,
        };
        record_reserve(&subject, &o, dry_run);
        Ok(Response::new(proto::ReserveResponse {
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
        }))
    }

    async fn commit_call(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let (id, usage) = validate::commit(request.get_ref())?;
        let o = self.ledger.commit(id, usage).await?;
        if !o.replayed {
            metrics::add(metrics::TOKENS_CHARGED, o.settlement.charged_tokens);
            metrics::add(metrics::TOKENS_RELEASED, o.settlement.released_tokens);
            metrics::add(metrics::SPENT, o.settlement.charged_usd);
        }
        Ok(Response::new(proto::CommitResponse {
            charged_tokens: o.settlement.charged_tokens,
            released_tokens: o.settlement.released_tokens,
            debt_tokens: o.settlement.debt_tokens,
            charged_micro_usd: o.settlement.charged_usd,
            limits: limits(o.limits),
        }))
    }

    async fn refund_call(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        let o = self.ledger.refund(id).await?;
        if !o.replayed {
            metrics::add(metrics::TOKENS_RELEASED, o.released_tokens);
        }
        Ok(Response::new(proto::RefundResponse {
            released_tokens: o.released_tokens,
        }))
    }

    async fn count_tokens_call(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let policy = self.ledger.policy()?;
        super::prompt::count_tokens(
            &self.prompts,
            &policy,
            request.into_inner(),
            self.max_prompt_bytes,
        )
        .await
        .map(Response::new)
    }

    async fn extend_call(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let req = request.into_inner();
        let id = validate::reservation_id(&req.reservation_id)?;
        let hold_us = validate::required_hold(req.hold.as_ref())?;
        let expires_us = self.ledger.extend(id, hold_us).await?;
        Ok(Response::new(proto::ExtendResponse {
            expires_at: Some(to_timestamp(expires_us)),
        }))
    }

    async fn get_usage_call(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let query = validate::usage_query(request.get_ref())?;
        let u = self.ledger.usage(&query).await?;
        Ok(Response::new(proto::GetUsageResponse {
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
        }))
    }
}

#[tonic::async_trait]
impl proto::quota_server::Quota for QuotaService {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        metrics::timed("Reserve", self.reserve_call(request)).await
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        metrics::timed("Commit", self.commit_call(request)).await
    }

    async fn refund(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        metrics::timed("Refund", self.refund_call(request)).await
    }

    async fn count_tokens(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        metrics::timed("CountTokens", self.count_tokens_call(request)).await
    }

    async fn extend(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        metrics::timed("Extend", self.extend_call(request)).await
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        metrics::timed("GetUsage", self.get_usage_call(request)).await
    }
}

/// Log and count one Reserve's decision. Never the prompt: only counts and names. Denials and
/// shadow-mode allowances are sampled (see [`sampled_log`](super::sampled_log)): a flood of
/// them must not flood the logs; the metrics count every one.
fn record_reserve(subject: &str, o: &crate::engine::ReserveOutcome, dry_run: bool) {
    let denied_by = o.denied_by.as_deref().unwrap_or("");
    let decision = o.decision.name();
    if o.decision == Decision::Denied {
        if super::sampled_log::DENIALS.sample(denied_by) {
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
        if super::sampled_log::SHADOW_ALLOWED.sample(would) {
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
