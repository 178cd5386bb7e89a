//! The forwarding ledger: relay mode (`tollgate serve --upstream URL`), a sidecar that keeps
//! no ledger, and a follower replica, which forwards to its leader.
//!
//! A sidecar that kept its own ledger would give every user N times their quota across N pods.
//! A relay instead validates requests and counts prompt tokens locally (the CPU-heavy part,
//! which then scales with the app pods), and forwards Reserve, Commit, Refund, Extend,
//! GetUsage and the Admin calls to the central authority with the counts filled in, over one
//! pooled HTTP/2 connection with deadlines. CountTokens is answered locally.
//!
//! When the upstream cannot be reached (connection refused, deadline passed), a Reserve is
//! answered as the subject's tier says (`fail = "closed"` or `"open"` in the policy): closed
//! denies it with `denied_by = "upstream_unavailable"`; open allows it, with
//! `shadow_denied_by = "upstream_unavailable"` in the answer, a warning in the log and a count
//! in the metrics, under a reservation id the relay remembers so that its Commit, Refund and
//! Extend are answered here. Commit, Refund and the rest of other holds answer UNAVAILABLE (the
//! app retries them; they are idempotent).

mod forward;
mod local;
mod orphans;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use forward::UPSTREAM_UNAVAILABLE;
use local::{LocalHold, LocalHolds};
pub use orphans::Settler;

use crate::clock::Clock;
use crate::ledger::{CallContext, FORWARDED_CALLER};
use crate::policy::{Policy, PolicyCell};

/// The deadline of one call to the upstream when `--upstream-timeout` is not given: far above
/// a healthy central service's sub-millisecond answers, short enough that an app's call is not
/// held up for long when the central service is gone.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Subjects whose tier the relay remembers (for the fail mode); past this the memory is
/// cleared and refilled by the next answers.
pub const MAX_REMEMBERED_TIERS: usize = 100_000;

/// A [`Ledger`](crate::ledger::Ledger) that forwards every call to the tollgate that decides
/// (`forward.rs`), and answers by the tier's fail mode when that one cannot be reached.
///
/// Why std locks: no `.await` is held under any of them, and each guards a map lookup.
pub struct ForwardingLedger {
    channel: Channel,
    upstream: String,
    policy: PolicyCell,
    tiers: Mutex<HashMap<String, String>>,
    local: Mutex<LocalHolds>,
    /// Reserves given up on, to settle once the upstream answers (`orphans.rs`).
    orphans: Arc<orphans::Settler>,
    /// The deadline of one upstream call; also how long a Reserve keeps retrying.
    timeout: Duration,
    /// A follower replica's relay (to its leader): ready only while the upstream is.
    follower: bool,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for ForwardingLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardingLedger")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// Why a relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The upstream is not a valid URL.
    #[error("--upstream {url:?} is not a valid URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
}

impl ForwardingLedger {
    /// A relay to `upstream` (e.g. `http://tollgate-central:50051`). The connection is made
    /// lazily and remade as needed, so a relay starts, and answers as its fail mode says,
    /// even while the central service is down.
    pub fn new(
        upstream: &str,
        policy: Arc<Policy>,
        timeout: Duration,
        clock: Arc<dyn Clock>,
        tls: Option<&UpstreamTls>,
    ) -> Result<Self, RelayError> {
        let channel = channel_to(upstream, timeout, tls)?;
        Ok(Self {
            orphans: Arc::new(orphans::Settler::new(channel.clone())),
            channel,
            upstream: upstream.to_string(),
            policy: PolicyCell::new(policy),
            tiers: Mutex::new(HashMap::new()),
            local: Mutex::new(LocalHolds::default()),
            timeout,
            follower: false,
            clock,
        })
    }

    /// Settle the Reserves given up on with `settler` (one that outlives this ledger: see
    /// [`Settler`]), pointed at this ledger's upstream from now.
    pub fn settling_with(mut self, settler: Arc<Settler>) -> Self {
        settler.point_at(self.channel.clone());
        self.orphans = settler;
        self
    }

    /// This relay is a follower replica's, to its leader: its Quota and Admin services say
    /// SERVING only while the leader's do (a sidecar relay stays SERVING through an outage, so
    /// that its fail modes answer and the app's pod stays ready).
    pub fn as_follower(mut self) -> Self {
        self.follower = true;
        self
    }

    /// Whether this is a follower replica's relay.
    pub fn is_follower(&self) -> bool {
        self.follower
    }

