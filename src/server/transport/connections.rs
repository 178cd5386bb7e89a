//! The open connections: a bound on how many, and the calls in flight on each.
//!
//! At the bound a new connection evicts the one idle the longest (no call in flight; one that
//! never sent its preface is idle too), so a flood of idle or half-open connections cannot
//! lock out a new client: it costs the flooder its oldest connection. Only when every
//! connection has a call in flight is the new one refused (closed at once, which the client
//! sees as UNAVAILABLE and can retry elsewhere). An evicted connection had no call in flight,
//! so nothing answered or acknowledged is lost; its client reconnects on its next call.
//!
//! Calls are counted per connection (its idle timeout and its close after GOAWAY wait on
//! them) and in all (the shutdown log says how many a timeout cut). The per-call work is
//! atomics and one uncontended per-connection lock; the registry's lock is taken only when a
//! connection opens or closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The open connections of one listener.
#[derive(Debug)]
pub(super) struct Connections {
    max: usize,
    epoch: Instant,
    next_id: AtomicU64,
    /// Calls in flight, all connections together.
    calls: Arc<AtomicUsize>,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    by_id: HashMap<u64, Arc<Connection>>,
    /// Of `by_id`, those told to close that have not closed yet.
    evicted: usize,
}

/// One open connection, as the registry and its calls see it.
#[derive(Debug)]
pub(super) struct Connection {
    id: u64,
    epoch: Instant,
    /// Calls in flight on this connection.
    calls: watch::Sender<usize>,
    /// When the last call ended (or the connection opened), in ms since `epoch`.
    idle_since_ms: AtomicU64,
    all_calls: Arc<AtomicUsize>,
    evicted: CancellationToken,
}

/// A place among the open connections; dropping it (the connection's task ending) frees it.
#[derive(Debug)]
pub(super) struct Slot {
    connection: Arc<Connection>,
    registry: Arc<Connections>,
}

/// A call in flight; dropping it (the answer sent, or the call reset) ends it.
#[derive(Debug)]
pub(super) struct CallGuard {
    connection: Arc<Connection>,
}

impl Connections {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            calls: Arc::new(AtomicUsize::new(0)),
            open: Mutex::new(Open::default()),
        }
    }

    /// A slot for a new connection: a free one, or the slot of the connection idle the
    /// longest, which is told to close. None when every connection has a call in flight.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.by_id.len() - open.evicted >= self.max {
            let victim = open
                .by_id
                .values()
                .filter(|c| !c.evicted.is_cancelled() && c.calls_in_flight() == 0)
                // Ties (same millisecond) go to the older connection.
                .min_by_key(|c| (c.idle_since_ms.load(Ordering::Relaxed), c.id))?
                .clone();
            victim.evicted.cancel();
            open.evicted += 1;
            tracing::debug!(
                id = victim.id,
                "connection bound reached: the longest-idle closes"
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            id,
            epoch: self.epoch,
            calls: watch::Sender::new(0),
            idle_since_ms: AtomicU64::new(ms_since(self.epoch)),
            all_calls: self.calls.clone(),
            evicted: CancellationToken::new(),
        });
        open.by_id.insert(id, connection.clone());
        Some(Slot {
            connection,
            registry: self.clone(),
        })
    }

    /// Connections open now (evicted ones still closing included).
    pub(super) fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    /// Calls in flight now, all connections together.
    pub(super) fn calls_in_flight(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if open.by_id.remove(&self.connection.id).is_some()
            && self.connection.evicted.is_cancelled()
        {
            open.evicted -= 1;
        }
    }
}

impl Slot {
    pub(super) fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }
}

impl Connection {
    /// A call begins; it is in flight until the guard is dropped.
    pub(super) fn start_call(self: &Arc<Self>) -> CallGuard {
        self.all_calls.fetch_add(1, Ordering::AcqRel);
        self.calls.send_modify(|n| *n += 1);
        CallGuard {
            connection: self.clone(),
        }
    }

    fn calls_in_flight(&self) -> usize {
        *self.calls.borrow()
    }

    /// Completes when the registry tells this connection to close (the bound was reached and
    /// it was the longest idle).
    pub(super) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// Completes once no call is in flight.
    pub(super) async fn no_calls(&self) {
        let mut calls = self.calls.subscribe();
        // The sender lives in `self`, so the channel cannot close while this runs.
        let _ = calls.wait_for(|n| *n == 0).await;
    }

    /// Completes once the connection has had no call in flight for `timeout`.
    pub(super) async fn idle_for(&self, timeout: Duration) {
        loop {
            self.no_calls().await;
            let since = self.idle_since_ms.load(Ordering::Acquire);
            let deadline = self.epoch + Duration::from_millis(since) + timeout;
            tokio::time::sleep_until(deadline.into()).await;
            if self.calls_in_flight() == 0 && self.idle_since_ms.load(Ordering::Acquire) == since {
                return;
            }
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let c = &self.connection;
        c.calls.send_modify(|n| {
            *n -= 1;
            if *n == 0 {
                c.idle_since_ms.store(ms_since(c.epoch), Ordering::Release);
            }
        });
        c.all_calls.fetch_sub(1, Ordering::AcqRel);
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_bound_the_longest_idle_is_evicted_and_busy_ones_are_kept() {
        let registry = Arc::new(Connections::new(2));
        let first = registry.admit().expect("room");
        let second = registry.admit().expect("room");
        let _busy = first.connection().start_call();
        // `second` is the only idle one: it is told to close, and the newcomer gets a slot.
        let third = registry.admit().expect("evicts the idle one");
        assert!(second.connection().evicted.is_cancelled());
        assert!(!first.connection().evicted.is_cancelled());
        // Until `second` has closed it is not chosen again; `third` is idle, so it goes next.
        let fourth = registry.admit().expect("evicts the next idle one");
        assert!(third.connection().evicted.is_cancelled());
        drop((second, third));
        assert_eq!(registry.open(), 2);
        // Every open connection busy: a newcomer is refused.
        let _busy_too = fourth.connection().start_call();
        assert!(registry.admit().is_none());
        assert_eq!(registry.calls_in_flight(), 2);
    }

    #[test]
    fn a_call_guard_counts_while_it_lives() {
        let registry = Arc::new(Connections::new(1));
        let slot = registry.admit().unwrap();
        let a = slot.connection().start_call();
        let b = slot.connection().start_call();
        assert_eq!(slot.connection().calls_in_flight(), 2);
        drop(a);
        assert_eq!(registry.calls_in_flight(), 1);
        drop(b);
        assert_eq!(slot.connection().calls_in_flight(), 0);
        assert_eq!(registry.calls_in_flight(), 0);
    }
}
