//! The `tollgate.v1.Quota` service: a thin adapter from gRPC to the ledger.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::validate::{self, to_duration, to_timestamp};
use crate::engine::{Decision, LimitStatus};
use crate::ledger::Ledger;
use crate::proto;

/// Serves Reserve, Commit, Refund and GetUsage.
#[derive(Debug, Clone)]
pub struct QuotaService {
    ledger: Arc<Ledger>,
}

impl QuotaService {
    /// A service over `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self { ledger }
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
            scope: s.scope.to_string(),
        })
        .collect()
}

#[tonic::async_trait]
impl proto::quota_server::Quota for QuotaService {
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let input = validate::reserve(request.into_inner())?;
        let subject = input.subject.clone();
        let o = self.ledger.reserve(input).await?;
        let decision = match o.decision {
            Decision::Allowed => proto::Decision::Allowed,
            Decision::Denied => {
                tracing::info!(
                    %subject,
                    denied_by = o.denied_by.unwrap_or(""),
                    tokens = o.prompt_tokens,
                    "reserve denied"
                );
                proto::Decision::Denied
            }
        };
        Ok(Response::new(proto::ReserveResponse {
            decision: decision as i32,
            reservation_id: o
                .reservation_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            model: o.model,
            reserved_tokens: o.reserved_tokens,
            denied_by: o.denied_by.unwrap_or_default().to_string(),
            retry_after: o.retry_after_us.map(to_duration),
            limits: limits(o.limits),
            expires_at: o.expires_us.map(to_timestamp),
            prompt_tokens: o.prompt_tokens,
            replayed: o.replayed,
        }))
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let (id, usage) = validate::commit(request.get_ref())?;
        let o = self.ledger.commit(id, usage).await?;
        Ok(Response::new(proto::CommitResponse {
            charged_tokens: o.settlement.charged_tokens,
            released_tokens: o.settlement.released_tokens,
            debt_tokens: o.settlement.debt_tokens,
            limits: limits(o.limits),
        }))
    }

    async fn refund(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        let o = self.ledger.refund(id).await?;
        Ok(Response::new(proto::RefundResponse {
            released_tokens: o.released_tokens,
        }))
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let subject = &request.get_ref().subject;
        validate::subject(subject)?;
        let u = self.ledger.usage(subject).await?;
        Ok(Response::new(proto::GetUsageResponse {
            subject: u.subject,
            tier: u.tier,
            used_tokens: u.used_tokens,
            held_tokens: u.held_tokens,
            requests: u.requests,
            open_holds: u.open_holds,
            limits: limits(u.limits),
        }))
    }
}
