//! Keeping the lease: a thread that renews it every third of the TTL on a connection of its
//! own, and a watchdog that stops the server if no renewal has come back in time.
//!
//! Why two threads: a renewal can hang (a partition, a database that stopped answering), and
//! while it hangs nobody would notice that the lease is running out. The watchdog only reads
//! the time the last successful renewal was sent, so it trips the fail-stop at 90 % of the TTL
//! from then (see `lease.rs`: before any follower can take over) whatever the renewal is doing.
//! Why a fail-stop rather than stepping down in place: the process exits, its supervisor starts
//! it again, and it comes back as a standby that loads whatever the new leader has written:
//! one path for every way leadership ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;

use super::lease::{self, LeaseConfig};
use super::ClientOnAnyThread;
use crate::failstop::FailStop;

/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// The renewal and watchdog threads of one lease; [`Renewal::stop`] (or drop) ends them.
pub struct Renewal {
    shared: Arc<Shared>,
}

/// Whether the lease still holds, as the holder counts it: read on every answer, so two
/// atomic loads and a clock read, no lock.
#[derive(Clone)]
pub struct Authority {
    shared: Arc<Shared>,
    /// How long after a renewal was sent the holder may decide ([`LeaseConfig::decide_for`]).
    limit: Duration,
}

impl Authority {
    /// Whether the lease still holds (and the renewal has not been stopped or lost).
    pub fn holds(&self) -> bool {
        if self.shared.stopped.load(Ordering::Relaxed) {
            return false;
        }
        let renewed = Duration::from_millis(self.shared.renewed_ms.load(Ordering::Relaxed));
        self.shared.base.elapsed().saturating_sub(renewed) < self.limit
    }
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    /// Milliseconds after `base` at which the last successful renewal was sent.
    renewed_ms: AtomicU64,
    base: Instant,
    stopped: AtomicBool,
}

impl Shared {
    /// Sleep up to `d`; whether to stop.
    fn sleep(&self, d: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (stop, _) = self
            .wake
            .wait_timeout_while(stop, d, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        *stop
    }
}

impl Renewal {
    /// Start renewing the lease of `epoch`, taken by a statement sent at `taken` (the lease is
    /// counted from then).
    pub fn start(
        db: super::database::Database,
        config: LeaseConfig,
        epoch: i64,
        taken: Instant,
        failed: FailStop,
    ) -> Self {
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            renewed_ms: AtomicU64::new(0),
            base: taken,
            stopped: AtomicBool::new(false),
        });
        {
            let (shared, config, failed) = (shared.clone(), config.clone(), failed.clone());
            std::thread::Builder::new()
                .name("tollgate-lease".into())
                .spawn(move || renew_loop(&shared, &db, &config, epoch, &failed))
                .expect("spawn the lease renewal thread");
        }
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tollgate-lease-watch".into())
                .spawn(move || watch(&shared, &config, &failed))
                .expect("spawn the lease watchdog");
        }
        Self { shared }
    }

    /// The check that the lease still holds.
    pub fn authority(&self, config: &LeaseConfig) -> Authority {
        Authority {
            shared: self.shared.clone(),
            limit: config.decide_for(),
        }
    }

    /// Stop both threads (the lease is then released or left to expire by the caller).
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop();
    }
}

fn renew_loop(
    shared: &Shared,
    db: &super::database::Database,
    config: &LeaseConfig,
    epoch: i64,
    failed: &FailStop,
) {
    let mut client: Option<ClientOnAnyThread> = None;
    loop {
        if shared.sleep(config.renew_every()) {
            return;
        }
        let sent = shared.base.elapsed();
        if client.is_none() {
            // A short connect timeout: a renewal that cannot connect soon is as good as lost.
            client = db
                .connect(Some(config.renew_every()))
                .ok()
                .map(|c: Client| ClientOnAnyThread(Some(c)));
        }
        let Some(c) = client.as_mut() else { continue };
        match lease::renew(&mut **c, config, epoch) {
            Ok(true) => {
                let ms = u64::try_from(sent.as_millis()).unwrap_or(u64::MAX);
                shared.renewed_ms.fetch_max(ms, Ordering::Relaxed);
            }
            Ok(false) => {
                shared.stopped.store(true, Ordering::Relaxed);
                failed.trip(format!(
                    "lost the lease: another replica took over (this one's epoch was {epoch}); a restart comes back as a standby"
                ));
                return;
            }
            // The connection may be gone: a new one next time.
            Err(_) => client = None,
        }
    }
}

fn watch(shared: &Shared, config: &LeaseConfig, failed: &FailStop) {
    let limit = config.decide_for();
    loop {
        if shared.sleep(WATCH_EVERY) || shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        let renewed = Duration::from_millis(shared.renewed_ms.load(Ordering::Relaxed));
        let since = shared.base.elapsed().saturating_sub(renewed);
        if since >= limit {
            failed.trip(format!(
                "the lease was not renewed for {:.1} s (TTL {:.1} s): stopping before another replica can take over",
                since.as_secs_f64(),
                config.ttl.as_secs_f64()
            ));
            return;
        }
    }
}
