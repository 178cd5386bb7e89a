//! Reloading the policy without a restart: on SIGHUP, and when the policy file changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::ledger::{LedgerError, LocalLedger};
use crate::policy::Policy;

/// Whatever holds the policy in force: the ledger, or a relay's shared policy.
pub trait PolicyHolder: Send + Sync + 'static {
    /// The policy in force.
    fn current(&self) -> Result<Arc<Policy>, LedgerError>;
    /// Put a new policy in force.
    fn replace(&self, policy: Arc<Policy>) -> Result<(), LedgerError>;
}

impl PolicyHolder for LocalLedger {
    fn current(&self) -> Result<Arc<Policy>, LedgerError> {
        self.policy()
    }
    fn replace(&self, policy: Arc<Policy>) -> Result<(), LedgerError> {
        self.set_policy(policy)
    }
}

/// How often the policy file is checked for a change (its modification time and size).
/// Polling, rather than inotify, works the same on every filesystem, including the symlink swap
/// Kubernetes uses to update a mounted ConfigMap; a stat a second costs nothing.
pub const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(1);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reload `path` into `ledger` now. A bad policy is refused with its file, line and reason,
/// and the one in force stays. Returns whether a new policy was put in force.
pub fn reload(ledger: &impl PolicyHolder, path: &Path, why: &str) -> bool {
    match Policy::from_file(path) {
        Ok(policy) => {
            let unchanged = ledger.current().is_ok_and(|old| *old == policy);
            if unchanged {
                // An operator's SIGHUP deserves an answer in the log; a poll does not.
                if why == "SIGHUP" {
                    tracing::info!(%why, file = %path.display(), "policy reload: no change");
                } else {
                    tracing::debug!(%why, file = %path.display(), "policy reload: no change");
                }
                return false;
            }
            let tiers = policy.tiers().count();
            match ledger.replace(Arc::new(policy)) {
                Ok(()) => {
                    tracing::info!(%why, file = %path.display(), tiers, "policy reloaded; usage and holds kept");
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed");
                    false
                }
            }
        }
        Err(e) => {
            tracing::error!(%why, error = %e, "policy reload refused; the previous policy stays in force");
            false
        }
    }
}

/// Watch `path` for SIGHUP and for changes, for as long as the returned task runs.
pub fn spawn_reloader(
    ledger: Arc<impl PolicyHolder>,
    path: PathBuf,
) -> tokio::task::JoinHandle<()> {
    // The SIGHUP handler is installed here, before returning, not in the task: until it is,
    // SIGHUP's default action kills the process, and the caller announces it is listening (and
    // so may be sent SIGHUP) right after this returns, possibly before the task first runs.
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    tokio::spawn(async move {
        // `last` is the stamp of the policy in force; `seen` the stamp at the previous poll.
        // Starting `last` empty makes the first stable poll compare the file with the policy
        // in force, so a change made while the server started is not missed (an unchanged
        // file is a no-op).
        let mut last = None;
        let mut seen = stamp(&path);
        let mut tick = tokio::time::interval(POLICY_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup_signal = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup_signal = std::future::pending::<()>();
            tokio::select! {
                () = hup_signal => {
                    last = stamp(&path);
                    seen = last;
                    reload(&*ledger, &path, "SIGHUP");
                }
                _ = tick.tick() => {
                    // Reload only a file that looks the same on two polls in a row, so a file
                    // being rewritten in place is never read half-written.
                    let now = stamp(&path);
                    if now != last && now == seen {
                        last = now;
                        reload(&*ledger, &path, "file changed");
                    }
                    seen = now;
                }
            }
        }
    })
}
