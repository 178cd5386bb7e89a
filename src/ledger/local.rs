//! The ledger: the engine behind its lock, with the writer that makes its decisions durable.
//!
//! Every mutating call follows the same path: generate ids and read nothing else before the
//! lock; under the lock, read the clock, decide, and hand the mutations to the writer (so they
//! reach it in decision order); after the lock, wait until they are durable; then answer.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::Clock;
use crate::engine::{
    Bounds, CommitOutcome, Engine, EngineError, Mutation, RefundOutcome, ReservationId,
    ReserveInput, ReserveOutcome, Usage, UsageQuery, UsageReport,
};
use crate::failstop::FailStop;
use crate::policy::{Overrides, Policy, PolicyCell};
use crate::store::sled::SledStore;
use crate::store::{Durability, Recovery, Store, StoreError, Ticket, Writer};

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
    /// Holds expired (charged in full) by this pass.
    pub expired: usize,
    /// Settled reservations purged after the retention.
    pub purged: usize,
    /// Scopes at rest forgotten.
    pub forgotten: usize,
    /// Scopes whose denial counters were handed to the store.
    pub denial_counters_saved: usize,
    /// After the pass: open holds, reservation records, scopes in memory.
    pub counts: (usize, usize, usize),
}

/// What an answer must wait for before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing: the answer acknowledges no change (a denial, a read, a malformed request).
    Nothing,
    /// This call's own records.
    Own,
    /// The earlier decision the answer repeats or reports (a retried Commit, a replayed
    /// Reserve, "already COMMITTED"): under strict durability it may still be on its way to
    /// disk, and must not be acknowledged before it is there.
    Earlier,
}

impl Wait {
    /// Whether the answer waits for the disk at all.
    fn waits(self) -> bool {
        self != Wait::Nothing
    }

    fn for_error(e: &EngineError) -> Self {
        match e {
            EngineError::NotFound(_)
            | EngineError::NotOwner(_)
            | EngineError::IllegalTransition { .. }
            | EngineError::IdempotencyConflict { .. } => Wait::Earlier,
            EngineError::InvalidArgument { .. } | EngineError::Exhausted { .. } => Wait::Nothing,
        }
    }
}

/// The authoritative quota ledger of one tollgate process.
///
/// Why a `std::sync::Mutex` and not a tokio one: no `.await` is ever held under it, and the
/// work under it is about a microsecond (see `benches/decision.rs`), so a blocking lock is both
/// correct and cheaper than an async one.
pub struct LocalLedger {
    engine: Mutex<Engine>,
    /// The engine's policy, readable without the engine lock.
    policy: PolicyCell,
    writer: Writer,
    clock: Arc<dyn Clock>,
    /// Tripped by a failed write, a panic under the engine lock, or a poisoned lock.
    failed: FailStop,
}

/// The engine lock, held. Why a guard of our own: a panic while it is held may leave the
/// engine half-changed, and the process must then stop (fail-stop), not go on refusing calls
/// while health says SERVING. Dropped during unwinding, it trips the ledger's [`FailStop`].
struct EngineGuard<'a> {
    engine: MutexGuard<'a, Engine>,
    failed: &'a FailStop,
}

impl Deref for EngineGuard<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.failed
                .trip("a panic while the engine lock was held; its state may be inconsistent");
        }
    }
}

