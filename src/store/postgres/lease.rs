//! Leadership over one database: a lease row (holder, advertised address, epoch, expiry) that
//! exactly one server holds at a time, and the epoch that fences every batch it writes.
//!
//! Why a lease in the database itself rather than a coordinator (etcd, Kubernetes leases): the
//! database is the one thing every replica must reach anyway, and a batch can check the epoch
//! in the same statement that writes it, which no outside coordinator can offer. Expiry is by
//! the database's clock (`now()`), so the replicas' clocks never have to agree.
//!
//! The rules that make it safe:
//! - Taking the lease is one UPDATE that succeeds only once the row has expired, and raises the
//!   epoch: two replicas can never both take it, and every takeover has a new epoch.
//! - Every batch locks the lease row (FOR SHARE) and writes only if the epoch is still its own
//!   ([`FENCED_WRITE`](super::FENCED_WRITE)). A takeover's UPDATE waits for that lock, so a
//!   batch either commits before the takeover (and the new leader, which loads after taking the
//!   lease, sees it) or finds the epoch moved and writes nothing: a deposed leader (paused,
//!   partitioned, slow) can never write.
//! - The holder counts its lease from the moment it SENT the renewal, which is before the
//!   database stamped the new expiry, and stops deciding at 90 % of the TTL from then if no
//!   renewal has come back: so it stops before anyone can take over, whatever the latency.

use std::time::Duration;

use postgres::GenericClient;

use super::backend;
use crate::store::StoreError;

/// Who may lead, and for how long a renewal holds.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// This process: unique per start (host, pid and a random part), so a restarted server is a
    /// new holder.
    pub holder: String,
    /// Where the others reach this server (what followers forward to).
    pub address: String,
    /// How long the lease holds after each renewal.
    pub ttl: Duration,
}

impl LeaseConfig {
    /// A config with a fresh holder id for this process.
    pub fn new(address: String, ttl: Duration) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        // A v7 UUID: its random part tells apart two starts of the same pid.
        let nonce = uuid::Uuid::now_v7();
        Self {
            holder: format!("{host}/{}/{nonce}", std::process::id()),
            address,
            ttl,
        }
    }

    /// How often the holder renews: a third of the TTL, so two renewals can fail before it
    /// stops deciding.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after sending a renewal the holder may still decide without an answer.
    pub fn decide_for(&self) -> Duration {
        self.ttl.mul_f64(0.9)
    }
}

/// The lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Who holds (or last held) it.
    pub holder: String,
    /// Where it is reached.
    pub address: String,
    /// Raised by every takeover.
    pub epoch: i64,
    /// Whether it has run out (anyone may take it).
    pub expired: bool,
}

/// Create the lease row if it is missing (part of the schema).
pub(super) fn ensure(client: &mut impl GenericClient) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tollgate_lease (
                 only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 holder text NOT NULL,
                 address text NOT NULL,
                 epoch bigint NOT NULL,
                 expires_at timestamptz NOT NULL
             );
             INSERT INTO tollgate_lease (holder, address, epoch, expires_at)
             VALUES ('', '', 0, '-infinity') ON CONFLICT DO NOTHING;",
        )
        .map_err(backend)
}

/// Take the lease if it has run out: the new epoch, or none if someone holds it.
pub fn try_acquire(
    client: &mut impl GenericClient,
    config: &LeaseConfig,
) -> Result<Option<i64>, StoreError> {
    let row = client
        .query_opt(
            "UPDATE tollgate_lease
             SET holder = $1, address = $2, epoch = epoch + 1,
                 expires_at = now() + make_interval(secs => $3)
             WHERE expires_at < now()
             RETURNING epoch",
            &[&config.holder, &config.address, &config.ttl.as_secs_f64()],
        )
        .map_err(backend)?;
    Ok(row.map(|r| r.get(0)))
}

/// Extend the lease of `epoch` by the TTL from now: whether it is still ours.
pub fn renew(
    client: &mut impl GenericClient,
    config: &LeaseConfig,
    epoch: i64,
) -> Result<bool, StoreError> {
    let n = client
        .execute(
            "UPDATE tollgate_lease SET expires_at = now() + make_interval(secs => $3)
             WHERE epoch = $1 AND holder = $2",
            &[&epoch, &config.holder, &config.ttl.as_secs_f64()],
        )
        .map_err(backend)?;
    Ok(n == 1)
}

/// Give the lease of `epoch` up at once (a clean stop), so a follower need not wait for the TTL.
pub fn release(client: &mut impl GenericClient, epoch: i64) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE tollgate_lease SET expires_at = '-infinity' WHERE epoch = $1",
            &[&epoch],
        )
        .map_err(backend)?;
    Ok(())
}

/// The lease as it is now.
pub fn current(client: &mut impl GenericClient) -> Result<Leader, StoreError> {
    let row = client
        .query_one(
            "SELECT holder, address, epoch, expires_at < now() FROM tollgate_lease",
            &[],
        )
        .map_err(backend)?;
    Ok(Leader {
        holder: row.get(0),
        address: row.get(1),
        epoch: row.get(2),
        expired: row.get(3),
    })
}
