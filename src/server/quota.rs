//! The `tollgate.v1.Quota` service: validate, count prompt tokens, and hand the call to the
//! [`Ledger`] (the local one, or one that forwards to the tollgate that decides).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::prompt::PromptCounter;
use super::validate;
use crate::ledger::Ledger;
use crate::proto;
use crate::telemetry as metrics;

/// Serves Reserve, Commit, Refund, Extend, GetUsage and CountTokens.
#[derive(Debug, Clone)]
pub struct QuotaService {
    ledger: Arc<dyn Ledger>,
    prompts: PromptCounter,
    max_prompt_bytes: usize,
}

impl QuotaService {
    /// A service over `ledger`, counting prompts with `prompts`, refusing prompts over
    /// `max_prompt_bytes` of text.
    pub fn new(ledger: Arc<dyn Ledger>, prompts: PromptCounter, max_prompt_bytes: usize) -> Self {
        Self {
            ledger,
            prompts,
            max_prompt_bytes,
        }
    }
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
            .reserve_input(call, || self.ledger.policy())
            .await?;
        self.ledger.reserve(input).await.map(Response::new)
    }

    async fn commit_call(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let (id, usage) = validate::commit(request.get_ref())?;
        self.ledger.commit(id, usage).await.map(Response::new)
    }

    async fn refund_call(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        self.ledger.refund(id).await.map(Response::new)
    }

    async fn extend_call(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let req = request.into_inner();
        let id = validate::reservation_id(&req.reservation_id)?;
        let hold_us = validate::required_hold(req.hold.as_ref())?;
        self.ledger.extend(id, hold_us).await.map(Response::new)
    }

    async fn get_usage_call(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let query = validate::usage_query(request.get_ref())?;
        self.ledger.usage(query).await.map(Response::new)
    }

    /// Answered here, whatever the ledger: counting needs only the policy.
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