    /// Whether the upstream's Quota service answers health SERVING within the deadline.
    pub async fn upstream_serving(&self) -> bool {
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel());
        let ask = client.check(tonic_health::pb::HealthCheckRequest {
            service: "tollgate.v1.Quota".into(),
        });
        matches!(
            tokio::time::timeout(self.timeout, ask).await,
            Ok(Ok(answer)) if answer.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    }

    /// The policy in force here (for counting and fail modes).
    pub fn current_policy(&self) -> Arc<Policy> {
        self.policy.get()
    }

    /// Put a new policy in force here (a reload).
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.set(policy);
    }

    /// The upstream URL.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Remember a subject's tier, as the upstream reported it.
    fn remember_tier(&self, subject: &str, tier: &str) {
        if tier.is_empty() {
            return;
        }
        let mut tiers = self
            .tiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tiers.get(subject).is_some_and(|t| t == tier) {
            return;
        }
        if tiers.len() >= MAX_REMEMBERED_TIERS {
            tiers.clear();
        }
        tiers.insert(subject.to_string(), tier.to_string());
    }

    /// The tier a subject was last reported in, else the policy's default.
    fn tier_of(&self, subject: &str, policy: &Policy) -> String {
        self.tiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(subject)
            .filter(|t| policy.tier(t).is_some())
            .cloned()
            .unwrap_or_else(|| policy.default_tier().name.clone())
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalHolds> {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_us(&self) -> u64 {
        self.clock.now_micros()
    }
}

/// How a relay or follower reaches an upstream over TLS: the CA that signs the upstream's
/// certificate, the name that certificate is checked against (followers dial a leader's pod
/// address, which no certificate names), and a client certificate for mTLS. Read once at
/// start: a follower builds a new channel at each change of leader, a relay keeps one, so
/// rotating these files needs a restart of the relay.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    config: ClientTlsConfig,
}

impl UpstreamTls {
    /// From PEM files: `ca` (required), `server_name` (else the host of the URL), and a
    /// client certificate and key for mTLS.
    pub fn load(
        ca: &std::path::Path,
        server_name: Option<&str>,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, String> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--upstream-ca", ca)?));
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        if let Some((cert, key)) = client {
            let identity =
                Identity::from_pem(read("--upstream-cert", cert)?, read("--upstream-key", key)?);
            config = config.identity(identity);
        }
        Ok(Self { config })
    }
}

/// A channel to the tollgate at `upstream`, with `timeout` on connecting and on each call;
/// over TLS when `upstream` is https:// (which then needs `tls`). Lazy: the connection is
/// made on the first call and remade as needed.
pub fn channel_to(
    upstream: &str,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<Channel, RelayError> {
    let bad = |reason: String| RelayError::BadUrl {
        url: upstream.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(upstream.to_string()).map_err(|e| bad(e.to_string()))?;
    let endpoint = match (upstream.split_once("://").map(|(s, _)| s), tls) {
        (Some("http"), None) => endpoint,
        (Some("http"), Some(_)) => {
            return Err(bad(
                "--upstream-ca is given: the upstream must be https://".into()
            ))
        }
        (Some("https"), Some(tls)) => endpoint
            .tls_config(tls.config.clone())
            .map_err(|e| bad(e.to_string()))?,
        (Some("https"), None) => {
            return Err(bad(
                "an https:// address needs the CA that signs its certificate (--upstream-ca; for the usage and export commands, --ca)"
                    .into(),
            ))
        }
        _ => return Err(bad("it must start with http:// or https://".into())),
    };
    Ok(endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A call's message in a request that carries the caller's `authorization`, which the
/// tollgate that decides checks again (its `[callers]` and `[operators]`).
pub(crate) fn with_credentials<T>(message: T, cx: &CallContext) -> tonic::Request<T> {
    let mut forwarded = tonic::Request::new(message);
    if let Some(auth) = &cx.authorization {
        forwarded
            .metadata_mut()
            .insert("authorization", auth.clone());
    }
    // The caller this replica authenticated (a leader believes it only from a replica's
    // certificate: `server::auth::caller`).
    if let Some(caller) = cx
        .caller
        .as_deref()
        .and_then(|c| tonic::metadata::AsciiMetadataValue::try_from(c).ok())
    {
        forwarded.metadata_mut().insert(FORWARDED_CALLER, caller);
    }
    forwarded
}

/// Whether an error from the upstream means it could not be reached (rather than an answer).
/// UNKNOWN counts: tollgate answers every refusal with a code of its own, so an UNKNOWN is a
/// call that failed in transit (tonic's "transport error": a connection reset, or a TLS
/// handshake the upstream refused after the client thought it done, as TLS 1.3 does with a
/// client certificate it does not accept).
pub fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}
