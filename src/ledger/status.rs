//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::engine::EngineError;
use crate::ledger::LedgerError;

impl From<LedgerError> for Status {
    fn from(e: LedgerError) -> Self {
        let code = match &e {
            LedgerError::Engine(engine) => match engine {
                EngineError::InvalidArgument { .. } => Code::InvalidArgument,
                EngineError::NotFound(_) => Code::NotFound,
                EngineError::NotOwner(_) => Code::PermissionDenied,
                EngineError::IllegalTransition { .. } | EngineError::IdempotencyConflict { .. } => {
                    Code::FailedPrecondition
                }
                EngineError::Exhausted { .. } => Code::ResourceExhausted,
            },
            LedgerError::Store(_) => Code::Unavailable,
            LedgerError::Poisoned => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
