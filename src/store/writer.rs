//! Group commit: one writer thread owns the disk; requests hand it their mutations and wait.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
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
    /// Answered as soon as decided; the writer flushes at least every 10 ms. A crash can lose
    /// the operations answered in those 10 ms (plus the flush under way), never more, and never
    /// a partial operation.
    Relaxed,
}

/// How often the writer flushes records nobody waits for: every record in relaxed mode; in
/// strict mode, those of denials' counters and of expiry, which acknowledge nothing.
pub const RELAXED_FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Decisions queued for the writer at most; a full queue makes new requests wait for a slot
/// (backpressure, off the engine lock) instead of memory growing while the disk lags.
pub const QUEUE_BOUND: usize = 16_384;
/// Requests folded into one sled batch at most, so one flush's latency stays bounded.
pub const MAX_GROUP: usize = 4_096;

struct Job {
    mutations: Vec<Mutation>,
    done: Option<oneshot::Sender<Result<(), String>>>,
    /// The queue slot this job holds, given back when the writer has handled it.
    _slot: Option<Slot>,
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
            .spawn(move || run(thread_store, rx, thread_failed))
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
            _slot: Some(slot),
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
            _slot: None,
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

fn run(store: Arc<dyn Store>, rx: Receiver<Job>, failed: FailStop) {
    let mut group: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut waiting = Coalesced::default();
    // Records applied to sled but not yet synced, and since when.
    let mut dirty_since: Option<Instant> = None;
    // After a failed write, memory is ahead of disk: the writer fails every later request too
    // rather than acknowledge state that a restart would not bring back, and trips the
    // fail-stop so the server stops (the shared switch also makes `submit` refuse new work).
    let fail = |e: &StoreError| {
        failed.trip(format!("store write failed: {e}"));
    };
    loop {
        // Wait for work; with unsynced records, only until they are due for their sync.
        let first = match dirty_since {
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            Some(since) => {
                let due = RELAXED_FLUSH_INTERVAL.saturating_sub(since.elapsed());
                match rx.recv_timeout(due) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        if failed.reason().is_none() {
                            if let Err(e) = store.flush() {
                                fail(&e);
                            }
                        }
                        dirty_since = None;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        for job in &mut group {
            waiting.add(job.mutations.drain(..));
        }
        let wrote = !waiting.is_empty();
        let batch = waiting.take();
        let mut result = match failed.reason() {
            Some(reason) => Err(StoreError::Failed(reason.to_string())),
            None if !wrote => Ok(()),
            None => store.write(&batch),
        };
        if result.is_ok() && wrote {
            dirty_since.get_or_insert_with(Instant::now);
        }
        // Sync when someone waits (a strict answer, a barrier) and something is unsynced, or
        // when the oldest unsynced record is due. A barrier on a store with nothing unsynced
        // is answered at once: every earlier group is already on disk.
        let waited = group.iter().any(|j| j.done.is_some());
        let must_flush =
            dirty_since.is_some_and(|since| waited || since.elapsed() >= RELAXED_FLUSH_INTERVAL);
        if result.is_ok() && must_flush {
            result = store.flush();
            dirty_since = None;
        }
        if let Err(e) = &result {
            fail(e);
        }
        let answer = result.map_err(|e| e.to_string());
        for job in group.drain(..) {
            if let Some(done) = job.done {
                let _ = done.send(answer.clone());
            }
        }
        // After the answers: what the backend may defer delays no answer.
        if failed.reason().is_none() {
            if let Err(e) = store.maintain() {
                fail(&e);
            }
        }
    }
    if failed.reason().is_none() {
        if let Err(e) = store.flush().and_then(|()| store.close()) {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}
