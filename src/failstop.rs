//! Fail-stop: the one signal that says this process can no longer serve correctly.
//!
//! Why a type of its own: the faults that end a ledger happen in places that cannot act on
//! them. The writer thread finds that a write or sync failed (memory is now ahead of disk); a
//! request panics while it holds the engine lock (the state may be half-changed); the sweeper
//! meets either. None of them can flip health or stop the server, and each refusing calls on
//! its own left a process that answered UNAVAILABLE forever while health said SERVING, so
//! Kubernetes never restarted it. They all [`trip`](FailStop::trip) this instead; the server
//! waits on [`tripped`](FailStop::tripped), turns health NOT_SERVING, logs one line, drains,
//! and the process exits non-zero. The durable state is what a restart loads.
//!
//! The first reason wins: later faults are consequences of the first.

use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

/// A one-way switch from "serving" to "must stop", with the reason. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct FailStop(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Set once; read on every request, so a plain atomic load, not a lock.
    reason: OnceLock<String>,
    /// Wakes whoever waits for the trip (the server).
    tripped: watch::Sender<bool>,
}

impl Default for FailStop {
    fn default() -> Self {
        Self::new()
    }
}

impl FailStop {
    /// A switch not yet tripped.
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            reason: OnceLock::new(),
            tripped: watch::Sender::new(false),
        }))
    }

    /// Trip the switch. Returns whether this call tripped it (false: it already was, and the
    /// first reason stands). Never blocks and never logs, so it is safe anywhere: under the
    /// engine lock, on the writer thread, while unwinding.
    pub fn trip(&self, reason: impl Into<String>) -> bool {
        let first = self.0.reason.set(reason.into()).is_ok();
        if first {
            self.0.tripped.send_replace(true);
        }
        first
    }

    /// Why it tripped, if it has.
    pub fn reason(&self) -> Option<&str> {
        self.0.reason.get().map(String::as_str)
    }

    /// Completes with the reason once the switch has tripped (at once if it already has).
    pub async fn tripped(&self) -> String {
        let mut rx = self.0.tripped.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|t| *t).await;
        self.reason().unwrap_or_default().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_reason_wins_and_waiters_wake() {
        let f = FailStop::new();
        assert_eq!(f.reason(), None);
        let waiter = tokio::spawn({
            let f = f.clone();
            async move { f.tripped().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(f.trip("disk full"));
        assert!(!f.trip("a consequence"));
        assert_eq!(waiter.await.unwrap(), "disk full");
        assert_eq!(
            f.tripped().await,
            "disk full",
            "a late waiter sees it at once"
        );
    }
}
