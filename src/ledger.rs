//! The ledger: the engine behind its lock, with the writer that makes its decisions durable.
//!
//! Every mutating call follows the same path: generate ids and read nothing else before the
//! lock; under the lock, read the clock, decide, and hand the mutations to the writer (so they
//! reach it in decision order); after the lock, wait until they are durable; then answer.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::Clock;
use crate::engine::{
    Bounds, CommitOutcome, Engine, EngineError, Mutation, RefundOutcome, ReservationId,
    ReserveInput, ReserveOutcome, Usage, UsageReport,
};
use crate::policy::Policy;
use crate::store::{Durability, Store, StoreError, Ticket, Writer};

/// Why a ledger call failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The engine refused the request (nothing changed).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The decision could not be made durable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A panic while the engine lock was held; the state may be inconsistent, so the ledger
    /// refuses all further work until restart.
    #[error("the ledger is stopped after an internal error; restart the service")]
    Poisoned,
}

/// What one housekeeping pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Housekeeping {
    /// Holds expired (charged in full).
    pub expired: usize,
    /// Settled reservations purged after the retention.
    pub purged: usize,
    /// Subjects at rest forgotten.
    pub forgotten: usize,
}

/// The authoritative quota ledger of one tollgate process.
///
/// Why a `std::sync::Mutex` and not a tokio one: no `.await` is ever held under it, and the
/// work under it is about a microsecond (see `benches/decision.rs`), so a blocking lock is both
/// correct and cheaper than an async one.
pub struct Ledger {
    engine: Mutex<Engine>,
    writer: Writer,
    clock: Arc<dyn Clock>,
    store: Store,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Open the data directory, load everything in it, and start the writer.
    pub fn open(
        data_dir: &Path,
        policy: Arc<Policy>,
        bounds: Bounds,
        durability: Durability,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let store = Store::open(data_dir)?;
        let snapshot = store.load()?;
        let mut engine = Engine::new(policy, bounds);
        let (subjects, reservations) = (snapshot.subjects.len(), snapshot.reservations.len());
        for problem in engine.restore(
            snapshot.subjects,
            snapshot.reservations,
            snapshot.assignments,
        ) {
            tracing::warn!(%problem, "repaired on load");
        }
        tracing::info!(
            subjects,
            reservations,
            open_holds = engine.open_holds(),
            dir = %data_dir.display(),
            "ledger loaded"
        );
        Ok(Self {
            engine: Mutex::new(engine),
            writer: Writer::start(store.clone(), durability),
            clock,
            store,
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Engine>, LedgerError> {
        self.engine.lock().map_err(|_| LedgerError::Poisoned)
    }

    /// Run `decide` under the lock with the current time, and queue its mutations.
    fn decide<T>(
        &self,
        decide: impl FnOnce(&mut Engine, u64) -> Result<(T, Vec<Mutation>), EngineError>,
    ) -> Result<(T, Ticket), LedgerError> {
        let mut engine = self.lock()?;
        let now = self.clock.now_micros();
        // Due holds are expired first, on their own: that changes memory even when the engine
        // then refuses the call, and those records must reach the disk too, or a restart would
        // hold (and later charge) the expired tokens a second time.
        let mut mutations = Vec::new();
        engine.expire_due(now, &mut mutations);
        match decide(&mut engine, now) {
            Ok((value, more)) => {
                mutations.extend(more);
                let ticket = self.writer.submit(mutations)?;
                Ok((value, ticket))
            }
            Err(refused) => {
                // Not awaited: no answer rests on these records.
                self.writer.submit(mutations)?;
                Err(refused.into())
            }
        }
    }

    /// The ticket for an answer that repeats an earlier decision (a retried Reserve, Commit or
    /// Refund): the call wrote nothing, but the decision it repeats may still be on its way to
    /// disk, and under strict durability it must not be acknowledged before it is there.
    fn after_earlier(&self, ticket: Ticket) -> Result<Ticket, LedgerError> {
        match (ticket, self.writer.durability()) {
            (Ticket::Ready, Durability::Strict) => Ok(self.writer.barrier()?),
            (ticket, _) => Ok(ticket),
        }
    }

    /// The current time by the ledger's clock.
    pub fn now_micros(&self) -> u64 {
        self.clock.now_micros()
    }

    /// Reserve: decide, hold, and answer once durable.
    pub async fn reserve(&self, mut input: ReserveInput) -> Result<ReserveOutcome, LedgerError> {
        input.id = ReservationId::generate(self.clock.now_micros());
        let (outcome, ticket) = self.decide(|e, now| e.reserve(input, now))?;
        let ticket = if outcome.replayed {
            self.after_earlier(ticket)?
        } else {
            ticket
        };
        ticket.durable().await?;
        Ok(outcome)
    }

    /// Commit: charge the reported usage, and answer once durable.
    pub async fn commit(
        &self,
        id: ReservationId,
        usage: Usage,
    ) -> Result<CommitOutcome, LedgerError> {
        let (outcome, ticket) = self.decide(|e, now| e.commit(id, usage, now))?;
        // A successful Commit or Refund that wrote nothing is a retry of a settled one.
        self.after_earlier(ticket)?.durable().await?;
        Ok(outcome)
    }

    /// Refund: give the hold back, and answer once durable.
    pub async fn refund(&self, id: ReservationId) -> Result<RefundOutcome, LedgerError> {
        let (outcome, ticket) = self.decide(|e, now| e.refund(id, now))?;
        // A successful Commit or Refund that wrote nothing is a retry of a settled one.
        self.after_earlier(ticket)?.durable().await?;
        Ok(outcome)
    }

    /// A subject's usage. Holds past their deadline are expired first, so the answer is
    /// current; that expiry is persisted but not awaited (replaying it after a crash gives the
    /// same result, since the deadlines are durable).
    pub fn usage(&self, subject: &str) -> Result<UsageReport, LedgerError> {
        let (report, _ticket) = self.decide(|e, now| {
            let mut out = Vec::new();
            e.expire_due(now, &mut out);
            Ok((e.usage(subject, now), out))
        })?;
        Ok(report)
    }

    /// Assign a tier to a subject, durably.
    pub async fn set_subject(&self, subject: &str, tier: &str) -> Result<(), LedgerError> {
        let ((), ticket) = self.decide(|e, _| Ok(((), e.set_subject(subject, tier)?)))?;
        ticket.durable().await?;
        Ok(())
    }

    /// A subject's tier and whether it was assigned.
    pub fn subject_tier(&self, subject: &str) -> Result<(String, bool), LedgerError> {
        Ok(self.lock()?.subject_tier(subject))
    }

    /// Forget a subject's usage, durably.
    pub async fn reset_usage(&self, subject: &str) -> Result<(), LedgerError> {
        let ((), ticket) = self.decide(|e, _| Ok(((), e.reset_usage(subject))))?;
        ticket.durable().await?;
        Ok(())
    }

    /// One housekeeping pass: expire due holds, purge settled records past the retention, and
    /// (when `forget` is set) forget subjects at rest. Persisted, not awaited.
    pub fn housekeeping(&self, forget: bool) -> Result<Housekeeping, LedgerError> {
        let (report, _ticket) = self.decide(|e, now| {
            let mut out = Vec::new();
            let expired = e.expire_due(now, &mut out);
            let purged = e.purge_settled(now, &mut out);
            let forgotten = if forget {
                e.forget_subjects_at_rest(now, &mut out)
            } else {
                0
            };
            Ok((
                Housekeeping {
                    expired,
                    purged,
                    forgotten,
                },
                out,
            ))
        })?;
        Ok(report)
    }

    /// Wait until everything decided so far is on disk.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.writer.barrier()?.durable().await?;
        Ok(())
    }

    /// Counts for inspection: (open holds, reservation records, subjects in memory).
    pub fn counts(&self) -> Result<(usize, usize, usize), LedgerError> {
        let e = self.lock()?;
        Ok((e.open_holds(), e.reservation_count(), e.subject_count()))
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.store.size_on_disk()
    }

    /// The durability in force.
    pub fn durability(&self) -> Durability {
        self.writer.durability()
    }
}
