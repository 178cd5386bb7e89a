//! Reserves a relay gave up on, settled once the upstream answers again: exactly-once
//! forwarding.
//!
//! Why: a Reserve whose answer never came back (a deadline passed, a connection reset) may
//! still have made a hold upstream. The caller was answered by the tier's fail mode, so it
//! will never Commit or Refund that hold, which would then expire and be charged in full for a
//! call that never happened. Every forwarded Reserve carries an idempotency key (the caller's,
//! or one the relay makes), so the relay can ask again later with the same key: the upstream
//! answers with the hold the first attempt made (or makes one, if the first never arrived), and
//! the relay refunds it. Either way the upstream ends with nothing held for it.
//!
//! Bounded: at most [`MAX_ORPHANS`] wait (past that the oldest is dropped, and its hold, if
//! any, expires upstream as before); each is asked about every [`REPLAY_EVERY`] until the
//! upstream answers, and dropped once it answers anything but "unreachable".

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tonic::transport::Channel;

use super::{unreachable, with_credentials};
use crate::ledger::CallContext;
use crate::proto::quota_client::QuotaClient;
use crate::proto::{RefundRequest, ReserveRequest};

/// A Reserve given up on, with the credentials it was sent with (the upstream checks the
/// caller of the replay and of its Refund as it did the first attempt's).
pub type Orphan = (ReserveRequest, CallContext);

/// Most Reserves remembered at once.
pub const MAX_ORPHANS: usize = 10_000;

/// How often the waiting ones are asked about.
pub const REPLAY_EVERY: Duration = Duration::from_millis(500);

/// The Reserves waiting, oldest first.
#[derive(Debug, Default)]
pub struct Orphans {
    waiting: VecDeque<Orphan>,
}

impl Orphans {
    /// Remember `request`; whether an older one was dropped to make room.
    pub fn push(&mut self, request: Orphan) -> bool {
        let dropped = self.waiting.len() >= MAX_ORPHANS;
        if dropped {
            self.waiting.pop_front();
        }
        self.waiting.push_back(request);
        dropped
    }

    /// Take every one waiting.
    pub fn take(&mut self) -> Vec<Orphan> {
        self.waiting.drain(..).collect()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// The Reserves waiting and the task that settles them, shared with that task.
///
/// Why the upstream can change: a follower replica forwards to whichever replica leads, and
/// that changes on a failover. The Reserves it gave up on while the old leader died must be
/// settled with the new one (which loaded the old one's holds), or by this replica itself
/// once it leads: so one `Settler` lives as long as the process and is pointed at each new
/// upstream in turn ([`Settler::point_at`]).
#[derive(Debug)]
pub struct Settler {
    /// The upstream.
    channel: Mutex<Channel>,
    orphans: Mutex<Orphans>,
    /// Whether a task is settling them.
    replaying: AtomicBool,
}

impl Settler {
    /// Nothing waiting yet; settled over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel: Mutex::new(channel),
            orphans: Mutex::new(Orphans::default()),
            replaying: AtomicBool::new(false),
        }
    }

    /// Settle the waiting Reserves, and those given up on from now, with the tollgate at
    /// `channel` (a new leader, or this process once it leads); starts settling any waiting.
    pub fn point_at(self: &Arc<Self>, channel: Channel) {
        *self
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = channel;
        if !self.orphans().is_empty() && !self.replaying.swap(true, Ordering::AcqRel) {
            tokio::spawn(settle(self.clone()));
        }
    }

    fn channel(&self) -> Channel {
        self.channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn orphans(&self) -> MutexGuard<'_, Orphans> {
        self.orphans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Remember a Reserve given up on, and make sure a task settles the waiting ones.
pub fn remember(relay: &Arc<Settler>, request: ReserveRequest, cx: CallContext) {
    if relay.orphans().push((request, cx)) {
        tracing::warn!(
            max = MAX_ORPHANS,
            "relay: too many Reserves wait for the upstream; the oldest is dropped (its hold, if any, expires upstream)"
        );
    }
    if !relay.replaying.swap(true, Ordering::AcqRel) {
        tokio::spawn(settle(relay.clone()));
    }
}

/// Ask the upstream about each waiting Reserve with its key, and refund what it holds for it,
/// until none waits.
async fn settle(relay: Arc<Settler>) {
    loop {
        tokio::time::sleep(REPLAY_EVERY).await;
        let mut client = QuotaClient::new(relay.channel());
        let batch = relay.orphans().take();
        let mut still = Vec::new();
        for orphan in batch {
            let (request, cx) = &orphan;
            match client.reserve(with_credentials(request.clone(), cx)).await {
                Ok(answer) => {
                    let id = answer.into_inner().reservation_id;
                    if id.is_empty() {
                        continue; // denied: nothing is held
                    }
                    let refund = RefundRequest {
                        reservation_id: id.clone(),
                    };
                    match client.refund(with_credentials(refund, cx)).await {
                        Ok(_) => tracing::info!(
                            subject = %crate::sampled_log::subject(&request.subject),
                            reservation = %id,
                            "relay: refunded a hold made upstream by a Reserve whose answer was lost"
                        ),
                        Err(status) if unreachable(&status) => still.push(orphan),
                        // Settled meanwhile (expired, or committed by a caller's retry).
                        Err(_) => {}
                    }
                }
                Err(status) if unreachable(&status) => still.push(orphan),
                Err(_) => {}
            }
        }
        let mut orphans = relay.orphans();
        for request in still {
            orphans.push(request);
        }
        if orphans.is_empty() {
            // Stop; a Reserve remembered after this line starts a new task.
            relay.replaying.store(false, Ordering::Release);
            return;
        }
    }
}
