//! The `tollgate.v1.Quota` service: validate, count prompt tokens, and hand the call to the
//! [`Ledger`] (the local one, or one that forwards to the tollgate that decides).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth;
use super::prompt::PromptCounter;
use super::transport::tls::PeerIdentity;
use super::validate;
use crate::ledger::{CallContext, Ledger};
use crate::policy::callers::Caller;
use crate::policy::Policy;
use crate::proto;
use crate::telemetry as metrics;

/// Serves Reserve, Commit, Refund, Extend, GetUsage and CountTokens.
#[derive(Debug, Clone)]
pub struct QuotaService {
    ledger: Arc<dyn Ledger>,
    prompts: PromptCounter,
    max_prompt_bytes: usize,
    /// The SAN by which replicas know each other's certificates: a call on a connection
    /// whose client certificate has it may name the caller a follower authenticated.
    replica_san: Option<Arc<str>>,
}

impl QuotaService {
    /// A service over `ledger`, counting prompts with `prompts`, refusing prompts over
    /// `max_prompt_bytes` of text.
    pub fn new(ledger: Arc<dyn Ledger>, prompts: PromptCounter, max_prompt_bytes: usize) -> Self {
        Self {
            ledger,
            prompts,
            max_prompt_bytes,
            replica_san: None,
        }
    }

    /// Believe the caller a replica names when its certificate carries `san`.
    pub fn trusting_replicas(mut self, san: Option<Arc<str>>) -> Self {
        self.replica_san = san;
        self
    }
}

/// A call's caller, established once: see [`QuotaService::authenticate`].
struct Authenticated {
    cx: CallContext,
    caller: Option<Arc<Caller>>,
    policy: Arc<Policy>,
}

/// The handlers, each timed by the trait impl below.
impl QuotaService {
    /// Who `request` is from (none: the policy has no `[callers]`), refused unless it may make
    /// `call`; the context a forwarding ledger passes on; and the policy it was checked
    /// against (read once per call).
    fn authenticate<T>(&self, request: &Request<T>, call: &str) -> Result<Authenticated, Status> {
        let policy = self.ledger.policy()?;
        let peer = request.extensions().get::<Arc<PeerIdentity>>();
        let caller = auth::caller(
            policy.access(),
            request.metadata(),
            peer,
            self.replica_san.as_deref(),
        )?
        .cloned();
        auth::may_call(caller.as_deref(), call)?;
        let cx = CallContext {
            authorization: request.metadata().get("authorization").cloned(),
            operator: None,
            caller: caller.as_ref().map(|c| c.name.clone()),
        };
        Ok(Authenticated { cx, caller, policy })
    }

    async fn reserve_call(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let Authenticated { cx, caller, policy } = self.authenticate(&request, "Reserve")?;
        let call = validate::reserve(request.into_inner(), self.max_prompt_bytes)?;
        auth::may_name(caller.as_deref(), &call.input.subject)?;
        auth::may_use_group(caller.as_deref(), call.input.group.as_deref())?;
        let input = self.prompts.reserve_input(call, || Ok(policy)).await?;
        self.ledger.reserve(&cx, input).await.map(Response::new)
    }

    async fn commit_call(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let cx = self.authenticate(&request, "Commit")?.cx;
        let (id, usage) = validate::commit(request.get_ref())?;
        self.ledger.commit(&cx, id, usage).await.map(Response::new)
    }

    async fn refund_call(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundResponse>, Status> {
        let cx = self.authenticate(&request, "Refund")?.cx;
        let id = validate::reservation_id(&request.get_ref().reservation_id)?;
        self.ledger.refund(&cx, id).await.map(Response::new)
    }

    async fn extend_call(
        &self,
        request: Request<proto::ExtendRequest>,
    ) -> Result<Response<proto::ExtendResponse>, Status> {
        let cx = self.authenticate(&request, "Extend")?.cx;
        let req = request.into_inner();
        let id = validate::reservation_id(&req.reservation_id)?;
        let hold_us = validate::required_hold(req.hold.as_ref())?;
        self.ledger
            .extend(&cx, id, hold_us)
            .await
            .map(Response::new)
    }

    async fn get_usage_call(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let Authenticated { cx, caller, .. } = self.authenticate(&request, "GetUsage")?;
        let caller = caller.as_deref();
        let query = validate::usage_query(request.get_ref())?;
        match (&query.subject, &query.group) {
            (Some(subject), group) => {
                auth::may_name(caller, subject)?;
                if group.is_some() {
                    auth::may_use_group(caller, group.as_deref())?;
                }
            }
            (None, Some(group)) => auth::may_use_group(caller, Some(group))?,
            (None, None) => auth::may_read_shared(caller)?,
        }
        // A client IP's figures are everyone's who share it.
        if query.client_ip.is_some() {
            auth::may_read_shared(caller)?;
        }
        self.ledger.usage(&cx, query).await.map(Response::new)
    }

    /// Answered here, whatever the ledger: counting needs only the policy.
    async fn count_tokens_call(
        &self,
        request: Request<proto::CountTokensRequest>,
    ) -> Result<Response<proto::CountTokensResponse>, Status> {
        let policy = self.authenticate(&request, "CountTokens")?.policy;
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
