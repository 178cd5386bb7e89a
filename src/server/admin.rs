//! The `tollgate.v1.Admin` service and the bearer-token check in front of it.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::validate;
use crate::ledger::Ledger;
use crate::policy::Overrides;
use crate::proto;
use crate::telemetry;

/// Serves SetSubject, GetSubject and ResetUsage.
#[derive(Debug, Clone)]
pub struct AdminService {
    ledger: Arc<Ledger>,
}

impl AdminService {
    /// A service over `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Self {
        Self { ledger }
    }
}

/// Admits an Admin call only with metadata `authorization: Bearer <token>`. With no token
/// configured every Admin call is refused: an operator API must never be open by default.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("configured", &self.token.is_some())
            .finish()
    }
}

impl AdminAuth {
    /// A check against `token` (none: refuse all).
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Err(Status::unauthenticated(
                "admin calls are disabled: start tollgate with --admin-token (TOLLGATE_ADMIN_TOKEN)",
            ));
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("admin calls need metadata `authorization: Bearer <token>`")
            })?;
        // Constant-time: the comparison must not tell an attacker how much of a guess was right.
        if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("the admin token is wrong"))
        }
    }
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

/// The handlers, each timed by the trait impl below.
impl AdminService {
    async fn set_subject_call(
        &self,
        request: Request<proto::SetSubjectRequest>,
    ) -> Result<Response<proto::SetSubjectResponse>, Status> {
        let req = request.into_inner();
        validate::subject(&req.subject)?;
        validate::tier(&req.tier)?;
        let group = validate::group(&req.group)?;
        let overrides = req.overrides.map(from_proto).unwrap_or_default();
        self.ledger
            .set_subject(&req.subject, &req.tier, group, overrides.clone())
            .await?;
        tracing::info!(subject = %req.subject, tier = %req.tier, group = %req.group, ?overrides, "subject set");
        Ok(Response::new(proto::SetSubjectResponse {
            subject: req.subject,
            tier: req.tier,
            overrides: Some(to_proto(&overrides)),
            group: req.group,
        }))
    }

    async fn get_subject_call(
        &self,
        request: Request<proto::GetSubjectRequest>,
    ) -> Result<Response<proto::GetSubjectResponse>, Status> {
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        let (tier, assigned, overrides, group) = self.ledger.subject_config(&subject)?;
        Ok(Response::new(proto::GetSubjectResponse {
            subject,
            tier,
            assigned,
            overrides: Some(to_proto(&overrides)),
            group: group.unwrap_or_default(),
        }))
    }

    async fn reset_usage_call(
        &self,
        request: Request<proto::ResetUsageRequest>,
    ) -> Result<Response<proto::ResetUsageResponse>, Status> {
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        self.ledger.reset_usage(&subject).await?;
        tracing::info!(%subject, "usage reset");
        Ok(Response::new(proto::ResetUsageResponse { subject }))
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn set_subject(
        &self,
        request: Request<proto::SetSubjectRequest>,
    ) -> Result<Response<proto::SetSubjectResponse>, Status> {
        telemetry::timed("SetSubject", self.set_subject_call(request)).await
    }

    async fn get_subject(
        &self,
        request: Request<proto::GetSubjectRequest>,
    ) -> Result<Response<proto::GetSubjectResponse>, Status> {
        telemetry::timed("GetSubject", self.get_subject_call(request)).await
    }

    async fn reset_usage(
        &self,
        request: Request<proto::ResetUsageRequest>,
    ) -> Result<Response<proto::ResetUsageResponse>, Status> {
        telemetry::timed("ResetUsage", self.reset_usage_call(request)).await
    }

    type ExportStream = super::export::ExportStream;

    async fn export(
        &self,
        _request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        telemetry::timed("Export", async {
            // Everything decided before the call, denials' counters included (the sweeper
            // persists those in batches), is in the store the export reads.
            self.ledger.flush().await?;
            super::export::start(&self.ledger).await.map(Response::new)
        })
        .await
    }
}
