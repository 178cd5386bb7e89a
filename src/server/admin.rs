//! The `tollgate.v1.Admin` service (validate, then hand the call to the [`Ledger`]) and the
//! bearer-token check in front of it.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::{auth, validate};
use crate::ledger::{CallContext, ExportStream, Ledger};
use crate::policy::callers::{hash_token, Digest32};
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

/// Admits an Admin call only with metadata `authorization: Bearer <token>` whose token is
/// `--admin-token` or an `[operators]` entry's; the operator's name then rides with the call
/// (for the audit log). With neither configured every Admin call is refused: an operator API
/// must never be open by default.
///
/// Tokens are compared as SHA-256 digests in constant time, against `--admin-token` and every
/// operator alike, so neither a guess's length nor which entry it came close to shows.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Digest32>,
    ledger: Arc<dyn Ledger>,
}

/// The operator an Admin call was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorName(pub String);

/// The name `--admin-token` is logged under.
pub const ADMIN_TOKEN_OPERATOR: &str = "admin-token";

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("admin_token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl AdminAuth {
    /// A check against `token` (`--admin-token`) and the operators of `ledger`'s policy.
    pub fn new(token: Option<String>, ledger: Arc<dyn Ledger>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(|t| hash_token(&t)),
            ledger,
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let policy = self.ledger.policy()?;
        let access = policy.access();
        if self.token.is_none() && access.operators.is_empty() {
            return Err(Status::unauthenticated(
                "admin calls are disabled: start tollgate with --admin-token (TOLLGATE_ADMIN_TOKEN) or name [operators] in the policy",
            ));
        }
        let given = auth::bearer(request.metadata())?.ok_or_else(|| {
            Status::unauthenticated("admin calls need metadata `authorization: Bearer <token>`")
        })?;
        let digest = hash_token(given);
        let by_flag = self
            .token
            .as_ref()
            .is_some_and(|t| bool::from(t.ct_eq(&digest)));
        let by_policy = access.operator_by_token(given).map(|o| o.name.clone());
        let name = match (by_flag, by_policy) {
            (true, _) => ADMIN_TOKEN_OPERATOR.to_string(),
            (false, Some(name)) => name,
            (false, None) => return Err(Status::unauthenticated("the admin token is wrong")),
        };
        request.extensions_mut().insert(OperatorName(name));
        Ok(request)
    }
}

/// Who a call is from (its operator, if the check in front named one) and the
/// `authorization` a forwarding ledger passes on.
fn context<T>(request: &Request<T>) -> CallContext {
    CallContext {
        authorization: request.metadata().get("authorization").cloned(),
        operator: request
            .extensions()
            .get::<OperatorName>()
            .map(|o| o.0.clone()),
        caller: None,
    }
}

/// The handlers, each timed by the trait impl below.
impl AdminService {
    async fn set_subject_call(
        &self,
        request: Request<proto::SetSubjectRequest>,
    ) -> Result<Response<proto::SetSubjectResponse>, Status> {
        let cx = context(&request);
        let req = request.into_inner();
        validate::subject(&req.subject)?;
        validate::tier(&req.tier)?;
        validate::group(&req.group)?;
        self.ledger.set_subject(&cx, req).await.map(Response::new)
    }

    async fn get_subject_call(
        &self,
        request: Request<proto::GetSubjectRequest>,
    ) -> Result<Response<proto::GetSubjectResponse>, Status> {
        let cx = context(&request);
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        self.ledger
            .get_subject(&cx, subject)
            .await
            .map(Response::new)
    }

    async fn reset_usage_call(
        &self,
        request: Request<proto::ResetUsageRequest>,
    ) -> Result<Response<proto::ResetUsageResponse>, Status> {
        let cx = context(&request);
        let subject = request.into_inner().subject;
        validate::subject(&subject)?;
        self.ledger
            .reset_usage(&cx, subject)
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
        let cx = context(&request);
        telemetry::timed("Export", self.ledger.export(&cx))
            .await
            .map(Response::new)
    }
}