impl std::fmt::Debug for LocalLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLedger")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl LocalLedger {
    /// Open the data directory (sled), load everything in it, and start the writer. A store
    /// that has lost acknowledged records is refused ([`StoreError::DataLoss`]).
    pub fn open(
        data_dir: &Path,
        policy: Arc<Policy>,
        bounds: Bounds,
        durability: Durability,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let store = SledStore::open(data_dir, Recovery::Refuse)?;
        Self::open_store(
            Arc::new(store),
            policy,
            bounds,
            durability,
            clock,
            FailStop::new(),
        )
    }

    /// Load everything in an opened store (checking it as it was opened to), and start the
    /// writer; `failed` is tripped when the ledger can no longer go on.
    pub fn open_store(
        store: Arc<dyn Store>,
        policy: Arc<Policy>,
        bounds: Bounds,
        durability: Durability,
        clock: Arc<dyn Clock>,
        failed: FailStop,
    ) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        let snapshot = store.load()?;
        let loaded = started.elapsed();
        let cell = PolicyCell::new(policy.clone());
        let mut engine = Engine::new(policy, bounds);
        let (scopes, reservations) = (snapshot.scopes.len(), snapshot.reservations.len());
        for problem in engine.restore(snapshot.scopes, snapshot.reservations, snapshot.assignments)
        {
            tracing::warn!(%problem, "repaired on load");
        }
        tracing::info!(
            scopes,
            reservations,
            open_holds = engine.open_holds(),
            store = %store.location(),
            load_ms = loaded.as_millis() as u64,
            restore_ms = (started.elapsed() - loaded).as_millis() as u64,
            "ledger loaded"
        );
        Ok(Self {
            engine: Mutex::new(engine),
            policy: cell,
            writer: Writer::start(store, durability, failed.clone()),
            clock,
            failed,
        })
    }

    /// The switch this ledger trips when it can no longer go on (see [`FailStop`]).
    pub fn fail_stop(&self) -> &FailStop {
        &self.failed
    }

    fn lock(&self) -> Result<EngineGuard<'_>, LedgerError> {
        match self.engine.lock() {
            Ok(engine) => Ok(EngineGuard {
                engine,
                failed: &self.failed,
            }),
            Err(_) => {
                self.failed
                    .trip("the engine lock is poisoned by an earlier panic");
                Err(LedgerError::Poisoned)
            }
        }
    }

    /// Take a queue slot (waiting, if the disk is behind, before the lock), then under the lock
    /// expire due holds, run `decide` with the current time, and queue every mutation made,
    /// marked as awaited when `wait` says the answer will wait for the disk.
    ///
    /// Due holds are expired first, on their own: that changes memory even when the engine then
    /// refuses the call, and those records reach the disk either way, or a restart would hold
    /// (and later charge) the expired tokens a second time.
    ///
    /// A decision that changes nothing durable (a denial, a read) gives its slot back as the
    /// lock is released: it never keeps a place in the queue that an admitted call needs.
    /// Nothing is logged or counted under the lock: the expiries are returned.
    async fn decide<T>(
        &self,
        decide: impl FnOnce(&mut Engine, u64, &mut Vec<Mutation>) -> Result<T, EngineError>,
        wait: impl FnOnce(&Result<T, EngineError>) -> Wait,
    ) -> Result<(Result<T, EngineError>, Ticket, Wait), LedgerError> {
        let slot = self.writer.slot().await?;
        let (result, ticket, wait, expired) = {
            let mut engine = self.lock()?;
            let now = self.clock.now_micros();
            let mut mutations = Vec::new();
            let expired = engine.expire_due(now, &mut mutations);
            let result = decide(&mut engine, now, &mut mutations);
            let wait = wait(&result);
            let ticket = self.writer.submit(slot, mutations, wait.waits())?;
            (result, ticket, wait, expired)
        };
        crate::telemetry::add(crate::telemetry::HOLDS_EXPIRED, expired as u64);
        Ok((result, ticket, wait))
    }

    /// Wait as `wait` says, then give the answer.
    async fn answer<T>(
        &self,
        result: Result<T, EngineError>,
        ticket: Ticket,
        wait: Wait,
    ) -> Result<T, LedgerError> {
        match (wait, ticket) {
            (Wait::Nothing, _) => {}
            (Wait::Own | Wait::Earlier, Ticket::Pending(rx)) => {
                Ticket::Pending(rx).durable().await?;
            }
            (Wait::Earlier, Ticket::Ready) if self.writer.durability() == Durability::Strict => {
                self.writer.barrier()?.durable().await?;
            }
            (Wait::Own | Wait::Earlier, Ticket::Ready) => {}
        }
        self.may_answer()?;
        Ok(result?)
    }

    /// Whether the store lets this process answer from memory ([`Store::may_answer`]): a
    /// leader whose lease may have run out answers nothing, not even a denial or a read, which
    /// a follower may by now decide otherwise. It then stops (fail-stop) and comes back as a
    /// standby.
    fn may_answer(&self) -> Result<(), LedgerError> {
        self.writer.store().may_answer().map_err(|e| {
            self.failed.trip(e.to_string());
            e.into()
        })
    }

    /// How long the answer to a call on an existing hold (Commit, Refund, Extend) waits: a
    /// success may repeat an earlier one, so it waits like a replay; an error as
    /// [`Wait::for_error`] says.
    fn settlement_wait<T>(result: &Result<T, EngineError>) -> Wait {
        result
            .as_ref()
            .map_or_else(Wait::for_error, |_| Wait::Earlier)
    }

    /// The current time by the ledger's clock.
    pub fn now_micros(&self) -> u64 {
        self.clock.now_micros()
    }

    /// Reserve: decide, hold, and answer once durable.
    pub async fn reserve(&self, mut input: ReserveInput) -> Result<ReserveOutcome, LedgerError> {
        input.id = ReservationId::generate(self.clock.now_micros());
        let (result, ticket, wait) = self
            .decide(
                |e, now, out| e.reserve(input, now, out),
                |result| match result {
                    Ok(o) if o.replayed => Wait::Earlier,
                    Ok(o) if o.reservation_id.is_some() => Wait::Own,
                    // A denial or dry run acknowledges nothing: it need not wait for the disk.
                    Ok(_) => Wait::Nothing,
                    Err(e) => Wait::for_error(e),
                },
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// Commit: charge the reported usage, and answer once durable (a retry: once the first
    /// Commit is durable).
    pub async fn commit(
        &self,
        id: ReservationId,
        usage: Usage,
    ) -> Result<CommitOutcome, LedgerError> {
        self.commit_by(None, id, usage).await
    }

    /// [`LocalLedger::commit`] by `caller`: refused if another caller made the hold.
    pub async fn commit_by(
        &self,
        caller: Option<&str>,
        id: ReservationId,
        usage: Usage,
    ) -> Result<CommitOutcome, LedgerError> {
        let (result, ticket, wait) = self
            .decide(
                |e, now, out| {
                    e.check_owner(id, caller)?;
                    e.commit(id, usage, now, out)
                },
                Self::settlement_wait,
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// Refund: give the hold back, and answer once durable (a retry: once the first Refund is
    /// durable).
    pub async fn refund(&self, id: ReservationId) -> Result<RefundOutcome, LedgerError> {
        self.refund_by(None, id).await
    }

    /// [`LocalLedger::refund`] by `caller`: refused if another caller made the hold.
    pub async fn refund_by(
        &self,
        caller: Option<&str>,
        id: ReservationId,
    ) -> Result<RefundOutcome, LedgerError> {
        let (result, ticket, wait) = self
            .decide(
                |e, now, out| {
                    e.check_owner(id, caller)?;
                    e.refund(id, now, out)
                },
                Self::settlement_wait,
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// Extend: push a hold's expiry out, and answer once durable.
    pub async fn extend(&self, id: ReservationId, hold_us: u64) -> Result<u64, LedgerError> {
        self.extend_by(None, id, hold_us).await
    }

    /// [`LocalLedger::extend`] by `caller`: refused if another caller made the hold.
    pub async fn extend_by(
        &self,
        caller: Option<&str>,
        id: ReservationId,
        hold_us: u64,
    ) -> Result<u64, LedgerError> {
        let (result, ticket, wait) = self
            .decide(
                |e, now, out| {
                    e.check_owner(id, caller)?;
                    e.extend(id, hold_us, now, out)
                },
                Self::settlement_wait,
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// A scope's usage, from memory. Holds past their deadline are expired first, so the
    /// answer is current; that expiry is persisted but not awaited (replaying it after a crash
    /// gives the same result, since the deadlines are durable).
    pub async fn usage(&self, query: &UsageQuery) -> Result<UsageReport, LedgerError> {
        let (result, _ticket, _) = self
            .decide(|e, now, _| Ok(e.usage(query, now)), |_| Wait::Nothing)
            .await?;
        self.may_answer()?;
        Ok(result?)
    }

    /// Set a subject's tier, group and overrides, durably.
    pub async fn set_subject(
        &self,
        subject: &str,
        tier: &str,
        group: Option<String>,
        overrides: Overrides,
    ) -> Result<(), LedgerError> {
        let (result, ticket, wait) = self
            .decide(
                |e, _, out| e.set_subject(subject, tier, group, overrides, out),
                |_| Wait::Own,
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// The policy in force (a snapshot: a reload swaps the whole policy). Read without the
    /// engine lock.
    pub fn policy(&self) -> Result<Arc<Policy>, LedgerError> {
        Ok(self.policy.get())
    }

    /// Put a new policy in force (see [`Engine::set_policy`]). The cell is set under the
    /// engine lock, so the two never disagree for longer than this call.
    pub fn set_policy(&self, policy: Arc<Policy>) -> Result<(), LedgerError> {
        let mut engine = self.lock()?;
        engine.set_policy(policy.clone());
        self.policy.set(policy);
        Ok(())
    }

    /// A subject's tier, whether it was assigned, its overrides and its group.
    pub fn subject_config(
        &self,
        subject: &str,
    ) -> Result<(String, bool, Overrides, Option<String>), LedgerError> {
        let config = self.lock()?.subject_config(subject);
        self.may_answer()?;
        Ok(config)
    }

    /// Forget a subject's usage, durably.
    pub async fn reset_usage(&self, subject: &str) -> Result<(), LedgerError> {
        let (result, ticket, wait) = self
            .decide(
                |e, _, out| {
                    e.reset_usage(subject, out);
                    Ok(())
                },
                |_| Wait::Own,
            )
            .await?;
        self.answer(result, ticket, wait).await
    }

    /// One housekeeping pass: expire due holds, purge settled records past the retention, and
    /// forget subjects at rest, each at most `max_per_pass`. Persisted, not awaited.
    pub async fn housekeeping(&self) -> Result<Housekeeping, LedgerError> {
        let (result, _ticket, _) = self
            .decide(
                |e, now, out| {
                    // A second expiry pass (the first ran before this closure) drains a
                    // backlog, e.g. after a restart, twice as fast.
                    Ok(Housekeeping {
                        expired: e.expire_due(now, out),
                        purged: e.purge_settled(now, out),
                        forgotten: e.forget_scopes_at_rest(now, out),
                        denial_counters_saved: e.save_denial_counters(out),
                        counts: (e.open_holds(), e.reservation_count(), e.scope_count()),
                    })
                },
                |_| Wait::Nothing,
            )
            .await?;
        let pass = result?;
        crate::telemetry::add(crate::telemetry::HOLDS_EXPIRED, pass.expired as u64);
        Ok(pass)
    }

    /// Wait until everything decided so far is on disk, denials' counters included (a clean
    /// stop loses nothing).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        loop {
            let (saved, _ticket, _) = self
                .decide(
                    |e, _, out| Ok(e.save_denial_counters(out)),
                    |_| Wait::Nothing,
                )
                .await?;
            if saved? == 0 {
                break;
            }
        }
        self.writer.barrier()?.durable().await?;
        Ok(())
    }

    /// Counts for inspection: (open holds, reservation records, scopes in memory).
    pub fn counts(&self) -> Result<(usize, usize, usize), LedgerError> {
        let e = self.lock()?;
        Ok((e.open_holds(), e.reservation_count(), e.scope_count()))
    }

    /// The store (for a consistent export while serving: [`Store::reader`]).
    pub fn store(&self) -> &Arc<dyn Store> {
        self.writer.store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::UsageQuery;

    #[tokio::test]
    async fn a_panic_under_the_engine_lock_trips_the_fail_stop() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(
            LocalLedger::open(
                dir.path(),
                Arc::new(Policy::embedded_default()),
                Bounds::default(),
                Durability::Strict,
                Arc::new(ManualClock::new(1_000_000)),
            )
            .unwrap(),
        );
        assert_eq!(ledger.fail_stop().reason(), None);
        let panicking = ledger.clone();
        let joined = tokio::spawn(async move {
            panicking
                .decide(
                    |_, _, _| -> Result<(), EngineError> { panic!("an invariant broke") },
                    |_| Wait::Nothing,
                )
                .await
        })
        .await;
        assert!(joined.unwrap_err().is_panic());
        assert!(ledger
            .fail_stop()
            .reason()
            .is_some_and(|r| r.contains("panic")));
        // Every later call is refused, never served from a half-changed engine.
        let refused = ledger.usage(&UsageQuery::default()).await.unwrap_err();
        assert!(refused.to_string().contains("panic"), "{refused}");
    }
}
