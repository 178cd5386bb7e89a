//! Group commit: one writer thread owns the store; requests hand it their mutations and (in
//! strict mode) wait.
//!
//! The writer gathers every decision queued, coalesces their records (each record once, its
//! last value: `batch.rs`), writes them as one batch and syncs, then answers. What it writes
//! when:
//! - a strict answer (or a barrier) waits: at once, with everything else waiting;
//! - nothing waits (relaxed mode; a denial's counters, expiry): once the oldest record has
//!   waited [`RELAXED_FLUSH_INTERVAL`], as one batch for the whole interval, so relaxed mode
//!   costs one write and one sync per interval, however many decisions it holds.
//!
//! Then the store's own upkeep ([`Store::maintain`]), after the answers.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::batch::Coalesced;
use super::{Store, StoreError};
use crate::engine::Mutation;
use crate::failstop::FailStop;

/// When a mutating call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Answered only once its records are flushed to disk: `kill -9` right after an answer
    /// loses nothing. Concurrent requests share one flush (group commit).
    #[default]
    Strict,
    /// Answered as soon as decided, before anything is written; the writer writes and syncs
    /// what was decided every 10 ms, as one batch. A crash can lose the operations answered in
    /// those 10 ms (plus those of the write and sync under way), never more, and never a
    /// partial operation.
    Relaxed,
}

/// How long records nobody waits for are kept before they are written and synced: every record
/// in relaxed mode; in strict mode, those of denials' counters and of expiry, which acknowledge
/// nothing.
pub const RELAXED_FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Decisions queued for the writer at most; a full queue makes new requests wait for a slot
/// (backpressure, off the engine lock) instead of memory growing while the disk lags.
pub const QUEUE_BOUND: usize = 16_384;
/// Requests taken from the queue at a time at most, so one write's latency stays bounded.
pub const MAX_GROUP: usize = 4_096;

struct Job {
    mutations: Vec<Mutation>,
    done: Option<oneshot::Sender<Result<(), String>>>,
    /// The queue slot this job holds, given back once its records are written.
    slot: Option<Slot>,
}

/// A place in the writer's queue, taken before the engine lock (see [`Writer::slot`]).
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

/// What a request waits on before it answers.
#[derive(Debug)]
pub enum Ticket {
    /// Nothing to wait for (no mutations, or relaxed durability).
    Ready,
    /// Answered by the writer once the request's records are durable.
    Pending(oneshot::Receiver<Result<(), String>>),
}

impl Ticket {
    /// Wait until the records are durable (or the store failed).
    pub async fn durable(self) -> Result<(), StoreError> {
        match self {
            Ticket::Ready => Ok(()),
            Ticket::Pending(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(StoreError::Failed(reason)),
                Err(_) => Err(StoreError::WriterGone),
            },
        }
    }
}

/// The handle requests use to reach the writer thread.
///
/// Why a std thread: sled's flush blocks, so it must not run on the async reactor. Why slots
/// taken before the engine lock: `submit` runs under the lock (to keep records in decision
/// order) and must never block there, so the queue's bound is enforced by a semaphore that a
/// request waits on asynchronously before it takes the lock; `submit` itself never waits.
pub struct Writer {
    /// The store the thread writes, for consistent reads beside it.
    store: Arc<dyn Store>,
    tx: Option<mpsc::Sender<Job>>,
    slots: Arc<Semaphore>,
    failed: FailStop,
    durability: Durability,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Start the writer thread over `store`, which [`Store::load`] has checked. A failed write
    /// or sync trips `failed`.
    pub fn start(store: Arc<dyn Store>, durability: Durability, failed: FailStop) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread_failed = failed.clone();
        let thread_store = store.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || run(thread_store, rx, durability, thread_failed))
            .expect("spawn the writer thread");
        Self {
            store,
            tx: Some(tx),
            slots: Arc::new(Semaphore::new(QUEUE_BOUND)),
            failed,
            durability,
            thread: Some(thread),
        }
    }

    /// The store written (for consistent reads: see [`Store::reader`]).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The durability in force.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    fn check_healthy(&self) -> Result<(), StoreError> {
        match self.failed.reason() {
            Some(reason) => Err(StoreError::Failed(reason.to_string())),
            None => Ok(()),
        }
    }

    /// Wait for room in the queue. Call before taking the engine lock: while the disk is
    /// behind by [`QUEUE_BOUND`] decisions, callers wait here, off the lock, and the runtime
    /// (health checks included) keeps running.
    pub async fn slot(&self) -> Result<Slot, StoreError> {
        self.check_healthy()?;
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map(Slot)
            .map_err(|_| StoreError::WriterGone)
    }

    /// Hand over one decision's mutations, holding `slot`. Never blocks.
    ///
    /// `awaited`: whether the caller will wait for them to be durable before it answers (an
    /// admitted Reserve, a Commit). Records nobody waits for (a denial's counters, expiry found
    /// on the way) never force a sync of their own: they ride with the next awaited group or
    /// the timer, so a flood of denials costs the disk nothing extra.
    ///
    /// Must be called while the engine lock is held: records then reach the writer in decision
    /// order, so a later decision's record of a subject never lands before an earlier one's, and
    /// a request that observed another's effects is flushed with or after it. Safe to answer the
    /// observer only after its own ticket: nothing is acknowledged before it is durable.
    pub fn submit(
        &self,
        slot: Slot,
        mutations: Vec<Mutation>,
        awaited: bool,
    ) -> Result<Ticket, StoreError> {
        if mutations.is_empty() {
            return Ok(Ticket::Ready);
        }
        self.check_healthy()?;
        let tx = self.tx.as_ref().ok_or(StoreError::WriterGone)?;
        let (done, ticket) = match self.durability {
            Durability::Strict if awaited => {
                let (s, r) = oneshot::channel();
                (Some(s), Ticket::Pending(r))
            }
            Durability::Strict | Durability::Relaxed => (None, Ticket::Ready),
        };
        tx.send(Job {
            mutations,
            done,
            slot: Some(slot),
        })
        .map_err(|_| StoreError::WriterGone)?;
        Ok(ticket)
    }

    /// A ticket that completes once everything submitted before it is flushed.
    pub fn barrier(&self) -> Result<Ticket, StoreError> {
        self.check_healthy()?;
        let tx = self.tx.as_ref().ok_or(StoreError::WriterGone)?;
        let (s, r) = oneshot::channel();
        tx.send(Job {
            mutations: Vec::new(),
            done: Some(s),
            slot: None,
        })
        .map_err(|_| StoreError::WriterGone)?;
        Ok(Ticket::Pending(r))
    }
}

