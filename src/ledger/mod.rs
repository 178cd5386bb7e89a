//! What answers the Quota and Admin calls once they are validated: a [`Ledger`].
//!
//! There are two, and one server over both:
//! - [`LocalLedger`] (`local.rs`): the engine behind its lock, with the writer that makes its
//!   decisions durable. It decides; [`answer.rs`](answer) turns its outcomes into answers.
//! - [`ForwardingLedger`](crate::relay::ForwardingLedger): a client to another tollgate that
//!   decides (relay mode for sidecars, and a follower replica to its leader), with the fail
//!   modes for when it cannot be reached.
//!
//! The server ([`QuotaService`](crate::server::QuotaService),
//! [`AdminService`](crate::server::AdminService)) validates each request, counts prompt
//! tokens, and hands the call to whichever ledger it was given: so validation, counting, the
//! hold state machine and the answers' shape exist once, whatever decides.

mod answer;
pub mod export;
mod local;
mod status;

use std::pin::Pin;
use std::sync::Arc;

use tonic::metadata::AsciiMetadataValue;
use tonic::Status;

use crate::engine::{ReservationId, ReserveInput, Usage, UsageQuery};
use crate::policy::Policy;
use crate::proto;

pub use local::{Housekeeping, LedgerError, LocalLedger};

/// The chunks of an Admin `Export`, as they are streamed to the caller.
pub type ExportStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::ExportChunk, Status>> + Send>>;

/// The metadata in which a follower names the caller it authenticated, for its leader (which
/// believes it only from a replica's certificate: `server::auth::caller`).
pub const FORWARDED_CALLER: &str = "x-tollgate-caller";

/// Who a call is from, as the server established it, and what a forwarding ledger passes on.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The `authorization` metadata the call came with. The server checks it before the call
    /// reaches a ledger; a forwarding ledger passes it on, and the tollgate that decides checks
    /// it again there (a relay or follower holds no admin token of its own).
    pub authorization: Option<AsciiMetadataValue>,
    /// The operator an Admin call was authenticated as: named in the audit log.
    pub operator: Option<String>,
    /// The caller (`[callers]`) a Quota call was authenticated as.
    pub caller: Option<String>,
}

/// Decides, or asks the one that decides: the calls of the Quota and Admin services, taken
/// after validation (and, for Reserve, after prompt counting).
///
/// Why the answers are the wire's own messages rather than the engine's outcomes: a forwarding
/// ledger receives them from the leader already built, and passes them on unchanged (decoding
/// them into engine types and encoding them again would cost a copy per call and could lose
/// what a newer leader sends); the local ledger builds them from its outcomes once.
///
/// Errors are gRPC statuses for the same reason: the leader's refusal (its code and message)
/// reaches the caller as the leader gave it.
#[tonic::async_trait]
pub trait Ledger: Send + Sync + std::fmt::Debug + 'static {
    /// The policy in force here: for counting prompt tokens, CountTokens and fail modes.
    fn policy(&self) -> Result<Arc<Policy>, Status>;

    /// Reserve (or, with `dry_run`, only decide) `input`'s tokens.
    async fn reserve(
        &self,
        cx: &CallContext,
        input: ReserveInput,
    ) -> Result<proto::ReserveResponse, Status>;

    /// Settle a hold with the usage the provider reported.
    async fn commit(
        &self,
        cx: &CallContext,
        id: ReservationId,
        usage: Usage,
    ) -> Result<proto::CommitResponse, Status>;

    /// Release a hold whose call never happened.
    async fn refund(
        &self,
        cx: &CallContext,
        id: ReservationId,
    ) -> Result<proto::RefundResponse, Status>;

    /// Keep a hold for `hold_us` more from now.
    async fn extend(
        &self,
        cx: &CallContext,
        id: ReservationId,
        hold_us: u64,
    ) -> Result<proto::ExtendResponse, Status>;

    /// One scope's usage.
    async fn usage(
        &self,
        cx: &CallContext,
        query: UsageQuery,
    ) -> Result<proto::GetUsageResponse, Status>;

    /// Assign a subject its tier, group and overrides (fields already validated).
    async fn set_subject(
        &self,
        cx: &CallContext,
        request: proto::SetSubjectRequest,
    ) -> Result<proto::SetSubjectResponse, Status>;

    /// A subject's tier, group and overrides.
    async fn get_subject(
        &self,
        cx: &CallContext,
        subject: String,
    ) -> Result<proto::GetSubjectResponse, Status>;

    /// Forget a subject's usage.
    async fn reset_usage(
        &self,
        cx: &CallContext,
        subject: String,
    ) -> Result<proto::ResetUsageResponse, Status>;

    /// Stream the whole state, as `tollgate export` writes it.
    async fn export(&self, cx: &CallContext) -> Result<ExportStream, Status>;
}
