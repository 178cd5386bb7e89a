//! The `tollgate.v1.Admin` service (validate, then hand the call to the [`Ledger`]) and the
//! bearer-token check in front of it.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::validate;
use crate::ledger::{Authorization, ExportStream, Ledger};
use crate::proto;
use crate::telemetry;

/// Serves SetSubject, GetSubject, ResetUsage and Export.
#[derive(Debug, Clone)]
pub struct AdminService {
    ledger: Arc<dyn Ledger>,
}

impl AdminService {
    /// A service over `ledger`. Over the local ledger it is served behind [`AdminAuth`]; over
    /// a forwarding one, the tollgate that decides checks the token the call carries.
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
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

/// The `authorization` a call came with, for a forwarding ledger to pass on.
fn authorization<T>(request: &Request<T>) -> Authorization {
    request.metadata().get("authorization").cloned()
}

/// The handlers, each timed by the trait impl below.
impl AdminService {
    async fn set_subject_call(
        &self,
        request: Request<proto::SetSubjectRequest>,
    ) -> Result<Response<proto::SetSubjectResponse>, Status> {
        let authorization = authorization(&request);
        let req = request.into_inner();
        validate::subject(&req.subject)?;
        validate::tier(&req.tier)?;
        validate::group(&req.group)?;
        self.ledger
            .set_subject(authorization, req)
            .await
            .map(Response::new)
    }

    async fn get_subject_call(
        &self,
        request: Request<proto::GetSubjectRequest>,
    ) -> Result<Response<proto::GetSubjectResponse>, Status> {
        let authorization = authorization(&request);
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        self.ledger
            .get_subject(authorization, subject)
            .await
            .map(Response::new)
    }

    async fn reset_usage_call(
        &self,
        request: Request<proto::ResetUsageRequest>,
    ) -> Result<Response<proto::ResetUsageResponse>, Status> {
        let authorization = authorization(&request);
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        self.ledger
            .reset_usage(authorization, subject)
            .await
            .map(Response::new)
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

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let authorization = authorization(&request);
        telemetry::timed("Export", self.ledger.export(authorization))
            .await
            .map(Response::new)
    }
}