impl Drop for Writer {
    /// Stop the writer: it drains the queue, flushes, and exits; wait for it.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the writer thread holds between its rounds.
struct Round {
    /// Records not yet written, each its last value.
    waiting: Coalesced,
    /// The queue slots of the decisions not yet written.
    slots: Vec<Slot>,
    /// Answered after the next sync.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Since when records have waited to be written or synced (none: nothing unsynced).
    unsynced_since: Option<Instant>,
}

impl Round {
    fn take(&mut self, job: Job) {
        if !job.mutations.is_empty() {
            self.waiting.add(job.mutations);
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        self.slots.extend(job.slot);
        self.waiters.extend(job.done);
    }

    /// Whether the oldest unsynced record is due for its sync.
    fn due(&self) -> bool {
        self.unsynced_since
            .is_some_and(|since| since.elapsed() >= RELAXED_FLUSH_INTERVAL)
    }

    /// Write what waits, sync, and answer whoever waits. After a failure (`failed` already
    /// tripped, or tripped here), nothing is written and every waiter is told why.
    fn write_and_sync(&mut self, store: &dyn Store, failed: &FailStop) {
        let batch = self.waiting.take();
        let started = Instant::now();
        let mut result = match failed.reason() {
            Some(reason) => Err(StoreError::Failed(reason.to_string())),
            None if batch.is_empty() => Ok(()),
            None => store.write(&batch),
        };
        // Written (or failed): the decisions leave the queue.
        self.slots.clear();
        if result.is_ok() && self.unsynced_since.is_some() {
            result = store.flush();
            // One group made durable, whatever the backend splits between write and flush
            // (sled: an append, then the sync; PostgreSQL: the committing statement).
            crate::telemetry::flush_took(started.elapsed());
        }
        self.unsynced_since = None;
        if let Err(e) = &result {
            // After a failed write, memory is ahead of disk: the writer fails every later
            // request too rather than acknowledge state that a restart would not bring back,
            // and trips the fail-stop so the server stops (the shared switch also makes
            // `submit` refuse new work).
            failed.trip(format!("store write failed: {e}"));
        }
        let answer = result.map_err(|e| e.to_string());
        for done in self.waiters.drain(..) {
            let _ = done.send(answer.clone());
        }
    }
}

fn run(store: Arc<dyn Store>, rx: Receiver<Job>, durability: Durability, failed: FailStop) {
    let mut round = Round {
        waiting: Coalesced::default(),
        slots: Vec::new(),
        waiters: Vec::new(),
        unsynced_since: None,
    };
    // Whether the store has upkeep left, done whenever nothing else is due.
    let mut upkeep = false;
    let mut open = true;
    while open {
        // Wait for work: a job, the oldest unsynced record falling due, or (with upkeep left)
        // nothing at all.
        let first = match round.unsynced_since {
            _ if upkeep => match rx.try_recv() {
                Ok(job) => Some(job),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    None
                }
            },
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => {
                    open = false;
                    None
                }
            },
            // Relaxed: nobody waits (but a barrier, which may wait the interval), so the
            // writer sleeps out the interval instead of waking for every decision queued.
            Some(since) if durability == Durability::Relaxed => {
                std::thread::sleep(RELAXED_FLUSH_INTERVAL.saturating_sub(since.elapsed()));
                None
            }
            Some(since) => {
                match rx.recv_timeout(RELAXED_FLUSH_INTERVAL.saturating_sub(since.elapsed())) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            }
        };
        // Take everything queued, up to a bound.
        let mut taken = 0;
        if let Some(job) = first {
            round.take(job);
            taken += 1;
        }
        while open && taken < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => {
                    round.take(job);
                    taken += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Sync when someone waits (a strict answer, a barrier) or the oldest record is due. A
        // barrier on a store with nothing unsynced is answered at once: every earlier group
        // is already on disk.
        if !round.waiters.is_empty() || round.due() || !open {
            round.write_and_sync(store.as_ref(), &failed);
        }
        // After the answers: what the store may defer delays no answer.
        upkeep = false;
        if failed.reason().is_none() {
            match store.maintain() {
                Ok(more) => upkeep = more,
                Err(e) => {
                    failed.trip(format!("store upkeep failed: {e}"));
                }
            }
        }
    }
    if failed.reason().is_none() {
        if let Err(e) = store.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}
